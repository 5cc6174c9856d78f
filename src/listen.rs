//! The listen path: one dedicated connection per pipe, driven by `poll_message`, that
//! decodes every notification on the channel, drops the pipe's own (echo) and rejects what
//! does not decode, and hands the rest to the caller's channel.

use std::collections::VecDeque;
use std::future::poll_fn;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
use tokio_postgres::{AsyncMessage, Client, Notification};

use crate::config::Config;
use crate::connect::{RawConnection, connect};
use crate::envelope::{Envelope, Origin};
use crate::error::Error;
use crate::stats::Counters;
use crate::update::Update;

const TARGET: &str = "updatepipe::listen";

/// The running listener: its task, and the signal that stops it.
#[derive(Debug)]
pub(crate) struct Listener {
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<()>,
}

impl Listener {
    /// Connects, issues `LISTEN` on the quoted channel, and returns once the server has
    /// confirmed it: every notification committed from then on reaches `updates`.
    pub(crate) async fn start(
        config: &Config,
        origin: Origin,
        updates: mpsc::Sender<Update>,
        counters: Arc<Counters>,
    ) -> Result<Listener, Error> {
        let (client, mut connection) = connect(config).await?;
        let mut backlog = VecDeque::new();
        let listen = format!("LISTEN {}", config.channel().quoted());
        let subscribed = tokio::time::timeout(
            config.connect_timeout(),
            drive_until(&mut connection, client.batch_execute(&listen), &mut backlog),
        )
        .await
        .map_err(|_| Error::Timeout {
            what: "subscribing with LISTEN",
            after: config.connect_timeout(),
        })?;
        subscribed??;
        tracing::debug!(target: TARGET, channel = %config.channel(), "listening");

        let (stop, stopped) = oneshot::channel();
        let task = Task {
            client,
            connection,
            backlog,
            origin,
            channel: config.channel().as_str().to_owned(),
            updates,
            counters,
        };
        Ok(Listener {
            stop: Some(stop),
            task: tokio::spawn(task.run(stopped)),
        })
    }

    /// Stops the task and waits for it: the connection is closed and the caller's channel
    /// ends when this returns.
    pub(crate) async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Err(e) = (&mut self.task).await
            && e.is_panic()
        {
            tracing::error!(target: TARGET, "listener task panicked: {e}");
        }
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        // Dropped without `stop` (the pipe itself was dropped): nothing may outlive it.
        self.task.abort();
    }
}

/// Polls the connection until `work` completes, keeping whatever notifications arrive
/// meanwhile.
async fn drive_until<F: Future>(
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
                Some(Err(e)) => return Err(Error::Postgres(e)),
                // The connection ended: `work` fails with the reason on its next poll.
                None => return Ok(work.await),
            },
        }
    }
}

/// What the listener task owns.
struct Task {
    client: Client,
    connection: RawConnection,
    backlog: VecDeque<Notification>,
    origin: Origin,
    channel: String,
    updates: mpsc::Sender<Update>,
    counters: Arc<Counters>,
}

/// Why the task's loop ended.
enum End {
    Stopped,
    ReceiverGone,
    Connection(String),
}

impl Task {
    async fn run(mut self, mut stopped: oneshot::Receiver<()>) {
        let end = self.serve(&mut stopped).await;
        match &end {
            End::Stopped => tracing::debug!(target: TARGET, "listener stopped"),
            End::ReceiverGone => {
                tracing::info!(target: TARGET, "the updates channel was dropped; listener stops")
            }
            End::Connection(reason) => {
                tracing::warn!(target: TARGET, %reason, "listener connection lost; listener stops")
            }
        }
        // Close the session politely: dropping the client sends Terminate, which the
        // connection writes before it ends.
        let Task {
            client,
            mut connection,
            ..
        } = self;
        drop(client);
        let _ = tokio::time::timeout(Duration::from_secs(1), async {
            while let Some(Ok(_)) = poll_fn(|cx| connection.poll_message(cx)).await {}
        })
        .await;
    }

    async fn serve(&mut self, stopped: &mut oneshot::Receiver<()>) -> End {
        loop {
            while let Some(notification) = self.backlog.pop_front() {
                for update in self.accept(&notification) {
                    tokio::select! {
                        biased;
                        _ = &mut *stopped => return End::Stopped,
                        sent = self.updates.send(update) => {
                            if sent.is_err() {
                                return End::ReceiverGone;
                            }
                            self.counters.delivered(1);
                        }
                    }
                }
            }
            tokio::select! {
                biased;
                _ = &mut *stopped => return End::Stopped,
                _ = self.updates.closed() => return End::ReceiverGone,
                message = poll_fn(|cx| self.connection.poll_message(cx)) => match message {
                    Some(Ok(AsyncMessage::Notification(n))) => self.backlog.push_back(n),
                    Some(Ok(AsyncMessage::Notice(notice))) => {
                        tracing::debug!(target: TARGET, message = notice.message(), "server notice");
                    }
                    Some(Ok(_)) => {}
                    Some(Err(e)) => return End::Connection(crate::error::pg_message(&e)),
                    None => return End::Connection("the server closed the connection".into()),
                },
            }
        }
    }

    /// Decodes one notification into the updates to deliver: none for an echo or a payload
    /// that does not decode (counted and logged; the listener goes on).
    fn accept(&self, notification: &Notification) -> Vec<Update> {
        if notification.channel() != self.channel {
            return Vec::new();
        }
        match Envelope::decode(notification.payload()) {
            Ok(envelope) if *envelope.origin() == self.origin => {
                self.counters.echo();
                Vec::new()
            }
            Ok(envelope) => envelope.into_updates(),
            Err(e) => {
                self.counters.rejected(&e);
                tracing::warn!(
                    target: TARGET,
                    reason = e.reason(),
                    error = %e,
                    sender_pid = notification.process_id(),
                    bytes = notification.payload().len(),
                    "rejected a payload"
                );
                tracing::debug!(target: TARGET, payload = notification.payload(), "rejected payload");
                Vec::new()
            }
        }
    }
}
