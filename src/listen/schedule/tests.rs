//! The schedule's rules, without a server: a listener's sub-states on a configuration of
//! its own, a clock that only moves when told, and the slots described by `Busy`.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, oneshot};

use super::*;
use crate::config::Config;
use crate::envelope::{Marks, Packer};
use crate::layout::Layout;
use crate::listen::durable::Ask;
use crate::listen::event::Event;
use crate::listen::query::Asked;
use crate::listen::subscriptions::Command;
use crate::origin::Origin;
use crate::update::Update;

const SECOND: Duration = Duration::from_secs(1);
const IDLE: Busy = Busy {
    query: false,
    subscribing: false,
    heartbeat: false,
    sampling: false,
};

fn config() -> Config {
    Config::from_url("postgres://u@localhost/db")
        .unwrap()
        .with_listen(|l| l.with_health_interval(10 * SECOND))
}

struct Loop {
    schedule: Schedule,
    dispatch: Dispatch,
    watch: QueueWatch,
    _rx: mpsc::Receiver<Event>,
}

fn new_loop(config: &Config, now: Instant) -> Loop {
    let (dispatch, rx) = Dispatch::for_tests(config);
    let manager = deadpool_postgres::Manager::new(config.pg().clone(), tokio_postgres::NoTls);
    let pool = deadpool_postgres::Pool::builder(manager).build().unwrap();
    let watch = QueueWatch::new(
        pool,
        crate::pg::Canceller::new(config.server()).unwrap(),
        config.listen_options().health_interval(),
        0.5,
        Arc::default(),
        now,
    );
    Loop {
        schedule: Schedule::new(10 * SECOND, now),
        dispatch,
        watch,
        _rx: rx,
    }
}

impl Loop {
    fn plan(&mut self, busy: Busy, now: Instant) -> Turn {
        self.schedule
            .plan(&mut self.dispatch, &mut self.watch, busy, now)
    }
}

fn is_tail(turn: &Turn) -> bool {
    matches!(turn.query, Some(Start::Log(Ask::Tail { .. })))
}

#[tokio::test(start_paused = true)]
async fn the_query_slot_takes_the_logs_ask_then_a_keep_alive_when_one_is_due() {
    let now = Instant::now();
    let mut l = new_loop(&config().with_durable(true), now);
    // The server ends a session idle for 3 s: a statement at least every second.
    l.schedule.new_session(Some(3 * SECOND), now);
    assert!(is_tail(&l.plan(IDLE, now)), "the first read of the log");
    // One at a time: nothing while the query runs.
    let busy = Busy {
        query: true,
        ..IDLE
    };
    assert!(l.plan(busy, now).query.is_none());
    // Then pruning (due at the start), then nothing to ask.
    assert!(matches!(
        l.plan(IDLE, now).query,
        Some(Start::Log(Ask::Prune { .. }))
    ));
    assert!(l.plan(IDLE, now + SECOND / 2).query.is_none());
    // A third of the idle timeout after the last statement: a keep-alive.
    assert!(matches!(
        l.plan(IDLE, now + SECOND).query,
        Some(Start::KeepAlive)
    ));
    assert!(l.plan(IDLE, now + SECOND + SECOND / 2).query.is_none());
    // Without an idle timeout, none.
    l.schedule.new_session(None, now);
    assert!(l.plan(IDLE, now + 30 * SECOND).query.is_none());
}

#[tokio::test(start_paused = true)]
async fn a_polling_listener_reads_the_tail_every_interval_and_sends_no_heartbeat() {
    let now = Instant::now();
    let polling = config()
        .with_durable(true)
        .with_listen(|l| l.with_polling(SECOND));
    let mut l = new_loop(&polling, now);
    l.schedule = Schedule::new(10 * SECOND, now).polling(Some(SECOND));
    l.schedule.new_session(None, now);
    assert_eq!(l.schedule.tick_every(3600 * SECOND), SECOND / 4);
    assert!(is_tail(&l.plan(IDLE, now)), "the first read of the log");
    assert!(matches!(
        l.plan(IDLE, now).query,
        Some(Start::Log(Ask::Prune { .. }))
    ));
    for n in 1..=3 {
        let at = now + n * SECOND;
        assert!(
            l.plan(IDLE, at - SECOND / 10).query.is_none(),
            "not before the interval"
        );
        assert!(is_tail(&l.plan(IDLE, at)), "read {n}");
        assert!(l.plan(IDLE, at).query.is_none(), "once");
        // No heartbeat, ever: nothing would bring it back.
        assert_eq!(l.plan(IDLE, at).heartbeat, None);
    }
}

