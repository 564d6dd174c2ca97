//! Locality and slow start, end to end on loopback: sidecars with `--zone`
//! keep a prefer-local service's traffic in their zone until its instances
//! die, then move it to the other zone without a failed request; an
//! instance that comes back takes a share ramping up over `slow_start`.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use wayfinder_tests::load::{self, Report, Spec};
use wayfinder_tests::mesh::{
    self, Instance, admin_get, instance_with, wait_endpoints, wait_serving,
};
use wayfinder_tests::scenario::{Running, Scenario, apply_policy};
use wayfinder_tests::{ControlPlane, Process, bounded};

/// Prefer-local, and retries that take a try off a dead instance (nothing
/// was sent: safe for any request) or a reset one (GETs here).
const PREFER_LOCAL: &str = r#"
[services.web.locality]
prefer_local = true

[services.web.retries]
max_attempts = 3
retry_on = ["connect-failure", "reset"]
budget_ratio = 0.5
budget_min_per_sec = 1000
"#;

/// The sum of the series of metric `name` whose labels include every one
/// of `labels` (`key="value"`), in Prometheus text `metrics`.
fn metric(metrics: &str, name: &str, labels: &[&str]) -> u64 {
    metrics
        .lines()
        .filter(|l| l.starts_with(&format!("{name}{{")))
        .filter(|l| labels.iter().all(|want| l.contains(want)))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum::<f64>() as u64
}

/// Tries the client sidecar counted as local and remote, and its retries.
async fn tries(client: &Process) -> Result<(u64, u64, u64)> {
    let (_, m) = admin_get(client, "/metrics").await?;
    let name = "wayfinder_proxy_locality_requests_total";
    let web = "upstream=\"web\"";
    Ok((
        metric(&m, name, &[web, "locality=\"local\""]),
        metric(&m, name, &[web, "locality=\"remote\""]),
        metric(&m, "wayfinder_proxy_retries_total", &[web]),
    ))
}

/// Requests of `r` each zone answered (instances are named `web-ZONE…`).
fn by_zone(r: &Report) -> (usize, usize) {
    let n = |z: &str| {
        r.per_instance()
            .iter()
            .filter(|(i, _)| i.starts_with(&format!("web-{z}")))
            .map(|(_, c)| c)
            .sum()
    };
    (n("a"), n("b"))
}

