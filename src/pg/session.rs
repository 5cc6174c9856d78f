//! The session settings the pipe sets on its own connections once connected: backstops to
//! its own deadlines (`statement_timeout`, `lock_timeout`,
//! `idle_in_transaction_session_timeout`), and how it reads the server's time settings.

use std::time::Duration;

/// The default `statement_timeout` the pipe sets on its own connections (every statement
/// also has a deadline of its own).
pub const DEFAULT_STATEMENT_TIMEOUT: Duration = Duration::from_secs(60);

/// The default `lock_timeout` the pipe sets on its own connections.
pub const DEFAULT_LOCK_TIMEOUT: Duration = Duration::from_secs(30);

/// The default `idle_in_transaction_session_timeout` the pipe sets on its own connections.
pub const DEFAULT_IDLE_IN_TRANSACTION_TIMEOUT: Duration = Duration::from_secs(60);

/// The session settings the pipe sets on its own connections (the pool's and the
/// listener's; not the caller's in [`push_in`](crate::PgPipe::push_in)), a backstop to its
/// own deadlines: every statement the pipe sends has a deadline of its own, past which it
/// is cancelled. Zero leaves the server's setting alone.
///
/// They are set by a `SET` after connecting, not as startup parameters (which PgBouncer
/// refuses). Behind a transaction-pooling proxy a `SET` reaches whichever server connection
/// runs it and stays there: set them to zero there and use `ALTER ROLE ... SET` instead.
/// ([`Config::with_session`](crate::Config::with_session) sets them.)
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SessionLimits {
    statement_timeout: Duration,
    lock_timeout: Duration,
    idle_in_transaction_timeout: Duration,
}

impl Default for SessionLimits {
    fn default() -> Self {
        SessionLimits {
            statement_timeout: DEFAULT_STATEMENT_TIMEOUT,
            lock_timeout: DEFAULT_LOCK_TIMEOUT,
            idle_in_transaction_timeout: DEFAULT_IDLE_IN_TRANSACTION_TIMEOUT,
        }
    }
}

impl SessionLimits {
    /// `statement_timeout` (default 60 s; zero: the server's).
    pub fn with_statement_timeout(mut self, timeout: Duration) -> Self {
        self.statement_timeout = timeout;
        self
    }

    /// `lock_timeout` (default 30 s; zero: the server's). It also bounds how long
    /// [`migrate`](crate::PgPipe::migrate) and [`grant`](crate::PgPipe::grant) wait for
    /// the migration lock, and a migration for a lock on the log's tables (30 s when zero),
    /// before failing with [`Error::LockHeld`](crate::Error::LockHeld), which names the
    /// sessions holding it.
    pub fn with_lock_timeout(mut self, timeout: Duration) -> Self {
        self.lock_timeout = timeout;
        self
    }

    /// `idle_in_transaction_session_timeout` (default 60 s; zero: the server's).
    pub fn with_idle_in_transaction_timeout(mut self, timeout: Duration) -> Self {
        self.idle_in_transaction_timeout = timeout;
        self
    }

    /// `statement_timeout`.
    pub fn statement_timeout(&self) -> Duration {
        self.statement_timeout
    }

    /// `lock_timeout`.
    pub fn lock_timeout(&self) -> Duration {
        self.lock_timeout
    }

    /// `idle_in_transaction_session_timeout`.
    pub fn idle_in_transaction_timeout(&self) -> Duration {
        self.idle_in_transaction_timeout
    }

    /// The `SET` statements for these settings, or `None` when all are left alone.
    pub(crate) fn sql(&self) -> Option<String> {
        let sql: Vec<String> = [
            ("statement_timeout", self.statement_timeout),
            ("lock_timeout", self.lock_timeout),
            (
                "idle_in_transaction_session_timeout",
                self.idle_in_transaction_timeout,
            ),
        ]
        .iter()
        .filter(|(_, d)| !d.is_zero())
        .map(|(name, d)| format!("SET {name} = {}", d.as_millis().max(1)))
        .collect();
        (!sql.is_empty()).then(|| sql.join("; "))
    }
}

/// A time setting as `current_setting` shows it (`0`, `250ms`, `20s`, `5min`, `1h`, `1d`;
/// a bare number in milliseconds), in milliseconds; `None` for no setting or a form not
/// understood.
pub(crate) fn setting_ms(value: Option<String>) -> Option<u64> {
    let value = value?;
    let value = value.trim();
    let digits = value
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(value.len());
    let n: u64 = value[..digits].parse().ok()?;
    let scale = match value[digits..].trim() {
        "" | "ms" => 1,
        "s" => 1000,
        "min" => 60_000,
        "h" => 3_600_000,
        "d" => 86_400_000,
        _ => return None,
    };
    Some(n * scale)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_time_settings_as_the_server_shows_them() {
        let ms = |s: &str| setting_ms(Some(s.to_owned()));
        assert_eq!(ms("0"), Some(0));
        assert_eq!(ms("250ms"), Some(250));
        assert_eq!(ms("20s"), Some(20_000));
        assert_eq!(ms("5min"), Some(300_000));
        assert_eq!(ms("1h"), Some(3_600_000));
        assert_eq!(ms("2d"), Some(172_800_000));
        assert_eq!(ms("1500"), Some(1500));
        assert_eq!(ms("soon"), None);
        assert_eq!(setting_ms(None), None);
    }

    #[test]
    fn zero_leaves_a_setting_alone() {
        let limits = SessionLimits::default()
            .with_statement_timeout(Duration::ZERO)
            .with_lock_timeout(Duration::from_micros(10));
        assert_eq!(
            limits.sql().as_deref(),
            Some("SET lock_timeout = 1; SET idle_in_transaction_session_timeout = 60000")
        );
        let none = limits
            .with_lock_timeout(Duration::ZERO)
            .with_idle_in_transaction_timeout(Duration::ZERO);
        assert_eq!(none.sql(), None);
    }
}
