//! The `updatepipe` binary against a real PostgreSQL.

mod support;

use std::io::{BufRead, BufReader};
use std::process::{Command, Output, Stdio};
use std::sync::mpsc;
use std::time::Duration;

fn updatepipe() -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_updatepipe"));
    command
        .env("DATABASE_URL", support::url())
        .env_remove("RUST_LOG");
    command
}

fn run(args: &[&str]) -> Output {
    updatepipe()
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap()
}

fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

/// Lines of a child's stream, readable with a timeout.
fn lines(stream: impl std::io::Read + Send + 'static) -> mpsc::Receiver<String> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stream).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    rx
}

/// Starts `updatepipe listen` with these arguments and waits for its first line on standard
/// error; returns the child, its output lines and that first line (the rest of standard
/// error is read and let go).
fn start_listener(args: &[&str]) -> (std::process::Child, mpsc::Receiver<String>, String) {
    let (listener, out, err, ready) = start_listener_logging(args);
    std::thread::spawn(move || err.iter().for_each(drop));
    (listener, out, ready)
}

/// [`start_listener`], also returning the lines of standard error after the first.
fn start_listener_logging(
    args: &[&str],
) -> (
    std::process::Child,
    mpsc::Receiver<String>,
    mpsc::Receiver<String>,
    String,
) {
    let mut listener = updatepipe()
        .arg("listen")
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let out = lines(listener.stdout.take().unwrap());
    let err = lines(listener.stderr.take().unwrap());
    let ready = err
        .recv_timeout(Duration::from_secs(20))
        .expect("listener starts");
    (listener, out, err, ready)
}

#[test]
fn listen_prints_what_push_sends_as_json_lines() {
    let channel = support::unique("Cli Channel");
    let (mut listener, out, ready) = start_listener(&["--channel", &channel]);
    assert!(ready.contains("listening"), "{ready}");

    let one = r#"{"Type":1,"Key":42,"SeqSet":"17","NewFlags":["\\Seen"]}"#;
    let pushed = run(&["push", "--channel", &channel, one]);
    assert!(pushed.status.success(), "{}", stderr(&pushed));

    let many = "{\"Type\":2,\"Key\":\"INBOX\",\"SeqSet\":\"3:5\"}\n{\"Type\":3,\"Key\":7}\n";
    let mut push = updatepipe()
        .args(["push", "--channel", &channel])
        .stdin(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write;
    push.stdin
        .take()
        .unwrap()
        .write_all(many.as_bytes())
        .unwrap();
    assert!(push.wait().unwrap().success());

    let mut got = Vec::new();
    for _ in 0..3 {
        got.push(
            out.recv_timeout(Duration::from_secs(10))
                .expect("a line per update"),
        );
    }
    assert_eq!(
        got,
        [
            one,
            r#"{"Type":2,"Key":"INBOX","SeqSet":"3:5"}"#,
            r#"{"Type":3,"Key":7}"#
        ]
    );
    assert!(
        out.recv_timeout(Duration::from_millis(300)).is_err(),
        "nothing more"
    );
    listener.kill().unwrap();
    listener.wait().unwrap();
}

#[test]
fn bad_updates_exit_2_with_one_line_and_send_nothing() {
    for (args, stdin, expect) in [
        (
            vec!["push", "{\"Type\":9,\"Key\":1}"],
            "",
            "unknown update type 9",
        ),
        (vec!["push", "not json"], "", "invalid update JSON"),
        (
            vec!["push"],
            "{\"Type\":0,\"Key\":1}\n{\"Type\":0,\"Key\":1,\"SeqSet\":\"0\"}\n",
            "line 2: invalid sequence set",
        ),
        (
            vec!["push", "--channel", "", "{\"Type\":0,\"Key\":1}"],
            "",
            "invalid channel name",
        ),
        // The wire format defines updates as JSON objects: an array (which serde's derive
        // would read field by field, `[3,5]` as `{"Type":3,"Key":5}`) is not one.
        (vec!["push", "[3,5]"], "", "expected an update object"),
        (vec!["push", "[1,2]"], "", "expected an update object"),
        (vec!["push"], "[0,1,\"1:2\"]\n", "expected an update object"),
    ] {
        let mut child = updatepipe()
            .args(&args)
            .stdin(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        use std::io::Write;
        child
            .stdin
            .take()
            .unwrap()
            .write_all(stdin.as_bytes())
            .unwrap();
        let output = child.wait_with_output().unwrap();
        let message = stderr(&output);
        assert_eq!(output.status.code(), Some(2), "{args:?}: {message}");
        assert_eq!(message.lines().count(), 1, "{message}");
        assert!(message.contains(expect), "{args:?}: {message}");
    }
}

#[test]
fn an_unknown_flag_is_a_usage_error() {
    let output = run(&["push", "--bogus"]);
    assert_eq!(output.status.code(), Some(2));
    assert!(stderr(&output).contains("--bogus"));
}

#[test]
fn an_unreachable_server_exits_3_quickly() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let url = format!("postgres://postgres@127.0.0.1:{port}/postgres");
    let started = std::time::Instant::now();
    let output = run(&["--url", &url, "push", "{\"Type\":0,\"Key\":1}"]);
    assert_eq!(output.status.code(), Some(3), "{}", stderr(&output));
    assert!(stderr(&output).contains("cannot connect to PostgreSQL"));
    let output = run(&["--url", &url, "listen", "--no-wait"]);
    assert_eq!(output.status.code(), Some(3), "{}", stderr(&output));
    assert!(started.elapsed() < Duration::from_secs(30));
    // Without --no-wait, listen waits for the server (a node that starts before it).
    let mut waiting = updatepipe()
        .args(["--url", &url, "listen"])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let err = lines(waiting.stderr.take().unwrap());
    std::thread::sleep(Duration::from_secs(2));
    assert!(waiting.try_wait().unwrap().is_none(), "listen waits");
    waiting.kill().unwrap();
    let _ = waiting.wait();
    let said: Vec<String> = err.try_iter().collect();
    assert!(
        said.iter().any(|l| l.contains("waiting for the server")),
        "{said:?}"
    );
}

#[test]
fn migrate_succeeds_twice() {
    for _ in 0..2 {
        let output = run(&["migrate"]);
        assert!(output.status.success(), "{}", stderr(&output));
    }
    let output = run(&["migrate"]);
    assert_eq!(
        String::from_utf8_lossy(&output.stdout).trim(),
        "schema is up to date"
    );
}

#[test]
fn the_demo_shows_no_echo() {
    let output = run(&["demo"]);
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "{stdout}\n{}", stderr(&output));
    assert!(
        stdout.contains("node B received {\"Type\":0,\"Key\":\"INBOX\",\"SeqSet\":\"1\"}"),
        "{stdout}"
    );
    assert!(
        stdout.contains("No node received its own updates."),
        "{stdout}"
    );
    assert!(!stdout.contains("unexpected"), "{stdout}");
}

