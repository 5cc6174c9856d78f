//! Dedicated connections: made with the configured timeout, never taken from the pool.

use std::collections::VecDeque;
use std::future::poll_fn;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio_postgres::config::{Host, LoadBalanceHosts};
use tokio_postgres::{AsyncMessage, Client, Connection, Notification, Socket};

use crate::config::Config;
use crate::error::{ConnectError, Error};
use crate::tls::TlsStream;

/// A connection whose socket the caller drives (the listener polls it for notifications).
pub(crate) type RawConnection = Connection<Socket, TlsStream>;

/// What the listener's connection adds to the configured `application_name`, so that
/// `pg_stat_activity` tells it from the pool's (`updatepipe` and `updatepipe/listen` by
/// default).
pub(crate) const LISTENER_SUFFIX: &str = "/listen";

/// One server of the configuration, with the settings to connect to it alone.
#[derive(Debug)]
pub(crate) struct Target {
    /// `host:port` (and the address, when `hostaddr` gives one), for messages.
    pub(crate) server: String,
    pg: tokio_postgres::Config,
}

/// The configuration's servers, in the order to try them, each with its own settings: the
/// password file's password for it when none was given, and `application_name` with
/// `suffix`.
pub(crate) fn targets(config: &Config, suffix: &str) -> Result<Vec<Target>, Error> {
    let pg = config.pg();
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
    let mut targets: Vec<Target> = (0..count)
        .map(|i| {
            let (host, addr) = (hosts.get(i), addrs.get(i));
            let port = ports.get(i).or(ports.first()).copied().unwrap_or(5432);
            let mut one = settings_but_hosts(pg, suffix);
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
            let server = match host {
                Some(Host::Unix(path)) => format!("{}/.s.PGSQL.{port}", path.display()),
                _ if name.contains(':') => format!("[{name}]:{port}"),
                _ => format!("{name}:{port}"),
            };
            let server = match addr {
                Some(addr) if addr.to_string() != name => format!("{server} ({addr})"),
                _ => server,
            };
            match host {
                Some(Host::Tcp(name)) => one.host(name),
                #[cfg(unix)]
                Some(Host::Unix(path)) => one.host_path(path),
                _ => &mut one,
            };
            if let Some(addr) = addr {
                one.hostaddr(*addr);
            }
            one.port(port);
            if pg.get_password().is_none()
                && let Some(password) = config.passfile_password(&name, port)
            {
                one.password(password);
            }
            Target { server, pg: one }
        })
        .collect();
    if pg.get_load_balance_hosts() == LoadBalanceHosts::Random {
        use rand::seq::SliceRandom;
        targets.shuffle(&mut rand::rng());
    }
    Ok(targets)
}

/// The Unix-socket directories a password file's `localhost` stands for (Debian's and
/// PostgreSQL's own default).
const DEFAULT_SOCKET_DIRS: [&str; 2] = ["/var/run/postgresql", "/tmp"];

/// Every setting of `pg` but its hosts, host addresses and ports.
fn settings_but_hosts(pg: &tokio_postgres::Config, suffix: &str) -> tokio_postgres::Config {
    let mut one = tokio_postgres::Config::new();
    if let Some(user) = pg.get_user() {
        one.user(user);
    }
    if let Some(password) = pg.get_password() {
        one.password(password);
    }
    if let Some(dbname) = pg.get_dbname() {
        one.dbname(dbname);
    }
    if let Some(options) = pg.get_options() {
        one.options(options);
    }
    if let Some(name) = pg.get_application_name() {
        one.application_name(format!("{name}{suffix}"));
    }
    if let Some(timeout) = pg.get_connect_timeout() {
        one.connect_timeout(*timeout);
    }
    if let Some(timeout) = pg.get_tcp_user_timeout() {
        one.tcp_user_timeout(*timeout);
    }
    one.ssl_mode(pg.get_ssl_mode())
        .ssl_negotiation(pg.get_ssl_negotiation())
        .keepalives(pg.get_keepalives())
        .keepalives_idle(pg.get_keepalives_idle())
        .target_session_attrs(pg.get_target_session_attrs())
        .channel_binding(pg.get_channel_binding())
        .load_balance_hosts(pg.get_load_balance_hosts());
    if let Some(interval) = pg.get_keepalives_interval() {
        one.keepalives_interval(interval);
    }
    if let Some(retries) = pg.get_keepalives_retries() {
        one.keepalives_retries(retries);
    }
    one
}

/// Opens one dedicated connection with TLS as the configuration says (its certificate
/// files read now), trying each host in turn, each within the connect timeout (a host
/// that accepts TCP and never answers is given up for the next, as libpq does).
pub(crate) async fn connect(config: &Config) -> Result<(Client, RawConnection), Error> {
    connect_as(config, "").await
}

/// [`connect`], for the listener: its `application_name` ends in [`LISTENER_SUFFIX`].
pub(crate) async fn connect_listener(config: &Config) -> Result<(Client, RawConnection), Error> {
    connect_as(config, LISTENER_SUFFIX).await
}

