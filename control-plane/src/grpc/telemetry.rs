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
