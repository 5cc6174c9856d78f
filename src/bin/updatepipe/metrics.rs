//! The `/metrics` endpoint of `listen --metrics`: the `metrics` facade's values in
//! Prometheus' text format (metrics-exporter-prometheus's recorder), served by hyper with
//! bounds the exporter's own listener does not have, so that what the endpoint's clients
//! do cannot take the descriptors and the CPU the listener needs:
//!
//! - at most [`MAX_CONNECTIONS`] connections at once; past that a new connection is
//!   answered `503` and closed at once, in the accepting task (its descriptor is held for
//!   that moment only);
//! - a connection has [`HEADER_TIMEOUT`] to send its request headers and
//!   [`CONNECTION_TIMEOUT`] in all, and is closed after one response (no keep-alive);
//! - a failed `accept` (out of descriptors, say) waits before the next, growing to a
//!   second, and is logged at most once per [`WARN_INTERVAL`], with how many were left out.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::header::{CONNECTION, CONTENT_TYPE, HeaderValue};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;

/// The most connections served at once.
pub(crate) const MAX_CONNECTIONS: usize = 16;
/// How long a connection has to send its request's headers.
pub(crate) const HEADER_TIMEOUT: Duration = Duration::from_secs(3);
/// How long a connection may last in all.
pub(crate) const CONNECTION_TIMEOUT: Duration = Duration::from_secs(10);
/// The shortest time between two warnings about failed accepts.
const WARN_INTERVAL: Duration = Duration::from_secs(10);
/// How often the recorder's histograms are drained (the exporter's own listener does this
/// as it serves; a recorder built alone needs it done).
const UPKEEP_EVERY: Duration = Duration::from_secs(5);

/// What a connection past the limit is told before it is closed.
const BUSY: &[u8] = b"HTTP/1.1 503 Service Unavailable\r\nconnection: close\r\n\
    content-length: 0\r\nretry-after: 1\r\n\r\n";

/// Installs the recorder and serves `GET /metrics` (and `GET /health`) on `addr`, from now
/// on, in tasks of the current runtime.
pub(crate) async fn serve(addr: SocketAddr) -> anyhow::Result<()> {
    let recorder = PrometheusBuilder::new()
        .set_buckets_for_metric(
            Matcher::Full("updatepipe_push_duration_seconds".into()),
            &[
                0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                10.0,
            ],
        )?
        .build_recorder();
    let handle = recorder.handle();
    let listener = TcpListener::bind(addr)
        .await
        .with_context(|| format!("cannot serve metrics on {addr}"))?;
    metrics::set_global_recorder(recorder)
        .map_err(|e| anyhow::anyhow!("cannot install the metrics recorder: {e}"))?;
    updatepipe::describe_metrics();
    let upkeep = handle.clone();
    tokio::spawn(async move {
        let mut every = tokio::time::interval(UPKEEP_EVERY);
        loop {
            every.tick().await;
            upkeep.run_upkeep();
        }
    });
    tokio::spawn(accept_loop(listener, handle));
    Ok(())
}

/// Accepts connections for good, each served in a task of its own within the bounds.
async fn accept_loop(listener: TcpListener, handle: PrometheusHandle) {
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    let mut failures = Failures::default();
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => {
                failures.over();
                stream
            }
            Err(e) => {
                tokio::time::sleep(failures.failed(&e)).await;
                continue;
            }
        };
        match slots.clone().try_acquire_owned() {
            Ok(slot) => {
                let handle = handle.clone();
                tokio::spawn(async move {
                    serve_connection(stream, handle).await;
                    drop(slot);
                });
            }
            Err(_) => refuse(stream),
        }
    }
}

/// Failed accepts in a row: the pause before the next, and the pacing of their warning.
#[derive(Debug, Default)]
struct Failures {
    in_a_row: u32,
    warned: Option<std::time::Instant>,
    suppressed: u64,
}

