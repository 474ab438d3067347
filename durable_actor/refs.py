"""References to earlier results: ``{var}`` and ``$name`` substitution, truthiness, break values.

Pure: no I/O, no psycopg. The engine calls `expand_vars`, `referenced_names`, `render_http`,
`truthy` and `break_value`; the SQL step calls `bind_sql` and hands the result to the driver.

Reference grammar (SPEC §2)
---------------------------
``$name`` (first column of the first row), ``$name.col`` (that column; on a result that is not a
row set, that top-level field), ``$name?`` / ``$name.col?`` (null-safe: no rows or NULL give SQL
NULL) and ``$name.*`` (the rows as a relation). ``name`` and ``col`` are ASCII identifiers
(``[A-Za-z_][A-Za-z0-9_]*``). Only names bound in this run are references; the name is the whole
identifier run after ``$``, which is what pg_durable's "longest name first, a bare ``$name`` must
not be followed by an identifier character" amounts to. ``$1``, ``$$`` and unbound words stay as
they are, and so does any ``$ident$`` — a dollar-quote tag is never a reference, even when
``ident`` is a bound name (pg_durable replaces those; we do not).

Binding (SQL steps): a value never becomes SQL
----------------------------------------------
pg_durable splices values into the statement text. We lex the statement the way PostgreSQL's
scanner does (quotes, E'' / U&'' / B'' / X'' strings and their continuation lines, quoted
identifiers, nested block comments, line comments, dollar quotes, and the
``standard_conforming_strings`` setting) and treat each reference by where it stands:

* **In code at the top level** it becomes a bind parameter, one per occurrence, sent as
  ``$N``. Types reproduce what pg_durable's spliced literals would have been: a JSON string or
  an object/array (as JSON text) is an *unknown*-typed parameter, so it coerces in context like
  a quoted literal (``WHERE ts > $t``, ``$n::numeric``, ``($r.body)::jsonb``); an integer is
  int4 (int8, then numeric, when it does not fit), so ``$total * 2`` stays an integer; a
  fraction is numeric; a boolean is bool, so ``SELECT $flag`` comes back a JSON boolean; a
  null-safe miss is the constant ``NULL``, as pg_durable writes it. PostgreSQL cannot infer a
  type for an unknown parameter where it would have kept a literal's ``unknown`` type
  (``concat($x, …)``, ``jsonb_build_object('k', $x)``, ``$x IS NULL``): the server answers
  42P18 and the SQL step retries with that parameter typed ``text`` (`BoundSql.with_text`),
  which is what such a literal resolves to. ``$name.*`` becomes one jsonb parameter expanded as
  ``jsonb_to_recordset($N::jsonb) AS "name"("col" type, …)`` — the alias and column names that
  pg_durable's ``(VALUES …) AS "name"(…)`` gives, column types inferred from the values (bigint,
  numeric, boolean, text, jsonb for objects/arrays or mixed kinds, text when all NULL); no rows
  give pg_durable's ``(SELECT NULL WHERE false) AS "name"``; more than 10,000 rows fail.
* **Right after a built-in type name** (``timestamptz $t``, ``date $d``: PostgreSQL's
  typed-literal syntax, which takes a quoted string and no parameter) it is written as a
  correctly quoted literal, as in a statement without parameters (below). A parameter is a
  value, never syntax: ``ORDER BY $n`` orders by that value, not by the n-th column as
  pg_durable's splice would.
* **Inside a quoted literal or identifier** (``'Tasks: $count'``, ``interval '$n seconds'``) a
  parameter is impossible, so the value's text is spliced *inside* the quotes, escaped for that
  kind of literal (quotes doubled; backslashes too in E'' strings; the escape character in U&''
  strings). Bit-string literals cannot hold a quote: such a value fails the step. Text there is
  data of this statement; if the statement later executes that string as SQL, that is its own
  dynamic SQL.
* **Inside a comment** the text is spliced with line breaks (line comments) or comment
  delimiters (block comments) defused, so it cannot end the comment.
* **Inside a dollar-quoted body** (``DO $$ … $$``, function bodies) the body is lexed as SQL in
  turn; a value in the body's code becomes a correctly quoted literal there (the text
  pg_durable would have spliced), in the body's own quotes it is escaped text as above. If the
  finished body then contains its own closing delimiter, the body is re-tagged with a fresh tag,
  so no value can end a dollar quote, at any depth.
* **Statements that cannot take parameters** take correctly quoted, typed literals in code
  instead: strings ``'…'`` (``E'…'`` with doubled backslashes when needed), numbers bare (a space
  keeps a negative number from forming ``--``), booleans bare, objects as quoted JSON, NULL, and
  ``$name.*`` as ``(VALUES ('…'::type, …), …) AS "name"("col", …)``. We decide by the
  statement's leading keyword: SELECT, INSERT, UPDATE, DELETE, MERGE, VALUES, TABLE, WITH,
  EXPLAIN, CALL and DECLARE take parameters; everything else (DDL such as ``CREATE TABLE …
  DEFAULT $x``, SET, DO, COPY, PREPARE, VACUUM …) gets literals. A leading keyword is exact and
  free; asking the server would cost a failed round trip and a savepoint per statement. A
  statement that uses its own ``$1`` in code also gets literals, so it behaves (and fails) as it
  does in pg_durable instead of reading our parameters.

Deviations from pg_durable, all in the direction of safety: ``$ident$`` tags are never
replaced; in code a ``$`` right after an identifier character belongs to that identifier
(``a$b``), as PostgreSQL lexes it; ``\\$name`` inside an E'' string is an escape, not a
reference; strings inside quoted literals arrive unquoted (pg_durable's splice breaks there).

HTTP contexts and break values (`render_http`) are plain text: values are inserted raw.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any, Literal

import orjson

from durable_actor.errors import StepError

MAX_ROWSET_ROWS = 10_000

ParamType = Literal["unknown", "text", "int4", "int8", "numeric", "bool", "jsonb"]

# A reference: $name, then `$` (a dollar-quote tag, never a reference), `.*`, `.col[?]` or `?`.
_REF_RE = re.compile(
    r"\$([A-Za-z_][A-Za-z0-9_]*)(?:(\$)|(\.\*)|\.([A-Za-z_][A-Za-z0-9_]*)(\?)?|(\?))?")
_IDENT_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_INT4 = (-(2**31), 2**31 - 1)
_INT8 = (-(2**63), 2**63 - 1)


# --------------------------------------------------------------------------------------
# {var}
# --------------------------------------------------------------------------------------

def expand_vars(text: str, vars: Mapping[str, str], *, instance_id: str,
                label: str | None) -> str:
    """Replace ``{name}`` with the variable's raw text, in one left-to-right pass (SPEC §3).

    Args:
        text: SQL text or an HTTP url/body/header value.
        vars: the instance's variable snapshot.
        instance_id: the value of ``{sys_instance_id}``.
        label: the value of ``{sys_label}`` ('' when None).

    Returns:
        The text with every known ``{identifier}`` replaced; inserted values are not rescanned
        and an unknown or malformed ``{…}`` stays verbatim.
    """
    out: list[str] = []
    rest = text
    while (open_ := rest.find("{")) != -1:
        out.append(rest[:open_])
        after = rest[open_ + 1:]
        close = after.find("}")
        if close == -1:
            out.append(rest[open_:])
            return "".join(out)
        name = after[:close]
        value: str | None
        if name == "sys_instance_id":
            value = instance_id
        elif name == "sys_label":
            value = label or ""
        elif _IDENT_RE.fullmatch(name):
            value = vars.get(name)
        else:
            value = None
        out.append(rest[open_:open_ + close + 2] if value is None else value)
        rest = after[close + 1:]
    out.append(rest)
    return "".join(out)


# --------------------------------------------------------------------------------------
# Finding references
# --------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Ref:
    """One ``$name…`` occurrence: ``text[start:end]`` is its source text."""

    start: int
    end: int
    name: str
    col: str | None = None
    star: bool = False
    null_safe: bool = False


def _match_ref(text: str, pos: int, end: int,
               names: Mapping[str, Any]) -> tuple[Ref | None, int]:
    """At a ``$``: (the reference there or None, where scanning resumes)."""
    m = _REF_RE.match(text, pos, end)
    if m is None:
        return None, pos + 1
    if m.group(2):                       # $ident$ is a dollar-quote tag: skip it whole
        return None, m.end()
    name = m.group(1)
    if name not in names:
        return None, pos + 1
    if m.group(3):
        return Ref(pos, m.end(), name, star=True), m.end()
    if m.group(4):
        return Ref(pos, m.end(), name, col=m.group(4), null_safe=bool(m.group(5))), m.end()
    return Ref(pos, m.end(), name, null_safe=bool(m.group(6))), m.end()


def _text_refs(text: str, names: Mapping[str, Any], lo: int = 0,
               hi: int | None = None, *, backslash: bool = False) -> list[Ref]:
    """References in plain text (no SQL lexing). `backslash`: a backslash escapes the next char."""
    hi = len(text) if hi is None else hi
    found: list[Ref] = []
    i = lo
    while i < hi:
        j = text.find("$", i, hi)
        if backslash:
            k = text.find("\\", i, hi)
            if k != -1 and (j == -1 or k < j):
                i = k + 2
                continue
        if j == -1:
            break
        ref, i = _match_ref(text, j, hi, names)
        if ref is not None:
            found.append(ref)
    return found


def referenced_names(text: str, names: Mapping[str, Any]) -> list[str]:
    """The bound result names that `text` references, in order of first appearance.

    Purely textual (no SQL lexing), so it may list a name that `bind_sql` then leaves alone
    (e.g. one written right after an identifier character), never the other way round.

    Args:
        text: SQL text, an HTTP field or a break value, after ``{var}`` expansion.
        names: the names bound so far (only the keys are used).
    """
    if not names or "$" not in text:     # most steps: nothing to look for
        return []
    seen: dict[str, None] = {}
    for ref in _text_refs(text, names):
        seen.setdefault(ref.name, None)
    return list(seen)


# --------------------------------------------------------------------------------------
# Resolving a reference to a value
# --------------------------------------------------------------------------------------

class _Verbatim:
    """Leave the reference's source text in place."""


