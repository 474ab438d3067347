"""Start-time validation (SPEC §6) through df._validate_graph, which df.start() calls before it
writes anything.

MALFORMED and ACCEPTED are module-level so that the df.start() tests can run the same cases
(asserting that nothing was written for the first and that the second start).
"""

from __future__ import annotations

import json
import re
import time
from typing import Any

import psycopg
import pytest

Conn = psycopg.Connection[Any]


def _then(left: str, right: str = '{"node_type":"SQL","query":"SELECT 2"}') -> str:
    return '{"node_type":"THEN","left_node":' + left + ',"right_node":' + right + "}"


def _lit(text: str) -> str:
    """A SQL string literal."""
    return "'" + text.replace("'", "''") + "'"


def _cfg(node_type: str, config: dict[str, Any] | str, **extra: Any) -> str:
    """A hand-written leaf node whose query is `config` (JSON-encoded unless already text)."""
    query = config if isinstance(config, str) else json.dumps(config)
    return _lit(json.dumps({"node_type": node_type, "query": query, **extra}))


S1 = '{"node_type":"SQL","query":"SELECT 1"}'
S2 = '{"node_type":"SQL","query":"SELECT 2"}'

# (SQL expression giving the graph text, fragment of the error df.start() must raise).
# Every expression builds without error: the graph is only refused when it is started.
MALFORMED: list[tuple[str, str]] = [
    # unknown node types, at the root and below it
    (_lit('{"node_type":"NOT_A_NODE"}'), "root: Unknown node_type 'NOT_A_NODE'"),
    (_lit('{"node_type":"sql","query":"SELECT 1"}'), "Unknown node_type 'sql'"),
    (_lit(_then('{"node_type":"BOGUS"}')), "root.left: Unknown node_type 'BOGUS'"),
    ("jsonb_build_object('node_type', 'IF', 'condition_node', jsonb_build_object('node_type',"
     " 'NOPE'), 'left_node', jsonb_build_object('node_type', 'SQL', 'query', 'SELECT 1'))::text",
     "root.condition_node: Unknown node_type 'NOPE'"),
    (_lit('{"node_type":"JOIN","left_node":' + S1 + ',"extra_nodes":[' + S2
          + ',{"node_type":"X"}]}'),
     "root.extra_nodes[1]: Unknown node_type 'X'"),
    # malformed node JSON
    (_lit(_then("123")), "root.left: Durofut children must be JSON objects"),
    (_lit(_then(S1, '"SELECT 2"')), "root.right: Durofut children must be JSON objects"),
    (_lit(_then('{"query":"SELECT 1"}')), "root.left: missing field `node_type`"),
    (_lit(_then('{"node_type":7}')), "root.left: node_type must be a string"),
    (_lit('{"node_type":"SQL","query":5}'), "query must be a string"),
    (_lit('{"node_type":"SQL","query":"SELECT 1","result_name":["x"]}'),
     "result_name must be a string"),
    ("jsonb_build_object('node_type', 'SQL', 'query', 'SELECT 1', 'result_name', 'a b')::text",
     "result name 'a b' is not a valid identifier"),
    (_lit('{"node_type":"SQL","query":"SELECT 1","result_name":""}'),
     "result name cannot be empty"),
    # misplaced hand-built children
    (_lit('{"node_type":"IF","query":' + json.dumps(json.dumps({"condition_node": json.loads(S1)}))
          + ',"left_node":' + S1 + ',"right_node":' + S2 + "}"),
     "condition_node in IF must be a first-class Durofut field"),
    (_lit('{"node_type":"LOOP","query":'
          + json.dumps(json.dumps({"condition_node": json.loads(S1)}))
          + ',"left_node":' + S1 + "}"),
     "condition_node in LOOP must be a first-class Durofut field"),
    (_lit('{"node_type":"JOIN","query":' + json.dumps(json.dumps({"extra_nodes": [json.loads(S1)]}))
          + ',"left_node":' + S1 + ',"right_node":' + S2 + "}"),
     "extra_nodes in JOIN must be a first-class Durofut field"),
    (_lit('{"node_type":"IF","condition_node":' + S1 + ',"left_node":' + S2
          + ',"query":"not json"}'), "query in IF must be valid JSON config"),
    (_lit('{"node_type":"JOIN","left_node":' + S1 + ',"extra_nodes":[1]}'),
     "root.extra_nodes[0]: extra_nodes entries must be Durofut JSON objects"),
    (_lit('{"node_type":"JOIN","left_node":' + S1 + ',"extra_nodes":' + S2 + "}"),
     "extra_nodes must be an array of Durofut JSON objects"),
    (_lit('{"node_type":"IF","condition_node":"SELECT 1","left_node":' + S2 + "}"),
     "root.condition_node: condition_node must be a Durofut JSON object"),
    (_lit('{"node_type":"THEN","left_node":' + S1 + ',"right_node":' + S2
          + ',"condition_node":' + S1 + "}"), "condition_node is not valid for THEN nodes"),
    (_lit('{"node_type":"SQL","query":"SELECT 1","extra_nodes":[' + S2 + "]}"),
     "extra_nodes is not valid for SQL nodes"),
    (_lit('{"node_type":"SLEEP","query":"5","left_node":' + S1 + "}"),
     "left_node is not valid for SLEEP nodes"),
    (_lit('{"node_type":"LOOP","left_node":' + S1 + ',"right_node":' + S2 + "}"),
     "right_node is not valid for LOOP nodes"),
    # structurally missing children
    (_lit('{"node_type":"THEN","left_node":' + S1 + "}"),
     "THEN node needs both left_node and right_node"),
    (_lit('{"node_type":"THEN","left_node":null,"right_node":' + S2 + "}"),
     "THEN node needs both left_node and right_node"),
    (_lit('{"node_type":"IF","left_node":' + S1 + ',"right_node":' + S2 + "}"),
     "IF node needs a condition_node"),
    (_lit('{"node_type":"IF","left_node":' + S1 + ',"query":'
          + json.dumps(json.dumps({"condition_type": "result_has_rows"})) + "}"),
     "IF node needs a condition_node"),
    (_lit('{"node_type":"JOIN"}'), "JOIN node needs a branch in left_node"),
    (_lit('{"node_type":"RACE","right_node":' + S2 + "}"),
     "RACE node needs a branch in left_node"),
    (_lit('{"node_type":"LOOP","condition_node":' + S1 + "}"),
     "LOOP node needs a body in left_node"),
    # malformed leaf configs
    (_lit('{"node_type":"SQL"}'), "SQL node needs a query"),
    (_lit('{"node_type":"SLEEP","query":"soon"}'), "SLEEP query must be a non-negative number"),
    (_lit('{"node_type":"SLEEP","query":"-5"}'), "SLEEP query must be a non-negative number"),
    (_cfg("WAIT_SCHEDULE", {"cron_expr": "61 * * * *"}), "Invalid cron expression '61 * * * *'"),
    (_cfg("WAIT_SCHEDULE", {"cron_expr": "0 0 31 2 *"}), "No upcoming schedule found"),
    (_cfg("WAIT_SCHEDULE", {"cron": "* * * * *"}),
     "WAIT_SCHEDULE query must be a JSON config with a cron_expr string"),
    (_cfg("SIGNAL", {"signal_name": "", "timeout_seconds": None}),
     "SIGNAL query must be a JSON config with a non-empty signal_name"),
    (_cfg("SIGNAL", {"signal_name": "go", "timeout_seconds": 0}),
     "SIGNAL timeout_seconds must be a positive number or null"),
    (_cfg("HTTP", "https://example.com"), "HTTP query must be a JSON config with a url string"),
    (_cfg("HTTP_MULTIPART", {"method": "POST", "parts": []}),
     "HTTP_MULTIPART query must be a JSON config with a url string"),
    (_cfg("BREAK", "done"), "BREAK query must be a JSON config object"),
    # an unfinished ?> (a partial IF is not a node: it would run as SQL text)
    ("'SELECT 1' ?> 'SELECT 2'", "root: incomplete conditional: a ?> expression needs !>"),
    ("('SELECT 1' ?> 'SELECT 2') ~> 'SELECT 3'", "root.left: incomplete conditional"),
    # limits
    ("repeat('{\"node_type\":\"LOOP\",\"left_node\":', 257) || '" + S1 + "' || repeat('}', 257)",
     "maximum nesting depth of 256"),
    ("repeat('{\"node_type\":\"THEN\",\"left_node\":" + S1 + ",\"right_node\":', 300)"
     " || '" + S2 + "' || repeat('}', 300)", "maximum nesting depth of 256"),
    ("df.join(VARIADIC ARRAY(SELECT 'SELECT ' || g FROM generate_series(1, 10000) g))",
     "maximum node count of 10000"),
    # beyond pg_durable (its 43_empty_sql starts these and fails when they run): empty SQL
    ("df.sql('')", "root: empty SQL"),
    ("df.sql('   ')", "root: empty SQL"),
    ("'SELECT 1' ~> ' ; '", "root.right: empty SQL"),
]

