//! What a tokio-postgres error means to the pipe (and an sqlx one, feature `sqlx`: the
//! caller's connection in `push_in`): the one place that reads SQLSTATEs and severities.
//! Each question is a function of the error's class, severity and code, so that it can be
//! tested without a server.

use tokio_postgres::error::{Severity, SqlState};

/// What an error says, as the questions below read it.
struct Seen<'a> {
    /// `None`: no answer from the server (the connection broke, or never was).
    code: Option<&'a str>,
    severity: Option<Severity>,
    message: String,
}

impl Seen<'_> {
    fn of(e: &tokio_postgres::Error) -> Seen<'_> {
        match e.as_db_error() {
            Some(db) => Seen {
                code: Some(db.code().code()),
                severity: db.parsed_severity(),
                message: String::new(),
            },
            // The error's words and its cause's ("invalid configuration", "password
            // missing").
            None => Seen {
                code: None,
                severity: None,
                message: std::iter::successors(
                    Some(e as &(dyn std::error::Error + 'static)),
                    |e| e.source(),
                )
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join(": "),
            },
        }
    }
}

/// Whether the error ends a session: a broken connection, or the server ending it
/// (severity FATAL or PANIC, such as an administrator's terminate or a shutdown; classes 08
/// and 57, which includes a cancelled statement).
pub(crate) fn is_fatal(e: &tokio_postgres::Error) -> bool {
    fatal(&Seen::of(e))
}

fn fatal(seen: &Seen<'_>) -> bool {
    match seen.code {
        None => true,
        Some(code) => {
            matches!(seen.severity, Some(Severity::Fatal | Severity::Panic))
                || code.starts_with("57")
                || code.starts_with("08")
        }
    }
}

/// Whether the connection is lost: no answer, or the server ending the session (classes 08
/// and 57P0x: a terminated backend, a shutdown), not a statement it refused.
pub(crate) fn is_connection_lost(e: &tokio_postgres::Error) -> bool {
    connection_lost(&Seen::of(e))
}

fn connection_lost(seen: &Seen<'_>) -> bool {
    seen.code
        .is_none_or(|code| code.starts_with("08") || code.starts_with("57P0"))
}

/// Whether a server refused the login (class 28, or a password it asked for and none was
/// given).
pub(crate) fn is_auth_failure(e: &tokio_postgres::Error) -> bool {
    auth_failure(&Seen::of(e))
}

fn auth_failure(seen: &Seen<'_>) -> bool {
    match seen.code {
        Some(code) => code.starts_with("28"),
        None => seen.message.contains("password missing"),
    }
}

/// Whether the server answered that the database asked for does not exist (3D000): the
/// connection settings are at fault, not the network.
pub(crate) fn is_unknown_database(e: &tokio_postgres::Error) -> bool {
    e.code() == Some(&SqlState::INVALID_CATALOG_NAME)
}

/// Whether the role lacks a privilege the statement needs (42501).
pub(crate) fn is_insufficient_privilege(e: &tokio_postgres::Error) -> bool {
    e.code() == Some(&SqlState::INSUFFICIENT_PRIVILEGE)
}

/// Whether a transaction-pooling proxy lost or mixed up a prepared statement: the
/// statement was not executed. That is a name another client prepared on the same server
/// connection (42P05), a name missing there (26000), or a Bind that does not fit the
/// statement of that name there, another client's (08P01 "bind message supplies 5
/// parameters, but prepared statement "s0" requires 2", as PgBouncer 1.18 in transaction
/// mode hands over): refused at Bind, never executed.
pub(crate) fn is_proxy_refusal(e: &tokio_postgres::Error) -> bool {
    match e.as_db_error() {
        Some(db) => proxy_refusal(db.code().code(), db.message()),
        None => false,
    }
}

fn proxy_refusal(code: &str, message: &str) -> bool {
    code == SqlState::DUPLICATE_PSTATEMENT.code()
        || code == SqlState::INVALID_SQL_STATEMENT_NAME.code()
        || (code == SqlState::PROTOCOL_VIOLATION.code() && message.starts_with("bind message "))
}

/// Whether the server refused a NOTIFY because its notification queue is full (54000,
/// "too many notifications in the NOTIFY queue"): every NOTIFY in the cluster fails at
/// commit until the listener holding the queue back reads or goes.
pub(crate) fn is_notify_queue_full(e: &tokio_postgres::Error) -> bool {
    e.code() == Some(&SqlState::PROGRAM_LIMIT_EXCEEDED)
}

/// Whether the statement was cancelled (by the pipe, or by the server's
/// `statement_timeout`).
pub(crate) fn is_cancelled(e: &tokio_postgres::Error) -> bool {
    e.code() == Some(&SqlState::QUERY_CANCELED)
}

/// Whether a log query's error says there is no log to read here (the schema is not
/// migrated, or the role was not granted it): asking again will not help.
pub(crate) fn is_missing_log(e: &tokio_postgres::Error) -> bool {
    missing_log(e.code())
}

fn missing_log(code: Option<&SqlState>) -> bool {
    code.is_some_and(|code| {
        [
            SqlState::UNDEFINED_TABLE,
            SqlState::INVALID_SCHEMA_NAME,
            SqlState::INSUFFICIENT_PRIVILEGE,
        ]
        .contains(code)
    })
}

/// Whether a unique index refused a row (a durable batch's numbers were in the log).
pub(crate) fn is_unique_violation(e: &tokio_postgres::Error) -> bool {
    e.code() == Some(&SqlState::UNIQUE_VIOLATION)
}

/// Whether a statement gave up waiting for a lock (`lock_timeout`).
pub(crate) fn is_lock_timeout(e: &tokio_postgres::Error) -> bool {
    e.code() == Some(&SqlState::LOCK_NOT_AVAILABLE)
}

