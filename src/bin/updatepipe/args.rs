//! The command line: commands, options and how their values parse.

use std::path::PathBuf;

use clap::{Parser, Subcommand};
use updatepipe::{ChannelName, Layout, MailboxKey, Since, UpdateKind};

use crate::bench;

/// Carries IMAP mailbox updates between processes through PostgreSQL LISTEN/NOTIFY.
///
/// The connection comes from --url, else DATABASE_URL, completed as psql completes it: a
/// service (PGSERVICE, ~/.pg_service.conf), the PG* variables (PGHOST, PGPORT, PGUSER,
/// PGPASSWORD, PGDATABASE, PGAPPNAME, ...) for what the string leaves out, then ~/.pgpass.
#[derive(Parser, Debug)]
#[command(
    name = "updatepipe",
    version,
    propagate_version = true,
    after_help = EXIT_CODES
)]
pub(crate) struct Cli {
    /// PostgreSQL URL (postgres://user:password@host:port/db) or key=value string.
    #[arg(long, global = true, value_name = "URL")]
    pub(crate) url: Option<String>,

    /// How log lines on standard error look (the level comes from RUST_LOG, default warn;
    /// colour only when standard error is a terminal and NO_COLOR is unset).
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text)]
    pub(crate) log_format: LogFormat,

    #[command(subcommand)]
    pub(crate) command: Command,
}

/// What `updatepipe --help` says about exit codes (README.md says the same).
const EXIT_CODES: &str = "\
Exit codes:
  0  success
  1  any other failure
  2  bad input: an invalid option, update, channel, connection string or secret file
  3  PostgreSQL unreachable: no host answered, or the connection broke
  4  PostgreSQL refused a statement (permissions, a failed migration, a full queue)
  5  PostgreSQL refused the login (password, role, pg_hba.conf)
  6  status: the server is reachable but unhealthy (notification queue full, or above
     --queue-fail)
  7  status, listen: LISTEN does not work through this connection (a transaction-pooling
     proxy: connect listeners directly to the server, or through a session pool)";

/// `--channel`, for the commands that use one.
#[derive(clap::Args, Debug)]
pub(crate) struct ChannelArg {
    /// The channel updates travel on.
    #[arg(long, value_name = "NAME", default_value = ChannelName::DEFAULT)]
    pub(crate) channel: String,
}

