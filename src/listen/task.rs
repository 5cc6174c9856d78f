//! The connection loop: serves a session until it ends, reconnects, and dispatches what
//! arrives (notifications, heartbeats sent, log reads) to the sub-states. I/O and dispatch
//! only: the decisions are the sub-states'.

use std::future::poll_fn;
use std::pin::Pin;
use std::time::Duration;

use futures_util::FutureExt;
use futures_util::future::{BoxFuture, Fuse, FusedFuture};
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;
use tokio_postgres::{AsyncMessage, Client, Notification};

use super::connector::Connector;
use super::dispatch::{Dispatch, QueryOutcome};
use super::durable::Ask;
use super::intake::Incoming;
use super::session::Session;
use super::subscriptions::Command;
use super::{Event, TARGET};
use crate::error::pg_message;
use crate::log;

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
    /// The channel, as the log's statements name it.
    pub(super) channel: String,
    pub(super) query_deadline: Duration,
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
        let mut ticker = tokio::time::interval(self.dispatch.heartbeat.clock.tick_every());
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
            loop {
                if subscribing.is_terminated()
                    && let Some(sql) = self.dispatch.intake.subscriptions.next_statement()
                {
                    subscribing.set(subscribe(client, sql, self.query_deadline).boxed().fuse());
                }
                if query.is_terminated()
                    && let Some(next) = self.next_query(client)
                {
                    query.set(next.fuse());
                }
                if heartbeat.is_terminated()
                    && let Some(next) = self.dispatch.heartbeat.next()
                {
                    heartbeat.set(next.fuse());
                }
                let ready = self.dispatch.outbox.has_ready();
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
                    outcome = &mut query => {
                        if let Err(reason) = self.dispatch.on_query(outcome) {
                            break End::Connection(reason);
                        }
                    }
                    _ = ticker.tick() => {
                        if let Some(reason) = self.dispatch.heartbeat.clock.late(Instant::now()) {
                            break End::Connection(reason);
                        }
                    }
                    message = poll_fn(|cx| connection.poll_message(cx)) => match message {
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
        let channel = self.channel.clone();
        let query = async move {
            match ask {
                Ask::Tail {
                    from,
                    catch_up,
                    budget,
                    not_before,
                } => {
                    if let Some(at) = not_before {
                        tokio::time::sleep_until(at).await;
                    }
                    QueryOutcome::Tail(
                        log::read_page(client, &channel, &from, catch_up.as_ref(), budget).await,
                    )
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

/// A notification, as the intake takes it.
fn incoming(notification: &Notification) -> Incoming<'_> {
    Incoming {
        channel: notification.channel(),
        payload: notification.payload(),
        sender_pid: notification.process_id(),
    }
}
