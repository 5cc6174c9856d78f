//! The pipe's options beyond where the database is: the channel, the bounds on pushing and
//! listening, durability, signing, and their defaults.

use std::time::Duration;

use super::Config;
use crate::channel::ChannelName;
use crate::layout::Layout;
use crate::sign::{Secret, Signer};

/// The default number of pooled connections used for pushing.
pub const DEFAULT_POOL_SIZE: usize = 8;

/// The default time allowed to establish a connection.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// The default time allowed for one push, from the call to the commit.
pub const DEFAULT_PUSH_TIMEOUT: Duration = Duration::from_secs(10);

/// The default bound on the updates one push transaction carries.
pub const DEFAULT_MAX_BATCH: usize = 4096;

/// The default bound on push transactions in flight at once on the push connection.
pub const DEFAULT_MAX_IN_FLIGHT: usize = 1;

/// The default health interval: a listener proves its connection end to end this often.
pub const DEFAULT_HEALTH_INTERVAL: Duration = Duration::from_secs(10);

/// The default retention of the durable log.
pub const DEFAULT_RETENTION: Duration = Duration::from_secs(24 * 3600);

/// The default bound on the rows (envelopes) one page of a durable log read holds.
pub const DEFAULT_LOG_PAGE_ROWS: usize = 1000;

/// The default bound on the payload bytes one page of a durable log read holds (a single
/// larger row is still read, alone).
pub const DEFAULT_LOG_PAGE_BYTES: usize = 1 << 20;

/// The default bound on deliveries a listener holds for a caller that is not reading.
pub const DEFAULT_MAX_BUFFERED: usize = 65_536;

/// The default `statement_timeout` the pipe sets on its own connections (a backstop: every
/// statement also has a deadline of its own, past which it is cancelled).
pub const DEFAULT_STATEMENT_TIMEOUT: Duration = Duration::from_secs(60);

/// The default `lock_timeout` the pipe sets on its own connections.
pub const DEFAULT_LOCK_TIMEOUT: Duration = Duration::from_secs(30);

/// The default `idle_in_transaction_session_timeout` the pipe sets on its own connections.
pub const DEFAULT_IDLE_IN_TRANSACTION_TIMEOUT: Duration = Duration::from_secs(60);

/// The default bound on pool pushes waiting for a flight.
pub const DEFAULT_MAX_QUEUED_PUSHES: usize = 65_536;

/// The default bound on the encoded bytes of the pool pushes waiting for a flight.
pub const DEFAULT_MAX_QUEUED_BYTES: usize = 64 * 1024 * 1024;

/// The default notification queue usage (0 to 1) above which a listener warns.
pub const DEFAULT_QUEUE_WARN: f64 = 0.1;

/// The longest replay window [`Config::with_replay_window`] takes.
pub(super) const MAX_REPLAY_WINDOW: Duration = Duration::from_secs(7 * 24 * 3600);

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
#[derive(Clone, Copy, Debug, PartialEq)]
#[non_exhaustive]
pub enum Since {
    /// The entries written at or after this time (by the server's clock).
    Time(std::time::SystemTime),
    /// The entries after this log position (an `updatepipe.log` id).
    Position(i64),
}

/// What a pool push does when the queue of pushes waiting for a flight is full (see
/// [`Config::with_max_queued_pushes`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum QueueFull {
    /// Wait for room (backpressure), within the push timeout; past it the push fails with
    /// [`Error::Timeout`](crate::Error::Timeout), and nothing of it was sent.
    #[default]
    Wait,
    /// Fail at once with [`Error::QueueFull`](crate::Error::QueueFull).
    Fail,
}

/// The session settings the pipe sets on its own connections, a backstop to its own
/// deadlines (zero: the server's setting is left alone).
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct SessionLimits {
    pub(crate) statement_timeout: Duration,
    pub(crate) lock_timeout: Duration,
    pub(crate) idle_in_transaction_timeout: Duration,
}

impl Default for SessionLimits {
    fn default() -> Self {
        SessionLimits {
            statement_timeout: DEFAULT_STATEMENT_TIMEOUT,
            lock_timeout: DEFAULT_LOCK_TIMEOUT,
            idle_in_transaction_timeout: DEFAULT_IDLE_IN_TRANSACTION_TIMEOUT,
        }
    }
}

impl SessionLimits {
    /// The `SET` statements for these settings, or `None` when all are left alone.
    pub(crate) fn sql(&self) -> Option<String> {
        let sql: Vec<String> = [
            ("statement_timeout", self.statement_timeout),
            ("lock_timeout", self.lock_timeout),
            (
                "idle_in_transaction_session_timeout",
                self.idle_in_transaction_timeout,
            ),
        ]
        .iter()
        .filter(|(_, d)| !d.is_zero())
        .map(|(name, d)| format!("SET {name} = {}", d.as_millis().max(1)))
        .collect();
        (!sql.is_empty()).then(|| sql.join("; "))
    }
}

