//! One upstream service as the sidecar sees it: its endpoints, their health,
//! its policy and the balancer built over the eligible ones.
//!
//! Requests read an `Arc<Active>` (one atomic clone under a read lock);
//! discovery updates rebuild it. Endpoint stats (in flight, latency) survive
//! rebuilds as long as the endpoint keeps its address and weight.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use serde::Serialize;
use tokio::sync::watch;
use tokio::time::Instant;
use wayfinder_proto::v1::ServicePolicy;

use crate::balance::locality::{Counters, Layout};
use crate::balance::{self, Balancer, EndpointStats, Kind, Zoned, slow_start};
use crate::connector::{Connector, Limits, Tls};
use crate::discovery::{self, Discovered, Update};
use crate::identity::{ALPN_H1, ALPN_H2, ALPN_TCP, Identity};
use crate::metrics::{HealthLabels, LocalityLabels, ProxyMetrics, UpstreamLabels};
use crate::mirror::CompiledMirror;
use crate::pool::{Pool, Proto};
use crate::resilience::breaker::{Breakers, Gate};
use crate::resilience::budget::RetryBudget;
use crate::resilience::fault::CompiledFault;
use crate::resilience::hedge::{Hedge, Recent};
use crate::resilience::retry::Outcome;
use crate::resilience::{health_check, outlier};
use crate::routes::{Chosen, Compile, RouteTable, Target};
use crate::settings::{self, Defaults, Origin, Settings};

/// What requests use: the balancer over eligible endpoints and the settings
/// resolved from the policy.
pub struct Active {
    /// Balancer (its endpoints are the eligible ones).
    pub balancer: Box<dyn Balancer>,
    /// Policy in force, if any.
    pub policy: Option<ServicePolicy>,
    /// The policy resolved against the sidecar's defaults.
    pub settings: Settings,
    /// What a pick hashes; `None` unless the balancer hashes.
    pub hash_key: HashKey,
    /// The policy's routes, with a balancer per subset.
    pub routes: RouteTable,
    /// The fault callers inject, if the policy sets one.
    pub fault: Option<Arc<CompiledFault>>,
    /// Where copies of the calls go, if the policy mirrors them.
    pub mirror: Option<CompiledMirror>,
    /// When a slow first try gets a copy, if the policy hedges.
    pub hedge: Option<Hedge>,
}

impl Active {
    /// The balancer a request routed to `chosen` picks from: its subset's,
    /// or the whole service's.
    pub fn balancer_for(&self, chosen: Option<Chosen>) -> &dyn Balancer {
        match chosen.and_then(|c| self.routes.backend(c)) {
            Some((_, b)) => match &b.target {
                Target::Subset(s) => s.as_ref(),
                Target::Service(_) => self.balancer.as_ref(),
            },
            None => self.balancer.as_ref(),
        }
    }
}

/// What hash balancers hash, resolved once per rebuild so requests to other
/// balancers compute nothing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HashKey {
    /// The balancer does not hash.
    None,
    /// The client's address.
    ClientIp,
    /// A request header.
    Header(String),
}

/// Connection pools of one upstream, sharing its connector (and so its
/// connection breaker and connect timeout).
pub struct Clients {
    /// HTTP/1.1 to plain endpoints.
    pub h1: Pool,
    /// HTTP/2: to sidecars, and to endpoints for HTTP/2 clients.
    pub h2: Pool,
    /// HTTP/2 over mTLS to sidecars, when this sidecar has an identity.
    pub mesh: Option<Pool>,
    /// HTTP/1.1 over mTLS to sidecars, for upgrades (WebSocket).
    pub mesh_h1: Option<Pool>,
    idle: Duration,
}

impl Clients {
    /// Closes every pooled connection to `addr` (see [`Pool::retire`]).
    pub fn retire(&self, addr: SocketAddr) {
        for pool in [
            Some(&self.h1),
            Some(&self.h2),
            self.mesh.as_ref(),
            self.mesh_h1.as_ref(),
        ]
        .into_iter()
        .flatten()
        {
            pool.retire(addr);
        }
    }
}

impl Clients {
    /// Pools whose connections close after `idle` unused; `mesh` are the
    /// mTLS connectors (ALPN h2, http/1.1) to the service's sidecars.
    pub fn new(connector: Connector, idle: Duration, mesh: Option<(Connector, Connector)>) -> Self {
        let (mesh, mesh_h1) = match mesh {
            Some((h2, h1)) => (Some(h2), Some(h1)),
            None => (None, None),
        };
        Self {
            h1: Pool::new(connector.clone(), Proto::Http1, idle),
            h2: Pool::new(connector, Proto::Http2, idle),
            mesh: mesh.map(|c| Pool::new(c, Proto::Http2, idle)),
            mesh_h1: mesh_h1.map(|c| Pool::new(c, Proto::Http1, idle)),
            idle,
        }
    }
}

struct Known {
    found: Discovered,
    stats: Arc<EndpointStats>,
    check: health_check::State,
}

/// What one discovery source last said.
#[derive(Default)]
struct Set {
    endpoints: BTreeMap<String, Known>,
    answered: bool,
}

struct Inner {
    /// By `Origin as usize`: each source's view is kept, so switching the
    /// source (the policy's `discovery`) needs no re-discovery.
    sets: [Set; 2],
    policy: Option<ServicePolicy>,
}

/// One upstream service.
pub struct Upstream {
    name: String,
    default_kind: Kind,
    default_origin: Origin,
    defaults: Defaults,
    inner: Mutex<Inner>,
    active: RwLock<Arc<Active>>,
    ready: watch::Sender<bool>,
    origin: watch::Sender<Origin>,
    /// Retry budget, kept across policy changes.
    pub budget: RetryBudget,
    /// Circuit breaker counters.
    pub breakers: Arc<Breakers>,
    /// Copies of its calls in flight (the mirror's `max_in_flight`).
    pub mirrors_in_flight: Arc<Gate>,
    /// Its recent latency, for hedges that wait for a quantile.
    pub recent: Recent,
    limits: Arc<Limits>,
    clients: RwLock<Arc<Clients>>,
    metrics: ProxyMetrics,
    identity: Option<Arc<Identity>>,
    /// Outbound requests to this service by status class.
    pub requests: crate::metrics::RequestCounters,
    /// Its counts for the dashboard's traffic report, once it has traffic.
    pub traffic: std::sync::OnceLock<crate::traffic::EdgeCounts>,
    /// Set by every use; the idle sweep ([`Upstreams::sweep`]) clears it.
    used: AtomicBool,
    /// Started for a listener or the local service: never evicted.
    pinned: AtomicBool,
    /// Set when evicted: its discovery and health checks stop.
    closed: watch::Sender<bool>,
    /// The last control-plane event applied: its version and when.
    applied: Mutex<Option<(u64, std::time::SystemTime)>>,
}

