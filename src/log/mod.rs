//! The durable log, `updatepipe.log`: the statements that write it (with the notifications,
//! in one transaction), read it in commit order, fetch one envelope and prune it, and a
//! listener's position in it. `docs/delivery.md` argues why the reading is exactly once.
//!
//! Only this module binds the reading statements' parameters and reads their columns: the
//! listener calls [`read_cursor`], [`read_page`], [`fetch`] and [`prune`]. Reads come in
//! pages within a [`PageBudget`], so a listener back from a long absence holds one page at a
//! time, whatever the backlog.

use std::time::{Duration, UNIX_EPOCH};

use tokio_postgres::types::{PgLsn, Type};
use tokio_postgres::{Client, Row};

use crate::config::Since;
use crate::origin::Origin;

mod consumers;
mod history;
mod position;

pub use consumers::{ConsumerStatus, MAX_CONSUMER_NAME_LEN};
pub(crate) use consumers::{LockHolder, Store, claim as claim_consumer};
pub(crate) use consumers::{check_name as check_consumer_name, list as list_consumers};
pub(crate) use consumers::{
    lock as lock_consumer, store as store_consumer, stored as stored_consumer,
};

pub use history::HistoryChange;
pub(crate) use history::{Place, channel_hash, check, server_now};
pub(crate) use position::Read;
pub use position::{MAX_POSITION_LEN, Position};

/// A durable batch: the envelopes go to the log and their notifications out, in one
/// statement (a data-modifying CTE always runs to completion), so one transaction.
///
/// The transaction takes its id (`me`, evaluated before the first row is built) before its
/// rows take theirs from the log's sequence, which does not assign one: the reader relies on
/// it (a row whose id is at most the highest a snapshot saw belongs to a transaction that
/// had its id by then, so in progress or visible in that snapshot; see `PAGE_SQL`).
pub(crate) const LOG_AND_NOTIFY: &str = "\
    WITH me AS MATERIALIZED (SELECT pg_catalog.pg_current_xact_id()), \
    logged AS (\
        INSERT INTO updatepipe.log (channel, origin, seq, payload) \
        SELECT $1, $2, t.s, t.p \
        FROM me, ROWS FROM (pg_catalog.unnest($3::pg_catalog.int8[]), \
                            pg_catalog.unnest($4::pg_catalog.text[])) \
             WITH ORDINALITY AS t(s, p, i) \
        ORDER BY t.i) \
    SELECT pg_catalog.pg_notify($1, t.n) \
    FROM pg_catalog.unnest($5::pg_catalog.text[]) WITH ORDINALITY AS t(n, i) ORDER BY t.i";

/// [`LOG_AND_NOTIFY`] in the maddy layout: the same log rows, and each notification on the
/// channel `$6` names (a maddy copy), or on `$1` where `$6` has none (an envelope). Made
/// from `LOG_AND_NOTIFY` by replacing its last `SELECT`, so that the two write the log alike.
pub(crate) static LOG_AND_NOTIFY_MAPPED: std::sync::LazyLock<String> =
    std::sync::LazyLock::new(|| {
        let tail = "SELECT pg_catalog.pg_notify($1, t.n) \
            FROM pg_catalog.unnest($5::pg_catalog.text[]) WITH ORDINALITY AS t(n, i) ORDER BY t.i";
        let head = LOG_AND_NOTIFY
            .strip_suffix(tail)
            .expect("LOG_AND_NOTIFY ends in its notifying SELECT");
        format!(
            "{head}SELECT pg_catalog.pg_notify(coalesce(t.c, $1), t.n) \
             FROM ROWS FROM (pg_catalog.unnest($5::pg_catalog.text[]), \
                             pg_catalog.unnest($6::pg_catalog.text[])) \
                  WITH ORDINALITY AS t(n, c, i) ORDER BY t.i"
        )
    });

