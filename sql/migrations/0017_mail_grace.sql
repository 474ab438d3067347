-- 0017_mail_grace: a dispatcher woken for fresh mail leaves it to the idle executors.
--
-- A start rings the dispatcher and the idle executors alike. An idle executor takes the start
-- and runs its first steps in the same transaction (Executor._take_mail); the dispatcher,
-- woken too, waits a moment first (Dispatcher.wake_delay). But that moment was also about
-- when the next start of a client that starts one workflow after another committed, and the
-- dispatcher's round then took that start: its workflow went the long way, a dispatcher
-- round, a task, an executor round (a tenth of such workflows took twice as long). The claim
-- now takes only the mail older than p_older_than: the dispatcher's first round after such a
-- wake takes what the idle executors left during the wait, no younger mail. Every other
-- round, and every executor's, takes all mail (p_older_than 0). Mail's created_at is its
-- writer's transaction start, so the mail that rang is old enough after the wait.

DROP FUNCTION df._claim_with_mail(integer, integer);

CREATE FUNCTION df._claim_with_mail(p_limit integer, p_scan integer,
                                    p_older_than interval DEFAULT '0 s',
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
        WHERE i.id IN (SELECT DISTINCT m.instance_id FROM df.mailbox m
                       WHERE m.created_at <= clock_timestamp() - p_older_than LIMIT p_scan)
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

ALTER FUNCTION df._claim_with_mail(integer, integer, interval)
    SET enable_seqscan = off SET enable_hashjoin = off SET enable_mergejoin = off;

REVOKE ALL ON ALL FUNCTIONS IN SCHEMA df FROM PUBLIC;
