//! Connection settings as libpq reads them, for the keys the pipe supports.
//!
//! The order is libpq's: the connection string (a `postgres://` URL or `key=value` pairs)
//! first; then, for what it leaves out, the service named by `service=` or `PGSERVICE`
//! (in `PGSERVICEFILE` or `~/.pg_service.conf`, then `PGSYSCONFDIR/pg_service.conf`);
//! then the `PG*` variables; then the defaults. A password still missing is looked up in
//! the password file (`passfile=`, `PGPASSFILE` or `~/.pgpass`) for each host as it is
//! tried. Everything is gathered into one list of `key=value` settings and handed to
//! tokio-postgres as one string; the keys the pipe reads itself (TLS, which it does with
//! rustls, the service, the password file and `target_session_attrs`) are kept aside.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::Arc;

use crate::error::Error;

pub(crate) use super::files::PassFile;
use super::files::service_settings;

/// The connection-string keys for TLS, read here rather than by tokio-postgres.
pub(crate) const TLS_KEYS: [&str; 4] = ["sslmode", "sslrootcert", "sslcert", "sslkey"];

/// Keys read here, never handed to tokio-postgres.
const OWN_KEYS: [&str; 7] = [
    "sslmode",
    "sslrootcert",
    "sslcert",
    "sslkey",
    "service",
    "passfile",
    "target_session_attrs",
];

/// The variables libpq reads for the keys the pipe supports, and those keys
/// (`PGSERVICE` is read before these, for the service).
const VARS: [(&str, &str); 17] = [
    ("PGHOST", "host"),
    ("PGHOSTADDR", "hostaddr"),
    ("PGPORT", "port"),
    ("PGDATABASE", "dbname"),
    ("PGUSER", "user"),
    ("PGPASSWORD", "password"),
    ("PGPASSFILE", "passfile"),
    ("PGOPTIONS", "options"),
    ("PGAPPNAME", "application_name"),
    ("PGSSLMODE", "sslmode"),
    ("PGSSLROOTCERT", "sslrootcert"),
    ("PGSSLCERT", "sslcert"),
    ("PGSSLKEY", "sslkey"),
    ("PGCONNECT_TIMEOUT", "connect_timeout"),
    ("PGTARGETSESSIONATTRS", "target_session_attrs"),
    ("PGCHANNELBINDING", "channel_binding"),
    ("PGLOADBALANCEHOSTS", "load_balance_hosts"),
];

/// Where settings come from besides the connection string: the environment, and with it
/// the password and service files it names.
pub(super) struct Env<'a> {
    var: &'a dyn Fn(&str) -> Option<String>,
}

impl<'a> Env<'a> {
    pub(super) fn new(var: &'a dyn Fn(&str) -> Option<String>) -> Self {
        Env { var }
    }

    pub(super) fn var(&self, name: &str) -> Option<String> {
        (self.var)(name).filter(|v| !v.is_empty())
    }

    pub(super) fn home(&self, file: &str) -> Option<PathBuf> {
        self.var("HOME").map(|home| Path::new(&home).join(file))
    }
}

/// Which servers a connection accepts (`target_session_attrs`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum TargetSession {
    /// Any server (libpq's default).
    Any,
    /// A server that accepts writes (the pipe's default: LISTEN and NOTIFY need a primary).
    ReadWrite,
}

/// What a connection string, a service and the environment say.
#[derive(Debug)]
pub(super) struct Settings {
    /// Everything but what [`OWN_KEYS`] name.
    pub(super) pg: tokio_postgres::Config,
    /// The TLS keys and their values, for `TlsOptions::set`.
    pub(super) tls: Vec<(String, String)>,
    /// `target_session_attrs`: read-write unless the settings say `any`.
    pub(super) target: TargetSession,
    /// The password file's entries, when no password was given and the file is usable.
    pub(super) passfile: Option<Arc<PassFile>>,
}

