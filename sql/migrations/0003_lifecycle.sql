-- 0003_lifecycle: starting, signalling, cancelling and reading workflow instances.
--
-- Writers go through df.commands. df.start, df.signal and df.cancel insert a row there, and so
-- may users by hand; two BEFORE INSERT triggers turn the row into instance rows and mailbox
-- messages in the same transaction:
--   df_commands_1_caller   (SECURITY INVOKER) stamps submitted_by with the calling role, so a
--                          row can never claim to come from someone else;
--   df_commands_2_apply    (SECURITY DEFINER) validates and applies the command.
-- A command that fails validation raises, and the caller's statement writes nothing.
--
-- Read functions are SECURITY INVOKER: row-level security on the tables decides what a role
-- sees. No SECURITY DEFINER function here takes a caller identity as a parameter.

-- A task's payload carries earlier results, whose keys must keep their select-list order
-- ($name is the first column): json keeps the text as written, jsonb would sort the keys.
ALTER TABLE df.tasks ALTER COLUMN payload TYPE json USING payload::json;

-- --------------------------------------------------------------------------------------
-- Row-level security
-- --------------------------------------------------------------------------------------

ALTER TABLE df.instances ENABLE ROW LEVEL SECURITY;
ALTER TABLE df.nodes ENABLE ROW LEVEL SECURITY;
ALTER TABLE df.commands ENABLE ROW LEVEL SECURITY;
ALTER TABLE df.vars ENABLE ROW LEVEL SECURITY;

CREATE POLICY instances_visible ON df.instances FOR SELECT USING (df._sees(submitted_by));
CREATE POLICY nodes_visible ON df.nodes FOR SELECT USING (df._sees(submitted_by));
CREATE POLICY commands_visible ON df.commands FOR SELECT USING (df._sees(submitted_by));
CREATE POLICY commands_own ON df.commands FOR INSERT
    WITH CHECK (submitted_by = df._current_role());
CREATE POLICY vars_own ON df.vars FOR ALL
    USING (owner = df._current_role()) WITH CHECK (owner = df._current_role());

-- --------------------------------------------------------------------------------------
-- Small helpers
-- --------------------------------------------------------------------------------------

-- The id of the instance whose step runs in this session, or NULL outside a workflow.
CREATE FUNCTION df._running_instance() RETURNS text
LANGUAGE sql STABLE AS $$ SELECT nullif(current_setting('df.instance_id', true), '') $$;

CREATE FUNCTION df._refuse_inside_workflow(p_function text) RETURNS void
LANGUAGE plpgsql STABLE AS $$
BEGIN
    IF df._running_instance() IS NOT NULL THEN
        RAISE EXCEPTION '%() cannot be called inside a workflow', p_function
            USING ERRCODE = 'feature_not_supported';
    END IF;
END $$;

CREATE FUNCTION df._is_terminal(p_status text) RETURNS boolean
LANGUAGE sql IMMUTABLE AS $$ SELECT p_status IN ('completed', 'failed', 'cancelled') $$;

CREATE FUNCTION df._new_hex_id() RETURNS text
LANGUAGE sql VOLATILE AS $$ SELECT lpad(to_hex((random() * 4294967295)::bigint), 8, '0') $$;

-- The engine's workflow name, as pg_durable reports it (its clients filter on it).
CREATE FUNCTION df._function_name() RETURNS text
LANGUAGE sql IMMUTABLE AS $$ SELECT 'pg_durable::orchestration::execute-function-graph'::text $$;

-- --------------------------------------------------------------------------------------
-- Storing a validated graph
-- --------------------------------------------------------------------------------------

-- Explode a graph (as returned by df._validate_graph) into df.nodes rows of p_instance_id.
-- Node ids are consecutive from p_base in pre-order (the root is p_base); children become ids
-- in left_node/right_node, condition_node/extra_nodes move into the stored query config.
CREATE FUNCTION df._store_graph(p_instance_id text, p_graph jsonb, p_base bigint,
                                p_submitted_by regrole, p_database text) RETURNS integer
LANGUAGE plpgsql VOLATILE AS $$
DECLARE
    v_count integer;
