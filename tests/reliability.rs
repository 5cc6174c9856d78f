//! Never lose an update: reconnects, dead connections, restarts, commit order and slow
//! consumers. Every test that touches the server runs its own throwaway cluster.

mod support;

use std::collections::HashSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use support::proxy::Proxy;
use support::{
    assert_exactly_once_in_order, cluster_config, numbered, own_cluster, sql_at, unique,
};
use tokio::sync::mpsc;
use updatepipe::{
    Config, Envelope, Error, Event, MailboxKey, PgPipe, QueueFull, ResyncReason, Update, UpdatePipe,
};

const WAIT: Duration = Duration::from_secs(60);

/// Terminates the backends of this application name (the listener's too, which adds
/// "/listen"); returns how many.
async fn terminate(admin: &tokio_postgres::Client, app: &str) -> i64 {
    admin
        .query_one(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity \
             WHERE application_name IN ($1, $1 || '/listen')",
            &[&app],
        )
        .await
        .unwrap()
        .get(0)
}

async fn backends(admin: &tokio_postgres::Client, app: &str) -> i64 {
    support::connections(admin, app).await
}

fn app(config: &Config) -> String {
    config.pg().get_application_name().unwrap().to_owned()
}

/// Receives events until `done` says so, within `WAIT`.
async fn collect(
    rx: &mut mpsc::Receiver<Event>,
    mut done: impl FnMut(&[Event]) -> bool,
) -> Vec<Event> {
    let mut events = Vec::new();
    let deadline = Instant::now() + WAIT;
    while !done(&events) {
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, rx.recv()).await {
            Ok(Some(event)) => events.push(event),
            Ok(None) => panic!(
                "event stream ended: {:?}",
                &events[events.len().saturating_sub(5)..]
            ),
            Err(_) => panic!(
                "timed out with {} events; last: {:?}",
                events.len(),
                &events[events.len().saturating_sub(5)..]
            ),
        }
    }
    events
}

fn updates(events: &[Event]) -> Vec<&Update> {
    events
        .iter()
        .filter_map(|e| match e {
            Event::Update(u) => Some(u),
            _ => None,
        })
        .collect()
}

/// Pushes `keys × each` numbered updates from `keys` tasks (one per mailbox, in order).
/// A push that fails (the server is away) is retried by this caller, as an application
/// would; returns the updates whose failed try may have committed all the same (the
/// connection broke before the answer), which may therefore arrive twice.
fn push_numbered(
    pusher: Arc<PgPipe>,
    keys: u64,
    each: u32,
) -> tokio::task::JoinHandle<HashSet<(u64, u32)>> {
    tokio::spawn(async move {
        let tasks: Vec<_> = (0..keys)
            .map(|key| {
                let pusher = pusher.clone();
                tokio::spawn(async move {
                    let mut uncertain = HashSet::new();
                    for n in 1..=each {
                        let mut tries = 0;
                        loop {
                            match pusher.push(&numbered(key, n)).await {
                                Ok(()) => break,
                                Err(e) => {
                                    uncertain.insert((key, n));
                                    tries += 1;
                                    assert!(tries < 200, "push keeps failing: {e}");
                                    tokio::time::sleep(Duration::from_millis(50)).await;
                                }
                            }
                        }
                    }
                    uncertain
                })
            })
            .collect();
        let mut uncertain = HashSet::new();
        for task in tasks {
            uncertain.extend(task.await.unwrap());
        }
        uncertain
    })
}