class _Null:
    """A null-safe reference with nothing to give: SQL NULL."""


@dataclass(frozen=True)
class _Rows:
    name: str
    rows: list[dict[str, Any]]


@dataclass(frozen=True)
class _Whole:
    """A result that is not a row set: its whole JSON text, as a string."""

    text: str


_VERBATIM = _Verbatim()
_NULL = _Null()
Resolved = (_Verbatim | _Null | _Rows | _Whole
            | str | int | float | bool | dict[str, Any] | list[Any])


def _is_rowset(value: Any) -> bool:
    return isinstance(value, dict) and isinstance(value.get("rows"), list)


def _json_text(value: Any) -> str:
    try:
        return orjson.dumps(value).decode()
    except TypeError:           # integers beyond 64 bits: the standard encoder writes them
        return json.dumps(value, separators=(",", ":"), ensure_ascii=False)


def _no_rows(name: str) -> StepError:
    return StepError(f"${name} has no rows — query returned zero results")


def _resolve(ref: Ref, result: Any, *, http: bool) -> Resolved:
    """What `ref` stands for in `result`; raises StepError with pg_durable's messages."""
    if ref.star:
        return _resolve_rows(ref.name, result)
    if ref.col is not None:
        return _resolve_field(ref, ref.col, result, http=http)
    if not _is_rowset(result):
        return _Whole(_json_text(result))
    name, rows = ref.name, result["rows"]
    if not rows:
        return _missing(ref, _no_rows(name))
    first = rows[0]
    if not isinstance(first, dict):
        raise StepError(f"${name}: first row is not an object")
    if not first:
        raise StepError(f"${name}: first row has no columns")
    value = next(iter(first.values()))
    if value is None:
        return _missing(ref, StepError(f"${name} is NULL — first column of first row is NULL"))
    return _json_value(value)


