//! No secret anywhere it should not be: a database password and a signing secret, used
//! through every path that logs or fails (good and bad passwords, connection failures, a
//! listener that loses its connection, the CLI), are looked for in everything the crate and
//! its dependencies logged at the most verbose level, and in every error's message and
//! `Debug`. Its own test binary: it installs the process-wide log subscriber.

mod support;

use std::io::Write;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::mpsc;
use updatepipe::cluster::TempCluster;
use updatepipe::{ChannelName, Config, PgPipe, Secret, SeqSet, Update, UpdatePipe};

const PASSWORD: &str = "pw-Quetzalcoatl-7731";
const WRONG_PASSWORD: &str = "pw-Tezcatlipoca-4409";
const SIGNING_SECRET: &str = "sig-Xochiquetzal-0123456789";

/// Everything logged, by every thread.
#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn assert_clean(what: &str, text: &str) {
    for secret in [PASSWORD, WRONG_PASSWORD, SIGNING_SECRET] {
        assert!(!text.contains(secret), "{what} shows a secret: {text}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn passwords_and_signing_secrets_never_show_in_logs_errors_or_debug() {
    let cluster = tokio::task::spawn_blocking(|| {
        TempCluster::builder()
            .hba("host all app 127.0.0.1/32 scram-sha-256")
            // The default from 14 on; 13 would store an md5 hash, which the scram line
            // above cannot authenticate.
            .setting("password_encryption", "scram-sha-256")
            .start()
            .unwrap_or_else(|e| panic!("{e}"))
    })
    .await
    .unwrap();
    let port = cluster.port();
    let admin = Config::from_url(&cluster.url()).unwrap();
    let (client, connection) = admin.pg().connect(tokio_postgres::NoTls).await.unwrap();
    tokio::spawn(connection);
    client
        .batch_execute(&format!(
            "CREATE ROLE app LOGIN PASSWORD '{PASSWORD}'; GRANT CREATE ON DATABASE postgres TO app; GRANT CREATE ON SCHEMA public TO app"
        ))
        .await
        .unwrap();
    // From here on everything is logged (the statement above, which sets the password, is
    // the test's own).
    let captured = Captured::default();
    let writer = captured.clone();
    tracing_subscriber::fmt()
        .with_env_filter("trace")
        .with_writer(move || writer.clone())
        .init();

    let dir = tempfile::tempdir().unwrap();
    let secret_file = dir.path().join("secrets");
    std::fs::write(&secret_file, format!("{SIGNING_SECRET}\n")).unwrap();
    let url = |password: &str, port: u16| {
        format!("postgres://app:{password}@127.0.0.1:{port}/postgres?application_name=secrets")
    };
    let config = |password: &str, port: u16| {
        Config::from_url(&url(password, port))
            .unwrap()
            .with_channel(ChannelName::new("secrets").unwrap())
            .with_secrets(Secret::read_file(&secret_file).unwrap())
            .with_listen(|l| l.with_health_interval(Duration::from_secs(2)))
            .with_connect_timeout(Duration::from_secs(2))
            .with_push(|p| p.with_timeout(Duration::from_secs(2)))
    };
    let mut shown = Vec::new();

    // Configurations, and a connection string that does not parse.
    let good = config(PASSWORD, port);
    shown.push(format!("{good:?}"));
    shown.push(format!("{:?}", Secret::read_file(&secret_file).unwrap()));
    for bad in [
        format!("postgres://app:{PASSWORD}@127.0.0.1:notaport/postgres"),
        format!("host=127.0.0.1 password={PASSWORD} port=x"),
        format!("postgres://app:{PASSWORD}@127.0.0.1/postgres?sslmode=bogus"),
    ] {
        let err = Config::from_url(&bad).unwrap_err();
        shown.push(format!("{err} {err:?}"));
    }

    // The wrong password, and no server at all.
    for config in [config(WRONG_PASSWORD, port), config(PASSWORD, 1)] {
        let pipe = PgPipe::new(config).unwrap();
        let (tx, _rx) = mpsc::channel(8);
        let err = pipe.listen(tx).await.unwrap_err();
        shown.push(format!("{err} {err:?}"));
        let err = pipe.push(&Update::mailbox_destroyed(1)).await.unwrap_err();
        shown.push(format!("{err} {err:?}"));
        let err = pipe.status().await.unwrap_err();
        shown.push(format!("{err} {err:?}"));
        pipe.close().await.unwrap();
    }

    // The right one: push, listen, status, and a listener whose connection is killed.
    let listener = PgPipe::new(config(PASSWORD, port)).unwrap();
    let (tx, mut rx) = mpsc::channel(8);
    listener.listen(tx).await.unwrap();
    let pusher = PgPipe::new(config(PASSWORD, port).with_durable(true)).unwrap();
    pusher.migrate().await.unwrap();
    let update = Update::new_message(1, SeqSet::single(1).unwrap());
    pusher.push(&update).await.unwrap();
    let got = tokio::time::timeout(Duration::from_secs(10), rx.recv()).await;
    assert_eq!(got.unwrap().unwrap(), update);
    shown.push(format!("{:?}", pusher.status().await.unwrap()));
    client
        .execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = 'app'",
            &[],
        )
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_secs(2)).await;
    pusher.push(&update).await.unwrap();
    let got = tokio::time::timeout(Duration::from_secs(10), rx.recv()).await;
    assert_eq!(got.unwrap().unwrap(), update);
    shown.push(format!("{listener:?} {pusher:?}"));
    listener.close().await.unwrap();
    pusher.close().await.unwrap();

    // The command line, at the most verbose level, with a bad and a good password: a
    // refused login (exit code 5), then success.
    for (password, code) in [(WRONG_PASSWORD, 5), (PASSWORD, 0)] {
        let secret_file = secret_file.to_str().unwrap();
        for args in [
            vec!["status"],
            vec![
                "push",
                "--type",
                "destroyed",
                "--key",
                "1",
                "--secret-file",
                secret_file,
            ],
        ] {
            let output = std::process::Command::new(env!("CARGO_BIN_EXE_updatepipe"))
                .args(&args)
                .args(["--url", &url(password, port), "--channel", "secrets"])
                .env("RUST_LOG", "trace")
                .output()
                .unwrap();
            let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
            assert_eq!(output.status.code(), Some(code), "{args:?}: {stderr}");
            shown.push(String::from_utf8_lossy(&output.stdout).into_owned());
            shown.push(stderr);
        }
    }

    let logs = String::from_utf8(captured.0.lock().unwrap().clone()).unwrap();
    // The paths above did log: the check below looks at something.
    assert!(logs.contains("updatepipe"), "nothing was logged");
    assert!(logs.contains("reconnect"), "the reconnect was not logged");
    assert!(
        shown
            .iter()
            .any(|s| s.contains("password authentication failed"))
    );
    assert_clean("the logs", &logs);
    for text in &shown {
        assert_clean("an error, a Debug or the CLI", text);
    }
    tokio::task::spawn_blocking(move || drop(cluster))
        .await
        .unwrap();
}
