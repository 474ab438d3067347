-- name: instances_claim_with_mail
-- Lock up to %(limit)s instances that have mail, take their mail and read their nodes
-- (df._claim_with_mail: the nodes with a snapshot taken after the locks), in one round trip:
-- everything the engine needs of them, as three JSON arrays (actors.claimed). SKIP LOCKED:
-- another process owns the rest for now; one actor runs in one place. Mail that arrives
-- after the claim stays for the next round, and so does mail younger than %(older_than)s
-- seconds (Dispatcher.work_once).
SELECT instances, mail, nodes
FROM df._claim_with_mail(%(limit)s::int, %(scan)s::int, %(older_than)s::float8 * interval '1 s');

-- name: nodes_load_many
-- The nodes of each instance through the index, whatever the statistics say: on a fresh
-- table (or one that grew faster than autovacuum analyzes it) `instance_id = ANY(…)` was
-- planned as a sequential scan of every node. OFFSET 0 keeps the per-instance look-up.
SELECT n.instance_id, n.id, n.node_type, n.query, n.result_name, n.left_node, n.right_node,
       n.parent_node, n.position, n.status, n.result_text, n.error, n.activation,
       n.status_details, n.options
FROM unnest(%(ids)s::text[]) AS u(id)
CROSS JOIN LATERAL (SELECT * FROM df.nodes n WHERE n.instance_id = u.id OFFSET 0) AS n;

-- name: nodes_update_many
-- Write back the nodes the engine changed, in one statement.
UPDATE df.nodes n
SET status = u.status, result_text = u.result_text, result = u.result_text::jsonb,
    error = u.error, activation = u.activation, status_details = u.details,
    updated_at = now()
FROM unnest(%(instance_ids)b::text[], %(ids)b::text[], %(statuses)b::text[],
            %(results)b::text[], %(errors)b::text[], %(activations)b::bigint[],
            %(details)b::jsonb[])
     AS u(instance_id, id, status, result_text, error, activation, details)
WHERE n.instance_id = u.instance_id AND n.id = u.id;

-- name: instances_update_many
UPDATE df.instances i
SET status = u.status, names = u.names, inbox = u.inbox, execution_count = u.execution_count,
    seq = u.seq, waiters = u.waiters, updated_at = now(),
    completed_at = CASE WHEN u.status = 'completed' THEN coalesce(i.completed_at, now())
                        ELSE i.completed_at END,
    finished_at = CASE WHEN u.status IN ('completed', 'failed', 'cancelled')
                       THEN coalesce(i.finished_at, now()) END
FROM unnest(%(ids)b::text[], %(statuses)b::text[], %(names)b::jsonb[], %(inboxes)b::jsonb[],
            %(execution_counts)b::int[], %(seqs)b::bigint[], %(waiters)b::jsonb[])
     AS u(id, status, names, inbox, execution_count, seq, waiters)
WHERE i.id = u.id;

-- name: mailbox_post_many
-- Messages between members of a family (signals handed over, waits announced).
INSERT INTO df.mailbox (instance_id, kind, node_id, activation, payload)
SELECT * FROM unnest(%(instance_ids)b::text[], %(kinds)b::text[], %(node_ids)b::text[],
                     %(activations)b::bigint[], %(payloads)b::text[]);

-- name: instances_lock_quiet
-- An executor carries these instances on where their steps just ran: lock those nobody else
-- runs right now and that have no mail waiting (mail goes first, through the dispatcher).
SELECT i.id, i.root_node, i.status, i.label, i.vars, i.names, i.inbox, i.execution_count,
       i.seq, i.parent_id, i.parent_node, i.parent_activation, i.branch_index, i.family_root,
       i.waiters, i.database,
       (SELECT r.rolname FROM pg_catalog.pg_roles r WHERE r.oid = i.submitted_by) AS role,
       clock_timestamp() AS now
FROM df.instances i
WHERE i.id = ANY(%(ids)s::text[])
  AND i.status = 'running'
  AND NOT EXISTS (SELECT 1 FROM df.mailbox m WHERE m.instance_id = i.id)
FOR UPDATE OF i SKIP LOCKED;

-- name: notify_each
-- One NOTIFY on %(channel)s per payload, in order, in one statement: df_done for the
-- instances a round finished, df_cancel for what it cancelled (a statement each cost a parse
-- and a plan per instance).
SELECT pg_catalog.pg_notify(%(channel)s::text, p) FROM unnest(%(payloads)s::text[]) AS u(p);
