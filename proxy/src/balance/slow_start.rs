//! Slow start: an endpoint that joins the rotation (a new instance, or one
//! that turns healthy again or comes back from an ejection) takes a share
//! that ramps up over the policy's window, so a cold instance (empty
//! caches, a JIT not warmed up, pools not yet filled) is not flooded with
//! its full share at once. Envoy's slow start with aggression 1.0 and a
//! 10% minimum weight, and HAProxy's `slowstart`.
//!
//! The ramp is computed here and only here; balancers apply the factor in
//! their own terms: round robin skips a warming endpoint's turn, weighted
//! round robin scales its weight, the two-choice balancers let it lose a
//! comparison it won (`p2c.rs`). Hash balancers do not ramp (Envoy does not
//! either): moving keys away from an endpoint and back would defeat the
//! point of hashing.
//!
//! Which endpoints warm is known when a balancer is built (a join is a
//! discovery, health or ejection change, and each rebuilds it), so a
//! balancer with no warming endpoint carries no [`Ramp`] and its picks cost
//! nothing more. An endpoint present when the sidecar (or the upstream)
//! starts is not warming: the first discovery answer is not a join.

use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use super::EndpointStats;

/// The smallest share factor: a warming endpoint starts with a tenth of its
/// share (Envoy's default `min_weight_percent`), so it is not left idle.
pub const FLOOR: f64 = 0.1;

/// An endpoint's share factor `elapsed` into a slow-start `window`: linear
/// from [`FLOOR`] (reached at once, held until `window × FLOOR`) to 1 at the
/// window's end, as Envoy's `max(min_weight, elapsed / window)`.
pub fn factor(elapsed: Duration, window: Duration) -> f64 {
    if elapsed >= window {
        return 1.0;
    }
    (elapsed.as_secs_f64() / window.as_secs_f64()).max(FLOOR)
}

/// The warming endpoints of one balancer: when each one's window began.
#[derive(Debug, Clone)]
pub struct Ramp {
    window: Duration,
    /// By endpoint index: when its window began; `None`: warm.
    since: Box<[Option<Instant>]>,
}

impl Ramp {
    /// The ramp of `endpoints` at `now` under a `window`; `None` when none
    /// of them is warming (the common case: nothing to apply).
    pub fn new(window: Duration, endpoints: &[Arc<EndpointStats>], now: Instant) -> Option<Self> {
        if window.is_zero() {
            return None;
        }
        let since: Box<[_]> = endpoints
            .iter()
            .map(|e| e.warming_since(now).filter(|&s| now < s + window))
            .collect();
        since
            .iter()
            .any(Option::is_some)
            .then_some(Self { window, since })
    }

    /// Endpoint `i`'s share factor at `now` (1 when warm).
    pub fn factor(&self, i: usize, now: Instant) -> f64 {
        match self.since.get(i).copied().flatten() {
            Some(s) => factor(now.saturating_duration_since(s), self.window),
            None => 1.0,
        }
    }

    /// Whether endpoint `i` loses a choice it would have won: with
    /// probability `1 - factor`, so its share follows the ramp.
    pub fn vetoes(&self, i: usize, now: Instant) -> bool {
        let f = self.factor(i, now);
        f < 1.0 && rand::random::<f64>() >= f
    }
}

#[cfg(test)]
mod tests {
    use std::net::SocketAddr;

    use super::*;

    fn ep(i: u16) -> Arc<EndpointStats> {
        EndpointStats::new(format!("ep-{i}"), SocketAddr::from(([127, 0, 0, 1], i)), 1)
    }

    #[test]
    fn the_ramp_starts_at_the_floor_and_is_linear_to_the_end_of_the_window() {
        let w = Duration::from_secs(30);
        let at = |s: f64| factor(Duration::from_secs_f64(s), w);
        assert_eq!(at(0.0), FLOOR);
        assert_eq!(
            at(1.0),
            FLOOR,
            "held at the floor for the window's first tenth"
        );
        assert!((at(15.0) - 0.5).abs() < 1e-9);
        assert!((at(27.0) - 0.9).abs() < 1e-9);
        assert_eq!(at(30.0), 1.0);
        assert_eq!(at(3600.0), 1.0);
    }