/// The server's error an sqlx error carries, if any (feature `sqlx`).
#[cfg(feature = "sqlx")]
pub(crate) fn sqlx_database_error(e: &sqlx::Error) -> Option<&sqlx::postgres::PgDatabaseError> {
    e.as_database_error()?
        .try_downcast_ref::<sqlx::postgres::PgDatabaseError>()
}

/// A server error's severity as the server writes it (`ERROR`, `FATAL`).
#[cfg(feature = "sqlx")]
pub(crate) fn sqlx_severity(db: &sqlx::postgres::PgDatabaseError) -> &'static str {
    use sqlx::postgres::PgSeverity;
    match db.severity() {
        PgSeverity::Panic => "PANIC",
        PgSeverity::Fatal => "FATAL",
        PgSeverity::Error => "ERROR",
        PgSeverity::Warning => "WARNING",
        PgSeverity::Notice => "NOTICE",
        PgSeverity::Debug => "DEBUG",
        PgSeverity::Info => "INFO",
        PgSeverity::Log => "LOG",
    }
}

/// [`is_connection_lost`] for an sqlx error: no answer (the socket, TLS, the protocol), or
/// the server ending the session (classes 08 and 57P0x).
#[cfg(feature = "sqlx")]
pub(crate) fn sqlx_is_connection_lost(e: &sqlx::Error) -> bool {
    match e {
        sqlx::Error::Database(_) => connection_lost(&Seen {
            code: sqlx_database_error(e).map(|db| db.code()),
            severity: None,
            message: String::new(),
        }),
        sqlx::Error::Io(_)
        | sqlx::Error::Tls(_)
        | sqlx::Error::Protocol(_)
        | sqlx::Error::PoolTimedOut
        | sqlx::Error::PoolClosed
        | sqlx::Error::WorkerCrashed => true,
        _ => false,
    }
}

/// [`is_unique_violation`] for an sqlx error.
#[cfg(feature = "sqlx")]
pub(crate) fn sqlx_is_unique_violation(e: &sqlx::Error) -> bool {
    sqlx_database_error(e).is_some_and(|db| db.code() == SqlState::UNIQUE_VIOLATION.code())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn db(code: &'static str, severity: Severity) -> Seen<'static> {
        Seen {
            code: Some(code),
            severity: Some(severity),
            message: String::new(),
        }
    }

    fn no_answer(message: &str) -> Seen<'static> {
        Seen {
            code: None,
            severity: None,
            message: message.to_owned(),
        }
    }

    #[test]
    fn what_ends_a_session() {
        assert!(fatal(&no_answer("connection closed")));
        assert!(fatal(&db("57P01", Severity::Fatal)), "terminated");
        assert!(fatal(&db("08006", Severity::Error)));
        assert!(fatal(&db("57014", Severity::Error)), "cancelled: class 57");
        assert!(fatal(&db("XX000", Severity::Panic)));
        assert!(!fatal(&db("42P01", Severity::Error)));
        assert!(!fatal(&db("23505", Severity::Error)));
    }

    #[test]
    fn what_is_a_lost_connection() {
        assert!(connection_lost(&no_answer("reset")));
        assert!(connection_lost(&db("57P01", Severity::Fatal)));
        assert!(connection_lost(&db("08001", Severity::Error)));
        assert!(!connection_lost(&db("57014", Severity::Error)), "a cancel");
        assert!(!connection_lost(&db("42501", Severity::Error)));
    }

    #[test]
    fn what_is_a_refused_login() {
        assert!(auth_failure(&db("28P01", Severity::Fatal)));
        assert!(auth_failure(&db("28000", Severity::Fatal)));
        assert!(auth_failure(&no_answer(
            "invalid configuration: password missing"
        )));
        assert!(!auth_failure(&no_answer("connection refused")));
        assert!(!auth_failure(&db("3D000", Severity::Fatal)));
    }

    #[cfg(feature = "sqlx")]
    #[test]
    fn what_is_a_lost_sqlx_connection() {
        let reset = std::io::Error::from(std::io::ErrorKind::ConnectionReset);
        assert!(sqlx_is_connection_lost(&sqlx::Error::Io(reset)));
        assert!(sqlx_is_connection_lost(&sqlx::Error::Protocol("x".into())));
        assert!(sqlx_is_connection_lost(&sqlx::Error::PoolTimedOut));
        assert!(!sqlx_is_connection_lost(&sqlx::Error::RowNotFound));
        assert!(!sqlx_is_unique_violation(&sqlx::Error::RowNotFound));
    }

    #[test]
    fn what_a_transaction_pooler_mixing_up_prepared_statements_looks_like() {
        assert!(proxy_refusal(
            "42P05",
            "prepared statement \"s0\" already exists"
        ));
        assert!(proxy_refusal(
            "26000",
            "prepared statement \"s0\" does not exist"
        ));
        assert!(proxy_refusal(
            "08P01",
            "bind message supplies 5 parameters, but prepared statement \"s0\" requires 2"
        ));
        assert!(proxy_refusal(
            "08P01",
            "bind message has 3 parameter formats but 2 parameters"
        ));
        assert!(!proxy_refusal("08P01", "invalid frontend message type 0"));
        assert!(!proxy_refusal("23505", "duplicate key value"));
    }

    #[test]
    fn what_says_there_is_no_log() {
        assert!(missing_log(Some(&SqlState::UNDEFINED_TABLE)));
        assert!(missing_log(Some(&SqlState::INSUFFICIENT_PRIVILEGE)));
        assert!(missing_log(Some(&SqlState::INVALID_SCHEMA_NAME)));
        assert!(!missing_log(Some(&SqlState::QUERY_CANCELED)));
        assert!(!missing_log(None));
    }
}
