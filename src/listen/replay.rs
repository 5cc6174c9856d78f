//! The listener's defence against replayed signed notifications: which envelope numbers each
//! sender has used. (The signature and the time check are `sign`'s.)

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant};

use crate::error::{DecodeError, ReplayKind};
use crate::origin::Origin;

/// The most hole ranges remembered per sender (see [`ReplayGuard`]).
const MAX_HOLES: usize = 4096;

/// The most senders whose numbers a listener remembers at once.
const MAX_SENDERS: usize = 65_536;

/// Remembers which envelope numbers each sender has used, so that a signed envelope seen
/// once is refused the next time.
///
/// Per sender and number range (pool pushes and pushes in callers' transactions are numbered
/// apart), it keeps the highest number seen and the ranges below it not yet seen ("holes").
/// A number below the highest is accepted once if it falls in a hole. Holes are forgotten
/// two replay windows after they open, the oldest first when a sender has more than
/// [`MAX_HOLES`]; a forgotten hole only refuses more. A sender
/// is forgotten when not heard from for twice the window: by then its envelopes are refused
/// by their time anyway, even from a sender whose clock runs a whole window ahead. A new
/// sender's numbers below its first are one hole, so a transaction that commits after a
/// later one is not mistaken for a replay (the price: an envelope sent before this listener
/// first heard from its sender, and still within the window, is accepted once).
#[derive(Debug, Default)]
pub(crate) struct ReplayGuard {
    senders: HashMap<Origin, Sender>,
    /// When to look for quiet senders next.
    next_sweep: Option<Instant>,
}

/// One sender's numbers, per range: pool pushes, then pushes in callers' transactions.
#[derive(Debug, Default)]
struct Sender {
    ranges: [Option<Numbers>; 2],
}

impl Sender {
    /// When it was last heard from, in either range.
    fn seen(&self) -> Option<Instant> {
        self.ranges.iter().flatten().map(|n| n.seen).max()
    }
}

#[derive(Debug)]
struct Numbers {
    top: u64,
    seen: Instant,
    /// Unseen ranges below `top`: start → (end inclusive, when it opened).
    holes: BTreeMap<u64, (u64, Instant)>,
}

impl ReplayGuard {
    /// Accepts `seq` from `origin` (in the transactional range or not) if it was not seen
    /// before, and remembers it.
    pub(crate) fn check(
        &mut self,
        origin: &Origin,
        transactional: bool,
        seq: u64,
        now: Instant,
        window: Duration,
    ) -> Result<(), DecodeError> {
        if self.next_sweep.is_none_or(|at| now >= at) {
            self.forget_quiet(now, window);
            self.next_sweep = Some(now + window);
        }
        if !self.senders.contains_key(origin) {
            if self.senders.len() >= MAX_SENDERS {
                // Only holders of a secret get here; forget the quietest.
                if let Some(quiet) = self
                    .senders
                    .iter()
                    .min_by_key(|(_, sender)| sender.seen())
                    .map(|(origin, _)| origin.clone())
                {
                    self.senders.remove(&quiet);
                }
            }
            self.senders.insert(origin.clone(), Sender::default());
        }
        let sender = self.senders.get_mut(origin).expect("inserted above");
        let Some(numbers) = &mut sender.ranges[usize::from(transactional)] else {
            let mut holes = BTreeMap::new();
            if seq > 0 {
                holes.insert(0, (seq - 1, now));
            }
            sender.ranges[usize::from(transactional)] = Some(Numbers {
                top: seq,
                seen: now,
                holes,
            });
            return Ok(());
        };
        numbers.seen = now;
        // Holes open in number order as the top moves up, so the oldest come first. A hole
        // may still be filled two windows after it opened (its envelope was stamped up to a
        // window after the one that opened it, by a clock ahead, and is on time for one
        // window more); after that, anything filling it is refused by its time anyway.
        let expiry = window.saturating_mul(2);
        while let Some(entry) = numbers.holes.first_entry() {
            if now.duration_since(entry.get().1) <= expiry {
                break;
            }
            entry.remove();
        }
        if seq > numbers.top {
            if seq > numbers.top + 1 {
                numbers.holes.insert(numbers.top + 1, (seq - 1, now));
            }
            numbers.top = seq;
        } else {
            let Some((&start, &(end, opened))) = numbers.holes.range(..=seq).next_back() else {
                return Err(DecodeError::Replayed(ReplayKind::Number));
            };
            if seq > end {
                return Err(DecodeError::Replayed(ReplayKind::Number));
            }
            numbers.holes.remove(&start);
            if start < seq {
                numbers.holes.insert(start, (seq - 1, opened));
            }
            if seq < end {
                numbers.holes.insert(seq + 1, (end, opened));
            }
        }
        while numbers.holes.len() > MAX_HOLES {
            // The oldest goes: only refusing more.
            numbers.holes.pop_first();
        }
        Ok(())
    }

