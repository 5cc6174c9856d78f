//! Where a pipe is connected matters: a standby cannot LISTEN or NOTIFY, and a
//! transaction-pooling proxy silently breaks LISTEN. `status` must say so, and the listener
//! must refuse a standby. Each test builds the real thing on throwaway clusters.

mod support;

use std::sync::Arc;
use std::time::Duration;

use support::pgbouncer::PgBouncer;
use support::proxy::Proxy;
use support::{
    cluster_config, cluster_config_url, own_cluster, sql_at, streaming_standby_of, unique,
};
use tokio::sync::mpsc;
use updatepipe::{ChannelName, Config, Error, Event, PgPipe, SeqSet, Update, UpdatePipe};

fn config(port: u16) -> Config {
    Config::from_url(&format!("postgres://postgres@127.0.0.1:{port}/postgres"))
        .unwrap()
        .with_channel(ChannelName::new(unique("topology")).unwrap())
        .with_connect_timeout(Duration::from_secs(5))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_reports_a_standby_and_the_listener_refuses_it() {
    let primary = own_cluster();
    let standby = streaming_standby_of(primary.port()).await;

    let on_primary = PgPipe::new(config(primary.port()))
        .unwrap()
        .status()
        .await
        .unwrap();
    assert!(!on_primary.in_recovery);
    assert_eq!(on_primary.listen_works, Some(true));

    let pipe = PgPipe::new(config(standby.port())).unwrap();
    let status = pipe.status().await.unwrap();
    assert!(status.in_recovery, "{status:?}");
    assert_eq!(status.listen_works, None);
    let (tx, _rx) = mpsc::channel(1);
    let err = pipe.listen(tx).await.unwrap_err();
    assert!(
        matches!(&err, Error::Connect(e) if e.is_read_only()),
        "{err:?}"
    );
    assert!(err.to_string().contains("read-only"), "{err}");
    // Told to take any server, the listener connects and refuses the standby itself.
    let pipe = PgPipe::new(
        config(standby.port())
            .with_target_session_attrs(tokio_postgres::config::TargetSessionAttrs::Any),
    )
    .unwrap();
    let (tx, _rx) = mpsc::channel(1);
    let err = pipe.listen(tx).await.unwrap_err();
    assert!(matches!(err, Error::Standby), "{err:?}");
    assert!(err.to_string().contains("primary"), "{err}");

    // And the command line says it in words.
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_updatepipe"))
        .args([
            "status",
            "--url",
            &format!("postgres://postgres@127.0.0.1:{}/postgres", standby.port()),
        ])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "{stdout}");
    assert!(
        stdout.contains("primary             no: a standby"),
        "{stdout}"
    );

    // The standby listed first: passed over for the primary (target_session_attrs is
    // read-write unless the string says otherwise), by the library and the CLI alike.
    let both = format!(
        "postgres://postgres@127.0.0.1:{},127.0.0.1:{}/postgres",
        standby.port(),
        primary.port()
    );
    let pipe = PgPipe::new(
        Config::from_url(&both)
            .unwrap()
            .with_channel(ChannelName::new(unique("topology")).unwrap()),
    )
    .unwrap();
    let (tx, _rx) = mpsc::channel(1);
    pipe.listen(tx).await.unwrap();
    assert!(!pipe.status().await.unwrap().in_recovery);
    pipe.close().await.unwrap();
    let status = |url: &str| {
        let output = std::process::Command::new(env!("CARGO_BIN_EXE_updatepipe"))
            .args(["status", "--url", url])
            .env_remove("PGTARGETSESSIONATTRS")
            .output()
            .unwrap();
        assert!(output.status.success(), "{output:?}");
        String::from_utf8_lossy(&output.stdout).into_owned()
    };
    assert!(status(&both).contains("primary             yes"));
    // With target_session_attrs=any, as psql: the first host, the standby.
    let any = status(&format!("{both}?target_session_attrs=any"));
    assert!(any.contains("primary             no: a standby"), "{any}");
    // Only the standby, read-write: refused by name, not retried forever.
    let only = format!(
        "postgres://postgres@127.0.0.1:{}/postgres?connect_timeout=2",
        standby.port()
    );
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_updatepipe"))
        .args(["push", "--url", &only, "{\"Type\":0,\"Key\":1}"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(3), "{stderr}");
    assert!(
        stderr.contains(&format!("127.0.0.1:{}: read-only", standby.port())),
        "{stderr}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs pgbouncer: `.ci/run` installs it and runs this test with --ignored"]
async fn status_reports_a_transaction_pooling_proxy() {
    let cluster = own_cluster();
    // Session pooling keeps a server connection per client: LISTEN works.
    let session = PgBouncer::start(cluster.port(), "session");
    let status = PgPipe::new(config(session.port()))
        .unwrap()
        .status()
        .await
        .unwrap();
    assert_eq!(
        status.listen_works,
        Some(true),
        "session pooling: {status:?}"
    );

    // Transaction pooling hands the server connection back after each transaction: the
    // LISTEN is left behind, and no notification comes back.
    let transaction = PgBouncer::start(cluster.port(), "transaction");
    let status = PgPipe::new(config(transaction.port()))
        .unwrap()
        .status()
        .await
        .unwrap();
    assert!(!status.in_recovery);
    assert_eq!(
        status.listen_works,
        Some(false),
        "transaction pooling: {status:?}"
    );

    let output = std::process::Command::new(env!("CARGO_BIN_EXE_updatepipe"))
        .args([
            "status",
            "--url",
            &format!(
                "postgres://postgres@127.0.0.1:{}/postgres",
                transaction.port()
            ),
        ])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    // A health check that fails: code 7, one line naming the cause and the fix.
    assert_eq!(output.status.code(), Some(7), "{stdout}{stderr}");
    assert!(stdout.contains("LISTEN works        NO"), "{stdout}");
    assert!(stdout.contains("transaction-pooling proxy"), "{stdout}");
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(
        stderr.contains("LISTEN does not work through this connection")
            && stderr.contains("transaction-pooling proxy")
            && stderr
                .contains("connect listeners directly to the server, or through a session pool"),
        "{stderr}"
    );

    // Pushes do work through transaction pooling (no prepared statement outlives its
    // transaction), concurrently too; a direct listener receives them all.
    let channel = unique("pooled");
    let direct = config(cluster.port()).with_channel(ChannelName::new(&channel).unwrap());
    let listener = PgPipe::new(direct).unwrap();
    let (tx, mut rx) = mpsc::channel(1000);
    listener.listen(tx).await.unwrap();
    let through = config(transaction.port()).with_channel(ChannelName::new(&channel).unwrap());
    let pusher = std::sync::Arc::new(PgPipe::new(through.clone()).unwrap());
    let mut tasks = Vec::new();
    for key in 0..20u64 {
        let pusher = pusher.clone();
        tasks.push(tokio::spawn(async move {
            for uid in 1..=10 {
                let update =
                    updatepipe::Update::new_message(key, updatepipe::SeqSet::single(uid).unwrap());
                pusher.push(&update).await.unwrap();
            }
        }));
    }
    for task in tasks {
        task.await.unwrap();
    }
    assert_eq!(support::receive_exactly(&mut rx, 200).await.len(), 200);

    // A listener through it is not silently deaf, and does not flap: its heartbeats, sent
    // from another connection, never come back while its connection answers, and it stops
    // within two health intervals with the error that names the cause and the fix.
    let interval = Duration::from_secs(1);
    let deaf = PgPipe::new(through.with_listen(|l| l.with_health_interval(interval))).unwrap();
    let (tx, mut events) = mpsc::channel(100);
    let started = std::time::Instant::now();
    deaf.listen_events(tx).await.unwrap();
    let mut disconnects = Vec::new();
    tokio::time::timeout(10 * interval, async {
        while let Some(event) = events.recv().await {
            if let Event::Disconnected { reason } = event {
                disconnects.push(reason);
            }
        }
    })
    .await
    .expect("a listener behind transaction pooling stops");
    let took = started.elapsed();
    let ended = deaf
        .listen_ended()
        .expect("the listener says why it stopped");
    assert!(
        matches!(&ended, Error::ListenUnsupported { evidence } if evidence.contains("heartbeats")),
        "{ended:?}"
    );
    assert!(took < 2 * interval, "stopped after {took:?}");
    // One event, the error's words: no reconnect before.
    assert_eq!(disconnects, [ended.to_string()], "{disconnects:?}");
    eprintln!("a listener behind transaction pooling stopped after {took:?}: {ended}");

    // The command line: `listen` exits 7 with that one line, within two health intervals
    // (the default, 10 s).
    let started = std::time::Instant::now();
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_updatepipe"))
        .args([
            "listen",
            "--channel",
            &channel,
            "--url",
            &format!(
                "postgres://postgres@127.0.0.1:{}/postgres",
                transaction.port()
            ),
        ])
        .output()
        .unwrap();
    let took = started.elapsed();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(7), "{stderr}");
    let errors: Vec<_> = stderr
        .lines()
        .filter(|l| l.starts_with("updatepipe: LISTEN does not work"))
        .collect();
    assert_eq!(errors.len(), 1, "{stderr}");
    assert!(!stderr.contains("reconnecting"), "{stderr}");
    assert!(!stderr.contains("the connection is dead"), "{stderr}");
    assert!(took < Duration::from_secs(20), "exited after {took:?}");
    eprintln!("updatepipe listen through transaction pooling exited 7 after {took:?}");
    for pipe in [deaf, listener] {
        pipe.close().await.unwrap();
    }
    pusher.close().await.unwrap();
}

/// A first host that accepts TCP and never answers (the test proxy swallowing every byte),
/// listed before a good host, with a connect timeout as long as the push timeout (the
/// defaults' shape, 10 s each, scaled down to 3 s): the listener starts within one connect
/// timeout and then, over 20 s at a 1 s health interval, disconnects at most once; every
/// push returns Ok within the push timeout (a new pooled connection tries each host within
/// its share of the push timeout, and a host that failed lately is tried last), and the
/// durable listener gets each exactly once, in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_first_host_costs_one_connect_timeout_and_no_flapping() {
    let cluster = own_cluster();
    let silent = Proxy::start(cluster.port()).await;
    silent.blackhole();
    let url = format!(
        "postgres://postgres@127.0.0.1:{},127.0.0.1:{}/postgres",
        silent.port(),
        cluster.port()
    );
    let channel = unique("silent");
    let timeout = Duration::from_secs(3);
    let config = || {
        cluster_config_url(&url, &channel)
            .with_durable(true)
            .with_connect_timeout(timeout)
            .with_push(|p| p.with_timeout(timeout))
    };
    let owner = PgPipe::new(cluster_config(cluster.port(), &channel)).unwrap();
    owner.migrate().await.unwrap();
    owner.close().await.unwrap();

    let listener = PgPipe::new(config()).unwrap();
    let (tx, mut events) = mpsc::channel(10_000);
    let started = std::time::Instant::now();
    listener.listen_events(tx).await.unwrap();
    let start_delay = started.elapsed();
    assert!(
        start_delay < timeout + Duration::from_secs(1),
        "started after {start_delay:?}"
    );

    // Another process's pipe: it learns about the silent host by itself.
    let pusher = PgPipe::new(config()).unwrap();
    // 20 s in CI; `SILENT_HOST_SECONDS=90` runs the 90 s.
    let seconds = std::env::var("SILENT_HOST_SECONDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(20);
    let window = std::time::Instant::now() + Duration::from_secs(seconds);
    let (mut pushed, mut slowest) = (0u32, Duration::ZERO);
    while std::time::Instant::now() < window {
        let update = Update::new_message(0u64, SeqSet::single(pushed + 1).unwrap());
        let began = std::time::Instant::now();
        pusher
            .push(&update)
            .await
            .unwrap_or_else(|e| panic!("push {}: {e}", pushed + 1));
        slowest = slowest.max(began.elapsed());
        pushed += 1;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(slowest < timeout, "the slowest push took {slowest:?}");

    let mut received = Vec::new();
    let mut disconnects = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), async {
        while received.len() < pushed as usize {
            match events.recv().await {
                Some(Event::Update(update)) => received.push(update),
                Some(Event::Disconnected { reason }) => disconnects.push(reason),
                Some(_) => {}
                None => panic!("the listener stopped: {:?}", listener.listen_ended()),
            }
        }
    })
    .await
    .unwrap_or_else(|_| panic!("{} of {pushed} updates arrived", received.len()));
    // Anything left over (a disconnect after the last update, a repeated update).
    while let Ok(event) = events.try_recv() {
        match event {
            Event::Update(update) => received.push(update),
            Event::Disconnected { reason } => disconnects.push(reason),
            _ => {}
        }
    }
    assert!(disconnects.len() <= 1, "{disconnects:?}");
    support::assert_exactly_once_in_order(&received.iter().collect::<Vec<_>>(), 1, pushed);
    eprintln!(
        "silent first host: listener started after {start_delay:?}, {pushed} pushes over \
         {seconds} s, the slowest {slowest:?}, {} disconnects, every update once",
        disconnects.len()
    );
    listener.close().await.unwrap();
    pusher.close().await.unwrap();
}

