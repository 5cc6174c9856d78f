//! The owner's transaction: what `migrate` and `grant` run in. Its search path is one no
//! other role can put objects in, its lock waits are bounded, and it holds the migration
//! lock, taken within a bound and, past it, refused with the sessions that hold it named.

use std::time::Duration;

use tokio::time::Instant;
use tokio_postgres::types::Type;
use tokio_postgres::{Client, GenericClient, Transaction};

use crate::error::Error;

/// The advisory lock key that serializes migrations and grants ("updpipe1" in ASCII):
/// concurrent GRANTs on one table fail ("tuple concurrently updated").
pub(crate) const MIGRATION_LOCK: i64 = 0x7570_6470_6970_6531;

/// What the lock is called in messages.
const MIGRATION_LOCK_NAME: &str = "the migration lock (advisory lock 8462374133797250353)";

/// Pins the transaction's search path and bounds its lock waits. `pg_temp` last: functions
/// and operators are never looked up there, and relations only after `pg_catalog`.
fn pin_sql(lock_wait: Duration) -> String {
    format!(
        "SET LOCAL search_path = pg_catalog, pg_temp; SET LOCAL lock_timeout = {}",
        lock_wait.as_millis().max(1)
    )
}

const TRY_XACT_LOCK: &str = "SELECT pg_catalog.pg_try_advisory_xact_lock($1)";

/// The sessions holding an advisory lock of this database, by the two halves of its key.
const LOCK_HOLDERS: &str = "\
    SELECT l.pid, a.usename::pg_catalog.text, a.application_name, \
           a.client_addr::pg_catalog.text, a.state \
    FROM pg_catalog.pg_locks l \
    LEFT JOIN pg_catalog.pg_stat_activity a ON a.pid OPERATOR(pg_catalog.=) l.pid \
    WHERE l.locktype OPERATOR(pg_catalog.=) 'advisory' AND l.granted \
      AND l.database OPERATOR(pg_catalog.=) \
          (SELECT d.oid FROM pg_catalog.pg_database d \
           WHERE d.datname OPERATOR(pg_catalog.=) pg_catalog.current_database()) \
      AND l.classid OPERATOR(pg_catalog.=) $1 AND l.objid OPERATOR(pg_catalog.=) $2 \
      AND l.objsubid OPERATOR(pg_catalog.=) 1 \
    ORDER BY l.pid";

/// The other sessions holding a lock on a relation of the `updatepipe` schema, for a
/// migration that waited for one in vain.
const TABLE_LOCK_HOLDERS: &str = "\
    SELECT DISTINCT l.pid, a.usename::pg_catalog.text, a.application_name, \
           a.client_addr::pg_catalog.text, a.state \
    FROM pg_catalog.pg_locks l \
    JOIN pg_catalog.pg_class c ON c.oid OPERATOR(pg_catalog.=) l.relation \
    JOIN pg_catalog.pg_namespace n ON n.oid OPERATOR(pg_catalog.=) c.relnamespace \
    LEFT JOIN pg_catalog.pg_stat_activity a ON a.pid OPERATOR(pg_catalog.=) l.pid \
    WHERE l.locktype OPERATOR(pg_catalog.=) 'relation' AND l.granted \
      AND n.nspname OPERATOR(pg_catalog.=) 'updatepipe' \
      AND l.pid OPERATOR(pg_catalog.<>) pg_catalog.pg_backend_pid() \
    ORDER BY l.pid";

/// Opens the owner's transaction on `client`: the search path pinned, lock waits bounded
/// by `wait`, and the migration lock held, waited for at most `wait` (then
/// [`Error::LockHeld`], naming who holds it).
pub(crate) async fn owner_transaction(
    client: &mut Client,
    wait: Duration,
) -> Result<Transaction<'_>, Error> {
    let tx = client.transaction().await?;
    tx.batch_execute(&pin_sql(wait)).await?;
    let deadline = Instant::now() + wait;
    let mut pause = Duration::from_millis(20);
    loop {
        let row = tx
            .query_typed_one(TRY_XACT_LOCK, &[(&MIGRATION_LOCK, Type::INT8)])
            .await?;
        if row.get::<_, bool>(0) {
            return Ok(tx);
        }
        let now = Instant::now();
        if now >= deadline {
            let holders = advisory_holders(&tx, MIGRATION_LOCK).await;
            return Err(Error::LockHeld {
                what: MIGRATION_LOCK_NAME,
                waited: wait,
                holders,
            });
        }
        tokio::time::sleep(pause.min(deadline - now)).await;
        pause = (pause * 2).min(Duration::from_millis(500));
    }
}

/// Who holds the advisory lock `key`, in words.
async fn advisory_holders(client: &impl GenericClient, key: i64) -> String {
    // An advisory lock's bigint key shows in pg_locks as two oids: its high and low halves.
    let (high, low) = ((key >> 32) as u32, key as u32);
    let rows = client
        .query_typed(LOCK_HOLDERS, &[(&high, Type::OID), (&low, Type::OID)])
        .await;
    describe_sessions(rows)
}

/// Who holds a lock on a table of the `updatepipe` schema, in words: for a migration whose
/// statement gave up waiting (its transaction is over; `client` is free again).
pub(crate) async fn table_lock_holders(client: &Client) -> String {
    describe_sessions(client.query_typed(TABLE_LOCK_HOLDERS, &[]).await)
}

/// Sessions as `pg_stat_activity` shows them to this role (another role's details may be
/// hidden from it: then only the pid).
fn describe_sessions(rows: Result<Vec<tokio_postgres::Row>, tokio_postgres::Error>) -> String {
    let rows = match rows {
        Ok(rows) => rows,
        Err(e) => {
            return format!(
                "(who holds it could not be read: {})",
                crate::error::pg_message(&e)
            );
        }
    };
    if rows.is_empty() {
        return "no session holds it any more".to_owned();
    }
    let sessions: Vec<String> = rows
        .iter()
        .map(|row| {
            let pid: i32 = row.get(0);
            let mut about = Vec::new();
            if let Some(role) = row.get::<_, Option<String>>(1) {
                about.push(format!("role {role:?}"));
            }
            if let Some(name) = row.get::<_, Option<String>>(2).filter(|n| !n.is_empty()) {
                about.push(format!("application {name:?}"));
            }
            if let Some(addr) = row.get::<_, Option<String>>(3) {
                about.push(format!("from {addr}"));
            }
            if let Some(state) = row.get::<_, Option<String>>(4) {
                about.push(state);
            }
            if about.is_empty() {
                format!("pid {pid}")
            } else {
                format!("pid {pid} ({})", about.join(", "))
            }
        })
        .collect();
    sessions.join("; ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_pinned_path_has_nothing_another_role_can_write() {
        let sql = pin_sql(Duration::from_millis(1500));
        assert_eq!(
            sql,
            "SET LOCAL search_path = pg_catalog, pg_temp; SET LOCAL lock_timeout = 1500"
        );
        assert!(pin_sql(Duration::ZERO).ends_with("lock_timeout = 1"));
    }

    #[test]
    fn the_lock_is_named_by_its_key() {
        assert!(MIGRATION_LOCK_NAME.contains(&MIGRATION_LOCK.to_string()));
        // "updpipe1"
        assert_eq!(&MIGRATION_LOCK.to_be_bytes(), b"updpipe1");
    }
}
