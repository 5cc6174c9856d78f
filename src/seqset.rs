//! IMAP sequence sets (`1:3,7,9:*`), parsed and validated.

use std::fmt;
use std::num::NonZeroU32;
use std::str::FromStr;

use crate::error::UpdateError;

/// The longest sequence-set text accepted, in bytes.
///
/// A notification payload is at most 7999 bytes, so a longer set could never travel in one;
/// the bound also keeps a hostile payload from asking for unbounded work.
pub const MAX_SEQ_SET_LEN: usize = 7999;

/// One end of a sequence range: a number (1 to 2³²−1) or `*`, "the largest in use".
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum SeqNum {
    /// A message sequence number or UID.
    Value(NonZeroU32),
    /// `*`: the largest number in use in the mailbox.
    Star,
}

impl SeqNum {
    /// Its text form, without the formatting machinery (see [`SeqSet::write_text`]).
    fn write_text(&self, put: &mut impl FnMut(&str)) {
        match self {
            SeqNum::Value(n) => put(itoa::Buffer::new().format(n.get())),
            SeqNum::Star => put("*"),
        }
    }
}

impl fmt::Display for SeqNum {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SeqNum::Value(n) => f.write_str(itoa::Buffer::new().format(n.get())),
            SeqNum::Star => f.write_str("*"),
        }
    }
}

/// One element of a sequence set: a single number (`start == end`) or a range `start:end`.
///
/// Ranges are kept as written: `5:1` stays `5:1` (IMAP says it means the same as `1:5`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct SeqRange {
    start: SeqNum,
    end: SeqNum,
}

impl SeqRange {
    /// A range from `start` to `end`, as written.
    pub fn new(start: SeqNum, end: SeqNum) -> Self {
        SeqRange { start, end }
    }

    /// The first end as written.
    pub fn start(&self) -> SeqNum {
        self.start
    }

    /// The second end as written (equal to `start` for a single number).
    pub fn end(&self) -> SeqNum {
        self.end
    }

    /// Its text form (`7`, `1:5`, `9:*`), piece by piece (see [`SeqSet::write_text`]).
    fn write_text(&self, put: &mut impl FnMut(&str)) {
        self.start.write_text(put);
        if self.start != self.end {
            put(":");
            self.end.write_text(put);
        }
    }
}

impl fmt::Display for SeqRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&self.start, f)?;
        if self.start != self.end {
            f.write_str(":")?;
            fmt::Display::fmt(&self.end, f)?;
        }
        Ok(())
    }
}

/// An IMAP sequence set (RFC 3501 `sequence-set`), such as `1:3,7,9:*`.
///
/// The empty set is allowed: it is how an update without a `SeqSet` is represented.
/// Parsing accepts exactly the RFC grammar: numbers from 1 to 4294967295 without leading
/// zeros, `*`, ranges `a:b`, joined by commas, with no spaces.
#[derive(Clone, Debug, Default)]
pub struct SeqSet {
    ranges: Ranges,
}

/// A set's ranges: one is kept inline (a new message's UID, a flags update's), so that
/// most updates hold nothing on the heap.
#[derive(Clone, Debug, Default)]
enum Ranges {
    #[default]
    Empty,
    One(SeqRange),
    Many(Vec<SeqRange>),
}

impl Ranges {
    fn as_slice(&self) -> &[SeqRange] {
        match self {
            Ranges::Empty => &[],
            Ranges::One(range) => std::slice::from_ref(range),
            Ranges::Many(ranges) => ranges,
        }
    }
}

impl From<Vec<SeqRange>> for Ranges {
    fn from(mut ranges: Vec<SeqRange>) -> Self {
        match ranges.len() {
            0 => Ranges::Empty,
            1 => Ranges::One(ranges.swap_remove(0)),
            _ => Ranges::Many(ranges),
        }
    }
}

impl PartialEq for SeqSet {
    fn eq(&self, other: &Self) -> bool {
        self.ranges() == other.ranges()
    }
}

impl Eq for SeqSet {}

impl std::hash::Hash for SeqSet {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.ranges().hash(state);
    }
}

impl SeqSet {
    /// The empty set.
    pub fn new() -> Self {
        SeqSet::default()
    }

    /// A set holding one number (a UID, for a flags update). Fails for zero.
    pub fn single(n: u32) -> Result<Self, UpdateError> {
        let n = NonZeroU32::new(n)
            .ok_or_else(|| UpdateError::seq_set("0", "0 is not a valid number"))?;
        Ok(SeqSet {
            ranges: Ranges::One(SeqRange::new(SeqNum::Value(n), SeqNum::Value(n))),
        })
    }

    /// A set made of the given ranges.
    pub fn from_ranges(ranges: impl IntoIterator<Item = SeqRange>) -> Self {
        SeqSet {
            ranges: ranges.into_iter().collect::<Vec<_>>().into(),
        }
    }

