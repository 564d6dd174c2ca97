//! Traffic management in the policy: routes with weighted backends (label
//! subsets of the service, or other services) and injected faults, with
//! their wire form.
//!
//! ```toml
//! [[services.web.routes]]
//! name = "api"
//! match = { path_prefix = "/api", method = "GET", headers = { "x-canary" = "1" } }
//! backends = [{ subset = { version = "v1" }, weight = 90 }, { subset = { version = "v2" }, weight = 10 }]
//! timeouts = { per_try = "200ms" }
//!
//! [services.web.fault]
//! match = { instance = "web-2" }
//! abort = { status = 503, percent = 30 }
//! ```

use std::collections::{BTreeMap, HashMap};
use std::fmt;

use serde::{Deserialize, Serialize};

use super::file::PolicyError;
use super::model::{Retries, Timeouts};
use super::shaping::Hedging;
use super::values::{Bounded, HttpMethod, HttpPath, Millis, ServiceName, is_header_name};
use super::wire::{refused, section};
use crate::v1;

/// Most routes one service may have.
pub const MAX_ROUTES: usize = 64;
/// Most backends one route may have.
pub const MAX_BACKENDS: usize = 16;
/// Highest backend weight.
pub const MAX_BACKEND_WEIGHT: u32 = 10_000;

/// A service's routes, checked together: unique names, and no route after
/// one that matches every request (it could never match).
#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(try_from = "Vec<Route>", into = "Vec<Route>")]
pub struct Routes(Vec<Route>);

impl TryFrom<Vec<Route>> for Routes {
    type Error = String;
    fn try_from(routes: Vec<Route>) -> Result<Self, String> {
        if routes.len() > MAX_ROUTES {
            return Err(format!(
                "{} routes; at most {MAX_ROUTES} allowed",
                routes.len()
            ));
        }
        for (i, r) in routes.iter().enumerate() {
            if routes[..i].iter().any(|o| o.name == r.name) {
                return Err(format!("route name {:?} is used twice", r.name.0));
            }
            if let Some(all) = routes[..i].iter().find(|o| o.matches.is_empty()) {
                return Err(format!(
                    "route {:?} can never match: route {:?} before it matches every request",
                    r.name.0, all.name.0
                ));
            }
        }
        Ok(Self(routes))
    }
}
impl From<Routes> for Vec<Route> {
    fn from(r: Routes) -> Self {
        r.0
    }
}
impl Routes {
    /// The routes in order.
    pub fn as_slice(&self) -> &[Route] {
        &self.0
    }
    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// One route: which requests it takes and where they go.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Route {
    /// Name in metrics, traces and `wfctl split`.
    pub name: RouteName,
    /// Conditions; none means every request.
    #[serde(
        default,
        rename = "match",
        skip_serializing_if = "RouteMatch::is_empty"
    )]
    pub matches: RouteMatch,
    /// Where its requests go, by weight.
    pub backends: Backends,
    /// Timeouts for this route (unset ones: the service's).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeouts: Option<Timeouts>,
    /// Retries for this route instead of the service's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retries: Option<Retries>,
    /// Hedging for this route instead of the service's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hedging: Option<Hedging>,
}

/// A route name: a DNS label, as service names are.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Deserialize, Serialize)]
#[serde(try_from = "String", into = "String")]
pub struct RouteName(String);

impl TryFrom<String> for RouteName {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        crate::validate::service_name(&s)
            .map_err(|_| format!("{s:?} is not a route name: use a DNS label, e.g. \"api-v2\""))?;
        Ok(Self(s))
    }
}
impl From<RouteName> for String {
    fn from(n: RouteName) -> String {
        n.0
    }
}
impl RouteName {
    /// The name as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// Conditions a request must all meet.
#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RouteMatch {
    /// The path starts with this.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path_prefix: Option<HttpPath>,
    /// The method is this.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub method: Option<HttpMethod>,
    /// These headers have exactly these values.
    #[serde(default, skip_serializing_if = "HeaderMatch::is_empty")]
    pub headers: HeaderMatch,
}

impl RouteMatch {
    /// Whether it holds for every request.
    pub fn is_empty(&self) -> bool {
        self.path_prefix.is_none() && self.method.is_none() && self.headers.is_empty()
    }
}

/// Header name (lowercase) to exact value.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(
    try_from = "BTreeMap<String, String>",
    into = "BTreeMap<String, String>"
)]
pub struct HeaderMatch(BTreeMap<String, String>);

