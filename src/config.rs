//! Configuration: where the database is, which channel, and the pipe's bounds.

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use crate::channel::ChannelName;
use crate::error::Error;
use crate::limits::Limits;
use crate::sign::{DEFAULT_REPLAY_WINDOW, Secret, Signer};
use crate::tls::{self, SslMode, TlsOptions};

/// The default number of pooled connections used for pushing.
pub const DEFAULT_POOL_SIZE: usize = 8;

/// The default time allowed to establish a connection.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// The default time allowed for one push, from the call to the commit.
pub const DEFAULT_PUSH_TIMEOUT: Duration = Duration::from_secs(10);

/// The default bound on the updates one push transaction carries.
pub const DEFAULT_MAX_BATCH: usize = 4096;

/// The default bound on push transactions in flight at once on the push connection.
pub const DEFAULT_MAX_IN_FLIGHT: usize = 1;

/// The default health interval: a listener proves its connection end to end this often.
pub const DEFAULT_HEALTH_INTERVAL: Duration = Duration::from_secs(10);

/// The default retention of the durable log.
pub const DEFAULT_RETENTION: Duration = Duration::from_secs(24 * 3600);

/// The default bound on deliveries a listener holds for a caller that is not reading.
pub const DEFAULT_MAX_BUFFERED: usize = 65_536;

/// The variables that set TLS, and the connection-string keys they stand for.
const TLS_VARS: [(&str, &str); 4] = [
    ("PGSSLMODE", "sslmode"),
    ("PGSSLROOTCERT", "sslrootcert"),
    ("PGSSLCERT", "sslcert"),
    ("PGSSLKEY", "sslkey"),
];

/// The longest replay window [`Config::with_replay_window`] takes.
const MAX_REPLAY_WINDOW: Duration = Duration::from_secs(7 * 24 * 3600);

/// How a listener retries after losing its connection: full-jitter exponential backoff.
///
/// Attempt `n` waits a random time between zero and `min(max, initial × 2ⁿ)`; the count
/// starts again once a connection has stayed up for `stable_after`. With `max_attempts`
/// unset (the default) the listener never gives up.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Backoff {
    /// The first delay's upper bound (default 100 ms).
    pub initial: Duration,
    /// The cap on any delay (default 10 s).
    pub max: Duration,
    /// How long a connection must last for the backoff to start over (default 30 s).
    pub stable_after: Duration,
    /// Give up after this many failed attempts in a row (default: never).
    pub max_attempts: Option<u32>,
}

impl Default for Backoff {
    fn default() -> Self {
        Backoff {
            initial: Duration::from_millis(100),
            max: Duration::from_secs(10),
            stable_after: Duration::from_secs(30),
            max_attempts: None,
        }
    }
}

impl Backoff {
    /// The delay before attempt `attempt` (0-based): uniform in `[0, min(max, initial·2ⁿ)]`.
    pub fn delay(&self, attempt: u32) -> Duration {
        let ceiling = self
            .initial
            .saturating_mul(2u32.saturating_pow(attempt.min(31)))
            .min(self.max);
        ceiling.mul_f64(rand::random::<f64>())
    }
}

/// Where a durable listener starts: by default now; with a `Since`, it first replays the
/// log from that point.
#[derive(Clone, Copy, Debug, PartialEq)]
#[non_exhaustive]
pub enum Since {
    /// The entries written at or after this time (by the server's clock).
    Time(std::time::SystemTime),
    /// The entries after this log position (an `updatepipe.log` id).
    Position(i64),
}

