//! Connecting: the first session (waiting for the server when asked), the backoff between
//! attempts to reconnect, and giving up after the configured number of attempts. (The loop
//! in `task` waits the backoff out, delivering what is buffered meanwhile.)

use std::sync::atomic::{AtomicBool, Ordering};

use super::event::TARGET;
pub(super) use super::session::{LogOpened, LogStart, Session, Start};
use super::settings::Settings;
use crate::config::Config;
use crate::error::Error;
use crate::log::{Cursor, LockHolder};

/// Opens the listener's sessions, and counts the attempts.
#[derive(Debug)]
pub(super) struct Connector {
    /// For connecting only: the listener's settings are read from it once, at the start.
    config: Config,
    settings: Settings,
    attempt: u32,
    /// A named consumer's: the last session that took the consumer's lock. A session
    /// opened after it was given up on ends it, should the server still have it.
    holder: Option<LockHolder>,
}

impl Connector {
    pub(super) fn new(config: Config, settings: Settings) -> Connector {
        Connector {
            config,
            settings,
            attempt: 0,
            holder: None,
        }
    }

    /// The first session, with where reading starts in durable mode; its errors are the
    /// caller's.
    pub(super) async fn open_first(&mut self) -> Result<(Session, Option<LogOpened>), Error> {
        let log = if self.settings.durable {
            LogStart::First(self.settings.since.as_ref())
        } else {
            LogStart::Nothing
        };
        let opened = Session::open(&self.config, &self.settings, log, &[], None).await?;
        Ok(self.opened(opened))
    }

    /// A session was opened: a consumer's lock is this one's now.
    fn opened(&mut self, opened: (Session, Option<LogOpened>)) -> (Session, Option<LogOpened>) {
        if let Some(holder) = opened.1.as_ref().and_then(|log| log.holder) {
            self.holder = Some(holder);
        }
        opened
    }

    /// The first session, as [`open_first`](Connector::open_first), retried with the
    /// backoff while the server cannot be reached (or is a standby, or starting up), for a
    /// node that starts before its database; other errors (bad configuration) are returned
    /// at once, and so is the last error after the configured number of attempts. Gives
    /// up when `closed` says the pipe was closed meanwhile.
    pub(super) async fn open_first_waiting(
        &mut self,
        closed: &AtomicBool,
    ) -> Result<(Session, Option<LogOpened>), Error> {
        let mut attempt = 0u32;
        loop {
            let e = match self.open_first().await {
                Ok(opened) => return Ok(opened),
                Err(e) if e.is_connection() || matches!(e, Error::Standby) => e,
                Err(e) => return Err(e),
            };
            attempt = attempt.saturating_add(1);
            if closed.load(Ordering::Acquire)
                || self
                    .settings
                    .backoff
                    .max_attempts
                    .is_some_and(|max| attempt >= max)
            {
                return Err(e);
            }
            tracing::warn!(
                target: TARGET,
                error = %e,
                attempt,
                "waiting for the server"
            );
            // At least a tenth of a second: a refused connection fails at once.
            let delay = self
                .settings
                .backoff
                .delay(attempt)
                .max(std::time::Duration::from_millis(100));
            tokio::time::sleep(delay).await;
            if closed.load(Ordering::Acquire) {
                return Err(Error::Closed);
            }
        }
    }

    /// A session that lasted `connected_for` was lost: after a stable one, attempts count
    /// from zero again.
    pub(super) fn lost(&mut self, connected_for: std::time::Duration) {
        if connected_for >= self.settings.backoff.stable_after {
            self.attempt = 0;
        }
    }

    /// How long to wait before the next attempt to reconnect.
    pub(super) fn delay(&self) -> std::time::Duration {
        self.settings.backoff.delay(self.attempt)
    }

    /// One attempt to open a session again, subscribed to the pipe's channel and to
    /// `mailboxes`' channels; in durable mode, with the server's history checked against
    /// `cursor`'s, and a named consumer's lock taken back from the session before.
    pub(super) async fn open(
        &mut self,
        mailboxes: &[String],
        cursor: Option<&Cursor>,
    ) -> Result<(Session, Option<LogOpened>), Error> {
        let log = cursor.map_or(LogStart::Nothing, LogStart::Again);
        let opened = Session::open(&self.config, &self.settings, log, mailboxes, self.holder);
        let opened = self.opened(opened.await?);
        tracing::info!(
            target: TARGET,
            attempts = self.attempt + 1,
            "listener reconnected"
        );
        Ok(opened)
    }

    /// An attempt to reconnect failed with `e`: logged (one warning per outage, each
    /// attempt at debug level); `Some(reason)` when the configured number of attempts is
    /// used up, or another session took the named consumer meanwhile, and the listener
    /// gives up.
    pub(super) fn failed(&mut self, e: &Error) -> Option<String> {
        self.attempt = self.attempt.saturating_add(1);
        let attempt = self.attempt;
        // Another session reads as this consumer now: two must not, so this one stops.
        if matches!(e, Error::ConsumerTaken { .. }) {
            return Some(format!("stopped: {e}"));
        }
        if attempt == 1 {
            tracing::warn!(
                target: TARGET,
                error = %e,
                "listener cannot reconnect yet; retrying with backoff (each attempt at \
                 debug level)"
            );
        } else {
            tracing::debug!(target: TARGET, error = %e, attempt, "listener cannot reconnect yet");
        }
        self.settings
            .backoff
            .max_attempts
            .is_some_and(|max| attempt >= max)
            .then(|| format!("gave up reconnecting after {attempt} attempts: {e}"))
    }
}
