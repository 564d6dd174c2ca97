//! Per-callee traffic counts for the control plane's dashboard: requests,
//! 5xx answers and a latency histogram per upstream, sent every
//! [`REPORT_EVERY`] as one `Telemetry.Report` and reset. Reports that
//! cannot be sent are dropped: the dashboard is a live view, not a ledger
//! (Prometheus metrics are the exact counts). Every report also carries the
//! sidecar's status (`wfctl proxy-status`), so one is sent every
//! [`REPORT_EVERY`] even without traffic: the control plane reads a
//! missing report as a stalled sidecar.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use tonic::transport::Channel;
use wayfinder_proto::latency::{self, BUCKETS};
use wayfinder_proto::mirror::Tally;
use wayfinder_proto::v1::{
    EdgeTraffic, MirrorDiff, SidecarStatus, TrafficReport, telemetry_client::TelemetryClient,
};

/// How often a sidecar reports.
pub const REPORT_EVERY: Duration = Duration::from_secs(2);
/// Most upstreams one status lists: wf-control refuses a report with more
/// (the default `--max-upstreams`).
pub const MAX_STATUS_UPSTREAMS: usize = 1000;
/// How long a leaving sidecar waits for the control plane to hear it.
pub const LEAVE_WITHIN: Duration = Duration::from_millis(500);

#[derive(Default)]
struct Edge {
    requests: u64,
    errors: u64,
    buckets: [u64; BUCKETS],
}

/// Traffic to each upstream since the last report, by callee and backend
/// (empty: all of the callee's).
#[derive(Default)]
pub struct Traffic {
    edges: RwLock<HashMap<(String, String), EdgeCounts>>,
    /// Mirrored calls by (service, route, shadow).
    mirrors: RwLock<HashMap<(String, String, String), MirrorCounts>>,
}

/// What one side of a mirrored call answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Answered {
    /// Status.
    pub status: u16,
    /// Hash of the whole body.
    pub body: u64,
    /// From the call's start to the end of its body.
    pub took: Duration,
}

/// The mirror counts of one (service, route, shadow), kept by whoever records them.
#[derive(Clone, Default)]
pub struct MirrorCounts(Arc<Mutex<Tally>>);

impl MirrorCounts {
    fn with(&self, f: impl FnOnce(&mut Tally)) {
        f(&mut self.0.lock().unwrap_or_else(|p| p.into_inner()));
    }
    /// A copy was not sent (over its limits).
    pub fn shed(&self) {
        self.with(|m| m.shed += 1);
    }
    /// A copy got no answer.
    pub fn shadow_failed(&self) {
        self.with(|m| m.shadow_failed += 1);
    }
    /// Both answered: compares them.
    pub fn pair(&self, primary: Answered, shadow: Answered) {
        self.with(|m| {
            m.pairs += 1;
            if primary.status != shadow.status {
                m.status_differs += 1;
            } else if primary.body != shadow.body {
                m.body_differs += 1;
            }
            m.primary[latency::bucket(primary.took)] += 1;
            m.shadow[latency::bucket(shadow.took)] += 1;
        });
    }
}

/// One upstream's counts. The upstream keeps this handle, so recording a
/// request is one uncontended lock, not a lookup by name.
#[derive(Clone, Default)]
pub struct EdgeCounts(Arc<Mutex<Edge>>);

impl EdgeCounts {
    /// Records one answered request.
    pub fn record(&self, status: u16, took: Duration) {
        let mut e = self.0.lock().unwrap_or_else(|p| p.into_inner());
        e.requests += 1;
        if status >= 500 {
            e.errors += 1;
        }
        e.buckets[latency::bucket(took)] += 1;
    }
}

impl Traffic {
    /// The counts of traffic to `callee`, created on first use.
    pub fn edge(&self, callee: &str) -> EdgeCounts {
        self.backend_edge(callee, "")
    }

    /// The counts of the traffic a route sent to `backend` of `callee`
    /// (callers keep the handle: this runs once per backend and rebuild).
    pub fn backend_edge(&self, callee: &str, backend: &str) -> EdgeCounts {
        self.edges
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .entry((callee.to_string(), backend.to_string()))
            .or_default()
            .clone()
    }

    /// The mirror counts of `service`'s calls taken by `route` and copied to `shadow`.
    pub fn mirror(&self, service: &str, route: &str, shadow: &str) -> MirrorCounts {
        let key = (service.to_string(), route.to_string(), shadow.to_string());
        if let Some(m) = self.mirrors.read().ok().and_then(|m| m.get(&key).cloned()) {
            return m;
        }
        self.mirrors
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .entry(key)
            .or_default()
            .clone()
    }

