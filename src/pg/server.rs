//! Where the server is and how to reach it: the connection settings as libpq layers them
//! (`conninfo.rs`), TLS (`tls.rs`), the password file, the connect timeout per host, and
//! the session settings set once connected.
//!
//! The settings are kept by libpq's key names, as parsed once from the connection string
//! (or read from a `tokio_postgres::Config`); tokio-postgres gets them as a `key=value`
//! string, its one way to take settings by name (its `param` is private), so that every
//! key it knows reaches it, one made per host as that host is tried, with no setting copied
//! by hand. Three settings are the pipe's own and set with tokio-postgres' setters: the
//! password (which may be any bytes), the connect timeout (which may be below a second)
//! and the TLS mode (the pipe does TLS with rustls, as `sslmode` says).

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use tokio_postgres::config::{Host, LoadBalanceHosts, TargetSessionAttrs};

use super::conninfo::{self, Env, PassFile};
use super::hosts::HostMemory;
use super::session::SessionLimits;
use super::tls::{Connector, SslMode, TlsOptions};
use crate::error::Error;

/// The default time allowed to connect to each host.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// The keys a host is named by, which a per-host configuration replaces.
const HOST_KEYS: [&str; 3] = ["host", "hostaddr", "port"];

/// How the pipe reaches PostgreSQL.
#[derive(Clone)]
pub(crate) struct Server {
    /// The settings tokio-postgres reads, by libpq's key names, the password aside.
    settings: BTreeMap<String, String>,
    password: Option<Vec<u8>>,
    /// The whole configuration as tokio-postgres holds it, made from the above.
    pg: tokio_postgres::Config,
    tls: TlsOptions,
    /// The password file's entries, for hosts with no password given.
    passfile: Option<Arc<PassFile>>,
    connect_timeout: Duration,
    session: SessionLimits,
    /// Which hosts failed to connect lately (tried last), shared by every clone.
    hosts: HostMemory,
}

/// One server of the settings, with the settings to connect to it alone.
#[derive(Debug)]
pub(crate) struct Target {
    /// `host:port` (and the address, when `hostaddr` gives one), for messages.
    pub(crate) server: String,
    pub(crate) pg: tokio_postgres::Config,
}

impl Server {
    /// From a connection string, completed from `var` (and the files it names) as libpq
    /// completes one.
    pub(crate) fn from_string(
        conn: &str,
        var: &dyn Fn(&str) -> Option<String>,
    ) -> Result<Server, Error> {
        let parsed = conninfo::parse(conn, &Env::new(var))?;
        let mut tls = TlsOptions::default();
        for (key, value) in &parsed.tls {
            tls.set(key, value)?;
        }
        let mut settings = parsed.settings;
        let password = settings.remove("password").map(String::into_bytes);
        let connect_timeout = match settings.get("connect_timeout") {
            Some(secs) => Duration::from_secs(secs.trim().parse().unwrap_or(0)),
            None => DEFAULT_CONNECT_TIMEOUT,
        };
        Server::new(settings, password, tls, parsed.passfile, connect_timeout)
    }

    /// From a `tokio_postgres::Config`, read through its getters (the only way to read
    /// one): what tokio-postgres 0.7 can be told. Host addresses without host names stand
    /// for the names, as in libpq (TLS needs a name).
    pub(crate) fn from_pg(pg: &tokio_postgres::Config) -> Server {
        let settings = settings_of(pg);
        let mut tls = TlsOptions::default();
        tls.mode = match pg.get_ssl_mode() {
            tokio_postgres::config::SslMode::Disable => SslMode::Disable,
            tokio_postgres::config::SslMode::Require => SslMode::Require,
            _ => SslMode::Prefer,
        };
        let connect_timeout = pg
            .get_connect_timeout()
            .copied()
            .unwrap_or(DEFAULT_CONNECT_TIMEOUT);
        let password = pg.get_password().map(<[u8]>::to_vec);
        Server::new(settings, password, tls, None, connect_timeout)
            .expect("what a tokio_postgres::Config holds, it parses")
    }

    fn new(
        mut settings: BTreeMap<String, String>,
        password: Option<Vec<u8>>,
        tls: TlsOptions,
        passfile: Option<Arc<PassFile>>,
        connect_timeout: Duration,
    ) -> Result<Server, Error> {
        settings
            .entry("application_name".into())
            .or_insert_with(|| "updatepipe".into());
        if !settings.contains_key("host")
            && let Some(addrs) = settings.get("hostaddr").cloned()
        {
            settings.insert("host".into(), addrs);
        }
        settings.remove("connect_timeout");
        let mut server = Server {
            pg: tokio_postgres::Config::new(),
            settings,
            password,
            tls,
            passfile,
            connect_timeout,
            session: SessionLimits::default(),
            hosts: HostMemory::default(),
        };
        server.pg = server.make(&server.settings)?;
        Ok(server)
    }

