//! The update model: what changed in which mailbox, with the JSON form that go-imap-mess
//! (maddy's IMAP layer) exchanges.
//!
//! ```json
//! {"Type": 1, "Key": 42, "SeqSet": "17", "NewFlags": ["\\Seen", "$Junk"]}
//! ```

use std::borrow::Cow;
use std::fmt;

use serde::de::{self, Deserializer, Visitor};
use serde::ser::{SerializeStruct, Serializer};
use serde::{Deserialize, Serialize};

use crate::error::UpdateError;
use crate::seqset::SeqSet;

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

impl Serialize for MailboxKey {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        match self {
            MailboxKey::Id(id) => serializer.serialize_u64(*id),
            MailboxKey::Name(name) => serializer.serialize_str(name),
        }
    }
}

impl<'de> Deserialize<'de> for MailboxKey {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct KeyVisitor;

        impl Visitor<'_> for KeyVisitor {
            type Value = MailboxKey;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a string or an unsigned 64-bit integer")
            }

            fn visit_u64<E: de::Error>(self, v: u64) -> Result<MailboxKey, E> {
                Ok(MailboxKey::Id(v))
            }

            fn visit_i64<E: de::Error>(self, v: i64) -> Result<MailboxKey, E> {
                u64::try_from(v)
                    .map(MailboxKey::Id)
                    .map_err(|_| E::custom("a mailbox key cannot be negative"))
            }

            fn visit_f64<E: de::Error>(self, _: f64) -> Result<MailboxKey, E> {
                Err(E::custom(
                    "a numeric mailbox key must be an integer from 0 to 18446744073709551615",
                ))
            }

            fn visit_str<E: de::Error>(self, v: &str) -> Result<MailboxKey, E> {
                Ok(MailboxKey::Name(v.to_owned()))
            }

            fn visit_string<E: de::Error>(self, v: String) -> Result<MailboxKey, E> {
                Ok(MailboxKey::Name(v))
            }
        }

        deserializer.deserialize_any(KeyVisitor)
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

    /// Parses the JSON contract (`{"Type":1,"Key":42,"SeqSet":"17","NewFlags":["\\Seen"]}`).
    pub fn from_json(json: &str) -> Result<Self, UpdateError> {
        let raw: RawUpdate =
            serde_json::from_str(json).map_err(|e| UpdateError::Json(e.to_string()))?;
        raw.validate()
    }

    /// The JSON contract form, compact.
    pub fn to_json(&self) -> String {
        // Most updates are shorter (`{"Type":0,"Key":42,"SeqSet":"7"}`): no regrowing.
        let mut json = Vec::with_capacity(64);
        self.write_json(&mut json);
        String::from_utf8(json).expect("JSON is UTF-8")
    }

    /// Appends the JSON contract form, compact: what serde's `Serialize` writes with
    /// `serde_json`, byte for byte, written directly (once per push, it is a measurable
    /// part of a push's cost through serde).
    pub(crate) fn write_json(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(b"{\"Type\":");
        out.extend_from_slice(itoa::Buffer::new().format(self.kind.code()).as_bytes());
        out.extend_from_slice(b",\"Key\":");
        match &self.key {
            MailboxKey::Id(id) => out.extend_from_slice(itoa::Buffer::new().format(*id).as_bytes()),
            MailboxKey::Name(name) => write_json_str(out, name),
        }
        if !self.seq_set.is_empty() {
            out.extend_from_slice(b",\"SeqSet\":\"");
            self.seq_set.write_text(out);
            out.push(b'"');
        }
        if !self.flags.is_empty() {
            out.extend_from_slice(b",\"NewFlags\":[");
            for (i, flag) in self.flags.iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                write_json_str(out, flag.as_str());
            }
            out.push(b']');
        }
        out.push(b'}');
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

