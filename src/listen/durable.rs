//! The log reader's state: in durable mode, the position in the log, whether its tail must
//! be read, and a catch-up under way (read in pages, within a budget, so that a listener
//! back from a long absence holds one page at a time); in either mode, the oversize
//! envelopes to fetch from it; and when to prune it. It decides what the connection loop
//! asks the log next ([`LogReader::next_ask`]); `log.rs` says how.

use std::collections::VecDeque;
use std::time::Duration;

use tokio::time::Instant;

use std::sync::Arc;

use crate::log::{CatchUp, Cursor, Entry, Page, PageBudget, Place, Position, Read};
use crate::origin::Origin;

/// The most oversize envelopes a best-effort listener waits to fetch at once.
pub(super) const MAX_PENDING_FETCHES: usize = 64;

/// What to ask the log next.
#[derive(Debug)]
pub(super) enum Ask {
    /// A page of what was committed since this position, continuing `catch_up` if one is
    /// under way.
    Tail {
        from: Cursor,
        /// Boxed: a catch-up under way is the exception, and the ask stays small.
        catch_up: Option<Box<CatchUp>>,
        budget: PageBudget,
        /// The session's server (a first page's target is read there).
        place: Place,
        /// Not before this (a page the server cancelled is read again after a pause).
        not_before: Option<Instant>,
    },
    /// One oversize envelope, by sender and number.
    Fetch(Origin, u64),
    /// Pruning the entries older than the retention (keeping what named consumers have
    /// not acknowledged, up to the hold).
    Prune { retention: Duration, hold: Duration },
}

/// The log reader's state: the tail in durable mode (none in best effort), and the fetches
/// of oversize envelopes in either mode.
#[derive(Debug)]
pub(super) struct LogReader {
    /// Durable mode: the position in the log and how it is read.
    tail: Option<Tail>,
    fetches: Fetches,
}

/// Durable mode: the position in the log, the catch-up under way, and when to prune.
#[derive(Debug)]
struct Tail {
    /// Everything visible in its snapshot was delivered.
    cursor: Cursor,
    /// The session's server is a standby (a poller's): read-only, never pruned from here.
    standby: bool,
    /// A catch-up read in pages, under way from `cursor`.
    catch_up: Option<CatchUp>,
    /// How much a page may hold: the configured budget, halved while the server cancels
    /// pages (its `statement_timeout`).
    budget: PageBudget,
    configured: PageBudget,
    /// No page before this (one was cancelled: a backoff).
    not_before: Option<Instant>,
    /// The tail must be read (something was announced, or a page is left).
    needed: bool,
    /// The next read is a catch-up (after a reconnect, or from a starting point in the
    /// past): its updates are counted as replayed.
    replaying: bool,
    /// Pruning that may have taken unread entries was reported during this read.
    prune_reported: bool,
    /// A best-effort sender was heard on the channel, whose updates a disconnect loses (so
    /// a reconnect must raise a resync after all).
    heard_best_effort: bool,
    retention: Duration,
    /// How long pruning keeps what named consumers have not acknowledged.
    hold: Duration,
    next_prune: Instant,
    /// The server the session reads (checked to hold the cursor's history).
    place: Place,
    /// The next position's step.
    step: u64,
    /// Resuming from a position inside an envelope: that entry's first updates, delivered
    /// before, are not delivered again (on the first page only).
    skip: Option<(i64, u32)>,
    /// Resuming from a position in a read under way: its target is in the past, so once it
    /// is reached the log is read on at once, up to now.
    target_behind: bool,
}

/// A page's entries, with what the positions after them are made of.
#[derive(Debug)]
pub(super) struct Advanced {
    pub(super) entries: Vec<Entry>,
    /// Whether they are a catch-up's (counted as replayed).
    pub(super) replaying: bool,
    /// The read they belong to.
    pub(super) read: Arc<Read>,
    /// Whether the read is done: the reader's cursor is its target now.
    pub(super) complete: bool,
}

/// The oversize envelopes to fetch from the log, in delivery order.
#[derive(Debug, Default)]
struct Fetches {
    waiting: VecDeque<(Origin, u64)>,
    /// The log does not exist, or this role may not read it: fetching stopped until the
    /// next connection (references are let go, with a resync).
    unreadable: bool,
}

impl LogReader {
    /// A best-effort listener's reader: it fetches oversize envelopes, nothing more.
    pub(super) fn best_effort() -> LogReader {
        LogReader {
            tail: None,
            fetches: Fetches::default(),
        }
    }

    /// A durable listener's reader, whose first read starts at `cursor` (from the past
    /// when the listener was asked to replay: then it counts as a catch-up).
    pub(super) fn durable(
        cursor: Cursor,
        retention: Duration,
        budget: PageBudget,
        replay_from_the_past: bool,
        now: Instant,
    ) -> LogReader {
        LogReader {
            tail: Some(Tail {
                place: cursor.place,
                cursor,
                standby: false,
                catch_up: None,
                budget,
                configured: budget,
                not_before: None,
                needed: true,
                replaying: replay_from_the_past,
                prune_reported: false,
                heard_best_effort: false,
                retention,
                hold: crate::config::DEFAULT_CONSUMER_HOLD,
                next_prune: now,
                step: 0,
                skip: None,
                target_behind: false,
            }),
            fetches: Fetches::default(),
        }
    }

