//! A hostile database, on a throwaway cluster with real roles (scram passwords), made as
//! `updatepipe grant` makes them: an owner, a pusher, a listener, and two attackers:
//! `h_mallory`, who may create in `public`, and `h_eve`, who may create schemas (and so one
//! named like each victim role, which `"$user"` puts first on its search path).
//!
//! - Objects planted where an unqualified name would find them (a polymorphic built-in
//!   beaten by an exact match: `unnest(text[])`, `format(text, name, name)`,
//!   `=(oid, regclass)`, ...) are never run by `migrate`, `grant`, `status`, the CLI's
//!   `listen --durable` and `push --durable`, the library's multi-update pushes and
//!   `push_in`: a table the planted functions write stays empty, and every update arrives.
//! - A pusher that squats another sender's next number cannot turn that sender's push into
//!   a silent loss, with or without signing; a push whose first try committed but whose
//!   answer was lost is still Ok.
//! - A lock any role can take: a held migration lock makes `migrate` and `grant` fail
//!   within their bound, naming the holder; the old pruning lock no longer stops pruning.

mod support;

use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Stdio};
use std::time::Duration;

use tokio::sync::{OnceCell, mpsc};
use updatepipe::cluster::TempCluster;
use updatepipe::{ChannelName, Config, Error, Event, PgPipe, Secret, SeqSet, Update, UpdatePipe};

const OWNER: &str = "h_owner";
const PUSHER: &str = "h_pusher";
const LISTENER: &str = "h_listener";
/// May create in `public`.
const MALLORY: &str = "h_mallory";
/// May create schemas in the database.
const EVE: &str = "h_eve";
const PASSWORD: &str = "pw-hostile-Quetzal-8812";
/// The advisory lock `migrate` and `grant` take (src/migrate/lock.rs, `MIGRATION_LOCK`).
const MIGRATION_LOCK: i64 = 0x7570_6470_6970_6531;
/// The advisory lock pruning took before migration V5.
const OLD_PRUNE_LOCK: i64 = 8463920183746501;

struct Server {
    cluster: TempCluster,
}

static SERVER: OnceCell<Server> = OnceCell::const_new();

impl Server {
    fn url(&self, role: &str) -> String {
        format!(
            "postgres://{role}:{PASSWORD}@127.0.0.1:{}/mail",
            self.cluster.port()
        )
    }

    fn config(&self, role: &str, channel: &str) -> Config {
        Config::from_url(&self.url(role))
            .unwrap()
            .with_channel(ChannelName::new(channel).unwrap())
            .with_durable(true)
            .with_listen(|l| l.with_health_interval(Duration::from_secs(1)))
    }

    async fn client(&self, role: &str) -> tokio_postgres::Client {
        let url = if role == "postgres" {
            format!("postgres://postgres@127.0.0.1:{}/mail", self.cluster.port())
        } else {
            self.url(role)
        };
        let (client, connection) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
            .await
            .unwrap_or_else(|e| panic!("connect as {role}: {e}"));
        tokio::spawn(connection);
        client
    }

    /// How many times a planted object ran, by whom; then forgets them.
    async fn hijacks(&self) -> Vec<String> {
        let admin = self.client("postgres").await;
        let rows = admin
            .query(
                "DELETE FROM public.hijack_calls RETURNING what || ' as ' || by_role",
                &[],
            )
            .await
            .unwrap();
        rows.iter().map(|r| r.get(0)).collect()
    }
}

/// Tests that lock the log against every other test's pushes hold this for writing; the
/// others for reading.
static LOG_LOCKS: tokio::sync::RwLock<()> = tokio::sync::RwLock::const_new(());

