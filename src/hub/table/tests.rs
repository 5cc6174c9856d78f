//! The fan-out decisions, without a server: order, lag, reload routing, the subscription
//! count with its grace.

use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use super::{Sub, Table};
use crate::hub::watch::{Kinds, MailboxEvent, ReloadReason, Slot};
use crate::listen::{Event, ResyncReason};
use crate::seqset::SeqSet;
use crate::stats::Counters;
use crate::update::{MailboxKey, Update, UpdateKind};

const GRACE: Duration = Duration::from_secs(2);

fn new_message(key: impl Into<MailboxKey>, uid: u32) -> Event {
    Event::Update(Update::new_message(key, SeqSet::single(uid).unwrap()))
}

fn slot(bound: usize) -> Arc<Slot> {
    Arc::new(Slot::new(bound, Kinds::ALL))
}

/// What a slot holds, as the watch would read it.
fn drain(slot: &Slot) -> Vec<MailboxEvent> {
    std::iter::from_fn(|| slot.take().flatten()).collect()
}

fn uids(events: &[MailboxEvent]) -> Vec<String> {
    events
        .iter()
        .map(|e| match e {
            MailboxEvent::Update(u) => u.seq_set().to_string(),
            MailboxEvent::Reload(ReloadReason::Lagged { missed }) => format!("lagged {missed}"),
            MailboxEvent::Reload(ReloadReason::Resync(r)) => format!("resync {r:?}"),
        })
        .collect()
}

#[test]
fn each_watch_gets_exactly_its_mailboxs_updates_in_order() {
    let mut table = Table::new(GRACE, Arc::default());
    let now = Instant::now();
    let (a1, a2, b) = (slot(100), slot(100), slot(100));
    table.open(&"a".into(), a1.clone(), false).unwrap();
    table.open(&"a".into(), a2.clone(), false).unwrap();
    table.open(&7.into(), b.clone(), false).unwrap();
    for uid in 1..=5 {
        table.route(new_message("a", uid), now);
        table.route(new_message(7, uid * 10), now);
        table.route(new_message("nobody", uid), now);
    }
    assert_eq!(uids(&drain(&a1)), ["1", "2", "3", "4", "5"]);
    assert_eq!(uids(&drain(&a2)), ["1", "2", "3", "4", "5"]);
    assert_eq!(uids(&drain(&b)), ["10", "20", "30", "40", "50"]);
}

#[test]
fn watches_of_one_mailbox_share_one_decoded_update() {
    let mut table = Table::new(GRACE, Arc::default());
    let (a1, a2) = (slot(10), slot(10));
    table.open(&"a".into(), a1.clone(), false).unwrap();
    table.open(&"a".into(), a2.clone(), false).unwrap();
    table.route(new_message("a", 1), Instant::now());
    match (&drain(&a1)[..], &drain(&a2)[..]) {
        ([MailboxEvent::Update(x)], [MailboxEvent::Update(y)]) => assert!(Arc::ptr_eq(x, y)),
        other => panic!("{other:?}"),
    }
}

#[test]
fn a_full_watch_drops_its_backlog_for_one_lagged_and_goes_on() {
    let mut table = Table::new(GRACE, Arc::default());
    let now = Instant::now();
    let (stalled, reader) = (slot(3), slot(3));
    table.open(&"a".into(), stalled.clone(), false).unwrap();
    table.open(&"a".into(), reader.clone(), false).unwrap();
    let mut lagged = 0;
    for uid in 1..=4 {
        lagged += table.route(new_message("a", uid), now).0.lagged;
        // The other watch reads as it goes, and is never touched by the stalled one.
        assert_eq!(uids(&drain(&reader)), [uid.to_string()]);
    }
    // Three held, the fourth found it full: all four dropped, one reload.
    assert_eq!(lagged, 1);
    assert_eq!(stalled.len(), 1);
    // Still not reading: the backlog refills and is folded into the same reload.
    for uid in 5..=20 {
        lagged += table.route(new_message("a", uid), now).0.lagged;
        assert!(stalled.len() <= 3, "over the bound: {}", stalled.len());
        assert_eq!(uids(&drain(&reader)), [uid.to_string()]);
    }
    assert_eq!(lagged, 1, "one reload per time it fell behind");
    let events = drain(&stalled);
    // 20 updates: the reload stands for those dropped, then what came after it.
    let missed = match &events[0] {
        MailboxEvent::Reload(ReloadReason::Lagged { missed }) => *missed,
        other => panic!("{other:?}"),
    };
    assert_eq!(missed as usize + events.len() - 1, 20);
    assert_eq!(uids(&events), ["lagged 19", "20"]);
    // Having read, it falls behind afresh: a new reload.
    for uid in 21..=24 {
        lagged += table.route(new_message("a", uid), now).0.lagged;
        drain(&reader);
    }
    assert_eq!(lagged, 2);
    assert_eq!(uids(&drain(&stalled)), ["lagged 4"]);
    let stats = stalled.stats();
    assert_eq!((stats.delivered, stats.lagged, stats.missed), (24, 2, 23));
}