/// PgBouncer in transaction mode, shared by 8 pipes (separate pools and connections, as 8
/// processes would have) that start at once, each migrating and then pushing updates (6
/// durable, 2 best effort): no statement error (no prepared statement mixed up between clients, no
/// advisory lock taken on one server connection and waited for on another), nothing waits
/// for ever, and a direct durable listener gets every update once, in order per pipe.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs pgbouncer: `.ci/run` installs it and runs this test with --ignored"]
async fn eight_pipes_migrate_and_push_through_transaction_pooling_at_once() {
    let cluster = own_cluster();
    let bouncer = PgBouncer::start(cluster.port(), "transaction");
    let channel = unique("bounced");
    const PIPES: u64 = 8;
    const EACH: u32 = 50;
    let through = format!("postgres://postgres@127.0.0.1:{}/postgres", bouncer.port());
    // All migrate the fresh database at once; then a direct listener starts; then all push.
    let migrated = Arc::new(tokio::sync::Barrier::new(PIPES as usize + 1));
    let listening = Arc::new(tokio::sync::Barrier::new(PIPES as usize + 1));
    let mut tasks = Vec::new();
    for key in 0..PIPES {
        // Two of them best effort: statements of another shape (another parameter count)
        // under the same names on the proxy's shared server connections.
        let config = cluster_config_url(&through, &channel).with_durable(key % 4 != 3);
        let (migrated, listening) = (migrated.clone(), listening.clone());
        tasks.push(tokio::spawn(async move {
            let mut errors = Vec::new();
            let pipe = PgPipe::new(config).unwrap();
            match tokio::time::timeout(Duration::from_secs(60), pipe.migrate()).await {
                Ok(Ok(_)) => {}
                Ok(Err(e)) => errors.push(format!("migrate {key}: {e}")),
                Err(_) => errors.push(format!("migrate {key} waited 60 s")),
            }
            migrated.wait().await;
            listening.wait().await;
            let pushed = tokio::time::timeout(Duration::from_secs(60), async {
                for uid in 1..=EACH {
                    let update = Update::new_message(key, SeqSet::single(uid).unwrap());
                    if let Err(e) = pipe.push(&update).await {
                        errors.push(format!("push {key}/{uid}: {e}"));
                    }
                }
            })
            .await;
            if pushed.is_err() {
                errors.push(format!("pushes of {key} waited 60 s"));
            }
            pipe.close().await.unwrap();
            errors
        }));
    }
    migrated.wait().await;
    let listener =
        PgPipe::new(cluster_config(cluster.port(), &channel).with_durable(true)).unwrap();
    let (tx, mut events) = mpsc::channel(10_000);
    listener.listen_events(tx).await.unwrap();
    listening.wait().await;
    let mut errors = Vec::new();
    for task in tasks {
        errors.extend(task.await.unwrap());
    }
    assert!(errors.is_empty(), "{} errors: {errors:#?}", errors.len());
    let mut received = Vec::new();
    tokio::time::timeout(Duration::from_secs(20), async {
        while received.len() < (PIPES as usize) * EACH as usize {
            match events.recv().await {
                Some(Event::Update(update)) => received.push(update),
                Some(_) => {}
                None => panic!("the listener stopped"),
            }
        }
    })
    .await
    .unwrap_or_else(|_| panic!("{} updates arrived", received.len()));
    support::assert_exactly_once_in_order(&received.iter().collect::<Vec<_>>(), PIPES, EACH);
    listener.close().await.unwrap();
}

