//! The pipe: maddy's update-pipe interface ([`UpdatePipe`]) and its PostgreSQL
//! implementation ([`PgPipe`]), which ties the push path, the listen path and the
//! migrations together.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use tokio::sync::{Mutex, mpsc};

use crate::config::Config;
use crate::error::Error;
use crate::grant::Role;
use crate::layout::Layout;
use crate::listen::{Command, Event, FromPipe, Listener, Sink};
use crate::log::Position;
use crate::migrate::{MigrationInfo, migrate};
use crate::origin::Origin;
use crate::push::{PushClient, PushStatement, Pusher};
use crate::stats::{Counters, Stats};
use crate::update::{MailboxKey, Update};

/// An update pipe, with the semantics of maddy's `updatepipe.P`.
///
/// Every method takes `&self`, so one pipe can be shared between tasks (wrap it in an `Arc`
/// or clone a [`PgPipe`]).
pub trait UpdatePipe {
    /// Starts pulling updates sent by *others* into `updates`. Returns once the pipe is
    /// subscribed: every update committed after that reaches the channel, in commit order,
    /// and none this pipe sent itself. The channel ends when the pipe is closed.
    ///
    /// `updates` is bounded: a caller that stops reading slows the listener down.
    /// A pipe listens once; a second call fails with [`Error::AlreadyListening`].
    fn listen(
        &self,
        updates: mpsc::Sender<Update>,
    ) -> impl Future<Output = Result<(), Error>> + Send;

    /// Prepares for pushing, so that configuration and connection errors show early.
    /// Optional: the first push does the same.
    fn init_push(&self) -> impl Future<Output = Result<(), Error>> + Send;

    /// Sends one update to every other listener on the channel. Returns once the update is
    /// committed (and so on its way to every listener subscribed at that moment).
    fn push(&self, update: &Update) -> impl Future<Output = Result<(), Error>> + Send;

    /// Stops listening and pushing: every task and connection the pipe started is gone when
    /// this returns, and the listener's channel has ended. Calling it again does nothing.
    fn close(&self) -> impl Future<Output = Result<(), Error>> + Send;
}

/// The PostgreSQL update pipe: pushes with `pg_notify` on one shared channel, listens on a
/// dedicated connection, and drops its own updates however they were pushed (pool or
/// caller's transaction), because each envelope names the pipe instance that sent it.
///
/// Cloning is cheap and gives another handle to the same pipe.
#[derive(Clone, Debug)]
pub struct PgPipe {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    config: Config,
    origin: Origin,
    pusher: Pusher,
    listener: Mutex<Option<Listener>>,
    /// A named consumer's acknowledgements, once its listener started.
    acks: std::sync::Mutex<Option<Arc<crate::listen::Acks>>>,
    listening: AtomicBool,
    closed: AtomicBool,
    counters: Arc<Counters>,
    /// The error that stopped the listener by itself, once it did.
    ended: crate::listen::Ended,
    /// Set once a durable pipe found the schema migrated far enough.
    schema_checked: tokio::sync::OnceCell<()>,
    /// The last failed schema check, given again for a moment (so that a push-heavy process
    /// on a schema that is behind does not open a connection per push).
    schema_refused: std::sync::Mutex<Option<(std::time::Instant, Error)>>,
}

impl PgPipe {
    /// A pipe for this configuration. Nothing connects yet: the pool connects on the first
    /// push (or [`init_push`](UpdatePipe::init_push)), the listener on
    /// [`listen`](UpdatePipe::listen). Must be called within a Tokio runtime.
    pub fn new(config: Config) -> Result<Self, Error> {
        let origin = Origin::random();
        let counters = Arc::new(Counters::default());
        let pusher = Pusher::new(&config, origin.clone(), counters.clone())?;
        Ok(PgPipe {
            inner: Arc::new(Inner {
                config,
                origin,
                pusher,
                listener: Mutex::new(None),
                acks: std::sync::Mutex::new(None),
                listening: AtomicBool::new(false),
                closed: AtomicBool::new(false),
                ended: Default::default(),
                counters,
                schema_checked: tokio::sync::OnceCell::new(),
                schema_refused: std::sync::Mutex::new(None),
            }),
        })
    }

