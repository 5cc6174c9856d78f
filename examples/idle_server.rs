//! An IMAP server feeding its IDLE sessions from one pipe through the hub: each session
//! watches the mailbox it has selected, gets that mailbox's updates in order, and reloads
//! the mailbox when told (a resync of the pipe, or the session fell behind). A session
//! that stops reading holds no other. To show a resync, the example kills the listener's
//! connection once; it reconnects by itself.
//!
//! Run with `cargo run --example idle_server`. Uses `DATABASE_URL` when set, otherwise a
//! throwaway PostgreSQL cluster from the local binaries.

use std::time::Duration;

use tokio::time::timeout;
use updatepipe::cluster::env_or_temp;
use updatepipe::{
    ChannelName, HubOptions, MailboxEvent, PgPipe, ReloadReason, SeqSet, Update, UpdateKind,
    UpdatePipe, Watch, WatchOptions,
};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    // The environment's database (DATABASE_URL, PG*), else a private cluster (blocking).
    let (base, cluster) = tokio::task::spawn_blocking(env_or_temp).await??;
    let suffix = format!("{:08x}", rand::random::<u32>());
    let config = base.with_channel(ChannelName::new(format!("idle_server_{suffix}"))?);
    // The server's pipe only listens, so its listener is the connection named
    // "<application name>/listen": the example finds it (and kills it) by that name.
    let name = format!("idle-server-{suffix}");
    let server = PgPipe::new(config.clone().with_application_name(&name))?;
    let hub = server.hub(HubOptions::default()).await?;

    // Three IDLE sessions: two on INBOX, one on Archive; and a fourth on INBOX whose
    // client went quiet (it never reads, with a small bound): it holds nobody up.
    let mut sessions = Vec::new();
    for (id, mailbox) in [(1, "INBOX"), (2, "INBOX"), (3, "Archive")] {
        let watch = hub.watch(mailbox).await?;
        sessions.push(tokio::spawn(idle_session(id, watch)));
    }
    let quiet = hub
        .watch_with("INBOX", WatchOptions::default().with_bound(2))
        .await?;

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
    wait_until(|| server.stats().delivered >= 4).await;

    // The listener's connection dies (a failover, a proxy restart...): it reconnects, and
    // since best-effort updates sent meanwhile are lost, every session reloads.
    let (client, connection) = config.connect().await?;
    let connection = tokio::spawn(connection);
    client
        .execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
             WHERE application_name = $1 || '/listen'",
            &[&name],
        )
        .await?;
    drop(client);
    let _ = connection.await;
    wait_until(|| server.stats().reconnects >= 1).await;
    pusher
        .push(&Update::expunge("INBOX", SeqSet::single(2)?))
        .await?;
    // Archive is deleted: its session's watch ends after the update.
    pusher.push(&Update::mailbox_destroyed("Archive")).await?;
    wait_until(|| server.stats().delivered >= 6).await;

    // The quiet session fell behind: one reload stands for what it missed.
    let mut quiet = quiet;
    while let Some(event) = quiet.try_recv() {
        println!("quiet session [INBOX]: {}", describe(&event));
    }
    println!(
        "hub: {} watches open, {} fell behind",
        hub.watches(),
        server.stats().watch_lagged
    );

    // Shut down: closing the pipe ends the hub, and with it every watch and session.
    pusher.close().await?;
    server.close().await?;
    let mut updates = 0;
    for session in sessions {
        updates += timeout(Duration::from_secs(5), session).await??;
    }
    if let Some(cluster) = cluster {
        tokio::task::spawn_blocking(move || drop(cluster)).await?;
    }
    // INBOX: 3 updates before the kill and 1 after, to two sessions; Archive: 1 and its end.
    anyhow::ensure!(
        updates == 10,
        "the sessions took {updates} updates, expected 10"
    );
    println!("ok: 10 updates to 3 sessions, one resync, one session lagged, clean shutdown");
    Ok(())
}

/// A simulated IDLE session: prints untagged responses as its client would see them, and
/// returns how many updates it took.
async fn idle_session(id: u32, mut watch: Watch) -> usize {
    let mailbox = watch.key().to_string();
    let mut updates = 0;
    while let Some(event) = watch.recv().await {
        updates += usize::from(matches!(event, MailboxEvent::Update(_)));
        println!("session {id} [{mailbox}]: {}", describe(&event));
    }
    println!("session {id} [{mailbox}]: closed");
    updates
}

/// The untagged response (or the reload) an event makes.
fn describe(event: &MailboxEvent) -> String {
    match event {
        MailboxEvent::Update(u) => match u.kind() {
            UpdateKind::NewMessage => format!("* EXISTS (UID {} is new)", u.seq_set()),
            UpdateKind::FlagsChanged => {
                let flags: Vec<_> = u.flags().iter().map(|f| f.as_str()).collect();
                format!("* FETCH (UID {} FLAGS ({}))", u.seq_set(), flags.join(" "))
            }
            UpdateKind::Expunge => format!("* {} EXPUNGE", u.seq_set()),
            _ => "* BYE mailbox deleted".to_owned(),
        },
        MailboxEvent::Reload(ReloadReason::Lagged { missed }) => {
            format!("(fell behind by {missed} updates: reloads the mailbox view)")
        }
        MailboxEvent::Reload(reason) => format!("(reloads the mailbox view: {reason:?})"),
    }
}

/// Polls `done` every 20 ms for at most 5 seconds.
async fn wait_until(done: impl Fn() -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while !done() && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
