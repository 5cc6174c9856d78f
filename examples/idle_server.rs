//! An IMAP server loop feeding IDLE sessions from the listener: `listen_events` delivers
//! updates and connection events in one ordered stream; a router sends each update to the
//! sessions of its mailbox and, on a resync, tells every session to reload. To show a
//! resync, the example kills the listener's connection once; it reconnects by itself.
//!
//! Run with `cargo run --example idle_server`. Uses `DATABASE_URL` when set, otherwise a
//! throwaway PostgreSQL cluster from the local binaries.

use std::collections::HashMap;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio::time::timeout;
use updatepipe::cluster::env_or_temp;
use updatepipe::{ChannelName, Event, MailboxKey, PgPipe, SeqSet, Update, UpdateKind, UpdatePipe};

/// What the router tells an IDLE session.
enum ToSession {
    Update(Update),
    Reload,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    // The environment's database (DATABASE_URL, PG*), else a private cluster (blocking).
    let (base, cluster) = tokio::task::spawn_blocking(env_or_temp).await??;
    let suffix = format!("{:08x}", rand::random::<u32>());
    let config = base.with_channel(ChannelName::new(format!("idle_server_{suffix}"))?);
    // The server's pipe only listens, so its one connection is the listener's: a unique
    // application_name lets the example find it (and kill it) in pg_stat_activity.
    let name = format!("idle-server-{suffix}");
    let server = PgPipe::new(config.clone().with_application_name(&name))?;
    let (events_tx, mut events) = mpsc::channel(256);
    server.listen_events(events_tx).await?;

    // Three IDLE sessions: two on INBOX, one on Archive.
    let mut routes: HashMap<MailboxKey, Vec<mpsc::Sender<ToSession>>> = HashMap::new();
    let mut sessions = Vec::new();
    for (id, mailbox) in [(1, "INBOX"), (2, "INBOX"), (3, "Archive")] {
        let (tx, rx) = mpsc::channel(64);
        routes.entry(mailbox.into()).or_default().push(tx);
        sessions.push(tokio::spawn(idle_session(id, mailbox, rx)));
    }

    // The router: runs until the pipe is closed (the event channel then ends).
    let router = tokio::spawn(async move {
        let mut routed = 0;
        while let Some(event) = events.recv().await {
            match event {
                Event::Update(update) => {
                    for session in routes.get(update.key()).into_iter().flatten() {
                        let _ = session.send(ToSession::Update(update.clone())).await;
                    }
                    routed += 1;
                }
                Event::Resync(reason) => {
                    println!("router: resync ({reason:?}): every session reloads");
                    for session in routes.values().flatten() {
                        let _ = session.send(ToSession::Reload).await;
                    }
                }
                other => println!("router: {other:?}"),
            }
        }
        routed // dropping `routes` here ends every session
    });

    // Another server pushes a few updates, in one transaction.
    let pusher = PgPipe::new(config.clone())?;
    pusher
        .push_many(&[
            Update::new_message("INBOX", SeqSet::single(1)?),
            Update::new_message("INBOX", SeqSet::single(2)?),
            Update::new_message("Archive", SeqSet::single(1)?),
            Update::flags_changed("INBOX", 1, ["\\Seen".parse()?])?,
        ])
        .await?;
    // Wait (bounded) until the listener has taken all four off its connection.
    wait_until(|| server.stats().delivered >= 4).await;

    // The listener's connection dies (a failover, a proxy restart...): it reconnects, and
    // since best-effort updates sent meanwhile are lost, it asks for a resync.
    let (client, connection) = config.connect().await?;
    let connection = tokio::spawn(connection);
    client
        .execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = $1",
            &[&name],
        )
        .await?;
    drop(client);
    let _ = connection.await;
    // Once the listener is back, push once more.
    wait_until(|| server.stats().reconnects >= 1).await;
    pusher
        .push(&Update::expunge("INBOX", SeqSet::single(2)?))
        .await?;
    wait_until(|| server.stats().delivered >= 5).await;

    // Shut down: close() ends the event channel, so the router and then the sessions end.
    pusher.close().await?;
    server.close().await?;
    let routed = timeout(Duration::from_secs(5), router).await??;
    for session in sessions {
        timeout(Duration::from_secs(5), session).await??;
    }
    if let Some(cluster) = cluster {
        tokio::task::spawn_blocking(move || drop(cluster)).await?;
    }
    anyhow::ensure!(routed == 5, "routed {routed} updates, expected 5");
    println!("ok: 5 updates routed, one resync, clean shutdown");
    Ok(())
}

/// A simulated IDLE session: prints untagged responses as its client would see them.
async fn idle_session(id: u32, mailbox: &'static str, mut rx: mpsc::Receiver<ToSession>) {
    let mut exists = 0u32; // messages in the session's view of the mailbox
    while let Some(message) = rx.recv().await {
        let line = match message {
            ToSession::Reload => "(reloads the mailbox view from the store)".to_owned(),
            ToSession::Update(u) => match u.kind() {
                UpdateKind::NewMessage => {
                    exists += 1; // one new message per update in this example
                    format!("* {exists} EXISTS")
                }
                UpdateKind::FlagsChanged => {
                    let flags: Vec<_> = u.flags().iter().map(|f| f.as_str()).collect();
                    format!("* FETCH (UID {} FLAGS ({}))", u.seq_set(), flags.join(" "))
                }
                UpdateKind::Expunge => format!("* {} EXPUNGE", u.seq_set()),
                _ => "* BYE mailbox gone".to_owned(),
            },
        };
        println!("session {id} [{mailbox}]: {line}");
    }
    println!("session {id} [{mailbox}]: closed");
}

/// Polls `done` every 20 ms for at most 5 seconds.
async fn wait_until(done: impl Fn() -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while !done() && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
