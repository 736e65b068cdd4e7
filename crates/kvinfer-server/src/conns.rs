//! Connections: how many may be open, which ones are idle, and how each one ends.
//!
//! - **Cap.** Each connection holds a file descriptor, and so do the model, tier files and Redis
//!   connections. The cap is `ServerConfig::max_connections` (1024) or what the open-files
//!   limit leaves after the descriptors open at start, [`RESERVED_DESCRIPTORS`] and
//!   [`OVERFLOW`], whichever is smaller ([`ConnectionCap`]; `kvinfer serve` raises the soft
//!   limit to the hard one first).
//! - **Over the cap.** A new client is never left in the listen backlog: it closes the oldest
//!   idle connection (no request in flight: a keep-alive connection between requests, or one
//!   still sending its head) and takes its place, or, when every connection is busy, gets a 503
//!   (`too_many_connections`, `Retry-After: 1`). At most [`OVERFLOW`] such clients are held at
//!   once; past that, new clients wait in the backlog for at most a few seconds.
//! - **Idle or busy.** A connection is busy from the moment hyper hands a request to the
//!   router until the answer's body is dropped (sent whole, or the client gone).
//! - **Shutdown.** Idle connections (half-sent heads included) close at once; busy ones finish
//!   their request with keep-alive off, within the shutdown grace.

use crate::error::ApiError;
use axum::body::{Body, Bytes};
use axum::extract::Request;
use axum::response::Response;
use axum::Router;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto::Builder;
use hyper_util::service::TowerToHyperService;
use std::collections::BTreeMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{oneshot, watch, Notify, OwnedSemaphorePermit, Semaphore};

/// Descriptors kept free for what the process opens while it serves: tier files, Redis
/// reconnections, the runtime's own.
pub const RESERVED_DESCRIPTORS: u64 = 64;
/// Clients over the cap held at once while an idle connection makes room or their 503 is sent.
pub const OVERFLOW: usize = 16;
/// How long a client over the cap waits for the slot of the idle connection it closed.
const EVICT_WAIT: Duration = Duration::from_secs(1);
/// Longest a 503 to a client over the cap may take (written, then its request read and
/// dropped so that closing does not reset the connection before the client reads the 503).
const REFUSE_TIME: Duration = Duration::from_secs(2);

/// How many connections may be open, and why.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConnectionCap {
    /// The cap.
    pub connections: usize,
    /// The configured cap (`ServerConfig::max_connections`).
    pub configured: usize,
    /// The soft open-files limit (None: unknown or none on this platform).
    pub open_files_limit: Option<u64>,
    /// Descriptors open when the cap was set.
    pub open_at_start: u64,
}

impl ConnectionCap {
    /// The cap for `configured` under an open-files limit with `open_now` descriptors open.
    pub fn new(configured: usize, open_files_limit: Option<u64>, open_now: u64) -> Self {
        let room = open_files_limit.map_or(u64::MAX, |limit| {
            limit.saturating_sub(open_now + RESERVED_DESCRIPTORS + OVERFLOW as u64)
        });
        Self {
            connections: (configured as u64).min(room).max(1) as usize,
            configured,
            open_files_limit,
            open_at_start: open_now,
        }
    }

    /// The cap for this process now.
    pub fn for_this_process(configured: usize) -> Self {
        Self::new(configured, open_files_limit(), open_descriptors())
    }
}

impl std::fmt::Display for ConnectionCap {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "at most {} connections", self.connections)?;
        match self.open_files_limit {
            Some(limit) if self.connections < self.configured => write!(
                f,
                " (open files limit {limit}: {} open, {} kept for tiers, Redis and refusals; \
                 raise `ulimit -n` for more)",
                self.open_at_start,
                RESERVED_DESCRIPTORS + OVERFLOW as u64
            ),
            Some(limit) => write!(f, " (open files limit {limit})"),
            None => Ok(()),
        }
    }
}

/// Raises the soft open-files limit to the hard one (connections, tier files and Redis each
/// take a descriptor); returns the soft limit in force.
pub fn raise_open_files_limit() -> std::io::Result<u64> {
    rlimit::increase_nofile_limit(u64::MAX)
}

fn open_files_limit() -> Option<u64> {
    #[cfg(unix)]
    {
        rlimit::Resource::NOFILE
            .get()
            .ok()
            .map(|(soft, _)| soft)
            .filter(|&s| s != rlimit::INFINITY)
    }
    #[cfg(not(unix))]
    {
        None
    }
}

/// Descriptors open in this process (0 where the platform does not list them).
fn open_descriptors() -> u64 {
    ["/proc/self/fd", "/dev/fd"]
        .iter()
        .find_map(|d| std::fs::read_dir(d).ok())
        .map_or(0, |entries| entries.count() as u64)
}

/// A connection's slot under the cap. An evicted connection hands its slot straight to the
/// client it made room for, so that no other client takes it in between.
type Slot = OwnedSemaphorePermit;