# Graphs pg_durable starts (its e2e tests do, or they are its DSL's output): never refused.
ACCEPTED: list[str] = [
    "'SELECT 1'",
    "df.sql('this is not valid sql at all')",
    "'SELECT $unbound, $x.col, $y?, $z.*, $1, {nope}'",  # unbound names fail when they run
    "df.break()",                                   # 22_break_in_join_race: outside a loop
    "'SELECT 1' ~> df.break('x') & 'SELECT 2'",
    "'{\"a\": 1}'",                                 # JSON without node_type is SQL text
    "'[1, 2]'",
    "'{\"node_type\": 123}'",
    _cfg("HTTP", {"url": "file:///etc/passwd", "method": "GET", "body": None, "headers": None,
                  "timeout_seconds": 5}),          # 36_ssrf: the scheme is refused at run time
    _cfg("HTTP", {"url": "https://example.com"}),
    _cfg("HTTP_MULTIPART", {"endpoint": "x", "url": "/upload", "method": "POST",
                            "parts": [{"name": "file", "data_b64": "aGVsbG8="}]}),
    _cfg("WAIT_SCHEDULE", {"cron_expr": "0 9 * * *", "wait_seconds": 42}),  # older format
    _lit('{"node_type":"SQL","query":"SELECT 1","left_node":null,"extra_nodes":[],"x":1}'),
    _lit('{"node_type":"IF","condition_node":' + S1 + ',"left_node":' + S2 + "}"),
    _lit('{"node_type":"BREAK"}'),
    "jsonb_build_object('node_type', 'THEN', 'left_node', jsonb_build_object('query',"
    " 'SELECT 1', 'node_type', 'SQL'), 'right_node', jsonb_build_object('node_type', 'SQL',"
    " 'query', 'SELECT 2'))::text",
    "df.join(VARIADIC ARRAY['SELECT 1'])",
    "df.race('SELECT 1', 'SELECT 2', 'SELECT 3')",
    "df.if_rows('r', 'SELECT 1', 'SELECT 2')",
    "'SELECT 1' ?> 'SELECT 2' !> 'SELECT 3'",
    "df.loop('SELECT 1', 'SELECT 2')",
    "@> ('SELECT 1' ~> df.sleep(1))",
    "df.wait_for_signal('go', 5) | df.wait_for_schedule('*/5 * * * *')",
    "df.http('https://example.com', 'GET') ~> df.http_multipart('https://example.com',"
    " parts => '[{\"name\":\"f\",\"data_b64\":\"aGk=\"}]')",
    "$$SELECT '{\"_partial_if\": true}'$$",         # SQL that mentions a partial IF
    "repeat('{\"node_type\":\"LOOP\",\"left_node\":', 256) || '" + S1 + "' || repeat('}', 256)",
    "df.join(VARIADIC ARRAY(SELECT 'SELECT ' || g FROM generate_series(1, 9999) g))",
]


