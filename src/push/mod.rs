//! The push path: updates become version 1 envelopes sent with `pg_notify` on the shared
//! channel, through the pool or inside the caller's own transaction. In the maddy layout the
//! same statement also sends a copy of each update in maddy's form on its mailbox's channel
//! (`wire`), so the copies commit with the envelopes.
//!
//! Pool pushes are batched. Each push encodes and checks its own updates (so a bad update
//! fails only its own push), then goes out in a *flight*: one statement (one transaction)
//! carrying whatever was queued, packed into as few envelopes as fit. Up to
//! `max_in_flight` flights are out at once, pipelined on one connection; while they are,
//! new pushes gather for the next. A push that finds nothing queued and room for a flight
//! sends its own updates at once, on its own task (no hand-off, so a lone push costs what a
//! plain `pg_notify` costs); queued pushes go out on flusher tasks, which give the pushers
//! a flight has just resolved a few scheduler turns to push again and join the next batch.
//! Every push resolves only when the transaction holding its updates has committed, with
//! that transaction's outcome.
//!
//! Envelope numbers say when something was missed: a listener that sees a sender's number
//! skipped raises a resync. So flights must commit in number order. Each takes its numbers
//! and sends its statement in one step, under one lock, on the one connection they share;
//! PostgreSQL runs a connection's statements in the order they arrive. That one step is
//! `Wire::send_in_number_order` (in `wire`).
//!
//! The parts: `batcher` (flights and flusher tasks over `queue`, the pushes waiting and the
//! decisions about them), `send` (one batch on the wire by its deadline), `link` (the pool
//! and the connection flights share), `wire` (numbers, packing, statements: one builder,
//! `Wire::statement`, for every way a batch is sent), `statement` (that statement as a
//! value, bound for the driver that sends it).

mod batcher;
mod client;
mod encoded;
mod link;
mod queue;
mod send;
mod statement;
mod wire;

use std::sync::Arc;

use crate::config::Config;
use crate::envelope::{MAX_LOGGED_ENVELOPE_LEN, MAX_PAYLOAD_LEN, Marks, Packer};
use crate::error::Error;
use crate::layout::Layout;
use crate::origin::Origin;
use crate::pg::{Canceller, Lent};
use crate::stats::Counters;
use crate::update::Update;
use deadpool_postgres::{
    HookError, Manager, ManagerConfig, Pool, RecyclingMethod, Runtime, Timeouts,
};

pub use client::PushClient;
pub use statement::PushStatement;

use batcher::Batcher;
use encoded::Encoded;
use link::Link;
use send::BatchSender;
use wire::{Payloads, Wire};

const TARGET: &str = "updatepipe::push";

/// Sends this pipe's updates.
#[derive(Debug)]
pub(crate) struct Pusher {
    batcher: Arc<Batcher>,
    /// The connecting role (for the error that names what to grant it).
    role: String,
    /// Cancels the statements of `init` and `query_f64` given up on.
    canceller: Canceller,
}

