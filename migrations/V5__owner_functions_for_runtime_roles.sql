SET LOCAL search_path = pg_catalog, pg_temp;

-- Runtime roles reach what they must change only through functions the schema's owner owns
-- (docs/security.md, section 4.3). Before this migration a listener held DELETE on the log
-- and INSERT and UPDATE on updatepipe.pruned: enough to LOCK TABLE updatepipe.log (every
-- durable push then waits) and to pin a far-future mark (a LogPruned resync on every read,
-- for good). A pusher whose retry met a row at its own number took it for its own.
--
-- Every name below is qualified, and the whole migration runs with a search path nobody
-- else can put objects in (the line above): a role that may create in `public` cannot
-- make it run its code.

-- When each channel's log was last pruned (status and metrics show it).
ALTER TABLE updatepipe.pruned ADD COLUMN last_pruned_at timestamptz;

-- Prunes one channel's entries older than the retention, when no other session is pruning
-- that channel (a row lock only these functions can take: locking a row needs UPDATE on
-- the table, which no runtime role has), and records how far it pruned. Returns whether it
-- held the lock, and how many entries it removed.
CREATE FUNCTION updatepipe.prune(p_channel text, p_retention_secs double precision)
    RETURNS TABLE (locked boolean, deleted bigint)
    LANGUAGE plpgsql
    VOLATILE
    SECURITY DEFINER
    SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    cutoff timestamptz;
    newest xid8;
BEGIN
    IF p_channel IS NULL OR p_retention_secs IS NULL
       OR NOT (p_retention_secs OPERATOR(pg_catalog.>=) 0::pg_catalog.float8)
       OR p_retention_secs OPERATOR(pg_catalog.=) 'Infinity'::pg_catalog.float8 THEN
        RAISE EXCEPTION 'updatepipe.prune: a retention of % seconds is not a duration',
            p_retention_secs
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    -- Past a century nothing is old enough (and the interval stays in range).
    IF p_retention_secs OPERATOR(pg_catalog.>) 3.0e9::pg_catalog.float8 THEN
        cutoff := '-infinity'::pg_catalog.timestamptz;
    ELSE
        cutoff := pg_catalog.now() OPERATOR(pg_catalog.-)
                  pg_catalog.make_interval(secs => p_retention_secs);
    END IF;
    INSERT INTO updatepipe.pruned (channel, pruned_before)
    VALUES (p_channel, '-infinity'::pg_catalog.timestamptz)
    ON CONFLICT (channel) DO NOTHING;
    PERFORM 1 FROM updatepipe.pruned p
    WHERE p.channel OPERATOR(pg_catalog.=) p_channel
    FOR UPDATE SKIP LOCKED;
    IF NOT FOUND THEN
        locked := false;
        deleted := 0;
        RETURN NEXT;
        RETURN;
    END IF;
    WITH gone AS (
        DELETE FROM updatepipe.log l
        WHERE l.channel OPERATOR(pg_catalog.=) p_channel
          AND l.created_at OPERATOR(pg_catalog.<) cutoff
        RETURNING l.xid)
    SELECT pg_catalog.count(*),
           (SELECT g.xid FROM gone g ORDER BY g.xid DESC LIMIT 1)
    INTO deleted, newest
    FROM gone;
    UPDATE updatepipe.pruned p SET
        last_pruned_at = pg_catalog.now(),
        pruned_before = CASE WHEN deleted OPERATOR(pg_catalog.>) 0
                             THEN greatest(p.pruned_before, cutoff)
                             ELSE p.pruned_before END,
        pruned_xid = CASE WHEN deleted OPERATOR(pg_catalog.>) 0
                          THEN greatest(p.pruned_xid, newest)
                          ELSE p.pruned_xid END
    WHERE p.channel OPERATOR(pg_catalog.=) p_channel;
    locked := true;
    RETURN NEXT;
END
$$;

-- How many of a sender's envelopes (by number) the log holds byte for byte, and how many
-- numbers it holds with another payload. A durable push whose first try's fate is unknown
-- (its connection broke) is sent again; if the retry meets a row at one of its numbers,
-- this tells whether that row is its own first try (then it was committed) or another
-- role's squatting on the number (then nothing of the push was, and it fails).
CREATE FUNCTION updatepipe.logged(p_channel text, p_origin text, p_seqs bigint[],
                                  p_payloads text[])
    RETURNS TABLE (same bigint, other bigint)
    LANGUAGE sql
    STABLE
    SECURITY DEFINER
    SET search_path = pg_catalog, pg_temp
AS $$
    SELECT pg_catalog.count(*) FILTER (WHERE l.payload OPERATOR(pg_catalog.=) t.p),
           pg_catalog.count(*) FILTER (WHERE l.payload OPERATOR(pg_catalog.<>) t.p)
    FROM ROWS FROM (pg_catalog.unnest(p_seqs), pg_catalog.unnest(p_payloads)) AS t(s, p)
    JOIN updatepipe.log l
      ON l.channel OPERATOR(pg_catalog.=) p_channel
     AND l.origin OPERATOR(pg_catalog.=) p_origin
     AND l.seq OPERATOR(pg_catalog.=) t.s
$$;

-- A function may be run by every role unless revoked: these only by the roles `updatepipe
-- grant` names (prune: listeners; logged: pushers).
REVOKE ALL ON FUNCTION updatepipe.prune(text, double precision) FROM PUBLIC;
REVOKE ALL ON FUNCTION updatepipe.logged(text, text, bigint[], text[]) FROM PUBLIC;

-- What runtime roles may no longer do themselves: change the log other than by inserting,
-- or write the pruning marks. Taken back from every role the owner granted it to
-- (`updatepipe grant --listener` gave DELETE on the log and INSERT, UPDATE on the marks).
DO $$
DECLARE
    r record;
BEGIN
    FOR r IN
        SELECT DISTINCT c.relname::text AS rel, a.grantee
        FROM pg_catalog.pg_class c
        CROSS JOIN LATERAL pg_catalog.aclexplode(c.relacl) a
        WHERE c.relnamespace OPERATOR(pg_catalog.=) 'updatepipe'::pg_catalog.regnamespace
          AND a.grantee OPERATOR(pg_catalog.<>) c.relowner
          AND ((c.relname OPERATOR(pg_catalog.=) 'log'
                AND a.privilege_type OPERATOR(pg_catalog.=)
                    ANY ('{UPDATE,DELETE,TRUNCATE}'::pg_catalog.text[]))
               OR (c.relname OPERATOR(pg_catalog.=) 'pruned'
                   AND a.privilege_type OPERATOR(pg_catalog.=)
                       ANY ('{INSERT,UPDATE,DELETE,TRUNCATE}'::pg_catalog.text[])))
    LOOP
        EXECUTE pg_catalog.format(
            'REVOKE %s ON updatepipe.%I FROM %s',
            CASE WHEN r.rel OPERATOR(pg_catalog.=) 'log'
                 THEN 'UPDATE, DELETE, TRUNCATE'
                 ELSE 'INSERT, UPDATE, DELETE, TRUNCATE' END,
            r.rel,
            CASE WHEN r.grantee OPERATOR(pg_catalog.=) 0::pg_catalog.oid THEN 'PUBLIC'
                 ELSE pg_catalog.quote_ident(pg_catalog.pg_get_userbyid(r.grantee)::pg_catalog.text)
            END);
    END LOOP;
END
$$;
