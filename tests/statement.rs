//! `PgPipe::statement_for`: the statement and parameters of a push for a driver the crate
//! does not bind, run here as a driver of another language runs it (libpq, psycopg, lib/pq):
//! every parameter sent as text in PostgreSQL's text form, its type left to the server,
//! inside the caller's transaction. Delivered if and only if it commits, never to the
//! pushing pipe, the durable log written in the same statement, once.

mod support;

use std::error::Error as StdError;

use bytes::BytesMut;
use support::{assert_silent, config_on, log_rows, receive_exactly, unique};
use tokio::sync::mpsc;
use tokio_postgres::GenericClient;
use tokio_postgres::error::SqlState;
use tokio_postgres::types::{Format, IsNull, ToSql, Type, to_sql_checked};
use updatepipe::{Error, Layout, MailboxKey, PgPipe, PushStatement, SeqSet, Update, UpdatePipe};

fn new_message(key: u64, uid: u32) -> Update {
    Update::new_message(key, SeqSet::single(uid).unwrap())
}

async fn listening(config: updatepipe::Config) -> (PgPipe, mpsc::Receiver<Update>) {
    let pipe = PgPipe::new(config).unwrap();
    let (tx, rx) = mpsc::channel(10_000);
    pipe.listen(tx).await.unwrap();
    (pipe, rx)
}

/// A parameter as a driver without types sends it: text format, any type.
#[derive(Debug)]
struct AsText(String);

impl ToSql for AsText {
    fn to_sql(
        &self,
        _: &Type,
        out: &mut BytesMut,
    ) -> Result<IsNull, Box<dyn StdError + Sync + Send>> {
        out.extend_from_slice(self.0.as_bytes());
        Ok(IsNull::No)
    }

    fn accepts(_: &Type) -> bool {
        true
    }

    fn encode_format(&self, _: &Type) -> Format {
        Format::Text
    }

    to_sql_checked!();
}

/// Runs the statement as handed over: its SQL text, its text parameters in order, with no
/// parameter type given (the server infers them from the statement).
async fn run(
    client: &impl GenericClient,
    statement: &PushStatement<'_>,
) -> Result<u64, tokio_postgres::Error> {
    let params: Vec<AsText> = statement.text_params().into_iter().map(AsText).collect();
    let params: Vec<&(dyn ToSql + Sync)> = params.iter().map(|p| p as _).collect();
    client.execute(statement.sql(), &params).await
}

#[tokio::test]
async fn a_statement_run_by_another_driver_arrives_only_if_its_transaction_commits() {
    let channel = unique("stmt");
    let (listener, mut rx) = listening(config_on(&channel)).await;
    let (pipe, mut own) = listening(config_on(&channel)).await;
    let mut client = support::sql().await;

    // Rolled back: nothing.
    let statement = pipe.statement_for(&[new_message(1, 1)]).await.unwrap();
    assert_eq!(statement.sql(), "SELECT pg_catalog.pg_notify($1, $2)");
    assert_eq!(statement.param_types(), ["text", "text"]);
    assert_eq!(statement.text_params()[0], channel);
    let tx = client.transaction().await.unwrap();
    run(&tx, &statement).await.unwrap();
    tx.rollback().await.unwrap();

    // With its data change, in one transaction: nothing until the commit. A key with
    // quotes, backslashes, a semicolon and non-ASCII text travels as it is.
    let odd = Update::mailbox_destroyed("a\"b\\c;d é {x}");
    let updates = [new_message(1, 2), odd];
    let statement = pipe.statement_for(&updates).await.unwrap();
    let tx = client.transaction().await.unwrap();
    tx.batch_execute(
        "CREATE TEMP TABLE messages (mailbox int8, uid int4); INSERT INTO messages VALUES (1, 2)",
    )
    .await
    .unwrap();
    run(&tx, &statement).await.unwrap();
    assert_silent(&mut rx).await;
    tx.commit().await.unwrap();
    assert_eq!(receive_exactly(&mut rx, 2).await, updates);

    // Many updates: several envelopes in one array parameter, in order.
    let many: Vec<Update> = (1..=3000).map(|i| new_message(2, i)).collect();
    let statement = pipe.statement_for(&many).await.unwrap();
    assert_eq!(statement.param_types(), ["text", "text[]"]);
    let tx = client.transaction().await.unwrap();
    run(&tx, &statement).await.unwrap();
    tx.commit().await.unwrap();
    assert_eq!(receive_exactly(&mut rx, many.len()).await, many);

    // The pipe that made them never hears them; handing a statement out is no push.
    assert_silent(&mut own).await;
    assert!(pipe.stats().echoes_dropped >= 2, "{:?}", pipe.stats());
    assert_eq!(pipe.stats().delivered, 0);
    assert_eq!(pipe.stats().pushed, 0);
    listener.close().await.unwrap();
    pipe.close().await.unwrap();
}

