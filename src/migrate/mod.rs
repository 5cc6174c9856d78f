//! Schema migrations, embedded with refinery, in a history table of their own, run by the
//! schema's owner in one transaction (`runner.rs`) that holds the migration lock and pins
//! its search path (`lock.rs`); and the schema version check runtime roles run.

use std::time::Duration;

use tokio_postgres::types::Type;

use crate::channel::quote_identifier;
use crate::config::Config;
use crate::error::Error;
use crate::pg::DEFAULT_LOCK_TIMEOUT;
use crate::pg::connect_spawned;

mod lock;
mod runner;

pub(crate) use lock::owner_transaction;

mod embedded {
    refinery::embed_migrations!("migrations");
}

/// The history table refinery keeps updatepipe's migrations in, schema-qualified: in the
/// `updatepipe` schema, where the owner can create it (PostgreSQL 15 and later deny `CREATE`
/// on `public` to ordinary roles), and where it cannot collide with an application's own
/// `refinery_schema_history`. Every role [`grant`](crate::PgPipe::grant) sets up may read it:
/// that is how a runtime role checks the schema version
/// ([`check_schema`](crate::PgPipe::check_schema)).
pub const MIGRATION_TABLE: &str = "updatepipe.schema_history";

/// Where releases before the `updatepipe` schema held the history (moved by `migrate`).
pub(crate) const LEGACY_MIGRATION_TABLE: &str = "public.updatepipe_schema_history";

/// A migration that `migrate` applied or would apply.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MigrationInfo {
    version: i64,
    name: String,
}

impl MigrationInfo {
    /// The migration's version (`V{n}`).
    pub fn version(&self) -> i64 {
        self.version
    }

    /// The migration's name.
    pub fn name(&self) -> &str {
        &self.name
    }
}

/// How long `migrate` and `grant` wait for the migration lock, and a migration's statement
/// for a table lock: the configured lock timeout, or [`DEFAULT_LOCK_TIMEOUT`] when that is
/// off.
pub(crate) fn lock_wait(config: &Config) -> Duration {
    match config.session_limits().lock_timeout() {
        wait if wait.is_zero() => DEFAULT_LOCK_TIMEOUT,
        wait => wait,
    }
}

/// Applies the pending migrations; returns those it applied (none when up to date).
///
/// One transaction, so all of them or none: safe to run twice and from several processes
/// at once (the migration lock serializes runners, waited for within [`lock_wait`]), and
/// through a transaction-pooling proxy (no session state, no prepared statement).
pub(crate) async fn migrate(config: &Config) -> Result<Vec<MigrationInfo>, Error> {
    let (mut client, connection) = connect_spawned(config.server()).await?;
    let wait = lock_wait(config);
    let outcome = async {
        let session_schemas: Vec<String> = client
            .query_typed_one(SESSION_SCHEMAS_SQL, &[])
            .await?
            .get(0);
        let tx = owner_transaction(&mut client, wait).await?;
        prepare_history(&tx, &session_schemas).await?;
        let report = embedded::migrations::runner()
            .set_migration_table_name(MIGRATION_TABLE)
            .run_async(&mut runner::InTransaction { tx: &tx })
            .await;
        let report = report.map_err(Error::from)?;
        tx.commit().await?;
        Ok::<_, Error>(report)
    }
    .await;
    let outcome = match outcome {
        Ok(report) => Ok(report),
        // A statement gave up waiting for a table lock (a transaction holding the log, say):
        // name who holds it. (The transaction is rolled back; the connection is free.)
        Err(e) if lock_timed_out(&e) => Err(Error::LockHeld {
            what: "a lock on the updatepipe tables, which a migration needs",
            waited: wait,
            holders: lock::table_lock_holders(&client).await,
        }),
        Err(e) => Err(e),
    };
    drop(client);
    let _ = connection.await;
    Ok(outcome?
        .applied_migrations()
        .iter()
        .map(|m| MigrationInfo {
            version: i64::from(m.version()),
            name: m.name().to_owned(),
        })
        .collect())
}

