//! HTTP forwarding, outbound (to a balanced endpoint of a service) and
//! inbound (to the local app).
//!
//! Between sidecars every request travels over pooled, multiplexed HTTP/2
//! (as Linkerd does); an HTTP/1 request is marked with
//! `x-wayfinder-orig-proto` so the receiving sidecar gives its app HTTP/1
//! again. Bodies stream in both directions; a copy of small request bodies
//! is kept for retries (`replay.rs`). Upgrades (WebSocket) go over HTTP/1
//! end to end and are spliced. The outbound retry loop is in `outbound.rs`.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full, combinators::BoxBody};
use hyper::body::Incoming;
use hyper::header::{self, HeaderMap, HeaderName, HeaderValue};
use hyper::{Method, Request, Response, StatusCode, Uri, Version};
use hyper_util::rt::TokioIo;

use crate::balance::{EndpointStats, Kind};
use crate::connector::{ConnectError, Connector, Limits};
use crate::discovery::Sources;
use crate::identity::Identity;
use crate::metrics::{LatencyLabels, ProxyMetrics};
use crate::pool::{PoolBody, PoolError};
use crate::replay::ReplayBody;
use crate::resilience::breaker::Breakers;
use crate::settings::{Defaults, Origin, Settings};
use crate::upstream::{Clients, Upstream, Upstreams};
use crate::{authz, edge, telemetry};

/// Response body type of the proxy.
pub type Body = BoxBody<Bytes, hyper::Error>;

/// Header carrying the original protocol across the sidecar-to-sidecar HTTP/2 hop.
pub const ORIG_PROTO: &str = "x-wayfinder-orig-proto";
/// Header naming why the proxy itself answered with an error.
pub const ERROR_HEADER: &str = "x-wayfinder-error";
/// How long a request waits for its service's first discovery answer.
pub const DISCOVERY_WAIT: Duration = Duration::from_secs(3);

/// Shared state of the data path.
pub struct Proxy {
    /// Known upstreams.
    pub upstreams: Upstreams,
    sources: Sources,
    default_kind: Kind,
    defaults: Defaults,
    /// The local app as an endpoint (its stats live as long as the sidecar).
    app: Option<Arc<EndpointStats>>,
    app_clients: Clients,
    /// Inbound requests to the app by status class.
    app_requests: crate::metrics::RequestCounters,
    /// This sidecar's service (span names) and whether to log each request.
    pub local: Local,
    /// Traffic per upstream for the dashboard.
    pub traffic: Arc<crate::traffic::Traffic>,
    /// The workload identity, when the sidecar has one (mTLS between sidecars).
    pub identity: Option<Arc<Identity>>,
    /// TLS for the inbound side, built once from the identity.
    pub tls_server: Option<Arc<rustls::ServerConfig>>,
    /// Refusal kinds already logged (each is logged once, then only counted).
    logged: std::sync::Mutex<std::collections::HashSet<&'static str>>,
    /// The mesh's address table, for transparently intercepted connections
    /// (kept current only when the sidecar has a `--transparent` listener).
    pub catalog: Arc<crate::transparent::catalog::Catalog>,
    /// Metrics.
    pub metrics: ProxyMetrics,
}

/// An error answered by the proxy itself.
pub fn error(status: StatusCode, reason: &'static str) -> Response<Body> {
    let mut resp = Response::new(
        Full::new(Bytes::from(format!("wayfinder: {reason}\n")))
            .map_err(|never| match never {})
            .boxed(),
    );
    *resp.status_mut() = status;
    resp.headers_mut()
        .insert(ERROR_HEADER, HeaderValue::from_static(reason));
    resp
}

/// Whether a request is a gRPC call.
pub fn is_grpc(headers: &HeaderMap) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/grpc"))
}

