//! Signed envelopes: HMAC-SHA256 over each envelope with a shared secret, and the time check
//! against replays (the listener's memory of numbers is `listen::replay`).
//! `docs/security.md` says what this protects and what it does not.
//!
//! A signed envelope is a version 1 envelope with two more fields: `"w"`, the time it was
//! sealed (milliseconds since the Unix epoch, by the sender's clock), before `"u"`; and
//! `"g"`, the signature, as its last field:
//!
//! ```text
//! {"v":1,"o":"…","p":7,"s":3,"w":1700000000000,"u":[…],"g":"<64 hex digits>"}
//! ```
//!
//! The signature is `HMAC-SHA256(secret, "updatepipe-sig-v1" ‖ 0 ‖ channel ‖ 0 ‖ body)`,
//! where `body` is the payload up to (not including) `,"g":"`. The channel is part of it, so
//! an envelope cannot be replayed on another channel that shares the secret.

use std::fmt;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use hmac::{Hmac, Mac};
use sha2::Sha256;

use crate::channel::ChannelName;
use crate::error::{DecodeError, Error, ReplayKind};

type HmacSha256 = Hmac<Sha256>;

/// The largest secret file [`Secret::read_file`] reads, in bytes: room for a thousand
/// secrets of 64 bytes.
pub const MAX_SECRET_FILE_LEN: usize = 64 * 1024;

/// The shortest secret accepted, in bytes.
pub const MIN_SECRET_LEN: usize = 16;

/// The default replay window: how far a signed notification's time may be from the
/// listener's clock.
pub const DEFAULT_REPLAY_WINDOW: Duration = Duration::from_secs(300);

const DOMAIN: &[u8] = b"updatepipe-sig-v1";

/// What a signed payload ends with: `,"g":"`, 64 hex digits, `"}`.
const SIG_PREFIX: &str = ",\"g\":\"";
const SIG_HEX_LEN: usize = 64;
pub(crate) const SIG_SUFFIX_LEN: usize = SIG_PREFIX.len() + SIG_HEX_LEN + 2;

/// A shared signing secret. Its bytes never appear in `Debug` output, logs or errors.
#[derive(Clone)]
pub struct Secret(Arc<[u8]>);

impl Secret {
    /// A secret of at least [`MIN_SECRET_LEN`] bytes (32 random bytes, or a long random
    /// string, is right).
    pub fn new(bytes: impl Into<Vec<u8>>) -> Result<Self, Error> {
        Secret::checked(bytes.into()).map_err(Error::Config)
    }

    /// The secret, or why it is refused (without the "invalid configuration" of
    /// [`Error::Config`], which the caller adds once).
    fn checked(bytes: Vec<u8>) -> Result<Self, String> {
        if bytes.len() < MIN_SECRET_LEN {
            return Err(format!(
                "a signing secret needs at least {MIN_SECRET_LEN} bytes, this one has {}",
                bytes.len()
            ));
        }
        Ok(Secret(bytes.into()))
    }

    /// Reads secrets from a file, one per line (without its line end); empty lines are
    /// skipped. The first signs, every one verifies: to rotate, put the new secret on every
    /// listener's second line, then first everywhere, then drop the old one.
    ///
    /// Warns when the file can be read by other users.
    ///
    /// Only a regular file (after symbolic links) is read: a directory, a FIFO (which
    /// would block the start until a writer came), a socket or a device is refused, as is a
    /// file larger than [`MAX_SECRET_FILE_LEN`] (no more than that is read).
    pub fn read_file(path: &Path) -> Result<Vec<Secret>, Error> {
        let shown = path.display();
        let text = crate::pg::read_regular(path, MAX_SECRET_FILE_LEN as u64)
            .map_err(|e| Error::Config(format!("the secret file: {e}")))?
            .ok_or_else(|| {
                Error::Config(format!(
                    "cannot read the secret file {shown}: it does not exist"
                ))
            })?;
        warn_if_readable_by_others(path);
        let mut secrets = Vec::new();
        for (n, line) in text.split(|&b| b == b'\n').enumerate() {
            let line = line.strip_suffix(b"\r").unwrap_or(line);
            if line.is_empty() {
                continue;
            }
            secrets.push(Secret::checked(line.to_vec()).map_err(|e| {
                Error::Config(format!("line {} of the secret file {shown}: {e}", n + 1))
            })?);
        }
        if secrets.is_empty() {
            return Err(Error::Config(format!(
                "the secret file {shown} holds no secret (one per line)"
            )));
        }
        Ok(secrets)
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(<redacted>)")
    }
}

