//! A durable listener back from an absence reads what it missed in pages: one page at a
//! time, whatever the backlog, exactly once and in order, also when the server cancels its
//! reads. Each test runs its own throwaway cluster.

mod support;

use std::time::{Duration, Instant};

use support::proxy::Proxy;
use support::{assert_exactly_once_in_order, cluster_config, own_cluster, unique};
use tokio::sync::mpsc;
use updatepipe::{Event, PgPipe, SeqSet, Stats, Update, UpdatePipe};

const WAIT: Duration = Duration::from_secs(60);

/// The `n`-th update (from 1) of mailbox `key`, its flags long enough to make rows of about
/// `flag_bytes` bytes.
fn numbered(key: u64, n: u32, flag_bytes: usize) -> Update {
    if flag_bytes == 0 {
        return Update::new_message(key, SeqSet::single(n).unwrap());
    }
    let flags = (0..flag_bytes / 64).map(|i| format!("$k{i}_{}", "x".repeat(58)));
    let flags = flags.map(|f| f.parse().unwrap());
    Update::flags_changed(key, n, flags).unwrap()
}

/// Pushes `each` updates to each of `keys` mailboxes, one push at a time (one log row
/// each), mailbox by mailbox in turn, numbered from `from`.
async fn push_rows(pusher: &PgPipe, keys: u64, from: u32, each: u32, flag_bytes: usize) {
    for n in from..from + each {
        for key in 0..keys {
            pusher.push(&numbered(key, n, flag_bytes)).await.unwrap();
        }
    }
}

/// Updates received until `total` have arrived, within `WAIT`; then checks that no more
/// arrive for a moment.
async fn receive(rx: &mut mpsc::Receiver<Event>, total: usize) -> Vec<Update> {
    let mut got = Vec::new();
    let deadline = Instant::now() + WAIT;
    while got.len() < total {
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, rx.recv()).await {
            Ok(Some(Event::Update(update))) => got.push(update),
            Ok(Some(_)) => {}
            Ok(None) => panic!("the stream ended after {} of {total}", got.len()),
            Err(_) => panic!("timed out after {} of {total} updates", got.len()),
        }
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    while let Ok(event) = rx.try_recv() {
        assert!(!matches!(event, Event::Update(_)), "a duplicate: {event:?}");
    }
    got
}

async fn wait_for(rx: &mut mpsc::Receiver<Event>, wanted: impl Fn(&Event) -> bool) {
    let deadline = Instant::now() + WAIT;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, rx.recv()).await {
            Ok(Some(event)) if wanted(&event) => return,
            Ok(Some(_)) => {}
            other => panic!("the awaited event never came: {other:?}"),
        }
    }
}