/// An error answered by the proxy, in gRPC's terms for gRPC calls: HTTP 200
/// with the status in a trailers-only response, as gRPC clients expect.
pub fn reply(grpc: bool, status: StatusCode, reason: &'static str) -> Response<Body> {
    let mut resp = error(status, reason);
    if grpc {
        let code = match status {
            StatusCode::GATEWAY_TIMEOUT => "4",
            StatusCode::FORBIDDEN => "7",
            StatusCode::BAD_REQUEST => "13",
            _ => "14",
        };
        *resp.status_mut() = StatusCode::OK;
        let h = resp.headers_mut();
        h.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/grpc"),
        );
        h.insert("grpc-status", HeaderValue::from_static(code));
        h.insert("grpc-message", HeaderValue::from_static(reason));
        *resp.body_mut() = Full::new(Bytes::new())
            .map_err(|never| match never {})
            .boxed();
    }
    resp
}

/// Headers that describe one hop, never forwarded (RFC 9110 §7.6.1), plus
/// whatever the `Connection` header lists.
fn strip_hop_by_hop(headers: &mut HeaderMap) {
    // Most requests carry none: one pass over the names, no removals (each
    // removal hashes and probes; nine per message showed in the profile).
    let hop =
        |k: &HeaderName| HOP_BY_HOP.contains(k) || k == "keep-alive" || k == "proxy-connection";
    if !headers.keys().any(hop) {
        return;
    }
    // `te: trailers` is the one TE HTTP/2 allows, and gRPC servers built on
    // grpc-core (Python, C++, Ruby, PHP) refuse a call without it (as Envoy,
    // keep it when it is all TE says).
    let trailers = headers
        .get(header::TE)
        .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"trailers"));
    let listed: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|n| HeaderName::from_bytes(n.trim().as_bytes()).ok())
        .collect();
    for name in listed {
        headers.remove(name);
    }
    for name in HOP_BY_HOP {
        headers.remove(name);
    }
    headers.remove("keep-alive");
    headers.remove("proxy-connection");
    if trailers {
        headers.insert(header::TE, HeaderValue::from_static("trailers"));
    }
}

/// The standard hop-by-hop headers.
const HOP_BY_HOP: [HeaderName; 7] = [
    header::CONNECTION,
    header::TE,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
    header::PROXY_AUTHORIZATION,
    header::PROXY_AUTHENTICATE,
    header::TRAILER,
];

/// Whether `req` asks for a protocol upgrade (WebSocket).
pub fn is_upgrade<B>(req: &Request<B>) -> bool {
    req.headers().contains_key(header::UPGRADE)
        && req
            .headers()
            .get(header::CONNECTION)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.to_ascii_lowercase().contains("upgrade"))
}

/// `uri` with its path replaced (its query kept).
fn with_path(uri: &Uri, path: &str) -> Option<Uri> {
    let pq = match uri.query() {
        Some(q) => format!("{path}?{q}"),
        None => path.to_string(),
    };
    let mut parts = uri.clone().into_parts();
    parts.path_and_query = Some(pq.parse().ok()?);
    Uri::from_parts(parts).ok()
}

/// An HTTP/2 request's URI: absolute, with the endpoint as authority.
fn with_target(uri: &Uri, ep: &EndpointStats) -> Result<Uri, hyper::http::Error> {
    let mut parts = hyper::http::uri::Parts::default();
    parts.scheme = Some(hyper::http::uri::Scheme::HTTP);
    parts.authority = Some(endpoint_authority(ep)?);
    parts.path_and_query = Some(match uri.path_and_query() {
        Some(pq) => pq.clone(),
        None => hyper::http::uri::PathAndQuery::from_static("/"),
    });
    Ok(Uri::from_parts(parts)?)
}

fn endpoint_authority(
    ep: &EndpointStats,
) -> Result<hyper::http::uri::Authority, hyper::http::Error> {
    Ok(match &ep.authority {
        Some(a) => a.clone(),
        None => hyper::http::uri::Authority::try_from(ep.addr.to_string())?,
    })
}

