//! End-to-end tests of `wfctl proxy-status` and `wfctl check` with the real
//! wf-control, lab-apps and sidecars on loopback: every sidecar listed and
//! up to date, a frozen one (SIGSTOP) STALE within 12 s and named by
//! `check`, one that leaves forgotten, and a broken policy file named by
//! file and line.

use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use wayfinder_tests::mesh::{client, instance, wait_serving};
use wayfinder_tests::{ControlPlane, Process, bounded, wfctl};

/// `wfctl proxy-status -o json`'s sidecars.
fn proxy_status(cp: &ControlPlane) -> Result<Vec<serde_json::Value>> {
    let http = cp.http.to_string();
    let (ok, out, err) = wfctl(cp, &["proxy-status", "-o", "json", "--http", &http])?;
    anyhow::ensure!(ok, "wfctl proxy-status failed: {err}");
    let v: serde_json::Value = serde_json::from_str(out.trim()).context("JSON")?;
    Ok(v["sidecars"].as_array().cloned().unwrap_or_default())
}

/// The sidecar `service/instance` in `sidecars`.
fn find<'a>(
    sidecars: &'a [serde_json::Value],
    service: &str,
    instance: &str,
) -> Option<&'a serde_json::Value> {
    sidecars
        .iter()
        .find(|s| s["service"] == service && s["instance"] == instance)
}

