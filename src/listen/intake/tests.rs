//! Every verdict of the intake, without a server.

use std::time::Duration;

use super::*;
use crate::config::Config;
use crate::envelope::{Marks, Packer};
use crate::error::ReplayKind;
use crate::sign::Secret;

const CHANNEL: &str = "mail";

fn config() -> Config {
    Config::from_url("postgres://u@localhost/db")
        .unwrap()
        .with_channel(crate::channel::ChannelName::new(CHANNEL).unwrap())
}

fn signed(config: Config) -> Config {
    config.with_secrets(vec![Secret::new("a shared secret, long enough").unwrap()])
}

fn intake(config: &Config) -> Intake {
    Intake::new(&Settings::from_config(config), origin("me"))
}

fn origin(name: &str) -> Origin {
    Origin::parse(name).unwrap()
}

fn update(key: u64) -> Update {
    Update::mailbox_destroyed(key)
}

/// A packer for `sender`, signing as `config` says.
fn packer(config: &Config, sender: &str) -> Packer {
    Packer::new(&origin(sender), 7, config.signer())
}

/// One envelope of `sender` numbered `seq`, with these marks.
fn envelope(config: &Config, sender: &str, seq: u64, marks: Marks, updates: &[Update]) -> String {
    let encoded: Vec<String> = updates.iter().map(Update::to_json).collect();
    let mut packed = packer(config, sender).pack(encoded.iter().map(String::as_str), marks, || seq);
    assert_eq!(packed.len(), 1);
    packed.remove(0).1
}

fn plain(config: &Config, sender: &str, seq: u64) -> String {
    envelope(config, sender, seq, Marks::default(), &[update(seq)])
}

const DURABLE: Marks = Marks {
    transactional: false,
    durable: true,
};

fn on(payload: &str) -> Incoming<'_> {
    Incoming {
        channel: CHANNEL,
        payload,
        sender_pid: 42,
    }
}

fn updates(keys: &[u64]) -> Verdict {
    Verdict::Carries(Carried {
        best_effort_sender: false,
        gap: None,
        content: Content::Updates(keys.iter().map(|&k| update(k)).collect()),
    })
}

#[test]
fn another_channel_is_ignored() {
    let config = config();
    let payload = plain(&config, "other", 1);
    let incoming = Incoming {
        channel: "elsewhere",
        ..on(&payload)
    };
    assert_eq!(
        intake(&config).classify(incoming, Moment::now()),
        Verdict::OtherChannel
    );
}

#[test]
fn another_senders_updates_are_delivered() {
    let config = config();
    let mut intake = intake(&config);
    assert_eq!(
        intake.classify(on(&plain(&config, "other", 1)), Moment::now()),
        updates(&[1])
    );
    // maddy's legacy form too.
    let legacy = Envelope::encode_legacy("12-0xc000", &update(9));
    assert_eq!(intake.classify(on(&legacy), Moment::now()), updates(&[9]));
}

#[test]
fn garbage_and_what_exceeds_the_limits_are_rejected() {
    let config = config();
    let mut intake = intake(&config);
    assert_eq!(
        intake.classify(on("not an envelope"), Moment::now()),
        Verdict::Rejected(DecodeError::Unrecognized)
    );
    let limited = config
        .clone()
        .with_limits(Limits::default().with_max_updates(1));
    let two = envelope(
        &limited,
        "other",
        1,
        Marks::default(),
        &[update(1), update(2)],
    );
    let verdict = Intake::new(&Settings::from_config(&limited), origin("me"))
        .classify(on(&two), Moment::now());
    assert!(
        matches!(verdict, Verdict::Rejected(DecodeError::OverLimit { .. })),
        "{verdict:?}"
    );
}

#[test]
fn own_pushes_are_echoes_and_not_noted() {
    let config = config();
    let mut intake = intake(&config);
    assert_eq!(
        intake.classify(on(&plain(&config, "me", 1)), Moment::now()),
        Verdict::Echo
    );
    assert_eq!(
        intake.classify(on(&plain(&config, "me", 5)), Moment::now()),
        Verdict::Echo
    );
    assert_eq!(intake.gaps.len(), 0);
}