/// A connection string (URL or key=value) completed as libpq completes it, from `env`.
pub(super) fn parse(conn: &str, env: &Env<'_>) -> Result<Settings, Error> {
    let mut given = conn_pairs(conn)?;
    // A service fills in what the string leaves out; the variables come after it.
    let service = given
        .get("service")
        .cloned()
        .or_else(|| env.var("PGSERVICE"));
    if let Some(name) = service {
        for (key, value) in service_settings(&name, env)? {
            given.entry(key).or_insert(value);
        }
    }
    for (name, key) in VARS {
        if !given.contains_key(key)
            && let Some(value) = env.var(name)
        {
            given.insert(key.to_owned(), value);
        }
    }
    if !given.contains_key("host") && !given.contains_key("hostaddr") {
        given.insert("host".into(), "localhost".into());
    }
    if !given.contains_key("user") {
        let user = env.var("USER").unwrap_or_else(|| "postgres".to_owned());
        given.insert("user".into(), user);
    }
    if !given.contains_key("dbname") {
        given.insert("dbname".into(), given["user"].clone());
    }
    if let Some(secs) = given.get("connect_timeout")
        && secs.trim().parse::<u64>().is_err()
    {
        return Err(Error::Config(format!(
            "connect_timeout {secs:?} is not a number of seconds"
        )));
    }
    let target = match given.get("target_session_attrs").map(String::as_str) {
        None | Some("read-write") => TargetSession::ReadWrite,
        Some("any") => TargetSession::Any,
        Some(other) => {
            return Err(Error::Config(format!(
                "target_session_attrs {other:?} is not supported: the pipe needs a server \
                 that accepts writes; use read-write (the default) or any"
            )));
        }
    };
    let passfile = if given.contains_key("password") {
        None
    } else {
        let path = match given.get("passfile") {
            Some(path) => Some(PathBuf::from(path)),
            None => env.home(".pgpass"),
        };
        path.and_then(|path| PassFile::read(&path)).map(Arc::new)
    };
    let mut rest = String::new();
    let mut tls = Vec::new();
    for (key, value) in &given {
        if TLS_KEYS.contains(&key.as_str()) {
            tls.push((key.clone(), value.clone()));
        } else if !OWN_KEYS.contains(&key.as_str()) {
            rest.push_str(key);
            rest.push_str("='");
            for c in value.chars() {
                if c == '\'' || c == '\\' {
                    rest.push('\\');
                }
                rest.push(c);
            }
            rest.push_str("' ");
        }
    }
    let pg = tokio_postgres::Config::from_str(&rest).map_err(|e| {
        // The parser's messages name the option, never its value; say no more than that.
        Error::Config(format!(
            "cannot parse the connection settings ({}); expected \
             postgres://user:password@host:port/database or key=value pairs",
            crate::error::pg_message(&e)
        ))
    })?;
    Ok(Settings {
        pg,
        tls,
        target,
        passfile,
    })
}

/// The settings of a connection string, URL or key=value, as key and value.
fn conn_pairs(conn: &str) -> Result<BTreeMap<String, String>, Error> {
    let bad = || {
        Error::Config(
            "cannot parse the connection string; expected \
             postgres://user:password@host:port/database or key=value pairs"
                .into(),
        )
    };
    let pairs = if let Some(rest) = conn
        .strip_prefix("postgres://")
        .or_else(|| conn.strip_prefix("postgresql://"))
    {
        url_pairs(rest)?
    } else {
        key_value_pairs(conn)
            .ok_or_else(bad)?
            .into_iter()
            .map(|(k, v, _)| (k, v))
            .collect()
    };
    Ok(pairs.into_iter().collect())
}

