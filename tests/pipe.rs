//! The core pipe against a real PostgreSQL: exchange, echo suppression, transactional push,
//! channel names, interoperability, hostile payloads and clean shutdown.

mod support;

use std::time::Duration;

use support::{
    assert_silent, config, config_on, connections, connections_left, receive_exactly, sql, unique,
};
use tokio::sync::mpsc;
use updatepipe::{Envelope, Error, Flag, MailboxKey, Origin, PgPipe, SeqSet, Update, UpdatePipe};

fn new_message(key: u64, uid: u32) -> Update {
    Update::new_message(key, SeqSet::single(uid).unwrap())
}

async fn listening(config: updatepipe::Config) -> (PgPipe, mpsc::Receiver<Update>) {
    let pipe = PgPipe::new(config).unwrap();
    let (tx, rx) = mpsc::channel(1024);
    pipe.listen(tx).await.unwrap();
    (pipe, rx)
}

#[tokio::test]
async fn two_pipes_exchange_both_ways_and_never_hear_themselves() {
    let channel = unique("exchange");
    let (a, mut a_rx) = listening(config_on(&channel)).await;
    let (b, mut b_rx) = listening(config_on(&channel)).await;

    let from_a = [new_message(1, 1), new_message(1, 2)];
    let from_b = [
        Update::flags_changed("INBOX", 7, [Flag::new("\\Seen").unwrap()]).unwrap(),
        Update::mailbox_destroyed(u64::MAX),
    ];
    for u in &from_a {
        a.push(u).await.unwrap();
    }
    for u in &from_b {
        b.push(u).await.unwrap();
    }

    assert_eq!(receive_exactly(&mut b_rx, 2).await, from_a);
    assert_eq!(receive_exactly(&mut a_rx, 2).await, from_b);
    assert_eq!(a.stats().echoes_dropped, 2);
    assert_eq!(b.stats().echoes_dropped, 2);
    assert_eq!(a.stats().delivered, 2);
    assert_eq!(a.stats().pushed, 2);
    a.close().await.unwrap();
    b.close().await.unwrap();
}

#[tokio::test]
async fn three_pipes_in_one_process_each_hear_only_the_others() {
    let channel = unique("three");
    let mut pipes = Vec::new();
    for _ in 0..3 {
        pipes.push(listening(config_on(&channel)).await);
    }
    for (i, (pipe, _)) in pipes.iter().enumerate() {
        pipe.push(&new_message(i as u64, 1)).await.unwrap();
    }
    for (i, (pipe, rx)) in pipes.iter_mut().enumerate() {
        let mut keys: Vec<MailboxKey> = receive_exactly(rx, 2)
            .await
            .into_iter()
            .map(|u| u.key().clone())
            .collect();
        keys.sort_by_key(|k| k.to_string());
        let expected: Vec<MailboxKey> = (0..3u64)
            .filter(|k| *k != i as u64)
            .map(MailboxKey::Id)
            .collect();
        assert_eq!(keys, expected, "pipe {i}");
        pipe.close().await.unwrap();
    }
}

#[tokio::test]
async fn a_push_in_a_transaction_arrives_only_if_it_commits() {
    let channel = unique("tx");
    let (listener, mut rx) = listening(config_on(&channel)).await;
    let store = PgPipe::new(config_on(&channel)).unwrap();
    let mut client = sql().await;

    // Rolled back: never delivered.
    let tx = client.transaction().await.unwrap();
    store.push_in(&tx, &new_message(1, 100)).await.unwrap();
    tx.rollback().await.unwrap();

    // Not yet committed: not delivered either, until the commit.
    let tx = client.transaction().await.unwrap();
    store.push_in(&tx, &new_message(1, 200)).await.unwrap();
    assert_silent(&mut rx).await;
    tx.commit().await.unwrap();
    assert_eq!(receive_exactly(&mut rx, 1).await, [new_message(1, 200)]);

    // Outside a transaction: at once. And a pipe that also listens drops what it pushed
    // through the caller's connection (echo suppression does not depend on the connection).
    listener.push_in(&client, &new_message(2, 1)).await.unwrap();
    assert_silent(&mut rx).await;
    assert_eq!(listener.stats().echoes_dropped, 1);

    // Several updates in one transaction, in order.
    let batch: Vec<Update> = (1..=50).map(|i| new_message(3, i)).collect();
    let tx = client.transaction().await.unwrap();
    store.push_many_in(&tx, &batch).await.unwrap();
    tx.commit().await.unwrap();
    assert_eq!(receive_exactly(&mut rx, 50).await, batch);

    listener.close().await.unwrap();
    store.close().await.unwrap();
}

