//! A service's routes as the sidecar applies them: the first route whose
//! match holds takes the request, and one of its backends (a label subset
//! of the service's endpoints, or another service) is drawn by weight.
//!
//! The table is compiled with the rest of [`crate::upstream::Active`] on
//! every discovery or policy change, so a subset's balancer is built over
//! its members once, not filtered per request. Without routes in the policy
//! the table is empty and a request costs one `is_empty` check.

use std::sync::{Arc, OnceLock};

use hyper::Method;
use hyper::header::HeaderMap;
use wayfinder_proto::policy::{BackendTarget, Route, Subset};
use wayfinder_proto::v1;

use crate::balance::{self, Balancer, EndpointStats, Kind};
use crate::header_match::HeaderConditions;
use crate::resilience::hedge::Hedge;
use crate::settings::{Origin, Settings};
use crate::traffic::EdgeCounts;

/// The compiled routes of one service, in policy order.
#[derive(Default)]
pub struct RouteTable {
    routes: Vec<CompiledRoute>,
}

/// One route, ready to match and split.
pub struct CompiledRoute {
    /// The route's name (metrics, traces).
    pub name: Arc<str>,
    matches: Match,
    /// Its backends in policy order.
    pub backends: Vec<CompiledBackend>,
    /// The service's settings with the route's timeouts and retries, when
    /// it has its own.
    pub settings: Option<Arc<Settings>>,
    /// The route's own hedging, replacing the service's.
    pub hedge: Option<Hedge>,
}

/// A route's conditions, in the types requests carry.
struct Match {
    path_prefix: Option<String>,
    method: Option<Method>,
    headers: HeaderConditions,
}

/// A weighted share of a route.
pub struct CompiledBackend {
    /// `version=v2`, or the other service's name: the `backend` of metrics
    /// and of the traffic report.
    pub label: Arc<str>,
    /// Relative weight (0 takes nothing).
    pub weight: u32,
    /// Where it goes.
    pub target: Target,
    /// Its counts in the traffic report, once it had a request.
    pub traffic: OnceLock<EdgeCounts>,
}

/// Where a backend's requests go.
pub enum Target {
    /// This service's endpoints carrying the subset's labels, balanced among
    /// themselves (a retry stays in the subset, as Istio's does).
    Subset(Box<dyn Balancer>),
    /// Another service, balanced as that service is.
    Service(Arc<str>),
}

impl Target {
    /// Whether it has nowhere to send a request.
    fn is_empty(&self) -> bool {
        match self {
            Target::Subset(b) => b.endpoints().is_empty(),
            Target::Service(_) => false,
        }
    }
}

/// Which route and backend took a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Chosen {
    /// Index of the route.
    pub route: usize,
    /// Index of the backend within it.
    pub backend: usize,
}

/// What the table needs to compile a route: the policy's members of a
/// subset, and the settings a route with its own timeouts or retries gets.
pub struct Compile<'a> {
    /// The eligible members of a subset (health, ejection and panic mode
    /// applied within the subset).
    pub members: &'a dyn Fn(&Subset) -> Vec<Arc<EndpointStats>>,
    /// The balancer algorithm of the service.
    pub kind: Kind,
    /// The service's policy, which route settings are resolved from.
    pub policy: &'a v1::ServicePolicy,
    /// Where the endpoints come from (settings depend on it).
    pub origin: Origin,
    /// The sidecar's defaults.
    pub defaults: &'a crate::settings::Defaults,
}

impl RouteTable {
    /// Compiles `routes` (already validated by the control plane and again
    /// by the model's types).
    pub fn compile(routes: &[Route], c: &Compile<'_>) -> Self {
        let routes = routes
            .iter()
            .map(|r| {
                let wire = v1::Route::from(r);
                CompiledRoute {
                    name: Arc::from(r.name.as_str()),
                    matches: Match {
                        path_prefix: r.matches.path_prefix.clone().map(String::from),
                        method: r
                            .matches
                            .method
                            .clone()
                            .and_then(|m| Method::from_bytes(String::from(m).as_bytes()).ok()),
                        headers: HeaderConditions::new(&r.matches.headers),
                    },
                    backends: r
                        .backends
                        .as_slice()
                        .iter()
                        .map(|b| {
                            let (label, target) = match &b.target {
                                BackendTarget::Subset(s) => (
                                    s.to_string(),
                                    Target::Subset(balance::build_with(
                                        c.kind,
                                        (c.members)(s),
                                        (c.policy.slow_start_ms != 0).then(|| {
                                            std::time::Duration::from_millis(
                                                c.policy.slow_start_ms.into(),
                                            )
                                        }),
                                    )),
                                ),
                                BackendTarget::Service(s) => (
                                    s.as_str().to_string(),
                                    Target::Service(Arc::from(s.as_str())),
                                ),
                            };
                            CompiledBackend {
                                label: Arc::from(label),
                                weight: b.weight.get(),
                                target,
                                traffic: OnceLock::new(),
                            }
                        })
                        .collect(),
                    settings: (wire.timeouts.is_some() || wire.retries.is_some()).then(|| {
                        Arc::new(Settings::resolve(
                            Some(&route_policy(c.policy, &wire)),
                            c.origin,
                            c.defaults,
                        ))
                    }),
                    hedge: r.hedging.as_ref().map(Hedge::new),
                }
            })
            .collect();
        Self { routes }
    }