/// One page of what the log gained since the cursor `($2, $3, $4)`: the previous read's
/// snapshot, highest visible id and server time. A catch-up reads towards a *target*
/// snapshot, taken by its first page (`$5` is null then; later pages pass it back with its
/// time `$6` and highest id `$7`), past the last id it delivered (`$8`), at most `$9` rows
/// and `$10` bytes of payload (the first row whatever its size).
///
/// What is new since the cursor: rows of the transactions in progress at its snapshot,
/// and rows with a higher id than any seen then (an id-ordered scan; after a crash the
/// server may hand out a transaction id again, never an id). A row with an id up to the
/// cursor's highest belongs to a transaction that had its id by then (writers take the
/// transaction id before the row id: see `LOG_AND_NOTIFY`), so visible then or in
/// progress. A transaction in progress is either in the snapshot's `xip` list (a handful,
/// each looked up by the `(channel, xid)` index, at most a page each, however far back an
/// unrelated long transaction holds the snapshot's `xmin`), or at or above its `xmax`,
/// which is one past the newest *completed* transaction, not the next to start: one that
/// took its id after a transaction that has completed, and its row id before that one's,
/// is in no list. Those lie between `xmax` and the cursor's `xid_bound` (`$11`, the next
/// transaction id as the server gave it just after the snapshot; null: no bound), a range
/// of the `(channel, xid)` index as short as the transactions that were running then,
/// looked up only while the read is below the cursor's highest id. Of those, only rows
/// committed by the target snapshot, so that when the last page is read, the target is a
/// position at which everything visible was delivered. In id order, which is commit order
/// for each sender's successive transactions.
///
/// Returns the target, whether pruning may have taken entries the cursor had not seen, how
/// many rows the page held before the byte budget (so whether more may follow), the rows
/// (each with when it was written), the server's write-ahead log position (a first page's
/// target is read at it: every commit its snapshot sees lies before it), and the first
/// page's target's `xid_bound` ([`XID_BOUND`]); always at least the target row.
static PAGE_SQL: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
    format!(
        "\
    WITH t AS ( \
        SELECT coalesce($5::pg_catalog.text::pg_catalog.pg_snapshot, \
                        pg_catalog.pg_current_snapshot()) AS snap, \
               coalesce($6::pg_catalog.float8, \
                        pg_catalog.date_part('epoch', pg_catalog.now())) AS at, \
               CASE WHEN $5::pg_catalog.text IS NULL \
                    THEN (SELECT pg_catalog.max(m.id) FROM updatepipe.log m \
                          WHERE m.channel OPERATOR(pg_catalog.=) $1) \
                    ELSE $7::pg_catalog.int8 END AS max_id), \
    page AS ( \
        SELECT u.id, u.origin, u.seq, u.payload, u.written FROM ( \
            (SELECT l.id, l.origin, l.seq, l.payload, l.written \
             FROM t, pg_catalog.pg_snapshot_xip($2::pg_catalog.text::pg_catalog.pg_snapshot) AS x(xid) \
             CROSS JOIN LATERAL ( \
                 SELECT l.id, l.origin, l.seq, l.payload, \
                        pg_catalog.date_part('epoch', l.created_at) AS written \
                 FROM updatepipe.log l \
                 WHERE l.channel OPERATOR(pg_catalog.=) $1 \
                   AND l.xid OPERATOR(pg_catalog.=) x.xid \
                   AND l.id OPERATOR(pg_catalog.<=) $3 AND l.id OPERATOR(pg_catalog.>) $8 \
                   AND pg_catalog.pg_visible_in_snapshot(l.xid, t.snap) \
                 ORDER BY l.id LIMIT $9) l) \
            UNION ALL \
            (SELECT l.id, l.origin, l.seq, l.payload, \
                    pg_catalog.date_part('epoch', l.created_at) AS written \
             FROM updatepipe.log l, t \
             WHERE $8 OPERATOR(pg_catalog.<) $3 \
               AND l.channel OPERATOR(pg_catalog.=) $1 \
               AND l.xid OPERATOR(pg_catalog.>=) \
                   pg_catalog.pg_snapshot_xmax($2::pg_catalog.text::pg_catalog.pg_snapshot) \
               AND l.xid OPERATOR(pg_catalog.<) \
                   coalesce($11::pg_catalog.int8::pg_catalog.text::pg_catalog.xid8, \
                            '18446744073709551615'::pg_catalog.xid8) \
               AND l.id OPERATOR(pg_catalog.<=) $3 AND l.id OPERATOR(pg_catalog.>) $8 \
               AND pg_catalog.pg_visible_in_snapshot(l.xid, t.snap) \
             ORDER BY l.id LIMIT $9) \
            UNION ALL \
            (SELECT l.id, l.origin, l.seq, l.payload, \
                    pg_catalog.date_part('epoch', l.created_at) AS written \
             FROM updatepipe.log l, t \
             WHERE l.channel OPERATOR(pg_catalog.=) $1 \
               AND l.id OPERATOR(pg_catalog.>) greatest($3, $8) \
               AND pg_catalog.pg_visible_in_snapshot(l.xid, t.snap) \
             ORDER BY l.id LIMIT $9) \
        ) u ORDER BY u.id LIMIT $9), \
    sized AS ( \
        SELECT page.*, \
               pg_catalog.sum(pg_catalog.octet_length(page.payload)) \
                   OVER (ORDER BY page.id) AS running, \
               pg_catalog.row_number() OVER (ORDER BY page.id) AS n, \
               pg_catalog.count(*) OVER () AS total \
        FROM page) \
    SELECT t.snap::pg_catalog.text, t.at, \
           (SELECT p.pruned_before OPERATOR(pg_catalog.>) pg_catalog.to_timestamp($4) \
                   OR p.pruned_xid OPERATOR(pg_catalog.>=) \
                      pg_catalog.pg_snapshot_xmin($2::pg_catalog.text::pg_catalog.pg_snapshot) \
            FROM updatepipe.pruned p WHERE p.channel OPERATOR(pg_catalog.=) $1), \
           t.max_id, s.total, s.id, s.origin, s.seq, s.payload, \
           ({WAL_NOW}), s.written, ({XID_BOUND}) \
    FROM t LEFT JOIN sized s \
         ON s.n OPERATOR(pg_catalog.=) 1 OR s.running OPERATOR(pg_catalog.<=) $10 \
    ORDER BY s.id"
    )
});