/// A durable `push_in` checks the schema first, as every durable path does: on an
/// unmigrated database it is the error that says to migrate, not the log's statement
/// failing in the caller's transaction (which would abort it).
#[tokio::test]
async fn a_durable_push_in_on_an_unmigrated_schema_is_the_schema_error() {
    let (database, config) = support::unmigrated_durable("pushin_unmigrated").await;
    let pipe = PgPipe::new(config).unwrap();
    let (mut client, connection) = tokio_postgres::connect(&database.url, tokio_postgres::NoTls)
        .await
        .unwrap();
    let connection = tokio::spawn(connection);
    let tx = client.transaction().await.unwrap();
    let err = pipe.push_in(&tx, &new_message(1, 1)).await.unwrap_err();
    assert!(
        matches!(err, Error::SchemaOutdated { found: None, .. }),
        "{err:?}"
    );
    assert!(err.to_string().contains("updatepipe migrate"), "{err}");
    // Nothing failed in the caller's transaction: it goes on.
    let one: i32 = tx.query_one("SELECT 1", &[]).await.unwrap().get(0);
    assert_eq!(one, 1);
    tx.rollback().await.unwrap();
    pipe.close().await.unwrap();
    drop(client);
    let _ = connection.await;
    drop(database);
}

#[tokio::test]
async fn channel_names_are_quoted() {
    for name in [
        "MixedCase",
        "with space",
        "quo\"te",
        "ünïcödé",
        "semi;colon",
    ] {
        let channel = format!("{name}{}", unique(""));
        let (listener, mut rx) = listening(config_on(&channel)).await;
        let pusher = PgPipe::new(config_on(&channel)).unwrap();
        pusher.push(&new_message(9, 9)).await.unwrap();
        assert_eq!(
            receive_exactly(&mut rx, 1).await,
            [new_message(9, 9)],
            "{name}"
        );
        // The folded, unquoted spelling is another channel.
        if name == "MixedCase" {
            let other = PgPipe::new(config_on(&channel.to_lowercase())).unwrap();
            other.push(&new_message(9, 10)).await.unwrap();
            assert_silent(&mut rx).await;
            other.close().await.unwrap();
        }
        listener.close().await.unwrap();
        pusher.close().await.unwrap();
    }
}

#[tokio::test]
async fn updates_sent_from_plain_sql_arrive_in_both_wire_forms() {
    let config = config("sql");
    let channel = config.channel().as_str().to_owned();
    let (pipe, mut rx) = listening(config).await;
    let client = sql().await;

    let v1 = Update::expunge("Archive;2024", SeqSet::parse("1:3,9:*").unwrap());
    let payload = Envelope::encode_v1(&Origin::random(), 1, 1, std::slice::from_ref(&v1)).unwrap();
    client
        .execute("SELECT pg_notify($1, $2)", &[&channel, &payload])
        .await
        .unwrap();

    // maddy's form, written as a Go node writes it: the JSON's ';' become 0x10.
    let legacy = Update::new_message("INBOX;x", SeqSet::parse("4").unwrap());
    let text = format!(
        r#"SELECT pg_notify({}, '1-0xc000010000;{{"Type":0,"Key":"INBOX' || chr(16) || 'x","SeqSet":"4"}}' || chr(10))"#,
        quote_literal(&channel)
    );
    client.batch_execute(&text).await.unwrap();

    assert_eq!(receive_exactly(&mut rx, 2).await, [v1, legacy]);
    pipe.close().await.unwrap();
}

fn quote_literal(text: &str) -> String {
    format!("'{}'", text.replace('\'', "''"))
}

