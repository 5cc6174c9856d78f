//! What an operator asks first: which server, primary or standby, does LISTEN work through
//! this connection, how full is the notification queue, how big is the durable log.

use std::collections::{HashSet, VecDeque};
use std::future::poll_fn;
use std::time::Duration;

use tokio_postgres::config::TargetSessionAttrs;
use tokio_postgres::types::Type;
use tokio_postgres::{AsyncMessage, Notification};

use crate::channel::quote_identifier;
use crate::config::Config;
use crate::envelope::Envelope;
use crate::error::Error;
use crate::migrate::schema_version;
use crate::pg::{CancelOnDrop, Canceller};
use crate::pg::{close_politely, connect, drive_until};

/// A snapshot of the server as the pipe sees it, from [`PgPipe::status`](crate::PgPipe::status).
#[derive(Clone, Debug, PartialEq)]
#[non_exhaustive]
pub struct Status {
    /// `server_version`.
    pub server_version: String,
    /// Whether the server is in recovery (a standby): LISTEN and NOTIFY work only on a
    /// primary.
    pub in_recovery: bool,
    /// Whether a notification sent from another connection reached a `LISTEN` on this one
    /// within two seconds. False through a transaction-pooling proxy (PgBouncer in
    /// transaction or statement mode), where LISTEN silently breaks; `None` on a standby,
    /// where NOTIFY cannot be sent.
    pub listen_works: Option<bool>,
    /// `pg_notification_queue_usage()`, from 0 to 1.
    pub queue_usage: f64,
    /// Whether the notification queue is full: the listen probe's NOTIFY was refused with
    /// "too many notifications in the NOTIFY queue" (SQLSTATE 54000). Every NOTIFY in the
    /// cluster fails at commit meanwhile, and `listen_works` is `None` (nothing can be
    /// sent to find out). `updatepipe status` exits 6.
    pub queue_full: bool,
    /// The server's `idle_session_timeout` for this connection's role and database, in
    /// milliseconds (0: off; `None`: before PostgreSQL 14). A listener sends a statement
    /// on its connection every third of it.
    pub idle_session_timeout_ms: Option<u64>,
    /// updatepipe listeners on the channel, counted by the heartbeats heard during one
    /// heartbeat period of this configuration (half its health interval), from
    /// [`PgPipe::status_with_listeners`](crate::PgPipe::status_with_listeners); `None` from
    /// [`PgPipe::status`](crate::PgPipe::status) and on a standby. Listeners with a longer
    /// health interval, or none, may be missed.
    pub listeners: Option<usize>,
    /// The newest migration applied (`None`: not migrated, or this role may not read the
    /// history table). Read from `updatepipe.schema_history`, or from where releases before
    /// it kept the history (`public.updatepipe_schema_history`) until `migrate` moves it.
    pub schema_version: Option<i64>,
    /// Entries in the durable log for this pipe's channel (`None`: not migrated, or this
    /// role may not read the log).
    pub log_entries: Option<i64>,
    /// Age in seconds of the oldest of them (`None`: none, or not migrated).
    pub oldest_log_entry_secs: Option<f64>,
    /// Seconds since a durable listener last pruned this channel's log (held its pruning
    /// lock; listeners prune every tenth of their retention, between 1 s and 60 s):
    /// `None` when never, or when this role may not read `updatepipe.pruned`. Far more than
    /// a minute while durable listeners run: pruning stands still (their logs say why).
    pub log_last_pruned_secs: Option<f64>,
    /// The named consumers of this pipe's channel, with their lag (`None`: not migrated
    /// to V6, or this role may not read `updatepipe.consumers` or the log).
    pub consumers: Option<Vec<crate::log::ConsumerStatus>>,
}

/// Gathers the status on two dedicated connections, within a deadline (the connects, the
/// listen probe and a few seconds for the statements); a statement given up on is
/// cancelled on the server. `count_listeners` waits a heartbeat period to count them.
pub(crate) async fn status(config: &Config, count_listeners: bool) -> Result<Status, Error> {
    // Each connect tries every host in turn; the first may be tried again (a standby).
    let hosts = config.pg().get_hosts().len().max(1) as u32;
    let after = config.connect_timeout() * 3 * hosts
        + (config.listen_options().health_interval() / 2 + Duration::from_millis(500))
            .max(Duration::from_secs(2))
        + Duration::from_secs(10);
    tokio::time::timeout(after, gather(config, count_listeners))
        .await
        .unwrap_or(Err(Error::Timeout {
            what: "gathering the status",
            after,
        }))
}

