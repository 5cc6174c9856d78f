//! A durable reader's [`Position`]: where it stands just after an update, exactly enough to
//! resume there, and its text form (`docs/delivery.md`, "Positions and named consumers").

use std::fmt;
use std::str::FromStr;
use std::sync::Arc;

use super::{Cursor, Place};
use crate::error::Error;

/// The longest text form a position may have. Its size is set by the snapshots it holds,
/// whose lists of transactions in progress are at most the server's connections (each
/// id about ten bytes, two snapshots: 1 MiB is 50,000 connections); a bound keeps
/// untrusted text from costing more than that.
pub const MAX_POSITION_LEN: usize = 1024 * 1024;

/// The prefix of the text form, and its version.
const PREFIX: &str = "up1/";

/// Where a durable reader stands just after an update: resuming from it
/// ([`Since::After`](crate::Since::After)) delivers exactly what followed it, once, in the
/// same order.
///
/// It is not a log id: it holds the reader's snapshots, which say which transactions were
/// still in progress when it read (their rows, committed later with lower ids, are still
/// to come), the read under way, and how many of an envelope's updates were delivered. It
/// also records where it was read (the cluster, database, log and timeline, and the point
/// in the server's write-ahead log), so that a history that moved back since (a failover
/// that lost commits, a backup restored) is noticed instead of skipped over.
///
/// Opaque, but with a text form (`Display` and `FromStr`, and serde as a string), to store
/// in a file or in the application's own table, in the transaction that applies the update
/// (the exactly-once pattern: `docs/delivery.md`). Positions of one reader's stream are
/// ordered as they were delivered ([`step`](Position::step)); positions of different
/// streams do not compare.
#[derive(Clone, Debug, PartialEq)]
pub struct Position {
    read: Arc<Read>,
    /// The log entry the update was in.
    after_id: i64,
    /// How many of that entry's updates were delivered, when not all of them.
    partial: u32,
    step: u64,
}

/// A read: from a settled cursor (everything visible in it was delivered), towards a
/// target when entries were delivered on the way.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct Read {
    pub(crate) from: Cursor,
    pub(crate) target: Option<Cursor>,
}

// A cursor's time is a finite number (checked when read from text), so equality is total.
impl Eq for Position {}

impl PartialOrd for Position {
    /// By [`step`](Position::step), for positions of one stream; positions that differ
    /// but share a step belong to different streams and do not compare.
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        if self == other {
            return Some(std::cmp::Ordering::Equal);
        }
        match self.step.cmp(&other.step) {
            std::cmp::Ordering::Equal => None,
            order => Some(order),
        }
    }
}

impl Position {
    /// A position just after the `partial`th update of the log entry `after_id` (all of
    /// them when `partial` is 0), in `read`.
    pub(crate) fn new(read: Arc<Read>, after_id: i64, partial: u32, step: u64) -> Position {
        Position {
            read,
            after_id,
            partial,
            step,
        }
    }

    /// A position at a settled cursor: before anything it has not seen.
    pub(crate) fn at(cursor: Cursor, step: u64) -> Position {
        Position::new(
            Arc::new(Read {
                from: cursor,
                target: None,
            }),
            0,
            0,
            step,
        )
    }

    /// The count of positions before this one in its stream: it grows by one with every
    /// position a reader gives, and goes on from a position resumed from.
    pub fn step(&self) -> u64 {
        self.step
    }

    pub(crate) fn read(&self) -> &Read {
        &self.read
    }

    pub(crate) fn after_id(&self) -> i64 {
        self.after_id
    }

    pub(crate) fn partial(&self) -> u32 {
        self.partial
    }

    /// The cursor whose history must still be the server's: the target of the read under
    /// way (every entry delivered was visible in it), else the settled one.
    pub(crate) fn newest(&self) -> &Cursor {
        self.read.target.as_ref().unwrap_or(&self.read.from)
    }

    /// What a consumer at this position has had: the rows visible in this snapshot, up to
    /// the settled cursor's highest id (pruning keeps the others).
    pub(crate) fn holds(&self) -> &str {
        &self.read.from.snapshot
    }

    /// The highest log id this position is past: the entry of the read under way (the one
    /// before it while only some of the entry's updates were delivered), else the settled
    /// cursor's highest. Entries above it were not delivered, so a consumer at this
    /// position is at least as far behind as the entries written above it (`status`).
    pub(crate) fn past_id(&self) -> i64 {
        let in_read = if self.partial > 0 {
            self.after_id - 1
        } else {
            self.after_id
        };
        self.read.from.max_id.max(in_read)
    }
}