/// Makes `req` an HTTP/1.1 request for `ep`: the target in origin form (as
/// HTTP/1 sends it to an origin server), and a Host header when the client
/// gave none (an HTTP/2 client's `:authority` is in the URI instead).
fn to_http1<B>(req: &mut Request<B>, ep: &EndpointStats) -> Result<(), hyper::http::Error> {
    let authority = req.uri().authority().cloned();
    if authority.is_some() || req.uri().path_and_query().is_none() {
        *req.uri_mut() = match req.uri().path_and_query() {
            Some(pq) => Uri::from(pq.clone()),
            None => Uri::from_static("/"),
        };
    }
    if !req.headers().contains_key(header::HOST) {
        let host = match authority {
            Some(a) => a,
            None => endpoint_authority(ep)?,
        };
        req.headers_mut()
            .insert(header::HOST, HeaderValue::from_str(host.as_str())?);
    }
    *req.version_mut() = Version::HTTP_11;
    Ok(())
}

/// The service a Host / `:authority` names: the host part, without port.
pub fn service_from_authority(req: &Request<Incoming>) -> Result<Option<String>, edge::Refusal> {
    let from_uri = req.uri().authority().map(|a| a.host().to_ascii_lowercase());
    let from_header = req
        .headers()
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .map(|h| {
            h.rsplit_once(':')
                .map_or(h, |(host, _)| host)
                .to_ascii_lowercase()
        });
    // An absolute URI (or `:authority`) naming one host and `Host` another:
    // the proxy would route by one and the app read the other.
    if let (Some(u), Some(h)) = (&from_uri, &from_header)
        && u != h
    {
        return Err(edge::Refusal::HostMismatch);
    }
    let Some(host) = from_uri.or(from_header) else {
        return Ok(None);
    };
    Ok(wayfinder_proto::validate::service_name(&host)
        .is_ok()
        .then_some(host))
}

/// What is sent of a request on every attempt: the request line and headers
/// (hop-by-hop ones removed), kept so a retry can rebuild the request.
pub struct Head {
    /// Method.
    pub method: Method,
    /// Path and query (the authority is the endpoint's).
    pub uri: Uri,
    /// Version the client spoke.
    pub version: Version,
    /// End-to-end headers.
    pub headers: HeaderMap,
}

impl Head {
    /// The head of `parts`, hop-by-hop headers and the mesh's own
    /// (`x-wayfinder-*`, which only sidecars may send) removed.
    pub fn new(parts: hyper::http::request::Parts) -> Self {
        let mut headers = parts.headers;
        strip_hop_by_hop(&mut headers);
        edge::strip_mesh_headers(&mut headers);
        Self {
            method: parts.method,
            uri: parts.uri,
            version: parts.version,
            headers,
        }
    }

    /// The request for one attempt on `ep`: HTTP/2 to sidecars (marking an
    /// HTTP/1 request so the far side restores it) and to HTTP/2 clients'
    /// endpoints, HTTP/1.1 otherwise.
    fn request(
        &self,
        body: ReplayBody,
        ep: &EndpointStats,
        to_sidecar: bool,
    ) -> Result<(Request<ReplayBody>, bool), hyper::http::Error> {
        let use_h2 = to_sidecar || self.version == Version::HTTP_2;
        let mut req = Request::builder()
            .method(self.method.clone())
            .uri(if use_h2 {
                with_target(&self.uri, ep)?
            } else {
                self.uri.clone()
            })
            .version(if use_h2 {
                Version::HTTP_2
            } else {
                Version::HTTP_11
            })
            .body(body)?;
        *req.headers_mut() = self.headers.clone();
        if !use_h2 {
            to_http1(&mut req, ep)?;
        } else if to_sidecar && self.version != Version::HTTP_2 {
            req.headers_mut()
                .insert(ORIG_PROTO, HeaderValue::from_static("HTTP/1.1"));
        }
        Ok((req, use_h2))
    }
}

/// What a sidecar knows about itself that requests need.
#[derive(Debug, Clone, Default)]
pub struct Local {
    /// The service of the app it fronts (`client` for a client-only sidecar).
    pub service: String,
    /// Log one line per request.
    pub access_log: bool,
    /// With an identity: refuse plaintext on the inbound side.
    pub strict: bool,
    /// Deny inbound requests of services without an authorization policy.
    pub default_deny: bool,
}

/// One attempt failed before response headers.
#[derive(Debug)]
pub enum SendError {
    /// The request could not be built (a bad URI).
    BadRequest,
    /// No response: connect error, breaker, reset.
    Client(PoolError),
}

