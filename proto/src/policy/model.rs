//! The policy model: a file of per-service tables and the sections each table may hold.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::shaping::{Hedging, Locality, Mirror, RateLimit};
use super::traffic::{Fault, Routes};
use super::values::{
    Bounded, Caller, GrpcServiceName, HttpMethod, HttpPath, Millis, Ratio, ServiceName,
    is_header_name,
};

/// A whole policy file: `[services.NAME]` tables.
#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct PolicyFile {
    /// Policies by service name.
    #[serde(default)]
    pub services: BTreeMap<ServiceName, ServicePolicy>,
}

/// One service's policy. Absent fields mean "sidecar default".
#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ServicePolicy {
    /// Discovery source: `mesh` or `dns`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub discovery: Option<Discovery>,
    /// Balancer algorithm.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub balancer: Option<Balancer>,
    /// What hash balancers hash: `client-ip` or `header:NAME`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hash_key: Option<HashKey>,
    /// Timeouts.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeouts: Option<Timeouts>,
    /// Retries.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retries: Option<Retries>,
    /// Passive outlier detection.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub outlier: Option<Outlier>,
    /// Circuit breakers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub circuit_breaker: Option<CircuitBreaker>,
    /// Active health checks.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub health_check: Option<HealthCheck>,
    /// Who may call the service.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub authz: Option<Authz>,
    /// Whether callers' apps may open CONNECT tunnels to the service.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tunnels: Option<bool>,
    /// Routes, first match wins (`[[services.NAME.routes]]`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub routes: Option<Routes>,
    /// A fault the callers inject (`[services.NAME.fault]`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fault: Option<Fault>,
    /// A limit the service's own sidecars enforce on the way in.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_limit: Option<RateLimit>,
    /// Copies of calls sent elsewhere, their answers dropped.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mirror: Option<Mirror>,
    /// A second try when the first is slow.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hedging: Option<Hedging>,
    /// Zone-aware balancing.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub locality: Option<Locality>,
    /// A joining or returning endpoint's share ramps up over this window.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub slow_start: Option<Millis>,
}

/// Who may call a service (checked by its sidecars on the way in).
#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Authz {
    /// What happens to a request no rule allows: `allow` (default) or `deny`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub default: Option<AuthzDefault>,
    /// Allow rules.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub allow: Vec<AuthzRule>,
}

/// The fate of a request no rule allows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[cfg_attr(feature = "clap", derive(clap::ValueEnum))]
#[serde(rename_all = "kebab-case")]
pub enum AuthzDefault {
    /// Let it through.
    Allow,
    /// Refuse it.
    Deny,
}

/// One allow rule.
#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct AuthzRule {
    /// Callers: service names, SPIFFE IDs, or `"*"` (any authenticated caller).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub from: Vec<Caller>,
    /// HTTP methods; none = any.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub methods: Vec<HttpMethod>,
    /// Path prefixes; none = any.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub paths: Vec<HttpPath>,
}

/// Discovery source.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[cfg_attr(feature = "clap", derive(clap::ValueEnum))]
#[serde(rename_all = "kebab-case")]
pub enum Discovery {
    /// The control plane's watch.
    Mesh,
    /// DNS A/AAAA records.
    Dns,
}

/// Balancer algorithm.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize)]
#[cfg_attr(feature = "clap", derive(clap::ValueEnum))]
#[serde(rename_all = "kebab-case")]
pub enum Balancer {
    /// Round robin.
    RoundRobin,
    /// Smooth weighted round robin.
    WeightedRoundRobin,
    /// Least request, power of two choices.
    LeastRequest,
    /// Peak-EWMA, power of two choices (the default, as Linkerd's).
    #[default]
    PeakEwma,
    /// Consistent hashing on a ring.
    RingHash,
    /// Maglev consistent hashing.
    Maglev,
}

/// What a hash balancer hashes.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(try_from = "String", into = "String")]
pub enum HashKey {
    /// The client's IP address (nginx `ip_hash`).
    ClientIp,
    /// A request header (lowercase name).
    Header(String),
}

impl TryFrom<String> for HashKey {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        if s == "client-ip" {
            return Ok(Self::ClientIp);
        }
        match s.strip_prefix("header:") {
            Some(h) if is_header_name(h) => Ok(Self::Header(h.to_ascii_lowercase())),
            _ => Err(format!(
                "{s:?} is not a hash key: use \"client-ip\" or \"header:NAME\" with a valid header name"
            )),
        }
    }
}
impl From<HashKey> for String {
    fn from(k: HashKey) -> String {
        match k {
            HashKey::ClientIp => "client-ip".into(),
            HashKey::Header(h) => format!("header:{h}"),
        }
    }
}