/// How a pipe reaches PostgreSQL, and its bounds.
///
/// Built from what users already have: [`Config::from_url`] takes a `postgres://` URL or a
/// libpq `key=value` string, [`Config::from_env`] reads `DATABASE_URL` or the standard `PG*`
/// variables, [`Config::from_pg`] wraps a [`tokio_postgres::Config`]. The rest has defaults
/// and builder-style setters:
///
/// ```
/// use std::time::Duration;
/// use updatepipe::{ChannelName, Config};
///
/// let config = Config::from_url("postgres://mail:hunter2@db.example/mail?sslmode=verify-full")?
///     .with_channel(ChannelName::new("imap_updates")?)
///     .with_pool_size(4)
///     .with_push_timeout(Duration::from_secs(5));
/// assert!(!format!("{config:?}").contains("hunter2"));
/// assert_eq!(config.ssl_mode(), updatepipe::SslMode::VerifyFull);
/// # Ok::<(), updatepipe::Error>(())
/// ```
#[derive(Clone)]
pub struct Config {
    pg: tokio_postgres::Config,
    channel: ChannelName,
    pool_size: usize,
    connect_timeout: Duration,
    push_timeout: Duration,
    max_batch: usize,
    max_batch_wait: Duration,
    max_in_flight: usize,
    durable: bool,
    backoff: Backoff,
    health_interval: Duration,
    retention: Duration,
    max_buffered: usize,
    since: Option<Since>,
    tls: TlsOptions,
    secrets: Vec<Secret>,
    accept_unsigned: bool,
    replay_window: Duration,
    limits: Limits,
}

impl Config {
    /// From a `postgres://` URL or a libpq `key=value` connection string. The TLS settings
    /// `sslmode` (up to `verify-full`), `sslrootcert`, `sslcert` and `sslkey` are read as
    /// libpq reads them.
    pub fn from_url(url: &str) -> Result<Self, Error> {
        Config::from_url_and(url, |_| None)
    }

    /// As [`Config::from_url`], with the `PGSSLMODE`, `PGSSLROOTCERT`, `PGSSLCERT` and
    /// `PGSSLKEY` variables as defaults for the TLS settings the string leaves out, as libpq
    /// reads them. The CLI's `--url` and `DATABASE_URL` are read this way.
    pub fn from_url_with_env(url: &str) -> Result<Self, Error> {
        Config::from_url_and(url, |name| {
            std::env::var(name).ok().filter(|v| !v.is_empty())
        })
    }

    /// From a connection string, with `var` giving the `PGSSL*` defaults for the TLS
    /// settings the string leaves out.
    fn from_url_and(url: &str, var: impl Fn(&str) -> Option<String>) -> Result<Self, Error> {
        let (url, mut tls_params) = tls::split_params(url)?;
        let pg = tokio_postgres::Config::from_str(&url).map_err(|e| {
            // The parser's messages name the option, never its value; say no more than that.
            Error::Config(format!(
                "cannot parse the connection string ({}); expected postgres://user:password@host:port/database \
                 or key=value pairs",
                crate::error::pg_message(&e)
            ))
        })?;
        let defaults: Vec<(String, String)> = TLS_VARS
            .iter()
            .filter(|(_, key)| !tls_params.iter().any(|(k, _)| k == key))
            .filter_map(|(name, key)| Some((key.to_string(), var(name)?)))
            .collect();
        tls_params.extend(defaults);
        let mut config = Config::from_pg(pg);
        config.apply_tls(tls_params)?;
        Ok(config)
    }

    /// Applies TLS settings (`sslmode`, `sslrootcert`, `sslcert`, `sslkey`), and tells
    /// tokio-postgres the mode.
    fn apply_tls(&mut self, params: Vec<(String, String)>) -> Result<(), Error> {
        for (key, value) in params {
            self.tls.set(&key, &value)?;
        }
        self.pg.ssl_mode(self.tls.mode.pg());
        Ok(())
    }

    /// From the environment: `DATABASE_URL` when set (with the `PGSSL*` variables as defaults
    /// for the TLS settings it leaves out), otherwise the standard libpq variables
    /// `PGHOST`, `PGHOSTADDR`, `PGPORT`, `PGUSER`, `PGPASSWORD`, `PGDATABASE`, `PGAPPNAME`,
    /// `PGCONNECT_TIMEOUT`, `PGOPTIONS`, `PGSSLMODE`, `PGSSLROOTCERT`, `PGSSLCERT` and
    /// `PGSSLKEY`. Unset, the host is `localhost`, the
    /// user is `$USER` (or `postgres`), and the database is named after the user.
    pub fn from_env() -> Result<Self, Error> {
        Config::from_vars(|name| std::env::var(name).ok().filter(|v| !v.is_empty()))
    }