/// Durable updates from `pushers` pipes (mailbox key = the pipe's number), `each` apiece,
/// pushed concurrently; waits for a durable listener's `events` to bring them all, and
/// checks each arrived once, in order; returns the events that came with them.
async fn push_and_receive(
    pushers: &[PgPipe],
    each: u32,
    events: &mut mpsc::Receiver<Event>,
) -> Vec<Event> {
    let mut tasks = Vec::new();
    for (key, pusher) in pushers.iter().enumerate() {
        let pusher = pusher.clone();
        tasks.push(tokio::spawn(async move {
            for uid in 1..=each {
                let update = Update::new_message(key as u64, SeqSet::single(uid).unwrap());
                pusher.push(&update).await.unwrap();
            }
        }));
    }
    for task in tasks {
        task.await.unwrap();
    }
    let total = pushers.len() * each as usize;
    let mut seen = Vec::new();
    tokio::time::timeout(Duration::from_secs(20), async {
        while seen
            .iter()
            .filter(|e| matches!(e, Event::Update(_)))
            .count()
            < total
        {
            match events.recv().await {
                Some(event) => seen.push(event),
                None => panic!("the listener stopped"),
            }
        }
    })
    .await
    .unwrap_or_else(|_| panic!("{seen:?}"));
    let updates: Vec<&Update> = seen
        .iter()
        .filter_map(|e| match e {
            Event::Update(u) => Some(u),
            _ => None,
        })
        .collect();
    support::assert_exactly_once_in_order(&updates, pushers.len() as u64, each);
    seen
}

