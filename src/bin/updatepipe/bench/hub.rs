//! The IDLE hub's rows: one update fanned out to many watches, its latency from push to
//! watch, the CPU it adds to a delivery, and what an idle watch costs.

use std::sync::Arc;
use std::time::Instant;

use tokio::task::JoinSet;
use updatepipe::{Config, Hub, HubOptions, MailboxEvent, PgPipe, SeqSet, Update, UpdatePipe};

use super::report::{Latency, Row, row};
use super::timing::{Countdown, open_loop};

/// The mailbox every fan-out watch watches.
const KEY: u64 = 7;

/// Pushers of the unpaced fan-out rows.
const PUSHERS: u64 = 64;

/// The update pushed `sent_us` microseconds after `origin` (its UID carries the time).
fn timed(origin: Instant) -> anyhow::Result<Update> {
    let sent_us = u32::try_from(origin.elapsed().as_micros()).unwrap_or(u32::MAX - 1) + 1;
    Ok(Update::new_message(KEY, SeqSet::single(sent_us)?))
}

/// `watches` watches of one mailbox hear `n` updates each, pushed by 64 pushers as fast
/// as they go (`rate` unset) or on an open-loop schedule of `rate` a second; timed from the
/// first push to the last delivery to the last watch. Its latency is from each push to
/// each watch's `recv` (every watch, every update); its losses are what the watches
/// dropped when they fell behind (their bound is `n`: none should) and the pipe's resyncs.
pub(super) async fn fan_out(
    config: Config,
    n: u64,
    watches: usize,
    rate: Option<u64>,
) -> anyhow::Result<Row> {
    let server = PgPipe::new(config.clone())?;
    let bound = usize::try_from(n)?.max(1);
    let hub = server
        .hub(HubOptions::default().with_watch_bound(bound))
        .await?;
    let (countdown, finished) = Countdown::new(n * watches as u64);
    let origin = Instant::now();
    let mut readers = JoinSet::new();
    for _ in 0..watches {
        let mut watch = hub.watch(KEY).await?;
        let countdown = countdown.clone();
        readers.spawn(async move {
            let mut latencies = Vec::with_capacity(usize::try_from(n).unwrap_or(0));
            while latencies.len() < latencies.capacity() {
                match watch.recv().await {
                    Some(MailboxEvent::Update(update)) => {
                        let sent = update.seq_set().as_single().unwrap_or(0);
                        let now = u32::try_from(origin.elapsed().as_micros()).unwrap_or(0);
                        latencies.push(now.saturating_sub(sent).max(1));
                        countdown.one();
                    }
                    Some(MailboxEvent::Reload(_)) => {}
                    None => break,
                }
            }
            latencies
        });
    }
    let pusher = Arc::new(PgPipe::new(config)?);
    pusher.init_push().await?;
    let started = Instant::now();
    match rate {
        None => {
            let mut pushers = JoinSet::new();
            for p in 0..PUSHERS {
                let pusher = pusher.clone();
                let count = n / PUSHERS + u64::from(p < n % PUSHERS);
                pushers.spawn(async move {
                    for _ in 0..count {
                        pusher.push(&timed(origin)?).await?;
                    }
                    anyhow::Ok(())
                });
            }
            while let Some(done) = pushers.join_next().await {
                done??;
            }
        }
        Some(rate) => {
            open_loop(rate, n, || {
                let pusher = pusher.clone();
                async move {
                    pusher.push(&timed(origin)?).await?;
                    Ok(())
                }
            })
            .await?;
        }
    }
    let finished = tokio::time::timeout(std::time::Duration::from_secs(120), finished)
        .await
        .map_err(|_| anyhow::anyhow!("the watches' deliveries did not complete"))??;
    let mut histogram = hdrhistogram::Histogram::<u64>::new(3)?;
    while let Some(latencies) = readers.join_next().await {
        for latency in latencies? {
            histogram.record(u64::from(latency))?;
        }
    }
    let seconds = (finished - started).as_secs_f64();
    let batches = pusher.stats().batches;
    pusher.close().await?;
    let stats = server.stats();
    let mut row = row(n, seconds, Some(Latency::of(&histogram)), Some(batches));
    row.listeners = Some(watches);
    row.dropped = stats.watch_missed + stats.dropped_slow_consumer;
    row.resyncs = stats.resyncs;
    hub.close().await?;
    server.close().await?;
    Ok(row)
}

/// `watches` idle watches over 1,000 mailboxes, opened in a process of their own (this
/// binary, `bench --listen-child N --idle-watches`) so that the memory freed by earlier
/// rows does not hide theirs: its resident memory before and after opening them, per
/// watch (the hub's entry, the watch's queue and handle; no task reads them). The row's
/// rate is watches opened a second.
pub(super) async fn idle(config: Config, url: Option<&str>, watches: u64) -> anyhow::Result<Row> {
    let (children, mut lines) =
        super::fanout::spawn_children(&config, url, watches, 1, &["--idle-watches"])?;
    let report = super::fanout::lines(&mut lines, 1, std::time::Duration::from_secs(120)).await?;
    drop(children);
    let report: IdleReport = serde_json::from_str(&report[0])?;
    let mut row = row(watches, report.seconds, None, None);
    row.idle_watch_bytes = Some(report.bytes_per_watch);
    Ok(row)
}

/// What the idle-watch child reports.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
struct IdleReport {
    seconds: f64,
    bytes_per_watch: f64,
}

/// The idle-watch child: a hub on the channel of `config`, `watches` watches opened, the
/// resident memory they added per watch printed as one JSON line.
pub(crate) async fn idle_child(config: Config, watches: u64) -> anyhow::Result<()> {
    let server = PgPipe::new(config)?;
    let hub: Hub = server.hub(HubOptions::default()).await?;
    // The handles count: a session holds its watch.
    let mut held = Vec::with_capacity(usize::try_from(watches)?);
    let before = resident_bytes()?;
    let started = Instant::now();
    for i in 0..watches {
        held.push(hub.watch(i % 1_000).await?);
    }
    let seconds = started.elapsed().as_secs_f64();
    let after = resident_bytes()?;
    let report = IdleReport {
        seconds,
        bytes_per_watch: after.saturating_sub(before) as f64 / watches as f64,
    };
    crate::output::outln!("{}", serde_json::to_string(&report)?);
    drop(held);
    hub.close().await?;
    server.close().await?;
    Ok(())
}

/// This process's resident memory (`/proc/self/statm`), in bytes.
fn resident_bytes() -> anyhow::Result<u64> {
    let statm = std::fs::read_to_string("/proc/self/statm")?;
    let pages: u64 = statm
        .split_whitespace()
        .nth(1)
        .ok_or_else(|| anyhow::anyhow!("no resident size in /proc/self/statm"))?
        .parse()?;
    Ok(pages * page_size())
}

fn page_size() -> u64 {
    use nix::unistd::{SysconfVar, sysconf};
    match sysconf(SysconfVar::PAGE_SIZE) {
        Ok(Some(size)) if size > 0 => size as u64,
        _ => 4096,
    }
}
