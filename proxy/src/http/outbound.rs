//! Outbound: a client's request balanced over a service's endpoints.
//! [`serve`] names the service and records the request's end; `route` is
//! the retry loop, and each of its stages a function below it: admission,
//! the deadline, the pick context, one try and how it ended, the retry
//! gate (budget and breaker), the answer.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use hyper::body::Incoming;
use hyper::header::{HeaderMap, HeaderValue};
use hyper::{Request, Response, StatusCode};
use tokio::time::Instant;

use super::attempt::{self, Attempted, SendError, Target, until_retired};
use super::head::{Head, into_body};
use super::observe::{self, Observed};
use super::{
    ATTEMPTS_HEADER, Body, CONNECT_FAILED, ERROR_HEADER, is_grpc, is_upgrade, reply, shadow,
    tunnel, upgrade,
};
use crate::balance::{EndpointStats, PickContext, Picks, hash_bytes};
use crate::connector::ConnectError;
use crate::edge::{self, Refusal};
use crate::metrics::{
    Direction, FaultLabels, HedgeLabels, OverflowLabels, TimeoutKind, UpstreamLabels,
};
use crate::pool::{PoolBody, PoolError};
use crate::replay::ReplayBody;
use crate::resilience::breaker::{Gate, Overflow, Permit};
use crate::resilience::fault::{self, CompiledFault};
use crate::resilience::hedge::Hedge;
use crate::resilience::retry::{self, Outcome};
use crate::routes::{self, Chosen};
use crate::settings::Settings;
use crate::state::{DISCOVERY_WAIT, Proxy};
use crate::telemetry;
use crate::upstream::{Active, Clients, Full, HashKey, Upstream};

