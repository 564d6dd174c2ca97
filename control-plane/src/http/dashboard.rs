//! The live dashboard at `/`: one self-contained page (no asset from the
//! internet) showing services, their instances and health, their routes'
//! subsets (configured weights and observed shares) and active faults, and
//! traffic per caller → callee edge. The page loads `/v1/dashboard` once, then follows
//! `/v1/dashboard/events` (server-sent events, a snapshot per second).

use std::convert::Infallible;
use std::time::Duration;

use axum::extract::State;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde::Serialize;
use tokio_stream::StreamExt;
use tokio_stream::wrappers::IntervalStream;

use super::{HttpState, ServiceView, view};
use crate::traffic::{BackendView, EdgeView, WINDOW};

/// How often the page gets a new snapshot.
pub const PUSH_EVERY: Duration = Duration::from_secs(1);

const PAGE: &str = include_str!("dashboard.html");

/// What the page shows.
#[derive(Serialize)]
pub struct Snapshot {
    /// Services with their endpoints.
    pub services: Vec<ServiceView>,
    /// Traffic over the last window.
    pub edges: Vec<EdgeView>,
    /// Traffic per subset a route sent to, over the last window.
    pub backends: Vec<BackendView>,
    /// The server's wall clock (Unix ms), against which faults end.
    pub now_unix_ms: u64,
    /// The window, in seconds.
    pub window_secs: u64,
}

fn snapshot(s: &HttpState) -> Snapshot {
    Snapshot {
        services: s
            .registry
            .services()
            .into_iter()
            .filter_map(|sum| view(&s.registry, &sum.name))
            .collect(),
        edges: s.traffic.edges(),
        backends: s.traffic.backends(WINDOW),
        now_unix_ms: crate::faults::unix_ms_now(),
        window_secs: WINDOW.as_secs(),
    }
}

/// `/`, `/v1/dashboard`, `/v1/dashboard/events`.
pub fn router() -> Router<HttpState> {
    Router::new()
        .route("/", get(page))
        .route(
            "/v1/dashboard",
            get(|State(s): State<HttpState>| async move { Json(snapshot(&s)) }),
        )
        .route("/v1/dashboard/events", get(events))
}

/// The page with the current snapshot inlined (`</` escaped so no value can
/// end the script element).
async fn page(State(s): State<HttpState>) -> Html<String> {
    let json = serde_json::to_string(&snapshot(&s))
        .unwrap_or_else(|_| "null".into())
        .replace("</", "<\\/");
    let (before, after) = PAGE.split_once("/*SNAPSHOT*/").unwrap_or((PAGE, ""));
    // Skip the placeholder object that follows the marker.
    let after = after.split_once(");").map_or(after, |(_, rest)| rest);
    Html(format!("{before}{json});{after}"))
}

async fn events(State(s): State<HttpState>) -> Response {
    let stream = IntervalStream::new(tokio::time::interval(PUSH_EVERY)).map(move |_| {
        let data = serde_json::to_string(&snapshot(&s)).unwrap_or_else(|_| "{}".into());
        Ok::<_, Infallible>(Event::default().event("snapshot").data(data))
    });
    Sse::new(stream)
        .keep_alive(KeepAlive::default())
        .into_response()
}
