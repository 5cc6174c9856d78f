//! The log reader's state: in durable mode, the position in the log and whether its tail
//! must be read; in either mode, the oversize envelopes to fetch from it; and when to prune
//! it. It decides what the connection loop asks the log next ([`LogReader::next_ask`]);
//! `log.rs` says how.

use std::collections::VecDeque;
use std::time::Duration;

use tokio::time::Instant;
use tokio_postgres::error::SqlState;

use crate::log::Cursor;
use crate::origin::Origin;

/// The most oversize envelopes a best-effort listener waits to fetch at once.
pub(super) const MAX_PENDING_FETCHES: usize = 64;

/// What to ask the log next.
#[derive(Debug)]
pub(super) enum Ask {
    /// What was committed since this position.
    Tail(Cursor),
    /// One oversize envelope, by sender and number.
    Fetch(Origin, u64),
    /// Pruning the entries older than the retention.
    Prune(Duration),
}

/// The log reader's state.
#[derive(Debug)]
pub(super) struct LogReader {
    durable: bool,
    retention: Duration,
    /// Durable mode: the log position.
    cursor: Option<Cursor>,
    tail_needed: bool,
    /// The next tail is a catch-up (after a reconnect, or from a starting point in the
    /// past): its updates are counted as replayed.
    replaying: bool,
    /// Durable mode: a best-effort sender was heard on the channel, whose updates a
    /// disconnect loses (so a reconnect must raise a resync after all).
    heard_best_effort: bool,
    /// Oversize envelopes to fetch from the log, in delivery order.
    fetches: VecDeque<(Origin, u64)>,
    /// The log does not exist, or this role may not read it: fetching stopped until the
    /// next connection (references are let go, with a resync).
    unreadable: bool,
    next_prune: Instant,
}

/// Whether a log query's error says that this listener has no log to read (the schema is
/// not migrated, or the role was not granted it): asking again will not help.
pub(super) fn no_log(code: Option<&SqlState>) -> bool {
    code.is_some_and(|code| {
        [
            SqlState::UNDEFINED_TABLE,
            SqlState::INVALID_SCHEMA_NAME,
            SqlState::INSUFFICIENT_PRIVILEGE,
        ]
        .contains(code)
    })
}

impl LogReader {
    /// A reader whose first read starts at `cursor` (durable mode), from the past when the
    /// listener was asked to replay.
    pub(super) fn new(
        durable: bool,
        retention: Duration,
        cursor: Option<Cursor>,
        replay_from_the_past: bool,
        now: Instant,
    ) -> LogReader {
        LogReader {
            durable,
            retention,
            cursor,
            tail_needed: durable,
            replaying: durable && replay_from_the_past,
            heard_best_effort: false,
            fetches: VecDeque::new(),
            unreadable: false,
            next_prune: now,
        }
    }

    /// In durable mode, reads the tail soon: a durable envelope was announced, or (a safety
    /// net should a wake-up ever be missed) a heartbeat went out.
    pub(super) fn read_soon(&mut self) {
        if self.durable {
            self.tail_needed = true;
        }
    }

    /// A best-effort sender's updates were heard in durable mode.
    pub(super) fn heard_best_effort(&mut self) {
        self.heard_best_effort = true;
    }

    /// Stops fetching (the log is not there, or not readable), until the next connection;
    /// returns the fetches that were waiting, none of which will be made.
    pub(super) fn stop_fetching(&mut self) -> Vec<(Origin, u64)> {
        self.unreadable = true;
        self.fetches.drain(..).collect()
    }

    /// Whether fetching stopped ([`stop_fetching`](LogReader::stop_fetching)).
    pub(super) fn is_unreadable(&self) -> bool {
        self.unreadable
    }

    /// Whether another oversize envelope may wait for its fetch.
    pub(super) fn can_fetch(&self) -> bool {
        self.fetches.len() < MAX_PENDING_FETCHES
    }

    /// Fetches this oversize envelope after those already waiting.
    pub(super) fn queue_fetch(&mut self, origin: Origin, seq: u64) {
        self.fetches.push_back((origin, seq));
    }

    /// What to ask next, by priority: the tail (only with `room` for what it brings), the
    /// oldest fetch, pruning when due (every tenth of the retention, between 1 s and 60 s).
    pub(super) fn next_ask(&mut self, room: bool, now: Instant) -> Option<Ask> {
        if self.tail_needed && room {
            let cursor = self.cursor.clone()?;
            self.tail_needed = false;
            return Some(Ask::Tail(cursor));
        }
        if let Some((origin, seq)) = self.fetches.front() {
            return Some(Ask::Fetch(origin.clone(), *seq));
        }
        if self.durable && now >= self.next_prune {
            self.next_prune =
                now + (self.retention / 10).clamp(Duration::from_secs(1), Duration::from_secs(60));
            return Some(Ask::Prune(self.retention));
        }
        None
    }

    /// A tail was read up to `cursor`; `true` when it was a catch-up.
    pub(super) fn advance(&mut self, cursor: Cursor) -> bool {
        self.cursor = Some(cursor);
        std::mem::take(&mut self.replaying)
    }

