-- 0009_foreach: [beyond] per-row fan-out. df.foreach runs a body once per row of a named
-- result (or of a query), each run a child instance in which $<name> is that row; at most
-- max_parallel children run at a time.
--
-- The rows are written to df.foreach_rows by one SQL step that runs the source as the
-- submitting role (INSERT … SELECT, inside the database: no process holds them), and are
-- handed to children a few at a time as others finish.

CREATE TABLE df.foreach_rows (
    instance_id text NOT NULL REFERENCES df.instances (id) ON DELETE CASCADE,
    node_id     text NOT NULL,
    activation  bigint NOT NULL,
    n           bigint NOT NULL,          -- 1-based row number, in the source's order
    row         text NOT NULL,            -- the row as a JSON object (column order kept)
    PRIMARY KEY (instance_id, node_id, activation, n)
);

-- The materialising step runs as the submitter: it may add rows to its own running
-- instances, and nothing else.
ALTER TABLE df.foreach_rows ENABLE ROW LEVEL SECURITY;
CREATE POLICY foreach_rows_own ON df.foreach_rows FOR INSERT
    WITH CHECK (EXISTS (SELECT 1 FROM df.instances i
                        WHERE i.id = instance_id AND i.status = 'running'
                          AND i.submitted_by = df._current_role()));
-- df.grant_usage grants INSERT (nothing goes to PUBLIC); roles granted before this migration:
DO $$
DECLARE
    v_role oid;
BEGIN
    FOR v_role IN
        SELECT DISTINCT a.grantee
        FROM pg_catalog.pg_namespace n, LATERAL aclexplode(n.nspacl) a
        WHERE n.nspname = 'df' AND a.privilege_type = 'USAGE'
          AND a.grantee <> 0 AND a.grantee <> n.nspowner
    LOOP
        EXECUTE format('GRANT INSERT ON df.foreach_rows TO %s', v_role::regrole);
    END LOOP;
END
$$;

CREATE FUNCTION df._foreach(p_config jsonb, p_body text) RETURNS text
LANGUAGE plpgsql STABLE AS $$
DECLARE
    v_name text := p_config ->> 'name';
    v_parallel int := (p_config ->> 'max_parallel')::int;
BEGIN
    IF v_name IS NULL OR v_name !~ '^[A-Za-z_][A-Za-z0-9_]*$' THEN
        RAISE EXCEPTION 'df.foreach: row name ''%'' is not a valid identifier — must match [a-zA-Z_][a-zA-Z0-9_]*',
            v_name USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF v_parallel IS NULL OR v_parallel NOT BETWEEN 1 AND 1000 THEN
        RAISE EXCEPTION 'df.foreach: max_parallel must be from 1 to 1000, got %', v_parallel
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF p_config ? 'source_query' AND btrim(p_config ->> 'source_query', E' \t\r\n;') = '' THEN
        RAISE EXCEPTION 'df.foreach_query: the source query is empty'
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    RETURN '{"node_type":"FOREACH","query":' || to_json(p_config::text)::text
           || ',"left_node":' || df._node(p_body) || '}';
END $$;

-- df.foreach('doc', body, max_parallel => 8): body once per row of the result named 'doc';
-- inside the body $doc is that row (one-row result: $doc.id, $doc.*, …).
CREATE FUNCTION df.foreach(name text, body text, max_parallel int DEFAULT 8) RETURNS text
LANGUAGE sql STABLE STRICT AS $$
    SELECT df._foreach(jsonb_build_object('name', name, 'max_parallel', max_parallel), body)
$$;

-- df.foreach_query($$SELECT id, url FROM docs WHERE todo$$, 'doc', body): the same over the
-- rows of a query (one SELECT, $names allowed), which runs once when the node starts.
CREATE FUNCTION df.foreach_query(source_query text, name text, body text,
                                 max_parallel int DEFAULT 8) RETURNS text
LANGUAGE sql STABLE STRICT AS $$
    SELECT df._foreach(jsonb_build_object('name', name, 'max_parallel', max_parallel,
                                          'source_query', source_query), body)
$$;

-- The recursive CTEs that validate and store a graph are estimated at thousands of rows, which
-- makes the planner JIT-compile them: ~30 ms per df.start for a few-node graph. Never worth it.
ALTER FUNCTION df._store_graph(text, jsonb, bigint, regrole, text) SET jit = off;
ALTER FUNCTION df._validate_graph(text) SET jit = off;
ALTER FUNCTION df._validate_graph_0002(text) SET jit = off;


