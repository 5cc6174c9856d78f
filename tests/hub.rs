//! The IDLE hub against a real server: fan-out to many watches with one that never reads,
//! the maddy layout's subscriptions with real LISTENs, resyncs as reloads, and nothing
//! left running or listening after watches, the hub or the pipe go.

mod support;

use std::collections::HashMap;
use std::time::Duration;

use support::{ARRIVE, SILENCE, config_on, sql, unique};
use tokio::task::JoinSet;
use updatepipe::{
    Config, Error, Hub, HubOptions, Layout, MailboxEvent, PgPipe, ReloadReason, ResyncReason,
    SeqSet, Update, UpdateKind, UpdatePipe, Watch, WatchOptions,
};

/// What one reading watch saw of its mailbox: UIDs in order, and any reload.
async fn read_uids(mut watch: Watch, each: u32) -> Result<Vec<u32>, String> {
    let mut uids = Vec::with_capacity(each as usize);
    while uids.len() < each as usize {
        match tokio::time::timeout(ARRIVE * 3, watch.recv()).await {
            Ok(Some(MailboxEvent::Update(update))) => {
                uids.push(update.seq_set().as_single().expect("one UID"));
            }
            Ok(other) => return Err(format!("after {} updates: {other:?}", uids.len())),
            Err(_) => return Err(format!("timed out after {} updates", uids.len())),
        }
    }
    // Nothing more for it.
    if let Ok(extra) = tokio::time::timeout(SILENCE, watch.recv()).await {
        return Err(format!("more than its mailbox's updates: {extra:?}"));
    }
    Ok(uids)
}

/// Who sends the updates of the fan-out.
#[derive(Clone, Copy)]
enum Source {
    /// Another pipe, its envelopes on the pipe's channel.
    Pipe,
    /// maddy nodes, each update on its mailbox's channel.
    Maddy,
}

/// `mailboxes` mailboxes (keys `base..base+mailboxes`), `each` updates each (UIDs 1 up),
/// sent by `senders` sequential senders that own their mailboxes (so that each mailbox's
/// updates commit in UID order), `per_tx` updates per transaction.
async fn push_numbered(
    config: &Config,
    source: Source,
    (base, mailboxes, each): (u64, u64, u32),
    senders: u64,
    per_tx: usize,
) {
    let mut tasks = JoinSet::new();
    for sender in 0..senders {
        let config = config.clone();
        tasks.spawn(async move {
            let pipe = PgPipe::new(config).unwrap();
            let maddy = sql().await;
            let own: Vec<u64> = (base..base + mailboxes)
                .filter(|k| k % senders == sender)
                .collect();
            let mut batch = Vec::with_capacity(per_tx);
            for uid in 1..=each {
                for key in &own {
                    batch.push(Update::new_message(*key, SeqSet::single(uid).unwrap()));
                    if batch.len() == per_tx || (uid == each && key == own.last().unwrap()) {
                        match source {
                            Source::Pipe => pipe.push_many(&batch).await.unwrap(),
                            Source::Maddy => maddy_push(&maddy, &batch).await,
                        }
                        batch.clear();
                    }
                }
            }
            pipe.close().await.unwrap();
        });
    }
    while let Some(done) = tasks.join_next().await {
        done.unwrap();
    }
}

/// Drains a watch that never read: its events as they stand.
fn drain(watch: &mut Watch) -> Vec<MailboxEvent> {
    std::iter::from_fn(|| watch.try_recv()).collect()
}