def validate(conn: Conn, expr: str) -> Any:
    row = conn.execute(f"SELECT df._validate_graph({expr})").fetchone()  # type: ignore[arg-type]
    assert row is not None
    return row[0]


def count_rows(conn: Conn) -> tuple[Any, ...]:
    row = conn.execute("SELECT (SELECT count(*) FROM df.instances),"
                       " (SELECT count(*) FROM df.nodes)").fetchone()
    assert row is not None
    return tuple(row)


def test_there_are_enough_cases() -> None:
    assert len(MALFORMED) >= 30
    assert len({expr for expr, _ in MALFORMED}) == len(MALFORMED)


@pytest.mark.parametrize(("expr", "message"), MALFORMED, ids=[m for _, m in MALFORMED])
def test_malformed_graph_is_refused(conn: Conn, expr: str, message: str) -> None:
    before = count_rows(conn)
    with pytest.raises(psycopg.Error) as caught:
        validate(conn, expr)
    assert str(caught.value).startswith("Invalid durable function graph: "), str(caught.value)
    assert message in str(caught.value)
    assert caught.value.sqlstate in ("22023", "54000")
    assert count_rows(conn) == before


@pytest.mark.parametrize("expr", ACCEPTED, ids=[a[:60] for a in ACCEPTED])
def test_what_pg_durable_accepts_is_accepted(conn: Conn, expr: str) -> None:
    value = validate(conn, expr)
    assert isinstance(value, dict) and isinstance(value["node_type"], str)