/// An endpoint as `/endpoints` shows it.
#[derive(Serialize)]
pub struct EndpointView {
    id: String,
    addr: String,
    weight: u32,
    labels: BTreeMap<String, String>,
    meshed: bool,
    /// Health as discovery reports it.
    healthy: bool,
    /// Health as active checks see it (true when not checked).
    checked_healthy: bool,
    /// Out of rotation by outlier detection.
    ejected: bool,
    in_flight: u32,
    ewma_ms: f64,
    /// Its zone ("" unknown).
    zone: String,
    /// Its share factor under slow start now: from 0.1 when it joins to 1
    /// (warm) at the window's end.
    slow_start: f64,
}

/// Keeps an endpoint's stats and check history when only its health changed.
/// What stops serving (turned unhealthy, or replaced by another address)
/// goes to `leaving`. What joins at `joined` (new, or serving again) starts
/// its slow start then; `None` for the first answer, whose endpoints were
/// there before the sidecar.
fn known(
    prev: Option<Known>,
    d: Discovered,
    leaving: &mut Vec<Arc<EndpointStats>>,
    joined: Option<Instant>,
) -> Known {
    match prev {
        Some(k)
            if k.found.addr == d.addr
                && k.found.weight == d.weight
                && k.found.meshed == d.meshed =>
        {
            if k.found.healthy && !d.healthy {
                leaving.push(k.stats.clone());
            }
            if let (false, true, Some(now)) = (k.found.healthy, d.healthy, joined) {
                k.stats.rejoined(now);
            }
            Known {
                found: d,
                stats: k.stats,
                check: k.check,
            }
        }
        prev => {
            leaving.extend(prev.map(|k| k.stats));
            let stats = EndpointStats::with_mesh(d.id.clone(), d.addr, d.weight, d.meshed);
            if let (true, Some(now)) = (d.healthy, joined) {
                stats.rejoined(now);
            }
            Known {
                stats,
                found: d,
                check: health_check::State::default(),
            }
        }
    }
}

/// `plain` with mTLS to the sidecars of `service`, offering `alpn`.
fn mesh_connector(
    plain: &Connector,
    identity: Option<&Arc<Identity>>,
    service: &str,
    alpn: &[u8],
) -> Option<Connector> {
    let id = identity?;
    let name = id.server_name(service)?;
    Some(plain.clone().with_tls(Tls {
        connector: tokio_rustls::TlsConnector::from(id.client_config(alpn)),
        name,
    }))
}

/// The HTTP/2 and HTTP/1.1 mTLS connectors to the sidecars of `service`.
fn mesh_connectors(
    plain: &Connector,
    identity: Option<&Arc<Identity>>,
    service: &str,
) -> Option<(Connector, Connector)> {
    Some((
        mesh_connector(plain, identity, service, ALPN_H2)?,
        mesh_connector(plain, identity, service, ALPN_H1)?,
    ))
}

fn origin_of(policy: Option<&ServicePolicy>, default: Origin) -> Origin {
    policy
        .and_then(|p| Origin::from_wire(p.discovery))
        .unwrap_or(default)
}

fn kind_of(policy: Option<&ServicePolicy>, default: Kind) -> Kind {
    policy
        .and_then(|p| Kind::from_wire(p.balancer))
        .unwrap_or(default)
}

impl Upstream {
    /// An upstream with no endpoints yet, using `default_origin` for its
    /// endpoints unless its policy names another.
    pub fn new(
        name: &str,
        default_kind: Kind,
        default_origin: Origin,
        defaults: Defaults,
        metrics: ProxyMetrics,
        identity: Option<Arc<Identity>>,
    ) -> Arc<Self> {
        let settings = Settings::resolve(None, default_origin, &defaults);
        let breakers = Arc::new(Breakers::default());
        let limits = Arc::new(Limits::default());
        limits.set(&settings);
        let plain = Connector::new(breakers.clone(), limits.clone());
        let mesh = mesh_connectors(&plain, identity.as_ref(), name);
        let clients = Clients::new(plain, settings.timeouts.idle, mesh);
        Arc::new(Self {
            name: name.to_string(),
            default_kind,
            default_origin,
            defaults,
            inner: Mutex::new(Inner {
                sets: Default::default(),
                policy: None,
            }),
            active: RwLock::new(Arc::new(Active {
                balancer: balance::build(default_kind, Vec::new()),
                policy: None,
                settings,
                hash_key: HashKey::None,
                routes: RouteTable::default(),
                fault: None,
                mirror: None,
                hedge: None,
            })),
            ready: watch::channel(false).0,
            origin: watch::channel(default_origin).0,
            budget: RetryBudget::new(),
            breakers,
            mirrors_in_flight: Arc::default(),
            recent: Recent::default(),
            limits,
            clients: RwLock::new(Arc::new(clients)),
            metrics,
            identity,
            requests: Default::default(),
            traffic: Default::default(),
            used: AtomicBool::new(true),
            pinned: AtomicBool::new(false),
            closed: watch::channel(false).0,
            applied: Mutex::new(None),
        })
    }

    /// Marks the upstream used (it is not idle). A load first, so that
    /// requests do not all write one shared cache line.
    fn touch(&self) {
        if !self.used.load(Ordering::Relaxed) {
            self.used.store(true, Ordering::Relaxed);
        }
    }

    /// Whether a request is in flight to it.
    fn busy(&self) -> bool {
        self.breakers.requests.current() > 0 || self.breakers.retries.current() > 0
    }

    /// Completes once the upstream is evicted; its tasks end with it.
    pub async fn closed(&self) {
        let mut rx = self.closed.subscribe();
        let _ = rx.wait_for(|c| *c).await;
    }

    /// Every endpoint id it knows, from any source (their metric series go
    /// when it is evicted).
    pub(crate) fn endpoint_ids(&self) -> Vec<String> {
        let inner = self.lock();
        let mut ids: Vec<_> = inner
            .sets
            .iter()
            .flat_map(|s| s.endpoints.keys().cloned())
            .collect();
        ids.sort();
        ids.dedup();
        ids
    }

