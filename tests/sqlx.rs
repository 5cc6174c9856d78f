//! `push_in` on sqlx connections and transactions (feature `sqlx`), against a real
//! PostgreSQL: delivered if and only if the transaction commits, never to the pushing pipe,
//! replayed from the durable log after a listener's absence, signed, in commit order when
//! mixed with tokio-postgres transactions and pool pushes from the same pipe, and with the
//! crate's own errors. The sqlx connections connect as the URL says (no TLS: the feature
//! builds sqlx without a TLS backend, so `sslmode=prefer` connects in plain text).
#![cfg(feature = "sqlx")]

mod support;

use support::proxy::Proxy;
use support::{ARRIVE, SILENCE, assert_silent, cluster_config, config_on, receive_exactly, unique};
use tokio::sync::mpsc;
use updatepipe::sqlx::{self, Connection, PgConnection};
use updatepipe::{Error, Event, PgPipe, Secret, SeqSet, Update, UpdatePipe};

fn new_message(key: u64, uid: u32) -> Update {
    Update::new_message(key, SeqSet::single(uid).unwrap())
}

async fn listening(config: updatepipe::Config) -> (PgPipe, mpsc::Receiver<Update>) {
    let pipe = PgPipe::new(config).unwrap();
    let (tx, rx) = mpsc::channel(10_000);
    pipe.listen(tx).await.unwrap();
    (pipe, rx)
}

/// An sqlx connection to `url`.
async fn connect(url: &str) -> PgConnection {
    PgConnection::connect(url)
        .await
        .expect("an sqlx connection to the test database")
}

/// How many statements the connection's session holds prepared whose text calls
/// `pg_notify` (a push's).
async fn pushes_prepared(connection: &mut PgConnection) -> i64 {
    sqlx::query_scalar(
        "SELECT count(*) FROM pg_catalog.pg_prepared_statements \
         WHERE statement LIKE '%pg_notify%'",
    )
    .persistent(false)
    .fetch_one(connection)
    .await
    .unwrap()
}

#[tokio::test]
async fn a_push_in_an_sqlx_transaction_arrives_only_if_it_commits() {
    let channel = unique("sqlx_tx");
    let (listener, mut rx) = listening(config_on(&channel)).await;
    let store = PgPipe::new(config_on(&channel)).unwrap();
    let mut connection = connect(&support::url()).await;

    // Rolled back: never delivered, though its statement ran in the transaction.
    let mut tx = connection.begin().await.unwrap();
    store.push_in(&mut *tx, &new_message(1, 100)).await.unwrap();
    tx.rollback().await.unwrap();

    // With the data change it announces, in one transaction: nothing until the commit,
    // then the update.
    let mut tx = connection.begin().await.unwrap();
    sqlx::query("CREATE TEMP TABLE messages (mailbox int8, uid int4)")
        .execute(&mut *tx)
        .await
        .unwrap();
    sqlx::query("INSERT INTO messages VALUES (1, 200)")
        .execute(&mut *tx)
        .await
        .unwrap();
    store.push_in(&mut tx, &new_message(1, 200)).await.unwrap();
    assert_silent(&mut rx).await;
    tx.commit().await.unwrap();
    assert_eq!(receive_exactly(&mut rx, 1).await, [new_message(1, 200)]);

    // Outside a transaction: committed at once.
    store
        .push_in(&mut connection, &new_message(2, 1))
        .await
        .unwrap();
    assert_eq!(receive_exactly(&mut rx, 1).await, [new_message(2, 1)]);

    // Many updates in one transaction, several envelopes: in order, all or nothing.
    let batch: Vec<Update> = (1..=3000).map(|i| new_message(3, i)).collect();
    let mut tx = connection.begin().await.unwrap();
    store.push_many_in(&mut *tx, &batch).await.unwrap();
    tx.commit().await.unwrap();
    assert_eq!(receive_exactly(&mut rx, batch.len()).await, batch);

    // Handed to transactions, the rolled-back one included (as for tokio-postgres).
    assert_eq!(store.stats().pushed, 3 + batch.len() as u64);
    // Unnamed: nothing of the pushes is left prepared on the caller's connection (a
    // transaction-pooling proxy could hand it to another client).
    assert_eq!(pushes_prepared(&mut connection).await, 0);
    listener.close().await.unwrap();
    store.close().await.unwrap();
}

