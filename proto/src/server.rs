//! What every Wayfinder server binary sets up the same way: logs, the
//! Prometheus `/metrics` answer, and a bounded HTTP/1 server for the
//! admin and dashboard ports.

use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use prometheus_client::registry::Registry;

/// A layer a binary adds next to the logs (e.g. span export).
pub type ExtraLayer =
    Box<dyn tracing_subscriber::Layer<tracing_subscriber::Registry> + Send + Sync>;

/// How the servers write their logs (`--log-format`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// One readable line per event.
    Human,
    /// One JSON object per line.
    Json,
}

/// Logs to stderr, filtered by `WAYFINDER_LOG` (default `info`), human or
/// JSON; colours only on a terminal. `extra` layers keep their own filters,
/// so exported spans do not depend on the log level. A filter that does not
/// parse is an error naming the variable.
pub fn init_logs(format: LogFormat, extra: Vec<ExtraLayer>) -> Result<(), String> {
    use tracing_subscriber::prelude::*;
    let filter = match std::env::var("WAYFINDER_LOG") {
        Ok(v) => log_filter(&v).map_err(|e| format!("WAYFINDER_LOG={v:?}: {e}"))?,
        Err(_) => tracing_subscriber::filter::Targets::new().with_default(tracing::Level::INFO),
    };
    let fmt = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    let fmt: ExtraLayer = if format == LogFormat::Json {
        fmt.json().with_filter(filter).boxed()
    } else {
        fmt.with_filter(filter).boxed()
    };
    let mut layers = extra;
    layers.push(fmt);
    tracing_subscriber::registry().with(layers).init();
    Ok(())
}

/// `level` or `target=level` directives, comma-separated (`info`,
/// `wayfinder_proxy=debug,h2=warn`). Target filters only, not `EnvFilter`'s
/// span and field filters: those need a regex engine, a quarter of a
/// megabyte of code in every sidecar's memory (bench/README.md).
pub fn log_filter(
    directives: &str,
) -> Result<tracing_subscriber::filter::Targets, tracing_subscriber::filter::ParseError> {
    directives.parse()
}

/// `registry` in the OpenMetrics text format.
pub fn metrics_response(registry: &Registry) -> Response {
    let mut body = String::new();
    match prometheus_client::encoding::text::encode(&mut body, registry) {
        Ok(()) => (
            [(
                header::CONTENT_TYPE,
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
            )],
            body,
        )
            .into_response(),
        Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()).into_response(),
    }
}

/// Bounds of an HTTP port a hostile client might hold.
#[derive(Debug, Clone, Copy)]
pub struct HttpBounds {
    /// Connections served at once; more wait in the accept queue.
    pub max_connections: usize,
    /// Time for each request's headers; hyper's timer also runs while a
    /// keep-alive connection waits for its next request, so an idle or
    /// slowloris connection is closed after it.
    pub header_read: std::time::Duration,
}

/// Resolves once `stop` turns true (without holding the watch's lock);
/// never, if its sender is gone without saying so.
pub async fn stopped(stop: &mut tokio::sync::watch::Receiver<bool>) {
    if stop.wait_for(|s| *s).await.is_err() {
        std::future::pending::<()>().await;
    }
}

/// Serves `app` over HTTP/1 on `listener` within `bounds` until `stop`
/// turns true (then open connections finish what they have in flight).
/// Handlers can read the client's address as `ConnectInfo<SocketAddr>`.
pub async fn serve_http(
    listener: tokio::net::TcpListener,
    app: axum::Router,
    bounds: HttpBounds,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    let slots = std::sync::Arc::new(tokio::sync::Semaphore::new(bounds.max_connections));
    loop {
        let accepted = tokio::select! {
            () = stopped(&mut stop) => return,
            slot = slots.clone().acquire_owned() => match slot {
                Ok(slot) => tokio::select! {
                    () = stopped(&mut stop) => return,
                    a = listener.accept() => a.map(|a| (a, slot)),
                },
                Err(_) => return,
            },
        };
        let ((stream, peer), slot) = match accepted {
            Ok(a) => a,
            Err(e) => {
                // Out of file descriptors and the like: back off, keep serving.
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                continue;
            }
        };
        let (app, mut stop) = (app.clone(), stop.clone());
        tokio::spawn(async move {
            let _slot = slot;
            let svc = hyper::service::service_fn(
                move |mut req: hyper::Request<hyper::body::Incoming>| {
                    req.extensions_mut()
                        .insert(axum::extract::ConnectInfo(peer));
                    let mut app = app.clone();
                    async move { tower_service::Service::call(&mut app, req).await }
                },
            );
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(bounds.header_read)
                .serve_connection(hyper_util::rt::TokioIo::new(stream), svc);
            let mut conn = std::pin::pin!(conn);
            let ended = tokio::select! {
                r = conn.as_mut() => r,
                () = stopped(&mut stop) => {
                    conn.as_mut().graceful_shutdown();
                    conn.await
                }
            };
            if let Err(e) = ended {
                tracing::debug!(%peer, error = %e, "HTTP connection ended");
            }
        });
    }
}

