-- 0014_claim_snapshot: the nodes of claimed instances are read after their locks are taken.
--
-- instances_claim_with_mail locked instances, took their mail and read their nodes in one
-- statement, so with one snapshot, taken when the statement started. SKIP LOCKED skips only
-- rows locked at the moment it gets to them: an actor that committed between that snapshot
-- and the lock left its instance to be locked, with the row as it is now, but its nodes were
-- read as they were before that commit. The engine then applied new mail to old node states
-- (a FOREACH handed out the same rows twice). The claim is now a function: one statement
-- locks the instances and takes their mail, the next one, with a snapshot taken after the
-- locks (a VOLATILE function's statements each take their own in READ COMMITTED), reads their
-- nodes. Still one round trip.

CREATE FUNCTION df._claim_with_mail(p_limit integer, p_scan integer,
                                    OUT instances text, OUT mail text, OUT nodes text)
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
      FROM (SELECT n.instance_id, n.id, n.node_type, n.query, n.result_name, n.left_node,
                   n.right_node, n.parent_node, n.position, n.status, n.result_text, n.error,
                   n.activation, n.status_details, n.options
              FROM df.nodes n WHERE n.instance_id = ANY (v_ids)) n;
END $$;

-- The runtime's alone, never granted: 0007's list without df._store_graph (dropped in
-- 0013), df._unfinished_instances (0011), df._doorbell (0012), 0013's functions and
-- df._claim_with_mail.
CREATE OR REPLACE FUNCTION df._internal_functions() RETURNS text[]
LANGUAGE sql IMMUTABLE AS $$
    SELECT ARRAY['_command_start', '_command_signal', '_command_cancel', '_start_new',
                 '_check_submitter', '_visible_instance', '_loopback_conninfo',
                 '_grant_usage_0003', '_revoke_usage_0003', '_install_step_function',
                 '_drop_step_function', '_step_function_name', '_command_limits',
                 '_unfinished_instances', '_doorbell', '_graph_template', '_store_template',
                 '_node_id', '_seal', '_start_template', '_claim_with_mail']
$$;

REVOKE ALL ON ALL FUNCTIONS IN SCHEMA df FROM PUBLIC;