/// A polling listener (`ListenOptions::with_polling`) on a direct connection: every durable
/// update once, in order, within about the polling interval; no best-effort one; no
/// disconnect; `Stats::polling`. Refused where it cannot work: without durable mode, with
/// a named consumer, in the maddy layout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_polling_listener_reads_every_durable_update_once() {
    let cluster = own_cluster();
    let channel = unique("polled");
    let config = || cluster_config(cluster.port(), &channel);
    let every = Duration::from_millis(200);
    migrate(config()).await;

    for (refused, why) in [
        (config(), "durable mode"),
        (config().with_durable(true).with_consumer("c"), "consumer"),
        (
            config()
                .with_durable(true)
                .with_layout(updatepipe::Layout::Maddy),
            "maddy layout",
        ),
    ] {
        let pipe = PgPipe::new(refused.with_listen(|l| l.with_polling(every))).unwrap();
        let (tx, _rx) = mpsc::channel(1);
        let err = pipe.listen_events(tx).await.unwrap_err();
        assert!(
            matches!(&err, Error::Config(text) if text.contains(why)),
            "{why}: {err}"
        );
        pipe.close().await.unwrap();
    }

    let listener = PgPipe::new(
        config()
            .with_durable(true)
            .with_listen(|l| l.with_polling(every)),
    )
    .unwrap();
    let (tx, mut events) = mpsc::channel(10_000);
    listener.listen_events(tx).await.unwrap();
    assert!(listener.stats().polling);
    let pushers: Vec<_> = (0..4)
        .map(|_| PgPipe::new(config().with_durable(true)).unwrap())
        .collect();
    // A best-effort push, in no log, never reaches a polling listener.
    let best_effort = PgPipe::new(config()).unwrap();
    best_effort
        .push(&Update::new_message(99u64, SeqSet::single(1).unwrap()))
        .await
        .unwrap();
    let started = std::time::Instant::now();
    let seen = push_and_receive(&pushers, 50, &mut events).await;
    assert!(
        !seen
            .iter()
            .any(|e| matches!(e, Event::Disconnected { .. } | Event::Resync(_))),
        "{seen:?}"
    );
    // One more, timed: it arrives within the polling interval (and a read).
    let one = std::time::Instant::now();
    pushers[0]
        .push(&Update::new_message(0u64, SeqSet::single(51).unwrap()))
        .await
        .unwrap();
    loop {
        match tokio::time::timeout(Duration::from_secs(5), events.recv()).await {
            Ok(Some(Event::Update(update))) => {
                assert_eq!(update.seq_set().as_single(), Some(51));
                break;
            }
            Ok(Some(_)) => {}
            other => panic!("{other:?}"),
        }
    }
    // Not a speed target (BENCHMARKS.md has none for polling): only that it comes soon,
    // well within a health interval, on a machine that may be busy.
    let latency = one.elapsed();
    assert!(latency < every + Duration::from_secs(3), "{latency:?}");
    assert!(listener.stats().polling);
    assert_eq!(listener.stats().disconnects, 0);
    eprintln!(
        "polling every {every:?}: 200 durable updates in {:?}, one more after {latency:?}",
        started.elapsed()
    );
    for pipe in pushers.iter().chain([&listener, &best_effort]) {
        pipe.close().await.unwrap();
    }
}

