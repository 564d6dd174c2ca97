//! Live traffic between services, from the sidecars' reports: the last
//! [`WINDOW`] of requests, 5xx answers and latency per caller → callee edge,
//! merged over every reporting sidecar, and per backend (the subset of the
//! callee a route sent requests to, `version=v2`). The dashboard reads it,
//! and `wfctl split` judges a progressive rollout by it (`/v1/traffic`).
//! The same reports carry mirrored calls compared with their copies, kept
//! over a longer window in [`mirrors`] for `wfctl mirror diff`
//! (`/v1/mirror`).

pub mod mirrors;

use std::collections::{BTreeMap, VecDeque};
use std::sync::Mutex;
use std::time::Duration;

use prometheus_client::metrics::counter::Counter;
use serde::Serialize;
use tokio::time::Instant;
use wayfinder_proto::latency::{self, BUCKETS};
use wayfinder_proto::v1::TrafficReport;

pub use mirrors::{MIRROR_WINDOW, MirrorView};

/// The span of traffic the dashboard shows.
pub const WINDOW: Duration = Duration::from_secs(10);
/// Reports for one edge within this long of each other are merged into one
/// sample, so an edge holds at most `WINDOW / SLOT + 1` samples however
/// many sidecars report it.
const SLOT: Duration = Duration::from_secs(1);
/// Most edges kept at once; reports of further edges are dropped (and
/// counted) until old ones age out.
pub const MAX_EDGES: usize = 10_000;
/// Most edges kept from one caller service: a sidecar holds at most 1,000
/// upstreams by default (`--max-upstreams`), and one reporter must not
/// take every slot of [`MAX_EDGES`] from the others.
pub const MAX_EDGES_PER_CALLER: usize = 1_000;

#[derive(Clone, Copy)]
struct Sample {
    at: Instant,
    requests: u64,
    errors: u64,
    buckets: [u64; BUCKETS],
}

impl Sample {
    /// Adds `other`'s counts; sums saturate (a report may say anything
    /// its validation allows).
    fn merge(&mut self, other: &Sample) {
        self.requests = self.requests.saturating_add(other.requests);
        self.errors = self.errors.saturating_add(other.errors);
        for (b, n) in self.buckets.iter_mut().zip(other.buckets) {
            *b = b.saturating_add(n);
        }
    }
}

/// Reports by edge, newest last; samples older than [`WINDOW`] are dropped
/// as reports come in, whether or not anyone reads them.
#[derive(Default)]
pub struct Traffic {
    inner: Mutex<Inner>,
    /// Edges not kept because [`MAX_EDGES`] were.
    dropped: Counter,
    /// Mirrored calls, by (caller, service, route, shadow).
    mirrors: mirrors::Mirrors,
}

#[derive(Default)]
struct Inner {
    /// By (caller, callee, backend); backend `""` is every request of the edge.
    edges: BTreeMap<(String, String, String), VecDeque<Sample>>,
    /// When every edge was last pruned.
    pruned: Option<Instant>,
}

impl Inner {
    /// Drops samples older than the window, and edges left without any.
    fn prune(&mut self, now: Instant) {
        self.edges.retain(|_, samples| {
            while samples
                .front()
                .is_some_and(|s| now.saturating_duration_since(s.at) > WINDOW)
            {
                samples.pop_front();
            }
            !samples.is_empty()
        });
        self.pruned = Some(now);
    }
}

/// One backend of a callee, over every caller, as `wfctl split` judges it.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct BackendView {
    /// Called service.
    pub callee: String,
    /// The subset, as `version=v2`.
    pub backend: String,
    /// Requests in the window asked for.
    pub requests: u64,
    /// 5xx answers among them.
    pub errors: u64,
    /// Share of 5xx answers.
    pub error_rate: f64,
    /// Median time to response headers, in ms.
    pub p50_ms: Option<f64>,
    /// 99th percentile of time to response headers, in ms.
    pub p99_ms: Option<f64>,
}

/// One edge as the dashboard shows it.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct EdgeView {
    /// Calling service.
    pub caller: String,
    /// Called service.
    pub callee: String,
    /// Requests in the window.
    pub requests: u64,
    /// Requests per second over the window.
    pub rps: f64,
    /// Share of 5xx answers.
    pub error_rate: f64,
    /// 99th percentile of time to response headers, in ms.
    pub p99_ms: Option<f64>,
}

