//! Mesh discovery: the control plane's `Discovery.Watch`, one stream per
//! upstream over a shared HTTP/2 connection. When the control plane is away
//! the sidecar keeps its last-known endpoints, reconnects with jittered
//! exponential backoff and resumes from the last version it applied.

use std::net::SocketAddr;
use std::sync::Arc;

use futures::StreamExt;
use tonic::transport::Channel;
use wayfinder_proto::v1::{
    Endpoint, Health, ServiceWatch, WatchRequest, discovery_client::DiscoveryClient,
    watch_event::Kind,
};

use wayfinder_proto::backoff::backoff;

use super::{Discovered, Origin, Sink, Update};

fn discovered(e: &Endpoint) -> Option<Discovered> {
    let i = e.instance.as_ref()?;
    let ip: std::net::IpAddr = i.address.parse().ok()?;
    let port = u16::try_from(i.port).ok()?;
    Some(Discovered {
        id: i.instance_id.clone(),
        addr: SocketAddr::new(ip, port),
        weight: i.weight.max(1),
        meshed: i.meshed,
        healthy: e.health != Health::NotServing as i32,
        labels: i.labels.clone(),
        zone: i.zone.clone(),
    })
}

/// Watches `upstream`'s service forever.
pub async fn run(
    channel: Channel,
    upstream: Arc<impl Sink>,
    node: String,
    identity: Option<Arc<crate::identity::Identity>>,
) {
    let mut last_version = 0u64;
    let mut attempt = 0u32;
    loop {
        let req = WatchRequest {
            services: vec![ServiceWatch {
                name: upstream.name().to_string(),
                last_version,
            }],
            node: node.clone(),
            trust_bundle_sha256: identity
                .as_ref()
                .map(|i| i.bundle_sha256())
                .unwrap_or_default(),
        };
        match DiscoveryClient::new(channel.clone()).watch(req).await {
            Ok(resp) => {
                let mut stream = resp.into_inner();
                while let Some(item) = stream.next().await {
                    let event = match item {
                        Ok(e) => e,
                        Err(status) => {
                            tracing::warn!(service = upstream.name(), %status, "watch interrupted");
                            break;
                        }
                    };
                    attempt = 0;
                    match event.kind {
                        Some(Kind::Snapshot(s)) => {
                            // Policy first: requests woken by the first
                            // endpoints must already see it.
                            upstream.set_policy(s.policy);
                            if let Some(id) = &identity {
                                id.set_roots(&s.trust_bundle);
                            }
                            let eps: Vec<_> = s.endpoints.iter().filter_map(discovered).collect();
                            upstream.apply(
                                Origin::Mesh,
                                if eps.is_empty() {
                                    Update::NoEndpoints
                                } else {
                                    Update::Reset(eps)
                                },
                            );
                        }
                        Some(Kind::Delta(d)) => {
                            if d.prev_version != last_version {
                                // Should not happen; resync rather than guess.
                                tracing::warn!(
                                    service = upstream.name(),
                                    "watch gap; asking for a snapshot"
                                );
                                last_version = 0;
                                break;
                            }
                            let upserts: Vec<_> = d
                                .added
                                .iter()
                                .chain(&d.changed)
                                .filter_map(discovered)
                                .collect();
                            if !upserts.is_empty() {
                                upstream.apply(Origin::Mesh, Update::Add(upserts));
                            }
                            if !d.removed.is_empty() {
                                upstream.apply(Origin::Mesh, Update::Remove(d.removed));
                            }
                            if d.policy.is_some() {
                                upstream.set_policy(d.policy);
                            } else if d.policy_removed {
                                upstream.set_policy(None);
                            }
                        }
                        None => {}
                    }
                    last_version = event.version;
                    upstream.applied(last_version);
                }
            }
            Err(status) => {
                tracing::warn!(service = upstream.name(), %status, "cannot watch; keeping last-known endpoints");
            }
        }
        tokio::time::sleep(backoff(attempt)).await;
        attempt = attempt.saturating_add(1);
    }
}
