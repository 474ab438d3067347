-- [beyond] Retry policies and per-step time-outs (SPEC §1, "External calls and failure policy").
--
-- df.retry(step, …) and df.timeout(step, seconds) return the step's node JSON with a "retry"
-- object or a "timeout_seconds" number added; both are kept through the operators and stored
-- per node in df.nodes.options as {"retry": {…}, "timeout_seconds": n}. The runtime reads
-- them: a failed attempt with a retryable error waits on a durable timer (exponential
-- back-off with jitter) and runs again; the time-out is the SQL step's statement_timeout.
--
-- Canonical node text gets two optional keys between query and result_name:
--   {"node_type":"SQL","query":"…","retry":{"max_attempts":5,"backoff_seconds":1,
--    "max_backoff_seconds":60,"retry_on":["40001"]},"timeout_seconds":2.5,"result_name":"r"}
-- result_name stays last, so df.as keeps cutting it off the end.

ALTER TABLE df.nodes ADD COLUMN options jsonb;

-- Limits of the call-time checks (a retry storm or a day-long back-off is a typo).
CREATE FUNCTION df._retry_limits() RETURNS jsonb
LANGUAGE sql IMMUTABLE AS $$
    SELECT '{"max_attempts":100,"max_backoff_seconds":86400,"max_timeout_seconds":86400}'::jsonb
$$;

-- The retry_on classes besides SQLSTATEs ('40001') and SQLSTATE classes ('40', '08').
CREATE FUNCTION df._retry_classes() RETURNS text[]
LANGUAGE sql IMMUTABLE AS $$
    SELECT ARRAY['any', 'default', 'http_5xx', 'http_4xx', 'http_timeout', 'http_connect',
                 'http_network']
$$;

-- One retry_on entry in its canonical spelling, or NULL when it is not one: SQLSTATEs and
-- their classes upper-case, names lower-case, http_NNN for one status code.
CREATE FUNCTION df._retry_class(p text) RETURNS text
LANGUAGE sql IMMUTABLE STRICT AS $$
    SELECT CASE
        WHEN (p ~ '^[0-9A-Za-z]{5}$' AND p ~ '[0-9]') OR p ~ '^[0-9A-Za-z]{2}$' THEN upper(p)
        WHEN lower(p) = ANY (df._retry_classes()) THEN lower(p)
        WHEN lower(p) ~ '^http_[1-5][0-9][0-9]$' THEN lower(p)
    END
$$;

-- A JSON number as numeric; NULL for anything else.
CREATE FUNCTION df._json_number(p jsonb) RETURNS numeric
LANGUAGE sql IMMUTABLE AS $$
    SELECT CASE WHEN jsonb_typeof(p) = 'number' THEN (p #>> '{}')::numeric END
$$;

-- Why a node's "retry" / "timeout_seconds" keys are invalid (NULL when they are fine or
-- absent). JSON null means absent.
CREATE FUNCTION df._step_options_error(p_node jsonb) RETURNS text
LANGUAGE plpgsql IMMUTABLE STRICT AS $$
DECLARE
    v_limits constant jsonb := df._retry_limits();
    v_type text := p_node ->> 'node_type';
    v_retry jsonb := p_node -> 'retry';
    v_timeout jsonb := p_node -> 'timeout_seconds';
    v_key text;
    v_entry jsonb;
    v_attempts numeric;
    v_backoff numeric;
    v_cap numeric;
    v_seconds numeric := df._json_number(p_node -> 'timeout_seconds');