/// Objects that a statement resolving names through `schema` would run, each writing down
/// that it ran (as whom) before doing what the built-in it shadows does, or, for `unnest`,
/// nothing at all (a push through it would send nothing and report success).
fn plants(schema: &str) -> String {
    let s = schema;
    let log = |what: &str| {
        format!(
            "INSERT INTO public.hijack_calls (what, by_role) VALUES ('{what}', current_user::text);"
        )
    };
    let function = |signature: &str, returns: &str, what: &str, body: &str| {
        format!(
            "CREATE FUNCTION {s}.{signature} RETURNS {returns} LANGUAGE plpgsql AS $f$ \
             BEGIN {} {body} END $f$;",
            log(what)
        )
    };
    let operator = |op: &str, left: &str, right: &str, name: &str, body: &str| {
        format!(
            "{} CREATE OPERATOR {s}.{op} (LEFTARG = {left}, RIGHTARG = {right}, \
             FUNCTION = {s}.{name});",
            function(
                &format!("{name}(a {left}, b {right})"),
                "boolean",
                &format!("{op}({left}, {right})"),
                body
            )
        )
    };
    [
        function(
            "unnest(a text[])",
            "SETOF text",
            "unnest(text[])",
            "RETURN;",
        ),
        function(
            "unnest(a bigint[])",
            "SETOF bigint",
            "unnest(bigint[])",
            "RETURN;",
        ),
        function(
            "format(f text, a name, b name)",
            "text",
            "format(text, name, name)",
            "RETURN pg_catalog.format(f, a, b);",
        ),
        function(
            "format(f text, a text, b text)",
            "text",
            "format(text, text, text)",
            "RETURN pg_catalog.format(f, a, b);",
        ),
        function(
            "array_position(a text[], e text)",
            "integer",
            "array_position(text[], text)",
            "RETURN pg_catalog.array_position(a, e);",
        ),
        function(
            "pg_notify(c text, p text)",
            "void",
            "pg_notify(text, text)",
            "RETURN;",
        ),
        function("now()", "timestamptz", "now()", "RETURN pg_catalog.now();"),
        function(
            "octet_length(t text)",
            "integer",
            "octet_length(text)",
            "RETURN pg_catalog.octet_length(t);",
        ),
        operator(
            "=",
            "oid",
            "regclass",
            "eq_oid_regclass",
            "RETURN a OPERATOR(pg_catalog.=) b::oid;",
        ),
        operator(
            "=",
            "name",
            "text",
            "eq_name_text",
            "RETURN a::text OPERATOR(pg_catalog.=) b;",
        ),
        operator(
            "=",
            "text",
            "name",
            "eq_text_name",
            "RETURN a OPERATOR(pg_catalog.=) b::text;",
        ),
        operator(
            "<>",
            "name",
            "text",
            "ne_name_text",
            "RETURN a::text OPERATOR(pg_catalog.<>) b;",
        ),
        // || returns text, not boolean: written out.
        function(
            "cat_text_name(a text, b name)",
            "text",
            "||(text, name)",
            "RETURN a OPERATOR(pg_catalog.||) b::text;",
        ),
        format!(
            "CREATE OPERATOR {s}.|| (LEFTARG = text, RIGHTARG = name, \
             FUNCTION = {s}.cat_text_name);"
        ),
    ]
    .join("\n")
}

/// The cluster: the roles; the database `mail`, owned by the owner, where `h_mallory` may
/// create in `public` (the default on 13 and 14) and `h_eve` may create schemas; the
/// attackers' table of calls, writable by every role; their objects planted in `public`
/// and in a schema named like the owner, before anything migrates.
async fn server() -> &'static Server {
    SERVER
        .get_or_init(|| async {
            support::init_logging();
            let cluster = tokio::task::spawn_blocking(|| {
                TempCluster::builder()
                    .setting("synchronous_commit", "off")
                    .setting("password_encryption", "scram-sha-256")
                    .hba(&format!(
                        "host all {OWNER},{PUSHER},{LISTENER},{MALLORY},{EVE} 127.0.0.1/32 \
                         scram-sha-256"
                    ))
                    .start()
                    .unwrap_or_else(|e| panic!("{e}"))
            })
            .await
            .unwrap();
            let server = Server { cluster };
            let (admin, connection) = tokio_postgres::connect(
                &format!(
                    "postgres://postgres@127.0.0.1:{}/postgres",
                    server.cluster.port()
                ),
                tokio_postgres::NoTls,
            )
            .await
            .unwrap();
            tokio::spawn(connection);
            for role in [OWNER, PUSHER, LISTENER, MALLORY, EVE] {
                admin
                    .batch_execute(&format!("CREATE ROLE {role} LOGIN PASSWORD '{PASSWORD}'"))
                    .await
                    .unwrap();
            }
            for sql in [
                format!("CREATE DATABASE mail OWNER {OWNER}"),
                format!("GRANT CREATE ON DATABASE mail TO {EVE}"),
            ] {
                admin.batch_execute(&sql).await.unwrap();
            }
            server
                .client("postgres")
                .await
                .batch_execute(&format!(
                    "GRANT CREATE ON SCHEMA public TO {MALLORY}; \
                     CREATE TABLE public.hijack_calls (what text, by_role text); \
                     ALTER TABLE public.hijack_calls OWNER TO {MALLORY}; \
                     GRANT SELECT, INSERT, DELETE ON public.hijack_calls TO PUBLIC"
                ))
                .await
                .unwrap();
            server
                .client(MALLORY)
                .await
                .batch_execute(&plants("public"))
                .await
                .unwrap();
            plant_schema(&server, OWNER).await;
            server
        })
        .await
}

