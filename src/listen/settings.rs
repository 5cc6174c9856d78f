//! The listener's settings, read once from the configuration when it starts (as the push
//! side reads its own). The configuration itself is kept only for connecting.

use std::time::Duration;

use crate::config::{Backoff, Config, Since};
use crate::limits::Limits;
use crate::log::PageBudget;
use crate::sign::Signer;

/// What the listen path reads from the configuration.
#[derive(Clone, Debug)]
pub(super) struct Settings {
    /// The channel listened on, as the server names it.
    pub(super) channel: String,
    /// Whether durable updates are read from the log.
    pub(super) durable: bool,
    /// How often the connection is proven by a heartbeat (zero: never).
    pub(super) health_interval: Duration,
    pub(super) connect_timeout: Duration,
    /// The most updates held for a caller that does not read.
    pub(super) max_buffered: usize,
    /// How long the log keeps entries.
    pub(super) retention: Duration,
    /// With signing on: how far a notification's time may be from this clock.
    pub(super) replay_window: Duration,
    pub(super) accept_unsigned: bool,
    /// With signing on: deliver maddy's unsigned updates all the same.
    pub(super) accept_maddy: bool,
    pub(super) limits: Limits,
    pub(super) backoff: Backoff,
    /// Durable mode: where the first read of the log starts.
    pub(super) since: Option<Since>,
    /// With signing on: checks every payload's signature, and signs heartbeats.
    pub(super) signer: Option<Signer>,
    /// Durable mode: how much one page of a log read may hold.
    pub(super) page: PageBudget,
    /// Durable mode: the named consumer the listener reads as.
    pub(super) consumer: Option<String>,
    /// How long pruning keeps what named consumers have not acknowledged.
    pub(super) consumer_hold: Duration,
    /// Deliver this pipe's own updates too (the IDLE hub's listener: every session of the
    /// process hears what another stored), rather than drop them as echoes.
    pub(super) own_updates: bool,
    /// Durable mode: read the log this often instead of listening.
    pub(super) polling: Option<Duration>,
}

impl Settings {
    pub(super) fn from_config(config: &Config) -> Settings {
        Settings {
            channel: config.channel().as_str().to_owned(),
            durable: config.durable(),
            health_interval: config.listen_options().health_interval(),
            connect_timeout: config.connect_timeout(),
            max_buffered: config.listen_options().max_buffered(),
            retention: config.listen_options().retention(),
            replay_window: config.listen_options().replay_window(),
            accept_unsigned: config.listen_options().accepts_unsigned(),
            accept_maddy: config.listen_options().accepts_maddy(),
            limits: config.limits().clone(),
            backoff: config.listen_options().backoff().clone(),
            since: config.listen_options().since().cloned(),
            signer: config.signer(),
            page: PageBudget {
                rows: config.listen_options().log_page_rows(),
                bytes: config.listen_options().log_page_bytes(),
            },
            consumer: config.listen_options().consumer().map(str::to_owned),
            consumer_hold: config.listen_options().consumer_hold(),
            own_updates: false,
            polling: config.listen_options().polling(),
        }
    }

    /// How often heartbeats go out: never while polling (nothing would bring them back).
    pub(super) fn heartbeat_interval(&self) -> Duration {
        if self.polling.is_some() {
            Duration::ZERO
        } else {
            self.health_interval
        }
    }

    /// The deadline of a query on the listener's connection, past which it is cancelled:
    /// the health interval (at least a second; 60 s without heartbeats). While a query
    /// runs the backend delivers no notification, heartbeats included, so this deadline
    /// and the answer to the cancel are what prove the connection meanwhile. A log read is
    /// one page; a cancelled page is read again smaller.
    pub(super) fn query_deadline(&self) -> Duration {
        if self.health_interval.is_zero() {
            Duration::from_secs(60)
        } else {
            self.health_interval.max(Duration::from_secs(1))
        }
    }

    /// How long a cancelled query has to answer before its connection is taken for dead:
    /// the time a heartbeat has (0.4 interval; a second without heartbeats), so that a
    /// dead connection is still found within about one interval while a query runs.
    pub(super) fn cancel_grace(&self) -> Duration {
        if self.health_interval.is_zero() {
            Duration::from_secs(1)
        } else {
            (self.health_interval * 2 / 5).max(Duration::from_millis(10))
        }
    }

    /// How long to wait before reading again a log page the server cancelled.
    pub(super) fn page_pause(&self) -> Duration {
        (self.health_interval / 10).clamp(Duration::from_millis(10), Duration::from_secs(1))
    }
}
