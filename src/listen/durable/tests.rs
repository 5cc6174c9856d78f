use super::*;

const SECOND: Duration = Duration::from_secs(1);
const BUDGET: PageBudget = PageBudget {
    rows: 8,
    bytes: 1 << 20,
};

fn origin() -> Origin {
    Origin::parse("a").unwrap()
}

fn durable(now: Instant) -> LogReader {
    LogReader::durable(Cursor::default(), 100 * SECOND, BUDGET, false, now)
}

#[test]
fn the_tail_first_and_only_with_room() {
    let now = Instant::now();
    let mut reader = durable(now);
    reader.queue_fetch(origin(), 7);
    assert!(matches!(
        reader.next_ask(false, now),
        Some(Ask::Fetch(_, 7))
    ));
    assert!(matches!(reader.next_ask(true, now), Some(Ask::Tail { .. })));
    // Asked once: the fetch next, until it is done.
    assert!(matches!(reader.next_ask(true, now), Some(Ask::Fetch(_, 7))));
    assert!(matches!(reader.fetched(), Some((_, 7))));
    assert!(
        matches!(reader.next_ask(true, now), Some(Ask::Prune { retention: r, .. }) if r == 100 * SECOND)
    );
    assert!(reader.next_ask(true, now).is_none());
    reader.read_soon();
    assert!(matches!(reader.next_ask(true, now), Some(Ask::Tail { .. })));
}

#[test]
fn a_reader_on_a_standby_never_prunes_and_does_again_on_a_primary() {
    let now = Instant::now();
    let mut reader = durable(now);
    reader.on_standby(true);
    assert!(matches!(reader.next_ask(true, now), Some(Ask::Tail { .. })));
    for later in [0, 10, 100, 1_000] {
        assert!(reader.next_ask(true, now + later * SECOND).is_none());
    }
    // Reconnected to a primary (the standby promoted, say).
    reader.reads_at(Place::default(), false);
    assert!(matches!(
        reader.next_ask(true, now + 1_000 * SECOND),
        Some(Ask::Prune { .. })
    ));
}

#[test]
fn pruning_every_tenth_of_the_retention_within_bounds() {
    let now = Instant::now();
    let mut reader = durable(now);
    reader.next_ask(true, now);
    assert!(matches!(
        reader.next_ask(true, now),
        Some(Ask::Prune { .. })
    ));
    assert!(reader.next_ask(true, now + 9 * SECOND).is_none());
    assert!(matches!(
        reader.next_ask(true, now + 10 * SECOND),
        Some(Ask::Prune { .. })
    ));
    let mut long = LogReader::durable(Cursor::default(), 86_400 * SECOND, BUDGET, false, now);
    long.next_ask(true, now);
    long.next_ask(true, now);
    assert!(long.next_ask(true, now + 59 * SECOND).is_none());
    assert!(matches!(
        long.next_ask(true, now + 60 * SECOND),
        Some(Ask::Prune { .. })
    ));
}

#[test]
fn best_effort_fetches_but_never_tails_nor_prunes() {
    let now = Instant::now();
    let mut reader = LogReader::best_effort();
    reader.read_soon();
    assert!(reader.next_ask(true, now).is_none());
    for seq in 0..MAX_PENDING_FETCHES as u64 {
        assert!(reader.can_fetch());
        reader.queue_fetch(origin(), seq);
    }
    assert!(!reader.can_fetch());
    assert!(matches!(reader.next_ask(true, now), Some(Ask::Fetch(_, 0))));
    // A reconnect in best effort always owes a resync.
    assert!(reader.on_reconnect());
    assert!(matches!(reader.next_ask(true, now), Some(Ask::Fetch(_, 0))));
}

#[test]
fn a_catch_up_reads_page_after_page_then_settles() {
    let now = Instant::now();
    let mut reader = durable(now);
    let Some(Ask::Tail {
        catch_up: None,
        budget,
        ..
    }) = reader.next_ask(true, now)
    else {
        panic!("a first page");
    };
    assert_eq!(budget, BUDGET);
    let entries = reader
        .advance(Page::for_tests(100, false, &[1, 2, 3]))
        .entries;
    assert_eq!(entries.len(), 3);
    // More to read: the next page at once, past the last row.
    let Some(Ask::Tail {
        catch_up: Some(_), ..
    }) = reader.next_ask(true, now)
    else {
        panic!("a next page");
    };
    // Not without room, though.
    reader.advance(Page::for_tests(100, false, &[4]));
    assert!(!matches!(
        reader.next_ask(false, now),
        Some(Ask::Tail { .. })
    ));
    assert!(matches!(
        reader.next_ask(true, now),
        Some(Ask::Tail {
            catch_up: Some(_),
            ..
        })
    ));
    reader.advance(Page::for_tests(100, true, &[5]));
    // Done: nothing until a wake-up.
    assert!(!matches!(
        reader.next_ask(true, now),
        Some(Ask::Tail { .. })
    ));
    reader.read_soon();
    assert!(matches!(
        reader.next_ask(true, now),
        Some(Ask::Tail { catch_up: None, .. })
    ));
}

