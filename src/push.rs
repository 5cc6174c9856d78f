//! The push path: updates become version 1 envelopes sent with `pg_notify` on the shared
//! channel, through the pool or inside the caller's own transaction.
//!
//! Pool pushes are batched. Each push encodes and checks its own updates (so a bad update
//! fails only its own push), then queues them. One flush is in flight at a time: it sends
//! whatever is queued in one statement (one transaction), packing the updates into as few
//! envelopes as fit; while it is in flight, new pushes gather for the next. A push that
//! finds no flush in flight sends its own updates at once, on its own task (no hand-off, so a
//! lone push costs what a plain `pg_notify` costs); when it is done and others have queued
//! meanwhile, a flusher task takes over until the queue is empty. Every push resolves only
//! when the transaction holding its updates has committed, with that transaction's outcome.

use std::collections::VecDeque;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use deadpool_postgres::{
    Manager, ManagerConfig, Object, Pool, PoolError, RecyclingMethod, Runtime, Timeouts,
};
use tokio::sync::{Notify, oneshot};
use tokio::time::Instant;
use tokio_postgres::GenericClient;
use tokio_postgres::error::SqlState;
use tokio_postgres::types::{ToSql, Type};

use crate::config::Config;
use crate::envelope::{MAX_LOGGED_ENVELOPE_LEN, MAX_PAYLOAD_LEN, Marks, Origin, Packer};
use crate::error::Error;
use crate::log::LOG_AND_NOTIFY;
use crate::stats::Counters;
use crate::update::Update;

const TARGET: &str = "updatepipe::push";

/// One notification: the channel and payload are parameters, never SQL text.
const NOTIFY_ONE: &str = "SELECT pg_notify($1, $2)";

/// Several notifications in one statement, so in one transaction and one round trip, in
/// array order.
const NOTIFY_MANY: &str =
    "SELECT pg_notify($1, p) FROM unnest($2::text[]) WITH ORDINALITY AS t(p, n) ORDER BY n";

/// Where the numbers of envelopes pushed inside callers' transactions start (2⁶²).
pub(crate) const TRANSACTIONAL_SEQ_BASE: u64 = 1 << 62;

/// Sends this pipe's updates.
#[derive(Debug)]
pub(crate) struct Pusher {
    shared: Arc<Shared>,
}

/// What the pipe's handles and its flushers share.
#[derive(Debug)]
struct Shared {
    pool: Pool,
    channel: String,
    origin: String,
    durable: bool,
    packer: Packer,
    /// Send unnamed statements (set for good once prepared ones fail: a transaction-pooling
    /// proxy).
    unnamed: AtomicBool,
    /// Numbers for pool pushes: consecutive, and committed in order (one flush at a time),
    /// so a listener that sees one skipped knows it missed something.
    seq: AtomicU64,
    /// Numbers for pushes in callers' transactions, from a range of their own: those may
    /// roll back or commit out of order, so listeners do not check them for gaps.
    tx_seq: AtomicU64,
    timeout: Duration,
    max_batch: usize,
    max_batch_wait: Duration,
    counters: Arc<Counters>,
    queue: Mutex<Queue>,
    /// The connection the last flush went out on, kept for the next one (flushes take turns,
    /// so one serves them all) instead of going back to the pool: a pool round trip per
    /// flush is a measurable part of a lone push. Kept only with a pool of 3 or more, so
    /// that the listener's heartbeats need not queue behind `queue_usage` or `status` for
    /// the one other connection.
    held: Mutex<Option<Object>>,
    keep_held: bool,
    /// The flushes' timer, and the runtime it belongs to (see `Shared::until`).
    flush_timer: Mutex<Option<(tokio::runtime::Id, Pin<Box<tokio::time::Sleep>>)>>,
    /// Signalled whenever the last flush ends with nothing queued.
    idle: Notify,
}

/// The pushes waiting for a flush, and whether one is in flight.
#[derive(Debug, Default)]
struct Queue {
    pending: VecDeque<Request>,
    flushing: bool,
    closed: bool,
}

