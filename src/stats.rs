//! Counters the application can read: what the pipe pushed, delivered, dropped and rejected.
//! With the `metrics` feature, each also goes to the `metrics` facade as it changes, under
//! the names of [`METRICS`] (summed over the pipes of the process).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

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

/// The names the counters have in the `metrics` facade (feature `metrics`), Prometheus
/// style, with what each counts. `updatepipe_rejected_total` carries the reason as the
/// label `reason`.
pub const METRICS: [(&str, &str); 27] = [
    (
        "updatepipe_pushed_total",
        "updates pushed and committed (or handed to the caller's transaction)",
    ),
    (
        "updatepipe_batches_total",
        "push transactions committed by the pool-push path",
    ),
    (
        "updatepipe_delivered_total",
        "updates from other senders delivered to the application",
    ),
    (
        "updatepipe_echoes_dropped_total",
        "envelopes dropped because this process sent them",
    ),
    (
        "updatepipe_reconnects_total",
        "times the listener reconnected",
    ),
    (
        "updatepipe_disconnects_total",
        "times the listener lost its connection",
    ),
    (
        "updatepipe_replayed_total",
        "updates delivered from the durable log after a reconnect",
    ),
    (
        "updatepipe_resyncs_total",
        "times the application was told updates may have been missed",
    ),
    (
        "updatepipe_history_changes_total",
        "times a durable listener found the server's history no longer held what it had read \
         (a failover that lost commits, say), and started over from the present",
    ),
    (
        "updatepipe_resyncs_coalesced_total",
        "resyncs folded into one told shortly before or after (at most two a second per cause)",
    ),
    (
        "updatepipe_dropped_slow_consumer_total",
        "updates let go because the application was not reading",
    ),
    ("updatepipe_rejected_total", "payloads rejected, by reason"),
    (
        "updatepipe_maddy_copies_ignored_total",
        "maddy-form copies from updatepipe senders left (their envelopes carry the updates)",
    ),
    (
        "updatepipe_maddy_copies_unsent_total",
        "updates pushed without a maddy copy: their key cannot be a channel",
    ),
    ("updatepipe_watches", "IDLE hub watches open (PgPipe::hub)"),
    (
        "updatepipe_watch_delivered_total",
        "updates an IDLE hub queued for its watches (one per watch), lagged ones included",
    ),
    (
        "updatepipe_watch_lagged_total",
        "times an IDLE hub watch fell behind by its bound and was told to reload",
    ),
    (
        "updatepipe_watch_missed_total",
        "updates dropped from the backlog of IDLE hub watches that fell behind",
    ),
    (
        "updatepipe_push_duration_seconds",
        "time from a push call to its commit (histogram)",
    ),
    (
        "updatepipe_notification_queue_usage_ratio",
        "pg_notification_queue_usage(), 0 to 1, when last read",
    ),
    (
        "updatepipe_heartbeat_lag_seconds",
        "time a listener's own heartbeat took from its send to its arrival",
    ),
    (
        "updatepipe_queries_cancelled_total",
        "listener queries cancelled past their deadline that answered the cancel",
    ),
    (
        "updatepipe_log_pruned_total",
        "durable log entries this process pruned (older than the retention)",
    ),
    (
        "updatepipe_log_last_pruned_timestamp_seconds",
        "when this process last pruned the durable log (held the channel's pruning lock)",
    ),
    (
        "updatepipe_push_numbers_taken_total",
        "durable push batches refused: another role had written log rows at their numbers",
    ),
    (
        "updatepipe_push_queue_peak_pushes",
        "the most pool pushes that waited for a flight at once, in any pipe of the process",
    ),
    (
        "updatepipe_push_queue_peak_bytes",
        "the most encoded bytes of pool pushes that waited at once, in any pipe of the process",
    ),
];

/// Adds `n` to a counter of the `metrics` facade.
#[cfg(feature = "metrics")]
fn emit(name: &'static str, n: usize) {
    describe();
    metrics::counter!(name).increment(n as u64);
}

