//! Smooth weighted round robin (nginx's algorithm): over every cycle of
//! `sum(weights)` picks each endpoint is chosen exactly `weight` times, and
//! the choices are interleaved rather than bunched.

use std::sync::{Arc, Mutex};

use super::{Balancer, EndpointStats, PickContext, Picks};

/// Smooth weighted round robin.
pub struct SmoothWeighted {
    endpoints: Vec<Arc<EndpointStats>>,
    current: Mutex<Vec<i64>>,
    total: i64,
}

impl SmoothWeighted {
    /// A balancer over `endpoints` using their weights.
    pub fn new(endpoints: Vec<Arc<EndpointStats>>) -> Self {
        let total = endpoints.iter().map(|e| i64::from(e.weight)).sum();
        Self {
            current: Mutex::new(vec![0; endpoints.len()]),
            endpoints,
            total,
        }
    }
}

impl Balancer for SmoothWeighted {
    fn pick(&self, _: &PickContext) -> Picks {
        let n = self.endpoints.len();
        if n == 0 {
            return Picks::new(0, 0);
        }
        let mut cur = self.current.lock().unwrap_or_else(|p| p.into_inner());
        let mut best = 0;
        for (i, e) in self.endpoints.iter().enumerate() {
            cur[i] += i64::from(e.weight);
            if cur[i] > cur[best] {
                best = i;
            }
        }
        cur[best] -= self.total;
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
}
