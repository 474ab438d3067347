"""df.start, df.commands, status/result, list_instances, cancel, signal, variables, grants.

No runtime runs here: these tests pin what the SQL side does on its own (validation, storage,
visibility). tests/integration/test_runtime.py runs the instances.
"""

from __future__ import annotations

import re
import subprocess
import sys
import uuid
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
from psycopg import sql

from tests.integration.test_graph_validation import MALFORMED

Conn = psycopg.Connection[Any]
ID = re.compile(r"^[0-9a-f]{8}$")
TABLES = ("df.instances", "df.nodes", "df.commands", "df.mailbox")


def one(conn: Conn, query: str, *args: Any) -> Any:
    row = conn.execute(query, args).fetchone()
    assert row is not None
    return row[0]


def counts(conn: Conn) -> dict[str, int]:
    return {t: one(conn, f"SELECT count(*) FROM {t}") for t in TABLES}


@pytest.fixture
def roles(conn: Conn) -> Iterator[Any]:
    """Make roles with unique names (roles are server-wide); drop them afterwards."""
    made: list[str] = []

    def make(kind: str, *, login: bool = True, grant: bool = True, **grant_args: bool) -> str:
        name = f"da_test_{kind}_{uuid.uuid4().hex[:8]}"
        conn.execute(sql.SQL("CREATE ROLE {} {}").format(
            sql.Identifier(name), sql.SQL("LOGIN" if login else "NOLOGIN")))
        made.append(name)
        if grant:
            args = ", ".join(f"{k} => {str(v).lower()}" for k, v in grant_args.items())
            conn.execute(f"SELECT df.grant_usage(%s{', ' + args if args else ''})", (name,))
        return name

    yield make
    conn.execute("RESET ROLE")
    for name in made:
        conn.execute(sql.SQL("DROP OWNED BY {}").format(sql.Identifier(name)))
        conn.execute(sql.SQL("DROP ROLE {}").format(sql.Identifier(name)))


def as_role(conn: Conn, role: str | None) -> None:
    if role is None:
        conn.execute("RESET ROLE")
    else:
        conn.execute(sql.SQL("SET ROLE {}").format(sql.Identifier(role)))


# -- df.start ---------------------------------------------------------------------------------

def test_start_stores_a_pending_instance_its_graph_and_a_command(conn: Conn) -> None:
    i = one(conn, "SELECT df.start(df.seq('SELECT 1', 'SELECT 2'), 'my label')")
    assert ID.match(i)
    assert one(conn, "SELECT df.status(%s)", i) == "pending"
    inst = conn.execute("SELECT label, status, root_node, submitted_by::text, completed_at"
                        " FROM df.instances WHERE id = %s", (i,)).fetchone()
    assert inst is not None
    label, status, root, who, completed = inst
    assert (label, status, who, completed) == ("my label", "pending", "postgres", None)
    rows = conn.execute("SELECT id, node_type, query, left_node, right_node, parent_node, status"
                        " FROM df.nodes WHERE instance_id = %s ORDER BY position", (i,)).fetchall()
    assert [r[1] for r in rows] == ["THEN", "SQL", "SQL"]
    then, first, second = rows
    assert then[0] == root and (then[3], then[4]) == (first[0], second[0])
    assert [r[2] for r in rows] == [None, "SELECT 1", "SELECT 2"]
    assert [r[5] for r in rows] == [None, root, root]
    assert {r[6] for r in rows} == {"pending"} and all(ID.match(r[0]) for r in rows)
    assert one(conn, "SELECT count(*) FROM df.commands WHERE instance_id = %s"
                     " AND command = 'start'", i) == 1
    assert one(conn, "SELECT kind FROM df.mailbox WHERE instance_id = %s", i) == "start"


def test_a_plain_sql_string_is_a_workflow(conn: Conn) -> None:
    i = one(conn, "SELECT df.start('SELECT 42')")
    assert one(conn, "SELECT node_type || ':' || query FROM df.nodes WHERE instance_id = %s",
               i) == "SQL:SELECT 42"