    #[tokio::test(start_paused = true)]
    async fn an_endpoint_present_from_the_start_is_not_warming() {
        let eps = vec![ep(1), ep(2)];
        assert!(Ramp::new(Duration::from_secs(10), &eps, Instant::now()).is_none());
    }

    #[tokio::test(start_paused = true)]
    async fn a_joining_endpoint_ramps_over_the_window_on_the_clock() {
        let eps = vec![ep(1), ep(2)];
        let window = Duration::from_secs(10);
        eps[1].rejoined(Instant::now());
        let ramp = Ramp::new(window, &eps, Instant::now()).expect("one is warming");
        let f = |ramp: &Ramp, i| ramp.factor(i, Instant::now());
        assert_eq!(f(&ramp, 0), 1.0);
        assert_eq!(f(&ramp, 1), FLOOR);
        tokio::time::sleep(Duration::from_secs(5)).await;
        assert!((f(&ramp, 1) - 0.5).abs() < 1e-9);
        tokio::time::sleep(Duration::from_secs(5)).await;
        assert_eq!(f(&ramp, 1), 1.0);
        assert!(
            Ramp::new(window, &eps, Instant::now()).is_none(),
            "a balancer built after the window carries no ramp"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn an_endpoint_back_from_an_ejection_ramps_from_its_return() {
        let eps = vec![ep(1), ep(2)];
        let window = Duration::from_secs(10);
        eps[0]
            .outlier
            .lock()
            .expect("unpoisoned")
            .eject(Instant::now(), Duration::from_secs(3));
        // Rebuilt while ejected: not in rotation, not warming (yet).
        tokio::time::sleep(Duration::from_secs(3)).await;
        let ramp = Ramp::new(window, &eps, Instant::now()).expect("back and warming");
        assert_eq!(ramp.factor(0, Instant::now()), FLOOR);
        tokio::time::sleep(Duration::from_secs(8)).await;
        assert!((ramp.factor(0, Instant::now()) - 0.8).abs() < 1e-9);
    }

    proptest::proptest! {
        /// The factor stays within [FLOOR, 1], never falls as time passes,
        /// and is 1 from the window's end.
        #[test]
        fn the_factor_is_bounded_monotone_and_full_after_the_window(
            window_ms in 1u64..600_000, a_ms in 0u64..1_200_000, b_ms in 0u64..1_200_000,
        ) {
            let w = Duration::from_millis(window_ms);
            let (lo, hi) = (a_ms.min(b_ms), a_ms.max(b_ms));
            let (flo, fhi) = (
                factor(Duration::from_millis(lo), w),
                factor(Duration::from_millis(hi), w),
            );
            proptest::prop_assert!((FLOOR..=1.0).contains(&flo));
            proptest::prop_assert!(flo <= fhi);
            if hi >= window_ms {
                proptest::prop_assert_eq!(fhi, 1.0);
            }
        }

        /// Vetoing with probability `1 - factor` leaves a warming endpoint
        /// about `factor` of the choices it would have won.
        #[test]
        fn vetoes_follow_the_factor(elapsed_pct in 0u64..100) {
            let eps = vec![ep(1)];
            let now = Instant::now();
            let window = Duration::from_secs(100);
            eps[0].rejoined(now);
            let ramp = Ramp::new(window, &eps, now).expect("warming");
            let later = now + Duration::from_secs(elapsed_pct);
            let f = ramp.factor(0, later);
            let kept = (0..4000).filter(|_| !ramp.vetoes(0, later)).count() as f64 / 4000.0;
            proptest::prop_assert!((kept - f).abs() < 0.05, "kept {} factor {}", kept, f);
        }
    }
}
