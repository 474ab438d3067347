-- 0012_doorbell: df.start wakes the runtime only when the runtime sleeps.
--
-- A transaction that has sent a NOTIFY takes a lock for its commit that every other such
-- transaction in the cluster waits for, through the commit's WAL flush: notifying commits run
-- one at a time. With a NOTIFY in every df.start, concurrent starts queued behind each other
-- (and behind the runtime's own commits) instead of sharing WAL flushes.
--
-- So a dispatcher that goes to sleep first takes the doorbell, an advisory lock (session,
-- exclusive), looks for mail once more, and sleeps holding it; it lets go when a round finds
-- work (Dispatcher). df.start takes the doorbell shared for its transaction, without
-- waiting: if it cannot, a dispatcher sleeps, and df.start sends the NOTIFY as before. If it
-- can, no dispatcher sleeps (one is busy and looks again after its round), and the shared
-- lock keeps any dispatcher from starting to sleep before this start has committed.

-- The doorbell's advisory lock key ('dfdoor').
CREATE FUNCTION df._doorbell() RETURNS bigint
LANGUAGE sql IMMUTABLE AS $$ SELECT x'6466646f6f72'::bigint $$;

CREATE OR REPLACE FUNCTION df._command_start(c df.commands) RETURNS df.commands
LANGUAGE plpgsql VOLATILE AS $$
DECLARE
    v_mode text := lower(coalesce(c.transaction_mode, 'caller'));
    v_graph jsonb;
    v_id text;
    v_base bigint;
BEGIN
    IF v_mode NOT IN ('caller', 'new') THEN
        RAISE EXCEPTION 'invalid transaction_mode ''%'' (expected ''caller'' or ''new'')',
            c.transaction_mode USING ERRCODE = 'invalid_parameter_value';
    END IF;
    c.transaction_mode := v_mode;
    IF c.graph IS NULL THEN
        RAISE EXCEPTION 'Invalid durable function: the workflow is NULL'
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF c.database IS NOT NULL
       AND NOT EXISTS (SELECT 1 FROM pg_catalog.pg_database WHERE datname = c.database) THEN
        RAISE EXCEPTION 'database "%" does not exist', c.database
            USING ERRCODE = 'invalid_catalog_name';
    END IF;
    PERFORM df._check_submitter(c.submitted_by);
    v_graph := df._validate_graph(c.graph);

    IF v_mode = 'new' THEN
        IF df._running_instance() IS NOT NULL THEN
            RAISE EXCEPTION 'transaction_mode ''new'' cannot be used inside a workflow'
                USING ERRCODE = 'feature_not_supported';
        END IF;
        c.instance_id := df._start_new(c);
        RETURN c;
    END IF;

    LOOP
        v_id := df._new_hex_id();
        EXIT WHEN NOT EXISTS (SELECT 1 FROM df.instances WHERE id = v_id);
    END LOOP;
    v_base := (random() * 4294967295)::bigint;
    INSERT INTO df.instances (id, label, root_node, status, submitted_by, database,
                              transaction_mode, vars)
    VALUES (v_id, c.label, lpad(to_hex(v_base), 8, '0'), 'pending', c.submitted_by, c.database,
            v_mode,
            coalesce((SELECT jsonb_object_agg(v.name, v.value) FROM df.vars v
                      WHERE v.owner = c.submitted_by AND v.value IS NOT NULL), '{}'));
    PERFORM df._store_graph(v_id, v_graph, v_base, c.submitted_by, c.database);
    INSERT INTO df.mailbox (instance_id, kind) VALUES (v_id, 'start');
    -- Ring only a sleeping dispatcher (it holds the doorbell then). The shared lock, held to
    -- this transaction's end, keeps a dispatcher from taking the doorbell before this start's
    -- mail is committed (it tries again shortly).
    IF NOT pg_catalog.pg_try_advisory_xact_lock_shared(df._doorbell()) THEN
        PERFORM pg_notify('df_mailbox', '');
    END IF;
    c.instance_id := v_id;
    RETURN c;
END $$;

-- The runtime's alone, never granted: 0007's list, df._unfinished_instances (0011) and
-- df._doorbell.
CREATE OR REPLACE FUNCTION df._internal_functions() RETURNS text[]
LANGUAGE sql IMMUTABLE AS $$
    SELECT ARRAY['_command_start', '_command_signal', '_command_cancel', '_start_new',
                 '_store_graph', '_check_submitter', '_visible_instance', '_loopback_conninfo',
                 '_grant_usage_0003', '_revoke_usage_0003', '_install_step_function',
                 '_drop_step_function', '_step_function_name', '_command_limits',
                 '_unfinished_instances', '_doorbell']
$$;

REVOKE ALL ON ALL FUNCTIONS IN SCHEMA df FROM PUBLIC;
