//! What arrives, and what the caller then hears, in order: without a server.

use tokio::sync::mpsc;

use super::*;
use crate::config::Config;
use crate::envelope::{Marks, Packer};
use crate::listen::durable::MAX_PENDING_FETCHES;
use crate::listen::intake::Incoming;
use crate::listen::query::{Asked, QueryOutcome};
use crate::log::{Entry, Page};
use crate::update::Update;

const CHANNEL: &str = "updatepipe";

fn config() -> Config {
    Config::from_url("postgres://u@localhost/db").unwrap()
}

fn dispatch(config: &Config) -> (Dispatch, mpsc::Receiver<Event>) {
    assert_eq!(config.channel().as_str(), CHANNEL);
    Dispatch::for_tests(config)
}

/// What the caller hears once the resyncs held back (folded: see `Outbox::resync`) are
/// due, in a test whose clock is paused.
async fn heard_later(dispatch: &mut Dispatch, rx: &mut mpsc::Receiver<Event>) -> Vec<Event> {
    tokio::time::advance(crate::listen::outbox::RESYNC_INTERVAL).await;
    dispatch.outbox.release_held(Instant::now());
    heard(dispatch, rx)
}

/// What the caller hears now.
fn heard(dispatch: &mut Dispatch, rx: &mut mpsc::Receiver<Event>) -> Vec<Event> {
    if let Some(sent) = dispatch.outbox.try_deliver() {
        dispatch.outbox.delivered(sent);
        dispatch.outbox.try_deliver();
    }
    std::iter::from_fn(|| rx.try_recv().ok()).collect()
}

fn update(key: u64) -> Event {
    Event::Update(Update::mailbox_destroyed(key))
}

fn envelope(sender: &str, seq: u64, marks: Marks) -> String {
    let json = Update::mailbox_destroyed(seq).to_json();
    let packer = Packer::new(&Origin::parse(sender).unwrap(), 7, None);
    packer.pack([json.as_str()], marks, || seq).remove(0).1
}

const DURABLE: Marks = Marks {
    transactional: false,
    durable: true,
};

fn on(payload: &str) -> Incoming<'_> {
    Incoming {
        channel: CHANNEL,
        payload,
        sender_pid: 1,
    }
}

#[test]
fn a_reconnect_in_best_effort_says_connected_then_resync() {
    let (mut d, mut rx) = dispatch(&config());
    d.on_incoming(on(&envelope("other", 1, Marks::default())));
    d.on_reconnect(None, Instant::now());
    let resync = Event::Resync(ResyncReason::Reconnected);
    assert_eq!(
        heard(&mut d, &mut rx),
        [update(1), Event::Connected, resync]
    );
    // The numbers were forgotten: no gap across the reconnect.
    d.on_incoming(on(&envelope("other", 5, Marks::default())));
    assert_eq!(heard(&mut d, &mut rx), [update(5)]);
}

#[test]
fn a_durable_reconnect_reads_the_log_and_owes_a_resync_for_best_effort_senders() {
    let (mut d, mut rx) = dispatch(&config().with_durable(true));
    assert!(matches!(d.next_ask(Instant::now()), Some(Ask::Tail { .. })));
    d.on_reconnect(None, Instant::now());
    assert_eq!(heard(&mut d, &mut rx), [Event::Connected]);
    assert!(matches!(d.next_ask(Instant::now()), Some(Ask::Tail { .. })));
    // A durable envelope is read from the log, not from the notification.
    d.on_incoming(on(&envelope("other", 1, DURABLE)));
    assert_eq!(heard(&mut d, &mut rx), []);
    assert!(matches!(d.next_ask(Instant::now()), Some(Ask::Tail { .. })));
    d.on_incoming(on(&envelope("pool", 1, Marks::default())));
    d.on_reconnect(None, Instant::now());
    let resync = Event::Resync(ResyncReason::Reconnected);
    assert_eq!(
        heard(&mut d, &mut rx),
        [update(1), Event::Connected, resync]
    );
}

