//! `updatepipe bench`: throughput and latency of the pipe, side by side with a raw
//! tokio-postgres baseline, measured end to end (from the first push to the last delivery)
//! in one run.

use crate::output::outln;
use indicatif::{ProgressBar, ProgressStyle};
use updatepipe::{ChannelName, Config, Layout, PgPipe};

mod fanout;
mod hub;
mod pipe;
mod raw;
mod report;
mod scratch;
mod timing;

use pipe::{Reading, backlog, paced, pipe, pipe_push_raw_listen, raw_push_pipe_listen};
use raw::{RawSend, envelope_payloads, raw, raw_paced, update_payloads};
use report::{Report, Row, print_table};
use timing::cpu_time;

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

    /// The pipe's bound on push transactions in flight at once (`PushOptions::with_max_in_flight`;
    /// default the library's, 1).
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u16).range(1..))]
    max_in_flight: Option<u16>,

    /// Transactions the raw batched baselines pipeline on their connection, whatever the
    /// pipe's bound (a hand-written batching pusher would pipeline too).
    #[arg(long, default_value_t = 4, value_name = "N",
          value_parser = clap::value_parser!(u16).range(1..))]
    raw_in_flight: u16,

    /// Internal: be one listening process of a fan-out row (count this many updates on
    /// --child-channel, then report).
    #[arg(long, hide = true, value_name = "N", requires = "child_channel")]
    listen_child: Option<u64>,

    /// Internal: the channel of --listen-child.
    #[arg(long, hide = true, value_name = "NAME")]
    child_channel: Option<String>,

    /// Internal: --listen-child opens that many idle hub watches instead, and reports the
    /// memory they take.
    #[arg(long, hide = true, requires = "listen_child")]
    idle_watches: bool,

    /// Internal: the database of --listen-child (the benchmark's own).
    #[arg(long, hide = true, value_name = "NAME", requires = "listen_child")]
    child_database: Option<String>,
}

impl BenchArgs {
    /// The child's count and channel, when this is a listening child of a fan-out row.
    pub fn listen_child(&self) -> Option<(u64, &str)> {
        Some((self.listen_child?, self.child_channel.as_deref()?))
    }
}

/// Runs a listening child of a fan-out row (see [`BenchArgs::listen_child`]), in the
/// benchmark's database.
pub async fn listen_child(
    config: Config,
    args: &BenchArgs,
    n: u64,
    channel: &str,
) -> anyhow::Result<()> {
    let config = match &args.child_database {
        Some(database) => config.with_database(database),
        None => config,
    };
    let config = config.with_channel(ChannelName::new(channel)?);
    if args.idle_watches {
        return hub::idle_child(config, n).await;
    }
    fanout::child(config, n).await
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
    url: Option<&str>,
    steps: &[(&str, Step)],
    rounds: u32,
    progress: &ProgressBar,
) -> anyhow::Result<Vec<Vec<Row>>> {
    let mut measured: Vec<Vec<Row>> = steps.iter().map(|_| Vec::new()).collect();
    for round in 1..=rounds {
        for ((name, step), runs) in steps.iter().zip(&mut measured) {
            progress.set_message(format!("{name} (round {round} of {rounds})"));
            let config = base
                .clone()
                .with_channel(channel("x")?)
                .with_push(|p| p.with_pool_size(4));
            runs.push(measure(config, url, *step).await?);
            progress.inc(1);
        }
    }
    Ok(measured)
}

/// The whole benchmark, in a database of its own on the server `base` reaches, dropped
/// after (see [`scratch`]). `url` reaches the server as `base` does, for the listening
/// processes of the fan-out rows (`None`: they find it in the environment as this one did).
pub async fn run(base: Config, url: Option<String>, args: BenchArgs) -> anyhow::Result<()> {
    // A reader of the report that goes away (`bench | head`) ends the run as a signal
    // does, but quietly: the database is dropped either way.
    let reader_gone = crate::output::wind_down_when_gone();
    let scratch = scratch::Scratch::create(&base).await?;
    let config = scratch.config(base);
    let result = tokio::select! {
        result = all_rows(config, url.as_deref(), args) => result,
        () = crate::signal::shutdown_signal() => Err(anyhow::anyhow!("interrupted")),
        () = reader_gone.notified() => Ok(()),
    };
    let dropped = scratch.drop().await;
    result.and(dropped)
}