/// Balances `req` over `service` (or the service its Host names).
pub async fn serve(
    proxy: Arc<Proxy>,
    req: Request<Incoming>,
    service: Option<Arc<str>>,
    client: SocketAddr,
) -> Response<Body> {
    if req.method() == hyper::Method::CONNECT {
        return tunnel::serve(proxy, req, service, client).await;
    }
    let grpc = is_grpc(req.headers());
    if let Err(r) = edge::check(&req) {
        return observe::refuse(&proxy, r, grpc, client);
    }
    let name = match service {
        Some(s) => s,
        None => match service_named(&proxy, &req).await {
            Ok(s) => s,
            Err(r) => return observe::refuse(&proxy, r, grpc, client),
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
    let tapped = proxy
        .tap
        .wants(&name)
        .then(|| crate::tap::trace_id(req.headers()));
    let up = match proxy.upstream(&name) {
        Ok(up) => up,
        Err(Full) => return observe::refuse(&proxy, Refusal::TooManyUpstreams, grpc, client),
    };
    let (resp, routed) = match plan(&proxy, &up, &name, &req, started, grpc, client).await {
        Ok(mut plan) => {
            let copy = plan.copy.take();
            let call = Call {
                proxy: &proxy,
                up: &plan.up,
                name: &plan.name,
                grpc,
                client,
                span: &span,
            };
            let mut kept = None;
            let keep = copy.as_ref().map(|c| c.keep);
            let resp = route(&call, &plan, req, keep, &mut kept).await;
            let resp = match (copy, kept) {
                (Some(copy), Some((head, keeper))) => {
                    shadow::send(&proxy, copy, head, &keeper, started.into_std(), resp)
                }
                (Some(copy), None) => {
                    copy.shed(&proxy);
                    resp
                }
                (None, _) => resp,
            };
            (resp, plan.routed)
        }
        Err(resp) => (resp, None),
    };
    let routed = routed.as_ref().and_then(|(active, chosen)| {
        let (r, b) = active.routes.backend(*chosen)?;
        Some(observe::Routed {
            route: &r.name,
            backend: &b.label,
            traffic: b
                .traffic
                .get_or_init(|| proxy.traffic.backend_edge(&name, &b.label)),
        })
    });
    let observed = Observed {
        direction: Direction::Outbound,
        upstream: &name,
        counters: &up.requests,
        traffic: Some(up.traffic.get_or_init(|| proxy.traffic.edge(&name))),
        span: &span,
        method: &method,
        path,
        started: started.into_std(),
        routed,
        tapped,
    };
    observe::finish(&proxy, &observed, resp)
}

/// Where a request's tries go, decided once discovery has answered: the
/// service's endpoints, or the subset or other service its route's backend
/// names, under the route's own settings when it has them.
struct Plan {
    /// The upstream tries go to.
    up: Arc<Upstream>,
    /// Its name.
    name: Arc<str>,
    /// What tries pick from: `up`'s endpoints as of the plan.
    active: Arc<Active>,
    /// The subset balancer of `active` tries use, if routed to a subset.
    subset: Option<Chosen>,
    /// The route's settings, when it has its own.
    settings: Option<Arc<Settings>>,
    /// The fault of the service called, if any.
    fault: Option<Arc<CompiledFault>>,
    /// The route and backend that took the request, with their table.
    routed: Option<(Arc<Active>, Chosen)>,
    /// When the request starts counting (after the wait for discovery).
    started: Instant,
    /// The copy to send once the request has its answer, if it is mirrored.
    copy: Option<shadow::Copy>,
    /// The route's own hedging, if it has one.
    hedge: Option<Hedge>,
}

/// The plan for a request to `up` (named `name`).
async fn plan(
    proxy: &Arc<Proxy>,
    up: &Arc<Upstream>,
    name: &Arc<str>,
    req: &Request<Incoming>,
    started: Instant,
    grpc: bool,
    client: SocketAddr,
) -> Result<Plan, Response<Body>> {
    let pending = || reply(grpc, StatusCode::SERVICE_UNAVAILABLE, "discovery-pending");
    let Some(started) = discovered(up, started).await else {
        return Err(pending());
    };
    let active = up.active();
    let mut plan = Plan {
        up: up.clone(),
        name: name.clone(),
        active: active.clone(),
        subset: None,
        settings: None,
        fault: active.fault.clone(),
        routed: None,
        started,
        copy: None,
        hedge: None,
    };
    let taken = if active.routes.is_empty() {
        None
    } else {
        active
            .routes
            .choose(
                req.method(),
                req.uri().path(),
                req.headers(),
                rand::random(),
            )
            .and_then(|c| Some((c, active.routes.backend(c)?)))
    };
    // Mirrored per route: the diff report compares route by route.
    let route_name = taken.map_or("", |(_, (route, _))| &*route.name);
    plan.copy = copy(proxy, up, &active, name, route_name, req);
    let Some((chosen, (route, backend))) = taken else {
        return Ok(plan);
    };
    plan.settings = route.settings.clone();
    plan.hedge = route.hedge;
    if let routes::Target::Service(other) = &backend.target {
        let other_up = proxy
            .upstream(other)
            .map_err(|Full| observe::refuse(proxy, Refusal::TooManyUpstreams, grpc, client))?;
        let Some(started) = discovered(&other_up, started).await else {
            return Err(pending());
        };
        plan.started = started;
        plan.active = other_up.active();
        plan.up = other_up;
        plan.name = other.clone();
    } else {
        plan.subset = Some(chosen);
    }
    plan.routed = Some((active, chosen));
    Ok(plan)
}

/// The copy of a request to `up` the service's mirror wants; one whose
/// body cannot be copied is counted as shed.
fn copy(
    proxy: &Proxy,
    up: &Arc<Upstream>,
    active: &Arc<Active>,
    name: &str,
    route: &str,
    req: &Request<Incoming>,
) -> Option<shadow::Copy> {
    let m = active.mirror.as_ref()?;
    if !m.wants(rand::random()) {
        return None;
    }
    let counts = proxy.traffic.mirror(name, route, &m.label);
    // Shed at once when the copies in flight are at the cap already: the
    // body need not be kept for a copy that could not go.
    let full = up.mirrors_in_flight.current() >= m.max_in_flight;
    if full
        || m.fits(hyper::body::Body::size_hint(req.body()).exact())
            .is_err()
    {
        counts.shed();
        proxy.metrics.mirror_copy(name, "shed");
        return None;
    }
    Some(shadow::Copy {
        up: up.clone(),
        active: active.clone(),
        counts,
        keep: usize::try_from(m.max_body).unwrap_or(usize::MAX),
    })
}

/// The service a Host-routed request names, if the mesh knows it.
async fn service_named(proxy: &Proxy, req: &Request<Incoming>) -> Result<Arc<str>, Refusal> {
    match service_from_authority(req)? {
        Some(s) if proxy.knows(&s).await => Ok(Arc::from(s)),
        Some(_) => Err(Refusal::UnknownService),
        None => Err(Refusal::NoServiceInHost),
    }
}

/// The service a Host / `:authority` names: the host part, without port.
pub fn service_from_authority<B>(req: &Request<B>) -> Result<Option<String>, Refusal> {
    let from_uri = req.uri().authority().map(|a| a.host().to_ascii_lowercase());
    let from_header = req
        .headers()
        .get(hyper::header::HOST)
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
        return Err(Refusal::HostMismatch);
    }
    let Some(host) = from_uri.or(from_header) else {
        return Ok(None);
    };
    Ok(wayfinder_proto::validate::service_name(&host)
        .is_ok()
        .then_some(host))
}

/// One outbound request, as every stage of the loop needs it.
struct Call<'a> {
    proxy: &'a Proxy,
    up: &'a Arc<Upstream>,
    /// The service.
    name: &'a str,
    /// A gRPC call: the proxy's own answers are gRPC statuses.
    grpc: bool,
    /// The client's address (the `client-ip` hash key).
    client: SocketAddr,
    /// The request's client span; the next hop's is its child.
    span: &'a tracing::Span,
}

