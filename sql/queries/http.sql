-- name: http_policy_get
-- What an HTTP step needs from the database before it calls out: the operator's allow-list
-- and size cap, and whether the submitting role may still call the DSL function (re-checked
-- at run time, SPEC §9). may_call is NULL when the role no longer exists.
SELECT coalesce(df._setting('http_allowed_hosts'), '') AS allowed_hosts,
       df._setting('http_max_response_bytes') AS max_response_bytes,
       (SELECT coalesce(has_function_privilege(r.oid, to_regprocedure(%(function)s::text),
                                               'EXECUTE'), false)
        FROM pg_catalog.pg_roles r WHERE r.rolname = %(role)s::text) AS may_call;
