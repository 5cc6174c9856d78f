//! A named consumer's acknowledgements, batched: the application acknowledges positions as
//! it pleases ([`PgPipe::ack`](crate::PgPipe::ack)), and the newest one is written at most
//! every [`ACK_INTERVAL`], from the pool, by a task of its own; closing the pipe writes the
//! last one. A write that fails is tried again with the next one, and said (paced).

use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::Notify;
use tokio::task::JoinHandle;

use super::event::TARGET;
use super::pacer::Pacer;
use crate::error::Error;
use crate::log::{self, Position};

/// How often at most a consumer's position is written: a restarted consumer gets again
/// what was delivered after the last write (and after what it acknowledged).
pub const ACK_INTERVAL: Duration = Duration::from_millis(200);

/// What the application acknowledged and the task has not written yet.
#[derive(Debug, Default)]
struct Pending {
    newest: Option<Position>,
    /// The step of the newest position written.
    written: Option<u64>,
}

/// The acknowledgements of one named consumer.
#[derive(Debug)]
pub(crate) struct Acks {
    channel: String,
    name: String,
    pool: deadpool_postgres::Pool,
    /// The epoch the listener's session claimed: a write from a session that lost the
    /// consumer to another changes nothing (migration V6).
    epoch: AtomicI64,
    /// How long one write may take (the push timeout), then it is given up (and cancelled
    /// with its connection) and tried again.
    timeout: Duration,
    pending: Mutex<Pending>,
    /// One write at a time (the task's, or a flush the application asked for).
    writing: tokio::sync::Mutex<()>,
    wake: Notify,
}

impl Acks {
    pub(crate) fn new(
        channel: String,
        name: String,
        pool: deadpool_postgres::Pool,
        timeout: Duration,
    ) -> Arc<Acks> {
        Arc::new(Acks {
            channel,
            name,
            pool,
            epoch: AtomicI64::new(0),
            timeout,
            pending: Mutex::new(Pending::default()),
            writing: tokio::sync::Mutex::new(()),
            wake: Notify::new(),
        })
    }

    /// The epoch a new session of the listener claimed.
    pub(crate) fn set_epoch(&self, epoch: i64) {
        self.epoch.store(epoch, Ordering::Release);
    }

    /// Notes `position` as acknowledged (a position older than one noted already changes
    /// nothing); the task writes it soon.
    pub(crate) fn ack(&self, position: &Position) {
        let mut pending = self.pending.lock().expect("acks lock");
        let newer = |step: u64| position.step() > step;
        let noted = pending.newest.as_ref().map(Position::step);
        if noted.is_none_or(newer) && pending.written.is_none_or(newer) {
            pending.newest = Some(position.clone());
            drop(pending);
            self.wake.notify_one();
        }
    }

    /// Writes the newest acknowledged position now, if one waits. It stays noted until it
    /// is written (a write given up on, or cut short, is made again).
    pub(crate) async fn flush(&self) -> Result<(), Error> {
        let _one = self.writing.lock().await;
        let Some(position) = self.pending.lock().expect("acks lock").newest.clone() else {
            return Ok(());
        };
        let how = log::Store::Ack {
            epoch: self.epoch.load(Ordering::Acquire),
        };
        let write = async {
            let client = self.pool.get().await?;
            let moved =
                log::store_consumer(&**client, &self.channel, &self.name, &position, how).await;
            Ok::<_, Error>(moved?)
        };
        let moved = tokio::time::timeout(self.timeout, write)
            .await
            .map_err(|_| Error::Timeout {
                what: "writing a consumer's acknowledged position",
                after: self.timeout,
            })??;
        if !moved {
            tracing::debug!(
                target: TARGET,
                consumer = %self.name,
                step = position.step(),
                "an acknowledgement changed nothing (a newer one was written, or another \
                 session reads as the consumer now)"
            );
        }
        let mut pending = self.pending.lock().expect("acks lock");
        if pending.newest.as_ref().map(Position::step) == Some(position.step()) {
            pending.newest = None;
        }
        pending.written = Some(position.step());
        Ok(())
    }

    /// Starts the task that writes acknowledgements, every [`ACK_INTERVAL`] at most.
    pub(crate) fn spawn(self: &Arc<Acks>) -> JoinHandle<()> {
        let acks = self.clone();
        tokio::spawn(async move {
            let mut warnings = Pacer::default();
            loop {
                acks.wake.notified().await;
                tokio::time::sleep(ACK_INTERVAL).await;
                if let Err(e) = acks.flush().await {
                    if let Some(suppressed) = warnings.due(std::time::Instant::now()) {
                        tracing::warn!(
                            target: TARGET,
                            error = %e,
                            consumer = %acks.name,
                            suppressed,
                            "writing a consumer's acknowledged position failed; trying again"
                        );
                    }
                    acks.wake.notify_one();
                }
            }
        })
    }
}
