//! Per-service policy in TOML: the typed model, its validation and its
//! conversion to and from the `wayfinder.v1.ServicePolicy` message.
//!
//! Every value is checked while it is deserialized (newtypes with
//! `try_from`), so an error carries the span of the offending value and is
//! reported as `file:line: field services.web.retries.budget_ratio: why`.
//! The same checks run on policies that arrive over gRPC.
//!
//! ```toml
//! [services.web]
//! balancer = "peak-ewma"
//! [services.web.timeouts]
//! connect = "1s"
//! per_try = "500ms"
//! [services.web.retries]
//! max_attempts = 3
//! retry_on = ["connect-failure", "gateway-error"]
//! budget_ratio = 0.2
//! ```

use std::collections::BTreeMap;
use std::fmt;
use std::path::Path;

use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::v1;

/// A policy file could not be loaded.
#[derive(Debug, Error, PartialEq)]
#[error("{file}:{line}: field {field}: {message}")]
pub struct PolicyError {
    /// File (or source name) the policy came from.
    pub file: String,
    /// 1-based line of the offending value (0 when unknown).
    pub line: usize,
    /// Dotted path of the offending field, e.g. `services.web.retries.budget_ratio`.
    pub field: String,
    /// What is wrong.
    pub message: String,
}

/// A whole policy file: `[services.NAME]` tables.
#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct PolicyFile {
    /// Policies by service name.
    #[serde(default)]
    pub services: BTreeMap<ServiceName, ServicePolicy>,
}

/// A validated service name used as a table key.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Deserialize, Serialize)]
#[serde(try_from = "String", into = "String")]
pub struct ServiceName(String);

impl TryFrom<String> for ServiceName {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        crate::validate::service_name(&s).map_err(|e| e.to_string())?;
        Ok(Self(s))
    }
}
impl From<ServiceName> for String {
    fn from(n: ServiceName) -> String {
        n.0
    }
}
impl ServiceName {
    /// The name as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
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

/// A caller in an authorization rule.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(try_from = "String", into = "String")]
pub struct Caller(String);

impl TryFrom<String> for Caller {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        let ok = s == "*"
            || crate::validate::service_name(&s).is_ok()
            || (s.starts_with("spiffe://")
                && s.len() <= 2048
                && s[9..].contains('/')
                && s.bytes().all(|b| b.is_ascii_graphic()));
        if !ok {
            return Err(format!(
                "{s:?} is not a caller: use a service name, a spiffe:// ID or \"*\""
            ));
        }
        Ok(Self(s))
    }
}
impl From<Caller> for String {
    fn from(c: Caller) -> String {
        c.0
    }
}

/// An HTTP method name such as `GET`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(try_from = "String", into = "String")]
pub struct HttpMethod(String);

impl TryFrom<String> for HttpMethod {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        if s.is_empty() || s.len() > 20 || !s.bytes().all(|b| b.is_ascii_uppercase()) {
            return Err(format!("{s:?} is not an HTTP method: use e.g. \"GET\""));
        }
        Ok(Self(s))
    }
}
impl From<HttpMethod> for String {
    fn from(m: HttpMethod) -> String {
        m.0
    }
}

/// Discovery source.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Discovery {
    /// The control plane's watch.
    Mesh,
    /// DNS A/AAAA records.
    Dns,
}

/// Balancer algorithm.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Balancer {
    /// Round robin.
    RoundRobin,
    /// Smooth weighted round robin.
    WeightedRoundRobin,
    /// Least request, power of two choices.
    LeastRequest,
    /// Peak-EWMA, power of two choices.
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

fn is_header_name(h: &str) -> bool {
    !h.is_empty()
        && h.len() <= 128
        && h.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
}

/// A duration written as `"250ms"`, `"2s"` or `"1m"`, between 1 ms and 1 h.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Deserialize, Serialize)]
#[serde(try_from = "String", into = "String")]
pub struct Millis(u32);

/// Longest duration a policy may set.
pub const MAX_MILLIS: u32 = 3_600_000;

impl Millis {
    /// Checks a millisecond count.
    pub fn new(ms: u32) -> Result<Self, String> {
        if ms == 0 || ms > MAX_MILLIS {
            return Err(format!("{ms}ms is out of range: use 1ms to 1h"));
        }
        Ok(Self(ms))
    }
    /// Milliseconds.
    pub fn get(self) -> u32 {
        self.0
    }
}

