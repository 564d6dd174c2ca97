//! Smooth weighted round robin (nginx's algorithm): over every cycle of
//! `sum(weights)` picks each endpoint is chosen exactly `weight` times, and
//! the choices are interleaved rather than bunched. A warming endpoint
//! (slow start) counts with its weight times its ramp's factor.

use std::sync::{Arc, Mutex};

use super::slow_start::Ramp;
use super::{Balancer, EndpointStats, PickContext, Picks};

/// Smooth weighted round robin.
pub struct SmoothWeighted {
    endpoints: Vec<Arc<EndpointStats>>,
    current: Mutex<Vec<i64>>,
    total: i64,
    ramp: Option<Ramp>,
}

/// Weights are scaled by this much while some endpoint warms, so that a
/// factor of a tenth still leaves whole numbers to add.
const RAMP_SCALE: f64 = 1024.0;

impl SmoothWeighted {
    /// A balancer over `endpoints` using their weights.
    pub fn new(endpoints: Vec<Arc<EndpointStats>>) -> Self {
        let total = endpoints.iter().map(|e| i64::from(e.weight)).sum();
        Self {
            current: Mutex::new(vec![0; endpoints.len()]),
            endpoints,
            total,
            ramp: None,
        }
    }

    /// The same balancer with warming endpoints ramping up.
    pub fn ramped(mut self, ramp: Option<Ramp>) -> Self {
        self.ramp = ramp;
        self
    }
}

impl Balancer for SmoothWeighted {
    fn pick(&self, _: &PickContext) -> Picks {
        let n = self.endpoints.len();
        if n == 0 {
            return Picks::new(0, 0);
        }
        let now = self.ramp.as_ref().map(|_| tokio::time::Instant::now());
        let weight = |i: usize, e: &EndpointStats| match (&self.ramp, now) {
            (Some(r), Some(now)) => (f64::from(e.weight) * RAMP_SCALE * r.factor(i, now)) as i64,
            _ => i64::from(e.weight),
        };
        let mut cur = self.current.lock().unwrap_or_else(|p| p.into_inner());
        let mut best = 0;
        let mut total = 0;
        for (i, e) in self.endpoints.iter().enumerate() {
            let w = weight(i, e);
            total += w;
            cur[i] += w;
            if cur[i] > cur[best] {
                best = i;
            }
        }
        cur[best] -= if self.ramp.is_some() {
            total
        } else {
            self.total
        };
        Picks::new(best, n)
    }
    fn endpoints(&self) -> &[Arc<EndpointStats>] {
        &self.endpoints
    }
}

#[cfg(test)]
mod tests {
    use super::super::testing::{counts, endpoints};
    use super::*;

    proptest::proptest! {
        #[test]
        fn each_cycle_gives_every_endpoint_exactly_its_weight(
            weights in proptest::collection::vec(1u32..20, 1..8),
            cycles in 1usize..4,
        ) {
            let b = SmoothWeighted::new(endpoints(&weights));
            let total: usize = weights.iter().map(|&w| w as usize).sum();
            let c = counts(&b, total * cycles, |_| None);
            for (i, &w) in weights.iter().enumerate() {
                proptest::prop_assert_eq!(c[i], w as usize * cycles);
            }
        }
    }

    #[test]
    fn picks_are_interleaved_not_bunched() {
        let b = SmoothWeighted::new(endpoints(&[5, 1, 1]));
        let seq: Vec<_> = (0..7)
            .filter_map(|_| b.pick(&PickContext::default()).next())
            .collect();
        // nginx's documented sequence for weights 5,1,1: a a b a c a a
        assert_eq!(seq, vec![0, 0, 1, 0, 2, 0, 0]);
    }

    #[tokio::test(start_paused = true)]
    async fn a_warming_endpoint_counts_with_its_weight_times_its_ramp() {
        let eps = endpoints(&[100, 100]);
        let window = std::time::Duration::from_secs(10);
        eps[1].rejoined(tokio::time::Instant::now());
        tokio::time::sleep(std::time::Duration::from_secs(5)).await;
        let ramp = Ramp::new(window, &eps, tokio::time::Instant::now());
        let b = SmoothWeighted::new(eps).ramped(ramp);
        // Weights 100 and 50: a third of the picks.
        let c = counts(&b, 3000, |_| None);
        assert!((990..=1010).contains(&c[1]), "{c:?}");
    }
}
