//! End-to-end tests of traffic mirroring and hedged requests with the real
//! wf-control, lab-apps and sidecars on loopback. The apps' own served
//! counts say how many calls (and copies) each instance took; lab-app's
//! `delay_ms` / `delay_share` faults make an instance slow, always or for a
//! share of its calls.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::AtomicUsize;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use wayfinder_tests::load::{self, Report, Spec};
use wayfinder_tests::mesh::{
    Instance, admin_get, client, instance_with, served, wait_endpoints, wait_serving,
};
use wayfinder_tests::{ControlPlane, apply_policy, bin, bounded, http_request};

/// Sets lab-app faults, e.g. `delay_ms=200&delay_share=0.15`.
async fn fault(app: SocketAddr, query: &str) -> Result<()> {
    let (status, _, body) =
        http_request(app, "POST", &format!("/fault?{query}"), "lab", "").await?;
    if status != 200 {
        bail!("fault {query}: {status} {body}");
    }
    Ok(())
}

/// Calls the app saw marked `x-wayfinder-mirror: 1`.
async fn mirrored(app: SocketAddr) -> Result<u64> {
    let (_, _, body) = http_request(app, "GET", "/fault", "lab", "").await?;
    let json = body
        .find('{')
        .and_then(|s| body.rfind('}').map(|e| &body[s..=e]))
        .context("no JSON from /fault")?;
    let v: serde_json::Value = serde_json::from_str(json)?;
    v["mirrored"].as_u64().context("no mirrored count")
}

/// Calls served by each of `lab`'s apps, in order.
async fn counts(lab: &[&Instance]) -> Result<Vec<u64>> {
    let mut out = Vec::new();
    for i in lab {
        out.push(served(i.app_addr).await?);
    }
    Ok(out)
}