impl Serialize for Update {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let fields =
            2 + usize::from(!self.seq_set.is_empty()) + usize::from(!self.flags.is_empty());
        let mut s = serializer.serialize_struct("Update", fields)?;
        s.serialize_field("Type", &self.kind.code())?;
        s.serialize_field("Key", &self.key)?;
        if !self.seq_set.is_empty() {
            s.serialize_field("SeqSet", &Text(&self.seq_set))?;
        }
        if !self.flags.is_empty() {
            let flags: Vec<&str> = self.flags.iter().map(Flag::as_str).collect();
            s.serialize_field("NewFlags", &flags)?;
        }
        s.end()
    }
}

/// Appends a JSON string, escaped as `serde_json` escapes it.
fn write_json_str(out: &mut Vec<u8>, text: &str) {
    serde_json::to_writer(out, text).expect("a string always serializes into a buffer");
}

/// Serializes a value as the string its `Display` writes, without an intermediate `String`.
struct Text<'a, T>(&'a T);

impl<T: fmt::Display> Serialize for Text<'_, T> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self.0)
    }
}

impl<'de> Deserialize<'de> for Update {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        RawUpdate::deserialize(deserializer)?
            .validate()
            .map_err(de::Error::custom)
    }
}

/// The JSON shape before validation. Unknown fields are ignored (a newer Go peer may add
/// some); `null` stands for empty, as Go writes a nil slice.
/// The sequence set is borrowed from the payload when it needs no unescaping (it is
/// parsed, then dropped: no allocation for it).
#[derive(Deserialize)]
#[cfg_attr(test, derive(Debug, PartialEq))]
pub(crate) struct RawUpdate<'a> {
    #[serde(rename = "Type")]
    kind: u64,
    #[serde(rename = "Key")]
    key: MailboxKey,
    #[serde(rename = "SeqSet", default, borrow, deserialize_with = "borrowed")]
    seq_set: Option<Cow<'a, str>>,
    #[serde(rename = "NewFlags", default)]
    flags: Option<Vec<String>>,
}

/// An optional string, borrowed when it can be (serde borrows a `Cow` only when it is not
/// inside an `Option`).
fn borrowed<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Option<Cow<'de, str>>, D::Error> {
    #[derive(Deserialize)]
    struct Borrowed<'a>(#[serde(borrow)] Cow<'a, str>);
    Ok(Option::<Borrowed<'de>>::deserialize(deserializer)?.map(|b| b.0))
}

impl<'a> RawUpdate<'a> {
    /// An update with a numeric key and no flags, as read by a reader other than serde.
    pub(crate) fn plain(kind: u64, key: u64, seq_set: Option<&'a str>) -> Self {
        RawUpdate {
            kind,
            key: MailboxKey::Id(key),
            seq_set: seq_set.map(Cow::Borrowed),
            flags: None,
        }
    }

    /// The sequence set as written, if any.
    pub(crate) fn seq_set(&self) -> Option<&str> {
        self.seq_set.as_deref()
    }

    /// The flags as written, if any.
    pub(crate) fn flags(&self) -> Option<&[String]> {
        self.flags.as_deref()
    }