/// A durable listener polling through PgBouncer in transaction mode, where LISTEN cannot
/// work: every durable update, pushed through the pooler too, once, in order; it does not
/// stop, nor reconnect.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs pgbouncer: `.ci/run` installs it and runs this test with --ignored"]
async fn a_polling_listener_behind_transaction_pooling_gets_every_durable_update() {
    let cluster = own_cluster();
    let bouncer = PgBouncer::start(cluster.port(), "transaction");
    let channel = unique("polledbounced");
    let through = format!("postgres://postgres@127.0.0.1:{}/postgres", bouncer.port());
    let config = || cluster_config_url(&through, &channel).with_durable(true);
    migrate(config()).await;
    let every = Duration::from_millis(200);
    let listener = PgPipe::new(config().with_listen(|l| l.with_polling(every))).unwrap();
    let (tx, mut events) = mpsc::channel(10_000);
    listener.listen_events(tx).await.unwrap();
    let pushers: Vec<_> = (0..4).map(|_| PgPipe::new(config()).unwrap()).collect();
    let seen = push_and_receive(&pushers, 50, &mut events).await;
    // Over some more polls: still there, never disconnected.
    tokio::time::sleep(4 * every).await;
    assert_eq!(listener.listen_ended().map(|e| e.to_string()), None);
    assert_eq!(listener.stats().disconnects, 0, "{seen:?}");
    for pipe in pushers.iter().chain([&listener]) {
        pipe.close().await.unwrap();
    }
}

