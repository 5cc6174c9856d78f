//! The `updatepipe` command: a thin layer over the library.

use std::process::ExitCode;

/// mimalloc, with the `mimalloc` feature (the system allocator by default: nothing the
/// push path allocates per push crosses threads, so glibc's is as fast; BENCHMARKS.md).
#[cfg(feature = "mimalloc")]
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// The global allocator of this build, as `bench` reports it.
const ALLOCATOR: &str = if cfg!(feature = "mimalloc") {
    "mimalloc"
} else {
    "system"
};

mod args;
mod bench;
mod commands;
mod demo;
mod metrics;
mod output;
mod signal;

use args::{Cli, Command, LogFormat, parse_key};
use output::outln;

use clap::Parser;
use commands::{Filter, Output, listen, print_status, push, update_from_options};
use updatepipe::cluster::{TempCluster, env_or_temp};
use updatepipe::{
    ChannelName, Config, Error, Layout, PgPipe, Role, Secret, UpdatePipe, embedded_migrations,
    grant_statements,
};

/// Exit codes, one per class of failure (`updatepipe --help` and the README list them).
mod exit {
    /// Anything else.
    pub const FAILURE: u8 = 1;
    /// Bad input: options, updates, channel, connection string, secret file. Clap's own
    /// usage errors exit 2 too.
    pub const BAD_INPUT: u8 = 2;
    /// No server answered, or the connection broke.
    pub const CONNECTION: u8 = 3;
    /// The server refused a statement.
    pub const SERVER: u8 = 4;
    /// The server refused the login.
    pub const AUTH: u8 = 5;
    /// `status`: the server is reachable but unhealthy (the notification queue full, or
    /// above --queue-fail).
    pub const UNHEALTHY: u8 = 6;
    /// `status` and `listen`: LISTEN does not work through this connection (a
    /// transaction-pooling proxy).
    pub const LISTEN_UNSUPPORTED: u8 = 7;
}

/// `status` found the server unhealthy: exit 6.
#[derive(Debug)]
struct Unhealthy(String);

impl std::fmt::Display for Unhealthy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Unhealthy {}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    let logs = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(colour(
            std::io::IsTerminal::is_terminal(&std::io::stderr()),
            std::env::var_os("NO_COLOR").as_deref(),
        ))
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

/// Whether log lines get colour: only on a terminal, and never with `NO_COLOR` set to
/// anything but the empty string (<https://no-color.org>).
fn colour(terminal: bool, no_color: Option<&std::ffi::OsStr>) -> bool {
    terminal && no_color.is_none_or(|v| v.is_empty())
}

/// The error and its causes on one line, without repeating a cause the message already
/// tells. The library's errors tell their causes themselves (a bare `db error` is all the
/// next link would add), so the chain stops at the first of them.
fn one_line(e: &anyhow::Error) -> String {
    let mut line = String::new();
    for cause in e.chain() {
        let text = cause.to_string();
        if !line.contains(&text) {
            if !line.is_empty() {
                line.push_str(": ");
            }
            line.push_str(&text);
        }
        if cause.downcast_ref::<Error>().is_some() {
            break;
        }
    }
    line
}

/// What `status` exits with: 6 when the notification queue is full or fuller than
/// `queue_fail` percent, else 7 when LISTEN does not work through this connection, else 0.
fn status_verdict(status: &updatepipe::Status, queue_fail: f64) -> anyhow::Result<()> {
    let usage = status.queue_usage * 100.0;
    if status.queue_full {
        return Err(Unhealthy(
            "the notification queue is full: the server refuses every NOTIFY in the cluster; \
             a session of this database listens and does not read (end it, or the \
             transaction it left open)"
                .into(),
        )
        .into());
    }
    if usage > queue_fail {
        return Err(Unhealthy(format!(
            "the notification queue is {usage:.4} % full, above --queue-fail \
             {queue_fail} %: a session of this database listens and does not read"
        ))
        .into());
    }
    if status.listen_works == Some(false) {
        return Err(Error::ListenUnsupported {
            evidence: "a probe notification sent from another connection did not arrive \
                       within 2 s"
                .into(),
        }
        .into());
    }
    Ok(())
}

