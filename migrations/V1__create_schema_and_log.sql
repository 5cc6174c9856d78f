-- updatepipe's own schema. Everything the pipe stores lives here, apart from refinery's
-- history table (public.updatepipe_schema_history).
CREATE SCHEMA IF NOT EXISTS updatepipe;

-- The durable update log: one row per envelope pushed in durable mode, written in the same
-- transaction as its notification, so a row exists if and only if that notification was
-- committed. A listener that reconnects replays what it missed from here.
CREATE TABLE updatepipe.log (
    id          bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    -- The writing transaction: with pg_current_snapshot() it tells which rows were
    -- committed before a given point, whatever order their ids were taken in.
    xid         xid8        NOT NULL DEFAULT pg_current_xact_id(),
    channel     text        NOT NULL,
    origin      text        NOT NULL,
    seq         bigint      NOT NULL,
    payload     text        NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now()
);

CREATE INDEX log_channel_id ON updatepipe.log (channel, id);
CREATE INDEX log_created_at ON updatepipe.log (created_at);