    /// Forgets the senders not heard from within twice `window`.
    pub(crate) fn forget_quiet(&mut self, now: Instant, window: Duration) {
        let quiet = window.saturating_mul(2);
        self.senders.retain(|_, sender| {
            sender
                .seen()
                .is_some_and(|seen| now.duration_since(seen) <= quiet)
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replay_guard_accepts_each_number_once_in_any_order() {
        let mut g = ReplayGuard::default();
        let o = Origin::parse("a").unwrap();
        let now = Instant::now();
        let w = Duration::from_secs(60);
        let mut check = |seq, tx| g.check(&o, tx, seq, now, w);
        let replay = Err(DecodeError::Replayed(ReplayKind::Number));
        check(10, false).unwrap();
        assert_eq!(check(10, false), replay);
        // Below the first: a late commit is accepted once.
        check(4, false).unwrap();
        assert_eq!(check(4, false), replay);
        check(14, false).unwrap();
        // Holes filled in any order, each once.
        for seq in [12, 11, 13] {
            check(seq, false).unwrap();
        }
        for seq in [11, 12, 13, 14] {
            assert_eq!(check(seq, false), replay);
        }
        // The other range has its own numbers.
        check(10, true).unwrap();
        assert_eq!(check(10, true), replay);
    }

    #[test]
    fn replay_guard_bounds_the_holes_of_a_sender() {
        let mut g = ReplayGuard::default();
        let o = Origin::parse("a").unwrap();
        let now = Instant::now();
        let w = Duration::from_secs(60);
        // Every other number below the first: each fill splits the initial hole.
        g.check(&o, false, 20_000, now, w).unwrap();
        for seq in (1..20_000).step_by(2) {
            g.check(&o, false, seq, now, w).unwrap();
        }
        let numbers = g.senders[&o].ranges[0].as_ref().unwrap();
        assert!(numbers.holes.len() <= MAX_HOLES);
    }

    #[test]
    fn replay_guard_forgets_only_what_the_time_check_covers() {
        let mut g = ReplayGuard::default();
        let o = Origin::parse("a").unwrap();
        let w = Duration::from_secs(60);
        let start = Instant::now();
        g.check(&o, false, 5, start, w).unwrap();
        g.check(&o, false, 8, start, w).unwrap();
        // Hole 6..7 is still open after one window (a clock ahead may stamp late)...
        g.check(&o, false, 6, start + Duration::from_secs(119), w)
            .unwrap();
        // ...and has expired after two: anything that could fill it is stale by now.
        let later = start + Duration::from_secs(121);
        assert!(g.check(&o, false, 7, later, w).is_err());
        g.forget_quiet(later + 2 * w - Duration::from_secs(1), w);
        assert_eq!(g.senders.len(), 1);
        g.forget_quiet(later + 2 * w + Duration::from_secs(1), w);
        assert!(g.senders.is_empty());
    }
}