#[tokio::test(start_paused = true)]
async fn a_query_cancelled_past_its_deadline_shuts_the_slot_for_a_deadline() {
    let now = Instant::now();
    let mut l = new_loop(&config().with_durable(true), now);
    assert!(is_tail(&l.plan(IDLE, now)));
    let outcome = QueryOutcome::Cancelled(Asked::Tail);
    l.dispatch
        .on_query(QueryOutcome::Cancelled(Asked::Tail))
        .unwrap();
    l.schedule.query_done(&outcome, now);
    // The page is to be read again, but not before the slot opens again.
    assert!(l.plan(IDLE, now + 9 * SECOND).query.is_none());
    assert!(is_tail(&l.plan(IDLE, now + 10 * SECOND)));
    // An answered query leaves the slot open.
    let answered = QueryOutcome::KeptAlive(Ok(()));
    l.schedule.query_done(&answered, now + 10 * SECOND);
    assert!(matches!(
        l.plan(IDLE, now + 10 * SECOND).query,
        Some(Start::Log(Ask::Prune { .. }))
    ));
}

#[tokio::test(start_paused = true)]
async fn reading_waits_for_a_caller_behind_only_when_nothing_needs_the_connection() {
    let now = Instant::now();
    let config = config().with_listen(|l| l.with_max_buffered(2));
    let mut l = new_loop(&config, now);
    let packer = Packer::new(&Origin::parse("other").unwrap(), 7, None);
    for seq in 1..=2 {
        let json = Update::mailbox_destroyed(seq).to_json();
        let payload = packer
            .pack([json.as_str()], Marks::default(), || seq)
            .remove(0)
            .1;
        l.dispatch.incoming_for_tests(&payload);
    }
    // The caller took nothing: the bound is reached.
    let statement = Busy {
        query: true,
        ..IDLE
    };
    assert_eq!(l.plan(statement, now).held_until, None, "a query runs");
    let subscribing = Busy {
        subscribing: true,
        ..IDLE
    };
    assert_eq!(l.plan(subscribing, now).held_until, None, "a LISTEN runs");
    let held = l.plan(IDLE, now).held_until.expect("reading waits");
    // At most half the time a heartbeat has to come back (4 s).
    assert!(held <= now + 2 * SECOND, "{:?}", held - now);
}

#[tokio::test(start_paused = true)]
async fn a_late_heartbeat_puts_a_proof_in_the_query_slot_unless_a_query_runs() {
    let now = Instant::now();
    let mut l = new_loop(&config(), now);
    assert_eq!(l.plan(IDLE, now).heartbeat, None, "not yet due");
    let sent_at = now + 5 * SECOND;
    assert_eq!(l.plan(IDLE, sent_at).heartbeat, Some(1));
    // One slot: no second heartbeat while the first is being sent, or outstanding.
    let sending = Busy {
        heartbeat: true,
        ..IDLE
    };
    assert_eq!(l.plan(sending, sent_at + SECOND).heartbeat, None);
    assert_eq!(l.plan(IDLE, sent_at + SECOND).heartbeat, None);
    assert!(!matches!(
        l.plan(IDLE, sent_at + 2 * SECOND).query,
        Some(Start::Proof(_))
    ));
    // A query runs: cancelled once the heartbeat is 0.4 interval late, and its answer
    // to the cancel proves the connection.
    let busy = Busy {
        query: true,
        ..IDLE
    };
    assert!(l.plan(busy, sent_at + 3 * SECOND).query.is_none());
    let late = sent_at + 4 * SECOND + Duration::from_millis(1);
    assert_eq!(
        l.schedule.on_tick(&l.dispatch, true, sent_at + 4 * SECOND),
        Tick::Quiet
    );
    assert_eq!(l.schedule.on_tick(&l.dispatch, false, late), Tick::Quiet);
    assert_eq!(l.schedule.on_tick(&l.dispatch, true, late), Tick::Prove);
    // None runs: a proof, with 0.2 interval to answer, before anything else.
    assert!(matches!(
        l.plan(IDLE, late).query,
        Some(Start::Proof(within)) if within == 2 * SECOND
    ));
    // One at a time.
    assert!(l.plan(IDLE, late + SECOND).query.is_none());
    assert_eq!(
        l.schedule.on_tick(&l.dispatch, true, late + SECOND),
        Tick::Quiet
    );
    // It answered; the heartbeat, committed before it, is not here: once may be a fluke.
    l.dispatch.on_query(QueryOutcome::Proved(Ok(()))).unwrap();
    assert_eq!(l.dispatch.take_unheard(), None);
}