/// One connection, as its task and its service see it.
#[derive(Default)]
struct Conn {
    /// Requests handed to the router whose answer's body is still alive.
    busy: AtomicUsize,
    /// The client this connection makes room for (set once, by [`Registry::evict_oldest_idle`]).
    heir: Mutex<Option<oneshot::Sender<Slot>>>,
    /// Wakes the connection's task when it is asked to make room.
    wake: Notify,
}

impl Conn {
    fn is_idle(&self) -> bool {
        self.busy.load(Ordering::Acquire) == 0
    }
}

/// The open connections, oldest first.
#[derive(Default)]
struct Registry {
    next_id: AtomicU64,
    live: Mutex<BTreeMap<u64, Arc<Conn>>>,
}

impl Registry {
    fn add(&self) -> (u64, Arc<Conn>) {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let conn = Arc::new(Conn::default());
        let mut live = self.live.lock().unwrap_or_else(PoisonError::into_inner);
        live.insert(id, conn.clone());
        (id, conn)
    }

    fn remove(&self, id: u64) {
        let mut live = self.live.lock().unwrap_or_else(PoisonError::into_inner);
        live.remove(&id);
    }

    /// Asks the oldest idle connection to close and hand its slot over; None when every one is
    /// busy (or already making room for another client).
    fn evict_oldest_idle(&self) -> Option<oneshot::Receiver<Slot>> {
        let live = self.live.lock().unwrap_or_else(PoisonError::into_inner);
        for conn in live.values() {
            if !conn.is_idle() {
                continue;
            }
            let mut heir = conn.heir.lock().unwrap_or_else(PoisonError::into_inner);
            if heir.is_none() {
                let (tx, rx) = oneshot::channel();
                *heir = Some(tx);
                conn.wake.notify_one();
                return Some(rx);
            }
        }
        None
    }
}

/// Counts a request as in flight on its connection for as long as it lives.
struct Busy(Arc<Conn>);

impl Busy {
    fn new(conn: Arc<Conn>) -> Self {
        conn.busy.fetch_add(1, Ordering::AcqRel);
        Self(conn)
    }
}

impl Drop for Busy {
    fn drop(&mut self) {
        self.0.busy.fetch_sub(1, Ordering::AcqRel);
    }
}

/// An answer's body that keeps its request counted as in flight until hyper drops it.
struct BusyBody {
    body: Body,
    _busy: Busy,
}

impl http_body::Body for BusyBody {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Bytes>, axum::Error>>> {
        Pin::new(&mut self.body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.body.size_hint()
    }
}

/// The router, counting each request on its connection.
#[derive(Clone)]
struct Tracked {
    app: TowerToHyperService<Router>,
    conn: Arc<Conn>,
}

impl hyper::service::Service<Request<Incoming>> for Tracked {
    type Response = Response;
    type Error = std::convert::Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Response, Self::Error>> + Send>>;

    fn call(&self, req: Request<Incoming>) -> Self::Future {
        let busy = Busy::new(self.conn.clone());
        let answer = self.app.call(req);
        Box::pin(async move {
            let res = answer.await?;
            Ok(res.map(|body| Body::new(BusyBody { body, _busy: busy })))
        })
    }
}

/// What each connection's task needs.
#[derive(Clone)]
struct Shared {
    app: Router,
    builder: Builder<TokioExecutor>,
    registry: Arc<Registry>,
    /// Turns true at shutdown.
    stop: watch::Receiver<bool>,
}

impl Shared {
    /// Serves one connection until it ends, is asked to make room, or the server stops.
    async fn serve(self, stream: TcpStream, slot: Slot) {
        let Shared {
            app,
            builder,
            registry,
            mut stop,
        } = self;
        let (id, conn) = registry.add();
        let service = Tracked {
            app: TowerToHyperService::new(app),
            conn: conn.clone(),
        };
        let http = builder.serve_connection_with_upgrades(TokioIo::new(stream), service);
        tokio::pin!(http);
        let ended = tokio::select! {
            _ = http.as_mut() => true,
            _ = conn.wake.notified() => false,
            _ = stop.wait_for(|&s| s) => false,
        };
        // Asked to make room, or shutting down: an idle connection is dropped (closed) now;
        // a busy one finishes its request with keep-alive off. Only this task polls the
        // connection, so no request can start between this check and the drop.
        if !ended && !conn.is_idle() {
            http.as_mut().graceful_shutdown();
            let _ = http.await;
        }
        registry.remove(id);
        let heir = conn
            .heir
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        if let Some(heir) = heir {
            // The client it made room for takes the slot (or, gone, drops it).
            let _ = heir.send(slot);
        }
    }
}

/// Answers a client over the cap with a 503 and closes its connection.
async fn refuse(mut stream: TcpStream, why: &str) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let body = ApiError::unavailable(why)
        .code("too_many_connections")
        .body()
        .to_string();
    let answer = format!(
        "HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\n\
         content-length: {}\r\nretry-after: 1\r\nconnection: close\r\n\r\n{body}",
        body.len()
    );
    let _ = tokio::time::timeout(REFUSE_TIME, async {
        stream.write_all(answer.as_bytes()).await?;
        stream.shutdown().await?;
        let mut buf = [0u8; 4096];
        while stream.read(&mut buf).await? > 0 {}
        Ok::<(), std::io::Error>(())
    })
    .await;
}