/// Where the server's write-ahead log stands: where it inserts on a primary, what it
/// replayed on a standby (where a polling listener may read).
const WAL_NOW: &str = "\
    CASE WHEN pg_catalog.pg_is_in_recovery() THEN pg_catalog.pg_last_wal_replay_lsn() \
         ELSE pg_catalog.pg_current_wal_insert_lsn() END";

/// The next transaction id the server will hand out, read after the statement's snapshot
/// was taken: above every transaction that had an id then ([`Cursor::xid_bound`]).
/// `age(xid)` counts from it (in 32 bits, from a statement that has no transaction id of
/// its own); added to the snapshot's `xmax`, which it is at least, it gives the full id.
///
/// On a standby (a polling listener's) there is no such bound: its next id moves only as it
/// replays, so a transaction that had its id on the primary, and its log id, before one
/// that committed, may show up there later with an id above that next id. The bound is then
/// the largest an `xid8` read takes (`i64::MAX`): every transaction at or above `xmax` is
/// looked up, which on a standby are the ones committed since.
const XID_BOUND: &str = "\
    SELECT CASE WHEN pg_catalog.pg_is_in_recovery() THEN 9223372036854775807::pg_catalog.int8 \
           ELSE pg_catalog.pg_snapshot_xmax(pg_catalog.pg_current_snapshot())::pg_catalog.text::pg_catalog.int8 \
                OPERATOR(pg_catalog.+) pg_catalog.age(pg_catalog.xid( \
                    pg_catalog.pg_snapshot_xmax(pg_catalog.pg_current_snapshot()))) END";