#[tokio::test(start_paused = true)]
async fn the_queue_is_sampled_once_per_interval_in_its_own_slot() {
    let now = Instant::now();
    let mut l = new_loop(&config(), now);
    let sampling = Busy {
        sampling: true,
        ..IDLE
    };
    assert!(!l.plan(sampling, now).sample, "its slot is taken");
    assert!(l.plan(IDLE, now).sample);
    assert!(!l.plan(IDLE, now + 9 * SECOND).sample);
    assert!(l.plan(IDLE, now + 10 * SECOND).sample);
}

#[tokio::test(start_paused = true)]
async fn subscription_statements_go_one_at_a_time_in_their_order() {
    let now = Instant::now();
    let config = config().with_layout(Layout::Maddy);
    let mut l = new_loop(&config, now);
    let mut replies = Vec::new();
    for key in [1u64, 2] {
        let (tx, rx) = oneshot::channel();
        l.dispatch.apply_command(Command::Subscribe(key.into(), tx));
        replies.push(rx);
    }
    assert_eq!(
        l.plan(IDLE, now).subscribe.as_deref(),
        Some("LISTEN \"__uint64_1\"")
    );
    let running = Busy {
        subscribing: true,
        ..IDLE
    };
    assert_eq!(l.plan(running, now).subscribe, None);
    l.dispatch.subscription_done();
    assert_eq!(
        l.plan(IDLE, now).subscribe.as_deref(),
        Some("LISTEN \"__uint64_2\"")
    );
    assert_eq!(replies[0].try_recv().unwrap().unwrap(), ());
}

#[tokio::test(start_paused = true)]
async fn a_resync_held_back_is_waited_for() {
    let now = Instant::now();
    let mut l = new_loop(&config(), now);
    assert_eq!(l.plan(IDLE, now).release_at, None);
    // Two references to a log that cannot be read, within the folding interval.
    let packer = Packer::new(&Origin::parse("other").unwrap(), 7, None);
    l.dispatch.reader_stop_fetching_for_tests();
    let durable = Marks {
        transactional: false,
        durable: true,
    };
    l.dispatch.incoming_for_tests(&packer.reference(1, durable));
    l.dispatch.incoming_for_tests(&packer.reference(2, durable));
    let at = l.plan(IDLE, now).release_at.expect("one is held");
    assert!(at > now && at <= now + SECOND);
    l.dispatch.release_held(at);
    assert_eq!(l.plan(IDLE, at).release_at, None);
    assert_eq!(l.dispatch.counters_for_tests().snapshot().resyncs, 2);
}

#[test]
fn the_clock_ticks_for_the_heartbeat_and_twice_per_keep_alive() {
    let now = Instant::now();
    let mut schedule = Schedule::new(10 * SECOND, now);
    assert_eq!(schedule.tick_every(SECOND), SECOND);
    schedule.new_session(Some(3 * SECOND), now);
    assert_eq!(schedule.tick_every(SECOND), SECOND / 2);
    // A tiny idle timeout: a statement every 100 ms at most.
    schedule.new_session(Some(Duration::from_millis(30)), now);
    assert_eq!(schedule.tick_every(SECOND), Duration::from_millis(50));
}
