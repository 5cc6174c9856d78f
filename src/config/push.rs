//! The push path's options: its pool, its deadline, how pushes are batched and pipelined,
//! and how many may wait for a flight.

use std::time::Duration;

/// The default number of pooled connections used for pushing.
pub const DEFAULT_POOL_SIZE: usize = 8;

/// The default time allowed for one push, from the call to the commit.
pub const DEFAULT_PUSH_TIMEOUT: Duration = Duration::from_secs(10);

/// The default bound on the updates one push transaction carries.
pub const DEFAULT_MAX_BATCH: usize = 4096;

/// The default bound on push transactions in flight at once on the push connection.
pub const DEFAULT_MAX_IN_FLIGHT: usize = 1;

/// The default bound on pool pushes waiting for a flight.
pub const DEFAULT_MAX_QUEUED_PUSHES: usize = 65_536;

/// The default bound on the encoded bytes of the pool pushes waiting for a flight.
pub const DEFAULT_MAX_QUEUED_BYTES: usize = 64 * 1024 * 1024;

/// What a pool push does when the queue of pushes waiting for a flight is full (see
/// [`PushOptions::with_max_queued_pushes`]).
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

/// How a pipe pushes: [`Config::with_push`](crate::Config::with_push) sets these, each
/// setter builder-style:
///
/// ```
/// use std::time::Duration;
/// use updatepipe::Config;
///
/// let config = Config::from_url("postgres://mail@db/mail")?
///     .with_push(|push| push.with_pool_size(4).with_timeout(Duration::from_secs(5)));
/// assert_eq!(config.push_options().pool_size(), 4);
/// # Ok::<(), updatepipe::Error>(())
/// ```
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PushOptions {
    pool_size: usize,
    timeout: Duration,
    max_batch: usize,
    max_batch_wait: Duration,
    max_in_flight: usize,
    max_queued_pushes: usize,
    max_queued_bytes: usize,
    queue_full: QueueFull,
}

impl Default for PushOptions {
    fn default() -> Self {
        PushOptions {
            pool_size: DEFAULT_POOL_SIZE,
            timeout: DEFAULT_PUSH_TIMEOUT,
            max_batch: DEFAULT_MAX_BATCH,
            max_batch_wait: Duration::ZERO,
            max_in_flight: DEFAULT_MAX_IN_FLIGHT,
            max_queued_pushes: DEFAULT_MAX_QUEUED_PUSHES,
            max_queued_bytes: DEFAULT_MAX_QUEUED_BYTES,
            queue_full: QueueFull::Wait,
        }
    }
}

impl PushOptions {
    /// How many pooled connections pushes may use at once (default 8, at least 1).
    pub fn with_pool_size(mut self, size: usize) -> Self {
        self.pool_size = size.max(1);
        self
    }

    /// The time allowed for one push, from the call to the commit (default 10 s).
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
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

    /// The most pool pushes waiting for a flight (default 65,536, at least 1). Past it, or
    /// past [`with_max_queued_bytes`](PushOptions::with_max_queued_bytes), a push waits or
    /// fails as [`with_queue_full`](PushOptions::with_queue_full) says. Memory during an
    /// outage is bounded by these, not by the number of callers.
    pub fn with_max_queued_pushes(mut self, pushes: usize) -> Self {
        self.max_queued_pushes = pushes.max(1);
        self
    }

    /// The most encoded bytes of the pool pushes waiting for a flight (default 64 MiB; a
    /// single push larger than this is still taken when nothing is queued).
    pub fn with_max_queued_bytes(mut self, bytes: usize) -> Self {
        self.max_queued_bytes = bytes.max(1);
        self
    }

    /// What a pool push does when the queue is full (default [`QueueFull::Wait`]).
    pub fn with_queue_full(mut self, when_full: QueueFull) -> Self {
        self.queue_full = when_full;
        self
    }

    /// The push pool's size.
    pub fn pool_size(&self) -> usize {
        self.pool_size
    }

    /// The push timeout.
    pub fn timeout(&self) -> Duration {
        self.timeout
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

    /// The bound on pool pushes waiting for a flight.
    pub fn max_queued_pushes(&self) -> usize {
        self.max_queued_pushes
    }

    /// The bound on the encoded bytes of the pool pushes waiting for a flight.
    pub fn max_queued_bytes(&self) -> usize {
        self.max_queued_bytes
    }

    /// What a pool push does when the queue is full.
    pub fn queue_full(&self) -> QueueFull {
        self.queue_full
    }

    /// The bound on pool pushes waiting for a flight, as the push queue takes it.
    pub(crate) fn queue_bound(&self) -> QueueBound {
        QueueBound {
            pushes: self.max_queued_pushes,
            bytes: self.max_queued_bytes,
            when_full: self.queue_full,
        }
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
        PushOptions::default().queue_bound()
    }
}
