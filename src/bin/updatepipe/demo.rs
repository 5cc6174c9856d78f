//! `updatepipe demo`: two nodes and an admin tool exchange updates through PostgreSQL.

use crate::output::outln;
use std::time::Duration;

use tokio::sync::mpsc;
use updatepipe::{
    ChannelName, Config, Error, Layout, MailboxKey, PgPipe, SeqSet, Update, UpdatePipe,
};

/// Two nodes and an admin tool, through one PostgreSQL.
pub async fn run(base: Config, channel: Option<ChannelName>) -> anyhow::Result<()> {
    // By default a channel of its own, so the demo never disturbs real listeners.
    let channel = match channel {
        Some(channel) => channel,
        None => ChannelName::new(format!("updatepipe_demo_{:08x}", rand::random::<u32>()))?,
    };
    let config = base
        .with_channel(channel.clone())
        .with_application_name("updatepipe-demo");
    outln!("Channel: {}\n", channel.as_str());

    let a = PgPipe::new(config.clone())?;
    let b = PgPipe::new(config.clone())?;
    let admin = PgPipe::new(config.clone())?;
    let (a_tx, mut a_rx) = mpsc::channel(64);
    let (b_tx, mut b_rx) = mpsc::channel(64);
    a.listen(a_tx).await?;
    b.listen(b_tx).await?;
    outln!("node A listening (origin {})", a.origin());
    outln!("node B listening (origin {})\n", b.origin());

    let mut nodes = [("node A", &a, &mut a_rx), ("node B", &b, &mut b_rx)];

    outln!("node A pushes a new message in INBOX:");
    let update = Update::new_message("INBOX", SeqSet::single(1)?);
    a.push(&update).await?;
    show(&mut nodes, &[0, 1]).await;

    outln!("node B pushes a flag change in mailbox 42:");
    let update = Update::flags_changed(42, 1, ["\\Seen".parse()?])?;
    b.push(&update).await?;
    show(&mut nodes, &[1, 0]).await;

    outln!("the admin tool stores a message and pushes inside the same transaction:");
    let (mut client, connection) = config.connect().await?;
    let connection = tokio::spawn(connection);
    client
        .batch_execute(
            "CREATE TEMP TABLE pg_temp.messages \
             (mailbox pg_catalog.text, uid pg_catalog.int4, body pg_catalog.text)",
        )
        .await
        .map_err(Error::from)?;
    let tx = client.transaction().await.map_err(Error::from)?;
    tx.execute(
        "INSERT INTO pg_temp.messages VALUES ('Archive', 7, 'hello')",
        &[],
    )
    .await
    .map_err(Error::from)?;
    admin
        .push_in(&tx, &Update::new_message("Archive", SeqSet::single(7)?))
        .await?;
    outln!("  (before COMMIT nobody has it)");
    silent(&mut nodes).await;
    tx.commit().await.map_err(Error::from)?;
    outln!("  COMMIT");
    show(&mut nodes, &[1, 1]).await;

    outln!("the admin tool expunges inside a transaction, then rolls it back:");
    let tx = client.transaction().await.map_err(Error::from)?;
    admin
        .push_in(&tx, &Update::expunge("Archive", SeqSet::single(7)?))
        .await?;
    tx.rollback().await.map_err(Error::from)?;
    outln!("  ROLLBACK");
    silent(&mut nodes).await;
    drop(client);
    let _ = connection.await;

    outln!("\nSummary:");
    let mut own_received = false;
    for (name, pipe, _) in &nodes {
        let stats = pipe.stats();
        outln!(
            "  {name}: pushed {}, received {} from others, dropped {} of its own",
            stats.pushed,
            stats.delivered,
            stats.echoes_dropped
        );
        own_received |= stats.echoes_dropped != stats.pushed;
    }
    a.close().await?;
    b.close().await?;
    admin.close().await?;
    if own_received {
        anyhow::bail!("a node did not drop one of its own updates");
    }
    outln!("No node received its own updates.");
    Ok(())
}

type Node<'a> = (&'static str, &'a PgPipe, &'a mut mpsc::Receiver<Update>);