    /// A durable listener's reader resuming from `position`, on a server whose history was
    /// checked to hold it: the read it was in goes on past its entry (or into it, when only
    /// some of the entry's updates were delivered), counted as a catch-up.
    pub(super) fn resume(
        position: &Position,
        place: Place,
        retention: Duration,
        budget: PageBudget,
        now: Instant,
    ) -> LogReader {
        let read = position.read();
        let mut reader = LogReader::durable(read.from.clone(), retention, budget, true, now);
        if let Some(tail) = &mut reader.tail {
            tail.place = place;
            tail.step = position.step() + 1;
            let (id, partial) = (position.after_id(), position.partial());
            tail.catch_up = read.target.clone().map(|target| {
                // Inside an entry: read it again, and skip what was delivered of it.
                let after_id = if partial > 0 { id - 1 } else { id };
                CatchUp::new(target, after_id)
            });
            tail.skip = (partial > 0).then_some((id, partial));
            tail.target_behind = tail.catch_up.is_some();
        }
        reader
    }

    /// Pruning keeps what named consumers have not acknowledged for `hold`.
    pub(super) fn holding(mut self, hold: Duration) -> LogReader {
        if let Some(tail) = &mut self.tail {
            tail.hold = hold;
        }
        self
    }

    /// Durable mode: the cursor whose history the server must still hold: the target of a
    /// catch-up under way (entries visible in it were delivered), else the position.
    pub(super) fn newest_cursor(&self) -> Option<&Cursor> {
        let tail = self.tail.as_ref()?;
        Some(tail.catch_up.as_ref().map_or(&tail.cursor, CatchUp::target))
    }

    /// Durable mode: the position at the reader's cursor, for a caller that should hear
    /// where it stands though nothing was delivered (a history that moved, say).
    pub(super) fn settled_position(&mut self) -> Option<Position> {
        let tail = self.tail.as_mut()?;
        if tail.catch_up.is_some() {
            return None;
        }
        let step = tail.step;
        tail.step += 1;
        Some(Position::at(tail.cursor.clone(), step))
    }

    /// The position just after `partial` updates (all when 0) of the entry `id` of `read`.
    pub(super) fn position(&mut self, read: &Arc<Read>, id: i64, partial: u32) -> Option<Position> {
        let tail = self.tail.as_mut()?;
        let step = tail.step;
        tail.step += 1;
        Some(Position::new(read.clone(), id, partial, step))
    }

    /// How many of entry `id`'s updates were delivered before a resume (see
    /// [`LogReader::resume`]); asked for each entry of the first page read.
    pub(super) fn skip(&self, id: i64) -> usize {
        match self.tail.as_ref().and_then(|t| t.skip) {
            Some((at, n)) if at == id => n as usize,
            _ => 0,
        }
    }

    /// In durable mode, reads the tail soon: a durable envelope was announced, or (a safety
    /// net should a wake-up ever be missed) a heartbeat went out.
    pub(super) fn read_soon(&mut self) {
        if let Some(tail) = &mut self.tail {
            tail.needed = true;
        }
    }

    /// A best-effort sender's updates were heard in durable mode.
    pub(super) fn heard_best_effort(&mut self) {
        if let Some(tail) = &mut self.tail {
            tail.heard_best_effort = true;
        }
    }

    /// Stops fetching (the log is not there, or not readable), until the next connection;
    /// returns the fetches that were waiting, none of which will be made.
    pub(super) fn stop_fetching(&mut self) -> Vec<(Origin, u64)> {
        self.fetches.unreadable = true;
        self.fetches.waiting.drain(..).collect()
    }

    /// Whether fetching stopped ([`stop_fetching`](LogReader::stop_fetching)).
    pub(super) fn is_unreadable(&self) -> bool {
        self.fetches.unreadable
    }

    /// Whether another oversize envelope may wait for its fetch.
    pub(super) fn can_fetch(&self) -> bool {
        self.fetches.waiting.len() < MAX_PENDING_FETCHES
    }

    /// Fetches this oversize envelope after those already waiting.
    pub(super) fn queue_fetch(&mut self, origin: Origin, seq: u64) {
        self.fetches.waiting.push_back((origin, seq));
    }

