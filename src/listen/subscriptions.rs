//! Subscriptions by mailbox (the maddy layout): which mailboxes' channels the listener
//! serves, reference-counted, and the `LISTEN`/`UNLISTEN` each change needs. Pure state; the
//! connection loop runs the statements, one at a time, in the order asked. On a reconnect
//! the whole set is `LISTEN`ed again by the new session, and the caller is told to resync
//! those mailboxes (maddy's updates are not logged: what was sent meanwhile is lost).

use std::collections::{HashMap, VecDeque};

use tokio::sync::oneshot;

use crate::channel::quote_identifier;
use crate::error::Error;
use crate::update::MailboxKey;

/// What the pipe asks the listener task.
#[derive(Debug)]
pub(crate) enum Command {
    Subscribe(MailboxKey, oneshot::Sender<Result<(), Error>>),
    Unsubscribe(MailboxKey, oneshot::Sender<Result<(), Error>>),
}

/// One subscribed channel: the key it was first asked for, and how many ask for it.
#[derive(Debug)]
struct Entry {
    key: MailboxKey,
    count: usize,
}

/// A change waiting for its turn: the statement it needs (none when only a count changed),
/// and who waits for it.
#[derive(Debug)]
struct Pending {
    sql: Option<String>,
    reply: oneshot::Sender<Result<(), Error>>,
}

/// The subscribed channels, and the changes not yet confirmed by the server.
#[derive(Debug, Default)]
pub(super) struct Subscriptions {
    channels: HashMap<String, Entry>,
    pending: VecDeque<Pending>,
    /// Who waits for the statement the connection loop runs now.
    running: Option<oneshot::Sender<Result<(), Error>>>,
}

impl Subscriptions {
    /// Applies a command to the set at once (so that the intake serves a channel from the
    /// moment it is asked for, and no longer once let go), and queues what the server must
    /// do. A key that cannot be a channel is answered at once.
    pub(super) fn apply(&mut self, command: Command) {
        let (sql, reply) = match command {
            Command::Subscribe(key, reply) => match key.maddy_channel() {
                Err(e) => {
                    let _ = reply.send(Err(e));
                    return;
                }
                Ok(channel) => (self.add(channel.as_str(), key), reply),
            },
            Command::Unsubscribe(key, reply) => match key.maddy_channel() {
                Err(_) => {
                    let _ = reply.send(Ok(()));
                    return;
                }
                Ok(channel) => (self.remove(channel.as_str()), reply),
            },
        };
        self.pending.push_back(Pending { sql, reply });
    }

    /// Counts one more subscriber; `LISTEN` for the first.
    fn add(&mut self, channel: &str, key: MailboxKey) -> Option<String> {
        let entry = self
            .channels
            .entry(channel.to_owned())
            .or_insert(Entry { key, count: 0 });
        entry.count += 1;
        (entry.count == 1).then(|| format!("LISTEN {}", quote_identifier(channel)))
    }

    /// Counts one subscriber less; `UNLISTEN` after the last (nothing for a channel not
    /// subscribed).
    fn remove(&mut self, channel: &str) -> Option<String> {
        let entry = self.channels.get_mut(channel)?;
        entry.count -= 1;
        if entry.count > 0 {
            return None;
        }
        self.channels.remove(channel);
        Some(format!("UNLISTEN {}", quote_identifier(channel)))
    }

    /// Whether the listener serves this channel for a subscription.
    pub(super) fn contains(&self, channel: &str) -> bool {
        self.channels.contains_key(channel)
    }

    /// The key a subscribed channel was asked for.
    pub(super) fn key(&self, channel: &str) -> Option<&MailboxKey> {
        self.channels.get(channel).map(|e| &e.key)
    }

    /// Every subscribed channel, for a new session to `LISTEN` on.
    pub(super) fn channels(&self) -> Vec<String> {
        let mut channels: Vec<String> = self.channels.keys().cloned().collect();
        channels.sort();
        channels
    }

    /// The subscribed mailboxes, for the resync after a reconnect (sorted by channel).
    pub(super) fn keys(&self) -> Vec<MailboxKey> {
        let mut entries: Vec<(&String, &Entry)> = self.channels.iter().collect();
        entries.sort_by(|a, b| a.0.cmp(b.0));
        entries.into_iter().map(|(_, e)| e.key.clone()).collect()
    }

