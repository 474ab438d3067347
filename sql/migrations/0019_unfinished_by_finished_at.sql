-- 0019_unfinished_by_finished_at: an instance's first update can be HOT, and df.start's count
-- of the role's unfinished instances looks at a sixteenth of what it did.
--
-- The index of unfinished instances by role was partial on status. PostgreSQL updates a row in
-- place (HOT: no new index entries) only if no indexed column changes, and a column in an
-- index's predicate counts: an instance's first update, pending -> running, wrote a new entry
-- in every index of df.instances. finished_at is NULL exactly while an instance is pending or
-- running (the statements that finish an instance set it, those that write another status
-- leave it NULL), and it is already indexed: the index is now partial on it, and pending ->
-- running is HOT when the page has room (in a burst of 3-step workflows: 0.25 -> 1.0 HOT
-- updates of the 2 per instance).
-- Writes to df.instances wait while the index is built: 0.1 s for a million instances, 1 % of
-- them unfinished, on the reference VM.
--
-- The count that caps a role's unfinished instances (0011) starts from the 1 in 16 whose id
-- begins with 0. A finished instance leaves its entry in the partial index until vacuum, so in
-- a burst that sample walked hundreds of entries at every start. From a limit of 8192 on the
-- count starts from 1 in 256 (ids beginning 00): an estimate below a quarter of the limit
-- is returned as it is; otherwise the count goes on as before. A role at the limit passes the
-- new sample (its mean there is at least 32) with a chance under 5e-7 (worst at a limit of
-- 8196; 8e-9 at the default limit, 10000); the 1-in-16 sample's worst case, at a limit of
-- 1026, is 7e-6.

DROP INDEX df.instances_unfinished_by_role;
CREATE INDEX instances_unfinished_by_role ON df.instances (submitted_by, id)
    WHERE finished_at IS NULL;

-- Two samples, each with its bounds written out: as constants they let PL/pgSQL keep one
-- generic plan per statement (a bound computed from a variable made the planner prefer a
-- custom plan, planned again at every start: +300 µs).
CREATE OR REPLACE FUNCTION df._unfinished_instances(p_role regrole, p_limit bigint) RETURNS bigint
LANGUAGE plpgsql STABLE AS $$
DECLARE
    v_sample bigint;
BEGIN
    IF p_limit >= 8192 THEN
        SELECT count(*) INTO v_sample FROM df.instances
        WHERE submitted_by = p_role AND finished_at IS NULL AND id < '01';
        IF v_sample * 256 < p_limit / 4 THEN
            RETURN v_sample * 256;
        END IF;
    END IF;
    IF p_limit > 1024 THEN
        SELECT count(*) INTO v_sample FROM df.instances
        WHERE submitted_by = p_role AND finished_at IS NULL AND id < '1';
        IF v_sample * 16 < p_limit / 2 THEN
            RETURN v_sample * 16;
        END IF;
    END IF;
    RETURN (SELECT count(*) FROM (
                SELECT 1 FROM df.instances
                WHERE submitted_by = p_role AND finished_at IS NULL
                LIMIT p_limit) unfinished);
END $$;
