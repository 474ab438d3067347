-- name: worker_heartbeat
INSERT INTO df.workers (id, host, pid, role)
VALUES (%(id)s::text, %(host)s::text, %(pid)s::int, %(role)s::text)
ON CONFLICT (id) DO UPDATE SET last_seen_at = now();

-- name: worker_remove
DELETE FROM df.workers WHERE id = %(id)s::text;
