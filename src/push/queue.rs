//! The pushes waiting for a flight, and the flights out: the batcher's decisions, as plain
//! functions on a plain struct (the batcher holds it under a lock and does the I/O).

use std::collections::VecDeque;

use tokio::sync::oneshot;
use tokio::time::Instant;

use crate::error::Error;

/// A push's outcome: its batch's, shared by every push in the batch.
pub(super) type Outcome = Result<(), Error>;

/// One push waiting for a flight: its updates, already encoded and checked, where to send
/// the outcome, and when its caller's push times out.
#[derive(Debug)]
pub(super) struct Request {
    updates: Vec<String>,
    done: oneshot::Sender<Outcome>,
    deadline: Instant,
}

impl Request {
    pub(super) fn updates(&self) -> &[String] {
        &self.updates
    }

    /// When its push times out.
    pub(super) fn deadline(&self) -> Instant {
        self.deadline
    }

    /// Tells the pusher its batch's outcome. One that gave up (timeout, cancelled) no
    /// longer listens: fine.
    pub(super) fn resolve(self, outcome: Outcome) {
        let _ = self.done.send(outcome);
    }
}

/// How a push goes out: alone and at once (nothing was queued and there was room for a
/// flight), or queued for a flusher task, which it starts (`lead`) when none is gathering;
/// or not at all yet, the queue being full (its updates handed back).
#[derive(Debug)]
pub(super) enum Turn {
    Alone(Vec<String>),
    Queued {
        lead: bool,
        outcome: oneshot::Receiver<Outcome>,
        /// How many pushes, and encoded bytes, wait with this one queued.
        depth: (usize, usize),
    },
    Full {
        updates: Vec<String>,
        /// Pushes waiting.
        pushes: usize,
        /// Their encoded bytes.
        bytes: usize,
    },
}

/// The pushes waiting for a flight, and the flights out.
#[derive(Debug)]
pub(super) struct Queue {
    pending: VecDeque<Request>,
    /// Flights started and not yet over: at most the depth each decision is given.
    flights: usize,
    /// A flusher task has been started and has not taken its batch yet: pushes queued now
    /// go with it.
    gathering: bool,
    closed: bool,
    /// The most updates a batch takes (a single push of more is still one batch).
    max_batch: usize,
    /// Pushes wait for company (a batch wait is configured): none goes out alone.
    wait_for_company: bool,
    /// The encoded bytes of the pushes waiting.
    bytes: usize,
    /// The most pushes, and bytes, that may wait (a push of more bytes than that is still
    /// taken when none waits).
    max_pushes: usize,
    max_bytes: usize,
}

impl Queue {
    pub(super) fn new(max_batch: usize, wait_for_company: bool) -> Self {
        Queue {
            pending: VecDeque::new(),
            flights: 0,
            gathering: false,
            closed: false,
            max_batch,
            wait_for_company,
            bytes: 0,
            max_pushes: usize::MAX,
            max_bytes: usize::MAX,
        }
    }

    /// Bounds the pushes waiting: at most `pushes` of them, `bytes` in all.
    pub(super) fn with_bound(mut self, pushes: usize, bytes: usize) -> Self {
        self.max_pushes = pushes.max(1);
        self.max_bytes = bytes.max(1);
        self
    }

    /// How many pushes wait, and their encoded bytes.
    pub(super) fn depth(&self) -> (usize, usize) {
        (self.pending.len(), self.bytes)
    }

    /// Takes the front request out, keeping the byte count.
    fn pop_front(&mut self) -> Option<Request> {
        let request = self.pending.pop_front()?;
        self.bytes -= size(&request.updates);
        Some(request)
    }