def _resolve_rows(name: str, result: Any) -> _Rows:
    if not _is_rowset(result):
        raise StepError(f"${name}.* — invalid result format")
    rows = result["rows"]
    if len(rows) > MAX_ROWSET_ROWS:
        raise StepError(
            f"${name}.* — result has {len(rows)} rows, exceeding the maximum of "
            f"{MAX_ROWSET_ROWS} for row-set expansion. Use pagination or intermediate "
            "tables for large result sets.")
    if not all(isinstance(r, dict) for r in rows):
        raise StepError(f"${name}.* — row is not an object")
    return _Rows(name, rows)


def _resolve_field(ref: Ref, col: str, result: Any, *, http: bool) -> Resolved:
    name = ref.name
    if _is_rowset(result):
        rows = result["rows"]
        if not rows:
            return _missing(ref, _no_rows(name))
        fields = rows[0]
        if not isinstance(fields, dict):
            raise StepError(f"${name}.{col}: first row is not an object")
    elif isinstance(result, dict):
        fields = result
    else:
        raise StepError(f"${name}.{col}: result is neither a row set nor a JSON object")
    if col not in fields:
        if http and not ref.null_safe:
            available = ", ".join(sorted(fields))
            raise StepError(
                f"${name}.{col}: result has no field '{col}' (available: {available})")
        return _VERBATIM
    value = fields[col]
    if value is None:
        return _missing(ref, StepError(f"${name}.{col} is NULL"))
    return _json_value(value)


def _missing(ref: Ref, error: StepError) -> _Null:
    """No rows or NULL: SQL NULL for a null-safe reference, else the error."""
    if ref.null_safe:
        return _NULL
    raise error


def _json_value(value: Any) -> Resolved:
    if isinstance(value, str | int | float | bool | dict | list):
        return value
    raise StepError(f"unexpected value in a stored result: {value!r}")


def _raw_text(value: Resolved) -> str:
    """A value as raw text (HTTP, and inside quoted SQL literals, identifiers and comments)."""
    if isinstance(value, str):
        return value
    if isinstance(value, _Whole):
        return value.text
    if isinstance(value, _Null):
        return "NULL"
    if isinstance(value, _Rows):
        return _json_text(value.rows)
    return _json_text(value)   # numbers, booleans, objects and arrays as JSON text