impl Traffic {
    /// Registers the count of edges dropped at the cap.
    pub fn register(&self, reg: &mut prometheus_client::registry::Registry) {
        reg.register(
            "wayfinder_control_traffic_edges_dropped",
            "Traffic report edges not kept because the most edges (10,000 in all, 1,000 per caller service) were",
            self.dropped.clone(),
        );
        reg.register(
            "wayfinder_control_traffic_mirrors_dropped",
            "Traffic report mirror entries not kept because the most series (512 in all, 128 per caller service) were",
            self.mirrors.dropped.clone(),
        );
    }

    /// Adds a (validated) report.
    pub fn record(&self, report: &TrafficReport) {
        let now = Instant::now();
        self.mirrors.record(&report.service, &report.mirrors, now);
        let mut inner = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        if inner
            .pruned
            .is_none_or(|at| now.saturating_duration_since(at) >= SLOT)
        {
            inner.prune(now);
        }
        let caller = report.service.as_str();
        let mut callers_edges = inner
            .edges
            .range((caller.to_string(), String::new(), String::new())..)
            .take_while(|((c, _, _), _)| c == caller)
            .count();
        for e in &report.edges {
            let mut buckets = [0u64; BUCKETS];
            for (b, n) in buckets.iter_mut().zip(&e.latency_buckets) {
                *b = *n;
            }
            let sample = Sample {
                at: now,
                requests: e.requests,
                errors: e.errors,
                buckets,
            };
            let key = (report.service.clone(), e.callee.clone(), e.backend.clone());
            if !inner.edges.contains_key(&key) {
                if inner.edges.len() >= MAX_EDGES || callers_edges >= MAX_EDGES_PER_CALLER {
                    self.dropped.inc();
                    continue;
                }
                callers_edges += 1;
            }
            let samples = inner.edges.entry(key).or_default();
            match samples.back_mut() {
                Some(last) if now.saturating_duration_since(last.at) < SLOT => last.merge(&sample),
                _ => samples.push_back(sample),
            }
        }
    }

    /// Prunes every [`SLOT`], so that samples age out even when no report
    /// comes in and nobody reads the dashboard.
    pub async fn prune_on_a_timer(self: std::sync::Arc<Self>) {
        let mut tick = tokio::time::interval(SLOT);
        loop {
            tick.tick().await;
            let now = Instant::now();
            self.inner
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .prune(now);
            self.mirrors.prune(now);
        }
    }

    /// Each route's mirrored calls with their copies over the last `window`
    /// (at most [`MIRROR_WINDOW`]), of `service` or of every service (see
    /// [`mirrors::Mirrors::diffs`]).
    pub fn mirrors(&self, service: Option<&str>, window: Duration) -> Vec<MirrorView> {
        self.mirrors.diffs(service, window, Instant::now())
    }

    /// Every edge with traffic in the last [`WINDOW`] (all its requests,
    /// whatever backend they went to).
    pub fn edges(&self) -> Vec<EdgeView> {
        let now = Instant::now();
        let mut inner = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        inner.prune(now);
        inner
            .edges
            .iter()
            .filter(|((_, _, backend), _)| backend.is_empty())
            .map(|((caller, callee, _), samples)| {
                let total = sum(samples.iter(), now);
                let requests = total.requests;
                EdgeView {
                    caller: caller.clone(),
                    callee: callee.clone(),
                    requests,
                    rps: requests as f64 / WINDOW.as_secs_f64(),
                    error_rate: rate(total.errors, requests),
                    p99_ms: latency::quantile(&total.buckets, 0.99),
                }
            })
            .collect()
    }

