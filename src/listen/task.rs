//! The connection loop: serves a session until it ends, reconnects, and in between does
//! the I/O: it starts what the schedule says (`schedule.rs`), polls the connection and the
//! slots, and hands what arrives to the sub-states (`dispatch.rs`).

use std::future::poll_fn;
use std::pin::Pin;

use futures_util::FutureExt;
use futures_util::future::{BoxFuture, Fuse, FusedFuture};
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;
use tokio_postgres::{AsyncMessage, Client};

use super::connector::{Connector, Session};
use super::dispatch::{Command, Dispatch};
use super::event::TARGET;
use super::query::{QueryOutcome, QuerySlot};
use super::schedule::{Busy, Schedule, Tick};
use super::watch::QueueWatch;
use crate::error::{Error, pg_message};

/// Why serving a session ended.
enum End {
    Stopped,
    ReceiverGone,
    Connection(String),
}

/// The connection loop's owner: what connects, the sub-states it dispatches to, and the
/// schedule and the slots it runs.
#[derive(Debug)]
pub(super) struct ConnectionLoop {
    pub(super) connector: Connector,
    pub(super) dispatch: Dispatch,
    pub(super) schedule: Schedule,
    pub(super) slot: QuerySlot,
    pub(super) watch: QueueWatch,
    /// The channel, as the log's statements name it.
    pub(super) channel: String,
    /// Where the error that stops the listener by itself goes.
    pub(super) ended: super::Ended,
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
                    // No reconnect mends a connection notifications do not reach.
                    if let Some(evidence) = self.dispatch.take_unheard() {
                        let e = Error::ListenUnsupported { evidence };
                        let reason = e.to_string();
                        self.give_up(e, reason, &mut stopped).await;
                        break;
                    }
                    self.dispatch.on_disconnected(reason);
                    self.connector.lost(connected_at.elapsed());
                }
            }
        }
        // Dropping the sink ends the caller's channel.
    }

    /// A new session, once the connector has one, waiting out the backoff between
    /// attempts while delivering what is buffered; `None` when stopped, when the caller
    /// went away, or after the configured number of attempts (then the caller is told, and
    /// what is left is delivered first).
    async fn reconnect(&mut self, stopped: &mut oneshot::Receiver<()>) -> Option<Session> {
        let mailboxes = self.dispatch.subscribed_channels();
        let cursor = self.dispatch.newest_cursor();
        let mut receiver_gone = self.dispatch.receiver_gone();
        loop {
            let wake = Instant::now() + self.connector.delay();
            loop {
                let ready = self.dispatch.has_ready();
                tokio::select! {
                    biased;
                    _ = &mut *stopped => return None,
                    () = tokio::time::sleep_until(wake) => break,
                    sent = self.dispatch.deliver(), if ready => match sent {
                        Some(n) => self.dispatch.delivered(n),
                        None => return None,
                    },
                    () = &mut receiver_gone, if !ready => return None,
                }
            }
            let opened = tokio::select! {
                biased;
                _ = &mut *stopped => return None,
                opened = self.connector.open(&mailboxes, cursor.as_ref()) => opened,
            };
            let e = match opened {
                Ok((session, log)) => {
                    self.dispatch.on_reconnect(log, Instant::now());
                    return Some(session);
                }
                Err(e) => e,
            };
            if let Some(reason) = self.connector.failed(&e) {
                self.give_up(e, reason, stopped).await;
                return None;
            }
        }
    }

    /// The listener stops by itself because of `error`: the error is left for
    /// [`PgPipe::listen_ended`](crate::PgPipe::listen_ended), the caller is told `reason`,
    /// and what is left is delivered (unless stopped first).
    async fn give_up(&mut self, error: Error, reason: String, stopped: &mut oneshot::Receiver<()>) {
        *self.ended.lock().expect("ended slot") = Some(error);
        self.dispatch.on_gave_up(reason);
        while self.dispatch.has_ready() {
            tokio::select! {
                biased;
                _ = &mut *stopped => return,
                sent = self.dispatch.deliver() => match sent {
                    Some(n) => self.dispatch.delivered(n),
                    None => break,
                },
            }
        }
    }

    async fn serve(
        &mut self,
        mut session: Session,
        stopped: &mut oneshot::Receiver<()>,
        commands: &mut mpsc::Receiver<Command>,
    ) -> (End, Session) {
        tracing::trace!(target: TARGET, waiting = self.dispatch.waiting(), "serving a session");
        for notification in std::mem::take(&mut session.backlog) {
            self.dispatch.on_notification(&notification);
        }
        let mut receiver_gone = self.dispatch.receiver_gone();
        self.schedule
            .new_session(session.idle_timeout, Instant::now());
        let mut ticker =
            tokio::time::interval(self.schedule.tick_every(self.dispatch.tick_every()));
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let end = {
            let Session {
                client, connection, ..
            } = &mut session;
            let client: &Client = client;
            let mut query: Pin<&mut Fuse<BoxFuture<'_, QueryOutcome>>> =
                std::pin::pin!(Fuse::terminated());
            let mut heartbeat = std::pin::pin!(Fuse::terminated());
            let mut subscribing: Pin<&mut Fuse<BoxFuture<'_, Result<(), String>>>> =
                std::pin::pin!(Fuse::terminated());
            let mut sample = std::pin::pin!(Fuse::terminated());
            let heard = self.slot.heard();
            loop {
                let busy = Busy {
                    query: !query.is_terminated(),
                    subscribing: !subscribing.is_terminated(),
                    heartbeat: !heartbeat.is_terminated(),
                    sampling: !sample.is_terminated(),
                };
                let turn =
                    self.schedule
                        .plan(&mut self.dispatch, &mut self.watch, busy, Instant::now());
                if let Some(sql) = turn.subscribe {
                    subscribing.set(self.slot.subscribe(client, sql).fuse());
                }
                if let Some(start) = turn.query {
                    query.set(self.slot.start(client, &self.channel, start).fuse());
                }
                if let Some(seq) = turn.heartbeat {
                    heartbeat.set(self.dispatch.send_heartbeat(seq).fuse());
                }
                if turn.sample {
                    sample.set(self.watch.sample().fuse());
                }
                let (held, release) = (turn.held_until, turn.release_at);
                let ready = self.dispatch.has_ready();
                tokio::select! {
                    // The slots and the clock before the connection, so that steady
                    // traffic never starves a heartbeat or a log read.
                    biased;
                    _ = &mut *stopped => break End::Stopped,
                    sent = &mut heartbeat => self.dispatch.on_heartbeat_sent(sent),
                    done = &mut subscribing => match done {
                        Ok(()) => self.dispatch.subscription_done(),
                        Err(reason) => break End::Connection(reason),
                    },
                    Some(command) = commands.recv() => self.dispatch.apply_command(command),
                    sampled = &mut sample => self.watch.on_sampled(sampled),
                    outcome = &mut query => {
                        self.schedule.query_done(&outcome, Instant::now());
                        if let Err(reason) = self.dispatch.on_query(outcome) {
                            break End::Connection(reason);
                        }
                    }
                    _ = ticker.tick() => {
                        let running = !query.is_terminated();
                        match self.schedule.on_tick(&self.dispatch, running, Instant::now()) {
                            Tick::Quiet => {}
                            Tick::Prove => self.slot.prove(),
                        }
                    }
                    () = sleep_until(held), if held.is_some() => {}
                    () = sleep_until(release), if release.is_some() => {
                        self.dispatch.release_held(Instant::now());
                    }
                    message = poll_fn(|cx| connection.poll_message(cx)), if held.is_none() => match message {
                        Some(Ok(AsyncMessage::Notification(n))) => {
                            heard.message();
                            self.dispatch.on_notification(&n);
                            // Hand it over now if there is room: no extra turn of the loop.
                            if !self.dispatch.deliver_now() {
                                break End::ReceiverGone;
                            }
                        }
                        Some(Ok(AsyncMessage::Notice(notice))) => {
                            heard.message();
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
                    sent = self.dispatch.deliver(), if ready => match sent {
                        Some(n) => {
                            tracing::trace!(target: TARGET, n, "delivered");
                            self.dispatch.delivered(n);
                        }
                        None => break End::ReceiverGone,
                    },
                    () = &mut receiver_gone, if !ready => break End::ReceiverGone,
                }
            }
        };
        (end, session)
    }
}

/// Completes at `until` (the end of a wait for the caller, see `Outbox::reading_held`; or
/// when a resync held back is due, see `Outbox::next_release`).
async fn sleep_until(until: Option<Instant>) {
    if let Some(until) = until {
        tokio::time::sleep_until(until).await;
    }
}
