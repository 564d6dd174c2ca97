//! Serving the gRPC port's connections ourselves, with hyper's HTTP/2
//! server, rather than tonic's: each connection gets bounds tonic's server
//! has no setting for. A connection that starts no request within the
//! first-request timeout (connected, then silent), or has had none in
//! flight for the idle timeout, is sent GOAWAY; a watch counts as in
//! flight for as long as it streams, so sidecars are never idle. Keepalive
//! pings close peers that stopped answering; a stream cap bounds what one
//! connection opens.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use hyper::server::conn::http2;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use prometheus_client::metrics::{counter::Counter, gauge::Gauge};
use prometheus_client::registry::Registry;
use tokio::sync::watch;
use tonic::service::Routes;
use wayfinder_proto::server::{Activity, CLOSE_GRACE, Tracked, stopped};

use super::transport::Conn;

/// What bounds each gRPC connection.
#[derive(Debug, Clone, Copy)]
pub struct GrpcBounds {
    /// Streams one connection may have open at once.
    pub max_streams: u32,
    /// How long a connection may go without a request in flight.
    pub idle: Duration,
    /// How long a new connection may take to start its first request.
    pub first_request: Duration,
}

/// Keepalive: a ping after this long without frames...
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(10);
/// ...which must be answered within this.
const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(5);

/// The gRPC port's connection metrics.
#[derive(Clone, Default)]
pub struct ConnMetrics {
    /// Connections open.
    pub open: Gauge,
    /// Times the port held `--max-grpc-connections` and stopped accepting.
    pub full: Counter,
    /// Connections sent GOAWAY for being idle or silent.
    pub idle_closed: Counter,
}

impl ConnMetrics {
    /// Creates the metrics and registers them.
    pub fn register(reg: &mut Registry) -> Self {
        let m = Self::default();
        reg.register(
            "wayfinder_control_grpc_connections",
            "Open gRPC connections",
            m.open.clone(),
        );
        reg.register(
            "wayfinder_control_grpc_listener_full",
            "Times the gRPC port held --max-grpc-connections and stopped accepting until one closed",
            m.full.clone(),
        );
        reg.register(
            "wayfinder_control_grpc_idle_closed",
            "gRPC connections sent GOAWAY: no request within --grpc-header-timeout, or none in flight for --grpc-idle-timeout",
            m.idle_closed.clone(),
        );
        m
    }
}

/// Serves `routes` on the connections `incoming` yields until `stop`
/// turns true; then asks every connection to close (GOAWAY: calls in
/// flight finish) and returns once they have, so the caller bounds the wait.
pub async fn serve(
    routes: Routes,
    mut incoming: tokio::sync::mpsc::Receiver<Conn>,
    bounds: GrpcBounds,
    metrics: ConnMetrics,
    mut stop: watch::Receiver<bool>,
) {
    let routes = routes.prepare();
    let mut conns = tokio::task::JoinSet::new();
    loop {
        let conn = tokio::select! {
            () = stopped(&mut stop) => break,
            c = incoming.recv() => match c {
                Some(c) => c,
                None => break,
            },
        };
        while conns.try_join_next().is_some() {}
        conns.spawn(connection(
            conn,
            routes.clone(),
            bounds,
            metrics.clone(),
            stop.clone(),
        ));
    }
    while conns.join_next().await.is_some() {}
}

/// One connection, from its first frame to its end.
async fn connection(
    conn: Conn,
    routes: Routes,
    bounds: GrpcBounds,
    metrics: ConnMetrics,
    mut stop: watch::Receiver<bool>,
) {
    metrics.open.inc();
    let peer = conn.peer.clone();
    let activity = Arc::new(Activity::new());
    let a = activity.clone();
    let svc = hyper::service::service_fn(move |mut req: hyper::Request<hyper::body::Incoming>| {
        // The caller, as the handshake established it, for `auth::caller`.
        req.extensions_mut().insert(peer.clone());
        let busy = a.start();
        let mut routes = routes.clone();
        async move {
            let resp = tower_service::Service::call(&mut routes, req).await?;
            Ok::<_, Infallible>(resp.map(|body| Tracked::new(body, busy)))
        }
    });
    let addr = conn.peer.addr;
    let served = http2::Builder::new(TokioExecutor::new())
        .timer(TokioTimer::new())
        .keep_alive_interval(KEEPALIVE_INTERVAL)
        .keep_alive_timeout(KEEPALIVE_TIMEOUT)
        .max_concurrent_streams(bounds.max_streams)
        .serve_connection(TokioIo::new(conn), svc);
    let mut served = std::pin::pin!(served);
    let ended = tokio::select! {
        r = served.as_mut() => r,
        () = activity.idle_for(bounds.idle, bounds.first_request) => {
            metrics.idle_closed.inc();
            if activity.asked() {
                served.as_mut().graceful_shutdown();
                tokio::time::timeout(CLOSE_GRACE, served).await.unwrap_or(Ok(()))
            } else {
                Ok(())
            }
        }
        () = stopped(&mut stop) => {
            served.as_mut().graceful_shutdown();
            served.await
        }
    };
    if let Err(e) = ended {
        tracing::debug!(peer = ?addr, error = %e, "gRPC connection ended");
    }
    metrics.open.dec();
}
