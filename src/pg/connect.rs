//! Dedicated connections: made with the configured timeout, never taken from the pool.

use std::collections::VecDeque;
use std::future::poll_fn;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio_postgres::{AsyncMessage, Client, Connection, Notification, Socket};

use super::server::Server;
use super::tls::TlsStream;
use crate::error::{ConnectError, Error};

/// A connection whose socket the caller drives (the listener polls it for notifications).
pub(crate) type RawConnection = Connection<Socket, TlsStream>;

/// What the listener's connection adds to the configured `application_name`, so that
/// `pg_stat_activity` tells it from the pool's (`updatepipe` and `updatepipe/listen` by
/// default).
pub(crate) const LISTENER_SUFFIX: &str = "/listen";

/// Opens one dedicated connection with TLS as the configuration says (its certificate
/// files read now), trying each host in turn, each within the connect timeout (a host
/// that accepts TCP and never answers is given up for the next, as libpq does); hosts that
/// failed lately are tried last (`hosts`).
pub(crate) async fn connect(server: &Server) -> Result<(Client, RawConnection), Error> {
    connect_as(server, "").await
}

/// [`connect`], for the listener: its `application_name` ends in [`LISTENER_SUFFIX`].
pub(crate) async fn connect_listener(server: &Server) -> Result<(Client, RawConnection), Error> {
    connect_as(server, LISTENER_SUFFIX).await
}

async fn connect_as(server: &Server, suffix: &str) -> Result<(Client, RawConnection), Error> {
    let connector = server.tls_connector()?;
    let after = server.connect_timeout();
    let mut failed = ConnectError::new();
    let memory = server.hosts();
    let targets = memory.order(server.targets(suffix)?, |t| &t.server, Instant::now());
    for target in targets {
        match tokio::time::timeout(after, target.pg.connect(connector.clone())).await {
            Ok(Ok(pair)) => {
                memory.answered(&target.server);
                return Ok(pair);
            }
            Ok(Err(e)) => {
                memory.failed(&target.server, Instant::now());
                failed.failed(target.server, e);
            }
            Err(_) => {
                memory.failed(&target.server, Instant::now());
                failed.timed_out(target.server, after);
            }
        }
    }
    Err(Error::Connect(failed))
}

/// Opens one dedicated connection driven by a spawned task, for plain statements.
pub(crate) async fn connect_spawned(
    server: &Server,
) -> Result<(Client, tokio::task::JoinHandle<()>), Error> {
    let (client, connection) = connect(server).await?;
    let task = tokio::spawn(async move {
        if let Err(e) = connection.await {
            tracing::debug!(target: "updatepipe", error = %e, "connection ended");
        }
    });
    Ok((client, task))
}

/// Polls a connection the caller drives until `work` (a statement on its client) completes,
/// keeping whatever notifications arrive meanwhile in `backlog`.
pub(crate) async fn drive_until<F: Future>(
    connection: &mut RawConnection,
    work: F,
    backlog: &mut VecDeque<Notification>,
) -> Result<F::Output, Error> {
    let mut work = std::pin::pin!(work);
    loop {
        tokio::select! {
            output = &mut work => return Ok(output),
            message = poll_fn(|cx| connection.poll_message(cx)) => match message {
                Some(Ok(AsyncMessage::Notification(n))) => backlog.push_back(n),
                Some(Ok(_)) => {}
                Some(Err(e)) => return Err(e.into()),
                // The connection ended: `work` fails with the reason on its next poll.
                None => return Ok(work.await),
            },
        }
    }
}

/// Ends a driven connection politely: dropping the client sends Terminate, which the
/// connection writes before it ends (given a second at most).
pub(crate) async fn close_politely(client: Client, mut connection: RawConnection) {
    drop(client);
    let _ = tokio::time::timeout(Duration::from_secs(1), async {
        while let Some(Ok(_)) = poll_fn(|cx| connection.poll_message(cx)).await {}
    })
    .await;
}

/// How the pool connects: as [`connect`] does (each host in turn within the connect
/// timeout, the password file, TLS). deadpool wants a `tokio_postgres::Error` back, which
/// only tokio-postgres can make; so the pipe's own error (every host tried and what
/// happened there) is left in [`PoolConnector::failure`] for the pusher to report, and
/// deadpool gets a stand-in.
#[derive(Debug)]
pub(crate) struct PoolConnector {
    server: Server,
    failure: Arc<Mutex<Option<Error>>>,
}

impl PoolConnector {
    /// A connector for `server`, and where it leaves its last failure.
    pub(crate) fn new(server: &Server) -> (Self, Arc<Mutex<Option<Error>>>) {
        let failure = Arc::new(Mutex::new(None));
        let connector = PoolConnector {
            server: server.clone(),
            failure: failure.clone(),
        };
        (connector, failure)
    }
}

impl deadpool_postgres::Connect for PoolConnector {
    fn connect(
        &self,
        _: &tokio_postgres::Config,
    ) -> Pin<
        Box<
            dyn Future<
                    Output = Result<(Client, tokio::task::JoinHandle<()>), tokio_postgres::Error>,
                > + Send
                + '_,
        >,
    > {
        Box::pin(async move {
            match connect_spawned(&self.server).await {
                Ok(pair) => Ok(pair),
                Err(e) => {
                    *self.failure.lock().unwrap_or_else(|p| p.into_inner()) = Some(e);
                    Err(stand_in().await)
                }
            }
        })
    }
}

/// A `tokio_postgres::Error` made without any I/O (a configuration with no host), standing
/// in for the pipe's own error where deadpool needs one of tokio-postgres'.
async fn stand_in() -> tokio_postgres::Error {
    tokio_postgres::Config::new()
        .connect(tokio_postgres::NoTls)
        .await
        .err()
        .expect("a configuration with no host cannot connect")
}
