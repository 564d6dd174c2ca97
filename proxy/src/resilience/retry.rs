//! Retry decisions: what an attempt's outcome was, whether the policy lets
//! it be retried for this request, and how long to back off first.

use std::time::Duration;

use hyper::{HeaderMap, Method, StatusCode};
use wayfinder_proto::policy::RetryOn;

use crate::settings::Retry;

/// How one attempt ended, as far as retrying and outlier detection care.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// A response that is not a failure.
    Success,
    /// The endpoint could not be connected (nothing was sent).
    ConnectFailed,
    /// The connection or stream broke before response headers.
    Reset,
    /// The attempt ran out of its per-try time.
    TimedOut,
    /// A 5xx response.
    Status(StatusCode),
    /// A 429: a rate limit (the service's sidecar's, or the app's own)
    /// refused the request. Retried only when the policy lists `429`: no
    /// 5xx condition matches it.
    RateLimited,
    /// A gRPC status other than OK in the response headers (trailers-only).
    Grpc(u32),
}

impl Outcome {
    /// Whether it counts against the endpoint for outlier detection. A 429
    /// does not: the endpoint is shedding load it was given, and ejecting it
    /// would hand that load to the others, which then shed it too (callers
    /// steer away through peak-EWMA instead, `http/outbound.rs`).
    pub fn is_failure(self) -> bool {
        !matches!(
            self,
            Outcome::Success | Outcome::Grpc(_) | Outcome::RateLimited
        )
    }

    /// Whether it is a gateway error (502/503/504 or their local causes).
    pub fn is_gateway_error(self) -> bool {
        match self {
            Outcome::ConnectFailed | Outcome::TimedOut => true,
            Outcome::Status(s) => matches!(s.as_u16(), 502..=504),
            _ => false,
        }
    }

    /// The retry conditions this outcome matches.
    fn matches(self, cond: RetryOn) -> bool {
        match (self, cond) {
            (Outcome::ConnectFailed, RetryOn::ConnectFailure) => true,
            (Outcome::Reset, RetryOn::Reset) => true,
            (Outcome::TimedOut, RetryOn::GatewayError | RetryOn::ServerError) => true,
            (Outcome::Status(s), RetryOn::ServerError) => s.is_server_error(),
            (Outcome::Status(s), RetryOn::Unavailable503) => s == StatusCode::SERVICE_UNAVAILABLE,
            (Outcome::Status(s), RetryOn::GatewayError) => matches!(s.as_u16(), 502..=504),
            (Outcome::RateLimited, RetryOn::RateLimited) => true,
            (Outcome::Grpc(code), c) => RetryOn::for_grpc_status(code) == Some(c),
            _ => false,
        }
    }
}

/// Classifies a response by its status and, for gRPC, its `grpc-status`.
pub fn classify(status: StatusCode, headers: &HeaderMap) -> Outcome {
    if status.is_server_error() {
        return Outcome::Status(status);
    }
    if status == StatusCode::TOO_MANY_REQUESTS {
        return Outcome::RateLimited;
    }
    match headers
        .get("grpc-status")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u32>().ok())
    {
        Some(code) if code != 0 => Outcome::Grpc(code),
        _ => Outcome::Success,
    }
}

/// Methods a client may repeat without changing the outcome (RFC 9110 §9.2.2).
pub fn is_idempotent(m: &Method) -> bool {
    matches!(
        *m,
        Method::GET | Method::HEAD | Method::OPTIONS | Method::TRACE | Method::PUT | Method::DELETE
    )
}

/// Whether `outcome` may be retried for a request with `method` under
/// `policy`. A connect failure is always safe: the request never left. A
/// gRPC code the policy lists is the policy's consent for that call. Every
/// other condition needs an idempotent method unless the policy allows more.
pub fn retryable(outcome: Outcome, method: &Method, grpc: bool, policy: &Retry) -> bool {
    if !policy.on.iter().any(|c| outcome.matches(*c)) {
        return false;
    }
    match outcome {
        Outcome::ConnectFailed => true,
        Outcome::Grpc(_) => grpc,
        _ => repeatable(method, policy),
    }
}

/// Whether a request with `method` may be sent again after it may have
/// reached an app (its endpoint left while it waited).
pub fn repeatable(method: &Method, policy: &Retry) -> bool {
    policy.non_idempotent || is_idempotent(method)
}

/// Backoff before retry number `retry` (1-based): exponential from `base` up
/// to `max`, with full jitter so retries from many clients spread out.
pub fn backoff(retry: u32, base: Duration, max: Duration) -> Duration {
    let ceiling = base
        .saturating_mul(1 << retry.saturating_sub(1).min(16))
        .min(max);
    ceiling.mul_f64(rand::random::<f64>())
}

