"""Multi-user security: steps run confined to their submitter, isolation, bounded inputs.

The real runtime runs here as a superuser (the test server's), so every escape below would
reach a superuser if it worked. Two unprivileged LOGIN roles with awkward quoted names play
the users. docs/security.md names these tests as the proof of each guarantee.
"""

from __future__ import annotations

import json
import os
import tempfile
import uuid
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
from psycopg import sql
from psycopg.conninfo import make_conninfo

from tests.runtime import Runtime

Conn = psycopg.Connection[Any]


def one(conn: Conn, query: str, *args: Any) -> Any:
    row = conn.execute(query, args).fetchone()
    assert row is not None
    return row[0]


@pytest.fixture(scope="module")
def users(module_dsn: str) -> Iterator[dict[str, str]]:
    """Two LOGIN roles ("Alice Q …", "bob's …"), each with its own schema; dropped at the end."""
    suffix = uuid.uuid4().hex[:8]
    names = {"alice": f"Alice Q {suffix}", "bob": f"bob's {suffix}"}
    with psycopg.connect(module_dsn, autocommit=True) as c:
        for name in names.values():
            c.execute(sql.SQL("CREATE ROLE {} LOGIN").format(sql.Identifier(name)))
            c.execute(sql.SQL("CREATE SCHEMA {} AUTHORIZATION {}").format(
                sql.Identifier(name), sql.Identifier(name)))
            c.execute("SELECT df.grant_usage(%s)", (name,))
        c.execute("CREATE TABLE public.canary (v text)")
        c.execute("INSERT INTO public.canary VALUES ('intact')")
    yield names
    with psycopg.connect(module_dsn, autocommit=True) as c:
        for name in names.values():
            c.execute(sql.SQL("DROP OWNED BY {} CASCADE").format(sql.Identifier(name)))
            c.execute(sql.SQL("DROP ROLE {}").format(sql.Identifier(name)))


@pytest.fixture(scope="module")
def runtime(module_dsn: str, users: dict[str, str]) -> Iterator[Runtime]:
    with Runtime(module_dsn, executors=2) as rt:
        yield rt


@pytest.fixture
def admin(module_dsn: str) -> Iterator[Conn]:
    with psycopg.connect(module_dsn, autocommit=True) as c:
        yield c


def connect_as(dsn: str, role: str) -> Conn:
    return psycopg.connect(make_conninfo(dsn, user=role), autocommit=True)


def run(dsn: str, role: str, expr: str, *args: Any) -> tuple[str, str | None, Any]:
    """Start `expr` as `role`, wait for it; (status, error of the failed SQL node, result)."""
    with connect_as(dsn, role) as c:
        i = one(c, f"SELECT df.start({expr})", *args)
        status = one(c, "SELECT df.await_instance(%s, 30)", i)
        error = one(c, "SELECT string_agg(error, ' | ') FROM df.nodes WHERE instance_id = %s"
                       " AND node_type = 'SQL' AND status = 'failed'", i)
        res = one(c, "SELECT df.result(%s)", i)
        return status, error, None if res is None else json.loads(res)


def untouched(admin: Conn, users: dict[str, str]) -> None:
    assert one(admin, "SELECT string_agg(v, ',') FROM public.canary") == "intact"
    assert one(admin, "SELECT bool_or(rolsuper OR rolcreaterole OR rolcreatedb OR rolbypassrls)"
                      " FROM pg_roles WHERE rolname = ANY(%s)", list(users.values())) is False


# -- 1. confinement: every escape fails, nothing changes ---------------------------------------

# PostgreSQL 15 says "must be superuser to alter superuser roles …", 16 and later "permission
# denied to alter role".
SUPERUSER_REFUSED = ("must be superuser", "permission denied to alter role")


def refused(error: str, message: str | tuple[str, ...]) -> bool:
    return any(m in error for m in ((message,) if isinstance(message, str) else message))


