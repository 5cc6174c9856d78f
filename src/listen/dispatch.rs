//! Dispatch: the listener's sub-states (the intake, the outbox, the log reader, the
//! heartbeat), owned here and reached only through methods that say what they do; and
//! what each thing that arrives (a notification, a heartbeat sent, a log read, a new
//! connection) does to them. No I/O: the loop in `task` does that, as `schedule` says.

use std::sync::Arc;
use std::time::Duration;

use futures_util::future::BoxFuture;
use tokio::time::Instant;
use tokio_postgres::Notification;

use super::durable::{Ask, LogReader};
use super::event::{Event, ResyncReason, TARGET};
use super::heartbeat::{Heartbeat, Sent};
use super::intake::{Content, Incoming, Intake, LogRow, Moment, RowVerdict, Verdict};
use super::outbox::{HOLD, Outbox, Sink};
use super::pacer::Pacer;
use super::query::{Asked, QueryOutcome};
use super::settings::Settings;
use super::subscriptions::Command;
use crate::error::{DecodeError, pg_message};
use crate::log::{Cursor, Page, Pruned};
use crate::origin::Origin;
use crate::pg::{is_cancelled, is_fatal, is_missing_log};
use crate::stats::Counters;

/// Prunings in a row that may find the pruning lock held (other listeners of the channel
/// prune too) before a warning says so.
const PRUNE_MISSES_BEFORE_WARNING: u32 = 3;

/// The sub-states the connection loop dispatches to.
#[derive(Debug)]
pub(super) struct Dispatch {
    intake: Intake,
    outbox: Outbox,
    reader: LogReader,
    heartbeat: Heartbeat,
    warnings: Warnings,
    /// How long to wait before reading a cancelled page again.
    page_pause: Duration,
    counters: Arc<Counters>,
}

/// The pacing of the warnings senders and the server can provoke: at most one line per
/// [`WARN_INTERVAL`](super::pacer::WARN_INTERVAL) of each kind.
#[derive(Debug, Default)]
struct Warnings {
    /// Rejected payloads.
    rejections: Pacer,
    /// Errors of log queries (a reference to the log is one notification).
    log_errors: Pacer,
    /// Log pages the server cancelled.
    cancelled_pages: Pacer,
    /// Queries cancelled past their deadline.
    cancelled_queries: Pacer,
    /// Prunings in a row that found the channel's pruning lock held.
    prunes_skipped: (u32, Pacer),
}

impl Dispatch {
    /// The sub-states of a listener whose first session is open: in durable mode its log
    /// position is `cursor`. The caller hears `Connected` first.
    pub(super) fn new(
        settings: &Settings,
        origin: Origin,
        sink: Sink,
        heartbeat: Heartbeat,
        cursor: Option<Cursor>,
        counters: Arc<Counters>,
        now: Instant,
    ) -> Dispatch {
        let reader = match cursor {
            // A replay from the past counts as replayed.
            Some(cursor) => LogReader::durable(
                cursor,
                settings.retention,
                settings.page,
                settings.since.is_some(),
                now,
            ),
            None => LogReader::best_effort(),
        };
        let mut dispatch = Dispatch {
            intake: Intake::new(settings, origin),
            outbox: Outbox::new(sink, settings.max_buffered, counters.clone()),
            reader,
            heartbeat,
            warnings: Warnings::default(),
            page_pause: settings.page_pause(),
            counters,
        };
        dispatch.outbox.emit(Event::Connected);
        dispatch
    }

    /// A new connection: each sub-state does what a reconnect does to it, and the caller
    /// hears `Connected`, then a resync if one is owed.
    pub(super) fn on_reconnect(&mut self, now: Instant) {
        self.counters.reconnect();
        self.outbox.emit(Event::Connected);
        let resync_owed = self.reader.on_reconnect();
        self.intake.on_reconnect();
        if resync_owed {
            self.outbox.resync(ResyncReason::Reconnected);
        }
        // The new session is subscribed to every mailbox again; what maddy nodes sent them
        // meanwhile is lost (their updates are in no log).
        let subscriptions = &mut self.intake.subscriptions;
        subscriptions.on_reconnect();
        let keys = subscriptions.keys();
        if !keys.is_empty() {
            self.outbox.resync(ResyncReason::Resubscribed { keys });
        }
        self.heartbeat.clock.on_reconnect(now);
    }

    /// The connection was lost: counted, logged (when the caller does not hear of it from
    /// an event) and told.
    pub(super) fn on_disconnected(&mut self, reason: String) {
        if self.outbox.tells_events() {
            tracing::debug!(target: TARGET, %reason, "listener connection lost; reconnecting");
        } else {
            tracing::warn!(target: TARGET, %reason, "listener connection lost; reconnecting");
        }
        self.counters.disconnect();
        self.outbox.emit(Event::Disconnected { reason });
    }

