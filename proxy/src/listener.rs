//! Accept loops and dispatch: each connection's protocol comes from
//! `detect.rs`; it is then served as HTTP (hyper, HTTP/1.1 and HTTP/2 on one
//! port, handing requests to `http/`), accepted as mTLS from another
//! sidecar, or relayed as opaque TCP (`opaque.rs`).

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use futures::future::Either;
use hyper::server::conn::{http1, http2};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

use crate::detect::{Detector, Protocol, Race, peek, race};
use crate::edge::ConnRefusal;
use crate::http::{inbound, outbound};
use crate::metrics::{Direction, DirectionLabels, TimeoutKind};
use crate::opaque::{Server, connect_direct, passthrough, relay};
use crate::settings::DEFAULT_HEADER_READ;
use crate::state::Proxy;
use wayfinder_proto::server::{Activity, CLOSE_GRACE};

/// What a listener is for.
#[derive(Clone, Debug)]
pub enum Role {
    /// Outbound to one service (`--upstream NAME=ADDR`).
    Upstream(Arc<str>),
    /// Outbound HTTP, routed by Host / `:authority` (`--outbound`).
    HostRouted,
    /// Inbound, to the local app (`--inbound`).
    Inbound,
    /// Outbound, redirected here by iptables (`--transparent`): the original
    /// destination decides the service.
    Transparent,
}

impl Role {
    fn direction(&self) -> Direction {
        match self {
            Role::Inbound => Direction::Inbound,
            _ => Direction::Outbound,
        }
    }
}

/// Connections being served, for draining on shutdown.
#[derive(Default)]
struct Open(AtomicUsize);

impl Open {
    /// Connections still open.
    pub fn count(&self) -> usize {
        self.0.load(Ordering::Relaxed)
    }
}

/// Listeners that close together (the inbound ones, or the outbound ones)
/// and the connections they accepted, which drain together.
pub struct Group {
    stop: watch::Sender<bool>,
    open: Arc<Open>,
}

impl Default for Group {
    fn default() -> Self {
        Self {
            stop: watch::channel(false).0,
            open: Arc::default(),
        }
    }
}

impl Group {
    /// Serves `l` as part of the group.
    pub fn serve(&self, l: Listener, proxy: Arc<Proxy>) {
        tokio::spawn(serve(l, proxy, self.open.clone(), self.stop.subscribe()));
    }

    /// Stops accepting; open HTTP connections are asked to finish.
    pub fn close(&self) {
        self.stop.send_replace(true);
    }

    /// Connections still open.
    pub fn open(&self) -> usize {
        self.open.count()
    }

    /// Waits until every connection has ended or `deadline` passes;
    /// whether they all ended.
    pub async fn drained(&self, deadline: tokio::time::Instant) -> bool {
        while self.open() > 0 && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        self.open() == 0
    }
}