    /// Admits a push, with room for `depth` flights: alone, when nothing is queued and
    /// there is room for a flight (which it takes); otherwise queued, and the lead (taking
    /// a flight for the flusher task it starts) when there is room and no flusher is
    /// gathering. `Closed` once the pipe is closing.
    ///
    /// A queued push times out at `deadline`: a batch taken later lets it go (see
    /// [`Queue::take_batch`]), and the batch that carries it is sent by then.
    pub(super) fn admit(
        &mut self,
        updates: Vec<String>,
        depth: usize,
        deadline: Instant,
    ) -> Result<Turn, Error> {
        if self.closed {
            return Err(Error::Closed);
        }
        let room = self.flights < depth;
        if room && self.pending.is_empty() && !self.wait_for_company {
            self.flights += 1;
            return Ok(Turn::Alone(updates));
        }
        let bytes = size(&updates);
        if !self.pending.is_empty()
            && (self.pending.len() >= self.max_pushes || self.bytes + bytes > self.max_bytes)
        {
            return Ok(Turn::Full {
                updates,
                pushes: self.pending.len(),
                bytes: self.bytes,
            });
        }
        let (done, outcome) = oneshot::channel();
        self.bytes += bytes;
        self.pending.push_back(Request {
            updates,
            done,
            deadline,
        });
        let lead = room && !self.gathering;
        if lead {
            self.flights += 1;
            self.gathering = true;
        }
        Ok(Turn::Queued {
            lead,
            outcome,
            depth: self.depth(),
        })
    }

    /// After a flight has started or ended: whether to start a flusher task (taking a
    /// flight for it) for the queued pushes, which it does when none is gathering and there
    /// is room for `depth` flights.
    pub(super) fn start_flusher(&mut self, depth: usize) -> bool {
        if self.pending.is_empty() || self.gathering || self.flights >= depth {
            return false;
        }
        self.flights += 1;
        self.gathering = true;
        true
    }

    /// The next batch of a flusher task's flight (`gatherer` on its first): the queued
    /// pushes in order, up to `max_batch` updates (a single larger push is one batch),
    /// skipping those whose caller gave up, and moving those past their deadline at `now`
    /// to `expired` (to be told they timed out: they must not be sent). `None`, with the
    /// flight over, when nothing is queued.
    pub(super) fn take_batch(
        &mut self,
        gatherer: bool,
        now: Instant,
        expired: &mut Vec<Request>,
    ) -> Option<Vec<Request>> {
        if gatherer {
            self.gathering = false;
        }
        let mut count = 0;
        let mut batch = Vec::new();
        while let Some(request) = self.pending.front() {
            if request.done.is_closed() {
                // Its caller gave up (cancelled, or timed out waiting for room) before it
                // was sent: it must not be sent now.
                self.pop_front();
                continue;
            }
            if request.deadline <= now {
                expired.extend(self.pop_front());
                continue;
            }
            if count > 0 && count + request.updates.len() > self.max_batch {
                break;
            }
            count += request.updates.len();
            batch.push(self.pop_front().expect("a front request"));
        }
        if batch.is_empty() {
            self.flights -= 1;
            return None;
        }
        Some(batch)
    }

    /// A flight is over (its flush ended however it ended).
    pub(super) fn end_flight(&mut self) {
        self.flights -= 1;
    }

    /// A flusher task was dropped unfinished (its runtime shut down): its flight is over,
    /// and what is queued is given up (each waiting push is told the pipe is closed).
    pub(super) fn abandon_flusher(&mut self) {
        self.pending.clear();
        self.bytes = 0;
        self.gathering = false;
        self.flights -= 1;
    }

    /// Takes no more pushes; whether no flight is out.
    pub(super) fn close(&mut self) -> bool {
        self.closed = true;
        self.is_idle()
    }

    /// Whether no flight is out.
    pub(super) fn is_idle(&self) -> bool {
        self.flights == 0
    }

    /// How many updates are queued.
    pub(super) fn queued(&self) -> usize {
        self.pending.iter().map(|r| r.updates.len()).sum()
    }

    /// How many more updates the next batch would take: 0 once a full batch is queued.
    pub(super) fn room_in_batch(&self) -> usize {
        self.max_batch.saturating_sub(self.queued())
    }
}

