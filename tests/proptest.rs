//! Property tests for the wire format, with no database: the payload decoder never panics,
//! valid updates survive an envelope, whatever decodes re-encodes to an equivalent envelope,
//! and a sequence set prints as text that parses back to it.
//!
//! Arbitrary text is mostly refused at its first byte, so most cases here come from a
//! grammar of envelope-shaped text: objects with the envelope's keys and the update's keys,
//! each value usually of the right shape and sometimes not. The case counts keep a debug
//! build to a few seconds; `PROPTEST_CASES=20000 cargo test --release --test proptest`
//! searches deeper. The fuzz targets under `fuzz/` check the same properties with coverage
//! guidance (`.ci/fuzz`).

use proptest::collection::vec;
use proptest::option::weighted;
use proptest::prelude::*;
use proptest::sample::{Index, select};
use proptest::strategy::ValueTree;
use proptest::test_runner::{FileFailurePersistence, TestCaseError, TestRunner};
use updatepipe::{
    DecodeError, Envelope, Error, Flag, MAX_FLAG_LEN, MAX_FLAGS, MAX_PAYLOAD_LEN, MailboxKey,
    Origin, SeqSet, Update, UpdateKind, WireFormat,
};

/// The configuration with `default` cases, unless `PROPTEST_CASES` says otherwise.
fn cases(default: u32) -> ProptestConfig {
    let cases = std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(default);
    ProptestConfig {
        cases,
        // A failing case is saved to tests/proptest.proptest-regressions and tried first
        // on the next run (proptest finds its default place only for files under src/).
        failure_persistence: Some(Box::new(FileFailurePersistence::WithSource(
            "proptest-regressions",
        ))),
        ..ProptestConfig::default()
    }
}

// ---- Valid values, built through the public constructors --------------------------------

/// A sequence number as text: small ones (which repeat, making `n:n`), any, the largest,
/// and `*`.
fn seq_num_text() -> BoxedStrategy<String> {
    prop_oneof![
        3 => (1u32..=9).prop_map(|n| n.to_string()),
        2 => (1u32..=u32::MAX).prop_map(|n| n.to_string()),
        1 => Just(u32::MAX.to_string()),
        1 => Just("*".to_owned()),
    ]
    .boxed()
}

/// A valid sequence set as text, with the text it prints as (`n:n` prints as `n`).
fn seq_set_text() -> BoxedStrategy<(String, String)> {
    let range = prop_oneof![
        seq_num_text().prop_map(|n| (n.clone(), n)),
        (seq_num_text(), seq_num_text()).prop_map(|(a, b)| {
            let text = format!("{a}:{b}");
            let printed = if a == b { a } else { text.clone() };
            (text, printed)
        }),
    ];
    vec(range, 0..6)
        .prop_map(|ranges| {
            let (text, printed): (Vec<String>, Vec<String>) = ranges.into_iter().unzip();
            (text.join(","), printed.join(","))
        })
        .boxed()
}

fn seq_set() -> BoxedStrategy<SeqSet> {
    seq_set_text()
        .prop_map(|(text, _)| SeqSet::parse(&text).expect("a valid sequence set"))
        .boxed()
}

/// Characters a flag's atom may hold: printable ASCII but for `( ) { % * " \ ]`.
fn atom_chars() -> Vec<char> {
    (0x21u8..0x7f)
        .filter(|b| !b"(){%*\"\\]".contains(b))
        .map(char::from)
        .collect()
}

/// A valid flag's text: a keyword or a `\`-prefixed system flag, now and then the longest
/// allowed.
fn flag_text() -> BoxedStrategy<String> {
    let atom = vec(select(atom_chars()), 1..12).prop_map(String::from_iter);
    prop_oneof![
        12 => (any::<bool>(), atom).prop_map(|(system, atom)| {
            if system { format!("\\{atom}") } else { atom }
        }),
        4 => select(vec!["\\Seen", "\\Answered", "\\Flagged", "\\Deleted", "\\Draft", "$Junk"])
            .prop_map(str::to_owned),
        1 => vec(select(atom_chars()), MAX_FLAG_LEN..=MAX_FLAG_LEN).prop_map(String::from_iter),
    ]
    .boxed()
}

