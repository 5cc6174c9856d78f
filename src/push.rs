//! The push path: updates become version 1 envelopes sent with `pg_notify` on the shared
//! channel, through the pool or inside the caller's own transaction.
//!
//! Pool pushes are batched. Each push encodes and checks its own updates (so a bad update
//! fails only its own push), then queues them for the pipe's flusher task. The flusher sends
//! whatever is queued in one statement (one transaction), packing the updates into as few
//! envelopes as fit; while that flush is in flight, new pushes gather for the next. A lone
//! push at low load goes out at once. Every push resolves only when the transaction holding
//! its updates has committed, with that transaction's outcome.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use deadpool_postgres::{
    Manager, ManagerConfig, Object, Pool, PoolError, RecyclingMethod, Runtime, Timeouts,
};
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_postgres::{GenericClient, NoTls};

use crate::config::Config;
use crate::envelope::{Origin, Packer};
use crate::error::Error;
use crate::stats::Counters;
use crate::update::Update;

const TARGET: &str = "updatepipe::push";

/// One notification: the channel and payload are parameters, never SQL text.
const NOTIFY_ONE: &str = "SELECT pg_notify($1, $2)";

/// Several notifications in one statement, so in one transaction and one round trip, in
/// array order.
const NOTIFY_MANY: &str =
    "SELECT pg_notify($1, p) FROM unnest($2::text[]) WITH ORDINALITY AS t(p, n) ORDER BY n";

/// Sends this pipe's updates.
#[derive(Debug)]
pub(crate) struct Pusher {
    shared: Arc<Shared>,
    queue: Mutex<Option<mpsc::Sender<Request>>>,
    flusher: Mutex<Option<JoinHandle<()>>>,
}

/// What the pipe's handles and its flusher task share.
#[derive(Debug)]
struct Shared {
    pool: Pool,
    channel: String,
    packer: Packer,
    seq: AtomicU64,
    timeout: Duration,
    max_batch: usize,
    max_batch_wait: Duration,
    counters: Arc<Counters>,
}

/// One push waiting for the flusher: its updates, already encoded and checked, and where to
/// send the outcome.
#[derive(Debug)]
struct Request {
    updates: Vec<String>,
    done: oneshot::Sender<Result<(), Arc<Error>>>,
}

impl Pusher {
    /// A pusher with its pool and flusher task. Nothing connects until the first push.
    pub(crate) fn new(
        config: &Config,
        origin: Origin,
        counters: Arc<Counters>,
    ) -> Result<Self, Error> {
        let manager = Manager::from_config(
            config.pg().clone(),
            NoTls,
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
            packer: Packer::new(&origin, std::process::id()),
            seq: AtomicU64::new(1),
            timeout: config.push_timeout(),
            max_batch: config.max_batch(),
            max_batch_wait: config.max_batch_wait(),
            counters,
        });
        // The queue's bound only limits memory; pushers are limited by awaiting their turn.
        let (queue, requests) = mpsc::channel(config.max_batch().clamp(64, 65_536));
        let flusher = tokio::spawn(shared.clone().run(requests));
        Ok(Pusher {
            shared,
            queue: Mutex::new(Some(queue)),
            flusher: Mutex::new(Some(flusher)),
        })
    }

    /// Checks out a connection and proves it works: early errors for `init_push`.
    pub(crate) async fn init(&self) -> Result<(), Error> {
        let shared = &self.shared;
        tokio::time::timeout(shared.timeout, async {
            let client = shared.checkout().await?;
            client.prepare_cached(NOTIFY_ONE).await?;
            client.prepare_cached(NOTIFY_MANY).await?;
            Ok(())
        })
        .await
        .unwrap_or(Err(Error::Timeout {
            what: "preparing to push",
            after: shared.timeout,
        }))
    }

    /// Sends updates through the pool, batched with concurrent pushes; returns once they are
    /// committed. All of them travel in one transaction: delivered together or not at all.
    pub(crate) async fn push(&self, updates: &[Update]) -> Result<(), Error> {
        let encoded = self.encode(updates)?;
        if encoded.is_empty() {
            return Ok(());
        }
        let queue = self
            .queue
            .lock()
            .expect("queue lock")
            .clone()
            .ok_or(Error::Closed)?;
        let (done, outcome) = oneshot::channel();
        let timeout = self.shared.timeout;
        let work = async {
            let request = Request {
                updates: encoded,
                done,
            };
            queue.send(request).await.map_err(|_| Error::Closed)?;
            outcome
                .await
                .map_err(|_| Error::Closed)?
                .map_err(Error::Batch)
        };
        tokio::time::timeout(timeout, work)
            .await
            .unwrap_or(Err(Error::Timeout {
                what: "pushing",
                after: timeout,
            }))?;
        self.shared.counters.pushed(updates.len());
        Ok(())
    }

    /// Sends updates on the caller's client or transaction: delivered when, and only when,
    /// the caller's transaction commits (at once, outside a transaction).
    pub(crate) async fn push_in<C: GenericClient + Sync>(
        &self,
        client: &C,
        updates: &[Update],
    ) -> Result<(), Error> {
        let encoded = self.encode(updates)?;
        let payloads = self.shared.pack(encoded.iter().map(String::as_str));
        let channel = self.shared.channel.as_str();
        match payloads.as_slice() {
            [] => {}
            [payload] => {
                client.execute(NOTIFY_ONE, &[&channel, payload]).await?;
            }
            payloads => {
                client.execute(NOTIFY_MANY, &[&channel, &payloads]).await?;
            }
        }
        self.shared.counters.pushed(updates.len());
        Ok(())
    }

    fn encode(&self, updates: &[Update]) -> Result<Vec<String>, Error> {
        updates
            .iter()
            .map(|u| self.shared.packer.encode(u))
            .collect()
    }

    /// Stops taking pushes, lets the flusher finish what is queued, then closes the pool.
    pub(crate) async fn close(&self) {
        drop(self.queue.lock().expect("queue lock").take());
        let flusher = self.flusher.lock().expect("flusher lock").take();
        if let Some(flusher) = flusher
            && let Err(e) = flusher.await
            && e.is_panic()
        {
            tracing::error!(target: TARGET, "push flusher panicked: {e}");
        }
        self.shared.pool.close();
    }
}