#[derive(Subcommand, Debug)]
pub(crate) enum Command {
    /// Print every update other senders push, one JSON line each, until interrupted.
    ///
    /// Connection events (connected, disconnected, resync) go to standard error. With
    /// --durable, updates pushed durably are never lost: after a disconnect the listener
    /// replays them from the log.
    ///
    /// A long-running node: when the server cannot be reached at the start, listen waits
    /// for it, retrying with the reconnect backoff (--no-wait: exit 3 at once instead).
    ///
    /// Examples:
    ///   updatepipe listen --channel imap_updates
    ///   updatepipe listen --pretty --key 42 --type new --type expunge
    ///   updatepipe listen --durable --since 10m > updates.jsonl
    ///   updatepipe listen --layout maddy --key 42 --key INBOX
    #[command(verbatim_doc_comment)]
    Listen {
        /// The channel layout: shared (updatepipe nodes only), or maddy (also hear maddy
        /// nodes' updates on the mailboxes given with --key, and drop the copies other
        /// updatepipe senders make for maddy).
        #[arg(long, value_enum, default_value_t = LayoutArg::Shared)]
        layout: LayoutArg,

        #[command(flatten)]
        channel: ChannelArg,

        /// Durable delivery. The schema must be migrated (`updatepipe migrate`, as its owner)
        /// and the role granted (`updatepipe grant --listener ROLE`).
        #[arg(long)]
        durable: bool,

        /// With --durable: first replay the log from this point: a time ago (30s, 10m, 2h,
        /// 1d), a time in seconds since the epoch, a log id (id:N), or exactly after a
        /// position --print-position printed (up1/...). With --consumer, the consumer is
        /// put there.
        #[arg(long, value_name = "WHEN", value_parser = parse_since, requires = "durable")]
        since: Option<Since>,

        /// With --durable: read as this named consumer (1 to 63 bytes): start where its
        /// last acknowledged position is, kept in the database, and acknowledge each update
        /// once its line is written and flushed. A restarted listener so resumes where the
        /// last one stopped: nothing lost, at most the last 200 ms of lines again. One
        /// process per consumer at a time (a second exits 4).
        #[arg(long, value_name = "NAME", requires = "durable")]
        consumer: Option<String>,

        /// With --durable: read the log every SECONDS instead of listening, where LISTEN
        /// does not work (behind PgBouncer in transaction mode): no LISTEN, no heartbeat;
        /// durable updates arrive about SECONDS after their commit, best-effort ones never.
        /// Not with --consumer or --layout maddy.
        #[arg(long, value_name = "SECONDS", value_parser = parse_wait, requires = "durable",
              conflicts_with = "consumer")]
        poll: Option<f64>,

        /// With --durable: add each update's position to its line ("Position" in the JSON
        /// object, or "@ up1/..." after a --pretty line), to resume from with --since.
        #[arg(long, requires = "durable")]
        print_position: bool,

        /// One readable line per update instead of JSON.
        #[arg(long)]
        pretty: bool,

        /// Only updates of this mailbox key (repeat for several): a number in canonical
        /// decimal (42) is a numeric key; anything else (INBOX, 007, +1) is a name. With
        /// --layout maddy, also subscribe to that mailbox's maddy channel.
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

        /// With --secret-file and --layout maddy: also deliver maddy nodes' updates, which
        /// cannot be signed.
        #[arg(long, requires = "secret_file")]
        accept_maddy: bool,

        /// Exit at once (code 3) when the server cannot be reached at the start, instead
        /// of waiting for it.
        #[arg(long)]
        no_wait: bool,

        /// Serve Prometheus metrics on this address (GET /metrics), for example
        /// 127.0.0.1:9187: the pipe's counters (updatepipe_*_total), the notification
        /// queue usage (read every 10 s) and the heartbeat lag. docs/operations.md lists
        /// them.
        #[arg(long, value_name = "ADDR")]
        metrics: Option<std::net::SocketAddr>,
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
    ///   updatepipe push --layout maddy '{"Type":3,"Key":42}'
    #[command(verbatim_doc_comment)]
    Push {
        /// The channel layout: shared, or maddy (also send each update to maddy nodes on
        /// its mailbox's channel, in maddy's form, in the same transaction).
        #[arg(long, value_enum, default_value_t = LayoutArg::Shared)]
        layout: LayoutArg,

        #[command(flatten)]
        channel: ChannelArg,

        /// Durable delivery: also write the updates to the log. The schema must be migrated
        /// (`updatepipe migrate`, as its owner) and the role granted (`updatepipe grant
        /// --pusher ROLE`).
        #[arg(long)]
        durable: bool,

        /// One update in the JSON contract:
        /// {"Type":1,"Key":42,"SeqSet":"17","NewFlags":["\\Seen"]}.
        #[arg(conflicts_with_all = ["kind", "key"])]
        json: Option<String>,

        /// The update's type, to give it as options instead of JSON.
        #[arg(long = "type", value_name = "TYPE", value_enum, requires = "key")]
        kind: Option<KindArg>,

        /// The mailbox key: a number in canonical decimal (42) is a numeric key; anything
        /// else (INBOX, 007, +1) is a name.
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

    /// Apply updatepipe's schema migrations (safe to repeat), as the role that owns the
    /// updatepipe schema: nothing else migrates.
    ///
    /// Example: updatepipe migrate --dry-run
    #[command(verbatim_doc_comment)]
    Migrate {
        /// List the migrations that would be applied, and apply none.
        #[arg(long)]
        dry_run: bool,

        /// How long to wait for the migration lock (another migrate or grant, or any
        /// session holding it), and a migration for a lock on the log's tables, before
        /// failing with the sessions that hold it.
        #[arg(long, value_name = "SECONDS", default_value_t = 30.0, value_parser = parse_wait)]
        lock_wait: f64,
    },

    /// Grant runtime roles what they need, and nothing more (run as the schema's owner,
    /// after migrate; safe to repeat).
    ///
    /// A pusher may push, best effort and durable; a listener may listen, read the durable
    /// log and prune it. Neither may create anything. docs/security.md lists each privilege.
    ///
    /// Examples:
    ///   updatepipe grant --pusher mail_admin --pusher imap_node --listener imap_node
    ///   updatepipe grant --listener imap_node --dry-run
    #[command(verbatim_doc_comment)]
    Grant {
        /// A role that pushes (repeat for several).
        #[arg(
            long = "pusher",
            value_name = "ROLE",
            required_unless_present = "listeners"
        )]
        pushers: Vec<String>,

        /// A role that listens (repeat for several).
        #[arg(long = "listener", value_name = "ROLE")]
        listeners: Vec<String>,

        /// Print the SQL, and grant nothing.
        #[arg(long)]
        dry_run: bool,

        /// How long to wait for the migration lock (a migrate or another grant, or any
        /// session holding it) before failing with the sessions that hold it.
        #[arg(long, value_name = "SECONDS", default_value_t = 30.0, value_parser = parse_wait)]
        lock_wait: f64,
    },

    /// Show the server as the pipe sees it: version, primary or standby, whether LISTEN
    /// works through this connection (not through a transaction-pooling proxy), the
    /// notification queue, the server's idle timeouts, the durable log and the schema
    /// version.
    ///
    /// A health check: exits 6 when the notification queue is full or fuller than
    /// --queue-fail (when it is full, every NOTIFY in the cluster fails), and warns above
    /// --queue-warn; exits 7 when LISTEN does not work through this connection (a
    /// transaction-pooling proxy).
    ///
    /// Answers in well under a second; --listeners also counts the listeners on the
    /// channel, which takes half a health interval (about 5.5 s).
    ///
    /// Example: updatepipe status --url postgres://mail@db/mail
    #[command(verbatim_doc_comment)]
    Status {
        #[command(flatten)]
        channel: ChannelArg,

        /// Also count the listeners on the channel, by their heartbeats (waits about
        /// 5.5 s, half the default health interval).
        #[arg(long)]
        listeners: bool,

        /// Warn when the notification queue is fuller than this, in percent (0 to 100).
        #[arg(long, value_name = "PERCENT", default_value_t = 10.0, value_parser = parse_percent)]
        queue_warn: f64,

        /// Exit 6 when the notification queue is fuller than this, in percent (0 to 100; a
        /// health check: the server is reachable but unhealthy).
        #[arg(long, value_name = "PERCENT", default_value_t = 50.0, value_parser = parse_percent)]
        queue_fail: f64,
    },

    /// Show two nodes and an admin tool exchanging updates through PostgreSQL.
    ///
    /// Uses --url, DATABASE_URL, PGHOST, PGHOSTADDR or PGSERVICE when one is set;
    /// otherwise starts a throwaway PostgreSQL cluster from the local installation and
    /// removes it afterwards.
    ///
    /// With --layout maddy: a maddy-format node among updatepipe nodes, both ways.
    ///
    /// Examples:
    ///   updatepipe demo
    ///   updatepipe demo --layout maddy
    #[command(verbatim_doc_comment)]
    Demo {
        /// The channel layout to show.
        #[arg(long, value_enum, default_value_t = LayoutArg::Shared)]
        layout: LayoutArg,

        /// The channel the demo's nodes use (default: a fresh one of its own, so that the
        /// demo never disturbs real listeners).
        #[arg(long, value_name = "NAME")]
        channel: Option<String>,
    },

    /// Measure throughput and latency, side by side with a raw tokio-postgres baseline.
    ///
    /// Uses --url, DATABASE_URL, PGHOST, PGHOSTADDR or PGSERVICE when one is set;
    /// otherwise a throwaway cluster. On a server of yours it works in a database of its
    /// own, created (the role needs CREATEDB) and dropped when it ends, so the database
    /// named is left as it was.
    ///
    /// Examples:
    ///   updatepipe bench
    ///   updatepipe bench --scale 0.2 --json
    #[command(verbatim_doc_comment)]
    Bench(bench::BenchArgs),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub(crate) enum LogFormat {
    Text,
    Json,
}

