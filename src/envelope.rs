//! The wire format: what one notification payload carries. `docs/wire-format.md` is the
//! specification for other implementations.
//!
//! Version 1 is one compact JSON object:
//!
//! ```json
//! {"v":1,"o":"5f0c9a3e4b1d7a2c8e6f0b1a2c3d4e5f","p":4242,"s":17,"u":[{"Type":0,"Key":42,"SeqSet":"7"}]}
//! ```
//!
//! The decoder also reads maddy's legacy payload, `<sender id>;<update JSON>\n` with every
//! `;` of the JSON replaced by the byte 0x10.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::Deserialize;

use crate::error::{DecodeError, Error, Limit};
use crate::limits::Limits;
use crate::origin::Origin;
use crate::sign::{self, Signer};
use crate::update::{RawUpdate, Update};

/// The largest notification payload PostgreSQL accepts, in bytes.
pub const MAX_PAYLOAD_LEN: usize = 7999;

/// The largest envelope a durable push may write to the log, in bytes. Larger than a
/// notification can be: such an envelope travels through the log, and its notification
/// points at it.
pub const MAX_LOGGED_ENVELOPE_LEN: usize = 1 << 20;

/// The envelope version this build writes and reads.
pub const ENVELOPE_VERSION: u64 = 1;

/// Which wire form a payload used.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum WireFormat {
    /// The updatepipe envelope, version 1.
    V1,
    /// maddy's `<sender id>;<json>` payload.
    Legacy,
}

/// One payload's content: who sent it and the updates it carries.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Envelope {
    format: WireFormat,
    origin: Origin,
    pid: Option<u32>,
    seq: Option<u64>,
    updates: Vec<Update>,
    marks: Marks,
    reference: bool,
    heartbeat: bool,
    sent_at: Option<SystemTime>,
}

/// How an envelope was pushed, as its optional fields tell.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub(crate) struct Marks {
    /// Pushed inside a caller's transaction (`"t":1`): it may roll back or commit out of
    /// order with the sender's other envelopes, so its number is not checked for gaps.
    pub(crate) transactional: bool,
    /// Also written to the durable log (`"d":1`): durable listeners read it from there.
    pub(crate) durable: bool,
}

#[derive(Deserialize)]
struct WireIn {
    v: u64,
    o: String,
    #[serde(default)]
    p: Option<u32>,
    s: u64,
    u: Vec<RawUpdate>,
    #[serde(default, deserialize_with = "mark")]
    t: bool,
    #[serde(default, deserialize_with = "mark")]
    d: bool,
    #[serde(default, deserialize_with = "mark")]
    r: bool,
    #[serde(default, deserialize_with = "mark")]
    h: bool,
    /// When a signed envelope was sealed, in milliseconds since the Unix epoch.
    #[serde(default)]
    w: Option<u64>,
}

/// A mark field: `1`/`0` as written, and for other implementations' convenience also
/// `true`/`false` and `null` (absent).
fn mark<'de, D: serde::Deserializer<'de>>(deserializer: D) -> Result<bool, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Mark {
        Number(u64),
        Bool(bool),
    }
    Ok(match Option::<Mark>::deserialize(deserializer)? {
        None | Some(Mark::Number(0)) | Some(Mark::Bool(false)) => false,
        Some(Mark::Number(1)) | Some(Mark::Bool(true)) => true,
        Some(Mark::Number(_)) => return Err(serde::de::Error::custom("a mark is 0 or 1")),
    })
}

#[derive(Deserialize)]
struct VersionProbe {
    v: Option<u64>,
}

impl Envelope {
    /// A version 1 envelope.
    pub fn new(origin: Origin, pid: u32, seq: u64, updates: Vec<Update>) -> Self {
        Envelope {
            format: WireFormat::V1,
            origin,
            pid: Some(pid),
            seq: Some(seq),
            updates,
            marks: Marks::default(),
            reference: false,
            heartbeat: false,
            sent_at: None,
        }
    }

    /// Encodes a version 1 payload from borrowed parts, failing when it would exceed
    /// [`MAX_PAYLOAD_LEN`].
    pub fn encode_v1(
        origin: &Origin,
        pid: u32,
        seq: u64,
        updates: &[Update],
    ) -> Result<String, Error> {
        write_unsigned(origin, Some(pid), seq, updates)
    }