async fn connect_as(config: &Config, suffix: &str) -> Result<(Client, RawConnection), Error> {
    let connector = config.tls_connector()?;
    let after = config.connect_timeout();
    let mut failed = ConnectError::new();
    for target in targets(config, suffix)? {
        match tokio::time::timeout(after, target.pg.connect(connector.clone())).await {
            Ok(Ok(pair)) => return Ok(pair),
            Ok(Err(e)) => failed.failed(target.server, e),
            Err(_) => failed.timed_out(target.server, after),
        }
    }
    Err(Error::Connect(failed))
}

/// Opens one dedicated connection driven by a spawned task, for plain statements.
pub(crate) async fn connect_spawned(
    config: &Config,
) -> Result<(Client, tokio::task::JoinHandle<()>), Error> {
    let (client, connection) = connect(config).await?;
    let task = tokio::spawn(async move {
        if let Err(e) = connection.await {
            tracing::debug!(target: "updatepipe", error = %e, "connection ended");
        }
    });
    Ok((client, task))
}

/// Polls a connection the caller drives until `work` (a statement on its client) completes,
/// keeping whatever notifications arrive meanwhile in `backlog`.
pub(crate) async fn drive_until<F: Future>(
    connection: &mut RawConnection,
    work: F,
    backlog: &mut VecDeque<Notification>,
) -> Result<F::Output, Error> {
    let mut work = std::pin::pin!(work);
    loop {
        tokio::select! {
            output = &mut work => return Ok(output),
            message = poll_fn(|cx| connection.poll_message(cx)) => match message {
                Some(Ok(AsyncMessage::Notification(n))) => backlog.push_back(n),
                Some(Ok(_)) => {}
                Some(Err(e)) => return Err(e.into()),
                // The connection ended: `work` fails with the reason on its next poll.
                None => return Ok(work.await),
            },
        }
    }
}

/// Ends a driven connection politely: dropping the client sends Terminate, which the
/// connection writes before it ends (given a second at most).
pub(crate) async fn close_politely(client: Client, mut connection: RawConnection) {
    drop(client);
    let _ = tokio::time::timeout(Duration::from_secs(1), async {
        while let Some(Ok(_)) = poll_fn(|cx| connection.poll_message(cx)).await {}
    })
    .await;
}

/// How the pool connects: as [`connect`] does (each host in turn within the connect
/// timeout, the password file, TLS). deadpool wants a `tokio_postgres::Error` back, which
/// only tokio-postgres can make; so the pipe's own error (every host tried and what
/// happened there) is left in [`PoolConnector::failure`] for the pusher to report, and
/// deadpool gets a stand-in.
#[derive(Debug)]
pub(crate) struct PoolConnector {
    config: Config,
    failure: Arc<Mutex<Option<Error>>>,
}

impl PoolConnector {
    /// A connector for `config`, and where it leaves its last failure.
    pub(crate) fn new(config: &Config) -> (Self, Arc<Mutex<Option<Error>>>) {
        let failure = Arc::new(Mutex::new(None));
        let connector = PoolConnector {
            config: config.clone(),
            failure: failure.clone(),
        };
        (connector, failure)
    }
}

impl deadpool_postgres::Connect for PoolConnector {
    fn connect(
        &self,
        _: &tokio_postgres::Config,
    ) -> Pin<
        Box<
            dyn Future<
                    Output = Result<(Client, tokio::task::JoinHandle<()>), tokio_postgres::Error>,
                > + Send
                + '_,
        >,
    > {
        Box::pin(async move {
            match connect_spawned(&self.config).await {
                Ok(pair) => Ok(pair),
                Err(e) => {
                    *self.failure.lock().unwrap_or_else(|p| p.into_inner()) = Some(e);
                    Err(stand_in().await)
                }
            }
        })
    }
}

/// A `tokio_postgres::Error` made without any I/O (a configuration with no host), standing
/// in for the pipe's own error where deadpool needs one of tokio-postgres'.
async fn stand_in() -> tokio_postgres::Error {
    tokio_postgres::Config::new()
        .connect(tokio_postgres::NoTls)
        .await
        .err()
        .expect("a configuration with no host cannot connect")
}

/// A time setting as `current_setting` shows it (`0`, `250ms`, `20s`, `5min`, `1h`, `1d`;
/// a bare number in milliseconds), in milliseconds; `None` for no setting or a form not
/// understood.
pub(crate) fn setting_ms(value: Option<String>) -> Option<u64> {
    let value = value?;
    let value = value.trim();
    let digits = value
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(value.len());
    let n: u64 = value[..digits].parse().ok()?;
    let scale = match value[digits..].trim() {
        "" | "ms" => 1,
        "s" => 1000,
        "min" => 60_000,
        "h" => 3_600_000,
        "d" => 86_400_000,
        _ => return None,
    };
    Some(n * scale)
}

#[cfg(test)]
mod tests {
    use super::setting_ms;

    #[test]
    fn reads_time_settings_as_the_server_shows_them() {
        let ms = |s: &str| setting_ms(Some(s.to_owned()));
        assert_eq!(ms("0"), Some(0));
        assert_eq!(ms("250ms"), Some(250));
        assert_eq!(ms("20s"), Some(20_000));
        assert_eq!(ms("5min"), Some(300_000));
        assert_eq!(ms("1h"), Some(3_600_000));
        assert_eq!(ms("2d"), Some(172_800_000));
        assert_eq!(ms("1500"), Some(1500));
        assert_eq!(ms("soon"), None);
        assert_eq!(setting_ms(None), None);
    }
}
