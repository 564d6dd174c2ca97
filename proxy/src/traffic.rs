//! Per-callee traffic counts for the control plane's dashboard: requests,
//! 5xx answers and a latency histogram per upstream, sent every
//! [`REPORT_EVERY`] as one `Telemetry.Report` and reset. Reports that
//! cannot be sent are dropped: the dashboard is a live view, not a ledger
//! (Prometheus metrics are the exact counts).

use std::collections::HashMap;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use tonic::transport::Channel;
use wayfinder_proto::latency::{self, BUCKETS};
use wayfinder_proto::v1::{EdgeTraffic, TrafficReport, telemetry_client::TelemetryClient};

/// How often a sidecar reports.
pub const REPORT_EVERY: Duration = Duration::from_secs(2);

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

    /// Drops the counts of an evicted upstream.
    pub fn forget(&self, callee: &str) {
        self.edges
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .retain(|(c, _), _| c != callee);
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

/// Sends what `traffic` saw to the control plane every [`REPORT_EVERY`].
pub async fn report_loop(traffic: Arc<Traffic>, channel: Channel, node: String, service: String) {
    let mut client = TelemetryClient::new(channel);
    let mut tick = tokio::time::interval(REPORT_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let edges = traffic.take();
        if edges.is_empty() {
            continue;
        }
        let report = TrafficReport {
            node: node.clone(),
            service: service.clone(),
            edges,
        };
        if let Err(status) = client.report(report).await {
            tracing::debug!(%status, "traffic report not sent");
        }
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
}