def test_composite_children_move_into_the_stored_config(conn: Conn) -> None:
    i = one(conn, "SELECT df.start(df.join(VARIADIC ARRAY['SELECT 1', 'SELECT 2', 'SELECT 3']))")
    join = conn.execute("SELECT query::jsonb, left_node, right_node FROM df.nodes"
                        " WHERE instance_id = %s AND node_type = 'JOIN'", (i,)).fetchone()
    assert join is not None
    ids = [r[0] for r in conn.execute("SELECT id FROM df.nodes WHERE instance_id = %s"
                                      " AND node_type = 'SQL' ORDER BY position", (i,))]
    assert (join[1], join[2], join[0]) == (ids[0], ids[1], {"extra_nodes": [ids[2]]})
    i = one(conn, "SELECT df.start(df.if('SELECT true', 'SELECT 1', 'SELECT 2'))")
    cfg = one(conn, "SELECT query::jsonb FROM df.nodes WHERE instance_id = %s"
                    " AND node_type = 'IF'", i)
    assert one(conn, "SELECT query FROM df.nodes WHERE instance_id = %s AND id = %s",
               i, cfg["condition_node"]) == "SELECT true"


def test_a_200_step_chain_is_399_rows(conn: Conn) -> None:
    expr = "'SELECT 0'"
    for n in range(1, 200):
        expr = f"df.seq({expr}, 'SELECT {n}')"
    i = one(conn, f"SELECT df.start({expr})")
    assert one(conn, "SELECT count(*) FROM df.nodes WHERE instance_id = %s", i) == 399


# A graph with every kind of child: extra branches, a condition, a loop, options, names.
RICH = ("df.seq(df.as(df.join(VARIADIC ARRAY['SELECT 1 AS a', 'SELECT 2', 'SELECT 3']), 'j'),"
        " df.if('SELECT true', df.timeout(df.retry('SELECT 4', 5), 2),"
        " df.loop('SELECT 5', 'SELECT false')))")


def stored_graph(conn: Conn, instance: str) -> list[tuple[Any, ...]]:
    """An instance's node rows with ids replaced by positions (ids differ per instance)."""
    rows = conn.execute("SELECT id, node_type, query, result_name, left_node, right_node,"
                        " parent_node, position, options, status FROM df.nodes"
                        " WHERE instance_id = %s ORDER BY position", (instance,)).fetchall()
    at = {r[0]: r[7] for r in rows}
    out = []
    for r in rows:
        query = r[2]
        for node_id, position in at.items():
            query = query.replace(f'"{node_id}"', f'"#{position}"') if query else query
        out.append((r[1], query, r[3], at.get(r[4]), at.get(r[5]), at.get(r[6]), r[7], r[8],
                    r[9]))
    return out


def test_a_session_stores_a_graph_it_just_started_from_its_template(conn: Conn) -> None:
    """The first start walks the graph; the next ones of the same graph in the session store
    the template it kept, with the same rows."""
    conn.execute("RESET df.start_template")
    conn.execute("SET track_functions = 'all'")
    with conn.transaction():
        first = one(conn, f"SELECT df.start({RICH})")
        kept = one(conn, "SELECT current_setting('df.start_template')")
        second = one(conn, f"SELECT df.start({RICH})")
        walks = one(conn, "SELECT pg_stat_get_xact_function_calls("
                          "'df._graph_template(jsonb)'::regprocedure)")
    assert walks == 1
    assert one(conn, "SELECT current_setting('df.start_template')") == kept
    rows = stored_graph(conn, first)
    assert len(rows) == 11 and stored_graph(conn, second) == rows
    assert {r[0] for r in rows} == {"THEN", "JOIN", "SQL", "IF", "LOOP"}
    assert any(r[7] for r in rows) and any(r[2] == "j" for r in rows)
    root = one(conn, "SELECT root_node FROM df.instances WHERE id = %s", second)
    assert one(conn, "SELECT position FROM df.nodes WHERE instance_id = %s AND id = %s",
               second, root) == 0
    other = one(conn, "SELECT df.start('SELECT 42')")             # another graph: walked
    assert stored_graph(conn, other) == [("SQL", "SELECT 42", None, None, None, None, 0, None,
                                          "pending")]
    assert one(conn, "SELECT current_setting('df.start_template')") != kept


