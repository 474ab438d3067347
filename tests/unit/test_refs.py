"""References without a database: {var}, $name matching, truthiness, break values, HTTP
rendering and how SQL text is bound (parameters, spliced literals, literal fallback)."""

from __future__ import annotations

import contextlib
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from durable_actor import refs
from durable_actor.errors import StepError
from durable_actor.refs import BoundSql, Param, bind_sql, leading_keyword


def rows(*records: dict[str, Any]) -> dict[str, Any]:
    return {"rows": list(records), "row_count": len(records)}


def one(value: Any, col: str = "v") -> dict[str, Any]:
    return rows({col: value})


EMPTY = rows()
HTTP = {"status": 200, "body": '{"id": 7}', "encoding": "text", "headers": {"a": "b"},
        "ok": True, "duration_ms": 5}


# -- {var} -------------------------------------------------------------------------------------

def expand(text: str, label: str | None = "lbl", **vars: str) -> str:
    return refs.expand_vars(text, vars, instance_id="abcd0001", label=label)


@pytest.mark.parametrize(("text", "expected"), [
    ("SELECT '{a}'", "SELECT 'x'"),
    ("{a}{a}-{b}", "xx-{b}"),                                  # unknown stays verbatim
    ("{sys_instance_id}/{sys_label}", "abcd0001/lbl"),
    ("{a b} {1a} {} {a-b}", "{a b} {1a} {} {a-b}"),           # identifier names only
    ("{nested}", "{a}"),                                       # values are not rescanned
    ("{a{a}", "{a{a}"),                                        # name runs to the first }
    ("{a", "{a"),
    ("}{a}{", "}x{"),
    ('{"a": 1}', '{"a": 1}'),                                  # JSON is not a variable
    ("{A}", "{A}"),                                            # names are case-sensitive
])
def test_expand_vars(text: str, expected: str) -> None:
    assert expand(text, a="x", nested="{a}") == expected


def test_sys_label_is_empty_without_a_label() -> None:
    assert expand("[{sys_label}]", label=None) == "[]"


def test_sys_names_win_over_user_variables() -> None:
    assert expand("{sys_instance_id}", sys_instance_id="mine") == "abcd0001"


@given(st.text(alphabet="{}ab $'x_1"), st.dictionaries(
    st.from_regex(r"[a-z_][a-z0-9_]{0,3}", fullmatch=True), st.text(max_size=5), max_size=3))
def test_expand_vars_only_touches_known_braced_names(text: str, vars: dict[str, str]) -> None:
    out = refs.expand_vars(text, vars, instance_id="i", label=None)
    if not vars and "{sys_" not in text:
        assert out == text
    # The same pass with the braces of known names removed from the text changes nothing.
    assert refs.expand_vars(out.replace("{", "").replace("}", ""), vars,
                            instance_id="i", label=None) == out.replace("{", "").replace("}", "")


# -- matching rules -------------------------------------------------------------------------

NAMES = {"a": 1, "ab": 2, "row": 3, "r": 4}


@pytest.mark.parametrize(("text", "expected"), [
    ("SELECT $a, $ab", ["a", "ab"]),
    ("$ab $a $ab", ["ab", "a"]),                       # first appearance, once
    ("$abc", []),                                      # followed by an identifier char
    ("$a1 $a_", []),
    ("$a.col $ab? $row.x? $r.*", ["a", "ab", "row", "r"]),
    ("$a.", ["a"]),
    ("$1 $$ $x $ $", []),                              # $1, $$, unbound word, bare $
    ("$a$ body $a$", []),                              # a dollar-quote tag is not a reference
    ("$a$b", []),                                      # ... and its closing $ is not a start
    ("$$a", ["a"]),
    ("x$a", ["a"]),                                    # textual: after a letter too
    ("'$a' -- $ab", ["a", "ab"]),                      # inside literals and comments too
])
def test_referenced_names(text: str, expected: list[str]) -> None:
    assert refs.referenced_names(text, NAMES) == expected


