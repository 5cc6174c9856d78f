//! Forged references to the durable log, flooded at a listener that has no log to read (the
//! schema is not migrated, or the role may not read it): the listener says so once, stops
//! fetching, logs a bounded number of lines, and goes on delivering. Its own test binary: it
//! installs the process-wide log subscriber.

mod support;

use std::io::Write;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::mpsc;
use updatepipe::cluster::TempCluster;
use updatepipe::{ChannelName, Config, Event, PgPipe, SeqSet, Update, UpdatePipe};

/// Everything logged, by every thread.
#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Captured {
    fn take(&self) -> String {
        String::from_utf8(std::mem::take(&mut *self.0.lock().unwrap())).unwrap()
    }
}

const FORGED: u64 = 2_000;

#[tokio::test(flavor = "multi_thread")]
async fn a_flood_of_forged_references_without_a_log_logs_a_bounded_number_of_lines() {
    let captured = Captured::default();
    let writer = captured.clone();
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new("updatepipe=warn"))
        .with_writer(move || writer.clone())
        .with_ansi(false)
        .init();
    let cluster = tokio::task::spawn_blocking(|| {
        TempCluster::builder()
            .setting("synchronous_commit", "off")
            .start()
            .unwrap_or_else(|e| panic!("{e}"))
    })
    .await
    .unwrap();
    let admin_url = cluster.url();
    let (admin, connection) = tokio_postgres::connect(&admin_url, tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(connection);
    for sql in ["CREATE ROLE stranger LOGIN", "CREATE DATABASE nolog"] {
        admin.batch_execute(sql).await.unwrap();
    }
    // `postgres` is migrated, `nolog` is not; `stranger` may not read the log anywhere.
    PgPipe::new(Config::from_url(&admin_url).unwrap())
        .unwrap()
        .migrate()
        .await
        .unwrap();
    let port = cluster.port();
    for (case, url) in [
        (
            "no log",
            format!("postgres://postgres@127.0.0.1:{port}/nolog"),
        ),
        (
            "not readable",
            format!("postgres://stranger@127.0.0.1:{port}/postgres"),
        ),
    ] {
        let channel = support::unique("forged_refs");
        let config = Config::from_url(&url)
            .unwrap()
            .with_channel(ChannelName::new(&channel).unwrap());
        let listener = PgPipe::new(config.clone()).unwrap();
        let (tx, mut rx) = mpsc::channel(16);
        listener.listen_events(tx).await.unwrap();
        let (client, connection) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
            .await
            .unwrap();
        tokio::spawn(connection);
        captured.take();
        // The references: durable, from one forger, numbered (so no payload repeats), in
        // batches of a hundred notifications per transaction.
        for batch in 0..FORGED / 100 {
            let payloads: Vec<String> = (0..100)
                .map(|i| {
                    format!(
                        "{{\"v\":1,\"o\":\"forger\",\"p\":1,\"s\":{},\"d\":1,\"r\":1,\"u\":[]}}",
                        batch * 100 + i + 1
                    )
                })
                .collect();
            client
                .execute(
                    "SELECT pg_notify($1, p) FROM unnest($2::text[]) AS t(p)",
                    &[&channel, &payloads],
                )
                .await
                .unwrap();
        }
        // The listener goes on: a real update after the flood arrives.
        let pusher = PgPipe::new(config).unwrap();
        let update = Update::new_message(7, SeqSet::single(7).unwrap());
        pusher.push(&update).await.unwrap();
        let arrived = tokio::time::timeout(Duration::from_secs(20), async {
            loop {
                match rx.recv().await {
                    Some(Event::Update(u)) => break u,
                    Some(_) => {}
                    None => panic!("{case}: the listener stopped"),
                }
            }
        })
        .await
        .unwrap_or_else(|_| panic!("{case}: the update after the flood did not arrive"));
        assert_eq!(arrived, update, "{case}");
        let stats = listener.stats();
        // Every reference was a lost update to the listener, and counted as one: a resync
        // (after the listener found it has no log), or let go while the fetches waiting were
        // at their bound (before it found out; a slow-consumer resync follows).
        assert!(
            stats.resyncs + stats.dropped_slow_consumer >= FORGED,
            "{case}: {stats:?}"
        );
        assert!(stats.resyncs >= 1, "{case}: {stats:?}");
        listener.close().await.unwrap();
        pusher.close().await.unwrap();

        let logs = captured.take();
        let lines: Vec<&str> = logs.lines().collect();
        assert_eq!(
            lines
                .iter()
                .filter(|l| l.contains("no durable log to read"))
                .count(),
            1,
            "{case}: {logs}"
        );
        // One line saying so, a resync warning per 10 s, and a margin: not one per reference.
        assert!(lines.len() <= 5, "{case}: {} lines: {logs}", lines.len());
    }
    flood_at_a_reading_caller(port).await;
    tokio::task::spawn_blocking(move || drop(cluster))
        .await
        .unwrap();
}

