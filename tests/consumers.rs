//! Named consumers (`Config::with_consumer`, `listen --consumer`): a consumer's position is
//! kept in the database, acknowledged in batches, and a restarted consumer resumes there,
//! whatever killed the one before; one session at a time reads as a consumer; pruning
//! keeps what a consumer has not acknowledged, up to the hold; `status` shows its lag.
//! Every test runs its own throwaway cluster.

mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use support::{cluster_config, number_of, numbered, own_cluster, sql_at, unique};
use tokio::sync::mpsc;
use updatepipe::{
    ACK_INTERVAL, Config, Envelope, Error, Event, PgPipe, Position, ResyncReason, Update,
    UpdatePipe,
};

/// A durable configuration on the cluster, with the schema migrated.
async fn migrated(cluster: &updatepipe::cluster::TempCluster, channel: &str) -> Config {
    let config = cluster_config(cluster.port(), channel).with_durable(true);
    let admin = PgPipe::new(config.clone()).unwrap();
    admin.migrate().await.unwrap();
    admin.close().await.unwrap();
    config
}

/// Receives events until `done` says so (within 20 s).
async fn until(
    rx: &mut mpsc::Receiver<Event>,
    events: &mut Vec<Event>,
    what: &str,
    done: impl Fn(&[Event]) -> bool,
) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while !done(events) {
        match tokio::time::timeout_at(deadline, rx.recv()).await {
            Ok(Some(event)) => events.push(event),
            Ok(None) => panic!("the listener ended waiting for {what}: {events:?}"),
            Err(_) => panic!("timed out waiting for {what}: {events:?}"),
        }
    }
}

/// Receives events until mailbox 7's update `n` is among them.
async fn until_update(rx: &mut mpsc::Receiver<Event>, events: &mut Vec<Event>, n: u32) {
    until(rx, events, &format!("update {n}"), |e| {
        updates(e).contains(&(7, n))
    })
    .await;
}

/// The events that arrive within `window`.
async fn within(rx: &mut mpsc::Receiver<Event>, window: Duration) -> Vec<Event> {
    let mut events = Vec::new();
    let deadline = tokio::time::Instant::now() + window;
    while let Ok(Some(event)) = tokio::time::timeout_at(deadline, rx.recv()).await {
        events.push(event);
    }
    events
}

fn updates(events: &[Event]) -> Vec<(u64, u32)> {
    events
        .iter()
        .filter_map(|e| match e {
            Event::Update(u) => Some(number_of(u)),
            _ => None,
        })
        .collect()
}

/// The position given with `key`'s update `n`: the event right after it.
fn position_after(events: &[Event], key: u64, n: u32) -> Position {
    let at = events
        .iter()
        .position(|e| matches!(e, Event::Update(u) if number_of(u) == (key, n)))
        .unwrap_or_else(|| panic!("no update {key}/{n} in {events:?}"));
    match &events[at + 1] {
        Event::Position(p) => p.clone(),
        other => panic!("after {key}/{n}: {other:?}, not its position"),
    }
}

/// The listener backend's pid of the pipe whose configuration is `config`.
async fn listener_pid(client: &tokio_postgres::Client, config: &Config) -> i32 {
    let app = config.pg().get_application_name().unwrap();
    client
        .query_one(
            "SELECT pid FROM pg_stat_activity WHERE application_name = $1 || '/listen'",
            &[&app],
        )
        .await
        .unwrap()
        .get(0)
}

