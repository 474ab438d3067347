-- name: timers_insert_many
INSERT INTO df.timers (instance_id, node_id, activation, kind, due_at)
SELECT * FROM unnest(%(instance_ids)s::text[], %(node_ids)s::text[], %(activations)s::bigint[],
                     %(kinds)s::text[], %(due_ats)s::timestamptz[]);

-- name: timers_pop_due
-- Move due timers into mailboxes in one round trip; SKIP LOCKED lets timer processes share.
WITH due AS (
    DELETE FROM df.timers
    WHERE id IN (SELECT id FROM df.timers
                 WHERE due_at <= coalesce(%(now)s::timestamptz, clock_timestamp())
                 ORDER BY due_at LIMIT %(limit)s::int FOR UPDATE SKIP LOCKED)
    RETURNING instance_id, node_id, activation
)
INSERT INTO df.mailbox (instance_id, kind, node_id, activation)
SELECT instance_id, 'timer', node_id, activation FROM due;

-- name: timers_next_due
-- Seconds until the earliest timer (NULL when there is none).
SELECT extract(epoch FROM min(due_at) - clock_timestamp())::float8 AS seconds FROM df.timers;
