//! Connection pools to endpoints: one pool per connector and protocol,
//! keyed by the endpoint's address.
//!
//! HTTP/1: a stack of idle connections per endpoint, most recently used on
//! top (warm, and the rest age out). A connection goes back on the stack when
//! its response body ends, not when the response head arrives, so the next
//! request never queues behind a body still streaming.
//!
//! HTTP/2: one multiplexed connection per endpoint; concurrent first
//! requests wait for one dial instead of each opening a connection.
//!
//! Why not hyper-util's legacy client: per request it hashed its pool key
//! (scheme and authority, one byte at a time) three times and spawned a task
//! to wait for the connection to become idle again (the profile is in
//! `bench/README.md`). Here the key is
//! a `SocketAddr`, and a connection is handed back from the response body
//! that just ended. A request that a reused connection gives back unsent (the
//! endpoint closed it while idle) goes to another connection.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use hyper::body::{Body, Frame, Incoming, SizeHint};
use hyper::client::conn::{http1, http2};
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::{TokioExecutor, TokioTimer};
use tokio::time::Instant;

use crate::connector::{ConnectError, Connector};
use crate::replay::ReplayBody;

/// The protocol a pool speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Proto {
    /// HTTP/1.1, one request at a time per connection.
    Http1,
    /// HTTP/2, one multiplexed connection per endpoint.
    Http2,
}