impl TryFrom<BTreeMap<String, String>> for HeaderMatch {
    type Error = String;
    fn try_from(m: BTreeMap<String, String>) -> Result<Self, String> {
        if m.len() > 16 {
            return Err(format!("{} headers; at most 16 allowed", m.len()));
        }
        let mut out = BTreeMap::new();
        for (k, v) in m {
            if !is_header_name(&k) {
                return Err(format!("{k:?} is not a header name"));
            }
            if v.len() > 1024 || !v.bytes().all(|b| b == b' ' || b.is_ascii_graphic()) {
                return Err(format!(
                    "the value of {k:?} must be printable ASCII of at most 1024 bytes"
                ));
            }
            out.insert(k.to_ascii_lowercase(), v);
        }
        Ok(Self(out))
    }
}
impl From<HeaderMatch> for BTreeMap<String, String> {
    fn from(h: HeaderMatch) -> Self {
        h.0
    }
}
impl HeaderMatch {
    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
    /// Name and value pairs.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &str)> {
        self.0.iter().map(|(k, v)| (k.as_str(), v.as_str()))
    }
}

/// Instance labels a subset selects on.
#[derive(Debug, Clone, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Deserialize, Serialize)]
#[serde(
    try_from = "BTreeMap<String, String>",
    into = "BTreeMap<String, String>"
)]
pub struct Subset(BTreeMap<String, String>);

impl TryFrom<BTreeMap<String, String>> for Subset {
    type Error = String;
    fn try_from(m: BTreeMap<String, String>) -> Result<Self, String> {
        if m.len() > crate::validate::MAX_LABELS {
            return Err(format!(
                "{} labels; at most {} allowed",
                m.len(),
                crate::validate::MAX_LABELS
            ));
        }
        for (k, v) in &m {
            crate::validate::label(k, v).map_err(|e| e.to_string())?;
        }
        Ok(Self(m))
    }
}
impl From<Subset> for BTreeMap<String, String> {
    fn from(s: Subset) -> Self {
        s.0
    }
}
impl Subset {
    /// Whether an instance with `labels` belongs to the subset.
    pub fn selects(&self, labels: &HashMap<String, String>) -> bool {
        self.0.iter().all(|(k, v)| labels.get(k) == Some(v))
    }
    /// Whether it selects every instance.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
    /// Label pairs.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &str)> {
        self.0.iter().map(|(k, v)| (k.as_str(), v.as_str()))
    }
}
impl fmt::Display for Subset {
    /// `version=v2` (pairs joined by `,`), as `wfctl split` writes them.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, (k, v)) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str(",")?;
            }
            write!(f, "{k}={v}")?;
        }
        Ok(())
    }
}

/// A route's backends: 1-16, with some weight in all.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(try_from = "Vec<Backend>", into = "Vec<Backend>")]
pub struct Backends(Vec<Backend>);

impl TryFrom<Vec<Backend>> for Backends {
    type Error = String;
    fn try_from(b: Vec<Backend>) -> Result<Self, String> {
        if b.is_empty() || b.len() > MAX_BACKENDS {
            return Err(format!(
                "{} backends: a route needs 1 to {MAX_BACKENDS}",
                b.len()
            ));
        }
        if b.iter().all(|b| b.weight.get() == 0) {
            return Err("every backend has weight 0: nothing could take a request".into());
        }
        for (i, x) in b.iter().enumerate() {
            if b[..i].iter().any(|y| y.target == x.target) {
                return Err(format!("backend {} is listed twice", x.target));
            }
        }
        Ok(Self(b))
    }
}
impl From<Backends> for Vec<Backend> {
    fn from(b: Backends) -> Self {
        b.0
    }
}
impl Backends {
    /// The backends in order.
    pub fn as_slice(&self) -> &[Backend] {
        &self.0
    }
}

/// Where a backend's requests go.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum BackendTarget {
    /// The service's instances carrying these labels.
    Subset(Subset),
    /// Another service.
    Service(ServiceName),
}

impl fmt::Display for BackendTarget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Subset(s) => write!(f, "subset {s}"),
            Self::Service(s) => write!(f, "service {}", s.as_str()),
        }
    }
}

/// A weighted share of a route.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(try_from = "BackendFields", into = "BackendFields")]
pub struct Backend {
    /// Where it goes.
    pub target: BackendTarget,
    /// Relative weight, 0-10000.
    pub weight: Bounded<0, MAX_BACKEND_WEIGHT>,
}