/// One session at a time reads as a consumer: a second is refused, naming the first's
/// backend. Once the first closes, the second starts where the first acknowledged (here
/// inside a batch of three updates in one log entry), exactly: not before, not after.
/// `status` shows the consumer behind by what it has not acknowledged, and caught up at 0.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_consumer_is_read_by_one_session_and_resumes_where_it_was_acknowledged() {
    let cluster = own_cluster();
    let channel = unique("consumer_one");
    let config = migrated(&cluster, &channel).await;
    let admin = sql_at(cluster.port()).await;
    let name = "indexer";

    let first = PgPipe::new(config.clone().with_consumer(name)).unwrap();
    let (tx, mut rx) = mpsc::channel(1000);
    first.listen_events(tx).await.unwrap();
    let pid = listener_pid(&admin, first.config()).await;
    let second = PgPipe::new(config.clone().with_consumer(name)).unwrap();
    let (tx2, mut rx2) = mpsc::channel(1000);
    match second.listen_events(tx2.clone()).await {
        Err(Error::ConsumerTaken {
            name: taken,
            holders,
        }) => {
            assert_eq!(taken, name);
            assert!(holders.contains(&format!("pid {pid} ")), "{holders}");
        }
        other => panic!("a second session as {name}: {other:?}"),
    }

    let pusher = PgPipe::new(config.clone()).unwrap();
    for n in 1..=5 {
        pusher.push(&numbered(7, n)).await.unwrap();
    }
    // One log entry with three updates.
    pusher
        .push_many(&[numbered(7, 6), numbered(7, 7), numbered(7, 8)])
        .await
        .unwrap();
    for n in 9..=10 {
        pusher.push(&numbered(7, n)).await.unwrap();
    }
    let mut events = Vec::new();
    until_update(&mut rx, &mut events, 10).await;
    assert_eq!(
        updates(&events),
        (1..=10).map(|n| (7, n)).collect::<Vec<_>>()
    );
    // Handled up to 7, the second of the entry's three.
    let acked = position_after(&events, 7, 7);
    first.ack(&acked).unwrap();
    first.flush_acks().await.unwrap();
    let status = pusher.status().await.unwrap();
    let listed = status.consumers.expect("migrated to V6");
    assert_eq!(listed.len(), 1, "{listed:?}");
    assert_eq!(listed[0].name, name);
    assert_eq!(listed[0].step, acked.step());
    // The entry of 6, 7 and 8 (8 not handled yet), 9 and 10.
    assert_eq!(listed[0].lag_entries, 3, "{listed:?}");
    first.close().await.unwrap();

    for n in 11..=15 {
        pusher.push(&numbered(7, n)).await.unwrap();
    }
    second.listen_events(tx2).await.unwrap();
    let mut resumed = Vec::new();
    until(&mut rx2, &mut resumed, "update 15", |e| {
        updates(e).contains(&(7, 15))
    })
    .await;
    resumed.extend(within(&mut rx2, support::SILENCE).await);
    assert_eq!(
        updates(&resumed),
        (8..=15).map(|n| (7, n)).collect::<Vec<_>>(),
        "exactly what followed the acknowledged position: {resumed:?}"
    );
    assert!(
        !resumed.iter().any(|e| matches!(e, Event::Resync(_))),
        "{resumed:?}"
    );
    // Caught up: acknowledged the last, behind by nothing.
    second.ack(&position_after(&resumed, 7, 15)).unwrap();
    second.flush_acks().await.unwrap();
    let listed = pusher.status().await.unwrap().consumers.unwrap();
    assert_eq!(listed[0].lag_entries, 0, "{listed:?}");
    for pipe in [second, pusher] {
        pipe.close().await.unwrap();
    }
}

/// The log of `channel`: each update's number, and the age of its entry in seconds (by
/// the server's clock).
async fn log_ages(client: &tokio_postgres::Client, channel: &str) -> BTreeMap<u32, f64> {
    client
        .query(
            "SELECT payload, extract(epoch FROM now() - created_at)::float8 \
             FROM updatepipe.log WHERE channel = $1",
            &[&channel],
        )
        .await
        .unwrap()
        .iter()
        .flat_map(|row| {
            let age: f64 = row.get(1);
            Envelope::decode_logged(row.get(0))
                .unwrap()
                .updates()
                .iter()
                .map(|u| (number_of(u).1, age))
                .collect::<Vec<_>>()
        })
        .collect()
}

