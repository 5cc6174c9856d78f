//! The hand-off to the caller: the bound, the slow-consumer policy, the folding of
//! resyncs, fetches keeping their place.

use super::*;

fn update(key: u64) -> Update {
    Update::mailbox_destroyed(key)
}

fn events(room: usize, max_buffered: usize) -> (Outbox, mpsc::Receiver<Event>) {
    let (tx, rx) = mpsc::channel(room);
    let outbox = Outbox::new(Sink::Events(tx), max_buffered, Arc::default());
    (outbox, rx)
}

fn drain(rx: &mut mpsc::Receiver<Event>) -> Vec<Event> {
    std::iter::from_fn(|| rx.try_recv().ok()).collect()
}

#[tokio::test(start_paused = true)]
async fn reading_waits_for_a_caller_behind_while_it_takes_something() {
    let (mut outbox, _rx) = events(1, 4);
    let fill = |outbox: &mut Outbox| {
        while !outbox.is_full() {
            outbox.enqueue(update(1));
        }
    };
    let take = |outbox: &mut Outbox| {
        outbox.buffer.pop_front();
        outbox.delivered(1);
    };
    assert_eq!(outbox.reading_held(HOLD), None, "room: no wait");
    fill(&mut outbox);
    let until = outbox.reading_held(HOLD).expect("full: reading waits");
    assert_eq!(until - Instant::now(), HOLD);
    assert_eq!(outbox.reading_held(HOLD), Some(until), "the same wait");
    // The caller takes one: reading goes on, and waits again at the bound, for as long
    // as the caller keeps taking, up to the episode's length.
    for _ in 0..3 {
        tokio::time::advance(HOLD / 2).await;
        take(&mut outbox);
        assert_eq!(outbox.reading_held(HOLD), None, "room made");
        fill(&mut outbox);
        assert!(outbox.reading_held(HOLD).is_some(), "waits again");
    }
    tokio::time::advance(HOLD).await;
    assert_eq!(
        outbox.reading_held(HOLD),
        None,
        "nothing taken for a whole wait"
    );
    assert_eq!(outbox.dropped, 0);
    outbox.enqueue(update(2));
    assert_eq!(outbox.dropped, 1, "let go");
    // Not again until the caller is back under half the bound.
    take(&mut outbox);
    fill(&mut outbox);
    assert_eq!(outbox.reading_held(HOLD), None);
    take(&mut outbox);
    take(&mut outbox);
    take(&mut outbox);
    outbox.reading_held(HOLD);
    fill(&mut outbox);
    let until = outbox.reading_held(HOLD / 4).expect("a new episode");
    assert_eq!(until - Instant::now(), HOLD / 4, "at most as long as asked");
    // A caller that keeps taking, but too slowly for good, is let go after the episode.
    for _ in 0..20 {
        tokio::time::advance(HOLD / 5).await;
        take(&mut outbox);
        fill(&mut outbox);
        outbox.reading_held(HOLD);
    }
    assert_eq!(outbox.reading_held(HOLD), None, "behind too long");
}

#[test]
fn a_slow_consumer_loses_updates_then_hears_how_many() {
    let (mut outbox, mut rx) = events(1, 2);
    for key in 1..=5 {
        outbox.enqueue(update(key));
    }
    assert!(outbox.is_full());
    assert_eq!(outbox.try_deliver(), Some(1));
    outbox.delivered(1);
    assert_eq!(drain(&mut rx), [Event::Update(update(1))]);
    assert_eq!(outbox.try_deliver(), Some(1));
    // The buffer is empty: the caller has caught up, and hears what it lost.
    outbox.delivered(1);
    assert_eq!(drain(&mut rx), [Event::Update(update(2))]);
    assert_eq!(outbox.try_deliver(), Some(0));
    let resync = Event::Resync(ResyncReason::SlowConsumer { dropped: 3 });
    assert_eq!(drain(&mut rx), [resync]);
    assert_eq!(outbox.counters.snapshot().dropped_slow_consumer, 3);
}

#[test]
fn logged_updates_are_never_let_go() {
    let (mut outbox, _rx) = events(1, 2);
    for key in 1..=4 {
        outbox.push_logged(update(key));
    }
    assert_eq!(outbox.buffered_updates, 4);
    assert!(!outbox.has_room_for_tail());
    assert_eq!(outbox.dropped, 0);
}

#[test]
fn room_for_a_tail_is_under_half_the_bound() {
    let (mut outbox, _rx) = events(1, 4);
    assert!(outbox.has_room_for_tail());
    outbox.enqueue(update(1));
    assert!(outbox.has_room_for_tail());
    outbox.enqueue(update(2));
    assert!(!outbox.has_room_for_tail());
    assert!(!outbox.is_full());
}

