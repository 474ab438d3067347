-- 0004_children: JOIN and RACE branches run as child instances (SPEC §1, DESIGN §3).
--
-- A JOIN/RACE node spawns one child instance per branch: the child owns a copy of the
-- branch's nodes (same node ids), starts with the parent's variables and the named results
-- the branch refers to, and, when it ends, posts a 'child' message to its parent in the
-- transaction that ends it. The parent's JOIN/RACE node (the join actor) aggregates.
-- Signals go to the family's root instance, which keeps the durable inbox and hands each
-- signal to the member waiting for it.

ALTER TABLE df.instances
    ADD COLUMN parent_activation bigint,      -- activation of the parent node that spawned it
    ADD COLUMN branch_index integer,          -- 0-based branch of that node
    ADD COLUMN family_root text,              -- the top-level instance (NULL: this one)
    ADD COLUMN waiters jsonb NOT NULL DEFAULT '[]',  -- root: members waiting for signals
    ADD COLUMN output text,                   -- child: its result as JSON text, when it ends
    ADD COLUMN exports text;                  -- child: names it bound, {name: value} JSON text

CREATE INDEX instances_parent_node ON df.instances (parent_id, parent_node, parent_activation)
    WHERE parent_id IS NOT NULL;
-- Copying a branch walks the nodes by parent.
CREATE INDEX nodes_parent ON df.nodes (instance_id, parent_node);

-- A signal to any member of a family goes to the family's root, which routes it.
CREATE OR REPLACE FUNCTION df._command_signal(c df.commands) RETURNS df.commands
LANGUAGE plpgsql VOLATILE AS $$
DECLARE
    i df.instances;
    r df.instances;
    v_data text := coalesce(c.payload, '{}');
BEGIN
    IF coalesce(c.instance_id, '') = '' THEN
        RAISE EXCEPTION 'instance_id must not be empty' USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF coalesce(c.signal_name, '') = '' THEN
        RAISE EXCEPTION 'signal_name must not be empty' USING ERRCODE = 'invalid_parameter_value';
    END IF;
    i := df._visible_instance(c.instance_id, c.submitted_by);
    SELECT * INTO r FROM df.instances WHERE id = coalesce(i.family_root, i.id);
    IF df._is_terminal(i.status) OR df._is_terminal(r.status) THEN
        -- Clients resend signals in loops that race with completion: accept and discard.
        RAISE NOTICE 'instance % is %; signal ''%'' discarded', i.id,
            CASE WHEN df._is_terminal(i.status) THEN i.status ELSE r.status END, c.signal_name;
        c.reason := 'discarded: instance is ' || i.status;
        RETURN c;
    END IF;
    BEGIN
        PERFORM v_data::json;
    EXCEPTION WHEN others THEN
        v_data := to_json(v_data)::text;     -- not JSON: deliver as a JSON string
    END;
    INSERT INTO df.mailbox (instance_id, kind, payload)
    VALUES (r.id, 'signal', '{"name":' || to_json(c.signal_name)::text || ',"data":' || v_data || '}');
    PERFORM pg_notify('df_mailbox', '');
    RETURN c;
END $$;

-- The family of an instance with each member's depth (0 = the instance itself).
CREATE FUNCTION df._family_depth(p_instance_id text)
RETURNS TABLE (instance_id text, depth integer)
LANGUAGE sql STABLE AS $$
    WITH RECURSIVE family(id, depth) AS (
        SELECT i.id, 0 FROM df.instances i WHERE i.id = p_instance_id
        UNION ALL
        SELECT ch.id, f.depth + 1 FROM df.instances ch JOIN family f ON ch.parent_id = f.id
    )
    SELECT id, depth FROM family
$$;

-- The nodes of an instance's graph. A branch's nodes exist in the parent (as the template,
-- never run) and in the child instance that ran it; the deepest, newest copy tells the state.
CREATE OR REPLACE FUNCTION df._instance_graph_nodes(p_instance_id text)
RETURNS TABLE (id text, node_type text, query text, result_name text, left_node text,
               right_node text, condition_node text, extra_nodes text[], status text,
               error text, result_text text)
LANGUAGE sql STABLE SECURITY INVOKER AS $$
    SELECT DISTINCT ON (n.id)
           n.id, n.node_type, n.query, n.result_name, n.left_node, n.right_node,
           cfg.c ->> 'condition_node',
           CASE WHEN jsonb_typeof(cfg.c -> 'extra_nodes') = 'array'
                THEN ARRAY(SELECT jsonb_array_elements_text(cfg.c -> 'extra_nodes')) END,
           n.status,
           coalesce(n.error, n.result #>> '{}'),
           coalesce(n.result_text, n.result::text)
      FROM df._family_depth(p_instance_id) f
      JOIN df.instances i ON i.id = f.instance_id
      JOIN df.nodes n ON n.instance_id = f.instance_id
      CROSS JOIN LATERAL (
            SELECT CASE WHEN n.node_type IN ('IF', 'LOOP', 'JOIN', 'RACE') AND n.query ~ '^\s*\{'
                        THEN df._try_jsonb(n.query) END AS c) cfg
     ORDER BY n.id, f.depth DESC, i.created_at DESC, i.id
$$;

CREATE OR REPLACE FUNCTION df.instance_nodes(instance_id text)
RETURNS TABLE (node_id text, node_type text, query text, result_name text, left_node text,
               right_node text, status text, result text, status_details text,
               inferred_status text, inferred_status_from_ancestor_id text,
               updated_at timestamptz)
LANGUAGE sql STABLE AS $$
    SELECT s.id, s.node_type, s.query, s.result_name, s.left_node, s.right_node, s.status,
           s.result, s.status_details, s.inferred_status, s.inferred_status_from_ancestor_id,
           s.updated_at
    FROM (
        SELECT DISTINCT ON (n.id)
               n.id, n.node_type, n.query, n.result_name, n.left_node, n.right_node, n.status,
               coalesce(n.result_text, n.result::text) AS result,
               n.status_details::text AS status_details,
               coalesce(inf.inferred_status, n.status) AS inferred_status,
               inf.inferred_status_from_ancestor_id, n.updated_at, n.position
        FROM df._family_depth(instance_nodes.instance_id) f
        JOIN df.instances i ON i.id = f.instance_id
        JOIN df.nodes n ON n.instance_id = f.instance_id
        LEFT JOIN df._inferred_nodes(instance_nodes.instance_id) inf ON inf.node_id = n.id
        ORDER BY n.id, f.depth DESC, i.created_at DESC, i.id
    ) s
    ORDER BY s.position, s.id
$$;

-- [beyond] The child instances an instance spawned, recursively: which JOIN/RACE node and
-- branch each ran, and how it ended. df.list_instances lists top-level instances only.
CREATE FUNCTION df.instance_children(instance_id text)
RETURNS TABLE (child_id text, parent_id text, parent_node text, branch integer,
               depth integer, status text, output text, created_at timestamptz,
               finished_at timestamptz)
LANGUAGE sql STABLE AS $$
    SELECT c.id, c.parent_id, c.parent_node, c.branch_index + 1, f.depth, c.status,
           c.output, c.created_at, c.finished_at
    FROM df._family_depth(instance_children.instance_id) f
    JOIN df.instances c ON c.id = f.instance_id
    WHERE f.depth > 0
    ORDER BY f.depth, c.parent_id, c.parent_node, c.branch_index, c.created_at
$$;

REVOKE ALL ON ALL FUNCTIONS IN SCHEMA df FROM PUBLIC;
