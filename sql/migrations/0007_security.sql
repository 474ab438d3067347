-- 0007_security: steps run confined to their submitter's role; bounded inputs.
--
-- Confinement (docs/security.md has the full argument)
-- ----------------------------------------------------
-- For every role df.grant_usage admits, a function df_exec."step_<role oid>" exists that is
-- SECURITY DEFINER and OWNED BY that role. The executor runs a step of that role by calling
-- it inside its own transaction: the statement (prepared by the executor as "_df_step", never
-- run by it) executes inside the function, so PostgreSQL refuses SET ROLE, RESET ROLE,
-- SET SESSION AUTHORIZATION and set_config('role', …) ("cannot set parameter … within
-- security-definer function"): there is no way back to the runtime's role.
--
-- Nobody but the schema owner has any privilege on df_exec, so a submitter cannot name its
-- own function: it cannot ALTER it (SECURITY INVOKER, SET clauses), replace it or call it.
-- DROP OWNED / REASSIGN OWNED by the role only drop the function or hand it to a role the
-- submitter already controls; a missing function fails the step.

CREATE SCHEMA IF NOT EXISTS df_exec;
REVOKE ALL ON SCHEMA df_exec FROM PUBLIC;
ALTER DEFAULT PRIVILEGES IN SCHEMA df_exec REVOKE EXECUTE ON FUNCTIONS FROM PUBLIC;

-- The name of role p_role's step function (role oids are stable across renames).
CREATE FUNCTION df._step_function_name(p_role regrole) RETURNS text
LANGUAGE sql IMMUTABLE AS $$ SELECT 'step_' || p_role::oid::text $$;

-- (Re)create p_role's step function, owned by p_role. Runs as the schema owner, which must be
-- a superuser or a member of p_role (ALTER … OWNER TO needs that; docs/security.md).
CREATE FUNCTION df._install_step_function(p_role regrole) RETURNS void
LANGUAGE plpgsql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    v_fn text := format('df_exec.%I(text[], boolean)', df._step_function_name(p_role));
BEGIN
    EXECUTE format('DROP FUNCTION IF EXISTS %s', v_fn);
    -- Everything the body names is schema-qualified: it runs with the runtime's search_path
    -- before the statement and with whatever the statement left after it.
    EXECUTE format($f$
        CREATE FUNCTION %s RETURNS SETOF record
        LANGUAGE plpgsql VOLATILE SECURITY DEFINER AS $body$
        DECLARE
            q text := 'EXECUTE _df_step';
            v_path text := pg_catalog.current_setting('search_path');
        BEGIN
            IF pg_catalog.cardinality(p_args) > 0 THEN
                q := q || '(' || (SELECT pg_catalog.string_agg(pg_catalog.quote_nullable(a), ', '
                                                               ORDER BY n)
                                  FROM pg_catalog.unnest(p_args) WITH ORDINALITY AS u(a, n)) || ')';
            END IF;
            IF p_rows THEN
                RETURN QUERY EXECUTE q;
            ELSE
                EXECUTE q;
            END IF;
            -- Deferred constraint triggers would otherwise fire at COMMIT, as the runtime.
            SET CONSTRAINTS ALL IMMEDIATE;
            -- State that outlives the function and would run or resolve later as the runtime:
            -- a changed search_path, cursors (WITH HOLD ones run at COMMIT), prepared
            -- statements. The executor also resets all of it after every step.
            IF pg_catalog.current_setting('search_path') IS DISTINCT FROM v_path THEN
                RAISE EXCEPTION 'a step cannot change search_path (it ran %%, then %%)',
                    v_path, pg_catalog.current_setting('search_path')
                    USING ERRCODE = 'insufficient_privilege',
                          HINT = 'Schema-qualify names, or SET search_path in a function''s own SET clause.';
            END IF;
            IF EXISTS (SELECT FROM pg_catalog.pg_cursors WHERE is_holdable)
               OR EXISTS (SELECT FROM pg_catalog.pg_prepared_statements
                          WHERE name <> '_df_step') THEN
                RAISE EXCEPTION 'a step cannot leave cursors or prepared statements behind'
                    USING ERRCODE = 'insufficient_privilege';
            END IF;
        END $body$ $f$, replace(v_fn, '(text[], boolean)', '(p_args text[], p_rows boolean)'));
    EXECUTE format('REVOKE ALL ON FUNCTION %s FROM PUBLIC', v_fn);
    -- ALTER … OWNER TO needs the new owner to have CREATE on the schema: only for this moment,
    -- inside this transaction, invisible to any other session.
    EXECUTE format('GRANT CREATE ON SCHEMA df_exec TO %s', p_role);
    EXECUTE format('ALTER FUNCTION %s OWNER TO %s', v_fn, p_role);
    EXECUTE format('REVOKE CREATE ON SCHEMA df_exec FROM %s', p_role);
    EXECUTE format('GRANT EXECUTE ON FUNCTION %s TO %I', v_fn, current_user);
END $$;

CREATE FUNCTION df._drop_step_function(p_role regrole) RETURNS void
LANGUAGE plpgsql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    EXECUTE format('DROP FUNCTION IF EXISTS df_exec.%I(text[], boolean)',
                   df._step_function_name(p_role));
END $$;

-- df.grant_usage / df.revoke_usage as in 0003, plus the step function.
ALTER FUNCTION df.grant_usage(text, boolean, boolean) RENAME TO _grant_usage_0003;
ALTER FUNCTION df.revoke_usage(text) RENAME TO _revoke_usage_0003;

CREATE FUNCTION df.grant_usage(p_role text, include_http boolean DEFAULT false,
                               with_grant boolean DEFAULT false) RETURNS text
LANGUAGE plpgsql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    v_result text := df._grant_usage_0003(p_role, include_http, with_grant);
BEGIN
    PERFORM df._install_step_function((SELECT oid::regrole FROM pg_catalog.pg_roles
                                       WHERE rolname = p_role));
    RETURN v_result;
END $$;

CREATE FUNCTION df.revoke_usage(p_role text) RETURNS text
LANGUAGE plpgsql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    v_result text := df._revoke_usage_0003(p_role);
BEGIN
    PERFORM df._drop_step_function((SELECT oid::regrole FROM pg_catalog.pg_roles
                                    WHERE rolname = p_role));
    RETURN v_result;
END $$;

-- The renamed 0003 functions are internal now: never granted (0003's grant loop skips them).
CREATE OR REPLACE FUNCTION df._internal_functions() RETURNS text[]
LANGUAGE sql IMMUTABLE AS $$
    SELECT ARRAY['_command_start', '_command_signal', '_command_cancel', '_start_new',
                 '_store_graph', '_check_submitter', '_visible_instance', '_loopback_conninfo',
                 '_grant_usage_0003', '_revoke_usage_0003', '_install_step_function',
                 '_drop_step_function', '_step_function_name', '_command_limits']
$$;

-- Roles granted before this migration get their step function now.
DO $$
DECLARE
    r regrole;
BEGIN
    FOR r IN
        SELECT DISTINCT a.grantee::regrole
        FROM pg_catalog.pg_namespace n, pg_catalog.aclexplode(n.nspacl) a
        WHERE n.nspname = 'df' AND a.privilege_type = 'USAGE' AND a.grantee <> n.nspowner
          AND a.grantee <> 0
    LOOP
        PERFORM df._install_step_function(r);
    END LOOP;
END $$;

-- --------------------------------------------------------------------------------------
-- Bounded inputs (each a df.settings row an administrator may change)
-- --------------------------------------------------------------------------------------

INSERT INTO df.settings (name, value, description) VALUES
    ('max_result_bytes', '1048576',
     'largest result a step may store, in bytes of JSON; a larger result fails the step'),
    ('max_signal_payload_bytes', '65536', 'largest df.signal payload, in bytes'),
    ('max_label_length', '1024', 'longest df.start label, in characters'),
    ('max_running_instances_per_role', '10000',
     'pending or running instances one role may have; df.start refuses more');

-- Checked before df_commands_2_apply and after df_commands_1_caller has stamped the role
-- (triggers of one event fire in name order).
CREATE FUNCTION df._command_limits() RETURNS trigger
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
        SELECT count(*) INTO v_count FROM df.instances
        WHERE submitted_by = NEW.submitted_by AND status IN ('pending', 'running');
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

CREATE TRIGGER df_commands_1_limits BEFORE INSERT ON df.commands
    FOR EACH ROW EXECUTE FUNCTION df._command_limits();

REVOKE ALL ON ALL FUNCTIONS IN SCHEMA df FROM PUBLIC;
REVOKE ALL ON ALL FUNCTIONS IN SCHEMA df_exec FROM PUBLIC;
