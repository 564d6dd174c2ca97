//! Passive outlier detection: an endpoint that fails real traffic N times in
//! a row is ejected for `base × ejections` (capped), then returns on
//! probation, where one more failure ejects it again for longer. An endpoint
//! that serves well for a base period after returning starts over.
//!
//! The state lives on the endpoint ([`crate::balance::EndpointStats`]); the
//! upstream decides whether an ejection may happen (the share of a service
//! that may be ejected at once) and rebuilds its balancer.

use std::time::Duration;

use tokio::time::Instant;

use super::retry::Outcome;
use crate::settings::Outlier;

/// One endpoint's outlier state.
#[derive(Debug, Default, Clone)]
pub struct State {
    failures: u32,
    gateway_errors: u32,
    ejections: u32,
    ejected_until: Option<Instant>,
    returned_at: Option<Instant>,
}

impl State {
    /// Records an attempt's outcome; `Some(duration)` asks for an ejection.
    pub fn record(&mut self, outcome: Outcome, now: Instant, s: &Outlier) -> Option<Duration> {
        if !outcome.is_failure() {
            self.failures = 0;
            self.gateway_errors = 0;
            if self
                .returned_at
                .is_some_and(|r| now.saturating_duration_since(r) >= s.base_ejection)
            {
                self.ejections = 0;
                self.returned_at = None;
            }
            return None;
        }
        if self.is_ejected(now) {
            // A request picked before the ejection finished late.
            return None;
        }
        self.failures += 1;
        if outcome.is_gateway_error() {
            self.gateway_errors += 1;
        }
        let probation = self.returned_at.is_some();
        let tripped = self.failures >= s.consecutive_failures
            || s.consecutive_gateway_errors
                .is_some_and(|n| self.gateway_errors >= n);
        (tripped || probation).then(|| {
            s.base_ejection
                .saturating_mul(self.ejections + 1)
                .min(s.max_ejection)
        })
    }

    /// Marks the endpoint ejected for `time` (the upstream allowed it).
    pub fn eject(&mut self, now: Instant, time: Duration) {
        self.ejections += 1;
        self.failures = 0;
        self.gateway_errors = 0;
        self.ejected_until = Some(now + time);
        self.returned_at = Some(now + time);
    }

    /// Whether the endpoint is out of rotation at `now`.
    pub fn is_ejected(&self, now: Instant) -> bool {
        self.ejected_until.is_some_and(|u| now < u)
    }

    /// When the current ejection ends.
    pub fn ejected_until(&self) -> Option<Instant> {
        self.ejected_until
    }

    /// How often the endpoint was ejected since it last served well.
    pub fn ejections(&self) -> u32 {
        self.ejections
    }
}

/// How many of `n` endpoints may be ejected at once: `percent` of them,
/// at least one (as Envoy), but never all.
pub fn max_ejected(n: usize, percent: u32) -> usize {
    let share = n * percent as usize / 100;
    share.max(1).min(n.saturating_sub(1))
}

#[cfg(test)]
mod tests {
    use super::*;
    use hyper::StatusCode;

    fn settings() -> Outlier {
        Outlier {
            consecutive_failures: 5,
            consecutive_gateway_errors: Some(3),
            base_ejection: Duration::from_secs(10),
            max_ejection: Duration::from_secs(25),
            max_ejection_percent: 50,
        }
    }

    #[tokio::test(start_paused = true)]
    async fn consecutive_errors_eject_for_a_growing_time_then_return() {
        let s = settings();
        let mut st = State::default();
        let bad = Outcome::Status(StatusCode::BAD_GATEWAY);
        let t0 = Instant::now();
        assert_eq!(st.record(bad, t0, &s), None);
        assert_eq!(
            st.record(Outcome::Success, t0, &s),
            None,
            "a success resets"
        );
        assert_eq!(st.record(bad, t0, &s), None);
        assert_eq!(st.record(bad, t0, &s), None);
        let t = st.record(bad, t0, &s).expect("third gateway error ejects");
        assert_eq!(t, Duration::from_secs(10));
        st.eject(t0, t);
        assert!(st.is_ejected(t0 + Duration::from_secs(9)));
        assert!(!st.is_ejected(t0 + Duration::from_secs(10)));

        // Back on probation: one failure ejects again, for twice as long.
        let t1 = t0 + Duration::from_secs(11);
        let again = st.record(Outcome::Reset, t1, &s).expect("probation");
        assert_eq!(again, Duration::from_secs(20));
        st.eject(t1, again);
        let t2 = t1 + again;
        assert_eq!(
            st.record(Outcome::Reset, t2, &s),
            Some(Duration::from_secs(25)),
            "capped at max_ejection"
        );

        // Serving well for a base period clears the history.
        let mut st = State::default();
        st.eject(t0, Duration::from_secs(10));
        let back = t0 + Duration::from_secs(10);
        st.record(Outcome::Success, back, &s);
        assert_eq!(st.ejections(), 1, "too early to forget");
        st.record(Outcome::Success, back + Duration::from_secs(10), &s);
        assert_eq!(st.ejections(), 0);
        assert_eq!(
            st.record(Outcome::Reset, back + Duration::from_secs(11), &s),
            None
        );
    }

    #[tokio::test(start_paused = true)]
    async fn non_gateway_failures_need_the_longer_streak() {
        let s = settings();
        let mut st = State::default();
        let now = Instant::now();
        let e500 = Outcome::Status(StatusCode::INTERNAL_SERVER_ERROR);
        for _ in 0..4 {
            assert_eq!(st.record(e500, now, &s), None);
        }
        assert!(st.record(e500, now, &s).is_some());
    }

    #[test]
    fn never_all_endpoints_and_at_least_one_of_several() {
        assert_eq!(max_ejected(1, 100), 0);
        assert_eq!(max_ejected(2, 100), 1);
        assert_eq!(max_ejected(3, 10), 1);
        assert_eq!(max_ejected(3, 50), 1);
        assert_eq!(max_ejected(10, 50), 5);
        assert_eq!(max_ejected(0, 50), 0);
    }

    proptest::proptest! {
        #[test]
        fn ejection_share_bounds(n in 0usize..500, pct in 0u32..=100) {
            let m = max_ejected(n, pct);
            proptest::prop_assert!(n == 0 || m < n);
            proptest::prop_assert!(n < 2 || m >= 1);
            proptest::prop_assert!(m <= (n * pct as usize / 100).max(1));
        }
    }
}
