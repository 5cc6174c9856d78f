//! The batcher: pushes admitted to the queue, flights started and ended, flusher tasks,
//! and the drop guards that keep a flight counted exactly as long as it is out, however
//! it ends.

use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::sync::{Notify, oneshot};
use tokio::time::Instant;

use super::encoded::Encoded;
use super::link::FlightConnection;
use super::queue::{Outcome, Queue, Turn};
use super::send::BatchSender;
use crate::config::{QueueBound, QueueFull};
use crate::error::Error;

/// The most scheduler turns a flusher gives pushers to join its batch (see
/// `Batcher::let_woken_pushers_rejoin`).
const GATHER_TURNS: usize = 4;

/// Batches the pipe's pool pushes into flights.
#[derive(Debug)]
pub(super) struct Batcher {
    sender: BatchSender,
    queue: Mutex<Queue>,
    max_batch_wait: Duration,
    max_in_flight: usize,
    /// Signalled whenever the last flight ends with nothing queued.
    idle: Notify,
    /// Signalled whenever queued pushes are taken: a push waiting for room tries again.
    room: Notify,
    /// What a push does when the queue is full.
    when_full: QueueFull,
}

/// A push admitted (see [`Batcher::admit`]), for [`Batcher::finish`].
pub(super) struct Admitted(Admission);

enum Admission {
    /// It goes alone: its flight, taken, and its own copy of its updates.
    Alone(Flight, Encoded),
    /// Queued: the outcome of the flight that takes it.
    Queued(oneshot::Receiver<Outcome>),
    /// The queue is full: its updates, to admit again once there is room.
    Full(Encoded),
}

/// Ends a flight when dropped: however its flush ended (sent, failed, or its caller gave up
/// midway), the pushes queued meanwhile are not stranded.
struct Flight(Arc<Batcher>);

impl Drop for Flight {
    fn drop(&mut self) {
        let batcher = &self.0;
        let mut queue = batcher.queue.lock().expect("push queue lock");
        queue.end_flight();
        batcher.settle(queue);
    }
}

/// What a change to the queue leaves to do once the queue is unlocked: start a flusher
/// task, let a connection go. (On a closing runtime a spawned task is dropped at once, and
/// its guard locks the queue.)
#[must_use]
struct Followup {
    flight: Option<Arc<Batcher>>,
    release: Option<Arc<FlightConnection>>,
}

