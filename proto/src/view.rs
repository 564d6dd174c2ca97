//! Readable JSON views of API messages (enums as words, not numbers), shared
//! by wf-control's HTTP API and `wfctl --output json`.

use serde::Serialize;

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
