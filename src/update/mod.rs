//! The update model: what changed in which mailbox, with the JSON form that go-imap-mess
//! (maddy's IMAP layer) exchanges.
//!
//! ```json
//! {"Type": 1, "Key": 42, "SeqSet": "17", "NewFlags": ["\\Seen", "$Junk"]}
//! ```
//!
//! The model and its validation are here; the JSON form (serde's, and the direct writer)
//! is in `json`.

use std::fmt;

use crate::error::UpdateError;
use crate::seqset::SeqSet;

mod json;

pub(crate) use json::{RawUpdate, object_only};

/// The most flags one update may carry.
pub const MAX_FLAGS: usize = 256;

/// The longest flag accepted, in bytes.
pub const MAX_FLAG_LEN: usize = 512;

/// What happened in the mailbox.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum UpdateKind {
    /// One or more messages arrived (`Type` 0).
    NewMessage,
    /// A message's flags changed (`Type` 1).
    FlagsChanged,
    /// One or more messages were removed (`Type` 2).
    Expunge,
    /// The mailbox itself was deleted (`Type` 3).
    MailboxDestroyed,
}

impl UpdateKind {
    /// The number used on the wire (`Type`).
    pub fn code(self) -> u8 {
        match self {
            UpdateKind::NewMessage => 0,
            UpdateKind::FlagsChanged => 1,
            UpdateKind::Expunge => 2,
            UpdateKind::MailboxDestroyed => 3,
        }
    }

    /// The kind for a wire number.
    pub fn from_code(code: u64) -> Result<Self, UpdateError> {
        match code {
            0 => Ok(UpdateKind::NewMessage),
            1 => Ok(UpdateKind::FlagsChanged),
            2 => Ok(UpdateKind::Expunge),
            3 => Ok(UpdateKind::MailboxDestroyed),
            other => Err(UpdateError::UnknownType(other)),
        }
    }

    /// A short lower-case name (`new`, `flags`, `expunge`, `destroyed`), as the CLI spells it.
    pub fn name(self) -> &'static str {
        match self {
            UpdateKind::NewMessage => "new",
            UpdateKind::FlagsChanged => "flags",
            UpdateKind::Expunge => "expunge",
            UpdateKind::MailboxDestroyed => "destroyed",
        }
    }
}

impl fmt::Display for UpdateKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Which mailbox: the key is a string or an unsigned 64-bit integer, as the mail store
/// chooses. Integers are exact over the whole `u64` range (also above 2⁵³).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum MailboxKey {
    /// A numeric key (JSON number).
    Id(u64),
    /// A textual key (JSON string).
    Name(String),
}

impl From<u64> for MailboxKey {
    fn from(id: u64) -> Self {
        MailboxKey::Id(id)
    }
}

impl From<&str> for MailboxKey {
    fn from(name: &str) -> Self {
        MailboxKey::Name(name.to_owned())
    }
}

impl From<String> for MailboxKey {
    fn from(name: String) -> Self {
        MailboxKey::Name(name)
    }
}

impl fmt::Display for MailboxKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            MailboxKey::Id(id) => write!(f, "{id}"),
            MailboxKey::Name(name) => write!(f, "{name:?}"),
        }
    }
}

/// An IMAP flag: a system flag (`\Seen`) or a keyword (`$Junk`).
///
/// Validated against the IMAP grammar: printable ASCII without spaces or the characters
/// `( ) { % * " ] \` (a single leading `\` marks a system flag), at most [`MAX_FLAG_LEN`]
/// bytes.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Flag(String);

impl Flag {
    /// Validates a flag.
    pub fn new(flag: impl Into<String>) -> Result<Self, UpdateError> {
        let flag = flag.into();
        validate_flag(&flag)?;
        Ok(Flag(flag))
    }

