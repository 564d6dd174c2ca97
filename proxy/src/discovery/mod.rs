//! Where endpoints come from. A source turns what it learns into
//! [`Update`]s and hands them to a [`Sink`]; the upstream is the sink, and
//! its `apply` the one place they change the sidecar's view. Sources know
//! nothing of balancers (as pingora's `ServiceDiscovery`).

pub mod dns;
pub mod mesh;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;

use tonic::transport::Channel;

use wayfinder_proto::v1::ServicePolicy;

use crate::settings::Origin;

/// What discovery feeds: one service's view of its endpoints and policy.
pub trait Sink: Send + Sync + 'static {
    /// The service discovered.
    fn name(&self) -> &str;
    /// A change to the endpoints `origin` knows.
    fn apply(&self, origin: Origin, update: Update);
    /// The service's policy as the control plane last sent it.
    fn set_policy(&self, policy: Option<ServicePolicy>);
    /// The control plane's event at `version` has been applied (what
    /// `wfctl proxy-status` compares with the registry's version).
    fn applied(&self, version: u64) {
        let _ = version;
    }
    /// Completes once the service's endpoints come from `origin`.
    fn wait_origin(&self, origin: Origin) -> impl std::future::Future<Output = ()> + Send;
    /// Completes once the service is no longer wanted (evicted): its
    /// sources stop, and the control plane's watch closes.
    fn closed(&self) -> impl std::future::Future<Output = ()> + Send;
}

/// Runs `source` for `sink` until it ends or the sink is closed.
pub async fn until_closed(sink: Arc<impl Sink>, source: impl std::future::Future<Output = ()>) {
    tokio::select! {
        () = sink.closed() => {}
        () = source => {}
    }
}

/// Where and how upstreams find their endpoints.
pub struct Sources {
    /// The control plane (endpoints in mesh mode, and every service's policy).
    pub control_plane: Channel,
    /// This sidecar's name in watch requests.
    pub node: String,
    /// The DNS resolver (built when a service first needs it).
    pub dns: Arc<wayfinder_proto::dial::LazyResolver>,
    /// Whether DNS answers may name loopback and link-local addresses.
    pub dns_allow_local: bool,
    /// Source used unless a service's policy names another.
    pub default_origin: Origin,
    /// Port of DNS-discovered endpoints per service (`--upstream NAME:PORT=...`).
    pub dns_ports: HashMap<String, u16>,
    /// Port of DNS-discovered endpoints otherwise.
    pub default_dns_port: u16,
    /// The workload identity, whose trust roots snapshots update.
    pub identity: Option<Arc<crate::identity::Identity>>,
}

impl Sources {
    /// Starts discovery for a new upstream: the control-plane watch (it
    /// carries the policy) and DNS, which idles until the upstream's
    /// endpoints come from DNS.
    pub fn start(&self, up: &Arc<impl Sink>) {
        tokio::spawn(until_closed(
            up.clone(),
            mesh::run(
                self.control_plane.clone(),
                up.clone(),
                self.node.clone(),
                self.identity.clone(),
            ),
        ));
        let port = self
            .dns_ports
            .get(up.name())
            .copied()
            .unwrap_or(self.default_dns_port);
        tokio::spawn(until_closed(
            up.clone(),
            dns::run(self.dns.clone(), up.clone(), port, self.dns_allow_local),
        ));
    }
}

/// One endpoint as discovered.
#[derive(Debug, Clone, PartialEq)]
pub struct Discovered {
    /// Stable id.
    pub id: String,
    /// Address to dial.
    pub addr: SocketAddr,
    /// Weight (1-10000).
    pub weight: u32,
    /// Fronted by a sidecar.
    pub meshed: bool,
    /// False when the control plane reports it not serving.
    pub healthy: bool,
    /// The instance's labels (routes' subsets select on them); none from DNS.
    pub labels: HashMap<String, String>,
    /// The instance's zone (`wf-proxy --zone`); empty when unknown (DNS).
    pub zone: String,
}

/// A change to a service's endpoints.
#[derive(Debug, Clone, PartialEq)]
pub enum Update {
    /// Replace everything.
    Reset(Vec<Discovered>),
    /// Add or replace these.
    Add(Vec<Discovered>),
    /// Remove these ids.
    Remove(Vec<String>),
    /// The service has no endpoints (or does not exist).
    NoEndpoints,
}
