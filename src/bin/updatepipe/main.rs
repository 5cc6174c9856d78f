//! The `updatepipe` command: a thin layer over the library.

use std::io::{BufRead, Write};
use std::path::PathBuf;
use std::process::ExitCode;

/// mimalloc: pushes allocate on one thread and their batches are freed on another, which
/// glibc's allocator does slowly (docs/operations.md, section 4).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

mod bench;
mod demo;

use anyhow::Context;
use clap::{Parser, Subcommand};
use tokio::sync::mpsc;
use updatepipe::cluster::{TempCluster, env_or_temp};
use updatepipe::{
    ChannelName, Config, Error, Event, Flag, MailboxKey, PgPipe, Secret, SeqSet, Since, Update,
    UpdateKind, UpdatePipe, embedded_migrations,
};

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

    /// How log lines on standard error look (the level comes from RUST_LOG, default warn).
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,

    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Print every update other senders push, one JSON line each, until interrupted.
    ///
    /// Connection events (connected, disconnected, resync) go to standard error. With
    /// --durable, updates pushed durably are never lost: after a disconnect the listener
    /// replays them from the log.
    ///
    /// Examples:
    ///   updatepipe listen --channel imap_updates
    ///   updatepipe listen --pretty --key 42 --type new --type expunge
    ///   updatepipe listen --durable --since 10m > updates.jsonl
    #[command(verbatim_doc_comment)]
    Listen {
        /// Durable delivery (applies the migrations it needs first).
        #[arg(long)]
        durable: bool,

        /// With --durable: first replay the log from this point: a time ago (30s, 10m, 2h,
        /// 1d), a time in seconds since the epoch, or a log position (id:N).
        #[arg(long, value_name = "WHEN", value_parser = parse_since, requires = "durable")]
        since: Option<Since>,

        /// One readable line per update instead of JSON.
        #[arg(long)]
        pretty: bool,

        /// Only updates of this mailbox key (repeat for several).
        #[arg(long = "key", value_name = "KEY")]
        keys: Vec<String>,

        /// Only updates of this type (repeat for several).
        #[arg(long = "type", value_name = "TYPE", value_enum)]
        kinds: Vec<KindArg>,

        /// Accept only envelopes signed with one of the secrets in this file (one per
        /// line), not seen before and within the replay window; count and drop the rest.
        #[arg(long, value_name = "PATH", env = "UPDATEPIPE_SECRET_FILE")]
        secret_file: Option<PathBuf>,

        /// With --secret-file, while signing is rolled out: also accept unsigned
        /// envelopes (signed ones are still checked).
        #[arg(long, requires = "secret_file")]
        accept_unsigned: bool,
    },

    /// Push updates and exit once they are committed.
    ///
    /// Give one update as JSON, or none to read one JSON update per line from standard
    /// input; all of them are sent in one transaction, and nothing is sent if any is
    /// invalid.
    ///
    /// Examples:
    ///   updatepipe push '{"Type":0,"Key":42,"SeqSet":"7"}'
    ///   printf '%s\n' '{"Type":2,"Key":42,"SeqSet":"3:5"}' '{"Type":3,"Key":7}' | updatepipe push
    ///   updatepipe push --type flags --key 42 --uid 17 --flag '\Seen'
    #[command(verbatim_doc_comment)]
    Push {
        /// Durable delivery: also write the updates to the log (applies the migrations it
        /// needs first).
        #[arg(long)]
        durable: bool,

        /// One update in the JSON contract: {"Type":1,"Key":42,"SeqSet":"17","NewFlags":["\\Seen"]}.
        #[arg(conflicts_with_all = ["kind", "key"])]
        json: Option<String>,

        /// The update's type, to give it as options instead of JSON.
        #[arg(long = "type", value_name = "TYPE", value_enum, requires = "key")]
        kind: Option<KindArg>,

        /// The mailbox key: a number or a name.
        #[arg(long, value_name = "KEY", requires = "kind")]
        key: Option<String>,

        /// The messages: a UID (for flags) or an IMAP sequence set (1:3,7).
        #[arg(
            long = "uid",
            visible_alias = "seq",
            value_name = "SET",
            default_value = ""
        )]
        seq_set: String,

        /// A flag after the change (repeat for several): \Seen, $Junk.
        #[arg(long = "flag", value_name = "FLAG")]
        flags: Vec<String>,

        /// Sign the updates with the first secret in this file (one per line), for
        /// listeners that accept only signed envelopes.
        #[arg(long, value_name = "PATH", env = "UPDATEPIPE_SECRET_FILE")]
        secret_file: Option<PathBuf>,
    },

    /// Apply updatepipe's schema migrations (safe to repeat).
    ///
    /// Example: updatepipe migrate --dry-run
    #[command(verbatim_doc_comment)]
    Migrate {
        /// List the migrations that would be applied, and apply none.
        #[arg(long)]
        dry_run: bool,
    },

    /// Show the server as the pipe sees it: version, primary or standby, whether LISTEN
    /// works through this connection (not through a transaction-pooling proxy), the
    /// notification queue, the durable log and the schema version.
    ///
    /// Example: updatepipe status --url postgres://mail@db/mail
    #[command(verbatim_doc_comment)]
    Status,

    /// Show two nodes and an admin tool exchanging updates through PostgreSQL.
    ///
    /// Uses --url or DATABASE_URL when given; otherwise starts a throwaway PostgreSQL
    /// cluster from the local installation and removes it afterwards.
    ///
    /// Example: updatepipe demo
    #[command(verbatim_doc_comment)]
    Demo,

    /// Measure throughput and latency, side by side with a raw tokio-postgres baseline.
    ///
    /// Uses --url or DATABASE_URL when given; otherwise a throwaway cluster.
    ///
    /// Examples:
    ///   updatepipe bench
    ///   updatepipe bench --scale 0.2 --json
    #[command(verbatim_doc_comment)]
    Bench(bench::BenchArgs),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