    /// Applies updatepipe's schema migrations (the `updatepipe` schema and its log table);
    /// returns the migrations applied now. Safe to call repeatedly and from several
    /// processes at once.
    pub async fn migrate(&self) -> Result<Vec<MigrationInfo>, Error> {
        migrate(&self.inner.config).await
    }

    /// Checks that the `updatepipe` schema is migrated as far as this build needs, and
    /// returns its version. A read any role [`grant`](PgPipe::grant)ed may do, for a runtime
    /// role that must not migrate: [`Error::SchemaOutdated`] when the schema is missing or
    /// older, [`Error::SchemaNotGranted`] when the role may not read its version.
    ///
    /// A durable pipe checks this itself before its first durable push and before it
    /// listens, so that a missing migration is one clear error, not a failed statement.
    /// It runs on a pooled connection within the push timeout (checkout included), as a
    /// push does.
    pub async fn check_schema(&self) -> Result<i64, Error> {
        self.check_open()?;
        self.inner.pusher.check_schema().await
    }

    /// For a durable pipe: [`check_schema`](PgPipe::check_schema), once per pipe.
    async fn ensure_schema(&self) -> Result<(), Error> {
        if !self.inner.config.durable() || self.inner.schema_checked.initialized() {
            return Ok(());
        }
        // Boxed: the check runs once, and its state would otherwise make every push's
        // future larger.
        Box::pin(self.check_schema_once()).await
    }

    /// [`ensure_schema`](PgPipe::ensure_schema) before the check has passed.
    async fn check_schema_once(&self) -> Result<(), Error> {
        /// How long a refused schema check is given again without asking the server.
        const RECHECK_AFTER: std::time::Duration = std::time::Duration::from_secs(2);
        if let Some((at, e)) = &*self.inner.schema_refused.lock().expect("schema check lock")
            && at.elapsed() < RECHECK_AFTER
        {
            return Err(e.clone());
        }
        let checked = self
            .inner
            .schema_checked
            .get_or_try_init(|| async { self.check_schema().await.map(|_| ()) })
            .await
            .map(|_| ());
        if let Err(e @ (Error::SchemaOutdated { .. } | Error::SchemaNotGranted { .. })) = &checked {
            *self.inner.schema_refused.lock().expect("schema check lock") =
                Some((std::time::Instant::now(), e.clone()));
        }
        checked
    }

    /// Grants the runtime roles what they need, in one transaction: each pusher may push
    /// (best effort and durable), each listener may listen and prune, and nothing more
    /// ([`grant_statements`](crate::grant_statements) lists the statements). Run as the
    /// schema's owner, after [`migrate`](PgPipe::migrate); idempotent. A role that does not
    /// exist is [`Error::UnknownRole`], and nothing is granted.
    pub async fn grant(&self, roles: &[(&str, Role)]) -> Result<(), Error> {
        self.check_open()?;
        crate::grant::grant(&self.inner.config, roles).await
    }

    /// Sends several updates, in order, in one transaction: all are delivered or none.
    /// They are packed into as few notifications as fit.
    pub async fn push_many(&self, updates: &[Update]) -> Result<(), Error> {
        self.check_open()?;
        self.ensure_schema().await?;
        self.inner.pusher.push(updates).await
    }

    /// Sends an update on the caller's connection, inside whatever transaction it is in:
    /// listeners receive it if and only if that transaction commits. Outside a transaction
    /// it is committed at once.
    ///
    /// A durable pipe first checks the schema, as before any durable push
    /// ([`check_schema`](PgPipe::check_schema), on a connection of its own, once per
    /// pipe): on a schema that is missing or behind, [`Error::SchemaOutdated`], and
    /// nothing is sent on the caller's connection, so its transaction goes on.
    ///
    /// `client` is the connection or transaction to send on ([`PushClient`]): a
    /// `tokio_postgres::Client` or `Transaction` by reference (`&tx`; with
    /// deadpool-postgres, `&**object` for a pooled client or `&*transaction` for its
    /// transaction), or with the feature `sqlx` an sqlx connection or transaction by
    /// mutable reference (`&mut *tx`). Whichever the driver, the push is the same one
    /// statement with the same parameters, sent unnamed, and these guarantees hold alike;
    /// a statement the server refuses is [`Error::Postgres`] (`Error::Sqlx` on an sqlx
    /// connection), and a durable push that meets log rows at its numbers is
    /// [`Error::NumbersTaken`].
    pub async fn push_in<C: PushClient>(&self, client: C, update: &Update) -> Result<(), Error> {
        self.push_many_in(client, std::slice::from_ref(update))
            .await
    }