#[tokio::test]
async fn a_pipe_never_hears_what_it_pushed_through_sqlx() {
    let channel = unique("sqlx_echo");
    let (pusher, mut own) = listening(config_on(&channel)).await;
    let (other, mut rx) = listening(config_on(&channel)).await;
    let mut connection = connect(&support::url()).await;
    let mut tx = connection.begin().await.unwrap();
    pusher.push_in(&mut *tx, &new_message(1, 1)).await.unwrap();
    tx.commit().await.unwrap();
    assert_eq!(receive_exactly(&mut rx, 1).await, [new_message(1, 1)]);
    assert_silent(&mut own).await;
    assert_eq!(pusher.stats().echoes_dropped, 1);
    assert_eq!(pusher.stats().delivered, 0);
    pusher.close().await.unwrap();
    other.close().await.unwrap();
}

#[tokio::test]
async fn sqlx_pushes_are_signed_with_the_pipes_secret() {
    let channel = unique("sqlx_signed");
    let ours = || vec![Secret::new("0123456789abcdef0123456789abcdef").unwrap()];
    let theirs = || vec![Secret::new("fedcba9876543210fedcba9876543210").unwrap()];
    let (listener, mut rx) = listening(config_on(&channel).with_secrets(ours())).await;
    let (stranger, mut stranger_rx) = listening(config_on(&channel).with_secrets(theirs())).await;
    let store = PgPipe::new(config_on(&channel).with_secrets(ours())).unwrap();
    let mut connection = connect(&support::url()).await;
    let mut tx = connection.begin().await.unwrap();
    store.push_in(&mut *tx, &new_message(1, 1)).await.unwrap();
    tx.commit().await.unwrap();
    // Accepted by a listener with the same secret, refused as forged by one without it.
    assert_eq!(receive_exactly(&mut rx, 1).await, [new_message(1, 1)]);
    assert_silent(&mut stranger_rx).await;
    assert_eq!(listener.stats().rejected_total(), 0);
    assert_eq!(stranger.stats().rejected_for("forged"), 1);
    for pipe in [listener, stranger, store] {
        pipe.close().await.unwrap();
    }
}

/// What goes wrong is told as it is for tokio-postgres: a bad update before anything is
/// sent, the server's refusal with its SQLSTATE in the crate's words, and a durable push
/// whose numbers are taken as `Error::NumbersTaken`.
#[tokio::test]
async fn sqlx_pushes_fail_with_the_crates_errors() {
    let channel = unique("sqlx_errors");
    let store = PgPipe::new(config_on(&channel)).unwrap();
    let mut connection = connect(&support::url()).await;

    // Too large for a notification: refused before a statement is sent, so the caller's
    // transaction goes on.
    let mut tx = connection.begin().await.unwrap();
    let huge = Update::mailbox_destroyed("x".repeat(8000));
    let err = store.push_in(&mut *tx, &huge).await.unwrap_err();
    assert!(matches!(err, Error::PayloadTooLarge { .. }), "{err:?}");
    let one: i32 = sqlx::query_scalar("SELECT 1")
        .fetch_one(&mut *tx)
        .await
        .unwrap();
    assert_eq!(one, 1);

    // In a transaction the server already aborted: the server's error, typed, with its
    // SQLSTATE; not a connection error.
    assert!(sqlx::query("SELECT 1/0").execute(&mut *tx).await.is_err());
    let err = store
        .push_in(&mut *tx, &new_message(1, 1))
        .await
        .unwrap_err();
    let Error::Sqlx(cause) = &err else {
        panic!("not an sqlx error: {err:?}")
    };
    let db = cause.as_database_error().expect("the server's error");
    assert_eq!(db.code().as_deref(), Some("25P02"), "{err}");
    assert!(!err.is_connection() && !err.is_invalid_input(), "{err:?}");
    assert!(err.to_string().contains("(SQLSTATE 25P02)"), "{err}");
    assert!(std::error::Error::source(&err).is_some());
    tx.rollback().await.unwrap();
    store.close().await.unwrap();

    // Durable: a row another role wrote at the pipe's next number (its first in-transaction
    // number, 2^62) makes the push fail, and nothing of it is committed.
    let durable = PgPipe::new(config_on(&channel).with_durable(true)).unwrap();
    durable.migrate().await.unwrap();
    let squat: i64 = 1 << 62;
    sqlx::query(
        "INSERT INTO updatepipe.log (channel, origin, seq, payload) VALUES ($1, $2, $3, 'x')",
    )
    .bind(&channel)
    .bind(durable.origin().as_str())
    .bind(squat)
    .persistent(false)
    .execute(&mut connection)
    .await
    .unwrap();
    let mut tx = connection.begin().await.unwrap();
    let err = durable
        .push_in(&mut *tx, &new_message(1, 2))
        .await
        .unwrap_err();
    assert!(
        matches!(err, Error::NumbersTaken { seq } if seq == squat as u64),
        "{err:?}"
    );
    tx.rollback().await.unwrap();
    assert_eq!(durable.stats().push_numbers_taken, 1);
    durable.close().await.unwrap();
}

