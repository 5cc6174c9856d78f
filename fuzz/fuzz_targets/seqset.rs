//! Fuzzes the IMAP sequence-set parser with any text: parsing must never panic, and
//! whatever parses must print as text that parses back to an equal set.

#![no_main]

use libfuzzer_sys::fuzz_target;
use updatepipe::{SeqSet, Update};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(set) = SeqSet::parse(text) else {
        return;
    };
    let printed = set.to_string();
    let again = SeqSet::parse(&printed)
        .unwrap_or_else(|e| panic!("{text:?} prints as {printed:?}, which does not parse: {e}"));
    assert_eq!(again, set, "{text:?} prints as {printed:?}");
    assert_eq!(
        again.to_string(),
        printed,
        "{text:?}: printing is not stable"
    );
    // Printing only shortens `n:n` to `n`.
    assert!(
        printed.len() <= text.len(),
        "{text:?} prints longer, as {printed:?}"
    );
    // The set survives the JSON contract as an update's `SeqSet`.
    let update = Update::expunge(1, set);
    let json = update.to_json();
    assert_eq!(
        Update::from_json(&json).as_ref(),
        Ok(&update),
        "{text:?} as {json}"
    );
});