/// [`Backend`] as written: a subset or a service.
#[derive(Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
struct BackendFields {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    subset: Option<Subset>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    service: Option<ServiceName>,
    #[serde(default = "one")]
    weight: Bounded<0, MAX_BACKEND_WEIGHT>,
}

fn one() -> Bounded<0, MAX_BACKEND_WEIGHT> {
    Bounded::new(1).unwrap_or_else(|_| unreachable!("1 is within 0..=10000"))
}

impl TryFrom<BackendFields> for Backend {
    type Error = String;
    fn try_from(f: BackendFields) -> Result<Self, String> {
        let target = match (f.subset, f.service) {
            // The wire cannot tell an empty subset from none: the service
            // itself says the same thing.
            (Some(s), None) if s.is_empty() => {
                return Err(
                    "an empty subset selects every instance: name the service itself instead"
                        .into(),
                );
            }
            (Some(s), None) => BackendTarget::Subset(s),
            (None, Some(s)) => BackendTarget::Service(s),
            _ => {
                return Err(
                    "a backend names either a subset = { label = \"value\" } or a service".into(),
                );
            }
        };
        Ok(Self {
            target,
            weight: f.weight,
        })
    }
}
impl From<Backend> for BackendFields {
    fn from(b: Backend) -> Self {
        let (subset, service) = match b.target {
            BackendTarget::Subset(s) => (Some(s), None),
            BackendTarget::Service(s) => (None, Some(s)),
        };
        Self {
            subset,
            service,
            weight: b.weight,
        }
    }
}

/// A percentage of requests, 0-100.
#[derive(Debug, Clone, Copy, PartialEq, PartialOrd, Deserialize, Serialize)]
#[serde(try_from = "f64", into = "f64")]
pub struct Percent(f64);

impl Percent {
    /// Checks a percentage.
    pub fn new(v: f64) -> Result<Self, String> {
        if !(0.0..=100.0).contains(&v) {
            return Err(format!("{v} is not a percentage: use 0 to 100"));
        }
        Ok(Self(v))
    }
    /// The percentage.
    pub fn get(self) -> f64 {
        self.0
    }
}
impl TryFrom<f64> for Percent {
    type Error = String;
    fn try_from(v: f64) -> Result<Self, String> {
        Self::new(v)
    }
}
impl From<Percent> for f64 {
    fn from(p: Percent) -> f64 {
        p.0
    }
}

/// Failures the callers' sidecars inject into calls to the service.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(try_from = "FaultFields", into = "FaultFields")]
pub struct Fault {
    /// Which tries it applies to.
    pub matches: FaultMatch,
    /// Answer with a status instead.
    pub abort: Option<Abort>,
    /// Wait before sending.
    pub delay: Option<Delay>,
    /// Act as if the connection were reset.
    pub reset: Option<Percent>,
    /// Wall-clock end, Unix milliseconds.
    pub expires_at_unix_ms: Option<u64>,
}

/// [`Fault`] as written.
#[derive(Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
struct FaultFields {
    #[serde(
        default,
        rename = "match",
        skip_serializing_if = "FaultMatch::is_empty"
    )]
    matches: FaultMatch,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    abort: Option<Abort>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    delay: Option<Delay>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    reset: Option<ResetFields>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    expires_at_unix_ms: Option<u64>,
}

#[derive(Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
struct ResetFields {
    percent: Percent,
}

impl TryFrom<FaultFields> for Fault {
    type Error = String;
    fn try_from(f: FaultFields) -> Result<Self, String> {
        if f.abort.is_none() && f.delay.is_none() && f.reset.is_none() {
            return Err("a fault needs an abort, a delay or a reset".into());
        }
        // TOML integers are i64: a later end could not be written back.
        if f.expires_at_unix_ms.is_some_and(|t| t > i64::MAX as u64) {
            return Err(
                "expires_at_unix_ms is past the largest time a policy file can hold".into(),
            );
        }
        Ok(Self {
            matches: f.matches,
            abort: f.abort,
            delay: f.delay,
            reset: f.reset.map(|r| r.percent),
            expires_at_unix_ms: f.expires_at_unix_ms.filter(|&t| t != 0),
        })
    }
}
impl From<Fault> for FaultFields {
    fn from(f: Fault) -> Self {
        Self {
            matches: f.matches,
            abort: f.abort,
            delay: f.delay,
            reset: f.reset.map(|percent| ResetFields { percent }),
            expires_at_unix_ms: f.expires_at_unix_ms,
        }
    }
}