/// Why a request got no response.
#[derive(Debug, thiserror::Error)]
pub enum PoolError {
    /// No connection could be made.
    #[error(transparent)]
    Connect(#[from] ConnectError),
    /// The connection was made, but the HTTP handshake failed.
    #[error("HTTP handshake failed: {0}")]
    Handshake(#[source] hyper::Error),
    /// The request was sent (or may have been) and no response came.
    #[error("upstream failed: {0}")]
    Http(#[source] hyper::Error),
}

/// Each endpoint's connections. Looked up twice per request (checkout and
/// return); the keys are endpoint addresses from discovery, so a fast hasher
/// (seeded per process) instead of SipHash (measured in `bench/README.md`).
type Slots = HashMap<SocketAddr, Slot, foldhash::fast::RandomState>;

/// Connections to the endpoints of one connector, in one protocol.
pub struct Pool {
    inner: Arc<Inner>,
}

struct Inner {
    connector: Connector,
    proto: Proto,
    idle: Duration,
    slots: Mutex<Slots>,
    /// Whether the task closing idle connections has started.
    sweeping: AtomicBool,
}

#[derive(Default)]
struct Slot {
    /// HTTP/1: connections with nothing in flight, the most recent last.
    idle: Vec<(http1::SendRequest<ReplayBody>, Instant)>,
    /// HTTP/2: the shared connection and when it was last used.
    shared: Option<(http2::SendRequest<ReplayBody>, Instant)>,
    /// HTTP/2: held while dialing, so concurrent requests share one dial.
    dialing: Arc<tokio::sync::Mutex<()>>,
    /// Set when discovery retired the endpoint: connections lent out then
    /// are closed when their response ends instead of coming back.
    retired: Arc<AtomicBool>,
}

impl Pool {
    /// A pool dialing with `connector`, closing connections unused for `idle`.
    pub fn new(connector: Connector, proto: Proto, idle: Duration) -> Self {
        Self {
            inner: Arc::new(Inner {
                connector,
                proto,
                idle,
                slots: Mutex::default(),
                sweeping: AtomicBool::new(false),
            }),
        }
    }

    /// Sends `req` to `addr` on a pooled connection (dialing one when none
    /// is free) and waits for the response head. HTTP/1 requests must be in
    /// origin form with a Host header; HTTP/2 ones absolute.
    pub async fn send(
        &self,
        addr: SocketAddr,
        req: Request<ReplayBody>,
    ) -> Result<Response<PoolBody>, PoolError> {
        self.send_marked(addr, req, &AtomicBool::new(false))
            .await
            .map(|(resp, _)| resp)
    }

    /// [`Pool::send`], setting `dispatched` once the request is handed to
    /// a connection (until then it has certainly not reached the endpoint),
    /// and saying whether that connection was dialed for it (its time then
    /// includes the handshake).
    pub async fn send_marked(
        &self,
        addr: SocketAddr,
        req: Request<ReplayBody>,
        dispatched: &AtomicBool,
    ) -> Result<(Response<PoolBody>, bool), PoolError> {
        match self.inner.proto {
            Proto::Http1 => self.inner.send_h1(addr, req, dispatched).await,
            Proto::Http2 => self.inner.send_h2(addr, req, dispatched).await,
        }
    }

    /// Closes the pooled connections to `addr`, which discovery says is not
    /// serving or gone: idle ones at once, lent HTTP/1 ones when their
    /// response ends, the shared HTTP/2 one once its open streams end.
    /// Requests that come later dial anew.
    pub fn retire(&self, addr: SocketAddr) {
        if let Some(slot) = self.inner.lock().remove(&addr) {
            slot.retired.store(true, Ordering::Relaxed);
        }
    }

    /// Idle HTTP/1 connections and open HTTP/2 ones to `addr`.
    pub fn pooled(&self, addr: SocketAddr) -> usize {
        self.inner.lock().get(&addr).map_or(0, |s| {
            s.idle.len() + usize::from(s.shared.as_ref().is_some_and(|(tx, _)| !tx.is_closed()))
        })
    }
}

impl Inner {
    fn lock(&self) -> MutexGuard<'_, Slots> {
        // The map stays consistent whatever panicked while holding it.
        self.slots.lock().unwrap_or_else(|e| e.into_inner())
    }

    async fn send_h1(
        self: &Arc<Self>,
        addr: SocketAddr,
        mut req: Request<ReplayBody>,
        dispatched: &AtomicBool,
    ) -> Result<(Response<PoolBody>, bool), PoolError> {
        loop {
            let (idle, retired) = self.checkout_h1(addr);
            let (mut tx, reused) = match idle {
                Some(tx) => (tx, true),
                None => (self.dial_h1(addr).await?, false),
            };
            dispatched.store(true, Ordering::Relaxed);
            match tx.try_send_request(req).await {
                Ok(resp) => {
                    let lend = resp.status() != StatusCode::SWITCHING_PROTOCOLS;
                    let lent = lend.then(|| Lent {
                        pool: self.clone(),
                        addr,
                        tx,
                        retired,
                    });
                    return Ok((resp.map(|inner| PoolBody::new(inner, lent)), !reused));
                }
                Err(mut e) => match e.take_message() {
                    // Closed while idle before it took the request: nothing
                    // was sent, so another connection may have it.
                    Some(back) if reused => req = back,
                    _ => return Err(PoolError::Http(e.into_error())),
                },
            }
        }
    }

    /// The most recently used idle connection that is still open, and the
    /// flag a connection lent to this endpoint checks before it comes back.
    fn checkout_h1(
        &self,
        addr: SocketAddr,
    ) -> (Option<http1::SendRequest<ReplayBody>>, Arc<AtomicBool>) {
        let mut slots = self.lock();
        let slot = slots.entry(addr).or_default();
        while let Some((tx, _)) = slot.idle.pop() {
            if tx.is_ready() {
                return (Some(tx), slot.retired.clone());
            }
        }
        (None, slot.retired.clone())
    }

    async fn dial_h1(
        self: &Arc<Self>,
        addr: SocketAddr,
    ) -> Result<http1::SendRequest<ReplayBody>, PoolError> {
        let io = self.connector.connect(addr).await?;
        let (tx, conn) = http1::Builder::new()
            .handshake(io)
            .await
            .map_err(PoolError::Handshake)?;
        tokio::spawn(async move {
            if let Err(e) = conn.with_upgrades().await {
                tracing::debug!(%addr, error = %e, "HTTP/1 upstream connection ended");
            }
        });
        self.sweep_later();
        Ok(tx)
    }

    /// Puts a connection whose response has ended back on its stack: at
    /// once when it can take a request, else once its task catches up (the
    /// request body may still be sending).
    fn give_back(self: Arc<Self>, addr: SocketAddr, mut tx: http1::SendRequest<ReplayBody>) {
        if tx.is_ready() {
            self.push_idle(addr, tx);
        } else if !tx.is_closed() {
            tokio::spawn(async move {
                if tx.ready().await.is_ok() {
                    self.push_idle(addr, tx);
                }
            });
        }
    }

    fn push_idle(&self, addr: SocketAddr, tx: http1::SendRequest<ReplayBody>) {
        let now = Instant::now();
        self.lock().entry(addr).or_default().idle.push((tx, now));
    }

    async fn send_h2(
        self: &Arc<Self>,
        addr: SocketAddr,
        mut req: Request<ReplayBody>,
        dispatched: &AtomicBool,
    ) -> Result<(Response<PoolBody>, bool), PoolError> {
        let mut redialed = false;
        loop {
            let mut tx = match self.shared_h2(addr) {
                Some(tx) => tx,
                None => {
                    redialed = true;
                    self.dial_h2(addr).await?
                }
            };
            dispatched.store(true, Ordering::Relaxed);
            match tx.try_send_request(req).await {
                Ok(resp) => return Ok((resp.map(|inner| PoolBody::new(inner, None)), redialed)),
                Err(mut e) => match e.take_message() {
                    // The connection was going away (GOAWAY, closed while
                    // idle) before it took the request: dial a new one, once.
                    Some(back) if !redialed => {
                        self.forget_h2(addr);
                        req = back;
                    }
                    _ => return Err(PoolError::Http(e.into_error())),
                },
            }
        }
    }

    /// The endpoint's open HTTP/2 connection, if it has one.
    fn shared_h2(&self, addr: SocketAddr) -> Option<http2::SendRequest<ReplayBody>> {
        let mut slots = self.lock();
        let shared = &mut slots.get_mut(&addr)?.shared;
        match shared {
            Some((tx, used)) if !tx.is_closed() => {
                *used = Instant::now();
                Some(tx.clone())
            }
            _ => {
                *shared = None;
                None
            }
        }
    }

    fn forget_h2(&self, addr: SocketAddr) {
        if let Some(slot) = self.lock().get_mut(&addr) {
            slot.shared = None;
        }
    }

    async fn dial_h2(
        self: &Arc<Self>,
        addr: SocketAddr,
    ) -> Result<http2::SendRequest<ReplayBody>, PoolError> {
        let dialing = self.lock().entry(addr).or_default().dialing.clone();
        let _dialing = dialing.lock().await;
        // Whoever held the lock before may have dialed it already.
        if let Some(tx) = self.shared_h2(addr) {
            return Ok(tx);
        }
        let io = self
            .connector
            .connect(addr)
            .await?
            .wrap(|io| Box::new(crate::liveness::IdlePing::new(io)));
        let (tx, conn) = http2::Builder::new(TokioExecutor::new())
            .timer(TokioTimer::new())
            // hyper pings while requests are open, IdlePing when idle (see
            // `liveness`).
            .keep_alive_interval(crate::liveness::H2_PING_INTERVAL)
            .keep_alive_timeout(crate::liveness::H2_PING_TIMEOUT)
            .keep_alive_while_idle(false)
            .handshake(io)
            .await
            .map_err(PoolError::Handshake)?;
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(%addr, error = %e, "HTTP/2 upstream connection ended");
            }
        });
        self.lock().entry(addr).or_default().shared = Some((tx.clone(), Instant::now()));
        self.sweep_later();
        Ok(tx)
    }

    /// Starts, once, the task that closes connections idle for `idle`. It
    /// ends with the pool.
    fn sweep_later(self: &Arc<Self>) {
        if self.sweeping.swap(true, Ordering::Relaxed) {
            return;
        }
        let pool = Arc::downgrade(self);
        let every = self.idle.max(Duration::from_millis(100));
        tokio::spawn(sweep(pool, every));
    }

    /// Closes what has been idle for `idle` or has closed, and forgets
    /// endpoints left with nothing.
    fn sweep(&self, now: Instant) {
        let idle = self.idle;
        let mut closed = 0;
        self.lock().retain(|_, slot| {
            let before = slot.idle.len();
            slot.idle
                .retain(|(tx, since)| !tx.is_closed() && now.duration_since(*since) < idle);
            closed += before - slot.idle.len();
            if slot
                .shared
                .as_ref()
                .is_some_and(|(tx, used)| tx.is_closed() || now.duration_since(*used) >= idle)
            {
                // In-flight requests hold clones; the connection closes after them.
                slot.shared = None;
            }
            // Kept while a dial is under way or a lent connection holds
            // the slot's retired flag (a retirement must reach it).
            !slot.idle.is_empty()
                || slot.shared.is_some()
                || Arc::strong_count(&slot.dialing) > 1
                || Arc::strong_count(&slot.retired) > 1
        });
        if closed > 0 {
            // Each closed HTTP/1 connection frees its buffers (about 20 KiB).
            crate::memory::freed();
        }
    }
}

