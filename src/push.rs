//! The push path: updates become version 1 envelopes sent with `pg_notify` on the shared
//! channel, through the pool or inside the caller's own transaction.
//!
//! Pool pushes are batched. Each push encodes and checks its own updates (so a bad update
//! fails only its own push), then goes out in a *flight*: one statement (one transaction)
//! carrying whatever was queued, packed into as few envelopes as fit. Up to
//! `max_in_flight` flights are out at once, pipelined on one connection; while they are,
//! new pushes gather for the next. A push that finds nothing queued and room for a flight
//! sends its own updates at once, on its own task (no hand-off, so a lone push costs what a
//! plain `pg_notify` costs); queued pushes go out on flusher tasks, which give the pushers
//! a flight has just resolved a few scheduler turns to push again and join the next batch.
//! Every push resolves only when the transaction holding its updates has committed, with
//! that transaction's outcome.
//!
//! Envelope numbers say when something was missed: a listener that sees a sender's number
//! skipped raises a resync. So flights must commit in number order. Each takes its numbers
//! and sends its statement in one step, under one lock, on the one connection they share;
//! PostgreSQL runs a connection's statements in the order they arrive.

use std::collections::VecDeque;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::task::Poll;
use std::time::Duration;

use deadpool_postgres::{
    Manager, ManagerConfig, Object, Pool, PoolError, RecyclingMethod, Runtime, Timeouts,
};
use tokio::sync::{Notify, oneshot};
use tokio::time::Instant;
use tokio_postgres::error::SqlState;
use tokio_postgres::types::{ToSql, Type};
use tokio_postgres::{GenericClient, Statement};

use crate::config::Config;
use crate::envelope::{MAX_LOGGED_ENVELOPE_LEN, MAX_PAYLOAD_LEN, Marks, Packer};
use crate::error::Error;
use crate::log::LOG_AND_NOTIFY;
use crate::origin::Origin;
use crate::stats::Counters;
use crate::update::Update;

const TARGET: &str = "updatepipe::push";

/// One notification: the channel and payload are parameters, never SQL text.
const NOTIFY_ONE: &str = "SELECT pg_notify($1, $2)";

/// Several notifications in one statement, so in one transaction and one round trip, in
/// array order.
const NOTIFY_MANY: &str =
    "SELECT pg_notify($1, p) FROM unnest($2::text[]) WITH ORDINALITY AS t(p, n) ORDER BY n";

/// The most scheduler turns a flusher gives pushers to join its batch (see
/// `Shared::let_company_in`).
const GATHER_TURNS: usize = 4;

/// Where the numbers of envelopes pushed inside callers' transactions start (2⁶²).
pub(crate) const TRANSACTIONAL_SEQ_BASE: u64 = 1 << 62;

/// Envelopes with their numbers, ready to send.
type Payloads = Vec<(u64, String)>;

/// Sends this pipe's updates.
#[derive(Debug)]
pub(crate) struct Pusher {
    shared: Arc<Shared>,
}

/// What the pipe's handles and its flushers share.
#[derive(Debug)]
struct Shared {
    pool: Pool,
    /// Why the pool's last connection attempt failed, in the pipe's words.
    connect_failure: Arc<std::sync::Mutex<Option<Error>>>,
    channel: String,
    origin: String,
    durable: bool,
    packer: Packer,
    /// Send unnamed statements (set for good once prepared ones fail: a transaction-pooling
    /// proxy).
    unnamed: AtomicBool,
    /// Numbers for pool pushes: consecutive, and committed in order (see `order`), so a
    /// listener that sees one skipped knows it missed something.
    seq: AtomicU64,
    /// Numbers for pushes in callers' transactions, from a range of their own: those may
    /// roll back or commit out of order, so listeners do not check them for gaps.
    tx_seq: AtomicU64,
    timeout: Duration,
    max_batch: usize,
    max_batch_wait: Duration,
    max_in_flight: usize,
    counters: Arc<Counters>,
    queue: Mutex<Queue>,
    /// Held while a flight takes its numbers and sends its statement: flights are sent in
    /// number order.
    order: Mutex<()>,
    /// The connection flights go out on, shared by those in flight. Kept from one flight to
    /// the next (a pool round trip per flight is a measurable part of a lone push); when
    /// no flight is left, given back to the pool unless the pool has 3 or more connections,
    /// so that the listener's heartbeats need not queue behind `queue_usage` or `status`
    /// for the one other connection.
    held: Mutex<Option<Arc<Held>>>,
    keep_held: bool,
    /// One checkout at a time: flights that find no connection share the next one.
    connecting: tokio::sync::Mutex<()>,
    /// The flights' timers, kept from flight to flight, each with the runtime it belongs
    /// to (see `Shared::until`).
    flush_timers: Mutex<Vec<(tokio::runtime::Id, Pin<Box<tokio::time::Sleep>>)>>,
    /// Signalled whenever the last flight ends with nothing queued.
    idle: Notify,
}

