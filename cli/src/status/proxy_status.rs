//! `wfctl proxy-status`: every sidecar with its service, instance, the
//! replica it reports to, its upstreams with the version each applied and
//! how long it has trailed the registry, its certificate's expiry and last
//! report, and STALE when it trails for more than 5 s or has been silent
//! for 10 s (wf-control judges; see `control-plane/src/sidecars.rs`).

use std::net::SocketAddr;

use anyhow::Result;
use comfy_table::{Table, presets::UTF8_BORDERS_ONLY};

use super::{ProxyStatus, Sidecar, Upstream, printable, span};

/// Reads every replica at `addrs`; the first that cannot be read fails the command.
pub async fn read_all(addrs: &[SocketAddr]) -> Result<Vec<ProxyStatus>> {
    let mut out = Vec::new();
    for a in addrs {
        out.push(super::read(*a).await?);
    }
    Ok(out)
}

/// One upstream as a cell line: `web v42`, or with how far it trails.
fn upstream_text(u: &Upstream) -> String {
    let mut text = format!(
        "{} v{} ({}, {} endpoints)",
        u.service, u.version, u.discovery, u.endpoints
    );
    if u.behind_ms > 0 {
        let reg = u.registry_version.map_or("?".into(), |v| v.to_string());
        text.push_str(&format!(": registry v{reg}, {} behind", span(u.behind_ms)));
    }
    text
}

/// When a certificate expires, from `now`.
fn cert_text(not_after: Option<u64>, now_unix_ms: u64) -> String {
    match not_after {
        None => "-".into(),
        Some(t) if t <= now_unix_ms => format!("EXPIRED {} ago", span(now_unix_ms - t)),
        Some(t) => format!("in {}", span(t - now_unix_ms)),
    }
}

fn row(replica: &str, s: &Sidecar, now_unix_ms: u64) -> Vec<String> {
    let upstreams = if s.upstreams.is_empty() {
        "-".to_string()
    } else {
        s.upstreams
            .iter()
            .map(upstream_text)
            .collect::<Vec<_>>()
            .join("\n")
    };
    let state = match (&s.why, s.stale) {
        (Some(why), true) => format!("STALE: {why}"),
        (None, true) => "STALE".into(),
        _ => "ok".into(),
    };
    [
        s.service.as_str(),
        s.instance.as_str(),
        replica,
        upstreams.as_str(),
        cert_text(s.cert_not_after_unix_ms, now_unix_ms).as_str(),
        format!("{} ago", span(s.last_report_age_ms)).as_str(),
        state.as_str(),
    ]
    .into_iter()
    .map(printable)
    .collect()
}

/// The table for people: one row per sidecar of every replica read.
pub fn table(replicas: &[ProxyStatus], now_unix_ms: u64) -> String {
    let mut t = Table::new();
    t.load_preset(UTF8_BORDERS_ONLY).set_header(vec![
        "SERVICE",
        "INSTANCE",
        "REPLICA",
        "UPSTREAMS (VERSION APPLIED)",
        "CERTIFICATE EXPIRES",
        "LAST REPORT",
        "STATUS",
    ]);
    let mut any = false;
    for r in replicas {
        for s in &r.sidecars {
            t.add_row(row(&r.replica, s, now_unix_ms));
            any = true;
        }
    }
    if !any {
        return "no sidecar reports to this control plane\n".into();
    }
    format!("{t}\n")
}

/// The JSON for scripts: every replica's sidecars, each with its replica.
pub fn json(replicas: &[ProxyStatus]) -> serde_json::Value {
    let sidecars: Vec<_> = replicas
        .iter()
        .flat_map(|r| {
            r.sidecars.iter().map(|s| {
                let mut v = serde_json::to_value(s).unwrap_or_default();
                v["replica"] = r.replica.clone().into();
                v
            })
        })
        .collect();
    serde_json::json!({ "sidecars": sidecars })
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::status::Ca;

    pub(crate) fn sidecar(instance: &str, why: Option<&str>) -> Sidecar {
        Sidecar {
            service: "web".into(),
            instance: instance.into(),
            last_report_unix_ms: 1,
            last_report_age_ms: 1_200,
            cert_not_after_unix_ms: Some(1_000 + 86_340_000),
            stale: why.is_some(),
            why: why.map(String::from),
            upstreams: vec![Upstream {
                service: "api".into(),
                discovery: "mesh".into(),
                endpoints: 2,
                version: 41,
                applied_unix_ms: 1,
                registry_version: Some(42),
                behind_ms: if why.is_some() { 6_000 } else { 0 },
            }],
        }
    }

    pub(crate) fn replica(sidecars: Vec<Sidecar>) -> ProxyStatus {
        ProxyStatus {
            replica: "127.0.0.1:15010".into(),
            ready: true,
            max_trail_ms: 5_000,
            silent_after_ms: 10_000,
            ca: Ca::default(),
            lapsed: Vec::new(),
            sidecars,
        }
    }

    #[test]
    fn the_table_shows_versions_expiry_and_why_a_sidecar_is_stale() {
        let text = table(
            &[replica(vec![
                sidecar("web-1", None),
                sidecar("web-2\u{1b}[2J", Some("api 6.0s behind the registry")),
            ])],
            1_000,
        );
        assert!(text.contains("api v41 (mesh, 2 endpoints)"), "{text}");
        assert!(text.contains("registry v42, 6.0s behind"), "{text}");
        assert!(text.contains("in 23h59m"), "{text}");
        assert!(text.contains("1.2s ago"), "{text}");
        assert!(
            text.contains("STALE: api 6.0s behind the registry"),
            "{text}"
        );
        assert!(!text.contains('\u{1b}'), "escapes never reach the terminal");
        assert_eq!(
            table(&[replica(Vec::new())], 0),
            "no sidecar reports to this control plane\n"
        );
        assert_eq!(cert_text(Some(1_000), 61_000), "EXPIRED 1m0s ago");
    }

    #[test]
    fn the_json_lists_every_replica_s_sidecars_with_their_replica() {
        let mut other = replica(vec![sidecar("web-2", None)]);
        other.replica = "127.0.0.1:25010".into();
        let v = json(&[replica(vec![sidecar("web-1", None)]), other]);
        assert_eq!(v["sidecars"][0]["instance"], "web-1");
        assert_eq!(v["sidecars"][1]["replica"], "127.0.0.1:25010");
        assert_eq!(v["sidecars"][1]["stale"], false);
    }
}
