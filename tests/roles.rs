//! The role model against a real server, with real roles: an owner that migrates and grants,
//! a pusher and a listener that hold exactly what `updatepipe grant` gives them, all logging
//! in with scram-sha-256 passwords. The runtime roles run durable mode (library and CLI),
//! create nothing, cannot migrate, and cannot make a log row lie about itself.

mod support;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::Duration;

use tokio::sync::{OnceCell, mpsc};
use tokio_postgres::error::SqlState;
use updatepipe::cluster::TempCluster;
use updatepipe::{
    ChannelName, Config, Error, Event, PgPipe, Role, SeqSet, Update, UpdatePipe,
    embedded_migrations, grant_statements,
};

const OWNER: &str = "up_owner";
const PUSHER: &str = "up_pusher";
const LISTENER: &str = "up_listener";
/// A role holding `INSERT` on the whole log table, as earlier docs told operators to grant.
const WIDE_PUSHER: &str = "up_wide_pusher";
/// A role that may connect and was granted nothing.
const STRANGER: &str = "up_stranger";
/// The group whose members (one per privilege left out) log in with a password too.
const LACKING: &str = "up_lacking";
/// The advisory lock `migrate` and `grant` take (src/migrate.rs, `MIGRATION_LOCK`).
const GRANT_LOCK: i64 = 0x7570_6470_6970_6531;
const PASSWORD: &str = "pw-roles-Ahuizotl-5521";

struct Server {
    cluster: TempCluster,
}

static SERVER: OnceCell<Server> = OnceCell::const_new();

impl Server {
    fn url(&self, role: &str, database: &str) -> String {
        format!(
            "postgres://{role}:{PASSWORD}@127.0.0.1:{}/{database}",
            self.cluster.port()
        )
    }

    fn config(&self, role: &str, channel: &str) -> Config {
        Config::from_url(&self.url(role, "mail"))
            .unwrap()
            .with_channel(ChannelName::new(channel).unwrap())
            .with_durable(true)
            .with_listen(|l| l.with_health_interval(Duration::from_secs(1)))
    }

    /// A client as `role` (the superuser `postgres` logs in without a password).
    async fn client(&self, role: &str, database: &str) -> tokio_postgres::Client {
        let url = if role == "postgres" {
            format!(
                "postgres://postgres@127.0.0.1:{}/{database}",
                self.cluster.port()
            )
        } else {
            self.url(role, database)
        };
        let (client, connection) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
            .await
            .unwrap_or_else(|e| panic!("connect as {role}: {e}"));
        tokio::spawn(connection);
        client
    }
}

/// The cluster, with the roles, the database `mail` owned by the owner, migrated and granted
/// by the owner with the CLI; and `fresh`, owned by the owner and not migrated.
async fn server() -> &'static Server {
    SERVER
        .get_or_init(|| async {
            support::init_logging();
            let cluster = tokio::task::spawn_blocking(|| {
                TempCluster::builder()
                    .setting("synchronous_commit", "off")
                    .setting("password_encryption", "scram-sha-256")
                    .hba(&format!(
                        "host all {OWNER},{PUSHER},{LISTENER},{WIDE_PUSHER},{STRANGER},\
                         +{LACKING} 127.0.0.1/32 scram-sha-256"
                    ))
                    .start()
                    .unwrap_or_else(|e| panic!("{e}"))
            })
            .await
            .unwrap();
            let server = Server { cluster };
            let admin = server.client("postgres", "postgres").await;
            for role in [OWNER, PUSHER, LISTENER, WIDE_PUSHER, STRANGER] {
                admin
                    .batch_execute(&format!("CREATE ROLE {role} LOGIN PASSWORD '{PASSWORD}'"))
                    .await
                    .unwrap();
            }
            admin
                .batch_execute(&format!("CREATE ROLE {LACKING} NOLOGIN"))
                .await
                .unwrap();
            for db in ["mail", "fresh"] {
                admin
                    .batch_execute(&format!("CREATE DATABASE {db} OWNER up_owner"))
                    .await
                    .unwrap();
            }
            // As on any PostgreSQL 15+: ordinary roles may not create in `public`.
            for db in ["mail", "fresh"] {
                server
                    .client("postgres", db)
                    .await
                    .batch_execute("REVOKE CREATE ON SCHEMA public FROM PUBLIC")
                    .await
                    .unwrap();
            }
            let url = server.url(OWNER, "mail");
            let migrated = cli(&["migrate", "--url", &url]);
            assert!(migrated.status.success(), "{}", text(&migrated.stderr));
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
            // The wide pusher: INSERT on every column, as the docs said before the grant
            // command; plus what the pusher has.
            let owner = server.client(OWNER, "mail").await;
            owner
                .batch_execute(
                    "GRANT USAGE ON SCHEMA updatepipe TO up_wide_pusher; \
                     GRANT INSERT ON updatepipe.log TO up_wide_pusher; \
                     GRANT SELECT ON updatepipe.schema_history TO up_wide_pusher",
                )
                .await
                .unwrap();
            server
        })
        .await
}

