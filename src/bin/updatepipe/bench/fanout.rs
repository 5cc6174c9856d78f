//! Fan-out: one pipe's 256 pushers heard by several listening pipes, in this process or
//! each in a process of its own (this binary again, in `bench --listen-child`).

use crate::output::outln;
use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;
use updatepipe::{Config, PgPipe, UpdatePipe};

use super::pipe::{heard_by, last_delivery, losses, pipe_listener, push_all};
use super::report::{Row, row};
use super::timing::cpu_time;

/// The pushers of every fan-out row.
const PUSHERS: usize = 256;

/// `listeners` pipes in this process hear the same `n` updates from 256 pushers (see
/// [`heard_by`]).
pub(super) async fn in_process(config: Config, n: u64, listeners: usize) -> anyhow::Result<Row> {
    let mut row = heard_by(config, n, PUSHERS, listeners).await?;
    row.listeners = Some(listeners);
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
    outln!("ready");
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
    outln!("{}", serde_json::to_string(&report)?);
    Ok(())
}

/// A listening process: killed if still running when dropped (a failed row leaves
/// nothing running).
pub(super) struct Listening(Child);

impl Drop for Listening {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The next `n` lines the listening processes print, within `within`.
pub(super) async fn lines(
    from: &mut mpsc::UnboundedReceiver<String>,
    n: usize,
    within: Duration,
) -> anyhow::Result<Vec<String>> {
    let read = async {
        let mut lines = Vec::with_capacity(n);
        while lines.len() < n {
            match from.recv().await {
                Some(line) => lines.push(line),
                None => anyhow::bail!("a listening process ended early"),
            }
        }
        Ok(lines)
    };
    tokio::time::timeout(within, read)
        .await
        .map_err(|_| anyhow::anyhow!("the listening processes did not answer within {within:?}"))?
}

/// Starts `processes` children (this binary, `bench --listen-child n` and `extra`) in the
/// benchmark's database on `config`'s channel; their standard output's lines come on the
/// receiver. `url` reaches the server as this process does; the children read it from
/// `DATABASE_URL`, not from their command line (which any local user may read).
pub(super) fn spawn_children(
    config: &Config,
    url: Option<&str>,
    n: u64,
    processes: usize,
    extra: &[&str],
) -> anyhow::Result<(Vec<Listening>, mpsc::UnboundedReceiver<String>)> {
    let exe = std::env::current_exe()?;
    let (tx, rx) = mpsc::unbounded_channel();
    let mut children = Vec::with_capacity(processes);
    for _ in 0..processes {
        let mut command = Command::new(&exe);
        command
            .arg("bench")
            .arg("--listen-child")
            .arg(n.to_string())
            .args(extra);
        command
            .arg("--child-channel")
            .arg(config.channel().as_str());
        if let Some(url) = url {
            command.env("DATABASE_URL", url);
        }
        if let Some(database) = config.pg().get_dbname() {
            command.arg("--child-database").arg(database);
        }
        let mut child = command
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()?;
        let out = child.stdout.take().expect("piped");
        children.push(Listening(child));
        // A thread of its own per child, not the runtime's blocking pool: it ends when its
        // child does, and nothing waits for it.
        let tx = tx.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
    }
    Ok((children, rx))
}

/// `processes` listening processes (this binary, `bench --listen-child`) hear the same `n`
/// updates; timed from the first push to the last delivery in any of them (`url`: see
/// [`spawn_children`]).
pub(super) async fn processes(
    config: Config,
    url: Option<String>,
    n: u64,
    processes: usize,
) -> anyhow::Result<Row> {
    let (children, mut rx) = spawn_children(&config, url.as_deref(), n, processes, &[])?;
    for line in lines(&mut rx, processes, Duration::from_secs(60)).await? {
        anyhow::ensure!(line.trim() == "ready", "a listening process said {line:?}");
    }
    let pusher = Arc::new(PgPipe::new(config)?);
    pusher.init_push().await?;
    let started = SystemTime::now();
    push_all(&pusher, n, PUSHERS).await?;
    let batches = pusher.stats().batches;
    pusher.close().await?;
    let reports = lines(&mut rx, processes, Duration::from_secs(180)).await?;
    let reports = reports
        .iter()
        .map(|line| serde_json::from_str(line))
        .collect::<Result<Vec<ChildReport>, _>>()?;
    drop(children);
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
