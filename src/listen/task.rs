//! The connection loop: serves a session until it ends, reconnects, and dispatches what
//! arrives (notifications, heartbeats sent, log reads) to the sub-states. I/O and dispatch
//! only: the decisions are the sub-states'.

use std::future::poll_fn;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use futures_util::FutureExt;
use futures_util::future::{BoxFuture, Fuse, FusedFuture};
use tokio::sync::oneshot;
use tokio::time::Instant;
use tokio_postgres::{AsyncMessage, Client, Notification};

use super::connector::Connector;
use super::durable::{Ask, LogReader};
use super::heartbeat::Heartbeat;
use super::intake::{Content, Incoming, Intake, LogRow, Moment, RowVerdict, Verdict};
use super::outbox::Outbox;
use super::pacer::Pacer;
use super::session::{Session, is_fatal};
use super::{Event, ResyncReason, TARGET};
use crate::error::{DecodeError, pg_message};
use crate::log::{self, Tail};
use crate::origin::Origin;
use crate::stats::Counters;

/// Why serving a session ended.
enum End {
    Stopped,
    ReceiverGone,
    Connection(String),
}

/// What the listener's one query slot produced.
enum QueryOutcome {
    Tail(Result<Option<Tail>, tokio_postgres::Error>),
    Fetch(Result<Option<String>, tokio_postgres::Error>),
    Prune(Result<u64, tokio_postgres::Error>),
    TimedOut(Duration),
}

/// The connection loop's owner: the sub-states, and what connects.
#[derive(Debug)]
pub(super) struct ConnectionLoop {
    pub(super) connector: Connector,
    pub(super) intake: Intake,
    pub(super) outbox: Outbox,
    pub(super) reader: LogReader,
    pub(super) heartbeat: Heartbeat,
    /// Paces the warnings about rejected payloads, which senders can provoke.
    pub(super) rejections: Pacer,
    pub(super) counters: Arc<Counters>,
    pub(super) channel: String,
    pub(super) query_deadline: Duration,
}