    /// [`push_in`](PgPipe::push_in) for several updates, in order.
    pub async fn push_many_in<C: PushClient>(
        &self,
        client: C,
        updates: &[Update],
    ) -> Result<(), Error> {
        self.check_open()?;
        self.ensure_schema().await?;
        self.inner.pusher.push_in(client, updates).await
    }

    /// The statement [`push_many_in`](PgPipe::push_many_in) would send for these updates,
    /// for a driver this crate does not bind (another Rust driver, or a program in another
    /// language that runs what it is handed): its SQL text and its parameters in
    /// PostgreSQL's text form. Run it once, as it is, inside the transaction that must carry
    /// the updates ([`PushStatement`] says how; the wire-format guide, section 11, gives
    /// the rules, and what to send without this function). Then the guarantees of
    /// `push_in` hold: delivered if and only if that transaction commits, never to this
    /// pipe's listener, the durable log row in the same statement.
    ///
    /// The updates are checked, numbered and (with secrets) signed now, as for
    /// `push_many_in`, and a durable pipe checks the schema first; they are not counted as
    /// pushed, since running the statement is the caller's business. No updates: a
    /// statement that sends nothing.
    pub async fn statement_for(&self, updates: &[Update]) -> Result<PushStatement<'static>, Error> {
        self.check_open()?;
        self.ensure_schema().await?;
        self.inner.pusher.statement_for(updates)
    }

    /// Like [`listen`](UpdatePipe::listen), with connection events in the same ordered
    /// stream as the updates: [`Event::Connected`], [`Event::Disconnected`] and
    /// [`Event::Resync`], which says that updates may have been missed and the application
    /// must reload its state; in durable mode also [`Event::Position`] after each update
    /// read from the log (and where reading starts), to resume from or, for a named
    /// consumer, to [`ack`](PgPipe::ack). (With plain `listen`, events are logged and
    /// counted only.)
    pub async fn listen_events(&self, events: mpsc::Sender<Event>) -> Result<(), Error> {
        self.start_listening(Sink::Events(events), false).await
    }

    /// A named consumer ([`Config::with_consumer`]): everything up to `position` (an
    /// [`Event::Position`] this listener gave) is handled, and a restart may resume after
    /// it. Returns at once: the newest position acknowledged is written to the database at
    /// most every [`ACK_INTERVAL`](crate::ACK_INTERVAL) (a process that stops loses at most
    /// that much of its acknowledgements, and gets those updates again), and when the pipe
    /// closes. A position older than one acknowledged already changes nothing.
    ///
    /// [`Error::Config`] when the pipe has no consumer or does not listen yet.
    pub fn ack(&self, position: &Position) -> Result<(), Error> {
        self.check_open()?;
        match &*self.inner.acks.lock().expect("acks slot") {
            Some(acks) => {
                acks.ack(position);
                Ok(())
            }
            None => Err(Error::Config(
                "ack is for a named consumer's listener (Config::with_consumer, listen_events)"
                    .into(),
            )),
        }
    }

    /// Why the listener stopped by itself, once it did (its channel then ends, after a
    /// last [`Event::Disconnected`] saying the same): [`Error::ListenUnsupported`] when
    /// notifications do not reach its connection although it answers (a transaction-pooling
    /// proxy), [`Error::ConsumerTaken`] when another session took its named consumer, or the
    /// last error reconnecting once the configured attempts are used up. `None` while it
    /// runs, before it starts, and when [`close`](UpdatePipe::close) stopped it.
    pub fn listen_ended(&self) -> Option<Error> {
        self.inner.ended.lock().expect("ended slot").clone()
    }

    /// A named consumer: writes the newest acknowledged position now, rather than within
    /// [`ACK_INTERVAL`](crate::ACK_INTERVAL), and says whether that worked (the background
    /// writes only log their failures).
    pub async fn flush_acks(&self) -> Result<(), Error> {
        self.check_open()?;
        let acks = self.inner.acks.lock().expect("acks slot").clone();
        match acks {
            Some(acks) => acks.flush().await,
            None => Ok(()),
        }
    }

    /// The maddy layout: also listen for the updates maddy nodes send about this mailbox,
    /// on its maddy channel ([`MailboxKey::maddy_channel`]), as a maddy node does when a
    /// client opens the mailbox. Reference-counted: each call needs an
    /// [`unsubscribe`](PgPipe::unsubscribe). Returns once the server has confirmed the
    /// `LISTEN` (or, after a lost connection, once the new one is subscribed again). Every
    /// reconnect subscribes to the whole set again, with a resync that covers it, since
    /// maddy's updates are not logged: [`ResyncReason::Reconnected`](crate::ResyncReason)
    /// in best-effort mode, [`ResyncReason::Resubscribed`](crate::ResyncReason) naming the
    /// keys in durable mode. Updates between updatepipe pipes need no subscription:
    /// they travel on the pipe's channel.
    ///
    /// Fails with [`Error::NotListening`] before [`listen`](UpdatePipe::listen) or outside
    /// the maddy layout, and with [`Error::InvalidChannel`] for a key that cannot be a
    /// channel.
    pub async fn subscribe(&self, key: impl Into<MailboxKey>) -> Result<(), Error> {
        let key = key.into();
        key.maddy_channel()?;
        self.ask_listener(|reply| Command::Subscribe(key, reply))
            .await
    }

    /// Undoes one [`subscribe`](PgPipe::subscribe); after the last, the listener `UNLISTEN`s
    /// the mailbox's channel. A mailbox not subscribed is left as it is.
    pub async fn unsubscribe(&self, key: impl Into<MailboxKey>) -> Result<(), Error> {
        let key = key.into();
        self.ask_listener(|reply| Command::Unsubscribe(key, reply))
            .await
    }

    async fn ask_listener(
        &self,
        command: impl FnOnce(tokio::sync::oneshot::Sender<Result<(), Error>>) -> Command,
    ) -> Result<(), Error> {
        self.check_open()?;
        if self.inner.config.layout() != Layout::Maddy {
            return Err(Error::NotListening);
        }
        // Not held while waiting: `close` must not wait for an answer.
        let commands = match &*self.inner.listener.lock().await {
            Some(listener) => listener.commands(),
            None => return Err(Error::NotListening),
        };
        let (reply, answer) = tokio::sync::oneshot::channel();
        commands
            .send(command(reply))
            .await
            .map_err(|_| Error::Closed)?;
        answer.await.map_err(|_| Error::Closed)?
    }

    /// The pipe's live counters, for the hub.
    pub(crate) fn counters(&self) -> Arc<Counters> {
        self.inner.counters.clone()
    }

    /// The server's notification queue usage, from 0 to 1 (`pg_notification_queue_usage()`).
    /// It grows when some listener of the database does not read; at 1 every NOTIFY in the
    /// cluster fails.
    pub async fn queue_usage(&self) -> Result<f64, Error> {
        self.check_open()?;
        let usage = self
            .inner
            .pusher
            .query_f64("SELECT pg_catalog.pg_notification_queue_usage()")
            .await?;
        crate::stats::queue_usage(usage);
        Ok(usage)
    }

    /// The server's status as this pipe sees it: version, primary or standby, whether
    /// LISTEN works through this connection (it does not through a transaction-pooling
    /// proxy), notification queue usage, schema version and durable log size. Quick: a
    /// round trip or two, and the LISTEN probe's own notification. `listeners` is `None`;
    /// [`PgPipe::status_with_listeners`] counts them.
    pub async fn status(&self) -> Result<crate::Status, Error> {
        self.check_open()?;
        crate::status::status(&self.inner.config, false).await
    }

    /// As [`PgPipe::status`], and `listeners` counts the listeners heard by their
    /// heartbeats during one heartbeat period of this configuration (half its health
    /// interval: about 5.5 s by default).
    pub async fn status_with_listeners(&self) -> Result<crate::Status, Error> {
        self.check_open()?;
        crate::status::status(&self.inner.config, true).await
    }

    /// The configuration.
    pub fn config(&self) -> &Config {
        &self.inner.config
    }

    /// This pipe's origin: the sender id its envelopes carry.
    pub fn origin(&self) -> &Origin {
        &self.inner.origin
    }

    /// A snapshot of the counters.
    pub fn stats(&self) -> Stats {
        self.inner.counters.snapshot()
    }

    /// Whether [`close`](UpdatePipe::close) was called.
    pub fn is_closed(&self) -> bool {
        self.inner.closed.load(Ordering::Acquire)
    }

    fn check_open(&self) -> Result<(), Error> {
        if self.is_closed() {
            return Err(Error::Closed);
        }
        Ok(())
    }
}