def test_a_forged_template_is_not_used(conn: Conn) -> None:
    """Any role may set df.start_template; without the schema owner's seal it is ignored."""
    graph = "df.seq('SELECT 1', 'SELECT 2')"
    one(conn, f"SELECT df.start({graph})")
    kept = one(conn, "SELECT current_setting('df.start_template')")
    forged = kept.replace("SELECT 2", "DROP TABLE victim")
    assert forged != kept
    conn.execute("SELECT set_config('df.start_template', %s, false)", (forged,))
    i = one(conn, f"SELECT df.start({graph})")
    assert [r[1] for r in stored_graph(conn, i)] == [None, "SELECT 1", "SELECT 2"]
    assert one(conn, "SELECT current_setting('df.start_template')") == kept


def test_a_kept_template_does_not_outlive_a_change_of_settings(conn: Conn) -> None:
    graph = "df.seq('SELECT 1', 'SELECT 2')"
    one(conn, f"SELECT df.start({graph})")
    conn.execute("UPDATE df.settings SET value = '2' WHERE name = 'max_node_count'")
    try:
        with pytest.raises(psycopg.errors.ProgramLimitExceeded,
                           match="maximum node count of 2"):
            conn.execute(f"SELECT df.start({graph})")
    finally:
        conn.execute("UPDATE df.settings SET value = '10000' WHERE name = 'max_node_count'")


def test_insert_into_commands_by_hand_starts_an_instance(conn: Conn) -> None:
    i = one(conn, "INSERT INTO df.commands (command, graph, label)"
                  " VALUES ('start', df.seq('SELECT 1', 'SELECT 2'), 'by hand')"
                  " RETURNING instance_id")
    assert ID.match(i)
    assert conn.execute("SELECT label, status FROM df.instances WHERE id = %s",
                        (i,)).fetchone() == ("by hand", "pending")


@pytest.mark.parametrize(("call", "message"), [
    ("df.start('SELECT 1', NULL, 'no_such_database_here')",
     'database "no_such_database_here" does not exist'),
    ("df.start('SELECT 1', NULL, NULL, 'sometimes')", "invalid transaction_mode 'sometimes'"),
    ("df.start(NULL)", "the workflow is NULL"),
    ("df.start('   ')", "empty"),
])
def test_start_time_errors_write_nothing(conn: Conn, call: str, message: str) -> None:
    before = counts(conn)
    with pytest.raises(psycopg.Error, match=re.escape(message)):
        conn.execute(f"SELECT {call}")
    assert counts(conn) == before


@pytest.mark.parametrize(("expr", "message"), MALFORMED)
def test_malformed_workflows_are_rejected_before_anything_is_written(
        conn: Conn, expr: str, message: str) -> None:
    before = counts(conn)
    with pytest.raises(psycopg.Error) as err:
        conn.execute(f"SELECT df.start({expr})")
    assert message in str(err.value)
    assert counts(conn) == before


def test_unknown_commands_are_refused(conn: Conn) -> None:
    with pytest.raises(psycopg.Error, match="unknown command 'restart'"):
        conn.execute("INSERT INTO df.commands (command) VALUES ('restart')")


def test_transaction_mode_is_case_insensitive(conn: Conn) -> None:
    i = one(conn, "SELECT df.start('SELECT 1', NULL, NULL, 'CALLER')")
    assert one(conn, "SELECT transaction_mode FROM df.instances WHERE id = %s", i) == "caller"


def test_caller_mode_rolls_back_with_the_caller(module_dsn: str) -> None:
    with psycopg.connect(module_dsn) as c:
        i = one(c, "SELECT df.start('SELECT 1')")
        c.rollback()
        assert one(c, "SELECT count(*) FROM df.instances WHERE id = %s", i) == 0


def test_new_mode_survives_the_callers_rollback(conn: Conn, module_dsn: str) -> None:
    conn.execute("CREATE EXTENSION IF NOT EXISTS dblink")
    with psycopg.connect(module_dsn) as c:
        i = one(c, "SELECT df.start('SELECT 7', 'independent', NULL, 'new')")
        c.rollback()
    assert conn.execute("SELECT label, status FROM df.instances WHERE id = %s",
                        (i,)).fetchone() == ("independent", "pending")


def test_new_mode_is_refused_inside_a_workflow(conn: Conn) -> None:
    with conn.transaction():
        conn.execute("SELECT set_config('df.instance_id', 'abcdef01', true)")
        with pytest.raises(psycopg.Error, match="cannot be used inside a workflow"):
            conn.execute("SELECT df.start('SELECT 1', NULL, NULL, 'new')")