/// A channel layout as the command line spells it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub(crate) enum LayoutArg {
    Shared,
    Maddy,
}

impl LayoutArg {
    pub(crate) fn layout(self) -> Layout {
        match self {
            LayoutArg::Shared => Layout::Shared,
            LayoutArg::Maddy => Layout::Maddy,
        }
    }
}

/// An update type as the command line spells it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub(crate) enum KindArg {
    New,
    Flags,
    Expunge,
    Destroyed,
}

impl KindArg {
    pub(crate) fn kind(self) -> UpdateKind {
        match self {
            KindArg::New => UpdateKind::NewMessage,
            KindArg::Flags => UpdateKind::FlagsChanged,
            KindArg::Expunge => UpdateKind::Expunge,
            KindArg::Destroyed => UpdateKind::MailboxDestroyed,
        }
    }
}

/// `--since`: `30s`, `10m`, `2h`, `1d` ago; seconds since the epoch; or `id:N`.
pub(crate) fn parse_since(text: &str) -> Result<Since, String> {
    if text.starts_with("up1/") {
        return text
            .parse()
            .map(Since::After)
            .map_err(|e: updatepipe::Error| e.to_string());
    }
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

/// A mailbox key from the command line: a number in canonical decimal (what the number
/// prints as: `42`, not `042` or `+42`) is a numeric key, anything else a name, so that a
/// name such as `007` keeps its zeros.
pub(crate) fn parse_key(text: &str) -> MailboxKey {
    match text.parse::<u64>() {
        Ok(n) if n.to_string() == text => MailboxKey::from(n),
        _ => MailboxKey::from(text),
    }
}

/// A percentage: 0 to 100.
fn parse_percent(text: &str) -> Result<f64, String> {
    let percent: f64 = text
        .parse()
        .map_err(|_| format!("{text:?} is not a number"))?;
    if !(0.0..=100.0).contains(&percent) {
        return Err(format!("{text}: a percentage is between 0 and 100"));
    }
    Ok(percent)
}

/// A wait in seconds: more than zero, at most a day.
fn parse_wait(text: &str) -> Result<f64, String> {
    let seconds: f64 = text
        .parse()
        .map_err(|_| format!("{text:?} is not a number of seconds"))?;
    if !(seconds > 0.0 && seconds <= 86_400.0) {
        return Err(format!(
            "{text}: give a wait of more than 0 and at most 86400 seconds"
        ));
    }
    Ok(seconds)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentages_and_waits_are_refused_out_of_range() {
        assert_eq!(parse_percent("12.5"), Ok(12.5));
        assert_eq!(parse_percent("0"), Ok(0.0));
        assert_eq!(parse_percent("100"), Ok(100.0));
        for bad in ["150", "-1", "NaN", "ten"] {
            assert!(parse_percent(bad).is_err(), "{bad}");
        }
        assert_eq!(parse_wait("1.5"), Ok(1.5));
        for bad in ["0", "-3", "90000", "inf", "NaN"] {
            assert!(parse_wait(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn since_forms() {
        assert_eq!(parse_since("id:42"), Ok(Since::Position(42)));
        assert!(
            parse_since("up1/bad")
                .unwrap_err()
                .contains("invalid position")
        );
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
    fn keys_are_numbers_only_in_canonical_decimal() {
        assert_eq!(parse_key("42"), MailboxKey::from(42u64));
        assert_eq!(parse_key("0"), MailboxKey::from(0u64));
        assert_eq!(parse_key("007"), MailboxKey::from("007"));
        assert_eq!(parse_key("+1"), MailboxKey::from("+1"));
        assert_eq!(parse_key("INBOX"), MailboxKey::from("INBOX"));
        assert_eq!(
            parse_key("18446744073709551616"),
            MailboxKey::from("18446744073709551616")
        );
    }

    #[test]
    fn cli_parses() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
    }
}