#[tokio::test(flavor = "multi_thread")]
async fn with_two_zones_traffic_stays_local_until_the_local_instances_die_then_none_fails()
-> Result<()> {
    bounded(async {
        let cp = ControlPlane::start(&["--lease-ttl", "2s"])?;
        apply_policy(&cp, PREFER_LOCAL)?;
        let zoned = |name: &str, zone: &str| -> Result<Instance> {
            instance_with(&cp, "web", name, "/healthz", &["--zone", zone])
        };
        let mut local = vec![zoned("web-a1", "zone-a")?, zoned("web-a2", "zone-a")?];
        let _remote = [zoned("web-b1", "zone-b")?, zoned("web-b2", "zone-b")?];
        wait_serving(&cp, "web", 4).await?;
        let (client, web, _) = mesh::client(&cp, &["--zone", "zone-a"])?;
        wait_endpoints(&client, "four endpoints in two zones", |e| {
            e.matches(r#""zone":"zone-a""#).count() == 2
                && e.matches(r#""zone":"zone-b""#).count() == 2
        })
        .await?;

        // Both zones healthy: everything stays in zone a.
        let spec = Spec::get(web, "web");
        let first = load::run(spec.clone(), 4, 500, Arc::new(AtomicUsize::new(0))).await;
        ensure!(first.failed().is_empty(), "failures: {:?}", first.failed());
        let (a, b) = by_zone(&first);
        ensure!(
            a >= 495 && a + b == 500,
            "zone a answered {a} of 500, zone b {b}"
        );
        let (l, r, retries) = tries(&client).await?;
        ensure!(
            (l, r) == (a as u64 + retries, b as u64),
            "tries local {l} remote {r} (retries {retries}); answers a {a} b {b}"
        );

        // Zone a dies (apps and sidecars, SIGKILL) under load.
        let stop = Arc::new(AtomicBool::new(false));
        let running = tokio::spawn(load::until(spec, 4, stop.clone()));
        tokio::time::sleep(Duration::from_millis(700)).await;
        for i in &mut local {
            i.sidecar.kill();
            i.app.kill();
        }
        let killed = Instant::now();
        tokio::time::sleep(Duration::from_secs(3)).await;
        stop.store(true, Ordering::Relaxed);
        let second = running.await?;
        ensure!(
            second.failed().is_empty(),
            "{} of {} failed: {:?}",
            second.failed().len(),
            second.samples.len(),
            second.failed().iter().take(5).collect::<Vec<_>>()
        );
        // The last two seconds (well after the kill): zone b alone.
        let n = second.samples.len();
        let last = &second.samples[n * 2 / 3..];
        let stray: Vec<_> = last
            .iter()
            .filter(|s| {
                !s.instance
                    .as_deref()
                    .is_some_and(|i| i.starts_with("web-b"))
            })
            .collect();
        ensure!(
            stray.is_empty(),
            "answered outside zone b after the kill ({:?} ago): {:?}",
            killed.elapsed(),
            stray.iter().take(5).collect::<Vec<_>>()
        );
        // Every try counted once, local or remote: the remote ones are
        // exactly zone b's answers, the local ones zone a's answers and the
        // tries that failed there (each followed by a retry).
        let (a2, b2) = by_zone(&second);
        ensure!(b2 > 0, "zone b answered nothing");
        let (l, r, retries) = tries(&client).await?;
        let requests = 500 + second.samples.len();
        eprintln!(
            "zone a answered {a} then {a2}, zone b {b} then {b2}; tries local {l}, remote {r}, retries {retries}"
        );
        ensure!(
            r == (b + b2) as u64 && l + r == requests as u64 + retries,
            "tries local {l} remote {r} (retries {retries}); answers a {} b {}, requests {}",
            a + a2,
            b + b2,
            requests
        );
        Ok(())
    })
    .await
}

/// The share of `r`'s answers instance `name` gave.
fn share(r: &Report, name: &str) -> f64 {
    let of = r.per_instance().get(name).copied().unwrap_or(0);
    of as f64 / r.samples.len().max(1) as f64
}

/// Steady load on `web` from `start + from` until `start + to`.
async fn load_between(
    web: std::net::SocketAddr,
    start: Instant,
    from: Duration,
    to: Duration,
) -> Report {
    tokio::time::sleep_until((start + from).into()).await;
    let stop = Arc::new(AtomicBool::new(false));
    let running = tokio::spawn(load::until(Spec::get(web, "web"), 6, stop.clone()));
    tokio::time::sleep_until((start + to).into()).await;
    stop.store(true, Ordering::Relaxed);
    running.await.unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_returning_endpoint_s_share_ramps_up_over_the_slow_start_window() -> Result<()> {
    bounded(async {
        let Running { cp, mut instances } = Scenario::new()
            // Round robin: with no slow start each instance takes exactly
            // a third, so what moves the share is the ramp alone.
            .policy("[services.web]\nbalancer = \"round-robin\"\nslow_start = \"8s\"\n")
            .instances("web", 3)
            .start()
            .await?;
        let (client, web, _) = mesh::client(&cp, &[])?;
        let endpoints = |n: usize| move |e: &str| e.matches(r#""id":"web-"#).count() == n;
        wait_endpoints(&client, "three endpoints", endpoints(3)).await?;
        // Present from the sidecar's start: not warming, a fair share.
        let warm = load_between(web, Instant::now(), Duration::ZERO, Duration::from_secs(1)).await;
        ensure!(warm.failed().is_empty(), "failures: {:?}", warm.failed());
        ensure!(
            share(&warm, "web-3") > 0.2,
            "web-3 from the start: {:?}",
            warm.per_instance()
        );

        // web-3 leaves (deregistered) and comes back as a new process.
        let old = instances.pop().context("three instances")?;
        {
            let Instance {
                mut app,
                mut sidecar,
                ..
            } = old;
            sidecar.terminate()?;
            app.kill();
        }
        wait_endpoints(&client, "web-3 gone", endpoints(2)).await?;
        let back = instance_with(&cp, "web", "web-3", "/healthz", &[])?;
        // The window starts when the client's sidecar hears of it.
        let started = Instant::now();
        let mut seen = None;
        while started.elapsed() < Duration::from_secs(10) {
            let (_, e) = admin_get(&client, "/endpoints").await?;
            let v: serde_json::Value = serde_json::from_str(&e)?;
            let factor = v["web"]["endpoints"]
                .as_array()
                .into_iter()
                .flatten()
                .find(|ep| ep["id"] == "web-3" && ep["healthy"] == true)
                .and_then(|ep| ep["slow_start"].as_f64());
            if let Some(f) = factor {
                seen = Some((Instant::now(), f));
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let (t0, factor) = seen.context("web-3 back in the client's endpoints")?;
        ensure!(
            factor < 0.2,
            "web-3 is warming when it returns: factor {factor}"
        );

        let early = load_between(web, t0, Duration::ZERO, Duration::from_millis(1500)).await;
        let middle = load_between(web, t0, Duration::from_millis(3500), Duration::from_millis(4500)).await;
        let late = load_between(web, t0, Duration::from_millis(6800), Duration::from_secs(8)).await;
        drop(back);
        for (r, when) in [(&early, "first 1.5 s"), (&middle, "middle second"), (&late, "last 1.2 s")] {
            ensure!(r.failed().is_empty(), "{when}: failures {:?}", r.failed());
            ensure!(
                r.samples.len() >= 200,
                "{when}: only {} requests",
                r.samples.len()
            );
        }
        let fair = 1.0 / 3.0;
        let (e, m, l) = (
            share(&early, "web-3"),
            share(&middle, "web-3"),
            share(&late, "web-3"),
        );
        eprintln!(
            "web-3's share: {e:.3} in the first 1.5 s ({} requests), {m:.3} in the middle ({}), {l:.3} in the last ({})",
            early.samples.len(),
            middle.samples.len(),
            late.samples.len()
        );
        // A ramp, not a step: halfway through the window (factor about
        // 0.55) the share lies clearly between the two ends.
        ensure!(
            m > e + 0.04 && m < l - 0.04,
            "web-3's share does not ramp: {e:.3}, then {m:.3} halfway, then {l:.3}"
        );
        ensure!(
            e < 0.6 * fair,
            "web-3's share in the window's first 1.5 s: {e:.3} (fair {fair:.3}): {:?}",
            early.per_instance()
        );
        ensure!(
            l > 0.8 * fair,
            "web-3's share in the window's last 1.2 s: {l:.3} (fair {fair:.3}): {:?}",
            late.per_instance()
        );
        Ok(())
    })
    .await
}
