//! Schema migrations, embedded with refinery, in a history table of their own.

use crate::config::Config;
use crate::connect::connect_spawned;
use crate::error::Error;

mod embedded {
    refinery::embed_migrations!("migrations");
}

/// The history table refinery keeps updatepipe's migrations in, in the `public` schema. Its
/// name cannot collide with an application's own `refinery_schema_history`.
pub const MIGRATION_TABLE: &str = "updatepipe_schema_history";

/// The advisory lock key that serializes concurrent migrations ("updpipe1" in ASCII).
const MIGRATION_LOCK: i64 = 0x7570_6470_6970_6531;

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
    let report = embedded::migrations::runner()
        .set_migration_table_name(MIGRATION_TABLE)
        .run_async(&mut client)
        .await;
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
