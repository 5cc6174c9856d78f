//! Reading a version 1 envelope in the exact form this crate writes (`write::write_v1`,
//! `Update::write_json`) without serde: a listener decodes every payload, and serde's
//! general JSON reader is most of what that costs. Anything else (another field order,
//! whitespace, an escape, a string key, flags, a float, a number that overflows) is not
//! read here at all: the caller falls back to serde, so what this reader accepts it reads
//! exactly as serde would, and everything else is read by serde (the unit tests check
//! both on every small change of such payloads).
//!
//! The form: `{"v":1,"o":"…"[,"p":N],"s":N[,"t":1][,"d":1][,"h":1][,"r":1][,"w":N],`
//! `"u":[…][,"g":"…"]}`, each update `{"Type":N,"Key":N[,"SeqSet":"…"]}`, with nothing
//! after the last brace. It nests three deep, within any depth limit (at least 4).

use super::wire_in::WireIn;
use crate::update::RawUpdate;

/// The envelope, when `payload` is in the form above; `None` otherwise.
pub(super) fn read(payload: &str) -> Option<WireIn<'_>> {
    let mut r = Reader {
        text: payload,
        at: 0,
    };
    r.literal(b"{\"v\":1,\"o\":\"")?;
    // An origin of printable ASCII without a quote or backslash is its own JSON text.
    let o = r
        .string_of(|b| b.is_ascii_graphic() && b != b'"' && b != b'\\')?
        .to_owned();
    let p = match r.optional(b",\"p\":") {
        true => Some(u32::try_from(r.number()?).ok()?),
        false => None,
    };
    r.literal(b",\"s\":")?;
    let s = r.number()?;
    let t = r.optional(b",\"t\":1");
    let d = r.optional(b",\"d\":1");
    let h = r.optional(b",\"h\":1");
    let rr = r.optional(b",\"r\":1");
    let w = match r.optional(b",\"w\":") {
        true => Some(r.number()?),
        false => None,
    };
    r.literal(b",\"u\":[")?;
    let mut u = Vec::new();
    if !r.optional(b"]") {
        loop {
            u.push(r.update()?);
            if r.optional(b"]") {
                break;
            }
            r.literal(b",")?;
        }
    }
    if r.optional(b",\"g\":\"") {
        r.string_of(|b| b.is_ascii_hexdigit())?;
    }
    r.literal(b"}")?;
    (r.at == payload.len()).then_some(WireIn {
        v: 1,
        o,
        p,
        s,
        u,
        t,
        d,
        r: rr,
        h,
        w,
    })
}

struct Reader<'a> {
    text: &'a str,
    at: usize,
}

