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
//! (`task`). The modules form a tree, each importing only those below it:
//!
//! - `task`: the loop, I/O only. It starts what `schedule` says, polls the connection and
//!   the slots, and hands what arrives to `dispatch`; `connector` (with `session`) opens a
//!   session, and counts the attempts and the backoff between them; `query` runs a
//!   statement in the query slot by its deadline, cancelling it past that; `watch` samples
//!   the server's notification queue.
//! - `schedule`: what the loop starts next, and until when it waits: a pure function of the
//!   sub-states, the slots and the clock, unit-tested without a server.
//! - `dispatch`: the sub-states, reached through its methods only, and what each thing that
//!   arrives does to them; each sub-state has its own answer to "what does a reconnect do
//!   to me" (`on_reconnect`):
//!   - `intake` (with `gaps`, `replay` and `subscriptions`, the maddy layout's mailboxes):
//!     the pure verdict on a notification or a log row. On a reconnect, best effort forgets
//!     the senders' numbers, and the subscriptions are listened on again.
//!   - `outbox`: the bounded hand-off to the caller, the slow-consumer policy, and the
//!     folding of resyncs.
//!   - `durable`: the log position, and what to read, fetch or prune next. On a reconnect,
//!     in durable mode, the tail is read as a catch-up; it says whether a resync is owed.
//!   - `heartbeat`: the proof that the connection works. On a reconnect, nothing is
//!     outstanding, and the next is due in half an interval.
//! - At the bottom: `event` (what the caller hears), `settings` (what the configuration
//!   says, read once), `pacer` (the pacing of warnings that senders can provoke).
//!
//! After a reconnect the caller hears `Connected`, then, when one is owed, a resync.

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

mod acks;
mod connector;
mod dispatch;
mod durable;
mod event;
mod gaps;
mod heartbeat;
mod intake;
mod outbox;
mod pacer;
mod query;
mod recover;
mod replay;
mod schedule;
mod session;
mod settings;
mod subscriptions;
mod task;
mod watch;

pub use acks::ACK_INTERVAL;
pub(crate) use acks::Acks;
pub use event::{Event, ResyncReason};
pub(crate) use outbox::Sink;
pub(crate) use subscriptions::Command;

/// How many subscription changes may wait for the listener task (more wait to be queued).
const COMMAND_QUEUE: usize = 64;

/// Where a listener that stopped by itself leaves the error that stopped it, for
/// [`PgPipe::listen_ended`](crate::PgPipe::listen_ended).
pub(crate) type Ended = Arc<std::sync::Mutex<Option<Error>>>;

/// What the pipe gives its listener: its origin (to know its own envelopes), its counters,
/// its pool (heartbeats and acknowledgements go out through it, as pushes do), and where
/// to leave the error that stopped the listener by itself.
#[derive(Debug)]
pub(crate) struct FromPipe {
    pub(crate) origin: Origin,
    pub(crate) counters: Arc<Counters>,
    pub(crate) pool: deadpool_postgres::Pool,
    pub(crate) ended: Ended,
}

/// The running listener: its task, and the signal that stops it.
#[derive(Debug)]
pub(crate) struct Listener {
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<()>,
    /// Subscriptions by mailbox, for the task.
    commands: mpsc::Sender<Command>,
    /// A named consumer's acknowledgements, and the task that writes them.
    acks: Option<(Arc<Acks>, JoinHandle<()>)>,
}

