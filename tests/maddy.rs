//! Mixed fleets with maddy, against a real server: a maddy-format node written from maddy's
//! facts (a plain tokio-postgres connection that LISTENs per mailbox, parses exactly as
//! maddy does and NOTIFYs in maddy's form) and updatepipe pipes in the maddy layout.

mod support;

use std::future::poll_fn;
use std::time::Duration;

use serde::Deserialize;
use support::{ARRIVE, SILENCE, cluster_config, config_on, own_cluster, unique};
use tokio::sync::mpsc;
use tokio_postgres::AsyncMessage;
use updatepipe::{
    Config, Error, Event, Flag, Layout, MailboxKey, PgPipe, ResyncReason, SeqSet, Update,
    UpdatePipe,
};

/// The mailboxes of one test. The tests share a database and run in parallel, and maddy's
/// channels are named by key alone: each test has keys of its own.
struct Keys {
    /// A small id (the first test's is 42, so its channel is `__uint64_42`).
    small: u64,
    /// Above 2⁵³: exact only when read as an integer, never as a float.
    big: u64,
    /// A string key holding `;`, the separator of maddy's payload.
    named: String,
}

fn keys(base: u64) -> Keys {
    Keys {
        small: base,
        big: (1 << 53) + base,
        named: format!("INBOX;maddy{base}"),
    }
}

impl Keys {
    fn all(&self) -> [MailboxKey; 3] {
        [
            MailboxKey::Id(self.big),
            self.named.as_str().into(),
            MailboxKey::Id(self.small),
        ]
    }

    /// A mailbox of this test that no node opens.
    fn unopened(&self) -> u64 {
        self.small + 1
    }
}

/// An update as maddy's decoder reads it (go-imap-mess's fields, numbers as u64).
#[derive(Debug, Deserialize, PartialEq, Eq)]
#[allow(non_snake_case)]
struct MaddyUpdate {
    Type: u64,
    Key: MaddyKey,
    #[serde(default)]
    SeqSet: String,
    #[serde(default)]
    NewFlags: Vec<String>,
}

#[derive(Debug, Deserialize, PartialEq, Eq)]
#[serde(untagged)]
enum MaddyKey {
    Id(u64),
    Name(String),
}

impl MaddyUpdate {
    /// What maddy should read for one of our updates.
    fn of(update: &Update) -> MaddyUpdate {
        MaddyUpdate {
            Type: u64::from(update.kind().code()),
            Key: match update.key() {
                MailboxKey::Id(id) => MaddyKey::Id(*id),
                MailboxKey::Name(name) => MaddyKey::Name(name.clone()),
                other => panic!("unknown key {other:?}"),
            },
            SeqSet: update.seq_set().to_string(),
            NewFlags: update
                .flags()
                .iter()
                .map(|f| f.as_str().to_owned())
                .collect(),
        }
    }
}

/// The channel maddy uses for a key.
fn channel_of(key: &MailboxKey) -> String {
    key.maddy_channel().unwrap().as_str().to_owned()
}

/// A maddy node: its own connection, its sender id `<pid>-<pointer>`, a LISTEN per open
/// mailbox, and maddy's parser. Every notification it hears is kept with its channel, so a
/// test can check that nothing but updates reaches maddy's channels.
struct MaddyNode {
    id: String,
    client: tokio_postgres::Client,
    heard: mpsc::UnboundedReceiver<(String, String)>,
}

impl MaddyNode {
    async fn start(url: &str) -> MaddyNode {
        let (client, mut connection) = tokio_postgres::connect(url, tokio_postgres::NoTls)
            .await
            .expect("connect the maddy node");
        let (tx, heard) = mpsc::unbounded_channel();
        tokio::spawn(async move {
            while let Some(Ok(message)) = poll_fn(|cx| connection.poll_message(cx)).await {
                if let AsyncMessage::Notification(n) = message {
                    let _ = tx.send((n.channel().to_owned(), n.payload().to_owned()));
                }
            }
        });
        MaddyNode {
            id: format!("{}-0xc{:09x}", std::process::id(), rand::random::<u32>()),
            client,
            heard,
        }
    }

