//! `updatepipe bench`: throughput and latency of the pipe, side by side with a raw
//! tokio-postgres baseline, measured end to end (from the first push to the last delivery)
//! in one run.

use std::future::poll_fn;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use futures_util::future::try_join_all;
use futures_util::stream::FuturesOrdered;
use hdrhistogram::Histogram;
use indicatif::{ProgressBar, ProgressStyle};
use serde::Serialize;
use tokio::sync::{Notify, mpsc};
use tokio_postgres::AsyncMessage;
use tokio_postgres::types::ToSql;
use updatepipe::{ChannelName, Config, PgPipe, SeqSet, Update, UpdatePipe};

/// Options of `updatepipe bench`.
#[derive(clap::Args, Debug)]
pub struct BenchArgs {
    /// Print the results as one JSON document instead of a table.
    #[arg(long)]
    json: bool,

    /// Multiply every row's number of updates (and paced durations) by this factor.
    #[arg(long, default_value_t = 1.0, value_name = "FACTOR")]
    scale: f64,

    /// Run every row this many times, each baseline next to the row compared with it, and
    /// report the median (the machine's noise shows in the spread; for the latency rows, in
    /// the range of their p99).
    #[arg(long, default_value_t = 3, value_name = "N")]
    rounds: u32,

    /// Run only the rows whose name contains this text (repeat for several), with the
    /// baselines they are compared with.
    #[arg(long, value_name = "TEXT")]
    only: Vec<String>,

    /// The pipe's bound on push transactions in flight at once (`Config::with_max_in_flight`;
    /// default the library's, 1).
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u16).range(1..))]
    max_in_flight: Option<u16>,

    /// Transactions the raw batched baselines pipeline on their connection, whatever the
    /// pipe's bound (a hand-written batching pusher would pipeline too).
    #[arg(long, default_value_t = 2, value_name = "N",
          value_parser = clap::value_parser!(u16).range(1..))]
    raw_in_flight: u16,
}

/// One measured row.
#[derive(Debug, Serialize)]
struct Row {
    name: String,
    updates: u64,
    seconds: f64,
    updates_per_sec: f64,
    /// The row this one is compared with, and the ratio of their rates (medians).
    baseline: Option<String>,
    ratio: Option<f64>,
    /// The median over rounds of this row's rate over the baseline's in the same round
    /// (run just before it): less swayed by the machine's drift between rounds.
    paired_ratio: Option<f64>,
    /// CPU time this process (pushers, listener, their connections) spent per update,
    /// connecting and closing included; the server's is not counted. Steadier than the
    /// rate on a noisy machine.
    cpu_us_per_update: Option<f64>,
    /// Push-to-delivery latency, in microseconds (paced rows): the round with the median
    /// p99.
    latency_us: Option<Latency>,
    /// Each round's p99, lowest first (paced rows).
    p99_rounds_us: Option<Vec<u64>>,
    batches: Option<u64>,
    /// The slowest and fastest round's rate (throughput rows).
    spread: Option<(f64, f64)>,
}

#[derive(Debug, Serialize)]
struct Latency {
    p50: u64,
    p99: u64,
    p999: u64,
    max: u64,
}

impl Latency {
    fn of(h: &Histogram<u64>) -> Self {
        Latency {
            p50: h.value_at_quantile(0.50),
            p99: h.value_at_quantile(0.99),
            p999: h.value_at_quantile(0.999),
            max: h.max(),
        }
    }
}

#[derive(Debug, Serialize)]
struct Report {
    server_version: String,
    cores: usize,
    rounds: u32,
    /// The pipe's bound on push transactions in flight at once.
    max_in_flight: usize,
    /// Transactions the raw batched baselines pipeline.
    raw_in_flight: usize,
    rows: Vec<Row>,
}

/// A channel of the benchmark's own, fresh for each row.
fn channel(tag: &str) -> Result<ChannelName, updatepipe::Error> {
    ChannelName::new(format!(
        "updatepipe_bench_{tag}_{:08x}",
        rand::random::<u32>()
    ))
}

