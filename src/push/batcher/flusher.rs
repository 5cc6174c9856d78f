//! A flusher task's flight: it gathers company when asked to wait, then takes batches from
//! the queue and flushes each by its deadline, until the queue is empty.

use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use super::super::queue::{Batch, Outcome, Request};
use super::{Abandon, Batcher, GATHER_TURNS};
use crate::error::Error;

impl Batcher {
    /// A flusher task: one flight, which takes batches from the queue until it is empty.
    /// Its flight is given back if the task is dropped unfinished, even unpolled (see
    /// `Abandon`).
    pub(super) fn fly(self: Arc<Self>) -> impl Future<Output = ()> + Send + 'static {
        let guard = Abandon(Some(self));
        async move {
            let mut guard = guard;
            if let Some(batcher) = &guard.0 {
                batcher.fly_batches().await;
            }
            guard.0 = None;
        }
    }

    /// The work of a flusher task's flight.
    async fn fly_batches(self: &Arc<Self>) {
        if !self.max_batch_wait.is_zero() {
            // Let company gather, up to the bound, and not past the first push's deadline.
            let until = Instant::now() + self.max_batch_wait;
            loop {
                let (room, first) = {
                    let queue = self.queue.lock().expect("push queue lock");
                    (queue.room_in_batch(), queue.front_deadline())
                };
                let now = Instant::now();
                if room == 0 || now >= until || first.is_some_and(|first| now >= first) {
                    break;
                }
                tokio::time::sleep(Duration::from_micros(100).min(self.max_batch_wait)).await;
            }
        }
        let mut gatherer = true;
        // Whether pushers were just woken who may push again: those of the flight that
        // ended to make room for this one, then those of this flusher's last batch.
        let mut woken = true;
        loop {
            if woken {
                self.let_woken_pushers_rejoin().await;
            }
            let Some(batch) = self.next_batch(std::mem::take(&mut gatherer)) else {
                break;
            };
            // A batch of one push woke one pusher: made to wait, a pusher in a loop
            // would be queued behind this flusher for good, where with the flight over
            // its next push goes out at once, alone.
            woken = batch.requests.len() > 1;
            let Batch {
                encoded,
                mut requests,
            } = batch;
            // The push timeout from now, as a lone push has: a slow server must not cut
            // the pushes that came just now short because one came long ago.
            let flush = self.sender.flush_by(
                Instant::now() + self.sender.timeout(),
                encoded.len(),
                encoded.iter(),
            );
            let outcome = self.flush_keeping_deadlines(flush, &mut requests).await;
            for request in requests {
                request.resolve(outcome.clone());
            }
        }
    }

    /// Runs a batch's flush; meanwhile each push in it without a timer of its own is told
    /// at its deadline that it timed out (its updates may still commit with the batch: an
    /// unknown outcome, as for any push given up once sent). One timer for the batch, at
    /// the earliest such deadline, not one per push.
    async fn flush_keeping_deadlines(
        &self,
        flush: impl Future<Output = Outcome>,
        requests: &mut Vec<Request>,
    ) -> Outcome {
        let mut flush = std::pin::pin!(flush);
        loop {
            let Some(earliest) = requests.iter().filter_map(Request::kept_deadline).min() else {
                return flush.await;
            };
            // A kept timer: moved later batch after batch, where a new one per batch would
            // often be the runtime's earliest and wake a parked thread to re-arm its wait.
            if let Ok(outcome) = self.sender.until(earliest, &mut flush).await {
                return outcome;
            }
            let now = Instant::now();
            let (late, on_time): (Vec<Request>, Vec<Request>) = std::mem::take(requests)
                .into_iter()
                .partition(|r| r.kept_deadline().is_some_and(|at| at <= now));
            *requests = on_time;
            let timeout = self.sender.timeout();
            for request in late {
                request.resolve(Err(Error::Timeout {
                    what: "pushing",
                    after: timeout,
                }));
            }
        }
    }

    /// Before a flusher takes a batch, when a flight has just ended: its pushers were woken
    /// a moment ago and push again as soon as they run, so a few turns of the scheduler
    /// let them join this batch instead of waiting a whole flight for the next. (Without
    /// them, 16 pushers settle into two batches of about 8 that take turns, one waiting
    /// while the other is out.) Turns are given while the last one brought updates, at
    /// most `GATHER_TURNS`, and none once a full batch is queued.
    async fn let_woken_pushers_rejoin(&self) {
        let mut room = self.room_in_batch();
        for _ in 0..GATHER_TURNS {
            if room == 0 {
                break;
            }
            tokio::task::yield_now().await;
            let now = self.room_in_batch();
            if now == room {
                break;
            }
            room = now;
        }
    }

    fn room_in_batch(&self) -> usize {
        self.queue.lock().expect("push queue lock").room_in_batch()
    }

    /// The next batch of queued pushes for a flusher task's flight, `gatherer` on its
    /// first; `None`, with the flight over, when nothing is queued. When more is queued
    /// than the batch takes, another flight may start.
    fn next_batch(self: &Arc<Self>, gatherer: bool) -> Option<Batch> {
        let mut expired = Vec::new();
        let mut queue = self.queue.lock().expect("push queue lock");
        let batch = queue.take_batch(gatherer, Instant::now(), &mut expired);
        let peak = queue.take_peak();
        self.settle(queue);
        if let Some((pushes, bytes)) = peak {
            self.sender.counters().queue_depth(pushes, bytes);
        }
        // Room for the pushes waiting for it.
        self.room.notify_waiters();
        let timeout = self.sender.timeout();
        for request in expired {
            request.resolve(Err(Error::Timeout {
                what: "pushing",
                after: timeout,
            }));
        }
        batch
    }
}