BEGIN
    WITH RECURSIVE tree(node, path, parent_path, slot) AS (
        SELECT p_graph, ARRAY[]::int[], NULL::int[], NULL::text
        UNION ALL
        SELECT c.child, t.path || c.ord, t.path, c.slot
        FROM tree t
        CROSS JOIN LATERAL (
            SELECT t.node -> 'condition_node' AS child, 0 AS ord, 'condition' AS slot
            WHERE jsonb_typeof(t.node -> 'condition_node') = 'object'
            UNION ALL
            SELECT t.node -> 'left_node', 1, 'left'
            WHERE jsonb_typeof(t.node -> 'left_node') = 'object'
            UNION ALL
            SELECT t.node -> 'right_node', 2, 'right'
            WHERE jsonb_typeof(t.node -> 'right_node') = 'object'
            UNION ALL
            SELECT e.value, 2 + e.ord::int, 'extra'
            FROM jsonb_array_elements(CASE WHEN jsonb_typeof(t.node -> 'extra_nodes') = 'array'
                                           THEN t.node -> 'extra_nodes' ELSE '[]' END)
                 WITH ORDINALITY AS e(value, ord)
        ) c
    ),
    numbered AS (
        SELECT t.*, (row_number() OVER (ORDER BY t.path) - 1)::int AS position
        FROM tree t
    ),
    ided AS (
        SELECT n.*, lpad(to_hex((p_base + n.position) % 4294967296), 8, '0') AS nid
        FROM numbered n
    ),
    kids AS (
        SELECT parent_path,
               max(nid) FILTER (WHERE slot = 'condition') AS condition_id,
               max(nid) FILTER (WHERE slot = 'left') AS left_id,
               max(nid) FILTER (WHERE slot = 'right') AS right_id,
               jsonb_agg(nid ORDER BY path) FILTER (WHERE slot = 'extra') AS extra_ids
        FROM ided WHERE parent_path IS NOT NULL
        GROUP BY parent_path
    )
    INSERT INTO df.nodes (id, instance_id, node_type, query, result_name, left_node, right_node,
                          submitted_by, database, parent_node, position)
    SELECT n.nid, p_instance_id, n.node ->> 'node_type',
           CASE
               WHEN k.condition_id IS NOT NULL
                   THEN jsonb_build_object('condition_node', k.condition_id)::text
               WHEN k.extra_ids IS NOT NULL
                   THEN jsonb_build_object('extra_nodes', k.extra_ids)::text
               WHEN jsonb_typeof(n.node -> 'query') = 'string' THEN n.node ->> 'query'
               WHEN n.node ? 'query' AND jsonb_typeof(n.node -> 'query') <> 'null'
                   THEN (n.node -> 'query')::text
           END,
           n.node ->> 'result_name', k.left_id, k.right_id, p_submitted_by, p_database,
           p.nid, n.position
    FROM ided n
    LEFT JOIN kids k ON k.parent_path = n.path
    LEFT JOIN ided p ON p.path = n.parent_path;
    GET DIAGNOSTICS v_count = ROW_COUNT;
    RETURN v_count;
END $$;

-- --------------------------------------------------------------------------------------
-- Commands
-- --------------------------------------------------------------------------------------

CREATE FUNCTION df._command_caller() RETURNS trigger
LANGUAGE plpgsql SECURITY INVOKER AS $$
BEGIN
    -- Only the runtime (members of the schema owner) may write on someone else's behalf.
    IF NOT pg_catalog.pg_has_role(current_user,
            (SELECT nspowner FROM pg_catalog.pg_namespace WHERE nspname = 'df'), 'MEMBER') THEN
        NEW.submitted_by := df._current_role();
    END IF;
    RETURN NEW;
END $$;

CREATE FUNCTION df._command_apply() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    NEW.command := lower(NEW.command);
    CASE NEW.command
        WHEN 'start' THEN RETURN df._command_start(NEW);
        WHEN 'signal' THEN RETURN df._command_signal(NEW);
        WHEN 'cancel' THEN RETURN df._command_cancel(NEW);
        ELSE RAISE EXCEPTION 'unknown command ''%'' (expected start, signal or cancel)',
                NEW.command USING ERRCODE = 'invalid_parameter_value';
    END CASE;
END $$;

CREATE TRIGGER df_commands_1_caller BEFORE INSERT ON df.commands
    FOR EACH ROW EXECUTE FUNCTION df._command_caller();
CREATE TRIGGER df_commands_2_apply BEFORE INSERT ON df.commands
    FOR EACH ROW EXECUTE FUNCTION df._command_apply();

-- May this role start workflows at all? (SPEC §10)
CREATE FUNCTION df._check_submitter(p_role regrole) RETURNS void
LANGUAGE plpgsql STABLE AS $$
DECLARE
    r record;
BEGIN
    SELECT rolname, rolsuper, rolcanlogin INTO r FROM pg_catalog.pg_roles WHERE oid = p_role;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'role % does not exist', p_role::oid USING ERRCODE = 'undefined_object';
    END IF;
    IF r.rolsuper AND df._setting('enable_superuser_instances') IS DISTINCT FROM 'true' THEN
        RAISE EXCEPTION 'superuser instances are disabled: "%" is a superuser', r.rolname
            USING ERRCODE = 'insufficient_privilege',
                  HINT = 'An administrator may allow them: UPDATE df.settings SET value = ''true'' '
                         'WHERE name = ''enable_superuser_instances''';
    END IF;
    IF NOT r.rolcanlogin AND df._setting('allow_nologin_instances') IS DISTINCT FROM 'true' THEN
        RAISE EXCEPTION 'current_user "%" does not have LOGIN privilege', r.rolname
            USING ERRCODE = 'insufficient_privilege',
                  HINT = 'An administrator may allow roles without LOGIN: UPDATE df.settings '
                         'SET value = ''true'' WHERE name = ''allow_nologin_instances''';
    END IF;
END $$;

CREATE FUNCTION df._command_start(c df.commands) RETURNS df.commands
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
    PERFORM pg_notify('df_mailbox', '');
    c.instance_id := v_id;
    RETURN c;
END $$;

-- The schema of the dblink extension, NULL when it is not installed.
CREATE FUNCTION df._dblink_schema() RETURNS text
LANGUAGE sql STABLE AS $$
    SELECT n.nspname::text FROM pg_catalog.pg_extension e
    JOIN pg_catalog.pg_namespace n ON n.oid = e.extnamespace WHERE e.extname = 'dblink'
