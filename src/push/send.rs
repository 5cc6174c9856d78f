//! Sending one batch: on the flights' connection, by its deadline, sent again once when
//! that is safe, with the connection let go when a send on it fails.

use std::pin::Pin;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use tokio::time::{Instant, Sleep};

use super::TARGET;
use super::link::{FlightConnection, Link};
use super::wire::{Payloads, Wire};
use crate::error::Error;
use crate::pg::{Canceller, is_proxy_refusal, is_unique_violation};
use crate::stats::Counters;

/// Sends batches of encoded updates, each in one statement (one transaction).
#[derive(Debug)]
pub(super) struct BatchSender {
    wire: Wire,
    link: Link,
    timeout: Duration,
    counters: Arc<Counters>,
    timers: KeptTimers,
    /// Cancels a batch given up on, on the server.
    canceller: Canceller,
}

impl BatchSender {
    pub(super) fn new(
        wire: Wire,
        link: Link,
        timeout: Duration,
        counters: Arc<Counters>,
        canceller: Canceller,
    ) -> Self {
        BatchSender {
            wire,
            link,
            timeout,
            counters,
            timers: KeptTimers::default(),
            canceller,
        }
    }

    pub(super) fn wire(&self) -> &Wire {
        &self.wire
    }

    pub(super) fn link(&self) -> &Link {
        &self.link
    }

    /// The push timeout.
    pub(super) fn timeout(&self) -> Duration {
        self.timeout
    }

    pub(super) fn counters(&self) -> &Counters {
        &self.counters
    }

    /// Runs `work` until `deadline` (`Err` past it, `work` left as it is) on a timer kept
    /// from flight to flight (see `KeptTimers::until`).
    pub(super) async fn until<T>(
        &self,
        deadline: Instant,
        work: impl Future<Output = T>,
    ) -> Result<T, ()> {
        self.timers.until(deadline, work).await
    }

    /// Lets the kept timers go (they hold their runtime's driver), when the pipe closes.
    pub(super) fn forget_timers(&self) {
        self.timers.clear();
    }

    /// Runs `work` within the push timeout.
    pub(super) async fn within<T>(
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

    /// Sends one batch of `updates` encoded updates in one statement, by `deadline` (a
    /// push that waited for room in the queue has only what is left of its push timeout),
    /// and counts them once committed.
    pub(super) async fn flush_by<'a>(
        &self,
        deadline: Instant,
        updates: usize,
        encoded: impl IntoIterator<Item = &'a str>,
    ) -> Result<(), Error> {
        let packed = OnceLock::new();
        let outcome = self.flush_packed(deadline, &packed, encoded).await;
        if outcome.is_ok() {
            // Once per batch, not per push: the counter is shared by every pushing thread.
            self.counters.pushed(updates);
        }
        if let Err(e) = &outcome {
            let envelopes = packed.get().map_or(0, |p| p.envelopes.len());
            // Every push of the batch gets the error back; its caller decides whether it is
            // worth a warning (the CLI printed it twice).
            tracing::debug!(target: TARGET, error = %e, envelopes, "a push batch failed");
        }
        outcome
    }

