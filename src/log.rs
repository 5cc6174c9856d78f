//! The durable log, `updatepipe.log`: the statements that write it (with the notifications,
//! in one transaction), read it in commit order, fetch one envelope and prune it, and a
//! listener's position in it. `docs/delivery.md` argues why the reading is exactly once.
//!
//! Only this module binds the reading statements' parameters and reads their columns: the
//! listener calls [`read_cursor`], [`read_tail`], [`fetch`] and [`prune`].

use std::time::{Duration, UNIX_EPOCH};

use tokio_postgres::types::Type;
use tokio_postgres::{Client, Row};

use crate::config::Since;
use crate::origin::Origin;

/// A durable batch: the envelopes go to the log and their notifications out, in one
/// statement (a data-modifying CTE always runs to completion), so one transaction.
pub(crate) const LOG_AND_NOTIFY: &str = "WITH logged AS (\
       INSERT INTO updatepipe.log (channel, origin, seq, payload) \
       SELECT $1, $2, s, p FROM unnest($3::bigint[], $4::text[]) WITH ORDINALITY AS t(s, p, i) \
       ORDER BY i) \
     SELECT pg_notify($1, n) FROM unnest($5::text[]) WITH ORDINALITY AS t(n, i) ORDER BY i";

/// Reads what the log gained since the previous read, whose snapshot was `$2`, whose
/// highest visible id was `$3` and whose server time was `$4`: rows committed before this
/// statement's snapshot and not before the previous one (by transaction id), plus rows with
/// a higher id than any seen then (after a crash the server may hand out a transaction id
/// again, never an id). In id order, which is commit order for each sender's successive
/// transactions. Returns the new snapshot, clock, whether pruning may have taken entries
/// that read had not seen, and the highest id, even when no row is new.
const TAIL_SQL: &str = "\
    SELECT s.snap::text, extract(epoch FROM now())::float8, \
           (SELECT p.pruned_before > to_timestamp($4) \
                   OR p.pruned_xid >= pg_snapshot_xmin($2::text::pg_snapshot) \
            FROM updatepipe.pruned p WHERE p.channel = $1), \
           (SELECT max(m.id) FROM updatepipe.log m WHERE m.channel = $1), \
           l.origin, l.seq, l.payload \
    FROM (SELECT pg_current_snapshot() AS snap) s \
    LEFT JOIN LATERAL ( \
        SELECT origin, seq, payload, id FROM updatepipe.log \
        WHERE channel = $1 \
          AND ((xid >= pg_snapshot_xmin($2::text::pg_snapshot) \
                AND NOT pg_visible_in_snapshot(xid, $2::text::pg_snapshot)) \
               OR id > $3) \
    ) l ON true \
    ORDER BY l.id";

/// The position before the first read: taken before `LISTEN`.
const CURSOR_SQL: &str = "\
    SELECT pg_current_snapshot()::text, extract(epoch FROM now())::float8, \
           (SELECT max(id) FROM updatepipe.log WHERE channel = $1)";

/// A starting position in the past, for a replay ([`crate::Since`]): the snapshot of now
/// (so nothing committed is read twice) with the id mark set back, so that every entry above
/// it is read: above `$2`, or above the last entry written before the time `$3` (seconds
/// since the epoch).
const CURSOR_SINCE_SQL: &str = "\
    SELECT pg_current_snapshot()::text, extract(epoch FROM now())::float8, \
           coalesce($2::int8, (SELECT max(id) FROM updatepipe.log \
                               WHERE channel = $1 AND created_at < to_timestamp($3::float8)), 0)";

/// One envelope by sender and number: an oversize envelope a notification points at.
const FETCH_SQL: &str =
    "SELECT payload FROM updatepipe.log WHERE channel = $1 AND origin = $2 AND seq = $3";

/// Prunes the channel's log entries older than the retention, one node at a time (a
/// transaction-scoped advisory lock), and records how far it pruned.
const PRUNE_SQL: &str = "\
    WITH lock AS (SELECT pg_try_advisory_xact_lock(8463920183746501) AS ok), \
         cutoff AS (SELECT now() - make_interval(secs => $2) AS at), \
         gone AS (DELETE FROM updatepipe.log l USING lock, cutoff \
                  WHERE lock.ok AND l.channel = $1 AND l.created_at < cutoff.at RETURNING l.xid) \
    INSERT INTO updatepipe.pruned (channel, pruned_before, pruned_xid) \
    SELECT $1, cutoff.at, (SELECT xid FROM gone ORDER BY xid DESC LIMIT 1) \
    FROM lock, cutoff WHERE lock.ok AND EXISTS (SELECT 1 FROM gone) \
    ON CONFLICT (channel) DO UPDATE SET \
        pruned_before = greatest(updatepipe.pruned.pruned_before, excluded.pruned_before), \
        pruned_xid = greatest(updatepipe.pruned.pruned_xid, excluded.pruned_xid)";

