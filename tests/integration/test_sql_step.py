"""The SQL step on a real PostgreSQL: result encoding per column type, every reference form,
bind typing that reproduces pg_durable's spliced literals, and proof that values stay data."""

from __future__ import annotations

import random
from collections.abc import AsyncIterator, Callable
from typing import Any

import psycopg
import pytest
from psycopg.types.json import set_json_loads
from psycopg.types.numeric import FloatLoader

from durable_actor.errors import StepError
from durable_actor.refs import quote_literal
from durable_actor.steps.sql import run_sql


def rows(*records: dict[str, Any]) -> dict[str, Any]:
    return {"rows": list(records), "row_count": len(records)}


def one(value: Any, col: str = "v") -> dict[str, Any]:
    return rows({col: value})


@pytest.fixture
async def aconn(module_dsn: str) -> AsyncIterator[psycopg.AsyncConnection[Any]]:
    async with await psycopg.AsyncConnection.connect(module_dsn, autocommit=True) as conn:
        yield conn


async def first(conn: psycopg.AsyncConnection[Any], query: str,
                results: dict[str, Any] | None = None) -> dict[str, Any]:
    out = await run_sql(conn, query, results or {})
    assert out["row_count"] == len(out["rows"]) >= 1
    row: dict[str, Any] = out["rows"][0]
    return row


async def fails(conn: psycopg.AsyncConnection[Any], query: str,
                results: dict[str, Any] | None = None) -> StepError:
    with pytest.raises(StepError) as info:
        await run_sql(conn, query, results or {})
    return info.value


# -- result encoding (SPEC §2 table) -----------------------------------------------------------

@pytest.mark.parametrize(("expr", "expected"), [
    ("true", True), ("false", False),
    ("32767::int2", 32767), ("(-2147483648)::int4", -2147483648),
    ("9223372036854775807::int8", 9223372036854775807),
    ("3.14::float4", 3.14), ("0.1::float4", 0.1), ("2.718281828::float8", 2.718281828),
    ("1e300::float8", 1e300), ("-0.0::float8", -0.0),
    ("'NaN'::float8", None), ("'Infinity'::float8", None), ("'-Infinity'::float4", None),
    ("'NaN'::float4", None),
    ("'text'::text", "text"), ("'v'::varchar(5)", "v"), ("'ab'::char(4)", "ab  "),
    ("'nm'::name", "nm"), ("'é ✓'::text", "é ✓"),
    ("123456.78900000::numeric", "123456.78900000"), ("0.0000001::numeric", "0.0000001"),
    ("1e20::numeric", "100000000000000000000"), ("-123.450::numeric", "-123.450"),
    ("0.00::numeric", "0.00"), ("0::numeric", "0"), ("'NaN'::numeric", "NaN"),
    ("12345678901234567890.123456789012345678901234567890::numeric",
     "12345678901234567890.123456789012345678901234567890"),
    ("'A0EEBC99-9C0B-4EF8-BB6D-6BB9BD380A11'::uuid", "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11"),
    ("'2024-06-15 12:30:00+00'::timestamptz", "2024-06-15T12:30:00+00:00"),
    ("'2024-06-15 14:30:00.5+02'::timestamptz", "2024-06-15T12:30:00.500+00:00"),
    ("'2024-06-15 12:30:00.123456+00'::timestamptz", "2024-06-15T12:30:00.123456+00:00"),
    ("'infinity'::timestamptz", "infinity"),
    ("'2024-06-15 12:30:00'::timestamp", "2024-06-15T12:30:00"),
    ("'2024-06-15 12:30:00.25'::timestamp", "2024-06-15T12:30:00.250"),
    ("'1999-12-31 23:59:59.999999'::timestamp", "1999-12-31T23:59:59.999999"),
    ("'-infinity'::timestamp", "-infinity"),
    ("'2024-06-15'::date", "2024-06-15"), ("'1970-01-01'::date", "1970-01-01"),
    ("'0001-01-01'::date", "0001-01-01"), ("'infinity'::date", "infinity"),
    ("""'{"key":"world","count":42}'::jsonb""", {"key": "world", "count": 42}),
    ("""'[1, 2.50, {"a": null}, "s"]'::json""", [1, 2.5, {"a": None}, "s"]),
    ("'\"just a string\"'::jsonb", "just a string"), ("'null'::jsonb", None),
    ("'1e400'::json", None),                                   # beyond a double: null
    ("pg_sleep(0)", None),
])
async def test_column_encoding(aconn: psycopg.AsyncConnection[Any], expr: str,
                               expected: Any) -> None:
    value = (await first(aconn, f"SELECT {expr} AS v"))["v"]
    assert value == expected
    assert type(value) is type(expected)


