//! Fault injection, in the caller's sidecar (as Istio's and Kuma's): a try
//! may be delayed, answered with a status, or failed as if reset, before it
//! reaches the endpoint. It runs per try, after the balancer's pick, so an
//! instance match hurts only tries to that instance and a retry elsewhere
//! rescues the call: students see retries work. An injected failure is not
//! held against the endpoint (outlier detection, latency) — the endpoint
//! did nothing.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use hyper::StatusCode;
use hyper::header::HeaderMap;
use wayfinder_proto::policy::Fault;

use crate::header_match::HeaderConditions;

/// `x-wayfinder-error` of an injected answer.
pub const FAULT_INJECTED: &str = "fault-injected";

/// A service's fault, ready to apply.
#[derive(Debug)]
pub struct CompiledFault {
    instance: Option<String>,
    path_prefix: Option<String>,
    headers: HeaderConditions,
    abort: Option<(StatusCode, f64)>,
    delay: Option<(Duration, f64)>,
    reset: Option<f64>,
    /// Wall-clock end, Unix ms.
    expires_at_ms: Option<u64>,
}

/// What to do to one try.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Injected {
    /// Wait this long first.
    pub delay: Option<Duration>,
    /// Then fail it.
    pub fail: Option<Failure>,
}

/// An injected failure.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failure {
    /// Answer with this status.
    Abort(StatusCode),
    /// As if the endpoint reset the connection.
    Reset,
}

/// Random rolls in `0..100`, one per kind, so tests can fix them.
#[derive(Debug, Clone, Copy)]
pub struct Rolls {
    /// For the delay.
    pub delay: f64,
    /// For the abort.
    pub abort: f64,
    /// For the reset.
    pub reset: f64,
}

impl Rolls {
    /// Fresh random rolls.
    pub fn random() -> Self {
        Self {
            delay: rand::random_range(0.0..100.0),
            abort: rand::random_range(0.0..100.0),
            reset: rand::random_range(0.0..100.0),
        }
    }
}

/// Now as Unix milliseconds.
pub fn now_unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

impl CompiledFault {
    /// Compiles a validated fault.
    pub fn new(f: &Fault) -> Self {
        Self {
            instance: f.matches.instance.as_ref().map(|i| i.as_str().to_string()),
            path_prefix: f.matches.path_prefix.clone().map(String::from),
            headers: HeaderConditions::new(&f.matches.headers),
            abort: f.abort.and_then(|a| {
                Some((
                    StatusCode::from_u16(u16::try_from(a.status.get()).ok()?).ok()?,
                    a.percent.get(),
                ))
            }),
            delay: f.delay.map(|d| {
                (
                    Duration::from_millis(d.duration.get().into()),
                    d.percent.get(),
                )
            }),
            reset: f.reset.map(|p| p.get()),
            expires_at_ms: f.expires_at_unix_ms,
        }
    }

    /// What happens to a try of a request (`path`, `headers`) on endpoint
    /// `instance` at wall-clock `now_ms`. A fault stops at its expiry by
    /// itself: the first request after it is served, whether or not the
    /// control plane's removal has arrived.
    pub fn inject(
        &self,
        instance: &str,
        path: &str,
        headers: &HeaderMap,
        now_ms: u64,
        rolls: Rolls,
    ) -> Option<Injected> {
        if self.expires_at_ms.is_some_and(|end| now_ms >= end)
            || self.instance.as_deref().is_some_and(|i| i != instance)
            || self
                .path_prefix
                .as_deref()
                .is_some_and(|p| !path.starts_with(p))
            || !self.headers.hold(headers)
        {
            return None;
        }
        let delay = self
            .delay
            .filter(|&(_, pct)| rolls.delay < pct)
            .map(|(d, _)| d);
        let fail = match (self.abort, self.reset) {
            (Some((status, pct)), _) if rolls.abort < pct => Some(Failure::Abort(status)),
            (_, Some(pct)) if rolls.reset < pct => Some(Failure::Reset),
            _ => None,
        };
        (delay.is_some() || fail.is_some()).then_some(Injected { delay, fail })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use hyper::header::HeaderValue;
    use wayfinder_proto::policy::PolicyFile;

    fn fault(toml: &str) -> CompiledFault {
        let f = PolicyFile::parse("f.toml", toml).expect("valid");
        CompiledFault::new(
            f.services
                .values()
                .next()
                .and_then(|p| p.fault.as_ref())
                .expect("a fault"),
        )
    }

    const ALL: Rolls = Rolls {
        delay: 0.0,
        abort: 0.0,
        reset: 0.0,
    };
    const NONE: Rolls = Rolls {
        delay: 99.99,
        abort: 99.99,
        reset: 99.99,
    };

    #[test]
    fn an_instance_match_applies_after_the_pick() {
        let f = fault(
            "[services.web.fault]\nmatch = { instance = \"web-2\" }\nabort = { status = 503, percent = 100 }\n",
        );
        let h = HeaderMap::new();
        assert_eq!(
            f.inject("web-2", "/", &h, 0, ALL),
            Some(Injected {
                delay: None,
                fail: Some(Failure::Abort(StatusCode::SERVICE_UNAVAILABLE))
            })
        );
        assert_eq!(f.inject("web-1", "/", &h, 0, ALL), None);
    }

    #[test]
    fn percentages_paths_headers_and_expiry_decide() {
        let f = fault(
            "[services.web.fault]\nmatch = { path_prefix = \"/api\", headers = { \"x-chaos\" = \"on\" } }\ndelay = { duration = \"200ms\", percent = 25 }\nreset = { percent = 5 }\nexpires_at_unix_ms = 1000\n",
        );
        let mut h = HeaderMap::new();
        h.insert("x-chaos", HeaderValue::from_static("on"));
        let both = f.inject("a", "/api/x", &h, 999, ALL).expect("injected");
        assert_eq!(both.delay, Some(Duration::from_millis(200)));
        assert_eq!(both.fail, Some(Failure::Reset));
        let rolls = Rolls {
            delay: 24.9,
            abort: 0.0,
            reset: 5.0,
        };
        assert_eq!(
            f.inject("a", "/api/x", &h, 0, rolls),
            Some(Injected {
                delay: Some(Duration::from_millis(200)),
                fail: None
            })
        );
        assert_eq!(f.inject("a", "/api/x", &h, 0, NONE), None);
        assert_eq!(f.inject("a", "/other", &h, 0, ALL), None, "path");
        assert_eq!(
            f.inject("a", "/api", &HeaderMap::new(), 0, ALL),
            None,
            "header"
        );
        assert_eq!(f.inject("a", "/api", &h, 1000, ALL), None, "expired");
    }
}