ESCAPES = {
    "reset_role": ("RESET ROLE", 'cannot set parameter "role"'),
    "set_role": ("SET ROLE postgres", 'cannot set parameter "role"'),
    "set_session_authorization": ("SET SESSION AUTHORIZATION postgres",
                                  'cannot set parameter "session_authorization"'),
    "set_local_role": ("SET LOCAL role postgres", 'cannot set parameter "role"'),
    "set_config_role": ("SELECT set_config('role', 'postgres', false)",
                        'cannot set parameter "role"'),
    "set_config_session_authorization": (
        "SELECT set_config('session_authorization', 'postgres', false)",
        'cannot set parameter "session_authorization"'),
    "write_canary": ("UPDATE public.canary SET v = 'pwned'", "permission denied"),
    "internal_function": ("SELECT df._command_start(NULL::df.commands)", "permission denied"),
    "claim_tasks": ("SELECT * FROM df._tasks_claim('{0}', '{}', '{}', 1)",
                    "permission denied for function _tasks_claim"),
    "runtime_table": ("SELECT * FROM df.tasks", "permission denied"),
    "secrets": ("SELECT * FROM df.secrets", "permission denied"),
    "update_instances": ("UPDATE df.instances SET status = 'cancelled'", "permission denied"),
    "trigger_on_runtime_table": (
        "CREATE TRIGGER t BEFORE INSERT ON df.mailbox FOR EACH ROW"
        " EXECUTE FUNCTION df._command_apply()", "permission denied"),
    "alter_own_step_function": (
        "ALTER FUNCTION df_exec.step_1(text[], boolean) SECURITY INVOKER",
        "permission denied for schema df_exec"),
    "grant_self": ("SELECT df.grant_usage(current_user, with_grant => true)",
                   "permission denied"),
    "alter_role": ("ALTER ROLE CURRENT_USER SUPERUSER", SUPERUSER_REFUSED),
    "shadow_search_path": ("SET search_path = pg_temp, public, pg_catalog",
                           "a step cannot change search_path"),
    "cursor_with_hold": ("DECLARE c CURSOR WITH HOLD FOR SELECT 1",
                         "cannot leave cursors or prepared statements"),
    "prepare": ("PREPARE p AS SELECT 1", "cannot leave cursors or prepared statements"),
}


@pytest.mark.parametrize("name", list(ESCAPES))
def test_an_escape_from_a_step_fails_and_changes_nothing(
        module_dsn: str, users: dict[str, str], runtime: Runtime, admin: Conn, name: str) -> None:
    statement, message = ESCAPES[name]
    status, error, _ = run(module_dsn, users["alice"], "df.sql(%s)", statement)
    assert status == "failed"
    assert error is not None and refused(error, message), error
    untouched(admin, users)


def test_temporary_objects_never_outlive_their_step(
        module_dsn: str, users: dict[str, str], runtime: Runtime, admin: Conn) -> None:
    # A temporary type named like a built-in one shadows it for every later statement of the
    # session (pg_temp is searched first for types and tables): left behind, it would run
    # the submitter's function inside the runtime's own queries, with the runtime's rights.
    alice = users["alice"]
    schema_ = sql.Identifier(alice).as_string(admin)
    role = sql.Literal(alice).as_string(admin)
    status, error, _ = run(
        module_dsn, alice, "df.seq(%s, %s) ~> %s ~> %s",
        f"CREATE FUNCTION {schema_}.spy(v pg_catalog.text) RETURNS boolean LANGUAGE plpgsql"
        f" AS $f$BEGIN IF current_user <> {role} THEN"
        f" EXECUTE format('ALTER ROLE %I SUPERUSER', {role}); END IF; RETURN true; END$f$",
        f"CREATE DOMAIN pg_temp.text AS pg_catalog.text CHECK ({schema_}.spy(VALUE))",
        "CREATE TEMP TABLE int4 (x int)",
        "SELECT count(*) AS n FROM pg_catalog.pg_type WHERE typnamespace = pg_my_temp_schema()")
    untouched(admin, users)
    assert status == "completed", error
    # the step after the one that made them sees none of them
    assert run(module_dsn, alice, "df.sql(%s)",
               "SELECT count(*) AS n FROM pg_catalog.pg_class"
               " WHERE relnamespace = pg_my_temp_schema()")[2] == {
                   "rows": [{"n": 0}], "row_count": 1}
    untouched(admin, users)