    /// Packs updates, in order, into as few version 1 payloads as fit in
    /// [`MAX_PAYLOAD_LEN`] each, numbering them with `next_seq`. Fails, sending nothing, when
    /// one update alone does not fit.
    pub fn pack_v1(
        origin: &Origin,
        pid: u32,
        next_seq: impl FnMut() -> u64,
        updates: &[Update],
    ) -> Result<Vec<String>, Error> {
        let packer = Packer::new(origin, pid, None);
        let encoded = updates
            .iter()
            .map(|u| packer.encode(u, MAX_PAYLOAD_LEN))
            .collect::<Result<Vec<_>, _>>()?;
        let packed = packer.pack(
            encoded.iter().map(String::as_str),
            Marks::default(),
            next_seq,
        );
        Ok(packed.into_iter().map(|(_, payload)| payload).collect())
    }

    /// Encodes this envelope in version 1 form (without `"p"` when it has no pid; with
    /// number 0 when it has none, as a legacy payload).
    pub fn encode(&self) -> Result<String, Error> {
        write_unsigned(&self.origin, self.pid, self.seq.unwrap_or(0), &self.updates)
    }

    /// Encodes one update as maddy does (`<sender id>;<json with ';' as 0x10>\n`). Useful to
    /// test interoperability; updatepipe itself always sends version 1. The sender id must
    /// not contain `;` nor start with `{` (maddy's never do), or the payload does not read
    /// back.
    pub fn encode_legacy(sender_id: &str, update: &Update) -> String {
        format!("{sender_id};{}\n", update.to_json().replace(';', "\u{10}"))
    }

    /// Decodes a payload: a version 1 envelope or a legacy maddy payload, within the default
    /// [`Limits`]. Everything is validated; nothing invalid gets through. A signature, if
    /// any, is not checked here: see [`Signer::verify`].
    pub fn decode(payload: &str) -> Result<Envelope, DecodeError> {
        Envelope::decode_with(payload, &Limits::default())
    }

    /// [`Envelope::decode`] within the given limits.
    pub fn decode_with(payload: &str, limits: &Limits) -> Result<Envelope, DecodeError> {
        if payload.len() > MAX_PAYLOAD_LEN {
            return Err(DecodeError::TooLarge(payload.len()));
        }
        if payload.starts_with('{') {
            decode_v1(payload, limits)
        } else {
            decode_legacy(payload, limits)
        }
    }

    /// Decodes an envelope read from the durable log, which may exceed a notification's
    /// size (up to [`MAX_LOGGED_ENVELOPE_LEN`]), within the default [`Limits`].
    pub fn decode_logged(payload: &str) -> Result<Envelope, DecodeError> {
        Envelope::decode_logged_with(payload, &Limits::default())
    }

    /// [`Envelope::decode_logged`] within the given limits.
    pub fn decode_logged_with(payload: &str, limits: &Limits) -> Result<Envelope, DecodeError> {
        if payload.len() > MAX_LOGGED_ENVELOPE_LEN {
            return Err(DecodeError::TooLarge(payload.len()));
        }
        if !payload.starts_with('{') {
            return Err(DecodeError::Unrecognized);
        }
        decode_v1(payload, limits)
    }

    /// The wire form it came in.
    pub fn format(&self) -> WireFormat {
        self.format
    }

    /// The sender.
    pub fn origin(&self) -> &Origin {
        &self.origin
    }

    /// The sender's OS process id, for diagnostics (version 1 only).
    pub fn pid(&self) -> Option<u32> {
        self.pid
    }

    /// The sender's sequence number of this envelope (version 1 only).
    pub fn seq(&self) -> Option<u64> {
        self.seq
    }

    /// The updates, in the order sent.
    pub fn updates(&self) -> &[Update] {
        &self.updates
    }

    /// Takes the updates out.
    pub fn into_updates(self) -> Vec<Update> {
        self.updates
    }

    /// Whether it was pushed inside a caller's transaction (`"t":1`).
    pub fn is_transactional(&self) -> bool {
        self.marks.transactional
    }

    /// Whether it is also in the durable log (`"d":1`).
    pub fn is_durable(&self) -> bool {
        self.marks.durable
    }

    /// Whether this notification only points at a durable log row (`"r":1`) holding the
    /// sender's envelope of the same number, too large to be a notification.
    pub fn is_reference(&self) -> bool {
        self.reference
    }

    /// Whether it is a listener's heartbeat (`"h":1`), which carries no update.
    pub fn is_heartbeat(&self) -> bool {
        self.heartbeat
    }

    /// When a signed envelope was sealed, by its sender's clock (`"w"`).
    pub fn sent_at(&self) -> Option<SystemTime> {
        self.sent_at
    }
}

