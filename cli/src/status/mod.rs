//! What wf-control knows of the mesh's health, read from its HTTP port:
//! `/v1/proxy-status` (every sidecar's versions and staleness, the CA, lapsed
//! leases) for `wfctl proxy-status` ([`proxy_status`]) and `wfctl check`
//! ([`check`]).

pub mod check;
pub mod proxy_status;

use std::net::SocketAddr;

use anyhow::{Context as _, Result, bail};
use serde::{Deserialize, Serialize};

/// `/v1/proxy-status` of one replica.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
pub struct ProxyStatus {
    /// The replica's gRPC address (what its sidecars are connected to).
    pub replica: String,
    /// Whether its store answers (`/readyz`).
    pub ready: bool,
    /// How long a sidecar may trail the registry, in ms.
    pub max_trail_ms: u64,
    /// How long a sidecar may go without reporting, in ms.
    pub silent_after_ms: u64,
    /// Its CA.
    pub ca: Ca,
    /// Instances whose lease ran out.
    #[serde(default)]
    pub lapsed: Vec<Lapsed>,
    /// The sidecars reporting to it.
    pub sidecars: Vec<Sidecar>,
}

/// The CA a replica uses.
#[derive(Debug, Clone, Default, Deserialize, Serialize, PartialEq)]
pub struct Ca {
    /// Root expiry, Unix ms.
    pub root_not_after_unix_ms: Option<u64>,
    /// Intermediate expiry, Unix ms.
    pub intermediate_not_after_unix_ms: Option<u64>,
    /// SHA-256 (hex) of each root of the trust bundle it hands out.
    pub bundle_sha256: Vec<String>,
}

/// An instance whose sidecar stopped heartbeating.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
pub struct Lapsed {
    /// Service.
    pub service: String,
    /// Instance id.
    pub instance: String,
}

/// One sidecar.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
pub struct Sidecar {
    /// Its service.
    pub service: String,
    /// Its instance id.
    pub instance: String,
    /// Its last report, Unix ms.
    pub last_report_unix_ms: u64,
    /// How long before the answer that was, in ms.
    pub last_report_age_ms: u64,
    /// Its certificate's expiry, Unix ms.
    pub cert_not_after_unix_ms: Option<u64>,
    /// Trailing or silent.
    pub stale: bool,
    /// Why it is stale.
    pub why: Option<String>,
    /// Its upstreams.
    pub upstreams: Vec<Upstream>,
}

/// One upstream of a sidecar.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
pub struct Upstream {
    /// The service.
    pub service: String,
    /// `mesh` or `dns`.
    pub discovery: String,
    /// Endpoints the sidecar has for it.
    pub endpoints: u32,
    /// Version applied.
    pub version: u64,
    /// When, Unix ms.
    pub applied_unix_ms: u64,
    /// The registry's version.
    pub registry_version: Option<u64>,
    /// How long it has trailed, in ms.
    pub behind_ms: u64,
}

/// A service as `/v1/services` lists it (the fields `check` needs).
#[derive(Debug, Clone, Deserialize, PartialEq)]
pub struct ServiceSummary {
    /// Name.
    pub name: String,
    /// Instances serving.
    pub serving: u32,
}

/// Reads `path` from wf-control's HTTP port at `addr` as JSON.
async fn read_json<T: serde::de::DeserializeOwned>(addr: SocketAddr, path: &str) -> Result<T> {
    let (status, body) = crate::lab::http_get(addr, path).await.with_context(|| {
        format!("cannot reach wf-control's HTTP port at {addr} (--http or WAYFINDER_CONTROL_HTTP)")
    })?;
    if status == 404 {
        bail!("wf-control at {addr} has no {path}: is it older than wfctl?");
    }
    if status != 200 {
        bail!("http://{addr}{path} answered {status}: {}", body.trim());
    }
    serde_json::from_str(&body)
        .with_context(|| format!("http://{addr}{path}: not what wf-control serves"))
}

/// `/v1/proxy-status` of the replica at `addr`.
pub async fn read(addr: SocketAddr) -> Result<ProxyStatus> {
    read_json(addr, "/v1/proxy-status").await
}

/// `/v1/services` of the replica at `addr`.
pub async fn services(addr: SocketAddr) -> Result<Vec<ServiceSummary>> {
    #[derive(Deserialize)]
    struct All {
        services: Vec<ServiceSummary>,
    }
    Ok(read_json::<All>(addr, "/v1/services").await?.services)
}

/// `--http A,B`: each replica's HTTP address, resolved.
pub async fn http_addrs(given: &str) -> Result<Vec<SocketAddr>> {
    let mut out = Vec::new();
    for one in given.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        let hostport = one
            .strip_prefix("http://")
            .unwrap_or(one)
            .trim_end_matches('/');
        let addr = tokio::net::lookup_host(hostport)
            .await
            .ok()
            .and_then(|mut a| a.next())
            .with_context(|| {
                format!("--http {one:?}: give wf-control's HTTP address as HOST:PORT")
            })?;
        out.push(addr);
    }
    if out.is_empty() {
        bail!("--http is empty: give wf-control's HTTP address as HOST:PORT");
    }
    Ok(out)
}

/// A span for people: `950ms`, `12.3s`, `4m10s`, `23h59m`, `41d`.
pub fn span(ms: u64) -> String {
    let s = ms / 1000;
    match ms {
        0..1_000 => format!("{ms}ms"),
        1_000..60_000 => format!("{:.1}s", ms as f64 / 1000.0),
        60_000..3_600_000 => format!("{}m{}s", s / 60, s % 60),
        3_600_000..172_800_000 => format!("{}h{}m", s / 3600, s % 3600 / 60),
        _ => format!("{}d", s / 86_400),
    }
}

/// `text` safe for a terminal: control characters (a sidecar's instance
/// id is any printable-or-not string up to 253 bytes) are escaped.
pub fn printable(text: &str) -> String {
    text.chars()
        .map(|c| {
            if c.is_control() {
                c.escape_unicode().to_string()
            } else {
                c.to_string()
            }
        })
        .collect()
}

/// Now, Unix ms.
pub fn unix_ms_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spans_read_at_the_scale_they_are_at() {
        assert_eq!(span(950), "950ms");
        assert_eq!(span(12_345), "12.3s");
        assert_eq!(span(250_000), "4m10s");
        assert_eq!(span(86_340_000), "23h59m");
        assert_eq!(span(41 * 86_400_000), "41d");
    }
}
