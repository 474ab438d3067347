-- name: instances_claim_with_mail
-- Lock up to %(limit)s instances that have mail, take their mail and read their nodes
-- (df._claim_with_mail: the nodes with a snapshot taken after the locks), in one round trip:
-- everything the engine needs of them, as three JSON arrays (actors.claimed). SKIP LOCKED:
-- another process owns the rest for now; one actor runs in one place. Mail that arrives
-- after the claim stays for the next round, and so does mail younger than %(older_than)s
-- seconds (Dispatcher.work_once).
SELECT instances, mail, nodes
FROM df._claim_with_mail(%(limit)s::int, %(scan)s::int, %(older_than)s::float8 * interval '1 s');

-- name: nodes_load_many
-- The nodes of each instance, through the index whatever the statistics say
-- (df._nodes_load_many, migration 0020).
SELECT * FROM df._nodes_load_many(%(ids)s::text[]);

-- name: nodes_update_many
-- Write back the nodes the engine changed, in one statement (df._nodes_update_many).
SELECT df._nodes_update_many(%(instance_ids)s::text[], %(ids)s::text[], %(statuses)s::text[],
                             %(results)s::text[], %(errors)s::text[],
                             %(activations)s::bigint[], %(details)s::jsonb[]);

-- name: instances_update_many
-- Write back the instances the engine changed, in one statement (df._instances_update_many).
SELECT df._instances_update_many(%(ids)s::text[], %(statuses)s::text[], %(names)s::jsonb[],
                                 %(inboxes)s::jsonb[], %(execution_counts)s::int[],
                                 %(seqs)s::bigint[], %(waiters)s::jsonb[]);

-- name: mailbox_post_many
-- Messages between members of a family (signals handed over, waits announced).
INSERT INTO df.mailbox (instance_id, kind, node_id, activation, payload)
SELECT * FROM unnest(%(instance_ids)s::text[], %(kinds)s::text[], %(node_ids)s::text[],
                     %(activations)s::bigint[], %(payloads)s::text[]);

-- name: instances_lock_quiet
-- An executor carries these instances on where their steps just ran: lock those nobody else
-- runs right now and that have no mail waiting (df._instances_lock_quiet, migration 0020).
SELECT * FROM df._instances_lock_quiet(%(ids)s::text[]);

-- name: notify_each
-- One NOTIFY on %(channel)s per payload, in order, in one statement: df_done for the
-- instances a round finished, df_cancel for what it cancelled (a statement each cost a parse
-- and a plan per instance).
SELECT pg_catalog.pg_notify(%(channel)s::text, p) FROM unnest(%(payloads)s::text[]) AS u(p);
