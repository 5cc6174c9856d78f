//! The `LISTEN` error a session recovers from by itself: "could not access status of
//! transaction" (SQLSTATE 58P01).
//!
//! A PostgreSQL bug, fixed in November 2025 (commit 8eeb4a0, in the minor releases that
//! followed): vacuum could truncate the commit log (CLOG) that the notification queue still
//! needed for a listener that had fallen behind, and `LISTEN` itself then fails on servers
//! not yet updated. Reading the queue's usage (`pg_notification_queue_usage()`) clears it,
//! as PostgREST does; the session runs it and tries `LISTEN` again, a few times, paced, and
//! warns once per process, naming the fix. The decision is [`after_listen_error`], a pure
//! function; `session` does the I/O.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use super::event::TARGET;

/// What clears the error: reading the queue's usage.
pub(super) const CLEAR_SQL: &str = "SELECT pg_catalog.pg_notification_queue_usage()";

/// How many times `LISTEN` is tried again on one connection after the error (then the
/// error is the session's, and the listener's reconnect backoff paces what follows).
pub(super) const RETRIES: u32 = 3;

/// The one warning, naming the fix.
pub(super) const WARNING: &str = "LISTEN failed with \"could not access status of \
    transaction\" (SQLSTATE 58P01): a PostgreSQL bug, fixed in November 2025 (commit 8eeb4a0, \
    \"the CLOG truncation still needed by LISTEN/NOTIFY\"), left the notification queue \
    pointing at a truncated commit log after a listener fell behind; the listener clears it \
    by reading pg_notification_queue_usage() and tries LISTEN again. Update PostgreSQL to \
    its latest minor release";

/// What a session does after `LISTEN` failed.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Recovery {
    /// Read the queue's usage, wait `pause`, and try `LISTEN` again.
    ClearAndRetry {
        /// How long to wait before trying again.
        pause: Duration,
    },
    /// The error is the session's.
    Fail,
}

/// After `LISTEN` failed with SQLSTATE `code` and `message`, having been tried again
/// `retried` times already on this connection: the bug's error is cleared and retried up
/// to [`RETRIES`] times, pausing 100 ms, 200 ms, then 400 ms; anything else fails.
pub(super) fn after_listen_error(code: Option<&str>, message: &str, retried: u32) -> Recovery {
    if code == Some("58P01")
        && message.starts_with("could not access status of transaction")
        && retried < RETRIES
    {
        Recovery::ClearAndRetry {
            pause: Duration::from_millis(100) * 2u32.pow(retried),
        }
    } else {
        Recovery::Fail
    }
}

/// Whether the process has warned already.
static WARNED: AtomicBool = AtomicBool::new(false);

/// Warns once per process (later occurrences at debug level).
pub(super) fn warn_once() {
    if WARNED.swap(true, Ordering::Relaxed) {
        tracing::debug!(target: TARGET, "LISTEN failed with 58P01 again; clearing and retrying");
    } else {
        tracing::warn!(target: TARGET, "{WARNING}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MESSAGE: &str = "could not access status of transaction 1234";

    #[test]
    fn the_bugs_error_is_cleared_and_retried_three_times_paced() {
        let pauses: Vec<_> = (0..RETRIES)
            .map(|retried| after_listen_error(Some("58P01"), MESSAGE, retried))
            .collect();
        assert_eq!(
            pauses,
            [100, 200, 400].map(|ms| Recovery::ClearAndRetry {
                pause: Duration::from_millis(ms)
            })
        );
        assert_eq!(
            after_listen_error(Some("58P01"), MESSAGE, RETRIES),
            Recovery::Fail
        );
    }

    #[test]
    fn anything_else_fails_at_once() {
        // 58P01 is "undefined file" in general: only the bug's message is recovered from.
        for (code, message) in [
            (
                Some("58P01"),
                "could not open file \"base/1/2\": No such file or directory",
            ),
            (Some("XX000"), MESSAGE),
            (None, MESSAGE),
            (Some("42501"), "permission denied"),
        ] {
            assert_eq!(
                after_listen_error(code, message, 0),
                Recovery::Fail,
                "{code:?} {message}"
            );
        }
    }

    #[test]
    fn the_warning_names_the_error_the_bug_the_fix_and_what_the_listener_does() {
        for words in [
            "could not access status of transaction",
            "58P01",
            "8eeb4a0",
            "November 2025",
            "pg_notification_queue_usage()",
            "Update PostgreSQL to its latest minor release",
        ] {
            assert!(WARNING.contains(words), "{words}: {WARNING}");
        }
        assert!(!WARNING.contains('\n'), "one line");
        assert!(CLEAR_SQL.contains("pg_catalog."), "schema-qualified");
    }
}
