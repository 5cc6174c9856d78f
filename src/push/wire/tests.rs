//! The wire's tests, without a server: numbers, forms, and the commit-order invariant.
use std::pin::pin;
use std::task::Waker;

use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};

use super::statements::{NOTIFY_MANY, NOTIFY_ONE};
use super::*;
use crate::log::{LOG_AND_NOTIFY, LOG_AND_NOTIFY_MAPPED};
use crate::origin::Origin;
use tokio_postgres::types::Type;

fn wire(durable: bool) -> Wire {
    let origin = Origin::random();
    let packer = Packer::new(&origin, 1, None);
    Wire::new("ch".to_owned(), origin.as_str().to_owned(), durable, packer)
}

/// A server on an in-memory stream that answers the startup (AuthenticationOk and
/// ReadyForQuery), then `prepares` preparations (ParseComplete, the parameter types
/// asked for, NoData, ReadyForQuery), and nothing more. Returns its end of the stream.
async fn fake_server(mut server: DuplexStream, prepares: usize) -> DuplexStream {
    let len = server.read_u32().await.unwrap() as usize;
    let mut startup = vec![0; len - 4];
    server.read_exact(&mut startup).await.unwrap();
    server.write_all(b"R\0\0\0\x08\0\0\0\0").await.unwrap();
    server.write_all(b"Z\0\0\0\x05I").await.unwrap();
    for _ in 0..prepares {
        let mut types = Vec::new();
        loop {
            let kind = server.read_u8().await.unwrap();
            let len = server.read_u32().await.unwrap() as usize;
            let mut body = vec![0; len - 4];
            server.read_exact(&mut body).await.unwrap();
            match kind {
                // Parse: name, query, then the parameter types.
                b'P' => {
                    let mut fields = body.splitn(3, |b| *b == 0);
                    let rest = fields.nth(2).unwrap();
                    types = rest[2..].to_vec();
                }
                b'S' => break,
                _ => {}
            }
        }
        let mut answer = b"1\0\0\0\x04t".to_vec();
        answer.extend((6 + types.len() as u32).to_be_bytes());
        answer.extend((types.len() as u16 / 4).to_be_bytes());
        answer.extend(&types);
        answer.extend(b"n\0\0\0\x04Z\0\0\0\x05I");
        server.write_all(&answer).await.unwrap();
    }
    server
}

/// The statements, prepared on `client` as `Statements::prepare` prepares them.
async fn prepare(client: &tokio_postgres::Client, durable: bool) -> Statements {
    if durable {
        let types = [
            Type::TEXT,
            Type::TEXT,
            Type::INT8_ARRAY,
            Type::TEXT_ARRAY,
            Type::TEXT_ARRAY,
        ];
        return Statements::Durable(client.prepare_typed(LOG_AND_NOTIFY, &types).await.unwrap());
    }
    Statements::Notify {
        one: client
            .prepare_typed(NOTIFY_ONE, &[Type::TEXT, Type::TEXT])
            .await
            .unwrap(),
        many: client
            .prepare_typed(NOTIFY_MANY, &[Type::TEXT, Type::TEXT_ARRAY])
            .await
            .unwrap(),
    }
}