impl Call<'_> {
    /// An answer of the proxy's own.
    fn reply(&self, status: StatusCode, reason: &'static str) -> Response<Body> {
        reply(self.grpc, status, reason)
    }

    /// A slot under breaker `gate` (`limit` at once); a refusal is counted
    /// as `kind`.
    fn slot(&self, gate: &Arc<Gate>, limit: Option<u32>, kind: Overflow) -> Option<Permit> {
        let permit = gate.try_acquire(limit);
        if permit.is_none() {
            self.overflow(kind);
        }
        permit
    }

    /// Counts a request or retry a circuit breaker refused.
    fn overflow(&self, limit: Overflow) {
        self.proxy
            .metrics
            .overflows
            .get_or_create(&OverflowLabels {
                upstream: self.name.to_string(),
                limit,
            })
            .inc();
    }

    /// The labels of the upstream's retry counters (built only on retries).
    fn labels(&self) -> UpstreamLabels {
        UpstreamLabels {
            upstream: self.name.to_string(),
        }
    }

    /// Counts an injected fault of `kind`.
    fn injected(&self, kind: &'static str) {
        self.proxy
            .metrics
            .faults_injected
            .get_or_create(&FaultLabels {
                upstream: self.name.to_string(),
                kind,
            })
            .inc();
    }

    /// Counts a retry (or a try moved off a leaving endpoint).
    fn count_retry(&self) {
        self.proxy
            .metrics
            .retries
            .get_or_create(&self.labels())
            .inc();
    }
}

