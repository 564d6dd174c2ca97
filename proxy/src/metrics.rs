//! The sidecar's Prometheus metrics: one struct, registered once, handed to
//! the listener and the HTTP proxy that update it.

use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue, LabelValueEncoder};
use prometheus_client::metrics::{
    counter::Counter, family::Family, gauge::Gauge, histogram::Histogram,
};
use prometheus_client::registry::Registry;

use crate::edge::{ConnRefusal, Refusal};
use crate::resilience::breaker::Overflow;
pub use crate::resilience::rate_limit::RateLimitedLabels;

/// Makes enums label values: the text of their `as_str` (the values the
/// metrics document; the derive would write the variant's name).
macro_rules! label_value {
    ($($t:ty),*) => {$(
        impl EncodeLabelValue for $t {
            fn encode(&self, e: &mut LabelValueEncoder) -> std::fmt::Result {
                std::fmt::Write::write_str(e, self.as_str())
            }
        }
    )*};
}
label_value!(Direction, TimeoutKind, Refusal, ConnRefusal, Overflow);

/// Which side of the sidecar a request or connection is on.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
pub enum Direction {
    /// From another sidecar or client to the local app.
    Inbound,
    /// From the local app (or a client) to an upstream.
    Outbound,
}

impl Direction {
    /// `inbound` or `outbound`.
    pub fn as_str(self) -> &'static str {
        match self {
            Direction::Inbound => "inbound",
            Direction::Outbound => "outbound",
        }
    }
}

/// Which timeout fired.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
pub enum TimeoutKind {
    /// Connecting to an endpoint.
    Connect,
    /// One attempt.
    PerTry,
    /// The whole request (the policy's, or the client's gRPC deadline).
    Request,
    /// A client's request headers (HTTP/1).
    HeaderRead,
}

impl TimeoutKind {
    /// Every kind (to remove a service's series).
    pub const ALL: [TimeoutKind; 4] = [
        TimeoutKind::Connect,
        TimeoutKind::PerTry,
        TimeoutKind::Request,
        TimeoutKind::HeaderRead,
    ];

    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            TimeoutKind::Connect => "connect",
            TimeoutKind::PerTry => "per_try",
            TimeoutKind::Request => "request",
            TimeoutKind::HeaderRead => "header_read",
        }
    }
}

/// Labels of a request counter.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    /// `inbound` or `outbound`.
    pub direction: Direction,
    /// Upstream service (or `app` inbound).
    pub upstream: String,
    /// `2xx`, `3xx`, `4xx`, `5xx`.
    pub status: &'static str,
}

/// Labels of a latency histogram.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct LatencyLabels {
    /// `inbound` or `outbound`.
    pub direction: Direction,
    /// Upstream service.
    pub upstream: String,
    /// Endpoint id.
    pub endpoint: String,
}

/// Labels by direction.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DirectionLabels {
    /// `inbound` or `outbound`.
    pub direction: Direction,
}

/// Labels of the TCP byte counters.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct BytesLabels {
    /// `inbound` or `outbound`.
    pub direction: Direction,
    /// `from_client` or `to_client`.
    pub flow: &'static str,
}

/// Labels naming an upstream service.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct UpstreamLabels {
    /// Upstream service.
    pub upstream: String,
}

/// Labels of the timeout counter.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TimeoutLabels {
    /// Upstream service (`-` where none is known yet).
    pub upstream: String,
    /// `connect`, `per_try`, `request` or `header_read`.
    pub kind: TimeoutKind,
}

/// Labels of the circuit breaker counter.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OverflowLabels {
    /// Upstream service.
    pub upstream: String,
    /// `requests`, `pending`, `retries`.
    pub limit: Overflow,
}

/// Labels naming why a connection was refused.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ConnRefusalLabels {
    /// `plaintext`, `handshake`, `forbidden`.
    pub reason: ConnRefusal,
}

/// Labels naming why a request was refused at the edge.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RefusalLabels {
    /// [`Refusal::as_str`].
    pub reason: Refusal,
}