    /// The next statement to run, when none is running; the changes before it that need
    /// none are answered now (in order: none overtakes a statement asked before it).
    pub(super) fn next_statement(&mut self) -> Option<String> {
        if self.running.is_some() {
            return None;
        }
        while let Some(pending) = self.pending.pop_front() {
            match pending.sql {
                None => {
                    let _ = pending.reply.send(Ok(()));
                }
                Some(sql) => {
                    self.running = Some(pending.reply);
                    return Some(sql);
                }
            }
        }
        None
    }

    /// The running statement succeeded. (One that fails ends the session: the next one
    /// `LISTEN`s on the whole set.)
    pub(super) fn done(&mut self) {
        if let Some(reply) = self.running.take() {
            let _ = reply.send(Ok(()));
        }
    }

    /// A new session has `LISTEN`ed on the whole set: what was waiting or running is done.
    pub(super) fn on_reconnect(&mut self) {
        self.done();
        for pending in self.pending.drain(..) {
            let _ = pending.reply.send(Ok(()));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ask(subs: &mut Subscriptions, subscribe: bool, key: MailboxKey) -> Option<String> {
        let (reply, _) = oneshot::channel();
        let command = if subscribe {
            Command::Subscribe(key, reply)
        } else {
            Command::Unsubscribe(key, reply)
        };
        subs.apply(command);
        let sql = subs.next_statement();
        subs.done();
        sql
    }

    #[test]
    fn counts_subscribers_and_listens_for_the_first_only() {
        let mut subs = Subscriptions::default();
        let big = MailboxKey::Id(u64::MAX);
        assert_eq!(
            ask(&mut subs, true, big.clone()).as_deref(),
            Some("LISTEN \"__uint64_18446744073709551615\"")
        );
        assert_eq!(ask(&mut subs, true, big.clone()), None);
        // The same channel by its string name counts as the same subscription.
        assert_eq!(
            ask(&mut subs, true, "__uint64_18446744073709551615".into()),
            None
        );
        assert!(subs.contains("__uint64_18446744073709551615"));
        assert_eq!(subs.keys(), vec![big.clone()]);
        assert_eq!(ask(&mut subs, false, big.clone()), None);
        assert_eq!(ask(&mut subs, false, big.clone()), None);
        assert_eq!(
            ask(&mut subs, false, big.clone()).as_deref(),
            Some("UNLISTEN \"__uint64_18446744073709551615\"")
        );
        assert!(!subs.contains("__uint64_18446744073709551615"));
        assert_eq!(ask(&mut subs, false, big), None, "not subscribed: nothing");
    }

    #[test]
    fn quotes_channels_and_refuses_keys_that_are_none() {
        let mut subs = Subscriptions::default();
        assert_eq!(
            ask(&mut subs, true, "In\"box;x".into()).as_deref(),
            Some("LISTEN \"In\"\"box;x\"")
        );
        let (reply, mut answer) = oneshot::channel();
        subs.apply(Command::Subscribe("".into(), reply));
        assert!(matches!(
            answer.try_recv(),
            Ok(Err(Error::InvalidChannel(_)))
        ));
        assert!(subs.next_statement().is_none());
        assert_eq!(subs.channels(), ["In\"box;x"]);
    }

    #[test]
    fn one_statement_at_a_time_in_order() {
        let mut subs = Subscriptions::default();
        let (first, mut first_answer) = oneshot::channel();
        let (second, mut second_answer) = oneshot::channel();
        subs.apply(Command::Subscribe(1u64.into(), first));
        subs.apply(Command::Subscribe(1u64.into(), second));
        assert_eq!(
            subs.next_statement().as_deref(),
            Some("LISTEN \"__uint64_1\"")
        );
        assert_eq!(subs.next_statement(), None, "one runs");
        assert!(first_answer.try_recv().is_err() && second_answer.try_recv().is_err());
        subs.done();
        assert_eq!(subs.next_statement(), None);
        assert!(matches!(first_answer.try_recv(), Ok(Ok(()))));
        assert!(
            matches!(second_answer.try_recv(), Ok(Ok(()))),
            "answered after the first"
        );
    }

    #[test]
    fn a_reconnect_answers_what_waits() {
        let mut subs = Subscriptions::default();
        let (reply, mut answer) = oneshot::channel();
        subs.apply(Command::Subscribe(7u64.into(), reply));
        assert!(subs.next_statement().is_some());
        subs.on_reconnect();
        assert!(matches!(answer.try_recv(), Ok(Ok(()))));
        assert_eq!(subs.channels(), ["__uint64_7"]);
    }
}