#[cfg(unix)]
fn warn_if_readable_by_others(path: &Path) {
    use std::os::unix::fs::PermissionsExt;
    if let Ok(meta) = std::fs::metadata(path)
        && meta.permissions().mode() & 0o077 != 0
    {
        tracing::warn!(
            target: "updatepipe::sign",
            path = %path.display(),
            "the secret file can be read by other users; chmod 600 it"
        );
    }
}

#[cfg(not(unix))]
fn warn_if_readable_by_others(_: &Path) {}

/// Seals and checks envelopes on one channel with a list of secrets: the first signs, any
/// verifies.
#[derive(Clone)]
pub struct Signer {
    secrets: Arc<[Secret]>,
    channel: ChannelName,
}

impl fmt::Debug for Signer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Signer")
            .field("secrets", &self.secrets.len())
            .field("channel", &self.channel)
            .finish()
    }
}

impl Signer {
    /// A signer for `channel`. Fails without a secret.
    pub fn new(secrets: Vec<Secret>, channel: ChannelName) -> Result<Self, Error> {
        if secrets.is_empty() {
            return Err(Error::Config("signing needs at least one secret".into()));
        }
        Ok(Signer::from_parts(secrets, channel))
    }

    /// A signer from at least one secret.
    pub(crate) fn from_parts(secrets: Vec<Secret>, channel: ChannelName) -> Self {
        debug_assert!(!secrets.is_empty());
        Signer {
            secrets: secrets.into(),
            channel,
        }
    }

    /// Signs an unsigned version 1 payload (as [`Envelope::encode_v1`] writes it), stamping
    /// it with `sent_at`. For other implementations' test vectors and for tests; pipes sign
    /// what they send by themselves.
    ///
    /// [`Envelope::encode_v1`]: crate::Envelope::encode_v1
    pub fn seal(&self, payload: &str, sent_at: SystemTime) -> Result<String, Error> {
        let at = payload
            .find(",\"u\":[")
            .filter(|_| payload.starts_with("{\"v\":1,") && payload.ends_with("]}"))
            .ok_or_else(|| {
                Error::Config("only an unsigned version 1 envelope can be sealed".into())
            })?;
        let mut out = String::with_capacity(payload.len() + 96);
        out.push_str(&payload[..at]);
        push_time(&mut out, sent_at);
        out.push_str(&payload[at..]);
        self.sign(&mut out);
        Ok(out)
    }

    /// Appends the signature to a complete unsigned body (ending in `}`).
    pub(crate) fn sign(&self, body: &mut String) {
        debug_assert!(body.ends_with('}'));
        body.pop();
        let tag = self.mac(&self.secrets[0], body.as_bytes()).finalize();
        body.push_str(SIG_PREFIX);
        for byte in tag.into_bytes() {
            body.push(char::from(HEX[usize::from(byte >> 4)]));
            body.push(char::from(HEX[usize::from(byte & 0xf)]));
        }
        body.push_str("\"}");
    }

    /// Checks a payload's signature against every secret, in constant time per secret.
    pub fn verify(&self, payload: &str) -> Result<(), DecodeError> {
        let bytes = payload.as_bytes();
        let Some(start) = bytes.len().checked_sub(SIG_SUFFIX_LEN) else {
            return Err(DecodeError::Unsigned);
        };
        let (body, suffix) = bytes.split_at(start);
        let Some(hex) = suffix
            .strip_prefix(SIG_PREFIX.as_bytes())
            .and_then(|rest| rest.strip_suffix(b"\"}"))
        else {
            return Err(DecodeError::Unsigned);
        };
        let tag = decode_hex(hex).ok_or(DecodeError::Forged)?;
        let valid = self
            .secrets
            .iter()
            .any(|secret| self.mac(secret, body).verify_slice(&tag).is_ok());
        if valid {
            Ok(())
        } else {
            Err(DecodeError::Forged)
        }
    }