/// The pushes waiting for a flight, and the flights out.
#[derive(Debug, Default)]
struct Queue {
    pending: VecDeque<Request>,
    /// Flights started and not yet over: at most the pipe's depth (`Shared::depth`).
    flights: usize,
    /// A flusher task has been started and has not taken its batch yet: pushes queued now
    /// go with it.
    gathering: bool,
    closed: bool,
}

/// How a push goes out: alone and at once (nothing was queued and there was room for a
/// flight), or queued for a flusher task, which it starts (`lead`) when none is gathering.
enum Turn {
    Alone(Vec<String>),
    Queued {
        lead: bool,
        outcome: oneshot::Receiver<Result<(), Arc<Error>>>,
    },
}

/// One push waiting for a flight: its updates, already encoded and checked, and where to
/// send the outcome.
#[derive(Debug)]
struct Request {
    updates: Vec<String>,
    done: oneshot::Sender<Result<(), Arc<Error>>>,
}

/// The pooled connection flights go out on, shared by those in flight.
#[derive(Debug)]
struct Held {
    client: Option<Object>,
    /// Its state is unknown (a send on it failed midway or ran past its deadline): it is
    /// closed, not pooled again, when the last flight on it lets it go. (A send its caller
    /// gave up leaves it in use: tokio-postgres discards the answer nobody waits for.)
    broken: AtomicBool,
    /// The statements flights run, prepared on this connection before the first is sent
    /// (so that sending one never waits).
    statements: tokio::sync::OnceCell<Statements>,
}

/// A connection's prepared statements for this pipe's flights.
#[derive(Debug)]
enum Statements {
    Notify { one: Statement, many: Statement },
    Durable(Statement),
}

impl Pusher {
    /// A pusher with its pool. Nothing connects until the first push.
    pub(crate) fn new(
        config: &Config,
        origin: Origin,
        counters: Arc<Counters>,
    ) -> Result<Self, Error> {
        // Checked now, so that a bad certificate file fails here rather than at the first push.
        config.tls_connector()?;
        let (connector, connect_failure) = crate::connect::PoolConnector::new(config);
        let manager = Manager::from_connect(
            config.pg().clone(),
            connector,
            ManagerConfig {
                // A broken connection is noticed by `is_closed`, and one that failed a
                // flush is taken out of the pool; a query per checkout would cost a round
                // trip per flush.
                recycling_method: RecyclingMethod::Fast,
            },
        );
        let pool = Pool::builder(manager)
            .max_size(config.pool_size())
            .runtime(Runtime::Tokio1)
            .timeouts(Timeouts {
                wait: Some(config.push_timeout()),
                // Each host in turn, each within the connect timeout.
                create: Some(
                    config.connect_timeout() * config.pg().get_hosts().len().max(1) as u32,
                ),
                recycle: Some(config.connect_timeout()),
            })
            .build()
            .map_err(|e| Error::Config(format!("cannot build the connection pool: {e}")))?;
        let shared = Arc::new(Shared {
            pool,
            connect_failure,
            channel: config.channel().as_str().to_owned(),
            origin: origin.as_str().to_owned(),
            durable: config.durable(),
            packer: Packer::new(&origin, std::process::id(), config.signer()),
            seq: AtomicU64::new(1),
            tx_seq: AtomicU64::new(TRANSACTIONAL_SEQ_BASE),
            unnamed: AtomicBool::new(false),
            timeout: config.push_timeout(),
            max_batch: config.max_batch(),
            max_batch_wait: config.max_batch_wait(),
            max_in_flight: config.max_in_flight(),
            counters,
            queue: Mutex::new(Queue::default()),
            order: Mutex::new(()),
            held: Mutex::new(None),
            keep_held: config.pool_size() >= 3,
            connecting: tokio::sync::Mutex::new(()),
            flush_timers: Mutex::new(Vec::new()),
            idle: Notify::new(),
        });
        Ok(Pusher { shared })
    }

