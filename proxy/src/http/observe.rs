//! A request's end, as the sidecar records it: the span finished with its
//! status, one access-log line, the request counters and, outbound, the
//! dashboard's traffic counts; and requests refused at the edge.

use std::net::SocketAddr;
use std::time::Instant;

use hyper::{Method, Response};

use super::{ATTEMPTS_HEADER, Body, ERROR_HEADER, reply};
use crate::edge::Refusal;
use crate::metrics::{Direction, RefusalLabels, RequestCounters, RouteLabels};
use crate::state::Proxy;
use crate::telemetry;
use crate::traffic::EdgeCounts;
use wayfinder_proto::v1::TapEvent;

/// What is recorded of one request when it ends.
pub struct Observed<'a> {
    /// Inbound or outbound.
    pub direction: Direction,
    /// The upstream it is counted under (`app` inbound).
    pub upstream: &'a str,
    /// That upstream's request counters.
    pub counters: &'a RequestCounters,
    /// The dashboard's counts for the upstream (outbound only).
    pub traffic: Option<&'a EdgeCounts>,
    /// The request's span.
    pub span: &'a tracing::Span,
    /// Its method.
    pub method: &'a Method,
    /// Its path.
    pub path: &'a str,
    /// When it started.
    pub started: Instant,
    /// The route and backend that took it, if the service has routes.
    pub routed: Option<Routed<'a>>,
    /// Tapped (outbound only): the request's trace id, maybe empty.
    pub tapped: Option<String>,
}

/// The instance whose answer a response is, put in its extensions by the
/// outbound retry loop for the tap.
#[derive(Clone, Debug)]
pub struct AnsweredBy(pub std::sync::Arc<str>);

/// The route and backend a request took.
pub struct Routed<'a> {
    /// The route's name.
    pub route: &'a str,
    /// The backend's label (`version=v2`, or a service).
    pub backend: &'a str,
    /// The backend's counts in the traffic report.
    pub traffic: &'a EdgeCounts,
}

/// Ends a request: its span, the access log line, the request counter
/// and, outbound, the upstream's traffic counts for the dashboard.
pub fn finish(proxy: &Proxy, o: &Observed<'_>, resp: Response<Body>) -> Response<Body> {
    let status = resp.status();
    // Only error answers carry a reason; successes skip the lookup.
    let error = if status.is_client_error() || status.is_server_error() {
        resp.headers()
            .get(ERROR_HEADER)
            .and_then(|v| v.to_str().ok())
    } else {
        None
    };
    let status = status.as_u16();
    telemetry::finish(o.span, status, error);
    if let Some(traffic) = o.traffic {
        traffic.record(status, o.started.elapsed());
    }
    if let Some(r) = &o.routed {
        r.traffic.record(status, o.started.elapsed());
        if !o.span.is_none() {
            o.span.record("wayfinder.route", r.route);
            o.span.record("wayfinder.backend", r.backend);
        }
        proxy
            .metrics
            .route_requests
            .get_or_create(&RouteLabels {
                upstream: o.upstream.to_string(),
                route: r.route.to_string(),
                backend: r.backend.to_string(),
                status: crate::metrics::status_class(status),
            })
            .inc();
    }
    if let Some(trace_id) = &o.tapped {
        proxy
            .tap
            .record(tap_event(o, &resp, error, trace_id.clone()));
    }
    if proxy.local.access_log {
        tracing::info!(
            target: "wayfinder::access",
            direction = o.direction.as_str(),
            upstream = o.upstream,
            method = o.method.as_str(),
            path = o.path,
            status,
            error = error.unwrap_or("-"),
            attempts = resp
                .headers()
                .get(ATTEMPTS_HEADER)
                .and_then(|v| v.to_str().ok())
                .unwrap_or("-"),
            ms = o.started.elapsed().as_secs_f64() * 1e3,
        );
    }
    count(proxy, o.direction, o.upstream, o.counters, resp)
}

/// The tap's event for a request: the fields listed in [`TapEvent`], no
/// other header value.
fn tap_event(
    o: &Observed<'_>,
    resp: &Response<Body>,
    error: Option<&str>,
    trace_id: String,
) -> TapEvent {
    TapEvent {
        caller: String::new(),
        callee: o.upstream.to_string(),
        instance: resp
            .extensions()
            .get::<AnsweredBy>()
            .map_or_else(String::new, |a| a.0.to_string()),
        method: o.method.to_string(),
        path: o.path.to_string(),
        status: u32::from(resp.status().as_u16()),
        ms: o.started.elapsed().as_secs_f64() * 1e3,
        attempts: resp
            .headers()
            .get(ATTEMPTS_HEADER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0),
        error: error.unwrap_or_default().to_string(),
        trace_id,
    }
}

/// Counts a finished request.
pub fn count(
    proxy: &Proxy,
    direction: Direction,
    upstream: &str,
    counters: &RequestCounters,
    resp: Response<Body>,
) -> Response<Body> {
    counters.inc(
        &proxy.metrics.requests,
        direction,
        upstream,
        resp.status().as_u16(),
    );
    resp
}

/// Refuses a request at the edge: counted by reason, logged once per
/// kind with the client that sent it, answered with its status.
pub fn refuse(proxy: &Proxy, r: Refusal, grpc: bool, peer: SocketAddr) -> Response<Body> {
    proxy
        .metrics
        .edge_refusals
        .get_or_create(&RefusalLabels { reason: r })
        .inc();
    let reason = r.as_str();
    if proxy.first_time(reason) {
        tracing::warn!(%peer, reason, "request refused (logged once per kind; see wayfinder_proxy_edge_refusals_total)");
    }
    reply(grpc, r.status(), reason)
}
