"""The DSL of SPEC §1 (sql/migrations/0002_dsl.sql): graph JSON byte for byte, operator
precedence, call-time checks, helper results, speed, and the docs' examples."""

from __future__ import annotations

import json
import re
import time
from typing import Any

import psycopg
import pytest
from croniter import croniter
from psycopg import sql
from psycopg.conninfo import make_conninfo

from durable_actor import schema
from tests.conftest import Server

Conn = psycopg.Connection[Any]


def one(conn: Conn, query: str, params: tuple[Any, ...] = ()) -> Any:
    row = conn.execute(query, params).fetchone()  # type: ignore[arg-type]
    assert row is not None
    return row[0]


def graph(conn: Conn, expr: str) -> str:
    """The text an expression returns, as built by the server."""
    return str(one(conn, f"SELECT ({expr})::text"))


def dumps(value: Any) -> str:
    """Compact JSON with keys in insertion order: the format pg_durable's serde_json writes."""
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)


def SQL(query: str, name: str | None = None) -> dict[str, Any]:
    node: dict[str, Any] = {"node_type": "SQL", "query": query}
    if name is not None:
        node["result_name"] = name
    return node


def node(node_type: str, **fields: Any) -> dict[str, Any]:
    """A node with its keys in the canonical order, whatever order they are passed in."""
    order = ["left_node", "right_node", "condition_node", "extra_nodes", "query", "result_name"]
    out: dict[str, Any] = {"node_type": node_type}
    for key in order:
        if fields.get(key) is not None:
            out[key] = fields[key]
    return out


A, B, C, D = SQL("SELECT 1"), SQL("SELECT 2"), SQL("SELECT 3"), SQL("SELECT 4")