/// Runs every step `rounds` times, round by round (so in every round a baseline runs just
/// before the rows compared with it); each step's rows, in round order.
async fn in_rounds(
    base: &Config,
    steps: &[(&str, Step)],
    rounds: u32,
    progress: &ProgressBar,
) -> anyhow::Result<Vec<Vec<Row>>> {
    let mut measured: Vec<Vec<Row>> = steps.iter().map(|_| Vec::new()).collect();
    for round in 1..=rounds {
        for ((name, step), runs) in steps.iter().zip(&mut measured) {
            progress.set_message(format!("{name} (round {round} of {rounds})"));
            let config = base.clone().with_channel(channel("x")?).with_pool_size(4);
            runs.push(measure(config, *step).await?);
            progress.inc(1);
        }
    }
    Ok(measured)
}

/// The whole benchmark.
pub async fn run(base: Config, args: BenchArgs) -> anyhow::Result<()> {
    let scale = |n: u64| ((n as f64 * args.scale).round() as u64).max(100);
    let rounds = args.rounds.max(1);
    let base = match args.max_in_flight {
        Some(n) => base.with_max_in_flight(usize::from(n)),
        None => base,
    };
    let per_round = |n: u64| scale(n).div_ceil(u64::from(rounds)).max(100);
    let raw_in_flight = usize::from(args.raw_in_flight);
    let batched = |per_tx| RawSend::Batched {
        per_tx,
        in_flight: raw_in_flight,
    };
    // Each pipe row right after the baseline it is compared with, so both see the same
    // machine; all of it `rounds` times.
    let mut throughput: Vec<(&str, Step, Option<&str>)> = vec![
        (
            "raw sequential",
            Step::Raw(per_round(20_000), RawSend::Each),
            None,
        ),
        (
            "pipe, 1 pusher",
            Step::Pipe(per_round(20_000), 1),
            Some("raw sequential"),
        ),
        (
            "raw batched 10/tx",
            Step::Raw(per_round(200_000), batched(10)),
            None,
        ),
        (
            "pipe, 16 pushers",
            Step::Pipe(per_round(200_000), 16),
            Some("raw batched 10/tx"),
        ),
        (
            "raw batched 100/tx",
            Step::Raw(per_round(600_000), batched(100)),
            None,
        ),
        (
            "pipe, 256 pushers",
            Step::Pipe(per_round(600_000), 256),
            Some("raw batched 100/tx"),
        ),
        (
            "signed, 1 pusher",
            Step::Signed(per_round(20_000), 1),
            Some("pipe, 1 pusher"),
        ),
        (
            "signed, 256 pushers",
            Step::Signed(per_round(600_000), 256),
            Some("pipe, 256 pushers"),
        ),
        // Where a sequential pusher's cost lies: each side of the pipe against plain
        // tokio-postgres on the other, with the same envelopes on the wire.
        (
            "sides: raw, envelopes",
            Step::Sides(per_round(20_000), Sides::Raw),
            None,
        ),
        (
            "sides: pipe push only",
            Step::Sides(per_round(20_000), Sides::PipePush),
            Some("sides: raw, envelopes"),
        ),
        (
            "sides: pipe listen only",
            Step::Sides(per_round(20_000), Sides::PipeListen),
            Some("sides: raw, envelopes"),
        ),
        (
            "durable, 1 pusher",
            Step::Durable(per_round(3_000), 1),
            None,
        ),
        (
            "durable, 16 pushers",
            Step::Durable(per_round(30_000), 16),
            None,
        ),
        (
            "durable, 256 pushers",
            Step::Durable(per_round(200_000), 256),
            None,
        ),
    ];
    let mut paced_rows: Vec<(&str, Step)> = vec![
        ("raw latency @1,000/s", Step::RawPaced(1_000, scale(5_000))),
        ("pipe latency @1,000/s", Step::Paced(1_000, scale(5_000))),
        ("pipe latency @10,000/s", Step::Paced(10_000, scale(50_000))),
    ];
    if !args.only.is_empty() {
        let wanted = |name: &str| args.only.iter().any(|text| name.contains(text.as_str()));
        let baselines: Vec<&str> = throughput
            .iter()
            .filter(|(name, _, _)| wanted(name))
            .filter_map(|(_, _, baseline)| *baseline)
            .collect();
        throughput.retain(|(name, _, _)| wanted(name) || baselines.contains(name));
        paced_rows.retain(|(name, _)| wanted(name));
        if throughput.is_empty() && paced_rows.is_empty() {
            anyhow::bail!("no row's name contains {:?}", args.only);
        }
    }
    let steps = (throughput.len() + paced_rows.len()) as u64 * u64::from(rounds);
    let progress = if args.json {
        ProgressBar::hidden()
    } else {
        ProgressBar::new(steps)
    };
    progress.set_style(
        ProgressStyle::with_template("{bar:30} {pos}/{len} {msg}").expect("a valid template"),
    );
    let server_version = server_version(&base).await?;
    // The durable rows need the schema; apply it before anything is timed.
    PgPipe::new(base.clone())?.migrate().await?;
    // Warm the server up (connections, caches) so that the first row is not penalized.
    raw(
        &base.clone().with_channel(channel("warmup")?),
        update_payloads(scale(5_000)),
        RawSend::Each,
    )
    .await?;
    let steps: Vec<(&str, Step)> = throughput.iter().map(|(n, s, _)| (*n, *s)).collect();
    let measured = in_rounds(&base, &steps, rounds, &progress).await?;
    // Each round's rate over its baseline's in the same round, before the rounds are sorted.
    let rates: Vec<Vec<f64>> = measured
        .iter()
        .map(|runs| runs.iter().map(|r| r.updates_per_sec).collect())
        .collect();
    let paired = |row: usize, baseline: usize| {
        let mut ratios: Vec<f64> = rates[row]
            .iter()
            .zip(&rates[baseline])
            .map(|(rate, base)| rate / base)
            .collect();
        ratios.sort_by(f64::total_cmp);
        ratios[ratios.len() / 2]
    };
    let names: Vec<&str> = throughput.iter().map(|(name, _, _)| *name).collect();
    let mut rows: Vec<Row> = Vec::new();
    for (i, ((name, _, baseline), mut runs)) in throughput.into_iter().zip(measured).enumerate() {
        runs.sort_by(|a, b| a.updates_per_sec.total_cmp(&b.updates_per_sec));
        let spread = (
            runs[0].updates_per_sec,
            runs[runs.len() - 1].updates_per_sec,
        );
        let mut cpu: Vec<f64> = runs.iter().filter_map(|r| r.cpu_us_per_update).collect();
        cpu.sort_by(f64::total_cmp);
        let mut row = runs.swap_remove(runs.len() / 2);
        row.cpu_us_per_update = cpu.get(cpu.len() / 2).copied();
        row.name = name.to_owned();
        row.spread = Some(spread);
        // Rows are in the order of `names`, each baseline before the rows compared with it.
        if let Some(baseline) = baseline
            && let Some(j) = names.iter().position(|n| *n == baseline)
            && let Some(base_row) = rows.get(j)
        {
            row.ratio = Some(row.updates_per_sec / base_row.updates_per_sec);
            row.baseline = Some(baseline.to_owned());
            row.paired_ratio = Some(paired(i, j));
        }
        rows.push(row);
    }
    // The paced rows in rounds too: one 5-second window's tail is at the mercy of what
    // else the machine did in it.
    let paced = in_rounds(&base, &paced_rows, rounds, &progress).await?;
    for ((name, _), mut runs) in paced_rows.into_iter().zip(paced) {
        let p99 = |row: &Row| row.latency_us.as_ref().map_or(0, |l| l.p99);
        runs.sort_by_key(p99);
        let p99s = runs.iter().map(p99).collect();
        let mut row = runs.swap_remove(runs.len() / 2);
        row.name = name.to_owned();
        row.p99_rounds_us = Some(p99s);
        rows.push(row);
    }
    progress.finish_and_clear();
    let report = Report {
        server_version,
        cores: std::thread::available_parallelism().map_or(1, |n| n.get()),
        rounds,
        max_in_flight: base.max_in_flight(),
        raw_in_flight,
        rows,
    };
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print_table(&report);
    }
    Ok(())
}

