//! One upstream service as the sidecar sees it: its endpoints, their health,
//! its policy and the balancer built over the eligible ones.
//!
//! Requests read an `Arc<Active>` (one atomic clone under a read lock);
//! discovery updates rebuild it. Endpoint stats (in flight, latency) survive
//! rebuilds as long as the endpoint keeps its address and weight.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use serde::Serialize;
use tokio::sync::watch;
use wayfinder_proto::v1::{BalancerKind, DiscoveryMode, ServicePolicy};

use crate::balance::{self, Balancer, EndpointStats, Kind};
use crate::discovery::{Discovered, Origin, Update};

/// What requests use: the balancer over eligible endpoints.
pub struct Active {
    /// Balancer (its endpoints are the eligible ones).
    pub balancer: Box<dyn Balancer>,
    /// Policy in force, if any.
    pub policy: Option<ServicePolicy>,
    /// What a pick hashes; `None` unless the balancer hashes.
    pub hash_key: HashKey,
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

struct Known {
    found: Discovered,
    stats: Arc<EndpointStats>,
}

/// What one discovery source last said.
#[derive(Default)]
struct Set {
    endpoints: BTreeMap<String, Known>,
    answered: bool,
}

struct Inner {
    /// By [`Origin::index`]: each source's view is kept, so switching the
    /// source (the policy's `discovery`) needs no re-discovery.
    sets: [Set; 2],
    policy: Option<ServicePolicy>,
}

/// One upstream service.
pub struct Upstream {
    name: String,
    default_kind: Kind,
    default_origin: Origin,
    inner: Mutex<Inner>,
    active: RwLock<Arc<Active>>,
    ready: watch::Sender<bool>,
    origin: watch::Sender<Origin>,
}

/// An endpoint as `/endpoints` shows it.
#[derive(Serialize)]
pub struct EndpointView {
    id: String,
    addr: String,
    weight: u32,
    meshed: bool,
    healthy: bool,
    in_flight: u32,
    ewma_ms: f64,
}

/// Keeps an endpoint's stats when only its health changed.
fn known(prev: Option<Known>, d: Discovered) -> Known {
    let stats = match prev {
        Some(k)
            if k.found.addr == d.addr
                && k.found.weight == d.weight
                && k.found.meshed == d.meshed =>
        {
            k.stats
        }
        _ => EndpointStats::with_mesh(d.id.clone(), d.addr, d.weight, d.meshed),
    };
    Known { found: d, stats }
}

fn origin_of(policy: Option<&ServicePolicy>, default: Origin) -> Origin {
    match policy.and_then(|p| DiscoveryMode::try_from(p.discovery).ok()) {
        Some(DiscoveryMode::Mesh) => Origin::Mesh,
        Some(DiscoveryMode::Dns) => Origin::Dns,
        _ => default,
    }
}

fn kind_of(policy: Option<&ServicePolicy>, default: Kind) -> Kind {
    match policy.and_then(|p| BalancerKind::try_from(p.balancer).ok()) {
        Some(BalancerKind::RoundRobin) => Kind::RoundRobin,
        Some(BalancerKind::WeightedRoundRobin) => Kind::WeightedRoundRobin,
        Some(BalancerKind::LeastRequest) => Kind::LeastRequest,
        Some(BalancerKind::PeakEwma) => Kind::PeakEwma,
        Some(BalancerKind::RingHash) => Kind::RingHash,
        Some(BalancerKind::Maglev) => Kind::Maglev,
        _ => default,
    }
}

impl Upstream {
    /// An upstream with no endpoints yet, using `default_origin` for its
    /// endpoints unless its policy names another.
    pub fn new(name: &str, default_kind: Kind, default_origin: Origin) -> Arc<Self> {
        Arc::new(Self {
            name: name.to_string(),
            default_kind,
            default_origin,
            inner: Mutex::new(Inner {
                sets: Default::default(),
                policy: None,
            }),
            active: RwLock::new(Arc::new(Active {
                balancer: balance::build(default_kind, Vec::new()),
                policy: None,
                hash_key: HashKey::None,
            })),
            ready: watch::channel(false).0,
            origin: watch::channel(default_origin).0,
        })
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

    /// Whether the first discovery answer arrived.
    pub fn is_ready(&self) -> bool {
        *self.ready.borrow()
    }

    /// Waits up to `limit` for the first discovery answer.
    pub async fn wait_ready(&self, limit: Duration) -> bool {
        let mut rx = self.ready.subscribe();
        tokio::time::timeout(limit, rx.wait_for(|r| *r))
            .await
            .is_ok()
    }

    /// Applies one change from `origin`: the only place endpoints change.
    pub fn apply(&self, origin: Origin, update: Update) {
        let mut inner = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        let set = &mut inner.sets[origin.index()];
        match update {
            Update::Reset(all) => {
                let mut old = std::mem::take(&mut set.endpoints);
                for d in all {
                    let k = known(old.remove(&d.id), d);
                    set.endpoints.insert(k.found.id.clone(), k);
                }
            }
            Update::Add(eps) => {
                for d in eps {
                    let k = known(set.endpoints.remove(&d.id), d);
                    set.endpoints.insert(k.found.id.clone(), k);
                }
            }
            Update::Remove(ids) => {
                for id in ids {
                    set.endpoints.remove(&id);
                }
            }
            Update::NoEndpoints => set.endpoints.clear(),
        }
        set.answered = true;
        if origin == self.origin() {
            self.rebuild(&inner);
        }
    }

    /// Replaces the policy (None: defaults).
    pub fn set_policy(&self, policy: Option<ServicePolicy>) {
        let mut inner = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        if inner.policy == policy {
            return;
        }
        let origin = origin_of(policy.as_ref(), self.default_origin);
        inner.policy = policy;
        self.origin
            .send_if_modified(|o| std::mem::replace(o, origin) != origin);
        self.rebuild(&inner);
    }

    /// Rebuilds what requests use from the current origin's endpoints.
    fn rebuild(&self, inner: &Inner) {
        let set = &inner.sets[self.origin().index()];
        self.ready.send_replace(set.answered);
        let healthy: Vec<_> = set
            .endpoints
            .values()
            .filter(|k| k.found.healthy)
            .map(|k| k.stats.clone())
            .collect();
        // With nothing healthy, try everything rather than fail everything
        // (Envoy's panic mode): health reports can be wrong, traffic is not.
        let eligible = if healthy.is_empty() {
            set.endpoints.values().map(|k| k.stats.clone()).collect()
        } else {
            healthy
        };
        let policy = inner.policy.clone();
        let kind = kind_of(policy.as_ref(), self.default_kind);
        let hash_key = match (kind, policy.as_ref().map(|p| p.hash_header.as_str())) {
            (Kind::RingHash | Kind::Maglev, Some(h)) if !h.is_empty() => {
                HashKey::Header(h.to_string())
            }
            (Kind::RingHash | Kind::Maglev, _) => HashKey::ClientIp,
            _ => HashKey::None,
        };
        let active = Active {
            balancer: balance::build(kind, eligible),
            hash_key,
            policy,
        };
        *self.active.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(active);
    }

    /// What the sidecar believes now, for `/endpoints`.
    pub fn view(&self) -> Vec<EndpointView> {
        let inner = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        inner.sets[self.origin().index()]
            .endpoints
            .values()
            .map(|k| EndpointView {
                id: k.found.id.clone(),
                addr: k.found.addr.to_string(),
                weight: k.found.weight,
                meshed: k.found.meshed,
                healthy: k.found.healthy,
                in_flight: k.stats.in_flight(),
                ewma_ms: k.stats.ewma_ns() / 1e6,
            })
            .collect()
    }
}

/// Every upstream the sidecar knows, started on first use.
#[derive(Default)]
pub struct Upstreams {
    map: RwLock<HashMap<String, Arc<Upstream>>>,
}

impl Upstreams {
    /// The upstream named `name`, if started.
    pub fn get(&self, name: &str) -> Option<Arc<Upstream>> {
        self.map.read().ok()?.get(name).cloned()
    }

    /// The upstream named `name`, created with `start` when new.
    pub fn get_or_start(
        &self,
        name: &str,
        start: impl FnOnce(&str) -> Arc<Upstream>,
    ) -> Arc<Upstream> {
        if let Some(u) = self.get(name) {
            return u;
        }
        let mut map = self.map.write().unwrap_or_else(|p| p.into_inner());
        map.entry(name.to_string())
            .or_insert_with(|| start(name))
            .clone()
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

    fn d(id: &str, port: u16, healthy: bool) -> Discovered {
        Discovered {
            id: id.into(),
            addr: ([127, 0, 0, 1], port).into(),
            weight: 100,
            meshed: true,
            healthy,
        }
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
    fn updates_apply_in_one_place_and_unhealthy_endpoints_are_skipped() {
        let u = Upstream::new("web", Kind::RoundRobin, Origin::Mesh);
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
        let u = Upstream::new("web", Kind::PeakEwma, Origin::Mesh);
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
        let u = Upstream::new("web", Kind::RoundRobin, Origin::Mesh);
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
        let u = Upstream::new("web", Kind::PeakEwma, Origin::Mesh);
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
}
