//! Conversion of the policy model to and from the `wayfinder.v1` protobuf messages.

use super::file::PolicyError;
use super::model::{
    Authz, AuthzDefault, AuthzRule, Balancer, CircuitBreaker, Discovery, HashKey, HealthCheck,
    Outlier, PolicyFile, Retries, RetryOn, ServicePolicy, Timeouts,
};
use super::values::{
    Bounded, Caller, GrpcServiceName, HttpMethod, HttpPath, Millis, Ratio, ServiceName,
};
use crate::v1;

impl PolicyFile {
    /// The policies as wire messages.
    pub fn to_proto(&self) -> Vec<v1::ServicePolicy> {
        self.services
            .iter()
            .map(|(name, p)| p.to_proto(name.as_str()))
            .collect()
    }
}

impl ServicePolicy {
    /// The wire form for `service`.
    pub fn to_proto(&self, service: &str) -> v1::ServicePolicy {
        use v1::{BalancerKind as B, DiscoveryMode as D};
        v1::ServicePolicy {
            service: service.to_string(),
            discovery: self.discovery.map_or(D::Unspecified, D::from) as i32,
            balancer: self.balancer.map_or(B::Unspecified, B::from) as i32,
            hash_header: match &self.hash_key {
                Some(HashKey::Header(h)) => h.clone(),
                _ => String::new(),
            },
            timeouts: self.timeouts.as_ref().map(Into::into),
            retries: self.retries.as_ref().map(Into::into),
            outlier: self.outlier.as_ref().map(Into::into),
            circuit_breakers: self.circuit_breaker.as_ref().map(Into::into),
            authz: self.authz.as_ref().map(Into::into),
            allow_tunnels: self.tunnels == Some(true),
            health_check: self.health_check.as_ref().map(Into::into),
            routes: self
                .routes
                .as_ref()
                .map(|r| r.as_slice().iter().map(Into::into).collect())
                .unwrap_or_default(),
            fault: self.fault.as_ref().map(Into::into),
            rate_limit: self.rate_limit.as_ref().map(Into::into),
            mirror: self.mirror.as_ref().map(Into::into),
            hedging: self.hedging.as_ref().map(Into::into),
            locality: self.locality.as_ref().map(Into::into),
            slow_start_ms: millis(self.slow_start),
        }
    }

    /// Validates a policy received over the wire with the same rules as the
    /// TOML form. The error names the offending field.
    pub fn from_proto(p: &v1::ServicePolicy) -> Result<(ServiceName, Self), PolicyError> {
        let name = ServiceName::try_from(p.service.clone()).map_err(|m| refused("service", m))?;
        let policy = sections(p).map_err(|e| within(&format!("services.{}", p.service), e))?;
        Ok((name, policy))
    }
}

/// Everything in `p` but the service name, in the order [`ServicePolicy::from_proto`] has
/// always checked it (the first error wins).
fn sections(p: &v1::ServicePolicy) -> Result<ServicePolicy, PolicyError> {
    let discovery = discovery(p.discovery)?;
    let balancer = balancer(p.balancer)?;
    Ok(ServicePolicy {
        discovery,
        balancer,
        hash_key: hash_key(&p.hash_header, balancer)?,
        timeouts: section(&p.timeouts)?,
        retries: section(&p.retries)?,
        outlier: section(&p.outlier)?,
        circuit_breaker: section(&p.circuit_breakers)?,
        health_check: section(&p.health_check)?,
        authz: section(&p.authz)?,
        tunnels: p.allow_tunnels.then_some(true),
        routes: super::traffic::routes_from_wire(&p.routes)?,
        fault: section(&p.fault)?,
        rate_limit: section(&p.rate_limit)?,
        mirror: section(&p.mirror)?,
        hedging: section(&p.hedging)?,
        locality: section(&p.locality)?,
        slow_start: ms("slow_start", p.slow_start_ms)?,
    })
}

/// An error in a policy that came in a request. Each section's `TryFrom` names `field`
/// relative to the service's table (e.g. `timeouts.connect`);
/// [`ServicePolicy::from_proto`] then prefixes it with `services.NAME`.
pub(super) fn refused(field: &str, message: String) -> PolicyError {
    PolicyError {
        file: "request".into(),
        line: 0,
        field: field.into(),
        message,
    }
}

/// `e` with its field moved under the table `prefix`.
fn within(prefix: &str, e: PolicyError) -> PolicyError {
    PolicyError {
        field: format!("{prefix}.{}", e.field),
        ..e
    }
}

