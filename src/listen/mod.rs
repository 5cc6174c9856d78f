//! The listen path: one dedicated connection per pipe, driven by `poll_message`. It decodes
//! every notification on the channel, drops the pipe's own (echo), rejects what does not
//! decode, and hands the rest to the caller in order. It reconnects by itself, proves its
//! connection with heartbeats, and says when updates may have been missed (resync). In
//! durable mode it reads durable updates from the log, so nothing committed is lost.
//! `docs/delivery.md` argues why.
//!
//! ## How it is built
//!
//! A [`Listener`] is the handle: it opens the first session and spawns the connection loop
//! (`task`), which owns named sub-states, each with its own fields and its own answer to
//! "what does a reconnect do to me" (`on_reconnect`):
//!
//! - `settings`: what the configuration says, read once.
//! - `connector` and `session`: the backoff, and opening one subscribed connection.
//! - `intake` (with `gaps` and `replay`): the pure verdict on a notification or a log row.
//!   On a reconnect, best effort forgets the senders' numbers.
//! - `subscriptions` (in the intake): the maddy layout's mailboxes, reference-counted, and
//!   the `LISTEN`/`UNLISTEN` each change needs, run one at a time in the loop's own slot. On
//!   a reconnect, the new session listens on the whole set, and a resync covers it.
//! - `outbox`: the bounded hand-off to the caller, and the slow-consumer policy.
//! - `durable`: the log position, and what to read, fetch or prune next. On a reconnect, in
//!   durable mode, the tail is read as a catch-up; it says whether a resync is owed.
//! - `heartbeat`: the proof that the connection works. On a reconnect, nothing is
//!   outstanding, and the next is due in half an interval.
//! - `pacer`: the pacing of warnings that senders can provoke.
//! - `watch`: the sampling of the server's notification queue, with a warning when it
//!   fills. A reconnect does nothing to it.
//!
//! The loop only does I/O and dispatch: a notification goes to the intake, and its
//! [`Verdict`](intake::Verdict) to the outbox, the log reader or the heartbeat; the log
//! reader's next ask becomes a query in the loop's query slot, and its rows go through the
//! intake to the outbox. After a reconnect the caller hears `Connected`, then, when one is
//! owed, a resync.

use std::sync::Arc;
use std::sync::atomic::AtomicBool;

use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
use tokio::time::Instant;

use crate::config::Config;
use crate::envelope::Packer;
use crate::error::Error;
use crate::origin::Origin;
use crate::pg::Canceller;
use crate::stats::Counters;
use crate::update::{MailboxKey, Update};

mod connector;
mod dispatch;
mod durable;
mod gaps;
mod heartbeat;
mod intake;
mod outbox;
mod pacer;
mod replay;
mod session;
mod settings;
mod subscriptions;
mod task;
mod watch;

pub(crate) use outbox::Sink;
pub(crate) use subscriptions::Command;

const TARGET: &str = "updatepipe::listen";

/// How many subscription changes may wait for the listener task (more wait to be queued).
const COMMAND_QUEUE: usize = 64;

/// What a listener tells an application that asked for events
/// ([`PgPipe::listen_events`](crate::PgPipe::listen_events)), in order.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Event {
    /// An update from another sender.
    Update(Update),
    /// The listener is subscribed: updates committed from now on will arrive.
    Connected,
    /// The connection was lost; the listener is reconnecting.
    Disconnected {
        /// Why, in words.
        reason: String,
    },
    /// Updates may have been missed: reload your state (for IMAP: the mailboxes' views).
    Resync(ResyncReason),
}

/// Why a listener asks for a resync.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum ResyncReason {
    /// The connection was lost and is back; in best-effort mode whatever was sent
    /// meanwhile is lost.
    Reconnected,
    /// A sender's envelope numbers skipped: something between was not received (or that
    /// sender's push failed midway).
    SequenceGap {
        /// The sender.
        origin: String,
        /// The number expected next.
        expected: u64,
        /// The number received.
        got: u64,
    },
    /// The listener was away longer than the durable log's retention: entries it had not
    /// read were pruned.
    LogPruned,
    /// A committed update could not be read: its log entry is gone, undecodable (for
    /// example written by a newer version), or with signing on, older than the retention
    /// and replay window allow.
    Unreadable {
        /// The sender.
        origin: String,
    },
    /// The application did not read for so long that the listener let go of updates.
    SlowConsumer {
        /// How many updates were let go.
        dropped: u64,
    },
    /// The maddy layout: the connection was lost and is back, subscribed again to these
    /// mailboxes' channels. maddy's updates are not logged, so whatever maddy nodes sent
    /// them meanwhile is lost, in durable mode too: reload these mailboxes. Raised when the
    /// reconnect owes no [`Reconnected`](ResyncReason::Reconnected) resync, which covers
    /// every mailbox (that is, in durable mode).
    Resubscribed {
        /// The subscribed mailboxes.
        keys: Vec<MailboxKey>,
    },
    /// The maddy layout: a maddy node sent an update for this mailbox that the pipe cannot
    /// take as it is (a flag it refuses, such as a non-ASCII one): reload the mailbox.
    Unrepresentable {
        /// The mailbox.
        key: MailboxKey,
    },
}

