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
pub mod status;

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
    /// The sidecars' status and the replica's own (`/v1/proxy-status`).
    pub status: status::StatusState,
}

/// The router: `/healthz`, `/readyz` (503 while a replica is cut off from
/// etcd), `/metrics`, `/v1/services`, `/v1/services/{name}`, `/v1/traffic`,
/// `/v1/mirror`, `/v1/proxy-status`, and the dashboard (`/`, `/v1/dashboard`, `/v1/dashboard/events`).
pub fn router(state: HttpState) -> Router {
    Router::new()
        .merge(dashboard::router())
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(ready))
        .route("/metrics", get(metrics))
        .route("/v1/services", get(services))
        .route("/v1/services/{name}", get(service))
        .route("/v1/traffic", get(traffic))
        .route("/v1/mirror", get(mirror))
        .route("/v1/proxy-status", get(status::handler))
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

/// `?service=web&window=60s` of `/v1/mirror`.
#[derive(serde::Deserialize)]
struct MirrorQuery {
    service: Option<String>,
    window: Option<String>,
}

/// How far back `/v1/mirror` looks without `window`.
const MIRROR_DEFAULT_WINDOW: std::time::Duration = std::time::Duration::from_secs(60);

/// A window as seconds (`60`) or a duration (`60s`, `1m`, `500ms`).
fn window(text: &str) -> Result<std::time::Duration, String> {
    match text.parse::<u32>() {
        Ok(secs) => Ok(std::time::Duration::from_secs(secs.into())),
        Err(_) => wayfinder_proto::policy::parse_duration(text),
    }
}

/// `/v1/mirror[?service=NAME][&window=DUR]`: each route's mirrored calls
/// compared with their copies over the last `window` (default 60 s, at
/// most [`crate::traffic::MIRROR_WINDOW`]), summed over every caller, for
/// `wfctl mirror diff`. An empty list when nothing was mirrored.
async fn mirror(
    State(s): State<HttpState>,
    axum::extract::Query(q): axum::extract::Query<MirrorQuery>,
) -> Response {
    match mirror_json(&s.traffic, &q) {
        Ok(v) => Json(v).into_response(),
        Err(e) => (StatusCode::BAD_REQUEST, format!("{e}\n")).into_response(),
    }
}

/// `/v1/mirror`'s answer to `q`, or why `q` is refused.
fn mirror_json(
    traffic: &crate::traffic::Traffic,
    q: &MirrorQuery,
) -> Result<serde_json::Value, String> {
    let window = match q.window.as_deref().map(window) {
        None => MIRROR_DEFAULT_WINDOW,
        Some(Ok(d)) => d,
        Some(Err(e)) => return Err(format!("window: {e}")),
    };
    if let Some(name) = &q.service {
        wayfinder_proto::validate::service_name(name).map_err(|e| format!("service: {e}"))?;
    }
    Ok(serde_json::json!({
        "service": q.service,
        "window_secs": window.min(crate::traffic::MIRROR_WINDOW).as_secs_f64(),
        "mirrors": traffic.mirrors(q.service.as_deref(), window),
    }))
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

#[cfg(test)]
mod tests {
    use super::*;
    use wayfinder_proto::latency::BUCKETS;
    use wayfinder_proto::v1::{MirrorDiff, TrafficReport};

    fn query(service: Option<&str>, window: Option<&str>) -> MirrorQuery {
        MirrorQuery {
            service: service.map(String::from),
            window: window.map(String::from),
        }
    }

    #[tokio::test(start_paused = true)]
    async fn mirror_serves_one_service_s_routes_over_the_window_asked_for() {
        let t = crate::traffic::Traffic::default();
        let mut primary = vec![0; BUCKETS];
        primary[4] = 8;
        t.record(&TrafficReport {
            node: "client-1".into(),
            service: "client".into(),
            edges: Vec::new(),
            mirrors: vec![MirrorDiff {
                service: "web".into(),
                route: "default".into(),
                shadow: "version=v2".into(),
                pairs: 8,
                status_differs: 1,
                body_differs: 2,
                shed: 3,
                shadow_failed: 4,
                primary_latency_buckets: primary,
                shadow_latency_buckets: vec![0; BUCKETS],
            }],
            status: None,
        });
        let v = mirror_json(&t, &query(Some("web"), Some("60"))).expect("valid");
        assert_eq!(v["service"], "web");
        assert_eq!(v["window_secs"], 60.0);
        let m = &v["mirrors"][0];
        assert_eq!(m["route"], "default");
        assert_eq!(m["shadow"], "version=v2");
        assert_eq!(
            [
                &m["pairs"],
                &m["status_differs"],
                &m["body_differs"],
                &m["shed"],
                &m["shadow_failed"]
            ],
            [8, 1, 2, 3, 4]
        );
        assert!(
            m["primary_p50_ms"]
                .as_f64()
                .is_some_and(|p| p > 2.0 && p <= 4.0),
            "{m}"
        );
        assert!(m["shadow_p99_ms"].is_null(), "{m}");

        let other = mirror_json(&t, &query(Some("api"), None)).expect("valid");
        assert_eq!(other["mirrors"].as_array().map(Vec::len), Some(0));
        let long = mirror_json(&t, &query(None, Some("60m"))).expect("valid");
        assert_eq!(long["window_secs"], 300.0, "at most what is kept");
        tokio::time::advance(std::time::Duration::from_secs(61)).await;
        let later = mirror_json(&t, &query(Some("web"), Some("1m"))).expect("valid");
        assert_eq!(later["mirrors"].as_array().map(Vec::len), Some(0));
    }

    #[test]
    fn mirror_refuses_a_bad_window_or_service_name() {
        let t = crate::traffic::Traffic::default();
        let e = mirror_json(&t, &query(Some("web"), Some("soon"))).expect_err("bad window");
        assert!(e.starts_with("window:"), "{e}");
        let e = mirror_json(&t, &query(Some("../web"), None)).expect_err("bad name");
        assert!(e.starts_with("service:"), "{e}");
        assert_eq!(window("90"), Ok(std::time::Duration::from_secs(90)));
        assert_eq!(window("500ms"), Ok(std::time::Duration::from_millis(500)));
    }
}