async fn gather(config: &Config, count_listeners: bool) -> Result<Status, Error> {
    let canceller = Canceller::new(config.server())?;
    // The server the pipe would use; when every host is a standby, the first of them, to
    // say so (rather than only that none accepts writes).
    let (client, connection) = match connect(config.server()).await {
        Err(Error::Connect(e)) if e.is_read_only() => {
            let any = config
                .clone()
                .with_target_session_attrs(TargetSessionAttrs::Any);
            connect(any.server()).await?
        }
        other => other?,
    };
    let task = tokio::spawn(connection);
    let mut cancel = CancelOnDrop::new(&canceller, &client);
    let row = client
        .query_typed_one(
            "SELECT pg_catalog.current_setting('server_version'), \
                    pg_catalog.pg_is_in_recovery(), \
                    pg_catalog.pg_notification_queue_usage()::pg_catalog.float8, \
                    EXISTS (SELECT 1 FROM pg_catalog.pg_class c \
                            JOIN pg_catalog.pg_namespace n \
                              ON n.oid OPERATOR(pg_catalog.=) c.relnamespace \
                            WHERE n.nspname OPERATOR(pg_catalog.=) 'updatepipe' \
                              AND c.relname OPERATOR(pg_catalog.=) 'log' \
                              AND pg_catalog.has_schema_privilege(n.oid, 'USAGE') \
                              AND pg_catalog.has_table_privilege(c.oid, 'SELECT')), \
                    pg_catalog.current_setting('idle_session_timeout', true), \
                    EXISTS (SELECT 1 FROM pg_catalog.pg_attribute a \
                            JOIN pg_catalog.pg_class c ON c.oid OPERATOR(pg_catalog.=) a.attrelid \
                            JOIN pg_catalog.pg_namespace n \
                              ON n.oid OPERATOR(pg_catalog.=) c.relnamespace \
                            WHERE n.nspname OPERATOR(pg_catalog.=) 'updatepipe' \
                              AND c.relname OPERATOR(pg_catalog.=) 'pruned' \
                              AND a.attname OPERATOR(pg_catalog.=) 'last_pruned_at' \
                              AND pg_catalog.has_schema_privilege(n.oid, 'USAGE') \
                              AND pg_catalog.has_table_privilege(c.oid, 'SELECT')), \
                    EXISTS (SELECT 1 FROM pg_catalog.pg_class c \
                            JOIN pg_catalog.pg_namespace n \
                              ON n.oid OPERATOR(pg_catalog.=) c.relnamespace \
                            WHERE n.nspname OPERATOR(pg_catalog.=) 'updatepipe' \
                              AND c.relname OPERATOR(pg_catalog.=) 'consumers' \
                              AND pg_catalog.has_schema_privilege(n.oid, 'USAGE') \
                              AND pg_catalog.has_table_privilege(c.oid, 'SELECT'))",
            &[],
        )
        .await?;
    let server_version: String = row.get(0);
    let in_recovery: bool = row.get(1);
    let queue_usage: f64 = row.get(2);
    // A log this role may not read (a pusher's) is shown as unknown, not as an error.
    let has_log: bool = row.get(3);
    let idle_session_timeout_ms = crate::pg::setting_ms(row.get(4));
    // Migrated to V5, and readable by this role.
    let has_prune_marks: bool = row.get(5);
    // Migrated to V6, the consumers readable by this role (and the log: their lag).
    let has_consumers: bool = row.get::<_, bool>(6) && has_log;
    let schema_version = match schema_version(&client).await {
        Ok(version) => version,
        Err(Error::SchemaNotGranted { .. }) => None,
        Err(e) => return Err(e),
    };
    let (log_entries, oldest_log_entry_secs) = if has_log {
        let row = client
            .query_typed_one(
                "SELECT pg_catalog.count(*), \
                        pg_catalog.date_part('epoch', pg_catalog.now() \
                            OPERATOR(pg_catalog.-) pg_catalog.min(l.created_at)) \
                 FROM updatepipe.log l WHERE l.channel OPERATOR(pg_catalog.=) $1",
                &[(&config.channel().as_str(), Type::TEXT)],
            )
            .await?;
        (Some(row.get(0)), row.get(1))
    } else {
        (None, None)
    };
    let log_last_pruned_secs = if has_prune_marks {
        client
            .query_typed_opt(
                "SELECT pg_catalog.date_part('epoch', \
                        pg_catalog.now() OPERATOR(pg_catalog.-) p.last_pruned_at) \
                 FROM updatepipe.pruned p WHERE p.channel OPERATOR(pg_catalog.=) $1",
                &[(&config.channel().as_str(), Type::TEXT)],
            )
            .await?
            .and_then(|row| row.get(0))
    } else {
        None
    };
    let consumers = if has_consumers {
        Some(crate::log::list_consumers(&client, config.channel().as_str()).await?)
    } else {
        None
    };
    let probe = if in_recovery {
        Probe::default()
    } else {
        listen_probe(config, &client, &canceller, count_listeners).await?
    };
    cancel.disarm();
    drop(client);
    let _ = task.await;
    Ok(Status {
        server_version,
        in_recovery,
        listen_works: probe.listen_works,
        queue_usage,
        queue_full: probe.queue_full,
        idle_session_timeout_ms,
        listeners: probe.listeners,
        schema_version,
        log_entries,
        oldest_log_entry_secs,
        log_last_pruned_secs,
        consumers,
    })
}