fn flag() -> BoxedStrategy<Flag> {
    flag_text()
        .prop_map(|text| Flag::new(text).expect("a valid flag"))
        .boxed()
}

/// Flags for one update: a few, or now and then the most allowed (short ones, so that the
/// update still fits in a notification).
fn flags() -> BoxedStrategy<Vec<Flag>> {
    let short = vec(select(atom_chars()), 1..3)
        .prop_map(|atom| Flag::new(String::from_iter(atom)).expect("a valid flag"));
    prop_oneof![
        20 => vec(flag(), 0..5),
        1 => vec(short, MAX_FLAGS..=MAX_FLAGS),
    ]
    .boxed()
}

/// Text that tests a key's JSON escaping and the legacy form's `;` (written as 0x10).
fn tricky_text() -> BoxedStrategy<String> {
    let chars = [
        ';', '\u{10}', '"', '\\', '/', '\n', '\0', '\u{1f}', '\u{7f}', ' ', 'a', 'Z', '0', 'é',
        '☃', '😀', '\u{2028}', '\u{feff}',
    ];
    vec(select(chars.to_vec()), 0..24)
        .prop_map(String::from_iter)
        .boxed()
}

/// Mailbox keys: numbers over the whole `u64` range, many above 2⁵³ (where a double stops
/// being exact), and text.
fn mailbox_key() -> BoxedStrategy<MailboxKey> {
    let edges = [
        0,
        1,
        (1 << 53) - 1,
        1 << 53,
        (1 << 53) + 1,
        u64::from(u32::MAX) + 1,
        u64::MAX - 1,
        u64::MAX,
    ];
    prop_oneof![
        2 => any::<u64>().prop_map(MailboxKey::Id),
        2 => ((1u64 << 53)..=u64::MAX).prop_map(MailboxKey::Id),
        1 => select(edges.to_vec()).prop_map(MailboxKey::Id),
        2 => any::<String>().prop_map(MailboxKey::Name),
        2 => tricky_text().prop_map(MailboxKey::Name),
    ]
    .boxed()
}

/// Any valid update, of each kind, through the public constructors.
fn update() -> BoxedStrategy<Update> {
    prop_oneof![
        (mailbox_key(), seq_set()).prop_map(|(key, set)| Update::new_message(key, set)),
        // A new-message update may carry flags too.
        (mailbox_key(), seq_set(), flags()).prop_map(|(key, set, flags)| {
            Update::from_parts(UpdateKind::NewMessage, key, set, flags).expect("a valid update")
        }),
        (mailbox_key(), 1u32..=u32::MAX, flags()).prop_map(|(key, uid, flags)| {
            Update::flags_changed(key, uid, flags).expect("a valid update")
        }),
        (mailbox_key(), seq_set()).prop_map(|(key, set)| Update::expunge(key, set)),
        mailbox_key().prop_map(Update::mailbox_destroyed),
    ]
    .boxed()
}

/// A valid origin: a random one as a pipe draws it, or any 1 to 64 printable ASCII
/// characters.
fn origin() -> BoxedStrategy<Origin> {
    prop_oneof![
        any::<u128>().prop_map(|n| format!("{n:032x}")),
        "[!-~]{1,64}",
    ]
    .prop_map(|text| Origin::parse(&text).expect("a valid origin"))
    .boxed()
}

// ---- Envelope-shaped text, from a grammar -----------------------------------------------

fn quoted(text: &str) -> String {
    serde_json::to_string(text).expect("a string always serializes")
}

/// JSON numbers and near-numbers, around every bound the decoder has.
fn json_number() -> BoxedStrategy<String> {
    let edges = [
        "0",
        "1",
        "2",
        "3",
        "4",
        "-1",
        "-0",
        "1.0",
        "1.5",
        "1e3",
        "01",
        "4294967295",
        "4294967296",
        "9007199254740993",
        "18446744073709551615",
        "18446744073709551616",
        "-9223372036854775808",
    ];
    prop_oneof![
        3 => select(edges.to_vec()).prop_map(str::to_owned),
        1 => any::<u64>().prop_map(|n| n.to_string()),
        1 => any::<i64>().prop_map(|n| n.to_string()),
        1 => any::<f64>().prop_map(|n| n.to_string()),
    ]
    .boxed()
}