#[cfg(not(feature = "metrics"))]
fn emit(_: &'static str, _: usize) {}

/// Gives the `metrics` facade's recorder each metric's description and unit, and starts
/// every counter at zero (so that a scrape shows each series before its first event).
/// Call it once the recorder is installed; the pipe also calls it on its first record.
#[cfg(feature = "metrics")]
pub fn describe_metrics() {
    describe();
}

#[cfg(feature = "metrics")]
fn describe() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        for (name, help) in METRICS {
            if name == "updatepipe_rejected_total" {
                metrics::describe_counter!(name, help);
                for reason in REJECT_REASONS {
                    metrics::counter!(name, "reason" => reason).increment(0);
                }
            } else if name.ends_with("_total") {
                metrics::describe_counter!(name, help);
                metrics::counter!(name).increment(0);
            } else if name.ends_with("_duration_seconds") {
                metrics::describe_histogram!(name, metrics::Unit::Seconds, help);
            } else {
                metrics::describe_gauge!(name, help);
            }
        }
    });
}

/// Records how long one push took, from the call (`started`) to its commit.
pub(crate) fn push_latency(started: std::time::Instant) {
    #[cfg(feature = "metrics")]
    {
        describe();
        metrics::histogram!("updatepipe_push_duration_seconds")
            .record(started.elapsed().as_secs_f64());
    }
    #[cfg(not(feature = "metrics"))]
    let _ = started;
}

/// Records the notification queue's usage as last read.
pub(crate) fn queue_usage(usage: f64) {
    #[cfg(feature = "metrics")]
    {
        describe();
        metrics::gauge!("updatepipe_notification_queue_usage_ratio").set(usage);
    }
    #[cfg(not(feature = "metrics"))]
    let _ = usage;
}

/// Records the time a listener's own heartbeat took to come back to it.
pub(crate) fn heartbeat_lag(lag: std::time::Duration) {
    #[cfg(feature = "metrics")]
    {
        describe();
        metrics::gauge!("updatepipe_heartbeat_lag_seconds").set(lag.as_secs_f64());
    }
    #[cfg(not(feature = "metrics"))]
    let _ = lag;
}

/// Records a push queue depth: the facade's gauges keep the most of any pipe of the process.
#[cfg(feature = "metrics")]
fn push_queue_peak(pushes: u64, bytes: u64) {
    static PUSHES: AtomicU64 = AtomicU64::new(0);
    static BYTES: AtomicU64 = AtomicU64::new(0);
    describe();
    if PUSHES.fetch_max(pushes, Ordering::Relaxed) < pushes {
        metrics::gauge!("updatepipe_push_queue_peak_pushes").set(pushes as f64);
    }
    if BYTES.fetch_max(bytes, Ordering::Relaxed) < bytes {
        metrics::gauge!("updatepipe_push_queue_peak_bytes").set(bytes as f64);
    }
}

#[cfg(not(feature = "metrics"))]
fn push_queue_peak(_: u64, _: u64) {}

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
    resyncs_coalesced: AtomicU64,
    history_changes: AtomicU64,
    dropped: AtomicU64,
    cancelled: AtomicU64,
    queue_peak: AtomicU64,
    /// The last notification queue usage sampled, in millionths, plus one (0: none yet).
    queue_usage: AtomicU64,
    queue_peak_bytes: AtomicU64,
    log_pages: AtomicU64,
    log_page_rows_max: AtomicU64,
    log_page_bytes_max: AtomicU64,
    log_pages_cancelled: AtomicU64,
    pruned_entries: AtomicU64,
    /// When the log was last pruned, in milliseconds since the epoch, plus one (0: never).
    last_pruned: AtomicU64,
    prunes_skipped: AtomicU64,
    numbers_taken: AtomicU64,
    maddy_copies_ignored: AtomicU64,
    maddy_copies_unsent: AtomicU64,
    watches: AtomicU64,
    watch_delivered: AtomicU64,
    watch_lagged: AtomicU64,
    watch_missed: AtomicU64,
    rejected: [AtomicU64; REJECT_REASONS.len()],
    /// The listener polls the log instead of listening.
    polling: AtomicBool,
}

impl Counters {
    /// The listener polls the log instead of listening.
    pub(crate) fn polling(&self) {
        self.polling.store(true, Ordering::Relaxed);
    }

    pub(crate) fn pushed(&self, n: usize) {
        self.pushed.fetch_add(n as u64, Ordering::Relaxed);
        emit("updatepipe_pushed_total", n);
    }

    pub(crate) fn batch(&self) {
        self.batches.fetch_add(1, Ordering::Relaxed);
        emit("updatepipe_batches_total", 1);
    }

    pub(crate) fn delivered(&self, n: usize) {
        self.delivered.fetch_add(n as u64, Ordering::Relaxed);
        emit("updatepipe_delivered_total", n);
    }

    pub(crate) fn reconnect(&self) {
        self.reconnects.fetch_add(1, Ordering::Relaxed);
        emit("updatepipe_reconnects_total", 1);
    }

