use super::*;

const SECOND: Duration = Duration::from_secs(1);

#[test]
fn every_half_interval_one_at_a_time() {
    let start = Instant::now();
    let mut clock = Clock::new(10 * SECOND, start);
    assert_eq!(clock.due(start), None);
    assert_eq!(clock.due(start + 5 * SECOND), Some(1));
    // Outstanding: no other goes out, however late.
    assert_eq!(clock.due(start + 20 * SECOND), None);
    clock.heard(7);
    assert_eq!(clock.due(start + 20 * SECOND), None);
    clock.heard(1);
    assert_eq!(clock.due(start + 9 * SECOND), None);
    assert_eq!(clock.due(start + 10 * SECOND), Some(2));
}

#[test]
fn late_two_tenths_after_its_commit_asks_for_a_proof() {
    let start = Instant::now();
    let mut clock = Clock::new(10 * SECOND, start);
    assert_eq!(clock.tick_every(), SECOND);
    assert_eq!(clock.timeout(), 4 * SECOND);
    assert_eq!(clock.proof_after(), 2 * SECOND);
    clock.due(start + 5 * SECOND).unwrap();
    // Committed 3 s later (a slow checkout): its time counts from there.
    clock.committed(1, start + 8 * SECOND);
    assert!(!clock.wants_proof(start + 10 * SECOND));
    assert!(clock.wants_proof(start + 10 * SECOND + Duration::from_millis(1)));
    // A query running meanwhile is cancelled only after 0.4 interval.
    assert!(!clock.is_late(start + 12 * SECOND));
    assert!(clock.is_late(start + 12 * SECOND + Duration::from_millis(1)));
    clock.heard(1);
    assert!(!clock.wants_proof(start + 60 * SECOND));
    assert!(!clock.is_late(start + 60 * SECOND));
}

#[test]
fn a_slow_send_is_no_verdict_when_the_connection_answers() {
    let start = Instant::now();
    let mut clock = Clock::new(10 * SECOND, start);
    clock.due(start + 5 * SECOND).unwrap();
    // Still being sent after 2 s: prove the connection.
    let late = start + 7 * SECOND + Duration::from_millis(1);
    assert!(clock.wants_proof(late));
    clock.proof_started();
    assert!(!clock.wants_proof(late + SECOND), "one proof at a time");
    assert_eq!(clock.proved(late + SECOND), Proved::Fine);
    // Another 2 s for the send, then another proof.
    assert!(!clock.wants_proof(late + 3 * SECOND));
    assert!(clock.wants_proof(late + 3 * SECOND + Duration::from_millis(1)));
    // It went out at last, and came back: nothing counted against the connection.
    clock.committed(1, late + 3 * SECOND);
    clock.heard(1);
    assert_eq!(clock.unheard, 0);
}

#[test]
fn heartbeats_unheard_while_the_connection_answers_twice_in_a_row_end_it() {
    let start = Instant::now();
    let mut clock = Clock::new(SECOND, start);
    let half = SECOND / 2;
    let timeout = clock.proof_after();
    let due = start + half;
    assert_eq!(clock.due(due), Some(1));
    clock.committed(1, due);
    let late = due + timeout + Duration::from_millis(1);
    assert!(clock.wants_proof(late));
    clock.proof_started();
    assert_eq!(clock.proved(late), Proved::Fine, "one may be a fluke");
    // The next goes out at once.
    assert_eq!(clock.due(late), Some(2));
    clock.committed(2, late);
    let later = late + timeout + Duration::from_millis(1);
    assert!(clock.wants_proof(later));
    clock.proof_started();
    let Proved::Unheard(why) = clock.proved(later) else {
        panic!("two in a row")
    };
    assert_eq!(
        why,
        "2 heartbeats in a row, committed on the server, never came back while the \
         connection answered statements sent after them"
    );
    // Within two health intervals of the start, at this pace.
    assert!(later - start < 2 * SECOND, "{:?}", later - start);
}

#[test]
fn a_heartbeat_heard_between_resets_the_count() {
    let start = Instant::now();
    let mut clock = Clock::new(SECOND, start);
    let mut now = start + SECOND / 2;
    for seq in 1..=4 {
        assert_eq!(clock.due(now), Some(seq));
        clock.committed(seq, now);
        if seq % 2 == 0 {
            clock.heard(seq);
            now += SECOND / 2;
            continue;
        }
        now += SECOND;
        assert!(clock.wants_proof(now));
        clock.proof_started();
        assert_eq!(clock.proved(now), Proved::Fine, "heartbeat {seq}");
    }
}

#[test]
fn a_proof_that_does_not_answer_says_the_connection_is_dead() {
    let start = Instant::now();
    let mut clock = Clock::new(10 * SECOND, start);
    clock.due(start + 5 * SECOND).unwrap();
    clock.committed(1, start + 5 * SECOND);
    clock.proof_started();
    assert_eq!(
        clock.unproved(4 * SECOND),
        "heartbeat 1 did not come back, and the connection did not answer a statement \
         within 4s: the connection is dead"
    );
    // Not sent: the statement alone speaks.
    let mut clock = Clock::new(10 * SECOND, start);
    clock.send_failed(start);
    assert!(clock.wants_proof(start));
    clock.proof_started();
    assert_eq!(
        clock.unproved(4 * SECOND),
        "the connection did not answer a statement within 4s: the connection is dead"
    );
}

#[test]
fn a_query_that_ran_long_gives_the_heartbeat_its_time_again() {
    let start = Instant::now();
    let mut clock = Clock::new(10 * SECOND, start);
    clock.due(start + 5 * SECOND).unwrap();
    clock.committed(1, start + 5 * SECOND);
    clock.busy_until(start + 20 * SECOND);
    assert!(!clock.wants_proof(start + 22 * SECOND));
    assert!(clock.wants_proof(start + 23 * SECOND));
    // Nothing outstanding: nothing to move.
    clock.heard(1);
    clock.busy_until(start + 30 * SECOND);
    assert!(!clock.wants_proof(start + 90 * SECOND));
}

#[test]
fn a_zero_interval_sends_none_and_ticks_hourly() {
    let start = Instant::now();
    let mut clock = Clock::new(Duration::ZERO, start);
    assert_eq!(clock.due(start + 3600 * SECOND), None);
    assert_eq!(clock.tick_every(), 3600 * SECOND);
    assert_eq!(
        Clock::new(Duration::from_millis(50), start).tick_every(),
        10 * Duration::from_millis(1)
    );
}

#[test]
fn a_failed_send_retries_soon_proves_the_connection_and_a_reconnect_starts_over() {
    let start = Instant::now();
    let mut clock = Clock::new(10 * SECOND, start);
    clock.due(start + 5 * SECOND).unwrap();
    clock.send_failed(start + 5 * SECOND);
    assert!(clock.wants_proof(start + 5 * SECOND));
    clock.proof_started();
    assert_eq!(clock.proved(start + 5 * SECOND), Proved::Fine);
    assert!(!clock.wants_proof(start + 60 * SECOND));
    assert_eq!(clock.due(start + 5 * SECOND + SECOND / 2), None);
    assert_eq!(clock.due(start + 6 * SECOND), Some(2));
    // Failed again soon after a proof: none more until a timeout has passed.
    clock.send_failed(start + 6 * SECOND);
    assert!(!clock.wants_proof(start + 6 * SECOND));
    clock.on_reconnect(start + 7 * SECOND);
    assert!(!clock.wants_proof(start + 60 * SECOND));
    assert_eq!(clock.due(start + 11 * SECOND), None);
    assert_eq!(clock.due(start + 12 * SECOND), Some(3));
}
