//! `Telemetry.Report`: traffic reports from sidecars, validated and kept for
//! the dashboard, `wfctl split` and `wfctl mirror diff`; the sidecar status
//! each carries is kept for `wfctl proxy-status` ([`crate::sidecars`]).

use std::sync::Arc;

use tonic::{Request, Response, Status};
use wayfinder_proto::latency::BUCKETS;
use wayfinder_proto::v1::{
    MirrorDiff, ReportAck, SidecarStatus, TrafficReport, telemetry_server::Telemetry,
};

use super::auth::Guard;
use super::{check_size, invalid};
use crate::registry::Registry;
use crate::sidecars::Sidecars;
use crate::traffic::Traffic;

/// Most edges one report may carry.
pub const MAX_EDGES: usize = 1000;
/// Longest backend name (`version=v2,zone=a`) an edge may carry; a report
/// with a longer one is refused like any other invalid edge.
pub const MAX_BACKEND_LEN: usize = 512;
/// Most mirror entries one report may carry (a sidecar has one per mirrored
/// service and route).
pub const MAX_MIRRORS: usize = 1000;
/// Most upstreams a sidecar status may list (a sidecar's default
/// `--max-upstreams`; it sends at most this many).
pub const MAX_STATUS_UPSTREAMS: usize = 1000;

/// The Telemetry service.
pub struct TelemetryService {
    traffic: Arc<Traffic>,
    sidecars: Arc<Sidecars>,
    registry: Arc<Registry>,
    guard: Guard,
}

impl TelemetryService {
    /// A service feeding `traffic` and `sidecars` (whose versions it
    /// compares with `registry`'s) from callers `guard` lets through.
    pub fn new(
        traffic: Arc<Traffic>,
        sidecars: Arc<Sidecars>,
        registry: Arc<Registry>,
        guard: Guard,
    ) -> Self {
        Self {
            traffic,
            sidecars,
            registry,
            guard,
        }
    }
}

/// Refuses a report with an invalid service, node, edge or mirror entry.
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
    if r.mirrors.len() > MAX_MIRRORS {
        return Err(invalid(format!(
            "at most {MAX_MIRRORS} mirror entries per report"
        )));
    }
    for (i, m) in r.mirrors.iter().enumerate() {
        check_mirror(m).map_err(|e| invalid(format!("mirrors[{i}]{e}")))?;
    }
    if let Some(s) = &r.status {
        check_status(s).map_err(|e| invalid(format!("status{e}")))?;
    }
    Ok(())
}

/// What is wrong with a sidecar status, as `.field: why`.
fn check_status(s: &SidecarStatus) -> Result<(), String> {
    if s.upstreams.len() > MAX_STATUS_UPSTREAMS {
        return Err(format!(
            ".upstreams: at most {MAX_STATUS_UPSTREAMS} per report"
        ));
    }
    let mut seen = std::collections::HashSet::new();
    for (i, u) in s.upstreams.iter().enumerate() {
        wayfinder_proto::validate::service_name(&u.service)
            .map_err(|e| format!(".upstreams[{i}].service: {e}"))?;
        if !seen.insert(u.service.as_str()) {
            return Err(format!(".upstreams[{i}].service: listed twice"));
        }
        if !matches!(u.discovery.as_str(), "mesh" | "dns") {
            return Err(format!(".upstreams[{i}].discovery: mesh or dns"));
        }
    }
    Ok(())
}

