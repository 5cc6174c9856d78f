//! The baselines: plain tokio-postgres pushing and listening, as a hand-written pipe would.

use std::future::poll_fn;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use futures_util::stream::FuturesOrdered;
use tokio::sync::Notify;
use tokio_postgres::AsyncMessage;
use tokio_postgres::types::ToSql;
use updatepipe::Config;

use super::report::{Row, row};
use super::timing::{Latencies, open_loop};

/// A plain tokio-postgres listener that parses each notification's JSON and counts it.
pub(super) struct RawListener {
    count: Arc<AtomicU64>,
    reached: Arc<Notify>,
    task: tokio::task::JoinHandle<()>,
}

impl RawListener {
    /// Listens on the channel, handing each payload to `on_payload`.
    pub(super) async fn start(
        config: &Config,
        target: u64,
        on_payload: impl Fn(&str) + Send + 'static,
    ) -> anyhow::Result<Self> {
        let (client, mut connection) = config.pg().connect(config.tls_connector()?).await?;
        let count = Arc::new(AtomicU64::new(0));
        let reached = Arc::new(Notify::new());
        let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
        let listen = format!("LISTEN {}", config.channel().quoted());
        let task = {
            let count = count.clone();
            let reached = reached.clone();
            tokio::spawn(async move {
                let mut ready = Some(ready_tx);
                let subscribe = client.batch_execute(&listen);
                let mut subscribe = std::pin::pin!(subscribe);
                loop {
                    tokio::select! {
                        done = &mut subscribe, if ready.is_some() => {
                            let done = done.map_err(|e| e.to_string());
                            let _ = ready.take().expect("once").send(done);
                        }
                        message = poll_fn(|cx| connection.poll_message(cx)) => match message {
                            Some(Ok(AsyncMessage::Notification(n))) => {
                                on_payload(n.payload());
                                if count.fetch_add(1, Ordering::Relaxed) + 1 == target {
                                    reached.notify_one();
                                }
                            }
                            Some(Ok(_)) => {}
                            _ => break,
                        },
                    }
                }
            })
        };
        ready_rx.await?.map_err(anyhow::Error::msg)?;
        Ok(RawListener {
            count,
            reached,
            task,
        })
    }

    pub(super) async fn wait(&self, target: u64) -> anyhow::Result<()> {
        let waiting = self.reached.notified();
        if self.count.load(Ordering::Relaxed) >= target {
            return Ok(());
        }
        tokio::time::timeout(Duration::from_secs(120), waiting)
            .await
            .map_err(|_| {
                anyhow::anyhow!(
                    "only {} of {target} notifications arrived",
                    self.count.load(Ordering::Relaxed)
                )
            })
    }
}

impl Drop for RawListener {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The baseline: plain tokio-postgres sending as `send` says, and a listener that parses
/// each payload's JSON and counts it.
pub(super) async fn raw(
    config: &Config,
    payloads: Vec<String>,
    send: RawSend,
) -> anyhow::Result<Row> {
    let n = payloads.len() as u64;
    let listener = RawListener::start(config, n, parse_json).await?;
    let pusher = RawPusher::connect(config).await?;
    let started = Instant::now();
    let (pusher, _payloads) = pusher.send_on_worker(payloads, send).await?;
    listener.wait(n).await?;
    let seconds = started.elapsed().as_secs_f64();
    pusher.close().await;
    Ok(row(n, seconds, None, None))
}

/// Runs a row's pushes in a task of their own, as the pipe rows' pushers run: not on the
/// thread that drives the bench itself (the runtime's `block_on` thread, outside the
/// worker pool), whose wake-ups cost differently.
pub(super) async fn on_worker<T: Send + 'static>(
    pushes: impl Future<Output = anyhow::Result<T>> + Send + 'static,
) -> anyhow::Result<T> {
    tokio::spawn(pushes).await?
}

/// What a hand-written listener does at least: parse the JSON.
pub(super) fn parse_json(payload: &str) {
    let parsed = serde_json::from_str::<serde_json::Value>(payload);
    std::hint::black_box(parsed.is_ok());
}