impl Proxy {
    /// A data path using `sources` for discovery and `app` for inbound traffic.
    pub fn new(
        sources: Sources,
        default_kind: Kind,
        app: Option<SocketAddr>,
        defaults: Defaults,
        local: Local,
        identity: Option<Arc<Identity>>,
        metrics: ProxyMetrics,
    ) -> Arc<Self> {
        let app_limits = Arc::new(Limits::default());
        app_limits.set(&Settings::resolve(None, Origin::Mesh, &defaults));
        let app_clients = Clients::new(
            Connector::new(Arc::new(Breakers::default()), app_limits),
            crate::settings::DEFAULT_IDLE,
            None,
        );
        Arc::new(Self {
            upstreams: Upstreams::default(),
            sources,
            default_kind,
            defaults,
            app: app.map(|a| EndpointStats::new("app", a, 1)),
            app_clients,
            app_requests: Default::default(),
            local,
            traffic: Arc::default(),
            tls_server: identity.as_ref().map(|i| i.server_config()),
            identity,
            logged: Default::default(),
            catalog: Default::default(),
            metrics,
        })
    }

    /// The sidecar's connect timeout (`--connect-timeout`), for connections
    /// no service policy governs (the app, intercepted pass-through).
    pub fn connect_timeout(&self) -> Duration {
        self.defaults.connect
    }

    /// The local app's address, if the sidecar fronts one.
    pub fn app(&self) -> Option<SocketAddr> {
        self.app.as_ref().map(|a| a.addr)
    }

    /// The upstream for `name`, starting its discovery on first use.
    pub fn upstream(&self, name: &str) -> Arc<Upstream> {
        self.upstreams.get_or_start(name, |name| {
            let up = Upstream::new(
                name,
                self.default_kind,
                self.sources.default_origin,
                self.defaults,
                self.metrics.clone(),
                self.identity.clone(),
            );
            self.sources.start(&up);
            tokio::spawn(crate::resilience::health_check::run(up.clone()));
            up
        })
    }

    /// Whether refusals of kind `reason` are seen for the first time (each
    /// kind is logged once: a misbehaving peer must not flood the log).
    fn first_time(&self, reason: &'static str) -> bool {
        self.logged.lock().is_ok_and(|mut l| l.insert(reason))
    }

    /// Refuses a connection: counted, and logged the first time for each
    /// kind (a misconfigured peer must not flood the log).
    pub fn refuse(&self, reason: &'static str, peer: SocketAddr, detail: &str) {
        self.metrics
            .refused
            .get_or_create(&crate::metrics::ReasonLabels { reason })
            .inc();
        if self.first_time(reason) {
            tracing::warn!(%peer, reason, detail, "inbound connection refused (logged once per kind; see wayfinder_proxy_inbound_refused_total)");
        }
    }

    /// Whether a Host-routed request may create (or use) the upstream
    /// `name`: one that exists already (an `--upstream` listener, or known
    /// before), or one the control plane's catalog lists, whatever the
    /// discovery source (with DNS, too, an unknown name would be an
    /// upstream and a resolver task per Host a client cares to send).
    /// Anything else creates no state (no upstream, no watch).
    pub async fn knows(&self, name: &str) -> bool {
        if self.upstreams.get(name).is_some() {
            return true;
        }
        self.catalog.wait_loaded(DISCOVERY_WAIT).await;
        self.catalog.table().knows(name)
    }

    /// Refuses a request at the edge: counted by reason, logged once per
    /// kind with the client that sent it, answered with its status.
    pub fn refuse_request(&self, r: edge::Refusal, grpc: bool, peer: SocketAddr) -> Response<Body> {
        let reason = r.reason();
        self.metrics
            .edge_refusals
            .get_or_create(&crate::metrics::ReasonLabels { reason })
            .inc();
        if self.first_time(reason) {
            tracing::warn!(%peer, reason, "request refused (logged once per kind; see wayfinder_proxy_edge_refusals_total)");
        }
        reply(grpc, r.status(), reason)
    }

