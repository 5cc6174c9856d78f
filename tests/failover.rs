//! A durable listener across a failover to an asynchronous streaming standby, on a
//! configuration that names both servers (`target_session_attrs=read-write` picks the
//! primary). A promotion that lost commits the listener had read must be told
//! (`Resync(HistoryChanged)`), and after it every update is delivered once, in order per
//! sender; a switchover that lost nothing must be told nothing, and lose nothing. A
//! position taken on the old primary says, when resumed from, whether the new one still
//! holds its history. Each test runs its own primary and standby.

mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use support::proxy::Proxy;
use support::{cluster_config_url, number_of, numbered, sql_at, streaming_standby_of, unique};
use tokio::sync::mpsc;
use updatepipe::cluster::TempCluster;
use updatepipe::{
    Config, Envelope, Event, HistoryChange, PgPipe, Position, ResyncReason, Since, UpdatePipe,
};

/// How long a test waits for what must come.
const WAIT: Duration = Duration::from_secs(30);

/// The senders, one mailbox key each, so that each one's order can be checked.
const KEYS: [u64; 2] = [1, 2];

/// A durable configuration naming both servers, the primary first, with the quick connect
/// timeout and backoff of `support::cluster_config`.
fn both(primary: u16, standby: u16, channel: &str) -> Config {
    cluster_config_url(
        &format!("host=127.0.0.1,127.0.0.1 port={primary},{standby} user=postgres dbname=postgres"),
        channel,
    )
    .with_durable(true)
}

/// A primary (`synchronous_commit` on: a push returns once its commit is on the primary's
/// disk, not the standby's) with the schema migrated.
async fn migrated_primary(channel: &str) -> TempCluster {
    support::init_logging();
    let primary = tokio::task::spawn_blocking(|| TempCluster::builder().start().unwrap())
        .await
        .unwrap();
    let admin = PgPipe::new(support::cluster_config(primary.port(), channel)).unwrap();
    admin.migrate().await.unwrap();
    admin.close().await.unwrap();
    primary
}

