//! The crate's errors: one [`Error`] for every operation, with typed details for bad updates
//! ([`UpdateError`]) and bad payloads ([`DecodeError`]).

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

mod connect;
mod words;

pub use connect::ConnectError;
pub(crate) use words::pg_message;

/// Everything that can go wrong in `updatepipe`.
///
/// Each variant says what happened; its message says what the user can do about it.
/// Messages never contain a password. An error can be cloned: every push of a failed
/// batch gets the batch's one error, the same cause (the sources it wraps are shared).
#[derive(Clone, Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// An update is not valid (bad sequence set, flag, key or type).
    #[error(transparent)]
    InvalidUpdate(#[from] UpdateError),

    /// A payload could not be decoded into updates.
    #[error("cannot decode payload: {0}")]
    Decode(#[from] DecodeError),

    /// An envelope does not fit in one notification (7999 bytes).
    #[error(
        "an update needs an envelope of {size} bytes, over the limit of {limit} bytes (7999 for a \
         notification; durable mode carries up to 1 MiB through the log); shorten its mailbox key, \
         flags or sequence set"
    )]
    PayloadTooLarge {
        /// The encoded size in bytes.
        size: usize,
        /// The limit in bytes.
        limit: usize,
    },

    /// A channel name breaks PostgreSQL's rules.
    #[error("invalid channel name: {0}")]
    InvalidChannel(&'static str),

    /// A position's text form is not one a durable reader wrote
    /// ([`Position`](crate::Position)'s `FromStr`).
    #[error("invalid position: {0}")]
    InvalidPosition(&'static str),

    /// The configuration is incomplete or malformed.
    #[error("invalid configuration: {0}")]
    Config(String),

    /// A connection to PostgreSQL could not be made: every host was tried, and the error
    /// says what happened at each ([`ConnectError`]).
    #[error("cannot connect to PostgreSQL: {0}")]
    Connect(ConnectError),

    /// PostgreSQL answered a statement with an error, or the connection broke.
    #[error("PostgreSQL error: {}", pg_message(.0))]
    Postgres(#[source] Arc<tokio_postgres::Error>),

    /// An sqlx connection or transaction given to [`push_in`](crate::PgPipe::push_in)
    /// answered the push's statement with an error, or broke (feature `sqlx`). The sqlx
    /// error is the source; its database error, if any, tells the SQLSTATE
    /// (`as_database_error`).
    #[cfg(feature = "sqlx")]
    #[error("PostgreSQL error: {}", words::sqlx_message(.0))]
    Sqlx(#[source] Arc<sqlx::Error>),

    /// The connection pool could not hand out a connection.
    #[error("no pooled connection: {0}")]
    Pool(#[source] Arc<deadpool_postgres::PoolError>),

    /// Applying the schema migrations failed.
    #[error("migration failed: {}", migrate_message(.0))]
    Migrate(#[source] Arc<refinery::Error>),

    /// The `updatepipe` schema is missing or older than this build needs, in durable mode.
    /// Runtime roles never migrate: the schema's owner runs `updatepipe migrate`
    /// ([`PgPipe::migrate`](crate::PgPipe::migrate)).
    #[error(
        "{}, this build needs {needed}: run `updatepipe migrate` as the schema's owner",
        match .found {
            Some(v) => format!("the updatepipe schema is at version {v}"),
            None => "the updatepipe schema is not migrated".to_owned(),
        }
    )]
    SchemaOutdated {
        /// The version found (`None`: not migrated at all).
        found: Option<i64>,
        /// The version this build needs.
        needed: i64,
    },

    /// The connecting role may not read the `updatepipe` schema's version: it was not
    /// granted what durable mode needs.
    #[error(
        "role {role:?} may not read the updatepipe schema: run `updatepipe grant --pusher \
         {role}` (or `--listener {role}`) as the schema's owner"
    )]
    SchemaNotGranted {
        /// The connecting role.
        role: String,
    },

    /// The connecting role lacks a privilege durable mode needs on the `updatepipe` schema:
    /// it was not granted what a pusher, or a listener, needs (it may have been granted the
    /// other).
    #[error(
        "role {role:?} may not {doing}: run `updatepipe grant --{grant} {role}` as the \
         schema's owner"
    )]
    NotGranted {
        /// The connecting role.
        role: String,
        /// What it tried.
        doing: &'static str,
        /// What `updatepipe grant` gives it: `listener` or `pusher`.
        grant: &'static str,
    },

    /// `migrate` or `grant` was run by a role that does not own the `updatepipe` schema or
    /// its tables (PostgreSQL would only warn on a grant, and grant nothing; a migration into
    /// another role's schema would trust what that role put there).
    #[error(
        "role {role:?} does not own the updatepipe schema or its tables: run `updatepipe \
         migrate` and `updatepipe grant` as the schema's owner"
    )]
    NotSchemaOwner {
        /// The connecting role.
        role: String,
    },

    /// `grant` was asked to grant to a role that does not exist.
    #[error("role {0:?} does not exist; create it first (CREATE ROLE … LOGIN PASSWORD …)")]
    UnknownRole(String),

    /// An operation did not finish in its configured time.
    #[error("{what} timed out after {after:?}; is the server reachable and not overloaded?")]
    Timeout {
        /// What was being done.
        what: &'static str,
        /// The configured limit.
        after: Duration,
    },

    /// The server is a standby (in recovery), where LISTEN/NOTIFY do not work (a durable
    /// listener that polls the log may read one: `ListenOptions::with_polling`).
    #[error(
        "the server is a standby (in recovery): LISTEN and NOTIFY work only on a primary; \
         connect to the primary (or, for a durable listener, poll the log)"
    )]
    Standby,

    /// LISTEN does not work through this connection: notifications committed on the
    /// server never reach it, while it answers statements. A transaction-pooling proxy
    /// (PgBouncer in transaction or statement mode) is the usual cause: it hands the server
    /// connection that ran `LISTEN` to other clients after each transaction. A listener
    /// that finds this stops with this error ([`PgPipe::listen_ended`](crate::PgPipe::listen_ended)),
    /// rather than reconnecting for ever; `updatepipe status` and `updatepipe listen` exit
    /// with code 7. Connect listeners directly to the server, or through a session pool;
    /// pushes work through a transaction pool.
    #[error(
        "LISTEN does not work through this connection ({evidence}): a transaction-pooling \
         proxy (PgBouncer in transaction or statement mode) is the usual cause; connect \
         listeners directly to the server, or through a session pool (pool_mode = session)"
    )]
    ListenUnsupported {
        /// What showed it.
        evidence: String,
    },

    /// `listen` was called on a pipe that is already listening.
    #[error("this pipe is already listening; create another pipe for a second listener")]
    AlreadyListening,

    /// The pipe was closed.
    #[error("the pipe is closed")]
    Closed,

    /// A subscription by mailbox was asked of a pipe that does not listen, or not in the
    /// maddy layout.
    #[error(
        "subscribing to a mailbox needs a listening pipe in the maddy layout: call listen first, \
         with Config::with_layout(Layout::Maddy)"
    )]
    NotListening,

    /// The queue of pool pushes waiting for a flight is full (the server is slow or away),
    /// and the pipe is configured to fail fast ([`QueueFull::Fail`](crate::QueueFull)):
    /// nothing of this push was sent. Retry later, or shed load.
    #[error(
        "the push queue is full ({pushes} pushes, {bytes} bytes waiting): the server is slow \
         or unreachable; retry later"
    )]
    QueueFull {
        /// Pushes waiting when this one was refused.
        pushes: usize,
        /// Their encoded bytes.
        bytes: usize,
    },

    /// A lock that `migrate`, `grant` (or another wait of the pipe's on the server) needs
    /// stayed held by another session past the wait's bound. Any role that can connect can
    /// take an advisory lock, or keep a transaction open: the message names the sessions
    /// holding it (`pg_stat_activity`), to wait for or end (`pg_terminate_backend`).
    #[error(
        "{what} stayed held by another session for {waited:?}: {holders}; wait for it to          finish, or end it (SELECT pg_terminate_backend(pid)) and run this again"
    )]
    LockHeld {
        /// The lock waited for.
        what: &'static str,
        /// How long it was waited for.
        waited: Duration,
        /// The sessions holding it, as `pg_stat_activity` shows them (pid, role,
        /// application, client address, state), or what is known of them.
        holders: String,
    },

    /// Another session reads as this named consumer
    /// ([`Config::with_consumer`](crate::Config::with_consumer)): one process at a time
    /// may, so that a consumer's position means one stream. A second process started with
    /// the same name is refused; a listener that finds its consumer taken when it
    /// reconnects stops.
    #[error(
        "consumer {name:?} is being read by another session: {holders}; stop that process \
         first, or give this one another name"
    )]
    ConsumerTaken {
        /// The consumer.
        name: String,
        /// The sessions holding its lock, as `pg_stat_activity` shows them.
        holders: String,
    },

    /// A durable push met log rows at its envelope numbers that it did not write: another
    /// role with `INSERT` on the log squatted them (or the log was written by hand).
    /// Nothing of this push was committed; pushing again takes fresh numbers. Listeners
    /// treat the squatted rows as any other row: with signing on they are refused as
    /// forged, without it they are delivered as their writer wrote them.
    #[error(
        "the durable log already holds an envelope numbered {seq} of this sender that this          pipe did not write (another role squatted the number?): nothing of this push was          committed; push again (with fresh numbers), and see who may insert into          updatepipe.log"
    )]
    NumbersTaken {
        /// The first number of the push found taken (or the push's first number).
        seq: u64,
    },

    /// A throwaway PostgreSQL cluster could not be started or stopped (feature `cluster`).
    #[cfg(feature = "cluster")]
    #[error("throwaway PostgreSQL cluster: {0}")]
    Cluster(String),
}

