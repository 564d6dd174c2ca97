//! Plain round robin: weights ignored, every endpoint in turn. A warming
//! endpoint (slow start) has its turn skipped with probability
//! `1 - factor`, the turn going to the next endpoint in line.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use super::slow_start::Ramp;
use super::{Balancer, EndpointStats, PickContext, Picks};

/// Round robin.
pub struct RoundRobin {
    endpoints: Vec<Arc<EndpointStats>>,
    next: AtomicUsize,
    ramp: Option<Ramp>,
}

impl RoundRobin {
    /// Starts at a random offset so sidecars restarted together do not all
    /// hit the same endpoint first.
    pub fn new(endpoints: Vec<Arc<EndpointStats>>) -> Self {
        Self {
            next: AtomicUsize::new(rand::random::<u32>() as usize),
            endpoints,
            ramp: None,
        }
    }

    /// The same balancer with warming endpoints ramping up.
    pub fn ramped(mut self, ramp: Option<Ramp>) -> Self {
        self.ramp = ramp;
        self
    }
}

impl Balancer for RoundRobin {
    fn pick(&self, _: &PickContext) -> Picks {
        let n = self.endpoints.len();
        let mut turn = self.next.fetch_add(1, Ordering::Relaxed);
        if let (Some(ramp), true) = (&self.ramp, n > 1) {
            let now = tokio::time::Instant::now();
            // At most n skips: some endpoint is always taken.
            for _ in 0..n {
                if !ramp.vetoes(turn % n, now) {
                    break;
                }
                turn = self.next.fetch_add(1, Ordering::Relaxed);
            }
        }
        Picks::new(turn, n)
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
        fn every_endpoint_gets_the_same_share(n in 1usize..20, rounds in 1usize..50) {
            let b = RoundRobin::new(endpoints(&vec![1; n]));
            let c = counts(&b, n * rounds, |_| None);
            proptest::prop_assert!(c.iter().all(|&x| x == rounds), "{:?}", c);
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_warming_endpoint_gets_its_turn_in_proportion_to_its_ramp() {
        let eps = endpoints(&[1, 1, 1]);
        let window = std::time::Duration::from_secs(10);
        eps[2].rejoined(tokio::time::Instant::now());
        let build = || {
            RoundRobin::new(eps.clone()).ramped(Ramp::new(
                window,
                &eps,
                tokio::time::Instant::now(),
            ))
        };
        // A skipped turn goes to the next in line, so the warming endpoint
        // takes f of every 2 + f picks: f / (2 + f) of them.
        let c = counts(&build(), 30_000, |_| None);
        assert!((1100..=1800).contains(&c[2]), "at the floor, 1/21: {c:?}");
        tokio::time::sleep(std::time::Duration::from_secs(5)).await;
        let c = counts(&build(), 30_000, |_| None);
        assert!((5400..=6600).contains(&c[2]), "half-way, 1/5: {c:?}");
    }
}
