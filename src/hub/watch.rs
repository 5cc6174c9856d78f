//! One watch: its bounded queue (the hub's side offers, never waits), and the handle an
//! IDLE session reads from.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, MutexGuard};

use tokio::sync::Notify;

use crate::listen::ResyncReason;
use crate::update::{MailboxKey, Update, UpdateKind};

use super::Shared;

/// What a watch tells its IDLE session, in order. Exhaustive: a session handles these two.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum MailboxEvent {
    /// An update of the watched mailbox from another sender, decoded once and shared by
    /// every watch of the mailbox. A [`MailboxDestroyed`](UpdateKind::MailboxDestroyed)
    /// update is the watch's last event: [`Watch::recv`] gives `None` after it.
    Update(Arc<Update>),
    /// Updates of this mailbox may be missing from what came before: re-read the mailbox's
    /// state from the store. Updates after this event were committed after the ones missed.
    Reload(ReloadReason),
}

/// Why a watch must reload its mailbox: it fell behind, or the pipe may have missed
/// updates. (The pipe's own reasons are open-ended, within [`ResyncReason`].)
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ReloadReason {
    /// The session fell behind by the watch's bound: its backlog (`missed` updates) was
    /// dropped rather than let grow. Told once however far behind the session is; what
    /// comes after it is kept again, up to the bound.
    Lagged {
        /// The updates dropped (since the session last read this watch's events).
        missed: u64,
    },
    /// The pipe asked for a resync that concerns this mailbox: every watch hears one that
    /// concerns everything (a reconnect in best-effort mode, a sequence gap, a pruned or
    /// changed log, ...), only the named mailboxes' watches hear one that names mailboxes
    /// ([`ResyncReason::is_per_mailbox`]).
    Resync(Arc<ResyncReason>),
}

/// Options of one watch ([`Hub::watch_with`](super::Hub::watch_with)).
#[derive(Clone, Debug, Default)]
pub struct WatchOptions {
    pub(super) bound: Option<usize>,
    pub(super) kinds: Option<Kinds>,
}

impl WatchOptions {
    /// The most events this watch holds for a session that does not read (default the
    /// hub's, [`HubOptions::with_watch_bound`](super::HubOptions::with_watch_bound)); at
    /// least 1.
    pub fn with_bound(mut self, bound: usize) -> Self {
        self.bound = Some(bound);
        self
    }

    /// Only updates of these kinds (default all). A
    /// [`MailboxDestroyed`](UpdateKind::MailboxDestroyed) update always comes, since it
    /// ends the watch; reloads always come.
    pub fn with_kinds(mut self, kinds: impl IntoIterator<Item = UpdateKind>) -> Self {
        let mut set = Kinds::NONE;
        for kind in kinds {
            set = set.with(kind);
        }
        self.kinds = Some(set);
        self
    }
}

/// A set of update kinds, one bit each.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct Kinds(u8);

impl Kinds {
    pub(super) const NONE: Kinds = Kinds(0);
    pub(super) const ALL: Kinds = Kinds(u8::MAX);

    fn bit(kind: UpdateKind) -> u8 {
        1 << (kind.code() % 8)
    }

    pub(super) fn with(self, kind: UpdateKind) -> Kinds {
        Kinds(self.0 | Kinds::bit(kind))
    }

    pub(super) fn admits(self, kind: UpdateKind) -> bool {
        kind == UpdateKind::MailboxDestroyed || self.0 & Kinds::bit(kind) != 0
    }
}

/// A watch's counts ([`Watch::stats`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct WatchStats {
    /// Updates the watch took (its kinds) in its queue, including those later dropped.
    pub delivered: u64,
    /// Times it fell behind by its bound (each a [`ReloadReason::Lagged`] it was told).
    pub lagged: u64,
    /// Updates dropped from its backlog when it fell behind.
    pub missed: u64,
}

