//! What a push puts on the wire: envelope numbers, packing, and the statements that carry
//! a batch with their parameters. Here too the one step that keeps pool batches in number
//! order ([`Wire::send_in_number_order`]).

use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, OnceLock};
use std::task::{Context, Poll};

use crate::envelope::{MAX_PAYLOAD_LEN, Marks, Packer};
use crate::error::Error;
use crate::layout::maddy_sender_id;
use crate::origin::Origin;
use crate::update::Update;

/// The longest sender id of a maddy copy (`updatepipe-`, 32 hex digits, `.`, a `u64`).
const MAX_MADDY_SENDER_LEN: usize = 64;

/// Separates an update's JSON from its maddy channel in the encoded form the push queue
/// carries in the maddy layout (`<json>\0<channel>`). Neither holds a NUL: JSON escapes it,
/// and a channel name cannot have one.
const CHANNEL_SEPARATOR: u8 = b'\0';

/// Where the numbers of envelopes pushed inside callers' transactions start (2⁶²).
const TRANSACTIONAL_SEQ_BASE: u64 = 1 << 62;

/// What one batch sends: envelopes with their numbers, and in the maddy layout a copy of
/// each update for maddy nodes.
#[derive(Debug, Default)]
pub(super) struct Payloads {
    pub(super) envelopes: Vec<(u64, String)>,
    /// Each `(channel, payload)`: `<sender id>;<update JSON with ';' as 0x10>\n`.
    pub(super) copies: Vec<(String, String)>,
}

/// Which statements a pipe's batches need.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct Shape {
    pub(super) durable: bool,
    /// The maddy layout: copies on mailboxes' channels too.
    pub(super) copies: bool,
}

/// The maddy layout's copies: who they say sent them, and their numbers.
#[derive(Debug)]
struct MaddyCopies {
    origin: Origin,
    /// Numbers the copies' sender ids, so that no two payloads are identical.
    next: AtomicU64,
}

/// This pipe's envelopes on the wire: the channel and sender they go out with, their
/// numbers, and the statements that carry them.
#[derive(Debug)]
pub(super) struct Wire {
    channel: String,
    origin: String,
    durable: bool,
    packer: Packer,
    /// The maddy layout: copies for maddy nodes.
    maddy: Option<MaddyCopies>,
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
            maddy: None,
            seq: AtomicU64::new(1),
            tx_seq: AtomicU64::new(TRANSACTIONAL_SEQ_BASE),
            order: Mutex::new(()),
        }
    }

    /// In the maddy layout: every update also goes, in the same statement, to maddy nodes
    /// on its mailbox's channel, in maddy's form, sent as `updatepipe-<origin>.<n>`.
    pub(super) fn with_maddy_copies(mut self, origin: Origin) -> Self {
        self.maddy = Some(MaddyCopies {
            origin,
            next: AtomicU64::new(1),
        });
        self
    }

    /// Whether pushes write the durable log too.
    pub(super) fn durable(&self) -> bool {
        self.durable
    }

    /// Which statements batches need.
    pub(super) fn shape(&self) -> Shape {
        Shape {
            durable: self.durable,
            copies: self.maddy.is_some(),
        }
    }

    /// Appends an update's encoded form to `out`, checked to fit (see
    /// [`Packer::encode`]): its JSON, and in the maddy layout its mailbox's channel too,
    /// checked to be a channel name, with the copy checked to fit in a notification.
    /// `out` holds UTF-8; on error, the caller rolls back what was appended
    /// ([`Encoded::push_with`](super::encoded::Encoded::push_with) does).
    ///
    /// An update whose mailbox key cannot be a channel name (empty, or over 63 bytes) gets
    /// no maddy copy: its envelope still goes to updatepipe nodes on the pipe's channel
    /// (the caller counts it: [`Wire::has_copy`]).
    pub(super) fn encode_into(
        &self,
        update: &Update,
        limit: usize,
        out: &mut Vec<u8>,
    ) -> Result<(), Error> {
        // None: no copies in this layout; Some(None): none for this update.
        let channel = self
            .maddy
            .as_ref()
            .map(|_| update.key().maddy_channel().ok());
        let start = out.len();
        self.packer.encode_into(update, limit, out)?;
        let Some(channel) = channel else {
            return Ok(());
        };
        let Some(channel) = channel else {
            // No copy: an empty channel tells `pack`.
            out.push(CHANNEL_SEPARATOR);
            return Ok(());
        };
        let size = MAX_MADDY_SENDER_LEN + 1 + (out.len() - start) + 1;
        if size > MAX_PAYLOAD_LEN {
            return Err(Error::PayloadTooLarge {
                size,
                limit: MAX_PAYLOAD_LEN,
            });
        }
        out.push(CHANNEL_SEPARATOR);
        out.extend_from_slice(channel.as_str().as_bytes());
        Ok(())
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

    /// Whether an update gets a maddy copy in the maddy layout: its key can be a channel.
    pub(super) fn has_copy(&self, update: &Update) -> bool {
        self.maddy.is_none() || update.key().maddy_channel().is_ok()
    }

    /// Packs encoded updates (from [`Wire::encode`]) into envelopes, each with a fresh
    /// sequence number, so no two payloads are ever identical (PostgreSQL folds identical
    /// ones in a transaction); in the maddy layout, with a copy of each update, numbered
    /// for the same reason.
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
        let next_seq = || counter.fetch_add(1, Ordering::Relaxed);
        let Some(maddy) = &self.maddy else {
            return Payloads {
                envelopes: self.packer.pack(encoded, marks, next_seq),
                copies: Vec::new(),
            };
        };
        let mut jsons = Vec::new();
        let mut copies = Vec::new();
        for item in encoded {
            let (json, channel) = item
                .split_once(char::from(CHANNEL_SEPARATOR))
                .expect("encoded with its channel in the maddy layout");
            jsons.push(json);
            if channel.is_empty() {
                // Its key cannot be a channel: updatepipe nodes get its envelope, maddy
                // nodes nothing (see `encode_into`).
                continue;
            }
            let sender = maddy_sender_id(&maddy.origin, maddy.next.fetch_add(1, Ordering::Relaxed));
            copies.push((channel.to_owned(), maddy_payload(&sender, json)));
        }
        Payloads {
            envelopes: self.packer.pack(jsons, marks, next_seq),
            copies,
        }
    }
}

/// One update in maddy's form: `<sender id>;<update JSON with every ';' as 0x10>\n`.
fn maddy_payload(sender: &str, json: &str) -> String {
    let mut payload = String::with_capacity(sender.len() + json.len() + 2);
    payload.push_str(sender);
    payload.push(';');
    for c in json.chars() {
        payload.push(if c == ';' { '\u{10}' } else { c });
    }
    payload.push('\n');
    payload
}

mod statements;

pub(super) use statements::{Kind, Statements};

#[cfg(test)]
mod tests;