# (DSL expression, the node it must produce). Every builder and operator of SPEC §1.
CASES: list[tuple[str, dict[str, Any]]] = [
    ("df.sql('SELECT 1')", A),
    ("'SELECT 1' ~> 'SELECT 2'", node("THEN", left_node=A, right_node=B)),
    ("df.seq('SELECT 1', 'SELECT 2')", node("THEN", left_node=A, right_node=B)),
    ("df.seq(a => 'SELECT 1', b => 'SELECT 2')", node("THEN", left_node=A, right_node=B)),
    ("'SELECT 1' |=> 'one'", SQL("SELECT 1", "one")),
    ("df.as('SELECT 1', 'one')", SQL("SELECT 1", "one")),
    ("df.as(fut => 'SELECT 1', name => 'one')", SQL("SELECT 1", "one")),
    ("df.sql('SELECT 1') |=> 'a' |=> 'b'", SQL("SELECT 1", "b")),
    ("'SELECT 1' & 'SELECT 2'", node("JOIN", left_node=A, right_node=B)),
    ("df.join('SELECT 1', 'SELECT 2')", node("JOIN", left_node=A, right_node=B)),
    ("df.join3('SELECT 1', 'SELECT 2', 'SELECT 3')",
     node("JOIN", left_node=A, right_node=B, extra_nodes=[C])),
    ("df.join('SELECT 1', 'SELECT 2', 'SELECT 3', 'SELECT 4')",
     node("JOIN", left_node=A, right_node=B, extra_nodes=[C, D])),
    ("df.join(VARIADIC ARRAY['SELECT 1'])", node("JOIN", left_node=A)),
    ("'SELECT 1' | 'SELECT 2'", node("RACE", left_node=A, right_node=B)),
    ("df.race('SELECT 1', 'SELECT 2')", node("RACE", left_node=A, right_node=B)),
    ("df.race('SELECT 1', 'SELECT 2', 'SELECT 3')",
     node("RACE", left_node=A, right_node=B, extra_nodes=[C])),
    ("df.if('SELECT 1', 'SELECT 2', 'SELECT 3')",
     node("IF", left_node=B, right_node=C, condition_node=A)),
    ("'SELECT 1' ?> 'SELECT 2' !> 'SELECT 3'",
     node("IF", left_node=B, right_node=C, condition_node=A)),
    ("df.if(condition => 'SELECT 1', then_branch => 'SELECT 2', else_branch => 'SELECT 3')",
     node("IF", left_node=B, right_node=C, condition_node=A)),
    ("df.if_rows('r', 'SELECT 2', 'SELECT 3')",
     node("IF", left_node=B, right_node=C,
          query=dumps({"condition_type": "result_has_rows", "result_name": "r"}))),
    ("df.loop('SELECT 1')", node("LOOP", left_node=A)),
    ("@> 'SELECT 1'", node("LOOP", left_node=A)),
    ("df.loop('SELECT 1', 'SELECT 2')", node("LOOP", left_node=A, condition_node=B)),
    ("df.break()", node("BREAK", query=dumps({"break_value": None}))),
    ("df.break('done')", node("BREAK", query=dumps({"break_value": "done"}))),
    ("df.break('{\"status\": \"complete\"}')",
     node("BREAK", query=dumps({"break_value": '{"status": "complete"}'}))),
    ("df.sleep(60)", node("SLEEP", query="60")),
    ("df.sleep(0)", node("SLEEP", query="0")),
    ("df.wait_for_schedule('0 9 * * MON-FRI')",
     node("WAIT_SCHEDULE", query=dumps({"cron_expr": "0 9 * * MON-FRI"}))),
    ("df.wait_for_signal('approve')",
     node("SIGNAL", query=dumps({"signal_name": "approve", "timeout_seconds": None}))),
    ("df.wait_for_signal('approve', 60)",
     node("SIGNAL", query=dumps({"signal_name": "approve", "timeout_seconds": 60}))),
    ("df.http('https://example.com/hook')",
     node("HTTP", query=dumps({"url": "https://example.com/hook", "method": "POST", "body": None,
                               "headers": None, "timeout_seconds": 30}))),
    ("df.http('https://example.com/x', 'get', '{\"a\": 1}',"
     " '{\"X-Token\": \"t\", \"Accept\": [\"a\", \"b\"]}', 5)",
     node("HTTP", query=dumps({"url": "https://example.com/x", "method": "GET",
                               "body": '{"a": 1}',
                               "headers": {"Accept": ["a", "b"], "X-Token": "t"},
                               "timeout_seconds": 5}))),
    ("df.http('{base_url}/x', method => 'delete')",
     node("HTTP", query=dumps({"url": "{base_url}/x", "method": "DELETE", "body": None,
                               "headers": None, "timeout_seconds": 30}))),
    ("df.http_multipart('https://example.com/up', parts =>"
     " '[{\"name\": \"f\", \"data_b64\": \"aGk=\", \"filename\": \"a.txt\"}]')",
     node("HTTP_MULTIPART", query=dumps({
         "url": "https://example.com/up", "method": "POST",
         "parts": [{"name": "f", "data_b64": "aGk=", "filename": "a.txt"}],
         "headers": None, "timeout_seconds": 30}))),
    # Children are embedded as objects whatever built them.
    ("df.if(df.sql('SELECT 1') |=> 'c', df.sleep(1) ~> 'SELECT 2', df.break())",
     node("IF", left_node=node("THEN", left_node=node("SLEEP", query="1"), right_node=B),
          right_node=node("BREAK", query=dumps({"break_value": None})),
          condition_node=SQL("SELECT 1", "c"))),
    # Text that is not a node is SQL: JSON without node_type, an unknown node_type, arrays.
    ("'{\"a\": 1}' ~> 'SELECT 2'", node("THEN", left_node=SQL('{"a": 1}'), right_node=B)),
    ("'{\"node_type\":\"NOT_A_NODE\"}' ~> 'SELECT 2'",
     node("THEN", left_node=SQL('{"node_type":"NOT_A_NODE"}'), right_node=B)),
    ("'[1, 2]' ~> 'SELECT 2'", node("THEN", left_node=SQL("[1, 2]"), right_node=B)),
    ("'{\"node_type\": 5}' ~> 'SELECT 2'",
     node("THEN", left_node=SQL('{"node_type": 5}'), right_node=B)),
    # df.sql is literal: even a node's JSON becomes the query text.
    ("df.sql(df.sql('SELECT 1'))", SQL(dumps(A))),
]


@pytest.mark.parametrize(("expr", "expected"), CASES, ids=[c[0][:60] for c in CASES])
def test_builder_json_is_byte_exact(conn: Conn, expr: str, expected: dict[str, Any]) -> None:
    text = graph(conn, expr)
    assert text == dumps(expected)
    assert graph(conn, expr) == text  # the same expression gives the same bytes


def test_strings_are_escaped_as_serde_json_does(conn: Conn) -> None:
    query = "SELECT 'a\"b' AS \"q\", E'\\\\' -- é ☃\n\t\x01\x7f"
    text = graph(conn, f"df.sql({sql.quote(query)})")
    assert text == dumps(SQL(query))
    assert json.loads(text)["query"] == query


def test_children_are_embedded_not_re_escaped(conn: Conn) -> None:
    text = graph(conn, "('SELECT 1' ~> 'SELECT 2') & ('SELECT 3' | df.sleep(5))")
    parsed = json.loads(text)
    assert isinstance(parsed["left_node"], dict)
    assert isinstance(parsed["right_node"]["right_node"], dict)
    assert "\\\"" not in text


