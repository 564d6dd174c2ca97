//! wf-control's HTTP side (axum): health, Prometheus metrics, JSON views.

use std::sync::Arc;

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use prometheus_client::registry::Registry as PromRegistry;
use serde::Serialize;
use wayfinder_proto::v1::{Health, ServicePolicy};
use wayfinder_proto::view::EndpointView;

use crate::registry::Registry;

pub mod dashboard;

/// What the HTTP handlers share.
#[derive(Clone)]
pub struct HttpState {
    /// The registry.
    pub registry: Arc<Registry>,
    /// The store backend (readiness).
    pub backend: Arc<dyn crate::store::Backend>,
    /// Every metric of the process.
    pub metrics: Arc<PromRegistry>,
    /// Traffic reported by sidecars (the dashboard's edges).
    pub traffic: Arc<crate::traffic::Traffic>,
}

/// The router: `/healthz`, `/readyz` (503 while a replica is cut off from
/// etcd), `/metrics`, `/v1/services`, `/v1/services/{name}`, `/v1/traffic`,
/// and the dashboard (`/`, `/v1/dashboard`, `/v1/dashboard/events`).
pub fn router(state: HttpState) -> Router {
    Router::new()
        .merge(dashboard::router())
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(ready))
        .route("/metrics", get(metrics))
        .route("/v1/services", get(services))
        .route("/v1/services/{name}", get(service))
        .route("/v1/traffic", get(traffic))
        .with_state(state)
}

async fn ready(State(s): State<HttpState>) -> Response {
    if s.backend.ready() {
        (StatusCode::OK, "ready\n").into_response()
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            "not ready: the store is unreachable; serving the last known state\n",
        )
            .into_response()
    }
}

async fn metrics(State(s): State<HttpState>) -> Response {
    wayfinder_proto::server::metrics_response(&s.metrics)
}

/// One endpoint as JSON: the shared view and the instance's labels.
#[derive(Serialize)]
pub struct EndpointJson {
    #[serde(flatten)]
    view: EndpointView,
    labels: std::collections::BTreeMap<String, String>,
}

impl From<&wayfinder_proto::v1::Endpoint> for EndpointJson {
    fn from(e: &wayfinder_proto::v1::Endpoint) -> Self {
        Self {
            view: EndpointView::from(e),
            labels: e
                .instance
                .as_ref()
                .map(|i| i.labels.clone().into_iter().collect())
                .unwrap_or_default(),
        }
    }
}

/// One service as JSON.
#[derive(Serialize)]
pub struct ServiceView {
    name: String,
    version: u64,
    instances: u32,
    serving: u32,
    endpoints: Vec<EndpointJson>,
    policy: Option<ServicePolicy>,
}

/// The view of service `name`, if it exists.
pub fn view(registry: &Registry, name: &str) -> Option<ServiceView> {
    let (version, endpoints) = registry.endpoints(name)?;
    Some(ServiceView {
        name: name.to_string(),
        version,
        instances: endpoints.len() as u32,
        serving: endpoints
            .iter()
            .filter(|e| e.health == Health::Serving as i32)
            .count() as u32,
        endpoints: endpoints.iter().map(EndpointJson::from).collect(),
        policy: registry.policy(name),
    })
}

async fn services(State(s): State<HttpState>) -> Json<serde_json::Value> {
    let all: Vec<_> = s
        .registry
        .services()
        .into_iter()
        .filter_map(|sum| view(&s.registry, &sum.name))
        .collect();
    Json(serde_json::json!({ "services": all }))
}

/// `?window=5s`: how far back `/v1/traffic` adds up backends.
#[derive(serde::Deserialize)]
struct TrafficQuery {
    window: Option<String>,
}

/// `/v1/traffic[?window=DUR]`: the edges of the last window (as the
/// dashboard shows them) and each callee's backends over the last `window`
/// (default and at most the traffic window), for `wfctl split`.
async fn traffic(
    State(s): State<HttpState>,
    axum::extract::Query(q): axum::extract::Query<TrafficQuery>,
) -> Response {
    let window = match q
        .window
        .as_deref()
        .map(wayfinder_proto::policy::parse_duration)
    {
        None => crate::traffic::WINDOW,
        Some(Ok(d)) => d,
        Some(Err(e)) => return (StatusCode::BAD_REQUEST, format!("window: {e}\n")).into_response(),
    };
    Json(serde_json::json!({
        "window_secs": window.min(crate::traffic::WINDOW).as_secs_f64(),
        "edges": s.traffic.edges(),
        "backends": s.traffic.backends(window),
    }))
    .into_response()
}

async fn service(State(s): State<HttpState>, Path(name): Path<String>) -> Response {
    match view(&s.registry, &name) {
        Some(v) => Json(v).into_response(),
        None => (
            StatusCode::NOT_FOUND,
            format!("service {name:?} does not exist\n"),
        )
            .into_response(),
    }
}