def test_copy_to_program_fails_and_runs_nothing(
        module_dsn: str, users: dict[str, str], runtime: Runtime, admin: Conn) -> None:
    marker = os.path.join(tempfile.gettempdir(), f"da-canary-{uuid.uuid4().hex}")
    status, error, _ = run(module_dsn, users["alice"], "df.sql(%s)",
                           f"COPY (SELECT 1) TO PROGRAM 'touch {marker}'")
    assert status == "failed" and error is not None and "COPY to or from" in error, error
    assert not os.path.exists(marker)
    untouched(admin, users)


def test_a_deferred_trigger_fires_inside_the_step_not_at_commit(
        module_dsn: str, users: dict[str, str], runtime: Runtime, admin: Conn) -> None:
    # At COMMIT, PostgreSQL 15 runs deferred triggers as the session's current role: the
    # runtime. The step function fires them before it returns, as the submitter.
    alice = users["alice"]
    role = sql.Identifier(alice).as_string(admin)
    status, error, _ = run(module_dsn, alice, "df.seq(df.seq(df.seq(%s, %s), %s), %s)",
                           "CREATE TABLE deferred_t (a int)",
                           "CREATE FUNCTION escalate() RETURNS trigger LANGUAGE plpgsql AS"
                           f" $f$BEGIN EXECUTE 'ALTER ROLE {role} SUPERUSER'; RETURN NULL;"
                           " END$f$",
                           "CREATE CONSTRAINT TRIGGER later AFTER INSERT ON deferred_t"
                           " DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION escalate()",
                           "INSERT INTO deferred_t VALUES (1)")
    assert status == "failed" and error is not None and refused(error, SUPERUSER_REFUSED), error
    assert one(admin, sql.SQL("SELECT count(*) FROM {}.deferred_t").format(
        sql.Identifier(alice)).as_string(admin)) == 0
    untouched(admin, users)


def test_a_value_holding_sql_stays_a_value(
        module_dsn: str, users: dict[str, str], runtime: Runtime, admin: Conn) -> None:
    payload = "x'); UPDATE public.canary SET v = 'pwned'; --"
    status, error, res = run(module_dsn, users["alice"],
                             "df.seq(df.as(df.sql(%s), 'n'), df.sql('SELECT $n AS v'))",
                             f"SELECT {psycopg.sql.quote(payload)} AS v")
    assert (status, error, res) == ("completed", None, {"rows": [{"v": payload}], "row_count": 1})
    untouched(admin, users)


def test_steps_run_as_their_submitter_with_the_usual_result_encoding(
        module_dsn: str, users: dict[str, str], runtime: Runtime) -> None:
    query = ("SELECT current_user::text AS who, 1.50::numeric(10,2) AS n, 2.5::float4 AS f,"
             " true AS b, '{\"k\": [1]}'::jsonb AS j, pg_sleep(0) AS v, 1 AS d, 2 AS d,"
             " NULL::int AS z, now() > $t AS after")
    status, error, res = run(module_dsn, users["bob"],
                             "df.seq(df.as(df.sql(%s), 't'), df.sql(%s))",
                             "SELECT '2000-01-01'::date::text", query)
    assert (status, error) == ("completed", None)
    assert res == {"rows": [{"who": users["bob"], "n": "1.50", "f": 2.5, "b": True,
                             "j": {"k": [1]}, "v": None, "d": 2, "z": None, "after": True}],
                   "row_count": 1}
    status, error, res = run(module_dsn, users["bob"], "df.sql(%s)",
                             "CREATE TABLE bob_t AS SELECT 1 AS a")
    assert (status, error, res) == ("completed", None, {"rows": [], "row_count": 0})
    status, error, res = run(module_dsn, users["bob"], "df.sql(%s)",
                             "INSERT INTO bob_t VALUES (2), (3) RETURNING a")
    assert res == {"rows": [{"a": 2}, {"a": 3}], "row_count": 2}
    status, error, _ = run(module_dsn, users["bob"], "df.sql(%s)", "SELECT 'x'::bytea")
    assert status == "failed" and error is not None and "Unsupported column type 'BYTEA'" in error