    /// A tokio-postgres configuration for `settings` (all of them, or one host's), with the
    /// pipe's own three.
    fn make(&self, settings: &BTreeMap<String, String>) -> Result<tokio_postgres::Config, Error> {
        let mut pg = tokio_postgres::Config::from_str(&key_value(settings)).map_err(|e| {
            // The parser's messages name the option, never its value; say no more than that.
            Error::Config(format!(
                "cannot parse the connection settings ({}); expected \
                 postgres://user:password@host:port/database or key=value pairs",
                crate::error::pg_message(&e)
            ))
        })?;
        if let Some(password) = &self.password {
            pg.password(password.clone());
        }
        pg.connect_timeout(self.connect_timeout);
        pg.ssl_mode(self.tls.mode.pg());
        Ok(pg)
    }

    /// Sets one setting by its libpq name (`application_name`, `target_session_attrs`).
    fn set(&mut self, key: &str, value: String) {
        self.settings.insert(key.to_owned(), value);
        self.remake();
    }

    fn remake(&mut self) {
        self.pg = self
            .make(&self.settings)
            .expect("settings that parsed parse again");
    }

    /// The whole configuration, as tokio-postgres holds it.
    pub(crate) fn pg(&self) -> &tokio_postgres::Config {
        &self.pg
    }

    pub(crate) fn set_dbname(&mut self, name: &str) {
        self.set("dbname", name.to_owned());
    }

    pub(crate) fn set_application_name(&mut self, name: &str) {
        self.set("application_name", name.to_owned());
    }

    pub(crate) fn set_target_session_attrs(&mut self, attrs: TargetSessionAttrs) {
        let value = match attrs {
            TargetSessionAttrs::ReadWrite => "read-write",
            _ => "any",
        };
        self.set("target_session_attrs", value.to_owned());
    }

    pub(crate) fn set_connect_timeout(&mut self, timeout: Duration) {
        self.connect_timeout = timeout;
        self.remake();
    }

    pub(crate) fn connect_timeout(&self) -> Duration {
        self.connect_timeout
    }

    /// How many hosts the settings name (at least one: the default).
    pub(crate) fn host_count(&self) -> usize {
        self.pg
            .get_hosts()
            .len()
            .max(self.pg.get_hostaddrs().len())
            .max(1)
    }

    /// Which hosts failed to connect lately (see `hosts`).
    pub(crate) fn hosts(&self) -> &HostMemory {
        &self.hosts
    }

    pub(crate) fn tls(&self) -> &TlsOptions {
        &self.tls
    }

    pub(crate) fn set_ssl_mode(&mut self, mode: SslMode) {
        self.tls.mode = mode;
        self.remake();
    }

    pub(crate) fn tls_mut(&mut self) -> &mut TlsOptions {
        &mut self.tls
    }

    /// A TLS connector for these settings, reading the certificate files now.
    pub(crate) fn tls_connector(&self) -> Result<Connector, Error> {
        self.tls.connector()
    }

    pub(crate) fn session(&self) -> &SessionLimits {
        &self.session
    }

    pub(crate) fn session_mut(&mut self) -> &mut SessionLimits {
        &mut self.session
    }

    /// The password file's password for one host, when no password was given.
    pub(super) fn passfile_password(&self, host: &str, port: u16) -> Option<&str> {
        if self.password.is_some() {
            return None;
        }
        self.passfile.as_ref()?.password(
            host,
            port,
            self.pg.get_dbname().unwrap_or_default(),
            self.pg.get_user().unwrap_or_default(),
        )
    }

