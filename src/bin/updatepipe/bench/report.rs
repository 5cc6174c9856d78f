//! The benchmark's rows and how they are printed.

use crate::output::outln;
use hdrhistogram::Histogram;
use serde::Serialize;

/// One measured row.
#[derive(Debug, Serialize)]
pub(super) struct Row {
    pub(super) name: String,
    pub(super) updates: u64,
    pub(super) seconds: f64,
    pub(super) updates_per_sec: f64,
    /// The row this one is compared with, and the ratio of their rates (medians).
    pub(super) baseline: Option<String>,
    pub(super) ratio: Option<f64>,
    /// The median over rounds of this row's rate over the baseline's in the same round
    /// (run just before it): less swayed by the machine's drift between rounds.
    pub(super) paired_ratio: Option<f64>,
    /// CPU time this process (pushers, listener, their connections) spent per update,
    /// connecting and closing included; the server's is not counted. Steadier than the
    /// rate on a noisy machine.
    pub(super) cpu_us_per_update: Option<f64>,
    /// Push-to-delivery latency, in microseconds (paced rows): the round with the median
    /// p99.
    pub(super) latency_us: Option<Latency>,
    /// Each round's p99, lowest first (paced rows).
    pub(super) p99_rounds_us: Option<Vec<u64>>,
    pub(super) batches: Option<u64>,
    /// Updates the row's listening pipes let go as a slow consumer, and the resyncs they
    /// raised (summed over its listeners; the raw rows have no such counters).
    pub(super) dropped: u64,
    pub(super) resyncs: u64,
    /// Listening pipes (fan-out rows).
    pub(super) listeners: Option<usize>,
    /// CPU time per update delivered, every listener counted: this process's, and the
    /// listening processes' in the rows with several.
    pub(super) cpu_us_per_delivery: Option<f64>,
    /// The listening processes' CPU time, in microseconds (for `cpu_us_per_delivery`).
    #[serde(skip)]
    pub(super) children_cpu_us: f64,
    /// The slowest and fastest round's rate (throughput rows).
    pub(super) spread: Option<(f64, f64)>,
    /// The idle-watch row: resident memory per idle watch, in bytes.
    pub(super) idle_watch_bytes: Option<f64>,
}

#[derive(Debug, Serialize)]
pub(super) struct Latency {
    pub(super) p50: u64,
    pub(super) p99: u64,
    pub(super) p999: u64,
    pub(super) max: u64,
}

impl Latency {
    pub(super) fn of(h: &Histogram<u64>) -> Self {
        Latency {
            p50: h.value_at_quantile(0.50),
            p99: h.value_at_quantile(0.99),
            p999: h.value_at_quantile(0.999),
            max: h.max(),
        }
    }
}

#[derive(Debug, Serialize)]
pub(super) struct Report {
    pub(super) server_version: String,
    pub(super) cores: usize,
    pub(super) rounds: u32,
    /// The pipe's bound on push transactions in flight at once.
    pub(super) max_in_flight: usize,
    /// Transactions the raw batched baselines pipeline.
    pub(super) raw_in_flight: usize,
    /// The global allocator of this build: `mimalloc` (the tool's default) or `system`
    /// (what an application embedding the library gets unless it picks one).
    pub(super) allocator: &'static str,
    pub(super) rows: Vec<Row>,
}