    /// Checks out a connection and proves it works: early errors for `init_push`.
    pub(crate) async fn init(&self) -> Result<(), Error> {
        let shared = &self.shared;
        shared
            .within("preparing to push", async {
                let client = shared.checkout().await?;
                client.execute_typed("SELECT 1", &[]).await?;
                Ok(())
            })
            .await
    }

    /// Sends updates through the pool, batched with concurrent pushes; returns once they are
    /// committed. All of them travel in one transaction: delivered together or not at all.
    pub(crate) async fn push(&self, updates: &[Update]) -> Result<(), Error> {
        let encoded = self.encode(updates)?;
        if encoded.is_empty() {
            return Ok(());
        }
        let shared = &self.shared;
        let turn = {
            let mut queue = shared.queue.lock().expect("push queue lock");
            if queue.closed {
                return Err(Error::Closed);
            }
            let room = queue.flights < shared.depth();
            if room && queue.pending.is_empty() && shared.max_batch_wait.is_zero() {
                queue.flights += 1;
                Turn::Alone(encoded)
            } else {
                let (done, outcome) = oneshot::channel();
                queue.pending.push_back(Request {
                    updates: encoded,
                    done,
                });
                let lead = room && !queue.gathering;
                if lead {
                    queue.flights += 1;
                    queue.gathering = true;
                }
                Turn::Queued { lead, outcome }
            }
        };
        let outcome = match turn {
            Turn::Alone(encoded) => {
                // These updates go out alone, from here, at once (no hand-off). Alone: if
                // the caller gives up midway, no other push's flight is cut short with it.
                let _flight = Flight(shared.clone());
                shared
                    .flush(encoded.iter().map(String::as_str))
                    .await
                    .map_err(Arc::new)
            }
            Turn::Queued { lead, outcome } => {
                if lead {
                    tokio::spawn(shared.clone().fly());
                }
                let timeout = shared.timeout;
                tokio::time::timeout(timeout, outcome)
                    .await
                    .map_err(|_| Error::Timeout {
                        what: "pushing",
                        after: timeout,
                    })?
                    .map_err(|_| Error::Closed)?
            }
        };
        outcome.map_err(Error::Batch)?;
        shared.counters.pushed(updates.len());
        Ok(())
    }

    /// Sends updates on the caller's client or transaction: delivered when, and only when,
    /// the caller's transaction commits (at once, outside a transaction). Durable pushes
    /// write their log rows in that same transaction.
    pub(crate) async fn push_in<C: GenericClient + Sync>(
        &self,
        client: &C,
        updates: &[Update],
    ) -> Result<(), Error> {
        let encoded = self.encode(updates)?;
        let marks = Marks {
            transactional: true,
            durable: self.shared.durable,
        };
        let payloads = self.shared.pack(encoded.iter().map(String::as_str), marks);
        // Unnamed: the caller's connection may go through a transaction-pooling proxy.
        self.shared
            .execute_unnamed(client, &payloads, marks)
            .await?;
        self.shared.counters.pushed(updates.len());
        Ok(())
    }

    /// The pool (the listener sends its heartbeats through it).
    pub(crate) fn pool(&self) -> Pool {
        self.shared.pool.clone()
    }

    /// Runs a one-value query on a pooled connection.
    pub(crate) async fn query_f64(&self, sql: &str) -> Result<f64, Error> {
        let shared = &self.shared;
        shared
            .within("querying the server", async {
                let client = shared.checkout().await?;
                Ok(client.query_typed_one(sql, &[]).await?.get(0))
            })
            .await
    }

    fn encode(&self, updates: &[Update]) -> Result<Vec<String>, Error> {
        let limit = if self.shared.durable {
            MAX_LOGGED_ENVELOPE_LEN
        } else {
            MAX_PAYLOAD_LEN
        };
        updates
            .iter()
            .map(|u| self.shared.packer.encode(u, limit))
            .collect()
    }

    /// Stops taking pushes, lets the flights finish what is queued, then closes the pool.
    pub(crate) async fn close(&self) {
        let shared = &self.shared;
        loop {
            let idle = shared.idle.notified();
            {
                let mut queue = shared.queue.lock().expect("push queue lock");
                queue.closed = true;
                if queue.flights == 0 {
                    break;
                }
            }
            idle.await;
        }
        drop(shared.held.lock().expect("held connection lock").take());
        // The timers hold their runtime's driver: let them go with the pipe's work.
        drop(std::mem::take(
            &mut *shared.flush_timers.lock().expect("flush timers lock"),
        ));
        shared.pool.close();
    }
}