@given(st.text(alphabet="$ab.*?x1_'\" \n-/"))
def test_bind_sql_never_binds_a_name_referenced_names_missed(text: str) -> None:
    names = {"a": one(1), "ab": one("s"), "x": rows({"c": 1}, {"c": 2})}
    listed = set(refs.referenced_names(text, names))
    with contextlib.suppress(StepError):
        bind_sql(text, {n: names[n] for n in listed})
    for name in set(names) - listed:
        results = {name: names[name]}
        assert bind_sql(text, results) == BoundSql(text)


# -- truthiness (SPEC §4) -------------------------------------------------------------------

@pytest.mark.parametrize(("value", "expected"), [
    (EMPTY, False), (one(True), True), (one(False), False), (one(None), False),
    (one(0), False), (one(1), True), (one(-2), True), (one(0.0), False), (one(0.5), True),
    (one("0.00"), False), (one("0"), False), (one("-0"), False), (one("0e5"), False),
    (one("NaN"), True), (one("nan"), True), (one("inf"), True), (one("1e400"), True),
    (one(""), False), (one("   "), False), (one(" FALSE "), False), (one("f"), False),
    (one("No"), False), (one("TRUE"), True), (one("t"), True), (one(" yes"), True),
    (one("maybe"), True), (one("1_000"), True), (one("0x0"), True), (one("."), True),
    (one([]), False), (one([0]), True), (one({}), False), (one({"a": 0}), True),
    (rows({"a": 0, "b": 1}), False),                       # first column of the first row
    (rows({"a": 1}, {"a": 0}), True),                      # of the first row only
    ({"rows": [{}], "row_count": 1}, True),                # no column: the whole result
    (True, True), (False, False), (None, False), (0, False), (3, True), ("", False),
    ("0", False), ("x", True), ([], False), ([1], True),
    ({"slept": True, "seconds": 1}, True), ({}, False),
])
def test_truthiness(value: Any, expected: bool) -> None:
    assert refs.truthy(value) is expected


# -- break values (SPEC §7) ------------------------------------------------------------------

@pytest.mark.parametrize(("raw", "expected"), [
    (None, None), ("done", "done"), ('"done"', "done"), ("42", 42), ("1.5", 1.5),
    ('{"a": 1}', {"a": 1}), ("[1, 2]", [1, 2]), ("true", True), ("null", None),
    (" 7 ", 7), ("", ""), ("{bad", "{bad"), ("NaN", "NaN"),
])
def test_break_value(raw: str | None, expected: Any) -> None:
    assert refs.break_value(raw) == expected


# -- HTTP contexts (raw insertion) ---------------------------------------------------------

RESULTS: dict[str, Any] = {
    "s": one("it's \"raw\""), "n": one(5), "f": one(1.5), "b": one(False),
    "o": one({"k": [1, "x"]}), "nul": one(None), "none": EMPTY,
    "set": rows({"id": 1, "v": "a"}, {"id": 2, "v": None}), "r": HTTP,
    "join": [one(1), {"slept": True}], "brk": "done", "sig": {"signal_name": "go",
                                                              "timed_out": False,
                                                              "data": {"x": 1}},
}


@pytest.mark.parametrize(("text", "expected"), [
    ("id=$s&n=$n", "id=it's \"raw\"&n=5"),                 # strings unquoted, not escaped
    ("$f $b $o", '1.5 false {"k":[1,"x"]}'),
    ("$set.*", '[{"id":1,"v":"a"},{"id":2,"v":null}]'),
    ("$set.v/$set.id", "a/1"),
    ("$r.status $r.ok $r.body", '200 true {"id": 7}'),
    ("$sig.data $sig.timed_out", '{"x":1} false'),
    ("$join", '[{"rows":[{"v":1}],"row_count":1},{"slept":true}]'),   # whole JSON text
    ("$brk", '"done"'),
    ("$none? $nul? $set.zz?", "NULL NULL $set.zz?"),
    ("$1 $$ $x $s$", "$1 $$ $x $s$"),
])
def test_render_http(text: str, expected: str) -> None:
    assert refs.render_http(text, RESULTS) == expected