/// Which tries a fault applies to.
#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct FaultMatch {
    /// The instance picked for the try.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub instance: Option<InstanceId>,
    /// The path starts with this.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path_prefix: Option<HttpPath>,
    /// These headers have exactly these values.
    #[serde(default, skip_serializing_if = "HeaderMatch::is_empty")]
    pub headers: HeaderMatch,
}
impl FaultMatch {
    /// Whether it holds for every try.
    pub fn is_empty(&self) -> bool {
        self.instance.is_none() && self.path_prefix.is_none() && self.headers.is_empty()
    }
}

/// An instance id in a fault match.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(try_from = "String", into = "String")]
pub struct InstanceId(String);
impl TryFrom<String> for InstanceId {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        crate::validate::instance_id(&s).map_err(|e| e.to_string())?;
        Ok(Self(s))
    }
}
impl From<InstanceId> for String {
    fn from(i: InstanceId) -> String {
        i.0
    }
}
impl InstanceId {
    /// The id as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// Answer with `status` instead of calling the endpoint.
#[derive(Debug, Clone, Copy, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Abort {
    /// HTTP status, 200-599.
    pub status: Bounded<200, 599>,
    /// Share of matching tries.
    pub percent: Percent,
}

/// Wait before calling the endpoint.
#[derive(Debug, Clone, Copy, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Delay {
    /// How long.
    pub duration: Millis,
    /// Share of matching tries.
    pub percent: Percent,
}

// ---- wire form ----

fn headers_to_wire(h: &HeaderMatch) -> HashMap<String, String> {
    h.iter().map(|(k, v)| (k.into(), v.into())).collect()
}

fn headers_from_wire(field: &str, h: &HashMap<String, String>) -> Result<HeaderMatch, PolicyError> {
    HeaderMatch::try_from(
        h.iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect::<BTreeMap<_, _>>(),
    )
    .map_err(|m| refused(field, m))
}

fn opt<T: TryFrom<String, Error = String>>(field: &str, s: &str) -> Result<Option<T>, PolicyError> {
    (!s.is_empty())
        .then(|| T::try_from(s.to_string()))
        .transpose()
        .map_err(|m| refused(field, m))
}

fn percent(field: &str, v: f64) -> Result<Percent, PolicyError> {
    Percent::new(v).map_err(|m| refused(field, m))
}

impl From<&Route> for v1::Route {
    fn from(r: &Route) -> Self {
        v1::Route {
            name: r.name.0.clone(),
            r#match: (!r.matches.is_empty()).then(|| v1::RouteMatch {
                path_prefix: r
                    .matches
                    .path_prefix
                    .clone()
                    .map(String::from)
                    .unwrap_or_default(),
                method: r
                    .matches
                    .method
                    .clone()
                    .map(String::from)
                    .unwrap_or_default(),
                headers: headers_to_wire(&r.matches.headers),
            }),
            backends: r
                .backends
                .0
                .iter()
                .map(|b| {
                    let (subset, service) = match &b.target {
                        BackendTarget::Subset(s) => (
                            s.iter().map(|(k, v)| (k.into(), v.into())).collect(),
                            String::new(),
                        ),
                        BackendTarget::Service(s) => (HashMap::new(), s.as_str().to_string()),
                    };
                    v1::RouteBackend {
                        subset,
                        service,
                        weight: b.weight.get(),
                    }
                })
                .collect(),
            timeouts: r.timeouts.as_ref().map(Into::into),
            retries: r.retries.as_ref().map(Into::into),
            hedging: r.hedging.as_ref().map(Into::into),
        }
    }
}

/// The routes of a wire policy, checked as a file's are.
pub(super) fn routes_from_wire(routes: &[v1::Route]) -> Result<Option<Routes>, PolicyError> {
    if routes.is_empty() {
        return Ok(None);
    }
    let list = routes
        .iter()
        .enumerate()
        .map(|(i, r)| route_from_wire(&format!("routes[{i}]"), r))
        .collect::<Result<Vec<_>, _>>()?;
    Routes::try_from(list)
        .map(Some)
        .map_err(|m| refused("routes", m))
}

