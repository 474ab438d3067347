-- 0021_known_nodes: a session does not canonicalise the same node text again.
--
-- A composer embeds a node text it is given only after parsing and re-writing it in canonical
-- form (df._node): for a ~> b ~> c, the left side of the second ~> is the first one's output,
-- a THEN node parsed, checked and re-written at every call. That was most of what composing
-- cost, and composing a seventh of what df.start cost, though a client mostly starts the same
-- workflow again and again.
--
-- df._node now remembers the canonical texts it has written in the session's setting
-- df.known_nodes (each followed by a \x01 byte, which canonical JSON cannot hold, newest
-- first, at most 8 KB; above 1 KB a text is trusted by its prefix already) and embeds such a
-- text as it is. Any role can set the setting; nothing is trusted for it but the form of a
-- text: df.start validates the whole graph whatever the composers embedded, so a forged entry
-- can only make the composers return text that df.start refuses. Output and messages are
-- unchanged.

CREATE OR REPLACE FUNCTION df._node(p_input text) RETURNS text
LANGUAGE plpgsql STABLE STRICT AS $$
DECLARE
    v jsonb;
    v_error text;
    v_known text;
    v_out text;
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
        v_known := coalesce(current_setting('df.known_nodes', true), '');
        IF left(p_input, 14) = '{"node_type":"' AND strpos(p_input, E'\x01') = 0
           AND strpos(E'\x01' || v_known, E'\x01' || p_input || E'\x01') > 0 THEN
            RETURN p_input;
        END IF;
        v := df._try_jsonb(p_input);
        IF jsonb_typeof(v -> 'node_type') = 'string' THEN
            v_error := df._shape_error(v);
            IF v_error IS NOT NULL THEN
                RAISE EXCEPTION 'Invalid Durofut JSON: failed to deserialize workflow step: %',
                    v_error USING ERRCODE = 'invalid_parameter_value';
            END IF;
            IF v ->> 'node_type' = ANY (df._node_types()) THEN
                v_out := df._canon(v, 'root', 0);
                IF octet_length(v_out) <= 1024 THEN
                    PERFORM pg_catalog.set_config('df.known_nodes', v_out || E'\x01' ||
                        CASE WHEN octet_length(v_known) + octet_length(v_out) < 8192
                             THEN v_known ELSE '' END, false);
                END IF;
                RETURN v_out;
            END IF;
        END IF;
    END IF;
    RETURN '{"node_type":"SQL","query":' || to_json(p_input)::text || '}';
END
$$;