/// The settings of a URL (after `postgres://`): user, password, hosts and ports, database,
/// then the query's parameters.
fn url_pairs(url: &str) -> Result<Vec<(String, String)>, Error> {
    // The credentials run up to an `@` before the first `/`, as libpq reads them (an `@` in
    // the query, say in `password=p@ss`, is not the end of credentials); the query starts at
    // the first `?` after them.
    let authority = url.find('/').map_or(url, |slash| &url[..slash]);
    let (creds, rest) = match authority.find('@') {
        Some(at) => (Some(&url[..at]), &url[at + 1..]),
        None => (None, url),
    };
    let (rest, query) = match rest.find('?') {
        Some(mark) => (&rest[..mark], Some(&rest[mark + 1..])),
        None => (rest, None),
    };
    let (netloc, path) = match rest.find('/') {
        Some(slash) => (&rest[..slash], Some(&rest[slash + 1..])),
        None => (rest, None),
    };
    let mut pairs = Vec::new();
    if let Some(creds) = creds {
        let (user, password) = match creds.split_once(':') {
            Some((u, p)) => (u, Some(p)),
            None => (creds, None),
        };
        if !user.is_empty() {
            pairs.push(("user".into(), percent_decode(user)?));
        }
        if let Some(password) = password {
            pairs.push(("password".into(), percent_decode(password)?));
        }
    }
    if !netloc.is_empty() {
        let (mut hosts, mut ports) = (Vec::new(), Vec::new());
        for part in netloc.split(',') {
            let (host, port) = if let Some(v6) = part.strip_prefix('[') {
                let end = v6.find(']').ok_or_else(|| {
                    Error::Config("an IPv6 host in the URL lacks its closing ]".into())
                })?;
                let port = v6[end + 1..].strip_prefix(':').unwrap_or("");
                (&v6[..end], port)
            } else {
                part.rsplit_once(':').unwrap_or((part, ""))
            };
            hosts.push(percent_decode(host)?);
            ports.push(port.to_owned());
        }
        if hosts.iter().any(|h| !h.is_empty()) {
            pairs.push(("host".into(), hosts.join(",")));
        }
        if ports.iter().any(|p| !p.is_empty()) {
            pairs.push(("port".into(), ports.join(",")));
        }
    }
    if let Some(db) = path.filter(|p| !p.is_empty()) {
        pairs.push(("dbname".into(), percent_decode(db)?));
    }
    for part in query.into_iter().flat_map(|q| q.split('&')) {
        if part.is_empty() {
            continue;
        }
        let (key, value) = part.split_once('=').unwrap_or((part, ""));
        pairs.push((percent_decode(key)?, percent_decode(value)?));
    }
    Ok(pairs)
}

/// The `key = value` pairs of a libpq connection string, each with its span; `None` when
/// the string does not follow the grammar.
fn key_value_pairs(conn: &str) -> Option<Vec<(String, String, std::ops::Range<usize>)>> {
    let bytes = conn.as_bytes();
    let mut i = 0;
    let mut pairs = Vec::new();
    let skip_space = |i: &mut usize| {
        while *i < bytes.len() && bytes[*i].is_ascii_whitespace() {
            *i += 1;
        }
    };
    loop {
        skip_space(&mut i);
        if i == bytes.len() {
            return Some(pairs);
        }
        let start = i;
        while i < bytes.len() && bytes[i] != b'=' && !bytes[i].is_ascii_whitespace() {
            i += 1;
        }
        let key = conn[start..i].to_owned();
        skip_space(&mut i);
        if key.is_empty() || bytes.get(i) != Some(&b'=') {
            return None;
        }
        i += 1;
        skip_space(&mut i);
        let mut value = Vec::new();
        if bytes.get(i) == Some(&b'\'') {
            i += 1;
            loop {
                match *bytes.get(i)? {
                    b'\'' => break,
                    b'\\' => {
                        value.push(*bytes.get(i + 1)?);
                        i += 2;
                    }
                    b => {
                        value.push(b);
                        i += 1;
                    }
                }
            }
            i += 1;
        } else {
            while i < bytes.len() && !bytes[i].is_ascii_whitespace() {
                if bytes[i] == b'\\' {
                    i += 1;
                }
                value.push(*bytes.get(i)?);
                i += 1;
            }
        }
        pairs.push((key, String::from_utf8(value).ok()?, start..i));
    }
}

