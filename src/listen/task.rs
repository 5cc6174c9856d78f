//! The connection loop: serves a session until it ends, reconnects, and dispatches what
//! arrives (notifications, heartbeats sent, log reads) to the sub-states. I/O and dispatch
//! only: the decisions are the sub-states'.

use std::future::poll_fn;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use futures_util::FutureExt;
use futures_util::future::{BoxFuture, Fuse, FusedFuture};
use tokio::sync::{Notify, mpsc, oneshot};
use tokio::time::Instant;
use tokio_postgres::{AsyncMessage, Client, Notification};

use super::connector::Connector;
use super::dispatch::{Asked, Dispatch, QueryOutcome};
use super::durable::Ask;
use super::intake::Incoming;
use super::outbox;
use super::pacer::Pacer;
use super::session::Session;
use super::subscriptions::Command;
use super::watch::QueueWatch;
use super::{Event, TARGET};
use crate::error::pg_message;
use crate::log;
use crate::pg::{CancelOnDrop, Canceller};
use crate::stats::Counters;

/// Why serving a session ended.
enum End {
    Stopped,
    ReceiverGone,
    Connection(String),
}

/// The connection loop's owner: what connects, and the sub-states it dispatches to.
#[derive(Debug)]
pub(super) struct ConnectionLoop {
    pub(super) connector: Connector,
    pub(super) dispatch: Dispatch,
    pub(super) watch: QueueWatch,
    /// The channel, as the log's statements name it.
    pub(super) channel: String,
    /// The query slot's deadline and cancels (see `next_query`).
    pub(super) slot: QuerySlot,
}

/// The listener's query slot: how long a query may take, and what happens past that.
#[derive(Debug)]
pub(super) struct QuerySlot {
    /// How long a query may run before it is cancelled.
    pub(super) deadline: Duration,
    /// How long a cancelled query has to answer (with its error) before its connection is
    /// taken for dead.
    pub(super) grace: Duration,
    pub(super) canceller: Canceller,
    /// No query starts before this: a cancelled one is retried after its deadline again.
    pub(super) retry_at: Option<Instant>,
    /// Paces the warning about cancelled queries.
    pub(super) cancels: Pacer,
    /// Tells the running query to find out now whether the connection is alive (cancel
    /// it, and see whether it answers): a heartbeat is late meanwhile.
    prove: Option<Arc<Notify>>,
}

impl QuerySlot {
    pub(super) fn new(deadline: Duration, grace: Duration, canceller: Canceller) -> QuerySlot {
        QuerySlot {
            deadline,
            grace,
            canceller,
            retry_at: None,
            cancels: Pacer::default(),
            prove: None,
        }
    }

    /// Whether a query may start now.
    fn open(&self, now: Instant) -> bool {
        self.retry_at.is_none_or(|at| now >= at)
    }

    /// A query was cancelled past its deadline and answered (the connection is fine, the
    /// statement was blocked: a lock on the log, say): counted, warned about (paced), and
    /// the next query waits a deadline.
    fn cancelled(&mut self, counters: &Counters, now: Instant) {
        counters.statement_cancelled();
        self.retry_at = Some(now + self.deadline);
        if let Some(suppressed) = self.cancels.due(std::time::Instant::now()) {
            tracing::warn!(
                target: TARGET,
                deadline = ?self.deadline,
                suppressed,
                "a query on the listener's connection did not answer in time and was \
                 cancelled (a lock on updatepipe.log?); retrying, without reconnecting"
            );
        }
    }
}

impl ConnectionLoop {
    pub(super) async fn run(
        mut self,
        first: Session,
        mut stopped: oneshot::Receiver<()>,
        mut commands: mpsc::Receiver<Command>,
    ) {
        let mut session = Some(first);
        loop {
            let current = match session.take() {
                Some(s) => s,
                None => match self.reconnect(&mut stopped).await {
                    Some(s) => s,
                    None => break,
                },
            };
            let connected_at = Instant::now();
            let (end, current) = self.serve(current, &mut stopped, &mut commands).await;
            match end {
                End::Stopped => {
                    tracing::debug!(target: TARGET, "listener stopped");
                    current.close().await;
                    break;
                }
                End::ReceiverGone => {
                    tracing::info!(
                        target: TARGET,
                        "the caller dropped its channel; listener stops"
                    );
                    current.close().await;
                    break;
                }
                End::Connection(reason) => {
                    // A dead connection gets no polite goodbye: it may never be written.
                    drop(current);
                    // A caller that asked for events is told by one; the others only
                    // by the log.
                    if self.dispatch.outbox.tells_events() {
                        tracing::debug!(
                            target: TARGET,
                            %reason,
                            "listener connection lost; reconnecting"
                        );
                    } else {
                        tracing::warn!(
                            target: TARGET,
                            %reason,
                            "listener connection lost; reconnecting"
                        );
                    }
                    self.dispatch.counters.disconnect();
                    self.dispatch.outbox.emit(Event::Disconnected { reason });
                    self.connector.lost(connected_at.elapsed());
                }
            }
        }
        // Dropping the sink ends the caller's channel.
    }

