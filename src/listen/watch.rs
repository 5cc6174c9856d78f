//! The queue watch: now and then (every health interval) the listener samples the server's
//! notification queue, `pg_notification_queue_usage()`, from the pool, and warns (paced)
//! above the configured threshold. When that queue fills, every NOTIFY in the cluster
//! fails; it fills when some session of the database listens and does not read (often a
//! `LISTEN` in a transaction left open). The last value is in the stats.

use std::sync::Arc;
use std::time::Duration;

use futures_util::FutureExt;
use futures_util::future::BoxFuture;
use tokio::time::Instant;

use super::event::TARGET;
use super::pacer::Pacer;
use crate::error::Error;
use crate::pg::{Canceller, Lent};
use crate::stats::Counters;

/// When the queue is sampled when heartbeats are off.
const WITHOUT_HEARTBEATS: Duration = Duration::from_secs(10);

/// The queue watch's state.
#[derive(Debug)]
pub(super) struct QueueWatch {
    pool: deadpool_postgres::Pool,
    canceller: Canceller,
    every: Duration,
    next_due: Instant,
    warn_above: f64,
    warnings: Pacer,
    counters: Arc<Counters>,
}

impl QueueWatch {
    pub(super) fn new(
        pool: deadpool_postgres::Pool,
        canceller: Canceller,
        health_interval: Duration,
        warn_above: f64,
        counters: Arc<Counters>,
        now: Instant,
    ) -> QueueWatch {
        let every = if health_interval.is_zero() {
            WITHOUT_HEARTBEATS
        } else {
            health_interval
        };
        QueueWatch {
            pool,
            canceller,
            every,
            next_due: now,
            warn_above,
            warnings: Pacer::default(),
            counters,
        }
    }

    /// Whether a sample is due now (then the next is due an interval later).
    pub(super) fn due(&mut self, now: Instant) -> bool {
        if now < self.next_due {
            return false;
        }
        self.next_due = now + self.every;
        true
    }

    /// Samples the queue, within the interval (at least a second), cancelled past it.
    pub(super) fn sample(&self) -> BoxFuture<'static, Result<f64, Error>> {
        let pool = self.pool.clone();
        let canceller = self.canceller.clone();
        let after = self.every.max(Duration::from_secs(1));
        async move {
            let sample = async {
                let lent = Lent::new(pool.get().await?, &canceller);
                let answer = lent
                    .client()
                    .query_typed_one(
                        "SELECT pg_catalog.pg_notification_queue_usage()::pg_catalog.float8",
                        &[],
                    )
                    .await;
                Ok(lent.finish(answer)?.get::<_, f64>(0))
            };
            tokio::time::timeout(after, sample)
                .await
                .unwrap_or(Err(Error::Timeout {
                    what: "sampling the notification queue",
                    after,
                }))
        }
        .boxed()
    }

    /// Notes a sample: kept in the stats, and a warning (at most one per ten seconds)
    /// above the threshold.
    pub(super) fn on_sampled(&mut self, sampled: Result<f64, Error>) {
        let usage = match sampled {
            Ok(usage) => usage,
            Err(e) => {
                tracing::debug!(target: TARGET, error = %e, "cannot sample the notification queue");
                return;
            }
        };
        self.counters.queue_usage(usage);
        if usage > self.warn_above
            && let Some(suppressed) = self.warnings.due(std::time::Instant::now())
        {
            tracing::warn!(
                target: TARGET,
                usage_percent = usage * 100.0,
                threshold_percent = self.warn_above * 100.0,
                suppressed,
                "the server's notification queue is filling: some session of this database \
                 listens and does not read (a LISTEN in a transaction left open?); when it is \
                 full every NOTIFY in the cluster fails. See pg_stat_activity and \
                 pg_listening_channels()"
            );
        }
    }
}