$$;

-- transaction_mode 'new': start the instance in a separate session (dblink) that commits on
-- its own, so it survives a rollback of the caller's transaction. The session logs in with
-- df.secrets 'new_transaction_conninfo' (default: this database over the default socket; a
-- non-superuser owner needs a password there, as dblink requires one).
-- At most 'max_new_transaction_starts' such starts run at once, cluster-wide.
CREATE FUNCTION df._start_new(c df.commands) RETURNS text
LANGUAGE plpgsql VOLATILE AS $$
DECLARE
    v_schema text;
    v_slots int := coalesce(df._setting('max_new_transaction_starts')::int, 2);
    v_wait numeric := coalesce(df._setting('new_transaction_start_timeout')::numeric, 5);
    v_deadline timestamptz := clock_timestamp() + make_interval(secs => v_wait);
    v_slot int;
    v_conninfo text;
    v_id text;
BEGIN
    v_schema := df._dblink_schema();
    IF v_schema IS NULL THEN
        RAISE EXCEPTION 'transaction_mode ''new'' needs the dblink extension in this database'
            USING ERRCODE = 'feature_not_supported',
                  HINT = 'CREATE EXTENSION dblink; (or use transaction_mode ''caller'')';
    END IF;
    <<wait>>
    LOOP
        FOR s IN 1 .. v_slots LOOP
            IF pg_try_advisory_lock(x'64666E657700'::bigint + s) THEN
                v_slot := s;
                EXIT wait;
            END IF;
        END LOOP;
        IF clock_timestamp() > v_deadline THEN
            RAISE EXCEPTION 'launch limit reached (max_new_transaction_starts=%). Timed out after %s '
                'waiting for a launch slot', v_slots, v_wait
                USING ERRCODE = 'too_many_connections';
        END IF;
        PERFORM pg_sleep(0.01);
    END LOOP;
    v_conninfo := df._loopback_conninfo();
    BEGIN
        EXECUTE format('SELECT x FROM %I.dblink($1, $2) AS t(x text)', v_schema)
        INTO v_id
        USING v_conninfo, format(
            'INSERT INTO df.commands (command, graph, label, database, transaction_mode, '
            'submitted_by) VALUES (''start'', %L, %L, %L, ''caller'', %L::oid::regrole) '
            'RETURNING instance_id',
            c.graph, c.label, c.database, c.submitted_by::oid);
    EXCEPTION WHEN OTHERS THEN
        PERFORM pg_advisory_unlock(x'64666E657700'::bigint + v_slot);
        RAISE;
    END;
    PERFORM pg_advisory_unlock(x'64666E657700'::bigint + v_slot);
    RETURN v_id;
END $$;

INSERT INTO df.settings (name, value, description) VALUES
    ('max_new_transaction_starts', '2', 'concurrent df.start(transaction_mode => ''new'') calls'),
    ('new_transaction_start_timeout', '5', 'seconds to wait for a transaction_mode ''new'' slot');

-- Settings that hold credentials: readable by the schema owner only, never granted.
CREATE TABLE df.secrets (
    name  text PRIMARY KEY,
    value text NOT NULL
);

-- How a separate session reaches this database (transaction_mode 'new', df.await_instance):
-- df.secrets 'new_transaction_conninfo' if set, else this server's first socket directory
-- (or 127.0.0.1) and port, as the current user.
CREATE FUNCTION df._loopback_conninfo() RETURNS text
LANGUAGE sql STABLE AS $$
    SELECT coalesce((SELECT nullif(value, '') FROM df.secrets
                     WHERE name = 'new_transaction_conninfo'),
                    format('dbname=%s user=%s host=%s port=%s',
                           quote_literal(current_database()), quote_literal(current_user),
                           quote_literal(coalesce(nullif(btrim(split_part(
                               current_setting('unix_socket_directories'), ',', 1)), ''),
                               '127.0.0.1')),
                           current_setting('port')))
$$;

CREATE FUNCTION df._visible_instance(p_id text, p_role regrole) RETURNS df.instances
LANGUAGE plpgsql STABLE AS $$
DECLARE
    i df.instances;
BEGIN
    SELECT * INTO i FROM df.instances WHERE id = p_id;
    IF NOT FOUND OR NOT df._role_sees(p_role, i.submitted_by) THEN
        RAISE EXCEPTION 'Instance not found or access denied: %', p_id
            USING ERRCODE = 'no_data_found';
    END IF;
    RETURN i;
END $$;

CREATE FUNCTION df._command_signal(c df.commands) RETURNS df.commands
LANGUAGE plpgsql VOLATILE AS $$
DECLARE
    i df.instances;
    v_data text := coalesce(c.payload, '{}');