    /// A new session, once the connector has one; then each sub-state does what a reconnect
    /// does to it.
    async fn reconnect(&mut self, stopped: &mut oneshot::Receiver<()>) -> Option<Session> {
        let d = &mut self.dispatch;
        let mailboxes = d.intake.subscriptions.channels();
        let session = self
            .connector
            .reconnect(&mut d.outbox, &d.counters, stopped, &mailboxes)
            .await?;
        d.on_reconnect();
        Some(session)
    }

    async fn serve(
        &mut self,
        mut session: Session,
        stopped: &mut oneshot::Receiver<()>,
        commands: &mut mpsc::Receiver<Command>,
    ) -> (End, Session) {
        tracing::trace!(target: TARGET, buffered = self.dispatch.outbox.len(), "serving a session");
        for notification in std::mem::take(&mut session.backlog) {
            self.dispatch.on_notification(incoming(&notification));
        }
        let mut receiver_gone = self.dispatch.outbox.closed();
        // With an idle_session_timeout on the server, a statement every third of it keeps
        // the session (the listening connection sends nothing otherwise: heartbeats go out
        // from the pool).
        let keep_alive = session
            .idle_timeout
            .map(|t| (t / 3).max(Duration::from_millis(100)));
        let mut last_statement = Instant::now();
        let tick = match keep_alive {
            Some(every) => self.dispatch.heartbeat.clock.tick_every().min(every / 2),
            None => self.dispatch.heartbeat.clock.tick_every(),
        };
        let mut ticker = tokio::time::interval(tick);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let end = {
            let Session {
                client, connection, ..
            } = &mut session;
            let client: &Client = client;
            let mut query: Pin<&mut Fuse<BoxFuture<'_, QueryOutcome>>> =
                std::pin::pin!(Fuse::terminated());
            let mut heartbeat = std::pin::pin!(Fuse::terminated());
            // `LISTEN`/`UNLISTEN` for subscriptions by mailbox, one at a time.
            let mut subscribing: Pin<&mut Fuse<BoxFuture<'_, Result<(), String>>>> =
                std::pin::pin!(Fuse::terminated());
            let mut watch = std::pin::pin!(Fuse::terminated());
            loop {
                if subscribing.is_terminated()
                    && let Some(sql) = self.dispatch.intake.subscriptions.next_statement()
                {
                    subscribing.set(subscribe(client, sql, self.slot.deadline).boxed().fuse());
                }
                if query.is_terminated() && self.slot.open(Instant::now()) {
                    let now = Instant::now();
                    if let Some(next) = self.next_query(client) {
                        last_statement = now;
                        query.set(next.fuse());
                    } else if keep_alive.is_some_and(|every| now >= last_statement + every) {
                        last_statement = now;
                        self.slot.prove = None;
                        query.set(self.keep_alive(client).fuse());
                    }
                }
                if heartbeat.is_terminated()
                    && let Some(next) = self.dispatch.heartbeat.next()
                {
                    heartbeat.set(next.fuse());
                }
                if watch.is_terminated()
                    && let Some(next) = self.watch.next(Instant::now())
                {
                    watch.set(next.fuse());
                }
                let ready = self.dispatch.outbox.has_ready();
                let release = self.dispatch.outbox.next_release();
                // The caller is behind by the whole bound: reading waits a moment for it
                // (not while a statement or a subscription needs the connection polled).
                // Notifications wait meanwhile, heartbeats among them: the heartbeat's time
                // counts from the end of the wait, which is under half its timeout.
                let held = if query.is_terminated() && subscribing.is_terminated() {
                    let longest = match self.dispatch.heartbeat.clock.timeout() {
                        timeout if timeout.is_zero() => outbox::HOLD,
                        timeout => timeout / 2,
                    };
                    self.dispatch.outbox.reading_held(longest)
                } else {
                    None
                };
                if held.is_some() {
                    // The heartbeat sent is behind what the server's queue held meanwhile:
                    // it has the longest the caller may be waited for, on top of its
                    // timeout, to come back once reading resumes.
                    let allowance = Instant::now() + outbox::HOLD_EPISODE;
                    self.dispatch.heartbeat.clock.busy_until(allowance);
                }
                tokio::select! {
                    // The slots and the clock before the connection, so that steady
                    // traffic never starves a heartbeat or a log read.
                    biased;
                    _ = &mut *stopped => break End::Stopped,
                    sent = &mut heartbeat => self.dispatch.on_heartbeat_sent(sent),
                    done = &mut subscribing => match done {
                        Ok(()) => self.dispatch.intake.subscriptions.done(),
                        Err(reason) => break End::Connection(reason),
                    },
                    Some(command) = commands.recv() => {
                        self.dispatch.intake.subscriptions.apply(command);
                    }
                    sampled = &mut watch => self.watch.on_sampled(sampled),
                    outcome = &mut query => {
                        let now = Instant::now();
                        // Notifications wait while a statement runs: the heartbeat's time
                        // counts from the end of the query.
                        self.dispatch.heartbeat.clock.busy_until(now);
                        if matches!(outcome, QueryOutcome::Cancelled(_)) {
                            self.slot.cancelled(&self.dispatch.counters, now);
                        }
                        if let Err(reason) = self.dispatch.on_query(outcome) {
                            break End::Connection(reason);
                        }
                    }
                    _ = ticker.tick() => {
                        if let Some(reason) = self.dispatch.heartbeat.clock.late(Instant::now()) {
                            if query.is_terminated() {
                                break End::Connection(reason);
                            }
                            // While a query runs the backend is not idle and delivers no
                            // notification, heartbeats included: a late heartbeat says
                            // nothing then. Whether the query answers its cancel does.
                            if let Some(prove) = &self.slot.prove {
                                prove.notify_one();
                            }
                        }
                    }
                    () = hold_over(held), if held.is_some() => {}
                    () = hold_over(release), if release.is_some() => {
                        self.dispatch.outbox.release_held(Instant::now());
                    }
                    message = poll_fn(|cx| connection.poll_message(cx)), if held.is_none() => match message {
                        Some(Ok(AsyncMessage::Notification(n))) => {
                            self.dispatch.on_notification(incoming(&n));
                            // Hand it over now if there is room: no extra turn of the loop.
                            match self.dispatch.outbox.try_deliver() {
                                Some(sent) => {
                                    if sent > 0 {
                                        self.dispatch.outbox.delivered(sent);
                                    }
                                }
                                None => break End::ReceiverGone,
                            }
                        }
                        Some(Ok(AsyncMessage::Notice(notice))) => {
                            tracing::debug!(
                                target: TARGET,
                                message = notice.message(),
                                "server notice"
                            );
                        }
                        Some(Ok(_)) => {}
                        Some(Err(e)) => break End::Connection(pg_message(&e)),
                        None => break End::Connection("the server closed the connection".into()),
                    },
                    sent = self.dispatch.outbox.deliver(), if ready => match sent {
                        Some(n) => {
                            tracing::trace!(target: TARGET, n, "delivered");
                            self.dispatch.outbox.delivered(n)
                        }
                        None => break End::ReceiverGone,
                    },
                    () = &mut receiver_gone, if !ready => break End::ReceiverGone,
                }
            }
        };
        (end, session)
    }