    /// Whether the environment names a database (`DATABASE_URL` or `PGHOST`).
    pub fn env_names_database() -> bool {
        ["DATABASE_URL", "PGHOST", "PGHOSTADDR"]
            .iter()
            .any(|v| std::env::var_os(v).is_some_and(|v| !v.is_empty()))
    }

    pub(crate) fn from_vars(var: impl Fn(&str) -> Option<String>) -> Result<Self, Error> {
        if let Some(url) = var("DATABASE_URL") {
            return Config::from_url_and(&url, var);
        }
        let mut pg = tokio_postgres::Config::new();
        match var("PGHOST") {
            Some(hosts) => hosts.split(',').for_each(|h| {
                pg.host(h.trim());
            }),
            None if var("PGHOSTADDR").is_none() => {
                pg.host("localhost");
            }
            None => {}
        }
        if let Some(addrs) = var("PGHOSTADDR") {
            for addr in addrs.split(',') {
                let ip = addr.trim().parse().map_err(|_| {
                    Error::Config(format!("PGHOSTADDR {addr:?} is not an IP address"))
                })?;
                pg.hostaddr(ip);
            }
        }
        if let Some(ports) = var("PGPORT") {
            for port in ports.split(',') {
                let port = port
                    .trim()
                    .parse()
                    .map_err(|_| Error::Config(format!("PGPORT {port:?} is not a port number")))?;
                pg.port(port);
            }
        }
        let user = var("PGUSER")
            .or_else(|| var("USER"))
            .unwrap_or_else(|| "postgres".to_owned());
        pg.dbname(var("PGDATABASE").as_deref().unwrap_or(&user));
        pg.user(&user);
        if let Some(password) = var("PGPASSWORD") {
            pg.password(password);
        }
        if let Some(name) = var("PGAPPNAME") {
            pg.application_name(&name);
        }
        if let Some(options) = var("PGOPTIONS") {
            pg.options(&options);
        }
        let mut config = Config::from_pg(pg);
        let tls = TLS_VARS
            .iter()
            .filter_map(|(name, key)| Some((key.to_string(), var(name)?)));
        config.apply_tls(tls.collect())?;
        if let Some(secs) = var("PGCONNECT_TIMEOUT") {
            let secs: u64 = secs.trim().parse().map_err(|_| {
                Error::Config(format!(
                    "PGCONNECT_TIMEOUT {secs:?} is not a number of seconds"
                ))
            })?;
            config = config.with_connect_timeout(Duration::from_secs(secs.max(1)));
        }
        Ok(config)
    }

    /// From a `tokio_postgres::Config`. The application name defaults to `updatepipe`. With
    /// host addresses and no host names, each address stands for its name too, as in libpq
    /// (TLS needs a name; `verify-full` then checks the address).
    pub fn from_pg(mut pg: tokio_postgres::Config) -> Self {
        if pg.get_application_name().is_none() {
            pg.application_name("updatepipe");
        }
        if pg.get_hosts().is_empty() {
            for addr in pg.get_hostaddrs().to_vec() {
                pg.host(addr.to_string());
            }
        }
        let connect_timeout = pg
            .get_connect_timeout()
            .copied()
            .unwrap_or(DEFAULT_CONNECT_TIMEOUT);
        pg.connect_timeout(connect_timeout);
        let mut tls = TlsOptions::default();
        tls.mode = match pg.get_ssl_mode() {
            tokio_postgres::config::SslMode::Disable => SslMode::Disable,
            tokio_postgres::config::SslMode::Require => SslMode::Require,
            _ => SslMode::Prefer,
        };
        Config {
            pg,
            channel: ChannelName::default(),
            pool_size: DEFAULT_POOL_SIZE,
            connect_timeout,
            push_timeout: DEFAULT_PUSH_TIMEOUT,
            max_batch: DEFAULT_MAX_BATCH,
            max_batch_wait: Duration::ZERO,
            max_in_flight: DEFAULT_MAX_IN_FLIGHT,
            durable: false,
            backoff: Backoff::default(),
            health_interval: DEFAULT_HEALTH_INTERVAL,
            retention: DEFAULT_RETENTION,
            max_buffered: DEFAULT_MAX_BUFFERED,
            since: None,
            tls,
            secrets: Vec::new(),
            accept_unsigned: false,
            replay_window: DEFAULT_REPLAY_WINDOW,
            limits: Limits::default(),
        }
    }