#[test]
fn a_resync_reaches_the_watches_it_concerns() {
    let mut table = Table::new(GRACE, Arc::default());
    let now = Instant::now();
    let (a, b, c) = (slot(10), slot(10), slot(10));
    table.open(&"a".into(), a.clone(), false).unwrap();
    table.open(&"b".into(), b.clone(), false).unwrap();
    table.open(&"c".into(), c.clone(), false).unwrap();
    // Per mailbox: only those named.
    table.route(
        Event::Resync(ResyncReason::Resubscribed {
            keys: vec!["a".into(), "b".into(), "gone".into()],
        }),
        now,
    );
    table.route(
        Event::Resync(ResyncReason::Unrepresentable { key: "c".into() }),
        now,
    );
    assert_eq!(drain(&a).len(), 1);
    assert_eq!(drain(&b).len(), 1);
    assert!(matches!(
        &drain(&c)[..],
        [MailboxEvent::Reload(ReloadReason::Resync(r))]
            if matches!(**r, ResyncReason::Unrepresentable { .. })
    ));
    // Everything: every watch.
    table.route(Event::Resync(ResyncReason::Reconnected), now);
    for s in [&a, &b, &c] {
        assert!(matches!(
            &drain(s)[..],
            [MailboxEvent::Reload(ReloadReason::Resync(r))] if **r == ResyncReason::Reconnected
        ));
    }
    // Connection events and positions: nothing.
    table.route(Event::Connected, now);
    table.route(Event::Disconnected { reason: "x".into() }, now);
    assert!(drain(&a).is_empty());
    // A resync into a full watch is its lag's reload.
    let full = slot(1);
    table.open(&"d".into(), full.clone(), false).unwrap();
    table.route(new_message("d", 1), now);
    table.route(Event::Resync(ResyncReason::Reconnected), now);
    assert_eq!(uids(&drain(&full)), ["lagged 1"]);
}

#[test]
fn a_destroyed_mailbox_ends_its_watches_after_its_update() {
    let counters = Arc::new(Counters::default());
    let mut table = Table::new(GRACE, counters.clone());
    let now = Instant::now();
    // A full watch still gets the destroy, after its lag's reload.
    let (a, full) = (slot(10), slot(1));
    table.open(&"a".into(), a.clone(), false).unwrap();
    table.open(&"a".into(), full.clone(), false).unwrap();
    table.route(new_message("a", 1), now);
    table.route(Event::Update(Update::mailbox_destroyed("a")), now);
    table.route(new_message("a", 2), now);
    assert_eq!(table.watches(), 0);
    assert_eq!(table.mailboxes(), 0);
    assert_eq!(counters.snapshot().watches, 0);
    let events = drain(&a);
    assert_eq!(events.len(), 2);
    assert!(
        matches!(&events[1], MailboxEvent::Update(u) if u.kind() == UpdateKind::MailboxDestroyed)
    );
    assert_eq!(a.take(), Some(None), "ended");
    let events = drain(&full);
    assert_eq!(uids(&events[..1]), ["lagged 1"]);
    assert!(
        matches!(&events[1], MailboxEvent::Update(u) if u.kind() == UpdateKind::MailboxDestroyed)
    );
    // A new watch of the key starts afresh.
    let again = slot(10);
    table.open(&"a".into(), again.clone(), false).unwrap();
    table.route(new_message("a", 3), now);
    assert_eq!(uids(&drain(&again)), ["3"]);
}

