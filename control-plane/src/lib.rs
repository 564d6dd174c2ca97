//! Wayfinder's control plane: the registry with its leases, the discovery
//! push, per-service policy, durable state, and the gRPC and HTTP servers.

pub mod ca;
pub mod faults;
pub mod grpc;
pub mod http;
pub mod policy_file;
pub mod registry;
pub mod sidecars;
pub mod store;
pub mod tap;
pub mod traffic;