/// An optional section, checked when present.
pub(super) fn section<'a, P, T>(p: &'a Option<P>) -> Result<Option<T>, PolicyError>
where
    T: TryFrom<&'a P, Error = PolicyError>,
{
    p.as_ref().map(T::try_from).transpose()
}

/// A duration in milliseconds; 0 means unset.
fn ms(field: &str, v: u32) -> Result<Option<Millis>, PolicyError> {
    (v != 0)
        .then(|| Millis::new(v))
        .transpose()
        .map_err(|m| refused(field, m))
}

/// A bounded count; 0 means unset.
fn n<const A: u32, const B: u32>(
    field: &str,
    v: u32,
) -> Result<Option<Bounded<A, B>>, PolicyError> {
    (v != 0)
        .then(|| Bounded::new(v.into()))
        .transpose()
        .map_err(|m| refused(field, m))
}

/// The one mapping of discovery sources to the wire's.
const DISCOVERIES: [(Discovery, v1::DiscoveryMode); 2] = [
    (Discovery::Mesh, v1::DiscoveryMode::Mesh),
    (Discovery::Dns, v1::DiscoveryMode::Dns),
];

/// The one mapping of balancers to the wire's.
const BALANCERS: [(Balancer, v1::BalancerKind); 6] = [
    (Balancer::RoundRobin, v1::BalancerKind::RoundRobin),
    (
        Balancer::WeightedRoundRobin,
        v1::BalancerKind::WeightedRoundRobin,
    ),
    (Balancer::LeastRequest, v1::BalancerKind::LeastRequest),
    (Balancer::PeakEwma, v1::BalancerKind::PeakEwma),
    (Balancer::RingHash, v1::BalancerKind::RingHash),
    (Balancer::Maglev, v1::BalancerKind::Maglev),
];

/// The policy value a wire value names, by `table`: `Ok(None)` when the
/// wire leaves it unspecified (0), `Err` for a value this build does not know.
fn from_wire<P: Copy, W: Copy + Into<i32>>(table: &[(P, W)], v: i32) -> Result<Option<P>, ()> {
    if v == 0 {
        return Ok(None);
    }
    table
        .iter()
        .find(|(_, w)| (*w).into() == v)
        .map(|(p, _)| Some(*p))
        .ok_or(())
}

/// The wire value of `p` by `table` (unspecified if it were missing).
fn to_wire<P: Copy + PartialEq, W: Copy + Default>(table: &[(P, W)], p: P) -> W {
    table
        .iter()
        .find(|(q, _)| *q == p)
        .map_or_else(W::default, |(_, w)| *w)
}

impl Discovery {
    /// The source a wire `DiscoveryMode` names, if it names one this build knows.
    pub fn from_wire(mode: i32) -> Option<Self> {
        from_wire(&DISCOVERIES, mode).ok().flatten()
    }
}

impl Balancer {
    /// The balancer a wire `BalancerKind` names, if it names one this build knows.
    pub fn from_wire(kind: i32) -> Option<Self> {
        from_wire(&BALANCERS, kind).ok().flatten()
    }
}

fn discovery(mode: i32) -> Result<Option<Discovery>, PolicyError> {
    from_wire(&DISCOVERIES, mode).map_err(|()| refused("discovery", format!("unknown mode {mode}")))
}

fn balancer(kind: i32) -> Result<Option<Balancer>, PolicyError> {
    from_wire(&BALANCERS, kind)
        .map_err(|()| refused("balancer", format!("unknown balancer {kind}")))
}

/// The hash key: the header if one is named, else the client IP for hash balancers.
fn hash_key(header: &str, balancer: Option<Balancer>) -> Result<Option<HashKey>, PolicyError> {
    if header.is_empty() {
        return Ok(
            matches!(balancer, Some(Balancer::RingHash | Balancer::Maglev))
                .then_some(HashKey::ClientIp),
        );
    }
    HashKey::try_from(format!("header:{header}"))
        .map(Some)
        .map_err(|m| refused("hash_key", m))
}

impl TryFrom<&v1::Timeouts> for Timeouts {
    type Error = PolicyError;
    fn try_from(t: &v1::Timeouts) -> Result<Self, PolicyError> {
        Ok(Self {
            connect: ms("timeouts.connect", t.connect_ms)?,
            per_try: ms("timeouts.per_try", t.per_try_ms)?,
            request: ms("timeouts.request", t.request_ms)?,
            idle: ms("timeouts.idle", t.idle_ms)?,
            header_read: ms("timeouts.header_read", t.header_read_ms)?,
        })
    }
}

