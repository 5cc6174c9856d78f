//! Connection settings as libpq reads them: a `postgres://` URL or a `key=value` string, and
//! the standard `PG*` variables. tokio-postgres parses the string itself; the TLS keys,
//! which the pipe handles with rustls, are taken off it first.

use std::str::FromStr;
use std::time::Duration;

use crate::error::Error;

/// The connection-string keys for TLS, read here rather than by tokio-postgres.
pub(crate) const TLS_KEYS: [&str; 4] = ["sslmode", "sslrootcert", "sslcert", "sslkey"];

/// The variables that set TLS, and the connection-string keys they stand for.
const TLS_VARS: [(&str, &str); 4] = [
    ("PGSSLMODE", "sslmode"),
    ("PGSSLROOTCERT", "sslrootcert"),
    ("PGSSLCERT", "sslcert"),
    ("PGSSLKEY", "sslkey"),
];

/// What a connection string, or the environment, says.
#[derive(Debug)]
pub(super) struct Settings {
    /// Everything but TLS.
    pub(super) pg: tokio_postgres::Config,
    /// The TLS keys and their values, for `TlsOptions::set`.
    pub(super) tls: Vec<(String, String)>,
    /// `PGCONNECT_TIMEOUT`, when that is where the settings came from.
    pub(super) connect_timeout: Option<Duration>,
}

/// A connection string (URL or key=value), with `var` giving the `PGSSL*` defaults for the
/// TLS settings it leaves out.
pub(super) fn parse(conn: &str, var: &impl Fn(&str) -> Option<String>) -> Result<Settings, Error> {
    let (rest, mut tls) = split_params(conn)?;
    let pg = tokio_postgres::Config::from_str(&rest).map_err(|e| {
        // The parser's messages name the option, never its value; say no more than that.
        Error::Config(format!(
            "cannot parse the connection string ({}); expected \
             postgres://user:password@host:port/database or key=value pairs",
            crate::error::pg_message(&e)
        ))
    })?;
    let defaults: Vec<(String, String)> = TLS_VARS
        .iter()
        .filter(|(_, key)| !tls.iter().any(|(k, _)| k == key))
        .filter_map(|(name, key)| Some((key.to_string(), var(name)?)))
        .collect();
    tls.extend(defaults);
    Ok(Settings {
        pg,
        tls,
        connect_timeout: None,
    })
}

