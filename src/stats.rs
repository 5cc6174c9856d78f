//! Counters the application can read: what the pipe pushed, delivered, dropped and rejected.

use std::sync::atomic::{AtomicU64, Ordering};

use crate::error::DecodeError;

/// The reasons a payload is rejected, as named by [`DecodeError::reason`].
const REJECT_REASONS: [&str; 9] = [
    "unrecognized",
    "unknown_version",
    "malformed",
    "invalid_update",
    "too_large",
    "over_limit",
    "unsigned",
    "forged",
    "replayed",
];

/// Live counters, shared between the pipe's handle and its tasks.
#[derive(Debug, Default)]
pub(crate) struct Counters {
    pushed: AtomicU64,
    batches: AtomicU64,
    delivered: AtomicU64,
    echoes: AtomicU64,
    reconnects: AtomicU64,
    disconnects: AtomicU64,
    replayed: AtomicU64,
    resyncs: AtomicU64,
    dropped: AtomicU64,
    cancelled: AtomicU64,
    queue_peak: AtomicU64,
    /// The last notification queue usage sampled, in millionths, plus one (0: none yet).
    queue_usage: AtomicU64,
    queue_peak_bytes: AtomicU64,
    rejected: [AtomicU64; REJECT_REASONS.len()],
}

impl Counters {
    pub(crate) fn pushed(&self, n: usize) {
        self.pushed.fetch_add(n as u64, Ordering::Relaxed);
    }