/// Whether a migration's statement gave up waiting for a lock (`lock_timeout`).
fn lock_timed_out(e: &Error) -> bool {
    let cause: Option<&(dyn std::error::Error + 'static)> = match e {
        Error::Postgres(e) => Some(&**e),
        Error::Migrate(e) => std::error::Error::source(&**e),
        _ => None,
    };
    std::iter::successors(cause, |e| e.source())
        .filter_map(|e| e.downcast_ref::<tokio_postgres::Error>())
        .any(crate::pg::is_lock_timeout)
}

/// Creates the `updatepipe` schema (when missing) and moves a history table that an earlier
/// release kept where the migrator's `search_path` put it (`public`, or a schema named after
/// the role) into it, in the owner's transaction.
///
/// Only what the migrating role itself owns is trusted: a schema `updatepipe`, or a legacy
/// history table, owned by another role (one that may create in `public`, say) is refused,
/// since moving it, or running migrations into it, would run that role's triggers with the
/// migrator's rights and let it claim versions that were never applied.
async fn prepare_history(
    tx: &tokio_postgres::Transaction<'_>,
    session_schemas: &[String],
) -> Result<(), Error> {
    let row = tx
        .query_typed_one(PREPARE_HISTORY_SQL, &[(&session_schemas, Type::TEXT_ARRAY)])
        .await?;
    let schema_owner: Option<String> = row.get(0);
    let legacy: Option<(String, String, String)> = match (row.get(1), row.get(2), row.get(3)) {
        (Some(schema), Some(table), Some(owner)) => Some((schema, table, owner)),
        _ => None,
    };
    let (current, me): (bool, String) = (row.get(4), row.get(5));
    match schema_owner {
        None => {
            // Needs CREATE on the database: the role that is to own the schema runs this.
            tx.batch_execute("CREATE SCHEMA updatepipe").await?;
        }
        Some(owner) if owner != me => {
            tracing::debug!(target: "updatepipe::migrate", %owner, "the schema has another owner");
            return Err(Error::NotSchemaOwner { role: me });
        }
        Some(_) => {}
    }
    if let Some((schema, table, owner)) = legacy.filter(|_| !current) {
        let table = format!("{}.{}", quote_identifier(&schema), quote_identifier(&table));
        if owner != me {
            return Err(Error::Config(format!(
                "a migration history {table} exists, owned by {owner:?}, not by {me:?} who \
                 migrates: refusing to move or trust it (drop it if it is not updatepipe's, or \
                 migrate as its owner)"
            )));
        }
        tx.batch_execute(&format!(
            "ALTER TABLE {table} SET SCHEMA updatepipe; \
             ALTER TABLE updatepipe.updatepipe_schema_history RENAME TO schema_history"
        ))
        .await?;
        tracing::info!(
            target: "updatepipe::migrate",
            "moved the migration history from {LEGACY_MIGRATION_TABLE} to {MIGRATION_TABLE}"
        );
    }
    Ok(())
}

/// What `prepare_history` needs to know: the schema's owner; a legacy history table (its
/// schema, name and owner), in the first of the schemas `$1` (the session's search path as
/// it was before the transaction pinned it, in order) that has one, as `to_regclass` would
/// have found it; whether the history is in place already; and who migrates.
const PREPARE_HISTORY_SQL: &str = "\
    SELECT (SELECT pg_catalog.pg_get_userbyid(s.nspowner)::pg_catalog.text \
            FROM pg_catalog.pg_namespace s WHERE s.nspname OPERATOR(pg_catalog.=) 'updatepipe'), \
           h.nspname::pg_catalog.text, h.relname::pg_catalog.text, h.owner, \
           EXISTS (SELECT 1 FROM pg_catalog.pg_class c \
                   JOIN pg_catalog.pg_namespace n \
                     ON n.oid OPERATOR(pg_catalog.=) c.relnamespace \
                   WHERE n.nspname OPERATOR(pg_catalog.=) 'updatepipe' \
                     AND c.relname OPERATOR(pg_catalog.=) 'schema_history'), \
           current_user::pg_catalog.text \
    FROM (SELECT 1) AS one \
    LEFT JOIN ( \
        SELECT n.nspname, c.relname, \
               pg_catalog.pg_get_userbyid(c.relowner)::pg_catalog.text AS owner \
        FROM pg_catalog.pg_class c \
        JOIN pg_catalog.pg_namespace n ON n.oid OPERATOR(pg_catalog.=) c.relnamespace \
        CROSS JOIN LATERAL pg_catalog.array_position($1::pg_catalog.text[], \
                                                     n.nspname::pg_catalog.text) AS p(at) \
        WHERE c.relname OPERATOR(pg_catalog.=) 'updatepipe_schema_history' \
          AND p.at IS NOT NULL \
          AND n.nspname OPERATOR(pg_catalog.<>) 'updatepipe' \
        ORDER BY p.at LIMIT 1) AS h ON true";