/// What is wrong with one mirror entry, as `.field: why`.
fn check_mirror(m: &MirrorDiff) -> Result<(), String> {
    wayfinder_proto::validate::service_name(&m.service).map_err(|e| format!(".service: {e}"))?;
    if !m.route.is_empty() && wayfinder_proto::validate::service_name(&m.route).is_err() {
        return Err(".route: empty or a route name (a DNS label)".into());
    }
    if m.shadow.is_empty()
        || m.shadow.len() > MAX_BACKEND_LEN
        || m.shadow.chars().any(char::is_control)
    {
        return Err(format!(".shadow: 1 to {MAX_BACKEND_LEN} printable bytes"));
    }
    // A pair differs in status, or else maybe in body: never both.
    if m.status_differs.saturating_add(m.body_differs) > m.pairs {
        return Err(": more differing pairs (status + body) than pairs".into());
    }
    for (field, buckets) in [
        ("primary_latency_buckets", &m.primary_latency_buckets),
        ("shadow_latency_buckets", &m.shadow_latency_buckets),
    ] {
        if buckets.len() != BUCKETS {
            return Err(format!(
                ".{field}: exactly {BUCKETS} counts expected, got {}",
                buckets.len()
            ));
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
        if r.status.as_ref().is_some_and(|s| s.leaving) {
            self.sidecars.leave(&r.service, &r.node);
        } else if let Some(status) = r.status.take() {
            let now = (tokio::time::Instant::now(), crate::faults::unix_ms_now());
            self.sidecars
                .record(&r.service, &r.node, status, &*self.registry, now)
                .map_err(|e| Status::resource_exhausted(e.to_string()))?;
        }
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
            mirrors: Vec::new(),
            status: None,
        }
    }

    fn mirrored(route: &str, shadow: &str) -> TrafficReport {
        TrafficReport {
            mirrors: vec![MirrorDiff {
                service: "web".into(),
                route: route.into(),
                shadow: shadow.into(),
                pairs: 10,
                status_differs: 4,
                body_differs: 6,
                shed: 1,
                shadow_failed: 1,
                primary_latency_buckets: vec![0; BUCKETS],
                shadow_latency_buckets: vec![0; BUCKETS],
            }],
            ..report("")
        }
    }

    #[test]
    fn a_status_names_each_upstream_once_with_its_discovery() {
        use wayfinder_proto::v1::UpstreamStatus;
        let with = |names: &[&str], discovery: &str| TrafficReport {
            status: Some(SidecarStatus {
                cert_not_after_unix_ms: 1,
                leaving: false,
                upstreams: names
                    .iter()
                    .map(|n| UpstreamStatus {
                        service: n.to_string(),
                        discovery: discovery.into(),
                        ..Default::default()
                    })
                    .collect(),
            }),
            ..report("")
        };
        assert!(check(&with(&["web", "api"], "mesh")).is_ok());
        assert!(check(&with(&["web"], "dns")).is_ok());
        let refused = |r: TrafficReport| check(&r).expect_err("refused").message().to_string();
        assert!(refused(with(&["web"], "consul")).contains("status.upstreams[0].discovery"));
        assert!(refused(with(&["web", "web"], "mesh")).contains("listed twice"));
        assert!(refused(with(&["Web!"], "mesh")).contains("status.upstreams[0].service"));
        let many: Vec<String> = (0..=MAX_STATUS_UPSTREAMS)
            .map(|i| format!("s{i}"))
            .collect();
        let many: Vec<&str> = many.iter().map(String::as_str).collect();
        assert!(refused(with(&many, "mesh")).contains("at most"));
    }

    #[test]
    fn backends_are_short_printable_names() {
        assert!(check(&report("")).is_ok());
        assert!(check(&report("version=v2,zone=a")).is_ok());
        let e = check(&report(&"v".repeat(MAX_BACKEND_LEN + 1))).expect_err("too long");
        assert!(e.message().contains("edges[0].backend"), "{e}");
        assert!(check(&report("version=v2\u{1b}[2J")).is_err());
    }

    #[test]
    fn mirror_entries_name_a_service_route_and_shadow_and_carry_21_buckets_each() {
        assert!(check(&mirrored("default", "version=v2")).is_ok());
        assert!(check(&mirrored("", "web-shadow")).is_ok());
        let refused = |r: TrafficReport| check(&r).expect_err("refused").message().to_string();
        assert!(refused(mirrored("Not A Route", "v")).contains("mirrors[0].route"));
        assert!(refused(mirrored("default", "")).contains("mirrors[0].shadow"));
        assert!(refused(mirrored("default", "v2\u{1b}[2J")).contains("mirrors[0].shadow"));
        let mut r = mirrored("default", "version=v2");
        r.mirrors[0].service = "-".into();
        assert!(refused(r).contains("mirrors[0].service"));
        let mut r = mirrored("default", "version=v2");
        r.mirrors[0].body_differs = 7;
        assert!(refused(r).contains("more differing pairs"));
        let mut r = mirrored("default", "version=v2");
        r.mirrors[0].shadow_latency_buckets.pop();
        let e = refused(r);
        assert!(
            e.contains("mirrors[0].shadow_latency_buckets: exactly 21"),
            "{e}"
        );
        let mut r = mirrored("default", "version=v2");
        r.mirrors[0].primary_latency_buckets.push(1);
        assert!(refused(r).contains("primary_latency_buckets"));
        let mut r = mirrored("default", "version=v2");
        r.mirrors = vec![r.mirrors[0].clone(); MAX_MIRRORS + 1];
        assert!(refused(r).contains("at most"));
    }
}
