-- 0001_schema: the df schema's tables.
--
-- Users see df.instances, df.nodes, df.vars and df.commands (under row-level security);
-- df.mailbox, df.tasks, df.timers and df.workers belong to the runtime alone.
-- Nothing is granted to PUBLIC: df.grant_usage() grants what a role needs.

CREATE SCHEMA IF NOT EXISTS df;
REVOKE ALL ON SCHEMA df FROM PUBLIC;
-- Functions default to EXECUTE for PUBLIC; not in this schema. Every later migration that
-- creates functions also ends with an explicit REVOKE, in case another role runs it.
ALTER DEFAULT PRIVILEGES IN SCHEMA df REVOKE EXECUTE ON FUNCTIONS FROM PUBLIC;

-- The calling role as regrole, correct for quoted and mixed-case role names.
CREATE FUNCTION df._current_role() RETURNS regrole
LANGUAGE sql STABLE AS $$ SELECT oid::regrole FROM pg_catalog.pg_roles WHERE rolname = current_user $$;

-- May role p_viewer see instances submitted by p_owner? Its own; all for superusers and for
-- members of the schema owner (the runtime). Row-level security policies use the same rule.
CREATE FUNCTION df._role_sees(p_viewer regrole, p_owner regrole) RETURNS boolean
LANGUAGE sql STABLE AS $$
    SELECT p_owner = p_viewer
        OR (SELECT rolsuper FROM pg_catalog.pg_roles WHERE oid = p_viewer)
        OR pg_catalog.pg_has_role(p_viewer,
               (SELECT nspowner FROM pg_catalog.pg_namespace WHERE nspname = 'df'), 'MEMBER')
$$;

-- May the current role see them? Note: inside a SECURITY DEFINER function current_user is
-- the owner, so such functions must use _role_sees with an identity they have verified.
CREATE FUNCTION df._sees(p_owner regrole) RETURNS boolean
LANGUAGE sql STABLE AS $$ SELECT df._role_sees(df._current_role(), p_owner) $$;

-- SQL-visible policy that an administrator edits (SPEC §11). Runtime-only settings
-- (pool sizes, poll intervals) come from flags and DURABLE_ACTOR_* instead.
CREATE TABLE df.settings (
    name        text PRIMARY KEY,
    value       text NOT NULL,
    description text NOT NULL
);
INSERT INTO df.settings (name, value, description) VALUES
    ('enable_superuser_instances', 'false', 'allow superusers to start workflows'),
    ('allow_nologin_instances', 'false', 'allow roles without LOGIN to start workflows'),
    ('list_instances_max_limit', '1000', 'largest limit_count accepted by df.list_instances'),
    ('max_nesting_depth', '256', 'deepest graph df.start accepts (root = depth 0)'),
    ('max_node_count', '10000', 'largest graph df.start accepts, in nodes'),
    ('retention_days', '7', 'days a finished instance is kept');

CREATE FUNCTION df._setting(p_name text) RETURNS text
LANGUAGE sql STABLE AS $$ SELECT value FROM df.settings WHERE name = p_name $$;

CREATE TABLE df.instances (
    id              text PRIMARY KEY CHECK (id ~ '^[0-9a-f]{8}$'),
    label           text,
    root_node       text NOT NULL,
    status          text NOT NULL DEFAULT 'pending'
                    CHECK (status IN ('pending', 'running', 'completed', 'failed', 'cancelled')),
    submitted_by    regrole NOT NULL DEFAULT df._current_role(),
    database        text,
    created_at      timestamptz NOT NULL DEFAULT now(),
    updated_at      timestamptz NOT NULL DEFAULT now(),
    completed_at    timestamptz,
    -- runtime columns
    parent_id       text REFERENCES df.instances (id) ON DELETE CASCADE,
    parent_node     text,
    transaction_mode text NOT NULL DEFAULT 'caller',
    vars            jsonb NOT NULL DEFAULT '{}',
    names           jsonb NOT NULL DEFAULT '{}',
    execution_count integer NOT NULL DEFAULT 1,
    inbox           jsonb NOT NULL DEFAULT '[]',   -- signals received before their wait
    seq             bigint NOT NULL DEFAULT 0,     -- last node activation issued
    finished_at     timestamptz
);
CREATE INDEX instances_created_at ON df.instances (created_at DESC, id);
CREATE INDEX instances_parent ON df.instances (parent_id) WHERE parent_id IS NOT NULL;
CREATE INDEX instances_finished ON df.instances (finished_at) WHERE finished_at IS NOT NULL;
CREATE INDEX instances_submitted_by ON df.instances (submitted_by, created_at DESC);