impl TryFrom<&v1::RetryPolicy> for Retries {
    type Error = PolicyError;
    fn try_from(r: &v1::RetryPolicy) -> Result<Self, PolicyError> {
        let retry_on = r
            .retry_on
            .iter()
            .map(|s| RetryOn::parse(s))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|m| refused("retries.retry_on", m))?;
        let budget_ratio = if r.budget_ratio == 0.0 {
            None
        } else {
            Some(Ratio::new(r.budget_ratio).map_err(|m| refused("retries.budget_ratio", m))?)
        };
        let retries = Self {
            max_attempts: n("retries.max_attempts", r.max_attempts)?,
            retry_on: (!retry_on.is_empty()).then_some(retry_on),
            non_idempotent: r.retry_non_idempotent.then_some(true),
            max_body_bytes: n("retries.max_body_bytes", r.max_body_bytes)?,
            backoff_base: ms("retries.backoff_base", r.backoff_base_ms)?,
            backoff_max: ms("retries.backoff_max", r.backoff_max_ms)?,
            budget_ratio,
            budget_min_per_sec: n("retries.budget_min_per_sec", r.budget_min_per_sec)?,
        };
        retries.check().map_err(|m| refused("retries", m))?;
        Ok(retries)
    }
}

impl TryFrom<&v1::OutlierDetection> for Outlier {
    type Error = PolicyError;
    fn try_from(o: &v1::OutlierDetection) -> Result<Self, PolicyError> {
        Ok(Self {
            enabled: o.disabled.then_some(false),
            consecutive_failures: n("outlier.consecutive_failures", o.consecutive_failures)?,
            consecutive_gateway_errors: n(
                "outlier.consecutive_gateway_errors",
                o.consecutive_gateway_errors,
            )?,
            base_ejection: ms("outlier.base_ejection", o.base_ejection_ms)?,
            max_ejection: ms("outlier.max_ejection", o.max_ejection_ms)?,
            max_ejection_percent: n("outlier.max_ejection_percent", o.max_ejection_percent)?,
        })
    }
}

impl TryFrom<&v1::CircuitBreakers> for CircuitBreaker {
    type Error = PolicyError;
    fn try_from(c: &v1::CircuitBreakers) -> Result<Self, PolicyError> {
        Ok(Self {
            max_connections: n("circuit_breaker.max_connections", c.max_connections)?,
            max_pending_requests: n(
                "circuit_breaker.max_pending_requests",
                c.max_pending_requests,
            )?,
            max_requests: n("circuit_breaker.max_requests", c.max_requests)?,
            max_active_retries: n("circuit_breaker.max_active_retries", c.max_active_retries)?,
        })
    }
}

impl TryFrom<&v1::HealthCheck> for HealthCheck {
    type Error = PolicyError;
    fn try_from(h: &v1::HealthCheck) -> Result<Self, PolicyError> {
        let hc = Self {
            enabled: Some(h.enabled),
            http_path: if h.http_path.is_empty() {
                None
            } else {
                Some(
                    HttpPath::try_from(h.http_path.clone())
                        .map_err(|m| refused("health_check.http_path", m))?,
                )
            },
            grpc: h.grpc.then_some(true),
            grpc_service: (!h.grpc_service.is_empty())
                .then(|| GrpcServiceName::try_from(h.grpc_service.clone()))
                .transpose()
                .map_err(|m| refused("health_check.grpc_service", m))?,
            interval: ms("health_check.interval", h.interval_ms)?,
            timeout: ms("health_check.timeout", h.timeout_ms)?,
            healthy_threshold: n("health_check.healthy_threshold", h.healthy_threshold)?,
            unhealthy_threshold: n("health_check.unhealthy_threshold", h.unhealthy_threshold)?,
        };
        hc.check().map_err(|m| refused("health_check", m))?;
        Ok(hc)
    }
}

impl TryFrom<&v1::Authorization> for Authz {
    type Error = PolicyError;
    fn try_from(a: &v1::Authorization) -> Result<Self, PolicyError> {
        let allow = a
            .allow
            .iter()
            .enumerate()
            .map(|(i, r)| authz_rule(&format!("authz.allow[{i}]"), r))
            .collect::<Result<_, _>>()?;
        Ok(Self {
            default: a.default_deny.then_some(AuthzDefault::Deny),
            allow,
        })
    }
}