    /// Takes the mirror counts since the last call; entries without news are left out.
    pub fn take_mirrors(&self) -> Vec<MirrorDiff> {
        let mirrors = self.mirrors.read().map(|m| m.clone()).unwrap_or_default();
        let mut out: Vec<_> = mirrors
            .into_iter()
            .filter_map(|((service, route, shadow), counts)| {
                let m = std::mem::take(&mut *counts.0.lock().unwrap_or_else(|p| p.into_inner()));
                m.any().then(|| m.to_wire(service, route, shadow))
            })
            .collect();
        out.sort_by(|a, b| (&a.service, &a.route).cmp(&(&b.service, &b.route)));
        out
    }

    /// Drops the counts of an evicted upstream.
    pub fn forget(&self, callee: &str) {
        self.edges
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .retain(|(c, _), _| c != callee);
        self.mirrors
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .retain(|(c, _, _), _| c != callee);
    }

    /// Takes the counts since the last call; edges without traffic are left out.
    pub fn take(&self) -> Vec<EdgeTraffic> {
        let edges = self.edges.read().map(|m| m.clone()).unwrap_or_default();
        let mut out: Vec<_> = edges
            .into_iter()
            .filter_map(|((callee, backend), edge)| {
                let e = std::mem::take(&mut *edge.0.lock().unwrap_or_else(|p| p.into_inner()));
                (e.requests > 0).then(|| EdgeTraffic {
                    callee,
                    requests: e.requests,
                    errors: e.errors,
                    latency_buckets: e.buckets.to_vec(),
                    backend,
                })
            })
            .collect();
        out.sort_by(|a, b| (&a.callee, &a.backend).cmp(&(&b.callee, &b.backend)));
        out
    }
}

/// Who reports: the sidecar's instance and service, and where its status
/// comes from.
pub struct Reporter {
    /// The sidecar's instance id.
    pub node: String,
    /// Its service ("client" for a client-only sidecar).
    pub service: String,
    /// Its status at the time of each report.
    pub status: Box<dyn Fn() -> SidecarStatus + Send>,
}

/// Sends what `traffic` saw, and the sidecar's status, to the control plane
/// every [`REPORT_EVERY`].
pub async fn report_loop(traffic: Arc<Traffic>, channel: Channel, reporter: Reporter) {
    let mut client = TelemetryClient::new(channel);
    let mut tick = tokio::time::interval(REPORT_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let report = TrafficReport {
            node: reporter.node.clone(),
            service: reporter.service.clone(),
            edges: traffic.take(),
            mirrors: traffic.take_mirrors(),
            status: Some((reporter.status)()),
        };
        if let Err(status) = client.report(report).await {
            tracing::debug!(%status, "traffic report not sent");
        }
    }
}

/// Tells the control plane the sidecar is leaving (its report loop is
/// stopped), so it is forgotten rather than shown as stale; within
/// [`LEAVE_WITHIN`], or not at all (shutdown does not wait for a control
/// plane that is away).
pub async fn leave(channel: Channel, node: String, service: String) {
    let report = TrafficReport {
        node,
        service,
        edges: Vec::new(),
        mirrors: Vec::new(),
        status: Some(SidecarStatus {
            leaving: true,
            ..SidecarStatus::default()
        }),
    };
    let sent =
        tokio::time::timeout(LEAVE_WITHIN, TelemetryClient::new(channel).report(report)).await;
    if !matches!(sent, Ok(Ok(_))) {
        tracing::debug!("leaving report not sent");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_are_taken_once_and_reset() {
        let t = Traffic::default();
        t.edge("web").record(200, Duration::from_millis(1));
        t.edge("web").record(503, Duration::from_millis(3));
        t.edge("api").record(200, Duration::from_micros(100));
        let got = t.take();
        assert_eq!(got.len(), 2);
        assert_eq!(
            (got[1].callee.as_str(), got[1].requests, got[1].errors),
            ("web", 2, 1)
        );
        assert_eq!(got[1].latency_buckets.iter().sum::<u64>(), 2);
        assert_eq!(got[1].latency_buckets.len(), BUCKETS);
        assert!(t.take().is_empty(), "reset after taking");
    }

    #[test]
    fn mirrored_pairs_are_compared_and_taken_once() {
        let t = Traffic::default();
        let m = t.mirror("web", "", "version=v2");
        let ok = |body, ms| Answered {
            status: 200,
            body,
            took: Duration::from_millis(ms),
        };
        m.pair(ok(1, 2), ok(1, 500));
        m.pair(ok(1, 2), ok(2, 3));
        m.pair(
            ok(1, 2),
            Answered {
                status: 500,
                ..ok(1, 3)
            },
        );
        m.shed();
        let got = t.take_mirrors();
        assert_eq!(got.len(), 1);
        let d = &got[0];
        assert_eq!(
            (d.pairs, d.status_differs, d.body_differs, d.shed),
            (3, 1, 1, 1)
        );
        assert_eq!(d.shadow_latency_buckets.iter().sum::<u64>(), 3);
        assert!(
            latency::quantile(&d.shadow_latency_buckets, 0.99).unwrap_or(0.0)
                > latency::quantile(&d.primary_latency_buckets, 0.99).unwrap_or(0.0)
        );
        assert!(t.take_mirrors().is_empty(), "reset after taking");
    }
}