impl Error {
    /// Whether the error came from reaching the server (connect, pool, timeout, broken
    /// connection) rather than from bad input or from the server refusing a statement.
    pub fn is_connection(&self) -> bool {
        match self {
            Error::Connect(e) => !e.is_auth() && !e.is_unknown_database(),
            Error::Timeout { .. } => true,
            Error::Pool(_) => true,
            // The server is too slow or away to take the pushes waiting.
            Error::QueueFull { .. } => true,
            // The connection broke, or the server ended it (a terminated backend, a shutdown).
            Error::Postgres(e) => crate::pg::is_connection_lost(e),
            #[cfg(feature = "sqlx")]
            Error::Sqlx(e) => crate::pg::sqlx_is_connection_lost(e),
            _ => false,
        }
    }

    /// Whether the server refused a row for a unique index (a durable push's numbers met
    /// in the log), whichever driver sent the statement.
    pub(crate) fn is_unique_violation(&self) -> bool {
        match self {
            Error::Postgres(e) => crate::pg::is_unique_violation(e),
            #[cfg(feature = "sqlx")]
            Error::Sqlx(e) => crate::pg::sqlx_is_unique_violation(e),
            _ => false,
        }
    }

    /// Whether a server was reached and refused the login (wrong password, no such role,
    /// `pg_hba.conf` refusing it, or a password needed and none given): the credentials
    /// are at fault, not the network.
    pub fn is_auth(&self) -> bool {
        matches!(self, Error::Connect(e) if e.is_auth())
    }

