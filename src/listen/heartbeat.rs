//! Heartbeats: the listener proves its connection by sending itself a notification now and
//! then, from another connection, and waiting for it to come back.
//!
//! A heartbeat goes out every half interval and is expected back within 0.2 interval of
//! its commit, checked every tenth. It has a slot of its own in the connection loop, so
//! that a slow query never delays the proof that the connection works. It is sent from another
//! connection (the pipe's pool), as every other update is, so its coming back proves what
//! matters: a notification committed elsewhere reaches this listener. (Sent on the
//! listener's own connection through a transaction-pooling proxy, it could come back while
//! nothing else does.)
//!
//! A heartbeat that is late is not yet a verdict on the listener's connection: the loop
//! then proves the connection itself with a statement of its own (`SELECT 1`), which must
//! answer within 0.2 interval:
//!
//! - no answer, and nothing else delivered meanwhile: the connection is dead (a dead path is
//!   found within one interval: half an interval to the heartbeat, 0.2 to its lateness, 0.2
//!   to the proof's, and a tick). A connection still delivering notifications queued before
//!   the answer (a flood the listener is reading through) is waited for: see `query::Heard`;
//! - an answer, the heartbeat committed before the statement was sent and still not
//!   here: notifications committed on the server do not reach this connection, although it
//!   answers. The server writes a notification out before the answer to a later statement,
//!   so this is no question of waiting longer. Twice in a row ([`UNHEARD_LIMIT`]) and the
//!   listener stops with [`Error::ListenUnsupported`](crate::Error::ListenUnsupported): a
//!   transaction-pooling proxy, which no reconnect mends;
//! - an answer while the heartbeat is still being sent (its pooled connection is slow to
//!   come: a silent first host costs a connect timeout), or could not be sent at all: the
//!   connection is fine, and stays. A slow pool never tears a healthy listener down.

use std::time::Duration;

use futures_util::FutureExt;
use futures_util::future::BoxFuture;
use tokio::time::Instant;
use tokio_postgres::types::Type;

use super::event::TARGET;
use crate::envelope::Packer;
use crate::error::pg_message;
use crate::pg::{Canceller, Lent};

/// How many heartbeats in a row may go out, and not come back although the connection
/// answered a statement sent after their commit, before the listener gives up: LISTEN does
/// not work through this connection.
pub(super) const UNHEARD_LIMIT: u32 = 2;

/// The heartbeat outstanding: sent (or being sent), not back yet.
#[derive(Clone, Copy, Debug)]
struct Outstanding {
    seq: u64,
    /// When it was due: its lag, end to end, counts from here.
    sent_at: Instant,
    /// Whether `pg_notify` committed (the pooled connection answered).
    committed: bool,
    /// Its time to come back (or, while it is being sent, to be sent) counts from here:
    /// its commit, moved on while a query held notifications back.
    counting_from: Instant,
}

/// Where the proof of the connection by a statement of its own stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Proof {
    /// None wanted.
    Idle,
    /// Wanted: a heartbeat could not be sent.
    Wanted,
    /// Running; `Some(seq)`: for heartbeat `seq`, which had committed and was late.
    Running(Option<u64>),
}

/// What a proof of the connection that answered comes to.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Proved {
    /// The connection is fine.
    Fine,
    /// Notifications do not reach this connection, though it answers: why, in words.
    Unheard(String),
}

/// The heartbeat's clock: its number, the one outstanding, when the next is due, and the
/// proof of the connection by a statement.
#[derive(Debug)]
pub(super) struct Clock {
    interval: Duration,
    seq: u64,
    outstanding: Option<Outstanding>,
    next_due: Instant,
    proof: Proof,
    /// When the connection last answered a proof.
    last_proved: Option<Instant>,
    /// Heartbeats in a row that committed and did not come back, although the connection
    /// answered a statement sent after them.
    unheard: u32,
}