/// A durable listener's position in the log: everything visible in `snapshot` was read.
#[derive(Clone, Debug)]
#[cfg_attr(test, derive(Default))]
pub(crate) struct Cursor {
    /// `pg_current_snapshot()` as text, taken by the last read.
    snapshot: String,
    /// The highest log id visible to the last read (0 for none).
    max_id: i64,
    /// The server's clock at that read (seconds since the epoch).
    read_at: f64,
}

impl Cursor {
    /// The position a `CURSOR_SQL` or `CURSOR_SINCE_SQL` row gives.
    fn from_row(row: &Row) -> Cursor {
        Cursor {
            snapshot: row.get(0),
            read_at: row.get(1),
            max_id: row.get::<_, Option<i64>>(2).unwrap_or(0),
        }
    }
}

/// What one `TAIL_SQL` read returned.
#[derive(Debug)]
pub(crate) struct Tail {
    /// The position after this read.
    pub(crate) cursor: Cursor,
    /// Whether entries this listener had not read may have been pruned since `previous`.
    pub(crate) pruned: bool,
    /// The new entries, in order.
    pub(crate) entries: Vec<Entry>,
}

/// One log entry: its sender and number as the row says, and the envelope.
#[derive(Debug)]
pub(crate) struct Entry {
    pub(crate) origin: String,
    pub(crate) seq: i64,
    pub(crate) payload: String,
}

impl Tail {
    /// Reads a `TAIL_SQL` result; `None` for an empty result (which the statement never
    /// gives: it always returns the snapshot row).
    fn from_rows(rows: Vec<Row>, previous: &Cursor) -> Option<Tail> {
        let first = rows.first()?;
        let maybe_pruned: Option<bool> = first.get(2);
        let cursor = Cursor {
            snapshot: first.get(0),
            read_at: first.get(1),
            // Never move the id mark back (a read after pruning sees a lower maximum).
            max_id: first
                .get::<_, Option<i64>>(3)
                .unwrap_or(0)
                .max(previous.max_id),
        };
        let entries = rows
            .iter()
            .filter_map(|row| {
                Some(Entry {
                    origin: row.get::<_, Option<String>>(4)?,
                    seq: row.get(5),
                    payload: row.get(6),
                })
            })
            .collect();
        Some(Tail {
            cursor,
            pruned: maybe_pruned.unwrap_or(false),
            entries,
        })
    }
}

/// The position before the first read, taken before `LISTEN` so that nothing committed
/// between the two is missed: now, or with `since`, a starting position in the past.
pub(crate) async fn read_cursor(
    client: &Client,
    channel: &str,
    since: Option<Since>,
) -> Result<Cursor, tokio_postgres::Error> {
    let row = match since {
        None => {
            client
                .query_typed_one(CURSOR_SQL, &[(&channel, Type::TEXT)])
                .await?
        }
        Some(since) => {
            let (position, time): (Option<i64>, f64) = match since {
                Since::Position(id) => (Some(id), 0.0),
                Since::Time(at) => (
                    None,
                    at.duration_since(UNIX_EPOCH)
                        .map_or(0.0, |d| d.as_secs_f64()),
                ),
            };
            client
                .query_typed_one(
                    CURSOR_SINCE_SQL,
                    &[
                        (&channel, Type::TEXT),
                        (&position, Type::INT8),
                        (&time, Type::FLOAT8),
                    ],
                )
                .await?
        }
    };
    Ok(Cursor::from_row(&row))
}

/// What the log gained since `previous`, and the position after it; `None` for an empty
/// result (which the statement never gives: it always returns the snapshot row).
pub(crate) async fn read_tail(
    client: &Client,
    channel: &str,
    previous: &Cursor,
) -> Result<Option<Tail>, tokio_postgres::Error> {
    let rows = client
        .query_typed(
            TAIL_SQL,
            &[
                (&channel, Type::TEXT),
                (&previous.snapshot, Type::TEXT),
                (&previous.max_id, Type::INT8),
                (&previous.read_at, Type::FLOAT8),
            ],
        )
        .await?;
    Ok(Tail::from_rows(rows, previous))
}

/// The envelope `seq` of `origin` on `channel` (an oversize envelope a notification points
/// at), or `None` when the log has no such row (pruned, or never committed).
pub(crate) async fn fetch(
    client: &Client,
    channel: &str,
    origin: &Origin,
    seq: u64,
) -> Result<Option<String>, tokio_postgres::Error> {
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
    Ok(row.map(|r| r.get(0)))
}

/// Prunes the channel's entries older than `retention` (when no other node is pruning);
/// returns how many rows the statement wrote.
pub(crate) async fn prune(
    client: &Client,
    channel: &str,
    retention: Duration,
) -> Result<u64, tokio_postgres::Error> {
    let seconds = retention.as_secs_f64();
    client
        .execute_typed(
            PRUNE_SQL,
            &[(&channel, Type::TEXT), (&seconds, Type::FLOAT8)],
        )
        .await
}
