//! Shared test support: one PostgreSQL per test binary, a fresh channel per test.
//!
//! With `DATABASE_URL` set, tests use that server, in a database of this binary's own
//! (created from `template0`, dropped when the binary exits, however it ends: see
//! [`own_database_on`]), so that the database the URL names is left as it was. Otherwise
//! the first test to ask starts a private throwaway cluster (see
//! `updatepipe::cluster::TempCluster`), shared by the tests of this binary and stopped when
//! the binary exits.

#![allow(dead_code)]

use std::sync::OnceLock;
use std::time::Duration;

use tokio::sync::mpsc;
use updatepipe::cluster::TempCluster;
use updatepipe::{ChannelName, Config, Update};

struct Database {
    url: String,
    _cluster: Option<TempCluster>,
    /// With `DATABASE_URL`: the process that drops this binary's database once it is gone.
    _watchdog: Option<std::process::Child>,
}

static DATABASE: OnceLock<Database> = OnceLock::new();

/// Logs to the test's output when `RUST_LOG` is set (for example `RUST_LOG=updatepipe=debug`).
pub fn init_logging() {
    if std::env::var_os("RUST_LOG").is_some() {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
            .with_test_writer()
            .try_init();
    }
}

fn database() -> &'static Database {
    init_logging();
    DATABASE.get_or_init(|| match std::env::var("DATABASE_URL") {
        Ok(url) if !url.is_empty() => {
            let (url, watchdog) = own_database_on(&url);
            Database {
                url,
                _cluster: None,
                _watchdog: Some(watchdog),
            }
        }
        _ => {
            let cluster = TempCluster::start().unwrap_or_else(|e| panic!("{e}"));
            Database {
                url: cluster.url(),
                _cluster: Some(cluster),
                _watchdog: None,
            }
        }
    })
}

/// The URL of the test database.
pub fn url() -> String {
    database().url.clone()
}

/// A database of this test binary's own on the server `shared` reaches: created now, and
/// dropped (with whatever is still connected to it) by a small watchdog process once this
/// process is gone, however it ended. The watchdog has a process group of its own and
/// ignores the terminal's signals, so a Ctrl-C that ends the tests does not end it; the URL
/// reaches it (and `psql`) through the environment, not the command line. Returns the
/// database's URL, and the watchdog.
fn own_database_on(shared: &str) -> (String, std::process::Child) {
    use std::os::unix::process::CommandExt;
    let name = format!("updatepipe_test_{:08x}", rand::random::<u32>());
    let psql = psql().unwrap_or_else(|| {
        eprintln!(
            "no psql on PATH nor under /usr/lib/postgresql: the tests' database {name} will \
             be left on the DATABASE_URL server"
        );
        "psql".into()
    });
    run_sql(
        shared.to_owned(),
        format!("CREATE DATABASE \"{name}\" TEMPLATE template0"),
    )
    .unwrap_or_else(|e| panic!("cannot create the tests' database on DATABASE_URL: {e}"));
    let script = r#"
        trap '' INT HUP TERM QUIT
        while kill -0 "$1" 2>/dev/null || [ -d "/proc/$1" ]; do sleep 1; done
        PGCONNECT_TIMEOUT=10 "$2" -X -w -q -d "$UPDATEPIPE_TEST_SERVER" \
            -c "DROP DATABASE IF EXISTS \"$3\" WITH (FORCE)"
    "#;
    let watchdog = std::process::Command::new("sh")
        .current_dir("/")
        .process_group(0)
        .arg("-c")
        .arg(script)
        .arg("updatepipe-test-database-watchdog")
        .arg(std::process::id().to_string())
        .arg(psql)
        .arg(&name)
        .env("UPDATEPIPE_TEST_SERVER", shared)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("start the watchdog that drops the tests' database");
    (url_of(shared, &name), watchdog)
}