    /// The servers, in the order to try them, each with the settings to reach it alone:
    /// its host, address and port, the password file's password for it when none was
    /// given, and `application_name` with `suffix`.
    pub(crate) fn targets(&self, suffix: &str) -> Result<Vec<Target>, Error> {
        let pg = &self.pg;
        let (hosts, addrs, ports) = (pg.get_hosts(), pg.get_hostaddrs(), pg.get_ports());
        if !hosts.is_empty() && !addrs.is_empty() && hosts.len() != addrs.len() {
            return Err(Error::Config(format!(
                "{} hosts and {} host addresses: give as many of each",
                hosts.len(),
                addrs.len()
            )));
        }
        let count = hosts.len().max(addrs.len());
        if ports.len() > 1 && ports.len() != count {
            return Err(Error::Config(format!(
                "{count} hosts and {} ports: give one port, or one per host",
                ports.len()
            )));
        }
        let mut targets = Vec::with_capacity(count);
        for i in 0..count {
            let (host, addr) = (hosts.get(i), addrs.get(i));
            let port = ports.get(i).or(ports.first()).copied().unwrap_or(5432);
            // The name libpq matches password file lines with.
            let name = match host {
                Some(Host::Tcp(name)) => name.clone(),
                Some(Host::Unix(path))
                    if DEFAULT_SOCKET_DIRS.contains(&path.to_str().unwrap_or("")) =>
                {
                    "localhost".to_owned()
                }
                Some(Host::Unix(path)) => path.display().to_string(),
                None => addr.map(|a| a.to_string()).unwrap_or_default(),
            };
            let mut one: BTreeMap<String, String> = self
                .settings
                .iter()
                .filter(|(key, _)| !HOST_KEYS.contains(&key.as_str()))
                .map(|(key, value)| (key.clone(), value.clone()))
                .collect();
            match host {
                Some(Host::Tcp(name)) => one.insert("host".into(), name.clone()),
                Some(Host::Unix(path)) => one.insert("host".into(), path.display().to_string()),
                None => None,
            };
            if let Some(addr) = addr {
                one.insert("hostaddr".into(), addr.to_string());
            }
            one.insert("port".into(), port.to_string());
            if let Some(app) = one.get_mut("application_name") {
                app.push_str(suffix);
            }
            let mut pg = self.make(&one)?;
            if let Some(password) = self.passfile_password(&name, port) {
                pg.password(password);
            }
            let server = match host {
                Some(Host::Unix(path)) => format!("{}/.s.PGSQL.{port}", path.display()),
                _ if name.contains(':') => format!("[{name}]:{port}"),
                _ => format!("{name}:{port}"),
            };
            let server = match addr {
                Some(addr) if addr.to_string() != name => format!("{server} ({addr})"),
                _ => server,
            };
            targets.push(Target { server, pg });
        }
        if pg.get_load_balance_hosts() == LoadBalanceHosts::Random {
            use rand::seq::SliceRandom;
            targets.shuffle(&mut rand::rng());
        }
        Ok(targets)
    }
}

/// The Unix-socket directories a password file's `localhost` stands for (Debian's and
/// PostgreSQL's own default).
const DEFAULT_SOCKET_DIRS: [&str; 2] = ["/var/run/postgresql", "/tmp"];

/// Settings as a libpq `key=value` string, each value quoted.
fn key_value(settings: &BTreeMap<String, String>) -> String {
    let mut text = String::new();
    for (key, value) in settings {
        text.push_str(key);
        text.push_str("='");
        for c in value.chars() {
            if c == '\'' || c == '\\' {
                text.push('\\');
            }
            text.push(c);
        }
        text.push_str("' ");
    }
    text
}

/// What a `tokio_postgres::Config` holds, by libpq's key names (the password aside).
fn settings_of(pg: &tokio_postgres::Config) -> BTreeMap<String, String> {
    use tokio_postgres::config::{ChannelBinding, SslNegotiation};
    let mut s = BTreeMap::new();
    let mut put = |key: &str, value: String| {
        s.insert(key.to_owned(), value);
    };
    if let Some(user) = pg.get_user() {
        put("user", user.to_owned());
    }
    if let Some(dbname) = pg.get_dbname() {
        put("dbname", dbname.to_owned());
    }
    if let Some(options) = pg.get_options() {
        put("options", options.to_owned());
    }
    if let Some(name) = pg.get_application_name() {
        put("application_name", name.to_owned());
    }
    let hosts: Vec<String> = pg
        .get_hosts()
        .iter()
        .map(|h| match h {
            Host::Tcp(name) => name.clone(),
            #[cfg(unix)]
            Host::Unix(path) => path.display().to_string(),
        })
        .collect();
    if !hosts.is_empty() {
        put("host", hosts.join(","));
    }
    let addrs: Vec<String> = pg.get_hostaddrs().iter().map(|a| a.to_string()).collect();
    if !addrs.is_empty() {
        put("hostaddr", addrs.join(","));
    }
    let ports: Vec<String> = pg.get_ports().iter().map(|p| p.to_string()).collect();
    if !ports.is_empty() {
        put("port", ports.join(","));
    }
    if let Some(timeout) = pg.get_tcp_user_timeout() {
        put("tcp_user_timeout", timeout.as_secs().to_string());
    }
    put("keepalives", u8::from(pg.get_keepalives()).to_string());
    put(
        "keepalives_idle",
        pg.get_keepalives_idle().as_secs().to_string(),
    );
    if let Some(interval) = pg.get_keepalives_interval() {
        put("keepalives_interval", interval.as_secs().to_string());
    }
    if let Some(retries) = pg.get_keepalives_retries() {
        put("keepalives_retries", retries.to_string());
    }
    // A tokio_postgres::Config cannot tell an explicit `any` from its default: the pipe's
    // default (read-write) unless set with `Config::with_target_session_attrs`.
    put("target_session_attrs", "read-write".to_owned());
    let binding = match pg.get_channel_binding() {
        ChannelBinding::Disable => "disable",
        ChannelBinding::Require => "require",
        _ => "prefer",
    };
    put("channel_binding", binding.to_owned());
    if pg.get_load_balance_hosts() == LoadBalanceHosts::Random {
        put("load_balance_hosts", "random".to_owned());
    }
    if pg.get_ssl_negotiation() == SslNegotiation::Direct {
        put("sslnegotiation", "direct".to_owned());
    }
    s
}