struct OpenGuard(Arc<Open>);
impl Drop for OpenGuard {
    fn drop(&mut self) {
        self.0.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// One listener's settings.
pub struct Listener {
    /// The socket.
    pub socket: TcpListener,
    /// Its role.
    pub role: Role,
    /// How long to wait for a client's first bytes.
    pub detect_timeout: Duration,
    /// Silent clients that may race an endpoint at once (see [`Detector`]).
    pub silent_races: usize,
    /// Connections served at once; more wait in the accept queue.
    pub max_connections: usize,
}

/// Accepts until `shutdown` turns true; in-flight connections are asked to
/// finish (HTTP: graceful shutdown) and counted in `open`.
async fn serve(l: Listener, proxy: Arc<Proxy>, open: Arc<Open>, shutdown: watch::Receiver<bool>) {
    let detector = Arc::new(Detector::new(l.detect_timeout, l.silent_races));
    let slots = Arc::new(tokio::sync::Semaphore::new(l.max_connections));
    let mut stop = shutdown.clone();
    loop {
        let slot = match slots.clone().try_acquire_owned() {
            Ok(slot) => slot,
            Err(_) => {
                // Full: new clients wait in the kernel's accept queue.
                proxy
                    .metrics
                    .listener_full
                    .get_or_create(&DirectionLabels {
                        direction: l.role.direction(),
                    })
                    .inc();
                tokio::select! {
                    s = slots.clone().acquire_owned() => match s {
                        Ok(slot) => slot,
                        Err(_) => return,
                    },
                    () = stopped(&mut stop) => return,
                }
            }
        };
        let accepted = tokio::select! {
            a = l.socket.accept() => a,
            () = stopped(&mut stop) => return,
        };
        let (stream, peer) = match accepted {
            Ok(a) => a,
            Err(e) => {
                // Out of file descriptors and the like: back off, keep serving.
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        crate::liveness::tune_accepted(&stream);
        open.0.fetch_add(1, Ordering::Relaxed);
        let guard = OpenGuard(open.clone());
        let (proxy, role, shutdown, detector) = (
            proxy.clone(),
            l.role.clone(),
            shutdown.clone(),
            detector.clone(),
        );
        tokio::spawn(async move {
            let _guard = guard;
            let _slot = slot;
            let gauge = proxy
                .metrics
                .connections
                .get_or_create(&DirectionLabels {
                    direction: role.direction(),
                })
                .clone();
            gauge.inc();
            connection(stream, peer, role, proxy.clone(), detector, shutdown).await;
            gauge.dec();
        });
    }
}

/// Resolves once shutdown begins (without holding the watch's lock).
async fn stopped(rx: &mut watch::Receiver<bool>) {
    let _ = rx.wait_for(|s| *s).await;
}

/// One accepted connection: detection, then HTTP or an opaque relay. What
/// only some connections reach (interception, mTLS, relays) is boxed where
/// it starts, so every connection's task stays small.
async fn connection(
    stream: TcpStream,
    peer: SocketAddr,
    role: Role,
    proxy: Arc<Proxy>,
    detector: Arc<Detector>,
    shutdown: watch::Receiver<bool>,
) {
    let window = detector.window;
    // An intercepted connection first finds its service; the bytes peeked
    // for its Host also tell whether the client is silent, and then the
    // detection window is not waited twice.
    let transparent = matches!(role, Role::Transparent);
    let (role, silent) = match role {
        Role::Transparent => match Box::pin(intercepted(&stream, &proxy, window)).await {
            Intercepted::Serve(r, silent) => (r, silent),
            Intercepted::Passthrough(orig) => {
                return Box::pin(passthrough(stream, orig, &proxy)).await;
            }
            Intercepted::Lost => return,
        },
        r => (r, false),
    };
    // Intercepted connections go to many destinations, Host-routed ones
    // to many services: what their port carries is nothing to remember.
    let one_target = !transparent && !matches!(role, Role::HostRouted);
    let proto = detector
        .first_bytes(&stream, one_target, silent, &proxy.metrics)
        .await;
    // With an identity, the inbound side takes mTLS from other sidecars;
    // plaintext only in permissive mode.
    if matches!(role, Role::Inbound) && proxy.identity.is_some() {
        match proto {
            Some(Protocol::Tls) => {
                return Box::pin(inbound_tls(stream, peer, proxy, shutdown)).await;
            }
            _ if proxy.local.strict => {
                proxy.refuse(
                    ConnRefusal::Plaintext,
                    peer,
                    "plaintext connection to a strict (mTLS-only) inbound",
                );
                return;
            }
            _ => {}
        }
    }
    // A silent client races its target (below), except where no race may
    // run: Host routing needs HTTP, and each race holds an endpoint
    // connection, so only so many run at once (or silent sockets would
    // each cost one). There the client just gets longer to speak, with
    // nothing dialed for it.
    let mut racing = None;
    let proto = match proto {
        None if matches!(role, Role::HostRouted) => peek(&stream, DEFAULT_HEADER_READ).await,
        None => match detector.try_race() {
            Some(slot) => {
                racing = Some(slot);
                None
            }
            None => {
                proxy.metrics.silent_races_capped.inc();
                peek(&stream, DEFAULT_HEADER_READ).await
            }
        },
        p => p,
    };
    match proto {
        Some(p @ (Protocol::Http1 | Protocol::Http2)) => {
            serve_http(stream, p, peer, role, proxy, None, shutdown).await
        }
        // Host routing has no target for opaque bytes: `connect_target` says so.
        Some(Protocol::Opaque | Protocol::Tls) => {
            if let Some(server) = Box::pin(connect_target(&role, &proxy, peer)).await {
                Box::pin(relay(stream, server, &[], role.direction(), &proxy)).await;
            }
        }
        // The client said nothing yet: connect, and let whoever speaks first
        // decide. A server greeting (SMTP, MySQL) means opaque TCP, and the
        // port is remembered as server-first; a client that was merely slow
        // still gets HTTP, so one slow client never turns a port opaque.
        None => {
            // Still silent after the longer wait: nothing to serve.
            let Some(racing) = racing else {
                return;
            };
            let Some(mut server) = Box::pin(connect_target(&role, &proxy, peer)).await else {
                return;
            };
            let mut greeting = vec![0u8; 4096];
            let first = race(&stream, &mut server.stream, &mut greeting, window).await;
            drop(racing);
            match first {
                Race::Client(p @ (Protocol::Http1 | Protocol::Http2)) => {
                    drop(server);
                    serve_http(stream, p, peer, role, proxy, None, shutdown).await;
                }
                Race::Client(_) => {
                    Box::pin(relay(stream, server, &[], role.direction(), &proxy)).await;
                }
                Race::Server(n) => {
                    if !transparent {
                        detector.server_spoke_first();
                    }
                    Box::pin(relay(
                        stream,
                        server,
                        &greeting[..n],
                        role.direction(),
                        &proxy,
                    ))
                    .await;
                }
                Race::Closed => {}
            }
        }
    }
}

/// What becomes of an intercepted connection.
enum Intercepted {
    /// Served in this role (the service it is for, or the Host-routed
    /// listener's when it was not redirected); `true` when its client
    /// stayed silent through the detection window.
    Serve(Role, bool),
    /// Relayed untouched to where the app meant it to go.
    Passthrough(SocketAddr),
    /// The socket is gone before anything could be decided.
    Lost,
}

async fn intercepted(stream: &TcpStream, proxy: &Proxy, window: Duration) -> Intercepted {
    use crate::transparent::{Peeked, Target, decide, original_dst, peek_host};
    let Ok(local) = stream.local_addr() else {
        return Intercepted::Lost;
    };
    let orig = original_dst(stream);
    proxy.catalog.wait_loaded(CATALOG_WAIT).await;
    let peeked = match orig {
        Some(o) if o != local => peek_host(stream, window).await,
        _ => Peeked::NoHost,
    };
    let host = match &peeked {
        Peeked::Host(h) => Some(h.as_str()),
        _ => None,
    };
    let silent = peeked == Peeked::Silent;
    match decide(&proxy.catalog.table(), local, orig, host) {
        Target::Service(name) => Intercepted::Serve(Role::Upstream(name), silent),
        Target::Direct => Intercepted::Serve(Role::HostRouted, false),
        Target::Passthrough(orig) => Intercepted::Passthrough(orig),
    }
}

/// How long the first intercepted connections wait for the catalog.
const CATALOG_WAIT: Duration = Duration::from_secs(2);

/// An mTLS connection from another sidecar: HTTP/2 or opaque TCP by ALPN,
/// the caller's identity taken from its certificate.
async fn inbound_tls(
    stream: TcpStream,
    peer: SocketAddr,
    proxy: Arc<Proxy>,
    shutdown: watch::Receiver<bool>,
) {
    let Some(config) = proxy.tls_server.clone() else {
        return;
    };
    let accepted = tokio::time::timeout(
        TLS_HANDSHAKE_TIMEOUT,
        Box::pin(tokio_rustls::TlsAcceptor::from(config).accept(stream)),
    )
    .await;
    let tls = match accepted {
        // The TLS session (rustls' state and buffers) goes on the heap, not
        // inline in the connection's task.
        Ok(Ok(tls)) => Box::new(tls),
        Ok(Err(e)) => {
            proxy.refuse(
                ConnRefusal::Handshake,
                peer,
                &format!("mTLS handshake failed: {e}"),
            );
            return;
        }
        Err(_) => {
            proxy.refuse(ConnRefusal::Handshake, peer, "mTLS handshake timed out");
            return;
        }
    };
    let (_, conn) = tls.get_ref();
    let caller: Option<Arc<str>> = conn
        .peer_certificates()
        .and_then(crate::identity::peer_id)
        .map(Arc::from);
    // The CA also signs the operator's credential (for wf-control): only
    // workload identities may call a service.
    if !caller.as_deref().is_some_and(|id| id.contains("/svc/")) {
        proxy.refuse(
            ConnRefusal::Handshake,
            peer,
            "the peer's certificate names no workload",
        );
        return;
    }
    if conn.alpn_protocol() == Some(crate::identity::ALPN_TCP) {
        if !Box::pin(proxy.authorized(caller.as_deref(), crate::authz::Ask::Tcp)).await {
            proxy.refuse(
                ConnRefusal::Forbidden,
                peer,
                "opaque connection denied by authorization policy",
            );
            return;
        }
        if let Some(server) = Box::pin(connect_target(&Role::Inbound, &proxy, peer)).await {
            Box::pin(relay(tls, server, &[], Direction::Inbound, &proxy)).await;
        }
        return;
    }
    let proto = if conn.alpn_protocol() == Some(crate::identity::ALPN_H2) {
        Protocol::Http2
    } else {
        Protocol::Http1
    };
    serve_http(tls, proto, peer, Role::Inbound, proxy, caller, shutdown).await;
}

/// How long another sidecar may take to finish a TLS handshake.
const TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Serves HTTP on a connection whose protocol detection (or ALPN) already
/// named: hyper's HTTP/1 or HTTP/2 server directly. (hyper-util's `auto`
/// server sniffed the protocol a second time, read through a rewind buffer
/// for the connection's life and kept both servers' state in every
/// connection's task.)
async fn serve_http<S>(
    stream: S,
    proto: Protocol,
    peer: SocketAddr,
    role: Role,
    proxy: Arc<Proxy>,
    caller: Option<Arc<str>>,
    shutdown: watch::Receiver<bool>,
) where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let p = proxy.clone();
    let r = role.clone();
    // HTTP/2 connections are closed once idle; HTTP/1's header-read timeout
    // already covers a keep-alive connection waiting for its next request.
    let activity = (proto == Protocol::Http2).then(|| Arc::new(Activity::new()));
    let a = activity.clone();
    let svc = service_fn(move |req| {
        let (p, r, caller) = (p.clone(), r.clone(), caller.clone());
        let busy = a.as_ref().map(|a| a.start());
        // Boxed per request: hyper's HTTP/1 server keeps a slot the size of
        // this future for the connection's whole life, and the retry loop's
        // state is kilobytes; idle keep-alive connections should not pay it.
        let handle: Pin<Box<dyn Future<Output = _> + Send>> = Box::pin(async move {
            let _busy = busy;
            let resp = match r {
                Role::Inbound => inbound::serve(p, req, caller, peer).await,
                Role::Upstream(name) => outbound::serve(p, req, Some(name), peer).await,
                Role::HostRouted | Role::Transparent => outbound::serve(p, req, None, peer).await,
            };
            Ok::<_, std::convert::Infallible>(resp)
        });
        handle
    });
    let io = TokioIo::new(stream);
    let ended = if proto == Protocol::Http2 {
        let conn = http2::Builder::new(TokioExecutor::new())
            .timer(TokioTimer::new())
            .serve_connection(io, svc);
        // On the heap, so a task holds only the protocol it speaks.
        let mut conn = Box::pin(conn);
        let idle = match &activity {
            Some(a) => Either::Left(a.idle_for(
                proxy.h2_idle_timeout(),
                DEFAULT_HEADER_READ.min(proxy.h2_idle_timeout()),
            )),
            None => Either::Right(std::future::pending()),
        };
        until_shutdown(
            conn.as_mut(),
            |c| c.graceful_shutdown(),
            shutdown,
            idle,
            activity.clone(),
        )
        .await
    } else {
        // A listener for one service takes that service's header read
        // timeout (as of this connection); others the default.
        let header_read = match &role {
            Role::Upstream(name) => {
                proxy
                    .pinned_upstream(name)
                    .active()
                    .settings
                    .timeouts
                    .header_read
            }
            _ => DEFAULT_HEADER_READ,
        };
        let conn = http1::Builder::new()
            .timer(TokioTimer::new())
            .header_read_timeout(header_read)
            .serve_connection(io, svc)
            .with_upgrades();
        let mut conn = Box::pin(conn);
        until_shutdown(
            conn.as_mut(),
            |c| c.graceful_shutdown(),
            shutdown,
            std::future::pending(),
            None,
        )
        .await
    };
    if let Err(e) = ended {
        if e.is_timeout() {
            let upstream = match &role {
                Role::Upstream(name) => name.to_string(),
                _ => "-".to_string(),
            };
            proxy.metrics.timeout(&upstream, TimeoutKind::HeaderRead);
        }
        tracing::debug!(%peer, error = %e, "connection ended with an error");
    }
}

/// Drives a server connection to its end; once shutdown begins, asks it to
/// finish what is in flight and close.
async fn until_shutdown<F>(
    mut conn: Pin<&mut F>,
    graceful: fn(Pin<&mut F>),
    mut shutdown: watch::Receiver<bool>,
    idle: impl Future<Output = ()>,
    activity: Option<Arc<Activity>>,
) -> hyper::Result<()>
where
    F: Future<Output = hyper::Result<()>>,
{
    tokio::select! {
        r = conn.as_mut() => r,
        () = stopped(&mut shutdown) => {
            graceful(conn.as_mut());
            conn.await
        }
        () = idle => {
            if !activity.is_some_and(|a| a.asked()) {
                return Ok(());
            }
            graceful(conn.as_mut());
            tokio::time::timeout(CLOSE_GRACE, conn).await.unwrap_or(Ok(()))
        }
    }
}

/// Connects to the role's target for an opaque relay: the app inbound, an
/// endpoint of the service outbound (see [`crate::opaque::connect`]).
async fn connect_target(role: &Role, proxy: &Arc<Proxy>, peer: SocketAddr) -> Option<Server> {
    let target = match role {
        Role::Inbound => match proxy.app() {
            Some(app) => connect_direct(app, proxy)
                .await
                .map(|s| Server {
                    stream: Box::new(s),
                    slot: None,
                })
                .map_err(|e| format!("{app}: {e}")),
            None => Err("no app".to_string()),
        },
        Role::Upstream(name) => crate::opaque::connect(proxy, name).await,
        Role::HostRouted | Role::Transparent => Err("host routing needs HTTP".to_string()),
    };
    match target {
        Ok(t) => Some(t),
        Err(e) => {
            tracing::debug!(%peer, ?role, error = %e, "no target for an opaque connection; closing");
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The size of what a 6-argument async fn returns, without calling it.
    fn future_size<F, A, B, C, D, E, G, Fut>(_: F) -> usize
    where
        F: FnOnce(A, B, C, D, E, G) -> Fut,
    {
        std::mem::size_of::<Fut>()
    }

    /// The same for a 4-argument one.
    fn future_size4<F, A, B, C, D, Fut>(_: F) -> usize
    where
        F: FnOnce(A, B, C, D) -> Fut,
    {
        std::mem::size_of::<Fut>()
    }

    #[test]
    fn a_connection_task_stays_small() {
        // Every open connection holds one of these on the heap (and idle
        // keep-alive connections are most of a sidecar's memory under
        // many clients): a regression here costs RSS per connection.
        let size = future_size(connection);
        let tls = future_size4(inbound_tls);
        eprintln!("connection task: {size} bytes; mTLS inbound: {tls} bytes");
        assert!(size <= 1536, "connection task is {size} bytes");
        assert!(tls <= 2560, "mTLS inbound task is {tls} bytes");
    }
}
