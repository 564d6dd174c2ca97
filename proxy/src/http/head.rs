//! What crosses a hop of a request: its head (request line and end-to-end
//! headers) kept for every attempt, hop-by-hop headers removed both ways,
//! and the target's form for HTTP/1 or HTTP/2.

use http_body_util::BodyExt;
use hyper::header::{self, HeaderMap, HeaderName, HeaderValue};
use hyper::{Method, Request, Response, Uri, Version};

use super::{Body, ORIG_PROTO};
use crate::balance::EndpointStats;
use crate::edge;
use crate::pool::PoolBody;
use crate::replay::ReplayBody;

/// Headers that describe one hop, never forwarded (RFC 9110 §7.6.1), plus
/// whatever the `Connection` header lists.
pub(crate) fn strip_hop_by_hop(headers: &mut HeaderMap) {
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

/// `uri` with its path replaced (its query kept).
pub fn with_path(uri: &Uri, path: &str) -> Option<Uri> {
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
pub(crate) fn to_http1<B>(
    req: &mut Request<B>,
    ep: &EndpointStats,
) -> Result<(), hyper::http::Error> {
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

/// What is sent of a request on every attempt: the request line and headers
/// (hop-by-hop ones removed), kept so a retry can rebuild the request.
#[derive(Clone)]
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

/// The largest header list (RFC 9113 §6.5.2: names, values and 32 bytes
/// per field) a sidecar's HTTP/2 server takes, hyper's default, and what
/// the proxy checks before sending a request over HTTP/2.
pub const MAX_HEADER_LIST: usize = 16 * 1024;

impl Head {
    /// The request's header list size as HTTP/2 counts it, pseudo-headers
    /// included (the authority at most an endpoint's address).
    pub fn list_size(&self) -> usize {
        let fields: usize = self
            .headers
            .iter()
            .map(|(k, v)| k.as_str().len() + v.len() + 32)
            .sum();
        let pseudo = self.method.as_str().len() + self.uri.path().len() + 64 + 4 * 32;
        fields + pseudo + self.uri.query().map_or(0, str::len)
    }

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
    pub fn request(
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

/// An upstream response with hop-by-hop headers removed, as the proxy's body type.
pub fn into_body(resp: Response<PoolBody>) -> Response<Body> {
    let (mut parts, body) = resp.into_parts();
    strip_hop_by_hop(&mut parts.headers);
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