/// A JSON string literal, escapes included, valid or not (lone surrogates, raw control
/// characters, a bad escape).
fn json_string() -> BoxedStrategy<String> {
    let escapes = [
        "\\\"",
        "\\\\",
        "\\/",
        "\\n",
        "\\u0000",
        "\\u0010",
        "\\u00e9",
        "\\ud83d\\ude00",
        "\\ud800",
        "\\udc00",
        "\\x",
        "\u{10}",
        "\n",
        "é",
        "😀",
        "\"",
    ];
    let piece = prop_oneof![
        6 => "[a-zA-Z0-9 ;:,*/._$-]{1,8}",
        2 => select(escapes.to_vec()).prop_map(str::to_owned),
        1 => any::<char>().prop_map(String::from),
    ];
    vec(piece, 0..5)
        .prop_map(|pieces| format!("\"{}\"", pieces.concat()))
        .boxed()
}

/// Any JSON-ish value: scalars, arrays and objects of them, and nesting past the decoder's
/// depth bound.
fn json_value() -> BoxedStrategy<String> {
    let leaf = prop_oneof![
        json_number(),
        json_string(),
        select(vec!["true", "false", "null"]).prop_map(str::to_owned),
    ];
    let nested = leaf.prop_recursive(3, 16, 4, |inner| {
        prop_oneof![
            vec(inner.clone(), 0..4).prop_map(|items| format!("[{}]", items.join(","))),
            vec((json_string(), inner), 0..4).prop_map(|members| {
                let members: Vec<String> =
                    members.iter().map(|(k, v)| format!("{k}:{v}")).collect();
                format!("{{{}}}", members.join(","))
            }),
        ]
    });
    prop_oneof![
        8 => nested,
        1 => (0usize..=12).prop_map(|depth| format!("{}{}", "[".repeat(depth), "]".repeat(depth))),
    ]
    .boxed()
}

/// A JSON object from its members, in the order given, with `ws` around the separators.
fn object(members: &[(String, String)], ws: &str) -> String {
    let members: Vec<String> = members
        .iter()
        .map(|(key, value)| format!("{key}{ws}:{ws}{value}"))
        .collect();
    format!("{{{ws}{}{ws}}}", members.join(&format!("{ws},{ws}")))
}

/// Whitespace between tokens: mostly none, as written.
fn whitespace() -> BoxedStrategy<&'static str> {
    prop_oneof![8 => Just(""), 1 => Just(" "), 1 => Just("\n\t ")].boxed()
}

/// A member that no version 1 field claims: `g` (a signature), a future field, an update
/// field in the wrong place.
fn extra_member() -> BoxedStrategy<(String, String)> {
    let key = prop_oneof![
        3 => select(vec!["g", "x", "future", "V", "Type", "u "]).prop_map(quoted),
        1 => json_string(),
    ];
    (key, json_value()).boxed()
}

/// Sequence-set text: valid, a single number (what a flags update needs), or junk.
fn seq_set_ish() -> BoxedStrategy<String> {
    prop_oneof![
        4 => seq_set_text().prop_map(|(text, _)| text),
        3 => seq_num_text(),
        1 => "[0-9*:, x-]{0,12}",
    ]
    .boxed()
}

/// `valid`, or now and then (one in 21) a value of another shape: a number, a string or
/// any value. An envelope has a dozen values or more, so most envelopes stay valid.
fn or_wrong(valid: impl Strategy<Value = String> + 'static) -> BoxedStrategy<String> {
    prop_oneof![
        60 => valid,
        1 => json_number(),
        1 => json_string(),
        1 => json_value(),
    ]
    .boxed()
}

