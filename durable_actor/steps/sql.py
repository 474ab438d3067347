"""The SQL step: one statement, its ``$name`` references bound, its rows encoded as JSON.

What `run_sql` does
-------------------
1. ``refs.bind_sql`` rewrites the references: bind parameters where the statement takes them,
   correctly quoted text inside literals, comments and dollar-quoted bodies, quoted literals in
   statements that take no parameters (see ``refs`` for the rules). A value never becomes SQL.
2. The statement goes out as ONE extended-protocol statement (Parse/Bind/Execute, unnamed, not
   prepared for reuse), so text holding two statements fails with PostgreSQL's "cannot insert
   multiple commands into a prepared statement", as in pg_durable. Parameters carry explicit
   type OIDs: 0 (*unknown*) for strings and JSON text, int4/int8/numeric/bool/jsonb otherwise.
3. An unknown parameter in a place where PostgreSQL cannot infer a type (``concat($x, …)``,
   ``$x IS NULL``) makes the server answer 42P18 at Parse time, before anything ran: the step
   retypes that parameter as text and sends the statement again. Inside a transaction a failed
   Parse aborts the transaction, so statements with unknown parameters run after a
   ``SAVEPOINT`` (only those, and only inside a transaction), pipelined with the statement in
   one round trip; it is left for the caller's own savepoint or commit to release.
4. Results come back in binary format and are decoded by the column's type OID (from the row
   description), never by the Python type a driver would pick, so DateStyle, TimeZone,
   extra_float_digits or loaders registered on the connection cannot change the JSON:

   ========================  =====================================================
   bool                      boolean
   int2, int4, int8          number
   float4, float8            number (float4 as PostgreSQL prints it: 3.14, not
                             3.140000104904175); NaN and ±Infinity -> null
   text, varchar, bpchar,    string
   name
   numeric                   exact string, scale kept ("123456.78900000"; "NaN",
                             "Infinity")
   uuid                      canonical lower-case string
   timestamptz               RFC 3339 in UTC, "2024-06-15T12:30:00+00:00"; fraction
                             of 3 or 6 digits only when non-zero; "infinity"
   timestamp                 "2024-06-15T12:30:00", same fraction rule, no zone
   date                      "2024-06-15"
   json, jsonb               the value, nested
   void                      null
   ========================  =====================================================

   Any other type fails the step with "Unsupported column type '<TYPE>' for column '<col>'"
   (pg_durable's text), but only when a row came back, as in pg_durable. Keys keep the select
   list's order; a repeated column name keeps its first position and its last value.

Errors: a database error becomes ``StepError("SQL execution failed: <message>")`` carrying the
SQLSTATE. ``QueryCanceled`` and errors that broke the connection propagate unchanged: the
executor decides whether the step was cancelled, timed out or must simply run again.
"""

from __future__ import annotations

import json
import math
import re
import struct
import uuid
from dataclasses import dataclass
from typing import Any

import orjson
import psycopg
from psycopg import AsyncRawCursor, errors, generators, postgres, pq
from psycopg.abc import Buffer
from psycopg.adapt import AdaptersMap, Dumper, Loader, Transformer
from psycopg.rows import tuple_row

from durable_actor import db, refs
from durable_actor.errors import StepError

SAVEPOINT = "durable_actor_bind"
SUPPORTED_TYPES = ("bool, int2, int4, int8, float4, float8, text, varchar, numeric, uuid, "
                   "timestamptz, timestamp, date, jsonb, json, void")
_PARAMETER_RE = re.compile(r"\$(\d+)")
_INT8_MAX = 2**63 - 1
_INT4_MAX = 2**31 - 1
_PG_EPOCH_DAYS = 10_957                       # 2000-01-01 in days since 1970-01-01
_DAY_US = 86_400_000_000
_OID = {"bool": 16, "int2": 21, "int4": 23, "int8": 20, "float4": 700, "float8": 701,
        "text": 25, "varchar": 1043, "bpchar": 1042, "name": 19, "numeric": 1700,
        "uuid": 2950, "timestamptz": 1184, "timestamp": 1114, "date": 1082, "json": 114,
        "jsonb": 3802, "void": 2278}
