//! The library's counters and push latency through the `metrics` facade (feature
//! `metrics`), as an application with its own recorder sees them.

mod support;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use metrics::{
    Counter, CounterFn, Gauge, Histogram, HistogramFn, Key, KeyName, Metadata, Recorder,
    SharedString, Unit,
};
use support::{config_on, receive_exactly, unique};
use tokio::sync::mpsc;
use updatepipe::{PgPipe, SeqSet, Update, UpdatePipe};

/// Counters and histograms by name (labels written `name{k=v}`).
#[derive(Default)]
struct Captured {
    counters: Mutex<HashMap<String, Arc<Count>>>,
    histograms: Mutex<HashMap<String, Arc<Samples>>>,
}

#[derive(Default)]
struct Count(AtomicU64);

impl CounterFn for Count {
    fn increment(&self, value: u64) {
        self.0.fetch_add(value, Ordering::Relaxed);
    }

    fn absolute(&self, value: u64) {
        self.0.store(value, Ordering::Relaxed);
    }
}

#[derive(Default)]
struct Samples(Mutex<Vec<f64>>);

impl HistogramFn for Samples {
    fn record(&self, value: f64) {
        self.0.lock().unwrap().push(value);
    }
}

fn name(key: &Key) -> String {
    let labels: Vec<String> = key
        .labels()
        .map(|l| format!("{}={}", l.key(), l.value()))
        .collect();
    if labels.is_empty() {
        key.name().to_owned()
    } else {
        format!("{}{{{}}}", key.name(), labels.join(","))
    }
}

impl Recorder for Captured {
    fn describe_counter(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
    fn describe_gauge(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
    fn describe_histogram(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}

    fn register_counter(&self, key: &Key, _: &Metadata<'_>) -> Counter {
        let mut counters = self.counters.lock().unwrap();
        Counter::from_arc(counters.entry(name(key)).or_default().clone())
    }

    fn register_gauge(&self, _: &Key, _: &Metadata<'_>) -> Gauge {
        Gauge::noop()
    }

    fn register_histogram(&self, key: &Key, _: &Metadata<'_>) -> Histogram {
        let mut histograms = self.histograms.lock().unwrap();
        Histogram::from_arc(histograms.entry(name(key)).or_default().clone())
    }
}

impl Captured {
    fn counter(&self, name: &str) -> Option<u64> {
        let counters = self.counters.lock().unwrap();
        Some(counters.get(name)?.0.load(Ordering::Relaxed))
    }

    fn samples(&self, name: &str) -> Vec<f64> {
        let histograms = self.histograms.lock().unwrap();
        histograms
            .get(name)
            .map_or_else(Vec::new, |s| s.0.lock().unwrap().clone())
    }
}

// One thread (the default test runtime): every task of the pipes records into the local
// recorder of this thread.
#[tokio::test]
async fn counters_and_push_latency_reach_the_metrics_facade() {
    let captured = Captured::default();
    let _guard = metrics::set_default_local_recorder(&captured);
    let channel = unique("metrics");
    let listener = PgPipe::new(config_on(&channel)).unwrap();
    let (tx, mut rx) = mpsc::channel(16);
    listener.listen(tx).await.unwrap();
    let pusher = PgPipe::new(config_on(&channel)).unwrap();
    for uid in 1..=3 {
        let update = Update::new_message(7, SeqSet::single(uid).unwrap());
        pusher.push(&update).await.unwrap();
    }
    receive_exactly(&mut rx, 3).await;
    assert_eq!(captured.counter("updatepipe_pushed_total"), Some(3));
    assert_eq!(captured.counter("updatepipe_delivered_total"), Some(3));
    // Every counter starts at zero, the rejection reasons included.
    assert_eq!(
        captured.counter("updatepipe_rejected_total{reason=forged}"),
        Some(0)
    );
    let latencies = captured.samples("updatepipe_push_duration_seconds");
    assert_eq!(latencies.len(), 3, "{latencies:?}");
    assert!(
        latencies.iter().all(|s| *s > 0.0 && *s < 10.0),
        "{latencies:?}"
    );
    pusher.close().await.unwrap();
    listener.close().await.unwrap();
}