@pytest.mark.parametrize(("text", "message"), [
    ("$none", "$none has no rows — query returned zero results"),
    ("$none.x", "$none has no rows"),
    ("$nul", "$nul is NULL — first column of first row is NULL"),
    ("$set.v", None),
    ("$r.missing", "$r.missing: result has no field 'missing' (available: body, duration_ms, "
                   "encoding, headers, ok, status)"),
    ("$set.zz", "result has no field 'zz'"),
    ("$brk.x", "$brk.x: result is neither a row set nor a JSON object"),
    ("$r.*", "$r.* — invalid result format"),
])
def test_render_http_failures(text: str, message: str | None) -> None:
    if message is None:                                    # first row only: "a", no failure
        assert refs.render_http(text, RESULTS) == "a"
        return
    with pytest.raises(StepError) as info:
        refs.render_http(text, RESULTS)
    assert message in str(info.value)


def test_null_column_fails_with_its_name() -> None:
    with pytest.raises(StepError, match=r"^\$set\.v is NULL$"):
        refs.render_http("$set.v", {"set": rows({"v": None})})


def test_row_sets_are_capped() -> None:
    big = rows(*({"i": i} for i in range(refs.MAX_ROWSET_ROWS + 1)))
    with pytest.raises(StepError, match="10001 rows, exceeding the maximum of 10000"):
        refs.render_http("$big.*", {"big": big})
    with pytest.raises(StepError, match="exceeding the maximum"):
        bind_sql("SELECT * FROM $big.*", {"big": big})


# -- SQL: parameters ------------------------------------------------------------------------

def test_references_in_code_become_typed_parameters() -> None:
    bound = bind_sql("SELECT $n * 2, $s, $b, $f, $o, $big, $huge, $r.status, $brk",
                     {**RESULTS, "big": one(2**40), "huge": one(2**70)})
    assert bound.query == "SELECT $1 * 2, $2, $3, $4, $5, $6, $7, $8, $9"
    assert bound.params == (
        Param("int4", "5"), Param("unknown", "it's \"raw\""), Param("bool", "false"),
        Param("numeric", "1.5"), Param("unknown", '{"k":[1,"x"]}'),
        Param("int8", str(2**40)), Param("numeric", str(2**70)), Param("int4", "200"),
        Param("unknown", '"done"'))
    assert not bound.literals


def test_every_occurrence_is_its_own_parameter() -> None:
    # One parameter per occurrence: `$t::timestamptz > now(), $t` keeps the second a string.
    bound = bind_sql("SELECT $s::int, $s", RESULTS)
    assert bound.query == "SELECT $1::int, $2"
    assert len(bound.params) == 2


def test_null_safe_references_are_the_constant_null() -> None:
    bound = bind_sql("SELECT $none?, $nul?, $set.zz?, $none.v?", RESULTS)
    assert bound == BoundSql("SELECT NULL, NULL, $set.zz?, NULL")


def test_a_missing_column_stays_verbatim() -> None:
    assert bind_sql("SELECT $set.nope FROM t", RESULTS) == BoundSql("SELECT $set.nope FROM t")


@pytest.mark.parametrize(("text", "message"), [
    ("SELECT $none", "$none has no rows — query returned zero results"),
    ("SELECT $nul", "$nul is NULL — first column of first row is NULL"),
    ("SELECT $set.v FROM t WHERE $nul.v IS NULL", "$nul.v is NULL"),
    ("SELECT * FROM $brk.*", "$brk.* — invalid result format"),
    ("SELECT $join.x", "neither a row set nor a JSON object"),
])
def test_reference_failures(text: str, message: str) -> None:
    with pytest.raises(StepError) as info:
        bind_sql(text, RESULTS)
    assert message in str(info.value)


