//! [`ConnectError`]: every server tried, and what happened there.

use std::fmt;
use std::time::Duration;

use super::pg_message;

/// Why no connection could be made: each server tried (`host:port`, in the order tried)
/// and what happened there, in one line.
#[derive(Clone, Debug)]
pub struct ConnectError {
    attempts: Vec<Attempt>,
}

#[derive(Clone, Debug)]
struct Attempt {
    server: String,
    failure: Failure,
}

#[derive(Clone, Debug)]
enum Failure {
    Postgres(std::sync::Arc<tokio_postgres::Error>),
    TimedOut(Duration),
}

impl ConnectError {
    pub(crate) fn new() -> Self {
        ConnectError {
            attempts: Vec::new(),
        }
    }

    /// Notes that `server` failed with `e`.
    pub(crate) fn failed(&mut self, server: String, e: tokio_postgres::Error) {
        self.attempts.push(Attempt {
            server,
            failure: Failure::Postgres(std::sync::Arc::new(e)),
        });
    }

    /// Notes that `server` did not answer within `after`.
    pub(crate) fn timed_out(&mut self, server: String, after: Duration) {
        self.attempts.push(Attempt {
            server,
            failure: Failure::TimedOut(after),
        });
    }

    /// The servers tried, as `host:port`, in the order tried.
    pub fn servers(&self) -> impl Iterator<Item = &str> {
        self.attempts.iter().map(|a| a.server.as_str())
    }

    /// Whether every server tried was reached and found read-only (a standby), passed over
    /// because `target_session_attrs=read-write` asks for a primary.
    pub fn is_read_only(&self) -> bool {
        !self.attempts.is_empty()
            && self.attempts.iter().all(|a| match &a.failure {
                Failure::Postgres(e) => pg_message(e).contains("does not allow writes"),
                Failure::TimedOut(_) => false,
            })
    }

    /// Whether a server answered that the database asked for does not exist (and none
    /// was reached).
    pub fn is_unknown_database(&self) -> bool {
        !self.attempts.is_empty()
            && self.attempts.iter().any(|a| match &a.failure {
                Failure::Postgres(e) => crate::pg::is_unknown_database(e),
                Failure::TimedOut(_) => false,
            })
    }

    /// Whether every server tried answered (with an error), none timed out or was
    /// unreachable: the settings are at fault, not the network.
    fn all_answered(&self) -> bool {
        !self.attempts.is_empty()
            && self.attempts.iter().all(|a| match &a.failure {
                Failure::Postgres(e) => e.as_db_error().is_some(),
                Failure::TimedOut(_) => false,
            })
    }

    /// Whether a server refused the login (SQLSTATE class 28, or a password it asked for
    /// and none was given).
    pub fn is_auth(&self) -> bool {
        self.attempts.iter().any(|a| match &a.failure {
            Failure::Postgres(e) => crate::pg::is_auth_failure(e),
            Failure::TimedOut(_) => false,
        })
    }
}

impl fmt::Display for ConnectError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.attempts.is_empty() {
            return f.write_str("no host to try");
        }
        for (i, attempt) in self.attempts.iter().enumerate() {
            if i > 0 {
                f.write_str("; ")?;
            }
            write!(f, "{}: ", attempt.server)?;
            match &attempt.failure {
                Failure::TimedOut(after) => write!(f, "no answer within {after:?}")?,
                Failure::Postgres(e) => {
                    let text = pg_message(e);
                    if text.contains("does not allow writes") {
                        f.write_str(
                            "read-only (a standby?), passed over as target_session_attrs=\
                             read-write asks",
                        )?;
                    } else {
                        f.write_str(&text)?;
                    }
                }
            }
        }
        if self.is_auth() {
            f.write_str("; check the user and the password (PGPASSWORD, ~/.pgpass)")
        } else if self.is_unknown_database() {
            f.write_str("; the server answered: check the database name (dbname, PGDATABASE)")
        } else if self.all_answered() {
            f.write_str("; the server answered and refused: see its message")
        } else {
            f.write_str(
                "; check the host and port and that the server runs and accepts connections",
            )
        }
    }
}

impl std::error::Error for ConnectError {}