/// The retry loop: one try at a time on the balancer's next choice, until
/// one answers, the policy or the budget says stop, or the deadline passes.
///
/// A mirrored request's head and body keeper are left in `kept` for its
/// copy (its body kept up to `copy_keep` bytes).
async fn route(
    call: &Call<'_>,
    plan: &Plan,
    req: Request<Incoming>,
    copy_keep: Option<usize>,
    kept: &mut Option<(Head, ReplayBody)>,
) -> Response<Body> {
    let up = call.up;
    let started = plan.started;
    let active = plan.active.clone();
    let s = plan.settings.as_deref().unwrap_or(&active.settings);
    let Some(_in_flight) = admit(call, s) else {
        return call.reply(StatusCode::SERVICE_UNAVAILABLE, "overloaded");
    };
    let deadline = deadline(s, req.headers(), started);
    let ctx = pick_context(&active.hash_key, req.headers(), call.client);
    let mut choices = Choices::new(active.clone(), ctx, plan.subset);
    let clients = up.clients();
    if is_upgrade(&req) {
        let Some(i) = choices.next() else {
            return call.reply(StatusCode::SERVICE_UNAVAILABLE, "no-endpoints");
        };
        return upgrade::forward(req, choices.endpoint(i), &clients).await;
    }
    let hedge = plan
        .hedge
        .or(active.hedge)
        .filter(|_| retry::is_idempotent(req.method()));
    let keep = match hedge {
        Some(_) => copy_keep.unwrap_or(0).max(s.retry.max_body),
        None => copy_keep.unwrap_or(0),
    };
    let (head, body) = outgoing(call, s, req, keep);
    if copy_keep.is_some() {
        *kept = Some((head.clone(), body.keeper()));
    }
    let o = Outgoing {
        call,
        s,
        clients: &clients,
        head: &head,
        keeper: &body.keeper(),
        deadline,
    };
    let mut body = Some(body);
    up.budget.deposit();

    let mut attempt = 0u32;
    // Held from a retry's backoff to its end: the `max_active_retries` breaker.
    let mut _retrying = None;
    loop {
        attempt += 1;
        // Each try goes to another endpoint while there are untried ones.
        let Some(i) = choices.next() else {
            return call.reply(StatusCode::SERVICE_UNAVAILABLE, "no-endpoints");
        };
        // A hedged first try picks its stand-ins now, while the choices
        // can still change: then the tries race on a fixed set.
        let stand_ins = match hedge {
            Some(h) if attempt == 1 => stand_ins(&mut choices, i, h.max_extra),
            _ => Vec::new(),
        };
        let ep = choices.endpoint(i);
        let Some(this_body) = body.take() else {
            return call.reply(StatusCode::BAD_GATEWAY, "body-not-replayable");
        };
        let injected = plan.fault.as_ref().and_then(|f| {
            f.inject(
                &ep.id,
                head.uri.path(),
                &head.headers,
                fault::now_unix_ms(),
                fault::Rolls::random(),
            )
        });
        let delayed = injected.and_then(|i| i.delay);
        if let Some(delay) = delayed {
            call.injected("delay");
            let left = deadline.map_or(delay, |d| d.saturating_duration_since(Instant::now()));
            tokio::time::sleep(delay.min(left)).await;
        }
        let t = Try {
            ep,
            // After an injected delay the try starts now: its time limit is
            // what is left, and the endpoint is not charged for the wait.
            started: if attempt == 1 && delayed.is_none() {
                started
            } else {
                Instant::now()
            },
            movable: attempt < s.retry.max_attempts,
        };
        let (ended, ep) = match injected.and_then(|i| i.fail) {
            Some(failure) => (Some(fail_injected(call, failure)), ep),
            None => {
                let after = hedge
                    .and_then(|h| h.delay(&up.recent))
                    .filter(|_| !stand_ins.is_empty());
                let (waited, t) = match after {
                    Some(after) => {
                        let race = Race {
                            after,
                            stand_ins: &stand_ins,
                            choices: &choices,
                        };
                        hedged(&o, t, this_body, &race, &mut attempt).await
                    }
                    None => (try_endpoint(&o, &t, this_body, &choices).await, t),
                };
                // The first try's latency (a winning copy's is not the
                // upstream's answer time; a cancelled first try is recorded
                // in the race).
                if hedge.is_some() && Arc::ptr_eq(t.ep, ep) && matches!(waited, Waited::Done(Ok(_)))
                {
                    up.recent.record(t.started.elapsed());
                }
                let ended = match waited {
                    Waited::Moved => None,
                    Waited::TimedOut => Some(timed_out(&o, &t)),
                    Waited::Done(result) => Some(ended(&o, &t, result)),
                };
                (ended, t.ep)
            }
        };
        // Another try follows at once when this one moved off a leaving
        // endpoint, after a backoff when the policy retries what it got.
        let pause = match ended {
            None => {
                tracing::debug!(service = call.name, endpoint = %ep.id, "attempt moved: its endpoint left");
                Duration::ZERO
            }
            Some(Ended::Final(status, reason)) => return call.reply(status, reason),
            Some(Ended::Tried(outcome, answer)) => {
                // An injected failure is not the endpoint's doing.
                if !matches!(&answer, Answer::Local(_, fault::FAULT_INJECTED)) {
                    record(&o, ep, outcome);
                }
                let Some(permit) = retry_wanted(&o, outcome, attempt)
                    .then(|| retry_gate(call, s))
                    .flatten()
                else {
                    return respond(call, answer, attempt, ep);
                };
                _retrying = Some(permit);
                pause(attempt, s, deadline)
            }
        };
        call.count_retry();
        body = o.keeper.replay();
        choices.leave(ep.addr);
        if pause > Duration::ZERO {
            tokio::time::sleep(pause).await;
        }
        choices.renew(up);
    }
}

/// A try failed on purpose: an abort answers its status, a reset acts as
/// one; the retry policy then treats it as it would the real thing.
fn fail_injected(call: &Call<'_>, failure: fault::Failure) -> Ended {
    let (outcome, status, kind) = match failure {
        fault::Failure::Abort(status) => {
            (retry::classify(status, &HeaderMap::new()), status, "abort")
        }
        fault::Failure::Reset => (Outcome::Reset, StatusCode::BAD_GATEWAY, "reset"),
    };
    call.injected(kind);
    Ended::Tried(outcome, Answer::Local(status, fault::FAULT_INJECTED))
}

/// Admission: a slot under the `max_requests` breaker, held until the
/// request ends.
fn admit(call: &Call<'_>, s: &Settings) -> Option<Permit> {
    call.slot(
        &call.up.breakers.requests,
        s.breakers.max_requests,
        Overflow::Requests,
    )
}

/// What every try of one request shares.
struct Outgoing<'a> {
    call: &'a Call<'a>,
    /// The upstream's settings as of the request's start.
    s: &'a Settings,
    clients: &'a Clients,
    /// The request line and headers each try sends.
    head: &'a Head,
    /// Replays the body for another try, while it can.
    keeper: &'a ReplayBody,
    /// The whole request's deadline.
    deadline: Option<Instant>,
}

/// The request as tries send it: its head (the next hop's span a child of
/// this request's) and its body, kept for replay when retries are on.
/// A copy or a hedge may need more of the body kept (`keep`) than retries do.
fn outgoing(
    call: &Call<'_>,
    s: &Settings,
    req: Request<Incoming>,
    keep: usize,
) -> (Head, ReplayBody) {
    let (parts, body) = req.into_parts();
    let mut head = Head::new(parts);
    telemetry::inject(call.span, &mut head.headers);
    let retries = if s.retry.max_attempts > 1 {
        s.retry.max_body
    } else {
        0
    };
    (head, ReplayBody::new(body, keep.max(retries)))
}