def test_hand_built_nodes_are_canonicalised(conn: Conn) -> None:
    hand = ("jsonb_build_object('node_type', 'THEN', 'extra', 1,"
            " 'left_node', jsonb_build_object('query', 'SELECT 1', 'node_type', 'SQL'),"
            " 'right_node', jsonb_build_object('node_type', 'SQL', 'query', 'SELECT 2',"
            "                                   'result_name', 'two'))::text")
    assert " " in graph(conn, hand)  # jsonb's own text has spaces and other key order
    assert graph(conn, f"{hand} ~> 'SELECT 3'") == dumps(node(
        "THEN", left_node=node("THEN", left_node=A, right_node=SQL("SELECT 2", "two")),
        right_node=C))
    assert graph(conn, f"df.as({hand}, 'x')") == dumps(node(
        "THEN", left_node=A, right_node=SQL("SELECT 2", "two"), result_name="x"))
    spaced = '  {"query": "SELECT 1", "node_type": "SQL"}'
    assert graph(conn, f"{sql.quote(spaced)} ~> 'SELECT 2'") == dumps(
        node("THEN", left_node=A, right_node=B))


def test_embedding_canonical_text_changes_nothing(conn: Conn) -> None:
    g = graph(conn, "df.if('SELECT 1', 'SELECT 2' & df.sleep(3), df.break('x')) |=> 'i'")
    assert graph(conn, f"df.seq({sql.quote(g)}, 'SELECT 9')") == (
        '{"node_type":"THEN","left_node":' + g + ',"right_node":' + dumps(SQL("SELECT 9")) + "}")


def test_a_large_graph_is_embedded_as_it_is(conn: Conn) -> None:
    big = graph(conn, "df.join(VARIADIC ARRAY(SELECT 'SELECT ' || g"
                      " FROM generate_series(1, 100) g))")
    assert len(big) > 1024
    assert graph(conn, f"{sql.quote(big)} ~> 'SELECT 1'") == (
        '{"node_type":"THEN","left_node":' + big + ',"right_node":' + dumps(A) + "}")
    named = graph(conn, f"({sql.quote(big)} |=> 'a') |=> 'b'")
    assert named == big[:-1] + ',"result_name":"b"}'
    assert json.loads(named)["result_name"] == "b"


def known_nodes(conn: Conn) -> list[str]:
    """The canonical texts this session's composers embed as they are (0021), newest first."""
    text = one(conn, "SELECT coalesce(current_setting('df.known_nodes', true), '')")
    return [t for t in text.split("\x01") if t]


def test_a_node_text_canonicalised_once_is_embedded_as_it_is(conn: Conn) -> None:
    inner = graph(conn, "'SELECT 1' ~> 'SELECT 2'")
    assert known_nodes(conn) == []              # our own output is not parsed to be made
    expected = dumps(node("THEN", left_node=node("THEN", left_node=A, right_node=B),
                          right_node=C))
    assert graph(conn, "'SELECT 1' ~> 'SELECT 2' ~> 'SELECT 3'") == expected
    assert known_nodes(conn) == [inner]         # canonicalised once, then known
    assert graph(conn, "'SELECT 1' ~> 'SELECT 2' ~> 'SELECT 3'") == expected
    assert known_nodes(conn) == [inner]
    # The same node written otherwise is still parsed, and comes out canonical.
    spaced = json.dumps(json.loads(inner), indent=1)
    assert graph(conn, f"{sql.quote(spaced)} ~> 'SELECT 3'") == expected
    with pytest.raises(psycopg.errors.InvalidParameterValue, match="Invalid Durofut JSON"):
        graph(conn, "'{\"node_type\":\"THEN\",\"left_node\":1}' ~> 'SELECT 3'")


def test_known_nodes_stay_bounded(conn: Conn) -> None:
    for i in range(300):
        graph(conn, f"('SELECT {i}' ~> 'SELECT 2') ~> 'SELECT 3'")
    known = known_nodes(conn)
    assert 10 < len(known) < 300
    assert known[0] == dumps(node("THEN", left_node=SQL("SELECT 299"), right_node=B))
    assert len("\x01".join(known).encode()) < 8192 + 1024