#[test]
fn a_cancelled_page_is_read_again_smaller_after_a_pause() {
    let now = Instant::now();
    let mut reader = durable(now);
    reader.next_ask(true, now);
    reader.page_cancelled(now, SECOND);
    let Some(Ask::Tail {
        budget, not_before, ..
    }) = reader.next_ask(true, now)
    else {
        panic!("the page again, after a pause");
    };
    assert_eq!(not_before, Some(now + SECOND));
    assert_eq!(budget.rows, BUDGET.rows / 2);
    for _ in 0..10 {
        reader.page_cancelled(now, SECOND);
    }
    let Some(Ask::Tail { budget, .. }) = reader.next_ask(true, now + SECOND) else {
        panic!("the page again");
    };
    assert_eq!(budget.rows, 1, "one row at the least");
    // Pages that fit let the budget grow back, with no pause.
    reader.advance(Page::for_tests(1, true, &[1]));
    reader.read_soon();
    let Some(Ask::Tail {
        budget, not_before, ..
    }) = reader.next_ask(true, now + SECOND)
    else {
        panic!("a page");
    };
    assert_eq!((budget.rows, not_before), (2, None));
}

#[test]
fn no_pruning_during_a_catch_up_and_its_news_told_once() {
    let now = Instant::now();
    let mut reader = durable(now);
    reader.next_ask(true, now);
    reader.advance(Page::for_tests(10, false, &[1]));
    // The next page first; with no room, nothing, not even pruning.
    assert!(reader.next_ask(false, now).is_none());
    assert!(reader.prune_news(true));
    assert!(!reader.prune_news(true), "once per read");
    reader.next_ask(true, now);
    reader.advance(Page::for_tests(10, true, &[2]));
    assert!(matches!(
        reader.next_ask(true, now),
        Some(Ask::Prune { .. })
    ));
    assert!(reader.prune_news(true), "a new read may tell it again");
}

#[test]
fn a_resumed_read_goes_on_to_now_once_its_target_is_reached() {
    let now = Instant::now();
    let read = Arc::new(Read {
        from: Cursor::default(),
        target: Some(Cursor {
            max_id: 9,
            ..Cursor::default()
        }),
    });
    let position = Position::new(read, 7, 2, 41);
    let mut reader = LogReader::resume(&position, Place::default(), 100 * SECOND, BUDGET, now);
    let Some(Ask::Tail {
        catch_up: Some(catch_up),
        ..
    }) = reader.next_ask(true, now)
    else {
        panic!("the read under way first");
    };
    assert_eq!(catch_up.target().max_id, 9);
    // Inside entry 7: it is read again, its first two updates skipped.
    assert_eq!((reader.skip(7), reader.skip(8)), (2, 0));
    let advanced = reader.advance(Page::for_tests(9, true, &[7, 8]));
    assert!(advanced.replaying);
    reader.skipped();
    assert_eq!(reader.skip(7), 0);
    // The target reached: the log is read on at once, from it, still as a catch-up.
    let Some(Ask::Tail {
        catch_up: None,
        from,
        ..
    }) = reader.next_ask(true, now)
    else {
        panic!("a read on to now, without waiting for a wake-up");
    };
    assert_eq!(from.max_id, 9);
    assert!(reader.advance(Page::complete_for_tests()).replaying);
    assert!(!reader.advance(Page::complete_for_tests()).replaying);
    // Steps go on from the position's.
    let read = Arc::new(Read {
        from: Cursor::default(),
        target: None,
    });
    assert_eq!(reader.position(&read, 1, 0).unwrap().step(), 42);
}

#[test]
fn a_reconnect_in_durable_mode_catches_up() {
    let now = Instant::now();
    let mut reader = LogReader::durable(Cursor::default(), 100 * SECOND, BUDGET, true, now);
    assert!(matches!(reader.next_ask(true, now), Some(Ask::Tail { .. })));
    // A replay from the past is a catch-up; the next read is not.
    assert!(reader.advance(Page::complete_for_tests()).replaying);
    assert!(!reader.advance(Page::complete_for_tests()).replaying);
    // Only durable senders heard: the log has all, no resync owed.
    assert!(!reader.on_reconnect());
    assert!(matches!(reader.next_ask(true, now), Some(Ask::Tail { .. })));
    assert!(reader.advance(Page::complete_for_tests()).replaying);
    reader.heard_best_effort();
    assert!(reader.on_reconnect());
}

#[test]
fn no_log_to_read_stops_fetching_until_the_next_connection() {
    let now = Instant::now();
    let mut reader = LogReader::best_effort();
    reader.queue_fetch(origin(), 1);
    reader.queue_fetch(origin(), 2);
    let dropped = reader.stop_fetching();
    assert_eq!(dropped.len(), 2);
    assert!(reader.is_unreadable());
    assert!(reader.next_ask(true, now).is_none());
    reader.on_reconnect();
    assert!(!reader.is_unreadable());
}