-- One row per graph node. instance_id is the instance (actor) that owns the node now: all of a
-- graph starts with its root instance; a branch run as a child instance moves to the child.
CREATE TABLE df.nodes (
    id              text NOT NULL CHECK (id ~ '^[0-9a-f]{8}$'),
    instance_id     text NOT NULL REFERENCES df.instances (id) ON DELETE CASCADE,
    node_type       text NOT NULL,
    query           text,
    result_name     text,
    left_node       text,
    right_node      text,
    status          text NOT NULL DEFAULT 'pending'
                    CHECK (status IN ('pending', 'running', 'completed', 'failed')),
    result          jsonb,
    error           text,
    submitted_by    regrole NOT NULL,
    database        text,
    created_at      timestamptz NOT NULL DEFAULT now(),
    updated_at      timestamptz NOT NULL DEFAULT now(),
    status_details  jsonb,
    -- runtime columns
    parent_node     text,
    position        integer NOT NULL DEFAULT 0,   -- pre-order index in the graph
    activation      bigint NOT NULL DEFAULT 0,    -- fencing token of the node's current run
    result_text     text,   -- the result as produced (jsonb reorders object keys; $name needs
                            -- the first column of the first row in select-list order)
    PRIMARY KEY (instance_id, id)
) WITH (fillfactor = 80);

CREATE TABLE df.vars (
    owner   regrole NOT NULL DEFAULT df._current_role(),
    name    text NOT NULL,
    value   text,
    PRIMARY KEY (owner, name)
);

-- The entry point for writers: df.start/df.signal/df.cancel insert here, and so may users by
-- hand. A BEFORE INSERT trigger (0003) validates the row and turns it into instance rows and
-- mailbox messages in the same transaction; the row stays as a record of who asked for what.
CREATE TABLE df.commands (
    id               bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    command          text NOT NULL,
    instance_id      text,
    graph            text,
    label            text,
    database         text,
    transaction_mode text,
    signal_name      text,
    payload          text,
    reason           text,
    submitted_by     regrole NOT NULL DEFAULT df._current_role(),
    created_at       timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX commands_instance ON df.commands (instance_id);

-- Messages to instance actors. Consumed (deleted) by the dispatcher in the transaction that
-- applies them.
CREATE TABLE df.mailbox (
    id          bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    instance_id text NOT NULL,
    kind        text NOT NULL,
    node_id     text,
    activation  bigint,
    payload     text,          -- JSON text: results keep their key order
    created_at  timestamptz NOT NULL DEFAULT now()
) WITH (fillfactor = 70, autovacuum_vacuum_scale_factor = 0.01, autovacuum_vacuum_threshold = 200);
CREATE INDEX mailbox_instance ON df.mailbox (instance_id, id);

-- Steps waiting for an executor. A row is claimed with FOR UPDATE SKIP LOCKED; for steps
-- that commit with the claim (SQL in the instance's own database) the row lock is the fence.
-- At-least-once steps take a lease (lease_until, lease_token) committed before they run.
CREATE TABLE df.tasks (
    id           bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    instance_id  text NOT NULL,
    node_id      text NOT NULL,
    activation   bigint NOT NULL,
    shard        integer NOT NULL,
    kind         text NOT NULL,
    database     text,
    submitted_by regrole NOT NULL,
    payload      jsonb NOT NULL,
    attempt      integer NOT NULL DEFAULT 1,
    lease_until  timestamptz,
    lease_token  bigint NOT NULL DEFAULT 0,
    leased_by    text,
    backend_pid  integer,
    created_at   timestamptz NOT NULL DEFAULT now()
) WITH (fillfactor = 70, autovacuum_vacuum_scale_factor = 0.01, autovacuum_vacuum_threshold = 200);
CREATE INDEX tasks_shard ON df.tasks (shard, id);
CREATE INDEX tasks_instance ON df.tasks (instance_id);

CREATE TABLE df.timers (
    id          bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    instance_id text NOT NULL,
    node_id     text,
    activation  bigint,
    kind        text NOT NULL,
    due_at      timestamptz NOT NULL,
    payload     jsonb
) WITH (fillfactor = 70);
CREATE INDEX timers_due ON df.timers (due_at);
CREATE INDEX timers_instance ON df.timers (instance_id);

-- Live runtime processes, refreshed by heartbeats.
CREATE TABLE df.workers (
    id            text PRIMARY KEY,
    host          text NOT NULL,
    pid           integer NOT NULL,
    role          text NOT NULL,
    started_at    timestamptz NOT NULL DEFAULT now(),
    last_seen_at  timestamptz NOT NULL DEFAULT now()
);

REVOKE ALL ON ALL FUNCTIONS IN SCHEMA df FROM PUBLIC;
