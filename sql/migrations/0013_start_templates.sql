-- 0013_start_templates: df.start stores a graph it has just seen without walking it again.
--
-- Validating a graph and exploding it into node rows were half of what df.start cost, and a
-- client mostly starts the same workflow again and again. The walk now yields a template,
-- the graph's node rows with positions in place of ids (df._graph_template), and an instance
-- is stored by inserting the template's rows with the instance's ids (df._store_template).
--
-- Each session keeps the template of the last graph it started in the setting
-- df.start_template, sealed with a key that only the schema owner can read (df.secrets): any
-- role can set a setting, but not forge a seal. A start whose graph text and graph limits
-- (max_nesting_depth, max_node_count: what validation reads of df.settings) are those the
-- template was made from uses it; any other start walks its graph as before and
-- keeps that template instead. Nothing is shared between sessions, so a workload of ever
-- different graphs costs one set_config per start more and leaves nothing behind.

INSERT INTO df.secrets (name, value)
VALUES ('start_template_key', gen_random_uuid()::text || gen_random_uuid()::text);

-- The node rows of a validated graph (df._validate_graph) in pre-order, as a JSON array:
-- t node_type, q query, n result_name, l/r/c left/right/condition child, x extra children,
-- u parent (children as positions in the array), o options. Absent keys are NULL.
CREATE FUNCTION df._graph_template(p_graph jsonb) RETURNS jsonb
LANGUAGE plpgsql STABLE AS $$
BEGIN
    RETURN (
        WITH RECURSIVE tree(node, path, parent_path, slot) AS (
            SELECT p_graph, ARRAY[]::int[], NULL::int[], NULL::text
            UNION ALL
            SELECT c.child, t.path || c.ord, t.path, c.slot
            FROM tree t
            CROSS JOIN LATERAL (
                SELECT t.node -> 'condition_node' AS child, 0 AS ord, 'condition' AS slot
                WHERE jsonb_typeof(t.node -> 'condition_node') = 'object'
                UNION ALL
                SELECT t.node -> 'left_node', 1, 'left'
                WHERE jsonb_typeof(t.node -> 'left_node') = 'object'
                UNION ALL
                SELECT t.node -> 'right_node', 2, 'right'
                WHERE jsonb_typeof(t.node -> 'right_node') = 'object'
                UNION ALL
                SELECT e.value, 2 + e.ord::int, 'extra'
                FROM jsonb_array_elements(CASE WHEN jsonb_typeof(t.node -> 'extra_nodes') = 'array'
                                               THEN t.node -> 'extra_nodes' ELSE '[]' END)
                     WITH ORDINALITY AS e(value, ord)
            ) c
        ),
        numbered AS (
            SELECT t.*, (row_number() OVER (ORDER BY t.path) - 1)::int AS position
            FROM tree t
        ),
        kids AS (
            SELECT parent_path,
                   max(position) FILTER (WHERE slot = 'condition') AS c,
                   max(position) FILTER (WHERE slot = 'left') AS l,
                   max(position) FILTER (WHERE slot = 'right') AS r,
                   array_agg(position ORDER BY path) FILTER (WHERE slot = 'extra') AS x
            FROM numbered WHERE parent_path IS NOT NULL
            GROUP BY parent_path
        )
        SELECT jsonb_agg(jsonb_strip_nulls(jsonb_build_object(
                   't', n.node ->> 'node_type',
                   'q', CASE WHEN jsonb_typeof(n.node -> 'query') = 'string' THEN n.node ->> 'query'
                             WHEN n.node ? 'query' AND jsonb_typeof(n.node -> 'query') <> 'null'
                                 THEN (n.node -> 'query')::text END,
                   'n', n.node ->> 'result_name', 'l', k.l, 'r', k.r, 'c', k.c, 'x', k.x,
                   'u', p.position,
                   'o', CASE WHEN n.node ? 'retry' OR n.node ? 'timeout_seconds'
                             THEN df._step_options(n.node) END))
                 ORDER BY n.position)
        FROM numbered n
        LEFT JOIN kids k ON k.parent_path = n.path
        LEFT JOIN numbered p ON p.path = n.parent_path);
END $$;
ALTER FUNCTION df._graph_template(jsonb) SET jit = off;