/// Timeouts; absent ones use the sidecar default.
#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Timeouts {
    /// Connection establishment.
    pub connect: Option<Millis>,
    /// One attempt, up to the response headers.
    pub per_try: Option<Millis>,
    /// The whole request with its retries.
    pub request: Option<Millis>,
    /// Idle connections.
    pub idle: Option<Millis>,
    /// Client request headers (slowloris guard).
    pub header_read: Option<Millis>,
}

/// Conditions under which a request may be retried.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Deserialize, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum RetryOn {
    /// The endpoint could not be connected.
    ConnectFailure,
    /// The connection was reset before a response.
    Reset,
    /// Any 5xx response.
    #[serde(rename = "5xx")]
    ServerError,
    /// 503 only.
    #[serde(rename = "503")]
    Unavailable503,
    /// 502, 503 or 504.
    GatewayError,
    /// gRPC UNAVAILABLE.
    GrpcUnavailable,
    /// gRPC RESOURCE_EXHAUSTED.
    GrpcResourceExhausted,
    /// gRPC DEADLINE_EXCEEDED.
    GrpcDeadlineExceeded,
    /// gRPC CANCELLED.
    GrpcCancelled,
    /// gRPC INTERNAL.
    GrpcInternal,
    /// 429 Too Many Requests (a rate limit said no).
    #[serde(rename = "429")]
    RateLimited,
}

impl RetryOn {
    /// The condition an answer with gRPC status `code` matches, if any.
    pub fn for_grpc_status(code: u32) -> Option<RetryOn> {
        Some(match code {
            1 => RetryOn::GrpcCancelled,
            4 => RetryOn::GrpcDeadlineExceeded,
            8 => RetryOn::GrpcResourceExhausted,
            13 => RetryOn::GrpcInternal,
            14 => RetryOn::GrpcUnavailable,
            _ => return None,
        })
    }
}

impl RetryOn {
    /// Every condition, in declaration order.
    pub const ALL: [RetryOn; 11] = [
        Self::ConnectFailure,
        Self::Reset,
        Self::ServerError,
        Self::Unavailable503,
        Self::GatewayError,
        Self::GrpcUnavailable,
        Self::GrpcResourceExhausted,
        Self::GrpcDeadlineExceeded,
        Self::GrpcCancelled,
        Self::GrpcInternal,
        Self::RateLimited,
    ];
    /// The name used in TOML and on the wire.
    pub fn name(self) -> &'static str {
        match self {
            Self::ConnectFailure => "connect-failure",
            Self::Reset => "reset",
            Self::ServerError => "5xx",
            Self::Unavailable503 => "503",
            Self::GatewayError => "gateway-error",
            Self::GrpcUnavailable => "grpc-unavailable",
            Self::GrpcResourceExhausted => "grpc-resource-exhausted",
            Self::GrpcDeadlineExceeded => "grpc-deadline-exceeded",
            Self::GrpcCancelled => "grpc-cancelled",
            Self::GrpcInternal => "grpc-internal",
            Self::RateLimited => "429",
        }
    }
    /// Parses a wire name.
    pub fn parse(s: &str) -> Result<Self, String> {
        Self::ALL
            .into_iter()
            .find(|r| r.name() == s)
            .ok_or_else(|| {
                let names: Vec<_> = Self::ALL.iter().map(|r| r.name()).collect();
                format!(
                    "unknown retry condition {s:?}; expected one of {}",
                    names.join(", ")
                )
            })
    }
}

/// Retry policy.
#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, try_from = "RetriesFields")]
pub struct Retries {
    /// Attempts including the first, 1-10.
    pub max_attempts: Option<Bounded<1, 10>>,
    /// Conditions that allow a retry.
    pub retry_on: Option<Vec<RetryOn>>,
    /// Retry POST/PATCH too.
    pub non_idempotent: Option<bool>,
    /// Largest request body buffered for replay (at most 16 MiB).
    pub max_body_bytes: Option<Bounded<0, 16_777_216>>,
    /// First backoff.
    pub backoff_base: Option<Millis>,
    /// Largest backoff.
    pub backoff_max: Option<Millis>,
    /// Retries as a share of requests.
    pub budget_ratio: Option<Ratio>,
    /// Retries always allowed per second.
    pub budget_min_per_sec: Option<Bounded<0, 100_000>>,
}

/// [`Retries`] before its cross-field check.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RetriesFields {
    max_attempts: Option<Bounded<1, 10>>,
    retry_on: Option<Vec<RetryOn>>,
    non_idempotent: Option<bool>,
    max_body_bytes: Option<Bounded<0, 16_777_216>>,
    backoff_base: Option<Millis>,
    backoff_max: Option<Millis>,
    budget_ratio: Option<Ratio>,
    budget_min_per_sec: Option<Bounded<0, 100_000>>,
}

