//! Plain round robin: weights ignored, every endpoint in turn.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use super::{Balancer, EndpointStats, PickContext, Picks};

/// Round robin.
pub struct RoundRobin {
    endpoints: Vec<Arc<EndpointStats>>,
    next: AtomicUsize,
}

impl RoundRobin {
    /// Starts at a random offset so sidecars restarted together do not all
    /// hit the same endpoint first.
    pub fn new(endpoints: Vec<Arc<EndpointStats>>) -> Self {
        Self {
            next: AtomicUsize::new(rand::random::<u32>() as usize),
            endpoints,
        }
    }
}

impl Balancer for RoundRobin {
    fn pick(&self, _: &PickContext) -> Picks {
        Picks::new(
            self.next.fetch_add(1, Ordering::Relaxed),
            self.endpoints.len(),
        )
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
}
