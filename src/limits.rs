//! Bounds on what one payload may ask of a listener. A payload arriving on a channel is
//! untrusted (any role that can connect may `NOTIFY`), so a listener checks these before it
//! builds anything from it; each violation is a typed [`DecodeError::OverLimit`], counted
//! as `over_limit`.

use crate::error::{DecodeError, Limit};
use crate::seqset::MAX_SEQ_SET_LEN;
use crate::update::{MAX_FLAG_LEN, MAX_FLAGS, RawUpdate, Update};

/// The default bound on updates in one envelope. A full notification (7999 bytes) holds at
/// most about 420 of the smallest updates, so this never refuses what a pipe sends.
pub const DEFAULT_MAX_UPDATES: usize = 1024;

/// The default bound on nesting depth. A version 1 envelope nests 4 deep (envelope, update
/// list, update, flag list); the rest leaves room for fields a newer version may add.
pub const DEFAULT_MAX_DEPTH: usize = 8;

/// What a payload may ask for: updates per envelope, flags per update, the length of a
/// sequence set and of a flag, and how deep its JSON nests.
///
/// The defaults accept everything a pipe sends. Flags and sequence sets can only be bounded
/// more tightly than [`MAX_FLAGS`], [`MAX_FLAG_LEN`] and [`MAX_SEQ_SET_LEN`], which no
/// update may exceed. The payload itself is bounded first: 7999 bytes for a notification,
/// 1 MiB for a durable log entry.
///
/// ```
/// let limits = updatepipe::Limits::default().with_max_updates(64).with_max_flags(16);
/// assert_eq!(limits.max_updates(), 64);
/// ```
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Limits {
    max_updates: usize,
    max_flags: usize,
    max_flag_len: usize,
    max_seq_set_len: usize,
    max_depth: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_updates: DEFAULT_MAX_UPDATES,
            max_flags: MAX_FLAGS,
            max_flag_len: MAX_FLAG_LEN,
            max_seq_set_len: MAX_SEQ_SET_LEN,
            max_depth: DEFAULT_MAX_DEPTH,
        }
    }
}

impl Limits {
    /// Updates in one envelope (default 1024).
    pub fn with_max_updates(mut self, n: usize) -> Self {
        self.max_updates = n;
        self
    }

    /// Flags on one update (default and most [`MAX_FLAGS`]).
    pub fn with_max_flags(mut self, n: usize) -> Self {
        self.max_flags = n.min(MAX_FLAGS);
        self
    }

    /// Bytes in one flag (default and most [`MAX_FLAG_LEN`]).
    pub fn with_max_flag_len(mut self, n: usize) -> Self {
        self.max_flag_len = n.min(MAX_FLAG_LEN);
        self
    }

    /// Bytes in one sequence set (default and most [`MAX_SEQ_SET_LEN`]).
    pub fn with_max_seq_set_len(mut self, n: usize) -> Self {
        self.max_seq_set_len = n.min(MAX_SEQ_SET_LEN);
        self
    }

    /// How deep the payload's JSON may nest (default 8, at least 4: a version 1 envelope
    /// needs that).
    pub fn with_max_depth(mut self, n: usize) -> Self {
        self.max_depth = n.max(4);
        self
    }

    /// Updates in one envelope.
    pub fn max_updates(&self) -> usize {
        self.max_updates
    }

    /// Flags on one update.
    pub fn max_flags(&self) -> usize {
        self.max_flags
    }

    /// Bytes in one flag.
    pub fn max_flag_len(&self) -> usize {
        self.max_flag_len
    }

    /// Bytes in one sequence set.
    pub fn max_seq_set_len(&self) -> usize {
        self.max_seq_set_len
    }

    /// Nesting depth of the payload's JSON.
    pub fn max_depth(&self) -> usize {
        self.max_depth
    }

    /// Admits an update decoded from an untrusted payload: checks what it asks for against
    /// these bounds before the update is built, then validates it.
    pub(crate) fn admit(&self, raw: RawUpdate<'_>) -> Result<Update, DecodeError> {
        let seq_set_len = raw.seq_set().map_or(0, str::len);
        Limits::check(Limit::SeqSetLength, seq_set_len, self.max_seq_set_len)?;
        if let Some(flags) = raw.flags() {
            Limits::check(Limit::Flags, flags.len(), self.max_flags)?;
            let longest = flags.iter().map(String::len).max().unwrap_or(0);
            Limits::check(Limit::FlagLength, longest, self.max_flag_len)?;
        }
        Ok(raw.validate()?)
    }

    /// `Err` when `found` exceeds `max` for `limit`.
    pub(crate) fn check(limit: Limit, found: usize, max: usize) -> Result<(), DecodeError> {
        if found > max {
            return Err(DecodeError::OverLimit { limit, found, max });
        }
        Ok(())
    }

    /// Checks how deep the JSON text nests, in one pass and before any parsing: a deeply
    /// nested payload is refused without building anything from it. Brackets inside
    /// strings do not count.
    pub(crate) fn check_depth(&self, json: &str) -> Result<(), DecodeError> {
        let mut depth = 0usize;
        let mut in_string = false;
        let mut escaped = false;
        for &b in json.as_bytes() {
            if in_string {
                match (escaped, b) {
                    (true, _) => escaped = false,
                    (false, b'\\') => escaped = true,
                    (false, b'"') => in_string = false,
                    _ => {}
                }
                continue;
            }
            match b {
                b'"' => in_string = true,
                b'{' | b'[' => {
                    depth += 1;
                    if depth > self.max_depth {
                        // Stop here: it may go much deeper.
                        return Limits::check(Limit::Depth, depth, self.max_depth);
                    }
                }
                b'}' | b']' => depth = depth.saturating_sub(1),
                _ => {}
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn over(limit: Limit, found: usize, max: usize) -> Result<(), DecodeError> {
        Err(DecodeError::OverLimit { limit, found, max })
    }

    #[test]
    fn depth_counts_brackets_outside_strings() {
        let limits = Limits::default().with_max_depth(4);
        limits
            .check_depth(r#"{"u":[{"NewFlags":["\\Seen"]}]}"#)
            .unwrap();
        limits.check_depth(r#"{"k":"[[[[[[[[{{{{\"]]]"}"#).unwrap();
        assert_eq!(
            limits.check_depth(r#"{"u":[{"x":[[1]]}]}"#),
            over(Limit::Depth, 5, 4)
        );
        let deep = "[".repeat(100_000);
        assert_eq!(limits.check_depth(&deep), over(Limit::Depth, 5, 4));
    }

    #[test]
    fn bounds_cannot_exceed_what_an_update_may_hold() {
        let limits = Limits::default()
            .with_max_flags(10_000)
            .with_max_flag_len(10_000)
            .with_max_seq_set_len(100_000)
            .with_max_depth(1);
        assert_eq!(limits.max_flags(), MAX_FLAGS);
        assert_eq!(limits.max_flag_len(), MAX_FLAG_LEN);
        assert_eq!(limits.max_seq_set_len(), MAX_SEQ_SET_LEN);
        assert_eq!(limits.max_depth(), 4);
    }
}