/// What the listen probe found.
#[derive(Debug, Default)]
struct Probe {
    /// `None`: not probed (a standby, or a full queue refused the probe's NOTIFY).
    listen_works: Option<bool>,
    listeners: Option<usize>,
    queue_full: bool,
}

/// LISTENs on a fresh random channel and on the pipe's channel on one connection, NOTIFYs
/// the first from `other`, and says whether that notification arrived within two seconds;
/// with `count`, also counts the distinct listeners whose heartbeats arrive on the pipe's
/// channel within one heartbeat period. A NOTIFY the server refuses because its queue is
/// full says so, and nothing else.
async fn listen_probe(
    config: &Config,
    other: &tokio_postgres::Client,
    canceller: &Canceller,
    count: bool,
) -> Result<Probe, Error> {
    let channel = format!("updatepipe_probe_{:016x}", rand::random::<u64>());
    let (client, mut connection) = connect(config.server()).await?;
    let mut cancel = CancelOnDrop::new(canceller, &client);
    let sql = format!(
        "LISTEN {}; LISTEN {}",
        quote_identifier(&channel),
        config.channel().quoted()
    );
    // Heartbeats heard while LISTEN is confirmed count too.
    let mut heard = VecDeque::new();
    drive_until(&mut connection, client.batch_execute(&sql), &mut heard).await??;
    let started = tokio::time::Instant::now();
    let sent = other
        .execute_typed(
            "SELECT pg_catalog.pg_notify($1, 'probe')",
            &[(&channel, Type::TEXT)],
        )
        .await;
    match sent {
        Ok(_) => {}
        Err(e) if crate::pg::is_notify_queue_full(&e) => {
            cancel.disarm();
            close_politely(client, connection).await;
            return Ok(Probe {
                queue_full: true,
                ..Probe::default()
            });
        }
        Err(e) => return Err(e.into()),
    }
    let period = config.listen_options().health_interval() / 2 + Duration::from_millis(500);
    let mut arrived = false;
    let mut origins = HashSet::new();
    let hear = |n: &Notification, arrived: &mut bool, origins: &mut HashSet<_>| {
        if n.channel() == channel {
            *arrived = true;
        } else if let Ok(envelope) = Envelope::decode(n.payload())
            && envelope.is_heartbeat()
        {
            origins.insert(envelope.origin().clone());
        }
    };
    for n in &heard {
        hear(n, &mut arrived, &mut origins);
    }
    let wait = if count {
        period.max(Duration::from_secs(2))
    } else {
        Duration::from_secs(2)
    };
    let _ = tokio::time::timeout(wait, async {
        loop {
            match poll_fn(|cx| connection.poll_message(cx)).await {
                Some(Ok(AsyncMessage::Notification(n))) => hear(&n, &mut arrived, &mut origins),
                Some(Ok(_)) => {}
                _ => return,
            }
            // No need to wait out the period when LISTEN does not work at all, nor when
            // the listeners are not counted.
            if (!arrived && started.elapsed() >= Duration::from_secs(2)) || (arrived && !count) {
                return;
            }
        }
    })
    .await;
    cancel.disarm();
    close_politely(client, connection).await;
    Ok(Probe {
        listen_works: Some(arrived),
        listeners: count.then_some(origins.len()),
        queue_full: false,
    })
}