    pub(crate) fn validate(self) -> Result<Update, UpdateError> {
        let kind = UpdateKind::from_code(self.kind)?;
        let seq_set = SeqSet::parse(self.seq_set.as_deref().unwrap_or(""))?;
        let raw_flags = self.flags.unwrap_or_default();
        if raw_flags.len() > MAX_FLAGS {
            return Err(UpdateError::TooManyFlags {
                count: raw_flags.len(),
                limit: MAX_FLAGS,
            });
        }
        let flags = raw_flags
            .into_iter()
            .map(Flag::new)
            .collect::<Result<Vec<_>, _>>()?;
        Update::from_parts(kind, self.key, seq_set, flags)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn flags(list: &[&str]) -> Vec<Flag> {
        list.iter().map(|f| Flag::new(*f).unwrap()).collect()
    }

    #[test]
    fn contract_example_round_trips() {
        let json = r#"{"Type":1,"Key":42,"SeqSet":"17","NewFlags":["\\Seen","$Junk"]}"#;
        let update = Update::from_json(json).unwrap();
        assert_eq!(update.kind(), UpdateKind::FlagsChanged);
        assert_eq!(update.key(), &MailboxKey::Id(42));
        assert_eq!(update.seq_set().as_single(), Some(17));
        assert_eq!(update.flags(), flags(&["\\Seen", "$Junk"]).as_slice());
        assert_eq!(update.to_json(), json);
    }

    #[test]
    fn every_kind_round_trips_with_both_key_types() {
        let keys = [
            MailboxKey::Id(0),
            MailboxKey::Id(7),
            MailboxKey::Name("INBOX/Archive \"2024\" ☃".into()),
            MailboxKey::Name(String::new()),
        ];
        for key in keys {
            let updates = [
                Update::new_message(key.clone(), SeqSet::parse("1:3,7,9:*").unwrap()),
                Update::new_message(key.clone(), SeqSet::new()),
                Update::flags_changed(key.clone(), 17, flags(&["\\Seen", "$Junk"])).unwrap(),
                Update::flags_changed(key.clone(), 17, Vec::new()).unwrap(),
                Update::expunge(key.clone(), SeqSet::parse("4").unwrap()),
                Update::mailbox_destroyed(key.clone()),
            ];
            for update in updates {
                let json = update.to_json();
                assert_eq!(Update::from_json(&json).unwrap(), update, "{json}");
                let via_serde: Update = serde_json::from_str(&json).unwrap();
                assert_eq!(via_serde, update);
            }
        }
    }

    #[test]
    fn the_direct_json_writer_writes_what_serde_writes() {
        let keys = [
            MailboxKey::Id(0),
            MailboxKey::Id(u64::MAX),
            MailboxKey::Name("INBOX/Archive \"2024\" ☃ \\ \u{1} \u{7f} \n\t</script>".into()),
            MailboxKey::Name(String::new()),
        ];
        let sets = ["1", "4294967295", "1:3,7,9:*", "*", "*:3", "5:1", "1,1,1"];
        for key in keys {
            let mut updates = vec![
                Update::new_message(key.clone(), SeqSet::new()),
                Update::flags_changed(key.clone(), 17, flags(&["\\Seen", "$Junk", "a~b"])).unwrap(),
                Update::flags_changed(key.clone(), u32::MAX, Vec::new()).unwrap(),
                Update::mailbox_destroyed(key.clone()),
            ];
            for set in sets {
                updates.push(Update::new_message(
                    key.clone(),
                    SeqSet::parse(set).unwrap(),
                ));
                updates.push(Update::expunge(key.clone(), SeqSet::parse(set).unwrap()));
            }
            for update in updates {
                let via_serde = serde_json::to_string(&update).unwrap();
                assert_eq!(update.to_json(), via_serde);
                let mut appended = b"x".to_vec();
                update.write_json(&mut appended);
                assert_eq!(&appended[1..], via_serde.as_bytes());
            }
        }
    }

    #[test]
    fn empty_fields_are_omitted() {
        let json = Update::mailbox_destroyed(5).to_json();
        assert_eq!(json, r#"{"Type":3,"Key":5}"#);
        let json = Update::new_message("a", SeqSet::parse("3").unwrap()).to_json();
        assert_eq!(json, r#"{"Type":0,"Key":"a","SeqSet":"3"}"#);
    }

    #[test]
    fn u64_keys_above_2_pow_53_are_exact() {
        for id in [(1u64 << 53) + 1, u64::MAX - 1, u64::MAX] {
            let json = format!(r#"{{"Type":3,"Key":{id}}}"#);
            let update = Update::from_json(&json).unwrap();
            assert_eq!(update.key(), &MailboxKey::Id(id));
            assert_eq!(update.to_json(), json);
        }
    }

    #[test]
    fn null_and_absent_optional_fields_mean_empty() {
        let a = Update::from_json(r#"{"Type":0,"Key":1,"SeqSet":null,"NewFlags":null}"#).unwrap();
        let b = Update::from_json(r#"{"Type":0,"Key":1}"#).unwrap();
        assert_eq!(a, b);
        assert!(a.seq_set().is_empty());
    }

    #[test]
    fn unknown_fields_are_ignored() {
        let update = Update::from_json(r#"{"Type":2,"Key":1,"SeqSet":"5","Extra":[1,2]}"#).unwrap();
        assert_eq!(update.kind(), UpdateKind::Expunge);
    }

    #[test]
    fn rejects_invalid_updates_with_typed_errors() {
        type Check = fn(&UpdateError) -> bool;
        let cases: &[(&str, Check)] = &[
            (r#"{"Type":7,"Key":1}"#, |e| {
                matches!(e, UpdateError::UnknownType(7))
            }),
            (r#"{"Type":-1,"Key":1}"#, |e| {
                matches!(e, UpdateError::Json(_))
            }),
            (r#"{"Type":0,"Key":-5}"#, |e| {
                matches!(e, UpdateError::Json(_))
            }),
            (r#"{"Type":0,"Key":1.5}"#, |e| {
                matches!(e, UpdateError::Json(_))
            }),
            (r#"{"Type":0,"Key":18446744073709551616}"#, |e| {
                matches!(e, UpdateError::Json(_))
            }),
            (r#"{"Type":0,"Key":[1]}"#, |e| {
                matches!(e, UpdateError::Json(_))
            }),
            (r#"{"Type":0}"#, |e| matches!(e, UpdateError::Json(_))),
            (r#"{"Key":1}"#, |e| matches!(e, UpdateError::Json(_))),
            (r#"{"Type":0,"Key":1,"SeqSet":"1:x"}"#, |e| {
                matches!(e, UpdateError::SeqSet { .. })
            }),
            (r#"{"Type":0,"Key":1,"SeqSet":17}"#, |e| {
                matches!(e, UpdateError::Json(_))
            }),
            (r#"{"Type":1,"Key":1,"SeqSet":"1:5"}"#, |e| {
                matches!(e, UpdateError::FlagsNeedOneUid(_))
            }),
            (r#"{"Type":1,"Key":1}"#, |e| {
                matches!(e, UpdateError::FlagsNeedOneUid(_))
            }),
            (r#"{"Type":1,"Key":1,"SeqSet":"*"}"#, |e| {
                matches!(e, UpdateError::FlagsNeedOneUid(_))
            }),
            (
                r#"{"Type":1,"Key":1,"SeqSet":"3","NewFlags":["bad flag"]}"#,
                |e| matches!(e, UpdateError::Flag { .. }),
            ),
            (r#"{"Type":1,"Key":1,"SeqSet":"3","NewFlags":[""]}"#, |e| {
                matches!(e, UpdateError::Flag { .. })
            }),
            (
                r#"{"Type":1,"Key":1,"SeqSet":"3","NewFlags":["\\"]}"#,
                |e| matches!(e, UpdateError::Flag { .. }),
            ),
            (
                r#"{"Type":1,"Key":1,"SeqSet":"3","NewFlags":["\\\\Seen"]}"#,
                |e| matches!(e, UpdateError::Flag { .. }),
            ),
            (
                r#"{"Type":2,"Key":1,"SeqSet":"3","NewFlags":["\\Seen"]}"#,
                |e| matches!(e, UpdateError::FlagsNotAllowed(2)),
            ),
            ("[]", |e| matches!(e, UpdateError::Json(_))),
            ("not json", |e| matches!(e, UpdateError::Json(_))),
        ];
        for (json, check) in cases {
            let err = Update::from_json(json).unwrap_err();
            assert!(check(&err), "{json}: unexpected error {err:?}");
        }
    }

    #[test]
    fn too_many_flags_are_rejected() {
        let many: Vec<String> = (0..=MAX_FLAGS).map(|i| format!("\"k{i}\"")).collect();
        let json = format!(
            r#"{{"Type":1,"Key":1,"SeqSet":"3","NewFlags":[{}]}}"#,
            many.join(",")
        );
        assert!(matches!(
            Update::from_json(&json),
            Err(UpdateError::TooManyFlags { .. })
        ));
    }

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