# --------------------------------------------------------------------------------------
# HTTP contexts and break values
# --------------------------------------------------------------------------------------

def render_http(text: str, results: Mapping[str, Any]) -> str:
    """Insert referenced values raw into an HTTP url/body/header value or a break value.

    Strings go in unquoted and not JSON-escaped, numbers and booleans as JSON text, objects and
    arrays as JSON text, ``$name.*`` as the JSON array of rows; a result that is not a row set
    goes in as its whole JSON text.

    Args:
        text: the text, after ``{var}`` expansion.
        results: bound name -> that node's stored result.

    Raises:
        StepError: no rows, a NULL value, a missing field ("result has no field 'col'") or a
            row set that is too large, with pg_durable's messages.
    """
    out: list[str] = []
    last = 0
    for ref in _text_refs(text, results):
        value = _resolve(ref, results[ref.name], http=True)
        out.append(text[last:ref.start])
        out.append(text[ref.start:ref.end] if isinstance(value, _Verbatim) else _raw_text(value))
        last = ref.end
    out.append(text[last:])
    return "".join(out)


def break_value(raw: str | None) -> Any:
    """The loop result of ``df.break(raw)`` (SPEC §7).

    Text that parses as JSON is kept as that JSON value, other text becomes a JSON string and
    no value is JSON null.
    """
    if raw is None:
        return None
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError:
        return raw


# --------------------------------------------------------------------------------------
# Truthiness
# --------------------------------------------------------------------------------------

# What Rust's `str::parse::<f64>` accepts (pg_durable's test for a numeric string), lower case.
_FLOAT_RE = re.compile(r"[+-]?(?:inf|infinity|nan|(?:\d+\.?\d*|\.\d+)(?:e[+-]?\d+)?)")


def truthy(value: Any) -> bool:
    """Truthiness of a condition's result (SPEC §4).

    A SQL result with no rows is false; otherwise the first column of its first row is tested.
    Other results are tested whole: booleans as they are, numbers non-zero, strings trimmed and
    lower-cased ('', false, f, no are false; true, t, yes true; numeric text is false iff it
    equals 0, so 'NaN' is true; other text true), arrays and objects when non-empty, null false.
    """
    if _is_rowset(value):
        rows = value["rows"]
        if not rows:
            return False
        first = rows[0]
        if isinstance(first, dict) and first:
            return _truthy_value(next(iter(first.values())))
    return _truthy_value(value)


def _truthy_value(value: Any) -> bool:
    if value is None:
        return False
    if isinstance(value, bool):
        return value
    if isinstance(value, int | float):
        return value != 0
    if isinstance(value, str):
        text = value.strip().lower()
        if text in ("", "false", "f", "no"):
            return False
        if text in ("true", "t", "yes"):
            return True
        if _FLOAT_RE.fullmatch(text):
            return float(text) != 0
        return True
    if isinstance(value, list | dict):
        return bool(value)
    return True


# --------------------------------------------------------------------------------------
# SQL: lexing
# --------------------------------------------------------------------------------------

@dataclass
class _StringCtx:
    """A quoted literal: kind std / e (backslash escapes) / u (U&, escape char) / bit."""

    kind: str
    escape: str = "\\"


@dataclass
class _IdentCtx:
    unicode: bool


@dataclass
class _CommentCtx:
    block: bool


@dataclass
class _CodeCtx:
    depth: int
    typed_literal: bool = False     # right after a type name: `date $d` means date '…'


_Ctx = _StringCtx | _IdentCtx | _CommentCtx | _CodeCtx


@dataclass
class _RefPart:
    ref: Ref
    ctx: _Ctx


@dataclass
class _DollarPart:
    tag: str                      # without the dollars
    body: list[_Part]
    closed: bool


_Part = str | _RefPart | _DollarPart

# PostgreSQL's whitespace_with_newline: a string continues on the next line after this gap.
_CONTINUATION_RE = re.compile(
    r"(?:[ \t\f]|--[^\n\r]*)*[\n\r](?:[ \t\n\r\f\v]+|--[^\n\r]*[\n\r])*")