/// `h_eve` makes a schema named like `role`, open to every role, and plants in it.
async fn plant_schema(server: &Server, role: &str) {
    server
        .client(EVE)
        .await
        .batch_execute(&format!(
            "CREATE SCHEMA {role}; GRANT USAGE ON SCHEMA {role} TO PUBLIC; {}",
            plants(role)
        ))
        .await
        .unwrap();
}

fn cli(args: &[&str]) -> std::process::Output {
    cli_command(args).stdin(Stdio::null()).output().unwrap()
}

fn cli_command(args: &[&str]) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_updatepipe"));
    command
        .args(args)
        .env_remove("DATABASE_URL")
        .env_remove("RUST_LOG")
        .env_remove("UPDATEPIPE_SECRET_FILE");
    command
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

fn lines(stream: impl std::io::Read + Send + 'static) -> std::sync::mpsc::Receiver<String> {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stream).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    rx
}

fn update(n: u32) -> Update {
    Update::new_message(u64::from(n % 7), SeqSet::single(n).unwrap())
}

/// The updates that arrive within `window` (resyncs counted).
async fn collect(
    rx: &mut mpsc::Receiver<Event>,
    want: usize,
    window: Duration,
) -> (Vec<Update>, usize) {
    let mut updates = Vec::new();
    let mut resyncs = 0;
    let deadline = tokio::time::Instant::now() + window;
    while updates.len() < want {
        match tokio::time::timeout_at(deadline, rx.recv()).await {
            Ok(Some(Event::Update(u))) => updates.push(u),
            Ok(Some(Event::Resync(_))) => resyncs += 1,
            Ok(Some(_)) => {}
            Ok(None) | Err(_) => break,
        }
    }
    // Nothing more within a moment.
    while let Ok(Some(event)) = tokio::time::timeout(Duration::from_millis(300), rx.recv()).await {
        match event {
            Event::Update(u) => updates.push(u),
            Event::Resync(_) => resyncs += 1,
            _ => {}
        }
    }
    (updates, resyncs)
}

/// Migrated and granted by the owner with the CLI, with the objects planted (once).
async fn migrated() -> &'static Server {
    static DONE: OnceCell<()> = OnceCell::const_new();
    let server = server().await;
    DONE.get_or_init(|| async {
        // The planted objects work: a statement that leaves names to the path runs them
        // (as each victim, through `public`; as the owner, through its own-named schema
        // first) and a push through `unnest` would send nothing.
        for role in [OWNER, PUSHER, LISTENER] {
            let n: i64 = server
                .client(role)
                .await
                .query_one(
                    "SELECT count(*) FROM unnest('{a,b}'::text[]) AS t(x) \
                     WHERE to_regclass('pg_class') = 'pg_catalog.pg_class'::regclass",
                    &[],
                )
                .await
                .unwrap()
                .get(0);
            assert_eq!(n, 0, "{role}: the planted unnest did not run");
        }
        let calls = server.hijacks().await;
        assert!(
            calls
                .iter()
                .any(|c| c == &format!("unnest(text[]) as {OWNER}")),
            "{calls:?}"
        );
        let url = server.url(OWNER);
        let migrated = cli(&["migrate", "--url", &url]);
        assert!(migrated.status.success(), "{}", text(&migrated.stderr));
        assert!(
            text(&migrated.stdout).contains("applied V5__"),
            "{}",
            text(&migrated.stdout)
        );
        // After the migration, schemas named like the runtime roles too.
        plant_schema(server, PUSHER).await;
        plant_schema(server, LISTENER).await;
        let granted = cli(&[
            "grant",
            "--url",
            &url,
            "--pusher",
            PUSHER,
            "--listener",
            LISTENER,
        ]);
        assert!(granted.status.success(), "{}", text(&granted.stderr));
        let status = cli(&["status", "--url", &url, "--channel", "hostile_status"]);
        assert!(status.status.success(), "{}", text(&status.stderr));
        assert_eq!(
            server.hijacks().await,
            Vec::<String>::new(),
            "migrate, grant, status"
        );
    })
    .await;
    server
}