    /// Reconnecting was given up: the caller is told why.
    pub(super) fn on_gave_up(&mut self, reason: String) {
        tracing::error!(target: TARGET, %reason);
        self.outbox.emit(Event::Disconnected { reason });
    }

    // ---- what the schedule asks ----

    /// What to ask the log next, with room for the tail under half the bound.
    pub(super) fn next_ask(&mut self, now: Instant) -> Option<Ask> {
        let room = self.outbox.has_room_for_tail();
        self.reader.next_ask(room, now)
    }

    /// The maddy layout: the next `LISTEN`/`UNLISTEN` to run, one at a time.
    pub(super) fn next_subscription(&mut self) -> Option<String> {
        self.intake.subscriptions.next_statement()
    }

    /// The number of the heartbeat to send now, if one is due.
    pub(super) fn heartbeat_due(&mut self, now: Instant) -> Option<u64> {
        self.heartbeat.clock.due(now)
    }

    /// Why the connection is dead, when the outstanding heartbeat is late.
    pub(super) fn heartbeat_late(&self, now: Instant) -> Option<String> {
        self.heartbeat.clock.late(now)
    }

    /// How often the loop checks for a late heartbeat.
    pub(super) fn tick_every(&self) -> Duration {
        self.heartbeat.clock.tick_every()
    }

    /// Whether reading notifications waits for a caller behind by the whole bound, and
    /// until when (see [`Outbox::reading_held`]): at most half the time a heartbeat has to
    /// come back ([`HOLD`] without heartbeats). While it waits, the heartbeat sent is
    /// allowed the longest the caller may be waited for on top of its timeout.
    pub(super) fn reading_held(&mut self) -> Option<Instant> {
        let longest = match self.heartbeat.clock.timeout() {
            timeout if timeout.is_zero() => HOLD,
            timeout => timeout / 2,
        };
        let held = self.outbox.reading_held(longest)?;
        let allowance = Instant::now() + super::outbox::HOLD_EPISODE;
        self.heartbeat.clock.busy_until(allowance);
        Some(held)
    }

    /// When a resync held back is due (see `Outbox::resync`).
    pub(super) fn next_release(&self) -> Option<Instant> {
        self.outbox.next_release()
    }

    /// Whether the front of the order can go out.
    pub(super) fn has_ready(&self) -> bool {
        self.outbox.has_ready()
    }

    /// How many places wait in the order (for tracing).
    pub(super) fn waiting(&self) -> usize {
        self.outbox.len()
    }

    // ---- what the loop reports ----