    /// Whether the service has routes at all.
    pub fn is_empty(&self) -> bool {
        self.routes.is_empty()
    }

    /// The routes in order.
    pub fn routes(&self) -> &[CompiledRoute] {
        &self.routes
    }

    /// The route and backend for a request: the first route that matches,
    /// and a backend drawn by weight among those with somewhere to send it
    /// (`roll` in `0..1`). `None` when no route matches (the service's
    /// endpoints take it, as without routes).
    pub fn choose(
        &self,
        method: &Method,
        path: &str,
        headers: &HeaderMap,
        roll: f64,
    ) -> Option<Chosen> {
        let route = self
            .routes
            .iter()
            .position(|r| r.matches.holds(method, path, headers))?;
        let backend = draw(&self.routes[route].backends, roll)?;
        Some(Chosen { route, backend })
    }

    /// A backend by its indices, if the table still has it.
    pub fn backend(&self, c: Chosen) -> Option<(&CompiledRoute, &CompiledBackend)> {
        let r = self.routes.get(c.route)?;
        Some((r, r.backends.get(c.backend)?))
    }
}

/// A backend drawn by weight (`roll` in `0..1`). A subset without endpoints
/// is skipped while another can take the request, so a split to a version
/// not deployed yet costs nothing; when none can, the heaviest is returned
/// (and answers `no-endpoints`).
fn draw(backends: &[CompiledBackend], roll: f64) -> Option<usize> {
    let usable = |b: &CompiledBackend| b.weight > 0 && !b.target.is_empty();
    let total: u64 = backends
        .iter()
        .filter(|b| usable(b))
        .map(|b| u64::from(b.weight))
        .sum();
    if total == 0 {
        return backends
            .iter()
            .enumerate()
            .max_by_key(|(_, b)| b.weight)
            .map(|(i, _)| i);
    }
    let mut at = (roll.clamp(0.0, 1.0) * total as f64) as u64;
    for (i, b) in backends.iter().enumerate() {
        if !usable(b) {
            continue;
        }
        let w = u64::from(b.weight);
        if at < w {
            return Some(i);
        }
        at -= w;
    }
    // `roll` of exactly 1.0: the last usable one.
    backends.iter().rposition(usable)
}

impl Match {
    fn holds(&self, method: &Method, path: &str, headers: &HeaderMap) -> bool {
        self.path_prefix
            .as_deref()
            .is_none_or(|p| path.starts_with(p))
            && self.method.as_ref().is_none_or(|m| m == method)
            && self.headers.hold(headers)
    }
}