#[tokio::test(flavor = "multi_thread")]
async fn planted_objects_are_never_run_and_every_update_arrives() {
    let server = migrated().await;
    let _shared = LOG_LOCKS.read().await;
    // The CLI, as the listener role, durable; and as the pusher, 600 updates in one push.
    let channel = support::unique("hostile_cli");
    let mut child = cli_command(&[
        "listen",
        "--durable",
        "--channel",
        &channel,
        "--url",
        &server.url(LISTENER),
    ])
    .stdout(Stdio::piped())
    .stderr(Stdio::piped())
    .spawn()
    .unwrap();
    let out = lines(child.stdout.take().unwrap());
    let err = lines(child.stderr.take().unwrap());
    let ready = tokio::task::spawn_blocking(move || err.recv_timeout(Duration::from_secs(15)))
        .await
        .unwrap();
    assert!(
        ready.as_deref().is_ok_and(|l| l.contains("listening")),
        "{ready:?}"
    );
    let mut push = cli_command(&[
        "push",
        "--durable",
        "--channel",
        &channel,
        "--url",
        &server.url(PUSHER),
    ])
    .stdin(Stdio::piped())
    .stdout(Stdio::piped())
    .stderr(Stdio::piped())
    .spawn()
    .unwrap();
    let sent: Vec<String> = (1..=600).map(|n| update(n).to_json()).collect();
    push.stdin
        .take()
        .unwrap()
        .write_all(format!("{}\n", sent.join("\n")).as_bytes())
        .unwrap();
    let pushed = push.wait_with_output().unwrap();
    assert!(pushed.status.success(), "{}", text(&pushed.stderr));
    let printed = tokio::task::spawn_blocking(move || {
        (0..600)
            .map(|_| out.recv_timeout(Duration::from_secs(10)))
            .collect::<Result<Vec<_>, _>>()
    })
    .await
    .unwrap();
    child.kill().unwrap();
    child.wait().unwrap();
    assert_eq!(printed.expect("all 600 printed"), sent);

    // The library: a durable listener that prunes every second, and best effort.
    for durable in [true, false] {
        let channel = support::unique("hostile_lib");
        let listener = PgPipe::new(
            server
                .config(LISTENER, &channel)
                .with_durable(durable)
                .with_listen(|l| l.with_retention(Duration::from_secs(1))),
        )
        .unwrap();
        let (tx, mut rx) = mpsc::channel(2048);
        listener.listen_events(tx).await.unwrap();
        let pusher = PgPipe::new(server.config(PUSHER, &channel).with_durable(durable)).unwrap();
        let many: Vec<Update> = (1..=600).map(update).collect();
        pusher.push_many(&many).await.unwrap();
        // push_in, on the caller's own connection (the path as the server set it: the
        // attacker's schemas on it), in its transaction.
        let mut client = server.client(PUSHER).await;
        let tx = client.transaction().await.unwrap();
        pusher.push_in(&tx, &update(601)).await.unwrap();
        tx.commit().await.unwrap();
        let (got, resyncs) = collect(&mut rx, 601, Duration::from_secs(15)).await;
        let want: Vec<Update> = (1..=601).map(update).collect();
        assert!(
            got == want,
            "durable {durable}: {} of {} arrived (first {:?})",
            got.len(),
            want.len(),
            got.first()
        );
        assert_eq!(resyncs, 0, "durable {durable}");
        // Two seconds of pruning (retention 1 s): the log of this channel empties.
        if durable {
            tokio::time::sleep(Duration::from_millis(2500)).await;
            assert!(
                listener.stats().log_last_pruned.is_some(),
                "{:?}",
                listener.stats()
            );
        }
        pusher.close().await.unwrap();
        listener.close().await.unwrap();
    }
    assert_eq!(server.hijacks().await, Vec::<String>::new());
}

