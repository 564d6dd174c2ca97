//! What crosses the mesh's edges: requests from apps and clients, answers
//! from apps. Each is checked for what the proxy relies on (one Host, a
//! `Connection` header that names only hop-by-hop fields, no tunnels), its
//! path normalised so authorization sees what the app will see, and
//! stripped of what it may not claim (the mesh's own `x-wayfinder-*`
//! signals, identity headers only the inbound sidecar may set).

use std::borrow::Cow;

use hyper::header::{self, HeaderMap, HeaderName, HeaderValue};
use hyper::{Method, Request, StatusCode};

/// Prefix of the headers the mesh speaks in, trusted only from sidecars.
pub const MESH_PREFIX: &str = "x-wayfinder-";

/// Header the inbound sidecar sets to the caller's authenticated identity,
/// in Envoy's `x-forwarded-client-cert` form (`URI=spiffe://…`).
pub const CLIENT_CERT_HEADER: &str = "x-forwarded-client-cert";

/// Identity-looking headers a caller may not set: only the inbound sidecar
/// says who called, from the mTLS handshake.
const IDENTITY_HEADERS: [&str; 4] = [
    CLIENT_CERT_HEADER,
    "l5d-client-id",
    "l5d-server-id",
    "x-client-cert",
];
/// Headers a TLS-terminating proxy sets about the client certificate.
const SSL_CLIENT_PREFIX: &str = "x-ssl-client-";

/// End-to-end fields a `Connection` header may not name: dropping them as
/// hop-by-hop would change the request the proxy routes or authorizes.
const PROTECTED: [HeaderName; 5] = [
    header::HOST,
    header::CONTENT_LENGTH,
    header::CONTENT_TYPE,
    header::AUTHORIZATION,
    header::COOKIE,
];

/// Why a request is refused at the edge.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Refusal {
    /// More than one Host header: the proxy and the app could each read another.
    DuplicateHost,
    /// `Connection` names an end-to-end field (e.g. `Connection: host`).
    ConnectionNamesEndToEnd,
    /// CONNECT asks for a tunnel the target's policy does not allow (or
    /// arrives where tunnels never go: inbound, or to an address).
    Tunnel,
    /// A path whose meaning servers disagree on (encoded slash or
    /// backslash, a raw backslash, broken percent-encoding, `..;`).
    AmbiguousPath,
    /// The request's URI names one host and its `Host` header another.
    HostMismatch,
    /// Host routing to a name neither the catalog nor `--upstream` knows.
    UnknownService,
    /// Host routing with no service name in the Host (none, or an address:
    /// a Host never makes the sidecar dial an address of the client's choosing).
    NoServiceInHost,
    /// A new upstream would pass `--max-upstreams` (none is idle enough to
    /// have been evicted).
    TooManyUpstreams,
}

impl Refusal {
    /// The status answered.
    pub fn status(self) -> StatusCode {
        match self {
            Refusal::Tunnel => StatusCode::METHOD_NOT_ALLOWED,
            Refusal::UnknownService => StatusCode::NOT_FOUND,
            Refusal::TooManyUpstreams => StatusCode::SERVICE_UNAVAILABLE,
            _ => StatusCode::BAD_REQUEST,
        }
    }

    /// The `x-wayfinder-error` reason (also the metric and log label).
    pub fn as_str(self) -> &'static str {
        match self {
            Refusal::DuplicateHost => "duplicate-host",
            Refusal::ConnectionNamesEndToEnd => "connection-names-end-to-end-header",
            Refusal::Tunnel => "connect-not-allowed",
            Refusal::AmbiguousPath => "ambiguous-path",
            Refusal::HostMismatch => "host-mismatch",
            Refusal::UnknownService => "unknown-service",
            Refusal::NoServiceInHost => "no-service-in-host",
            Refusal::TooManyUpstreams => "upstream-limit",
        }
    }
}

/// Why a connection is refused before any request (counted in
/// `wayfinder_proxy_inbound_refused_total`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ConnRefusal {
    /// Plaintext to a strict (mTLS-only) inbound.
    Plaintext,
    /// An mTLS handshake that failed, timed out or named no workload.
    Handshake,
    /// An opaque connection authorization denies.
    Forbidden,
}