/// Labels of the requests a route took.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RouteLabels {
    /// The service called.
    pub upstream: String,
    /// The route's name.
    pub route: String,
    /// The backend: `version=v2`, or another service's name.
    pub backend: String,
    /// Status class of the answer.
    pub status: &'static str,
}

/// Labels of injected faults.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct FaultLabels {
    /// The service called.
    pub upstream: String,
    /// `abort`, `delay` or `reset`.
    pub kind: &'static str,
}

/// Labels of mirrored calls' copies.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct MirrorLabels {
    /// The service called (whose calls are copied).
    pub upstream: String,
    /// `sent`, `shed` (over `max_in_flight` or `max_body_bytes`) or
    /// `failed` (the copy got no answer).
    pub result: &'static str,
}

/// Labels of hedged requests.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct HedgeLabels {
    /// The service called.
    pub upstream: String,
    /// `won` (a copy answered first), `lost` (the first try did), or
    /// `no-budget` (a copy was due but the retry budget refused it).
    pub result: &'static str,
}

/// Labels of health check transitions.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct HealthLabels {
    /// Upstream service.
    pub upstream: String,
    /// `healthy` or `unhealthy`: the state entered.
    pub to: &'static str,
}

/// Labels of the locality counters.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct LocalityLabels {
    /// Upstream service.
    pub upstream: String,
    /// `local` (an endpoint in the sidecar's zone) or `remote`.
    pub locality: &'static str,
}

type HistogramFamily<L> = Family<L, Histogram, fn() -> Histogram>;

fn latency_histogram() -> Histogram {
    Histogram::new(prometheus_client::metrics::histogram::exponential_buckets(
        0.0002, 2.0, 18,
    ))
}

impl ProxyMetrics {
    /// Counts a mirrored call's copy of `upstream` as `result`.
    pub fn mirror_copy(&self, upstream: &str, result: &'static str) {
        self.mirror_copies
            .get_or_create(&MirrorLabels {
                upstream: upstream.to_string(),
                result,
            })
            .inc();
    }
    /// Removes endpoint `id`'s latency series of upstream `upstream`.
    pub fn forget_endpoint(&self, upstream: &str, id: String) {
        self.latency.remove(&LatencyLabels {
            direction: Direction::Outbound,
            upstream: upstream.to_string(),
            endpoint: id,
        });
    }

    /// Removes every series of an evicted upstream, so that label sets
    /// stay bounded by the upstreams held (`--max-upstreams`).
    pub fn forget_upstream(&self, upstream: &str, endpoints: Vec<String>) {
        for id in endpoints {
            self.forget_endpoint(upstream, id);
        }
        let name = || upstream.to_string();
        for status in ["1xx", "2xx", "3xx", "4xx", "5xx"] {
            self.requests.remove(&RequestLabels {
                direction: Direction::Outbound,
                upstream: name(),
                status,
            });
        }
        for family in [&self.retries, &self.budget_exhausted, &self.ejections] {
            family.remove(&UpstreamLabels { upstream: name() });
        }
        for kind in TimeoutKind::ALL {
            self.timeouts.remove(&TimeoutLabels {
                upstream: name(),
                kind,
            });
        }
        for limit in Overflow::ALL {
            self.overflows.remove(&OverflowLabels {
                upstream: name(),
                limit,
            });
        }
        for to in ["healthy", "unhealthy"] {
            self.health_transitions.remove(&HealthLabels {
                upstream: name(),
                to,
            });
        }
        for result in ["sent", "shed", "failed"] {
            self.mirror_copies.remove(&MirrorLabels {
                upstream: name(),
                result,
            });
        }
        for result in ["won", "lost", "no-budget"] {
            self.hedges.remove(&HedgeLabels {
                upstream: name(),
                result,
            });
        }
        for kind in ["abort", "delay", "reset"] {
            self.faults_injected.remove(&FaultLabels {
                upstream: name(),
                kind,
            });
        }
        for locality in ["local", "remote"] {
            self.locality_requests.remove(&LocalityLabels {
                upstream: name(),
                locality,
            });
        }
    }

