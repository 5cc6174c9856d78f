//! The listen path: one dedicated connection per pipe, driven by `poll_message`. It decodes
//! every notification on the channel, drops the pipe's own (echo), rejects what does not
//! decode, and hands the rest to the caller in order. It reconnects by itself, proves its
//! connection with heartbeats, and says when updates may have been missed (resync). In
//! durable mode it reads durable updates from the log, so nothing committed is lost.
//! `docs/delivery.md` argues why.

use std::collections::{HashMap, VecDeque};
use std::future::poll_fn;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use futures_util::FutureExt;
use futures_util::future::{BoxFuture, Fuse, FusedFuture};
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_postgres::types::Type;
use tokio_postgres::{AsyncMessage, Client, Notification};

use crate::config::Config;
use crate::connect::{RawConnection, close_politely, connect, drive_until};
use crate::envelope::{Envelope, MAX_LOGGED_ENVELOPE_LEN, MAX_PAYLOAD_LEN, Packer};
use crate::error::{DecodeError, Error, pg_message};
use crate::log::{self, Cursor, Tail};
use crate::origin::Origin;
use crate::sign::{self, Signer};
use crate::stats::Counters;
use crate::update::Update;

mod replay;

use replay::ReplayGuard;

const TARGET: &str = "updatepipe::listen";

/// What a listener tells an application that asked for events
/// ([`PgPipe::listen_events`](crate::PgPipe::listen_events)), in order.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Event {
    /// An update from another sender.
    Update(Update),
    /// The listener is subscribed: updates committed from now on will arrive.
    Connected,
    /// The connection was lost; the listener is reconnecting.
    Disconnected {
        /// Why, in words.
        reason: String,
    },
    /// Updates may have been missed: reload your state (for IMAP: the mailboxes' views).
    Resync(ResyncReason),
}

/// Why a listener asks for a resync.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum ResyncReason {
    /// The connection was lost and is back; in best-effort mode whatever was sent
    /// meanwhile is lost.
    Reconnected,
    /// A sender's envelope numbers skipped: something between was not received (or that
    /// sender's push failed midway).
    SequenceGap {
        /// The sender.
        origin: String,
        /// The number expected next.
        expected: u64,
        /// The number received.
        got: u64,
    },
    /// The listener was away longer than the durable log's retention: entries it had not
    /// read were pruned.
    LogPruned,
    /// A committed update could not be read: its log entry is gone, undecodable (for
    /// example written by a newer version), or with signing on, older than the retention
    /// and replay window allow.
    Unreadable {
        /// The sender.
        origin: String,
    },
    /// The application did not read for so long that the listener let go of updates.
    SlowConsumer {
        /// How many updates were let go.
        dropped: u64,
    },
}

/// Where deliveries go.
#[derive(Debug)]
pub(crate) enum Sink {
    /// Updates only (maddy's interface); events are logged and counted.
    Updates(mpsc::Sender<Update>),
    /// Updates and events, in one ordered stream.
    Events(mpsc::Sender<Event>),
}

impl Sink {
    fn wants_events(&self) -> bool {
        matches!(self, Sink::Events(_))
    }

    /// Completes once the receiver is gone. It holds a sender of its own, so one can serve
    /// a whole session (registered once, not made anew at every turn of the loop).
    fn closed(&self) -> BoxFuture<'static, ()> {
        match self {
            Sink::Updates(tx) => {
                let tx = tx.clone();
                async move { tx.closed().await }.boxed()
            }
            Sink::Events(tx) => {
                let tx = tx.clone();
                async move { tx.closed().await }.boxed()
            }
        }
    }

    /// Sends as many ready items from the front of `buffer` as fit now, without waiting.
    /// Returns how many updates went out, or `None` when the receiver is gone.
    fn try_deliver(&self, buffer: &mut VecDeque<Slot>) -> Option<usize> {
        let mut sent = 0;
        while let Some(Slot::Ready(_)) = buffer.front() {
            let room = match self {
                Sink::Updates(tx) => tx.try_reserve().map(Permit::Updates),
                Sink::Events(tx) => tx.try_reserve().map(Permit::Events),
            };
            let permit = match room {
                Ok(permit) => permit,
                Err(mpsc::error::TrySendError::Full(())) => break,
                Err(mpsc::error::TrySendError::Closed(())) => return None,
            };
            if let Some(Slot::Ready(event)) = buffer.pop_front() {
                sent += usize::from(matches!(event, Event::Update(_)));
                permit.send(event);
            }
        }
        Some(sent)
    }

    /// Waits for room, then sends as many ready items from the front of `buffer` as fit.
    /// Returns how many updates went out, or `None` when the receiver is gone.
    async fn deliver(&self, buffer: &mut VecDeque<Slot>) -> Option<usize> {
        let permit = match self {
            Sink::Updates(tx) => Permit::Updates(tx.reserve().await.ok()?),
            Sink::Events(tx) => Permit::Events(tx.reserve().await.ok()?),
        };
        let mut sent = 0;
        if let Some(Slot::Ready(_)) = buffer.front()
            && let Some(Slot::Ready(event)) = buffer.pop_front()
        {
            sent += usize::from(matches!(event, Event::Update(_)));
            permit.send(event);
        }
        Some(sent + self.try_deliver(buffer)?)
    }
}

