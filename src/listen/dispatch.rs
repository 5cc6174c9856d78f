//! Dispatch: what the connection loop does with what arrives (a notification, a heartbeat
//! sent, a log read, a new connection), by asking the sub-states. No I/O: the loop in
//! `task` does that.

use std::sync::Arc;

use tokio::time::Instant;

use super::durable::{Ask, LogReader};
use super::heartbeat::{Heartbeat, Sent};
use super::intake::{Content, Incoming, Intake, LogRow, Moment, RowVerdict, Verdict};
use super::outbox::Outbox;
use super::pacer::Pacer;
use super::{Event, ResyncReason, TARGET};
use crate::error::{DecodeError, pg_message};
use crate::log::{Page, Pruned};
use crate::origin::Origin;
use crate::pg::{is_cancelled, is_fatal, is_missing_log};
use crate::stats::Counters;

/// Prunings in a row that may find the pruning lock held (other listeners of the channel
/// prune too) before a warning says so.
const PRUNE_MISSES_BEFORE_WARNING: u32 = 3;

/// What the listener's one query slot produced.
pub(super) enum QueryOutcome {
    Tail(Result<Option<Page>, tokio_postgres::Error>),
    Fetch(Result<Option<String>, tokio_postgres::Error>),
    Prune(Result<Pruned, tokio_postgres::Error>),
    /// No answer by the deadline, not even to a cancel: the connection is dead.
    TimedOut(std::time::Duration),
    /// A statement sent only so that the server's `idle_session_timeout` does not end the
    /// session.
    KeptAlive(Result<(), tokio_postgres::Error>),
    /// Cancelled past the deadline (or because a heartbeat was late meanwhile), and the
    /// cancel was answered: the connection is fine (the loop retries later; see
    /// `task::QuerySlot`).
    Cancelled(Asked),
}

/// Which query of the slot an outcome is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Asked {
    Tail,
    Fetch,
    Prune,
}

/// The sub-states the connection loop dispatches to.
#[derive(Debug)]
pub(super) struct Dispatch {
    pub(super) intake: Intake,
    pub(super) outbox: Outbox,
    pub(super) reader: LogReader,
    pub(super) heartbeat: Heartbeat,
    /// Paces the warnings about rejected payloads, which senders can provoke.
    pub(super) rejections: Pacer,
    /// Paces the errors of log queries, which senders can provoke too (a reference to the
    /// log is one notification).
    pub(super) log_errors: Pacer,
    /// Paces the warnings about log pages the server cancelled.
    pub(super) cancelled_pages: Pacer,
    /// Prunings in a row that found the channel's pruning lock held, and the pacing of the
    /// warning about them.
    pub(super) prunes_skipped: (u32, Pacer),
    /// How long to wait before reading a cancelled page again.
    pub(super) page_pause: std::time::Duration,
    pub(super) counters: Arc<Counters>,
}

impl Dispatch {
    /// A new connection: each sub-state does what a reconnect does to it, and the caller
    /// hears `Connected`, then a resync if one is owed.
    pub(super) fn on_reconnect(&mut self) {
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
        self.heartbeat.clock.on_reconnect(Instant::now());
    }

    /// What to ask the log next, with room for the tail under half the bound.
    pub(super) fn next_ask(&mut self) -> Option<Ask> {
        let room = self.outbox.has_room_for_tail();
        self.reader.next_ask(room, Instant::now())
    }

    /// A heartbeat was sent, or could not be.
    pub(super) fn on_heartbeat_sent(&mut self, sent: Sent) {
        if self.heartbeat.on_sent(sent) {
            // In durable mode, also read the log now and then: a safety net should a
            // wake-up ever be missed.
            self.reader.read_soon();
        }
    }

    /// Handles a finished query; an error means the connection must be dropped.
    pub(super) fn on_query(&mut self, outcome: QueryOutcome) -> Result<(), String> {
        match outcome {
            QueryOutcome::Prune(Ok(pruned)) => {
                self.on_pruned(pruned);
                Ok(())
            }
            QueryOutcome::Cancelled(Asked::Tail) => {
                // Blocked (a lock on the log, say), not dead: the page is read again,
                // smaller, once the slot opens again (the fetch and the prune are simply
                // asked again).
                self.reader.page_cancelled(Instant::now(), self.page_pause);
                Ok(())
            }
            QueryOutcome::Cancelled(Asked::Fetch | Asked::Prune) => Ok(()),
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
                let pause = self.page_pause;
                self.reader.page_cancelled(Instant::now(), pause);
                if let Some(suppressed) = self.cancelled_pages.due(std::time::Instant::now()) {
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

    /// A pruning ran: counted; when it found the channel's pruning lock held several times
    /// in a row, said (paced): pruning stands still while another session holds it.
    fn on_pruned(&mut self, pruned: Pruned) {
        let (misses, pacer) = &mut self.prunes_skipped;
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
        if let Some(suppressed) = self.log_errors.due(std::time::Instant::now()) {
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
    pub(super) fn on_notification(&mut self, incoming: Incoming<'_>) {
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

#[cfg(test)]
mod tests;
