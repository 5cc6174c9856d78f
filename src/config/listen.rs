//! The listener's options: how it proves and regains its connection, what it holds for a
//! caller that does not read, how it reads the durable log, and what it accepts.

use std::time::Duration;

use crate::sign::DEFAULT_REPLAY_WINDOW;

/// The default health interval: a listener proves its connection end to end this often.
pub const DEFAULT_HEALTH_INTERVAL: Duration = Duration::from_secs(10);

/// The default retention of the durable log.
pub const DEFAULT_RETENTION: Duration = Duration::from_secs(24 * 3600);

/// How long pruning keeps the log rows a named consumer has not acknowledged, by default.
pub const DEFAULT_CONSUMER_HOLD: Duration = Duration::from_secs(7 * 24 * 3600);

/// The default bound on the rows (envelopes) one page of a durable log read holds.
pub const DEFAULT_LOG_PAGE_ROWS: usize = 1000;

/// The default bound on the payload bytes one page of a durable log read holds (a single
/// larger row is still read, alone).
pub const DEFAULT_LOG_PAGE_BYTES: usize = 1 << 20;

/// The default bound on deliveries a listener holds for a caller that is not reading.
pub const DEFAULT_MAX_BUFFERED: usize = 65_536;

/// The default notification queue usage (0 to 1) above which a listener warns.
pub const DEFAULT_QUEUE_WARN: f64 = 0.1;

/// The longest replay window [`ListenOptions::with_replay_window`] takes.
const MAX_REPLAY_WINDOW: Duration = Duration::from_secs(7 * 24 * 3600);

/// How a listener retries after losing its connection: full-jitter exponential backoff.
///
/// Attempt `n` waits a random time between zero and `min(max, initial × 2ⁿ)`; the count
/// starts again once a connection has stayed up for `stable_after`. With `max_attempts`
/// unset (the default) the listener never gives up.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Backoff {
    /// The first delay's upper bound (default 100 ms).
    pub initial: Duration,
    /// The cap on any delay (default 10 s).
    pub max: Duration,
    /// How long a connection must last for the backoff to start over (default 30 s).
    pub stable_after: Duration,
    /// Give up after this many failed attempts in a row (default: never).
    pub max_attempts: Option<u32>,
}

impl Default for Backoff {
    fn default() -> Self {
        Backoff {
            initial: Duration::from_millis(100),
            max: Duration::from_secs(10),
            stable_after: Duration::from_secs(30),
            max_attempts: None,
        }
    }
}

impl Backoff {
    /// The delay before attempt `attempt` (0-based): uniform in `[0, min(max, initial·2ⁿ)]`.
    pub fn delay(&self, attempt: u32) -> Duration {
        let ceiling = self
            .initial
            .saturating_mul(2u32.saturating_pow(attempt.min(31)))
            .min(self.max);
        ceiling.mul_f64(rand::random::<f64>())
    }
}

/// Where a durable listener starts: by default now; with a `Since`, it first replays the
/// log from that point.
#[derive(Clone, Debug, PartialEq)]
#[non_exhaustive]
pub enum Since {
    /// The entries written at or after this time (by the server's clock).
    Time(std::time::SystemTime),
    /// The entries after this log id (an `updatepipe.log` id). Rows of transactions that
    /// took a lower id and committed later are not read: resume from a
    /// [`Position`](crate::Position) for exactly what followed.
    Position(i64),
    /// Exactly what followed this position, once, in the same order: resuming a reader
    /// where it stood (a position it gave with an update, stored by the application). If
    /// the server's history no longer holds it (a failover that lost commits, another
    /// database), the listener says so with
    /// [`ResyncReason::HistoryChanged`](crate::ResyncReason::HistoryChanged) and starts
    /// from the present.
    After(crate::Position),
}

/// How a pipe listens: [`Config::with_listen`](crate::Config::with_listen) sets these, each
/// setter builder-style:
///
/// ```
/// use std::time::Duration;
/// use updatepipe::Config;
///
/// let config = Config::from_url("postgres://mail@db/mail")?
///     .with_durable(true)
///     .with_listen(|listen| listen.with_health_interval(Duration::from_secs(5)));
/// assert_eq!(config.listen_options().health_interval(), Duration::from_secs(5));
/// # Ok::<(), updatepipe::Error>(())
/// ```
#[derive(Clone, Debug, PartialEq)]
pub struct ListenOptions {
    health_interval: Duration,
    backoff: Backoff,
    wait_for_server: bool,
    max_buffered: usize,
    retention: Duration,
    since: Option<Since>,
    log_page_rows: usize,
    log_page_bytes: usize,
    queue_warn: f64,
    accept_unsigned: bool,
    replay_window: Duration,
    accept_maddy: bool,
    consumer: Option<String>,
    consumer_hold: Duration,
    polling: Option<Duration>,
}

