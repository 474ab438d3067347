-- 0018_lighter_start: df.start reads what it checks in fewer statements, and stores its nodes
-- without a foreign key check each.
--
-- In PL/pgSQL an expression without a sub-select is evaluated directly; one with a sub-select,
-- and each df._setting call, runs a query through the executor, which costs several times
-- as much. df.start made fifteen or so such queries for a small graph:
--
--   * df._shape_error, called for every node a composer embeds (three for a ~> b ~> c), had
--     an EXISTS over extra_nodes in its CASE: a query at every call, whatever the node. A
--     JSON path does the same test inside the expression;
--   * the start limits, the submitter's check and the start template each read their
--     settings (and the template its key) one df._setting call at a time: one query each now;
--   * each node row checked its instance through the foreign key, a query per row (five for
--     a ~> b ~> c, an eighth of what df.start cost), always in the transaction that had just
--     inserted that instance or copies nodes to it. The key goes; deleting instances still
--     deletes their nodes, by a trigger (by hand, by retention, with child instances).
--
-- Messages, checks and their order are unchanged.

ALTER TABLE df.nodes DROP CONSTRAINT nodes_instance_id_fkey;

-- What ON DELETE CASCADE did: the nodes of the deleted instances go in the same statement.
-- Through the nodes' key whatever the statistics say (the deleted rows have none).
CREATE FUNCTION df._delete_nodes() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp SET enable_seqscan = off
AS $$
BEGIN
    DELETE FROM df.nodes n WHERE n.instance_id = ANY (ARRAY(SELECT g.id FROM gone g));
    RETURN NULL;
END $$;

CREATE TRIGGER instances_delete_nodes AFTER DELETE ON df.instances
    REFERENCING OLD TABLE AS gone FOR EACH STATEMENT EXECUTE FUNCTION df._delete_nodes();

REVOKE ALL ON FUNCTION df._delete_nodes() FROM PUBLIC;

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
        -- strict: in lax mode the filter would unwrap an entry that is an array.
        WHEN jsonb_typeof(p_node -> 'extra_nodes') = 'array'
         AND jsonb_path_exists(p_node -> 'extra_nodes', 'strict $[*] ? (@.type() != "object")')
            THEN 'extra_nodes entries must be Durofut JSON objects'
        WHEN jsonb_typeof(p_node -> 'query') NOT IN ('string', 'null') THEN 'query must be a string'
        WHEN jsonb_typeof(p_node -> 'result_name') NOT IN ('string', 'null')
            THEN 'result_name must be a string'
    END;
END $$;

-- 0011's limits, both settings in one query.
CREATE OR REPLACE FUNCTION df._command_limits() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    v_label_limit bigint;
    v_limit bigint;
    v_count bigint;
BEGIN
    IF lower(NEW.command) = 'start' THEN
        SELECT max(s.value) FILTER (WHERE s.name = 'max_label_length')::bigint,
               max(s.value) FILTER (WHERE s.name = 'max_running_instances_per_role')::bigint
          INTO v_label_limit, v_limit
          FROM df.settings s
         WHERE s.name IN ('max_label_length', 'max_running_instances_per_role');
        IF length(NEW.label) > v_label_limit THEN
            RAISE EXCEPTION 'label is % characters long; the maximum is % (max_label_length)',
                length(NEW.label), v_label_limit USING ERRCODE = 'program_limit_exceeded';
        END IF;
        -- transaction_mode 'new' stores the instance through a loopback session, whose own
        -- command is checked there (locking here too would deadlock with it).
        IF lower(coalesce(NEW.transaction_mode, 'caller')) = 'new' THEN
            RETURN NEW;
        END IF;
        -- Not serialised: concurrent starts of one role may each pass the count (a lock held
        -- to the caller's commit would deadlock with df.await_instance's loopback session).
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

-- 0003's check, the role and both settings in one query.
CREATE OR REPLACE FUNCTION df._check_submitter(p_role regrole) RETURNS void
LANGUAGE plpgsql STABLE AS $$
DECLARE
    r record;