    /// Whether `caller` may make `ask` of this sidecar's service. Until the
    /// service's own policy is known, nothing is allowed (fail closed).
    pub async fn authorized(&self, caller: Option<&str>, ask: authz::Ask<'_>) -> bool {
        let own = self.upstream(&self.local.service);
        if !own.wait_ready(DISCOVERY_WAIT).await {
            return false;
        }
        let policy = own.active().policy.as_ref().and_then(|p| p.authz.clone());
        authz::allowed(policy.as_ref(), self.local.default_deny, caller, ask)
    }

    /// Inbound: hand `req` (from `caller`, when mTLS says who) to the local app.
    pub async fn inbound(
        self: Arc<Self>,
        mut req: Request<Incoming>,
        caller: Option<Arc<str>>,
        peer: SocketAddr,
    ) -> Response<Body> {
        let Some(app) = self.app.clone() else {
            return error(StatusCode::NOT_FOUND, "no-app");
        };
        let grpc = is_grpc(req.headers());
        if let Err(r) = edge::check(&req) {
            return self.refuse_request(r, grpc, peer);
        }
        // Authorization sees the path the app will see: the normalised one,
        // which is also what the app gets.
        match edge::normalize_path(req.uri().path()) {
            Err(r) => return self.refuse_request(r, grpc, peer),
            Ok(std::borrow::Cow::Owned(path)) => {
                let Some(uri) = with_path(req.uri(), &path) else {
                    return self.refuse_request(edge::Refusal::AmbiguousPath, grpc, peer);
                };
                *req.uri_mut() = uri;
            }
            Ok(std::borrow::Cow::Borrowed(_)) => {}
        }
        let path = req.uri().path();
        let ask = if is_upgrade(&req) {
            authz::Ask::Upgrade(path)
        } else {
            authz::Ask::Http(req.method().as_str(), path)
        };
        if !self.authorized(caller.as_deref(), ask).await {
            self.metrics.forbidden.inc();
            if self.first_time("forbidden") {
                tracing::warn!(
                    caller = caller.as_deref().unwrap_or("(no identity)"),
                    method = %req.method(),
                    path = %req.uri().path(),
                    "request forbidden by authorization (logged once; see wayfinder_proxy_forbidden_total)"
                );
            }
            let resp = reply(grpc, StatusCode::FORBIDDEN, "forbidden");
            return self.count("inbound", "app", &self.app_requests, resp);
        }
        // A request that was HTTP/1 before the sidecar hop goes back to HTTP/1.
        if req.headers_mut().remove(ORIG_PROTO).is_some() {
            *req.version_mut() = Version::HTTP_11;
        }
        edge::set_caller(req.headers_mut(), caller.as_deref());
        let started = Instant::now();
        // Clones share the request's buffers: nothing is copied per request.
        let (method, uri) = (req.method().clone(), req.uri().clone());
        let path = uri.path();
        let span = telemetry::span(
            telemetry::Kind::Server,
            &self.local.service,
            method.as_str(),
            path,
            req.headers(),
        );
        let resp = if is_upgrade(&req) {
            forward_upgrade(req, &app, &self.app_clients).await
        } else {
            let (parts, body) = req.into_parts();
            let mut head = Head::new(parts);
            telemetry::inject(&span, &mut head.headers);
            match self
                .send(
                    &self.app_clients,
                    &head,
                    ReplayBody::new(body, 0),
                    &app,
                    false,
                    ("inbound", "app"),
                    &std::sync::atomic::AtomicBool::new(false),
                )
                .await
            {
                Ok(resp) => {
                    // The app may not speak for the mesh (a forged
                    // `x-wayfinder-error: connect-failed` would make callers
                    // retry what it already handled).
                    let mut resp = into_body(resp);
                    edge::strip_mesh_headers(resp.headers_mut());
                    resp
                }
                Err(e) => {
                    let (status, reason) = e.reply();
                    error(status, reason)
                }
            }
        };
        self.finish(
            ("inbound", "app", &self.app_requests),
            None,
            &span,
            (&method, path),
            started,
            resp,
        )
    }