fn route_from_wire(field: &str, r: &v1::Route) -> Result<Route, PolicyError> {
    let at = |f: &str| format!("{field}.{f}");
    let m = r.r#match.clone().unwrap_or_default();
    let backends = r
        .backends
        .iter()
        .enumerate()
        .map(|(i, b)| {
            let f = at(&format!("backends[{i}]"));
            let subset = (!b.subset.is_empty())
                .then(|| Subset::try_from(b.subset.clone().into_iter().collect::<BTreeMap<_, _>>()))
                .transpose()
                .map_err(|m| refused(&format!("{f}.subset"), m))?;
            let service = opt::<ServiceName>(&format!("{f}.service"), &b.service)?;
            Backend::try_from(BackendFields {
                subset,
                service,
                weight: Bounded::new(b.weight.into())
                    .map_err(|m| refused(&format!("{f}.weight"), m))?,
            })
            .map_err(|m| refused(&f, m))
        })
        .collect::<Result<Vec<_>, _>>()?;
    let in_route = |e: PolicyError| PolicyError {
        field: at(&e.field),
        ..e
    };
    Ok(Route {
        name: RouteName::try_from(r.name.clone()).map_err(|m| refused(&at("name"), m))?,
        matches: RouteMatch {
            path_prefix: opt(&at("match.path_prefix"), &m.path_prefix)?,
            method: opt(&at("match.method"), &m.method)?,
            headers: headers_from_wire(&at("match.headers"), &m.headers)?,
        },
        backends: Backends::try_from(backends).map_err(|m| refused(&at("backends"), m))?,
        timeouts: section(&r.timeouts).map_err(in_route)?,
        retries: section(&r.retries).map_err(in_route)?,
        hedging: section(&r.hedging).map_err(in_route)?,
    })
}

impl From<&Fault> for v1::Fault {
    fn from(f: &Fault) -> Self {
        v1::Fault {
            r#match: (!f.matches.is_empty()).then(|| v1::FaultMatch {
                instance: f
                    .matches
                    .instance
                    .clone()
                    .map(String::from)
                    .unwrap_or_default(),
                path_prefix: f
                    .matches
                    .path_prefix
                    .clone()
                    .map(String::from)
                    .unwrap_or_default(),
                headers: headers_to_wire(&f.matches.headers),
            }),
            abort: f.abort.map(|a| v1::FaultAbort {
                status: a.status.get(),
                percent: a.percent.get(),
            }),
            delay: f.delay.map(|d| v1::FaultDelay {
                duration_ms: d.duration.get(),
                percent: d.percent.get(),
            }),
            reset: f.reset.map(|p| v1::FaultReset { percent: p.get() }),
            expires_at_unix_ms: f.expires_at_unix_ms.unwrap_or(0),
        }
    }
}

impl TryFrom<&v1::Fault> for Fault {
    type Error = PolicyError;
    fn try_from(f: &v1::Fault) -> Result<Self, PolicyError> {
        let m = f.r#match.clone().unwrap_or_default();
        let fields = FaultFields {
            matches: FaultMatch {
                instance: opt("fault.match.instance", &m.instance)?,
                path_prefix: opt("fault.match.path_prefix", &m.path_prefix)?,
                headers: headers_from_wire("fault.match.headers", &m.headers)?,
            },
            abort: f
                .abort
                .as_ref()
                .map(|a| {
                    Ok::<_, PolicyError>(Abort {
                        status: Bounded::new(a.status.into())
                            .map_err(|m| refused("fault.abort.status", m))?,
                        percent: percent("fault.abort.percent", a.percent)?,
                    })
                })
                .transpose()?,
            delay: f
                .delay
                .as_ref()
                .map(|d| {
                    Ok::<_, PolicyError>(Delay {
                        duration: Millis::new(d.duration_ms)
                            .map_err(|m| refused("fault.delay.duration", m))?,
                        percent: percent("fault.delay.percent", d.percent)?,
                    })
                })
                .transpose()?,
            reset: f
                .reset
                .as_ref()
                .map(|r| {
                    percent("fault.reset.percent", r.percent).map(|percent| ResetFields { percent })
                })
                .transpose()?,
            expires_at_unix_ms: Some(f.expires_at_unix_ms),
        };
        Fault::try_from(fields).map_err(|m| refused("fault", m))
    }
}

#[cfg(test)]
mod tests {
    use super::super::PolicyFile;

    const GOOD: &str = r#"
[[services.web.routes]]
name = "canary-header"
match = { headers = { "x-canary" = "1" } }
backends = [{ subset = { version = "v2" } }]

[[services.web.routes]]
name = "api"
match = { path_prefix = "/api", method = "GET" }
backends = [{ subset = { version = "v1" }, weight = 90 }, { subset = { version = "v2" }, weight = 10 }]
timeouts = { per_try = "200ms" }
retries = { max_attempts = 2 }
hedging = { after = "p90", max_extra = 2 }

[[services.web.routes]]
name = "default"
backends = [{ service = "web-legacy" }]

[services.web.fault]
match = { instance = "web-2", path_prefix = "/" }
abort = { status = 503, percent = 30 }
delay = { duration = "200ms", percent = 25 }
reset = { percent = 5 }
expires_at_unix_ms = 1764547200000
"#;

