//! Reaching the server: everything between a connection string and a working, subscribed
//! or pooled connection, and what its errors mean.
//!
//! - `server`: where the server is and how to reach it ([`Server`]): the settings as libpq
//!   layers them, handed to tokio-postgres per host, the password file, TLS, the connect
//!   timeout, the session settings.
//! - `conninfo`: a connection string (URL or `key=value`), a service, the `PG*` variables,
//!   completed as libpq completes them; `files`: the service and password files, and the
//!   bounded reading of any file the pipe is given (regular files only).
//! - `tls`: rustls as libpq's `sslmode` says.
//! - `connect`: connecting host by host within the connect timeout, for dedicated
//!   connections and the pool alike, the hosts that failed lately last (`hosts`);
//!   `session`: the settings set once connected.
//! - `cancel`: statements given up on are cancelled on the server.
//! - `errors`: the one place that tells what a tokio-postgres error means (and an sqlx
//!   one, feature `sqlx`).

mod cancel;
mod connect;
mod conninfo;
mod errors;
mod files;
mod hosts;
mod server;
mod session;
mod tls;

pub(crate) use cancel::{CancelOnDrop, Canceller, Lent};
pub(crate) use connect::{
    PoolConnector, RawConnection, close_politely, connect, connect_listener, connect_spawned,
    drive_until,
};
pub(crate) use errors::{
    is_auth_failure, is_cancelled, is_connection_lost, is_fatal, is_insufficient_privilege,
    is_lock_timeout, is_missing_log, is_notify_queue_full, is_proxy_refusal, is_unique_violation,
    is_unknown_database,
};
#[cfg(feature = "sqlx")]
pub(crate) use errors::{
    sqlx_database_error, sqlx_is_connection_lost, sqlx_is_unique_violation, sqlx_severity,
};
pub(crate) use files::read_regular;
pub use server::DEFAULT_CONNECT_TIMEOUT;
pub(crate) use server::Server;
pub(crate) use session::setting_ms;
pub use session::{
    DEFAULT_IDLE_IN_TRANSACTION_TIMEOUT, DEFAULT_LOCK_TIMEOUT, DEFAULT_STATEMENT_TIMEOUT,
    SessionLimits,
};
pub use tls::SslMode;
pub(crate) use tls::TlsStream;