def test_a_forged_known_node_gets_no_further_than_df_start(conn: Conn) -> None:
    # Any role may set df.known_nodes: the composers then embed the forged text as it is,
    # and df.start, which validates every graph, refuses it before anything is written.
    forged = '{"node_type":"SQL","query":1}'
    conn.execute("SELECT set_config('df.known_nodes', %s, false)", (forged + "\x01",))
    text = graph(conn, f"{sql.quote(forged)} ~> 'SELECT 2'")
    assert text == '{"node_type":"THEN","left_node":' + forged + ',"right_node":' + dumps(B) + "}"
    before = one(conn, "SELECT count(*) FROM df.instances")
    with pytest.raises(psycopg.Error, match="query must be a string"):
        conn.execute("SELECT df.start(%s)", (text,))
    assert one(conn, "SELECT count(*) FROM df.instances") == before
    # Text that is not a node's is never taken for a known one.
    conn.execute("SELECT set_config('df.known_nodes', %s, false)", ("SELECT 9\x01",))
    assert json.loads(graph(conn, "'SELECT 9' ~> 'SELECT 2'"))["left_node"] == SQL("SELECT 9")
    conn.execute("SELECT set_config('df.known_nodes', %s, false)",
                 (dumps(A) + "\x01" + dumps(B) + "\x01",))
    two = dumps(A) + "\x01" + dumps(B)           # two known texts, as they sit there
    assert json.loads(graph(conn, f"{sql.quote(two)} ~> 'SELECT 2'"))["left_node"] == SQL(two)


def test_result_name_replaces_only_the_outer_name(conn: Conn) -> None:
    inner = "('SELECT 1' ~> ('SELECT 2' |=> 'inner'))"
    text = graph(conn, f"{inner} |=> 'outer'")
    assert json.loads(text)["result_name"] == "outer"
    assert json.loads(text)["right_node"]["result_name"] == "inner"
    big = "df.seq(df.join(VARIADIC ARRAY(SELECT 'SELECT ' || g FROM generate_series(1, 200) g)),"
    big += " 'SELECT 1' |=> 'inner')"
    text = graph(conn, f"{big} |=> 'outer'")
    parsed = json.loads(text)
    assert parsed["result_name"] == "outer"
    assert parsed["right_node"]["result_name"] == "inner"


# --- Precedence: PostgreSQL gives all these operators one precedence, left-associative.

PRECEDENCE: list[tuple[str, str]] = [
    ("'SELECT 1' ~> 'SELECT 2' & 'SELECT 3'", "('SELECT 1' ~> 'SELECT 2') & 'SELECT 3'"),
    ("'SELECT 1' & 'SELECT 2' ~> 'SELECT 3'", "('SELECT 1' & 'SELECT 2') ~> 'SELECT 3'"),
    ("'SELECT 1' ~> 'SELECT 2' |=> 'n'", "df.as(df.seq('SELECT 1', 'SELECT 2'), 'n')"),
    ("@> 'SELECT 1' ~> 'SELECT 2'", "(@> 'SELECT 1') ~> 'SELECT 2'"),
    ("'SELECT 1' & 'SELECT 2' & 'SELECT 3'",
     "df.join(df.join('SELECT 1', 'SELECT 2'), 'SELECT 3')"),
    ("'SELECT 1' | 'SELECT 2' ~> 'SELECT 3'", "('SELECT 1' | 'SELECT 2') ~> 'SELECT 3'"),
    ("'SELECT 1' ?> 'SELECT 2' !> 'SELECT 3' ~> 'SELECT 4'",
     "df.if('SELECT 1', 'SELECT 2', 'SELECT 3') ~> 'SELECT 4'"),
    ("'SELECT 1' ?> ('SELECT 2' ~> 'SELECT 4') !> 'SELECT 3'",
     "df.if('SELECT 1', 'SELECT 2' ~> 'SELECT 4', 'SELECT 3')"),
]


@pytest.mark.parametrize(("expr", "same_as"), PRECEDENCE, ids=[p[0] for p in PRECEDENCE])
def test_mixed_operators_parse_left_to_right(conn: Conn, expr: str, same_as: str) -> None:
    assert graph(conn, expr) == graph(conn, same_as)


def test_precedence_pins(conn: Conn) -> None:
    assert json.loads(graph(conn, "'a' ~> 'b' & 'c'"))["node_type"] == "JOIN"
    assert graph(conn, "'a' ~> 'b' & 'c'") != graph(conn, "'a' ~> ('b' & 'c')")
    named = json.loads(graph(conn, "'a' ~> 'b' |=> 'n'"))
    assert (named["node_type"], named["result_name"]) == ("THEN", "n")
    assert "result_name" not in named["right_node"]
    looped = json.loads(graph(conn, "@> 'a' ~> 'b'"))
    assert (looped["node_type"], looped["left_node"]["node_type"]) == ("THEN", "LOOP")


