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
//! notification are atomic; a server listens. (This example runs as a test: against
//! `DATABASE_URL`, or a throwaway cluster.)
//!
//! ```
//! use updatepipe::{Config, PgPipe, SeqSet, Update, UpdatePipe};
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
//! let (config_pg, tls) = (config.pg().clone(), config.tls_connector()?);
//! let store = PgPipe::new(config.clone())?;
//! let server = PgPipe::new(config)?;
//!
//! // The server: updates from every other sender arrive here, never its own.
//! let (tx, mut updates) = tokio::sync::mpsc::channel(1024);
//! server.listen(tx).await?;
//!
//! // The mail store: delivered if and only if the transaction commits.
//! // Its own connection, with the pipe's TLS settings.
//! let (mut client, connection) = config_pg.connect(tls).await?;
//! tokio::spawn(connection);
//! let tx = client.transaction().await?;
//! tx.batch_execute("CREATE TEMP TABLE messages (mailbox int8, uid int4)").await?;
//! tx.execute("INSERT INTO messages VALUES (42, 7)", &[]).await?;
//! store.push_in(&tx, &Update::new_message(42, SeqSet::single(7)?)).await?;
//! tx.commit().await?;
//!
//! let update = updates.recv().await.expect("the update");
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
//! `docs/delivery.md` states this fully and argues why it holds.
//!
//! ## Modules
//!
//! | concept | module |
//! |---|---|
//! | the update model and its JSON contract | `update`, `seqset` |
//! | the wire format (envelope v1, maddy's legacy form) | `envelope` |
//! | configuration, channel names | `config`, `channel` |
//! | the pipe interface and its PostgreSQL implementation | `pipe` |
//! | the push path (batching) / the listen path (reconnect, heartbeats, resync) | `push` / `listen` |
//! | the durable log: writing, reading in commit order, pruning | `log` |
//! | migrations (the `updatepipe` schema and log table) | `migrate` |
//! | counters; the server's status | `stats`; `status` |
//! | untrusted input: payload limits, signed envelopes and replay checks | `limits`, `sign` |
//! | TLS (`sslmode` up to `verify-full`, with rustls) | `tls` |
//! | throwaway clusters for tests and the demo | [`cluster`] |

mod cancel;
mod channel;
#[cfg(feature = "cluster")]
pub mod cluster;
mod config;
mod connect;
mod envelope;
mod error;
mod limits;
mod listen;
mod log;
mod migrate;
mod origin;
mod pipe;
mod push;
mod seqset;
mod sign;
mod stats;
mod status;
mod tls;
mod update;

pub use channel::{ChannelName, MAX_CHANNEL_LEN};
pub use config::{
    Backoff, Config, DEFAULT_CONNECT_TIMEOUT, DEFAULT_HEALTH_INTERVAL,
    DEFAULT_IDLE_IN_TRANSACTION_TIMEOUT, DEFAULT_LOCK_TIMEOUT, DEFAULT_MAX_BATCH,
    DEFAULT_MAX_BUFFERED, DEFAULT_MAX_IN_FLIGHT, DEFAULT_MAX_QUEUED_BYTES,
    DEFAULT_MAX_QUEUED_PUSHES, DEFAULT_POOL_SIZE, DEFAULT_PUSH_TIMEOUT, DEFAULT_QUEUE_WARN,
    DEFAULT_RETENTION, DEFAULT_STATEMENT_TIMEOUT, QueueFull, Since,
};
pub use envelope::{
    ENVELOPE_VERSION, Envelope, MAX_LOGGED_ENVELOPE_LEN, MAX_PAYLOAD_LEN, WireFormat,
};
pub use error::{DecodeError, Error, Limit, ReplayKind, UpdateError};
pub use limits::{DEFAULT_MAX_DEPTH, DEFAULT_MAX_UPDATES, Limits};
pub use listen::{Event, ResyncReason};
pub use migrate::{MIGRATION_TABLE, MigrationInfo, embedded_migrations};
pub use origin::Origin;
pub use pipe::{PgPipe, UpdatePipe};
pub use seqset::{MAX_SEQ_SET_LEN, SeqNum, SeqRange, SeqSet};
pub use sign::{DEFAULT_REPLAY_WINDOW, MIN_SECRET_LEN, Secret, Signer};
pub use stats::Stats;
pub use status::Status;
pub use tls::SslMode;
pub use update::{Flag, MAX_FLAG_LEN, MAX_FLAGS, MailboxKey, Update, UpdateKind};

/// The README's code compiles (`cargo test --doc`).
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
struct ReadmeDoctests;
