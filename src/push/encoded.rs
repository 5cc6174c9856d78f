//! Encoded updates: their JSON one after another in one buffer, and where each ends. A
//! push encodes into a buffer of its thread's, and a queued push's bytes are copied into
//! the queue's: no allocation per push, and nothing allocated on one thread is freed on
//! another (which glibc's allocator does slowly, behind a lock).

use std::cell::RefCell;
use std::ops::Range;

use crate::error::Error;

/// A scratch buffer that grew past this is let go after use.
const KEPT_SCRATCH_BYTES: usize = 64 * 1024;

/// Encoded updates, in order.
#[derive(Debug, Default)]
pub(super) struct Encoded {
    /// Each update's encoded form, one after another: JSON (and in the maddy layout a NUL
    /// and a channel name), so UTF-8.
    text: Vec<u8>,
    /// Where each update ends in `text`.
    ends: Vec<usize>,
    /// Updates removed from the front and not yet dropped from `text` and `ends` (they are,
    /// once they are most of the buffer: removing a batch from the front of a long queue
    /// does not move all that is queued behind it).
    head: usize,
}

thread_local! {
    static SCRATCH: RefCell<Encoded> = RefCell::new(Encoded::default());
}

impl Encoded {
    /// Runs `f` on this thread's scratch buffer, emptied first. `f` must not await (it
    /// cannot: it is not async) nor call `with_scratch` again.
    pub(super) fn with_scratch<T>(f: impl FnOnce(&mut Encoded) -> T) -> T {
        SCRATCH.with_borrow_mut(|scratch| {
            scratch.clear();
            let out = f(scratch);
            if scratch.text.capacity() > KEPT_SCRATCH_BYTES {
                *scratch = Encoded::default();
            }
            out
        })
    }

    pub(super) fn with_capacity(updates: usize, bytes: usize) -> Self {
        Encoded {
            text: Vec::with_capacity(bytes),
            ends: Vec::with_capacity(updates),
            head: 0,
        }
    }

    /// Empties it, keeping its capacity.
    pub(super) fn clear(&mut self) {
        self.text.clear();
        self.ends.clear();
        self.head = 0;
    }

    /// Appends one update, which `write` writes as UTF-8 at the end of the buffer it is
    /// given; when it fails, nothing is appended.
    pub(super) fn push_with(
        &mut self,
        write: impl FnOnce(&mut Vec<u8>) -> Result<(), Error>,
    ) -> Result<(), Error> {
        let start = self.text.len();
        match write(&mut self.text) {
            Ok(()) => {
                debug_assert!(std::str::from_utf8(&self.text[start..]).is_ok());
                self.ends.push(self.text.len());
                Ok(())
            }
            Err(e) => {
                self.text.truncate(start);
                Err(e)
            }
        }
    }

    /// How many updates.
    pub(super) fn len(&self) -> usize {
        self.ends.len() - self.head
    }

    /// Where the first update starts in `text`.
    fn start(&self) -> usize {
        self.head.checked_sub(1).map_or(0, |i| self.ends[i])
    }

    /// Their encoded bytes.
    pub(super) fn bytes(&self) -> usize {
        self.text.len() - self.start()
    }

    /// Each update's encoded form, in order.
    pub(super) fn iter(&self) -> impl Iterator<Item = &str> + Clone {
        let base = self.start();
        // Checked once for all of them (each was written as UTF-8).
        let text = std::str::from_utf8(&self.text[base..]).expect("updates are encoded as UTF-8");
        self.ends[self.head..].iter().scan(0, move |start, &end| {
            let update = &text[*start..end - base];
            *start = end - base;
            Some(update)
        })
    }

    /// Where updates `range` (by index) are in `text`.
    fn span(&self, range: &Range<usize>) -> Range<usize> {
        if range.is_empty() {
            return 0..0;
        }
        let (first, last) = (self.head + range.start, self.head + range.end - 1);
        let start = first.checked_sub(1).map_or(0, |i| self.ends[i]);
        start..self.ends[last]
    }

    /// The encoded bytes of updates `range` (by index).
    pub(super) fn bytes_of(&self, range: Range<usize>) -> usize {
        self.span(&range).len()
    }