    /// Removes the route series of an evicted upstream (`routes`: its last
    /// route table).
    pub fn forget_routes(&self, upstream: &str, routes: &crate::routes::RouteTable) {
        for r in routes.routes() {
            for b in &r.backends {
                for status in ["1xx", "2xx", "3xx", "4xx", "5xx"] {
                    self.route_requests.remove(&RouteLabels {
                        upstream: upstream.to_string(),
                        route: r.name.to_string(),
                        backend: b.label.to_string(),
                        status,
                    });
                }
            }
        }
    }

    /// Counts a timeout of `kind` for `upstream`.
    pub fn timeout(&self, upstream: &str, kind: TimeoutKind) {
        self.timeouts
            .get_or_create(&TimeoutLabels {
                upstream: upstream.to_string(),
                kind,
            })
            .inc();
    }
}

/// Every metric of the data path.
#[derive(Clone)]
pub struct ProxyMetrics {
    /// Requests by direction, upstream, status class.
    pub requests: Family<RequestLabels, Counter>,
    /// Time to response headers by direction, upstream and endpoint.
    pub latency: HistogramFamily<LatencyLabels>,
    /// Open client connections.
    pub connections: Family<DirectionLabels, Gauge>,
    /// Bytes relayed by opaque TCP.
    pub tcp_bytes: Family<BytesLabels, Counter>,
    /// Time spent detecting the protocol.
    pub detect_seconds: Histogram,
    /// Connections whose client sent nothing within the detection window.
    pub detect_timeouts: Counter,
    /// Silent clients left to speak first because every race was taken.
    pub silent_races_capped: Counter,
    /// Times a listener was full (`--max-connections`) and stopped accepting.
    pub listener_full: Family<DirectionLabels, Counter>,
    /// Retries sent, by upstream.
    pub retries: Family<UpstreamLabels, Counter>,
    /// Retries refused because the retry budget was spent.
    pub budget_exhausted: Family<UpstreamLabels, Counter>,
    /// Timeouts by upstream and kind.
    pub timeouts: Family<TimeoutLabels, Counter>,
    /// Endpoints ejected by outlier detection.
    pub ejections: Family<UpstreamLabels, Counter>,
    /// Requests refused by a circuit breaker.
    pub overflows: Family<OverflowLabels, Counter>,
    /// Endpoints that active health checks turned healthy or unhealthy.
    pub health_transitions: Family<HealthLabels, Counter>,
    /// Spans exported and dropped.
    pub spans: crate::telemetry::ExportCounters,
    /// Inbound connections refused (mTLS, authorization).
    pub refused: Family<ConnRefusalLabels, Counter>,
    /// HTTP requests denied by authorization.
    pub forbidden: Counter,
    /// Requests refused at the mesh's edge (`edge.rs`), by reason.
    pub edge_refusals: Family<RefusalLabels, Counter>,
    /// Upstreams held (each with a discovery watch and metric series).
    pub upstreams: Gauge,
    /// Upstreams evicted after `--upstream-idle-timeout` unused.
    pub upstreams_evicted: Counter,
    /// Requests a route took, by upstream, route, backend and status class.
    pub route_requests: Family<RouteLabels, Counter>,
    /// Faults injected into tries, by upstream and kind.
    pub faults_injected: Family<FaultLabels, Counter>,
    /// Hedged requests by upstream and result.
    pub hedges: Family<HedgeLabels, Counter>,
    /// Copies of mirrored calls by upstream and result.
    pub mirror_copies: Family<MirrorLabels, Counter>,
    /// Tries by upstream, to endpoints in the sidecar's zone or not
    /// (sidecars with `--zone`).
    pub locality_requests: Family<LocalityLabels, Counter>,
    /// Inbound requests refused by the service's rate limit, by caller.
    pub rate_limited: Family<RateLimitedLabels, Counter>,
}