def test_row_set_becomes_one_jsonb_parameter_with_the_alias_and_columns() -> None:
    data = rows({"id": 1, "name": "a", "price": 1.5, "ok": True, "meta": {"x": 1},
                 "mixed": 1, "empty": None, "big": 2**70},
                {"id": 2, "name": None, "price": 2, "ok": False, "meta": [1],
                 "mixed": "x", "empty": None, "big": 1, "late": "z"})
    bound = bind_sql("SELECT count(*) FROM $data.* WHERE data.ok", {"data": data})
    assert bound.query == (
        'SELECT count(*) FROM jsonb_to_recordset($1::jsonb) AS "data"("id" bigint, '
        '"name" text, "price" numeric, "ok" boolean, "meta" jsonb, "mixed" jsonb, '
        '"empty" text, "big" numeric, "late" text) WHERE data.ok')
    assert bound.params[0].type == "jsonb"
    assert refs.break_value(bound.params[0].value) == data["rows"]


def test_empty_row_set_is_pg_durables_empty_relation() -> None:
    bound = bind_sql("SELECT count(*) FROM $none.*", RESULTS)
    assert bound == BoundSql('SELECT count(*) FROM (SELECT NULL WHERE false) AS "none"')


def test_quoted_column_names_and_aliases() -> None:
    bound = bind_sql("SELECT * FROM $q.*", {"q": rows({'we"ird': 1, "?column?": "x"})})
    assert '("we""ird" bigint, "?column?" text)' in bound.query


# -- SQL: values spliced where a parameter cannot go ------------------------------------------

@pytest.mark.parametrize(("text", "expected"), [
    ("SELECT 'Tasks: $n'", "SELECT 'Tasks: 5'"),
    ("SELECT interval '$n seconds'", "SELECT interval '5 seconds'"),
    ("SELECT '$s'", "SELECT 'it''s \"raw\"'"),
    ("SELECT '$o|$b|$none?'", "SELECT '{\"k\":[1,\"x\"]}|false|NULL'"),
    ("SELECT E'$bs'", "SELECT E'a\\\\''b'"),
    ("SELECT e'\\$n'", "SELECT e'\\$n'"),                       # \$ is an escape, not a ref
    ("SELECT U&'$bs'", "SELECT U&'a\\\\''b'"),
    ("SELECT U&'$bs!' UESCAPE '!'", "SELECT U&'a\\''b!' UESCAPE '!'"),
    ("SELECT N'$s'", "SELECT N'it''s \"raw\"'"),
    ("SELECT B'$n'", "SELECT B'5'"),
    ("SELECT 1 AS \"$s\"", "SELECT 1 AS \"it's \"\"raw\"\"\""),
    ("SELECT 1 -- $ml\nFROM t", "SELECT 1 -- a b\nFROM t"),
    ("SELECT 1 /* $cm */", "SELECT 1 /*  * / DROP / *  */"),
    ("SELECT 1 /* a /* $n */ $n */, $n", "SELECT 1 /* a /*  5  */  5  */, $1"),
    ("SELECT 'a'\n'$bs'", "SELECT 'a'\n'a\\''b'"),               # continuation: plain quoting
    ("SELECT E'a'\n'$bs'", "SELECT E'a'\n'a\\\\''b'"),           # continuation keeps E''
    ("SELECT E'a' -- c\n'$bs'", "SELECT E'a' -- c\n'a\\\\''b'"),
    ("SELECT date'$s'", "SELECT date'it''s \"raw\"'"),          # `date` is no E prefix
])
def test_splicing_inside_literals_identifiers_and_comments(text: str, expected: str) -> None:
    results = {**RESULTS, "bs": one("a\\'b"), "ml": one("a\nb"), "cm": one("*/ DROP /*")}
    bound = bind_sql(text, results)
    assert bound.query == expected


def test_quote_in_a_bit_string_fails() -> None:
    with pytest.raises(StepError, match="bit-string literal"):
        bind_sql("SELECT X'$s'", RESULTS)


def test_standard_conforming_strings_off_escapes_backslashes() -> None:
    results = {"bs": one("a\\'b")}
    assert bind_sql("SELECT '$bs'", results, standard_conforming_strings=False).query == (
        "SELECT 'a\\\\''b'")


