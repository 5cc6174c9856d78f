SET LOCAL search_path = pg_catalog, pg_temp;

-- Named durable consumers (docs/delivery.md, "Positions and named consumers"): each keeps
-- its position in the log here, advanced by acknowledgements, so that a restarted process
-- resumes where it was acknowledged. Pruning keeps what a consumer has not acknowledged,
-- up to a limit of age. Runtime roles write here only through updatepipe.consumer_ack (a
-- function of the schema's owner), which stamps the time itself and never moves a
-- consumer back.
CREATE TABLE updatepipe.consumers (
    channel     text        NOT NULL,
    name        text        NOT NULL,
    -- The position's text form (src/log/position.rs), and its step in the consumer's
    -- stream: an acknowledgement only ever moves a consumer forward.
    position    text        NOT NULL,
    step        bigint      NOT NULL,
    -- What the consumer has had: the rows visible in this snapshot (its settled cursor's)
    -- with an id up to max_id. Pruning keeps the others (see prune below).
    holds       pg_snapshot NOT NULL,
    -- The highest log id it is past (entries above it it has not had), and when its
    -- settled cursor was read (its lag).
    max_id      bigint      NOT NULL,
    read_at     timestamptz NOT NULL,
    acked_at    timestamptz NOT NULL,
    acked_by    text        NOT NULL,
    -- Raised by every session that starts reading as the consumer (it holds the
    -- consumer's advisory lock then); acknowledgements carry the value their session was
    -- given, so that a process that lost the consumer to another cannot write over it.
    epoch       bigint      NOT NULL DEFAULT 0,
    created_at  timestamptz NOT NULL DEFAULT pg_catalog.now(),
    PRIMARY KEY (channel, name),
    CHECK (pg_catalog.octet_length(name) OPERATOR(pg_catalog.>=) 1
           AND pg_catalog.octet_length(name) OPERATOR(pg_catalog.<=) 63),
    CHECK (pg_catalog.octet_length(position) OPERATOR(pg_catalog.<=) 1048576)
);

-- Records that the consumer `p_name` of `p_channel` acknowledged everything up to this
-- position; a position of a lower or equal step than the one stored changes nothing (an
-- acknowledgement late or repeated), and neither does one from a session older than the
-- consumer's epoch (one that lost the consumer to another). Returns whether it moved.
CREATE FUNCTION updatepipe.consumer_ack(p_channel text, p_name text, p_position text,
                                        p_step bigint, p_holds text, p_max_id bigint,
                                        p_read_at double precision, p_epoch bigint)
    RETURNS boolean
    LANGUAGE plpgsql
    VOLATILE
    SECURITY DEFINER
    SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    holds pg_snapshot;
BEGIN
    IF p_channel IS NULL OR p_name IS NULL OR p_position IS NULL OR p_step IS NULL
       OR p_holds IS NULL OR p_max_id IS NULL OR p_read_at IS NULL OR p_epoch IS NULL
       OR NOT (p_read_at OPERATOR(pg_catalog.>=) 0::pg_catalog.float8)
       OR p_read_at OPERATOR(pg_catalog.=) ANY ('{Infinity,NaN}'::pg_catalog.float8[]) THEN
        RAISE EXCEPTION 'updatepipe.consumer_ack: every argument is needed, and a time'
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    holds := p_holds::pg_catalog.pg_snapshot;
    -- Not a snapshot of transactions to come: that would hold nothing back and say the
    -- consumer is ahead of the server.
    IF pg_catalog.pg_snapshot_xmax(holds) OPERATOR(pg_catalog.>)
       pg_catalog.pg_snapshot_xmax(pg_catalog.pg_current_snapshot()) THEN
        RAISE EXCEPTION 'updatepipe.consumer_ack: snapshot % is ahead of the server', holds
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    INSERT INTO updatepipe.consumers AS c
        (channel, name, position, step, holds, max_id, read_at, acked_at, acked_by,
         epoch)
    VALUES (p_channel, p_name, p_position, p_step, holds, p_max_id,
            -- Never ahead of the server's clock.
            least(pg_catalog.to_timestamp(p_read_at), pg_catalog.now()),
            pg_catalog.now(), session_user::pg_catalog.text, p_epoch)
    ON CONFLICT (channel, name) DO UPDATE SET
        position = EXCLUDED.position,
        step = EXCLUDED.step,
        holds = EXCLUDED.holds,
        max_id = EXCLUDED.max_id,
        read_at = EXCLUDED.read_at,
        acked_at = EXCLUDED.acked_at,
        acked_by = EXCLUDED.acked_by
    WHERE c.step OPERATOR(pg_catalog.<) EXCLUDED.step
      AND c.epoch OPERATOR(pg_catalog.=) p_epoch;
    RETURN FOUND;
END
$$;

-- Puts a consumer at a position, whatever its step: a consumer started again from a
-- point the application chose (`since`), or from the present after the server's
-- history moved.
CREATE FUNCTION updatepipe.consumer_reset(p_channel text, p_name text, p_position text,
                                          p_step bigint, p_holds text, p_max_id bigint,
                                          p_read_at double precision)
    RETURNS void
    LANGUAGE plpgsql
    VOLATILE
    SECURITY DEFINER
    SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    current bigint;
BEGIN
    SELECT c.epoch INTO current FROM updatepipe.consumers c
    WHERE c.channel OPERATOR(pg_catalog.=) p_channel
      AND c.name OPERATOR(pg_catalog.=) p_name
    FOR UPDATE;
    DELETE FROM updatepipe.consumers c
    WHERE c.channel OPERATOR(pg_catalog.=) p_channel
      AND c.name OPERATOR(pg_catalog.=) p_name;
    PERFORM updatepipe.consumer_ack(p_channel, p_name, p_position, p_step, p_holds,
                                    p_max_id, p_read_at, coalesce(current, 0));
END
$$;

-- A session starts reading as the consumer (holding its advisory lock): the consumer's
-- epoch goes up by one, and the new value is what that session's acknowledgements carry.
-- Returns it (0 for a consumer with no row yet).
CREATE FUNCTION updatepipe.consumer_claim(p_channel text, p_name text)
    RETURNS bigint
    LANGUAGE sql
    VOLATILE
    SECURITY DEFINER
    SET search_path = pg_catalog, pg_temp
AS $$
    WITH claimed AS (
        UPDATE updatepipe.consumers c SET epoch = c.epoch OPERATOR(pg_catalog.+) 1
        WHERE c.channel OPERATOR(pg_catalog.=) p_channel
          AND c.name OPERATOR(pg_catalog.=) p_name
        RETURNING c.epoch)
    SELECT coalesce((SELECT claimed.epoch FROM claimed), 0::pg_catalog.int8)
$$;

-- Pruning keeps what named consumers have not acknowledged, as long as it is younger than
-- p_hold_secs: rows older than the retention go, except those a consumer has not had yet
-- (not visible in its snapshot, or above its highest id: what its next read would
-- return), unless older than the hold. A consumer that falls further behind than the hold
-- finds rows gone, and is told so (LogPruned), as a listener away longer than the
-- retention is.
--
-- The marks: pruned_xid, the newest transaction removed (a reader whose snapshot had not
-- seen it may have missed rows); pruned_before, the newest time removed (a reader that
-- read before it surely missed rows). Both only grow.
CREATE FUNCTION updatepipe.prune(p_channel text, p_retention_secs double precision,
                                 p_hold_secs double precision)
    RETURNS TABLE (locked boolean, deleted bigint)
    LANGUAGE plpgsql
    VOLATILE
    SECURITY DEFINER
    SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    cutoff timestamptz;
    hard timestamptz;
    newest xid8;
    newest_at timestamptz;
BEGIN
    IF p_channel IS NULL OR p_retention_secs IS NULL OR p_hold_secs IS NULL
       OR NOT (p_retention_secs OPERATOR(pg_catalog.>=) 0::pg_catalog.float8)
       OR NOT (p_hold_secs OPERATOR(pg_catalog.>=) 0::pg_catalog.float8)
       OR p_retention_secs OPERATOR(pg_catalog.=) ANY ('{Infinity,NaN}'::pg_catalog.float8[])
       OR p_hold_secs OPERATOR(pg_catalog.=) ANY ('{Infinity,NaN}'::pg_catalog.float8[]) THEN
        RAISE EXCEPTION 'updatepipe.prune: a retention of % or a hold of % seconds is not a duration',
            p_retention_secs, p_hold_secs
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    -- Past a century nothing is old enough (and the interval stays in range).
    IF p_retention_secs OPERATOR(pg_catalog.>) 3.0e9::pg_catalog.float8 THEN
        cutoff := '-infinity'::pg_catalog.timestamptz;
    ELSE
        cutoff := pg_catalog.now() OPERATOR(pg_catalog.-)
                  pg_catalog.make_interval(secs => p_retention_secs);
    END IF;
    IF p_hold_secs OPERATOR(pg_catalog.>) 3.0e9::pg_catalog.float8 THEN
        hard := '-infinity'::pg_catalog.timestamptz;
    ELSE
        hard := least(cutoff, pg_catalog.now() OPERATOR(pg_catalog.-)
                              pg_catalog.make_interval(secs => p_hold_secs));
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
          AND (l.created_at OPERATOR(pg_catalog.<) hard
               OR NOT EXISTS (
                   SELECT 1 FROM updatepipe.consumers c
                   WHERE c.channel OPERATOR(pg_catalog.=) p_channel
                     AND (NOT pg_catalog.pg_visible_in_snapshot(l.xid, c.holds)
                          OR l.id OPERATOR(pg_catalog.>) c.max_id)))
        RETURNING l.xid, l.created_at)
    SELECT pg_catalog.count(*),
           (SELECT g.xid FROM gone g ORDER BY g.xid DESC LIMIT 1),
           pg_catalog.max(gone.created_at)
    INTO deleted, newest, newest_at
    FROM gone;
    UPDATE updatepipe.pruned p SET
        last_pruned_at = pg_catalog.now(),
        pruned_before = CASE WHEN deleted OPERATOR(pg_catalog.>) 0
                             THEN greatest(p.pruned_before, newest_at)
                             ELSE p.pruned_before END,
        pruned_xid = CASE WHEN deleted OPERATOR(pg_catalog.>) 0
                          THEN greatest(p.pruned_xid, newest)
                          ELSE p.pruned_xid END
    WHERE p.channel OPERATOR(pg_catalog.=) p_channel;
    locked := true;
    RETURN NEXT;
END
$$;

-- The two-argument form, which listeners of earlier releases call, keeps consumers' rows
-- for a week.
CREATE OR REPLACE FUNCTION updatepipe.prune(p_channel text, p_retention_secs double precision)
    RETURNS TABLE (locked boolean, deleted bigint)
    LANGUAGE sql
    VOLATILE
    SECURITY DEFINER
    SET search_path = pg_catalog, pg_temp
AS $$
    SELECT p.locked, p.deleted
    FROM updatepipe.prune(p_channel, p_retention_secs, 604800::pg_catalog.float8) AS p
$$;

REVOKE ALL ON FUNCTION updatepipe.consumer_ack(text, text, text, bigint, text, bigint,
                                               double precision, bigint) FROM PUBLIC;
REVOKE ALL ON FUNCTION updatepipe.consumer_claim(text, text) FROM PUBLIC;
REVOKE ALL ON FUNCTION updatepipe.consumer_reset(text, text, text, bigint, text, bigint,
                                                 double precision) FROM PUBLIC;
REVOKE ALL ON FUNCTION updatepipe.prune(text, double precision, double precision) FROM PUBLIC;

-- Listeners granted before this migration may prune with the new form too, and keep
-- their consumers' positions.
DO $$
DECLARE
    r record;
BEGIN
    FOR r IN
        SELECT DISTINCT a.grantee
        FROM pg_catalog.pg_proc f
        CROSS JOIN LATERAL pg_catalog.aclexplode(f.proacl) a
        WHERE f.pronamespace OPERATOR(pg_catalog.=) 'updatepipe'::pg_catalog.regnamespace
          AND f.proname OPERATOR(pg_catalog.=) 'prune'
          AND f.pronargs OPERATOR(pg_catalog.=) 2
          AND a.grantee OPERATOR(pg_catalog.<>) f.proowner
          AND a.grantee OPERATOR(pg_catalog.<>) 0::pg_catalog.oid
          AND a.privilege_type OPERATOR(pg_catalog.=) 'EXECUTE'
    LOOP
        EXECUTE pg_catalog.format(
            'GRANT EXECUTE ON FUNCTION updatepipe.prune(text, double precision, '
            'double precision), updatepipe.consumer_ack(text, text, text, bigint, text, '
            'bigint, double precision, bigint), updatepipe.consumer_reset(text, text, text, '
            'bigint, text, bigint, double precision), updatepipe.consumer_claim(text, text) '
            'TO %I; GRANT SELECT ON updatepipe.consumers TO %I',
            pg_catalog.pg_get_userbyid(r.grantee), pg_catalog.pg_get_userbyid(r.grantee));
    END LOOP;
END
$$;
