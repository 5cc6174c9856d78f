//! Connection settings as libpq reads them, for the keys the pipe supports.
//!
//! The order is libpq's: the connection string (a `postgres://` URL or `key=value` pairs)
//! first; then, for what it leaves out, the service named by `service=` or `PGSERVICE`
//! (in `PGSERVICEFILE` or `~/.pg_service.conf`, then `PGSYSCONFDIR/pg_service.conf`);
//! then the `PG*` variables; then the defaults. A password still missing is looked up in
//! the password file (`passfile=`, `PGPASSFILE` or `~/.pgpass`) for each host as it is
//! tried. Everything is gathered into one map of settings by libpq's key names, for
//! tokio-postgres (`server.rs`); the keys the pipe reads itself (TLS, which it does with
//! rustls, the service and the password file) are kept aside.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;

use super::files::service_settings;
pub(super) use super::files::{Env, PassFile};
use crate::error::Error;

/// The connection-string keys for TLS, read here rather than by tokio-postgres.
pub(crate) const TLS_KEYS: [&str; 4] = ["sslmode", "sslrootcert", "sslcert", "sslkey"];

/// Keys read here, never handed to tokio-postgres.
const OWN_KEYS: [&str; 6] = [
    "sslmode",
    "sslrootcert",
    "sslcert",
    "sslkey",
    "service",
    "passfile",
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

/// What a connection string, a service and the environment say.
#[derive(Debug)]
pub(super) struct Parsed {
    /// Everything but what [`OWN_KEYS`] name, by libpq's key names; `target_session_attrs`
    /// resolved (`read-write` unless the settings say `any`).
    pub(super) settings: BTreeMap<String, String>,
    /// The TLS keys and their values, for `TlsOptions::set`.
    pub(super) tls: Vec<(String, String)>,
    /// The password file's entries, when no password was given and the file is usable.
    pub(super) passfile: Option<Arc<PassFile>>,
}

/// A connection string (URL or key=value) completed as libpq completes it, from `env`.
pub(super) fn parse(conn: &str, env: &Env<'_>) -> Result<Parsed, Error> {
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
        None | Some("read-write") => "read-write",
        Some("any") => "any",
        Some(other) => {
            return Err(Error::Config(format!(
                "target_session_attrs {other:?} is not supported: the pipe needs a server \
                 that accepts writes; use read-write (the default) or any"
            )));
        }
    };
    given.insert("target_session_attrs".into(), target.into());
    let passfile = if given.contains_key("password") {
        None
    } else {
        let path = match given.get("passfile") {
            Some(path) => Some(PathBuf::from(path)),
            None => env.home(".pgpass"),
        };
        path.and_then(|path| PassFile::read(&path)).map(Arc::new)
    };
    let tls = given
        .iter()
        .filter(|(key, _)| TLS_KEYS.contains(&key.as_str()))
        .map(|(key, value)| (key.clone(), value.clone()))
        .collect();
    given.retain(|key, _| !OWN_KEYS.contains(&key.as_str()));
    Ok(Parsed {
        settings: given,
        tls,
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
mod tests;
