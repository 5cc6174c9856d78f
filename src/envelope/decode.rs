//! Reading payloads: the version 1 envelope and maddy's legacy form, each within the
//! listener's [`Limits`], with typed errors.

use std::time::{Duration, UNIX_EPOCH};

use serde::Deserialize;

use super::wire_in::WireIn;
use super::{ENVELOPE_VERSION, Envelope, Marks, WireFormat, canonical};
use crate::error::{DecodeError, Limit};
use crate::limits::Limits;
use crate::origin::Origin;
use crate::update::RawUpdate;

#[derive(Deserialize)]
struct VersionProbe {
    v: Option<u64>,
}

pub(super) fn decode_v1(payload: &str, limits: &Limits) -> Result<Envelope, DecodeError> {
    // The form this crate writes is read without serde (and nests within any depth
    // limit); any other goes through the depth check and serde.
    let read = match canonical::read(payload) {
        Some(wire) => Ok(wire),
        None => {
            limits.check_depth(payload)?;
            serde_json::from_str::<WireIn>(payload)
        }
    };
    let wire = match read {
        Ok(wire) => wire,
        Err(e) => {
            // A future version may be shaped differently: say so rather than "malformed".
            if let Ok(VersionProbe { v: Some(v) }) = serde_json::from_str(payload)
                && v != ENVELOPE_VERSION
            {
                return Err(DecodeError::UnknownVersion(v));
            }
            return Err(DecodeError::Malformed(e.to_string()));
        }
    };
    if wire.v != ENVELOPE_VERSION {
        return Err(DecodeError::UnknownVersion(wire.v));
    }
    let origin = Origin::parse_owned(wire.o)?;
    Limits::check(Limit::Updates, wire.u.len(), limits.max_updates())?;
    let updates = wire
        .u
        .into_iter()
        .map(|raw| limits.admit(raw))
        .collect::<Result<Vec<_>, _>>()?;
    Ok(Envelope {
        format: WireFormat::V1,
        origin,
        pid: wire.p,
        seq: Some(wire.s),
        updates,
        marks: Marks {
            transactional: wire.t,
            durable: wire.d,
        },
        reference: wire.r,
        heartbeat: wire.h,
        sent_at: wire
            .w
            .and_then(|ms| UNIX_EPOCH.checked_add(Duration::from_millis(ms))),
    })
}

pub(super) fn decode_legacy(payload: &str, limits: &Limits) -> Result<Envelope, DecodeError> {
    let body = payload.strip_suffix('\n').unwrap_or(payload);
    let (sender, json) = body.split_once(';').ok_or(DecodeError::Unrecognized)?;
    if !json.starts_with('{') {
        return Err(DecodeError::Unrecognized);
    }
    let origin = Origin::parse(sender)?;
    limits.check_depth(json)?;
    let json = json.replace('\u{10}', ";");
    // As maddy does: one JSON value, and whatever follows it is ignored.
    let raw: RawUpdate = match serde_json::Deserializer::from_str(&json).into_iter().next() {
        Some(Ok(raw)) => raw,
        Some(Err(e)) => return Err(DecodeError::Malformed(e.to_string())),
        None => return Err(DecodeError::Malformed("no JSON value".into())),
    };
    Ok(Envelope {
        format: WireFormat::Legacy,
        origin,
        pid: None,
        seq: None,
        updates: vec![limits.admit(raw)?],
        marks: Marks::default(),
        reference: false,
        heartbeat: false,
        sent_at: None,
    })
}

#[cfg(test)]
mod tests {
    use crate::envelope::Envelope;
    use crate::error::{DecodeError, UpdateError};

    #[test]
    fn rejects_bad_payloads_with_typed_errors() {
        use DecodeError as D;
        type Check = fn(&DecodeError) -> bool;
        let cases: &[(&str, Check)] = &[
            ("", |e| *e == D::Unrecognized),
            ("garbage", |e| *e == D::Unrecognized),
            ("\u{0}\u{1}", |e| *e == D::Unrecognized),
            ("id;not json", |e| *e == D::Unrecognized),
            ("{", |e| matches!(e, D::Malformed(_))),
            ("{}", |e| matches!(e, D::Malformed(_))),
            (r#"{"v":2,"x":[]}"#, |e| *e == D::UnknownVersion(2)),
            (r#"{"v":2,"o":"a","s":1,"u":[]}"#, |e| {
                *e == D::UnknownVersion(2)
            }),
            (r#"{"v":1,"o":"a","s":1}"#, |e| matches!(e, D::Malformed(_))),
            (r#"{"v":1,"o":"","s":1,"u":[]}"#, |e| {
                matches!(e, D::Malformed(_))
            }),
            (r#"{"v":1,"o":"a b","s":1,"u":[]}"#, |e| {
                matches!(e, D::Malformed(_))
            }),
            (r#"{"v":1,"o":"a","s":-1,"u":[]}"#, |e| {
                matches!(e, D::Malformed(_))
            }),
            (r#"{"v":1,"o":"a","s":1,"u":[{"Type":9,"Key":1}]}"#, |e| {
                *e == D::Update(UpdateError::UnknownType(9))
            }),
            (
                r#"{"v":1,"o":"a","s":1,"u":[{"Type":0,"Key":1,"SeqSet":"0"}]}"#,
                |e| matches!(e, D::Update(UpdateError::SeqSet { .. })),
            ),
            ("id;{\"Type\":8,\"Key\":1}\n", |e| {
                *e == D::Update(UpdateError::UnknownType(8))
            }),
            ("id;{\"Type\":\n", |e| matches!(e, D::Malformed(_))),
            (";{\"Type\":0,\"Key\":1}\n", |e| {
                matches!(e, D::Malformed(_))
            }),
        ];
        for (payload, check) in cases {
            let err = Envelope::decode(payload).unwrap_err();
            assert!(check(&err), "{payload:?}: unexpected {err:?}");
        }
    }

    #[test]
    fn legacy_reads_one_value_as_maddy_does() {
        // What follows the first JSON value is ignored, as maddy's decoder ignores it.
        let env = Envelope::decode("id;{\"Type\":3,\"Key\":1}{\"Type\":9} trailing\n").unwrap();
        assert_eq!(
            env.updates(),
            &[crate::update::Update::mailbox_destroyed(1u64)]
        );
    }

    #[test]
    fn marks_read_as_numbers_booleans_or_null() {
        for (text, expected) in [
            ("1", true),
            ("true", true),
            ("0", false),
            ("false", false),
            ("null", false),
        ] {
            let env = Envelope::decode(&format!(
                r#"{{"v":1,"o":"a","s":1,"t":{text},"d":{text},"u":[]}}"#
            ))
            .unwrap();
            assert_eq!(
                (env.is_transactional(), env.is_durable()),
                (expected, expected),
                "{text}"
            );
        }
        assert!(Envelope::decode(r#"{"v":1,"o":"a","s":1,"t":2,"u":[]}"#).is_err());
        let env = Envelope::decode(r#"{"v":1,"o":"a","s":1,"h":1,"u":[]}"#).unwrap();
        assert!(env.is_heartbeat() && !env.is_reference());
    }
}
