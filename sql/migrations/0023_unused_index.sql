-- 0023_unused_index: df.instances loses an index nothing reads.
--
-- instances_finished (finished_at, for every finished instance) was for retention, which
-- reads instances_finished_roots (0005) instead: only root instances are pruned, their
-- children go with them. Every instance's last update, the one that sets finished_at, still
-- inserted an entry into it.

DROP INDEX df.instances_finished;