    #[test]
    fn routes_and_faults_round_trip_through_the_wire_and_toml() {
        let file = PolicyFile::parse("p.toml", GOOD).expect("parses");
        let web = &file.services.values().next().expect("web").clone();
        assert_eq!(web.routes.as_ref().map(|r| r.as_slice().len()), Some(3));
        let wire = web.to_proto("web");
        let (_, back) = super::super::ServicePolicy::from_proto(&wire).expect("valid on the wire");
        assert_eq!(&back, web);
        let again = PolicyFile::parse("again", &file.to_toml()).expect("own output parses");
        assert_eq!(again, file);
    }

    fn error_of(text: &str) -> super::super::PolicyError {
        PolicyFile::parse("p.toml", text).expect_err("must be refused")
    }

    #[test]
    fn bad_routes_and_faults_name_file_line_and_field() {
        let e = error_of(
            "[[services.web.routes]]\nname = \"a\"\nbackends = [{ subset = { version = \"v2\" }, weight = 20000 }]\n",
        );
        assert_eq!(
            (e.line, e.field.as_str()),
            (3, "services.web.routes.backends"),
            "{e}"
        );
        assert!(e.message.contains("out of range"), "{e}");

        let e = error_of(
            "[[services.web.routes]]\nname = \"Bad Name\"\nbackends = [{ service = \"x\" }]\n",
        );
        assert_eq!(
            (e.line, e.field.as_str()),
            (2, "services.web.routes.name"),
            "{e}"
        );

        let e = error_of(
            "[[services.web.routes]]\nname = \"a\"\nbackends = [{ subset = { v = \"1\" }, service = \"x\" }]\n",
        );
        assert_eq!(e.line, 3, "{e}");
        assert!(e.message.contains("either a subset"), "{e}");

        let e = error_of("[[services.web.routes]]\nname = \"a\"\nbackends = [{ subset = {} }]\n");
        assert_eq!(e.line, 3, "{e}");
        assert!(e.message.contains("empty subset"), "{e}");

        let e = error_of(
            "[[services.web.routes]]\nname = \"a\"\nmatch = { method = \"get\" }\nbackends = [{ service = \"x\" }]\n",
        );
        assert_eq!(
            (e.line, e.field.as_str()),
            (3, "services.web.routes.match"),
            "{e}"
        );

        let e = error_of(
            "[[services.web.routes]]\nname = \"all\"\nbackends = [{ service = \"x\" }]\n[[services.web.routes]]\nname = \"b\"\nmatch = { path_prefix = \"/b\" }\nbackends = [{ service = \"y\" }]\n",
        );
        assert!(e.message.contains("can never match"), "{e}");

        let e = error_of("[services.web.fault]\nabort = { status = 503, percent = 130 }\n");
        assert_eq!(
            (e.line, e.field.as_str()),
            (2, "services.web.fault.abort"),
            "{e}"
        );
        assert!(e.message.contains("percentage"), "{e}");

        let e = error_of("[services.web.fault]\nabort = { status = 99, percent = 10 }\n");
        assert_eq!(e.line, 2, "{e}");

        let e = error_of("[services.web.fault]\nmatch = { instance = \"web-2\" }\n");
        assert!(e.message.contains("abort, a delay or a reset"), "{e}");
    }

    #[test]
    fn wire_routes_are_checked_like_files() {
        let mut p = PolicyFile::parse("p.toml", GOOD)
            .expect("parses")
            .to_proto()
            .remove(0);
        p.routes[1].backends[0].weight = 20_000;
        let e = super::super::ServicePolicy::from_proto(&p).expect_err("refused");
        assert_eq!(e.field, "services.web.routes[1].backends[0].weight", "{e}");
        let mut p = PolicyFile::parse("p.toml", GOOD)
            .expect("parses")
            .to_proto()
            .remove(0);
        if let Some(f) = p.fault.as_mut() {
            f.abort = None;
            f.delay = None;
            f.reset = None;
        }
        let e = super::super::ServicePolicy::from_proto(&p).expect_err("refused");
        assert_eq!(e.field, "services.web.fault", "{e}");
    }
}