#[test]
fn durable_listen_and_push_from_the_command_line() {
    let channel = support::unique("cli_durable");
    // The CLI never migrates by itself: the owner does, once.
    assert!(run(&["migrate"]).status.success());
    // A durable listener starts from now: what was pushed before it started is not
    // replayed to it; what is pushed after is delivered once.
    let output = run(&[
        "push",
        "--durable",
        "--channel",
        &channel,
        "{\"Type\":0,\"Key\":1,\"SeqSet\":\"1\"}",
    ]);
    assert!(output.status.success(), "{}", stderr(&output));
    let (mut listener, out, ready) = start_listener(&["--durable", "--channel", &channel]);
    assert!(ready.contains("(durable)"), "{ready}");
    let output = run(&[
        "push",
        "--durable",
        "--channel",
        &channel,
        "{\"Type\":0,\"Key\":1,\"SeqSet\":\"2\"}",
    ]);
    assert!(output.status.success(), "{}", stderr(&output));
    let line = out
        .recv_timeout(Duration::from_secs(10))
        .expect("the update");
    assert_eq!(line, "{\"Type\":0,\"Key\":1,\"SeqSet\":\"2\"}");
    assert!(
        out.recv_timeout(Duration::from_millis(300)).is_err(),
        "only the one pushed after it started"
    );
    listener.kill().unwrap();
    listener.wait().unwrap();
}

/// A push whose statement the server refuses exits 4, as a server error (here a durable
/// push into a log that refuses every row).
#[test]
fn a_push_the_server_refuses_exits_4() {
    let runtime = support::runtime();
    let database = runtime.block_on(support::fresh_database("cli_refused"));
    let url = database.url.clone();
    let output = updatepipe()
        .env("DATABASE_URL", &url)
        .arg("migrate")
        .output()
        .unwrap();
    assert!(output.status.success(), "{}", stderr(&output));
    runtime.block_on(async {
        let (client, connection) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
            .await
            .unwrap();
        let connection = tokio::spawn(connection);
        client
            .batch_execute(
                "ALTER TABLE updatepipe.log ADD CONSTRAINT refuse_every_row CHECK (false) \
                 NOT VALID",
            )
            .await
            .unwrap();
        drop(client);
        connection.await.unwrap().unwrap();
    });
    let channel = support::unique("cli_refused");
    let output = updatepipe()
        .env("DATABASE_URL", &url)
        .args(["push", "--durable", "--channel", &channel])
        .arg("{\"Type\":0,\"Key\":1,\"SeqSet\":\"1\"}")
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let message = stderr(&output);
    assert_eq!(output.status.code(), Some(4), "{message}");
    assert!(message.contains("refuse_every_row"), "{message}");
    drop(database);
}

