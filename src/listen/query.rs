//! The listener's query slot: one statement at a time on its connection (a page of the
//! log, a fetch, a prune, a keep-alive), each by its deadline, cancelled on the server past
//! it, or as soon as a late heartbeat asks whether the connection still answers; and the
//! subscription statements (`LISTEN`/`UNLISTEN`) of the maddy layout. This is the loop's
//! I/O; `schedule` decides what goes in the slot and when.

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use futures_util::FutureExt;
use futures_util::future::BoxFuture;
use tokio::sync::Notify;
use tokio::time::Instant;
use tokio_postgres::Client;

use super::durable::Ask;
use super::event::TARGET;
use crate::error::pg_message;
use crate::log::{self, Page, Pruned};
use crate::pg::{CancelOnDrop, Canceller, is_cancelled};

/// What goes in the query slot.
#[derive(Debug)]
pub(super) enum Start {
    /// What the log reader asked.
    Log(Ask),
    /// A cheap statement, so that the server's `idle_session_timeout` does not end the
    /// session.
    KeepAlive,
    /// A cheap statement that proves the connection answers, within this time (a heartbeat
    /// is late, or could not be sent: see `heartbeat`).
    Proof(Duration),
}

/// What the listener's one query slot produced.
pub(super) enum QueryOutcome {
    Tail(Result<Option<Page>, tokio_postgres::Error>),
    Fetch(Result<Option<(String, f64)>, tokio_postgres::Error>),
    Prune(Result<Pruned, tokio_postgres::Error>),
    /// No answer by the deadline, not even to a cancel: the connection is dead.
    TimedOut(Duration),
    /// A keep-alive statement's answer.
    KeptAlive(Result<(), tokio_postgres::Error>),
    /// Cancelled past the deadline (or because a heartbeat was late meanwhile), and the
    /// cancel was answered: the connection is fine (the loop retries later).
    Cancelled(Asked),
    /// The proof's answer.
    Proved(Result<(), tokio_postgres::Error>),
    /// The proof was waited for this long, the last whole window of it with nothing from
    /// the connection: the connection is dead.
    Unproved(Duration),
}

impl QueryOutcome {
    /// Whether the statement was cancelled and answered (the connection is fine).
    pub(super) fn was_cancelled(&self) -> bool {
        matches!(self, QueryOutcome::Cancelled(_))
    }
}

/// Which query of the slot an outcome is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Asked {
    Tail,
    Fetch,
    Prune,
}

/// How many messages (notifications, notices) the connection has delivered: the loop counts
/// them, and a statement waiting for its answer reads the count.
///
/// The server writes the notifications queued for a session before the answer to its next
/// statement. Under a flood the listener reads thousands before it comes to the answer, and
/// that answer is late, not lost: a connection that keeps delivering is alive. So a wait for
/// an answer that decides the connection is dead ends only after a whole window in which the
/// connection delivered nothing ([`answer_while_heard`]).
#[derive(Clone, Debug, Default)]
pub(super) struct Heard(Arc<AtomicU64>);

impl Heard {
    /// The connection delivered a message.
    pub(super) fn message(&self) {
        self.0.fetch_add(1, Ordering::Relaxed);
    }

