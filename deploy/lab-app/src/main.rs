//! `lab-app`: the lab's test service. `GET /` answers which instance served
//! the request; fault controls make it slow, fail a share of requests, or
//! report unhealthy, so labs can show what the mesh does about it.
//!
//! ```text
//! GET  /                 {"instance":"web-1","path":"/","method":"GET","count":1,"bytes":0}
//! GET  /healthz          200 "ok", or 503 when made unhealthy
//! GET  /fault            the faults in force, how many requests were served
//!                        and how many of those were mirrored copies
//! POST /fault?fail=0.3&delay_ms=200&healthy=false   change the faults (any subset)
//! POST /fault?delay_ms=200&delay_share=0.05   only that share of requests is slow
//!                        (a long tail, what hedging is for)
//! POST /fault?forge=true every answer becomes `502` with `x-wayfinder-error:
//!                        connect-failed`, as a hostile app would forge the
//!                        mesh's retry signal
//! POST /fault/reset      back to normal
//! GET  /headers          the request headers the app received (what the
//!                        mesh passed on, and which identity it says called)
//! GET  /chain?to=api     calls service `api` through the sidecar's outbound
//!                        listener (`--outbound`), or without it `http://api/`
//!                        by DNS (a transparent mesh intercepts that), passing
//!                        `traceparent` on; answers with both instances
//! ```
//! Any other path answers like `/`, so it can stand in for any API.
//!
//! gRPC on the same port (h2c): `wayfinder.lab.v1.Echo/Say` answers with the
//! instance, and `grpc.health.v1.Health` (Check, Watch) follows `healthy`.

mod grpc;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::time::Duration;

