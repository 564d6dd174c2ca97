//! HTTP forwarding, outbound (to a balanced endpoint of a service) and
//! inbound (to the local app).
//!
//! Between sidecars every request travels over pooled, multiplexed HTTP/2
//! (as Linkerd does); an HTTP/1 request is marked with
//! `x-wayfinder-orig-proto` so the receiving sidecar gives its app HTTP/1
//! again. Bodies stream in both directions; nothing is buffered.
//! Upgrades (WebSocket) go over HTTP/1 end to end and are spliced.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full, combinators::BoxBody};
use hyper::body::Incoming;
use hyper::header::{self, HeaderMap, HeaderName, HeaderValue};
use hyper::{Request, Response, StatusCode, Uri, Version};
use hyper_util::client::legacy::{Client, connect::HttpConnector};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};

use crate::balance::{EndpointStats, Kind, PickContext, hash_bytes};
use crate::discovery::Sources;
use crate::metrics::{LatencyLabels, ProxyMetrics, RequestLabels, status_class};
use crate::upstream::{HashKey, Upstream, Upstreams};

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
    /// The local app as an endpoint (its stats live as long as the sidecar).
    app: Option<Arc<EndpointStats>>,
    h1: Client<HttpConnector, Incoming>,
    h2: Client<HttpConnector, Incoming>,
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

/// Headers that describe one hop, never forwarded (RFC 9110 §7.6.1), plus
/// whatever the `Connection` header lists.
fn strip_hop_by_hop(headers: &mut HeaderMap) {
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
    for name in [
        header::CONNECTION,
        header::TE,
        header::TRANSFER_ENCODING,
        header::UPGRADE,
        header::PROXY_AUTHORIZATION,
        header::PROXY_AUTHENTICATE,
        header::TRAILER,
    ] {
        headers.remove(name);
    }
    headers.remove("keep-alive");
    headers.remove("proxy-connection");
}

fn is_upgrade<B>(req: &Request<B>) -> bool {
    req.headers().contains_key(header::UPGRADE)
        && req
            .headers()
            .get(header::CONNECTION)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.to_ascii_lowercase().contains("upgrade"))
}

fn with_target(uri: &Uri, addr: SocketAddr) -> Result<Uri, hyper::http::Error> {
    let pq = uri.path_and_query().map_or("/", |pq| pq.as_str());
    Uri::builder()
        .scheme("http")
        .authority(addr.to_string())
        .path_and_query(pq)
        .build()
}

/// The service a Host / `:authority` names: the host part, without port.
pub fn service_from_authority(req: &Request<Incoming>) -> Option<String> {
    let host = req
        .uri()
        .authority()
        .map(|a| a.host().to_string())
        .or_else(|| {
            let h = req.headers().get(header::HOST)?.to_str().ok()?;
            Some(h.rsplit_once(':').map_or(h, |(host, _)| host).to_string())
        })?;
    let host = host.to_ascii_lowercase();
    wayfinder_proto::validate::service_name(&host).ok()?;
    Some(host)
}

impl Proxy {
    /// A data path using `sources` for discovery and `app` for inbound traffic.
    pub fn new(
        sources: Sources,
        default_kind: Kind,
        app: Option<SocketAddr>,
        connect_timeout: Duration,
        metrics: ProxyMetrics,
    ) -> Arc<Self> {
        let mut conn = HttpConnector::new();
        conn.set_nodelay(true);
        conn.set_connect_timeout(Some(connect_timeout));
        let h1 = Client::builder(TokioExecutor::new())
            .pool_timer(TokioTimer::new())
            .pool_idle_timeout(Duration::from_secs(90))
            .build(conn.clone());
        let h2 = Client::builder(TokioExecutor::new())
            .http2_only(true)
            .timer(TokioTimer::new())
            .pool_timer(TokioTimer::new())
            .http2_keep_alive_interval(Some(Duration::from_secs(30)))
            .build(conn);
        Arc::new(Self {
            upstreams: Upstreams::default(),
            sources,
            default_kind,
            app: app.map(|a| EndpointStats::new("app", a, 1)),
            h1,
            h2,
            metrics,
        })
    }

    /// The local app, if this sidecar fronts one.
    pub fn app(&self) -> Option<SocketAddr> {
        self.app.as_ref().map(|a| a.addr)
    }

    /// The upstream for `name`, starting its discovery on first use.
    pub fn upstream(&self, name: &str) -> Arc<Upstream> {
        self.upstreams.get_or_start(name, |name| {
            let up = Upstream::new(name, self.default_kind, self.sources.default_origin);
            self.sources.start(&up);
            up
        })
    }

