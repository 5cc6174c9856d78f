//! refinery's runner on one transaction of ours: the statements refinery sends (its history
//! table's, and each migration's) run in the owner's transaction (`lock.rs`), so that the
//! migration lock is held from reading the history to the last migration, the search path
//! is pinned for them all, and the run is all or nothing. Simple-query protocol only: no
//! prepared statement a transaction-pooling proxy could mix up.

use refinery::Migration;
use refinery_core::traits::r#async::{AsyncMigrate, AsyncQuery, AsyncTransaction};
use tokio_postgres::{SimpleQueryMessage, Transaction};

/// refinery's connection, as a transaction already open.
pub(super) struct InTransaction<'c, 't> {
    pub(super) tx: &'c Transaction<'t>,
}

impl AsyncTransaction for InTransaction<'_, '_> {
    type Error = tokio_postgres::Error;

    async fn execute<'a, T: Iterator<Item = &'a str> + Send + 'a>(
        &'a mut self,
        queries: T,
    ) -> Result<usize, Self::Error> {
        let mut count = 0;
        for query in queries {
            self.tx.batch_execute(query).await?;
            count += 1;
        }
        Ok(count)
    }
}

impl AsyncQuery<Vec<Migration>> for InTransaction<'_, '_> {
    async fn query(&mut self, query: &str) -> Result<Vec<Migration>, Self::Error> {
        let messages = self.tx.simple_query(query).await?;
        Ok(messages
            .iter()
            .filter_map(|message| match message {
                SimpleQueryMessage::Row(row) => applied(row),
                _ => None,
            })
            .collect())
    }
}

impl AsyncMigrate for InTransaction<'_, '_> {}

/// A history row (`version, name, applied_on, checksum`) as refinery reads it; `None` for a
/// row it did not write (refinery's own driver would panic on one).
fn applied(row: &tokio_postgres::SimpleQueryRow) -> Option<Migration> {
    use time::format_description::well_known::Rfc3339;
    let version = row.get(0)?.parse().ok()?;
    let name = row.get(1)?.to_owned();
    let applied_on = time::OffsetDateTime::parse(row.get(2)?, &Rfc3339).ok()?;
    let checksum = row.get(3)?.parse().ok()?;
    Some(Migration::applied(version, name, applied_on, checksum))
}
