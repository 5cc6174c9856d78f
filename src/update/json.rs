//! The JSON contract form of an update, as go-imap-mess (maddy's IMAP layer) exchanges it:
//! serde's `Serialize` and `Deserialize`, and the direct writer the push path uses.

use std::borrow::Cow;
use std::fmt;

use serde::de::{self, Deserializer, Visitor};
use serde::ser::{SerializeStruct, Serializer};
use serde::{Deserialize, Serialize};

use super::{Flag, MAX_FLAGS, MailboxKey, Update, UpdateKind};
use crate::error::UpdateError;
use crate::seqset::SeqSet;

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

impl Update {
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

/// Implements `Deserialize` for a struct (with one lifetime, `'a`) whose derived
/// implementation is generated with `#[serde(remote = "Self")]`, taking a JSON object only:
/// serde's derive also takes an array of the fields in order, a form the wire format does
/// not define and other implementations refuse (`[3,5]` would read as
/// `{"Type":3,"Key":5}`).
macro_rules! object_only {
    ($ty:ident, $what:literal) => {
        impl<'de: 'a, 'a> serde::Deserialize<'de> for $ty<'a> {
            fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
                struct ObjectOnly<'a>(std::marker::PhantomData<$ty<'a>>);
                impl<'de: 'a, 'a> serde::de::Visitor<'de> for ObjectOnly<'a> {
                    type Value = $ty<'a>;
                    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                        f.write_str($what)
                    }
                    fn visit_map<A: serde::de::MapAccess<'de>>(
                        self,
                        map: A,
                    ) -> Result<Self::Value, A::Error> {
                        $ty::deserialize(serde::de::value::MapAccessDeserializer::new(map))
                    }
                }
                deserializer.deserialize_map(ObjectOnly(std::marker::PhantomData))
            }
        }
    };
}
pub(crate) use object_only;

/// The JSON shape before validation. Unknown fields are ignored (a newer Go peer may add
/// some); `null` stands for empty, as Go writes a nil slice. A JSON object only (see
/// [`object_only`]).
/// The sequence set is borrowed from the payload when it needs no unescaping (it is
/// parsed, then dropped: no allocation for it).
#[derive(Deserialize)]
#[serde(remote = "Self")]
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

object_only!(RawUpdate, "an update object");

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
}