/// Requests in flight on one HTTP/2 connection, and when the last one
/// ended: the connection is asked to close (GOAWAY; streams still open
/// finish) once idle for the idle timeout, or when it has not started a
/// request within the first-request timeout (a client that connects and
/// never asks).
#[derive(Debug)]
pub struct Activity {
    born: tokio::time::Instant,
    in_flight: std::sync::atomic::AtomicUsize,
    /// When the last request ended, in milliseconds after `born`;
    /// [`Activity::NONE_YET`] until one has.
    last_ms: std::sync::atomic::AtomicU64,
}

/// A request in flight; dropping it ends the request.
#[derive(Debug)]
pub struct Busy(std::sync::Arc<Activity>);

impl Drop for Busy {
    fn drop(&mut self) {
        use std::sync::atomic::Ordering;
        let ms = u64::try_from(self.0.born.elapsed().as_millis())
            .unwrap_or(u64::MAX - 1)
            .min(u64::MAX - 1);
        self.0.last_ms.store(ms, Ordering::Relaxed);
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Default for Activity {
    fn default() -> Self {
        Self::new()
    }
}

impl Activity {
    const NONE_YET: u64 = u64::MAX;

    /// A connection accepted now.
    pub fn new() -> Self {
        Self {
            born: tokio::time::Instant::now(),
            in_flight: std::sync::atomic::AtomicUsize::new(0),
            last_ms: std::sync::atomic::AtomicU64::new(Self::NONE_YET),
        }
    }

    /// Whether the connection ever started a request. One that never did
    /// is dropped when found idle, not sent GOAWAY: hyper's graceful close
    /// waits for a handshake such a client may never finish.
    pub fn asked(&self) -> bool {
        use std::sync::atomic::Ordering;
        self.last_ms.load(Ordering::Relaxed) != Self::NONE_YET
            || self.in_flight.load(Ordering::Relaxed) > 0
    }

    /// Marks a request started; it ends when the guard is dropped.
    pub fn start(self: &std::sync::Arc<Self>) -> Busy {
        self.in_flight
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Busy(self.clone())
    }

    /// Resolves once no request has been in flight for `idle`, or, when
    /// none has started yet, `first` after the connection was accepted.
    pub async fn idle_for(&self, idle: std::time::Duration, first: std::time::Duration) {
        use std::sync::atomic::Ordering;
        loop {
            let last = self.last_ms.load(Ordering::Relaxed);
            let (since, limit) = if last == Self::NONE_YET {
                (self.born, first)
            } else {
                (self.born + std::time::Duration::from_millis(last), idle)
            };
            let wait = if self.in_flight.load(Ordering::Relaxed) > 0 {
                idle
            } else {
                match (since + limit).checked_duration_since(tokio::time::Instant::now()) {
                    None => return,
                    Some(left) if left.is_zero() => return,
                    Some(left) => left,
                }
            };
            tokio::time::sleep(wait).await;
        }
    }
}

/// How long a connection sent GOAWAY for being idle may take to finish a
/// request that crossed the GOAWAY, before it is dropped.
pub const CLOSE_GRACE: std::time::Duration = std::time::Duration::from_secs(10);

/// A response body that keeps its request counted in flight until it
/// ends: a server-streaming call (a watch) is busy for as long as it
/// streams, not only until its headers.
#[derive(Debug)]
pub struct Tracked<B> {
    body: B,
    _busy: Busy,
}

impl<B> Tracked<B> {
    /// `body`, counted in flight until dropped.
    pub fn new(body: B, busy: Busy) -> Self {
        Self { body, _busy: busy }
    }
}

impl<B: hyper::body::Body + Unpin> hyper::body::Body for Tracked<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<Self::Data>, Self::Error>>> {
        std::pin::Pin::new(&mut self.body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.body.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::{Activity, log_filter};
    use std::sync::Arc;
    use std::time::Duration;
    use tracing::Level;

    #[tokio::test(start_paused = true)]
    async fn a_connection_is_idle_after_its_last_request_or_silent_after_the_first_limit() {
        let (idle, first) = (Duration::from_secs(60), Duration::from_secs(10));
        let start = tokio::time::Instant::now();
        // Never asks: closed at the first-request limit.
        Activity::new().idle_for(idle, first).await;
        assert_eq!(start.elapsed(), first);

        let a = Arc::new(Activity::new());
        let busy = a.start();
        let ends = {
            let a = a.clone();
            tokio::spawn(async move {
                a.idle_for(idle, first).await;
                tokio::time::Instant::now()
            })
        };
        // A request in flight for 100 s (a stream) keeps it open...
        tokio::time::sleep(Duration::from_secs(100)).await;
        let ended_at = tokio::time::Instant::now();
        drop(busy);
        // ...and it closes `idle` after the request ended.
        let closed = ends.await.expect("task");
        assert!(closed >= ended_at + idle, "{:?}", closed - start);
        assert!(closed <= ended_at + idle + idle, "{:?}", closed - start);
    }

    #[test]
    fn log_filters_parse_levels_and_targets() {
        let f = log_filter("warn,wayfinder_proxy=debug").expect("parses");
        assert!(f.would_enable("wayfinder_proxy::listener", &Level::DEBUG));
        assert!(!f.would_enable("h2::codec", &Level::INFO));
        assert!(f.would_enable("h2::codec", &Level::WARN));
        let info = log_filter("info").expect("parses");
        assert!(info.would_enable("anything", &Level::INFO));
        assert!(!info.would_enable("anything", &Level::DEBUG));
        assert!(log_filter("wayfinder_proxy=loud").is_err());
    }
}
