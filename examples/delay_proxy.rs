//! A TCP proxy that holds every chunk of bytes for a fixed delay in each direction: a
//! network round trip of twice the delay between this machine's clients and its
//! PostgreSQL, for measuring what a network changes (`BENCHMARKS.md`, "Over a network").
//!
//! Run with `cargo run --release --example delay_proxy -- 127.0.0.1:6543 127.0.0.1:5432 250`
//! (listen address, server address, one-way delay in microseconds), then point the
//! benchmark at it: `updatepipe bench --url "postgres://postgres@127.0.0.1:6543/postgres?sslmode=disable"`.
//! Order is kept; bandwidth is not limited. Plain threads and `std::thread::sleep`, which
//! keeps the delay to tens of microseconds (tokio's timers round up to a millisecond).

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::Context;

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [listen, upstream, delay] = args.as_slice() else {
        anyhow::bail!("usage: delay_proxy LISTEN_ADDR SERVER_ADDR ONE_WAY_DELAY_MICROSECONDS");
    };
    let delay = Duration::from_micros(delay.parse().context("the delay, in microseconds")?);
    let listener = TcpListener::bind(listen).with_context(|| format!("listening on {listen}"))?;
    for client in listener.incoming() {
        let client = client?;
        let upstream = upstream.clone();
        std::thread::spawn(move || {
            if let Err(e) = relay(client, &upstream, delay) {
                eprintln!("delay_proxy: {e:#}");
            }
        });
    }
    Ok(())
}

/// Relays one client connection to the server and back, both ways delayed.
fn relay(client: TcpStream, upstream: &str, delay: Duration) -> anyhow::Result<()> {
    let server =
        TcpStream::connect(upstream).with_context(|| format!("connecting to {upstream}"))?;
    client.set_nodelay(true)?;
    server.set_nodelay(true)?;
    let (to_server, from_server) = (server.try_clone()?, client.try_clone()?);
    std::thread::spawn(move || forward(client, to_server, delay));
    forward(server, from_server, delay);
    Ok(())
}

/// Copies `from` to `to`, each chunk written `delay` after it was read. A second thread
/// writes, so reading goes on while earlier chunks wait out their delay.
fn forward(mut from: TcpStream, mut to: TcpStream, delay: Duration) {
    let (chunks, due) = mpsc::channel::<(Instant, Vec<u8>)>();
    std::thread::spawn(move || {
        while let Ok((at, bytes)) = due.recv() {
            std::thread::sleep(at.saturating_duration_since(Instant::now()));
            if to.write_all(&bytes).is_err() {
                return;
            }
        }
        let _ = to.shutdown(Shutdown::Write);
    });
    let mut buf = vec![0u8; 64 * 1024];
    while let Ok(n @ 1..) = from.read(&mut buf) {
        if chunks
            .send((Instant::now() + delay, buf[..n].to_vec()))
            .is_err()
        {
            return;
        }
    }
}