/// One try on `t.ep`: sent, and waited for under its time limit (the
/// per-try timeout, or what is left of the deadline when that is sooner).
async fn try_endpoint(
    o: &Outgoing<'_>,
    t: &Try<'_>,
    body: ReplayBody,
    choices: &Choices,
) -> Waited {
    let (call, s) = (o.call, o.s);
    let to = Target {
        ep: t.ep,
        clients: o.clients,
        to_sidecar: t.ep.meshed,
        direction: Direction::Outbound,
        upstream: call.name,
    };
    let dispatched = AtomicBool::new(false);
    // An attempt is moved elsewhere at once when discovery retires its
    // endpoint meanwhile, if it may be repeated (idempotent, or not yet
    // handed to a connection), another endpoint is there to take it (a
    // draining instance may still answer: better than nothing) and the
    // budget pays.
    let may_leave = || {
        (retry::repeatable(&o.head.method, &s.retry) || !dispatched.load(Ordering::Relaxed))
            && o.keeper.replayable()
            && choices.another_than(call.up, t.ep)
            && call
                .up
                .budget
                .withdraw(s.retry.budget_ratio, s.retry.budget_min_per_sec)
    };
    // Pinned here, so the (large) send future is not moved into the
    // futures that wait on it.
    let sent = std::pin::pin!(attempt::send(
        &call.proxy.metrics,
        &to,
        o.head,
        body,
        &dispatched
    ));
    let left = o.deadline.map(|d| d.saturating_duration_since(t.started));
    let limit = match (s.timeouts.per_try, left) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    };
    let attempted = until_retired(sent, t.ep, t.movable, may_leave);
    let attempted = match limit {
        Some(limit) => match tokio::time::timeout(limit, attempted).await {
            Ok(a) => a,
            Err(_) => return Waited::TimedOut,
        },
        None => attempted.await,
    };
    match attempted {
        Attempted::Abandoned => Waited::Moved,
        Attempted::Done(r) => Waited::Done(r),
    }
}

/// After a try: a failure costs the endpoint as much as the slowest answer
/// we would wait for, so latency-aware balancers stop preferring a dead
/// endpoint whose failures are instant (and so look fast); a 429 costs as
/// much, so they prefer endpoints whose rate limit has room; outlier
/// detection hears every outcome.
fn record(o: &Outgoing<'_>, ep: &Arc<EndpointStats>, outcome: Outcome) {
    let s = o.s;
    // gRPC's RESOURCE_EXHAUSTED is the rate limit's answer to gRPC calls.
    if matches!(
        outcome,
        Outcome::ConnectFailed | Outcome::Reset | Outcome::RateLimited | Outcome::Grpc(8)
    ) {
        let penalty = s.timeouts.per_try.unwrap_or(s.timeouts.connect);
        ep.observe(penalty, std::time::Instant::now());
    }
    o.call.up.report(ep, outcome, s);
}

/// Whether the policy wants another try after `outcome` on try `attempt`:
/// tries and time are left, the outcome and method are retryable, and the
/// body can be sent again.
fn retry_wanted(o: &Outgoing<'_>, outcome: Outcome, attempt: u32) -> bool {
    let s = o.s;
    outcome != Outcome::Success
        && attempt < s.retry.max_attempts
        && o.deadline.is_none_or(|d| Instant::now() < d)
        && retry::retryable(outcome, &o.head.method, o.call.grpc, &s.retry)
        && o.keeper.replayable()
}

/// When the request starts counting: at once when the service's endpoints
/// are known; after the wait for its first discovery answer otherwise (the
/// deadline and first try start then); `None` when that never came.
async fn discovered(up: &Upstream, started: Instant) -> Option<Instant> {
    if up.is_ready() {
        Some(started)
    } else if up.wait_ready(DISCOVERY_WAIT).await {
        Some(Instant::now())
    } else {
        None
    }
}

/// The request's deadline: the policy's request timeout, or the client's
/// own gRPC deadline when that is sooner.
fn deadline(s: &Settings, headers: &HeaderMap, started: Instant) -> Option<Instant> {
    let grpc_deadline = headers
        .get("grpc-timeout")
        .and_then(|v| v.to_str().ok())
        .and_then(retry::grpc_timeout);
    match (s.timeouts.request, grpc_deadline) {
        (Some(a), Some(b)) => Some(started + a.min(b)),
        (a, b) => a.or(b).map(|d| started + d),
    }
}