/// The schemas of the session's search path, in order (`$user` resolved), before anything
/// pins it.
const SESSION_SCHEMAS_SQL: &str = "SELECT pg_catalog.current_schemas(false)::pg_catalog.text[]";

/// The schema version this build needs: its newest migration.
pub(crate) fn needed_version() -> i64 {
    embedded_migrations()
        .last()
        .map_or(0, MigrationInfo::version)
}

/// Reads the schema version, from the history table or, on a deployment not yet upgraded,
/// its old place; `None` when neither exists. A read that every granted role may do; a role
/// that may not read the table gets [`Error::SchemaNotGranted`].
///
/// Unnamed statements only (`query_typed`), so that it works through a transaction-pooling
/// proxy like the rest of the status.
pub(crate) async fn schema_version(
    client: &(impl tokio_postgres::GenericClient + Sync),
) -> Result<Option<i64>, Error> {
    // The catalogs, not to_regclass: that fails on a schema the role has no USAGE on.
    let found = client
        .query_typed(SCHEMA_HISTORY_SQL, &[])
        .await?
        .into_iter()
        .next();
    let Some(row) = found else {
        return Ok(None);
    };
    let (schema, table, readable, role): (String, String, bool, String) =
        (row.get(0), row.get(1), row.get(2), row.get(3));
    if !readable {
        return Err(Error::SchemaNotGranted { role });
    }
    let table = format!("{}.{}", quote_identifier(&schema), quote_identifier(&table));
    let version: Option<i64> = client
        .query_typed_one(
            &format!("SELECT pg_catalog.max(h.version)::pg_catalog.int8 FROM {table} h"),
            &[],
        )
        .await?
        .get(0);
    Ok(version)
}

/// Where the history table is (the schema's, or where releases before the schema kept it),
/// owned by the schema's owner; whether this role may read it; who this role is.
const SCHEMA_HISTORY_SQL: &str = "\
    SELECT n.nspname::pg_catalog.text, c.relname::pg_catalog.text, \
           pg_catalog.has_schema_privilege(n.oid, 'USAGE') \
               AND pg_catalog.has_table_privilege(c.oid, 'SELECT'), \
           current_user::pg_catalog.text \
    FROM pg_catalog.pg_class c \
    JOIN pg_catalog.pg_namespace n ON n.oid OPERATOR(pg_catalog.=) c.relnamespace \
    WHERE c.relowner OPERATOR(pg_catalog.=) \
          (SELECT s.nspowner FROM pg_catalog.pg_namespace s \
           WHERE s.nspname OPERATOR(pg_catalog.=) 'updatepipe') \
      AND ((n.nspname OPERATOR(pg_catalog.=) 'updatepipe' \
            AND c.relname OPERATOR(pg_catalog.=) 'schema_history') \
           OR (n.nspname OPERATOR(pg_catalog.=) 'public' \
               AND c.relname OPERATOR(pg_catalog.=) 'updatepipe_schema_history')) \
    ORDER BY n.nspname OPERATOR(pg_catalog.=) 'updatepipe' DESC LIMIT 1";

/// Checks that the schema is migrated as far as this build needs.
pub(crate) async fn check_schema(
    client: &(impl tokio_postgres::GenericClient + Sync),
) -> Result<i64, Error> {
    let needed = needed_version();
    match schema_version(client).await? {
        Some(found) if found >= needed => Ok(found),
        found => Err(Error::SchemaOutdated { found, needed }),
    }
}

/// Every migration this build carries, oldest first.
pub fn embedded_migrations() -> Vec<MigrationInfo> {
    embedded::migrations::runner()
        .get_migrations()
        .iter()
        .map(|m| MigrationInfo {
            version: i64::from(m.version()),
            name: m.name().to_owned(),
        })
        .collect()
}
