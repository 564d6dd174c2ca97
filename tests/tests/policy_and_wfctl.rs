//! Policy files (start-up, reload, wfctl apply) and the wfctl commands,
//! against the real wf-control and wfctl binaries.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use futures::StreamExt;
use tonic::Code;
use wayfinder_proto::v1::{
    ApplyPolicyRequest, GetPolicyRequest, RetryPolicy, ServicePolicy, ServiceWatch, WatchRequest,
    admin_client::AdminClient, discovery_client::DiscoveryClient, watch_event::Kind,
};
use wayfinder_tests::{ControlPlane, bin, bounded, wfctl};

const GOOD: &str = "[services.web]\nbalancer = \"least-request\"\n\n[services.web.retries]\nmax_attempts = 3\nbudget_ratio = 0.2\n";
const BAD: &str = "[services.web]\nbalancer = \"least-request\"\n\n[services.web.retries]\nmax_attempts = 3\nbudget_ratio = 1.5\n";

async fn policy(cp: &ControlPlane, service: &str) -> Result<ServicePolicy> {
    Ok(AdminClient::new(cp.channel().await?)
        .get_policy(GetPolicyRequest {
            service: service.into(),
        })
        .await?
        .into_inner())
}

#[test]
fn an_invalid_policy_file_stops_start_up_naming_file_line_and_field() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let file = dir.path().join("policy.toml");
    std::fs::write(&file, BAD)?;
    let out = Command::new(bin("wf-control"))
        .args([
            "--grpc",
            "127.0.0.1:0",
            "--http",
            "127.0.0.1:0",
            "--data-dir",
        ])
        .arg(dir.path().join("data"))
        .arg("--policy")
        .arg(&file)
        .stdin(Stdio::null())
        .output()?;
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    let want = format!(
        "{}:6: field services.web.retries.budget_ratio:",
        file.display()
    );
    assert!(
        err.contains(&want),
        "stderr does not name file, line and field:\n{err}"
    );
    Ok(())
}