/// One allow rule; `field` is the rule's own path, e.g. `authz.allow[0]`.
fn authz_rule(field: &str, r: &v1::AuthzRule) -> Result<AuthzRule, PolicyError> {
    Ok(AuthzRule {
        from: r
            .from
            .iter()
            .map(|c| Caller::try_from(c.clone()))
            .collect::<Result<_, _>>()
            .map_err(|m| refused(&format!("{field}.from"), m))?,
        methods: r
            .methods
            .iter()
            .map(|m| HttpMethod::try_from(m.clone()))
            .collect::<Result<_, _>>()
            .map_err(|m| refused(&format!("{field}.methods"), m))?,
        paths: r
            .path_prefixes
            .iter()
            .map(|p| HttpPath::try_from(p.clone()))
            .collect::<Result<_, _>>()
            .map_err(|m| refused(&format!("{field}.paths"), m))?,
    })
}

impl From<Discovery> for v1::DiscoveryMode {
    fn from(d: Discovery) -> Self {
        to_wire(&DISCOVERIES, d)
    }
}

impl From<Balancer> for v1::BalancerKind {
    fn from(b: Balancer) -> Self {
        to_wire(&BALANCERS, b)
    }
}

/// Milliseconds on the wire; 0 means unset.
fn millis(m: Option<Millis>) -> u32 {
    m.map_or(0, Millis::get)
}

/// A count on the wire; 0 means unset.
fn count<const A: u32, const B: u32>(b: Option<Bounded<A, B>>) -> u32 {
    b.map_or(0, Bounded::get)
}

impl From<&Timeouts> for v1::Timeouts {
    fn from(t: &Timeouts) -> Self {
        Self {
            connect_ms: millis(t.connect),
            per_try_ms: millis(t.per_try),
            request_ms: millis(t.request),
            idle_ms: millis(t.idle),
            header_read_ms: millis(t.header_read),
        }
    }
}

impl From<&Retries> for v1::RetryPolicy {
    fn from(r: &Retries) -> Self {
        Self {
            max_attempts: count(r.max_attempts),
            retry_on: r
                .retry_on
                .iter()
                .flatten()
                .map(|c| c.name().to_string())
                .collect(),
            retry_non_idempotent: r.non_idempotent.unwrap_or(false),
            max_body_bytes: count(r.max_body_bytes),
            backoff_base_ms: millis(r.backoff_base),
            backoff_max_ms: millis(r.backoff_max),
            budget_ratio: r.budget_ratio.map_or(0.0, Ratio::get),
            budget_min_per_sec: count(r.budget_min_per_sec),
        }
    }
}

impl From<&Outlier> for v1::OutlierDetection {
    fn from(o: &Outlier) -> Self {
        Self {
            consecutive_failures: count(o.consecutive_failures),
            consecutive_gateway_errors: count(o.consecutive_gateway_errors),
            base_ejection_ms: millis(o.base_ejection),
            max_ejection_ms: millis(o.max_ejection),
            max_ejection_percent: count(o.max_ejection_percent),
            disabled: o.enabled == Some(false),
        }
    }
}

impl From<&CircuitBreaker> for v1::CircuitBreakers {
    fn from(c: &CircuitBreaker) -> Self {
        Self {
            max_connections: count(c.max_connections),
            max_pending_requests: count(c.max_pending_requests),
            max_requests: count(c.max_requests),
            max_active_retries: count(c.max_active_retries),
        }
    }
}

impl From<&Authz> for v1::Authorization {
    fn from(a: &Authz) -> Self {
        Self {
            default_deny: a.default == Some(AuthzDefault::Deny),
            allow: a.allow.iter().map(Into::into).collect(),
        }
    }
}

impl From<&AuthzRule> for v1::AuthzRule {
    fn from(r: &AuthzRule) -> Self {
        Self {
            from: r.from.iter().cloned().map(String::from).collect(),
            methods: r.methods.iter().cloned().map(String::from).collect(),
            path_prefixes: r.paths.iter().cloned().map(String::from).collect(),
        }
    }
}