async fn sweep(pool: Weak<Inner>, every: Duration) {
    let mut tick = tokio::time::interval(every / 2);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let Some(pool) = pool.upgrade() else { return };
        pool.sweep(Instant::now());
    }
}

/// An HTTP/1 connection lent to one response.
struct Lent {
    pool: Arc<Inner>,
    addr: SocketAddr,
    tx: http1::SendRequest<ReplayBody>,
    /// Its endpoint's slot was retired meanwhile: close, do not give back.
    retired: Arc<AtomicBool>,
}

/// A response body that returns its HTTP/1 connection to the pool when it
/// ends. Dropped before its end, the connection is dropped and closes.
pub struct PoolBody {
    inner: Incoming,
    lent: Option<Lent>,
}

impl PoolBody {
    fn new(inner: Incoming, lent: Option<Lent>) -> Self {
        Self { inner, lent }
    }

    fn release(&mut self) {
        if let Some(l) = self.lent.take()
            && !l.retired.load(Ordering::Relaxed)
        {
            l.pool.give_back(l.addr, l.tx);
        }
    }
}

impl std::fmt::Debug for PoolBody {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PoolBody")
            .field("lent", &self.lent.is_some())
            .finish_non_exhaustive()
    }
}

impl Body for PoolBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let this = self.get_mut();
        // Empty DATA frames are skipped (see `replay.rs`: relayed, each is an
        // empty non-final frame the next peer counts as abuse).
        let polled = loop {
            match Pin::new(&mut this.inner).poll_frame(cx) {
                Poll::Ready(Some(Ok(f)))
                    if f.data_ref().is_some_and(Bytes::is_empty) && !this.inner.is_end_stream() =>
                {
                    continue;
                }
                Poll::Ready(Some(Ok(f))) if f.data_ref().is_some_and(Bytes::is_empty) => {
                    break Poll::Ready(None);
                }
                other => break other,
            }
        };
        match &polled {
            Poll::Ready(None) => this.release(),
            Poll::Ready(Some(Ok(_))) if this.inner.is_end_stream() => this.release(),
            // A broken body means a broken connection.
            Poll::Ready(Some(Err(_))) => this.lent = None,
            _ => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for PoolBody {
    fn drop(&mut self) {
        // A body known to be empty (204, HEAD, Content-Length: 0) is never
        // polled: it ended as it arrived.
        if self.inner.is_end_stream() {
            self.release();
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use std::sync::atomic::AtomicUsize;

    use http_body_util::{BodyExt, Full};
    use hyper::service::service_fn;
    use hyper_util::rt::TokioIo;
    use tokio::net::TcpListener;

    use super::*;
    use crate::connector::Limits;
    use crate::resilience::breaker::Breakers;
    use crate::settings::Origin;
    use crate::settings::{Defaults, Settings};

    const IDLE: Duration = Duration::from_secs(90);

    /// A loopback HTTP server answering `body` to every request; counts the
    /// connections it accepted.
    /// A local HTTP server answering `body`, and how many connections it accepted.
    pub(crate) async fn server(
        proto: Proto,
        body: &'static [u8],
        keep_alive: bool,
    ) -> (SocketAddr, Arc<AtomicUsize>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let accepted = Arc::new(AtomicUsize::new(0));
        let count = accepted.clone();
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                count.fetch_add(1, Ordering::SeqCst);
                let svc = service_fn(move |_req| async move {
                    Ok::<_, std::convert::Infallible>(Response::new(Full::new(Bytes::from_static(
                        body,
                    ))))
                });
                let io = TokioIo::new(stream);
                tokio::spawn(async move {
                    let _ = match proto {
                        Proto::Http1 => {
                            hyper::server::conn::http1::Builder::new()
                                .keep_alive(keep_alive)
                                .serve_connection(io, svc)
                                .await
                        }
                        Proto::Http2 => {
                            hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                                .serve_connection(io, svc)
                                .await
                        }
                    };
                });
            }
        });
        (addr, accepted)
    }

    fn pool(proto: Proto) -> Pool {
        let limits = Arc::new(Limits::default());
        limits.set(&Settings::resolve(None, Origin::Mesh, &Defaults::default()));
        Pool::new(
            Connector::new(Arc::new(Breakers::default()), limits),
            proto,
            IDLE,
        )
    }

    /// A GET for `addr` as the pool sends it.
    pub(crate) fn get(addr: SocketAddr, proto: Proto) -> Request<ReplayBody> {
        let uri = match proto {
            Proto::Http1 => "/".to_string(),
            Proto::Http2 => format!("http://{addr}/"),
        };
        let mut req = Request::new(ReplayBody::empty());
        *req.uri_mut() = uri.parse().expect("uri");
        req.headers_mut().insert(
            hyper::header::HOST,
            hyper::header::HeaderValue::from_static("web"),
        );
        if proto == Proto::Http2 {
            *req.version_mut() = hyper::Version::HTTP_2;
        }
        req
    }

    /// The whole body of `resp`.
    pub(crate) async fn read(resp: Response<PoolBody>) -> Bytes {
        resp.into_body().collect().await.expect("body").to_bytes()
    }

    #[tokio::test]
    async fn http1_reuses_a_connection_once_its_response_body_ended() {
        let (addr, accepted) = server(Proto::Http1, b"hello", true).await;
        let pool = pool(Proto::Http1);
        for _ in 0..5 {
            let resp = pool
                .send(addr, get(addr, Proto::Http1))
                .await
                .expect("response");
            assert_eq!(read(resp).await, "hello");
        }
        assert_eq!(accepted.load(Ordering::SeqCst), 1);
        assert_eq!(pool.pooled(addr), 1);
    }

    #[tokio::test]
    async fn only_the_try_that_dialed_says_so() {
        for proto in [Proto::Http1, Proto::Http2] {
            let (addr, _) = server(proto, b"hello", true).await;
            let pool = pool(proto);
            let mut dialed = Vec::new();
            for _ in 0..3 {
                let (resp, d) = pool
                    .send_marked(addr, get(addr, proto), &AtomicBool::new(false))
                    .await
                    .expect("response");
                read(resp).await;
                dialed.push(d);
            }
            assert_eq!(dialed, [true, false, false], "{proto:?}");
        }
    }

    #[tokio::test]
    async fn http1_requests_in_flight_together_use_their_own_connections() {
        let (addr, accepted) = server(Proto::Http1, b"hello", true).await;
        let pool = pool(Proto::Http1);
        // Both heads arrive before either body is read: two connections.
        let a = pool.send(addr, get(addr, Proto::Http1)).await.expect("a");
        let b = pool.send(addr, get(addr, Proto::Http1)).await.expect("b");
        assert_eq!(accepted.load(Ordering::SeqCst), 2);
        assert_eq!(pool.pooled(addr), 0, "lent connections are not idle");
        read(a).await;
        read(b).await;
        assert_eq!(pool.pooled(addr), 2);
    }

    #[tokio::test]
    async fn a_body_dropped_before_its_end_does_not_give_its_connection_back() {
        static BIG: [u8; 1 << 20] = [b'x'; 1 << 20];
        let (addr, accepted) = server(Proto::Http1, &BIG, true).await;
        let pool = pool(Proto::Http1);
        let resp = pool
            .send(addr, get(addr, Proto::Http1))
            .await
            .expect("response");
        drop(resp);
        assert_eq!(pool.pooled(addr), 0);
        let resp = pool
            .send(addr, get(addr, Proto::Http1))
            .await
            .expect("response");
        assert_eq!(read(resp).await.len(), BIG.len());
        assert_eq!(accepted.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn a_connection_the_endpoint_closes_is_not_reused() {
        let (addr, accepted) = server(Proto::Http1, b"bye", false).await;
        let pool = pool(Proto::Http1);
        for _ in 0..3 {
            let resp = pool
                .send(addr, get(addr, Proto::Http1))
                .await
                .expect("response");
            assert_eq!(read(resp).await, "bye");
        }
        assert_eq!(accepted.load(Ordering::SeqCst), 3);
    }

    #[tokio::test]
    async fn http2_requests_share_one_connection_from_the_first() {
        let (addr, accepted) = server(Proto::Http2, b"h2", true).await;
        let pool = pool(Proto::Http2);
        let sends = (0..8).map(|_| pool.send(addr, get(addr, Proto::Http2)));
        for resp in futures::future::join_all(sends).await {
            assert_eq!(read(resp.expect("response")).await, "h2");
        }
        assert_eq!(accepted.load(Ordering::SeqCst), 1);
        assert_eq!(pool.pooled(addr), 1);
    }

    #[tokio::test]
    async fn a_refused_connection_is_a_connect_error() {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        drop(listener);
        let pool = pool(Proto::Http1);
        let err = pool
            .send(addr, get(addr, Proto::Http1))
            .await
            .expect_err("refused");
        assert!(
            matches!(err, PoolError::Connect(ConnectError::Io(_))),
            "{err:?}"
        );
    }

    #[tokio::test]
    async fn idle_connections_close_after_the_idle_timeout() {
        let (addr, _) = server(Proto::Http1, b"hello", true).await;
        let (addr2, _) = server(Proto::Http2, b"h2", true).await;
        let (h1, h2) = (pool(Proto::Http1), pool(Proto::Http2));
        read(h1.send(addr, get(addr, Proto::Http1)).await.expect("h1")).await;
        read(h2.send(addr2, get(addr2, Proto::Http2)).await.expect("h2")).await;
        assert_eq!((h1.pooled(addr), h2.pooled(addr2)), (1, 1));
        tokio::time::pause();
        tokio::time::advance(IDLE / 2).await;
        tokio::task::yield_now().await;
        assert_eq!(
            (h1.pooled(addr), h2.pooled(addr2)),
            (1, 1),
            "not idle long enough yet"
        );
        tokio::time::advance(IDLE).await;
        tokio::task::yield_now().await;
        assert_eq!((h1.pooled(addr), h2.pooled(addr2)), (0, 0));
    }

    #[tokio::test]
    async fn retiring_an_endpoint_closes_its_idle_connections_and_keeps_lent_ones_out() {
        let (addr, accepted) = server(Proto::Http1, b"hello", true).await;
        let pool = pool(Proto::Http1);
        read(
            pool.send(addr, get(addr, Proto::Http1))
                .await
                .expect("idle"),
        )
        .await;
        let lent = pool
            .send(addr, get(addr, Proto::Http1))
            .await
            .expect("lent");
        assert_eq!(pool.pooled(addr), 0, "the idle one was reused");
        read(
            pool.send(addr, get(addr, Proto::Http1))
                .await
                .expect("second"),
        )
        .await;
        assert_eq!((pool.pooled(addr), accepted.load(Ordering::SeqCst)), (1, 2));
        pool.retire(addr);
        assert_eq!(pool.pooled(addr), 0);
        read(lent).await;
        assert_eq!(pool.pooled(addr), 0, "a lent connection does not come back");
        read(
            pool.send(addr, get(addr, Proto::Http1))
                .await
                .expect("after"),
        )
        .await;
        assert_eq!(accepted.load(Ordering::SeqCst), 3, "dialed anew");
    }

    #[tokio::test]
    async fn retiring_drops_the_shared_http2_connection() {
        let (addr, accepted) = server(Proto::Http2, b"h2", true).await;
        let pool = pool(Proto::Http2);
        read(
            pool.send(addr, get(addr, Proto::Http2))
                .await
                .expect("first"),
        )
        .await;
        pool.retire(addr);
        assert_eq!(pool.pooled(addr), 0);
        read(
            pool.send(addr, get(addr, Proto::Http2))
                .await
                .expect("again"),
        )
        .await;
        assert_eq!(accepted.load(Ordering::SeqCst), 2);
    }

    /// A TCP relay that can freeze: it stops moving bytes but keeps both
    /// sockets open, so the kernel still acknowledges what arrives (a
    /// paused container, or a peer whose network vanished, as the caller
    /// sees it: no FIN, no RST, no answer).
    async fn freezable(to: SocketAddr) -> (SocketAddr, Arc<AtomicBool>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let frozen = Arc::new(AtomicBool::new(false));
        let flag = frozen.clone();
        tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let Ok(server) = tokio::net::TcpStream::connect(to).await else {
                    return;
                };
                let (cr, cw) = client.into_split();
                let (sr, sw) = server.into_split();
                for (mut r, mut w) in [
                    (
                        Box::new(cr) as Box<dyn tokio::io::AsyncRead + Send + Unpin>,
                        Box::new(sw) as Box<dyn tokio::io::AsyncWrite + Send + Unpin>,
                    ),
                    (Box::new(sr), Box::new(cw)),
                ] {
                    let flag = flag.clone();
                    tokio::spawn(async move {
                        use tokio::io::{AsyncReadExt, AsyncWriteExt};
                        let mut buf = vec![0u8; 16 * 1024];
                        while let Ok(n) = r.read(&mut buf).await {
                            if n == 0 {
                                break;
                            }
                            while flag.load(Ordering::SeqCst) {
                                tokio::time::sleep(Duration::from_millis(20)).await;
                            }
                            if w.write_all(&buf[..n]).await.is_err() {
                                break;
                            }
                        }
                    });
                }
            }
        });
        (addr, frozen)
    }

    #[tokio::test]
    async fn a_silent_http2_peer_fails_its_waiting_requests_after_the_ping_timeout() {
        // An app that takes its time: pings keep being answered meanwhile.
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let app = listener.local_addr().expect("addr");
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let svc = service_fn(|_req| async {
                    tokio::time::sleep(Duration::from_secs(3)).await;
                    Ok::<_, std::convert::Infallible>(Response::new(Full::new(Bytes::from_static(
                        b"slow",
                    ))))
                });
                tokio::spawn(
                    hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(stream), svc),
                );
            }
        });
        let (addr, frozen) = freezable(app).await;
        let pool = pool(Proto::Http2);
        let started = Instant::now();
        let slow = pool
            .send(addr, get(addr, Proto::Http2))
            .await
            .expect("a slow answer");
        assert_eq!(read(slow).await, "slow");
        assert!(
            started.elapsed() >= Duration::from_secs(3),
            "pings did not cut a slow answer short"
        );

        let waiting = tokio::spawn({
            let pool = Arc::new(pool);
            async move {
                let started = Instant::now();
                let r = pool.send(addr, get(addr, Proto::Http2)).await;
                (r.map(|_| ()), started.elapsed())
            }
        });
        tokio::time::sleep(Duration::from_millis(200)).await;
        frozen.store(true, Ordering::SeqCst);
        let (result, took) = tokio::time::timeout(Duration::from_secs(10), waiting)
            .await
            .expect("the request ends")
            .expect("task");
        assert!(matches!(result, Err(PoolError::Http(_))), "{result:?}");
        let bound = crate::liveness::H2_PING_INTERVAL + crate::liveness::H2_PING_TIMEOUT;
        assert!(
            took < bound + Duration::from_millis(700),
            "took {took:?}, bound {bound:?}"
        );
    }
}