def test_else_needs_a_partial_if(conn: Conn) -> None:
    for expr in ["'SELECT 1' ?> 'SELECT 2' ~> 'SELECT 4' !> 'SELECT 3'", "'SELECT 1' !> 'x'",
                 "('SELECT 1' ?> 'SELECT 2' |=> 'n') !> 'x'", "'{\"a\":1}' !> 'x'"]:
        with pytest.raises(psycopg.errors.InvalidParameterValue,
                           match="left side of !> must be a \\?> expression"):
            graph(conn, expr)


def test_partial_if_keeps_its_operands_as_text(conn: Conn) -> None:
    partial = json.loads(graph(conn, "'SELECT 1' ?> df.sleep(2)"))
    assert partial == {"_partial_if": True, "condition": "SELECT 1",
                       "then_branch": dumps(node("SLEEP", query="2"))}
    older = '{"condition": {"node_type": "SQL", "query": "SELECT 1"}, "_partial_if": true,' \
            ' "then_branch": {"node_type": "SQL", "query": "SELECT 2"}}'
    assert graph(conn, f"{sql.quote(older)} !> 'SELECT 3'") == dumps(
        node("IF", left_node=B, right_node=C, condition_node=A))


# --- VARIADIC join/race ([beyond]).

def test_variadic_join_fans_out_over_rows(conn: Conn) -> None:
    text = graph(conn, "df.join(VARIADIC ARRAY(SELECT 'SELECT ' || g FROM generate_series(1, 5) g"
                       " ORDER BY g))")
    assert text == dumps(node("JOIN", left_node=A, right_node=B,
                              extra_nodes=[C, D, SQL("SELECT 5")]))
    assert graph(conn, "df.join('a', 'b', 'c')") == graph(conn, "df.join3('a', 'b', 'c')")
    race = json.loads(graph(conn, "df.race(VARIADIC ARRAY['a', 'b', 'c', 'd'])"))
    assert [race["left_node"]["query"], race["right_node"]["query"]] == ["a", "b"]
    assert [n["query"] for n in race["extra_nodes"]] == ["c", "d"]


def test_two_argument_calls_resolve_to_the_two_argument_functions(conn: Conn) -> None:
    for fn in ("join", "race"):
        assert graph(conn, f"df.{fn}('a', 'b')") == graph(conn, f"df.{fn}('a'::text, 'b'::text)")
        plan = one(conn, f"EXPLAIN (VERBOSE, FORMAT JSON) SELECT df.{fn}('a'::text, 'b'::text)")
        assert "_parallel" not in json.dumps(plan)  # the VARIADIC form goes through _parallel
    assert one(conn, "SELECT count(*) FROM pg_proc WHERE oid IN"
                     " ('df.join(text,text)'::regprocedure, 'df.join(text[])'::regprocedure,"
                     "  'df.race(text,text)'::regprocedure, 'df.race(text[])'::regprocedure)") == 4


def test_variadic_edge_cases(conn: Conn) -> None:
    with pytest.raises(psycopg.errors.InvalidParameterValue, match="needs at least one branch"):
        graph(conn, "df.join(VARIADIC '{}'::text[])")
    with pytest.raises(psycopg.errors.InvalidParameterValue, match="needs at least one branch"):
        graph(conn, "df.race(VARIADIC ARRAY(SELECT 'x' WHERE false))")
    assert one(conn, "SELECT df.join('a', NULL, 'c')") is None
    assert one(conn, "SELECT df.join(NULL::text, 'b')") is None


def test_null_arguments_give_null(conn: Conn) -> None:
    for expr in ["df.sql(NULL)", "df.seq('a', NULL)", "NULL::text ~> 'a'", "df.as('a', NULL)",
                 "df.sleep(NULL)", "df.loop(NULL)", "df.if('a', NULL, 'b')",
                 "df.wait_for_signal(NULL)", "df.http(NULL)", "df.wait_for_schedule(NULL)"]:
        assert one(conn, f"SELECT {expr}") is None, expr
    assert graph(conn, "df.loop('SELECT 1', NULL)") == dumps(node("LOOP", left_node=A))
    assert graph(conn, "df.break(NULL)") == graph(conn, "df.break()")


# --- Call-time checks (SPEC §1, §6).