impl Clock {
    /// A clock for this health interval (zero: no heartbeats); the first is due in half.
    pub(super) fn new(interval: Duration, now: Instant) -> Clock {
        Clock {
            interval,
            seq: 0,
            outstanding: None,
            next_due: now + interval / 2,
            proof: Proof::Idle,
            last_proved: None,
            unheard: 0,
        }
    }

    /// How often the loop checks for a heartbeat that did not come back: every tenth of the
    /// interval (at least 10 ms), or hourly without heartbeats.
    pub(super) fn tick_every(&self) -> Duration {
        if self.interval.is_zero() {
            Duration::from_secs(3600)
        } else {
            (self.interval / 10).max(Duration::from_millis(10))
        }
    }

    /// How long a heartbeat may take to come back while a query holds notifications back
    /// (then the query is cancelled, and has as long again to answer), and the base of the
    /// time it has to be sent.
    pub(super) fn timeout(&self) -> Duration {
        self.interval * 2 / 5
    }

    /// How long a heartbeat may take to come back after its commit (or to be sent) before
    /// the connection is proved by a statement, and how long that statement has to answer.
    pub(super) fn proof_after(&self) -> Duration {
        self.interval / 5
    }

    /// The number of the heartbeat to send now, if one is due (none is while one is
    /// outstanding); it is outstanding from now.
    pub(super) fn due(&mut self, now: Instant) -> Option<u64> {
        if self.interval.is_zero() || self.outstanding.is_some() || now < self.next_due {
            return None;
        }
        self.seq += 1;
        self.outstanding = Some(Outstanding {
            seq: self.seq,
            sent_at: now,
            committed: false,
            counting_from: now,
        });
        self.next_due = now + self.interval / 2;
        Some(self.seq)
    }

    /// Heartbeat `seq` was committed on its pooled connection now: its time to come back
    /// counts from here. (It may have come back already.)
    pub(super) fn committed(&mut self, seq: u64, now: Instant) {
        if let Some(o) = &mut self.outstanding
            && o.seq == seq
        {
            o.committed = true;
            o.counting_from = now;
        }
    }

    /// This listener's heartbeat `seq` came back.
    pub(super) fn heard(&mut self, seq: u64) {
        if let Some(o) = self.outstanding
            && o.seq == seq
        {
            // From the send (before its commit) to its arrival here: the path every update
            // takes, end to end.
            crate::stats::heartbeat_lag(o.sent_at.elapsed());
            self.outstanding = None;
            self.unheard = 0;
        }
    }

    /// Whether the connection is to be proved by a statement of its own now: a heartbeat
    /// could not be sent, or the outstanding one is late (to come back after its commit, or
    /// to be sent at all). Not while a proof runs.
    pub(super) fn wants_proof(&self, now: Instant) -> bool {
        self.proof == Proof::Wanted || self.late_by(now, self.proof_after())
    }

    /// Whether the outstanding heartbeat is late while a query runs: not back (or not
    /// sent) within [`timeout`](Clock::timeout). Then the query is cancelled.
    pub(super) fn is_late(&self, now: Instant) -> bool {
        self.late_by(now, self.timeout())
    }

    /// Whether the outstanding heartbeat has not come back (or not been sent) within
    /// `after`, while no proof runs.
    fn late_by(&self, now: Instant, after: Duration) -> bool {
        !matches!(self.proof, Proof::Running(_))
            && self
                .outstanding
                .is_some_and(|o| now.saturating_duration_since(o.counting_from) > after)
    }

    /// The proof asked by [`wants_proof`](Clock::wants_proof) was sent now.
    pub(super) fn proof_started(&mut self) {
        let late = self.outstanding.filter(|o| o.committed).map(|o| o.seq);
        self.proof = Proof::Running(late);
    }

