//! Mirrored calls compared with their copies, from the sidecars' reports
//! (`TrafficReport.mirrors`): per (service, route, shadow), the pairs whose
//! status or body differed, the copies shed or unanswered, and the latency
//! of both sides, summed over every reporting sidecar for the last
//! [`MIRROR_WINDOW`] at most. `wfctl mirror diff` reads it
//! (`/v1/mirror?service=web&window=60s`).
//!
//! Kept apart from the edges of [`super::Traffic`] because a diff is read
//! over a minute or more, not the dashboard's 10 s: the window is longer and
//! the samples coarser, so the caps are lower.

use std::collections::{BTreeMap, VecDeque};
use std::sync::Mutex;
use std::time::Duration;

use prometheus_client::metrics::counter::Counter;
use tokio::time::Instant;
use wayfinder_proto::latency;
use wayfinder_proto::mirror::Tally;
use wayfinder_proto::v1::MirrorDiff;

/// The longest span of mirrored calls kept (and read).
pub const MIRROR_WINDOW: Duration = Duration::from_secs(300);
/// Reports for one series within this long of each other are merged into one
/// sample: sidecars report every 2 s, so a series holds at most
/// `MIRROR_WINDOW / SLOT + 1` (151) samples however many sidecars report it.
const SLOT: Duration = Duration::from_secs(2);
/// Most series (caller, service, route, shadow) kept at once; one holds up
/// to 151 samples of about 400 bytes, so this bounds the memory to ~30 MB.
/// Reports of further series are dropped (and counted) until old ones age
/// out.
pub const MAX_SERIES: usize = 512;
/// Most series kept from one caller service: two mirrored services with
/// every route (at most 64 each, and the calls no route took), so one
/// reporter cannot take every slot of [`MAX_SERIES`] from the others.
pub const MAX_SERIES_PER_CALLER: usize = 128;

/// The counts of one series over one slot.
#[derive(Clone, Copy)]
struct Sample {
    at: Instant,
    tally: Tally,
}

/// A series: who reported (the caller service) and what it compared.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord)]
struct Key {
    caller: String,
    service: String,
    route: String,
    shadow: String,
}

pub use wayfinder_proto::view::MirrorView;

/// Samples by series, newest last; those older than [`MIRROR_WINDOW`] are
/// dropped as reports come in and on [`super::Traffic::prune_on_a_timer`].
#[derive(Default)]
pub struct Mirrors {
    inner: Mutex<Inner>,
    /// Series not kept because [`MAX_SERIES`] (or the caller's share) were.
    pub(super) dropped: Counter,
}

#[derive(Default)]
struct Inner {
    series: BTreeMap<Key, VecDeque<Sample>>,
    /// When every series was last pruned.
    pruned: Option<Instant>,
}

impl Inner {
    /// Drops samples older than the window, and series left without any.
    fn prune(&mut self, now: Instant) {
        self.series.retain(|_, samples| {
            while samples
                .front()
                .is_some_and(|s| now.saturating_duration_since(s.at) > MIRROR_WINDOW)
            {
                samples.pop_front();
            }
            !samples.is_empty()
        });
        self.pruned = Some(now);
    }

    /// Series `caller` holds.
    fn held_by(&self, caller: &str) -> usize {
        let from = Key {
            caller: caller.to_string(),
            service: String::new(),
            route: String::new(),
            shadow: String::new(),
        };
        self.series
            .range(from..)
            .take_while(|(k, _)| k.caller == caller)
            .count()
    }
}

impl Mirrors {
    /// Adds the (validated) entries `caller`'s sidecar reported at `now`.
    pub fn record(&self, caller: &str, entries: &[MirrorDiff], now: Instant) {
        if entries.is_empty() {
            return;
        }
        let mut inner = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        if inner
            .pruned
            .is_none_or(|at| now.saturating_duration_since(at) >= SLOT)
        {
            inner.prune(now);
        }
        let mut held = inner.held_by(caller);
        for m in entries {
            let sample = Sample {
                at: now,
                tally: Tally::from_wire(m),
            };
            if !sample.tally.any() {
                continue;
            }
            let key = Key {
                caller: caller.to_string(),
                service: m.service.clone(),
                route: m.route.clone(),
                shadow: m.shadow.clone(),
            };
            if !inner.series.contains_key(&key) {
                if inner.series.len() >= MAX_SERIES || held >= MAX_SERIES_PER_CALLER {
                    self.dropped.inc();
                    continue;
                }
                held += 1;
            }
            let samples = inner.series.entry(key).or_default();
            match samples.back_mut() {
                Some(last) if now.saturating_duration_since(last.at) < SLOT => {
                    last.tally.add(&sample.tally)
                }
                _ => samples.push_back(sample),
            }
        }
    }