def test_a_role_without_its_step_function_cannot_run_steps(
        module_dsn: str, users: dict[str, str], runtime: Runtime, admin: Conn) -> None:
    bob = users["bob"]
    with connect_as(module_dsn, bob) as c:
        i = one(c, "SELECT df.start(df.seq(df.sleep(1), 'SELECT 1'))")
        admin.execute("SELECT df.revoke_usage(%s)", (bob,))
        try:
            assert one(admin, "SELECT df.await_instance(%s, 30)", i) == "failed"
            assert "has no step function" in one(
                admin, "SELECT string_agg(error, '') FROM df.nodes WHERE instance_id = %s"
                       " AND node_type = 'SQL'", i)
        finally:
            admin.execute("SELECT df.grant_usage(%s)", (bob,))


def test_a_step_of_a_dropped_role_fails_and_runs_as_nobody_else(
        module_dsn: str, runtime: Runtime, admin: Conn) -> None:
    name = f"gone {uuid.uuid4().hex[:8]}"
    admin.execute(sql.SQL("CREATE ROLE {} LOGIN").format(sql.Identifier(name)))
    admin.execute("SELECT df.grant_usage(%s)", (name,))
    with connect_as(module_dsn, name) as c:
        i = one(c, "SELECT df.start(df.seq(df.sleep(1),"
                   " 'INSERT INTO public.canary VALUES (current_user)'))")
    admin.execute(sql.SQL("DROP OWNED BY {} CASCADE").format(sql.Identifier(name)))
    admin.execute(sql.SQL("DROP ROLE {}").format(sql.Identifier(name)))
    assert one(admin, "SELECT df.await_instance(%s, 30)", i) == "failed"
    assert "does not exist" in one(
        admin, "SELECT string_agg(error, '') FROM df.nodes WHERE instance_id = %s"
               " AND node_type = 'SQL'", i)
    assert one(admin, "SELECT string_agg(v, ',') FROM public.canary") == "intact"


def test_vacuum_runs_outside_a_transaction_but_other_statements_do_not(
        module_dsn: str, users: dict[str, str], runtime: Runtime, admin: Conn) -> None:
    alice = users["alice"]
    status, error, _ = run(module_dsn, alice, "df.seq(%s, %s)",
                           "CREATE TABLE vac_t (a int)", "VACUUM vac_t")
    assert (status, error) == ("completed", None)
    status, error, _ = run(module_dsn, alice, "df.sql(%s)", "CREATE DATABASE nope")
    assert status == "failed" and error is not None and "only VACUUM" in error, error
    untouched(admin, users)


# -- 2. isolation ------------------------------------------------------------------------------

def test_another_role_cannot_see_or_touch_an_instance(
        module_dsn: str, users: dict[str, str], runtime: Runtime) -> None:
    with connect_as(module_dsn, users["alice"]) as a, connect_as(module_dsn, users["bob"]) as b:
        i = one(a, "SELECT df.start(df.wait_for_signal('go', 60), 'alice-label')")
        assert one(b, "SELECT df.status(%s)", i) is None
        assert one(b, "SELECT df.result(%s)", i) is None
        assert one(b, "SELECT count(*) FROM df.list_instances(NULL, 100, 'alice-label')") == 0
        assert one(b, "SELECT count(*) FROM df.instance_nodes(%s)", i) == 0
        for table in ("df.instances", "df.nodes", "df.commands"):
            assert one(b, f"SELECT count(*) FROM {table} WHERE instance_id = %s"
                       if table != "df.instances" else f"SELECT count(*) FROM {table}"
                       " WHERE id = %s", i) == 0
        for call in ("df.cancel(%s)", "df.signal(%s, 'go')"):
            with pytest.raises(psycopg.Error, match=f"Instance not found or access denied: {i}"):
                b.execute(f"SELECT {call}", (i,))
        with pytest.raises(psycopg.Error, match=f"Instance not found: {i}"):
            b.execute("SELECT df.await_instance(%s, 1)", (i,))
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            b.execute("SELECT * FROM df.metrics()")
        # A step of bob's sees no more than bob does.
        status, error, res = run(module_dsn, users["bob"], "df.sql(%s)",
                                 f"SELECT count(*) AS n FROM df.nodes WHERE instance_id = '{i}'")
        assert (status, res) == ("completed", {"rows": [{"n": 0}], "row_count": 1})
        assert one(a, "SELECT df.status(%s)", i) == "running"
        a.execute("SELECT df.signal(%s, 'go')", (i,))
        assert one(a, "SELECT df.await_instance(%s, 30)", i) == "completed"