    pub(crate) fn disconnect(&self) {
        self.disconnects.fetch_add(1, Ordering::Relaxed);
        emit("updatepipe_disconnects_total", 1);
    }

    pub(crate) fn replayed(&self, n: usize) {
        self.replayed.fetch_add(n as u64, Ordering::Relaxed);
        emit("updatepipe_replayed_total", n);
    }

    pub(crate) fn resync(&self) {
        self.resyncs.fetch_add(1, Ordering::Relaxed);
        emit("updatepipe_resyncs_total", 1);
    }

    /// A durable reader's history was not the server's any more.
    pub(crate) fn history_changed(&self) {
        self.history_changes.fetch_add(1, Ordering::Relaxed);
        emit("updatepipe_history_changes_total", 1);
    }

    /// A resync was folded into one told shortly before or after.
    pub(crate) fn resync_coalesced(&self) {
        self.resyncs_coalesced.fetch_add(1, Ordering::Relaxed);
        emit("updatepipe_resyncs_coalesced_total", 1);
    }

    /// The log was pruned (the channel's pruning lock held): `deleted` entries removed.
    pub(crate) fn log_pruned(&self, deleted: u64) {
        self.pruned_entries.fetch_add(deleted, Ordering::Relaxed);
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        let ms = u64::try_from(now.as_millis()).unwrap_or(u64::MAX - 1);
        self.last_pruned.store(ms + 1, Ordering::Relaxed);
        emit("updatepipe_log_pruned_total", deleted as usize);
        #[cfg(feature = "metrics")]
        metrics::gauge!("updatepipe_log_last_pruned_timestamp_seconds").set(now.as_secs_f64());
    }

    /// Pruning found the channel's pruning lock held by another session.
    pub(crate) fn prune_skipped(&self) {
        self.prunes_skipped.fetch_add(1, Ordering::Relaxed);
    }

    /// The maddy layout: a copy for maddy nodes that another updatepipe sender sent (its
    /// envelope carries the update) was heard on a mailbox's channel and left.
    pub(crate) fn maddy_copy_ignored(&self) {
        self.maddy_copies_ignored.fetch_add(1, Ordering::Relaxed);
        emit("updatepipe_maddy_copies_ignored_total", 1);
    }

    /// The maddy layout: an update whose key cannot be a channel got no copy; how many so
    /// far, this one included.
    pub(crate) fn maddy_copy_unsent(&self) -> u64 {
        emit("updatepipe_maddy_copies_unsent_total", 1);
        self.maddy_copies_unsent.fetch_add(1, Ordering::Relaxed) + 1
    }

    /// A durable batch met log rows of another role's at its numbers.
    pub(crate) fn numbers_taken(&self) {
        self.numbers_taken.fetch_add(1, Ordering::Relaxed);
        emit("updatepipe_push_numbers_taken_total", 1);
    }

    /// The IDLE hub opened a watch.
    pub(crate) fn watch_opened(&self) {
        self.watches.fetch_add(1, Ordering::Relaxed);
        #[cfg(feature = "metrics")]
        {
            describe();
            metrics::gauge!("updatepipe_watches").increment(1.0);
        }
    }

    /// `n` IDLE hub watches went (dropped, or ended with their mailbox).
    pub(crate) fn watches_closed(&self, n: u64) {
        if n == 0 {
            return;
        }
        self.watches.fetch_sub(n, Ordering::Relaxed);
        #[cfg(feature = "metrics")]
        {
            describe();
            metrics::gauge!("updatepipe_watches").decrement(n as f64);
        }
    }

    /// What the IDLE hub's watches took: updates queued, lags told, updates dropped.
    pub(crate) fn watched(&self, delivered: u64, lagged: u64, missed: u64) {
        for (counter, name, n) in [
            (
                &self.watch_delivered,
                "updatepipe_watch_delivered_total",
                delivered,
            ),
            (&self.watch_lagged, "updatepipe_watch_lagged_total", lagged),
            (&self.watch_missed, "updatepipe_watch_missed_total", missed),
        ] {
            if n > 0 {
                counter.fetch_add(n, Ordering::Relaxed);
                emit(name, n as usize);
            }
        }
    }

    pub(crate) fn dropped(&self, n: usize) {
        self.dropped.fetch_add(n as u64, Ordering::Relaxed);
        emit("updatepipe_dropped_slow_consumer_total", n);
    }

