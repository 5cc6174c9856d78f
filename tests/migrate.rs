//! Migrations against a real PostgreSQL: idempotent, safe to run concurrently, in a history
//! table of their own.

mod support;

use updatepipe::{MIGRATION_TABLE, PgPipe, embedded_migrations};

#[tokio::test]
async fn migrations_apply_once_even_when_run_concurrently() {
    let pipes: Vec<PgPipe> = (0..4)
        .map(|_| PgPipe::new(support::config("migrate")).unwrap())
        .collect();
    let runs = futures_util::future::join_all(pipes.iter().map(|p| p.migrate())).await;
    let mut applied = 0;
    for run in runs {
        applied += run.expect("a concurrent migrate succeeds").len();
    }
    // The binary's database is new (with DATABASE_URL too: see `support`): every migration
    // applied, each by one of the four.
    assert_eq!(applied, embedded_migrations().len());

    // Once more: nothing to do.
    assert!(pipes[0].migrate().await.unwrap().is_empty());

    let client = support::sql().await;
    let history: i64 = client
        .query_one(&format!("SELECT count(*) FROM {MIGRATION_TABLE}"), &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(history as usize, embedded_migrations().len());
    // The schema and the log table exist; refinery's default table name was not used.
    let log: Option<String> = client
        .query_one("SELECT to_regclass('updatepipe.log')::text", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(log.as_deref(), Some("updatepipe.log"));
    let default_table: Option<String> = client
        .query_one("SELECT to_regclass('refinery_schema_history')::text", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(default_table, None);
    // The history is in the updatepipe schema, where its owner can create it.
    assert_eq!(MIGRATION_TABLE, "updatepipe.schema_history");
    let public: Option<String> = client
        .query_one(
            "SELECT to_regclass('public.updatepipe_schema_history')::text",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(public, None);
}
