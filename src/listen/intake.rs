//! The intake: what one notification, or one log row, means to this listener. Pure
//! decisions over the payload, the listener's identity and settings, the numbers seen so
//! far and the time given; the connection loop acts on the [`Verdict`].
//!
//! On a subscribed mailbox's channel (the maddy layout), a notification is maddy's form only:
//! an updatepipe sender's copy (dropped: its envelope is on the pipe's channel), or one
//! update from a maddy node, best effort, or what the pipe refuses (see `classify_maddy`).
//!
//! On the pipe's channel, a notification is, in order: on another channel (ignored); an
//! updatepipe sender's copy for maddy (dropped); refused (a signature, decoding,
//! limit or replay check failed: counted and logged); a heartbeat (this listener's own, with
//! its number, or another's); an echo of this pipe's own push; in durable mode, a durable
//! envelope (read from the log instead); or updates to deliver, or a reference to an
//! oversize envelope in the log, after a check of the sender's numbers for gaps.

use std::time::{Instant, SystemTime};

use super::event::ResyncReason;
use super::gaps::Gaps;
use super::replay::ReplayGuard;
use super::settings::Settings;
use super::subscriptions::Subscriptions;
use crate::envelope::{Envelope, MAX_LOGGED_ENVELOPE_LEN, MAX_PAYLOAD_LEN};
use crate::error::DecodeError;
use crate::layout::is_updatepipe_sender;
use crate::limits::Limits;
use crate::origin::Origin;
use crate::sign::{self, Signer};
use crate::update::{MailboxKey, Update};

/// One notification, as the connection delivered it.
#[derive(Clone, Copy, Debug)]
pub(super) struct Incoming<'a> {
    pub(super) channel: &'a str,
    pub(super) payload: &'a str,
    /// The sending backend's process id (for the log only).
    pub(super) sender_pid: i32,
}

/// One durable log row: the sender and number its columns give, and the envelope.
#[derive(Clone, Copy, Debug)]
pub(super) struct LogRow<'a> {
    pub(super) origin: &'a str,
    pub(super) seq: i64,
    pub(super) payload: &'a str,
    /// When the row was written (the server's clock, seconds since the epoch).
    pub(super) written_at: f64,
}

/// The time, both ways: the wall clock for the envelopes' times, the monotonic one for the
/// memory of numbers.
#[derive(Clone, Copy, Debug)]
pub(super) struct Moment {
    pub(super) wall: SystemTime,
    pub(super) mono: Instant,
}

impl Moment {
    pub(super) fn now() -> Moment {
        Moment {
            wall: SystemTime::now(),
            mono: Instant::now(),
        }
    }
}

/// What a notification means.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Verdict {
    /// On a channel this listener does not serve.
    OtherChannel,
    /// Refused: counted and logged, never delivered.
    Rejected(DecodeError),
    /// A heartbeat: `Some(number)` when it is this listener's own.
    Heartbeat { own: Option<u64> },
    /// This pipe's own push, come back.
    Echo,
    /// The maddy layout: another updatepipe pipe's copy of an update for maddy nodes, on a
    /// mailbox's channel (or a copy on the pipe's channel, where a mailbox key names it):
    /// its envelope on the pipe's channel carries the update.
    CopyForMaddy,
    /// The maddy layout: an update from a maddy node that the pipe cannot take as it is (a
    /// flag it refuses, such as a non-ASCII one): counted, and a resync for its mailbox.
    Unrepresentable { key: MailboxKey, error: DecodeError },
    /// Durable mode: a durable envelope, to be read from the log (in commit order, exactly
    /// once) rather than from the notification.
    InLog,
    /// Something from another sender.
    Carries(Carried),
}

/// What a notification from another sender carries, and what it says about its sender.
#[derive(Debug, PartialEq, Eq)]
pub(super) struct Carried {
    /// Durable mode: its sender pushes best effort, and a disconnect loses its updates.
    pub(super) best_effort_sender: bool,
    /// Its number shows that something between was not received.
    pub(super) gap: Option<ResyncReason>,
    pub(super) content: Content,
}

/// The content of a notification from another sender.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Content {
    /// Updates to deliver.
    Updates(Vec<Update>),
    /// An oversize envelope, to be fetched from the log by sender and number.
    Fetch { origin: Origin, seq: u64 },
    /// Refused after the numbers were noted: a reference without the durable mark (only
    /// durable pushes write references).
    Refused(DecodeError),
}

/// What a log row means.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum RowVerdict {
    /// Written by this pipe: not delivered.
    Own,
    Updates(Vec<Update>),
    /// Refused: counted and logged; `resync` when it was a committed update that the
    /// application will not see (written by a newer version, say, or older than the replay
    /// checks allow), not when it was not what its sender wrote (unsigned, forged, or with
    /// signing on too large to check).
    Refused {
        error: DecodeError,
        resync: bool,
    },
}

