//! The wire format: what one notification payload carries. `docs/wire-format.md` is the
//! specification for other implementations.
//!
//! Version 1 is one compact JSON object:
//!
//! ```json
//! {"v":1,"o":"5f0c9a3e4b1d7a2c8e6f0b1a2c3d4e5f","p":4242,"s":17,
//!  "u":[{"Type":0,"Key":42,"SeqSet":"7"}]}
//! ```
//!
//! The decoder also reads maddy's legacy payload, `<sender id>;<update JSON>\n` with every
//! `;` of the JSON replaced by the byte 0x10 (one JSON value; what follows it is ignored, as
//! maddy ignores it). In the maddy layout the push path writes that form too, as copies for
//! maddy nodes (`push::wire`).

use std::time::SystemTime;

use crate::error::{DecodeError, Error};
use crate::limits::Limits;
use crate::origin::Origin;
use crate::update::Update;

mod canonical;
mod decode;
mod wire_in;
mod write;

use decode::{decode_legacy, decode_v1};
pub(crate) use write::Packer;
use write::write_unsigned;

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
    /// test interoperability; updatepipe sends it only in the maddy layout, as copies for maddy
    /// nodes next to its version 1 envelopes (`docs/maddy.md`). The sender id must
    /// not contain `;` nor start with `{` (maddy's never do), or the payload does not read
    /// back.
    pub fn encode_legacy(sender_id: &str, update: &Update) -> String {
        format!("{sender_id};{}\n", update.to_json().replace(';', "\u{10}"))
    }

    /// Decodes a payload: a version 1 envelope or a legacy maddy payload, within the default
    /// [`Limits`]. Everything is validated; nothing invalid gets through. A signature, if
    /// any, is not checked here: see [`Signer::verify`](crate::Signer::verify).
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::seqset::SeqSet;
    use crate::update::Flag;

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
    fn unknown_fields_are_ignored_within_v1() {
        let env = Envelope::decode(r#"{"v":1,"o":"a","s":1,"u":[],"future":true}"#).unwrap();
        assert_eq!(env.seq(), Some(1));
    }

    /// JSON arrays are not updates or envelopes, on any path: serde's derive would read
    /// `[3,5]` as `{"Type":3,"Key":5}`.
    #[test]
    fn arrays_in_place_of_objects_are_refused() {
        for payload in [
            r#"{"v":1,"o":"a","s":1,"u":[[2,9,"1:2"]]}"#,
            r#"{"v":1,"o":"a","s":1,"u":[[3,5]]}"#,
            "4242-0xc000010000;[3,5]\n",
        ] {
            let refused = Envelope::decode(payload);
            assert!(refused.is_err(), "{payload}: {refused:?}");
        }
        // The envelope itself as an array (fields in order) is not one either.
        assert!(Envelope::decode(r#"[1,"a",1]"#).is_err());
        for json in ["[3,5]", "[1,2]", r#"[0,1,"1:2"]"#] {
            assert!(Update::from_json(json).is_err(), "{json}");
        }
        // Objects still are.
        assert!(Update::from_json(r#"{"Type":3,"Key":5}"#).is_ok());
    }
}