impl ConnectionLoop {
    pub(super) async fn run(mut self, first: Session, mut stopped: oneshot::Receiver<()>) {
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
            let (end, current) = self.serve(current, &mut stopped).await;
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
                    tracing::warn!(
                        target: TARGET,
                        %reason,
                        "listener connection lost; reconnecting"
                    );
                    self.counters.disconnect();
                    self.outbox.emit(Event::Disconnected { reason });
                    self.connector.lost(connected_at.elapsed());
                }
            }
        }
        // Dropping the sink ends the caller's channel.
    }

    /// A new session, once the connector has one; then each sub-state does what a reconnect
    /// does to it, and the caller hears `Connected`, then a resync if one is owed.
    async fn reconnect(&mut self, stopped: &mut oneshot::Receiver<()>) -> Option<Session> {
        let session = self
            .connector
            .reconnect(&mut self.outbox, &self.counters, stopped)
            .await?;
        self.outbox.emit(Event::Connected);
        let resync_owed = self.reader.on_reconnect();
        self.intake.on_reconnect();
        if resync_owed {
            self.outbox.resync(ResyncReason::Reconnected);
        }
        self.heartbeat.clock.on_reconnect(Instant::now());
        Some(session)
    }

    async fn serve(
        &mut self,
        mut session: Session,
        stopped: &mut oneshot::Receiver<()>,
    ) -> (End, Session) {
        tracing::trace!(target: TARGET, buffered = self.outbox.len(), "serving a session");
        for notification in std::mem::take(&mut session.backlog) {
            self.on_notification(&notification);
        }
        let mut receiver_gone = self.outbox.closed();
        let mut ticker = tokio::time::interval(self.heartbeat.clock.tick_every());
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let end = {
            let Session {
                client, connection, ..
            } = &mut session;
            let client: &Client = client;
            let mut query: Pin<&mut Fuse<BoxFuture<'_, QueryOutcome>>> =
                std::pin::pin!(Fuse::terminated());
            let mut heartbeat = std::pin::pin!(Fuse::terminated());
            loop {
                if query.is_terminated()
                    && let Some(next) = self.next_query(client)
                {
                    query.set(next.fuse());
                }
                if heartbeat.is_terminated()
                    && let Some(next) = self.heartbeat.next()
                {
                    heartbeat.set(next.fuse());
                }
                tokio::select! {
                    // The slots and the clock before the connection, so that steady
                    // traffic never starves a heartbeat or a log read.
                    biased;
                    _ = &mut *stopped => break End::Stopped,
                    sent = &mut heartbeat => {
                        if self.heartbeat.on_sent(sent) {
                            // In durable mode, also read the log now and then: a safety net
                            // should a wake-up ever be missed.
                            self.reader.read_soon();
                        }
                    }
                    outcome = &mut query => {
                        if let Err(reason) = self.finish_query(outcome) {
                            break End::Connection(reason);
                        }
                    }
                    _ = ticker.tick() => {
                        if let Some(reason) = self.heartbeat.clock.late(Instant::now()) {
                            break End::Connection(reason);
                        }
                    }
                    message = poll_fn(|cx| connection.poll_message(cx)) => match message {
                        Some(Ok(AsyncMessage::Notification(n))) => {
                            self.on_notification(&n);
                            // Hand it over now if there is room: no extra turn of the loop.
                            match self.outbox.try_deliver() {
                                Some(sent) => {
                                    if sent > 0 {
                                        self.outbox.delivered(sent);
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
                    sent = self.outbox.deliver(), if self.outbox.has_ready() => match sent {
                        Some(n) => {
                            tracing::trace!(target: TARGET, n, "delivered");
                            self.outbox.delivered(n)
                        }
                        None => break End::ReceiverGone,
                    },
                    () = &mut receiver_gone, if !self.outbox.has_ready() => {
                        break End::ReceiverGone
                    }
                }
            }
        };
        (end, session)
    }

    /// The next query for the query slot, as the log reader asks (by priority, the tail only
    /// with room), with its deadline: a query that does not answer means a dead connection.
    fn next_query<'c>(&mut self, client: &'c Client) -> Option<BoxFuture<'c, QueryOutcome>> {
        let room = self.outbox.has_room_for_tail();
        let ask = self.reader.next_ask(room, Instant::now())?;
        let channel = self.channel.clone();
        let query = async move {
            match ask {
                Ask::Tail(cursor) => {
                    QueryOutcome::Tail(log::read_tail(client, &channel, &cursor).await)
                }
                Ask::Fetch(origin, seq) => {
                    QueryOutcome::Fetch(log::fetch(client, &channel, &origin, seq).await)
                }
                Ask::Prune(retention) => {
                    QueryOutcome::Prune(log::prune(client, &channel, retention).await)
                }
            }
        };
        let limit = self.query_deadline;
        Some(
            async move {
                tokio::time::timeout(limit, query)
                    .await
                    .unwrap_or(QueryOutcome::TimedOut(limit))
            }
            .boxed(),
        )
    }

    /// Handles a finished query; an error means the connection must be dropped.
    fn finish_query(&mut self, outcome: QueryOutcome) -> Result<(), String> {
        match outcome {
            QueryOutcome::Prune(Ok(_)) => Ok(()),
            QueryOutcome::TimedOut(limit) => Err(format!(
                "a query did not answer within {limit:?}: the connection is dead"
            )),
            QueryOutcome::Tail(Ok(tail)) => {
                if let Some(tail) = tail {
                    self.apply_tail(tail);
                }
                Ok(())
            }
            QueryOutcome::Fetch(Ok(payload)) => {
                if let Some((origin, seq)) = self.reader.fetched() {
                    self.apply_fetch(&origin, seq, payload);
                }
                Ok(())
            }
            QueryOutcome::Tail(Err(e)) => {
                // Retried after the next heartbeat.
                fatal_or(
                    &e,
                    "reading the durable log failed (is the schema migrated? run updatepipe \
                     migrate)",
                )
            }
            QueryOutcome::Prune(Err(e)) => fatal_or(&e, "pruning the durable log failed"),
            QueryOutcome::Fetch(Err(e)) => {
                fatal_or(&e, "fetching an oversize envelope from the log failed")?;
                // Do not hold the order up on an envelope that cannot be read.
                if let Some((origin, _)) = self.reader.fetched() {
                    self.outbox.fill_fetch(Vec::new());
                    self.outbox.resync(ResyncReason::Unreadable {
                        origin: origin.to_string(),
                    });
                }
                Ok(())
            }
        }
    }

    /// Delivers the log rows a tail returned, and moves the cursor.
    fn apply_tail(&mut self, tail: Tail) {
        if tail.pruned {
            self.outbox.resync(ResyncReason::LogPruned);
        }
        let replaying = self.reader.advance(tail.cursor);
        for entry in &tail.entries {
            let row = LogRow {
                origin: &entry.origin,
                seq: entry.seq,
                payload: &entry.payload,
            };
            match self.intake.classify_row(row, Moment::now()) {
                RowVerdict::Own => {}
                RowVerdict::Updates(updates) => {
                    if replaying {
                        self.counters.replayed(updates.len());
                    }
                    for update in updates {
                        self.outbox.push_logged(update);
                    }
                }
                RowVerdict::Refused { error, resync } => {
                    self.refuse_logged(&error, resync, &entry.origin, entry.payload.len());
                }
            }
        }
    }

    /// Fills the oldest fetching slot with an oversize envelope read from the log.
    fn apply_fetch(&mut self, origin: &Origin, seq: u64, payload: Option<String>) {
        let Some(payload) = payload else {
            // Pruned, or never committed: the update is gone.
            tracing::debug!(
                target: TARGET,
                %origin,
                seq,
                "an oversize envelope is not in the log"
            );
            self.outbox.fill_fetch(Vec::new());
            self.outbox.resync(ResyncReason::Unreadable {
                origin: origin.to_string(),
            });
            return;
        };
        let row = LogRow {
            origin: origin.as_str(),
            seq: i64::try_from(seq).unwrap_or(i64::MAX),
            payload: &payload,
        };
        match self.intake.classify_row(row, Moment::now()) {
            RowVerdict::Updates(updates) => self.outbox.fill_fetch(updates),
            // Never: a reference of this pipe's own is an echo, and never fetched.
            RowVerdict::Own => self.outbox.fill_fetch(Vec::new()),
            RowVerdict::Refused { error, resync } => {
                self.outbox.fill_fetch(Vec::new());
                self.refuse_logged(&error, resync, origin.as_str(), payload.len());
            }
        }
    }

    /// A log entry was refused: counted, and, when it was a committed update the application
    /// will not see, a resync.
    fn refuse_logged(&mut self, e: &DecodeError, resync: bool, origin: &str, bytes: usize) {
        self.reject(e, 0, bytes);
        if resync {
            self.outbox.resync(ResyncReason::Unreadable {
                origin: origin.to_owned(),
            });
        }
    }

    /// Classifies one notification and does what its verdict says.
    fn on_notification(&mut self, notification: &Notification) {
        let incoming = Incoming {
            channel: notification.channel(),
            payload: notification.payload(),
            sender_pid: notification.process_id(),
        };
        let carried = match self.intake.classify(incoming, Moment::now()) {
            Verdict::OtherChannel => return,
            Verdict::Rejected(e) => return self.reject_incoming(&e, incoming),
            Verdict::Heartbeat { own } => {
                if let Some(seq) = own {
                    self.heartbeat.clock.heard(seq);
                }
                return;
            }
            Verdict::Echo => return self.counters.echo(),
            Verdict::InLog => return self.reader.read_soon(),
            Verdict::Carries(carried) => carried,
        };
        if carried.best_effort_sender {
            self.reader.heard_best_effort();
        }
        if let Some(gap) = carried.gap {
            self.outbox.resync(gap);
        }
        match carried.content {
            Content::Updates(updates) => {
                for update in updates {
                    self.outbox.enqueue(update);
                }
            }
            Content::Refused(e) => self.reject_incoming(&e, incoming),
            // A bounded number waits for its fetch: past that, the update is let go, with a
            // resync.
            Content::Fetch { .. } if !self.reader.can_fetch() || self.outbox.is_full() => {
                self.outbox.let_go();
            }
            Content::Fetch { origin, seq } => {
                self.reader.queue_fetch(origin, seq);
                self.outbox.hold_for_fetch();
            }
        }
    }

    fn reject_incoming(&mut self, e: &DecodeError, incoming: Incoming<'_>) {
        self.reject(e, incoming.sender_pid, incoming.payload.len());
    }

    /// Counts a rejected payload and logs it: its reason at warn level (at most one such
    /// line per [`WARN_INTERVAL`](super::pacer::WARN_INTERVAL), saying how many were left
    /// out), the details, which quote the payload, only at debug level.
    fn reject(&mut self, e: &DecodeError, sender_pid: i32, bytes: usize) {
        self.counters.rejected(e);
        tracing::debug!(
            target: TARGET,
            reason = e.reason(),
            error = %e,
            sender_pid,
            bytes,
            "rejected a payload"
        );
        if let Some(suppressed) = self.rejections.due(std::time::Instant::now()) {
            tracing::warn!(
                target: TARGET,
                reason = e.reason(),
                sender_pid,
                bytes,
                suppressed,
                "rejected a payload (details at debug level)"
            );
        }
    }
}

/// A fatal error ends the session (`Err`); another is logged, and the session goes on.
fn fatal_or(e: &tokio_postgres::Error, what: &str) -> Result<(), String> {
    if is_fatal(e) {
        return Err(pg_message(e));
    }
    tracing::error!(target: TARGET, error = %pg_message(e), "{what}");
    Ok(())
}
