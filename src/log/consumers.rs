//! Named consumers (migration V6): each keeps its [`Position`] in `updatepipe.consumers`,
//! advanced by acknowledgements through the owner's functions, and one session at a time
//! reads as it (a session-level advisory lock, taken by the listener's connection, named
//! in the error when another session holds it).

use tokio_postgres::Client;
use tokio_postgres::types::Type;

use super::Position;
use crate::error::Error;

/// The longest consumer name (as a channel name, so that it fits PostgreSQL's identifiers
/// wherever an operator may want to use it).
pub const MAX_CONSUMER_NAME_LEN: usize = 63;

/// Checks a consumer's name: 1 to 63 bytes, no control characters.
pub(crate) fn check_name(name: &str) -> Result<(), Error> {
    if name.is_empty() || name.len() > MAX_CONSUMER_NAME_LEN {
        return Err(Error::Config(
            "a consumer's name is 1 to 63 bytes long".into(),
        ));
    }
    if name.chars().any(|c| c.is_control()) {
        return Err(Error::Config(
            "a consumer's name holds no control characters".into(),
        ));
    }
    Ok(())
}

/// The advisory lock key of a consumer: FNV-1a over a prefix of our own, the channel and
/// the name (stable across builds and platforms, unlike `std`'s hasher).
pub(crate) fn lock_key(channel: &str, name: &str) -> i64 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in b"updatepipe consumer\0"
        .iter()
        .chain(channel.as_bytes())
        .chain(b"\0")
        .chain(name.as_bytes())
    {
        hash ^= u64::from(*byte);
        hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
    }
    hash as i64
}

/// Takes the consumer's lock for this session, or says who holds it.
const LOCK_SQL: &str = "SELECT pg_catalog.pg_try_advisory_lock($1::pg_catalog.int8)";

/// The sessions holding the advisory lock of key `$1` (a bigint key is `classid`, the high
/// half, and `objid`, the low half, with `objsubid` 1).
const HOLDERS_SQL: &str = "\
    SELECT l.pid, coalesce(a.usename::pg_catalog.text, ''), \
           coalesce(a.application_name, ''), \
           coalesce(pg_catalog.host(a.client_addr), 'a local socket, or hidden from this role') \
    FROM pg_catalog.pg_locks l \
    LEFT JOIN pg_catalog.pg_stat_activity a ON a.pid OPERATOR(pg_catalog.=) l.pid \
    WHERE l.locktype OPERATOR(pg_catalog.=) 'advisory' AND l.granted \
      AND l.objsubid OPERATOR(pg_catalog.=) 1 \
      AND l.classid::pg_catalog.int8 OPERATOR(pg_catalog.=) $1 \
      AND l.objid::pg_catalog.int8 OPERATOR(pg_catalog.=) $2 \
      AND l.database OPERATOR(pg_catalog.=) \
          (SELECT d.oid FROM pg_catalog.pg_database d \
           WHERE d.datname OPERATOR(pg_catalog.=) pg_catalog.current_database())";

/// A session that holds a consumer's lock, as the server knows it: its backend's process
/// id and start time (a process id alone may have been handed to another backend since).
#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) struct LockHolder {
    pid: i32,
    started: f64,
}

/// This session's backend.
const HOLDER_SQL: &str = "\
    SELECT a.pid, pg_catalog.date_part('epoch', a.backend_start) \
    FROM pg_catalog.pg_stat_activity a \
    WHERE a.pid OPERATOR(pg_catalog.=) pg_catalog.pg_backend_pid()";

/// Ends the backend `$1` started at `$2`, if it is still there; whether it was told to.
const END_SQL: &str = "\
    SELECT coalesce(pg_catalog.bool_or(pg_catalog.pg_terminate_backend(a.pid)), false) \
    FROM pg_catalog.pg_stat_activity a \
    WHERE a.pid OPERATOR(pg_catalog.=) $1 \
      AND pg_catalog.date_part('epoch', a.backend_start) OPERATOR(pg_catalog.=) $2";

/// How often, and how long at most, a session that ended its listener's former one asks
/// again for the lock that one held: an ended backend lets its locks go within
/// milliseconds (the session's own deadline bounds the wait too).
const RECLAIM_POLL: std::time::Duration = std::time::Duration::from_millis(20);
const RECLAIM_WAIT: std::time::Duration = std::time::Duration::from_secs(2);

