//! Where endpoints come from. A source turns what it learns into
//! [`Update`]s; [`crate::upstream::Upstream::apply`] is the one place they
//! change the sidecar's view.

pub mod mesh;

use std::net::SocketAddr;

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
