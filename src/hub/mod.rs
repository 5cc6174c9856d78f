//! The IDLE hub: one pipe's updates fanned out to every IMAP session of the process, each
//! [`Watch`] getting its mailbox's updates in order, and a reload when some may be missing.
//!
//! The pipe delivers every update of the process into one stream. An IMAP server needs,
//! for each IDLE session, the updates of the mailbox it has selected. The hub takes the
//! pipe's event stream ([`PgPipe::hub`]) and routes it, in a task of its own:
//!
//! - an update goes to the watches of its mailbox, decoded once and shared (an
//!   `Arc<Update>`), in the order the pipe delivered it. The pipe's own updates too
//!   ([`HubOptions::with_own_updates`]): a session hears what another session of the process
//!   stored, once the server committed it, in commit order with everyone else's;
//! - each watch holds at most its bound of events. A session that does not read never
//!   delays the hub or any other watch: when its queue is full, its backlog is dropped for
//!   one [`ReloadReason::Lagged`], and what comes after is kept again;
//! - a resync of the pipe reaches the watches it concerns as
//!   [`ReloadReason::Resync`]: all of them for one that concerns everything (a reconnect in
//!   best-effort mode, a gap, a pruned or changed log), the named mailboxes' for the maddy
//!   layout's per-mailbox ones; none where durable mode replayed everything (the pipe then
//!   raises no resync);
//! - a [`MailboxDestroyed`](crate::UpdateKind::MailboxDestroyed) update is the last event
//!   of its mailbox's watches: [`Watch::recv`] gives `None` after it (an IMAP server ends
//!   the session's selection). A new watch of the same key starts afresh;
//! - in the maddy layout the hub drives [`PgPipe::subscribe`]: the first watch of a
//!   mailbox subscribes (and returns once the server listens), dropping the last
//!   unsubscribes after a grace ([`HubOptions::with_unsubscribe_grace`]), so that a client
//!   that selects the mailbox again causes no `UNLISTEN`/`LISTEN`.
//!
//! A session opens its watch, then reads the mailbox's state from the store: an update
//! committed in between is then in the state it read or in the watch (or both: updates
//! that repeat the state read must be harmless to apply, as IMAP's are when a view is
//! keyed by UID). Read first and an update committed before the watch opened is lost to
//! the session.
//!
//! In the maddy layout, the first watch of a mailbox waits for the pipe's `LISTEN`, and
//! while the listener's connection is lost, for its return; put a timeout around it if a
//! session must not wait (`watch` is cancel-safe). Watches of mailboxes listened for
//! already never wait.
//!
//! The hub owns the pipe's listener: dropping it (or [`Hub::close`]) stops the listener,
//! which closes its connection and with it every `LISTEN`, and ends every watch. A pipe
//! listens once: after its hub, it can still push, not listen again. Closing the pipe ends
//! the hub, and so does a listener that stops by itself (its reconnect attempts used up,
//! or LISTEN not working through a pooler): every watch ends, and
//! [`PgPipe::listen_ended`] says why. The watches' counts are in the pipe's [`Stats`](crate::Stats)
//! (`watches`, `watch_delivered`, `watch_lagged`, `watch_missed`) and metrics.

use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::sync::{Notify, mpsc, oneshot};
use tokio::task::JoinHandle;

use crate::error::Error;
use crate::layout::Layout;
use crate::pipe::PgPipe;
use crate::stats::Counters;
use crate::update::MailboxKey;

mod table;
mod task;
mod watch;

pub use watch::{MailboxEvent, ReloadReason, Watch, WatchOptions, WatchStats};

use table::Table;
use watch::{Kinds, Offered, Slot};

/// The default bound on the events one watch holds for a session that does not read.
pub const DEFAULT_WATCH_BOUND: usize = 256;

/// The default time the hub keeps listening for a maddy-layout mailbox after its last
/// watch went.
pub const DEFAULT_UNSUBSCRIBE_GRACE: Duration = Duration::from_secs(2);

/// The longest unsubscribe grace a hub takes (a day).
const MAX_UNSUBSCRIBE_GRACE: Duration = Duration::from_secs(24 * 3600);

/// The default bound on the pipe's events waiting for the hub's task.
pub const DEFAULT_HUB_BUFFER: usize = 4096;

/// The hub's log target.
const TARGET: &str = "updatepipe::hub";

/// Options of a hub ([`PgPipe::hub`]).
#[derive(Clone, Debug)]
pub struct HubOptions {
    watch_bound: usize,
    grace: Duration,
    buffer: usize,
    own_updates: bool,
}

impl Default for HubOptions {
    fn default() -> Self {
        HubOptions {
            watch_bound: DEFAULT_WATCH_BOUND,
            grace: DEFAULT_UNSUBSCRIBE_GRACE,
            buffer: DEFAULT_HUB_BUFFER,
            own_updates: true,
        }
    }
}