    /// A client opened the mailbox: maddy LISTENs on its channel (quoted, as lib/pq does).
    async fn open(&self, key: &MailboxKey) {
        let channel = channel_of(key).replace('"', "\"\"");
        self.client
            .batch_execute(&format!("LISTEN \"{channel}\""))
            .await
            .unwrap();
    }

    /// maddy's Push: `<id>;<json with ';' as 0x10>\n` on the key's channel.
    async fn push_json(&self, channel: &str, json: &str) {
        let payload = format!("{};{}\n", self.id, json.replace(';', "\u{10}"));
        self.client
            .execute("SELECT pg_notify($1, $2)", &[&channel, &payload])
            .await
            .unwrap();
    }

    async fn push(&self, update: &Update) {
        self.push_json(&channel_of(update.key()), &update.to_json())
            .await;
    }

    /// maddy's parser: split at the first `;`, drop its own id, 0x10 back to `;`, decode
    /// ONE JSON value (what follows is ignored). `Err` for what maddy would log as an error.
    fn parse(&self, payload: &str) -> Result<Option<MaddyUpdate>, String> {
        let (id, json) = payload
            .split_once(';')
            .ok_or_else(|| format!("mismatched parts count: {payload:?}"))?;
        if id == self.id {
            return Ok(None);
        }
        let json = json.replace('\u{10}', ";");
        match serde_json::Deserializer::from_str(&json)
            .into_iter::<MaddyUpdate>()
            .next()
        {
            Some(Ok(update)) => Ok(Some(update)),
            other => Err(format!("{other:?}: {payload:?}")),
        }
    }

    /// The next `n` updates heard, each with its channel, then nothing more within
    /// [`SILENCE`]; panics on anything maddy could not parse.
    async fn receive_exactly(&mut self, n: usize) -> Vec<(String, MaddyUpdate)> {
        let mut got = Vec::new();
        while got.len() < n {
            let (channel, payload) = tokio::time::timeout(ARRIVE, self.heard.recv())
                .await
                .unwrap_or_else(|_| panic!("maddy timed out after {} of {n}: {got:?}", got.len()))
                .expect("the maddy node's connection");
            match self.parse(&payload) {
                Ok(Some(update)) => got.push((channel, update)),
                Ok(None) => {}
                Err(e) => panic!("maddy could not parse a payload on {channel}: {e}"),
            }
        }
        self.assert_silent(SILENCE).await;
        got
    }

    /// Nothing but its own payloads is heard within `window`.
    async fn assert_silent(&mut self, window: Duration) {
        let deadline = tokio::time::Instant::now() + window;
        while let Ok(Some((channel, payload))) =
            tokio::time::timeout_at(deadline, self.heard.recv()).await
        {
            if !matches!(self.parse(&payload), Ok(None)) {
                panic!("maddy heard on {channel}: {payload:?}");
            }
        }
    }
}

fn maddy_layout(channel: &str) -> Config {
    config_on(channel).with_layout(Layout::Maddy)
}

/// Every update kind, on a u64 key above 2⁵³, a string key with `;`, flags with `;` and
/// none.
fn every_kind(k: &Keys) -> Vec<Update> {
    let named = k.named.as_str();
    vec![
        Update::new_message(k.big, SeqSet::parse("1:3,7").unwrap()),
        Update::flags_changed(
            named,
            7,
            [Flag::new("\\Seen").unwrap(), Flag::new("a;b").unwrap()],
        )
        .unwrap(),
        Update::flags_changed(named, 8, []).unwrap(),
        Update::expunge(k.small, SeqSet::single(5).unwrap()),
        Update::mailbox_destroyed(k.big),
    ]
}

async fn listening_events(config: Config) -> (PgPipe, mpsc::Receiver<Event>) {
    let pipe = PgPipe::new(config).unwrap();
    let (tx, mut rx) = mpsc::channel(1024);
    pipe.listen_events(tx).await.unwrap();
    assert_eq!(next_event(&mut rx).await, Event::Connected);
    (pipe, rx)
}

