//! The bounded hand-off to the caller: what is waiting to be delivered, in order, and the
//! policy when the caller does not read (best effort: let updates go, then one
//! [`ResyncReason::SlowConsumer`] once it has caught up; durable updates are never let go,
//! the log holds them and a tail is read only when there is room).

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

use futures_util::FutureExt;
use futures_util::future::BoxFuture;
use tokio::sync::mpsc;
use tokio::time::Instant;

use super::event::{Event, ResyncReason, TARGET};
use super::pacer::Pacer;
use crate::stats::Counters;
use crate::update::Update;

/// The longest reading waits for a caller behind by the whole bound to take anything,
/// before best-effort updates are let go (see [`Outbox::reading_held`]).
pub(super) const HOLD: Duration = Duration::from_secs(1);

/// The longest a caller may keep reading waiting, from when it fell behind by the whole
/// bound until it is back under half of it: a caller slower than the senders for good
/// then costs the server's notification queue two seconds of traffic, not all of it.
pub(super) const HOLD_EPISODE: Duration = Duration::from_secs(2);

/// The shortest time between two resyncs told for one scope (everything, or one mailbox):
/// a flood of causes (forged references, say) is told at once, then at most once more per
/// interval, the causes that came meanwhile folded into one (counted in
/// [`Stats::resyncs_coalesced`](crate::Stats::resyncs_coalesced)). Never dropped: the last
/// cause is always told, at the end of its interval at the latest.
pub(super) const RESYNC_INTERVAL: Duration = Duration::from_millis(500);

/// What a resync concerns, for folding: every mailbox, or one.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
enum Scope {
    All,
    Mailbox(crate::update::MailboxKey),
    /// Told every time (a reconnect's list of mailboxes; reconnects are paced already).
    Unfolded,
}

impl Scope {
    fn of(reason: &ResyncReason) -> Scope {
        match reason {
            ResyncReason::Unrepresentable { key } => Scope::Mailbox(key.clone()),
            ResyncReason::Resubscribed { .. } => Scope::Unfolded,
            _ => Scope::All,
        }
    }
}

/// Resyncs told lately, and those held for the end of their scope's interval.
#[derive(Debug, Default)]
struct Folding {
    /// When each scope was last told (entries older than the interval are let go).
    told: std::collections::HashMap<Scope, Instant>,
    /// The newest cause of each scope that came within its interval, told at its end.
    held: std::collections::HashMap<Scope, ResyncReason>,
}

/// Where deliveries go.
#[derive(Debug)]
pub(crate) enum Sink {
    /// Updates only (maddy's interface); events are logged and counted.
    Updates(mpsc::Sender<Update>),
    /// Updates and events, in one ordered stream.
    Events(mpsc::Sender<Event>),
}

impl Sink {
    fn wants_events(&self) -> bool {
        matches!(self, Sink::Events(_))
    }

    /// Completes once the receiver is gone. It holds a sender of its own, so one can serve
    /// a whole session (registered once, not made anew at every turn of the loop).
    fn closed(&self) -> BoxFuture<'static, ()> {
        match self {
            Sink::Updates(tx) => {
                let tx = tx.clone();
                async move { tx.closed().await }.boxed()
            }
            Sink::Events(tx) => {
                let tx = tx.clone();
                async move { tx.closed().await }.boxed()
            }
        }
    }

    /// Sends as many ready items from the front of `buffer` as fit now, without waiting.
    /// Returns how many updates went out, or `None` when the receiver is gone.
    fn try_deliver(&self, buffer: &mut VecDeque<Slot>) -> Option<usize> {
        let mut sent = 0;
        while let Some(Slot::Ready(_)) = buffer.front() {
            let room = match self {
                Sink::Updates(tx) => tx.try_reserve().map(Permit::Updates),
                Sink::Events(tx) => tx.try_reserve().map(Permit::Events),
            };
            let permit = match room {
                Ok(permit) => permit,
                Err(mpsc::error::TrySendError::Full(())) => break,
                Err(mpsc::error::TrySendError::Closed(())) => return None,
            };
            if let Some(Slot::Ready(event)) = buffer.pop_front() {
                sent += usize::from(matches!(event, Event::Update(_)));
                permit.send(event);
            }
        }
        Some(sent)
    }

    /// Waits for room, then sends as many ready items from the front of `buffer` as fit.
    /// Returns how many updates went out, or `None` when the receiver is gone.
    async fn deliver(&self, buffer: &mut VecDeque<Slot>) -> Option<usize> {
        let permit = match self {
            Sink::Updates(tx) => Permit::Updates(tx.reserve().await.ok()?),
            Sink::Events(tx) => Permit::Events(tx.reserve().await.ok()?),
        };
        let mut sent = 0;
        if let Some(Slot::Ready(_)) = buffer.front()
            && let Some(Slot::Ready(event)) = buffer.pop_front()
        {
            sent += usize::from(matches!(event, Event::Update(_)));
            permit.send(event);
        }
        Some(sent + self.try_deliver(buffer)?)
    }
}