    /// The channel every update travels on (default `updatepipe`).
    pub fn with_channel(mut self, channel: ChannelName) -> Self {
        self.channel = channel;
        self
    }

    /// How many pooled connections pushes may use at once (default 8, at least 1).
    pub fn with_pool_size(mut self, size: usize) -> Self {
        self.pool_size = size.max(1);
        self
    }

    /// The time allowed to establish a connection (default 10 s).
    pub fn with_connect_timeout(mut self, timeout: Duration) -> Self {
        self.connect_timeout = timeout;
        self.pg.connect_timeout(timeout);
        self
    }

    /// The time allowed for one push, from the call to the commit (default 10 s).
    pub fn with_push_timeout(mut self, timeout: Duration) -> Self {
        self.push_timeout = timeout;
        self
    }

    /// The most updates one push transaction gathers from concurrent pushes (default 4096,
    /// at least 1). A single `push_many` larger than this still goes in one transaction.
    pub fn with_max_batch(mut self, updates: usize) -> Self {
        self.max_batch = updates.max(1);
        self
    }

    /// How long a push waits for company before it is sent (default zero: a push goes out
    /// at once, and pushes that arrive while one is in flight gather for the next). A
    /// small wait makes bigger batches at low concurrency, at the cost of that latency.
    pub fn with_max_batch_wait(mut self, wait: Duration) -> Self {
        self.max_batch_wait = wait;
        self
    }

    /// How many push transactions may be in flight at once (default 1, at least 1). More
    /// than one are pipelined on one connection, so they still commit in the order they
    /// were sent, and a push that arrives while another is in flight goes out at once (or
    /// after a few scheduler turns, when a batch is being gathered) instead of waiting for
    /// that one's round trip: worth it over a network. On the server's own machine, where
    /// the round trip is short, waiting makes bigger batches, which cost the server less
    /// (`BENCHMARKS.md` has both). Keep 1 behind a transaction-pooling proxy that may route
    /// pipelined transactions to different servers. Durable pushes, and pushes through a
    /// proxy detected as transaction-pooling, go one at a time whatever this says.
    pub fn with_max_in_flight(mut self, transactions: usize) -> Self {
        self.max_in_flight = transactions.max(1);
        self
    }

    /// Durable delivery (default off). Every push also writes its envelope to the
    /// `updatepipe.log` table in the same transaction as its notification, and the listener
    /// reads durable updates from the log, so after a disconnect it replays exactly what it
    /// missed. Costs an insert per push transaction (batched) and a log query per wake-up;
    /// needs [`PgPipe::migrate`](crate::PgPipe::migrate). Envelopes too large for a
    /// notification travel through the log.
    pub fn with_durable(mut self, durable: bool) -> Self {
        self.durable = durable;
        self
    }

    /// How the listener retries after losing its connection.
    pub fn with_backoff(mut self, backoff: Backoff) -> Self {
        self.backoff = backoff;
        self
    }

    /// How often the listener proves its connection end to end (default 10 s): it notifies
    /// its own channel and expects the heartbeat back within this interval, or treats the
    /// connection as dead. Zero turns the check off.
    pub fn with_health_interval(mut self, interval: Duration) -> Self {
        self.health_interval = interval;
        self
    }

    /// How long the durable log keeps entries (default 24 h). A listener away longer than
    /// this receives a resync instead of a partial replay.
    pub fn with_retention(mut self, retention: Duration) -> Self {
        self.retention = retention;
        self
    }

    /// How many deliveries the listener holds for a caller that is not reading (default
    /// 65,536). Past that it lets go: see the slow-consumer policy in `docs/delivery.md`.
    pub fn with_max_buffered(mut self, max: usize) -> Self {
        self.max_buffered = max.max(1);
        self
    }

    /// Durable mode only (ignored otherwise): replay the log from this point before the live
    /// updates, instead of starting from now. The entries still in the log (see the
    /// retention) are delivered once, in log order, then everything after them as usual.
    /// A time is approximate: the log is entered at the last entry whose transaction
    /// started before it.
    pub fn with_since(mut self, since: Since) -> Self {
        self.since = Some(since);
        self
    }

