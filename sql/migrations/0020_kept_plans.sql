-- 0020_kept_plans: the executor's statements keep their plans for the session.
--
-- The executor cannot keep prepared statements: after every step it deallocates all of them
-- (a step may have prepared its own, df._after_step). So each of its statements was parsed,
-- analysed and planned at every call; in a burst of 3-step workflows, parsing, analysing and
-- planning (the steps' own statements included) took a third of its backends' CPU. A PL/pgSQL
-- function keeps its statements' plans for the session outside the prepared statements, where
-- a step cannot reach them (it may not call these functions; DISCARD PLANS, the one thing it
-- could do, only makes them planned again). The executor's statements per round (its claims,
-- loads and writes) are therefore these functions; the dispatcher's writes call the same
-- four (nodes, instances, tasks, dropped work), so each statement is written once.
--
-- Each is planned generically, as a key look-up whatever the statistics say (db.KEYED_PLANS,
-- as df._claim_with_mail since 0017; set on all of them at the end, with a fixed search_path),
-- and the plan is kept until PostgreSQL invalidates it (an ANALYZE or VACUUM of its tables,
-- say): a plan made while the tables of a fresh database are tiny must not be a sequential
-- scan, which would stay the plan however much the tables grew. Custom plans (PL/pgSQL's
-- first five, and any later one the planner prefers) would plan again at every call, which is
-- what this removes.

-- Claim the oldest p_limit tasks of the given shards. The row lock is the claim: it lasts until
-- the executor's transaction ends, and a crash releases it. The primary key gives the order and
-- the scan stops at the limit. The instance's status comes with each task: a task of an
-- instance that is no longer running is removed unrun (Executor.work_once).
CREATE FUNCTION df._tasks_claim(p_shards integer[], p_claimed bigint[], p_carried text[],
                                p_limit integer)
RETURNS TABLE (id bigint, instance_id text, node_id text, activation bigint, kind text,
               database text, role name, payload json, attempt integer, label text,
               instance_status text)
LANGUAGE plpgsql VOLATILE AS $$
#variable_conflict use_column
BEGIN
    RETURN QUERY
    SELECT t.id, t.instance_id, t.node_id, t.activation, t.kind, t.database,
           (SELECT r.rolname FROM pg_catalog.pg_roles r WHERE r.oid = t.submitted_by),
           t.payload, t.attempt,
           (SELECT i.label FROM df.instances i WHERE i.id = t.instance_id),
           (SELECT i.status FROM df.instances i WHERE i.id = t.instance_id)
    FROM df.tasks t
    WHERE t.shard = ANY(p_shards)
      AND (t.lease_until IS NULL OR t.lease_until < clock_timestamp())
      AND t.id <> ALL(p_claimed)          -- our own locks do not make SKIP LOCKED skip
      AND t.instance_id <> ALL(p_carried) -- carried on in this batch (Executor._claim)
    ORDER BY t.id
    LIMIT p_limit
    FOR UPDATE OF t SKIP LOCKED;
END $$;

-- An executor carries these instances on where their steps just ran: lock those nobody else
-- runs right now and that have no mail waiting (mail goes first, through the dispatcher).
CREATE FUNCTION df._instances_lock_quiet(p_ids text[])
RETURNS TABLE (id text, root_node text, status text, label text, vars jsonb, names jsonb,
               inbox jsonb, execution_count integer, seq bigint, parent_id text,
               parent_node text, parent_activation bigint, branch_index integer,
               family_root text, waiters jsonb, database text, role name,
               now timestamptz)
LANGUAGE plpgsql VOLATILE AS $$
#variable_conflict use_column
BEGIN
    RETURN QUERY
    SELECT i.id, i.root_node, i.status, i.label, i.vars, i.names, i.inbox, i.execution_count,
           i.seq, i.parent_id, i.parent_node, i.parent_activation, i.branch_index,
           i.family_root, i.waiters, i.database,
           (SELECT r.rolname FROM pg_catalog.pg_roles r WHERE r.oid = i.submitted_by),
           pg_catalog.clock_timestamp()
    FROM df.instances i
    WHERE i.id = ANY(p_ids)
      AND i.status = 'running'
      AND NOT EXISTS (SELECT 1 FROM df.mailbox m WHERE m.instance_id = i.id)
    FOR UPDATE OF i SKIP LOCKED;