impl ProxyMetrics {
    /// Creates and registers the metrics.
    pub fn register(reg: &mut Registry) -> Self {
        let m = Self {
            requests: Family::default(),
            latency: Family::new_with_constructor(latency_histogram as fn() -> Histogram),
            connections: Family::default(),
            tcp_bytes: Family::default(),
            detect_seconds: Histogram::new(
                prometheus_client::metrics::histogram::exponential_buckets(0.00001, 2.0, 16),
            ),
            detect_timeouts: Counter::default(),
            silent_races_capped: Counter::default(),
            listener_full: Family::default(),
            retries: Family::default(),
            budget_exhausted: Family::default(),
            timeouts: Family::default(),
            ejections: Family::default(),
            overflows: Family::default(),
            health_transitions: Family::default(),
            spans: crate::telemetry::ExportCounters::default(),
            refused: Family::default(),
            forbidden: Counter::default(),
            edge_refusals: Family::default(),
            upstreams: Gauge::default(),
            upstreams_evicted: Counter::default(),
            route_requests: Family::default(),
            faults_injected: Family::default(),
            hedges: Family::default(),
            mirror_copies: Family::default(),
            locality_requests: Family::default(),
            rate_limited: Family::default(),
        };
        reg.register(
            "wayfinder_proxy_route_requests",
            "Requests a policy route took, by upstream, route, backend (subset or service) and status class",
            m.route_requests.clone(),
        );
        reg.register(
            "wayfinder_proxy_mirror_copies",
            "Copies of mirrored calls by upstream and result: sent, shed (over max_in_flight or max_body_bytes), failed (no answer)",
            m.mirror_copies.clone(),
        );
        reg.register(
            "wayfinder_proxy_hedges",
            "Hedged requests by upstream and result: won (a copy answered first), lost (the first try did), no-budget (a copy was due but the retry budget refused it)",
            m.hedges.clone(),
        );
        reg.register(
            "wayfinder_proxy_faults_injected",
            "Faults injected into tries by the policy's fault, by upstream and kind (abort, delay, reset)",
            m.faults_injected.clone(),
        );
        reg.register(
            "wayfinder_proxy_rate_limited",
            "Inbound requests the service's rate limit refused (429, gRPC RESOURCE_EXHAUSTED), by service and caller (SPIFFE ID, unauthenticated, or other past 10,000 callers)",
            m.rate_limited.clone(),
        );
        reg.register(
            "wayfinder_proxy_requests",
            "HTTP requests by direction, upstream and status class",
            m.requests.clone(),
        );
        reg.register(
            "wayfinder_proxy_request_duration_seconds",
            "Time from request to response headers, by direction, upstream and endpoint",
            m.latency.clone(),
        );
        reg.register(
            "wayfinder_proxy_open_connections",
            "Open client connections",
            m.connections.clone(),
        );
        reg.register(
            "wayfinder_proxy_tcp_bytes",
            "Bytes relayed as opaque TCP",
            m.tcp_bytes.clone(),
        );
        reg.register(
            "wayfinder_proxy_detect_seconds",
            "Time to detect a connection's protocol",
            m.detect_seconds.clone(),
        );
        reg.register(
            "wayfinder_proxy_detect_timeouts",
            "Connections that sent nothing within the detection window (relayed as TCP)",
            m.detect_timeouts.clone(),
        );
        reg.register(
            "wayfinder_proxy_listener_full",
            "Times a listener held --max-connections and stopped accepting until one closed",
            m.listener_full.clone(),
        );
        reg.register(
            "wayfinder_proxy_silent_races_capped",
            "Silent clients not given an endpoint connection because --max-silent-races were racing",
            m.silent_races_capped.clone(),
        );
        reg.register(
            "wayfinder_proxy_retries",
            "Retries sent, by upstream",
            m.retries.clone(),
        );
        reg.register(
            "wayfinder_proxy_retry_budget_exhausted",
            "Retries not sent because the upstream's retry budget was spent",
            m.budget_exhausted.clone(),
        );
        reg.register(
            "wayfinder_proxy_timeouts",
            "Timeouts by upstream and kind (connect, per_try, request, header_read)",
            m.timeouts.clone(),
        );
        reg.register(
            "wayfinder_proxy_ejections",
            "Endpoints ejected by passive outlier detection",
            m.ejections.clone(),
        );
        reg.register(
            "wayfinder_proxy_breaker_overflows",
            "Requests refused at once by a circuit breaker, by upstream and limit",
            m.overflows.clone(),
        );
        reg.register(
            "wayfinder_proxy_health_transitions",
            "Endpoints turned healthy or unhealthy by active health checks",
            m.health_transitions.clone(),
        );
        reg.register(
            "wayfinder_proxy_inbound_refused",
            "Inbound connections refused: plaintext to a strict inbound, failed mTLS handshake, TCP denied by authorization",
            m.refused.clone(),
        );
        reg.register(
            "wayfinder_proxy_edge_refusals",
            "Requests refused at the mesh's edge: duplicate Host, Connection naming an end-to-end header, CONNECT, ambiguous path",
            m.edge_refusals.clone(),
        );
        reg.register(
            "wayfinder_proxy_locality_requests",
            "Tries (each attempt of a request) by upstream, to an endpoint in the sidecar's zone (local) or another (remote); sidecars with --zone only",
            m.locality_requests.clone(),
        );
        reg.register(
            "wayfinder_proxy_upstreams",
            "Upstream services held, each with a discovery watch and its metric series (at most --max-upstreams besides the pinned ones)",
            m.upstreams.clone(),
        );
        reg.register(
            "wayfinder_proxy_upstreams_evicted",
            "Upstreams evicted after --upstream-idle-timeout without use: their watch closed, their series removed",
            m.upstreams_evicted.clone(),
        );
        reg.register(
            "wayfinder_proxy_forbidden",
            "Inbound HTTP requests denied by the service's authorization policy (403)",
            m.forbidden.clone(),
        );
        reg.register(
            "wayfinder_proxy_spans_exported",
            "Trace spans accepted by the OTLP collector",
            m.spans.exported.clone(),
        );
        reg.register(
            "wayfinder_proxy_spans_dropped",
            "Trace spans dropped because their export failed (collector away or slow)",
            m.spans.dropped.clone(),
        );
        m
    }
}