    pub(crate) fn batch(&self) {
        self.batches.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn delivered(&self, n: usize) {
        self.delivered.fetch_add(n as u64, Ordering::Relaxed);
    }

    pub(crate) fn reconnect(&self) {
        self.reconnects.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn disconnect(&self) {
        self.disconnects.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn replayed(&self, n: usize) {
        self.replayed.fetch_add(n as u64, Ordering::Relaxed);
    }

    pub(crate) fn resync(&self) {
        self.resyncs.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn dropped(&self, n: usize) {
        self.dropped.fetch_add(n as u64, Ordering::Relaxed);
    }

    pub(crate) fn statement_cancelled(&self) {
        self.cancelled.fetch_add(1, Ordering::Relaxed);
    }

    /// The server's notification queue usage, as just sampled (0 to 1).
    pub(crate) fn queue_usage(&self, usage: f64) {
        let ppm = (usage.clamp(0.0, 1.0) * 1e6).round() as u64;
        self.queue_usage.store(ppm + 1, Ordering::Relaxed);
    }

    /// The push queue is this deep now.
    pub(crate) fn queue_depth(&self, pushes: usize, bytes: usize) {
        self.queue_peak.fetch_max(pushes as u64, Ordering::Relaxed);
        self.queue_peak_bytes
            .fetch_max(bytes as u64, Ordering::Relaxed);
    }

    pub(crate) fn echo(&self) {
        self.echoes.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn rejected(&self, error: &DecodeError) {
        let reason = error.reason();
        let index = REJECT_REASONS
            .iter()
            .position(|r| *r == reason)
            .expect("every DecodeError reason is counted");
        self.rejected[index].fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn snapshot(&self) -> Stats {
        Stats {
            pushed: self.pushed.load(Ordering::Relaxed),
            batches: self.batches.load(Ordering::Relaxed),
            delivered: self.delivered.load(Ordering::Relaxed),
            echoes_dropped: self.echoes.load(Ordering::Relaxed),
            reconnects: self.reconnects.load(Ordering::Relaxed),
            disconnects: self.disconnects.load(Ordering::Relaxed),
            replayed: self.replayed.load(Ordering::Relaxed),
            resyncs: self.resyncs.load(Ordering::Relaxed),
            dropped_slow_consumer: self.dropped.load(Ordering::Relaxed),
            queries_cancelled: self.cancelled.load(Ordering::Relaxed),
            push_queue_peak: self.queue_peak.load(Ordering::Relaxed),
            queue_usage_ppm: self.queue_usage.load(Ordering::Relaxed).checked_sub(1),
            push_queue_peak_bytes: self.queue_peak_bytes.load(Ordering::Relaxed),
            rejected: REJECT_REASONS
                .iter()
                .zip(&self.rejected)
                .map(|(reason, n)| (*reason, n.load(Ordering::Relaxed)))
                .collect(),
        }
    }
}

/// A snapshot of a pipe's counters, from [`PgPipe::stats`](crate::PgPipe::stats).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct Stats {
    /// Updates this pipe pushed and saw committed (pool pushes) or handed to the caller's
    /// transaction (pushes inside it).
    pub pushed: u64,
    /// Transactions the pool-push path committed, each carrying one or more pushes.
    pub batches: u64,
    /// Updates from other senders handed to the listener's channel.
    pub delivered: u64,
    /// Envelopes dropped because this pipe sent them.
    pub echoes_dropped: u64,
    /// Times the listener reconnected after losing its connection.
    pub reconnects: u64,
    /// Times the listener lost its connection.
    pub disconnects: u64,
    /// Updates delivered from the durable log while catching up after a reconnect.
    pub replayed: u64,
    /// Resyncs raised: times the application was told updates may have been missed.
    pub resyncs: u64,
    /// Updates let go because the application was not reading (best effort).
    pub dropped_slow_consumer: u64,
    /// Queries on the listener's connection cancelled past their deadline that answered
    /// the cancel (blocked, not dead: a lock on the log, say); each is retried without a
    /// reconnect.
    pub queries_cancelled: u64,
    /// The most pool pushes that waited for a flight at once (high-water mark; bounded by
    /// [`Config::with_max_queued_pushes`](crate::Config::with_max_queued_pushes)).
    pub push_queue_peak: u64,
    /// The most encoded bytes of pool pushes that waited for a flight at once.
    pub push_queue_peak_bytes: u64,
    /// The server's notification queue usage (`pg_notification_queue_usage()`) in
    /// millionths, as the listener last sampled it (every health interval); `None` before
    /// the first sample, or without a listener. See [`Stats::queue_usage`].
    pub queue_usage_ppm: Option<u64>,
    /// Payloads rejected, by reason (`unrecognized`, `unknown_version`, `malformed`,
    /// `invalid_update`, `too_large`, `over_limit`; with signing on also `unsigned`,
    /// `forged` and `replayed`).
    pub rejected: Vec<(&'static str, u64)>,
}

impl Stats {
    /// The server's notification queue usage, from 0 to 1, as last sampled.
    pub fn queue_usage(&self) -> Option<f64> {
        self.queue_usage_ppm.map(|ppm| ppm as f64 / 1e6)
    }

    /// All rejected payloads, whatever the reason.
    pub fn rejected_total(&self) -> u64 {
        self.rejected.iter().map(|(_, n)| n).sum()
    }

    /// Rejected payloads for one reason (0 for an unknown reason).
    pub fn rejected_for(&self, reason: &str) -> u64 {
        self.rejected
            .iter()
            .find(|(r, _)| *r == reason)
            .map_or(0, |(_, n)| *n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_rejections_by_reason() {
        let c = Counters::default();
        c.rejected(&DecodeError::Unrecognized);
        c.rejected(&DecodeError::Unrecognized);
        c.rejected(&DecodeError::UnknownVersion(3));
        c.rejected(&DecodeError::TooLarge(9000));
        c.rejected(&DecodeError::Malformed(String::new()));
        c.rejected(&DecodeError::Update(
            crate::error::UpdateError::UnknownType(5),
        ));
        let s = c.snapshot();
        assert_eq!(s.rejected_for("unrecognized"), 2);
        assert_eq!(s.rejected_for("unknown_version"), 1);
        assert_eq!(s.rejected_total(), 6);
    }
}