BEGIN
    IF coalesce(c.instance_id, '') = '' THEN
        RAISE EXCEPTION 'instance_id must not be empty' USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF coalesce(c.signal_name, '') = '' THEN
        RAISE EXCEPTION 'signal_name must not be empty' USING ERRCODE = 'invalid_parameter_value';
    END IF;
    i := df._visible_instance(c.instance_id, c.submitted_by);
    IF df._is_terminal(i.status) THEN
        -- Clients resend signals in loops that race with completion: accept and discard.
        RAISE NOTICE 'instance % is %; signal ''%'' discarded', i.id, i.status, c.signal_name;
        c.reason := 'discarded: instance is ' || i.status;
        RETURN c;
    END IF;
    BEGIN
        PERFORM v_data::json;
    EXCEPTION WHEN others THEN
        v_data := to_json(v_data)::text;     -- not JSON: deliver as a JSON string
    END;
    INSERT INTO df.mailbox (instance_id, kind, payload)
    VALUES (i.id, 'signal', '{"name":' || to_json(c.signal_name)::text || ',"data":' || v_data || '}');
    PERFORM pg_notify('df_mailbox', '');
    RETURN c;
END $$;

-- Cancel instances and every running descendant: set them 'cancelled' at once, post a
-- 'cancel' message so the runtime stops their running nodes, and wake executors (df_cancel)
-- so that a running step is interrupted. Returns how many instances it cancelled.
CREATE FUNCTION df._cancel_family(p_ids text[], p_reason text) RETURNS integer
LANGUAGE plpgsql VOLATILE AS $$
DECLARE
    v_id text;
    v_count integer := 0;
BEGIN
    FOR v_id IN
        WITH RECURSIVE family(id) AS (
            SELECT unnest(p_ids)
            UNION
            SELECT ch.id FROM df.instances ch JOIN family f ON ch.parent_id = f.id
        )
        SELECT x.id FROM family f JOIN df.instances x ON x.id = f.id
        WHERE x.status IN ('pending', 'running')
        ORDER BY x.id
        FOR UPDATE OF x
    LOOP
        UPDATE df.instances
        SET status = 'cancelled', updated_at = now(), finished_at = now()
        WHERE id = v_id;
        INSERT INTO df.mailbox (instance_id, kind, payload)
        VALUES (v_id, 'cancel', '{"reason":' || to_json(p_reason)::text || '}');
        PERFORM pg_notify('df_cancel', v_id);
        PERFORM pg_notify('df_done', v_id);
        v_count := v_count + 1;
    END LOOP;
    IF v_count > 0 THEN
        PERFORM pg_notify('df_mailbox', '');
    END IF;
    RETURN v_count;
END $$;

CREATE FUNCTION df._command_cancel(c df.commands) RETURNS df.commands
LANGUAGE plpgsql VOLATILE AS $$
DECLARE
    i df.instances;
BEGIN
    IF coalesce(c.instance_id, '') = '' THEN
        RAISE EXCEPTION 'instance_id must not be empty' USING ERRCODE = 'invalid_parameter_value';
    END IF;
    i := df._visible_instance(c.instance_id, c.submitted_by);
    c.reason := coalesce(c.reason, 'Cancelled by user');
    IF df._is_terminal(i.status) THEN
        c.payload := 'already ' || i.status;
        RETURN c;
    END IF;
    PERFORM df._cancel_family(ARRAY[i.id], c.reason);
    c.payload := 'cancelled';
    RETURN c;
END $$;

-- --------------------------------------------------------------------------------------
-- The user's API
-- --------------------------------------------------------------------------------------

CREATE FUNCTION df.start(fut text, label text DEFAULT NULL, database text DEFAULT NULL,
                         transaction_mode text DEFAULT 'caller') RETURNS text
LANGUAGE plpgsql VOLATILE AS $$
DECLARE
    v_id text;
BEGIN
    INSERT INTO df.commands (command, graph, label, database, transaction_mode)
    VALUES ('start', fut, label, database, transaction_mode)
    RETURNING instance_id INTO v_id;
    RETURN df._helper_result('df.start', v_id);
END $$;

CREATE FUNCTION df.signal(instance_id text, signal_name text, signal_data text DEFAULT '{}')
RETURNS text LANGUAGE plpgsql VOLATILE AS $$
BEGIN
    INSERT INTO df.commands (command, instance_id, signal_name, payload)
    VALUES ('signal', instance_id, signal_name, signal_data);
    RETURN df._helper_result('df.signal', 'OK');
END $$;

CREATE FUNCTION df.cancel(instance_id text, reason text DEFAULT 'Cancelled by user')
RETURNS text LANGUAGE plpgsql VOLATILE AS $$
DECLARE
    v_outcome text;
    v_reason text;
BEGIN
    INSERT INTO df.commands (command, instance_id, reason)
    VALUES ('cancel', instance_id, reason)
    RETURNING payload, commands.reason INTO v_outcome, v_reason;
    IF v_outcome = 'cancelled' THEN
        RETURN df._helper_result('df.cancel',
                                 format('Instance %s cancelled: %s', instance_id, v_reason));
    END IF;
    RETURN df._helper_result('df.cancel',
                             format('Instance %s is %s', instance_id, v_outcome));
END $$;

-- status and result are VOLATILE so that, in one statement, they see what df.await_instance
-- just did (SELECT df.result(df.await_instance(df.start(...))) works).
CREATE FUNCTION df.status(instance_id text) RETURNS text
LANGUAGE sql VOLATILE AS $$
    SELECT df._helper_result('df.status', i.status) FROM df.instances i WHERE i.id = instance_id
$$;