/// Runs one step, and notes the CPU time this process spent on it per update.
async fn measure(config: Config, step: Step) -> anyhow::Result<Row> {
    let before = cpu_time()?;
    let mut row = run_step(config, step).await?;
    let spent = cpu_time()?.saturating_sub(before);
    row.cpu_us_per_update = Some(spent.as_secs_f64() * 1e6 / row.updates as f64);
    Ok(row)
}

/// User and system CPU time of this process so far (all its threads).
fn cpu_time() -> anyhow::Result<Duration> {
    use nix::sys::resource::{UsageWho, getrusage};
    let usage = getrusage(UsageWho::RUSAGE_SELF)?;
    let micros = |t: nix::sys::time::TimeVal| {
        Duration::from_secs(t.tv_sec().max(0) as u64)
            + Duration::from_micros(t.tv_usec().max(0) as u64)
    };
    Ok(micros(usage.user_time()) + micros(usage.system_time()))
}

async fn run_step(config: Config, step: Step) -> anyhow::Result<Row> {
    match step {
        Step::Raw(n, send) => raw(&config, update_payloads(n), send).await,
        Step::Sides(n, Sides::Raw) => raw(&config, envelope_payloads(n), RawSend::Each).await,
        Step::Sides(n, Sides::PipePush) => pipe_push_raw_listen(config, n).await,
        Step::Sides(n, Sides::PipeListen) => raw_push_pipe_listen(config, n).await,
        Step::Pipe(n, pushers) => pipe(config, n, pushers).await,
        Step::Durable(n, pushers) => pipe(config.with_durable(true), n, pushers).await,
        Step::Signed(n, pushers) => {
            let secret = updatepipe::Secret::new(rand::random::<[u8; 32]>().to_vec())?;
            pipe(config.with_secrets(vec![secret]), n, pushers).await
        }
        Step::Paced(rate, n) => paced(config, rate, n).await,
        Step::RawPaced(rate, n) => raw_paced(&config, rate, n).await,
    }
}