/// Ends a flight when dropped: however its flush ended (sent, failed, or its caller gave up
/// midway), the pushes queued meanwhile are not stranded.
struct Flight(Arc<Shared>);

impl Drop for Flight {
    fn drop(&mut self) {
        let shared = &self.0;
        let mut queue = shared.queue.lock().expect("push queue lock");
        queue.flights -= 1;
        shared.settle(queue);
    }
}

/// What a change to the queue leaves to do once the queue is unlocked: start a flusher
/// task, let a connection go. (On a closing runtime a spawned task is dropped at once, and
/// its guard locks the queue.)
#[must_use]
struct Followup {
    flight: Option<Arc<Shared>>,
    release: Option<Arc<Held>>,
}

impl Followup {
    fn run(self) {
        drop(self.release);
        if let Some(shared) = self.flight {
            let flight = shared.fly();
            match tokio::runtime::Handle::try_current() {
                Ok(runtime) => {
                    runtime.spawn(flight);
                }
                // No runtime (it is shutting down): dropped unpolled, the task gives its
                // flight back, and what is queued with it.
                Err(_) => drop(flight),
            }
        }
    }
}

/// A flusher task's flight, given back if the task is dropped unfinished: its runtime
/// shut down, possibly before the task was ever polled. It must not stay counted (later
/// pushes would wait behind it forever, and `close` with them). What is queued is given up
/// (each waiting push is told the pipe is closed): the runtime that was to send it is
/// gone.
struct Abandon(Option<Arc<Shared>>);

impl Drop for Abandon {
    fn drop(&mut self) {
        if let Some(shared) = self.0.take() {
            let mut queue = shared.queue.lock().expect("push queue lock");
            queue.pending.clear();
            queue.gathering = false;
            queue.flights -= 1;
            shared.settle(queue);
        }
    }
}

impl Shared {
    /// How many flights may be out at once. One for durable pushes (a durable flight that
    /// lost its connection is sent again on another, which must not overtake the flights
    /// after it) and through a transaction-pooling proxy (which may route pipelined
    /// transactions to different servers).
    fn depth(&self) -> usize {
        if self.durable || self.unnamed.load(Ordering::Relaxed) {
            1
        } else {
            self.max_in_flight
        }
    }

    /// Unlocks the queue after a flight has started or ended, then does what `dispatch`
    /// left to do.
    fn settle(self: &Arc<Self>, mut queue: MutexGuard<'_, Queue>) {
        let followup = self.dispatch(&mut queue);
        drop(queue);
        followup.run();
    }

    /// After a flight has started or ended: a flusher task to start for the queued pushes
    /// when none is gathering and there is room; with no flight left, `close` woken and
    /// the connection to let go (unless it is kept).
    fn dispatch(self: &Arc<Self>, queue: &mut Queue) -> Followup {
        let mut followup = Followup {
            flight: None,
            release: None,
        };
        if !queue.pending.is_empty() && !queue.gathering && queue.flights < self.depth() {
            queue.flights += 1;
            queue.gathering = true;
            followup.flight = Some(self.clone());
        }
        if queue.flights == 0 {
            self.idle.notify_waiters();
            if !self.keep_held {
                followup.release = self.held.lock().expect("held connection lock").take();
            }
        }
        followup
    }

