-- 0015_pipelined_steps: take on a trusted submitter's role for a step sent pipelined.
--
-- The executor sends the steps of roles it found trusted (superusers, its own role) many to a
-- round trip. The statement that sets such a step's role checks, before it sets it, that the
-- role still exists and is still trusted, and fails otherwise (the step then runs alone and
-- the role is looked up afresh). In PL/pgSQL its plans are kept for the session: a plain
-- statement doing the same was parsed and planned for every step.

CREATE FUNCTION df._as_trusted(p_instance_id text, p_role text) RETURNS text
LANGUAGE plpgsql VOLATILE AS $$
DECLARE
    v_trusted boolean;
    v_max_bytes text;
BEGIN
    SELECT r.rolsuper OR r.rolname = current_user INTO v_trusted
      FROM pg_catalog.pg_roles r WHERE r.rolname = p_role;
    IF v_trusted IS NOT TRUE THEN
        RAISE EXCEPTION 'role "%" is not trusted to run steps directly', p_role
            USING ERRCODE = 'insufficient_privilege';
    END IF;
    SELECT s.value INTO v_max_bytes FROM df.settings s WHERE s.name = 'max_result_bytes';
    PERFORM pg_catalog.set_config('df.instance_id', p_instance_id, true);
    IF p_role IS DISTINCT FROM current_user THEN
        PERFORM pg_catalog.set_config('role', p_role, true);
    END IF;
    RETURN v_max_bytes;
END $$;

-- The runtime's alone, never granted: 0014's list and df._as_trusted.
CREATE OR REPLACE FUNCTION df._internal_functions() RETURNS text[]
LANGUAGE sql IMMUTABLE AS $$
    SELECT ARRAY['_command_start', '_command_signal', '_command_cancel', '_start_new',
                 '_check_submitter', '_visible_instance', '_loopback_conninfo',
                 '_grant_usage_0003', '_revoke_usage_0003', '_install_step_function',
                 '_drop_step_function', '_step_function_name', '_command_limits',
                 '_unfinished_instances', '_doorbell', '_graph_template', '_store_template',
                 '_node_id', '_seal', '_start_template', '_claim_with_mail', '_as_trusted']
$$;

REVOKE ALL ON ALL FUNCTIONS IN SCHEMA df FROM PUBLIC;