    /// Ends a request: its span, the access log line, the request counter
    /// and, outbound, the upstream's traffic counts for the dashboard.
    pub fn finish(
        &self,
        (direction, upstream, counters): (&'static str, &str, &crate::metrics::RequestCounters),
        traffic: Option<&crate::traffic::EdgeCounts>,
        span: &tracing::Span,
        (method, path): (&Method, &str),
        started: Instant,
        resp: Response<Body>,
    ) -> Response<Body> {
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
        telemetry::finish(span, status, error);
        if let Some(traffic) = traffic {
            traffic.record(status, started.elapsed());
        }
        if self.local.access_log {
            tracing::info!(
                target: "wayfinder::access",
                direction,
                upstream,
                method = method.as_str(),
                path,
                status,
                error = error.unwrap_or("-"),
                attempts = resp
                    .headers()
                    .get(crate::outbound::ATTEMPTS_HEADER)
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or("-"),
                ms = started.elapsed().as_secs_f64() * 1e3,
            );
        }
        self.count(direction, upstream, counters, resp)
    }

    /// Counts a finished request.
    pub fn count(
        &self,
        direction: &'static str,
        upstream: &str,
        counters: &crate::metrics::RequestCounters,
        resp: Response<Body>,
    ) -> Response<Body> {
        counters.inc(
            &self.metrics.requests,
            direction,
            upstream,
            resp.status().as_u16(),
        );
        resp
    }

    /// One attempt: sends `head` with `body` to `ep` and waits for the
    /// response headers, recording the latency for the balancer and metrics.
    /// `dispatched` is set once the request is handed to a connection.
    #[allow(clippy::too_many_arguments)]
    pub async fn send(
        &self,
        clients: &Clients,
        head: &Head,
        body: ReplayBody,
        ep: &Arc<EndpointStats>,
        to_sidecar: bool,
        (direction, upstream): (&'static str, &str),
        dispatched: &std::sync::atomic::AtomicBool,
    ) -> Result<Response<PoolBody>, SendError> {
        let (req, use_h2) = head
            .request(body, ep, to_sidecar)
            .map_err(|_| SendError::BadRequest)?;
        let guard = ep.start();
        let pool = match &clients.mesh {
            Some(mesh) if use_h2 && to_sidecar => mesh,
            _ if use_h2 => &clients.h2,
            _ => &clients.h1,
        };
        let result = pool.send_marked(ep.addr, req, dispatched).await;
        match result {
            Ok((resp, dialed)) => {
                // One clock read ends the attempt for the balancer and the
                // histogram. An endpoint serves one direction of one
                // upstream, so its series never changes. A try on a
                // connection dialed for it times the handshake (TCP, mTLS,
                // HTTP/2) as much as the endpoint: it does not feed
                // peak-EWMA, or one cold connection would keep an endpoint
                // out of rotation for tens of seconds while its estimate
                // decays (Linkerd's balancer likewise measures only
                // endpoints it is connected to).
                let now = std::time::Instant::now();
                let rtt = if dialed {
                    guard.finish_unobserved_at(now)
                } else {
                    guard.finish_at(now)
                };
                ep.latency
                    .get_or_init(|| {
                        self.metrics
                            .latency
                            .get_or_create(&LatencyLabels {
                                direction,
                                upstream: upstream.to_string(),
                                endpoint: ep.id.to_string(),
                            })
                            .clone()
                    })
                    .observe(rtt.as_secs_f64());
                Ok(resp)
            }
            Err(e) => {
                tracing::debug!(endpoint = %ep.addr, error = %e, "attempt failed");
                Err(SendError::Client(e))
            }
        }
    }
}

impl SendError {
    /// The status and reason the proxy answers with when this was the last try.
    pub fn reply(&self) -> (StatusCode, &'static str) {
        match self {
            SendError::BadRequest => (StatusCode::BAD_REQUEST, "bad-uri"),
            SendError::Client(e) => match e {
                PoolError::Connect(ConnectError::Overflow(_)) => {
                    (StatusCode::SERVICE_UNAVAILABLE, "overloaded")
                }
                PoolError::Connect(ConnectError::Timeout) => {
                    (StatusCode::GATEWAY_TIMEOUT, "timeout")
                }
                PoolError::Connect(_) | PoolError::Handshake(_) => {
                    (StatusCode::BAD_GATEWAY, "connect-failed")
                }
                PoolError::Http(_) => (StatusCode::BAD_GATEWAY, "upstream-reset"),
            },
        }
    }
}

/// An upstream response with hop-by-hop headers removed, as the proxy's body type.
pub fn into_body(resp: Response<PoolBody>) -> Response<Body> {
    let (mut parts, body) = resp.into_parts();
    strip_hop_by_hop(&mut parts.headers);
    Response::from_parts(parts, body.boxed())
}

/// HTTP/1 Upgrade (WebSocket): forward the handshake, then splice the two
/// upgraded connections. Never retried: the client may start talking the
/// new protocol at once.
pub async fn forward_upgrade(
    mut req: Request<Incoming>,
    ep: &Arc<EndpointStats>,
    clients: &Clients,
) -> Response<Body> {
    let client_upgrade = hyper::upgrade::on(&mut req);
    if to_http1(&mut req, ep).is_err() {
        return error(StatusCode::BAD_REQUEST, "bad-uri");
    }
    // As on every other request: only sidecars speak for the mesh.
    edge::strip_mesh_headers(req.headers_mut());
    let req = req.map(|b| ReplayBody::new(b, 0));
    let pool = match &clients.mesh_h1 {
        Some(mesh) if ep.meshed => mesh,
        _ => &clients.h1,
    };
    let mut resp = match pool.send(ep.addr, req).await {
        Ok(r) => r,
        Err(e) => {
            let (status, reason) = SendError::Client(e).reply();
            return error(status, reason);
        }
    };
    if !ep.meshed {
        edge::strip_mesh_headers(resp.headers_mut());
    }
    if resp.status() == StatusCode::SWITCHING_PROTOCOLS {
        let server_upgrade = hyper::upgrade::on(&mut resp);
        let addr = ep.addr;
        tokio::spawn(async move {
            match (client_upgrade.await, server_upgrade.await) {
                (Ok(c), Ok(s)) => {
                    let (mut c, mut s) = (TokioIo::new(c), TokioIo::new(s));
                    let _ = tokio::io::copy_bidirectional(&mut c, &mut s).await;
                }
                (c, s) => {
                    tracing::debug!(%addr, client_ok = c.is_ok(), server_ok = s.is_ok(), "upgrade failed")
                }
            }
        });
    }
    let (parts, body) = resp.into_parts();
    Response::from_parts(parts, body.boxed())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hop_by_hop_headers_are_dropped_including_listed_ones() {
        let mut h = HeaderMap::new();
        h.insert(
            header::CONNECTION,
            HeaderValue::from_static("keep-alive, x-secret-hop"),
        );
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert("x-secret-hop", HeaderValue::from_static("1"));
        h.insert(
            header::TRANSFER_ENCODING,
            HeaderValue::from_static("chunked"),
        );
        h.insert("x-kept", HeaderValue::from_static("1"));
        strip_hop_by_hop(&mut h);
        assert_eq!(h.len(), 1);
        assert!(h.contains_key("x-kept"));
        // gRPC's `te: trailers` stays; any other TE goes.
        for (te, kept) in [
            ("trailers", true),
            ("Trailers", true),
            ("gzip", false),
            ("trailers, deflate", false),
        ] {
            let mut h = HeaderMap::new();
            h.insert(header::TE, HeaderValue::from_str(te).expect("value"));
            h.insert(header::CONNECTION, HeaderValue::from_static("te"));
            strip_hop_by_hop(&mut h);
            assert_eq!(h.get(header::TE).is_some(), kept, "{te}");
            assert!(h.get(header::CONNECTION).is_none());
        }
    }

    #[test]
    fn target_uri_keeps_path_and_query() {
        let u: Uri = "/a/b?c=d".parse().expect("uri");
        let ep = EndpointStats::new("e", ([10, 0, 0, 1], 8080).into(), 1);
        let t = with_target(&u, &ep).expect("builds");
        assert_eq!(t.to_string(), "http://10.0.0.1:8080/a/b?c=d");
    }
}