/// Parses a duration flag (`"250ms"`, `"2s"`, `"1m"`), with the same rules
/// as durations in policy files.
pub fn parse_duration(s: &str) -> Result<std::time::Duration, String> {
    Millis::try_from(s.to_string()).map(|m| std::time::Duration::from_millis(m.get().into()))
}

impl TryFrom<String> for Millis {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        let bad = || format!("{s:?} is not a duration: write e.g. \"250ms\", \"2s\" or \"1m\"");
        let split = s.find(|c: char| !c.is_ascii_digit()).ok_or_else(bad)?;
        let (num, unit) = s.split_at(split);
        let n: u64 = num.parse().map_err(|_| bad())?;
        let factor = match unit {
            "ms" => 1,
            "s" => 1_000,
            "m" => 60_000,
            _ => return Err(bad()),
        };
        let ms = n.checked_mul(factor).and_then(|v| u32::try_from(v).ok());
        Self::new(ms.unwrap_or(u32::MAX))
    }
}
impl From<Millis> for String {
    fn from(m: Millis) -> String {
        match m.0 {
            ms if ms % 60_000 == 0 => format!("{}m", ms / 60_000),
            ms if ms % 1_000 == 0 => format!("{}s", ms / 1_000),
            ms => format!("{ms}ms"),
        }
    }
}
impl fmt::Display for Millis {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&String::from(*self))
    }
}

/// An integer checked against a range given by its type parameters.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Deserialize, Serialize)]
#[serde(try_from = "i64", into = "i64")]
pub struct Bounded<const MIN: u32, const MAX: u32>(u32);

impl<const MIN: u32, const MAX: u32> Bounded<MIN, MAX> {
    /// Checks `v` against `MIN..=MAX`.
    pub fn new(v: i64) -> Result<Self, String> {
        if v < i64::from(MIN) || v > i64::from(MAX) {
            return Err(format!("{v} is out of range {MIN}..={MAX}"));
        }
        u32::try_from(v).map(Self).map_err(|e| e.to_string())
    }
    /// The value.
    pub fn get(self) -> u32 {
        self.0
    }
}
impl<const MIN: u32, const MAX: u32> TryFrom<i64> for Bounded<MIN, MAX> {
    type Error = String;
    fn try_from(v: i64) -> Result<Self, String> {
        Self::new(v)
    }
}
impl<const MIN: u32, const MAX: u32> From<Bounded<MIN, MAX>> for i64 {
    fn from(b: Bounded<MIN, MAX>) -> i64 {
        b.0.into()
    }
}

/// A share between 0 and 1.
#[derive(Debug, Clone, Copy, PartialEq, PartialOrd, Deserialize, Serialize)]
#[serde(try_from = "f64", into = "f64")]
pub struct Ratio(f64);

impl Ratio {
    /// Checks a share.
    pub fn new(v: f64) -> Result<Self, String> {
        if !(0.0..=1.0).contains(&v) {
            return Err(format!("{v} is not a share: use a number from 0.0 to 1.0"));
        }
        Ok(Self(v))
    }
    /// The share.
    pub fn get(self) -> f64 {
        self.0
    }
}
impl TryFrom<f64> for Ratio {
    type Error = String;
    fn try_from(v: f64) -> Result<Self, String> {
        Self::new(v)
    }
}
impl From<Ratio> for f64 {
    fn from(r: Ratio) -> f64 {
        r.0
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
}

impl RetryOn {
    /// Every condition, in declaration order.
    pub const ALL: [RetryOn; 10] = [
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
    fn check(&self) -> Result<(), String> {
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
#[serde(deny_unknown_fields)]
pub struct HealthCheck {
    /// Check at all (default true when the table exists).
    pub enabled: Option<bool>,
    /// HTTP path to GET; absent means a TCP connect check.
    pub http_path: Option<HttpPath>,
    /// Time between checks.
    pub interval: Option<Millis>,
    /// Time one check may take.
    pub timeout: Option<Millis>,
    /// Successes before healthy (`rise`).
    pub healthy_threshold: Option<Bounded<1, 100>>,
    /// Failures before unhealthy (`fall`).
    pub unhealthy_threshold: Option<Bounded<1, 100>>,
}

/// An absolute HTTP path such as `/healthz`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(try_from = "String", into = "String")]
pub struct HttpPath(String);

impl TryFrom<String> for HttpPath {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        if !s.starts_with('/') || s.len() > 1024 || !s.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(format!(
                "{s:?} is not an HTTP path: start with '/', printable ASCII, at most 1024 bytes"
            ));
        }
        Ok(Self(s))
    }
}
impl From<HttpPath> for String {
    fn from(p: HttpPath) -> String {
        p.0
    }
}

impl PolicyFile {
    /// Parses and validates policy TOML; `file` names the source in errors.
    pub fn parse(file: &str, text: &str) -> Result<Self, PolicyError> {
        toml::from_str(text).map_err(|e| {
            let span = e.span();
            let (line, field) = match &span {
                Some(s) => locate(text, s.start),
                None => (0, String::from("(file)")),
            };
            PolicyError {
                file: file.to_string(),
                line,
                field,
                message: e.message().trim().to_string(),
            }
        })
    }

