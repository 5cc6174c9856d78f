//! What a push puts on the wire: envelope numbers, packing, and the statements that carry
//! a batch with their parameters. Here too the one step that keeps pool batches in number
//! order ([`Wire::send_in_number_order`]).

use std::borrow::Cow;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, OnceLock};
use std::task::{Context, Poll};

use tokio_postgres::error::SqlState;
use tokio_postgres::types::{ToSql, Type};
use tokio_postgres::{GenericClient, Statement};

use crate::envelope::{MAX_PAYLOAD_LEN, Marks, Packer};
use crate::log::LOG_AND_NOTIFY;

/// One notification: the channel and payload are parameters, never SQL text.
const NOTIFY_ONE: &str = "SELECT pg_notify($1, $2)";

/// Several notifications in one statement, so in one transaction and one round trip, in
/// array order.
const NOTIFY_MANY: &str =
    "SELECT pg_notify($1, p) FROM unnest($2::text[]) WITH ORDINALITY AS t(p, n) ORDER BY n";

/// Where the numbers of envelopes pushed inside callers' transactions start (2⁶²).
const TRANSACTIONAL_SEQ_BASE: u64 = 1 << 62;

/// Envelopes with their numbers, ready to send.
pub(super) type Payloads = Vec<(u64, String)>;

/// A connection's prepared statements for this pipe's flights.
#[derive(Debug)]
pub(super) enum Statements {
    Notify { one: Statement, many: Statement },
    Durable(Statement),
}

impl Statements {
    /// Prepares the statements on `client`, through the pool's statement cache (so a
    /// connection that comes back from the pool does not prepare them again).
    pub(super) async fn prepare(
        client: &deadpool_postgres::ClientWrapper,
        durable: bool,
    ) -> Result<Self, tokio_postgres::Error> {
        if durable {
            return Ok(Statements::Durable(
                client.prepare_cached(LOG_AND_NOTIFY).await?,
            ));
        }
        Ok(Statements::Notify {
            one: client.prepare_cached(NOTIFY_ONE).await?,
            many: client.prepare_cached(NOTIFY_MANY).await?,
        })
    }
}

/// The errors of a transaction-pooling proxy that does not keep prepared statements.
pub(super) fn is_proxy_refusal(e: &tokio_postgres::Error) -> bool {
    matches!(
        e.code(),
        Some(&SqlState::DUPLICATE_PSTATEMENT | &SqlState::INVALID_SQL_STATEMENT_NAME)
    )
}

/// This pipe's envelopes on the wire: the channel and sender they go out with, their
/// numbers, and the statements that carry them.
#[derive(Debug)]
pub(super) struct Wire {
    channel: String,
    origin: String,
    durable: bool,
    packer: Packer,
    /// Numbers for pool pushes: consecutive, and committed in order (see
    /// [`Wire::send_in_number_order`]), so a listener that sees one skipped knows it
    /// missed something.
    seq: AtomicU64,
    /// Numbers for pushes in callers' transactions, from a range of their own: those may
    /// roll back or commit out of order, so listeners do not check them for gaps.
    tx_seq: AtomicU64,
    /// Held while a pool batch takes its numbers and sends its statement.
    order: Mutex<()>,
}

impl Wire {
    pub(super) fn new(channel: String, origin: String, durable: bool, packer: Packer) -> Self {
        Wire {
            channel,
            origin,
            durable,
            packer,
            seq: AtomicU64::new(1),
            tx_seq: AtomicU64::new(TRANSACTIONAL_SEQ_BASE),
            order: Mutex::new(()),
        }
    }

    /// Whether pushes write the durable log too.
    pub(super) fn durable(&self) -> bool {
        self.durable
    }

    pub(super) fn packer(&self) -> &Packer {
        &self.packer
    }

