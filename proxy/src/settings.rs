//! A service's policy resolved into the values the data path uses: every
//! field filled in from the policy or the sidecar's defaults, durations as
//! [`Duration`]s. Built once per policy or discovery change (with the
//! balancer, in `upstream.rs`), never per request.
//!
//! The control plane validated the policy already (`wayfinder_proto::policy`);
//! here 0 means "not set" as on the wire.

use std::time::Duration;

use wayfinder_proto::policy::RetryOn;
use wayfinder_proto::v1::ServicePolicy;

/// Where a service's endpoints come from: the policy's `discovery` enum
/// (also `--discovery`'s values), by the name the data path uses.
pub use wayfinder_proto::policy::Discovery as Origin;

/// Sidecar-wide defaults (flags), for fields a policy leaves out.
#[derive(Debug, Clone)]
pub struct Defaults {
    /// Connect timeout.
    pub connect: Duration,
    /// Request timeout (with retries, up to the response headers); `None`:
    /// unbounded.
    pub request: Option<Duration>,
    /// How long a client's HTTP/2 connection may sit with no request in
    /// flight before the sidecar closes it (GOAWAY).
    pub h2_idle: Duration,
    /// Upstreams held at once, besides the pinned ones (`--max-upstreams`).
    pub max_upstreams: usize,
    /// How long an upstream may go unused before it is evicted.
    pub upstream_idle: Duration,
    /// The sidecar's zone (`--zone`), for locality-aware balancing.
    pub zone: Option<std::sync::Arc<str>>,
}

/// Default cap on upstreams: far more services than one app calls, far
/// fewer than a client sending made-up Hosts could make it hold.
pub const DEFAULT_MAX_UPSTREAMS: usize = 1_000;

/// Default idle period before an unused upstream is evicted (Linkerd
/// evicts unused discovery after a short idle period too; a few minutes
/// keeps the pools and latency estimates of services called now and then).
pub const DEFAULT_UPSTREAM_IDLE: Duration = Duration::from_secs(300);

/// Default HTTP/2 idle timeout (Envoy's HTTP connection manager closes idle
/// connections after an hour; a sidecar fronting many short-lived callers
/// keeps less).
pub const DEFAULT_H2_IDLE: Duration = Duration::from_secs(300);

/// Default request timeout: no call waits forever on an endpoint that
/// accepted it and never answers (Envoy's route timeout is 15 s too).
pub const DEFAULT_REQUEST: Duration = Duration::from_secs(15);

impl Default for Defaults {
    fn default() -> Self {
        Self {
            connect: Duration::from_secs(1),
            request: Some(DEFAULT_REQUEST),
            h2_idle: DEFAULT_H2_IDLE,
            max_upstreams: DEFAULT_MAX_UPSTREAMS,
            upstream_idle: DEFAULT_UPSTREAM_IDLE,
            zone: None,
        }
    }
}

/// Everything the data path needs to know about one service.
#[derive(Debug, Clone, PartialEq)]
pub struct Settings {
    /// Timeouts.
    pub timeouts: Timeouts,
    /// Retries.
    pub retry: Retry,
    /// Passive outlier detection; `None` = off.
    pub outlier: Option<Outlier>,
    /// Circuit breakers.
    pub breakers: Breakers,
    /// Active health checks for the endpoints in use; `None` = off.
    pub health_check: Option<HealthCheck>,
    /// Callers' apps may open CONNECT tunnels to the service.
    pub tunnels: bool,
    /// Locality-aware balancing (`balance/locality.rs`); `None` = off.
    pub locality: Option<Locality>,
    /// The window over which an endpoint that joins (or returns) ramps up
    /// to its full share (`balance/slow_start.rs`); `None` = at once.
    pub slow_start: Option<Duration>,
    /// The limit the service's own sidecars enforce on the way in; `None` = none.
    pub rate_limit: Option<RateLimit>,
}

/// A local rate limit (a token bucket per sidecar of the service, or per
/// caller), enforced on the inbound side (`resilience/rate_limit.rs`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RateLimit {
    /// Sustained requests per second (at least 1).
    pub per_sec: u32,
    /// Requests admitted at once above the rate: the bucket's size (at
    /// least 1; the policy's 0 means `per_sec`).
    pub burst: u32,
    /// A bucket per caller identity, each with the whole rate.
    pub per_caller: bool,
}

