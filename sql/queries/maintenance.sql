-- name: instances_prune_finished
-- Delete up to %(limit)s finished root instances older than the retention window, with their
-- whole tree: child instances by ON DELETE CASCADE, nodes by the trigger
-- instances_delete_nodes (migration 0018); commands, mail, tasks and timers by instance id
-- here. Age is finished_at (set when an instance reaches completed/failed/cancelled; never
-- user-writable). SKIP LOCKED: an instance a dispatcher holds right now is left for the next
-- pass. A negative or missing retention_days disables pruning.
WITH RECURSIVE cutoff AS (
    SELECT coalesce(%(now)s::timestamptz, now())
           - make_interval(secs => d * 86400) AS at
    FROM (SELECT nullif(df._setting('retention_days'), '')::float8 AS d) s
    WHERE d >= 0
),
roots AS (
    SELECT i.id FROM df.instances i, cutoff
    WHERE i.parent_id IS NULL AND i.finished_at IS NOT NULL AND i.finished_at < cutoff.at
      AND i.status IN ('completed', 'failed', 'cancelled')
    ORDER BY i.finished_at
    LIMIT %(limit)s::int
    FOR UPDATE OF i SKIP LOCKED
),
tree AS (
    SELECT id FROM roots
    UNION ALL
    SELECT c.id FROM df.instances c JOIN tree t ON c.parent_id = t.id
),
commands AS (DELETE FROM df.commands WHERE instance_id IN (SELECT id FROM tree)),
mail AS (DELETE FROM df.mailbox WHERE instance_id IN (SELECT id FROM tree)),
tasks AS (DELETE FROM df.tasks WHERE instance_id IN (SELECT id FROM tree)),
timers AS (DELETE FROM df.timers WHERE instance_id IN (SELECT id FROM tree))
DELETE FROM df.instances WHERE id IN (SELECT id FROM roots)
RETURNING id;

-- name: workers_prune_dead
-- Rows of processes that stopped heartbeating (killed, or their host is gone).
DELETE FROM df.workers
WHERE last_seen_at < now() - make_interval(secs => %(seconds)s::float8)
RETURNING id, host, pid, role;