/// `psql`: on `PATH`, or the newest under `/usr/lib/postgresql/*/bin`.
fn psql() -> Option<std::path::PathBuf> {
    let on_path = std::env::var_os("PATH").and_then(|path| {
        std::env::split_paths(&path)
            .map(|dir| dir.join("psql"))
            .find(|p| p.is_file())
    });
    on_path.or_else(|| {
        let mut found: Vec<(u32, std::path::PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
            .ok()?
            .filter_map(|entry| {
                let entry = entry.ok()?;
                let major = entry.file_name().to_str()?.parse().ok()?;
                let psql = entry.path().join("bin/psql");
                psql.is_file().then_some((major, psql))
            })
            .collect();
        found.sort();
        found.pop().map(|(_, psql)| psql)
    })
}

/// A name unique to this test run: `prefix` and random hex, at most 63 bytes.
pub fn unique(prefix: &str) -> String {
    let mut name = format!("{prefix}_{:08x}", rand::random::<u32>());
    if name.len() > 63 {
        name.replace_range(0..name.len() - 63, "");
    }
    name
}

/// A configuration on a channel of its own, with an application name of its own (so the
/// test can find its connections in `pg_stat_activity`).
pub fn config(test: &str) -> Config {
    config_on(&unique(test))
}

/// A configuration on the given channel.
pub fn config_on(channel: &str) -> Config {
    Config::from_url(&url())
        .unwrap()
        .with_channel(ChannelName::new(channel).unwrap())
        .with_application_name(&unique("up"))
}

/// The test server's URL with another database in it (the URL's path replaced).
pub fn url_of_database(name: &str) -> String {
    url_of(&url(), name)
}

/// `url` with database `name` in it: its path replaced, or, in a `key=value` string, a
/// `dbname` added (the last of a key wins).
fn url_of(url: &str, name: &str) -> String {
    if !url.contains("://") {
        return format!("{url} dbname={name}");
    }
    let (base, query) = match url.split_once('?') {
        Some((base, query)) => (base, Some(query)),
        None => (url, None),
    };
    let authority = base.find("://").map_or(0, |i| i + 3);
    let path = base[authority..]
        .find('/')
        .map_or(base.len(), |i| authority + i);
    let mut url = format!("{}/{name}", &base[..path]);
    if let Some(query) = query {
        url.push('?');
        url.push_str(query);
    }
    url
}

/// A database of its own on the test server, without updatepipe's schema (for a test that
/// needs one unmigrated, or changes its schema, roles or privileges): dropped, with
/// whatever is still connected to it, when the guard goes, also when the test fails.
pub struct TempDatabase {
    pub name: String,
    pub url: String,
}

impl Drop for TempDatabase {
    fn drop(&mut self) {
        admin_now(format!(
            "DROP DATABASE IF EXISTS \"{}\" WITH (FORCE)",
            self.name
        ));
    }
}

/// A database of its own: see [`TempDatabase`].
pub async fn fresh_database(prefix: &str) -> TempDatabase {
    let name = unique(prefix);
    sql()
        .await
        .batch_execute(&format!("CREATE DATABASE \"{name}\""))
        .await
        .expect("create a database");
    let url = url_of_database(&name);
    TempDatabase { name, url }
}

/// A durable pipe's configuration on a database of its own that nobody migrated (dropped
/// when the guard goes).
pub async fn unmigrated_durable(prefix: &str) -> (TempDatabase, Config) {
    let database = fresh_database(prefix).await;
    let config = Config::from_url(&database.url)
        .unwrap()
        .with_channel(ChannelName::new(unique("unmigrated")).unwrap())
        .with_durable(true);
    (database, config)
}

/// A role of its own on the test server (a login role without a password): dropped when
/// the guard goes, also when the test fails, so that a shared `DATABASE_URL` keeps the
/// roles it had. Drop the databases it has privileges in first (guards drop in reverse
/// order of their making).
pub struct TempRole {
    pub name: String,
}

impl TempRole {
    pub async fn new(prefix: &str) -> TempRole {
        let name = unique(prefix);
        sql()
            .await
            .batch_execute(&format!("CREATE ROLE \"{name}\" LOGIN"))
            .await
            .expect("create a role");
        TempRole { name }
    }
}

impl Drop for TempRole {
    fn drop(&mut self) {
        admin_now(format!("DROP ROLE IF EXISTS \"{}\"", self.name));
    }
}

/// Runs clean-up SQL on the test server from wherever a guard is dropped (async code, a
/// panic): on a thread and a runtime of its own.
fn admin_now(sql: String) {
    if let Err(e) = run_sql(url(), sql) {
        eprintln!("clean-up failed ({e})");
    }
}

/// Runs `sql` on the server `url` reaches, on a thread and a runtime of its own.
fn run_sql(url: String, sql: String) -> Result<(), String> {
    let done = std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        runtime.block_on(async {
            let (client, connection) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
                .await
                .map_err(|e| e.to_string())?;
            tokio::spawn(connection);
            client.batch_execute(&sql).await.map_err(|e| e.to_string())
        })
    })
    .join();
    done.unwrap_or_else(|_| Err("the thread panicked".into()))
}