/// Room reserved in either kind of sink.
enum Permit<'a> {
    Updates(mpsc::Permit<'a, Update>),
    Events(mpsc::Permit<'a, Event>),
}

impl Permit<'_> {
    fn send(self, event: Event) {
        match (self, event) {
            (Permit::Updates(p), Event::Update(u)) => p.send(u),
            (Permit::Events(p), event) => p.send(event),
            // An updates-only sink is never given events (see `Task::emit`).
            (Permit::Updates(_), _) => {}
        }
    }
}

/// One place in the delivery order: ready, or waiting for an envelope fetched from the log.
#[derive(Debug)]
enum Slot {
    Ready(Event),
    Fetching,
}

/// The running listener: its task, and the signal that stops it.
#[derive(Debug)]
pub(crate) struct Listener {
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<()>,
}

impl Listener {
    /// Connects, issues `LISTEN` on the quoted channel, and returns once the server has
    /// confirmed it: every notification committed from then on reaches the sink. The
    /// first connection's errors are returned; later ones are retried in the background.
    pub(crate) async fn start(
        config: &Config,
        origin: Origin,
        sink: Sink,
        counters: Arc<Counters>,
        heartbeat_pool: deadpool_postgres::Pool,
    ) -> Result<Listener, Error> {
        let durable = config.durable();
        let signer = config.signer();
        let (session, cursor) = Session::open(config, durable).await?;
        let mut task = Task {
            config: config.clone(),
            packer: Packer::new(&origin, std::process::id(), signer.clone()),
            signer,
            replays: ReplayGuard::default(),
            rejections: Pacer::default(),
            resyncs: Pacer::default(),
            origin,
            channel: config.channel().as_str().to_owned(),
            sink,
            counters,
            buffer: VecDeque::new(),
            buffered_updates: 0,
            dropped: 0,
            last_seq: HashMap::new(),
            cursor,
            tail_needed: durable,
            // A replay from the past counts as replayed.
            replaying: durable && config.since().is_some(),
            heard_best_effort: false,
            fetches: VecDeque::new(),
            heartbeat_seq: 0,
            heartbeat_pool,
            outstanding: None,
            next_heartbeat: Instant::now() + config.health_interval() / 2,
            next_prune: Instant::now(),
        };
        task.emit(Event::Connected);
        let (stop, stopped) = oneshot::channel();
        Ok(Listener {
            stop: Some(stop),
            task: tokio::spawn(task.run(session, stopped)),
        })
    }

    /// Stops the task and waits for it: the connection is closed and the caller's channel
    /// ends when this returns.
    pub(crate) async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Err(e) = (&mut self.task).await
            && e.is_panic()
        {
            tracing::error!(target: TARGET, "listener task panicked: {e}");
        }
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        // Dropped without `stop` (the pipe itself was dropped): nothing may outlive it.
        self.task.abort();
    }
}

/// One connection, subscribed.
struct Session {
    client: Client,
    connection: RawConnection,
    backlog: VecDeque<Notification>,
}

impl Session {
    /// Connects, refuses a standby, takes the log position when asked (before `LISTEN`, so
    /// that nothing committed between the two is missed), and subscribes.
    async fn open(config: &Config, want_cursor: bool) -> Result<(Session, Option<Cursor>), Error> {
        let (client, mut connection) = connect(config).await?;
        let mut backlog = VecDeque::new();
        let after = config.connect_timeout();
        let setup = async {
            let recovery = client
                .query_typed_one("SELECT pg_is_in_recovery()", &[])
                .await?;
            if recovery.get::<_, bool>(0) {
                return Err(Error::Standby);
            }
            let cursor = if want_cursor {
                let channel = config.channel().as_str();
                Some(log::read_cursor(&client, channel, config.since()).await?)
            } else {
                None
            };
            client
                .batch_execute(&format!("LISTEN {}", config.channel().quoted()))
                .await?;
            Ok(cursor)
        };
        let cursor = tokio::time::timeout(after, drive_until(&mut connection, setup, &mut backlog))
            .await
            .map_err(|_| Error::Timeout {
                what: "subscribing with LISTEN",
                after,
            })???;
        tracing::debug!(target: TARGET, channel = %config.channel(), "listening");
        Ok((
            Session {
                client,
                connection,
                backlog,
            },
            cursor,
        ))
    }

