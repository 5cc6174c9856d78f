//! A PostgreSQL-backed mail store that announces new messages with `push_in`, inside the
//! very transaction that stores them: a committed message is announced, a rolled-back one
//! never is. A second pipe plays another IMAP server and prints what it hears.
//!
//! Run with `cargo run --example mail_store`. Uses `DATABASE_URL` when set, otherwise a
//! throwaway PostgreSQL cluster from the local binaries.

use std::time::Duration;

use tokio::sync::mpsc;
use tokio_postgres::Client;
use updatepipe::cluster::env_or_temp;
use updatepipe::{ChannelName, PgPipe, SeqSet, Update, UpdatePipe};

/// The mailbox every message of this example goes to.
const INBOX: u64 = 42;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    // The environment's database (DATABASE_URL, PG*), else a private cluster (blocking).
    let (base, cluster) = tokio::task::spawn_blocking(env_or_temp).await??;
    // A channel of our own, so that the example never disturbs real listeners.
    let channel = ChannelName::new(format!("mail_store_{:08x}", rand::random::<u32>()))?;
    let config = base.with_channel(channel);

    // Another IMAP server: it listens, and prints what the store announces.
    let server = PgPipe::new(config.clone())?;
    let (updates_tx, mut updates) = mpsc::channel(64);
    server.listen(updates_tx).await?;

    // The mail store: its own connection (as a real store has) and its own pipe.
    let store = PgPipe::new(config.clone())?;
    let (mut client, connection) = config.connect().await?;
    let connection = tokio::spawn(connection);
    // A TEMP table lives in this session only: it can never collide with anything.
    client
        .batch_execute("CREATE TEMP TABLE messages (mailbox bigint, uid int, body text)")
        .await?;

    // Two committed messages and, between them, one that is rolled back.
    let uid = deliver(&mut client, &store, "Hello!", true).await?;
    println!("store: committed uid {uid}");
    let uid = deliver(&mut client, &store, "Spam, rolled back", false).await?;
    println!("store: rolled back uid {uid} (its update must never arrive)");
    let uid = deliver(&mut client, &store, "Meeting at 10", true).await?;
    println!("store: committed uid {uid}");

    // The server receives exactly the committed ones, in commit order. Bounded waits: the
    // example always ends.
    let mut received = Vec::new();
    while let Ok(Some(update)) = tokio::time::timeout(Duration::from_secs(2), updates.recv()).await
    {
        println!("server: received {}", update.to_json());
        received.push(update);
        if received.len() == 2 {
            // Wait a little longer: anything more (the rolled-back one) would be a bug.
            if let Ok(Some(extra)) =
                tokio::time::timeout(Duration::from_millis(500), updates.recv()).await
            {
                anyhow::bail!("unexpected update {}", extra.to_json());
            }
            break;
        }
    }
    let stored: i64 = client
        .query_one("SELECT count(*) FROM messages", &[])
        .await?
        .get(0);
    println!(
        "store holds {stored} messages; the server heard of {}",
        received.len()
    );

    // Clean up: the pipes (tasks and connections), the store's connection, the cluster.
    server.close().await?;
    store.close().await?;
    drop(client);
    let _ = connection.await;
    if let Some(cluster) = cluster {
        tokio::task::spawn_blocking(move || drop(cluster)).await?;
    }
    anyhow::ensure!(
        received.len() == 2 && stored == 2,
        "store and server disagree"
    );
    println!("ok: every committed message was announced, the rolled-back one never was");
    Ok(())
}

/// Stores a message in `INBOX` and announces it in the same transaction; commits when
/// `commit`, rolls back otherwise. Returns the UID it was given.
async fn deliver(
    client: &mut Client,
    store: &PgPipe,
    body: &str,
    commit: bool,
) -> anyhow::Result<u32> {
    let tx = client.transaction().await?;
    // The next UID of the mailbox (a real store keeps a per-mailbox counter).
    let row = tx
        .query_one(
            "INSERT INTO messages (mailbox, uid, body) \
             SELECT $1, coalesce(max(uid), 0) + 1, $2 FROM messages WHERE mailbox = $1 \
             RETURNING uid",
            &[&(INBOX as i64), &body],
        )
        .await?;
    let uid: i32 = row.get(0);
    let uid = u32::try_from(uid)?;
    // The NOTIFY joins this transaction: it is sent on COMMIT, and dropped on ROLLBACK.
    store
        .push_in(&tx, &Update::new_message(INBOX, SeqSet::single(uid)?))
        .await?;
    if commit {
        tx.commit().await?;
    } else {
        tx.rollback().await?;
    }
    Ok(uid)
}