    /// Whether the error is bad input from the caller (an invalid update, channel or
    /// configuration, or a connection string naming a database the server does not have).
    pub fn is_invalid_input(&self) -> bool {
        match self {
            Error::Connect(e) => e.is_unknown_database(),
            _ => matches!(
                self,
                Error::InvalidUpdate(_)
                    | Error::PayloadTooLarge { .. }
                    | Error::InvalidChannel(_)
                    | Error::InvalidPosition(_)
                    | Error::Config(_)
                    | Error::UnknownRole(_)
            ),
        }
    }
}

impl From<tokio_postgres::Error> for Error {
    fn from(e: tokio_postgres::Error) -> Self {
        Error::Postgres(Arc::new(e))
    }
}

#[cfg(feature = "sqlx")]
impl From<sqlx::Error> for Error {
    fn from(e: sqlx::Error) -> Self {
        Error::Sqlx(Arc::new(e))
    }
}

impl From<deadpool_postgres::PoolError> for Error {
    fn from(e: deadpool_postgres::PoolError) -> Self {
        Error::Pool(Arc::new(e))
    }
}

impl From<refinery::Error> for Error {
    fn from(e: refinery::Error) -> Self {
        Error::Migrate(Arc::new(e))
    }
}

/// Why an update is not valid.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum UpdateError {
    /// The sequence set does not follow the IMAP grammar.
    #[error("invalid sequence set {input:?}: {reason}")]
    SeqSet {
        /// The text (shortened when long).
        input: String,
        /// What is wrong with it.
        reason: &'static str,
    },

    /// `Type` is not one of the four kinds.
    #[error(
        "unknown update type {0} (expected 0 new message, 1 flags changed, 2 expunge, \
         3 mailbox destroyed)"
    )]
    UnknownType(u64),

    /// A flag is not an IMAP flag.
    #[error("invalid flag {flag:?}: {reason}")]
    Flag {
        /// The flag (shortened when long).
        flag: String,
        /// What is wrong with it.
        reason: &'static str,
    },

    /// A flags update must name exactly one UID.
    #[error("a flags update (type 1) needs exactly one UID in SeqSet, got {0:?}")]
    FlagsNeedOneUid(String),

    /// Only new-message and flags updates carry flags.
    #[error("an update of type {0} carries no flags (only types 0 and 1 do)")]
    FlagsNotAllowed(u8),

    /// Too many flags on one update.
    #[error("{count} flags on one update; at most {limit} are accepted")]
    TooManyFlags {
        /// How many there were.
        count: usize,
        /// The limit.
        limit: usize,
    },

    /// The JSON text is not an update object.
    #[error("invalid update JSON: {0}")]
    Json(String),
}

impl UpdateError {
    pub(crate) fn seq_set(input: &str, reason: &'static str) -> Self {
        UpdateError::SeqSet {
            input: excerpt(input),
            reason,
        }
    }