impl ResyncReason {
    /// Whether it concerns some mailboxes only, which it names (the maddy layout's), rather
    /// than everything.
    pub fn is_per_mailbox(&self) -> bool {
        matches!(
            self,
            ResyncReason::Resubscribed { .. } | ResyncReason::Unrepresentable { .. }
        )
    }
}

/// The running listener: its task, and the signal that stops it.
#[derive(Debug)]
pub(crate) struct Listener {
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<()>,
    /// Subscriptions by mailbox, for the task.
    commands: mpsc::Sender<Command>,
}

impl Listener {
    /// Connects, issues `LISTEN` on the quoted channel, and returns once the server has
    /// confirmed it: every notification committed from then on reaches the sink. The
    /// first connection's errors are returned (with `wait_for_server`, only once retrying
    /// is over: a bad configuration, the attempts used up, or `closed`); later ones are
    /// retried in the background.
    pub(crate) async fn start(
        config: &Config,
        origin: Origin,
        sink: Sink,
        counters: Arc<Counters>,
        heartbeat_pool: deadpool_postgres::Pool,
        closed: &AtomicBool,
    ) -> Result<Listener, Error> {
        let settings = settings::Settings::from_config(config);
        let canceller = Canceller::new(config.server())?;
        let connector = connector::Connector::new(config.clone(), settings.clone());
        let (session, cursor) = if config.listen_options().wait_for_server() {
            connector.open_first_waiting(closed).await?
        } else {
            connector.open_first().await?
        };
        let now = Instant::now();
        let packer = Packer::new(&origin, std::process::id(), settings.signer.clone());
        let heartbeat_watch_pool = heartbeat_pool.clone();
        let counters_for_watch = counters.clone();
        let mut dispatch = dispatch::Dispatch {
            intake: intake::Intake::new(&settings, origin),
            outbox: outbox::Outbox::new(sink, settings.max_buffered, counters.clone()),
            // A replay from the past counts as replayed.
            reader: durable::LogReader::new(
                settings.durable,
                settings.retention,
                settings.page,
                cursor,
                settings.since.is_some(),
                now,
            ),
            heartbeat: heartbeat::Heartbeat::new(
                heartbeat::Clock::new(settings.health_interval, now),
                packer,
                settings.channel.clone(),
                heartbeat_pool,
                canceller.clone(),
            ),
            rejections: pacer::Pacer::default(),
            log_errors: pacer::Pacer::default(),
            cancelled_pages: pacer::Pacer::default(),
            prunes_skipped: (0, pacer::Pacer::default()),
            page_pause: settings.page_pause(),
            counters,
        };
        dispatch.outbox.emit(Event::Connected);
        let watch = watch::QueueWatch::new(
            heartbeat_watch_pool,
            canceller.clone(),
            settings.health_interval,
            config.listen_options().queue_warn(),
            counters_for_watch,
            now,
        );
        let task = task::ConnectionLoop {
            connector,
            dispatch,
            watch,
            channel: settings.channel.clone(),
            slot: task::QuerySlot::new(
                settings.query_deadline(),
                settings.cancel_grace(),
                canceller,
            ),
        };
        let (stop, stopped) = oneshot::channel();
        let (commands, received) = mpsc::channel(COMMAND_QUEUE);
        Ok(Listener {
            stop: Some(stop),
            task: tokio::spawn(task.run(session, stopped, received)),
            commands,
        })
    }

    /// Where subscriptions are asked for: the task answers each once the server has
    /// confirmed it (or a new session has subscribed again).
    pub(crate) fn commands(&self) -> mpsc::Sender<Command> {
        self.commands.clone()
    }

    /// Stops the task and waits for it: the connection is closed and the caller's channel
    /// ends when this returns.
    pub(crate) async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Err(e) = (&mut self.task).await
            && e.is_panic()
        {
            tracing::error!(target: TARGET, "listener task panicked: {e}");
        }
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        // Dropped without `stop` (the pipe itself was dropped): nothing may outlive it.
        self.task.abort();
    }
}
