//! # updatepipe
//!
//! IMAP mailbox updates (new message, flags changed, expunge, mailbox destroyed) carried
//! between processes and machines through PostgreSQL `LISTEN`/`NOTIFY`: an "update pipe" in
//! the sense of the Go mail server maddy, for anything that already holds a PostgreSQL
//! connection (IMAP servers, admin tools, test containers).
//!
//! ## Quick start
//!
//! A mail store pushes inside its own transaction, so the stored message and its
//! notification are atomic; a server listens, with [`PgPipe::listen_events`]: updates and
//! the connection's events in one ordered stream, among them [`Event::Resync`] ("updates
//! may have been missed: reload"). (This example runs as a test: against `DATABASE_URL`,
//! or a throwaway cluster.)
//!
//! ```
//! use updatepipe::{Config, Event, PgPipe, SeqSet, Update, UpdatePipe};
//! # use updatepipe::{ChannelName, cluster::TempCluster};
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! # let cluster = match std::env::var("DATABASE_URL") {
//! #     Ok(_) => None,
//! #     Err(_) => Some(TempCluster::start()?),
//! # };
//! # let url = match &cluster { Some(c) => c.url(), None => std::env::var("DATABASE_URL")? };
//! # let channel = ChannelName::new(format!("quickstart_{}", std::process::id()))?;
//! let config = Config::from_url(&url)?; // or Config::from_env()?
//! # let config = config.with_channel(channel);
//! let store = PgPipe::new(config.clone())?;
//! let server = PgPipe::new(config)?;
//!
//! // The server: updates from every other sender arrive here, never its own.
//! let (tx, mut events) = tokio::sync::mpsc::channel(1024);
//! server.listen_events(tx).await?;
//!
//! // The mail store: delivered if and only if the transaction commits.
//! // Its own connection, made as the pipe makes its own (hosts, TLS, ~/.pgpass).
//! let (mut client, connection) = store.config().connect().await?;
//! tokio::spawn(connection);
//! let tx = client.transaction().await?;
//! tx.batch_execute("CREATE TEMP TABLE messages (mailbox int8, uid int4)").await?;
//! tx.execute("INSERT INTO messages VALUES (42, 7)", &[]).await?;
//! store.push_in(&tx, &Update::new_message(42, SeqSet::single(7)?)).await?;
//! tx.commit().await?;
//!
//! let update = loop {
//!     match events.recv().await.expect("the pipe is open") {
//!         Event::Update(update) => break update,
//!         Event::Resync(_reason) => { /* reload every open mailbox from the store */ }
//!         _ => {} // Connected, Disconnected
//!     }
//! };
//! assert_eq!(update.to_json(), r#"{"Type":0,"Key":42,"SeqSet":"7"}"#);
//! store.close().await?;
//! server.close().await?;
//! # Ok(())
//! # }
//! ```
//!
//! ## Delivery guarantees, as they stand
//!
//! - A push returns once its update is committed; a push inside the caller's transaction is
//!   delivered if and only if that transaction commits. Concurrent pushes share
//!   transactions.
//! - A listener receives every update committed while it is connected, once, in commit
//!   order, and never its own pipe's updates. It reconnects by itself and finds a dead
//!   connection within the health interval.
//! - Best effort (default): updates sent while it is disconnected are lost, and a
//!   [`Event::Resync`] says so. Durable mode ([`Config::with_durable`]): they are replayed
//!   from the log, exactly once, in commit order per sender.
//! - A payload that does not decode, or asks for more than the [`Limits`], is counted, logged
//!   and dropped; the listener goes on. With signing on ([`Config::with_secrets`]), so is
//!   one that is unsigned, forged or replayed.
//!
//! [`guide::delivery`] states this fully and argues why it holds.
//!
//! ## How it is built
//!
//! An update travels one way: the push path packs it into a version 1 envelope (the wire
//! format: `{"v":1,"o":origin,"s":number,"u":[updates]}`) and sends it with `pg_notify`,
//! batched with concurrent pushes; the listen path decodes each notification, decides what
//! it is (an update from another sender, its own echo, a heartbeat, a gap, a forgery) and
//! hands the updates over in order. In durable mode the same statement writes a log row,
//! which listeners read in commit order. [`guide::architecture`] has the map of
//! the (private) modules; the public items are all re-exported here.
//!
//! ## Where things are
//!
//! | concept | items |
//! |---|---|
//! | the pipe interface and its PostgreSQL implementation | [`UpdatePipe`], [`PgPipe`] |
//! | what `push_in` sends on: tokio-postgres, sqlx (feature `sqlx`); any other driver | [`PushClient`]; [`PushStatement`], [`PgPipe::statement_for`] |
//! | the update model and its JSON contract | [`Update`], [`MailboxKey`], [`SeqSet`], [`Flag`] |
//! | the wire format (envelope v1, maddy's legacy form) | [`Envelope`], [`guide::wire_format`] |
//! | configuration: libpq's settings, the pipe's options | [`Config`], [`ChannelName`] |
//! | channel layouts: the shared one, maddy's per mailbox | [`Layout`], [`guide::maddy`] |
//! | what the listener tells an application | [`Event`], [`ResyncReason`] |
//! | errors | [`Error`], [`ConnectError`], [`DecodeError`] |
//! | counters, metrics and the server's status | [`Stats`], [`METRICS`], [`Status`] |
//! | signed envelopes | [`Secret`], [`Signer`] |
//! | migrations (the `updatepipe` schema, the log) | [`embedded_migrations`], [`PgPipe::migrate`] |
//! | TLS (`sslmode` up to `verify-full`, with rustls) | [`SslMode`] |
//! | throwaway clusters for tests and the demo (feature `cluster`) | `cluster` |
//! | the guides: delivery, wire format, operations, security | [`guide`] |
//!
//! ## Features
//!
//! - `cli` (default): the `updatepipe` command-line tool; it enables the other two. A
//!   library user leaves it out: `default-features = false`.
//! - `cluster`: the `cluster` module, throwaway PostgreSQL clusters from the local
//!   binaries.
//! - `metrics`: the counters, the push latency and the queue usage through the `metrics`
//!   facade, under the names of [`METRICS`].
//! - `sqlx`: [`PgPipe::push_in`] and [`PgPipe::push_many_in`] also take an sqlx 0.8
//!   connection or transaction ([`PushClient`]), for a store written on sqlx. sqlx is
//!   built with its Postgres driver and Tokio runtime only.
//!
//! ## Versions of tokio-postgres, deadpool-postgres and sqlx
//!
//! [`PgPipe::push_in`] takes an application's own `tokio_postgres` client or transaction,
//! and a deadpool-postgres `Object` derefs to one; with the feature `sqlx`, an sqlx
//! connection or transaction. They must be the versions this crate is built with
//! (tokio-postgres 0.7, deadpool-postgres 0.14, sqlx 0.8), or the types do not match.
//! All are re-exported, so an application can use them rather than name its own:
//! `updatepipe::tokio_postgres`, `updatepipe::deadpool_postgres`, `updatepipe::sqlx`.