    /// Where the endpoints in use come from.
    pub fn origin(&self) -> Origin {
        *self.origin.borrow()
    }

    /// Waits until the endpoints in use come from `origin`.
    pub async fn wait_origin(&self, origin: Origin) {
        let mut rx = self.origin.subscribe();
        let _ = rx.wait_for(|o| *o == origin).await;
    }

    /// Service name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The current balancer and policy.
    pub fn active(&self) -> Arc<Active> {
        self.active
            .read()
            .map_or_else(|p| p.into_inner().clone(), |a| a.clone())
    }

    /// The HTTP clients for this upstream's endpoints.
    pub fn clients(&self) -> Arc<Clients> {
        self.clients
            .read()
            .map_or_else(|p| p.into_inner().clone(), |c| c.clone())
    }

    /// A connector for opaque relays, under the same breakers and timeout.
    pub fn connector(&self) -> Connector {
        Connector::new(self.breakers.clone(), self.limits.clone())
    }

    /// A connector for opaque relays to the service's sidecars, over mTLS;
    /// `None` without an identity.
    pub fn mesh_tcp_connector(&self) -> Option<Connector> {
        mesh_connector(
            &self.connector(),
            self.identity.as_ref(),
            &self.name,
            ALPN_TCP,
        )
    }

    /// Whether the first discovery answer arrived.
    pub fn is_ready(&self) -> bool {
        *self.ready.borrow()
    }