/// An update object from the grammar: keys in any order, each value usually valid.
fn update_object() -> BoxedStrategy<String> {
    let kind = or_wrong((0u8..=3).prop_map(|t| t.to_string()));
    let key = or_wrong(prop_oneof![
        any::<u64>().prop_map(|n| n.to_string()),
        tricky_text().prop_map(|text| quoted(&text)),
    ]);
    let seq = or_wrong(prop_oneof![
        12 => seq_set_ish().prop_map(|text| quoted(&text)),
        1 => Just("null".to_owned()),
    ]);
    let flag = or_wrong(prop_oneof![
        20 => flag_text().prop_map(|text| quoted(&text)),
        1 => "[ -~]{0,6}".prop_map(|text| quoted(&text)),
    ]);
    let flags = or_wrong(prop_oneof![
        8 => vec(flag, 0..4).prop_map(|flags| format!("[{}]", flags.join(","))),
        1 => Just("null".to_owned()),
    ]);
    let members = (
        weighted(0.98, kind),
        weighted(0.98, key),
        weighted(0.8, seq),
        weighted(0.3, flags),
        weighted(0.05, extra_member()),
    )
        .prop_map(|(kind, key, seq, flags, extra)| {
            present(
                [
                    ("Type", kind),
                    ("Key", key),
                    ("SeqSet", seq),
                    ("NewFlags", flags),
                ],
                extra,
            )
        })
        .prop_shuffle();
    (members, whitespace())
        .prop_map(|(members, ws)| object(&members, ws))
        .boxed()
}

/// The members that are present, each name quoted, then the extra ones.
fn present<const N: usize>(
    named: [(&str, Option<String>); N],
    extra: impl IntoIterator<Item = (String, String)>,
) -> Vec<(String, String)> {
    let mut members: Vec<(String, String)> = named
        .into_iter()
        .filter_map(|(name, value)| Some((quoted(name), value?)))
        .collect();
    members.extend(extra);
    members
}

/// An update as JSON: a valid one as encoded, or one from the grammar.
fn update_json() -> BoxedStrategy<String> {
    prop_oneof![
        2 => update().prop_map(|update| update.to_json()),
        3 => update_object(),
    ]
    .boxed()
}

/// An envelope object from the grammar: the version 1 keys (`v o p s t d r h w u`) in any
/// order, each value usually valid, now and then missing, mistyped or joined by another.
fn envelope_object() -> BoxedStrategy<String> {
    let version = or_wrong(prop_oneof![
        20 => Just("1".to_owned()),
        1 => select(vec!["0", "2", "18446744073709551615"]).prop_map(str::to_owned),
    ]);
    let origin = or_wrong(prop_oneof![
        20 => "[!-~]{1,64}".prop_map(|text| quoted(&text)),
        1 => "[ -~]{0,66}".prop_map(|text| quoted(&text)),
    ]);
    let pid = or_wrong(prop_oneof![
        8 => any::<u32>().prop_map(|n| n.to_string()),
        1 => Just("null".to_owned()),
    ]);
    let seq = or_wrong(any::<u64>().prop_map(|n| n.to_string()));
    let mark = || or_wrong(select(vec!["0", "1", "true", "false", "null"]).prop_map(str::to_owned));
    let time = or_wrong(any::<u64>().prop_map(|n| n.to_string()));
    let updates =
        or_wrong(vec(update_json(), 0..5).prop_map(|updates| format!("[{}]", updates.join(","))));
    let members = (
        weighted(0.98, version),
        weighted(0.98, origin),
        weighted(0.7, pid),
        weighted(0.98, seq),
        weighted(0.15, mark()),
        weighted(0.15, mark()),
        weighted(0.1, mark()),
        weighted(0.1, mark()),
        weighted(0.1, time),
        weighted(0.98, updates),
        weighted(0.1, extra_member()),
    )
        .prop_map(|(v, o, p, s, t, d, r, h, w, u, extra)| {
            present(
                [
                    ("v", v),
                    ("o", o),
                    ("p", p),
                    ("s", s),
                    ("t", t),
                    ("d", d),
                    ("r", r),
                    ("h", h),
                    ("w", w),
                    ("u", u),
                ],
                extra,
            )
        })
        .prop_shuffle();
    (members, whitespace())
        .prop_map(|(members, ws)| object(&members, ws))
        .boxed()
}