def test_nested_comment_delimiter_is_not_taken_by_a_row_set() -> None:
    text = "SELECT 1 /* x /* $set.*/ y */"
    assert bind_sql(text, RESULTS) == BoundSql(text)


# -- SQL: dollar-quoted bodies ----------------------------------------------------------------

def test_dollar_body_gets_quoted_literals() -> None:
    bound = bind_sql("DO $$BEGIN PERFORM $s, $n, '$n'; END$$", RESULTS)
    assert bound.query == "DO $$BEGIN PERFORM 'it''s \"raw\"', 5, '5'; END$$"
    assert bound.literals and bound.params == ()


def test_dollar_body_in_a_parameterised_statement_still_gets_literals() -> None:
    bound = bind_sql("SELECT $n, $f$ $n $f$", RESULTS)
    assert bound.query == "SELECT $1, $f$ 5 $f$"


@pytest.mark.parametrize("value", ["x $$ y", "$$", "x$$; DROP TABLE t; --$$"])
def test_a_value_cannot_close_its_dollar_quote(value: str) -> None:
    bound = bind_sql("DO $$BEGIN RAISE NOTICE '%', $v; END$$", {"v": one(value)})
    assert bound.query.startswith("DO $da_1$BEGIN RAISE NOTICE '%', ")
    assert bound.query.endswith("; END$da_1$")
    assert bound.query.count("$da_1$") == 2


def test_nested_dollar_quotes_are_retagged_inside_out() -> None:
    text = "DO $o$ BEGIN EXECUTE $i$ SELECT $v $i$; END $o$"
    bound = bind_sql(text, {"v": one("$i$ $o$ $da_1$")})
    assert bound.query == ("DO $da_3$ BEGIN EXECUTE $da_2$ SELECT '$i$ $o$ $da_1$' $da_2$; "
                           "END $da_3$")


# -- SQL: statements that take no parameters --------------------------------------------------

@pytest.mark.parametrize(("text", "expected"), [
    ("CREATE TABLE t (a text DEFAULT $s, b int DEFAULT $n, c bool DEFAULT $b)",
     "CREATE TABLE t (a text DEFAULT 'it''s \"raw\"', b int DEFAULT 5, c bool DEFAULT false)"),
    ("SET application_name = $bs", "SET application_name = E'a\\\\''b'"),
    ("COMMENT ON TABLE t IS $o", "COMMENT ON TABLE t IS '{\"k\":[1,\"x\"]}'"),
    ("ALTER TABLE t ALTER a SET DEFAULT $none?", "ALTER TABLE t ALTER a SET DEFAULT NULL"),
    ("SET x = 10-$neg", "SET x = 10- -3"),                      # never `--`
    ("CREATE TABLE c AS SELECT * FROM $set.*",
     "CREATE TABLE c AS SELECT * FROM (VALUES ('1'::bigint, 'a'::text), ('2'::bigint, "
     "NULL::text)) AS \"set\"(\"id\", \"v\")"),
    ("CREATE TABLE c AS SELECT * FROM $none.*",
     'CREATE TABLE c AS SELECT * FROM (SELECT NULL WHERE false) AS "none"'),
    ("SELECT $1, $n", "SELECT $1, 5"),                          # uses its own $1: literals
])
def test_literal_fallback(text: str, expected: str) -> None:
    results = {**RESULTS, "bs": one("a\\'b"), "neg": one(-3)}
    bound = bind_sql(text, results)
    assert bound == BoundSql(expected, literals=True)


def test_references_are_never_glued_to_what_follows() -> None:
    assert bind_sql("SELECT $n?5", RESULTS).query == "SELECT $1 5"
    assert bind_sql("SELECT $n?'x'", RESULTS, parameters=False).query == "SELECT 5 'x'"
    assert bind_sql("SELECT -$neg", {"neg": one(-3)}, parameters=False).query == "SELECT - -3"


