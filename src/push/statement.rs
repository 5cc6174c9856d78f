//! A push's one statement, whichever driver sends it: its SQL text and its parameter
//! values, built once (`Wire::statement`, in `wire/statements.rs`) and bound here as each
//! driver binds values: tokio-postgres's `ToSql`, prepared or unnamed with its types, and
//! (feature `sqlx`) sqlx's `PgArguments`, unnamed.

use std::borrow::Cow;

use tokio_postgres::GenericClient;
use tokio_postgres::types::{ToSql, Type};

use super::wire::Kind;

/// The one statement that carries a push inside the caller's transaction: its SQL text and
/// its parameters, for a driver this crate does not bind
/// ([`PgPipe::statement_for`](crate::PgPipe::statement_for)). It is what
/// [`push_many_in`](crate::PgPipe::push_many_in) sends on tokio-postgres and sqlx
/// connections, built by the same code; a pool flight of the same updates sends the same
/// statement, with the pool's marks and numbers.
///
/// Run it **once**, **inside the transaction** that must carry the updates, **as it is**:
/// [`sql`](PushStatement::sql) as the statement, [`text_params`](PushStatement::text_params)
/// as its parameters `$1`, `$2`, … in that order, sent as parameters (never spliced into
/// the SQL text), each in text format with its type left to the server or given as
/// [`param_types`](PushStatement::param_types) says. Nothing in them may be changed, split
/// or reordered: array order is delivery order, and a signed envelope is checked byte for
/// byte. The listeners receive the updates if and only if that transaction commits. The
/// wire-format guide, section 11, gives the rules in full.
///
/// ```
/// # async fn run(pipe: &updatepipe::PgPipe) -> Result<(), updatepipe::Error> {
/// use updatepipe::{SeqSet, Update};
/// let statement = pipe.statement_for(&[Update::new_message(42, SeqSet::single(7)?)]).await?;
/// // Hand these to the driver, in the transaction that stores message 7:
/// println!("{}", statement.sql()); // SELECT pg_catalog.pg_notify($1, $2)
/// println!("{:?}", statement.param_types()); // ["text", "text"]
/// println!("{:?}", statement.text_params()); // [channel, envelope]
/// # Ok(())
/// # }
/// ```
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

    /// Its SQL text: one of the statements the wire-format guide lists (section 11), by
    /// the pipe's durability and layout and by how many envelopes the updates need.
    pub fn sql(&self) -> &'static str {
        self.kind.sql()
    }

    /// Each parameter's PostgreSQL type, `$1` first: `text`, `text[]` or `int8[]`. The
    /// statement's text fixes them too (casts, and the functions and columns the
    /// parameters meet), so a driver may send every parameter untyped.
    pub fn param_types(&self) -> Vec<&'static str> {
        self.params.iter().map(Param::type_name).collect()
    }

    /// Each parameter in PostgreSQL's text form, `$1` first, to send as text: a `text` as
    /// it is, an array as an array literal (`{1,2}`, `{"a","b\"c",NULL}`).
    pub fn text_params(&self) -> Vec<String> {
        self.params.iter().map(Param::to_text).collect()
    }

    /// The same statement owning its values (it can outlive the payloads it was built
    /// from).
    pub fn into_owned(self) -> PushStatement<'static> {
        PushStatement {
            kind: self.kind,
            params: self.params.into_iter().map(Param::into_owned).collect(),
        }
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

    /// Its PostgreSQL type's name, as SQL writes it.
    fn type_name(&self) -> &'static str {
        match self {
            Param::Text(_) => "text",
            Param::Int8Array(_) => "int8[]",
            Param::TextArray(_) | Param::NullableTextArray(_) => "text[]",
        }
    }

    /// PostgreSQL's text form of the value: what its type's input function reads.
    pub(in crate::push) fn to_text(&self) -> String {
        match self {
            Param::Text(text) => text.clone().into_owned(),
            Param::Int8Array(numbers) => {
                let numbers: Vec<String> = numbers.iter().map(i64::to_string).collect();
                format!("{{{}}}", numbers.join(","))
            }
            Param::TextArray(texts) => array_literal(texts.iter().map(|t| Some(t.as_ref()))),
            Param::NullableTextArray(texts) => array_literal(texts.iter().map(|t| t.as_deref())),
        }
    }

    /// The same value, owned.
    fn into_owned(self) -> Param<'static> {
        let owned = |text: Cow<'_, str>| Cow::Owned(text.into_owned());
        match self {
            Param::Text(text) => Param::Text(owned(text)),
            Param::Int8Array(numbers) => Param::Int8Array(numbers),
            Param::TextArray(texts) => Param::TextArray(texts.into_iter().map(owned).collect()),
            Param::NullableTextArray(texts) => {
                Param::NullableTextArray(texts.into_iter().map(|t| t.map(owned)).collect())
            }
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

/// A one-dimensional array literal of texts: every element in double quotes, with `"` and
/// `\` escaped by a backslash (so that no element is read as NULL, nor loses a space or
/// a brace); `NULL` for a missing one.
fn array_literal<'t>(elements: impl Iterator<Item = Option<&'t str>>) -> String {
    let mut literal = String::from("{");
    for (i, element) in elements.enumerate() {
        if i > 0 {
            literal.push(',');
        }
        let Some(text) = element else {
            literal.push_str("NULL");
            continue;
        };
        literal.push('"');
        for c in text.chars() {
            if c == '"' || c == '\\' {
                literal.push('\\');
            }
            literal.push(c);
        }
        literal.push('"');
    }
    literal.push('}');
    literal
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parameters_in_postgresqls_text_form() {
        assert_eq!(Param::Text("a \"b\" {c}".into()).to_text(), "a \"b\" {c}");
        assert_eq!(Param::Int8Array(vec![]).to_text(), "{}");
        assert_eq!(
            Param::Int8Array(vec![1, 1 << 62, -3]).to_text(),
            "{1,4611686018427387904,-3}"
        );
        let texts = ["", "NULL", r#"{"Key":"a\"b","S":"c\\d"}"#, " é ,}"];
        assert_eq!(
            Param::TextArray(texts.iter().map(|t| (*t).into()).collect()).to_text(),
            r#"{"","NULL","{\"Key\":\"a\\\"b\",\"S\":\"c\\\\d\"}"," é ,}"}"#
        );
        let channels = vec![None, Some("INBOX;1".into()), None];
        assert_eq!(
            Param::NullableTextArray(channels).to_text(),
            r#"{NULL,"INBOX;1",NULL}"#
        );
        assert_eq!(Param::NullableTextArray(vec![]).to_text(), "{}");
    }

    #[test]
    fn an_owned_statement_keeps_its_kind_and_values() {
        let payload = String::from("{}");
        let borrowed = PushStatement::new(
            Kind::NotifyOne,
            vec![
                Param::Text("ch".into()),
                Param::Text(payload.as_str().into()),
            ],
        );
        let owned = borrowed.clone().into_owned();
        drop(payload);
        assert_eq!(owned.sql(), Kind::NotifyOne.sql());
        assert_eq!(owned.param_types(), ["text", "text"]);
        assert_eq!(owned.text_params(), ["ch", "{}"]);
    }
}