impl Pusher {
    /// A pusher with its pool. Nothing connects until the first push.
    pub(crate) fn new(
        config: &Config,
        origin: Origin,
        counters: Arc<Counters>,
    ) -> Result<Self, Error> {
        // Checked now, so that a bad certificate file fails here, not at the first push.
        config.tls_connector()?;
        // With several hosts, each gets its share of the push timeout to connect (at most
        // the connect timeout): a push whose checkout opens a connection reaches the next
        // host within its timeout, past one that accepts TCP and never answers.
        let mut server = config.server().clone();
        let hosts = server.host_count() as u32;
        if hosts > 1 {
            let share = config.push_options().timeout() / hosts;
            server.set_connect_timeout(config.connect_timeout().min(share));
        }
        let (connector, connect_failure) = crate::pg::PoolConnector::new(&server);
        let manager = Manager::from_connect(
            config.pg().clone(),
            connector,
            ManagerConfig {
                // A broken connection is noticed by `is_closed`, and one that failed a
                // flush is taken out of the pool; a query per checkout would cost a round
                // trip per flush.
                recycling_method: RecyclingMethod::Fast,
            },
        );
        let limits = config.session_limits().sql();
        let pool = Pool::builder(manager)
            // The backstop session settings, by a `SET` once connected (PgBouncer refuses
            // unknown startup parameters).
            .post_create(deadpool_postgres::Hook::async_fn(move |client, _| {
                let limits = limits.clone();
                Box::pin(async move {
                    if let Some(sql) = limits {
                        client
                            .batch_execute(&sql)
                            .await
                            .map_err(HookError::Backend)?;
                    }
                    Ok(())
                })
            }))
            .max_size(config.push_options().pool_size())
            .runtime(Runtime::Tokio1)
            .timeouts(Timeouts {
                wait: Some(config.push_options().timeout()),
                // Each host in turn, each within its connect budget.
                create: Some(server.connect_timeout() * hosts),
                recycle: Some(config.connect_timeout()),
            })
            .build()
            .map_err(|e| Error::Config(format!("cannot build the connection pool: {e}")))?;
        let wire = Wire::new(
            config.channel().as_str().to_owned(),
            origin.as_str().to_owned(),
            config.durable(),
            Packer::new(&origin, std::process::id(), config.signer()),
        );
        let wire = match config.layout() {
            Layout::Maddy => wire.with_maddy_copies(origin.clone()),
            _ => wire,
        };
        let link = Link::new(
            pool,
            connect_failure,
            config.push_options().timeout(),
            config.push_options().pool_size() >= 3,
        );
        let canceller = Canceller::new(config.server())?;
        let sender = BatchSender::new(
            wire,
            link,
            config.push_options().timeout(),
            counters,
            canceller.clone(),
        );
        let batcher = Batcher::new(
            sender,
            config.push_options().max_batch(),
            config.push_options().max_batch_wait(),
            config.push_options().max_in_flight(),
            config.push_options().queue_bound(),
        );
        Ok(Pusher {
            batcher: Arc::new(batcher),
            role: config.pg().get_user().unwrap_or_default().to_owned(),
            canceller,
        })
    }

    fn sender(&self) -> &BatchSender {
        self.batcher.sender()
    }

    /// Checks out a connection and proves it works: early errors for `init_push`.
    pub(crate) async fn init(&self) -> Result<(), Error> {
        let sender = self.sender();
        sender
            .within("preparing to push", async {
                let lent = Lent::new(sender.link().checkout().await?, &self.canceller);
                let answer = lent.client().execute_typed("SELECT 1", &[]).await;
                lent.finish(answer)?;
                Ok(())
            })
            .await
    }

    /// Sends updates through the pool, batched with concurrent pushes; returns once they are
    /// committed. All of them travel in one transaction: delivered together or not at all.
    /// A failed batch gives every push in it the same error; nothing of it was committed,
    /// unless the connection broke while committing (then the outcome is unknown, as for
    /// any statement whose answer is lost).
    pub(crate) async fn push(&self, updates: &[Update]) -> Result<(), Error> {
        if updates.is_empty() {
            return Ok(());
        }
        // One clock read per push (a measurable part of its cost): the deadline's, which
        // is also when the push latency counts from.
        let started = tokio::time::Instant::now();
        let deadline = started + self.sender().timeout();
        // Encoded into this thread's scratch buffer, then copied into the queue, or into a
        // buffer of this push's own when it goes alone: no allocation per queued push.
        let admitted = Encoded::with_scratch(|scratch| {
            self.encode_into(updates, scratch)?;
            self.batcher.admit(scratch, deadline)
        })?;
        self.batcher
            .finish(admitted, deadline)
            .await
            .map_err(|e| self.not_granted(e))?;
        crate::stats::push_latency(started.into_std());
        Ok(())
    }

    /// The maddy layout: an update whose key cannot be a channel goes to updatepipe nodes
    /// only: counted, and said once per pipe.
    fn copy_skipped(&self, update: &Update) {
        let counters = self.sender().counters();
        if counters.maddy_copy_unsent() == 1 {
            tracing::warn!(
                target: TARGET,
                key = %crate::error::excerpt(&update.key().to_string()),
                "a mailbox key that cannot be a channel name (empty, or over 63 bytes): its \
                 update goes to updatepipe nodes only, maddy nodes get no copy (said once; \
                 Stats::maddy_copies_unsent counts them)"
            );
        }
    }

    /// A durable push refused for a privilege the role lacks says which `grant` it needs.
    fn not_granted(&self, e: Error) -> Error {
        match e {
            Error::Postgres(pg)
                if self.sender().wire().durable() && crate::pg::is_insufficient_privilege(&pg) =>
            {
                Error::NotGranted {
                    role: self.role.clone(),
                    doing: "write the durable log",
                    grant: "pusher",
                }
            }
            e => e,
        }
    }