/// The fan-out: 1,000 watches over 100 mailboxes and one that never reads, 100,000
/// updates from another pipe. Every reading watch gets exactly its mailbox's updates in
/// order; the stalled one holds at most its bound throughout, and is told one
/// `Reload(Lagged)` for the whole time it fell behind, which with what it holds accounts
/// for every update of its mailbox.
async fn fan_out(config: Config, source: Source) {
    const MAILBOXES: u64 = 100;
    const EACH: u32 = 1_000;
    const STALLED_BOUND: usize = 50;
    let base = u64::from(rand::random::<u16>()) * 1_000 + 1_000;
    let server = PgPipe::new(config.clone()).unwrap();
    let hub = server
        .hub(HubOptions::default().with_watch_bound(2_000))
        .await
        .unwrap();
    let mut readers = JoinSet::new();
    for i in 0..1_000u64 {
        let watch = hub.watch(base + i % MAILBOXES).await.unwrap();
        readers.spawn(async move { (i % MAILBOXES, read_uids(watch, EACH).await) });
    }
    let mut stalled = hub
        .watch_with(base, WatchOptions::default().with_bound(STALLED_BOUND))
        .await
        .unwrap();
    if config.layout() == Layout::Maddy {
        assert_eq!(
            hub.subscribed(),
            MAILBOXES as usize,
            "one LISTEN per mailbox"
        );
    }
    let pushing = tokio::spawn(async move {
        push_numbered(&config, source, (base, MAILBOXES, EACH), 10, 100).await;
    });
    // The stalled watch never holds more than its bound, while everything flows.
    let mut most = 0;
    while !pushing.is_finished() {
        most = most.max(stalled.len());
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    pushing.await.unwrap();
    let mut per_mailbox = HashMap::new();
    while let Some(done) = readers.join_next().await {
        let (mailbox, uids) = done.unwrap();
        let uids = uids.unwrap_or_else(|e| panic!("mailbox {mailbox}: {e}"));
        assert!(
            uids.iter().copied().eq(1..=EACH),
            "mailbox {mailbox}: not 1..={EACH} in order"
        );
        *per_mailbox.entry(mailbox).or_insert(0) += 1;
    }
    assert!(per_mailbox.values().all(|&n| n == 10), "{per_mailbox:?}");
    most = most.max(stalled.len());
    assert!(most <= STALLED_BOUND, "the stalled watch held {most}");
    let events = drain(&mut stalled);
    let lags: Vec<u64> = events
        .iter()
        .filter_map(|e| match e {
            MailboxEvent::Reload(ReloadReason::Lagged { missed }) => Some(*missed),
            _ => None,
        })
        .collect();
    assert_eq!(lags.len(), 1, "one reload for one time behind: {lags:?}");
    let held = events.len() as u64 - 1;
    assert_eq!(lags[0] + held, u64::from(EACH));
    let watch_stats = stalled.stats();
    assert_eq!(
        (
            watch_stats.delivered,
            watch_stats.lagged,
            watch_stats.missed
        ),
        (u64::from(EACH), 1, lags[0])
    );
    let stats = server.stats();
    assert_eq!(stats.watch_delivered, 1_001 * u64::from(EACH));
    assert_eq!((stats.watch_lagged, stats.watch_missed), (1, lags[0]));
    assert_eq!(stats.resyncs, 0, "{stats:?}");
    assert_eq!(stats.watches, 1);
    drop(stalled);
    assert_eq!(server.stats().watches, 0);
    server.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_watches_get_their_mailboxes_and_one_that_never_reads_holds_no_one() {
    fan_out(config_on(&unique("hub_fan_out")), Source::Pipe).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_same_in_the_maddy_layout_from_maddy_nodes_with_a_listen_per_mailbox() {
    fan_out(
        config_on(&unique("hub_fan_out_maddy")).with_layout(Layout::Maddy),
        Source::Maddy,
    )
    .await;
}

/// A maddy node's update of a mailbox: `<sender>;<json>` on the mailbox's channel.
async fn maddy_push(client: &tokio_postgres::Client, updates: &[Update]) {
    let channels: Vec<String> = updates
        .iter()
        .map(|u| u.key().maddy_channel().unwrap().as_str().to_owned())
        .collect();
    let payloads: Vec<String> = updates
        .iter()
        .map(|u| format!("4242-0xc000123;{}\n", u.to_json().replace(';', "\u{10}")))
        .collect();
    client
        .execute(
            "SELECT count(pg_notify(c, p)) FROM unnest($1::text[], $2::text[]) AS t(c, p)",
            &[&channels, &payloads],
        )
        .await
        .unwrap();
}

/// The maddy layout: updates maddy nodes send on mailboxes' channels reach exactly the
/// watched mailboxes' watches, which the hub subscribed; watches opened and dropped by
/// the thousand while updates flow leave no subscription behind once the grace is over
/// (a maddy update to every one of those mailboxes then reaches the pipe no more).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_watches_opened_and_dropped_leave_no_listen_behind() {
    const MAILBOXES: u64 = 200;
    let base = u64::from(rand::random::<u16>()) * 1_000 + 70_000_000;
    let grace = Duration::from_millis(300);
    let config = config_on(&unique("hub_churn")).with_layout(Layout::Maddy);
    let server = PgPipe::new(config).unwrap();
    let hub = server
        .hub(HubOptions::default().with_unsubscribe_grace(grace))
        .await
        .unwrap();
    let maddy = sql().await;
    // A watch held throughout, on a mailbox of its own: it gets the maddy node's updates
    // of it, in order, while the others churn.
    let kept_key = base + MAILBOXES;
    let kept = hub.watch(kept_key).await.unwrap();
    let flowing = {
        let maddy = sql().await;
        tokio::spawn(async move {
            for round in 0..50u32 {
                let mut updates: Vec<Update> = (0..MAILBOXES)
                    .map(|k| Update::new_message(base + k, SeqSet::single(round + 1).unwrap()))
                    .collect();
                updates.push(Update::new_message(
                    kept_key,
                    SeqSet::single(round + 1).unwrap(),
                ));
                maddy_push(&maddy, &updates).await;
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
    };
    let mut churn = JoinSet::new();
    for task in 0..20u64 {
        let hub = hub.clone();
        churn.spawn(async move {
            for i in 0..500u64 {
                let key = base + (task * 7 + i * 13) % MAILBOXES;
                let mut watch = hub.watch(key).await.unwrap();
                // Some read what came; some give up mid-subscription.
                match i % 3 {
                    0 => {
                        let _ = tokio::time::timeout(Duration::from_millis(2), watch.recv()).await;
                    }
                    1 => {
                        let next = hub.watch(key + 1);
                        let _ = tokio::time::timeout(Duration::from_micros(50), next).await;
                    }
                    _ => {}
                }
            }
        });
    }
    while let Some(done) = churn.join_next().await {
        done.unwrap();
    }
    flowing.await.unwrap();
    let uids = read_uids(kept, 50).await.unwrap();
    assert!(uids.iter().copied().eq(1..=50), "{uids:?}");
    // Every watch gone: once the grace is over, nothing is subscribed.
    let deadline = tokio::time::Instant::now() + ARRIVE;
    while (hub.subscribed(), hub.mailboxes(), hub.watches()) != (0, 0, 0) {
        assert!(
            tokio::time::Instant::now() < deadline,
            "left: {} subscribed, {} mailboxes, {} watches",
            hub.subscribed(),
            hub.mailboxes(),
            hub.watches()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(server.stats().watches, 0);
    // The server agrees: maddy updates to every mailbox reach the pipe no more.
    let before = server.stats().delivered;
    let updates: Vec<Update> = (0..=MAILBOXES + 1)
        .map(|k| Update::new_message(base + k, SeqSet::single(999).unwrap()))
        .collect();
    maddy_push(&maddy, &updates).await;
    tokio::time::sleep(SILENCE).await;
    assert_eq!(server.stats().delivered, before, "a LISTEN was left behind");
    server.close().await.unwrap();
}

/// Best effort: a lost connection is a reload for every watch, then updates flow again.
/// Durable: the log replays what was pushed meanwhile, and no watch reloads.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reconnect_reloads_every_watch_in_best_effort_and_none_in_durable_mode() {
    for durable in [false, true] {
        let channel = unique("hub_reconnect");
        let config = config_on(&channel).with_durable(durable);
        let app = unique("hub_listener");
        let server = PgPipe::new(config.clone().with_application_name(&app)).unwrap();
        if durable {
            server.migrate().await.unwrap();
        }
        let hub = server.hub(HubOptions::default()).await.unwrap();
        let mut watches = Vec::new();
        for key in [1u64, 1, 2] {
            watches.push(hub.watch(key).await.unwrap());
        }
        let pusher = PgPipe::new(config).unwrap();
        let admin = sql().await;
        let ended: i64 = admin
            .query_one(
                "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity \
                 WHERE application_name = $1 || '/listen'",
                &[&app],
            )
            .await
            .unwrap()
            .get(0);
        assert_eq!(ended, 1);
        // Pushed while the listener may be away.
        pusher
            .push_many(&[
                Update::new_message(1, SeqSet::single(1).unwrap()),
                Update::new_message(2, SeqSet::single(1).unwrap()),
            ])
            .await
            .unwrap();
        let deadline = tokio::time::Instant::now() + ARRIVE;
        while server.stats().reconnects == 0 {
            assert!(tokio::time::Instant::now() < deadline, "never reconnected");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        pusher
            .push_many(&[
                Update::new_message(1, SeqSet::single(2).unwrap()),
                Update::new_message(2, SeqSet::single(2).unwrap()),
            ])
            .await
            .unwrap();
        for watch in &mut watches {
            let mut reloads = 0;
            let mut uids = Vec::new();
            while !uids.contains(&2) {
                match tokio::time::timeout(ARRIVE, watch.recv()).await {
                    Ok(Some(MailboxEvent::Update(u))) => {
                        uids.push(u.seq_set().as_single().unwrap())
                    }
                    Ok(Some(MailboxEvent::Reload(ReloadReason::Resync(reason)))) => {
                        assert_eq!(*reason, ResyncReason::Reconnected);
                        reloads += 1;
                    }
                    other => panic!("{other:?}"),
                }
            }
            if durable {
                // Replayed from the log: both, once, in order, and no reload.
                assert_eq!((uids, reloads), (vec![1, 2], 0));
            } else {
                // The first may or may not have been heard; the reload says so.
                assert_eq!(reloads, 1, "{uids:?}");
                assert_eq!(uids.last(), Some(&2));
            }
        }
        pusher.close().await.unwrap();
        server.close().await.unwrap();
    }
}

/// A destroyed mailbox's update is its watches' last event; a new watch of it starts
/// afresh. A filter takes its kinds (and the destroy).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_destroyed_mailbox_ends_its_watches_and_filters_take_their_kinds() {
    let config = config_on(&unique("hub_destroy"));
    let server = PgPipe::new(config.clone()).unwrap();
    let hub = server.hub(HubOptions::default()).await.unwrap();
    let mut all = hub.watch("Trash").await.unwrap();
    let mut expunges = hub
        .watch_with(
            "Trash",
            WatchOptions::default().with_kinds([UpdateKind::Expunge]),
        )
        .await
        .unwrap();
    let pusher = PgPipe::new(config).unwrap();
    pusher
        .push_many(&[
            Update::new_message("Trash", SeqSet::single(1).unwrap()),
            Update::expunge("Trash", SeqSet::single(1).unwrap()),
            Update::mailbox_destroyed("Trash"),
        ])
        .await
        .unwrap();
    // Every event up to the watch's end: updates only, their kinds.
    async fn kinds_to_the_end(watch: &mut Watch) -> Vec<UpdateKind> {
        let mut kinds = Vec::new();
        while let Some(event) = tokio::time::timeout(ARRIVE, watch.recv()).await.unwrap() {
            match event {
                MailboxEvent::Update(u) => kinds.push(u.kind()),
                other => panic!("{other:?}"),
            }
        }
        kinds
    }
    assert_eq!(
        kinds_to_the_end(&mut all).await,
        [
            UpdateKind::NewMessage,
            UpdateKind::Expunge,
            UpdateKind::MailboxDestroyed
        ]
    );
    assert_eq!(
        kinds_to_the_end(&mut expunges).await,
        [UpdateKind::Expunge, UpdateKind::MailboxDestroyed]
    );
    assert!(all.is_ended());
    assert_eq!(hub.watches(), 0);
    // The mailbox made again: a new watch gets its updates.
    let mut again = hub.watch("Trash").await.unwrap();
    pusher
        .push(&Update::new_message("Trash", SeqSet::single(1).unwrap()))
        .await
        .unwrap();
    assert!(matches!(
        tokio::time::timeout(ARRIVE, again.recv()).await.unwrap(),
        Some(MailboxEvent::Update(_))
    ));
    pusher.close().await.unwrap();
    server.close().await.unwrap();
}

/// The listener connections of a pipe with this application name.
async fn listeners(admin: &tokio_postgres::Client, app: &str) -> i64 {
    admin
        .query_one(
            "SELECT count(*) FROM pg_stat_activity WHERE application_name = $1 || '/listen'",
            &[&app],
        )
        .await
        .unwrap()
        .get(0)
}

/// Dropping the hub ends every watch and its listener's connection; closing the pipe ends
/// the hub; bad options and a pipe that cannot host a hub are typed errors.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_hub_leaves_nothing_running_and_refuses_what_it_cannot_do() {
    let admin = sql().await;
    let app = unique("hub_drop");
    let config = config_on(&unique("hub_drop")).with_application_name(&app);
    let server = PgPipe::new(config.clone()).unwrap();
    let hub = server.hub(HubOptions::default()).await.unwrap();
    let mut watch = hub.watch(5).await.unwrap();
    assert_eq!(listeners(&admin, &app).await, 1);
    // A second hub, or listening, on the same pipe: it listens already.
    assert!(matches!(
        server.hub(HubOptions::default()).await,
        Err(Error::AlreadyListening)
    ));
    let (tx, _rx) = tokio::sync::mpsc::channel(1);
    assert!(matches!(
        server.listen(tx).await,
        Err(Error::AlreadyListening)
    ));
    assert!(matches!(
        hub.watch_with(5, WatchOptions::default().with_bound(0))
            .await,
        Err(Error::Config(_))
    ));
    drop(hub);
    assert_eq!(
        tokio::time::timeout(ARRIVE, watch.recv()).await.unwrap(),
        None
    );
    assert_eq!(server.stats().watches, 0, "an ended watch is not open");
    let deadline = tokio::time::Instant::now() + ARRIVE;
    while listeners(&admin, &app).await != 0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the listener's connection is left"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    server.close().await.unwrap();

    // Closing the pipe ends the hub: its watches end, and it opens none.
    let server = PgPipe::new(config_on(&unique("hub_close"))).unwrap();
    let hub: Hub = server.hub(HubOptions::default()).await.unwrap();
    let mut watch = hub.watch("INBOX").await.unwrap();
    server.close().await.unwrap();
    assert_eq!(
        tokio::time::timeout(ARRIVE, watch.recv()).await.unwrap(),
        None
    );
    assert!(matches!(hub.watch("INBOX").await, Err(Error::Closed)));
    assert!(matches!(
        server.hub(HubOptions::default()).await,
        Err(Error::Closed)
    ));

    // Options and pipes a hub refuses.
    let server = PgPipe::new(config_on(&unique("hub_refused"))).unwrap();
    assert!(matches!(
        server.hub(HubOptions::default().with_watch_bound(0)).await,
        Err(Error::Config(_))
    ));
    assert!(matches!(
        server.hub(HubOptions::default().with_buffer(0)).await,
        Err(Error::Config(_))
    ));
    assert!(matches!(
        server
            .hub(HubOptions::default().with_unsubscribe_grace(Duration::MAX))
            .await,
        Err(Error::Config(_))
    ));
    server.close().await.unwrap();
    let consumer = PgPipe::new(
        config_on(&unique("hub_consumer"))
            .with_durable(true)
            .with_consumer("hub_test"),
    )
    .unwrap();
    assert!(matches!(
        consumer.hub(HubOptions::default()).await,
        Err(Error::Config(_))
    ));
    consumer.close().await.unwrap();
}

/// Sessions of one process hear each other: the hub's watches get what its own pipe
/// pushes, once committed (a push in the caller's transaction once that commits), once
/// each in durable mode too; unless the hub is told the application does that itself.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hub_hears_its_own_pipes_updates_once_committed() {
    for durable in [false, true] {
        let config = config_on(&unique("hub_own")).with_durable(durable);
        let pipe = PgPipe::new(config).unwrap();
        if durable {
            pipe.migrate().await.unwrap();
        }
        let hub = pipe.hub(HubOptions::default()).await.unwrap();
        let mut watch = hub.watch(9).await.unwrap();
        pipe.push(&Update::new_message(9, SeqSet::single(1).unwrap()))
            .await
            .unwrap();
        let mut client = sql().await;
        let rolled_back = client.transaction().await.unwrap();
        pipe.push_in(
            &rolled_back,
            &Update::new_message(9, SeqSet::single(2).unwrap()),
        )
        .await
        .unwrap();
        rolled_back.rollback().await.unwrap();
        let committed = client.transaction().await.unwrap();
        pipe.push_in(
            &committed,
            &Update::new_message(9, SeqSet::single(3).unwrap()),
        )
        .await
        .unwrap();
        committed.commit().await.unwrap();
        let mut uids = Vec::new();
        while uids.len() < 2 {
            match tokio::time::timeout(ARRIVE, watch.recv()).await {
                Ok(Some(MailboxEvent::Update(u))) => uids.push(u.seq_set().as_single().unwrap()),
                other => panic!("durable {durable}: {other:?}"),
            }
        }
        assert_eq!(uids, [1, 3], "durable {durable}");
        assert!(
            tokio::time::timeout(SILENCE, watch.recv()).await.is_err(),
            "durable {durable}: more than once"
        );
        assert_eq!(pipe.stats().echoes_dropped, 0);
        pipe.close().await.unwrap();
    }
    // Told not to: its own updates are echoes, as for any listener.
    let pipe = PgPipe::new(config_on(&unique("hub_not_own"))).unwrap();
    let hub = pipe
        .hub(HubOptions::default().with_own_updates(false))
        .await
        .unwrap();
    let mut watch = hub.watch(9).await.unwrap();
    pipe.push(&Update::new_message(9, SeqSet::single(1).unwrap()))
        .await
        .unwrap();
    assert!(tokio::time::timeout(SILENCE, watch.recv()).await.is_err());
    let deadline = tokio::time::Instant::now() + ARRIVE;
    while pipe.stats().echoes_dropped == 0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the echo never came"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    pipe.close().await.unwrap();
}
