//! Connection strings, services, variables and the password file, read as libpq reads them.

use std::collections::HashMap;
use std::time::Duration;

use tokio_postgres::config::{Host, TargetSessionAttrs};

use super::*;
use crate::pg::SslMode;
use crate::pg::server::Server;

fn vars(vars: &[(&str, &str)]) -> HashMap<String, String> {
    vars.iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// As `Config::from_env` reads the environment `v`.
fn from(v: &[(&str, &str)]) -> Result<Server, Error> {
    let map = vars(v);
    let url = map.get("DATABASE_URL").cloned().unwrap_or_default();
    Server::from_string(&url, &|k: &str| map.get(k).cloned())
}

/// As `Config::from_url_with_env` reads `url` in the environment `v`.
fn url_with(url: &str, v: &[(&str, &str)]) -> Result<Server, Error> {
    let map = vars(v);
    Server::from_string(url, &|k: &str| map.get(k).cloned())
}

/// As `Config::from_url` reads `url`.
fn plain(url: &str) -> Result<Server, Error> {
    Server::from_string(url, &|_| None)
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
    assert_eq!(c.tls().mode, SslMode::Require);
    assert_eq!(c.pg().get_password(), Some(&b"hunter2"[..]));
    assert_eq!(c.pg().get_application_name(), Some("imapd"));
    assert_eq!(c.pg().get_hosts(), &[Host::Tcp("h1".into())]);
    assert_eq!(c.pg().get_ports(), &[6000]);
    let c = url_with("postgres://a@h1/db1", &[("PGSSLMODE", "verify-full")]).unwrap();
    assert_eq!(c.tls().mode, SslMode::VerifyFull);
    assert_eq!(
        c.pg().get_ssl_mode(),
        tokio_postgres::config::SslMode::Require
    );
    // The string's own password wins.
    let c = url_with("postgres://a:mine@h1/db1", &[("PGPASSWORD", "env")]).unwrap();
    assert_eq!(c.pg().get_password(), Some(&b"mine"[..]));
    // Plain from_url reads no environment.
    let c = plain("postgres://a@h1/db1").unwrap();
    assert_eq!(c.tls().mode, SslMode::Prefer);
}

#[test]
fn host_addresses_stand_for_host_names() {
    let c = from(&[("PGHOSTADDR", "127.0.0.1")]).unwrap();
    assert_eq!(c.pg().get_hosts(), &[Host::Tcp("127.0.0.1".into())]);
    let c = plain("hostaddr=10.0.0.1 user=x").unwrap();
    assert_eq!(c.pg().get_hosts(), &[Host::Tcp("10.0.0.1".into())]);
    let c = plain("host=db hostaddr=10.0.0.1 user=x").unwrap();
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
    let c = plain("postgres://h/d?target_session_attrs=any").unwrap();
    assert_eq!(c.pg().get_target_session_attrs(), TargetSessionAttrs::Any);
    let c = from(&[("PGTARGETSESSIONATTRS", "any")]).unwrap();
    assert_eq!(c.pg().get_target_session_attrs(), TargetSessionAttrs::Any);
    let c = Server::from_pg(&tokio_postgres::Config::new());
    assert_eq!(
        c.pg().get_target_session_attrs(),
        TargetSessionAttrs::ReadWrite
    );
    assert!(matches!(
        plain("host=h target_session_attrs=standby"),
        Err(Error::Config(_))
    ));
}

#[test]
fn defaults_without_any_variable() {
    let c = from(&[]).unwrap();
    assert_eq!(c.pg().get_hosts(), &[Host::Tcp("localhost".into())]);
    assert_eq!(c.pg().get_user(), Some("postgres"));
    assert_eq!(c.pg().get_dbname(), Some("postgres"));
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
        plain("postgres://u:pw@h:notaport/d"),
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
    let c = plain(&format!("host=h1 user=mail passfile={file}")).unwrap();
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
    assert_eq!(c.tls().mode, SslMode::Require);
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