#[tokio::test(start_paused = true)]
async fn one_undelivered_resync_stands_for_many() {
    let (mut outbox, mut rx) = events(8, 8);
    outbox.resync(ResyncReason::LogPruned);
    // Past the interval: told, but the one waiting in the buffer stands for it.
    tokio::time::advance(RESYNC_INTERVAL).await;
    outbox.resync(ResyncReason::Reconnected);
    outbox.enqueue(update(1));
    tokio::time::advance(RESYNC_INTERVAL).await;
    outbox.resync(ResyncReason::Reconnected);
    assert_eq!(outbox.try_deliver(), Some(1));
    assert_eq!(
        drain(&mut rx),
        [
            Event::Resync(ResyncReason::LogPruned),
            Event::Update(update(1)),
            Event::Resync(ResyncReason::Reconnected),
        ]
    );
    // Each is counted all the same.
    let stats = outbox.counters.snapshot();
    assert_eq!((stats.resyncs, stats.resyncs_coalesced), (3, 1));
}

#[tokio::test(start_paused = true)]
async fn a_flood_of_resyncs_is_told_twice_per_interval_and_its_last_cause_always() {
    let (mut outbox, mut rx) = events(4096, 4096);
    let mut told = Vec::new();
    let causes = 2000;
    for i in 0..causes {
        outbox.resync(ResyncReason::Unreadable {
            origin: format!("o{i}"),
        });
        // The loop: what is due is released, and the caller reads everything.
        if outbox.next_release().is_some_and(|at| at <= Instant::now()) {
            outbox.release_held(Instant::now());
        }
        outbox.try_deliver();
        told.extend(drain(&mut rx));
        tokio::time::advance(Duration::from_millis(1)).await;
    }
    let at = outbox.next_release().expect("the last causes are held");
    assert!(at <= Instant::now() + RESYNC_INTERVAL);
    tokio::time::advance(RESYNC_INTERVAL).await;
    outbox.release_held(Instant::now());
    assert_eq!(outbox.next_release(), None);
    outbox.try_deliver();
    told.extend(drain(&mut rx));
    // 2 s of causes: one at once, then one per interval.
    assert!((4..=6).contains(&told.len()), "{told:?}");
    assert_eq!(
        told.last(),
        Some(&Event::Resync(ResyncReason::Unreadable {
            origin: format!("o{}", causes - 1)
        }))
    );
    let stats = outbox.counters.snapshot();
    assert_eq!(stats.resyncs, causes);
    assert_eq!(stats.resyncs_coalesced, causes - told.len() as u64);
}

#[tokio::test(start_paused = true)]
async fn per_mailbox_resyncs_stand_for_their_mailboxes_only() {
    let (mut outbox, mut rx) = events(16, 16);
    let a = ResyncReason::Unrepresentable { key: 1u64.into() };
    let b = ResyncReason::Unrepresentable { key: 2u64.into() };
    // A flood alternating between mailboxes: one of each at once, the rest held.
    for _ in 0..10 {
        outbox.resync(a.clone());
        outbox.resync(b.clone());
    }
    // Everything: a scope of its own, told at once; it covers the mailboxes, but those
    // held are told at the end of their interval all the same.
    outbox.resync(ResyncReason::Reconnected);
    outbox.try_deliver();
    assert_eq!(
        drain(&mut rx),
        [
            Event::Resync(a.clone()),
            Event::Resync(b.clone()),
            Event::Resync(ResyncReason::Reconnected),
        ]
    );
    tokio::time::advance(RESYNC_INTERVAL).await;
    outbox.release_held(Instant::now());
    outbox.try_deliver();
    let mut late = drain(&mut rx);
    late.sort_by_key(|e| format!("{e:?}"));
    assert_eq!(late, [Event::Resync(a), Event::Resync(b)]);
}

#[test]
fn a_fetch_keeps_its_place_and_holds_the_order_up() {
    let (mut outbox, mut rx) = events(8, 8);
    outbox.enqueue(update(1));
    outbox.hold_for_fetch();
    outbox.enqueue(update(4));
    outbox.hold_for_fetch();
    assert_eq!(outbox.try_deliver(), Some(1));
    assert!(!outbox.has_ready());
    outbox.fill_fetch(vec![update(2), update(3)]);
    assert_eq!(outbox.try_deliver(), Some(3));
    // The second fetch found nothing: its place goes.
    outbox.fill_fetch(Vec::new());
    assert_eq!(outbox.len(), 0);
    let keys: Vec<Event> = (1..=4).map(|k| Event::Update(update(k))).collect();
    assert_eq!(drain(&mut rx), keys);
}

#[test]
fn an_updates_sink_gets_no_events_and_a_gone_receiver_is_seen() {
    let (tx, mut rx) = mpsc::channel(8);
    let mut outbox = Outbox::new(Sink::Updates(tx), 8, Arc::default());
    outbox.emit(Event::Connected);
    outbox.resync(ResyncReason::Reconnected);
    assert!(!outbox.has_ready());
    outbox.enqueue(update(1));
    assert_eq!(outbox.try_deliver(), Some(1));
    assert_eq!(rx.try_recv().unwrap(), update(1));
    drop(rx);
    outbox.enqueue(update(2));
    assert_eq!(outbox.try_deliver(), None);
}
