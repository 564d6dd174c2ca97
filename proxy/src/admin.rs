//! The sidecar's admin server (localhost by default): `/live`, `/ready`,
//! `/metrics`, `/config`, `/endpoints`.

use std::sync::Arc;

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use prometheus_client::registry::Registry;

use crate::http_proxy::Proxy;

/// What the admin handlers share.
#[derive(Clone)]
pub struct AdminState {
    /// The data path.
    pub proxy: Arc<Proxy>,
    /// Metrics registry.
    pub metrics: Arc<Registry>,
    /// Effective configuration, as JSON.
    pub config: Arc<serde_json::Value>,
}

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
        .with_state(state)
}

/// Ready once every upstream has had its first discovery answer.
async fn ready(State(s): State<AdminState>) -> Response {
    let pending: Vec<String> = s
        .proxy
        .upstreams
        .all()
        .iter()
        .filter(|u| !u.is_ready())
        .map(|u| u.name().to_string())
        .collect();
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
                    "policy": u.active().policy,
                    "endpoints": u.view(),
                }),
            )
        })
        .collect();
    Json(serde_json::Value::Object(map))
}
