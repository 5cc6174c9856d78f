//! Batching on the push path: concurrent pushes share transactions, yet each keeps its own
//! error, its own order and its own commit.

mod support;

use std::collections::HashMap;
use std::sync::Arc;

use support::{config_on, receive_exactly, unique};
use tokio::sync::mpsc;
use tokio_postgres::error::{DbError, SqlState};
use updatepipe::{ChannelName, Config, Error, MailboxKey, PgPipe, SeqSet, Update, UpdatePipe};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_pushes_keep_their_own_errors_and_order() {
    const PUSHERS: u64 = 64;
    const EACH: u32 = 100;
    let channel = unique("batch");
    let listener = PgPipe::new(config_on(&channel)).unwrap();
    let (tx, mut rx) = mpsc::channel(100_000);
    listener.listen(tx).await.unwrap();
    // Four flights out at once on one connection, to give a mistake in their order every
    // chance to show.
    let pusher =
        Arc::new(PgPipe::new(config_on(&channel).with_push(|p| p.with_max_in_flight(4))).unwrap());

    let mut tasks = Vec::new();
    for key in 0..PUSHERS {
        let pusher = pusher.clone();
        tasks.push(tokio::spawn(async move {
            let mut failures = 0;
            for uid in 1..=EACH {
                // Every tenth push of the odd pushers is too large: it must fail alone.
                if key % 2 == 1 && uid % 10 == 0 {
                    let huge = Update::mailbox_destroyed(MailboxKey::Name("x".repeat(8000)));
                    let err = pusher.push(&huge).await.unwrap_err();
                    assert!(matches!(err, Error::PayloadTooLarge { .. }), "{err}");
                    failures += 1;
                }
                pusher
                    .push(&Update::new_message(key, SeqSet::single(uid).unwrap()))
                    .await
                    .unwrap_or_else(|e| panic!("pusher {key}, update {uid}: {e}"));
            }
            failures
        }));
    }
    let mut failures = 0;
    for task in tasks {
        failures += task.await.unwrap();
    }
    assert_eq!(failures, (PUSHERS / 2) as u32 * (EACH / 10));

    let received = receive_exactly(&mut rx, (PUSHERS as usize) * EACH as usize).await;
    let mut next: HashMap<MailboxKey, u32> = HashMap::new();
    for update in received {
        let uid = update.seq_set().as_single().unwrap();
        let expected = next.entry(update.key().clone()).or_insert(1);
        assert_eq!(uid, *expected, "mailbox {} out of order", update.key());
        *expected += 1;
    }
    assert_eq!(next.len(), PUSHERS as usize);
    assert!(next.values().all(|n| *n == EACH + 1));
    // Flights pipelined on one connection committed in number order: the listener saw
    // no number skipped, so it raised no resync.
    assert_eq!(listener.stats().resyncs, 0, "{:?}", listener.stats());

    // Batching happened: fewer transactions than pushes.
    let stats = pusher.stats();
    assert_eq!(stats.pushed, PUSHERS * u64::from(EACH));
    assert!(stats.batches < stats.pushed, "{stats:?}");
    listener.close().await.unwrap();
    pusher.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pushes_recover_after_the_pool_connection_is_killed() {
    let channel = unique("batchfail");
    let config = config_on(&channel).with_push(|p| p.with_pool_size(1));
    let app = config.pg().get_application_name().unwrap().to_owned();
    let pusher = Arc::new(PgPipe::new(config).unwrap());
    pusher.init_push().await.unwrap();
    // Kill the pool's only connection. The pool may notice before the next batch (then it
    // connects anew) or not (then that batch fails, with a connection error for every push
    // in it); either way the pushes after it succeed.
    let admin = support::sql().await;
    admin
        .execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = $1",
            &[&app],
        )
        .await
        .unwrap();
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    let mut outcomes = Vec::new();
    let mut tasks = Vec::new();
    for i in 0..8u32 {
        let pusher = pusher.clone();
        tasks.push(tokio::spawn(async move {
            pusher
                .push(&Update::new_message(1, SeqSet::single(i + 1).unwrap()))
                .await
        }));
    }
    for task in tasks {
        outcomes.push(task.await.unwrap());
    }
    for outcome in outcomes.iter().filter_map(|o| o.as_ref().err()) {
        assert!(outcome.is_connection(), "{outcome:?}");
    }
    // Whatever the first batch did, pushes after it succeed.
    for i in 0..3 {
        pusher
            .push(&Update::new_message(2, SeqSet::single(i + 1).unwrap()))
            .await
            .unwrap();
    }
    pusher.close().await.unwrap();
}