    /// Sends the heartbeat `seq` from the pool (see [`Heartbeat::send`]).
    pub(super) fn send_heartbeat(&self, seq: u64) -> BoxFuture<'static, Sent> {
        self.heartbeat.send(seq)
    }

    /// A heartbeat was sent, or could not be.
    pub(super) fn on_heartbeat_sent(&mut self, sent: Sent) {
        if self.heartbeat.on_sent(sent) {
            // In durable mode, also read the log now and then: a safety net should a
            // wake-up ever be missed.
            self.reader.read_soon();
        }
    }

    /// A subscription statement was answered.
    pub(super) fn subscription_done(&mut self) {
        self.intake.subscriptions.done();
    }

    /// A subscription by mailbox was asked for.
    pub(super) fn apply_command(&mut self, command: Command) {
        self.intake.subscriptions.apply(command);
    }

    /// The subscribed mailboxes' channels (a new session listens on them all).
    pub(super) fn subscribed_channels(&self) -> Vec<String> {
        self.intake.subscriptions.channels()
    }

    /// Tells the resyncs held back whose interval is over.
    pub(super) fn release_held(&mut self, now: Instant) {
        self.outbox.release_held(now);
    }

    /// Completes once the caller's receiver is gone.
    pub(super) fn receiver_gone(&self) -> BoxFuture<'static, ()> {
        self.outbox.closed()
    }

    /// Hands over what is ready and fits now; `false` when the receiver is gone.
    pub(super) fn deliver_now(&mut self) -> bool {
        match self.outbox.try_deliver() {
            Some(sent) => {
                if sent > 0 {
                    self.outbox.delivered(sent);
                }
                true
            }
            None => false,
        }
    }

    /// Waits for room, then hands over what is ready and fits; `None` when the receiver is
    /// gone.
    pub(super) async fn deliver(&mut self) -> Option<usize> {
        self.outbox.deliver().await
    }

    /// `n` updates went out.
    pub(super) fn delivered(&mut self, n: usize) {
        self.outbox.delivered(n);
    }

    /// Handles a finished query; an error means the connection must be dropped.
    pub(super) fn on_query(&mut self, outcome: QueryOutcome) -> Result<(), String> {
        // Notifications waited while the statement ran: the heartbeat's time counts from
        // its end.
        self.heartbeat.clock.busy_until(Instant::now());
        match outcome {
            QueryOutcome::Prune(Ok(pruned)) => {
                self.on_pruned(pruned);
                Ok(())
            }
            QueryOutcome::Cancelled(asked) => {
                self.query_cancelled();
                if asked == Asked::Tail {
                    // Blocked (a lock on the log, say), not dead: the page is read again,
                    // smaller, once the slot opens again (the fetch and the prune are
                    // simply asked again).
                    self.reader.page_cancelled(Instant::now(), self.page_pause);
                }
                Ok(())
            }
            QueryOutcome::TimedOut(after) => Err(format!(
                "a query did not answer within {after:?}, nor its cancel: the connection is dead"
            )),
            QueryOutcome::Tail(Ok(page)) => {
                if let Some(page) = page {
                    self.apply_page(page);
                }
                Ok(())
            }
            QueryOutcome::Fetch(Ok(payload)) => {
                if let Some((origin, seq)) = self.reader.fetched() {
                    self.apply_fetch(&origin, seq, payload);
                }
                Ok(())
            }
            QueryOutcome::Tail(Err(e)) if is_cancelled(&e) => {
                // The server gave up on the page (its statement_timeout): the connection is
                // fine; the page is read again, smaller, after a pause.
                self.counters.log_page_cancelled();
                self.reader.page_cancelled(Instant::now(), self.page_pause);
                if let Some(suppressed) =
                    self.warnings.cancelled_pages.due(std::time::Instant::now())
                {
                    tracing::warn!(
                        target: TARGET,
                        suppressed,
                        "the server cancelled a page of the durable log read \
                         (statement_timeout?); reading it again, smaller"
                    );
                }
                Ok(())
            }
            QueryOutcome::Tail(Err(e)) => {
                // Retried after the next heartbeat.
                self.log_failed(
                    &e,
                    "reading the durable log failed (is the schema migrated? run updatepipe \
                     migrate)",
                )
            }
            QueryOutcome::Prune(Err(e)) => self.log_failed(&e, "pruning the durable log failed"),
            QueryOutcome::KeptAlive(Ok(())) => Ok(()),
            QueryOutcome::KeptAlive(Err(e)) => self.log_failed(&e, "a keep-alive statement failed"),
            QueryOutcome::Fetch(Err(e)) if !is_fatal(&e) && is_missing_log(&e) => {
                self.stop_fetching(&e);
                Ok(())
            }
            QueryOutcome::Fetch(Err(e)) => {
                self.log_failed(&e, "fetching an oversize envelope from the log failed")?;
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

    /// A query was cancelled past its deadline and answered (the connection is fine, the
    /// statement was blocked: a lock on the log, say): counted and warned about (paced).
    fn query_cancelled(&mut self) {
        self.counters.statement_cancelled();
        if let Some(suppressed) = self
            .warnings
            .cancelled_queries
            .due(std::time::Instant::now())
        {
            tracing::warn!(
                target: TARGET,
                suppressed,
                "a query on the listener's connection did not answer in time and was \
                 cancelled (a lock on updatepipe.log?); retrying, without reconnecting"
            );
        }
    }

    /// A pruning ran: counted; when it found the channel's pruning lock held several times
    /// in a row, said (paced): pruning stands still while another session holds it.
    fn on_pruned(&mut self, pruned: Pruned) {
        let (misses, pacer) = &mut self.warnings.prunes_skipped;
        if pruned.locked {
            *misses = 0;
            self.counters.log_pruned(pruned.deleted);
            return;
        }
        self.counters.prune_skipped();
        *misses += 1;
        if *misses >= PRUNE_MISSES_BEFORE_WARNING
            && let Some(suppressed) = pacer.due(std::time::Instant::now())
        {
            tracing::warn!(
                target: TARGET,
                in_a_row = *misses,
                suppressed,
                "pruning the durable log was skipped: another session holds the channel's \
                 pruning lock (a transaction that called updatepipe.prune and stays open? \
                 see pg_stat_activity); the log grows meanwhile"
            );
        }
    }

    /// A fatal error ends the session (`Err`); another is logged, at most one line per
    /// [`WARN_INTERVAL`](super::pacer::WARN_INTERVAL), and the session goes on.
    fn log_failed(&mut self, e: &tokio_postgres::Error, what: &str) -> Result<(), String> {
        if is_fatal(e) {
            return Err(pg_message(e));
        }
        tracing::debug!(target: TARGET, error = %pg_message(e), "{what}");
        if let Some(suppressed) = self.warnings.log_errors.due(std::time::Instant::now()) {
            tracing::error!(target: TARGET, error = %pg_message(e), suppressed, "{what}");
        }
        Ok(())
    }

    /// The log is not there, or this role may not read it: says so once, and until the
    /// next connection lets every reference go with a resync instead of fetching it.
    fn stop_fetching(&mut self, e: &tokio_postgres::Error) {
        tracing::warn!(
            target: TARGET,
            error = %pg_message(e),
            "no durable log to read: oversize envelopes that notifications point at are let \
             go, each with a resync, until the listener reconnects (run updatepipe migrate, or \
             updatepipe grant --listener ROLE, as the schema's owner)"
        );
        for (origin, _) in self.reader.stop_fetching() {
            self.outbox.fill_fetch(Vec::new());
            self.outbox.resync(ResyncReason::Unreadable {
                origin: origin.to_string(),
            });
        }
    }

    /// Delivers the log rows a page returned, and moves the reader on.
    fn apply_page(&mut self, page: Page) {
        if self.reader.prune_news(page.pruned) {
            self.outbox.resync(ResyncReason::LogPruned);
        }
        let (rows, bytes) = page.size();
        self.counters.log_page(rows, bytes);
        let (entries, replaying) = self.reader.advance(page);
        for entry in &entries {
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
    pub(super) fn on_notification(&mut self, notification: &Notification) {
        let incoming = Incoming {
            channel: notification.channel(),
            payload: notification.payload(),
            sender_pid: notification.process_id(),
        };
        self.on_incoming(incoming);
    }

    fn on_incoming(&mut self, incoming: Incoming<'_>) {
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
            Verdict::CopyForMaddy => return,
            Verdict::Unrepresentable { key, error } => {
                self.reject_incoming(&error, incoming);
                return self.outbox.resync(ResyncReason::Unrepresentable { key });
            }
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
            Content::Updates(updates) => self.outbox.enqueue_all(updates),
            Content::Refused(e) => self.reject_incoming(&e, incoming),
            // No log to fetch from: the update is gone.
            Content::Fetch { origin, .. } if self.reader.is_unreadable() => {
                self.outbox.resync(ResyncReason::Unreadable {
                    origin: origin.to_string(),
                });
            }
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
        if let Some(suppressed) = self.warnings.rejections.due(std::time::Instant::now()) {
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

#[cfg(test)]
impl Dispatch {
    /// The sub-states of a listener on `config`, started now, with its caller's receiver,
    /// which has heard nothing yet (its `Connected` is forgotten), and no server: the pool
    /// the heartbeats would go out on is never used.
    pub(super) fn for_tests(
        config: &crate::config::Config,
    ) -> (Dispatch, tokio::sync::mpsc::Receiver<Event>) {
        use super::heartbeat::Clock;
        let settings = Settings::from_config(config);
        let (tx, rx) = tokio::sync::mpsc::channel(1024);
        let manager = deadpool_postgres::Manager::new(config.pg().clone(), tokio_postgres::NoTls);
        let pool = deadpool_postgres::Pool::builder(manager).build().unwrap();
        let now = Instant::now();
        let me = Origin::parse("me").unwrap();
        let heartbeat = Heartbeat::new(
            Clock::new(settings.health_interval, now),
            crate::envelope::Packer::new(&me, 1, None),
            settings.channel.clone(),
            pool,
            crate::pg::Canceller::new(config.server()).unwrap(),
        );
        let cursor = settings.durable.then(Cursor::default);
        let counters = Arc::new(Counters::default());
        let mut dispatch = Dispatch::new(
            &settings,
            me,
            Sink::Events(tx),
            heartbeat,
            cursor,
            counters,
            now,
        );
        dispatch.outbox.buffer_clear_for_tests();
        (dispatch, rx)
    }

    /// A notification on the pipe's channel, as if it arrived now.
    pub(super) fn incoming_for_tests(&mut self, payload: &str) {
        let channel = self.intake_channel_for_tests();
        self.on_incoming(Incoming {
            channel: &channel,
            payload,
            sender_pid: 1,
        });
    }

    fn intake_channel_for_tests(&self) -> String {
        self.heartbeat.channel_for_tests().to_owned()
    }

    pub(super) fn counters_for_tests(&self) -> &Counters {
        &self.counters
    }

    /// As if the log turned out not to be there: references are let go with a resync.
    pub(super) fn reader_stop_fetching_for_tests(&mut self) {
        self.reader.stop_fetching();
    }
}

#[cfg(test)]
mod tests;