impl HubOptions {
    /// The most events a watch holds for a session that does not read, unless the watch
    /// says otherwise ([`WatchOptions::with_bound`]); default [`DEFAULT_WATCH_BOUND`], at
    /// least 1. Memory: a watch that never reads holds at most this many events (each a
    /// pointer to an update that other watches share).
    pub fn with_watch_bound(mut self, bound: usize) -> Self {
        self.watch_bound = bound;
        self
    }

    /// The maddy layout: how long the pipe keeps listening for a mailbox after its last
    /// watch went (default [`DEFAULT_UNSUBSCRIBE_GRACE`], at most a day); a watch of it
    /// within the grace needs no new `LISTEN`.
    pub fn with_unsubscribe_grace(mut self, grace: Duration) -> Self {
        self.grace = grace;
        self
    }

    /// The bound on the pipe's events waiting for the hub's task (default
    /// [`DEFAULT_HUB_BUFFER`], at least 1). The task never waits for a watch, so this only
    /// fills when the process has no CPU for it; then the pipe's own slow-consumer policy
    /// applies ([`ListenOptions::with_max_buffered`](crate::ListenOptions::with_max_buffered)),
    /// and its resync reaches every watch.
    pub fn with_buffer(mut self, buffer: usize) -> Self {
        self.buffer = buffer;
        self
    }

    /// Whether the watches also get the updates this pipe pushes (default yes): a session
    /// then hears what another session of the process stored, as it hears other
    /// processes' updates: once committed, in commit order (they come back from the
    /// server; a push inside the caller's transaction, once that commits). Turn it off
    /// when the application hands its own updates to its sessions itself.
    pub fn with_own_updates(mut self, own: bool) -> Self {
        self.own_updates = own;
        self
    }

    fn check(&self) -> Result<(), Error> {
        if self.watch_bound == 0 {
            return Err(Error::Config(
                "a hub's watch bound must be at least 1".into(),
            ));
        }
        if self.buffer == 0 {
            return Err(Error::Config("a hub's buffer must be at least 1".into()));
        }
        if self.grace > MAX_UNSUBSCRIBE_GRACE {
            return Err(Error::Config(format!(
                "a hub's unsubscribe grace is at most {} s",
                MAX_UNSUBSCRIBE_GRACE.as_secs()
            )));
        }
        Ok(())
    }
}

impl PgPipe {
    /// An IDLE hub on this pipe's listener: one [`Watch`] per IMAP session, each getting
    /// its mailbox's updates in order, and a reload when some may be missing; a session
    /// that does not read never holds the others (see [`Hub`]). Takes the pipe's event
    /// stream: it starts the listener as [`listen_events`](PgPipe::listen_events) does, so
    /// a pipe that listens already fails with [`Error::AlreadyListening`]; a named
    /// consumer's pipe, or a bound or buffer of 0, with [`Error::Config`];
    /// [`Error::Closed`] once the pipe is closed.
    pub async fn hub(&self, options: HubOptions) -> Result<Hub, Error> {
        if self.is_closed() {
            return Err(Error::Closed);
        }
        Hub::start(self, options).await
    }
}

/// What the hub's task, its handle and the watches share.
#[derive(Debug)]
struct Shared {
    table: Mutex<Table>,
    /// Taken while the pipe subscribes or unsubscribes a mailbox for the hub, so that the
    /// two never cross for one mailbox.
    subscriptions: Arc<tokio::sync::Mutex<()>>,
    /// Wakes the task when a grace started (it sleeps until the first expires).
    graces: Notify,
    pipe: PgPipe,
    counters: Arc<Counters>,
    maddy: bool,
    watch_bound: usize,
}

impl Shared {
    fn table(&self) -> MutexGuard<'_, Table> {
        // Every change to the table is whole before anything that may panic.
        self.table.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A watch was dropped.
    fn release(&self, key: &MailboxKey, id: u64) {
        let grace = self.table().close(key, id, tokio::time::Instant::now());
        if grace {
            self.graces.notify_one();
        }
    }

    fn count(&self, offered: Offered) {
        self.counters
            .watched(offered.delivered, offered.lagged, offered.missed);
    }
}

/// The IDLE hub over one pipe ([`PgPipe::hub`]; the module's documentation says what it
/// does). Cloning gives another handle to the same hub; it runs while a handle lives.
#[derive(Clone, Debug)]
pub struct Hub {
    shared: Arc<Shared>,
    run: Arc<Run>,
}

/// The hub's task, stopped when the last handle goes.
#[derive(Debug)]
struct Run {
    stop: Mutex<Option<oneshot::Sender<()>>>,
    task: Mutex<Option<JoinHandle<()>>>,
}

impl Drop for Run {
    fn drop(&mut self) {
        if let Some(stop) = self
            .stop
            .get_mut()
            .unwrap_or_else(|e| e.into_inner())
            .take()
        {
            let _ = stop.send(());
        }
    }
}