/// An update type as the command line spells it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
enum KindArg {
    New,
    Flags,
    Expunge,
    Destroyed,
}

impl KindArg {
    fn kind(self) -> UpdateKind {
        match self {
            KindArg::New => UpdateKind::NewMessage,
            KindArg::Flags => UpdateKind::FlagsChanged,
            KindArg::Expunge => UpdateKind::Expunge,
            KindArg::Destroyed => UpdateKind::MailboxDestroyed,
        }
    }
}

/// `--since`: `30s`, `10m`, `2h`, `1d` ago; seconds since the epoch; or `id:N`.
fn parse_since(text: &str) -> Result<Since, String> {
    if let Some(id) = text.strip_prefix("id:") {
        return id
            .parse()
            .map(Since::Position)
            .map_err(|_| format!("{id:?} is not a log position"));
    }
    let unit = match text.chars().last() {
        Some('s') => Some(1),
        Some('m') => Some(60),
        Some('h') => Some(3600),
        Some('d') => Some(86_400),
        _ => None,
    };
    let number = if unit.is_some() {
        &text[..text.len() - 1]
    } else {
        text
    };
    let value: u64 = number.parse().map_err(|_| {
        format!("{text:?} is not a time ago (30s, 10m, 2h, 1d), epoch seconds or id:N")
    })?;
    let at = match unit {
        Some(seconds) => std::time::SystemTime::now()
            .checked_sub(std::time::Duration::from_secs(
                value.saturating_mul(seconds),
            ))
            .unwrap_or(std::time::UNIX_EPOCH),
        None => std::time::UNIX_EPOCH + std::time::Duration::from_secs(value),
    };
    Ok(Since::Time(at))
}