    fn count(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// Waits for `answer` as long as the connection is heard from: `Err` with the time waited
/// once a whole `window` passed with no answer and no message delivered, checked every
/// quarter window. (A connection silent from the start is given up after one window, as
/// before; one that stops delivering, within a window and a quarter of its last message;
/// one that delivers a flood first is waited for.)
async fn answer_while_heard<F: Future>(
    heard: &Heard,
    window: Duration,
    answer: F,
) -> Result<F::Output, Duration> {
    let started = Instant::now();
    let step = (window / 4).max(Duration::from_millis(1));
    let mut answer = std::pin::pin!(answer);
    let mut seen = heard.count();
    let mut quiet_since = started;
    loop {
        if let Ok(output) = tokio::time::timeout(step, &mut answer).await {
            return Ok(output);
        }
        let now = Instant::now();
        let count = heard.count();
        if count != seen {
            (seen, quiet_since) = (count, now);
        } else if now.duration_since(quiet_since) >= window {
            return Err(now.duration_since(started));
        }
    }
}

/// The query slot's deadline and cancels.
#[derive(Debug)]
pub(super) struct QuerySlot {
    /// How long a query may run before it is cancelled.
    deadline: Duration,
    /// How long a cancelled query has to answer (with its error) before its connection is
    /// taken for dead.
    grace: Duration,
    canceller: Canceller,
    /// Tells the running query to find out now whether the connection is alive (cancel
    /// it, and see whether it answers): a heartbeat is late meanwhile.
    prove: Option<Arc<Notify>>,
    /// What the connection delivers, while a statement waits for its answer.
    heard: Heard,
}

impl QuerySlot {
    pub(super) fn new(deadline: Duration, grace: Duration, canceller: Canceller) -> QuerySlot {
        QuerySlot {
            deadline,
            grace,
            canceller,
            prove: None,
            heard: Heard::default(),
        }
    }

    /// The count of the connection's messages, for the loop to add to.
    pub(super) fn heard(&self) -> Heard {
        self.heard.clone()
    }

    /// A heartbeat is late while a query runs (the backend delivers no notification
    /// meanwhile, heartbeats included): whether the query answers its cancel decides.
    pub(super) fn prove(&self) {
        if let Some(prove) = &self.prove {
            prove.notify_one();
        }
    }

    /// Runs `start` on `client`, by the slot's deadline (a page the server cancelled waits
    /// its pause first; its deadline counts from when it is sent).
    pub(super) fn start<'c>(
        &mut self,
        client: &'c Client,
        channel: &str,
        start: Start,
    ) -> BoxFuture<'c, QueryOutcome> {
        match start {
            Start::KeepAlive => {
                self.prove = None;
                self.keep_alive(client)
            }
            Start::Proof(within) => {
                self.prove = None;
                self.proof(client, within)
            }
            Start::Log(ask) => self.ask(client, channel.to_owned(), ask),
        }
    }

