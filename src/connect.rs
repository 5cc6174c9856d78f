//! Dedicated connections: made with the configured timeout, never taken from the pool.

use tokio_postgres::tls::NoTlsStream;
use tokio_postgres::{Client, Connection, NoTls, Socket};

use crate::config::Config;
use crate::error::Error;

/// A connection whose socket the caller drives (the listener polls it for notifications).
pub(crate) type RawConnection = Connection<Socket, NoTlsStream>;

/// Opens one dedicated connection, within the configured connect timeout.
pub(crate) async fn connect(config: &Config) -> Result<(Client, RawConnection), Error> {
    let after = config.connect_timeout();
    match tokio::time::timeout(after, config.pg().connect(NoTls)).await {
        Ok(Ok(pair)) => Ok(pair),
        Ok(Err(e)) => Err(Error::Connect(e)),
        Err(_) => Err(Error::Timeout {
            what: "connecting to PostgreSQL",
            after,
        }),
    }
}

/// Opens one dedicated connection driven by a spawned task, for plain statements.
pub(crate) async fn connect_spawned(
    config: &Config,
) -> Result<(Client, tokio::task::JoinHandle<()>), Error> {
    let (client, connection) = connect(config).await?;
    let task = tokio::spawn(async move {
        if let Err(e) = connection.await {
            tracing::debug!(target: "updatepipe", error = %e, "connection ended");
        }
    });
    Ok((client, task))
}