fn percent_decode(text: &str) -> Result<String, Error> {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = text
                .get(i + 1..i + 3)
                .and_then(|h| u8::from_str_radix(h, 16).ok())
                .ok_or_else(|| Error::Config("the URL has a bad %-escape".into()))?;
            out.push(hex);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).map_err(|_| Error::Config("a setting in the URL is not UTF-8".into()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Config, DEFAULT_POOL_SIZE, DEFAULT_PUSH_TIMEOUT};
    use crate::tls::SslMode;
    use std::collections::HashMap;
    use std::time::Duration;
    use tokio_postgres::config::{Host, TargetSessionAttrs};

    fn vars(vars: &[(&str, &str)]) -> HashMap<String, String> {
        vars.iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn from(v: &[(&str, &str)]) -> Result<Config, Error> {
        let map = vars(v);
        Config::from_vars(|k| map.get(k).cloned())
    }

    fn url_with(url: &str, v: &[(&str, &str)]) -> Result<Config, Error> {
        let map = vars(v);
        Config::from_url_and(url, &|k: &str| map.get(k).cloned())
    }

    fn pairs(conn: &str) -> Vec<(String, String)> {
        conn_pairs(conn).unwrap().into_iter().collect()
    }

    fn pair(k: &str, v: &str) -> (String, String) {
        (k.to_owned(), v.to_owned())
    }

    #[test]
    fn reads_a_url_into_settings() {
        assert_eq!(
            pairs(concat!(
                "postgres://u:p%40w@h1:5433,[::1]:5434,h3/my%20db",
                "?sslmode=require&application_name=x"
            )),
            [
                pair("application_name", "x"),
                pair("dbname", "my db"),
                pair("host", "h1,::1,h3"),
                pair("password", "p@w"),
                pair("port", "5433,5434,"),
                pair("sslmode", "require"),
                pair("user", "u"),
            ]
        );
        // A `?` in the credentials is not the query.
        assert_eq!(
            pairs("postgres://u:x?&y@h/db?sslmode=verify-full"),
            [
                pair("dbname", "db"),
                pair("host", "h"),
                pair("password", "x?&y"),
                pair("sslmode", "verify-full"),
                pair("user", "u"),
            ]
        );
        // An `@` after the first `/` is no end of credentials (as libpq reads it): the host
        // stays the host, and no part of the password becomes a user name.
        assert_eq!(
            pairs("postgres://h/db?user=u&password=p@ss"),
            [
                pair("dbname", "db"),
                pair("host", "h"),
                pair("password", "p@ss"),
                pair("user", "u"),
            ]
        );
        assert_eq!(pairs("postgresql://"), []);
        assert!(conn_pairs("postgres://h/db?sslrootcert=%zz").is_err());
    }

    #[test]
    fn reads_key_value_settings() {
        assert_eq!(
            pairs("host=h sslmode = verify-ca password='a b\\'c' sslkey=/k\\ ey"),
            [
                pair("host", "h"),
                pair("password", "a b'c"),
                pair("sslkey", "/k ey"),
                pair("sslmode", "verify-ca"),
            ]
        );
        assert!(conn_pairs("host h").is_err());
        assert!(conn_pairs("sslmode='open").is_err());
    }

    #[test]
    fn variables_fill_in_what_the_string_leaves_out() {
        let c = url_with(
            "postgres://a@h1/db1?sslmode=require",
            &[
                ("PGSSLMODE", "disable"),
                ("PGPASSWORD", "hunter2"),
                ("PGAPPNAME", "imapd"),
                ("PGHOST", "h2"),
                ("PGPORT", "6000"),
            ],
        )
        .unwrap();
        assert_eq!(c.ssl_mode(), SslMode::Require);
        assert_eq!(c.pg().get_password(), Some(&b"hunter2"[..]));
        assert_eq!(c.pg().get_application_name(), Some("imapd"));
        assert_eq!(c.pg().get_hosts(), &[Host::Tcp("h1".into())]);
        assert_eq!(c.pg().get_ports(), &[6000]);
        let c = url_with("postgres://a@h1/db1", &[("PGSSLMODE", "verify-full")]).unwrap();
        assert_eq!(c.ssl_mode(), SslMode::VerifyFull);
        assert_eq!(
            c.pg().get_ssl_mode(),
            tokio_postgres::config::SslMode::Require
        );
        // The string's own password wins.
        let c = url_with("postgres://a:mine@h1/db1", &[("PGPASSWORD", "env")]).unwrap();
        assert_eq!(c.pg().get_password(), Some(&b"mine"[..]));
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
    fn target_session_attrs_default_to_read_write() {
        let c = from(&[]).unwrap();
        assert_eq!(
            c.pg().get_target_session_attrs(),
            TargetSessionAttrs::ReadWrite
        );
        let c = Config::from_url("postgres://h/d?target_session_attrs=any").unwrap();
        assert_eq!(c.pg().get_target_session_attrs(), TargetSessionAttrs::Any);
        let c = from(&[("PGTARGETSESSIONATTRS", "any")]).unwrap();
        assert_eq!(c.pg().get_target_session_attrs(), TargetSessionAttrs::Any);
        let c = Config::from_pg(tokio_postgres::Config::new());
        assert_eq!(
            c.pg().get_target_session_attrs(),
            TargetSessionAttrs::ReadWrite
        );
        assert!(matches!(
            Config::from_url("host=h target_session_attrs=standby"),
            Err(Error::Config(_))
        ));
    }

    #[test]
    fn defaults_without_any_variable() {
        let c = from(&[]).unwrap();
        assert_eq!(c.pg().get_hosts(), &[Host::Tcp("localhost".into())]);
        assert_eq!(c.pg().get_user(), Some("postgres"));
        assert_eq!(c.pg().get_dbname(), Some("postgres"));
        assert_eq!(c.channel().as_str(), "updatepipe");
        assert_eq!(c.pool_size(), DEFAULT_POOL_SIZE);
        assert_eq!(c.push_timeout(), DEFAULT_PUSH_TIMEOUT);
    }

    #[test]
    fn bad_values_are_config_errors() {
        for bad in [
            &[("PGPORT", "x")][..],
            &[("PGHOSTADDR", "nope")],
            &[("PGSSLMODE", "sometimes")],
            &[("PGCONNECT_TIMEOUT", "soon")],
            &[("PGSERVICE", "nowhere")],
        ] {
            assert!(matches!(from(bad), Err(Error::Config(_))), "{bad:?}");
        }
        assert!(matches!(
            Config::from_url("postgres://u:pw@h:notaport/d"),
            Err(Error::Config(_))
        ));
    }

    #[cfg(unix)]
    #[test]
    fn password_file_is_read_as_libpq_reads_it() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("pgpass");
        std::fs::write(&path, "h1:5432:mail:mail:s3cret\n").unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        let file = path.to_str().unwrap();
        let c = url_with("postgres://mail@h1/mail", &[("PGPASSFILE", file)]).unwrap();
        assert_eq!(c.passfile_password("h1", 5432), Some("s3cret"));
        assert_eq!(c.passfile_password("h2", 5432), None);
        assert!(!format!("{c:?}").contains("s3cret"));
        // From HOME, and `passfile=` in the string.
        std::fs::copy(&path, dir.path().join(".pgpass")).unwrap();
        let home = dir.path().to_str().unwrap();
        let c = url_with("postgres://mail@h1/mail", &[("HOME", home)]).unwrap();
        assert_eq!(c.passfile_password("h1", 5432), Some("s3cret"));
        let c = Config::from_url(&format!("host=h1 user=mail passfile={file}")).unwrap();
        assert_eq!(c.passfile_password("h1", 5432), Some("s3cret"));
        // A password given wins: the file is not read.
        let c = url_with("postgres://mail:pw@h1/mail", &[("PGPASSFILE", file)]).unwrap();
        assert_eq!(c.passfile_password("h1", 5432), None);
        // Readable by the group: ignored.
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o640)).unwrap();
        let c = url_with("postgres://mail@h1/mail", &[("PGPASSFILE", file)]).unwrap();
        assert_eq!(c.passfile_password("h1", 5432), None);
    }

    #[test]
    fn a_service_fills_in_before_the_variables() {
        let dir = tempfile::tempdir().unwrap();
        let user = dir.path().join("services");
        std::fs::write(
            &user,
            concat!(
                "# mine\n[other]\nhost=wrong\n\n",
                "[mail]\nhost=svc-host\nport = 6543\nuser=svc\nsslmode=require\n"
            ),
        )
        .unwrap();
        let sys = dir.path().join("etc");
        std::fs::create_dir(&sys).unwrap();
        std::fs::write(sys.join("pg_service.conf"), "[sys]\nhost=sys-host\n").unwrap();
        let (user, sys) = (user.to_str().unwrap(), sys.to_str().unwrap());
        let env = [
            ("PGSERVICEFILE", user),
            ("PGSYSCONFDIR", sys),
            ("PGHOST", "env-host"),
            ("PGUSER", "env-user"),
            ("PGDATABASE", "envdb"),
        ];
        let c = url_with("service=mail user=given", &env).unwrap();
        assert_eq!(c.pg().get_hosts(), &[Host::Tcp("svc-host".into())]);
        assert_eq!(c.pg().get_ports(), &[6543]);
        assert_eq!(c.pg().get_user(), Some("given"));
        assert_eq!(c.pg().get_dbname(), Some("envdb"));
        assert_eq!(c.ssl_mode(), SslMode::Require);
        // PGSERVICE, and the system file when the user's lacks the service.
        let mut with_service = env.to_vec();
        with_service.push(("PGSERVICE", "sys"));
        let c = url_with("", &with_service).unwrap();
        assert_eq!(c.pg().get_hosts(), &[Host::Tcp("sys-host".into())]);
        assert!(matches!(
            url_with("service=none", &env),
            Err(Error::Config(m)) if m.contains("\"none\" not found")
        ));
        std::fs::write(dir.path().join("services"), "[mail]\nservice=x\n").unwrap();
        assert!(matches!(
            url_with("service=mail", &env),
            Err(Error::Config(_))
        ));
    }
}