    /// The next query for the query slot, as the log reader asks (by priority, the tail only
    /// with room), with its deadline: a query that does not answer means a dead connection.
    fn next_query<'c>(&mut self, client: &'c Client) -> Option<BoxFuture<'c, QueryOutcome>> {
        let ask = self.dispatch.next_ask()?;
        let asked = match &ask {
            Ask::Tail { .. } => Asked::Tail,
            Ask::Fetch(..) => Asked::Fetch,
            Ask::Prune(_) => Asked::Prune,
        };
        let not_before = match &ask {
            Ask::Tail { not_before, .. } => *not_before,
            _ => None,
        };
        let channel = self.channel.clone();
        let query = async move {
            match ask {
                Ask::Tail {
                    from,
                    catch_up,
                    budget,
                    ..
                } => QueryOutcome::Tail(
                    log::read_page(client, &channel, &from, catch_up.as_ref(), budget).await,
                ),
                Ask::Fetch(origin, seq) => {
                    QueryOutcome::Fetch(log::fetch(client, &channel, &origin, seq).await)
                }
                Ask::Prune(retention) => {
                    QueryOutcome::Prune(log::prune(client, &channel, retention).await)
                }
            }
        };
        let limit = self.slot.deadline;
        let grace = self.slot.grace;
        let canceller = self.slot.canceller.clone();
        let prove = Arc::new(Notify::new());
        self.slot.prove = Some(prove.clone());
        Some(
            async move {
                // A page the server cancelled waits its pause first; its deadline counts
                // from when it is sent.
                if let Some(at) = not_before {
                    tokio::time::sleep_until(at).await;
                }
                // Dropped unfinished (the session ends), the query is cancelled too: a
                // backend waiting on a lock does not notice its client left.
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
                        // Past its deadline, or a heartbeat is late meanwhile: cancelled,
                        // and given the time a heartbeat has to answer.
                        canceller.cancel_detached(client.cancel_token());
                        match tokio::time::timeout(grace, &mut query).await {
                            // A prompt "canceling statement": the connection is fine.
                            Ok(outcome) if was_cancelled(&outcome) => {
                                QueryOutcome::Cancelled(asked)
                            }
                            Ok(outcome) => outcome,
                            // No answer even to a cancel: the connection is dead.
                            Err(_) => QueryOutcome::TimedOut(started.elapsed()),
                        }
                    }
                };
                guard.disarm();
                outcome
            }
            .boxed(),
        )
    }
}

