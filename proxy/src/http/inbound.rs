//! Inbound: a request from another sidecar (or a client of the app's
//! port) checked at the edge, its path normalised, authorized by the
//! service's policy, and handed to the local app.

use std::borrow::Cow;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::Instant;

use hyper::body::Incoming;
use hyper::header::{HeaderValue, RETRY_AFTER};
use hyper::{Request, Response, StatusCode, Version};

use super::attempt::{self, Target};
use super::head::{Head, into_body, with_path};
use super::observe::{self, Observed};
use super::shadow::MIRROR_HEADER;
use super::{Body, ORIG_PROTO, RATE_LIMITED, error, is_grpc, is_upgrade, reply, upgrade};
use crate::metrics::Direction;
use crate::replay::ReplayBody;
use crate::resilience::rate_limit;
use crate::state::Proxy;
use crate::{authz, edge, telemetry};

/// Hands `req` (from `caller`, when mTLS says who) to the local app.
pub async fn serve(
    proxy: Arc<Proxy>,
    mut req: Request<Incoming>,
    caller: Option<Arc<str>>,
    peer: SocketAddr,
) -> Response<Body> {
    let Some(app) = proxy.app.clone() else {
        return error(StatusCode::NOT_FOUND, "no-app");
    };
    let grpc = is_grpc(req.headers());
    if let Err(r) = edge::check(&req) {
        return observe::refuse(&proxy, r, grpc, peer);
    }
    // Authorization sees the path the app will see: the normalised one,
    // which is also what the app gets.
    match edge::normalize_path(req.uri().path()) {
        Err(r) => return observe::refuse(&proxy, r, grpc, peer),
        Ok(Cow::Owned(path)) => {
            let Some(uri) = with_path(req.uri(), &path) else {
                return observe::refuse(&proxy, edge::Refusal::AmbiguousPath, grpc, peer);
            };
            *req.uri_mut() = uri;
        }
        Ok(Cow::Borrowed(_)) => {}
    }
    let path = req.uri().path();
    let ask = if is_upgrade(&req) {
        authz::Ask::Upgrade(path)
    } else {
        authz::Ask::Http(req.method().as_str(), path)
    };
    if !proxy.authorized(caller.as_deref(), ask).await {
        proxy.metrics.forbidden.inc();
        if proxy.first_time("forbidden") {
            tracing::warn!(
                caller = caller.as_deref().unwrap_or("(no identity)"),
                method = %req.method(),
                path = %req.uri().path(),
                "request forbidden by authorization (logged once; see wayfinder_proxy_forbidden_total)"
            );
        }
        let resp = reply(grpc, StatusCode::FORBIDDEN, "forbidden");
        return observe::count(&proxy, Direction::Inbound, "app", &proxy.app_requests, resp);
    }
    // After authorization: a caller that may not call spends no tokens.
    if let Err(wait) = proxy.admit_inbound(&caller) {
        let mut resp = reply(grpc, StatusCode::TOO_MANY_REQUESTS, RATE_LIMITED);
        resp.headers_mut().insert(
            RETRY_AFTER,
            HeaderValue::from(rate_limit::retry_after_secs(wait)),
        );
        return observe::count(&proxy, Direction::Inbound, "app", &proxy.app_requests, resp);
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
        &proxy.local.service,
        method.as_str(),
        path,
        req.headers(),
    );
    let resp = if is_upgrade(&req) {
        upgrade::forward(req, &app, &proxy.app_clients).await
    } else {
        let (parts, body) = req.into_parts();
        // A copy from a mirroring sidecar stays marked for the app; only a
        // sidecar (an mTLS peer) may say so.
        let mirrored =
            caller.is_some() && parts.headers.get(MIRROR_HEADER).is_some_and(|v| v == "1");
        let mut head = Head::new(parts);
        if mirrored {
            head.headers
                .insert(MIRROR_HEADER, HeaderValue::from_static("1"));
        }
        telemetry::inject(&span, &mut head.headers);
        let to = Target {
            ep: &app,
            clients: &proxy.app_clients,
            to_sidecar: false,
            direction: Direction::Inbound,
            upstream: "app",
        };
        let dispatched = AtomicBool::new(false);
        match attempt::send(
            &proxy.metrics,
            &to,
            &head,
            ReplayBody::new(body, 0),
            &dispatched,
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
    let observed = Observed {
        direction: Direction::Inbound,
        upstream: "app",
        counters: &proxy.app_requests,
        traffic: None,
        span: &span,
        method: &method,
        path,
        started,
        routed: None,
        tapped: None,
    };
    observe::finish(&proxy, &observed, resp)
}