BEGIN
    SELECT g.rolname, g.rolsuper, g.rolcanlogin,
           (SELECT s.value FROM df.settings s WHERE s.name = 'enable_superuser_instances')
               AS superusers,
           (SELECT s.value FROM df.settings s WHERE s.name = 'allow_nologin_instances')
               AS nologin
      INTO r FROM pg_catalog.pg_roles g WHERE g.oid = p_role;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'role % does not exist', p_role::oid USING ERRCODE = 'undefined_object';
    END IF;
    IF r.rolsuper AND r.superusers IS DISTINCT FROM 'true' THEN
        RAISE EXCEPTION 'superuser instances are disabled: "%" is a superuser', r.rolname
            USING ERRCODE = 'insufficient_privilege',
                  HINT = 'An administrator may allow them: UPDATE df.settings SET value = ''true'' '
                         'WHERE name = ''enable_superuser_instances''';
    END IF;
    IF NOT r.rolcanlogin AND r.nologin IS DISTINCT FROM 'true' THEN
        RAISE EXCEPTION 'current_user "%" does not have LOGIN privilege', r.rolname
            USING ERRCODE = 'insufficient_privilege',
                  HINT = 'An administrator may allow roles without LOGIN: UPDATE df.settings '
                         'SET value = ''true'' WHERE name = ''allow_nologin_instances''';
    END IF;
END $$;

-- A text's seal under a key (as bytes): hex of sha256(key || sha256(key || text)). df._seal
-- (0013) is this under df.secrets' start_template_key; a caller that has the key already
-- passes it. SQL, inlined where it is called.
CREATE FUNCTION df._seal_with(p_key bytea, p_text text) RETURNS text
LANGUAGE sql STABLE AS $$
    SELECT encode(sha256(p_key || sha256(p_key || convert_to(p_text,
                                                             pg_catalog.getdatabaseencoding()))),
                  'hex')
$$;

CREATE OR REPLACE FUNCTION df._seal(p_text text) RETURNS text
LANGUAGE plpgsql STABLE AS $$
BEGIN
    RETURN df._seal_with(convert_to((SELECT value FROM df.secrets
                                     WHERE name = 'start_template_key'),
                                    pg_catalog.getdatabaseencoding()), p_text);
END $$;

-- 0013's template, its settings and the seal's key read in one query.
CREATE OR REPLACE FUNCTION df._start_template(p_graph text) RETURNS jsonb
LANGUAGE plpgsql VOLATILE AS $$
DECLARE
    v_depth text;
    v_count text;
    v_seal_key bytea;
    v_key text;
    v_kept text := coalesce(current_setting('df.start_template', true), '');
    v_template jsonb;
    v_text text;
BEGIN
    SELECT (SELECT s.value FROM df.settings s WHERE s.name = 'max_nesting_depth'),
           (SELECT s.value FROM df.settings s WHERE s.name = 'max_node_count'),
           convert_to((SELECT k.value FROM df.secrets k WHERE k.name = 'start_template_key'),
                      pg_catalog.getdatabaseencoding())
      INTO v_depth, v_count, v_seal_key;
    -- the template's format, the settings that validation reads, the graph
    v_key := encode(sha256(convert_to(concat_ws(E'\n', '1', v_depth, v_count, p_graph),
                                      pg_catalog.getdatabaseencoding())), 'hex');
    IF substr(v_kept, 65, 64) = v_key
       AND left(v_kept, 64) = df._seal_with(v_seal_key, substr(v_kept, 65)) THEN
        RETURN substr(v_kept, 129)::jsonb;
    END IF;
    v_template := df._graph_template(df._validate_graph(p_graph));
    v_text := v_template::text;
    IF octet_length(v_text) <= 65536 THEN
        PERFORM set_config('df.start_template',
                           df._seal_with(v_seal_key, v_key || v_text) || v_key || v_text, false);
    END IF;
    RETURN v_template;
END $$;

REVOKE ALL ON FUNCTION df._seal_with(bytea, text) FROM PUBLIC;

-- The runtime's alone, never granted: 0015's list and df._seal_with.
CREATE OR REPLACE FUNCTION df._internal_functions() RETURNS text[]
LANGUAGE sql IMMUTABLE AS $$
    SELECT ARRAY['_command_start', '_command_signal', '_command_cancel', '_start_new',
                 '_check_submitter', '_visible_instance', '_loopback_conninfo',
                 '_grant_usage_0003', '_revoke_usage_0003', '_install_step_function',
                 '_drop_step_function', '_step_function_name', '_command_limits',
                 '_unfinished_instances', '_doorbell', '_graph_template', '_store_template',
                 '_node_id', '_seal', '_start_template', '_claim_with_mail', '_as_trusted',
                 '_after_step', '_seal_with']
$$;