impl From<&HealthCheck> for v1::HealthCheck {
    fn from(h: &HealthCheck) -> Self {
        Self {
            enabled: h.enabled.unwrap_or(true),
            http_path: h.http_path.clone().map(String::from).unwrap_or_default(),
            grpc: h.grpc == Some(true),
            grpc_service: h.grpc_service.clone().map(String::from).unwrap_or_default(),
            interval_ms: millis(h.interval),
            timeout_ms: millis(h.timeout),
            healthy_threshold: count(h.healthy_threshold),
            unhealthy_threshold: count(h.unhealthy_threshold),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::MAX_MILLIS;

    #[test]
    fn the_wire_mappings_cover_every_wire_value_both_ways() {
        for v in 0..32 {
            let known = v1::BalancerKind::try_from(v).is_ok();
            assert_eq!(from_wire(&BALANCERS, v).is_ok(), known, "balancer {v}");
            let known = v1::DiscoveryMode::try_from(v).is_ok();
            assert_eq!(from_wire(&DISCOVERIES, v).is_ok(), known, "discovery {v}");
        }
        for (p, w) in BALANCERS {
            assert_eq!(v1::BalancerKind::from(p), w);
            assert_eq!(Balancer::from_wire(w as i32), Some(p));
        }
        for (p, w) in DISCOVERIES {
            assert_eq!(v1::DiscoveryMode::from(p), w);
            assert_eq!(Discovery::from_wire(w as i32), Some(p));
        }
    }

    const GOOD: &str = r#"
[services.web]
balancer = "ring-hash"
hash_key = "header:X-User"

[services.web.timeouts]
connect = "1s"
per_try = "250ms"
request = "2m"

[services.web.retries]
max_attempts = 3
retry_on = ["connect-failure", "gateway-error", "grpc-unavailable"]
budget_ratio = 0.2
budget_min_per_sec = 10
backoff_base = "25ms"
backoff_max = "250ms"

[services.web.outlier]
consecutive_failures = 5
base_ejection = "30s"
max_ejection_percent = 50

[services.web.authz]
default = "deny"
[[services.web.authz.allow]]
from = ["client", "spiffe://wayfinder.local/svc/api"]
methods = ["GET"]
paths = ["/public/"]
[[services.web.authz.allow]]
from = ["*"]

[services.api]
discovery = "dns"
circuit_breaker = { max_requests = 100 }
health_check = { http_path = "/healthz", interval = "1s" }
"#;

    #[test]
    fn good_file_parses_and_round_trips_through_proto_and_toml() {
        let file = PolicyFile::parse("p.toml", GOOD).expect("valid");
        assert_eq!(file.services.len(), 2);
        for p in file.to_proto() {
            let (name, back) = ServicePolicy::from_proto(&p).expect("wire form validates");
            assert_eq!(&back.to_proto(name.as_str()), &p);
        }
        let again = PolicyFile::parse("again", &file.to_toml()).expect("rendered TOML parses");
        assert_eq!(again.to_proto(), file.to_proto());
        let web = &file.to_proto()[1];
        assert_eq!(web.hash_header, "x-user");
        assert_eq!(web.timeouts.as_ref().map(|t| t.request_ms), Some(120_000));
    }

    #[test]
    fn outlier_detection_can_be_turned_off_and_that_survives_the_wire() {
        let file = PolicyFile::parse("p.toml", "[services.web.outlier]\nenabled = false\n")
            .expect("valid");
        let p = &file.to_proto()[0];
        assert_eq!(p.outlier.as_ref().map(|o| o.disabled), Some(true));
        let (name, back) = ServicePolicy::from_proto(p).expect("wire form validates");
        assert_eq!(&back.to_proto(name.as_str()), p);
        let again = PolicyFile::parse("again", &file.to_toml()).expect("rendered TOML parses");
        assert_eq!(again.to_proto(), file.to_proto());
    }

    #[test]
    fn wire_policies_are_checked_like_files() {
        let mut p = PolicyFile::parse("p", GOOD)
            .expect("valid")
            .to_proto()
            .remove(1);
        p.retries.as_mut().expect("set").budget_ratio = 3.0;
        let e = ServicePolicy::from_proto(&p).expect_err("refused");
        assert_eq!(e.field, "services.web.retries.budget_ratio");
        p.retries.as_mut().expect("set").budget_ratio = 0.2;
        p.timeouts.as_mut().expect("set").connect_ms = MAX_MILLIS + 1;
        assert_eq!(
            ServicePolicy::from_proto(&p).expect_err("refused").field,
            "services.web.timeouts.connect"
        );
        p.service = "no spaces".into();
        assert_eq!(
            ServicePolicy::from_proto(&p).expect_err("refused").field,
            "service"
        );
    }
}
