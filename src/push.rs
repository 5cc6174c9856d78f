//! The push path: updates become version 1 envelopes sent with `pg_notify` on the shared
//! channel, through the pool or inside the caller's own transaction.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use deadpool_postgres::{
    Manager, ManagerConfig, Object, Pool, PoolError, RecyclingMethod, Runtime, Timeouts,
};
use tokio_postgres::{GenericClient, NoTls};

use crate::channel::ChannelName;
use crate::config::Config;
use crate::envelope::{Envelope, Origin};
use crate::error::Error;
use crate::stats::Counters;
use crate::update::Update;

/// The one statement every push runs: the channel and payload are parameters, never SQL text.
const NOTIFY_SQL: &str = "SELECT pg_notify($1, $2)";

/// Sends this pipe's updates.
#[derive(Debug)]
pub(crate) struct Pusher {
    pool: Pool,
    channel: ChannelName,
    origin: Origin,
    pid: u32,
    seq: AtomicU64,
    timeout: Duration,
    counters: Arc<Counters>,
}

impl Pusher {
    pub(crate) fn new(
        config: &Config,
        origin: Origin,
        counters: Arc<Counters>,
    ) -> Result<Self, Error> {
        let manager = Manager::from_config(
            config.pg().clone(),
            NoTls,
            ManagerConfig {
                // A broken connection is noticed by `is_closed`; a query per checkout would
                // cost a round trip per push.
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
        Ok(Pusher {
            pool,
            channel: config.channel().clone(),
            origin,
            pid: std::process::id(),
            seq: AtomicU64::new(1),
            timeout: config.push_timeout(),
            counters,
        })
    }

    /// Encodes updates into as few envelopes as fit, each with a fresh sequence number, so
    /// no two payloads are ever identical (PostgreSQL would fold identical ones into one).
    fn payloads(&self, updates: &[Update]) -> Result<Vec<String>, Error> {
        Envelope::pack_v1(
            &self.origin,
            self.pid,
            || self.seq.fetch_add(1, Ordering::Relaxed),
            updates,
        )
    }

    /// Checks out a connection and proves it works: early errors for `init_push`.
    pub(crate) async fn init(&self) -> Result<(), Error> {
        self.with_timeout("preparing to push", async {
            let client = self.checkout().await?;
            client.prepare_cached(NOTIFY_SQL).await?;
            Ok(())
        })
        .await
    }

    /// Sends updates through the pool; returns once they are committed. Several envelopes
    /// go in one transaction, so all are delivered or none.
    pub(crate) async fn push(&self, updates: &[Update]) -> Result<(), Error> {
        let payloads = self.payloads(updates)?;
        if payloads.is_empty() {
            return Ok(());
        }
        self.with_timeout("pushing", async {
            let mut client = self.checkout().await?;
            let statement = client.prepare_cached(NOTIFY_SQL).await?;
            let channel = self.channel.as_str();
            if let [payload] = payloads.as_slice() {
                client.execute(&statement, &[&channel, payload]).await?;
            } else {
                let tx = client.transaction().await?;
                for payload in &payloads {
                    tx.execute(&statement, &[&channel, payload]).await?;
                }
                tx.commit().await?;
            }
            Ok(())
        })
        .await?;
        self.counters.pushed(updates.len());
        Ok(())
    }

    /// Sends updates on the caller's client or transaction: delivered when, and only when,
    /// the caller's transaction commits (at once, outside a transaction).
    pub(crate) async fn push_in<C: GenericClient + Sync>(
        &self,
        client: &C,
        updates: &[Update],
    ) -> Result<(), Error> {
        let payloads = self.payloads(updates)?;
        let channel = self.channel.as_str();
        for payload in &payloads {
            client.execute(NOTIFY_SQL, &[&channel, payload]).await?;
        }
        self.counters.pushed(updates.len());
        Ok(())
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

    async fn with_timeout<T>(
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

    /// Closes the pool: idle connections go now, busy ones when their push ends.
    pub(crate) fn close(&self) {
        self.pool.close();
    }
}