/// Room reserved in either kind of sink.
enum Permit<'a> {
    Updates(mpsc::Permit<'a, Update>),
    Events(mpsc::Permit<'a, Event>),
}

impl Permit<'_> {
    fn send(self, event: Event) {
        match (self, event) {
            (Permit::Updates(p), Event::Update(u)) => p.send(u),
            (Permit::Events(p), event) => p.send(event),
            // An updates-only sink is never given events (see `Outbox::emit`).
            (Permit::Updates(_), _) => {}
        }
    }
}

/// One place in the delivery order: ready, or waiting for an envelope fetched from the log.
#[derive(Debug)]
enum Slot {
    Ready(Event),
    Fetching,
}

/// What waits to be delivered, and how it goes out.
#[derive(Debug)]
pub(super) struct Outbox {
    sink: Sink,
    buffer: VecDeque<Slot>,
    /// The updates in `buffer` (events are not counted: they are few, and never let go).
    buffered_updates: usize,
    max_buffered: usize,
    /// Updates let go since the buffer last overflowed (best effort).
    dropped: u64,
    /// Paces the warnings about resyncs, which senders can provoke.
    resyncs: Pacer,
    /// Folds floods of resyncs (see [`RESYNC_INTERVAL`]).
    folding: Folding,
    /// Since when the caller is behind: the bound was reached, and the buffer has not
    /// been under half of it since.
    behind_since: Option<Instant>,
    /// Until when reading waits for the caller, while the bound is reached.
    held_until: Option<Instant>,
    /// Reading waits no more until the caller is back under half the bound (it took
    /// nothing for a whole wait, or was behind too long).
    given_up: bool,
    counters: Arc<Counters>,
}

impl Outbox {
    pub(super) fn new(sink: Sink, max_buffered: usize, counters: Arc<Counters>) -> Outbox {
        Outbox {
            sink,
            buffer: VecDeque::new(),
            buffered_updates: 0,
            max_buffered,
            dropped: 0,
            resyncs: Pacer::default(),
            folding: Folding::default(),
            behind_since: None,
            held_until: None,
            given_up: false,
            counters,
        }
    }

    /// Whether reading notifications waits for the caller now, and until when. Once the
    /// bound is reached, reading waits for the caller to take something, up to [`HOLD`]
    /// (at most `longest`) at a time: a caller starved for a moment (a busy machine, a
    /// burst) or slower than a backlog for a while loses nothing, as the server's
    /// notification queue holds what arrives meanwhile. Best-effort updates are let go as
    /// before once a whole wait passes with nothing taken, or once the caller has been
    /// behind for [`HOLD_EPISODE`], until it is back under half the bound.
    pub(super) fn reading_held(&mut self, longest: Duration) -> Option<Instant> {
        if self.buffered_updates < self.half() {
            self.behind_since = None;
            self.given_up = false;
        }
        if !self.is_full() {
            // Room: read. (Each delivery while reading waits makes room for a moment.)
            self.held_until = None;
            return None;
        }
        if self.given_up {
            return None;
        }
        let now = Instant::now();
        let since = *self.behind_since.get_or_insert(now);
        if let Some(until) = self.held_until {
            if now < until {
                return Some(until);
            }
            // A whole wait, and nothing taken.
            self.given_up = true;
        } else if now >= since + HOLD_EPISODE {
            self.given_up = true;
        }
        if self.given_up {
            self.held_until = None;
            tracing::debug!(target: TARGET, "the application is behind: reading waits no more");
            return None;
        }
        let until = now + HOLD.min(longest);
        self.held_until = Some(until);
        Some(until)
    }

