"""SSRF rules for HTTP steps: which addresses a step may reach, and the operator's allow-list.

Pure: ``ipaddress`` only, no sockets, no DNS. ``steps/http.py`` resolves a host name once,
asks `check` about every address of the answer and then connects to one of those very
addresses, so what is checked is what is reached (no DNS rebinding window).

Blocked unless allowed (SPEC §9 [differs]): every address that is not publicly routable —
unspecified, "this network", loopback, private (RFC 1918), shared/CGNAT, link-local (which holds
the cloud metadata endpoint 169.254.169.254), IETF protocol, documentation and benchmarking
ranges, 6to4 relay anycast, multicast, broadcast and the reserved 240/4; for IPv6 the
unspecified and loopback addresses, unique-local fc00::/7, link-local fe80::/10, site-local
fec0::/10, multicast, discard-only, documentation and IETF protocol ranges and the deprecated
IPv4-compatible ::/96. IPv6 forms that carry an IPv4 address (IPv4-mapped ``::ffff:a.b.c.d``,
NAT64 ``64:ff9b::/96`` and 6to4 ``2002::/16``) are judged by the IPv4 address they carry.

The allow-list is the ``http_allowed_hosts`` row of ``df.settings``: entries separated by
commas or white space, each an IP address (``127.0.0.1``, ``::1``), a network in CIDR form
(``10.0.0.0/8``), a host name (``api.internal``, matched exactly) or a domain wildcard
(``*.internal``, any name below it). A blocked address passes when it lies in an allowed network,
or when the URL's host name is allowed (the operator then trusts whatever that name resolves
to). Public addresses need no entry.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass, field

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

SETTING = "http_allowed_hosts"
HINT = (f"An administrator may allow it: add it to the '{SETTING}' row of df.settings.")

_V4 = ipaddress.IPv4Network
_V6 = ipaddress.IPv6Network


def _rule4(cidr: str, what: str) -> tuple[ipaddress.IPv4Network, str]:
    return _V4(cidr), f"{what} ({cidr})"


def _rule6(cidr: str, what: str) -> tuple[ipaddress.IPv6Network, str]:
    return _V6(cidr), f"{what} ({cidr})"


# Most specific first: the first network that holds an address names the rule.
_V4_RULES: tuple[tuple[ipaddress.IPv4Network, str], ...] = (
    _rule4("0.0.0.0/32", "the unspecified address"),
    _rule4("0.0.0.0/8", "a 'this network' address"),
    _rule4("10.0.0.0/8", "a private address"),
    _rule4("100.64.0.0/10", "a shared (CGNAT) address"),
    _rule4("127.0.0.0/8", "a loopback address"),
    (_V4("169.254.169.254/32"),
     "a link-local address (169.254.0.0/16), the cloud metadata endpoint"),
    _rule4("169.254.0.0/16", "a link-local address"),
    _rule4("172.16.0.0/12", "a private address"),
    _rule4("192.0.0.0/24", "an IETF protocol assignment address"),
    _rule4("192.0.2.0/24", "a documentation address"),
    _rule4("192.88.99.0/24", "a 6to4 relay anycast address"),
    _rule4("192.168.0.0/16", "a private address"),
    _rule4("198.18.0.0/15", "a benchmarking address"),
    _rule4("198.51.100.0/24", "a documentation address"),
    _rule4("203.0.113.0/24", "a documentation address"),
    _rule4("224.0.0.0/4", "a multicast address"),
    _rule4("255.255.255.255/32", "the broadcast address"),
    _rule4("240.0.0.0/4", "a reserved address"),
)

_V6_RULES: tuple[tuple[ipaddress.IPv6Network, str], ...] = (
    _rule6("::/128", "the unspecified address"),
    _rule6("::1/128", "a loopback address"),
    _rule6("::/96", "a deprecated IPv4-compatible address"),
    _rule6("64:ff9b:1::/48", "a local-use NAT64 address"),
    _rule6("100::/64", "a discard-only address"),
    _rule6("2001:db8::/32", "a documentation address"),
    _rule6("2001::/23", "an IETF protocol assignment address"),
    _rule6("3fff::/20", "a documentation address"),
    _rule6("fc00::/7", "a unique-local address"),
    _rule6("fe80::/10", "a link-local address"),
    _rule6("fec0::/10", "a site-local address"),
    _rule6("ff00::/8", "a multicast address"),
)

_NAT64 = _V6("64:ff9b::/96")
_SIX_TO_FOUR = _V6("2002::/16")
_HOST_RE = re.compile(r"[a-z0-9_]([a-z0-9_-]*[a-z0-9_])?(\.[a-z0-9_]([a-z0-9_-]*[a-z0-9_])?)*")


def embedded_ipv4(ip: IPAddress) -> ipaddress.IPv4Address | None:
    """The IPv4 address an IPv6 address carries (IPv4-mapped, NAT64, 6to4), else None."""
    if isinstance(ip, ipaddress.IPv4Address):
        return None
    if ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    if ip in _NAT64:
        return ipaddress.IPv4Address(int(ip) & 0xFFFF_FFFF)
    if ip in _SIX_TO_FOUR:
        return ip.sixtofour
    return None


def classify(ip: IPAddress) -> str | None:
    """Why `ip` is blocked by default, e.g. "a loopback address (127.0.0.0/8)"; None if public."""
    if isinstance(ip, ipaddress.IPv6Address) and ip.scope_id:
        ip = ipaddress.IPv6Address(int(ip))
    carried = embedded_ipv4(ip)
    if carried is not None:
        reason = classify(carried)
        if reason is None:
            return None
        assert isinstance(ip, ipaddress.IPv6Address)
        form = "an IPv4-mapped" if ip.ipv4_mapped is not None else (
            "a NAT64" if ip in _NAT64 else "a 6to4")
        return f"{form} form of {carried}, {reason}"
    rules: tuple[tuple[IPNetwork, str], ...] = (
        _V4_RULES if isinstance(ip, ipaddress.IPv4Address) else _V6_RULES)
    for network, reason in rules:
        if ip in network:
            return reason
    if not ip.is_global:          # a range registered after the tables above were written
        return "a non-public address (not globally routable)"
    return None


def parse_address(host: str) -> IPAddress | None:
    """`host` as an IP address (brackets and an IPv6 zone allowed), or None for a name."""
    text = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        return None


def normalize_host(host: str) -> str:
    """A host name as the allow-list compares it: lower case, no trailing dot."""
    return host.strip().lower().rstrip(".")


@dataclass(frozen=True)
class AllowList:
    """The operator's exceptions to the SSRF rules (the ``http_allowed_hosts`` setting)."""

    networks: tuple[IPNetwork, ...] = ()
    hosts: frozenset[str] = frozenset()
    domains: tuple[str, ...] = field(default=())   # "*.internal" is kept as ".internal"

    @classmethod
    def parse(cls, text: str | None) -> AllowList:
        """Parse the setting's text; raise ValueError naming a malformed entry."""
        networks: list[IPNetwork] = []
        hosts: set[str] = set()
        domains: list[str] = []
        for raw in re.split(r"[\s,]+", text or ""):
            entry = raw.strip()
            if not entry:
                continue
            try:
                address = parse_address(entry)
                networks.append(ipaddress.ip_network(address if address is not None else entry,
                                                     strict=False))
                continue
            except ValueError:
                pass
            name = normalize_host(entry)
            if name.startswith("*.") and _HOST_RE.fullmatch(name[2:]):
                domains.append(name[1:])
            elif _HOST_RE.fullmatch(name) and not name.replace(".", "").isdigit():
                hosts.add(name)
            else:
                raise ValueError(
                    f"invalid entry {entry!r} in the '{SETTING}' setting: expected an IP "
                    "address, a CIDR network, a host name or *.domain")
        return cls(tuple(networks), frozenset(hosts), tuple(domains))

    def allows_host(self, host: str) -> bool:
        name = normalize_host(host)
        return name in self.hosts or any(name.endswith(d) for d in self.domains)

    def allows_address(self, ip: IPAddress) -> bool:
        candidates: list[IPAddress] = [ip]
        carried = embedded_ipv4(ip)
        if carried is not None:
            candidates.append(carried)
        return any(c.version == n.version and c in n
                   for c in candidates for n in self.networks)


class Blocked(Exception):
    """A request was refused by the SSRF rules; the message names the rule."""


def check(host: str, ip: IPAddress, allow: AllowList) -> None:
    """Raise Blocked unless `ip` (which `host` resolved to, or is) may be reached.

    Args:
        host: the URL's host, a name or an IP literal.
        ip: one address to be connected to.
        allow: the operator's allow-list.
    """
    reason = classify(ip)
    if reason is None or allow.allows_address(ip) or (
            parse_address(host) is None and allow.allows_host(host)):
        return
    if parse_address(host) is not None:
        raise Blocked(f"Blocked by SSRF protection: {ip} is {reason}. {HINT}")
    raise Blocked(f"Blocked by SSRF protection: {normalize_host(host)} resolves to {ip}, "
                  f"{reason}. {HINT}")
