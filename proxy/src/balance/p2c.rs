//! Power of two choices: sample two endpoints at random and take the one
//! with the lower cost. Least-request costs by requests in flight; peak-EWMA
//! (Linkerd's default) by latency estimate times load. Both divide by weight.
//! Two random choices avoid the herd behaviour of "always the least loaded"
//! while still steering away from slow or busy endpoints.
//!
//! Slow start: a warming endpoint that wins a comparison loses it after all
//! with probability `1 - factor` (`slow_start.rs`), so its share follows the
//! ramp whatever the costs; scaling its cost instead would make it lose
//! every comparison with an idle rival, ramp or not.

use std::sync::Arc;
use std::time::Instant;

use super::slow_start::Ramp;
use super::{Balancer, EndpointStats, PickContext, Picks};

/// `cost(i, rival)`: endpoint `i`'s cost when compared with `rival`;
/// `decide(winner, loser)` may overrule the comparison (a probe); `ramp`
/// lets a warming winner lose (then `decide` is not asked: a veto is not a
/// comparison lost on cost, and must not earn the loser a probe).
fn two_choices(
    n: usize,
    ramp: Option<&Ramp>,
    cost: impl Fn(usize, usize) -> f64,
    decide: impl Fn(usize, usize) -> usize,
) -> Picks {
    match n {
        0 => Picks::new(0, 0),
        1 => Picks::new(0, 1),
        _ => {
            let a = rand::random_range(0..n);
            let mut b = rand::random_range(0..n - 1);
            if b >= a {
                b += 1;
            }
            let (ca, cb) = (cost(a, b), cost(b, a));
            let (winner, loser) = if ca < cb || (ca == cb && rand::random::<bool>()) {
                (a, b)
            } else {
                (b, a)
            };
            if ramp.is_some_and(|r| r.vetoes(winner, tokio::time::Instant::now())) {
                return Picks::new(loser, n);
            }
            Picks::new(decide(winner, loser), n)
        }
    }
}

/// Least outstanding requests over two random choices.
pub struct LeastRequest {
    endpoints: Vec<Arc<EndpointStats>>,
    ramp: Option<Ramp>,
}