fn cli(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_updatepipe"))
        .args(args)
        .env_remove("DATABASE_URL")
        .env_remove("RUST_LOG")
        .stdin(Stdio::null())
        .output()
        .unwrap()
}

/// Lines of a child's stream, readable with a timeout.
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

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

fn sqlstate(e: &tokio_postgres::Error) -> Option<&SqlState> {
    e.code()
}

/// Updates and resyncs received within `window`.
async fn collect(rx: &mut mpsc::Receiver<Event>, window: Duration) -> (Vec<Update>, usize) {
    let mut updates = Vec::new();
    let mut resyncs = 0;
    let deadline = tokio::time::Instant::now() + window;
    while let Ok(Some(event)) = tokio::time::timeout_at(deadline, rx.recv()).await {
        match event {
            Event::Update(u) => updates.push(u),
            Event::Resync(_) => resyncs += 1,
            _ => {}
        }
    }
    (updates, resyncs)
}

fn update(n: u32) -> Update {
    Update::new_message(n as u64, SeqSet::single(n).unwrap())
}

#[tokio::test(flavor = "multi_thread")]
async fn runtime_roles_create_nothing_and_only_the_owner_migrates() {
    let server = server().await;
    for role in [PUSHER, LISTENER] {
        let client = server.client(role, "mail").await;
        for sql in [
            "CREATE TABLE updatepipe.t (x int)",
            "CREATE TABLE public.t (x int)",
            "CREATE TABLE t (x int)",
            "CREATE SCHEMA s",
            "CREATE FUNCTION updatepipe.f() RETURNS int LANGUAGE sql AS 'SELECT 1'",
        ] {
            let err = client.batch_execute(sql).await.unwrap_err();
            assert_eq!(
                sqlstate(&err),
                Some(&SqlState::INSUFFICIENT_PRIVILEGE),
                "{role}: {sql}: {err}"
            );
        }
        // Neither migrates, through the library or the CLI; the owner did (setup).
        let pipe = PgPipe::new(server.config(role, "nothing")).unwrap();
        assert!(pipe.migrate().await.is_err(), "{role} migrated");
        assert_eq!(
            pipe.check_schema().await.unwrap(),
            embedded_migrations().len() as i64
        );
        pipe.close().await.unwrap();
        let out = cli(&["migrate", "--url", &server.url(role, "mail")]);
        assert_eq!(out.status.code(), Some(4), "{}", text(&out.stderr));
    }
    // The pusher holds the log's own columns and no more: not the server-set ones, no read,
    // no delete, nothing on `pruned`.
    let pusher = server.client(PUSHER, "mail").await;
    for sql in [
        "INSERT INTO updatepipe.log (channel, origin, seq, payload, xid) \
         VALUES ('c', 'o', 1, 'p', '1')",
        "INSERT INTO updatepipe.log (channel, origin, seq, payload, created_at) \
         VALUES ('c', 'o', 1, 'p', now())",
        "INSERT INTO updatepipe.log (id, channel, origin, seq, payload) OVERRIDING SYSTEM VALUE \
         VALUES (1, 'c', 'o', 1, 'p')",
        "SELECT * FROM updatepipe.log",
        "DELETE FROM updatepipe.log",
        "UPDATE updatepipe.pruned SET pruned_xid = NULL",
        "SELECT nextval('updatepipe.log_id_seq')",
    ] {
        let err = pusher.batch_execute(sql).await.unwrap_err();
        assert_eq!(
            sqlstate(&err),
            Some(&SqlState::INSUFFICIENT_PRIVILEGE),
            "{sql}: {err}"
        );
    }
    // The listener writes nothing to the log.
    let listener = server.client(LISTENER, "mail").await;
    for sql in [
        "INSERT INTO updatepipe.log (channel, origin, seq, payload) VALUES ('c', 'o', 1, 'p')",
        "UPDATE updatepipe.log SET seq = 1",
    ] {
        let err = listener.batch_execute(sql).await.unwrap_err();
        assert_eq!(
            sqlstate(&err),
            Some(&SqlState::INSUFFICIENT_PRIVILEGE),
            "{sql}: {err}"
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn grant_is_idempotent_prints_its_sql_and_refuses_unknown_roles() {
    let server = server().await;
    let url = server.url(OWNER, "mail");
    let dry = cli(&[
        "grant",
        "--url",
        &url,
        "--pusher",
        "Mail \"Admin\"",
        "--dry-run",
    ]);
    assert!(dry.status.success(), "{}", text(&dry.stderr));
    let sql = text(&dry.stdout);
    assert!(
        sql.contains(
            "GRANT INSERT (channel, origin, seq, payload) ON updatepipe.log \
             TO \"Mail \"\"Admin\"\"\";"
        ),
        "{sql}"
    );
    let again = cli(&[
        "grant",
        "--url",
        &url,
        "--pusher",
        PUSHER,
        "--listener",
        LISTENER,
    ]);
    assert!(again.status.success(), "{}", text(&again.stderr));
    let unknown = cli(&[
        "grant",
        "--url",
        &url,
        "--listener",
        LISTENER,
        "--pusher",
        "nobody",
    ]);
    assert_eq!(unknown.status.code(), Some(2));
    let err = text(&unknown.stderr);
    assert!(err.contains("role \"nobody\" does not exist"), "{err}");
    assert_eq!(err.lines().count(), 1, "{err}");
    // Only the owner grants.
    let by_pusher = cli(&[
        "grant",
        "--url",
        &server.url(PUSHER, "mail"),
        "--pusher",
        LISTENER,
    ]);
    assert_eq!(
        by_pusher.status.code(),
        Some(4),
        "{}",
        text(&by_pusher.stderr)
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn the_runtime_roles_run_durable_mode_through_the_library_and_the_cli() {
    let server = server().await;
    let channel = support::unique("roles_durable");
    // The library: a durable listener as the listener role, with pruning every second.
    let listener = PgPipe::new(
        server
            .config(LISTENER, &channel)
            .with_listen(|l| l.with_retention(Duration::from_secs(2))),
    )
    .unwrap();
    let (tx, mut rx) = mpsc::channel(64);
    listener.listen_events(tx).await.unwrap();
    // The CLI listener, as the listener role.
    let mut child = Command::new(env!("CARGO_BIN_EXE_updatepipe"))
        .args(["listen", "--durable", "--channel", &channel])
        .args(["--url", &server.url(LISTENER, "mail")])
        .env_remove("DATABASE_URL")
        .env_remove("RUST_LOG")
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

    let pusher = PgPipe::new(server.config(PUSHER, &channel)).unwrap();
    pusher.init_push().await.unwrap();
    pusher.push(&update(1)).await.unwrap();
    // The CLI, as the pusher role.
    let pushed = cli(&[
        "push",
        "--durable",
        "--url",
        &server.url(PUSHER, "mail"),
        "--channel",
        &channel,
        &update(2).to_json(),
    ]);
    assert!(pushed.status.success(), "{}", text(&pushed.stderr));
    let (got, resyncs) = collect(&mut rx, Duration::from_secs(2)).await;
    assert_eq!(got, [update(1), update(2)]);
    assert_eq!(resyncs, 0);
    let printed = tokio::task::spawn_blocking(move || {
        (0..2)
            .map(|_| out.recv_timeout(Duration::from_secs(10)))
            .collect::<Result<Vec<_>, _>>()
    })
    .await
    .unwrap();
    child.kill().unwrap();
    child.wait().unwrap();
    assert_eq!(
        printed.expect("the CLI listener prints both updates"),
        [update(1).to_json(), update(2).to_json()]
    );

    // The listener role pruned (retention 2 s): the log of this channel empties, and
    // `pruned` says how far.
    let admin = server.client("postgres", "mail").await;
    let left = support::pruned_within(&admin, &channel, Duration::from_secs(10)).await;
    assert_eq!(left, 0, "the listener role did not prune");
    let pruned: i64 = admin
        .query_one(
            "SELECT count(*) FROM updatepipe.pruned WHERE channel = $1",
            &[&channel],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(pruned, 1);
    // It still listens: pruning failed on no privilege.
    pusher.push(&update(3)).await.unwrap();
    let (got, _) = collect(&mut rx, Duration::from_secs(2)).await;
    assert_eq!(got, [update(3)]);
    listener.close().await.unwrap();
    pusher.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn an_unmigrated_schema_is_one_line_naming_the_command_and_role() {
    let server = server().await;
    let url = server.url(PUSHER, "fresh");
    for args in [
        vec!["push", "--durable", "--url", &url, r#"{"Type":3,"Key":1}"#],
        vec!["listen", "--durable", "--url", &url],
    ] {
        let out = cli(&args);
        let err = text(&out.stderr);
        assert_eq!(out.status.code(), Some(4), "{args:?}: {err}");
        assert_eq!(
            err.trim_end(),
            format!(
                "updatepipe: the updatepipe schema is not migrated, this build needs {}: run \
                 `updatepipe migrate` as the schema's owner",
                embedded_migrations().len()
            ),
            "{args:?}"
        );
    }
    // The library: the check, and a durable pusher and listener fail early with it.
    let config = Config::from_url(&url).unwrap().with_durable(true);
    let pipe = PgPipe::new(config).unwrap();
    let needed = embedded_migrations().len() as i64;
    for err in [
        pipe.check_schema().await.unwrap_err(),
        pipe.push(&update(1)).await.unwrap_err(),
        pipe.listen(mpsc::channel(1).0).await.unwrap_err(),
    ] {
        assert!(
            matches!(err, Error::SchemaOutdated { found: None, needed: n } if n == needed),
            "{err:?}"
        );
    }
    pipe.close().await.unwrap();
    // A role granted nothing, on a migrated schema: told to get the grants.
    let stranger = PgPipe::new(server.config(STRANGER, "stranger")).unwrap();
    let err = stranger.push(&update(1)).await.unwrap_err();
    assert!(
        matches!(&err, Error::SchemaNotGranted { role } if role == STRANGER),
        "{err:?}"
    );
    assert!(
        err.to_string()
            .contains("updatepipe grant --pusher up_stranger"),
        "{err}"
    );
    stranger.close().await.unwrap();
    let out = cli(&[
        "listen",
        "--durable",
        "--url",
        &server.url(STRANGER, "mail"),
    ]);
    assert_eq!(out.status.code(), Some(4), "{}", text(&out.stderr));
    // Best effort needs no schema.
    let best_effort = PgPipe::new(Config::from_url(&url).unwrap()).unwrap();
    best_effort.push(&update(1)).await.unwrap();
    best_effort.close().await.unwrap();
}

/// A deployment made by a release before this one: migrated to V3, its history in
/// `public`, with rows that lie (written before the server set them), and a listener
/// granted what releases before V5 granted (DELETE on the log, writes on the marks).
/// `migrate` moves the history, applies V4 and V5, removes the lying rows and takes the
/// listener's write privileges back.
#[tokio::test(flavor = "multi_thread")]
async fn an_old_deployment_is_upgraded_by_migrate() {
    mod old {
        refinery::embed_migrations!("migrations");
    }
    let server = server().await;
    let admin = server.client("postgres", "postgres").await;
    admin
        .batch_execute("CREATE DATABASE old OWNER up_owner")
        .await
        .unwrap();
    let mut owner = server.client(OWNER, "old").await;
    old::migrations::runner()
        .set_target(refinery::Target::Version(3))
        .set_migration_table_name("updatepipe_schema_history")
        .run_async(&mut owner)
        .await
        .unwrap();
    owner
        .batch_execute(
            "INSERT INTO updatepipe.log (channel, origin, seq, payload) \
                 VALUES ('c', 'real', 1, 'p'); \
             INSERT INTO updatepipe.log (channel, origin, seq, payload, xid) \
                 VALUES ('c', 'future_xid', 1, 'p', \
                         (pg_current_xact_id()::text::int8 + 1000000)::text::xid8); \
             INSERT INTO updatepipe.log (id, channel, origin, seq, payload) \
                 OVERRIDING SYSTEM VALUE \
                 VALUES (1000, 'c', 'next_id', 1, 'p'); \
             INSERT INTO updatepipe.log (channel, origin, seq, payload, created_at) \
                 VALUES ('c', 'future_time', 1, 'p', '2999-01-01'); \
             GRANT USAGE ON SCHEMA updatepipe TO up_listener; \
             GRANT SELECT, DELETE ON updatepipe.log TO up_listener; \
             GRANT SELECT, INSERT, UPDATE ON updatepipe.pruned TO up_listener",
        )
        .await
        .unwrap();
    let url = server.url(OWNER, "old");
    let pipe = PgPipe::new(Config::from_url(&url).unwrap().with_durable(true)).unwrap();
    // Not yet upgraded: the status and the check read the old place.
    assert_eq!(pipe.status().await.unwrap().schema_version, Some(3));
    let err = pipe.check_schema().await.unwrap_err();
    assert!(
        matches!(err, Error::SchemaOutdated { found: Some(3), .. }),
        "{err:?}"
    );
    assert!(
        err.to_string()
            .starts_with("the updatepipe schema is at version 3, this build needs 6"),
        "{err}"
    );
    let applied = pipe.migrate().await.unwrap();
    let versions: Vec<i64> = applied.iter().map(|m| m.version()).collect();
    assert_eq!(versions, [4, 5, 6], "{applied:?}");
    assert_eq!(pipe.check_schema().await.unwrap(), 6);
    let row = owner
        .query_one(
            "SELECT to_regclass('public.updatepipe_schema_history') IS NULL, \
                    (SELECT count(*) FROM updatepipe.schema_history), \
                    (SELECT string_agg(origin, ',') FROM updatepipe.log), \
                    has_table_privilege('up_listener', 'updatepipe.log', 'DELETE') \
                    OR has_table_privilege('up_listener', 'updatepipe.pruned', 'INSERT') \
                    OR has_table_privilege('up_listener', 'updatepipe.pruned', 'UPDATE'), \
                    has_table_privilege('up_listener', 'updatepipe.log', 'SELECT')",
            &[],
        )
        .await
        .unwrap();
    assert!(row.get::<_, bool>(0), "the old history table is left");
    assert_eq!(row.get::<_, i64>(1), 6);
    assert_eq!(row.get::<_, String>(2), "real");
    assert!(
        !row.get::<_, bool>(3),
        "V5 left a listener its write privileges"
    );
    assert!(row.get::<_, bool>(4), "V5 took a listener's reading");
    // And a durable push works on the upgraded schema.
    pipe.push(&update(1)).await.unwrap();
    assert!(pipe.migrate().await.unwrap().is_empty());
    pipe.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn log_rows_written_by_any_inserting_role_cannot_lie() {
    let server = server().await;
    let channel = support::unique("roles_forged");
    let source = support::unique("roles_source");
    let listener = PgPipe::new(server.config(LISTENER, &channel)).unwrap();
    let (tx, mut rx) = mpsc::channel(64);
    listener.listen_events(tx).await.unwrap();

    // Real envelopes to copy: pushed durably on another channel (no signing: an unsigned
    // row whose origin and number are its envelope's is accepted).
    let copied = PgPipe::new(server.config(PUSHER, &source)).unwrap();
    for n in 1..=4 {
        copied.push(&update(n)).await.unwrap();
    }
    copied.close().await.unwrap();
    let admin = server.client("postgres", "mail").await;
    let rows = admin
        .query(
            "SELECT origin, seq, payload FROM updatepipe.log WHERE channel = $1 ORDER BY id",
            &[&source],
        )
        .await
        .unwrap();
    assert_eq!(rows.len(), 4);
    let (origin, seqs, payloads): (String, Vec<i64>, Vec<String>) = (
        rows[0].get(0),
        rows.iter().map(|r| r.get(1)).collect(),
        rows.iter().map(|r| r.get(2)).collect(),
    );

    // As a role with INSERT on every column: a future xid, a far-future and a past
    // created_at, ids at the identity's next values.
    let wide = server.client(WIDE_PUSHER, "mail").await;
    let insert = |extra_cols: &str, extra_vals: &str, overriding: &str| {
        format!(
            "INSERT INTO updatepipe.log (channel, origin, seq, payload{extra_cols}) {overriding} \
             VALUES ($1, $2, $3, $4{extra_vals})"
        )
    };
    // The identity's next values, which an attacker can watch grow from its own rows.
    let next: i64 = admin
        .query_one("SELECT last_value + 1 FROM updatepipe.log_id_seq", &[])
        .await
        .unwrap()
        .get(0);
    let forged = [
        insert(
            ", xid",
            ", (pg_current_xact_id()::text::int8 + 1000000)::text::xid8",
            "",
        ),
        insert(", created_at", ", '2999-01-01'", ""),
        insert(", created_at", ", '1971-01-01'", ""),
        insert(", id", &format!(", {next}"), "OVERRIDING SYSTEM VALUE"),
    ];
    for (i, sql) in forged.iter().enumerate() {
        wide.execute(sql.as_str(), &[&channel, &origin, &seqs[i], &payloads[i]])
            .await
            .unwrap_or_else(|e| panic!("{sql}: {e}"));
    }
    // More rows at the next ids; every sender's durable pushes must go on.
    for k in 1..=20i64 {
        wide.execute(
            "INSERT INTO updatepipe.log (id, channel, origin, seq, payload) \
             OVERRIDING SYSTEM VALUE \
             VALUES ($1, $2, 'squatter', $3, 'x')",
            &[&(next + k), &format!("{channel}_other"), &k],
        )
        .await
        .unwrap();
    }
    let real = PgPipe::new(server.config(PUSHER, &channel)).unwrap();
    for n in 10..15 {
        real.push(&update(n)).await.unwrap();
    }
    // Oversize rows are refused, by any inserting role, with a clear error.
    let huge = format!("{{\"v\":1,\"x\":\"{}\"}}", "a".repeat(1_200_000));
    for client in [&wide, &server.client(PUSHER, "mail").await] {
        let err = client
            .execute(
                "INSERT INTO updatepipe.log (channel, origin, seq, payload) \
                 VALUES ($1, 'o', 99, $2)",
                &[&channel, &huge],
            )
            .await
            .unwrap_err();
        assert_eq!(
            sqlstate(&err),
            Some(&SqlState::PROGRAM_LIMIT_EXCEEDED),
            "{err}"
        );
        let message = err.as_db_error().unwrap().message().to_owned();
        assert!(message.contains("over the limit of 1114112"), "{message}");
    }

    // The server set every row's transaction, time and position.
    let row = admin
        .query_one(
            "SELECT bool_and(xid < pg_snapshot_xmax(pg_current_snapshot())), \
                    bool_and(created_at BETWEEN now() - interval '5 minutes' AND now()), \
                    bool_and(id <= pg_sequence_last_value('updatepipe.log_id_seq')) \
             FROM updatepipe.log WHERE channel LIKE $1 || '%'",
            &[&channel],
        )
        .await
        .unwrap();
    assert!(row.get::<_, bool>(0), "a row kept a future xid");
    assert!(row.get::<_, bool>(1), "a row kept its own time");
    assert!(
        row.get::<_, bool>(2),
        "a row kept an id the sequence never gave"
    );

    // Over several tail reads (a heartbeat a second): each update once, no resync loop.
    let (mut got, resyncs) = collect(&mut rx, Duration::from_secs(5)).await;
    got.sort_by_key(|u| u.to_json());
    let mut want: Vec<Update> = (1..=4).chain(10..15).map(update).collect();
    want.sort_by_key(|u| u.to_json());
    assert_eq!(got, want);
    assert_eq!(resyncs, 0);
    listener.close().await.unwrap();
    real.close().await.unwrap();
}

/// Rows of about 1 MiB with a future `xid`, by a role with `INSERT` on every column: each is
/// read once (refused once), and a listener's page of the log stays within its byte budget
/// (a row past the budget is read alone).
#[tokio::test(flavor = "multi_thread")]
async fn huge_rows_with_a_future_xid_are_read_once_within_the_page_budget() {
    const BUDGET: usize = 256 * 1024;
    const HUGE: i64 = 8;
    let server = server().await;
    let channel = support::unique("roles_huge");
    let listener = PgPipe::new(
        server
            .config(LISTENER, &channel)
            .with_listen(|l| l.with_log_page_bytes(BUDGET)),
    )
    .unwrap();
    let (tx, mut rx) = mpsc::channel(64);
    listener.listen_events(tx).await.unwrap();
    let wide = server.client(WIDE_PUSHER, "mail").await;
    for seq in 1..=HUGE {
        wide.execute(
            "INSERT INTO updatepipe.log (channel, origin, seq, payload, xid) \
             VALUES ($1, 'huge', $2, repeat('x', 1000000), \
                     (pg_current_xact_id()::text::int8 + 1000000)::text::xid8)",
            &[&channel, &seq],
        )
        .await
        .unwrap();
    }
    let real = PgPipe::new(server.config(PUSHER, &channel)).unwrap();
    real.push(&update(1)).await.unwrap();
    // Several reads (a heartbeat a second, and the push's wake-up).
    let (got, _) = collect(&mut rx, Duration::from_secs(4)).await;
    real.push(&update(2)).await.unwrap();
    let (more, _) = collect(&mut rx, Duration::from_secs(2)).await;
    assert_eq!([got, more].concat(), [update(1), update(2)]);
    let stats = listener.stats();
    // Each huge row was read and refused once, however many reads there were.
    assert_eq!(stats.rejected_total(), HUGE as u64, "{stats:?}");
    assert!(stats.log_page_bytes_max <= 1_114_112, "{stats:?}");
    assert!(stats.log_page_rows_max >= 1, "{stats:?}");
    listener.close().await.unwrap();
    real.close().await.unwrap();
}

/// Each privilege `grant` gives is needed: a role granted everything but one of them fails
/// where that one is used.
#[tokio::test(flavor = "multi_thread")]
async fn every_privilege_grant_gives_is_needed() {
    let server = server().await;
    // The first two: the control, everything granted (each run must be able to succeed).
    let cases: &[(&str, Role, &str)] = &[
        ("nothing", Role::Pusher, "SELECT 1"),
        ("nothing", Role::Listener, "SELECT 1"),
        (
            "usage",
            Role::Pusher,
            "REVOKE USAGE ON SCHEMA updatepipe FROM {r}",
        ),
        (
            "history",
            Role::Pusher,
            "REVOKE SELECT ON updatepipe.schema_history FROM {r}",
        ),
        (
            "insert",
            Role::Pusher,
            "REVOKE INSERT (channel, origin, seq, payload) ON updatepipe.log FROM {r}",
        ),
        (
            "usage",
            Role::Listener,
            "REVOKE USAGE ON SCHEMA updatepipe FROM {r}",
        ),
        (
            "history",
            Role::Listener,
            "REVOKE SELECT ON updatepipe.schema_history FROM {r}",
        ),
        (
            "select log",
            Role::Listener,
            "REVOKE SELECT ON updatepipe.log FROM {r}",
        ),
        (
            "select pruned",
            Role::Listener,
            "REVOKE SELECT ON updatepipe.pruned FROM {r}",
        ),
        (
            "execute prune",
            Role::Listener,
            "REVOKE EXECUTE ON FUNCTION updatepipe.prune(text, float8, float8) FROM {r}",
        ),
        (
            "select consumers",
            Role::Listener,
            "REVOKE SELECT ON updatepipe.consumers FROM {r}",
        ),
        (
            "execute consumer_reset",
            Role::Listener,
            "REVOKE EXECUTE ON FUNCTION updatepipe.consumer_reset(text, text, text, bigint, \
             text, bigint, float8) FROM {r}",
        ),
        (
            "execute consumer_ack",
            Role::Listener,
            "REVOKE EXECUTE ON FUNCTION updatepipe.consumer_ack(text, text, text, bigint, \
             text, bigint, float8, bigint) FROM {r}",
        ),
        (
            "execute consumer_claim",
            Role::Listener,
            "REVOKE EXECUTE ON FUNCTION updatepipe.consumer_claim(text, text) FROM {r}",
        ),
        // A pusher's EXECUTE on updatepipe.logged is needed only when a retried push meets
        // its own rows: tests/hostile.rs, a_push_whose_first_try_committed_is_ok_after_all.
    ];
    let mut runs = Vec::new();
    for (i, (what, role_kind, revoke)) in cases.iter().enumerate() {
        let role = format!("up_lack_{i}");
        runs.push(async move {
            let admin = server.client("postgres", "mail").await;
            admin
                .batch_execute(&format!(
                    "CREATE ROLE {role} LOGIN PASSWORD '{PASSWORD}' IN ROLE {LACKING}"
                ))
                .await
                .unwrap();
            let mut owner = server.client(OWNER, "mail").await;
            // Under the lock `grant` and `migrate` take: concurrent GRANTs on a table fail.
            let tx = owner.transaction().await.unwrap();
            tx.batch_execute(&format!("SELECT pg_advisory_xact_lock({GRANT_LOCK})"))
                .await
                .unwrap();
            for sql in grant_statements(&role, *role_kind).unwrap() {
                tx.batch_execute(&sql).await.unwrap();
            }
            tx.batch_execute(&revoke.replace("{r}", &role))
                .await
                .unwrap();
            tx.commit().await.unwrap();
            let channel = support::unique("lacking");
            let failed = match role_kind {
                Role::Pusher => {
                    let pipe = PgPipe::new(server.config(&role, &channel)).unwrap();
                    let pushed = pipe.push(&update(1)).await;
                    pipe.close().await.unwrap();
                    pushed.is_err()
                }
                _ => lacking_listener_fails(server, &admin, &role, &channel).await,
            };
            if *what == "nothing" {
                assert!(!failed, "a {role_kind:?} granted everything fails");
            } else {
                assert!(
                    failed,
                    "a {role_kind:?} without {what} works: it is not needed"
                );
            }
        });
    }
    futures_util::future::join_all(runs).await;
}

/// Runs a durable listener as `role`, reading as a named consumer (pruning every second,
/// retention 2 s) while the pusher pushes: whether it fails to start, to deliver, to
/// acknowledge, or to prune.
async fn lacking_listener_fails(
    server: &Server,
    admin: &tokio_postgres::Client,
    role: &str,
    channel: &str,
) -> bool {
    let pipe = PgPipe::new(
        server
            .config(role, channel)
            .with_listen(|l| l.with_retention(Duration::from_secs(2)))
            .with_consumer(role),
    )
    .unwrap();
    let (tx, mut rx) = mpsc::channel(16);
    if pipe.listen_events(tx).await.is_err() {
        pipe.close().await.unwrap();
        return true;
    }
    let pusher = PgPipe::new(server.config(PUSHER, channel)).unwrap();
    pusher.push(&update(1)).await.unwrap();
    pusher.close().await.unwrap();
    let mut got = Vec::new();
    let mut acked = true;
    // Delivered and acknowledged within 4 s; then the row must be gone (retention 2 s, a
    // prune each second), within 10 s, while the listener runs.
    let delivered_by = tokio::time::Instant::now() + Duration::from_secs(4);
    let pruned_by = delivered_by + Duration::from_secs(10);
    let mut left: i64 = 1;
    while left > 0 && tokio::time::Instant::now() < pruned_by {
        let wait = tokio::time::Instant::now() + Duration::from_millis(250);
        if let Ok(Some(event)) = tokio::time::timeout_at(wait, rx.recv()).await {
            match event {
                Event::Update(u) => got.push(u),
                Event::Position(p) => {
                    pipe.ack(&p).unwrap();
                    acked &= pipe.flush_acks().await.is_ok();
                }
                _ => {}
            }
            continue;
        }
        if tokio::time::Instant::now() < delivered_by {
            continue;
        }
        if got != [update(1)] || !acked {
            break;
        }
        left = support::log_rows(admin, channel).await;
    }
    pipe.close().await.unwrap();
    got != [update(1)] || !acked || left > 0
}