pub use deadpool_postgres;
#[cfg(feature = "sqlx")]
pub use sqlx;
pub use tokio_postgres;

mod channel;
#[cfg(feature = "cluster")]
pub mod cluster;
mod config;
mod envelope;
mod error;
// Not collected as doctests: the guides' code blocks are shell, SQL and excerpts.
mod grant;
#[cfg(not(doctest))]
pub mod guide;
mod hub;
mod layout;
mod limits;
mod listen;
mod log;
mod migrate;
mod origin;
mod pg;
mod pipe;
mod push;
mod seqset;
mod sign;
mod stats;
mod status;
mod update;

pub use channel::{ChannelName, MAX_CHANNEL_LEN};
pub use config::{
    Backoff, Config, DEFAULT_CONSUMER_HOLD, DEFAULT_HEALTH_INTERVAL, DEFAULT_LOG_PAGE_BYTES,
    DEFAULT_LOG_PAGE_ROWS, DEFAULT_MAX_BATCH, DEFAULT_MAX_BUFFERED, DEFAULT_MAX_IN_FLIGHT,
    DEFAULT_MAX_QUEUED_BYTES, DEFAULT_MAX_QUEUED_PUSHES, DEFAULT_POOL_SIZE, DEFAULT_PUSH_TIMEOUT,
    DEFAULT_QUEUE_WARN, DEFAULT_RETENTION, ListenOptions, PushOptions, QueueFull, Since,
};
pub use envelope::{
    ENVELOPE_VERSION, Envelope, MAX_LOGGED_ENVELOPE_LEN, MAX_PAYLOAD_LEN, WireFormat,
};
pub use error::{ConnectError, DecodeError, Error, Limit, ReplayKind, UpdateError};
pub use grant::{Role, grant_statements};
pub use hub::{
    DEFAULT_HUB_BUFFER, DEFAULT_UNSUBSCRIBE_GRACE, DEFAULT_WATCH_BOUND, Hub, HubOptions,
    MailboxEvent, ReloadReason, Watch, WatchOptions, WatchStats,
};
pub use layout::{Layout, MADDY_SENDER_PREFIX};
pub use limits::{DEFAULT_MAX_DEPTH, DEFAULT_MAX_UPDATES, Limits};
pub use listen::{ACK_INTERVAL, Event, ResyncReason};
pub use log::{ConsumerStatus, HistoryChange, MAX_CONSUMER_NAME_LEN, MAX_POSITION_LEN, Position};
pub use migrate::{MIGRATION_TABLE, MigrationInfo, embedded_migrations};
pub use origin::Origin;
pub use pg::{
    DEFAULT_CONNECT_TIMEOUT, DEFAULT_IDLE_IN_TRANSACTION_TIMEOUT, DEFAULT_LOCK_TIMEOUT,
    DEFAULT_STATEMENT_TIMEOUT, SessionLimits, SslMode,
};
pub use pipe::{PgPipe, UpdatePipe};
pub use push::{PushClient, PushStatement};
pub use seqset::{MAX_SEQ_SET_LEN, SeqNum, SeqRange, SeqSet};
pub use sign::{DEFAULT_REPLAY_WINDOW, MAX_SECRET_FILE_LEN, MIN_SECRET_LEN, Secret, Signer};
#[cfg(feature = "metrics")]
pub use stats::describe_metrics;
pub use stats::{METRICS, Stats};
pub use status::Status;
pub use update::{Flag, MAX_FLAG_LEN, MAX_FLAGS, MailboxKey, Update, UpdateKind};

/// The README's code compiles (`cargo test --doc`).
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
struct ReadmeDoctests;