/// Checks that each mailbox's numbers 1 to `each` all arrive, in order, exactly once,
/// except that an update whose push was retried after an uncertain failure may arrive a
/// second time (right after the first: its retry was the caller's next push).
fn assert_complete_in_order(
    updates: &[&Update],
    keys: u64,
    each: u32,
    uncertain: &HashSet<(u64, u32)>,
) {
    let mut last = vec![0u32; keys as usize];
    for update in updates {
        let MailboxKey::Id(key) = update.key() else {
            panic!("{update:?}")
        };
        let n = update.seq_set().as_single().unwrap();
        let prev = last[*key as usize];
        if n == prev {
            assert!(
                uncertain.contains(&(*key, n)),
                "mailbox {key}: {n} arrived twice without a retry"
            );
        } else {
            assert_eq!(n, prev + 1, "mailbox {key}: out of order or missing");
        }
        last[*key as usize] = n;
    }
    assert!(
        last.iter().all(|n| *n == each),
        "missing updates: last {last:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn durable_listener_loses_nothing_across_20_terminations() {
    let cluster = own_cluster();
    let channel = unique("durable20");
    let listen_config = cluster_config(cluster.port(), &channel).with_durable(true);
    let listen_app = app(&listen_config);
    let listener = PgPipe::new(listen_config).unwrap();
    listener.migrate().await.unwrap();
    let (tx, mut rx) = mpsc::channel(100_000);
    listener.listen_events(tx).await.unwrap();
    let pusher =
        Arc::new(PgPipe::new(cluster_config(cluster.port(), &channel).with_durable(true)).unwrap());

    const KEYS: u64 = 8;
    const EACH: u32 = 1250;
    let pushing = push_numbered(pusher.clone(), KEYS, EACH);
    let admin = sql_at(cluster.port()).await;
    // Twenty terminations the listener noticed, as fast as it comes back. (Its pipe's
    // heartbeat connections share its application name: killing only those, while the
    // listener is still reconnecting, is no termination of the listener.)
    let deadline = Instant::now() + WAIT;
    while listener.stats().disconnects < 20 {
        assert!(Instant::now() < deadline, "{:?}", listener.stats());
        if backends(&admin, &listen_app).await > 0 {
            terminate(&admin, &listen_app).await;
        }
        tokio::time::sleep(Duration::from_millis(40)).await;
    }
    let uncertain = pushing.await.unwrap();
    // The server stayed up: no push failed, so every update arrives exactly once.
    assert!(uncertain.is_empty(), "{uncertain:?}");

    let total = (KEYS as usize) * EACH as usize;
    let events = collect(&mut rx, |e| updates(e).len() >= total).await;
    // Nothing more: no duplicate arrives late.
    tokio::time::sleep(Duration::from_millis(500)).await;
    while let Ok(event) = rx.try_recv() {
        assert!(
            !matches!(event, Event::Update(_)),
            "a duplicate arrived: {event:?}"
        );
    }
    assert_exactly_once_in_order(&updates(&events), KEYS, EACH);
    let resyncs = events
        .iter()
        .filter(|e| matches!(e, Event::Resync(_)))
        .count();
    assert_eq!(resyncs, 0, "durable mode needs no resync");
    // A termination can also hit a connection still being set up, which then counts as a
    // failed attempt rather than a reconnect.
    let stats = listener.stats();
    assert!(stats.reconnects >= 10, "{stats:?}");
    listener.close().await.unwrap();
    pusher.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn best_effort_listener_raises_a_resync_for_every_termination() {
    let cluster = own_cluster();
    let channel = unique("besteffort20");
    // A slower health check: a false alarm would be one resync too many.
    let listen_config = cluster_config(cluster.port(), &channel)
        .with_listen(|l| l.with_health_interval(Duration::from_secs(5)));
    let listen_app = app(&listen_config);
    let listener = PgPipe::new(listen_config).unwrap();
    let (tx, mut rx) = mpsc::channel(100_000);
    listener.listen_events(tx).await.unwrap();
    let pusher = Arc::new(PgPipe::new(cluster_config(cluster.port(), &channel)).unwrap());
    let pushing = push_numbered(pusher.clone(), 4, 2500);

    let admin = sql_at(cluster.port()).await;
    let mut terminated = 0;
    while terminated < 20 {
        // Terminate only a connected listener, once it said so.
        if backends(&admin, &listen_app).await > 0 && terminate(&admin, &listen_app).await > 0 {
            terminated += 1;
            // The listener says it lost updates before it is terminated again.
            let events = collect(&mut rx, |e| {
                e.contains(&Event::Resync(ResyncReason::Reconnected))
            })
            .await;
            let disconnected = events
                .iter()
                .filter(|e| matches!(e, Event::Disconnected { .. }))
                .count();
            assert_eq!(disconnected, 1, "{events:?}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    pushing.await.unwrap();
    listener.close().await.unwrap();
    // Every termination was followed by exactly one Disconnected and one resync.
    let stats = listener.stats();
    assert_eq!(stats.disconnects, 20, "{stats:?}");
    assert_eq!(stats.reconnects, 20, "{stats:?}");
    assert!(stats.resyncs >= 20, "{stats:?}");
    pusher.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn both_pipes_recover_from_server_restarts_and_durable_loses_nothing() {
    // Default settings: commits wait for the disk (synchronous_commit = on), as durable
    // delivery across a crash requires (a commit that is not on disk can vanish in one).
    let cluster = Arc::new(std::sync::Mutex::new(
        updatepipe::cluster::TempCluster::start().unwrap(),
    ));
    let port = cluster.lock().unwrap().port();
    let channel = unique("restart");
    let listener = PgPipe::new(cluster_config(port, &channel).with_durable(true)).unwrap();
    listener.migrate().await.unwrap();
    let (tx, mut rx) = mpsc::channel(100_000);
    listener.listen_events(tx).await.unwrap();
    let pusher = Arc::new(PgPipe::new(cluster_config(port, &channel).with_durable(true)).unwrap());

    const KEYS: u64 = 4;
    const EACH: u32 = 600;
    let pushing = push_numbered(pusher.clone(), KEYS, EACH);
    for mode in ["fast", "immediate"] {
        tokio::time::sleep(Duration::from_millis(300)).await;
        let shared = cluster.clone();
        tokio::task::spawn_blocking(move || {
            let mut cluster = shared.lock().unwrap();
            cluster.stop(mode).unwrap();
            std::thread::sleep(Duration::from_millis(300));
            cluster.restart().unwrap();
        })
        .await
        .unwrap();
        assert_eq!(
            cluster.lock().unwrap().port(),
            port,
            "restarted on its port"
        );
    }
    let uncertain = pushing.await.unwrap();
    let complete = |e: &[Event]| {
        let mut last = vec![0u32; KEYS as usize];
        for u in updates(e) {
            if let MailboxKey::Id(k) = u.key() {
                last[*k as usize] = u.seq_set().as_single().unwrap();
            }
        }
        last.iter().all(|n| *n == EACH)
    };
    let mut events = collect(&mut rx, complete).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    while let Ok(event) = rx.try_recv() {
        events.push(event);
    }
    assert_complete_in_order(&updates(&events), KEYS, EACH, &uncertain);
    // Two restarts; the second may come before the listener is back from the first.
    assert!(listener.stats().reconnects >= 1);
    listener.close().await.unwrap();
    pusher.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_blackholed_connection_is_found_within_the_health_interval() {
    let cluster = own_cluster();
    for durable in [true, false] {
        let channel = unique("blackhole");
        let proxy = Proxy::start(cluster.port()).await;
        let health = Duration::from_secs(1);
        let listen_config = cluster_config(proxy.port(), &channel)
            .with_durable(durable)
            .with_listen(|l| l.with_health_interval(health));
        let listener = PgPipe::new(listen_config).unwrap();
        if durable {
            listener.migrate().await.unwrap();
        }
        let (tx, mut rx) = mpsc::channel(10_000);
        listener.listen_events(tx).await.unwrap();
        collect(&mut rx, |e| e.contains(&Event::Connected)).await;
        let pusher =
            PgPipe::new(cluster_config(cluster.port(), &channel).with_durable(durable)).unwrap();
        pusher.push(&numbered(1, 1)).await.unwrap();
        collect(&mut rx, |e| updates(e).len() == 1).await;

        proxy.blackhole();
        let cut = Instant::now();
        let events = collect(&mut rx, |e| {
            e.iter().any(|e| matches!(e, Event::Disconnected { .. }))
        })
        .await;
        let detected = cut.elapsed();
        assert!(
            detected <= health + Duration::from_millis(300),
            "detected after {detected:?} (health interval {health:?}); {events:?}"
        );
        // Sent while the path is dead.
        for n in 2..=5 {
            pusher.push(&numbered(1, n)).await.unwrap();
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
        proxy.up();
        let events = collect(&mut rx, |e| {
            if durable {
                updates(e).len() == 4
            } else {
                e.contains(&Event::Resync(ResyncReason::Reconnected))
            }
        })
        .await;
        if durable {
            let got: Vec<u32> = updates(&events)
                .iter()
                .map(|u| u.seq_set().as_single().unwrap())
                .collect();
            assert_eq!(got, [2, 3, 4, 5]);
        }
        // And live again afterwards.
        pusher.push(&numbered(1, 6)).await.unwrap();
        let events = collect(&mut rx, |e| {
            updates(e)
                .iter()
                .any(|u| u.seq_set().as_single() == Some(6))
        })
        .await;
        assert_eq!(updates(&events).len(), 1, "durable {durable}: {events:?}");
        listener.close().await.unwrap();
        pusher.close().await.unwrap();
    }
}

/// A flood the listener reads through is no dead connection: the server writes the
/// notifications queued for the session before the answer to its next statement, so the
/// proof of a late heartbeat is answered only once the listener has read them all. With a
/// health interval of 200 ms (a proof has 40 ms), 100,000 notifications take the listener
/// far longer than that to read; it must stay on its connection and deliver every one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_that_delays_the_proofs_answer_is_no_dead_connection() {
    const KEYS: u64 = 10;
    const EACH: u32 = 10_000;
    let cluster = own_cluster();
    let channel = unique("flood_proof");
    // Room for the whole flood: the test reads it after sending it, and nothing may be let
    // go for a slow consumer.
    let listener = PgPipe::new(cluster_config(cluster.port(), &channel).with_listen(|l| {
        l.with_health_interval(Duration::from_millis(200))
            .with_max_buffered(200_000)
    }))
    .unwrap();
    let (tx, mut rx) = mpsc::channel(1_000);
    listener.listen_events(tx).await.unwrap();
    collect(&mut rx, |e| e.contains(&Event::Connected)).await;
    // One notification per update, as many pushers' single updates make: in transactions
    // of 10,000, sent as fast as the server takes them.
    let sender = sql_at(cluster.port()).await;
    let origin = updatepipe::Origin::random();
    let payloads: Vec<String> = (1..=EACH)
        .flat_map(|n| (0..KEYS).map(move |key| numbered(key, n)))
        .enumerate()
        .map(|(i, update)| Envelope::encode_v1(&origin, 1, i as u64 + 1, &[update]).unwrap())
        .collect();
    for chunk in payloads.chunks(10_000) {
        sender
            .execute(
                "SELECT pg_notify($1, p) FROM unnest($2::text[]) AS t(p)",
                &[&channel, &chunk],
            )
            .await
            .unwrap();
    }
    let mut events = Vec::new();
    let mut delivered = 0;
    while delivered < payloads.len() {
        let event = tokio::time::timeout(WAIT, rx.recv())
            .await
            .unwrap_or_else(|_| panic!("{delivered} delivered: {:?}", listener.stats()))
            .unwrap();
        match &event {
            Event::Update(_) => delivered += 1,
            Event::Disconnected { reason } => panic!("{reason}: {:?}", listener.stats()),
            _ => {}
        }
        events.push(event);
    }
    assert_exactly_once_in_order(&updates(&events), KEYS, EACH);
    // Nothing after the last update either: no disconnect, nothing let go.
    events.extend(events_within(&mut rx, Duration::from_millis(500)).await);
    let stats = listener.stats();
    assert_eq!(disconnects(&events), 0, "{stats:?}");
    assert_eq!(
        (stats.disconnects, stats.dropped_slow_consumer),
        (0, 0),
        "{stats:?}"
    );
    listener.close().await.unwrap();
}

/// Collects the events that arrive within `window`.
async fn events_within(rx: &mut mpsc::Receiver<Event>, window: Duration) -> Vec<Event> {
    let mut events = Vec::new();
    let deadline = tokio::time::Instant::now() + window;
    while let Ok(Some(event)) = tokio::time::timeout_at(deadline, rx.recv()).await {
        events.push(event);
    }
    events
}

fn disconnects(events: &[Event]) -> usize {
    events
        .iter()
        .filter(|e| matches!(e, Event::Disconnected { .. }))
        .count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_half_open_path_costs_one_reconnect_then_the_listener_stays_on_fresh_connections() {
    let cluster = own_cluster();
    for durable in [true, false] {
        let channel = unique("halfopen");
        let proxy = Proxy::start(cluster.port()).await;
        let health = Duration::from_secs(1);
        // The listener and its heartbeats' pool both go through the proxy.
        let listener =
            PgPipe::new(cluster_config(proxy.port(), &channel).with_durable(durable)).unwrap();
        if durable {
            listener.migrate().await.unwrap();
        }
        let (tx, mut rx) = mpsc::channel(10_000);
        listener.listen_events(tx).await.unwrap();
        collect(&mut rx, |e| e.contains(&Event::Connected)).await;
        let pusher =
            PgPipe::new(cluster_config(cluster.port(), &channel).with_durable(durable)).unwrap();
        pusher.push(&numbered(1, 1)).await.unwrap();
        collect(&mut rx, |e| updates(e).len() == 1).await;
        // A few heartbeats: their pooled connection sits idle in the pool between them.
        let early = events_within(&mut rx, 2 * health).await;
        assert_eq!(disconnects(&early), 0, "{early:?}");
        let accepted = proxy.accepted();

        // The path forgets every flow open now (the listener's, the pooled heartbeat
        // connection's); new ones work.
        proxy.forget_open();
        let cut = Instant::now();
        for n in 2..=5 {
            pusher.push(&numbered(1, n)).await.unwrap();
        }
        let events = collect(&mut rx, |e| {
            e.iter()
                .skip_while(|e| !matches!(e, Event::Disconnected { .. }))
                .any(|e| *e == Event::Connected)
        })
        .await;
        let back = cut.elapsed();
        assert!(
            back <= 2 * health + Duration::from_millis(300),
            "durable {durable}: back after {back:?}; {events:?}"
        );
        assert!(proxy.accepted() > accepted, "on fresh connections");

        // Then it stays connected: no further disconnect for five health intervals, with
        // updates flowing.
        let mut watched = events;
        let watch = Instant::now();
        let mut n = 6;
        while watch.elapsed() < 5 * health {
            pusher.push(&numbered(1, n)).await.unwrap();
            n += 1;
            watched.extend(events_within(&mut rx, health / 4).await);
        }
        watched.extend(events_within(&mut rx, health / 2).await);
        assert_eq!(
            disconnects(&watched),
            1,
            "durable {durable}: one fault, one disconnect: {watched:?}"
        );
        let stats = listener.stats();
        assert_eq!(stats.disconnects, 1, "durable {durable}: {stats:?}");
        assert_eq!(stats.reconnects, 1, "durable {durable}: {stats:?}");
        let got: Vec<u32> = updates(&watched)
            .iter()
            .map(|u| u.seq_set().as_single().unwrap())
            .collect();
        if durable {
            // Nothing lost, nothing twice.
            assert_eq!(got, (2..n).collect::<Vec<_>>(), "durable: {watched:?}");
        } else {
            // What was pushed once the listener was back arrived, once each.
            let live: Vec<u32> = got.iter().copied().filter(|g| *g >= 6).collect();
            assert_eq!(live, (6..n).collect::<Vec<_>>(), "best effort: {watched:?}");
        }
        listener.close().await.unwrap();
        pusher.close().await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lock_on_the_log_leaves_no_backends_behind_and_loses_no_committed_push() {
    let cluster = own_cluster();
    let channel = unique("locked");
    let health = Duration::from_secs(1);
    const POOL: usize = 2;
    let listen_config = cluster_config(cluster.port(), &channel)
        .with_durable(true)
        .with_push(|p| p.with_pool_size(POOL));
    let listen_app = app(&listen_config);
    let listener = PgPipe::new(listen_config).unwrap();
    listener.migrate().await.unwrap();
    let (tx, mut rx) = mpsc::channel(100_000);
    listener.listen_events(tx).await.unwrap();
    collect(&mut rx, |e| e.contains(&Event::Connected)).await;
    let push_config = cluster_config(cluster.port(), &channel)
        .with_durable(true)
        .with_push(|p| p.with_pool_size(POOL))
        .with_push(|p| p.with_timeout(health));
    let push_app = app(&push_config);
    let pusher = Arc::new(PgPipe::new(push_config).unwrap());
    pusher.push(&numbered(0, 1)).await.unwrap();
    collect(&mut rx, |e| updates(e).len() == 1).await;

    // What VACUUM FULL or a stuck migration does: the log locked for five intervals.
    let mut locker = sql_at(cluster.port()).await;
    let lock = locker.transaction().await.unwrap();
    lock.batch_execute("LOCK updatepipe.log IN ACCESS EXCLUSIVE MODE")
        .await
        .unwrap();
    let pushing = Arc::new(std::sync::atomic::AtomicBool::new(true));
    const KEYS: u64 = 4;
    let tasks: Vec<_> = (1..=KEYS)
        .map(|key| {
            let pusher = pusher.clone();
            let pushing = pushing.clone();
            tokio::spawn(async move {
                let mut committed = Vec::new();
                let mut n = 0;
                while pushing.load(std::sync::atomic::Ordering::SeqCst) {
                    n += 1;
                    match pusher.push(&numbered(key, n)).await {
                        Ok(()) => committed.push(n),
                        Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
                    }
                }
                committed
            })
        })
        .collect();
    let admin = sql_at(cluster.port()).await;
    let (mut most_listen, mut most_push) = (0, 0);
    let locked = Instant::now();
    while locked.elapsed() < 5 * health {
        most_listen = most_listen.max(backends(&admin, &listen_app).await);
        most_push = most_push.max(backends(&admin, &push_app).await);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let during = listener.stats();
    eprintln!(
        "during the lock: at most {most_listen} listener-pipe and {most_push} pusher backends; \
         {} queries cancelled",
        during.queries_cancelled
    );
    lock.rollback().await.unwrap();
    // Pushing goes on a moment after the lock, then stops.
    tokio::time::sleep(health).await;
    pushing.store(false, std::sync::atomic::Ordering::SeqCst);
    let mut committed = Vec::new();
    for (key, task) in (1..=KEYS).zip(tasks) {
        committed.extend(task.await.unwrap().into_iter().map(|n| (key, n)));
    }
    assert!(
        most_listen <= POOL as i64 + 1,
        "the listener's pipe had {most_listen} backends (pool {POOL} + 1)"
    );
    assert!(
        most_push <= POOL as i64,
        "the pusher had {most_push} backends (pool {POOL})"
    );
    assert!(
        during.queries_cancelled >= 1,
        "the blocked log reads were cancelled: {during:?}"
    );
    assert_eq!(during.disconnects, 0, "no reconnect storm: {during:?}");
    assert!(!committed.is_empty());

    // Every push that returned Ok arrives, exactly once.
    let wanted: HashSet<(u64, u32)> = committed.iter().copied().collect();
    let events = collect(&mut rx, |e| {
        let got: HashSet<(u64, u32)> = updates(e)
            .iter()
            .filter_map(|u| match u.key() {
                MailboxKey::Id(key) => Some((*key, u.seq_set().as_single().unwrap())),
                _ => None,
            })
            .collect();
        wanted.is_subset(&got)
    })
    .await;
    let mut seen = HashSet::new();
    for u in updates(&events) {
        let MailboxKey::Id(key) = u.key() else {
            panic!("{u:?}")
        };
        let n = u.seq_set().as_single().unwrap();
        assert!(seen.insert((*key, n)), "({key}, {n}) arrived twice");
    }
    assert_eq!(listener.stats().disconnects, 0);
    listener.close().await.unwrap();
    pusher.close().await.unwrap();
    assert_eq!(support::connections_left(&admin, &push_app).await, 0);
    assert_eq!(support::connections_left(&admin, &listen_app).await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_push_storm_during_an_outage_stays_within_the_queue_bound() {
    let cluster = own_cluster();
    const BOUND: usize = 16;
    const STORM: u32 = 200;
    let timeout = Duration::from_secs(1);
    for when_full in [QueueFull::Fail, QueueFull::Wait] {
        let proxy = Proxy::start(cluster.port()).await;
        let config = cluster_config(proxy.port(), &unique("storm"))
            .with_push(|p| p.with_max_queued_pushes(BOUND))
            .with_push(|p| p.with_queue_full(when_full))
            .with_push(|p| p.with_timeout(timeout));
        let pipe = Arc::new(PgPipe::new(config).unwrap());
        pipe.push(&numbered(1, 1)).await.unwrap();
        // The server stops answering: the push in flight hangs, the others pile up.
        proxy.hold();
        let tasks: Vec<_> = (1..=STORM)
            .map(|n| {
                let pipe = pipe.clone();
                tokio::spawn(async move {
                    let started = Instant::now();
                    let outcome = pipe.push(&numbered(2, n)).await;
                    (outcome, started.elapsed())
                })
            })
            .collect();
        let (mut full, mut timed_out, mut slowest) = (0, 0, Duration::ZERO);
        for task in tasks {
            let (outcome, took) = task.await.unwrap();
            slowest = slowest.max(took);
            match outcome {
                Err(Error::QueueFull { pushes, .. }) => {
                    assert_eq!(pushes, BOUND);
                    full += 1;
                }
                Err(Error::Timeout { .. }) => timed_out += 1,
                other => panic!("{when_full:?}: {other:?}"),
            }
        }
        let peak = pipe.stats().push_queue_peak;
        eprintln!(
            "{when_full:?}: {full} refused, {timed_out} timed out, peak {peak} queued, slowest {slowest:?}"
        );
        assert!(peak <= BOUND as u64, "{when_full:?}: peak {peak}");
        assert!(peak >= 1, "{when_full:?}: the queue was used");
        match when_full {
            // Past the bound: refused at once; the flight out and the queued ones time out.
            QueueFull::Fail => {
                assert!(full >= STORM as usize - BOUND - 1, "{full} refused");
                assert_eq!(full + timed_out, STORM as usize);
            }
            // Past the bound: wait, within the push timeout.
            _ => {
                assert_eq!(full, 0);
                assert_eq!(timed_out, STORM as usize);
            }
        }
        assert!(
            slowest <= timeout + Duration::from_millis(500),
            "{when_full:?}: a push took {slowest:?}"
        );
        // Back: pushes go through again.
        proxy.up();
        let mut tries = 0;
        while pipe.push(&numbered(3, 1)).await.is_err() {
            tries += 1;
            assert!(tries < 20, "pushes do not recover");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        pipe.close().await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_listener_samples_a_filling_notification_queue() {
    let cluster = own_cluster();
    let listener = PgPipe::new(
        cluster_config(cluster.port(), &unique("queuewatch"))
            .with_listen(|l| l.with_queue_warn(0.000_01)),
    )
    .unwrap();
    let (tx, mut rx) = mpsc::channel(100);
    listener.listen_events(tx).await.unwrap();
    collect(&mut rx, |e| e.contains(&Event::Connected)).await;
    // A foreign session listens, then sits in an open transaction: the queue is held.
    let holder = sql_at(cluster.port()).await;
    holder.batch_execute("LISTEN held").await.unwrap();
    holder.batch_execute("BEGIN").await.unwrap();
    let sender = sql_at(cluster.port()).await;
    for _ in 0..64 {
        sender
            .batch_execute("SELECT pg_notify('held', repeat('x', 7900))")
            .await
            .unwrap();
    }
    // Sampled every health interval (1 s).
    let deadline = Instant::now() + Duration::from_secs(5);
    let usage = loop {
        let usage = listener.stats().queue_usage().unwrap_or(0.0);
        if usage > 0.000_05 || Instant::now() > deadline {
            break usage;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    // 64 pages of about a million.
    assert!(usage > 0.000_05, "sampled {usage}");
    holder.batch_execute("COMMIT").await.unwrap();
    listener.close().await.unwrap();
}

/// A full notification queue is `status`'s "unhealthy" (`Status::queue_full`, exit 6),
/// not a raw error from its probe's NOTIFY (exit 4 before). Filling the queue in a test
/// takes `max_notify_queue_pages` (PostgreSQL 17 and later; `.ci/pg-matrix` runs this file
/// on 17 and 18): before 17 the queue is 8 GB, and the test says that it did not run.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_reports_a_full_notification_queue_as_unhealthy() {
    let mut cluster = own_cluster();
    let admin = sql_at(cluster.port()).await;
    let version: i32 = admin
        .query_one("SELECT current_setting('server_version_num')::int", &[])
        .await
        .unwrap()
        .get(0);
    if version < 170_000 {
        eprintln!("not run: PostgreSQL {version} has no max_notify_queue_pages (17 and later)");
        return;
    }
    admin
        .batch_execute("ALTER SYSTEM SET max_notify_queue_pages = 64")
        .await
        .unwrap();
    drop(admin);
    tokio::task::block_in_place(|| cluster.restart().unwrap());
    let config = cluster_config(cluster.port(), &unique("queuefull"));
    let url = format!("postgres://postgres@127.0.0.1:{}/postgres", cluster.port());
    let status_cli = |extra: &[&str]| {
        let mut args = vec!["status", "--url", &url];
        args.extend_from_slice(extra);
        std::process::Command::new(env!("CARGO_BIN_EXE_updatepipe"))
            .args(args)
            .output()
            .unwrap()
    };
    // A foreign session listens, then sits in an open transaction: the queue is held, and
    // fills until the server refuses NOTIFY.
    let holder = sql_at(cluster.port()).await;
    holder.batch_execute("LISTEN held").await.unwrap();
    holder.batch_execute("BEGIN").await.unwrap();
    let sender = sql_at(cluster.port()).await;
    let mut sent = 0;
    let refused = loop {
        match sender
            .batch_execute("SELECT pg_notify('held', repeat('x', 7900))")
            .await
        {
            Ok(()) => sent += 1,
            Err(e) => break e,
        }
        assert!(sent < 10_000, "the queue never filled");
    };
    assert_eq!(
        refused.code(),
        Some(&tokio_postgres::error::SqlState::PROGRAM_LIMIT_EXCEEDED),
        "{refused}"
    );

    let pipe = PgPipe::new(config).unwrap();
    let status = pipe.status().await.unwrap();
    assert!(status.queue_full, "{status:?}");
    assert_eq!(status.listen_works, None, "{status:?}");
    for extra in [&[][..], &["--queue-fail", "100"]] {
        let output = status_cli(extra);
        let stdout = String::from_utf8_lossy(&output.stdout);
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(6), "{extra:?}: {stdout}{stderr}");
        assert!(stdout.contains("% FULL"), "{stdout}");
        assert!(
            stdout.contains("LISTEN works        unknown (the full notification queue"),
            "{stdout}"
        );
        let last = stderr.lines().last().unwrap_or_default();
        assert!(
            last.starts_with("updatepipe: the notification queue is full"),
            "{stderr}"
        );
    }

    // Once the holder goes on, the queue drains: healthy again.
    holder.batch_execute("COMMIT").await.unwrap();
    let status = pipe.status().await.unwrap();
    assert!(!status.queue_full, "{status:?}");
    assert_eq!(status.listen_works, Some(true), "{status:?}");
    let output = status_cli(&[]);
    assert!(output.status.success(), "{output:?}");
    eprintln!("the queue of 64 pages was full after {sent} notifications of 7.9 kB");
    pipe.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_listener_started_before_its_server_becomes_live_once_it_is_there() {
    let cluster = own_cluster();
    let proxy = Proxy::start(cluster.port()).await;
    let owner = PgPipe::new(cluster_config(cluster.port(), "updatepipe")).unwrap();
    owner.migrate().await.unwrap();
    owner.close().await.unwrap();
    // Durable too: its schema check before listening waits for the server as well.
    for durable in [false, true] {
        proxy.down();
        let channel = unique("waiting");
        let config = |port| cluster_config(port, &channel).with_durable(durable);
        // Fail fast by default.
        let eager = PgPipe::new(config(proxy.port())).unwrap();
        let (tx, _rx) = mpsc::channel(10);
        assert!(eager.listen_events(tx).await.unwrap_err().is_connection());
        eager.close().await.unwrap();

        let listener = Arc::new(
            PgPipe::new(config(proxy.port()).with_listen(|l| l.with_wait_for_server(true)))
                .unwrap(),
        );
        let (tx, mut rx) = mpsc::channel(100);
        let listening = {
            let listener = listener.clone();
            tokio::spawn(async move { listener.listen_events(tx).await })
        };
        tokio::time::sleep(Duration::from_secs(2)).await;
        assert!(
            !listening.is_finished(),
            "still waiting for the server (durable: {durable})"
        );
        proxy.up();
        let up = Instant::now();
        listening.await.unwrap().unwrap();
        collect(&mut rx, |e| e.contains(&Event::Connected)).await;
        // The backoff's cap is 500 ms in these tests.
        assert!(
            up.elapsed() < Duration::from_secs(2),
            "live {:?} after (durable: {durable})",
            up.elapsed()
        );
        let pusher = PgPipe::new(config(cluster.port())).unwrap();
        pusher.push(&numbered(1, 1)).await.unwrap();
        let events = collect(&mut rx, |e| updates(e).len() == 1).await;
        assert_eq!(updates(&events), [&numbered(1, 1)]);
        listener.close().await.unwrap();
        pusher.close().await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_best_effort_listener_outlives_the_servers_idle_session_timeout() {
    support::init_logging();
    // PostgreSQL 13 has no idle_session_timeout (it came in 14): there the server cannot end
    // an idle session, the pipe finds no such setting, and the listener must stay connected
    // all the same.
    let with_timeout = updatepipe::cluster::TempCluster::builder()
        .setting("synchronous_commit", "off")
        .setting("idle_session_timeout", "2s")
        .start();
    let (cluster, expected) = match with_timeout {
        Ok(cluster) => (cluster, Some(2000)),
        Err(e)
            if e.to_string()
                .contains("unrecognized configuration parameter") =>
        {
            (own_cluster(), None)
        }
        Err(e) => panic!("{e}"),
    };
    let channel = unique("idle");
    // Heartbeats every 5 s: the listening connection is idle longer than the timeout.
    let listener = PgPipe::new(
        cluster_config(cluster.port(), &channel)
            .with_listen(|l| l.with_health_interval(Duration::from_secs(10))),
    )
    .unwrap();
    let status = listener.status().await.unwrap();
    assert_eq!(status.idle_session_timeout_ms, expected);
    let (tx, mut rx) = mpsc::channel(100);
    listener.listen_events(tx).await.unwrap();
    // Four times the timeout.
    let events = events_within(&mut rx, Duration::from_secs(8)).await;
    assert_eq!(disconnects(&events), 0, "{events:?}");
    assert_eq!(listener.stats().disconnects, 0);
    let pusher = PgPipe::new(cluster_config(cluster.port(), &channel)).unwrap();
    pusher.push(&numbered(1, 1)).await.unwrap();
    let events = collect(&mut rx, |e| updates(e).len() == 1).await;
    assert_eq!(disconnects(&events), 0, "{events:?}");
    listener.close().await.unwrap();
    pusher.close().await.unwrap();
}

/// A transaction can take a later transaction id and an earlier log id than one that
/// commits before it: the reader's snapshot then does not list it as in progress (a
/// snapshot's `xmax` is one past the newest *completed* transaction, so a running one
/// above it is in no list), and its row sits below the highest id the reader saw. It must
/// still be read once it commits. Seen under load in `tests/consumers.rs`: one update in
/// about ten runs of two senders was never delivered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_later_transaction_with_an_earlier_log_id_is_not_skipped() {
    // No autovacuum, and no heartbeats: no other transaction completes meanwhile, whose
    // id would put the later one in the snapshot's list.
    let cluster = updatepipe::cluster::TempCluster::builder()
        .setting("autovacuum", "off")
        .start()
        .unwrap();
    let channel = unique("xidlater");
    let config = cluster_config(cluster.port(), &channel)
        .with_durable(true)
        .with_listen(|l| l.with_health_interval(Duration::ZERO));
    let listener = PgPipe::new(config.clone()).unwrap();
    listener.migrate().await.unwrap();
    let (tx, mut rx) = mpsc::channel(1000);
    listener.listen_events(tx).await.unwrap();
    let store = PgPipe::new(config).unwrap();
    store.init_push().await.unwrap();

    let mut earlier = sql_at(cluster.port()).await;
    let mut later = sql_at(cluster.port()).await;
    let first = earlier.transaction().await.unwrap();
    first
        .batch_execute("SELECT pg_current_xact_id()")
        .await
        .unwrap(); // the lower xid
    let second = later.transaction().await.unwrap();
    store.push_in(&second, &numbered(2, 1)).await.unwrap(); // a higher xid, the lower id
    store.push_in(&first, &numbered(1, 1)).await.unwrap(); // the higher id
    first.commit().await.unwrap();
    let events = collect(&mut rx, |e| updates(e).len() == 1).await;
    assert_eq!(updates(&events), [&numbered(1, 1)]);

    second.commit().await.unwrap();
    let events = collect(&mut rx, |e| updates(e).len() == 1).await;
    assert_eq!(updates(&events), [&numbered(2, 1)]);
    tokio::time::sleep(Duration::from_millis(500)).await;
    while let Ok(event) = rx.try_recv() {
        assert!(
            !matches!(event, Event::Update(_)),
            "a duplicate arrived: {event:?}"
        );
    }
    listener.close().await.unwrap();
    store.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transactions_committing_out_of_id_order_across_a_disconnect_arrive_once() {
    let cluster = own_cluster();
    let channel = unique("xidorder");
    let proxy = Proxy::start(cluster.port()).await;
    let listener = PgPipe::new(cluster_config(proxy.port(), &channel).with_durable(true)).unwrap();
    listener.migrate().await.unwrap();
    let (tx, mut rx) = mpsc::channel(1000);
    listener.listen_events(tx).await.unwrap();
    let store = PgPipe::new(cluster_config(cluster.port(), &channel).with_durable(true)).unwrap();

    let mut first = sql_at(cluster.port()).await;
    let mut second = sql_at(cluster.port()).await;
    let t1 = first.transaction().await.unwrap();
    store.push_in(&t1, &numbered(1, 1)).await.unwrap(); // takes the lower log id
    let t2 = second.transaction().await.unwrap();
    store.push_in(&t2, &numbered(2, 1)).await.unwrap(); // takes the higher log id
    t2.commit().await.unwrap(); // ...and commits first
    let events = collect(&mut rx, |e| updates(e).len() == 1).await;
    assert_eq!(updates(&events), [&numbered(2, 1)]);

    // The listener loses its connection; the older transaction commits meanwhile.
    proxy.down();
    collect(&mut rx, |e| {
        e.iter().any(|e| matches!(e, Event::Disconnected { .. }))
    })
    .await;
    t1.commit().await.unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    proxy.up();

    let events = collect(&mut rx, |e| updates(e).len() == 1).await;
    assert_eq!(updates(&events), [&numbered(1, 1)]);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    while let Ok(event) = rx.try_recv() {
        assert!(
            !matches!(event, Event::Update(_)),
            "a duplicate arrived: {event:?}"
        );
    }
    listener.close().await.unwrap();
    store.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversize_updates_travel_through_the_log() {
    let cluster = own_cluster();
    let channel = unique("oversize");
    let durable_config = cluster_config(cluster.port(), &channel).with_durable(true);
    let durable = PgPipe::new(durable_config).unwrap();
    durable.migrate().await.unwrap();
    let (dtx, mut drx) = mpsc::channel(100);
    durable.listen_events(dtx).await.unwrap();
    // A best-effort listener on the same channel gets them too, through the reference.
    let best_effort = PgPipe::new(cluster_config(cluster.port(), &channel)).unwrap();
    let (btx, mut brx) = mpsc::channel(100);
    best_effort.listen(btx).await.unwrap();

    let pusher = PgPipe::new(cluster_config(cluster.port(), &channel).with_durable(true)).unwrap();
    let sent = [
        Update::mailbox_destroyed(MailboxKey::Name("k".repeat(8_000))),
        numbered(3, 1),
        Update::mailbox_destroyed(MailboxKey::Name("m".repeat(100_000))),
        numbered(3, 2),
    ];
    for update in &sent {
        pusher.push(update).await.unwrap();
    }
    let events = collect(&mut drx, |e| updates(e).len() == sent.len()).await;
    let got: Vec<Update> = updates(&events).into_iter().cloned().collect();
    assert_eq!(got, sent);
    let mut got = Vec::new();
    for _ in 0..sent.len() {
        got.push(
            tokio::time::timeout(WAIT, brx.recv())
                .await
                .unwrap()
                .unwrap(),
        );
    }
    assert_eq!(got, sent, "best-effort listener, in order");

    // Without durable mode the same update is a typed error.
    let plain = PgPipe::new(cluster_config(cluster.port(), &channel)).unwrap();
    let err = plain.push(&sent[0]).await.unwrap_err();
    assert!(matches!(err, Error::PayloadTooLarge { .. }), "{err}");
    for pipe in [durable, best_effort, pusher, plain] {
        pipe.close().await.unwrap();
    }
}

/// A listener that holds at most `bound` updates for an application reading through a
/// channel of 10, connected; then 5,000 updates pushed to it, 100 to a push (one
/// notification each), before the application reads any.
async fn pushed_to_a_bounded_listener(
    name: &str,
    bound: usize,
) -> (PgPipe, mpsc::Receiver<Event>, PgPipe, Vec<Update>) {
    let channel = unique(name);
    let listener =
        PgPipe::new(support::config_on(&channel).with_listen(|l| l.with_max_buffered(bound)))
            .unwrap();
    let (tx, mut rx) = mpsc::channel(10);
    listener.listen_events(tx).await.unwrap();
    assert_eq!(
        tokio::time::timeout(WAIT, rx.recv()).await.unwrap(),
        Some(Event::Connected)
    );
    let pusher = PgPipe::new(support::config_on(&channel)).unwrap();
    let sent: Vec<Update> = (1..=5_000).map(|n| numbered(1, n)).collect();
    for chunk in sent.chunks(100) {
        pusher.push_many(chunk).await.unwrap();
    }
    (listener, rx, pusher, sent)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_consumer_is_bounded_and_told_to_resync() {
    let bound = 200;
    let (listener, mut rx, pusher, sent) = pushed_to_a_bounded_listener("slow", bound).await;
    // The application has not read. The listener waited a moment for it (1 s), then kept
    // draining the server's queue and let go of what exceeded its bound.
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    assert!(listener.stats().dropped_slow_consumer > 0);
    let usage = listener.queue_usage().await.unwrap();
    assert!((0.0..1.0).contains(&usage));
    let events = collect(&mut rx, |e| e.iter().any(|e| matches!(e, Event::Resync(_)))).await;
    let delivered = updates(&events).len();
    // The bound (twice it, had a statement run during the wait for the application),
    // passed by one notification's updates at most (100 here), and what the channel holds.
    assert!(
        delivered <= 2 * bound + 100 + 10,
        "held {delivered}, bound {bound}"
    );
    let Some(Event::Resync(ResyncReason::SlowConsumer { dropped })) = events.last() else {
        panic!("{:?}", events.last());
    };
    assert_eq!(*dropped as usize + delivered, sent.len());
    // What was delivered is the oldest, in order.
    let got: Vec<&Update> = updates(&events);
    assert_eq!(got, sent.iter().take(delivered).collect::<Vec<_>>());
    // Live again afterwards.
    pusher.push(&numbered(2, 1)).await.unwrap();
    let events = collect(&mut rx, |e| updates(e).len() == 1).await;
    assert_eq!(updates(&events), [&numbered(2, 1)]);
    listener.close().await.unwrap();
    pusher.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_consumer_starved_for_a_moment_loses_nothing() {
    // 25 times the bound arrive while the application does not read for 300 ms (a busy
    // machine, say): reading waits for it, the server's queue holding the rest meanwhile.
    // (Without that wait, all but about the bound were let go.)
    let bound = 200;
    let (listener, mut rx, pusher, sent) = pushed_to_a_bounded_listener("starved", bound).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let events = collect(&mut rx, |e| updates(e).len() == sent.len()).await;
    assert_eq!(updates(&events), sent.iter().collect::<Vec<_>>());
    assert!(
        !events.iter().any(|e| matches!(e, Event::Resync(_))),
        "{events:?}"
    );
    let stats = listener.stats();
    assert_eq!(
        (stats.dropped_slow_consumer, stats.disconnects),
        (0, 0),
        "{stats:?}"
    );
    listener.close().await.unwrap();
    pusher.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_durable_consumer_gets_everything_later() {
    let channel = unique("slowdurable");
    let listener = PgPipe::new(
        support::config_on(&channel)
            .with_durable(true)
            .with_listen(|l| l.with_max_buffered(100)),
    )
    .unwrap();
    listener.migrate().await.unwrap();
    let (tx, mut rx) = mpsc::channel(10);
    listener.listen_events(tx).await.unwrap();
    let pusher = PgPipe::new(support::config_on(&channel).with_durable(true)).unwrap();
    let sent: Vec<Update> = (1..=3_000).map(|n| numbered(1, n)).collect();
    for chunk in sent.chunks(100) {
        pusher.push_many(chunk).await.unwrap();
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let events = collect(&mut rx, |e| updates(e).len() == sent.len()).await;
    assert_eq!(updates(&events), sent.iter().collect::<Vec<_>>());
    assert!(!events.iter().any(|e| matches!(e, Event::Resync(_))));
    listener.close().await.unwrap();
    pusher.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_skipped_sequence_number_raises_a_resync_without_a_disconnect() {
    let channel = unique("gap");
    let listener = PgPipe::new(support::config_on(&channel)).unwrap();
    let (tx, mut rx) = mpsc::channel(100);
    listener.listen_events(tx).await.unwrap();
    let pusher = PgPipe::new(support::config_on(&channel)).unwrap();
    pusher.push(&numbered(1, 1)).await.unwrap();
    collect(&mut rx, |e| updates(e).len() == 1).await;
    // The same sender's envelope 7 when 2 was due (as if 2 to 6 had been lost).
    let payload = Envelope::encode_v1(pusher.origin(), 1, 7, &[numbered(1, 7)]).unwrap();
    support::sql()
        .await
        .execute("SELECT pg_notify($1, $2)", &[&channel, &payload])
        .await
        .unwrap();
    let events = collect(&mut rx, |e| e.iter().any(|e| matches!(e, Event::Resync(_)))).await;
    assert!(
        events.contains(&Event::Resync(ResyncReason::SequenceGap {
            origin: pusher.origin().to_string(),
            expected: 2,
            got: 7
        })),
        "{events:?}"
    );
    // Pushes inside callers' transactions are not checked: they may roll back.
    let mut client = support::sql().await;
    let t = client.transaction().await.unwrap();
    pusher.push_in(&t, &numbered(1, 8)).await.unwrap();
    t.rollback().await.unwrap();
    pusher.push_in(&client, &numbered(1, 9)).await.unwrap();
    let events = collect(&mut rx, |e| updates(e).len() == 1).await;
    assert!(
        !events.iter().any(|e| matches!(e, Event::Resync(_))),
        "{events:?}"
    );
    listener.close().await.unwrap();
    pusher.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pushes_during_an_outage_fail_within_the_timeout_then_recover() {
    let mut cluster = own_cluster();
    let channel = unique("outage");
    let config = cluster_config(cluster.port(), &channel)
        .with_push(|p| p.with_timeout(Duration::from_secs(2)));
    let pusher = PgPipe::new(config).unwrap();
    pusher.push(&numbered(1, 1)).await.unwrap();
    let cluster = tokio::task::spawn_blocking(move || {
        cluster.stop("fast").unwrap();
        cluster
    })
    .await
    .unwrap();
    let started = Instant::now();
    let err = pusher.push(&numbered(1, 2)).await.unwrap_err();
    let took = started.elapsed();
    assert!(err.is_connection(), "{err:?}");
    assert!(took < Duration::from_secs(4), "failed after {took:?}");
    assert!(!err.to_string().is_empty());
    let mut cluster = cluster;
    let cluster = tokio::task::spawn_blocking(move || {
        cluster.restart().unwrap();
        cluster
    })
    .await
    .unwrap();
    // The first push after the server is back succeeds.
    pusher.push(&numbered(1, 3)).await.unwrap();
    pusher.close().await.unwrap();
    drop(cluster);
}

#[tokio::test]
async fn retention_prunes_and_a_listener_away_too_long_gets_a_resync() {
    let cluster = own_cluster();
    let channel = unique("prune");
    let proxy = Proxy::start(cluster.port()).await;
    let listen_config = cluster_config(proxy.port(), &channel)
        .with_durable(true)
        .with_listen(|l| l.with_retention(Duration::from_secs(1)));
    let listener = PgPipe::new(listen_config).unwrap();
    listener.migrate().await.unwrap();
    let (tx, mut rx) = mpsc::channel(100);
    listener.listen_events(tx).await.unwrap();
    let pusher = PgPipe::new(cluster_config(cluster.port(), &channel).with_durable(true)).unwrap();
    pusher.push(&numbered(1, 1)).await.unwrap();
    collect(&mut rx, |e| updates(e).len() == 1).await;

    proxy.down();
    collect(&mut rx, |e| {
        e.iter().any(|e| matches!(e, Event::Disconnected { .. }))
    })
    .await;
    pusher.push(&numbered(1, 2)).await.unwrap();
    // Away longer than the retention; another node prunes meanwhile.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let pruner = PgPipe::new(
        cluster_config(cluster.port(), &channel)
            .with_durable(true)
            .with_listen(|l| l.with_retention(Duration::from_secs(1))),
    )
    .unwrap();
    let (ptx, _prx) = mpsc::channel(100);
    pruner.listen(ptx).await.unwrap();
    let admin = sql_at(cluster.port()).await;
    let left = support::pruned_within(&admin, &channel, WAIT).await;
    assert_eq!(left, 0, "the log was never pruned");
    proxy.up();
    let events = collect(&mut rx, |e| {
        e.contains(&Event::Resync(ResyncReason::LogPruned))
    })
    .await;
    assert!(updates(&events).is_empty(), "no partial replay: {events:?}");
    for pipe in [listener, pusher, pruner] {
        pipe.close().await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_durable_listener_can_replay_from_a_time_or_a_position() {
    let channel = unique("since");
    let pusher = PgPipe::new(support::config_on(&channel).with_durable(true)).unwrap();
    pusher.migrate().await.unwrap();
    let sent: Vec<Update> = (1..=3).map(|n| numbered(9, n)).collect();
    for update in &sent {
        pusher.push(update).await.unwrap();
    }
    let client = support::sql().await;
    let second: i64 = client
        .query_one(
            "SELECT id FROM updatepipe.log WHERE channel = $1 ORDER BY id OFFSET 1 LIMIT 1",
            &[&channel],
        )
        .await
        .unwrap()
        .get(0);
    let cases = [
        (
            updatepipe::Since::Time(std::time::SystemTime::now() - Duration::from_secs(3600)),
            0,
        ),
        (updatepipe::Since::Position(0), 0),
        (updatepipe::Since::Position(second), 2),
    ];
    for (since, skip) in cases {
        let listener = PgPipe::new(
            support::config_on(&channel)
                .with_durable(true)
                .with_listen(|l| l.with_since(since.clone())),
        )
        .unwrap();
        let (tx, mut rx) = mpsc::channel(100);
        listener.listen_events(tx).await.unwrap();
        let expected = &sent[skip..];
        let events = collect(&mut rx, |e| updates(e).len() == expected.len()).await;
        assert_eq!(
            updates(&events),
            expected.iter().collect::<Vec<_>>(),
            "{since:?}"
        );
        // And live afterwards, without repeating the replay.
        tokio::time::sleep(Duration::from_millis(300)).await;
        while let Ok(event) = rx.try_recv() {
            assert!(
                !matches!(event, Event::Update(_)),
                "{since:?}: a duplicate {event:?}"
            );
        }
        assert_eq!(listener.stats().replayed, expected.len() as u64);
        listener.close().await.unwrap();
    }
    pusher.close().await.unwrap();
}

/// A push whose caller gives up while its flight is out (sent, not yet answered) does not
/// cut short the flight pipelined behind it on the same connection: that one commits after
/// it, in number order (no resync), and its push succeeds. The connection goes on serving
/// (tokio-postgres discards the answer nobody waits for): no reconnect.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_push_given_up_in_flight_does_not_cut_short_the_flight_behind_it() {
    let cluster = own_cluster();
    let channel = unique("givenup");
    let listener = PgPipe::new(cluster_config(cluster.port(), &channel)).unwrap();
    let (tx, mut rx) = mpsc::channel(100);
    listener.listen(tx).await.unwrap();
    let proxy = Proxy::start(cluster.port()).await;
    let pusher = Arc::new(
        PgPipe::new(cluster_config(proxy.port(), &channel).with_push(|p| p.with_max_in_flight(2)))
            .unwrap(),
    );
    // The push connection is open and its statements prepared.
    pusher.push(&numbered(1, 1)).await.unwrap();
    assert_eq!(support::receive_exactly(&mut rx, 1).await, [numbered(1, 1)]);

    proxy.hold();
    let first = tokio::spawn({
        let pusher = pusher.clone();
        async move { pusher.push(&numbered(1, 2)).await }
    });
    // Within the push timeout (3 s), so that nothing here is a retry after one.
    let deadline = Instant::now() + Duration::from_secs(2);
    while proxy.held() == 0 {
        assert!(Instant::now() < deadline, "the first flight never went out");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let second = tokio::spawn({
        let pusher = pusher.clone();
        async move { pusher.push(&numbered(1, 3)).await }
    });
    // The second goes out at once, behind the first, on the same connection.
    while proxy.held() < 2 {
        assert!(
            Instant::now() < deadline,
            "the second flight waited for the first"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert_eq!(proxy.accepted(), 1);
    first.abort();
    assert!(first.await.unwrap_err().is_cancelled());
    proxy.up();
    second.await.unwrap().unwrap();
    // The first was sent before it was given up: it commits too, first.
    assert_eq!(
        support::receive_exactly(&mut rx, 2).await,
        [numbered(1, 2), numbered(1, 3)]
    );
    pusher.push(&numbered(1, 4)).await.unwrap();
    assert_eq!(support::receive_exactly(&mut rx, 1).await, [numbered(1, 4)]);
    assert_eq!(listener.stats().resyncs, 0, "{:?}", listener.stats());
    assert_eq!(proxy.accepted(), 1, "one connection throughout");
    pusher.close().await.unwrap();
    listener.close().await.unwrap();
}

/// A runtime shut down with a push in flight and another queued behind it: the flusher
/// task the first starts for the second as it is dropped never runs (the runtime is
/// closing), and must not leave its flight counted. Pushes from another runtime go out,
/// and `close` returns.
#[test]
fn a_runtime_shut_down_mid_flight_leaves_the_pipe_usable() {
    let cluster = own_cluster();
    let channel = unique("midflight");
    // The proxy and the listener live on a runtime of their own, which stays.
    let side = support::runtime();
    let proxy = side.block_on(Proxy::start(cluster.port()));
    let (listener, mut rx) = side.block_on(async {
        let listener = PgPipe::new(cluster_config(cluster.port(), &channel)).unwrap();
        let (tx, rx) = mpsc::channel(100);
        listener.listen(tx).await.unwrap();
        (listener, rx)
    });
    let pusher = Arc::new(PgPipe::new(cluster_config(proxy.port(), &channel)).unwrap());
    let first = support::runtime();
    first.block_on(async {
        pusher.push(&numbered(1, 1)).await.unwrap();
        proxy.hold();
        for uid in [2, 3] {
            let pusher = pusher.clone();
            tokio::spawn(async move { pusher.push(&numbered(1, uid)).await });
        }
        let deadline = Instant::now() + Duration::from_secs(2);
        while proxy.held() == 0 {
            assert!(Instant::now() < deadline, "the first flight never went out");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        // The other push is queued behind the flight out (one at a time by default).
        tokio::time::sleep(Duration::from_millis(100)).await;
    });
    drop(first);
    proxy.up();
    side.block_on(async {
        tokio::time::timeout(Duration::from_secs(10), pusher.push(&numbered(1, 4)))
            .await
            .expect("a push from another runtime goes out")
            .unwrap();
        // What the first runtime had sent may arrive first, at most once each.
        let mut received = Vec::new();
        while received.last() != Some(&numbered(1, 4)) {
            let update = tokio::time::timeout(support::ARRIVE, rx.recv())
                .await
                .expect("the push from the other runtime arrives")
                .unwrap();
            assert!(!received.contains(&update), "twice: {update:?}");
            received.push(update);
        }
        tokio::time::timeout(Duration::from_secs(5), pusher.close())
            .await
            .expect("close returns")
            .unwrap();
        listener.close().await.unwrap();
    });
}

/// Pushes queued behind a flight that never comes back fail within their own push
/// timeout, counted from their own call: not one timeout for the flight ahead and another
/// for theirs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pushes_queued_behind_a_stalled_flight_fail_within_the_push_timeout() {
    const TIMEOUT: Duration = Duration::from_secs(2);
    let cluster = own_cluster();
    let proxy = Proxy::start(cluster.port()).await;
    // Connecting may take longer than a push: the push's deadline must cut it short.
    let config = cluster_config(proxy.port(), &unique("stalled"))
        .with_push(|p| p.with_timeout(TIMEOUT))
        .with_connect_timeout(TIMEOUT * 5);
    let pusher = Arc::new(PgPipe::new(config).unwrap());
    pusher.push(&numbered(1, 1)).await.unwrap();
    proxy.hold();
    let timed_push = |uid| {
        let pusher = pusher.clone();
        tokio::spawn(async move {
            let started = Instant::now();
            let outcome = pusher.push(&numbered(1, uid)).await;
            (outcome, started.elapsed())
        })
    };
    // One goes out and stalls; halfway through its timeout, others queue behind it. The
    // flight that takes them when the first gives up must give up by their deadline.
    let mut pushes = vec![timed_push(2)];
    tokio::time::sleep(TIMEOUT / 2).await;
    pushes.extend((3..=5).map(timed_push));
    for push in pushes {
        let (outcome, took) = push.await.unwrap();
        let err = outcome.unwrap_err();
        assert!(err.is_connection(), "{err:?}");
        assert!(took < TIMEOUT * 13 / 10, "failed after {took:?}");
    }
    proxy.up();
    pusher.push(&numbered(1, 6)).await.unwrap();
    pusher.close().await.unwrap();
}
