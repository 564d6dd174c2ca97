//! What a comparison run measured, read along its timeline: per way, per
//! event window and per second. Pure functions of the samples and the
//! times the events fired, so the report's numbers are unit-tested.

use std::collections::BTreeMap;

use super::load::{Sample, Way};
use super::scenario::Event;

/// An event as it happened.
#[derive(Debug, Clone)]
pub struct Fired {
    /// The scenario's event.
    pub event: Event,
    /// When it was done, in seconds from the start of the load.
    pub at: f64,
    /// Why it could not be done, if it could not.
    pub error: Option<String>,
}

/// A whole run.
#[derive(Debug, Clone)]
pub struct Run {
    /// The ways loaded, in report order.
    pub ways: Vec<Way>,
    /// Every request of every way.
    pub samples: Vec<Sample>,
    /// The events, in order.
    pub fired: Vec<Fired>,
    /// The load's length (s).
    pub seconds: f64,
}

/// One way's totals.
#[derive(Debug, Clone, PartialEq)]
pub struct Totals {
    /// Requests sent.
    pub requests: usize,
    /// Errors, non-200s and timeouts.
    pub failed: usize,
    /// Latency quantiles (ms), failed requests included at their time.
    pub p50: f64,
    /// 90th percentile (ms).
    pub p90: f64,
    /// 99th percentile (ms).
    pub p99: f64,
}

/// The tries beyond the first that the client's sidecar made for one
/// way's calls: hedged copies and retries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extra {
    /// Calls that took more than one try.
    pub calls: usize,
    /// Tries beyond each call's first, in all.
    pub tries: u64,
}

/// One way during one event's window.
#[derive(Debug, Clone, PartialEq)]
pub struct Window {
    /// Requests that ended failed inside the window.
    pub errors: usize,
    /// From the event to the end of the last failure in the window (ms):
    /// 0 when none failed, `None` when requests sent in the window's last
    /// tenth still failed.
    pub recovered_ms: Option<f64>,
}

/// The `q` quantile of sorted values (0 for none).
pub fn quantile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    sorted[((sorted.len() - 1) as f64 * q).round() as usize]
}

impl Run {
    fn of(&self, way: Way) -> impl Iterator<Item = &Sample> {
        self.samples.iter().filter(move |s| s.way == way)
    }

    /// Totals of `way`.
    pub fn totals(&self, way: Way) -> Totals {
        let mut ms: Vec<f64> = self.of(way).map(|s| s.ms).collect();
        ms.sort_by(f64::total_cmp);
        Totals {
            requests: ms.len(),
            failed: self.of(way).filter(|s| !s.ok).count(),
            p50: quantile(&ms, 0.5),
            p90: quantile(&ms, 0.9),
            p99: quantile(&ms, 0.99),
        }
    }

    /// The extra tries of `way`'s calls; `None` when no answer said how
    /// many tries it took (only the sidecar says).
    pub fn extra_tries(&self, way: Way) -> Option<Extra> {
        let said: Vec<u32> = self.of(way).map(|s| s.tries).filter(|&t| t > 0).collect();
        (!said.is_empty()).then(|| Extra {
            calls: said.iter().filter(|&&t| t > 1).count(),
            tries: said.iter().map(|&t| u64::from(t - 1)).sum(),
        })
    }

    /// `[from, to)` of event `i`: until the next event, or the end.
    pub fn window(&self, i: usize) -> (f64, f64) {
        let from = self.fired[i].at;
        let to = self.fired.get(i + 1).map_or(self.seconds, |f| f.at);
        (from, to.max(from))
    }

    /// `way` during event `i`'s window. A request counts for the window it
    /// ended in (the last window takes everything that ended after it
    /// began): one sent before an event that fails because of it counts for
    /// that event. The way is still failing ("never") when a request sent
    /// in the window's last tenth failed, whenever it ended: a timeout
    /// that outlasts the window is no recovery.
    pub fn during(&self, way: Way, i: usize) -> Window {
        let (from, to) = self.window(i);
        let last = i + 1 == self.fired.len();
        let failed: Vec<&Sample> = self
            .of(way)
            .filter(|s| !s.ok && s.end() >= from && (last || s.end() < to))
            .collect();
        let tail = to - (to - from) * 0.1;
        let still = self.of(way).any(|s| !s.ok && s.at >= tail && s.at < to);
        Window {
            errors: failed.len(),
            recovered_ms: (!still).then(|| {
                failed
                    .iter()
                    .map(|s| (s.end() - from) * 1000.0)
                    .fold(0.0, f64::max)
            }),
        }
    }