/// The service's policy as a route with its own timeouts or retries sees
/// it: the route's non-zero timeouts over the service's, its retry policy
/// instead of the service's.
fn route_policy(base: &v1::ServicePolicy, r: &v1::Route) -> v1::ServicePolicy {
    let mut p = base.clone();
    p.routes.clear();
    p.fault = None;
    if let Some(t) = &r.timeouts {
        let b = p.timeouts.get_or_insert_default();
        let pick = |own: u32, base: u32| if own != 0 { own } else { base };
        b.connect_ms = pick(t.connect_ms, b.connect_ms);
        b.per_try_ms = pick(t.per_try_ms, b.per_try_ms);
        b.request_ms = pick(t.request_ms, b.request_ms);
        b.idle_ms = pick(t.idle_ms, b.idle_ms);
        b.header_read_ms = pick(t.header_read_ms, b.header_read_ms);
    }
    if let Some(retries) = &r.retries {
        p.retries = Some(retries.clone());
    }
    p
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::settings::Defaults;
    use hyper::header::HeaderValue;
    use std::collections::HashMap;
    use wayfinder_proto::policy::PolicyFile;

    fn table(toml: &str, eps: &[(&str, &[(&str, &str)])]) -> RouteTable {
        let file = PolicyFile::parse("t.toml", toml).expect("valid");
        let (name, p) = file.services.iter().next().expect("one service");
        let wire = p.to_proto(name.as_str());
        let eps: Vec<(Arc<EndpointStats>, HashMap<String, String>)> = eps
            .iter()
            .enumerate()
            .map(|(i, (id, labels))| {
                let addr = std::net::SocketAddr::from(([127, 0, 0, 1], 8000 + i as u16));
                (
                    EndpointStats::new(*id, addr, 1),
                    labels
                        .iter()
                        .map(|(k, v)| (k.to_string(), v.to_string()))
                        .collect(),
                )
            })
            .collect();
        let members = |s: &Subset| {
            eps.iter()
                .filter(|(_, l)| s.selects(l))
                .map(|(e, _)| e.clone())
                .collect()
        };
        let defaults = Defaults::default();
        RouteTable::compile(
            p.routes.as_ref().map_or(&[][..], |r| r.as_slice()),
            &Compile {
                members: &members,
                kind: Kind::RoundRobin,
                policy: &wire,
                origin: Origin::Mesh,
                defaults: &defaults,
            },
        )
    }

    const SPLIT: &str = r#"
[[services.web.routes]]
name = "canary"
match = { headers = { "x-canary" = "1" } }
backends = [{ subset = { version = "v2" } }]
[[services.web.routes]]
name = "api"
match = { path_prefix = "/api", method = "GET" }
backends = [{ subset = { version = "v1" }, weight = 90 }, { subset = { version = "v2" }, weight = 10 }]
retries = { max_attempts = 1 }
"#;

    const EPS: &[(&str, &[(&str, &str)])] = &[
        ("web-1", &[("version", "v1")]),
        ("web-2", &[("version", "v1")]),
        ("web-3", &[("version", "v2")]),
    ];

    #[test]
    fn the_first_matching_route_takes_the_request() {
        let t = table(SPLIT, EPS);
        let mut h = HeaderMap::new();
        h.insert("x-canary", HeaderValue::from_static("1"));
        let c = t.choose(&Method::GET, "/api/x", &h, 0.0).expect("routed");
        assert_eq!((c.route, c.backend), (0, 0));
        let c = t
            .choose(&Method::GET, "/api/x", &HeaderMap::new(), 0.5)
            .expect("routed");
        assert_eq!((c.route, c.backend), (1, 0));
        assert!(
            t.choose(&Method::POST, "/api/x", &HeaderMap::new(), 0.5)
                .is_none()
        );
        assert!(
            t.choose(&Method::GET, "/other", &HeaderMap::new(), 0.5)
                .is_none()
        );
        let (r, b) = t.backend(c).expect("there");
        assert_eq!((&*r.name, &*b.label), ("api", "version=v1"));
        assert_eq!(r.settings.as_ref().map(|s| s.retry.max_attempts), Some(1));
        match &b.target {
            Target::Subset(bal) => assert_eq!(bal.endpoints().len(), 2),
            Target::Service(_) => panic!("a subset"),
        }
    }

    #[test]
    fn subsets_without_endpoints_are_skipped_while_another_can_take_it() {
        let t = table(SPLIT, &[("web-1", &[("version", "v1")])]);
        for roll in [0.0, 0.5, 0.95, 0.999, 1.0] {
            let c = t
                .choose(&Method::GET, "/api", &HeaderMap::new(), roll)
                .expect("routed");
            assert_eq!(c.backend, 0, "roll {roll}");
        }
    }

    proptest::proptest! {
        /// Over evenly spread rolls each backend takes exactly its weight's
        /// share (to within one roll per backend).
        #[test]
        fn draws_follow_the_weights(weights in proptest::collection::vec(0u32..50, 1..6)) {
            proptest::prop_assume!(weights.iter().any(|&w| w > 0));
            let backends: Vec<_> = weights.iter().enumerate().map(|(i, &w)| CompiledBackend {
                label: Arc::from(format!("b{i}")),
                weight: w,
                target: Target::Service(Arc::from("x")),
                traffic: OnceLock::new(),
            }).collect();
            let n = 10_000usize;
            let mut got = vec![0usize; weights.len()];
            for k in 0..n {
                let i = draw(&backends, (k as f64 + 0.5) / n as f64).expect("some backend");
                got[i] += 1;
            }
            let total: u32 = weights.iter().sum();
            for (i, &w) in weights.iter().enumerate() {
                let want = n as f64 * f64::from(w) / f64::from(total);
                proptest::prop_assert!((got[i] as f64 - want).abs() <= 1.0, "backend {i}: {} vs {want}", got[i]);
            }
        }
    }
}