    /// The flag's text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

fn validate_flag(flag: &str) -> Result<(), UpdateError> {
    if flag.len() > MAX_FLAG_LEN {
        return Err(UpdateError::flag(flag, "longer than 512 bytes"));
    }
    let atom = flag.strip_prefix('\\').unwrap_or(flag);
    if atom.is_empty() {
        return Err(UpdateError::flag(flag, "empty"));
    }
    let is_atom_char = |b: u8| {
        (0x21..0x7f).contains(&b)
            && !matches!(b, b'(' | b')' | b'{' | b'%' | b'*' | b'"' | b'\\' | b']')
    };
    if !atom.bytes().all(is_atom_char) {
        return Err(UpdateError::flag(
            flag,
            "only printable ASCII without spaces or ( ) { % * \" ] \\ is allowed",
        ));
    }
    Ok(())
}

impl fmt::Display for Flag {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::str::FromStr for Flag {
    type Err = UpdateError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Flag::new(s)
    }
}

/// One mailbox update: what happened ([`UpdateKind`]), in which mailbox ([`MailboxKey`]), to
/// which messages ([`SeqSet`]) and, for flag changes, the flags after the change.
///
/// Build one with [`Update::new_message`], [`Update::flags_changed`], [`Update::expunge`] or
/// [`Update::mailbox_destroyed`]; every constructor validates, and so does decoding
/// ([`Update::from_json`], or serde's `Deserialize`).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Update {
    kind: UpdateKind,
    key: MailboxKey,
    seq_set: SeqSet,
    flags: Vec<Flag>,
}

impl Update {
    /// Messages arrived in a mailbox; `seq_set` names them (it may be empty).
    pub fn new_message(key: impl Into<MailboxKey>, seq_set: SeqSet) -> Self {
        Update {
            kind: UpdateKind::NewMessage,
            key: key.into(),
            seq_set,
            flags: Vec::new(),
        }
    }

    /// The flags of the message with this UID are now `flags`.
    pub fn flags_changed(
        key: impl Into<MailboxKey>,
        uid: u32,
        flags: impl IntoIterator<Item = Flag>,
    ) -> Result<Self, UpdateError> {
        Update::from_parts(
            UpdateKind::FlagsChanged,
            key.into(),
            SeqSet::single(uid)?,
            flags.into_iter().collect(),
        )
    }

    /// Messages were removed; `seq_set` names them.
    pub fn expunge(key: impl Into<MailboxKey>, seq_set: SeqSet) -> Self {
        Update {
            kind: UpdateKind::Expunge,
            key: key.into(),
            seq_set,
            flags: Vec::new(),
        }
    }

    /// The mailbox was deleted.
    pub fn mailbox_destroyed(key: impl Into<MailboxKey>) -> Self {
        Update {
            kind: UpdateKind::MailboxDestroyed,
            key: key.into(),
            seq_set: SeqSet::new(),
            flags: Vec::new(),
        }
    }

    /// Builds an update from its parts, checking the rules that tie them together: a flags
    /// update names exactly one UID; only new-message and flags updates carry flags.
    pub fn from_parts(
        kind: UpdateKind,
        key: MailboxKey,
        seq_set: SeqSet,
        flags: Vec<Flag>,
    ) -> Result<Self, UpdateError> {
        if flags.len() > MAX_FLAGS {
            return Err(UpdateError::TooManyFlags {
                count: flags.len(),
                limit: MAX_FLAGS,
            });
        }
        if kind == UpdateKind::FlagsChanged && seq_set.as_single().is_none() {
            return Err(UpdateError::FlagsNeedOneUid(seq_set.to_string()));
        }
        if !flags.is_empty() && !matches!(kind, UpdateKind::NewMessage | UpdateKind::FlagsChanged) {
            return Err(UpdateError::FlagsNotAllowed(kind.code()));
        }
        Ok(Update {
            kind,
            key,
            seq_set,
            flags,
        })
    }
    /// What happened.
    pub fn kind(&self) -> UpdateKind {
        self.kind
    }

    /// The mailbox.
    pub fn key(&self) -> &MailboxKey {
        &self.key
    }

    /// The messages concerned (a single UID for a flags update; may be empty).
    pub fn seq_set(&self) -> &SeqSet {
        &self.seq_set
    }

    /// The flags after the change (flags updates; may be empty).
    pub fn flags(&self) -> &[Flag] {
        &self.flags
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flag_validation() {
        for ok in [
            "\\Seen",
            "\\Answered",
            "$Junk",
            "NonJunk",
            "a.b-c_d",
            "$MDNSent",
        ] {
            assert!(Flag::new(ok).is_ok(), "{ok}");
        }
        for bad in [
            "",
            "\\",
            "with space",
            "(x",
            "x)",
            "{x",
            "%",
            "*",
            "\\*",
            "\"q",
            "x]",
            "é",
            "tab\t",
            "\\\\x",
        ] {
            assert!(Flag::new(bad).is_err(), "{bad:?}");
        }
        assert!(Flag::new("x".repeat(MAX_FLAG_LEN + 1)).is_err());
    }
}