impl Default for ListenOptions {
    fn default() -> Self {
        ListenOptions {
            health_interval: DEFAULT_HEALTH_INTERVAL,
            backoff: Backoff::default(),
            wait_for_server: false,
            max_buffered: DEFAULT_MAX_BUFFERED,
            retention: DEFAULT_RETENTION,
            since: None,
            log_page_rows: DEFAULT_LOG_PAGE_ROWS,
            log_page_bytes: DEFAULT_LOG_PAGE_BYTES,
            queue_warn: DEFAULT_QUEUE_WARN,
            accept_unsigned: false,
            replay_window: DEFAULT_REPLAY_WINDOW,
            accept_maddy: false,
            consumer: None,
            consumer_hold: DEFAULT_CONSUMER_HOLD,
            polling: None,
        }
    }
}

impl ListenOptions {
    /// How often the listener proves its connection end to end (default 10 s): it notifies
    /// its own channel and expects the heartbeat back within this interval, or treats the
    /// connection as dead. Zero turns the check off.
    pub fn with_health_interval(mut self, interval: Duration) -> Self {
        self.health_interval = interval;
        self
    }

    /// How the listener retries after losing its connection.
    pub fn with_backoff(mut self, backoff: Backoff) -> Self {
        self.backoff = backoff;
        self
    }

    /// Whether the first connection of [`listen`](crate::UpdatePipe::listen) is retried with
    /// the reconnect backoff until the server is there (default off: `listen` fails at once
    /// with the first error, as a command should; a long-running node wants it on).
    pub fn with_wait_for_server(mut self, wait: bool) -> Self {
        self.wait_for_server = wait;
        self
    }

    /// How many deliveries the listener holds for a caller that is not reading (default
    /// 65,536, at least 1). There, reading waits for the caller to take something, up to
    /// 1 s at a time and 2 s in all, the server's queue holding what arrives meanwhile (up
    /// to twice as many are held then, plus one notification's); past that it lets go: see
    /// the slow-consumer policy in `docs/delivery.md`.
    pub fn with_max_buffered(mut self, max: usize) -> Self {
        self.max_buffered = max.max(1);
        self
    }