impl Failures {
    /// An accept failed: logged (paced); returns how long to wait before the next.
    fn failed(&mut self, e: &std::io::Error) -> Duration {
        self.in_a_row = self.in_a_row.saturating_add(1);
        let due = self.warned.is_none_or(|at| at.elapsed() >= WARN_INTERVAL);
        if due {
            tracing::warn!(
                target: "updatepipe::metrics",
                error = %e,
                suppressed = self.suppressed,
                "the metrics endpoint cannot accept a connection (out of file descriptors?); \
                 waiting before the next"
            );
            self.warned = Some(std::time::Instant::now());
            self.suppressed = 0;
        } else {
            self.suppressed += 1;
        }
        pause_after(self.in_a_row)
    }

    /// An accept worked.
    fn over(&mut self) {
        self.in_a_row = 0;
    }
}

/// The pause after `failures` failed accepts in a row: 10 ms, doubling, at most a second.
fn pause_after(failures: u32) -> Duration {
    let exp = failures.saturating_sub(1).min(7);
    Duration::from_millis(10 << exp).min(Duration::from_secs(1))
}

/// One request, one response, within the connection's bounds.
async fn serve_connection(stream: TcpStream, handle: PrometheusHandle) {
    let service = hyper::service::service_fn(move |request| {
        let handle = handle.clone();
        async move { Ok::<_, Infallible>(answer(&request, &handle)) }
    });
    let connection = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_TIMEOUT)
        .keep_alive(false)
        .serve_connection(TokioIo::new(stream), service);
    match tokio::time::timeout(CONNECTION_TIMEOUT, connection).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => {
            tracing::debug!(target: "updatepipe::metrics", error = %e, "a metrics connection failed")
        }
        Err(_) => {
            tracing::debug!(target: "updatepipe::metrics", "a metrics connection ran out of time")
        }
    }
}

/// A connection past the limit: told to come back (if its send buffer takes it now), and
/// closed at once.
fn refuse(stream: TcpStream) {
    let _ = stream.try_write(BUSY);
}

/// The answer to one request.
fn answer(request: &Request<Incoming>, handle: &PrometheusHandle) -> Response<Full<Bytes>> {
    let (status, content_type, body) = match (request.method(), request.uri().path()) {
        (&Method::GET, "/metrics") => (
            StatusCode::OK,
            "text/plain; version=0.0.4",
            Bytes::from(handle.render()),
        ),
        (&Method::GET, "/health") => (StatusCode::OK, "text/plain", Bytes::from_static(b"OK")),
        (&Method::GET, _) => (StatusCode::NOT_FOUND, "text/plain", Bytes::from_static(b"")),
        _ => (
            StatusCode::METHOD_NOT_ALLOWED,
            "text/plain",
            Bytes::from_static(b""),
        ),
    };
    let mut response = Response::new(Full::new(body));
    *response.status_mut() = status;
    let headers = response.headers_mut();
    headers.insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    headers.insert(CONNECTION, HeaderValue::from_static("close"));
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failed_accepts_wait_longer_and_longer_up_to_a_second() {
        assert_eq!(pause_after(1), Duration::from_millis(10));
        assert_eq!(pause_after(2), Duration::from_millis(20));
        assert_eq!(pause_after(7), Duration::from_millis(640));
        assert_eq!(pause_after(8), Duration::from_secs(1));
        assert_eq!(pause_after(u32::MAX), Duration::from_secs(1));
    }

    #[test]
    fn failed_accepts_are_warned_about_once_per_interval() {
        let mut failures = Failures::default();
        let e = std::io::Error::from_raw_os_error(24);
        for _ in 0..1000 {
            failures.failed(&e);
        }
        assert_eq!(failures.suppressed, 999);
        assert_eq!(failures.in_a_row, 1000);
        failures.over();
        assert_eq!(
            pause_after(failures.in_a_row + 1),
            Duration::from_millis(10)
        );
    }
}