/// The series of `name` whose labels contain `labels`, summed.
fn metric_with(text: &str, name: &str, labels: &str) -> f64 {
    text.lines()
        .filter(|l| l.starts_with(name) && l.contains(labels))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

fn assert_all_ok(what: &str, report: &Report) {
    let failed = report.failed();
    assert!(
        failed.is_empty(),
        "{what}: {} failed: {:?}",
        failed.len(),
        &failed[..failed.len().min(5)]
    );
}

const TOKEN: &str = "lab-token-0123456789";

const MIRROR: &str = r#"
[services.web.mirror]
to = "web-shadow"
max_in_flight = 10
"#;

#[tokio::test]
async fn a_full_mirror_copies_every_call_and_a_slow_shadow_costs_the_caller_nothing() -> Result<()>
{
    bounded(async {
        // With identities: only a sidecar proven over mTLS may mark a copy.
        let cp = ControlPlane::start(&["--join-token", TOKEN])?;
        apply_policy(&cp, MIRROR)?;
        let join = ["--join-token", TOKEN];
        let web = instance_with(&cp, "web", "web-1", "/healthz", &join)?;
        // The control group: the same app behind a service nobody mirrors.
        let plain = instance_with(&cp, "plain", "plain-1", "/healthz", &join)?;
        let shadow = instance_with(&cp, "web-shadow", "shadow-1", "/healthz", &join)?;
        for svc in ["web", "plain", "web-shadow"] {
            wait_serving(&cp, svc, 1).await?;
        }
        let (client, addr, outbound) = client(&cp, &join)?;
        wait_endpoints(&client, "the mirror", |t| t.contains("web-shadow")).await?;
        // The real calls take 200 ms: p99 is then measured against the
        // app's time, not the scheduler's noise on a loaded machine.
        fault(web.app_addr, "delay_ms=200").await?;
        fault(plain.app_addr, "delay_ms=200").await?;

        let n = 240;
        let fast = load::run(Spec::get(addr, "web"), 8, n, Arc::new(AtomicUsize::new(0))).await;
        assert_all_ok("fast shadow", &fast);
        // Copies leave once the real answer is in: wait for the last ones.
        let deadline = Instant::now() + Duration::from_secs(10);
        let (primary, copies) = loop {
            let c = counts(&[&web, &shadow]).await?;
            if c[1] >= c[0] || Instant::now() > deadline {
                break (c[0], c[1]);
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        assert_eq!(primary, n as u64, "the primary served every call");
        assert_eq!(copies, primary, "the shadow got a copy of every call");
        // The copies came marked as such; the real calls did not.
        assert_eq!(mirrored(shadow.app_addr).await?, copies);
        assert_eq!(mirrored(web.app_addr).await?, 0);

        // A shadow 1 s slow: copies pile up to max_in_flight and the
        // rest are shed; the caller's answers do not wait for any of it.
        // Mirrored and unmirrored calls run side by side through the same
        // sidecar, so the machine's ups and downs weigh on both alike.
        fault(shadow.app_addr, "delay_ms=1000").await?;
        // `wfctl mirror diff` watches, as a user would.
        let http = cp.http.to_string();
        let diff = std::thread::spawn(move || {
            std::process::Command::new(bin("wfctl"))
                .args([
                    "mirror", "diff", "web", "--for", "10s", "--http", &http, "-o", "json",
                ])
                .stdin(std::process::Stdio::null())
                .output()
        });
        // A round is 320 calls each way; the machine (other tests, builds)
        // can disturb one round's tail, so up to three are measured and
        // one within 5% suffices: a copy that held the real call up would
        // add its second to every round's tail.
        let per_round = 320;
        let slow_started = Instant::now();
        let mut rounds = Vec::new();
        while rounds.len() < 3 {
            let (mirrored_calls, plain_calls) = tokio::join!(
                load::run(
                    Spec::get(outbound, "web"),
                    8,
                    per_round,
                    Arc::new(AtomicUsize::new(0))
                ),
                load::run(
                    Spec::get(outbound, "plain"),
                    8,
                    per_round,
                    Arc::new(AtomicUsize::new(0))
                ),
            );
            assert_all_ok("mirrored to a slow shadow", &mirrored_calls);
            assert_all_ok("not mirrored", &plain_calls);
            let (p99_mirrored, p99_plain) =
                (mirrored_calls.quantile(0.99), plain_calls.quantile(0.99));
            let moved = (p99_mirrored.as_secs_f64() - p99_plain.as_secs_f64()).abs()
                / p99_plain.as_secs_f64();
            rounds.push((p99_mirrored, p99_plain, moved));
            if moved < 0.05 {
                break;
            }
        }
        assert!(
            rounds.iter().any(|r| r.2 < 0.05),
            "p99 mirrored to a slow shadow vs not mirrored, per round: {rounds:?}"
        );
        let slow_n = rounds.len() * per_round;
        tokio::time::sleep(Duration::from_millis(1_500)).await;
        let c = counts(&[&web, &shadow]).await?;
        let copied = c[1] - copies;
        assert_eq!(c[0] - primary, slow_n as u64);
        assert!(
            copied > 0 && copied < slow_n as u64,
            "some copies sent, the rest shed: {copied} of {slow_n}"
        );
        // At most 10 copies of 1 s in flight: no more than 10 a second
        // (plus the 10 the sleep above let finish) reached the shadow.
        let cap = 10.0 * (slow_started.elapsed().as_secs_f64() + 1.0);
        assert!(
            (copied as f64) <= cap,
            "{copied} copies in {:?} with max_in_flight = 10",
            slow_started.elapsed()
        );
        // Every call was either copied or shed, and the metrics say which.
        let (_, m) = admin_get(&client, "/metrics").await?;
        let copies_of = |result: &str| {
            metric_with(
                &m,
                "wayfinder_proxy_mirror_copies_total",
                &format!("result=\"{result}\""),
            )
        };
        let (sent, shed) = (copies_of("sent"), copies_of("shed"));
        assert_eq!(sent + shed, (n + slow_n) as f64, "{m}");
        assert_eq!(sent, (copies + copied) as f64, "{m}");

        // The divergence report: pairs compared, the same statuses, the
        // shadow's tail far slower than the primary's, the shed counted.
        let out = diff.join().map_err(|_| anyhow::anyhow!("wfctl thread"))??;
        let (stdout, stderr) = (
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
        );
        assert!(out.status.success(), "{stderr}");
        let report: serde_json::Value = serde_json::from_str(stdout.trim())?;
        let route = &report["routes"][0];
        assert_eq!(route["shadow"], "web-shadow", "{report}");
        assert!(route["pairs"].as_u64().unwrap_or(0) > 0, "{report}");
        assert_eq!(route["status_differs"], 0, "{report}");
        assert!(route["shed"].as_u64().unwrap_or(0) > 0, "{report}");
        let p99 = |k: &str| route[k].as_f64().unwrap_or(0.0);
        assert!(
            p99("shadow_p99_ms") > p99("primary_p99_ms") + 200.0,
            "the slow shadow shows in its p99: {report}"
        );
        assert!(
            stderr.contains("pairs"),
            "progress shown while waiting: {stderr}"
        );
        Ok(())
    })
    .await
}

/// web-1..3 balanced round robin; web-1 is 200 ms slow on `share` of its calls.
async fn tail(cp: &ControlPlane, share: f64) -> Result<Vec<Instance>> {
    let mut lab = Vec::new();
    for name in ["web-1", "web-2", "web-3"] {
        lab.push(instance_with(cp, "web", name, "/healthz", &[])?);
    }
    wait_serving(cp, "web", 3).await?;
    fault(
        lab[0].app_addr,
        &format!("delay_ms=200&delay_share={share}"),
    )
    .await?;
    Ok(lab)
}

async fn total(lab: &[Instance]) -> Result<u64> {
    Ok(counts(&lab.iter().collect::<Vec<_>>()).await?.iter().sum())
}

const ROUND_ROBIN: &str = r#"
[services.web]
balancer = "round-robin"
"#;

const HEDGED: &str = r#"
[services.web]
balancer = "round-robin"
[services.web.hedging]
after = "30ms"
"#;

#[tokio::test]
async fn hedging_cuts_the_tail_for_a_few_extra_calls_and_never_hedges_a_post() -> Result<()> {
    bounded(async {
        let cp = ControlPlane::start(&[])?;
        apply_policy(&cp, ROUND_ROBIN)?;
        // 15% of web-1's calls, a third of all: 5% of calls are slow.
        let lab = tail(&cp, 0.15).await?;
        let (client, addr, _) = client(&cp, &[])?;
        wait_endpoints(&client, "round robin", |t| t.contains("round-robin")).await?;

        let n = 800;
        let before = load::run(Spec::get(addr, "web"), 4, n, Arc::new(AtomicUsize::new(0))).await;
        assert_all_ok("unhedged", &before);
        let p99_before = before.quantile(0.99);
        assert!(
            p99_before >= Duration::from_millis(150),
            "without hedging the slow 5% is the p99: {p99_before:?}"
        );

        apply_policy(&cp, HEDGED)?;
        wait_endpoints(&client, "hedging", |t| t.contains("\"hedging\"")).await?;
        let start = total(&lab).await?;
        let n = 1_500;
        let hedged = load::run(Spec::get(addr, "web"), 4, n, Arc::new(AtomicUsize::new(0))).await;
        assert_all_ok("hedged", &hedged);
        let p99 = hedged.quantile(0.99);
        tokio::time::sleep(Duration::from_millis(300)).await;
        let extra = total(&lab).await? - start - n as u64;
        assert!(
            p99 < Duration::from_millis(60),
            "hedged p99 {p99:?} (was {p99_before:?})"
        );
        assert!(
            extra as f64 <= 0.06 * n as f64,
            "{extra} extra calls for {n} ({:.1}%)",
            100.0 * extra as f64 / n as f64
        );
        assert!(extra > 0, "the slow calls were hedged");
        // Hedges count in the attempts the client is told.
        assert!(
            hedged.samples.iter().any(|s| s.attempts == Some(2)),
            "some answers took two tries"
        );
        let (_, m) = admin_get(&client, "/metrics").await?;
        let won = metric_with(&m, "wayfinder_proxy_hedges_total", "result=\"won\"");
        assert!(won > 0.0, "hedges won: {m}");

        // A POST is never hedged: not one extra call, every answer one try.
        let start = total(&lab).await?;
        let mut post = Spec::get(addr, "web");
        post.method = hyper::Method::POST;
        post.body = bytes::Bytes::from_static(b"order");
        let posts = load::run(post, 4, 300, Arc::new(AtomicUsize::new(0))).await;
        assert_all_ok("posts", &posts);
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert_eq!(total(&lab).await? - start, 300, "no POST was sent twice");
        assert!(posts.samples.iter().all(|s| s.attempts == Some(1)));
        Ok(())
    })
    .await
}

const HEDGED_ON_A_BUDGET: &str = r#"
[services.web]
balancer = "round-robin"
[services.web.hedging]
after = "30ms"
[services.web.retries]
budget_ratio = 0.01
budget_min_per_sec = 1
"#;

#[tokio::test]
async fn hedging_stops_when_the_retry_budget_is_spent() -> Result<()> {
    bounded(async {
        let cp = ControlPlane::start(&[])?;
        apply_policy(&cp, HEDGED_ON_A_BUDGET)?;
        // Every call to web-1 is slow: a third of the calls would want a hedge.
        let lab = tail(&cp, 1.0).await?;
        let (client, addr, _) = client(&cp, &[])?;
        wait_endpoints(&client, "hedging", |t| t.contains("\"hedging\"")).await?;
        let start = total(&lab).await?;
        let n = 600;
        let report = load::run(Spec::get(addr, "web"), 6, n, Arc::new(AtomicUsize::new(0))).await;
        assert_all_ok("on a budget", &report);
        tokio::time::sleep(Duration::from_millis(300)).await;
        let extra = total(&lab).await? - start - n as u64;
        let (_, m) = admin_get(&client, "/metrics").await?;
        let refused = metric_with(&m, "wayfinder_proxy_hedges_total", "result=\"no-budget\"");
        let slow = report
            .samples
            .iter()
            .filter(|s| s.latency >= Duration::from_millis(150))
            .count();
        assert!(refused > 0.0, "the budget refused hedges: {m}");
        // The budget allows 1% of calls plus one a second (and lends a
        // little at the start of its window): far fewer than the ~200 wanted.
        assert!(
            (extra as f64) < 0.15 * (n as f64 / 3.0),
            "{extra} hedges sent on a 1% budget"
        );
        assert!(slow > 0, "unhedged slow calls remain");
        Ok(())
    })
    .await
}