/// Where a payload came from.
#[derive(Clone, Copy, PartialEq)]
enum Source<'a> {
    Notification,
    /// A durable log row, with the sender and number its columns give, and when it was
    /// written.
    Log {
        origin: &'a str,
        seq: i64,
        written_at: f64,
    },
}

/// The intake's state: who this listener is, its checks, and what it remembers of senders.
#[derive(Debug)]
pub(super) struct Intake {
    channel: String,
    origin: Origin,
    durable: bool,
    /// With signing on: checks every payload's signature.
    signer: Option<Signer>,
    accept_unsigned: bool,
    limits: Limits,
    replay_window: std::time::Duration,
    /// With signing on: the numbers each sender has used.
    replays: ReplayGuard,
    gaps: Gaps,
    /// With signing on: still deliver maddy's updates, which cannot be signed.
    accept_maddy: bool,
    /// The maddy layout: the mailboxes' channels served.
    pub(super) subscriptions: Subscriptions,
    /// This pipe's own updates are delivered, not dropped as echoes.
    own_updates: bool,
}

impl Intake {
    pub(super) fn new(settings: &Settings, origin: Origin) -> Intake {
        Intake {
            channel: settings.channel.clone(),
            origin,
            durable: settings.durable,
            signer: settings.signer.clone(),
            accept_unsigned: settings.accept_unsigned,
            limits: settings.limits.clone(),
            replay_window: settings.replay_window,
            replays: ReplayGuard::default(),
            gaps: Gaps::default(),
            accept_maddy: settings.accept_maddy,
            subscriptions: Subscriptions::default(),
            own_updates: settings.own_updates,
        }
    }

    /// What one notification means, noting its sender's numbers.
    pub(super) fn classify(&mut self, incoming: Incoming<'_>, now: Moment) -> Verdict {
        if incoming.channel != self.channel {
            if self.subscriptions.contains(incoming.channel) {
                return self.classify_maddy(incoming);
            }
            return Verdict::OtherChannel;
        }
        if legacy_sender(incoming.payload).is_some_and(is_updatepipe_sender) {
            return Verdict::CopyForMaddy;
        }
        let envelope = match self.decode(incoming.payload, Source::Notification, now) {
            Ok(envelope) => envelope,
            Err(e) => return Verdict::Rejected(e),
        };
        let own = *envelope.origin() == self.origin;
        if envelope.is_heartbeat() {
            return Verdict::Heartbeat {
                own: envelope.seq().filter(|_| own),
            };
        }
        if own && !self.own_updates {
            return Verdict::Echo;
        }
        let mut best_effort_sender = false;
        if self.durable {
            if envelope.is_durable() {
                return Verdict::InLog;
            }
            best_effort_sender = !envelope.updates().is_empty();
        }
        let gap = match envelope.seq() {
            Some(seq) if !envelope.is_transactional() => self
                .gaps
                .note(envelope.origin(), seq)
                .map(|gap| ResyncReason::SequenceGap {
                    origin: envelope.origin().to_string(),
                    expected: gap.expected,
                    got: gap.got,
                }),
            _ => None,
        };
        let content = if !envelope.is_reference() {
            Content::Updates(envelope.into_updates())
        } else if !envelope.is_durable() {
            Content::Refused(DecodeError::Malformed(
                "a reference without the durable mark".into(),
            ))
        } else {
            Content::Fetch {
                origin: envelope.origin().clone(),
                seq: envelope.seq().unwrap_or(0),
            }
        };
        Verdict::Carries(Carried {
            best_effort_sender,
            gap,
            content,
        })
    }

    /// What a notification on a subscribed mailbox's channel means: maddy's form only, one
    /// update, best effort (no numbers, no log). With signing on, refused as unsigned unless
    /// maddy's updates are accepted; one that is valid JSON but carries what the pipe
    /// refuses (a non-ASCII flag, say) asks for a resync of that mailbox instead.
    fn classify_maddy(&mut self, incoming: Incoming<'_>) -> Verdict {
        let Some(sender) = legacy_sender(incoming.payload) else {
            return Verdict::Rejected(DecodeError::Unrecognized);
        };
        if is_updatepipe_sender(sender) {
            return Verdict::CopyForMaddy;
        }
        if self.signer.is_some() && !self.accept_maddy {
            return Verdict::Rejected(DecodeError::Unsigned);
        }
        match Envelope::decode_with(incoming.payload, &self.limits) {
            Ok(envelope) => Verdict::Carries(Carried {
                best_effort_sender: false,
                gap: None,
                content: Content::Updates(envelope.into_updates()),
            }),
            Err(error @ (DecodeError::Update(_) | DecodeError::OverLimit { .. })) => {
                match self.subscriptions.key(incoming.channel) {
                    Some(key) => Verdict::Unrepresentable {
                        key: key.clone(),
                        error,
                    },
                    None => Verdict::Rejected(error),
                }
            }
            Err(error) => Verdict::Rejected(error),
        }
    }

