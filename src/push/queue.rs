//! The pushes waiting for a flight, and the flights out: the batcher's decisions, as plain
//! functions on a plain struct (the batcher holds it under a lock and does the I/O).

use std::collections::VecDeque;

use tokio::sync::oneshot;
use tokio::time::Instant;

use super::encoded::Encoded;
use crate::error::Error;

/// The queue's buffer keeps at least this much room once it has grown to it.
const KEPT_BUFFER_BYTES: usize = 64 * 1024;

/// A push's outcome: its batch's, shared by every push in the batch.
pub(super) type Outcome = Result<(), Error>;

/// One push waiting for its outcome: where to send it, and when its caller's push times
/// out.
#[derive(Debug)]
pub(super) struct Request {
    done: oneshot::Sender<Outcome>,
    deadline: Instant,
    /// It keeps a timer of its own (it waited for room): the flusher need not keep its
    /// deadline.
    timed: bool,
}

impl Request {
    /// When the flusher must tell it that it timed out, unless it keeps a timer of its own.
    pub(super) fn kept_deadline(&self) -> Option<Instant> {
        (!self.timed).then_some(self.deadline)
    }

    /// Tells the pusher its batch's outcome. One that gave up (timeout, cancelled) no
    /// longer listens: fine.
    pub(super) fn resolve(self, outcome: Outcome) {
        let _ = self.done.send(outcome);
    }
}

/// A queued push: how many updates it has (its bytes are in the queue's buffer), and its
/// request.
#[derive(Debug)]
struct Waiting {
    updates: usize,
    request: Request,
}

/// A batch taken for a flight: the updates of its pushes, in order, and their requests.
#[derive(Debug)]
pub(super) struct Batch {
    pub(super) encoded: Encoded,
    pub(super) requests: Vec<Request>,
}

/// How a push goes out: alone and at once (nothing was queued and there was room for a
/// flight), or queued for a flusher task, which it starts (`lead`) when none is gathering;
/// or not at all yet, the queue being full.
#[derive(Debug)]
pub(super) enum Turn {
    Alone,
    Queued {
        lead: bool,
        outcome: oneshot::Receiver<Outcome>,
    },
    Full {
        /// Pushes waiting.
        pushes: usize,
        /// Their encoded bytes.
        bytes: usize,
    },
}

/// The pushes waiting for a flight, and the flights out.
#[derive(Debug)]
pub(super) struct Queue {
    pending: VecDeque<Waiting>,
    /// The updates of the pushes waiting, in order.
    encoded: Encoded,
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
    /// The most pushes, and bytes, that have waited at once, and whether that moved since
    /// it was last asked for (see [`Queue::take_peak`]).
    peak: (usize, usize),
    peak_moved: bool,
    /// The most bytes waiting since the last batch was taken (the buffer's capacity is
    /// kept for about that much).
    high_water: usize,
    /// The most pushes, and bytes, that may wait (a push of more bytes than that is still
    /// taken when none waits).
    max_pushes: usize,
    max_bytes: usize,
}