_BINARY = pq.Format.BINARY
_TEXT = pq.Format.TEXT


async def run_sql(conn: psycopg.AsyncConnection[Any], query: str,
                  results: dict[str, Any]) -> dict[str, Any]:
    """Run one SQL step on `conn` as it is (no commit) and return its JSON result.

    Args:
        conn: the connection, inside the caller's savepoint and role where it has them.
        query: the statement, after ``{var}`` expansion.
        results: name -> stored result of every name the statement may reference.

    Returns:
        ``{"rows": [{column: value, …}, …], "row_count": n}``.

    Raises:
        StepError: a reference that cannot be satisfied, a database error ("SQL execution
            failed: …", with its SQLSTATE) or an unsupported column type.
        psycopg.errors.QueryCanceled: the statement was cancelled (by the executor or a
            statement timeout); also errors that broke the connection.
    """
    bound = bind(conn, query, results)
    async with _StepCursor(conn, row_factory=tuple_row) as cur:
        try:
            await _execute(conn, cur, bound)
            return await encode(conn, cur.pgresult)
        except errors.QueryCanceled:
            raise
        except psycopg.Error as exc:
            if session_lost(conn, exc):
                raise
            raise step_error(exc) from exc


def session_lost(conn: psycopg.AsyncConnection[Any], exc: psycopg.Error) -> bool:
    """Did `exc`, raised by a step's statement, break the session (rather than being the
    statement's own fault)? 08P01 with the connection intact is the statement's fault, such
    as a `$1` in a step that has no parameter to bind."""
    state = exc.sqlstate or ""
    return conn.broken or conn.closed or (state.startswith(("08", "57P")) and state != "08P01")


def step_error(exc: psycopg.Error, *, retryable: bool = True) -> StepError:
    """A database error of a step as the step's error, with its SQLSTATE; with `retryable`,
    a serialization failure or a deadlock may be retried."""
    message = exc.diag.message_primary or str(exc).strip()
    return StepError(f"SQL execution failed: {message}", sqlstate=exc.sqlstate,
                     retryable=retryable and exc.sqlstate in ("40001", "40P01"))


def bind(conn: psycopg.AsyncConnection[Any], query: str,
         results: dict[str, Any]) -> refs.BoundSql:
    """The step's statement with its references bound (``refs.bind_sql``) for `conn`."""
    standard = conn.info.parameter_status("standard_conforming_strings") != "off"
    return refs.bind_sql(query, results, standard_conforming_strings=standard)


def statement(conn: psycopg.AsyncConnection[Any], bound: refs.BoundSql) -> db.Statement:
    """`bound` as `run_sql` sends it, as one statement of ``db.pipelined``: the parameters as
    text with their type OIDs, the rows in binary."""
    encoding = _encoding(conn)
    return db.Statement(bound.query.encode(encoding),
                        [p.value.encode(encoding) for p in bound.params] or None,
                        [_PARAM_OID[p.type] for p in bound.params] or None, binary=True)


async def _execute(conn: psycopg.AsyncConnection[Any], cur: AsyncRawCursor[Any],
                   bound: refs.BoundSql) -> None:
    # The statement is the user's step, SQL by definition; values never enter its text.
    guarded = any(p.type == "unknown" for p in bound.params) and not (
        conn.autocommit and conn.info.transaction_status == pq.TransactionStatus.IDLE)
    attempts = len(bound.params) + 1
    if guarded and psycopg.AsyncPipeline.is_supported():
        attempts -= 1
        try:
            async with conn.pipeline():       # SAVEPOINT and the statement in one round trip
                await conn.execute(f"SAVEPOINT {SAVEPOINT}")
                await cur.execute(bound.query, _adapt(bound.params), binary=True,
                                  prepare=False)
            return
        except errors.IndeterminateDatatype as exc:
            bound = _retype_or_raise(bound, exc)
            await conn.execute(f"ROLLBACK TO SAVEPOINT {SAVEPOINT}")
    elif guarded:
        await conn.execute(f"SAVEPOINT {SAVEPOINT}")
    for _ in range(attempts):
        try:
            await cur.execute(bound.query, _adapt(bound.params), binary=True, prepare=False)
            return
        except errors.IndeterminateDatatype as exc:
            bound = _retype_or_raise(bound, exc)
            if guarded:
                await conn.execute(f"ROLLBACK TO SAVEPOINT {SAVEPOINT}")