/// What the balancer hashes, when the policy names a key.
fn pick_context(key: &HashKey, headers: &HeaderMap, client: SocketAddr) -> PickContext {
    PickContext {
        key: match key {
            HashKey::None => None,
            HashKey::Header(h) => headers.get(h.as_str()).map(|v| hash_bytes(v.as_bytes())),
            HashKey::ClientIp => Some(match client.ip() {
                IpAddr::V4(ip) => hash_bytes(&ip.octets()),
                IpAddr::V6(ip) => hash_bytes(&ip.octets()),
            }),
        },
    }
}

/// The endpoints tries pick from: the balancer's order over the request's
/// snapshot, renewed on a retry when discovery changed it meanwhile.
struct Choices {
    from: Arc<Active>,
    /// The route's subset, whose balancer tries pick from.
    subset: Option<Chosen>,
    picks: Picks,
    ctx: PickContext,
    /// Endpoints tried so far (written only when a request is retried).
    tried: Vec<SocketAddr>,
}

impl Choices {
    fn new(from: Arc<Active>, ctx: PickContext, subset: Option<Chosen>) -> Self {
        let picks = from.balancer_for(subset).pick(&ctx);
        Self {
            from,
            subset,
            picks,
            ctx,
            tried: Vec::new(),
        }
    }

    /// The next endpoint to try: the balancer's next choice not tried yet,
    /// or, once every endpoint was tried, its first choice again. Counted
    /// as one try (local or remote, when the balancer knows zones).
    fn next(&mut self) -> Option<usize> {
        let next = self.pick_next();
        if let Some(i) = next {
            self.count_try(i);
        }
        next
    }

    /// [`Self::next`] without counting a try: for stand-ins that may never be sent.
    fn pick_next(&mut self) -> Option<usize> {
        let balancer = self.from.balancer_for(self.subset);
        let eps = balancer.endpoints();
        match self.picks.find(|&i| !self.tried.contains(&eps[i].addr)) {
            Some(i) => Some(i),
            None => {
                self.picks = balancer.pick(&self.ctx);
                self.picks.next()
            }
        }
    }

    /// Counts a try on endpoint `i` (local or remote).
    fn count_try(&self, i: usize) {
        self.from.balancer_for(self.subset).count_try(i);
    }

    /// Endpoint `i` of the current set.
    fn endpoint(&self, i: usize) -> &Arc<EndpointStats> {
        &self.from.balancer_for(self.subset).endpoints()[i]
    }

    /// `addr` was tried: later tries go elsewhere while they can.
    fn leave(&mut self, addr: SocketAddr) {
        self.tried.push(addr);
    }

    /// Before a retry: picks from the upstream's current endpoints when
    /// discovery changed them since (an endpoint that left is not tried again).
    fn renew(&mut self, up: &Upstream) {
        let now = up.active();
        if !Arc::ptr_eq(&now, &self.from) {
            self.from = now;
            self.picks = self.from.balancer_for(self.subset).pick(&self.ctx);
        }
    }

    /// Whether the upstream now has an endpoint other than `ep` not tried yet.
    fn another_than(&self, up: &Upstream, ep: &EndpointStats) -> bool {
        up.active()
            .balancer_for(self.subset)
            .endpoints()
            .iter()
            .any(|e| e.addr != ep.addr && !self.tried.contains(&e.addr))
    }
}

/// Up to `n` endpoints a hedged first try on endpoint `first` may race
/// on: the balancer's next choices, each another endpoint.
fn stand_ins(choices: &mut Choices, first: usize, n: u32) -> Vec<usize> {
    let first_addr = choices.endpoint(first).addr;
    choices.leave(first_addr);
    let mut out = Vec::new();
    while out.len() < n as usize {
        match choices.pick_next() {
            Some(j) if !out.contains(&j) && choices.endpoint(j).addr != first_addr => {
                choices.leave(choices.endpoint(j).addr);
                out.push(j);
            }
            _ => break,
        }
    }
    out
}

/// What the tries of a hedged request race on.
struct Race<'c> {
    /// How long a try may go unanswered before a copy follows.
    after: Duration,
    /// The endpoints copies go to, in order.
    stand_ins: &'c [usize],
    choices: &'c Choices,
}