    /// A flusher task: one flight, which takes batches from the queue until it is empty.
    /// Its flight is given back if the task is dropped unfinished, even unpolled (see
    /// `Abandon`).
    fn fly(self: Arc<Self>) -> impl Future<Output = ()> + Send + 'static {
        let guard = Abandon(Some(self));
        async move {
            let mut guard = guard;
            if let Some(shared) = &guard.0 {
                shared.fly_batches().await;
            }
            guard.0 = None;
        }
    }

    /// The work of a flusher task's flight.
    async fn fly_batches(self: &Arc<Self>) {
        if !self.max_batch_wait.is_zero() {
            // Let company gather, up to the bound.
            let deadline = Instant::now() + self.max_batch_wait;
            while Instant::now() < deadline && self.queued() < self.max_batch {
                tokio::time::sleep(Duration::from_micros(100).min(self.max_batch_wait)).await;
            }
        }
        let mut gatherer = true;
        // Whether pushers were just woken who may push again: those of the flight that
        // ended to make room for this one, then those of this flusher's last batch.
        let mut woken = true;
        loop {
            if woken {
                self.let_company_in().await;
            }
            let Some(batch) = self.next_batch(std::mem::take(&mut gatherer)) else {
                break;
            };
            // A batch of one push woke one pusher: made to wait, a pusher in a loop
            // would be queued behind this flusher for good, where with the flight over
            // its next push goes out at once, alone.
            woken = batch.len() > 1;
            let outcome = self
                .flush(
                    batch
                        .iter()
                        .flat_map(|r| r.updates.iter().map(String::as_str)),
                )
                .await
                .map_err(Arc::new);
            for request in batch {
                // A pusher that gave up (timeout, cancelled) no longer listens: fine.
                let _ = request.done.send(outcome.clone());
            }
        }
    }

    /// Before a flusher takes a batch, when a flight has just ended: its pushers were woken
    /// a moment ago and push again as soon as they run, so a few turns of the scheduler
    /// let them join this batch instead of waiting a whole flight for the next. (Without
    /// them, 16 pushers settle into two batches of about 8 that take turns, one waiting
    /// while the other is out.) Turns are given while the last one brought updates, at
    /// most `GATHER_TURNS`, and none once a full batch is queued.
    async fn let_company_in(&self) {
        let mut queued = self.queued();
        for _ in 0..GATHER_TURNS {
            if queued >= self.max_batch {
                break;
            }
            tokio::task::yield_now().await;
            let now = self.queued();
            if now == queued {
                break;
            }
            queued = now;
        }
    }

    fn queued(&self) -> usize {
        let queue = self.queue.lock().expect("push queue lock");
        queue.pending.iter().map(|r| r.updates.len()).sum()
    }

    /// The next batch of queued pushes (up to the batch bound) for a flusher task's flight,
    /// `gatherer` on its first; `None`, with the flight over, when nothing is queued. When
    /// more is queued than the batch takes, another flight may start.
    fn next_batch(self: &Arc<Self>, gatherer: bool) -> Option<Vec<Request>> {
        let mut queue = self.queue.lock().expect("push queue lock");
        if gatherer {
            queue.gathering = false;
        }
        let mut count = 0;
        let mut batch = Vec::new();
        while let Some(request) = queue.pending.front() {
            if request.done.is_closed() {
                // Its caller gave up (timed out or cancelled) before it was sent: it was
                // told it failed, so it must not be sent now.
                queue.pending.pop_front();
                continue;
            }
            if count > 0 && count + request.updates.len() > self.max_batch {
                break;
            }
            count += request.updates.len();
            batch.push(queue.pending.pop_front().expect("a front request"));
        }
        if batch.is_empty() {
            queue.flights -= 1;
        }
        self.settle(queue);
        (!batch.is_empty()).then_some(batch)
    }

    /// Sends one batch of encoded updates in one statement, within the push timeout.
    async fn flush<'a>(&self, encoded: impl IntoIterator<Item = &'a str>) -> Result<(), Error> {
        let marks = Marks {
            transactional: false,
            durable: self.durable,
        };
        let packed = OnceLock::new();
        let outcome = self
            .flush_packed(&packed, || self.pack(encoded, marks), marks)
            .await;
        if let Err(e) = &outcome {
            let envelopes = packed.get().map_or(0, Vec::len);
            // Every push of the batch returns the error to its caller, who decides whether
            // it is worth a warning; the library only records it.
            tracing::debug!(target: TARGET, error = %e, envelopes, "a push batch failed");
        }
        outcome
    }

    /// Sends a batch by the deadline, packed (numbered) by `pack` when it is sent into
    /// `packed`. A durable batch may be sent twice.
    async fn flush_packed(
        &self,
        packed: &OnceLock<Payloads>,
        pack: impl FnOnce() -> Payloads,
        marks: Marks,
    ) -> Result<(), Error> {
        let deadline = Instant::now() + self.timeout;
        let mut pack = Some(pack);
        let mut used = None;
        let mut retried = false;
        loop {
            match self
                .until(deadline, self.send(packed, &mut pack, &mut used, marks))
                .await
            {
                Ok(Ok(())) => {
                    self.counters.batch();
                    return Ok(());
                }
                // A durable batch is idempotent (its log rows are unique by sender and
                // number), so one retry on a fresh connection is safe when the first try's
                // fate is unknown: a duplicate is refused, which proves the first committed.
                Ok(Err(Error::Postgres(e)))
                    if self.durable && !retried && e.as_db_error().is_none() =>
                {
                    retried = true;
                    tracing::debug!(target: TARGET, error = %e, "retrying a durable batch");
                }
                Ok(Err(Error::Postgres(e)))
                    if retried
                        && e.code() == Some(&tokio_postgres::error::SqlState::UNIQUE_VIOLATION) =>
                {
                    self.counters.batch();
                    return Ok(());
                }
                Ok(Err(e)) => return Err(e),
                Err(_) => {
                    // The server did not answer in time: whatever this connection is busy
                    // with, later flights must not queue behind it.
                    if let Some(held) = &used {
                        self.discard(held);
                    }
                    return Err(Error::Timeout {
                        what: "pushing",
                        after: self.timeout,
                    });
                }
            }
        }
    }

    /// Runs `work` until `deadline` (`Err` past it) on a timer kept from flight to flight.
    /// Moving a registered timer later is a compare-and-swap, where a new timer per flight
    /// takes the timer wheel's lock twice and, whenever it is the earliest, wakes a parked
    /// runtime thread to re-arm its wait (perf and strace saw both). Kept only within one
    /// runtime: a timer must not outlive the runtime that drives it.
    async fn until<T>(&self, deadline: Instant, work: impl Future<Output = T>) -> Result<T, ()> {
        let runtime = tokio::runtime::Handle::current().id();
        let kept = {
            let mut timers = self.flush_timers.lock().expect("flush timers lock");
            // Another runtime's timers are let go (that runtime may be gone).
            std::iter::from_fn(|| timers.pop()).find(|(id, _)| *id == runtime)
        };
        let mut timer = match kept {
            Some((_, mut timer)) => {
                timer.as_mut().reset(deadline);
                timer
            }
            None => Box::pin(tokio::time::sleep_until(deadline)),
        };
        let outcome = {
            let work = std::pin::pin!(work);
            tokio::select! {
                biased;
                done = work => Ok(done),
                () = &mut timer => Err(()),
            }
        };
        self.flush_timers
            .lock()
            .expect("flush timers lock")
            .push((runtime, timer));
        outcome
    }

    /// One try at sending a batch on the flights' connection, which it notes in `used`.
    /// The first try packs the batch, taking its numbers, and sends it in one step under
    /// the order lock; a second try sends the same envelopes. A connection whose send
    /// fails is let go.
    async fn send(
        &self,
        packed: &OnceLock<Payloads>,
        pack: &mut Option<impl FnOnce() -> Payloads>,
        used: &mut Option<Arc<Held>>,
        marks: Marks,
    ) -> Result<(), Error> {
        loop {
            let held = self.connection().await?;
            *used = Some(held.clone());
            let client = held.client();
            let statements = if self.unnamed.load(Ordering::Relaxed) {
                None
            } else {
                match held.statements(self.durable).await {
                    Ok(statements) => Some(statements),
                    Err(e) if is_proxy_refusal(&e) => {
                        self.use_unnamed();
                        None
                    }
                    Err(e) => return Err(self.failed(&held, e)),
                }
            };
            let mut request = std::pin::pin!(async {
                let payloads = packed.get_or_init(|| pack.take().expect("packed once")());
                self.execute(client, statements, payloads, marks).await
            });
            // Until its first await, the request takes its numbers and hands its statement
            // to the connection (a prepared statement is sent at once, an unnamed one too):
            // polling it first under the order lock sends flights in number order, on the
            // connection in the slot. One let go meanwhile (another flight failed on it) is
            // not used: a flight after ours could be on its replacement already.
            let first = std::future::poll_fn(|cx| {
                let _order = self.order.lock().expect("send order lock");
                if !self.is_current(&held) {
                    return Poll::Ready(None);
                }
                Poll::Ready(Some(request.as_mut().poll(cx)))
            })
            .await;
            let mut sent = match first {
                None => continue,
                Some(Poll::Ready(sent)) => sent,
                Some(Poll::Pending) => request.await,
            };
            if let Err(e) = &sent
                && statements.is_some()
                && is_proxy_refusal(e)
            {
                // Nothing was executed: the statement could not be found. Sent again
                // unnamed, after any flight pipelined behind it (a listener may see a gap
                // once).
                self.use_unnamed();
                let payloads = packed.get().expect("packed before it was sent");
                sent = self.execute(client, None, payloads, marks).await;
            }
            return match sent {
                Ok(_) => Ok(()),
                Err(e) => Err(self.failed(&held, e)),
            };
        }
    }

    /// Prepared statements do not survive between transactions here: a
    /// transaction-pooling proxy. Unnamed statements from now on, one flight at a time.
    fn use_unnamed(&self) {
        if !self.unnamed.swap(true, Ordering::Relaxed) {
            tracing::warn!(target: TARGET, "prepared statements do not last on this connection (a transaction-pooling proxy?): using unnamed statements");
        }
    }

    /// A send failed: its connection is let go. After a statement error it may be fine (or
    /// on its way out: a terminated backend reports an error too), so the pool checks it;
    /// otherwise its state is unknown and it is closed.
    fn failed(&self, held: &Arc<Held>, e: tokio_postgres::Error) -> Error {
        if e.as_db_error().is_some() {
            self.let_go(held);
        } else {
            self.discard(held);
        }
        Error::Postgres(e)
    }

    /// Lets a connection go whose state is unknown (a send on it failed midway or ran past
    /// the deadline): closed, not pooled again, once the flights on it are over.
    fn discard(&self, held: &Arc<Held>) {
        held.broken.store(true, Ordering::Relaxed);
        self.let_go(held);
    }

    /// Whether `held` is still the connection flights go out on.
    fn is_current(&self, held: &Arc<Held>) -> bool {
        let slot = self.held.lock().expect("held connection lock");
        slot.as_ref().is_some_and(|kept| Arc::ptr_eq(kept, held))
            && !held.broken.load(Ordering::Relaxed)
    }

    /// Takes a connection out of the flights' slot (later flights take another); it goes
    /// back to the pool, or is closed if broken, once the flights on it are over.
    fn let_go(&self, held: &Arc<Held>) {
        let mut slot = self.held.lock().expect("held connection lock");
        let released = slot.take_if(|kept| Arc::ptr_eq(kept, held));
        drop(slot);
        drop(released);
    }

    /// The connection flights go out on: the one in the slot while it is open, otherwise a
    /// pooled one, checked out by one flight at a time (concurrent flights share it).
    async fn connection(&self) -> Result<Arc<Held>, Error> {
        if let Some(held) = self.usable() {
            return Ok(held);
        }
        let _turn = self.connecting.lock().await;
        if let Some(held) = self.usable() {
            return Ok(held);
        }
        // One closed since it was kept (a server restart) goes first, so that the pool,
        // which discards it, has room for its replacement.
        let closed = self.held.lock().expect("held connection lock").take();
        drop(closed);
        let held = Arc::new(Held {
            client: Some(self.checkout().await?),
            broken: AtomicBool::new(false),
            statements: tokio::sync::OnceCell::new(),
        });
        *self.held.lock().expect("held connection lock") = Some(held.clone());
        Ok(held)
    }

    /// The connection in the slot, if it is open.
    fn usable(&self) -> Option<Arc<Held>> {
        let slot = self.held.lock().expect("held connection lock");
        slot.as_ref()
            .filter(|held| !held.client().is_closed() && !held.broken.load(Ordering::Relaxed))
            .cloned()
    }

    /// Runs a batch's one statement: prepared on the connection (the fast way), or unnamed
    /// (`None`), with its parameter types, which no transaction-pooling proxy breaks.
    /// Sends before its first await.
    async fn execute(
        &self,
        client: &tokio_postgres::Client,
        statements: Option<&Statements>,
        payloads: &[(u64, String)],
        marks: Marks,
    ) -> Result<u64, tokio_postgres::Error> {
        let channel = self.channel.as_str();
        match statements {
            None => self.execute_unnamed(client, payloads, marks).await,
            Some(Statements::Durable(statement)) => {
                let (seqs, logged, notes) = self.durable_parts(payloads, marks);
                client
                    .execute(statement, &[&channel, &self.origin, &seqs, &logged, &notes])
                    .await
            }
            Some(Statements::Notify { one, .. }) if payloads.len() == 1 => {
                client.execute(one, &[&channel, &payloads[0].1]).await
            }
            Some(Statements::Notify { many, .. }) => {
                let notes: Vec<&str> = payloads.iter().map(|(_, p)| p.as_str()).collect();
                client.execute(many, &[&channel, &notes]).await
            }
        }
    }

    /// The same statements, unnamed and with their parameter types given, on any client
    /// (the pool's, or the caller's in `push_in`): no transaction-pooling proxy breaks
    /// them. Nothing to send is no statement.
    async fn execute_unnamed<C: GenericClient + Sync>(
        &self,
        client: &C,
        payloads: &[(u64, String)],
        marks: Marks,
    ) -> Result<u64, tokio_postgres::Error> {
        if payloads.is_empty() {
            return Ok(0);
        }
        let channel = self.channel.as_str();
        if self.durable {
            let (seqs, logged, notes) = self.durable_parts(payloads, marks);
            let params: [(&(dyn ToSql + Sync), Type); 5] = [
                (&channel, Type::TEXT),
                (&self.origin, Type::TEXT),
                (&seqs, Type::INT8_ARRAY),
                (&logged, Type::TEXT_ARRAY),
                (&notes, Type::TEXT_ARRAY),
            ];
            return client.execute_typed(LOG_AND_NOTIFY, &params).await;
        }
        if let [(_, payload)] = payloads {
            return client
                .execute_typed(NOTIFY_ONE, &[(&channel, Type::TEXT), (payload, Type::TEXT)])
                .await;
        }
        let notes: Vec<&str> = payloads.iter().map(|(_, p)| p.as_str()).collect();
        client
            .execute_typed(
                NOTIFY_MANY,
                &[(&channel, Type::TEXT), (&notes, Type::TEXT_ARRAY)],
            )
            .await
    }

    /// A durable batch's parameters: the numbers and envelopes for the log, and the
    /// notifications, each the envelope itself or, when too large, a reference to it.
    fn durable_parts<'p>(
        &self,
        payloads: &'p [(u64, String)],
        marks: Marks,
    ) -> (Vec<i64>, Vec<&'p str>, Vec<std::borrow::Cow<'p, str>>) {
        let seqs = payloads.iter().map(|(seq, _)| *seq as i64).collect();
        let logged = payloads.iter().map(|(_, p)| p.as_str()).collect();
        let notes = payloads
            .iter()
            .map(|(seq, p)| {
                if p.len() <= MAX_PAYLOAD_LEN {
                    std::borrow::Cow::Borrowed(p.as_str())
                } else {
                    std::borrow::Cow::Owned(self.packer.reference(*seq, marks))
                }
            })
            .collect();
        (seqs, logged, notes)
    }

    /// Packs encoded updates into envelopes, each with a fresh sequence number, so no two
    /// payloads are ever identical (PostgreSQL folds identical ones in a transaction).
    fn pack<'a>(
        &self,
        encoded: impl IntoIterator<Item = &'a str>,
        marks: Marks,
    ) -> Vec<(u64, String)> {
        let counter = if marks.transactional {
            &self.tx_seq
        } else {
            &self.seq
        };
        self.packer
            .pack(encoded, marks, || counter.fetch_add(1, Ordering::Relaxed))
    }

    /// Runs `work` within the push timeout.
    async fn within<T>(
        &self,
        what: &'static str,
        work: impl Future<Output = Result<T, Error>>,
    ) -> Result<T, Error> {
        tokio::time::timeout(self.timeout, work)
            .await
            .unwrap_or(Err(Error::Timeout {
                what,
                after: self.timeout,
            }))
    }

    /// A pooled connection, with the pool's errors told as what they mean to the caller.
    async fn checkout(&self) -> Result<Object, Error> {
        self.pool.get().await.map_err(|e| match e {
            PoolError::Backend(e) => self
                .connect_failure
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .take()
                .unwrap_or(Error::Postgres(e)),
            PoolError::Timeout(_) => Error::Timeout {
                what: "waiting for a pooled connection",
                after: self.timeout,
            },
            PoolError::Closed => Error::Closed,
            other => Error::Pool(other),
        })
    }
}