/// How traffic divides between zones (the policy's `locality`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Locality {
    /// The caller's zone first, spilling over in proportion once fewer
    /// than `min_local_percent` of its endpoints are healthy.
    PreferLocal {
        /// Percent (1-100) of the local endpoints that must be healthy to
        /// keep all traffic local.
        min_local_percent: u32,
    },
    /// A zone drawn by weight (zones not named weigh 0: used only as a
    /// fallback for tries).
    Weights(std::collections::BTreeMap<String, u32>),
}

/// Default `min_local_percent`: Envoy's overprovisioning factor 1.4 keeps
/// traffic local down to 1 / 1.4 ≈ 71% of the local endpoints healthy.
pub const DEFAULT_MIN_LOCAL_PERCENT: u32 = 70;

impl Locality {
    /// The policy's locality, if it asks for one (weights win over
    /// prefer-local; the control plane allows only one).
    pub fn from_wire(l: &wayfinder_proto::v1::Locality) -> Option<Self> {
        if !l.zone_weights.is_empty() {
            let w = l.zone_weights.iter().map(|(z, w)| (z.clone(), *w));
            Some(Locality::Weights(w.collect()))
        } else if l.prefer_local {
            Some(Locality::PreferLocal {
                min_local_percent: n(l.min_local_percent)
                    .unwrap_or(DEFAULT_MIN_LOCAL_PERCENT)
                    .min(100),
            })
        } else {
            None
        }
    }
}

/// Timeouts; `None` = unbounded.
#[derive(Debug, Clone, PartialEq)]
pub struct Timeouts {
    /// Establishing a connection to an endpoint.
    pub connect: Duration,
    /// One attempt, up to the response headers.
    pub per_try: Option<Duration>,
    /// The whole request with its retries, up to the response headers.
    pub request: Option<Duration>,
    /// Pooled connections to endpoints are closed after this long unused.
    pub idle: Duration,
    /// A client of an explicit `--upstream` listener must send complete
    /// request headers within this time.
    pub header_read: Duration,
}

/// Default idle timeout of pooled connections.
pub const DEFAULT_IDLE: Duration = Duration::from_secs(90);
/// Default header read timeout (hyper's, and close to nginx's 60 s).
pub const DEFAULT_HEADER_READ: Duration = Duration::from_secs(30);

/// Retry settings.
#[derive(Debug, Clone, PartialEq)]
pub struct Retry {
    /// Attempts including the first.
    pub max_attempts: u32,
    /// Conditions that allow a retry.
    pub on: Vec<RetryOn>,
    /// Retry non-idempotent methods too.
    pub non_idempotent: bool,
    /// Largest request body kept for replay.
    pub max_body: usize,
    /// First backoff.
    pub backoff_base: Duration,
    /// Largest backoff.
    pub backoff_max: Duration,
    /// Retries as a share of requests (over the budget's window).
    pub budget_ratio: f64,
    /// Retries always allowed per second.
    pub budget_min_per_sec: u32,
}

/// Default retry conditions: the request never reached an app, the
/// connection broke, or a gateway error came back. Each applies to
/// idempotent methods only, except connect failures, which are safe for any
/// request since nothing was sent.
pub const DEFAULT_RETRY_ON: [RetryOn; 3] = [
    RetryOn::ConnectFailure,
    RetryOn::Reset,
    RetryOn::GatewayError,
];

impl Default for Retry {
    fn default() -> Self {
        Self {
            max_attempts: 3,
            on: DEFAULT_RETRY_ON.to_vec(),
            non_idempotent: false,
            max_body: 64 * 1024,
            backoff_base: Duration::from_millis(25),
            backoff_max: Duration::from_millis(250),
            budget_ratio: 0.2,
            budget_min_per_sec: 10,
        }
    }
}

impl Retry {
    /// Whether `cond` is one of the retry conditions.
    pub fn allows(&self, cond: RetryOn) -> bool {
        self.on.contains(&cond)
    }
}

/// Passive outlier detection settings.
#[derive(Debug, Clone, PartialEq)]
pub struct Outlier {
    /// Consecutive failures before ejection.
    pub consecutive_failures: u32,
    /// Consecutive gateway errors before ejection; `None` = only failures count.
    pub consecutive_gateway_errors: Option<u32>,
    /// Base ejection time, times the endpoint's ejection count.
    pub base_ejection: Duration,
    /// Longest ejection.
    pub max_ejection: Duration,
    /// Most endpoints ejected at once, in percent.
    pub max_ejection_percent: u32,
}

