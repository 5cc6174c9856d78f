//! Reconnecting: the backoff between attempts, delivering what is buffered meanwhile, and
//! giving up after the configured number of attempts.

use std::sync::atomic::{AtomicBool, Ordering};

use tokio::sync::oneshot;
use tokio::time::Instant;

use super::outbox::Outbox;
use super::session::Session;
use super::settings::Settings;
use super::{Event, TARGET};
use crate::config::Config;
use crate::error::Error;
use crate::log::Cursor;
use crate::stats::Counters;

/// Opens the listener's sessions, and counts the attempts.
#[derive(Debug)]
pub(super) struct Connector {
    /// For connecting only: the listener's settings are read from it once, at the start.
    config: Config,
    settings: Settings,
    attempt: u32,
}

impl Connector {
    pub(super) fn new(config: Config, settings: Settings) -> Connector {
        Connector {
            config,
            settings,
            attempt: 0,
        }
    }

    /// The first session, with the log position in durable mode; its errors are the
    /// caller's.
    pub(super) async fn open_first(&self) -> Result<(Session, Option<Cursor>), Error> {
        Session::open(&self.config, &self.settings, self.settings.durable, &[]).await
    }

    /// The first session, as [`open_first`](Connector::open_first), retried with the
    /// backoff while the server cannot be reached (or is a standby, or starting up), for a
    /// node that starts before its database; other errors (bad configuration) are returned
    /// at once, and so is the last error after the configured number of attempts. Gives
    /// up when `closed` says the pipe was closed meanwhile.
    pub(super) async fn open_first_waiting(
        &self,
        closed: &AtomicBool,
    ) -> Result<(Session, Option<Cursor>), Error> {
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

    /// Retries with backoff until a session is open (subscribed to the pipe's channel and to
    /// `mailboxes`' channels), delivering what is buffered meanwhile;
    /// `None` when stopped, when the caller went away, or after the configured number of
    /// attempts (then the caller is told, and what is left is delivered first).
    pub(super) async fn reconnect(
        &mut self,
        outbox: &mut Outbox,
        counters: &Counters,
        stopped: &mut oneshot::Receiver<()>,
        mailboxes: &[String],
    ) -> Option<Session> {
        let mut receiver_gone = outbox.closed();
        loop {
            let delay = self.settings.backoff.delay(self.attempt);
            let wake = Instant::now() + delay;
            // Wait, delivering what is buffered meanwhile.
            loop {
                tokio::select! {
                    biased;
                    _ = &mut *stopped => return None,
                    () = tokio::time::sleep_until(wake) => break,
                    sent = outbox.deliver(), if outbox.has_ready() => match sent {
                        Some(n) => outbox.delivered(n),
                        None => return None,
                    },
                    () = &mut receiver_gone, if !outbox.has_ready() => return None,
                }
            }
            let opened = tokio::select! {
                biased;
                _ = &mut *stopped => return None,
                opened = Session::open(&self.config, &self.settings, false, mailboxes) => opened,
            };
            let e = match opened {
                Ok((session, _)) => {
                    counters.reconnect();
                    tracing::info!(
                        target: TARGET,
                        attempts = self.attempt + 1,
                        "listener reconnected"
                    );
                    return Some(session);
                }
                Err(e) => e,
            };
            self.attempt = self.attempt.saturating_add(1);
            let attempt = self.attempt;
            // One warning per outage, not one per attempt.
            if attempt == 1 {
                tracing::warn!(
                    target: TARGET,
                    error = %e,
                    "listener cannot reconnect yet; retrying with backoff (each attempt at \
                     debug level)"
                );
            } else {
                tracing::debug!(
                    target: TARGET,
                    error = %e,
                    attempt,
                    "listener cannot reconnect yet"
                );
            }
            if self
                .settings
                .backoff
                .max_attempts
                .is_some_and(|max| attempt >= max)
            {
                let reason = format!("gave up reconnecting after {attempt} attempts: {e}");
                tracing::error!(target: TARGET, %reason);
                outbox.emit(Event::Disconnected { reason });
                // Deliver what is left, then end (unless stopped first).
                while outbox.has_ready() {
                    tokio::select! {
                        biased;
                        _ = &mut *stopped => return None,
                        sent = outbox.deliver() => match sent {
                            Some(n) => outbox.delivered(n),
                            None => break,
                        },
                    }
                }
                return None;
            }
        }
    }
}