def test_new_mode_and_same_transaction_awaits_need_dblink(fresh_dsn: str) -> None:
    with psycopg.connect(fresh_dsn, autocommit=True) as c:
        # the migrations install dblink where the migrating role may (here: a superuser)
        assert one(c, "SELECT df._dblink_schema()") is not None
        c.execute("DROP EXTENSION dblink")
        before = counts(c)
        with pytest.raises(psycopg.Error, match="needs the dblink extension"):
            c.execute("SELECT df.start('SELECT 1', NULL, NULL, 'new')")
        assert counts(c) == before
        with pytest.raises(psycopg.Error, match="started in this transaction; commit before"):
            c.execute("SELECT df.await_instance(df.start('SELECT 1'), 5)")
        assert counts(c) == before


def test_superusers_are_refused_unless_enabled(conn: Conn) -> None:
    with pytest.raises(psycopg.Error, match="superuser instances are disabled"):
        with conn.transaction():
            conn.execute("UPDATE df.settings SET value = 'false'"
                         " WHERE name = 'enable_superuser_instances'")
            conn.execute("SELECT df.start('SELECT 1')")
    assert one(conn, "SELECT df._setting('enable_superuser_instances')") == "true"


# -- roles -----------------------------------------------------------------------------------

def test_a_granted_role_starts_and_sees_only_its_own(conn: Conn, roles: Any) -> None:
    alice, bob = roles("alice"), roles("bob")
    mine = one(conn, "SELECT df.start('SELECT 1')")
    as_role(conn, alice)
    i = one(conn, "SELECT df.start(df.seq('SELECT 1', 'SELECT 2'))")
    assert ID.match(i) and one(conn, "SELECT df.status(%s)", i) == "pending"
    assert one(conn, "SELECT submitted_by::text FROM df.instances WHERE id = %s", i) == alice
    assert one(conn, "SELECT df.status(%s)", mine) is None
    assert one(conn, "SELECT count(*) FROM df.nodes WHERE instance_id = %s", mine) == 0
    as_role(conn, bob)
    assert one(conn, "SELECT df.status(%s)", i) is None
    assert one(conn, "SELECT count(*) FROM df.list_instances()") == 0
    for call in ("df.cancel(%s)", "df.signal(%s, 'go')"):
        with pytest.raises(psycopg.Error, match=f"Instance not found or access denied: {i}"):
            conn.execute(f"SELECT {call}", (i,))
    with pytest.raises(psycopg.Error, match=f"Instance not found: {i}"):
        conn.execute("SELECT df.await_instance(%s, 1)", (i,))
    as_role(conn, None)
    assert one(conn, "SELECT df.status(%s)", i) == "pending"   # the runtime's role sees all


def test_a_role_cannot_submit_in_someone_elses_name(conn: Conn, roles: Any) -> None:
    alice = roles("alice")
    as_role(conn, alice)
    i = one(conn, "INSERT INTO df.commands (command, graph, submitted_by)"
                  " VALUES ('start', 'SELECT 1', 'postgres') RETURNING instance_id")
    as_role(conn, None)
    assert one(conn, "SELECT submitted_by::text FROM df.instances WHERE id = %s", i) == alice


def test_without_grant_usage_nothing_is_allowed(conn: Conn, roles: Any) -> None:
    carol = roles("carol", grant=False)
    as_role(conn, carol)
    with pytest.raises(psycopg.errors.InsufficientPrivilege):
        conn.execute("SELECT df.start('SELECT 1')")


def test_only_admins_grant_and_admin_rights_delegate(conn: Conn, roles: Any) -> None:
    alice, admin, dave = roles("alice"), roles("admin", with_grant=True), roles("dave", grant=False)
    as_role(conn, alice)
    for call in ("df.grant_usage(%s)", "df.revoke_usage(%s)"):
        with pytest.raises(psycopg.errors.InsufficientPrivilege, match="permission denied"):
            conn.execute(f"SELECT {call}", (dave,))
    with pytest.raises(psycopg.errors.InsufficientPrivilege):
        conn.execute("SELECT * FROM df.metrics()")
    as_role(conn, admin)
    assert one(conn, "SELECT df.grant_usage(%s)", dave) == "OK"
    assert one(conn, "SELECT total_instances >= 0 FROM df.metrics()") is True
    as_role(conn, dave)
    assert ID.match(one(conn, "SELECT df.start('SELECT 1')"))
    as_role(conn, admin)
    assert one(conn, "SELECT df.revoke_usage(%s)", dave) == "OK"
    as_role(conn, dave)
    with pytest.raises(psycopg.errors.InsufficientPrivilege):
        conn.execute("SELECT df.start('SELECT 1')")