    pub(crate) fn flag(flag: &str, reason: &'static str) -> Self {
        UpdateError::Flag {
            flag: excerpt(flag),
            reason,
        }
    }
}

/// Why a payload received on the channel was rejected.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum DecodeError {
    /// Neither an envelope nor maddy's legacy form.
    #[error("not an updatepipe envelope nor a legacy maddy payload")]
    Unrecognized,

    /// An envelope of a version this build does not read.
    #[error("unsupported envelope version {0} (this build reads version 1)")]
    UnknownVersion(u64),

    /// The envelope's structure is broken (bad JSON, missing or mistyped fields).
    #[error("malformed envelope: {0}")]
    Malformed(String),

    /// The envelope is well formed but carries an invalid update.
    #[error("invalid update: {0}")]
    Update(#[from] UpdateError),

    /// The payload is larger than any notification can be.
    #[error("payload of {0} bytes is larger than a notification can be")]
    TooLarge(usize),

    /// The payload asks for more than the listener's [`Limits`](crate::Limits) allow.
    #[error("{found} {limit}, over the limit of {max}")]
    OverLimit {
        /// Which bound.
        limit: Limit,
        /// What the payload asked for (for the depth: the first level past the bound).
        found: usize,
        /// The bound.
        max: usize,
    },

    /// Signing is on and the payload carries no signature.
    #[error("unsigned envelope (this listener accepts only signed envelopes)")]
    Unsigned,

    /// The signature does not match the envelope under any of the listener's secrets.
    #[error("forged envelope: its signature matches none of the secrets")]
    Forged,

    /// A correctly signed envelope that was already received, or is outside the time
    /// window.
    #[error("replayed envelope: {0}")]
    Replayed(ReplayKind),
}

/// How a signed envelope was found to be a replay.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, thiserror::Error)]
#[non_exhaustive]
pub enum ReplayKind {
    /// Its sender already used its sequence number.
    #[error("its sender already used this sequence number")]
    Number,
    /// Its time is outside the replay window (or it has none).
    #[error("its time is outside the replay window")]
    Stale,
}

impl DecodeError {
    /// A short stable name for the reason, used as a counter label and in logs.
    pub fn reason(&self) -> &'static str {
        match self {
            DecodeError::Unrecognized => "unrecognized",
            DecodeError::UnknownVersion(_) => "unknown_version",
            DecodeError::Malformed(_) => "malformed",
            DecodeError::Update(_) => "invalid_update",
            DecodeError::TooLarge(_) => "too_large",
            DecodeError::OverLimit { .. } => "over_limit",
            DecodeError::Unsigned => "unsigned",
            DecodeError::Forged => "forged",
            DecodeError::Replayed(_) => "replayed",
        }
    }
}

/// Which bound a payload broke.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Limit {
    /// Updates in one envelope.
    Updates,
    /// Flags on one update.
    Flags,
    /// Bytes in one flag.
    FlagLength,
    /// Bytes in one sequence set.
    SeqSetLength,
    /// Nesting depth of the JSON.
    Depth,
}

impl fmt::Display for Limit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Limit::Updates => "updates in one envelope",
            Limit::Flags => "flags on one update",
            Limit::FlagLength => "bytes in one flag",
            Limit::SeqSetLength => "bytes in one sequence set",
            Limit::Depth => "nesting depth",
        })
    }
}

/// A refinery error in our words: what it was doing, and the server's own message.
pub(crate) fn migrate_message(e: &refinery::Error) -> String {
    use refinery::error::Kind;
    match e.kind() {
        Kind::Connection(doing, cause) => {
            let cause = match cause.downcast_ref::<tokio_postgres::Error>() {
                Some(pg) => pg_message(pg),
                None => cause.to_string(),
            };
            format!("{doing}: {cause}")
        }
        Kind::MissingVersion(m) => format!(
            "the database holds migration {m}, which this build does not carry (was it \
             migrated by a newer updatepipe?)"
        ),
        Kind::DivergentVersion(applied, ours) => {
            format!("the database's migration {applied} differs from this build's {ours}")
        }
        other => other.to_string(),
    }
}

/// Shortens untrusted text for an error message: at most 64 characters, control characters
/// escaped by the `{:?}` formatting that the messages use.
pub(crate) fn excerpt(text: &str) -> String {
    const MAX: usize = 64;
    match text.char_indices().nth(MAX) {
        Some((cut, _)) => format!("{}…", &text[..cut]),
        None => text.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn excerpt_shortens_long_text() {
        assert_eq!(excerpt("abc"), "abc");
        let long = "é".repeat(100);
        let short = excerpt(&long);
        assert_eq!(short.chars().count(), 65);
        assert!(short.ends_with('…'));
    }
}
