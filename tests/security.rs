//! Hostile peers and untrusted input against a real PostgreSQL: signed envelopes (forged,
//! unsigned, replayed and stale ones sent through plain SQL, key rotation), limits on what
//! a payload may ask for, and TLS on throwaway clusters with a certificate authority made
//! here (verify-full, verify-ca, require).

mod support;

use std::path::Path;
use std::time::{Duration, SystemTime};

use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair};
use support::{assert_silent, config_on, receive_exactly, sql, unique};
use tokio::sync::mpsc;
use updatepipe::cluster::TempCluster;
use updatepipe::{
    ChannelName, Config, Envelope, Error, Limits, Origin, PgPipe, Secret, SeqSet, Signer, Update,
    UpdatePipe,
};

fn secret(name: &str) -> Secret {
    Secret::new(format!("{name}-0123456789abcdef")).unwrap()
}

fn new_message(key: u64, uid: u32) -> Update {
    Update::new_message(key, SeqSet::single(uid).unwrap())
}

async fn listening(config: Config) -> (PgPipe, mpsc::Receiver<Update>) {
    let pipe = PgPipe::new(config).unwrap();
    let (tx, rx) = mpsc::channel(1024);
    pipe.listen(tx).await.unwrap();
    (pipe, rx)
}

async fn notify(client: &tokio_postgres::Client, channel: &str, payload: &str) {
    client
        .execute("SELECT pg_notify($1, $2)", &[&channel, &payload])
        .await
        .unwrap();
}

#[tokio::test]
async fn signed_listener_rejects_forged_unsigned_and_replayed_envelopes_and_goes_on() {
    let channel = unique("signed");
    let keys = || vec![secret("k1")];
    let (listener, mut rx) = listening(config_on(&channel).with_secrets(keys())).await;
    let pusher = PgPipe::new(config_on(&channel).with_secrets(keys())).unwrap();
    let client = sql().await;

    // A sender of our own making, sealing envelopes as a pipe would.
    let signer = Signer::new(keys(), ChannelName::new(&channel).unwrap()).unwrap();
    let origin = Origin::random();
    let seal = |seq: u64, update: &Update, at: SystemTime| {
        let body = Envelope::encode_v1(&origin, 1, seq, std::slice::from_ref(update)).unwrap();
        signer.seal(&body, at).unwrap()
    };
    let now = SystemTime::now;

    pusher.push(&new_message(1, 1)).await.unwrap();
    let valid = seal(1, &new_message(2, 2), now());
    notify(&client, &channel, &valid).await;
    // Replayed: the same envelope again, and a new one with the same number.
    notify(&client, &channel, &valid).await;
    notify(&client, &channel, &seal(1, &new_message(66, 6), now())).await;
    // Replayed: correctly signed, but sealed an hour ago or an hour ahead.
    let hour = Duration::from_secs(3600);
    notify(
        &client,
        &channel,
        &seal(2, &new_message(66, 7), now() - hour),
    )
    .await;
    notify(
        &client,
        &channel,
        &seal(3, &new_message(66, 8), now() + hour),
    )
    .await;
    // Unsigned: a plain envelope, and maddy's legacy form.
    let plain = Envelope::encode_v1(&Origin::random(), 1, 1, &[new_message(66, 9)]).unwrap();
    notify(&client, &channel, &plain).await;
    notify(
        &client,
        &channel,
        &Envelope::encode_legacy("1-0x1", &new_message(66, 10)),
    )
    .await;
    // Forged: a signed envelope with its update changed, one signed with another secret,
    // and one signed for another channel.
    let tampered = seal(4, &new_message(3, 3), now()).replace("\"Key\":3", "\"Key\":66");
    notify(&client, &channel, &tampered).await;
    let stranger = Signer::new(vec![secret("k9")], ChannelName::new(&channel).unwrap()).unwrap();
    let body = Envelope::encode_v1(&origin, 1, 5, &[new_message(66, 11)]).unwrap();
    notify(&client, &channel, &stranger.seal(&body, now()).unwrap()).await;
    let elsewhere = Signer::new(keys(), ChannelName::new("elsewhere").unwrap()).unwrap();
    let body = Envelope::encode_v1(&origin, 1, 6, &[new_message(66, 12)]).unwrap();
    notify(&client, &channel, &elsewhere.seal(&body, now()).unwrap()).await;
    // Valid ones after all of that: a late number below the highest seen, and a new one.
    notify(&client, &channel, &seal(7, &new_message(4, 4), now())).await;
    notify(&client, &channel, &seal(5, &new_message(5, 5), now())).await;
    pusher.push(&new_message(6, 6)).await.unwrap();

    let got = receive_exactly(&mut rx, 5).await;
    assert_eq!(got[0], new_message(1, 1));
    assert_eq!(got[1], new_message(2, 2));
    assert_eq!(got[2..4], [new_message(4, 4), new_message(5, 5)]);
    assert_eq!(got[4], new_message(6, 6));
    assert!(got.iter().all(|u| *u.key() != 66u64.into()), "{got:?}");

    let stats = listener.stats();
    assert_eq!(stats.rejected_for("replayed"), 4, "{stats:?}");
    assert_eq!(stats.rejected_for("unsigned"), 2, "{stats:?}");
    assert_eq!(stats.rejected_for("forged"), 3, "{stats:?}");
    assert_eq!(stats.rejected_total(), 9, "{stats:?}");
    // The listener's own heartbeats are signed too (none of them was rejected above).
    listener.close().await.unwrap();
    pusher.close().await.unwrap();
}