impl Held {
    fn client(&self) -> &tokio_postgres::Client {
        self.client.as_ref().expect("a held connection's client")
    }

    /// The statements for this pipe's flights, prepared on this connection the first time
    /// (through the pool's statement cache, so a connection that comes back from the pool
    /// does not prepare them again).
    async fn statements(&self, durable: bool) -> Result<&Statements, tokio_postgres::Error> {
        let client = self.client.as_ref().expect("a held connection's client");
        self.statements
            .get_or_try_init(|| async {
                if durable {
                    return Ok(Statements::Durable(
                        client.prepare_cached(LOG_AND_NOTIFY).await?,
                    ));
                }
                Ok(Statements::Notify {
                    one: client.prepare_cached(NOTIFY_ONE).await?,
                    many: client.prepare_cached(NOTIFY_MANY).await?,
                })
            })
            .await
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        if let Some(client) = self.client.take()
            && self.broken.load(Ordering::Relaxed)
        {
            drop(Object::take(client));
        }
    }
}

/// The errors of a transaction-pooling proxy that does not keep prepared statements.
fn is_proxy_refusal(e: &tokio_postgres::Error) -> bool {
    matches!(
        e.code(),
        Some(&SqlState::DUPLICATE_PSTATEMENT | &SqlState::INVALID_SQL_STATEMENT_NAME)
    )
}