#[test]
fn status_reports_a_primary_where_listen_works() {
    let output = run(&["status"]);
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "{stdout}{}", stderr(&output));
    assert!(stdout.contains("primary             yes"), "{stdout}");
    assert!(stdout.contains("LISTEN works        yes"), "{stdout}");
    assert!(stdout.contains("queue usage"), "{stdout}");
}

#[test]
fn migrate_dry_run_lists_nothing_once_migrated() {
    assert!(run(&["migrate"]).status.success());
    let output = run(&["migrate", "--dry-run"]);
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "{}", stderr(&output));
    assert!(stdout.starts_with("schema is up to date"), "{stdout}");
}

#[test]
fn push_from_options_and_a_filtered_pretty_listener() {
    let channel = support::unique("cli_options");
    let (mut listener, out, _) = start_listener(&[
        "--channel",
        &channel,
        "--pretty",
        "--key",
        "42",
        "--type",
        "flags",
    ]);
    for args in [
        vec![
            "--type", "flags", "--key", "42", "--uid", "17", "--flag", "\\Seen", "--flag", "$Junk",
        ],
        vec!["--type", "flags", "--key", "7", "--uid", "1"],
        vec!["--type", "new", "--key", "42", "--seq", "3:4"],
    ] {
        let mut all = vec!["push", "--channel", &channel];
        all.extend(args);
        let output = run(&all);
        assert!(output.status.success(), "{}", stderr(&output));
    }
    let line = out
        .recv_timeout(Duration::from_secs(10))
        .expect("the flags update");
    assert_eq!(line, "flags of uid 17 in mailbox 42: (\\Seen $Junk)");
    assert!(
        out.recv_timeout(Duration::from_millis(500)).is_err(),
        "the others are filtered out"
    );
    listener.kill().unwrap();
    listener.wait().unwrap();

    // Invalid options are bad input, said in one line.
    let output = run(&[
        "push",
        "--channel",
        &channel,
        "--type",
        "flags",
        "--key",
        "42",
        "--uid",
        "1:3",
    ]);
    assert_eq!(output.status.code(), Some(2));
    assert!(stderr(&output).contains("exactly one UID"));
}

#[test]
fn bench_runs_every_row_and_reports_json() {
    let output = run(&["bench", "--scale", "0.005", "--rounds", "1", "--json"]);
    assert!(output.status.success(), "{}", stderr(&output));
    let report: serde_json::Value = serde_json::from_slice(&output.stdout).expect("JSON");
    assert_eq!(report["max_in_flight"], 1, "the library's default");
    assert_eq!(report["raw_in_flight"], 4, "the raw baselines pipeline");
    assert_eq!(report["allocator"], "system", "the default build's");
    let rows = report["rows"].as_array().expect("rows");
    let names: Vec<&str> = rows.iter().map(|r| r["name"].as_str().unwrap()).collect();
    for expected in [
        "raw sequential",
        "raw batched 100/tx",
        "pipe, 1 pusher",
        "pipe, 256 pushers",
        "durable, 256 pushers",
        "maddy layout, 1 pusher",
        "maddy layout, 256 pushers",
        "fan-out, 1 listener",
        "fan-out, 16 listeners",
        "fan-out, 4 processes",
        "durable backlog catch-up",
        "pipe latency @1,000/s",
    ] {
        assert!(
            names.contains(&expected),
            "{expected} missing from {names:?}"
        );
    }
    for row in rows {
        assert!(row["updates_per_sec"].as_f64().unwrap() > 0.0, "{row}");
        assert!(row["cpu_us_per_update"].as_f64().unwrap() > 0.0, "{row}");
        // Every listener kept up: nothing let go, no resync.
        assert_eq!(
            (&row["dropped"], &row["resyncs"]),
            (&0.into(), &0.into()),
            "{row}"
        );
        if row["name"].as_str().unwrap().starts_with("fan-out") {
            assert!(row["cpu_us_per_delivery"].as_f64().unwrap() > 0.0, "{row}");
            assert!(row["listeners"].as_u64().unwrap() >= 1, "{row}");
        }
        if row["name"].as_str().unwrap().starts_with("pipe, ") {
            assert!(row["ratio"].as_f64().unwrap() > 0.0, "{row}");
        }
        if row["name"].as_str().unwrap().contains("latency") {
            assert!(row["latency_us"]["p99"].as_u64().unwrap() > 0, "{row}");
        }
    }
}