    /// What one log row (from the tail, or an oversize envelope fetched) means.
    pub(super) fn classify_row(&mut self, row: LogRow<'_>, now: Moment) -> RowVerdict {
        if row.origin == self.origin.as_str() && !self.own_updates {
            return RowVerdict::Own;
        }
        let source = Source::Log {
            origin: row.origin,
            seq: row.seq,
            written_at: row.written_at,
        };
        match self.decode(row.payload, source, now) {
            Ok(envelope) => RowVerdict::Updates(envelope.into_updates()),
            Err(error) => {
                // With signing on, a row too large to check is no more a sender's than a
                // forged one.
                let unchecked = self.signer.is_some() && matches!(error, DecodeError::TooLarge(_));
                let resync =
                    !unchecked && !matches!(error, DecodeError::Unsigned | DecodeError::Forged);
                RowVerdict::Refused { error, resync }
            }
        }
    }

    /// A new connection: see [`Gaps::on_reconnect`].
    pub(super) fn on_reconnect(&mut self) {
        self.gaps.on_reconnect(self.durable);
    }

    /// Checks a payload's signature (with signing on), decodes it within the limits, and,
    /// with signing on, checks it is no replay: a notification must be within the replay
    /// window and carry a number its sender has not used; a log entry (exactly once by the
    /// log's cursor, and unique by sender and number in the table) must have been sent when
    /// its row was written (within the window), however long ago.
    fn decode(
        &mut self,
        payload: &str,
        source: Source,
        now: Moment,
    ) -> Result<Envelope, DecodeError> {
        let signed = match &self.signer {
            None => false,
            Some(signer) => {
                // The size first, then the signature, before anything is parsed.
                let bound = match source {
                    Source::Notification => MAX_PAYLOAD_LEN,
                    Source::Log { .. } => MAX_LOGGED_ENVELOPE_LEN,
                };
                if payload.len() > bound {
                    return Err(DecodeError::TooLarge(payload.len()));
                }
                match signer.verify(payload) {
                    Ok(()) => true,
                    Err(DecodeError::Unsigned) if self.accept_unsigned => false,
                    Err(e) => return Err(e),
                }
            }
        };
        let envelope = match source {
            Source::Notification => Envelope::decode_with(payload, &self.limits)?,
            Source::Log { origin, seq, .. } => {
                let envelope = Envelope::decode_logged_with(payload, &self.limits)?;
                // A signed envelope names its sender and number: a copy of it in another
                // row is refused here, and in a row of the same sender and number by the
                // table's unique index while the original is kept.
                check_row(&envelope, origin, seq, signed)?;
                envelope
            }
        };
        if !signed {
            return Ok(envelope);
        }
        let window = self.replay_window;
        match source {
            Source::Notification => {
                sign::check_time(envelope.sent_at(), now.wall, window)?;
                // Its own updates are echoes, never delivered, unless it delivers them.
                if let Some(seq) = envelope.seq()
                    && !envelope.is_heartbeat()
                    && (*envelope.origin() != self.origin || self.own_updates)
                {
                    self.replays.check(
                        envelope.origin(),
                        envelope.is_transactional(),
                        seq,
                        now.mono,
                        window,
                    )?;
                }
            }
            Source::Log { written_at, .. } => {
                // Sent when its row was written (its transaction may have begun earlier, so
                // any time after that start), however long ago that was: a row kept for a
                // consumer is as good as a new one. A signed envelope copied into a row of
                // its own later is refused: the server set that row's time.
                let written = std::time::UNIX_EPOCH
                    + std::time::Duration::try_from_secs_f64(written_at.max(0.0))
                        .unwrap_or_default();
                sign::check_sent_after(envelope.sent_at(), written, now.wall, window)?;
            }
        }
        Ok(envelope)
    }
}

/// The sender id of a payload in maddy's form (`<sender id>;…`, not a version 1 envelope).
fn legacy_sender(payload: &str) -> Option<&str> {
    if payload.starts_with('{') {
        return None;
    }
    payload.split_once(';').map(|(sender, _)| sender)
}

/// Whether a log row's sender and number are its envelope's. When they differ, the row was
/// not written by the envelope's sender: `Forged` for a signed envelope.
fn check_row(envelope: &Envelope, origin: &str, seq: i64, signed: bool) -> Result<(), DecodeError> {
    let same = envelope.origin().as_str() == origin
        && envelope.seq().and_then(|s| i64::try_from(s).ok()) == Some(seq);
    // Only durable pushes write log rows, and never a reference or a heartbeat: a signed
    // best-effort envelope copied into the log has no original there for the unique index
    // to stop a copy.
    let durable = envelope.is_durable() && !envelope.is_reference() && !envelope.is_heartbeat();
    match (same && durable, signed) {
        (true, _) => Ok(()),
        (false, true) => Err(DecodeError::Forged),
        (false, false) => Err(DecodeError::Malformed(
            "a log row that is not its sender's durable envelope of that number".into(),
        )),
    }
}

#[cfg(test)]
mod tests;