    /// Each backend of each callee with traffic in the last `window`
    /// (at most [`WINDOW`]), summed over its callers, sorted by callee
    /// and backend.
    pub fn backends(&self, window: Duration) -> Vec<BackendView> {
        let window = window.min(WINDOW);
        let now = Instant::now();
        let mut inner = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        inner.prune(now);
        let mut by: BTreeMap<(&str, &str), Sample> = BTreeMap::new();
        for ((_, callee, backend), samples) in &inner.edges {
            if backend.is_empty() {
                continue;
            }
            let recent = samples
                .iter()
                .filter(|s| now.saturating_duration_since(s.at) <= window);
            let part = sum(recent, now);
            by.entry((callee.as_str(), backend.as_str()))
                .and_modify(|t| t.merge(&part))
                .or_insert(part);
        }
        by.into_iter()
            .filter(|(_, t)| t.requests > 0)
            .map(|((callee, backend), t)| BackendView {
                callee: callee.to_string(),
                backend: backend.to_string(),
                requests: t.requests,
                errors: t.errors,
                error_rate: rate(t.errors, t.requests),
                p50_ms: latency::quantile(&t.buckets, 0.5),
                p99_ms: latency::quantile(&t.buckets, 0.99),
            })
            .collect()
    }

    /// Samples held, over every edge (memory is bounded by this).
    #[cfg(test)]
    fn samples(&self) -> usize {
        let inner = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        inner.edges.values().map(VecDeque::len).sum()
    }
}

/// The samples added up.
fn sum<'a>(samples: impl Iterator<Item = &'a Sample>, now: Instant) -> Sample {
    let mut total = Sample {
        at: now,
        requests: 0,
        errors: 0,
        buckets: [0; BUCKETS],
    };
    for s in samples {
        total.merge(s);
    }
    total
}

