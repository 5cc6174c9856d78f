//! One connection of the listener, subscribed: how it is opened (connect, refuse a standby,
//! take the log position before `LISTEN`, `LISTEN` on the quoted channel) and closed, and
//! which errors end it.

use std::collections::VecDeque;
use std::time::Duration;

use tokio_postgres::{Client, Notification};

use super::event::TARGET;
use super::recover::{self, Recovery};
use super::settings::Settings;
use crate::channel::quote_identifier;
use crate::config::Config;
use crate::config::Since;
use crate::error::Error;
use crate::log::{self, Cursor, HistoryChange, LockHolder, Place, Position};
use crate::pg::{CancelOnDrop, Canceller};
use crate::pg::{RawConnection, close_politely, connect_listener, drive_until, setting_ms};

/// What a session does with the durable log before it subscribes.
#[derive(Clone, Copy, Debug)]
pub(super) enum LogStart<'a> {
    /// Best effort: nothing.
    Nothing,
    /// A durable listener's first session: where its first read starts.
    First(Option<&'a Since>),
    /// A durable listener's new session: the server must still hold the history of this
    /// cursor.
    Again(&'a Cursor),
}

/// Where a durable listener reads, as a session found it.
#[derive(Debug)]
pub(super) struct LogOpened {
    /// The session's server.
    pub(super) place: Place,
    pub(super) start: Start,
    /// A named consumer: the epoch this session claimed, which its acknowledgements carry.
    pub(super) epoch: Option<i64>,
    /// A named consumer's: this session, which holds the consumer's lock.
    pub(super) holder: Option<LockHolder>,
    /// The server is a standby (a polling listener's): read-only, so the log is not
    /// pruned from this session.
    pub(super) standby: bool,
}

/// Where a durable listener's reading starts or goes on.
#[derive(Debug)]
pub(super) enum Start {
    /// From this cursor (now, or a starting point in the past).
    At(Cursor),
    /// From a position, whose history the server holds.
    Resume(Position),
    /// As before: the server holds the reader's history.
    Continue,
    /// The server does not hold the reader's history (or the position's): from the
    /// present, this cursor, with the change told.
    Moved(HistoryChange, Cursor),
}

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
        log_start: LogStart<'_>,
        mailboxes: &[String],
        former: Option<LockHolder>,
    ) -> Result<(Session, Option<LogOpened>), Error> {
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
            // A standby's log rows replicate, its notifications do not: only a poller
            // reads one (and never prunes there).
            let standby = recovery.get::<_, bool>(0);
            if standby && settings.polling.is_none() {
                return Err(Error::Standby);
            }
            let idle_timeout = setting_ms(recovery.get(1))
                .filter(|ms| *ms > 0)
                .map(Duration::from_millis);
            let consumer = settings.consumer.as_deref();
            let started = start_log(
                &client,
                channel.as_str(),
                log_start,
                consumer,
                former,
                standby,
            );
            let cursor = match started.await {
                Ok(opened) => opened,
                // A role granted as a pusher only, say.
                Err(Error::Postgres(e)) if crate::pg::is_insufficient_privilege(&e) => {
                    return Err(Error::NotGranted {
                        role: config.pg().get_user().unwrap_or_default().to_owned(),
                        doing: "read the durable log",
                        grant: "listener",
                    });
                }
                Err(e) => return Err(e),
            };
            // The pipe's channel, and the subscribed mailboxes' channels (maddy layout);
            // nothing when polling the log.
            if settings.polling.is_none() {
                let mut listen = format!("LISTEN {}", channel.quoted());
                for mailbox in mailboxes {
                    listen.push_str("; LISTEN ");
                    listen.push_str(&quote_identifier(mailbox));
                }
                listen_recovering(&client, &listen).await?;
            }
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
        if settings.polling.is_some() {
            tracing::debug!(target: TARGET, %channel, "polling the log");
        } else {
            tracing::debug!(target: TARGET, %channel, "listening");
        }
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

/// Runs the `LISTEN` statements, recovering from the PostgreSQL bug's "could not access
/// status of transaction" (see `recover`): the queue's usage read, a pause, and `LISTEN`
/// again, a few times; any other error, or that one past the retries, is returned.
async fn listen_recovering(client: &Client, listen: &str) -> Result<(), Error> {
    let mut retried = 0;
    loop {
        let e = match client.batch_execute(listen).await {
            Ok(()) => return Ok(()),
            Err(e) => e,
        };
        let (code, message) = match e.as_db_error() {
            Some(db) => (Some(db.code().code()), db.message()),
            None => (None, ""),
        };
        match recover::after_listen_error(code, message, retried) {
            Recovery::Fail => return Err(e.into()),
            Recovery::ClearAndRetry { pause } => {
                recover::warn_once();
                client.batch_execute(recover::CLEAR_SQL).await?;
                tokio::time::sleep(pause).await;
                retried += 1;
            }
        }
    }
}

/// Reads where the durable log is read from, before `LISTEN` (so that nothing committed
/// between the two is missed): the server's history, checked against the reader's when it
/// has one, and a cursor when reading starts (or starts over). A named consumer's lock is
/// taken first (by this session, so held as long as it lasts); a first session starts at
/// the consumer's stored position unless told where, and the consumer is put where reading
/// starts when that is not its stored position.
async fn start_log(
    client: &Client,
    channel: &str,
    log_start: LogStart<'_>,
    consumer: Option<&str>,
    former: Option<LockHolder>,
    standby: bool,
) -> Result<Option<LogOpened>, Error> {
    let since = match log_start {
        LogStart::Nothing => return Ok(None),
        LogStart::First(since) => since,
        LogStart::Again(_) => None,
    };
    let mut holder = None;
    let mut stored = None;
    // A stored position that does not read (written by hand, or by a role that may
    // acknowledge): the consumer starts over from the present, with a resync.
    let mut unreadable = false;
    if let Some(name) = consumer {
        holder = Some(log::lock_consumer(client, channel, name, former).await?);
        if matches!(log_start, LogStart::First(None)) {
            stored = match log::stored_consumer(client, channel, name).await {
                Ok(position) => position.map(Since::After),
                Err(Error::InvalidPosition(why)) => {
                    tracing::warn!(
                        target: TARGET,
                        consumer = name,
                        why,
                        "the consumer's stored position does not read: resync, and reading \
                         from the present"
                    );
                    unreadable = true;
                    None
                }
                Err(e) => return Err(e),
            };
        }
    }
    let since = since.or(stored.as_ref());
    let server = log::server_now(client, channel).await?;
    if let Some(Since::After(position)) = since
        && position.newest().place.channel != log::channel_hash(channel)
    {
        return Err(Error::InvalidPosition(
            "the position is another channel's: it says nothing of this channel's log",
        ));
    }
    let place = server.place;
    let held = match (log_start, since) {
        (LogStart::Again(cursor), _) => Some((log::check(cursor, &server), None)),
        (_, Some(Since::After(position))) => Some((
            log::check(position.newest(), &server),
            Some(position.clone()),
        )),
        _ => None,
    };
    let start = match held {
        Some((Ok(()), Some(position))) => Start::Resume(position),
        Some((Ok(()), None)) => Start::Continue,
        Some((Err(change), _)) => {
            tracing::warn!(
                target: TARGET,
                %change,
                "the server no longer holds the durable log's history this listener read: \
                 resync, and reading from the present"
            );
            Start::Moved(
                change,
                log::read_cursor(client, channel, None, place).await?,
            )
        }
        None if unreadable => Start::Moved(
            HistoryChange::Unverified,
            log::read_cursor(client, channel, None, place).await?,
        ),
        None => Start::At(log::read_cursor(client, channel, since, place).await?),
    };
    if let Some(name) = consumer {
        // Where reading starts, unless that is the consumer's stored position.
        let chosen = match &start {
            Start::At(cursor) | Start::Moved(_, cursor) => Some(Position::at(cursor.clone(), 0)),
            // From a position the application gave, not the stored one.
            Start::Resume(position) if stored.is_none() => Some(position.clone()),
            Start::Resume(_) | Start::Continue => None,
        };
        if let Some(position) = chosen {
            log::store_consumer(client, channel, name, &position, log::Store::Reset).await?;
        }
    }
    let epoch = match consumer {
        Some(name) => Some(log::claim_consumer(client, channel, name).await?),
        None => None,
    };
    Ok(Some(LogOpened {
        place,
        start,
        epoch,
        holder,
        standby,
    }))
}