impl LeastRequest {
    /// A balancer over `endpoints`.
    pub fn new(endpoints: Vec<Arc<EndpointStats>>) -> Self {
        Self {
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

impl Balancer for LeastRequest {
    fn pick(&self, _: &PickContext) -> Picks {
        let eps = &self.endpoints;
        two_choices(
            eps.len(),
            self.ramp.as_ref(),
            |i, _| (f64::from(eps[i].in_flight()) + 1.0) / f64::from(eps[i].weight),
            |winner, _| winner,
        )
    }
    fn endpoints(&self) -> &[Arc<EndpointStats>] {
        &self.endpoints
    }
}

/// Peak-EWMA latency × (in flight + 1) over two random choices.
pub struct PeakEwma {
    endpoints: Vec<Arc<EndpointStats>>,
    ramp: Option<Ramp>,
}

impl PeakEwma {
    /// A balancer over `endpoints`.
    pub fn new(endpoints: Vec<Arc<EndpointStats>>) -> Self {
        Self {
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

impl PeakEwma {
    /// The pick at `now` (estimates decay with time, see
    /// [`EndpointStats::cost_ns`]). An endpoint not measured yet borrows
    /// its rival's estimate, so the two compare by load alone: a fixed
    /// default (Linkerd's 30 ms) kept a new endpoint out of rotation for
    /// ~30 s beside rivals answering in a millisecond, until it decayed.
    pub(crate) fn pick_at(&self, now: Instant) -> Picks {
        let eps = &self.endpoints;
        two_choices(
            eps.len(),
            self.ramp.as_ref(),
            |i, rival| {
                let rtt = eps[i]
                    .estimate_ns(now)
                    .or_else(|| eps[rival].estimate_ns(now))
                    .unwrap_or(super::DEFAULT_RTT.as_nanos() as f64);
                rtt * (f64::from(eps[i].in_flight()) + 1.0) / f64::from(eps[i].weight)
            },
            // An estimate is only refreshed by picking its endpoint: one
            // that keeps losing is re-measured now and then (`PROBE_AFTER`).
            |winner, loser| {
                if eps[loser].passed_over() {
                    loser
                } else {
                    eps[winner].chosen();
                    winner
                }
            },
        )
    }
}

impl Balancer for PeakEwma {
    fn pick(&self, _: &PickContext) -> Picks {
        self.pick_at(Instant::now())
    }
    fn endpoints(&self) -> &[Arc<EndpointStats>] {
        &self.endpoints
    }
}

#[cfg(test)]
mod tests {
    use std::cmp::Reverse;
    use std::collections::BinaryHeap;
    use std::time::Duration;

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
        // It loses every comparison; only probes reach it, about one pick
        // in 1.5 × PROBE_AFTER.
        let probes = 3000 / (super::super::PROBE_AFTER as usize * 3 / 2);
        assert!(c[0] <= probes + probes / 2, "{c:?}");
        assert!(c[0] >= probes / 2, "it is re-measured now and then: {c:?}");
    }

    #[test]
    fn one_spike_keeps_an_endpoint_out_only_until_its_probe() {
        let eps = endpoints(&[1, 1, 1]);
        let b = PeakEwma::new(eps.clone());
        let mut now = Instant::now();
        for e in &eps {
            e.observe(Duration::from_millis(2), now);
        }
        // One 300 ms answer from endpoint 0, then everyone answers in 2 ms.
        eps[0].observe(Duration::from_millis(300), now);
        let mut first_again = None;
        for call in 0..300 {
            let i = b.pick_at(now).next().expect("endpoints");
            now += Duration::from_millis(2);
            eps[i].observe(Duration::from_millis(2), now);
            if i == 0 && first_again.is_none() {
                first_again = Some(call);
            }
        }
        let back = first_again.expect("picked again within 300 calls");
        // Without probes it stayed out for EWMA_DECAY * ln(150) = 50 s
        // of simulated time, far beyond these 300 calls (0.6 s).
        assert!(back <= 100, "first picked again at call {back}");
        let c = counts(&b, 3000, |_| None);
        assert!(c[0] >= 600, "back in rotation after its probe: {c:?}");
    }

    #[test]
    fn a_new_endpoint_gets_traffic_beside_fast_measured_ones() {
        let eps = endpoints(&[1, 1, 1]);
        let now = Instant::now();
        eps[0].observe(Duration::from_millis(1), now);
        eps[1].observe(Duration::from_millis(1), now);
        let b = PeakEwma::new(eps);
        // Not measured, it compares with its rival by load: half the
        // comparisons it is in (two thirds of them), so about a third.
        let c = counts(&b, 3000, |_| None);
        assert!((700..=1300).contains(&c[2]), "{c:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn a_warming_endpoint_wins_its_ramp_share_of_the_comparisons_it_would_win() {
        let eps = endpoints(&[1, 1, 1]);
        let window = Duration::from_secs(10);
        eps[0].rejoined(tokio::time::Instant::now());
        let ramp = || Ramp::new(window, &eps, tokio::time::Instant::now());
        // Nothing in flight: every comparison is a tie, a third each
        // without slow start; at the floor a tenth of that.
        let c = counts(
            &LeastRequest::new(eps.clone()).ramped(ramp()),
            30_000,
            |_| None,
        );
        assert!((700..=1300).contains(&c[0]), "{c:?}");
        tokio::time::sleep(Duration::from_secs(8)).await;
        let c = counts(&PeakEwma::new(eps.clone()).ramped(ramp()), 30_000, |_| None);
        assert!((7300..=8700).contains(&c[0]), "0.8 of a third: {c:?}");
        tokio::time::sleep(Duration::from_secs(2)).await;
        assert!(ramp().is_none(), "warm after the window");
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

    /// Sequential calls on a simulated clock: each call takes its endpoint's
    /// latency (times a jitter factor in [1, 1.2)), then the next starts.
    /// Returns the calls per endpoint and, per endpoint, the longest time it
    /// went unpicked.
    fn sequential(latency_ms: &[u64], calls: usize, seed: u64) -> (Vec<usize>, Vec<Duration>) {
        let eps = endpoints(&vec![1; latency_ms.len()]);
        let b = PeakEwma::new(eps.clone());
        let t0 = Instant::now();
        let mut now = t0;
        let mut count = vec![0; eps.len()];
        let mut last = vec![t0; eps.len()];
        let mut gap = vec![Duration::ZERO; eps.len()];
        let mut jitter = seed;
        for _ in 0..calls {
            let i = b.pick_at(now).next().expect("endpoints");
            gap[i] = gap[i].max(now - last[i]);
            jitter = jitter
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            let rtt = Duration::from_micros(latency_ms[i] * 1000 * (100 + jitter % 20) / 100);
            now += rtt;
            eps[i].observe(rtt, now);
            count[i] += 1;
            last[i] = now;
        }
        for i in 0..eps.len() {
            gap[i] = gap[i].max(now - last[i]);
        }
        (count, gap)
    }

    /// `workers` clients calling at once on a simulated clock: each call
    /// holds its endpoint's in-flight slot for the endpoint's latency.
    fn concurrent(latency_ms: &[u64], workers: usize, calls: usize) -> Vec<usize> {
        let eps = endpoints(&vec![1; latency_ms.len()]);
        let b = PeakEwma::new(eps.clone());
        let t0 = Instant::now();
        let mut count = vec![0; eps.len()];
        // (completion time, endpoint, guard index)
        let mut pending = BinaryHeap::new();
        let mut guards = Vec::new();
        let mut now = t0;
        for call in 0..calls {
            if pending.len() == workers {
                let Reverse((done, i, g)): Reverse<(Duration, usize, usize)> =
                    pending.pop().expect("a call in flight");
                now = t0 + done;
                let guard: Option<crate::balance::InFlight> = std::mem::take(&mut guards[g]);
                drop(guard);
                eps[i].observe(Duration::from_millis(latency_ms[i]), now);
            }
            let i = b.pick_at(now).next().expect("endpoints");
            count[i] += 1;
            guards.push(Some(eps[i].start()));
            let done = (now - t0) + Duration::from_millis(latency_ms[i]);
            pending.push(Reverse((done, i, call)));
        }
        count
    }

    #[test]
    fn least_request_breaks_ties_fairly() {
        // Nothing in flight: every comparison is a tie.
        for n in 2..=5 {
            let b = LeastRequest::new(endpoints(&vec![1; n]));
            let c = counts(&b, 3000 * n, |_| None);
            assert!(c.iter().all(|&x| (2700..=3300).contains(&x)), "{c:?}");
        }
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(64))]

        /// Three (or more) equal instances and 300 calls one after another:
        /// every instance gets a fair part, whatever the order of the first
        /// comparisons was.
        #[test]
        fn no_equal_endpoint_starves_under_sequential_calls(
            n in 2usize..6, ms in 1u64..50, seed in proptest::prelude::any::<u64>(),
        ) {
            let (count, _) = sequential(&vec![ms; n], 300, seed);
            // Simulated over 6,000 runs the least-served endpoint got at
            // least 46% of a fair share; a third leaves room for the picks'
            // own randomness.
            let fair = 300 / n;
            proptest::prop_assert!(count.iter().all(|&c| c >= fair / 3), "{:?}", count);
        }

        /// Unequal latencies: the slow endpoint gets less, but is tried again
        /// at the latest once its decayed estimate falls below the fastest
        /// one's, after EWMA_DECAY * ln(slow / fast) (plus jitter and slack).
        #[test]
        fn a_slow_endpoint_is_still_tried_again(
            lat in proptest::collection::vec(1u64..100, 2..5), seed in proptest::prelude::any::<u64>(),
        ) {
            let (count, gap) = sequential(&lat, 20_000, seed);
            let (min, max) = (
                *lat.iter().min().unwrap_or(&1) as f64,
                *lat.iter().max().unwrap_or(&1) as f64,
            );
            let bound = super::super::EWMA_DECAY.as_secs_f64() * (1.2 * max / min).ln() + 2.0;
            for (i, g) in gap.iter().enumerate() {
                proptest::prop_assert!(
                    g.as_secs_f64() <= bound,
                    "endpoint {} ({} ms) unpicked for {:?} > {:.1} s; calls {:?}",
                    i, lat[i], g, bound, count
                );
            }
        }

        /// Concurrent callers: equal endpoints share the load.
        #[test]
        fn no_equal_endpoint_starves_under_concurrent_calls(
            n in 2usize..6, ms in 1u64..50, workers in 1usize..16,
        ) {
            let count = concurrent(&vec![ms; n], workers, 600);
            let fair = 600 / n;
            proptest::prop_assert!(count.iter().all(|&c| c >= fair / 3), "{:?}", count);
        }
    }
}
