//! The pipe's rows: its pushers and listeners, alone and against the raw baselines.

use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::future::try_join_all;
use tokio::sync::mpsc;
use updatepipe::{Config, PgPipe, SeqSet, Update, UpdatePipe};

use super::raw::{RawListener, RawPusher, RawSend, envelope_payloads, on_worker, parse_json};
use super::report::{Row, row};
use super::timing::{Countdown, Latencies, cpu_time, open_loop};

/// The pipe's pushes, one at a time, to a plain tokio-postgres listener.
pub(super) async fn pipe_push_raw_listen(config: Config, n: u64) -> anyhow::Result<Row> {
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
pub(super) async fn raw_push_pipe_listen(config: Config, n: u64) -> anyhow::Result<Row> {
    let (listener, counter) = pipe_listener(&config, n, |_| {}).await?;
    let payloads = envelope_payloads(n);
    let pusher = RawPusher::connect(&config).await?;
    let started = Instant::now();
    let (pusher, _payloads) = pusher.send_on_worker(payloads, RawSend::Each).await?;
    let finished = last_delivery(counter).await?;
    let seconds = (finished - started).as_secs_f64();
    pusher.close().await;
    let mut row = row(n, seconds, None, None);
    (row.dropped, row.resyncs) = losses(&listener);
    listener.close().await?;
    Ok(row)
}

/// What a listening pipe let go (slow consumer) and how many resyncs it raised, for the
/// row.
pub(super) fn losses(listener: &PgPipe) -> (u64, u64) {
    let stats = listener.stats();
    (stats.dropped_slow_consumer, stats.resyncs)
}

/// Starts a pipe listening on the channel and a task that counts what it delivers.
pub(super) async fn pipe_listener(
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

/// [`pipe_listener`] with `listen_events`: counts the updates, and with `ack`
/// acknowledges every position as a named consumer does.
async fn event_listener(
    config: Config,
    n: u64,
    ack: bool,
) -> anyhow::Result<(PgPipe, tokio::task::JoinHandle<Option<Instant>>)> {
    let listener = PgPipe::new(config)?;
    let (tx, mut rx) = mpsc::channel(65_536);
    listener.listen_events(tx).await?;
    let acker = listener.clone();
    let counter = tokio::spawn(async move {
        let mut seen = 0;
        while let Some(event) = rx.recv().await {
            match event {
                updatepipe::Event::Update(_) => seen += 1,
                updatepipe::Event::Position(p) if ack => acker.ack(&p).ok()?,
                _ => {}
            }
            if seen == n {
                return Some(Instant::now());
            }
        }
        None
    });
    Ok((listener, counter))
}

/// [`pipe_listener`] through the IDLE hub: one watch for each of the mailboxes 0 to
/// `mailboxes` - 1, each read by a task of its own; done when they saw `n` in all.
async fn hub_listener(
    config: Config,
    n: u64,
    mailboxes: u64,
) -> anyhow::Result<(PgPipe, tokio::task::JoinHandle<Option<Instant>>)> {
    let listener = PgPipe::new(config)?;
    let hub = listener
        .hub(updatepipe::HubOptions::default().with_watch_bound(65_536))
        .await?;
    let (countdown, finished) = Countdown::new(n);
    for key in 0..mailboxes {
        let mut watch = hub.watch(key).await?;
        let countdown = countdown.clone();
        tokio::spawn(async move {
            while let Some(event) = watch.recv().await {
                if matches!(event, updatepipe::MailboxEvent::Update(_)) {
                    countdown.one();
                }
            }
        });
    }
    // The hub runs while its handle lives: the counting task holds it.
    let counter = tokio::spawn(async move {
        let finished = finished.await.ok();
        drop(hub);
        finished
    });
    Ok((listener, counter))
}

/// [`hub_listener`]'s baseline, as applications wrote it before the hub: `listen_events`,
/// a router task that sends each update to its mailbox's session (a bounded channel and
/// a task each, mailboxes 0 to `mailboxes` - 1).
async fn router_listener(
    config: Config,
    n: u64,
    mailboxes: u64,
) -> anyhow::Result<(PgPipe, tokio::task::JoinHandle<Option<Instant>>)> {
    let listener = PgPipe::new(config)?;
    let (tx, mut events) = mpsc::channel(65_536);
    listener.listen_events(tx).await?;
    let (countdown, finished) = Countdown::new(n);
    let mut sessions = std::collections::HashMap::new();
    for key in 0..mailboxes {
        let (to_session, mut session) = mpsc::channel::<Update>(65_536);
        sessions.insert(updatepipe::MailboxKey::Id(key), to_session);
        let countdown = countdown.clone();
        tokio::spawn(async move {
            while session.recv().await.is_some() {
                countdown.one();
            }
        });
    }
    tokio::spawn(async move {
        while let Some(event) = events.recv().await {
            if let updatepipe::Event::Update(update) = event
                && let Some(session) = sessions.get(update.key())
            {
                let _ = session.send(update).await;
            }
        }
    });
    let counter = tokio::spawn(async move { finished.await.ok() });
    Ok((listener, counter))
}

/// When the counting task of [`pipe_listener`] saw its last update.
pub(super) async fn last_delivery(
    counter: tokio::task::JoinHandle<Option<Instant>>,
) -> anyhow::Result<Instant> {
    tokio::time::timeout(Duration::from_secs(120), counter)
        .await
        .map_err(|_| anyhow::anyhow!("deliveries did not complete"))??
        .ok_or_else(|| anyhow::anyhow!("the listener stopped early"))
}

/// The `i`-th new-message update (from 0) of a pusher for mailbox `key`: UIDs count from 1.
pub(super) fn numbered(key: u64, i: u64) -> Result<Update, updatepipe::Error> {
    let uid = u32::try_from(i % u64::from(u32::MAX)).unwrap_or(1) + 1;
    Ok(Update::new_message(key, SeqSet::single(uid)?))
}

/// `n` updates from `pushers` concurrent tasks, each pushing its share one update at a
/// time (mailbox `key` for task `key`).
pub(super) async fn push_all(pusher: &Arc<PgPipe>, n: u64, pushers: usize) -> anyhow::Result<()> {
    push_all_keys(pusher, n, pushers, pushers as u64).await
}

/// [`push_all`] on `keys` mailboxes: task `t` pushes to mailbox `t % keys`.
async fn push_all_keys(
    pusher: &Arc<PgPipe>,
    n: u64,
    pushers: usize,
    keys: u64,
) -> anyhow::Result<()> {
    let each = n / pushers as u64;
    let extra = n % pushers as u64;
    let tasks = (0..pushers as u64).map(|task| {
        let pusher = pusher.clone();
        let count = each + u64::from(task < extra);
        tokio::spawn(async move {
            for i in 0..count {
                pusher.push(&numbered(task % keys, i)?).await?;
            }
            Ok::<_, updatepipe::Error>(())
        })
    });
    for result in try_join_all(tasks).await? {
        result?;
    }
    Ok(())
}

/// The pipe with `pushers` concurrent tasks, each pushing its share one update at a time.
pub(super) async fn pipe(config: Config, n: u64, pushers: usize) -> anyhow::Result<Row> {
    heard_by(config, n, pushers, 1).await
}

/// [`pipe`], its updates heard by `listeners` listening pipes in this process; timed from
/// the first push to the last delivery to the last of them. The row's losses are theirs,
/// summed.
pub(super) async fn heard_by(
    config: Config,
    n: u64,
    pushers: usize,
    listeners: usize,
) -> anyhow::Result<Row> {
    if config.durable() {
        PgPipe::new(config.clone())?.migrate().await?;
    }
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
    push_all(&pusher, n, pushers).await?;
    let mut finished = started;
    for counter in counters {
        finished = finished.max(last_delivery(counter).await?);
    }
    let seconds = (finished - started).as_secs_f64();
    let batches = pusher.stats().batches;
    pusher.close().await?;
    let mut row = row(n, seconds, None, Some(batches));
    for listener in pipes {
        let (dropped, resyncs) = losses(&listener);
        row.dropped += dropped;
        row.resyncs += resyncs;
        listener.close().await?;
    }
    Ok(row)
}

/// How the backlog row's listener takes what it reads.
#[derive(Clone, Copy, Debug)]
pub(super) enum Reading {
    /// `listen`: updates only.
    Updates,
    /// `listen_events`: each update followed by its position.
    Positions,
    /// `listen_events` as a named consumer, acknowledging every position.
    Acking,
    /// The IDLE hub: the updates on this many mailboxes, one watch each.
    Hub(u64),
    /// Its hand-written baseline: `listen_events` and a router task sending each update
    /// to the session of its mailbox (one of this many, each a channel and a task).
    Router(u64),
}

/// A durable listener back from an absence: `n` updates pushed durably (256 pushers) with
/// no listener, then one that reads them from the log's start; timed from its start to
/// its last delivery (the catch-up rate), its CPU only.
pub(super) async fn backlog(config: Config, n: u64, reading: Reading) -> anyhow::Result<Row> {
    let config = config.with_durable(true);
    PgPipe::new(config.clone())?.migrate().await?;
    let pusher = Arc::new(PgPipe::new(config.clone())?);
    let keys = match reading {
        Reading::Hub(keys) | Reading::Router(keys) => keys,
        _ => 256,
    };
    push_all_keys(&pusher, n, 256, keys).await?;
    pusher.close().await?;
    let before = cpu_time()?;
    let started = Instant::now();
    let reader = config.with_listen(|l| l.with_since(updatepipe::Since::Position(0)));
    let (listener, counter) = match reading {
        Reading::Updates => pipe_listener(&reader, n, |_| {}).await?,
        Reading::Positions => event_listener(reader, n, false).await?,
        Reading::Acking => {
            let name = format!("bench_{:08x}", rand::random::<u32>());
            event_listener(reader.with_consumer(&name), n, true).await?
        }
        Reading::Hub(keys) => hub_listener(reader, n, keys).await?,
        Reading::Router(keys) => router_listener(reader, n, keys).await?,
    };
    let finished = last_delivery(counter).await?;
    let seconds = (finished - started).as_secs_f64();
    let spent = cpu_time()?.saturating_sub(before);
    let mut row = row(n, seconds, None, None);
    row.cpu_us_per_update = Some(spent.as_secs_f64() * 1e6 / n as f64);
    (row.dropped, row.resyncs) = losses(&listener);
    listener.close().await?;
    Ok(row)
}

/// Open-loop latency: pushes start on a fixed schedule whatever earlier pushes do; each
/// update carries its push time (nanoseconds since the start) as its mailbox key.
pub(super) async fn paced(config: Config, rate: u64, n: u64) -> anyhow::Result<Row> {
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
    let mut row = row(n, seconds, Some(latencies.summary()), Some(batches));
    (row.dropped, row.resyncs) = losses(&listener);
    listener.close().await?;
    Ok(row)
}