    /// Reads and parses a policy file.
    pub fn load(path: &Path) -> Result<Self, PolicyError> {
        let name = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|e| PolicyError {
            file: name.clone(),
            line: 0,
            field: "(file)".into(),
            message: format!("cannot read: {e}"),
        })?;
        Self::parse(&name, &text)
    }

    /// The policies as wire messages.
    pub fn to_proto(&self) -> Vec<v1::ServicePolicy> {
        self.services
            .iter()
            .map(|(name, p)| p.to_proto(name.as_str()))
            .collect()
    }

    /// Renders the file back as TOML.
    pub fn to_toml(&self) -> String {
        toml::to_string(self).unwrap_or_else(|e| format!("# cannot render policy: {e}\n"))
    }
}

/// Finds the 1-based line of byte `offset` and the dotted field path there:
/// the nearest `[table]` header above plus the key on the line, if any.
fn locate(text: &str, offset: usize) -> (usize, String) {
    let offset = offset.min(text.len());
    let before = &text[..offset];
    let line_no = before.matches('\n').count() + 1;
    let line_start = before.rfind('\n').map_or(0, |i| i + 1);
    let line_end = text[offset..].find('\n').map_or(text.len(), |i| offset + i);
    let line = &text[line_start..line_end];
    let header_of = |l: &str| {
        let l = l.trim();
        l.starts_with('[').then(|| {
            l.trim_start_matches('[')
                .split(']')
                .next()
                .unwrap_or("")
                .trim()
                .to_string()
        })
    };
    if let Some(h) = header_of(line) {
        return (line_no, h);
    }
    let table = text[..line_start]
        .lines()
        .rev()
        .find_map(header_of)
        .unwrap_or_default();
    let key = line
        .split_once('=')
        .map(|(k, _)| k.trim().trim_matches('"').to_string())
        .filter(|k| !k.is_empty() && !k.starts_with('#'));
    let field = match (table.is_empty(), key) {
        (true, Some(k)) => k,
        (false, Some(k)) => format!("{table}.{k}"),
        (_, None) => table,
    };
    (
        line_no,
        if field.is_empty() {
            "(file)".into()
        } else {
            field
        },
    )
}

fn millis(m: Option<Millis>) -> u32 {
    m.map_or(0, Millis::get)
}
fn count<const A: u32, const B: u32>(b: Option<Bounded<A, B>>) -> u32 {
    b.map_or(0, Bounded::get)
}

impl ServicePolicy {
    /// The wire form for `service`.
    pub fn to_proto(&self, service: &str) -> v1::ServicePolicy {
        use v1::{BalancerKind as B, DiscoveryMode as D};
        v1::ServicePolicy {
            service: service.to_string(),
            discovery: match self.discovery {
                None => D::Unspecified,
                Some(Discovery::Mesh) => D::Mesh,
                Some(Discovery::Dns) => D::Dns,
            } as i32,
            balancer: match self.balancer {
                None => B::Unspecified,
                Some(Balancer::RoundRobin) => B::RoundRobin,
                Some(Balancer::WeightedRoundRobin) => B::WeightedRoundRobin,
                Some(Balancer::LeastRequest) => B::LeastRequest,
                Some(Balancer::PeakEwma) => B::PeakEwma,
                Some(Balancer::RingHash) => B::RingHash,
                Some(Balancer::Maglev) => B::Maglev,
            } as i32,
            hash_header: match &self.hash_key {
                Some(HashKey::Header(h)) => h.clone(),
                _ => String::new(),
            },
            timeouts: self.timeouts.as_ref().map(|t| v1::Timeouts {
                connect_ms: millis(t.connect),
                per_try_ms: millis(t.per_try),
                request_ms: millis(t.request),
                idle_ms: millis(t.idle),
                header_read_ms: millis(t.header_read),
            }),
            retries: self.retries.as_ref().map(|r| v1::RetryPolicy {
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
            }),
            outlier: self.outlier.as_ref().map(|o| v1::OutlierDetection {
                consecutive_failures: count(o.consecutive_failures),
                consecutive_gateway_errors: count(o.consecutive_gateway_errors),
                base_ejection_ms: millis(o.base_ejection),
                max_ejection_ms: millis(o.max_ejection),
                max_ejection_percent: count(o.max_ejection_percent),
                disabled: o.enabled == Some(false),
            }),
            circuit_breakers: self.circuit_breaker.as_ref().map(|c| v1::CircuitBreakers {
                max_connections: count(c.max_connections),
                max_pending_requests: count(c.max_pending_requests),
                max_requests: count(c.max_requests),
                max_active_retries: count(c.max_active_retries),
            }),
            authz: self.authz.as_ref().map(|a| v1::Authorization {
                default_deny: a.default == Some(AuthzDefault::Deny),
                allow: a
                    .allow
                    .iter()
                    .map(|r| v1::AuthzRule {
                        from: r.from.iter().map(|c| c.0.clone()).collect(),
                        methods: r.methods.iter().map(|m| m.0.clone()).collect(),
                        path_prefixes: r.paths.iter().map(|p| p.0.clone()).collect(),
                    })
                    .collect(),
            }),
            allow_tunnels: self.tunnels == Some(true),
            health_check: self.health_check.as_ref().map(|h| v1::HealthCheck {
                enabled: h.enabled.unwrap_or(true),
                http_path: h.http_path.clone().map(String::from).unwrap_or_default(),
                interval_ms: millis(h.interval),
                timeout_ms: millis(h.timeout),
                healthy_threshold: count(h.healthy_threshold),
                unhealthy_threshold: count(h.unhealthy_threshold),
            }),
        }
    }

