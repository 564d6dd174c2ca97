//! The labs users run: `wfctl lab compare` on loopback, and the Docker
//! compose lab where a Docker engine exists.

use std::time::Duration;

use anyhow::{Context, Result};
use wayfinder_tests::bin;

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
        assert_eq!(cells.len(), 11, "{row}");
        // failed, p50, p90, p99 and the per-instance counts are numbers.
        for cell in &cells[1..9] {
            let number = cell.split_whitespace().next().unwrap_or("");
            assert!(number.parse::<f64>().is_ok(), "{cell:?} in {row}");
        }
        // Recovery times are numbers or an explicit "never".
        for cell in &cells[9..] {
            let first = cell.split_whitespace().next().unwrap_or("");
            assert!(
                first.parse::<f64>().is_ok() || first == "never",
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
    assert!(!mesh.contains("failing at the end"), "{mesh}");
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

/// `docker-compose` (Debian's) or the `docker compose` plugin, when a Docker
/// engine answers; else why the Docker lab test skips.
fn compose_command() -> std::result::Result<Vec<String>, String> {
    let engine = std::process::Command::new("docker")
        .args(["info", "--format", "{{.ServerVersion}}"])
        .output()
        .map_err(|e| format!("no docker client: {e}"))?;
    if !engine.status.success() {
        return Err("no Docker engine answers `docker info`".into());
    }
    for cmd in [vec!["docker-compose"], vec!["docker", "compose"]] {
        let ok = std::process::Command::new(cmd[0])
            .args(&cmd[1..])
            .arg("version")
            .output()
            .is_ok_and(|o| o.status.success());
        if ok {
            return Ok(cmd.into_iter().map(String::from).collect());
        }
    }
    Err("neither docker-compose nor `docker compose` is installed".into())
}

/// A compose project, taken down (containers, network, volumes) on drop.
struct Project {
    compose: Vec<String>,
    name: String,
    file: std::path::PathBuf,
    env: Vec<(String, String)>,
}

impl Project {
    fn cmd(&self, args: &[&str]) -> std::process::Command {
        let mut c = std::process::Command::new(&self.compose[0]);
        c.args(&self.compose[1..])
            .args(["-p", &self.name, "-f"])
            .arg(&self.file)
            .args(args)
            .envs(self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())));
        c
    }

    fn run(&self, args: &[&str]) -> Result<String> {
        let out = self.cmd(args).output()?;
        anyhow::ensure!(
            out.status.success(),
            "compose {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(String::from_utf8_lossy(&out.stdout).to_string())
    }
}

impl Drop for Project {
    fn drop(&mut self) {
        let _ = self
            .cmd(&["down", "-v", "--remove-orphans", "-t", "2"])
            .output();
    }
}

#[tokio::test]
async fn docker_lab_meshes_web_instances_and_survives_one_dying() -> Result<()> {
    let compose = match compose_command() {
        Ok(c) => c,
        Err(why) => {
            eprintln!("skipped: {why}");
            return Ok(());
        }
    };
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let image = "wayfinder:test-lab";
    // Static binaries and the image (nothing pulled: FROM scratch).
    let build = tokio::process::Command::new("bash")
        .arg(root.join("deploy/docker-build.sh"))
        .env("WAYFINDER_PROFILE", "image")
        .env("WAYFINDER_IMAGE", image)
        .kill_on_drop(true)
        .output();
    let build = tokio::time::timeout(Duration::from_secs(900), build)
        .await
        .context("image build within 15 min")??;
    anyhow::ensure!(
        build.status.success(),
        "deploy/docker-build.sh: {}",
        String::from_utf8_lossy(&build.stderr)
    );

    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let dashboard = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let project = Project {
        compose,
        name: format!("wft{}", std::process::id()),
        file: root.join("deploy/compose.yaml"),
        env: vec![
            ("WAYFINDER_IMAGE".into(), image.into()),
            ("WAYFINDER_CLIENT_PORT".into(), port.to_string()),
            ("WAYFINDER_DASHBOARD_PORT".into(), dashboard.to_string()),
            // Where calls go is the point here, not which instance is fastest.
            ("WAYFINDER_BALANCER".into(), "round-robin".into()),
            (
                "WAYFINDER_JOIN_TOKEN".into(),
                format!("docker-lab-test-{}", std::process::id()),
            ),
        ],
    };
    wayfinder_tests::bounded(async {
        project.run(&["up", "-d"])?;
        let client = std::net::SocketAddr::from(([127, 0, 0, 1], port));
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

        // Traffic keeps flowing while web2 (app and sidecar) is killed.
        let load = tokio::spawn(async move {
            let mut results = Vec::new();
            for _ in 0..200 {
                let r = wayfinder_tests::http_request(client, "GET", "/", "web", "").await;
                results.push(match r {
                    Ok((status, _, body)) => (status, wayfinder_tests::mesh::instance_of(&body)),
                    Err(e) => (0, e.to_string()),
                });
                tokio::time::sleep(Duration::from_millis(15)).await;
            }
            results
        });
        tokio::time::sleep(Duration::from_millis(800)).await;
        project.run(&["kill", "web2", "web2-proxy"])?;
        let results = load.await?;
        let failed: Vec<_> = results.iter().filter(|(s, _)| *s != 200).collect();
        assert!(
            failed.is_empty(),
            "{} of 200 failed: {failed:?}",
            failed.len()
        );
        let after: std::collections::BTreeSet<_> =
            results[150..].iter().map(|(_, i)| i.as_str()).collect();
        assert!(!after.contains("web-2"), "web-2 still answering: {after:?}");
        Ok(())
    })
    .await
}