async def test_encoding_ignores_session_settings(aconn: psycopg.AsyncConnection[Any]) -> None:
    await aconn.execute("SET TimeZone = 'Asia/Kolkata'")
    await aconn.execute("SET DateStyle = 'SQL, DMY'")
    await aconn.execute("SET extra_float_digits = -3")
    row = await first(aconn, "SELECT '2024-06-15 12:30:00+00'::timestamptz AS t,"
                             " '2024-06-15'::date AS d, 0.1::float8 AS f")
    assert row == {"t": "2024-06-15T12:30:00+00:00", "d": "2024-06-15", "f": 0.1}


async def test_sql_null_of_every_type_is_json_null(aconn: psycopg.AsyncConnection[Any]) -> None:
    types = ["bool", "int2", "int4", "int8", "float4", "float8", "text", "varchar", "bpchar",
             "name", "numeric", "uuid", "timestamptz", "timestamp", "date", "json", "jsonb"]
    row = await first(aconn, "SELECT " + ", ".join(f"NULL::{t} AS {t}" for t in types))
    assert row == dict.fromkeys(types)


async def test_keys_follow_the_select_list(aconn: psycopg.AsyncConnection[Any]) -> None:
    out = await run_sql(aconn, "SELECT 1 AS z, 2 AS a, 3 AS m, 4, 'x' AS a", {})
    assert out == {"rows": [{"z": 1, "a": "x", "m": 3, "?column?": 4}], "row_count": 1}
    assert list(out["rows"][0]) == ["z", "a", "m", "?column?"]


async def test_domains_encode_as_their_base_type(aconn: psycopg.AsyncConnection[Any]) -> None:
    await aconn.execute("CREATE DOMAIN pos_int AS int CHECK (VALUE > 0)")
    assert (await first(aconn, "SELECT 5::pos_int AS v"))["v"] == 5


@pytest.mark.parametrize(("expr", "type_name"), [
    ("'hello'::bytea", "BYTEA"), ("ARRAY[1, 2]", "INT4[]"), ("'1 day'::interval", "INTERVAL"),
    ("'12:00'::time", "TIME"), ("'127.0.0.1'::inet", "INET"), ("'a'::\"char\"", '"CHAR"'),
    ("row(1, 2)", "RECORD"), ("'happy'::mood", "mood"),
])
async def test_unsupported_types_fail(aconn: psycopg.AsyncConnection[Any], expr: str,
                                      type_name: str) -> None:
    await aconn.execute("DO $$ BEGIN CREATE TYPE mood AS ENUM ('happy');"
                        " EXCEPTION WHEN duplicate_object THEN NULL; END $$")
    error = await fails(aconn, f"SELECT 1 AS ok, {expr} AS b")
    assert str(error).startswith(f"Unsupported column type '{type_name}' for column 'b'.")


async def test_unsupported_types_without_rows_pass(aconn: psycopg.AsyncConnection[Any]) -> None:
    assert await run_sql(aconn, "SELECT 'x'::bytea AS b WHERE false", {}) == {
        "rows": [], "row_count": 0}


async def test_commands_without_rows(aconn: psycopg.AsyncConnection[Any]) -> None:
    await aconn.execute("CREATE TABLE enc_t (id int, v text)")
    empty = {"rows": [], "row_count": 0}
    assert await run_sql(aconn, "INSERT INTO enc_t VALUES (1, 'a'), (2, 'b')", {}) == empty
    assert await run_sql(aconn, "UPDATE enc_t SET v = v || '!'", {}) == empty
    assert await run_sql(aconn, "INSERT INTO enc_t VALUES (3, 'c') RETURNING id, v", {}) == {
        "rows": [{"id": 3, "v": "c"}], "row_count": 1}
    out = await run_sql(aconn, "SELECT id FROM enc_t ORDER BY id", {})
    assert out == {"rows": [{"id": 1}, {"id": 2}, {"id": 3}], "row_count": 3}
    assert await run_sql(aconn, "", {}) == empty
    assert await run_sql(aconn, "-- only a comment", {}) == empty