def test_plain_sql_is_wrapped(conn: Conn) -> None:
    assert validate(conn, "'SELECT 1'") == {"node_type": "SQL", "query": "SELECT 1"}
    assert validate(conn, "'{\"a\": 1}'") == {"node_type": "SQL", "query": '{"a": 1}'}


def test_returns_nested_nodes_with_leaf_configs_as_strings(conn: Conn) -> None:
    value = validate(conn, "df.if('SELECT 1' |=> 'c', df.sleep(5), df.break('x'))"
                           " ~> df.join('SELECT 2', 'SELECT 3', df.wait_for_signal('go'))")
    assert value == {
        "node_type": "THEN",
        "left_node": {
            "node_type": "IF",
            "condition_node": {"node_type": "SQL", "query": "SELECT 1", "result_name": "c"},
            "left_node": {"node_type": "SLEEP", "query": "5"},
            "right_node": {"node_type": "BREAK", "query": '{"break_value":"x"}'},
        },
        "right_node": {
            "node_type": "JOIN",
            "left_node": {"node_type": "SQL", "query": "SELECT 2"},
            "right_node": {"node_type": "SQL", "query": "SELECT 3"},
            "extra_nodes": [{"node_type": "SIGNAL",
                             "query": '{"signal_name":"go","timeout_seconds":null}'}],
        },
    }


def _nested_seq(conn: Conn, levels: int, side: str) -> str:
    """`levels` df.seq calls, each wrapping the previous one on the given side."""
    inner = "df.seq(c.g, 'SELECT ' || (c.i + 1))" if side == "left" \
        else "df.seq('SELECT ' || (c.i + 1), c.g)"
    row = conn.execute(  # type: ignore[call-overload]
        f"WITH RECURSIVE c(i, g) AS (SELECT 0, 'SELECT 0'::text UNION ALL"
        f" SELECT c.i + 1, {inner} FROM c WHERE c.i < %s) SELECT g FROM c WHERE i = %s",
        (levels, levels)).fetchone()
    assert row is not None
    return str(row[0])


@pytest.mark.parametrize("side", ["left", "right"])
def test_256_nested_seq_calls_pass_and_257_fail(conn: Conn, side: str) -> None:
    validate(conn, _lit(_nested_seq(conn, 256, side)))
    with pytest.raises(psycopg.errors.ProgramLimitExceeded,
                       match="maximum nesting depth of 256"):
        validate(conn, _lit(_nested_seq(conn, 257, side)))


