//! The push path's link to PostgreSQL: the pool, and the one pooled connection that
//! flights share, with the statements prepared on it.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use deadpool_postgres::{Object, Pool, PoolError};

use super::TARGET;
use super::wire::{Shape, Statements};
use crate::error::Error;
use crate::pg::is_proxy_refusal;

/// The pool, and the connection flights go out on.
#[derive(Debug)]
pub(super) struct Link {
    pool: Pool,
    /// Why the pool's last connection attempt failed, in the pipe's words (deadpool can
    /// only carry a `tokio_postgres::Error`).
    connect_failure: Arc<Mutex<Option<Error>>>,
    /// How long a checkout may wait (for its error message).
    timeout: Duration,
    /// Send unnamed statements (set for good once prepared ones fail: a
    /// transaction-pooling proxy).
    unnamed: AtomicBool,
    /// The connection flights go out on, shared by those in flight. Kept from one flight to
    /// the next (a pool round trip per flight is a measurable part of a lone push); when
    /// no flight is left, given back to the pool unless `keep_between_flights`.
    current: Mutex<Option<Arc<FlightConnection>>>,
    /// Whether the pool has 3 or more connections: with fewer, the connection goes back
    /// when no flight is left, so that the listener's heartbeats need not queue behind
    /// `queue_usage` or `status` for the one other connection.
    keep_between_flights: bool,
    /// One checkout at a time: flights that find no connection share the next one.
    connecting: tokio::sync::Mutex<()>,
}

/// The pooled connection flights go out on, shared by those in flight.
#[derive(Debug)]
pub(super) struct FlightConnection {
    client: Option<Object>,
    /// Its state is unknown (a send on it failed midway or ran past its deadline): it is
    /// closed, not pooled again, when the last flight on it lets it go. (A send its caller
    /// gave up leaves it in use: tokio-postgres discards the answer nobody waits for.)
    broken: AtomicBool,
    /// The statements flights run, prepared on this connection before the first is sent
    /// (so that sending one never waits).
    statements: tokio::sync::OnceCell<Statements>,
}

impl Link {
    pub(super) fn new(
        pool: Pool,
        connect_failure: Arc<Mutex<Option<Error>>>,
        timeout: Duration,
        keep_between_flights: bool,
    ) -> Self {
        Link {
            pool,
            connect_failure,
            timeout,
            unnamed: AtomicBool::new(false),
            current: Mutex::new(None),
            keep_between_flights,
            connecting: tokio::sync::Mutex::new(()),
        }
    }

    pub(super) fn pool(&self) -> &Pool {
        &self.pool
    }

    /// Whether statements go unnamed (through a transaction-pooling proxy).
    pub(super) fn unnamed(&self) -> bool {
        self.unnamed.load(Ordering::Relaxed)
    }

    /// Prepared statements do not survive between transactions here: a
    /// transaction-pooling proxy. Unnamed statements from now on, one flight at a time.
    pub(super) fn use_unnamed(&self) {
        if !self.unnamed.swap(true, Ordering::Relaxed) {
            tracing::warn!(
                target: TARGET,
                "prepared statements do not last on this connection (a transaction-pooling \
                 proxy?): using unnamed statements"
            );
        }
    }