fn entry(origin: &str, seq: i64, payload: String) -> Entry {
    Entry {
        id: seq,
        origin: origin.into(),
        seq,
        payload,
        written_at: now_secs(),
    }
}

#[tokio::test(start_paused = true)]
async fn a_tail_delivers_others_rows_in_order_and_counts_a_catch_up() {
    let (mut d, mut rx) = dispatch(&config().with_durable(true));
    d.on_reconnect(None, Instant::now());
    let Some(Ask::Tail { .. }) = d.next_ask(Instant::now()) else {
        panic!("a tail first");
    };
    let tail = Page::with_entries_for_tests(
        true,
        vec![
            entry("me", 1, envelope("me", 1, DURABLE)),
            entry("other", 2, envelope("other", 2, DURABLE)),
            entry("other", 3, "{".into()),
            entry("other", 4, envelope("other", 4, DURABLE)),
        ],
    );
    d.on_query(QueryOutcome::Tail(Ok(Some(tail)))).unwrap();
    let unreadable = ResyncReason::Unreadable {
        origin: "other".into(),
    };
    // The unreadable row's resync comes within the interval of the first: held for its
    // end (both say "reload everything").
    // Each update is followed by the position just after it, in one stream of steps (the
    // first, 0, was where reading started; the last of a read that is done is the new
    // cursor itself, after no entry).
    assert_eq!(
        without_positions(heard(&mut d, &mut rx), &[(1, 2), (2, 0)]),
        [
            Event::Connected,
            Event::Resync(ResyncReason::LogPruned),
            update(2),
            update(4),
        ]
    );
    assert_eq!(
        heard_later(&mut d, &mut rx).await,
        [Event::Resync(unreadable)]
    );
    let stats = d.counters.snapshot();
    assert_eq!((stats.replayed, stats.rejected_total()), (2, 1));
    // The next tail is no catch-up.
    d.on_incoming(on(&envelope("other", 5, DURABLE)));
    let Some(Ask::Tail { .. }) = d.next_ask(Instant::now()) else {
        panic!("a tail");
    };
    let tail = Page::with_entries_for_tests(
        false,
        vec![entry("other", 5, envelope("other", 5, DURABLE))],
    );
    d.on_query(QueryOutcome::Tail(Ok(Some(tail)))).unwrap();
    assert_eq!(
        without_positions(heard(&mut d, &mut rx), &[(3, 0)]),
        [update(5)]
    );
    assert_eq!(d.counters.snapshot().replayed, 2);
}

/// The events without their positions, which must come each right after an update (or
/// at the end) with these steps and log entries.
fn without_positions(events: Vec<Event>, expected: &[(u64, i64)]) -> Vec<Event> {
    let mut positions = Vec::new();
    let mut rest = Vec::new();
    for event in events {
        match event {
            Event::Position(p) => {
                assert!(
                    matches!(rest.last(), Some(Event::Update(_))),
                    "a position after an update: {rest:?}"
                );
                positions.push((p.step(), p.after_id()));
            }
            other => rest.push(other),
        }
    }
    assert_eq!(positions, expected);
    rest
}

#[test]
fn an_oversize_envelope_waits_in_its_place_for_its_fetch() {
    let (mut d, mut rx) = dispatch(&config());
    let other = Origin::parse("other").unwrap();
    let packer = Packer::new(&other, 7, None);
    d.on_incoming(on(&packer.reference(1, DURABLE)));
    d.on_incoming(on(&envelope("other", 2, Marks::default())));
    d.on_incoming(on(&packer.reference(3, DURABLE)));
    assert_eq!(heard(&mut d, &mut rx), []);
    assert!(matches!(d.next_ask(Instant::now()), Some(Ask::Fetch(o, 1)) if o == other));
    let fetched = envelope("other", 1, DURABLE);
    d.on_query(QueryOutcome::Fetch(Ok(Some((fetched, now_secs())))))
        .unwrap();
    assert_eq!(heard(&mut d, &mut rx), [update(1), update(2)]);
    // Gone from the log: its place goes, and the caller is told.
    assert!(matches!(d.next_ask(Instant::now()), Some(Ask::Fetch(_, 3))));
    d.on_query(QueryOutcome::Fetch(Ok(None))).unwrap();
    let unreadable = ResyncReason::Unreadable {
        origin: "other".into(),
    };
    assert_eq!(heard(&mut d, &mut rx), [Event::Resync(unreadable)]);
    assert!(d.next_ask(Instant::now()).is_none());
}