/// A legacy maddy payload: `<sender id>;<update JSON with ';' as 0x10>`, usually with the
/// trailing newline. The sender is usually valid (and never starts with `{`, which would
/// make the payload a version 1 envelope).
fn legacy_payload() -> BoxedStrategy<String> {
    let sender = prop_oneof![
        8 => "[!-:<-z|-~][!-:<-~]{0,63}",
        1 => ".{0,70}",
    ];
    (sender, update_json(), weighted(0.8, Just("\n")))
        .prop_map(|(sender, json, newline)| {
            let json = json.replace(';', "\u{10}");
            format!("{sender};{json}{}", newline.unwrap_or(""))
        })
        .boxed()
}

/// A valid envelope of `len` bytes (with `"p"` or without), for lengths around the
/// notification's bound.
fn sized_envelope(len: usize, with_pid: bool) -> String {
    let pid = if with_pid { "\"p\":1," } else { "" };
    let head = format!("{{\"v\":1,\"o\":\"a\",{pid}\"s\":1,\"u\":[{{\"Type\":3,\"Key\":\"");
    let tail = "\"}]}";
    let pad = len.saturating_sub(head.len() + tail.len());
    format!("{head}{}{tail}", "x".repeat(pad))
}

/// Envelope-shaped text for the decoder: grammar envelopes, legacy payloads, and both cut
/// short, with a character slipped in, or sized around 7999 bytes.
fn shaped_payload() -> BoxedStrategy<String> {
    prop_oneof![
        12 => envelope_object(),
        3 => legacy_payload(),
        2 => (envelope_object(), any::<Index>()).prop_map(|(text, at)| {
            let cut = char_boundary(&text, at);
            text[..cut].to_owned()
        }),
        2 => (envelope_object(), any::<Index>(), any::<char>()).prop_map(|(mut text, at, c)| {
            let at = char_boundary(&text, at);
            text.insert(at, c);
            text
        }),
        1 => (whitespace(), envelope_object()).prop_map(|(ws, text)| format!("{ws}{text}")),
        1 => (MAX_PAYLOAD_LEN - 8..=MAX_PAYLOAD_LEN + 2, any::<bool>())
            .prop_map(|(len, with_pid)| sized_envelope(len, with_pid)),
    ]
    .boxed()
}

/// A character boundary of `text` picked by `at`.
fn char_boundary(text: &str, at: Index) -> usize {
    let bounds: Vec<usize> = text
        .char_indices()
        .map(|(i, _)| i)
        .chain([text.len()])
        .collect();
    bounds[at.index(bounds.len())]
}

// ---- The properties --------------------------------------------------------------------

/// `envelope`, decoded from `input`, encodes to version 1 and decodes back to the same
/// origin, number, pid and updates (an absent number is written as 0), and that
/// form is a fixed point.
fn check_round_trip(input: &str, envelope: &Envelope, from_log: bool) -> Result<(), TestCaseError> {
    let encoded = match envelope.encode() {
        Ok(encoded) => encoded,
        Err(Error::PayloadTooLarge { size, limit }) => {
            prop_assert!(size > limit, "too large at {} of {} bytes", size, limit);
            // The version 1 form drops whitespace, marks and unknown fields, and never
            // writes a string or a number longer than it can be read. It may still grow
            // past a notification: from a log row (up to 1 MiB), or from a legacy payload (the
            // envelope around the update).
            prop_assert!(
                from_log || envelope.format() == WireFormat::Legacy,
                "{:?} decodes as a notification, but its version 1 form is {} bytes",
                input,
                size
            );
            return Ok(());
        }
        Err(e) => {
            return Err(TestCaseError::fail(format!(
                "decodes, but does not encode: {e}"
            )));
        }
    };
    let again = Envelope::decode(&encoded).map_err(|e| {
        TestCaseError::fail(format!(
            "re-encodes as {encoded:?}, which does not decode: {e}"
        ))
    })?;
    prop_assert_eq!(again.format(), WireFormat::V1);
    prop_assert_eq!(again.origin(), envelope.origin());
    prop_assert_eq!(again.seq(), Some(envelope.seq().unwrap_or(0)));
    prop_assert_eq!(again.pid(), envelope.pid());
    prop_assert_eq!(again.updates(), envelope.updates());
    prop_assert_eq!(again.encode().ok(), Some(encoded));
    Ok(())
}