/// Each update's JSON as the payload, unique per notification (a hand-written pipe would
/// send at least that).
pub(super) fn update_payloads(n: u64) -> Vec<String> {
    (0..n)
        .map(|i| format!(r#"{{"Type":0,"Key":{},"SeqSet":"{}"}}"#, i % 256, i + 1))
        .collect()
}

/// The version 1 envelopes the pipe sends for the same updates, one per notification,
/// numbered from 1 by a sender of their own (so a pipe listener accepts them).
pub(super) fn envelope_payloads(n: u64) -> Vec<String> {
    let origin = format!("{:032x}", rand::random::<u128>());
    let pid = std::process::id();
    (0..n)
        .map(|i| {
            format!(
                concat!(
                    r#"{{"v":1,"o":"{origin}","p":{pid},"s":{},"#,
                    r#""u":[{{"Type":0,"Key":{},"SeqSet":"{}"}}]}}"#
                ),
                i + 1,
                i % 256,
                i + 1,
                origin = origin,
                pid = pid,
            )
        })
        .collect()
}

/// A plain tokio-postgres pusher on a connection of its own, its statements prepared.
pub(super) struct RawPusher {
    client: tokio_postgres::Client,
    channel: String,
    connection: tokio::task::JoinHandle<Result<(), tokio_postgres::Error>>,
    one: tokio_postgres::Statement,
    many: tokio_postgres::Statement,
}

/// How a raw pusher sends.
#[derive(Clone, Copy, Debug)]
pub(super) enum RawSend {
    /// One notification per transaction, each sent once the one before has committed
    /// (the sequential baseline; the paced row overlaps such sends from tasks of their
    /// own).
    Each,
    /// `per_tx` notifications per transaction (one statement over an array), up to
    /// `in_flight` transactions pipelined on the connection.
    Batched { per_tx: usize, in_flight: usize },
}

impl RawPusher {
    pub(super) async fn connect(config: &Config) -> anyhow::Result<Self> {
        let (client, connection) = config.pg().connect(config.tls_connector()?).await?;
        let connection = tokio::spawn(connection);
        let one = client
            .prepare("SELECT pg_catalog.pg_notify($1, $2)")
            .await?;
        // As the pipe's flusher does: one statement per transaction, over an array.
        let many = client
            .prepare(
                "SELECT pg_catalog.pg_notify($1, t.p) \
                 FROM pg_catalog.unnest($2::pg_catalog.text[]) WITH ORDINALITY AS t(p, n) \
                 ORDER BY t.n",
            )
            .await?;
        Ok(RawPusher {
            client,
            channel: config.channel().as_str().to_owned(),
            connection,
            one,
            many,
        })
    }

    /// `send` from a task of its own (see [`on_worker`]); gives the payloads back, so that
    /// the caller frees them after its timing, as it made them before.
    pub(super) async fn send_on_worker(
        self,
        payloads: Vec<String>,
        send: RawSend,
    ) -> anyhow::Result<(Self, Vec<String>)> {
        on_worker(async move {
            self.send(&payloads, send).await?;
            Ok((self, payloads))
        })
        .await
    }

    pub(super) async fn send(&self, payloads: &[String], send: RawSend) -> anyhow::Result<()> {
        let RawSend::Batched { per_tx, in_flight } = send else {
            for payload in payloads {
                self.client
                    .execute(&self.one, &[&self.channel, payload])
                    .await?;
            }
            return Ok(());
        };
        let chunks: Vec<&[String]> = payloads.chunks(per_tx).collect();
        let params: Vec<[&(dyn ToSql + Sync); 2]> = chunks
            .iter()
            .map(|chunk| [&self.channel as &(dyn ToSql + Sync), chunk])
            .collect();
        let mut out = FuturesOrdered::new();
        for params in &params {
            if out.len() == in_flight
                && let Some(done) = out.next().await
            {
                done?;
            }
            out.push_back(self.client.execute(&self.many, params));
        }
        while let Some(done) = out.next().await {
            done?;
        }
        Ok(())
    }

    pub(super) async fn close(self) {
        drop(self.client);
        let _ = self.connection.await;
    }
}

/// Push-to-delivery latency of plain tokio-postgres at a paced rate: what the server and
/// the machine allow, to read the pipe's latency against. Open loop like the pipe's row
/// (overlapping sends pipeline on the one connection). Each payload carries its send time
/// as its key.
pub(super) async fn raw_paced(config: &Config, rate: u64, n: u64) -> anyhow::Result<Row> {
    let latencies = Latencies::new()?;
    let recorder = latencies.clone();
    let listener = RawListener::start(config, n, move |payload| {
        let sent = serde_json::from_str::<serde_json::Value>(payload)
            .ok()
            .and_then(|v| v["Key"].as_u64());
        if let Some(sent) = sent {
            recorder.delivered(sent);
        }
    })
    .await?;
    let pusher = Arc::new(RawPusher::connect(config).await?);
    let started = open_loop(rate, n, || {
        let (pusher, latencies) = (pusher.clone(), latencies.clone());
        async move {
            let sent = latencies.now();
            let payload = format!(r#"{{"Type":0,"Key":{sent},"SeqSet":"1"}}"#);
            pusher.send(&[payload], RawSend::Each).await
        }
    })
    .await?;
    listener.wait(n).await?;
    let seconds = started.elapsed().as_secs_f64();
    if let Ok(pusher) = Arc::try_unwrap(pusher) {
        pusher.close().await;
    }
    Ok(row(n, seconds, Some(latencies.summary()), None))
}