    /// Ends the session politely.
    async fn close(self) {
        close_politely(self.client, self.connection).await;
    }
}

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
    Heartbeat(Result<u64, tokio_postgres::Error>),
    HeartbeatUnsent(String),
    Prune(Result<u64, tokio_postgres::Error>),
    TimedOut(Duration),
}

/// Whether an error ends the session: a broken connection, or the server ending it
/// (severity FATAL or PANIC, such as an administrator's terminate or a shutdown).
fn is_fatal(e: &tokio_postgres::Error) -> bool {
    match e.as_db_error() {
        None => true,
        Some(db) => {
            matches!(
                db.parsed_severity(),
                Some(
                    tokio_postgres::error::Severity::Fatal | tokio_postgres::error::Severity::Panic
                )
            ) || db.code().code().starts_with("57")
                || db.code().code().starts_with("08")
        }
    }
}

/// The most oversize envelopes a best-effort listener waits to fetch at once.
const MAX_PENDING_FETCHES: usize = 64;

/// The most senders whose numbers a listener tracks for gaps.
const MAX_TRACKED_SENDERS: usize = 10_000;

/// What the listener task owns.
struct Task {
    config: Config,
    origin: Origin,
    packer: Packer,
    /// With signing on: checks every payload's signature.
    signer: Option<Signer>,
    /// With signing on: the numbers each sender has used.
    replays: ReplayGuard,
    /// Paces the warnings about rejected payloads and resyncs, which senders can provoke.
    rejections: Pacer,
    resyncs: Pacer,
    channel: String,
    sink: Sink,
    counters: Arc<Counters>,
    buffer: VecDeque<Slot>,
    buffered_updates: usize,
    /// Updates let go since the buffer last overflowed (best effort).
    dropped: u64,
    /// The last number seen from each sender's pool pushes.
    last_seq: HashMap<Origin, u64>,
    /// Durable mode: the log position.
    cursor: Option<Cursor>,
    tail_needed: bool,
    /// The next tail is a catch-up after a reconnect (counted as replayed).
    replaying: bool,
    /// Durable mode: a best-effort sender was heard on the channel, whose updates a
    /// disconnect loses (so a reconnect must raise a resync after all).
    heard_best_effort: bool,
    /// Oversize envelopes to fetch from the log, in delivery order.
    fetches: VecDeque<(Origin, u64)>,
    heartbeat_seq: u64,
    /// Where heartbeats are sent from: the pipe's pool.
    heartbeat_pool: deadpool_postgres::Pool,
    /// The heartbeat sent and not yet back: its number and when it was sent.
    outstanding: Option<(u64, Instant)>,
    next_heartbeat: Instant,
    next_prune: Instant,
}

impl Task {
    async fn run(mut self, first: Session, mut stopped: oneshot::Receiver<()>) {
        let mut session = Some(first);
        let mut attempt = 0u32;
        loop {
            let current = match session.take() {
                Some(s) => s,
                None => match self.reconnect(&mut stopped, &mut attempt).await {
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
                    tracing::info!(target: TARGET, "the caller dropped its channel; listener stops");
                    current.close().await;
                    break;
                }
                End::Connection(reason) => {
                    // A dead connection gets no polite goodbye: it may never be written.
                    drop(current);
                    tracing::warn!(target: TARGET, %reason, "listener connection lost; reconnecting");
                    self.counters.disconnect();
                    self.emit(Event::Disconnected { reason });
                    if connected_at.elapsed() >= self.config.backoff().stable_after {
                        attempt = 0;
                    }
                }
            }
        }
        // Dropping the sink ends the caller's channel.
    }

