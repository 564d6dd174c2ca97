//! What the proxy itself does to a request head, before and around
//! hyper: the edge checks (`edge::check`), Host routing's service name
//! (`outbound::service_from_authority`), the inbound path rewrite
//! (`edge::normalize_path` + `head::with_path`), the head kept for every
//! attempt (`Head::new`: hop-by-hop and mesh headers stripped), its HTTP/2
//! header list size, the request each attempt sends (`Head::request`, to a
//! sidecar over HTTP/2 or to an app over HTTP/1.1), and the caller's
//! identity header (`edge::set_caller`).
//!
//! Input: an HTTP/1 request head as hyper's server parses it (httparse),
//! or, after a first byte 0, an HTTP/2-like head of `\n`-separated fields:
//! method, path, authority (may be empty), then `name: value` lines, taken
//! where the http crate accepts them (as h2 does).

#![no_main]

use hyper::header::{self, HeaderName, HeaderValue};
use hyper::{Method, Request, Uri, Version};
use libfuzzer_sys::fuzz_target;
use wayfinder_proxy::balance::EndpointStats;
use wayfinder_proxy::edge::{self, CLIENT_CERT_HEADER, MESH_PREFIX};
use wayfinder_proxy::http::head::{Head, with_path};
use wayfinder_proxy::http::outbound::service_from_authority;
use wayfinder_proxy::http::{is_grpc, is_upgrade};
use wayfinder_proxy::replay::ReplayBody;
use wayfinder_proxy::resilience::retry::grpc_timeout;

fuzz_target!(|data: &[u8]| {
    let req = match data.split_first() {
        Some((0, fields)) => http2(fields),
        _ => http1(data),
    };
    if let Some(req) = req {
        head(req);
    }
});

/// An HTTP/1 head as hyper's server takes it.
fn http1(data: &[u8]) -> Option<Request<()>> {
    let mut headers = [httparse::EMPTY_HEADER; 100];
    let mut parsed = httparse::Request::new(&mut headers);
    if !parsed.parse(data).ok()?.is_complete() {
        return None;
    }
    let mut req = Request::builder()
        .method(Method::from_bytes(parsed.method?.as_bytes()).ok()?)
        .uri(parsed.path?.parse::<Uri>().ok()?)
        .version(match parsed.version? {
            0 => Version::HTTP_10,
            _ => Version::HTTP_11,
        });
    for h in parsed.headers.iter() {
        req = req.header(
            HeaderName::from_bytes(h.name.as_bytes()).ok()?,
            HeaderValue::from_bytes(h.value).ok()?,
        );
    }
    req.body(()).ok()
}

/// An HTTP/2 head: its pseudo-headers and fields, one a line.
fn http2(data: &[u8]) -> Option<Request<()>> {
    let mut lines = data.split(|&b| b == b'\n');
    let method = Method::from_bytes(lines.next()?).ok()?;
    let path = lines.next()?;
    let authority = lines.next().unwrap_or_default();
    let uri = if authority.is_empty() {
        Uri::try_from(path).ok()?
    } else {
        let mut full = b"http://".to_vec();
        full.extend_from_slice(authority);
        full.extend_from_slice(path);
        Uri::try_from(full).ok()?
    };
    let mut req = Request::builder()
        .method(method)
        .uri(uri)
        .version(Version::HTTP_2);
    for line in lines {
        let Some(colon) = line.iter().position(|&b| b == b':') else {
            continue;
        };
        let (name, value) = (&line[..colon], line[colon + 1..].trim_ascii());
        if let (Ok(n), Ok(v)) = (HeaderName::from_bytes(name), HeaderValue::from_bytes(value)) {
            req = req.header(n, v);
        }
    }
    req.body(()).ok()
}

fn head(req: Request<()>) {
    let _ = is_grpc(req.headers());
    let _ = is_upgrade(&req);
    let _ = edge::check(&req);
    let _ = service_from_authority(&req);
    if let Some(Ok(v)) = req.headers().get("grpc-timeout").map(HeaderValue::to_str) {
        let _ = grpc_timeout(v);
    }
    if let Ok(path) = edge::normalize_path(req.uri().path())
        && let Some(uri) = with_path(req.uri(), &path)
    {
        assert_eq!(uri.path(), path, "with_path sets the path");
        assert_eq!(uri.query(), req.uri().query(), "with_path keeps the query");
    }

    let (parts, ()) = req.into_parts();
    let te_trailers = parts
        .headers
        .get(header::TE)
        .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"trailers"));
    let head = Head::new(parts);
    stripped(&head, te_trailers);
    let _ = head.list_size();

    let ep = EndpointStats::new("e", ([10, 0, 0, 1], 8080).into(), 1);
    for to_sidecar in [true, false] {
        let Ok((mut sent, h2)) = head.request(ReplayBody::empty(), &ep, to_sidecar) else {
            continue;
        };
        if h2 {
            assert_eq!(sent.version(), Version::HTTP_2);
            assert_eq!(
                sent.uri().authority().map(|a| a.as_str()),
                Some("10.0.0.1:8080"),
                "HTTP/2: the endpoint as authority"
            );
        } else {
            assert_eq!(sent.version(), Version::HTTP_11);
            assert!(sent.uri().authority().is_none(), "HTTP/1: origin form");
            assert!(sent.headers().contains_key(header::HOST), "HTTP/1: a Host");
        }
        let caller = "spiffe://wayfinder.local/svc/client";
        edge::set_caller(sent.headers_mut(), Some(caller));
        let certs: Vec<_> = sent.headers().get_all(CLIENT_CERT_HEADER).iter().collect();
        assert_eq!(certs.len(), 1, "one identity header");
        assert_eq!(certs[0].as_bytes(), format!("URI={caller}").as_bytes());
        assert!(!sent.headers().contains_key("l5d-client-id"));
    }
}

/// What `Head::new` promises: no hop-by-hop header (but `te: trailers`,
/// kept for gRPC) and none of the mesh's own.
fn stripped(head: &Head, te_trailers: bool) {
    for name in [
        header::CONNECTION,
        header::TRANSFER_ENCODING,
        header::UPGRADE,
        header::PROXY_AUTHORIZATION,
        header::PROXY_AUTHENTICATE,
        header::TRAILER,
    ] {
        assert!(!head.headers.contains_key(&name), "{name} kept");
    }
    for name in ["keep-alive", "proxy-connection"] {
        assert!(!head.headers.contains_key(name), "{name} kept");
    }
    match head.headers.get(header::TE) {
        None => {}
        Some(te) => assert!(te_trailers && te == "trailers", "te: {te:?} kept"),
    }
    assert!(
        head.headers
            .keys()
            .all(|k| !k.as_str().starts_with(MESH_PREFIX)),
        "a mesh header kept"
    );
}
