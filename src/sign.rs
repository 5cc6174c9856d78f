//! Signed envelopes: HMAC-SHA256 over each envelope with a shared secret, and the listener's
//! defence against replays. `docs/security.md` says what this protects and what it does not.
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

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use hmac::{Hmac, Mac};
use sha2::Sha256;

use crate::channel::ChannelName;
use crate::error::{DecodeError, Error, ReplayKind};
use crate::origin::Origin;

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

/// The most hole ranges remembered per sender (see [`ReplayGuard`]).
const MAX_HOLES: usize = 4096;

/// The most senders whose numbers a listener remembers at once.
const MAX_SENDERS: usize = 65_536;

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
    /// A file larger than [`MAX_SECRET_FILE_LEN`] is refused, and no more than that is read
    /// (a path such as `/dev/zero` cannot make it allocate more).
    pub fn read_file(path: &Path) -> Result<Vec<Secret>, Error> {
        use std::io::Read;
        let shown = path.display();
        let cannot_read =
            |e: std::io::Error| Error::Config(format!("cannot read the secret file {shown}: {e}"));
        let mut text = Vec::new();
        std::fs::File::open(path)
            .and_then(|file| {
                file.take(MAX_SECRET_FILE_LEN as u64 + 1)
                    .read_to_end(&mut text)
            })
            .map_err(cannot_read)?;
        if text.len() > MAX_SECRET_FILE_LEN {
            return Err(Error::Config(format!(
                "the secret file {shown} is larger than {MAX_SECRET_FILE_LEN} bytes: is it the \
                 right file? (one secret per line)"
            )));
        }
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
        tracing::warn!(target: "updatepipe::sign", path = %path.display(), "the secret file can be read by other users; chmod 600 it");
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

/// Remembers which envelope numbers each sender has used, so that a signed envelope seen
/// once is refused the next time.
///
/// Per sender and number range (pool pushes and pushes in callers' transactions are numbered
/// apart), it keeps the highest number seen and the ranges below it not yet seen ("holes").
/// A number below the highest is accepted once if it falls in a hole. Holes are forgotten
/// two replay windows after they open, the oldest first when a sender has more than
/// [`MAX_HOLES`]; a forgotten hole only refuses more. A sender
/// is forgotten when not heard from for twice the window: by then its envelopes are refused
/// by their time anyway, even from a sender whose clock runs a whole window ahead. A new
/// sender's numbers below its first are one hole, so a transaction that commits after a
/// later one is not mistaken for a replay (the price: an envelope sent before this listener
/// first heard from its sender, and still within the window, is accepted once).
#[derive(Debug, Default)]
pub(crate) struct ReplayGuard {
    senders: HashMap<Origin, Sender>,
    /// When to look for quiet senders next.
    next_sweep: Option<Instant>,
}

/// One sender's numbers, per range: pool pushes, then pushes in callers' transactions.
#[derive(Debug, Default)]
struct Sender {
    ranges: [Option<Numbers>; 2],
}

impl Sender {
    /// When it was last heard from, in either range.
    fn seen(&self) -> Option<Instant> {
        self.ranges.iter().flatten().map(|n| n.seen).max()
    }
}

#[derive(Debug)]
struct Numbers {
    top: u64,
    seen: Instant,
    /// Unseen ranges below `top`: start → (end inclusive, when it opened).
    holes: BTreeMap<u64, (u64, Instant)>,
}

impl ReplayGuard {
    /// Accepts `seq` from `origin` (in the transactional range or not) if it was not seen
    /// before, and remembers it.
    pub(crate) fn check(
        &mut self,
        origin: &Origin,
        transactional: bool,
        seq: u64,
        now: Instant,
        window: Duration,
    ) -> Result<(), DecodeError> {
        if self.next_sweep.is_none_or(|at| now >= at) {
            self.forget_quiet(now, window);
            self.next_sweep = Some(now + window);
        }
        if !self.senders.contains_key(origin) {
            if self.senders.len() >= MAX_SENDERS {
                // Only holders of a secret get here; forget the quietest.
                if let Some(quiet) = self
                    .senders
                    .iter()
                    .min_by_key(|(_, sender)| sender.seen())
                    .map(|(origin, _)| origin.clone())
                {
                    self.senders.remove(&quiet);
                }
            }
            self.senders.insert(origin.clone(), Sender::default());
        }
        let sender = self.senders.get_mut(origin).expect("inserted above");
        let Some(numbers) = &mut sender.ranges[usize::from(transactional)] else {
            let mut holes = BTreeMap::new();
            if seq > 0 {
                holes.insert(0, (seq - 1, now));
            }
            sender.ranges[usize::from(transactional)] = Some(Numbers {
                top: seq,
                seen: now,
                holes,
            });
            return Ok(());
        };
        numbers.seen = now;
        // Holes open in number order as the top moves up, so the oldest come first. A hole
        // may still be filled two windows after it opened (its envelope was stamped up to a
        // window after the one that opened it, by a clock ahead, and is on time for one
        // window more); after that, anything filling it is refused by its time anyway.
        let expiry = window.saturating_mul(2);
        while let Some(entry) = numbers.holes.first_entry() {
            if now.duration_since(entry.get().1) <= expiry {
                break;
            }
            entry.remove();
        }
        if seq > numbers.top {
            if seq > numbers.top + 1 {
                numbers.holes.insert(numbers.top + 1, (seq - 1, now));
            }
            numbers.top = seq;
        } else {
            let Some((&start, &(end, opened))) = numbers.holes.range(..=seq).next_back() else {
                return Err(DecodeError::Replayed(ReplayKind::Number));
            };
            if seq > end {
                return Err(DecodeError::Replayed(ReplayKind::Number));
            }
            numbers.holes.remove(&start);
            if start < seq {
                numbers.holes.insert(start, (seq - 1, opened));
            }
            if seq < end {
                numbers.holes.insert(seq + 1, (end, opened));
            }
        }
        while numbers.holes.len() > MAX_HOLES {
            // The oldest goes: only refusing more.
            numbers.holes.pop_first();
        }
        Ok(())
    }

    /// Forgets the senders not heard from within twice `window`.
    pub(crate) fn forget_quiet(&mut self, now: Instant, window: Duration) {
        let quiet = window.saturating_mul(2);
        self.senders.retain(|_, sender| {
            sender
                .seen()
                .is_some_and(|seen| now.duration_since(seen) <= quiet)
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::envelope::Envelope;
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
            // An endless file is cut off at the bound, not read into memory.
            let err = Secret::read_file(Path::new("/dev/zero"))
                .unwrap_err()
                .to_string();
            assert!(err.contains("larger than"), "{err}");
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

    #[test]
    fn replay_guard_accepts_each_number_once_in_any_order() {
        let mut g = ReplayGuard::default();
        let o = Origin::parse("a").unwrap();
        let now = Instant::now();
        let w = Duration::from_secs(60);
        let mut check = |seq, tx| g.check(&o, tx, seq, now, w);
        let replay = Err(DecodeError::Replayed(ReplayKind::Number));
        check(10, false).unwrap();
        assert_eq!(check(10, false), replay);
        // Below the first: a late commit is accepted once.
        check(4, false).unwrap();
        assert_eq!(check(4, false), replay);
        check(14, false).unwrap();
        // Holes filled in any order, each once.
        for seq in [12, 11, 13] {
            check(seq, false).unwrap();
        }
        for seq in [11, 12, 13, 14] {
            assert_eq!(check(seq, false), replay);
        }
        // The other range has its own numbers.
        check(10, true).unwrap();
        assert_eq!(check(10, true), replay);
    }

    #[test]
    fn replay_guard_bounds_the_holes_of_a_sender() {
        let mut g = ReplayGuard::default();
        let o = Origin::parse("a").unwrap();
        let now = Instant::now();
        let w = Duration::from_secs(60);
        // Every other number below the first: each fill splits the initial hole.
        g.check(&o, false, 20_000, now, w).unwrap();
        for seq in (1..20_000).step_by(2) {
            g.check(&o, false, seq, now, w).unwrap();
        }
        let numbers = g.senders[&o].ranges[0].as_ref().unwrap();
        assert!(numbers.holes.len() <= MAX_HOLES);
    }

    #[test]
    fn replay_guard_forgets_only_what_the_time_check_covers() {
        let mut g = ReplayGuard::default();
        let o = Origin::parse("a").unwrap();
        let w = Duration::from_secs(60);
        let start = Instant::now();
        g.check(&o, false, 5, start, w).unwrap();
        g.check(&o, false, 8, start, w).unwrap();
        // Hole 6..7 is still open after one window (a clock ahead may stamp late)...
        g.check(&o, false, 6, start + Duration::from_secs(119), w)
            .unwrap();
        // ...and has expired after two: anything that could fill it is stale by now.
        let later = start + Duration::from_secs(121);
        assert!(g.check(&o, false, 7, later, w).is_err());
        g.forget_quiet(later + 2 * w - Duration::from_secs(1), w);
        assert_eq!(g.senders.len(), 1);
        g.forget_quiet(later + 2 * w + Duration::from_secs(1), w);
        assert!(g.senders.is_empty());
    }
}
