//! Wayfinder's control-plane API (`wayfinder.v1`) and the TOML form of its
//! per-service policy, shared by the control plane, the sidecar and wfctl.

pub mod backoff;
#[cfg(feature = "dial")]
pub mod dial;
pub mod encoded;
pub mod latency;
pub mod mirror;
pub mod policy;
#[cfg(feature = "server")]
pub mod server;
#[cfg(feature = "spiffe")]
pub mod spiffe;
pub mod validate;
pub mod view;

/// Generated messages, clients and servers of `wayfinder.v1`.
#[allow(clippy::all, missing_docs)]
pub mod v1 {
    tonic::include_proto!("wayfinder.v1");
}

/// lab-app's gRPC echo service (`wayfinder.lab.v1`).
#[allow(clippy::all, missing_docs)]
pub mod lab {
    /// Version 1.
    pub mod v1 {
        tonic::include_proto!("wayfinder.lab.v1");
    }
}

/// The Discovery server generated a second time so that `Watch` streams
/// pre-encoded [`encoded::EncodedWatchEvent`]s instead of `WatchEvent`s.
#[allow(clippy::all, missing_docs)]
pub mod shared {
    include!(concat!(env!("OUT_DIR"), "/shared/wayfinder.v1.rs"));
}

/// SHA-256 over DER roots concatenated in order: how a watcher tells the
/// control plane which trust bundle it has.
pub fn bundle_sha256(roots: &[Vec<u8>]) -> Vec<u8> {
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    for r in roots {
        ctx.update(r);
    }
    ctx.finish().as_ref().to_vec()
}

/// Largest gRPC message either side accepts (4 MiB, tonic's default, stated
/// here so client and server agree).
pub const MAX_MESSAGE_BYTES: usize = 4 * 1024 * 1024;
