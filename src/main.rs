//! The `updatepipe` command: a thin layer over the library.

use std::io::{BufRead, Write};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand};
use tokio::sync::mpsc;
use updatepipe::cluster::TempCluster;
use updatepipe::{ChannelName, Config, Error, PgPipe, SeqSet, Update, UpdatePipe};

/// Carries IMAP mailbox updates between processes through PostgreSQL LISTEN/NOTIFY.
///
/// The connection comes from --url, else DATABASE_URL, else the standard PG* variables
/// (PGHOST, PGPORT, PGUSER, PGPASSWORD, PGDATABASE, ...).
#[derive(Parser, Debug)]
#[command(name = "updatepipe", version, propagate_version = true)]
struct Cli {
    /// PostgreSQL URL (postgres://user:password@host:port/db) or key=value string.
    #[arg(long, global = true, value_name = "URL")]
    url: Option<String>,

    /// The channel updates travel on.
    #[arg(long, global = true, value_name = "NAME", default_value = ChannelName::DEFAULT)]
    channel: String,

    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Print every update other senders push, one JSON line each, until interrupted.
    ///
    /// Example: updatepipe listen --channel imap_updates
    Listen,

    /// Push updates and exit once they are committed.
    ///
    /// Give one update as JSON, or none to read one JSON update per line from standard
    /// input; all of them are sent in one transaction, and nothing is sent if any is
    /// invalid.
    ///
    /// Examples:
    ///   updatepipe push '{"Type":0,"Key":42,"SeqSet":"7"}'
    ///   printf '%s\n' '{"Type":2,"Key":42,"SeqSet":"3:5"}' '{"Type":3,"Key":7}' | updatepipe push
    Push {
        /// One update in the JSON contract: {"Type":1,"Key":42,"SeqSet":"17","NewFlags":["\\Seen"]}.
        json: Option<String>,
    },

    /// Apply updatepipe's schema migrations (safe to repeat).
    Migrate,

    /// Show two nodes and an admin tool exchanging updates through PostgreSQL.
    ///
    /// Uses --url or DATABASE_URL when given; otherwise starts a throwaway PostgreSQL
    /// cluster from the local installation and removes it afterwards.
    Demo,
}

/// Exit codes: distinct for bad input, connection failure and server errors.
mod exit {
    pub const FAILURE: u8 = 1;
    pub const BAD_INPUT: u8 = 2;
    pub const CONNECTION: u8 = 3;
    pub const SERVER: u8 = 4;
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("updatepipe: cannot start the runtime: {e}");
            return ExitCode::from(exit::FAILURE);
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("updatepipe: {}", one_line(&e));
            ExitCode::from(exit_code(&e))
        }
    }
}

/// The error and its causes on one line, without repeating a cause the message already
/// tells.
fn one_line(e: &anyhow::Error) -> String {
    let mut line = String::new();
    for cause in e.chain() {
        let text = cause.to_string();
        if line.contains(&text) {
            continue;
        }
        if !line.is_empty() {
            line.push_str(": ");
        }
        line.push_str(&text);
    }
    line
}

fn exit_code(e: &anyhow::Error) -> u8 {
    match e.downcast_ref::<Error>() {
        Some(e) if e.is_invalid_input() => exit::BAD_INPUT,
        Some(e) if e.is_connection() => exit::CONNECTION,
        Some(Error::Postgres(_) | Error::Migrate(_)) => exit::SERVER,
        Some(_) => exit::FAILURE,
        None if e.downcast_ref::<updatepipe::UpdateError>().is_some() => exit::BAD_INPUT,
        None => exit::FAILURE,
    }
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    let channel = ChannelName::new(&cli.channel)?;
    match cli.command {
        Command::Listen => listen(config(cli.url.as_deref())?.with_channel(channel)).await,
        Command::Push { json } => {
            push(config(cli.url.as_deref())?.with_channel(channel), json).await
        }
        Command::Migrate => {
            let pipe = PgPipe::new(config(cli.url.as_deref())?)?;
            let applied = pipe.migrate().await?;
            if applied.is_empty() {
                println!("schema is up to date");
            }
            for m in applied {
                println!("applied V{}__{}", m.version(), m.name());
            }
            pipe.close().await?;
            Ok(())
        }
        Command::Demo => demo(cli.url).await,
    }
}

