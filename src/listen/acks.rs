//! A named consumer's acknowledgements, batched: the application acknowledges positions as
//! it pleases ([`PgPipe::ack`](crate::PgPipe::ack)), and the newest one is written at most
//! every [`ACK_INTERVAL`], from the pool, by a task of its own; closing the pipe writes the
//! last one. A write that fails is tried again with the next one, and said (paced).

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
    pending: Mutex<Pending>,
    wake: Notify,
}

impl Acks {
    pub(crate) fn new(channel: String, name: String, pool: deadpool_postgres::Pool) -> Arc<Acks> {
        Arc::new(Acks {
            channel,
            name,
            pool,
            pending: Mutex::new(Pending::default()),
            wake: Notify::new(),
        })
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

    /// Writes the newest acknowledged position now, if one waits.
    pub(crate) async fn flush(&self) -> Result<(), Error> {
        let Some(position) = self.pending.lock().expect("acks lock").newest.take() else {
            return Ok(());
        };
        let written = async {
            let client = self.pool.get().await?;
            log::store_consumer(&**client, &self.channel, &self.name, &position, false).await?;
            Ok::<(), Error>(())
        }
        .await;
        let mut pending = self.pending.lock().expect("acks lock");
        match written {
            Ok(()) => {
                pending.written = Some(position.step());
                Ok(())
            }
            Err(e) => {
                // Kept for the next write, unless a newer one came meanwhile.
                if pending.newest.is_none() {
                    pending.newest = Some(position);
                }
                Err(e)
            }
        }
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