impl ConnRefusal {
    /// The metric and log label.
    pub fn as_str(self) -> &'static str {
        match self {
            ConnRefusal::Plaintext => "plaintext",
            ConnRefusal::Handshake => "handshake",
            ConnRefusal::Forbidden => "forbidden",
        }
    }
}

/// Checks a request arriving from an app or a peer before it is routed.
pub fn check<B>(req: &Request<B>) -> Result<(), Refusal> {
    if req.method() == Method::CONNECT {
        return Err(Refusal::Tunnel);
    }
    let headers = req.headers();
    let mut hosts = headers.get_all(header::HOST).iter();
    if hosts.next().is_some() && hosts.next().is_some() {
        return Err(Refusal::DuplicateHost);
    }
    if headers.contains_key(header::CONNECTION) {
        let names_protected = headers
            .get_all(header::CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .filter_map(|n| HeaderName::from_bytes(n.trim().as_bytes()).ok())
            .any(|n| PROTECTED.contains(&n) || n.as_str().starts_with(MESH_PREFIX));
        if names_protected {
            return Err(Refusal::ConnectionNamesEndToEnd);
        }
    }
    Ok(())
}

/// Removes the mesh's own headers: what an app or client sends under that
/// prefix is not the mesh speaking.
pub fn strip_mesh_headers(headers: &mut HeaderMap) {
    remove_prefixed(headers, MESH_PREFIX);
}

fn remove_prefixed(headers: &mut HeaderMap, prefix: &str) {
    // Most messages carry none: look before allocating anything.
    if !headers.keys().any(|k| k.as_str().starts_with(prefix)) {
        return;
    }
    let names: Vec<HeaderName> = headers
        .keys()
        .filter(|k| k.as_str().starts_with(prefix))
        .cloned()
        .collect();
    for n in names {
        headers.remove(n);
    }
}

/// Inbound, before the app: identity headers from the caller are removed
/// and, when mTLS said who called, the one authenticated header is set.
pub fn set_caller(headers: &mut HeaderMap, caller: Option<&str>) {
    for h in IDENTITY_HEADERS {
        headers.remove(h);
    }
    // The nginx family (`x-ssl-client-s-dn`, `x-ssl-client-i-dn`, ...).
    remove_prefixed(headers, SSL_CLIENT_PREFIX);
    if let Some(id) = caller.and_then(|c| HeaderValue::from_str(&format!("URI={c}")).ok()) {
        headers.insert(CLIENT_CERT_HEADER, id);
    }
}

fn hex(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

fn unreserved(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~')
}

/// The path as the app will read it, for authorization and forwarding:
/// percent-encoded unreserved characters decoded (`%2e` is `.`, other
/// escapes keep their form, in upper case), repeated slashes merged, `.` and
/// `..` segments resolved (RFC 3986 §5.2.4; `..` never climbs above `/`).
/// Encoded slashes and backslashes, raw backslashes and broken escapes are
/// refused: servers disagree on what they mean (Envoy's
/// `path_with_escaped_slashes_action: REJECT_REQUEST`).
pub fn normalize_path(path: &str) -> Result<Cow<'_, str>, Refusal> {
    if path.is_empty() {
        return Ok(Cow::Borrowed("/"));
    }
    if !path.starts_with('/') {
        // `*` (OPTIONS *) and the like: nothing to resolve.
        return Ok(Cow::Borrowed(path));
    }
    let plain = !path.contains(['%', '\\']) && !path.contains("//") && !path.contains("/.");
    if plain {
        return Ok(Cow::Borrowed(path));
    }
    // Decode what may be decoded.
    let bytes = path.as_bytes();
    let mut decoded = String::with_capacity(path.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'\\' => return Err(Refusal::AmbiguousPath),
            b'%' => {
                let (Some(h), Some(l)) = (
                    bytes.get(i + 1).copied().and_then(hex),
                    bytes.get(i + 2).copied().and_then(hex),
                ) else {
                    return Err(Refusal::AmbiguousPath);
                };
                let b = h * 16 + l;
                if b == b'/' || b == b'\\' {
                    return Err(Refusal::AmbiguousPath);
                }
                if unreserved(b) {
                    decoded.push(char::from(b));
                } else {
                    decoded.push_str(&format!("%{b:02X}"));
                }
                i += 3;
            }
            _ => {
                // Up to the next escape, as it is: a run may hold multi-byte
                // characters, which are text, not one character per byte.
                let end = bytes[i..]
                    .iter()
                    .position(|&b| b == b'%' || b == b'\\')
                    .map_or(bytes.len(), |n| i + n);
                decoded.push_str(&path[i..end]);
                i = end;
            }
        }
    }
    // Resolve segments.
    let mut out: Vec<&str> = Vec::new();
    let segments: Vec<&str> = decoded.split('/').skip(1).collect();
    let last = segments.len().saturating_sub(1);
    let mut trailing = false;
    for (n, seg) in segments.iter().enumerate() {
        // `..;x` is `..` to Tomcat and Spring (path parameters), a name
        // to us: servers disagree, so it is refused.
        if let Some((head, _)) = seg.split_once(';')
            && (head == "." || head == "..")
        {
            return Err(Refusal::AmbiguousPath);
        }
        match *seg {
            "" => trailing = n == last,
            "." => trailing = n == last,
            ".." => {
                out.pop();
                trailing = n == last;
            }
            s => {
                out.push(s);
                trailing = false;
            }
        }
    }
    let mut norm = String::with_capacity(decoded.len());
    for s in &out {
        norm.push('/');
        norm.push_str(s);
    }
    if trailing || out.is_empty() {
        norm.push('/');
    }
    Ok(Cow::Owned(norm))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn norm(p: &str) -> Result<String, Refusal> {
        normalize_path(p).map(|c| c.into_owned())
    }

    #[test]
    fn dot_segments_and_their_encodings_resolve_before_authorization() {
        assert_eq!(norm("/public/../admin"), Ok("/admin".into()));
        assert_eq!(norm("/public/%2e%2e/admin"), Ok("/admin".into()));
        assert_eq!(norm("/public/%2E%2e/admin"), Ok("/admin".into()));
        assert_eq!(norm("/public/./a/./b"), Ok("/public/a/b".into()));
        assert_eq!(norm("//public///a"), Ok("/public/a".into()));
        assert_eq!(
            norm("/../../etc"),
            Ok("/etc".into()),
            "never above the root"
        );
        assert_eq!(norm("/a/b/.."), Ok("/a/".into()));
        assert_eq!(norm("/a/"), Ok("/a/".into()));
        assert_eq!(norm("/%70ublic/x"), Ok("/public/x".into()));
        assert_eq!(norm("/a%20b"), Ok("/a%20b".into()), "other escapes stay");
        assert_eq!(norm("/a%3fb"), Ok("/a%3Fb".into()));
        assert_eq!(norm("/.well-known/x"), Ok("/.well-known/x".into()));
        assert_eq!(norm(""), Ok("/".into()));
        assert!(matches!(
            normalize_path("/plain/path"),
            Ok(Cow::Borrowed(_))
        ));
    }

    #[test]
    fn encoded_slashes_and_backslashes_are_refused() {
        for p in [
            "/public/..%2fadmin",
            "/public/%2F..",
            "/public\\..\\admin",
            "/a%5cb",
            "/a%zz",
            "/a%2",
            "/public/..;/admin",
            "/public/.;x/admin",
            "/public/%2e%2e;jsessionid=1/admin",
        ] {
            assert_eq!(norm(p), Err(Refusal::AmbiguousPath), "{p}");
        }
        // Path parameters on ordinary segments are the app's business.
        assert_eq!(norm("/public/a;v=1/b").as_deref(), Ok("/public/a;v=1/b"));
    }

    #[test]
    fn characters_beyond_ascii_are_kept_as_they_are() {
        // Found by fuzz/fuzz_targets/authz_path.rs
        // (fuzz/regressions/authz_path/): each byte of a multi-byte
        // character was pushed as a character of its own, so `é` reached
        // authorization and the app as `Ã©`, and again as `Ã\u{83}Â©`.
        assert_eq!(
            norm("/a/.wel\u{ed}knOwn/x/b/."),
            Ok("/a/.wel\u{ed}knOwn/x/b/".into())
        );
        assert_eq!(norm("/caf\u{e9}/./x%41"), Ok("/caf\u{e9}/xA".into()));
        assert_eq!(
            norm("//\u{1f600}/%2e%2E/\u{1f600}"),
            Ok("/\u{1f600}".into())
        );
        let uri: hyper::Uri = "/caf\u{e9}//men\u{fc}"
            .parse()
            .expect("http takes UTF-8 paths");
        assert_eq!(norm(uri.path()), Ok("/caf\u{e9}/men\u{fc}".into()));
    }

    #[test]
    fn edge_checks_refuse_what_the_proxy_relies_on() {
        let req = |f: &dyn Fn(hyper::http::request::Builder) -> hyper::http::request::Builder| {
            f(Request::builder().uri("/")).body(()).expect("request")
        };
        assert_eq!(check(&req(&|b| b.header("host", "web"))), Ok(()));
        assert_eq!(
            check(&req(&|b| b.header("host", "web").header("host", "admin"))),
            Err(Refusal::DuplicateHost)
        );
        assert_eq!(
            check(&req(&|b| b.header("connection", "keep-alive, host"))),
            Err(Refusal::ConnectionNamesEndToEnd)
        );
        assert_eq!(
            check(&req(&|b| b.header("connection", "x-wayfinder-attempts"))),
            Err(Refusal::ConnectionNamesEndToEnd)
        );
        assert_eq!(
            check(&req(&|b| b.header("connection", "keep-alive"))),
            Ok(())
        );
        assert_eq!(
            check(&req(&|b| b.method("CONNECT").uri("web:80"))),
            Err(Refusal::Tunnel)
        );
    }

    #[test]
    fn callers_cannot_claim_an_identity_or_speak_for_the_mesh() {
        let mut h = HeaderMap::new();
        h.insert(
            "x-wayfinder-error",
            HeaderValue::from_static("connect-failed"),
        );
        h.insert("l5d-client-id", HeaderValue::from_static("admin"));
        h.insert(
            CLIENT_CERT_HEADER,
            HeaderValue::from_static("URI=spiffe://x/svc/admin"),
        );
        h.insert("x-other", HeaderValue::from_static("kept"));
        h.insert("x-ssl-client-s-dn", HeaderValue::from_static("CN=admin"));
        strip_mesh_headers(&mut h);
        set_caller(&mut h, Some("spiffe://wayfinder.local/svc/client"));
        assert!(h.get("x-wayfinder-error").is_none());
        assert!(h.get("l5d-client-id").is_none());
        assert!(h.get("x-ssl-client-s-dn").is_none());
        assert_eq!(
            h.get(CLIENT_CERT_HEADER).and_then(|v| v.to_str().ok()),
            Some("URI=spiffe://wayfinder.local/svc/client")
        );
        assert_eq!(h.get("x-other").and_then(|v| v.to_str().ok()), Some("kept"));
        set_caller(&mut h, None);
        assert!(h.get(CLIENT_CERT_HEADER).is_none(), "plaintext: nobody");
    }

    proptest::proptest! {
        /// Whatever comes in, what comes out has no dot segment, no empty
        /// segment but a trailing one, starts with `/`, and is stable.
        #[test]
        fn normalised_paths_are_canonical(p in "/[a-z./%2eEfF5c\\\\]{0,24}") {
            if let Ok(n) = normalize_path(&p) {
                proptest::prop_assert!(n.starts_with('/'));
                let inner = n.trim_end_matches('/');
                for seg in inner.split('/').skip(1) {
                    proptest::prop_assert!(seg != "." && seg != ".." && !seg.is_empty(), "{n}");
                }
                let again = normalize_path(&n).map(|c| c.into_owned());
                proptest::prop_assert_eq!(again, Ok(n.to_string()));
            }
        }
    }
}
