-- 0022_fewer_start_queries: df.start skips two queries it did not need.
--
-- In PL/pgSQL, a condition with a sub-select is a query of its own however it comes out, and
-- starting and ending an executor for it costs more than what such a small query does (a
-- seventh of df.start's CPU went to starting executors). Two of df.start's queries could be
-- told beforehand that they had nothing to do:
--
--   * the caller trigger looked up the schema owner and the caller's membership in it for
--     every command; that matters only when a command names another role than the caller's
--     own (only the runtime may), never for df.start, so it is looked up only then. (A WHEN
--     clause on the trigger would skip the call, but its condition is read and prepared again
--     for every INSERT, which costs more than the call);
--   * df._command_start checked that a named database exists in a condition that was a query
--     even without a database; now the query runs only when a database is named.
--
-- Messages, checks and their order are unchanged.

-- 0003's trigger: stamps submitted_by with the calling role, unless the caller is a member of
-- the schema owner (the runtime, writing on a user's behalf).
CREATE OR REPLACE FUNCTION df._command_caller() RETURNS trigger
LANGUAGE plpgsql SECURITY INVOKER AS $$
BEGIN
    IF NEW.submitted_by IS DISTINCT FROM df._current_role() THEN
        IF NOT pg_catalog.pg_has_role(current_user,
                (SELECT nspowner FROM pg_catalog.pg_namespace WHERE nspname = 'df'), 'MEMBER') THEN
            NEW.submitted_by := df._current_role();
        END IF;
    END IF;
    RETURN NEW;
END $$;

-- 0013's df.start, the database looked up only when one is named.
CREATE OR REPLACE FUNCTION df._command_start(c df.commands) RETURNS df.commands
LANGUAGE plpgsql VOLATILE AS $$
DECLARE
    v_mode text := lower(coalesce(c.transaction_mode, 'caller'));
    v_template jsonb;
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
    IF c.database IS NOT NULL THEN
        IF NOT EXISTS (SELECT 1 FROM pg_catalog.pg_database WHERE datname = c.database) THEN
            RAISE EXCEPTION 'database "%" does not exist', c.database
                USING ERRCODE = 'invalid_catalog_name';
        END IF;
    END IF;
    PERFORM df._check_submitter(c.submitted_by);
    v_template := df._start_template(c.graph);

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
    PERFORM df._store_template(v_id, v_template, v_base, c.submitted_by, c.database);
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