def test_typed_literal_syntax_gets_a_quoted_literal() -> None:
    bound = bind_sql("SELECT timestamptz $s, DATE  $s, $s, pg_catalog.date $s, mydate $s",
                     RESULTS)
    assert bound.query == ("SELECT timestamptz 'it''s \"raw\"', DATE  'it''s \"raw\"', $1,"
                           " pg_catalog.date 'it''s \"raw\"', mydate $2")


def test_identifier_with_dollar_is_not_a_reference() -> None:
    assert bind_sql("SELECT a$n, $n", RESULTS).query == "SELECT a$n, $1"


def test_nothing_to_bind_returns_the_text() -> None:
    text = "SELECT '$x', $1 -- $y"
    assert bind_sql(text, {}) == BoundSql(text)
    assert bind_sql(text, {"z": one(1)}) == BoundSql(text)


@pytest.mark.parametrize(("text", "keyword"), [
    ("select 1", "SELECT"), ("  -- c\n /* a /* b */ */ (WITH x AS (SELECT 1) SELECT 1)", "WITH"),
    ("\n\tinsert into t", "INSERT"), ("CREATE TABLE t ()", "CREATE"), ("", ""),
    ("/* unterminated", ""), ("42", ""),
])
def test_leading_keyword(text: str, keyword: str) -> None:
    assert leading_keyword(text) == keyword


def test_with_text_retypes_one_parameter() -> None:
    bound = bind_sql("SELECT $s, $s", RESULTS).with_text(1)
    assert [p.type for p in bound.params] == ["unknown", "text"]


# -- properties -------------------------------------------------------------------------------

def _unquote(literal: str) -> str:
    """Read back a literal made by quote_literal."""
    if literal.startswith("E'"):
        body = literal[2:-1].replace("''", "'")
        return body.replace("\\\\", "\\")
    assert literal[0] == literal[-1] == "'"
    return literal[1:-1].replace("''", "'")


@given(st.text())
def test_quote_literal_round_trips(text: str) -> None:
    literal = refs.quote_literal(text)
    assert _unquote(literal) == text
    inner = literal[2:-1] if literal.startswith("E'") else literal[1:-1]
    assert "'" not in inner.replace("''", "")              # no lone quote can end it early


DANGEROUS = st.lists(st.sampled_from(
    ["'", '"', "\\", "$", "$$", "--", "/*", "*/", ";", "\n", "\r", " ", "a", "é",
     "DROP TABLE t", "$t$", "E'", ")", "(", "?", ".*"]), max_size=12).map("".join)


@given(DANGEROUS)
def test_values_in_code_never_reach_the_text(value: str) -> None:
    bound = bind_sql("SELECT $v, $v.v, $w WHERE x = $v", {"v": one(value), "w": one(value)})
    assert bound.query == "SELECT $1, $2, $3 WHERE x = $4"
    assert all(p.value == value for p in bound.params)


@given(DANGEROUS)
def test_literal_mode_quotes_every_value(value: str) -> None:
    bound = bind_sql("SET application_name = $v", {"v": one(value)})
    assert bound.literals
    literal = bound.query.removeprefix("SET application_name = ")
    assert _unquote(literal) == value


def _after_construct(text: str, start: int) -> str:
    """What follows the quoted literal, identifier, comment or dollar quote at `start`."""
    lexer = refs._Lexer(text, {}, True)
    level = refs._Level(start, len(text), 0, run=start)
    at = start + 1 if text.startswith("E'", start) else start
    return text[lexer._token(level, at):]


@given(DANGEROUS, st.sampled_from(["'{}'", "E'{}'", '"{}"', "-- {}\n", "/* {} */", "$q${}$q$",
                                   "$q$ '{}' $q$", "$q$ -- {}\n$q$"]))
def test_spliced_text_cannot_end_its_construct(value: str, template: str) -> None:
    text = "SELECT " + template.format("$v") + " AS x"
    bound = bind_sql(text, {"v": one(value)})
    assert _after_construct(bound.query, 7) == _after_construct(text, 7)