#[tokio::test]
async fn hostile_payloads_are_rejected_and_the_listener_goes_on() {
    let config = config("hostile");
    let channel = config.channel().as_str().to_owned();
    let (pipe, mut rx) = listening(config).await;
    let client = sql().await;

    let junk = "x".repeat(7999);
    let forged_origin = format!(r#"{{"v":1,"o":"{}","s":1,"u":[]}}"#, "o".repeat(65));
    let bad = [
        ("unrecognized", "garbage"),
        ("unrecognized", "\u{1}\u{2}\u{3}"),
        ("malformed", "{not json"),
        ("malformed", r#"{"v":1,"o":"a","s":1,"u":{}}"#),
        (
            "invalid_update",
            r#"{"v":1,"o":"a","s":1,"u":[{"Type":0,"Key":1,"SeqSet":"0:x"}]}"#,
        ),
        (
            "invalid_update",
            r#"{"v":1,"o":"a","s":1,"u":[{"Type":42,"Key":1}]}"#,
        ),
        ("invalid_update", "1-0x1;{\"Type\":9,\"Key\":1}\n"),
        // Arrays are not updates, in either form (serde's derive would read `[2,9,"1:2"]`
        // as an expunge of 1:2 in mailbox 9).
        ("malformed", r#"{"v":1,"o":"a","s":1,"u":[[2,9,"1:2"]]}"#),
        ("unrecognized", "1-0x1;[3,5]\n"),
        ("unknown_version", r#"{"v":99}"#),
        ("unrecognized", junk.as_str()),
        ("malformed", forged_origin.as_str()),
        // A reference to a log entry, without the durable mark only durable pushes write.
        ("malformed", r#"{"v":1,"o":"x","s":1,"r":1,"u":[]}"#),
        // Numbers at the very top of the range, twice: no overflow.
        ("ok", r#"{"v":1,"o":"top","s":18446744073709551615,"u":[]}"#),
        (
            "ok",
            r#"{"v":1,"o":"top","s":18446744073709551615,"u":[{"Type":3,"Key":1}]}"#,
        ),
        (
            "ok",
            r#"{"v":1,"o":"top","s":18446744073709551615,"u":[{"Type":3,"Key":1}]}"#,
        ),
    ];
    for (_, payload) in &bad {
        client
            .execute("SELECT pg_notify($1, $2)", &[&channel, payload])
            .await
            .unwrap();
    }
    // A valid update after all of that still arrives, after the two valid ones above.
    let other = PgPipe::new(config_on(&channel)).unwrap();
    other.push(&new_message(5, 5)).await.unwrap();
    let destroyed = Update::mailbox_destroyed(1);
    assert_eq!(
        receive_exactly(&mut rx, 3).await,
        [destroyed.clone(), destroyed, new_message(5, 5)]
    );

    let stats = pipe.stats();
    let rejected = bad.iter().filter(|(r, _)| *r != "ok").count();
    assert_eq!(stats.rejected_total(), rejected as u64);
    for reason in [
        "unrecognized",
        "malformed",
        "invalid_update",
        "unknown_version",
    ] {
        let expected = bad.iter().filter(|(r, _)| *r == reason).count() as u64;
        assert_eq!(stats.rejected_for(reason), expected, "{reason}");
    }
    pipe.close().await.unwrap();
    other.close().await.unwrap();
}

#[tokio::test]
async fn close_leaves_no_task_or_connection_behind() {
    let config = config("close");
    let app = config.pg().get_application_name().unwrap().to_owned();
    let pipe = PgPipe::new(config).unwrap();
    let (tx, mut rx) = mpsc::channel(16);
    pipe.listen(tx).await.unwrap();
    pipe.init_push().await.unwrap();
    pipe.push(&new_message(1, 1)).await.unwrap();

    let observer = sql().await;
    assert!(
        connections(&observer, &app).await >= 2,
        "listener and pool connected"
    );
    // The listener's connection is told from the pool's by its application_name.
    let listener: i64 = observer
        .query_one(
            "SELECT count(*) FROM pg_stat_activity WHERE application_name = $1",
            &[&format!("{app}/listen")],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(listener, 1);

    pipe.close().await.unwrap();
    // The caller's channel has ended: the listener task is gone and dropped its sender.
    assert!(
        tokio::time::timeout(support::ARRIVE, rx.recv())
            .await
            .unwrap()
            .is_none()
    );
    // The server sees no connection left (backends exit asynchronously: poll briefly).
    assert_eq!(
        connections_left(&observer, &app).await,
        0,
        "connections left after close"
    );

    // Closing twice is fine; using a closed pipe is a typed error.
    pipe.close().await.unwrap();
    assert!(matches!(
        pipe.push(&new_message(1, 2)).await,
        Err(Error::Closed)
    ));
    let (tx, _rx) = mpsc::channel(1);
    assert!(matches!(pipe.listen(tx).await, Err(Error::Closed)));
}

#[tokio::test]
async fn dropping_the_pipe_stops_its_listener() {
    let config = config("drop");
    let app = config.pg().get_application_name().unwrap().to_owned();
    let (pipe, mut rx) = listening(config).await;
    drop(pipe);
    assert!(
        tokio::time::timeout(support::ARRIVE, rx.recv())
            .await
            .unwrap()
            .is_none()
    );
    let observer = sql().await;
    assert_eq!(connections_left(&observer, &app).await, 0);
}

#[tokio::test]
async fn a_cancelled_listen_can_be_tried_again() {
    let pipe = PgPipe::new(config("cancelled")).unwrap();
    let (tx, _rx) = mpsc::channel(1);
    // Cancelled before it could connect.
    let attempt = tokio::time::timeout(Duration::from_micros(1), pipe.listen(tx)).await;
    assert!(attempt.is_err(), "the attempt should have been cut short");
    let (tx, mut rx) = mpsc::channel(8);
    pipe.listen(tx).await.unwrap();
    let other = PgPipe::new(updatepipe::Config::clone(pipe.config())).unwrap();
    other.push(&new_message(1, 1)).await.unwrap();
    assert_eq!(receive_exactly(&mut rx, 1).await, [new_message(1, 1)]);
    pipe.close().await.unwrap();
    other.close().await.unwrap();
}

#[tokio::test]
async fn listening_twice_is_an_error() {
    let (pipe, _rx) = listening(config("twice")).await;
    let (tx, _rx2) = mpsc::channel(1);
    assert!(matches!(
        pipe.listen(tx).await,
        Err(Error::AlreadyListening)
    ));
    pipe.close().await.unwrap();
}

#[tokio::test]
async fn push_many_keeps_order_across_envelopes() {
    let channel = unique("many");
    let (listener, mut rx) = listening(config_on(&channel)).await;
    let pusher = PgPipe::new(config_on(&channel)).unwrap();
    // Enough to need several envelopes of 7999 bytes.
    let updates: Vec<Update> = (1..=3000).map(|i| new_message(u64::from(i), i)).collect();
    pusher.push_many(&updates).await.unwrap();
    assert_eq!(receive_exactly(&mut rx, updates.len()).await, updates);
    listener.close().await.unwrap();
    pusher.close().await.unwrap();
}

#[tokio::test]
async fn an_update_too_large_for_a_notification_is_a_typed_error() {
    let channel = unique("large");
    let (listener, mut rx) = listening(config_on(&channel)).await;
    let pusher = PgPipe::new(config_on(&channel)).unwrap();
    let huge = Update::mailbox_destroyed(MailboxKey::Name("x".repeat(8000)));
    let err = pusher.push(&huge).await.unwrap_err();
    assert!(matches!(err, Error::PayloadTooLarge { .. }), "{err}");
    assert!(err.is_invalid_input());
    // Nothing half-sent, even with valid updates before it in the same call.
    let err = pusher
        .push_many(&[new_message(1, 1), huge])
        .await
        .unwrap_err();
    assert!(matches!(err, Error::PayloadTooLarge { .. }));
    assert_silent(&mut rx).await;
    listener.close().await.unwrap();
    pusher.close().await.unwrap();
}

#[tokio::test]
async fn a_dropped_receiver_ends_the_listener() {
    let config = config("receiver");
    let app = config.pg().get_application_name().unwrap().to_owned();
    let (pipe, rx) = listening(config).await;
    drop(rx);
    let observer = sql().await;
    assert_eq!(
        connections_left(&observer, &app).await,
        0,
        "the listener's connection is closed"
    );
    pipe.close().await.unwrap();
}

#[tokio::test]
async fn an_unreachable_server_fails_fast_with_a_clear_error() {
    // A port nothing listens on.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let config =
        updatepipe::Config::from_url(&format!("postgres://postgres@127.0.0.1:{port}/postgres"))
            .unwrap()
            .with_connect_timeout(Duration::from_secs(2))
            .with_push(|p| p.with_timeout(Duration::from_secs(2)));
    let pipe = PgPipe::new(config).unwrap();
    let started = std::time::Instant::now();
    let err = pipe.init_push().await.unwrap_err();
    assert!(err.is_connection(), "{err:?}");
    let err = pipe.push(&new_message(1, 1)).await.unwrap_err();
    assert!(err.is_connection(), "{err:?}");
    let (tx, _rx) = mpsc::channel(1);
    let err = pipe.listen(tx).await.unwrap_err();
    assert!(matches!(err, Error::Connect(_)), "{err:?}");
    assert!(err.to_string().contains("cannot connect"), "{err}");
    assert!(started.elapsed() < Duration::from_secs(30));
    pipe.close().await.unwrap();
}

#[tokio::test]
async fn status_counts_the_listeners_on_the_channel() {
    let channel = unique("status");
    let quick =
        |c: updatepipe::Config| c.with_listen(|l| l.with_health_interval(Duration::from_secs(1)));
    let observer = PgPipe::new(quick(config_on(&channel))).unwrap();
    assert_eq!(observer.status().await.unwrap().listeners, None);
    let before = observer.status_with_listeners().await.unwrap();
    assert_eq!(before.listeners, Some(0));
    assert_eq!(before.listen_works, Some(true));
    assert!(!before.in_recovery);
    let (a, _a_rx) = listening(quick(config_on(&channel))).await;
    let (b, _b_rx) = listening(quick(config_on(&channel))).await;
    let status = observer.status_with_listeners().await.unwrap();
    assert_eq!(status.listeners, Some(2), "{status:?}");
    a.close().await.unwrap();
    b.close().await.unwrap();
}

/// A pipe outlives the runtime it first pushed from: what it keeps from one push to the
/// next (a connection, a timer) is replaced, not used with a runtime that is gone.
#[test]
fn a_pipe_pushes_from_a_second_runtime_once_the_first_is_gone() {
    let channel = unique("runtimes");
    let first = support::runtime();
    let pusher = first.block_on(async {
        let pusher = PgPipe::new(config_on(&channel)).unwrap();
        pusher.push(&new_message(1, 1)).await.unwrap();
        pusher
    });
    drop(first);
    pushes_from_a_new_runtime(pusher, &channel, &[new_message(1, 2), new_message(1, 3)]);
}

/// On a runtime of its own, `pusher` sends `updates` to a new listener on `channel`, which
/// receives them; then `close` returns.
fn pushes_from_a_new_runtime(pusher: PgPipe, channel: &str, updates: &[Update]) {
    support::runtime().block_on(async {
        let (listener, mut rx) = listening(config_on(channel)).await;
        for update in updates {
            pusher.push(update).await.unwrap();
        }
        assert_eq!(receive_exactly(&mut rx, updates.len()).await, updates);
        tokio::time::timeout(Duration::from_secs(5), pusher.close())
            .await
            .expect("close returns")
            .unwrap();
        listener.close().await.unwrap();
    });
}

/// A runtime that shuts down while a push waits for its flusher task does not leave the
/// queue claimed: later pushes from another runtime go out, and `close` returns.
#[test]
fn a_flusher_task_lost_with_its_runtime_does_not_block_later_pushes() {
    let channel = unique("lostflusher");
    let config = || {
        config_on(&channel)
            .with_push(|p| p.with_max_batch_wait(Duration::from_secs(1)))
            .with_push(|p| p.with_timeout(Duration::from_secs(3)))
    };
    let first = support::runtime();
    let pusher = first.block_on(async {
        let pusher = PgPipe::new(config()).unwrap();
        // The push starts a flusher task that gathers company for a second: give up on the
        // push before then, and shut the runtime down with the task still waiting.
        let gave_up =
            tokio::time::timeout(Duration::from_millis(50), pusher.push(&new_message(1, 1))).await;
        assert!(gave_up.is_err());
        pusher
    });
    drop(first);
    pushes_from_a_new_runtime(pusher, &channel, &[new_message(1, 2)]);
}
