//! Readable JSON views of API messages (enums as words, not numbers), shared
//! by wf-control's HTTP API and `wfctl --output json`.

use serde::{Deserialize, Serialize};

use crate::v1::{Endpoint, Health, Protocol};

/// Health as a word.
pub fn health_name(h: i32) -> &'static str {
    match Health::try_from(h) {
        Ok(Health::Serving) => "serving",
        Ok(Health::NotServing) => "not_serving",
        _ => "unknown",
    }
}

/// Protocol hint as a word.
pub fn protocol_name(p: i32) -> &'static str {
    match Protocol::try_from(p) {
        Ok(Protocol::Http1) => "http1",
        Ok(Protocol::Http2) => "http2",
        Ok(Protocol::Tcp) => "tcp",
        _ => "detect",
    }
}

/// One endpoint.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct EndpointView {
    /// Instance id.
    pub instance_id: String,
    /// IP address.
    pub address: String,
    /// Port.
    pub port: u32,
    /// Weight.
    pub weight: u32,
    /// Zone.
    pub zone: String,
    /// Protocol hint.
    pub protocol: &'static str,
    /// Fronted by a sidecar.
    pub meshed: bool,
    /// Health.
    pub health: &'static str,
    /// Version of its last change.
    pub version: u64,
}

impl From<&Endpoint> for EndpointView {
    fn from(e: &Endpoint) -> Self {
        let i = e.instance.clone().unwrap_or_default();
        Self {
            instance_id: i.instance_id,
            address: i.address,
            port: i.port,
            weight: i.weight,
            zone: i.zone,
            protocol: protocol_name(i.protocol),
            meshed: i.meshed,
            health: health_name(e.health),
            version: e.version,
        }
    }
}

/// One route's mirrored calls to one shadow, summed over every caller, as
/// wf-control's `/v1/mirror` serves it and `wfctl mirror diff` reads it.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(default)]
pub struct MirrorView {
    /// The service called (the primary).
    pub service: String,
    /// The route that took the calls; empty without routes.
    pub route: String,
    /// Where the copies went: a service or a subset (`version=v2`).
    pub shadow: String,
    /// Calls whose primary and shadow both answered.
    pub pairs: u64,
    /// Pairs whose statuses differed.
    pub status_differs: u64,
    /// Pairs with the same status whose bodies differed.
    pub body_differs: u64,
    /// Copies not sent (too many in flight, body too large).
    pub shed: u64,
    /// Copies that got no answer.
    pub shadow_failed: u64,
    /// Median time to the primary's whole answer, in ms, over the pairs.
    pub primary_p50_ms: Option<f64>,
    /// 99th percentile of the same.
    pub primary_p99_ms: Option<f64>,
    /// Median time to the shadow's whole answer, in ms, over the pairs.
    pub shadow_p50_ms: Option<f64>,
    /// 99th percentile of the same.
    pub shadow_p99_ms: Option<f64>,
}

/// `GET /v1/proxy-status` of one replica: its sidecars' versions and
/// staleness, its CA, lapsed leases; what `wfctl proxy-status` and `wfctl
/// check` read.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct ProxyStatusView {
    /// The replica's gRPC address (what its sidecars are connected to).
    pub replica: String,
    /// Whether its store answers (as `/readyz`).
    pub ready: bool,
    /// How long a sidecar may trail the registry, in ms.
    pub max_trail_ms: u64,
    /// How long a sidecar may go without reporting, in ms.
    pub silent_after_ms: u64,
    /// Its CA.
    #[serde(default)]
    pub ca: CaView,
    /// Instances whose sidecar stopped heartbeating (in their grace period).
    #[serde(default)]
    pub lapsed: Vec<LapsedView>,
    /// The sidecars reporting to it, by service and instance.
    #[serde(default)]
    pub sidecars: Vec<SidecarView>,
}

/// The CA a replica uses, as `wfctl check` judges it.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct CaView {
    /// Root expiry, Unix ms.
    pub root_not_after_unix_ms: Option<u64>,
    /// Intermediate (the issuer of workload certificates) expiry, Unix ms.
    pub intermediate_not_after_unix_ms: Option<u64>,
    /// SHA-256 (hex) of each root in the bundle the replica hands out.
    #[serde(default)]
    pub bundle_sha256: Vec<String>,
}

/// An instance whose lease ran out.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct LapsedView {
    /// Its service.
    pub service: String,
    /// Its instance id.
    pub instance: String,
}

/// One sidecar, as `/v1/proxy-status` shows it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct SidecarView {
    /// Its service.
    pub service: String,
    /// Its instance id.
    pub instance: String,
    /// Its last report, Unix ms.
    pub last_report_unix_ms: u64,
    /// How long before the answer that was, in ms.
    pub last_report_age_ms: u64,
    /// Its certificate's expiry, Unix ms (`None`: no identity).
    pub cert_not_after_unix_ms: Option<u64>,
    /// Trails the registry for too long, or silent for too long.
    pub stale: bool,
    /// Why it is stale, for people.
    pub why: Option<String>,
    /// Its upstreams, by name.
    #[serde(default)]
    pub upstreams: Vec<UpstreamStatusView>,
}

/// One upstream of a sidecar, as `/v1/proxy-status` shows it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct UpstreamStatusView {
    /// The service.
    pub service: String,
    /// `mesh` or `dns`.
    pub discovery: String,
    /// Endpoints the sidecar has from that source.
    pub endpoints: u32,
    /// The version it applied (0: none yet).
    pub version: u64,
    /// When it applied it, Unix ms (0: never).
    pub applied_unix_ms: u64,
    /// The registry's version of the service (`None`: the registry has none).
    pub registry_version: Option<u64>,
    /// How long it has trailed the registry, in ms (0: up to date).
    pub behind_ms: u64,
}