    /// How connections use TLS (default `prefer`, as libpq), as `sslmode` in the URL sets it.
    pub fn with_ssl_mode(mut self, mode: SslMode) -> Self {
        self.tls.mode = mode;
        self.pg.ssl_mode(mode.pg());
        self
    }

    /// The root certificate(s) that server certificates must chain to: a PEM file, or
    /// `system` for the operating system's store (`sslrootcert`; `system` only with
    /// [`SslMode::VerifyFull`], or the pipe refuses to start).
    pub fn with_ssl_root_cert(mut self, path: impl AsRef<std::path::Path>) -> Self {
        self.tls.set_root_cert(path);
        self
    }

    /// A client certificate and its private key, both PEM files (`sslcert`, `sslkey`), for
    /// servers that authenticate clients by certificate.
    pub fn with_ssl_client_cert(
        mut self,
        cert: impl Into<std::path::PathBuf>,
        key: impl Into<std::path::PathBuf>,
    ) -> Self {
        self.tls.set_client_cert(cert.into(), key.into());
        self
    }

    /// Signs every envelope this pipe sends with the first secret, and makes its listener
    /// accept only envelopes signed with one of them, not seen before and within the replay
    /// window (default off: no secret). All pipes on a channel need the same secrets; see
    /// `docs/security.md`.
    pub fn with_secrets(mut self, secrets: Vec<Secret>) -> Self {
        self.secrets = secrets;
        self
    }

    /// With signing on, while it is being rolled out: sign what this pipe sends, check
    /// signed envelopes as usual, and also accept unsigned ones (default off). Turn it on
    /// for every pipe first, then off everywhere once every sender signs (see
    /// `docs/security.md`).
    pub fn with_accept_unsigned(mut self, accept: bool) -> Self {
        self.accept_unsigned = accept;
        self
    }

    /// With signing on: how far a notification's time may be from the listener's clock,
    /// either way (default 5 minutes, at most a week). Covers clock skew between hosts and
    /// the time a push inside a caller's transaction waits for its commit; durable log
    /// entries are allowed the retention on top.
    pub fn with_replay_window(mut self, window: Duration) -> Self {
        self.replay_window = window.min(MAX_REPLAY_WINDOW);
        self
    }

    /// Bounds on what one received payload may ask for (default [`Limits::default`]).
    pub fn with_limits(mut self, limits: Limits) -> Self {
        self.limits = limits;
        self
    }

    /// The `application_name` the pipe's connections report (default `updatepipe`), as seen
    /// in `pg_stat_activity`.
    pub fn with_application_name(mut self, name: &str) -> Self {
        self.pg.application_name(name);
        self
    }

    /// The PostgreSQL connection settings.
    pub fn pg(&self) -> &tokio_postgres::Config {
        &self.pg
    }

    /// The channel.
    pub fn channel(&self) -> &ChannelName {
        &self.channel
    }

    /// The push pool's size.
    pub fn pool_size(&self) -> usize {
        self.pool_size
    }

    /// The connect timeout.
    pub fn connect_timeout(&self) -> Duration {
        self.connect_timeout
    }

    /// The push timeout.
    pub fn push_timeout(&self) -> Duration {
        self.push_timeout
    }

    /// The bound on updates per push transaction.
    pub fn max_batch(&self) -> usize {
        self.max_batch
    }

    /// How long a push waits for company.
    pub fn max_batch_wait(&self) -> Duration {
        self.max_batch_wait
    }

    /// The bound on push transactions in flight at once.
    pub fn max_in_flight(&self) -> usize {
        self.max_in_flight
    }

    /// Whether delivery is durable.
    pub fn durable(&self) -> bool {
        self.durable
    }

    /// The listener's reconnect backoff.
    pub fn backoff(&self) -> &Backoff {
        &self.backoff
    }

    /// The listener's health interval (zero: off).
    pub fn health_interval(&self) -> Duration {
        self.health_interval
    }

    /// The durable log's retention.
    pub fn retention(&self) -> Duration {
        self.retention
    }

    /// The bound on deliveries held for a caller that is not reading.
    pub fn max_buffered(&self) -> usize {
        self.max_buffered
    }