    fn mac(&self, secret: &Secret, body: &[u8]) -> HmacSha256 {
        let mut mac =
            HmacSha256::new_from_slice(&secret.0).expect("HMAC takes a key of any length");
        mac.update(DOMAIN);
        mac.update(&[0]);
        mac.update(self.channel.as_str().as_bytes());
        mac.update(&[0]);
        mac.update(body);
        mac
    }
}

const HEX: &[u8; 16] = b"0123456789abcdef";

fn decode_hex(hex: &[u8]) -> Option<[u8; 32]> {
    let nibble = |c: u8| match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        _ => None,
    };
    let mut out = [0u8; 32];
    for (byte, pair) in out.iter_mut().zip(hex.chunks_exact(2)) {
        *byte = nibble(pair[0])? << 4 | nibble(pair[1])?;
    }
    Some(out)
}

/// Writes the `"w":<ms>,` field.
pub(crate) fn push_time(out: &mut String, at: SystemTime) {
    use std::fmt::Write;
    let ms = at
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
    let _ = write!(out, ",\"w\":{ms}");
}

/// Whether a signed envelope's time is within `window` of `now`, either way.
pub(crate) fn check_time(
    sent_at: Option<SystemTime>,
    now: SystemTime,
    window: Duration,
) -> Result<(), DecodeError> {
    let sent_at = sent_at.ok_or(DecodeError::Replayed(ReplayKind::Stale))?;
    let skew = now.duration_since(sent_at).unwrap_or_else(|e| e.duration());
    if skew > window {
        return Err(DecodeError::Replayed(ReplayKind::Stale));
    }
    Ok(())
}