/// The frontend messages in `bytes` (after the startup): their types and bodies.
fn messages(mut bytes: &[u8]) -> Vec<(u8, &[u8])> {
    let mut messages = Vec::new();
    while bytes.len() >= 5 {
        let len = u32::from_be_bytes(bytes[1..5].try_into().unwrap()) as usize;
        messages.push((bytes[0], &bytes[5..1 + len]));
        bytes = &bytes[1 + len..];
    }
    messages
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

/// The commit-order invariant's test: in the one poll `take_numbers_and_send` gives it
/// under the order lock, a batch's request takes its numbers and hands its statement
/// to the connection, prepared or unnamed, durable or not. Fails if an await is added
/// before the statement is sent.
#[tokio::test]
async fn numbers_are_taken_and_sent_in_one_poll() {
    for (durable, prepared) in [(false, false), (true, false), (false, true), (true, true)] {
        let case = format!("durable {durable}, prepared {prepared}");
        let prepares = match (prepared, durable) {
            (false, _) => 0,
            (true, true) => 1,
            (true, false) => 2,
        };
        let (ours, theirs) = tokio::io::duplex(1 << 16);
        let server = tokio::spawn(fake_server(theirs, prepares));
        let (client, connection) = tokio_postgres::Config::new()
            .user("u")
            .connect_raw(ours, tokio_postgres::NoTls)
            .await
            .unwrap();
        let mut connection = pin!(connection);
        let statements = if prepared {
            tokio::select! {
                biased;
                statements = prepare(&client, durable) => Some(statements),
                ended = connection.as_mut() => panic!("{case}: connection ended: {ended:?}"),
            }
        } else {
            None
        };
        let mut server = server.await.unwrap();

        let wire = wire(durable);
        let packed = OnceLock::new();
        let mut encoded = Some(["{\"a\":1}"]);
        let mut request =
            pin!(wire.batch_request(&client, statements.as_ref(), &packed, &mut encoded));
        let mut cx = Context::from_waker(Waker::noop());
        let first = wire.take_numbers_and_send(request.as_mut(), &mut cx, || true);
        assert!(
            matches!(first, Some(Poll::Pending)),
            "{case}: no answer yet"
        );
        let payloads = &packed
            .get()
            .unwrap_or_else(|| panic!("{case}: the numbers are taken in the first poll"))
            .envelopes;
        assert_eq!(payloads.len(), 1);
        assert_eq!(payloads[0].0, 1, "{case}: the first pool number");
        assert!(contains(payloads[0].1.as_bytes(), b"{\"a\":1}"));

        // The connection writes what the client handed it: nothing is left to a later
        // poll of the request.
        assert!(connection.as_mut().poll(&mut cx).is_pending());
        let mut sent = vec![0; 1 << 16];
        let read = server.read(&mut sent);
        let n = tokio::time::timeout(std::time::Duration::from_secs(1), read)
            .await
            .unwrap_or_else(|_| panic!("{case}: the statement is on the wire"))
            .unwrap();
        let messages = messages(&sent[..n]);
        let kinds: Vec<u8> = messages.iter().map(|(kind, _)| *kind).collect();
        let bind = if prepared {
            assert_eq!(kinds, b"BES", "{case}: Bind, Execute, Sync");
            messages[0].1
        } else {
            assert_eq!(
                kinds, b"PBDES",
                "{case}: Parse, Bind, Describe, Execute, Sync"
            );
            let sql = if durable { LOG_AND_NOTIFY } else { NOTIFY_ONE };
            assert!(contains(messages[0].1, sql.as_bytes()), "{case}: parsed");
            messages[1].1
        };
        assert!(
            contains(bind, payloads[0].1.as_bytes()),
            "{case}: the numbered envelope is bound"
        );
    }
}

/// A batch sent on a connection that was let go meanwhile takes no numbers and sends
/// nothing.
#[tokio::test]
async fn a_connection_let_go_takes_no_numbers() {
    let (ours, theirs) = tokio::io::duplex(1 << 16);
    let server = tokio::spawn(fake_server(theirs, 0));
    let (client, _connection) = tokio_postgres::Config::new()
        .user("u")
        .connect_raw(ours, tokio_postgres::NoTls)
        .await
        .unwrap();
    let _server = server.await.unwrap();
    let wire = wire(false);
    let packed = OnceLock::new();
    let mut encoded = Some(["{\"a\":1}"]);
    let sent = wire
        .send_in_number_order(&client, None, &packed, &mut encoded, || false)
        .await;
    assert!(sent.is_none());
    assert!(packed.get().is_none());
    assert!(encoded.is_some());
    assert_eq!(
        wire.pack(["x"], wire.pool_marks()).envelopes[0].0,
        1,
        "no number was used"
    );
}

#[test]
fn maddy_copies_are_maddy_form_and_unique() {
    use crate::seqset::SeqSet;
    use crate::update::Flag;
    let origin = Origin::random();
    let wire = wire(false).with_maddy_copies(origin.clone());
    let flags = [Flag::new("a;b").unwrap()];
    let same = Update::flags_changed("INBOX;1", 7, flags).unwrap();
    let updates = [
        same.clone(),
        same,
        Update::new_message(1u64 << 60, SeqSet::single(3).unwrap()),
    ];
    let encoded: Vec<String> = updates.iter().map(|u| encode(&wire, u).unwrap()).collect();
    let payloads = wire.pack(encoded.iter().map(String::as_str), wire.pool_marks());
    assert_eq!(
        payloads.envelopes.len(),
        1,
        "the envelope is packed as ever"
    );
    assert!(!payloads.envelopes[0].1.contains('\0'));
    let channels: Vec<&str> = payloads.copies.iter().map(|(c, _)| c.as_str()).collect();
    assert_eq!(
        channels,
        ["INBOX;1", "INBOX;1", "__uint64_1152921504606846976"]
    );
    let (first, second) = (&payloads.copies[0].1, &payloads.copies[1].1);
    assert_ne!(first, second, "identical updates make distinct payloads");
    for (_, payload) in &payloads.copies {
        let (sender, json) = payload.split_once(';').unwrap();
        assert!(sender.starts_with(&format!("updatepipe-{origin}.")));
        assert!(json.ends_with('\n') && !json.contains(';'));
    }
    let json = payloads.copies[0]
        .1
        .split_once(';')
        .unwrap()
        .1
        .replace('\u{10}', ";");
    assert_eq!(Update::from_json(json.trim_end()).unwrap(), updates[0]);
    // A key that cannot be a channel (empty, or over 63 bytes) gets no copy: its envelope
    // goes all the same, beside the others'.
    let long = Update::mailbox_destroyed("k".repeat(64));
    for key in [Update::mailbox_destroyed(""), long] {
        assert!(!wire.has_copy(&key));
        let encoded = [
            encode(&wire, &key).unwrap(),
            encode(&wire, &updates[0]).unwrap(),
        ];
        let payloads = wire.pack(encoded.iter().map(String::as_str), wire.pool_marks());
        assert_eq!(payloads.envelopes.len(), 1, "packed together");
        assert_eq!(payloads.copies.len(), 1, "a copy for the other only");
        assert_eq!(payloads.copies[0].0, "INBOX;1");
    }
    assert!(wire.has_copy(&updates[0]));
}

#[test]
fn the_maddy_layouts_durable_statement_writes_the_log_as_the_shared_one() {
    let mapped: &str = &LOG_AND_NOTIFY_MAPPED;
    let insert = LOG_AND_NOTIFY
        .rsplit_once("SELECT pg_catalog.pg_notify")
        .expect("a notifying SELECT")
        .0;
    assert!(mapped.starts_with(insert), "{mapped}");
    assert!(
        mapped.contains("pg_notify(coalesce(t.c, $1), t.n)"),
        "{mapped}"
    );
    assert!(mapped.contains("unnest($6::pg_catalog.text[])"), "{mapped}");
}

#[test]
fn pool_and_transactional_numbers_have_ranges_of_their_own() {
    let wire = wire(false);
    let pool = wire.pack(["a", "b"], wire.pool_marks()).envelopes;
    let tx = Marks {
        transactional: true,
        durable: false,
    };
    let transactional = wire.pack(["c"], tx).envelopes;
    let numbers: Vec<u64> = pool.iter().chain(&transactional).map(|(n, _)| *n).collect();
    assert_eq!(
        numbers[..numbers.len() - 1],
        (1..numbers.len() as u64).collect::<Vec<_>>()
    );
    assert_eq!(*numbers.last().unwrap(), TRANSACTIONAL_SEQ_BASE);
}

/// An update's encoded form, as a push encodes it.
fn encode(wire: &Wire, update: &Update) -> Result<String, Error> {
    let mut out = Vec::new();
    wire.encode_into(update, MAX_PAYLOAD_LEN, &mut out)?;
    Ok(String::from_utf8(out).expect("UTF-8"))
}

/// The one statement of a batch for every shape of pipe: its kind follows durability,
/// layout and (for a plain pipe) the number of envelopes, and its parameters are the
/// values each kind's SQL text names, in its order.
#[test]
fn each_shape_of_pipe_builds_its_statement() {
    use crate::push::statement::Param;
    let origin = Origin::random();
    let maddy = |durable| wire(durable).with_maddy_copies(origin.clone());
    let one = Update::mailbox_destroyed("INBOX");
    let types = |statement: &crate::push::statement::PushStatement<'_>| -> Vec<Type> {
        statement.params().iter().map(Param::pg_type).collect()
    };
    for (wire, updates, kind, expected) in [
        (
            wire(false),
            1,
            Kind::NotifyOne,
            vec![Type::TEXT, Type::TEXT],
        ),
        (
            wire(false),
            2000,
            Kind::NotifyMany,
            vec![Type::TEXT, Type::TEXT_ARRAY],
        ),
        (
            maddy(false),
            1,
            Kind::Mapped,
            vec![Type::TEXT, Type::TEXT_ARRAY, Type::TEXT_ARRAY],
        ),
        (
            wire(true),
            1,
            Kind::Durable,
            vec![
                Type::TEXT,
                Type::TEXT,
                Type::INT8_ARRAY,
                Type::TEXT_ARRAY,
                Type::TEXT_ARRAY,
            ],
        ),
        (
            maddy(true),
            2,
            Kind::DurableMapped,
            vec![
                Type::TEXT,
                Type::TEXT,
                Type::INT8_ARRAY,
                Type::TEXT_ARRAY,
                Type::TEXT_ARRAY,
                Type::TEXT_ARRAY,
            ],
        ),
    ] {
        let encoded: Vec<String> = (0..updates).map(|_| encode(&wire, &one).unwrap()).collect();
        let payloads = wire.pack(encoded.iter().map(String::as_str), wire.pool_marks());
        let statement = wire.statement(&payloads, wire.pool_marks());
        assert_eq!(statement.kind(), kind);
        assert_eq!(statement.sql(), kind.sql());
        assert_eq!(types(&statement), expected, "{kind:?}");
        assert_eq!(statement.params()[0], Param::Text("ch".into()), "{kind:?}");
        let envelopes: Vec<&str> = payloads.envelopes.iter().map(|(_, p)| p.as_str()).collect();
        match kind {
            Kind::NotifyOne => assert_eq!(statement.params()[1], Param::Text(envelopes[0].into())),
            Kind::NotifyMany => {
                assert!(envelopes.len() > 1, "2000 updates need several envelopes");
                let notes = envelopes.iter().map(|p| (*p).into()).collect();
                assert_eq!(statement.params()[1], Param::TextArray(notes));
            }
            Kind::Mapped | Kind::DurableMapped => {
                // The envelope on the pipe's channel (NULL), then a copy per update on
                // its mailbox's channel.
                let channels = statement.params().last().unwrap();
                let mut expected = vec![None; envelopes.len()];
                expected.extend((0..updates).map(|_| Some("INBOX".into())));
                assert_eq!(*channels, Param::NullableTextArray(expected));
            }
            Kind::Durable => {
                let seqs = payloads.envelopes.iter().map(|(s, _)| *s as i64).collect();
                assert_eq!(statement.params()[2], Param::Int8Array(seqs));
                let logged = envelopes.iter().map(|p| (*p).into()).collect();
                assert_eq!(statement.params()[3], Param::TextArray(logged));
            }
        }
    }
    // A durable envelope too large for a notification is logged whole and notified as a
    // reference to its log row.
    let wire = wire(true);
    let large = Update::mailbox_destroyed("k".repeat(MAX_PAYLOAD_LEN));
    let mut encoded = Vec::new();
    wire.encode_into(
        &large,
        crate::envelope::MAX_LOGGED_ENVELOPE_LEN,
        &mut encoded,
    )
    .unwrap();
    let encoded = String::from_utf8(encoded).unwrap();
    let payloads = wire.pack([encoded.as_str()], wire.pool_marks());
    let statement = wire.statement(&payloads, wire.pool_marks());
    let Param::TextArray(notes) = &statement.params()[4] else {
        panic!("{statement:?}")
    };
    assert!(notes[0].contains("\"r\":1") && notes[0].len() <= MAX_PAYLOAD_LEN);
    assert_eq!(
        statement.params()[3],
        Param::TextArray(vec![payloads.envelopes[0].1.as_str().into()])
    );
}

/// The wire-format guide (section 11) gives each statement's text as the code sends it, for
/// drivers in other languages to send the same.
#[test]
fn the_wire_format_guide_gives_each_statement_as_sent() {
    let guide = std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/wire-format.md"),
    )
    .unwrap();
    let (_, section) = guide
        .split_once("## 11. Pushing inside your own transaction")
        .expect("section 11");
    for kind in [
        Kind::NotifyOne,
        Kind::NotifyMany,
        Kind::Mapped,
        Kind::Durable,
        Kind::DurableMapped,
    ] {
        assert!(
            section.contains(&format!("`{}`", kind.sql())),
            "{kind:?}: {}",
            kind.sql()
        );
    }
}