    /// The statements to send on `connection`: prepared ones, or `None` for unnamed ones
    /// (through a transaction-pooling proxy, found out here if not before). A connection
    /// that fails to prepare them is let go.
    pub(super) async fn statements<'c>(
        &self,
        connection: &'c Arc<FlightConnection>,
        shape: Shape,
    ) -> Result<Option<&'c Statements>, Error> {
        if self.unnamed() {
            return Ok(None);
        }
        match connection.statements(shape).await {
            Ok(statements) => Ok(Some(statements)),
            Err(e) if is_proxy_refusal(&e) => {
                self.use_unnamed();
                Ok(None)
            }
            Err(e) => Err(self.failed(connection, e)),
        }
    }

    /// A send failed: its connection is let go. After a statement error it may be fine (or
    /// on its way out: a terminated backend reports an error too), so the pool checks it;
    /// otherwise its state is unknown and it is closed.
    pub(super) fn failed(
        &self,
        connection: &Arc<FlightConnection>,
        e: tokio_postgres::Error,
    ) -> Error {
        if e.as_db_error().is_some() {
            self.let_go(connection);
        } else {
            self.discard(connection);
        }
        Error::from(e)
    }

    /// Lets a connection go whose state is unknown (a send on it failed midway or ran past
    /// the deadline): closed, not pooled again, once the flights on it are over.
    pub(super) fn discard(&self, connection: &Arc<FlightConnection>) {
        connection.broken.store(true, Ordering::Relaxed);
        self.let_go(connection);
    }

    /// Whether `connection` is still the one flights go out on.
    pub(super) fn is_current(&self, connection: &Arc<FlightConnection>) -> bool {
        let current = self.current.lock().expect("flight connection lock");
        current
            .as_ref()
            .is_some_and(|kept| Arc::ptr_eq(kept, connection))
            && !connection.broken.load(Ordering::Relaxed)
    }

    /// Takes a connection out of the flights' slot (later flights take another); it goes
    /// back to the pool, or is closed if broken, once the flights on it are over.
    fn let_go(&self, connection: &Arc<FlightConnection>) {
        let mut current = self.current.lock().expect("flight connection lock");
        let released = current.take_if(|kept| Arc::ptr_eq(kept, connection));
        drop(current);
        drop(released);
    }

    /// With no flight left: the connection to give back (to drop once the queue is
    /// unlocked), unless it is kept between flights.
    pub(super) fn release_when_idle(&self) -> Option<Arc<FlightConnection>> {
        if self.keep_between_flights {
            return None;
        }
        self.take_current()
    }

    /// Takes the connection out of the slot, for good when closing.
    pub(super) fn take_current(&self) -> Option<Arc<FlightConnection>> {
        self.current.lock().expect("flight connection lock").take()
    }

    /// The connection flights go out on: the one in the slot while it is open, otherwise a
    /// pooled one, checked out by one flight at a time (concurrent flights share it).
    pub(super) async fn connection(&self) -> Result<Arc<FlightConnection>, Error> {
        if let Some(connection) = self.usable() {
            return Ok(connection);
        }
        let _turn = self.connecting.lock().await;
        if let Some(connection) = self.usable() {
            return Ok(connection);
        }
        // One closed since it was kept (a server restart) goes first, so that the pool,
        // which discards it, has room for its replacement.
        drop(self.take_current());
        let connection = Arc::new(FlightConnection {
            client: Some(self.checkout().await?),
            broken: AtomicBool::new(false),
            statements: tokio::sync::OnceCell::new(),
        });
        *self.current.lock().expect("flight connection lock") = Some(connection.clone());
        Ok(connection)
    }

    /// The connection in the slot, if it is open.
    fn usable(&self) -> Option<Arc<FlightConnection>> {
        let current = self.current.lock().expect("flight connection lock");
        current
            .as_ref()
            .filter(|c| !c.client().is_closed() && !c.broken.load(Ordering::Relaxed))
            .cloned()
    }

    /// A pooled connection, with the pool's errors told as what they mean to the caller.
    pub(super) async fn checkout(&self) -> Result<Object, Error> {
        self.pool.get().await.map_err(|e| match e {
            PoolError::Backend(e) => self
                .connect_failure
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .take()
                .unwrap_or_else(|| Error::from(e)),
            PoolError::Timeout(_) => Error::Timeout {
                what: "waiting for a pooled connection",
                after: self.timeout,
            },
            PoolError::Closed => Error::Closed,
            other => Error::from(other),
        })
    }
}

impl FlightConnection {
    pub(super) fn client(&self) -> &tokio_postgres::Client {
        self.client.as_ref().expect("a flight connection's client")
    }

    /// The statements for this pipe's flights, prepared on this connection the first time.
    async fn statements(&self, shape: Shape) -> Result<&Statements, tokio_postgres::Error> {
        let client = self.client.as_ref().expect("a flight connection's client");
        self.statements
            .get_or_try_init(|| Statements::prepare(client, shape))
            .await
    }
}

impl Drop for FlightConnection {
    fn drop(&mut self) {
        if let Some(client) = self.client.take()
            && self.broken.load(Ordering::Relaxed)
        {
            drop(Object::take(client));
        }
    }
}
