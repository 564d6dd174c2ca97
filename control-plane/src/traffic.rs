//! Live traffic between services, from the sidecars' reports: the last
//! [`WINDOW`] of requests, 5xx answers and latency per caller → callee edge,
//! merged over every reporting sidecar. Only the dashboard reads it.

use std::collections::{BTreeMap, VecDeque};
use std::sync::Mutex;
use std::time::Duration;

use serde::Serialize;
use tokio::time::Instant;
use wayfinder_proto::latency::{self, BUCKETS};
use wayfinder_proto::v1::TrafficReport;

/// The span of traffic the dashboard shows.
pub const WINDOW: Duration = Duration::from_secs(10);

struct Sample {
    at: Instant,
    requests: u64,
    errors: u64,
    buckets: [u64; BUCKETS],
}

/// Reports by edge, newest last.
#[derive(Default)]
pub struct Traffic {
    edges: Mutex<BTreeMap<(String, String), VecDeque<Sample>>>,
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
    /// Adds a (validated) report.
    pub fn record(&self, report: &TrafficReport) {
        let now = Instant::now();
        let mut edges = self.edges.lock().unwrap_or_else(|p| p.into_inner());
        for e in &report.edges {
            let mut buckets = [0u64; BUCKETS];
            for (b, n) in buckets.iter_mut().zip(&e.latency_buckets) {
                *b = *n;
            }
            edges
                .entry((report.service.clone(), e.callee.clone()))
                .or_default()
                .push_back(Sample {
                    at: now,
                    requests: e.requests,
                    errors: e.errors,
                    buckets,
                });
        }
    }

    /// Every edge with traffic in the last [`WINDOW`]; older samples are dropped.
    pub fn edges(&self) -> Vec<EdgeView> {
        let now = Instant::now();
        let mut edges = self.edges.lock().unwrap_or_else(|p| p.into_inner());
        edges.retain(|_, samples| {
            while samples
                .front()
                .is_some_and(|s| now.saturating_duration_since(s.at) > WINDOW)
            {
                samples.pop_front();
            }
            !samples.is_empty()
        });
        edges
            .iter()
            .map(|((caller, callee), samples)| {
                let mut buckets = [0u64; BUCKETS];
                let (mut requests, mut errors) = (0, 0);
                for s in samples {
                    requests += s.requests;
                    errors += s.errors;
                    for (b, n) in buckets.iter_mut().zip(s.buckets) {
                        *b += n;
                    }
                }
                EdgeView {
                    caller: caller.clone(),
                    callee: callee.clone(),
                    requests,
                    rps: requests as f64 / WINDOW.as_secs_f64(),
                    error_rate: if requests == 0 {
                        0.0
                    } else {
                        errors as f64 / requests as f64
                    },
                    p99_ms: latency::quantile(&buckets, 0.99),
                }
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use wayfinder_proto::v1::EdgeTraffic;

    fn report(service: &str, callee: &str, requests: u64, errors: u64, ms: u64) -> TrafficReport {
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
            }],
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
}