    /// Drops what aged out.
    pub fn prune(&self, now: Instant) {
        let mut inner = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        inner.prune(now);
    }

    /// Each (service, route, shadow) with mirrored calls in the last
    /// `window` (at most [`MIRROR_WINDOW`]), of `service` or of every
    /// service, summed over the callers, sorted by service, route and
    /// shadow.
    pub fn diffs(&self, service: Option<&str>, window: Duration, now: Instant) -> Vec<MirrorView> {
        let window = window.min(MIRROR_WINDOW);
        let mut inner = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        inner.prune(now);
        let mut by: BTreeMap<(&str, &str, &str), Tally> = BTreeMap::new();
        for (k, samples) in &inner.series {
            if service.is_some_and(|s| s != k.service) {
                continue;
            }
            let total = by.entry((&k.service, &k.route, &k.shadow)).or_default();
            for s in samples
                .iter()
                .filter(|s| now.saturating_duration_since(s.at) <= window)
            {
                total.add(&s.tally);
            }
        }
        by.into_iter()
            .filter(|(_, t)| t.any())
            .map(|((service, route, shadow), t)| MirrorView {
                service: service.to_string(),
                route: route.to_string(),
                shadow: shadow.to_string(),
                pairs: t.pairs,
                status_differs: t.status_differs,
                body_differs: t.body_differs,
                shed: t.shed,
                shadow_failed: t.shadow_failed,
                primary_p50_ms: latency::quantile(&t.primary, 0.5),
                primary_p99_ms: latency::quantile(&t.primary, 0.99),
                shadow_p50_ms: latency::quantile(&t.shadow, 0.5),
                shadow_p99_ms: latency::quantile(&t.shadow, 0.99),
            })
            .collect()
    }