/// Takes the lock of consumer `name` of `channel` for this session (held until the
/// session ends), and says which session this is; [`Error::ConsumerTaken`] naming the
/// holders when another session has it.
///
/// `former` is this listener's session before this one, given up on (its connection
/// dead on the listener's side). Its backend may live on, holding the lock, when the
/// connection died on the way (a NAT that forgot the flow, a pulled cable) and no close
/// reached the server: then it is ended, as a statement given up on is cancelled, and the
/// lock taken once it has let go. Only that very backend (the same process id and start
/// time): another session's holds.
pub(crate) async fn lock(
    client: &Client,
    channel: &str,
    name: &str,
    former: Option<LockHolder>,
) -> Result<LockHolder, Error> {
    let key = lock_key(channel, name);
    let try_lock = || async {
        let locked: bool = client
            .query_typed_one(LOCK_SQL, &[(&key, Type::INT8)])
            .await?
            .get(0);
        Ok::<bool, Error>(locked)
    };
    let mut locked = try_lock().await?;
    if !locked && let Some(former) = former {
        let ended: bool = client
            .query_typed_one(
                END_SQL,
                &[(&former.pid, Type::INT4), (&former.started, Type::FLOAT8)],
            )
            .await?
            .get(0);
        if ended {
            tracing::info!(
                target: "updatepipe::listen",
                consumer = name,
                pid = former.pid,
                "ended this listener's former session, which still held the consumer \
                 (its connection was lost on the way, not closed)"
            );
            let until = tokio::time::Instant::now() + RECLAIM_WAIT;
            while !locked && tokio::time::Instant::now() < until {
                tokio::time::sleep(RECLAIM_POLL).await;
                locked = try_lock().await?;
            }
        }
    }
    if locked {
        let row = client.query_typed_one(HOLDER_SQL, &[]).await?;
        return Ok(LockHolder {
            pid: row.get(0),
            started: row.get(1),
        });
    }
    Err(Error::ConsumerTaken {
        name: name.to_owned(),
        holders: holders(client, key)
            .await?
            .into_iter()
            .map(|(_, said)| said)
            .collect::<Vec<_>>()
            .join(", "),
    })
}

/// The sessions holding the advisory lock `key`: each one's pid, and how to name it.
async fn holders(client: &Client, key: i64) -> Result<Vec<(Option<i32>, String)>, Error> {
    let (high, low) = ((key as u64 >> 32) as i64, (key as u64 & 0xffff_ffff) as i64);
    Ok(client
        .query_typed(HOLDERS_SQL, &[(&high, Type::INT8), (&low, Type::INT8)])
        .await?
        .iter()
        .map(|row| {
            let pid = row.get::<_, Option<i32>>(0);
            let said = format!(
                "pid {} (role {:?}, application {:?}, from {})",
                // None: a prepared transaction holds it.
                pid.map_or_else(|| "none (a prepared transaction)".into(), |p| p.to_string()),
                row.get::<_, String>(1),
                row.get::<_, String>(2),
                row.get::<_, String>(3)
            );
            (pid, said)
        })
        .collect())
}

/// The consumer's stored position, if it has one.
const READ_SQL: &str = "\
    SELECT c.position FROM updatepipe.consumers c \
    WHERE c.channel OPERATOR(pg_catalog.=) $1 AND c.name OPERATOR(pg_catalog.=) $2";

/// The stored position of consumer `name` of `channel`, if it has one.
pub(crate) async fn stored(
    client: &Client,
    channel: &str,
    name: &str,
) -> Result<Option<Position>, Error> {
    let row = client
        .query_typed_opt(READ_SQL, &[(&channel, Type::TEXT), (&name, Type::TEXT)])
        .await?;
    row.map(|row| row.get::<_, String>(0).parse()).transpose()
}

const ACK_SQL: &str = "SELECT updatepipe.consumer_ack($1, $2, $3, $4, $5, $6, $7, $8)";
const RESET_SQL: &str = "SELECT updatepipe.consumer_reset($1, $2, $3, $4, $5, $6, $7)";
const CLAIM_SQL: &str = "SELECT updatepipe.consumer_claim($1, $2)";

/// How a position is written: forward only, by a session of the consumer's current epoch
/// (an acknowledgement), or wherever it is (a start the application chose, or the present
/// after the server's history moved).
#[derive(Clone, Copy, Debug)]
pub(crate) enum Store {
    Ack { epoch: i64 },
    Reset,
}