_DOLLAR_RE = re.compile(r"\$(?:[A-Za-z_\x80-\U0010ffff][A-Za-z0-9_\x80-\U0010ffff]*)?\$")
_POSITIONAL_RE = re.compile(r"\$\d+")
_UESCAPE_RE = re.compile(r"\s*uescape\s*'(.)'", re.IGNORECASE)
_CODE_SPECIAL_RE = re.compile(r"[-/'\"$]")
_WORD_BEFORE_RE = re.compile(r"([A-Za-z_][A-Za-z0-9_]*)\s*\Z")
# Type names that take PostgreSQL's typed-literal syntax (`date '2024-01-01'`): a parameter
# cannot stand there, so a reference right after one is written as a quoted literal.
_TYPE_WORDS = frozenset({
    "date", "time", "timestamp", "timestamptz", "timetz", "interval", "zone", "precision",
    "varying", "numeric", "decimal", "int", "int2", "int4", "int8", "integer", "smallint",
    "bigint", "real", "float", "float4", "float8", "text", "varchar", "char", "character",
    "bpchar", "bool", "boolean", "json", "jsonb", "jsonpath", "uuid", "bytea", "inet", "cidr",
    "macaddr", "macaddr8", "money", "point", "line", "lseg", "box", "path", "polygon", "circle",
    "xml", "bit", "varbit", "tsvector", "tsquery", "oid", "regclass", "regtype", "regproc",
    "regprocedure", "regnamespace", "regrole", "name", "int4range", "int8range", "numrange",
    "tsrange", "tstzrange", "daterange", "pg_lsn"})


def _ident_char(ch: str) -> bool:
    """A character that continues a PostgreSQL identifier (or number)."""
    return ch.isalnum() or ch in "_$" if ch.isascii() else True


def _after_type_name(text: str, lo: int, pos: int) -> bool:
    """Whether the token before `pos` is a type name (``timestamptz $t``)."""
    m = _WORD_BEFORE_RE.search(text, max(lo, pos - 40), pos)
    if m is None or m.group(1).lower() not in _TYPE_WORDS:
        return False
    start = m.start(1)
    return start == lo or not _ident_char(text[start - 1])


def _token_start(text: str, lo: int, pos: int) -> bool:
    """Whether `pos` begins a new token (not the middle of an identifier such as `a$b`)."""
    k = pos
    while k > lo and _ident_char(text[k - 1]):
        k -= 1
    # A run that starts with a digit or `$` is a number or a parameter: it ends where
    # letters begin, as far as prefixes (E'', B'', $$) are concerned.
    return k == pos or text[k].isdigit() or text[k] == "$"


@dataclass
class _Level:
    """One level of code being lexed: the statement, or the body of a dollar quote."""

    lo: int
    hi: int
    depth: int
    run: int                                  # start of the text not yet copied into parts
    parts: list[_Part] = field(default_factory=list)
    last_string: tuple[int, _StringCtx] | None = None   # (end, ctx) of the last literal

    def flush(self, text: str, upto: int) -> None:
        if upto > self.run:
            self.parts.append(text[self.run:upto])
        self.run = max(self.run, upto)


