//! Pacing of the warnings that senders can provoke (a rejected payload, a resync): a flood of
//! them must not flood the log.

use std::time::{Duration, Instant};

/// The shortest time between two warnings of a kind.
pub(super) const WARN_INTERVAL: Duration = Duration::from_secs(10);

/// Paces one kind of warning.
#[derive(Debug, Default)]
pub(super) struct Pacer {
    last: Option<Instant>,
    suppressed: u64,
}

impl Pacer {
    /// `Some(left out since the last warning)` when a warning is due now.
    pub(super) fn due(&mut self, now: Instant) -> Option<u64> {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_warning_per_interval_counting_the_rest() {
        let mut pacer = Pacer::default();
        let start = Instant::now();
        assert_eq!(pacer.due(start), Some(0));
        assert_eq!(pacer.due(start + Duration::from_secs(1)), None);
        assert_eq!(
            pacer.due(start + WARN_INTERVAL - Duration::from_millis(1)),
            None
        );
        assert_eq!(pacer.due(start + WARN_INTERVAL), Some(2));
        assert_eq!(pacer.due(start + WARN_INTERVAL), None);
        assert_eq!(pacer.due(start + 3 * WARN_INTERVAL), Some(1));
    }
}