fn page_report(stats: &Stats) -> String {
    format!(
        "pages {}, most rows {}, most bytes {}, cancelled {}",
        stats.log_pages,
        stats.log_page_rows_max,
        stats.log_page_bytes_max,
        stats.log_pages_cancelled
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backlog_many_pages_long_arrives_once_in_order_one_page_at_a_time() {
    let cluster = own_cluster();
    let channel = unique("pages");
    let proxy = Proxy::start(cluster.port()).await;
    const ROWS: usize = 40;
    const BYTES: usize = 24 * 1024;
    let listener = PgPipe::new(
        cluster_config(proxy.port(), &channel)
            .with_durable(true)
            .with_listen(|l| l.with_log_page_rows(ROWS))
            .with_listen(|l| l.with_log_page_bytes(BYTES)),
    )
    .unwrap();
    listener.migrate().await.unwrap();
    let (tx, mut rx) = mpsc::channel(100_000);
    listener.listen_events(tx).await.unwrap();
    let pusher = PgPipe::new(cluster_config(cluster.port(), &channel).with_durable(true)).unwrap();

    // Away: the path to the server goes down, and a backlog many pages long piles up, of
    // small rows (the row bound decides) and of rows of about 2 KB (the byte bound does).
    proxy.down();
    wait_for(&mut rx, |e| matches!(e, Event::Disconnected { .. })).await;
    const KEYS: u64 = 4;
    push_rows(&pusher, KEYS, 1, 150, 0).await;
    push_rows(&pusher, KEYS, 151, 50, 2048).await;
    let backlog = (KEYS * 200) as usize;

    // Back, with more pushed while it catches up.
    proxy.up();
    push_rows(&pusher, KEYS, 201, 50, 0).await;
    let got = receive(&mut rx, backlog + (KEYS * 50) as usize).await;
    assert_exactly_once_in_order(&got.iter().collect::<Vec<_>>(), KEYS, 250);

    let stats = listener.stats();
    let report = page_report(&stats);
    assert!(stats.log_page_rows_max <= ROWS as u64, "{report}");
    // A page of small rows holds the row bound; a 2 KB row never exceeds the byte bound.
    assert!(stats.log_page_bytes_max <= BYTES as u64, "{report}");
    assert!(
        stats.log_page_rows_max == ROWS as u64,
        "the row bound was reached: {report}"
    );
    assert!(stats.log_pages >= (backlog / ROWS) as u64, "{report}");
    assert_eq!(stats.resyncs, 0, "durable mode needs no resync: {report}");
    listener.close().await.unwrap();
    pusher.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backlog_completes_when_the_server_cancels_long_reads() {
    let cluster = own_cluster();
    let channel = unique("timeout");
    let pusher = PgPipe::new(cluster_config(cluster.port(), &channel).with_durable(true)).unwrap();
    pusher.migrate().await.unwrap();
    // A backlog of about 12 MB, pushed before the listener starts; it replays it from the
    // log's start (a durable listener's first read after a long absence).
    const KEYS: u64 = 4;
    const EACH: u32 = 500;
    push_rows(&pusher, KEYS, 1, EACH, 6000).await;

    // The listener's connections cancel any statement after 5 ms: a read of the whole
    // backlog (or of a full default page) cannot finish; reads of a few rows can.
    let url = format!(
        "postgres://postgres@127.0.0.1:{}/postgres?options=-c%20statement_timeout%3D5",
        cluster.port()
    );
    let listen_config = updatepipe::Config::from_url(&url)
        .unwrap()
        .with_channel(updatepipe::ChannelName::new(channel.as_str()).unwrap())
        .with_listen(|l| l.with_health_interval(Duration::from_secs(1)))
        .with_durable(true)
        .with_listen(|l| l.with_log_page_bytes(64 << 20))
        .with_listen(|l| l.with_since(updatepipe::Since::Position(0)));
    let listener = PgPipe::new(listen_config).unwrap();
    let (tx, mut rx) = mpsc::channel(100_000);
    // The start's own statements on fresh connections (the schema check reads the
    // catalog) may take more than 5 ms on a busy machine, and the start then fails with
    // the server's cancel, as it should: it is tried again (what this test is about is the
    // log reads after it).
    let mut cancelled_starts = 0;
    loop {
        match listener.listen_events(tx.clone()).await {
            Ok(()) => break,
            Err(updatepipe::Error::Postgres(e))
                if e.code() == Some(&tokio_postgres::error::SqlState::QUERY_CANCELED)
                    && cancelled_starts < 20 =>
            {
                cancelled_starts += 1;
            }
            Err(e) => panic!("the listener did not start: {e}"),
        }
    }
    drop(tx);
    let got = receive(&mut rx, (KEYS * u64::from(EACH)) as usize).await;
    assert_exactly_once_in_order(&got.iter().collect::<Vec<_>>(), KEYS, EACH);
    let stats = listener.stats();
    eprintln!("{}", page_report(&stats));
    assert_eq!(
        stats.disconnects, 0,
        "a cancelled read is no dead connection: {stats:?}"
    );
    listener.close().await.unwrap();
    pusher.close().await.unwrap();
}