async def test_random_values_round_trip(aconn: psycopg.AsyncConnection[Any]) -> None:
    """Encoded values read back through a reference equal what PostgreSQL holds."""
    rnd = random.Random(20240615)
    cases: list[tuple[str, str]] = []
    for _ in range(60):
        digits = "".join(rnd.choice("0123456789") for _ in range(rnd.randint(1, 30)))
        scale = rnd.randint(0, len(digits))
        number = f"{rnd.choice(['', '-'])}{digits[:len(digits) - scale] or '0'}." \
                 f"{digits[len(digits) - scale:]}".rstrip(".")
        cases.append((f"'{number}'::numeric", "numeric"))
        # years 1 … 9999: the range both sides spell the same way
        seconds = rnd.randint(-62_000_000_000_000_000, 250_000_000_000_000_000) / 1_000_000
        cases.append((f"to_timestamp({seconds})", "timestamptz"))
        cases.append((f"to_timestamp({seconds}) AT TIME ZONE 'UTC'", "timestamp"))
        cases.append((f"'2000-01-01'::date + {rnd.randint(-730_000, 2_900_000)}", "date"))
        cases.append((f"{rnd.uniform(-1e6, 1e6)}::float8 * {rnd.choice([1e-300, 1, 1e300])}",
                      "float8"))
        cases.append((f"{rnd.uniform(-1e6, 1e6)}::float4", "float4"))
    for expr, typ in cases:
        value = (await first(aconn, f"SELECT {expr} AS v"))["v"]
        check = await first(aconn, f"SELECT $r::{typ} = ({expr})::{typ} AS same,"
                                   f" $r::{typ}::text AS back, ({expr})::{typ}::text AS orig",
                            {"r": one(value)})
        assert check["same"], (expr, value, check)
        if typ == "numeric":                      # exact, scale kept
            assert value == check["orig"]


# -- references ------------------------------------------------------------------------------

RESULTS: dict[str, Any] = {
    "x": rows({"a": 5, "b": "hi", "n": None}, {"a": 6, "b": "second", "n": 1}),
    "none": rows(),
    "nul": one(None),
    "total": one(50),
    "flag": one(True),
    "t": one("2020-01-01T00:00:00+00:00"),
    "num": one("123456.78900000"),
    "r": {"status": 201, "body": '{"id": 7, "tags": ["a"]}', "encoding": "text",
          "headers": {}, "ok": True, "duration_ms": 3},
    "sig": {"signal_name": "go", "timed_out": False, "data": {"k": "v"}},
    "join": [one(1), one("two")],
    "brk": "done",
}


async def test_each_reference_form(aconn: psycopg.AsyncConnection[Any]) -> None:
    row = await first(aconn, "SELECT $x AS bare, $x.b AS col, $x? AS safe, $x.b? AS safe_col,"
                             " $none? AS no_rows, $nul? AS null_first, $x.n? AS null_col,"
                             " $none.b? AS no_rows_col", RESULTS)
    assert row == {"bare": 5, "col": "hi", "safe": 5, "safe_col": "hi", "no_rows": None,
                   "null_first": None, "null_col": None, "no_rows_col": None}


@pytest.mark.parametrize(("query", "message"), [
    ("SELECT $none", "$none has no rows — query returned zero results"),
    ("SELECT $none.a", "$none has no rows"),
    ("SELECT $nul", "$nul is NULL — first column of first row is NULL"),
    ("SELECT $x.n", "$x.n is NULL"),
    ("SELECT * FROM $brk.*", "$brk.* — invalid result format"),
])
async def test_reference_failures(aconn: psycopg.AsyncConnection[Any], query: str,
                                  message: str) -> None:
    assert message in str(await fails(aconn, query, RESULTS))


async def test_missing_column_is_left_for_postgresql(aconn: psycopg.AsyncConnection[Any]) -> None:
    error = await fails(aconn, "SELECT $x.nope", RESULTS)
    assert str(error).startswith("SQL execution failed: syntax error at or near \"$")
    assert error.sqlstate == "42601"