BEGIN
    IF jsonb_typeof(v_retry) IS NOT NULL AND jsonb_typeof(v_retry) <> 'null' THEN
        IF v_type NOT IN ('SQL', 'HTTP', 'HTTP_MULTIPART') THEN
            RETURN format('retry is not valid for %s nodes: only SQL and HTTP steps are retried',
                          v_type);
        END IF;
        IF jsonb_typeof(v_retry) <> 'object' THEN
            RETURN 'retry must be a JSON object';
        END IF;
        FOR v_key IN SELECT jsonb_object_keys(v_retry) LOOP
            IF v_key NOT IN ('max_attempts', 'backoff_seconds', 'max_backoff_seconds', 'retry_on') THEN
                RETURN format('retry has an unknown key ''%s''', v_key);
            END IF;
        END LOOP;
        v_attempts := df._json_number(v_retry -> 'max_attempts');
        v_backoff := df._json_number(v_retry -> 'backoff_seconds');
        v_cap := df._json_number(v_retry -> 'max_backoff_seconds');
        IF v_attempts IS NULL OR v_attempts <> trunc(v_attempts)
           OR v_attempts NOT BETWEEN 1 AND (v_limits ->> 'max_attempts')::numeric THEN
            RETURN format('retry max_attempts must be an integer from 1 to %s',
                          v_limits ->> 'max_attempts');
        END IF;
        IF v_backoff IS NULL OR v_backoff <= 0
           OR v_backoff > (v_limits ->> 'max_backoff_seconds')::numeric THEN
            RETURN format('retry backoff_seconds must be a positive number of seconds, at most %s',
                          v_limits ->> 'max_backoff_seconds');
        END IF;
        IF v_cap IS NULL OR v_cap < v_backoff
           OR v_cap > (v_limits ->> 'max_backoff_seconds')::numeric THEN
            RETURN format('retry max_backoff_seconds must be at least backoff_seconds and at most %s',
                          v_limits ->> 'max_backoff_seconds');
        END IF;
        IF jsonb_typeof(v_retry -> 'retry_on') NOT IN ('null', 'array') THEN
            RETURN 'retry retry_on must be an array of error classes or null';
        END IF;
        IF jsonb_typeof(v_retry -> 'retry_on') = 'array' THEN
            IF jsonb_array_length(v_retry -> 'retry_on') = 0 THEN
                RETURN 'retry retry_on must not be empty (NULL means the default classes)';
            END IF;
            FOR v_entry IN SELECT jsonb_array_elements(v_retry -> 'retry_on') LOOP
                IF jsonb_typeof(v_entry) <> 'string' OR df._retry_class(v_entry #>> '{}') IS NULL THEN
                    RETURN format('retry retry_on: %s is not an error class (a SQLSTATE such as '
                                  '''40001'', a SQLSTATE class such as ''08'', or one of %s, '
                                  'http_NNN)', v_entry,
                                  array_to_string(df._retry_classes(), ', '));
                END IF;
            END LOOP;
        END IF;
    END IF;
    IF jsonb_typeof(v_timeout) IS NOT NULL AND jsonb_typeof(v_timeout) <> 'null' THEN
        IF v_type <> 'SQL' THEN
            RETURN format('timeout_seconds is not valid for %s nodes%s', v_type,
                          CASE WHEN v_type IN ('HTTP', 'HTTP_MULTIPART')
                               THEN ': an HTTP step''s time-out is the timeout_seconds of '
                                    || lower(replace(v_type, 'HTTP', 'df.http'))
                                    || '()' ELSE '' END);
        END IF;
        IF v_seconds IS NULL OR v_seconds <= 0
           OR v_seconds > (v_limits ->> 'max_timeout_seconds')::numeric THEN
            RETURN format('timeout_seconds must be a positive number of seconds, at most %s',
                          v_limits ->> 'max_timeout_seconds');
        END IF;
    END IF;
    RETURN NULL;
END
$$;

-- Canonical text of a (valid) retry object: fixed key order, retry_on only when set.
CREATE FUNCTION df._retry_text(p jsonb) RETURNS text
LANGUAGE sql IMMUTABLE STRICT AS $$
    SELECT '{"max_attempts":' || (p -> 'max_attempts')::text
           || ',"backoff_seconds":' || (p -> 'backoff_seconds')::text
           || ',"max_backoff_seconds":' || (p -> 'max_backoff_seconds')::text
           || coalesce(',"retry_on":' || df._json_compact(
                  CASE WHEN jsonb_typeof(p -> 'retry_on') = 'array' THEN
                      (SELECT jsonb_agg(df._retry_class(e.value #>> '{}') ORDER BY e.ord)
                         FROM jsonb_array_elements(p -> 'retry_on') WITH ORDINALITY AS e(value, ord))
                  END), '')
           || '}'
$$;

-- The stored options of a node (df.nodes.options), NULL when it has none.
CREATE FUNCTION df._step_options(p_node jsonb) RETURNS jsonb
LANGUAGE sql IMMUTABLE STRICT AS $$
    SELECT nullif(jsonb_strip_nulls(jsonb_build_object(
               'retry', CASE WHEN jsonb_typeof(p_node -> 'retry') = 'object'
                             THEN df._retry_text(p_node -> 'retry')::jsonb END,
               'timeout_seconds', CASE WHEN jsonb_typeof(p_node -> 'timeout_seconds') = 'number'
                                       THEN p_node -> 'timeout_seconds' END)), '{}'::jsonb)
$$;

-- df._canon as in 0002, keeping "retry" and "timeout_seconds" (before result_name).
CREATE OR REPLACE FUNCTION df._canon(p_node jsonb, p_path text, p_depth integer) RETURNS text
LANGUAGE plpgsql IMMUTABLE AS $$
DECLARE
    v_error text := df._shape_error(p_node);
    v_out text;
    v_child jsonb;
    v_extras text;
BEGIN
    IF v_error IS NULL AND p_depth > 300 THEN
        v_error := 'nesting deeper than 300 levels';
    END IF;
    IF v_error IS NOT NULL THEN
        RAISE EXCEPTION 'Invalid Durofut JSON: failed to deserialize workflow step: % (at %)',
            v_error, p_path USING ERRCODE = 'invalid_parameter_value';
    END IF;
    v_out := '{"node_type":' || (p_node -> 'node_type')::text;
    v_child := p_node -> 'left_node';
    IF jsonb_typeof(v_child) = 'object' THEN
        v_out := v_out || ',"left_node":' || df._canon(v_child, p_path || '.left', p_depth + 1);
    END IF;
    v_child := p_node -> 'right_node';
    IF jsonb_typeof(v_child) = 'object' THEN
        v_out := v_out || ',"right_node":' || df._canon(v_child, p_path || '.right', p_depth + 1);
    END IF;
    v_child := p_node -> 'condition_node';
    IF jsonb_typeof(v_child) = 'object' THEN
        v_out := v_out || ',"condition_node":'
                 || df._canon(v_child, p_path || '.condition_node', p_depth + 1);
    END IF;
    v_child := p_node -> 'extra_nodes';
    IF jsonb_typeof(v_child) = 'array' AND jsonb_array_length(v_child) > 0 THEN
        SELECT string_agg(df._canon(e.node, format('%s.extra_nodes[%s]', p_path, e.ord - 1),
                                    p_depth + 1), ',' ORDER BY e.ord)
          INTO v_extras
          FROM jsonb_array_elements(v_child) WITH ORDINALITY AS e(node, ord);
        v_out := v_out || ',"extra_nodes":[' || v_extras || ']';
    END IF;
    IF jsonb_typeof(p_node -> 'query') = 'string' THEN
        v_out := v_out || ',"query":' || (p_node -> 'query')::text;
    END IF;
    IF p_node ? 'retry' OR p_node ? 'timeout_seconds' THEN
        v_error := df._step_options_error(p_node);
        IF v_error IS NOT NULL THEN
            RAISE EXCEPTION 'Invalid Durofut JSON: failed to deserialize workflow step: % (at %)',
                v_error, p_path USING ERRCODE = 'invalid_parameter_value';
        END IF;
        IF jsonb_typeof(p_node -> 'retry') = 'object' THEN
            v_out := v_out || ',"retry":' || df._retry_text(p_node -> 'retry');
        END IF;
        IF jsonb_typeof(p_node -> 'timeout_seconds') = 'number' THEN
            v_out := v_out || ',"timeout_seconds":' || (p_node -> 'timeout_seconds')::text;
        END IF;
    END IF;
    IF jsonb_typeof(p_node -> 'result_name') = 'string' THEN
        v_out := v_out || ',"result_name":' || (p_node -> 'result_name')::text;
    END IF;
    RETURN v_out || '}';
END
$$;

-- A step node for df.retry / df.timeout: the argument as a node (plain SQL text wraps).
CREATE FUNCTION df._step_node(p_function text, p_step text) RETURNS jsonb
LANGUAGE plpgsql STABLE STRICT AS $$
DECLARE
    v jsonb := df._node(p_step)::jsonb;
BEGIN
    IF NOT (v ->> 'node_type') = ANY (ARRAY['SQL', 'HTTP', 'HTTP_MULTIPART']) THEN
        RAISE EXCEPTION '%: only a SQL or HTTP step can take this option, not a % node',
            p_function, v ->> 'node_type' USING ERRCODE = 'invalid_parameter_value',
            HINT = 'Apply it to each step inside the composite, e.g. df.retry(''SELECT …'') ~> df.retry(''SELECT …'').';
    END IF;
    RETURN v;
END
$$;

-- [beyond] df.retry: run a SQL or HTTP step up to max_attempts times. Between attempts the
-- instance waits on a durable timer for backoff_seconds * 2^(attempt-1), capped at
-- max_backoff_seconds, with jitter (between half and all of it); a Retry-After header of a
-- 429 or 503 answer is honoured up to max_backoff_seconds. retry_on lists the error classes
-- that are retried (NULL: 'default', i.e. serialization failure 40001, deadlock 40P01,
-- connection failures, HTTP 5xx, 429, time-outs and network errors).
CREATE FUNCTION df.retry(step text, max_attempts integer DEFAULT 3,
                         backoff_seconds double precision DEFAULT 1,
                         max_backoff_seconds double precision DEFAULT 60,
                         retry_on text[] DEFAULT NULL) RETURNS text
LANGUAGE plpgsql STABLE AS $$
DECLARE
    v jsonb;
    v_error text;
BEGIN
    IF step IS NULL THEN
        RETURN NULL;
    END IF;
    IF max_attempts IS NULL OR backoff_seconds IS NULL OR max_backoff_seconds IS NULL THEN
        RAISE EXCEPTION 'df.retry: max_attempts, backoff_seconds and max_backoff_seconds must not be NULL'
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF backoff_seconds = 'NaN' OR backoff_seconds = 'Infinity' OR max_backoff_seconds = 'NaN'
       OR max_backoff_seconds = 'Infinity' THEN
        RAISE EXCEPTION 'df.retry: back-off must be a finite number of seconds'
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF array_position(retry_on, NULL) IS NOT NULL THEN
        RAISE EXCEPTION 'df.retry: retry_on must not contain NULL' USING ERRCODE = 'invalid_parameter_value';
    END IF;
    v := df._step_node('df.retry', step);
    v := v || jsonb_build_object('retry', jsonb_build_object(
        'max_attempts', max_attempts, 'backoff_seconds', backoff_seconds,
        'max_backoff_seconds', max_backoff_seconds, 'retry_on', to_jsonb(retry_on)));
    v_error := df._step_options_error(v);
    IF v_error IS NOT NULL THEN
        RAISE EXCEPTION 'df.retry: %', v_error USING ERRCODE = 'invalid_parameter_value';
    END IF;
    RETURN df._canon(v, 'root', 0);
END
$$;

-- [beyond] df.timeout: a SQL step's statement may run for at most `seconds` (its
-- statement_timeout, set inside the step's savepoint). A time-out fails the step with
-- "statement timeout after Ns" (SQLSTATE 57014: retried only when a policy lists it).
CREATE FUNCTION df.timeout(step text, seconds double precision) RETURNS text
LANGUAGE plpgsql STABLE AS $$
DECLARE
    v jsonb;
    v_error text;
BEGIN
    IF step IS NULL THEN
        RETURN NULL;
    END IF;
    IF seconds IS NULL OR seconds = 'NaN' OR seconds = 'Infinity' THEN
        RAISE EXCEPTION 'df.timeout: seconds must be a positive number'
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    v := df._step_node('df.timeout', step);
    v := v || jsonb_build_object('timeout_seconds', seconds);
    v_error := df._step_options_error(v);
    IF v_error IS NOT NULL THEN
        RAISE EXCEPTION 'df.timeout: %', v_error USING ERRCODE = 'invalid_parameter_value';
    END IF;
    RETURN df._canon(v, 'root', 0);
END
$$;

-- df._validate_graph: 0002's checks, then the options of every node that has any. The text
-- test skips the second walk for graphs without options (inside a JSON string a key is
-- escaped, \"retry\", so it never matches there).
ALTER FUNCTION df._validate_graph(text) RENAME TO _validate_graph_0002;

CREATE FUNCTION df._validate_graph(p_graph text) RETURNS jsonb
LANGUAGE plpgsql STABLE STRICT AS $$
DECLARE
    v_root jsonb := df._validate_graph_0002(p_graph);
    v_error text[];
BEGIN
    IF strpos(p_graph, '"retry"') > 0 OR strpos(p_graph, '"timeout_seconds"') > 0 THEN
        SELECT ARRAY[g.path, m.message]
          INTO v_error
          FROM df._graph_walk(v_root, 2147483646, 2147483647) g
         CROSS JOIN LATERAL (SELECT df._step_options_error(g.node) AS message) m
         WHERE jsonb_typeof(g.node) = 'object' AND m.message IS NOT NULL
         ORDER BY g.ord
         LIMIT 1;
        IF v_error IS NOT NULL THEN
            RAISE EXCEPTION 'Invalid durable function graph: %: %', v_error[1], v_error[2]
                USING ERRCODE = 'invalid_parameter_value';
        END IF;
    END IF;
    RETURN v_root;
END
$$;

-- df._store_graph as in 0003, also writing each node's options.
CREATE OR REPLACE FUNCTION df._store_graph(p_instance_id text, p_graph jsonb, p_base bigint,
                                           p_submitted_by regrole, p_database text)
RETURNS integer
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
                          submitted_by, database, parent_node, position, options)
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
           p.nid, n.position,
           CASE WHEN n.node ? 'retry' OR n.node ? 'timeout_seconds'
                THEN df._step_options(n.node) END
    FROM ided n
    LEFT JOIN kids k ON k.parent_path = n.path
    LEFT JOIN ided p ON p.path = n.parent_path;
    GET DIAGNOSTICS v_count = ROW_COUNT;
    RETURN v_count;
END $$;

REVOKE ALL ON ALL FUNCTIONS IN SCHEMA df FROM PUBLIC;

-- Roles granted before a migration get its new functions as df.grant_usage would give them
-- (it grants every non-internal df function): whoever may run df.sql may run these.
CREATE FUNCTION df._grant_to_users(p_names text[]) RETURNS void
LANGUAGE plpgsql AS $$
DECLARE
    v_role oid;
    v_fn regprocedure;
BEGIN
    FOR v_role IN
        SELECT DISTINCT a.grantee
        FROM pg_catalog.pg_proc p, LATERAL aclexplode(p.proacl) a
        WHERE p.oid = 'df.sql(text)'::regprocedure AND a.privilege_type = 'EXECUTE'
          AND a.grantee <> 0 AND a.grantee <> p.proowner
    LOOP
        FOR v_fn IN
            SELECT p.oid::regprocedure FROM pg_catalog.pg_proc p
            WHERE p.pronamespace = 'df'::regnamespace AND p.proname = ANY (p_names)
        LOOP
            EXECUTE format('GRANT EXECUTE ON FUNCTION %s TO %s', v_fn, v_role::regrole);
        END LOOP;
    END LOOP;
END $$;
REVOKE ALL ON FUNCTION df._grant_to_users(text[]) FROM PUBLIC;

SELECT df._grant_to_users(ARRAY['_retry_limits', '_retry_classes', '_retry_class',
                                '_json_number', '_step_options_error', '_retry_text',
                                '_step_options', '_step_node', 'retry', 'timeout',
                                '_validate_graph']);