/// Whether a signed envelope read from a durable log row was sent when that row was
/// written: no earlier than `window` before the row's time (the server's clock, set by the
/// server whatever the writer says), and no later than `window` after `now`.
pub(crate) fn check_sent_after(
    sent_at: Option<SystemTime>,
    written: SystemTime,
    now: SystemTime,
    window: Duration,
) -> Result<(), DecodeError> {
    let sent_at = sent_at.ok_or(DecodeError::Replayed(ReplayKind::Stale))?;
    if sent_at + window < written || sent_at > now + window {
        return Err(DecodeError::Replayed(ReplayKind::Stale));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::envelope::Envelope;
    use crate::origin::Origin;
    use crate::update::Update;

    fn secret(text: &str) -> Secret {
        Secret::new(text.repeat(16)).unwrap()
    }

    fn signer(secrets: &[&str]) -> Signer {
        Signer::new(
            secrets.iter().map(|s| secret(s)).collect(),
            ChannelName::new("mail").unwrap(),
        )
        .unwrap()
    }

    fn unsigned() -> String {
        Envelope::encode_v1(
            &Origin::parse("abc").unwrap(),
            7,
            3,
            &[Update::mailbox_destroyed(5)],
        )
        .unwrap()
    }

    #[test]
    fn sealed_envelopes_verify_and_decode() {
        let s = signer(&["a"]);
        let at = UNIX_EPOCH + Duration::from_millis(1_700_000_000_123);
        let sealed = s.seal(&unsigned(), at).unwrap();
        assert!(sealed.starts_with(r#"{"v":1,"o":"abc","p":7,"s":3,"w":1700000000123,"u":["#));
        assert!(sealed.ends_with("\"}"));
        s.verify(&sealed).unwrap();
        let env = Envelope::decode(&sealed).unwrap();
        assert_eq!(env.sent_at(), Some(at));
        assert_eq!(env.updates(), &[Update::mailbox_destroyed(5)]);
    }

    #[test]
    fn unsigned_forged_and_foreign_are_refused() {
        let s = signer(&["a"]);
        assert_eq!(s.verify(&unsigned()), Err(DecodeError::Unsigned));
        assert_eq!(s.verify(""), Err(DecodeError::Unsigned));
        let sealed = s.seal(&unsigned(), SystemTime::now()).unwrap();
        // One byte of the body changed.
        let forged = sealed.replacen("\"Key\":5", "\"Key\":6", 1);
        assert_eq!(s.verify(&forged), Err(DecodeError::Forged));
        // Not hex.
        let mut bad = sealed.clone();
        bad.replace_range(bad.len() - 4..bad.len() - 2, "zz");
        assert_eq!(s.verify(&bad), Err(DecodeError::Forged));
        // Another secret, or another channel.
        assert_eq!(signer(&["b"]).verify(&sealed), Err(DecodeError::Forged));
        let other_channel =
            Signer::new(vec![secret("a")], ChannelName::new("other").unwrap()).unwrap();
        assert_eq!(other_channel.verify(&sealed), Err(DecodeError::Forged));
    }

    #[test]
    fn rotation_signs_with_the_first_and_accepts_any() {
        let old = signer(&["old"]);
        let both = signer(&["new", "old"]);
        let new = signer(&["new"]);
        let from_old = old.seal(&unsigned(), SystemTime::now()).unwrap();
        let from_both = both.seal(&unsigned(), SystemTime::now()).unwrap();
        both.verify(&from_old).unwrap();
        new.verify(&from_both).unwrap();
        assert_eq!(old.verify(&from_both), Err(DecodeError::Forged));
    }

    #[test]
    fn secrets_are_never_shown() {
        let s = Secret::new("correct horse battery staple").unwrap();
        assert_eq!(format!("{s:?}"), "Secret(<redacted>)");
        let signer = Signer::new(vec![s], ChannelName::default()).unwrap();
        assert!(!format!("{signer:?}").contains("horse"));
        let short = Secret::new("short").unwrap_err().to_string();
        assert!(!short.contains("short"), "{short}");
    }

    #[test]
    fn secret_file_reads_one_per_line() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("secrets");
        std::fs::write(
            &path,
            "first-secret-0123456789\r\n\nsecond-secret-0123456789\n",
        )
        .unwrap();
        let secrets = Secret::read_file(&path).unwrap();
        assert_eq!(secrets.len(), 2);
        assert_eq!(&*secrets[1].0, b"second-secret-0123456789");
        std::fs::write(&path, "long-enough-secret-1\ntiny\n").unwrap();
        let err = Secret::read_file(&path).unwrap_err().to_string();
        assert!(err.contains("line 2") && !err.contains("tiny"), "{err}");
        assert_eq!(err.matches("invalid configuration").count(), 1, "{err}");
        std::fs::write(&path, vec![b'x'; MAX_SECRET_FILE_LEN + 1]).unwrap();
        let err = Secret::read_file(&path).unwrap_err().to_string();
        assert!(err.contains("larger than 65536 bytes"), "{err}");
        #[cfg(unix)]
        {
            // A device (an endless file), a directory and a FIFO without a writer (which
            // would block the read for good) are refused, not read.
            for path in [Path::new("/dev/zero"), dir.path()] {
                let err = Secret::read_file(path).unwrap_err().to_string();
                assert!(err.contains("give the path of a regular file"), "{err}");
            }
            let fifo = dir.path().join("fifo");
            let made = std::process::Command::new("mkfifo").arg(&fifo).status();
            if made.is_ok_and(|s| s.success()) {
                let err = Secret::read_file(&fifo).unwrap_err().to_string();
                assert!(err.contains("not a regular file"), "{err}");
            }
            // A link to a regular file is read.
            let link = dir.path().join("link");
            std::fs::write(&path, "long-enough-secret-1\n").unwrap();
            std::os::unix::fs::symlink(&path, &link).unwrap();
            assert_eq!(Secret::read_file(&link).unwrap().len(), 1);
        }
        std::fs::write(&path, "\n\n").unwrap();
        assert!(Secret::read_file(&path).is_err());
        assert!(Secret::read_file(&dir.path().join("absent")).is_err());
    }

    #[test]
    fn time_window_both_ways() {
        let now = SystemTime::now();
        let w = Duration::from_secs(60);
        check_time(Some(now - Duration::from_secs(59)), now, w).unwrap();
        check_time(Some(now + Duration::from_secs(59)), now, w).unwrap();
        let stale = Err(DecodeError::Replayed(ReplayKind::Stale));
        assert_eq!(
            check_time(Some(now - Duration::from_secs(61)), now, w),
            stale
        );
        assert_eq!(
            check_time(Some(now + Duration::from_secs(61)), now, w),
            stale
        );
        assert_eq!(check_time(None, now, w), stale);
    }
}