async def test_non_row_results(aconn: psycopg.AsyncConnection[Any]) -> None:
    row = await first(aconn, "SELECT $r.status AS status, ($r.body)::jsonb->>'id' AS id,"
                             " $r.ok AS ok, $sig.data::jsonb->>'k' AS k, $sig::jsonb->'data' AS d,"
                             " $join::jsonb->1->'rows'->0->>'v' AS two, $brk AS brk",
                      RESULTS)
    assert row == {"status": 201, "id": "7", "ok": True, "k": "v", "d": {"k": "v"},
                   "two": "two", "brk": '"done"'}


async def test_bind_types_reproduce_spliced_literals(aconn: psycopg.AsyncConnection[Any]) -> None:
    row = await first(aconn, "SELECT $total * 2 AS doubled, $flag AS flag, $num::numeric AS n,"
                             " $num::numeric * 2 AS n2, $x.b AS s, $total / 3 AS div,"
                             " $total::text || '!' AS txt", RESULTS)
    assert row == {"doubled": 100, "flag": True, "n": "123456.78900000",
                   "n2": "246913.57800000", "s": "hi", "div": 16, "txt": "50!"}
    assert (await first(aconn, "SELECT 1 AS hit WHERE now() > $t", RESULTS))["hit"] == 1
    assert (await first(aconn, "SELECT pg_typeof($total)::text AS a, pg_typeof($flag)::text"
                               " AS b, pg_typeof($x.b)::text AS c", RESULTS)) == {
        "a": "integer", "b": "boolean", "c": "text"}


async def test_typed_literal_syntax(aconn: psycopg.AsyncConnection[Any]) -> None:
    row = await first(aconn, "SELECT timestamptz $t AS a, date $d AS b, (interval $i)::text"
                             " AS c, $d AS d", {**RESULTS, "d": one("2024-06-15"),
                                                "i": one("1 day")})
    assert row == {"a": "2020-01-01T00:00:00+00:00", "b": "2024-06-15", "c": "1 day",
                   "d": "2024-06-15"}


async def test_big_and_fractional_numbers(aconn: psycopg.AsyncConnection[Any]) -> None:
    results = {"big": one(2**40), "frac": one(1.25), "neg": one(-7)}
    row = await first(aconn, "SELECT pg_typeof($big)::text AS t, $big + 1 AS b,"
                             " pg_typeof($frac)::text AS ft, $frac * 2 AS f, 10-$neg AS n",
                      results)
    assert row == {"t": "bigint", "b": 2**40 + 1, "ft": "numeric", "f": "2.50", "n": 17}


@pytest.mark.parametrize("in_transaction", [False, True])
async def test_untypeable_unknown_parameters_retry_as_text(
        aconn: psycopg.AsyncConnection[Any], in_transaction: bool) -> None:
    query = ("SELECT concat($x.b, '!') AS c, $x.b IS NULL AS n, jsonb_build_object('k', $x.b)"
             " AS j, format('%s/%s', $x.b, $total) AS f, $t::timestamptz AS ts")
    expected = {"c": "hi!", "n": False, "j": {"k": "hi"}, "f": "hi/50",
                "ts": "2020-01-01T00:00:00+00:00"}
    if not in_transaction:
        assert await first(aconn, query, RESULTS) == expected
        return
    await aconn.execute("CREATE TABLE IF NOT EXISTS retry_t (v text)")
    async with aconn.transaction():
        await run_sql(aconn, "INSERT INTO retry_t VALUES ($x.b)", RESULTS)
        assert await first(aconn, query, RESULTS) == expected
        assert (await first(aconn, "SELECT count(*) AS n FROM retry_t"))["n"] == 1
    # the transaction is intact after the retry and commits what ran before it
    assert (await first(aconn, "SELECT count(*) AS n FROM retry_t"))["n"] == 1


# -- $name.* ----------------------------------------------------------------------------------