    /// How many places wait (for tracing).
    pub(super) fn len(&self) -> usize {
        self.buffer.len()
    }

    /// Whether the front of the order can go out.
    pub(super) fn has_ready(&self) -> bool {
        matches!(self.buffer.front(), Some(Slot::Ready(_)))
    }

    /// Whether the bound is reached: a best-effort update would be let go.
    pub(super) fn is_full(&self) -> bool {
        self.buffered_updates >= self.max_buffered
    }

    /// Whether there is room to read the log's tail (under half the bound), whose updates
    /// are never let go.
    pub(super) fn has_room_for_tail(&self) -> bool {
        self.buffered_updates < self.half()
    }

    /// Half the bound, at least 1.
    fn half(&self) -> usize {
        (self.max_buffered / 2).max(1)
    }

    /// Queues a notification's best-effort updates. While reading may still wait for the
    /// caller, one that arrives under twice the bound is taken whole: reading waits at the
    /// bound (see [`Outbox::reading_held`]), but goes on while a statement needs the
    /// connection polled, and what arrives then is kept too. Otherwise what is past the
    /// bound is let go.
    pub(super) fn enqueue_all(&mut self, updates: impl IntoIterator<Item = Update>) {
        let whole = !self.given_up && self.buffered_updates < self.max_buffered.saturating_mul(2);
        for update in updates {
            if whole {
                self.push_ready(update);
            } else {
                self.enqueue(update);
            }
        }
    }

    /// Queues a best-effort update, or lets it go when the caller is too far behind (a
    /// resync follows once the caller has caught up).
    pub(super) fn enqueue(&mut self, update: Update) {
        if self.is_full() {
            if self.dropped == 0 {
                tracing::warn!(
                    target: TARGET,
                    bound = self.max_buffered,
                    "the application is not reading; letting updates go until it catches up"
                );
            }
            self.let_go();
            return;
        }
        self.push_ready(update);
    }

    /// Queues an update read from the log, whatever the bound: the log holds it for us, and
    /// a tail runs only when there is room.
    pub(super) fn push_logged(&mut self, update: Update) {
        self.push_ready(update);
    }

    fn push_ready(&mut self, update: Update) {
        self.buffered_updates += 1;
        self.buffer.push_back(Slot::Ready(Event::Update(update)));
    }

    /// Lets one update go (a resync follows once the caller has caught up).
    pub(super) fn let_go(&mut self) {
        self.dropped += 1;
        self.counters.dropped(1);
    }

    /// Keeps a place in the order for an envelope to be fetched from the log.
    pub(super) fn hold_for_fetch(&mut self) {
        self.buffer.push_back(Slot::Fetching);
    }

    /// Replaces the first place held for a fetch with these updates, keeping their place.
    pub(super) fn fill_fetch(&mut self, updates: Vec<Update>) {
        let Some(at) = self.buffer.iter().position(|s| matches!(s, Slot::Fetching)) else {
            return;
        };
        self.buffer.remove(at);
        for (i, update) in updates.into_iter().enumerate() {
            self.buffered_updates += 1;
            self.buffer
                .insert(at + i, Slot::Ready(Event::Update(update)));
        }
    }

    /// Tells the caller that updates may have been missed. Folded twice over, since
    /// senders can provoke resyncs at will (forged numbers, references to nothing):
    ///
    /// - in time: a scope (everything, or one mailbox) told within the last
    ///   [`RESYNC_INTERVAL`] holds its newest cause for the end of that interval
    ///   ([`Outbox::release_held`]);
    /// - in the buffer: a resync not yet delivered says it all, so that a caller that does
    ///   not read holds at most one of each. A resync for some mailboxes only (the maddy
    ///   layout's) says it for those: it does not stand for a later one about others or
    ///   about everything.
    pub(super) fn resync(&mut self, reason: ResyncReason) {
        tracing::debug!(target: TARGET, ?reason, "updates may have been missed: resync");
        self.counters.resync();
        let scope = Scope::of(&reason);
        let now = Instant::now();
        let folding = &mut self.folding;
        let held = &folding.held;
        folding.told.retain(|scope, at| {
            held.contains_key(scope) || now.duration_since(*at) < RESYNC_INTERVAL
        });
        if scope != Scope::Unfolded && folding.told.contains_key(&scope) {
            if folding.held.insert(scope, reason).is_some() {
                self.counters.resync_coalesced();
            }
            return;
        }
        if scope != Scope::Unfolded {
            folding.told.insert(scope, now);
        }
        self.tell_resync(reason);
    }

