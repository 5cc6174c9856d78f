-- A log row cannot lie about itself. Whatever an inserting role writes, the server sets the
-- row's transaction (xid), time (created_at) and position (id), and refuses rows larger than
-- any envelope the pipe writes. Without this, a role with INSERT on the log could write a
-- future xid (a row every tail read returns again), a far-future created_at (a row pruning
-- never removes) or, with OVERRIDING SYSTEM VALUE, the next identity values (every sender's
-- next durable push failing on the primary key). docs/security.md, section 4.3.
--
-- SECURITY DEFINER: nextval on the identity sequence needs a privilege the inserting role
-- does not have (and must not: it could setval). The function runs as the schema's owner,
-- with a search path that nobody else can put objects in.
CREATE FUNCTION updatepipe.log_row_stamp() RETURNS trigger
    LANGUAGE plpgsql
    SECURITY DEFINER
    SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    -- The pipe's logged-envelope bound is 1 MiB (MAX_LOGGED_ENVELOPE_LEN); 64 KiB of slack.
    IF octet_length(NEW.payload) > 1114112 THEN
        RAISE EXCEPTION 'updatepipe.log: a payload of % bytes is over the limit of 1114112',
            octet_length(NEW.payload)
            USING ERRCODE = 'program_limit_exceeded',
                  HINT = 'updatepipe writes envelopes of at most 1 MiB';
    END IF;
    -- A channel name has at most 63 bytes, an origin at most 64.
    IF octet_length(NEW.channel) > 63 OR octet_length(NEW.origin) > 64 THEN
        RAISE EXCEPTION
            'updatepipe.log: a channel of % or an origin of % bytes is over the limit (63, 64)',
            octet_length(NEW.channel), octet_length(NEW.origin)
            USING ERRCODE = 'program_limit_exceeded';
    END IF;
    -- The transaction id first, then the row's id (nextval assigns no transaction id):
    -- durable readers rely on every row's transaction having its id before the row has its
    -- own (see PAGE_SQL in src/log.rs).
    NEW.xid := pg_current_xact_id();
    NEW.id := nextval('updatepipe.log_id_seq'::regclass);
    NEW.created_at := now();
    RETURN NEW;
END
$$;

-- Per row, and a durable batch writes one row per envelope (many updates each), not per
-- update. CREATE TRIGGER locks the log against writes until this migration commits, so the
-- clean-up below sees every row there is.
CREATE TRIGGER log_row_stamp BEFORE INSERT ON updatepipe.log
    FOR EACH ROW EXECUTE FUNCTION updatepipe.log_row_stamp();

-- Rows written before this migration that lie already: a transaction id no transaction has
-- had yet, an id the sequence never handed out, a time more than a day ahead, or a payload
-- no pipe writes. None of them can be a real push.
DELETE FROM updatepipe.log
WHERE xid >= pg_snapshot_xmax(pg_current_snapshot())
   OR id > (SELECT last_value FROM updatepipe.log_id_seq)
   OR created_at > now() + interval '1 day'
   OR octet_length(payload) > 1114112
   OR octet_length(channel) > 63
   OR octet_length(origin) > 64;

-- Only ever run as the trigger (a trigger function cannot be called directly, and firing a
-- trigger needs no EXECUTE): nobody else needs it.
REVOKE ALL ON FUNCTION updatepipe.log_row_stamp() FROM PUBLIC;