async def test_row_sets_in_from(aconn: psycopg.AsyncConnection[Any]) -> None:
    batch = rows({"id": 1, "val": "a", "meta": {"w": 1}, "price": "1.50", "ok": True},
                 {"id": 2, "val": "b", "meta": {"w": 2}, "price": "2.00", "ok": False},
                 {"id": 3, "val": None, "meta": None, "price": "0", "ok": None})
    results = {"batch": batch, "none": rows()}
    out = await run_sql(aconn, "SELECT batch.id, val, meta->>'w' AS w, price::numeric AS p, ok"
                               " FROM $batch.* ORDER BY id", results)
    assert out["rows"] == [
        {"id": 1, "val": "a", "w": "1", "p": "1.50", "ok": True},
        {"id": 2, "val": "b", "w": "2", "p": "2.00", "ok": False},
        {"id": 3, "val": None, "w": None, "p": "0", "ok": None}]
    assert (await first(aconn, "SELECT count(*) AS n FROM $none.*", results))["n"] == 0
    row = await first(aconn, "SELECT count(*) AS n FROM generate_series(1, 5) g"
                             " WHERE g IN (SELECT id FROM $batch.*)", results)
    assert row["n"] == 3


async def test_row_set_into_a_table(aconn: psycopg.AsyncConnection[Any]) -> None:
    await aconn.execute("CREATE TABLE rowset_t (id int, name text)")
    results = {"src": rows({"id": 1, "name": "x"}, {"id": 2, "name": "y'z"})}
    await run_sql(aconn, "INSERT INTO rowset_t SELECT id, name FROM $src.*", results)
    await run_sql(aconn, "CREATE TABLE rowset_copy AS SELECT * FROM $src.*", results)
    for table in ("rowset_t", "rowset_copy"):
        out = await run_sql(aconn, f"SELECT id, name FROM {table} ORDER BY id", {})
        assert out["rows"] == [{"id": 1, "name": "x"}, {"id": 2, "name": "y'z"}]


async def test_large_row_sets(aconn: psycopg.AsyncConnection[Any]) -> None:
    ok = rows(*({"i": i} for i in range(10_000)))
    row = await first(aconn, "SELECT sum(i) AS s, pg_typeof(i)::text AS t FROM $ok.* GROUP BY i"
                             " ORDER BY i DESC LIMIT 1", {"ok": ok})
    assert row == {"s": "9999", "t": "bigint"}
    too_many = rows(*({"i": i} for i in range(10_001)))
    error = await fails(aconn, "SELECT count(*) FROM $big.*", {"big": too_many})
    assert "exceeding the maximum of 10000" in str(error)


# -- where a parameter cannot go ----------------------------------------------------------------

async def test_references_inside_literals(aconn: psycopg.AsyncConnection[Any]) -> None:
    results = {"count": one(3), "n": one(90), "s": one("it's"), "bs": one("a\\b")}
    row = await first(aconn, "SELECT 'Tasks: $count' AS a, interval '$n seconds' = interval"
                             " '90 seconds' AS b, '<$s>' AS c, E'$bs' AS d, '$bs' AS e,"
                             " 1 AS \"col $s\"", results)
    assert row == {"a": "Tasks: 3", "b": True, "c": "<it's>", "d": "a\\b", "e": "a\\b",
                   "col it's": 1}


async def test_comments_with_references(aconn: psycopg.AsyncConnection[Any]) -> None:
    results = {"evil": one("x\nSELECT 2 /* */ */ --")}
    out = await run_sql(aconn, "SELECT 1 AS one -- note: $evil\n, 2 AS two /* $evil */", results)
    assert out["rows"] == [{"one": 1, "two": 2}]


async def test_standard_conforming_strings_off(aconn: psycopg.AsyncConnection[Any]) -> None:
    await aconn.execute("SET standard_conforming_strings = off")
    value = "a\\'; SELECT 1; --"
    row = await first(aconn, "SELECT '$v' AS a, $v AS b", {"v": one(value)})
    assert row == {"a": value, "b": value}


# -- statements that take no parameters --------------------------------------------------------