#[test]
fn a_filter_takes_its_kinds_and_always_the_destroy() {
    let mut table = Table::new(GRACE, Arc::default());
    let now = Instant::now();
    let only_new = Arc::new(Slot::new(10, Kinds::NONE.with(UpdateKind::NewMessage)));
    table.open(&"a".into(), only_new.clone(), false).unwrap();
    table.route(new_message("a", 1), now);
    table.route(
        Event::Update(Update::expunge("a", SeqSet::single(1).unwrap())),
        now,
    );
    table.route(Event::Update(Update::mailbox_destroyed("a")), now);
    let kinds: Vec<_> = drain(&only_new)
        .iter()
        .map(|e| match e {
            MailboxEvent::Update(u) => u.kind(),
            other => panic!("{other:?}"),
        })
        .collect();
    assert_eq!(
        kinds,
        [UpdateKind::NewMessage, UpdateKind::MailboxDestroyed]
    );
}

#[test]
fn the_first_watch_subscribes_and_the_last_unsubscribes_after_the_grace() {
    let mut table = Table::new(GRACE, Arc::default());
    let t0 = Instant::now();
    let key: MailboxKey = "a".into();
    let (id1, subscribe) = table.open(&key, slot(10), true).unwrap();
    assert!(subscribe, "the first watch subscribes");
    assert_eq!(
        table.open_listened(&key, &slot(10)),
        None,
        "not listened yet: wait"
    );
    let (id2, subscribe) = table.open(&key, slot(10), true).unwrap();
    assert!(!subscribe, "the second finds it subscribing");
    assert!(!table.subscribed(&key, true, t0));
    // Listened: a watch opens without the lock (and goes again).
    let id = table.open_listened(&key, &slot(10)).expect("listened");
    assert!(!table.close(&key, id, t0));
    assert_eq!(table.subscribed_count(), 1);
    assert!(!table.close(&key, id1, t0));
    assert!(table.close(&key, id2, t0), "the last one starts the grace");
    assert_eq!(table.next_grace(), Some(t0 + GRACE));
    // Reselected within the grace: kept, no new subscription, and the grace is void.
    let id3 = table.open_listened(&key, &slot(10)).expect("in its grace");
    assert!(table.expired(t0 + GRACE).is_empty());
    assert_eq!(table.subscribed_count(), 1);
    // Gone again: unsubscribed once this grace expires, and not before.
    let t1 = t0 + Duration::from_secs(1);
    assert!(table.close(&key, id3, t1));
    assert!(
        table
            .expired(t1 + GRACE - Duration::from_millis(1))
            .is_empty()
    );
    let expired = table.expired(t1 + GRACE);
    assert_eq!(expired.len(), 1);
    let (k, generation) = expired[0].clone();
    assert!(table.release(&k, generation));
    assert!(!table.release(&k, generation), "released once");
    assert_eq!((table.subscribed_count(), table.mailboxes()), (0, 0));
    // And a new watch subscribes again.
    assert!(table.open(&key, slot(10), true).unwrap().1);
}

#[test]
fn a_watch_back_after_the_grace_expired_but_before_the_release_keeps_it() {
    let mut table = Table::new(GRACE, Arc::default());
    let t0 = Instant::now();
    let key: MailboxKey = "a".into();
    let (id, _) = table.open(&key, slot(10), true).unwrap();
    table.subscribed(&key, true, t0);
    table.close(&key, id, t0);
    let expired = table.expired(t0 + GRACE);
    // A watch opened before the release ran (the release waits for the subscription lock
    // the opening holds): it keeps the subscription.
    let (_, subscribe) = table.open(&key, slot(10), true).unwrap();
    assert!(!subscribe);
    assert!(!table.release(&expired[0].0, expired[0].1));
    assert_eq!(table.subscribed_count(), 1);
}

