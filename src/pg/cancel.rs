//! Statements given up on: cancelled on the server, never just abandoned.
//!
//! A statement whose deadline passed, or whose future was dropped, may still be running on
//! the server (waiting on a lock, say): dropping the client does not stop a backend that
//! is not reading its socket. So the pipe sends a cancel request (tokio-postgres'
//! [`CancelToken`], over a connection of its own, with the pipe's TLS), and the connection
//! the statement ran on is closed, not pooled again, unless it answered.

use std::time::Duration;

use deadpool_postgres::Object;
use tokio_postgres::{CancelToken, Client};

use super::server::Server;
use super::tls::Connector;
use crate::error::Error;

const TARGET: &str = "updatepipe";

/// What cancels statements: the pipe's TLS connector, and how long a cancel request may
/// take to be delivered.
#[derive(Clone)]
pub(crate) struct Canceller {
    tls: Connector,
    timeout: Duration,
}

impl std::fmt::Debug for Canceller {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Canceller")
            .field("timeout", &self.timeout)
            .finish_non_exhaustive()
    }
}

impl Canceller {
    pub(crate) fn new(server: &Server) -> Result<Canceller, Error> {
        Ok(Canceller {
            tls: server.tls_connector()?,
            timeout: server.connect_timeout(),
        })
    }

    /// Asks the server to cancel what runs on the token's connection, within the connect
    /// timeout; whether the request was delivered (the server says nothing more).
    pub(crate) async fn cancel(&self, token: &CancelToken) -> bool {
        match tokio::time::timeout(self.timeout, token.cancel_query(self.tls.clone())).await {
            Ok(Ok(())) => true,
            Ok(Err(e)) => {
                tracing::debug!(target: TARGET, error = %e, "a cancel request failed");
                false
            }
            Err(_) => {
                tracing::debug!(target: TARGET, "a cancel request did not go through in time");
                false
            }
        }
    }

    /// As [`cancel`](Canceller::cancel), from a task of its own (for a drop guard): nothing
    /// when no runtime is running.
    pub(crate) fn cancel_detached(&self, token: CancelToken) {
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            let canceller = self.clone();
            runtime.spawn(async move {
                canceller.cancel(&token).await;
            });
        }
    }
}

/// Cancels the statement running on a connection when dropped armed: put in place before
/// a statement is sent, disarmed once it answered.
pub(crate) struct CancelOnDrop {
    canceller: Canceller,
    token: Option<CancelToken>,
}

impl std::fmt::Debug for CancelOnDrop {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CancelOnDrop")
            .field("armed", &self.token.is_some())
            .finish()
    }
}

impl CancelOnDrop {
    pub(crate) fn new(canceller: &Canceller, client: &Client) -> CancelOnDrop {
        CancelOnDrop {
            canceller: canceller.clone(),
            token: Some(client.cancel_token()),
        }
    }

    /// The statement answered: nothing to cancel.
    pub(crate) fn disarm(&mut self) {
        self.token = None;
    }
}

impl Drop for CancelOnDrop {
    fn drop(&mut self) {
        if let Some(token) = self.token.take() {
            self.canceller.cancel_detached(token);
        }
    }
}

/// A pooled connection lent for one statement: back to the pool only when that statement
/// answered ([`Lent::answered`]). Dropped otherwise (its deadline passed, its future was
/// dropped, it failed midway), what runs on it is cancelled and it is closed, never pooled
/// again: its state is unknown, and the next checkout must not land on it.
pub(crate) struct Lent {
    object: Option<Object>,
    cancel: CancelOnDrop,
}

impl std::fmt::Debug for Lent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Lent")
            .field("lent", &self.object.is_some())
            .finish()
    }
}

impl Lent {
    pub(crate) fn new(object: Object, canceller: &Canceller) -> Lent {
        let cancel = CancelOnDrop::new(canceller, &object);
        Lent {
            object: Some(object),
            cancel,
        }
    }

    pub(crate) fn client(&self) -> &Client {
        self.object.as_ref().expect("a lent connection")
    }

    /// Its statement answered (a result, or a server's error): back to the pool.
    pub(crate) fn answered(mut self) {
        self.cancel.disarm();
        drop(self.object.take());
    }

    /// Its statement ended with `e`: back to the pool after a server's error (the pool's
    /// recycle check sees a closed one), closed after any other.
    pub(crate) fn ended_with(self, e: &tokio_postgres::Error) {
        if e.as_db_error().is_some() {
            self.answered();
        }
    }

    /// Its statement's answer: the connection goes back or is closed as
    /// [`ended_with`](Lent::ended_with) says.
    pub(crate) fn finish<T>(self, answer: Result<T, tokio_postgres::Error>) -> Result<T, Error> {
        match answer {
            Ok(value) => {
                self.answered();
                Ok(value)
            }
            Err(e) => {
                self.ended_with(&e);
                Err(Error::from(e))
            }
        }
    }
}

impl Drop for Lent {
    fn drop(&mut self) {
        if let Some(object) = self.object.take() {
            // The cancel guard, dropped after this, sends the cancel request.
            drop(Object::take(object));
        }
    }
}