/// How many rows of `channel` the durable log holds.
pub async fn log_rows(client: &impl tokio_postgres::GenericClient, channel: &str) -> i64 {
    client
        .query_one(
            "SELECT count(*) FROM updatepipe.log WHERE channel = $1",
            &[&channel],
        )
        .await
        .unwrap()
        .get(0)
}

/// Waits, up to `within`, until the durable log holds no row of `channel` (a listener
/// pruned them); returns how many are left.
pub async fn pruned_within(
    client: &impl tokio_postgres::GenericClient,
    channel: &str,
    within: Duration,
) -> i64 {
    let deadline = tokio::time::Instant::now() + within;
    loop {
        let left = log_rows(client, channel).await;
        if left == 0 || tokio::time::Instant::now() >= deadline {
            return left;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A runtime of a test's own (two worker threads), for tests that outlive one runtime.
pub fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

/// A plain client on the test database, for SQL the test runs itself.
pub async fn sql() -> tokio_postgres::Client {
    sql_url(&url()).await
}

/// A plain client of the `postgres` database on a private cluster's `port`, as `postgres`.
pub async fn sql_at(port: u16) -> tokio_postgres::Client {
    sql_at_database(port, "postgres").await
}

/// A plain client of `database` on a private cluster's `port`, as `postgres`.
pub async fn sql_at_database(port: u16, database: &str) -> tokio_postgres::Client {
    sql_url(&format!("postgres://postgres@127.0.0.1:{port}/{database}")).await
}

/// A plain client (no TLS) of `url`, its connection driven by a task of its own.
pub async fn sql_url(url: &str) -> tokio_postgres::Client {
    let (client, connection) = tokio_postgres::connect(url, tokio_postgres::NoTls)
        .await
        .unwrap_or_else(|e| panic!("connect to {url}: {e}"));
    tokio::spawn(connection);
    client
}

/// The `n`th new message (UID `n`) of mailbox `key`: the numbered updates of the tests that
/// check each sender's order.
pub fn numbered(key: u64, n: u32) -> Update {
    Update::new_message(key, updatepipe::SeqSet::single(n).unwrap())
}

/// The key and UID of an update [`numbered`] made.
pub fn number_of(update: &Update) -> (u64, u32) {
    let updatepipe::MailboxKey::Id(key) = update.key() else {
        panic!("{update:?}")
    };
    (*key, update.seq_set().as_single().unwrap())
}

/// How long a test waits for something that should arrive.
pub const ARRIVE: Duration = Duration::from_secs(10);

/// How long a test watches for something that must not arrive.
pub const SILENCE: Duration = Duration::from_millis(500);

/// Receives exactly `n` updates, each within [`ARRIVE`], then checks that nothing more
/// arrives within [`SILENCE`].
pub async fn receive_exactly(rx: &mut mpsc::Receiver<Update>, n: usize) -> Vec<Update> {
    let mut got = Vec::with_capacity(n);
    while got.len() < n {
        match tokio::time::timeout(ARRIVE, rx.recv()).await {
            Ok(Some(update)) => got.push(update),
            Ok(None) => panic!("channel ended after {} of {n} updates", got.len()),
            Err(_) => panic!("timed out after {} of {n} updates: {got:?}", got.len()),
        }
    }
    assert_silent(rx).await;
    got
}

/// Checks that nothing arrives within [`SILENCE`].
pub async fn assert_silent(rx: &mut mpsc::Receiver<Update>) {
    if let Ok(Some(extra)) = tokio::time::timeout(SILENCE, rx.recv()).await {
        panic!("unexpected update: {}", extra.to_json());
    }
}

/// How many connections with this application name are left after a few seconds
/// (backends exit asynchronously after their client goes).
pub async fn connections_left(client: &tokio_postgres::Client, application_name: &str) -> i64 {
    let mut left = connections(client, application_name).await;
    for _ in 0..50 {
        if left == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        left = connections(client, application_name).await;
    }
    left
}

/// How many connections with this application name the server has (the listener's
/// included: it adds "/listen").
pub async fn connections(client: &tokio_postgres::Client, application_name: &str) -> i64 {
    client
        .query_one(
            // The pool's connections carry the name, the listener's the name and
            // "/listen".
            "SELECT count(*) FROM pg_stat_activity \
             WHERE application_name IN ($1, $1 || '/listen')",
            &[&application_name],
        )
        .await
        .unwrap()
        .get(0)
}

/// Checks that each mailbox's numbered updates (mailboxes 0 to `keys` - 1, UIDs 1 to `each`)
/// arrive exactly once, in order.
pub fn assert_exactly_once_in_order(updates: &[&Update], keys: u64, each: u32) {
    let mut next = vec![1u32; keys as usize];
    for update in updates {
        let updatepipe::MailboxKey::Id(key) = update.key() else {
            panic!("{update:?}")
        };
        let n = update.seq_set().as_single().unwrap();
        assert_eq!(
            n, next[*key as usize],
            "mailbox {key}: out of order or repeated"
        );
        next[*key as usize] += 1;
    }
    assert!(
        next.iter().all(|n| *n == each + 1),
        "missing updates: next {next:?}"
    );
}

pub mod pgbouncer;
pub mod proxy;

/// A private cluster for a test that touches the server (kills, restarts, proxies).
/// Commits do not wait for the disk: these tests are about delivery, not durability on
/// power loss.
pub fn own_cluster() -> TempCluster {
    init_logging();
    TempCluster::builder()
        .setting("synchronous_commit", "off")
        .start()
        .unwrap_or_else(|e| panic!("{e}"))
}

/// An asynchronous streaming standby of the server on `upstream` (a private cluster, or a
/// proxy in front of it), once it streams: a standby that never connected would replay
/// nothing and still look caught up.
pub async fn streaming_standby_of(upstream: u16) -> TempCluster {
    let standby = tokio::task::spawn_blocking(move || {
        TempCluster::builder().standby_of(upstream).start().unwrap()
    })
    .await
    .unwrap();
    let client = sql_at(standby.port()).await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let streaming: bool = client
            .query_one(
                "SELECT count(*) > 0 FROM pg_stat_wal_receiver WHERE status = 'streaming'",
                &[],
            )
            .await
            .unwrap()
            .get(0);
        if streaming {
            return standby;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the standby never streamed"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A configuration for a private cluster, on its own channel and application name, with
/// the quick health checks and backoff the reliability tests need.
pub fn cluster_config(port: u16, channel: &str) -> Config {
    cluster_config_url(
        &format!("postgres://postgres@127.0.0.1:{port}/postgres"),
        channel,
    )
}

/// [`cluster_config`] for a connection string of the test's own (several hosts, say).
pub fn cluster_config_url(url: &str, channel: &str) -> Config {
    Config::from_url(url)
        .unwrap()
        .with_channel(ChannelName::new(channel).unwrap())
        .with_application_name(&unique("up"))
        .with_listen(|l| l.with_health_interval(Duration::from_secs(1)))
        .with_connect_timeout(Duration::from_secs(1))
        .with_push(|p| p.with_timeout(Duration::from_secs(3)))
        .with_listen(|l| {
            l.with_backoff(updatepipe::Backoff {
                initial: Duration::from_millis(50),
                max: Duration::from_millis(500),
                ..updatepipe::Backoff::default()
            })
        })
}
