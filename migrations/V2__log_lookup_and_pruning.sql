-- Durable delivery: find an envelope by its sender and number (notifications that point at
-- an oversize envelope name it so), and make a retried push transaction idempotent: the
-- same (channel, origin, seq) can be written once.
CREATE UNIQUE INDEX log_channel_origin_seq ON updatepipe.log (channel, origin, seq);

-- The durable listener's catch-up query selects by transaction id.
CREATE INDEX log_channel_xid ON updatepipe.log (channel, xid);

-- How far each channel's log has been pruned: a listener whose last read is older than
-- pruned_before may have missed entries and must resynchronize.
CREATE TABLE updatepipe.pruned (
    channel        text        PRIMARY KEY,
    pruned_before  timestamptz NOT NULL
);