-- The stored result text of a completed instance's root node (keys in select-list order).
CREATE FUNCTION df._output(p_id text, p_status text, p_root text) RETURNS text
LANGUAGE sql STABLE AS $$
    SELECT n.result_text FROM df.nodes n
    WHERE p_status = 'completed' AND n.instance_id = p_id AND n.id = p_root
      AND n.status = 'completed'
$$;

-- df.await_instance returns a status, not an id; so that the natural one-liner
-- SELECT df.result(df.await_instance(df.start(...))) works, df.result given the status that
-- df.await_instance returned in this same statement means the instance it awaited.
CREATE FUNCTION df._awaited(p_value text) RETURNS text
LANGUAGE sql VOLATILE AS $$
    SELECT CASE
        WHEN p_value IN ('completed', 'failed', 'cancelled')
             AND split_part(current_setting('df.awaited', true), '|', 1)
                 = statement_timestamp()::text
             AND split_part(current_setting('df.awaited', true), '|', 3) = p_value
        THEN split_part(current_setting('df.awaited', true), '|', 2)
        ELSE p_value
    END
$$;

CREATE FUNCTION df.result(instance_id text) RETURNS text
LANGUAGE sql VOLATILE AS $$
    SELECT df._helper_result('df.result', df._output(i.id, i.status, i.root_node))
    FROM df.instances i
    WHERE i.id = df._awaited(instance_id)
$$;

-- An instance started by the current, uncommitted transaction can never be seen by the
-- runtime. df.await_instance then hands it over: a session of its own (dblink) starts the same
-- workflow, waits for it, copies its outcome into this transaction's instance and removes its
-- copy. The instance thus runs like transaction_mode 'new' (its steps commit on their own).
-- Returns the copy's status; on a timeout the copy is cancelled and this instance stays
-- pending.
CREATE FUNCTION df._hand_over(p_id text, p_deadline timestamptz) RETURNS text
LANGUAGE plpgsql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    i df.instances;
    v_xmin xid;
    v_graph text;
    v_schema text := df._dblink_schema();
    v_conn text := 'df_hand_over_' || p_id;
    v_copy text;
    v_status text;
    v_pause float8 := 0.002;
BEGIN
    SELECT * INTO i FROM df.instances x WHERE x.id = p_id FOR UPDATE;
    SELECT x.xmin INTO v_xmin FROM df.instances x WHERE x.id = p_id;
    IF i.id IS NULL OR i.status <> 'pending'
       OR v_xmin IS DISTINCT FROM xid(pg_current_xact_id_if_assigned()) THEN
        RAISE EXCEPTION 'instance % was not started by this transaction', p_id
            USING ERRCODE = 'object_not_in_prerequisite_state';
    END IF;
    IF v_schema IS NULL THEN
        RAISE EXCEPTION 'instance % was started in this transaction; commit before awaiting it',
            p_id USING ERRCODE = 'object_not_in_prerequisite_state',
            HINT = 'With the dblink extension (CREATE EXTENSION dblink), df.await_instance '
                   'runs such an instance in a session of its own.';
    END IF;
    SELECT c.graph INTO v_graph FROM df.commands c
    WHERE c.instance_id = p_id AND c.command = 'start' ORDER BY c.id DESC LIMIT 1;
    EXECUTE format('SELECT %I.dblink_connect($1, $2)', v_schema)
        USING v_conn, df._loopback_conninfo();
    BEGIN
        EXECUTE format('SELECT x FROM %I.dblink($1, $2) AS t(x text)', v_schema) INTO v_copy
        USING v_conn, format(
            'INSERT INTO df.commands (command, graph, label, database, transaction_mode, '
            'submitted_by) VALUES (''start'', %L, %L, %L, ''caller'', %L::oid::regrole) '
            'RETURNING instance_id', v_graph, i.label, i.database, i.submitted_by::oid);
        LOOP
            EXECUTE format('SELECT x FROM %I.dblink($1, $2) AS t(x text)', v_schema)
            INTO v_status
            USING v_conn, format('SELECT status FROM df.instances WHERE id = %L', v_copy);
            EXIT WHEN df._is_terminal(v_status);
            IF clock_timestamp() >= p_deadline THEN
                EXECUTE format('SELECT n FROM %I.dblink($1, $2) AS t(n int)', v_schema)
                USING v_conn, format(
                    'SELECT df._cancel_family(ARRAY[%L], ''df.await_instance timed out'')',
                    v_copy);
                EXECUTE format('SELECT %I.dblink_disconnect($1)', v_schema) USING v_conn;
                RETURN v_status;
            END IF;
            PERFORM pg_sleep(v_pause);
            v_pause := least(v_pause * 2, 0.05);
        END LOOP;
        -- Both graphs were stored from the same text: nodes match by position.
        EXECUTE format($q$
            UPDATE df.nodes n
            SET status = r.status, result_text = r.result_text, result = r.result_text::jsonb,
                error = r.error, status_details = r.details::jsonb, activation = r.activation,
                updated_at = now()
            FROM %I.dblink($1, $2) AS r(position int, status text, result_text text,
                                        error text, details text, activation bigint)
            WHERE n.instance_id = $3 AND n.position = r.position$q$, v_schema)
        USING v_conn, format('SELECT position, status, result_text, error, status_details::text,'
                             ' activation FROM df.nodes WHERE instance_id = %L', v_copy), p_id;
        EXECUTE format($q$
            UPDATE df.instances i
            SET status = r.status, execution_count = r.execution_count, seq = r.seq,
                completed_at = CASE WHEN r.status = 'completed' THEN now() END,
                finished_at = now(), updated_at = now()
            FROM %I.dblink($1, $2) AS r(status text, execution_count int, seq bigint)
            WHERE i.id = $3$q$, v_schema)
        USING v_conn, format('SELECT status, execution_count, seq FROM df.instances'
                             ' WHERE id = %L', v_copy), p_id;
        DELETE FROM df.mailbox WHERE instance_id = p_id;
        EXECUTE format('SELECT %I.dblink_exec($1, $2)', v_schema)
        USING v_conn, format('DELETE FROM df.instances WHERE id = %L', v_copy);
        EXECUTE format('SELECT %I.dblink_disconnect($1)', v_schema) USING v_conn;
    EXCEPTION WHEN OTHERS THEN
        BEGIN
            EXECUTE format('SELECT %I.dblink_disconnect($1)', v_schema) USING v_conn;
        EXCEPTION WHEN OTHERS THEN
            NULL;
        END;
        RAISE;
    END;
    RETURN v_status;
