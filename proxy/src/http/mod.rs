//! HTTP through the sidecar, in the order a request meets it: outbound
//! (`outbound.rs`: admission, deadline, endpoint choice, retries), one
//! attempt on one endpoint (`attempt.rs`), inbound to the local app
//! (`inbound.rs`), upgrades and CONNECT tunnels, and the request's end
//! (`observe.rs`: span, access log, counters).
//!
//! Between sidecars every request travels over pooled, multiplexed HTTP/2
//! (as Linkerd does); an HTTP/1 request is marked with [`ORIG_PROTO`] so
//! the receiving sidecar gives its app HTTP/1 again. Bodies stream in both
//! directions; a copy of small request bodies is kept for retries
//! (`replay.rs`). Upgrades (WebSocket) go over HTTP/1 end to end and are
//! spliced.

pub mod attempt;
pub mod head;
pub mod inbound;
pub mod observe;
pub mod outbound;
pub mod shadow;
pub mod tunnel;
pub mod upgrade;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, combinators::BoxBody};
use hyper::header::{self, HeaderMap, HeaderValue};
use hyper::{Request, Response, StatusCode};

/// Response body type of the proxy.
pub type Body = BoxBody<Bytes, hyper::Error>;

/// Header carrying the original protocol across the sidecar-to-sidecar HTTP/2 hop.
pub const ORIG_PROTO: &str = "x-wayfinder-orig-proto";
/// Header naming why the proxy itself answered with an error.
pub const ERROR_HEADER: &str = "x-wayfinder-error";
/// Response header: how many attempts the request took.
pub const ATTEMPTS_HEADER: &str = "x-wayfinder-attempts";
/// The [`ERROR_HEADER`] reason of a sidecar that could not connect to its
/// endpoint (or app): the request reached no application, so a caller's
/// sidecar may retry it, even a POST.
pub const CONNECT_FAILED: &str = "connect-failed";
/// The [`ERROR_HEADER`] reason of a sidecar whose service's rate limit
/// refused the request (429, with `Retry-After`): it reached no app.
pub const RATE_LIMITED: &str = "rate-limited";

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
            // RESOURCE_EXHAUSTED: the caller is over a quota. gRPC's
            // table for HTTP statuses says UNAVAILABLE, which clients
            // take for a service that is down and retry at once (Envoy's
            // `rate_limited_as_resource_exhausted` makes the same choice).
            StatusCode::TOO_MANY_REQUESTS => "8",
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

/// Whether `req` asks for a protocol upgrade (WebSocket).
pub fn is_upgrade<B>(req: &Request<B>) -> bool {
    req.headers().contains_key(header::UPGRADE)
        && req
            .headers()
            .get(header::CONNECTION)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.to_ascii_lowercase().contains("upgrade"))
}
