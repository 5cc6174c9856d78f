//! What a listener tells an application: updates, connection changes and resyncs.

use crate::log::{HistoryChange, Position};
use crate::update::{MailboxKey, Update};

/// The listen path's log target.
pub(super) const TARGET: &str = "updatepipe::listen";

/// What a listener tells an application that asked for events
/// ([`PgPipe::listen_events`](crate::PgPipe::listen_events)), in order.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Event {
    /// An update from another sender.
    Update(Update),
    /// Durable mode: where the reader stands now in the log, just after the update before
    /// this event (or after entries it read and did not deliver: its own, or refused).
    /// Resuming from it ([`Since::After`](crate::Since::After)), or acknowledging it for a
    /// named consumer ([`PgPipe::ack`](crate::PgPipe::ack)), takes up exactly after what
    /// came before it.
    Position(Position),
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
    /// example written by a newer version), or with signing on, signed more than the replay
    /// window before its row was written (a copy inserted later).
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
    /// Durable mode: the server no longer holds the history the reader read (a failover
    /// that lost commits, a crash that lost asynchronous commits, a backup restored, the
    /// log made again). Updates it delivered may be gone from the server, and updates
    /// committed since may lie where it would not look: reload everything. The reader goes
    /// on from the server's present.
    HistoryChanged(HistoryChange),
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
