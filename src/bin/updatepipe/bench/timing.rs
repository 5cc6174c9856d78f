//! Clocks of the benchmark: CPU time, push-to-delivery latencies, an open-loop schedule, a
//! countdown of deliveries.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use tokio::sync::oneshot;

use super::report::Latency;

/// User and system CPU time of this process so far (all its threads).
pub(super) fn cpu_time() -> anyhow::Result<Duration> {
    use nix::sys::resource::{UsageWho, getrusage};
    let usage = getrusage(UsageWho::RUSAGE_SELF)?;
    let micros = |t: nix::sys::time::TimeVal| {
        Duration::from_secs(t.tv_sec().max(0) as u64)
            + Duration::from_micros(t.tv_usec().max(0) as u64)
    };
    Ok(micros(usage.user_time()) + micros(usage.system_time()))
}

/// Push-to-delivery times of updates that carry their send time (nanoseconds since the
/// origin, see `now`), in an HDR histogram.
#[derive(Clone)]
pub(super) struct Latencies {
    origin: Instant,
    histogram: Arc<std::sync::Mutex<Histogram<u64>>>,
}

impl Latencies {
    pub(super) fn new() -> anyhow::Result<Self> {
        Ok(Latencies {
            origin: Instant::now(),
            histogram: Arc::new(std::sync::Mutex::new(Histogram::new(3)?)),
        })
    }

    /// The time now, as a send time for an update to carry.
    pub(super) fn now(&self) -> u64 {
        self.origin.elapsed().as_nanos() as u64
    }

    /// Records the delivery, now, of an update sent at `sent`.
    pub(super) fn delivered(&self, sent: u64) {
        let micros = self.now().saturating_sub(sent) / 1_000;
        let _ = self
            .histogram
            .lock()
            .expect("histogram")
            .record(micros.max(1));
    }

    pub(super) fn summary(&self) -> Latency {
        Latency::of(&self.histogram.lock().expect("histogram"))
    }
}

/// Starts `send()` `n` times on a fixed schedule, `rate` a second, each in a task of its
/// own whatever earlier ones do (open loop); returns the schedule's start once all are done.
pub(super) async fn open_loop<F>(
    rate: u64,
    n: u64,
    mut send: impl FnMut() -> F,
) -> anyhow::Result<Instant>
where
    F: Future<Output = anyhow::Result<()>> + Send + 'static,
{
    let period = Duration::from_secs_f64(1.0 / rate as f64);
    let started = Instant::now();
    let mut sends = tokio::task::JoinSet::new();
    for i in 0..n {
        tokio::time::sleep_until((started + period.mul_f64(i as f64)).into()).await;
        sends.spawn(send());
        // Reap finished sends as we go so the set stays small.
        while let Some(done) = sends.try_join_next() {
            done??;
        }
    }
    while let Some(done) = sends.join_next().await {
        done??;
    }
    Ok(started)
}

/// Counts deliveries over many tasks (watches, sessions); the last one sends when it
/// happened.
pub(super) struct Countdown {
    left: AtomicU64,
    done: std::sync::Mutex<Option<oneshot::Sender<Instant>>>,
}

impl Countdown {
    pub(super) fn new(total: u64) -> (Arc<Countdown>, oneshot::Receiver<Instant>) {
        let (tx, rx) = oneshot::channel();
        let countdown = Countdown {
            left: AtomicU64::new(total),
            done: std::sync::Mutex::new(Some(tx)),
        };
        (Arc::new(countdown), rx)
    }

    pub(super) fn one(&self) {
        if self.left.fetch_sub(1, Ordering::AcqRel) == 1
            && let Some(done) = self.done.lock().expect("countdown").take()
        {
            let _ = done.send(Instant::now());
        }
    }
}