    /// Samples held, over every series (memory is bounded by this).
    #[cfg(test)]
    fn samples(&self) -> usize {
        let inner = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        inner.series.values().map(VecDeque::len).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `pairs` pairs answered in `primary_ms` and `shadow_ms`.
    fn diff(service: &str, route: &str, pairs: u64, primary_ms: u64, shadow_ms: u64) -> MirrorDiff {
        let mut primary = vec![0; latency::BUCKETS];
        primary[latency::bucket(Duration::from_millis(primary_ms))] = pairs;
        let mut shadow = vec![0; latency::BUCKETS];
        shadow[latency::bucket(Duration::from_millis(shadow_ms))] = pairs;
        MirrorDiff {
            service: service.into(),
            route: route.into(),
            shadow: "version=v2".into(),
            pairs,
            status_differs: 0,
            body_differs: 0,
            shed: 0,
            shadow_failed: 0,
            primary_latency_buckets: primary,
            shadow_latency_buckets: shadow,
        }
    }

    #[tokio::test(start_paused = true)]
    async fn diffs_sum_over_callers_and_sidecars_within_the_window() {
        let m = Mirrors::default();
        let old = MirrorDiff {
            status_differs: 5,
            ..diff("web", "default", 10, 1, 1)
        };
        m.record("client", &[old], Instant::now());
        tokio::time::advance(Duration::from_secs(30)).await;
        let now = Instant::now();
        let a = MirrorDiff {
            status_differs: 1,
            body_differs: 2,
            shed: 3,
            ..diff("web", "default", 100, 1, 100)
        };
        let b = MirrorDiff {
            shadow_failed: 4,
            ..diff("web", "default", 100, 1, 100)
        };
        m.record("client", &[a], now);
        m.record("client", std::slice::from_ref(&b), now);
        m.record("other", &[b, diff("api", "", 7, 1, 1)], now);

        let all = m.diffs(Some("web"), Duration::from_secs(60), now);
        assert_eq!(all.len(), 1, "{all:?}");
        let d = &all[0];
        assert_eq!(
            (d.route.as_str(), d.shadow.as_str()),
            ("default", "version=v2")
        );
        assert_eq!(d.pairs, 310);
        assert_eq!((d.status_differs, d.body_differs), (6, 2));
        assert_eq!((d.shed, d.shadow_failed), (3, 8));
        assert!(d.primary_p99_ms.is_some_and(|p| p <= 1.0), "{d:?}");
        assert!(
            d.shadow_p50_ms.is_some_and(|p| p > 64.0 && p <= 128.0),
            "{d:?}"
        );

        // The last 10 s only: the first report is out of it.
        let recent = m.diffs(Some("web"), Duration::from_secs(10), now);
        assert_eq!(recent[0].pairs, 300);
        assert_eq!(recent[0].status_differs, 1);
        // Every service, sorted.
        let every = m.diffs(None, Duration::from_secs(60), now);
        let names: Vec<_> = every.iter().map(|d| d.service.as_str()).collect();
        assert_eq!(names, ["api", "web"]);
        assert!(m.diffs(Some("nope"), MIRROR_WINDOW, now).is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn old_calls_age_out_and_memory_stays_bounded_when_nobody_reads() {
        let m = Mirrors::default();
        // 50 sidecars report the same series every 2 s for 10 minutes.
        for _ in 0..300 {
            for _ in 0..50 {
                m.record("client", &[diff("web", "default", 1, 1, 1)], Instant::now());
            }
            tokio::time::advance(SLOT).await;
        }
        let bound = (MIRROR_WINDOW.as_secs() / SLOT.as_secs() + 1) as usize;
        assert!(m.samples() <= bound, "{} samples held", m.samples());
        let d = m.diffs(None, MIRROR_WINDOW, Instant::now());
        assert!(d[0].pairs <= 50 * bound as u64, "{d:?}");
        tokio::time::advance(MIRROR_WINDOW + SLOT).await;
        m.prune(Instant::now());
        assert_eq!(m.samples(), 0, "old calls are forgotten");
    }

    #[tokio::test(start_paused = true)]
    async fn series_beyond_the_caps_are_dropped_and_counted_and_sums_saturate() {
        let m = Mirrors::default();
        let now = Instant::now();
        for i in 0..MAX_SERIES_PER_CALLER + 3 {
            m.record("greedy", &[diff(&format!("s{i}"), "", 1, 1, 1)], now);
        }
        assert_eq!(m.dropped.get(), 3);
        for i in 0..MAX_SERIES {
            m.record(&format!("c{i}"), &[diff("web", "", 1, 1, 1)], now);
        }
        let kept = m.diffs(None, MIRROR_WINDOW, now);
        assert_eq!(kept.len(), MAX_SERIES_PER_CALLER + 1);
        assert_eq!(
            m.dropped.get(),
            3 + MAX_SERIES_PER_CALLER as u64,
            "the callers after the cap are dropped"
        );
        let huge = MirrorDiff {
            shed: u64::MAX,
            ..diff("web", "", u64::MAX, 1, 1)
        };
        m.record("c0", &[huge.clone(), huge], now);
        let web = m.diffs(Some("web"), MIRROR_WINDOW, now);
        assert_eq!(web[0].pairs, u64::MAX, "saturates, never wraps");
        assert_eq!(web[0].shed, u64::MAX);
    }

    #[tokio::test(start_paused = true)]
    async fn entries_with_nothing_mirrored_take_no_slot() {
        let m = Mirrors::default();
        let now = Instant::now();
        m.record("client", &[diff("web", "", 0, 1, 1)], now);
        assert_eq!(m.samples(), 0);
        let shed_only = MirrorDiff {
            shed: 2,
            ..diff("web", "", 0, 1, 1)
        };
        m.record("client", &[shed_only], now);
        let d = m.diffs(Some("web"), MIRROR_WINDOW, now);
        assert_eq!((d[0].pairs, d[0].shed), (0, 2));
        assert_eq!(d[0].primary_p50_ms, None, "no pairs, no latency");
    }
}