async def test_utility_statements_get_quoted_literals(aconn: psycopg.AsyncConnection[Any]) -> None:
    results = {"s": one("it's \\ $$ fine"), "n": one(-4), "b": one(True),
               "o": one({"a": [1, "x'y"]}), "name": one("app'x")}
    await run_sql(aconn, "CREATE TABLE util_t (s text DEFAULT $s, n int DEFAULT $n,"
                         " b bool DEFAULT $b, o jsonb DEFAULT $o, z text DEFAULT $none?)",
                  {**results, "none": rows()})
    await aconn.execute("INSERT INTO util_t DEFAULT VALUES")
    row = await first(aconn, "SELECT * FROM util_t")
    assert row == {"s": "it's \\ $$ fine", "n": -4, "b": True, "o": {"a": [1, "x'y"]},
                   "z": None}
    await run_sql(aconn, "COMMENT ON TABLE util_t IS $s", results)
    row = await first(aconn, "SELECT obj_description('util_t'::regclass) AS c")
    assert row["c"] == "it's \\ $$ fine"
    await run_sql(aconn, "SET application_name = $name", results)
    assert (await first(aconn, "SHOW application_name"))["application_name"] == "app'x"


async def test_do_blocks_take_values_as_literals(aconn: psycopg.AsyncConnection[Any]) -> None:
    await aconn.execute("CREATE TABLE do_t (v text, n int)")
    value = "$$; DROP TABLE do_t; --'"
    await run_sql(aconn, "DO $$ BEGIN INSERT INTO do_t VALUES ($v, $n);"
                         " RAISE NOTICE 'inserted $n'; END $$",
                  {"v": one(value), "n": one(7)})
    assert await run_sql(aconn, "SELECT v, n FROM do_t", {}) == {
        "rows": [{"v": value, "n": 7}], "row_count": 1}


# -- statements and errors ----------------------------------------------------------------------

@pytest.mark.parametrize("query", ["SELECT 1; SELECT 2", "SELECT $total; SELECT 2",
                                   "CREATE TABLE m1 (a int); CREATE TABLE m2 (a int)"])
async def test_multiple_statements_fail(aconn: psycopg.AsyncConnection[Any], query: str) -> None:
    error = await fails(aconn, query, RESULTS)
    assert str(error) == ("SQL execution failed: cannot insert multiple commands into a"
                          " prepared statement")
    assert error.sqlstate == "42601"


async def test_database_errors(aconn: psycopg.AsyncConnection[Any]) -> None:
    error = await fails(aconn, "SELECT 1/0")
    assert str(error) == "SQL execution failed: division by zero"
    assert error.sqlstate == "22012" and not error.retryable
    error = await fails(aconn, "SELECT * FROM no_such_table")
    assert str(error) == 'SQL execution failed: relation "no_such_table" does not exist'


async def test_query_canceled_propagates(aconn: psycopg.AsyncConnection[Any]) -> None:
    await aconn.execute("SET statement_timeout = '50ms'")
    with pytest.raises(psycopg.errors.QueryCanceled):
        await run_sql(aconn, "SELECT pg_sleep(5)", {})
    with pytest.raises(psycopg.errors.QueryCanceled):      # also on the pipelined path
        async with aconn.transaction():
            await run_sql(aconn, "SELECT pg_sleep(5), $s::text", {"s": one("x")})


async def test_runs_in_the_callers_transaction_without_committing(module_dsn: str) -> None:
    async with await psycopg.AsyncConnection.connect(module_dsn) as conn:
        await conn.execute("CREATE TABLE IF NOT EXISTS tx_t (v text)")
        await conn.commit()
        await run_sql(conn, "INSERT INTO tx_t VALUES ($s)", {"s": one("x")})
        assert conn.info.transaction_status == psycopg.pq.TransactionStatus.INTRANS
        await conn.rollback()
        assert (await first(conn, "SELECT count(*) AS n FROM tx_t"))["n"] == 0


async def test_connection_adapters_do_not_change_results(module_dsn: str) -> None:
    async with await psycopg.AsyncConnection.connect(module_dsn, autocommit=True) as conn:
        conn.adapters.register_loader("numeric", FloatLoader)
        set_json_loads(lambda _: "hijacked", conn)
        row = await first(conn, "SELECT 1.50::numeric AS n, '{}'::jsonb AS j")
        assert row == {"n": "1.50", "j": {}}
        cur = await conn.execute("SELECT 1.50::numeric")
        assert await cur.fetchone() == (1.5,)                 # the connection keeps its own


# -- values never become SQL ----------------------------------------------------------------------