-- Insert a template's rows as the nodes of p_instance_id. Node ids are consecutive from
-- p_base (the root's) in pre-order; children become ids in left_node/right_node,
-- condition_node/extra_nodes move into the stored query config (SPEC §1).
CREATE FUNCTION df._store_template(p_instance_id text, p_template jsonb, p_base bigint,
                                   p_submitted_by regrole, p_database text) RETURNS void
LANGUAGE plpgsql VOLATILE AS $$
BEGIN
    INSERT INTO df.nodes (id, instance_id, node_type, query, result_name, left_node, right_node,
                          submitted_by, database, parent_node, position, options)
    SELECT df._node_id(p_base, t.position), p_instance_id, t.t,
           CASE WHEN t.c IS NOT NULL
                    THEN jsonb_build_object('condition_node', df._node_id(p_base, t.c))::text
                WHEN t.x IS NOT NULL
                    THEN jsonb_build_object('extra_nodes',
                             (SELECT jsonb_agg(df._node_id(p_base, e.child) ORDER BY e.i)
                              FROM unnest(t.x) WITH ORDINALITY AS e(child, i)))::text
                ELSE t.q END,
           t.n, df._node_id(p_base, t.l), df._node_id(p_base, t.r), p_submitted_by, p_database,
           df._node_id(p_base, t.u), t.position, t.o
    FROM (SELECT r.*, (r.ord - 1)::int AS position
          FROM ROWS FROM (jsonb_to_recordset(p_template)
                          AS (t text, q text, n text, l int, r int, c int, x int[], u int, o jsonb))
               WITH ORDINALITY AS r(t, q, n, l, r, c, x, u, o, ord)) t;
END $$;

-- The id of the node at p_position of a graph whose root has id p_base: 8 hex digits.
CREATE FUNCTION df._node_id(p_base bigint, p_position integer) RETURNS text
LANGUAGE sql IMMUTABLE AS $$ SELECT lpad(to_hex((p_base + p_position) % 4294967296), 8, '0') $$;

-- p_text sealed with the key: hex of sha256(key || sha256(key || text)).
CREATE FUNCTION df._seal(p_text text) RETURNS text
LANGUAGE plpgsql STABLE AS $$
DECLARE
    v_key bytea := convert_to((SELECT value FROM df.secrets WHERE name = 'start_template_key'),
                              pg_catalog.getdatabaseencoding());
BEGIN
    RETURN encode(sha256(v_key || sha256(v_key || convert_to(p_text,
                                                              pg_catalog.getdatabaseencoding()))),
                  'hex');
END $$;

-- The template of p_graph: the session's last one if it was made from this graph text under
-- these graph limits, else validated (raising as df._validate_graph does), walked and kept.
-- The setting holds seal (64 hex), key (64 hex) and the template's text.
CREATE FUNCTION df._start_template(p_graph text) RETURNS jsonb
LANGUAGE plpgsql VOLATILE AS $$
DECLARE
    v_key text := encode(sha256(convert_to(
        -- the template's format, the settings that validation reads, the graph
        concat_ws(E'\n', '1', df._setting('max_nesting_depth'), df._setting('max_node_count'),
                  p_graph),
        pg_catalog.getdatabaseencoding())), 'hex');
    v_kept text := coalesce(current_setting('df.start_template', true), '');
    v_template jsonb;
    v_text text;
BEGIN
    IF substr(v_kept, 65, 64) = v_key AND left(v_kept, 64) = df._seal(substr(v_kept, 65)) THEN
        RETURN substr(v_kept, 129)::jsonb;
    END IF;
    v_template := df._graph_template(df._validate_graph(p_graph));
    v_text := v_template::text;
    IF octet_length(v_text) <= 65536 THEN
        PERFORM set_config('df.start_template', df._seal(v_key || v_text) || v_key || v_text,
                           false);
    END IF;
    RETURN v_template;
END $$;

-- df.start through the template (0012's, otherwise unchanged).
CREATE OR REPLACE FUNCTION df._command_start(c df.commands) RETURNS df.commands
LANGUAGE plpgsql VOLATILE AS $$
DECLARE
    v_mode text := lower(coalesce(c.transaction_mode, 'caller'));
    v_template jsonb;
    v_id text;
    v_base bigint;
BEGIN
    IF v_mode NOT IN ('caller', 'new') THEN
        RAISE EXCEPTION 'invalid transaction_mode ''%'' (expected ''caller'' or ''new'')',
            c.transaction_mode USING ERRCODE = 'invalid_parameter_value';
    END IF;
    c.transaction_mode := v_mode;
    IF c.graph IS NULL THEN
        RAISE EXCEPTION 'Invalid durable function: the workflow is NULL'
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF c.database IS NOT NULL
       AND NOT EXISTS (SELECT 1 FROM pg_catalog.pg_database WHERE datname = c.database) THEN
        RAISE EXCEPTION 'database "%" does not exist', c.database
            USING ERRCODE = 'invalid_catalog_name';
    END IF;
    PERFORM df._check_submitter(c.submitted_by);
    v_template := df._start_template(c.graph);

    IF v_mode = 'new' THEN
        IF df._running_instance() IS NOT NULL THEN
            RAISE EXCEPTION 'transaction_mode ''new'' cannot be used inside a workflow'
                USING ERRCODE = 'feature_not_supported';
        END IF;
        c.instance_id := df._start_new(c);
        RETURN c;
    END IF;

    LOOP
        v_id := df._new_hex_id();
        EXIT WHEN NOT EXISTS (SELECT 1 FROM df.instances WHERE id = v_id);
    END LOOP;
    v_base := (random() * 4294967295)::bigint;
    INSERT INTO df.instances (id, label, root_node, status, submitted_by, database,
                              transaction_mode, vars)
    VALUES (v_id, c.label, lpad(to_hex(v_base), 8, '0'), 'pending', c.submitted_by, c.database,
            v_mode,
            coalesce((SELECT jsonb_object_agg(v.name, v.value) FROM df.vars v
                      WHERE v.owner = c.submitted_by AND v.value IS NOT NULL), '{}'));
    PERFORM df._store_template(v_id, v_template, v_base, c.submitted_by, c.database);
    INSERT INTO df.mailbox (instance_id, kind) VALUES (v_id, 'start');
    -- Ring only a sleeping dispatcher (it holds the doorbell then). The shared lock, held to
    -- this transaction's end, keeps a dispatcher from taking the doorbell before this start's
    -- mail is committed (it tries again shortly).
    IF NOT pg_catalog.pg_try_advisory_xact_lock_shared(df._doorbell()) THEN
        PERFORM pg_notify('df_mailbox', '');
    END IF;
    c.instance_id := v_id;
    RETURN c;
END $$;

DROP FUNCTION df._store_graph(text, jsonb, bigint, regrole, text);

REVOKE ALL ON ALL FUNCTIONS IN SCHEMA df FROM PUBLIC;
