//! Channel layouts: the shared channel of updatepipe's own envelopes, and maddy's channel
//! per mailbox, so that maddy IMAP nodes and updatepipe nodes share one database.
//! `docs/maddy.md` says what each side sees.

use std::fmt;
use std::str::FromStr;

use crate::channel::ChannelName;
use crate::error::Error;
use crate::origin::Origin;
use crate::update::MailboxKey;

/// Which channels a pipe speaks on.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Layout {
    /// One shared channel for every update, version 1 envelopes (sequenced, packed,
    /// optionally signed and durable): between updatepipe nodes only.
    #[default]
    Shared,
    /// The shared channel as above, and in the same transaction a copy of every update in
    /// maddy's form on its mailbox's channel ([`MailboxKey::maddy_channel`]), for maddy
    /// nodes. A listener also hears maddy's updates on the mailboxes it subscribes to
    /// ([`PgPipe::subscribe`](crate::PgPipe::subscribe)).
    Maddy,
}

impl Layout {
    /// Its name, as the CLI's `--layout` takes it.
    pub fn name(self) -> &'static str {
        match self {
            Layout::Shared => "shared",
            Layout::Maddy => "maddy",
        }
    }
}

impl fmt::Display for Layout {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Layout {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "shared" => Ok(Layout::Shared),
            "maddy" => Ok(Layout::Maddy),
            other => Err(Error::Config(format!(
                "unknown layout {other:?}: expected \"shared\" or \"maddy\""
            ))),
        }
    }
}

/// The prefix of every sender id updatepipe writes on maddy's channels. No maddy node's id
/// has it (maddy's are `<pid>-<pointer>`), so maddy never takes a copy for its own, and an
/// updatepipe listener knows the copy for one of ours (it has the envelope already).
pub const MADDY_SENDER_PREFIX: &str = "updatepipe-";

/// The prefix of maddy's channels for numeric keys.
const UINT64_PREFIX: &str = "__uint64_";

impl MailboxKey {
    /// The channel maddy uses for this mailbox: a string key as it is, a numeric key as
    /// `__uint64_<decimal>`. Fails when the key cannot be a channel name (empty, over 63
    /// bytes, or holding a NUL byte): maddy could not listen for that mailbox either.
    pub fn maddy_channel(&self) -> Result<ChannelName, Error> {
        match self {
            MailboxKey::Id(id) => ChannelName::new(format!("{UINT64_PREFIX}{id}")),
            MailboxKey::Name(name) if name.is_empty() => Err(Error::InvalidChannel(
                "an empty mailbox key cannot be a maddy channel",
            )),
            MailboxKey::Name(name) if name.len() > crate::channel::MAX_CHANNEL_LEN => Err(
                Error::InvalidChannel("a mailbox key over 63 bytes cannot be a maddy channel"),
            ),
            MailboxKey::Name(name) if name.contains('\0') => Err(Error::InvalidChannel(
                "a mailbox key holding a NUL byte cannot be a maddy channel",
            )),
            MailboxKey::Name(name) => ChannelName::new(name.as_str()),
        }
    }
}

/// The sender id of one copy on a maddy channel: [`MADDY_SENDER_PREFIX`], the pipe's
/// origin, and the copy's number (`updatepipe-<origin>.<n>`, at most 64 bytes). The number
/// makes every copy's payload unique, so PostgreSQL never folds two identical updates to
/// one mailbox in one transaction into one notification; maddy only compares the id with
/// its own, which it never equals.
pub(crate) fn maddy_sender_id(origin: &Origin, n: u64) -> String {
    format!("{MADDY_SENDER_PREFIX}{origin}.{n}")
}

/// Whether a sender id on a maddy channel is updatepipe's.
pub(crate) fn is_updatepipe_sender(sender: &str) -> bool {
    sender.starts_with(MADDY_SENDER_PREFIX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_map_to_maddy_channels() {
        let big = (1u64 << 53) + 1;
        assert_eq!(
            MailboxKey::Id(big).maddy_channel().unwrap().as_str(),
            "__uint64_9007199254740993"
        );
        assert_eq!(
            MailboxKey::Id(u64::MAX).maddy_channel().unwrap().as_str(),
            "__uint64_18446744073709551615"
        );
        assert_eq!(
            MailboxKey::from("INBOX;x")
                .maddy_channel()
                .unwrap()
                .as_str(),
            "INBOX;x"
        );
        for bad in ["", "a\0b"] {
            assert!(MailboxKey::from(bad).maddy_channel().is_err(), "{bad:?}");
        }
        assert!(MailboxKey::from("x".repeat(64)).maddy_channel().is_err());
        assert!(MailboxKey::from("x".repeat(63)).maddy_channel().is_ok());
    }

    #[test]
    fn sender_ids_are_ours_and_fit_an_origin() {
        let origin = Origin::random();
        let id = maddy_sender_id(&origin, u64::MAX);
        assert!(is_updatepipe_sender(&id));
        assert!(!id.contains(';'));
        assert!(Origin::parse(&id).is_ok(), "{id} reads back as an origin");
        assert!(!is_updatepipe_sender("4242-0xc000010000"));
    }

    #[test]
    fn layouts_parse() {
        assert_eq!("maddy".parse::<Layout>().unwrap(), Layout::Maddy);
        assert_eq!("shared".parse::<Layout>().unwrap(), Layout::Shared);
        assert!("both".parse::<Layout>().is_err());
        assert_eq!(Layout::default(), Layout::Shared);
    }
}