def _retype_or_raise(bound: refs.BoundSql, exc: psycopg.Error) -> refs.BoundSql:
    retyped = _retype(bound, exc)
    if retyped is None:
        raise exc
    return retyped


def _retype(bound: refs.BoundSql, exc: psycopg.Error) -> refs.BoundSql | None:
    """`bound` with the parameter PostgreSQL could not type sent as text (None: not ours)."""
    m = _PARAMETER_RE.search(exc.diag.message_primary or "")
    if m is not None:
        index = int(m.group(1)) - 1
        if 0 <= index < len(bound.params) and bound.params[index].type == "unknown":
            return bound.with_text(index)
        return None
    unknown = [i for i, p in enumerate(bound.params) if p.type == "unknown"]
    for i in unknown:                      # no number in the message: all of them, once
        bound = bound.with_text(i)
    return bound if unknown else None


# --------------------------------------------------------------------------------------
# Parameters: text values with explicit type OIDs
# --------------------------------------------------------------------------------------

class _Typed(str):
    """A parameter value as text; subclasses name the type OID it is sent with."""

    __slots__ = ()


class _Unknown(_Typed):
    __slots__ = ()


class _Text(_Typed):
    __slots__ = ()


class _Int4(_Typed):
    __slots__ = ()


class _Int8(_Typed):
    __slots__ = ()


class _Numeric(_Typed):
    __slots__ = ()


class _Bool(_Typed):
    __slots__ = ()


class _Jsonb(_Typed):
    __slots__ = ()


_PARAM_CLASSES: dict[str, type[_Typed]] = {
    "unknown": _Unknown, "text": _Text, "int4": _Int4, "int8": _Int8,
    "numeric": _Numeric, "bool": _Bool, "jsonb": _Jsonb}


class _TypedDumper(Dumper):
    format = _TEXT

    def __init__(self, cls: type, context: Any = None) -> None:
        super().__init__(cls, context)
        self._encoding = _encoding(self.connection)

    def dump(self, obj: Any) -> Buffer:
        return str(obj).encode(self._encoding)


def _dumper(oid: int) -> type[Dumper]:
    return type(f"_Dumper{oid}", (_TypedDumper,), {"oid": oid})


_DUMPERS: dict[type[_Typed], type[Dumper]] = {
    _Unknown: _dumper(0), _Text: _dumper(_OID["text"]), _Int4: _dumper(_OID["int4"]),
    _Int8: _dumper(_OID["int8"]), _Numeric: _dumper(_OID["numeric"]),
    _Bool: _dumper(_OID["bool"]), _Jsonb: _dumper(_OID["jsonb"]),
}


def _adapt(params: tuple[refs.Param, ...]) -> list[_Typed]:
    return [_PARAM_CLASSES[p.type](p.value) for p in params]


def _encoding(conn: Any) -> str:
    name = conn.info.encoding if conn is not None else "utf-8"
    return "utf-8" if name in ("ascii", "sql_ascii") else str(name)


# --------------------------------------------------------------------------------------
# Results: binary values decoded by type OID
# --------------------------------------------------------------------------------------

class _BoolLoader(Loader):
    format = _BINARY

    def load(self, data: Buffer) -> Any:
        return data[0] != 0


