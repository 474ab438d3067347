"""The SSRF address rules and allow-list (durable_actor.http_guard), and the pure parts of the
HTTP step: config to request, response to envelope."""

from __future__ import annotations

import base64
import ipaddress

import pytest
from hypothesis import given
from hypothesis import strategies as st

from durable_actor import http_guard
from durable_actor.errors import StepError
from durable_actor.http_guard import AllowList, Blocked, check, classify
from durable_actor.steps import http as http_step

# The test's own statement of what must be blocked (written from the RFCs, not from the module).
BLOCKED_V4 = [ipaddress.IPv4Network(n) for n in (
    "0.0.0.0/8", "10.0.0.0/8", "100.64.0.0/10", "127.0.0.0/8", "169.254.0.0/16",
    "172.16.0.0/12", "192.0.0.0/24", "192.0.2.0/24", "192.88.99.0/24", "192.168.0.0/16",
    "198.18.0.0/15", "198.51.100.0/24", "203.0.113.0/24", "224.0.0.0/4", "240.0.0.0/4")]


def ip(text: str) -> http_guard.IPAddress:
    return ipaddress.ip_address(text)


@pytest.mark.parametrize(("address", "rule"), [
    ("127.0.0.1", "a loopback address (127.0.0.0/8)"),
    ("127.255.255.254", "a loopback address (127.0.0.0/8)"),
    ("169.254.169.254", "a link-local address (169.254.0.0/16), the cloud metadata endpoint"),
    ("169.254.1.1", "a link-local address (169.254.0.0/16)"),
    ("10.0.0.1", "a private address (10.0.0.0/8)"),
    ("172.16.0.1", "a private address (172.16.0.0/12)"),
    ("172.31.255.255", "a private address (172.16.0.0/12)"),
    ("192.168.1.1", "a private address (192.168.0.0/16)"),
    ("100.64.0.1", "a shared (CGNAT) address (100.64.0.0/10)"),
    ("100.127.255.255", "a shared (CGNAT) address (100.64.0.0/10)"),
    ("0.0.0.0", "the unspecified address (0.0.0.0/32)"),
    ("0.1.2.3", "a 'this network' address (0.0.0.0/8)"),
    ("224.0.0.1", "a multicast address (224.0.0.0/4)"),
    ("255.255.255.255", "the broadcast address (255.255.255.255/32)"),
    ("240.0.0.1", "a reserved address (240.0.0.0/4)"),
    ("::", "the unspecified address (::/128)"),
    ("::1", "a loopback address (::1/128)"),
    ("fe80::1", "a link-local address (fe80::/10)"),
    ("fe80::1%2", "a link-local address (fe80::/10)"),
    ("fc00::1", "a unique-local address (fc00::/7)"),
    ("fd12:3456::1", "a unique-local address (fc00::/7)"),
    ("ff02::1", "a multicast address (ff00::/8)"),
    ("::ffff:127.0.0.1", "an IPv4-mapped form of 127.0.0.1, a loopback address (127.0.0.0/8)"),
    ("::ffff:169.254.169.254", "an IPv4-mapped form of 169.254.169.254, a link-local address "
                               "(169.254.0.0/16), the cloud metadata endpoint"),
    ("::ffff:10.1.2.3", "an IPv4-mapped form of 10.1.2.3, a private address (10.0.0.0/8)"),
    ("::ffff:0.0.0.0", "an IPv4-mapped form of 0.0.0.0, the unspecified address (0.0.0.0/32)"),
    ("::127.0.0.1", "a deprecated IPv4-compatible address (::/96)"),
    ("64:ff9b::7f00:1", "a NAT64 form of 127.0.0.1, a loopback address (127.0.0.0/8)"),
    ("2002:a9fe:a9fe::1", "a 6to4 form of 169.254.169.254, a link-local address "
                          "(169.254.0.0/16), the cloud metadata endpoint"),
    ("2001:db8::1", "a documentation address (2001:db8::/32)"),
])
def test_blocked_addresses_name_their_rule(address: str, rule: str) -> None:
    assert classify(ip(address)) == rule


@pytest.mark.parametrize("address", [
    "8.8.8.8", "1.1.1.1", "93.184.216.34", "172.15.255.255", "172.32.0.0", "100.63.255.255",
    "100.128.0.0", "9.255.255.255", "11.0.0.0", "169.253.255.255", "223.255.255.255",
    "2001:4860:4860::8888", "2606:4700:4700::1111", "::ffff:8.8.8.8", "64:ff9b::808:808",
    "2002:808:808::1",
])
def test_public_addresses_pass(address: str) -> None:
    assert classify(ip(address)) is None