/// Polls proxy-status every 250 ms until `pred` holds of its sidecars.
async fn wait_status(
    cp: &ControlPlane,
    what: &str,
    within: Duration,
    pred: impl Fn(&[serde_json::Value]) -> bool,
) -> Result<Vec<serde_json::Value>> {
    let start = Instant::now();
    loop {
        let sidecars = proxy_status(cp)?;
        if pred(&sidecars) {
            return Ok(sidecars);
        }
        if start.elapsed() > within {
            bail!("{what} not within {within:?}: {sidecars:#?}");
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// `wfctl check --http ADDR ARGS`: (exit success, stdout, stderr).
fn check(cp: &ControlPlane, args: &[&str]) -> Result<(bool, String, String)> {
    let http = cp.http.to_string();
    let mut all = vec!["check", "--http", http.as_str()];
    all.extend_from_slice(args);
    wfctl(cp, &all)
}

/// Sends SIGCONT on drop: a frozen sidecar never outlives its test.
struct Resume<'a>(&'a Process);

impl Drop for Resume<'_> {
    fn drop(&mut self) {
        let _ = self.0.signal("CONT");
    }
}

#[tokio::test]
async fn a_frozen_sidecar_is_stale_within_twelve_seconds_and_check_names_it() -> Result<()> {
    bounded(async {
        let cp = ControlPlane::start(&[])?;
        let _web1 = instance(&cp, "web-1")?;
        let web2 = instance(&cp, "web-2")?;
        wait_serving(&cp, "web", 2).await?;
        let (mut client, _, _) = client(&cp, &[])?;

        // Every sidecar reports, up to date with the registry.
        let sidecars = wait_status(
            &cp,
            "three sidecars up to date",
            Duration::from_secs(10),
            |s| {
                s.len() == 3
                    && s.iter().all(|c| c["stale"] == false)
                    && s.iter().any(|c| {
                        c["service"] == "client"
                            && c["upstreams"].as_array().is_some_and(|u| {
                                u.iter().any(|u| {
                                    u["service"] == "web"
                                        && u["endpoints"] == 2
                                        && u["version"].as_u64() >= u["registry_version"].as_u64()
                                        && u["behind_ms"] == 0
                                })
                            })
                    })
            },
        )
        .await?;
        let w2 = find(&sidecars, "web", "web-2").context("web-2 listed")?;
        assert_eq!(w2["replica"], cp.grpc.to_string(), "{w2}");
        assert!(w2["last_report_age_ms"].as_u64() < Some(3_000), "{w2}");
        let (ok, out, err) = check(&cp, &[])?;
        assert!(ok, "a healthy mesh passes:\n{out}{err}");
        assert!(out.contains("✔ no stale sidecar"), "{out}");
        assert!(out.contains("✔ control plane reachable and ready"), "{out}");

        // Frozen: its sockets stay open, it reports nothing.
        web2.sidecar.signal("STOP")?;
        let frozen = Instant::now();
        let resume = Resume(&web2.sidecar);
        let sidecars = wait_status(&cp, "web-2 stale", Duration::from_secs(12), |s| {
            find(s, "web", "web-2").is_some_and(|c| c["stale"] == true)
        })
        .await?;
        let took = frozen.elapsed();
        assert!(took <= Duration::from_secs(12), "stale after {took:?}");
        let w2 = find(&sidecars, "web", "web-2").context("web-2 listed")?;
        assert!(
            w2["why"]
                .as_str()
                .is_some_and(|w| w.starts_with("no report for")),
            "{w2}"
        );
        assert!(
            find(&sidecars, "web", "web-1").is_some_and(|c| c["stale"] == false),
            "the others stay fresh: {sidecars:#?}"
        );
        let http = cp.http.to_string();
        let (_, table, _) = wfctl(&cp, &["proxy-status", "--http", &http])?;
        assert!(table.contains("STALE: no report for"), "{table}");

        let (ok, out, err) = check(&cp, &[])?;
        assert!(!ok, "check passes with a frozen sidecar:\n{out}");
        assert!(
            out.contains("✘ no stale sidecar: web/web-2: no report for"),
            "{out}"
        );
        assert!(out.contains("hint:"), "{out}");
        assert!(err.contains("checks failed"), "{err}");

        // Thawed, it reports again and is fresh.
        drop(resume);
        wait_status(&cp, "web-2 fresh again", Duration::from_secs(10), |s| {
            find(s, "web", "web-2").is_some_and(|c| c["stale"] == false)
        })
        .await?;

        // A sidecar that leaves (SIGTERM) says so, and is forgotten, not stale.
        client.terminate()?;
        wait_status(&cp, "the client forgotten", Duration::from_secs(3), |s| {
            s.len() == 2 && s.iter().all(|c| c["service"] != "client")
        })
        .await?;
        Ok(())
    })
    .await
}

const GOOD: &str = r#"
[services.web]
balancer = "least-request"
"#;

/// An error on line 4: a retry count that is not a number.
const BROKEN: &str = r#"
[services.web.retries]
retry_on = ["reset"]
max_attempts = "three"
"#;

#[tokio::test]
async fn check_names_the_file_and_line_of_a_broken_policy_and_a_policy_not_applied() -> Result<()> {
    bounded(async {
        let cp = ControlPlane::start(&[])?;
        let dir = tempfile::tempdir()?;
        let (good, broken) = (dir.path().join("good.toml"), dir.path().join("broken.toml"));
        std::fs::write(&good, GOOD)?;
        std::fs::write(&broken, BROKEN)?;
        let (good, broken) = (good.display().to_string(), broken.display().to_string());

        let (ok, out, _) = check(&cp, &["--policy", &broken])?;
        assert!(!ok, "a broken policy passes:\n{out}");
        let want = format!(
            "✘ policy valid and applied: {broken}:4: field services.web.retries.max_attempts"
        );
        assert!(out.contains(&want), "want {want:?} in\n{out}");

        let (ok, out, _) = check(&cp, &["--policy", &good])?;
        assert!(!ok, "a policy not applied passes:\n{out}");
        assert!(
            out.contains(&format!(
                "✘ policy valid and applied: web: the live policy is not {good}'s"
            )),
            "{out}"
        );

        let (ok, _, err) = wfctl(&cp, &["policy", "apply", &good])?;
        assert!(ok, "{err}");
        let (ok, out, err) = check(&cp, &["--policy", &good])?;
        assert!(ok, "{out}{err}");
        assert!(
            out.contains(&format!(
                "✔ policy valid and applied: {good}: 1 services, as applied"
            )),
            "{out}"
        );
        Ok(())
    })
    .await
}

#[tokio::test]
async fn check_compares_the_replicas_trust_bundles_and_names_dns_names_that_do_not_resolve()
-> Result<()> {
    bounded(async {
        let cp = ControlPlane::start(&[])?;
        // Another control plane with a CA of its own: not a replica of
        // the same mesh, so its bundle differs.
        let other = ControlPlane::start(&[])?;
        let both = format!("{},{}", cp.http, other.http);
        let same = format!("{},{}", cp.http, cp.http);
        let (ok, out, err) = wfctl(&cp, &["check", "--http", &same])?;
        assert!(ok, "{out}{err}");
        assert!(
            out.contains("✔ replicas agree on the trust bundle: 2 replicas hand out the same bundle (1 root(s))"),
            "{out}"
        );
        let (ok, out, _) = wfctl(&cp, &["check", "--http", &both])?;
        assert!(!ok, "{out}");
        let want = format!(
            "✘ replicas agree on the trust bundle: {} hands out another bundle than {}",
            other.grpc, cp.grpc
        );
        assert!(out.contains(&want), "want {want:?} in\n{out}");

        // A client whose upstreams resolve with DNS, at a server that is not there.
        let (_client, _, _) = client(
            &cp,
            &[
                "--discovery",
                "dns",
                "--dns-server",
                "127.0.0.1:9",
                "--dns-allow-local",
            ],
        )?;
        wait_status(&cp, "the client reporting", Duration::from_secs(10), |s| {
            s.iter().any(|c| {
                c["service"] == "client"
                    && c["upstreams"]
                        .as_array()
                        .is_some_and(|u| u.iter().any(|u| u["discovery"] == "dns"))
            })
        })
        .await?;
        let (ok, out, _) = check(&cp, &[])?;
        assert!(!ok, "{out}");
        assert!(
            out.contains("✘ every DNS-mode name resolving: client/client-")
                && out.contains(": web resolves to nothing"),
            "{out}"
        );
        assert!(
            out.contains("- replicas agree on the trust bundle: skipped: one replica given"),
            "{out}"
        );
        Ok(())
    })
    .await
}