/// How a push goes out: alone and at once (no flush was in flight), or queued for the next
/// flush, which it starts (`lead`) when none was in flight.
enum Turn {
    Alone(Vec<String>),
    Queued {
        lead: bool,
        outcome: oneshot::Receiver<Result<(), Arc<Error>>>,
    },
}

/// One push waiting for a flush: its updates, already encoded and checked, and where to
/// send the outcome.
#[derive(Debug)]
struct Request {
    updates: Vec<String>,
    done: oneshot::Sender<Result<(), Arc<Error>>>,
}

impl Pusher {
    /// A pusher with its pool. Nothing connects until the first push.
    pub(crate) fn new(
        config: &Config,
        origin: Origin,
        counters: Arc<Counters>,
    ) -> Result<Self, Error> {
        let manager = Manager::from_config(
            config.pg().clone(),
            config.tls_connector()?,
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
                create: Some(config.connect_timeout()),
                recycle: Some(config.connect_timeout()),
            })
            .build()
            .map_err(|e| Error::Config(format!("cannot build the connection pool: {e}")))?;
        let shared = Arc::new(Shared {
            pool,
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
            counters,
            queue: Mutex::new(Queue::default()),
            held: Mutex::new(None),
            keep_held: config.pool_size() >= 3,
            flush_timer: Mutex::new(None),
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
            let lead = !std::mem::replace(&mut queue.flushing, true);
            if lead && shared.max_batch_wait.is_zero() {
                Turn::Alone(encoded)
            } else {
                let (done, outcome) = oneshot::channel();
                queue.pending.push_back(Request {
                    updates: encoded,
                    done,
                });
                Turn::Queued { lead, outcome }
            }
        };
        let outcome = match turn {
            Turn::Alone(encoded) => {
                // No flush was in flight: these updates go out alone, from here, at once (no
                // hand-off). Alone: if the caller gives up midway, no other push's flush is
                // cut short with it. Pushes that queue meanwhile go to a flusher task after.
                let mut guard = LeadGuard(Some(shared.clone()));
                let sent = shared.flush(encoded.iter().map(String::as_str)).await;
                guard.0 = None;
                shared.clone().hand_over();
                sent.map_err(Arc::new)
            }
            Turn::Queued { lead, outcome } => {
                if lead {
                    tokio::spawn(shared.clone().drain());
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

    /// Stops taking pushes, lets the flushes in flight finish what is queued, then closes
    /// the pool.
    pub(crate) async fn close(&self) {
        let shared = &self.shared;
        loop {
            let idle = shared.idle.notified();
            {
                let mut queue = shared.queue.lock().expect("push queue lock");
                queue.closed = true;
                if !queue.flushing {
                    break;
                }
            }
            idle.await;
        }
        drop(shared.held.lock().expect("held connection lock").take());
        // The timer holds its runtime's driver: let it go with the pipe's work.
        drop(shared.flush_timer.lock().expect("flush timer lock").take());
        shared.pool.close();
    }
}

/// Hands the queue to a flusher task if the push leading it is dropped mid-flush (its
/// caller gave up), so the pushes queued behind it are not stranded.
struct LeadGuard(Option<Arc<Shared>>);

impl Drop for LeadGuard {
    fn drop(&mut self) {
        if let Some(shared) = self.0.take() {
            shared.hand_over();
        }
    }
}

impl Shared {
    /// Ends a flush: with nothing queued, no flush is in flight any more; otherwise a
    /// flusher task takes over.
    fn hand_over(self: Arc<Self>) {
        let mut queue = self.queue.lock().expect("push queue lock");
        if queue.pending.is_empty() {
            queue.flushing = false;
            drop(queue);
            self.idle.notify_waiters();
            return;
        }
        drop(queue);
        match tokio::runtime::Handle::try_current() {
            Ok(runtime) => {
                runtime.spawn(self.drain());
            }
            // No runtime (it is shutting down): nothing can be sent any more.
            Err(_) => self.abandon(),
        }
    }

    /// Gives up what is queued (each waiting push is told the pipe is closed) and ends the
    /// flush: the runtime that was to send it is gone.
    fn abandon(&self) {
        let mut queue = self.queue.lock().expect("push queue lock");
        queue.pending.clear();
        queue.flushing = false;
        drop(queue);
        self.idle.notify_waiters();
    }

    /// A flusher task: flushes until the queue is empty.
    async fn drain(self: Arc<Self>) {
        // Dropped unfinished (its runtime shut down), the task must not leave the queue
        // claimed: later pushes would wait behind it forever.
        struct Abandon<'a>(Option<&'a Shared>);
        impl Drop for Abandon<'_> {
            fn drop(&mut self) {
                if let Some(shared) = self.0 {
                    shared.abandon();
                }
            }
        }
        let mut guard = Abandon(Some(&self));
        if !self.max_batch_wait.is_zero() {
            // Let company gather, up to the bound.
            let deadline = Instant::now() + self.max_batch_wait;
            while Instant::now() < deadline && self.queued() < self.max_batch {
                tokio::time::sleep(Duration::from_micros(100).min(self.max_batch_wait)).await;
            }
        }
        loop {
            if !self.flush_queued().await {
                guard.0 = None;
                return;
            }
        }
    }

    fn queued(&self) -> usize {
        let queue = self.queue.lock().expect("push queue lock");
        queue.pending.iter().map(|r| r.updates.len()).sum()
    }

    /// Flushes one batch of queued pushes (up to the batch bound) and resolves them.
    /// Returns false, with the flush marked finished, when the queue was empty.
    async fn flush_queued(&self) -> bool {
        let batch = {
            let mut queue = self.queue.lock().expect("push queue lock");
            if queue.pending.is_empty() {
                queue.flushing = false;
                drop(queue);
                self.idle.notify_waiters();
                return false;
            }
            let mut count = 0;
            let mut batch = Vec::new();
            while let Some(request) = queue.pending.front() {
                if request.done.is_closed() {
                    // Its caller gave up (timed out or cancelled) before it was sent: it
                    // was told it failed, so it must not be sent now.
                    queue.pending.pop_front();
                    continue;
                }
                if count > 0 && count + request.updates.len() > self.max_batch {
                    break;
                }
                count += request.updates.len();
                batch.push(queue.pending.pop_front().expect("a front request"));
            }
            batch
        };
        if batch.is_empty() {
            // Every queued push had been given up: look again.
            return true;
        }
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
        true
    }

    /// Sends one batch of encoded updates in one statement, within the push timeout.
    async fn flush<'a>(&self, encoded: impl IntoIterator<Item = &'a str>) -> Result<(), Error> {
        let marks = Marks {
            transactional: false,
            durable: self.durable,
        };
        let payloads = self.pack(encoded, marks);
        let outcome = self.flush_payloads(&payloads, marks).await;
        if let Err(e) = &outcome {
            tracing::warn!(target: TARGET, error = %e, envelopes = payloads.len(), "a push batch failed");
        }
        outcome
    }

    /// Sends packed payloads in one statement by the deadline (a durable batch may try twice).
    async fn flush_payloads(&self, payloads: &[(u64, String)], marks: Marks) -> Result<(), Error> {
        let deadline = Instant::now() + self.timeout;
        let mut retried = false;
        loop {
            match self.until(deadline, self.send(payloads, marks)).await {
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
                    return Err(Error::Timeout {
                        what: "pushing",
                        after: self.timeout,
                    });
                }
            }
        }
    }