    /// Validates a policy received over the wire with the same rules as the
    /// TOML form. The error names the offending field.
    pub fn from_proto(p: &v1::ServicePolicy) -> Result<(ServiceName, Self), PolicyError> {
        let err = |field: &str, message: String| PolicyError {
            file: "request".into(),
            line: 0,
            field: format!("services.{}.{field}", p.service),
            message,
        };
        let name = ServiceName::try_from(p.service.clone()).map_err(|m| PolicyError {
            file: "request".into(),
            line: 0,
            field: "service".into(),
            message: m,
        })?;
        let ms = |field: &str, v: u32| -> Result<Option<Millis>, PolicyError> {
            (v != 0)
                .then(|| Millis::new(v))
                .transpose()
                .map_err(|m| err(field, m))
        };
        fn n<const A: u32, const B: u32>(
            v: u32,
            field: &str,
            err: &dyn Fn(&str, String) -> PolicyError,
        ) -> Result<Option<Bounded<A, B>>, PolicyError> {
            (v != 0)
                .then(|| Bounded::new(v.into()))
                .transpose()
                .map_err(|m| err(field, m))
        }
        use v1::{BalancerKind as Bk, DiscoveryMode as Dm};
        let discovery = match Dm::try_from(p.discovery) {
            Ok(Dm::Unspecified) => None,
            Ok(Dm::Mesh) => Some(Discovery::Mesh),
            Ok(Dm::Dns) => Some(Discovery::Dns),
            Err(_) => return Err(err("discovery", format!("unknown mode {}", p.discovery))),
        };
        let balancer = match Bk::try_from(p.balancer) {
            Ok(Bk::Unspecified) => None,
            Ok(Bk::RoundRobin) => Some(Balancer::RoundRobin),
            Ok(Bk::WeightedRoundRobin) => Some(Balancer::WeightedRoundRobin),
            Ok(Bk::LeastRequest) => Some(Balancer::LeastRequest),
            Ok(Bk::PeakEwma) => Some(Balancer::PeakEwma),
            Ok(Bk::RingHash) => Some(Balancer::RingHash),
            Ok(Bk::Maglev) => Some(Balancer::Maglev),
            Err(_) => return Err(err("balancer", format!("unknown balancer {}", p.balancer))),
        };
        let hash_key = if p.hash_header.is_empty() {
            matches!(balancer, Some(Balancer::RingHash | Balancer::Maglev))
                .then_some(HashKey::ClientIp)
        } else {
            Some(
                HashKey::try_from(format!("header:{}", p.hash_header))
                    .map_err(|m| err("hash_key", m))?,
            )
        };
        let timeouts = match &p.timeouts {
            None => None,
            Some(t) => Some(Timeouts {
                connect: ms("timeouts.connect", t.connect_ms)?,
                per_try: ms("timeouts.per_try", t.per_try_ms)?,
                request: ms("timeouts.request", t.request_ms)?,
                idle: ms("timeouts.idle", t.idle_ms)?,
                header_read: ms("timeouts.header_read", t.header_read_ms)?,
            }),
        };
        let retries = match &p.retries {
            None => None,
            Some(r) => {
                let retry_on = r
                    .retry_on
                    .iter()
                    .map(|s| RetryOn::parse(s))
                    .collect::<Result<Vec<_>, _>>()
                    .map_err(|m| err("retries.retry_on", m))?;
                let ratio = if r.budget_ratio == 0.0 {
                    None
                } else {
                    Some(Ratio::new(r.budget_ratio).map_err(|m| err("retries.budget_ratio", m))?)
                };
                let retries = Retries {
                    max_attempts: n(r.max_attempts, "retries.max_attempts", &err)?,
                    retry_on: (!retry_on.is_empty()).then_some(retry_on),
                    non_idempotent: r.retry_non_idempotent.then_some(true),
                    max_body_bytes: n(r.max_body_bytes, "retries.max_body_bytes", &err)?,
                    backoff_base: ms("retries.backoff_base", r.backoff_base_ms)?,
                    backoff_max: ms("retries.backoff_max", r.backoff_max_ms)?,
                    budget_ratio: ratio,
                    budget_min_per_sec: n(
                        r.budget_min_per_sec,
                        "retries.budget_min_per_sec",
                        &err,
                    )?,
                };
                retries.check().map_err(|m| err("retries", m))?;
                Some(retries)
            }
        };
        let outlier = match &p.outlier {
            None => None,
            Some(o) => Some(Outlier {
                enabled: o.disabled.then_some(false),
                consecutive_failures: n(
                    o.consecutive_failures,
                    "outlier.consecutive_failures",
                    &err,
                )?,
                consecutive_gateway_errors: n(
                    o.consecutive_gateway_errors,
                    "outlier.consecutive_gateway_errors",
                    &err,
                )?,
                base_ejection: ms("outlier.base_ejection", o.base_ejection_ms)?,
                max_ejection: ms("outlier.max_ejection", o.max_ejection_ms)?,
                max_ejection_percent: n(
                    o.max_ejection_percent,
                    "outlier.max_ejection_percent",
                    &err,
                )?,
            }),
        };
        let circuit_breaker = match &p.circuit_breakers {
            None => None,
            Some(c) => Some(CircuitBreaker {
                max_connections: n(c.max_connections, "circuit_breaker.max_connections", &err)?,
                max_pending_requests: n(
                    c.max_pending_requests,
                    "circuit_breaker.max_pending_requests",
                    &err,
                )?,
                max_requests: n(c.max_requests, "circuit_breaker.max_requests", &err)?,
                max_active_retries: n(
                    c.max_active_retries,
                    "circuit_breaker.max_active_retries",
                    &err,
                )?,
            }),
        };
        let health_check = match &p.health_check {
            None => None,
            Some(h) => Some(HealthCheck {
                enabled: Some(h.enabled),
                http_path: if h.http_path.is_empty() {
                    None
                } else {
                    Some(
                        HttpPath::try_from(h.http_path.clone())
                            .map_err(|m| err("health_check.http_path", m))?,
                    )
                },
                interval: ms("health_check.interval", h.interval_ms)?,
                timeout: ms("health_check.timeout", h.timeout_ms)?,
                healthy_threshold: n(h.healthy_threshold, "health_check.healthy_threshold", &err)?,
                unhealthy_threshold: n(
                    h.unhealthy_threshold,
                    "health_check.unhealthy_threshold",
                    &err,
                )?,
            }),
        };
        let authz = match &p.authz {
            None => None,
            Some(a) => {
                let mut allow = Vec::new();
                for (i, r) in a.allow.iter().enumerate() {
                    let field = format!("authz.allow[{i}]");
                    allow.push(AuthzRule {
                        from: r
                            .from
                            .iter()
                            .map(|c| Caller::try_from(c.clone()))
                            .collect::<Result<_, _>>()
                            .map_err(|m| err(&format!("{field}.from"), m))?,
                        methods: r
                            .methods
                            .iter()
                            .map(|m| HttpMethod::try_from(m.clone()))
                            .collect::<Result<_, _>>()
                            .map_err(|m| err(&format!("{field}.methods"), m))?,
                        paths: r
                            .path_prefixes
                            .iter()
                            .map(|p| HttpPath::try_from(p.clone()))
                            .collect::<Result<_, _>>()
                            .map_err(|m| err(&format!("{field}.paths"), m))?,
                    });
                }
                Some(Authz {
                    default: a.default_deny.then_some(AuthzDefault::Deny),
                    allow,
                })
            }
        };
        Ok((
            name,
            ServicePolicy {
                discovery,
                balancer,
                hash_key,
                timeouts,
                retries,
                outlier,
                circuit_breaker,
                health_check,
                authz,
                tunnels: p.allow_tunnels.then_some(true),
            },
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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

    fn error_of(text: &str) -> PolicyError {
        PolicyFile::parse("p.toml", text).expect_err("must be refused")
    }

    #[test]
    fn errors_name_file_line_and_field() {
        let e = error_of("[services.web.retries]\nmax_attempts = 3\nbudget_ratio = 1.5\n");
        assert_eq!(
            (e.line, e.field.as_str()),
            (3, "services.web.retries.budget_ratio")
        );
        assert!(
            e.to_string()
                .starts_with("p.toml:3: field services.web.retries.budget_ratio:"),
            "{e}"
        );

        let e = error_of("[services.web]\nbalancer = \"random\"\n");
        assert_eq!((e.line, e.field.as_str()), (2, "services.web.balancer"));

        let e = error_of("[services.web.timeouts]\nconect = \"1s\"\n");
        assert_eq!(
            (e.line, e.field.as_str()),
            (2, "services.web.timeouts.conect")
        );
        assert!(e.message.contains("unknown field"), "{e}");

        let e = error_of("[services.web.timeouts]\nconnect = \"1 sec\"\n");
        assert_eq!(e.line, 2);
        assert!(e.message.contains("not a duration"), "{e}");

        let e = error_of("[services.Web]\nbalancer = \"maglev\"\n");
        assert_eq!(e.line, 1);
        assert!(e.message.contains("service name"), "{e}");

        let e = error_of("[services.web.retries]\nmax_attempts = 0\n");
        assert_eq!(
            (e.line, e.field.as_str()),
            (2, "services.web.retries.max_attempts")
        );

        let e = error_of("[services.web]\nbalancer = \n");
        assert_eq!(e.line, 2);
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

    proptest::proptest! {
        #[test]
        fn durations_round_trip(ms in 1u32..=MAX_MILLIS) {
            let m = Millis::new(ms).expect("in range");
            proptest::prop_assert_eq!(Millis::try_from(String::from(m)), Ok(m));
        }

        #[test]
        fn arbitrary_text_never_panics(text in ".{0,200}") {
            let _ = PolicyFile::parse("fuzz", &text);
        }
    }
}

#[cfg(test)]
mod shipped {
    #[test]
    fn the_lab_policy_file_is_valid() {
        let text = include_str!("../../deploy/policy.toml");
        let file =
            super::PolicyFile::parse("deploy/policy.toml", text).expect("shipped policy parses");
        assert_eq!(file.services.len(), 2);
    }
}