    /// The connection answered the proof now: what that comes to.
    pub(super) fn proved(&mut self, now: Instant) -> Proved {
        let Proof::Running(late) = std::mem::replace(&mut self.proof, Proof::Idle) else {
            return Proved::Fine;
        };
        self.last_proved = Some(now);
        match self.outstanding {
            // Committed before the statement went out, and not here before its answer.
            Some(o) if late == Some(o.seq) => {
                self.unheard += 1;
                self.outstanding = None;
                // The next at once: a second opinion, or the end.
                self.next_due = now;
                if self.unheard >= UNHEARD_LIMIT {
                    return Proved::Unheard(format!(
                        "{} heartbeats in a row, committed on the server, never came back \
                         while the connection answered statements sent after them",
                        self.unheard
                    ));
                }
                tracing::debug!(
                    target: TARGET,
                    seq = o.seq,
                    "a heartbeat did not come back though the connection answers; sending \
                     another"
                );
                Proved::Fine
            }
            // Still being sent (its pooled connection is slow to come): another timeout.
            Some(mut o) => {
                o.counting_from = now;
                self.outstanding = Some(o);
                Proved::Fine
            }
            None => Proved::Fine,
        }
    }

    /// Why the connection is dead: the proof did not answer within `after`.
    pub(super) fn unproved(&mut self, after: Duration) -> String {
        self.proof = Proof::Idle;
        match self.outstanding {
            Some(o) if o.committed => format!(
                "heartbeat {} did not come back, and the connection did not answer a statement \
                 within {after:?}: the connection is dead",
                o.seq
            ),
            _ => format!(
                "the connection did not answer a statement within {after:?}: the connection is \
                 dead"
            ),
        }
    }

    /// A query on the listener's connection ended now: notifications (the outstanding
    /// heartbeat among them) waited while it ran, so the heartbeat's time counts from now;
    /// and the connection answered, which is the proof a failed send wanted.
    pub(super) fn busy_until(&mut self, now: Instant) {
        if let Some(o) = &mut self.outstanding
            && o.counting_from < now
        {
            o.counting_from = now;
        }
        if self.proof == Proof::Wanted {
            self.proof = Proof::Idle;
            self.last_proved = Some(now);
        }
    }

    /// The heartbeat could not be sent on a pooled connection (none could be had, or it did
    /// not answer in time, or refused): no verdict on the listener's connection, which is
    /// proved by a statement instead (unless it answered one within the timeout). The next
    /// heartbeat goes out soon.
    pub(super) fn send_failed(&mut self, now: Instant) {
        self.outstanding = None;
        self.next_due = now + self.interval / 10;
        let recently = self
            .last_proved
            .is_some_and(|at| now.saturating_duration_since(at) <= self.timeout());
        if self.proof == Proof::Idle && !recently {
            self.proof = Proof::Wanted;
        }
    }

    /// A new connection: nothing is outstanding on it, no proof runs, and the next is due
    /// in half an interval.
    pub(super) fn on_reconnect(&mut self, now: Instant) {
        self.outstanding = None;
        self.proof = Proof::Idle;
        self.unheard = 0;
        self.next_due = now + self.interval / 2;
    }
}

/// What sending a heartbeat came to.
#[derive(Debug)]
pub(super) enum Sent {
    /// Heartbeat `seq` went out, or its statement failed.
    Sent(u64, Result<u64, tokio_postgres::Error>),
    /// No pooled connection could be had, or the one it went out on did not answer in time.
    Unsent(String),
}

/// The heartbeat's clock, and what it is sent with.
#[derive(Debug)]
pub(super) struct Heartbeat {
    pub(super) clock: Clock,
    packer: Packer,
    channel: String,
    /// Where heartbeats are sent from: the pipe's pool.
    pool: deadpool_postgres::Pool,
    /// Cancels a heartbeat given up on.
    canceller: Canceller,
    /// How long sending may take, checkout included: the time a heartbeat has to come
    /// back, and a connect timeout per host on top (a checkout may open a connection,
    /// which may try every host).
    send_within: Duration,
}

impl Heartbeat {
    pub(super) fn new(
        clock: Clock,
        packer: Packer,
        channel: String,
        pool: deadpool_postgres::Pool,
        canceller: Canceller,
        connect_budget: Duration,
    ) -> Heartbeat {
        let send_within = clock.timeout() + connect_budget;
        Heartbeat {
            clock,
            packer,
            channel,
            pool,
            canceller,
            send_within,
        }
    }