/// Runs one subscription statement by its deadline; a failure ends the session (the next
/// one subscribes to the whole set again).
async fn subscribe(client: &Client, sql: String, limit: Duration) -> Result<(), String> {
    match tokio::time::timeout(limit, client.batch_execute(&sql)).await {
        Ok(Ok(())) => {
            tracing::debug!(target: TARGET, %sql, "subscription changed");
            Ok(())
        }
        Ok(Err(e)) => Err(format!("{sql} failed: {}", pg_message(&e))),
        Err(_) => Err(format!("{sql} did not answer within {limit:?}")),
    }
}

impl ConnectionLoop {
    /// A cheap statement in the query slot, with the slot's deadline and cancel, so that
    /// the server's `idle_session_timeout` does not end the session.
    fn keep_alive<'c>(&self, client: &'c Client) -> BoxFuture<'c, QueryOutcome> {
        let limit = self.slot.deadline;
        let canceller = self.slot.canceller.clone();
        async move {
            let mut guard = CancelOnDrop::new(&canceller, client);
            match tokio::time::timeout(limit, client.batch_execute("SELECT 1")).await {
                Ok(done) => {
                    guard.disarm();
                    QueryOutcome::KeptAlive(done)
                }
                // Cancelled as the guard goes; no answer in a whole deadline: dead.
                Err(_) => QueryOutcome::TimedOut(limit),
            }
        }
        .boxed()
    }
}

/// Whether a query ended with the server's "canceling statement" (ours, or the server's
/// `statement_timeout`).
fn was_cancelled(outcome: &QueryOutcome) -> bool {
    match outcome {
        QueryOutcome::Tail(Err(e)) | QueryOutcome::Fetch(Err(e)) => crate::pg::is_cancelled(e),
        QueryOutcome::Prune(Err(e)) => crate::pg::is_cancelled(e),
        _ => false,
    }
}

/// A notification, as the intake takes it.
fn incoming(notification: &Notification) -> Incoming<'_> {
    Incoming {
        channel: notification.channel(),
        payload: notification.payload(),
        sender_pid: notification.process_id(),
    }
}

/// Completes at `until` (the end of a wait for the caller, see `Outbox::reading_held`; or
/// when a resync held back is due, see `Outbox::next_release`).
async fn hold_over(until: Option<Instant>) {
    if let Some(until) = until {
        tokio::time::sleep_until(until).await;
    }
}