    /// How long the durable log keeps entries (default 24 h). A listener away longer than
    /// this receives a resync instead of a partial replay.
    pub fn with_retention(mut self, retention: Duration) -> Self {
        self.retention = retention;
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

    /// Durable mode: the most rows (envelopes) one page of a log read holds (default 1000,
    /// at least 1). A listener back from an absence reads what it missed page by page, so
    /// it holds one page at a time, whatever the backlog.
    pub fn with_log_page_rows(mut self, rows: usize) -> Self {
        self.log_page_rows = rows.max(1);
        self
    }

    /// Durable mode: the most payload bytes one page of a log read holds (default 1 MiB,
    /// at least 1); a single row larger than this (up to 1 MiB and the log's slack) is read
    /// alone.
    pub fn with_log_page_bytes(mut self, bytes: usize) -> Self {
        self.log_page_bytes = bytes.max(1);
        self
    }

    /// The notification queue usage (0 to 1) above which the listener warns (default 0.1).
    /// The listener samples `pg_notification_queue_usage()` every health interval, from the
    /// pool; the last value is in [`Stats::queue_usage`](crate::Stats::queue_usage).
    pub fn with_queue_warn(mut self, usage: f64) -> Self {
        self.queue_warn = usage.clamp(0.0, 1.0);
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

    /// With signing on, in the maddy layout: deliver the updates maddy nodes send on
    /// subscribed mailboxes' channels, which cannot be signed (default off: with signing
    /// on they are counted as unsigned and dropped). Without signing they are always
    /// delivered. Anyone who can connect can send such an update: see `docs/maddy.md`.
    pub fn with_accept_maddy(mut self, accept: bool) -> Self {
        self.accept_maddy = accept;
        self
    }

    /// Durable mode: read the log every `every` instead of listening (default off; zero
    /// turns it off), for where `LISTEN` cannot work: behind a transaction-pooling proxy
    /// (PgBouncer in transaction or statement mode). The listener sends no `LISTEN` and no
    /// heartbeat; each read proves its connection (a read that does not answer within the
    /// query deadline, a health interval, is a dead connection). Every durable update
    /// arrives, exactly once, in commit order per sender, about `every` after its commit
    /// (on average half of it); best-effort pushes and maddy nodes' updates, which are in
    /// no log, never do. Not with a named consumer (its session lock does not survive a
    /// transaction pooler), nor in the maddy layout. A polling listener may read a
    /// streaming standby, whose log rows replicate while notifications do not (give it
    /// `target_session_attrs=any` or `prefer-standby`): its latency is then the interval
    /// plus the replication lag, and it never prunes there (the primary's listeners do;
    /// the standby replicates that too). Where the standby's upstream was promoted after a
    /// loss, the history check is weaker there than on a primary (its replay position
    /// stands for the fork). [`Stats::polling`](crate::Stats::polling) says a listener
    /// polls.
    pub fn with_polling(mut self, every: Duration) -> Self {
        self.polling = (!every.is_zero()).then_some(every);
        self
    }

    /// How often a polling listener reads the log (`None`: it listens;
    /// [`with_polling`](ListenOptions::with_polling)).
    pub fn polling(&self) -> Option<Duration> {
        self.polling
    }

    /// Durable mode: how long pruning keeps the log rows a named consumer has not
    /// acknowledged (default 7 days): past it, rows older than the retention go whatever
    /// consumers still need them, and a consumer that far behind is told
    /// [`ResyncReason::LogPruned`](crate::ResyncReason::LogPruned) instead of holding the
    /// log for good. Every listener of the channel prunes with its own value.
    pub fn with_consumer_hold(mut self, hold: Duration) -> Self {
        self.consumer_hold = hold;
        self
    }

    /// The named consumer this pipe's listener reads as, if any
    /// ([`Config::with_consumer`](crate::Config::with_consumer)).
    pub fn consumer(&self) -> Option<&str> {
        self.consumer.as_deref()
    }

    /// How long pruning keeps rows named consumers have not acknowledged.
    pub fn consumer_hold(&self) -> Duration {
        self.consumer_hold
    }

    pub(crate) fn set_consumer(&mut self, name: String) {
        self.consumer = Some(name);
    }

    /// The health interval (zero: off).
    pub fn health_interval(&self) -> Duration {
        self.health_interval
    }

    /// The reconnect backoff.
    pub fn backoff(&self) -> &Backoff {
        &self.backoff
    }

    /// Whether `listen` waits for the server.
    pub fn wait_for_server(&self) -> bool {
        self.wait_for_server
    }

    /// The bound on deliveries held for a caller that is not reading.
    pub fn max_buffered(&self) -> usize {
        self.max_buffered
    }

    /// The durable log's retention.
    pub fn retention(&self) -> Duration {
        self.retention
    }

    /// Where a durable listener starts (`None`: now).
    pub fn since(&self) -> Option<&Since> {
        self.since.as_ref()
    }

    /// The bound on rows in one page of a log read.
    pub fn log_page_rows(&self) -> usize {
        self.log_page_rows
    }

    /// The bound on payload bytes in one page of a log read.
    pub fn log_page_bytes(&self) -> usize {
        self.log_page_bytes
    }

    /// The notification queue usage above which the listener warns.
    pub fn queue_warn(&self) -> f64 {
        self.queue_warn
    }

    /// Whether a signing listener also accepts unsigned envelopes (a rollout).
    pub fn accepts_unsigned(&self) -> bool {
        self.accept_unsigned
    }

    /// The replay window of signed envelopes.
    pub fn replay_window(&self) -> Duration {
        self.replay_window
    }

    /// Whether a signing listener delivers maddy's (unsigned) updates.
    pub fn accepts_maddy(&self) -> bool {
        self.accept_maddy
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_is_bounded_full_jitter() {
        let b = Backoff::default();
        for attempt in 0..40 {
            let ceiling = (b.initial * 2u32.pow(attempt.min(20))).min(b.max);
            for _ in 0..20 {
                assert!(b.delay(attempt) <= ceiling);
            }
        }
        // Jitter: not always the ceiling.
        let delays: std::collections::HashSet<_> = (0..20).map(|_| b.delay(10)).collect();
        assert!(delays.len() > 1);
    }

    #[test]
    fn bounds_are_kept_in_range() {
        let o = ListenOptions::default()
            .with_max_buffered(0)
            .with_log_page_rows(0)
            .with_queue_warn(7.0)
            .with_replay_window(Duration::MAX);
        assert_eq!((o.max_buffered(), o.log_page_rows()), (1, 1));
        assert_eq!(o.queue_warn(), 1.0);
        assert_eq!(o.replay_window(), MAX_REPLAY_WINDOW);
    }
}
