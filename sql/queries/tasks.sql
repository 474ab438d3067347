-- name: tasks_insert_many
-- Queue steps; database and role come from the instance so a task is self-contained.
INSERT INTO df.tasks (instance_id, node_id, activation, shard, kind, database, submitted_by,
                      payload)
SELECT u.instance_id, u.node_id, u.activation, u.shard, u.kind, i.database, i.submitted_by,
       u.payload
FROM unnest(%(instance_ids)b::text[], %(node_ids)b::text[], %(activations)b::bigint[],
            %(shards)b::int[], %(kinds)b::text[], %(payloads)b::json[])
     AS u(instance_id, node_id, activation, shard, kind, payload)
JOIN df.instances i ON i.id = u.instance_id;

-- name: work_drop_many
-- Forget queued tasks and timers nobody waits for any more (node_id NULL: the whole
-- instance). Tasks an executor holds right now are skipped: their late answers are fenced.
WITH d AS (
    SELECT * FROM unnest(%(instance_ids)b::text[], %(node_ids)b::text[]) AS d(instance_id, node_id)
),
tasks AS (
    DELETE FROM df.tasks t
    WHERE t.id IN (SELECT t2.id FROM df.tasks t2 JOIN d ON t2.instance_id = d.instance_id
                   AND (d.node_id IS NULL OR t2.node_id = d.node_id)
                   FOR UPDATE OF t2 SKIP LOCKED)
)
DELETE FROM df.timers tm
USING d
WHERE tm.instance_id = d.instance_id AND (d.node_id IS NULL OR tm.node_id = d.node_id);

-- name: tasks_claim
-- Claim the oldest %(limit)s tasks of the given shards. The row lock is the claim: it lasts
-- until the executor's transaction ends, and a crash releases it. The primary key gives the
-- order and the scan stops at the limit; nothing else in WHERE, so that the planner, whose
-- statistics lag a fast-moving queue, cannot prefer reading and sorting every task. The
-- instance's status comes with each task: a task of an instance that is no longer running
-- is removed unrun (Executor.work_once).
SELECT t.id, t.instance_id, t.node_id, t.activation, t.kind, t.database,
       (SELECT r.rolname FROM pg_catalog.pg_roles r WHERE r.oid = t.submitted_by) AS role,
       t.payload, t.attempt,
       (SELECT i.label FROM df.instances i WHERE i.id = t.instance_id) AS label,
       (SELECT i.status FROM df.instances i WHERE i.id = t.instance_id) AS instance_status
FROM df.tasks t
WHERE t.shard = ANY(%(shards)s::int[])
  AND (t.lease_until IS NULL OR t.lease_until < clock_timestamp())
  AND t.id <> ALL(%(claimed)s::bigint[])   -- our own locks do not make SKIP LOCKED skip
  AND t.instance_id <> ALL(%(carried)s::text[])   -- carried on in this batch (Executor._claim)
ORDER BY t.id
LIMIT %(limit)s::int
FOR UPDATE OF t SKIP LOCKED;

-- name: tasks_queued
-- Is any task queued at all, claimable or not (a row, or none)? An executor whose own shards
-- gave it nothing steals from the others' only then (Executor._claim). The primary key's
-- first entry: EXISTS would drop the order and read the table from its start, dead rows and
-- all, whatever the statistics say.
SELECT t.id FROM df.tasks t ORDER BY t.id LIMIT 1;

-- name: tasks_complete_many
-- Remove finished tasks and post their outcomes to the instances' mailboxes: one statement,
-- committed with the steps themselves.
WITH done AS (
    DELETE FROM df.tasks WHERE id = ANY(%(task_ids)b::bigint[])
)
INSERT INTO df.mailbox (instance_id, kind, node_id, activation, payload)
SELECT u.instance_id, 'step', u.node_id, u.activation, u.payload
FROM unnest(%(instance_ids)b::text[], %(node_ids)b::text[], %(activations)b::bigint[],
            %(payloads)b::text[]) AS u(instance_id, node_id, activation, payload);

-- name: task_mark_autocommit
-- The statement cannot run in a transaction block: run it on its own later (at least once).
UPDATE df.tasks SET kind = 'sql_autocommit' WHERE id = %(id)s::bigint;

-- name: task_lease
-- Take a lease on a task that must run outside the claim transaction.
UPDATE df.tasks
SET lease_until = clock_timestamp() + make_interval(secs => %(seconds)s::float8),
    lease_token = lease_token + 1, leased_by = %(worker)s::text
WHERE id = %(id)s::bigint
RETURNING lease_token;

-- name: task_complete_leased
-- Complete a leased task only if the lease is still ours (fencing token).
WITH done AS (
    DELETE FROM df.tasks
    WHERE id = %(id)s::bigint AND lease_token = %(token)s::bigint
    RETURNING instance_id, node_id, activation
)
INSERT INTO df.mailbox (instance_id, kind, node_id, activation, payload)
SELECT instance_id, 'step', node_id, activation, %(payload)s::text FROM done;
