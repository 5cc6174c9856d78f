//! The listener's options: how it proves and regains its connection, what it holds for a
//! caller that does not read, how it reads the durable log, and what it accepts.

use std::time::Duration;

use super::options::MAX_REPLAY_WINDOW;
use super::{Backoff, Config, Since};
use crate::limits::Limits;

impl Config {
    /// The notification queue usage (0 to 1) above which the listener warns (default 0.1).
    /// The listener samples `pg_notification_queue_usage()` every health interval, from the
    /// pool; the last value is in [`Stats::queue_usage`](crate::Stats::queue_usage).
    pub fn with_queue_warn(mut self, usage: f64) -> Self {
        self.queue_warn = usage.clamp(0.0, 1.0);
        self
    }

    /// Whether the first connection of [`listen`](crate::UpdatePipe::listen) is retried with
    /// the reconnect backoff until the server is there (default off: `listen` fails at once
    /// with the first error, as a command should; a long-running node wants it on).
    pub fn with_wait_for_server(mut self, wait: bool) -> Self {
        self.wait_for_server = wait;
        self
    }

    /// The notification queue usage above which the listener warns.
    pub fn queue_warn(&self) -> f64 {
        self.queue_warn
    }

    /// Whether `listen` waits for the server.
    pub fn wait_for_server(&self) -> bool {
        self.wait_for_server
    }

    /// How the listener retries after losing its connection.
    pub fn with_backoff(mut self, backoff: Backoff) -> Self {
        self.backoff = backoff;
        self
    }

    /// How often the listener proves its connection end to end (default 10 s): it notifies
    /// its own channel and expects the heartbeat back within this interval, or treats the
    /// connection as dead. Zero turns the check off.
    pub fn with_health_interval(mut self, interval: Duration) -> Self {
        self.health_interval = interval;
        self
    }

    /// How long the durable log keeps entries (default 24 h). A listener away longer than
    /// this receives a resync instead of a partial replay.
    pub fn with_retention(mut self, retention: Duration) -> Self {
        self.retention = retention;
        self
    }

    /// How many deliveries the listener holds for a caller that is not reading (default
    /// 65,536). There, reading waits for the caller to take something, up to 1 s at a time
    /// and 2 s in all, the server's queue holding what arrives meanwhile (up to twice as
    /// many are held then, plus one notification's); past that it lets go: see the
    /// slow-consumer policy in `docs/delivery.md`.
    pub fn with_max_buffered(mut self, max: usize) -> Self {
        self.max_buffered = max.max(1);
        self
    }

    /// Durable mode: the most rows (envelopes) one page of a log read holds (default 1000,
    /// at least 1). A listener back from an absence reads what it missed page by page, so
    /// it holds one page at a time, whatever the backlog.
    pub fn with_log_page_rows(mut self, rows: usize) -> Self {
        self.log_page_rows = rows.max(1);
        self
    }

    /// Durable mode: the most payload bytes one page of a log read holds (default 1 MiB);
    /// a single row larger than this (up to 1 MiB and the log's slack) is read alone.
    pub fn with_log_page_bytes(mut self, bytes: usize) -> Self {
        self.log_page_bytes = bytes.max(1);
        self
    }

    /// Durable mode only (ignored otherwise): replay the log from this point before the live
    /// updates, instead of starting from now. The entries still in the log (see the
    /// retention) are delivered once, in log order, then everything after them as usual.
    /// A time is approximate: the log is entered at the last entry whose transaction
    /// started before it.
    pub fn with_since(mut self, since: Since) -> Self {
        self.since = Some(since);
        self
    }

    /// With signing on, while it is being rolled out: sign what this pipe sends, check
    /// signed envelopes as usual, and also accept unsigned ones (default off). Turn it on
    /// for every pipe first, then off everywhere once every sender signs (see
    /// `docs/security.md`).
    pub fn with_accept_unsigned(mut self, accept: bool) -> Self {
        self.accept_unsigned = accept;
        self
    }

    /// With signing on: how far a notification's time may be from the listener's clock,
    /// either way (default 5 minutes, at most a week). Covers clock skew between hosts and
    /// the time a push inside a caller's transaction waits for its commit; durable log
    /// entries are allowed the retention on top.
    pub fn with_replay_window(mut self, window: Duration) -> Self {
        self.replay_window = window.min(MAX_REPLAY_WINDOW);
        self
    }

    /// Bounds on what one received payload may ask for (default [`Limits::default`]).
    pub fn with_limits(mut self, limits: Limits) -> Self {
        self.limits = limits;
        self
    }

    /// With signing on, in the maddy layout: deliver the updates maddy nodes send on
    /// subscribed mailboxes' channels, which cannot be signed (default off: with signing
    /// on they are counted as unsigned and dropped). Without signing they are always
    /// delivered. Anyone who can connect can send such an update: see `docs/maddy.md`.
    pub fn with_accept_maddy(mut self, accept: bool) -> Self {
        self.accept_maddy = accept;
        self
    }

    /// Whether a signing listener delivers maddy's (unsigned) updates.
    pub fn accepts_maddy(&self) -> bool {
        self.accept_maddy
    }

    /// The listener's reconnect backoff.
    pub fn backoff(&self) -> &Backoff {
        &self.backoff
    }

    /// The listener's health interval (zero: off).
    pub fn health_interval(&self) -> Duration {
        self.health_interval
    }

    /// The durable log's retention.
    pub fn retention(&self) -> Duration {
        self.retention
    }

    /// The bound on deliveries held for a caller that is not reading.
    pub fn max_buffered(&self) -> usize {
        self.max_buffered
    }

    /// The bound on rows in one page of a log read.
    pub fn log_page_rows(&self) -> usize {
        self.log_page_rows
    }

    /// The bound on payload bytes in one page of a log read.
    pub fn log_page_bytes(&self) -> usize {
        self.log_page_bytes
    }

    /// Where a durable listener starts (`None`: now).
    pub fn since(&self) -> Option<Since> {
        self.since
    }

    /// Whether a signing listener also accepts unsigned envelopes (a rollout).
    pub fn accepts_unsigned(&self) -> bool {
        self.accept_unsigned
    }

    /// The replay window of signed envelopes.
    pub fn replay_window(&self) -> Duration {
        self.replay_window
    }

    /// The bounds on received payloads.
    pub fn limits(&self) -> &Limits {
        &self.limits
    }
}