    /// Where a durable listener starts (`None`: now).
    pub fn since(&self) -> Option<Since> {
        self.since
    }

    /// How connections use TLS.
    pub fn ssl_mode(&self) -> SslMode {
        self.tls.mode
    }

    /// Whether envelopes are signed and checked.
    pub fn signing(&self) -> bool {
        !self.secrets.is_empty()
    }

    /// Whether a signing listener also accepts unsigned envelopes (a rollout).
    pub fn accepts_unsigned(&self) -> bool {
        self.accept_unsigned
    }

    /// The replay window of signed envelopes.
    pub fn replay_window(&self) -> Duration {
        self.replay_window
    }

    /// The bounds on received payloads.
    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    /// The signer for this channel, when signing is on.
    pub(crate) fn signer(&self) -> Option<Signer> {
        (!self.secrets.is_empty())
            .then(|| Signer::from_parts(self.secrets.clone(), self.channel.clone()))
    }

    /// A TLS connector for these settings (reading the certificate files now), for
    /// connections of your own that should use TLS as the pipe does:
    /// `config.pg().connect(config.tls_connector()?)`.
    pub fn tls_connector(&self) -> Result<tokio_postgres_rustls::MakeRustlsConnect, Error> {
        self.tls.connector()
    }
}

impl fmt::Debug for Config {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // tokio_postgres::Config's Debug redacts the password.
        f.debug_struct("Config")
            .field("pg", &self.pg)
            .field("channel", &self.channel)
            .field("pool_size", &self.pool_size)
            .field("connect_timeout", &self.connect_timeout)
            .field("push_timeout", &self.push_timeout)
            .field("max_batch", &self.max_batch)
            .field("max_batch_wait", &self.max_batch_wait)
            .field("max_in_flight", &self.max_in_flight)
            .field("durable", &self.durable)
            .field("backoff", &self.backoff)
            .field("health_interval", &self.health_interval)
            .field("retention", &self.retention)
            .field("max_buffered", &self.max_buffered)
            .field("since", &self.since)
            .field("tls", &self.tls)
            .field("secrets", &self.secrets.len())
            .field("accept_unsigned", &self.accept_unsigned)
            .field("replay_window", &self.replay_window)
            .field("limits", &self.limits)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;
    use tokio_postgres::config::Host;

    fn from(vars: &[(&str, &str)]) -> Result<Config, Error> {
        let map: HashMap<String, String> = vars
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        Config::from_vars(|k| map.get(k).cloned())
    }

    #[test]
    fn parses_url_and_key_value() {
        let c = Config::from_url("postgres://u:pw@db.example:6543/mail").unwrap();
        assert_eq!(c.pg().get_user(), Some("u"));
        assert_eq!(c.pg().get_dbname(), Some("mail"));
        assert_eq!(c.pg().get_ports(), &[6543]);
        let c = Config::from_url("host=localhost port=5433 user=x dbname=y").unwrap();
        assert_eq!(c.pg().get_ports(), &[5433]);
        assert_eq!(c.pg().get_application_name(), Some("updatepipe"));
        let c = Config::from_url("postgres://u@h/d?application_name=mine").unwrap();
        assert_eq!(c.pg().get_application_name(), Some("mine"));
    }

    #[test]
    fn tls_variables_fill_in_what_the_url_leaves_out() {
        let c = from(&[
            ("DATABASE_URL", "postgres://a@h1/db1?sslmode=require"),
            ("PGSSLMODE", "disable"),
        ])
        .unwrap();
        assert_eq!(c.ssl_mode(), SslMode::Require);
        let c = from(&[
            ("DATABASE_URL", "postgres://a@h1/db1"),
            ("PGSSLMODE", "verify-full"),
        ])
        .unwrap();
        assert_eq!(c.ssl_mode(), SslMode::VerifyFull);
        assert_eq!(
            c.pg().get_ssl_mode(),
            tokio_postgres::config::SslMode::Require
        );
        // Plain from_url reads no environment.
        let c = Config::from_url("postgres://a@h1/db1").unwrap();
        assert_eq!(c.ssl_mode(), SslMode::Prefer);
    }

