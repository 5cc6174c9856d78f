//! Gap tracking: the last number heard from each sender's pool pushes, so that a skipped
//! number raises a resync in best-effort delivery.

use std::collections::{BTreeMap, HashMap};

use crate::origin::Origin;

/// The most senders whose numbers a listener tracks for gaps. Past it, a new sender takes the
/// place of another ([`Gaps::note`] says whose); a gap of a sender no longer tracked is not
/// seen.
pub(super) const MAX_TRACKED_SENDERS: usize = 10_000;

/// Numbers skipped by one sender: `expected` was due, `got` arrived.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct Gap {
    pub(super) expected: u64,
    pub(super) got: u64,
}

/// One tracked sender.
#[derive(Debug)]
struct Sender {
    last: u64,
    /// When it was last heard (a tick of [`Gaps`]): its key in `once` or `often`.
    heard: u64,
    /// Heard more than once.
    often: bool,
}

/// The last number seen from each sender's pool pushes (pushes in callers' transactions
/// may roll back or commit out of order, and are not tracked), for at most
/// [`MAX_TRACKED_SENDERS`] senders.
///
/// A flood of envelopes from new origins (anyone who can connect can send them without
/// signing) must not make the listener forget the senders it knows: when the map is full, a
/// new sender takes the place of the newest sender heard only once (a one-off origin, as a
/// flood's are), and only when every tracked sender was heard more than once, of the one
/// heard least recently.
#[derive(Debug, Default)]
pub(super) struct Gaps {
    senders: HashMap<Origin, Sender>,
    /// Senders heard once, by when: the newest goes first.
    once: BTreeMap<u64, Origin>,
    /// Senders heard more than once, by when last: the least recent goes first.
    often: BTreeMap<u64, Origin>,
    tick: u64,
}

impl Gaps {
    /// Notes a sender's pool-push number; `Some` when numbers between were skipped. A number
    /// lower than one seen (a later transaction committed first) is no gap.
    pub(super) fn note(&mut self, origin: &Origin, seq: u64) -> Option<Gap> {
        self.tick += 1;
        let tick = self.tick;
        if let Some(sender) = self.senders.get_mut(origin) {
            let from = if sender.often {
                &mut self.often
            } else {
                &mut self.once
            };
            let origin = from.remove(&sender.heard).unwrap_or_else(|| origin.clone());
            self.often.insert(tick, origin);
            sender.heard = tick;
            sender.often = true;
            if seq > sender.last.saturating_add(1) {
                let expected = sender.last.saturating_add(1);
                sender.last = seq;
                return Some(Gap { expected, got: seq });
            }
            sender.last = sender.last.max(seq);
            return None;
        }
        if self.senders.len() >= MAX_TRACKED_SENDERS {
            self.evict_one();
        }
        self.senders.insert(
            origin.clone(),
            Sender {
                last: seq,
                heard: tick,
                often: false,
            },
        );
        self.once.insert(tick, origin.clone());
        None
    }

    /// Makes room for one sender: the newest heard once, else the least recently heard.
    fn evict_one(&mut self) {
        let gone = match self.once.pop_last() {
            Some((_, origin)) => Some(origin),
            None => self.often.pop_first().map(|(_, origin)| origin),
        };
        if let Some(origin) = gone {
            self.senders.remove(&origin);
        }
    }

    /// After a reconnect in best effort, whatever was sent meanwhile is lost (and a resync
    /// says so): numbers from before prove nothing. In durable mode the numbers go on.
    pub(super) fn on_reconnect(&mut self, durable: bool) {
        if !durable {
            self.senders.clear();
            self.once.clear();
            self.often.clear();
        }
    }

    /// How many senders are tracked.
    #[cfg(test)]
    pub(super) fn len(&self) -> usize {
        debug_assert_eq!(self.senders.len(), self.once.len() + self.often.len());
        self.senders.len()
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
        for i in 0..MAX_TRACKED_SENDERS + 100 {
            gaps.note(&origin(&format!("s{i}")), 1);
            assert!(gaps.len() <= MAX_TRACKED_SENDERS);
        }
        assert_eq!(gaps.len(), MAX_TRACKED_SENDERS);
        // The first ones are still known; the newest one-offs made room for each other.
        assert_eq!(
            gaps.note(&origin("s0"), 3),
            Some(Gap {
                expected: 2,
                got: 3
            })
        );
        assert_eq!(
            gaps.note(&origin(&format!("s{}", MAX_TRACKED_SENDERS + 50)), 9),
            None
        );
        assert_eq!(gaps.len(), MAX_TRACKED_SENDERS);
    }

    #[test]
    fn a_flood_of_new_origins_does_not_hide_a_real_senders_gap() {
        let mut gaps = Gaps::default();
        let real = origin("real");
        assert_eq!(gaps.note(&real, 1), None);
        for i in 0..=MAX_TRACKED_SENDERS {
            gaps.note(&origin(&format!("flood{i}")), 1);
        }
        assert_eq!(
            gaps.note(&real, 3),
            Some(Gap {
                expected: 2,
                got: 3
            })
        );
        // A sender heard more than once is kept over any number of one-offs, too.
        for i in 0..3 * MAX_TRACKED_SENDERS {
            gaps.note(&origin(&format!("more{i}")), 1);
        }
        assert_eq!(
            gaps.note(&real, 5),
            Some(Gap {
                expected: 4,
                got: 5
            })
        );
        assert_eq!(gaps.len(), MAX_TRACKED_SENDERS);
    }

    #[test]
    fn when_every_sender_was_heard_often_the_least_recent_goes() {
        let mut gaps = Gaps::default();
        for i in 0..MAX_TRACKED_SENDERS {
            let o = origin(&format!("s{i}"));
            gaps.note(&o, 1);
            gaps.note(&o, 2);
        }
        // s0 heard again: s1 is now the least recent.
        gaps.note(&origin("s0"), 3);
        gaps.note(&origin("new"), 1);
        assert_eq!(gaps.len(), MAX_TRACKED_SENDERS);
        assert_eq!(gaps.note(&origin("s1"), 9), None, "s1 was forgotten");
        assert!(gaps.note(&origin("s0"), 9).is_some(), "s0 is still known");
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