# -- 3. bounded inputs -------------------------------------------------------------------------

def test_a_result_above_max_result_bytes_fails_the_step(
        module_dsn: str, users: dict[str, str], runtime: Runtime, admin: Conn) -> None:
    assert one(admin, "SELECT value FROM df.settings WHERE name = 'max_result_bytes'") == "1048576"
    status, error, _ = run(module_dsn, users["alice"], "df.sql(%s)",
                           "SELECT repeat('x', 2000000) AS big")
    assert status == "failed" and error is not None and "max_result_bytes" in error


def test_label_and_signal_payload_limits(
        module_dsn: str, users: dict[str, str], admin: Conn) -> None:
    with connect_as(module_dsn, users["alice"]) as a:
        with pytest.raises(psycopg.errors.ProgramLimitExceeded, match="max_label_length"):
            a.execute("SELECT df.start('SELECT 1', repeat('l', 1025))")
        i = one(a, "SELECT df.start(df.wait_for_signal('go', 60))")
        with pytest.raises(psycopg.errors.ProgramLimitExceeded,
                           match="max_signal_payload_bytes"):
            a.execute("SELECT df.signal(%s, 'go', repeat('p', 65537))", (i,))
        a.execute("SELECT df.cancel(%s)", (i,))


def test_running_instances_per_role_are_capped(
        module_dsn: str, users: dict[str, str], admin: Conn) -> None:
    admin.execute("UPDATE df.settings SET value = '2' WHERE name = 'max_running_instances_per_role'")
    try:
        with connect_as(module_dsn, users["bob"]) as b:
            b.execute("SELECT df.cancel(id) FROM df.instances WHERE status IN ('pending', 'running')")
            ids = [one(b, "SELECT df.start(df.wait_for_signal('go', 60))") for _ in range(2)]
            with pytest.raises(psycopg.errors.ProgramLimitExceeded,
                               match="max_running_instances_per_role"):
                b.execute("SELECT df.start('SELECT 1')")
            with connect_as(module_dsn, users["alice"]) as a:   # per role: alice unaffected
                a.execute("SELECT df.cancel(df.start('SELECT 1'))")
            for i in ids:
                b.execute("SELECT df.cancel(%s)", (i,))
    finally:
        admin.execute("UPDATE df.settings SET value = '10000'"
                      " WHERE name = 'max_running_instances_per_role'")