#[test]
fn bench_refuses_a_depth_of_zero() {
    for flag in ["--raw-in-flight", "--max-in-flight"] {
        let output = run(&["bench", flag, "0"]);
        assert_eq!(output.status.code(), Some(2));
        assert!(stderr(&output).contains(flag), "{}", stderr(&output));
    }
}

/// A session that listens and then sits in an open transaction holds the server's
/// notification queue: `status` warns past --queue-warn and exits 6 past --queue-fail.
#[test]
fn status_flags_a_filling_notification_queue_and_exits_6() {
    let cluster = support::own_cluster();
    let url = cluster.url();
    let runtime = support::runtime();
    let (_holder, _sender) = runtime.block_on(async {
        let connect = || async {
            let (client, connection) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
                .await
                .unwrap();
            tokio::spawn(connection);
            client
        };
        let holder = connect().await;
        holder.batch_execute("LISTEN held").await.unwrap();
        holder.batch_execute("BEGIN").await.unwrap();
        // 64 notifications of nearly a page (8 kB) each, each its own transaction.
        let sender = connect().await;
        for _ in 0..64 {
            sender
                .batch_execute("SELECT pg_notify('held', repeat('x', 7900))")
                .await
                .unwrap();
        }
        (holder, sender)
    });
    let status = |warn: &str, fail: &str| {
        updatepipe()
            .env("DATABASE_URL", &url)
            .args(["status", "--queue-warn", warn, "--queue-fail", fail])
            .stdin(Stdio::null())
            .output()
            .unwrap()
    };
    // 64 pages of the 8 GB queue: about 0.006 %.
    let output = status("0.001", "50");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "{stdout}{}", stderr(&output));
    assert!(stdout.contains("WARNING"), "{stdout}");
    assert!(stderr(&output).contains("warning"), "{}", stderr(&output));
    let output = status("0.001", "0.002");
    assert_eq!(output.status.code(), Some(6), "{}", stderr(&output));
    assert!(
        stderr(&output).contains("--queue-fail"),
        "{}",
        stderr(&output)
    );
    // With the defaults, this is healthy.
    let output = status("10", "50");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "{stdout}");
    assert!(!stdout.contains("WARNING"), "{stdout}");
}