    /// Failed requests per second of the run, by the second they were sent.
    pub fn failures_per_second(&self, way: Way) -> Vec<(f64, f64)> {
        let n = self.seconds.ceil().max(1.0) as usize;
        let mut counts = vec![0usize; n];
        for s in self.of(way).filter(|s| !s.ok) {
            counts[(s.at.max(0.0) as usize).min(n - 1)] += 1;
        }
        counts
            .into_iter()
            .enumerate()
            .map(|(i, c)| (i as f64 + 0.5, c as f64))
            .collect()
    }

    /// p99 latency (ms) of the requests sent in each second.
    pub fn p99_per_second(&self, way: Way) -> Vec<(f64, f64)> {
        let n = self.seconds.ceil().max(1.0) as usize;
        let mut buckets = vec![Vec::new(); n];
        for s in self.of(way) {
            buckets[(s.at.max(0.0) as usize).min(n - 1)].push(s.ms);
        }
        buckets
            .into_iter()
            .enumerate()
            .filter(|(_, b)| !b.is_empty())
            .map(|(i, mut b)| {
                b.sort_by(f64::total_cmp);
                (i as f64 + 0.5, quantile(&b, 0.99))
            })
            .collect()
    }

    /// Phases: before the first event, then between events: (label, from, to).
    pub fn phases(&self) -> Vec<(String, f64, f64)> {
        let mut p = Vec::new();
        let first = self.fired.first().map_or(self.seconds, |f| f.at);
        p.push(("start".to_string(), 0.0, first));
        for i in 0..self.fired.len() {
            let (from, to) = self.window(i);
            p.push((format!("after {}", self.fired[i].event.label()), from, to));
        }
        p
    }

    /// Instances that answered any way, in name order.
    pub fn instances(&self) -> Vec<String> {
        let mut v: Vec<String> = self
            .samples
            .iter()
            .filter(|s| s.ok)
            .filter_map(|s| s.instance.clone())
            .collect();
        v.sort();
        v.dedup();
        v
    }

