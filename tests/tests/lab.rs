//! The labs users run: `wfctl lab compare` on loopback, and the Docker
//! compose lab where a Docker engine exists.

use std::time::Duration;

use anyhow::{Context, Result};
use wayfinder_tests::{bin, docker};

#[tokio::test]
async fn lab_compare_reports_every_way_with_numbers() -> Result<()> {
    let out = tempfile::tempdir()?;
    let run = tokio::process::Command::new(bin("wfctl"))
        .args(["lab", "compare", "--requests", "600", "--concurrency", "8"])
        .arg("--out")
        .arg(out.path())
        .kill_on_drop(true)
        .output();
    let run = tokio::time::timeout(Duration::from_secs(120), run)
        .await
        .context("lab compare within 120 s")??;
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert!(run.status.success(), "{stderr}");
    // Progress was shown for each way.
    assert!(
        stderr.contains("web-2 killed") && stderr.contains("100%"),
        "{stderr}"
    );
    // Where iptables works (root), web-1 vanishes; elsewhere that is said.
    let vanishes = wayfinder_cli::lab::compare::vanish_unavailable().is_none();
    if vanishes {
        assert!(stderr.contains("web-1 vanished"), "{stderr}");
    } else {
        assert!(stderr.contains("web-1 vanishing skipped"), "{stderr}");
    }
    let report = std::fs::read_to_string(out.path().join("report.md"))?;
    let rows: Vec<&str> = report
        .lines()
        .filter(|l| l.starts_with("| ") && l.contains(" of 600 "))
        .collect();
    assert_eq!(rows.len(), 4, "{report}");
    for way in [
        "DNS, resolved once",
        "DNS, resolved per request",
        "Wayfinder mesh",
    ] {
        assert!(
            rows.iter().any(|r| r.starts_with(&format!("| {way} |"))),
            "{way}: {report}"
        );
    }
    assert!(
        rows.iter()
            .any(|r| r.starts_with("| nginx upstream") || r.contains("(nginx not installed)")),
        "{report}"
    );
    for row in &rows {
        let cells: Vec<&str> = row.trim_matches('|').split('|').map(str::trim).collect();
        assert_eq!(cells.len(), 12, "{row}");
        // failed, p50, p90, p99 and the per-instance counts are numbers.
        for cell in &cells[1..9] {
            let number = cell.split_whitespace().next().unwrap_or("");
            assert!(number.parse::<f64>().is_ok(), "{cell:?} in {row}");
        }
        // Recovery times are numbers, an explicit "never", or "skipped"
        // where web-1 could not vanish.
        for cell in &cells[9..] {
            let first = cell.split_whitespace().next().unwrap_or("");
            assert!(
                first.parse::<f64>().is_ok()
                    || first == "never"
                    || (first == "skipped" && !vanishes),
                "{cell:?} in {row}"
            );
        }
        // The instances took answers that add up to the successes.
        let n = |i: usize| cells[i].parse::<usize>().unwrap_or(usize::MAX);
        let failed: usize = cells[1]
            .split_whitespace()
            .next()
            .and_then(|f| f.parse().ok())
            .unwrap_or(usize::MAX);
        assert_eq!(n(5) + n(6) + n(7) + n(8) + failed, 600, "{row}");
    }
    // The mesh routed around the dead instance: nothing failing at the end.
    let mesh = rows
        .iter()
        .find(|r| r.starts_with("| Wayfinder mesh |"))
        .context("mesh row")?;
    assert!(!mesh.contains("never"), "{mesh}");
    if vanishes {
        // The mesh stops sending to the vanished instance within seconds.
        let cells: Vec<&str> = mesh.trim_matches('|').split('|').map(str::trim).collect();
        let vanish: f64 = cells[10]
            .split_whitespace()
            .next()
            .and_then(|v| v.parse().ok())
            .with_context(|| format!("web-1 recovery in {mesh}"))?;
        assert!(vanish < 5000.0, "{mesh}");
    }
    // Resolving once never sees the new instance.
    let once = rows
        .iter()
        .find(|r| r.starts_with("| DNS, resolved once |"))
        .context("row")?;
    assert!(once.trim_end().ends_with("| never |"), "{once}");
    for plot in ["failures.svg", "latency.svg"] {
        let svg = std::fs::read_to_string(out.path().join(plot))?;
        assert!(
            svg.starts_with("<svg") && svg.contains("polyline"),
            "{plot}"
        );
    }
    Ok(())
}