impl Hub {
    /// Starts a hub on `pipe`'s listener (see [`PgPipe::hub`]).
    pub(crate) async fn start(pipe: &PgPipe, options: HubOptions) -> Result<Hub, Error> {
        options.check()?;
        if pipe.config().listen_options().consumer().is_some() {
            return Err(Error::Config(
                "a hub's sessions come and go, while a named consumer acknowledges what one \
                 reader handled: give the hub's pipe no consumer"
                    .into(),
            ));
        }
        let (events_tx, events) = mpsc::channel(options.buffer);
        if options.own_updates {
            pipe.listen_for_hub(events_tx).await?;
        } else {
            pipe.listen_events(events_tx).await?;
        }
        let shared = Arc::new(Shared {
            table: Mutex::new(Table::new(options.grace, pipe.counters())),
            subscriptions: Arc::new(tokio::sync::Mutex::new(())),
            graces: Notify::new(),
            pipe: pipe.clone(),
            counters: pipe.counters(),
            maddy: pipe.config().layout() == Layout::Maddy,
            watch_bound: options.watch_bound,
        });
        let (stop, stopped) = oneshot::channel();
        let task = tokio::spawn(task::run(shared.clone(), events, stopped));
        Ok(Hub {
            shared,
            run: Arc::new(Run {
                stop: Mutex::new(Some(stop)),
                task: Mutex::new(Some(task)),
            }),
        })
    }

    /// A watch of `key`'s mailbox, with the hub's options: see
    /// [`watch_with`](Hub::watch_with).
    pub async fn watch(&self, key: impl Into<MailboxKey>) -> Result<Watch, Error> {
        self.watch_with(key, WatchOptions::default()).await
    }

    /// A watch of `key`'s mailbox: every update of it the pipe delivers from now on, in
    /// order. In the maddy layout, the first watch of a mailbox returns once the pipe
    /// listens on the mailbox's channel (a key that cannot be a channel needs none: maddy
    /// nodes cannot send for it). Cancel-safe: a subscription started for a watch whose
    /// caller gave up is completed, and released after the grace.
    ///
    /// [`Error::Closed`] once the hub has stopped; [`Error::Config`] for a bound of 0; the
    /// pipe's error when the subscription fails.
    pub async fn watch_with(
        &self,
        key: impl Into<MailboxKey>,
        options: WatchOptions,
    ) -> Result<Watch, Error> {
        let key = key.into();
        if self.shared.pipe.is_closed() {
            return Err(Error::Closed);
        }
        let bound = options.bound.unwrap_or(self.shared.watch_bound);
        if bound == 0 {
            return Err(Error::Config("a watch's bound must be at least 1".into()));
        }
        let slot = Arc::new(Slot::new(bound, options.kinds.unwrap_or(Kinds::ALL)));
        let listens = self.shared.maddy && key.maddy_channel().is_ok();
        // A mailbox the pipe listens for already needs no lock: a watch of a mailbox being
        // subscribed or unsubscribed waits for that to finish.
        let listened = match listens {
            true => self.shared.table().open_listened(&key, &slot),
            false => None,
        };
        if let Some(id) = listened {
            return Ok(Watch::new(slot, key, id, self.shared.clone()));
        }
        let guard = if listens {
            Some(self.shared.subscriptions.clone().lock_owned().await)
        } else {
            None
        };
        let (id, subscribe) = self
            .shared
            .table()
            .open(&key, slot.clone(), listens)
            .map_err(|_| Error::Closed)?;
        let watch = Watch::new(slot, key.clone(), id, self.shared.clone());
        if subscribe {
            // In a task of its own, holding the lock: it completes even if this caller
            // gives up, and the table then knows what the pipe listens for.
            let shared = self.shared.clone();
            let subscribing = tokio::spawn(async move {
                let _guard = guard;
                let result = shared.pipe.subscribe(key.clone()).await;
                let grace =
                    shared
                        .table()
                        .subscribed(&key, result.is_ok(), tokio::time::Instant::now());
                if grace {
                    shared.graces.notify_one();
                }
                result
            });
            match subscribing.await {
                Ok(result) => result?,
                Err(join) if join.is_panic() => std::panic::resume_unwind(join.into_panic()),
                // Cancelled: the runtime is shutting down.
                Err(_) => return Err(Error::Closed),
            }
        }
        Ok(watch)
    }

    /// Open watches.
    pub fn watches(&self) -> usize {
        self.shared.table().watches()
    }

    /// Mailboxes with watches, and maddy-layout mailboxes in their grace.
    pub fn mailboxes(&self) -> usize {
        self.shared.table().mailboxes()
    }

    /// The maddy layout: mailboxes the pipe listens for on the hub's behalf (those in
    /// their grace included).
    pub fn subscribed(&self) -> usize {
        self.shared.table().subscribed_count()
    }

    /// Stops the hub and waits for its task: every watch ends (after what it holds), and
    /// the pipe's listener stops with its connection. Other handles of the hub see it
    /// stopped.
    pub async fn close(&self) -> Result<(), Error> {
        let stop = self
            .run
            .stop
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        if let Some(stop) = stop {
            let _ = stop.send(());
        }
        let task = self
            .run
            .task
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        if let Some(task) = task {
            let _ = task.await;
        }
        Ok(())
    }
}