    #[test]
    fn host_addresses_stand_for_host_names() {
        let c = from(&[("PGHOSTADDR", "127.0.0.1")]).unwrap();
        assert_eq!(c.pg().get_hosts(), &[Host::Tcp("127.0.0.1".into())]);
        let c = Config::from_url("hostaddr=10.0.0.1 user=x").unwrap();
        assert_eq!(c.pg().get_hosts(), &[Host::Tcp("10.0.0.1".into())]);
        let c = Config::from_url("host=db hostaddr=10.0.0.1 user=x").unwrap();
        assert_eq!(c.pg().get_hosts(), &[Host::Tcp("db".into())]);
    }

    #[test]
    fn database_url_wins_over_pg_vars() {
        let c = from(&[("DATABASE_URL", "postgres://a@h1/db1"), ("PGHOST", "h2")]).unwrap();
        assert_eq!(c.pg().get_hosts(), &[Host::Tcp("h1".into())]);
    }

    #[test]
    fn reads_pg_vars() {
        let c = from(&[
            ("PGHOST", "h1,h2"),
            ("PGPORT", "5433,5434"),
            ("PGUSER", "mail"),
            ("PGPASSWORD", "hunter2"),
            ("PGAPPNAME", "imapd"),
            ("PGCONNECT_TIMEOUT", "3"),
        ])
        .unwrap();
        assert_eq!(
            c.pg().get_hosts(),
            &[Host::Tcp("h1".into()), Host::Tcp("h2".into())]
        );
        assert_eq!(c.pg().get_ports(), &[5433, 5434]);
        assert_eq!(c.pg().get_user(), Some("mail"));
        assert_eq!(c.pg().get_dbname(), Some("mail"));
        assert_eq!(c.pg().get_password(), Some(&b"hunter2"[..]));
        assert_eq!(c.pg().get_application_name(), Some("imapd"));
        assert_eq!(c.connect_timeout(), Duration::from_secs(3));
    }

    #[test]
    fn defaults_without_any_variable() {
        let c = from(&[]).unwrap();
        assert_eq!(c.pg().get_hosts(), &[Host::Tcp("localhost".into())]);
        assert_eq!(c.pg().get_user(), Some("postgres"));
        assert_eq!(c.channel().as_str(), "updatepipe");
        assert_eq!(c.pool_size(), DEFAULT_POOL_SIZE);
        assert_eq!(c.push_timeout(), DEFAULT_PUSH_TIMEOUT);
    }

    #[test]
    fn bad_values_are_config_errors() {
        assert!(matches!(from(&[("PGPORT", "x")]), Err(Error::Config(_))));
        assert!(matches!(
            from(&[("PGHOSTADDR", "nope")]),
            Err(Error::Config(_))
        ));
        assert!(matches!(
            from(&[("PGSSLMODE", "sometimes")]),
            Err(Error::Config(_))
        ));
        assert!(matches!(
            from(&[("PGCONNECT_TIMEOUT", "soon")]),
            Err(Error::Config(_))
        ));
        assert!(matches!(
            Config::from_url("postgres://u:pw@h:notaport/d"),
            Err(Error::Config(_))
        ));
    }

    #[test]
    fn backoff_is_bounded_full_jitter() {
        let b = Backoff::default();
        for attempt in 0..40 {
            let ceiling = (b.initial * 2u32.pow(attempt.min(20))).min(b.max);
            for _ in 0..20 {
                assert!(b.delay(attempt) <= ceiling);
            }
        }
        // Jitter: not always the ceiling.
        let delays: std::collections::HashSet<_> = (0..20).map(|_| b.delay(10)).collect();
        assert!(delays.len() > 1);
    }

    #[test]
    fn password_never_shows() {
        let secret = "s3cr3t-pw";
        let c = Config::from_url(&format!("postgres://u:{secret}@h/d")).unwrap();
        assert!(!format!("{c:?}").contains(secret));
        let err = Config::from_url(&format!("postgres://u:{secret}@h:bad/d")).unwrap_err();
        assert!(!err.to_string().contains(secret), "{err}");
        assert!(!format!("{err:?}").contains(secret), "{err:?}");
        let err = Config::from_url(&format!("host=h password={secret} port=bad")).unwrap_err();
        assert!(!err.to_string().contains(secret), "{err}");
    }
}