/// A flood that lasts, at a caller that reads every event (the library) and at the CLI:
/// resyncs are folded, a few per interval (`RESYNC_FOLD` in `src/listen/outbox.rs`), not
/// one per reference; every reference is still counted.
async fn flood_at_a_reading_caller(port: u16) {
    const FLOOD: Duration = Duration::from_secs(4);
    let url = format!("postgres://postgres@127.0.0.1:{port}/nolog");
    let channel = support::unique("forged_flood");
    let config = Config::from_url(&url)
        .unwrap()
        .with_channel(ChannelName::new(&channel).unwrap());
    let listener = PgPipe::new(config).unwrap();
    let (tx, mut rx) = mpsc::channel(4096);
    listener.listen_events(tx).await.unwrap();
    let mut cli = std::process::Command::new(env!("CARGO_BIN_EXE_updatepipe"))
        .args(["listen", "--url", &url, "--channel", &channel])
        .env_remove("RUST_LOG")
        .env_remove("DATABASE_URL")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = cli.stderr.take().unwrap();
    let cli_lines = std::thread::spawn(move || {
        use std::io::BufRead;
        std::io::BufReader::new(stderr)
            .lines()
            .map_while(Result::ok)
            .collect::<Vec<String>>()
    });
    // The CLI's listener is subscribed before the flood (its first line says so).
    tokio::time::sleep(Duration::from_secs(2)).await;
    let (client, connection) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(connection);
    let started = tokio::time::Instant::now();
    let mut sent = 0u64;
    let mut resync_events = 0u64;
    while started.elapsed() < FLOOD {
        let payloads: Vec<String> = (0..100)
            .map(|i| {
                format!(
                    "{{\"v\":1,\"o\":\"flooder\",\"p\":1,\"s\":{},\"d\":1,\"r\":1,\"u\":[]}}",
                    sent + i + 1
                )
            })
            .collect();
        client
            .execute(
                "SELECT pg_notify($1, p) FROM unnest($2::text[]) AS t(p)",
                &[&channel, &payloads],
            )
            .await
            .unwrap();
        sent += 100;
        while let Ok(event) = rx.try_recv() {
            resync_events += u64::from(matches!(event, Event::Resync(_)));
        }
        tokio::task::yield_now().await;
    }
    // Until the listener has read the whole flood (every reference counted as a cause, or
    // let go while fetches were at their bound), then the last causes are told at the end
    // of their interval.
    let read_all = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let stats = listener.stats();
        if stats.resyncs + stats.dropped_slow_consumer >= sent
            || tokio::time::Instant::now() > read_all
        {
            break;
        }
        while let Ok(event) = rx.try_recv() {
            resync_events += u64::from(matches!(event, Event::Resync(_)));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let quiet = tokio::time::Instant::now() + Duration::from_secs(1);
    while let Ok(Some(event)) = tokio::time::timeout_at(quiet, rx.recv()).await {
        resync_events += u64::from(matches!(event, Event::Resync(_)));
    }
    let seconds = started.elapsed().as_secs_f64();
    listener.close().await.unwrap();
    while let Some(event) = rx.recv().await {
        resync_events += u64::from(matches!(event, Event::Resync(_)));
    }
    let stats = listener.stats();
    let _ = cli.kill();
    let _ = cli.wait();
    let lines = cli_lines.join().unwrap();
    assert!(sent >= 1_000, "the flood sent only {sent}");
    // Every reference counted as a cause (or let go while fetches were at their bound).
    assert!(
        stats.resyncs + stats.dropped_slow_consumer >= sent,
        "{stats:?}"
    );
    // At once, then at most one per 500 ms, plus the one at the end.
    let most = (seconds / 0.5).ceil() as u64 + 2;
    assert!(
        (1..=most).contains(&resync_events),
        "{resync_events} resync events in {seconds:.1} s for {sent} references"
    );
    // Each cause told or folded (but one held back when the listener closed).
    let accounted = stats.resyncs_coalesced + resync_events;
    assert!(
        accounted <= stats.resyncs && stats.resyncs - accounted <= 1,
        "{resync_events} told: {stats:?}"
    );
    let resync_lines = lines.iter().filter(|l| l.contains("resync")).count() as u64;
    assert!(
        resync_lines <= most,
        "the CLI printed {resync_lines} resync lines: {:?}",
        &lines[..lines.len().min(20)]
    );
    assert!(lines.len() as u64 <= most + 10, "{} lines", lines.len());
    eprintln!(
        "{sent} forged references in {seconds:.1} s: {resync_events} resync events at the \
         library ({} causes folded), {resync_lines} resync lines of {} at the CLI",
        stats.resyncs_coalesced,
        lines.len()
    );
}
