//! Power of two choices: sample two endpoints at random and take the one
//! with the lower cost. Least-request costs by requests in flight; peak-EWMA
//! (Linkerd's default) by latency estimate times load. Both divide by weight.
//! Two random choices avoid the herd behaviour of "always the least loaded"
//! while still steering away from slow or busy endpoints.

use std::sync::Arc;

use super::{Balancer, EndpointStats, PickContext, Picks};

fn two_choices(n: usize, cost: impl Fn(usize) -> f64) -> Picks {
    match n {
        0 => Picks::new(0, 0),
        1 => Picks::new(0, 1),
        _ => {
            let a = rand::random_range(0..n);
            let mut b = rand::random_range(0..n - 1);
            if b >= a {
                b += 1;
            }
            let (ca, cb) = (cost(a), cost(b));
            let first = if ca < cb || (ca == cb && rand::random::<bool>()) {
                a
            } else {
                b
            };
            Picks::new(first, n)
        }
    }
}

/// Least outstanding requests over two random choices.
pub struct LeastRequest {
    endpoints: Vec<Arc<EndpointStats>>,
}

impl LeastRequest {
    /// A balancer over `endpoints`.
    pub fn new(endpoints: Vec<Arc<EndpointStats>>) -> Self {
        Self { endpoints }
    }
}

impl Balancer for LeastRequest {
    fn pick(&self, _: &PickContext) -> Picks {
        let eps = &self.endpoints;
        two_choices(eps.len(), |i| {
            (f64::from(eps[i].in_flight()) + 1.0) / f64::from(eps[i].weight)
        })
    }
    fn endpoints(&self) -> &[Arc<EndpointStats>] {
        &self.endpoints
    }
}

/// Peak-EWMA latency × (in flight + 1) over two random choices.
pub struct PeakEwma {
    endpoints: Vec<Arc<EndpointStats>>,
}

impl PeakEwma {
    /// A balancer over `endpoints`.
    pub fn new(endpoints: Vec<Arc<EndpointStats>>) -> Self {
        Self { endpoints }
    }
}

impl Balancer for PeakEwma {
    fn pick(&self, _: &PickContext) -> Picks {
        let eps = &self.endpoints;
        two_choices(eps.len(), |i| {
            eps[i].ewma_ns() * (f64::from(eps[i].in_flight()) + 1.0) / f64::from(eps[i].weight)
        })
    }
    fn endpoints(&self) -> &[Arc<EndpointStats>] {
        &self.endpoints
    }
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, Instant};

    use super::super::testing::{counts, endpoints};
    use super::*;

    #[test]
    fn least_request_avoids_the_busy_endpoint() {
        let eps = endpoints(&[1, 1, 1, 1]);
        let _busy: Vec<_> = (0..10).map(|_| eps[2].start()).collect();
        let b = LeastRequest::new(eps);
        let c = counts(&b, 4000, |_| None);
        // The busy endpoint only wins when both choices... cannot both be it.
        assert_eq!(c[2], 0, "{c:?}");
        for i in [0, 1, 3] {
            assert!((1100..=1600).contains(&c[i]), "{c:?}");
        }
    }

    #[test]
    fn peak_ewma_routes_around_a_slow_endpoint() {
        let eps = endpoints(&[1, 1, 1]);
        let now = Instant::now();
        eps[0].observe(Duration::from_millis(500), now);
        eps[1].observe(Duration::from_millis(5), now);
        eps[2].observe(Duration::from_millis(5), now);
        let b = PeakEwma::new(eps);
        let c = counts(&b, 3000, |_| None);
        assert_eq!(c[0], 0, "the slow endpoint never beats a fast one: {c:?}");
    }

    proptest::proptest! {
        #[test]
        fn the_first_choice_is_never_the_strictly_costliest(
            loads in proptest::collection::vec(0u32..5, 2..10),
        ) {
            let eps = endpoints(&vec![1; loads.len()]);
            let _guards: Vec<_> = loads
                .iter()
                .enumerate()
                .flat_map(|(i, &l)| (0..l).map(move |_| i))
                .map(|i| eps[i].start())
                .collect();
            let max = *loads.iter().max().unwrap_or(&0);
            let argmax: Vec<_> = (0..loads.len()).filter(|&i| loads[i] == max).collect();
            let b = LeastRequest::new(eps);
            for _ in 0..50 {
                let first = b.pick(&PickContext::default()).next().unwrap_or(0);
                // A unique most-loaded endpoint can never win a comparison.
                if argmax.len() == 1 {
                    proptest::prop_assert_ne!(first, argmax[0]);
                }
            }
        }

        #[test]
        fn weights_shift_least_request_shares(heavy in 2u32..6) {
            let b = LeastRequest::new(endpoints(&[heavy, 1]));
            // Nothing in flight: cost 1/heavy vs 1/1, so the heavy one always wins.
            let c = counts(&b, 200, |_| None);
            proptest::prop_assert_eq!(c[0], 200);
        }
    }
}
