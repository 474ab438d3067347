-- 0011_start_costs: df.start does less work, and the same work however large the backlog.
--
-- A function in LANGUAGE sql that the planner cannot inline (a FROM clause, a sub-select) is
-- planned again at every call from PL/pgSQL in a new transaction; PL/pgSQL keeps its plans
-- for the session. The small helpers that df.start calls are therefore either inlinable SQL
-- or PL/pgSQL.

-- The calling role as regrole: the quoted name parsed back, correct for mixed-case names.
-- Inlined by the planner (no FROM clause), also where the row-level security policies use it.
CREATE OR REPLACE FUNCTION df._current_role() RETURNS regrole
LANGUAGE sql STABLE AS $$ SELECT pg_catalog.quote_ident(current_user)::regrole $$;

CREATE OR REPLACE FUNCTION df._setting(p_name text) RETURNS text
LANGUAGE plpgsql STABLE AS $$
BEGIN
    RETURN (SELECT value FROM df.settings WHERE name = p_name);
END $$;

CREATE OR REPLACE FUNCTION df._shape_error(p_node jsonb) RETURNS text
LANGUAGE plpgsql IMMUTABLE STRICT AS $$
BEGIN
    RETURN CASE
        WHEN jsonb_typeof(p_node) <> 'object' THEN 'Durofut children must be JSON objects'
        WHEN NOT p_node ? 'node_type' THEN 'missing field `node_type`'
        WHEN jsonb_typeof(p_node -> 'node_type') <> 'string' THEN 'node_type must be a string'
        WHEN jsonb_typeof(p_node -> 'left_node') NOT IN ('object', 'null')
          OR jsonb_typeof(p_node -> 'right_node') NOT IN ('object', 'null')
            THEN 'Durofut children must be JSON objects'
        WHEN jsonb_typeof(p_node -> 'condition_node') NOT IN ('object', 'null')
            THEN 'condition_node must be a Durofut JSON object'
        WHEN jsonb_typeof(p_node -> 'extra_nodes') <> 'array'
            THEN 'extra_nodes must be an array of Durofut JSON objects'
        WHEN jsonb_typeof(p_node -> 'extra_nodes') = 'array' AND EXISTS (
                SELECT 1 FROM jsonb_array_elements(p_node -> 'extra_nodes') e
                WHERE jsonb_typeof(e) <> 'object')
            THEN 'extra_nodes entries must be Durofut JSON objects'
        WHEN jsonb_typeof(p_node -> 'query') NOT IN ('string', 'null') THEN 'query must be a string'
        WHEN jsonb_typeof(p_node -> 'result_name') NOT IN ('string', 'null')
            THEN 'result_name must be a string'
    END;
END $$;

-- max_running_instances_per_role: counting a role's unfinished instances cost time in
-- proportion to its backlog, at every start. Instance ids are random, so the role's
-- unfinished instances whose id starts with '0' are a 1/16 sample of them. Below a limit of
-- 1024 the count is exact (it stops at the limit); above, it is exact only when the sample
-- says the role may have half the limit or more. A role at the limit has limit/16 ids in the
-- sample on average; one that passes with fewer than limit/32 is some six standard
-- deviations away, so the limit holds as the exact count does.
DROP INDEX df.instances_unfinished_by_role;
CREATE INDEX instances_unfinished_by_role ON df.instances (submitted_by, id)
    WHERE status IN ('pending', 'running');

CREATE FUNCTION df._unfinished_instances(p_role regrole, p_limit bigint) RETURNS bigint
LANGUAGE plpgsql STABLE AS $$
DECLARE
    v_sample bigint;
BEGIN
    IF p_limit > 1024 THEN
        SELECT count(*) INTO v_sample FROM df.instances
        WHERE submitted_by = p_role AND status IN ('pending', 'running') AND id < '1';
        IF v_sample * 16 < p_limit / 2 THEN
            RETURN v_sample * 16;
        END IF;
    END IF;
    RETURN (SELECT count(*) FROM (
                SELECT 1 FROM df.instances
                WHERE submitted_by = p_role AND status IN ('pending', 'running')
                LIMIT p_limit) unfinished);
END $$;

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
        -- transaction_mode 'new' stores the instance through a loopback session, whose own
        -- command is checked there (locking here too would deadlock with it).
        IF lower(coalesce(NEW.transaction_mode, 'caller')) = 'new' THEN
            RETURN NEW;
        END IF;
        -- Not serialised: concurrent starts of one role may each pass the count (a lock held
        -- to the caller's commit would deadlock with df.await_instance's loopback session).
        v_limit := df._setting('max_running_instances_per_role')::bigint;
        v_count := df._unfinished_instances(NEW.submitted_by, v_limit);
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

REVOKE ALL ON ALL FUNCTIONS IN SCHEMA df FROM PUBLIC;