impl fmt::Display for Position {
    /// `up1/<step>/<entry>/<partial>/<cursor>[/<target cursor>]`, each cursor
    /// `<system>_<database>_<log>_<timeline>_<channel>_<lsn>_<time>_<highest id>_<snapshot>_<bound>`,
    /// the bound above every transaction id handed out when the snapshot was taken.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{PREFIX}{}/{}/{}/{}",
            self.step,
            self.after_id,
            self.partial,
            CursorText(&self.read.from)
        )?;
        if let Some(target) = &self.read.target {
            write!(f, "/{}", CursorText(target))?;
        }
        Ok(())
    }
}

struct CursorText<'a>(&'a Cursor);

impl fmt::Display for CursorText<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let c = self.0;
        write!(
            f,
            "{:x}_{}_{}_{}_{:x}_{:x}_{}_{}_{}_{}",
            c.place.system,
            c.place.database,
            c.place.log,
            c.place.timeline,
            c.place.channel,
            c.lsn,
            c.read_at,
            c.max_id,
            c.snapshot,
            c.xid_bound.unwrap_or_else(|| c.xmax())
        )
    }
}

impl FromStr for Position {
    type Err = Error;

    /// Reads the text form back; refuses anything a reader did not write (a clear
    /// [`Error::InvalidPosition`], never a panic), since the text comes from outside.
    fn from_str(text: &str) -> Result<Position, Error> {
        if text.len() > MAX_POSITION_LEN {
            return Err(Error::InvalidPosition("longer than any position"));
        }
        let rest = text.strip_prefix(PREFIX).ok_or(Error::InvalidPosition(
            "not a position (it starts with up1/)",
        ))?;
        let mut parts = rest.split('/');
        let mut next = || parts.next().ok_or(Error::InvalidPosition("too short"));
        let step = number(next()?)?;
        let after_id: i64 = number(next()?)?;
        let partial: u32 = number(next()?)?;
        let from = cursor(next()?)?;
        let target = match parts.next() {
            Some(text) => Some(cursor(text)?),
            None => None,
        };
        if parts.next().is_some() {
            return Err(Error::InvalidPosition("too long"));
        }
        if after_id < 0 || (target.is_none() && (after_id != 0 || partial != 0)) {
            return Err(Error::InvalidPosition("an entry outside any read"));
        }
        Ok(Position::new(
            Arc::new(Read { from, target }),
            after_id,
            partial,
            step,
        ))
    }
}

fn number<T: FromStr>(text: &str) -> Result<T, Error> {
    // Digits only: no sign, no space, no `+`.
    if text.is_empty() || !text.bytes().all(|b| b.is_ascii_digit()) {
        return Err(Error::InvalidPosition("a number is malformed"));
    }
    text.parse()
        .map_err(|_| Error::InvalidPosition("a number is out of range"))
}

fn hex(text: &str) -> Result<u64, Error> {
    if text.is_empty() || !text.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(Error::InvalidPosition("a number is malformed"));
    }
    u64::from_str_radix(text, 16).map_err(|_| Error::InvalidPosition("a number is out of range"))
}

fn cursor(text: &str) -> Result<Cursor, Error> {
    let fields: Vec<&str> = text.split('_').collect();
    let [
        system,
        database,
        log,
        timeline,
        channel,
        lsn,
        read_at,
        max_id,
        snapshot,
        bound,
    ] = fields[..]
    else {
        return Err(Error::InvalidPosition("a cursor is malformed"));
    };
    let read_at: f64 = read_at
        .parse()
        .map_err(|_| Error::InvalidPosition("a time is malformed"))?;
    if !read_at.is_finite() || read_at.is_sign_negative() {
        return Err(Error::InvalidPosition("a time is out of range"));
    }
    check_snapshot(snapshot)?;
    let xid_bound: u64 = number(bound)?;
    let xmax: u64 = snapshot.split(':').nth(1).map_or(Ok(0), number)?;
    if xid_bound < xmax || xid_bound > i64::MAX as u64 {
        return Err(Error::InvalidPosition(
            "a transaction id bound is out of range",
        ));
    }
    Ok(Cursor {
        snapshot: snapshot.to_owned(),
        max_id: number(max_id)?,
        read_at,
        lsn: hex(lsn)?,
        place: Place {
            system: hex(system)?,
            database: number(database)?,
            log: number(log)?,
            timeline: number(timeline)?,
            channel: hex(channel)?,
        },
        xid_bound: Some(xid_bound),
    })
}

/// A snapshot as `pg_current_snapshot()` writes it: `xmin:xmax:xip,...`, with
/// `xmin <= xip < xmax` in ascending order.
fn check_snapshot(text: &str) -> Result<(), Error> {
    let malformed = Error::InvalidPosition("a snapshot is malformed");
    let mut parts = text.splitn(3, ':');
    let (Some(xmin), Some(xmax), Some(xip)) = (parts.next(), parts.next(), parts.next()) else {
        return Err(malformed);
    };
    let (xmin, xmax): (u64, u64) = (number(xmin)?, number(xmax)?);
    if xmin > xmax {
        return Err(malformed);
    }
    let mut last = None;
    for x in xip.split(',').filter(|x| !x.is_empty()) {
        let x: u64 = number(x)?;
        if x < xmin || x >= xmax || last.is_some_and(|l| l >= x) {
            return Err(malformed);
        }
        last = Some(x);
    }
    Ok(())
}

