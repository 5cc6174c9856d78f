//! The durable log, `updatepipe.log`: the statements that write it (with the notifications,
//! in one transaction), read it in commit order, fetch one envelope and prune it, and a
//! listener's position in it. `docs/delivery.md` argues why the reading is exactly once.

use tokio_postgres::Row;

/// A durable batch: the envelopes go to the log and their notifications out, in one
/// statement (a data-modifying CTE always runs to completion), so one transaction.
pub(crate) const LOG_AND_NOTIFY: &str = "WITH logged AS (\
       INSERT INTO updatepipe.log (channel, origin, seq, payload) \
       SELECT $1, $2, s, p FROM unnest($3::bigint[], $4::text[]) WITH ORDINALITY AS t(s, p, i) \
       ORDER BY i) \
     SELECT pg_notify($1, n) FROM unnest($5::text[]) WITH ORDINALITY AS t(n, i) ORDER BY i";

/// Reads what the log gained since the previous read, whose snapshot was `$2`, whose
/// highest visible id was `$3` and whose server time was `$4`: rows committed before this statement's snapshot and not
/// before the previous one (by transaction id), plus rows with a higher id than any seen
/// then (after a crash the server may hand out a transaction id again, never an id). In id
/// order, which is commit order for each sender's successive transactions. Returns the new
/// snapshot, clock, whether pruning may have taken entries that read had not seen, and the
/// highest id, even when no row is new.
pub(crate) const TAIL_SQL: &str = "\
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
pub(crate) const CURSOR_SQL: &str = "\
    SELECT pg_current_snapshot()::text, extract(epoch FROM now())::float8, \
           (SELECT max(id) FROM updatepipe.log WHERE channel = $1)";

/// A starting position in the past, for a replay ([`crate::Since`]): the snapshot of now
/// (so nothing committed is read twice) with the id mark set back, so that every entry above
/// it is read: above `$2`, or above the last entry written before the time `$3` (seconds
/// since the epoch).
pub(crate) const CURSOR_SINCE_SQL: &str = "\
    SELECT pg_current_snapshot()::text, extract(epoch FROM now())::float8, \
           coalesce($2::int8, (SELECT max(id) FROM updatepipe.log \
                               WHERE channel = $1 AND created_at < to_timestamp($3::float8)), 0)";

/// One envelope by sender and number: an oversize envelope a notification points at.
pub(crate) const FETCH_SQL: &str =
    "SELECT payload FROM updatepipe.log WHERE channel = $1 AND origin = $2 AND seq = $3";

/// Prunes the channel's log entries older than the retention, one node at a time (a
/// transaction-scoped advisory lock), and records how far it pruned.
pub(crate) const PRUNE_SQL: &str = "\
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
pub(crate) struct Cursor {
    /// `pg_current_snapshot()` as text, taken by the last read.
    pub(crate) snapshot: String,
    /// The highest log id visible to the last read (0 for none).
    pub(crate) max_id: i64,
    /// The server's clock at that read (seconds since the epoch).
    pub(crate) read_at: f64,
}

impl Cursor {
    /// The position a `CURSOR_SQL` row gives.
    pub(crate) fn from_row(row: &Row) -> Cursor {
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
    pub(crate) fn from_rows(rows: Vec<Row>, previous: &Cursor) -> Option<Tail> {
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
