//! Configuration: where the database is (here and in `conninfo`), which channel, and the
//! pipe's bounds (`options`).

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use crate::channel::ChannelName;
use crate::error::Error;
use crate::layout::Layout;
use crate::limits::Limits;
use crate::sign::{DEFAULT_REPLAY_WINDOW, Secret};
use crate::tls::{SslMode, TlsOptions};
use conninfo::{PassFile, TargetSession};
use std::sync::Arc;
use tokio_postgres::config::TargetSessionAttrs;

mod conninfo;
mod files;
mod listening;
mod options;

/// A variable of the process's environment, empty counting as unset (as libpq).
fn env_var(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.is_empty())
}

pub(crate) use files::read_regular;
pub use options::{
    Backoff, DEFAULT_CONNECT_TIMEOUT, DEFAULT_HEALTH_INTERVAL, DEFAULT_IDLE_IN_TRANSACTION_TIMEOUT,
    DEFAULT_LOCK_TIMEOUT, DEFAULT_LOG_PAGE_BYTES, DEFAULT_LOG_PAGE_ROWS, DEFAULT_MAX_BATCH,
    DEFAULT_MAX_BUFFERED, DEFAULT_MAX_IN_FLIGHT, DEFAULT_MAX_QUEUED_BYTES,
    DEFAULT_MAX_QUEUED_PUSHES, DEFAULT_POOL_SIZE, DEFAULT_PUSH_TIMEOUT, DEFAULT_QUEUE_WARN,
    DEFAULT_RETENTION, DEFAULT_STATEMENT_TIMEOUT, QueueFull, Since,
};
pub(crate) use options::{QueueBound, SessionLimits};

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
    log_page_rows: usize,
    log_page_bytes: usize,
    since: Option<Since>,
    tls: TlsOptions,
    secrets: Vec<Secret>,
    accept_unsigned: bool,
    replay_window: Duration,
    limits: Limits,
    /// Backstop session settings on the pipe's own connections.
    session: SessionLimits,
    queue_bound: QueueBound,
    queue_warn: f64,
    wait_for_server: bool,
    /// The password file's entries, for hosts with no password given.
    passfile: Option<Arc<PassFile>>,
    layout: Layout,
    accept_maddy: bool,
}

impl Config {
    /// From a `postgres://` URL or a libpq `key=value` connection string. The TLS settings
    /// `sslmode` (up to `verify-full`), `sslrootcert`, `sslcert` and `sslkey` are read as
    /// libpq reads them.
    ///
    /// Reads no environment and no file: what the string leaves out has the pipe's
    /// defaults (host `localhost`, user `postgres`, the database named after the user). A
    /// `service=` in the string is therefore refused; use [`Config::from_url_with_env`].
    pub fn from_url(url: &str) -> Result<Self, Error> {
        Config::from_url_and(url, &|_| None)
    }

    /// As [`Config::from_url`], completed as libpq (and so psql) completes a connection
    /// string: a service (`service=` or `PGSERVICE`, from `PGSERVICEFILE` or
    /// `~/.pg_service.conf`, then `PGSYSCONFDIR/pg_service.conf`), then the `PG*`
    /// variables (`PGHOST`, `PGHOSTADDR`, `PGPORT`, `PGUSER`, `PGPASSWORD`, `PGDATABASE`,
    /// `PGAPPNAME`, `PGOPTIONS`, `PGCONNECT_TIMEOUT`, `PGTARGETSESSIONATTRS`, the
    /// `PGSSL*` ones, ...) for what the string and the service leave out, then the password
    /// file (`passfile=`, `PGPASSFILE` or `~/.pgpass`, ignored with a warning when its
    /// group or others may read it) for a password still missing. The CLI's `--url` and
    /// `DATABASE_URL` are read this way. docs/operations.md lists where the pipe differs
    /// from libpq.
    pub fn from_url_with_env(url: &str) -> Result<Self, Error> {
        Config::from_url_and(url, &env_var)
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

    /// From the environment: `DATABASE_URL` when set, completed as
    /// [`Config::from_url_with_env`] completes a string; otherwise the service and the
    /// `PG*` variables alone, as libpq reads them. Unset, the host is `localhost`, the
    /// user is `$USER` (or `postgres`), and the database is named after the user.
    pub fn from_env() -> Result<Self, Error> {
        Config::from_vars(env_var)
    }

    /// Whether the environment names a database (`DATABASE_URL`, `PGHOST`, `PGHOSTADDR`
    /// or `PGSERVICE`): the demo, the benchmark and [`crate::cluster::env_or_temp`] then
    /// use it instead of a throwaway cluster.
    pub fn env_names_database() -> bool {
        ["DATABASE_URL", "PGHOST", "PGHOSTADDR", "PGSERVICE"]
            .iter()
            .any(|v| std::env::var_os(v).is_some_and(|v| !v.is_empty()))
    }

    pub(crate) fn from_vars(var: impl Fn(&str) -> Option<String>) -> Result<Self, Error> {
        let url = var("DATABASE_URL").filter(|v| !v.is_empty());
        Config::from_url_and(url.as_deref().unwrap_or(""), &var)
    }

    /// From a connection string, completed from `var` (and the files it names).
    fn from_url_and(url: &str, var: &dyn Fn(&str) -> Option<String>) -> Result<Self, Error> {
        Config::from_settings(conninfo::parse(url, &conninfo::Env::new(var))?)
    }

    /// From what a connection string, a service and the environment said.
    fn from_settings(settings: conninfo::Settings) -> Result<Self, Error> {
        let mut config = Config::from_pg_as_given(settings.pg);
        config.pg.target_session_attrs(match settings.target {
            TargetSession::Any => TargetSessionAttrs::Any,
            TargetSession::ReadWrite => TargetSessionAttrs::ReadWrite,
        });
        config.passfile = settings.passfile;
        config.apply_tls(settings.tls)?;
        Ok(config)
    }

    /// From a `tokio_postgres::Config`. The application name defaults to `updatepipe`. With
    /// host addresses and no host names, each address stands for its name too, as in libpq
    /// (TLS needs a name; `verify-full` then checks the address).
    ///
    /// `target_session_attrs` becomes `read-write` (LISTEN and NOTIFY need a primary, and a
    /// standby listed first is then passed over), since a `tokio_postgres::Config` cannot
    /// tell an explicit `any` from its default; [`Config::with_target_session_attrs`] sets
    /// it.
    pub fn from_pg(mut pg: tokio_postgres::Config) -> Self {
        if pg.get_target_session_attrs() == TargetSessionAttrs::Any {
            pg.target_session_attrs(TargetSessionAttrs::ReadWrite);
        }
        Config::from_pg_as_given(pg)
    }

    /// As [`Config::from_pg`], keeping `target_session_attrs`.
    fn from_pg_as_given(mut pg: tokio_postgres::Config) -> Self {
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
            log_page_rows: DEFAULT_LOG_PAGE_ROWS,
            log_page_bytes: DEFAULT_LOG_PAGE_BYTES,
            since: None,
            tls,
            secrets: Vec::new(),
            accept_unsigned: false,
            replay_window: DEFAULT_REPLAY_WINDOW,
            limits: Limits::default(),
            session: SessionLimits::default(),
            queue_bound: QueueBound::default(),
            queue_warn: options::DEFAULT_QUEUE_WARN,
            wait_for_server: false,
            passfile: None,
            layout: Layout::Shared,
            accept_maddy: false,
        }
    }