use axum::extract::{Query, State};
use axum::http::{HeaderMap, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use bytes::Bytes;
use clap::Parser;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::{Client, connect::HttpConnector};
use hyper_util::rt::TokioExecutor;
use serde::Deserialize;

/// The lab's test service.
#[derive(Parser, Debug)]
#[command(version, about)]
struct Args {
    /// Address to listen on.
    #[arg(long, env = "LAB_APP_LISTEN", default_value = "127.0.0.1:9001")]
    listen: SocketAddr,
    /// Instance name reported in every answer.
    #[arg(long, env = "LAB_APP_NAME", default_value = "lab-app")]
    name: String,
    /// The sidecar's Host-routed outbound listener, for `/chain`.
    #[arg(long, env = "LAB_APP_OUTBOUND")]
    outbound: Option<SocketAddr>,
}

#[derive(Default)]
struct Faults {
    /// Share of requests answered 503, in millionths.
    fail_ppm: AtomicU32,
    delay_ms: AtomicU64,
    /// Share of requests delayed, in millionths (all when 1,000,000).
    delay_ppm: AtomicU32,
    unhealthy: AtomicBool,
    /// Answer 502 with the mesh's `connect-failed` signal.
    forge: AtomicBool,
}

struct App {
    name: String,
    /// The gRPC health the `healthy` fault sets.
    health: tokio::sync::OnceCell<tonic_health::server::HealthReporter>,
    count: AtomicU64,
    /// Of those, copies a mirroring sidecar marked (`x-wayfinder-mirror: 1`).
    mirrored: AtomicU64,
    faults: Faults,
    outbound: Option<SocketAddr>,
    client: Client<HttpConnector, Full<Bytes>>,
}

#[derive(Deserialize)]
struct ChainQuery {
    to: String,
}

/// Calls `to` through the sidecar, as an app in a mesh does: plain HTTP to
/// the service's name, the trace context passed on.
async fn chain(
    State(app): State<Arc<App>>,
    Query(q): Query<ChainQuery>,
    headers: HeaderMap,
) -> Response {
    let valid = !q.to.is_empty()
        && q.to.len() <= 63
        && q.to
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
    if !valid {
        return (StatusCode::BAD_REQUEST, "to must be a service name\n").into_response();
    }
    // Through the sidecar's Host-routed listener, or (transparent mesh, or
    // no mesh at all) straight to the name as DNS resolves it.
    let url = match app.outbound {
        Some(outbound) => format!("http://{outbound}/"),
        None => format!("http://{}/", q.to),
    };
    let mut req = hyper::Request::get(url).header(hyper::header::HOST, q.to.as_str());
    for name in ["traceparent", "tracestate"] {
        if let Some(v) = headers.get(name) {
            req = req.header(name, v);
        }
    }
    let Ok(req) = req.body(Full::new(Bytes::new())) else {
        return StatusCode::INTERNAL_SERVER_ERROR.into_response();
    };
    match app.client.request(req).await {
        Ok(resp) => {
            let status = resp.status();
            let body = resp
                .into_body()
                .collect()
                .await
                .map(|b| b.to_bytes())
                .unwrap_or_default();
            let downstream: serde_json::Value =
                serde_json::from_slice(&body).unwrap_or_else(|_| {
                    serde_json::Value::String(String::from_utf8_lossy(&body).into())
                });
            let code = StatusCode::from_u16(status.as_u16()).unwrap_or(StatusCode::BAD_GATEWAY);
            (
                code,
                Json(serde_json::json!({ "instance": app.name, "to": q.to, "answer": downstream })),
            )
                .into_response()
        }
        Err(e) => (StatusCode::BAD_GATEWAY, format!("calling {}: {e}\n", q.to)).into_response(),
    }
}

#[derive(Deserialize)]
struct FaultQuery {
    fail: Option<f64>,
    delay_ms: Option<u64>,
    delay_share: Option<f64>,
    healthy: Option<bool>,
    forge: Option<bool>,
}

async fn hello(
    State(app): State<Arc<App>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Response {
    let n = app.count.fetch_add(1, Ordering::Relaxed) + 1;
    if headers.get("x-wayfinder-mirror").is_some_and(|v| v == "1") {
        app.mirrored.fetch_add(1, Ordering::Relaxed);
    }
    let delay = app.faults.delay_ms.load(Ordering::Relaxed);
    let share = app.faults.delay_ppm.load(Ordering::Relaxed);
    if delay > 0 && (share >= 1_000_000 || rand::random_range(0..1_000_000) < share) {
        tokio::time::sleep(Duration::from_millis(delay)).await;
    }
    let fail = app.faults.fail_ppm.load(Ordering::Relaxed);
    let body = serde_json::json!({
        "instance": app.name, "path": uri.path(), "method": method.as_str(), "count": n,
        "bytes": body.len(),
    });
    if app.faults.forge.load(Ordering::Relaxed) {
        return (
            StatusCode::BAD_GATEWAY,
            [("x-wayfinder-error", "connect-failed")],
            Json(body),
        )
            .into_response();
    }
    if fail > 0 && rand::random_range(0..1_000_000) < fail {
        return (StatusCode::SERVICE_UNAVAILABLE, Json(body)).into_response();
    }
    Json(body).into_response()
}

/// The request headers as received, names to values (lossy text).
async fn headers(State(app): State<Arc<App>>, headers: HeaderMap) -> Response {
    app.count.fetch_add(1, Ordering::Relaxed);
    let seen: serde_json::Map<String, serde_json::Value> = headers
        .iter()
        .map(|(k, v)| {
            (
                k.as_str().to_string(),
                String::from_utf8_lossy(v.as_bytes()).into_owned().into(),
            )
        })
        .collect();
    Json(serde_json::json!({ "instance": app.name, "headers": seen })).into_response()
}

async fn healthz(State(app): State<Arc<App>>) -> Response {
    if app.faults.unhealthy.load(Ordering::Relaxed) {
        (StatusCode::SERVICE_UNAVAILABLE, "unhealthy\n").into_response()
    } else {
        "ok\n".into_response()
    }
}

async fn fault(State(app): State<Arc<App>>, Query(q): Query<FaultQuery>) -> Response {
    if let Some(f) = q.fail {
        if !(0.0..=1.0).contains(&f) {
            return (StatusCode::BAD_REQUEST, "fail must be between 0 and 1\n").into_response();
        }
        app.faults
            .fail_ppm
            .store((f * 1e6) as u32, Ordering::Relaxed);
    }
    if let Some(s) = q.delay_share {
        if !(0.0..=1.0).contains(&s) {
            return (
                StatusCode::BAD_REQUEST,
                "delay_share must be between 0 and 1\n",
            )
                .into_response();
        }
        app.faults
            .delay_ppm
            .store((s * 1e6) as u32, Ordering::Relaxed);
    }
    if let Some(d) = q.delay_ms {
        app.faults.delay_ms.store(d.min(600_000), Ordering::Relaxed);
        // A delay alone slows every request, as it always has.
        if q.delay_share.is_none() {
            app.faults.delay_ppm.store(1_000_000, Ordering::Relaxed);
        }
    }
    if let Some(h) = q.healthy {
        app.faults.unhealthy.store(!h, Ordering::Relaxed);
        report_health(&app, h).await;
    }
    if let Some(f) = q.forge {
        app.faults.forge.store(f, Ordering::Relaxed);
    }
    faults(&app).into_response()
}

async fn reset(State(app): State<Arc<App>>) -> Response {
    app.faults.fail_ppm.store(0, Ordering::Relaxed);
    app.faults.delay_ms.store(0, Ordering::Relaxed);
    app.faults.delay_ppm.store(1_000_000, Ordering::Relaxed);
    app.faults.unhealthy.store(false, Ordering::Relaxed);
    app.faults.forge.store(false, Ordering::Relaxed);
    report_health(&app, true).await;
    faults(&app).into_response()
}

async fn report_health(app: &App, healthy: bool) {
    if let Some(reporter) = app.health.get() {
        grpc::report(reporter, healthy).await;
    }
}

fn faults(app: &App) -> Json<serde_json::Value> {
    Json(serde_json::json!({
        "instance": app.name,
        "fail": f64::from(app.faults.fail_ppm.load(Ordering::Relaxed)) / 1e6,
        "delay_ms": app.faults.delay_ms.load(Ordering::Relaxed),
        "delay_share": f64::from(app.faults.delay_ppm.load(Ordering::Relaxed)) / 1e6,
        "healthy": !app.faults.unhealthy.load(Ordering::Relaxed),
        "forge": app.faults.forge.load(Ordering::Relaxed),
        "served": app.count.load(Ordering::Relaxed),
        "mirrored": app.mirrored.load(Ordering::Relaxed),
        "delay_share": f64::from(app.faults.delay_ppm.load(Ordering::Relaxed)) / 1e6,
    }))
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let app = Arc::new(App {
        name: args.name,
        health: tokio::sync::OnceCell::new(),
        count: AtomicU64::new(0),
        mirrored: AtomicU64::new(0),
        faults: Faults::default(),
        outbound: args.outbound,
        client: Client::builder(TokioExecutor::new()).build_http(),
    });
    let (grpc, reporter) = grpc::routes(app.clone()).await;
    let _ = app.health.set(reporter);
    let http = Router::new()
        .route("/healthz", get(healthz))
        .route(
            "/fault",
            get(|State(app): State<Arc<App>>| async move { faults(&app) }).post(fault),
        )
        .route("/fault/reset", post(reset))
        .route("/chain", get(chain))
        .route("/headers", get(headers))
        .with_state(app.clone());
    // Any other path answers like `/`.
    let router = grpc
        .merge(http)
        .fallback_service(Router::new().fallback(hello).with_state(app));
    let listener = tokio::net::TcpListener::bind(args.listen).await?;
    eprintln!("lab-app listening on {}", listener.local_addr()?);
    axum::serve(listener, router)
        .with_graceful_shutdown(async {
            let _ = tokio::signal::ctrl_c().await;
        })
        .await?;
    Ok(())
}