/// `2xx`-style class of a status code.
pub fn status_class(code: u16) -> &'static str {
    match code {
        100..=199 => "1xx",
        200..=299 => "2xx",
        300..=399 => "3xx",
        400..=499 => "4xx",
        _ => "5xx",
    }
}

/// One request counter per status class for one (direction, upstream),
/// looked up in the family once instead of on every request.
#[derive(Default)]
pub struct RequestCounters([std::sync::OnceLock<Counter>; 5]);

impl RequestCounters {
    /// Counts a response with `status` to `upstream`.
    pub fn inc(
        &self,
        family: &Family<RequestLabels, Counter>,
        direction: Direction,
        upstream: &str,
        status: u16,
    ) {
        let class = status_class(status);
        let i = usize::from(class.as_bytes()[0].saturating_sub(b'1')).min(4);
        self.0[i]
            .get_or_init(|| {
                family
                    .get_or_create(&RequestLabels {
                        direction,
                        upstream: upstream.to_string(),
                        status: class,
                    })
                    .clone()
            })
            .inc();
    }
}

#[cfg(test)]
mod request_counter_tests {
    use super::*;

    #[test]
    fn counters_land_in_the_family_by_status_class() {
        let family: Family<RequestLabels, Counter> = Family::default();
        let counters = RequestCounters::default();
        for status in [200, 204, 200, 503, 404, 101] {
            counters.inc(&family, Direction::Outbound, "web", status);
        }
        let get = |status: &'static str| {
            family
                .get_or_create(&RequestLabels {
                    direction: Direction::Outbound,
                    upstream: "web".into(),
                    status,
                })
                .get()
        };
        assert_eq!(
            [get("1xx"), get("2xx"), get("4xx"), get("5xx"), get("3xx")],
            [1, 3, 1, 1, 0]
        );
    }
}