async fn all_rows(base: Config, url: Option<&str>, args: BenchArgs) -> anyhow::Result<()> {
    let scale = |n: u64| ((n as f64 * args.scale).round() as u64).max(100);
    let rounds = args.rounds.max(1);
    let base = match args.max_in_flight {
        Some(n) => base.with_push(|p| p.with_max_in_flight(usize::from(n))),
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
        // The maddy layout: the same envelopes, and a copy of each update in maddy's form
        // on its mailbox's channel (256 mailboxes, no maddy node listening), in the same
        // statement.
        (
            "maddy layout, 1 pusher",
            Step::Maddy(per_round(20_000), 1),
            Some("pipe, 1 pusher"),
        ),
        (
            "maddy layout, 256 pushers",
            Step::Maddy(per_round(200_000), 256),
            Some("pipe, 256 pushers"),
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
        // One pipe's 256 pushers heard by several listening pipes: in this process, then
        // each in a process of its own.
        (
            "fan-out, 1 listener",
            Step::FanOut(per_round(300_000), 1),
            None,
        ),
        (
            "fan-out, 4 listeners",
            Step::FanOut(per_round(300_000), 4),
            None,
        ),
        (
            "fan-out, 16 listeners",
            Step::FanOut(per_round(150_000), 16),
            None,
        ),
        (
            "fan-out, 4 processes",
            Step::FanOutProcesses(per_round(300_000), 4),
            None,
        ),
        (
            "fan-out, 16 processes",
            Step::FanOutProcesses(per_round(150_000), 16),
            None,
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
        // A durable listener back from an absence: the catch-up rate of a backlog read
        // from the log (its own CPU only).
        (
            "durable backlog catch-up",
            Step::Backlog(per_round(300_000), Reading::Updates),
            None,
        ),
        // The same with each update's position as an event, then as a named consumer
        // acknowledging every one.
        (
            "durable backlog, positions",
            Step::Backlog(per_round(300_000), Reading::Positions),
            Some("durable backlog catch-up"),
        ),
        (
            "durable backlog, consumer acking",
            Step::Backlog(per_round(300_000), Reading::Acking),
            Some("durable backlog catch-up"),
        ),
        // The IDLE hub: the CPU it adds to delivering each update to one consumer (the
        // backlog's updates read by one watch per mailbox, against the plain events), then
        // one mailbox's updates fanned out to many watches, and an idle watch's memory.
        (
            "durable backlog, hub 1 watch",
            Step::Backlog(per_round(300_000), Reading::Hub(1)),
            Some("durable backlog, positions"),
        ),
        (
            "durable backlog, router 256",
            Step::Backlog(per_round(300_000), Reading::Router(256)),
            Some("durable backlog, positions"),
        ),
        (
            "durable backlog, hub 256 watches",
            Step::Backlog(per_round(300_000), Reading::Hub(256)),
            Some("durable backlog, router 256"),
        ),
        (
            "hub fan-out, 10 watches",
            Step::HubFanOut(per_round(100_000), 10, None),
            None,
        ),
        (
            "hub fan-out, 100 watches",
            Step::HubFanOut(per_round(20_000), 100, None),
            None,
        ),
        (
            "hub fan-out, 10,000 watches",
            Step::HubFanOut(per_round(300), 10_000, None),
            None,
        ),
        ("hub idle watches", Step::HubIdle(per_round(100_000)), None),
    ];
    let mut paced_rows: Vec<(&str, Step)> = vec![
        ("raw latency @1,000/s", Step::RawPaced(1_000, scale(5_000))),
        ("pipe latency @1,000/s", Step::Paced(1_000, scale(5_000))),
        ("pipe latency @10,000/s", Step::Paced(10_000, scale(50_000))),
        (
            "hub latency @1,000/s, 100 watches",
            Step::HubFanOut(scale(5_000), 100, Some(1_000)),
        ),
        (
            "hub latency @100/s, 10,000 watches",
            Step::HubFanOut(scale(500), 10_000, Some(100)),
        ),
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
    // The durable rows need the schema (in the benchmark's own database); apply it before
    // anything is timed.
    PgPipe::new(base.clone())?.migrate().await?;
    // Warm the server up (connections, caches) so that the first row is not penalized.
    raw(
        &base.clone().with_channel(channel("warmup")?),
        update_payloads(scale(5_000)),
        RawSend::Each,
    )
    .await?;
    let steps: Vec<(&str, Step)> = throughput.iter().map(|(n, s, _)| (*n, *s)).collect();
    let measured = in_rounds(&base, url, &steps, rounds, &progress).await?;
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
        let median = |of: fn(&Row) -> Option<f64>| {
            let mut values: Vec<f64> = runs.iter().filter_map(of).collect();
            values.sort_by(f64::total_cmp);
            values.get(values.len() / 2).copied()
        };
        let (cpu, per_delivery) = (
            median(|r| r.cpu_us_per_update),
            median(|r| r.cpu_us_per_delivery),
        );
        // Losses are summed over the rounds: one is one too many.
        let (dropped, resyncs) = (
            runs.iter().map(|r| r.dropped).sum(),
            runs.iter().map(|r| r.resyncs).sum(),
        );
        let mut row = runs.swap_remove(runs.len() / 2);
        row.cpu_us_per_update = cpu;
        row.cpu_us_per_delivery = per_delivery;
        (row.dropped, row.resyncs) = (dropped, resyncs);
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
    let paced = in_rounds(&base, url, &paced_rows, rounds, &progress).await?;
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
        max_in_flight: base.push_options().max_in_flight(),
        raw_in_flight,
        allocator: crate::ALLOCATOR,
        rows,
    };
    if args.json {
        outln!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print_table(&report);
    }
    Ok(())
}

/// Runs one step, and notes the CPU time this process spent on it per update (unless the
/// step measured its own), and in the fan-out rows per update delivered.
async fn measure(config: Config, url: Option<&str>, step: Step) -> anyhow::Result<Row> {
    let before = cpu_time()?;
    let mut row = run_step(config, url, step).await?;
    let spent = cpu_time()?.saturating_sub(before).as_secs_f64() * 1e6;
    let updates = row.updates as f64;
    row.cpu_us_per_update.get_or_insert(spent / updates);
    if let Some(listeners) = row.listeners {
        row.cpu_us_per_delivery =
            Some((spent + row.children_cpu_us) / (updates * listeners as f64));
    }
    Ok(row)
}

async fn run_step(config: Config, url: Option<&str>, step: Step) -> anyhow::Result<Row> {
    match step {
        Step::FanOut(n, listeners) => fanout::in_process(config, n, listeners).await,
        Step::FanOutProcesses(n, processes) => {
            fanout::processes(config, url.map(str::to_owned), n, processes).await
        }
        Step::Backlog(n, reading) => backlog(config, n, reading).await,
        Step::Raw(n, send) => raw(&config, update_payloads(n), send).await,
        Step::Sides(n, Sides::Raw) => raw(&config, envelope_payloads(n), RawSend::Each).await,
        Step::Sides(n, Sides::PipePush) => pipe_push_raw_listen(config, n).await,
        Step::Sides(n, Sides::PipeListen) => raw_push_pipe_listen(config, n).await,
        Step::Pipe(n, pushers) => pipe(config, n, pushers).await,
        Step::Durable(n, pushers) => pipe(config.with_durable(true), n, pushers).await,
        Step::Maddy(n, pushers) => pipe(config.with_layout(Layout::Maddy), n, pushers).await,
        Step::Signed(n, pushers) => {
            let secret = updatepipe::Secret::new(rand::random::<[u8; 32]>().to_vec())?;
            pipe(config.with_secrets(vec![secret]), n, pushers).await
        }
        Step::Paced(rate, n) => paced(config, rate, n).await,
        Step::HubFanOut(n, watches, rate) => hub::fan_out(config, n, watches, rate).await,
        Step::HubIdle(watches) => hub::idle(config, url, watches).await,
        Step::RawPaced(rate, n) => raw_paced(&config, rate, n).await,
    }
}

#[derive(Clone, Copy, Debug)]
enum Step {
    /// The baselines: plain tokio-postgres.
    Raw(u64, RawSend),
    Pipe(u64, usize),
    Durable(u64, usize),
    /// The maddy layout: a copy of every update on its mailbox's channel too.
    Maddy(u64, usize),
    /// Pushers and listener sign and check every envelope.
    Signed(u64, usize),
    Paced(u64, u64),
    /// The baseline of `Paced`: plain tokio-postgres, one notification per transaction on
    /// one connection, at the same pace.
    RawPaced(u64, u64),
    /// One sequential pusher with either side, or neither, the pipe's.
    Sides(u64, Sides),
    /// 256 pushers heard by several listening pipes in this process.
    FanOut(u64, usize),
    /// 256 pushers heard by several listening processes.
    FanOutProcesses(u64, usize),
    /// A durable listener's catch-up through a backlog, taking it as `Reading` says.
    Backlog(u64, Reading),
    /// The IDLE hub: updates of one mailbox to this many watches, as fast as they go or
    /// at a rate a second.
    HubFanOut(u64, usize, Option<u64>),
    /// The IDLE hub: this many idle watches, for their memory.
    HubIdle(u64),
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

async fn server_version(config: &Config) -> anyhow::Result<String> {
    let (client, connection) = config.pg().connect(config.tls_connector()?).await?;
    let task = tokio::spawn(connection);
    let version: String = client.query_one("SHOW server_version", &[]).await?.get(0);
    drop(client);
    let _ = task.await;
    Ok(version)
}
