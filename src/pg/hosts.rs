//! Which hosts of a configuration failed to connect lately: they are tried last for a
//! while ([`HOST_RECHECK`]), as pgjdbc's `hostRecheckSeconds` does, so that a host that
//! accepts TCP and never answers (or refuses, or is a standby where a primary is wanted)
//! costs its connect timeout once, not on every connect of the pool and the listener.
//!
//! Shared by every clone of a configuration's [`Server`](super::Server): the listener's
//! connects, the pool's and `status` learn from each other. Each connect still tries every
//! host (a host tried last is tried all the same), and the configured order holds among
//! the hosts that did not fail (with `load_balance_hosts=random`, the shuffled order).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// How long a host that failed to connect is tried after the others.
pub(crate) const HOST_RECHECK: Duration = Duration::from_secs(30);

/// When each host (by its `host:port` label) last failed to connect.
#[derive(Clone, Debug, Default)]
pub(crate) struct HostMemory(Arc<Mutex<HashMap<String, Instant>>>);

impl HostMemory {
    /// `server` failed to connect at `now`.
    pub(crate) fn failed(&self, server: &str, now: Instant) {
        self.lock().insert(server.to_owned(), now);
    }

    /// `server` answered: tried in its place again.
    pub(crate) fn answered(&self, server: &str) {
        self.lock().remove(server);
    }

    /// `targets`, the hosts that failed within [`HOST_RECHECK`] of `now` moved last, each
    /// group in its order.
    pub(crate) fn order<T>(
        &self,
        targets: Vec<T>,
        label: impl Fn(&T) -> &str,
        now: Instant,
    ) -> Vec<T> {
        let failed = self.lock();
        order(targets, |t| failed.get(label(t)).copied(), now)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Instant>> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// `targets`, those whose last failure (`failed_at`) is within [`HOST_RECHECK`] of `now`
/// moved last, each group in its order.
fn order<T>(targets: Vec<T>, failed_at: impl Fn(&T) -> Option<Instant>, now: Instant) -> Vec<T> {
    let (recent, others): (Vec<T>, Vec<T>) = targets.into_iter().partition(|t| {
        failed_at(t).is_some_and(|at| now.saturating_duration_since(at) < HOST_RECHECK)
    });
    others.into_iter().chain(recent).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(memory: &HostMemory, now: Instant) -> Vec<&'static str> {
        memory.order(vec!["a:5432", "b:5432", "c:5432"], |t| t, now)
    }

    #[test]
    fn a_host_that_failed_lately_is_tried_last_then_in_its_place_again() {
        let memory = HostMemory::default();
        let now = Instant::now();
        assert_eq!(labels(&memory, now), ["a:5432", "b:5432", "c:5432"]);
        memory.failed("a:5432", now);
        assert_eq!(labels(&memory, now), ["b:5432", "c:5432", "a:5432"]);
        // Shared by clones.
        let clone = memory.clone();
        clone.failed("b:5432", now + Duration::from_secs(1));
        assert_eq!(
            labels(&memory, now + Duration::from_secs(1)),
            ["c:5432", "a:5432", "b:5432"]
        );
        // Past the recheck time: in its place again.
        assert_eq!(
            labels(&memory, now + HOST_RECHECK),
            ["a:5432", "c:5432", "b:5432"]
        );
        memory.answered("b:5432");
        assert_eq!(
            labels(&memory, now + Duration::from_secs(2)),
            ["b:5432", "c:5432", "a:5432"]
        );
    }

    #[test]
    fn when_every_host_failed_the_order_holds() {
        let memory = HostMemory::default();
        let now = Instant::now();
        for host in ["c:5432", "a:5432", "b:5432"] {
            memory.failed(host, now);
        }
        assert_eq!(labels(&memory, now), ["a:5432", "b:5432", "c:5432"]);
    }
}
