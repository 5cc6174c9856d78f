//! Configuration: where the database is and how to reach it (held by [`crate::pg`]'s
//! `Server`), which channel and layout, durability and signing, and the push path's and the
//! listener's options (`push.rs`, `listen.rs`), each in a small struct of its own.

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use tokio_postgres::config::TargetSessionAttrs;

use crate::channel::ChannelName;
use crate::error::Error;
use crate::layout::Layout;
use crate::limits::Limits;
use crate::pg::{Server, SessionLimits, SslMode};
use crate::sign::{Secret, Signer};

mod listen;
mod push;

pub use listen::{
    Backoff, DEFAULT_CONSUMER_HOLD, DEFAULT_HEALTH_INTERVAL, DEFAULT_LOG_PAGE_BYTES,
    DEFAULT_LOG_PAGE_ROWS, DEFAULT_MAX_BUFFERED, DEFAULT_QUEUE_WARN, DEFAULT_RETENTION,
    ListenOptions, Since,
};
pub(crate) use push::QueueBound;
pub use push::{
    DEFAULT_MAX_BATCH, DEFAULT_MAX_IN_FLIGHT, DEFAULT_MAX_QUEUED_BYTES, DEFAULT_MAX_QUEUED_PUSHES,
    DEFAULT_POOL_SIZE, DEFAULT_PUSH_TIMEOUT, PushOptions, QueueFull,
};

/// A variable of the process's environment, empty counting as unset (as libpq).
fn env_var(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.is_empty())
}

