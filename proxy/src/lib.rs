//! Wayfinder's sidecar: listeners with protocol detection, HTTP and TCP
//! forwarding, balancers, discovery, registration and the admin server.

pub mod admin;
pub mod authz;
pub mod balance;
pub mod connector;
pub mod control_plane;
pub mod detect;
pub mod discovery;
pub mod edge;
pub mod header_match;
pub mod http;
pub mod identity;
pub mod lifecycle;
pub mod listener;
pub mod liveness;
pub mod memory;
pub mod metrics;
pub mod mirror;
pub mod opaque;
pub mod pool;
pub mod register;
pub mod replay;
pub mod resilience;
pub mod routes;
pub mod settings;
pub mod state;
pub mod tap;
pub mod telemetry;
pub mod traffic;
pub mod transparent;
pub mod upstream;
