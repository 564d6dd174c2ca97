//! What wf-control knows of the mesh's health, read from its HTTP port:
//! `/v1/proxy-status` (every sidecar's versions and staleness, the CA, lapsed
//! leases) for `wfctl proxy-status` ([`proxy_status`]) and `wfctl check`
//! ([`check`]).

pub mod check;
pub mod proxy_status;

use std::net::SocketAddr;
pub use wayfinder_proto::view::{
    CaView as Ca, LapsedView as Lapsed, ProxyStatusView as ProxyStatus, SidecarView as Sidecar,
    UpstreamStatusView as Upstream,
};

use anyhow::{Context as _, Result, bail};
use serde::Deserialize;

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