    /// Sends a batch by the deadline, packed (numbered) into `packed` when it is sent. A
    /// durable batch may be sent twice.
    async fn flush_packed<'a>(
        &self,
        deadline: Instant,
        packed: &OnceLock<Payloads>,
        encoded: impl IntoIterator<Item = &'a str>,
    ) -> Result<(), Error> {
        let mut encoded = Some(encoded);
        let mut used = None;
        let mut retried = false;
        let durable = self.wire.durable();
        loop {
            match self
                .timers
                .until(deadline, self.send(packed, &mut encoded, &mut used))
                .await
            {
                Ok(Ok(())) => {
                    self.counters.batch();
                    return Ok(());
                }
                // A durable batch can be sent again (its log rows are unique by sender and
                // number), so one retry on a fresh connection is safe when the first try's
                // fate is unknown.
                Ok(Err(Error::Postgres(e))) if durable && !retried && e.as_db_error().is_none() => {
                    retried = true;
                    // The broken connection goes now (it is discarded once nothing holds
                    // it), so that a pool of one has room for the retry's.
                    drop(used.take());
                    tracing::debug!(target: TARGET, error = %e, "retrying a durable batch");
                }
                // Rows at its numbers already: the first try's, committed, only if the log
                // holds exactly what it sent (another role with INSERT on the log may have
                // written at these numbers: then nothing of this batch was committed).
                Ok(Err(Error::Postgres(e))) if durable && is_unique_violation(&e) => {
                    let payloads = packed.get().expect("packed before it was sent");
                    // The connection the batch failed on goes back first (a pool of one).
                    drop(used.take());
                    let checked = if retried {
                        self.timers
                            .until(deadline, self.check_logged_as_sent(payloads))
                            .await
                            .unwrap_or(Err(Error::Timeout {
                                what: "checking a retried push",
                                after: self.timeout,
                            }))
                    } else {
                        Err(Error::NumbersTaken {
                            seq: payloads.envelopes.first().map_or(0, |(seq, _)| *seq),
                        })
                    };
                    match checked {
                        Ok(()) => self.counters.batch(),
                        Err(Error::NumbersTaken { seq }) => {
                            self.counters.numbers_taken();
                            tracing::warn!(
                                target: TARGET,
                                seq,
                                "the durable log holds rows at this pipe's numbers that it did \
                                 not write (squatted by another role?): the push fails"
                            );
                        }
                        Err(_) => {}
                    }
                    return checked;
                }
                Ok(Err(e)) => return Err(e),
                Err(()) => {
                    // The server did not answer in time: whatever this connection is busy
                    // with is cancelled on the server (a backend waiting on a lock would
                    // otherwise wait on, for a client that left), and later flights must
                    // not queue behind it.
                    if let Some(connection) = &used {
                        self.canceller
                            .cancel_detached(connection.client().cancel_token());
                        self.link.discard(connection);
                    }
                    return Err(Error::Timeout {
                        what: "pushing",
                        after: self.timeout,
                    });
                }
            }
        }
    }

    /// Whether the log holds a batch's envelopes as sent (see
    /// [`Wire::check_logged_as_sent`]), asked on the flights' connection.
    async fn check_logged_as_sent(&self, payloads: &Payloads) -> Result<(), Error> {
        let connection = self.link.connection().await?;
        let checked = self
            .wire
            .check_logged_as_sent(connection.client(), payloads)
            .await;
        if let Err(Error::Postgres(e)) = &checked {
            tracing::debug!(target: TARGET, error = %e, "checking a retried push failed");
            if e.as_db_error().is_none() {
                self.link.discard(&connection);
            }
        }
        checked
    }

    /// One try at sending a batch on the flights' connection, which it notes in `used`.
    /// The first try packs the batch, taking its numbers, and sends it in one step (see
    /// [`Wire::send_in_number_order`]); a second try sends the same envelopes. A connection
    /// whose send fails is let go.
    async fn send<'a>(
        &self,
        packed: &OnceLock<Payloads>,
        encoded: &mut Option<impl IntoIterator<Item = &'a str>>,
        used: &mut Option<Arc<FlightConnection>>,
    ) -> Result<(), Error> {
        loop {
            let connection = self.link.connection().await?;
            *used = Some(connection.clone());
            let client = connection.client();
            let statements = self.link.statements(&connection, self.wire.shape()).await?;
            let still_current = || self.link.is_current(&connection);
            let Some(mut sent) = self
                .wire
                .send_in_number_order(client, statements, packed, encoded, still_current)
                .await
            else {
                continue;
            };
            if let Err(e) = &sent
                && statements.is_some()
                && is_proxy_refusal(e)
            {
                // Nothing was executed: the statement could not be found. Sent again
                // unnamed, after any flight pipelined behind it (a listener may see a gap
                // once).
                self.link.use_unnamed();
                let payloads = packed.get().expect("packed before it was sent");
                let marks = self.wire.pool_marks();
                sent = self.wire.execute(client, None, payloads, marks).await;
            }
            return match sent {
                Ok(_) => Ok(()),
                Err(e) => Err(self.link.failed(&connection, e)),
            };
        }
    }
}

/// The flights' timers, kept from flight to flight, each with the runtime it belongs to.
#[derive(Debug, Default)]
struct KeptTimers(Mutex<Vec<(tokio::runtime::Id, Pin<Box<Sleep>>)>>);

impl KeptTimers {
    /// Runs `work` until `deadline` (`Err` past it) on a timer kept from flight to flight.
    /// Moving a registered timer later is a compare-and-swap, where a new timer per flight
    /// takes the timer wheel's lock twice and, whenever it is the earliest, wakes a parked
    /// runtime thread to re-arm its wait (perf and strace saw both). Kept only within one
    /// runtime: a timer must not outlive the runtime that drives it.
    async fn until<T>(&self, deadline: Instant, work: impl Future<Output = T>) -> Result<T, ()> {
        let runtime = tokio::runtime::Handle::current().id();
        let kept = {
            let mut timers = self.0.lock().expect("flush timers lock");
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
        self.0
            .lock()
            .expect("flush timers lock")
            .push((runtime, timer));
        outcome
    }

    /// Lets every timer go.
    fn clear(&self) {
        drop(std::mem::take(
            &mut *self.0.lock().expect("flush timers lock"),
        ));
    }
}