    /// Parses the IMAP text form. The empty string gives the empty set.
    pub fn parse(input: &str) -> Result<Self, UpdateError> {
        if input.is_empty() {
            return Ok(SeqSet::new());
        }
        if input.len() > MAX_SEQ_SET_LEN {
            return Err(UpdateError::seq_set(input, "longer than 7999 bytes"));
        }
        let range = |element: &str| match element.split_once(':') {
            Some((a, b)) => Ok(SeqRange::new(parse_num(input, a)?, parse_num(input, b)?)),
            None => {
                let n = parse_num(input, element)?;
                Ok(SeqRange::new(n, n))
            }
        };
        let elements = input.bytes().filter(|&b| b == b',').count() + 1;
        if elements == 1 {
            return Ok(SeqSet {
                ranges: Ranges::One(range(input)?),
            });
        }
        let mut ranges = Vec::with_capacity(elements);
        for element in input.split(',') {
            ranges.push(range(element)?);
        }
        Ok(SeqSet {
            ranges: Ranges::Many(ranges),
        })
    }

    /// Whether the set has no element.
    pub fn is_empty(&self) -> bool {
        self.ranges().is_empty()
    }

    /// The elements, in the order written.
    pub fn ranges(&self) -> &[SeqRange] {
        self.ranges.as_slice()
    }

    /// Appends its text form to `out` (no JSON escaping needed: digits, `:`, `,` and `*`),
    /// without the formatting machinery: an update's JSON is written this way once per
    /// push, where `Display` through `fmt` was a measurable part of its cost.
    pub(crate) fn write_text(&self, out: &mut Vec<u8>) {
        let mut put = |piece: &str| out.extend_from_slice(piece.as_bytes());
        for (i, range) in self.ranges().iter().enumerate() {
            if i > 0 {
                put(",");
            }
            range.write_text(&mut put);
        }
    }

    /// The number, when the set is exactly one number (not `*`).
    pub fn as_single(&self) -> Option<u32> {
        match self.ranges() {
            [r] if r.start == r.end => match r.start {
                SeqNum::Value(n) => Some(n.get()),
                SeqNum::Star => None,
            },
            _ => None,
        }
    }

    /// Whether `n` is in the set, where `*` stands for `largest`.
    pub fn contains(&self, n: u32, largest: u32) -> bool {
        let value = |s: SeqNum| match s {
            SeqNum::Value(v) => v.get(),
            SeqNum::Star => largest,
        };
        self.ranges().iter().any(|r| {
            let (a, b) = (value(r.start), value(r.end));
            a.min(b) <= n && n <= a.max(b)
        })
    }
}

fn parse_num(input: &str, text: &str) -> Result<SeqNum, UpdateError> {
    match text.as_bytes() {
        [] => Err(UpdateError::seq_set(input, "empty element")),
        b"*" => Ok(SeqNum::Star),
        [b'0', ..] => Err(UpdateError::seq_set(
            input,
            "numbers start at 1 and have no leading zero",
        )),
        bytes if bytes.iter().all(u8::is_ascii_digit) => text
            .parse::<u32>()
            .ok()
            .and_then(NonZeroU32::new)
            .map(SeqNum::Value)
            .ok_or_else(|| UpdateError::seq_set(input, "number larger than 4294967295")),
        _ => Err(UpdateError::seq_set(
            input,
            "expected a number, '*', ':' or ','",
        )),
    }
}

impl FromStr for SeqSet {
    type Err = UpdateError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        SeqSet::parse(s)
    }
}

impl fmt::Display for SeqSet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, range) in self.ranges().iter().enumerate() {
            if i > 0 {
                f.write_str(",")?;
            }
            fmt::Display::fmt(range, f)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_prints_back() {
        for text in [
            "1",
            "1:5",
            "7:*",
            "*",
            "*:3",
            "5:1",
            "1:3,7,9:*",
            "4294967295",
            "1,1,1",
        ] {
            let set = SeqSet::parse(text).unwrap();
            assert_eq!(set.to_string(), text);
        }
    }

    #[test]
    fn empty_string_is_empty_set() {
        let set = SeqSet::parse("").unwrap();
        assert!(set.is_empty());
        assert_eq!(set.to_string(), "");
    }

    #[test]
    fn rejects_invalid() {
        for text in [
            "0",
            "0:5",
            "01",
            "4294967296",
            "99999999999999999999",
            ",",
            "1,",
            ",1",
            "1,,2",
            ":",
            "1:",
            ":1",
            "1:2:3",
            " 1",
            "1 ",
            "1, 2",
            "a",
            "-1",
            "+1",
            "1.5",
            "**",
            "1:**",
            "１",
        ] {
            assert!(SeqSet::parse(text).is_err(), "{text:?} should be rejected");
        }
    }

    #[test]
    fn rejects_overlong() {
        let text = "1,".repeat(4000) + "1";
        let err = SeqSet::parse(&text).unwrap_err();
        assert!(err.to_string().contains("7999"), "{err}");
    }

    #[test]
    fn error_names_the_input_and_the_reason() {
        let err = SeqSet::parse("1:x").unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("\"1:x\""), "{msg}");
        assert!(msg.contains("expected a number"), "{msg}");
    }

    #[test]
    fn single_and_contains() {
        assert_eq!(SeqSet::single(17).unwrap().as_single(), Some(17));
        assert!(SeqSet::single(0).is_err());
        assert_eq!(SeqSet::parse("1:2").unwrap().as_single(), None);
        assert_eq!(SeqSet::parse("*").unwrap().as_single(), None);
        let set = SeqSet::parse("1:3,7,9:*").unwrap();
        assert!(set.contains(2, 20));
        assert!(!set.contains(5, 20));
        assert!(set.contains(15, 20));
        assert!(!set.contains(21, 20));
        assert!(SeqSet::parse("5:2").unwrap().contains(3, 9));
    }
}