/// The pipe's channel, refused when it is a maddy mailbox's (`__uint64_N`): the pipe's
/// envelopes and heartbeats there would reach maddy's nodes as updates they cannot read.
fn pipe_channel(name: &str) -> Result<ChannelName, Error> {
    let channel = ChannelName::new(name)?;
    if channel.is_maddy_mailbox() {
        return Err(Error::Config(format!(
            "--channel {name:?} is the channel maddy uses for mailbox {}: the pipe's envelopes \
             and heartbeats would reach maddy's nodes there as updates they cannot read; give \
             the pipe a channel of its own (updatepipe by default; --layout maddy reaches \
             maddy's mailboxes by itself)",
            name.trim_start_matches("__uint64_")
        )));
    }
    Ok(channel)
}

fn exit_code(e: &anyhow::Error) -> u8 {
    match e.downcast_ref::<Error>() {
        Some(e) if e.is_invalid_input() => exit::BAD_INPUT,
        Some(e) if e.is_auth() => exit::AUTH,
        Some(e) if e.is_connection() => exit::CONNECTION,
        Some(Error::ListenUnsupported { .. }) => exit::LISTEN_UNSUPPORTED,
        Some(
            Error::Postgres(_)
            | Error::Migrate(_)
            | Error::SchemaOutdated { .. }
            | Error::SchemaNotGranted { .. }
            | Error::NotGranted { .. }
            | Error::NotSchemaOwner { .. }
            | Error::LockHeld { .. }
            | Error::ConsumerTaken { .. }
            | Error::NumbersTaken { .. },
        ) => exit::SERVER,
        Some(_) => exit::FAILURE,
        None if e.downcast_ref::<Unhealthy>().is_some() => exit::UNHEALTHY,
        None if e.downcast_ref::<updatepipe::UpdateError>().is_some() => exit::BAD_INPUT,
        None => exit::FAILURE,
    }
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Listen {
            layout,
            accept_maddy,
            channel,
            durable,
            since,
            consumer,
            poll,
            print_position,
            pretty,
            keys,
            kinds,
            secret_file,
            accept_unsigned,
            no_wait,
            metrics,
        } => {
            let filter = Filter {
                keys: keys.iter().map(|k| parse_key(k)).collect(),
                kinds: kinds.iter().map(|k| k.kind()).collect(),
            };
            let mut config = config(cli.url.as_deref())?
                .with_channel(pipe_channel(&channel.channel)?)
                .with_durable(durable)
                .with_secrets(secrets(secret_file.as_deref())?)
                .with_layout(layout.layout())
                .with_listen(|l| {
                    l.with_accept_unsigned(accept_unsigned)
                        .with_accept_maddy(accept_maddy)
                        .with_wait_for_server(!no_wait)
                });
            if let Some(since) = since {
                config = config.with_listen(|l| l.with_since(since));
            }
            if let Some(name) = &consumer {
                config = config.with_consumer(name);
            }
            if let Some(seconds) = poll {
                let every = std::time::Duration::from_secs_f64(seconds);
                config = config.with_listen(|l| l.with_polling(every));
            }
            if let Some(addr) = metrics {
                metrics::serve(addr).await?;
            }
            let output = Output {
                pretty,
                print_position,
                metrics: metrics.is_some(),
            };
            listen(config, &filter, output).await
        }
        Command::Push {
            layout,
            channel,
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
                .with_channel(pipe_channel(&channel.channel)?)
                .with_durable(durable)
                .with_secrets(secrets(secret_file.as_deref())?)
                .with_layout(layout.layout());
            push(config, json, given).await
        }
        Command::Migrate { dry_run, lock_wait } => {
            let config = config(cli.url.as_deref())?.with_session(|s| {
                s.with_lock_timeout(std::time::Duration::from_secs_f64(lock_wait))
            });
            let pipe = PgPipe::new(config)?;
            if dry_run {
                let current = pipe.status().await?.schema_version.unwrap_or(0);
                let pending: Vec<_> = embedded_migrations()
                    .into_iter()
                    .filter(|m| m.version() > current)
                    .collect();
                if pending.is_empty() {
                    outln!("schema is up to date (version {current})");
                }
                for m in pending {
                    outln!("pending V{}__{}", m.version(), m.name());
                }
            } else {
                let applied = pipe.migrate().await?;
                if applied.is_empty() {
                    outln!("schema is up to date");
                }
                for m in applied {
                    outln!("applied V{}__{}", m.version(), m.name());
                }
            }
            pipe.close().await?;
            Ok(())
        }
        Command::Grant {
            pushers,
            listeners,
            dry_run,
            lock_wait,
        } => {
            let roles: Vec<(&str, Role)> = pushers
                .iter()
                .map(|r| (r.as_str(), Role::Pusher))
                .chain(listeners.iter().map(|r| (r.as_str(), Role::Listener)))
                .collect();
            if dry_run {
                for (role, what) in &roles {
                    for sql in grant_statements(role, *what)? {
                        outln!("{sql};");
                    }
                }
                return Ok(());
            }
            let config = config(cli.url.as_deref())?.with_session(|s| {
                s.with_lock_timeout(std::time::Duration::from_secs_f64(lock_wait))
            });
            let pipe = PgPipe::new(config)?;
            let granted = pipe.grant(&roles).await;
            pipe.close().await?;
            granted?;
            for (role, what) in &roles {
                let what = if *what == Role::Pusher {
                    "pusher"
                } else {
                    "listener"
                };
                outln!("granted {role} what a {what} needs");
            }
            Ok(())
        }
        Command::Status {
            channel,
            listeners,
            queue_warn,
            queue_fail,
        } => {
            let pipe = PgPipe::new(
                config(cli.url.as_deref())?.with_channel(ChannelName::new(&channel.channel)?),
            )?;
            let status = if listeners {
                pipe.status_with_listeners().await?
            } else {
                pipe.status().await?
            };
            pipe.close().await?;
            print_status(&pipe, &status, queue_warn);
            status_verdict(&status, queue_fail)
        }
        Command::Demo { layout, channel } => {
            let channel = channel.map(ChannelName::new).transpose()?;
            let (config, _cluster) = database(cli.url.as_deref(), "demo").await?;
            match layout.layout() {
                Layout::Maddy => demo::run_maddy(config, channel).await,
                _ => demo::run(config, channel).await,
            }
        }
        Command::Bench(args) => {
            if let Some((n, channel)) = args.listen_child() {
                let config = config(cli.url.as_deref())?;
                let channel = channel.to_owned();
                return tokio::spawn(async move {
                    bench::listen_child(config, &args, n, &channel).await
                })
                .await?;
            }
            let (config, cluster) = database(cli.url.as_deref(), "benchmark").await?;
            let url = cli
                .url
                .clone()
                .or_else(|| cluster.as_ref().map(|c| c.url()));
            // On a worker thread like every task it measures, not on the main thread, where
            // each wake-up would cost a thread hand-off.
            let result = tokio::spawn(bench::run(config, url, args)).await?;
            drop(cluster);
            result
        }
    }
}

