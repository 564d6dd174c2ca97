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
async fn stopped(stop: &mut tokio::sync::watch::Receiver<bool>) {
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

#[cfg(test)]
mod tests {
    use super::log_filter;
    use tracing::Level;

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