CALL_ERRORS: list[tuple[str, str]] = [
    ("df.as(df.sql('SELECT 1'), '')", "df.as: result name cannot be empty"),
    ("'SELECT 1' |=> 'has space'", "result name 'has space' is not a valid identifier"),
    ("'SELECT 1' |=> '123abc'", "not a valid identifier"),
    ("df.as(df.sql('SELECT 1'), 'x) UNION SELECT version()--')", "not a valid identifier"),
    ("df.sleep(-1)", "Sleep duration must be non-negative"),
    ("df.wait_for_signal('')", "Signal name cannot be empty"),
    ("df.wait_for_signal('s', 0)", "Timeout must be positive"),
    ("df.wait_for_signal('s', -5)", "Timeout must be positive"),
    ("df.http('ftp://example.com/x')", "unsupported URL scheme"),
    ("df.http('example.com/x')", "unsupported URL scheme"),
    ("df.http('file:///etc/passwd', 'GET')", "unsupported URL scheme"),
    ("df.http('https://example.com', 'TRACE')",
     "Invalid HTTP method: TRACE. Must be GET, POST, PUT, DELETE, or PATCH"),
    ("df.http('https://example.com', 'GET', timeout_seconds => 0)", "Timeout must be positive"),
    ("df.http_multipart('https://example.com', 'GET', '[{\"name\":\"f\",\"data_b64\":\"\"}]')",
     "Invalid HTTP method for multipart: GET. Must be POST, PUT, or PATCH"),
    ("df.http_multipart('gopher://x', parts => '[{\"name\":\"f\",\"data_b64\":\"\"}]')",
     "unsupported URL scheme"),
    ("df.http_multipart('https://example.com')", "parts is required and cannot be NULL"),
    ("df.http_multipart('https://example.com', parts => '{}')",
     "parts must be a JSON array of part objects"),
    ("df.http_multipart('https://example.com', parts => '[]')",
     "parts must contain at least one part"),
    ("df.http_multipart('https://example.com', parts => '[1]')", "parts[0] must be a JSON object"),
    ("df.http_multipart('https://example.com', parts => '[{\"name\":\"a\",\"data_b64\":\"\"},"
     " {\"data_b64\":\"aGk=\"}]')", "parts[1].name must be a non-empty string"),
    ("df.http_multipart('https://example.com', parts => '[{\"name\":\"f\"}]')",
     "parts[0].data_b64 must be a string"),
    ("df.http_multipart('https://example.com', parts =>"
     " '[{\"name\":\"f\",\"data_b64\":\"\",\"filename\":5}]')",
     "parts[0].filename must be a string"),
    ("df.http_multipart('https://example.com', 'PUT', timeout_seconds => -1,"
     " parts => '[{\"name\":\"f\",\"data_b64\":\"\"}]')", "Timeout must be positive"),
    # A node_type object whose shape does not parse, at any depth.
    ("'{\"node_type\":\"THEN\",\"left_node\":123}' ~> 'SELECT 1'", "Invalid Durofut JSON"),
    ("jsonb_build_object('node_type', 'SQL', 'query', 5)::text ~> 'SELECT 1'",
     "Invalid Durofut JSON"),
    ("'{\"node_type\":\"IF\",\"condition_node\":\"SELECT 1\"}' & 'x'",
     "condition_node must be a Durofut JSON object"),
    ("'{\"node_type\":\"JOIN\",\"extra_nodes\":{}}' | 'x'", "Invalid Durofut JSON"),
    ("'{\"node_type\":\"JOIN\",\"extra_nodes\":[\"SELECT 1\"]}' | 'x'",
     "extra_nodes entries must be Durofut JSON objects"),
    ("'{\"node_type\":\"JOIN\",\"extra_nodes\":[[{\"node_type\":\"SQL\",\"query\":\"x\"}]]}' | 'x'",
     "extra_nodes entries must be Durofut JSON objects"),
    ("'{\"node_type\":\"SQL\",\"query\":\"x\",\"result_name\":7}' |=> 'n'", "Invalid Durofut JSON"),
    ("df.loop(jsonb_build_object('node_type', 'THEN', 'left_node',"
     " jsonb_build_object('query', 'SELECT 1'))::text)", "missing field `node_type`"),
    ("'{\"node_type\":\"NOT_A_NODE\",\"left_node\":1}' ~> 'x'", "Invalid Durofut JSON"),
]


@pytest.mark.parametrize(("expr", "message"), CALL_ERRORS, ids=[c[0][:60] for c in CALL_ERRORS])
def test_call_time_checks(conn: Conn, expr: str, message: str) -> None:
    with pytest.raises(psycopg.errors.InvalidParameterValue, match=re.escape(message)):
        graph(conn, expr)