/// Parses gRPC's `grpc-timeout` header: up to 8 digits and a unit
/// (`H`, `M`, `S`, `m`, `u`, `n`).
pub fn grpc_timeout(v: &str) -> Option<Duration> {
    // Bytes, not characters: the unit is one ASCII byte, and a value
    // ending in a multi-byte character is no timeout (nor a reason to
    // split a `str` inside that character).
    let (&unit, digits) = v.as_bytes().split_last()?;
    if digits.is_empty() || digits.len() > 8 || !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    // At most 8 digits: no overflow.
    let n = digits
        .iter()
        .fold(0u64, |n, d| n * 10 + u64::from(d - b'0'));
    Some(match unit {
        b'H' => Duration::from_secs(n * 3600),
        b'M' => Duration::from_secs(n * 60),
        b'S' => Duration::from_secs(n),
        b'm' => Duration::from_millis(n),
        b'u' => Duration::from_micros(n),
        b'n' => Duration::from_nanos(n),
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(on: &[RetryOn]) -> Retry {
        Retry {
            on: on.to_vec(),
            ..Retry::default()
        }
    }

    #[test]
    fn post_is_retried_only_when_nothing_was_sent_or_the_policy_allows() {
        let p = policy(&[RetryOn::ConnectFailure, RetryOn::GatewayError]);
        let bad = Outcome::Status(StatusCode::SERVICE_UNAVAILABLE);
        assert!(retryable(bad, &Method::GET, false, &p));
        assert!(!retryable(bad, &Method::POST, false, &p));
        assert!(retryable(Outcome::ConnectFailed, &Method::POST, false, &p));
        let lenient = Retry {
            non_idempotent: true,
            ..p.clone()
        };
        assert!(retryable(bad, &Method::POST, false, &lenient));
        assert!(
            !retryable(Outcome::Reset, &Method::GET, false, &p),
            "not listed"
        );
    }

    #[test]
    fn conditions_match_their_statuses() {
        let s = |c| Outcome::Status(StatusCode::from_u16(c).expect("status"));
        let only503 = policy(&[RetryOn::Unavailable503]);
        assert!(retryable(s(503), &Method::GET, false, &only503));
        assert!(!retryable(s(502), &Method::GET, false, &only503));
        let gw = policy(&[RetryOn::GatewayError]);
        assert!(retryable(s(504), &Method::GET, false, &gw));
        assert!(!retryable(s(500), &Method::GET, false, &gw));
        assert!(retryable(Outcome::TimedOut, &Method::GET, false, &gw));
        let any = policy(&[RetryOn::ServerError]);
        assert!(retryable(s(500), &Method::GET, false, &any));
        assert!(!retryable(Outcome::Success, &Method::GET, false, &any));
    }

    #[test]
    fn a_429_is_retried_only_when_429_is_listed() {
        let o = classify(StatusCode::TOO_MANY_REQUESTS, &HeaderMap::new());
        assert_eq!(o, Outcome::RateLimited);
        let server = policy(&[
            RetryOn::ServerError,
            RetryOn::GatewayError,
            RetryOn::Unavailable503,
            RetryOn::GrpcResourceExhausted,
        ]);
        assert!(!retryable(o, &Method::GET, false, &server), "not a 5xx");
        let limited = policy(&[RetryOn::RateLimited]);
        assert!(retryable(o, &Method::GET, false, &limited));
        assert!(
            !retryable(o, &Method::POST, false, &limited),
            "a POST only with retry_non_idempotent"
        );
        let s503 = Outcome::Status(StatusCode::SERVICE_UNAVAILABLE);
        assert!(!retryable(s503, &Method::GET, false, &limited));
        assert!(!o.is_failure(), "no ejection for shedding load");
        assert!(!o.is_gateway_error());
    }

    #[test]
    fn grpc_codes_are_retried_when_listed() {
        let p = policy(&[RetryOn::GrpcUnavailable]);
        let mut h = HeaderMap::new();
        h.insert("grpc-status", "14".parse().expect("value"));
        let o = classify(StatusCode::OK, &h);
        assert_eq!(o, Outcome::Grpc(14));
        assert!(retryable(o, &Method::POST, true, &p));
        assert!(!retryable(Outcome::Grpc(13), &Method::POST, true, &p));
        h.insert("grpc-status", "0".parse().expect("value"));
        assert_eq!(classify(StatusCode::OK, &h), Outcome::Success);
    }

    #[test]
    fn grpc_timeouts_parse() {
        assert_eq!(grpc_timeout("100m"), Some(Duration::from_millis(100)));
        assert_eq!(grpc_timeout("2S"), Some(Duration::from_secs(2)));
        assert_eq!(grpc_timeout("1H"), Some(Duration::from_secs(3600)));
        assert_eq!(grpc_timeout("5u"), Some(Duration::from_micros(5)));
        for bad in ["", "m", "100", "123456789m", "1x", "-1S", "1.5S"] {
            assert_eq!(grpc_timeout(bad), None, "{bad:?}");
        }
        assert_eq!(
            grpc_timeout("99999999H"),
            Some(Duration::from_secs(99_999_999 * 3600))
        );
    }

    #[test]
    fn a_timeout_ending_in_a_multi_byte_character_is_refused_not_a_panic() {
        // Found by fuzz/fuzz_targets/grpc_timeout.rs
        // (fuzz/regressions/grpc_timeout/): the parser split the value one
        // byte before its end, inside the last character.
        for bad in ["u'\u{8}ц", "1ц", "é", "12345678€"] {
            assert_eq!(grpc_timeout(bad), None, "{bad:?}");
        }
    }

    proptest::proptest! {
        #[test]
        fn backoff_stays_under_its_ceiling(retry in 1u32..40, base in 1u64..1000, extra in 0u64..10_000) {
            let base = Duration::from_millis(base);
            let max = base + Duration::from_millis(extra);
            let b = backoff(retry, base, max);
            let ceiling = base.saturating_mul(1 << (retry - 1).min(16)).min(max);
            proptest::prop_assert!(b <= ceiling);
        }
    }
}
