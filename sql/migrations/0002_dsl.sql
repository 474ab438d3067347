-- 0002_dsl: the workflow DSL (SPEC §1), graph validation (§6) and df.explain (§5).
--
-- Every builder returns text holding one JSON object per graph node, in pg_durable's exact
-- format: keys in the order node_type, left_node, right_node, condition_node, extra_nodes,
-- query, result_name; no spaces; children embedded as objects. The text is built by
-- concatenation (jsonb would reorder keys and add spaces), so the same expression always
-- yields the same bytes. Nothing is written here: df.start (0003) stores what
-- df._validate_graph returns.
--
-- Error codes: 22023 (invalid_parameter_value) for bad arguments and malformed graphs, 54000
-- (program_limit_exceeded) for the depth and size limits.

-- --------------------------------------------------------------------------------------
-- Helper results (SPEC §1: "… cannot be used as a workflow step")
-- --------------------------------------------------------------------------------------

-- Identifies the current client statement: the marker below is only valid within it.
CREATE FUNCTION df._statement_key() RETURNS text
LANGUAGE sql STABLE AS $$ SELECT extract(epoch FROM statement_timestamp())::text $$;

-- Records that p_function (e.g. 'df.setvar') just returned p_value, and returns p_value.
-- Helpers that are not graph builders end with `RETURN df._helper_result('df.setvar', 'OK')`;
-- a composer that receives the same text in the same statement raises, as pg_durable does,
-- instead of running 'OK' as SQL. The marker is transaction-local and keyed by statement.
CREATE FUNCTION df._helper_result(p_function text, p_value text) RETURNS text
LANGUAGE plpgsql VOLATILE AS $$
BEGIN
    PERFORM pg_catalog.set_config('df.helper_result',
        p_function || E'\n' || df._statement_key() || E'\n' || coalesce(p_value, ''), true);
    RETURN p_value;
END
$$;

CREATE FUNCTION df._check_helper_result(p_value text) RETURNS void
LANGUAGE plpgsql STABLE AS $$
DECLARE
    v_mark text := pg_catalog.current_setting('df.helper_result', true);
    v_function text;
    v_rest text;
    v_key text;
BEGIN
    IF v_mark IS NULL OR v_mark = '' OR p_value IS NULL THEN
        RETURN;
    END IF;
    v_function := split_part(v_mark, E'\n', 1);
    v_rest := substr(v_mark, length(v_function) + 2);
    v_key := split_part(v_rest, E'\n', 1);
    IF v_key = df._statement_key() AND substr(v_rest, length(v_key) + 2) = p_value THEN
        RAISE EXCEPTION '% cannot be used as a workflow step. Call % before df.start().',
            v_function, v_function
            USING ERRCODE = 'invalid_parameter_value',
                  HINT = 'It returns a status, not a graph; call it in its own statement.';
    END IF;
END
$$;

-- --------------------------------------------------------------------------------------
-- Small JSON helpers
-- --------------------------------------------------------------------------------------

-- p parsed as jsonb, or NULL when it is not JSON.
CREATE FUNCTION df._try_jsonb(p text) RETURNS jsonb
LANGUAGE plpgsql IMMUTABLE AS $$
BEGIN
    RETURN p::jsonb;
EXCEPTION WHEN invalid_text_representation THEN
    RETURN NULL;
END
$$;

-- Compact JSON text of a jsonb value (jsonb::text adds spaces; pg_durable's serde_json
-- does not). Keys keep jsonb's order.
CREATE FUNCTION df._json_compact(p jsonb) RETURNS text
LANGUAGE sql IMMUTABLE STRICT AS $$
    SELECT CASE jsonb_typeof(p)
        WHEN 'object' THEN
            (SELECT '{' || coalesce(string_agg(to_json(e.key)::text || ':'
                                                || df._json_compact(e.value), ',' ORDER BY e.ord),
                                    '') || '}'
             FROM jsonb_each(p) WITH ORDINALITY AS e(key, value, ord))
        WHEN 'array' THEN
            (SELECT '[' || coalesce(string_agg(df._json_compact(a.value), ',' ORDER BY a.ord), '')
                    || ']'
             FROM jsonb_array_elements(p) WITH ORDINALITY AS a(value, ord))
        ELSE p::text
    END
$$;

-- The node types a graph may contain, in pg_durable's order (used in messages).
CREATE FUNCTION df._node_types() RETURNS text[]
LANGUAGE sql IMMUTABLE AS $$
    SELECT ARRAY['SQL', 'THEN', 'IF', 'JOIN', 'LOOP', 'BREAK', 'RACE', 'SLEEP', 'WAIT_SCHEDULE',
                 'HTTP', 'HTTP_MULTIPART', 'SIGNAL', 'FOREACH']
$$;

-- --------------------------------------------------------------------------------------
-- Cron (SPEC §7): standard 5-field crontab, evaluated in UTC when the node runs.
-- --------------------------------------------------------------------------------------

-- NULL when p_expr is valid, else the message "Invalid cron expression '…': reason".
-- Fields: minute 0-59, hour 0-23, day-of-month 1-31 (or ?), month 1-12 or JAN-DEC,
-- day-of-week 0-7 (0 and 7 are Sunday) or SUN-SAT (or ?). Items: *, n, a-b, each with an
-- optional /step, separated by commas. Macros (@daily), L and # are not standard: refused.
CREATE FUNCTION df._cron_message(p_expr text) RETURNS text
LANGUAGE plpgsql IMMUTABLE STRICT AS $$
DECLARE
    c_names  constant text[] := ARRAY['minute', 'hour', 'day-of-month', 'month', 'day-of-week'];
    c_lo     constant int[] := ARRAY[0, 0, 1, 1, 0];
    c_hi     constant int[] := ARRAY[59, 23, 31, 12, 7];
    c_months constant text[] := ARRAY['JAN', 'FEB', 'MAR', 'APR', 'MAY', 'JUN', 'JUL', 'AUG', 'SEP',
                                      'OCT', 'NOV', 'DEC'];
    c_days   constant text[] := ARRAY['SUN', 'MON', 'TUE', 'WED', 'THU', 'FRI', 'SAT'];
    c_month_days constant int[] := ARRAY[31, 29, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31];
    v_trimmed text := btrim(p_expr, E' \t\r\n');
    v_fields text[];
    v_item text;
    v_base text;
    v_bounds text[];
    v_step int;
    v_vals int[];
    v_from int;
    v_to int;
    v_dom int[] := '{}';
    v_months int[] := '{}';
    v_dom_all boolean := false;
    v_month_all boolean := false;
    v_dow_all boolean := false;
    v_problem text;
    i int;
    j int;
BEGIN
    v_fields := CASE WHEN v_trimmed = '' THEN '{}'::text[]
                     ELSE regexp_split_to_array(v_trimmed, E'\\s+') END;
    IF coalesce(array_length(v_fields, 1), 0) <> 5 THEN
        RETURN format('Invalid cron expression ''%s'': expected 5 fields (minute hour '
                      'day-of-month month day-of-week), found %s',
                      p_expr, coalesce(array_length(v_fields, 1), 0));
    END IF;
    <<fields>>
    FOR i IN 1..5 LOOP
        FOREACH v_item IN ARRAY string_to_array(v_fields[i], ',') LOOP
            v_step := 1;
            v_base := v_item;
            IF v_item = '' THEN
                v_problem := format('empty list item in the %s field', c_names[i]);
                EXIT fields;
            END IF;
            IF strpos(v_item, '/') > 0 THEN
                v_base := split_part(v_item, '/', 1);
                IF split_part(v_item, '/', 2) !~ '^[0-9]{1,4}$' OR v_item ~ '/.*/' THEN
                    v_problem := format('invalid step in ''%s'' (%s field)', v_item, c_names[i]);
                    EXIT fields;
                END IF;
                v_step := split_part(v_item, '/', 2)::int;
                IF v_step = 0 THEN
                    v_problem := format('step 0 in ''%s'' (%s field)', v_item, c_names[i]);
                    EXIT fields;
                END IF;
            END IF;
            IF v_base = '*' OR (v_base = '?' AND i IN (3, 5)) THEN
                v_from := c_lo[i];
                v_to := c_hi[i];
                IF v_step = 1 THEN
                    IF i = 3 THEN v_dom_all := true; END IF;
                    IF i = 4 THEN v_month_all := true; END IF;
                    IF i = 5 THEN v_dow_all := true; END IF;
                END IF;
            ELSE
                v_bounds := string_to_array(v_base, '-');
                IF array_length(v_bounds, 1) > 2 OR v_base = '' THEN
                    v_problem := format('invalid range ''%s'' (%s field)', v_base, c_names[i]);
                    EXIT fields;
                END IF;
                v_vals := '{}';
                FOR j IN 1..array_length(v_bounds, 1) LOOP
                    v_vals := v_vals || CASE
                        WHEN v_bounds[j] ~ '^[0-9]{1,3}$' THEN v_bounds[j]::int
                        WHEN i = 4 THEN array_position(c_months, upper(v_bounds[j]))
                        WHEN i = 5 THEN array_position(c_days, upper(v_bounds[j])) - 1
                    END;
                    IF v_vals[j] IS NULL THEN
                        v_problem := format('''%s'' is not a valid %s value',
                                            v_bounds[j], c_names[i]);
                        EXIT fields;
                    END IF;
                    IF v_vals[j] NOT BETWEEN c_lo[i] AND c_hi[i] THEN
                        v_problem := format('%s is out of range for the %s field (%s-%s)',
                                            v_bounds[j], c_names[i], c_lo[i], c_hi[i]);
                        EXIT fields;
                    END IF;
                END LOOP;
                v_from := v_vals[1];
                -- 'a/step' runs from a to the end of the field, as in most cron parsers.
                v_to := CASE WHEN array_length(v_vals, 1) = 2 THEN v_vals[2]
                             WHEN strpos(v_item, '/') > 0 THEN c_hi[i]
                             ELSE v_from END;
                IF v_from > v_to THEN
                    v_problem := format('range ''%s'' is reversed (%s field)', v_base, c_names[i]);
                    EXIT fields;
                END IF;
            END IF;
            IF i = 3 THEN
                v_dom := v_dom || ARRAY(SELECT generate_series(v_from, v_to, v_step));
            ELSIF i = 4 THEN
                v_months := v_months || ARRAY(SELECT generate_series(v_from, v_to, v_step));
            END IF;
        END LOOP;
    END LOOP;
    IF v_problem IS NOT NULL THEN
        RETURN format('Invalid cron expression ''%s'': %s', p_expr, v_problem);
    END IF;
    -- A day-of-month that no listed month has (e.g. "0 0 31 2 *") never fires. When the
    -- day-of-week is restricted too, cron matches either, so some day always comes.
    IF NOT v_dom_all AND NOT v_month_all AND v_dow_all AND NOT EXISTS (
        SELECT 1 FROM unnest(v_dom) d, unnest(v_months) m WHERE d <= c_month_days[m]) THEN
        RETURN format('No upcoming schedule found for ''%s''', p_expr);
    END IF;
    RETURN NULL;