impl Shared {
    /// The flusher: takes what is queued, up to the batch bound, and sends it in one
    /// transaction; repeats until every handle is gone.
    async fn run(self: Arc<Self>, mut requests: mpsc::Receiver<Request>) {
        let mut batch: Vec<Request> = Vec::new();
        while let Some(first) = requests.recv().await {
            let mut count = first.updates.len();
            batch.push(first);
            if !self.max_batch_wait.is_zero() {
                let deadline = Instant::now() + self.max_batch_wait;
                while count < self.max_batch {
                    match tokio::time::timeout_at(deadline, requests.recv()).await {
                        Ok(Some(request)) => {
                            count += request.updates.len();
                            batch.push(request);
                        }
                        _ => break,
                    }
                }
            }
            while count < self.max_batch {
                match requests.try_recv() {
                    Ok(request) => {
                        count += request.updates.len();
                        batch.push(request);
                    }
                    Err(_) => break,
                }
            }
            let outcome = self.flush(&batch).await.map_err(Arc::new);
            if let Err(e) = &outcome {
                tracing::warn!(target: TARGET, error = %e, pushes = batch.len(), updates = count, "a push batch failed");
            }
            for request in batch.drain(..) {
                // A pusher that gave up (timeout, cancelled) no longer listens: fine.
                let _ = request.done.send(outcome.clone());
            }
        }
    }

    /// Sends one batch in one statement, within the push timeout.
    async fn flush(&self, batch: &[Request]) -> Result<(), Error> {
        let payloads = self.pack(
            batch
                .iter()
                .flat_map(|r| r.updates.iter().map(String::as_str)),
        );
        let deadline = Instant::now() + self.timeout;
        let timed_out = || Error::Timeout {
            what: "pushing",
            after: self.timeout,
        };
        let client = tokio::time::timeout_at(deadline, self.checkout())
            .await
            .map_err(|_| timed_out())??;
        let sent = tokio::time::timeout_at(deadline, async {
            let channel = self.channel.as_str();
            if let [payload] = payloads.as_slice() {
                let statement = client.prepare_cached(NOTIFY_ONE).await?;
                client.execute(&statement, &[&channel, payload]).await
            } else {
                let statement = client.prepare_cached(NOTIFY_MANY).await?;
                client.execute(&statement, &[&channel, &payloads]).await
            }
        })
        .await;
        match sent {
            Ok(Ok(_)) => {
                self.counters.batch();
                Ok(())
            }
            Ok(Err(e)) => {
                if e.as_db_error().is_none() {
                    // The connection is broken: keep it out of the pool.
                    drop(Object::take(client));
                }
                Err(Error::Postgres(e))
            }
            Err(_) => {
                drop(Object::take(client));
                Err(timed_out())
            }
        }
    }

    /// Packs encoded updates into envelopes, each with a fresh sequence number, so no two
    /// payloads are ever identical (PostgreSQL folds identical ones in a transaction).
    fn pack<'a>(&self, encoded: impl IntoIterator<Item = &'a str>) -> Vec<String> {
        self.packer
            .pack(encoded, || self.seq.fetch_add(1, Ordering::Relaxed))
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