/// The position before the first read: taken before `LISTEN`.
static CURSOR_SQL: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
    format!(
        "\
    SELECT pg_catalog.pg_current_snapshot()::pg_catalog.text, \
           pg_catalog.date_part('epoch', pg_catalog.now()), \
           (SELECT pg_catalog.max(l.id) FROM updatepipe.log l \
            WHERE l.channel OPERATOR(pg_catalog.=) $1), \
           ({WAL_NOW}), ({XID_BOUND})"
    )
});

/// A starting position in the past, for a replay ([`crate::Since`]): the snapshot of now
/// (so nothing committed is read twice) with the id mark set back, so that every entry above
/// it is read: above `$2`, or above the last entry written before the time `$3` (seconds
/// since the epoch).
static CURSOR_SINCE_SQL: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
    format!(
        "\
    SELECT pg_catalog.pg_current_snapshot()::pg_catalog.text, \
           pg_catalog.date_part('epoch', pg_catalog.now()), \
           coalesce($2::pg_catalog.int8, \
                    (SELECT pg_catalog.max(l.id) FROM updatepipe.log l \
                     WHERE l.channel OPERATOR(pg_catalog.=) $1 \
                       AND l.created_at OPERATOR(pg_catalog.<) \
                           pg_catalog.to_timestamp($3::pg_catalog.float8)), \
                    0), \
           ({WAL_NOW}), ({XID_BOUND})"
    )
});

/// One envelope by sender and number: an oversize envelope a notification points at, and
/// when its row was written.
const FETCH_SQL: &str = "\
    SELECT l.payload, pg_catalog.date_part('epoch', l.created_at) FROM updatepipe.log l \
    WHERE l.channel OPERATOR(pg_catalog.=) $1 AND l.origin OPERATOR(pg_catalog.=) $2 \
      AND l.seq OPERATOR(pg_catalog.=) $3";

/// Prunes the channel's log entries older than the retention, one session at a time, and
/// records how far it pruned: a function of the schema's owner (migrations V5 and V6), so
/// that the listener needs neither `DELETE` on the log nor write access to the marks; it
/// keeps what named consumers have not acknowledged, up to the hold (`$3`). Returns
/// whether it held the channel's pruning lock, and how many entries it removed.
const PRUNE_SQL: &str = "SELECT p.locked, p.deleted FROM updatepipe.prune($1, $2, $3) AS p";

/// A durable listener's position in the log: everything visible in `snapshot` was read.
#[derive(Clone, Debug, Default, PartialEq)]
pub(crate) struct Cursor {
    /// `pg_current_snapshot()` as text, taken by the last read.
    pub(crate) snapshot: String,
    /// The highest log id visible to the last read (0 for none).
    pub(crate) max_id: i64,
    /// The server's clock at that read (seconds since the epoch).
    pub(crate) read_at: f64,
    /// The server's write-ahead log position at that read: every commit the snapshot sees
    /// lies before it.
    pub(crate) lsn: u64,
    /// The cluster, database, log and timeline it was read on.
    pub(crate) place: Place,
    /// Above the id of every transaction that had one when the snapshot was taken (the
    /// server's next transaction id, read just after it: [`XID_BOUND`]). Transactions in
    /// progress then that the snapshot does not list (at or above its `xmax`) lie below
    /// it. `None` only in tests: the next read then looks above `xmax` without a bound.
    pub(crate) xid_bound: Option<u64>,
}

