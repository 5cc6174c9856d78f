//! Who sent an envelope: one pipe instance, named by 128 random bits.

use std::fmt;

use crate::error::{DecodeError, excerpt};

/// The longest origin accepted from the wire, in bytes.
const MAX_ORIGIN_LEN: usize = 64;

/// Who sent an envelope: one pipe instance.
///
/// A pipe's origin is 128 random bits, written as 32 hex digits, drawn when the pipe is
/// created: two pipes in one process differ, and so do two processes that share an OS PID
/// on different hosts (every container is PID 1). Legacy (maddy) payloads carry their own
/// sender id, kept here as it came.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Origin(String);

impl Origin {
    /// A fresh random origin.
    pub fn random() -> Self {
        Origin(format!("{:032x}", rand::random::<u128>()))
    }

    /// An origin from the wire: 1 to 64 printable ASCII characters.
    pub fn parse(text: &str) -> Result<Self, DecodeError> {
        Self::check(text)?;
        Ok(Origin(text.to_owned()))
    }

    /// The same, keeping the string it is given.
    pub(crate) fn parse_owned(text: String) -> Result<Self, DecodeError> {
        Self::check(&text)?;
        Ok(Origin(text))
    }

    fn check(text: &str) -> Result<(), DecodeError> {
        let printable = text.bytes().all(|b| b.is_ascii_graphic());
        if text.is_empty() || text.len() > MAX_ORIGIN_LEN || !printable {
            return Err(DecodeError::Malformed(format!(
                "origin {:?} is not 1 to 64 printable ASCII characters",
                excerpt(text)
            )));
        }
        Ok(())
    }

    /// The origin's text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Origin({})", self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn origins_differ() {
        assert_ne!(Origin::random(), Origin::random());
        assert_eq!(Origin::random().as_str().len(), 32);
    }

    #[test]
    fn wire_origins_are_printable_ascii() {
        assert!(Origin::parse("4242-0xc000010000").is_ok());
        assert!(Origin::parse("").is_err());
        assert!(Origin::parse("a b").is_err());
        assert!(Origin::parse(&"x".repeat(65)).is_err());
    }
}