/// Writes consumer `name` of `channel` at `position`, as `how` says. Returns whether it
/// moved (an acknowledgement of an older step, or from an older epoch, does not).
pub(crate) async fn store(
    client: &(impl tokio_postgres::GenericClient + Sync),
    channel: &str,
    name: &str,
    position: &Position,
    how: Store,
) -> Result<bool, tokio_postgres::Error> {
    let text = position.to_string();
    let step = i64::try_from(position.step()).unwrap_or(i64::MAX);
    let holds = position.holds();
    let past = position.past_id();
    let settled = &position.read().from;
    let mut params: Vec<(&(dyn tokio_postgres::types::ToSql + Sync), Type)> = vec![
        (&channel, Type::TEXT),
        (&name, Type::TEXT),
        (&text, Type::TEXT),
        (&step, Type::INT8),
        (&holds, Type::TEXT),
        (&past, Type::INT8),
        (&settled.read_at, Type::FLOAT8),
    ];
    let (sql, epoch) = match how {
        Store::Ack { epoch } => (ACK_SQL, epoch),
        Store::Reset => (RESET_SQL, 0),
    };
    if let Store::Ack { .. } = how {
        params.push((&epoch, Type::INT8));
    }
    let rows = client.query_typed(sql, &params).await?;
    Ok(match how {
        Store::Ack { .. } => rows.first().is_some_and(|row| row.get::<_, bool>(0)),
        Store::Reset => true,
    })
}

/// Starts reading as consumer `name` of `channel` (its lock held by this session): raises
/// the consumer's epoch and returns it, for this session's acknowledgements.
pub(crate) async fn claim(
    client: &Client,
    channel: &str,
    name: &str,
) -> Result<i64, tokio_postgres::Error> {
    Ok(client
        .query_typed_one(CLAIM_SQL, &[(&channel, Type::TEXT), (&name, Type::TEXT)])
        .await?
        .get(0))
}

/// A named consumer as `status` shows it.
#[derive(Clone, Debug, PartialEq)]
#[non_exhaustive]
pub struct ConsumerStatus {
    /// Its name.
    pub name: String,
    /// The step of its last acknowledged position.
    pub step: u64,
    /// Log entries written after what it has acknowledged (at least; entries of
    /// transactions that were in progress then are not counted).
    pub lag_entries: u64,
    /// How old its acknowledged position is, in seconds: when its cursor was read.
    pub lag_secs: f64,
    /// Seconds since its last acknowledgement.
    pub acked_secs_ago: f64,
    /// The role that acknowledged last.
    pub acked_by: String,
}

const LIST_SQL: &str = "\
    SELECT c.name, c.step, \
           (SELECT pg_catalog.count(*) FROM updatepipe.log l \
            WHERE l.channel OPERATOR(pg_catalog.=) c.channel \
              AND l.id OPERATOR(pg_catalog.>) c.max_id), \
           pg_catalog.date_part('epoch', pg_catalog.now() OPERATOR(pg_catalog.-) c.read_at), \
           pg_catalog.date_part('epoch', pg_catalog.now() OPERATOR(pg_catalog.-) c.acked_at), \
           c.acked_by \
    FROM updatepipe.consumers c WHERE c.channel OPERATOR(pg_catalog.=) $1 ORDER BY c.name";

/// The named consumers of `channel`.
pub(crate) async fn list(
    client: &(impl tokio_postgres::GenericClient + Sync),
    channel: &str,
) -> Result<Vec<ConsumerStatus>, tokio_postgres::Error> {
    Ok(client
        .query_typed(LIST_SQL, &[(&channel, Type::TEXT)])
        .await?
        .iter()
        .map(|row| ConsumerStatus {
            name: row.get(0),
            step: u64::try_from(row.get::<_, i64>(1)).unwrap_or(0),
            lag_entries: u64::try_from(row.get::<_, i64>(2)).unwrap_or(0),
            lag_secs: row.get(3),
            acked_secs_ago: row.get(4),
            acked_by: row.get(5),
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_checked() {
        assert!(check_name("indexer").is_ok());
        assert!(check_name(&"n".repeat(63)).is_ok());
        for bad in ["", "a\nb", "a\0b"] {
            assert!(check_name(bad).is_err(), "{bad:?}");
        }
        assert!(check_name(&"n".repeat(64)).is_err());
    }

    #[test]
    fn lock_keys_are_stable_and_tell_channel_from_name() {
        assert_eq!(lock_key("c", "n"), lock_key("c", "n"));
        assert_ne!(lock_key("c", "n"), lock_key("n", "c"));
        assert_ne!(lock_key("ab", "c"), lock_key("a", "bc"));
        // FNV-1a: a fixed value, so that two builds lock the same key.
        assert_eq!(lock_key("updatepipe", "indexer"), 249_967_259_163_198_722);
    }
}