impl Default for Outlier {
    /// Envoy's numbers for consecutive failures: 5 in a row, 30 s base
    /// ejection, at most half the endpoints out.
    fn default() -> Self {
        Self {
            consecutive_failures: 5,
            consecutive_gateway_errors: None,
            base_ejection: Duration::from_secs(30),
            max_ejection: Duration::from_secs(300),
            max_ejection_percent: 50,
        }
    }
}

/// Circuit breaker limits; `None` = unlimited.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Breakers {
    /// Open connections to the service's endpoints.
    pub max_connections: Option<u32>,
    /// Requests waiting for a connection.
    pub max_pending: Option<u32>,
    /// Requests in flight.
    pub max_requests: Option<u32>,
    /// Retries in flight.
    pub max_active_retries: Option<u32>,
}

/// Active health check settings.
#[derive(Debug, Clone, PartialEq)]
pub struct HealthCheck {
    /// HTTP path to GET; `None` = TCP connect (unless gRPC).
    pub http_path: Option<String>,
    /// A gRPC check instead: `grpc.health.v1.Health/Check` for this service
    /// ("" = the whole server), over HTTP/2 cleartext; `None` = not gRPC.
    pub grpc_service: Option<String>,
    /// Time between rounds.
    pub interval: Duration,
    /// Time one check may take.
    pub timeout: Duration,
    /// Successes before an unhealthy endpoint is healthy again.
    pub healthy_threshold: u32,
    /// Failures before a healthy endpoint is unhealthy.
    pub unhealthy_threshold: u32,
}

impl Default for HealthCheck {
    /// HAProxy's `check inter 2s rise 2 fall 3`, with a 1 s timeout.
    fn default() -> Self {
        Self {
            http_path: None,
            grpc_service: None,
            interval: Duration::from_secs(2),
            timeout: Duration::from_secs(1),
            healthy_threshold: 2,
            unhealthy_threshold: 3,
        }
    }
}

fn ms(v: u32) -> Option<Duration> {
    (v != 0).then(|| Duration::from_millis(v.into()))
}

fn n(v: u32) -> Option<u32> {
    (v != 0).then_some(v)
}