/// The squat: a role granted `--pusher` writes a row at a victim's next number; the
/// victim's connection is cut before its statement reaches the server (the proxy holds
/// its bytes, then closes it), so that the victim sends its batch again on a fresh
/// connection and meets that row. The push fails: every push that returns Ok is
/// delivered, with or without signing.
#[tokio::test(flavor = "multi_thread")]
async fn a_squatted_number_fails_the_push_and_every_ok_push_is_delivered() {
    let server = migrated().await;
    let _shared = LOG_LOCKS.read().await;
    for signed in [false, true] {
        let channel = support::unique("hostile_squat");
        let secrets = || vec![Secret::new("squat-test-secret-0123456789").unwrap()];
        let with_signing = |config: Config| {
            if signed {
                config.with_secrets(secrets())
            } else {
                config
            }
        };
        let listener = PgPipe::new(with_signing(server.config(LISTENER, &channel))).unwrap();
        let (tx, mut rx) = mpsc::channel(64);
        listener.listen_events(tx).await.unwrap();
        let proxy = support::proxy::Proxy::start(server.cluster.port()).await;
        let victim_url = format!(
            "postgres://{PUSHER}:{PASSWORD}@127.0.0.1:{}/mail",
            proxy.port()
        );
        let victim = PgPipe::new(with_signing(
            Config::from_url(&victim_url)
                .unwrap()
                .with_channel(ChannelName::new(&channel).unwrap())
                .with_durable(true)
                .with_push(|p| p.with_pool_size(1))
                .with_push(|p| p.with_timeout(Duration::from_secs(10))),
        ))
        .unwrap();
        victim.push(&update(1)).await.unwrap();
        // The attacker reads the victim's sender and number, and squats the next.
        let admin = server.client("postgres").await;
        let row = admin
            .query_one(
                "SELECT origin, seq, payload FROM updatepipe.log WHERE channel = $1",
                &[&channel],
            )
            .await
            .unwrap();
        let (origin, seq, payload): (String, i64, String) = (row.get(0), row.get(1), row.get(2));
        // The same envelope, numbered as the squatted row, another update in it.
        let forged = payload
            .replace(&format!(",\"s\":{seq},"), &format!(",\"s\":{},", seq + 1))
            .replace("\"SeqSet\":\"1\"", "\"SeqSet\":\"666\"");
        assert_ne!(forged, payload);
        server
            .client(PUSHER)
            .await
            .execute(
                "INSERT INTO updatepipe.log (channel, origin, seq, payload) VALUES ($1, $2, $3, $4)",
                &[&channel, &origin, &(seq + 1), &forged],
            )
            .await
            .unwrap();
        // The victim's next push: its bytes held, its connection cut, sent again.
        proxy.hold();
        let pushing = {
            let victim = victim.clone();
            tokio::spawn(async move { victim.push(&update(2)).await })
        };
        for _ in 0..200 {
            if proxy.held() > 0 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert!(
            proxy.held() > 0,
            "the push's statement never reached the proxy"
        );
        proxy.cut_open();
        proxy.up();
        let outcome = pushing.await.unwrap();
        assert!(
            matches!(outcome, Err(Error::NumbersTaken { seq: s }) if s == (seq + 1) as u64),
            "signed {signed}: {outcome:?}"
        );
        assert_eq!(victim.stats().push_numbers_taken, 1);
        // The next push takes fresh numbers and is delivered.
        victim.push(&update(3)).await.unwrap();
        let (got, _) = collect(&mut rx, 2, Duration::from_secs(10)).await;
        let forged_update = Update::new_message(1, SeqSet::single(666).unwrap());
        if signed {
            // The squatted row is refused as forged.
            assert_eq!(got, [update(1), update(3)], "signed");
            assert!(
                listener.stats().rejected_for("forged") >= 1,
                "{:?}",
                listener.stats()
            );
        } else {
            // Without signing the squatted row is delivered as its writer wrote it: what
            // signing is for. The victim's push returned an error, and is not among them.
            assert_eq!(got, [update(1), forged_update, update(3)], "unsigned");
        }
        victim.close().await.unwrap();
        listener.close().await.unwrap();
    }
}

/// A push whose first try committed, but whose answer was lost with its connection, is
/// sent again, meets its own rows, and is Ok (the log holds exactly what it sent): it needs
/// the pusher's EXECUTE on `updatepipe.logged`.
#[tokio::test(flavor = "multi_thread")]
async fn a_push_whose_first_try_committed_is_ok_after_all() {
    let server = migrated().await;
    let _alone = LOG_LOCKS.write().await;
    let channel = support::unique("hostile_retry");
    let listener = PgPipe::new(server.config(LISTENER, &channel)).unwrap();
    let (tx, mut rx) = mpsc::channel(64);
    listener.listen_events(tx).await.unwrap();
    let proxy = support::proxy::Proxy::start(server.cluster.port()).await;
    let victim = PgPipe::new(
        Config::from_url(&format!(
            "postgres://{PUSHER}:{PASSWORD}@127.0.0.1:{}/mail",
            proxy.port()
        ))
        .unwrap()
        .with_channel(ChannelName::new(&channel).unwrap())
        .with_durable(true)
        .with_push(|p| p.with_pool_size(1))
        .with_push(|p| p.with_timeout(Duration::from_secs(20)))
        .with_application_name("hostile_retry_victim"),
    )
    .unwrap();
    victim.push(&update(1)).await.unwrap();
    // The log locked against inserts: the victim's statement reaches the server and waits.
    let mut admin = server.client("postgres").await;
    let lock = admin.transaction().await.unwrap();
    lock.batch_execute("LOCK TABLE updatepipe.log IN SHARE MODE")
        .await
        .unwrap();
    let pushing = {
        let victim = victim.clone();
        tokio::spawn(async move { victim.push(&update(2)).await })
    };
    let watcher = server.client("postgres").await;
    let mut waiting = 0;
    for _ in 0..500 {
        waiting = watcher
            .query_one(
                "SELECT count(*) FROM pg_stat_activity \
                 WHERE application_name = 'hostile_retry_victim' AND wait_event_type = 'Lock'",
                &[],
            )
            .await
            .unwrap()
            .get::<_, i64>(0);
        if waiting > 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(waiting, 1, "the push never waited on the lock");
    // Its connection cut while it waits: the backend goes on and commits once the lock is
    // gone, but the answer is lost; the push is sent again on a new connection.
    proxy.cut_open();
    tokio::time::sleep(Duration::from_millis(300)).await;
    lock.commit().await.unwrap();
    let outcome = pushing.await.unwrap();
    assert!(outcome.is_ok(), "{outcome:?}");
    let (got, resyncs) = collect(&mut rx, 2, Duration::from_secs(10)).await;
    assert_eq!(got, [update(1), update(2)], "exactly once");
    assert_eq!(resyncs, 0);
    assert_eq!(victim.stats().push_numbers_taken, 0);
    victim.close().await.unwrap();
    listener.close().await.unwrap();
}

/// Locks any role can take: the migration lock held by a role that may only connect makes
/// `migrate` and `grant` fail within their bound, naming the session; the advisory lock
/// pruning took before V5 no longer stops it.
#[tokio::test(flavor = "multi_thread")]
async fn held_locks_are_named_within_their_bound_and_do_not_stop_pruning() {
    let server = migrated().await;
    let _shared = LOG_LOCKS.read().await;
    let holder = server.client(MALLORY).await;
    let pid: i32 = holder
        .query_one("SELECT pg_backend_pid()", &[])
        .await
        .unwrap()
        .get(0);
    holder
        .execute("SELECT pg_advisory_lock($1)", &[&MIGRATION_LOCK])
        .await
        .unwrap();
    holder
        .execute("SELECT pg_advisory_lock($1)", &[&OLD_PRUNE_LOCK])
        .await
        .unwrap();
    let url = server.url(OWNER);
    for args in [
        vec!["migrate", "--url", &url, "--lock-wait", "1"],
        vec![
            "grant",
            "--url",
            &url,
            "--listener",
            LISTENER,
            "--lock-wait",
            "1",
        ],
    ] {
        let started = std::time::Instant::now();
        let out = tokio::task::spawn_blocking({
            let args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
            move || {
                let args: Vec<&str> = args.iter().map(String::as_str).collect();
                cli(&args)
            }
        })
        .await
        .unwrap();
        let message = text(&out.stderr);
        assert_eq!(out.status.code(), Some(4), "{args:?}: {message}");
        assert!(
            message.contains("the migration lock") && message.contains(&format!("pid {pid}")),
            "{message}"
        );
        assert!(message.contains(MALLORY), "{message}");
        // The bound is 1 s; the rest is the process's start and connection.
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "{:?}",
            started.elapsed()
        );
        eprintln!(
            "{} behind a held migration lock, --lock-wait 1: exit 4 after {:?}",
            args[0],
            started.elapsed()
        );
    }
    // Pruning goes on: a durable listener with a retention of one second empties the log.
    let channel = support::unique("hostile_prune");
    let listener = PgPipe::new(
        server
            .config(LISTENER, &channel)
            .with_listen(|l| l.with_retention(Duration::from_secs(1))),
    )
    .unwrap();
    let (tx, _rx) = mpsc::channel(64);
    listener.listen_events(tx).await.unwrap();
    let pusher = PgPipe::new(server.config(PUSHER, &channel)).unwrap();
    pusher.push(&update(1)).await.unwrap();
    let admin = server.client("postgres").await;
    let left = support::pruned_within(&admin, &channel, Duration::from_secs(10)).await;
    assert_eq!(left, 0, "pruning stopped");
    assert!(listener.stats().log_pruned >= 1, "{:?}", listener.stats());
    // And the listener role can no longer take the log's lock or write the marks.
    let mut as_listener = server.client(LISTENER).await;
    for sql in [
        "LOCK TABLE updatepipe.log IN EXCLUSIVE MODE",
        "UPDATE updatepipe.pruned SET pruned_before = 'infinity'",
        "DELETE FROM updatepipe.log",
        "SELECT 1 FROM updatepipe.pruned FOR UPDATE",
    ] {
        let tx = as_listener.transaction().await.unwrap();
        let err = tx.batch_execute(sql).await.unwrap_err();
        drop(tx);
        assert_eq!(
            err.code(),
            Some(&tokio_postgres::error::SqlState::INSUFFICIENT_PRIVILEGE),
            "{sql}: {err}"
        );
    }
    // Nor pin a far-future mark through the function: a negative retention or hold is
    // refused.
    for args in ["-1e9, 1", "1, -1e9", "'NaN', 1", "1, 'Infinity'"] {
        let err = as_listener
            .execute(
                &format!("SELECT * FROM updatepipe.prune($1, {args})"),
                &[&channel],
            )
            .await
            .unwrap_err();
        assert_eq!(
            err.code(),
            Some(&tokio_postgres::error::SqlState::INVALID_PARAMETER_VALUE),
            "{args}: {err}"
        );
    }
    pusher.close().await.unwrap();
    listener.close().await.unwrap();
    drop(holder);
}

/// Raises this process's soft limit on open files to at most `want` (the test opens over a
/// thousand connections); returns the limit now.
fn raise_file_limit(want: u64) -> u64 {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE).unwrap();
    let target = want.min(hard);
    if soft < target {
        setrlimit(Resource::RLIMIT_NOFILE, target, hard).unwrap();
    }
    getrlimit(Resource::RLIMIT_NOFILE).unwrap().0
}