/// `errors` over `requests`, 0 without requests.
fn rate(errors: u64, requests: u64) -> f64 {
    if requests == 0 {
        0.0
    } else {
        errors as f64 / requests as f64
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use wayfinder_proto::v1::EdgeTraffic;

    fn report(service: &str, callee: &str, requests: u64, errors: u64, ms: u64) -> TrafficReport {
        backend_report(service, callee, "", requests, errors, ms)
    }

    fn backend_report(
        service: &str,
        callee: &str,
        backend: &str,
        requests: u64,
        errors: u64,
        ms: u64,
    ) -> TrafficReport {
        let mut buckets = vec![0; BUCKETS];
        buckets[latency::bucket(Duration::from_millis(ms))] = requests;
        TrafficReport {
            node: format!("{service}-1"),
            service: service.into(),
            edges: vec![EdgeTraffic {
                callee: callee.into(),
                requests,
                errors,
                latency_buckets: buckets,
                backend: backend.into(),
            }],
            mirrors: Vec::new(),
            status: None,
        }
    }

    #[tokio::test(start_paused = true)]
    async fn reports_from_several_sidecars_merge_and_age_out() {
        let t = Traffic::default();
        t.record(&report("client", "web", 60, 0, 1));
        t.record(&report("client", "web", 40, 10, 1));
        t.record(&report("web", "api", 5, 0, 100));
        let e = t.edges();
        assert_eq!(e.len(), 2);
        assert_eq!(
            (e[0].caller.as_str(), e[0].callee.as_str()),
            ("client", "web")
        );
        assert_eq!(e[0].requests, 100);
        assert_eq!(e[0].rps, 10.0);
        assert_eq!(e[0].error_rate, 0.1);
        assert!(e[0].p99_ms.is_some_and(|p| p <= 1.0));
        assert!(e[1].p99_ms.is_some_and(|p| p > 64.0 && p <= 128.0));
        tokio::time::advance(WINDOW + Duration::from_secs(1)).await;
        assert!(t.edges().is_empty(), "old traffic is forgotten");
    }

    #[tokio::test(start_paused = true)]
    async fn memory_stays_bounded_when_nobody_reads_and_sums_saturate() {
        let t = Traffic::default();
        // 50 sidecars report the same edge every 2 s for a minute, and
        // nobody looks at the dashboard.
        for _ in 0..30 {
            for _ in 0..50 {
                t.record(&report("client", "web", 10, 0, 1));
            }
            tokio::time::advance(Duration::from_secs(2)).await;
        }
        let bound = (WINDOW.as_secs() / SLOT.as_secs() + 1) as usize;
        assert!(t.samples() <= bound, "{} samples held", t.samples());
        t.record(&report("client", "web", u64::MAX, 0, 1));
        t.record(&report("client", "web", u64::MAX, 0, 1));
        let e = t.edges();
        assert_eq!(e[0].requests, u64::MAX, "saturates, never wraps");
    }

    #[tokio::test(start_paused = true)]
    async fn edges_beyond_the_cap_are_dropped_and_counted() {
        let t = Traffic::default();
        for i in 0..MAX_EDGES + 5 {
            t.record(&report(&format!("c{i}"), "web", 1, 0, 1));
        }
        assert_eq!(t.edges().len(), MAX_EDGES);
        assert_eq!(t.dropped.get(), 5);
        // Once the old ones age out, new edges are kept again.
        tokio::time::advance(WINDOW + SLOT * 2).await;
        t.record(&report("late", "web", 1, 0, 1));
        assert_eq!(t.edges().len(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn one_caller_keeps_at_most_its_share_of_edges_and_a_timer_ages_them_out() {
        let t = std::sync::Arc::new(Traffic::default());
        tokio::spawn(t.clone().prune_on_a_timer());
        for i in 0..MAX_EDGES_PER_CALLER + 7 {
            t.record(&report("greedy", &format!("s{i}"), 1, 0, 1));
        }
        t.record(&report("client", "web", 1, 0, 1));
        assert_eq!(
            t.edges().len(),
            MAX_EDGES_PER_CALLER + 1,
            "the other caller still counts"
        );
        assert_eq!(t.dropped.get(), 7);
        // Nobody reports or reads: the timer alone empties it.
        tokio::time::sleep(WINDOW + SLOT * 2).await;
        assert_eq!(t.samples(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn backends_sum_over_callers_within_the_window_and_leave_edges_unchanged() {
        let t = Traffic::default();
        t.record(&backend_report("client", "web", "version=v2", 10, 5, 200));
        tokio::time::advance(Duration::from_secs(4)).await;
        t.record(&report("client", "web", 100, 5, 1));
        t.record(&backend_report("client", "web", "version=v1", 90, 0, 1));
        t.record(&backend_report("other", "web", "version=v2", 10, 0, 1));
        let e = t.edges();
        assert_eq!(e.len(), 1, "backend entries are not edges: {e:?}");
        assert_eq!(e[0].requests, 100);
        let all = t.backends(WINDOW);
        let got: Vec<_> = all
            .iter()
            .map(|b| (b.backend.as_str(), b.requests, b.errors))
            .collect();
        assert_eq!(got, [("version=v1", 90, 0), ("version=v2", 20, 5)]);
        assert_eq!(all[1].error_rate, 0.25);
        assert!(all[1].p99_ms.is_some_and(|p| p > 128.0), "{:?}", all[1]);
        // The last 2 s only: the old v2 report is out of it.
        let recent = t.backends(Duration::from_secs(2));
        assert_eq!(recent[1].requests, 10);
        assert_eq!(recent[1].errors, 0);
        assert!(recent[1].p50_ms.is_some_and(|p| p <= 1.0));
    }

    #[tokio::test(start_paused = true)]
    async fn a_report_s_mirrors_are_kept_beside_its_edges_for_longer() {
        let t = std::sync::Arc::new(Traffic::default());
        tokio::spawn(t.clone().prune_on_a_timer());
        let mut r = report("client", "web", 10, 0, 1);
        r.mirrors.push(wayfinder_proto::v1::MirrorDiff {
            service: "web".into(),
            route: "default".into(),
            shadow: "version=v2".into(),
            pairs: 10,
            status_differs: 1,
            body_differs: 0,
            shed: 0,
            shadow_failed: 0,
            primary_latency_buckets: vec![0; BUCKETS],
            shadow_latency_buckets: vec![0; BUCKETS],
        });
        t.record(&r);
        tokio::time::sleep(WINDOW + SLOT * 2).await;
        assert!(t.edges().is_empty());
        let m = t.mirrors(Some("web"), MIRROR_WINDOW);
        assert_eq!((m[0].pairs, m[0].status_differs), (10, 1));
        // The timer ages them out too.
        tokio::time::sleep(MIRROR_WINDOW).await;
        assert!(t.mirrors(None, MIRROR_WINDOW).is_empty());
    }
}