/// Packs updates already encoded as JSON into version 1 payloads for one sender, signed
/// when it has a signer.
#[derive(Clone, Debug)]
pub(crate) struct Packer {
    origin_json: String,
    pid: u32,
    signer: Option<Signer>,
    /// The envelope around no update, with the longest possible sequence number (and time
    /// and signature, when signing).
    overhead: usize,
}

impl Packer {
    pub(crate) fn new(origin: &Origin, pid: u32, signer: Option<Signer>) -> Self {
        let origin_json =
            serde_json::to_string(origin.as_str()).expect("a string always serializes");
        let all_marks = Marks {
            transactional: true,
            durable: true,
        };
        let overhead = write_v1(
            &origin_json,
            Some(pid),
            u64::MAX,
            all_marks,
            Kind::Updates,
            std::iter::empty(),
            None,
        )
        .len()
            + signer.as_ref().map_or(0, |_| {
                ",\"w\":18446744073709551615".len() + sign::SIG_SUFFIX_LEN
            });
        Packer {
            origin_json,
            pid,
            signer,
            overhead,
        }
    }

    fn write<'a>(
        &self,
        seq: u64,
        marks: Marks,
        kind: Kind,
        updates: impl Iterator<Item = &'a str>,
    ) -> String {
        write_v1(
            &self.origin_json,
            Some(self.pid),
            seq,
            marks,
            kind,
            updates,
            self.signer.as_ref(),
        )
    }

    /// An update's JSON, checked to fit in an envelope of its own of at most `limit` bytes
    /// ([`MAX_PAYLOAD_LEN`], or [`MAX_LOGGED_ENVELOPE_LEN`] for the durable log).
    pub(crate) fn encode(&self, update: &Update, limit: usize) -> Result<String, Error> {
        let json = update.to_json();
        let size = self.overhead + json.len();
        if size > limit {
            return Err(Error::PayloadTooLarge { size, limit });
        }
        Ok(json)
    }

    /// A listener's heartbeat: an envelope with no update, marked `"h":1`.
    pub(crate) fn heartbeat(&self, seq: u64) -> String {
        self.write(seq, Marks::default(), Kind::Heartbeat, std::iter::empty())
    }

    /// A notification that points at the durable log row holding envelope `seq` of this
    /// sender, too large to be a notification itself (`"r":1`; the row is found by channel,
    /// origin and number).
    pub(crate) fn reference(&self, seq: u64, marks: Marks) -> String {
        self.write(seq, marks, Kind::Reference, std::iter::empty())
    }

    /// Packs encoded updates, in order, greedily into payloads of at most
    /// [`MAX_PAYLOAD_LEN`] bytes, each numbered by `next_seq`; returns each payload with its
    /// number. An update too large for that (allowed by [`Packer::encode`] for the durable
    /// log) gets a payload of its own.
    pub(crate) fn pack<'a>(
        &self,
        encoded: impl IntoIterator<Item = &'a str>,
        marks: Marks,
        mut next_seq: impl FnMut() -> u64,
    ) -> Vec<(u64, String)> {
        let mut payloads = Vec::new();
        let mut write = |group: &mut Vec<&str>| {
            let seq = next_seq();
            let payload = self.write(seq, marks, Kind::Updates, group.drain(..));
            (seq, payload)
        };
        let mut group: Vec<&str> = Vec::new();
        let mut size = self.overhead;
        for json in encoded {
            let added = json.len() + usize::from(!group.is_empty());
            if !group.is_empty() && size + added > MAX_PAYLOAD_LEN {
                payloads.push(write(&mut group));
                size = self.overhead;
            }
            size += json.len() + usize::from(!group.is_empty());
            group.push(json);
        }
        if !group.is_empty() {
            payloads.push(write(&mut group));
        }
        payloads
    }
}

/// An unsigned version 1 payload of these updates, within [`MAX_PAYLOAD_LEN`].
fn write_unsigned(
    origin: &Origin,
    pid: Option<u32>,
    seq: u64,
    updates: &[Update],
) -> Result<String, Error> {
    let encoded: Vec<String> = updates.iter().map(Update::to_json).collect();
    let origin = serde_json::to_string(origin.as_str()).expect("a string always serializes");
    let payload = write_v1(
        &origin,
        pid,
        seq,
        Marks::default(),
        Kind::Updates,
        encoded.iter().map(String::as_str),
        None,
    );
    if payload.len() > MAX_PAYLOAD_LEN {
        return Err(Error::PayloadTooLarge {
            size: payload.len(),
            limit: MAX_PAYLOAD_LEN,
        });
    }
    Ok(payload)
}

