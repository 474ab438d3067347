-- name: tasks_insert_many
-- Queue steps (df._tasks_insert_many, migration 0020).
SELECT df._tasks_insert_many(%(instance_ids)s::text[], %(node_ids)s::text[],
                             %(activations)s::bigint[], %(shards)s::int[], %(kinds)s::text[],
                             %(payloads)s::json[]);

-- name: work_drop_many
-- Forget queued tasks and timers nobody waits for any more (node_id NULL: the whole
-- instance; df._work_drop_many, migration 0020).
SELECT df._work_drop_many(%(instance_ids)s::text[], %(node_ids)s::text[]);

-- name: tasks_claim
-- Claim the oldest tasks of the given shards, up to the limit, but not those claimed already
-- in this batch nor those of the instances carried on in it (df._tasks_claim, migration 0020:
-- the row lock is the claim).
SELECT * FROM df._tasks_claim(%(shards)s::int[], %(claimed)s::bigint[], %(carried)s::text[],
                              %(limit)s::int);

-- name: tasks_queued
-- Is any task queued at all, claimable or not (a row, or none)? An executor whose own shards
-- gave it nothing steals from the others' only then (Executor._claim). The primary key's
-- first entry: EXISTS would drop the order and read the table from its start, dead rows and
-- all, whatever the statistics say.
SELECT t.id FROM df.tasks t ORDER BY t.id LIMIT 1;

-- name: tasks_complete_many
-- Remove finished tasks and post their outcomes to the instances' mailboxes, committed with
-- the steps themselves (df._tasks_complete_many, migration 0020).
SELECT df._tasks_complete_many(%(task_ids)s::bigint[], %(instance_ids)s::text[],
                               %(node_ids)s::text[], %(activations)s::bigint[],
                               %(payloads)s::text[]);

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
