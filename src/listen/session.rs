//! One connection of the listener, subscribed: how it is opened (connect, refuse a standby,
//! take the log position before `LISTEN`, `LISTEN` on the quoted channel) and closed, and
//! which errors end it.

use std::collections::VecDeque;
use std::time::Duration;

use tokio_postgres::{Client, Notification};

use super::event::TARGET;
use super::settings::Settings;
use crate::channel::quote_identifier;
use crate::config::Config;
use crate::error::Error;
use crate::log::{self, Cursor};
use crate::pg::{CancelOnDrop, Canceller};
use crate::pg::{RawConnection, close_politely, connect_listener, drive_until, setting_ms};

/// One connection, subscribed.
pub(super) struct Session {
    pub(super) client: Client,
    pub(super) connection: RawConnection,
    /// Notifications that arrived while it was being opened.
    pub(super) backlog: VecDeque<Notification>,
    /// The server's `idle_session_timeout` for this session, when set: a statement must
    /// go out on it more often than that, or the server ends it.
    pub(super) idle_timeout: Option<Duration>,
}

impl Session {
    /// Connects, refuses a standby, takes the log position when asked (before `LISTEN`, so
    /// that nothing committed between the two is missed), and subscribes.
    pub(super) async fn open(
        config: &Config,
        settings: &Settings,
        want_cursor: bool,
        mailboxes: &[String],
    ) -> Result<(Session, Option<Cursor>), Error> {
        let (client, mut connection) = connect_listener(config.server()).await?;
        let mut backlog = VecDeque::new();
        let after = settings.connect_timeout;
        let channel = config.channel();
        // Given up on (the deadline passed, or the caller went away), what runs is
        // cancelled: reading the log position can wait on a lock.
        let mut cancel = CancelOnDrop::new(&Canceller::new(config.server())?, &client);
        let limits = config.session_limits().sql();
        let setup = async {
            if let Some(sql) = &limits {
                client.batch_execute(sql).await?;
            }
            let recovery = client
                .query_typed_one(
                    "SELECT pg_catalog.pg_is_in_recovery(), \
                     pg_catalog.current_setting('idle_session_timeout', true)",
                    &[],
                )
                .await?;
            if recovery.get::<_, bool>(0) {
                return Err(Error::Standby);
            }
            let idle_timeout = setting_ms(recovery.get(1))
                .filter(|ms| *ms > 0)
                .map(Duration::from_millis);
            let cursor = if want_cursor {
                let cursor = log::read_cursor(&client, channel.as_str(), settings.since).await;
                match cursor {
                    Ok(cursor) => Some(cursor),
                    // A role granted as a pusher only, say.
                    Err(e) if crate::pg::is_insufficient_privilege(&e) => {
                        return Err(Error::NotGranted {
                            role: config.pg().get_user().unwrap_or_default().to_owned(),
                            doing: "read the durable log",
                            grant: "listener",
                        });
                    }
                    Err(e) => return Err(e.into()),
                }
            } else {
                None
            };
            // The pipe's channel, and the subscribed mailboxes' channels (maddy layout).
            let mut listen = format!("LISTEN {}", channel.quoted());
            for mailbox in mailboxes {
                listen.push_str("; LISTEN ");
                listen.push_str(&quote_identifier(mailbox));
            }
            client.batch_execute(&listen).await?;
            Ok((cursor, idle_timeout))
        };
        let (cursor, idle_timeout) =
            tokio::time::timeout(after, drive_until(&mut connection, setup, &mut backlog))
                .await
                .map_err(|_| Error::Timeout {
                    what: "subscribing with LISTEN",
                    after,
                })???;
        cancel.disarm();
        tracing::debug!(target: TARGET, %channel, "listening");
        Ok((
            Session {
                client,
                connection,
                backlog,
                idle_timeout,
            },
            cursor,
        ))
    }

    /// Ends the session politely.
    pub(super) async fn close(self) {
        close_politely(self.client, self.connection).await;
    }
}