-- df.explain(instance id) also lists the child instances its JOIN/RACE/FOREACH nodes spawned,
-- as a tree (the first 50; then how many more).
CREATE OR REPLACE FUNCTION df._explain_instance(p_instance_id text) RETURNS text
LANGUAGE plpgsql STABLE SECURITY INVOKER AS $$
DECLARE
    v_root text;
    v_label text;
    v_status text;
    v_map jsonb;
    v_output text;
    v_out text;
    v_children text;
    v_total bigint;
BEGIN
    SELECT i.root_node, i.label, i.status INTO v_root, v_label, v_status
      FROM df.instances i WHERE i.id = p_instance_id;
    IF NOT FOUND THEN
        RETURN format('Instance ''%s'' not found', p_instance_id);
    END IF;
    v_map := df._instance_node_map(p_instance_id);
    IF v_map IS NULL THEN
        RETURN format('No nodes found for instance ''%s''', p_instance_id);
    END IF;
    v_out := 'Instance: ' || p_instance_id
             || CASE WHEN v_label IS NOT NULL THEN ' (' || v_label || ')' ELSE '' END || E'\n'
             || 'Status:   ' || df._status_mark(v_status) || ' ' || v_status || E'\n';
    IF v_status = 'completed' THEN
        SELECT g.result_text INTO v_output
          FROM df._instance_graph_nodes(p_instance_id) g WHERE g.id = v_root;
        IF v_output IS NOT NULL THEN
            v_out := v_out || 'Output:   '
                     || CASE WHEN length(v_output) > 60 THEN left(v_output, 57) || '...'
                             ELSE v_output END || E'\n';
        END IF;
    END IF;
    v_out := v_out || E'\n' || df._render_tree(v_root, v_map, true);
    SELECT count(*) INTO v_total FROM df.instance_children(p_instance_id);
    IF v_total > 0 THEN
        SELECT string_agg(repeat('  ', c.depth) || df._status_mark(c.status) || ' ' || c.child_id
                          || ' (' || coalesce(n.node_type, '?') || ' ' || c.parent_node
                          || CASE WHEN n.node_type = 'FOREACH' THEN ' row ' ELSE ' branch ' END
                          || c.branch || ') ' || c.status, E'\n' ORDER BY c.ord)
          INTO v_children
          FROM (SELECT ch.*, row_number() OVER () AS ord
                  FROM df.instance_children(p_instance_id) ch LIMIT 50) c
          LEFT JOIN df.nodes n ON n.instance_id = c.parent_id AND n.id = c.parent_node;
        v_out := v_out || E'\n\nChild instances (' || v_total || E'):\n' || v_children
                 || CASE WHEN v_total > 50 THEN E'\n  … and ' || (v_total - 50) || ' more'
                         ELSE '' END;
    END IF;
    RETURN v_out;
END
$$;

CREATE FUNCTION df._status_mark(p_status text) RETURNS text
LANGUAGE sql IMMUTABLE AS $$
    SELECT CASE p_status WHEN 'completed' THEN '✓' WHEN 'failed' THEN '✗'
                         WHEN 'cancelled' THEN '✗' WHEN 'running' THEN '⏳' ELSE '○' END
$$;

-- transaction_mode 'new' and awaiting an instance in the transaction that started it
-- (SELECT df.result(df.await_instance(df.start(…), 30))) need dblink. Install it where the
-- migrating role may (a superuser, or a managed service that allows it); elsewhere those two
-- features say how to enable it, and everything else works without.
DO $$
BEGIN
    IF df._dblink_schema() IS NULL
       AND EXISTS (SELECT 1 FROM pg_catalog.pg_available_extensions WHERE name = 'dblink') THEN
        BEGIN
            CREATE EXTENSION IF NOT EXISTS dblink;
        EXCEPTION WHEN insufficient_privilege OR feature_not_supported
                       OR object_not_in_prerequisite_state THEN
            RAISE NOTICE 'dblink not installed (%): transaction_mode ''new'' and same-transaction awaits need it', SQLERRM;
        END;
    END IF;
END
$$;

REVOKE ALL ON ALL FUNCTIONS IN SCHEMA df FROM PUBLIC;

-- Roles granted before 0004 and this migration get their new functions.
SELECT df._grant_to_users(ARRAY['_family_depth', 'instance_children', '_foreach', 'foreach',
                                'foreach_query', '_status_mark']);