END $$;

-- Waits with short, growing sleeps (1 ms up to 50 ms): a function cannot LISTEN. The caller's
-- transaction must be READ COMMITTED to see the instance finish.
CREATE FUNCTION df.await_instance(instance_id text, timeout_seconds int DEFAULT 30)
RETURNS text LANGUAGE plpgsql VOLATILE AS $$
DECLARE
    v_deadline timestamptz;
    v_status text;
    v_xmin xid;
    v_pause float8 := 0.001;
BEGIN
    PERFORM df._refuse_inside_workflow('df.await_instance');
    IF timeout_seconds IS NULL OR timeout_seconds <= 0 THEN
        RAISE EXCEPTION 'timeout_seconds must be positive, got %', timeout_seconds
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    v_deadline := clock_timestamp() + make_interval(secs => timeout_seconds);
    SELECT i.status, i.xmin INTO v_status, v_xmin FROM df.instances i WHERE i.id = instance_id;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'Instance not found: %', instance_id USING ERRCODE = 'no_data_found';
    END IF;
    IF v_status = 'pending' AND v_xmin = xid(pg_current_xact_id_if_assigned()) THEN
        v_status := df._hand_over(instance_id, v_deadline);
    END IF;
    WHILE NOT df._is_terminal(v_status) LOOP
        IF clock_timestamp() >= v_deadline THEN
            RAISE EXCEPTION 'Timeout after %s waiting for instance % (status: %)',
                timeout_seconds, instance_id, v_status USING ERRCODE = 'query_canceled';
        END IF;
        PERFORM pg_sleep(v_pause);
        v_pause := least(v_pause * 2, 0.05);
        SELECT i.status INTO v_status FROM df.instances i WHERE i.id = instance_id;
    END LOOP;
    PERFORM set_config('df.awaited',
                       statement_timestamp()::text || '|' || instance_id || '|' || v_status, true);
    RETURN df._helper_result('df.await_instance', v_status);
END $$;

CREATE FUNCTION df.wait_for_completion(instance_id text, timeout_seconds int DEFAULT 30)
RETURNS text LANGUAGE sql VOLATILE AS $$ SELECT df.await_instance(instance_id, timeout_seconds) $$;

-- pg_durable's df.run() kicks its worker; ours needs no kick.
CREATE FUNCTION df.run() RETURNS void LANGUAGE sql VOLATILE AS $$ SELECT $$;

-- --------------------------------------------------------------------------------------
-- Monitoring
-- --------------------------------------------------------------------------------------

-- Cursor: base64 of "<created_at as epoch microseconds>:<id>" of the page's last row.
CREATE FUNCTION df.list_instances(status_filter text, limit_count int, label_filter text,
                                  after_cursor text DEFAULT NULL)
RETURNS TABLE (instance_id text, label text, function_name text, status text,
               execution_count bigint, output text, created_at timestamptz,
               completed_at timestamptz, next_cursor text)
LANGUAGE plpgsql STABLE AS $$
DECLARE
    v_max int := coalesce(df._setting('list_instances_max_limit')::int, 1000);
    v_after_ts timestamptz;
    v_after_id text;
    v_decoded text;
    v_next text;