    /// Outbound: balance `req` over `service` (or the service its Host names).
    pub async fn outbound(
        self: Arc<Self>,
        req: Request<Incoming>,
        service: Option<Arc<str>>,
        client: SocketAddr,
    ) -> Response<Body> {
        let name = match service {
            Some(s) => s.to_string(),
            None => match service_from_authority(&req) {
                Some(s) => s,
                None => return error(StatusCode::BAD_REQUEST, "no-service-in-host"),
            },
        };
        let up = self.upstream(&name);
        if !up.wait_ready(DISCOVERY_WAIT).await {
            return self.count(
                "outbound",
                &name,
                error(StatusCode::SERVICE_UNAVAILABLE, "discovery-pending"),
            );
        }
        let active = up.active();
        let key = match &active.hash_key {
            HashKey::None => None,
            HashKey::Header(h) => req
                .headers()
                .get(h.as_str())
                .map(|v| hash_bytes(v.as_bytes())),
            HashKey::ClientIp => Some(match client.ip() {
                IpAddr::V4(ip) => hash_bytes(&ip.octets()),
                IpAddr::V6(ip) => hash_bytes(&ip.octets()),
            }),
        };
        let Some(i) = active.balancer.pick(&PickContext { key }).next() else {
            return self.count(
                "outbound",
                &name,
                error(StatusCode::SERVICE_UNAVAILABLE, "no-endpoints"),
            );
        };
        let ep = active.balancer.endpoints()[i].clone();
        let resp = self.forward(req, &ep, ep.meshed, "outbound", &name).await;
        self.count("outbound", &name, resp)
    }

    /// Inbound: hand `req` to the local app.
    pub async fn inbound(self: Arc<Self>, mut req: Request<Incoming>) -> Response<Body> {
        let Some(app) = self.app.clone() else {
            return error(StatusCode::NOT_FOUND, "no-app");
        };
        // A request that was HTTP/1 before the sidecar hop goes back to HTTP/1.
        let downgrade = req.headers_mut().remove(ORIG_PROTO).is_some();
        if downgrade {
            *req.version_mut() = Version::HTTP_11;
        }
        let resp = self.forward(req, &app, false, "inbound", "app").await;
        self.count("inbound", "app", resp)
    }

    fn count(
        &self,
        direction: &'static str,
        upstream: &str,
        resp: Response<Body>,
    ) -> Response<Body> {
        self.metrics
            .requests
            .get_or_create(&RequestLabels {
                direction,
                upstream: upstream.to_string(),
                status: status_class(resp.status().as_u16()),
            })
            .inc();
        resp
    }

    async fn forward(
        &self,
        mut req: Request<Incoming>,
        ep: &Arc<EndpointStats>,
        to_sidecar: bool,
        direction: &'static str,
        upstream: &str,
    ) -> Response<Body> {
        let uri = match with_target(req.uri(), ep.addr) {
            Ok(u) => u,
            Err(_) => return error(StatusCode::BAD_REQUEST, "bad-uri"),
        };
        *req.uri_mut() = uri;
        if is_upgrade(&req) {
            return self.forward_upgrade(req, ep).await;
        }
        let orig = req.version();
        strip_hop_by_hop(req.headers_mut());
        let use_h2 = to_sidecar || orig == Version::HTTP_2;
        if to_sidecar && orig != Version::HTTP_2 {
            req.headers_mut()
                .insert(ORIG_PROTO, HeaderValue::from_static("HTTP/1.1"));
        }
        *req.version_mut() = if use_h2 {
            Version::HTTP_2
        } else {
            Version::HTTP_11
        };
        let started = Instant::now();
        let guard = ep.start();
        let result = if use_h2 {
            self.h2.request(req).await
        } else {
            self.h1.request(req).await
        };
        match result {
            Ok(resp) => {
                self.metrics
                    .latency
                    .get_or_create(&LatencyLabels {
                        direction,
                        upstream: upstream.to_string(),
                        endpoint: ep.id.to_string(),
                    })
                    .observe(started.elapsed().as_secs_f64());
                guard.finish();
                let (mut parts, body) = resp.into_parts();
                strip_hop_by_hop(&mut parts.headers);
                Response::from_parts(parts, body.boxed())
            }
            Err(e) => {
                drop(guard);
                let reason = if e.is_connect() {
                    "connect-failed"
                } else {
                    "upstream-reset"
                };
                tracing::debug!(endpoint = %ep.addr, error = %e, reason, "forwarding failed");
                error(StatusCode::BAD_GATEWAY, reason)
            }
        }
    }

    /// HTTP/1 Upgrade (WebSocket): forward the handshake, then splice the
    /// two upgraded connections.
    async fn forward_upgrade(
        &self,
        mut req: Request<Incoming>,
        ep: &Arc<EndpointStats>,
    ) -> Response<Body> {
        let client_upgrade = hyper::upgrade::on(&mut req);
        *req.version_mut() = Version::HTTP_11;
        let mut resp = match self.h1.request(req).await {
            Ok(r) => r,
            Err(e) => {
                let reason = if e.is_connect() {
                    "connect-failed"
                } else {
                    "upstream-reset"
                };
                return error(StatusCode::BAD_GATEWAY, reason);
            }
        };
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
    }

    #[test]
    fn target_uri_keeps_path_and_query() {
        let u: Uri = "/a/b?c=d".parse().expect("uri");
        let t = with_target(&u, ([10, 0, 0, 1], 8080).into()).expect("builds");
        assert_eq!(t.to_string(), "http://10.0.0.1:8080/a/b?c=d");
    }
}
