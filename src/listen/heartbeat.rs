//! Heartbeats: the listener proves its connection by sending itself a notification now and
//! then, from another connection, and waiting for it to come back.
//!
//! A heartbeat goes out every half interval and must be back within 0.4 interval, checked
//! every tenth: a dead path is found within one interval. It has a slot of its own in the
//! connection loop, so that a slow query never delays the proof that the connection works.
//! It is sent from another connection (the pipe's pool), as every other update is, so its
//! coming back proves what matters: a notification committed elsewhere reaches this
//! listener. (Sent on the listener's own connection through a transaction-pooling proxy, it
//! could come back while nothing else does.)

use std::time::Duration;

use futures_util::FutureExt;
use futures_util::future::BoxFuture;
use tokio::time::Instant;
use tokio_postgres::types::Type;

use super::event::TARGET;
use crate::envelope::Packer;
use crate::error::pg_message;
use crate::pg::{Canceller, Lent};

/// The heartbeat's clock: its number, the one outstanding, and when the next is due.
#[derive(Debug)]
pub(super) struct Clock {
    interval: Duration,
    seq: u64,
    /// The heartbeat sent and not yet back: its number and when it was sent.
    outstanding: Option<(u64, Instant)>,
    next_due: Instant,
}

impl Clock {
    /// A clock for this health interval (zero: no heartbeats); the first is due in half.
    pub(super) fn new(interval: Duration, now: Instant) -> Clock {
        Clock {
            interval,
            seq: 0,
            outstanding: None,
            next_due: now + interval / 2,
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

    /// How long a heartbeat may take to come back.
    pub(super) fn timeout(&self) -> Duration {
        self.interval * 2 / 5
    }

    /// The number of the heartbeat to send now, if one is due (none is while one is
    /// outstanding); it is outstanding from now.
    pub(super) fn due(&mut self, now: Instant) -> Option<u64> {
        if self.interval.is_zero() || self.outstanding.is_some() || now < self.next_due {
            return None;
        }
        self.seq += 1;
        self.outstanding = Some((self.seq, now));
        self.next_due = now + self.interval / 2;
        Some(self.seq)
    }

    /// This listener's heartbeat `seq` came back.
    pub(super) fn heard(&mut self, seq: u64) {
        if let Some((outstanding, sent_at)) = self.outstanding
            && outstanding == seq
        {
            // From the send (before its commit) to its arrival here: the path every update
            // takes, end to end.
            crate::stats::heartbeat_lag(sent_at.elapsed());
            self.outstanding = None;
        }
    }

    /// Why the connection is dead, when the outstanding heartbeat is late.
    pub(super) fn late(&self, now: Instant) -> Option<String> {
        let (seq, sent_at) = self.outstanding?;
        let timeout = self.timeout();
        (now.saturating_duration_since(sent_at) > timeout).then(|| {
            format!("heartbeat {seq} did not come back within {timeout:?}: the connection is dead")
        })
    }

    /// A query on the listener's connection ended now: notifications (the outstanding
    /// heartbeat among them) waited while it ran, so the heartbeat's time counts from now.
    pub(super) fn busy_until(&mut self, now: Instant) {
        if let Some((_, sent_at)) = &mut self.outstanding
            && *sent_at < now
        {
            *sent_at = now;
        }
    }

    /// The heartbeat could not be sent on the pooled connection: no verdict on this one.
    /// The next goes out soon.
    pub(super) fn send_failed(&mut self, now: Instant) {
        self.outstanding = None;
        self.next_due = now + self.interval / 10;
    }

    /// A new connection: nothing is outstanding on it, and the next is due in half an
    /// interval.
    pub(super) fn on_reconnect(&mut self, now: Instant) {
        self.outstanding = None;
        self.next_due = now + self.interval / 2;
    }
}

/// What sending a heartbeat came to.
#[derive(Debug)]
pub(super) enum Sent {
    Sent(Result<u64, tokio_postgres::Error>),
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
}

impl Heartbeat {
    pub(super) fn new(
        clock: Clock,
        packer: Packer,
        channel: String,
        pool: deadpool_postgres::Pool,
        canceller: Canceller,
    ) -> Heartbeat {
        Heartbeat {
            clock,
            packer,
            channel,
            pool,
            canceller,
        }
    }

    /// Sends the heartbeat `seq` (the clock's due one), within the time it has to come back
    /// (checkout included). A heartbeat whose connection does not answer by then, or that
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
        let deadline = self.clock.timeout();
        async move {
            let mut fresh = FreshAfterFault(Some(pool.clone()));
            let send = async {
                let lent = match pool.get().await {
                    Ok(client) => Lent::new(client, &canceller),
                    // No connection to send it: it will not come back, and the listener
                    // treats its connection as dead when the time is up, as it must
                    // when the server cannot be reached.
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
                Sent::Sent(sent)
            };
            match tokio::time::timeout(deadline, send).await {
                Ok(sent) => {
                    if !matches!(sent, Sent::Unsent(_)) {
                        fresh.0 = None;
                    }
                    sent
                }
                // Left to the clock: a path that does not answer at all looks like this.
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
            Sent::Sent(Ok(_)) => true,
            Sent::Unsent(reason) => {
                tracing::debug!(target: TARGET, %reason, "no connection to send a heartbeat");
                false
            }
            Sent::Sent(Err(e)) => {
                // It went out on a pooled connection, not this one (a pooled connection
                // left over from before a server restart, say): no verdict on this
                // connection. Send the next one soon, on another pooled connection; if none
                // can be had, that one stays unanswered and the clock decides.
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
mod tests {
    use super::*;

    const SECOND: Duration = Duration::from_secs(1);

    #[test]
    fn every_half_interval_one_at_a_time() {
        let start = Instant::now();
        let mut clock = Clock::new(10 * SECOND, start);
        assert_eq!(clock.due(start), None);
        assert_eq!(clock.due(start + 5 * SECOND), Some(1));
        // Outstanding: no other goes out, however late.
        assert_eq!(clock.due(start + 20 * SECOND), None);
        clock.heard(7);
        assert_eq!(clock.due(start + 20 * SECOND), None);
        clock.heard(1);
        assert_eq!(clock.due(start + 9 * SECOND), None);
        assert_eq!(clock.due(start + 10 * SECOND), Some(2));
    }

    #[test]
    fn late_after_four_tenths() {
        let start = Instant::now();
        let mut clock = Clock::new(10 * SECOND, start);
        assert_eq!(clock.tick_every(), SECOND);
        assert_eq!(clock.timeout(), 4 * SECOND);
        clock.due(start + 5 * SECOND).unwrap();
        assert_eq!(clock.late(start + 9 * SECOND), None);
        let reason = clock
            .late(start + 9 * SECOND + Duration::from_millis(1))
            .unwrap();
        assert_eq!(
            reason,
            "heartbeat 1 did not come back within 4s: the connection is dead"
        );
        clock.heard(1);
        assert_eq!(clock.late(start + 60 * SECOND), None);
    }

    #[test]
    fn a_query_that_ran_long_gives_the_heartbeat_its_time_again() {
        let start = Instant::now();
        let mut clock = Clock::new(10 * SECOND, start);
        clock.due(start + 5 * SECOND).unwrap();
        clock.busy_until(start + 20 * SECOND);
        assert_eq!(clock.late(start + 24 * SECOND), None);
        assert!(clock.late(start + 25 * SECOND).is_some());
        // Nothing outstanding: nothing to move.
        clock.heard(1);
        clock.busy_until(start + 30 * SECOND);
        assert_eq!(clock.late(start + 90 * SECOND), None);
    }

    #[test]
    fn a_zero_interval_sends_none_and_ticks_hourly() {
        let start = Instant::now();
        let mut clock = Clock::new(Duration::ZERO, start);
        assert_eq!(clock.due(start + 3600 * SECOND), None);
        assert_eq!(clock.tick_every(), 3600 * SECOND);
        assert_eq!(
            Clock::new(Duration::from_millis(50), start).tick_every(),
            10 * Duration::from_millis(1)
        );
    }

    #[test]
    fn a_failed_send_retries_soon_and_a_reconnect_starts_over() {
        let start = Instant::now();
        let mut clock = Clock::new(10 * SECOND, start);
        clock.due(start + 5 * SECOND).unwrap();
        clock.send_failed(start + 5 * SECOND);
        assert_eq!(clock.late(start + 60 * SECOND), None);
        assert_eq!(clock.due(start + 5 * SECOND + SECOND / 2), None);
        assert_eq!(clock.due(start + 6 * SECOND), Some(2));
        clock.on_reconnect(start + 7 * SECOND);
        assert_eq!(clock.late(start + 60 * SECOND), None);
        assert_eq!(clock.due(start + 11 * SECOND), None);
        assert_eq!(clock.due(start + 12 * SECOND), Some(3));
    }
}