BAD_CRON: list[tuple[str, str]] = [
    ("", "expected 5 fields"),
    ("* * * *", "expected 5 fields (minute hour day-of-month month day-of-week), found 4"),
    ("0 0 * * * *", "found 6"),
    ("@daily", "found 1"),
    ("60 * * * *", "60 is out of range for the minute field (0-59)"),
    ("* 24 * * *", "out of range for the hour field"),
    ("* * 0 * *", "out of range for the day-of-month field"),
    ("* * * 13 *", "out of range for the month field"),
    ("* * * * 8", "out of range for the day-of-week field"),
    ("*/0 * * * *", "step 0"),
    ("*/x * * * *", "invalid step"),
    ("1/2/3 * * * *", "invalid step"),
    ("5-1 * * * *", "is reversed"),
    ("1-2-3 * * * *", "invalid range"),
    ("* * * FOO *", "'FOO' is not a valid month value"),
    ("* * * * MONDAY", "'MONDAY' is not a valid day-of-week value"),
    ("* * * * JAN", "'JAN' is not a valid day-of-week value"),
    ("0 0 L * *", "'L' is not a valid day-of-month value"),
    ("0 0 * * 1#2", "'1#2' is not a valid day-of-week value"),
    ("? * * * *", "'?' is not a valid minute value"),
    ("1,,2 * * * *", "empty list item in the minute field"),
    ("a * * * *", "'a' is not a valid minute value"),
]


@pytest.mark.parametrize(("expr", "reason"), BAD_CRON, ids=[c[0] or "empty" for c in BAD_CRON])
def test_invalid_cron_is_refused_at_call_time(conn: Conn, expr: str, reason: str) -> None:
    with pytest.raises(psycopg.errors.InvalidParameterValue,
                       match=re.escape(f"Invalid cron expression '{expr}': ")) as caught:
        graph(conn, f"df.wait_for_schedule({sql.quote(expr)})")
    assert reason in str(caught.value)


def test_a_schedule_that_never_fires_is_refused(conn: Conn) -> None:
    for expr in ["0 0 31 2 *", "0 0 30,31 FEB *", "0 0 31 4,6,9,11 *"]:
        with pytest.raises(psycopg.errors.InvalidParameterValue,
                           match=re.escape(f"No upcoming schedule found for '{expr}'")):
            graph(conn, f"df.wait_for_schedule({sql.quote(expr)})")


GOOD_CRON = ["* * * * *", "0 9 * * MON-FRI", "*/15 * * * *", "5/15 * * * *", "0 0 1 JAN-MAR/2 *",
             "0 0 ? * 7", "0 0 * * 0-7", "0 0 * * sun,Sat", "0 0 1-31/2 * *", "0 0 * jan *",
             "1,2,3 * * * *", "0-59/60 * * * *", "30 2 29 2 *", "0 0 31 * *", "0 0 31 2 1",
             "  0   12 * * *  ", "59 23 31 12 6", "0 0 1,15 * MON"]


@pytest.mark.parametrize("expr", GOOD_CRON)
def test_valid_cron_is_accepted_and_runnable(conn: Conn, expr: str) -> None:
    text = graph(conn, f"df.wait_for_schedule({sql.quote(expr)})")
    assert json.loads(json.loads(text)["query"]) == {"cron_expr": expr}
    croniter(expr)  # what the runtime evaluates it with accepts it too


# --- Helper results used as steps.

def test_helper_result_cannot_be_a_step_in_the_same_statement(conn: Conn) -> None:
    assert one(conn, "SELECT df._helper_result('df.setvar', 'OK')") == "OK"
    message = re.escape("df.setvar cannot be used as a workflow step."
                        " Call df.setvar before df.start().")
    for expr in ["df._helper_result('df.setvar', 'OK') ~> 'SELECT 1'",
                 "'SELECT 1' & df._helper_result('df.setvar', 'OK')",
                 "df.as(df._helper_result('df.setvar', 'OK'), 'n')",
                 "df.loop(df._helper_result('df.setvar', 'OK'))",
                 "df.if('SELECT 1', 'SELECT 2', df._helper_result('df.setvar', 'OK'))",
                 "df.join(VARIADIC ARRAY['a', df._helper_result('df.setvar', 'OK')])"]:
        with pytest.raises(psycopg.errors.InvalidParameterValue, match=message):
            graph(conn, expr)
    with pytest.raises(psycopg.errors.InvalidParameterValue,
                       match=r"df\.await_instance cannot be used as a workflow step"):
        graph(conn, "df.seq(df._helper_result('df.await_instance', 'completed'), 'SELECT 1')")


def test_helper_mark_is_scoped_to_its_statement_and_value(conn: Conn) -> None:
    one(conn, "SELECT df._helper_result('df.setvar', 'OK')")
    assert json.loads(graph(conn, "'OK' ~> 'SELECT 1'"))["left_node"] == SQL("OK")
    row = conn.execute("SELECT df._helper_result('df.setvar', 'OK'),"
                       " df.seq('SELECT 1', 'completed')").fetchone()
    assert row is not None and row[0] == "OK"
    with conn.transaction():
        one(conn, "SELECT df._helper_result('df.setvar', 'OK')")
        assert json.loads(graph(conn, "'OK' ~> 'SELECT 1'"))["left_node"] == SQL("OK")