/// The IDLE hub's listener delivers its own pipe's updates: numbered like any sender's,
/// durable ones read from the log; its own heartbeats stay its own.
#[test]
fn own_updates_are_carried_when_the_listener_delivers_them() {
    let config = config();
    let mut settings = Settings::from_config(&config);
    settings.own_updates = true;
    let mut intake = Intake::new(&settings, origin("me"));
    assert!(matches!(
        intake.classify(on(&plain(&config, "me", 1)), Moment::now()),
        Verdict::Carries(Carried { gap: None, .. })
    ));
    assert!(matches!(
        intake.classify(on(&plain(&config, "me", 3)), Moment::now()),
        Verdict::Carries(Carried { gap: Some(_), .. })
    ));
    assert_eq!(
        intake.classify(on(&packer(&config, "me").heartbeat(4)), Moment::now()),
        Verdict::Heartbeat { own: Some(4) }
    );
    let durable = config.with_durable(true);
    let mut settings = Settings::from_config(&durable);
    settings.own_updates = true;
    let mut intake = Intake::new(&settings, origin("me"));
    let payload = envelope(&durable, "me", 5, DURABLE, &[update(5)]);
    assert_eq!(
        intake.classify_row(row("me", 5, &payload), Moment::now()),
        RowVerdict::Updates(vec![update(5)])
    );
}

#[test]
fn heartbeats_own_with_their_number_and_others() {
    let config = config();
    let mut intake = intake(&config);
    let own = packer(&config, "me").heartbeat(3);
    assert_eq!(
        intake.classify(on(&own), Moment::now()),
        Verdict::Heartbeat { own: Some(3) }
    );
    let others = packer(&config, "other").heartbeat(3);
    assert_eq!(
        intake.classify(on(&others), Moment::now()),
        Verdict::Heartbeat { own: None }
    );
}

#[test]
fn a_skipped_number_is_a_gap_but_not_in_a_transaction() {
    let config = config();
    let mut intake = intake(&config);
    intake.classify(on(&plain(&config, "other", 1)), Moment::now());
    let verdict = intake.classify(on(&plain(&config, "other", 4)), Moment::now());
    let gap = ResyncReason::SequenceGap {
        origin: "other".into(),
        expected: 2,
        got: 4,
    };
    assert_eq!(
        verdict,
        Verdict::Carries(Carried {
            best_effort_sender: false,
            gap: Some(gap),
            content: Content::Updates(vec![update(4)]),
        })
    );
    let in_transaction = Marks {
        transactional: true,
        durable: false,
    };
    let payload = envelope(&config, "other", 9, in_transaction, &[update(9)]);
    assert_eq!(intake.classify(on(&payload), Moment::now()), updates(&[9]));
    assert_eq!(
        intake.classify(on(&plain(&config, "other", 5)), Moment::now()),
        updates(&[5])
    );
}

#[test]
fn a_reconnect_forgets_numbers_in_best_effort() {
    let config = config();
    let mut intake = intake(&config);
    intake.classify(on(&plain(&config, "other", 1)), Moment::now());
    intake.on_reconnect();
    assert_eq!(
        intake.classify(on(&plain(&config, "other", 9)), Moment::now()),
        updates(&[9])
    );
}

#[test]
fn durable_mode_reads_durable_envelopes_from_the_log() {
    let config = config().with_durable(true);
    let mut intake = intake(&config);
    let durable = envelope(&config, "other", 1, DURABLE, &[update(1)]);
    assert_eq!(intake.classify(on(&durable), Moment::now()), Verdict::InLog);
    let reference = packer(&config, "other").reference(2, DURABLE);
    assert_eq!(
        intake.classify(on(&reference), Moment::now()),
        Verdict::InLog
    );
    // A best-effort sender is heard: a disconnect loses its updates.
    let verdict = intake.classify(on(&plain(&config, "pool", 1)), Moment::now());
    assert_eq!(
        verdict,
        Verdict::Carries(Carried {
            best_effort_sender: true,
            gap: None,
            content: Content::Updates(vec![update(1)]),
        })
    );
    // Numbers go on across a reconnect: the log has what was missed.
    intake.on_reconnect();
    let verdict = intake.classify(on(&plain(&config, "pool", 3)), Moment::now());
    assert!(
        matches!(&verdict, Verdict::Carries(Carried { gap: Some(_), .. })),
        "{verdict:?}"
    );
}

#[test]
fn references_are_fetched_and_forged_without_the_durable_mark() {
    let config = config();
    let mut intake = intake(&config);
    let reference = packer(&config, "other").reference(1, DURABLE);
    assert_eq!(
        intake.classify(on(&reference), Moment::now()),
        Verdict::Carries(Carried {
            best_effort_sender: false,
            gap: None,
            content: Content::Fetch {
                origin: origin("other"),
                seq: 1,
            },
        })
    );
    let forged = packer(&config, "other").reference(3, Marks::default());
    let Verdict::Carries(carried) = intake.classify(on(&forged), Moment::now()) else {
        panic!("a reference carries");
    };
    // Its number is noted all the same.
    assert!(carried.gap.is_some());
    assert!(matches!(
        carried.content,
        Content::Refused(DecodeError::Malformed(_))
    ));
}

