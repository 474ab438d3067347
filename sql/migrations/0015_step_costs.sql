-- 0015_step_costs: what a step costs the database, and a claim that does not depend on
-- statistics.
--
-- df._as_trusted: the executor sends the steps of roles it found trusted (superusers, its own
-- role) many to a round trip. The statement that sets such a step's role checks, before it
-- sets it, that the role still exists and is still trusted, and fails otherwise (the step
-- then runs alone and the role is looked up afresh). In PL/pgSQL its plans are kept for the
-- session: a plain statement doing the same was parsed and planned for every step.

CREATE FUNCTION df._as_trusted(p_instance_id text, p_role text) RETURNS text
LANGUAGE plpgsql VOLATILE AS $$
DECLARE
    v_trusted boolean;
    v_max_bytes text;
BEGIN
    SELECT r.rolsuper OR r.rolname = current_user INTO v_trusted
      FROM pg_catalog.pg_roles r WHERE r.rolname = p_role;
    IF v_trusted IS NOT TRUE THEN
        RAISE EXCEPTION 'role "%" is not trusted to run steps directly', p_role
            USING ERRCODE = 'insufficient_privilege';
    END IF;
    SELECT s.value INTO v_max_bytes FROM df.settings s WHERE s.name = 'max_result_bytes';
    PERFORM pg_catalog.set_config('df.instance_id', p_instance_id, true);
    IF p_role IS DISTINCT FROM current_user THEN
        PERFORM pg_catalog.set_config('role', p_role, true);
    END IF;
    RETURN v_max_bytes;
END $$;

-- The claim of 0014, with the nodes of the claimed instances read through the index whatever
-- the statistics say (as the executor's nodes_load_many): `instance_id = ANY(…)` was planned
-- as a sequential scan of every node on tables that grew faster than autovacuum analyzes.
CREATE OR REPLACE FUNCTION df._claim_with_mail(p_limit integer, p_scan integer,
                                               OUT instances text, OUT mail text,
                                               OUT nodes text)
LANGUAGE plpgsql VOLATILE AS $$
DECLARE
    v_ids text[];
BEGIN
    WITH claimed AS MATERIALIZED (
        SELECT i.id, i.root_node, i.status, i.label, i.vars, i.names, i.inbox,
               i.execution_count, i.seq, i.parent_id, i.parent_node, i.parent_activation,
               i.branch_index, i.family_root, i.waiters, i.database,
               (SELECT r.rolname FROM pg_catalog.pg_roles r WHERE r.oid = i.submitted_by) AS role,
               clock_timestamp() AS now
        FROM df.instances i
        WHERE i.id IN (SELECT DISTINCT m.instance_id FROM df.mailbox m LIMIT p_scan)
        FOR UPDATE OF i SKIP LOCKED
        LIMIT p_limit
    ),
    taken AS (
        DELETE FROM df.mailbox m USING claimed c
        WHERE m.instance_id = c.id
        RETURNING m.id, m.instance_id, m.kind, m.node_id, m.activation, m.payload
    )
    SELECT (SELECT json_agg(c)::text FROM claimed c), (SELECT json_agg(t)::text FROM taken t),
           ARRAY(SELECT c.id FROM claimed c)
      INTO instances, mail, v_ids;
    SELECT json_agg(n)::text INTO nodes
      FROM unnest(v_ids) AS u(id)
      CROSS JOIN LATERAL (
          SELECT n.instance_id, n.id, n.node_type, n.query, n.result_name, n.left_node,
                 n.right_node, n.parent_node, n.position, n.status, n.result_text, n.error,
                 n.activation, n.status_details, n.options
            FROM df.nodes n WHERE n.instance_id = u.id OFFSET 0) AS n;
END $$;

-- After a pipelined step and its RESET ROLE, as the executor's CLEANUP does after any step, in
-- one statement instead of five: what the statement may have left in the session goes
-- (temporary objects, settings, cursors, prepared statements, session advisory locks).
-- Nothing here resolves a name through search_path.
CREATE FUNCTION df._after_step() RETURNS void
LANGUAGE plpgsql VOLATILE AS $$
BEGIN
    EXECUTE 'DISCARD TEMP';
    EXECUTE 'RESET ALL';
    EXECUTE 'CLOSE ALL';
    EXECUTE 'DEALLOCATE ALL';
    PERFORM pg_catalog.pg_advisory_unlock_all();
END $$;

-- The runtime's alone, never granted: 0014's list, df._as_trusted and df._after_step.
CREATE OR REPLACE FUNCTION df._internal_functions() RETURNS text[]
LANGUAGE sql IMMUTABLE AS $$
    SELECT ARRAY['_command_start', '_command_signal', '_command_cancel', '_start_new',
                 '_check_submitter', '_visible_instance', '_loopback_conninfo',
                 '_grant_usage_0003', '_revoke_usage_0003', '_install_step_function',
                 '_drop_step_function', '_step_function_name', '_command_limits',
                 '_unfinished_instances', '_doorbell', '_graph_template', '_store_template',
                 '_node_id', '_seal', '_start_template', '_claim_with_mail', '_as_trusted',
                 '_after_step']
$$;

REVOKE ALL ON ALL FUNCTIONS IN SCHEMA df FROM PUBLIC;