impl Cursor {
    /// The position a `CURSOR_SQL` or `CURSOR_SINCE_SQL` row gives, read at `place`.
    fn from_row(row: &Row, place: Place) -> Cursor {
        Cursor {
            snapshot: row.get(0),
            read_at: row.get(1),
            max_id: row.get::<_, Option<i64>>(2).unwrap_or(0),
            lsn: u64::from(row.get::<_, PgLsn>(3)),
            place,
            xid_bound: xid_bound(row, 4),
        }
    }

    /// The snapshot's `xmax`: one past the newest transaction that had completed. (One at
    /// or above it may have been in progress: see [`Cursor::xid_bound`].)
    pub(crate) fn xmax(&self) -> u64 {
        snapshot_bound(&self.snapshot, 1)
    }
}

/// Column `i` of a row, an [`XID_BOUND`].
fn xid_bound(row: &Row, i: usize) -> Option<u64> {
    row.get::<_, Option<i64>>(i)
        .and_then(|b| u64::try_from(b).ok())
}

/// The `i`th number of a snapshot's text form (`xmin:xmax:xip,...`); 0 if it has none.
fn snapshot_bound(snapshot: &str, i: usize) -> u64 {
    snapshot
        .split(':')
        .nth(i)
        .and_then(|n| n.parse().ok())
        .unwrap_or(0)
}

/// How much one page of a log read may hold.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct PageBudget {
    /// Rows (envelopes), at least 1.
    pub(crate) rows: usize,
    /// Bytes of payload; the first row of a page is read whatever its size (at most
    /// [`MAX_LOGGED_ENVELOPE_LEN`](crate::MAX_LOGGED_ENVELOPE_LEN) and the log's slack).
    pub(crate) bytes: usize,
}

/// A catch-up under way: reading towards `target`, past `after_id`.
#[derive(Clone, Debug)]
#[cfg_attr(test, derive(Default))]
pub(crate) struct CatchUp {
    /// The snapshot the catch-up's first page took, with its time and highest id.
    target: Cursor,
    /// The highest id delivered so far.
    after_id: i64,
}

impl CatchUp {
    pub(crate) fn new(target: Cursor, after_id: i64) -> CatchUp {
        CatchUp { target, after_id }
    }

    /// The snapshot the catch-up reads towards.
    pub(crate) fn target(&self) -> &Cursor {
        &self.target
    }
}

/// What one page read returned.
#[derive(Debug)]
pub(crate) struct Page {
    /// The snapshot this page read towards.
    target: Cursor,
    /// The highest id delivered before this page (0 on a first page).
    after_id: i64,
    /// Whether entries this listener had not read may have been pruned since its cursor.
    pub(crate) pruned: bool,
    /// Whether the target is reached: nothing more to read towards it.
    pub(crate) complete: bool,
    /// The new entries, in order.
    pub(crate) entries: Vec<Entry>,
}

/// One log entry: its id, its sender and number as the row says, the envelope, and when
/// the row was written (the server's clock, seconds since the epoch: a signed envelope
/// must have been sent then, not copied in later).
#[derive(Debug)]
pub(crate) struct Entry {
    pub(crate) id: i64,
    pub(crate) origin: String,
    pub(crate) seq: i64,
    pub(crate) payload: String,
    pub(crate) written_at: f64,
}

impl Page {
    /// Reads a `PAGE_SQL` result; `None` for an empty result (which the statement never
    /// gives: it always returns the target row).
    fn from_rows(
        rows: Vec<Row>,
        catch_up: Option<&CatchUp>,
        budget: PageBudget,
        place: Place,
    ) -> Option<Page> {
        let first = rows.first()?;
        let target = match catch_up {
            Some(catch_up) => catch_up.target.clone(),
            None => Cursor {
                snapshot: first.get(0),
                read_at: first.get(1),
                max_id: first.get::<_, Option<i64>>(3).unwrap_or(0),
                lsn: u64::from(first.get::<_, PgLsn>(9)),
                place,
                xid_bound: xid_bound(first, 11),
            },
        };
        let total = first.get::<_, Option<i64>>(4).unwrap_or(0);
        let entries: Vec<Entry> = rows
            .iter()
            .filter_map(|row| {
                Some(Entry {
                    id: row.get::<_, Option<i64>>(5)?,
                    origin: row.get(6),
                    seq: row.get(7),
                    payload: row.get(8),
                    written_at: row.get(10),
                })
            })
            .collect();
        let rows_budget = i64::try_from(budget.rows.max(1)).unwrap_or(i64::MAX);
        let complete = entries.len() as i64 == total && total < rows_budget;
        Some(Page {
            target,
            after_id: catch_up.map_or(0, |c| c.after_id),
            pruned: first.get::<_, Option<bool>>(2).unwrap_or(false),
            complete,
            entries,
        })
    }