    /// Runs `work` until `deadline` (`Err` past it) on a timer kept from flush to flush
    /// (they take turns). Moving a registered timer later is a compare-and-swap, where a new
    /// timer per flush takes the timer wheel's lock twice and, whenever it is the earliest,
    /// wakes a parked runtime thread to re-arm its wait (perf and strace saw both). Kept
    /// only within one runtime: a timer must not outlive the runtime that drives it.
    async fn until<T>(&self, deadline: Instant, work: impl Future<Output = T>) -> Result<T, ()> {
        let runtime = tokio::runtime::Handle::current().id();
        let kept = self
            .flush_timer
            .lock()
            .expect("flush timer lock")
            .take()
            .filter(|(id, _)| *id == runtime);
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
        *self.flush_timer.lock().expect("flush timer lock") = Some((runtime, timer));
        outcome
    }

    /// One try at sending a batch's payloads on a pooled connection. A connection that
    /// fails (or is abandoned on timeout) is taken out of the pool.
    async fn send(&self, payloads: &[(u64, String)], marks: Marks) -> Result<(), Error> {
        let held = self.held.lock().expect("held connection lock").take();
        let mut client = match held {
            Some(client) => client,
            None => self.checkout().await?,
        };
        if client.is_closed() {
            // Closed since it was pooled (a server restart): nothing was sent on it yet.
            drop(Object::take(client));
            client = self.checkout().await?;
        }
        let mut guard = Discard(Some(client));
        let client = guard.0.as_ref().expect("a client");
        let mut sent = self
            .execute(
                client,
                payloads,
                marks,
                self.unnamed.load(Ordering::Relaxed),
            )
            .await;
        if let Err(e) = &sent
            && !self.unnamed.load(Ordering::Relaxed)
            && matches!(
                e.code(),
                Some(&SqlState::DUPLICATE_PSTATEMENT | &SqlState::INVALID_SQL_STATEMENT_NAME)
            )
        {
            // Prepared statements do not survive between transactions here: a
            // transaction-pooling proxy. Nothing was executed (the statement could not be
            // prepared or found); send unnamed statements from now on.
            tracing::warn!(target: TARGET, "prepared statements do not last on this connection (a transaction-pooling proxy?): using unnamed statements");
            self.unnamed.store(true, Ordering::Relaxed);
            sent = self.execute(client, payloads, marks, true).await;
        }
        match sent {
            Ok(_) => {
                self.release(guard.0.take());
                Ok(())
            }
            Err(e) => {
                if e.as_db_error().is_some() {
                    // The statement failed; the connection may be fine (or on its way out:
                    // a terminated backend reports an error too), so the pool checks it.
                    drop(guard.0.take());
                }
                Err(Error::Postgres(e))
            }
        }
    }

