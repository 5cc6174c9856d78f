//! What a notification does: its verdict from the intake, and then the outbox, the log
//! reader or the heartbeat.

use tokio_postgres::Notification;

use super::super::event::{ResyncReason, TARGET};
use super::super::intake::{Content, Incoming, Moment, Verdict};
use super::Dispatch;
use crate::error::DecodeError;

impl Dispatch {
    /// Classifies one notification and does what its verdict says.
    pub(in crate::listen) fn on_notification(&mut self, notification: &Notification) {
        let incoming = Incoming {
            channel: notification.channel(),
            payload: notification.payload(),
            sender_pid: notification.process_id(),
        };
        self.on_incoming(incoming);
    }

    pub(in crate::listen) fn on_incoming(&mut self, incoming: Incoming<'_>) {
        let carried = match self.intake.classify(incoming, Moment::now()) {
            Verdict::OtherChannel => return,
            Verdict::Rejected(e) => return self.reject_incoming(&e, incoming),
            Verdict::Heartbeat { own } => {
                if let Some(seq) = own {
                    self.heartbeat.clock.heard(seq);
                }
                return;
            }
            Verdict::Echo => return self.counters.echo(),
            Verdict::CopyForMaddy => return self.counters.maddy_copy_ignored(),
            Verdict::Unrepresentable { key, error } => {
                self.reject_incoming(&error, incoming);
                return self.outbox.resync(ResyncReason::Unrepresentable { key });
            }
            Verdict::InLog => return self.reader.read_soon(),
            Verdict::Carries(carried) => carried,
        };
        if carried.best_effort_sender {
            self.reader.heard_best_effort();
        }
        if let Some(gap) = carried.gap {
            self.outbox.resync(gap);
        }
        match carried.content {
            Content::Updates(updates) => self.outbox.enqueue_all(updates),
            Content::Refused(e) => self.reject_incoming(&e, incoming),
            // No log to fetch from: the update is gone.
            Content::Fetch { origin, .. } if self.reader.is_unreadable() => {
                self.outbox.resync(ResyncReason::Unreadable {
                    origin: origin.to_string(),
                });
            }
            // A bounded number waits for its fetch: past that, the update is let go, with a
            // resync.
            Content::Fetch { .. } if !self.reader.can_fetch() || self.outbox.is_full() => {
                self.outbox.let_go();
            }
            Content::Fetch { origin, seq } => {
                self.reader.queue_fetch(origin, seq);
                self.outbox.hold_for_fetch();
            }
        }
    }

    fn reject_incoming(&mut self, e: &DecodeError, incoming: Incoming<'_>) {
        self.reject(e, incoming.sender_pid, incoming.payload.len());
    }

    /// Counts a rejected payload and logs it: its reason at warn level (at most one such
    /// line per [`WARN_INTERVAL`](super::pacer::WARN_INTERVAL), saying how many were left
    /// out), the details, which quote the payload, only at debug level.
    pub(super) fn reject(&mut self, e: &DecodeError, sender_pid: i32, bytes: usize) {
        self.counters.rejected(e);
        tracing::debug!(
            target: TARGET,
            reason = e.reason(),
            error = %e,
            sender_pid,
            bytes,
            "rejected a payload"
        );
        if let Some(suppressed) = self.warnings.rejections.due(std::time::Instant::now()) {
            tracing::warn!(
                target: TARGET,
                reason = e.reason(),
                sender_pid,
                bytes,
                suppressed,
                "rejected a payload (details at debug level)"
            );
        }
    }
}