/// A durable `push_in` checks the schema first, on sqlx as on tokio-postgres: on an
/// unmigrated database it is the error that says to migrate, and the caller's transaction
/// goes on.
#[tokio::test]
async fn a_durable_sqlx_push_in_on_an_unmigrated_schema_is_the_schema_error() {
    let (database, config) = support::unmigrated_durable("sqlx_unmigrated").await;
    let pipe = PgPipe::new(config).unwrap();
    let mut connection = connect(&database.url).await;
    let mut tx = connection.begin().await.unwrap();
    let err = pipe
        .push_in(&mut *tx, &new_message(1, 1))
        .await
        .unwrap_err();
    assert!(
        matches!(err, Error::SchemaOutdated { found: None, .. }),
        "{err:?}"
    );
    assert!(err.to_string().contains("updatepipe migrate"), "{err}");
    let one: i32 = sqlx::query_scalar("SELECT 1")
        .fetch_one(&mut *tx)
        .await
        .unwrap();
    assert_eq!(one, 1);
    tx.rollback().await.unwrap();
    pipe.close().await.unwrap();
    connection.close().await.unwrap();
    drop(database);
}

/// The next event that `wanted` accepts, within [`ARRIVE`]; any resync fails the test.
async fn wait_for(events: &mut mpsc::Receiver<Event>, wanted: impl Fn(&Event) -> bool) -> Event {
    loop {
        match tokio::time::timeout(ARRIVE, events.recv()).await {
            Ok(Some(Event::Resync(reason))) => panic!("a resync: {reason:?}"),
            Ok(Some(event)) if wanted(&event) => return event,
            Ok(Some(_)) => {}
            other => panic!("the awaited event never came: {other:?}"),
        }
    }
}

