//! `Telemetry.Report`: traffic reports from sidecars, validated and kept for
//! the dashboard.

use std::sync::Arc;

use tonic::{Request, Response, Status};
use wayfinder_proto::latency::BUCKETS;
use wayfinder_proto::v1::{ReportAck, TrafficReport, telemetry_server::Telemetry};

use super::auth::Guard;
use super::{check_size, invalid};
use crate::traffic::Traffic;

/// Most edges one report may carry.
pub const MAX_EDGES: usize = 1000;
/// Longest backend name (`version=v2,zone=a`) an edge may carry; a report
/// with a longer one is refused like any other invalid edge.
pub const MAX_BACKEND_LEN: usize = 512;

/// The Telemetry service.
pub struct TelemetryService {
    traffic: Arc<Traffic>,
    guard: Guard,
}

impl TelemetryService {
    /// A service feeding `traffic` from callers `guard` lets through.
    pub fn new(traffic: Arc<Traffic>, guard: Guard) -> Self {
        Self { traffic, guard }
    }
}

/// Refuses a report with an invalid service, node or edge.
pub fn check(r: &TrafficReport) -> Result<(), Status> {
    wayfinder_proto::validate::service_name(&r.service)
        .map_err(|e| invalid(format!("service: {e}")))?;
    if r.node.is_empty() || r.node.len() > 253 {
        return Err(invalid("node: 1 to 253 characters"));
    }
    if r.edges.len() > MAX_EDGES {
        return Err(invalid(format!("at most {MAX_EDGES} edges per report")));
    }
    for (i, e) in r.edges.iter().enumerate() {
        wayfinder_proto::validate::service_name(&e.callee)
            .map_err(|err| invalid(format!("edges[{i}].callee: {err}")))?;
        if e.backend.len() > MAX_BACKEND_LEN || e.backend.chars().any(char::is_control) {
            return Err(invalid(format!(
                "edges[{i}].backend: at most {MAX_BACKEND_LEN} printable bytes"
            )));
        }
        if e.errors > e.requests {
            return Err(invalid(format!("edges[{i}]: more errors than requests")));
        }
        if e.latency_buckets.len() != BUCKETS {
            return Err(invalid(format!(
                "edges[{i}].latency_buckets: exactly {BUCKETS} counts expected, got {}",
                e.latency_buckets.len()
            )));
        }
    }
    Ok(())
}

#[tonic::async_trait]
impl Telemetry for TelemetryService {
    async fn report(&self, req: Request<TrafficReport>) -> Result<Response<ReportAck>, Status> {
        let own = self.guard.member(&req, "Report")?;
        let mut r = req.into_inner();
        check_size(&r)?;
        check(&r)?;
        // A sidecar reports as the service in its certificate, whatever
        // the report says.
        if let Some(own) = own {
            r.service = own;
        }
        self.traffic.record(&r);
        Ok(Response::new(ReportAck {}))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use wayfinder_proto::v1::EdgeTraffic;

    fn report(backend: &str) -> TrafficReport {
        TrafficReport {
            node: "client-1".into(),
            service: "client".into(),
            edges: vec![EdgeTraffic {
                callee: "web".into(),
                requests: 1,
                errors: 0,
                latency_buckets: vec![0; BUCKETS],
                backend: backend.into(),
            }],
        }
    }

    #[test]
    fn backends_are_short_printable_names() {
        assert!(check(&report("")).is_ok());
        assert!(check(&report("version=v2,zone=a")).is_ok());
        let e = check(&report(&"v".repeat(MAX_BACKEND_LEN + 1))).expect_err("too long");
        assert!(e.message().contains("edges[0].backend"), "{e}");
        assert!(check(&report("version=v2\u{1b}[2J")).is_err());
    }
}
