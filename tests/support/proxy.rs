//! A TCP proxy for tests that break the path between a client and the server: it can
//! blackhole (keep connections open and swallow every byte, like a dead NAT or a pulled
//! cable), go down (close every connection and refuse new ones), hold (keep every byte
//! until released, like a stalled network), or forget the connections open at one moment
//! (swallow their bytes for good, while new connections work: a NAT, a load balancer or a
//! hung middlebox that lost its flows).

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU8, AtomicU64, Ordering};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

const UP: u8 = 0;
const BLACKHOLE: u8 = 1;
const DOWN: u8 = 2;
const HOLD: u8 = 3;

/// The proxy; dropping it stops it and closes its connections.
pub struct Proxy {
    addr: SocketAddr,
    mode: Arc<AtomicU8>,
    /// Bumped to close every connection open now.
    generation: watch::Sender<u64>,
    accepted: Arc<AtomicU64>,
    /// Chunks read while holding.
    held: Arc<AtomicU64>,
    /// Bumped to forget every connection open now.
    forgotten: Arc<AtomicU64>,
    task: tokio::task::JoinHandle<()>,
}

impl Proxy {
    /// A proxy on 127.0.0.1 to `upstream` (127.0.0.1:port).
    pub async fn start(upstream_port: u16) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let mode = Arc::new(AtomicU8::new(UP));
        let (generation, _) = watch::channel(0u64);
        let accepted = Arc::new(AtomicU64::new(0));
        let held = Arc::new(AtomicU64::new(0));
        let forgotten = Arc::new(AtomicU64::new(0));
        let task = {
            let mode = mode.clone();
            let held = held.clone();
            let forgotten = forgotten.clone();
            let generation = generation.clone();
            let accepted = accepted.clone();
            tokio::spawn(async move {
                loop {
                    let Ok((client, _)) = listener.accept().await else {
                        break;
                    };
                    if mode.load(Ordering::SeqCst) == DOWN {
                        drop(client);
                        continue;
                    }
                    accepted.fetch_add(1, Ordering::SeqCst);
                    let mode = mode.clone();
                    let held = held.clone();
                    let closed = generation.subscribe();
                    let flow = Flow {
                        born: forgotten.load(Ordering::SeqCst),
                        forgotten: forgotten.clone(),
                    };
                    tokio::spawn(async move {
                        let Ok(server) = TcpStream::connect(("127.0.0.1", upstream_port)).await
                        else {
                            return;
                        };
                        pipe_both(client, server, mode, held, flow, closed).await;
                    });
                }
            })
        };
        Proxy {
            addr,
            mode,
            generation,
            accepted,
            held,
            forgotten,
            task,
        }
    }

    /// Stop forwarding the connections open now, both ways, for good, without closing them,
    /// even when one end closes (the other end never hears of it); connections made from
    /// now on work.
    pub fn forget_open(&self) {
        self.forgotten.fetch_add(1, Ordering::SeqCst);
    }

    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    /// Connections accepted so far.
    pub fn accepted(&self) -> u64 {
        self.accepted.load(Ordering::SeqCst)
    }

    /// Swallow every byte, both ways, on every connection, old and new, without closing.
    pub fn blackhole(&self) {
        self.mode.store(BLACKHOLE, Ordering::SeqCst);
    }

    /// Keep every byte read from now on, both ways, until `up`.
    pub fn hold(&self) {
        self.mode.store(HOLD, Ordering::SeqCst);
    }

    /// Chunks of bytes read while holding.
    pub fn held(&self) -> u64 {
        self.held.load(Ordering::SeqCst)
    }

    /// Close every connection open now (what they hold is lost); new connections work as
    /// the mode says.
    pub fn cut_open(&self) {
        self.generation.send_modify(|g| *g += 1);
    }

    /// Close every connection and refuse new ones.
    pub fn down(&self) {
        self.mode.store(DOWN, Ordering::SeqCst);
        self.generation.send_modify(|g| *g += 1);
    }

    /// Forward again, held bytes first. Connections that were blackholed are closed (they
    /// lost bytes and could never recover), as a restored NAT would reset them.
    pub fn up(&self) {
        if self.mode.swap(UP, Ordering::SeqCst) == BLACKHOLE {
            self.generation.send_modify(|g| *g += 1);
        }
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.generation.send_modify(|g| *g += 1);
        self.task.abort();
    }
}

/// One connection's place in the proxy's memory: forgotten once `forgotten` moves past
/// `born`.
#[derive(Clone)]
struct Flow {
    born: u64,
    forgotten: Arc<AtomicU64>,
}

impl Flow {
    fn forgotten(&self) -> bool {
        self.forgotten.load(Ordering::SeqCst) != self.born
    }
}

async fn pipe_both(
    client: TcpStream,
    server: TcpStream,
    mode: Arc<AtomicU8>,
    held: Arc<AtomicU64>,
    flow: Flow,
    mut closed: watch::Receiver<u64>,
) {
    let (cr, cw) = client.into_split();
    let (sr, sw) = server.into_split();
    let up = pump(cr, sw, mode.clone(), held.clone(), flow.clone());
    let down = pump(sr, cw, mode, held, flow);
    tokio::select! {
        _ = up => {}
        _ = down => {}
        _ = closed.changed() => {}
    }
}

/// Copies one direction while the proxy is up; keeps what arrives while it holds (reading
/// on) until it is up again; drops what arrives while it is otherwise, and once its flow
/// is forgotten.
async fn pump(
    mut from: impl AsyncRead + Unpin,
    mut to: impl AsyncWrite + Unpin + Send + 'static,
    mode: Arc<AtomicU8>,
    held: Arc<AtomicU64>,
    flow: Flow,
) {
    let (chunks, mut queued) = tokio::sync::mpsc::unbounded_channel::<Vec<u8>>();
    let mut writer = AbortOnDrop({
        let mode = mode.clone();
        tokio::spawn(async move {
            while let Some(chunk) = queued.recv().await {
                while mode.load(Ordering::SeqCst) == HOLD {
                    tokio::time::sleep(std::time::Duration::from_millis(1)).await;
                }
                if mode.load(Ordering::SeqCst) != UP || flow.forgotten() {
                    continue;
                }
                if to.write_all(&chunk).await.is_err() {
                    break;
                }
            }
            // A path that forgot the flow passes its end on no more than its bytes: this
            // side stays open (a server's backend lives on) until the proxy goes.
            if flow.forgotten() {
                std::future::pending::<()>().await;
            }
        })
    });
    let mut buf = vec![0u8; 16384];
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        if mode.load(Ordering::SeqCst) == HOLD {
            held.fetch_add(1, Ordering::SeqCst);
        }
        if chunks.send(buf[..n].to_vec()).is_err() {
            break;
        }
    }
    // What was read is written (unless the proxy drops it) before the connection closes.
    drop(chunks);
    let _ = (&mut writer.0).await;
}

/// A task stopped (its half of the connection closed) when the pump that started it is.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}
