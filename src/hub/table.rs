//! The hub's routing table: which watches each mailbox has, and whether the pipe listens
//! for it (the maddy layout). Pure and synchronous: the fan-out decisions are tested here
//! without a server.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use crate::listen::{Event, ResyncReason};
use crate::stats::Counters;
use crate::update::MailboxKey;

use super::watch::{Offered, Slot};

/// The hub has ended: no watch can be opened.
#[derive(Debug)]
pub(super) struct Ended;

/// Whether the pipe listens for a mailbox on the hub's behalf (the maddy layout's
/// `subscribe`; a mailbox whose key cannot be a channel, or any in the updatepipe layout,
/// stays `Unlistened`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Sub {
    Unlistened,
    /// The first watch is subscribing (its caller completes it: `subscribed`).
    Subscribing,
    Held,
    /// No watch left: unsubscribed once this grace (its generation) expires, unless a
    /// watch comes back first.
    Grace(u64),
}

#[derive(Debug)]
struct Mailbox {
    slots: Vec<(u64, Arc<Slot>)>,
    sub: Sub,
}

/// A grace that was started: when it expires, for which mailbox, which generation.
#[derive(Debug)]
struct Grace {
    at: Instant,
    key: MailboxKey,
    generation: u64,
}

#[derive(Debug)]
pub(super) struct Table {
    mailboxes: HashMap<MailboxKey, Mailbox>,
    /// Graces in the order they expire (each as long as the next).
    graces: VecDeque<Grace>,
    grace: Duration,
    next_id: u64,
    watches: usize,
    subscribed: usize,
    ended: bool,
    /// The pipe's counters: the open watches are counted as the table changes, before
    /// any watch it ends is woken.
    counters: Arc<Counters>,
}

impl Table {
    pub(super) fn new(grace: Duration, counters: Arc<Counters>) -> Table {
        Table {
            mailboxes: HashMap::new(),
            graces: VecDeque::new(),
            grace,
            next_id: 0,
            watches: 0,
            subscribed: 0,
            ended: false,
            counters,
        }
    }

    /// Registers a watch's slot: from now on it gets the mailbox's updates. With `listens`
    /// (the maddy layout, a key that can be a channel), says whether the caller must
    /// subscribe the pipe (then it calls [`subscribed`](Table::subscribed) with how that
    /// went); a mailbox in its grace is simply kept.
    pub(super) fn open(
        &mut self,
        key: &MailboxKey,
        slot: Arc<Slot>,
        listens: bool,
    ) -> Result<(u64, bool), Ended> {
        if self.ended {
            return Err(Ended);
        }
        let id = self.next_id;
        self.next_id += 1;
        let mailbox = self.mailboxes.entry(key.clone()).or_insert(Mailbox {
            slots: Vec::new(),
            sub: Sub::Unlistened,
        });
        mailbox.slots.push((id, slot));
        self.watches += 1;
        self.counters.watch_opened();
        let mut subscribe = false;
        if listens {
            match mailbox.sub {
                Sub::Unlistened => {
                    mailbox.sub = Sub::Subscribing;
                    subscribe = true;
                }
                Sub::Grace(_) => mailbox.sub = Sub::Held,
                Sub::Held | Sub::Subscribing => {}
            }
        }
        Ok((id, subscribe))
    }

    /// Registers a watch's slot if the pipe listens for its mailbox already (subscribed,
    /// or in its grace, which it ends), without the subscription lock; `None` otherwise
    /// (then [`open`](Table::open) under the lock).
    pub(super) fn open_listened(&mut self, key: &MailboxKey, slot: &Arc<Slot>) -> Option<u64> {
        match self.mailboxes.get(key)?.sub {
            Sub::Held | Sub::Grace(_) if !self.ended => {
                let (id, subscribe) = self.open(key, slot.clone(), true).ok()?;
                debug_assert!(!subscribe);
                Some(id)
            }
            _ => None,
        }
    }

    /// The first watch's subscription is done (`held`) or failed. Returns whether a grace
    /// started (every watch of the mailbox went meanwhile).
    pub(super) fn subscribed(&mut self, key: &MailboxKey, held: bool, now: Instant) -> bool {
        let Some(mailbox) = self.mailboxes.get_mut(key) else {
            return false;
        };
        if mailbox.sub != Sub::Subscribing {
            return false;
        }
        if held {
            mailbox.sub = Sub::Held;
            self.subscribed += 1;
        } else {
            mailbox.sub = Sub::Unlistened;
        }
        self.settle(key, now)
    }

    /// A watch went (dropped). Returns whether a grace started.
    pub(super) fn close(&mut self, key: &MailboxKey, id: u64, now: Instant) -> bool {
        let Some(mailbox) = self.mailboxes.get_mut(key) else {
            return false;
        };
        let Some(at) = mailbox.slots.iter().position(|(slot, _)| *slot == id) else {
            return false; // ended with its mailbox, or the hub
        };
        mailbox.slots.swap_remove(at);
        self.watches -= 1;
        self.counters.watches_closed(1);
        self.settle(key, now)
    }

