//! `GET /v1/proxy-status`: every sidecar reporting to this replica with its
//! upstreams' versions against the registry's and whether it is STALE
//! ([`crate::sidecars`]), and what `wfctl check` asks of the replica itself:
//! readiness, its CA's expiry, the trust bundle it hands out, the instances
//! whose lease ran out.

use std::sync::Arc;

use axum::Json;
use axum::extract::State;

use super::HttpState;
use crate::ca::Ca;
use crate::sidecars::{MAX_TRAIL, SILENT_AFTER, Sidecars};
use wayfinder_proto::view::{CaView, LapsedView, ProxyStatusView as ProxyStatus};

/// What `/v1/proxy-status` reads besides the registry.
#[derive(Clone)]
pub struct StatusState {
    /// The sidecars' last status.
    pub sidecars: Arc<Sidecars>,
    /// The mesh CA.
    pub ca: Arc<Ca>,
    /// This replica's gRPC address, the one its sidecars are connected to.
    pub replica: String,
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The answer as of now.
pub fn proxy_status(s: &HttpState) -> ProxyStatus {
    let (root, intermediate) = s.status.ca.not_after_unix_ms();
    ProxyStatus {
        replica: s.status.replica.clone(),
        ready: s.backend.ready(),
        max_trail_ms: MAX_TRAIL.as_millis() as u64,
        silent_after_ms: SILENT_AFTER.as_millis() as u64,
        ca: CaView {
            root_not_after_unix_ms: root,
            intermediate_not_after_unix_ms: intermediate,
            bundle_sha256: s
                .registry
                .trust_bundle()
                .iter()
                .map(|der| hex(ring::digest::digest(&ring::digest::SHA256, der).as_ref()))
                .collect(),
        },
        lapsed: s
            .registry
            .lapsed()
            .into_iter()
            .map(|(service, instance)| LapsedView { service, instance })
            .collect(),
        sidecars: s
            .status
            .sidecars
            .view(&*s.registry, tokio::time::Instant::now()),
    }
}

/// `GET /v1/proxy-status`.
pub async fn handler(State(s): State<HttpState>) -> Json<ProxyStatus> {
    Json(proxy_status(&s))
}
