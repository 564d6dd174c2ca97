//! `wfctl mirror diff` against the real wf-control and wfctl, fed reports
//! the way sidecars send them (`TrafficReport.mirrors`): the per-route
//! report summed over two sidecars, `-o json`, the clear failures when
//! nothing was mirrored or the control plane cannot be reached, and
//! entries refused with InvalidArgument. (With real sidecars mirroring:
//! see the traffic mirroring test.)

use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use wayfinder_proto::latency::{self, BUCKETS};
use wayfinder_proto::v1::{MirrorDiff, TrafficReport, telemetry_client::TelemetryClient};
use wayfinder_tests::{ControlPlane, bin, bounded};

/// What one sidecar of `client` says about 100 calls to web's `default`
/// route mirrored to `version=v2`: primary ~1 ms, shadow ~100 ms.
fn report(node: &str, status_differs: u64) -> TrafficReport {
    let mut primary = vec![0; BUCKETS];
    primary[latency::bucket(Duration::from_millis(1))] = 100;
    let mut shadow = vec![0; BUCKETS];
    shadow[latency::bucket(Duration::from_millis(100))] = 100;
    TrafficReport {
        node: node.into(),
        service: "client".into(),
        edges: Vec::new(),
        mirrors: vec![MirrorDiff {
            service: "web".into(),
            route: "default".into(),
            shadow: "version=v2".into(),
            pairs: 100,
            status_differs,
            body_differs: 2,
            shed: 1,
            shadow_failed: 0,
            primary_latency_buckets: primary,
            shadow_latency_buckets: shadow,
        }],
        status: None,
    }
}

fn argv(args: &[&str]) -> Vec<String> {
    args.iter().map(|s| s.to_string()).collect()
}

/// Runs wfctl with `args` (in a thread: it waits); returns (exit success,
/// stdout, stderr, how long it took).
async fn wfctl(args: &[&str]) -> Result<(bool, String, String, Duration)> {
    wfctl_owned(argv(args)).await
}

/// [`wfctl`] with owned arguments, to be spawned.
async fn wfctl_owned(args: Vec<String>) -> Result<(bool, String, String, Duration)> {
    tokio::task::spawn_blocking(move || {
        let start = Instant::now();
        let out = std::process::Command::new(bin("wfctl"))
            .args(&args)
            .env_remove("WAYFINDER_CONTROL_HTTP")
            .stdin(std::process::Stdio::null())
            .output()?;
        Ok((
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).to_string(),
            String::from_utf8_lossy(&out.stderr).to_string(),
            start.elapsed(),
        ))
    })
    .await?
}

#[tokio::test]
async fn mirror_diff_reports_each_route_summed_over_sidecars_and_fails_clearly_without_calls()
-> Result<()> {
    bounded(async {
        let cp = ControlPlane::start(&[])?;
        let http = cp.http.to_string();
        let mut telemetry = TelemetryClient::new(cp.channel().await?);

        // Two sidecars report while wfctl waits.
        let run = tokio::spawn(wfctl_owned(argv(&[
            "mirror", "diff", "web", "--for", "4s", "--http", &http, "-o", "json",
        ])));
        tokio::time::sleep(Duration::from_secs(1)).await;
        telemetry.report(report("client-1", 3)).await?;
        telemetry.report(report("client-2", 1)).await?;
        let (ok, out, err, took) = run.await??;
        assert!(ok, "exit 0 with a report: {err}");
        assert!(took >= Duration::from_secs(4), "it waited: {took:?}");
        assert!(err.contains("web: comparing mirrored calls"), "{err}");
        let v: serde_json::Value = serde_json::from_str(out.trim()).context(out.clone())?;
        assert_eq!(v["service"], "web", "{v}");
        assert_eq!(v["window_secs"], 4.0, "{v}");
        let r = &v["routes"][0];
        assert_eq!(r["route"], "default", "{v}");
        assert_eq!(r["shadow"], "version=v2", "{v}");
        assert_eq!(r["pairs"], 200, "{v}");
        assert_eq!(r["status_differs"], 4, "{v}");
        assert_eq!(r["status_diff_percent"], 2.0, "{v}");
        assert_eq!(r["body_differs"], 4, "{v}");
        assert_eq!((&r["shed"], &r["shadow_failed"]), (&2.into(), &0.into()));
        let ms = |k: &str| r[k].as_f64().unwrap_or(f64::NAN);
        assert!(ms("primary_p99_ms") <= 1.0, "{v}");
        assert!(
            ms("shadow_p50_ms") > 64.0 && ms("shadow_p99_ms") <= 128.0,
            "{v}"
        );
        assert!(ms("p99_delta_ms") > 60.0, "{v}");

        // The table, the same way.
        let run = tokio::spawn(wfctl_owned(argv(&[
            "mirror", "diff", "web", "--for", "2s", "--http", &http,
        ])));
        tokio::time::sleep(Duration::from_secs(1)).await;
        telemetry.report(report("client-1", 3)).await?;
        let (ok, out, err, _) = run.await??;
        assert!(ok, "{err}");
        assert!(out.contains("P99 DELTA"), "{out}");
        assert!(out.contains("version=v2"), "{out}");

        // Nothing mirrored for api: a failure that says where to look.
        let (ok, _, err, _) =
            wfctl(&["mirror", "diff", "api", "--for", "2s", "--http", &http]).await?;
        assert!(!ok);
        assert!(
            err.contains("no mirrored calls for api in the last 2s: is [services.api.mirror] set?"),
            "{err}"
        );

        // No control plane: a failure at once, not after the wait.
        let closed = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?;
        let (ok, _, err, took) = wfctl(&[
            "mirror",
            "diff",
            "web",
            "--for",
            "60s",
            "--http",
            &closed.to_string(),
        ])
        .await?;
        assert!(!ok);
        assert!(err.contains("cannot reach wf-control's HTTP port"), "{err}");
        assert!(took < Duration::from_secs(10), "{took:?}");

        // An entry without 21 buckets is refused, as a bad edge is.
        let mut bad = report("client-1", 0);
        bad.mirrors[0].shadow_latency_buckets.pop();
        let e = telemetry.report(bad).await.expect_err("refused");
        assert_eq!(e.code(), tonic::Code::InvalidArgument);
        assert!(
            e.message().contains("mirrors[0].shadow_latency_buckets"),
            "{e}"
        );
        Ok(())
    })
    .await
}