    /// A mailbox left without watches: forgotten, or (subscribed) given its grace.
    /// Returns whether a grace started.
    fn settle(&mut self, key: &MailboxKey, now: Instant) -> bool {
        let Some(mailbox) = self.mailboxes.get_mut(key) else {
            return false;
        };
        if !mailbox.slots.is_empty() {
            return false;
        }
        match mailbox.sub {
            Sub::Unlistened => {
                self.mailboxes.remove(key);
                false
            }
            Sub::Held => {
                let generation = self.next_id;
                self.next_id += 1;
                mailbox.sub = Sub::Grace(generation);
                self.graces.push_back(Grace {
                    at: now + self.grace,
                    key: key.clone(),
                    generation,
                });
                true
            }
            Sub::Subscribing | Sub::Grace(_) => false,
        }
    }

    /// When the next grace expires.
    pub(super) fn next_grace(&self) -> Option<Instant> {
        self.graces.front().map(|grace| grace.at)
    }

    /// The graces expired by `now` that still stand (no watch came back): each to be
    /// [`release`](Table::release)d and unsubscribed.
    pub(super) fn expired(&mut self, now: Instant) -> Vec<(MailboxKey, u64)> {
        let mut expired = Vec::new();
        while let Some(grace) = self.graces.front()
            && grace.at <= now
        {
            let grace = self.graces.pop_front().expect("a front");
            if self.mailboxes.get(&grace.key).map(|m| m.sub) == Some(Sub::Grace(grace.generation)) {
                expired.push((grace.key, grace.generation));
            }
        }
        expired
    }

    /// Forgets a mailbox whose grace `generation` expired, if it still stands; then the
    /// caller unsubscribes it. `false`: a watch came back (or the hub ended).
    pub(super) fn release(&mut self, key: &MailboxKey, generation: u64) -> bool {
        match self.mailboxes.get(key) {
            Some(mailbox) if mailbox.sub == Sub::Grace(generation) && mailbox.slots.is_empty() => {
                self.mailboxes.remove(key);
                self.subscribed -= 1;
                true
            }
            _ => false,
        }
    }

    /// Routes one event of the pipe: an update to its mailbox's watches (a destroyed
    /// mailbox's update ends them), a resync to the watches it concerns. Returns what the
    /// watches took, and whether a grace started.
    pub(super) fn route(&mut self, event: Event, now: Instant) -> (Offered, bool) {
        let mut offered = Offered::default();
        match event {
            Event::Update(update) => {
                let Some(mailbox) = self.mailboxes.get_mut(update.key()) else {
                    return (offered, false);
                };
                let update = Arc::new(update);
                let destroyed = update.kind() == crate::update::UpdateKind::MailboxDestroyed;
                if destroyed {
                    // Every watch of it ends with this update: no longer open.
                    self.watches -= mailbox.slots.len();
                    self.counters.watches_closed(mailbox.slots.len() as u64);
                }
                for (_, slot) in &mailbox.slots {
                    offered += slot.offer_update(&update);
                }
                if destroyed {
                    mailbox.slots.clear();
                    let key = update.key().clone();
                    return (offered, self.settle(&key, now));
                }
            }
            Event::Resync(reason) => {
                let reason = Arc::new(reason);
                let mut reload = |mailbox: &Mailbox| {
                    for (_, slot) in &mailbox.slots {
                        offered += slot.offer_reload(&reason);
                    }
                };
                let named = match &*reason {
                    ResyncReason::Resubscribed { keys } => keys.as_slice(),
                    ResyncReason::Unrepresentable { key } => std::slice::from_ref(key),
                    _ => {
                        self.mailboxes.values().for_each(&mut reload);
                        return (offered, false);
                    }
                };
                // By channel: two keys can share one (`5` and `"__uint64_5"`), and the pipe
                // names whichever subscribed first.
                let keys: HashSet<&MailboxKey> = named.iter().collect();
                let channels: HashSet<String> = named
                    .iter()
                    .filter_map(|key| key.maddy_channel().ok())
                    .map(|channel| channel.as_str().to_owned())
                    .collect();
                self.mailboxes
                    .iter()
                    .filter(|(key, _)| {
                        keys.contains(key)
                            || key
                                .maddy_channel()
                                .is_ok_and(|channel| channels.contains(channel.as_str()))
                    })
                    .for_each(|(_, mailbox)| reload(mailbox));
            }
            // Connection events and durable positions concern no mailbox.
            _ => {}
        }
        (offered, false)
    }

    /// The hub stopped: every watch ends (after what it holds), none can be opened.
    pub(super) fn end(&mut self) {
        self.counters.watches_closed(self.watches as u64);
        self.ended = true;
        for mailbox in self.mailboxes.values() {
            for (_, slot) in &mailbox.slots {
                slot.end();
            }
        }
        self.mailboxes.clear();
        self.graces.clear();
        self.watches = 0;
        self.subscribed = 0;
    }

    /// Open watches.
    pub(super) fn watches(&self) -> usize {
        self.watches
    }

    /// Mailboxes with watches (or subscribed, in their grace).
    pub(super) fn mailboxes(&self) -> usize {
        self.mailboxes.len()
    }

    /// Mailboxes the pipe listens for on the hub's behalf (their grace included).
    pub(super) fn subscribed_count(&self) -> usize {
        self.subscribed
    }
}

#[cfg(test)]
mod tests;
