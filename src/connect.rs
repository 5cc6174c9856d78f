//! Dedicated connections: made with the configured timeout, never taken from the pool.

use std::collections::VecDeque;
use std::future::poll_fn;
use std::time::Duration;

use tokio_postgres::{AsyncMessage, Client, Connection, Notification, Socket};

use crate::config::Config;
use crate::error::Error;
use crate::tls::TlsStream;

/// A connection whose socket the caller drives (the listener polls it for notifications).
pub(crate) type RawConnection = Connection<Socket, TlsStream>;

/// Opens one dedicated connection, within the configured connect timeout, with TLS as the
/// configuration says (its certificate files read now).
pub(crate) async fn connect(config: &Config) -> Result<(Client, RawConnection), Error> {
    let connector = config.tls_connector()?;
    let after = config.connect_timeout();
    match tokio::time::timeout(after, config.pg().connect(connector)).await {
        Ok(Ok(pair)) => Ok(pair),
        Ok(Err(e)) => Err(Error::Connect(e.into())),
        Err(_) => Err(Error::Timeout {
            what: "connecting to PostgreSQL",
            after,
        }),
    }
}

/// Opens one dedicated connection driven by a spawned task, for plain statements.
pub(crate) async fn connect_spawned(
    config: &Config,
) -> Result<(Client, tokio::task::JoinHandle<()>), Error> {
    let (client, connection) = connect(config).await?;
    let task = tokio::spawn(async move {
        if let Err(e) = connection.await {
            tracing::debug!(target: "updatepipe", error = %e, "connection ended");
        }
    });
    Ok((client, task))
}

/// Polls a connection the caller drives until `work` (a statement on its client) completes,
/// keeping whatever notifications arrive meanwhile in `backlog`.
pub(crate) async fn drive_until<F: Future>(
    connection: &mut RawConnection,
    work: F,
    backlog: &mut VecDeque<Notification>,
) -> Result<F::Output, Error> {
    let mut work = std::pin::pin!(work);
    loop {
        tokio::select! {
            output = &mut work => return Ok(output),
            message = poll_fn(|cx| connection.poll_message(cx)) => match message {
                Some(Ok(AsyncMessage::Notification(n))) => backlog.push_back(n),
                Some(Ok(_)) => {}
                Some(Err(e)) => return Err(e.into()),
                // The connection ended: `work` fails with the reason on its next poll.
                None => return Ok(work.await),
            },
        }
    }
}

/// Ends a driven connection politely: dropping the client sends Terminate, which the
/// connection writes before it ends (given a second at most).
pub(crate) async fn close_politely(client: Client, mut connection: RawConnection) {
    drop(client);
    let _ = tokio::time::timeout(Duration::from_secs(1), async {
        while let Some(Ok(_)) = poll_fn(|cx| connection.poll_message(cx)).await {}
    })
    .await;
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
    use super::setting_ms;

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
}
