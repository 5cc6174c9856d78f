//! An admin tool that reuses the application's deadpool-postgres pool: it takes a pooled
//! client, changes a message's flags in a transaction and announces the change with
//! `push_in` in that same transaction. An IMAP server's listener prints what arrives.
//!
//! Run with `cargo run --example admin_tool`. Uses `DATABASE_URL` when set, otherwise a
//! throwaway PostgreSQL cluster from the local binaries.

use std::time::Duration;

use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod};
use tokio::sync::mpsc;
use updatepipe::cluster::env_or_temp;
use updatepipe::{ChannelName, Flag, PgPipe, Update, UpdatePipe};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    // The environment's database (DATABASE_URL, PG*), else a private cluster (blocking).
    let (base, cluster) = tokio::task::spawn_blocking(env_or_temp).await??;
    let suffix = format!("{:08x}", rand::random::<u32>());
    let config = base.with_channel(ChannelName::new(format!("admin_tool_{suffix}"))?);

    // The application's pool, built the way the application builds it.
    let manager = Manager::from_config(
        config.pg().clone(),
        config.tls_connector()?,
        ManagerConfig {
            recycling_method: RecyclingMethod::Fast,
        },
    );
    let pool = Pool::builder(manager).max_size(4).build()?;

    // The application's store. Pooled sessions come and go, so a TEMP table would not be
    // seen by the next client: a uniquely named table, dropped at the end, instead.
    let table = format!("admin_tool_flags_{suffix}");
    pool.get()
        .await?
        .batch_execute(&format!(
            "CREATE TABLE {table} (mailbox bigint, uid int, flags text[], PRIMARY KEY (mailbox, uid));
             INSERT INTO {table} VALUES (7, 1, ARRAY[]::text[]), (7, 2, ARRAY['\\Seen'])"
        ))
        .await?;

    // An IMAP server somewhere: it listens and prints.
    let server = PgPipe::new(config.clone())?;
    let (updates_tx, mut updates) = mpsc::channel(16);
    server.listen(updates_tx).await?;

    // The admin tool: a pipe of its own (it never opens connections for `push_in`).
    let admin = PgPipe::new(config)?;
    let (mailbox, uid) = (7u64, 1u32);
    let new_flags = ["\\Seen", "\\Flagged", "$Important"];

    let mut client = pool.get().await?;
    // deadpool's `Transaction` wraps tokio_postgres's and derefs to it.
    let tx = client.transaction().await?;
    let row = tx
        .query_one(
            &format!(
                "UPDATE {table} SET flags = $3 WHERE mailbox = $1 AND uid = $2 RETURNING flags"
            ),
            &[&(mailbox as i64), &(uid as i32), &&new_flags[..]],
        )
        .await?;
    let flags: Vec<String> = row.get(0);
    let update = Update::flags_changed(
        mailbox,
        uid,
        flags.iter().map(Flag::new).collect::<Result<Vec<_>, _>>()?,
    )?;
    // `&*tx` is a `&tokio_postgres::Transaction`, which is a `tokio_postgres::GenericClient`
    // (deadpool's own `Transaction` implements only deadpool's `GenericClient`).
    admin.push_in(&*tx, &update).await?;
    println!("admin: set flags of uid {uid} in mailbox {mailbox} to {flags:?}");
    // Nothing is sent before the commit.
    let early = tokio::time::timeout(Duration::from_millis(300), updates.recv()).await;
    anyhow::ensure!(early.is_err(), "an update arrived before COMMIT");
    tx.commit().await?;
    println!("admin: COMMIT");

    // Outside a transaction: `&**client` is the pooled `tokio_postgres::Client`; the update
    // commits at once.
    let expunged = Update::expunge(mailbox, updatepipe::SeqSet::single(2)?);
    client
        .execute(
            &format!("DELETE FROM {table} WHERE mailbox = 7 AND uid = 2"),
            &[],
        )
        .await?;
    admin.push_in(&**client, &expunged).await?;
    println!("admin: deleted uid 2 and pushed on the pooled client (autocommit)");
    drop(client); // back to the pool

    let mut received = Vec::new();
    while received.len() < 2 {
        match tokio::time::timeout(Duration::from_secs(3), updates.recv()).await {
            Ok(Some(update)) => {
                println!("server: received {}", update.to_json());
                received.push(update);
            }
            _ => break,
        }
    }

    // Clean up: the table, the pipes, the pool, the cluster.
    pool.get()
        .await?
        .batch_execute(&format!("DROP TABLE {table}"))
        .await?;
    server.close().await?;
    admin.close().await?;
    pool.close();
    if let Some(cluster) = cluster {
        tokio::task::spawn_blocking(move || drop(cluster)).await?;
    }
    anyhow::ensure!(
        received == [update, expunged],
        "the server heard {received:?}"
    );
    println!("ok: the server heard both admin changes, in order");
    Ok(())
}