#[test]
fn a_failed_subscription_forgets_the_mailbox_and_one_done_after_its_watch_went_gets_a_grace() {
    let mut table = Table::new(GRACE, Arc::default());
    let t0 = Instant::now();
    let key: MailboxKey = "a".into();
    let (id, _) = table.open(&key, slot(10), true).unwrap();
    assert!(!table.subscribed(&key, false, t0));
    assert!(!table.close(&key, id, t0));
    assert_eq!((table.subscribed_count(), table.mailboxes()), (0, 0));
    // The caller gave up while subscribing: the subscription, once done, is released
    // after the grace.
    let (id, _) = table.open(&key, slot(10), true).unwrap();
    assert!(!table.close(&key, id, t0), "still subscribing");
    assert!(
        table.subscribed(&key, true, t0),
        "done with no watch: a grace"
    );
    assert_eq!(table.expired(t0 + GRACE).len(), 1);
}

#[test]
fn keys_that_need_no_listen_are_forgotten_with_their_last_watch() {
    let mut table = Table::new(GRACE, Arc::default());
    let (id, subscribe) = table.open(&"a".into(), slot(10), false).unwrap();
    assert!(!subscribe);
    assert!(!table.close(&"a".into(), id, Instant::now()));
    assert_eq!(table.mailboxes(), 0);
    assert_eq!(table.next_grace(), None);
    assert_eq!(
        table.mailboxes.get(&MailboxKey::from("a")).map(|m| m.sub),
        None::<Sub>
    );
}

#[test]
fn an_ended_hub_ends_its_watches_and_opens_none() {
    let counters = Arc::new(Counters::default());
    let mut table = Table::new(GRACE, counters.clone());
    let a = slot(10);
    let (id, _) = table.open(&"a".into(), a.clone(), false).unwrap();
    table.open(&"b".into(), slot(10), false).unwrap();
    assert_eq!(counters.snapshot().watches, 2);
    table.route(new_message("a", 1), Instant::now());
    table.end();
    assert_eq!(counters.snapshot().watches, 0);
    // A watch dropped after the end changes nothing.
    assert!(!table.close(&"a".into(), id, Instant::now()));
    assert_eq!(counters.snapshot().watches, 0);
    assert_eq!(uids(&drain(&a)), ["1"]);
    assert_eq!(a.take(), Some(None));
    assert!(table.open(&"a".into(), slot(10), false).is_err());
}

#[test]
fn reloads_in_a_row_are_one_and_never_make_a_lag() {
    let mut table = Table::new(GRACE, Arc::default());
    let now = Instant::now();
    let a = slot(3);
    table.open(&"a".into(), a.clone(), false).unwrap();
    let mut lagged = 0;
    for _ in 0..5 {
        lagged += table
            .route(Event::Resync(ResyncReason::Reconnected), now)
            .0
            .lagged;
    }
    assert_eq!(lagged, 0);
    assert_eq!(a.len(), 1, "one reload stands for the five");
    // After an update, a resync is a reload of its own again.
    table.route(new_message("a", 1), now);
    table.route(Event::Resync(ResyncReason::Reconnected), now);
    assert_eq!(
        uids(&drain(&a)),
        ["resync Reconnected", "1", "resync Reconnected"]
    );
}

#[test]
fn a_per_mailbox_resync_reaches_every_key_on_its_channel() {
    let mut table = Table::new(GRACE, Arc::default());
    let now = Instant::now();
    // 5 and "__uint64_5" are one maddy channel; the pipe names whichever subscribed first.
    let (id, name, other) = (slot(10), slot(10), slot(10));
    table.open(&5.into(), id.clone(), false).unwrap();
    table
        .open(&"__uint64_5".into(), name.clone(), false)
        .unwrap();
    table.open(&6.into(), other.clone(), false).unwrap();
    table.route(
        Event::Resync(ResyncReason::Resubscribed {
            keys: vec![5.into()],
        }),
        now,
    );
    table.route(
        Event::Resync(ResyncReason::Unrepresentable {
            key: "__uint64_6".into(),
        }),
        now,
    );
    assert_eq!(drain(&id).len(), 1);
    assert_eq!(drain(&name).len(), 1);
    assert_eq!(drain(&other).len(), 1);
}
