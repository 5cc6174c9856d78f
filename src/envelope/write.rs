//! Writing payloads: updates already in JSON packed into version 1 envelopes for one
//! sender, numbered, and signed when it has a signer.

use std::time::SystemTime;

use super::{MAX_PAYLOAD_LEN, Marks};
use crate::error::Error;
use crate::origin::Origin;
use crate::sign::{self, Signer};
use crate::update::Update;

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
        let mut json = Vec::with_capacity(64);
        self.encode_into(update, limit, &mut json)?;
        Ok(String::from_utf8(json).expect("JSON is UTF-8"))
    }

    /// [`Packer::encode`], appending the JSON to `out`. When the update does not fit, what
    /// was appended stays: the caller rolls back (`push::Encoded::push_with` does).
    pub(crate) fn encode_into(
        &self,
        update: &Update,
        limit: usize,
        out: &mut Vec<u8>,
    ) -> Result<(), Error> {
        let start = out.len();
        update.write_json(out);
        let size = self.overhead + out.len() - start;
        if size > limit {
            return Err(Error::PayloadTooLarge { size, limit });
        }
        Ok(())
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
pub(super) fn write_unsigned(
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

#[cfg(test)]
mod tests {
    use crate::envelope::{Envelope, MAX_PAYLOAD_LEN};
    use crate::error::{DecodeError, Error};
    use crate::origin::Origin;
    use crate::seqset::SeqSet;
    use crate::update::{MailboxKey, Update};

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
}