pub(super) fn print_table(report: &Report) {
    outln!(
        "PostgreSQL {} on {} cores, {} allocator; updates/s delivered end to end (first push to \
         last delivery), median of {} rounds; pipe with up to {} push transactions in flight, \
         raw batched baselines pipelining {}\n",
        report.server_version,
        report.cores,
        report.allocator,
        report.rounds,
        report.max_in_flight,
        report.raw_in_flight
    );
    outln!(
        "{:<30} {:>9} {:>8} {:>12} {:>17} {:>8} {:>8} {:>7} {:>7} {:>7} {:>9}  {:<26}",
        "row",
        "updates",
        "seconds",
        "updates/s",
        "(slowest–fastest)",
        "batches",
        "vs base",
        "paired",
        "CPU µs",
        "/deliv",
        "lost/rsync",
        "latency p50/p99/p99.9/max"
    );
    for row in &report.rows {
        let percent =
            |r: Option<f64>| r.map_or_else(|| "-".to_owned(), |r| format!("{:.0}%", r * 100.0));
        let (ratio, paired) = (percent(row.ratio), percent(row.paired_ratio));
        let cpu = row
            .cpu_us_per_update
            .map_or_else(|| "-".to_owned(), |c| format!("{c:.2}"));
        let latency = row.latency_us.as_ref().map_or_else(
            || "-".to_owned(),
            |l| format!("{} / {} / {} / {} µs", l.p50, l.p99, l.p999, l.max),
        );
        let latency = match row.p99_rounds_us.as_deref() {
            Some([low, .., high]) => format!("{latency} (p99 {low}–{high})"),
            _ => latency,
        };
        let batches = row
            .batches
            .map_or_else(|| "-".to_owned(), |b| b.to_string());
        let spread = row.spread.map_or_else(
            || "-".to_owned(),
            |(low, high)| format!("{low:.0}–{high:.0}"),
        );
        let per_delivery = row
            .cpu_us_per_delivery
            .map_or_else(|| "-".to_owned(), |c| format!("{c:.2}"));
        let lost = format!("{}/{}", row.dropped, row.resyncs);
        outln!(
            "{:<30} {:>9} {:>8.2} {:>12.0} {:>17} {:>8} {:>8} {:>7} {:>7} {:>7} {:>9}  {:<26}",
            row.name,
            row.updates,
            row.seconds,
            row.updates_per_sec,
            spread,
            batches,
            ratio,
            paired,
            cpu,
            per_delivery,
            lost,
            latency
        );
    }
    for row in &report.rows {
        if let Some(bytes) = row.idle_watch_bytes {
            outln!(
                "\n{}: {bytes:.0} bytes of resident memory per idle watch",
                row.name
            );
        } else if row.name.starts_with("hub")
            && let Some(watches) = row.listeners
        {
            outln!(
                "\n{}: {:.0} deliveries/s ({watches} watches)",
                row.name,
                row.updates_per_sec * watches as f64
            );
        }
    }
    outln!(
        "\nvs base: the pipe's rate over the row it is compared with (1 pusher: raw \
         sequential; 16: raw batched 10/tx; 256: raw batched 100/tx; signed: the same pipe \
         row unsigned; sides: raw, envelopes; durable backlog, positions and consumer acking: \
         the plain catch-up, whose CPU µs is the listener's alone; durable backlog, hub 1 watch \
         and router 256 (listen_events and a hand-written router to 256 sessions): positions; \
         hub 256 watches: router 256), both medians.\npaired: the median of each \
         round's ratio to the baseline measured just before it in the same round.\nCPU µs: this \
         process's CPU time per update pushed (pushers, listeners, connections; not the \
         server's); /deliv: per update delivered, every listener counted (the listening \
         processes' too).\nlost/rsync: updates the listening pipes let go as slow consumers, \
         and the resyncs they raised (raw rows: none counted; hub rows: updates the watches \
         dropped behind their bound).\n\
         latency: the round with the median p99, and the lowest and highest p99 of the rounds; \
         paced rows are open loop (each push starts on schedule, whatever earlier ones do)."
    );
}

pub(super) fn row(n: u64, seconds: f64, latency: Option<Latency>, batches: Option<u64>) -> Row {
    Row {
        name: String::new(),
        updates: n,
        seconds,
        updates_per_sec: n as f64 / seconds,
        baseline: None,
        ratio: None,
        paired_ratio: None,
        cpu_us_per_update: None,
        latency_us: latency,
        p99_rounds_us: None,
        batches,
        dropped: 0,
        resyncs: 0,
        listeners: None,
        cpu_us_per_delivery: None,
        children_cpu_us: 0.0,
        spread: None,
        idle_watch_bytes: None,
    }
}