/// Pruning keeps what a stopped consumer has not acknowledged while it is younger than
/// the hold, and lets it go once older: a listener with a retention of 1 s and a hold of
/// 4 s prunes the entries before the consumer's position after 1 s, those after it only
/// after 4 s. The consumer, started again, is told `LogPruned` before anything else.
/// `status` showed it behind by the five entries after its position.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pruning_keeps_what_a_consumer_has_not_acknowledged_up_to_the_hold() {
    const HOLD: Duration = Duration::from_secs(4);
    let cluster = own_cluster();
    let channel = unique("consumer_hold");
    let config = migrated(&cluster, &channel).await;
    let admin = sql_at(cluster.port()).await;
    let pusher = PgPipe::new(config.clone()).unwrap();
    // Before the consumer: nothing holds these.
    for n in 1..=3 {
        pusher.push(&numbered(7, n)).await.unwrap();
    }
    let consumer = config.clone().with_consumer("slow");
    let slow = PgPipe::new(consumer.clone()).unwrap();
    let (tx, mut rx) = mpsc::channel(1000);
    slow.listen_events(tx).await.unwrap();
    for n in 4..=10 {
        pusher.push(&numbered(7, n)).await.unwrap();
    }
    let mut events = Vec::new();
    until_update(&mut rx, &mut events, 10).await;
    assert_eq!(
        updates(&events),
        (4..=10).map(|n| (7, n)).collect::<Vec<_>>()
    );
    let acked = position_after(&events, 7, 5);
    slow.ack(&acked).unwrap();
    slow.close().await.unwrap();

    let listed = pusher.status().await.unwrap().consumers.unwrap();
    assert_eq!(listed.len(), 1, "{listed:?}");
    let status = &listed[0];
    assert_eq!(
        (status.name.as_str(), status.step, status.lag_entries),
        ("slow", acked.step(), 5),
        "behind by the entries of 6 to 10: {status:?}"
    );
    assert_eq!(status.acked_by, "postgres");

    // A listener that prunes every second.
    let pruner = PgPipe::new(config.clone().with_listen(|l| {
        l.with_retention(Duration::from_secs(1))
            .with_consumer_hold(HOLD)
    }))
    .unwrap();
    let (tx, _pruner_events) = mpsc::channel(1000);
    pruner.listen_events(tx).await.unwrap();
    let after: BTreeSet<u32> = (6..=10).collect();
    let deadline = Instant::now() + Duration::from_secs(20);
    let (mut kept_past_retention, mut unheld_gone) = (false, false);
    loop {
        let log = log_ages(&admin, &channel).await;
        unheld_gone |= (1..=3).all(|n| !log.contains_key(&n));
        if let Some(age) = after
            .iter()
            .filter_map(|n| log.get(n))
            .copied()
            .reduce(f64::min)
        {
            // Every entry after the position is there while younger than the hold...
            let present: BTreeSet<u32> =
                log.keys().copied().filter(|n| after.contains(n)).collect();
            if age < HOLD.as_secs_f64() - 0.2 {
                assert_eq!(present, after, "pruned before the hold, at {age:.1} s");
            }
            // ...well past the retention and the pruning interval.
            kept_past_retention |= age > 2.5 && present == after;
        }
        // And gone once older.
        if after.iter().all(|n| !log.contains_key(n)) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "never pruned past the hold: {log:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(unheld_gone, "the entries before the consumer were pruned");
    assert!(
        kept_past_retention,
        "kept past the retention by the consumer's hold"
    );

    // The consumer again: the entries it had not had are gone, and it is told so.
    let slow = PgPipe::new(consumer).unwrap();
    let (tx, mut rx) = mpsc::channel(1000);
    slow.listen_events(tx).await.unwrap();
    pusher.push(&numbered(7, 11)).await.unwrap();
    let mut events = Vec::new();
    until_update(&mut rx, &mut events, 11).await;
    let first_update = events
        .iter()
        .position(|e| matches!(e, Event::Update(_)))
        .unwrap();
    assert!(
        events[..first_update].contains(&Event::Resync(ResyncReason::LogPruned)),
        "{events:?}"
    );
    assert_eq!(updates(&events), [(7, 11)]);
    for pipe in [slow, pruner, pusher] {
        pipe.close().await.unwrap();
    }
}

