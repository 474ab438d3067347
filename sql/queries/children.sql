-- name: children_clear
-- Children of earlier activations of these JOIN/RACE nodes (a loop ran the node before) and
-- their descendants go, with their queued work, so an eternal loop keeps a constant size.
-- Tasks an executor holds are skipped; the executor removes them when it completes.
WITH RECURSIVE old(id) AS (
    SELECT c.id
    FROM unnest(%(parents)s::text[], %(nodes)s::text[], %(activations)s::bigint[])
         AS u(parent, node, activation)
    JOIN df.instances c ON c.parent_id = u.parent AND c.parent_node = u.node
                       AND c.parent_activation < u.activation
    UNION ALL
    SELECT c.id FROM df.instances c JOIN old o ON c.parent_id = o.id
),
tasks AS (
    DELETE FROM df.tasks t
    WHERE t.id IN (SELECT t2.id FROM df.tasks t2 WHERE t2.instance_id IN (SELECT id FROM old)
                   FOR UPDATE OF t2 SKIP LOCKED)
),
timers AS (
    DELETE FROM df.timers WHERE instance_id IN (SELECT id FROM old)
),
mail AS (
    DELETE FROM df.mailbox WHERE instance_id IN (SELECT id FROM old)
)
DELETE FROM df.instances WHERE id IN (SELECT id FROM old);

-- name: children_taken_ids
-- Which of these fresh ids are in use already (8 hex digits do collide in large tables).
SELECT id FROM df.instances WHERE id = ANY(%(ids)s::text[]);

-- name: children_spawn
-- One child instance per branch: the parent's role, database, label and variables, the
-- names the branch imports, and a 'start' message.
WITH spawned AS (
    INSERT INTO df.instances (id, label, root_node, status, submitted_by, database, parent_id,
                              parent_node, parent_activation, branch_index, family_root,
                              transaction_mode, vars, names)
    SELECT u.id, p.label, u.root, 'pending', p.submitted_by, p.database, p.id, u.node,
           u.activation, u.idx, coalesce(p.family_root, p.id), p.transaction_mode, p.vars,
           u.names
    FROM unnest(%(ids)s::text[], %(parents)s::text[], %(nodes)s::text[],
                %(activations)s::bigint[], %(indexes)s::int[], %(roots)s::text[],
                %(names)s::jsonb[]) AS u(id, parent, node, activation, idx, root, names)
    JOIN df.instances p ON p.id = u.parent
    RETURNING id
)
INSERT INTO df.mailbox (instance_id, kind) SELECT id, 'start' FROM spawned;

-- name: children_copy_nodes
-- Each child gets a copy of its branch's nodes (same ids), pending. Only children that were
-- made: foreach_spawn makes none for a row its FOREACH dropped in the same write (a row
-- handed out and the FOREACH's failure decided in one round).
INSERT INTO df.nodes (id, instance_id, node_type, query, result_name, left_node, right_node,
                      status, submitted_by, database, parent_node, position, options)
WITH RECURSIVE branch(child, parent, id) AS (
    SELECT u.child, u.parent, u.root
    FROM unnest(%(ids)s::text[], %(parents)s::text[], %(roots)s::text[]) AS u(child, parent, root)
    WHERE EXISTS (SELECT 1 FROM df.instances c WHERE c.id = u.child)
    UNION ALL
    SELECT b.child, b.parent, n.id
    FROM branch b JOIN df.nodes n ON n.instance_id = b.parent AND n.parent_node = b.id
)
SELECT n.id, b.child, n.node_type, n.query, n.result_name, n.left_node, n.right_node,
       'pending', n.submitted_by, n.database, n.parent_node, n.position, n.options
FROM branch b JOIN df.nodes n ON n.instance_id = b.parent AND n.id = b.id;

-- name: children_cancel
-- Cancel the children of one activation of a node (node NULL: every child), with their
-- descendants; df._cancel_family also interrupts their running steps.
SELECT df._cancel_family(ARRAY(
           SELECT c.id FROM df.instances c
           WHERE c.parent_id = %(parent)s::text
             AND (%(node)s::text IS NULL
                  OR (c.parent_node = %(node)s::text
                      AND c.parent_activation = %(activation)s::bigint))
             AND c.status IN ('pending', 'running')),
       %(reason)s::text);

-- name: children_finish
-- A child ended: keep its result and exported names, and tell its parent, in the
-- transaction that ends it.
WITH kept AS (
    UPDATE df.instances i SET output = u.output, exports = u.exports
    FROM unnest(%(ids)s::text[], %(outputs)s::text[], %(exports)s::text[])
         AS u(id, output, exports)
    WHERE i.id = u.id
    RETURNING i.id, i.parent_id, i.parent_node, i.parent_activation
)
INSERT INTO df.mailbox (instance_id, kind, node_id, activation, payload)
SELECT k.parent_id, 'child', k.parent_node, k.parent_activation, u.payload
FROM kept k
JOIN unnest(%(ids)s::text[], %(payloads)s::text[]) AS u(id, payload) ON u.id = k.id;

-- name: children_collect
-- The outcome of every branch of these JOIN activations, in branch order.
SELECT c.parent_id, c.parent_node, c.parent_activation, c.branch_index, c.status, c.output,
       c.exports,
       (SELECT n.error FROM df.nodes n WHERE n.instance_id = c.id AND n.id = c.root_node)
           AS error
FROM unnest(%(parents)s::text[], %(nodes)s::text[], %(activations)s::bigint[])
     AS u(parent, node, activation)
JOIN df.instances c ON c.parent_id = u.parent AND c.parent_node = u.node
                   AND c.parent_activation = u.activation
ORDER BY c.parent_id, c.parent_node, c.branch_index;

-- name: foreach_spawn
-- One child per stored row: the body's copy comes from children_copy_nodes; the row becomes
-- the one-row result named after the FOREACH (`$doc.id`), beside the names it imports.
WITH spawned AS (
    INSERT INTO df.instances (id, label, root_node, status, submitted_by, database, parent_id,
                              parent_node, parent_activation, branch_index, family_root,
                              transaction_mode, vars, names)
    SELECT u.id, p.label, u.root, 'pending', p.submitted_by, p.database, p.id, u.node,
           u.activation, u.n - 1, coalesce(p.family_root, p.id), p.transaction_mode, p.vars,
           u.imports || jsonb_build_object(u.name, jsonb_build_object(
               'value', '{"rows":[' || r.row || '],"row_count":1}', 'imported', true))
    FROM unnest(%(ids)s::text[], %(parents)s::text[], %(nodes)s::text[],
                %(activations)s::bigint[], %(ns)s::bigint[], %(roots)s::text[],
                %(row_names)s::text[], %(imports)s::jsonb[])
         AS u(id, parent, node, activation, n, root, name, imports)
    JOIN df.instances p ON p.id = u.parent
    JOIN df.foreach_rows r ON r.instance_id = u.parent AND r.node_id = u.node
                          AND r.activation = u.activation AND r.n = u.n
    RETURNING id
)
INSERT INTO df.mailbox (instance_id, kind) SELECT id, 'start' FROM spawned;

-- name: foreach_drop_rows
DELETE FROM df.foreach_rows r
USING unnest(%(parents)s::text[], %(nodes)s::text[]) AS u(parent, node)
WHERE r.instance_id = u.parent AND r.node_id = u.node;
