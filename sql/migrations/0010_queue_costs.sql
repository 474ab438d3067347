-- 0010_queue_costs: claims and starts cost the same however long the queue and the history.
--
-- Executors claim tasks in id order and stop at the limit (sql/queries/tasks.sql). With an
-- index on (shard, id) the planner, misled by statistics that lag a fast-moving queue, read
-- every task of the wanted shards and sorted them: milliseconds per claim at a backlog of a
-- thousand. The primary key gives the order; the shard is a filter.
DROP INDEX df.tasks_shard;

-- df._command_limits counted a role's pending and running instances by scanning all of its
-- instances (finished ones too); now a partial index holds only the unfinished ones, and the
-- count stops at the limit.
CREATE INDEX instances_unfinished_by_role ON df.instances (submitted_by)
    WHERE status IN ('pending', 'running');

CREATE OR REPLACE FUNCTION df._command_limits() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    v_limit bigint;
    v_count bigint;
BEGIN
    IF lower(NEW.command) = 'start' THEN
        v_limit := df._setting('max_label_length')::bigint;
        IF length(NEW.label) > v_limit THEN
            RAISE EXCEPTION 'label is % characters long; the maximum is % (max_label_length)',
                length(NEW.label), v_limit USING ERRCODE = 'program_limit_exceeded';
        END IF;
        v_limit := df._setting('max_running_instances_per_role')::bigint;
        -- transaction_mode 'new' stores the instance through a loopback session, whose own
        -- command is checked there (locking here too would deadlock with it).
        IF lower(coalesce(NEW.transaction_mode, 'caller')) = 'new' THEN
            RETURN NEW;
        END IF;
        -- Not serialised: concurrent starts of one role may each pass the count (a lock held
        -- to the caller's commit would deadlock with df.await_instance's loopback session).
        -- Counted on a partial index and only up to the limit: the cost of a start does not
        -- grow with the role's history.
        SELECT count(*) INTO v_count FROM (
            SELECT 1 FROM df.instances
            WHERE submitted_by = NEW.submitted_by AND status IN ('pending', 'running')
            LIMIT v_limit) unfinished;
        IF v_count >= v_limit THEN
            RAISE EXCEPTION 'role % has % pending or running instances; the maximum is % '
                            '(max_running_instances_per_role)', NEW.submitted_by, v_count, v_limit
                USING ERRCODE = 'program_limit_exceeded',
                      HINT = 'Wait for instances to finish, cancel some, or ask an administrator '
                             'to raise max_running_instances_per_role in df.settings.';
        END IF;
    ELSIF lower(NEW.command) = 'signal' THEN
        v_limit := df._setting('max_signal_payload_bytes')::bigint;
        IF octet_length(NEW.payload) > v_limit THEN
            RAISE EXCEPTION 'signal payload is % bytes; the maximum is % (max_signal_payload_bytes)',
                octet_length(NEW.payload), v_limit USING ERRCODE = 'program_limit_exceeded';
        END IF;
    END IF;
    RETURN NEW;
END $$;

REVOKE ALL ON FUNCTION df._command_limits() FROM PUBLIC;