@dataclass
class _Lexer:
    text: str
    names: Mapping[str, Any]
    standard_strings: bool
    positional: bool = False            # the statement uses its own $1 … in top-level code
    refs: int = 0

    def code(self, lo: int, hi: int, depth: int) -> list[_Part]:
        """Lex text[lo:hi] as SQL code: comments, quotes, dollar quotes and references."""
        level = _Level(lo, hi, depth, run=lo)
        i = lo
        while (m := _CODE_SPECIAL_RE.search(self.text, i, hi)) is not None:
            i = self._token(level, m.start())
        level.flush(self.text, hi)
        return level.parts

    def _token(self, level: _Level, i: int) -> int:
        """Lex what starts with the special character at `i`; return where lexing resumes."""
        text = self.text
        pair = text[i:min(i + 2, level.hi)]
        if pair == "--":
            return self._line_comment(level, i)
        if pair == "/*":
            return self._block_comment(level, i)
        if pair[0] == "'":
            return self._string(level, i)
        if pair[0] == '"':
            return self._quoted_ident(level, i)
        if pair[0] == "$" and _token_start(text, level.lo, i):
            return self._dollar(level, i)
        return i + 1

    def _line_comment(self, level: _Level, i: int) -> int:
        text, end = self.text, i + 2
        while end < level.hi and text[end] not in "\n\r":
            end += 1
        level.flush(text, i)
        level.parts.append("--")
        self.content(level.parts, i + 2, end, _CommentCtx(block=False))
        level.run = end
        return end

    def _block_comment(self, level: _Level, i: int) -> int:
        end, close = self._block_comment_end(i, level.hi)
        level.flush(self.text, i)
        level.parts.append("/*")
        self.content(level.parts, i + 2, close, _CommentCtx(block=True))
        level.parts.append(self.text[close:end])
        level.run = end
        return end

    def _string(self, level: _Level, i: int) -> int:
        text = self.text
        ctx = self._string_ctx(level.lo, i, level.last_string)
        end, close = self._string_end(i, level.hi, ctx)
        if ctx.kind == "u" and (um := _UESCAPE_RE.match(text, end, level.hi)):
            ctx.escape = um.group(1)
        level.flush(text, i)
        level.parts.append("'")
        self.content(level.parts, i + 1, close, ctx)
        level.parts.append(text[close:end])
        level.last_string = (end, ctx)
        level.run = end
        return end

    def _quoted_ident(self, level: _Level, i: int) -> int:
        text, lo, hi = self.text, level.lo, level.hi
        unicode = (i >= lo + 2 and text[i - 1] == "&" and text[i - 2] in "uU"
                   and _token_start(text, lo, i - 2))
        close = i + 1
        while close < hi:
            if text[close] == '"':
                if text.startswith('""', close) and close + 1 < hi:
                    close += 2
                    continue
                break
            close += 1
        close = min(close, hi)
        end = min(close + 1, hi)
        level.flush(text, i)
        level.parts.append('"')
        self.content(level.parts, i + 1, close, _IdentCtx(unicode))
        level.parts.append(text[close:end])
        level.run = end
        return end

    def _dollar(self, level: _Level, i: int) -> int:
        """A `$` that starts a token: a dollar quote, a positional parameter or a reference."""
        text, hi = self.text, level.hi
        if (dm := _DOLLAR_RE.match(text, i, hi)) is not None:
            delim = dm.group()
            close = text.find(delim, dm.end(), hi)
            body_end = hi if close == -1 else close
            level.flush(text, i)
            body = self.code(dm.end(), body_end, level.depth + 1)
            level.parts.append(_DollarPart(delim[1:-1], body, closed=close != -1))
            level.run = hi if close == -1 else close + len(delim)
            return level.run
        if (pm := _POSITIONAL_RE.match(text, i, hi)) is not None:
            if level.depth == 0:
                self.positional = True
            return pm.end()
        ref, resume = _match_ref(text, i, hi, self.names)
        if ref is not None:
            level.flush(text, i)
            typed = _after_type_name(text, level.lo, i)
            level.parts.append(_RefPart(ref, _CodeCtx(level.depth, typed)))
            self.refs += 1
            level.run = resume
        return resume

    def content(self, parts: list[_Part], lo: int, hi: int, ctx: _Ctx) -> None:
        """Text inside a literal, identifier or comment: references are found textually."""
        text = self.text
        backslash = isinstance(ctx, _StringCtx) and ctx.kind == "e"
        run = lo
        for ref in _text_refs(text, self.names, lo, hi, backslash=backslash):
            if (isinstance(ctx, _CommentCtx) and ctx.block and ref.star
                    and text.startswith("/", ref.end)):
                continue        # that `*` ends a nested comment: leave `$name.*/` alone
            if ref.start > run:
                parts.append(text[run:ref.start])
            parts.append(_RefPart(ref, ctx))
            self.refs += 1
            run = ref.end
        if hi > run:
            parts.append(text[run:hi])

    def _string_ctx(self, lo: int, i: int,
                    last: tuple[int, _StringCtx] | None) -> _StringCtx:
        text = self.text
        prev = text[i - 1] if i > lo else ""
        kind = "std"
        if prev and _token_start(text, lo, i - 1):
            if prev in "eE":
                kind = "e"
            elif prev in "bBxX":
                kind = "bit"
        if (kind == "std" and prev == "&" and i - 2 >= lo and text[i - 2] in "uU"
                and _token_start(text, lo, i - 2)):
            kind = "u"
        if (kind == "std" and last is not None and last[0] < i
                and _CONTINUATION_RE.fullmatch(text, last[0], i)):
            return _StringCtx(last[1].kind, last[1].escape)   # 'a'<newline>'b' is one literal
        if not self.standard_strings and kind in ("std", "u"):
            kind = "e"          # standard_conforming_strings = off: backslashes escape
        return _StringCtx(kind)

    def _string_end(self, i: int, hi: int, ctx: _StringCtx) -> tuple[int, int]:
        """(end after the closing quote, position of the closing quote) of a literal at i."""
        text = self.text
        j = i + 1
        while j < hi:
            ch = text[j]
            if ch == "\\" and ctx.kind == "e":
                j += 2
                continue
            if ch == "'":
                if ctx.kind != "bit" and j + 1 < hi and text[j + 1] == "'":
                    j += 2
                    continue
                return j + 1, j
            j += 1
        return hi, hi

    def _block_comment_end(self, i: int, hi: int) -> tuple[int, int]:
        """(end after the closing */, position of that */) of a nested block comment at i."""
        text = self.text
        level, j = 0, i
        while j < hi - 1:
            pair = text[j:j + 2]
            if pair == "/*":
                level += 1
                j += 2
            elif pair == "*/":
                level -= 1
                j += 2
                if level == 0:
                    return j, j - 2
            else:
                j += 1
        return hi, hi


# --------------------------------------------------------------------------------------
# SQL: binding
# --------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Param:
    """One bind parameter: its PostgreSQL type and its value as text."""

    type: ParamType
    value: str