#[test]
fn with_signing_unsigned_forged_and_replayed_are_rejected() {
    let config = signed(config());
    let mut intake = intake(&config);
    let good = plain(&config, "other", 1);
    assert_eq!(intake.classify(on(&good), Moment::now()), updates(&[1]));
    assert_eq!(
        intake.classify(on(&good), Moment::now()),
        Verdict::Rejected(DecodeError::Replayed(ReplayKind::Number))
    );
    let unsigned = plain(&self::config(), "other", 2);
    assert_eq!(
        intake.classify(on(&unsigned), Moment::now()),
        Verdict::Rejected(DecodeError::Unsigned)
    );
    let other_key = config
        .clone()
        .with_secrets(vec![Secret::new("another secret, long").unwrap()]);
    let forged = plain(&other_key, "other", 3);
    assert_eq!(
        intake.classify(on(&forged), Moment::now()),
        Verdict::Rejected(DecodeError::Forged)
    );
    let later = Moment {
        wall: SystemTime::now() + config.listen_options().replay_window() + Duration::from_secs(1),
        mono: Instant::now(),
    };
    assert_eq!(
        intake.classify(on(&plain(&config, "other", 4)), later),
        Verdict::Rejected(DecodeError::Replayed(ReplayKind::Stale))
    );
    let too_large = "x".repeat(MAX_PAYLOAD_LEN + 1);
    assert_eq!(
        intake.classify(on(&too_large), Moment::now()),
        Verdict::Rejected(DecodeError::TooLarge(MAX_PAYLOAD_LEN + 1))
    );
}

#[test]
fn with_signing_unsigned_may_be_accepted() {
    let config = signed(config()).with_listen(|l| l.with_accept_unsigned(true));
    let mut intake = intake(&config);
    let unsigned = plain(&self::config(), "other", 1);
    assert_eq!(intake.classify(on(&unsigned), Moment::now()), updates(&[1]));
    // Unsigned, it is not checked for replays.
    assert_eq!(intake.classify(on(&unsigned), Moment::now()), updates(&[1]));
}

fn row<'a>(origin: &'a str, seq: i64, payload: &'a str) -> LogRow<'a> {
    written_row(origin, seq, payload, SystemTime::now())
}

/// A log row written at `at` (the server sets it).
fn written_row<'a>(origin: &'a str, seq: i64, payload: &'a str, at: SystemTime) -> LogRow<'a> {
    LogRow {
        origin,
        seq,
        payload,
        written_at: at
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs_f64(),
    }
}

#[test]
fn log_rows_their_senders_durable_envelopes() {
    let config = config().with_durable(true);
    let mut intake = intake(&config);
    let payload = envelope(&config, "other", 5, DURABLE, &[update(5)]);
    assert_eq!(
        intake.classify_row(row("other", 5, &payload), Moment::now()),
        RowVerdict::Updates(vec![update(5)])
    );
    assert_eq!(
        intake.classify_row(row("me", 5, &payload), Moment::now()),
        RowVerdict::Own
    );
    // Another sender or number than the envelope's, or not a durable envelope.
    for (sender, seq, payload) in [
        ("else", 5, payload.clone()),
        ("other", 6, payload.clone()),
        ("other", 5, plain(&config, "other", 5)),
        ("other", 5, packer(&config, "other").reference(5, DURABLE)),
    ] {
        let verdict = intake.classify_row(row(sender, seq, &payload), Moment::now());
        assert!(
            matches!(
                verdict,
                RowVerdict::Refused {
                    error: DecodeError::Malformed(_),
                    resync: true
                }
            ),
            "{verdict:?}"
        );
    }
    let garbage = intake.classify_row(row("other", 1, "{"), Moment::now());
    assert!(
        matches!(garbage, RowVerdict::Refused { resync: true, .. }),
        "{garbage:?}"
    );
}