impl UpdatePipe for PgPipe {
    async fn listen(&self, updates: mpsc::Sender<Update>) -> Result<(), Error> {
        self.start_listening(Sink::Updates(updates), false).await
    }

    async fn init_push(&self) -> Result<(), Error> {
        self.check_open()?;
        self.ensure_schema().await?;
        self.inner.pusher.init().await
    }

    async fn push(&self, update: &Update) -> Result<(), Error> {
        self.push_many(std::slice::from_ref(update)).await
    }

    async fn close(&self) -> Result<(), Error> {
        self.inner.closed.store(true, Ordering::Release);
        let listener = self.inner.listener.lock().await.take();
        if let Some(listener) = listener {
            listener.stop().await;
        }
        self.inner.pusher.close().await;
        Ok(())
    }
}

impl PgPipe {
    /// [`ensure_schema`](PgPipe::ensure_schema) before listening: with
    /// [`ListenOptions::with_wait_for_server`], retried with the backoff while the server cannot be
    /// reached (as the listener's first connection is), until the attempts are used up or
    /// the pipe is closed.
    async fn ensure_schema_waiting(&self) -> Result<(), Error> {
        let config = &self.inner.config;
        let mut attempt = 0u32;
        loop {
            let e = match self.ensure_schema().await {
                Err(e) if config.listen_options().wait_for_server() && e.is_connection() => e,
                other => return other,
            };
            attempt = attempt.saturating_add(1);
            if self.is_closed()
                || config
                    .listen_options()
                    .backoff()
                    .max_attempts
                    .is_some_and(|max| attempt >= max)
            {
                return Err(e);
            }
            tracing::warn!(
                target: "updatepipe::listen",
                error = %e,
                attempt,
                "waiting for the server"
            );
            // At least a tenth of a second: a refused connection fails at once.
            let delay = config.listen_options().backoff().delay(attempt);
            tokio::time::sleep(delay.max(std::time::Duration::from_millis(100))).await;
            self.check_open()?;
        }
    }