/// Waits until the standby has replayed the primary's write-ahead log as far as it goes
/// now.
async fn standby_caught_up(primary: &tokio_postgres::Client, standby: &tokio_postgres::Client) {
    let lsn: String = primary
        .query_one("SELECT pg_current_wal_insert_lsn()::text", &[])
        .await
        .unwrap()
        .get(0);
    let deadline = Instant::now() + WAIT;
    loop {
        let replayed: bool = standby
            .query_one(
                "SELECT coalesce(pg_last_wal_replay_lsn() >= $1::text::pg_lsn, false)",
                &[&lsn],
            )
            .await
            .unwrap()
            .get(0);
        if replayed {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "the standby never replayed {lsn}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn promote(standby: TempCluster) -> TempCluster {
    tokio::task::spawn_blocking(move || {
        let mut standby = standby;
        standby.promote().unwrap();
        standby
    })
    .await
    .unwrap()
}

async fn stop(cluster: TempCluster, mode: &'static str) -> TempCluster {
    tokio::task::spawn_blocking(move || {
        let mut cluster = cluster;
        cluster.stop(mode).unwrap();
        cluster
    })
    .await
    .unwrap()
}

/// One push: what it carried, when it started, and whether it returned `Ok`.
#[derive(Clone, Copy, Debug)]
struct Attempt {
    key: u64,
    n: u32,
    started: Instant,
    ok: bool,
}

/// Senders pushing numbered updates continuously, each on a pipe (an origin) of its own
/// and a key of its own, each number once: a push that fails is not tried again (its
/// number may or may not have committed), the next one has the next number.
struct Pushers {
    attempts: Arc<Mutex<Vec<Attempt>>>,
    stop: Arc<AtomicBool>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
    pipes: Vec<PgPipe>,
}

impl Pushers {
    fn start(config: &Config) -> Pushers {
        let attempts = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let mut tasks = Vec::new();
        let mut pipes = Vec::new();
        for key in KEYS {
            let pipe = PgPipe::new(config.clone()).unwrap();
            pipes.push(pipe.clone());
            let (attempts, stop) = (attempts.clone(), stop.clone());
            tasks.push(tokio::spawn(async move {
                let mut n = 0;
                while !stop.load(Ordering::SeqCst) {
                    n += 1;
                    let started = Instant::now();
                    let ok = pipe.push(&numbered(key, n)).await.is_ok();
                    attempts.lock().unwrap().push(Attempt {
                        key,
                        n,
                        started,
                        ok,
                    });
                    // A pace a machine shared with other tests keeps up with; a failed
                    // push (no primary) waits a little longer.
                    let pause = if ok { 5 } else { 50 };
                    tokio::time::sleep(Duration::from_millis(pause)).await;
                }
            }));
        }
        Pushers {
            attempts,
            stop,
            tasks,
            pipes,
        }
    }

    /// The last number of `key` whose push returned `Ok` so far.
    fn last_ok(&self, key: u64) -> u32 {
        last_ok(&self.attempts.lock().unwrap(), key).unwrap_or(0)
    }

    /// Stops pushing; returns every attempt.
    async fn finish(self) -> Vec<Attempt> {
        self.stop.store(true, Ordering::SeqCst);
        for task in self.tasks {
            task.await.unwrap();
        }
        for pipe in self.pipes {
            pipe.close().await.unwrap();
        }
        self.attempts.lock().unwrap().clone()
    }
}

/// The last number of `key` among these attempts whose push returned `Ok`.
fn last_ok(attempts: &[Attempt], key: u64) -> Option<u32> {
    attempts
        .iter()
        .filter(|a| a.key == key && a.ok)
        .map(|a| a.n)
        .max()
}

/// What a listener heard, each event with the moment the test received it.
#[derive(Clone)]
struct Heard(Arc<Mutex<Vec<(Instant, Event)>>>);

impl Heard {
    fn collect(mut rx: mpsc::Receiver<Event>) -> Heard {
        let heard = Heard(Arc::new(Mutex::new(Vec::new())));
        let events = heard.0.clone();
        tokio::spawn(async move {
            while let Some(event) = rx.recv().await {
                events.lock().unwrap().push((Instant::now(), event));
            }
        });
        heard
    }

    fn events(&self) -> Vec<(Instant, Event)> {
        self.0.lock().unwrap().clone()
    }

    /// Waits until `done` holds of the events so far, within [`WAIT`].
    async fn until(&self, what: &str, done: impl Fn(&[(Instant, Event)]) -> bool) {
        let deadline = Instant::now() + WAIT;
        loop {
            if done(&self.0.lock().unwrap()) {
                return;
            }
            if Instant::now() > deadline {
                let events = self.events();
                let tail: Vec<_> = events[events.len().saturating_sub(8)..]
                    .iter()
                    .map(|(_, e)| e)
                    .collect();
                panic!("timed out waiting for {what}; last events: {tail:?}");
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Waits until every key's last update whose push returned `Ok` was delivered.
    async fn delivered_last_ok(&self, attempts: &[Attempt]) {
        for key in KEYS {
            let last = last_ok(attempts, key).expect("a push of every key returned Ok");
            self.delivered(key, last).await;
        }
    }

    /// Waits until `key`'s update `n` was delivered.
    async fn delivered(&self, key: u64, n: u32) {
        self.until(&format!("update {n} of key {key}"), |events| {
            delivered(events).contains(&(key, n))
        })
        .await;
    }
}

/// The updates among these events, as keys and numbers, in order.
fn delivered(events: &[(Instant, Event)]) -> Vec<(u64, u32)> {
    events
        .iter()
        .filter_map(|(_, e)| match e {
            Event::Update(u) => Some(number_of(u)),
            _ => None,
        })
        .collect()
}

fn resyncs(events: &[(Instant, Event)]) -> Vec<(usize, ResyncReason)> {
    events
        .iter()
        .enumerate()
        .filter_map(|(i, (_, e))| match e {
            Event::Resync(reason) => Some((i, reason.clone())),
            _ => None,
        })
        .collect()
}

/// Per key, the numbers in delivery order: each at most once, each higher than the one
/// before (exactly once, in order per sender).
fn assert_once_in_order(updates: &[(u64, u32)], what: &str) -> BTreeMap<u64, Vec<u32>> {
    let mut by_key: BTreeMap<u64, Vec<u32>> = BTreeMap::new();
    for &(key, n) in updates {
        let seen = by_key.entry(key).or_default();
        if let Some(&last) = seen.last() {
            assert!(
                n > last,
                "{what}: key {key}: {n} after {last} (repeated or out of order)"
            );
        }
        seen.push(n);
    }
    by_key
}

/// Every update in the log of `channel` on this server, as keys and numbers.
async fn logged(client: &tokio_postgres::Client, channel: &str) -> BTreeSet<(u64, u32)> {
    let rows = client
        .query(
            "SELECT payload FROM updatepipe.log WHERE channel = $1 ORDER BY id",
            &[&channel],
        )
        .await
        .unwrap();
    rows.iter()
        .flat_map(|row| {
            let envelope = Envelope::decode_logged(row.get(0)).unwrap();
            envelope.updates().iter().map(number_of).collect::<Vec<_>>()
        })
        .collect()
}

/// What a failover run showed: the history change told, if any, and the counts the report
/// prints.
#[derive(Debug)]
struct Outcome {
    change: Option<HistoryChange>,
    /// Pushes that returned `Ok` and are not in the new primary's log: lost with the
    /// old primary's last commits.
    lost: usize,
    /// Pushes that returned `Ok`, are in the new primary's log, and were committed before
    /// the listener started over from the new primary's present: covered by the resync,
    /// not delivered.
    skipped: usize,
    delivered: usize,
}

impl std::fmt::Display for Outcome {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "history change told: {:?}; delivered {}; pushes that returned Ok lost with the \
             old primary: {}; in the new primary's log but before the listener started over \
             (covered by the resync): {}",
            self.change, self.delivered, self.lost, self.skipped
        )
    }
}

/// Checks what a listener heard across a failover against what was pushed (`attempts`)
/// and what the new primary's log holds (`kept`):
///
/// - at most one resync, and only `HistoryChanged` (the senders are all durable);
/// - every update delivered was pushed (a failed push may have committed all the same),
///   and per sender each is delivered at most once and in order, across the resync too;
/// - without a resync: nothing delivered that the new primary lost, and every push that
///   returned `Ok` and is in the new primary's log delivered;
/// - with one: after it, only what the new primary holds, with nothing skipped from the
///   first update after it on, and every push that started after the resync was heard
///   delivered.
fn check_across_failover(
    events: &[(Instant, Event)],
    attempts: &[Attempt],
    kept: &BTreeSet<(u64, u32)>,
) -> Outcome {
    let pushed: BTreeSet<(u64, u32)> = attempts.iter().map(|a| (a.key, a.n)).collect();
    let ok: BTreeSet<(u64, u32)> = attempts
        .iter()
        .filter(|a| a.ok)
        .map(|a| (a.key, a.n))
        .collect();
    let all = delivered(events);
    assert_once_in_order(&all, "the whole stream");
    for update in &all {
        assert!(pushed.contains(update), "{update:?} was never pushed");
    }
    let resyncs = resyncs(events);
    assert!(resyncs.len() <= 1, "one resync at most: {resyncs:?}");
    let lost = ok.difference(kept).count();
    let Some((at, reason)) = resyncs.into_iter().next() else {
        let got: BTreeSet<(u64, u32)> = all.iter().copied().collect();
        for update in &all {
            assert!(
                kept.contains(update),
                "{update:?} was delivered, and lost in the failover, without a resync"
            );
        }
        let missing: Vec<_> = ok.intersection(kept).filter(|u| !got.contains(u)).collect();
        assert!(missing.is_empty(), "never delivered: {missing:?}");
        return Outcome {
            change: None,
            lost,
            skipped: 0,
            delivered: all.len(),
        };
    };
    let ResyncReason::HistoryChanged(change) = reason else {
        panic!("a resync other than HistoryChanged: {reason:?}");
    };
    let told_at = events[at].0;
    let after = delivered(&events[at..]);
    let got: BTreeSet<(u64, u32)> = after.iter().copied().collect();
    let mut skipped = 0;
    for (key, numbers) in assert_once_in_order(&after, "after the resync") {
        for &n in &numbers {
            assert!(
                kept.contains(&(key, n)),
                "key {key}: {n} delivered after the resync, not in the new primary's log"
            );
        }
        // From the first update after the resync on, nothing the new primary holds is
        // skipped.
        let first = numbers[0];
        let skipped_here: Vec<_> = kept
            .iter()
            .filter(|(k, n)| *k == key && *n > first && !got.contains(&(*k, *n)))
            .collect();
        assert!(
            skipped_here.is_empty(),
            "key {key}: skipped after {first}: {skipped_here:?}"
        );
        skipped += ok
            .iter()
            .filter(|(k, n)| *k == key && *n < first && kept.contains(&(*k, *n)))
            .filter(|u| !all.contains(u))
            .count();
    }
    for a in attempts.iter().filter(|a| a.ok && a.started > told_at) {
        assert!(
            got.contains(&(a.key, a.n)),
            "pushed after the resync was heard, never delivered: {a:?}"
        );
    }
    Outcome {
        change: Some(change),
        lost,
        skipped,
        delivered: all.len(),
    }
}

/// The position given with `key`'s update `n`: the `Position` event right after it.
fn position_after(events: &[(Instant, Event)], key: u64, n: u32) -> (usize, Position) {
    let at = events
        .iter()
        .position(|(_, e)| matches!(e, Event::Update(u) if number_of(u) == (key, n)))
        .unwrap();
    match &events[at + 1].1 {
        Event::Position(p) => (at + 1, p.clone()),
        other => panic!("after {key}/{n}: {other:?}, not its position"),
    }
}

/// The deterministic lossy failover: the standby streams through a proxy, which is cut
/// (the bytes swallowed) while pushes go on; the listener reads, on the primary, commits
/// the standby will never have; then the standby is promoted and the old primary crashes
/// 0.2 s later. The listener must tell `HistoryChanged(LostInFailover)` when it reaches the
/// new primary, then deliver everything pushed there after it, once, in order. A position
/// from before the cut, which the standby had received, resumes there exactly; one from
/// after it starts with the same resync.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failover_that_lost_what_the_listener_read_is_a_history_changed_resync() {
    let started = Instant::now();
    let channel = unique("failover_lossy");
    let primary = migrated_primary(&channel).await;
    let proxy = Proxy::start(primary.port()).await;
    let standby = streaming_standby_of(proxy.port()).await;
    let (on_primary, on_standby) = (sql_at(primary.port()).await, sql_at(standby.port()).await);
    let config = both(primary.port(), standby.port(), &channel);

    let listener = PgPipe::new(config.clone()).unwrap();
    let (tx, rx) = mpsc::channel(100_000);
    listener.listen_events(tx).await.unwrap();
    let heard = Heard::collect(rx);
    let pushers = Pushers::start(&config);

    // Replicated: a position the standby will have.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let early = pushers.last_ok(1);
    heard.delivered(1, early).await;
    standby_caught_up(&on_primary, &on_standby).await;

    // Cut: what the primary commits from now on never reaches the standby.
    proxy.blackhole();
    let cut: Vec<u32> = KEYS.iter().map(|&k| pushers.last_ok(k)).collect();
    for (&key, &n) in KEYS.iter().zip(&cut) {
        heard.delivered(key, n + 20).await;
    }
    let late = cut[0] + 20;

    let standby = promote(standby).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let primary = stop(primary, "immediate").await;
    // Pushes go on against both servers: the dead one refuses, the new primary takes them.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let attempts = pushers.finish().await;
    heard.delivered_last_ok(&attempts).await;
    let on_new = sql_at(standby.port()).await;
    let kept = logged(&on_new, &channel).await;
    let events = heard.events();
    let outcome = check_across_failover(&events, &attempts, &kept);
    eprintln!("lossy failover (the replication cut): {outcome}");
    assert_eq!(
        outcome.change,
        Some(HistoryChange::LostInFailover),
        "the listener read commits the new primary never had"
    );
    assert!(outcome.lost > 0, "the cut lost pushes that returned Ok");
    for (&key, &n) in KEYS.iter().zip(&cut) {
        assert!(
            !kept.contains(&(key, n + 20)),
            "the standby had what was pushed after the cut"
        );
    }

    // A listener resuming from a position the standby had received: exactly what
    // followed it in the new primary's history, no resync.
    let (early_at, early_position) = position_after(&events, 1, early);
    let before: BTreeMap<u64, u32> = KEYS
        .iter()
        .map(|&key| {
            let last = delivered(&events[..early_at])
                .iter()
                .filter(|(k, _)| *k == key)
                .map(|(_, n)| *n)
                .max()
                .unwrap_or(0);
            (key, last)
        })
        .collect();
    let expected: Vec<(u64, u32)> = kept
        .iter()
        .copied()
        .filter(|(key, n)| *n > before[key])
        .collect();
    let (replayer, resumed) = resume(&config, early_position).await;
    resumed
        .until("the replay from before the cut", |e| {
            delivered(e).len() >= expected.len()
        })
        .await;
    tokio::time::sleep(support::SILENCE).await;
    let replay = resumed.events();
    assert!(resyncs(&replay).is_empty(), "{:?}", resyncs(&replay));
    let mut got = delivered(&replay);
    assert_once_in_order(&got, "the replay from before the cut");
    got.sort();
    assert_eq!(got, expected, "exactly what followed the position");
    replayer.close().await.unwrap();

    // From a position past the fork: the same resync at the start, then the present.
    let (_, late_position) = position_after(&events, 1, late);
    let (late_listener, restarted) = resume(&config, late_position).await;
    restarted
        .until("the resync at the start", |e| !resyncs(e).is_empty())
        .await;
    let pusher = PgPipe::new(config.clone()).unwrap();
    pusher.push(&numbered(3, 1)).await.unwrap();
    restarted.delivered(3, 1).await;
    tokio::time::sleep(support::SILENCE).await;
    let start: Vec<Event> = restarted.events().into_iter().map(|(_, e)| e).collect();
    assert!(
        matches!(
            &start[..],
            [
                Event::Connected,
                Event::Resync(ResyncReason::HistoryChanged(HistoryChange::LostInFailover)),
                Event::Position(_),
                Event::Update(u),
                Event::Position(_),
            ] if number_of(u) == (3, 1)
        ),
        "{start:?}"
    );
    for pipe in [pusher, late_listener, listener] {
        pipe.close().await.unwrap();
    }
    drop((primary, proxy));
    eprintln!("lossy failover took {:?}", started.elapsed());
}

/// A listener on `config` resuming exactly after `position`, and what it hears.
async fn resume(config: &Config, position: Position) -> (PgPipe, Heard) {
    let pipe = PgPipe::new(
        config
            .clone()
            .with_listen(|l| l.with_since(Since::After(position))),
    )
    .unwrap();
    let (tx, rx) = mpsc::channel(100_000);
    pipe.listen_events(tx).await.unwrap();
    (pipe, Heard::collect(rx))
}

/// The failover as it comes: the standby streams directly, the promotion and the crash
/// 0.2 s later happen under load, and whether the standby had everything the listener
/// read is a race. Either way the listener must be right: no resync and nothing delivered
/// that the new primary lost (pushes it lost that the listener never read are no
/// concern of the listener's), or a `HistoryChanged` resync and exactly once, in order,
/// after it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failover_under_load_loses_nothing_unseen() {
    let started = Instant::now();
    let channel = unique("failover_race");
    let primary = migrated_primary(&channel).await;
    let standby = streaming_standby_of(primary.port()).await;
    let config = both(primary.port(), standby.port(), &channel);
    let listener = PgPipe::new(config.clone()).unwrap();
    let (tx, rx) = mpsc::channel(100_000);
    listener.listen_events(tx).await.unwrap();
    let heard = Heard::collect(rx);
    let pushers = Pushers::start(&config);
    tokio::time::sleep(Duration::from_secs(1)).await;
    heard.delivered(1, 20).await;

    let standby = promote(standby).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let primary = stop(primary, "immediate").await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let attempts = pushers.finish().await;
    heard.delivered_last_ok(&attempts).await;
    let kept = logged(&sql_at(standby.port()).await, &channel).await;
    let outcome = check_across_failover(&heard.events(), &attempts, &kept);
    eprintln!(
        "failover under load: {outcome}; took {:?}",
        started.elapsed()
    );
    listener.close().await.unwrap();
    drop(primary);
}

/// A clean switchover: the primary stops (`fast`: it sends the standby everything first),
/// the standby replays it all and is promoted. Nothing was lost, so nothing is told: no
/// resync, and every push that returned `Ok` delivered exactly once, in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_clean_switchover_is_no_resync_and_loses_nothing() {
    let started = Instant::now();
    let channel = unique("switchover");
    let primary = migrated_primary(&channel).await;
    let standby = streaming_standby_of(primary.port()).await;
    let config = both(primary.port(), standby.port(), &channel);
    let listener = PgPipe::new(config.clone()).unwrap();
    let (tx, rx) = mpsc::channel(100_000);
    listener.listen_events(tx).await.unwrap();
    let heard = Heard::collect(rx);
    let pushers = Pushers::start(&config);
    tokio::time::sleep(Duration::from_secs(1)).await;
    heard.delivered(1, 20).await;

    let on_standby = sql_at(standby.port()).await;
    let primary = stop(primary, "fast").await;
    // Everything the primary wrote, its shutdown checkpoint last, is replayed.
    let deadline = Instant::now() + WAIT;
    loop {
        let done: bool = on_standby
            .query_one(
                "SELECT pg_last_wal_replay_lsn() >= pg_last_wal_receive_lsn()",
                &[],
            )
            .await
            .unwrap()
            .get(0);
        if done {
            break;
        }
        assert!(Instant::now() < deadline, "the standby never caught up");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let standby = promote(standby).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let attempts = pushers.finish().await;
    heard.delivered_last_ok(&attempts).await;
    tokio::time::sleep(support::SILENCE).await;
    let kept = logged(&sql_at(standby.port()).await, &channel).await;
    let events = heard.events();
    let outcome = check_across_failover(&events, &attempts, &kept);
    eprintln!("switchover: {outcome}; took {:?}", started.elapsed());
    assert_eq!(outcome.change, None, "nothing was lost: no resync");
    assert_eq!(
        outcome.lost, 0,
        "a switchover loses no push that returned Ok"
    );
    let ok = attempts.iter().filter(|a| a.ok).count();
    let disconnects = events
        .iter()
        .filter(|(_, e)| matches!(e, Event::Disconnected { .. }))
        .count();
    assert!(disconnects >= 1, "the listener went through the switchover");
    assert!(
        outcome.delivered >= ok,
        "every Ok push delivered ({} of {ok})",
        outcome.delivered
    );
    listener.close().await.unwrap();
    drop(primary);
}