/// Durable: the log rows are written by the same statement, visible only once it commits,
/// an envelope too large for a notification goes by reference, and the statement runs
/// once only (its numbers are in the log).
#[tokio::test]
async fn a_durable_statement_writes_its_log_rows_in_the_callers_transaction() {
    let channel = unique("stmt_durable");
    let durable = |channel: &str| config_on(channel).with_durable(true);
    let pipe = PgPipe::new(durable(&channel)).unwrap();
    pipe.migrate().await.unwrap();
    let (listener, mut rx) = listening(durable(&channel)).await;
    let mut client = support::sql().await;
    let large = Update::mailbox_destroyed(MailboxKey::Name("k\"\\".repeat(7000)));
    let updates = [new_message(1, 1), large];
    let statement = pipe.statement_for(&updates).await.unwrap();
    assert_eq!(
        statement.param_types(),
        ["text", "text", "int8[]", "text[]", "text[]"]
    );
    assert!(statement.sql().contains("INSERT INTO updatepipe.log"));

    // Rolled back: no row.
    let tx = client.transaction().await.unwrap();
    run(&tx, &statement).await.unwrap();
    assert_eq!(
        log_rows(&tx, &channel).await,
        2,
        "its rows, in its transaction"
    );
    tx.rollback().await.unwrap();
    assert_eq!(log_rows(&client, &channel).await, 0);
    assert_silent(&mut rx).await;

    // Committed: two rows (the large update has an envelope of its own), both updates,
    // the large one read from the log through its reference.
    let statement = pipe.statement_for(&updates).await.unwrap();
    let tx = client.transaction().await.unwrap();
    run(&tx, &statement).await.unwrap();
    tx.commit().await.unwrap();
    assert_eq!(log_rows(&client, &channel).await, 2);
    assert_eq!(receive_exactly(&mut rx, 2).await, updates);

    // Run again, the same statement is refused by the log: its numbers are taken.
    let tx = client.transaction().await.unwrap();
    let err = run(&tx, &statement).await.unwrap_err();
    assert_eq!(err.code(), Some(&SqlState::UNIQUE_VIOLATION), "{err}");
    tx.rollback().await.unwrap();
    assert_silent(&mut rx).await;
    listener.close().await.unwrap();
    pipe.close().await.unwrap();
}

/// The maddy layout's statement carries a channel per notification, NULL (the pipe's own)
/// for the envelopes: sent as text, the NULL stays a NULL, and the envelope arrives.
#[tokio::test]
async fn a_maddy_layout_statement_keeps_its_envelopes_on_the_pipes_channel() {
    let channel = unique("stmt_maddy");
    let maddy = |channel: &str| config_on(channel).with_layout(Layout::Maddy);
    let (listener, mut rx) = listening(maddy(&channel)).await;
    let pipe = PgPipe::new(maddy(&channel)).unwrap();
    // A mailbox no other test's maddy node opens.
    let update = new_message(7_770_001, 1);
    let statement = pipe
        .statement_for(std::slice::from_ref(&update))
        .await
        .unwrap();
    assert_eq!(statement.param_types(), ["text", "text[]", "text[]"]);
    assert_eq!(
        statement.text_params()[2],
        r#"{NULL,"__uint64_7770001"}"#,
        "the envelope on the pipe's channel, the copy on the mailbox's"
    );
    let mut client = support::sql().await;
    let tx = client.transaction().await.unwrap();
    run(&tx, &statement).await.unwrap();
    tx.commit().await.unwrap();
    assert_eq!(receive_exactly(&mut rx, 1).await, [update]);
    listener.close().await.unwrap();
    pipe.close().await.unwrap();
}

#[tokio::test]
async fn a_durable_statement_on_an_unmigrated_schema_is_the_schema_error() {
    let (database, config) = support::unmigrated_durable("stmt_unmigrated").await;
    let pipe = PgPipe::new(config).unwrap();
    let err = pipe.statement_for(&[new_message(1, 1)]).await.unwrap_err();
    assert!(
        matches!(err, Error::SchemaOutdated { found: None, .. }),
        "{err:?}"
    );
    pipe.close().await.unwrap();
    drop(database);
}