class _IntLoader(Loader):
    format = _BINARY

    def load(self, data: Buffer) -> Any:
        return int.from_bytes(data, "big", signed=True)


class _Float8Loader(Loader):
    format = _BINARY

    def load(self, data: Buffer) -> Any:
        value: float = struct.unpack(">d", data)[0]
        return value if math.isfinite(value) else None


class _Float4Loader(Loader):
    format = _BINARY

    def load(self, data: Buffer) -> Any:
        value: float = struct.unpack(">f", data)[0]
        if not math.isfinite(value):
            return None
        for digits in range(1, 10):          # the shortest text that is the same float4
            short = float(f"{value:.{digits}g}")
            try:
                if struct.unpack(">f", struct.pack(">f", short))[0] == value:
                    return short
            except OverflowError:            # rounded past float4's largest value
                continue
        return value


class _TextLoader(Loader):
    format = _BINARY

    def __init__(self, oid: int, context: Any = None) -> None:
        super().__init__(oid, context)
        self._encoding = _encoding(self.connection)

    def load(self, data: Buffer) -> Any:
        return bytes(data).decode(self._encoding, errors="replace")


class _NumericLoader(Loader):
    """numeric's binary form (base-10000 digits, weight, sign, display scale) to exact text."""

    format = _BINARY

    def load(self, data: Buffer) -> Any:
        ndigits, weight, sign, dscale = struct.unpack(">hhHH", data[:8])
        special = {0xC000: "NaN", 0xD000: "Infinity", 0xF000: "-Infinity"}.get(sign)
        if special:
            return special
        groups = struct.unpack(f">{ndigits}h", data[8:8 + 2 * ndigits])
        digits = "".join(f"{g:04d}" for g in groups)
        point = 4 * (weight + 1)                      # position of the decimal point
        if point < 0:
            digits, point = "0" * -point + digits, 0
        digits = digits.ljust(point, "0")
        integer = digits[:point].lstrip("0") or "0"
        fraction = digits[point:point + dscale].ljust(dscale, "0")
        text = f"{integer}.{fraction}" if dscale else integer
        return f"-{text}" if sign == 0x4000 else text


class _UuidLoader(Loader):
    format = _BINARY

    def load(self, data: Buffer) -> Any:
        return str(uuid.UUID(bytes=bytes(data)))


class _DateLoader(Loader):
    format = _BINARY

    def load(self, data: Buffer) -> Any:
        days: int = struct.unpack(">i", data)[0]
        if days in (_INT4_MAX, -_INT4_MAX - 1):
            return "infinity" if days > 0 else "-infinity"
        return _date_text(days + _PG_EPOCH_DAYS)


class _TimestampLoader(Loader):
    format = _BINARY
    zone = ""

    def load(self, data: Buffer) -> Any:
        micros: int = struct.unpack(">q", data)[0]
        if micros in (_INT8_MAX, -_INT8_MAX - 1):
            return "infinity" if micros > 0 else "-infinity"
        days, rest = divmod(micros, _DAY_US)
        seconds, fraction = divmod(rest, 1_000_000)
        hours, seconds = divmod(seconds, 3600)
        minutes, seconds = divmod(seconds, 60)
        if fraction == 0:
            frac = ""
        elif fraction % 1000 == 0:
            frac = f".{fraction // 1000:03d}"
        else:
            frac = f".{fraction:06d}"
        return (f"{_date_text(days + _PG_EPOCH_DAYS)}T{hours:02d}:{minutes:02d}:{seconds:02d}"
                f"{frac}{self.zone}")


class _TimestamptzLoader(_TimestampLoader):
    zone = "+00:00"