def test_http_needs_include_http(conn: Conn, roles: Any) -> None:
    plain, web = roles("plain"), roles("web", include_http=True)
    as_role(conn, plain)
    with pytest.raises(psycopg.errors.InsufficientPrivilege):
        conn.execute("SELECT df.http('https://example.com/')")
    as_role(conn, web)
    assert "HTTP" in one(conn, "SELECT df.http('https://example.com/')")


def test_odd_role_names_work(conn: Conn, roles: Any) -> None:
    odd = f'Odd "Role" {uuid.uuid4().hex[:6]}'
    conn.execute(sql.SQL("CREATE ROLE {} LOGIN").format(sql.Identifier(odd)))
    try:
        assert one(conn, "SELECT df.grant_usage(%s)", odd) == "OK"
        as_role(conn, odd)
        i = one(conn, "SELECT df.start('SELECT 1')")
        assert one(conn, "SELECT df.status(%s)", i) == "pending"
    finally:
        as_role(conn, None)
        conn.execute(sql.SQL("DROP OWNED BY {}").format(sql.Identifier(odd)))
        conn.execute(sql.SQL("DROP ROLE {}").format(sql.Identifier(odd)))


def test_roles_without_login_are_refused_unless_allowed(conn: Conn, roles: Any) -> None:
    ghost = roles("ghost", login=False)
    as_role(conn, ghost)
    with pytest.raises(psycopg.Error, match=f'current_user "{ghost}" does not have LOGIN'):
        conn.execute("SELECT df.start('SELECT 1')")
    as_role(conn, None)
    with conn.transaction():
        conn.execute("UPDATE df.settings SET value = 'true' WHERE name = 'allow_nologin_instances'")
        as_role(conn, ghost)
        assert ID.match(one(conn, "SELECT df.start('SELECT 1')"))
        as_role(conn, None)
        conn.execute("UPDATE df.settings SET value = 'false'"
                     " WHERE name = 'allow_nologin_instances'")