/// How a pipe reaches PostgreSQL, what it speaks on, and its bounds.
///
/// Built from what users already have: [`Config::from_url`] takes a `postgres://` URL or a
/// libpq `key=value` string, [`Config::from_env`] reads `DATABASE_URL` or the standard `PG*`
/// variables, [`Config::from_pg`] wraps a [`tokio_postgres::Config`]. The rest has defaults
/// and builder-style setters; the push path's and the listener's bounds are in
/// [`PushOptions`] and [`ListenOptions`], the session settings in [`SessionLimits`]:
///
/// ```
/// use std::time::Duration;
/// use updatepipe::{ChannelName, Config};
///
/// let config = Config::from_url("postgres://mail:hunter2@db.example/mail?sslmode=verify-full")?
///     .with_channel(ChannelName::new("imap_updates")?)
///     .with_durable(true)
///     .with_push(|push| push.with_pool_size(4).with_timeout(Duration::from_secs(5)));
/// assert!(!format!("{config:?}").contains("hunter2"));
/// assert_eq!(config.ssl_mode(), updatepipe::SslMode::VerifyFull);
/// # Ok::<(), updatepipe::Error>(())
/// ```
#[derive(Clone)]
pub struct Config {
    server: Server,
    channel: ChannelName,
    layout: Layout,
    durable: bool,
    secrets: Vec<Secret>,
    push: PushOptions,
    listen: ListenOptions,
    limits: Limits,
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
        Ok(Config::from_server(Server::from_string(url, var)?))
    }

    /// From a `tokio_postgres::Config`: what it holds, read through its getters. The
    /// application name defaults to `updatepipe`. With host addresses and no host names,
    /// each address stands for its name too, as in libpq (TLS needs a name; `verify-full`
    /// then checks the address).
    ///
    /// `target_session_attrs` becomes `read-write` (LISTEN and NOTIFY need a primary, and a
    /// standby listed first is then passed over), since a `tokio_postgres::Config` cannot
    /// tell an explicit `any` from its default; [`Config::with_target_session_attrs`] sets
    /// it.
    pub fn from_pg(pg: tokio_postgres::Config) -> Self {
        Config::from_server(Server::from_pg(&pg))
    }

    fn from_server(server: Server) -> Self {
        Config {
            server,
            channel: ChannelName::default(),
            layout: Layout::Shared,
            durable: false,
            secrets: Vec::new(),
            push: PushOptions::default(),
            listen: ListenOptions::default(),
            limits: Limits::default(),
        }
    }

    /// The channel every update travels on (default `updatepipe`).
    pub fn with_channel(mut self, channel: ChannelName) -> Self {
        self.channel = channel;
        self
    }

    /// Which channels the pipe speaks on (default [`Layout::Shared`]). With
    /// [`Layout::Maddy`], every push also sends each update in maddy's form on its mailbox's
    /// channel, in the same transaction, and the listener can subscribe to mailboxes
    /// ([`PgPipe::subscribe`](crate::PgPipe::subscribe)). See `docs/maddy.md`.
    pub fn with_layout(mut self, layout: Layout) -> Self {
        self.layout = layout;
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

    /// Durable mode: the listener reads as the named consumer `name` (1 to 63 bytes): it
    /// starts where that consumer's last acknowledged position is (kept in the database,
    /// in `updatepipe.consumers`), and [`PgPipe::ack`](crate::PgPipe::ack) moves it on.
    /// A restarted process so resumes where it was acknowledged: nothing lost, and at most
    /// what was delivered after the last acknowledgement delivered again. Pruning keeps
    /// what a consumer has not acknowledged, up to
    /// [`ListenOptions::with_consumer_hold`]. One session at a time reads as a consumer:
    /// a second is refused ([`Error::ConsumerTaken`](crate::Error::ConsumerTaken)). Needs
    /// [`PgPipe::listen_events`](crate::PgPipe::listen_events) (positions come as events)
    /// and migration V6; a [`Since`] set too puts the consumer there.
    pub fn with_consumer(mut self, name: &str) -> Self {
        self.listen.set_consumer(name.to_owned());
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

    /// The push path's options, changed by `options`:
    /// `config.with_push(|push| push.with_timeout(Duration::from_secs(5)))`.
    pub fn with_push(mut self, options: impl FnOnce(PushOptions) -> PushOptions) -> Self {
        self.push = options(self.push);
        self
    }

    /// The listener's options, changed by `options`:
    /// `config.with_listen(|listen| listen.with_retention(Duration::from_secs(3600)))`.
    pub fn with_listen(mut self, options: impl FnOnce(ListenOptions) -> ListenOptions) -> Self {
        self.listen = options(self.listen);
        self
    }

    /// The session settings set on the pipe's own connections, changed by `limits`.
    pub fn with_session(mut self, limits: impl FnOnce(SessionLimits) -> SessionLimits) -> Self {
        let session = self.server.session_mut();
        *session = limits(session.clone());
        self
    }

    /// Bounds on what one received payload may ask for (default [`Limits::default`]).
    pub fn with_limits(mut self, limits: Limits) -> Self {
        self.limits = limits;
        self
    }

    /// The database to connect to (`dbname`), in place of the one the URL or the
    /// environment named: the same server, the same role and settings.
    pub fn with_database(mut self, name: &str) -> Self {
        self.server.set_dbname(name);
        self
    }

    /// The `application_name` the pipe's connections report (default `updatepipe`), as seen
    /// in `pg_stat_activity` (the listener's adds `/listen`).
    pub fn with_application_name(mut self, name: &str) -> Self {
        self.server.set_application_name(name);
        self
    }

    /// The time allowed to connect to each host (default 10 s): TCP, TLS, the login and the
    /// `target_session_attrs` check; a host that takes longer is given up for the next.
    pub fn with_connect_timeout(mut self, timeout: Duration) -> Self {
        self.server.set_connect_timeout(timeout);
        self
    }

    /// Which servers a connection accepts, as `target_session_attrs` says: `read-write`
    /// (the default: LISTEN and NOTIFY work only on a primary, and with several hosts a
    /// standby is passed over for the next one) or `any` (a standby is then connected to,
    /// and the pipe reports [`Error::Standby`]).
    pub fn with_target_session_attrs(mut self, attrs: TargetSessionAttrs) -> Self {
        self.server.set_target_session_attrs(attrs);
        self
    }

    /// How connections use TLS (default `prefer`, as libpq), as `sslmode` in the URL sets it.
    pub fn with_ssl_mode(mut self, mode: SslMode) -> Self {
        self.server.set_ssl_mode(mode);
        self
    }

    /// The root certificate(s) that server certificates must chain to: a PEM file, or
    /// `system` for the operating system's store (`sslrootcert`; `system` only with
    /// [`SslMode::VerifyFull`], or the pipe refuses to start).
    pub fn with_ssl_root_cert(mut self, path: impl AsRef<std::path::Path>) -> Self {
        self.server.tls_mut().set_root_cert(path);
        self
    }

    /// A client certificate and its private key, both PEM files (`sslcert`, `sslkey`), for
    /// servers that authenticate clients by certificate.
    pub fn with_ssl_client_cert(
        mut self,
        cert: impl Into<std::path::PathBuf>,
        key: impl Into<std::path::PathBuf>,
    ) -> Self {
        self.server
            .tls_mut()
            .set_client_cert(cert.into(), key.into());
        self
    }

    /// The channel.
    pub fn channel(&self) -> &ChannelName {
        &self.channel
    }

    /// The channel layout.
    pub fn layout(&self) -> Layout {
        self.layout
    }

    /// Whether delivery is durable.
    pub fn durable(&self) -> bool {
        self.durable
    }

    /// Whether envelopes are signed and checked.
    pub fn signing(&self) -> bool {
        !self.secrets.is_empty()
    }

    /// The push path's options.
    pub fn push_options(&self) -> &PushOptions {
        &self.push
    }

    /// The listener's options.
    pub fn listen_options(&self) -> &ListenOptions {
        &self.listen
    }

    /// The session settings set on the pipe's own connections.
    pub fn session_limits(&self) -> &SessionLimits {
        self.server.session()
    }

    /// The bounds on received payloads.
    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    /// The time allowed to connect to each host (default 10 s), as libpq's
    /// `connect_timeout`: a host that does not answer in time is given up for the next.
    pub fn connect_timeout(&self) -> Duration {
        self.server.connect_timeout()
    }

    /// How connections use TLS.
    pub fn ssl_mode(&self) -> SslMode {
        self.server.tls().mode
    }

    /// The PostgreSQL connection settings, as tokio-postgres holds them.
    pub fn pg(&self) -> &tokio_postgres::Config {
        self.server.pg()
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
            tokio_postgres::Connection<tokio_postgres::Socket, crate::pg::TlsStream>,
        ),
        Error,
    > {
        crate::pg::connect(&self.server).await
    }

    /// A TLS connector for these settings (reading the certificate files now), for
    /// connections of your own that should use TLS as the pipe does:
    /// `config.pg().connect(config.tls_connector()?)`.
    pub fn tls_connector(&self) -> Result<tokio_postgres_rustls::MakeRustlsConnect, Error> {
        self.server.tls_connector()
    }

    /// Where the server is and how to reach it.
    pub(crate) fn server(&self) -> &Server {
        &self.server
    }

    /// The signer for this channel, when signing is on.
    pub(crate) fn signer(&self) -> Option<Signer> {
        (!self.secrets.is_empty())
            .then(|| Signer::from_parts(self.secrets.clone(), self.channel.clone()))
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
        // The server's Debug redacts the password.
        f.debug_struct("Config")
            .field("server", &self.server)
            .field("channel", &self.channel)
            .field("layout", &self.layout)
            .field("durable", &self.durable)
            .field("secrets", &self.secrets.len())
            .field("push", &self.push)
            .field("listen", &self.listen)
            .field("limits", &self.limits)
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