/// What an envelope is for.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    Updates,
    /// A listener's heartbeat (`"h":1`).
    Heartbeat,
    /// A pointer to a durable log row (`"r":1`).
    Reference,
}

/// Writes `{"v":1,"o":…,"p":…,"s":…,"u":[…]}` around updates already in JSON; `origin_json`
/// is the origin as a JSON string. With a signer, stamps the time (`"w"`) and signs (`"g"`).
fn write_v1<'a>(
    origin_json: &str,
    pid: Option<u32>,
    seq: u64,
    marks: Marks,
    kind: Kind,
    updates: impl Iterator<Item = &'a str>,
    signer: Option<&Signer>,
) -> String {
    let mut numbers = itoa::Buffer::new();
    let mut out = String::with_capacity(MAX_PAYLOAD_LEN.min(1024));
    out.push_str("{\"v\":1,\"o\":");
    out.push_str(origin_json);
    if let Some(pid) = pid {
        out.push_str(",\"p\":");
        out.push_str(numbers.format(pid));
    }
    out.push_str(",\"s\":");
    out.push_str(numbers.format(seq));
    if marks.transactional {
        out.push_str(",\"t\":1");
    }
    if marks.durable {
        out.push_str(",\"d\":1");
    }
    match kind {
        Kind::Updates => {}
        Kind::Heartbeat => out.push_str(",\"h\":1"),
        Kind::Reference => out.push_str(",\"r\":1"),
    }
    if signer.is_some() {
        sign::push_time(&mut out, SystemTime::now());
    }
    out.push_str(",\"u\":[");
    for (i, update) in updates.enumerate() {
        if i > 0 {
            out.push(',');
        }
        out.push_str(update);
    }
    out.push_str("]}");
    if let Some(signer) = signer {
        signer.sign(&mut out);
    }
    out
}