    /// A log query, with its deadline: a query that does not answer means a dead
    /// connection.
    fn ask<'c>(
        &mut self,
        client: &'c Client,
        channel: String,
        ask: Ask,
    ) -> BoxFuture<'c, QueryOutcome> {
        let asked = match &ask {
            Ask::Tail { .. } => Asked::Tail,
            Ask::Fetch(..) => Asked::Fetch,
            Ask::Prune { .. } => Asked::Prune,
        };
        let not_before = match &ask {
            Ask::Tail { not_before, .. } => *not_before,
            _ => None,
        };
        let query = async move {
            match ask {
                Ask::Tail {
                    from,
                    catch_up,
                    budget,
                    place,
                    ..
                } => QueryOutcome::Tail(
                    log::read_page(client, &channel, &from, catch_up.as_deref(), budget, place)
                        .await,
                ),
                Ask::Fetch(origin, seq) => {
                    QueryOutcome::Fetch(log::fetch(client, &channel, &origin, seq).await)
                }
                Ask::Prune { retention, hold } => {
                    QueryOutcome::Prune(log::prune(client, &channel, retention, hold).await)
                }
            }
        };
        let limit = self.deadline;
        let grace = self.grace;
        let canceller = self.canceller.clone();
        let heard = self.heard.clone();
        let prove = Arc::new(Notify::new());
        self.prove = Some(prove.clone());
        async move {
            if let Some(at) = not_before {
                tokio::time::sleep_until(at).await;
            }
            // Dropped unfinished (the session ends), the query is cancelled too: a backend
            // waiting on a lock does not notice its client left.
            let mut guard = CancelOnDrop::new(&canceller, client);
            let started = Instant::now();
            let mut query = std::pin::pin!(query);
            let answered = tokio::select! {
                biased;
                outcome = &mut query => Some(outcome),
                () = tokio::time::sleep(limit) => None,
                () = prove.notified() => None,
            };
            let outcome = match answered {
                Some(outcome) => outcome,
                None => {
                    // Past its deadline, or a heartbeat is late meanwhile: cancelled, and
                    // given the time a heartbeat has to answer.
                    canceller.cancel_detached(client.cancel_token());
                    match answer_while_heard(&heard, grace, &mut query).await {
                        // A prompt "canceling statement": the connection is fine.
                        Ok(outcome) if ended_cancelled(&outcome) => QueryOutcome::Cancelled(asked),
                        Ok(outcome) => outcome,
                        // No answer even to a cancel, and silence: the connection is dead.
                        Err(_) => QueryOutcome::TimedOut(started.elapsed()),
                    }
                }
            };
            guard.disarm();
            outcome
        }
        .boxed()
    }

    /// A cheap statement in the query slot, with the slot's deadline and cancel, so that
    /// the server's `idle_session_timeout` does not end the session.
    fn keep_alive<'c>(&self, client: &'c Client) -> BoxFuture<'c, QueryOutcome> {
        self.select_one(client, self.deadline)
            .map(|answer| match answer {
                Ok(done) => QueryOutcome::KeptAlive(done),
                // No answer, and silence, in a whole deadline: dead.
                Err(waited) => QueryOutcome::TimedOut(waited),
            })
            .boxed()
    }

    /// The statement that proves the connection answers, by `within` (more while the
    /// connection delivers what was queued before the answer), cancelled past it.
    fn proof<'c>(&self, client: &'c Client, within: Duration) -> BoxFuture<'c, QueryOutcome> {
        self.select_one(client, within)
            .map(|answer| match answer {
                Ok(done) => QueryOutcome::Proved(done),
                Err(waited) => QueryOutcome::Unproved(waited),
            })
            .boxed()
    }

    /// `SELECT 1`, waited for while the connection is heard from ([`answer_while_heard`]),
    /// and cancelled on the server when given up on: its answer, or how long it was waited
    /// for.
    fn select_one<'c>(
        &self,
        client: &'c Client,
        window: Duration,
    ) -> impl Future<Output = Result<Result<(), tokio_postgres::Error>, Duration>> + Send + 'c {
        let canceller = self.canceller.clone();
        let heard = self.heard.clone();
        async move {
            let mut guard = CancelOnDrop::new(&canceller, client);
            let answer = answer_while_heard(&heard, window, client.batch_execute("SELECT 1")).await;
            if answer.is_ok() {
                guard.disarm();
            }
            answer
        }
    }

    /// Runs one subscription statement by the slot's deadline (more while the connection
    /// delivers); a failure ends the session (the next one subscribes to the whole set
    /// again).
    pub(super) fn subscribe<'c>(
        &self,
        client: &'c Client,
        sql: String,
    ) -> BoxFuture<'c, Result<(), String>> {
        let (heard, limit) = (self.heard.clone(), self.deadline);
        async move {
            match answer_while_heard(&heard, limit, client.batch_execute(&sql)).await {
                Ok(Ok(())) => {
                    tracing::debug!(target: TARGET, %sql, "subscription changed");
                    Ok(())
                }
                Ok(Err(e)) => Err(format!("{sql} failed: {}", pg_message(&e))),
                Err(waited) => Err(format!(
                    "{sql} did not answer in {waited:?} (nothing came from the connection for \
                     {limit:?})"
                )),
            }
        }
        .boxed()
    }
}

/// Whether a query ended with the server's "canceling statement" (ours, or the server's
/// `statement_timeout`).
fn ended_cancelled(outcome: &QueryOutcome) -> bool {
    match outcome {
        QueryOutcome::Tail(Err(e)) | QueryOutcome::Fetch(Err(e)) => is_cancelled(e),
        QueryOutcome::Prune(Err(e)) => is_cancelled(e),
        _ => false,
    }
}