    /// Sends updates on the caller's connection or transaction, of whichever driver:
    /// delivered when, and only when, the caller's transaction commits (at once, outside a
    /// transaction). Durable pushes write their log rows in that same transaction.
    pub(crate) async fn push_in<C: PushClient>(
        &self,
        client: C,
        updates: &[Update],
    ) -> Result<(), Error> {
        let (payloads, marks) = self.pack_in(updates)?;
        if payloads.envelopes.is_empty() {
            return Ok(());
        }
        let wire = self.sender().wire();
        // Unnamed, whichever the driver: the caller's connection may go through a
        // transaction-pooling proxy.
        let sent = client.send_push(&wire.statement(&payloads, marks)).await;
        if let Err(e) = &sent
            && wire.durable()
            && e.is_unique_violation()
        {
            // Fresh numbers, met in the log: another role wrote at them.
            self.sender().counters().numbers_taken();
            let seq = payloads.envelopes.first().map_or(0, |(seq, _)| *seq);
            return Err(Error::NumbersTaken { seq });
        }
        sent?;
        self.sender().counters().pushed(updates.len());
        Ok(())
    }

    /// The statement [`Pusher::push_in`] would send for `updates`, owned, for the caller to
    /// run on a driver of its own: numbered and signed now, as a push in the caller's
    /// transaction is. Not counted as pushed: whether it runs is the caller's business.
    pub(crate) fn statement_for(
        &self,
        updates: &[Update],
    ) -> Result<PushStatement<'static>, Error> {
        let (payloads, marks) = self.pack_in(updates)?;
        Ok(self
            .sender()
            .wire()
            .statement(&payloads, marks)
            .into_owned())
    }

    /// Encodes and checks updates, then packs them into envelopes for the caller's
    /// transaction: marked `t`, numbered from their own range.
    fn pack_in(&self, updates: &[Update]) -> Result<(Payloads, Marks), Error> {
        let mut encoded = Encoded::default();
        self.encode_into(updates, &mut encoded)?;
        let wire = self.sender().wire();
        let marks = Marks {
            transactional: true,
            durable: wire.durable(),
        };
        Ok((wire.pack(encoded.iter(), marks), marks))
    }

    /// The pool (the listener sends its heartbeats through it).
    pub(crate) fn pool(&self) -> Pool {
        self.sender().link().pool().clone()
    }

    /// Runs a one-value query on a pooled connection.
    /// Checks the schema version (`migrate::check_schema`) on a pooled connection, within
    /// the push timeout, checkout included: as a push reaches the server, each host within
    /// its share of that timeout.
    pub(crate) async fn check_schema(&self) -> Result<i64, Error> {
        let sender = self.sender();
        sender
            .within("checking the schema version", async {
                let lent = Lent::new(sender.link().checkout().await?, &self.canceller);
                let checked = crate::migrate::check_schema(lent.client()).await;
                match &checked {
                    Err(Error::Postgres(e)) => lent.ended_with(e),
                    _ => lent.answered(),
                }
                checked
            })
            .await
    }

    pub(crate) async fn query_f64(&self, sql: &str) -> Result<f64, Error> {
        let sender = self.sender();
        sender
            .within("querying the server", async {
                let lent = Lent::new(sender.link().checkout().await?, &self.canceller);
                let answer = lent.client().query_typed_one(sql, &[]).await;
                Ok(lent.finish(answer)?.get(0))
            })
            .await
    }

    /// Encodes and checks updates into `out`: the first that cannot be sent fails them
    /// all.
    fn encode_into(&self, updates: &[Update], out: &mut Encoded) -> Result<(), Error> {
        let wire = self.sender().wire();
        let limit = if wire.durable() {
            MAX_LOGGED_ENVELOPE_LEN
        } else {
            MAX_PAYLOAD_LEN
        };
        for update in updates {
            out.push_with(|text| wire.encode_into(update, limit, text))?;
            if !wire.has_copy(update) {
                self.copy_skipped(update);
            }
        }
        Ok(())
    }

    /// Stops taking pushes, lets the flights finish what is queued, then closes the pool.
    pub(crate) async fn close(&self) {
        self.batcher.close().await;
    }
}