#[test]
fn each_failure_class_has_its_exit_code() {
    // 2, bad input: an empty --url, a connection string that does not parse.
    for args in [
        vec!["status", "--url", ""],
        vec!["status", "--url", "host h"],
        vec!["push", "--url", "", "{\"Type\":0,\"Key\":1}"],
    ] {
        let output = run(&args);
        assert_eq!(
            output.status.code(),
            Some(2),
            "{args:?}: {}",
            stderr(&output)
        );
        assert_eq!(stderr(&output).lines().count(), 1, "{}", stderr(&output));
    }
    // 3, unreachable: an_unreachable_server_exits_3_quickly; 5, refused login:
    // tests/libpq.rs (it needs a server that asks for a password); 6, reachable but
    // unhealthy: status_flags_a_filling_notification_queue_and_exits_6.
    // 4, a refused statement: migrating as a role that may not create anything, in a
    // database of the test's own (the role and the database are dropped after).
    let runtime = support::runtime();
    let (database, role) = runtime.block_on(async {
        let database = support::fresh_database("cli_weak").await;
        let role = support::TempRole::new("weak").await;
        let (client, connection) = tokio_postgres::connect(&database.url, tokio_postgres::NoTls)
            .await
            .unwrap();
        tokio::spawn(connection);
        client
            .batch_execute("REVOKE CREATE ON SCHEMA public FROM PUBLIC")
            .await
            .unwrap();
        (database, role)
    });
    let url = format!("{} user={}", key_value(&database.url), role.name);
    let output = run(&["migrate", "--url", &url]);
    let message = stderr(&output);
    assert_eq!(output.status.code(), Some(4), "{message}");
    assert_eq!(message.lines().count(), 1, "{message}");
    // Refused by the server (no CREATE), or, once another test made the schema, by migrate
    // itself (it runs only into a schema the migrating role owns).
    assert!(message.contains("permission denied"), "{message}");
    assert!(!message.contains("db error"), "{message}");
    drop(database);
    drop(role);
    // 1, anything else: standard input that is not text.
    let mut child = updatepipe()
        .arg("push")
        .stdin(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write;
    child
        .stdin
        .take()
        .unwrap()
        .write_all(b"\xff\xfe\n")
        .unwrap();
    let output = child.wait_with_output().unwrap();
    assert_eq!(output.status.code(), Some(1), "{}", stderr(&output));
}

/// The test database's URL as key=value pairs, so that a `user=` added after it wins.
fn key_value(url: &str) -> String {
    let config: updatepipe::Config = url.parse().unwrap();
    let pg = config.pg();
    let host = match &pg.get_hosts()[0] {
        tokio_postgres::config::Host::Tcp(host) => host.clone(),
        tokio_postgres::config::Host::Unix(path) => path.display().to_string(),
    };
    format!(
        "host={host} port={} dbname={}",
        pg.get_ports().first().copied().unwrap_or(5432),
        pg.get_dbname().unwrap_or("postgres")
    )
}

#[test]
fn a_failed_push_prints_one_line_without_escape_codes() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let url = format!("postgres://postgres@127.0.0.1:{port}/postgres");
    let output = run(&["push", "--url", &url, "{\"Type\":0,\"Key\":1}"]);
    let message = stderr(&output);
    assert_eq!(output.status.code(), Some(3), "{message}");
    assert_eq!(message.lines().count(), 1, "{message}");
    assert!(!message.contains('\x1b'), "{message}");
    assert!(message.contains(&format!("127.0.0.1:{port}")), "{message}");
}

#[test]
fn status_counts_listeners_only_when_asked() {
    let output = run(&["status"]);
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "{}", stderr(&output));
    assert!(!stdout.contains("listeners "), "{stdout}");
    let output = run(&["status", "--listeners"]);
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "{}", stderr(&output));
    assert!(stdout.contains("listeners "), "{stdout}");
}

#[test]
fn options_that_mean_nothing_are_not_offered() {
    let output = run(&["migrate", "--channel", "x"]);
    assert_eq!(output.status.code(), Some(2));
    assert!(stderr(&output).contains("--channel"), "{}", stderr(&output));
}

#[test]
fn the_demo_uses_the_channel_it_is_given() {
    let channel = support::unique("demo_chan");
    let output = run(&["demo", "--channel", &channel]);
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "{stdout}{}", stderr(&output));
    assert!(stdout.contains(&format!("Channel: {channel}")), "{stdout}");
}

#[test]
fn a_key_with_leading_zeros_is_a_name() {
    let channel = support::unique("cli_key");
    let (mut listener, out, _ready) = start_listener(&["--channel", &channel]);
    let output = run(&[
        "push",
        "--channel",
        &channel,
        "--type",
        "destroyed",
        "--key",
        "007",
    ]);
    assert!(output.status.success(), "{}", stderr(&output));
    let line = out
        .recv_timeout(Duration::from_secs(10))
        .expect("the update");
    assert_eq!(line, "{\"Type\":3,\"Key\":\"007\"}");
    listener.kill().unwrap();
    listener.wait().unwrap();
}

