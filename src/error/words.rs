//! A library's errors in the words an operator reads.

/// A PostgreSQL error in one line: the server's message and SQLSTATE for a database error,
/// otherwise the client's description and its cause (`tokio_postgres::Error`'s `Display`
/// alone says only "db error").
pub(crate) fn pg_message(e: &tokio_postgres::Error) -> String {
    if let Some(db) = e.as_db_error() {
        return format!(
            "{}: {} (SQLSTATE {})",
            db.severity(),
            db.message(),
            db.code().code()
        );
    }
    let text = match std::error::Error::source(e) {
        // "error connecting to server: Connection refused (os error 111)" says it twice.
        Some(cause) if e.to_string() == "error connecting to server" => cause.to_string(),
        Some(cause) => format!("{e}: {cause}"),
        None => e.to_string(),
    };
    for_operators(text)
}

/// An sqlx error in one line, as [`pg_message`] says a tokio-postgres one (feature
/// `sqlx`): the server's severity, message and SQLSTATE for a database error, otherwise
/// sqlx's description (a broken connection, a protocol error).
#[cfg(feature = "sqlx")]
pub(crate) fn sqlx_message(e: &sqlx::Error) -> String {
    if let Some(db) = crate::pg::sqlx_database_error(e) {
        return format!(
            "{}: {} (SQLSTATE {})",
            crate::pg::sqlx_severity(db),
            db.message(),
            db.code()
        );
    }
    for_operators(e.to_string())
}

/// A library's words made an operator's: rustls ends some messages with a link to its
/// manual ("peer closed connection without sending TLS close_notify: https://docs.rs/…"),
/// which says nothing to whoever reads the pipe's logs.
fn for_operators(text: String) -> String {
    const CLOSE_NOTIFY: &str = "peer closed connection without sending TLS close_notify";
    if let Some(at) = text.find(CLOSE_NOTIFY) {
        return format!("{}the server closed the connection", &text[..at]);
    }
    match text.find(": https://docs.rs/rustls") {
        Some(at) => text[..at].to_owned(),
        None => text,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_for_operators_carry_no_library_manual() {
        assert_eq!(
            for_operators(
                "db error: peer closed connection without sending TLS close_notify: \
                 https://docs.rs/rustls/latest/rustls/manual/_03_howto/index.html#unexpected-eof"
                    .into()
            ),
            "db error: the server closed the connection"
        );
        assert_eq!(
            for_operators("tls: x: https://docs.rs/rustls/latest/rustls/y".into()),
            "tls: x"
        );
        assert_eq!(for_operators("plain".into()), "plain");
    }
}