#[test]
fn without_a_log_a_reference_is_a_resync_and_no_fetch() {
    let (mut d, mut rx) = dispatch(&config());
    let packer = Packer::new(&Origin::parse("other").unwrap(), 7, None);
    d.on_incoming(on(&packer.reference(1, DURABLE)));
    // The fetch found no log (the dispatcher's answer to such an error).
    assert!(matches!(d.next_ask(Instant::now()), Some(Ask::Fetch(_, 1))));
    assert_eq!(d.reader.stop_fetching().len(), 1);
    d.outbox.fill_fetch(Vec::new());
    for seq in 2..100 {
        d.on_incoming(on(&packer.reference(seq, DURABLE)));
    }
    assert!(
        d.next_ask(Instant::now()).is_none(),
        "fetched without a log"
    );
    let unreadable = ResyncReason::Unreadable {
        origin: "other".into(),
    };
    // One resync queued (a resync right behind another is not queued again), all counted.
    assert_eq!(heard(&mut d, &mut rx), [Event::Resync(unreadable)]);
    assert_eq!(d.counters.snapshot().resyncs, 98);
}

#[tokio::test(start_paused = true)]
async fn past_the_pending_fetches_a_reference_is_let_go() {
    let (mut d, mut rx) = dispatch(&config());
    let packer = Packer::new(&Origin::parse("other").unwrap(), 7, None);
    for seq in 1..=MAX_PENDING_FETCHES as u64 + 1 {
        d.on_incoming(on(&packer.reference(seq, DURABLE)));
    }
    assert_eq!(d.counters.snapshot().dropped_slow_consumer, 1);
    for _ in 0..MAX_PENDING_FETCHES {
        d.on_query(QueryOutcome::Fetch(Ok(None))).unwrap();
    }
    let events = heard(&mut d, &mut rx);
    // One resync stands for the fetches that found nothing; then, at the end of its
    // interval, the one let go is told.
    assert_eq!(events.len(), 1, "{events:?}");
    assert_eq!(
        heard_later(&mut d, &mut rx).await,
        [Event::Resync(ResyncReason::SlowConsumer { dropped: 1 })]
    );
}

#[test]
fn only_this_listeners_heartbeat_of_that_number_comes_back() {
    let (mut d, mut rx) = dispatch(&config());
    let later = Instant::now() + crate::DEFAULT_HEALTH_INTERVAL;
    assert_eq!(d.heartbeat.clock.due(later), Some(1));
    let dead = later + crate::DEFAULT_HEALTH_INTERVAL;
    let others = Packer::new(&Origin::parse("other").unwrap(), 7, None).heartbeat(1);
    d.on_incoming(on(&others));
    d.on_incoming(on(
        &Packer::new(&Origin::parse("me").unwrap(), 1, None).heartbeat(2)
    ));
    assert!(d.heartbeat.clock.is_late(dead));
    d.on_incoming(on(
        &Packer::new(&Origin::parse("me").unwrap(), 1, None).heartbeat(1)
    ));
    assert!(!d.heartbeat.clock.is_late(dead));
    // Neither is an update, nor an echo.
    assert_eq!(heard(&mut d, &mut rx), []);
    assert_eq!(d.counters.snapshot().echoes_dropped, 0);
}

#[test]
fn rejected_and_echoed_payloads_are_counted_not_delivered() {
    let (mut d, mut rx) = dispatch(&config());
    d.on_incoming(on("garbage"));
    d.on_incoming(on(&envelope("me", 1, Marks::default())));
    d.on_incoming(on(
        &Packer::new(&Origin::parse("x").unwrap(), 7, None).reference(1, Marks::default())
    ));
    assert_eq!(heard(&mut d, &mut rx), []);
    let stats = d.counters.snapshot();
    assert_eq!((stats.rejected_total(), stats.echoes_dropped), (2, 1));
}