impl<'a> Reader<'a> {
    fn rest(&self) -> &'a [u8] {
        &self.text.as_bytes()[self.at..]
    }

    /// Takes `expected`, which must come next.
    fn literal(&mut self, expected: &[u8]) -> Option<()> {
        self.optional(expected).then_some(())
    }

    /// Takes `expected` when it comes next.
    fn optional(&mut self, expected: &[u8]) -> bool {
        let found = self.rest().starts_with(expected);
        if found {
            self.at += expected.len();
        }
        found
    }

    /// A JSON unsigned integer that fits a `u64`: `0`, or digits without a leading zero.
    /// What follows it is for the caller to check (a `.`, an `e` or a digit after a `0`
    /// does not follow a number in this form).
    fn number(&mut self) -> Option<u64> {
        let digits = self
            .rest()
            .iter()
            .take_while(|b| b.is_ascii_digit())
            .count();
        let text = &self.rest()[..digits];
        if text.is_empty() || (text[0] == b'0' && digits > 1) {
            return None;
        }
        let mut n: u64 = 0;
        for &b in text {
            n = n.checked_mul(10)?.checked_add(u64::from(b - b'0'))?;
        }
        self.at += digits;
        Some(n)
    }

    /// The text of a string whose opening quote was taken, up to its closing quote
    /// (taken too), when every byte of it is `allowed` (never a quote: no escapes).
    fn string_of(&mut self, allowed: impl Fn(u8) -> bool) -> Option<&'a str> {
        let len = self.rest().iter().take_while(|&&b| allowed(b)).count();
        let start = self.at;
        self.at += len;
        self.literal(b"\"")?;
        // Only ASCII was taken: the slice is at character boundaries.
        Some(&self.text[start..start + len])
    }

    /// One update: `{"Type":N,"Key":N[,"SeqSet":"…"]}`, the sequence set borrowed.
    fn update(&mut self) -> Option<RawUpdate<'a>> {
        self.literal(b"{\"Type\":")?;
        let kind = self.number()?;
        self.literal(b",\"Key\":")?;
        let key = self.number()?;
        let seq_set = match self.optional(b",\"SeqSet\":\"") {
            true => Some(self.string_of(|b| b.is_ascii_digit() || b"*:,".contains(&b))?),
            false => None,
        };
        self.literal(b"}")?;
        Some(RawUpdate::plain(kind, key, seq_set))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::envelope::{Envelope, Marks};
    use crate::origin::Origin;
    use crate::seqset::SeqSet;
    use crate::update::Update;

    /// What serde reads from `payload`, if it reads it.
    fn by_serde(payload: &str) -> Option<WireIn<'_>> {
        serde_json::from_str(payload).ok()
    }

    /// Payloads as the crate writes them: every optional part, signed and not.
    fn written() -> Vec<String> {
        let origin = Origin::parse("a1b2").unwrap();
        let updates = [
            Update::new_message(42, SeqSet::parse("7").unwrap()),
            Update::expunge(u64::MAX, SeqSet::parse("1:3,7,9:*").unwrap()),
            Update::new_message(0, SeqSet::new()),
            Update::mailbox_destroyed(5),
        ];
        let mut payloads = vec![
            Envelope::encode_v1(&origin, 4242, 17, &updates).unwrap(),
            Envelope::encode_v1(&origin, 1, 0, &[]).unwrap(),
            Envelope::encode_v1(&origin, 1, u64::MAX, &updates[..1]).unwrap(),
        ];
        let packer = super::super::Packer::new(&origin, 7, None);
        let json: Vec<String> = updates.iter().map(Update::to_json).collect();
        let marks = Marks {
            transactional: true,
            durable: true,
        };
        let mut seq = 0;
        for (_, payload) in packer.pack(json.iter().map(String::as_str), marks, || {
            seq += 1;
            seq
        }) {
            payloads.push(payload);
        }
        payloads.push(packer.heartbeat(9));
        payloads.push(packer.reference(10, marks));
        let signer = crate::sign::Signer::new(
            vec![crate::sign::Secret::new(vec![7u8; 32]).unwrap()],
            crate::channel::ChannelName::default(),
        )
        .unwrap();
        let signed = super::super::Packer::new(&origin, 7, Some(signer));
        payloads.push(signed.heartbeat(11));
        for (_, payload) in signed.pack(json.iter().map(String::as_str), marks, || 12) {
            payloads.push(payload);
        }
        payloads
    }

    #[test]
    fn what_the_crate_writes_is_read_as_serde_reads_it() {
        for payload in written() {
            let fast = read(&payload).unwrap_or_else(|| panic!("not read: {payload}"));
            assert_eq!(Some(&fast), by_serde(&payload).as_ref(), "{payload}");
        }
    }

    #[test]
    fn a_changed_payload_is_read_as_serde_reads_it_or_left_to_serde() {
        // Bytes that matter to JSON, to this form, or to neither.
        let bytes = b"0123456789{}[]\":,.-+eE \\/\ntuvwxyz*\x01";
        let mut read_here = 0;
        let mut check = |payload: &[u8]| {
            let Ok(payload) = std::str::from_utf8(payload) else {
                return;
            };
            if let Some(fast) = read(payload) {
                read_here += 1;
                assert_eq!(Some(&fast), by_serde(payload).as_ref(), "{payload}");
            }
        };
        for payload in written() {
            let payload = payload.as_bytes();
            for i in 0..=payload.len() {
                // Removed, replaced, inserted.
                if i < payload.len() {
                    check(&[&payload[..i], &payload[i + 1..]].concat());
                }
                for &b in bytes {
                    if i < payload.len() {
                        check(&[&payload[..i], &[b], &payload[i + 1..]].concat());
                    }
                    check(&[&payload[..i], &[b], &payload[i..]].concat());
                }
            }
            // Non-ASCII where a string is.
            check(
                &String::from_utf8_lossy(payload)
                    .replacen("a1b2", "a1é2", 1)
                    .into_bytes(),
            );
        }
        assert!(read_here > 1000, "only {read_here} changed payloads read");
    }

    #[test]
    fn other_forms_are_left_to_serde() {
        for payload in [
            r#"{"v":1,"o":"a","s":1,"u":[{"Type":1,"Key":"k","SeqSet":"2"}]}"#,
            r#"{"v":1,"o":"a","s":1,"u":[{"Type":1,"Key":2,"SeqSet":"2","NewFlags":["x"]}]}"#,
            r#"{"v":1,"o":"a","s":1,"u":[]} "#,
            r#"{"v":1, "o":"a","s":1,"u":[]}"#,
            r#"{"o":"a","v":1,"s":1,"u":[]}"#,
            r#"{"v":1,"o":"a","s":1,"u":[{"Key":2,"Type":1}]}"#,
            r#"{"v":1,"o":"a","s":18446744073709551616,"u":[]}"#,
            r#"{"v":1,"o":"a","p":4294967296,"s":1,"u":[]}"#,
            r#"{"v":1,"o":"a","s":01,"u":[]}"#,
            r#"{"v":1,"o":"a","s":1,"t":0,"u":[]}"#,
            r#"{"v":1,"o":"a\u0062","s":1,"u":[]}"#,
            r#"{"v":1,"o":"a","s":1,"u":[],"x":1}"#,
            r#"{"v":2,"o":"a","s":1,"u":[]}"#,
        ] {
            assert!(read(payload).is_none(), "{payload}");
        }
        // Read by serde, the first two are envelopes like any other.
        for payload in [
            r#"{"v":1,"o":"a","s":1,"u":[{"Type":1,"Key":"k","SeqSet":"2"}]}"#,
            r#"{"v":1,"o":"a","s":1,"u":[{"Type":1,"Key":2,"SeqSet":"2","NewFlags":["x"]}]}"#,
        ] {
            assert_eq!(Envelope::decode(payload).unwrap().updates().len(), 1);
        }
    }
}
