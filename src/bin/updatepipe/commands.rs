//! What `listen`, `push` and `status` do, over the library.

use crate::output::outln;
use crate::signal::shutdown_signal;
use std::io::{BufRead, Write};

use anyhow::Context;
use tokio::sync::mpsc;
use updatepipe::{
    Config, Error, Event, Flag, Layout, MailboxKey, PgPipe, SeqSet, Update, UpdateKind, UpdatePipe,
    embedded_migrations,
};

use crate::args::{KindArg, parse_key};

/// Which updates `listen` prints.
#[derive(Debug, Default)]
pub(crate) struct Filter {
    pub(crate) keys: Vec<MailboxKey>,
    pub(crate) kinds: Vec<UpdateKind>,
}

impl Filter {
    fn accepts(&self, update: &Update) -> bool {
        (self.keys.is_empty() || self.keys.contains(update.key()))
            && (self.kinds.is_empty() || self.kinds.contains(&update.kind()))
    }
}

/// One readable line for an update.
pub(crate) fn pretty_line(update: &Update) -> String {
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

/// Checks the schema; with `wait_for_server`, once the server can be reached (retried with
/// the backoff while it cannot).
async fn check_schema_when_reachable(pipe: &PgPipe) -> Result<i64, Error> {
    let mut attempt = 0;
    loop {
        match pipe.check_schema().await {
            Err(e) if pipe.config().listen_options().wait_for_server() && e.is_connection() => {
                attempt += 1;
                if pipe
                    .config()
                    .listen_options()
                    .backoff()
                    .max_attempts
                    .is_some_and(|max| attempt >= max)
                {
                    return Err(e);
                }
                eprintln!("updatepipe: waiting for the server ({e})");
                let delay = pipe.config().listen_options().backoff().delay(attempt);
                tokio::time::sleep(delay.max(std::time::Duration::from_millis(100))).await;
            }
            checked => return checked,
        }
    }
}

/// How `listen` writes what it hears.
pub(crate) struct Output {
    /// One readable line per update instead of JSON.
    pub(crate) pretty: bool,
    /// Each update's position on its line.
    pub(crate) print_position: bool,
    /// Metrics are served: the notification queue is read every 10 s.
    pub(crate) metrics: bool,
}

/// How long `listen --print-position` waits for an update's position after the update
/// (they are handed over together; an update from a best-effort sender has none).
const POSITION_WAIT: std::time::Duration = std::time::Duration::from_millis(50);

pub(crate) async fn listen(config: Config, filter: &Filter, output: Output) -> anyhow::Result<()> {
    let Output {
        pretty,
        print_position,
        metrics,
    } = output;
    let pipe = PgPipe::new(config)?;
    if pipe.config().durable() {
        // Never migrates: a runtime role cannot, and must not need to. Waits for the
        // server as the listener does (unless --no-wait).
        if let Err(e) = check_schema_when_reachable(&pipe).await {
            pipe.close().await?;
            return Err(e.into());
        }
    }
    let (tx, mut rx) = mpsc::channel(1024);
    pipe.listen_events(tx).await?;
    if pipe.config().layout() == Layout::Maddy {
        for key in &filter.keys {
            pipe.subscribe(key.clone()).await?;
        }
    }
    let mut stdout = std::io::stdout();
    // With metrics: the notification queue's usage, read every 10 s (a failed read keeps
    // the last value; the listener's own events say what is wrong).
    let mut queue_reads = tokio::time::interval(std::time::Duration::from_secs(10));
    // Lines printed: what the filters let through of what was delivered.
    let mut printed = 0u64;
    // A named consumer acknowledges each position once the lines before it are flushed.
    let consumer = pipe.config().listen_options().consumer().is_some();
    // An event read ahead while looking for an update's position.
    let mut ahead: Option<Event> = None;
    // Why the connection was last lost: said again if the listener gives up.
    let mut last_loss: Option<String> = None;
    let outcome = loop {
        let next = async {
            match ahead.take() {
                Some(event) => Some(event),
                None => rx.recv().await,
            }
        };
        tokio::select! {
            _ = queue_reads.tick(), if metrics => {
                let _ = pipe.queue_usage().await;
            }
            event = next => match event {
                Some(Event::Update(update)) => {
                    let position = if print_position {
                        match tokio::time::timeout(POSITION_WAIT, rx.recv()).await {
                            Ok(Some(Event::Position(p))) => Some(p),
                            Ok(Some(other)) => {
                                ahead = Some(other);
                                None
                            }
                            _ => None,
                        }
                    } else {
                        None
                    };
                    if filter.accepts(&update) {
                        let line = update_line(&update, pretty, position.as_ref());
                        if writeln!(stdout, "{line}").and_then(|()| stdout.flush()).is_err() {
                            // Standard output is gone (a closed pipe): stop quietly.
                            break Ok(());
                        }
                        printed += 1;
                    }
                    if consumer && let Some(position) = &position {
                        pipe.ack(position)?;
                    }
                }
                Some(Event::Position(position)) => {
                    // Everything before it is written and flushed (or left out by the
                    // filters).
                    if consumer {
                        pipe.ack(&position)?;
                    }
                }
                Some(Event::Connected) => eprintln!(
                    "updatepipe: listening on channel {:?}{}{}",
                    pipe.config().channel().as_str(),
                    match pipe.config().listen_options().polling() {
                        Some(every) => format!(" (durable, polling the log every {every:?})"),
                        None if pipe.config().durable() => " (durable)".to_owned(),
                        None => String::new(),
                    },
                    if pipe.config().layout() == Layout::Maddy {
                        " and maddy's channels of the --key mailboxes"
                    } else {
                        ""
                    }
                ),
                // The listener stopped by itself: its error ends the command, in one line.
                Some(Event::Disconnected { .. }) if pipe.listen_ended().is_some() => {}
                Some(Event::Disconnected { reason }) => {
                    eprintln!("updatepipe: disconnected ({reason}); reconnecting");
                    last_loss = Some(reason);
                }
                Some(Event::Resync(reason)) => {
                    eprintln!("updatepipe: resync: updates may have been missed ({reason:?})");
                }
                Some(other) => eprintln!("updatepipe: {other:?}"),
                None => break Err(match pipe.listen_ended() {
                    Some(e) => e.into(),
                    None => anyhow::anyhow!(
                        "the listener stopped: {}",
                        last_loss.take().unwrap_or_else(|| {
                            "it could not reconnect to PostgreSQL (see the log above)".into()
                        })
                    ),
                }),
            },
            () = shutdown_signal() => break Ok(()),
        }
    };
    pipe.close().await?;
    let stats = pipe.stats();
    let filtered = if filter.keys.is_empty() && filter.kinds.is_empty() {
        String::new()
    } else {
        format!(" ({printed} printed, the rest left out by --key/--type)")
    };
    eprintln!(
        "updatepipe: delivered {}{filtered}, echoes dropped {}, rejected {}, reconnects {}, \
         replayed {}, resyncs {}",
        stats.delivered,
        stats.echoes_dropped,
        stats.rejected_total(),
        stats.reconnects,
        stats.replayed,
        stats.resyncs
    );
    outcome
}

/// An update's line: its JSON (with its position as `"Position"`), or a readable line
/// (with ` @ <position>`).
fn update_line(update: &Update, pretty: bool, position: Option<&updatepipe::Position>) -> String {
    match (pretty, position) {
        (true, None) => pretty_line(update),
        (true, Some(p)) => format!("{} @ {p}", pretty_line(update)),
        (false, None) => update.to_json(),
        (false, Some(p)) => {
            let json = update.to_json();
            let body = json.strip_suffix('}').unwrap_or(&json);
            // A position's text form holds no character JSON escapes.
            format!("{body},\"Position\":\"{p}\"}}")
        }
    }
}

/// An update given as options (`--type flags --key 42 --uid 17 --flag '\Seen'`).
pub(crate) fn update_from_options(
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

/// Prints the status; warns (on standard error too) when the notification queue is fuller
/// than `queue_warn` percent.
pub(crate) fn print_status(pipe: &PgPipe, status: &updatepipe::Status, queue_warn: f64) {
    outln!("server version      {}", status.server_version);
    outln!(
        "primary             {}",
        if status.in_recovery {
            "no: a standby (in recovery); LISTEN and NOTIFY work only on the primary"
        } else {
            "yes"
        }
    );
    match status.listen_works {
        Some(true) => outln!("LISTEN works        yes (a probe notification arrived)"),
        Some(false) => outln!(
            "LISTEN works        NO: a probe notification never arrived; a transaction-pooling \
             proxy (PgBouncer in transaction mode) breaks LISTEN: connect listeners directly"
        ),
        None if status.queue_full => {
            outln!("LISTEN works        unknown (the full notification queue refused the probe)")
        }
        None => outln!("LISTEN works        unknown (cannot NOTIFY on a standby)"),
    }
    let usage = status.queue_usage * 100.0;
    if status.queue_full {
        outln!(
            "queue usage         {usage:.6} % FULL: the server refuses every NOTIFY in the \
             cluster; some session of this database listens and does not read (a LISTEN in \
             a transaction left open?)"
        );
    } else if usage > queue_warn {
        outln!(
            "queue usage         {usage:.6} % WARNING: above {queue_warn} %; some session of \
             this database listens and does not read (a LISTEN in a transaction left open?)"
        );
        eprintln!("updatepipe: warning: the notification queue is {usage:.6} % full");
    } else {
        outln!("queue usage         {usage:.6} %");
    }
    match status.idle_session_timeout_ms {
        Some(0) | None => {}
        Some(ms) => outln!(
            "idle timeout        idle_session_timeout is {ms} ms: listeners send a statement \
             on their connection every third of it"
        ),
    }
    if let Some(n) = status.listeners {
        outln!("listeners           {n} on this channel (heard by their heartbeats)");
    }
    outln!("channel             {}", pipe.config().channel());
    match status.schema_version {
        Some(v) => outln!(
            "schema version      {v} (this build has {})",
            embedded_migrations().len()
        ),
        None => {
            outln!("schema version      not migrated (run updatepipe migrate for durable mode)")
        }
    }
    if let Some(n) = status.log_entries {
        let age = status
            .oldest_log_entry_secs
            .map_or_else(|| "-".to_owned(), |s| format!("{s:.0} s"));
        outln!("durable log         {n} entries on this channel, oldest {age}");
    }
    if status.schema_version.is_some() && status.log_entries.is_some() {
        match status.log_last_pruned_secs {
            Some(s) => outln!("last pruned         {s:.0} s ago"),
            None => outln!("last pruned         never (no durable listener has pruned yet)"),
        }
    }
    for c in status.consumers.iter().flatten() {
        outln!(
            "consumer            {:?}: {} log entries behind, position {:.0} s old, \
             acknowledged {:.0} s ago by {}",
            c.name,
            c.lag_entries,
            c.lag_secs,
            c.acked_secs_ago,
            c.acked_by
        );
    }
}

pub(crate) async fn push(
    config: Config,
    json: Option<String>,
    given: Option<Update>,
) -> anyhow::Result<()> {
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
        // Never migrates: a runtime role cannot, and must not need to.
        if let Err(e) = pipe.check_schema().await {
            pipe.close().await?;
            return Err(e.into());
        }
    }
    let pushed = pipe.push_many(&updates).await;
    pipe.close().await?;
    pushed?;
    eprintln!("updatepipe: pushed {} update(s)", updates.len());
    Ok(())
}

/// One update per non-empty line; the first bad line is an error naming its number.
pub(crate) fn read_updates(input: impl BufRead) -> anyhow::Result<Vec<Update>> {
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
    use crate::{exit, exit_code, one_line};

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
}