    /// When the next resync held back is due ([`Outbox::release_held`]).
    pub(super) fn next_release(&self) -> Option<Instant> {
        self.folding
            .held
            .keys()
            .filter_map(|scope| self.folding.told.get(scope))
            .map(|at| *at + RESYNC_INTERVAL)
            .min()
    }

    /// Tells the resyncs held back whose interval is over.
    pub(super) fn release_held(&mut self, now: Instant) {
        let due: Vec<Scope> = self
            .folding
            .held
            .keys()
            .filter(|scope| {
                self.folding
                    .told
                    .get(*scope)
                    .is_none_or(|at| now >= *at + RESYNC_INTERVAL)
            })
            .cloned()
            .collect();
        for scope in due {
            if let Some(reason) = self.folding.held.remove(&scope) {
                self.folding.told.insert(scope, now);
                self.tell_resync(reason);
            }
        }
    }

    /// Puts a resync in the order, unless one waiting at its end covers it already.
    fn tell_resync(&mut self, reason: ResyncReason) {
        // A caller that asked for events is told by the event itself.
        if !self.sink.wants_events()
            && let Some(suppressed) = self.resyncs.due(std::time::Instant::now())
        {
            tracing::warn!(
                target: TARGET,
                ?reason,
                suppressed,
                "updates may have been missed: resync"
            );
        }
        let covered = self
            .buffer
            .iter()
            .rev()
            .map_while(|slot| match slot {
                Slot::Ready(Event::Resync(waiting)) => Some(waiting),
                _ => None,
            })
            .any(|waiting| *waiting == reason || !waiting.is_per_mailbox());
        if covered {
            self.counters.resync_coalesced();
            return;
        }
        self.emit(Event::Resync(reason));
    }

    /// Whether the caller asked for events (then it hears of disconnects and resyncs from
    /// them, and the log need not warn as well).
    pub(super) fn tells_events(&self) -> bool {
        self.sink.wants_events()
    }

    /// Queues an event for a caller that asked for events (always, whatever the bound:
    /// events are few and must not be lost).
    pub(super) fn emit(&mut self, event: Event) {
        if self.sink.wants_events() {
            self.buffer.push_back(Slot::Ready(event));
        }
    }

    /// Completes once the caller's receiver is gone.
    pub(super) fn closed(&self) -> BoxFuture<'static, ()> {
        self.sink.closed()
    }

    /// Sends what is ready and fits now; `None` when the receiver is gone.
    pub(super) fn try_deliver(&mut self) -> Option<usize> {
        self.sink.try_deliver(&mut self.buffer)
    }

    /// Waits for room, then sends what is ready and fits; `None` when the receiver is gone.
    pub(super) async fn deliver(&mut self) -> Option<usize> {
        self.sink.deliver(&mut self.buffer).await
    }

    /// `n` updates went out. Once everything is delivered after updates were let go, the
    /// caller hears how many.
    pub(super) fn delivered(&mut self, n: usize) {
        self.buffered_updates -= n;
        self.counters.delivered(n);
        if self.buffer.is_empty() && self.dropped > 0 {
            let dropped = std::mem::take(&mut self.dropped);
            self.resync(ResyncReason::SlowConsumer { dropped });
        }
    }
}

#[cfg(test)]
impl Outbox {
    /// Forgets what waits (a test that starts after what the caller heard first).
    pub(super) fn buffer_clear_for_tests(&mut self) {
        self.buffer.clear();
    }
}

#[cfg(test)]
mod tests;