#[tokio::test]
async fn key_rotation_works_both_ways() {
    let channel = unique("rotate");
    let on = |secrets: Vec<Secret>| config_on(&channel).with_secrets(secrets);
    // Listeners during a rotation from k1 to k2: one not yet told (k1), one told (k2, k1),
    // and one done (k2).
    let (old, mut old_rx) = listening(on(vec![secret("k1")])).await;
    let (mid, mut mid_rx) = listening(on(vec![secret("k2"), secret("k1")])).await;
    let (new, mut new_rx) = listening(on(vec![secret("k2")])).await;
    let old_sender = PgPipe::new(on(vec![secret("k1")])).unwrap();
    let mid_sender = PgPipe::new(on(vec![secret("k2"), secret("k1")])).unwrap();

    old_sender.push(&new_message(1, 1)).await.unwrap();
    // Forward: the listener that has both accepts the old secret.
    assert_eq!(receive_exactly(&mut mid_rx, 1).await, [new_message(1, 1)]);
    assert_eq!(receive_exactly(&mut old_rx, 1).await, [new_message(1, 1)]);
    assert_silent(&mut new_rx).await;

    // A sender that has both signs with the first (k2): accepted by the new listeners,
    // refused by the one still on k1 only.
    mid_sender.push(&new_message(2, 2)).await.unwrap();
    assert_eq!(receive_exactly(&mut mid_rx, 1).await, [new_message(2, 2)]);
    assert_eq!(receive_exactly(&mut new_rx, 1).await, [new_message(2, 2)]);
    assert_silent(&mut old_rx).await;
    assert_eq!(old.stats().rejected_for("forged"), 1);
    assert_eq!(new.stats().rejected_for("forged"), 1);
    assert_eq!(mid.stats().rejected_total(), 0);

    for pipe in [old, mid, new, old_sender, mid_sender] {
        pipe.close().await.unwrap();
    }
}

