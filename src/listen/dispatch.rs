//! Dispatch: the listener's sub-states (the intake, the outbox, the log reader, the
//! heartbeat), owned here and reached only through methods that say what they do; and
//! what each thing that arrives (a new connection, a heartbeat sent, a delivery here; a
//! notification in `notifications.rs`; a log read in `reads.rs`) does to them. No I/O: the
//! loop in `task` does that, as `schedule` says.

use std::sync::Arc;
use std::time::Duration;

use futures_util::future::BoxFuture;
use tokio::time::Instant;

use super::connector::{LogOpened, Start};
use super::durable::{Ask, LogReader};
use super::event::{Event, ResyncReason, TARGET};
use super::heartbeat::{Heartbeat, Sent};
use super::intake::Intake;
use super::outbox::{HOLD, Outbox, Sink};
use super::pacer::Pacer;
use super::settings::Settings;
pub(super) use super::subscriptions::Command;
use crate::log::Cursor;
use crate::origin::Origin;
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
    /// A named consumer's acknowledgements: each new session's epoch goes to them.
    acks: Option<Arc<super::acks::Acks>>,
    /// Heartbeats showed that notifications do not reach this connection: why.
    unheard: Option<String>,
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
    /// The sub-states of a listener whose first session is open: in durable mode, `log`
    /// says where its reading starts. The caller hears `Connected` first (and then, when
    /// the position to resume from is not in the server's history, a resync).
    pub(super) fn new(
        settings: &Settings,
        origin: Origin,
        sink: Sink,
        heartbeat: Heartbeat,
        log: Option<LogOpened>,
        counters: Arc<Counters>,
        now: Instant,
    ) -> Dispatch {
        let (retention, page) = (settings.retention, settings.page);
        let mut moved = None;
        let standby = log.as_ref().is_some_and(|log| log.standby);
        let reader = match log.map(|log| (log.place, log.start)) {
            None => LogReader::best_effort(),
            // A replay from the past counts as replayed.
            Some((_, Start::At(cursor))) => {
                LogReader::durable(cursor, retention, page, settings.since.is_some(), now)
                    .holding(settings.consumer_hold)
            }
            Some((place, Start::Resume(position))) => {
                LogReader::resume(&position, place, retention, page, now)
                    .holding(settings.consumer_hold)
            }
            Some((_, Start::Moved(change, cursor))) => {
                moved = Some(change);
                LogReader::durable(cursor, retention, page, false, now)
                    .holding(settings.consumer_hold)
            }
            // Never on a first session.
            Some((_, Start::Continue)) => LogReader::best_effort(),
        };
        let mut reader = reader;
        reader.on_standby(standby);
        let mut dispatch = Dispatch {
            intake: Intake::new(settings, origin),
            outbox: Outbox::new(sink, settings.max_buffered, counters.clone()),
            reader,
            heartbeat,
            warnings: Warnings::default(),
            page_pause: settings.page_pause(),
            counters,
            acks: None,
            unheard: None,
        };
        dispatch.outbox.emit(Event::Connected);
        if let Some(change) = moved {
            dispatch.history_moved(change);
        } else if dispatch.outbox.tells_events()
            && let Some(position) = dispatch.reader.settled_position()
        {
            // Where reading starts: a position to store before anything is delivered.
            dispatch.outbox.emit(Event::Position(position));
        }
        dispatch
    }

    /// A new connection: each sub-state does what a reconnect does to it, and the caller
    /// hears `Connected`, then a resync if one is owed.
    pub(super) fn on_reconnect(&mut self, log: Option<LogOpened>, now: Instant) {
        self.counters.reconnect();
        self.outbox.emit(Event::Connected);
        let resync_owed = self.reader.on_reconnect();
        self.intake.on_reconnect();
        if resync_owed {
            self.outbox.resync(ResyncReason::Reconnected);
        }
        if let Some(log) = log {
            self.reader.reads_at(log.place, log.standby);
            if let (Some(acks), Some(epoch)) = (&self.acks, log.epoch) {
                acks.set_epoch(epoch);
            }
            if let Start::Moved(change, present) = log.start {
                self.reader.start_over(present);
                self.history_moved(change);
            }
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

    /// With a named consumer: its acknowledgements, which each new session's epoch goes to.
    pub(super) fn acknowledging(mut self, acks: Option<Arc<super::acks::Acks>>) -> Dispatch {
        self.acks = acks;
        self
    }

    /// The server's history no longer holds what the reader read: the caller is told to
    /// reload, and where reading now stands.
    fn history_moved(&mut self, change: crate::log::HistoryChange) {
        self.counters.history_changed();
        self.outbox.resync(ResyncReason::HistoryChanged(change));
        if self.outbox.tells_events()
            && let Some(position) = self.reader.settled_position()
        {
            self.outbox.emit(Event::Position(position));
        }
    }

    /// Durable mode: the cursor whose history a new session's server must hold.
    pub(super) fn newest_cursor(&self) -> Option<Cursor> {
        self.reader.newest_cursor().cloned()
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

    /// Polling: read the log's tail now.
    pub(super) fn read_log_soon(&mut self) {
        self.reader.read_soon();
    }

    /// The number of the heartbeat to send now, if one is due.
    pub(super) fn heartbeat_due(&mut self, now: Instant) -> Option<u64> {
        self.heartbeat.clock.due(now)
    }

    /// Whether the outstanding heartbeat is late (see `heartbeat`).
    pub(super) fn heartbeat_late(&self, now: Instant) -> bool {
        self.heartbeat.clock.is_late(now)
    }

    /// Whether the connection is to be proved by a statement of its own now: the
    /// heartbeat is late, or could not be sent.
    pub(super) fn wants_proof(&self, now: Instant) -> bool {
        self.heartbeat.clock.wants_proof(now)
    }

    /// The proof goes into the query slot now; how long it has to answer.
    pub(super) fn proof_started(&mut self) -> Duration {
        self.heartbeat.clock.proof_started();
        self.heartbeat.clock.proof_after()
    }

    /// Why LISTEN does not work through this connection, once the heartbeats showed it
    /// (the session then ends, and the listener with it).
    pub(super) fn take_unheard(&mut self) -> Option<String> {
        self.unheard.take()
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
}

mod notifications;
mod reads;
#[cfg(test)]
mod testing;
#[cfg(test)]
mod tests;
