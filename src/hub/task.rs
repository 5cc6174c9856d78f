//! The hub's task: routes the pipe's events to the watches, and releases the maddy
//! layout's subscriptions whose grace expired. It never waits for a watch.

use std::sync::Arc;

use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinSet;
use tokio::time::Instant;

use crate::listen::Event;
use crate::update::MailboxKey;

use super::{Shared, TARGET};

/// The most events routed under one hold of the table.
const BATCH: usize = 256;

/// The most watches offered events under one hold of the table: past it the table is let
/// go between events, so that a watch opened or dropped meanwhile waits at most that long.
const OFFERS_PER_HOLD: u64 = 4096;

pub(super) async fn run(
    shared: Arc<Shared>,
    mut events: mpsc::Receiver<Event>,
    mut stopped: oneshot::Receiver<()>,
) {
    // However the task ends (stopped, the pipe gone, a panic, aborted by the runtime), every
    // watch ends with it rather than wait for events that will not come.
    let _end = EndOnDrop(shared.clone());
    let mut batch = Vec::with_capacity(BATCH);
    let mut unsubscribing = JoinSet::new();
    loop {
        let grace = shared.table().next_grace();
        // Graces first: a steady stream of events must not starve them.
        tokio::select! {
            biased;
            _ = &mut stopped => break,
            () = tokio::time::sleep_until(grace.unwrap_or_else(Instant::now)), if grace.is_some() => {
                let expired = shared.table().expired(Instant::now());
                for (key, generation) in expired {
                    unsubscribing.spawn(unsubscribe(shared.clone(), key, generation));
                }
            }
            Some(_) = unsubscribing.join_next(), if !unsubscribing.is_empty() => {}
            () = shared.graces.notified() => {}
            n = events.recv_many(&mut batch, BATCH) => {
                if n == 0 {
                    break; // the pipe closed, or its listener gave up
                }
                route(&shared, &mut batch);
            }
        }
    }
    tracing::debug!(target: TARGET, "hub stopped");
    // Dropping `events` stops the pipe's listener (its connection, and every LISTEN, go
    // with it); dropping `unsubscribing` aborts what is left of it.
}

/// Ends the table (and so every watch) when dropped.
struct EndOnDrop(Arc<Shared>);

impl Drop for EndOnDrop {
    fn drop(&mut self) {
        self.0.table().end();
    }
}

/// Routes a batch of events under one hold of the table.
fn route(shared: &Shared, batch: &mut Vec<Event>) {
    let now = Instant::now();
    let mut offered = super::Offered::default();
    let mut graces = false;
    {
        let mut table = shared.table();
        let mut held_for = 0;
        for event in batch.drain(..) {
            if held_for > OFFERS_PER_HOLD {
                drop(table);
                table = shared.table();
                held_for = 0;
            }
            let (took, grace) = table.route(event, now);
            held_for += took.visited;
            offered += took;
            graces |= grace;
        }
    }
    shared.count(offered);
    if graces {
        shared.graces.notify_one();
    }
}

/// Stops listening for a mailbox whose grace expired, unless a watch came back first.
async fn unsubscribe(shared: Arc<Shared>, key: MailboxKey, generation: u64) {
    let _guard = shared.subscriptions.lock().await;
    if !shared.table().release(&key, generation) {
        return;
    }
    if let Err(error) = shared.pipe.unsubscribe(key.clone()).await {
        // Closed, or the listener gave up: it listens for nothing any more.
        tracing::debug!(target: TARGET, %key, %error, "unsubscribing after the grace");
    }
}