impl serde::Serialize for Position {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for Position {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = <std::borrow::Cow<'de, str>>::deserialize(deserializer)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cursor_at(max_id: i64, snapshot: &str) -> Cursor {
        Cursor {
            snapshot: snapshot.into(),
            max_id,
            read_at: 1_765_080_000.123_456,
            lsn: 0x16_b3a0,
            place: Place {
                system: 0x6b1d_0e5f_00aa_1234,
                database: 16384,
                log: 16400,
                timeline: 1,
                channel: 0xfeed,
            },
            xid_bound: Some(snapshot_xmax_for_tests(snapshot) + 2),
        }
    }

    fn snapshot_xmax_for_tests(snapshot: &str) -> u64 {
        snapshot.split(':').nth(1).unwrap().parse().unwrap()
    }

    fn sample() -> Position {
        Position::new(
            Arc::new(Read {
                from: cursor_at(40, "1000:1005:1001,1003"),
                target: Some(cursor_at(90, "1010:1010:")),
            }),
            57,
            2,
            12,
        )
    }

    #[test]
    fn the_text_form_reads_back_the_same() {
        for position in [sample(), Position::at(cursor_at(0, "5:5:"), 0)] {
            let text = position.to_string();
            assert!(text.starts_with("up1/"), "{text}");
            assert_eq!(text.parse::<Position>().unwrap(), position, "{text}");
            let json = serde_json::to_string(&position).unwrap();
            assert_eq!(serde_json::from_str::<Position>(&json).unwrap(), position);
        }
    }

    #[test]
    fn text_a_reader_did_not_write_is_refused() {
        let good = sample().to_string();
        let mut bad = vec![
            String::new(),
            "up1/".into(),
            "up2/1/2/0/x".into(),
            good.replace("up1/12/", "up1/-12/"),
            good.replace("up1/12/", "up1/+12/"),
            good.replace("/57/", "/99999999999999999999/"),
            good.replace("1000:1005:1001,1003", "1005:1000:"),
            good.replace("1000:1005:1001,1003", "1000:1005:1003,1001"),
            good.replace("1000:1005:1001,1003", "1000:1005:1007"),
            good.replace("1000:1005:1001,1003", "1000:1005"),
            good.replace("_1765080000.123456_", "_NaN_"),
            good.replace("_1765080000.123456_", "_inf_"),
            good.replace("_1765080000.123456_", "_-1_"),
            format!("{good}/extra"),
            // A transaction id bound below the snapshot's xmax, or not a number, or more.
            good.replace("1010:1010:_1012", "1010:1010:_1009"),
            good.replace("1010:1010:_1012", "1010:1010:_x"),
            good.replace("1010:1010:_1012", "1010:1010:_1012_1"),
            good.replace("1010:1010:_1012", "1010:1010:"),
            format!("up1/1/5/0/{}", CursorText(&cursor_at(0, "1:1:"))),
            "x".repeat(MAX_POSITION_LEN + 1),
        ];
        bad.push(format!("{good}_"));
        for text in bad {
            let refused = text.parse::<Position>();
            assert!(
                matches!(refused, Err(Error::InvalidPosition(_))),
                "{text:.80}: {refused:?}"
            );
        }
    }

    #[test]
    fn positions_of_one_stream_are_ordered_by_step() {
        let a = sample();
        let b = Position {
            step: 13,
            ..a.clone()
        };
        assert!(a < b);
        assert_eq!(a.partial_cmp(&a.clone()), Some(std::cmp::Ordering::Equal));
        let other_stream = Position {
            after_id: 1,
            ..a.clone()
        };
        assert_eq!(a.partial_cmp(&other_stream), None);
    }

    #[test]
    fn the_newest_cursor_and_what_it_holds() {
        let p = sample();
        assert_eq!(p.newest().max_id, 90, "the target of the read under way");
        assert_eq!(
            p.holds(),
            "1000:1005:1001,1003",
            "the settled cursor's snapshot"
        );
        let settled = Position::at(cursor_at(3, "7:9:8"), 0);
        assert_eq!(settled.newest().max_id, 3);
    }

    #[test]
    fn a_position_is_past_its_entry_not_its_reads_start() {
        // After all of entry 57: past it, though the read began at 40.
        let whole = Position {
            partial: 0,
            ..sample()
        };
        assert_eq!(whole.past_id(), 57);
        // After 2 of entry 57's updates: only past 56.
        assert_eq!(sample().past_id(), 56);
        assert_eq!(Position::at(cursor_at(3, "7:9:8"), 0).past_id(), 3);
    }
}