    /// Share (%) of `way`'s answered requests each instance took in
    /// `[from, to)`, by sent time.
    pub fn shares(&self, way: Way, from: f64, to: f64) -> BTreeMap<String, f64> {
        let mut counts: BTreeMap<String, usize> = BTreeMap::new();
        let mut total = 0;
        for s in self.of(way).filter(|s| s.ok && s.at >= from && s.at < to) {
            if let Some(i) = &s.instance {
                *counts.entry(i.clone()).or_default() += 1;
                total += 1;
            }
        }
        counts
            .into_iter()
            .map(|(k, c)| (k, c as f64 * 100.0 / total.max(1) as f64))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::lab::scenario::Action;

    fn s(way: Way, at: f64, ok: bool, instance: &str) -> Sample {
        Sample {
            way,
            at,
            ms: 1.0,
            ok,
            instance: (!instance.is_empty()).then(|| instance.to_string()),
            tries: 0,
        }
    }

    fn fired(at: f64, action: Action, target: &str) -> Fired {
        Fired {
            event: Event {
                at: Duration::from_secs_f64(at),
                action,
                target: target.into(),
                lines: [1, 2, 3],
                index: 0,
            },
            at,
            error: None,
        }
    }

    fn run(samples: Vec<Sample>) -> Run {
        Run {
            ways: vec![Way::DnsOnce, Way::Mesh],
            samples,
            fired: vec![
                fired(4.0, Action::Kill, "web2"),
                fired(5.5, Action::Pause, "web1"),
            ],
            seconds: 10.0,
        }
    }

    #[test]
    fn each_event_is_measured_in_its_own_window() {
        let r = run(vec![
            s(Way::Mesh, 0.0, true, "web1"),
            s(Way::Mesh, 4.2, false, ""),
            s(Way::Mesh, 5.0, true, "web3"),
            s(Way::Mesh, 5.5, false, ""),
            s(Way::Mesh, 6.0, false, ""),
            s(Way::Mesh, 9.9, true, "web3"),
            s(Way::DnsOnce, 4.0, false, ""),
            s(Way::DnsOnce, 9.7, false, ""),
        ]);
        let kill = r.during(Way::Mesh, 0);
        assert_eq!(kill.errors, 1);
        assert!((kill.recovered_ms.expect("recovered") - 201.0).abs() < 1e-6);
        let pause = r.during(Way::Mesh, 1);
        assert_eq!(pause.errors, 2);
        assert!((pause.recovered_ms.expect("recovered") - 501.0).abs() < 1e-6);
        // Failing in the last tenth of the window: never recovered.
        assert_eq!(r.during(Way::DnsOnce, 1).recovered_ms, None);
        let once = r.during(Way::DnsOnce, 0);
        assert_eq!(once.errors, 1);
        assert!((once.recovered_ms.expect("recovered") - 1.0).abs() < 1e-6);
        let t = r.totals(Way::Mesh);
        assert_eq!((t.requests, t.failed), (6, 3));
    }

    #[test]
    fn a_timeout_outlasting_its_window_is_no_recovery() {
        let mut late = s(Way::DnsOnce, 5.4, false, "");
        late.ms = 2000.0;
        let r = run(vec![s(Way::DnsOnce, 4.5, false, ""), late.clone()]);
        // Sent in the kill window's last tenth, it failed after the pause:
        // the kill window never recovered; the pause window counts it.
        assert_eq!(r.during(Way::DnsOnce, 0).recovered_ms, None);
        assert_eq!(r.during(Way::DnsOnce, 0).errors, 1);
        assert_eq!(r.during(Way::DnsOnce, 1).errors, 1);
        // A failure ending after the run still counts for the last window.
        let mut after = s(Way::Mesh, 9.7, false, "");
        after.ms = 2000.0;
        let r = run(vec![after]);
        assert_eq!(r.during(Way::Mesh, 1).errors, 1);
        assert_eq!(r.during(Way::Mesh, 1).recovered_ms, None);
    }

    #[test]
    fn per_second_series_and_shares() {
        let r = run(vec![
            s(Way::Mesh, 0.1, true, "web1"),
            s(Way::Mesh, 0.7, true, "web2"),
            s(Way::Mesh, 1.2, true, "web1"),
            s(Way::Mesh, 4.5, false, ""),
            s(Way::Mesh, 4.6, true, "web3"),
        ]);
        let f = r.failures_per_second(Way::Mesh);
        assert_eq!(f.len(), 10);
        assert_eq!(f[4], (4.5, 1.0));
        assert_eq!(f.iter().map(|p| p.1).sum::<f64>(), 1.0);
        assert_eq!(
            r.p99_per_second(Way::Mesh).len(),
            3,
            "only seconds with requests"
        );
        let phases = r.phases();
        assert_eq!(phases.len(), 3);
        assert_eq!(phases[1].0, "after web2 killed");
        let start = r.shares(Way::Mesh, phases[0].1, phases[0].2);
        let web1 = start["web1"];
        assert!((web1 - 200.0 / 3.0).abs() < 1e-9, "{web1}");
        assert_eq!(r.shares(Way::Mesh, phases[1].1, phases[1].2)["web3"], 100.0);
        assert_eq!(r.instances(), ["web1", "web2", "web3"]);
    }

    #[test]
    fn extra_tries_count_what_the_sidecar_said() {
        let tried = |way, at, tries| Sample {
            tries,
            ..s(way, at, true, "web1")
        };
        let r = run(vec![
            tried(Way::MeshHedging, 0.1, 1),
            tried(Way::MeshHedging, 0.2, 2),
            tried(Way::MeshHedging, 0.3, 3),
            tried(Way::Mesh, 0.4, 1),
            tried(Way::DnsOnce, 0.5, 0),
        ]);
        assert_eq!(
            r.extra_tries(Way::MeshHedging),
            Some(Extra { calls: 2, tries: 3 })
        );
        assert_eq!(r.extra_tries(Way::Mesh), Some(Extra { calls: 0, tries: 0 }));
        assert_eq!(r.extra_tries(Way::DnsOnce), None, "no sidecar said");
    }
}
