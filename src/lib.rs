//! # updatepipe
//!
//! IMAP mailbox updates (new message, flags changed, expunge, mailbox destroyed) carried
//! between processes and machines through PostgreSQL `LISTEN`/`NOTIFY`: an "update pipe" in
//! the sense of the Go mail server maddy, for anything that already holds a PostgreSQL
//! connection (IMAP servers, admin tools, test containers).
//!
//! ## Quick start
//!
//! ```no_run
//! use updatepipe::{Config, PgPipe, SeqSet, Update, UpdatePipe};
//!
//! # async fn run() -> Result<(), updatepipe::Error> {
//! let pipe = PgPipe::new(Config::from_env()?)?;
//!
//! // A server listens: updates sent by others arrive on the channel.
//! let (tx, mut rx) = tokio::sync::mpsc::channel(1024);
//! pipe.listen(tx).await?;
//!
//! // A mail store pushes inside its own transaction: the update is delivered if and only
//! // if the transaction commits.
//! let (mut client, connection) =
//!     tokio_postgres::connect("postgres://mail@localhost/mail", tokio_postgres::NoTls).await?;
//! tokio::spawn(connection);
//! let tx = client.transaction().await?;
//! // ... INSERT the message ...
//! pipe.push_in(&tx, &Update::new_message(42, SeqSet::single(7)?)).await?;
//! tx.commit().await?;
//!
//! while let Some(update) = rx.recv().await {
//!     println!("{}", update.to_json());
//! }
//! pipe.close().await
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
//! - A payload that does not decode is counted, logged and dropped; the listener goes on.
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
//! | throwaway clusters for tests and the demo | [`cluster`] |

mod channel;
pub mod cluster;
mod config;
mod connect;
mod envelope;
mod error;
mod listen;
mod log;
mod migrate;
mod pipe;
mod push;
mod seqset;
mod stats;
mod status;
mod update;

pub use channel::{ChannelName, MAX_CHANNEL_LEN};
pub use config::{
    Backoff, Config, DEFAULT_CONNECT_TIMEOUT, DEFAULT_HEALTH_INTERVAL, DEFAULT_MAX_BATCH,
    DEFAULT_MAX_BUFFERED, DEFAULT_POOL_SIZE, DEFAULT_PUSH_TIMEOUT, DEFAULT_RETENTION, Since,
};
pub use envelope::{
    ENVELOPE_VERSION, Envelope, MAX_LOGGED_ENVELOPE_LEN, MAX_PAYLOAD_LEN, Origin, WireFormat,
};
pub use error::{DecodeError, Error, UpdateError};
pub use listen::{Event, ResyncReason};
pub use migrate::{MIGRATION_TABLE, MigrationInfo, embedded_migrations};
pub use pipe::{PgPipe, UpdatePipe};
pub use seqset::{MAX_SEQ_SET_LEN, SeqNum, SeqRange, SeqSet};
pub use stats::Stats;
pub use status::Status;
pub use update::{Flag, MAX_FLAG_LEN, MAX_FLAGS, MailboxKey, Update, UpdateKind};

/// The README's code compiles (`cargo test --doc`).
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
struct ReadmeDoctests;