/// A consumer whose path to the server forgot its connection (a NAT, a pulled cable: no
/// close reaches the server, whose backend lives on and keeps the consumer's lock) finds
/// out by its heartbeat, reconnects, takes the consumer back from its own old session, and
/// goes on: nothing lost, nothing twice, no resync, and the old backend ended.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_consumer_whose_connection_was_forgotten_on_the_way_takes_itself_back() {
    let cluster = own_cluster();
    let channel = unique("consumer_halfopen");
    let config = migrated(&cluster, &channel).await;
    let admin = sql_at(cluster.port()).await;
    let proxy = support::proxy::Proxy::start(cluster.port()).await;
    // The listener and its pool through the proxy; the pusher direct.
    let through = cluster_config(proxy.port(), &channel)
        .with_durable(true)
        .with_consumer("roaming");
    let consumer = PgPipe::new(through).unwrap();
    let (tx, mut rx) = mpsc::channel(1000);
    consumer.listen_events(tx).await.unwrap();
    let old = listener_pid(&admin, consumer.config()).await;
    let pusher = PgPipe::new(config.clone()).unwrap();
    pusher.push(&numbered(7, 1)).await.unwrap();
    let mut events = Vec::new();
    until_update(&mut rx, &mut events, 1).await;

    proxy.forget_open();
    for n in 2..=5 {
        pusher.push(&numbered(7, n)).await.unwrap();
    }
    until_update(&mut rx, &mut events, 5).await;
    events.extend(within(&mut rx, support::SILENCE).await);
    let disconnects: Vec<_> = events
        .iter()
        .filter(|e| matches!(e, Event::Disconnected { .. }))
        .collect();
    assert_eq!(disconnects.len(), 1, "{events:?}");
    assert_eq!(
        updates(&events),
        (1..=5).map(|n| (7, n)).collect::<Vec<_>>(),
        "{events:?}"
    );
    assert!(
        !events.iter().any(|e| matches!(e, Event::Resync(_))),
        "{events:?}"
    );
    // The consumer's lock is the new session's; the old backend is gone.
    let new = listener_pid(&admin, consumer.config()).await;
    assert_ne!(new, old);
    let old_alive: bool = admin
        .query_one(
            "SELECT EXISTS (SELECT FROM pg_stat_activity WHERE pid = $1)",
            &[&old],
        )
        .await
        .unwrap()
        .get(0);
    assert!(!old_alive, "the old session's backend {old} was ended");
    consumer.close().await.unwrap();
    pusher.close().await.unwrap();
}

/// One run of `updatepipe listen`: its lines on standard output, each with the moment the
/// test read it.
struct Run {
    child: Child,
    lines: Arc<Mutex<Vec<(Instant, String)>>>,
    reader: std::thread::JoinHandle<()>,
    /// Starts refused before this one (the consumer still held by the run killed before).
    refused: usize,
}

/// A finished run: its lines, and when it was killed (`None`: stopped politely).
struct Finished {
    lines: Vec<(Instant, String)>,
    killed_at: Option<Instant>,
}