/// Decodes `payload` both ways; whatever decodes must round-trip, and a version 1
/// notification must read the same as a log row.
fn check_decoders(payload: &str) -> Result<(), TestCaseError> {
    let notification = Envelope::decode(payload);
    let logged = Envelope::decode_logged(payload);
    if let Ok(envelope) = &notification {
        check_round_trip(payload, envelope, false)?;
        if envelope.format() == WireFormat::V1 {
            prop_assert_eq!(logged.as_ref(), Ok(envelope), "the readers disagree");
        }
    }
    if let Ok(envelope) = &logged {
        check_round_trip(payload, envelope, true)?;
    }
    Ok(())
}

proptest! {
    #![proptest_config(cases(1024))]

    /// (a) Arbitrary text never panics the decoder.
    #[test]
    fn arbitrary_text_never_panics(text in any::<String>()) {
        check_decoders(&text)?;
    }

    /// (a) Arbitrary text behind the start of an envelope or a legacy payload, so that it
    /// reaches the JSON parser.
    #[test]
    fn arbitrary_text_after_an_envelope_start_never_panics(
        start in select(vec!["{", "{\"v\":1,", "{\"v\":1,\"o\":\"a\",\"s\":1,\"u\":[", "id;{", "id;{\"Type\":"]),
        text in any::<String>(),
    ) {
        check_decoders(&format!("{start}{text}"))?;
    }

    /// (d) Whatever parses as a sequence set prints as text that parses back to it.
    #[test]
    fn parsed_seq_sets_print_and_parse_back(
        text in prop_oneof![
            3 => "[0-9*:,]{0,24}",
            1 => "[0-9*:, x+-]{0,12}",
            1 => any::<String>(),
            1 => (seq_set_text(), any::<Index>(), any::<char>()).prop_map(|((mut text, _), at, c)| {
                let at = char_boundary(&text, at);
                text.insert(at, c);
                text
            }),
        ],
    ) {
        if let Ok(set) = SeqSet::parse(&text) {
            let printed = set.to_string();
            prop_assert!(printed.len() <= text.len(), "{:?} prints longer, as {:?}", text, printed);
            prop_assert_eq!(SeqSet::parse(&printed), Ok(set));
        }
    }

    /// (d) A valid sequence set prints as written, `n:n` shortened to `n`.
    #[test]
    fn valid_seq_sets_print_as_written((text, printed) in seq_set_text()) {
        let set = SeqSet::parse(&text).map_err(|e| TestCaseError::fail(e.to_string()))?;
        prop_assert_eq!(set.to_string(), printed.as_str());
        prop_assert_eq!(SeqSet::parse(&printed), Ok(set));
    }
}

proptest! {
    #![proptest_config(cases(2048))]

    /// (a) and (c) Envelope-shaped text never panics the decoder, and whatever decodes
    /// re-encodes to an equivalent envelope.
    #[test]
    fn shaped_payloads_never_panic_and_round_trip(payload in shaped_payload()) {
        check_decoders(&payload)?;
    }
}