#[tokio::test]
async fn signed_durable_updates_and_oversize_ones_arrive_through_the_log() {
    let channel = unique("signed_durable");
    let keys = || vec![secret("k1")];
    let durable = |keys| config_on(&channel).with_durable(true).with_secrets(keys);
    let pusher = PgPipe::new(durable(keys())).unwrap();
    pusher.migrate().await.unwrap();
    let (listener, mut rx) = listening(durable(keys())).await;
    let (best_effort, mut be_rx) = listening(config_on(&channel).with_secrets(keys())).await;

    let big = Update::mailbox_destroyed("x".repeat(20_000));
    let updates = [new_message(1, 1), big.clone(), new_message(2, 2)];
    pusher.push_many(&updates).await.unwrap();
    assert_eq!(receive_exactly(&mut rx, 3).await, updates);
    // A best-effort listener fetches the oversize one by its (signed) reference.
    assert_eq!(receive_exactly(&mut be_rx, 3).await, updates);
    assert_eq!(listener.stats().rejected_total(), 0);
    assert_eq!(best_effort.stats().rejected_total(), 0);

    // A durable listener with another secret reads the same log rows and refuses them.
    let (stranger, mut stranger_rx) = listening(
        config_on(&channel)
            .with_durable(true)
            .with_secrets(vec![secret("k9")]),
    )
    .await;
    pusher.push(&new_message(3, 3)).await.unwrap();
    assert_eq!(receive_exactly(&mut rx, 1).await, [new_message(3, 3)]);
    assert_silent(&mut stranger_rx).await;
    assert!(stranger.stats().rejected_for("forged") >= 1);
    for pipe in [pusher, listener, best_effort, stranger] {
        pipe.close().await.unwrap();
    }
}

#[tokio::test]
async fn during_a_rollout_unsigned_envelopes_are_accepted_and_forged_ones_still_refused() {
    let channel = unique("rollout");
    let (listener, mut rx) = listening(
        config_on(&channel)
            .with_secrets(vec![secret("k1")])
            .with_listen(|l| l.with_accept_unsigned(true)),
    )
    .await;
    let unsigned = PgPipe::new(config_on(&channel)).unwrap();
    let signed = PgPipe::new(config_on(&channel).with_secrets(vec![secret("k1")])).unwrap();
    let stranger = PgPipe::new(config_on(&channel).with_secrets(vec![secret("k9")])).unwrap();
    unsigned.push(&new_message(1, 1)).await.unwrap();
    stranger.push(&new_message(66, 6)).await.unwrap();
    signed.push(&new_message(2, 2)).await.unwrap();
    assert_eq!(
        receive_exactly(&mut rx, 2).await,
        [new_message(1, 1), new_message(2, 2)]
    );
    assert_eq!(listener.stats().rejected_for("forged"), 1);
    assert_eq!(listener.stats().rejected_total(), 1);
    for pipe in [listener, unsigned, signed, stranger] {
        pipe.close().await.unwrap();
    }
}

#[tokio::test]
async fn a_signed_log_row_copied_under_another_number_is_refused() {
    let channel = unique("log_copy");
    let durable = || {
        config_on(&channel)
            .with_durable(true)
            .with_secrets(vec![secret("k1")])
    };
    let pusher = PgPipe::new(durable()).unwrap();
    pusher.migrate().await.unwrap();
    let (listener, mut rx) = listening(durable()).await;
    pusher.push(&new_message(1, 1)).await.unwrap();
    assert_eq!(receive_exactly(&mut rx, 1).await, [new_message(1, 1)]);

    // A role with INSERT on the log, and no secret, copies the row under a new number and
    // under a new sender; the next durable push wakes the listener, which reads all three.
    let client = sql().await;
    let copied = client
        .execute(
            "INSERT INTO updatepipe.log (channel, origin, seq, payload) \
             SELECT channel, origin, seq + 1000, payload FROM updatepipe.log WHERE channel = $1 \
             UNION ALL \
             SELECT channel, 'someone-else', seq, payload FROM updatepipe.log WHERE channel = $1",
            &[&channel],
        )
        .await
        .unwrap();
    assert_eq!(copied, 2);
    pusher.push(&new_message(2, 2)).await.unwrap();
    assert_eq!(receive_exactly(&mut rx, 1).await, [new_message(2, 2)]);
    // A signed best-effort envelope (no durable mark) has no original in the log for the
    // unique index to guard: written there under its own sender and number, it is refused.
    let signer = Signer::new(vec![secret("k1")], ChannelName::new(&channel).unwrap()).unwrap();
    let origin = Origin::random();
    let body = Envelope::encode_v1(&origin, 1, 1, &[new_message(66, 6)]).unwrap();
    let best_effort = signer.seal(&body, SystemTime::now()).unwrap();
    client
        .execute(
            "INSERT INTO updatepipe.log (channel, origin, seq, payload) VALUES ($1, $2, 1, $3)",
            &[&channel, &origin.as_str(), &best_effort],
        )
        .await
        .unwrap();
    pusher.push(&new_message(3, 3)).await.unwrap();
    assert_eq!(receive_exactly(&mut rx, 1).await, [new_message(3, 3)]);
    let stats = listener.stats();
    assert_eq!(stats.rejected_for("forged"), 3, "{stats:?}");
    // Not what a sender wrote: no resync for it.
    assert_eq!(stats.resyncs, 0, "{stats:?}");
    listener.close().await.unwrap();
    pusher.close().await.unwrap();
}