@pytest.mark.parametrize("limit", [4000, 10000])
def test_a_large_cap_holds_exactly_at_the_limit(
        module_dsn: str, users: dict[str, str], admin: Conn, limit: int) -> None:
    """Above 1024 the count starts from a 1/16 sample of the role's instance ids (from 8192, a
    1/256 sample before it); near the limit it is exact, so the cap holds to the instance."""
    admin.execute("UPDATE df.settings SET value = %s WHERE name = 'max_running_instances_per_role'",
                  (str(limit),))
    fill = ("INSERT INTO df.instances (id, root_node, status, submitted_by)"
            " SELECT left(md5('cap' || g), 8), '00000000', 'pending', r.oid"
            " FROM pg_roles r, generate_series(%s::int, %s::int) g"
            " WHERE r.rolname = %s")
    try:
        with connect_as(module_dsn, users["bob"]) as b:
            b.execute("SELECT df.cancel(id) FROM df.instances WHERE status IN ('pending', 'running')")
            admin.execute(fill, (1, limit - 1, users["bob"]))
            first = one(b, "SELECT df.start(df.wait_for_signal('go', 60))")   # the last one
            with pytest.raises(psycopg.errors.ProgramLimitExceeded,
                               match=f"has {limit} pending or running instances"):
                b.execute("SELECT df.start('SELECT 1')")
            b.execute("SELECT df.cancel(%s)", (first,))
            admin.execute("DELETE FROM df.instances WHERE id IN"
                          " (SELECT left(md5('cap' || g), 8) FROM generate_series(1000, %s) g)",
                          (limit - 1,))
            b.execute("SELECT df.cancel(df.start('SELECT 1'))")     # 999 left: sampled, passes
            # A finished instance no longer counts: at the limit again, one of them finishes.
            admin.execute(fill, (1000, limit - 1, users["bob"]))
            last = one(b, "SELECT df.start(df.wait_for_signal('go', 60))")
            with pytest.raises(psycopg.errors.ProgramLimitExceeded):
                b.execute("SELECT df.start('SELECT 1')")
            b.execute("SELECT df.cancel(%s)", (last,))
            b.execute("SELECT df.cancel(df.start('SELECT 1'))")
    finally:
        admin.execute("DELETE FROM df.instances WHERE id IN"
                      " (SELECT left(md5('cap' || g), 8) FROM generate_series(1, %s) g)",
                      (limit - 1,))
        admin.execute("UPDATE df.settings SET value = '10000'"
                      " WHERE name = 'max_running_instances_per_role'")


@pytest.mark.parametrize(("setting", "value", "expr", "message"), [
    ("max_node_count", "3", "df.seq(df.seq('SELECT 1', 'SELECT 2'), 'SELECT 3')",
     "maximum node count of 3"),
    ("max_nesting_depth", "1", "df.seq(df.seq('SELECT 1', 'SELECT 2'), 'SELECT 3')",
     "maximum nesting depth of 1"),
])
def test_graph_limits_are_settings(module_dsn: str, users: dict[str, str], admin: Conn,
                                   setting: str, value: str, expr: str, message: str) -> None:
    old = one(admin, "SELECT value FROM df.settings WHERE name = %s", setting)
    admin.execute("UPDATE df.settings SET value = %s WHERE name = %s", (value, setting))
    try:
        with connect_as(module_dsn, users["alice"]) as a, pytest.raises(psycopg.Error,
                                                                          match=message):
            a.execute(f"SELECT df.start({expr})")
    finally:
        admin.execute("UPDATE df.settings SET value = %s WHERE name = %s", (old, setting))


def test_foreach_of_an_unprivileged_role_stores_its_rows_and_only_its_own(
        module_dsn: str, users: dict[str, str], runtime: Runtime, admin: Conn) -> None:
    status, error, res = run(module_dsn, users["alice"], "df.foreach_query(%s, 'r', %s, 2)",
                             "SELECT g FROM generate_series(1, 3) g", "SELECT $r.g AS g")
    assert status == "completed", error
    assert [r["rows"][0]["g"] for r in res] == [1, 2, 3]
    # bob may store rows for his own running instances only, never for alice's
    with connect_as(module_dsn, users["alice"]) as a:
        i = one(a, "SELECT df.start(df.wait_for_signal('hold', 60))")
    try:
        with connect_as(module_dsn, users["bob"]) as b, pytest.raises(
                psycopg.errors.InsufficientPrivilege, match="row-level security"):
            b.execute("INSERT INTO df.foreach_rows VALUES (%s, '00000000', 1, 1, '{}')", (i,))
    finally:
        admin.execute("SELECT df.cancel(%s)", (i,))
    untouched(admin, users)
