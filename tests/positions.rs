//! Positions: every update a durable listener delivers comes with the position just after
//! it, and a listener started from any of them delivers exactly what followed, once, in
//! the same order: around transactions that commit out of their log ids' order, inside an
//! envelope of several updates, in the middle of a catch-up read in pages. A position the
//! server's history no longer holds (another database, a log made again) is said with
//! `HistoryChanged`, never skipped over silently. Each test runs its own throwaway cluster.

mod support;

use std::time::{Duration, Instant};

use support::{cluster_config, numbered, own_cluster, sql_at_database, unique};
use tokio::sync::mpsc;
use updatepipe::{
    Config, Event, HistoryChange, PgPipe, Position, ResyncReason, Since, Update, UpdatePipe,
};

const WAIT: Duration = Duration::from_secs(30);

/// A durable listener's events.
async fn listening(config: Config) -> (PgPipe, mpsc::Receiver<Event>) {
    let pipe = PgPipe::new(config.with_durable(true)).unwrap();
    let (tx, rx) = mpsc::channel(4096);
    pipe.listen_events(tx).await.unwrap();
    (pipe, rx)
}

/// The next `n` updates, each with the position that follows it (and the resyncs met on
/// the way); then nothing more for a moment but positions.
async fn updates_with_positions(
    rx: &mut mpsc::Receiver<Event>,
    n: usize,
) -> (Vec<(Update, Position)>, Vec<ResyncReason>) {
    let mut got: Vec<(Update, Option<Position>)> = Vec::new();
    let mut resyncs = Vec::new();
    let deadline = Instant::now() + WAIT;
    while got.len() < n || got.last().is_some_and(|(_, p)| p.is_none()) {
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, rx.recv()).await {
            Ok(Some(Event::Update(update))) => {
                assert!(
                    got.last().is_none_or(|(_, p)| p.is_some()),
                    "an update without its position: {got:?}"
                );
                got.push((update, None));
            }
            Ok(Some(Event::Position(position))) => {
                if let Some((_, slot @ None)) = got.last_mut() {
                    *slot = Some(position);
                }
            }
            Ok(Some(Event::Resync(reason))) => resyncs.push(reason),
            Ok(Some(_)) => {}
            Ok(None) => panic!("the stream ended after {} of {n}", got.len()),
            Err(_) => panic!("timed out after {} of {n}", got.len()),
        }
    }
    let quiet = Instant::now() + Duration::from_millis(400);
    while let Ok(Some(event)) = tokio::time::timeout_at(quiet.into(), rx.recv()).await {
        assert!(
            !matches!(event, Event::Update(_)),
            "more than {n}: {event:?}"
        );
    }
    let got = got
        .into_iter()
        .map(|(u, p)| (u, p.expect("a position")))
        .collect();
    (got, resyncs)
}