    /// Keeps a connection that served a flush for the next one, or gives it back to the
    /// pool (which checks it before anyone uses it again).
    fn release(&self, client: Option<Object>) {
        if self.keep_held && client.as_ref().is_some_and(|c| !c.is_closed()) {
            let mut held = self.held.lock().expect("held connection lock");
            if held.is_none() {
                *held = client;
                return;
            }
        }
        drop(client);
    }

    /// Runs a batch's one statement: prepared and cached on the connection (the fast way),
    /// or `unnamed`, with its parameter types, which no transaction-pooling proxy breaks.
    async fn execute(
        &self,
        client: &Object,
        payloads: &[(u64, String)],
        marks: Marks,
        unnamed: bool,
    ) -> Result<u64, tokio_postgres::Error> {
        if unnamed {
            let client: &tokio_postgres::Client = client;
            return self.execute_unnamed(client, payloads, marks).await;
        }
        let channel = self.channel.as_str();
        if self.durable {
            let (seqs, logged, notes) = self.durable_parts(payloads, marks);
            let statement = client.prepare_cached(LOG_AND_NOTIFY).await?;
            return client
                .execute(
                    &statement,
                    &[&channel, &self.origin, &seqs, &logged, &notes],
                )
                .await;
        }
        if let [(_, payload)] = payloads {
            let statement = client.prepare_cached(NOTIFY_ONE).await?;
            return client.execute(&statement, &[&channel, payload]).await;
        }
        let notes: Vec<&str> = payloads.iter().map(|(_, p)| p.as_str()).collect();
        let statement = client.prepare_cached(NOTIFY_MANY).await?;
        client.execute(&statement, &[&channel, &notes]).await
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
            PoolError::Backend(e) => Error::Connect(e),
            PoolError::Timeout(_) => Error::Timeout {
                what: "waiting for a pooled connection",
                after: self.timeout,
            },
            PoolError::Closed => Error::Closed,
            other => Error::Pool(other),
        })
    }
}

/// A pooled connection that is taken out of the pool when dropped still held: the send it
/// served failed or was abandoned midway (timeout, cancellation), so its state is unknown.
struct Discard(Option<Object>);

impl Drop for Discard {
    fn drop(&mut self) {
        if let Some(client) = self.0.take() {
            drop(Object::take(client));
        }
    }
}