/// Applies updatepipe's schema, through a pipe of `config`'s.
async fn migrate(config: Config) {
    let owner = PgPipe::new(config).unwrap();
    owner.migrate().await.unwrap();
    owner.close().await.unwrap();
}

/// A durable configuration for the standby on `port`: any server will do (the URL's
/// default asks for a primary).
fn durable_on_standby(port: u16, channel: &str) -> Config {
    cluster_config(port, channel)
        .with_durable(true)
        .with_target_session_attrs(tokio_postgres::config::TargetSessionAttrs::Any)
}

/// A durable listener polling a streaming standby, where log rows replicate and
/// notifications do not: every durable update pushed on the primary arrives once, in order
/// per sender, with no reconnect and no resync, and the standby is never written to (the
/// listener does not prune there). A listener that does not poll still refuses it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_polling_listener_on_a_streaming_standby_reads_every_durable_update_once() {
    let primary = own_cluster();
    let channel = unique("polled_standby");
    let on_primary = || cluster_config(primary.port(), &channel).with_durable(true);
    migrate(on_primary()).await;
    let standby = streaming_standby_of(primary.port()).await;
    let on_standby = || durable_on_standby(standby.port(), &channel);
    // Without polling: the standby is refused.
    let refused = PgPipe::new(on_standby()).unwrap();
    let (tx, _rx) = mpsc::channel(1);
    assert!(matches!(
        refused.listen_events(tx).await,
        Err(Error::Standby)
    ));
    refused.close().await.unwrap();

    let every = Duration::from_millis(200);
    let listener = PgPipe::new(on_standby().with_listen(|l| l.with_polling(every))).unwrap();
    let (tx, mut events) = mpsc::channel(10_000);
    listener.listen_events(tx).await.unwrap();
    assert!(listener.stats().polling);
    let pushers: Vec<_> = (0..4).map(|_| PgPipe::new(on_primary()).unwrap()).collect();
    let seen = push_and_receive(&pushers, 50, &mut events).await;
    assert!(
        !seen
            .iter()
            .any(|e| matches!(e, Event::Disconnected { .. } | Event::Resync(_))),
        "{seen:?}"
    );
    // A while longer, past several polls (and the first prune's turn, had it one): still
    // nothing but positions, and the connection kept.
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    while let Ok(event) = events.try_recv() {
        assert!(matches!(event, Event::Position(_)), "{event:?}");
    }
    let stats = listener.stats();
    assert_eq!((stats.disconnects, stats.resyncs), (0, 0), "{stats:?}");
    assert_eq!(stats.log_pruned, 0);
    for pipe in pushers.iter().chain([&listener]) {
        pipe.close().await.unwrap();
    }
}