#[test]
fn the_metrics_endpoint_counts_deliveries_and_rejections() {
    let channel = support::unique("cli_metrics");
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let addr = format!("127.0.0.1:{port}");
    let (mut listener, _out, ready) = start_listener(&["--channel", &channel, "--metrics", &addr]);
    assert!(ready.contains("listening"), "{ready}");
    for key in 1..=3 {
        let update = format!("{{\"Type\":0,\"Key\":{key},\"SeqSet\":\"1\"}}");
        let output = run(&["push", "--channel", &channel, &update]);
        assert!(output.status.success(), "{}", stderr(&output));
    }
    support::runtime().block_on(async {
        support::sql()
            .await
            .execute("SELECT pg_notify($1, 'not an envelope')", &[&channel])
            .await
            .unwrap();
    });
    let url = format!("http://{addr}/metrics");
    let value = |text: &str, series: &str| -> Option<f64> {
        text.lines()
            .find_map(|line| line.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let text = loop {
        let text = ureq::get(&url)
            .call()
            .unwrap()
            .body_mut()
            .read_to_string()
            .unwrap();
        let rejected = value(&text, "updatepipe_rejected_total{reason=\"unrecognized\"}");
        if (value(&text, "updatepipe_delivered_total") == Some(3.0) && rejected == Some(1.0))
            || std::time::Instant::now() > deadline
        {
            break text;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    assert_eq!(
        value(&text, "updatepipe_delivered_total"),
        Some(3.0),
        "{text}"
    );
    assert_eq!(
        value(&text, "updatepipe_rejected_total{reason=\"unrecognized\"}"),
        Some(1.0),
        "{text}"
    );
    // Every counter is there from the start, at zero until its first event.
    assert_eq!(
        value(&text, "updatepipe_reconnects_total"),
        Some(0.0),
        "{text}"
    );
    assert_eq!(
        value(&text, "updatepipe_rejected_total{reason=\"forged\"}"),
        Some(0.0),
        "{text}"
    );
    assert!(
        text.contains("# TYPE updatepipe_delivered_total counter"),
        "{text}"
    );
    listener.kill().unwrap();
    listener.wait().unwrap();
}

#[test]
fn listen_in_the_maddy_layout_subscribes_to_its_keys_and_hears_a_maddy_push_once() {
    let channel = support::unique("cli_maddy");
    let key = 7_000_000 + u64::from(rand::random::<u16>());
    let mailbox = format!("__uint64_{key}");
    let (mut listener, out, ready) = start_listener(&[
        "--channel",
        &channel,
        "--layout",
        "maddy",
        "--key",
        &key.to_string(),
    ]);
    assert!(ready.contains("listening"), "{ready}");
    let rt = support::runtime();
    rt.block_on(async {
        // A maddy node's update on the mailbox's channel, in maddy's form.
        let maddy = support::sql().await;
        let payload = format!("4242-0xc000010000;{{\"Type\":3,\"Key\":{key}}}\n");
        maddy
            .execute("SELECT pg_notify($1, $2)", &[&mailbox, &payload])
            .await
            .unwrap();
    });
    let line = out
        .recv_timeout(Duration::from_secs(10))
        .expect("maddy's update");
    assert_eq!(line, format!("{{\"Type\":3,\"Key\":{key}}}"));

    // push --layout maddy: the listener gets the envelope once (its copy is dropped).
    let update = format!("{{\"Type\":0,\"Key\":{key},\"SeqSet\":\"1\"}}");
    let pushed = run(&["push", "--channel", &channel, "--layout", "maddy", &update]);
    assert!(pushed.status.success(), "{}", stderr(&pushed));
    let line = out.recv_timeout(Duration::from_secs(10)).expect("the push");
    assert_eq!(line, update);
    assert!(
        out.recv_timeout(Duration::from_millis(500)).is_err(),
        "once"
    );
    listener.kill().unwrap();
    listener.wait().unwrap();
}

#[test]
fn the_maddy_demo_shows_both_ways() {
    let output = run(&["demo", "--layout", "maddy"]);
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "{stdout}\n{}", stderr(&output));
    assert!(
        stdout.contains("maddy node received from updatepipe-"),
        "{stdout}"
    );
    assert!(
        stdout.contains("node A received {\"Type\":1,\"Key\":42"),
        "{stdout}"
    );
    assert!(!stdout.contains("unexpected"), "{stdout}");
}

/// A secret file that is not a regular file (a FIFO nobody writes to, a directory, a
/// device) is refused at once with one line, exit 2, before anything connects: the start
/// is never blocked waiting for a writer.
#[test]
fn a_secret_file_that_is_not_a_regular_file_exits_2_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let fifo = dir.path().join("secrets.fifo");
    let made = Command::new("mkfifo").arg(&fifo).status().unwrap();
    assert!(made.success());
    let dir_path = dir.path().to_str().unwrap().to_owned();
    for path in [fifo.to_str().unwrap(), "/dev/zero", &dir_path] {
        let mut child = updatepipe()
            .args(["push", "--secret-file", path, "{\"Type\":3,\"Key\":1}"])
            .stdin(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        let status = loop {
            if let Some(status) = child.try_wait().unwrap() {
                break status;
            }
            if std::time::Instant::now() > deadline {
                let _ = child.kill();
                panic!("{path}: still running after 20 s");
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        let output = child.wait_with_output().unwrap();
        let message = stderr(&output);
        assert_eq!(status.code(), Some(2), "{path}: {message}");
        assert_eq!(message.lines().count(), 1, "{message}");
        assert!(message.contains("regular file"), "{message}");
    }
}

/// A command whose standard output is closed before it writes (`| head -1`, `| grep -q`)
/// ends quietly with success, as Unix tools do: no panic, no exit 101.
#[test]
fn a_closed_standard_output_ends_every_command_quietly() {
    for args in [
        vec!["status"],
        vec!["migrate", "--dry-run"],
        vec!["demo"],
        vec![
            "bench",
            "--only",
            "durable, 1",
            "--scale",
            "0.005",
            "--rounds",
            "1",
        ],
    ] {
        let mut child = updatepipe()
            .args(&args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        drop(child.stdout.take());
        let output = child.wait_with_output().unwrap();
        let said = stderr(&output);
        assert_eq!(output.status.code(), Some(0), "{args:?}: {said}");
        assert!(!said.contains("panicked"), "{args:?}: {said}");
        if args[0] == "bench" {
            // It still drops the database it worked in.
            assert_bench_database_dropped(&support::runtime(), &said);
        }
    }
}

/// A database that does not exist is bad input (2), said as such, not "check that the
/// server runs" (3): the server answered.
#[test]
fn an_unknown_database_is_bad_input_naming_the_database() {
    let url = support::url_of_database("updatepipe_no_such_database");
    for args in [
        vec!["status", "--url", &url],
        vec!["push", "--url", &url, "{\"Type\":3,\"Key\":1}"],
        vec!["listen", "--url", &url, "--no-wait"],
    ] {
        let output = run(&args);
        let said = stderr(&output);
        assert_eq!(output.status.code(), Some(2), "{args:?}: {said}");
        assert!(said.contains("database"), "{args:?}: {said}");
        assert!(!said.contains("server runs"), "{args:?}: {said}");
        assert_eq!(said.lines().count(), 1, "{said}");
    }
}

/// A role granted one side of durable mode and used for the other is told the grant it
/// lacks (exit 4), as an unmigrated database names `migrate`.
#[test]
fn a_role_granted_one_side_is_told_the_grant_for_the_other() {
    let runtime = support::runtime();
    let (database, pusher, listener) = runtime.block_on(async {
        let database = support::fresh_database("cli_sides").await;
        let pusher = support::TempRole::new("pusher_only").await;
        let listener = support::TempRole::new("listener_only").await;
        (database, pusher, listener)
    });
    let owner = database.url.as_str();
    assert!(run(&["migrate", "--url", owner]).status.success());
    let granted = run(&[
        "grant",
        "--url",
        owner,
        "--pusher",
        &pusher.name,
        "--listener",
        &listener.name,
    ]);
    assert!(granted.status.success(), "{}", stderr(&granted));
    let channel = support::unique("cli_sides");
    let as_role = |role: &str| format!("{} user={role}", key_value(owner));
    for (role, args, grant) in [
        (
            &pusher.name,
            vec!["listen", "--durable", "--no-wait", "--channel", &channel],
            "grant --listener",
        ),
        (
            &listener.name,
            vec![
                "push",
                "--durable",
                "--channel",
                &channel,
                "{\"Type\":3,\"Key\":1}",
            ],
            "grant --pusher",
        ),
    ] {
        let url = as_role(role);
        let mut all = vec!["--url", url.as_str()];
        all.extend(args);
        let output = run(&all);
        let said = stderr(&output);
        assert_eq!(output.status.code(), Some(4), "{all:?}: {said}");
        assert!(said.contains(grant), "{all:?}: {said}");
        assert!(said.contains(role.as_str()), "{all:?}: {said}");
    }
    // Each role does what it was granted.
    let url = as_role(&pusher.name);
    let output = run(&[
        "--url",
        &url,
        "push",
        "--durable",
        "--channel",
        &channel,
        "{\"Type\":3,\"Key\":1}",
    ]);
    assert!(output.status.success(), "{}", stderr(&output));
    drop(database);
    drop(pusher);
    drop(listener);
}

/// `--queue-warn` and `--queue-fail` are percentages.
#[test]
fn queue_thresholds_are_percentages() {
    for (flag, value) in [
        ("--queue-fail", "150"),
        ("--queue-warn", "100.5"),
        ("--queue-warn", "-1"),
        ("--queue-fail", "NaN"),
    ] {
        let output = run(&["status", &format!("{flag}={value}")]);
        let said = stderr(&output);
        assert_eq!(output.status.code(), Some(2), "{flag} {value}: {said}");
        assert!(said.contains(flag), "{flag} {value}: {said}");
    }
    assert!(
        run(&["status", "--queue-fail", "100", "--queue-warn", "0"])
            .status
            .success()
    );
}

/// The closing count says how many updates were delivered and how many of them the
/// filters let through to standard output.
#[test]
fn the_closing_count_tells_delivered_from_printed() {
    let channel = support::unique("cli_count");
    let (mut listener, out, err, _) =
        start_listener_logging(&["--channel", &channel, "--key", "42"]);
    for update in [
        r#"{"Type":3,"Key":7}"#,
        r#"{"Type":3,"Key":42}"#,
        r#"{"Type":3,"Key":8}"#,
        r#"{"Type":3,"Key":42}"#,
    ] {
        let output = run(&["push", "--channel", &channel, update]);
        assert!(output.status.success(), "{}", stderr(&output));
    }
    // Notifications arrive in commit order: once the last is printed, all four were heard.
    for _ in 0..2 {
        out.recv_timeout(Duration::from_secs(10))
            .expect("an update for 42");
    }
    let terminated = Command::new("kill")
        .args(["-TERM", &listener.id().to_string()])
        .status()
        .unwrap();
    assert!(terminated.success());
    assert!(listener.wait().unwrap().success());
    let said: Vec<String> = err.iter().collect();
    let closing = said
        .iter()
        .find(|l| l.contains("delivered"))
        .unwrap_or_else(|| panic!("{said:?}"));
    assert!(
        closing.contains("delivered 4 (2 printed, the rest left out by --key/--type)"),
        "{closing}"
    );
}

/// In the shared layout, a channel named like one of maddy's mailboxes would put the pipe's
/// envelopes and heartbeats where maddy parses every payload as an update: refused.
#[test]
fn a_maddy_mailbox_channel_is_refused_as_the_pipe_channel() {
    for args in [
        vec!["listen", "--no-wait", "--channel", "__uint64_42"],
        vec!["push", "--channel", "__uint64_42", "{\"Type\":3,\"Key\":1}"],
    ] {
        let output = run(&args);
        let said = stderr(&output);
        assert_eq!(output.status.code(), Some(2), "{args:?}: {said}");
        assert!(said.contains("maddy"), "{args:?}: {said}");
    }
}

/// The database `bench` said it used (on standard error) is gone.
fn assert_bench_database_dropped(runtime: &tokio::runtime::Runtime, said: &str) {
    let own = said
        .split_whitespace()
        .find(|w| w.starts_with("updatepipe_bench_"))
        .unwrap_or_else(|| panic!("the database it used: {said}"))
        .trim_end_matches(',');
    let left: i64 = runtime.block_on(async {
        support::sql()
            .await
            .query_one(
                "SELECT count(*) FROM pg_catalog.pg_database WHERE datname = $1",
                &[&own],
            )
            .await
            .unwrap()
            .get(0)
    });
    assert_eq!(left, 0, "{own} was not dropped");
}

/// `bench` pointed at a database works in one of its own and drops it: the database named
/// gains no schema, and none of the benchmark's databases is left; a role that may not
/// create one is told so, and nothing changes.
#[test]
fn bench_leaves_the_database_it_is_pointed_at_as_it_was() {
    let runtime = support::runtime();
    let (database, weak) = runtime.block_on(async {
        (
            support::fresh_database("cli_bench").await,
            support::TempRole::new("no_createdb").await,
        )
    });
    let schemas = || {
        runtime.block_on(async {
            let (client, connection) =
                tokio_postgres::connect(&database.url, tokio_postgres::NoTls)
                    .await
                    .unwrap();
            tokio::spawn(connection);
            let rows = client
                .query(
                    "SELECT nspname::text FROM pg_catalog.pg_namespace ORDER BY 1",
                    &[],
                )
                .await
                .unwrap();
            rows.iter()
                .map(|r| r.get::<_, String>(0))
                .collect::<Vec<_>>()
        })
    };
    let before = schemas();
    let output = run(&[
        "--url",
        &database.url,
        "bench",
        "--only",
        "durable, 1",
        "--only",
        "fan-out, 4 processes",
        "--scale",
        "0.005",
        "--rounds",
        "1",
    ]);
    let said = stderr(&output);
    assert!(output.status.success(), "{said}");
    assert_eq!(schemas(), before);
    assert_bench_database_dropped(&runtime, &said);
    let url = format!("{} user={}", key_value(&database.url), weak.name);
    let output = run(&["--url", &url, "bench", "--only", "durable, 1"]);
    let said = stderr(&output);
    assert_eq!(output.status.code(), Some(1), "{said}");
    assert!(said.contains("CREATEDB"), "{said}");
    assert_eq!(schemas(), before);
    drop(database);
    drop(weak);
}