proptest! {
    #![proptest_config(cases(512))]

    /// (b) Valid updates in a version 1 envelope decode to the same updates, origin, pid
    /// and number, and the payload is the canonical form.
    #[test]
    fn valid_updates_survive_a_v1_envelope(
        origin in origin(),
        pid in any::<u32>(),
        seq in any::<u64>(),
        updates in vec(update(), 0..8),
    ) {
        let payload = match Envelope::encode_v1(&origin, pid, seq, &updates) {
            Ok(payload) => payload,
            Err(Error::PayloadTooLarge { size, limit }) => {
                prop_assert!(size > limit);
                return Err(TestCaseError::reject("too large for one notification"));
            }
            Err(e) => return Err(TestCaseError::fail(e.to_string())),
        };
        prop_assert!(payload.len() <= MAX_PAYLOAD_LEN);
        let envelope = Envelope::decode(&payload)
            .map_err(|e| TestCaseError::fail(format!("{payload:?}: {e}")))?;
        prop_assert_eq!(envelope.format(), WireFormat::V1);
        prop_assert_eq!(envelope.origin(), &origin);
        prop_assert_eq!(envelope.pid(), Some(pid));
        prop_assert_eq!(envelope.seq(), Some(seq));
        prop_assert_eq!(envelope.updates(), updates.as_slice());
        prop_assert_eq!(envelope.encode().ok(), Some(payload.clone()));
        prop_assert_eq!(Envelope::decode_logged(&payload), Ok(envelope));
    }

    /// (b) A valid update in maddy's legacy form decodes to the same update and sender.
    #[test]
    fn a_valid_update_survives_the_legacy_form(
        // Not starting with `{`, which would make it a version 1 envelope.
        sender in "[!-:<-z|-~][!-:<-~]{0,63}",
        update in update(),
    ) {
        let payload = Envelope::encode_legacy(&sender, &update);
        prop_assume!(payload.len() <= MAX_PAYLOAD_LEN, "too large for one notification");
        let envelope = Envelope::decode(&payload)
            .map_err(|e| TestCaseError::fail(format!("{payload:?}: {e}")))?;
        prop_assert_eq!(envelope.format(), WireFormat::Legacy);
        prop_assert_eq!(envelope.origin().as_str(), sender.as_str());
        prop_assert_eq!(envelope.updates(), std::slice::from_ref(&update));
        prop_assert_eq!(envelope.seq(), None);
        check_round_trip(&payload, &envelope, false)?;
    }

    /// (b) A valid update survives its JSON contract.
    #[test]
    fn a_valid_update_survives_its_json(update in update()) {
        prop_assert_eq!(Update::from_json(&update.to_json()), Ok(update));
    }
}

/// The grammar is worth its cases only while it reaches past the JSON parser: a good share
/// of its payloads must decode, and the rest must fail in each of the decoder's ways. A
/// decoder that gains a required field fails here until the grammar learns it.
#[test]
fn shaped_payloads_reach_every_outcome() {
    const SAMPLES: usize = 1000;
    let mut runner = TestRunner::deterministic();
    let strategy = shaped_payload();
    let (mut decoded, mut with_updates) = (0, 0);
    let (mut unrecognized, mut version, mut malformed) = (0, 0, 0);
    let (mut update, mut too_large, mut over_limit) = (0, 0, 0);
    for _ in 0..SAMPLES {
        let payload = strategy.new_tree(&mut runner).expect("a payload").current();
        match Envelope::decode(&payload) {
            Ok(envelope) => {
                decoded += 1;
                with_updates += usize::from(!envelope.updates().is_empty());
            }
            Err(DecodeError::Unrecognized) => unrecognized += 1,
            Err(DecodeError::UnknownVersion(_)) => version += 1,
            Err(DecodeError::Malformed(_)) => malformed += 1,
            Err(DecodeError::Update(_)) => update += 1,
            Err(DecodeError::TooLarge(_)) => too_large += 1,
            Err(DecodeError::OverLimit { .. }) => over_limit += 1,
            Err(other) => panic!("{payload:?}: unexpected {other:?}"),
        }
    }
    let outcomes = format!(
        "decoded {decoded} ({with_updates} with updates), unrecognized {unrecognized}, \
         unknown version {version}, malformed {malformed}, invalid update {update}, \
         too large {too_large}, over a limit {over_limit}, of {SAMPLES}"
    );
    eprintln!("{outcomes}");
    assert!(decoded * 4 >= SAMPLES, "too few decode: {outcomes}");
    assert!(
        with_updates * 5 >= SAMPLES,
        "too few carry updates: {outcomes}"
    );
    for count in [
        unrecognized,
        version,
        malformed,
        update,
        too_large,
        over_limit,
    ] {
        assert!(count > 0, "an outcome is never reached: {outcomes}");
    }
}