/// Prints what each node receives: `expected[i]` updates for node `i`.
async fn show(nodes: &mut [Node<'_>], expected: &[usize]) {
    for ((name, _, rx), &n) in nodes.iter_mut().zip(expected) {
        for _ in 0..n {
            match tokio::time::timeout(Duration::from_secs(5), rx.recv()).await {
                Ok(Some(update)) => outln!("  {name} received {}", update.to_json()),
                _ => outln!("  {name} received nothing (unexpected!)"),
            }
        }
        if n == 0 {
            outln!("  {name} received nothing: it sent this one itself");
        }
    }
    silent(nodes).await;
    outln!();
}

/// Waits briefly and reports any update that arrives (none should).
async fn silent(nodes: &mut [Node<'_>]) {
    tokio::time::sleep(Duration::from_millis(200)).await;
    for (name, _, rx) in nodes.iter_mut() {
        while let Ok(update) = rx.try_recv() {
            outln!("  {name} received {} (unexpected!)", update.to_json());
        }
    }
}

/// A maddy node as the demo plays it: a plain connection that LISTENs on a mailbox's
/// channel and NOTIFYs in maddy's form, `<pid>-<pointer>;<json with ';' as 0x10>\n`.
struct MaddyNode {
    id: String,
    client: tokio_postgres::Client,
    heard: mpsc::UnboundedReceiver<String>,
    task: tokio::task::JoinHandle<()>,
}

impl MaddyNode {
    async fn start(config: &Config, mailbox: &MailboxKey) -> anyhow::Result<MaddyNode> {
        let (client, mut connection) = config.connect().await?;
        let (tx, heard) = mpsc::unbounded_channel();
        let task = tokio::spawn(async move {
            while let Some(Ok(message)) =
                std::future::poll_fn(|cx| connection.poll_message(cx)).await
            {
                if let tokio_postgres::AsyncMessage::Notification(n) = message {
                    let _ = tx.send(n.payload().to_owned());
                }
            }
        });
        let channel = mailbox.maddy_channel()?;
        client
            .batch_execute(&format!("LISTEN {}", channel.quoted()))
            .await
            .map_err(Error::from)?;
        Ok(MaddyNode {
            id: format!("{}-0xc000010000", std::process::id()),
            client,
            heard,
            task,
        })
    }

    async fn push(&self, update: &Update) -> anyhow::Result<()> {
        let channel = update.key().maddy_channel()?;
        let payload = format!("{};{}\n", self.id, update.to_json().replace(';', "\u{10}"));
        self.client
            .execute(
                "SELECT pg_catalog.pg_notify($1, $2)",
                &[&channel.as_str(), &payload],
            )
            .await
            .map_err(Error::from)?;
        Ok(())
    }

    /// Prints what it hears within a moment, as maddy would read it (its own dropped).
    async fn show(&mut self) {
        let (mut heard, mut own) = (0, 0);
        while let Ok(Some(payload)) =
            tokio::time::timeout(Duration::from_millis(500), self.heard.recv()).await
        {
            let (sender, json) = payload.split_once(';').unwrap_or(("", &payload));
            if sender == self.id {
                own += 1;
                continue;
            }
            heard += 1;
            outln!(
                "  maddy node received from {sender}: {}",
                json.replace('\u{10}', ";").trim_end()
            );
        }
        if own > 0 {
            outln!("  maddy node received nothing: it sent this one itself");
        } else if heard == 0 {
            outln!("  maddy node received nothing");
        }
    }
}

/// `updatepipe demo --layout maddy`: a maddy-format node on mailbox 42 among two updatepipe
/// nodes in the maddy layout.
pub async fn run_maddy(base: Config, channel: Option<ChannelName>) -> anyhow::Result<()> {
    let channel = match channel {
        Some(channel) => channel,
        None => ChannelName::new(format!("updatepipe_demo_{:08x}", rand::random::<u32>()))?,
    };
    let config = base
        .with_channel(channel.clone())
        .with_application_name("updatepipe-demo")
        .with_layout(Layout::Maddy);
    let mailbox = MailboxKey::Id(42);
    outln!(
        "Shared channel: {} (updatepipe's envelopes); mailbox 42's maddy channel: {}\n",
        channel.as_str(),
        mailbox.maddy_channel()?
    );
    let a = PgPipe::new(config.clone())?;
    let b = PgPipe::new(config.clone())?;
    let (a_tx, mut a_rx) = mpsc::channel(64);
    let (b_tx, mut b_rx) = mpsc::channel(64);
    a.listen(a_tx).await?;
    b.listen(b_tx).await?;
    a.subscribe(mailbox.clone()).await?;
    b.subscribe(mailbox.clone()).await?;
    let mut maddy = MaddyNode::start(&config, &mailbox).await?;
    outln!("updatepipe node A and node B listening, both subscribed to mailbox 42");
    outln!("maddy node {} has mailbox 42 open\n", maddy.id);

    let mut nodes = [("node A", &a, &mut a_rx), ("node B", &b, &mut b_rx)];

    outln!("updatepipe node A pushes a new message in mailbox 42:");
    a.push(&Update::new_message(42, SeqSet::single(1)?)).await?;
    show(&mut nodes, &[0, 1]).await;
    maddy.show().await;
    outln!(
        "  (node B got the envelope on the shared channel, once; it dropped A's copy for maddy)\n"
    );

    outln!("the maddy node pushes a flag change in mailbox 42:");
    maddy
        .push(&Update::flags_changed(42, 1, ["\\Seen".parse()?])?)
        .await?;
    show(&mut nodes, &[1, 1]).await;
    maddy.show().await;
    outln!();

    outln!("updatepipe node B pushes to mailbox 43, which nobody has open in maddy:");
    b.push(&Update::mailbox_destroyed(43)).await?;
    show(&mut nodes, &[1, 0]).await;
    maddy.show().await;

    maddy.task.abort();
    a.close().await?;
    b.close().await?;
    outln!("\nNo node received its own updates; maddy heard only updates, in its own form.");
    Ok(())
}