impl TryFrom<RetriesFields> for Retries {
    type Error = String;
    fn try_from(f: RetriesFields) -> Result<Self, String> {
        let r = Retries {
            max_attempts: f.max_attempts,
            retry_on: f.retry_on,
            non_idempotent: f.non_idempotent,
            max_body_bytes: f.max_body_bytes,
            backoff_base: f.backoff_base,
            backoff_max: f.backoff_max,
            budget_ratio: f.budget_ratio,
            budget_min_per_sec: f.budget_min_per_sec,
        };
        r.check()?;
        Ok(r)
    }
}

impl Retries {
    /// The cross-field check: `backoff_base` may not be longer than `backoff_max`.
    pub(super) fn check(&self) -> Result<(), String> {
        if let (Some(base), Some(max)) = (self.backoff_base, self.backoff_max)
            && base > max
        {
            return Err(format!(
                "backoff_base ({base}) is longer than backoff_max ({max})"
            ));
        }
        Ok(())
    }
}

/// Passive outlier detection.
#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Outlier {
    /// `false` turns outlier detection off (it is on by default).
    pub enabled: Option<bool>,
    /// Consecutive failures before ejection.
    pub consecutive_failures: Option<Bounded<1, 1000>>,
    /// Consecutive 502/503/504 before ejection.
    pub consecutive_gateway_errors: Option<Bounded<1, 1000>>,
    /// Base ejection time (times the ejection count).
    pub base_ejection: Option<Millis>,
    /// Longest ejection.
    pub max_ejection: Option<Millis>,
    /// Most endpoints ejected at once, in percent; the last endpoint is never ejected.
    pub max_ejection_percent: Option<Bounded<0, 100>>,
}

/// Circuit breakers.
#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct CircuitBreaker {
    /// Open connections.
    pub max_connections: Option<Bounded<1, 1_000_000>>,
    /// Requests waiting for a connection.
    pub max_pending_requests: Option<Bounded<1, 1_000_000>>,
    /// Requests in flight.
    pub max_requests: Option<Bounded<1, 1_000_000>>,
    /// Retries in flight.
    pub max_active_retries: Option<Bounded<1, 1_000_000>>,
}

/// Active health checks.
#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, try_from = "HealthCheckFields")]
pub struct HealthCheck {
    /// Check at all (default true when the table exists).
    pub enabled: Option<bool>,
    /// HTTP path to GET; absent means a TCP connect check (or gRPC with `grpc`).
    pub http_path: Option<HttpPath>,
    /// Check with `grpc.health.v1.Health/Check` over HTTP/2.
    pub grpc: Option<bool>,
    /// The service name the gRPC check asks about (default: the whole server).
    pub grpc_service: Option<GrpcServiceName>,
    /// Time between checks.
    pub interval: Option<Millis>,
    /// Time one check may take.
    pub timeout: Option<Millis>,
    /// Successes before healthy (`rise`).
    pub healthy_threshold: Option<Bounded<1, 100>>,
    /// Failures before unhealthy (`fall`).
    pub unhealthy_threshold: Option<Bounded<1, 100>>,
}

/// [`HealthCheck`] before its cross-field check.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct HealthCheckFields {
    enabled: Option<bool>,
    http_path: Option<HttpPath>,
    grpc: Option<bool>,
    grpc_service: Option<GrpcServiceName>,
    interval: Option<Millis>,
    timeout: Option<Millis>,
    healthy_threshold: Option<Bounded<1, 100>>,
    unhealthy_threshold: Option<Bounded<1, 100>>,
}

impl TryFrom<HealthCheckFields> for HealthCheck {
    type Error = String;
    fn try_from(f: HealthCheckFields) -> Result<Self, String> {
        let h = HealthCheck {
            enabled: f.enabled,
            http_path: f.http_path,
            grpc: f.grpc,
            grpc_service: f.grpc_service,
            interval: f.interval,
            timeout: f.timeout,
            healthy_threshold: f.healthy_threshold,
            unhealthy_threshold: f.unhealthy_threshold,
        };
        h.check()?;
        Ok(h)
    }
}

impl HealthCheck {
    /// The cross-field check: one kind of check, and a gRPC service name only for gRPC.
    pub(super) fn check(&self) -> Result<(), String> {
        let grpc = self.grpc == Some(true);
        if grpc && self.http_path.is_some() {
            return Err("grpc = true and http_path: a check is either gRPC or HTTP".into());
        }
        if !grpc && self.grpc_service.is_some() {
            return Err("grpc_service needs grpc = true".into());
        }
        Ok(())
    }
}