impl Queue {
    pub(super) fn new(max_batch: usize, wait_for_company: bool) -> Self {
        Queue {
            pending: VecDeque::new(),
            encoded: Encoded::default(),
            flights: 0,
            gathering: false,
            closed: false,
            max_batch,
            wait_for_company,
            peak: (0, 0),
            peak_moved: false,
            high_water: 0,
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
        (self.pending.len(), self.encoded.bytes())
    }

    /// The most pushes, and encoded bytes, that have waited at once, when that moved since
    /// it was last asked for (the flusher publishes it once per batch, not every push).
    pub(super) fn take_peak(&mut self) -> Option<(usize, usize)> {
        std::mem::take(&mut self.peak_moved).then_some(self.peak)
    }

    /// Admits a push of `updates`, with room for `depth` flights: alone, when nothing is
    /// queued and there is room for a flight (which it takes; the caller sends them);
    /// otherwise queued (its updates copied into the queue), and the lead (taking a flight
    /// for the flusher task it starts) when there is room and no flusher is gathering.
    /// `Closed` once the pipe is closing.
    ///
    /// A queued push times out at `deadline`: a batch taken later lets it go (see
    /// [`Queue::take_batch`]), and the flusher tells it at its deadline while its batch is
    /// out, unless it is `timed` (it keeps a timer of its own).
    pub(super) fn admit(
        &mut self,
        updates: &Encoded,
        depth: usize,
        deadline: Instant,
        timed: bool,
    ) -> Result<Turn, Error> {
        if self.closed {
            return Err(Error::Closed);
        }
        let room = self.flights < depth;
        if room && self.pending.is_empty() && !self.wait_for_company {
            self.flights += 1;
            return Ok(Turn::Alone);
        }
        let (pushes, bytes) = self.depth();
        if !self.pending.is_empty()
            && (pushes >= self.max_pushes || bytes + updates.bytes() > self.max_bytes)
        {
            return Ok(Turn::Full { pushes, bytes });
        }
        let (done, outcome) = oneshot::channel();
        self.encoded.append(updates);
        self.high_water = self.high_water.max(self.encoded.bytes());
        self.pending.push_back(Waiting {
            updates: updates.len(),
            request: Request {
                done,
                deadline,
                timed,
            },
        });
        let lead = room && !self.gathering;
        if lead {
            self.flights += 1;
            self.gathering = true;
        }
        let (pushes, bytes) = self.depth();
        if pushes > self.peak.0 || bytes > self.peak.1 {
            self.peak = (self.peak.0.max(pushes), self.peak.1.max(bytes));
            self.peak_moved = true;
        }
        Ok(Turn::Queued { lead, outcome })
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
    ) -> Option<Batch> {
        if gatherer {
            self.gathering = false;
        }
        let mut requests = Vec::new();
        // The updates to send, by index (whole pushes), and how many are taken from the
        // front of the buffer, sent or not.
        let mut kept: Vec<std::ops::Range<usize>> = Vec::new();
        let (mut sent, mut taken) = (0, 0);
        while let Some(waiting) = self.pending.front() {
            let request = &waiting.request;
            // Its caller gave up (cancelled, or timed out waiting for room) before it was
            // sent, or its deadline is past: it must not be sent now.
            let gone = request.done.is_closed() || request.deadline <= now;
            if !gone && sent > 0 && sent + waiting.updates > self.max_batch {
                break;
            }
            let waiting = self.pending.pop_front().expect("a front push");
            let updates = taken..taken + waiting.updates;
            taken = updates.end;
            if waiting.request.done.is_closed() {
                continue;
            }
            if gone {
                expired.push(waiting.request);
                continue;
            }
            sent += waiting.updates;
            match kept.last_mut() {
                Some(last) if last.end == updates.start => last.end = updates.end,
                _ => kept.push(updates),
            }
            requests.push(waiting.request);
        }
        // Sized to the batch, not to what is queued behind it.
        let bytes = kept.iter().map(|r| self.encoded.bytes_of(r.clone())).sum();
        let mut batch = Batch {
            encoded: Encoded::with_capacity(sent, bytes),
            requests,
        };
        for range in kept {
            batch.encoded.extend_from(&self.encoded, range);
        }
        self.encoded.remove_front(taken);
        if self.pending.is_empty() && taken > 0 {
            // The buffer keeps room for about what the last batches needed, not for a
            // burst long past.
            self.encoded
                .shrink_to(std::mem::take(&mut self.high_water).max(KEPT_BUFFER_BYTES));
        }
        if batch.requests.is_empty() {
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
        self.encoded = Encoded::default();
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

    /// When the push at the front times out (the earliest of those without a timer of
    /// their own: they are queued in deadline order).
    pub(super) fn front_deadline(&self) -> Option<Instant> {
        self.pending.front().map(|w| w.request.deadline)
    }

    /// How many more updates the next batch would take: 0 once a full batch is queued.
    pub(super) fn room_in_batch(&self) -> usize {
        self.max_batch.saturating_sub(self.encoded.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A deadline no test reaches.
    fn later() -> Instant {
        Instant::now() + std::time::Duration::from_secs(3600)
    }

    /// The next batch, when no push has expired.
    fn take(queue: &mut Queue, gatherer: bool) -> Option<Batch> {
        let mut expired = Vec::new();
        let batch = queue.take_batch(gatherer, Instant::now(), &mut expired);
        assert!(expired.is_empty());
        batch
    }

    /// `n` updates, `"0"`, `"1"`…
    fn updates(n: usize) -> Encoded {
        let mut encoded = Encoded::default();
        for i in 0..n {
            encoded
                .push_with(|out| {
                    out.extend_from_slice(i.to_string().as_bytes());
                    Ok(())
                })
                .unwrap();
        }
        encoded
    }

    /// A batch's pushes and updates.
    fn shape(batch: &Batch) -> (usize, usize) {
        (batch.requests.len(), batch.encoded.len())
    }

    fn queued(turn: Result<Turn, Error>) -> (bool, oneshot::Receiver<Outcome>) {
        match turn.unwrap() {
            Turn::Queued { lead, outcome } => (lead, outcome),
            other => panic!("not queued: {other:?}"),
        }
    }

    #[test]
    fn the_queue_is_bounded_by_pushes_and_bytes() {
        let mut queue = Queue::new(100, true).with_bound(3, 10);
        let mut waiting = Vec::new();
        for _ in 0..3 {
            waiting.push(queued(queue.admit(&updates(1), 1, later(), false)));
        }
        assert_eq!(queue.depth(), (3, 3));
        assert_eq!(queue.take_peak(), Some((3, 3)));
        assert_eq!(queue.take_peak(), None, "told once");
        match queue.admit(&updates(2), 1, later(), false).unwrap() {
            Turn::Full { pushes, bytes } => assert_eq!((pushes, bytes), (3, 3)),
            other => panic!("{other:?}"),
        }
        // A batch taken makes room.
        assert_eq!(take(&mut queue, true).map(|b| shape(&b)), Some((3, 3)));
        assert_eq!(queue.depth(), (0, 0));
        // Bytes: a push larger than the bound is taken alone, and nothing joins it.
        let mut big = Encoded::default();
        big.push_with(|out| {
            out.extend_from_slice("x".repeat(20).as_bytes());
            Ok(())
        })
        .unwrap();
        let _big = queued(queue.admit(&big, 1, later(), false));
        assert!(matches!(
            queue.admit(&updates(1), 1, later(), false),
            Ok(Turn::Full { .. })
        ));
        assert_eq!(queue.depth(), (1, 20));
        queue.abandon_flusher();
        assert_eq!(queue.depth(), (0, 0));
    }

    #[test]
    fn a_lone_push_goes_alone_and_takes_a_flight() {
        let mut queue = Queue::new(10, false);
        assert!(matches!(
            queue.admit(&updates(1), 2, later(), false),
            Ok(Turn::Alone)
        ));
        assert!(!queue.is_idle());
        // Room for a second flight, nothing queued: alone too.
        assert!(matches!(
            queue.admit(&updates(1), 2, later(), false),
            Ok(Turn::Alone)
        ));
        queue.end_flight();
        queue.end_flight();
        assert!(queue.is_idle());
    }

    #[test]
    fn flights_are_bounded_by_depth() {
        let mut queue = Queue::new(10, false);
        assert!(matches!(
            queue.admit(&updates(1), 1, later(), false),
            Ok(Turn::Alone)
        ));
        // No room: queued, and no flusher started (no flight taken).
        let (lead, _a) = queued(queue.admit(&updates(1), 1, later(), false));
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
        assert!(matches!(
            queue.admit(&updates(1), 3, later(), false),
            Ok(Turn::Alone)
        ));
        let (lead, _a) = queued(queue.admit(&updates(1), 1, later(), false));
        assert!(!lead, "no room for a second flight");
        // Something is queued: not alone, though there is room; the lead takes the flight.
        let (lead, _b) = queued(queue.admit(&updates(1), 3, later(), false));
        assert!(lead);
        let (lead, _c) = queued(queue.admit(&updates(1), 3, later(), false));
        assert!(!lead, "a flusher is gathering already");
        assert_eq!(queue.flights, 2);
        // Once the flusher has taken its batch, a queued push may lead again.
        assert_eq!(take(&mut queue, true).map(|b| shape(&b)), Some((3, 3)));
        let (lead, _d) = queued(queue.admit(&updates(1), 1, later(), false));
        assert!(!lead, "no room");
        let (lead, _e) = queued(queue.admit(&updates(1), 3, later(), false));
        assert!(lead);
        assert_eq!(queue.flights, 3);
    }

    #[test]
    fn with_a_batch_wait_no_push_goes_alone() {
        let mut queue = Queue::new(10, true);
        let (lead, _a) = queued(queue.admit(&updates(1), 4, later(), false));
        assert!(lead);
        assert_eq!(queue.flights, 1);
    }

    #[test]
    fn batches_are_taken_in_order_up_to_the_bound() {
        let mut queue = Queue::new(5, true);
        let mut outcomes = Vec::new();
        for n in [2, 2, 2, 7, 1] {
            outcomes.push(queued(queue.admit(&updates(n), 1, later(), false)).1);
        }
        assert_eq!(queue.encoded.len(), 14);
        assert_eq!(queue.room_in_batch(), 0);
        let first = take(&mut queue, true).unwrap();
        assert_eq!(shape(&first), (2, 4), "up to 5 updates, whole pushes only");
        let sent: Vec<&str> = first.encoded.iter().collect();
        assert_eq!(sent, ["0", "1", "0", "1"]);
        let second = take(&mut queue, false).unwrap();
        assert_eq!(
            shape(&second),
            (1, 2),
            "a push that does not fit waits for the next"
        );
        let third = take(&mut queue, false).unwrap();
        assert_eq!(
            shape(&third),
            (1, 7),
            "a push larger than the bound is one batch"
        );
        assert_eq!(shape(&take(&mut queue, false).unwrap()), (1, 1));
        assert_eq!(queue.flights, 1);
        assert!(take(&mut queue, false).is_none());
        assert!(queue.is_idle(), "nothing queued: the flight is over");
    }

    #[test]
    fn pushes_whose_caller_gave_up_are_not_sent() {
        let mut queue = Queue::new(10, true);
        let (_, gave_up) = queued(queue.admit(&updates(1), 1, later(), false));
        let (_, waiting) = queued(queue.admit(&updates(2), 1, later(), false));
        drop(gave_up);
        let batch = take(&mut queue, true).unwrap();
        assert_eq!(shape(&batch), (1, 2));
        for request in batch.requests {
            request.resolve(Ok(()));
        }
        assert!(matches!(waiting.blocking_recv(), Ok(Ok(()))));
    }

    #[test]
    fn a_closed_queue_takes_no_push_and_abandoning_tells_the_waiting() {
        let mut queue = Queue::new(10, true);
        let (_, waiting) = queued(queue.admit(&updates(1), 1, later(), false));
        assert!(!queue.close(), "a flight is out");
        assert!(matches!(
            queue.admit(&updates(1), 1, later(), false),
            Err(Error::Closed)
        ));
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
        let (_, early) = queued(queue.admit(&updates(1), 1, soon, false));
        let (_, late) = queued(queue.admit(&updates(2), 1, later(), false));
        let mut expired = Vec::new();
        // Before the deadline, both go.
        let mut copy = Queue::new(10, true);
        let (_, _a) = queued(copy.admit(&updates(1), 1, soon, false));
        assert_eq!(
            copy.take_batch(true, now, &mut expired).map(|b| shape(&b)),
            Some((1, 1))
        );
        assert!(expired.is_empty());
        // At it, the first is let go and the batch is what is left.
        let batch = queue.take_batch(true, soon, &mut expired).unwrap();
        assert_eq!(shape(&batch), (1, 2));
        assert_eq!(batch.encoded.iter().collect::<Vec<_>>(), ["0", "1"]);
        assert_eq!(expired.len(), 1);
        assert_eq!(queue.depth(), (0, 0));
        for request in expired {
            request.resolve(Err(Error::Closed));
        }
        assert!(matches!(early.blocking_recv(), Ok(Err(Error::Closed))));
        drop(batch);
        assert!(late.blocking_recv().is_err());
        // All expired: no batch, and the flight is over.
        let (_, _b) = queued(queue.admit(&updates(1), 1, soon, false));
        let mut expired = Vec::new();
        assert!(queue.take_batch(true, soon, &mut expired).is_none());
        assert_eq!(expired.len(), 1);
        assert!(queue.is_idle());
    }
}