/// A hedged first try: `first` at once, then a copy to the next stand-in
/// each time `race.after` passes without an answer, while the body can be
/// sent again and the retry budget pays. The first answer wins and the
/// other tries are cancelled, their endpoints charged the time they had
/// taken (so peak-EWMA learns they are slow); a failure wins only when no
/// other try is left. Copies sent are added to `attempt`.
async fn hedged<'c>(
    o: &Outgoing<'_>,
    first: Try<'c>,
    body: ReplayBody,
    race: &Race<'c>,
    attempt: &mut u32,
) -> (Waited, Try<'c>) {
    use futures::StreamExt;
    let call = o.call;
    let s = o.s;
    let mut racing = futures::stream::FuturesUnordered::new();
    racing.push(raced(o, first, body, race.choices));
    let mut running = vec![first];
    let mut stand_ins = race.stand_ins.iter();
    let mut next_copy = Some(Instant::now() + race.after);
    let mut failed = None;
    let count = |result: &'static str| {
        call.proxy
            .metrics
            .hedges
            .get_or_create(&HedgeLabels {
                upstream: call.name.to_string(),
                result,
            })
            .inc();
    };
    loop {
        let due = async {
            match next_copy {
                Some(at) => tokio::time::sleep_until(at).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            ended = racing.next() => {
                let Some((waited, t)) = ended else {
                    break;
                };
                running.retain(|r| !Arc::ptr_eq(r.ep, t.ep));
                // A fast 5xx (or 429) from one try must not beat a slower
                // good answer from another.
                let answered = matches!(&waited, Waited::Done(Ok(r))
                    if retry::classify(r.status(), r.headers()) == Outcome::Success);
                let last = racing.is_empty() && next_copy.is_none();
                if !answered && !last {
                    failed = Some((waited, t));
                    continue;
                }
                let now = std::time::Instant::now();
                for loser in &running {
                    loser.ep.observe(loser.started.elapsed(), now);
                    // The first try's time so far is a floor of its latency:
                    // recorded, so a p95 `after` is not learnt from winners only.
                    if Arc::ptr_eq(loser.ep, first.ep) {
                        call.up.recent.record(loser.started.elapsed());
                    }
                }
                if *attempt > 1 {
                    count(if Arc::ptr_eq(t.ep, first.ep) { "lost" } else { "won" });
                }
                return (waited, t);
            }
            () = due => {
                next_copy = None;
                let Some(&j) = stand_ins.next() else {
                    continue;
                };
                // A body still streaming in cannot be sent twice yet.
                let Some(body) = o.keeper.replay_complete() else {
                    continue;
                };
                if !call.up.budget.withdraw(s.retry.budget_ratio, s.retry.budget_min_per_sec) {
                    count("no-budget");
                    continue;
                }
                let t = Try {
                    ep: race.choices.endpoint(j),
                    started: Instant::now(),
                    movable: false,
                };
                race.choices.count_try(j);
                *attempt += 1;
                running.push(t);
                racing.push(raced(o, t, body, race.choices));
                if stand_ins.len() > 0 {
                    next_copy = Some(Instant::now() + race.after);
                }
            }
        }
    }
    failed.unwrap_or((Waited::TimedOut, first))
}

/// One try of a race, with the try it was.
async fn raced<'c>(
    o: &Outgoing<'_>,
    t: Try<'c>,
    body: ReplayBody,
    choices: &'c Choices,
) -> (Waited, Try<'c>) {
    (try_endpoint(o, &t, body, choices).await, t)
}

/// One try's endpoint and clock.
#[derive(Clone, Copy)]
struct Try<'a> {
    ep: &'a Arc<EndpointStats>,
    started: Instant,
    /// Attempts are left: the try may move off an endpoint that leaves.
    movable: bool,
}

/// How waiting for one try ended.
// Holds a response for one try, on the stack: boxing it would allocate per request.
#[allow(clippy::large_enum_variant)]
enum Waited {
    /// Its endpoint left discovery; the try was given up, to be repeated elsewhere.
    Moved,
    /// The per-try timeout (or the deadline) passed first.
    TimedOut,
    /// The try ended by itself.
    Done(Result<Response<PoolBody>, SendError>),
}