/// One request to the metrics port: its status line, or what stopped it (a refusal, a
/// reset, no answer within the timeout).
fn get_metrics(port: u16) -> Result<(String, String), String> {
    use std::io::Read;
    let mut stream =
        std::net::TcpStream::connect(("127.0.0.1", port)).map_err(|e| e.to_string())?;
    stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    stream
        .write_all(b"GET /metrics HTTP/1.1\r\nhost: localhost\r\n\r\n")
        .map_err(|e| e.to_string())?;
    let mut response = String::new();
    match stream.read_to_string(&mut response) {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
            return Err("no answer within 5 s".into());
        }
        Err(e) if e.kind() == std::io::ErrorKind::TimedOut => {
            return Err("no answer within 5 s".into());
        }
        Err(e) => return Err(e.to_string()),
    }
    let status = response.lines().next().unwrap_or("").to_owned();
    Ok((status, response))
}

/// The metrics port cannot starve the listener: with a descriptor limit of 1,024 and 1,100
/// idle connections on the port, the listener reconnects at once after its backend is
/// ended and delivers again, the port answers or refuses (never hangs), answers again once
/// the idle connections are gone, and the log stays short.
#[tokio::test(flavor = "multi_thread")]
async fn idle_clients_of_the_metrics_port_cannot_starve_the_listener() {
    let server = migrated().await;
    let _shared = LOG_LOCKS.read().await;
    let idle = 1_100usize;
    let limit = raise_file_limit(4_096);
    assert!(
        limit > idle as u64 + 100,
        "this test opens {idle} connections: raise the hard limit on open files (now {limit})"
    );
    let port = {
        let probe = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        probe.local_addr().unwrap().port()
    };
    let channel = support::unique("hostile_metrics");
    let url = format!("{}?application_name=hostile_metrics", server.url(LISTENER));
    let mut child = Command::new("sh")
        .args(["-c", "ulimit -n 1024 && exec \"$0\" \"$@\""])
        .arg(env!("CARGO_BIN_EXE_updatepipe"))
        .args(["listen", "--url", &url, "--channel", &channel])
        .args(["--metrics", &format!("127.0.0.1:{port}")])
        .env_remove("DATABASE_URL")
        .env_remove("RUST_LOG")
        .env_remove("UPDATEPIPE_SECRET_FILE")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let out = lines(child.stdout.take().unwrap());
    let err = lines(child.stderr.take().unwrap());
    let mut said = Vec::new();
    let mut wait_for = |what: &str, within: Duration| {
        let deadline = std::time::Instant::now() + within;
        while let Some(left) = deadline.checked_duration_since(std::time::Instant::now()) {
            match err.recv_timeout(left) {
                Ok(line) => {
                    let found = line.contains(what);
                    said.push(line);
                    if found {
                        return;
                    }
                }
                Err(_) => break,
            }
        }
        panic!("no {what:?} within {within:?}: {said:?}");
    };
    wait_for("listening", Duration::from_secs(15));
    let connections: Vec<std::net::TcpStream> = (0..idle)
        .filter_map(|_| std::net::TcpStream::connect(("127.0.0.1", port)).ok())
        .collect();
    let connections_made = connections.len();
    assert!(
        connections_made >= idle - 10,
        "{connections_made} connected"
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    // Meanwhile the port answers or refuses at once.
    let during = tokio::task::spawn_blocking(move || get_metrics(port))
        .await
        .unwrap();
    if let Ok((status, _)) = &during {
        assert!(
            status.starts_with("HTTP/1.1 200") || status.starts_with("HTTP/1.1 503"),
            "{status}"
        );
    } else if let Err(e) = &during {
        assert!(!e.contains("no answer"), "{e}");
    }
    // The listener's backend ended: it reconnects, and delivers again.
    let admin = server.client("postgres").await;
    let ended: i64 = admin
        .query_one(
            "SELECT count(*) FROM (SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
             WHERE application_name = 'hostile_metrics/listen') t",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(ended, 1);
    let terminated = std::time::Instant::now();
    wait_for("disconnected", Duration::from_secs(10));
    wait_for("listening", Duration::from_secs(10));
    let back_after = terminated.elapsed();
    let pusher = PgPipe::new(server.config(PUSHER, &channel).with_durable(false)).unwrap();
    pusher.push(&update(1)).await.unwrap();
    pusher.close().await.unwrap();
    let printed = tokio::task::spawn_blocking(move || out.recv_timeout(Duration::from_secs(10)))
        .await
        .unwrap();
    assert_eq!(printed.as_deref(), Ok(update(1).to_json().as_str()));
    // Once the idle connections are gone (closed by their header deadline, or by their
    // clients), the port answers.
    drop(connections);
    tokio::time::sleep(Duration::from_secs(4)).await;
    let (status, body) = tokio::task::spawn_blocking(move || get_metrics(port))
        .await
        .unwrap()
        .expect("the port answers");
    assert!(status.starts_with("HTTP/1.1 200"), "{status}");
    assert!(body.contains("updatepipe_delivered_total"), "{body}");
    child.kill().unwrap();
    child.wait().unwrap();
    while let Ok(line) = err.recv_timeout(Duration::from_millis(200)) {
        said.push(line);
    }
    assert!(said.len() <= 20, "{} lines: {said:?}", said.len());
    eprintln!(
        "{} idle connections: listening again {back_after:?} after its backend was ended; \
         during them the port answered {:?}; {} lines on stderr",
        connections_made,
        during.map(|(status, _)| status),
        said.len()
    );
}