BEGIN
    IF limit_count IS NULL OR limit_count < 1 THEN
        RAISE EXCEPTION 'limit_count must be at least 1, got %', limit_count
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF limit_count > v_max THEN
        RAISE EXCEPTION 'limit_count must not exceed % (list_instances_max_limit), got %',
            v_max, limit_count USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF after_cursor IS NOT NULL THEN
        BEGIN
            v_decoded := convert_from(decode(after_cursor, 'base64'), 'UTF8');
            v_after_ts := to_timestamp(split_part(v_decoded, ':', 1)::numeric / 1000000);
            v_after_id := split_part(v_decoded, ':', 2);
            IF v_after_id !~ '^[0-9a-f]{8}$' THEN
                RAISE EXCEPTION 'bad id';
            END IF;
        EXCEPTION WHEN others THEN
            RAISE EXCEPTION 'invalid cursor: %', after_cursor
                USING ERRCODE = 'invalid_parameter_value';
        END;
    END IF;
    RETURN QUERY
    WITH page AS (
        SELECT i.*, row_number() OVER (ORDER BY i.created_at DESC, i.id) AS rn
        FROM (SELECT * FROM df.instances x
              WHERE x.parent_id IS NULL
                AND (status_filter IS NULL OR x.status = status_filter)
                AND (label_filter IS NULL OR x.label = label_filter)
                AND (v_after_ts IS NULL OR x.created_at < v_after_ts
                     OR (x.created_at = v_after_ts AND x.id > v_after_id))
              ORDER BY x.created_at DESC, x.id
              LIMIT limit_count + 1) i
    ),
    page_end AS (
        SELECT CASE WHEN (SELECT count(*) FROM page) > limit_count THEN
                   encode(convert_to(
                       (extract(epoch FROM p.created_at) * 1000000)::bigint::text || ':' || p.id,
                       'UTF8'), 'base64')
               END AS c
        FROM page p WHERE p.rn = limit_count
    )
    SELECT p.id, p.label, df._function_name(), p.status, p.execution_count::bigint,
           df._output(p.id, p.status, p.root_node), p.created_at,
           CASE WHEN p.status = 'completed' THEN p.completed_at END,
           (SELECT c FROM page_end)
    FROM page p
    WHERE p.rn <= limit_count
    ORDER BY p.rn;
END $$;

CREATE FUNCTION df.list_instances(status_filter text DEFAULT NULL, limit_count int DEFAULT 100)
RETURNS TABLE (instance_id text, label text, function_name text, status text,
               execution_count bigint, output text)
LANGUAGE sql STABLE AS $$
    SELECT l.instance_id, l.label, l.function_name, l.status, l.execution_count, l.output
    FROM df.list_instances(status_filter, limit_count, NULL::text, NULL::text) l
$$;

-- An instance and the child instances it spawned.
CREATE FUNCTION df._family(p_instance_id text) RETURNS TABLE (instance_id text)
LANGUAGE sql STABLE AS $$
    WITH RECURSIVE family(id) AS (
        SELECT i.id FROM df.instances i WHERE i.id = p_instance_id
        UNION ALL
        SELECT ch.id FROM df.instances ch JOIN family f ON ch.parent_id = f.id
    )
    SELECT id FROM family
$$;

CREATE FUNCTION df.instance_nodes(instance_id text)
RETURNS TABLE (node_id text, node_type text, query text, result_name text, left_node text,
               right_node text, status text, result text, status_details text,
               inferred_status text, inferred_status_from_ancestor_id text,
               updated_at timestamptz)
LANGUAGE sql STABLE AS $$
    SELECT n.id, n.node_type, n.query, n.result_name, n.left_node, n.right_node, n.status,
           coalesce(n.result_text, n.result::text), n.status_details::text,
           coalesce(inf.inferred_status, n.status), inf.inferred_status_from_ancestor_id,
           n.updated_at
    FROM df._family(instance_nodes.instance_id) f
    JOIN df.nodes n ON n.instance_id = f.instance_id
    LEFT JOIN df._inferred_nodes(instance_nodes.instance_id) inf ON inf.node_id = n.id
    ORDER BY n.position, n.id
$$;

CREATE FUNCTION df.instance_info(id text)
RETURNS TABLE (instance_id text, label text, function_name text, function_version text,
               current_execution_id text, status text, output text)
LANGUAGE sql STABLE AS $$
    SELECT i.id, i.label, df._function_name(), ''::text,
           i.id || '-' || i.execution_count, i.status, df._output(i.id, i.status, i.root_node)
    FROM df.instances i WHERE i.id = instance_info.id
$$;

-- We keep no per-execution history: the current execution is the only row.
CREATE FUNCTION df.instance_executions(instance_id text, limit_count int DEFAULT 5)
RETURNS TABLE (execution_id text, status text, event_count bigint, duration_ms bigint,
               output text)
LANGUAGE plpgsql STABLE AS $$
BEGIN
    IF limit_count IS NULL OR limit_count < 1 THEN
        RAISE EXCEPTION 'limit_count must be at least 1, got %', limit_count
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    RETURN QUERY
    SELECT i.id || '-' || i.execution_count, i.status,
           (SELECT count(*) FROM df.nodes n WHERE n.instance_id = i.id AND n.status <> 'pending'),
           (extract(epoch FROM coalesce(i.finished_at, now()) - i.created_at) * 1000)::bigint,
           df._output(i.id, i.status, i.root_node)
    FROM df.instances i WHERE i.id = instance_executions.instance_id;
END $$;

CREATE FUNCTION df.metrics()
RETURNS TABLE (total_instances bigint, running_instances bigint, completed_instances bigint,
               failed_instances bigint, total_executions bigint, total_events bigint)
LANGUAGE sql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
    SELECT count(*), count(*) FILTER (WHERE status IN ('pending', 'running')),
           count(*) FILTER (WHERE status = 'completed'), count(*) FILTER (WHERE status = 'failed'),
           coalesce(sum(execution_count), 0)::bigint,
           (SELECT count(*) FROM df.nodes WHERE status <> 'pending')
    FROM df.instances
$$;

-- --------------------------------------------------------------------------------------
-- Variables (SPEC §3): the caller's own, under row-level security
-- --------------------------------------------------------------------------------------