END
$$;

-- --------------------------------------------------------------------------------------
-- Nodes as canonical text
-- --------------------------------------------------------------------------------------

-- Why a node object does not deserialize as pg_durable's Durofut (NULL when it does).
-- Checks this node's own fields only; children are checked where they are visited.
CREATE FUNCTION df._shape_error(p_node jsonb) RETURNS text
LANGUAGE sql IMMUTABLE STRICT AS $$
    SELECT CASE
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
    END
$$;

-- Canonical text of a hand-built node (e.g. jsonb_build_object(...)::text): pg_durable's
-- key order, no spaces, unknown keys dropped, children canonicalised. Raises "Invalid
-- Durofut JSON" when a node's shape does not parse. Recursive, so it refuses nesting far
-- deeper than any graph df.start accepts.
CREATE FUNCTION df._canon(p_node jsonb, p_path text, p_depth integer) RETURNS text
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
    IF jsonb_typeof(p_node -> 'result_name') = 'string' THEN
        v_out := v_out || ',"result_name":' || (p_node -> 'result_name')::text;
    END IF;
    RETURN v_out || '}';
END
$$;

-- The node text a composer embeds for one argument (pg_durable's Durofut::ensure):
--   * our own output is embedded as it is: a text over 1 KB that starts with the canonical
--     prefix and a known node_type is trusted, so a chain of 1,000 operators does not
--     re-parse the growing left side at every level (df.start validates it all anyway);
--   * other text starting with '{' is parsed: an object with a string node_type is a node
--     (canonicalised; a shape that does not parse raises "Invalid Durofut JSON"), but an
--     unknown node_type is wrapped as SQL, as pg_durable does;
--   * anything else is SQL: {"node_type":"SQL","query":…}.
CREATE FUNCTION df._node(p_input text) RETURNS text
LANGUAGE plpgsql STABLE STRICT AS $$
DECLARE
    v jsonb;
    v_error text;
BEGIN
    -- Only O(1) tests here: on multibyte text, right() or ltrim() would walk the whole
    -- string at every level of a chain.
    IF octet_length(p_input) > 1024
       AND left(p_input, 40) ~ ('^\{"node_type":"(' || array_to_string(df._node_types(), '|')
                                || ')"[,}]') THEN
        RETURN p_input;
    END IF;
    PERFORM df._check_helper_result(p_input);
    IF left(ltrim(left(p_input, 64), E' \t\r\n'), 1) = '{' THEN
        v := df._try_jsonb(p_input);
        IF jsonb_typeof(v -> 'node_type') = 'string' THEN
            v_error := df._shape_error(v);
            IF v_error IS NOT NULL THEN
                RAISE EXCEPTION 'Invalid Durofut JSON: failed to deserialize workflow step: %',
                    v_error USING ERRCODE = 'invalid_parameter_value';
            END IF;
            IF v ->> 'node_type' = ANY (df._node_types()) THEN
                RETURN df._canon(v, 'root', 0);
            END IF;
        END IF;
    END IF;
    RETURN '{"node_type":"SQL","query":' || to_json(p_input)::text || '}';
END
$$;

-- --------------------------------------------------------------------------------------
-- Node functions (SPEC §1). Parameter names are pg_durable's, for named-argument calls.
-- Functions that take nodes are STABLE, not IMMUTABLE: they read the helper-result marker,
-- and an IMMUTABLE call with constant arguments would be folded once into a cached plan.
-- Composers are SQL functions, which the planner inlines: a large graph text then flows
-- through one expression instead of being copied into PL/pgSQL variables at every level.
-- --------------------------------------------------------------------------------------

CREATE FUNCTION df.sql(query text) RETURNS text
LANGUAGE sql IMMUTABLE STRICT AS $$
    SELECT '{"node_type":"SQL","query":' || to_json(query)::text || '}'
$$;

CREATE FUNCTION df.seq(a text, b text) RETURNS text
LANGUAGE sql STABLE STRICT AS $$
    SELECT '{"node_type":"THEN","left_node":' || df._node(a) || ',"right_node":' || df._node(b) || '}'
$$;

-- p_node (canonical text) with result_name set: in canonical text it is the last key, so an
-- old one is cut off the end. Long texts are cut as bytes after looking at their tail only.
CREATE FUNCTION df._with_result_name(p_node text, p_name text) RETURNS text
LANGUAGE plpgsql IMMUTABLE STRICT AS $$
DECLARE
    v_bytes bytea;
    v_old text;
BEGIN
    IF octet_length(p_node) <= 4096 OR pg_catalog.getdatabaseencoding() <> 'UTF8' THEN
        RETURN regexp_replace(p_node, '(,"result_name":"[A-Za-z_][A-Za-z0-9_]*")?}$',
                              ',"result_name":' || to_json(p_name)::text || '}');
    END IF;
    v_bytes := convert_to(p_node, 'UTF8');
    v_old := substring(encode(substring(v_bytes FROM octet_length(v_bytes) - 1023), 'escape')
                       FROM ',"result_name":"[A-Za-z_][A-Za-z0-9_]*"}$');
    RETURN convert_from(substring(v_bytes FOR octet_length(v_bytes) - coalesce(octet_length(v_old), 1)),
                        'UTF8')
           || ',"result_name":' || to_json(p_name)::text || '}';
END
$$;

CREATE FUNCTION df.as(fut text, name text) RETURNS text
LANGUAGE plpgsql STABLE STRICT AS $$
BEGIN
    IF name = '' THEN
        RAISE EXCEPTION 'df.as: result name cannot be empty' USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF name !~ '^[A-Za-z_][A-Za-z0-9_]*$' THEN
        RAISE EXCEPTION 'df.as: result name ''%'' is not a valid identifier — must match [a-zA-Z_][a-zA-Z0-9_]*',
            name USING ERRCODE = 'invalid_parameter_value';
    END IF;
    RETURN df._with_result_name(df._node(fut), name);
END
$$;

CREATE FUNCTION df.sleep(seconds bigint) RETURNS text
LANGUAGE plpgsql IMMUTABLE STRICT AS $$
BEGIN
    IF seconds < 0 THEN
        RAISE EXCEPTION 'Sleep duration must be non-negative' USING ERRCODE = 'invalid_parameter_value';
    END IF;
    RETURN '{"node_type":"SLEEP","query":"' || seconds || '"}';
END
$$;

CREATE FUNCTION df.wait_for_schedule(cron_expr text) RETURNS text
LANGUAGE plpgsql IMMUTABLE STRICT AS $$
DECLARE
    v_message text := df._cron_message(cron_expr);
BEGIN
    IF v_message IS NOT NULL THEN
        RAISE EXCEPTION '%', v_message USING ERRCODE = 'invalid_parameter_value',
            HINT = 'Five fields: minute hour day-of-month month day-of-week, e.g. ''0 9 * * MON-FRI''.';
    END IF;
    RETURN '{"node_type":"WAIT_SCHEDULE","query":'
           || to_json('{"cron_expr":' || to_json(cron_expr)::text || '}')::text || '}';
END
$$;

CREATE FUNCTION df.loop(body text, condition text DEFAULT NULL) RETURNS text
LANGUAGE sql STABLE AS $$
    SELECT CASE WHEN body IS NOT NULL THEN
        '{"node_type":"LOOP","left_node":' || df._node(body)
        || coalesce(',"condition_node":' || df._node(condition), '') || '}'
    END
$$;

-- The value is literal text, never SQL (pg_durable: "does not auto-wrap its argument").
CREATE FUNCTION df.break(value text DEFAULT NULL) RETURNS text
LANGUAGE sql IMMUTABLE AS $$
    SELECT '{"node_type":"BREAK","query":'
           || to_json('{"break_value":' || coalesce(to_json(value)::text, 'null') || '}')::text
           || '}'
$$;

CREATE FUNCTION df.if(condition text, then_branch text, else_branch text) RETURNS text
LANGUAGE sql STABLE STRICT AS $$
    SELECT '{"node_type":"IF","left_node":' || df._node(then_branch)
           || ',"right_node":' || df._node(else_branch)
           || ',"condition_node":' || df._node(condition) || '}'
$$;

CREATE FUNCTION df.if_rows(result_name text, then_branch text, else_branch text) RETURNS text
LANGUAGE sql STABLE STRICT AS $$
    SELECT '{"node_type":"IF","left_node":' || df._node(then_branch)
           || ',"right_node":' || df._node(else_branch)
           || ',"query":' || to_json('{"condition_type":"result_has_rows","result_name":'
                                     || to_json(result_name)::text || '}')::text
           || '}'
$$;

-- JOIN or RACE over branches: the first two in left_node/right_node, the rest in extra_nodes.
CREATE FUNCTION df._parallel(p_type text, p_function text, p_branches text[]) RETURNS text
LANGUAGE plpgsql STABLE AS $$
BEGIN
    IF coalesce(cardinality(p_branches), 0) = 0 THEN
        RAISE EXCEPTION '%() needs at least one branch', p_function
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF array_position(p_branches, NULL) IS NOT NULL THEN
        RETURN NULL;   -- as the STRICT two-argument forms do
    END IF;
    RETURN '{"node_type":"' || p_type || '","left_node":' || df._node(p_branches[1])
           || CASE WHEN cardinality(p_branches) >= 2
                   THEN ',"right_node":' || df._node(p_branches[2]) ELSE '' END
           || CASE WHEN cardinality(p_branches) >= 3
                   THEN ',"extra_nodes":['
                        || (SELECT string_agg(df._node(b.branch), ',' ORDER BY b.ord)
                              FROM unnest(p_branches[3:]) WITH ORDINALITY AS b(branch, ord))
                        || ']'
                   ELSE '' END
           || '}';
END
$$;

CREATE FUNCTION df.join(a text, b text) RETURNS text
LANGUAGE sql STABLE STRICT AS $$
    SELECT '{"node_type":"JOIN","left_node":' || df._node(a) || ',"right_node":' || df._node(b) || '}'
$$;

-- [beyond] any number of branches; df.join(VARIADIC ARRAY(SELECT …)) fans out over rows.
CREATE FUNCTION df.join(VARIADIC branches text[]) RETURNS text
LANGUAGE sql STABLE STRICT AS $$ SELECT df._parallel('JOIN', 'df.join', branches) $$;

CREATE FUNCTION df.join3(a text, b text, c text) RETURNS text
LANGUAGE sql STABLE STRICT AS $$ SELECT df._parallel('JOIN', 'df.join3', ARRAY[a, b, c]) $$;

CREATE FUNCTION df.race(a text, b text) RETURNS text
LANGUAGE sql STABLE STRICT AS $$
    SELECT '{"node_type":"RACE","left_node":' || df._node(a) || ',"right_node":' || df._node(b) || '}'
$$;

CREATE FUNCTION df.race(VARIADIC branches text[]) RETURNS text
LANGUAGE sql STABLE STRICT AS $$ SELECT df._parallel('RACE', 'df.race', branches) $$;

CREATE FUNCTION df.wait_for_signal(name text, timeout_seconds integer DEFAULT NULL) RETURNS text
LANGUAGE plpgsql IMMUTABLE AS $$
BEGIN
    IF name IS NULL THEN
        RETURN NULL;
    END IF;
    IF name = '' THEN
        RAISE EXCEPTION 'Signal name cannot be empty' USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF timeout_seconds <= 0 THEN
        RAISE EXCEPTION 'Timeout must be positive' USING ERRCODE = 'invalid_parameter_value';
    END IF;
    RETURN '{"node_type":"SIGNAL","query":'
           || to_json('{"signal_name":' || to_json(name)::text || ',"timeout_seconds":'
                      || coalesce(timeout_seconds::text, 'null') || '}')::text
           || '}';
END
$$;

-- The call-time URL check (SPEC §9): only http and https, skipped while the URL still holds
-- a {var} placeholder. The runtime re-checks the substituted URL (and blocks private
-- addresses) before any request.
CREATE FUNCTION df._check_url_scheme(p_url text) RETURNS void
LANGUAGE plpgsql IMMUTABLE AS $$
BEGIN
    IF strpos(p_url, '{') = 0 AND lower(split_part(p_url, '://', 1)) NOT IN ('http', 'https') THEN
        RAISE EXCEPTION 'Blocked: unsupported URL scheme. Only http and https is allowed.'
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
END
$$;

CREATE FUNCTION df.http(url text, method text DEFAULT 'POST', body text DEFAULT NULL,
                        headers jsonb DEFAULT NULL, timeout_seconds integer DEFAULT 30)
RETURNS text
LANGUAGE plpgsql IMMUTABLE AS $$
DECLARE
    v_method text := upper(method);
BEGIN
    IF url IS NULL OR method IS NULL OR timeout_seconds IS NULL THEN
        RETURN NULL;
    END IF;
    PERFORM df._check_url_scheme(url);
    IF v_method NOT IN ('GET', 'POST', 'PUT', 'DELETE', 'PATCH') THEN
        RAISE EXCEPTION 'Invalid HTTP method: %. Must be GET, POST, PUT, DELETE, or PATCH', method
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF timeout_seconds <= 0 THEN
        RAISE EXCEPTION 'Timeout must be positive' USING ERRCODE = 'invalid_parameter_value';
    END IF;
    RETURN '{"node_type":"HTTP","query":'
           || to_json('{"url":' || to_json(url)::text
                      || ',"method":' || to_json(v_method)::text
                      || ',"body":' || coalesce(to_json(body)::text, 'null')
                      || ',"headers":' || coalesce(df._json_compact(headers), 'null')
                      || ',"timeout_seconds":' || timeout_seconds || '}')::text
           || '}';
END
$$;

-- parts: a non-empty array of {name, data_b64, filename?, content_type?}. The per-part
-- checks go beyond pg_durable (which finds a bad part only when the step runs).
CREATE FUNCTION df.http_multipart(url text, method text DEFAULT 'POST', parts jsonb DEFAULT NULL,
                                  headers jsonb DEFAULT NULL, timeout_seconds integer DEFAULT 30)
RETURNS text
LANGUAGE plpgsql IMMUTABLE AS $$
DECLARE
    v_method text := upper(method);
    v_problem text;
BEGIN
    IF url IS NULL OR method IS NULL OR timeout_seconds IS NULL THEN
        RETURN NULL;
    END IF;
    PERFORM df._check_url_scheme(url);
    IF v_method NOT IN ('POST', 'PUT', 'PATCH') THEN
        RAISE EXCEPTION 'Invalid HTTP method for multipart: %. Must be POST, PUT, or PATCH', method
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF timeout_seconds <= 0 THEN
        RAISE EXCEPTION 'Timeout must be positive' USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF parts IS NULL THEN
        RAISE EXCEPTION 'parts is required and cannot be NULL' USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF jsonb_typeof(parts) <> 'array' THEN
        RAISE EXCEPTION 'parts must be a JSON array of part objects'
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF jsonb_array_length(parts) = 0 THEN
        RAISE EXCEPTION 'parts must contain at least one part' USING ERRCODE = 'invalid_parameter_value';
    END IF;
    SELECT CASE
               WHEN jsonb_typeof(p.part) <> 'object' THEN format('parts[%s] must be a JSON object', p.i)
               WHEN jsonb_typeof(p.part -> 'name') IS DISTINCT FROM 'string' OR p.part ->> 'name' = ''
                   THEN format('parts[%s].name must be a non-empty string', p.i)
               WHEN jsonb_typeof(p.part -> 'data_b64') IS DISTINCT FROM 'string'
                   THEN format('parts[%s].data_b64 must be a string (base64 data)', p.i)
               WHEN jsonb_typeof(p.part -> 'filename') NOT IN ('string', 'null')
                   THEN format('parts[%s].filename must be a string', p.i)
               WHEN jsonb_typeof(p.part -> 'content_type') NOT IN ('string', 'null')
                   THEN format('parts[%s].content_type must be a string', p.i)
           END
      INTO v_problem
      FROM jsonb_array_elements(parts) WITH ORDINALITY AS e(part, ord),
           LATERAL (SELECT e.part, e.ord - 1 AS i) p
     WHERE jsonb_typeof(p.part) <> 'object'
        OR jsonb_typeof(p.part -> 'name') IS DISTINCT FROM 'string' OR p.part ->> 'name' = ''
        OR jsonb_typeof(p.part -> 'data_b64') IS DISTINCT FROM 'string'
        OR jsonb_typeof(p.part -> 'filename') NOT IN ('string', 'null')
        OR jsonb_typeof(p.part -> 'content_type') NOT IN ('string', 'null')
     ORDER BY e.ord
     LIMIT 1;
    IF v_problem IS NOT NULL THEN
        RAISE EXCEPTION '%', v_problem USING ERRCODE = 'invalid_parameter_value';
    END IF;
    RETURN '{"node_type":"HTTP_MULTIPART","query":'
           || to_json('{"url":' || to_json(url)::text
                      || ',"method":' || to_json(v_method)::text
                      || ',"parts":' || df._json_compact(parts)
                      || ',"headers":' || coalesce(df._json_compact(headers), 'null')
                      || ',"timeout_seconds":' || timeout_seconds || '}')::text
           || '}';
END
$$;

-- --------------------------------------------------------------------------------------
-- Operators. They live in schema public, as pg_durable's do, so that `'a' ~> 'b'` works
-- with the default search_path (elsewhere: OPERATOR(public.~>)). PostgreSQL gives all of
-- them one precedence, left-associative: parenthesise mixed expressions.
-- --------------------------------------------------------------------------------------

-- cond ?> then: a partial IF that only !> completes. Operands stay text until then.
CREATE FUNCTION df._if_then_op(condition text, then_branch text) RETURNS text
LANGUAGE sql IMMUTABLE STRICT AS $$
    SELECT '{"_partial_if":true,"condition":' || to_json(condition)::text
           || ',"then_branch":' || to_json(then_branch)::text || '}'
$$;

CREATE FUNCTION df._if_else_op(partial_if text, else_branch text) RETURNS text
LANGUAGE plpgsql STABLE STRICT AS $$
DECLARE
    v_partial jsonb := CASE WHEN left(ltrim(left(partial_if, 64), E' \t\r\n'), 1) = '{'
                            THEN df._try_jsonb(partial_if) END;
BEGIN
    IF jsonb_typeof(v_partial) IS DISTINCT FROM 'object' OR v_partial ->> '_partial_if' IS NULL THEN
        RAISE EXCEPTION 'Invalid if-then-else: left side of !> must be a ?> expression'
            USING ERRCODE = 'invalid_parameter_value',
                  HINT = 'Write cond ?> then !> else, parenthesising compound branches.';
    END IF;
    -- ->> reads operands stored as text and as objects (older pg_durable) alike.
    RETURN df.if(v_partial ->> 'condition', v_partial ->> 'then_branch', else_branch);
END
$$;

CREATE FUNCTION df._loop_op(body text) RETURNS text
LANGUAGE sql STABLE STRICT AS $$ SELECT df.loop(body) $$;

CREATE OPERATOR public.~> (FUNCTION = df.seq, LEFTARG = text, RIGHTARG = text);
CREATE OPERATOR public.|=> (FUNCTION = df.as, LEFTARG = text, RIGHTARG = text);
CREATE OPERATOR public.& (FUNCTION = df.join, LEFTARG = text, RIGHTARG = text);
CREATE OPERATOR public.| (FUNCTION = df.race, LEFTARG = text, RIGHTARG = text);
CREATE OPERATOR public.?> (FUNCTION = df._if_then_op, LEFTARG = text, RIGHTARG = text);
CREATE OPERATOR public.!> (FUNCTION = df._if_else_op, LEFTARG = text, RIGHTARG = text);
CREATE OPERATOR public.@> (FUNCTION = df._loop_op, RIGHTARG = text);

-- --------------------------------------------------------------------------------------
-- Graph walking and validation (SPEC §6)
-- --------------------------------------------------------------------------------------

-- The root node of a graph text, auto-wrapping plain SQL (pg_durable's ensure_strict): a
-- JSON object with a string node_type is a node; any other text, including JSON without
-- node_type, is the query of an SQL node.
CREATE FUNCTION df._graph_root(p_graph text) RETURNS jsonb
LANGUAGE plpgsql IMMUTABLE STRICT AS $$
DECLARE
    v jsonb;
BEGIN
    IF left(ltrim(left(p_graph, 64), E' \t\r\n'), 1) = '{' THEN
        BEGIN
            v := p_graph::jsonb;
        EXCEPTION
            WHEN invalid_text_representation THEN
                v := NULL;
            WHEN statement_too_complex THEN   -- nested too deep for the JSON parser
                RAISE EXCEPTION 'Invalid durable function graph: root: Graph exceeds maximum nesting depth of %. Simplify the workflow or break it into multiple instances.',
                    coalesce(df._setting('max_nesting_depth'), '256')
                    USING ERRCODE = 'program_limit_exceeded';
        END;
        IF jsonb_typeof(v -> 'node_type') = 'string' THEN
            RETURN v;
        END IF;
    END IF;
    RETURN jsonb_build_object('node_type', 'SQL', 'query', p_graph);
END
$$;

-- One row per value found where a node belongs, in breadth-first order, stopping after
-- p_limit rows and below depth p_max_depth + 1. ord is the pre-order sort key (left = 1,
-- right = 2, condition = 3, extra_nodes[i] = 5 + i), pord the parent's. A child that is not
-- an object still gets a row (so that it can be reported); its children are not visited.
CREATE FUNCTION df._graph_walk(p_root jsonb, p_max_depth integer, p_limit integer)
RETURNS TABLE (path text, ord integer[], pord integer[], depth integer, role text,
               parent_type text, node jsonb)
LANGUAGE sql IMMUTABLE AS $$
    WITH RECURSIVE w(path, ord, pord, depth, role, parent_type, node) AS (
        SELECT 'root', '{}'::integer[], NULL::integer[], 0, 'root', NULL::text, p_root
        UNION ALL
        SELECT w.path || c.seg, w.ord || c.i, w.ord, w.depth + 1, c.role, w.node ->> 'node_type',
               c.child
          FROM w
         CROSS JOIN LATERAL (
                SELECT s.seg, s.i, s.role, s.child
                  FROM (VALUES ('.left', 1, 'left', w.node -> 'left_node'),
                               ('.right', 2, 'right', w.node -> 'right_node'),
                               ('.condition_node', 3, 'condition', w.node -> 'condition_node'))
                       AS s(seg, i, role, child)
                 WHERE jsonb_typeof(s.child) <> 'null'
                UNION ALL
                SELECT '.extra_nodes', 4, 'extras_invalid', x.extras
                  FROM (SELECT w.node -> 'extra_nodes') AS x(extras)
                 WHERE jsonb_typeof(x.extras) <> 'array'
                UNION ALL
                SELECT '.extra_nodes[' || (e.ord - 1) || ']', 4 + e.ord::integer, 'extra', e.child
                  FROM (SELECT w.node -> 'extra_nodes') AS x(extras)
                 CROSS JOIN LATERAL jsonb_array_elements(
                           CASE WHEN jsonb_typeof(x.extras) = 'array' THEN x.extras END)
                           WITH ORDINALITY AS e(child, ord)
              ) c
         WHERE jsonb_typeof(w.node) = 'object' AND w.depth <= p_max_depth
    )
    SELECT * FROM w LIMIT p_limit
$$;

-- Validates a graph as df.start() does before writing anything, and returns it as jsonb:
-- nested node objects with node_type, left_node, right_node, condition_node, extra_nodes
-- (array of nodes), query (leaf configs stay JSON *strings*) and result_name. Plain SQL is
-- wrapped as an SQL node. JSON null in a field means the field is absent; unknown keys may
-- remain and mean nothing. For IF/LOOP with a condition_node (JOIN/RACE with extra_nodes)
-- whose query is also set, query is a JSON object the storer merges the child ids into.
--
-- Raises "Invalid durable function graph: <path>: <reason>" (path like root.left.right,
-- root.condition_node, root.extra_nodes[0]). Beyond pg_durable it refuses structurally
-- incomplete nodes, malformed leaf configs, an unfinished ?> and empty SQL — but, like
-- pg_durable, not unbound $names or df.break() outside a loop (these fail when they run).
CREATE FUNCTION df._validate_graph(p_graph text) RETURNS jsonb
LANGUAGE plpgsql STABLE STRICT AS $$
DECLARE
    v_max_depth int := coalesce(df._setting('max_nesting_depth')::int, 256);
    v_max_nodes int := coalesce(df._setting('max_node_count')::int, 10000);
    v_types constant text[] := df._node_types();
    v_leaves constant text[] := ARRAY['SQL', 'BREAK', 'SLEEP', 'WAIT_SCHEDULE', 'HTTP',
                                      'HTTP_MULTIPART', 'SIGNAL'];
    v_root jsonb;
    v_count int;
    v_error text[];
BEGIN
    PERFORM df._check_helper_result(p_graph);
    v_root := df._graph_root(p_graph);

    WITH r AS MATERIALIZED (
        SELECT g.*,
               CASE WHEN jsonb_typeof(g.node) = 'object' THEN g.node ->> 'node_type' END AS nt,
               CASE WHEN jsonb_typeof(g.node) = 'object'
                    THEN jsonb_typeof(g.node -> 'node_type') END AS ntt,
               CASE WHEN jsonb_typeof(g.node) = 'object' THEN jsonb_typeof(g.node -> 'query') END AS qt,
               CASE WHEN jsonb_typeof(g.node) = 'object' THEN g.node ->> 'query' END AS q,
               CASE WHEN jsonb_typeof(g.node) = 'object'
                    THEN jsonb_typeof(g.node -> 'result_name') END AS rt,
               CASE WHEN jsonb_typeof(g.node) = 'object' THEN g.node ->> 'result_name' END AS rn
          FROM df._graph_walk(v_root, v_max_depth, v_max_nodes + 1) g
    ),
    kids AS (
        SELECT r.pord,
               bool_or(r.role = 'left') AS has_left,
               bool_or(r.role = 'right') AS has_right,
               bool_or(r.role = 'condition') AS has_cond,
               count(*) FILTER (WHERE r.role = 'extra') AS n_extra
          FROM r WHERE r.pord IS NOT NULL GROUP BY r.pord
    ),
    checked AS (
        SELECT r.path, r.ord, CASE
            WHEN r.depth > v_max_depth THEN
                format('Graph exceeds maximum nesting depth of %s. Simplify the workflow or break it into multiple instances.',
                       v_max_depth)
            WHEN r.role = 'extras_invalid' THEN
                format('Malformed Durofut JSON with node_type ''%s'': extra_nodes must be an array of Durofut JSON objects',
                       r.parent_type)
            WHEN jsonb_typeof(r.node) <> 'object' THEN
                CASE r.role WHEN 'condition' THEN 'condition_node must be a Durofut JSON object'
                            WHEN 'extra' THEN 'extra_nodes entries must be Durofut JSON objects'
                            ELSE 'Durofut children must be JSON objects' END
            WHEN r.ntt IS NULL THEN 'missing field `node_type`'
            WHEN r.ntt <> 'string' THEN 'node_type must be a string'
            WHEN NOT (r.nt = ANY (v_types)) THEN
                format('Unknown node_type ''%s''. Valid types: %s', r.nt,
                       array_to_string(v_types, ', '))
            WHEN r.qt NOT IN ('string', 'null') THEN
                format('Malformed Durofut JSON with node_type ''%s'': query must be a string', r.nt)
            WHEN r.rt NOT IN ('string', 'null') THEN
                format('Malformed Durofut JSON with node_type ''%s'': result_name must be a string', r.nt)
            WHEN r.rn = '' THEN 'result name cannot be empty'
            WHEN r.rn !~ '^[A-Za-z_][A-Za-z0-9_]*$' THEN
                format('result name ''%s'' is not a valid identifier — must match [a-zA-Z_][a-zA-Z0-9_]*',
                       r.rn)
            WHEN k.has_cond AND r.nt NOT IN ('IF', 'LOOP') THEN
                format('condition_node is not valid for %s nodes', r.nt)
            WHEN k.n_extra > 0 AND r.nt NOT IN ('JOIN', 'RACE') THEN
                format('extra_nodes is not valid for %s nodes', r.nt)
            WHEN k.has_left AND r.nt = ANY (v_leaves) THEN
                format('left_node is not valid for %s nodes', r.nt)
            WHEN k.has_right AND (r.nt = ANY (v_leaves) OR r.nt IN ('LOOP', 'FOREACH')) THEN
                format('right_node is not valid for %s nodes', r.nt)
            WHEN r.nt IN ('IF', 'LOOP') AND c.cfg ? 'condition_node' THEN
                format('condition_node in %s must be a first-class Durofut field, not embedded in query',
                       r.nt)
            WHEN r.nt IN ('JOIN', 'RACE') AND c.cfg ? 'extra_nodes' THEN
                format('extra_nodes in %s must be a first-class Durofut field, not embedded in query',
                       r.nt)
            WHEN (k.has_cond OR k.n_extra > 0) AND r.q IS NOT NULL
                 AND jsonb_typeof(c.cfg) IS DISTINCT FROM 'object' THEN
                format('query in %s must be valid JSON config (a JSON object)', r.nt)
            -- structure
            WHEN r.nt = 'THEN' AND NOT (coalesce(k.has_left, false) AND k.has_right) THEN
                'THEN node needs both left_node and right_node'
            WHEN r.nt = 'IF' AND NOT coalesce(k.has_cond, false)
                 AND NOT coalesce(c.cfg ->> 'condition_type' = 'result_has_rows'
                                  AND jsonb_typeof(c.cfg -> 'result_name') = 'string', false) THEN
                'IF node needs a condition_node (or a result_has_rows config in query)'
            WHEN r.nt IN ('JOIN', 'RACE', 'LOOP', 'FOREACH') AND NOT coalesce(k.has_left, false) THEN
                format('%s node needs %s in left_node', r.nt,
                       CASE WHEN r.nt IN ('LOOP', 'FOREACH') THEN 'a body' ELSE 'a branch' END)
            WHEN r.nt = 'FOREACH' AND (jsonb_typeof(c.cfg) IS DISTINCT FROM 'object'
                                       OR coalesce(c.cfg ->> 'name', '') !~ '^[A-Za-z_][A-Za-z0-9_]*$') THEN
                'FOREACH query must be a JSON config with a row name (an identifier)'
            WHEN r.nt = 'FOREACH' AND jsonb_typeof(c.cfg -> 'max_parallel') IS DISTINCT FROM 'number' THEN
                'FOREACH max_parallel must be a number from 1 to 1000'
            WHEN r.nt = 'FOREACH' AND NOT (c.cfg ->> 'max_parallel') ~ '^[0-9]+$' THEN
                'FOREACH max_parallel must be a number from 1 to 1000'
            WHEN r.nt = 'FOREACH' AND NOT (c.cfg ->> 'max_parallel')::numeric BETWEEN 1 AND 1000 THEN
                'FOREACH max_parallel must be a number from 1 to 1000'
            WHEN r.nt = 'FOREACH' AND c.cfg ? 'source_query'
                 AND (jsonb_typeof(c.cfg -> 'source_query') IS DISTINCT FROM 'string'
                      OR btrim(c.cfg ->> 'source_query', E' \t\r\n;') = '') THEN
                'FOREACH source_query must be a non-empty SQL query'
            -- leaves
            WHEN r.nt = 'SQL' AND r.q IS NULL THEN 'SQL node needs a query'
            WHEN r.nt = 'SQL' AND btrim(r.q, E' \t\r\n;') = '' THEN
                'empty SQL: the step has no statement to run'
            WHEN r.nt = 'SQL' AND r.q ~ '^\s*\{' AND r.q ~ '"_partial_if"\s*:\s*true' THEN
                'incomplete conditional: a ?> expression needs !> and an else branch'
            WHEN r.nt = 'SLEEP' AND coalesce(r.q, '') !~ '^\s*[0-9]+(\.[0-9]+)?\s*$' THEN
                'SLEEP query must be a non-negative number of seconds'
            WHEN r.nt = 'WAIT_SCHEDULE' AND jsonb_typeof(c.cfg -> 'cron_expr') IS DISTINCT FROM 'string' THEN
                'WAIT_SCHEDULE query must be a JSON config with a cron_expr string'
            WHEN r.nt = 'WAIT_SCHEDULE' THEN df._cron_message(c.cfg ->> 'cron_expr')
            WHEN r.nt = 'SIGNAL' AND (jsonb_typeof(c.cfg -> 'signal_name') IS DISTINCT FROM 'string'
                                      OR c.cfg ->> 'signal_name' = '') THEN
                'SIGNAL query must be a JSON config with a non-empty signal_name'
            WHEN r.nt = 'SIGNAL' AND jsonb_typeof(c.cfg -> 'timeout_seconds') NOT IN ('null', 'number') THEN
                'SIGNAL timeout_seconds must be a positive number or null'
            WHEN r.nt = 'SIGNAL' AND jsonb_typeof(c.cfg -> 'timeout_seconds') = 'number'
                 AND (c.cfg ->> 'timeout_seconds')::numeric <= 0 THEN
                'SIGNAL timeout_seconds must be a positive number or null'
            WHEN r.nt IN ('HTTP', 'HTTP_MULTIPART') AND jsonb_typeof(c.cfg -> 'url') IS DISTINCT FROM 'string' THEN
                format('%s query must be a JSON config with a url string', r.nt)
            WHEN r.nt = 'BREAK' AND r.q IS NOT NULL AND jsonb_typeof(c.cfg) IS DISTINCT FROM 'object' THEN
                'BREAK query must be a JSON config object'
        END AS message
          FROM r
          LEFT JOIN kids k ON k.pord = r.ord
          LEFT JOIN LATERAL (
                SELECT CASE WHEN r.nt IN ('IF', 'LOOP', 'JOIN', 'RACE', 'FOREACH', 'WAIT_SCHEDULE', 'SIGNAL',
                                          'HTTP', 'HTTP_MULTIPART', 'BREAK')
                                 AND r.q ~ '^\s*\{' THEN df._try_jsonb(r.q) END AS cfg
              ) c ON true
    )
    SELECT (SELECT count(*) FROM r),
           (SELECT ARRAY[ch.path, ch.message] FROM checked ch
             WHERE ch.message IS NOT NULL ORDER BY ch.ord LIMIT 1)
      INTO v_count, v_error;

    IF v_count > v_max_nodes THEN
        RAISE EXCEPTION 'Invalid durable function graph: root: Workflow exceeds maximum node count of %. Simplify the workflow or break it into multiple instances.',
            v_max_nodes USING ERRCODE = 'program_limit_exceeded';
    END IF;
    IF v_error IS NOT NULL THEN
        RAISE EXCEPTION 'Invalid durable function graph: %: %', v_error[1], v_error[2]
            USING ERRCODE = CASE WHEN v_error[2] LIKE 'Graph exceeds maximum nesting depth%'
                                 THEN 'program_limit_exceeded' ELSE 'invalid_parameter_value' END;
    END IF;
    RETURN v_root;
END
$$;

-- --------------------------------------------------------------------------------------
-- Inferred node statuses (SPEC §5, df.instance_nodes) and df.explain
-- --------------------------------------------------------------------------------------

-- The nodes of an instance's graph: its own and those of the child instances its branches
-- moved to. Row-level security on df.instances/df.nodes decides what the caller sees.
CREATE FUNCTION df._instance_graph_nodes(p_instance_id text)
RETURNS TABLE (id text, node_type text, query text, result_name text, left_node text,
               right_node text, condition_node text, extra_nodes text[], status text,
               error text, result_text text)
LANGUAGE sql STABLE SECURITY INVOKER AS $$
    WITH RECURSIVE family(id) AS (
        SELECT i.id FROM df.instances i WHERE i.id = p_instance_id
        UNION
        SELECT c.id FROM df.instances c JOIN family f ON c.parent_id = f.id
    )
    SELECT DISTINCT ON (n.id)
           n.id, n.node_type, n.query, n.result_name, n.left_node, n.right_node,
           cfg.c ->> 'condition_node',
           CASE WHEN jsonb_typeof(cfg.c -> 'extra_nodes') = 'array'
                THEN ARRAY(SELECT jsonb_array_elements_text(cfg.c -> 'extra_nodes')) END,
           n.status,
           coalesce(n.error, n.result #>> '{}'),
           coalesce(n.result_text, n.result::text)
      FROM df.nodes n
      CROSS JOIN LATERAL (
            SELECT CASE WHEN n.node_type IN ('IF', 'LOOP', 'JOIN', 'RACE') AND n.query ~ '^\s*\{'
                        THEN df._try_jsonb(n.query) END AS c) cfg
     WHERE n.instance_id IN (SELECT f.id FROM family f)
     ORDER BY n.id, (n.instance_id = p_instance_id) DESC
$$;

-- inferred_status per SPEC §5: 'skipped' for a node that will never run because an ancestor
-- decided so — an untaken IF arm, the right side of a failed THEN, anything still pending or
-- running under a finished node, a branch a RACE abandoned (our runtime fails it with
-- "Cancelled: RACE lost") or a failed JOIN abandoned ("Cancelled: JOIN failed") — and for
-- pending/running descendants of a skipped node. Nodes that finished keep their status.
-- inferred_status_from_ancestor_id is the deciding ancestor (NULL when not inferred).
CREATE FUNCTION df._inferred_nodes(p_instance_id text)
RETURNS TABLE (node_id text, inferred_status text, inferred_status_from_ancestor_id text)
LANGUAGE sql STABLE SECURITY INVOKER AS $$
    WITH RECURSIVE n AS MATERIALIZED (
        SELECT * FROM df._instance_graph_nodes(p_instance_id)
    ),
    edges AS (
        SELECT n.id AS parent, c.child
          FROM n CROSS JOIN LATERAL (
                SELECT n.condition_node WHERE n.node_type IN ('IF', 'LOOP')
                UNION ALL SELECT n.left_node
                UNION ALL SELECT n.right_node
                UNION ALL SELECT unnest(n.extra_nodes)) AS c(child)
         WHERE c.child IS NOT NULL
    ),
    -- Top-down: each row carries what its children inherit — the skip decision, the nearest
    -- finished ancestor and the nearest RACE and JOIN.
    walk(id, depth, status, from_id, skip_from, finished, race, "join") AS (
        SELECT n.id, 0, n.status, NULL::text, NULL::text,
               CASE WHEN n.status IN ('completed', 'failed') THEN n.id END,
               CASE WHEN n.node_type = 'RACE' THEN n.id END,
               CASE WHEN n.node_type = 'JOIN' THEN n.id END
          FROM n
         WHERE n.id = (SELECT i.root_node FROM df.instances i WHERE i.id = p_instance_id)
        UNION ALL
        SELECT n.id, w.depth + 1,
               CASE WHEN d.from_id IS NOT NULL THEN 'skipped' ELSE n.status END,
               d.from_id,
               coalesce(d.from_id, w.skip_from),
               CASE WHEN n.status IN ('completed', 'failed') AND d.from_id IS NULL THEN n.id
                    ELSE w.finished END,
               CASE WHEN n.node_type = 'RACE' THEN n.id ELSE w.race END,
               CASE WHEN n.node_type = 'JOIN' THEN n.id ELSE w."join" END
          FROM walk w
          JOIN edges e ON e.parent = w.id
          JOIN n ON n.id = e.child
         CROSS JOIN LATERAL (
                SELECT CASE
                    -- below a skipped node: whatever did not finish by itself
                    WHEN w.skip_from IS NOT NULL
                         AND (n.status IN ('pending', 'running')
                              OR (n.status = 'failed' AND n.error LIKE 'Cancelled: RACE lost%')
                              OR (n.status = 'failed' AND n.error LIKE 'Cancelled: JOIN failed%'))
                        THEN w.skip_from
                    WHEN n.status = 'failed' AND n.error LIKE 'Cancelled: RACE lost%'
                        THEN coalesce(w.race, e.parent)
                    WHEN n.status = 'failed' AND n.error LIKE 'Cancelled: JOIN failed%'
                        THEN coalesce(w."join", e.parent)
                    -- never ran, or abandoned, under a node that has finished
                    WHEN n.status IN ('pending', 'running') AND w.finished IS NOT NULL
                        THEN w.finished
                END AS from_id) d
         WHERE w.depth < 100000
    ),
    first_visit AS (
        SELECT DISTINCT ON (w.id) w.id, w.status, w.from_id FROM walk w ORDER BY w.id, w.depth
    )
    SELECT n.id, coalesce(f.status, n.status), f.from_id
      FROM n LEFT JOIN first_visit f ON f.id = n.id
$$;

-- Node maps for the renderer: {id: {"t": node_type, "q": query, "n": result_name,
-- "l": left id, "r": right id, "c": condition id, "x": [extra ids], "s": status}}.

-- A validated graph, with display ids ('N' for the root, 'N1.2' for its left's right, …).
CREATE FUNCTION df._graph_node_map(p_root jsonb) RETURNS jsonb
LANGUAGE sql IMMUTABLE AS $$
    WITH g AS MATERIALIZED (
        SELECT w.ord, w.pord, w.role, w.node, 'N' || array_to_string(w.ord, '.') AS id
          FROM df._graph_walk(p_root, 2147483646, 2147483647) w
    ),
    kids AS (
        SELECT g.pord,
               max(g.id) FILTER (WHERE g.role = 'left') AS l,
               max(g.id) FILTER (WHERE g.role = 'right') AS r,
               max(g.id) FILTER (WHERE g.role = 'condition') AS c,
               jsonb_agg(g.id ORDER BY g.ord) FILTER (WHERE g.role = 'extra') AS x
          FROM g WHERE g.pord IS NOT NULL GROUP BY g.pord
    )
    SELECT jsonb_object_agg(g.id, jsonb_build_object(
               't', g.node ->> 'node_type', 'q', g.node ->> 'query', 'n', g.node ->> 'result_name',
               'l', k.l, 'r', k.r, 'c', k.c, 'x', k.x))
      FROM g LEFT JOIN kids k ON k.pord = g.ord
$$;

-- A stored instance, with each node's inferred status.
CREATE FUNCTION df._instance_node_map(p_instance_id text) RETURNS jsonb
LANGUAGE sql STABLE SECURITY INVOKER AS $$
    SELECT jsonb_object_agg(g.id, jsonb_build_object(
               't', g.node_type, 'q', g.query, 'n', g.result_name, 'l', g.left_node,
               'r', g.right_node, 'c', g.condition_node, 'x', to_jsonb(g.extra_nodes),
               's', coalesce(i.inferred_status, g.status)))
      FROM df._instance_graph_nodes(p_instance_id) g
      LEFT JOIN df._inferred_nodes(p_instance_id) i ON i.node_id = g.id
$$;

CREATE FUNCTION df._explain_marker(p_status text, p_show boolean) RETURNS text
LANGUAGE sql IMMUTABLE AS $$
    SELECT CASE WHEN NOT p_show THEN ''
                ELSE CASE p_status WHEN 'completed' THEN ' ✓' WHEN 'failed' THEN ' ✗'
                                   WHEN 'running' THEN ' ⏳' WHEN 'pending' THEN ' ○'
                                   WHEN 'skipped' THEN ' ⊘' ELSE '' END END
$$;

-- One node's line, as pg_durable prints it ("SQL: SELECT 1 |=> 'x'", "SLEEP 30s", …).
CREATE FUNCTION df._explain_label(p jsonb) RETURNS text
LANGUAGE plpgsql IMMUTABLE AS $$
DECLARE
    v_type text := p ->> 't';
    v_query text := p ->> 'q';
    v_suffix text := CASE WHEN p ->> 'n' IS NOT NULL THEN ' |=> ''' || (p ->> 'n') || '''' ELSE '' END;
    v_cfg jsonb;
    v_a text;
    v_b text;
BEGIN
    IF v_type IN ('WAIT_SCHEDULE', 'HTTP', 'HTTP_MULTIPART', 'SIGNAL', 'BREAK', 'FOREACH')
       AND v_query ~ '^\s*\{' THEN
        v_cfg := df._try_jsonb(v_query);
    END IF;
    CASE v_type
    WHEN 'SQL' THEN
        v_a := coalesce(v_query, '?');
        IF length(v_a) > 50 THEN
            v_a := left(v_a, 47) || '...';
        END IF;
        RETURN 'SQL: ' || v_a || v_suffix;
    WHEN 'SLEEP' THEN
        RETURN 'SLEEP ' || coalesce(v_query, '?') || 's' || v_suffix;
    WHEN 'WAIT_SCHEDULE' THEN
        RETURN 'WAIT ''' || coalesce(CASE WHEN jsonb_typeof(v_cfg -> 'cron_expr') = 'string'
                                          THEN v_cfg ->> 'cron_expr' END, '?')
               || '''' || v_suffix;
    WHEN 'HTTP', 'HTTP_MULTIPART' THEN
        IF v_cfg IS NULL THEN
            v_a := '?';
            v_b := '?';
        ELSE
            v_a := coalesce(CASE WHEN jsonb_typeof(v_cfg -> 'method') = 'string'
                                 THEN v_cfg ->> 'method' END, 'POST');
            v_b := coalesce(CASE WHEN jsonb_typeof(v_cfg -> 'url') = 'string'
                                 THEN v_cfg ->> 'url' END, '?');
            IF length(v_b) > 40 THEN
                v_b := left(v_b, 37) || '...';
            END IF;
        END IF;
        RETURN v_type || ' ' || v_a || ' ' || v_b || v_suffix;
    WHEN 'SIGNAL' THEN
        v_a := coalesce(CASE WHEN jsonb_typeof(v_cfg -> 'signal_name') = 'string'
                             THEN v_cfg ->> 'signal_name' END, '?');
        v_b := CASE WHEN jsonb_typeof(v_cfg -> 'timeout_seconds') = 'number'
                         AND v_cfg ->> 'timeout_seconds' ~ '^-?[0-9]+$'
                    THEN ' (' || (v_cfg ->> 'timeout_seconds') || 's)' ELSE '' END;
        RETURN 'SIGNAL ''' || v_a || '''' || v_b || v_suffix;
    WHEN 'LOOP' THEN
        RETURN CASE WHEN p ->> 'c' IS NOT NULL THEN 'LOOP (while)' ELSE 'LOOP (infinite)' END
               || v_suffix;
    WHEN 'BREAK' THEN
        v_a := CASE WHEN jsonb_typeof(v_cfg -> 'break_value') = 'string'
                    THEN v_cfg ->> 'break_value' END;
        IF v_a IS NULL THEN
            RETURN 'BREAK' || v_suffix;
        END IF;
        IF length(v_a) > 20 THEN
            v_a := left(v_a, 17) || '...';
        END IF;
        RETURN 'BREAK ''' || v_a || '''' || v_suffix;
    WHEN 'IF' THEN
        RETURN 'IF' || v_suffix;
    WHEN 'JOIN' THEN
        RETURN 'JOIN (' || ((p ->> 'l' IS NOT NULL)::int + (p ->> 'r' IS NOT NULL)::int
                            + CASE WHEN jsonb_typeof(p -> 'x') = 'array'
                                   THEN jsonb_array_length(p -> 'x') ELSE 0 END)
               || ')' || v_suffix;
    WHEN 'RACE' THEN
        RETURN 'RACE' || v_suffix;
    WHEN 'FOREACH' THEN
        RETURN 'FOREACH row ''' || coalesce(v_cfg ->> 'name', '?') || ''' of '
               || CASE WHEN v_cfg ? 'source_query' THEN 'query' ELSE '$' || coalesce(v_cfg ->> 'name', '?') END
               || ' (' || coalesce(v_cfg ->> 'max_parallel', '?') || ' at a time)' || v_suffix;
    WHEN 'THEN' THEN
        RETURN 'SEQUENCE';
    ELSE
        RETURN coalesce(v_type, '?');
    END CASE;
END
$$;

-- What follows a node's line: labelled children ("↻ body:", "? condition:", "║ branch 1:").
CREATE FUNCTION df._explain_children(p jsonb, p_prefix text)
RETURNS TABLE (kind text, val text, prefix text, is_last boolean)
LANGUAGE plpgsql IMMUTABLE AS $$
DECLARE
    v_branches text[];
    i int;
BEGIN
    CASE p ->> 't'
    WHEN 'LOOP', 'FOREACH' THEN
        IF p ->> 'l' IS NOT NULL THEN
            RETURN QUERY VALUES ('line', p_prefix || CASE p ->> 't' WHEN 'LOOP' THEN '↻ body:'
                                                     ELSE '⇉ per row:' END, NULL::text, NULL::boolean),
                                ('node', p ->> 'l', p_prefix || '  ', true);
        END IF;
        IF p ->> 'c' IS NOT NULL THEN
            RETURN QUERY VALUES ('line', p_prefix || '? while:', NULL::text, NULL::boolean),
                                ('node', p ->> 'c', p_prefix || '  ', true);
        END IF;
    WHEN 'IF' THEN
        IF p ->> 'c' IS NOT NULL THEN
            RETURN QUERY VALUES ('line', p_prefix || '? condition:', NULL::text, NULL::boolean),
                                ('node', p ->> 'c', p_prefix || '  ', true);
        END IF;
        IF p ->> 'l' IS NOT NULL THEN
            RETURN QUERY VALUES ('line', p_prefix || '✓ then:', NULL::text, NULL::boolean),
                                ('node', p ->> 'l', p_prefix || '  ', true);
        END IF;
        IF p ->> 'r' IS NOT NULL THEN
            RETURN QUERY VALUES ('line', p_prefix || '✗ else:', NULL::text, NULL::boolean),
                                ('node', p ->> 'r', p_prefix || '  ', true);
        END IF;
    WHEN 'JOIN', 'RACE' THEN
        v_branches := array_remove(ARRAY[p ->> 'l', p ->> 'r'], NULL)
                      || ARRAY(SELECT jsonb_array_elements_text(
                                   CASE WHEN jsonb_typeof(p -> 'x') = 'array' THEN p -> 'x' END));
        FOR i IN 1..coalesce(cardinality(v_branches), 0) LOOP
            RETURN QUERY VALUES ('line', p_prefix || '║ branch ' || i || ':', NULL::text, NULL::boolean),
                                ('node', v_branches[i], p_prefix || '  ', i = cardinality(v_branches));
        END LOOP;
    ELSE
        NULL;
    END CASE;
END
$$;

-- The non-THEN nodes of a THEN tree, in order: a sequence prints as one line per step.
CREATE FUNCTION df._explain_sequence(p_id text, p_nodes jsonb) RETURNS text[]
LANGUAGE plpgsql IMMUTABLE AS $$
DECLARE
    v_stack text[] := ARRAY[p_id];
    v_out text[] := '{}';
    v_id text;
    v_node jsonb;
BEGIN
    WHILE cardinality(v_stack) > 0 LOOP
        v_id := v_stack[cardinality(v_stack)];
        v_stack := v_stack[1:cardinality(v_stack) - 1];
        v_node := p_nodes -> v_id;
        CONTINUE WHEN v_node IS NULL;
        IF v_node ->> 't' = 'THEN' THEN
            IF v_node ->> 'r' IS NOT NULL THEN v_stack := v_stack || (v_node ->> 'r'); END IF;
            IF v_node ->> 'l' IS NOT NULL THEN v_stack := v_stack || (v_node ->> 'l'); END IF;
        ELSE
            v_out := v_out || v_id;
        END IF;
    END LOOP;
    RETURN v_out;
END
$$;

-- The tree as pg_durable draws it, with an explicit stack instead of recursion (graphs
-- nest 256 deep). Lines are padded to a common width plus four, as pg_durable pads them.
CREATE FUNCTION df._render_tree(p_root text, p_nodes jsonb, p_show_status boolean) RETURNS text
LANGUAGE plpgsql IMMUTABLE AS $$
DECLARE
    s_kind text[] := ARRAY['node'];
    s_val text[] := ARRAY[p_root];
    s_prefix text[] := ARRAY[''];
    s_last boolean[] := ARRAY[true];
    v_sp int := 1;
    v_lines text[] := '{}';
    v_kind text;
    v_val text;
    v_prefix text;
    v_last boolean;
    v_node jsonb;
    v_step jsonb;
    v_connector text;
    v_seq text[];
    i_kind text[];
    i_val text[];
    i_prefix text[];
    i_last boolean[];
    v_child record;
    v_out text;
    v_width int;
    k int;
BEGIN
    WHILE v_sp > 0 LOOP
        v_kind := s_kind[v_sp];
        v_val := s_val[v_sp];
        v_prefix := s_prefix[v_sp];
        v_last := s_last[v_sp];
        v_sp := v_sp - 1;
        IF v_kind = 'line' THEN
            v_lines := v_lines || v_val;
            CONTINUE;
        END IF;
        v_node := p_nodes -> v_val;
        CONTINUE WHEN v_node IS NULL;
        v_connector := CASE WHEN v_prefix = '' THEN '' WHEN v_last THEN '└─' ELSE '├─' END;
        i_kind := '{}';
        i_val := '{}';
        i_prefix := '{}';
        i_last := '{}';
        IF v_node ->> 't' = 'THEN' THEN
            -- A sequence prints its steps with arrows; composite steps show their children.
            v_seq := df._explain_sequence(v_val, p_nodes);
            FOR k IN 1..coalesce(cardinality(v_seq), 0) LOOP
                v_step := p_nodes -> v_seq[k];
                i_kind := i_kind || 'line'::text;
                i_val := i_val || (v_prefix || CASE WHEN k = 1 THEN v_connector ELSE '→ ' END
                                   || df._explain_label(v_step)
                                   || df._explain_marker(v_step ->> 's', p_show_status));
                i_prefix := i_prefix || NULL::text;
                i_last := i_last || NULL::boolean;
                IF v_step ->> 't' NOT IN ('THEN', 'SQL', 'SLEEP', 'WAIT_SCHEDULE', 'HTTP',
                                          'HTTP_MULTIPART') THEN
                    FOR v_child IN SELECT * FROM df._explain_children(v_step, v_prefix || '    ') LOOP
                        i_kind := i_kind || v_child.kind;
                        i_val := i_val || v_child.val;
                        i_prefix := i_prefix || v_child.prefix;
                        i_last := i_last || v_child.is_last;
                    END LOOP;
                END IF;
            END LOOP;
        ELSE
            i_kind := i_kind || 'line'::text;
            i_val := i_val || (v_prefix || v_connector || df._explain_label(v_node)
                               || df._explain_marker(v_node ->> 's', p_show_status));
            i_prefix := i_prefix || NULL::text;
            i_last := i_last || NULL::boolean;
            FOR v_child IN SELECT * FROM df._explain_children(v_node,
                    CASE WHEN v_prefix = '' THEN '    '
                         WHEN v_last THEN v_prefix || '    '
                         ELSE v_prefix || '│   ' END) LOOP
                i_kind := i_kind || v_child.kind;
                i_val := i_val || v_child.val;
                i_prefix := i_prefix || v_child.prefix;
                i_last := i_last || v_child.is_last;
            END LOOP;
        END IF;
        -- Push in reverse, so that the first item comes off the stack next.
        FOR k IN REVERSE coalesce(cardinality(i_kind), 0)..1 LOOP
            v_sp := v_sp + 1;
            s_kind[v_sp] := i_kind[k];
            s_val[v_sp] := i_val[k];
            s_prefix[v_sp] := i_prefix[k];
            s_last[v_sp] := i_last[k];
        END LOOP;
    END LOOP;
    v_out := rtrim(array_to_string(v_lines, E'\n'), E' \t\r\n');
    SELECT max(length(l.line)) INTO v_width FROM regexp_split_to_table(v_out, E'\r?\n') AS l(line);
    RETURN (SELECT string_agg(rpad(l.line, v_width + 4), E'\n' ORDER BY l.ord)
              FROM regexp_split_to_table(v_out, E'\r?\n') WITH ORDINALITY AS l(line, ord));
END
$$;

-- A graph previewed: validation errors come back as the text, not raised.
CREATE FUNCTION df._explain_graph(p_graph text) RETURNS text
LANGUAGE plpgsql STABLE AS $$
DECLARE
    v_root jsonb;
BEGIN
    BEGIN
        v_root := df._validate_graph(p_graph);
    EXCEPTION WHEN OTHERS THEN
        RETURN SQLERRM;
    END;
    RETURN df._render_tree('N', df._graph_node_map(v_root), false);
END
$$;

CREATE FUNCTION df._explain_instance(p_instance_id text) RETURNS text
LANGUAGE plpgsql STABLE SECURITY INVOKER AS $$
DECLARE
    v_root text;
    v_label text;
    v_status text;
    v_map jsonb;
    v_output text;
    v_out text;
BEGIN
    SELECT i.root_node, i.label, i.status INTO v_root, v_label, v_status
      FROM df.instances i WHERE i.id = p_instance_id;
    IF NOT FOUND THEN
        RETURN format('Instance ''%s'' not found', p_instance_id);
    END IF;
    v_map := df._instance_node_map(p_instance_id);
    IF v_map IS NULL THEN
        RETURN format('No nodes found for instance ''%s''', p_instance_id);
    END IF;
    v_out := 'Instance: ' || p_instance_id
             || CASE WHEN v_label IS NOT NULL THEN ' (' || v_label || ')' ELSE '' END || E'\n'
             || 'Status:   ' || CASE v_status WHEN 'completed' THEN '✓' WHEN 'failed' THEN '✗'
                                              WHEN 'cancelled' THEN '✗' WHEN 'running' THEN '⏳'
                                              ELSE '○' END
             || ' ' || v_status || E'\n';
    IF v_status = 'completed' THEN
        SELECT g.result_text INTO v_output
          FROM df._instance_graph_nodes(p_instance_id) g WHERE g.id = v_root;
        IF v_output IS NOT NULL THEN
            v_out := v_out || 'Output:   '
                     || CASE WHEN length(v_output) > 60 THEN left(v_output, 57) || '...'
                             ELSE v_output END || E'\n';
        END IF;
    END IF;
    RETURN v_out || E'\n' || df._render_tree(v_root, v_map, true);
END
$$;

-- df.explain(input) (SPEC §5): an instance id (8 hex digits) draws the stored graph with
-- each node's status; anything else is previewed without running — graph JSON, DSL source
-- text (evaluated as `SELECT <input>` in the caller's session, as pg_durable does) or plain
-- SQL. Problems come back as the text of the result, never as an error.
CREATE FUNCTION df.explain(input text) RETURNS text
LANGUAGE plpgsql VOLATILE STRICT SECURITY INVOKER AS $$
DECLARE
    v_input text := btrim(input, E' \t\r\n');
    v_json jsonb;
    v_graph text;
BEGIN
    IF v_input ~ '^[0-9a-fA-F]{8}$' THEN
        RETURN df._explain_instance(v_input);
    END IF;
    IF left(v_input, 1) = '{' THEN
        v_json := df._try_jsonb(v_input);
        IF jsonb_typeof(v_json) = 'object' AND (v_json ? 'node_type' OR v_json ? '_partial_if') THEN
            RETURN df._explain_graph(v_input);
        END IF;
    END IF;
    IF v_input ~ '(~>|\|=>|\?>|!>|@>|df\.)' THEN
        BEGIN
            -- The parentheses keep the input one expression: no second statement rides along.
            EXECUTE 'SELECT (' || v_input || E'\n)::text' INTO v_graph;
        EXCEPTION WHEN OTHERS THEN
            RETURN 'Failed to evaluate expression: ' || SQLERRM;
        END;
        IF v_graph IS NULL THEN
            RETURN 'Expression returned NULL';
        END IF;
        RETURN df._explain_graph(v_graph);
    END IF;
    IF upper(v_input) ~ '^(SELECT|INSERT|UPDATE|DELETE|WITH|CREATE|ALTER|DROP|CALL|DO|TRUNCATE|GRANT|REVOKE|EXPLAIN|VALUES|TABLE|MERGE)\s' THEN
        RETURN df._explain_graph(v_input);
    END IF;
    RETURN 'Cannot explain input: not a valid Durofut JSON, instance ID, SQL statement, or DSL expression.'
           || E'\n' || 'Hint: DSL expressions use df.*() functions and operators like ~>, |=>, &, |.';
END
$$;

REVOKE ALL ON ALL FUNCTIONS IN SCHEMA df FROM PUBLIC;
