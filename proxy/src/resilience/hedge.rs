//! Hedged requests ("The Tail at Scale"): when a try has no answer after a
//! while, a copy goes to the balancer's next endpoint and the first answer
//! wins. The wait is fixed, or a quantile of the upstream's own recent
//! latency, read from a small decaying histogram the hedged upstream keeps.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use wayfinder_proto::latency::{self, BUCKETS};
use wayfinder_proto::policy::{HedgeAfter, Hedging};

/// Samples before a quantile is trusted: until then nothing is hedged.
const MIN_SAMPLES: u64 = 20;
/// The histogram halves every this many samples, so it follows the
/// upstream's latency as it changes (an exponential decay by count).
const DECAY_EVERY: u64 = 1024;

/// A service's hedging, as requests use it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Hedge {
    after: HedgeAfter,
    /// Copies per request.
    pub max_extra: u32,
}

impl Hedge {
    /// From the policy's section.
    pub fn new(h: &Hedging) -> Self {
        Self {
            after: h.after,
            max_extra: h.max_extra.map_or(1, |n| n.get()),
        }
    }

    /// How long the first try may go without an answer before a copy
    /// follows; `None` while the quantile has too few samples to say.
    pub fn delay(&self, recent: &Recent) -> Option<Duration> {
        match self.after {
            HedgeAfter::Fixed(ms) => Some(Duration::from_millis(ms.get().into())),
            HedgeAfter::Quantile(p) => recent.quantile(p / 100.0),
        }
    }
}

/// Recent time-to-headers of an upstream's tries, in the traffic report's
/// log-scale buckets.
pub struct Recent {
    buckets: [AtomicU64; BUCKETS],
    samples: AtomicU64,
}

impl Default for Recent {
    fn default() -> Self {
        Self {
            buckets: std::array::from_fn(|_| AtomicU64::new(0)),
            samples: AtomicU64::new(0),
        }
    }
}

impl Recent {
    /// Records one try that took `d`.
    pub fn record(&self, d: Duration) {
        self.buckets[latency::bucket(d)].fetch_add(1, Ordering::Relaxed);
        let n = self.samples.fetch_add(1, Ordering::Relaxed) + 1;
        if n.is_multiple_of(DECAY_EVERY) {
            for b in &self.buckets {
                // Racing increments may be halved twice or not at all: a
                // sample either way, in a histogram that only guides.
                let _ = b.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |v| Some(v / 2));
            }
        }
    }

    /// The `q` (0-1) quantile, or `None` with fewer than [`MIN_SAMPLES`].
    pub fn quantile(&self, q: f64) -> Option<Duration> {
        if self.samples.load(Ordering::Relaxed) < MIN_SAMPLES {
            return None;
        }
        let counts: [u64; BUCKETS] =
            std::array::from_fn(|i| self.buckets[i].load(Ordering::Relaxed));
        latency::quantile(&counts, q).map(|ms| Duration::from_secs_f64(ms / 1e3))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use wayfinder_proto::policy::PolicyFile;

    fn hedge(after: &str) -> Hedge {
        let file = PolicyFile::parse(
            "t",
            &format!("[services.web.hedging]\nafter = \"{after}\"\n"),
        )
        .expect("valid");
        let h = file
            .services
            .values()
            .next()
            .and_then(|p| p.hedging.clone());
        Hedge::new(&h.expect("hedging"))
    }

    #[test]
    fn a_fixed_delay_needs_no_samples() {
        let h = hedge("30ms");
        assert_eq!(h.delay(&Recent::default()), Some(Duration::from_millis(30)));
        assert_eq!(h.max_extra, 1);
    }

    #[test]
    fn a_quantile_waits_for_samples_then_follows_the_tail() {
        let h = hedge("p90");
        let r = Recent::default();
        for _ in 0..(MIN_SAMPLES - 1) {
            r.record(Duration::from_millis(2));
        }
        assert_eq!(h.delay(&r), None, "too few samples");
        for _ in 0..80 {
            r.record(Duration::from_millis(2));
        }
        for _ in 0..20 {
            r.record(Duration::from_millis(200));
        }
        let d = h.delay(&r).expect("enough samples");
        assert!(
            d >= Duration::from_millis(100),
            "p90 is in the slow tail: {d:?}"
        );
        let p50 = r.quantile(0.5).expect("p50");
        assert!(p50 <= Duration::from_millis(2), "{p50:?}");
    }

    #[test]
    fn old_samples_decay() {
        let r = Recent::default();
        for _ in 0..DECAY_EVERY {
            r.record(Duration::from_millis(300));
        }
        // Three decays later the slow past is a small minority.
        for _ in 0..(3 * DECAY_EVERY) {
            r.record(Duration::from_millis(1));
        }
        let p90 = r.quantile(0.9).expect("samples");
        assert!(p90 <= Duration::from_millis(1), "{p90:?}");
    }
}