/// What offering an event to a slot did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(super) struct Offered {
    /// Watches offered an event (taken or not).
    pub(super) visited: u64,
    /// Updates queued.
    pub(super) delivered: u64,
    /// Reload(Lagged) events newly queued.
    pub(super) lagged: u64,
    /// Updates dropped from the backlog.
    pub(super) missed: u64,
}

impl std::ops::AddAssign for Offered {
    fn add_assign(&mut self, other: Offered) {
        self.visited += other.visited;
        self.delivered += other.delivered;
        self.lagged += other.lagged;
        self.missed += other.missed;
    }
}

/// A watch's queue, shared by the hub (which offers) and the watch (which takes).
#[derive(Debug)]
pub(super) struct Slot {
    queue: Mutex<Queue>,
    ready: Notify,
    bound: usize,
    kinds: Kinds,
}

#[derive(Debug, Default)]
struct Queue {
    events: VecDeque<MailboxEvent>,
    /// No more events will come (the mailbox was destroyed, or the hub ended).
    ended: bool,
    stats: WatchStats,
}

/// A drained queue keeps at most this much room (an idle watch stays small).
const KEEP_CAPACITY: usize = 16;

impl Slot {
    pub(super) fn new(bound: usize, kinds: Kinds) -> Slot {
        Slot {
            queue: Mutex::new(Queue::default()),
            ready: Notify::new(),
            bound,
            kinds,
        }
    }

    fn lock(&self) -> MutexGuard<'_, Queue> {
        // A panic elsewhere while holding it leaves a consistent queue.
        self.queue.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Queues an update, if the watch takes its kind; never waits. A full queue is
    /// replaced by one `Reload(Lagged)` (merged with one not read yet), and the update
    /// counted as missed with the rest: the reload reads past it. A destroyed mailbox's
    /// update is queued whatever the bound, and ends the watch.
    pub(super) fn offer_update(&self, update: &Arc<Update>) -> Offered {
        let visited = Offered {
            visited: 1,
            ..Offered::default()
        };
        if !self.kinds.admits(update.kind()) {
            return visited;
        }
        let destroyed = update.kind() == UpdateKind::MailboxDestroyed;
        let mut queue = self.lock();
        if queue.ended {
            return visited;
        }
        let was_empty = queue.events.is_empty();
        let mut offered = Offered {
            delivered: 1,
            ..visited
        };
        queue.stats.delivered += 1;
        let full = queue.events.len() >= self.bound;
        if full {
            offered += queue.lag(u64::from(!destroyed));
        }
        if destroyed || !full {
            queue.events.push_back(MailboxEvent::Update(update.clone()));
        }
        queue.ended = destroyed;
        drop(queue);
        if was_empty || destroyed {
            self.ready.notify_one();
        }
        offered
    }

    /// Queues a reload (a resync of the pipe), unless the last event queued is a reload
    /// already (reading the mailbox then covers this one too). A full queue lags as for
    /// an update.
    pub(super) fn offer_reload(&self, reason: &Arc<ResyncReason>) -> Offered {
        let mut offered = Offered {
            visited: 1,
            ..Offered::default()
        };
        let mut queue = self.lock();
        if queue.ended || matches!(queue.events.back(), Some(MailboxEvent::Reload(_))) {
            return offered;
        }
        let was_empty = queue.events.is_empty();
        if queue.events.len() >= self.bound {
            // The lag's reload stands for this one too.
            offered += queue.lag(0);
        } else {
            queue
                .events
                .push_back(MailboxEvent::Reload(ReloadReason::Resync(reason.clone())));
        }
        drop(queue);
        if was_empty {
            self.ready.notify_one();
        }
        offered
    }

    /// No more events: the watch gives what it holds, then `None`.
    pub(super) fn end(&self) {
        self.lock().ended = true;
        self.ready.notify_one();
    }

