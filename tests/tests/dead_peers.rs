//! Peers that go without a word: a host whose network vanishes (no FIN, no
//! RST), an app frozen behind its live sidecar (TCP alive, no answer), and
//! the balancer's duty to keep trying every instance. Real binaries over
//! real sockets: loopback, and network namespaces the test creates.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use anyhow::{Context, Result};
use wayfinder_tests::load::{self, Report, Spec};
use wayfinder_tests::mesh::{admin_get, client, lab_app, sidecar, wait_serving};
use wayfinder_tests::netns::{Lab, run, unavailable};
use wayfinder_tests::{ControlPlane, Process, Running, Scenario, apply_policy, bounded, metric};

/// wf-control with `cp_args` and three `web` instances whose sidecars check
/// their app by TCP connect only: a frozen app still accepts connections, so
/// the control plane keeps it serving and only the caller's own view
/// (timeouts, ejection) can help.
async fn tcp_checked_lab(cp_args: &[&str]) -> Result<Running> {
    Scenario::new()
        .control_plane_args(cp_args)
        .instances("web", 3)
        .health_check("tcp")
        .start()
        .await
}

/// Runs `total` GETs from five clients at once, calling `act` once `at`
/// of them have finished.
async fn five_clients(
    web: SocketAddr,
    total: usize,
    at: usize,
    act: impl FnOnce() -> Result<()>,
) -> Result<Report> {
    let done = Arc::new(AtomicUsize::new(0));
    let run = tokio::spawn(load::run(Spec::get(web, "web"), 5, total, done.clone()));
    while done.load(Ordering::Relaxed) < at {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    act()?;
    Ok(run.await?)
}

fn slowest(r: &Report) -> Duration {
    r.samples
        .iter()
        .map(|s| s.latency)
        .max()
        .unwrap_or_default()
}

#[tokio::test]
async fn a_frozen_instance_is_cut_off_by_the_per_try_timeout_and_ejected() -> Result<()> {
    bounded(async {
        let Running { cp, instances: lab } = tcp_checked_lab(&[]).await?;
        apply_policy(&cp, "[services.web.timeouts]\nper_try = \"300ms\"\n")?;
        // Round robin keeps giving web-2 its turn until it is ejected
        // (peak-EWMA stops picking it after one slow try anyway).
        let (client, web, _) = client(&cp, &["--balancer", "round-robin"])?;
        let report = five_clients(web, 1500, 200, || lab[1].app.signal("STOP")).await?;
        let failed = report.failed();
        assert!(
            failed.is_empty(),
            "{} failed, e.g. {:?}",
            failed.len(),
            &failed[..failed.len().min(5)]
        );
        // A try cut at 300 ms, its retry elsewhere, a backoff of at most 250 ms.
        assert!(
            slowest(&report) < Duration::from_millis(1200),
            "{:?}",
            slowest(&report)
        );
        let (_, m) = admin_get(&client, "/metrics").await?;
        let ejections = metric(&m, "wayfinder_proxy_ejections_total{upstream=\"web\"}");
        assert!(ejections >= Some(1.0), "web-2 was ejected: {ejections:?}");
        let (_, eps) = admin_get(&client, "/endpoints").await?;
        let v: serde_json::Value = serde_json::from_str(&eps)?;
        let web2 = v["web"]["endpoints"]
            .as_array()
            .and_then(|a| a.iter().find(|e| e["id"] == "web-2"))
            .with_context(|| format!("web-2 in {eps}"))?;
        assert_eq!(web2["ejected"], true, "{eps}");
        // Served by the control plane all along: only ejection took it out.
        assert_eq!(web2["healthy"], true, "{eps}");
        let late = report
            .samples
            .iter()
            .filter(|s| s.seq >= 1200 && s.attempts.unwrap_or(1) > 1)
            .count();
        assert_eq!(late, 0, "once ejected, no call tries web-2 first");
        lab[1].app.signal("CONT")?;
        Ok(())
    })
    .await
}

#[tokio::test]
async fn with_no_policy_a_frozen_instance_costs_at_most_the_request_timeout() -> Result<()> {
    bounded(async {
        let Running { cp, instances: lab } = tcp_checked_lab(&[]).await?;
        // The default is 15 s (the Docker lab test waits for it); here 2 s
        // stands in for it to keep the test short.
        // Round robin, so web-2 keeps its turn until ejected.
        let (client, web, _) = client(
            &cp,
            &["--request-timeout", "2s", "--balancer", "round-robin"],
        )?;
        let report = five_clients(web, 600, 100, || lab[1].app.signal("STOP")).await?;
        assert!(
            slowest(&report) < Duration::from_millis(2500),
            "{:?}",
            slowest(&report)
        );
        let failed = report.failed();
        assert!(!failed.is_empty(), "calls sent to the frozen app time out");
        for f in &failed {
            assert_eq!(
                (f.status, f.error.as_deref()),
                (504, Some("timeout")),
                "{f:?}"
            );
        }
        // Five timeouts in a row eject it; every caller may have had one
        // in flight when it happened.
        assert!(failed.len() <= 10, "{} failed", failed.len());
        // Ejected (for 30 s): the next calls all go elsewhere, at once.
        let after = load::run(Spec::get(web, "web"), 5, 600, Arc::default()).await;
        assert!(after.failed().is_empty(), "{:?}", after.failed());
        assert!(
            slowest(&after) < Duration::from_millis(500),
            "{:?}",
            slowest(&after)
        );
        assert!(!after.per_instance().contains_key("web-2"));
        let (_, m) = admin_get(&client, "/metrics").await?;
        assert!(metric(&m, "wayfinder_proxy_ejections_total{upstream=\"web\"}") >= Some(1.0));
        assert!(
            metric(
                &m,
                "wayfinder_proxy_timeouts_total{upstream=\"web\",kind=\"request\"}"
            ) >= Some(1.0),
            "{m}"
        );
        lab[1].app.signal("CONT")?;
        Ok(())
    })
    .await
}

#[tokio::test]
async fn calls_waiting_on_an_instance_the_control_plane_drops_move_at_once() -> Result<()> {
    bounded(async {
        let cp = ControlPlane::start(&[])?;
        let (app1, app1_addr) = lab_app("web-1")?;
        let _web1 = (app1, sidecar(&cp, "web", "web-1", app1_addr, "tcp")?);
        // web-2 answers after 3 s; its sidecar drains for up to 10 s on
        // SIGTERM, so what is in flight there may still finish.
        let (_app2, app2_addr) = lab_app("web-2")?;
        let app2 = app2_addr.to_string();
        let url = cp.url();
        let mut web2 = Process::start(
            "wf-proxy",
            &[
                "--control-plane",
                &url,
                "--service",
                "web",
                "--instance",
                "web-2",
                "--app",
                &app2,
                "--inbound",
                "127.0.0.1:0",
                "--admin",
                "127.0.0.1:0",
                "--health-check",
                "tcp",
                "--drain-timeout",
                "10s",
            ],
            "wf-proxy listening",
        )?;
        wait_serving(&cp, "web", 2).await?;
        let (status, _, _) =
            wayfinder_tests::http_request(app2_addr, "POST", "/fault?delay_ms=3000", "lab", "")
                .await?;
        assert_eq!(status, 200);
        let (_client, web, _) = client(&cp, &["--balancer", "round-robin"])?;

        // Round robin over two: two POSTs then four GETs, started 20 ms
        // apart so that consecutive ones alternate, put one POST and two
        // GETs on web-2.
        let call = |method: &'static str| {
            tokio::spawn(async move {
                let started = std::time::Instant::now();
                let r = wayfinder_tests::http_request(web, method, "/", "web", "x").await;
                (method, r, started.elapsed())
            })
        };
        let mut calls = Vec::new();
        for method in ["POST", "POST", "GET", "GET", "GET", "GET"] {
            calls.push(call(method));
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
        // web-2 leaves: its sidecar deregisters at once on SIGTERM.
        let stop = std::thread::spawn(move || web2.terminate());
        let (mut moved, mut waited) = (0, 0);
        for c in calls {
            let (method, r, took) = c.await?;
            let (status, head, body) = r?;
            assert_eq!(status, 200, "{method}: {head}{body}");
            let instance = wayfinder_tests::mesh::instance_of(&body);
            if method == "GET" {
                // Moved to web-1 as soon as the control plane said so, not
                // after web-2's 3 s.
                assert!(
                    took < Duration::from_millis(2000),
                    "GET took {took:?}: {head}"
                );
                if head.contains("x-wayfinder-attempts: 2") {
                    assert_eq!(instance, "web-1");
                    moved += 1;
                }
            } else if instance == "web-2" {
                // A POST that reached web-2 is not sent twice: it waits.
                assert!(head.contains("x-wayfinder-attempts: 1"), "{head}");
                assert!(took >= Duration::from_millis(2900), "POST took {took:?}");
                waited += 1;
            }
        }
        assert!(moved >= 1, "a GET waiting on web-2 was moved");
        assert!(waited >= 1, "a POST waited for web-2's answer");
        stop.join()
            .map_err(|_| anyhow::anyhow!("terminate panicked"))??;
        Ok(())
    })
    .await
}

/// Open inbound connections on an instance's sidecar.
async fn inbound_connections(sidecar: &Process) -> Result<Option<f64>> {
    let (_, m) = admin_get(sidecar, "/metrics").await?;
    Ok(metric(
        &m,
        "wayfinder_proxy_open_connections{direction=\"inbound\"}",
    ))
}

#[tokio::test]
async fn an_idle_pooled_connection_to_a_frozen_sidecar_is_closed() -> Result<()> {
    bounded(async {
        // Leases outlive the test: the control plane must not be what
        // notices the frozen sidecar.
        let Running { cp, instances: lab } = tcp_checked_lab(&["--lease-ttl", "120s"]).await?;
        let (_client, web, _) = client(&cp, &["--balancer", "round-robin"])?;
        let report = load::run(Spec::get(web, "web"), 3, 90, Arc::default()).await;
        assert!(report.failed().is_empty(), "{:?}", report.failed());
        assert_eq!(report.per_instance().len(), 3);
        for i in [0, 1] {
            assert_eq!(inbound_connections(&lab[i].sidecar).await?, Some(1.0));
        }
        // A frozen process's kernel still acknowledges: TCP keepalive sees
        // nothing wrong, and the pool keeps idle connections for 90 s.
        lab[1].sidecar.signal("STOP")?;
        // Pinged after 10-20 s of silence, 3 s to answer
        // (`wayfinder_proxy::liveness::H2_IDLE_PING_*`), and some slack.
        tokio::time::sleep(Duration::from_secs(2 * 10 + 3 + 3)).await;
        lab[1].sidecar.signal("CONT")?;
        // Thawed, web-2's sidecar reads the end of the connection the
        // client closed; web-1's, pinged all along, is still there.
        let mut left = None;
        for _ in 0..40 {
            left = inbound_connections(&lab[1].sidecar).await?;
            if left == Some(0.0) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert_eq!(
            left,
            Some(0.0),
            "the idle connection to the frozen sidecar stayed"
        );
        assert_eq!(inbound_connections(&lab[0].sidecar).await?, Some(1.0));
        let after = load::run(Spec::get(web, "web"), 3, 30, Arc::default()).await;
        assert!(after.failed().is_empty(), "{:?}", after.failed());
        Ok(())
    })
    .await
}

#[tokio::test]
async fn three_equal_instances_share_300_calls_one_after_another() -> Result<()> {
    bounded(async {
        let Running {
            cp,
            instances: _lab,
        } = tcp_checked_lab(&[]).await?;
        // The default balancer, peak-EWMA.
        let (_client, web, _) = client(&cp, &[])?;
        let report = load::run(Spec::get(web, "web"), 1, 300, Arc::default()).await;
        assert!(report.failed().is_empty());
        let shares = report.per_instance();
        assert_eq!(shares.len(), 3, "{shares:?}");
        // Peak-EWMA prefers whichever answered faster, so shares follow
        // small latency differences between the processes (200/80/20 is
        // common here); what it must not do is stop trying one. Every
        // instance answers in every third of the run.
        let mut by_seq = report.samples.clone();
        by_seq.sort_by_key(|s| s.seq);
        for (part, calls) in by_seq.chunks(100).enumerate() {
            let seen: std::collections::BTreeSet<_> =
                calls.iter().filter_map(|s| s.instance.as_deref()).collect();
            assert_eq!(
                seen.len(),
                3,
                "calls {}..{}: only {seen:?}; {shares:?}",
                part * 100,
                part * 100 + 100
            );
        }
        Ok(())
    })
    .await
}

#[tokio::test]
async fn a_host_whose_network_vanishes_mid_run_fails_no_call_and_stalls_none() -> Result<()> {
    if let Some(why) = unavailable() {
        eprintln!("skipped: {why}");
        return Ok(());
    }
    bounded(async {
        let mut lab = Lab::new("vanish")?;
        // The test's own namespace joins the bridge: wf-control and the
        // client sidecar run here, the instances each in their own.
        lab.attach_host(254)?;
        let cp = ControlPlane::start_on(&format!("{}:0", Lab::ip(254)), &[])?;
        let url = cp.url();
        let mut webs = Vec::new();
        for i in 1..=3 {
            webs.push(lab.web(i, &url, &[])?);
        }
        wait_serving(&cp, "web", 3).await?;
        let (_client, web, _) = client(&cp, &[])?;
        // All three answer through the mesh before anything happens.
        let warm = load::run(Spec::get(web, "web"), 3, 60, Arc::default()).await;
        assert_eq!(warm.per_instance().len(), 3, "{:?}", warm.per_instance());

        // web-2's host drops off the network: its link goes down on the
        // bridge, so nothing it had open sees a FIN or RST.
        let hub = lab.hub.clone();
        let report = five_clients(web, 2000, 300, || {
            run(&["ip", "-n", &hub, "link", "set", "v12", "down"]).map(drop)
        })
        .await?;
        let failed = report.failed();
        assert!(
            failed.is_empty(),
            "{} failed, e.g. {:?}",
            failed.len(),
            &failed[..failed.len().min(5)]
        );
        assert!(
            slowest(&report) < Duration::from_secs(3),
            "slowest call {:?}",
            slowest(&report)
        );
        let late: Vec<_> = report
            .samples
            .iter()
            .filter(|s| s.seq >= 400 && s.instance.as_deref() == Some("web-2"))
            .collect();
        assert!(
            late.is_empty(),
            "web-2 answered after it vanished: {late:?}"
        );
        Ok(())
    })
    .await
}