/// How a try ended.
// Holds a response for one try, on the stack: boxing it would allocate per request.
#[allow(clippy::large_enum_variant)]
enum Ended {
    /// An outcome for the retry decision, and the answer if it is the last.
    Tried(Outcome, Answer),
    /// Nothing a retry would change (a bad request, a full breaker).
    Final(StatusCode, &'static str),
}

/// The answer a try would give the client: the endpoint's response, or
/// one of the proxy's own.
// Holds a response for one try, on the stack: boxing it would allocate per request.
#[allow(clippy::large_enum_variant)]
enum Answer {
    Upstream(Response<PoolBody>),
    Local(StatusCode, &'static str),
}

/// A try that timed out: it tells the balancer how slow the endpoint is.
fn timed_out(o: &Outgoing<'_>, t: &Try<'_>) -> Ended {
    let call = o.call;
    t.ep.observe(t.started.elapsed(), std::time::Instant::now());
    let whole = o.deadline.is_some_and(|d| Instant::now() >= d);
    let kind = if whole {
        TimeoutKind::Request
    } else {
        TimeoutKind::PerTry
    };
    call.proxy.metrics.timeout(call.name, kind);
    Ended::Tried(
        Outcome::TimedOut,
        Answer::Local(StatusCode::GATEWAY_TIMEOUT, "timeout"),
    )
}

/// Classifies a try's result for the retry decision.
fn ended(o: &Outgoing<'_>, t: &Try<'_>, result: Result<Response<PoolBody>, SendError>) -> Ended {
    let call = o.call;
    // The client's body broke (malformed chunking, cut off): whatever the
    // endpoint did with it, the request is at fault; no retry, and
    // nothing held against the endpoint.
    if result.is_err() && o.keeper.client_failed() {
        return Ended::Final(StatusCode::BAD_REQUEST, "bad-request-body");
    }
    // The upstream's sidecars are reached over mTLS.
    let mtls = o.clients.mesh.is_some();
    match result {
        Err(e) => {
            let (status, reason) = e.reply();
            let outcome = match &e {
                SendError::BadRequest | SendError::HeadersTooLarge => {
                    return Ended::Final(status, reason);
                }
                SendError::Client(PoolError::Connect(ConnectError::Overflow(o))) => {
                    call.overflow(*o);
                    return Ended::Final(status, reason);
                }
                SendError::Client(PoolError::Connect(ConnectError::Timeout)) => {
                    call.proxy.metrics.timeout(call.name, TimeoutKind::Connect);
                    Outcome::ConnectFailed
                }
                SendError::Client(PoolError::Connect(_) | PoolError::Handshake(_)) => {
                    Outcome::ConnectFailed
                }
                SendError::Client(PoolError::Http(_)) => Outcome::Reset,
            };
            Ended::Tried(outcome, Answer::Local(status, reason))
        }
        Ok(mut resp) => {
            // Only sidecars speak for the mesh (a peer's inbound strips
            // what its app says under that prefix): an endpoint without
            // one has its `x-wayfinder-*` headers dropped.
            if !t.ep.meshed {
                edge::strip_mesh_headers(resp.headers_mut());
            }
            // A peer sidecar that could not reach its app: the request
            // never reached an application, so it is safe to retry, even
            // a POST. Believed only over mTLS, where no one but that
            // sidecar can have said it.
            let peer_connect_failed = resp.status() == StatusCode::BAD_GATEWAY
                && t.ep.meshed
                && mtls
                && resp
                    .headers()
                    .get(ERROR_HEADER)
                    .is_some_and(|v| v == CONNECT_FAILED);
            let outcome = if peer_connect_failed {
                Outcome::ConnectFailed
            } else {
                retry::classify(resp.status(), resp.headers())
            };
            Ended::Tried(outcome, Answer::Upstream(resp))
        }
    }
}

/// Whether a retry may go: the budget pays for it and the
/// `max_active_retries` breaker has room (its permit is held until the
/// retry ends). A refusal is counted.
fn retry_gate(call: &Call<'_>, s: &Settings) -> Option<Permit> {
    let up = call.up;
    if !up
        .budget
        .withdraw(s.retry.budget_ratio, s.retry.budget_min_per_sec)
    {
        call.proxy
            .metrics
            .budget_exhausted
            .get_or_create(&call.labels())
            .inc();
        return None;
    }
    call.slot(
        &up.breakers.retries,
        s.breakers.max_active_retries,
        Overflow::Retries,
    )
}

/// The backoff before retry number `attempt`, never past the deadline.
fn pause(attempt: u32, s: &Settings, deadline: Option<Instant>) -> Duration {
    let pause = retry::backoff(attempt, s.retry.backoff_base, s.retry.backoff_max);
    match deadline {
        Some(d) => pause.min(d.saturating_duration_since(Instant::now())),
        None => pause,
    }
}

/// The client's answer: the last try's, with the attempts it took (in a
/// header and on the span).
fn respond(call: &Call<'_>, answer: Answer, attempt: u32, ep: &EndpointStats) -> Response<Body> {
    let mut resp = match answer {
        Answer::Upstream(r) => into_body(r),
        Answer::Local(status, reason) => call.reply(status, reason),
    };
    resp.headers_mut()
        .insert(ATTEMPTS_HEADER, HeaderValue::from(attempt));
    // Only for the tap: an extension costs an allocation per request.
    if call.proxy.tap.active() {
        resp.extensions_mut()
            .insert(observe::AnsweredBy(ep.id.clone()));
    }
    if !call.span.is_none() {
        call.span.record("wayfinder.endpoint", &*ep.id);
        call.span.record("wayfinder.attempts", attempt);
        call.span.record("wayfinder.retries", attempt - 1);
    }
    resp
}
