-- 0016_keyed_claim: the claim plans as key look-ups in every session.
--
-- PL/pgSQL keeps a function's plans for the session, planned when it was first called. An
-- executor's session calls df._claim_with_mail with the session's planner settings (a step of
-- a user is planned with them too, so the executor cannot change them for the session). On a
-- fresh database its first claim saw tiny tables, and the plan it kept read every instance
-- (a sequential scan joined to the mail by a filter) at each claim for the rest of the
-- session, however much the table grew. Planned without sequential scans or hash and merge
-- joins (as the dispatcher's session, db.KEYED_PLANS), the claim looks each instance up by
-- its key.
ALTER FUNCTION df._claim_with_mail(integer, integer)
    SET enable_seqscan = off SET enable_hashjoin = off SET enable_mergejoin = off;
