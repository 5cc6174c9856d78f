//! What `push_in` sends on: a connection or transaction of the caller's, of whichever
//! driver ([`PushClient`]). Each driver runs the same statement with the same parameter
//! values ([`PushStatement`], built by `Wire::statement`); only the binding differs.

use tokio_postgres::GenericClient;

use super::statement::PushStatement;
use crate::error::Error;

/// A connection or transaction of the caller's that [`PgPipe::push_in`] and
/// [`PgPipe::push_many_in`] send on, inside whatever transaction it is in:
///
/// - tokio-postgres: `&C` for any `C: tokio_postgres::GenericClient` (a `Client`, a
///   `Transaction`; with deadpool-postgres, `&**object` for a pooled client or
///   `&*transaction` for its transaction);
/// - sqlx 0.8, with the feature `sqlx`: `&mut sqlx::PgConnection` and
///   `&mut sqlx::Transaction<'_, sqlx::Postgres>` (so `&mut *tx`, `&mut tx`, and
///   `&mut *pool_connection` for a connection from an `sqlx::PgPool`).
///
/// Either way the push is one statement, the same text with the same parameter values,
/// sent unnamed (nothing is left prepared on the connection, which may go through a
/// transaction-pooling proxy), and the same guarantees hold: delivered if and only if the
/// caller's transaction commits, never to the pushing pipe's own listener, the durable
/// log row in the same statement. Sealed: implemented for these types only.
///
/// A store on sqlx (with the feature `sqlx`):
///
/// ```no_run
/// # #[cfg(feature = "sqlx")]
/// use updatepipe::sqlx::{self, PgPool};
/// use updatepipe::{PgPipe, SeqSet, Update};
///
/// # #[cfg(feature = "sqlx")]
/// async fn store(db: &PgPool, pipe: &PgPipe) -> Result<(), Box<dyn std::error::Error>> {
///     let mut tx = db.begin().await?;
///     sqlx::query("INSERT INTO messages (mailbox, uid) VALUES ($1, $2)")
///         .bind(42_i64)
///         .bind(7_i32)
///         .execute(&mut *tx)
///         .await?;
///     pipe.push_in(&mut *tx, &Update::new_message(42, SeqSet::single(7)?)).await?;
///     tx.commit().await?;
///     Ok(())
/// }
/// ```
///
/// [`PgPipe::push_in`]: crate::PgPipe::push_in
/// [`PgPipe::push_many_in`]: crate::PgPipe::push_many_in
pub trait PushClient: sealed::Sealed + Send {}

/// The one method each driver implements: run a push's statement. (Public in a private
/// module: outside the crate it can be neither named nor implemented.)
pub(crate) mod sealed {
    use super::{Error, PushStatement};

    /// Runs a push's statement on the caller's connection, unnamed, and gives back the
    /// driver's error as the crate's.
    pub trait Sealed {
        /// Runs `statement`; its number of rows.
        fn send_push<'a>(
            self,
            statement: &'a PushStatement<'a>,
        ) -> impl Future<Output = Result<u64, Error>> + Send + 'a
        where
            Self: 'a;
    }
}

impl<C: GenericClient + Sync> PushClient for &C {}

impl<C: GenericClient + Sync> sealed::Sealed for &C {
    async fn send_push<'a>(self, statement: &'a PushStatement<'a>) -> Result<u64, Error>
    where
        Self: 'a,
    {
        Ok(statement.execute_unnamed(self).await?)
    }
}

#[cfg(feature = "sqlx")]
impl PushClient for &mut sqlx::PgConnection {}

#[cfg(feature = "sqlx")]
impl sealed::Sealed for &mut sqlx::PgConnection {
    async fn send_push<'a>(self, statement: &'a PushStatement<'a>) -> Result<u64, Error>
    where
        Self: 'a,
    {
        Ok(statement.execute_sqlx(self).await?)
    }
}

#[cfg(feature = "sqlx")]
impl PushClient for &mut sqlx::Transaction<'_, sqlx::Postgres> {}

#[cfg(feature = "sqlx")]
impl sealed::Sealed for &mut sqlx::Transaction<'_, sqlx::Postgres> {
    fn send_push<'a>(
        self,
        statement: &'a PushStatement<'a>,
    ) -> impl Future<Output = Result<u64, Error>> + Send + 'a
    where
        Self: 'a,
    {
        let connection: &mut sqlx::PgConnection = self;
        connection.send_push(statement)
    }
}
