//! End-to-end tests of gRPC health checks (`grpc.health.v1.Health/Check`):
//! a sidecar's own check of its app (`--health-check grpc`), and a policy's
//! active checks (`[services.web.health_check] grpc = true`) of DNS and of
//! meshed endpoints. lab-app's gRPC health follows its `healthy` fault.

use std::net::{Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use anyhow::{Result, bail};
use wayfinder_tests::mesh::{
    admin_get, client, instance_with, served, wait_endpoints, wait_serving,
};
use wayfinder_tests::{
    ControlPlane, Process, Running, Scenario, apply_policy, bounded, http_request, metric, wfctl,
};

const ROUND_ROBIN: &str = "[services.web]\nbalancer = \"round-robin\"\n";

/// How long a health change may take to reach the callers' balancers: a
/// few check intervals (200 ms for sidecars, 100 ms for the policies
/// here) plus the control plane's push.
const NOTICED_WITHIN: Duration = Duration::from_secs(5);

async fn fault(app: SocketAddr, query: &str) -> Result<()> {
    let (status, _, body) = http_request(app, "POST", &format!("/fault{query}"), "lab", "").await?;
    anyhow::ensure!(status == 200, "fault {query}: {status} {body}");
    Ok(())
}

/// Sends `n` calls to `web` through the client sidecar; each must succeed.
async fn calls(web: SocketAddr, n: usize) -> Result<()> {
    for _ in 0..n {
        let (status, _, body) = http_request(web, "GET", "/", "web", "").await?;
        anyhow::ensure!(status == 200, "{status} {body}");
    }
    Ok(())
}

/// Each app's own count of calls served.
async fn served_by(apps: &[SocketAddr]) -> Result<Vec<u64>> {
    let mut out = Vec::new();
    for app in apps {
        out.push(served(*app).await?);
    }
    Ok(out)
}

/// Calls each app served between two [`served_by`] readings.
fn delta(before: &[u64], after: &[u64]) -> Vec<u64> {
    after.iter().zip(before).map(|(a, b)| a - b).collect()
}

/// `instance`'s health as the control plane lists it (`serving`,
/// `not_serving`, `unknown`), `None` while it is not registered.
fn listed_health(cp: &ControlPlane, instance: &str) -> Result<Option<String>> {
    let (ok, out, err) = wfctl(cp, &["-o", "json", "endpoints", "web"])?;
    anyhow::ensure!(ok, "wfctl endpoints: {err}");
    let v: serde_json::Value = serde_json::from_str(out.trim())?;
    Ok(v["endpoints"].as_array().and_then(|eps| {
        eps.iter()
            .find(|e| e["instance_id"] == instance)
            .and_then(|e| e["health"].as_str().map(str::to_string))
    }))
}

async fn metric_of(p: &Process, name: &str) -> Result<f64> {
    let (_, m) = admin_get(p, "/metrics").await?;
    Ok(metric(&m, name).unwrap_or(0.0))
}

#[tokio::test]
async fn an_instance_whose_grpc_health_says_not_serving_stops_getting_calls() -> Result<()> {
    bounded(async {
        let Running { cp, instances: lab } = Scenario::new()
            .policy(ROUND_ROBIN)
            .instances("web", 3)
            .health_check("grpc")
            .start()
            .await?;
        let apps: Vec<SocketAddr> = lab.iter().map(|i| i.app_addr).collect();
        let (client, web, _) = client(&cp, &[])?;
        let before = served_by(&apps).await?;
        calls(web, 30).await?;
        let after = served_by(&apps).await?;
        assert_eq!(
            delta(&before, &after),
            [10, 10, 10],
            "round robin over three"
        );

        // web-2's gRPC health turns NOT_SERVING: its sidecar's check sees
        // it, the control plane pushes it, the client stops calling it.
        let started = Instant::now();
        fault(apps[1], "?healthy=false").await?;
        wait_serving(&cp, "web", 2).await?;
        assert_eq!(listed_health(&cp, "web-2")?.as_deref(), Some("not_serving"));
        wait_endpoints(&client, "web-2 out", |e| {
            e.matches("\"healthy\":true").count() == 2
        })
        .await?;
        let took = started.elapsed();
        assert!(took < NOTICED_WITHIN, "noticed after {took:?}");
        let before = served_by(&apps).await?;
        calls(web, 30).await?;
        let after = served_by(&apps).await?;
        assert_eq!(
            delta(&before, &after),
            [15, 0, 15],
            "no calls to NOT_SERVING web-2"
        );

        // SERVING again: it takes its third again.
        fault(apps[1], "?healthy=true").await?;
        wait_serving(&cp, "web", 3).await?;
        wait_endpoints(&client, "web-2 back", |e| {
            e.matches("\"healthy\":true").count() == 3
        })
        .await?;
        let before = served_by(&apps).await?;
        calls(web, 30).await?;
        let after = served_by(&apps).await?;
        assert_eq!(delta(&before, &after), [10, 10, 10], "web-2 is back");
        Ok(())
    })
    .await
}

#[tokio::test]
async fn the_sidecars_grpc_check_asks_for_the_named_service() -> Result<()> {
    bounded(async {
        let Running {
            cp,
            instances: _none,
        } = Scenario::new().policy(ROUND_ROBIN).start().await?;
        // lab-app reports health for "wayfinder.lab.v1.Echo", not for a
        // service it does not have (NOT_FOUND): a TCP or HTTP check would
        // pass both.
        let echo = instance_with(&cp, "web", "web-1", "grpc:wayfinder.lab.v1.Echo", &[])?;
        let other = instance_with(&cp, "web", "web-2", "grpc:no.such.Service", &[])?;
        wait_serving(&cp, "web", 1).await?;
        let deadline = Instant::now() + NOTICED_WITHIN;
        while listed_health(&cp, "web-2")?.is_none() {
            if Instant::now() > deadline {
                bail!("web-2 never registered:\n{}", other.sidecar.log_text());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        // Registered with its first verdict, and it stays at it.
        tokio::time::sleep(Duration::from_millis(600)).await;
        assert_eq!(listed_health(&cp, "web-1")?.as_deref(), Some("serving"));
        assert_eq!(listed_health(&cp, "web-2")?.as_deref(), Some("not_serving"));

        // The named service's health follows the app's fault too.
        fault(echo.app_addr, "?healthy=false").await?;
        wait_serving(&cp, "web", 0).await?;
        fault(echo.app_addr, "?healthy=true").await?;
        wait_serving(&cp, "web", 1).await?;
        Ok(())
    })
    .await
}

#[tokio::test]
async fn a_policys_grpc_checks_take_a_not_serving_dns_endpoint_out() -> Result<()> {
    bounded(async {
        // Apps on 127.0.0.31-33, one port: what a DNS name resolves to.
        let port = std::net::TcpListener::bind("127.0.0.31:0")?.local_addr()?.port();
        let app = |i: u8| SocketAddr::from(([127, 0, 0, 30 + i], port));
        let mut procs = Vec::new();
        for i in 1..=3u8 {
            let listen = app(i).to_string();
            procs.push(Process::start(
                "lab-app",
                &["--listen", &listen, "--name", &format!("web-{i}")],
                "listening on",
            )?);
        }
        let apps: Vec<SocketAddr> = (1..=3).map(app).collect();
        let dns = wayfinder_tests::DnsServer::start("127.0.0.1:0".parse()?, 30).await?;
        dns.records
            .lock()
            .map_err(|_| anyhow::anyhow!("poisoned"))?
            .insert("web".into(), (1..=3).map(|i| Ipv4Addr::new(127, 0, 0, 30 + i)).collect());
        let cp = ControlPlane::start(&[])?;
        apply_policy(
            &cp,
            &format!(
                "{ROUND_ROBIN}[services.web.health_check]\ngrpc = true\ngrpc_service = \"wayfinder.lab.v1.Echo\"\ninterval = \"100ms\"\nunhealthy_threshold = 2\nhealthy_threshold = 2\n"
            ),
        )?;
        let (url, server) = (cp.url(), dns.addr.to_string());
        let upstream = format!("web:{port}=127.0.0.1:0");
        let client = Process::start(
            "wf-proxy",
            &["--control-plane", &url, "--admin", "127.0.0.1:0", "--discovery", "dns", "--dns-server", &server, "--dns-allow-local", "--upstream", &upstream],
            "wf-proxy listening",
        )?;
        let web = client.addr("upstreams=web=")?;
        calls(web, 3).await?;
        // Checked and found serving: nothing flipped.
        tokio::time::sleep(Duration::from_millis(500)).await;
        let (_, eps) = admin_get(&client, "/endpoints").await?;
        assert_eq!(eps.matches("\"checked_healthy\":true").count(), 3, "{eps}");

        let started = Instant::now();
        fault(apps[1], "?healthy=false").await?;
        wait_endpoints(&client, "web-2 checked unhealthy", |e| e.contains("\"checked_healthy\":false")).await?;
        let took = started.elapsed();
        assert!(took < NOTICED_WITHIN, "noticed after {took:?}");
        let before = served_by(&apps).await?;
        calls(web, 30).await?;
        let after = served_by(&apps).await?;
        assert_eq!(delta(&before, &after), [15, 0, 15], "no calls to NOT_SERVING web-2");
        let down = metric_of(&client, "wayfinder_proxy_health_transitions_total{upstream=\"web\",to=\"unhealthy\"}").await?;
        assert_eq!(down, 1.0);

        fault(apps[1], "?healthy=true").await?;
        wait_endpoints(&client, "web-2 healthy again", |e| !e.contains("\"checked_healthy\":false")).await?;
        let before = served_by(&apps).await?;
        calls(web, 30).await?;
        let after = served_by(&apps).await?;
        assert_eq!(delta(&before, &after), [10, 10, 10], "web-2 is back");
        drop(procs);
        Ok(())
    })
    .await
}

#[tokio::test]
async fn a_policys_grpc_checks_reach_meshed_apps_through_their_sidecars() -> Result<()> {
    bounded(async {
        // The sidecars check their apps by TCP only: the control plane
        // keeps every instance serving, and only the client's own gRPC
        // checks (through each instance's inbound, h2c) see web-2 fail.
        let Running { cp, instances: lab } = Scenario::new()
            .policy(&format!(
                "{ROUND_ROBIN}[services.web.health_check]\ngrpc = true\ninterval = \"100ms\"\nunhealthy_threshold = 2\nhealthy_threshold = 2\n"
            ))
            .instances("web", 3)
            .health_check("tcp")
            .start()
            .await?;
        let apps: Vec<SocketAddr> = lab.iter().map(|i| i.app_addr).collect();
        let (client, web, _) = client(&cp, &[])?;
        calls(web, 3).await?;

        fault(apps[1], "?healthy=false").await?;
        wait_endpoints(&client, "web-2 checked unhealthy", |e| e.contains("\"checked_healthy\":false")).await?;
        assert_eq!(listed_health(&cp, "web-2")?.as_deref(), Some("serving"), "the TCP check passes");
        let before = served_by(&apps).await?;
        calls(web, 30).await?;
        let after = served_by(&apps).await?;
        assert_eq!(delta(&before, &after), [15, 0, 15], "no calls to NOT_SERVING web-2");

        fault(apps[1], "?healthy=true").await?;
        wait_endpoints(&client, "web-2 healthy again", |e| !e.contains("\"checked_healthy\":false")).await?;
        let before = served_by(&apps).await?;
        calls(web, 30).await?;
        let after = served_by(&apps).await?;
        assert_eq!(delta(&before, &after), [10, 10, 10], "web-2 is back");
        Ok(())
    })
    .await
}