#[test]
fn a_query_that_does_not_answer_ends_the_session() {
    let (mut d, _rx) = dispatch(&config().with_durable(true));
    let reason = d
        .on_query(QueryOutcome::TimedOut(std::time::Duration::from_secs(60)))
        .unwrap_err();
    assert_eq!(
        reason,
        "a query did not answer within 60s, nor its cancel: the connection is dead"
    );
    // Cancelled, and the cancel answered: the connection is fine.
    assert_eq!(d.on_query(QueryOutcome::Cancelled(Asked::Fetch)), Ok(()));
    assert_eq!(d.on_query(QueryOutcome::Cancelled(Asked::Prune)), Ok(()));
}

#[test]
fn a_tail_page_cancelled_past_its_deadline_is_read_again_smaller_after_a_pause() {
    let (mut d, _rx) = dispatch(&config().with_durable(true));
    let Some(Ask::Tail { budget, .. }) = d.next_ask(Instant::now()) else {
        panic!("a durable listener reads the tail first");
    };
    assert!(
        d.next_ask(Instant::now())
            .is_none_or(|ask| !matches!(ask, Ask::Tail { .. }))
    );
    // Cancelled by the listener (its deadline, or a late heartbeat), not by the server:
    // the page is asked again all the same, as when the server cancels it.
    let before = Instant::now();
    assert_eq!(d.on_query(QueryOutcome::Cancelled(Asked::Tail)), Ok(()));
    let Some(Ask::Tail {
        budget: smaller,
        not_before: Some(at),
        ..
    }) = d.next_ask(Instant::now())
    else {
        panic!("a cancelled page is asked again, after a pause");
    };
    assert_eq!(smaller.rows, (budget.rows / 2).max(1));
    assert!(at >= before + d.page_pause);
    // The server's statement_timeout is counted as a cancelled page; this one is not.
    assert_eq!(d.counters.snapshot().log_pages_cancelled, 0);
}

/// The wall clock now, as the server's row times are given.
fn now_secs() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64()
}

#[tokio::test(start_paused = true)]
async fn heartbeats_unheard_by_a_connection_that_answers_stop_the_listener() {
    let (mut d, _rx) =
        dispatch(&config().with_listen(|l| l.with_health_interval(Duration::from_secs(1))));
    let step = Duration::from_millis(201);
    tokio::time::advance(Duration::from_millis(500)).await;
    for seq in 1..=2 {
        assert_eq!(d.heartbeat_due(Instant::now()), Some(seq));
        d.on_heartbeat_sent(Sent::Sent(seq, Ok(1)));
        tokio::time::advance(step).await;
        assert!(d.wants_proof(Instant::now()), "heartbeat {seq}");
        assert_eq!(d.proof_started(), Duration::from_millis(200));
        let answered = d.on_query(QueryOutcome::Proved(Ok(())));
        if seq == 1 {
            assert_eq!(answered, Ok(()));
            assert_eq!(d.take_unheard(), None);
        } else {
            let why = answered.unwrap_err();
            assert_eq!(d.take_unheard(), Some(why));
        }
    }
}

#[tokio::test(start_paused = true)]
async fn a_proof_that_does_not_answer_ends_the_session_and_says_why() {
    let (mut d, _rx) =
        dispatch(&config().with_listen(|l| l.with_health_interval(Duration::from_secs(1))));
    tokio::time::advance(Duration::from_millis(500)).await;
    assert_eq!(d.heartbeat_due(Instant::now()), Some(1));
    // No pooled connection to send it: the connection is proved by a statement.
    d.on_heartbeat_sent(Sent::Unsent("no connection".into()));
    assert!(d.wants_proof(Instant::now()));
    let within = d.proof_started();
    let reason = d.on_query(QueryOutcome::Unproved(within)).unwrap_err();
    assert_eq!(
        reason,
        "the connection did not answer a statement within 200ms: the connection is dead"
    );
    // Dead, not deaf: the listener reconnects.
    assert_eq!(d.take_unheard(), None);
}