    /// Where the reader stands after this page: at its target once it is complete (the
    /// id mark never moving back: a read after pruning sees a lower maximum), otherwise
    /// still at `previous`, with the catch-up past this page's last row.
    pub(crate) fn advance(self, previous: &Cursor) -> (Cursor, Option<CatchUp>, Vec<Entry>) {
        if self.complete {
            let mut cursor = self.target;
            // Nor below a row delivered (after a crash, a reused transaction id may make a row
            // above the target's highest id visible in it).
            let delivered = self.entries.last().map_or(self.after_id, |e| e.id);
            cursor.max_id = cursor.max_id.max(previous.max_id).max(delivered);
            return (cursor, None, self.entries);
        }
        let after_id = self.entries.last().map_or(self.after_id, |e| e.id);
        let catch_up = CatchUp {
            target: self.target,
            after_id,
        };
        (previous.clone(), Some(catch_up), self.entries)
    }

    /// The snapshot this page read towards.
    pub(crate) fn target(&self) -> &Cursor {
        &self.target
    }

    /// The rows and payload bytes this page holds.
    pub(crate) fn size(&self) -> (usize, usize) {
        let bytes = self.entries.iter().map(|e| e.payload.len()).sum();
        (self.entries.len(), bytes)
    }
}

/// The position before the first read, taken before `LISTEN` so that nothing committed
/// between the two is missed: now, or with `since`, a starting position in the past.
pub(crate) async fn read_cursor(
    client: &Client,
    channel: &str,
    since: Option<&Since>,
    place: Place,
) -> Result<Cursor, tokio_postgres::Error> {
    let past = match since {
        Some(Since::Position(id)) => Some((Some(*id), 0.0)),
        Some(Since::Time(at)) => Some((
            None,
            at.duration_since(UNIX_EPOCH)
                .map_or(0.0, |d| d.as_secs_f64()),
        )),
        // A position is resumed from as it is (`LogReader::resume`); the present otherwise.
        Some(Since::After(_)) | None => None,
    };
    let row = match past {
        None => {
            client
                .query_typed_one(&CURSOR_SQL, &[(&channel, Type::TEXT)])
                .await?
        }
        Some((position, time)) => {
            client
                .query_typed_one(
                    &CURSOR_SINCE_SQL,
                    &[
                        (&channel, Type::TEXT),
                        (&position, Type::INT8),
                        (&time, Type::FLOAT8),
                    ],
                )
                .await?
        }
    };
    Ok(Cursor::from_row(&row, place))
}