#[derive(Clone, Copy, Debug)]
enum Step {
    /// The baselines: plain tokio-postgres.
    Raw(u64, RawSend),
    Pipe(u64, usize),
    Durable(u64, usize),
    /// Pushers and listener sign and check every envelope.
    Signed(u64, usize),
    Paced(u64, u64),
    /// The baseline of `Paced`: plain tokio-postgres, one notification per transaction on
    /// one connection, at the same pace.
    RawPaced(u64, u64),
    /// One sequential pusher with either side, or neither, the pipe's.
    Sides(u64, Sides),
}

/// Which side of a sequential pusher's path is the pipe's; the other is plain
/// tokio-postgres, sending or parsing the same version 1 envelopes the pipe does.
#[derive(Clone, Copy, Debug)]
enum Sides {
    /// Neither: the baseline of the other two.
    Raw,
    PipePush,
    PipeListen,
}

fn print_table(report: &Report) {
    println!(
        "PostgreSQL {} on {} cores; updates/s delivered end to end (first push to last delivery), \
         median of {} rounds; pipe with up to {} push transactions in flight, raw batched \
         baselines pipelining {}\n",
        report.server_version,
        report.cores,
        report.rounds,
        report.max_in_flight,
        report.raw_in_flight
    );
    println!(
        "{:<24} {:>9} {:>8} {:>12} {:>17} {:>8} {:>8} {:>7} {:>8}  {:<26}",
        "row",
        "updates",
        "seconds",
        "updates/s",
        "(slowest–fastest)",
        "batches",
        "vs base",
        "paired",
        "CPU µs",
        "latency p50/p99/p99.9/max"
    );
    for row in &report.rows {
        let percent =
            |r: Option<f64>| r.map_or_else(|| "-".to_owned(), |r| format!("{:.0}%", r * 100.0));
        let (ratio, paired) = (percent(row.ratio), percent(row.paired_ratio));
        let cpu = row
            .cpu_us_per_update
            .map_or_else(|| "-".to_owned(), |c| format!("{c:.1}"));
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
        println!(
            "{:<24} {:>9} {:>8.2} {:>12.0} {:>17} {:>8} {:>8} {:>7} {:>8}  {:<26}",
            row.name,
            row.updates,
            row.seconds,
            row.updates_per_sec,
            spread,
            batches,
            ratio,
            paired,
            cpu,
            latency
        );
    }
    println!(
        "\nvs base: the pipe's rate over the row it is compared with (1 pusher: raw \
         sequential; 16: raw batched 10/tx; 256: raw batched 100/tx; signed: the same pipe \
         row unsigned; sides: raw, envelopes), both medians.\npaired: the median of each \
         round's ratio to the baseline measured just before it in the same round.\nCPU µs: this \
         process's CPU time per update (pushers, listener, connections; not the server's).\n\
         latency: the round with the median p99, and the lowest and highest p99 of the rounds; \
         paced rows are open loop (each push starts on schedule, whatever earlier ones do)."
    );
}