impl Listener {
    /// Connects, issues `LISTEN` on the quoted channel, and returns once the server has
    /// confirmed it: every notification committed from then on reaches the sink. The
    /// first connection's errors are returned (with `wait_for_server`, only once retrying
    /// is over: a bad configuration, the attempts used up, or `closed`); later ones are
    /// retried in the background.
    pub(crate) async fn start(
        config: &Config,
        pipe: FromPipe,
        sink: Sink,
        closed: &AtomicBool,
        own_updates: bool,
    ) -> Result<Listener, Error> {
        let FromPipe {
            origin,
            counters,
            pool: heartbeat_pool,
            ended,
        } = pipe;
        let mut settings = settings::Settings::from_config(config);
        settings.own_updates = own_updates;
        if let Some(name) = &settings.consumer {
            crate::log::check_consumer_name(name)?;
            if !settings.durable {
                return Err(Error::Config(
                    "a named consumer reads the durable log: turn durable mode on".into(),
                ));
            }
            if !matches!(sink, Sink::Events(_)) {
                return Err(Error::Config(
                    "a named consumer acknowledges the positions that come as events: \
                     listen with listen_events"
                        .into(),
                ));
            }
        }
        if settings.polling.is_some() {
            let refused = if !settings.durable {
                Some("polling reads the durable log: turn durable mode on")
            } else if settings.consumer.is_some() {
                Some(
                    "a named consumer holds a session lock, which a transaction pooler (where \
                     polling is for) does not keep: poll without a consumer, or listen with \
                     one on a direct connection",
                )
            } else if config.layout() == crate::layout::Layout::Maddy {
                Some("the maddy layout needs LISTEN for maddy's updates, which are in no log")
            } else {
                None
            };
            if let Some(why) = refused {
                return Err(Error::Config(why.into()));
            }
            counters.polling();
        }
        if config.channel().is_maddy_mailbox() {
            tracing::warn!(
                target: event::TARGET,
                channel = config.channel().as_str(),
                "the pipe's channel is the one maddy uses for a numeric mailbox: maddy's nodes \
                 listening on that mailbox read the pipe's envelopes and heartbeats as updates \
                 they cannot read; give the pipe a channel of its own"
            );
        }
        let canceller = Canceller::new(config.server())?;
        let mut connector = connector::Connector::new(config.clone(), settings.clone());
        let (session, log) = if config.listen_options().wait_for_server() {
            connector.open_first_waiting(closed).await?
        } else {
            connector.open_first().await?
        };
        // Acknowledgements go through the pool, as heartbeats do, with the epoch the
        // session claimed.
        let acks = settings.consumer.clone().map(|name| {
            let acks = Acks::new(
                settings.channel.clone(),
                name,
                heartbeat_pool.clone(),
                config.push_options().timeout(),
            );
            if let Some(epoch) = log.as_ref().and_then(|log| log.epoch) {
                acks.set_epoch(epoch);
            }
            let writer = acks.spawn();
            (acks, writer)
        });
        let now = Instant::now();
        let heartbeat = heartbeat::Heartbeat::new(
            heartbeat::Clock::new(settings.heartbeat_interval(), now),
            Packer::new(&origin, std::process::id(), settings.signer.clone()),
            settings.channel.clone(),
            heartbeat_pool.clone(),
            canceller.clone(),
            // A checkout may open a connection, trying every host in turn.
            settings.connect_timeout * config.pg().get_hosts().len().max(1) as u32,
        );
        let watch = watch::QueueWatch::new(
            heartbeat_pool,
            canceller.clone(),
            settings.health_interval,
            config.listen_options().queue_warn(),
            counters.clone(),
            now,
        );
        let task = task::ConnectionLoop {
            dispatch: dispatch::Dispatch::new(
                &settings, origin, sink, heartbeat, log, counters, now,
            )
            .acknowledging(acks.as_ref().map(|(acks, _)| acks.clone())),
            schedule: schedule::Schedule::new(settings.query_deadline(), now)
                .polling(settings.polling),
            slot: query::QuerySlot::new(
                settings.query_deadline(),
                settings.cancel_grace(),
                canceller,
            ),
            watch,
            channel: settings.channel.clone(),
            connector,
            ended,
        };
        let (stop, stopped) = oneshot::channel();
        let (commands, received) = mpsc::channel(COMMAND_QUEUE);
        Ok(Listener {
            stop: Some(stop),
            task: tokio::spawn(task.run(session, stopped, received)),
            commands,
            acks,
        })
    }

    /// Where subscriptions are asked for: the task answers each once the server has
    /// confirmed it (or a new session has subscribed again).
    pub(crate) fn commands(&self) -> mpsc::Sender<Command> {
        self.commands.clone()
    }

    /// A named consumer's acknowledgements; `None` without a consumer.
    pub(crate) fn acks(&self) -> Option<Arc<Acks>> {
        self.acks.as_ref().map(|(acks, _)| acks.clone())
    }

    /// Stops the task and waits for it: the connection is closed and the caller's channel
    /// ends when this returns.
    pub(crate) async fn stop(mut self) {
        // The last acknowledged position is written first, while the session still holds
        // the consumer (no other process can have taken it over yet).
        if let Some((acks, writer)) = self.acks.take() {
            if let Err(e) = acks.flush().await {
                tracing::warn!(
                    target: event::TARGET,
                    error = %e,
                    "writing the consumer's last acknowledged position failed"
                );
            }
            writer.abort();
        }
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Err(e) = (&mut self.task).await
            && e.is_panic()
        {
            tracing::error!(target: event::TARGET, "listener task panicked: {e}");
        }
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        // Dropped without `stop` (the pipe itself was dropped): nothing may outlive it.
        self.task.abort();
        if let Some((_, writer)) = &self.acks {
            writer.abort();
        }
    }
}