/// The encoded bytes of a push.
fn size(updates: &[String]) -> usize {
    updates.iter().map(String::len).sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A deadline no test reaches.
    fn later() -> Instant {
        Instant::now() + std::time::Duration::from_secs(3600)
    }

    /// The next batch, when no push has expired.
    fn take(queue: &mut Queue, gatherer: bool) -> Option<Vec<Request>> {
        let mut expired = Vec::new();
        let batch = queue.take_batch(gatherer, Instant::now(), &mut expired);
        assert!(expired.is_empty());
        batch
    }

    fn updates(n: usize) -> Vec<String> {
        (0..n).map(|i| i.to_string()).collect()
    }

    fn queued(turn: Result<Turn, Error>) -> (bool, oneshot::Receiver<Outcome>) {
        match turn.unwrap() {
            Turn::Queued { lead, outcome, .. } => (lead, outcome),
            other => panic!("not queued: {other:?}"),
        }
    }

    #[test]
    fn the_queue_is_bounded_by_pushes_and_bytes() {
        let mut queue = Queue::new(100, true).with_bound(3, 10);
        let mut waiting = Vec::new();
        for _ in 0..3 {
            waiting.push(queued(queue.admit(updates(1), 1, later())));
        }
        assert_eq!(queue.depth(), (3, 3));
        match queue.admit(updates(2), 1, later()).unwrap() {
            Turn::Full {
                updates,
                pushes,
                bytes,
            } => assert_eq!((updates.len(), pushes, bytes), (2, 3, 3)),
            other => panic!("{other:?}"),
        }
        // A batch taken makes room.
        assert_eq!(take(&mut queue, true).map(|b| b.len()), Some(3));
        assert_eq!(queue.depth(), (0, 0));
        // Bytes: a push larger than the bound is taken alone, and nothing joins it.
        let big: Vec<String> = vec!["x".repeat(20)];
        let _big = queued(queue.admit(big, 1, later()));
        assert!(matches!(queue.admit(updates(1), 1, later()), Ok(Turn::Full { .. })));
        assert_eq!(queue.depth(), (1, 20));
        queue.abandon_flusher();
        assert_eq!(queue.depth(), (0, 0));
    }

    fn sizes(batch: &[Request]) -> Vec<usize> {
        batch.iter().map(|r| r.updates().len()).collect()
    }

    #[test]
    fn a_lone_push_goes_alone_and_takes_a_flight() {
        let mut queue = Queue::new(10, false);
        assert!(matches!(queue.admit(updates(1), 2, later()), Ok(Turn::Alone(u)) if u.len() == 1));
        assert!(!queue.is_idle());
        // Room for a second flight, nothing queued: alone too.
        assert!(matches!(queue.admit(updates(1), 2, later()), Ok(Turn::Alone(_))));
        queue.end_flight();
        queue.end_flight();
        assert!(queue.is_idle());
    }

    #[test]
    fn flights_are_bounded_by_depth() {
        let mut queue = Queue::new(10, false);
        assert!(matches!(queue.admit(updates(1), 1, later()), Ok(Turn::Alone(_))));
        // No room: queued, and no flusher started (no flight taken).
        let (lead, _a) = queued(queue.admit(updates(1), 1, later()));
        assert!(!lead);
        assert!(!queue.start_flusher(1));
        // The flight ends: a flusher starts, in the flight freed.
        queue.end_flight();
        assert!(queue.start_flusher(1));
        assert!(!queue.start_flusher(1), "one gathering at a time");
        assert!(
            !queue.start_flusher(5),
            "one gathering at a time, whatever the room"
        );
        assert_eq!(queue.flights, 1);
    }

    #[test]
    fn the_first_queued_push_with_room_leads_and_the_others_join_it() {
        let mut queue = Queue::new(10, false);
        assert!(matches!(queue.admit(updates(1), 3, later()), Ok(Turn::Alone(_))));
        let (lead, _a) = queued(queue.admit(updates(1), 1, later()));
        assert!(!lead, "no room for a second flight");
        // Something is queued: not alone, though there is room; the lead takes the flight.
        let (lead, _b) = queued(queue.admit(updates(1), 3, later()));
        assert!(lead);
        let (lead, _c) = queued(queue.admit(updates(1), 3, later()));
        assert!(!lead, "a flusher is gathering already");
        assert_eq!(queue.flights, 2);
        // Once the flusher has taken its batch, a queued push may lead again.
        assert_eq!(take(&mut queue, true).map(|b| b.len()), Some(3));
        let (lead, _d) = queued(queue.admit(updates(1), 1, later()));
        assert!(!lead, "no room");
        let (lead, _e) = queued(queue.admit(updates(1), 3, later()));
        assert!(lead);
        assert_eq!(queue.flights, 3);
    }

    #[test]
    fn with_a_batch_wait_no_push_goes_alone() {
        let mut queue = Queue::new(10, true);
        let (lead, _a) = queued(queue.admit(updates(1), 4, later()));
        assert!(lead);
        assert_eq!(queue.flights, 1);
    }

    #[test]
    fn batches_are_taken_in_order_up_to_the_bound() {
        let mut queue = Queue::new(5, true);
        let mut outcomes = Vec::new();
        for n in [2, 2, 2, 7, 1] {
            outcomes.push(queued(queue.admit(updates(n), 1, later())).1);
        }
        assert_eq!(queue.queued(), 14);
        assert_eq!(queue.room_in_batch(), 0);
        let first = take(&mut queue, true).unwrap();
        assert_eq!(sizes(&first), [2, 2], "up to 5 updates, whole pushes only");
        assert_eq!(first[0].updates()[0], "0");
        let second = take(&mut queue, false).unwrap();
        assert_eq!(
            sizes(&second),
            [2],
            "a push that does not fit waits for the next"
        );
        let third = take(&mut queue, false).unwrap();
        assert_eq!(
            sizes(&third),
            [7],
            "a push larger than the bound is one batch"
        );
        assert_eq!(sizes(&take(&mut queue, false).unwrap()), [1]);
        assert_eq!(queue.flights, 1);
        assert!(take(&mut queue, false).is_none());
        assert!(queue.is_idle(), "nothing queued: the flight is over");
    }

    #[test]
    fn pushes_whose_caller_gave_up_are_not_sent() {
        let mut queue = Queue::new(10, true);
        let (_, gave_up) = queued(queue.admit(updates(1), 1, later()));
        let (_, waiting) = queued(queue.admit(updates(2), 1, later()));
        drop(gave_up);
        let batch = take(&mut queue, true).unwrap();
        assert_eq!(sizes(&batch), [2]);
        for request in batch {
            request.resolve(Ok(()));
        }
        assert!(matches!(waiting.blocking_recv(), Ok(Ok(()))));
    }

    #[test]
    fn a_closed_queue_takes_no_push_and_abandoning_tells_the_waiting() {
        let mut queue = Queue::new(10, true);
        let (_, waiting) = queued(queue.admit(updates(1), 1, later()));
        assert!(!queue.close(), "a flight is out");
        assert!(matches!(queue.admit(updates(1), 1, later()), Err(Error::Closed)));
        queue.abandon_flusher();
        assert!(queue.is_idle());
        assert!(!queue.gathering);
        assert!(waiting.blocking_recv().is_err(), "told its flight is gone");
        assert!(queue.close());
    }

    #[test]
    fn pushes_past_their_deadline_are_let_go_not_sent() {
        let mut queue = Queue::new(10, true);
        let now = Instant::now();
        let soon = now + std::time::Duration::from_millis(10);
        let (_, early) = queued(queue.admit(updates(1), 1, soon));
        let (_, late) = queued(queue.admit(updates(2), 1, later()));
        let mut expired = Vec::new();
        // Before the deadline, both go.
        let mut copy = Queue::new(10, true);
        let (_, _a) = queued(copy.admit(updates(1), 1, soon));
        assert_eq!(copy.take_batch(true, now, &mut expired).map(|b| b.len()), Some(1));
        assert!(expired.is_empty());
        // At it, the first is let go and the batch is what is left.
        let batch = queue.take_batch(true, soon, &mut expired).unwrap();
        assert_eq!(sizes(&batch), [2]);
        assert_eq!(expired.len(), 1);
        assert_eq!(queue.depth(), (0, 0));
        for request in expired {
            request.resolve(Err(Error::Closed));
        }
        assert!(matches!(early.blocking_recv(), Ok(Err(Error::Closed))));
        drop(batch);
        assert!(late.blocking_recv().is_err());
        // All expired: no batch, and the flight is over.
        let (_, _b) = queued(queue.admit(updates(1), 1, soon));
        let mut expired = Vec::new();
        assert!(queue.take_batch(true, soon, &mut expired).is_none());
        assert_eq!(expired.len(), 1);
        assert!(queue.is_idle());
    }
}
