//! Fan-out: one pipe's 256 pushers heard by several listening pipes, in this process or
//! each in a process of its own (this binary again, in `bench --listen-child`).

use std::io::{BufRead, BufReader};
use std::process::{Child, ChildStdout, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use updatepipe::{Config, PgPipe, UpdatePipe};

use super::pipe::{last_delivery, losses, pipe_listener, push_all};
use super::report::{Row, row};
use super::timing::cpu_time;

/// The pushers of every fan-out row.
const PUSHERS: usize = 256;

/// `listeners` pipes in this process hear the same `n` updates; timed from the first push
/// to the last delivery to the last of them.
pub(super) async fn in_process(config: Config, n: u64, listeners: usize) -> anyhow::Result<Row> {
    let mut pipes = Vec::with_capacity(listeners);
    let mut counters = Vec::with_capacity(listeners);
    for _ in 0..listeners {
        let (listener, counter) = pipe_listener(&config, n, |_| {}).await?;
        pipes.push(listener);
        counters.push(counter);
    }
    let pusher = Arc::new(PgPipe::new(config)?);
    pusher.init_push().await?;
    let started = Instant::now();
    push_all(&pusher, n, PUSHERS).await?;
    let mut finished = started;
    for counter in counters {
        finished = finished.max(last_delivery(counter).await?);
    }
    let seconds = (finished - started).as_secs_f64();
    let batches = pusher.stats().batches;
    pusher.close().await?;
    let mut row = row(n, seconds, None, Some(batches));
    row.listeners = Some(listeners);
    for listener in pipes {
        let (dropped, resyncs) = losses(&listener);
        row.dropped += dropped;
        row.resyncs += resyncs;
        listener.close().await?;
    }
    Ok(row)
}

/// What a listening child process reports once it has heard every update.
#[derive(Debug, Serialize, Deserialize)]
pub(crate) struct ChildReport {
    /// When its last update arrived, in nanoseconds since the Unix epoch.
    finished_ns: u128,
    /// Its CPU time from listening to its last delivery, in microseconds.
    cpu_us: f64,
    dropped: u64,
    resyncs: u64,
}

/// A listening child: listens on the channel of `config`, says `ready` on standard output,
/// counts `n` updates, then prints its [`ChildReport`] as one JSON line and exits.
pub(crate) async fn child(config: Config, n: u64) -> anyhow::Result<()> {
    let (listener, counter) = pipe_listener(&config, n, |_| {}).await?;
    let before = cpu_time()?;
    println!("ready");
    last_delivery(counter).await?;
    let finished_ns = SystemTime::now().duration_since(UNIX_EPOCH)?.as_nanos();
    let cpu_us = cpu_time()?.saturating_sub(before).as_secs_f64() * 1e6;
    let (dropped, resyncs) = losses(&listener);
    listener.close().await?;
    let report = ChildReport {
        finished_ns,
        cpu_us,
        dropped,
        resyncs,
    };
    println!("{}", serde_json::to_string(&report)?);
    Ok(())
}

/// A listening process, and its standard output.
struct Listening {
    child: Child,
    out: BufReader<ChildStdout>,
}

impl Listening {
    /// The next line the child prints.
    fn line(&mut self) -> anyhow::Result<String> {
        let mut line = String::new();
        if self.out.read_line(&mut line)? == 0 {
            let status = self.child.wait()?;
            anyhow::bail!("a listening process ended early ({status})");
        }
        Ok(line)
    }
}

impl Drop for Listening {
    fn drop(&mut self) {
        // Ended already when it reported; otherwise (a failed row) not left running.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `processes` listening processes (this binary, `bench --listen-child`) hear the same `n`
/// updates; timed from the first push to the last delivery in any of them. `url` reaches
/// the server as this process does.
pub(super) async fn processes(
    config: Config,
    url: Option<String>,
    n: u64,
    processes: usize,
) -> anyhow::Result<Row> {
    let exe = std::env::current_exe()?;
    let channel = config.channel().as_str().to_owned();
    let mut children = tokio::task::spawn_blocking(move || {
        let mut children = Vec::with_capacity(processes);
        for _ in 0..processes {
            let mut command = Command::new(&exe);
            command
                .arg("bench")
                .arg("--listen-child")
                .arg(n.to_string());
            command.arg("--child-channel").arg(&channel);
            if let Some(url) = &url {
                command.arg("--url").arg(url);
            }
            let mut child = command
                .stdin(Stdio::null())
                .stdout(Stdio::piped())
                .stderr(Stdio::inherit())
                .spawn()?;
            let out = BufReader::new(child.stdout.take().expect("piped"));
            children.push(Listening { child, out });
        }
        for child in &mut children {
            let line = child.line()?;
            anyhow::ensure!(line.trim() == "ready", "a listening process said {line:?}");
        }
        Ok::<_, anyhow::Error>(children)
    })
    .await??;
    let pusher = Arc::new(PgPipe::new(config)?);
    pusher.init_push().await?;
    let started = SystemTime::now();
    push_all(&pusher, n, PUSHERS).await?;
    let batches = pusher.stats().batches;
    pusher.close().await?;
    let reports = tokio::task::spawn_blocking(move || {
        let mut reports = Vec::with_capacity(children.len());
        for child in &mut children {
            let report: ChildReport = serde_json::from_str(&child.line()?)?;
            child.child.wait()?;
            reports.push(report);
        }
        Ok::<_, anyhow::Error>(reports)
    });
    let reports = tokio::time::timeout(Duration::from_secs(180), reports)
        .await
        .map_err(|_| anyhow::anyhow!("the listening processes did not finish"))???;
    let started_ns = started.duration_since(UNIX_EPOCH)?.as_nanos();
    let finished_ns = reports
        .iter()
        .map(|r| r.finished_ns)
        .max()
        .unwrap_or(started_ns);
    let seconds = (finished_ns.saturating_sub(started_ns)) as f64 / 1e9;
    let mut row = row(n, seconds, None, Some(batches));
    row.listeners = Some(processes);
    row.dropped = reports.iter().map(|r| r.dropped).sum();
    row.resyncs = reports.iter().map(|r| r.resyncs).sum();
    row.children_cpu_us = reports.iter().map(|r| r.cpu_us).sum();
    Ok(row)
}
