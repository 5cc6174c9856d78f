//! The connection settings as psql reads them: a password from `PGPASSWORD` with a URL,
//! from `~/.pgpass` or `PGPASSFILE` (and not from one others can read), a service file,
//! several hosts with one that never answers, and the exit code of each failure: each
//! against a real server that asks for a password, through the `updatepipe` binary with an
//! environment of its own.

mod support;

use std::os::unix::fs::PermissionsExt;
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use updatepipe::Config;
use updatepipe::cluster::TempCluster;

const PASSWORD: &str = "pw-libpq-Anansi-5519";

/// `updatepipe` with no connection setting from the test's own environment.
fn updatepipe(home: &std::path::Path) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_updatepipe"));
    for var in [
        "DATABASE_URL",
        "PGHOST",
        "PGHOSTADDR",
        "PGPORT",
        "PGUSER",
        "PGPASSWORD",
        "PGDATABASE",
        "PGSERVICE",
        "PGSERVICEFILE",
        "PGPASSFILE",
        "PGSYSCONFDIR",
        "PGAPPNAME",
        "PGSSLMODE",
        "PGCONNECT_TIMEOUT",
        "PGTARGETSESSIONATTRS",
        "RUST_LOG",
        "NO_COLOR",
    ] {
        command.env_remove(var);
    }
    command.env("HOME", home);
    command
}

fn check(what: &str, output: &Output, code: i32) -> String {
    let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
    assert_eq!(
        output.status.code(),
        Some(code),
        "{what}: {}{stderr}",
        String::from_utf8_lossy(&output.stdout)
    );
    assert!(!stderr.contains(PASSWORD), "{what} shows the password");
    assert!(!stderr.contains('\x1b'), "{what}: escape codes: {stderr}");
    stderr
}

#[test]
fn connection_settings_are_read_as_psql_reads_them() {
    let cluster = TempCluster::builder()
        .hba("host all app 127.0.0.1/32 scram-sha-256")
        // The default from 14 on; 13 would store an md5 hash, which the scram line refuses.
        .setting("password_encryption", "scram-sha-256")
        .start()
        .unwrap_or_else(|e| panic!("{e}"));
    let port = cluster.port();
    let runtime = support::runtime();
    runtime.block_on(async {
        let (client, connection) = Config::from_url(&cluster.url())
            .unwrap()
            .pg()
            .connect(tokio_postgres::NoTls)
            .await
            .unwrap();
        tokio::spawn(connection);
        client
            .batch_execute(&format!("CREATE ROLE app LOGIN PASSWORD '{PASSWORD}'"))
            .await
            .unwrap();
    });
    let dir = tempfile::tempdir().unwrap();
    let home = dir.path();
    let url = format!("postgres://app@127.0.0.1:{port}/postgres");
    let status = |cmd: &mut Command| cmd.arg("status").output().unwrap();

    // No password anywhere: the login is refused, exit 5.
    let out = status(updatepipe(home).args(["--url", &url]));
    let stderr = check("no password", &out, 5);
    assert!(stderr.contains(&format!("127.0.0.1:{port}")), "{stderr}");
    // The wrong one: 5 too.
    let out = status(
        updatepipe(home)
            .args(["--url", &url])
            .env("PGPASSWORD", "wrong"),
    );
    let stderr = check("wrong password", &out, 5);
    assert!(
        stderr.contains("password authentication failed"),
        "{stderr}"
    );

    // PGPASSWORD fills in what the URL leaves out.
    let out = status(
        updatepipe(home)
            .args(["--url", &url])
            .env("PGPASSWORD", PASSWORD),
    );
    check("PGPASSWORD with --url", &out, 0);
    let out = status(
        updatepipe(home)
            .env("DATABASE_URL", &url)
            .env("PGPASSWORD", PASSWORD),
    );
    check("PGPASSWORD with DATABASE_URL", &out, 0);

    // ~/.pgpass, with a wildcard, escapes and a line before it that does not match.
    let pgpass = home.join(".pgpass");
    std::fs::write(
        &pgpass,
        format!("# comment\n127.0.0.1:1:*:app:wrong\n127.0.0.1:{port}:*:app:{PASSWORD}\n"),
    )
    .unwrap();
    std::fs::set_permissions(&pgpass, std::fs::Permissions::from_mode(0o600)).unwrap();
    check(
        "~/.pgpass",
        &status(updatepipe(home).args(["--url", &url])),
        0,
    );
    // Readable by others: ignored, with a warning, as libpq does.
    std::fs::set_permissions(&pgpass, std::fs::Permissions::from_mode(0o644)).unwrap();
    let out = status(updatepipe(home).args(["--url", &url]));
    let stderr = check("a readable ~/.pgpass", &out, 5);
    assert!(stderr.contains("group or world access"), "{stderr}");
    // PGPASSFILE names another.
    let passfile = home.join("elsewhere");
    std::fs::rename(&pgpass, &passfile).unwrap();
    std::fs::set_permissions(&passfile, std::fs::Permissions::from_mode(0o600)).unwrap();
    let out = status(
        updatepipe(home)
            .args(["--url", &url])
            .env("PGPASSFILE", &passfile),
    );
    check("PGPASSFILE", &out, 0);

    // A service file: `service=` in the string, or PGSERVICE alone.
    let services = home.join("services.conf");
    std::fs::write(
        &services,
        format!("[mail]\nhost=127.0.0.1\nport={port}\nuser=app\ndbname=postgres\n"),
    )
    .unwrap();
    let out = status(
        updatepipe(home)
            .args(["--url", "service=mail"])
            .env("PGSERVICEFILE", &services)
            .env("PGPASSFILE", &passfile),
    );
    check("service=", &out, 0);
    let out = status(
        updatepipe(home)
            .env("PGSERVICE", "mail")
            .env("PGSERVICEFILE", &services)
            .env("PGPASSWORD", PASSWORD),
    );
    check("PGSERVICE", &out, 0);

    // Several hosts: the first accepts TCP and never answers, the second is the server;
    // the first is given up after the connect timeout.
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let silent_port = silent.local_addr().unwrap().port();
    let held = std::thread::spawn(move || {
        let mut held = Vec::new();
        for stream in silent.incoming().take(2) {
            held.push(stream);
        }
        std::thread::sleep(Duration::from_secs(5));
    });
    let started = Instant::now();
    let both = format!(
        "postgres://app@127.0.0.1:{silent_port},127.0.0.1:{port}/postgres?connect_timeout=1"
    );
    let out = status(
        updatepipe(home)
            .args(["--url", &both])
            .env("PGPASSWORD", PASSWORD),
    );
    check("a silent first host", &out, 0);
    assert!(
        started.elapsed() < Duration::from_secs(8),
        "{:?}",
        started.elapsed()
    );

    // Nothing listening: exit 3, the error names the host and port.
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let closed_port = closed.local_addr().unwrap().port();
    drop(closed);
    let out = status(
        updatepipe(home)
            .env("PGHOST", "127.0.0.1")
            .env("PGPORT", closed_port.to_string()),
    );
    let stderr = check("unreachable", &out, 3);
    assert!(
        stderr.contains(&format!("127.0.0.1:{closed_port}")),
        "{stderr}"
    );
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(!stderr.contains("db error"), "{stderr}");
    drop(held);
}