/// The bound on pool pushes waiting for a flight.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct QueueBound {
    pub(crate) pushes: usize,
    pub(crate) bytes: usize,
    pub(crate) when_full: QueueFull,
}

impl Default for QueueBound {
    fn default() -> Self {
        QueueBound {
            pushes: DEFAULT_MAX_QUEUED_PUSHES,
            bytes: DEFAULT_MAX_QUEUED_BYTES,
            when_full: QueueFull::Wait,
        }
    }
}

impl Config {
    /// The `statement_timeout` set on the pipe's own connections (pool and listener; not
    /// the caller's in [`push_in`](crate::PgPipe::push_in), not migrations), default 60 s;
    /// zero leaves the server's setting. A backstop: every statement the pipe sends has a
    /// deadline of its own, past which it is cancelled. Set after connecting (a `SET`, not
    /// a startup parameter, which PgBouncer refuses); behind a transaction-pooling proxy a
    /// `SET` reaches whichever server connection runs it and stays there, so set these to
    /// zero and use `ALTER ROLE ... SET` instead.
    pub fn with_statement_timeout(mut self, timeout: Duration) -> Self {
        self.session.statement_timeout = timeout;
        self
    }

    /// The `lock_timeout` set on the pipe's own connections (default 30 s; zero: the
    /// server's). See [`with_statement_timeout`](Config::with_statement_timeout). It also
    /// bounds how long [`migrate`](crate::PgPipe::migrate) and
    /// [`grant`](crate::PgPipe::grant) wait for the migration lock, and a migration for a
    /// lock on the log's tables (30 s when zero), before failing with
    /// [`Error::LockHeld`](crate::Error::LockHeld), which names the sessions holding it.
    pub fn with_lock_timeout(mut self, timeout: Duration) -> Self {
        self.session.lock_timeout = timeout;
        self
    }

    /// The `idle_in_transaction_session_timeout` set on the pipe's own connections (default
    /// 60 s; zero: the server's). See [`with_statement_timeout`](Config::with_statement_timeout).
    pub fn with_idle_in_transaction_timeout(mut self, timeout: Duration) -> Self {
        self.session.idle_in_transaction_timeout = timeout;
        self
    }

    /// The most pool pushes waiting for a flight (default 65,536, at least 1). Past it, or
    /// past [`with_max_queued_bytes`](Config::with_max_queued_bytes), a push waits or fails
    /// as [`with_queue_full`](Config::with_queue_full) says. Memory during an outage is
    /// bounded by these, not by the number of callers.
    pub fn with_max_queued_pushes(mut self, pushes: usize) -> Self {
        self.queue_bound.pushes = pushes.max(1);
        self
    }

    /// The most encoded bytes of the pool pushes waiting for a flight (default 64 MiB; a
    /// single push larger than this is still taken when nothing is queued).
    pub fn with_max_queued_bytes(mut self, bytes: usize) -> Self {
        self.queue_bound.bytes = bytes.max(1);
        self
    }

    /// What a pool push does when the queue is full (default [`QueueFull::Wait`]).
    pub fn with_queue_full(mut self, when_full: QueueFull) -> Self {
        self.queue_bound.when_full = when_full;
        self
    }

    /// The `statement_timeout` set on the pipe's own connections (zero: not set).
    pub fn statement_timeout(&self) -> Duration {
        self.session.statement_timeout
    }

    /// The `lock_timeout` set on the pipe's own connections (zero: not set).
    pub fn lock_timeout(&self) -> Duration {
        self.session.lock_timeout
    }

    /// The `idle_in_transaction_session_timeout` set on the pipe's own connections.
    pub fn idle_in_transaction_timeout(&self) -> Duration {
        self.session.idle_in_transaction_timeout
    }

    /// The bound on pool pushes waiting for a flight.
    pub fn max_queued_pushes(&self) -> usize {
        self.queue_bound.pushes
    }

    /// The bound on the encoded bytes of the pool pushes waiting for a flight.
    pub fn max_queued_bytes(&self) -> usize {
        self.queue_bound.bytes
    }

    /// What a pool push does when the queue is full.
    pub fn queue_full(&self) -> QueueFull {
        self.queue_bound.when_full
    }

    pub(crate) fn session_limits(&self) -> &SessionLimits {
        &self.session
    }

    pub(crate) fn queue_bound(&self) -> QueueBound {
        self.queue_bound
    }