/// For each position of `stream`, a listener started from it (its text form read back)
/// delivers exactly the updates after it, once each, and each mailbox's in the same order.
/// (Two transactions that commit out of their ids' order may come the other way round:
/// the first listener read between their commits, the resumed one reads both at once, in
/// id order. `docs/delivery.md`: concurrent transactions have no defined order.)
async fn every_resume_gives_the_rest(config: &Config, stream: &[(Update, Position)]) {
    for (k, (_, position)) in stream.iter().enumerate() {
        let text = position.to_string();
        let again: Position = text.parse().unwrap();
        assert_eq!(&again, position, "{text}");
        let expected: Vec<Update> = stream[k + 1..].iter().map(|(u, _)| u.clone()).collect();
        let (pipe, mut rx) = listening(
            config
                .clone()
                .with_listen(|l| l.with_since(Since::After(again))),
        )
        .await;
        let (got, resyncs) = updates_with_positions(&mut rx, expected.len()).await;
        let got: Vec<Update> = got.into_iter().map(|(u, _)| u).collect();
        let by_mailbox = |updates: &[Update]| {
            let mut keys: std::collections::BTreeMap<String, Vec<Update>> = Default::default();
            for u in updates {
                keys.entry(format!("{:?}", u.key()))
                    .or_default()
                    .push(u.clone());
            }
            keys
        };
        assert_eq!(
            by_mailbox(&got),
            by_mailbox(&expected),
            "resumed after update {k} ({text}): {got:?}"
        );
        assert!(resyncs.is_empty(), "{resyncs:?}");
        pipe.close().await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_listener_resumed_from_any_position_delivers_exactly_the_rest() {
    let cluster = tokio::task::spawn_blocking(own_cluster).await.unwrap();
    let config = cluster_config(cluster.port(), &unique("positions"));
    PgPipe::new(config.clone().with_durable(true))
        .unwrap()
        .migrate()
        .await
        .unwrap();
    let (listener, mut rx) = listening(config.clone()).await;
    let pusher = PgPipe::new(config.clone().with_durable(true)).unwrap();
    let client = sql_at_database(cluster.port(), "postgres").await;

    // A transaction takes its log id first and commits last: the listener reads the later
    // ids while it is in progress, then its row, below them.
    let mut client = client;
    let early = client.transaction().await.unwrap();
    pusher.push_in(&early, &numbered(1, 1)).await.unwrap();
    pusher.push(&numbered(2, 1)).await.unwrap();
    // Three updates in one envelope: positions inside it.
    pusher
        .push_many(&[numbered(3, 1), numbered(3, 2), numbered(3, 3)])
        .await
        .unwrap();
    let (first, _) = updates_with_positions(&mut rx, 4).await;
    early.commit().await.unwrap();
    pusher.push(&numbered(2, 2)).await.unwrap();
    let (second, _) = updates_with_positions(&mut rx, 2).await;
    let stream: Vec<(Update, Position)> = first.into_iter().chain(second).collect();
    let order: Vec<Update> = stream.iter().map(|(u, _)| u.clone()).collect();
    assert_eq!(
        order,
        [
            numbered(2, 1),
            numbered(3, 1),
            numbered(3, 2),
            numbered(3, 3),
            numbered(1, 1),
            numbered(2, 2),
        ],
        "the late commit after the rows it was in progress beside"
    );
    // Positions grow along the stream.
    for pair in stream.windows(2) {
        assert!(pair[0].1 < pair[1].1, "{:?}", (&pair[0].1, &pair[1].1));
    }
    listener.close().await.unwrap();
    every_resume_gives_the_rest(&config, &stream).await;

    // The same log read again as one catch-up, in pages of two rows: positions in the
    // middle of a read, each resumed from.
    let paged = config.clone().with_listen(|l| l.with_log_page_rows(2));
    let (replay, mut rx) = listening(
        paged
            .clone()
            .with_listen(|l| l.with_since(Since::Position(0))),
    )
    .await;
    let (read_again, _) = updates_with_positions(&mut rx, stream.len()).await;
    replay.close().await.unwrap();
    let again: Vec<Update> = read_again.iter().map(|(u, _)| u.clone()).collect();
    assert_eq!(
        again,
        [
            numbered(1, 1),
            numbered(2, 1),
            numbered(3, 1),
            numbered(3, 2),
            numbered(3, 3),
            numbered(2, 2),
        ],
        "in log id order"
    );
    every_resume_gives_the_rest(&paged, &read_again).await;
    pusher.close().await.unwrap();
}

/// A position read in one database is not in another's history, nor in the history of a
/// log that was dropped and migrated again: the listener says so at its start, or at its
/// next connect, and reads from the present.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_position_the_server_no_longer_holds_is_a_history_change() {
    let cluster = tokio::task::spawn_blocking(own_cluster).await.unwrap();
    let channel = unique("history");
    let config = cluster_config(cluster.port(), &channel);
    let admin = sql_at_database(cluster.port(), "postgres").await;
    admin.batch_execute("CREATE DATABASE other").await.unwrap();
    let other = Config::from_url(&format!(
        "postgres://postgres@127.0.0.1:{}/other",
        cluster.port()
    ))
    .unwrap()
    .with_channel(config.channel().clone());
    for c in [&config, &other] {
        PgPipe::new(c.clone().with_durable(true))
            .unwrap()
            .migrate()
            .await
            .unwrap();
    }
    let (listener, mut rx) = listening(config.clone()).await;
    let pusher = PgPipe::new(config.clone().with_durable(true)).unwrap();
    pusher.push(&numbered(1, 1)).await.unwrap();
    let (got, _) = updates_with_positions(&mut rx, 1).await;
    let position = got[0].1.clone();

    // Another database: told at the start, then the present.
    let (elsewhere, mut erx) = listening(
        other
            .clone()
            .with_listen(|l| l.with_since(Since::After(position.clone()))),
    )
    .await;
    let other_pusher = PgPipe::new(other.clone().with_durable(true)).unwrap();
    other_pusher.push(&numbered(9, 1)).await.unwrap();
    let (later, resyncs) = updates_with_positions(&mut erx, 1).await;
    assert_eq!(
        resyncs,
        [ResyncReason::HistoryChanged(HistoryChange::OtherLog)]
    );
    assert_eq!(later[0].0, numbered(9, 1));
    elsewhere.close().await.unwrap();
    other_pusher.close().await.unwrap();

    // The log made again while the listener is connected: told at its next connect.
    admin
        .batch_execute(
            "DROP SCHEMA updatepipe CASCADE; DROP TABLE IF EXISTS public.updatepipe_schema_history",
        )
        .await
        .unwrap();
    PgPipe::new(config.clone().with_durable(true))
        .unwrap()
        .migrate()
        .await
        .unwrap();
    let app = config.pg().get_application_name().unwrap().to_owned();
    admin
        .execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
             WHERE application_name = $1 || '/listen'",
            &[&app],
        )
        .await
        .unwrap();
    let pusher = PgPipe::new(config.clone().with_durable(true)).unwrap();
    // Pushed after the listener is back (it reads from the present).
    let deadline = Instant::now() + WAIT;
    let mut resyncs = Vec::new();
    loop {
        match tokio::time::timeout_at(deadline.into(), rx.recv()).await {
            Ok(Some(Event::Resync(reason))) => {
                resyncs.push(reason.clone());
                if matches!(reason, ResyncReason::HistoryChanged(_)) {
                    break;
                }
            }
            Ok(Some(_)) => {}
            other => panic!("no history change: {other:?} after {resyncs:?}"),
        }
    }
    assert!(
        resyncs.contains(&ResyncReason::HistoryChanged(HistoryChange::OtherLog)),
        "{resyncs:?}"
    );
    pusher.push(&numbered(1, 2)).await.unwrap();
    let (after, _) = updates_with_positions(&mut rx, 1).await;
    assert_eq!(after[0].0, numbered(1, 2));
    assert_eq!(listener.stats().history_changes, 1);
    listener.close().await.unwrap();
    pusher.close().await.unwrap();
}