/// The signing secrets of `--secret-file`, if given.
fn secrets(path: Option<&std::path::Path>) -> Result<Vec<Secret>, Error> {
    path.map_or(Ok(Vec::new()), Secret::read_file)
}

fn config(url: Option<&str>) -> Result<Config, Error> {
    match url {
        Some("") => Err(Error::Config(
            "--url is empty; give a postgres:// URL or key=value pairs, or leave --url out to \
             use DATABASE_URL and the PG* variables"
                .into(),
        )),
        Some(url) => Config::from_url_with_env(url),
        None => Config::from_env(),
    }
}

/// The database for the demo and the benchmark: --url, else the environment when it names
/// one, else a throwaway cluster (returned, so it lives as long as the caller keeps it).
async fn database(url: Option<&str>, what: &str) -> anyhow::Result<(Config, Option<TempCluster>)> {
    if url.is_some() {
        return Ok((config(url)?, None));
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn colour_only_on_a_terminal_without_no_color() {
        use std::ffi::OsStr;
        assert!(colour(true, None));
        assert!(colour(true, Some(OsStr::new(""))));
        assert!(!colour(true, Some(OsStr::new("1"))));
        assert!(!colour(false, None));
    }

    #[test]
    fn one_line_stops_at_the_library_error() {
        let e = anyhow::Error::new(Error::Config("x".into())).context("reading");
        assert_eq!(one_line(&e), "reading: invalid configuration: x");
    }
}