async fn next_event(rx: &mut mpsc::Receiver<Event>) -> Event {
    tokio::time::timeout(ARRIVE, rx.recv())
        .await
        .expect("an event in time")
        .expect("the event stream")
}

/// The next updates, skipping connection events; then silence.
async fn updates_exactly(rx: &mut mpsc::Receiver<Event>, n: usize) -> Vec<Update> {
    let mut got = Vec::new();
    while got.len() < n {
        match next_event(rx).await {
            Event::Update(u) => got.push(u),
            Event::Connected | Event::Disconnected { .. } | Event::Position(_) => {}
            other => panic!("unexpected {other:?} after {got:?}"),
        }
    }
    // Then nothing but the positions after them.
    let quiet = tokio::time::Instant::now() + SILENCE;
    while let Ok(Some(extra)) = tokio::time::timeout_at(quiet, rx.recv()).await {
        assert!(matches!(extra, Event::Position(_)), "unexpected {extra:?}");
    }
    got
}

#[tokio::test]
async fn updatepipe_to_maddy_every_kind_once_and_atomic_with_the_transaction() {
    let channel = unique("maddy_out");
    let k = keys(42);
    let mut maddy = MaddyNode::start(&support::url()).await;
    for key in k.all() {
        maddy.open(&key).await;
    }
    let pipe = PgPipe::new(maddy_layout(&channel)).unwrap();
    let updates = every_kind(&k);

    // One push each, through the pool.
    for update in &updates {
        pipe.push(update).await.unwrap();
    }
    let got = maddy.receive_exactly(updates.len()).await;
    let expected: Vec<(String, MaddyUpdate)> = updates
        .iter()
        .map(|u| (channel_of(u.key()), MaddyUpdate::of(u)))
        .collect();
    assert_eq!(got, expected);

    // Two identical updates to one mailbox in one transaction reach maddy twice.
    let twice = Update::expunge(k.small, SeqSet::single(9).unwrap());
    pipe.push_many(&[twice.clone(), twice.clone()])
        .await
        .unwrap();
    let got = maddy.receive_exactly(2).await;
    assert!(
        got.iter().all(|(_, u)| *u == MaddyUpdate::of(&twice)),
        "{got:?}"
    );

    // Inside the caller's transaction: delivered if and only if it commits, twice too.
    let (mut client, connection) = tokio_postgres::connect(&support::url(), tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(connection);
    let tx = client.transaction().await.unwrap();
    pipe.push_in(&tx, &twice).await.unwrap();
    pipe.push_in(&tx, &twice).await.unwrap();
    maddy.assert_silent(SILENCE).await;
    tx.commit().await.unwrap();
    assert_eq!(maddy.receive_exactly(2).await.len(), 2);
    let tx = client.transaction().await.unwrap();
    pipe.push_in(&tx, &twice).await.unwrap();
    tx.rollback().await.unwrap();
    maddy.assert_silent(SILENCE).await;

    // A mailbox maddy has not opened hears nothing; a key that cannot be a channel (empty,
    // or 64 bytes) has no copy, and the envelope still goes (see
    // a_key_that_cannot_be_a_channel_loses_only_its_maddy_copy).
    pipe.push(&Update::mailbox_destroyed(k.unopened()))
        .await
        .unwrap();
    let long = "x".repeat(64);
    for key in ["", long.as_str()] {
        pipe.push(&Update::mailbox_destroyed(key)).await.unwrap();
    }
    maddy.assert_silent(SILENCE).await;
    assert_eq!(pipe.stats().maddy_copies_unsent, 2);
    pipe.close().await.unwrap();
}

#[tokio::test]
async fn maddy_to_updatepipe_every_kind_on_subscribed_mailboxes_only() {
    let channel = unique("maddy_in");
    let mut maddy = MaddyNode::start(&support::url()).await;
    let k = keys(1042);
    let (pipe, mut events) = listening_events(maddy_layout(&channel)).await;
    for key in k.all() {
        pipe.subscribe(key.clone()).await.unwrap();
        maddy.open(&key).await;
    }
    let updates = every_kind(&k);
    for update in &updates {
        maddy.push(update).await;
    }
    assert_eq!(updates_exactly(&mut events, updates.len()).await, updates);
    // maddy never hears itself, nor anything from the listening pipe.
    maddy.receive_exactly(0).await;

    // A flag maddy takes and the pipe refuses (non-ASCII) becomes a resync of that
    // mailbox.
    maddy
        .push_json(
            &channel_of(&k.small.into()),
            &format!(
                r#"{{"Type":1,"Key":{},"SeqSet":"3","NewFlags":["é"]}}"#,
                k.small
            ),
        )
        .await;
    assert_eq!(
        next_event(&mut events).await,
        Event::Resync(ResyncReason::Unrepresentable {
            key: MailboxKey::Id(k.small)
        })
    );
    assert_eq!(rejected(&pipe), 1);

    // Not subscribed: not heard. Unsubscribed (once per subscribe): no longer heard.
    maddy.push(&Update::mailbox_destroyed(k.unopened())).await;
    pipe.subscribe(k.small).await.unwrap();
    pipe.unsubscribe(k.small).await.unwrap();
    maddy.push(&Update::mailbox_destroyed(k.small)).await;
    assert_eq!(
        updates_exactly(&mut events, 1).await,
        [Update::mailbox_destroyed(k.small)]
    );
    pipe.unsubscribe(k.small).await.unwrap();
    maddy.push(&Update::mailbox_destroyed(k.small)).await;
    updates_exactly(&mut events, 0).await;

    // Subscriptions need a listening pipe in the maddy layout, and a key that can be one.
    assert!(matches!(
        pipe.subscribe("").await,
        Err(Error::InvalidChannel(_))
    ));
    let idle = PgPipe::new(maddy_layout(&channel)).unwrap();
    assert!(matches!(
        idle.subscribe(1u64).await,
        Err(Error::NotListening)
    ));
    let shared = PgPipe::new(config_on(&channel)).unwrap();
    let (tx, _rx) = mpsc::channel(8);
    shared.listen(tx).await.unwrap();
    assert!(matches!(
        shared.subscribe(1u64).await,
        Err(Error::NotListening)
    ));
    shared.close().await.unwrap();
    pipe.close().await.unwrap();
}

#[tokio::test]
async fn no_echo_and_nothing_but_updates_on_maddy_channels() {
    let channel = unique("maddy_quiet");
    let k = keys(2042);
    let mut maddy = MaddyNode::start(&support::url()).await;
    maddy.open(&MailboxKey::Id(k.small)).await;
    // Quick heartbeats: several would have gone out in the window below.
    let config =
        maddy_layout(&channel).with_listen(|l| l.with_health_interval(Duration::from_millis(200)));
    let (pipe, mut events) = listening_events(config).await;
    pipe.subscribe(k.small).await.unwrap();
    // Its own push comes back neither as an envelope nor as maddy's copy.
    pipe.push(&Update::mailbox_destroyed(k.small))
        .await
        .unwrap();
    assert_eq!(maddy.receive_exactly(1).await.len(), 1);
    updates_exactly(&mut events, 0).await;
    // Heartbeats, the status probe and the durable log's references stay off maddy's
    // channels.
    let status = pipe.status().await.unwrap();
    assert!(status.listen_works == Some(true), "{status:?}");
    maddy.assert_silent(Duration::from_millis(1500)).await;
    // Its heartbeats went out meanwhile and came back on its own channel: no reconnect.
    assert_eq!(pipe.stats().disconnects, 0, "{:?}", pipe.stats());
    pipe.close().await.unwrap();
}

#[tokio::test]
async fn two_updatepipe_nodes_in_the_maddy_layout_exchange_durable_envelopes_once() {
    let channel = unique("maddy_durable");
    let config = maddy_layout(&channel).with_durable(true);
    let a = PgPipe::new(config.clone()).unwrap();
    a.migrate().await.unwrap();
    let k = keys(3042);
    let (b, mut b_events) = listening_events(config.clone()).await;
    // b also hears a's copies for maddy on the mailbox it subscribed to: it must drop them.
    b.subscribe(k.small).await.unwrap();
    let mut maddy = MaddyNode::start(&support::url()).await;
    maddy.open(&MailboxKey::Id(k.small)).await;

    let sent: Vec<Update> = (1..=6)
        .map(|uid| Update::new_message(k.small, SeqSet::single(uid).unwrap()))
        .collect();
    a.push(&sent[0]).await.unwrap();
    a.push_many(&sent[1..4]).await.unwrap();
    let (mut client, connection) = tokio_postgres::connect(&support::url(), tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(connection);
    let tx = client.transaction().await.unwrap();
    a.push_many_in(&tx, &sent[4..]).await.unwrap();
    tx.commit().await.unwrap();

    assert_eq!(updates_exactly(&mut b_events, sent.len()).await, sent);
    assert_eq!(maddy.receive_exactly(sent.len()).await.len(), sent.len());
    // Durable and sequenced: in the log under a's origin, three transactions' envelopes.
    let logged: i64 = support::sql()
        .await
        .query_one(
            "SELECT count(*) FROM updatepipe.log WHERE channel = $1 AND origin = $2",
            &[&channel, &a.origin().as_str()],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(logged, 3);
    assert!(b.stats().delivered >= sent.len() as u64, "{:?}", b.stats());
    a.close().await.unwrap();
    b.close().await.unwrap();
}

/// A subscription survives the listener's connection being terminated: the new session
/// LISTENs on the mailbox again, and a resync covers what maddy sent meanwhile (in
/// durable mode, where the log makes a reconnect no resync of its own, one naming the
/// mailbox; in best-effort mode the reconnect's resync, which covers everything).
#[test]
fn a_subscription_survives_a_reconnect() {
    let rt = support::runtime();
    let cluster = own_cluster();
    rt.block_on(async {
        let k = keys(4042);
        for durable in [false, true] {
            let channel = unique("maddy_reconnect");
            let config = cluster_config(cluster.port(), &channel)
                .with_layout(Layout::Maddy)
                .with_durable(durable);
            let app = config.pg().get_application_name().unwrap().to_owned();
            if durable {
                PgPipe::new(config.clone())
                    .unwrap()
                    .migrate()
                    .await
                    .unwrap();
            }
            let (pipe, mut events) = listening_events(config).await;
            pipe.subscribe(k.big).await.unwrap();
            let url = format!("postgres://postgres@127.0.0.1:{}/postgres", cluster.port());
            let maddy = MaddyNode::start(&url).await;
            let (admin, connection) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
                .await
                .unwrap();
            tokio::spawn(connection);
            let killed: i64 = admin
                .query_one(
                    "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity \
                     WHERE application_name IN ($1, $1 || '/listen')",
                    &[&app],
                )
                .await
                .unwrap()
                .get(0);
            assert!(killed >= 1, "the listener's connection is terminated");
            let expected = if durable {
                ResyncReason::Resubscribed {
                    keys: vec![MailboxKey::Id(k.big)],
                }
            } else {
                ResyncReason::Reconnected
            };
            // Lost, back, subscribed again, and told.
            loop {
                match next_event(&mut events).await {
                    Event::Resync(reason) if reason == expected => break,
                    Event::Disconnected { .. } | Event::Connected | Event::Position(_) => {}
                    other => panic!("durable {durable}: unexpected {other:?}"),
                }
            }
            let update = Update::expunge(k.big, SeqSet::single(1).unwrap());
            maddy.push(&update).await;
            assert_eq!(
                updates_exactly(&mut events, 1).await,
                [update],
                "durable {durable}"
            );
            pipe.close().await.unwrap();
        }
    });
}

#[tokio::test]
async fn signing_listeners_take_maddy_updates_only_when_told() {
    let channel = unique("maddy_signed");
    let secret = updatepipe::Secret::new("a shared secret, long enough").unwrap();
    let signed = maddy_layout(&channel).with_secrets(vec![secret]);
    let k = keys(5042);
    let maddy = MaddyNode::start(&support::url()).await;
    let (strict, mut strict_events) = listening_events(signed.clone()).await;
    let (open, mut open_events) =
        listening_events(signed.with_listen(|l| l.with_accept_maddy(true))).await;
    strict.subscribe(k.small).await.unwrap();
    open.subscribe(k.small).await.unwrap();
    let update = Update::mailbox_destroyed(k.small);
    maddy.push(&update).await;
    assert_eq!(updates_exactly(&mut open_events, 1).await, [update]);
    updates_exactly(&mut strict_events, 0).await;
    assert_eq!(rejected(&strict), 1);
    strict.close().await.unwrap();
    open.close().await.unwrap();
}

/// Payloads rejected, for every reason.
fn rejected(pipe: &PgPipe) -> u64 {
    pipe.stats().rejected.iter().map(|(_, n)| n).sum()
}

/// A key that cannot name a channel (64 bytes; PostgreSQL's limit is 63) has no maddy copy:
/// the push still delivers every update to updatepipe nodes, as the shared layout does,
/// and the copy left out is counted.
#[tokio::test]
async fn a_key_that_cannot_be_a_channel_loses_only_its_maddy_copy() {
    let channel = unique("maddy_long_key");
    let k = keys(6042);
    let mut maddy = MaddyNode::start(&support::url()).await;
    maddy.open(&MailboxKey::Id(k.small)).await;
    let (listener, mut events) = listening_events(maddy_layout(&channel)).await;
    let pusher = PgPipe::new(maddy_layout(&channel)).unwrap();
    let long = "l".repeat(64);
    assert!(MailboxKey::from(long.as_str()).maddy_channel().is_err());
    let updates = [
        Update::mailbox_destroyed(k.small),
        Update::mailbox_destroyed(long.as_str()),
    ];
    pusher.push_many(&updates).await.unwrap();
    assert_eq!(updates_exactly(&mut events, 2).await, updates);
    let heard = maddy.receive_exactly(1).await;
    assert_eq!(heard[0].0, channel_of(&MailboxKey::Id(k.small)));
    assert_eq!(pusher.stats().maddy_copies_unsent, 1);
    // One by one, too.
    pusher
        .push(&Update::mailbox_destroyed(long.as_str()))
        .await
        .unwrap();
    assert_eq!(updates_exactly(&mut events, 1).await.len(), 1);
    assert_eq!(pusher.stats().maddy_copies_unsent, 2);
    pusher.close().await.unwrap();
    listener.close().await.unwrap();
}

/// A maddy-form payload whose sender id is an updatepipe node's is the copy of an envelope
/// the listener hears anyway: left out, and counted, on the pipe's channel and on a
/// mailbox's.
#[tokio::test]
async fn maddy_copies_from_updatepipe_nodes_are_counted_when_left_out() {
    let channel = unique("maddy_copy_count");
    let k = keys(7042);
    let (listener, mut events) = listening_events(maddy_layout(&channel)).await;
    listener.subscribe(k.small).await.unwrap();
    let client = support::sql().await;
    let json = Update::mailbox_destroyed(k.small).to_json();
    let payload = format!("updatepipe-{:08x};{json}\n", rand::random::<u32>());
    for on in [channel.clone(), channel_of(&MailboxKey::Id(k.small))] {
        client
            .execute("SELECT pg_notify($1, $2)", &[&on, &payload])
            .await
            .unwrap();
    }
    // Both were read before this one, sent after them on the same connection.
    let other = PgPipe::new(maddy_layout(&channel)).unwrap();
    other.push(&Update::mailbox_destroyed(k.big)).await.unwrap();
    assert_eq!(
        updates_exactly(&mut events, 1).await,
        [Update::mailbox_destroyed(k.big)]
    );
    let stats = listener.stats();
    assert_eq!(stats.maddy_copies_ignored, 2, "{stats:?}");
    assert_eq!(stats.rejected_total(), 0, "{stats:?}");
    other.close().await.unwrap();
    listener.close().await.unwrap();
}