@given(st.integers(min_value=0, max_value=2**32 - 1))
def test_every_ipv4_address_follows_the_table(value: int) -> None:
    v4 = ipaddress.IPv4Address(value)
    expected_blocked = any(v4 in net for net in BLOCKED_V4)
    assert (classify(v4) is not None) == expected_blocked
    # Python's own registry view agrees wherever it has one
    if not v4.is_global or v4.is_multicast:
        assert classify(v4) is not None


@given(st.integers(min_value=0, max_value=2**32 - 1))
def test_ipv6_forms_of_an_ipv4_address_are_judged_by_it(value: int) -> None:
    v4 = ipaddress.IPv4Address(value)
    blocked = classify(v4) is not None
    mapped = ipaddress.IPv6Address(0xFFFF_0000_0000 | value)
    nat64 = ipaddress.IPv6Address((0x64FF9B << 96) | value)
    six_to_four = ipaddress.IPv6Address((0x2002 << 112) | (value << 80))
    for form in (mapped, nat64, six_to_four):
        assert (classify(form) is not None) == blocked, form
        if blocked:
            assert str(v4) in str(classify(form))


@given(st.integers(min_value=0, max_value=2**128 - 1))
def test_non_global_ipv6_is_always_blocked(value: int) -> None:
    v6 = ipaddress.IPv6Address(value)
    if v6.ipv4_mapped is None and (not v6.is_global or v6.is_multicast) and not any(
            v6 in ipaddress.IPv6Network(n) for n in ("64:ff9b::/96", "2002::/16")):
        assert classify(v6) is not None


def test_check_messages() -> None:
    with pytest.raises(Blocked, match=r"^Blocked by SSRF protection: 127\.0\.0\.1 is a loopback "
                                      r"address \(127\.0\.0\.0/8\)\. An administrator may allow "
                                      r"it: add it to the 'http_allowed_hosts' row"):
        check("127.0.0.1", ip("127.0.0.1"), AllowList())
    with pytest.raises(Blocked, match=r"localhost resolves to ::1, a loopback address"):
        check("LocalHost.", ip("::1"), AllowList())
    check("example.com", ip("93.184.216.34"), AllowList())


def test_allow_list_entries() -> None:
    allow = AllowList.parse(" 127.0.0.1, 10.0.0.0/8\n::1  *.corp.internal api.local. ")
    check("127.0.0.1", ip("127.0.0.1"), allow)
    check("x", ip("10.9.8.7"), allow)
    check("::1", ip("::1"), allow)
    check("::ffff:127.0.0.1", ip("::ffff:127.0.0.1"), allow)   # the mapped form of an entry
    check("a.b.corp.internal", ip("192.168.0.1"), allow)
    check("API.LOCAL", ip("172.16.0.5"), allow)
    with pytest.raises(Blocked):
        check("127.0.0.2", ip("127.0.0.2"), allow)
    with pytest.raises(Blocked):
        check("corp.internal", ip("192.168.0.1"), allow)     # *.x covers names below x only
    with pytest.raises(Blocked):
        check("169.254.169.254", ip("169.254.169.254"), allow)
    # a host name entry never lets an IP literal through
    with pytest.raises(Blocked):
        check("172.16.0.5", ip("172.16.0.5"), allow)
    assert AllowList.parse("") == AllowList() == AllowList.parse(None)


@pytest.mark.parametrize("entry", ["http://x", "10.0.0.0/33", "a b/c", "*.", "1.2.3"])
def test_malformed_allow_list_entries_are_refused(entry: str) -> None:
    with pytest.raises(ValueError, match="http_allowed_hosts"):
        AllowList.parse(entry)


# -- the HTTP step's pure parts --------------------------------------------------------------

def test_request_from_config_with_references() -> None:
    results = {"p": {"rows": [{"path": "/items", "id": 7, "tok": "s3cret"}], "row_count": 1}}
    config = {"url": "https://api.example.com$p.path/?id=$p.id", "method": "post",
              "body": '{"id": $p.id}', "headers": {"Authorization": "Bearer $p.tok", "X-N": 5},
              "timeout_seconds": 3}
    req = http_step.build_request("HTTP", config, results, idempotency_key="k-1")
    assert str(req.url) == "https://api.example.com/items/?id=7"
    assert req.method == "POST" and req.body == '{"id": 7}' and req.timeout == 3.0
    assert req.headers == [("Authorization", "Bearer s3cret"), ("X-N", "5"),
                           ("Idempotency-Key", "k-1"), ("User-Agent", http_step.USER_AGENT)]
    assert req.safe_url == "https://api.example.com/items/?…"