/// `DATABASE_URL` when `var` has it (read by [`parse`]), otherwise the standard libpq
/// variables `PGHOST`, `PGHOSTADDR`, `PGPORT`, `PGUSER`, `PGPASSWORD`, `PGDATABASE`,
/// `PGAPPNAME`, `PGCONNECT_TIMEOUT`, `PGOPTIONS` and the `PGSSL*` ones.
pub(super) fn from_vars(var: &impl Fn(&str) -> Option<String>) -> Result<Settings, Error> {
    if let Some(url) = var("DATABASE_URL") {
        return parse(&url, var);
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
            let ip = addr
                .trim()
                .parse()
                .map_err(|_| Error::Config(format!("PGHOSTADDR {addr:?} is not an IP address")))?;
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
    let tls = TLS_VARS
        .iter()
        .filter_map(|(name, key)| Some((key.to_string(), var(name)?)))
        .collect();
    let connect_timeout = match var("PGCONNECT_TIMEOUT") {
        None => None,
        Some(secs) => {
            let secs: u64 = secs.trim().parse().map_err(|_| {
                Error::Config(format!(
                    "PGCONNECT_TIMEOUT {secs:?} is not a number of seconds"
                ))
            })?;
            Some(Duration::from_secs(secs.max(1)))
        }
    };
    Ok(Settings {
        pg,
        tls,
        connect_timeout,
    })
}

/// Splits the settings of [`TLS_KEYS`] off a connection string (URL or key=value), returning
/// the rest for tokio-postgres and the TLS settings. A string it cannot
/// take apart is returned whole, for tokio-postgres to report.
pub(crate) fn split_params(conn: &str) -> Result<(String, Vec<(String, String)>), Error> {
    if conn.starts_with("postgres://") || conn.starts_with("postgresql://") {
        // The query starts at the first `?` after the credentials (tokio-postgres reads
        // them up to the first `@`, `?` included).
        let after = conn.find('@').map_or(0, |at| at + 1);
        let Some(mark) = conn[after..].find('?').map(|i| after + i) else {
            return Ok((conn.to_owned(), Vec::new()));
        };
        let (base, query) = (&conn[..mark], &conn[mark + 1..]);
        let mut kept = Vec::new();
        let mut found = Vec::new();
        for part in query.split('&') {
            let (key, value) = part.split_once('=').unwrap_or((part, ""));
            let key = percent_decode(key)?;
            if TLS_KEYS.contains(&key.as_str()) {
                found.push((key, percent_decode(value)?));
            } else {
                kept.push(part);
            }
        }
        let rest = if kept.is_empty() {
            base.to_owned()
        } else {
            format!("{base}?{}", kept.join("&"))
        };
        return Ok((rest, found));
    }
    let Some(pairs) = key_value_pairs(conn) else {
        return Ok((conn.to_owned(), Vec::new()));
    };
    let mut rest = String::with_capacity(conn.len());
    let mut found = Vec::new();
    let mut from = 0;
    for (key, value, span) in pairs {
        if TLS_KEYS.contains(&key.as_str()) {
            rest.push_str(&conn[from..span.start]);
            from = span.end;
            found.push((key, value));
        }
    }
    rest.push_str(&conn[from..]);
    Ok((rest, found))
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
                .ok_or_else(|| {
                    Error::Config("a TLS setting in the URL has a bad %-escape".into())
                })?;
            out.push(hex);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out)
        .map_err(|_| Error::Config("a TLS setting in the URL is not UTF-8".into()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Config, DEFAULT_POOL_SIZE, DEFAULT_PUSH_TIMEOUT};
    use crate::tls::SslMode;
    use std::collections::HashMap;
    use tokio_postgres::config::Host;

    fn from(vars: &[(&str, &str)]) -> Result<Config, Error> {
        let map: HashMap<String, String> = vars
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        Config::from_vars(|k| map.get(k).cloned())
    }

    fn split(conn: &str) -> (String, Vec<(String, String)>) {
        split_params(conn).unwrap()
    }

    fn pair(k: &str, v: &str) -> (String, String) {
        (k.to_owned(), v.to_owned())
    }

    #[test]
    fn splits_tls_settings_off_a_url() {
        let (rest, found) = split(concat!(
            "postgres://u:p%40w@h/db?application_name=x&sslmode=verify-full",
            "&sslrootcert=%2Ftmp%2Fca%20b.pem"
        ));
        assert_eq!(rest, "postgres://u:p%40w@h/db?application_name=x");
        assert_eq!(
            found,
            [
                pair("sslmode", "verify-full"),
                pair("sslrootcert", "/tmp/ca b.pem")
            ]
        );
        let (rest, found) = split("postgresql://h/db?sslmode=require");
        assert_eq!((rest.as_str(), found.len()), ("postgresql://h/db", 1));
        // A `?` in the credentials is not the query.
        let (rest, found) = split("postgres://u:x?&sslmode=disable&@h/db?sslmode=verify-full");
        assert_eq!(rest, "postgres://u:x?&sslmode=disable&@h/db");
        assert_eq!(found, [pair("sslmode", "verify-full")]);
        assert_eq!(split("postgres://h/db").0, "postgres://h/db");
        assert!(split_params("postgres://h/db?sslrootcert=%zz").is_err());
    }

    #[test]
    fn splits_tls_settings_off_key_value() {
        let (rest, found) = split(concat!(
            "host=h sslmode = verify-ca password='a b\\'c' ",
            "sslrootcert='/x y/ca.pem' sslkey=/k\\ ey"
        ));
        assert_eq!(rest, "host=h  password='a b\\'c'  ");
        assert_eq!(
            found,
            [
                pair("sslmode", "verify-ca"),
                pair("sslrootcert", "/x y/ca.pem"),
                pair("sslkey", "/k ey"),
            ]
        );
        // Not the grammar: left whole for tokio-postgres to report.
        assert_eq!(split("host h").0, "host h");
        assert_eq!(split("sslmode='open").0, "sslmode='open");
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
}