impl fmt::Debug for Server {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // tokio_postgres::Config's Debug redacts the password; the settings hold none.
        f.debug_struct("Server")
            .field("pg", &self.pg)
            .field("tls", &self.tls)
            .field("passfile", &self.passfile)
            .field("connect_timeout", &self.connect_timeout)
            .field("session", &self.session)
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn server(conn: &str) -> Server {
        Server::from_string(conn, &|_| None).unwrap()
    }

    #[test]
    fn each_host_gets_every_setting_but_the_others_hosts() {
        let s = server(
            "host=h1,h2 port=5433,5434 user=u password=pw dbname=d options='-c x=1' \
             keepalives_idle=77 tcp_user_timeout=9 application_name=app \
             target_session_attrs=any channel_binding=disable",
        );
        let targets = s.targets("/listen").unwrap();
        assert_eq!(targets.len(), 2);
        for (target, (host, port)) in targets.iter().zip([("h1", 5433), ("h2", 5434)]) {
            let pg = &target.pg;
            assert_eq!(target.server, format!("{host}:{port}"));
            assert_eq!(pg.get_hosts(), &[Host::Tcp(host.into())]);
            assert_eq!(pg.get_ports(), &[port]);
            assert_eq!(pg.get_user(), Some("u"));
            assert_eq!(pg.get_password(), Some(&b"pw"[..]));
            assert_eq!(pg.get_dbname(), Some("d"));
            assert_eq!(pg.get_options(), Some("-c x=1"));
            assert_eq!(pg.get_application_name(), Some("app/listen"));
            assert_eq!(pg.get_keepalives_idle(), Duration::from_secs(77));
            assert_eq!(pg.get_tcp_user_timeout(), Some(&Duration::from_secs(9)));
            assert_eq!(pg.get_target_session_attrs(), TargetSessionAttrs::Any);
            assert_eq!(
                pg.get_channel_binding(),
                tokio_postgres::config::ChannelBinding::Disable
            );
            assert_eq!(pg.get_connect_timeout(), Some(&DEFAULT_CONNECT_TIMEOUT));
        }
    }

    #[test]
    fn a_tokio_postgres_config_keeps_what_it_holds() {
        let mut pg = tokio_postgres::Config::new();
        pg.host("h")
            .port(6000)
            .user("u")
            .password(vec![0xff, 0x00])
            .dbname("d")
            .keepalives_idle(Duration::from_secs(33))
            .connect_timeout(Duration::from_millis(1500));
        let s = Server::from_pg(&pg);
        let one = &s.targets("").unwrap()[0].pg;
        assert_eq!(one.get_password(), Some(&[0xff, 0x00][..]));
        assert_eq!(one.get_ports(), &[6000]);
        assert_eq!(one.get_keepalives_idle(), Duration::from_secs(33));
        assert_eq!(
            one.get_connect_timeout(),
            Some(&Duration::from_millis(1500))
        );
        assert_eq!(one.get_application_name(), Some("updatepipe"));
        assert!(!format!("{s:?}").contains("\\xff"));
    }

    #[test]
    fn setters_reach_every_host() {
        let mut s = server("host=a,b user=u");
        s.set_application_name("mine");
        s.set_connect_timeout(Duration::from_millis(250));
        s.set_ssl_mode(SslMode::Disable);
        s.set_dbname("other db");
        for target in s.targets("").unwrap() {
            assert_eq!(target.pg.get_application_name(), Some("mine"));
            assert_eq!(target.pg.get_dbname(), Some("other db"));
            assert_eq!(
                target.pg.get_connect_timeout(),
                Some(&Duration::from_millis(250))
            );
            assert_eq!(
                target.pg.get_ssl_mode(),
                tokio_postgres::config::SslMode::Disable
            );
        }
    }
}