    /// Sends the heartbeat `seq` (the clock's due one), within the time it has to come back
    /// and a connect budget (checkout included: a silent first host must not keep
    /// heartbeats from going out through the next). Meanwhile the listener's connection is
    /// proved by a statement of its own when the send is slow, so a slow checkout says
    /// nothing against it. A heartbeat whose connection does not answer by then, or that
    /// is dropped unfinished (its session ended), is cancelled and its connection closed,
    /// never pooled again, and with it the pool's idle connections: they may sit behind the
    /// same dead path (a NAT or a middlebox that forgot the flows open at one moment), and
    /// the next heartbeat must go out on a fresh one. (Returned to the pool, a dead one
    /// would take every later heartbeat with it: the listener would flap for good.)
    pub(super) fn send(&self, seq: u64) -> BoxFuture<'static, Sent> {
        let payload = self.packer.heartbeat(seq);
        let channel = self.channel.clone();
        let pool = self.pool.clone();
        let canceller = self.canceller.clone();
        let deadline = self.send_within;
        async move {
            let mut fresh = FreshAfterFault(Some(pool.clone()));
            let send = async {
                let lent = match pool.get().await {
                    Ok(client) => Lent::new(client, &canceller),
                    // No connection to send it: no verdict on the listener's connection,
                    // which is proved by a statement of its own instead.
                    Err(e) => return Sent::Unsent(e.to_string()),
                };
                let sent = lent
                    .client()
                    .execute_typed(
                        "SELECT pg_catalog.pg_notify($1, $2)",
                        &[(&channel, Type::TEXT), (&payload, Type::TEXT)],
                    )
                    .await;
                match &sent {
                    Ok(_) => lent.answered(),
                    Err(e) => lent.ended_with(e),
                }
                Sent::Sent(seq, sent)
            };
            match tokio::time::timeout(deadline, send).await {
                Ok(sent) => {
                    if !matches!(sent, Sent::Unsent(_)) {
                        fresh.0 = None;
                    }
                    sent
                }
                // A path that does not answer at all looks like this.
                Err(_) => Sent::Unsent(format!(
                    "the pooled connection did not answer within {deadline:?}; closed"
                )),
            }
        }
        .boxed()
    }

    /// Notes what sending came to; `true` when the heartbeat went out.
    pub(super) fn on_sent(&mut self, sent: Sent) -> bool {
        match sent {
            Sent::Sent(seq, Ok(_)) => {
                self.clock.committed(seq, Instant::now());
                true
            }
            Sent::Unsent(reason) => {
                tracing::debug!(target: TARGET, %reason, "no connection to send a heartbeat");
                self.clock.send_failed(Instant::now());
                false
            }
            Sent::Sent(_, Err(e)) => {
                // It went out on a pooled connection, not this one (a pooled connection
                // left over from before a server restart, say): no verdict on this
                // connection, which is proved by a statement of its own. Send the next one
                // soon, on another pooled connection.
                tracing::debug!(
                    target: TARGET,
                    error = %pg_message(&e),
                    "a heartbeat could not be sent; sending another"
                );
                self.clock.send_failed(Instant::now());
                false
            }
        }
    }
}

#[cfg(test)]
impl Heartbeat {
    /// The channel heartbeats go out on (the pipe's).
    pub(super) fn channel_for_tests(&self) -> &str {
        &self.channel
    }
}

/// Lets the pool's idle connections go when dropped armed: a heartbeat was given up on.
struct FreshAfterFault(Option<deadpool_postgres::Pool>);

impl Drop for FreshAfterFault {
    fn drop(&mut self) {
        if let Some(pool) = self.0.take() {
            let closed = pool.retain(|_, _| false).removed.len();
            if closed > 0 {
                tracing::debug!(
                    target: TARGET,
                    closed,
                    "a heartbeat was given up on: the pool's idle connections are let go"
                );
            }
        }
    }
}

#[cfg(test)]
mod tests;