#[test]
fn signed_log_rows_forged_unsigned_or_too_large_owe_no_resync() {
    let config = signed(config().with_durable(true));
    let mut intake = intake(&config);
    let payload = envelope(&config, "other", 5, DURABLE, &[update(5)]);
    assert_eq!(
        intake.classify_row(row("other", 5, &payload), Moment::now()),
        RowVerdict::Updates(vec![update(5)])
    );
    // Read again (a log row is exactly once by the cursor, not by the replay guard).
    assert_eq!(
        intake.classify_row(row("other", 5, &payload), Moment::now()),
        RowVerdict::Updates(vec![update(5)])
    );
    let unsigned = envelope(&self::config(), "other", 6, DURABLE, &[update(6)]);
    let too_large = "x".repeat(MAX_LOGGED_ENVELOPE_LEN + 1);
    for (seq, payload, error) in [
        (6, payload.as_str(), DecodeError::Forged),
        (6, unsigned.as_str(), DecodeError::Unsigned),
        (
            7,
            too_large.as_str(),
            DecodeError::TooLarge(too_large.len()),
        ),
    ] {
        assert_eq!(
            intake.classify_row(row("other", seq, payload), Moment::now()),
            RowVerdict::Refused {
                error,
                resync: false
            }
        );
    }
    // Read long after it was written (a row kept for a named consumer, past the
    // retention): as good as new.
    let long_after = Moment {
        wall: SystemTime::now() + 30 * config.listen_options().retention(),
        mono: Instant::now(),
    };
    assert!(matches!(
        intake.classify_row(row("other", 5, &payload), long_after),
        RowVerdict::Updates(_)
    ));
    // Copied into a row written later than the window allows: refused, a committed update
    // lost (its first row was pruned, or this one is a copy).
    let copied =
        SystemTime::now() + config.listen_options().replay_window() + Duration::from_secs(1);
    assert_eq!(
        intake.classify_row(written_row("other", 5, &payload, copied), Moment::now()),
        RowVerdict::Refused {
            error: DecodeError::Replayed(ReplayKind::Stale),
            resync: true
        }
    );
}

/// The intake of a maddy-layout listener subscribed to mailbox 42.
fn subscribed(config: &Config) -> Intake {
    let mut intake = intake(&config.clone().with_layout(crate::Layout::Maddy));
    let (reply, _) = tokio::sync::oneshot::channel();
    intake
        .subscriptions
        .apply(super::super::subscriptions::Command::Subscribe(
            42u64.into(),
            reply,
        ));
    intake
}

fn on_mailbox(payload: &str) -> Incoming<'_> {
    Incoming {
        channel: "__uint64_42",
        ..on(payload)
    }
}

#[test]
fn maddy_updates_on_subscribed_mailboxes_are_delivered() {
    let config = config();
    let mut intake = subscribed(&config);
    let legacy = Envelope::encode_legacy("12-0xc000", &update(42));
    assert_eq!(
        intake.classify(on_mailbox(&legacy), Moment::now()),
        updates(&[42])
    );
    // Not subscribed: not served.
    let elsewhere = Incoming {
        channel: "__uint64_43",
        ..on(&legacy)
    };
    assert_eq!(
        intake.classify(elsewhere, Moment::now()),
        Verdict::OtherChannel
    );
    // Only maddy's form on a mailbox's channel.
    assert_eq!(
        intake.classify(on_mailbox(&plain(&config, "other", 1)), Moment::now()),
        Verdict::Rejected(DecodeError::Unrecognized)
    );
}

#[test]
fn copies_from_updatepipe_senders_are_dropped_wherever_they_come() {
    let config = config();
    let mut intake = subscribed(&config);
    let copy = Envelope::encode_legacy("updatepipe-0123abcd.7", &update(42));
    assert_eq!(
        intake.classify(on_mailbox(&copy), Moment::now()),
        Verdict::CopyForMaddy
    );
    assert_eq!(
        intake.classify(on(&copy), Moment::now()),
        Verdict::CopyForMaddy
    );
}

#[test]
fn a_maddy_update_the_pipe_refuses_asks_for_a_resync_of_its_mailbox() {
    let config = config();
    let mut intake = subscribed(&config);
    let payload = "12-0xc000;{\"Type\":1,\"Key\":42,\"SeqSet\":\"3\",\"NewFlags\":[\"é\"]}\n";
    match intake.classify(on_mailbox(payload), Moment::now()) {
        Verdict::Unrepresentable { key, error } => {
            assert_eq!(key, MailboxKey::Id(42));
            assert!(matches!(error, DecodeError::Update(_)), "{error:?}");
        }
        other => panic!("unexpected {other:?}"),
    }
    // Garbage is only garbage.
    assert!(matches!(
        intake.classify(on_mailbox("12-0xc000;{\"Type\":"), Moment::now()),
        Verdict::Rejected(DecodeError::Malformed(_))
    ));
}

#[test]
fn with_signing_on_maddy_updates_need_an_explicit_yes() {
    let legacy = Envelope::encode_legacy("12-0xc000", &update(42));
    let mut refusing = subscribed(&signed(config()));
    assert_eq!(
        refusing.classify(on_mailbox(&legacy), Moment::now()),
        Verdict::Rejected(DecodeError::Unsigned)
    );
    let mut accepting = subscribed(&signed(config()).with_listen(|l| l.with_accept_maddy(true)));
    assert_eq!(
        accepting.classify(on_mailbox(&legacy), Moment::now()),
        updates(&[42])
    );
}