async fn server_version(config: &Config) -> anyhow::Result<String> {
    let (client, connection) = config.pg().connect(config.tls_connector()?).await?;
    let task = tokio::spawn(connection);
    let version: String = client.query_one("SHOW server_version", &[]).await?.get(0);
    drop(client);
    let _ = task.await;
    Ok(version)
}

/// A plain tokio-postgres listener that parses each notification's JSON and counts it.
struct RawListener {
    count: Arc<AtomicU64>,
    reached: Arc<Notify>,
    task: tokio::task::JoinHandle<()>,
}

impl RawListener {
    /// Listens on the channel, handing each payload to `on_payload`.
    async fn start(
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
                            let _ = ready.take().expect("once").send(done.map_err(|e| e.to_string()));
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

    async fn wait(&self, target: u64) -> anyhow::Result<()> {
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
async fn raw(config: &Config, payloads: Vec<String>, send: RawSend) -> anyhow::Result<Row> {
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
async fn on_worker<T: Send + 'static>(
    pushes: impl Future<Output = anyhow::Result<T>> + Send + 'static,
) -> anyhow::Result<T> {
    tokio::spawn(pushes).await?
}

/// What a hand-written listener does at least: parse the JSON.
fn parse_json(payload: &str) {
    let parsed = serde_json::from_str::<serde_json::Value>(payload);
    std::hint::black_box(parsed.is_ok());
}

/// Each update's JSON as the payload, unique per notification (a hand-written pipe would
/// send at least that).
fn update_payloads(n: u64) -> Vec<String> {
    (0..n)
        .map(|i| format!(r#"{{"Type":0,"Key":{},"SeqSet":"{}"}}"#, i % 256, i + 1))
        .collect()
}

/// The version 1 envelopes the pipe sends for the same updates, one per notification,
/// numbered from 1 by a sender of their own (so a pipe listener accepts them).
fn envelope_payloads(n: u64) -> Vec<String> {
    let origin = format!("{:032x}", rand::random::<u128>());
    let pid = std::process::id();
    (0..n)
        .map(|i| {
            format!(
                r#"{{"v":1,"o":"{origin}","p":{pid},"s":{},"u":[{{"Type":0,"Key":{},"SeqSet":"{}"}}]}}"#,
                i + 1,
                i % 256,
                i + 1
            )
        })
        .collect()
}

/// A plain tokio-postgres pusher on a connection of its own, its statements prepared.
struct RawPusher {
    client: tokio_postgres::Client,
    channel: String,
    connection: tokio::task::JoinHandle<Result<(), tokio_postgres::Error>>,
    one: tokio_postgres::Statement,
    many: tokio_postgres::Statement,
}

/// How a raw pusher sends.
#[derive(Clone, Copy, Debug)]
enum RawSend {
    /// One notification per transaction, each sent once the one before has committed
    /// (the sequential baseline; the paced row overlaps such sends from tasks of their
    /// own).
    Each,
    /// `per_tx` notifications per transaction (one statement over an array), up to
    /// `in_flight` transactions pipelined on the connection.
    Batched { per_tx: usize, in_flight: usize },
}

impl RawPusher {
    async fn connect(config: &Config) -> anyhow::Result<Self> {
        let (client, connection) = config.pg().connect(config.tls_connector()?).await?;
        let connection = tokio::spawn(connection);
        let one = client.prepare("SELECT pg_notify($1, $2)").await?;
        // As the pipe's flusher does: one statement per transaction, over an array.
        let many = client
            .prepare("SELECT pg_notify($1, p) FROM unnest($2::text[]) WITH ORDINALITY AS t(p, n) ORDER BY n")
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
    async fn send_on_worker(
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

    async fn send(&self, payloads: &[String], send: RawSend) -> anyhow::Result<()> {
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

    async fn close(self) {
        drop(self.client);
        let _ = self.connection.await;
    }
}

/// The pipe's pushes, one at a time, to a plain tokio-postgres listener.
async fn pipe_push_raw_listen(config: Config, n: u64) -> anyhow::Result<Row> {
    let listener = RawListener::start(&config, n, parse_json).await?;
    let pusher = PgPipe::new(config)?;
    pusher.init_push().await?;
    let started = Instant::now();
    let pusher = on_worker(async move {
        for i in 0..n {
            pusher.push(&numbered(i % 256, i)?).await?;
        }
        Ok(pusher)
    })
    .await?;
    listener.wait(n).await?;
    let seconds = started.elapsed().as_secs_f64();
    pusher.close().await?;
    Ok(row(n, seconds, None, None))
}

/// Plain tokio-postgres pushes of the pipe's envelopes, one at a time, to a pipe listener.
async fn raw_push_pipe_listen(config: Config, n: u64) -> anyhow::Result<Row> {
    let (listener, counter) = pipe_listener(&config, n, |_| {}).await?;
    let payloads = envelope_payloads(n);
    let pusher = RawPusher::connect(&config).await?;
    let started = Instant::now();
    let (pusher, _payloads) = pusher.send_on_worker(payloads, RawSend::Each).await?;
    let finished = last_delivery(counter).await?;
    let seconds = (finished - started).as_secs_f64();
    pusher.close().await;
    listener.close().await?;
    Ok(row(n, seconds, None, None))
}

/// Push-to-delivery latency of plain tokio-postgres at a paced rate: what the server and
/// the machine allow, to read the pipe's latency against. Open loop like the pipe's row
/// (overlapping sends pipeline on the one connection). Each payload carries its send time
/// as its key.
async fn raw_paced(config: &Config, rate: u64, n: u64) -> anyhow::Result<Row> {
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

/// Push-to-delivery times of updates that carry their send time (nanoseconds since the
/// origin, see `now`), in an HDR histogram.
#[derive(Clone)]
struct Latencies {
    origin: Instant,
    histogram: Arc<std::sync::Mutex<Histogram<u64>>>,
}

impl Latencies {
    fn new() -> anyhow::Result<Self> {
        Ok(Latencies {
            origin: Instant::now(),
            histogram: Arc::new(std::sync::Mutex::new(Histogram::new(3)?)),
        })
    }

    /// The time now, as a send time for an update to carry.
    fn now(&self) -> u64 {
        self.origin.elapsed().as_nanos() as u64
    }

    /// Records the delivery, now, of an update sent at `sent`.
    fn delivered(&self, sent: u64) {
        let micros = self.now().saturating_sub(sent) / 1_000;
        let _ = self
            .histogram
            .lock()
            .expect("histogram")
            .record(micros.max(1));
    }

    fn summary(&self) -> Latency {
        Latency::of(&self.histogram.lock().expect("histogram"))
    }
}

/// Starts `send()` `n` times on a fixed schedule, `rate` a second, each in a task of its
/// own whatever earlier ones do (open loop); returns the schedule's start once all are done.
async fn open_loop<F>(rate: u64, n: u64, mut send: impl FnMut() -> F) -> anyhow::Result<Instant>
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

fn row(n: u64, seconds: f64, latency: Option<Latency>, batches: Option<u64>) -> Row {
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
        spread: None,
    }
}

/// Starts a pipe listening on the channel and a task that counts what it delivers.
async fn pipe_listener(
    config: &Config,
    n: u64,
    on_update: impl Fn(&Update) + Send + 'static,
) -> anyhow::Result<(PgPipe, tokio::task::JoinHandle<Option<Instant>>)> {
    let listener = PgPipe::new(config.clone())?;
    let (tx, mut rx) = mpsc::channel(65_536);
    listener.listen(tx).await?;
    let counter = tokio::spawn(async move {
        let mut seen = 0;
        while let Some(update) = rx.recv().await {
            on_update(&update);
            seen += 1;
            if seen == n {
                return Some(Instant::now());
            }
        }
        None
    });
    Ok((listener, counter))
}

/// When the counting task of [`pipe_listener`] saw its last update.
async fn last_delivery(
    counter: tokio::task::JoinHandle<Option<Instant>>,
) -> anyhow::Result<Instant> {
    tokio::time::timeout(Duration::from_secs(120), counter)
        .await
        .map_err(|_| anyhow::anyhow!("deliveries did not complete"))??
        .ok_or_else(|| anyhow::anyhow!("the listener stopped early"))
}

/// The `i`-th new-message update (from 0) of a pusher for mailbox `key`: UIDs count from 1.
fn numbered(key: u64, i: u64) -> Result<Update, updatepipe::Error> {
    let uid = u32::try_from(i % u64::from(u32::MAX)).unwrap_or(1) + 1;
    Ok(Update::new_message(key, SeqSet::single(uid)?))
}

/// The pipe with `pushers` concurrent tasks, each pushing its share one update at a time.
async fn pipe(config: Config, n: u64, pushers: usize) -> anyhow::Result<Row> {
    if config.durable() {
        PgPipe::new(config.clone())?.migrate().await?;
    }
    let (listener, counter) = pipe_listener(&config, n, |_| {}).await?;
    let pusher = Arc::new(PgPipe::new(config)?);
    pusher.init_push().await?;
    let started = Instant::now();
    let each = n / pushers as u64;
    let extra = n % pushers as u64;
    let tasks = (0..pushers as u64).map(|key| {
        let pusher = pusher.clone();
        let count = each + u64::from(key < extra);
        tokio::spawn(async move {
            for i in 0..count {
                pusher.push(&numbered(key, i)?).await?;
            }
            Ok::<_, updatepipe::Error>(())
        })
    });
    for result in try_join_all(tasks).await? {
        result?;
    }
    let finished = last_delivery(counter).await?;
    let seconds = (finished - started).as_secs_f64();
    let batches = pusher.stats().batches;
    pusher.close().await?;
    listener.close().await?;
    Ok(row(n, seconds, None, Some(batches)))
}

/// Open-loop latency: pushes start on a fixed schedule whatever earlier pushes do; each
/// update carries its push time (nanoseconds since the start) as its mailbox key.
async fn paced(config: Config, rate: u64, n: u64) -> anyhow::Result<Row> {
    let latencies = Latencies::new()?;
    let recorder = latencies.clone();
    let (listener, counter) = pipe_listener(&config, n, move |update| {
        if let updatepipe::MailboxKey::Id(sent) = update.key() {
            recorder.delivered(*sent);
        }
    })
    .await?;
    let pusher = Arc::new(PgPipe::new(config)?);
    pusher.init_push().await?;
    let started = open_loop(rate, n, || {
        let (pusher, latencies) = (pusher.clone(), latencies.clone());
        async move {
            let sent = latencies.now();
            pusher
                .push(&Update::new_message(sent, SeqSet::single(1)?))
                .await?;
            Ok(())
        }
    })
    .await?;
    let finished = last_delivery(counter).await?;
    let seconds = (finished - started).as_secs_f64();
    let batches = pusher.stats().batches;
    pusher.close().await?;
    listener.close().await?;
    Ok(row(n, seconds, Some(latencies.summary()), Some(batches)))
}