# --- Speed and size.

@pytest.mark.parametrize("op", ["~>", "&"])
def test_a_chain_of_a_thousand_builds_fast_and_stays_linear(conn: Conn, op: str) -> None:
    started = time.monotonic()
    conn.execute(f"""
        DO $$ DECLARE g text := 'SELECT 0';
        BEGIN
            FOR i IN 1..1000 LOOP g := g {op} ('SELECT ' || i); END LOOP;
            PERFORM set_config('test.chain', g, false);
        END $$""")  # type: ignore[arg-type]
    elapsed = time.monotonic() - started
    text = one(conn, "SELECT current_setting('test.chain')")
    assert elapsed < 5, elapsed
    assert len(text) < 500_000
    kind = {"~>": "THEN", "&": "JOIN"}[op]
    expected = (f'{{"node_type":"{kind}","left_node":' * 1000 + dumps(SQL("SELECT 0"))
                + "".join(f',"right_node":{dumps(SQL(f"SELECT {i}"))}}}' for i in range(1, 1001)))
    assert text == expected


# --- The migration itself.

SIGNATURES = [
    "df.sql(text)", "df.seq(text,text)", "df.\"as\"(text,text)", "df.join(text,text)",
    "df.join(text[])", "df.join3(text,text,text)", "df.race(text,text)", "df.race(text[])",
    "df.\"if\"(text,text,text)", "df.if_rows(text,text,text)", "df.loop(text,text)",
    "df.\"break\"(text)", "df.sleep(bigint)", "df.wait_for_schedule(text)",
    "df.wait_for_signal(text,integer)", "df.http(text,text,text,jsonb,integer)",
    "df.http_multipart(text,text,jsonb,jsonb,integer)", "df._helper_result(text,text)",
    "df._validate_graph(text)", "df.explain(text)", "df._inferred_nodes(text)",
]


def test_functions_have_their_contract_signatures(conn: Conn) -> None:
    for signature in SIGNATURES:
        assert one(conn, "SELECT to_regprocedure(%s) IS NOT NULL", (signature,)), signature
    volatility = dict(conn.execute(
        "SELECT p.oid::regprocedure::text, p.provolatile FROM pg_proc p"
        " WHERE p.pronamespace = 'df'::regnamespace").fetchall())
    assert volatility["df.sql(text)"] == "i"
    assert volatility["df.seq(text,text)"] == "s"  # reads the helper-result marker
    assert volatility["df._helper_result(text,text)"] == "v"
    assert volatility["df._validate_graph(text)"] == "s"


def test_operators_live_in_public(conn: Conn) -> None:
    rows = conn.execute(
        "SELECT oprname, oprleft::regtype::text, oprright::regtype::text, oprcode::text"
        " FROM pg_operator WHERE oprnamespace = 'public'::regnamespace ORDER BY 1").fetchall()
    assert rows == [("!>", "text", "text", "df._if_else_op"), ("&", "text", "text", "df.\"join\""),
                    ("?>", "text", "text", "df._if_then_op"), ("@>", "-", "text", "df._loop_op"),
                    ("|", "text", "text", "df.race"), ("|=>", "text", "text", "df.\"as\""),
                    ("~>", "text", "text", "df.seq")]


def test_installs_as_a_non_superuser_database_owner(server: Server) -> None:
    role = f"{server.prefix}_owner"
    name = f"{server.prefix}_owned"
    with server.admin() as admin:
        admin.execute(sql.SQL("CREATE ROLE {} LOGIN NOSUPERUSER").format(sql.Identifier(role)))
        admin.execute(sql.SQL("CREATE DATABASE {} OWNER {}").format(
            sql.Identifier(name), sql.Identifier(role)))
    server.created.append(name)
    try:
        dsn = make_conninfo(server.dsn_for(name), user=role)
        try:
            psycopg.connect(dsn).close()
        except psycopg.OperationalError as exc:  # the server wants a password for new roles
            pytest.skip(f"cannot log in as a new role here: {exc}")
        applied = schema.migrate(dsn, target=2)
        assert [m.version for m in applied] == [1, 2]
        with psycopg.connect(dsn, autocommit=True) as c:
            assert one(c, "SELECT rolsuper FROM pg_roles WHERE rolname = current_user") is False
            assert one(c, "SELECT ('a' ~> 'b')::text") == dumps(
                node("THEN", left_node=SQL("a"), right_node=SQL("b")))
    finally:
        server.drop_database(name)
        with server.admin() as admin:
            admin.execute(sql.SQL("DROP ROLE IF EXISTS {}").format(sql.Identifier(role)))