END $$;

-- The nodes of each instance, instance by instance through the index (OFFSET 0 keeps the
-- per-instance look-up).
CREATE FUNCTION df._nodes_load_many(p_ids text[])
RETURNS TABLE (instance_id text, id text, node_type text, query text, result_name text,
               left_node text, right_node text, parent_node text, "position" integer,
               status text, result_text text, error text, activation bigint,
               status_details jsonb, options jsonb)
LANGUAGE plpgsql VOLATILE AS $$
#variable_conflict use_column
BEGIN
    RETURN QUERY
    SELECT n.instance_id, n.id, n.node_type, n.query, n.result_name, n.left_node, n.right_node,
           n.parent_node, n.position, n.status, n.result_text, n.error, n.activation,
           n.status_details, n.options
    FROM unnest(p_ids) AS u(id)
    CROSS JOIN LATERAL (SELECT * FROM df.nodes n WHERE n.instance_id = u.id OFFSET 0) AS n;
END $$;

-- Write back the nodes the engine changed, in one statement.
CREATE FUNCTION df._nodes_update_many(p_instance_ids text[], p_ids text[], p_statuses text[],
                                      p_results text[], p_errors text[],
                                      p_activations bigint[], p_details jsonb[])
RETURNS void
LANGUAGE plpgsql VOLATILE AS $$
BEGIN
    UPDATE df.nodes n
    SET status = u.status, result_text = u.result_text, result = u.result_text::jsonb,
        error = u.error, activation = u.activation, status_details = u.details,
        updated_at = now()
    FROM unnest(p_instance_ids, p_ids, p_statuses, p_results, p_errors, p_activations,
                p_details) AS u(instance_id, id, status, result_text, error, activation, details)
    WHERE n.instance_id = u.instance_id AND n.id = u.id;
END $$;