    /// The IDLE hub's listener: events, this pipe's own updates included.
    pub(crate) async fn listen_for_hub(&self, events: mpsc::Sender<Event>) -> Result<(), Error> {
        self.start_listening(Sink::Events(events), true).await
    }

    async fn start_listening(&self, sink: Sink, own_updates: bool) -> Result<(), Error> {
        self.check_open()?;
        if self.inner.listening.swap(true, Ordering::AcqRel) {
            return Err(Error::AlreadyListening);
        }
        // Until a listener is in place, a failed or cancelled attempt does not count: the
        // caller may try again.
        let mut attempt = ListenAttempt(Some(&self.inner.listening));
        self.ensure_schema_waiting().await?;
        let mut slot = self.inner.listener.lock().await;
        let lent = FromPipe {
            origin: self.inner.origin.clone(),
            counters: self.inner.counters.clone(),
            pool: self.inner.pusher.pool(),
            ended: self.inner.ended.clone(),
        };
        let started = Listener::start(
            &self.inner.config,
            lent,
            sink,
            &self.inner.closed,
            own_updates,
        )
        .await;
        match started {
            // Closed while connecting: stop at once rather than leave it running.
            Ok(listener) if self.is_closed() => {
                listener.stop().await;
                Err(Error::Closed)
            }
            Ok(listener) => {
                *self.inner.acks.lock().expect("acks slot") = listener.acks();
                *slot = Some(listener);
                attempt.0 = None;
                Ok(())
            }
            Err(e) => Err(e),
        }
    }
}

/// Clears the "listening" flag when dropped armed: `listen` failed or was cancelled.
struct ListenAttempt<'a>(Option<&'a AtomicBool>);

impl Drop for ListenAttempt<'_> {
    fn drop(&mut self) {
        if let Some(flag) = self.0 {
            flag.store(false, Ordering::Release);
        }
    }
}
