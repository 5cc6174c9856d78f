use super::*;

fn at(max_id: i64) -> Cursor {
    Cursor {
        snapshot: format!("at-{max_id}"),
        max_id,
        ..Cursor::default()
    }
}

#[test]
fn an_incomplete_page_keeps_the_position_and_goes_on_past_its_last_row() {
    let (cursor, catch_up, entries) = Page::for_tests(90, false, &[11, 12, 15]).advance(&at(10));
    assert_eq!(
        cursor.snapshot, "at-10",
        "the position moves only once the target is read"
    );
    let catch_up = catch_up.expect("a catch-up under way");
    assert_eq!(catch_up.after_id, 15);
    assert_eq!(catch_up.target.snapshot, "target-90");
    assert_eq!(entries.len(), 3);
}

#[test]
fn the_last_page_moves_the_position_to_the_target_never_back() {
    let (cursor, catch_up, _) = Page::for_tests(90, true, &[88]).advance(&at(10));
    assert!(catch_up.is_none());
    assert_eq!((cursor.snapshot.as_str(), cursor.max_id), ("target-90", 90));
    // After pruning the target may see a lower highest id than the position had.
    let (cursor, _, _) = Page::for_tests(5, true, &[]).advance(&at(10));
    assert_eq!(cursor.max_id, 10);
}