    /// Retries with backoff until a session is open; `None` when stopped, when the caller
    /// went away, or after the configured number of attempts.
    async fn reconnect(
        &mut self,
        stopped: &mut oneshot::Receiver<()>,
        attempt: &mut u32,
    ) -> Option<Session> {
        let mut receiver_gone = self.sink.closed();
        loop {
            let delay = self.config.backoff().delay(*attempt);
            let wake = Instant::now() + delay;
            // Wait, delivering what is buffered meanwhile.
            loop {
                tokio::select! {
                    biased;
                    _ = &mut *stopped => return None,
                    () = tokio::time::sleep_until(wake) => break,
                    sent = self.sink.deliver(&mut self.buffer), if self.has_ready() => match sent {
                        Some(n) => self.delivered(n),
                        None => return None,
                    },
                    () = &mut receiver_gone, if !self.has_ready() => return None,
                }
            }
            let opened = tokio::select! {
                biased;
                _ = &mut *stopped => return None,
                opened = Session::open(&self.config, false) => opened,
            };
            match opened {
                Ok((session, _)) => {
                    self.counters.reconnect();
                    tracing::info!(target: TARGET, attempts = *attempt + 1, "listener reconnected");
                    self.emit(Event::Connected);
                    if self.config.durable() {
                        // The log has what was missed: read it now.
                        self.tail_needed = true;
                        self.replaying = true;
                        if self.heard_best_effort {
                            // Not what best-effort senders sent meanwhile.
                            self.resync(ResyncReason::Reconnected);
                        }
                    } else {
                        self.last_seq.clear();
                        self.resync(ResyncReason::Reconnected);
                    }
                    self.outstanding = None;
                    self.next_heartbeat = Instant::now() + self.config.health_interval() / 2;
                    return Some(session);
                }
                Err(e) => {
                    *attempt = attempt.saturating_add(1);
                    tracing::warn!(target: TARGET, error = %e, attempt = *attempt, "listener cannot reconnect yet");
                    if self
                        .config
                        .backoff()
                        .max_attempts
                        .is_some_and(|max| *attempt >= max)
                    {
                        let reason = format!("gave up reconnecting after {attempt} attempts: {e}");
                        tracing::error!(target: TARGET, %reason);
                        self.emit(Event::Disconnected { reason });
                        // Deliver what is left, then end (unless stopped first).
                        while self.has_ready() {
                            tokio::select! {
                                biased;
                                _ = &mut *stopped => return None,
                                sent = self.sink.deliver(&mut self.buffer) => match sent {
                                    Some(n) => self.delivered(n),
                                    None => break,
                                },
                            }
                        }
                        return None;
                    }
                }
            }
        }
    }

    async fn serve(
        &mut self,
        mut session: Session,
        stopped: &mut oneshot::Receiver<()>,
    ) -> (End, Session) {
        tracing::trace!(target: TARGET, buffered = self.buffer.len(), "serving a session");
        for notification in std::mem::take(&mut session.backlog) {
            self.accept(&notification);
        }
        let health = self.config.health_interval();
        // A heartbeat goes out every half interval and must be back within 0.4 interval,
        // checked every tenth: a dead path is found within one interval.
        let tick_every = if health.is_zero() {
            Duration::from_secs(3600)
        } else {
            (health / 10).max(Duration::from_millis(10))
        };
        let heartbeat_timeout = health * 2 / 5;
        let mut receiver_gone = self.sink.closed();
        let mut ticker = tokio::time::interval(tick_every);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let end = {
            let Session {
                client, connection, ..
            } = &mut session;
            let client: &Client = client;
            let mut query: Pin<&mut Fuse<BoxFuture<'_, QueryOutcome>>> =
                std::pin::pin!(Fuse::terminated());
            let mut heartbeat: Pin<&mut Fuse<BoxFuture<'_, QueryOutcome>>> =
                std::pin::pin!(Fuse::terminated());
            loop {
                if query.is_terminated()
                    && let Some(next) = self.next_query(client)
                {
                    query.set(next.fuse());
                }
                if heartbeat.is_terminated()
                    && let Some(next) = self.next_heartbeat()
                {
                    heartbeat.set(next.fuse());
                }
                tokio::select! {
                    // The slots and the clock before the connection, so that steady
                    // traffic never starves a heartbeat or a log read.
                    biased;
                    _ = &mut *stopped => break End::Stopped,
                    outcome = &mut heartbeat => {
                        if let Err(reason) = self.finish_query(outcome) {
                            break End::Connection(reason);
                        }
                    }
                    outcome = &mut query => {
                        if let Err(reason) = self.finish_query(outcome) {
                            break End::Connection(reason);
                        }
                    }
                    _ = ticker.tick() => {
                        if let Some((seq, sent_at)) = self.outstanding
                            && sent_at.elapsed() > heartbeat_timeout
                        {
                            break End::Connection(format!(
                                "heartbeat {seq} did not come back within {heartbeat_timeout:?}: \
                                 the connection is dead"
                            ));
                        }
                    }
                    message = poll_fn(|cx| connection.poll_message(cx)) => match message {
                        Some(Ok(AsyncMessage::Notification(n))) => {
                            self.accept(&n);
                            // Hand it over now if there is room: no extra turn of the loop.
                            match self.sink.try_deliver(&mut self.buffer) {
                                Some(sent) => {
                                    if sent > 0 {
                                        self.delivered(sent);
                                    }
                                }
                                None => break End::ReceiverGone,
                            }
                        }
                        Some(Ok(AsyncMessage::Notice(notice))) => {
                            tracing::debug!(target: TARGET, message = notice.message(), "server notice");
                        }
                        Some(Ok(_)) => {}
                        Some(Err(e)) => break End::Connection(pg_message(&e)),
                        None => break End::Connection("the server closed the connection".into()),
                    },
                    sent = self.sink.deliver(&mut self.buffer), if self.has_ready() => match sent {
                        Some(n) => {
                            tracing::trace!(target: TARGET, n, "delivered");
                            self.delivered(n)
                        }
                        None => break End::ReceiverGone,
                    },
                    () = &mut receiver_gone, if !self.has_ready() => break End::ReceiverGone,
                }
            }
        };
        (end, session)
    }