def test_migrate_twice_then_a_granted_role_starts_a_workflow(empty_dsn: str) -> None:
    """The foundation issue's acceptance check, through the CLI."""
    for _ in range(2):
        done = subprocess.run([sys.executable, "-m", "durable_actor", "migrate", "--dsn", empty_dsn],
                              capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr
    role = f"da_test_user_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(empty_dsn, autocommit=True) as c:
        c.execute(sql.SQL("CREATE ROLE {} LOGIN").format(sql.Identifier(role)))
        try:
            c.execute("SELECT df.grant_usage(%s)", (role,))
            as_role(c, role)
            i = one(c, "SELECT df.start($$SELECT 1$$ ~> $$SELECT 2$$)")
            assert ID.match(i)
            assert one(c, "SELECT df.status(%s)", i) == "pending"
        finally:
            as_role(c, None)
            c.execute(sql.SQL("DROP OWNED BY {}").format(sql.Identifier(role)))
            c.execute(sql.SQL("DROP ROLE {}").format(sql.Identifier(role)))


# -- reading ---------------------------------------------------------------------------------

def test_status_and_result_of_unknown_or_unfinished_instances_are_null(conn: Conn) -> None:
    assert one(conn, "SELECT df.status('00000000')") is None
    assert one(conn, "SELECT df.result('00000000')") is None
    i = one(conn, "SELECT df.start('SELECT 1', 'a-label')")
    assert one(conn, "SELECT df.result(%s)", i) is None
    assert one(conn, "SELECT df.status('a-label')") is None


def test_list_instances_pages_newest_first(conn: Conn) -> None:
    label = f"page-{uuid.uuid4().hex[:6]}"
    ids = [one(conn, "SELECT df.start('SELECT 1', %s)", label) for _ in range(5)]
    rows = conn.execute("SELECT * FROM df.list_instances(NULL, 2, %s)", (label,)).fetchall()
    seen = [r[0] for r in rows]
    cursor = rows[0][-1]
    assert cursor is not None and {r[-1] for r in rows} == {cursor}
    while cursor is not None:
        rows = conn.execute("SELECT * FROM df.list_instances(NULL, 2, %s, %s)",
                            (label, cursor)).fetchall()
        seen += [r[0] for r in rows]
        cursor = rows[0][-1]
    assert sorted(seen) == sorted(ids) and len(seen) == 5
    created = [one(conn, "SELECT created_at FROM df.instances WHERE id = %s", i) for i in seen]
    assert created == sorted(created, reverse=True)
    short = conn.execute("SELECT instance_id, label, function_name, status, execution_count,"
                         " output FROM df.list_instances('pending', 1000)").fetchall()
    assert set(ids) <= {r[0] for r in short}
    assert {r[3] for r in short} == {"pending"} and {r[4] for r in short} == {1}


@pytest.mark.parametrize(("args", "message"), [
    ("NULL, 0", "limit_count must be at least 1"),
    ("NULL, 1001", "must not exceed 1000"),
    ("NULL, 10, NULL, 'not-a-cursor'", "invalid cursor"),
])
def test_list_instances_rejects_bad_arguments(conn: Conn, args: str, message: str) -> None:
    with pytest.raises(psycopg.Error, match=message):
        conn.execute(f"SELECT * FROM df.list_instances({args})")


def test_instance_views(conn: Conn) -> None:
    i = one(conn, "SELECT df.start(df.seq('SELECT 1', 'SELECT 2'), 'views')")
    nodes = conn.execute("SELECT node_type, status, inferred_status FROM df.instance_nodes(%s)",
                         (i,)).fetchall()
    assert nodes == [("THEN", "pending", "pending"), ("SQL", "pending", "pending"),
                     ("SQL", "pending", "pending")]
    info = conn.execute("SELECT instance_id, label, status, output FROM df.instance_info(%s)",
                        (i,)).fetchone()
    assert info == (i, "views", "pending", None)
    assert conn.execute("SELECT count(*) FROM df.instance_executions(%s)", (i,)).fetchone() == (1,)
    with pytest.raises(psycopg.Error, match="limit_count must be at least 1"):
        conn.execute("SELECT * FROM df.instance_executions(%s, 0)", (i,))
    assert one(conn, "SELECT total_instances > 0 FROM df.metrics()") is True


# -- cancel, signal, await -------------------------------------------------------------------

def test_cancel_is_immediate_and_idempotent(conn: Conn) -> None:
    i = one(conn, "SELECT df.start('SELECT 1')")
    assert one(conn, "SELECT df.cancel(%s, 'enough')", i) == f"Instance {i} cancelled: enough"
    assert one(conn, "SELECT df.status(%s)", i) == "cancelled"
    assert one(conn, "SELECT status FROM df.list_instances(NULL, 1000) WHERE instance_id = %s",
               i) == "cancelled"
    assert one(conn, "SELECT df.cancel(%s)", i) == f"Instance {i} is already cancelled"
    assert one(conn, "SELECT df.await_instance(%s, 1)", i) == "cancelled"
    with pytest.raises(psycopg.Error, match="Instance not found or access denied: 12345678"):
        conn.execute("SELECT df.cancel('12345678')")


def test_signals_queue_json_or_text_and_terminal_instances_discard(conn: Conn) -> None:
    i = one(conn, "SELECT df.start('SELECT 1')")
    assert one(conn, "SELECT df.signal(%s, 'go', 'plain text')", i) == "OK"
    assert one(conn, "SELECT df.signal(%s, 'go', '{\"b\": 2, \"a\": 1}')", i) == "OK"
    assert one(conn, "SELECT df.signal(%s, 'go')", i) == "OK"
    payloads = [r[0] for r in conn.execute(
        "SELECT payload FROM df.mailbox WHERE instance_id = %s AND kind = 'signal' ORDER BY id",
        (i,))]
    assert payloads == ['{"name":"go","data":"plain text"}',
                        '{"name":"go","data":{"b": 2, "a": 1}}', '{"name":"go","data":{}}']
    conn.execute("SELECT df.cancel(%s)", (i,))
    assert one(conn, "SELECT df.signal(%s, 'go')", i) == "OK"
    assert one(conn, "SELECT count(*) FROM df.mailbox WHERE instance_id = %s"
                     " AND kind = 'signal'", i) == 3
    for call, message in (("df.signal('', 'go')", "instance_id must not be empty"),
                          ("df.signal(%s, '')", "signal_name must not be empty")):
        with pytest.raises(psycopg.Error, match=message):
            conn.execute(f"SELECT {call}", (i,) if "%s" in call else ())


def test_await_instance_errors(conn: Conn, module_dsn: str) -> None:
    i = one(conn, "SELECT df.start('SELECT 1')")
    with pytest.raises(psycopg.Error, match=f"Timeout after 1s waiting for instance {i}"
                                            r" \(status: pending\)"):
        conn.execute("SELECT df.await_instance(%s, 1)", (i,))
    with pytest.raises(psycopg.Error, match="timeout_seconds must be positive"):
        conn.execute("SELECT df.await_instance(%s, 0)", (i,))
    with pytest.raises(psycopg.Error, match="Instance not found: 0000abcd"):
        conn.execute("SELECT df.await_instance('0000abcd')")
    conn.execute("CREATE EXTENSION IF NOT EXISTS dblink")
    with psycopg.connect(module_dsn) as c:
        # Started by this transaction: handed over to a session of its own, which waits for
        # the runtime like any other (none runs here), is cancelled at the deadline.
        j = one(c, "SELECT df.start('SELECT 1')")
        with pytest.raises(psycopg.Error, match=f"Timeout after 1s waiting for instance {j}"):
            c.execute("SELECT df.await_instance(%s, 1)", (j,))
        c.rollback()
    assert one(conn, "SELECT count(*) FROM df.instances WHERE id = %s", j) == 0
    assert one(conn, "SELECT count(*) FROM df.instances WHERE status = 'cancelled' AND"
                     " id IN (SELECT instance_id FROM df.commands WHERE graph = 'SELECT 1')") >= 1
    with conn.transaction():
        conn.execute("SELECT set_config('df.instance_id', 'abcdef01', true)")
        with pytest.raises(psycopg.Error, match="cannot be called inside a workflow"):
            conn.execute("SELECT df.await_instance(%s, 1)", (i,))


# -- variables -------------------------------------------------------------------------------

def test_variables_are_per_role_and_snapshotted_at_start(conn: Conn, roles: Any) -> None:
    conn.execute("SELECT df.clearvars()")
    assert one(conn, "SELECT df.setvar('table', 'docs')") == "OK"
    assert one(conn, "SELECT df.setvar('table', 'docs2')") == "OK"
    assert one(conn, "SELECT df.getvar('table')") == "docs2"
    i = one(conn, "SELECT df.start('SELECT 1')")
    assert one(conn, "SELECT df.unsetvar('table')") == "OK"
    assert one(conn, "SELECT df.getvar('table')") is None
    assert one(conn, "SELECT vars FROM df.instances WHERE id = %s", i) == {"table": "docs2"}
    alice = roles("alice")
    conn.execute("SELECT df.setvar('secret', 'mine')")
    as_role(conn, alice)
    assert one(conn, "SELECT df.getvar('secret')") is None
    assert one(conn, "SELECT count(*) FROM df.vars") == 0
    conn.execute("SELECT df.setvar('secret', 'hers')")
    assert one(conn, "SELECT df.getvar('secret')") == "hers"
    as_role(conn, None)
    assert one(conn, "SELECT df.getvar('secret')") == "mine"
    assert one(conn, "SELECT df.clearvars()") == "OK"
    assert one(conn, "SELECT df.getvar('secret')") is None


@pytest.mark.parametrize("call", ["df.setvar('a', 'b')", "df.unsetvar('a')", "df.clearvars()"])
def test_variables_cannot_change_inside_a_workflow(conn: Conn, call: str) -> None:
    with conn.transaction():
        conn.execute("SELECT set_config('df.instance_id', 'abcdef01', true)")
        with pytest.raises(psycopg.Error, match="cannot be called inside a workflow"):
            conn.execute(f"SELECT {call}")
