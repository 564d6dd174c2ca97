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