/// Five clients calling `web` through the client's sidecar, each one call
/// after another for `run_for`; every call's status (0: no answer within
/// `limit`), answering instance and duration, in the order they started.
async fn five_clients(
    client: std::net::SocketAddr,
    run_for: Duration,
    limit: Duration,
) -> Vec<(u16, String, Duration)> {
    let begin = std::time::Instant::now();
    let workers: Vec<_> = (0..5)
        .map(|_| {
            tokio::spawn(async move {
                let end = std::time::Instant::now() + run_for;
                let mut calls = Vec::new();
                while std::time::Instant::now() < end {
                    let started = std::time::Instant::now();
                    let r =
                        wayfinder_tests::http_request_within(client, "GET", "/", "web", "", limit)
                            .await;
                    let at = started.duration_since(begin);
                    calls.push(match r {
                        Ok((status, _, body)) => (
                            at,
                            (
                                status,
                                wayfinder_tests::mesh::instance_of(&body),
                                started.elapsed(),
                            ),
                        ),
                        Err(e) => (at, (0, e.to_string(), started.elapsed())),
                    });
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
                calls
            })
        })
        .collect();
    let mut all = Vec::new();
    for w in workers {
        all.extend(w.await.unwrap_or_default());
    }
    all.sort_by_key(|(at, _)| *at);
    all.into_iter().map(|(_, call)| call).collect()
}

/// Runs `act` `after` into [`five_clients`]`(run_for, limit)`.
async fn five_clients_while(
    client: std::net::SocketAddr,
    run_for: Duration,
    limit: Duration,
    after: Duration,
    act: impl FnOnce() -> Result<()>,
) -> Result<Vec<(u16, String, Duration)>> {
    let load = tokio::spawn(five_clients(client, run_for, limit));
    tokio::time::sleep(after).await;
    act()?;
    Ok(load.await?)
}

#[tokio::test]
async fn docker_lab_survives_instances_that_vanish_or_freeze() -> Result<()> {
    let compose = match docker::compose_command() {
        Ok(c) => c,
        Err(why) => {
            eprintln!("skipped: {why}");
            return Ok(());
        }
    };
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let image = docker::wayfinder_image().await?;
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let dashboard = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let project = docker::Project {
        compose,
        name: format!("wft{}", std::process::id()),
        file: root.join("deploy/compose.yaml"),
        env: vec![
            ("WAYFINDER_IMAGE".into(), image.into()),
            ("WAYFINDER_CLIENT_PORT".into(), port.to_string()),
            ("WAYFINDER_DASHBOARD_PORT".into(), dashboard.to_string()),
            // Every instance keeps its turn: what happens to the calls
            // that reach a dead or frozen one is the point here.
            ("WAYFINDER_BALANCER".into(), "round-robin".into()),
            (
                "WAYFINDER_WEB_TOKEN".into(),
                format!("docker-lab-web-{}", std::process::id()),
            ),
            (
                "WAYFINDER_CLIENT_TOKEN".into(),
                format!("docker-lab-client-{}", std::process::id()),
            ),
        ],
    };
    let policy = |toml: &str| project.apply_policy("control", toml);
    let client = std::net::SocketAddr::from(([127, 0, 0, 1], port));
    // `policy` in force, five clients calling for `run_for`, `container`
    // paused (docker pause: TCP alive, no answer) a second in, and
    // unpaused at the end whatever happened.
    let paused = |toml: &'static str, container: &'static str, run_for: Duration| {
        let (policy, project) = (&policy, &project);
        async move {
            policy(toml)?;
            tokio::time::sleep(Duration::from_secs(1)).await;
            let calls = five_clients_while(
                client,
                run_for,
                run_for + Duration::from_secs(7),
                Duration::from_secs(1),
                || project.run(&["pause", container]).map(drop),
            )
            .await;
            project.run(&["unpause", container])?;
            calls
        }
    };
    let lab = async {
        project.run(&["up", "-d"])?;
        let get =
            || async move { wayfinder_tests::http_request(client, "GET", "/", "web", "").await };
        // Every web instance registered and reachable through the mesh.
        let deadline = std::time::Instant::now() + Duration::from_secs(40);
        let mut seen = std::collections::BTreeSet::new();
        while seen.len() < 3 {
            if std::time::Instant::now() > deadline {
                let logs = project.run(&["logs", "--no-color"]).unwrap_or_default();
                anyhow::bail!("only {seen:?} answered through the mesh\n{logs}");
            }
            if let Ok((200, _, body)) = get().await {
                seen.insert(wayfinder_tests::mesh::instance_of(&body));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert_eq!(
            seen.iter().map(String::as_str).collect::<Vec<_>>(),
            ["web-1", "web-2", "web-3"]
        );

        // web2's container is killed: its network namespace goes with it,
        // and its sidecar (a container of its own in that namespace) is
        // cut off without closing anything. Before, a call pinned to a
        // pooled connection there hung ~50 s.
        let calls = five_clients_while(
            client,
            Duration::from_secs(6),
            Duration::from_secs(20),
            Duration::from_secs(1),
            || project.run(&["kill", "web2"]).map(drop),
        )
        .await?;
        let failed: Vec<_> = calls.iter().filter(|c| c.0 != 200).collect();
        assert!(
            failed.is_empty(),
            "{} of {} failed: {failed:?}",
            failed.len(),
            calls.len()
        );
        let slowest = calls.iter().map(|c| c.2).max().unwrap_or_default();
        assert!(slowest < Duration::from_secs(3), "slowest call {slowest:?}");
        let late = &calls[calls.len() * 3 / 4..];
        assert!(late.iter().all(|c| c.1 != "web-2"), "web-2 answered late");

        // web1 freezes (docker pause: TCP alive, no answer) while a
        // per-try timeout is set: its calls move on, none fails.
        let calls = paused(
            "[services.web]\nbalancer = \"round-robin\"\n[services.web.timeouts]\nper_try = \"500ms\"\n",
            "web1",
            Duration::from_secs(5),
        )
        .await?;
        let failed: Vec<_> = calls.iter().filter(|c| c.0 != 200).collect();
        assert!(
            failed.is_empty(),
            "{} of {} failed: {failed:?}",
            failed.len(),
            calls.len()
        );

        // web3 freezes under the default policy: no call waits longer than
        // the default request timeout (15 s).
        let calls = paused(
            "[services.web]\nbalancer = \"round-robin\"\n",
            "web3",
            Duration::from_secs(18),
        )
        .await?;
        let slowest = calls.iter().map(|c| c.2).max().unwrap_or_default();
        assert!(
            slowest < Duration::from_millis(16_500),
            "slowest call {slowest:?}"
        );
        for c in calls.iter().filter(|c| c.0 != 200) {
            assert_eq!(c.0, 504, "only the request timeout fails a call: {c:?}");
        }
        // By the end, web3 is out of rotation (its sidecar's app check, or
        // ejection): the last calls all succeed.
        let tail = &calls[calls.len() * 9 / 10..];
        assert!(tail.iter().all(|c| c.0 == 200), "{tail:?}");
        Ok(())
    };
    tokio::time::timeout(Duration::from_secs(240), lab)
        .await
        .context("the Docker lab test within 4 min")?
}
