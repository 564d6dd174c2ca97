//! The sidecar's admin server (localhost by default): `/live`, `/ready`,
//! `/metrics`, `/config`, `/endpoints`, and `POST /shutdown` (from loopback
//! only: a job's last step, or an orchestrator ending the sidecar).

use std::sync::Arc;

use axum::extract::{ConnectInfo, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use prometheus_client::registry::Registry;

use crate::state::Proxy;

/// What the admin handlers share.
#[derive(Clone)]
pub struct AdminState {
    /// The data path.
    pub proxy: Arc<Proxy>,
    /// Metrics registry.
    pub metrics: Arc<Registry>,
    /// Effective configuration, as JSON.
    pub config: Arc<serde_json::Value>,
    /// Ends the sidecar as SIGTERM does (deregister, drain, exit).
    pub shutdown: Arc<tokio::sync::Notify>,
}

/// Admin connections served at once; more wait in the accept queue.
pub const MAX_CONNECTIONS: usize = 64;

/// The admin router.
pub fn router(state: AdminState) -> Router {
    Router::new()
        .route("/live", get(|| async { "live\n" }))
        .route("/ready", get(ready))
        .route("/metrics", get(metrics))
        .route(
            "/config",
            get(|State(s): State<AdminState>| async move { Json((*s.config).clone()) }),
        )
        .route("/endpoints", get(endpoints))
        .route("/shutdown", post(shutdown))
        .with_state(state)
}

/// Ends the sidecar, when asked from this host: the admin port may be bound
/// wider, and ending the mesh for an app is not a remote caller's to do.
async fn shutdown(
    State(s): State<AdminState>,
    ConnectInfo(peer): ConnectInfo<std::net::SocketAddr>,
) -> Response {
    if !peer.ip().is_loopback() {
        tracing::warn!(%peer, "POST /shutdown refused: not from loopback");
        return (StatusCode::FORBIDDEN, "shutdown is for this host only\n").into_response();
    }
    tracing::info!(%peer, "shutdown requested on the admin port");
    // Kept if nobody waits yet: the request is not lost.
    s.shutdown.notify_one();
    "shutting down\n".into_response()
}

/// What the sidecar still waits for before it is ready (nothing: ready).
pub fn pending(proxy: &Proxy) -> Vec<String> {
    let mut pending: Vec<String> = proxy
        .upstreams
        .all()
        .iter()
        .filter(|u| !u.is_ready())
        .map(|u| u.name().to_string())
        .collect();
    if proxy.catalog.is_pending() {
        pending.push("the catalog".into());
    }
    pending
}

/// Ready once every upstream has had its first discovery answer and, when
/// the sidecar routes by Host or original destination, the catalog has
/// come: before it, an app's first call would pass through unmeshed.
/// (The certificate and the listeners come before the admin port opens.)
async fn ready(State(s): State<AdminState>) -> Response {
    let pending = pending(&s.proxy);
    if pending.is_empty() {
        "ready\n".into_response()
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("waiting for discovery of: {}\n", pending.join(", ")),
        )
            .into_response()
    }
}

async fn metrics(State(s): State<AdminState>) -> Response {
    wayfinder_proto::server::metrics_response(&s.metrics)
}

/// A service's policy as the policy file names things (`"balancer":
/// "peak-ewma"`), not as the wire numbers them; the wire form if it does
/// not convert (the control plane validated it, so it should).
fn policy_view(p: &wayfinder_proto::v1::ServicePolicy) -> serde_json::Value {
    match wayfinder_proto::policy::ServicePolicy::from_proto(p) {
        Ok((_, policy)) => serde_json::json!(policy),
        Err(_) => serde_json::json!(p),
    }
}

/// Each route's backends with their weights and the endpoints each subset
/// holds now (the eligible ones).
fn routes_view(t: &crate::routes::RouteTable) -> serde_json::Value {
    t.routes()
        .iter()
        .map(|r| {
            serde_json::json!({
                "name": &*r.name,
                "backends": r.backends.iter().map(|b| serde_json::json!({
                    "backend": &*b.label,
                    "weight": b.weight,
                    "endpoints": match &b.target {
                        crate::routes::Target::Subset(s) => s.endpoints().iter().map(|e| e.id.to_string()).collect::<Vec<_>>(),
                        crate::routes::Target::Service(_) => Vec::new(),
                    },
                })).collect::<Vec<_>>(),
            })
        })
        .collect()
}

async fn endpoints(State(s): State<AdminState>) -> Json<serde_json::Value> {
    let map: serde_json::Map<String, serde_json::Value> = s
        .proxy
        .upstreams
        .all()
        .iter()
        .map(|u| {
            (
                u.name().to_string(),
                serde_json::json!({
                    "discovery": u.origin(),
                    "ready": u.is_ready(),
                    "policy": u.active().policy.as_ref().map(policy_view),
                    "routes": routes_view(&u.active().routes),
                    "endpoints": u.view(),
                }),
            )
        })
        .collect();
    Json(serde_json::Value::Object(map))
}