#[tokio::test]
async fn payloads_over_the_limits_are_counted_and_dropped() {
    let channel = unique("limits");
    let limits = Limits::default()
        .with_max_updates(3)
        .with_max_flags(2)
        .with_max_flag_len(10)
        .with_max_seq_set_len(20)
        .with_max_depth(5);
    let (listener, mut rx) = listening(config_on(&channel).with_limits(limits)).await;
    let client = sql().await;
    let envelope = |updates: &str| format!(r#"{{"v":1,"o":"x","s":1,"u":[{updates}]}}"#);
    let one = r#"{"Type":3,"Key":1}"#;
    let over = [
        envelope(&[one; 4].join(",")),
        envelope(r#"{"Type":0,"Key":1,"NewFlags":["a","b","c"]}"#),
        envelope(r#"{"Type":0,"Key":1,"NewFlags":["abcdefghijk"]}"#),
        envelope(r#"{"Type":0,"Key":1,"SeqSet":"1,2,3,4,5,6,7,8,9,10,11"}"#),
        envelope(r#"{"Type":3,"Key":1,"x":[[[1]]]}"#),
        // Deep beyond any parser's taste: refused before parsing.
        format!(r#"{{"v":1,"x":{}{}}}"#, "[".repeat(3900), "]".repeat(3900)),
    ];
    for payload in &over {
        notify(&client, &channel, payload).await;
    }
    let within = envelope(&[one; 3].join(","));
    notify(&client, &channel, &within).await;
    assert_eq!(
        receive_exactly(&mut rx, 3).await,
        vec![Update::mailbox_destroyed(1); 3]
    );
    let stats = listener.stats();
    assert_eq!(stats.rejected_for("over_limit"), 6, "{stats:?}");
    assert_eq!(stats.rejected_total(), 6, "{stats:?}");
    listener.close().await.unwrap();
}

/// A certificate authority and a server certificate it signed for `localhost` only.
struct Pki {
    ca_pem: String,
    server_pem: String,
    server_key_pem: String,
}

fn pki() -> Pki {
    let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.distinguished_name
        .push(rcgen::DnType::CommonName, "updatepipe test CA");
    let ca = CertifiedIssuer::self_signed(ca, KeyPair::generate().unwrap()).unwrap();
    let server_key = KeyPair::generate().unwrap();
    let server = CertificateParams::new(vec!["localhost".to_owned()])
        .unwrap()
        .signed_by(&server_key, &ca)
        .unwrap();
    Pki {
        ca_pem: ca.pem(),
        server_pem: server.pem(),
        server_key_pem: server_key.serialize_pem(),
    }
}

/// A cluster that speaks TLS only: plain connections over TCP are rejected.
fn tls_cluster(pki: &Pki) -> TempCluster {
    support::init_logging();
    TempCluster::builder()
        .setting("ssl", "on")
        .setting("ssl_cert_file", "server.crt")
        .setting("ssl_key_file", "server.key")
        .data_file("server.crt", pki.server_pem.as_bytes())
        .data_file("server.key", pki.server_key_pem.as_bytes())
        .hba("hostnossl all all 0.0.0.0/0 reject")
        .start()
        .unwrap_or_else(|e| panic!("{e}"))
}

fn write(dir: &Path, name: &str, text: &str) -> String {
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    path.display().to_string()
}

/// Pushes and listens over `url` (the pool and the listener each make their own
/// connections): `Ok` when an update makes it through.
async fn exchange(url: &str) -> Result<(), Error> {
    let channel = unique("tls");
    let config = |url: &str| {
        Ok::<_, Error>(
            Config::from_url(url)?
                .with_channel(ChannelName::new(&channel).unwrap())
                .with_connect_timeout(Duration::from_secs(5)),
        )
    };
    let listener = PgPipe::new(config(url)?)?;
    let (tx, mut rx) = mpsc::channel(16);
    let listened = listener.listen(tx).await;
    if let Err(e) = listened {
        listener.close().await?;
        return Err(e);
    }
    let pusher = PgPipe::new(config(url)?)?;
    let pushed = pusher.push(&new_message(1, 1)).await;
    let got = tokio::time::timeout(Duration::from_secs(10), rx.recv()).await;
    listener.close().await?;
    pusher.close().await?;
    pushed?;
    assert_eq!(got.expect("arrives").expect("open"), new_message(1, 1));
    Ok(())
}

/// Checks that the connection is refused for the server's certificate.
async fn refused_certificate(url: &str) {
    let err = exchange(url).await.unwrap_err();
    assert!(matches!(err, Error::Connect(_)), "{err:?}");
    assert!(err.to_string().contains("certificate"), "{err}");
}

#[tokio::test(flavor = "multi_thread")]
async fn verify_full_needs_the_right_ca_and_host_name() {
    let wrong = pki();
    let pki = pki();
    let cluster = tokio::task::spawn_blocking({
        let server = Pki {
            ca_pem: pki.ca_pem.clone(),
            server_pem: pki.server_pem.clone(),
            server_key_pem: pki.server_key_pem.clone(),
        };
        move || tls_cluster(&server)
    })
    .await
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let ca = write(dir.path(), "ca.pem", &pki.ca_pem);
    let wrong_ca = write(dir.path(), "wrong.pem", &wrong.ca_pem);
    let port = cluster.port();
    // `localhost` names the certificate; the address keeps the connection on IPv4.
    let url = |host: &str, mode: &str, root: &str| {
        format!(
            "postgres://postgres@{host}:{port}/postgres?hostaddr=127.0.0.1&sslmode={mode}&sslrootcert={root}"
        )
    };

    // The server refuses plain connections: whatever gets through used TLS.
    let plain = exchange(&url("localhost", "disable", &ca)).await;
    assert!(matches!(plain, Err(Error::Connect(_))), "{plain:?}");

    exchange(&url("localhost", "verify-full", &ca))
        .await
        .expect("verify-full with the right CA and host name");

    refused_certificate(&url("localhost", "verify-full", &wrong_ca)).await;

    // The certificate names localhost, not 127.0.0.1.
    refused_certificate(&url("127.0.0.1", "verify-full", &ca)).await;

    // verify-ca checks the chain only: the host name does not matter, the CA does.
    exchange(&url("127.0.0.1", "verify-ca", &ca))
        .await
        .expect("verify-ca with the right CA");
    refused_certificate(&url("127.0.0.1", "verify-ca", &wrong_ca)).await;
    // require encrypts; given a root certificate it checks the chain, as libpq does.
    exchange(&format!(
        "postgres://postgres@127.0.0.1:{port}/postgres?sslmode=require"
    ))
    .await
    .expect("require without a root certificate");
    refused_certificate(&url("127.0.0.1", "require", &wrong_ca)).await;
    tokio::task::spawn_blocking(move || drop(cluster))
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn require_refuses_a_server_without_tls_and_prefer_falls_back() {
    let cluster = tokio::task::spawn_blocking(support::own_cluster)
        .await
        .unwrap();
    let port = cluster.port();
    let url = |mode: &str| format!("postgres://postgres@127.0.0.1:{port}/postgres?sslmode={mode}");
    let err = exchange(&url("require")).await.unwrap_err();
    assert!(matches!(err, Error::Connect(_)), "{err:?}");
    assert!(err.is_connection());
    exchange(&url("prefer")).await.expect("prefer without TLS");
    // A missing root certificate is a configuration error, found before connecting.
    let err = exchange(&format!(
        "{}&sslrootcert=/nonexistent/root.pem",
        url("verify-full")
    ))
    .await
    .unwrap_err();
    assert!(matches!(err, Error::Config(_)), "{err:?}");
    tokio::task::spawn_blocking(move || drop(cluster))
        .await
        .unwrap();
}