    /// What to ask next, by priority: the tail (only with `room` for what it brings), the
    /// oldest fetch, pruning when due (every tenth of the retention, between 1 s and 60 s).
    pub(super) fn next_ask(&mut self, room: bool, now: Instant) -> Option<Ask> {
        if let Some(tail) = &mut self.tail
            && tail.needed
            && room
        {
            tail.needed = false;
            return Some(Ask::Tail {
                from: tail.cursor.clone(),
                catch_up: tail.catch_up.clone().map(Box::new),
                budget: tail.budget,
                place: tail.place,
                not_before: tail.not_before.filter(|at| now < *at),
            });
        }
        if let Some((origin, seq)) = self.fetches.waiting.front() {
            return Some(Ask::Fetch(origin.clone(), *seq));
        }
        let tail = self.tail.as_mut()?;
        // Not while a catch-up is under way: it would prune what it is about to read. Not
        // on a standby: it cannot write (the primary's listeners prune, and it replicates).
        if !tail.standby && tail.catch_up.is_none() && now >= tail.next_prune {
            tail.next_prune =
                now + (tail.retention / 10).clamp(Duration::from_secs(1), Duration::from_secs(60));
            return Some(Ask::Prune {
                retention: tail.retention,
                hold: tail.hold,
            });
        }
        None
    }

    /// A page was read: the position moves to its target once the page completes it, and
    /// otherwise the next page is read as soon as there is room. Returns its entries, and
    /// whether they are a catch-up's (counted as replayed).
    pub(super) fn advance(&mut self, page: Page) -> Advanced {
        let read = Arc::new(Read {
            from: self
                .tail
                .as_ref()
                .map(|t| t.cursor.clone())
                .unwrap_or_default(),
            target: Some(page.target().clone()),
        });
        let Some(tail) = &mut self.tail else {
            return Advanced {
                entries: Vec::new(),
                replaying: false,
                read,
                complete: false,
            };
        };
        let complete = page.complete;
        let (cursor, catch_up, entries) = page.advance(&tail.cursor);
        tail.cursor = cursor;
        tail.catch_up = catch_up;
        tail.not_before = None;
        // A page that was read: the budget may grow back towards what is configured.
        tail.budget.rows = tail.budget.rows.saturating_mul(2).min(tail.configured.rows);
        let replaying = if complete {
            tail.prune_reported = false;
            if std::mem::take(&mut tail.target_behind) {
                // A resumed read reached its target, which is in the past: on to now, at
                // once, still a catch-up.
                tail.needed = true;
                tail.replaying
            } else {
                std::mem::take(&mut tail.replaying)
            }
        } else {
            tail.needed = true;
            tail.replaying
        };
        Advanced {
            entries,
            replaying,
            read,
            complete,
        }
    }

    /// Done with the first page after a resume: what it skipped is behind.
    pub(super) fn skipped(&mut self) {
        if let Some(tail) = &mut self.tail {
            tail.skip = None;
        }
    }

    /// Whether a page's news that entries may have been pruned is to be told now: once per
    /// read, on whichever of its pages sees it (pruning may run between pages).
    pub(super) fn prune_news(&mut self, pruned: bool) -> bool {
        let Some(tail) = &mut self.tail else {
            return false;
        };
        if !pruned || tail.prune_reported {
            return false;
        }
        tail.prune_reported = true;
        true
    }

    /// The server cancelled a page (its `statement_timeout`, say): read it again after a
    /// pause, half as large (one row at the least), rather than repeat what cannot finish.
    pub(super) fn page_cancelled(&mut self, now: Instant, pause: Duration) {
        if let Some(tail) = &mut self.tail {
            tail.budget.rows = (tail.budget.rows / 2).max(1);
            tail.needed = true;
            tail.not_before = Some(now + pause);
        }
    }

    /// The oldest fetch is done (read, or given up on).
    pub(super) fn fetched(&mut self) -> Option<(Origin, u64)> {
        self.fetches.waiting.pop_front()
    }

    /// A new connection: in durable mode, the log has what was missed, read it now (as a
    /// catch-up). Returns whether a resync is owed all the same: in best effort always, in
    /// durable mode when best-effort senders were heard (what they sent meanwhile is lost).
    pub(super) fn on_reconnect(&mut self) -> bool {
        // The schema may have been migrated, or the role granted, meanwhile.
        self.fetches.unreadable = false;
        let Some(tail) = &mut self.tail else {
            return true;
        };
        tail.needed = true;
        tail.replaying = true;
        tail.heard_best_effort
    }

    /// Durable mode: the new session's server, whose history holds the reader's, and
    /// whether it is a standby (not pruned from here).
    pub(super) fn reads_at(&mut self, place: Place, standby: bool) {
        if let Some(tail) = &mut self.tail {
            tail.place = place;
        }
        self.on_standby(standby);
    }

    /// Whether the session's server is a standby: the log is not pruned from it.
    pub(super) fn on_standby(&mut self, standby: bool) {
        if let Some(tail) = &mut self.tail {
            tail.standby = standby;
        }
    }

    /// Durable mode: the server's history no longer holds the reader's (see
    /// `log::check`); reading goes on from `present`, a cursor taken before `LISTEN`. The
    /// catch-up under way is dropped: its target is in the lost history.
    pub(super) fn start_over(&mut self, present: Cursor) {
        if let Some(tail) = &mut self.tail {
            tail.place = present.place;
            tail.cursor = present;
            tail.catch_up = None;
            tail.skip = None;
            tail.target_behind = false;
            tail.not_before = None;
            tail.needed = true;
            tail.prune_reported = false;
        }
    }
}

#[cfg(test)]
mod tests;