/// One page of what the log gained since `from`, within `budget`: the first of a catch-up
/// (`catch_up` is `None`), or the next one; `None` for an empty result (which the
/// statement never gives). `place` is the session's (a first page's target is read there).
pub(crate) async fn read_page(
    client: &Client,
    channel: &str,
    from: &Cursor,
    catch_up: Option<&CatchUp>,
    budget: PageBudget,
    place: Place,
) -> Result<Option<Page>, tokio_postgres::Error> {
    let target = catch_up.map(|c| &c.target);
    let after_id = catch_up.map_or(0, |c| c.after_id);
    let rows = i64::try_from(budget.rows.max(1)).unwrap_or(i64::MAX);
    let bytes = i64::try_from(budget.bytes.max(1)).unwrap_or(i64::MAX);
    let result = client
        .query_typed(
            &PAGE_SQL,
            &[
                (&channel, Type::TEXT),
                (&from.snapshot, Type::TEXT),
                (&from.max_id, Type::INT8),
                (&from.read_at, Type::FLOAT8),
                (&target.map(|t| t.snapshot.as_str()), Type::TEXT),
                (&target.map(|t| t.read_at), Type::FLOAT8),
                (&target.map(|t| t.max_id), Type::INT8),
                (&after_id, Type::INT8),
                (&rows, Type::INT8),
                (&bytes, Type::INT8),
                (
                    &from.xid_bound.and_then(|b| i64::try_from(b).ok()),
                    Type::INT8,
                ),
            ],
        )
        .await?;
    Ok(Page::from_rows(result, catch_up, budget, place))
}

/// The envelope `seq` of `origin` on `channel` (an oversize envelope a notification points
/// at) and when its row was written, or `None` when the log has no such row (pruned, or
/// never committed).
pub(crate) async fn fetch(
    client: &Client,
    channel: &str,
    origin: &Origin,
    seq: u64,
) -> Result<Option<(String, f64)>, tokio_postgres::Error> {
    let row = client
        .query_typed_opt(
            FETCH_SQL,
            &[
                (&channel, Type::TEXT),
                (&origin.as_str(), Type::TEXT),
                // As the number was always bound: a number past i64::MAX finds no row.
                (&(seq as i64), Type::INT8),
            ],
        )
        .await?;
    Ok(row.map(|r| (r.get(0), r.get(1))))
}

/// What one pruning did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Pruned {
    /// Whether it held the channel's pruning lock (another session pruning the channel at
    /// that moment holds it otherwise).
    pub(crate) locked: bool,
    /// How many entries it removed.
    pub(crate) deleted: u64,
}

/// Prunes the channel's entries older than `retention`, keeping those named consumers
/// have not acknowledged as long as they are younger than `hold`, unless another session
/// is pruning the channel now.
pub(crate) async fn prune(
    client: &Client,
    channel: &str,
    retention: Duration,
    hold: Duration,
) -> Result<Pruned, tokio_postgres::Error> {
    let (seconds, hold) = (retention.as_secs_f64(), hold.as_secs_f64());
    let row = client
        .query_typed_one(
            PRUNE_SQL,
            &[
                (&channel, Type::TEXT),
                (&seconds, Type::FLOAT8),
                (&hold, Type::FLOAT8),
            ],
        )
        .await?;
    Ok(Pruned {
        locked: row.get(0),
        deleted: u64::try_from(row.get::<_, i64>(1)).unwrap_or(0),
    })
}

#[cfg(test)]
impl Page {
    /// A page that completes a read towards an empty target.
    pub(crate) fn complete_for_tests() -> Page {
        Page::for_tests(0, true, &[])
    }

    /// A first page that completes its read, with these entries.
    pub(crate) fn with_entries_for_tests(pruned: bool, entries: Vec<Entry>) -> Page {
        Page {
            pruned,
            entries,
            ..Page::complete_for_tests()
        }
    }

    /// A page towards a target whose highest id is `target_max_id`, with entries of these
    /// ids.
    pub(crate) fn for_tests(target_max_id: i64, complete: bool, ids: &[i64]) -> Page {
        Page {
            target: Cursor {
                snapshot: format!("target-{target_max_id}"),
                max_id: target_max_id,
                ..Cursor::default()
            },
            after_id: 0,
            pruned: false,
            complete,
            entries: ids
                .iter()
                .map(|&id| Entry {
                    id,
                    origin: "o".into(),
                    seq: id,
                    payload: "{}".into(),
                    written_at: 0.0,
                })
                .collect(),
        }
    }
}

#[cfg(test)]
mod tests;