    /// The oldest fetch is done (read, or given up on).
    pub(super) fn fetched(&mut self) -> Option<(Origin, u64)> {
        self.fetches.pop_front()
    }

    /// A new connection: in durable mode, the log has what was missed, read it now (as a
    /// catch-up). Returns whether a resync is owed all the same: in best effort always, in
    /// durable mode when best-effort senders were heard (what they sent meanwhile is lost).
    pub(super) fn on_reconnect(&mut self) -> bool {
        // The schema may have been migrated, or the role granted, meanwhile.
        self.unreadable = false;
        if !self.durable {
            return true;
        }
        self.tail_needed = true;
        self.replaying = true;
        self.heard_best_effort
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECOND: Duration = Duration::from_secs(1);

    fn origin() -> Origin {
        Origin::parse("a").unwrap()
    }

    fn durable(now: Instant) -> LogReader {
        LogReader::new(true, 100 * SECOND, Some(Cursor::default()), false, now)
    }

    #[test]
    fn the_tail_first_and_only_with_room() {
        let now = Instant::now();
        let mut reader = durable(now);
        reader.queue_fetch(origin(), 7);
        assert!(matches!(
            reader.next_ask(false, now),
            Some(Ask::Fetch(_, 7))
        ));
        assert!(matches!(reader.next_ask(true, now), Some(Ask::Tail(_))));
        // Asked once: the fetch next, until it is done.
        assert!(matches!(reader.next_ask(true, now), Some(Ask::Fetch(_, 7))));
        assert!(matches!(reader.fetched(), Some((_, 7))));
        assert!(matches!(reader.next_ask(true, now), Some(Ask::Prune(r)) if r == 100 * SECOND));
        assert!(reader.next_ask(true, now).is_none());
        reader.read_soon();
        assert!(matches!(reader.next_ask(true, now), Some(Ask::Tail(_))));
    }

    #[test]
    fn pruning_every_tenth_of_the_retention_within_bounds() {
        let now = Instant::now();
        let mut reader = durable(now);
        reader.next_ask(true, now);
        assert!(matches!(reader.next_ask(true, now), Some(Ask::Prune(_))));
        assert!(reader.next_ask(true, now + 9 * SECOND).is_none());
        assert!(matches!(
            reader.next_ask(true, now + 10 * SECOND),
            Some(Ask::Prune(_))
        ));
        let mut long = LogReader::new(true, 86_400 * SECOND, Some(Cursor::default()), false, now);
        long.next_ask(true, now);
        long.next_ask(true, now);
        assert!(long.next_ask(true, now + 59 * SECOND).is_none());
        assert!(matches!(
            long.next_ask(true, now + 60 * SECOND),
            Some(Ask::Prune(_))
        ));
    }

    #[test]
    fn best_effort_fetches_but_never_tails_nor_prunes() {
        let now = Instant::now();
        let mut reader = LogReader::new(false, 100 * SECOND, None, true, now);
        reader.read_soon();
        assert!(reader.next_ask(true, now).is_none());
        for seq in 0..MAX_PENDING_FETCHES as u64 {
            assert!(reader.can_fetch());
            reader.queue_fetch(origin(), seq);
        }
        assert!(!reader.can_fetch());
        assert!(matches!(reader.next_ask(true, now), Some(Ask::Fetch(_, 0))));
        // A reconnect in best effort always owes a resync.
        assert!(reader.on_reconnect());
        assert!(matches!(reader.next_ask(true, now), Some(Ask::Fetch(_, 0))));
    }

    #[test]
    fn a_reconnect_in_durable_mode_catches_up() {
        let now = Instant::now();
        let mut reader = LogReader::new(true, 100 * SECOND, Some(Cursor::default()), true, now);
        assert!(matches!(reader.next_ask(true, now), Some(Ask::Tail(_))));
        // A replay from the past is a catch-up; the next read is not.
        assert!(reader.advance(Cursor::default()));
        assert!(!reader.advance(Cursor::default()));
        // Only durable senders heard: the log has all, no resync owed.
        assert!(!reader.on_reconnect());
        assert!(matches!(reader.next_ask(true, now), Some(Ask::Tail(_))));
        assert!(reader.advance(Cursor::default()));
        reader.heard_best_effort();
        assert!(reader.on_reconnect());
    }

    #[test]
    fn no_log_to_read_stops_fetching_until_the_next_connection() {
        assert!(no_log(Some(&SqlState::UNDEFINED_TABLE)));
        assert!(no_log(Some(&SqlState::INSUFFICIENT_PRIVILEGE)));
        assert!(no_log(Some(&SqlState::INVALID_SCHEMA_NAME)));
        assert!(!no_log(Some(&SqlState::QUERY_CANCELED)));
        assert!(!no_log(None));
        let now = Instant::now();
        let mut reader = LogReader::new(false, SECOND, None, false, now);
        reader.queue_fetch(origin(), 1);
        reader.queue_fetch(origin(), 2);
        let dropped = reader.stop_fetching();
        assert_eq!(dropped.len(), 2);
        assert!(reader.is_unreadable());
        assert!(reader.next_ask(true, now).is_none());
        reader.on_reconnect();
        assert!(!reader.is_unreadable());
    }
}