/// A mailbox key from the command line: digits make a number, anything else a name.
fn parse_key(text: &str) -> MailboxKey {
    text.parse::<u64>()
        .map_or_else(|_| MailboxKey::from(text), MailboxKey::from)
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
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    let logs = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match cli.log_format {
        LogFormat::Text => logs.init(),
        LogFormat::Json => logs.json().init(),
    }
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
        Command::Listen {
            durable,
            since,
            pretty,
            keys,
            kinds,
            secret_file,
            accept_unsigned,
        } => {
            let filter = Filter {
                keys: keys.iter().map(|k| parse_key(k)).collect(),
                kinds: kinds.iter().map(|k| k.kind()).collect(),
            };
            let mut config = config(cli.url.as_deref())?
                .with_channel(channel)
                .with_durable(durable)
                .with_secrets(secrets(secret_file.as_deref())?)
                .with_accept_unsigned(accept_unsigned);
            if let Some(since) = since {
                config = config.with_since(since);
            }
            listen(config, &filter, pretty).await
        }
        Command::Push {
            json,
            durable,
            kind,
            key,
            seq_set,
            flags,
            secret_file,
        } => {
            let given = match (kind, key) {
                (Some(kind), Some(key)) => Some(update_from_options(kind, &key, &seq_set, &flags)?),
                _ => None,
            };
            let config = config(cli.url.as_deref())?
                .with_channel(channel)
                .with_durable(durable)
                .with_secrets(secrets(secret_file.as_deref())?);
            push(config, json, given).await
        }
        Command::Migrate { dry_run } => {
            let pipe = PgPipe::new(config(cli.url.as_deref())?)?;
            if dry_run {
                let current = pipe.status().await?.schema_version.unwrap_or(0);
                let pending: Vec<_> = embedded_migrations()
                    .into_iter()
                    .filter(|m| m.version() > current)
                    .collect();
                if pending.is_empty() {
                    println!("schema is up to date (version {current})");
                }
                for m in pending {
                    println!("pending V{}__{}", m.version(), m.name());
                }
            } else {
                let applied = pipe.migrate().await?;
                if applied.is_empty() {
                    println!("schema is up to date");
                }
                for m in applied {
                    println!("applied V{}__{}", m.version(), m.name());
                }
            }
            pipe.close().await?;
            Ok(())
        }
        Command::Status => {
            let pipe = PgPipe::new(config(cli.url.as_deref())?.with_channel(channel))?;
            let status = pipe.status().await?;
            pipe.close().await?;
            print_status(&pipe, &status);
            Ok(())
        }
        Command::Demo => {
            let (config, _cluster) = database(cli.url.as_deref(), "demo").await?;
            demo::run(config).await
        }
        Command::Bench(args) => {
            let (config, _cluster) = database(cli.url.as_deref(), "benchmark").await?;
            // On a worker thread like every task it measures, not on the main thread, where
            // each wake-up would cost a thread hand-off.
            tokio::spawn(bench::run(config, args)).await?
        }
    }
}

/// The signing secrets of `--secret-file`, if given.
fn secrets(path: Option<&std::path::Path>) -> Result<Vec<Secret>, Error> {
    path.map_or(Ok(Vec::new()), Secret::read_file)
}

fn config(url: Option<&str>) -> Result<Config, Error> {
    match url {
        Some(url) => Config::from_url_with_env(url),
        None => Config::from_env(),
    }
}

/// The database for the demo and the benchmark: --url, else the environment when it names
/// one, else a throwaway cluster (returned, so it lives as long as the caller keeps it).
async fn database(url: Option<&str>, what: &str) -> anyhow::Result<(Config, Option<TempCluster>)> {
    if let Some(url) = url {
        return Ok((Config::from_url_with_env(url)?, None));
    }
    if !Config::env_names_database() {
        eprintln!("No DATABASE_URL: starting a throwaway PostgreSQL cluster...");
    }
    let (config, cluster) = tokio::task::spawn_blocking(env_or_temp).await??;
    if let Some(cluster) = &cluster {
        eprintln!(
            "  PostgreSQL is up on 127.0.0.1:{} (removed when the {what} ends)",
            cluster.port()
        );
    }
    Ok((config, cluster))
}

/// Which updates `listen` prints.
#[derive(Debug, Default)]
struct Filter {
    keys: Vec<MailboxKey>,
    kinds: Vec<UpdateKind>,
}

impl Filter {
    fn accepts(&self, update: &Update) -> bool {
        (self.keys.is_empty() || self.keys.contains(update.key()))
            && (self.kinds.is_empty() || self.kinds.contains(&update.kind()))
    }
}

/// One readable line for an update.
fn pretty_line(update: &Update) -> String {
    let flags: Vec<&str> = update.flags().iter().map(Flag::as_str).collect();
    match update.kind() {
        UpdateKind::NewMessage => format!(
            "new message(s) {} in mailbox {}",
            update.seq_set(),
            update.key()
        ),
        UpdateKind::FlagsChanged => format!(
            "flags of uid {} in mailbox {}: ({})",
            update.seq_set(),
            update.key(),
            flags.join(" ")
        ),
        UpdateKind::Expunge => format!("expunged {} in mailbox {}", update.seq_set(), update.key()),
        UpdateKind::MailboxDestroyed => format!("mailbox {} destroyed", update.key()),
        other => format!("{other} in mailbox {}", update.key()),
    }
}

