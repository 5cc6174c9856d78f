//! Fuzzes the payload decoder with any text, through both readers: a notification
//! (`Envelope::decode`, version 1 or maddy's legacy form) and a durable log row
//! (`Envelope::decode_logged`). Decoding must never panic, and whatever decodes must
//! re-encode to version 1 and decode again to the same sender, number and updates, each
//! update's JSON as serde writes it. The reader of the crate's own exact form and serde's
//! must read every text alike.

#![no_main]

use libfuzzer_sys::fuzz_target;
use updatepipe::{Envelope, Error, MAX_LOGGED_ENVELOPE_LEN, WireFormat};

fuzz_target!(|data: &[u8]| {
    // Payloads are text: PostgreSQL hands a NOTIFY payload and a text column over as UTF-8.
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let notification = Envelope::decode(text);
    let logged = Envelope::decode_logged(text);
    if let Ok(envelope) = &notification {
        round_trip(text, envelope, false);
        // A version 1 notification is also a valid log row, read the same way.
        if envelope.format() == WireFormat::V1 {
            assert_eq!(
                logged.as_ref(),
                Ok(envelope),
                "{text:?}: the readers disagree"
            );
        }
    }
    if let Ok(envelope) = &logged {
        round_trip(text, envelope, true);
    }
    // The exact form the crate writes is read without serde; a trailing space (which JSON
    // allows) sends the same text through serde: both readers must agree.
    if text.len() < MAX_LOGGED_ENVELOPE_LEN {
        let spaced = Envelope::decode_logged(&format!("{text} "));
        assert_eq!(logged.ok(), spaced.ok(), "{text:?}: the two v1 readers disagree");
    }
});

/// `envelope`, decoded from `input`, encodes to version 1 and decodes back to the same
/// origin, number, pid and updates (an absent number is written as 0).
fn round_trip(input: &str, envelope: &Envelope, from_log: bool) {
    let encoded = match envelope.encode() {
        Ok(encoded) => encoded,
        Err(Error::PayloadTooLarge { size, limit }) => {
            assert!(
                size > limit,
                "{input:?}: too large at {size} of {limit} bytes"
            );
            // The version 1 form drops whitespace, marks and unknown fields, and never
            // writes a string or a number longer than it can be read. It may still grow
            // past a notification: from a log row (up to 1 MiB), or from a legacy payload (the
            // envelope around the update).
            assert!(
                from_log || envelope.format() == WireFormat::Legacy,
                "{input:?} decodes as a notification, but its version 1 form is {size} bytes"
            );
            return;
        }
        Err(e) => panic!("{input:?} decodes, but does not encode: {e}"),
    };
    let again = Envelope::decode(&encoded).unwrap_or_else(|e| {
        panic!("{input:?} re-encodes as {encoded:?}, which does not decode: {e}")
    });
    let context = format!("{input:?} re-encodes as {encoded:?}");
    assert_eq!(again.format(), WireFormat::V1, "{context}");
    assert_eq!(again.origin(), envelope.origin(), "{context}");
    assert_eq!(again.seq(), Some(envelope.seq().unwrap_or(0)), "{context}");
    assert_eq!(again.pid(), envelope.pid(), "{context}");
    assert_eq!(again.updates(), envelope.updates(), "{context}");
    // The JSON written directly is what serde writes.
    for update in envelope.updates() {
        assert_eq!(
            update.to_json(),
            serde_json::to_string(update).expect("an update serializes"),
            "{context}"
        );
    }
    // The version 1 form is a fixed point: encoding it again changes nothing.
    assert_eq!(again.encode().ok().as_ref(), Some(&encoded), "{context}");
}