    /// A page of the durable log was read: its rows and payload bytes.
    pub(crate) fn log_page(&self, rows: usize, bytes: usize) {
        self.log_pages.fetch_add(1, Ordering::Relaxed);
        self.log_page_rows_max
            .fetch_max(rows as u64, Ordering::Relaxed);
        self.log_page_bytes_max
            .fetch_max(bytes as u64, Ordering::Relaxed);
    }

    /// The server cancelled a page of the durable log read.
    pub(crate) fn log_page_cancelled(&self) {
        self.log_pages_cancelled.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn statement_cancelled(&self) {
        self.cancelled.fetch_add(1, Ordering::Relaxed);
        emit("updatepipe_queries_cancelled_total", 1);
    }

    /// The server's notification queue usage, as just sampled (0 to 1).
    pub(crate) fn queue_usage(&self, usage: f64) {
        let ppm = (usage.clamp(0.0, 1.0) * 1e6).round() as u64;
        self.queue_usage.store(ppm + 1, Ordering::Relaxed);
        queue_usage(usage);
    }

    /// The push queue is this deep now.
    pub(crate) fn queue_depth(&self, pushes: usize, bytes: usize) {
        let (pushes, bytes) = (pushes as u64, bytes as u64);
        let before = self.queue_peak.fetch_max(pushes, Ordering::Relaxed);
        let before_bytes = self.queue_peak_bytes.fetch_max(bytes, Ordering::Relaxed);
        if pushes > before || bytes > before_bytes {
            push_queue_peak(pushes, bytes);
        }
    }

    pub(crate) fn echo(&self) {
        self.echoes.fetch_add(1, Ordering::Relaxed);
        emit("updatepipe_echoes_dropped_total", 1);
    }

    pub(crate) fn rejected(&self, error: &DecodeError) {
        let reason = error.reason();
        let index = REJECT_REASONS
            .iter()
            .position(|r| *r == reason)
            .expect("every DecodeError reason is counted");
        self.rejected[index].fetch_add(1, Ordering::Relaxed);
        #[cfg(feature = "metrics")]
        {
            describe();
            metrics::counter!("updatepipe_rejected_total", "reason" => reason).increment(1);
        }
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
            resyncs_coalesced: self.resyncs_coalesced.load(Ordering::Relaxed),
            history_changes: self.history_changes.load(Ordering::Relaxed),
            dropped_slow_consumer: self.dropped.load(Ordering::Relaxed),
            queries_cancelled: self.cancelled.load(Ordering::Relaxed),
            push_queue_peak: self.queue_peak.load(Ordering::Relaxed),
            queue_usage_ppm: self.queue_usage.load(Ordering::Relaxed).checked_sub(1),
            push_queue_peak_bytes: self.queue_peak_bytes.load(Ordering::Relaxed),
            log_pages: self.log_pages.load(Ordering::Relaxed),
            log_page_rows_max: self.log_page_rows_max.load(Ordering::Relaxed),
            log_page_bytes_max: self.log_page_bytes_max.load(Ordering::Relaxed),
            log_pages_cancelled: self.log_pages_cancelled.load(Ordering::Relaxed),
            log_pruned: self.pruned_entries.load(Ordering::Relaxed),
            log_last_pruned: self
                .last_pruned
                .load(Ordering::Relaxed)
                .checked_sub(1)
                .map(|ms| std::time::UNIX_EPOCH + std::time::Duration::from_millis(ms)),
            log_prunes_skipped: self.prunes_skipped.load(Ordering::Relaxed),
            push_numbers_taken: self.numbers_taken.load(Ordering::Relaxed),
            maddy_copies_ignored: self.maddy_copies_ignored.load(Ordering::Relaxed),
            maddy_copies_unsent: self.maddy_copies_unsent.load(Ordering::Relaxed),
            watches: self.watches.load(Ordering::Relaxed),
            watch_delivered: self.watch_delivered.load(Ordering::Relaxed),
            watch_lagged: self.watch_lagged.load(Ordering::Relaxed),
            watch_missed: self.watch_missed.load(Ordering::Relaxed),
            rejected: REJECT_REASONS
                .iter()
                .zip(&self.rejected)
                .map(|(reason, n)| (*reason, n.load(Ordering::Relaxed)))
                .collect(),
            polling: self.polling.load(Ordering::Relaxed),
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
    /// Resyncs raised: times something happened after which updates may have been missed
    /// (each cause counted, whether or not it was told on its own).
    pub resyncs: u64,
    /// Resyncs folded into another: a flood of causes (forged references, say) is told at
    /// most twice a second per cause (see [`Event::Resync`](crate::Event::Resync)), the
    /// rest counted here.
    pub resyncs_coalesced: u64,
    /// Times a durable listener found that the server no longer held the history it had
    /// read ([`ResyncReason::HistoryChanged`](crate::ResyncReason::HistoryChanged)), and
    /// started over from the present.
    pub history_changes: u64,
    /// Updates let go because the application was not reading (best effort).
    pub dropped_slow_consumer: u64,
    /// Queries on the listener's connection cancelled past their deadline that answered
    /// the cancel (blocked, not dead: a lock on the log, say); each is retried without a
    /// reconnect.
    pub queries_cancelled: u64,
    /// The most pool pushes that waited for a flight at once (high-water mark; bounded by
    /// [`PushOptions::with_max_queued_pushes`](crate::PushOptions::with_max_queued_pushes)).
    pub push_queue_peak: u64,
    /// The most encoded bytes of pool pushes that waited for a flight at once.
    pub push_queue_peak_bytes: u64,
    /// The server's notification queue usage (`pg_notification_queue_usage()`) in
    /// millionths, as the listener last sampled it (every health interval); `None` before
    /// the first sample, or without a listener. See [`Stats::queue_usage`].
    pub queue_usage_ppm: Option<u64>,
    /// Pages of the durable log read (durable mode: one per wake-up, more during a
    /// catch-up).
    pub log_pages: u64,
    /// The most rows one page held: the log reader holds one page at a time, within
    /// [`ListenOptions::with_log_page_rows`](crate::ListenOptions::with_log_page_rows).
    pub log_page_rows_max: u64,
    /// The most payload bytes one page held (within
    /// [`ListenOptions::with_log_page_bytes`](crate::ListenOptions::with_log_page_bytes), but for a
    /// single larger row).
    pub log_page_bytes_max: u64,
    /// Pages the server cancelled (its `statement_timeout`), each read again smaller.
    pub log_pages_cancelled: u64,
    /// Durable log entries this pipe's listener pruned (older than the retention).
    pub log_pruned: u64,
    /// When this pipe's listener last pruned the log (that is, held the channel's pruning
    /// lock; pruning runs every tenth of the retention, between 1 s and 60 s); `None`
    /// before the first time.
    pub log_last_pruned: Option<std::time::SystemTime>,
    /// Times pruning found the channel's pruning lock held by another session (another
    /// listener pruning the channel at that moment; for long, a transaction that called
    /// `updatepipe.prune` left open).
    pub log_prunes_skipped: u64,
    /// Durable push batches refused because another role had written log rows at their
    /// numbers (squatting: [`Error::NumbersTaken`](crate::Error::NumbersTaken)).
    pub push_numbers_taken: u64,
    /// The maddy layout: payloads in maddy's form sent as an updatepipe sender (`updatepipe-…`)
    /// heard on a mailbox's channel and left (another updatepipe node's copy for maddy
    /// nodes, whose envelope on the pipe's channel carries the update; or one made up by
    /// whoever can `NOTIFY`).
    pub maddy_copies_ignored: u64,
    /// The maddy layout: updates pushed whose mailbox key cannot be a channel name (empty,
    /// or over 63 bytes): updatepipe nodes get them, maddy nodes no copy.
    pub maddy_copies_unsent: u64,
    /// IDLE hub watches open ([`PgPipe::hub`](crate::PgPipe::hub)).
    pub watches: u64,
    /// Updates the hub queued for its watches, one per watch (those a lagging watch
    /// dropped included).
    pub watch_delivered: u64,
    /// Times a watch fell behind by its bound
    /// ([`ReloadReason::Lagged`](crate::ReloadReason::Lagged) told).
    pub watch_lagged: u64,
    /// Updates dropped from the backlog of watches that fell behind: the watches received
    /// `watch_delivered - watch_missed`.
    pub watch_missed: u64,
    /// Payloads rejected, by reason (`unrecognized`, `unknown_version`, `malformed`,
    /// `invalid_update`, `too_large`, `over_limit`; with signing on also `unsigned`,
    /// `forged` and `replayed`).
    pub rejected: Vec<(&'static str, u64)>,
    /// Whether this pipe's listener reads the durable log every polling interval instead of
    /// listening ([`ListenOptions::with_polling`](crate::ListenOptions::with_polling)):
    /// its latency is that interval, and only durable updates reach it.
    pub polling: bool,
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