#[tokio::test]
async fn a_push_many_larger_than_the_batch_bound_is_still_one_transaction() {
    let channel = unique("bigmany");
    let listener = PgPipe::new(config_on(&channel)).unwrap();
    let (tx, mut rx) = mpsc::channel(10_000);
    listener.listen(tx).await.unwrap();
    let pusher = PgPipe::new(config_on(&channel).with_push(|p| p.with_max_batch(10))).unwrap();
    let updates: Vec<Update> = (1..=500)
        .map(|i| Update::expunge(7, SeqSet::single(i).unwrap()))
        .collect();
    pusher.push_many(&updates).await.unwrap();
    assert_eq!(receive_exactly(&mut rx, 500).await, updates);
    listener.close().await.unwrap();
    pusher.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_push_resolves_only_after_its_update_is_committed() {
    // Durable mode makes the commit observable from outside: the update's log row is
    // visible to another connection as soon as the push returns, never later.
    let channel = unique("committed");
    let pusher = Arc::new(PgPipe::new(config_on(&channel).with_durable(true)).unwrap());
    pusher.migrate().await.unwrap();
    let mut tasks = Vec::new();
    for key in 0..32u64 {
        let pusher = pusher.clone();
        let channel = channel.clone();
        tasks.push(tokio::spawn(async move {
            let observer = support::sql().await;
            for uid in 1..=20u32 {
                pusher
                    .push(&Update::new_message(key, SeqSet::single(uid).unwrap()))
                    .await
                    .unwrap();
                let needle = format!("\"Key\":{key},\"SeqSet\":\"{uid}\"");
                let visible: i64 = observer
                    .query_one(
                        "SELECT count(*) FROM updatepipe.log WHERE channel = $1 AND strpos(payload, $2) > 0",
                        &[&channel, &needle],
                    )
                    .await
                    .unwrap()
                    .get(0);
                assert_eq!(visible, 1, "mailbox {key}, uid {uid}: resolved before its commit");
            }
        }));
    }
    for task in tasks {
        task.await.unwrap();
    }
    assert!(pusher.stats().batches < 32 * 20, "pushes were batched");
    pusher.close().await.unwrap();
}

/// A pool push whose statement the server refuses (a durable push into a database whose
/// schema is migrated but whose log table is gone) fails with the server's own error, which
/// a caller can match on, its source chained; every push of the batch gets that error.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_batch_gives_each_push_the_servers_error() {
    let database = support::fresh_database("unmigrated").await;
    let url = database.url.clone();
    let config = Config::from_url(&url)
        .unwrap()
        .with_channel(ChannelName::new(unique("refused")).unwrap())
        .with_durable(true)
        // The pushes gather into one batch.
        .with_push(|p| p.with_max_batch_wait(std::time::Duration::from_millis(50)));
    let pusher = Arc::new(PgPipe::new(config).unwrap());
    // Migrated (a durable pipe checks the schema version before its first push: an
    // unmigrated one is `Error::SchemaOutdated`, before any statement), then the log
    // dropped, so that the batch's own statement is what the server refuses.
    pusher.migrate().await.unwrap();
    let (client, connection) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(connection);
    client
        .batch_execute("DROP TABLE updatepipe.log")
        .await
        .unwrap();
    drop(client);
    let mut tasks = Vec::new();
    for uid in 1..=4 {
        let pusher = pusher.clone();
        tasks.push(tokio::spawn(async move {
            pusher
                .push(&Update::new_message(1, SeqSet::single(uid).unwrap()))
                .await
        }));
    }
    for task in tasks {
        let err = task.await.unwrap().unwrap_err();
        let Error::Postgres(pg) = &err else {
            panic!("not a PostgreSQL error: {err:?}");
        };
        let db = pg.as_db_error().expect("an error from the server");
        assert_eq!(db.code(), &SqlState::UNDEFINED_TABLE, "{err}");
        assert!(!err.is_connection() && !err.is_invalid_input(), "{err:?}");
        assert!(err.to_string().contains("updatepipe.log"), "{err}");
        // The chain: the client's error, then the server's.
        let source = std::error::Error::source(&err).expect("a source");
        assert!(source.to_string().contains("db error"), "{source}");
        let cause = source.source().expect("the server's error");
        assert!(cause.downcast_ref::<DbError>().is_some(), "{cause:?}");
    }
    pusher.close().await.unwrap();
    drop(database);
}

/// A waiting push holds little: what a flush needs is boxed by the push that sends it
/// alone, so a thousand pushes waiting in a batch do not hold a flush's state each.
#[tokio::test]
async fn a_waiting_push_is_small() {
    let pipe = PgPipe::new(Config::from_url("postgres://localhost/none").unwrap()).unwrap();
    let update = Update::new_message(1, SeqSet::single(1).unwrap());
    let push = pipe.push(&update);
    let size = std::mem::size_of_val(&push);
    assert!(size <= 1024, "a push future is {size} bytes");
    drop(push);
    let durable = PgPipe::new(
        Config::from_url("postgres://localhost/none")
            .unwrap()
            .with_durable(true),
    )
    .unwrap();
    let push = durable.push(&update);
    let size = std::mem::size_of_val(&push);
    assert!(size <= 1024, "a durable push future is {size} bytes");
}