/// The standby's own ordering hazard: a transaction that had its id and its log id before
/// another committed, and writes its row only after (here held by a trigger that sleeps
/// after the log id was taken), is unknown to the standby when the other's commit is
/// replayed: its id is above anything the standby saw, and its row below the highest read.
/// The polling reader looks it up all the same, and delivers it once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_standby_poller_reads_a_row_written_after_a_later_commit() {
    let primary = own_cluster();
    let channel = unique("polled_late");
    let on_primary = || cluster_config(primary.port(), &channel).with_durable(true);
    migrate(on_primary()).await;
    let admin = sql_at(primary.port()).await;
    // Rows of mailbox 777 wait 2 s between taking their log id and being written.
    admin
        .batch_execute(
            "CREATE FUNCTION public.slow_777() RETURNS trigger LANGUAGE plpgsql AS $$ \
             BEGIN IF NEW.payload LIKE '%\"Key\":777%' THEN PERFORM pg_sleep(2); END IF; \
             RETURN NEW; END $$; \
             CREATE TRIGGER slow_777 BEFORE INSERT ON updatepipe.log \
             FOR EACH ROW EXECUTE FUNCTION public.slow_777()",
        )
        .await
        .unwrap();
    let standby = streaming_standby_of(primary.port()).await;
    let listener = PgPipe::new(
        durable_on_standby(standby.port(), &channel)
            .with_listen(|l| l.with_polling(Duration::from_millis(100))),
    )
    .unwrap();
    let (tx, mut events) = mpsc::channel(1_000);
    listener.listen_events(tx).await.unwrap();

    // A row first: the log's sequence then has values logged ahead (32 at a time), so the
    // slow push's log id writes nothing to the WAL, and the standby cannot learn its
    // transaction id from it.
    let pusher = PgPipe::new(on_primary()).unwrap();
    pusher
        .push(&Update::new_message(2u64, SeqSet::single(1).unwrap()))
        .await
        .unwrap();
    // The earlier transaction id, written later: it takes its id first...
    let mut early = sql_at(primary.port()).await;
    let early_tx = early.transaction().await.unwrap();
    early_tx
        .batch_execute("SELECT pg_current_xact_id()")
        .await
        .unwrap();
    // ...the later one takes its id and its log id, and sleeps before writing its row...
    let slow = {
        let pusher = pusher.clone();
        tokio::spawn(async move {
            pusher
                .push(&Update::new_message(777u64, SeqSet::single(1).unwrap()))
                .await
                .unwrap();
        })
    };
    tokio::time::sleep(Duration::from_millis(500)).await;
    // ...while the first writes its row with a higher log id, and commits.
    pusher
        .push_in(
            &early_tx,
            &Update::new_message(1u64, SeqSet::single(1).unwrap()),
        )
        .await
        .unwrap();
    early_tx.commit().await.unwrap();
    slow.await.unwrap();
    let mut got = Vec::new();
    while got.len() < 3 {
        match tokio::time::timeout(Duration::from_secs(10), events.recv()).await {
            Ok(Some(Event::Update(u))) => got.push(u.key().clone()),
            Ok(Some(Event::Resync(r))) => panic!("{r:?}"),
            Ok(Some(_)) => {}
            other => panic!("after {got:?}: {other:?}"),
        }
    }
    assert_eq!(got, [2u64.into(), 1u64.into(), 777u64.into()]);
    pusher.close().await.unwrap();
    listener.close().await.unwrap();
}
