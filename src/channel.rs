//! The notification channel's name, validated and quoted.

use std::fmt;
use std::str::FromStr;

use crate::error::Error;

/// The longest channel name PostgreSQL keeps, in bytes (`NAMEDATALEN - 1`).
pub const MAX_CHANNEL_LEN: usize = 63;

/// A PostgreSQL notification channel name: 1 to 63 bytes, no NUL byte.
///
/// The name is used exactly as given: `pg_notify` takes it verbatim, and `LISTEN` receives it
/// quoted as an identifier ([`ChannelName::quoted`]), so `MixedCase`, `with space` and
/// `quo"te` all work. (An unquoted `LISTEN MixedCase` would listen on `mixedcase` and never
/// hear a `pg_notify('MixedCase', …)`.)
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ChannelName(String);

impl ChannelName {
    /// The default channel, `updatepipe`.
    pub const DEFAULT: &'static str = "updatepipe";

    /// Validates a channel name.
    pub fn new(name: impl Into<String>) -> Result<Self, Error> {
        let name = name.into();
        if name.is_empty() {
            return Err(Error::InvalidChannel("a channel name cannot be empty"));
        }
        if name.len() > MAX_CHANNEL_LEN {
            return Err(Error::InvalidChannel(
                "a channel name is at most 63 bytes (PostgreSQL would cut it short)",
            ));
        }
        if name.contains('\0') {
            return Err(Error::InvalidChannel(
                "a channel name cannot contain a NUL byte",
            ));
        }
        Ok(ChannelName(name))
    }

    /// The name as given.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The name quoted as an SQL identifier: wrapped in `"`, with every `"` doubled.
    pub fn quoted(&self) -> String {
        quote_identifier(&self.0)
    }

    /// Whether this is the channel maddy uses for a numeric mailbox key
    /// (`__uint64_<decimal>`): maddy's nodes listening on that mailbox would read the pipe's
    /// envelopes and heartbeats as updates, and log an error for each. The CLI refuses such a
    /// pipe channel; a listening pipe warns.
    pub fn is_maddy_mailbox(&self) -> bool {
        self.0
            .strip_prefix("__uint64_")
            .is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
    }
}

/// Quotes an SQL identifier: wraps it in `"` and doubles every `"` inside.
pub(crate) fn quote_identifier(name: &str) -> String {
    let mut quoted = String::with_capacity(name.len() + 2);
    quoted.push('"');
    for c in name.chars() {
        if c == '"' {
            quoted.push('"');
        }
        quoted.push(c);
    }
    quoted.push('"');
    quoted
}

impl Default for ChannelName {
    fn default() -> Self {
        ChannelName(Self::DEFAULT.to_owned())
    }
}

impl FromStr for ChannelName {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        ChannelName::new(s)
    }
}

impl fmt::Display for ChannelName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for ChannelName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ChannelName({:?})", self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tells_a_maddy_mailboxs_channel() {
        for (name, mailbox) in [
            ("__uint64_42", true),
            ("__uint64_18446744073709551615", true),
            ("__uint64_", false),
            ("__uint64_4x", false),
            ("updatepipe", false),
            ("INBOX", false),
        ] {
            assert_eq!(
                ChannelName::new(name).unwrap().is_maddy_mailbox(),
                mailbox,
                "{name}"
            );
        }
    }

    #[test]
    fn accepts_names_up_to_63_bytes() {
        assert!(ChannelName::new("a").is_ok());
        assert!(ChannelName::new("x".repeat(63)).is_ok());
        // 21 three-byte characters: 63 bytes.
        assert!(ChannelName::new("€".repeat(21)).is_ok());
    }

    #[test]
    fn rejects_empty_long_and_nul() {
        assert!(ChannelName::new("").is_err());
        assert!(ChannelName::new("x".repeat(64)).is_err());
        assert!(ChannelName::new("€".repeat(22)).is_err());
        assert!(ChannelName::new("a\0b").is_err());
    }

    #[test]
    fn quotes_as_identifier() {
        assert_eq!(
            ChannelName::new("MixedCase").unwrap().quoted(),
            "\"MixedCase\""
        );
        assert_eq!(
            ChannelName::new("with space").unwrap().quoted(),
            "\"with space\""
        );
        assert_eq!(
            ChannelName::new("quo\"te").unwrap().quoted(),
            "\"quo\"\"te\""
        );
        assert_eq!(ChannelName::new("\"").unwrap().quoted(), "\"\"\"\"");
    }

    #[test]
    fn default_is_updatepipe() {
        assert_eq!(ChannelName::default().as_str(), "updatepipe");
    }
}