    /// The next heartbeat, when one is due: it has a slot of its own, so that a slow
    /// query never delays the proof that the connection works. It is sent from another
    /// connection (the pipe's pool), as every other update is, so its coming back proves
    /// what matters: a notification committed elsewhere reaches this listener. (Sent on
    /// the listener's own connection through a transaction-pooling proxy, it could come
    /// back while nothing else does.)
    fn next_heartbeat<'c>(&mut self) -> Option<BoxFuture<'c, QueryOutcome>> {
        let now = Instant::now();
        let health = self.config.health_interval();
        if !health.is_zero() && self.outstanding.is_none() && now >= self.next_heartbeat {
            self.heartbeat_seq += 1;
            let seq = self.heartbeat_seq;
            self.outstanding = Some((seq, now));
            self.next_heartbeat = now + health / 2;
            let payload = self.packer.heartbeat(seq);
            let channel = self.channel.clone();
            let pool = self.heartbeat_pool.clone();
            return Some(
                async move {
                    let client = match pool.get().await {
                        Ok(client) => client,
                        // No connection to send it: it will not come back, and the listener
                        // treats its connection as dead when the time is up, as it must
                        // when the server cannot be reached.
                        Err(e) => return QueryOutcome::HeartbeatUnsent(e.to_string()),
                    };
                    QueryOutcome::Heartbeat(
                        client
                            .execute_typed(
                                "SELECT pg_notify($1, $2)",
                                &[(&channel, Type::TEXT), (&payload, Type::TEXT)],
                            )
                            .await,
                    )
                }
                .boxed(),
            );
        }
        None
    }