def test_a_node_may_set_its_own_idempotency_key() -> None:
    req = http_step.build_request("HTTP", {"url": "http://x.example", "headers": {
        "idempotency-key": "mine"}}, {}, idempotency_key="ours")
    assert [v for k, v in req.headers if k.lower() == "idempotency-key"] == ["mine"]


@pytest.mark.parametrize(("config", "error"), [
    ({"url": "ftp://x.example/"}, "Blocked: unsupported URL scheme 'ftp'"),
    ({"url": "file:///etc/passwd"}, "Blocked: unsupported URL scheme 'file'"),
    ({"url": "http://x.example", "method": "TRACE"}, "Unsupported HTTP method: TRACE"),
    ({"url": "http://x.example", "timeout_seconds": 0}, "timeout_seconds must be a positive"),
    ({"url": "http://x.example", "headers": {"X": "a\r\nB: c"}}, "line breaks"),
    ({"url": "http://x.example/$r.missing"}, "result has no field 'missing'"),
])
def test_bad_configs_fail(config: dict[str, object], error: str) -> None:
    results = {"r": {"status": 200, "body": "x"}}
    with pytest.raises(StepError, match=error.replace("(", r"\(").replace("$", r"\$")):
        http_step.build_request("HTTP", config, results, idempotency_key="k")


def test_multipart_parts() -> None:
    data = bytes(range(200))
    wrapped = "\n".join(base64.b64encode(data).decode()[i:i + 76] for i in range(0, 268, 76))
    results = {"f": {"status": 200, "body": base64.b64encode(b"\x00\x01").decode(),
                     "encoding": "base64"}}
    parts = [{"name": "a", "data_b64": wrapped, "filename": "a.bin",
              "content_type": "application/octet-stream"},
             {"name": "b", "data_b64": " $f.body\n"}]
    req = http_step.build_request("HTTP_MULTIPART", {"url": "http://x.example", "parts": parts,
                                                     "headers": {"Content-Type": "text/plain"}},
                                  results, idempotency_key="k")
    assert req.files == [("a", ("a.bin", data, "application/octet-stream")),
                         ("b", (None, b"\x00\x01", None))]
    assert all(k.lower() != "content-type" for k, _ in req.headers)
    with pytest.raises(StepError, match="whole-value reference"):
        http_step.build_request("HTTP_MULTIPART", {"url": "http://x.example", "parts": [
            {"name": "b", "data_b64": "AAAA$f.body"}]}, results, idempotency_key="k")
    with pytest.raises(StepError, match="Invalid base64 in part 'c'"):
        http_step.build_request("HTTP_MULTIPART", {"url": "http://x.example", "parts": [
            {"name": "c", "data_b64": "not base64!"}]}, results, idempotency_key="k")


@pytest.mark.parametrize(("content_type", "data", "body", "encoding"), [
    (None, b"plain", "plain", "text"),
    ("text/plain; charset=iso-8859-1", b"caf\xe9", "caf\u00e9", "text"),
    ("application/json", b"\xef\xbb\xbf{}", "{}", "text"),
    ("application/vnd.api+json", b"{}", "{}", "text"),
    ("image/svg+xml", b"<svg/>", "<svg/>", "text"),
    ("application/octet-stream", b"abc", "YWJj", "base64"),
    ("image/png", b"\x89PNG", "iVBORw==", "base64"),
    ("text/plain", b"a\x00b", "YQBi", "base64"),         # PostgreSQL text cannot hold NUL
    ("text/plain", b"\xff\xfe\xfd", "//79", "base64"),  # not UTF-8
])
def test_body_decoding(content_type: str | None, data: bytes, body: str, encoding: str) -> None:
    assert http_step.decode_body(data, content_type) == (body, encoding)


def test_envelope_shape() -> None:
    env = http_step.envelope(404, "nope", "text", {"content-type": "text/plain"}, 12)
    assert list(env) == ["status", "body", "encoding", "headers", "ok", "duration_ms"]
    assert env["ok"] is False
    assert http_step.envelope(204, "", "text", {}, 1)["ok"] is True