class _JsonLoader(Loader):
    format = _BINARY
    skip = 0                                   # jsonb's binary form starts with a version byte

    def __init__(self, oid: int, context: Any = None) -> None:
        super().__init__(oid, context)
        self._encoding = _encoding(self.connection)

    def load(self, data: Buffer) -> Any:
        raw = bytes(data[self.skip:])
        if self._encoding != "utf-8":
            raw = raw.decode(self._encoding).encode()
        try:
            return orjson.loads(raw)
        except orjson.JSONDecodeError:
            # Numbers beyond a double (1e400), which orjson refuses: null, like NaN floats.
            return json.loads(raw, parse_constant=_reject_constant, parse_float=_finite)


class _JsonbLoader(_JsonLoader):
    skip = 1


class _VoidLoader(Loader):
    format = _BINARY

    def load(self, data: Buffer) -> Any:
        return None


def _finite(text: str) -> float | None:
    value = float(text)
    return value if math.isfinite(value) else None


def _reject_constant(name: str) -> Any:
    raise ValueError(f"not JSON: {name}")


def _date_text(days: int) -> str:
    """Proleptic Gregorian date of a day count since 1970-01-01 (any year, as chrono prints)."""
    z = days + 719_468
    era = z // 146_097
    doe = z - era * 146_097
    yoe = (doe - doe // 1460 + doe // 36_524 - doe // 146_096) // 365
    doy = doe - (365 * yoe + yoe // 4 - yoe // 100)
    mp = (5 * doy + 2) // 153
    day = doy - (153 * mp + 2) // 5 + 1
    month = mp + 3 if mp < 10 else mp - 9
    year = yoe + era * 400 + (month <= 2)
    year_text = f"{year:04d}" if 0 <= year <= 9999 else f"{year:+05d}"
    return f"{year_text}-{month:02d}-{day:02d}"


# Type OID (fixed in PostgreSQL's catalog) -> how a binary value of that type becomes JSON.
_LOADER_OIDS: dict[int, type[Loader]] = {
    _OID["bool"]: _BoolLoader, _OID["int2"]: _IntLoader, _OID["int4"]: _IntLoader,
    _OID["int8"]: _IntLoader, _OID["float4"]: _Float4Loader, _OID["float8"]: _Float8Loader,
    _OID["text"]: _TextLoader, _OID["varchar"]: _TextLoader, _OID["bpchar"]: _TextLoader,
    _OID["name"]: _TextLoader, _OID["numeric"]: _NumericLoader, _OID["uuid"]: _UuidLoader,
    _OID["timestamptz"]: _TimestamptzLoader, _OID["timestamp"]: _TimestampLoader,
    _OID["date"]: _DateLoader, _OID["json"]: _JsonLoader, _OID["jsonb"]: _JsonbLoader,
    _OID["void"]: _VoidLoader,
}


_ADAPTERS = AdaptersMap(psycopg.adapters)
for _cls, _dumper_cls in _DUMPERS.items():
    _ADAPTERS.register_dumper(_cls, _dumper_cls)
for _oid, _loader_cls in _LOADER_OIDS.items():
    _ADAPTERS.register_loader(_oid, _loader_cls)


class _StepCursor(AsyncRawCursor[Any]):
    """A ``$1``-placeholder cursor that adapts with our dumpers and loaders only.

    Loaders registered on the connection (orjson for json, custom types …) cannot change a
    step's JSON, and the map is built once instead of per statement.
    """

    @property
    def adapters(self) -> AdaptersMap:
        return _ADAPTERS


async def encode(conn: psycopg.AsyncConnection[Any], result: pq.abc.PGresult | None,
                 columns: list[_Column] | None = None) -> dict[str, Any]:
    """The JSON result of a statement's `result` (its rows in binary); `columns` names and
    types them when it is given."""
    if result is None or (not result.nfields and result.status != pq.ExecStatus.TUPLES_OK):
        return {"rows": [], "row_count": 0}     # INSERT/UPDATE/DDL without RETURNING
    encoding = conn.info.encoding
    fields = range(result.nfields)
    if result.ntuples > 0:
        for i in fields:
            oid = columns[i].oid if columns else result.ftype(i)
            if oid not in _LOADER_OIDS:
                type_name = (columns[i].type_name if columns
                             else await _type_name(conn, result.ftype(i)))
                name = columns[i].name if columns else _field_name(result, i, encoding)
                raise StepError(
                    f"Unsupported column type '{type_name}' for column '{name}'. "
                    f"Supported types: {SUPPORTED_TYPES}.")
    names = [c.name for c in columns] if columns else [
        _field_name(result, i, encoding) for i in fields]
    loader = Transformer(_StepContext(conn))
    try:
        loader.set_pgresult(result)
        records = loader.load_rows(0, result.ntuples, tuple)
    except (ValueError, struct.error) as exc:
        raise StepError(f"SQL execution failed: could not read the result: {exc}") from exc
    rows = [dict(zip(names, record, strict=True)) for record in records]
    return {"rows": rows, "row_count": len(rows)}


def _field_name(result: pq.abc.PGresult, i: int, encoding: str) -> str:
    name = result.fname(i)
    return name.decode(encoding) if name else f"column_{i + 1}"


class _StepContext:
    """What a Transformer adapts with for a step: our loaders only (as `_StepCursor`)."""

    adapters = _ADAPTERS

    def __init__(self, conn: psycopg.AsyncConnection[Any]) -> None:
        self.connection = conn


async def _type_name(conn: psycopg.AsyncConnection[Any], oid: int) -> str:
    """A type's name as pg_durable's driver shows it: BYTEA, INT4[], or a user type's name."""
    info = postgres.types.get(oid)
    if info is not None:
        name = info.name.upper()
        return f"{name}[]" if oid == info.array_oid else name
    async with conn.cursor(row_factory=tuple_row) as cur:
        await cur.execute("SELECT typname::text FROM pg_catalog.pg_type WHERE oid = %s",
                          (oid,))
        row = await cur.fetchone()
    return str(row[0]) if row else str(oid)


# --------------------------------------------------------------------------------------
# Confined steps: the statement runs inside the submitter's SECURITY DEFINER function
# --------------------------------------------------------------------------------------

STEP_STATEMENT = "_df_step"                   # the prepared statement the step function runs
_PARAM_OID = {"unknown": 0, "text": _OID["text"], "int4": _OID["int4"], "int8": _OID["int8"],
              "numeric": _OID["numeric"], "bool": _OID["bool"], "jsonb": _OID["jsonb"]}
_RECORD_OID = 2249
# Types a column definition list can name as they are (the loaders' types, void excepted).
_DECLARABLE = {oid: f'pg_catalog."{name}"' for name, oid in _OID.items() if name != "void"}
# What the executor runs after every step, first thing, before any name is looked up again:
# the statement may have created temporary objects (pg_temp is searched first for types and
# tables, so a temporary `text` domain would run the submitter's CHECK function inside the
# runtime's own next query), SET search_path (or other settings) for the whole session,
# declared a WITH HOLD cursor (run at COMMIT, as the runtime), prepared statements or taken
# session advisory locks. None of these is undone by the end of the step function.
CLEANUP = ("DISCARD TEMP; RESET ALL; CLOSE ALL; DEALLOCATE ALL;"
           " SELECT pg_catalog.pg_advisory_unlock_all()")


@dataclass(frozen=True)
class _Column:
    name: str
    oid: int
    type_name: str          # as an error message shows it
    declared: str | None    # the type in the column definition list; None: sent as NULL::text


async def run_sql_confined(conn: psycopg.AsyncConnection[Any], query: str,
                           results: dict[str, Any], function: str) -> dict[str, Any]:
    """Run one SQL step inside `function`, the submitter's step function, and encode it.

    The executor parses and describes the statement (which runs nothing) as prepared
    statement ``_df_step``, then calls ``function(values, returns_rows)``: the function runs
    ``EXECUTE _df_step(<values as quoted literals>)`` as its owner, in a security-definer
    context, and returns the rows as ``SETOF record`` typed by a column definition list
    built from the description, so the binary values, and therefore the JSON, are exactly
    those `run_sql` produces. The caller must run `CLEANUP` afterwards, whatever happened.

    Args:
        conn: the executor's connection, inside the step's savepoint, role set to the
            submitter (for name resolution while parsing only).
        query: the statement, after ``{var}`` expansion.
        results: name -> stored result, as for `run_sql`.
        function: the step function's qualified, quoted name.

    Returns/Raises: as `run_sql`.
    """
    bound = bind(conn, query, results)
    try:
        bound, fields = await _prepare(conn, bound.query, bound)
        columns = await _columns(conn, fields)
        if any(c.declared is None for c in columns):
            # A void (or other pseudo-type) column cannot be declared: run the statement as
            # a materialized CTE and send NULL::text for those columns.
            await conn.execute(f"DEALLOCATE {STEP_STATEMENT}")
            wrapped = "WITH s({}) AS MATERIALIZED (\n{}\n) SELECT {} FROM s".format(
                ", ".join(f"c{i}" for i in range(len(columns))), bound.query,
                ", ".join(f"c{i}" if c.declared else f"NULL::pg_catalog.text AS c{i}"
                          for i, c in enumerate(columns)))
            bound, _ = await _prepare(conn, wrapped, bound)
        values = [p.value for p in bound.params]
        await conn.execute("RESET ROLE")      # the runtime calls; the function owner runs it
        async with _StepCursor(conn, row_factory=tuple_row) as cur:
            if columns:
                coldefs = ", ".join(f"c{i} {c.declared or 'pg_catalog.text'}"
                                    for i, c in enumerate(columns))
                await cur.execute(
                    f"SELECT * FROM {function}($1::pg_catalog.text[], true) AS t({coldefs})",
                    [values], binary=True, prepare=False)
                return await encode(conn, cur.pgresult, columns)
            await cur.execute(
                f"SELECT FROM {function}($1::pg_catalog.text[], false) AS t(x pg_catalog.int4)",
                [values], prepare=False)
            return {"rows": [], "row_count": 0}
    except errors.QueryCanceled:
        raise
    except psycopg.Error as exc:
        if conn.broken or conn.closed or (exc.sqlstate or "").startswith(("08", "57P")):
            raise
        raise step_error(exc) from exc


async def _prepare(conn: psycopg.AsyncConnection[Any], text: str,
                   bound: refs.BoundSql) -> tuple[refs.BoundSql, list[tuple[str, int]]]:
    """Parse `text` as the prepared statement ``_df_step`` and describe its result columns.

    Parse and Describe run nothing. A parameter PostgreSQL cannot type (42P18) is retyped as
    text and the statement parsed again, after a savepoint, as `run_sql` does.
    """
    guarded = any(p.type == "unknown" for p in bound.params)
    if guarded:
        await conn.execute(f"SAVEPOINT {SAVEPOINT}")
    for _ in range(len(bound.params) + 1):
        try:
            return bound, await _parse_describe(conn, text, bound)
        except errors.IndeterminateDatatype as exc:
            bound = _retype_or_raise(bound, exc)
            await conn.execute(f"ROLLBACK TO SAVEPOINT {SAVEPOINT}")
    return bound, await _parse_describe(conn, text, bound)


async def _parse_describe(conn: psycopg.AsyncConnection[Any], text: str,
                          bound: refs.BoundSql) -> list[tuple[str, int]]:
    pgconn = conn.pgconn
    encoding = _encoding(conn)
    name = STEP_STATEMENT.encode()
    async with conn.lock:
        pgconn.send_prepare(name, text.encode(encoding),
                            param_types=[_PARAM_OID[p.type] for p in bound.params])
        _check(await conn.wait(generators.execute(pgconn)), encoding)
        pgconn.send_describe_prepared(name)
        result = _check(await conn.wait(generators.execute(pgconn)), encoding)
    return [((result.fname(i) or b"").decode(encoding, errors="replace"), result.ftype(i))
            for i in range(result.nfields)]


def _check(results: list[pq.abc.PGresult], encoding: str) -> pq.abc.PGresult:
    result = results[-1]
    if result.status != pq.ExecStatus.COMMAND_OK:
        raise errors.error_from_result(result, encoding=encoding)
    return result


async def _columns(conn: psycopg.AsyncConnection[Any],
                   fields: list[tuple[str, int]]) -> list[_Column]:
    """Name each column's type for the column definition list and for error messages.

    Looked up now, before the statement runs: afterwards the session's search_path belongs
    to the statement until CLEANUP.
    """
    unknown = sorted({oid for _, oid in fields if oid not in _DECLARABLE})
    info: dict[int, tuple[str | None, str]] = {}
    if unknown:
        async with conn.cursor(row_factory=tuple_row) as cur:
            await cur.execute(
                "SELECT t.oid, pg_catalog.format_type(t.oid, NULL),"
                "       t.typtype = 'p' AND t.oid <> %s"
                " FROM pg_catalog.pg_type t WHERE t.oid = ANY(%s::pg_catalog.oid[])",
                (_RECORD_OID, unknown))
            for oid, declared, pseudo in await cur.fetchall():
                info[oid] = (None if pseudo else str(declared), str(declared))
    columns = []
    for name, oid in fields:
        declared, shown = info.get(oid, (_DECLARABLE.get(oid), ""))
        builtin = postgres.types.get(oid)
        if builtin is not None:
            shown = builtin.name.upper() + ("[]" if oid == builtin.array_oid else "")
        columns.append(_Column(name, oid, shown or str(oid), declared))
    return columns


# Statements that cannot run in a transaction block and that a role other than a superuser
# may run outside one (at least once). PostgreSQL runs any user code they reach (index
# expressions, ANALYZE of expression indexes) as the table owner in a security-restricted
# operation, where SET ROLE and SET SESSION AUTHORIZATION are refused.
OUTSIDE_STATEMENTS_TEXT = ("VACUUM, ANALYZE, CLUSTER, CREATE INDEX CONCURRENTLY, "
                           "DROP INDEX CONCURRENTLY and REINDEX … CONCURRENTLY")
_OUTSIDE_RE = re.compile(
    r"(VACUUM|ANALY[SZ]E|CLUSTER|CREATE\s+(UNIQUE\s+)?INDEX\s+CONCURRENTLY"
    r"|DROP\s+INDEX\s+CONCURRENTLY|REINDEX\s+(\([^)]*\)\s*)?\w+\s+CONCURRENTLY)\b",
    re.IGNORECASE)
_LEADING_RE = re.compile(r"(\s+|--[^\n]*\n?|/\*.*?\*/)*", re.DOTALL)


_TRANSACTION_CONTROL_RE = re.compile(
    r"(BEGIN|START\s+TRANSACTION|COMMIT|END|ROLLBACK|ABORT|SAVEPOINT|RELEASE"
    r"|PREPARE\s+TRANSACTION)\b", re.IGNORECASE)


def check_not_transaction_control(query: str) -> None:
    """Refuse a statement that would end or reshape the transaction the step runs in (a
    COMMIT would commit the batch's earlier steps without their completions). Inside a step
    function PostgreSQL refuses these itself; this says so for every role, before running."""
    start = _LEADING_RE.match(query)
    if _TRANSACTION_CONTROL_RE.match(query, start.end() if start else 0):
        raise StepError("SQL execution failed: a step cannot control the transaction it runs "
                        "in (BEGIN, COMMIT, ROLLBACK, SAVEPOINT, RELEASE …); each step "
                        "commits with its completion", sqlstate="2D000")


def runs_outside(query: str) -> bool:
    """May `query` (one statement) run outside a transaction block for any role?"""
    start = _LEADING_RE.match(query)
    return bool(_OUTSIDE_RE.match(query, start.end() if start else 0))
