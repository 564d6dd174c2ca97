//! A loopback lab for end-to-end tests: lab-apps with their sidecars
//! registered with a real control plane, and client-only sidecars.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::{Result, bail};

use crate::{ControlPlane, Process, wfctl};

/// One lab instance: a lab-app and its sidecar.
pub struct Instance {
    /// The app.
    pub app: Process,
    /// Where the app listens.
    pub app_addr: SocketAddr,
    /// Its sidecar.
    pub sidecar: Process,
}

/// Starts a lab-app on a free loopback port.
pub fn lab_app(name: &str) -> Result<(Process, SocketAddr)> {
    let p = Process::start(
        "lab-app",
        &["--listen", "127.0.0.1:0", "--name", name],
        "listening on",
    )?;
    let addr = p.addr("on ")?;
    Ok((p, addr))
}

/// Starts a sidecar for `app` as instance `name` of `service`.
pub fn sidecar(
    cp: &ControlPlane,
    service: &str,
    name: &str,
    app: SocketAddr,
    check: &str,
) -> Result<Process> {
    sidecar_with(cp, service, name, app, check, &[])
}

/// [`sidecar`] with more flags.
pub fn sidecar_with(
    cp: &ControlPlane,
    service: &str,
    name: &str,
    app: SocketAddr,
    check: &str,
    extra: &[&str],
) -> Result<Process> {
    sidecar_at(&cp.url(), service, name, app, check, extra)
}

/// [`sidecar_with`] for the control plane at `url` (replicas: a comma-separated list).
pub fn sidecar_at(
    url: &str,
    service: &str,
    name: &str,
    app: SocketAddr,
    check: &str,
    extra: &[&str],
) -> Result<Process> {
    let app = app.to_string();
    let mut args = vec![
        "--control-plane",
        url,
        "--service",
        service,
        "--instance",
        name,
        "--app",
        &app,
        "--inbound",
        "127.0.0.1:0",
        "--admin",
        "127.0.0.1:0",
        "--health-check",
        check,
        "--health-interval",
        "200ms",
        "--drain-timeout",
        "2s",
        // Callers on loopback learn of a departure in milliseconds.
        "--lame-duck",
        "300ms",
    ];
    args.extend_from_slice(extra);
    Process::start("wf-proxy", &args, "wf-proxy listening")
}

/// A `web` instance: lab-app plus sidecar checking `/healthz`.
pub fn instance(cp: &ControlPlane, name: &str) -> Result<Instance> {
    instance_with(cp, "web", name, "/healthz", &[])
}

/// An instance `name` of `service`: lab-app plus a sidecar with `check`
/// and `extra` flags.
pub fn instance_with(
    cp: &ControlPlane,
    service: &str,
    name: &str,
    check: &str,
    extra: &[&str],
) -> Result<Instance> {
    let (app, app_addr) = lab_app(name)?;
    let sidecar = sidecar_with(cp, service, name, app_addr, check, extra)?;
    Ok(Instance {
        app,
        app_addr,
        sidecar,
    })
}

/// A client-only sidecar with an explicit `web` listener and a Host-routed one.
pub fn client(cp: &ControlPlane, extra: &[&str]) -> Result<(Process, SocketAddr, SocketAddr)> {
    client_at(&cp.url(), extra)
}

/// [`client`] for the control plane at `url` (replicas: a comma-separated list).
pub fn client_at(url: &str, extra: &[&str]) -> Result<(Process, SocketAddr, SocketAddr)> {
    let mut args = vec![
        "--control-plane",
        url,
        "--admin",
        "127.0.0.1:0",
        "--outbound",
        "127.0.0.1:0",
        "--upstream",
        "web=127.0.0.1:0",
    ];
    args.extend_from_slice(extra);
    let p = Process::start("wf-proxy", &args, "wf-proxy listening")?;
    let web = p.addr("upstreams=web=")?;
    let outbound = p.addr("outbound=")?;
    Ok((p, web, outbound))
}

/// Waits until the control plane lists `want` serving instances of `service`.
pub async fn wait_serving(cp: &ControlPlane, service: &str, want: usize) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (ok, out, _) = wfctl(cp, &["-o", "json", "endpoints", service])?;
        if ok {
            let v: serde_json::Value = serde_json::from_str(out.trim())?;
            let serving = v["endpoints"]
                .as_array()
                .map_or(0, |a| a.iter().filter(|e| e["health"] == "serving").count());
            if serving == want {
                return Ok(());
            }
        }
        if Instant::now() > deadline {
            bail!("{service} did not reach {want} serving instances: {out}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The `instance` field of a lab-app answer.
pub fn instance_of(body: &str) -> String {
    body.split("\"instance\":\"")
        .nth(1)
        .and_then(|r| r.split('"').next())
        .unwrap_or("?")
        .to_string()
}

/// GET on a sidecar's admin listener.
pub async fn admin_get(p: &Process, path: &str) -> Result<(u16, String)> {
    crate::http_get(p.addr("admin=")?, path).await
}

/// Requests the lab-app at `app` has served (its own count, `GET /fault`).
pub async fn served(app: SocketAddr) -> Result<u64> {
    let (_, _, body) = crate::http_request(app, "GET", "/fault", "lab", "").await?;
    let json = body
        .find('{')
        .and_then(|s| body.rfind('}').map(|e| &body[s..=e]))
        .ok_or_else(|| anyhow::anyhow!("no JSON in {body:?}"))?;
    let v: serde_json::Value = serde_json::from_str(json)?;
    v["served"]
        .as_u64()
        .ok_or_else(|| anyhow::anyhow!("no served count in {json}"))
}

/// Waits until `pred` holds of sidecar `p`'s `/endpoints` (its upstreams'
/// endpoints with their labels and health, the policy in force, the routes).
pub async fn wait_endpoints(p: &Process, what: &str, pred: impl Fn(&str) -> bool) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (_, eps) = admin_get(p, "/endpoints").await?;
        if pred(&eps) {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("timed out waiting for {what}: {eps}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