INJECTIONS = [
    "'); DROP TABLE canary; --",
    "1; DELETE FROM canary",
    "$$; DROP TABLE canary; --",
    "$da_1$; DROP TABLE canary; --",
    "*/ DROP TABLE canary; /*",
    "\\'; DROP TABLE canary; --",
    "\nDROP TABLE canary; --",
    "\rDELETE FROM canary; --",
    "\"; DROP TABLE canary; --",
    "'||(SELECT count(*) FROM pg_class)||'",
]

def same(value: str) -> str:
    return value


# (template, what column v must hold, or None when the value only must not run)
TEMPLATES: list[tuple[str, Callable[[str], Any] | None]] = [
    ("SELECT $v AS v", same),
    ("SELECT $v.v AS v", same),
    ("SELECT v FROM $rs.*", same),
    ("SELECT '$v' AS v", same),
    ("SELECT E'$v' AS v", same),
    ("SELECT U&'$v' AS v", same),
    ("SELECT 'x'\n'$v' AS v", lambda v: "x" + v),
    ("SELECT $q$$v$q$ AS v", quote_literal),           # pg_durable's text: a quoted literal
    ("SELECT 1 AS v -- $v", lambda v: 1),
    ("SELECT 1 AS v /* $v */", lambda v: 1),
    ("SELECT 1 AS v, 2 AS \"$v\"", lambda v: 1),
    ("SELECT concat($v, '') AS v", same),
]


@pytest.fixture
async def canary(aconn: psycopg.AsyncConnection[Any]) -> AsyncIterator[None]:
    await aconn.execute("DROP TABLE IF EXISTS canary")
    await aconn.execute("CREATE TABLE canary (id int)")
    await aconn.execute("INSERT INTO canary VALUES (1), (2)")
    yield
    cur = await aconn.execute("SELECT count(*) FROM canary")
    assert await cur.fetchone() == (2,)


async def _through(conn: psycopg.AsyncConnection[Any], template: str,
                   expect: Callable[[str], Any] | None, value: str) -> None:
    results = {"v": one(value), "rs": rows({"v": value})}
    out = await run_sql(conn, template, results)
    if expect is not None:
        assert out["rows"][0]["v"] == expect(value), (template, value, out)


@pytest.mark.usefixtures("canary")
@pytest.mark.parametrize("value", INJECTIONS)
async def test_values_holding_sql_are_never_executed(aconn: psycopg.AsyncConnection[Any],
                                                     value: str) -> None:
    for template, expect in TEMPLATES:
        await _through(aconn, template, expect, value)
    # and statements that take literals
    await run_sql(aconn, "COMMENT ON TABLE canary IS $v", {"v": one(value)})
    assert (await first(aconn, "SELECT obj_description('canary'::regclass) AS c"))["c"] == value
    await run_sql(aconn, "DO $$ BEGIN PERFORM set_config('da.test', $v, false); END $$",
                  {"v": one(value)})
    assert (await first(aconn, "SELECT current_setting('da.test') AS c"))["c"] == value
    await run_sql(aconn, "DO $body$ BEGIN EXECUTE $i$ SELECT set_config('da.t2', $v, false)"
                         " $i$; END $body$", {"v": one(value)})
    assert (await first(aconn, "SELECT current_setting('da.t2') AS c"))["c"] == value


@pytest.mark.usefixtures("canary")
async def test_random_values_are_never_executed(aconn: psycopg.AsyncConnection[Any]) -> None:
    pieces = ["'", '"', "\\", "$", "$$", "$q$", "--", "/*", "*/", ";", "\n", "\r", " ", "a",
              "é", "E'", "U&'", "DROP TABLE canary", "DELETE FROM canary", ")", "(", "?", ".*",
              "''", "\\'", "$v", "{}", "%s", "\t"]
    rnd = random.Random(7)
    for _ in range(150):
        value = "".join(rnd.choice(pieces) for _ in range(rnd.randint(1, 10)))
        for template, expect in TEMPLATES:
            await _through(aconn, template, expect, value)


async def test_a_positional_parameter_of_the_step_itself_fails_the_step(
        aconn: psycopg.AsyncConnection[Any]) -> None:
    err = await fails(aconn, "SELECT $1")
    assert str(err).startswith("SQL execution failed:") and err.sqlstate == "08P01"
    assert (await first(aconn, "SELECT 1 AS v")) == {"v": 1}   # the connection is fine