    /// The channel every update travels on (default `updatepipe`).
    pub fn with_channel(mut self, channel: ChannelName) -> Self {
        self.channel = channel;
        self
    }

    /// How many pooled connections pushes may use at once (default 8, at least 1).
    pub fn with_pool_size(mut self, size: usize) -> Self {
        self.pool_size = size.max(1);
        self
    }

    /// The time allowed for one push, from the call to the commit (default 10 s).
    pub fn with_push_timeout(mut self, timeout: Duration) -> Self {
        self.push_timeout = timeout;
        self
    }

    /// The most updates one push transaction gathers from concurrent pushes (default 4096,
    /// at least 1). A single `push_many` larger than this still goes in one transaction.
    pub fn with_max_batch(mut self, updates: usize) -> Self {
        self.max_batch = updates.max(1);
        self
    }

    /// How long a push waits for company before it is sent (default zero: a push goes out
    /// at once, and pushes that arrive while one is in flight gather for the next). A
    /// small wait makes bigger batches at low concurrency, at the cost of that latency.
    pub fn with_max_batch_wait(mut self, wait: Duration) -> Self {
        self.max_batch_wait = wait;
        self
    }

    /// How many push transactions may be in flight at once (default 1, at least 1). More
    /// than one are pipelined on one connection, so they still commit in the order they
    /// were sent, and a push that arrives while another is in flight goes out at once (or
    /// after a few scheduler turns, when a batch is being gathered) instead of waiting for
    /// that one's round trip: worth it over a network. On the server's own machine, where
    /// the round trip is short, waiting makes bigger batches, which cost the server less
    /// (`BENCHMARKS.md` has both). Keep 1 behind a transaction-pooling proxy that may route
    /// pipelined transactions to different servers. Durable pushes, and pushes through a
    /// proxy detected as transaction-pooling, go one at a time whatever this says.
    pub fn with_max_in_flight(mut self, transactions: usize) -> Self {
        self.max_in_flight = transactions.max(1);
        self
    }

    /// Durable delivery (default off). Every push also writes its envelope to the
    /// `updatepipe.log` table in the same transaction as its notification, and the listener
    /// reads durable updates from the log, so after a disconnect it replays exactly what it
    /// missed. Costs an insert per push transaction (batched) and a log query per wake-up;
    /// needs [`PgPipe::migrate`](crate::PgPipe::migrate). Envelopes too large for a
    /// notification travel through the log.
    pub fn with_durable(mut self, durable: bool) -> Self {
        self.durable = durable;
        self
    }

    /// Signs every envelope this pipe sends with the first secret, and makes its listener
    /// accept only envelopes signed with one of them, not seen before and within the replay
    /// window (default off: no secret). All pipes on a channel need the same secrets; see
    /// `docs/security.md`.
    pub fn with_secrets(mut self, secrets: Vec<Secret>) -> Self {
        self.secrets = secrets;
        self
    }

    /// Which channels the pipe speaks on (default [`Layout::Shared`]). With
    /// [`Layout::Maddy`], every push also sends each update in maddy's form on its mailbox's
    /// channel, in the same transaction, and the listener can subscribe to mailboxes
    /// ([`PgPipe::subscribe`](crate::PgPipe::subscribe)). See `docs/maddy.md`.
    pub fn with_layout(mut self, layout: Layout) -> Self {
        self.layout = layout;
        self
    }

    /// The channel layout.
    pub fn layout(&self) -> Layout {
        self.layout
    }

    /// The channel.
    pub fn channel(&self) -> &ChannelName {
        &self.channel
    }

    /// The push pool's size.
    pub fn pool_size(&self) -> usize {
        self.pool_size
    }

    /// The push timeout.
    pub fn push_timeout(&self) -> Duration {
        self.push_timeout
    }

    /// The bound on updates per push transaction.
    pub fn max_batch(&self) -> usize {
        self.max_batch
    }

    /// How long a push waits for company.
    pub fn max_batch_wait(&self) -> Duration {
        self.max_batch_wait
    }

    /// The bound on push transactions in flight at once.
    pub fn max_in_flight(&self) -> usize {
        self.max_in_flight
    }

    /// Whether delivery is durable.
    pub fn durable(&self) -> bool {
        self.durable
    }

    /// Whether envelopes are signed and checked.
    pub fn signing(&self) -> bool {
        !self.secrets.is_empty()
    }

    /// The signer for this channel, when signing is on.
    pub(crate) fn signer(&self) -> Option<Signer> {
        (!self.secrets.is_empty())
            .then(|| Signer::from_parts(self.secrets.clone(), self.channel.clone()))
    }
}