    /// The next event (`Some(None)`: none will come), or `None` when there is none yet.
    pub(super) fn take(&self) -> Option<Option<MailboxEvent>> {
        let mut queue = self.lock();
        match queue.events.pop_front() {
            Some(event) => {
                if queue.events.is_empty() && queue.events.capacity() > KEEP_CAPACITY {
                    queue.events.shrink_to(KEEP_CAPACITY);
                }
                Some(Some(event))
            }
            None if queue.ended => Some(None),
            None => None,
        }
    }

    pub(super) fn len(&self) -> usize {
        self.lock().events.len()
    }

    pub(super) fn stats(&self) -> WatchStats {
        self.lock().stats
    }
}

/// One IDLE session's view of a mailbox ([`Hub::watch`](super::Hub::watch)): the
/// mailbox's updates, in the order the pipe delivered them, and a reload whenever some may
/// be missing. Dropping it unregisters it (in the maddy layout the hub stops listening for
/// the mailbox a short grace after its last watch is gone).
pub struct Watch {
    slot: Arc<Slot>,
    key: MailboxKey,
    id: u64,
    shared: Arc<Shared>,
}

impl Watch {
    pub(super) fn new(slot: Arc<Slot>, key: MailboxKey, id: u64, shared: Arc<Shared>) -> Watch {
        Watch {
            slot,
            key,
            id,
            shared,
        }
    }

    /// The watched mailbox.
    pub fn key(&self) -> &MailboxKey {
        &self.key
    }

    /// The next event; waits for one. `None` once the watch has ended: after its
    /// mailbox's [`MailboxDestroyed`](UpdateKind::MailboxDestroyed) update, or when the hub
    /// stopped (the hub dropped or closed, the pipe closed, or its listener gave up), each
    /// after the events already queued. Cancel-safe: dropping the future loses nothing.
    pub async fn recv(&mut self) -> Option<MailboxEvent> {
        loop {
            if let Some(next) = self.slot.take() {
                return next;
            }
            self.slot.ready.notified().await;
        }
    }

    /// The next event if one is queued, without waiting (`None` also once ended: see
    /// [`is_ended`](Watch::is_ended)).
    pub fn try_recv(&mut self) -> Option<MailboxEvent> {
        self.slot.take().flatten()
    }

    /// Whether no event will come any more (queued ones may remain).
    pub fn is_ended(&self) -> bool {
        self.slot.lock().ended
    }

    /// How many events are queued for the session (at most the watch's bound, plus a
    /// destroyed mailbox's last update).
    pub fn len(&self) -> usize {
        self.slot.len()
    }

    /// Whether no event is queued.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The watch's counts.
    pub fn stats(&self) -> WatchStats {
        self.slot.stats()
    }
}

impl std::fmt::Debug for Watch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Watch")
            .field("key", &self.key)
            .field("queued", &self.slot.len())
            .field("bound", &self.slot.bound)
            .finish_non_exhaustive()
    }
}

impl Drop for Watch {
    fn drop(&mut self) {
        self.shared.release(&self.key, self.id);
    }
}

impl Queue {
    /// Drops the backlog (and `extra` updates not queued) for one `Reload(Lagged)`, merged
    /// with one already waiting in it.
    fn lag(&mut self, extra: u64) -> Offered {
        let mut fresh = extra;
        let mut earlier = None;
        for event in self.events.drain(..) {
            match event {
                MailboxEvent::Update(_) => fresh += 1,
                MailboxEvent::Reload(ReloadReason::Lagged { missed }) => earlier = Some(missed),
                MailboxEvent::Reload(ReloadReason::Resync(_)) => {}
            }
        }
        let missed = earlier.unwrap_or(0) + fresh;
        self.events
            .push_back(MailboxEvent::Reload(ReloadReason::Lagged { missed }));
        let lagged = u64::from(earlier.is_none());
        self.stats.lagged += lagged;
        self.stats.missed += fresh;
        Offered {
            lagged,
            missed: fresh,
            ..Offered::default()
        }
    }
}
