//! `lab-app`: the lab's test service. `GET /` answers which instance served
//! the request; fault controls make it slow, fail a share of requests, or
//! report unhealthy, so labs can show what the mesh does about it.
//!
//! ```text
//! GET  /                 {"instance":"web-1","path":"/","method":"GET","count":1,"bytes":0}
//! GET  /healthz          200 "ok", or 503 when made unhealthy
//! GET  /fault            the faults in force and how many requests were served
//! POST /fault?fail=0.3&delay_ms=200&healthy=false   change the faults (any subset)
//! POST /fault/reset      back to normal
//! ```
//! Any other path answers like `/`, so it can stand in for any API.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::time::Duration;

use axum::extract::{Query, State};
use axum::http::{Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use clap::Parser;
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
}

#[derive(Default)]
struct Faults {
    /// Share of requests answered 503, in millionths.
    fail_ppm: AtomicU32,
    delay_ms: AtomicU64,
    unhealthy: AtomicBool,
}

struct App {
    name: String,
    count: AtomicU64,
    faults: Faults,
}

#[derive(Deserialize)]
struct FaultQuery {
    fail: Option<f64>,
    delay_ms: Option<u64>,
    healthy: Option<bool>,
}

async fn hello(
    State(app): State<Arc<App>>,
    method: Method,
    uri: Uri,
    body: axum::body::Bytes,
) -> Response {
    let n = app.count.fetch_add(1, Ordering::Relaxed) + 1;
    let delay = app.faults.delay_ms.load(Ordering::Relaxed);
    if delay > 0 {
        tokio::time::sleep(Duration::from_millis(delay)).await;
    }
    let fail = app.faults.fail_ppm.load(Ordering::Relaxed);
    let body = serde_json::json!({
        "instance": app.name, "path": uri.path(), "method": method.as_str(), "count": n,
        "bytes": body.len(),
    });
    if fail > 0 && rand::random_range(0..1_000_000) < fail {
        return (StatusCode::SERVICE_UNAVAILABLE, Json(body)).into_response();
    }
    Json(body).into_response()
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
    if let Some(d) = q.delay_ms {
        app.faults.delay_ms.store(d.min(600_000), Ordering::Relaxed);
    }
    if let Some(h) = q.healthy {
        app.faults.unhealthy.store(!h, Ordering::Relaxed);
    }
    faults(&app).into_response()
}

async fn reset(State(app): State<Arc<App>>) -> Response {
    app.faults.fail_ppm.store(0, Ordering::Relaxed);
    app.faults.delay_ms.store(0, Ordering::Relaxed);
    app.faults.unhealthy.store(false, Ordering::Relaxed);
    faults(&app).into_response()
}

fn faults(app: &App) -> Json<serde_json::Value> {
    Json(serde_json::json!({
        "instance": app.name,
        "fail": f64::from(app.faults.fail_ppm.load(Ordering::Relaxed)) / 1e6,
        "delay_ms": app.faults.delay_ms.load(Ordering::Relaxed),
        "healthy": !app.faults.unhealthy.load(Ordering::Relaxed),
        "served": app.count.load(Ordering::Relaxed),
    }))
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let app = Arc::new(App {
        name: args.name,
        count: AtomicU64::new(0),
        faults: Faults::default(),
    });
    let router = Router::new()
        .route("/healthz", get(healthz))
        .route(
            "/fault",
            get(|State(app): State<Arc<App>>| async move { faults(&app) }).post(fault),
        )
        .route("/fault/reset", post(reset))
        .fallback(hello)
        .with_state(app);
    let listener = tokio::net::TcpListener::bind(args.listen).await?;
    eprintln!("lab-app listening on {}", listener.local_addr()?);
    axum::serve(listener, router)
        .with_graceful_shutdown(async {
            let _ = tokio::signal::ctrl_c().await;
        })
        .await?;
    Ok(())
}
