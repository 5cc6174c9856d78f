//! The listener's schedule: what the connection loop starts next, and what it waits for,
//! decided from the sub-states, the loop's slots and the clock alone, without I/O. The loop
//! in `task` runs what a [`Turn`] says and reports back; the rules live here, each with a
//! test below:
//!
//! - each slot holds one thing at a time: a subscription statement, a query, a heartbeat
//!   being sent, a sample of the notification queue;
//! - the query slot takes what the log reader asks (the tail only with room for what it
//!   brings), else, when the server has an `idle_session_timeout`, a keep-alive every third
//!   of it; after a query cancelled past its deadline, nothing for another deadline;
//! - reading waits for a caller behind by the whole bound only while neither a query nor
//!   a subscription statement runs (their answers come on the same connection);
//! - a late heartbeat, or one that could not be sent, puts a statement that proves the
//!   connection into the query slot before anything else (its answer, or none, decides:
//!   see `heartbeat`), unless a query runs: then whether the query answers its cancel
//!   decides;
//! - resyncs held back are released when due;
//! - a polling listener reads the log's tail every polling interval.

use std::time::Duration;

use tokio::time::Instant;

use super::dispatch::Dispatch;
use super::query::{QueryOutcome, Start};
use super::watch::QueueWatch;

/// What runs in the loop's slots now.
#[derive(Clone, Copy, Debug, Default)]
pub(super) struct Busy {
    pub(super) query: bool,
    pub(super) subscribing: bool,
    pub(super) heartbeat: bool,
    pub(super) sampling: bool,
}

/// What the loop starts this turn, and until when it waits.
#[derive(Debug, Default)]
pub(super) struct Turn {
    /// A subscription statement (`LISTEN`, `UNLISTEN`) for its slot.
    pub(super) subscribe: Option<String>,
    /// A statement for the query slot.
    pub(super) query: Option<Start>,
    /// The number of the heartbeat to send.
    pub(super) heartbeat: Option<u64>,
    /// Sample the notification queue.
    pub(super) sample: bool,
    /// Reading waits for the caller until then.
    pub(super) held_until: Option<Instant>,
    /// When a resync held back is due.
    pub(super) release_at: Option<Instant>,
}

/// What a tick of the clock found.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Tick {
    /// Nothing for the running query.
    Quiet,
    /// The heartbeat is late while a query runs: cancel the query, and see whether it
    /// answers.
    Prove,
}

/// The loop's own timing: the query slot's next opening, and the keep-alive's.
#[derive(Debug)]
pub(super) struct Schedule {
    /// How long a query may run (and how long the slot stays shut after one is cancelled).
    query_deadline: Duration,
    /// No query starts before this.
    retry_at: Option<Instant>,
    /// With an `idle_session_timeout` on the server: a statement at least this often.
    keep_alive_every: Option<Duration>,
    /// When a statement last went out on the connection.
    last_statement: Instant,
    /// Polling: how often the log is read, and when next.
    poll: Option<(Duration, Instant)>,
}

impl Schedule {
    pub(super) fn new(query_deadline: Duration, now: Instant) -> Schedule {
        Schedule {
            query_deadline,
            retry_at: None,
            keep_alive_every: None,
            last_statement: now,
            poll: None,
        }
    }

    /// Reads the log every `every` instead of waiting for notifications (`None`: it
    /// listens).
    pub(super) fn polling(mut self, every: Option<Duration>) -> Schedule {
        self.poll = every.map(|every| (every, self.last_statement));
        self
    }

    /// A new session, whose server ends it after `idle_timeout` without a statement (when
    /// set): a statement every third of it (at least every 100 ms).
    pub(super) fn new_session(&mut self, idle_timeout: Option<Duration>, now: Instant) {
        self.keep_alive_every = idle_timeout.map(|t| (t / 3).max(Duration::from_millis(100)));
        self.last_statement = now;
        if let Some((every, _)) = self.poll {
            self.poll = Some((every, now + every));
        }
    }

    /// How often the loop's clock ticks: as the heartbeat needs (`heartbeat_tick`), twice
    /// per keep-alive period, and four times per polling interval.
    pub(super) fn tick_every(&self, heartbeat_tick: Duration) -> Duration {
        let tick = match self.keep_alive_every {
            Some(every) => heartbeat_tick.min(every / 2),
            None => heartbeat_tick,
        };
        // Polling: a read at most a quarter interval late.
        match self.poll {
            Some((every, _)) => tick.min((every / 4).max(Duration::from_millis(10))),
            None => tick,
        }
    }

    /// What to start now, given what runs (`busy`), and until when to wait.
    pub(super) fn plan(
        &mut self,
        dispatch: &mut Dispatch,
        watch: &mut QueueWatch,
        busy: Busy,
        now: Instant,
    ) -> Turn {
        let mut turn = Turn::default();
        if let Some((every, next)) = &mut self.poll
            && now >= *next
        {
            dispatch.read_log_soon();
            *next = now + *every;
        }
        if !busy.subscribing {
            turn.subscribe = dispatch.next_subscription();
        }
        if !busy.query && dispatch.wants_proof(now) {
            // Before anything else, and whatever a cancelled query left shut.
            self.last_statement = now;
            turn.query = Some(Start::Proof(dispatch.proof_started()));
        } else if !busy.query && self.retry_at.is_none_or(|at| now >= at) {
            if let Some(ask) = dispatch.next_ask(now) {
                self.last_statement = now;
                turn.query = Some(Start::Log(ask));
            } else if self
                .keep_alive_every
                .is_some_and(|every| now >= self.last_statement + every)
            {
                self.last_statement = now;
                turn.query = Some(Start::KeepAlive);
            }
        }
        if !busy.heartbeat {
            turn.heartbeat = dispatch.heartbeat_due(now);
        }
        turn.sample = !busy.sampling && watch.due(now);
        let polled =
            busy.query || turn.query.is_some() || busy.subscribing || turn.subscribe.is_some();
        if !polled {
            turn.held_until = dispatch.reading_held();
        }
        turn.release_at = dispatch.next_release();
        turn
    }

    /// A query ended: one cancelled past its deadline (blocked, not dead) is retried only
    /// after another deadline.
    pub(super) fn query_done(&mut self, outcome: &QueryOutcome, now: Instant) {
        if outcome.was_cancelled() {
            self.retry_at = Some(now + self.query_deadline);
        }
    }

    /// What a tick of the clock finds, with a query running or not. (With none running,
    /// a late heartbeat is for the next turn's plan: a proof goes into the query slot.)
    pub(super) fn on_tick(&self, dispatch: &Dispatch, query_running: bool, now: Instant) -> Tick {
        // While a query runs the backend is not idle and delivers no notification,
        // heartbeats included: a late heartbeat says nothing then. Whether the query
        // answers its cancel does.
        if query_running && dispatch.heartbeat_late(now) {
            Tick::Prove
        } else {
            Tick::Quiet
        }
    }
}

#[cfg(test)]
mod tests;
