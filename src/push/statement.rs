//! A push's one statement, whichever driver sends it: its SQL text and its parameter
//! values, built once (`Wire::statement`, in `wire/statements.rs`) and bound here as each
//! driver binds values: tokio-postgres's `ToSql`, prepared or unnamed with its types, and
//! (feature `sqlx`) sqlx's `PgArguments`, unnamed.

use std::borrow::Cow;

use tokio_postgres::GenericClient;
use tokio_postgres::types::{ToSql, Type};

use super::wire::Kind;

/// The statement that carries a batch: which one ([`Kind`], so its SQL text) and its
/// parameter values, borrowed from the batch's payloads.
#[derive(Clone, Debug)]
pub struct PushStatement<'p> {
    kind: Kind,
    params: Vec<Param<'p>>,
}

/// One parameter's value. Every statement's parameters are of these types, named in its
/// SQL text by casts or by the columns and functions they meet, so a driver that sends
/// them typed and one that sends them untyped give the server the same values.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Param<'p> {
    /// `text`: the channel, the sender's origin, one payload.
    Text(Cow<'p, str>),
    /// `int8[]`: the envelopes' numbers, for the log.
    Int8Array(Vec<i64>),
    /// `text[]`: payloads.
    TextArray(Vec<Cow<'p, str>>),
    /// `text[]` with NULL elements: in the maddy layout, each notification's channel, NULL
    /// for the pipe's own.
    NullableTextArray(Vec<Option<Cow<'p, str>>>),
}

impl<'p> PushStatement<'p> {
    pub(in crate::push) fn new(kind: Kind, params: Vec<Param<'p>>) -> Self {
        PushStatement { kind, params }
    }

    /// Which statement.
    pub(in crate::push) fn kind(&self) -> Kind {
        self.kind
    }

    /// Its SQL text.
    pub(crate) fn sql(&self) -> &'static str {
        self.kind.sql()
    }

    /// Its parameters, `$1` first.
    pub(crate) fn params(&self) -> &[Param<'p>] {
        &self.params
    }

    /// Runs it unnamed, with its parameter types given, on any tokio-postgres client (the
    /// pool's, or the caller's in `push_in`): no transaction-pooling proxy breaks it, since
    /// tokio-postgres sends its Parse, Bind and Execute together. Sends before its first
    /// await.
    pub(in crate::push) async fn execute_unnamed<C: GenericClient + Sync>(
        &self,
        client: &C,
    ) -> Result<u64, tokio_postgres::Error> {
        let typed: Vec<(&(dyn ToSql + Sync), Type)> = self
            .params
            .iter()
            .map(|param| (param.to_sql(), param.pg_type()))
            .collect();
        client.execute_typed(self.sql(), &typed).await
    }
}

#[cfg(feature = "sqlx")]
impl PushStatement<'_> {
    /// Runs it on an sqlx connection, with the same parameter values, typed as
    /// [`Param::pg_type`] says, and unnamed (`persistent(false)`): nothing is left prepared
    /// on the caller's connection nor kept in sqlx's statement cache, so that a
    /// transaction-pooling proxy cannot hand the statement to another client. (sqlx sends
    /// the Parse and the Bind in two round trips: inside a transaction, which a transaction
    /// pooler keeps on one server connection, that is safe; outside one, through such a
    /// pooler, push inside a transaction.)
    pub(in crate::push) async fn execute_sqlx(
        &self,
        connection: &mut sqlx::PgConnection,
    ) -> Result<u64, sqlx::Error> {
        let mut arguments = sqlx::postgres::PgArguments::default();
        for param in &self.params {
            param.add_to(&mut arguments).map_err(sqlx::Error::Encode)?;
        }
        let done = sqlx::query_with(self.sql(), arguments)
            .persistent(false)
            .execute(connection)
            .await?;
        Ok(done.rows_affected())
    }
}

impl Param<'_> {
    /// Binds the value as sqlx binds it: the same types as [`Param::pg_type`].
    #[cfg(feature = "sqlx")]
    fn add_to(
        &self,
        arguments: &mut sqlx::postgres::PgArguments,
    ) -> Result<(), sqlx::error::BoxDynError> {
        use sqlx::Arguments;
        match self {
            Param::Text(text) => arguments.add(text.as_ref()),
            Param::Int8Array(numbers) => arguments.add(numbers.as_slice()),
            Param::TextArray(texts) => arguments.add(texts.as_slice()),
            Param::NullableTextArray(texts) => arguments.add(texts.as_slice()),
        }
    }

    /// The value, as tokio-postgres binds it.
    pub(in crate::push) fn to_sql(&self) -> &(dyn ToSql + Sync) {
        match self {
            Param::Text(text) => text,
            Param::Int8Array(numbers) => numbers,
            Param::TextArray(texts) => texts,
            Param::NullableTextArray(texts) => texts,
        }
    }

    /// Its PostgreSQL type.
    pub(in crate::push) fn pg_type(&self) -> Type {
        match self {
            Param::Text(_) => Type::TEXT,
            Param::Int8Array(_) => Type::INT8_ARRAY,
            Param::TextArray(_) | Param::NullableTextArray(_) => Type::TEXT_ARRAY,
        }
    }
}
