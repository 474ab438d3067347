-- 0005_operations: what operators look at and what the runtime prunes.
--
-- df.runtime_metrics: the database-side figures of the Prometheus endpoint, one row per
-- (metric, label), so SQL users and the endpoint read the same numbers. Counting rows is a
-- scan of the (small, pruned) queue tables and of df.instances: fine at a scrape every few
-- seconds, not in a hot loop.
CREATE VIEW df.runtime_metrics AS
    SELECT 'instances'::text AS metric, s.status AS label, count(i.id)::float8 AS value
    FROM unnest(ARRAY['pending', 'running', 'completed', 'failed', 'cancelled']) AS s(status)
    LEFT JOIN df.instances i ON i.status = s.status
    GROUP BY s.status
UNION ALL
    SELECT 'queue_depth', 'mailbox', count(*)::float8 FROM df.mailbox
UNION ALL
    SELECT 'queue_depth', 'tasks', count(*)::float8 FROM df.tasks
UNION ALL
    SELECT 'queue_depth', 'timers', count(*)::float8 FROM df.timers
UNION ALL
    SELECT 'queue_depth', 'timers_due', count(*)::float8 FROM df.timers
    WHERE due_at <= clock_timestamp()
UNION ALL
    -- Live: a heartbeat within the last 30 s (heartbeats come every 5 s).
    SELECT 'workers', r.role, count(w.id)::float8
    FROM unnest(ARRAY['dispatcher', 'timer', 'executor']) AS r(role)
    LEFT JOIN df.workers w ON w.role = r.role AND w.last_seen_at > now() - interval '30 seconds'
    GROUP BY r.role
UNION ALL
    SELECT 'oldest_task_age_seconds', NULL,
           coalesce(extract(epoch FROM clock_timestamp() - min(created_at)), 0)::float8
    FROM df.tasks;

COMMENT ON VIEW df.runtime_metrics IS
    'Runtime figures (instances by status, queue depths, live workers) as metric/label/value rows';

REVOKE ALL ON df.runtime_metrics FROM PUBLIC;

-- Retention (SPEC §12) finds finished root instances by the time they finished.
CREATE INDEX instances_finished_roots ON df.instances (finished_at)
    WHERE parent_id IS NULL AND finished_at IS NOT NULL;

UPDATE df.settings SET description = 'days a finished instance is kept (fractions allowed); '
    'pruned by the runtime''s timer process, in batches'
WHERE name = 'retention_days';