async fn listen(config: Config, filter: &Filter, pretty: bool) -> anyhow::Result<()> {
    let pipe = PgPipe::new(config)?;
    if pipe.config().durable() {
        pipe.migrate().await?;
    }
    let (tx, mut rx) = mpsc::channel(1024);
    pipe.listen_events(tx).await?;
    let mut stdout = std::io::stdout();
    let outcome = loop {
        tokio::select! {
            event = rx.recv() => match event {
                Some(Event::Update(update)) => {
                    if !filter.accepts(&update) {
                        continue;
                    }
                    let line = if pretty { pretty_line(&update) } else { update.to_json() };
                    if writeln!(stdout, "{line}").and_then(|()| stdout.flush()).is_err() {
                        // Standard output is gone (a closed pipe): stop quietly.
                        break Ok(());
                    }
                }
                Some(Event::Connected) => eprintln!(
                    "updatepipe: listening on channel {:?}{}",
                    pipe.config().channel().as_str(),
                    if pipe.config().durable() { " (durable)" } else { "" }
                ),
                Some(Event::Disconnected { reason }) => {
                    eprintln!("updatepipe: disconnected ({reason}); reconnecting");
                }
                Some(Event::Resync(reason)) => {
                    eprintln!("updatepipe: resync: updates may have been missed ({reason:?})");
                }
                Some(other) => eprintln!("updatepipe: {other:?}"),
                None => break Err(anyhow::anyhow!(
                    "the listener stopped: it could not reconnect to PostgreSQL (see the log above)"
                )),
            },
            () = shutdown_signal() => break Ok(()),
        }
    };
    pipe.close().await?;
    let stats = pipe.stats();
    eprintln!(
        "updatepipe: delivered {}, echoes dropped {}, rejected {}, reconnects {}, replayed {}, resyncs {}",
        stats.delivered,
        stats.echoes_dropped,
        stats.rejected_total(),
        stats.reconnects,
        stats.replayed,
        stats.resyncs
    );
    outcome
}

/// An update given as options (`--type flags --key 42 --uid 17 --flag '\Seen'`).
fn update_from_options(
    kind: KindArg,
    key: &str,
    seq_set: &str,
    flags: &[String],
) -> Result<Update, Error> {
    let flags = flags
        .iter()
        .map(|f| Flag::new(f.as_str()))
        .collect::<Result<Vec<_>, _>>()?;
    let seq_set = SeqSet::parse(seq_set)?;
    Ok(Update::from_parts(
        kind.kind(),
        parse_key(key),
        seq_set,
        flags,
    )?)
}

fn print_status(pipe: &PgPipe, status: &updatepipe::Status) {
    println!("server version      {}", status.server_version);
    println!(
        "primary             {}",
        if status.in_recovery {
            "no: a standby (in recovery); LISTEN and NOTIFY work only on the primary"
        } else {
            "yes"
        }
    );
    match status.listen_works {
        Some(true) => println!("LISTEN works        yes (a probe notification arrived)"),
        Some(false) => println!(
            "LISTEN works        NO: a probe notification never arrived; a transaction-pooling \
             proxy (PgBouncer in transaction mode) breaks LISTEN: connect listeners directly"
        ),
        None => println!("LISTEN works        unknown (cannot NOTIFY on a standby)"),
    }
    println!("queue usage         {:.6} %", status.queue_usage * 100.0);
    if let Some(n) = status.listeners {
        println!("listeners           {n} on this channel (heard by their heartbeats)");
    }
    println!("channel             {}", pipe.config().channel());
    match status.schema_version {
        Some(v) => println!(
            "schema version      {v} (this build has {})",
            embedded_migrations().len()
        ),
        None => {
            println!("schema version      not migrated (run updatepipe migrate for durable mode)")
        }
    }
    if let Some(n) = status.log_entries {
        let age = status
            .oldest_log_entry_secs
            .map_or_else(|| "-".to_owned(), |s| format!("{s:.0} s"));
        println!("durable log         {n} entries on this channel, oldest {age}");
    }
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

async fn push(config: Config, json: Option<String>, given: Option<Update>) -> anyhow::Result<()> {
    let updates = match (json, given) {
        (_, Some(update)) => vec![update],
        (Some(json), None) => vec![Update::from_json(&json).map_err(Error::from)?],
        (None, None) => read_updates(std::io::stdin().lock())?,
    };
    if updates.is_empty() {
        return Err(
            Error::Config("no update given (pass one as JSON or pipe JSON lines)".into()).into(),
        );
    }
    let pipe = PgPipe::new(config)?;
    if pipe.config().durable() {
        pipe.migrate().await?;
    }
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
    fn since_forms() {
        assert_eq!(parse_since("id:42"), Ok(Since::Position(42)));
        assert!(matches!(parse_since("10m"), Ok(Since::Time(_))));
        assert_eq!(
            parse_since("1000"),
            Ok(Since::Time(
                std::time::UNIX_EPOCH + std::time::Duration::from_secs(1000)
            ))
        );
        assert!(parse_since("soon").is_err());
        assert!(parse_since("id:x").is_err());
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