    /// Sends a pool batch, its numbers taken and its statement sent in number order (see
    /// [`Wire::take_numbers_and_send`]), then waits for its answer. The batch is packed
    /// from `encoded` into `packed` the first time only (a second try sends the same
    /// envelopes). `None`, with nothing sent, when `still_current` says no.
    pub(super) async fn send_in_number_order<'a>(
        &self,
        client: &tokio_postgres::Client,
        statements: Option<&Statements>,
        packed: &OnceLock<Payloads>,
        encoded: &mut Option<impl IntoIterator<Item = &'a str>>,
        still_current: impl Fn() -> bool,
    ) -> Option<Result<u64, tokio_postgres::Error>> {
        let mut request = std::pin::pin!(self.batch_request(client, statements, packed, encoded));
        let first = std::future::poll_fn(|cx| {
            Poll::Ready(self.take_numbers_and_send(request.as_mut(), cx, &still_current))
        })
        .await;
        match first? {
            Poll::Ready(sent) => Some(sent),
            Poll::Pending => Some(request.await),
        }
    }

    /// **The commit-order invariant.** Takes a pool batch's numbers and sends its statement
    /// in one step, under one lock, so that pool batches reach their shared connection in
    /// number order; PostgreSQL runs a connection's statements in the order they arrive,
    /// so they commit in that order too. (A listener that sees a sender's number skipped
    /// raises a resync.)
    ///
    /// It polls `request` (a [`Wire::batch_request`]) for the first time under the lock,
    /// and rests on the request sending before its first await: in that poll it packs the
    /// batch, taking its numbers, and hands its statement to the connection (tokio-postgres
    /// queues a prepared statement's Bind and Execute, or an unnamed one's Parse, Bind and
    /// Execute, on the first poll). An await added before that point would let a batch
    /// with later numbers send first; the unit test `numbers_are_taken_and_sent_in_one_poll`
    /// fails if one is.
    ///
    /// `still_current` is asked under the lock: a connection let go meanwhile (another
    /// flight failed on it) is not used, since a flight after this one may be on its
    /// replacement already; then `None`, and the request is not polled.
    fn take_numbers_and_send<F: Future>(
        &self,
        request: Pin<&mut F>,
        cx: &mut Context<'_>,
        still_current: impl Fn() -> bool,
    ) -> Option<Poll<F::Output>> {
        let _order = self.order.lock().expect("send order lock");
        if !still_current() {
            return None;
        }
        Some(request.poll(cx))
    }

    /// A pool batch's request: packs `encoded` into `packed` the first time (taking its
    /// numbers), then runs the statement. Sends before its first await (see
    /// [`Wire::take_numbers_and_send`]).
    fn batch_request<'r, 'a: 'r>(
        &'r self,
        client: &'r tokio_postgres::Client,
        statements: Option<&'r Statements>,
        packed: &'r OnceLock<Payloads>,
        encoded: &'r mut Option<impl IntoIterator<Item = &'a str>>,
    ) -> impl Future<Output = Result<u64, tokio_postgres::Error>> + 'r {
        let marks = self.pool_marks();
        async move {
            let payloads =
                packed.get_or_init(|| self.pack(encoded.take().expect("packed once"), marks));
            self.execute(client, statements, payloads, marks).await
        }
    }

    /// The marks of a pool push's envelopes.
    pub(super) fn pool_marks(&self) -> Marks {
        Marks {
            transactional: false,
            durable: self.durable,
        }
    }

    /// Runs a batch's one statement: prepared on the connection (the fast way), or unnamed
    /// (`None`), with its parameter types, which no transaction-pooling proxy breaks.
    /// Sends before its first await.
    pub(super) async fn execute(
        &self,
        client: &tokio_postgres::Client,
        statements: Option<&Statements>,
        payloads: &[(u64, String)],
        marks: Marks,
    ) -> Result<u64, tokio_postgres::Error> {
        let channel = self.channel.as_str();
        match statements {
            None => self.execute_unnamed(client, payloads, marks).await,
            Some(Statements::Durable(statement)) => {
                let (seqs, logged, notes) = self.durable_parts(payloads, marks);
                client
                    .execute(statement, &[&channel, &self.origin, &seqs, &logged, &notes])
                    .await
            }
            Some(Statements::Notify { one, .. }) if payloads.len() == 1 => {
                client.execute(one, &[&channel, &payloads[0].1]).await
            }
            Some(Statements::Notify { many, .. }) => {
                let notes: Vec<&str> = payloads.iter().map(|(_, p)| p.as_str()).collect();
                client.execute(many, &[&channel, &notes]).await
            }
        }
    }

    /// The same statements, unnamed and with their parameter types given, on any client
    /// (the pool's, or the caller's in `push_in`): no transaction-pooling proxy breaks
    /// them. Nothing to send is no statement.
    pub(super) async fn execute_unnamed<C: GenericClient + Sync>(
        &self,
        client: &C,
        payloads: &[(u64, String)],
        marks: Marks,
    ) -> Result<u64, tokio_postgres::Error> {
        if payloads.is_empty() {
            return Ok(0);
        }
        let channel = self.channel.as_str();
        if self.durable {
            let (seqs, logged, notes) = self.durable_parts(payloads, marks);
            let params: [(&(dyn ToSql + Sync), Type); 5] = [
                (&channel, Type::TEXT),
                (&self.origin, Type::TEXT),
                (&seqs, Type::INT8_ARRAY),
                (&logged, Type::TEXT_ARRAY),
                (&notes, Type::TEXT_ARRAY),
            ];
            return client.execute_typed(LOG_AND_NOTIFY, &params).await;
        }
        if let [(_, payload)] = payloads {
            return client
                .execute_typed(NOTIFY_ONE, &[(&channel, Type::TEXT), (payload, Type::TEXT)])
                .await;
        }
        let notes: Vec<&str> = payloads.iter().map(|(_, p)| p.as_str()).collect();
        client
            .execute_typed(
                NOTIFY_MANY,
                &[(&channel, Type::TEXT), (&notes, Type::TEXT_ARRAY)],
            )
            .await
    }

    /// A durable batch's parameters: the numbers and envelopes for the log, and the
    /// notifications, each the envelope itself or, when too large, a reference to it.
    fn durable_parts<'p>(
        &self,
        payloads: &'p [(u64, String)],
        marks: Marks,
    ) -> (Vec<i64>, Vec<&'p str>, Vec<Cow<'p, str>>) {
        let seqs = payloads.iter().map(|(seq, _)| *seq as i64).collect();
        let logged = payloads.iter().map(|(_, p)| p.as_str()).collect();
        let notes = payloads
            .iter()
            .map(|(seq, p)| {
                if p.len() <= MAX_PAYLOAD_LEN {
                    Cow::Borrowed(p.as_str())
                } else {
                    Cow::Owned(self.packer.reference(*seq, marks))
                }
            })
            .collect();
        (seqs, logged, notes)
    }

    /// Packs encoded updates into envelopes, each with a fresh sequence number, so no two
    /// payloads are ever identical (PostgreSQL folds identical ones in a transaction).
    pub(super) fn pack<'a>(
        &self,
        encoded: impl IntoIterator<Item = &'a str>,
        marks: Marks,
    ) -> Payloads {
        let counter = if marks.transactional {
            &self.tx_seq
        } else {
            &self.seq
        };
        self.packer
            .pack(encoded, marks, || counter.fetch_add(1, Ordering::Relaxed))
    }
}

#[cfg(test)]
mod tests {
    use std::pin::pin;
    use std::task::Waker;

    use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};

    use super::*;
    use crate::origin::Origin;

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
            return Statements::Durable(
                client.prepare_typed(LOG_AND_NOTIFY, &types).await.unwrap(),
            );
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
            let payloads = packed
                .get()
                .unwrap_or_else(|| panic!("{case}: the numbers are taken in the first poll"));
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
            wire.pack(["x"], wire.pool_marks())[0].0,
            1,
            "no number was used"
        );
    }

    #[test]
    fn pool_and_transactional_numbers_have_ranges_of_their_own() {
        let wire = wire(false);
        let pool = wire.pack(["a", "b"], wire.pool_marks());
        let tx = Marks {
            transactional: true,
            durable: false,
        };
        let transactional = wire.pack(["c"], tx);
        let numbers: Vec<u64> = pool.iter().chain(&transactional).map(|(n, _)| *n).collect();
        assert_eq!(
            numbers[..numbers.len() - 1],
            (1..numbers.len() as u64).collect::<Vec<_>>()
        );
        assert_eq!(*numbers.last().unwrap(), TRANSACTIONAL_SEQ_BASE);
    }
}