    /// Waits up to `limit` for the first discovery answer.
    pub async fn wait_ready(&self, limit: Duration) -> bool {
        // The common case, without a subscription and a timer per request.
        if self.is_ready() {
            return true;
        }
        let mut rx = self.ready.subscribe();
        tokio::time::timeout(limit, rx.wait_for(|r| *r))
            .await
            .is_ok()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Applies one change from `origin`: the only place endpoints change.
    pub fn apply(&self, origin: Origin, update: Update) {
        let mut inner = self.lock();
        let set = &mut inner.sets[origin as usize];
        let mut leaving = Vec::new();
        // Ids this source no longer lists at all (not merely unhealthy).
        let mut gone = Vec::new();
        // After the first answer, what arrives joins (slow start).
        let joined = set.answered.then(Instant::now);
        match update {
            Update::Reset(all) => {
                let mut old = std::mem::take(&mut set.endpoints);
                for d in all {
                    let k = known(old.remove(&d.id), d, &mut leaving, joined);
                    set.endpoints.insert(k.found.id.clone(), k);
                }
                for (id, k) in old {
                    gone.push(id);
                    leaving.push(k.stats);
                }
            }
            Update::Add(eps) => {
                for d in eps {
                    let k = known(set.endpoints.remove(&d.id), d, &mut leaving, joined);
                    set.endpoints.insert(k.found.id.clone(), k);
                }
            }
            Update::Remove(ids) => {
                for id in ids {
                    if let Some(k) = set.endpoints.remove(&id) {
                        gone.push(id);
                        leaving.push(k.stats);
                    }
                }
            }
            Update::NoEndpoints => {
                for (id, k) in std::mem::take(&mut set.endpoints) {
                    gone.push(id);
                    leaving.push(k.stats);
                }
            }
        }
        set.answered = true;
        // An endpoint's latency series goes with it: instances that come
        // and go under new ids must not grow the metrics without bound.
        for id in gone {
            if !inner.sets.iter().any(|s| s.endpoints.contains_key(&id)) {
                self.metrics.forget_endpoint(&self.name, id);
            }
        }
        if origin == self.origin() {
            self.rebuild(&inner);
            self.retire(&inner, &leaving);
        }
    }

    /// Stops using endpoints discovery says are not serving or gone: their
    /// pooled connections close, and attempts in flight on them that may
    /// be repeated go elsewhere (`http/outbound.rs`).
    fn retire(&self, inner: &Inner, leaving: &[Arc<EndpointStats>]) {
        if leaving.is_empty() {
            return;
        }
        let set = &inner.sets[self.origin() as usize];
        let clients = self.clients();
        for ep in leaving {
            ep.retire();
            // Another instance may serve on the same address (a restart
            // under a new instance id).
            let reused = set
                .endpoints
                .values()
                .any(|k| k.found.healthy && k.found.addr == ep.addr);
            if !reused {
                clients.retire(ep.addr);
            }
            tracing::info!(service = %self.name, endpoint = %ep.id, addr = %ep.addr, "endpoint left: its connections are closed");
        }
    }

    /// Replaces the policy (None: defaults).
    pub fn set_policy(&self, policy: Option<ServicePolicy>) {
        let mut inner = self.lock();
        if inner.policy == policy {
            return;
        }
        let origin = origin_of(policy.as_ref(), self.default_origin);
        inner.policy = policy;
        self.origin
            .send_if_modified(|o| std::mem::replace(o, origin) != origin);
        self.rebuild(&inner);
    }

    /// Records how an attempt on `ep` ended, for outlier detection; may
    /// eject the endpoint.
    pub fn report(self: &Arc<Self>, ep: &Arc<EndpointStats>, outcome: Outcome, s: &Settings) {
        let Some(o) = &s.outlier else {
            return;
        };
        let now = Instant::now();
        let eject = ep
            .outlier
            .lock()
            .map_or(None, |mut st| st.record(outcome, now, o));
        if let Some(time) = eject {
            self.try_eject(ep, time, o.max_ejection_percent);
        }
    }

    fn try_eject(self: &Arc<Self>, ep: &Arc<EndpointStats>, time: Duration, percent: u32) {
        let inner = self.lock();
        let now = Instant::now();
        let set = &inner.sets[self.origin() as usize];
        let Some(k) = set.endpoints.values().find(|k| Arc::ptr_eq(&k.stats, ep)) else {
            return;
        };
        let ejected = set
            .endpoints
            .values()
            .filter(|k| k.stats.is_ejected(now))
            .count();
        if ejected >= outlier::max_ejected(set.endpoints.len(), percent) {
            tracing::debug!(service = %self.name, endpoint = %k.found.id, "outlier not ejected: too many ejected already");
            return;
        }
        if let Ok(mut st) = ep.outlier.lock() {
            st.eject(now, time);
        }
        tracing::info!(service = %self.name, endpoint = %k.found.id, ?time, "endpoint ejected");
        self.metrics
            .ejections
            .get_or_create(&UpstreamLabels {
                upstream: self.name.clone(),
            })
            .inc();
        self.rebuild(&inner);
        drop(inner);
        let up = self.clone();
        tokio::spawn(async move {
            tokio::time::sleep(time).await;
            let inner = up.lock();
            up.rebuild(&inner);
        });
    }

    /// Endpoints to check actively: the ones of the source in use.
    /// Endpoints reached over mTLS are left out: a plaintext probe cannot
    /// pass their sidecar's strict inbound, and that sidecar checks its app
    /// and reports the health the control plane sends (see [`Self::actively_checked`]).
    pub fn check_targets(&self) -> Vec<(String, SocketAddr)> {
        let inner = self.lock();
        inner.sets[self.origin() as usize]
            .endpoints
            .values()
            .filter(|k| self.actively_checked(&k.found))
            .map(|k| (k.found.id.clone(), k.found.addr))
            .collect()
    }

    /// Whether active checks judge endpoint `d`: not when it is a sidecar
    /// this one speaks mTLS to.
    fn actively_checked(&self, d: &Discovered) -> bool {
        !(d.meshed && self.identity.is_some())
    }

    /// Records one active check of endpoint `id`.
    pub fn record_check(&self, id: &str, ok: bool, hc: &settings::HealthCheck) {
        let mut inner = self.lock();
        let origin = self.origin() as usize;
        let Some(k) = inner.sets[origin].endpoints.get_mut(id) else {
            return;
        };
        if !k.check.record(ok, hc) {
            return;
        }
        if ok {
            k.stats.rejoined(Instant::now());
        }
        let to = if ok { "healthy" } else { "unhealthy" };
        tracing::info!(service = %self.name, endpoint = id, to, "health check changed");
        self.metrics
            .health_transitions
            .get_or_create(&HealthLabels {
                upstream: self.name.clone(),
                to,
            })
            .inc();
        self.rebuild(&inner);
    }

    /// Rebuilds what requests use from the current origin's endpoints.
    fn rebuild(&self, inner: &Inner) {
        let origin = self.origin();
        let set = &inner.sets[origin as usize];
        let policy = inner.policy.clone();
        let settings = Settings::resolve(policy.as_ref(), origin, &self.defaults);
        let checked = settings.health_check.is_some();
        let now = Instant::now();
        let healthy = |k: &&Known| {
            k.found.healthy && (!checked || !self.actively_checked(&k.found) || k.check.healthy())
        };
        let pick = |f: &dyn Fn(&&Known) -> bool| -> Vec<Arc<EndpointStats>> {
            set.endpoints
                .values()
                .filter(f)
                .map(|k| k.stats.clone())
                .collect()
        };
        // With nothing eligible, try the healthy, then everything, rather
        // than fail everything (Envoy's panic mode): health reports and
        // ejections can be wrong, traffic is not. A subset does the same
        // within itself.
        let eligible_of = |member: &dyn Fn(&&Known) -> bool| {
            let mut eligible = pick(&|k| member(k) && healthy(k) && !k.stats.is_ejected(now));
            if eligible.is_empty() {
                eligible = pick(&|k| member(k) && healthy(k));
            }
            if eligible.is_empty() {
                eligible = pick(member);
            }
            eligible
        };
        let eligible = eligible_of(&|_| true);
        let kind = kind_of(policy.as_ref(), self.default_kind);
        // The typed form of the routes and fault (the control plane checked
        // them; a sidecar still refuses what it cannot read, keeping none).
        let typed = policy.as_ref().and_then(|p| {
            wayfinder_proto::policy::ServicePolicy::from_proto(p)
                .inspect_err(|e| tracing::warn!(service = %self.name, error = %e, "routes and fault of the policy ignored"))
                .ok()
                .map(|(_, t)| t)
        });
        let routes = match (typed.as_ref().and_then(|t| t.routes.as_ref()), &policy) {
            (Some(routes), Some(p)) => RouteTable::compile(
                routes.as_slice(),
                &Compile {
                    members: &|s| eligible_of(&|k: &&Known| s.selects(&k.found.labels)),
                    kind,
                    policy: p,
                    origin,
                    defaults: &self.defaults,
                },
            ),
            _ => RouteTable::default(),
        };
        let mirror = typed.as_ref().and_then(|t| t.mirror.as_ref()).map(|m| {
            CompiledMirror::new(
                m,
                &|s| eligible_of(&|k: &&Known| s.selects(&k.found.labels)),
                kind,
            )
        });
        let hedge = typed
            .as_ref()
            .and_then(|t| t.hedging.as_ref())
            .map(Hedge::new);
        let fault = typed
            .as_ref()
            .and_then(|t| t.fault.as_ref())
            .map(|f| Arc::new(CompiledFault::new(f)));
        let hash_key = match (kind, policy.as_ref().map(|p| p.hash_header.as_str())) {
            (Kind::RingHash | Kind::Maglev, Some(h)) if !h.is_empty() => {
                HashKey::Header(h.to_string())
            }
            (Kind::RingHash | Kind::Maglev, _) => HashKey::ClientIp,
            _ => HashKey::None,
        };
        self.limits.set(&settings);
        if self.clients().idle != settings.timeouts.idle {
            let plain = self.connector();
            let mesh = mesh_connectors(&plain, self.identity.as_ref(), &self.name);
            let c = Clients::new(plain, settings.timeouts.idle, mesh);
            *self.clients.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(c);
        }
        let ok = |k: &Known| healthy(&k) && !k.stats.is_ejected(now);
        let balancer = self.balancer(kind, set, eligible, &settings, &ok);
        let active = Active {
            balancer,
            hash_key,
            policy,
            settings,
            routes,
            fault,
            mirror,
            hedge,
        };
        *self.active.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(active);
        // Only now: a request woken by readiness must find the new balancer.
        self.ready.send_replace(set.answered);
    }

    /// The balancer over `eligible` (of `set`): zone by zone when the
    /// sidecar has a zone (counting tries as local or remote) or the policy
    /// weighs zones; warming endpoints ramping up under slow start. `ok`:
    /// healthy and not ejected (prefer-local's healthy share).
    fn balancer(
        &self,
        kind: Kind,
        set: &Set,
        eligible: Vec<Arc<EndpointStats>>,
        s: &Settings,
        ok: &dyn Fn(&Known) -> bool,
    ) -> Box<dyn Balancer> {
        let zone = self.defaults.zone.as_deref();
        // prefer-local needs a zone of its own; zone weights do not.
        let split = s
            .locality
            .as_ref()
            .filter(|l| zone.is_some() || matches!(l, settings::Locality::Weights(_)));
        if zone.is_none() && split.is_none() {
            return balance::build_with(kind, eligible, s.slow_start);
        }
        let local = set
            .endpoints
            .values()
            .filter(|k| zone.is_some_and(|z| k.found.zone == z));
        let local_health = (local.clone().filter(|k| ok(k)).count(), local.count());
        let zone_of = |ep: &EndpointStats| {
            set.endpoints
                .get(&*ep.id)
                .map_or("", |k| k.found.zone.as_str())
        };
        let counters = zone.map(|_| {
            let count = |locality| {
                self.metrics
                    .locality_requests
                    .get_or_create(&LocalityLabels {
                        upstream: self.name.clone(),
                        locality,
                    })
                    .clone()
            };
            Counters {
                local: count("local"),
                remote: count("remote"),
            }
        });
        Box::new(Zoned::new(Layout {
            kind,
            endpoints: eligible
                .into_iter()
                .map(|e| {
                    let z = zone_of(&e);
                    (e, z)
                })
                .collect(),
            local: zone,
            split,
            local_health,
            slow_start: s.slow_start,
            counters,
        }))
    }

    /// Its state for the control plane's `proxy-status`: the discovery
    /// version applied and when, and how many endpoints its source gives.
    pub fn status(&self) -> wayfinder_proto::v1::UpstreamStatus {
        let origin = self.origin();
        let endpoints = self.lock().sets[origin as usize].endpoints.len();
        let (version, at) = self
            .applied
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .unwrap_or((0, std::time::UNIX_EPOCH));
        wayfinder_proto::v1::UpstreamStatus {
            service: self.name.clone(),
            discovery: match origin {
                Origin::Mesh => "mesh",
                Origin::Dns => "dns",
            }
            .to_string(),
            version,
            applied_unix_ms: unix_ms(at),
            endpoints: u32::try_from(endpoints).unwrap_or(u32::MAX),
        }
    }

    /// What the sidecar believes now, for `/endpoints`.
    pub fn view(&self) -> Vec<EndpointView> {
        let inner = self.lock();
        let now = Instant::now();
        let window = self.active().settings.slow_start;
        inner.sets[self.origin() as usize]
            .endpoints
            .values()
            .map(|k| EndpointView {
                id: k.found.id.clone(),
                addr: k.found.addr.to_string(),
                weight: k.found.weight,
                labels: k.found.labels.clone().into_iter().collect(),
                meshed: k.found.meshed,
                healthy: k.found.healthy,
                checked_healthy: k.check.healthy(),
                ejected: k.stats.is_ejected(now),
                in_flight: k.stats.in_flight(),
                ewma_ms: k.stats.cost_ns(std::time::Instant::now()) / 1e6,
                zone: k.found.zone.clone(),
                slow_start: window
                    .zip(k.stats.warming_since(now))
                    .map_or(1.0, |(w, since)| {
                        slow_start::factor(now.saturating_duration_since(since), w)
                    }),
            })
            .collect()
    }
}

/// `at` as Unix milliseconds (0 for the epoch or before).
pub fn unix_ms(at: std::time::SystemTime) -> u64 {
    at.duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// Every upstream the sidecar knows, started on first use, at most `max`
/// of them; unused ones are evicted by [`Upstreams::sweep`].
pub struct Upstreams {
    map: RwLock<HashMap<String, Arc<Upstream>>>,
    max: usize,
    /// When the sweep last saw each evictable upstream in use.
    seen: Mutex<HashMap<String, Instant>>,
}

/// The sidecar holds `--max-upstreams` upstreams and none is idle.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("the sidecar already holds --max-upstreams upstreams")]
pub struct Full;

impl discovery::Sink for Upstream {
    fn name(&self) -> &str {
        &self.name
    }
    fn apply(&self, origin: Origin, update: Update) {
        Upstream::apply(self, origin, update);
    }
    fn set_policy(&self, policy: Option<ServicePolicy>) {
        Upstream::set_policy(self, policy);
    }
    fn applied(&self, version: u64) {
        *self.applied.lock().unwrap_or_else(|p| p.into_inner()) =
            Some((version, std::time::SystemTime::now()));
    }
    async fn wait_origin(&self, origin: Origin) {
        Upstream::wait_origin(self, origin).await;
    }
    async fn closed(&self) {
        Upstream::closed(self).await;
    }
}

impl health_check::Checked for Upstream {
    fn health_check(&self) -> Option<settings::HealthCheck> {
        self.active().settings.health_check.clone()
    }
    fn check_targets(&self) -> Vec<(String, SocketAddr)> {
        Upstream::check_targets(self)
    }
    fn record_check(&self, id: &str, ok: bool, hc: &settings::HealthCheck) {
        Upstream::record_check(self, id, ok, hc);
    }
}

impl Upstreams {
    /// An empty set holding at most `max` upstreams (pinned ones aside).
    pub fn new(max: usize) -> Self {
        Self {
            map: RwLock::default(),
            max,
            seen: Mutex::default(),
        }
    }

    /// The upstream named `name`, if started.
    pub fn get(&self, name: &str) -> Option<Arc<Upstream>> {
        self.map.read().ok()?.get(name).cloned()
    }

    /// The upstream named `name`, created with `start` when new; `Full`
    /// when that would pass the cap.
    pub fn get_or_start(
        &self,
        name: &str,
        start: impl FnOnce(&str) -> Arc<Upstream>,
    ) -> Result<Arc<Upstream>, Full> {
        let up = match self.get(name) {
            Some(u) => u,
            None => {
                let mut map = self.map.write().unwrap_or_else(|p| p.into_inner());
                match map.get(name) {
                    Some(u) => u.clone(),
                    None if self.evictable(&map) >= self.max => return Err(Full),
                    None => map
                        .entry(name.to_string())
                        .or_insert_with(|| start(name))
                        .clone(),
                }
            }
        };
        up.touch();
        Ok(up)
    }

    /// The upstream named `name`, created with `start` when new, pinned: a
    /// listener's or the local service's, outside the cap, never evicted.
    pub fn pinned(&self, name: &str, start: impl FnOnce(&str) -> Arc<Upstream>) -> Arc<Upstream> {
        let up = match self.get(name) {
            Some(u) => u,
            None => self
                .map
                .write()
                .unwrap_or_else(|p| p.into_inner())
                .entry(name.to_string())
                .or_insert_with(|| start(name))
                .clone(),
        };
        up.pinned.store(true, Ordering::Relaxed);
        up
    }

    fn evictable(&self, map: &HashMap<String, Arc<Upstream>>) -> usize {
        map.values()
            .filter(|u| !u.pinned.load(Ordering::Relaxed))
            .count()
    }

    /// How many upstreams are held.
    pub fn len(&self) -> usize {
        self.map.read().map(|m| m.len()).unwrap_or_default()
    }

    /// Whether none is held.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Evicts the upstreams not used, and with nothing in flight, for
    /// `idle` as of `now`; returns them, closed (their discovery watches and
    /// health checks end). Called every fraction of `idle`, so an upstream
    /// goes between `idle` and a little more after its last use. A request
    /// that took one just before it went keeps it until it ends.
    pub fn sweep(&self, now: Instant, idle: Duration) -> Vec<Arc<Upstream>> {
        let mut seen = self.seen.lock().unwrap_or_else(|p| p.into_inner());
        let quiet: Vec<String> = self
            .all()
            .into_iter()
            .filter(|u| !u.pinned.load(Ordering::Relaxed))
            .filter_map(|u| {
                let last = seen.entry(u.name.clone()).or_insert(now);
                if u.used.swap(false, Ordering::Relaxed) || u.busy() {
                    *last = now;
                }
                (now.saturating_duration_since(*last) >= idle).then(|| u.name.clone())
            })
            .collect();
        let mut map = self.map.write().unwrap_or_else(|p| p.into_inner());
        let mut evicted = Vec::new();
        for name in quiet {
            // Taken again between the scan and the lock: it stays.
            if map
                .get(&name)
                .is_some_and(|u| u.used.load(Ordering::Relaxed))
            {
                continue;
            }
            if let Some(up) = map.remove(&name) {
                up.closed.send_replace(true);
                evicted.push(up);
            }
        }
        seen.retain(|name, _| map.contains_key(name));
        evicted
    }

    /// All upstreams, sorted by name.
    pub fn all(&self) -> Vec<Arc<Upstream>> {
        let mut v: Vec<_> = self
            .map
            .read()
            .map(|m| m.values().cloned().collect())
            .unwrap_or_default();
        v.sort_by(|a: &Arc<Upstream>, b| a.name.cmp(&b.name));
        v
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::balance::PickContext;
    use wayfinder_proto::v1::{BalancerKind, DiscoveryMode};

    fn d(id: &str, port: u16, healthy: bool) -> Discovered {
        Discovered {
            id: id.into(),
            addr: ([127, 0, 0, 1], port).into(),
            weight: 100,
            meshed: true,
            healthy,
            labels: Default::default(),
            zone: String::new(),
        }
    }

    fn up(kind: Kind) -> Arc<Upstream> {
        let metrics = ProxyMetrics::register(&mut prometheus_client::registry::Registry::default());
        Upstream::new(
            "web",
            kind,
            Origin::Mesh,
            Defaults::default(),
            metrics,
            None,
        )
    }

    /// Endpoint `id` of the balancer in use.
    fn in_rotation(u: &Upstream, id: &str) -> Arc<EndpointStats> {
        u.active()
            .balancer
            .endpoints()
            .iter()
            .find(|e| &*e.id == id)
            .cloned()
            .expect("in rotation")
    }

    fn ids(u: &Upstream) -> Vec<String> {
        let a = u.active();
        let mut v: Vec<_> = a
            .balancer
            .endpoints()
            .iter()
            .map(|e| e.id.to_string())
            .collect();
        v.sort();
        v
    }

    #[test]
    fn its_status_says_the_version_applied_and_the_endpoints_of_its_source() {
        use crate::discovery::Sink;
        let u = up(Kind::RoundRobin);
        let s = u.status();
        assert_eq!((s.service.as_str(), s.discovery.as_str()), ("web", "mesh"));
        assert_eq!((s.version, s.applied_unix_ms, s.endpoints), (0, 0, 0));
        u.apply(
            Origin::Mesh,
            Update::Reset(vec![d("a", 1, true), d("b", 2, false)]),
        );
        Sink::applied(&*u, 42);
        let s = u.status();
        assert_eq!((s.version, s.endpoints), (42, 2));
        assert!(s.applied_unix_ms > 1_600_000_000_000, "{s:?}");
    }

    #[test]
    fn updates_apply_in_one_place_and_unhealthy_endpoints_are_skipped() {
        let u = up(Kind::RoundRobin);
        assert!(!u.is_ready());
        u.apply(
            Origin::Mesh,
            Update::Reset(vec![d("a", 1, true), d("b", 2, true)]),
        );
        assert!(u.is_ready());
        assert_eq!(ids(&u), ["a", "b"]);
        u.apply(
            Origin::Mesh,
            Update::Add(vec![d("c", 3, true), d("a", 1, false)]),
        );
        assert_eq!(ids(&u), ["b", "c"]);
        u.apply(Origin::Mesh, Update::Remove(vec!["b".into()]));
        assert_eq!(ids(&u), ["c"]);
        u.apply(Origin::Mesh, Update::Add(vec![d("c", 3, false)]));
        assert_eq!(ids(&u), ["a", "c"], "nothing healthy: try everything");
        u.apply(Origin::Mesh, Update::NoEndpoints);
        assert!(
            u.active()
                .balancer
                .pick(&PickContext::default())
                .next()
                .is_none()
        );
    }

    #[test]
    fn stats_survive_a_rebuild_when_the_endpoint_is_unchanged() {
        let u = up(Kind::PeakEwma);
        u.apply(Origin::Mesh, Update::Reset(vec![d("a", 1, true)]));
        let guard = u.active().balancer.endpoints()[0].start();
        u.apply(Origin::Mesh, Update::Add(vec![d("b", 2, true)]));
        let a = u.active();
        let ep = a
            .balancer
            .endpoints()
            .iter()
            .find(|e| &*e.id == "a")
            .cloned();
        assert_eq!(ep.map(|e| e.in_flight()), Some(1));
        drop(guard);
    }

    #[test]
    fn each_source_keeps_its_endpoints_and_the_policy_picks_one() {
        let u = up(Kind::RoundRobin);
        u.apply(Origin::Dns, Update::Reset(vec![d("10.0.0.9:80", 80, true)]));
        assert!(
            !u.is_ready(),
            "DNS answered, but mesh is in use and has not"
        );
        u.apply(Origin::Mesh, Update::Reset(vec![d("a", 1, true)]));
        assert!(u.is_ready());
        assert_eq!(ids(&u), ["a"]);
        u.set_policy(Some(ServicePolicy {
            service: "web".into(),
            discovery: DiscoveryMode::Dns as i32,
            ..Default::default()
        }));
        assert_eq!(u.origin(), Origin::Dns);
        assert_eq!(ids(&u), ["10.0.0.9:80"]);
        u.set_policy(None);
        assert_eq!(ids(&u), ["a"]);
    }

    #[test]
    fn policy_picks_the_balancer() {
        let u = up(Kind::PeakEwma);
        u.apply(
            Origin::Mesh,
            Update::Reset(vec![d("a", 1, true), d("b", 2, true), d("c", 3, true)]),
        );
        u.set_policy(Some(ServicePolicy {
            service: "web".into(),
            balancer: BalancerKind::RoundRobin as i32,
            ..Default::default()
        }));
        let a = u.active();
        let firsts: Vec<_> = (0..3)
            .filter_map(|_| a.balancer.pick(&PickContext::default()).next())
            .collect();
        let mut sorted = firsts.clone();
        sorted.sort();
        assert_eq!(
            sorted,
            vec![0, 1, 2],
            "round robin visits each once: {firsts:?}"
        );
        assert_eq!(a.hash_key, HashKey::None);
        u.set_policy(Some(ServicePolicy {
            service: "web".into(),
            balancer: BalancerKind::Maglev as i32,
            hash_header: "x-user".into(),
            ..Default::default()
        }));
        assert_eq!(u.active().hash_key, HashKey::Header("x-user".into()));
    }

    #[tokio::test(start_paused = true)]
    async fn ejection_takes_an_endpoint_out_never_all_and_brings_it_back() {
        let u = up(Kind::RoundRobin);
        u.apply(
            Origin::Mesh,
            Update::Reset(vec![d("a", 1, true), d("b", 2, true), d("c", 3, true)]),
        );
        u.set_policy(Some(ServicePolicy {
            service: "web".into(),
            outlier: Some(wayfinder_proto::v1::OutlierDetection {
                consecutive_failures: 2,
                base_ejection_ms: 1000,
                max_ejection_percent: 100,
                ..Default::default()
            }),
            ..Default::default()
        }));
        let s = u.active().settings.clone();
        let ep = |id: &str| in_rotation(&u, id);
        let (a, b) = (ep("a"), ep("b"));
        u.report(&a, Outcome::Reset, &s);
        assert_eq!(ids(&u), ["a", "b", "c"], "one failure is not enough");
        u.report(&a, Outcome::Reset, &s);
        assert_eq!(ids(&u), ["b", "c"]);
        u.report(&b, Outcome::ConnectFailed, &s);
        u.report(&b, Outcome::ConnectFailed, &s);
        assert_eq!(ids(&u), ["c"], "100% allows all but the last");
        let c = ep("c");
        u.report(&c, Outcome::ConnectFailed, &s);
        u.report(&c, Outcome::ConnectFailed, &s);
        assert_eq!(ids(&u), ["c"], "never the last one");

        tokio::time::sleep(Duration::from_millis(1001)).await;
        assert_eq!(
            ids(&u),
            ["a", "b", "c"],
            "back after the base ejection time"
        );
        // On probation: one more failure ejects again, for twice as long.
        u.report(&a, Outcome::Reset, &s);
        assert_eq!(ids(&u), ["b", "c"]);
        tokio::time::sleep(Duration::from_millis(1500)).await;
        assert_eq!(ids(&u), ["b", "c"]);
        tokio::time::sleep(Duration::from_millis(501)).await;
        assert_eq!(ids(&u), ["a", "b", "c"]);
    }

    #[tokio::test]
    async fn discovery_retiring_an_endpoint_closes_its_pooled_connections() {
        use crate::pool::Proto;
        use crate::pool::tests::{get, read, server};
        let (addr, accepted) = server(Proto::Http2, b"h2", true).await;
        let u = up(Kind::RoundRobin);
        u.apply(
            Origin::Mesh,
            Update::Reset(vec![d("a", addr.port(), true), d("b", 1, true)]),
        );
        let clients = u.clients();
        let sent = clients.h2.send(addr, get(addr, Proto::Http2)).await;
        read(sent.expect("answered")).await;
        assert_eq!(clients.h2.pooled(addr), 1);
        // Not serving any more: its connection goes at once, not when idle.
        u.apply(Origin::Mesh, Update::Add(vec![d("a", addr.port(), false)]));
        assert_eq!(clients.h2.pooled(addr), 0);
        // Serving again: a new connection.
        u.apply(Origin::Mesh, Update::Add(vec![d("a", addr.port(), true)]));
        let sent = clients.h2.send(addr, get(addr, Proto::Http2)).await;
        read(sent.expect("answered")).await;
        assert_eq!(accepted.load(std::sync::atomic::Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn discovery_retiring_an_endpoint_wakes_the_attempts_waiting_on_it() {
        use futures::FutureExt;
        let u = up(Kind::RoundRobin);
        u.apply(
            Origin::Mesh,
            Update::Reset(vec![d("a", 1, true), d("b", 2, true), d("c", 3, true)]),
        );
        let ep = |id: &str| in_rotation(&u, id);
        let (a, c) = (ep("a"), ep("c"));
        let mut on_a = std::pin::pin!(a.leaving());
        let on_c = std::pin::pin!(c.leaving());
        u.apply(Origin::Mesh, Update::Add(vec![d("b", 2, false)]));
        assert!(on_a.as_mut().now_or_never().is_none(), "b left, not a");
        u.apply(Origin::Mesh, Update::Add(vec![d("a", 1, false)]));
        assert!(on_a.now_or_never().is_some(), "a turned not serving");
        assert_eq!(ids(&u), ["c"]);
        u.apply(Origin::Mesh, Update::Remove(vec!["c".into()]));
        assert!(on_c.now_or_never().is_some(), "c was removed");
        // Panic mode uses a and b although not serving; nothing wakes
        // attempts on them until they change again.
        let a = ep("a");
        let mut again = std::pin::pin!(a.leaving());
        u.apply(Origin::Mesh, Update::Add(vec![d("b", 2, false)]));
        assert!(again.as_mut().now_or_never().is_none());
    }

    #[tokio::test(start_paused = true)]
    async fn endpoints_warm_when_they_join_or_return_but_not_in_the_first_answer() {
        let u = up(Kind::RoundRobin);
        let now = Instant::now;
        u.apply(
            Origin::Mesh,
            Update::Reset(vec![d("a", 1, true), d("b", 2, false)]),
        );
        let warming = |id: &str| {
            u.lock().sets[0].endpoints[id]
                .stats
                .warming_since(now())
                .is_some()
        };
        assert!(!warming("a"), "there before the sidecar");
        u.apply(Origin::Mesh, Update::Add(vec![d("c", 3, true)]));
        assert!(warming("c"), "new");
        u.apply(Origin::Mesh, Update::Add(vec![d("b", 2, true)]));
        assert!(warming("b"), "serving again");
        u.set_policy(Some(ServicePolicy {
            service: "web".into(),
            balancer: wayfinder_proto::v1::BalancerKind::RoundRobin as i32,
            slow_start_ms: 10_000,
            ..Default::default()
        }));
        let slow = |id: &str| {
            let v = serde_json::to_value(u.view()).expect("serializes");
            v.as_array()
                .and_then(|a| a.iter().find(|e| e["id"] == id))
                .and_then(|e| e["slow_start"].as_f64())
        };
        assert_eq!(slow("a"), Some(1.0));
        assert_eq!(slow("c"), Some(slow_start::FLOOR));
        tokio::time::sleep(Duration::from_secs(5)).await;
        assert_eq!(slow("c"), Some(0.5));
        tokio::time::sleep(Duration::from_secs(5)).await;
        assert_eq!(slow("c"), Some(1.0));
    }

    #[test]
    fn prefer_local_keeps_calls_in_the_zone_until_too_few_local_endpoints_are_healthy() {
        let metrics = ProxyMetrics::register(&mut prometheus_client::registry::Registry::default());
        let u = Upstream::new(
            "web",
            Kind::RoundRobin,
            Origin::Mesh,
            Defaults {
                zone: Some("zone-a".into()),
                ..Defaults::default()
            },
            metrics.clone(),
            None,
        );
        let z = |id: &str, port, zone: &str, healthy| Discovered {
            zone: zone.into(),
            ..d(id, port, healthy)
        };
        u.set_policy(Some(ServicePolicy {
            service: "web".into(),
            locality: Some(wayfinder_proto::v1::Locality {
                prefer_local: true,
                ..Default::default()
            }),
            ..Default::default()
        }));
        u.apply(
            Origin::Mesh,
            Update::Reset(vec![
                z("a1", 1, "zone-a", true),
                z("a2", 2, "zone-a", true),
                z("b1", 3, "zone-b", true),
            ]),
        );
        let local_share = |u: &Upstream| {
            let a = u.active();
            let local = (0..1000)
                .filter_map(|_| a.balancer.pick(&PickContext::default()).next())
                .filter(|&i| a.balancer.endpoints()[i].id.starts_with('a'))
                .count();
            local as f64 / 1000.0
        };
        assert_eq!(local_share(&u), 1.0);
        // One of two local endpoints healthy (50% < 70%): 5/7 stay local.
        u.apply(Origin::Mesh, Update::Add(vec![z("a2", 2, "zone-a", false)]));
        let share = local_share(&u);
        assert!((0.62..=0.81).contains(&share), "{share}");
        // Tries are counted where they go.
        let a = u.active();
        for i in a.balancer.pick(&PickContext::default()) {
            a.balancer.count_try(i);
        }
        let count = |locality| {
            metrics
                .locality_requests
                .get_or_create(&LocalityLabels {
                    upstream: "web".into(),
                    locality,
                })
                .get()
        };
        assert_eq!((count("local"), count("remote")), (1, 1));
        let v = serde_json::to_value(u.view()).expect("serializes");
        assert_eq!(v[2]["zone"], "zone-b");
    }

    fn named(name: &str) -> Arc<Upstream> {
        let metrics = ProxyMetrics::register(&mut prometheus_client::registry::Registry::default());
        Upstream::new(
            name,
            Kind::RoundRobin,
            Origin::Mesh,
            Defaults::default(),
            metrics,
            None,
        )
    }

    #[test]
    fn upstreams_are_capped_and_unused_ones_evicted_but_never_pinned_or_busy_ones() {
        let ups = Upstreams::new(2);
        let idle = Duration::from_secs(10);
        let at = |s: u64| Instant::now() + Duration::from_secs(s);
        let t0 = at(0);
        let own = ups.pinned("own", named);
        let a = ups.get_or_start("a", named).expect("a fits");
        let b = ups.get_or_start("b", named).expect("b fits");
        // The pinned one does not count against the cap.
        assert_eq!(ups.get_or_start("c", named).err(), Some(Full));
        assert_eq!(ups.len(), 3);

        assert!(ups.sweep(t0, idle).is_empty(), "just used");
        // `a` is used again; `b` has a request in flight.
        let t6 = t0 + Duration::from_secs(6);
        ups.get_or_start("a", named).expect("known");
        let in_flight = b.breakers.requests.try_acquire(None).expect("slot");
        assert!(ups.sweep(t6, idle).is_empty());
        let t11 = t0 + Duration::from_secs(11);
        assert!(ups.sweep(t11, idle).is_empty(), "a used at 6, b busy");
        drop(in_flight);
        let t17 = t0 + Duration::from_secs(17);
        let gone: Vec<_> = ups
            .sweep(t17, idle)
            .iter()
            .map(|u| u.name.clone())
            .collect();
        assert_eq!(gone, ["a"], "unused since 6");
        assert!(*a.closed.borrow(), "its discovery stops");
        let gone: Vec<_> = ups
            .sweep(t17 + idle, idle)
            .iter()
            .map(|u| u.name.clone())
            .collect();
        assert_eq!(gone, ["b"], "unused since its request ended at 11");
        assert!(ups.sweep(at(3600), idle).is_empty(), "own is pinned");
        assert!(!*own.closed.borrow());
        assert_eq!(ups.len(), 1);
        // Room again: a new name starts, and an evicted one starts afresh.
        let a2 = ups.get_or_start("a", named).expect("room");
        assert!(!Arc::ptr_eq(&a, &a2));
        ups.get_or_start("c", named).expect("room");
    }
}