impl Run {
    /// Starts `updatepipe listen --durable --consumer NAME --print-position`, once the
    /// consumer is free: a run killed a moment ago may still hold it until its backend
    /// notices (exit 4, "being read by another session"), which is tried again for up to
    /// 10 s. Returns once it listens.
    fn start(url: &str, channel: &str, name: &str) -> Run {
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut refused = 0;
        loop {
            let mut child = Command::new(env!("CARGO_BIN_EXE_updatepipe"))
                .args(["--url", url, "listen", "--durable", "--print-position"])
                .args(["--consumer", name, "--channel", channel])
                .env_remove("RUST_LOG")
                .stdin(Stdio::null())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap();
            let lines = Arc::new(Mutex::new(Vec::new()));
            let reader = {
                let lines = lines.clone();
                let stdout = child.stdout.take().unwrap();
                std::thread::spawn(move || {
                    for line in BufReader::new(stdout).lines() {
                        let Ok(line) = line else { break };
                        lines.lock().unwrap().push((Instant::now(), line));
                    }
                })
            };
            // Standard error is read to its end, so that the run never finds it closed.
            let (tx, said_rx) = std::sync::mpsc::channel();
            let stderr = child.stderr.take().unwrap();
            std::thread::spawn(move || {
                for line in BufReader::new(stderr).lines() {
                    let Ok(line) = line else { break };
                    let _ = tx.send(line);
                }
            });
            let mut said = Vec::new();
            for line in said_rx.iter() {
                if line.contains("listening on channel") {
                    return Run {
                        child,
                        lines,
                        reader,
                        refused,
                    };
                }
                said.push(line);
            }
            let status = child.wait().unwrap();
            let taken = said
                .iter()
                .any(|l| l.contains("being read by another session"));
            assert!(
                status.code() == Some(4) && taken && Instant::now() < deadline,
                "listen did not start ({status}): {said:?}"
            );
            refused += 1;
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn kill(mut self) -> Finished {
        let killed_at = Instant::now();
        self.child.kill().unwrap();
        self.child.wait().unwrap();
        self.reader.join().unwrap();
        Finished {
            lines: self.lines.lock().unwrap().clone(),
            killed_at: Some(killed_at),
        }
    }

    /// SIGTERM, and a clean exit.
    fn terminate(mut self) -> Finished {
        let sent = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .unwrap();
        assert!(sent.success());
        let status = self.child.wait().unwrap();
        assert!(status.success(), "listen ended with {status} on SIGTERM");
        self.reader.join().unwrap();
        Finished {
            lines: self.lines.lock().unwrap().clone(),
            killed_at: None,
        }
    }

    /// Whether it has printed `key`'s update `n`.
    fn printed(&self, key: u64, n: u32) -> bool {
        let lines = self.lines.lock().unwrap();
        lines.iter().any(|(_, line)| parse(line) == (key, n))
    }
}

/// The key and number of a line `listen --print-position` printed.
fn parse(line: &str) -> (u64, u32) {
    number_of(&Update::from_json(line).unwrap())
}

/// Whether a line carries its position. (`listen` waits 50 ms for an update's position
/// before it prints the line without: on a machine busy enough it may.)
fn positioned(line: &str) -> bool {
    let json: serde_json::Value = serde_json::from_str(line).unwrap();
    json["Position"]
        .as_str()
        .is_some_and(|p| p.starts_with("up1/"))
}

/// How long after printing an update a run may be killed and the next one print it again:
/// the acknowledgement waits up to [`ACK_INTERVAL`] to be written, behind a write that may
/// be under way; a generous allowance for the write itself on a busy machine.
const REPEAT_WINDOW: Duration = ACK_INTERVAL.saturating_mul(3);

/// The command line as a consumer, killed (SIGKILL) five times at random moments while two
/// senders push, started again each time with the same name: together the runs print every
/// update whose push succeeded; each run prints each sender's updates once and in order,
/// and an update is printed again by a later run only when the run before printed it
/// within [`REPEAT_WINDOW`] of being killed (its acknowledgement not written yet).
#[test]
fn a_consumer_killed_five_times_loses_nothing_and_repeats_little() {
    let started = Instant::now();
    let runtime = support::runtime();
    let cluster = own_cluster();
    let channel = unique("consumer_kill");
    let config = runtime.block_on(migrated(&cluster, &channel));
    let url = cluster.url();
    let name = "mirror";

    let mut run = Run::start(&url, &channel, name);
    let stop = Arc::new(AtomicBool::new(false));
    let pushers: Vec<_> = [1u64, 2]
        .into_iter()
        .map(|key| {
            let (config, stop) = (config.clone(), stop.clone());
            runtime.spawn(async move {
                let pipe = PgPipe::new(config).unwrap();
                let mut results = Vec::new();
                let mut n = 0;
                while !stop.load(Ordering::SeqCst) {
                    n += 1;
                    results.push((n, pipe.push(&numbered(key, n)).await.is_ok()));
                    tokio::time::sleep(Duration::from_millis(2)).await;
                }
                pipe.close().await.unwrap();
                (key, results)
            })
        })
        .collect();

    let mut finished = Vec::new();
    let (mut refused, mut pauses) = (0, Vec::new());
    for _ in 0..5 {
        let pause = rand::random_range(100..=1500);
        pauses.push(pause);
        std::thread::sleep(Duration::from_millis(pause));
        finished.push(run.kill());
        run = Run::start(&url, &channel, name);
        refused += run.refused;
    }
    std::thread::sleep(Duration::from_millis(300));
    stop.store(true, Ordering::SeqCst);
    let mut pushed = BTreeSet::new();
    let mut failed = 0;
    for pusher in pushers {
        let (key, results) = runtime.block_on(pusher).unwrap();
        for (n, ok) in results {
            if ok {
                pushed.insert((key, n));
            } else {
                failed += 1;
            }
        }
    }
    // The last run catches up, then stops politely.
    let deadline = Instant::now() + Duration::from_secs(30);
    for key in [1, 2] {
        let last = pushed
            .iter()
            .filter(|(k, _)| *k == key)
            .map(|(_, n)| *n)
            .max()
            .unwrap();
        while !run.printed(key, last) {
            assert!(
                Instant::now() < deadline,
                "the last run never printed {key}/{last}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    finished.push(run.terminate());

    // Every committed update, in order per sender within each run.
    let mut seen: BTreeMap<(u64, u32), Vec<usize>> = BTreeMap::new();
    for (i, run) in finished.iter().enumerate() {
        let mut last: BTreeMap<u64, u32> = BTreeMap::new();
        for (_, line) in &run.lines {
            let (key, n) = parse(line);
            if let Some(before) = last.insert(key, n) {
                assert!(n > before, "run {i}: key {key}: {n} after {before}");
                // Nothing skipped within a run.
                for skipped in before + 1..n {
                    assert!(
                        !pushed.contains(&(key, skipped)),
                        "run {i}: key {key}: {skipped} skipped between {before} and {n}"
                    );
                }
            }
            seen.entry((key, n)).or_default().push(i);
        }
    }
    let missing: Vec<_> = pushed.iter().filter(|u| !seen.contains_key(u)).collect();
    assert!(missing.is_empty(), "never printed: {missing:?}");

    // Repeated only what the run before printed in its last moments.
    let mut repeated = 0;
    let mut most = 1;
    let mut oldest = Duration::ZERO;
    for (update, runs) in &seen {
        most = most.max(runs.len());
        repeated += runs.len() - 1;
        for &i in &runs[..runs.len() - 1] {
            let run = &finished[i];
            let killed_at = run.killed_at.expect("only killed runs are repeated");
            let (printed_at, _) = run
                .lines
                .iter()
                .find(|(_, line)| parse(line) == *update)
                .unwrap();
            let before_kill = killed_at.saturating_duration_since(*printed_at);
            oldest = oldest.max(before_kill);
            assert!(
                before_kill <= REPEAT_WINDOW,
                "{update:?} printed by run {i} {before_kill:?} before it was killed, and again \
                 by a later run: its acknowledgement should have been written"
            );
        }
    }
    let in_window: usize = finished
        .iter()
        .filter_map(|run| {
            let killed_at = run.killed_at?;
            Some(
                run.lines
                    .iter()
                    .filter(|(at, _)| killed_at.saturating_duration_since(*at) <= REPEAT_WINDOW)
                    .count(),
            )
        })
        .sum();
    assert!(repeated <= in_window);
    let printed: usize = finished.iter().map(|run| run.lines.len()).sum();
    let positioned = finished
        .iter()
        .flat_map(|run| &run.lines)
        .filter(|(_, line)| positioned(line))
        .count();
    assert!(positioned > 0, "--print-position printed no position");
    eprintln!(
        "pushed {} ({failed} failed), printed {printed} in {} runs ({positioned} with their \
         position), repeated {repeated} \
         (at most {in_window}: printed within {REPEAT_WINDOW:?} of a kill; the earliest \
         {oldest:?} before), an update at most {most} times; kills after {pauses:?} ms, \
         {refused} starts refused while the killed run's backend held the consumer; took {:?}",
        pushed.len(),
        finished.len(),
        started.elapsed()
    );
}
