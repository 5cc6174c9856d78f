//! Gap tracking: the last number heard from each sender's pool pushes, so that a skipped
//! number raises a resync in best-effort delivery.

use std::collections::HashMap;

use crate::origin::Origin;

/// The most senders whose numbers a listener tracks for gaps. Past it, a new sender makes
/// the listener forget every other (a gap it then misses is one it cannot see anyway).
pub(super) const MAX_TRACKED_SENDERS: usize = 10_000;

/// Numbers skipped by one sender: `expected` was due, `got` arrived.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct Gap {
    pub(super) expected: u64,
    pub(super) got: u64,
}

/// The last number seen from each sender's pool pushes (pushes in callers' transactions
/// may roll back or commit out of order, and are not tracked).
#[derive(Debug, Default)]
pub(super) struct Gaps {
    last_seq: HashMap<Origin, u64>,
}

impl Gaps {
    /// Notes a sender's pool-push number; `Some` when numbers between were skipped. A number
    /// lower than one seen (a later transaction committed first) is no gap.
    pub(super) fn note(&mut self, origin: &Origin, seq: u64) -> Option<Gap> {
        if self.last_seq.len() >= MAX_TRACKED_SENDERS && !self.last_seq.contains_key(origin) {
            self.last_seq.clear();
        }
        match self.last_seq.get_mut(origin) {
            Some(last) if seq > last.saturating_add(1) => {
                let expected = last.saturating_add(1);
                *last = seq;
                Some(Gap { expected, got: seq })
            }
            Some(last) => {
                *last = (*last).max(seq);
                None
            }
            None => {
                self.last_seq.insert(origin.clone(), seq);
                None
            }
        }
    }

    /// After a reconnect in best effort, whatever was sent meanwhile is lost (and a resync
    /// says so): numbers from before prove nothing. In durable mode the numbers go on.
    pub(super) fn on_reconnect(&mut self, durable: bool) {
        if !durable {
            self.last_seq.clear();
        }
    }

    /// How many senders are tracked.
    #[cfg(test)]
    pub(super) fn len(&self) -> usize {
        self.last_seq.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn origin(name: &str) -> Origin {
        Origin::parse(name).unwrap()
    }

    #[test]
    fn a_skipped_number_is_a_gap_once() {
        let mut gaps = Gaps::default();
        let a = origin("a");
        assert_eq!(gaps.note(&a, 5), None);
        assert_eq!(gaps.note(&a, 6), None);
        assert_eq!(
            gaps.note(&a, 9),
            Some(Gap {
                expected: 7,
                got: 9
            })
        );
        assert_eq!(gaps.note(&a, 10), None);
        // Late, not lost: no gap, and the highest stays.
        assert_eq!(gaps.note(&a, 8), None);
        assert_eq!(gaps.note(&a, 11), None);
        // Each sender has its own numbers.
        assert_eq!(gaps.note(&origin("b"), 100), None);
        assert_eq!(gaps.note(&a, 12), None);
    }

    #[test]
    fn the_senders_tracked_are_bounded() {
        let mut gaps = Gaps::default();
        for i in 0..MAX_TRACKED_SENDERS {
            gaps.note(&origin(&format!("s{i}")), 1);
        }
        assert_eq!(gaps.len(), MAX_TRACKED_SENDERS);
        // A known sender does not clear...
        assert_eq!(
            gaps.note(&origin("s0"), 3),
            Some(Gap {
                expected: 2,
                got: 3
            })
        );
        assert_eq!(gaps.len(), MAX_TRACKED_SENDERS);
        // ...a new one does: every other is forgotten.
        gaps.note(&origin("new"), 1);
        assert_eq!(gaps.len(), 1);
        assert_eq!(gaps.note(&origin("s0"), 9), None);
    }

    #[test]
    fn a_reconnect_forgets_in_best_effort_only() {
        let mut gaps = Gaps::default();
        let a = origin("a");
        gaps.note(&a, 1);
        gaps.on_reconnect(true);
        assert_eq!(
            gaps.note(&a, 3),
            Some(Gap {
                expected: 2,
                got: 3
            })
        );
        gaps.on_reconnect(false);
        assert_eq!(gaps.len(), 0);
        assert_eq!(gaps.note(&a, 7), None);
    }
}
