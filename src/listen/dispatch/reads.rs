//! What the query slot's answers do: a page of the log, an oversize envelope fetched, a
//! pruning, a keep-alive, a cancel, an error.

use tokio::time::Instant;

use super::super::event::{ResyncReason, TARGET};
use super::super::heartbeat::Proved;
use super::super::intake::{LogRow, Moment, RowVerdict};
use super::super::query::{Asked, QueryOutcome};
use super::Dispatch;
use super::PRUNE_MISSES_BEFORE_WARNING;
use crate::error::{DecodeError, pg_message};
use crate::log::{Page, Pruned};
use crate::origin::Origin;
use crate::pg::{is_cancelled, is_fatal, is_missing_log};

impl Dispatch {
    /// The connection answered the statement that proves it (see `heartbeat`): fine, or
    /// (an error) notifications do not reach it although it answers, noted for the loop
    /// (`take_unheard`), which stops the listener.
    fn on_proved(&mut self, answered: Result<(), tokio_postgres::Error>) -> Result<(), String> {
        match answered {
            Err(e) if is_fatal(&e) => return Err(pg_message(&e)),
            // Refused, but answered: the connection works.
            Err(e) => tracing::debug!(
                target: TARGET,
                error = %pg_message(&e),
                "the statement proving the connection was refused"
            ),
            Ok(()) => {}
        }
        match self.heartbeat.clock.proved(Instant::now()) {
            Proved::Fine => Ok(()),
            Proved::Unheard(why) => {
                self.unheard = Some(why.clone());
                Err(why)
            }
        }
    }

    /// Handles a finished query; an error means the connection must be dropped.
    pub(in crate::listen) fn on_query(&mut self, outcome: QueryOutcome) -> Result<(), String> {
        let outcome = match outcome {
            QueryOutcome::Proved(answered) => return self.on_proved(answered),
            QueryOutcome::Unproved(after) => return Err(self.heartbeat.clock.unproved(after)),
            other => other,
        };
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
            // Handled above.
            QueryOutcome::Proved(_) | QueryOutcome::Unproved(_) => Ok(()),
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
        let advanced = self.reader.advance(page);
        // Positions go to a caller that hears events: one after each update, and one after
        // entries that delivered nothing (its own, or refused) at the end of the page. The
        // last of a read that is done is the reader's new cursor itself (a position that
        // holds back nothing it delivered).
        let positions = self.outbox.tells_events();
        let mut owed = None;
        let last = advanced.entries.len().checked_sub(1);
        for (at, entry) in advanced.entries.iter().enumerate() {
            let row = LogRow {
                origin: &entry.origin,
                seq: entry.seq,
                payload: &entry.payload,
                written_at: entry.written_at,
            };
            match self.intake.classify_row(row, Moment::now()) {
                RowVerdict::Own => owed = Some(entry.id),
                RowVerdict::Updates(updates) => {
                    // After a resume inside this entry: what was delivered of it before.
                    let skip = self.reader.skip(entry.id);
                    let n = updates.len();
                    if advanced.replaying {
                        self.counters.replayed(n.saturating_sub(skip));
                    }
                    owed = (n <= skip).then_some(entry.id);
                    for (i, update) in updates.into_iter().enumerate().skip(skip) {
                        self.outbox.push_logged(update);
                        if !positions {
                            continue;
                        }
                        if i + 1 < n {
                            self.emit_position(&advanced.read, entry.id, i as u32 + 1);
                        } else if advanced.complete && Some(at) == last {
                            self.emit_settled_position();
                        } else {
                            self.emit_position(&advanced.read, entry.id, 0);
                        }
                    }
                }
                RowVerdict::Refused { error, resync } => {
                    self.refuse_logged(&error, resync, &entry.origin, entry.payload.len());
                    owed = Some(entry.id);
                }
            }
        }
        self.reader.skipped();
        if positions && let Some(id) = owed {
            if advanced.complete {
                self.emit_settled_position();
            } else {
                self.emit_position(&advanced.read, id, 0);
            }
        }
    }

    fn emit_settled_position(&mut self) {
        if let Some(position) = self.reader.settled_position() {
            self.outbox
                .emit(super::super::event::Event::Position(position));
        }
    }

    fn emit_position(&mut self, read: &std::sync::Arc<crate::log::Read>, id: i64, partial: u32) {
        if let Some(position) = self.reader.position(read, id, partial) {
            self.outbox
                .emit(super::super::event::Event::Position(position));
        }
    }

    /// Fills the oldest fetching slot with an oversize envelope read from the log.
    fn apply_fetch(&mut self, origin: &Origin, seq: u64, fetched: Option<(String, f64)>) {
        let Some((payload, written_at)) = fetched else {
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
            written_at,
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
}