/// Accepts connections until `signal`, then closes idle ones, lets busy ones finish for up to
/// `grace`, then turns `cut` (requests still running answer at once) and returns.
pub(crate) async fn run(
    listener: TcpListener,
    app: Router,
    cap: ConnectionCap,
    grace: Duration,
    cut: watch::Sender<bool>,
    signal: impl Future<Output = ()>,
) {
    let mut builder = Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(crate::HEADER_READ_TIMEOUT);
    let (stop_tx, stop_rx) = watch::channel(false);
    let shared = Shared {
        app,
        builder,
        registry: Arc::new(Registry::default()),
        stop: stop_rx,
    };
    // Every accepted socket holds a descriptor permit; a served connection also a slot.
    let total = cap.connections + OVERFLOW;
    let descriptors = Arc::new(Semaphore::new(total));
    let slots = Arc::new(Semaphore::new(cap.connections));
    let busy_msg = format!(
        "all {} connections this server takes are busy; try again shortly",
        cap.connections
    );
    let busy_msg: Arc<str> = busy_msg.into();
    tokio::pin!(signal);
    loop {
        let descriptor = tokio::select! {
            p = descriptors.clone().acquire_owned() => p.expect("the semaphore is never closed"),
            _ = &mut signal => break,
        };
        let stream = tokio::select! {
            c = listener.accept() => match c {
                Ok((stream, _)) => stream,
                Err(e) => {
                    // Out of file descriptors and the like: wait a little, keep serving.
                    tracing::warn!("accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = &mut signal => break,
        };
        let shared = shared.clone();
        if let Ok(slot) = slots.clone().try_acquire_owned() {
            tokio::spawn(async move {
                shared.serve(stream, slot).await;
                drop(descriptor);
            });
            continue;
        }
        // Over the cap: take the place of the oldest idle connection, or get a 503.
        let room = shared.registry.evict_oldest_idle();
        let busy_msg = busy_msg.clone();
        tokio::spawn(async move {
            let slot = match room {
                Some(rx) => tokio::time::timeout(EVICT_WAIT, rx)
                    .await
                    .ok()
                    .and_then(Result::ok),
                None => None,
            };
            match slot {
                Some(slot) if !*shared.stop.borrow() => shared.serve(stream, slot).await,
                Some(_) => refuse(stream, "the server is shutting down").await,
                None => refuse(stream, &busy_msg).await,
            }
            drop(descriptor);
        });
    }
    drop(listener);
    let _ = stop_tx.send(true);
    tokio::select! {
        _ = descriptors.acquire_many(total as u32) => {}
        _ = tokio::time::sleep(grace) => {
            eprintln!("kvinfer: in-flight requests still running after {grace:?}; cancelling them");
            let _ = cut.send(true);
            // Let the cut answers reach their clients.
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cap_leaves_room_for_the_reserve() {
        let reserve = RESERVED_DESCRIPTORS + OVERFLOW as u64;
        let cap = ConnectionCap::new(1024, Some(256), 20);
        assert_eq!(cap.connections as u64, 256 - 20 - reserve);
        assert!(cap.to_string().contains("open files limit 256"), "{cap}");
        assert_eq!(
            ConnectionCap::new(1024, Some(1 << 20), 20).connections,
            1024
        );
        assert_eq!(ConnectionCap::new(1024, None, 20).connections, 1024);
        // A limit below the reserve still serves one connection at a time.
        assert_eq!(ConnectionCap::new(1024, Some(50), 20).connections, 1);
    }

    #[test]
    fn eviction_picks_the_oldest_idle_connection_once() {
        let r = Registry::default();
        let (_, a) = r.add();
        let (_, b) = r.add();
        let (_, c) = r.add();
        let asked = |c: &Conn| c.heir.lock().unwrap().is_some();
        let busy = Busy::new(a.clone());
        let _b = r.evict_oldest_idle().expect("b is idle");
        assert!(!asked(&a), "a is busy");
        assert!(asked(&b));
        let _c = r.evict_oldest_idle().expect("c is idle");
        assert!(asked(&c));
        assert!(
            r.evict_oldest_idle().is_none(),
            "only a is left, and it is busy"
        );
        drop(busy);
        assert!(a.is_idle());
        assert!(r.evict_oldest_idle().is_some());
    }
}