-- Write back the instances the engine changed, in one statement. finished_at is set exactly
-- when an instance finishes (0019's index of unfinished instances depends on it).
CREATE FUNCTION df._instances_update_many(p_ids text[], p_statuses text[], p_names jsonb[],
                                          p_inboxes jsonb[], p_execution_counts integer[],
                                          p_seqs bigint[], p_waiters jsonb[])
RETURNS void
LANGUAGE plpgsql VOLATILE AS $$
BEGIN
    UPDATE df.instances i
    SET status = u.status, names = u.names, inbox = u.inbox,
        execution_count = u.execution_count, seq = u.seq, waiters = u.waiters,
        updated_at = now(),
        completed_at = CASE WHEN u.status = 'completed' THEN coalesce(i.completed_at, now())
                            ELSE i.completed_at END,
        finished_at = CASE WHEN u.status IN ('completed', 'failed', 'cancelled')
                           THEN coalesce(i.finished_at, now()) END
    FROM unnest(p_ids, p_statuses, p_names, p_inboxes, p_execution_counts, p_seqs, p_waiters)
         AS u(id, status, names, inbox, execution_count, seq, waiters)
    WHERE i.id = u.id;
END $$;

-- Forget queued tasks and timers nobody waits for any more (node id NULL: the whole
-- instance). Tasks an executor holds right now are skipped: their late answers are fenced.
CREATE FUNCTION df._work_drop_many(p_instance_ids text[], p_node_ids text[])
RETURNS void
LANGUAGE plpgsql VOLATILE AS $$
BEGIN
    WITH d AS (
        SELECT * FROM unnest(p_instance_ids, p_node_ids) AS d(instance_id, node_id)
    ),
    tasks AS (
        DELETE FROM df.tasks t
        WHERE t.id IN (SELECT t2.id FROM df.tasks t2 JOIN d ON t2.instance_id = d.instance_id
                       AND (d.node_id IS NULL OR t2.node_id = d.node_id)
                       FOR UPDATE OF t2 SKIP LOCKED)
    )
    DELETE FROM df.timers tm
    USING d
    WHERE tm.instance_id = d.instance_id AND (d.node_id IS NULL OR tm.node_id = d.node_id);
END $$;

-- Queue steps; database and role come from the instance so a task is self-contained.
CREATE FUNCTION df._tasks_insert_many(p_instance_ids text[], p_node_ids text[],
                                      p_activations bigint[], p_shards integer[],
                                      p_kinds text[], p_payloads json[])
RETURNS void
LANGUAGE plpgsql VOLATILE AS $$
BEGIN
    INSERT INTO df.tasks (instance_id, node_id, activation, shard, kind, database,
                          submitted_by, payload)
    SELECT u.instance_id, u.node_id, u.activation, u.shard, u.kind, i.database, i.submitted_by,
           u.payload
    FROM unnest(p_instance_ids, p_node_ids, p_activations, p_shards, p_kinds, p_payloads)
         AS u(instance_id, node_id, activation, shard, kind, payload)
    JOIN df.instances i ON i.id = u.instance_id;
END $$;

-- Remove finished tasks and post their outcomes to the instances' mailboxes: one statement,
-- committed with the steps themselves.
CREATE FUNCTION df._tasks_complete_many(p_task_ids bigint[], p_instance_ids text[],
                                        p_node_ids text[], p_activations bigint[],
                                        p_payloads text[])
RETURNS void
LANGUAGE plpgsql VOLATILE AS $$
BEGIN
    WITH done AS (
        DELETE FROM df.tasks WHERE id = ANY(p_task_ids)
    )
    INSERT INTO df.mailbox (instance_id, kind, node_id, activation, payload)
    SELECT u.instance_id, 'step', u.node_id, u.activation, u.payload
    FROM unnest(p_instance_ids, p_node_ids, p_activations, p_payloads)
         AS u(instance_id, node_id, activation, payload);
END $$;

DO $$
DECLARE
    f regprocedure;
    v_altered integer := 0;
BEGIN
    FOR f IN
        SELECT p.oid::regprocedure FROM pg_catalog.pg_proc p
        WHERE p.pronamespace = 'df'::regnamespace
          AND p.proname IN ('_tasks_claim', '_instances_lock_quiet', '_nodes_load_many',
                            '_nodes_update_many', '_instances_update_many', '_work_drop_many',
                            '_tasks_insert_many', '_tasks_complete_many')
    LOOP
        EXECUTE format('ALTER FUNCTION %s SET search_path = pg_catalog, pg_temp'
                       ' SET enable_seqscan = off SET enable_hashjoin = off'
                       ' SET enable_mergejoin = off SET plan_cache_mode = force_generic_plan',
                       f);
        v_altered := v_altered + 1;
    END LOOP;
    IF v_altered <> 8 THEN
        RAISE EXCEPTION 'expected 8 functions to plan as key look-ups, found %', v_altered;
    END IF;
END $$;

-- The runtime's alone, never granted: 0018's list and the functions above.
CREATE OR REPLACE FUNCTION df._internal_functions() RETURNS text[]
LANGUAGE sql IMMUTABLE AS $$
    SELECT ARRAY['_command_start', '_command_signal', '_command_cancel', '_start_new',
                 '_check_submitter', '_visible_instance', '_loopback_conninfo',
                 '_grant_usage_0003', '_revoke_usage_0003', '_install_step_function',
                 '_drop_step_function', '_step_function_name', '_command_limits',
                 '_unfinished_instances', '_doorbell', '_graph_template', '_store_template',
                 '_node_id', '_seal', '_start_template', '_claim_with_mail', '_as_trusted',
                 '_after_step', '_seal_with', '_tasks_claim', '_instances_lock_quiet',
                 '_nodes_load_many', '_nodes_update_many', '_instances_update_many',
                 '_work_drop_many', '_tasks_insert_many', '_tasks_complete_many']
$$;

REVOKE ALL ON ALL FUNCTIONS IN SCHEMA df FROM PUBLIC;
