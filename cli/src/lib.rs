//! Library side of `wfctl`: the lab tooling (a DNS server that answers like
//! Docker's, the DNS-vs-balancer-vs-mesh comparison and its report) and
//! traffic management (splits, faults), the mesh's status (`proxy-status`,
//! `check`), shared with the end-to-end tests and benchmarks.

pub mod connect;
pub mod inject;
pub mod lab;
pub mod status;
pub mod traffic;