fn config(url: Option<&str>) -> Result<Config, Error> {
    match url {
        Some(url) => Config::from_url(url),
        None => Config::from_env(),
    }
}

async fn listen(config: Config) -> anyhow::Result<()> {
    let pipe = PgPipe::new(config)?;
    let (tx, mut rx) = mpsc::channel(1024);
    pipe.listen(tx).await?;
    eprintln!(
        "updatepipe: listening on channel {:?}",
        pipe.config().channel().as_str()
    );
    let mut stdout = std::io::stdout();
    let outcome = loop {
        tokio::select! {
            update = rx.recv() => match update {
                Some(update) => {
                    let line = update.to_json();
                    if writeln!(stdout, "{line}").and_then(|()| stdout.flush()).is_err() {
                        // Standard output is gone (a closed pipe): stop quietly.
                        break Ok(());
                    }
                }
                None => break Err(anyhow::anyhow!(
                    "the listener stopped: its connection to PostgreSQL was lost (see the log above)"
                )),
            },
            () = shutdown_signal() => break Ok(()),
        }
    };
    pipe.close().await?;
    outcome
}

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(term) => term,
                Err(_) => {
                    let _ = ctrl_c.await;
                    return;
                }
            };
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
}

async fn push(config: Config, json: Option<String>) -> anyhow::Result<()> {
    let updates = match json {
        Some(json) => vec![Update::from_json(&json).map_err(Error::from)?],
        None => read_updates(std::io::stdin().lock())?,
    };
    if updates.is_empty() {
        return Err(
            Error::Config("no update given (pass one as JSON or pipe JSON lines)".into()).into(),
        );
    }
    let pipe = PgPipe::new(config)?;
    let pushed = pipe.push_many(&updates).await;
    pipe.close().await?;
    pushed?;
    eprintln!("updatepipe: pushed {} update(s)", updates.len());
    Ok(())
}

/// One update per non-empty line; the first bad line is an error naming its number.
fn read_updates(input: impl BufRead) -> anyhow::Result<Vec<Update>> {
    let mut updates = Vec::new();
    for (i, line) in input.lines().enumerate() {
        let line = line.context("cannot read standard input")?;
        if line.trim().is_empty() {
            continue;
        }
        let update = Update::from_json(line.trim())
            .map_err(Error::from)
            .with_context(|| format!("line {}", i + 1))?;
        updates.push(update);
    }
    Ok(updates)
}