#[test]
fn a_log_filter_that_does_not_parse_stops_both_servers_naming_the_variable() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let runs = [
        (
            "wf-control",
            vec!["--grpc", "127.0.0.1:0", "--http", "127.0.0.1:0"],
        ),
        (
            "wf-proxy",
            vec![
                "--control-plane",
                "http://127.0.0.1:9",
                "--admin",
                "127.0.0.1:0",
            ],
        ),
    ];
    for (name, args) in runs {
        let mut cmd = Command::new(bin(name));
        cmd.args(&args);
        if name == "wf-control" {
            cmd.arg("--data-dir").arg(dir.path().join("data"));
        }
        let mut child = cmd
            .env("WAYFINDER_LOG", "wayfinder_proxy=loud")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()?;
        // A server that accepted the filter would run on: bounded wait.
        let deadline = Instant::now() + Duration::from_secs(10);
        let status = loop {
            if let Some(st) = child.try_wait()? {
                break Some(st);
            }
            if Instant::now() > deadline {
                child.kill()?;
                child.wait()?;
                break None;
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        let mut err = String::new();
        if let Some(mut e) = child.stderr.take() {
            std::io::Read::read_to_string(&mut e, &mut err)?;
        }
        assert!(
            status.is_some_and(|s| !s.success()),
            "{name} ran with a bad filter:\n{err}"
        );
        assert!(
            err.contains("WAYFINDER_LOG=\"wayfinder_proxy=loud\""),
            "{name} does not name the variable:\n{err}"
        );
    }
    Ok(())
}

#[tokio::test]
async fn policy_file_reload_applies_valid_changes_and_keeps_the_policy_on_errors() -> Result<()> {
    bounded(async {
        let dir = tempfile::tempdir()?;
        let file = dir.path().join("policy.toml");
        std::fs::write(&file, GOOD)?;
        let cp = ControlPlane::start(&["--policy", &file.to_string_lossy()])?;
        let mut w = DiscoveryClient::new(cp.channel().await?)
            .watch(WatchRequest {
                services: vec![ServiceWatch {
                    name: "web".into(),
                    last_version: 0,
                }],
                node: "test".into(),
                ..Default::default()
            })
            .await?
            .into_inner();
        let first = w.next().await.context("snapshot")??;
        match first.kind {
            Some(Kind::Snapshot(s)) => {
                assert_eq!(
                    s.policy.and_then(|p| p.retries).map(|r| r.max_attempts),
                    Some(3)
                )
            }
            other => bail!("expected snapshot, got {other:?}"),
        }

        // The policy applied at start-up is written to the store, too.
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let (_, m) = cp.get("/metrics").await?;
            if wayfinder_tests::metric(&m, "wayfinder_control_store_writes_total").unwrap_or(0.0)
                >= 1.0
            {
                break;
            }
            if Instant::now() > deadline {
                bail!("the start-up policy was never written:\n{m}");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }

        // An invalid edit is refused and logged; the policy in force stays.
        std::fs::write(&file, BAD)?;
        let deadline = Instant::now() + Duration::from_secs(5);
        while !cp.log_text().contains("policy file refused") {
            if Instant::now() > deadline {
                bail!("no refusal logged:\n{}", cp.log_text());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert!(
            cp.log_text()
                .contains("policy.toml:6: field services.web.retries.budget_ratio")
        );
        let p = policy(&cp, "web").await?;
        assert_eq!(p.retries.map(|r| r.budget_ratio), Some(0.2));

        // A valid edit reaches watchers as a policy delta.
        std::fs::write(&file, GOOD.replace("max_attempts = 3", "max_attempts = 5"))?;
        let e = tokio::time::timeout(Duration::from_secs(5), w.next())
            .await
            .context("policy delta in time")?
            .context("stream open")??;
        match e.kind {
            Some(Kind::Delta(d)) => {
                assert_eq!(
                    d.policy.and_then(|p| p.retries).map(|r| r.max_attempts),
                    Some(5)
                )
            }
            other => bail!("expected delta, got {other:?}"),
        }

        // Removing the service from the file removes the policy it gave.
        std::fs::write(&file, "")?;
        let e = tokio::time::timeout(Duration::from_secs(5), w.next())
            .await
            .context("removal in time")?
            .context("stream open")??;
        assert!(matches!(e.kind, Some(Kind::Delta(d)) if d.policy_removed));
        Ok(())
    })
    .await
}

#[tokio::test]
async fn invalid_policies_are_refused_by_wfctl_and_by_the_server() -> Result<()> {
    bounded(async {
        let cp = ControlPlane::start(&[])?;
        let dir = tempfile::tempdir()?;
        let file = dir.path().join("bad.toml");
        std::fs::write(&file, BAD)?;
        let (ok, _, err) = wfctl(&cp, &["policy", "apply", &file.to_string_lossy()])?;
        assert!(!ok);
        assert!(
            err.contains(&format!(
                "{}:6: field services.web.retries.budget_ratio",
                file.display()
            )),
            "{err}"
        );
        let typo = dir.path().join("typo.toml");
        std::fs::write(&typo, "[services.web.timeouts]\nconect = \"1s\"\n")?;
        let (ok, _, err) = wfctl(&cp, &["policy", "apply", &typo.to_string_lossy()])?;
        assert!(!ok);
        assert!(
            err.contains("typo.toml:2: field services.web.timeouts.conect: unknown field"),
            "{err}"
        );

        // The server checks too (a client that skips local validation).
        let mut admin = AdminClient::new(cp.channel().await?);
        let err = admin
            .apply_policy(ApplyPolicyRequest {
                policies: vec![ServicePolicy {
                    service: "web".into(),
                    retries: Some(RetryPolicy {
                        budget_ratio: 3.0,
                        ..Default::default()
                    }),
                    ..Default::default()
                }],
            })
            .await
            .expect_err("refused");
        assert_eq!(err.code(), Code::InvalidArgument);
        assert!(
            err.message().contains("services.web.retries.budget_ratio"),
            "{}",
            err.message()
        );
        let err = admin
            .apply_policy(ApplyPolicyRequest {
                policies: vec![ServicePolicy {
                    service: "web".into(),
                    balancer: 42,
                    ..Default::default()
                }],
            })
            .await
            .expect_err("refused");
        assert_eq!(err.code(), Code::InvalidArgument);
        assert_eq!(
            admin
                .get_policy(GetPolicyRequest {
                    service: "web".into()
                })
                .await
                .expect_err("none")
                .code(),
            Code::NotFound
        );

        // A good file applies, and `policy get` prints it back as TOML.
        let good = dir.path().join("good.toml");
        std::fs::write(&good, GOOD)?;
        let (ok, out, err) = wfctl(&cp, &["policy", "apply", &good.to_string_lossy()])?;
        assert!(ok, "{err}");
        assert!(out.contains("policy applied to web"), "{out}");
        let (ok, out, _) = wfctl(&cp, &["policy", "get", "web"])?;
        assert!(ok);
        assert!(
            out.contains("[services.web.retries]") && out.contains("budget_ratio = 0.2"),
            "{out}"
        );
        let (ok, out, _) = wfctl(&cp, &["-o", "json", "policy", "get", "web"])?;
        assert!(ok);
        let v: serde_json::Value = serde_json::from_str(out.trim())?;
        assert_eq!(v["policy"]["balancer"], "least-request");
        Ok(())
    })
    .await
}

#[tokio::test]
async fn wfctl_registers_lists_and_watches() -> Result<()> {
    bounded(async {
        let cp = ControlPlane::start(&[])?;
        // `watch` prints each update as it arrives, one JSON object per line.
        let mut watch = Command::new(bin("wfctl"))
            .env("WAYFINDER_CONTROL_PLANE", cp.url())
            .env("WAYFINDER_OUTPUT", "json")
            .args(["watch", "web", "--count", "3"])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()?;
        let stdout = watch.stdout.take().context("stdout")?;
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                let _ = tx.send(line);
            }
        });
        let first = rx.recv_timeout(Duration::from_secs(10))?;
        let v: serde_json::Value = serde_json::from_str(&first)?;
        assert_eq!(
            (v["kind"].as_str(), v["update"]["exists"].as_bool()),
            (Some("snapshot"), Some(false))
        );

        let (ok, out, err) = wfctl(&cp, &["register", "web", "127.0.0.1:9001", "--weight", "7"])?;
        assert!(ok, "{err}");
        assert!(out.contains("registered web 127.0.0.1:9001"), "{out}");
        let added: serde_json::Value =
            serde_json::from_str(&rx.recv_timeout(Duration::from_secs(5))?)?;
        assert_eq!(added["update"]["added"][0]["weight"], 7);
        assert_eq!(added["update"]["added"][0]["port"], 9001);

        let (ok, out, _) = wfctl(&cp, &["-o", "json", "endpoints", "web"])?;
        assert!(ok);
        let v: serde_json::Value = serde_json::from_str(out.trim())?;
        assert_eq!(v["endpoints"][0]["address"], "127.0.0.1");
        let (ok, out, _) = wfctl(&cp, &["services"])?;
        assert!(ok);
        assert!(out.contains("SERVICE") && out.contains("web"), "{out}");

        let (ok, _, err) = wfctl(&cp, &["deregister", "web", "127.0.0.1:9001"])?;
        assert!(ok, "{err}");
        let removed: serde_json::Value =
            serde_json::from_str(&rx.recv_timeout(Duration::from_secs(5))?)?;
        assert_eq!(removed["update"]["removed"][0], "127.0.0.1:9001");
        let status = watch.wait()?;
        assert!(
            status.success(),
            "watch --count 3 exits 0 after three events"
        );

        // Errors are clear and exit non-zero.
        let (ok, _, err) = wfctl(&cp, &["deregister", "web", "127.0.0.1:9001"])?;
        assert!(!ok && err.contains("has no endpoint"), "{err}");
        let (ok, _, err) = wfctl(&cp, &["register", "Bad_Name", "127.0.0.1:1"])?;
        assert!(!ok && err.contains("service name"), "{err}");
        let (ok, _, err) = wfctl(&cp, &["endpoints", "nope"])?;
        assert!(!ok && err.contains("does not exist"), "{err}");
        let out = Command::new(bin("wfctl"))
            .env("WAYFINDER_CONTROL_PLANE", "http://127.0.0.1:1")
            .args(["services"])
            .output()?;
        assert!(!out.status.success());
        assert!(String::from_utf8_lossy(&out.stderr).contains("cannot reach the control plane"));
        Ok(())
    })
    .await
}