fn decode_v1(payload: &str, limits: &Limits) -> Result<Envelope, DecodeError> {
    limits.check_depth(payload)?;
    let wire: WireIn = match serde_json::from_str(payload) {
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

fn decode_legacy(payload: &str, limits: &Limits) -> Result<Envelope, DecodeError> {
    let body = payload.strip_suffix('\n').unwrap_or(payload);
    let (sender, json) = body.split_once(';').ok_or(DecodeError::Unrecognized)?;
    if !json.starts_with('{') {
        return Err(DecodeError::Unrecognized);
    }
    let origin = Origin::parse(sender)?;
    limits.check_depth(json)?;
    let json = json.replace('\u{10}', ";");
    let raw: RawUpdate =
        serde_json::from_str(&json).map_err(|e| DecodeError::Malformed(e.to_string()))?;
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
    use super::*;
    use crate::error::UpdateError;
    use crate::seqset::SeqSet;
    use crate::update::{Flag, MailboxKey};

    fn sample() -> Vec<Update> {
        vec![
            Update::new_message(42, SeqSet::parse("7").unwrap()),
            Update::flags_changed("INBOX;x", 17, [Flag::new("\\Seen").unwrap()]).unwrap(),
            Update::expunge(u64::MAX, SeqSet::parse("1:3,9:*").unwrap()),
            Update::mailbox_destroyed("gone"),
        ]
    }

    #[test]
    fn v1_round_trip() {
        let origin = Origin::random();
        let payload = Envelope::encode_v1(&origin, 1, 99, &sample()).unwrap();
        let env = Envelope::decode(&payload).unwrap();
        assert_eq!(env.format(), WireFormat::V1);
        assert_eq!(env.origin(), &origin);
        assert_eq!(env.pid(), Some(1));
        assert_eq!(env.seq(), Some(99));
        assert_eq!(env.updates(), sample().as_slice());
        assert_eq!(env.encode().unwrap(), payload);
    }

    #[test]
    fn v1_exact_form() {
        let origin = Origin::parse("abc").unwrap();
        let payload = Envelope::encode_v1(&origin, 7, 3, &[Update::mailbox_destroyed(5)]).unwrap();
        assert_eq!(
            payload,
            r#"{"v":1,"o":"abc","p":7,"s":3,"u":[{"Type":3,"Key":5}]}"#
        );
    }

    #[test]
    fn legacy_round_trip_restores_semicolons() {
        let update = Update::new_message("a;b;c", SeqSet::parse("1").unwrap());
        let payload = Envelope::encode_legacy("4242-0xc000010000", &update);
        assert!(payload.ends_with('\n'));
        assert!(!payload[payload.find(';').unwrap() + 1..].contains(';'));
        let env = Envelope::decode(&payload).unwrap();
        assert_eq!(env.format(), WireFormat::Legacy);
        assert_eq!(env.origin().as_str(), "4242-0xc000010000");
        assert_eq!(env.updates(), &[update]);
        assert_eq!(env.seq(), None);
        // Without the trailing newline too.
        assert!(Envelope::decode(payload.trim_end()).is_ok());
    }

    #[test]
    fn size_limit() {
        // A mailbox name long enough to overflow one notification.
        let update = Update::mailbox_destroyed(MailboxKey::Name("x".repeat(MAX_PAYLOAD_LEN)));
        let err = Envelope::encode_v1(&Origin::random(), 1, 1, &[update]).unwrap_err();
        assert!(matches!(
            err,
            Error::PayloadTooLarge {
                limit: MAX_PAYLOAD_LEN,
                ..
            }
        ));
        // Just under the limit is fine; just over is not.
        let fixed = r#"{"v":1,"o":"o","p":1,"s":1,"u":[{"Type":3,"Key":""}]}"#.len();
        let fits = Update::mailbox_destroyed(MailboxKey::Name("y".repeat(MAX_PAYLOAD_LEN - fixed)));
        let origin = Origin::parse("o").unwrap();
        let payload = Envelope::encode_v1(&origin, 1, 1, &[fits]).unwrap();
        assert_eq!(payload.len(), MAX_PAYLOAD_LEN);
        let over =
            Update::mailbox_destroyed(MailboxKey::Name("y".repeat(MAX_PAYLOAD_LEN - fixed + 1)));
        assert!(Envelope::encode_v1(&origin, 1, 1, &[over]).is_err());
        assert_eq!(
            Envelope::decode(&"x".repeat(MAX_PAYLOAD_LEN + 1)),
            Err(DecodeError::TooLarge(MAX_PAYLOAD_LEN + 1))
        );
    }

    #[test]
    fn pack_splits_at_the_limit_and_keeps_order() {
        let origin = Origin::random();
        let updates: Vec<Update> = (1..=2000u32)
            .map(|i| Update::expunge(u64::from(i), SeqSet::single(i).unwrap()))
            .collect();
        let mut seq = 10;
        let payloads = Envelope::pack_v1(
            &origin,
            3,
            || {
                seq += 1;
                seq
            },
            &updates,
        )
        .unwrap();
        assert!(payloads.len() > 1);
        let mut decoded = Vec::new();
        for (i, payload) in payloads.iter().enumerate() {
            assert!(payload.len() <= MAX_PAYLOAD_LEN);
            let env = Envelope::decode(payload).unwrap();
            assert_eq!(env.seq(), Some(11 + i as u64));
            decoded.extend(env.into_updates());
        }
        assert_eq!(decoded, updates);
        // Full envelopes: each but the last leaves no room for another update (the size
        // reserved for the longest sequence number aside).
        for payload in &payloads[..payloads.len() - 1] {
            assert!(payload.len() > MAX_PAYLOAD_LEN - 80, "{}", payload.len());
        }
    }

    #[test]
    fn pack_refuses_an_update_that_never_fits() {
        let huge = Update::mailbox_destroyed(MailboxKey::Name("x".repeat(MAX_PAYLOAD_LEN)));
        let ok = Update::mailbox_destroyed(1);
        let err = Envelope::pack_v1(&Origin::random(), 1, || 1, &[ok, huge]).unwrap_err();
        assert!(matches!(err, Error::PayloadTooLarge { .. }));
        assert!(
            Envelope::pack_v1(&Origin::random(), 1, || 1, &[])
                .unwrap()
                .is_empty()
        );
    }

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
    fn empty_update_list_is_valid() {
        let env = Envelope::decode(r#"{"v":1,"o":"a","s":1,"u":[]}"#).unwrap();
        assert!(env.updates().is_empty());
        assert_eq!(env.pid(), None);
        // Re-encoded without a pid it gains none (and so no bytes).
        assert_eq!(env.encode().unwrap(), r#"{"v":1,"o":"a","s":1,"u":[]}"#);
        // The log reader is as strict as the notification reader about what comes first.
        assert_eq!(
            Envelope::decode_logged(r#" {"v":1,"o":"a","s":1,"u":[]}"#),
            Err(DecodeError::Unrecognized)
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

    #[test]
    fn unknown_fields_are_ignored_within_v1() {
        let env = Envelope::decode(r#"{"v":1,"o":"a","s":1,"u":[],"future":true}"#).unwrap();
        assert_eq!(env.seq(), Some(1));
    }
}