@dataclass(frozen=True)
class BoundSql:
    """A statement ready to send: `query` uses ``$1 …`` for `params`.

    `literals` is True when the statement cannot take parameters and values were written in
    as quoted literals (then `params` is empty).
    """

    query: str
    params: tuple[Param, ...] = ()
    literals: bool = False

    def with_text(self, index: int) -> BoundSql:
        """The same statement with parameter `index` (0-based) typed text instead of unknown."""
        params = list(self.params)
        params[index] = replace(params[index], type="text")
        return replace(self, params=tuple(params))


# Statements whose parse analysis resolves parameters (checked on PostgreSQL 15 and 18).
_PARAM_STATEMENTS = frozenset({
    "SELECT", "INSERT", "UPDATE", "DELETE", "MERGE", "VALUES", "TABLE", "WITH", "EXPLAIN",
    "CALL", "DECLARE"})
_LEADING_RE = re.compile(r"(?:\s+|--[^\n\r]*|\()*([A-Za-z]+)?")


def leading_keyword(text: str) -> str:
    """The statement's first keyword, upper-case ('' if none), past comments and parentheses."""
    i = 0
    while True:
        m = _LEADING_RE.match(text, i)
        assert m is not None
        i = m.end()
        if text.startswith("/*", i):
            level = 0
            while i < len(text) - 1:
                pair = text[i:i + 2]
                if pair in ("/*", "*/"):
                    level += 1 if pair == "/*" else -1
                    i += 2
                    if level == 0:
                        break
                else:
                    i += 1
            else:
                return ""
            continue
        return (m.group(1) or "").upper()


def bind_sql(text: str, results: Mapping[str, Any], *, parameters: bool | None = None,
             standard_conforming_strings: bool = True) -> BoundSql:
    """Turn references in a SQL statement into bind parameters (or safe literals).

    Args:
        text: the statement, after ``{var}`` expansion.
        results: bound name -> that node's stored result (a SQL result dict or any JSON value).
        parameters: force parameters (True) or literals (False); None decides by the
            statement's leading keyword.
        standard_conforming_strings: the session's setting (off: backslashes escape in '…').

    Returns:
        The rewritten statement and its parameters.

    Raises:
        StepError: a reference that cannot be satisfied (no rows, NULL, a bad row set), with
            pg_durable's messages.
    """
    if not results or "$" not in text:
        return BoundSql(text)
    lexer = _Lexer(text, results, standard_conforming_strings)
    parts = lexer.code(0, len(text), 0)
    if lexer.refs == 0:
        return BoundSql(text)
    if parameters is None:
        parameters = leading_keyword(text) in _PARAM_STATEMENTS
    if lexer.positional:
        parameters = False
    renderer = _Renderer(text, results, parameters)
    query = renderer.render(parts)
    return BoundSql(query, tuple(renderer.params), literals=not parameters)


@dataclass
class _Renderer:
    text: str
    results: Mapping[str, Any]
    parameters: bool
    params: list[Param] = field(default_factory=list)

    def render(self, parts: list[_Part]) -> str:
        out: list[str] = []
        for index, part in enumerate(parts):
            if isinstance(part, str):
                out.append(part)
            elif isinstance(part, _DollarPart):
                out.append(self._dollar(part))
            else:
                following = _next_char(parts, index + 1)
                out.append(self._ref(part, out, following))
        return "".join(out)

    def _dollar(self, part: _DollarPart) -> str:
        body = self.render(part.body)
        tag = part.tag
        n = 0
        while f"${tag}$" in body:          # a value must never end the quote
            n += 1
            tag = f"da_{n}"
        close = f"${tag}$" if part.closed else ""
        return f"${tag}${body}{close}"

    def _ref(self, part: _RefPart, out: list[str], following: str) -> str:
        ref, ctx = part.ref, part.ctx
        value = _resolve(ref, self.results[ref.name], http=False)
        if isinstance(value, _Verbatim):
            return self.text[ref.start:ref.end]
        if isinstance(ctx, _CodeCtx):
            at_top = ctx.depth == 0 and self.parameters and not ctx.typed_literal
            rendered = self._param(value) if at_top else _literal(value)
            previous = _last_char(out)
            if rendered.startswith("-") and previous == "-":
                rendered = " " + rendered              # never form a `--` comment
            if following and (_ident_char(following) or following in "'\".?"):
                rendered += " "                        # never merge with what follows
            return rendered
        raw = _raw_text(value)
        if isinstance(ctx, _StringCtx):
            return _escape_in_string(raw, ctx, ref)
        if isinstance(ctx, _IdentCtx):
            raw = raw.replace('"', '""')
            return raw.replace("\\", "\\\\") if ctx.unicode else raw
        return _defuse_comment(raw, block=ctx.block)

    def _param(self, value: Resolved) -> str:
        if isinstance(value, _Rows):
            if not value.rows:
                return f"(SELECT NULL WHERE false) AS {_quote_ident(value.name)}"
            columns = _columns(value.rows)
            self.params.append(Param("jsonb", _json_text(value.rows)))
            spec = ", ".join(f"{_quote_ident(c)} {t}" for c, t in columns)
            return (f"jsonb_to_recordset(${len(self.params)}::jsonb) AS "
                    f"{_quote_ident(value.name)}({spec})")
        if isinstance(value, _Null):
            return "NULL"        # a constant, as pg_durable writes it; no typed-NULL parameter
        self.params.append(_param_for(value))
        return f"${len(self.params)}"