    /// Appends updates `range` (by index) of `other`.
    pub(super) fn extend_from(&mut self, other: &Encoded, range: Range<usize>) {
        let bytes = other.span(&range);
        let shift = self.text.len() as isize - bytes.start as isize;
        self.text.extend_from_slice(&other.text[bytes]);
        let ends = &other.ends[other.head + range.start..other.head + range.end];
        self.ends
            .extend(ends.iter().map(|&end| end.wrapping_add_signed(shift)));
    }

    /// Appends all of `other`.
    pub(super) fn append(&mut self, other: &Encoded) {
        self.extend_from(other, 0..other.len());
    }

    /// Removes the first `n` updates.
    pub(super) fn remove_front(&mut self, n: usize) {
        if n == 0 {
            return;
        }
        if n >= self.len() {
            self.clear();
            return;
        }
        self.head += n;
        let dead = self.start();
        if dead >= self.text.len() / 2 {
            self.text.drain(..dead);
            self.ends.drain(..self.head);
            for end in &mut self.ends {
                *end -= dead;
            }
            self.head = 0;
        }
    }

    /// An owned copy, no larger than it needs to be.
    pub(super) fn to_owned_exact(&self) -> Encoded {
        let mut copy = Encoded::with_capacity(self.len(), self.bytes());
        copy.append(self);
        copy
    }

    /// Lets go of spare capacity beyond `bytes` (after a burst).
    pub(super) fn shrink_to(&mut self, bytes: usize) {
        if self.text.capacity() > bytes.saturating_mul(2) {
            self.text.shrink_to(bytes);
            self.ends.shrink_to(bytes / 16);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn encoded(items: &[&str]) -> Encoded {
        let mut e = Encoded::default();
        for item in items {
            e.push_with(|out| {
                out.extend_from_slice(item.as_bytes());
                Ok(())
            })
            .unwrap();
        }
        e
    }

    fn items(e: &Encoded) -> Vec<&str> {
        e.iter().collect()
    }

    #[test]
    fn updates_keep_their_bounds_through_copies_and_removals() {
        let mut e = encoded(&["a", "bb", "", "ccc", "é"]);
        assert_eq!(items(&e), ["a", "bb", "", "ccc", "é"]);
        assert_eq!((e.len(), e.bytes()), (5, 8));
        let mut part = Encoded::default();
        part.extend_from(&e, 1..4);
        part.extend_from(&e, 0..1);
        part.extend_from(&e, 2..2);
        assert_eq!(items(&part), ["bb", "", "ccc", "a"]);
        e.remove_front(2);
        assert_eq!(items(&e), ["", "ccc", "é"]);
        assert_eq!((e.len(), e.bytes()), (3, 5));
        // Copies from a buffer with updates removed from its front.
        let mut copy = Encoded::default();
        copy.extend_from(&e, 1..3);
        assert_eq!(items(&copy), ["ccc", "é"]);
        assert_eq!(e.bytes_of(1..2), 3);
        e.push_with(|out| {
            out.extend_from_slice(b"dd");
            Ok(())
        })
        .unwrap();
        assert_eq!(items(&e), ["", "ccc", "é", "dd"]);
        e.remove_front(1);
        assert_eq!(items(&e), ["ccc", "é", "dd"]);
        assert_eq!(items(&e.to_owned_exact()), ["ccc", "é", "dd"]);
        e.remove_front(3);
        assert_eq!(e.len(), 0);
        assert_eq!(e.bytes(), 0);
    }

    #[test]
    fn a_failed_write_appends_nothing() {
        let mut e = encoded(&["a"]);
        let err = e.push_with(|out| {
            out.extend_from_slice(b"half");
            Err(Error::Closed)
        });
        assert!(err.is_err());
        assert_eq!(items(&e), ["a"]);
        assert_eq!(e.bytes(), 1);
    }

    #[test]
    fn the_scratch_buffer_starts_empty_each_time() {
        Encoded::with_scratch(|s| s.append(&encoded(&["x", "y"])));
        let seen = Encoded::with_scratch(|s| s.len());
        assert_eq!(seen, 0);
    }
}