/// Two nodes and an admin tool, through one PostgreSQL.
async fn demo(url: Option<String>) -> anyhow::Result<()> {
    let mut cluster = None;
    let base = match url {
        Some(url) => Config::from_url(&url)?,
        None if Config::env_names_database() => Config::from_env()?,
        None => {
            println!("No DATABASE_URL: starting a throwaway PostgreSQL cluster...");
            let started = tokio::task::spawn_blocking(TempCluster::start).await??;
            println!(
                "  PostgreSQL is up on 127.0.0.1:{} (removed when the demo ends)",
                started.port()
            );
            let config = started.config();
            cluster = Some(started);
            config
        }
    };
    // A channel of its own, so the demo never disturbs real listeners.
    let channel = ChannelName::new(format!("updatepipe_demo_{:08x}", rand::random::<u32>()))?;
    let config = base
        .with_channel(channel.clone())
        .with_application_name("updatepipe-demo");
    println!("Channel: {}\n", channel.as_str());

    let a = PgPipe::new(config.clone())?;
    let b = PgPipe::new(config.clone())?;
    let admin = PgPipe::new(config.clone())?;
    let (a_tx, mut a_rx) = mpsc::channel(64);
    let (b_tx, mut b_rx) = mpsc::channel(64);
    a.listen(a_tx).await?;
    b.listen(b_tx).await?;
    println!("node A listening (origin {})", a.origin());
    println!("node B listening (origin {})\n", b.origin());

    let mut nodes = [("node A", &a, &mut a_rx), ("node B", &b, &mut b_rx)];

    println!("node A pushes a new message in INBOX:");
    let update = Update::new_message("INBOX", SeqSet::single(1)?);
    a.push(&update).await?;
    show(&mut nodes, &[0, 1]).await;

    println!("node B pushes a flag change in mailbox 42:");
    let update = Update::flags_changed(42, 1, ["\\Seen".parse()?])?;
    b.push(&update).await?;
    show(&mut nodes, &[1, 0]).await;

    println!("the admin tool stores a message and pushes inside the same transaction:");
    let (mut client, connection) = config
        .pg()
        .connect(tokio_postgres::NoTls)
        .await
        .map_err(Error::Connect)?;
    let connection = tokio::spawn(connection);
    client
        .batch_execute("CREATE TEMP TABLE messages (mailbox text, uid int, body text)")
        .await
        .map_err(Error::from)?;
    let tx = client.transaction().await.map_err(Error::from)?;
    tx.execute("INSERT INTO messages VALUES ('Archive', 7, 'hello')", &[])
        .await
        .map_err(Error::from)?;
    admin
        .push_in(&tx, &Update::new_message("Archive", SeqSet::single(7)?))
        .await?;
    println!("  (before COMMIT nobody has it)");
    silent(&mut nodes).await;
    tx.commit().await.map_err(Error::from)?;
    println!("  COMMIT");
    show(&mut nodes, &[1, 1]).await;

    println!("the admin tool expunges inside a transaction, then rolls it back:");
    let tx = client.transaction().await.map_err(Error::from)?;
    admin
        .push_in(&tx, &Update::expunge("Archive", SeqSet::single(7)?))
        .await?;
    tx.rollback().await.map_err(Error::from)?;
    println!("  ROLLBACK");
    silent(&mut nodes).await;
    drop(client);
    let _ = connection.await;

    println!("\nSummary:");
    let mut own_received = false;
    for (name, pipe, _) in &nodes {
        let stats = pipe.stats();
        println!(
            "  {name}: pushed {}, received {} from others, dropped {} of its own",
            stats.pushed, stats.delivered, stats.echoes_dropped
        );
        own_received |= stats.echoes_dropped != stats.pushed;
    }
    a.close().await?;
    b.close().await?;
    admin.close().await?;
    drop(cluster);
    if own_received {
        anyhow::bail!("a node did not drop one of its own updates");
    }
    println!("No node received its own updates.");
    Ok(())
}

type Node<'a> = (&'static str, &'a PgPipe, &'a mut mpsc::Receiver<Update>);

/// Prints what each node receives: `expected[i]` updates for node `i`.
async fn show(nodes: &mut [Node<'_>], expected: &[usize]) {
    for ((name, _, rx), &n) in nodes.iter_mut().zip(expected) {
        for _ in 0..n {
            match tokio::time::timeout(Duration::from_secs(5), rx.recv()).await {
                Ok(Some(update)) => println!("  {name} received {}", update.to_json()),
                _ => println!("  {name} received nothing (unexpected!)"),
            }
        }
        if n == 0 {
            println!("  {name} received nothing: it sent this one itself");
        }
    }
    silent(nodes).await;
    println!();
}

/// Waits briefly and reports any update that arrives (none should).
async fn silent(nodes: &mut [Node<'_>]) {
    tokio::time::sleep(Duration::from_millis(200)).await;
    for (name, _, rx) in nodes.iter_mut() {
        while let Ok(update) = rx.try_recv() {
            println!("  {name} received {} (unexpected!)", update.to_json());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_json_lines_and_names_the_bad_one() {
        let ok = "{\"Type\":0,\"Key\":1}\n\n{\"Type\":3,\"Key\":\"x\"}\n";
        assert_eq!(read_updates(ok.as_bytes()).unwrap().len(), 2);
        let bad = "{\"Type\":0,\"Key\":1}\n{\"Type\":9,\"Key\":1}\n";
        let err = read_updates(bad.as_bytes()).unwrap_err();
        assert!(
            one_line(&err).starts_with("line 2: unknown update type 9"),
            "{err:#}"
        );
        assert_eq!(exit_code(&err), exit::BAD_INPUT);
    }

    #[test]
    fn cli_parses() {
        Cli::command_check();
    }

    impl Cli {
        fn command_check() {
            use clap::CommandFactory;
            Cli::command().debug_assert();
        }
    }
}