/// Durable mode on sqlx: what a store commits while a listener is away is written to the
/// log in the push's own statement, and replayed to the listener once it is back, exactly
/// once, with no resync; what it rolls back leaves no row and never arrives.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_durable_sqlx_push_in_is_replayed_after_the_listener_was_away() {
    let cluster = support::own_cluster();
    let channel = unique("sqlx_durable");
    let proxy = Proxy::start(cluster.port()).await;
    let listener = PgPipe::new(cluster_config(proxy.port(), &channel).with_durable(true)).unwrap();
    listener.migrate().await.unwrap();
    let (tx, mut events) = mpsc::channel(1024);
    listener.listen_events(tx).await.unwrap();
    let store = PgPipe::new(cluster_config(cluster.port(), &channel).with_durable(true)).unwrap();
    let url = format!("postgres://postgres@127.0.0.1:{}/postgres", cluster.port());
    let mut connection = connect(&url).await;

    proxy.down();
    wait_for(&mut events, |e| matches!(e, Event::Disconnected { .. })).await;
    let committed = [new_message(1, 1), new_message(1, 2)];
    let mut t = connection.begin().await.unwrap();
    store.push_many_in(&mut *t, &committed).await.unwrap();
    t.commit().await.unwrap();
    let mut t = connection.begin().await.unwrap();
    store.push_in(&mut *t, &new_message(1, 3)).await.unwrap();
    t.rollback().await.unwrap();
    // One envelope, one log row, from the committed transaction only.
    let rows: i64 = sqlx::query_scalar("SELECT count(*) FROM updatepipe.log WHERE channel = $1")
        .bind(&channel)
        .persistent(false)
        .fetch_one(&mut connection)
        .await
        .unwrap();
    assert_eq!(rows, 1);

    proxy.up();
    let mut got = Vec::new();
    while got.len() < committed.len() {
        if let Event::Update(update) = wait_for(&mut events, |_| true).await {
            got.push(update);
        }
    }
    assert_eq!(got, committed);
    // Nothing more: no second copy, not the rolled-back update, no resync (a durable
    // listener's positions, one after each update, are not updates).
    let deadline = tokio::time::Instant::now() + SILENCE;
    while let Ok(Some(event)) = tokio::time::timeout_at(deadline, events.recv()).await {
        assert!(
            matches!(
                event,
                Event::Connected | Event::Disconnected { .. } | Event::Position(_)
            ),
            "{event:?}"
        );
    }
    assert_eq!(listener.stats().resyncs, 0, "{:?}", listener.stats());
    listener.close().await.unwrap();
    store.close().await.unwrap();
}

/// One pipe pushes through sqlx transactions, tokio-postgres transactions and its pool, the
/// transactions open side by side and committed in alternating orders: a listener gets
/// every update once, each transaction's updates together and in their order, the
/// transactions in commit order, and no resync (the pool's numbers stay consecutive).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mixed_stream_from_one_pipe_arrives_once_in_commit_order() {
    let channel = unique("sqlx_mixed");
    let (listener, mut rx) = listening(config_on(&channel)).await;
    let pipe = PgPipe::new(config_on(&channel)).unwrap();
    let mut sqlx_connection = connect(&support::url()).await;
    let mut client = support::sql().await;
    let mut uid = 0;
    let mut next = || {
        uid += 1;
        new_message(7, uid)
    };
    let mut expected = Vec::new();
    for round in 0..10 {
        let mut a = sqlx_connection.begin().await.unwrap();
        let b = client.transaction().await.unwrap();
        let a_updates = [next(), next(), next()];
        let b_updates = [next(), next()];
        pipe.push_in(&mut *a, &a_updates[0]).await.unwrap();
        pipe.push_in(&b, &b_updates[0]).await.unwrap();
        let pooled = next();
        pipe.push(&pooled).await.unwrap();
        expected.push(pooled);
        pipe.push_many_in(&mut *a, &a_updates[1..]).await.unwrap();
        pipe.push_many_in(&b, &b_updates[1..]).await.unwrap();
        if round % 2 == 0 {
            a.commit().await.unwrap();
            expected.extend(a_updates);
            b.commit().await.unwrap();
            expected.extend(b_updates);
        } else {
            b.commit().await.unwrap();
            expected.extend(b_updates);
            a.commit().await.unwrap();
            expected.extend(a_updates);
        }
        let pooled = [next(), next()];
        pipe.push_many(&pooled).await.unwrap();
        expected.extend(pooled);
    }
    assert_eq!(receive_exactly(&mut rx, expected.len()).await, expected);
    let stats = listener.stats();
    assert_eq!(stats.resyncs, 0, "{stats:?}");
    assert_eq!(stats.delivered, expected.len() as u64);
    listener.close().await.unwrap();
    pipe.close().await.unwrap();
}