CREATE FUNCTION df.setvar(name text, value text) RETURNS text
LANGUAGE plpgsql VOLATILE AS $$
BEGIN
    PERFORM df._refuse_inside_workflow('df.setvar');
    IF coalesce(name, '') = '' THEN
        RAISE EXCEPTION 'variable name must not be empty' USING ERRCODE = 'invalid_parameter_value';
    END IF;
    INSERT INTO df.vars (name, value) VALUES (setvar.name, setvar.value)
    ON CONFLICT ON CONSTRAINT vars_pkey DO UPDATE SET value = excluded.value;
    RETURN df._helper_result('df.setvar', 'OK');
END $$;

CREATE FUNCTION df.getvar(name text) RETURNS text
LANGUAGE sql STABLE AS $$
    SELECT df._helper_result('df.getvar', v.value) FROM df.vars v
    WHERE v.owner = df._current_role() AND v.name = getvar.name
$$;

CREATE FUNCTION df.unsetvar(name text) RETURNS text
LANGUAGE plpgsql VOLATILE AS $$
BEGIN
    PERFORM df._refuse_inside_workflow('df.unsetvar');
    DELETE FROM df.vars v WHERE v.owner = df._current_role() AND v.name = unsetvar.name;
    RETURN df._helper_result('df.unsetvar', 'OK');
END $$;

CREATE FUNCTION df.clearvars() RETURNS text
LANGUAGE plpgsql VOLATILE AS $$
BEGIN
    PERFORM df._refuse_inside_workflow('df.clearvars');
    DELETE FROM df.vars v WHERE v.owner = df._current_role();
    RETURN df._helper_result('df.clearvars', 'OK');
END $$;

-- --------------------------------------------------------------------------------------
-- Granting use (SPEC §10). EXECUTE on df.grant_usage is itself the admin right: PostgreSQL
-- refuses the call ("permission denied") to everyone else.
-- --------------------------------------------------------------------------------------

CREATE FUNCTION df._admin_functions() RETURNS text[]
LANGUAGE sql IMMUTABLE AS $$ SELECT ARRAY['grant_usage', 'revoke_usage', 'metrics'] $$;

-- Functions only the command trigger runs (as the schema owner); never granted.
CREATE FUNCTION df._internal_functions() RETURNS text[]
LANGUAGE sql IMMUTABLE AS $$
    SELECT ARRAY['_command_start', '_command_signal', '_command_cancel', '_start_new',
                 '_store_graph', '_check_submitter', '_visible_instance', '_loopback_conninfo']
$$;

CREATE FUNCTION df._http_functions() RETURNS text[]
LANGUAGE sql IMMUTABLE AS $$ SELECT ARRAY['http', 'http_multipart'] $$;

CREATE FUNCTION df.grant_usage(p_role text, include_http boolean DEFAULT false,
                               with_grant boolean DEFAULT false) RETURNS text
LANGUAGE plpgsql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    f regprocedure;
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_catalog.pg_roles WHERE rolname = p_role) THEN
        RAISE EXCEPTION 'role "%" does not exist', p_role USING ERRCODE = 'undefined_object';
    END IF;
    EXECUTE format('GRANT USAGE ON SCHEMA df TO %I', p_role);
    EXECUTE format('GRANT SELECT ON df.instances, df.nodes, df.settings TO %I', p_role);
    EXECUTE format('GRANT SELECT, INSERT ON df.commands TO %I', p_role);
    EXECUTE format('GRANT SELECT, INSERT, UPDATE, DELETE ON df.vars TO %I', p_role);
    IF to_regclass('df.foreach_rows') IS NOT NULL THEN     -- 0009: rows a df.foreach stores
        EXECUTE format('GRANT INSERT ON df.foreach_rows TO %I', p_role);
    END IF;
    FOR f IN
        SELECT p.oid::regprocedure FROM pg_catalog.pg_proc p
        WHERE p.pronamespace = 'df'::regnamespace AND p.prorettype <> 'trigger'::regtype
          AND NOT p.proname = ANY (df._internal_functions())
          AND (NOT p.proname = ANY (df._admin_functions() || df._http_functions())
               OR (include_http AND p.proname = ANY (df._http_functions()))
               OR (with_grant AND p.proname = ANY (df._admin_functions())))
    LOOP
        EXECUTE format('GRANT EXECUTE ON FUNCTION %s TO %I', f, p_role);
    END LOOP;
    RETURN 'OK';
END $$;

CREATE FUNCTION df.revoke_usage(p_role text) RETURNS text
LANGUAGE plpgsql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_catalog.pg_roles WHERE rolname = p_role) THEN
        RAISE EXCEPTION 'role "%" does not exist', p_role USING ERRCODE = 'undefined_object';
    END IF;
    EXECUTE format('REVOKE ALL ON ALL FUNCTIONS IN SCHEMA df FROM %I', p_role);
    EXECUTE format('REVOKE ALL ON ALL TABLES IN SCHEMA df FROM %I', p_role);
    EXECUTE format('REVOKE ALL ON SCHEMA df FROM %I', p_role);
    RETURN 'OK';
END $$;

REVOKE ALL ON ALL FUNCTIONS IN SCHEMA df FROM PUBLIC;