    /// The next query for the query slot, by priority: log tail, oversize fetch, pruning.
    /// Each gets a deadline: a query that does not answer means a dead connection.
    fn next_query<'c>(&mut self, client: &'c Client) -> Option<BoxFuture<'c, QueryOutcome>> {
        let query = self.next_query_inner(client)?;
        // A backstop only: the heartbeat finds a dead connection sooner. Generous, so that
        // a long catch-up read after a long absence can finish.
        let limit = (self.config.health_interval() + self.config.connect_timeout())
            .max(Duration::from_secs(60));
        Some(
            async move {
                tokio::time::timeout(limit, query)
                    .await
                    .unwrap_or(QueryOutcome::TimedOut(limit))
            }
            .boxed(),
        )
    }

    fn next_query_inner<'c>(&mut self, client: &'c Client) -> Option<BoxFuture<'c, QueryOutcome>> {
        let now = Instant::now();
        let room = self.buffered_updates < self.config.max_buffered() / 2;
        if self.tail_needed && room {
            let cursor = self.cursor.clone()?;
            self.tail_needed = false;
            let channel = self.channel.clone();
            return Some(
                async move { QueryOutcome::Tail(log::read_tail(client, &channel, &cursor).await) }
                    .boxed(),
            );
        }
        if let Some((origin, seq)) = self.fetches.front().cloned() {
            let channel = self.channel.clone();
            return Some(
                async move {
                    QueryOutcome::Fetch(log::fetch(client, &channel, &origin, seq).await)
                }
                .boxed(),
            );
        }
        if self.config.durable() && now >= self.next_prune {
            let retention = self.config.retention();
            self.next_prune =
                now + (retention / 10).clamp(Duration::from_secs(1), Duration::from_secs(60));
            let channel = self.channel.clone();
            return Some(
                async move { QueryOutcome::Prune(log::prune(client, &channel, retention).await) }
                    .boxed(),
            );
        }
        None
    }

    /// Handles a finished query; an error means the connection must be dropped.
    fn finish_query(&mut self, outcome: QueryOutcome) -> Result<(), String> {
        match outcome {
            QueryOutcome::Heartbeat(Ok(_)) => {
                // In durable mode, also read the log now and then: a safety net should a
                // wake-up ever be missed.
                if self.config.durable() {
                    self.tail_needed = true;
                }
                Ok(())
            }
            QueryOutcome::Prune(Ok(_)) => Ok(()),
            QueryOutcome::HeartbeatUnsent(reason) => {
                tracing::debug!(target: TARGET, %reason, "no connection to send a heartbeat");
                Ok(())
            }
            QueryOutcome::TimedOut(limit) => Err(format!(
                "a query did not answer within {limit:?}: the connection is dead"
            )),
            QueryOutcome::Tail(Ok(rows)) => {
                self.apply_tail(rows);
                Ok(())
            }
            QueryOutcome::Fetch(Ok(payload)) => {
                if let Some((origin, seq)) = self.fetches.pop_front() {
                    self.apply_fetch(&origin, seq, payload);
                }
                Ok(())
            }
            QueryOutcome::Heartbeat(Err(e)) => {
                // It went out on a pooled connection, not this one (a pooled connection
                // left over from before a server restart, say): no verdict on this
                // connection. Send the next one soon, on another pooled connection; if none
                // can be had, that one stays unanswered and the clock decides.
                tracing::debug!(target: TARGET, error = %pg_message(&e), "a heartbeat could not be sent; sending another");
                self.outstanding = None;
                self.next_heartbeat = Instant::now() + self.config.health_interval() / 10;
                Ok(())
            }
            QueryOutcome::Tail(Err(e)) => {
                // Retried after the next heartbeat.
                Self::fatal_or(
                    &e,
                    "reading the durable log failed (is the schema migrated? run updatepipe migrate)",
                )
            }
            QueryOutcome::Prune(Err(e)) => Self::fatal_or(&e, "pruning the durable log failed"),
            QueryOutcome::Fetch(Err(e)) => {
                Self::fatal_or(&e, "fetching an oversize envelope from the log failed")?;
                // Do not hold the order up on an envelope that cannot be read.
                if let Some((origin, _)) = self.fetches.pop_front() {
                    self.fill_fetch(Vec::new());
                    self.resync(ResyncReason::Unreadable {
                        origin: origin.to_string(),
                    });
                }
                Ok(())
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

    /// Delivers the log rows a tail returned, and moves the cursor.
    fn apply_tail(&mut self, tail: Option<Tail>) {
        let Some(tail) = tail else { return };
        if tail.pruned {
            self.resync(ResyncReason::LogPruned);
        }
        let replaying = std::mem::take(&mut self.replaying);
        for entry in &tail.entries {
            if entry.origin == self.origin.as_str() {
                continue;
            }
            let row = Source::Log {
                origin: &entry.origin,
                seq: entry.seq,
            };
            match self.open(&entry.payload, row) {
                Ok(envelope) => {
                    let updates = envelope.into_updates();
                    if replaying {
                        self.counters.replayed(updates.len());
                    }
                    for update in updates {
                        // Never let a durable update go: the log holds it for us, and a
                        // tail runs only when there is room.
                        self.buffered_updates += 1;
                        self.buffer.push_back(Slot::Ready(Event::Update(update)));
                    }
                }
                Err(e) => self.refuse_logged(&e, &entry.origin, entry.payload.len()),
            }
        }
        self.cursor = Some(tail.cursor);
    }

    /// Fills the oldest fetching slot with an oversize envelope read from the log.
    fn apply_fetch(&mut self, origin: &Origin, seq: u64, payload: Option<String>) {
        let Some(payload) = payload else {
            // Pruned, or never committed: the update is gone.
            tracing::debug!(target: TARGET, %origin, seq, "an oversize envelope is not in the log");
            self.fill_fetch(Vec::new());
            self.resync(ResyncReason::Unreadable {
                origin: origin.to_string(),
            });
            return;
        };
        let row = Source::Log {
            origin: origin.as_str(),
            seq: i64::try_from(seq).unwrap_or(i64::MAX),
        };
        match self.open(&payload, row) {
            Ok(envelope) => self.fill_fetch(envelope.into_updates()),
            Err(e) => {
                self.fill_fetch(Vec::new());
                self.refuse_logged(&e, origin.as_str(), payload.len());
            }
        }
    }

    /// A log entry was refused: counted, and unless it was not what its sender wrote
    /// (unsigned, forged, or with signing on too large to check), a resync: it is a committed update the application will not
    /// see (written by a newer version, say, or older than the replay checks allow).
    fn refuse_logged(&mut self, e: &DecodeError, origin: &str, bytes: usize) {
        self.reject(e, 0, bytes);
        // With signing on, a row too large to check is no more a sender's than a forged one.
        let unchecked = self.signer.is_some() && matches!(e, DecodeError::TooLarge(_));
        if !unchecked && !matches!(e, DecodeError::Unsigned | DecodeError::Forged) {
            self.resync(ResyncReason::Unreadable {
                origin: origin.to_owned(),
            });
        }
    }

    /// Replaces the first `Fetching` slot with these updates, keeping their place.
    fn fill_fetch(&mut self, updates: Vec<Update>) {
        let Some(at) = self.buffer.iter().position(|s| matches!(s, Slot::Fetching)) else {
            return;
        };
        self.buffer.remove(at);
        for (i, update) in updates.into_iter().enumerate() {
            self.buffered_updates += 1;
            self.buffer
                .insert(at + i, Slot::Ready(Event::Update(update)));
        }
    }

    /// Decodes one notification and queues what it carries.
    fn accept(&mut self, notification: &Notification) {
        if notification.channel() != self.channel {
            return;
        }
        let envelope = match self.open(notification.payload(), Source::Notification) {
            Ok(envelope) => envelope,
            Err(e) => {
                self.reject(&e, notification.process_id(), notification.payload().len());
                return;
            }
        };
        if envelope.is_heartbeat() {
            if *envelope.origin() == self.origin
                && let Some((seq, _)) = self.outstanding
                && envelope.seq() == Some(seq)
            {
                self.outstanding = None;
            }
            return;
        }
        if *envelope.origin() == self.origin {
            self.counters.echo();
            return;
        }
        if self.config.durable() {
            if envelope.is_durable() {
                // Read from the log, in commit order, exactly once.
                self.tail_needed = true;
                return;
            }
            if !envelope.updates().is_empty() {
                self.heard_best_effort = true;
            }
        }
        if let Some(seq) = envelope.seq()
            && !envelope.is_transactional()
        {
            self.check_sequence(envelope.origin(), seq);
        }
        if envelope.is_reference() {
            let seq = envelope.seq().unwrap_or(0);
            // Only durable pushes write references; anything else is forged. A bounded
            // number waits for its fetch: past that, the update is let go, with a resync.
            if !envelope.is_durable() {
                self.reject(
                    &DecodeError::Malformed("a reference without the durable mark".into()),
                    notification.process_id(),
                    notification.payload().len(),
                );
            } else if self.fetches.len() >= MAX_PENDING_FETCHES
                || self.buffered_updates >= self.config.max_buffered()
            {
                self.dropped += 1;
                self.counters.dropped(1);
            } else {
                self.fetches.push_back((envelope.origin().clone(), seq));
                self.buffer.push_back(Slot::Fetching);
            }
            return;
        }
        for update in envelope.into_updates() {
            self.enqueue(update);
        }
    }

    /// Checks a payload's signature (with signing on), decodes it within the limits, and,
    /// with signing on, checks it is no replay: a notification must be within the replay
    /// window and carry a number its sender has not used; a log entry (exactly once by the
    /// log's cursor, and unique by sender and number in the table) must be no older than the
    /// retention allows.
    fn open(&mut self, payload: &str, source: Source) -> Result<Envelope, DecodeError> {
        let limits = self.config.limits();
        let signed = match &self.signer {
            None => false,
            Some(signer) => {
                // The size first, then the signature, before anything is parsed.
                let bound = match source {
                    Source::Notification => MAX_PAYLOAD_LEN,
                    Source::Log { .. } => MAX_LOGGED_ENVELOPE_LEN,
                };
                if payload.len() > bound {
                    return Err(DecodeError::TooLarge(payload.len()));
                }
                match signer.verify(payload) {
                    Ok(()) => true,
                    Err(DecodeError::Unsigned) if self.config.accepts_unsigned() => false,
                    Err(e) => return Err(e),
                }
            }
        };
        let envelope = match source {
            Source::Notification => Envelope::decode_with(payload, limits)?,
            Source::Log { origin, seq } => {
                let envelope = Envelope::decode_logged_with(payload, limits)?;
                // A signed envelope names its sender and number: a copy of it in another
                // row is refused here, and in a row of the same sender and number by the
                // table's unique index while the original is kept.
                check_row(&envelope, origin, seq, signed)?;
                envelope
            }
        };
        if !signed {
            return Ok(envelope);
        }
        let window = self.config.replay_window();
        let now = std::time::SystemTime::now();
        match source {
            Source::Notification => {
                sign::check_time(envelope.sent_at(), now, window)?;
                if let Some(seq) = envelope.seq()
                    && !envelope.is_heartbeat()
                    && *envelope.origin() != self.origin
                {
                    self.replays.check(
                        envelope.origin(),
                        envelope.is_transactional(),
                        seq,
                        std::time::Instant::now(),
                        window,
                    )?;
                }
            }
            Source::Log { .. } => {
                let age = self.config.retention().saturating_add(window);
                sign::check_time(envelope.sent_at(), now, age)?;
            }
        }
        Ok(envelope)
    }

    /// Notes a sender's pool-push number; a skipped number means a gap.
    fn check_sequence(&mut self, origin: &Origin, seq: u64) {
        if self.last_seq.len() >= MAX_TRACKED_SENDERS && !self.last_seq.contains_key(origin) {
            self.last_seq.clear();
        }
        match self.last_seq.get_mut(origin) {
            Some(last) if seq > last.saturating_add(1) => {
                let expected = last.saturating_add(1);
                *last = seq;
                self.resync(ResyncReason::SequenceGap {
                    origin: origin.to_string(),
                    expected,
                    got: seq,
                });
            }
            Some(last) => *last = (*last).max(seq),
            None => {
                self.last_seq.insert(origin.clone(), seq);
            }
        }
    }

    /// Queues an update, or lets it go when the caller is too far behind (best effort:
    /// a resync follows once the caller has caught up).
    fn enqueue(&mut self, update: Update) {
        if self.buffered_updates >= self.config.max_buffered() {
            if self.dropped == 0 {
                tracing::warn!(target: TARGET, bound = self.config.max_buffered(), "the application is not reading; letting updates go until it catches up");
            }
            self.dropped += 1;
            self.counters.dropped(1);
            return;
        }
        self.buffered_updates += 1;
        self.buffer.push_back(Slot::Ready(Event::Update(update)));
    }

    fn delivered(&mut self, n: usize) {
        self.buffered_updates -= n;
        self.counters.delivered(n);
        if self.buffer.is_empty() && self.dropped > 0 {
            let dropped = std::mem::take(&mut self.dropped);
            self.resync(ResyncReason::SlowConsumer { dropped });
        }
    }

    fn has_ready(&self) -> bool {
        matches!(self.buffer.front(), Some(Slot::Ready(_)))
    }

    fn resync(&mut self, reason: ResyncReason) {
        tracing::debug!(target: TARGET, ?reason, "updates may have been missed: resync");
        if let Some(suppressed) = self.resyncs.due(std::time::Instant::now()) {
            tracing::warn!(target: TARGET, ?reason, suppressed, "updates may have been missed: resync");
        }
        self.counters.resync();
        // One resync not yet delivered says it all: a flood of them (forged numbers, say)
        // must not fill memory.
        if let Some(Slot::Ready(Event::Resync(_))) = self.buffer.back() {
            return;
        }
        self.emit(Event::Resync(reason));
    }

    /// Queues an event for a caller that asked for events (always, whatever the bound:
    /// events are few and must not be lost).
    fn emit(&mut self, event: Event) {
        if self.sink.wants_events() {
            self.buffer.push_back(Slot::Ready(event));
        }
    }

    /// Counts a rejected payload and logs it: its reason at warn level (at most one such
    /// line per [`WARN_INTERVAL`], saying how many were left out), the details, which quote
    /// the payload, only at debug level.
    fn reject(&mut self, e: &DecodeError, sender_pid: i32, bytes: usize) {
        self.counters.rejected(e);
        tracing::debug!(target: TARGET, reason = e.reason(), error = %e, sender_pid, bytes, "rejected a payload");
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

/// Where a payload came from.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Source<'a> {
    Notification,
    /// A durable log row, with the sender and number its columns give.
    Log {
        origin: &'a str,
        seq: i64,
    },
}

/// Whether a log row's sender and number are its envelope's. When they differ, the row was
/// not written by the envelope's sender: `Forged` for a signed envelope.
fn check_row(envelope: &Envelope, origin: &str, seq: i64, signed: bool) -> Result<(), DecodeError> {
    let same = envelope.origin().as_str() == origin
        && envelope.seq().and_then(|s| i64::try_from(s).ok()) == Some(seq);
    // Only durable pushes write log rows, and never a reference or a heartbeat: a signed
    // best-effort envelope copied into the log has no original there for the unique index
    // to stop a copy.
    let durable = envelope.is_durable() && !envelope.is_reference() && !envelope.is_heartbeat();
    match (same && durable, signed) {
        (true, _) => Ok(()),
        (false, true) => Err(DecodeError::Forged),
        (false, false) => Err(DecodeError::Malformed(
            "a log row that is not its sender's durable envelope of that number".into(),
        )),
    }
}

/// The shortest time between two warnings of a kind that senders can provoke (a rejected
/// payload, a resync): a flood of them must not flood the log.
const WARN_INTERVAL: Duration = Duration::from_secs(10);

/// Paces one kind of warning.
#[derive(Debug, Default)]
struct Pacer {
    last: Option<std::time::Instant>,
    suppressed: u64,
}

impl Pacer {
    /// `Some(left out since the last warning)` when a warning is due now.
    fn due(&mut self, now: std::time::Instant) -> Option<u64> {
        match self.last {
            Some(last) if now.duration_since(last) < WARN_INTERVAL => {
                self.suppressed += 1;
                None
            }
            _ => {
                self.last = Some(now);
                Some(std::mem::take(&mut self.suppressed))
            }
        }
    }
}