impl Followup {
    fn run(self) {
        drop(self.release);
        if let Some(batcher) = self.flight {
            let flight = batcher.fly();
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
struct Abandon(Option<Arc<Batcher>>);

impl Drop for Abandon {
    fn drop(&mut self) {
        if let Some(batcher) = self.0.take() {
            let mut queue = batcher.queue.lock().expect("push queue lock");
            queue.abandon_flusher();
            batcher.settle(queue);
            batcher.room.notify_waiters();
        }
    }
}

impl Batcher {
    pub(super) fn new(
        sender: BatchSender,
        max_batch: usize,
        max_batch_wait: Duration,
        max_in_flight: usize,
        bound: QueueBound,
    ) -> Self {
        Batcher {
            sender,
            queue: Mutex::new(
                Queue::new(max_batch, !max_batch_wait.is_zero())
                    .with_bound(bound.pushes, bound.bytes),
            ),
            max_batch_wait,
            max_in_flight,
            idle: Notify::new(),
            room: Notify::new(),
            when_full: bound.when_full,
        }
    }

    pub(super) fn sender(&self) -> &BatchSender {
        &self.sender
    }

    /// Admits a push's encoded updates (checked, and in a buffer the caller lends): to go
    /// out at once and alone when nothing is queued and there is room for a flight,
    /// otherwise queued for the next flight (copied into the queue), or to wait for room
    /// when the queue is full. [`Batcher::finish`] does the rest. Not async: the caller's
    /// buffer is its thread's scratch buffer, which must not be held across an await.
    pub(super) fn admit(
        self: &Arc<Self>,
        encoded: &Encoded,
        deadline: Instant,
    ) -> Result<Admitted, Error> {
        let turn = self.queue.lock().expect("push queue lock").admit(
            encoded,
            self.depth(),
            deadline,
            false,
        )?;
        if let Turn::Full { pushes, bytes } = turn {
            if self.when_full == QueueFull::Fail {
                return Err(Error::QueueFull { pushes, bytes });
            }
            return Ok(Admitted(Admission::Full(encoded.to_owned_exact())));
        }
        Ok(Admitted(self.admitted(turn, encoded)))
    }

    /// What a push admitted alone or queued holds on to: its flight and a copy of its
    /// updates, or the outcome to wait for (a queued lead starts the flusher task).
    fn admitted(self: &Arc<Self>, turn: Turn, encoded: &Encoded) -> Admission {
        match turn {
            Turn::Alone => Admission::Alone(Flight(self.clone()), encoded.to_owned_exact()),
            Turn::Queued { lead, outcome } => {
                if lead {
                    tokio::spawn(self.clone().fly());
                }
                Admission::Queued(outcome)
            }
            Turn::Full { .. } => unreachable!("a full queue is answered by the caller"),
        }
    }

    /// Sends an admitted push's updates, or waits for the flight that takes them (for room
    /// first, when the queue was full). Resolves when the flight's transaction has
    /// committed, with its outcome, or at `deadline` (the push timeout) with a timeout.
    pub(super) async fn finish(
        self: &Arc<Self>,
        admitted: Admitted,
        deadline: Instant,
    ) -> Result<(), Error> {
        let timeout = self.sender.timeout();
        let timed_out = || Error::Timeout {
            what: "pushing",
            after: timeout,
        };
        let mut admission = admitted.0;
        let mut waited = false;
        loop {
            match admission {
                Admission::Alone(_flight, encoded) => {
                    // These updates go out alone, from here, at once (no hand-off). Alone:
                    // if the caller gives up midway, no other push's flight is cut short
                    // with it. Boxed: a flush's state is most of a push future's size, and
                    // a queued push (the many, when pushes are many) need not carry it.
                    return Box::pin(
                        self.sender
                            .flush_by(deadline, encoded.len(), encoded.iter()),
                    )
                    .await;
                }
                Admission::Queued(outcome) if !waited => {
                    // No timer of its own (a timer per push is a measurable part of its
                    // cost: the timer wheel's lock, twice): the flusher keeps the
                    // deadline. A batch taken past it lets the push go (not sent), and
                    // while its batch is out the flusher tells it at its deadline (see
                    // `Batcher::flush_keeping_deadlines`).
                    return outcome.await.map_err(|_| Error::Closed)?;
                }
                Admission::Queued(outcome) => {
                    // Its deadline came early, while it waited for room: a flight ahead of
                    // it may end later than that, so it keeps a timer of its own.
                    return tokio::time::timeout_at(deadline, outcome)
                        .await
                        .map_err(|_| timed_out())?
                        .map_err(|_| Error::Closed)?;
                }
                Admission::Full(encoded) => {
                    // Backpressure: wait for room, within the push timeout. Registered
                    // before the queue is looked at: room made meanwhile is not missed.
                    waited = true;
                    let room = self.room.notified();
                    let turn = self.queue.lock().expect("push queue lock").admit(
                        &encoded,
                        self.depth(),
                        deadline,
                        true,
                    )?;
                    admission = match turn {
                        Turn::Full { .. } => {
                            tokio::time::timeout_at(deadline, room)
                                .await
                                .map_err(|_| timed_out())?;
                            Admission::Full(encoded)
                        }
                        turn => self.admitted(turn, &encoded),
                    };
                }
            }
        }
    }

    /// Stops taking pushes, lets the flights finish what is queued, then closes the pool.
    pub(super) async fn close(&self) {
        loop {
            let idle = self.idle.notified();
            if self.queue.lock().expect("push queue lock").close() {
                break;
            }
            idle.await;
        }
        let link = self.sender.link();
        drop(link.take_current());
        // The timers hold their runtime's driver: let them go with the pipe's work.
        self.sender.forget_timers();
        link.pool().close();
    }

    /// How many flights may be out at once. One for durable pushes (a durable flight that
    /// lost its connection is sent again on another, which must not overtake the flights
    /// after it) and through a transaction-pooling proxy (which may route pipelined
    /// transactions to different servers).
    fn depth(&self) -> usize {
        if self.sender.wire().durable() || self.sender.link().unnamed() {
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
        let flight = queue.start_flusher(self.depth()).then(|| self.clone());
        let mut release = None;
        if queue.is_idle() {
            self.idle.notify_waiters();
            release = self.sender.link().release_when_idle();
        }
        Followup { flight, release }
    }
}

mod flusher;
