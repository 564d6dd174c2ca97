//! Wayfinder's sidecar: listeners with protocol detection, HTTP and TCP
//! forwarding, balancers, discovery, registration and the admin server.

pub mod admin;
pub mod balance;
pub mod detect;
pub mod discovery;
pub mod http_proxy;
pub mod listener;
pub mod metrics;
pub mod register;
pub mod upstream;
