//! Schema migrations, embedded with refinery, in a history table of their own.

use crate::config::Config;
use crate::connect::connect_spawned;
use crate::error::Error;

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

/// The advisory lock key that serializes concurrent migrations ("updpipe1" in ASCII).
/// `grant` takes it too: concurrent GRANTs on one table fail ("tuple concurrently updated").
pub(crate) const MIGRATION_LOCK: i64 = 0x7570_6470_6970_6531;

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

/// Applies the pending migrations; returns those it applied (none when up to date).
///
/// Safe to run twice and from several processes at once: an advisory lock serializes
/// runners, and each migration commits with its history row.
pub(crate) async fn migrate(config: &Config) -> Result<Vec<MigrationInfo>, Error> {
    let (mut client, connection) = connect_spawned(config).await?;
    client
        .execute_typed(
            "SELECT pg_advisory_lock($1)",
            &[(&MIGRATION_LOCK, tokio_postgres::types::Type::INT8)],
        )
        .await?;
    let moved = prepare_history(&mut client).await;
    let report = match moved {
        Ok(()) => embedded::migrations::runner()
            .set_migration_table_name(MIGRATION_TABLE)
            .run_async(&mut client)
            .await
            .map_err(Error::from),
        Err(e) => Err(e),
    };
    // Dropping the session releases the lock too; unlock explicitly to be prompt.
    let unlocked = client
        .execute_typed(
            "SELECT pg_advisory_unlock($1)",
            &[(&MIGRATION_LOCK, tokio_postgres::types::Type::INT8)],
        )
        .await;
    drop(client);
    let _ = connection.await;
    let report = report?;
    unlocked?;
    Ok(report
        .applied_migrations()
        .iter()
        .map(|m| MigrationInfo {
            version: i64::from(m.version()),
            name: m.name().to_owned(),
        })
        .collect())
}

/// Creates the `updatepipe` schema (when missing) and moves a history table that an earlier
/// release kept in `public` into it, in one transaction, under the migration lock.
async fn prepare_history(client: &mut tokio_postgres::Client) -> Result<(), Error> {
    let tx = client.transaction().await?;
    let row = tx
        .query_one(
            "SELECT EXISTS (SELECT 1 FROM pg_namespace WHERE nspname = 'updatepipe'), \
                    EXISTS (SELECT 1 FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace \
                            WHERE n.nspname = 'public' \
                              AND c.relname = 'updatepipe_schema_history'), \
                    EXISTS (SELECT 1 FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace \
                            WHERE n.nspname = 'updatepipe' AND c.relname = 'schema_history')",
            &[],
        )
        .await?;
    let (schema, legacy, current): (bool, bool, bool) = (row.get(0), row.get(1), row.get(2));
    if !schema {
        // Needs CREATE on the database: the role that is to own the schema runs this.
        tx.batch_execute("CREATE SCHEMA updatepipe").await?;
    }
    if legacy && !current {
        tx.batch_execute(
            "ALTER TABLE public.updatepipe_schema_history SET SCHEMA updatepipe; \
             ALTER TABLE updatepipe.updatepipe_schema_history RENAME TO schema_history",
        )
        .await?;
        tracing::info!(
            target: "updatepipe::migrate",
            "moved the migration history from {LEGACY_MIGRATION_TABLE} to {MIGRATION_TABLE}"
        );
    }
    tx.commit().await?;
    Ok(())
}

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
pub(crate) async fn schema_version(client: &tokio_postgres::Client) -> Result<Option<i64>, Error> {
    // The catalogs, not to_regclass: that fails on a schema the role has no USAGE on.
    let found = client
        .query_typed(
            "SELECT format('%I.%I', n.nspname, c.relname), \
                    has_schema_privilege(n.oid, 'USAGE') AND has_table_privilege(c.oid, 'SELECT'), \
                    current_user::text \
             FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace \
             WHERE (n.nspname = 'updatepipe' AND c.relname = 'schema_history') \
                OR (n.nspname = 'public' AND c.relname = 'updatepipe_schema_history') \
             ORDER BY n.nspname = 'updatepipe' DESC LIMIT 1",
            &[],
        )
        .await?
        .into_iter()
        .next();
    let Some(row) = found else {
        return Ok(None);
    };
    let (table, readable, role): (String, bool, String) = (row.get(0), row.get(1), row.get(2));
    if !readable {
        return Err(Error::SchemaNotGranted { role });
    }
    let version: Option<i64> = client
        .query_typed_one(&format!("SELECT max(version)::int8 FROM {table}"), &[])
        .await?
        .get(0);
    Ok(version)
}

/// Checks that the schema is migrated as far as this build needs.
pub(crate) async fn check_schema(client: &tokio_postgres::Client) -> Result<i64, Error> {
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