impl Settings {
    /// Resolves `policy` for endpoints that come from `origin`.
    pub fn resolve(policy: Option<&ServicePolicy>, origin: Origin, defaults: &Defaults) -> Self {
        let t = policy.and_then(|p| p.timeouts.as_ref());
        let timeouts = Timeouts {
            connect: t.and_then(|t| ms(t.connect_ms)).unwrap_or(defaults.connect),
            per_try: t.and_then(|t| ms(t.per_try_ms)),
            request: t.and_then(|t| ms(t.request_ms)).or(defaults.request),
            idle: t.and_then(|t| ms(t.idle_ms)).unwrap_or(DEFAULT_IDLE),
            header_read: t
                .and_then(|t| ms(t.header_read_ms))
                .unwrap_or(DEFAULT_HEADER_READ),
        };
        let mut retry = Retry::default();
        if let Some(r) = policy.and_then(|p| p.retries.as_ref()) {
            retry.max_attempts = n(r.max_attempts).unwrap_or(retry.max_attempts);
            let on: Vec<_> = r
                .retry_on
                .iter()
                .filter_map(|c| RetryOn::parse(c).ok())
                .collect();
            if !on.is_empty() {
                retry.on = on;
            }
            retry.non_idempotent = r.retry_non_idempotent;
            if r.max_body_bytes != 0 {
                retry.max_body = r.max_body_bytes as usize;
            }
            retry.backoff_base = ms(r.backoff_base_ms).unwrap_or(retry.backoff_base);
            retry.backoff_max = ms(r.backoff_max_ms)
                .unwrap_or(retry.backoff_max)
                .max(retry.backoff_base);
            if r.budget_ratio > 0.0 {
                retry.budget_ratio = r.budget_ratio;
            }
            retry.budget_min_per_sec = n(r.budget_min_per_sec).unwrap_or(retry.budget_min_per_sec);
        }
        // On unless the policy turns it off: an endpoint that fails every
        // call (a frozen container, a host behind a partition) leaves the
        // rotation without anyone having to ask (as Linkerd's failure
        // accrual is on by default).
        let outlier = match policy.and_then(|p| p.outlier.as_ref()) {
            Some(o) if o.disabled => None,
            Some(o) => {
                let d = Outlier::default();
                let base = ms(o.base_ejection_ms).unwrap_or(d.base_ejection);
                Some(Outlier {
                    consecutive_failures: n(o.consecutive_failures)
                        .unwrap_or(d.consecutive_failures),
                    consecutive_gateway_errors: n(o.consecutive_gateway_errors),
                    base_ejection: base,
                    max_ejection: ms(o.max_ejection_ms).unwrap_or(d.max_ejection).max(base),
                    max_ejection_percent: n(o.max_ejection_percent)
                        .unwrap_or(d.max_ejection_percent),
                })
            }
            None => Some(Outlier::default()),
        };
        let breakers = policy
            .and_then(|p| p.circuit_breakers.as_ref())
            .map(|c| Breakers {
                max_connections: n(c.max_connections),
                max_pending: n(c.max_pending_requests),
                max_requests: n(c.max_requests),
                max_active_retries: n(c.max_active_retries),
            })
            .unwrap_or_default();
        // The control plane reports mesh endpoints' health; checking them
        // again from every sidecar would multiply probe traffic by the
        // number of clients, so that needs the policy to ask. DNS gives no
        // health at all, so checks are on unless the policy turns them off.
        let health_check = match (policy.and_then(|p| p.health_check.as_ref()), origin) {
            (Some(h), _) if !h.enabled => None,
            (Some(h), _) => {
                let d = HealthCheck::default();
                let interval = ms(h.interval_ms).unwrap_or(d.interval);
                Some(HealthCheck {
                    http_path: (!h.http_path.is_empty()).then(|| h.http_path.clone()),
                    grpc_service: h.grpc.then(|| h.grpc_service.clone()),
                    interval,
                    timeout: ms(h.timeout_ms).unwrap_or(d.timeout.min(interval)),
                    healthy_threshold: n(h.healthy_threshold).unwrap_or(d.healthy_threshold),
                    unhealthy_threshold: n(h.unhealthy_threshold).unwrap_or(d.unhealthy_threshold),
                })
            }
            (None, Origin::Dns) => Some(HealthCheck::default()),
            (None, Origin::Mesh) => None,
        };
        // A rate of 0 is no limit (the control plane refuses it anyway).
        let rate_limit = policy.and_then(|p| p.rate_limit.as_ref()).and_then(|r| {
            Some(RateLimit {
                per_sec: n(r.requests_per_sec)?,
                burst: n(r.burst).unwrap_or(r.requests_per_sec),
                per_caller: r.per_caller,
            })
        });
        Self {
            timeouts,
            retry,
            outlier,
            breakers,
            health_check,
            tunnels: policy.is_some_and(|p| p.allow_tunnels),
            locality: policy
                .and_then(|p| p.locality.as_ref())
                .and_then(Locality::from_wire),
            slow_start: policy.and_then(|p| ms(p.slow_start_ms)),
            rate_limit,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use wayfinder_proto::v1;

    #[test]
    fn no_policy_gives_the_documented_defaults() {
        let s = Settings::resolve(None, Origin::Mesh, &Defaults::default());
        assert_eq!(s.timeouts.connect, Duration::from_secs(1));
        assert_eq!(s.timeouts.per_try, None);
        assert_eq!(s.timeouts.request, Some(DEFAULT_REQUEST));
        assert_eq!(s.retry, Retry::default());
        assert_eq!(s.outlier, Some(Outlier::default()), "on by default");
        assert_eq!(s.breakers, Breakers::default());
        assert_eq!(s.health_check, None, "mesh endpoints have health already");
        let dns = Settings::resolve(None, Origin::Dns, &Defaults::default());
        assert_eq!(dns.health_check, Some(HealthCheck::default()));
    }

    #[test]
    fn policy_fields_override_defaults_and_zero_means_unset() {
        let p = v1::ServicePolicy {
            service: "web".into(),
            timeouts: Some(v1::Timeouts {
                per_try_ms: 200,
                ..Default::default()
            }),
            retries: Some(v1::RetryPolicy {
                max_attempts: 5,
                retry_on: vec!["503".into()],
                retry_non_idempotent: true,
                budget_ratio: 0.5,
                ..Default::default()
            }),
            outlier: Some(v1::OutlierDetection {
                consecutive_gateway_errors: 3,
                base_ejection_ms: 1000,
                ..Default::default()
            }),
            circuit_breakers: Some(v1::CircuitBreakers {
                max_requests: 2,
                ..Default::default()
            }),
            health_check: Some(v1::HealthCheck {
                enabled: false,
                ..Default::default()
            }),
            ..Default::default()
        };
        let s = Settings::resolve(Some(&p), Origin::Dns, &Defaults::default());
        assert_eq!(s.timeouts.per_try, Some(Duration::from_millis(200)));
        assert_eq!(s.timeouts.connect, Duration::from_secs(1));
        assert_eq!(s.retry.max_attempts, 5);
        assert_eq!(s.retry.on, vec![RetryOn::Unavailable503]);
        assert!(s.retry.non_idempotent);
        assert_eq!(s.retry.budget_ratio, 0.5);
        assert_eq!(s.retry.budget_min_per_sec, 10);
        let o = s.outlier.expect("on");
        assert_eq!(o.consecutive_gateway_errors, Some(3));
        assert_eq!(o.consecutive_failures, 5);
        assert_eq!(o.base_ejection, Duration::from_secs(1));
        assert_eq!(o.max_ejection, Duration::from_secs(300));
        assert_eq!(s.breakers.max_requests, Some(2));
        assert_eq!(s.breakers.max_connections, None);
        assert_eq!(s.health_check, None, "the policy turned checks off");
        assert_eq!(s.timeouts.request, Some(DEFAULT_REQUEST));
    }

    #[test]
    fn a_grpc_health_check_names_its_service() {
        let policy = |grpc: bool, service: &str| v1::ServicePolicy {
            service: "web".into(),
            health_check: Some(v1::HealthCheck {
                enabled: true,
                grpc,
                grpc_service: service.into(),
                ..Default::default()
            }),
            ..Default::default()
        };
        let check = |p: &v1::ServicePolicy| {
            Settings::resolve(Some(p), Origin::Mesh, &Defaults::default())
                .health_check
                .expect("on")
        };
        let whole = check(&policy(true, ""));
        assert_eq!(whole.grpc_service.as_deref(), Some(""), "the whole server");
        assert_eq!(whole.http_path, None);
        let echo = check(&policy(true, "lab.Echo"));
        assert_eq!(echo.grpc_service.as_deref(), Some("lab.Echo"));
        assert_eq!(check(&policy(false, "")).grpc_service, None, "TCP");
    }

    #[test]
    fn outlier_detection_and_the_request_timeout_can_be_turned_off() {
        let p = v1::ServicePolicy {
            service: "web".into(),
            outlier: Some(v1::OutlierDetection {
                disabled: true,
                ..Default::default()
            }),
            ..Default::default()
        };
        let defaults = Defaults {
            request: None,
            ..Defaults::default()
        };
        let s = Settings::resolve(Some(&p), Origin::Mesh, &defaults);
        assert_eq!(s.outlier, None);
        assert_eq!(s.timeouts.request, None, "--request-timeout none");
    }

    #[test]
    fn a_rate_limit_without_a_burst_bursts_its_rate_and_a_zero_rate_is_none() {
        let limited = |requests_per_sec, burst| v1::ServicePolicy {
            service: "web".into(),
            rate_limit: Some(v1::RateLimit {
                requests_per_sec,
                burst,
                per_caller: true,
            }),
            ..Default::default()
        };
        let resolve = |p| Settings::resolve(Some(&p), Origin::Mesh, &Defaults::default());
        let want = |per_sec, burst| {
            Some(RateLimit {
                per_sec,
                burst,
                per_caller: true,
            })
        };
        assert_eq!(resolve(limited(100, 0)).rate_limit, want(100, 100));
        assert_eq!(resolve(limited(100, 10)).rate_limit, want(100, 10));
        assert_eq!(resolve(limited(0, 10)).rate_limit, None);
        let none = Settings::resolve(None, Origin::Mesh, &Defaults::default());
        assert_eq!(none.rate_limit, None);
    }
}