def _param_for(value: Resolved) -> Param:
    if isinstance(value, _Whole):
        return Param("unknown", value.text)
    if isinstance(value, bool):
        return Param("bool", "true" if value else "false")
    if isinstance(value, int):
        if _INT4[0] <= value <= _INT4[1]:
            return Param("int4", str(value))
        if _INT8[0] <= value <= _INT8[1]:
            return Param("int8", str(value))
        return Param("numeric", str(value))
    if isinstance(value, float):
        return Param("numeric", _json_text(value))
    if isinstance(value, str):
        return Param("unknown", value)
    return Param("unknown", _json_text(value))


def _literal(value: Resolved) -> str:
    """A value as SQL code: what pg_durable splices, correctly quoted."""
    if isinstance(value, _Null):
        return "NULL"
    if isinstance(value, _Whole):
        return quote_literal(value.text)
    if isinstance(value, _Rows):
        return _values_relation(value)
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return _json_text(value)
    if isinstance(value, str):
        return quote_literal(value)
    return quote_literal(_json_text(value))


def _values_relation(rows: _Rows) -> str:
    alias = _quote_ident(rows.name)
    if not rows.rows:
        return f"(SELECT NULL WHERE false) AS {alias}"
    columns = _columns(rows.rows)
    lines = []
    for row in rows.rows:
        cells = []
        for col, typ in columns:
            value = row.get(col)
            if value is None:
                cells.append(f"NULL::{typ}")
            else:
                text = value if isinstance(value, str) and typ != "jsonb" else _json_text(value)
                cells.append(f"{quote_literal(text)}::{typ}")
        lines.append("(" + ", ".join(cells) + ")")
    names = ", ".join(_quote_ident(c) for c, _ in columns)
    return f"(VALUES {', '.join(lines)}) AS {alias}({names})"


def _columns(rows: list[dict[str, Any]]) -> list[tuple[str, str]]:
    """Column names (first-seen order across rows) and a type inferred from their values."""
    kinds: dict[str, set[str]] = {}
    big: set[str] = set()
    for row in rows:
        for col, value in row.items():
            seen = kinds.setdefault(col, set())
            if value is None:
                continue
            if isinstance(value, bool):
                seen.add("boolean")
            elif isinstance(value, int):
                seen.add("int")
                if not _INT8[0] <= value <= _INT8[1]:
                    big.add(col)
            elif isinstance(value, float):
                seen.add("float")
            elif isinstance(value, str):
                seen.add("text")
            else:
                seen.add("jsonb")
    out = []
    for col, seen in kinds.items():
        if not seen:
            typ = "text"
        elif seen == {"int"}:
            typ = "numeric" if col in big else "bigint"
        elif seen <= {"int", "float"}:
            typ = "numeric"
        elif len(seen) == 1:
            typ = next(iter(seen))
        else:
            typ = "jsonb"
        out.append((col, typ))
    return out


def quote_literal(text: str) -> str:
    """A correctly quoted SQL string literal, whatever standard_conforming_strings says."""
    if "\\" in text:
        return "E'" + text.replace("\\", "\\\\").replace("'", "''") + "'"
    return "'" + text.replace("'", "''") + "'"


def _quote_ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def _escape_in_string(raw: str, ctx: _StringCtx, ref: Ref) -> str:
    if ctx.kind == "bit":
        if "'" in raw:
            raise StepError(f"${ref.name} cannot go into a bit-string literal: its value "
                            "contains a quote")
        return raw
    if ctx.kind == "e":
        raw = raw.replace("\\", "\\\\")
    elif ctx.kind == "u":
        raw = raw.replace(ctx.escape, ctx.escape * 2)
    return raw.replace("'", "''")


def _defuse_comment(raw: str, *, block: bool) -> str:
    if not block:
        return raw.replace("\r", " ").replace("\n", " ")
    while "/*" in raw or "*/" in raw:
        raw = raw.replace("/*", "/ *").replace("*/", "* /")
    return f" {raw} "        # nor pair with the comment's own `*` or `/` at either edge


def _last_char(out: list[str]) -> str:
    for piece in reversed(out):
        if piece:
            return piece[-1]
    return ""


def _next_char(parts: list[_Part], start: int) -> str:
    for part in parts[start:]:
        if isinstance(part, str):
            if part:
                return part[0]
            continue
        return "$"
    return ""