def test_depth_counts_conditions_and_extra_branches(conn: Conn) -> None:
    levels = 257
    deep_if = (('{"node_type":"IF","left_node":' + S1 + ',"condition_node":') * levels
               + S2 + "}" * levels)
    # The IF at depth 256 has its then-arm first in pre-order (left, right, condition).
    with pytest.raises(psycopg.Error, match=r"root(\.condition_node){256}\.left: Graph exceeds"):
        validate(conn, _lit(deep_if))
    deep_join = ('{"node_type":"JOIN","left_node":' + S1 + ',"extra_nodes":[') * levels \
        + S2 + "]}" * levels
    with pytest.raises(psycopg.Error, match=r"root(\.extra_nodes\[0\]){256}\.left: Graph exceeds"):
        validate(conn, _lit(deep_join))


def test_limits_come_from_settings(conn: Conn) -> None:
    try:
        conn.execute("UPDATE df.settings SET value = '2' WHERE name = 'max_nesting_depth'")
        validate(conn, "('a' ~> 'b') ~> 'c'")
        with pytest.raises(psycopg.Error, match="maximum nesting depth of 2"):
            validate(conn, "('a' ~> 'b') ~> 'c' ~> 'd'")
        conn.execute("UPDATE df.settings SET value = '4' WHERE name = 'max_node_count'")
        validate(conn, "df.join('a', 'b', 'c')")
        with pytest.raises(psycopg.Error, match="maximum node count of 4"):
            validate(conn, "df.join('a', 'b', 'c', 'd')")
    finally:
        conn.execute("UPDATE df.settings SET value = '256' WHERE name = 'max_nesting_depth'")
        conn.execute("UPDATE df.settings SET value = '10000' WHERE name = 'max_node_count'")


def test_first_problem_in_pre_order_is_reported(conn: Conn) -> None:
    graph = ('{"node_type":"THEN","left_node":{"node_type":"THEN","left_node":{"node_type":"A"},'
             '"right_node":' + S1 + '},"right_node":{"node_type":"B"}}')
    with pytest.raises(psycopg.Error, match=re.escape("root.left.left: Unknown node_type 'A'")):
        validate(conn, _lit(graph))


def test_helper_result_is_refused_at_start(conn: Conn) -> None:
    with pytest.raises(psycopg.errors.InvalidParameterValue,
                       match=r"df\.status cannot be used as a workflow step"):
        validate(conn, "df._helper_result('df.status', 'completed')")


def test_validation_writes_nothing(conn: Conn) -> None:
    with conn.transaction():
        conn.execute("SET TRANSACTION READ ONLY")
        validate(conn, "df.join(VARIADIC ARRAY(SELECT 'SELECT ' || g"
                       " FROM generate_series(1, 500) g))")
        with pytest.raises(psycopg.Error, match="Unknown node_type"), conn.transaction():
            validate(conn, _lit('{"node_type":"NOT_A_NODE"}'))
        row = conn.execute("SELECT df.explain('SELECT 1' ~> 'SELECT 2')").fetchone()
        assert row is not None and "SQL: SELECT 2" in row[0]


def test_ten_thousand_nodes_validate_quickly(conn: Conn) -> None:
    # A deep and wide graph: 38 sequential steps, each a JOIN of 255 branches (9,767 nodes).
    conn.execute("""
        DO $$ DECLARE g text := 'SELECT 0';
        BEGIN
            FOR i IN 1..38 LOOP
                g := g ~> df.join(VARIADIC ARRAY(SELECT 'SELECT ' || i || ', ' || b
                                                 FROM generate_series(1, 255) b));
            END LOOP;
            PERFORM set_config('test.big_graph', g, false);
        END $$""")
    started = time.monotonic()
    value = validate(conn, "current_setting('test.big_graph')")
    elapsed = time.monotonic() - started
    assert value["node_type"] == "THEN"
    assert elapsed < 5, elapsed
