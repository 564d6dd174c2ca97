//! The outbound request path, from a client's request to an endpoint's
//! response: breakers, deadline, endpoint choice, attempts with per-try
//! timeouts, retries under the policy and the retry budget, and outlier
//! reports. One function, [`outbound`], read top to bottom.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use hyper::body::Incoming;
use hyper::header::HeaderValue;
use hyper::{Request, Response, StatusCode};
use tokio::time::Instant;

use crate::balance::{EndpointStats, PickContext, Picks, hash_bytes};
use crate::connector::ConnectError;
use crate::http_proxy::{
    Body, DISCOVERY_WAIT, ERROR_HEADER, Head, Proxy, SendError, forward_upgrade, into_body,
    is_grpc, is_upgrade, reply, service_from_authority,
};
use crate::metrics::{OverflowLabels, UpstreamLabels};
use crate::pool::{PoolBody, PoolError};
use crate::replay::ReplayBody;
use crate::resilience::breaker::Overflow;
use crate::resilience::retry::{self, Outcome};
use crate::upstream::{Active, HashKey, Upstream};
use crate::{edge, telemetry};

/// Response header: how many attempts the request took.
pub const ATTEMPTS_HEADER: &str = "x-wayfinder-attempts";

/// How an attempt ended: a response to pass on, or an answer of our own.
// On the stack for one attempt; boxing the response would allocate per request.
#[allow(clippy::large_enum_variant)]
enum Attempt {
    Upstream(Response<PoolBody>),
    Local(StatusCode, &'static str),
}

/// How waiting for an attempt's response ended.
#[allow(clippy::large_enum_variant)]
enum Attempted {
    /// The attempt ended by itself.
    Done(Result<Response<PoolBody>, SendError>),
    /// Its endpoint left discovery and the attempt was given up, to be
    /// repeated elsewhere.
    Abandoned,
}

/// The next endpoint to try: the balancer's next choice not tried yet, or,
/// once every endpoint was tried, its first choice again.
fn next_endpoint(
    from: &Active,
    picks: &mut Picks,
    ctx: &PickContext,
    tried: &[SocketAddr],
) -> Option<usize> {
    let eps = from.balancer.endpoints();
    if let Some(i) = picks.find(|&i| !tried.contains(&eps[i].addr)) {
        return Some(i);
    }
    *picks = from.balancer.pick(ctx);
    picks.next()
}

/// Before a retry: picks from the upstream's current endpoints when
/// discovery changed them since (an endpoint that left is not tried again).
fn renew(up: &Upstream, from: &mut Arc<Active>, picks: &mut Picks, ctx: &PickContext) {
    let now = up.active();
    if !Arc::ptr_eq(&now, from) {
        *from = now;
        *picks = from.balancer.pick(ctx);
    }
}

/// Waits for `sent`; when `movable` (attempts are left) and `ep` is retired
/// meanwhile and `may_leave` agrees (the request may be repeated, the body
/// can be replayed, the budget pays), gives the attempt up. Dropping it
/// resets the HTTP/2 stream (or closes the HTTP/1 connection); other
/// requests keep waiting for their answer.
async fn until_retired<F>(
    mut sent: std::pin::Pin<&mut F>,
    ep: &EndpointStats,
    movable: bool,
    may_leave: impl FnOnce() -> bool,
) -> Attempted
where
    F: std::future::Future<Output = Result<Response<PoolBody>, SendError>>,
{
    if !movable {
        return Attempted::Done(sent.await);
    }
    tokio::select! {
        biased;
        r = &mut sent => return Attempted::Done(r),
        () = ep.leaving() => {}
    }
    if may_leave() {
        Attempted::Abandoned
    } else {
        Attempted::Done(sent.await)
    }
}

/// Balances `req` over `service` (or the service its Host names).
pub async fn outbound(
    proxy: Arc<Proxy>,
    req: Request<Incoming>,
    service: Option<Arc<str>>,
    client: SocketAddr,
) -> Response<Body> {
    if req.method() == hyper::Method::CONNECT {
        return crate::opaque::tunnel(proxy, req, service, client).await;
    }
    let grpc = is_grpc(req.headers());
    if let Err(r) = edge::check(&req) {
        return proxy.refuse_request(r, grpc, client);
    }
    let name = match service {
        Some(s) => s,
        None => match service_from_authority(&req) {
            Ok(Some(s)) if proxy.knows(&s).await => Arc::from(s),
            Ok(Some(_)) => {
                return proxy.refuse_request(edge::Refusal::UnknownService, grpc, client);
            }
            Ok(None) => {
                return proxy.refuse_request(edge::Refusal::NoServiceInHost, grpc, client);
            }
            Err(r) => return proxy.refuse_request(r, grpc, client),
        },
    };
    // The one clock read for the request: its deadline, its first try and
    // its duration all start here.
    let started = Instant::now();
    // Clones share the request's buffers: nothing is copied per request.
    let (method, uri) = (req.method().clone(), req.uri().clone());
    let path = uri.path();
    let span = telemetry::span(
        telemetry::Kind::Client,
        &name,
        method.as_str(),
        path,
        req.headers(),
    );
    let up = proxy.upstream(&name);
    let resp = route(&proxy, &up, req, &name, (grpc, client, started), &span).await;
    proxy.finish(
        ("outbound", &name, &up.requests),
        Some(up.traffic.get_or_init(|| proxy.traffic.edge(&name))),
        &span,
        (&method, path),
        started.into_std(),
        resp,
    )
}

async fn route(
    proxy: &Arc<Proxy>,
    up: &Arc<Upstream>,
    req: Request<Incoming>,
    name: &str,
    (grpc, client, started): (bool, SocketAddr, Instant),
    span: &tracing::Span,
) -> Response<Body> {
    // A request that waited for the service's first discovery answer
    // starts its deadline and first try after the wait.
    let started = if up.is_ready() {
        started
    } else if up.wait_ready(DISCOVERY_WAIT).await {
        Instant::now()
    } else {
        return reply(grpc, StatusCode::SERVICE_UNAVAILABLE, "discovery-pending");
    };
    let active = up.active();
    let s = &active.settings;
    let overflow = |limit: Overflow| {
        proxy
            .metrics
            .overflows
            .get_or_create(&OverflowLabels {
                upstream: name.to_string(),
                limit: limit.label(),
            })
            .inc();
    };
    let Some(_in_flight) = up.breakers.requests.try_acquire(s.breakers.max_requests) else {
        overflow(Overflow::Requests);
        return reply(grpc, StatusCode::SERVICE_UNAVAILABLE, "overloaded");
    };

    // The deadline: the policy's request timeout, or the client's own gRPC
    // deadline when that is sooner.
    let grpc_deadline = req
        .headers()
        .get("grpc-timeout")
        .and_then(|v| v.to_str().ok())
        .and_then(retry::grpc_timeout);
    let deadline = match (s.timeouts.request, grpc_deadline) {
        (Some(a), Some(b)) => Some(started + a.min(b)),
        (a, b) => a.or(b).map(|d| started + d),
    };

    let ctx = PickContext {
        key: match &active.hash_key {
            HashKey::None => None,
            HashKey::Header(h) => req
                .headers()
                .get(h.as_str())
                .map(|v| hash_bytes(v.as_bytes())),
            HashKey::ClientIp => Some(match client.ip() {
                IpAddr::V4(ip) => hash_bytes(&ip.octets()),
                IpAddr::V6(ip) => hash_bytes(&ip.octets()),
            }),
        },
    };
    // The endpoint set tries pick from: the request's snapshot, renewed on
    // a retry when discovery changed it meanwhile.
    let mut from = active.clone();
    let mut picks = from.balancer.pick(&ctx);
    let clients = up.clients();

    if is_upgrade(&req) {
        let Some(i) = picks.next() else {
            return reply(grpc, StatusCode::SERVICE_UNAVAILABLE, "no-endpoints");
        };
        return forward_upgrade(req, &from.balancer.endpoints()[i], &clients).await;
    }

    let (parts, body) = req.into_parts();
    let mut head = Head::new(parts);
    // The next hop's span is a child of this request's client span.
    telemetry::inject(span, &mut head.headers);
    let limit = if s.retry.max_attempts > 1 {
        s.retry.max_body
    } else {
        0
    };
    let body = ReplayBody::new(body, limit);
    let keeper = body.keeper();
    let mut body = Some(body);
    up.budget.deposit();
    // Only retries use it: no allocation on requests that succeed at once.
    let labels = || UpstreamLabels {
        upstream: name.to_string(),
    };

    let mut attempt = 0u32;
    // Held from a retry's backoff to its end: the `max_active_retries` breaker.
    let mut _retrying = None;
    // Endpoints tried so far (written only when a request is retried).
    let mut tried: Vec<SocketAddr> = Vec::new();
    let dispatched = std::sync::atomic::AtomicBool::new(false);
    loop {
        attempt += 1;
        // Each try goes to another endpoint while there are untried ones.
        let Some(i) = next_endpoint(&from, &mut picks, &ctx, &tried) else {
            return reply(grpc, StatusCode::SERVICE_UNAVAILABLE, "no-endpoints");
        };
        let ep = &from.balancer.endpoints()[i];
        let Some(this_body) = body.take() else {
            return reply(grpc, StatusCode::BAD_GATEWAY, "body-not-replayable");
        };
        let try_started = if attempt == 1 {
            started
        } else {
            Instant::now()
        };
        let left = deadline.map(|d| d.saturating_duration_since(try_started));
        let try_limit = match (s.timeouts.per_try, left) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        dispatched.store(false, std::sync::atomic::Ordering::Relaxed);
        let result = {
            // Pinned here, so the (large) send future is not moved into the
            // futures that wait on it.
            let sent = std::pin::pin!(proxy.send(
                &clients,
                &head,
                this_body,
                ep,
                ep.meshed,
                ("outbound", name),
                &dispatched,
            ));
            // An attempt is moved elsewhere at once when discovery retires its
            // endpoint meanwhile, if it may be repeated (idempotent, or not yet
            // handed to a connection), another endpoint is there to take it (a
            // draining instance may still answer: better than nothing) and the
            // budget pays.
            let attempted = until_retired(sent, ep, attempt < s.retry.max_attempts, || {
                (retry::repeatable(&head.method, &s.retry)
                    || !dispatched.load(std::sync::atomic::Ordering::Relaxed))
                    && keeper.replayable()
                    && up
                        .active()
                        .balancer
                        .endpoints()
                        .iter()
                        .any(|e| e.addr != ep.addr && !tried.contains(&e.addr))
                    && up
                        .budget
                        .withdraw(s.retry.budget_ratio, s.retry.budget_min_per_sec)
            });
            match try_limit {
                Some(t) => tokio::time::timeout(t, attempted).await.ok(),
                None => Some(attempted.await),
            }
        };
        let result = match result {
            Some(Attempted::Abandoned) => {
                tracing::debug!(service = name, endpoint = %ep.id, "attempt moved: its endpoint left");
                proxy.metrics.retries.get_or_create(&labels()).inc();
                body = keeper.replay();
                tried.push(ep.addr);
                renew(up, &mut from, &mut picks, &ctx);
                continue;
            }
            Some(Attempted::Done(r)) => Some(r),
            None => None,
        };
        let (outcome, answer) = match result {
            None => {
                // A timed-out try tells the balancer how slow the endpoint is.
                ep.observe(try_started.elapsed(), std::time::Instant::now());
                let whole = deadline.is_some_and(|d| Instant::now() >= d);
                proxy
                    .metrics
                    .timeout(name, if whole { "request" } else { "per_try" });
                (
                    Outcome::TimedOut,
                    Attempt::Local(StatusCode::GATEWAY_TIMEOUT, "timeout"),
                )
            }
            Some(Err(e)) => {
                let (status, reason) = e.reply();
                let outcome = match &e {
                    SendError::BadRequest => {
                        return reply(grpc, status, reason);
                    }
                    SendError::Client(PoolError::Connect(ConnectError::Overflow(o))) => {
                        overflow(*o);
                        return reply(grpc, status, reason);
                    }
                    SendError::Client(PoolError::Connect(ConnectError::Timeout)) => {
                        proxy.metrics.timeout(name, "connect");
                        Outcome::ConnectFailed
                    }
                    SendError::Client(PoolError::Connect(_) | PoolError::Handshake(_)) => {
                        Outcome::ConnectFailed
                    }
                    SendError::Client(PoolError::Http(_)) => Outcome::Reset,
                };
                (outcome, Attempt::Local(status, reason))
            }
            Some(Ok(mut resp)) => {
                // Only sidecars speak for the mesh (a peer's inbound strips
                // what its app says under that prefix): an endpoint without
                // one has its `x-wayfinder-*` headers dropped.
                if !ep.meshed {
                    edge::strip_mesh_headers(resp.headers_mut());
                }
                // A peer sidecar that could not reach its app: the request
                // never reached an application, so it is safe to retry, even
                // a POST. Believed only over mTLS, where no one but that
                // sidecar can have said it.
                let peer_connect_failed = resp.status() == StatusCode::BAD_GATEWAY
                    && ep.meshed
                    && clients.mesh.is_some()
                    && resp
                        .headers()
                        .get(ERROR_HEADER)
                        .is_some_and(|v| v == "connect-failed");
                let outcome = if peer_connect_failed {
                    Outcome::ConnectFailed
                } else {
                    retry::classify(resp.status(), resp.headers())
                };
                (outcome, Attempt::Upstream(resp))
            }
        };
        if matches!(outcome, Outcome::ConnectFailed | Outcome::Reset) {
            // A failure costs the endpoint as much as the slowest answer we
            // would wait for, so latency-aware balancers stop preferring a
            // dead endpoint whose failures are instant (and so look fast).
            let penalty = s.timeouts.per_try.unwrap_or(s.timeouts.connect);
            ep.observe(penalty, std::time::Instant::now());
        }
        up.report(ep, outcome, s);

        if outcome != Outcome::Success
            && attempt < s.retry.max_attempts
            && deadline.is_none_or(|d| Instant::now() < d)
            && retry::retryable(outcome, &head.method, grpc, &s.retry)
            && keeper.replayable()
        {
            if !up
                .budget
                .withdraw(s.retry.budget_ratio, s.retry.budget_min_per_sec)
            {
                proxy
                    .metrics
                    .budget_exhausted
                    .get_or_create(&labels())
                    .inc();
            } else if let Some(permit) = up
                .breakers
                .retries
                .try_acquire(s.breakers.max_active_retries)
            {
                _retrying = Some(permit);
                body = keeper.replay();
                proxy.metrics.retries.get_or_create(&labels()).inc();
                let mut pause = retry::backoff(attempt, s.retry.backoff_base, s.retry.backoff_max);
                if let Some(d) = deadline {
                    pause = pause.min(d.saturating_duration_since(Instant::now()));
                }
                drop(answer);
                tried.push(ep.addr);
                if pause > Duration::ZERO {
                    tokio::time::sleep(pause).await;
                }
                renew(up, &mut from, &mut picks, &ctx);
                continue;
            } else {
                overflow(Overflow::Retries);
            }
        }

        let mut resp = match answer {
            Attempt::Upstream(r) => into_body(r),
            Attempt::Local(status, reason) => reply(grpc, status, reason),
        };
        resp.headers_mut()
            .insert(ATTEMPTS_HEADER, HeaderValue::from(attempt));
        if !span.is_none() {
            span.record("wayfinder.endpoint", &*ep.id);
            span.record("wayfinder.attempts", attempt);
            span.record("wayfinder.retries", attempt - 1);
        }
        return resp;
    }
}