    /// Which servers a connection accepts, as `target_session_attrs` says: `read-write`
    /// (the default: LISTEN and NOTIFY work only on a primary, and with several hosts a
    /// standby is passed over for the next one) or `any` (a standby is then connected to,
    /// and the pipe reports [`Error::Standby`]).
    pub fn with_target_session_attrs(mut self, attrs: TargetSessionAttrs) -> Self {
        self.pg.target_session_attrs(attrs);
        self
    }

    /// The time allowed to connect to each host (default 10 s): TCP, TLS, the login and the
    /// `target_session_attrs` check; a host that takes longer is given up for the next.
    pub fn with_connect_timeout(mut self, timeout: Duration) -> Self {
        self.connect_timeout = timeout;
        self.pg.connect_timeout(timeout);
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

    /// The password file's password for one host, when no password was given.
    pub(crate) fn passfile_password(&self, host: &str, port: u16) -> Option<&str> {
        let pg = &self.pg;
        self.passfile.as_ref()?.password(
            host,
            port,
            pg.get_dbname().unwrap_or_default(),
            pg.get_user().unwrap_or_default(),
        )
    }

    /// The time allowed to connect to each host (default 10 s), as libpq's
    /// `connect_timeout`: a host that does not answer in time is given up for the next.
    pub fn connect_timeout(&self) -> Duration {
        self.connect_timeout
    }

    /// How connections use TLS.
    pub fn ssl_mode(&self) -> SslMode {
        self.tls.mode
    }

    /// Opens a connection of your own (for [`crate::PgPipe::push_in`], say) as the
    /// pipe opens its own: each host in turn within the connect timeout, TLS as
    /// configured, the password file's password for a host when none was given. Drive the
    /// returned connection (spawn it) for the client to work.
    pub async fn connect(
        &self,
    ) -> Result<
        (
            tokio_postgres::Client,
            tokio_postgres::Connection<tokio_postgres::Socket, crate::tls::TlsStream>,
        ),
        Error,
    > {
        crate::connect::connect(self).await
    }

    /// A TLS connector for these settings (reading the certificate files now), for
    /// connections of your own that should use TLS as the pipe does:
    /// `config.pg().connect(config.tls_connector()?)`.
    pub fn tls_connector(&self) -> Result<tokio_postgres_rustls::MakeRustlsConnect, Error> {
        self.tls.connector()
    }
}

/// [`Config::from_url`]: `"postgres://mail@db/mail".parse::<Config>()`.
impl FromStr for Config {
    type Err = Error;

    fn from_str(conn: &str) -> Result<Self, Error> {
        Config::from_url(conn)
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
            .field("log_page_rows", &self.log_page_rows)
            .field("log_page_bytes", &self.log_page_bytes)
            .field("since", &self.since)
            .field("tls", &self.tls)
            .field("secrets", &self.secrets.len())
            .field("accept_unsigned", &self.accept_unsigned)
            .field("replay_window", &self.replay_window)
            .field("limits", &self.limits)
            .field("session", &self.session)
            .field("queue_bound", &self.queue_bound)
            .field("queue_warn", &self.queue_warn)
            .field("wait_for_server", &self.wait_for_server)
            .field("passfile", &self.passfile)
            .field("layout", &self.layout)
            .field("accept_maddy", &self.accept_maddy)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
    fn parses_with_from_str() {
        let c: Config = "postgres://u@h:6543/d".parse().unwrap();
        assert_eq!(c.pg().get_ports(), &[6543]);
        assert!(matches!("host h".parse::<Config>(), Err(Error::Config(_))));
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
