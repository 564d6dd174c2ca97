//! The labs users run: `wfctl lab compare` on loopback, and the Docker
//! compose lab where a Docker engine exists.

use std::time::Duration;

use anyhow::{Context, Result};
use wayfinder_tests::{bin, docker};

/// A short scenario with every kind of event, for the loopback lab.
const EVERY_EVENT: &str = r#"
duration = "24s"
rate = 25
timeout = "1s"
[[event]]
at = "10%"
action = "kill"
target = "web2"
[[event]]
at = "20%"
action = "restart"
target = "web2"
[[event]]
at = "32%"
action = "pause"
target = "web1"
[[event]]
at = "42%"
action = "resume"
target = "web1"
[[event]]
at = "52%"
action = "slow"
target = "web3"
delay = "300ms"
[[event]]
at = "60%"
action = "resume"
target = "web3"
[[event]]
at = "65%"
action = "unhealthy"
target = "web3"
[[event]]
at = "72%"
action = "add"
target = "web4"
[[event]]
at = "80%"
action = "control-down"
[[event]]
at = "90%"
action = "control-up"
"#;

/// The cells of the markdown table row starting with `| {first} |`.
fn row<'a>(report: &'a str, first: &str) -> Option<Vec<&'a str>> {
    report
        .lines()
        .find(|l| l.starts_with(&format!("| {first} |")))
        .map(|l| {
            l.trim()
                .trim_matches('|')
                .split('|')
                .map(str::trim)
                .collect()
        })
}

/// A way in an event's window: failed requests, and until they stopped
/// failing (ms; `None`: never).
type Window = (usize, Option<f64>);

/// `errors · recovery` of a cell: (errors, Some(ms) or None for never).
fn window(cell: &str) -> Window {
    let mut parts = cell.split(" · ");
    let errors = parts
        .next()
        .and_then(|e| e.parse().ok())
        .unwrap_or(usize::MAX);
    let recovery = match parts.next() {
        None => Some(0.0),
        Some("never") => None,
        Some(t) => {
            let (v, unit) = t.split_once(' ').unwrap_or((t, ""));
            let v: f64 = v.parse().unwrap_or(f64::NAN);
            Some(if unit == "s" { v * 1000.0 } else { v })
        }
    };
    (errors, recovery)
}

/// The report's ways, in its order.
const WAYS: [&str; 7] = [
    "DNS, resolved once",
    "DNS, per request",
    "DNS, cached for its TTL (Docker: 600 s)",
    "DNS, cached 30 s",
    "nginx upstream",
    "Wayfinder mesh",
    "Wayfinder mesh, hedged at p95",
];

/// The columns of the plain and the hedged mesh in [`WAYS`].
const MESH: usize = 5;
const MESH_HEDGED: usize = 6;

/// Each event's row of the report, `(errors, recovery)` per way; every
/// cell must be numbers or "never".
fn event_table(report: &str, events: &[&str]) -> Result<Vec<Vec<Window>>> {
    let mut rows = report
        .lines()
        .filter(|l| l.starts_with("| ") && l.contains(" s | "));
    let mut table = Vec::new();
    for event in events {
        let line = rows
            .find(|l| l.contains(&format!(" | {event} |")))
            .with_context(|| format!("no row for {event} (in order): {report}"))?;
        let cells: Vec<&str> = line
            .trim()
            .trim_matches('|')
            .split('|')
            .map(str::trim)
            .collect();
        anyhow::ensure!(cells.len() == 2 + WAYS.len(), "{line}");
        let windows: Vec<Window> = cells[2..].iter().map(|c| window(c)).collect();
        for (cell, w) in cells[2..].iter().zip(&windows) {
            anyhow::ensure!(
                w.0 != usize::MAX && w.1.is_none_or(|ms| ms.is_finite()),
                "{cell:?} in {line}"
            );
        }
        table.push(windows);
    }
    Ok(table)
}

/// The mesh's share table: each phase's label and its cell per instance
/// (`40%`, or `·` for none).
fn mesh_shares(report: &str) -> Result<Vec<(String, std::collections::BTreeMap<String, String>)>> {
    let table = report
        .split("### Wayfinder mesh\n")
        .nth(1)
        .context("the mesh's share table")?;
    let mut lines = table.lines().filter(|l| l.starts_with("| "));
    let header: Vec<String> = lines
        .next()
        .context("header")?
        .split('|')
        .map(|c| c.trim().to_string())
        .collect();
    Ok(lines
        .skip_while(|l| l.starts_with("|---"))
        .take_while(|l| !l.starts_with("| phase"))
        .map(|l| {
            let cells: Vec<&str> = l.split('|').map(str::trim).collect();
            let row = header
                .iter()
                .zip(&cells)
                .skip(2)
                .filter(|(h, _)| !h.is_empty())
                .map(|(h, c)| (h.clone(), c.to_string()))
                .collect();
            (cells.get(1).copied().unwrap_or("").to_string(), row)
        })
        .collect())
}

/// Whether `cell` of a share table says the instance took calls.
fn took_calls(cell: Option<&String>) -> bool {
    cell.is_some_and(|c| c != "·" && c != "0%")
}

#[tokio::test]
async fn lab_compare_runs_a_scenario_file_on_loopback_and_reports_every_way_and_event() -> Result<()>
{
    let dir = tempfile::tempdir()?;
    let scenario = dir.path().join("every-event.toml");
    std::fs::write(&scenario, EVERY_EVENT)?;
    let out = dir.path().join("report");
    let run = tokio::process::Command::new(bin("wfctl"))
        .args(["lab", "compare", "--scenario"])
        .arg(&scenario)
        .arg("--out")
        .arg(&out)
        .kill_on_drop(true)
        .output();
    let run = tokio::time::timeout(Duration::from_secs(100), run)
        .await
        .context("lab compare within 100 s")??;
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert!(run.status.success(), "{stderr}");
    // Progress: each event as it happens, and the share of the run.
    for line in [
        "web2 killed",
        "web4 added",
        "control plane up",
        " 50% ",
        "100% ",
    ] {
        assert!(stderr.contains(line), "no {line:?} in {stderr}");
    }
    assert!(!stderr.contains("FAILED"), "an event failed: {stderr}");
    let report = std::fs::read_to_string(out.join("report.md"))?;
    for way in WAYS {
        let cells = row(&report, way).with_context(|| format!("no totals row {way}: {report}"))?;
        assert_eq!(cells.len(), 6, "{cells:?}");
        assert_eq!(cells[1], "600", "{way}: 25/s for 24 s");
    }
    let events = [
        "web2 killed",
        "web2 restarted (new IP)",
        "web1 paused",
        "web1 resumed",
        "web3 slow (+300 ms)",
        "web3 resumed",
        "web3 unhealthy",
        "web4 added",
        "control plane down",
        "control plane up",
    ];
    let table = event_table(&report, &events)?;
    let mesh = MESH;
    // Resolved once, the dead address stays: still failing when web2 is
    // back elsewhere.
    assert_eq!(table[1][0].1, None, "DNS once after the restart: {report}");
    // The mesh: around the dead, the restarted and the frozen instance
    // within seconds, nothing failing at the end of those windows.
    for (i, event) in events.iter().enumerate().take(3) {
        let (_, recovered) = table[i][mesh];
        assert!(
            recovered.is_some_and(|ms| ms < 3000.0),
            "mesh after {event}: {report}"
        );
    }
    // Without its control plane, the mesh keeps serving from what it knows.
    assert_eq!(
        table[8][mesh].0, 0,
        "mesh with the control plane down: {report}"
    );
    // Hedged, the mesh fares no worse around the dead and the frozen
    // instance, and keeps serving without its control plane too.
    for (i, event) in events.iter().enumerate().take(3) {
        let (_, recovered) = table[i][MESH_HEDGED];
        assert!(
            recovered.is_some_and(|ms| ms < 3000.0),
            "hedged mesh after {event}: {report}"
        );
    }
    assert_eq!(
        table[8][MESH_HEDGED].0, 0,
        "hedged mesh with the control plane down: {report}"
    );
    assert!(
        report.contains("route `lab-mesh-hedging`"),
        "the report says how the hedged way is set up: {report}"
    );
    // Its slow first tries got copies (a pause and a slowdown are in the
    // scenario): the sidecar said so in `x-wayfinder-attempts`.
    let copies: u64 = report
        .split("Wayfinder mesh, hedged at p95: ")
        .nth(1)
        .and_then(|r| r.split(' ').next()?.parse().ok())
        .with_context(|| format!("no extra tries of the hedged way: {report}"))?;
    assert!(copies > 0, "the hedged way was never hedged: {report}");
    // web4 took calls through the mesh once added; web3, unhealthy, none.
    let shares = mesh_shares(&report)?;
    let (_, after_add) = shares
        .iter()
        .find(|(phase, _)| phase == "after web4 added")
        .with_context(|| format!("no phase after web4 added: {shares:?}"))?;
    assert!(took_calls(after_add.get("web4")), "{after_add:?}");
    assert!(
        !took_calls(after_add.get("web3")),
        "unhealthy web3 still took calls: {after_add:?}"
    );
    for plot in ["failures.svg", "p99.svg", "latency.svg"] {
        let svg = std::fs::read_to_string(out.join(plot))?;
        assert!(
            svg.starts_with("<svg") && svg.contains("polyline"),
            "{plot}"
        );
        if plot != "latency.svg" {
            assert!(
                svg.contains(">web1 paused</text>"),
                "{plot} has no event lines"
            );
        }
    }
    Ok(())
}

#[tokio::test]
async fn lab_compare_refuses_a_bad_scenario_before_anything_starts() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let classic = root.join("examples/classic-lab/compose.yaml");
    // The classic lab without the labels that say how to make a web unhealthy.
    let unlabelled = dir.path().join("unlabelled.yaml");
    std::fs::write(
        &unlabelled,
        std::fs::read_to_string(&classic)?
            .lines()
            .filter(|l| !l.contains("wayfinder.io/") && !l.trim_start().starts_with("labels:"))
            .collect::<Vec<_>>()
            .join("\n"),
    )?;
    let kill = |target: &str| {
        format!(
            "duration = \"30s\"\n[[event]]\nat = \"50%\"\naction = \"kill\"\ntarget = \"{target}\"\n"
        )
    };
    for (text, compose, want) in [
        (
            "duration = \"30s\"\n[[event]]\nat = \"50%\"\naction = \"explode\"\ntarget = \"web1\"\n".to_string(),
            None,
            ":4: field event[0].action: \"explode\" is not an action",
        ),
        (kill("web9"), None, ":5: field event[0].target: the lab has no instance \"web9\""),
        ("duration = 30\n".into(), None, ":1: field duration: invalid type"),
        // On Docker, checked against the compose file, still before anything
        // starts (no engine needed to see it refused).
        (
            kill("web9"),
            Some(&classic),
            ":5: field event[0].target: the lab has no instance \"web9\" (it has web1, web2, web3)",
        ),
        (
            "duration = \"30s\"\n[[event]]\nat = \"50%\"\naction = \"unhealthy\"\ntarget = \"web2\"\n".into(),
            Some(&unlabelled),
            ":4: field event[0].action: on Docker, unhealthy runs the command in the label wayfinder.io/unhealthy",
        ),
    ] {
        let file = dir.path().join("bad.toml");
        std::fs::write(&file, text)?;
        let mut cmd = tokio::process::Command::new(bin("wfctl"));
        cmd.args(["lab", "compare", "--scenario"])
            .arg(&file)
            .arg("--out")
            .arg(dir.path().join("out"))
            .args(["--project", "wftbad"])
            .kill_on_drop(true);
        if let Some(c) = compose {
            cmd.arg("--compose").arg(c);
        }
        let run = tokio::time::timeout(Duration::from_secs(20), cmd.output()).await??;
        let stderr = String::from_utf8_lossy(&run.stderr);
        assert_eq!(run.status.code(), Some(1), "{stderr}");
        assert!(
            stderr.contains(&format!("{}{want}", file.display())),
            "{want} not in {stderr}"
        );
        assert!(!stderr.contains("== "), "it started: {stderr}");
        assert!(!dir.path().join("out/report.md").exists(), "it wrote a report");
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

/// Removes what a compare run of `project` may have left (its compose
/// project's containers, network and volumes; its loads and placeholders),
/// even when the test fails or wfctl was killed.
struct Sweep(String);

impl Sweep {
    /// The containers left of the run.
    fn left(&self) -> Vec<String> {
        let mut ids = Vec::new();
        for filter in [
            format!("label=com.docker.compose.project={}", self.0),
            format!("name=^{}-", self.0),
        ] {
            if let Ok(o) = std::process::Command::new("docker")
                .args(["ps", "-aq", "--filter", &filter])
                .output()
            {
                ids.extend(
                    String::from_utf8_lossy(&o.stdout)
                        .split_whitespace()
                        .map(String::from),
                );
            }
        }
        ids
    }
}

impl Drop for Sweep {
    fn drop(&mut self) {
        let ids = self.left();
        if !ids.is_empty() {
            let _ = std::process::Command::new("docker")
                .args(["rm", "-f"])
                .args(&ids)
                .output();
        }
        let p = &self.0;
        let _ = std::process::Command::new("docker")
            .args(["network", "rm", &format!("{p}_default")])
            .output();
        let _ = std::process::Command::new("docker")
            .args([
                "volume",
                "rm",
                &format!("{p}_wayfinder-control-data"),
                &format!("{p}_wayfinder-trust"),
            ])
            .output();
    }
}

#[tokio::test]
async fn docker_lab_compare_runs_the_default_scenario_on_the_classic_lab() -> Result<()> {
    if let Err(why) = docker::compose_command() {
        eprintln!("skipped: {why}");
        return Ok(());
    }
    let image = docker::wayfinder_image().await?;
    docker::lab_images().await?;
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let out = tempfile::tempdir()?;
    let sweep = Sweep(format!("wftc{}", std::process::id()));
    let started = std::time::Instant::now();
    let run = tokio::process::Command::new(bin("wfctl"))
        .args(["lab", "compare", "--compose"])
        .arg(root.join("examples/classic-lab/compose.yaml"))
        .args(["--project", &sweep.0, "--image", image, "--out"])
        .arg(out.path())
        .kill_on_drop(true)
        .output();
    let run = tokio::time::timeout(Duration::from_secs(300), run)
        .await
        .context("lab compare --compose within 300 s")??;
    let took = started.elapsed();
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert!(run.status.success(), "{stderr}");
    assert!(
        sweep.left().is_empty(),
        "containers left: {:?}",
        sweep.left()
    );
    for kind in ["network", "volume"] {
        let listed = std::process::Command::new("docker")
            .args([kind, "ls", "-q", "--filter", &format!("name={}_", sweep.0)])
            .output()?;
        let left = String::from_utf8_lossy(&listed.stdout).trim().to_string();
        assert!(left.is_empty(), "{kind}s left: {left}");
    }
    assert!(
        !out.path().join("lab.wayfinder").exists(),
        "the run's join tokens were left behind"
    );
    // The default scenario on two cores, images aside, in under 3 minutes.
    assert!(took < Duration::from_secs(180), "took {took:?}: {stderr}");
    assert!(
        !stderr.contains("FAILED") && !stderr.contains("did not come back"),
        "{stderr}"
    );
    // Restarts come back on new addresses; the old ones are held.
    for web in ["web2", "web1", "web3"] {
        let was = stderr
            .lines()
            .find_map(|l| {
                l.trim()
                    .strip_prefix(&format!("{web} was at "))?
                    .split(';')
                    .next()
            })
            .with_context(|| format!("{web}'s old address: {stderr}"))?;
        let now = stderr
            .lines()
            .filter_map(|l| l.trim().strip_prefix(&format!("{web} is up at ")))
            .next_back()
            .with_context(|| format!("{web}'s new address: {stderr}"))?;
        assert!(
            !was.is_empty() && !now.is_empty() && was != now,
            "{web}: {was} → {now}"
        );
    }
    let report = std::fs::read_to_string(out.path().join("report.md"))?;
    for way in WAYS {
        let cells = row(&report, way).with_context(|| format!("no totals row {way}: {report}"))?;
        assert_eq!(cells[1], "2400", "{way}: 40/s for 60 s");
    }
    let events = [
        "web2 killed",
        "web2 restarted (new IP)",
        "web1 paused",
        "web1 resumed",
        "web3 slow (+200 ms)",
        "web3 resumed",
        "web3 unhealthy",
        "web3 resumed",
        "web4 added",
        "web1 restarted (new IP)",
        "web3 restarted (new IP)",
        "control plane down",
        "control plane up",
    ];
    let table = event_table(&report, &events)?;
    let (once, nginx, mesh) = (0, 4, MESH);
    // Resolved once, the dead address stays in the answer: still failing
    // when web2 is back elsewhere, and after each restart.
    for i in [1, 9, 10] {
        assert_eq!(
            table[i][once].1, None,
            "DNS once after {}: {report}",
            events[i]
        );
    }
    // nginx's static upstream: once all three webs moved, every call fails.
    for i in [10, 11, 12] {
        assert_eq!(
            table[i][nginx].1, None,
            "nginx after {}: {report}",
            events[i]
        );
        assert!(table[i][nginx].0 > 0, "nginx after {}: {report}", events[i]);
    }
    // The mesh: within a second of every restart.
    for i in [1, 9, 10] {
        assert!(
            table[i][mesh].1.is_some_and(|ms| ms < 1000.0),
            "mesh after {}: {report}",
            events[i]
        );
    }
    // With its control plane down, the mesh fails nothing.
    assert_eq!(
        table[11][mesh].0, 0,
        "mesh with the control plane down: {report}"
    );
    // And it found the restarted instances at their new addresses, and
    // the added one.
    let shares = mesh_shares(&report)?;
    let web4 = shares
        .iter()
        .skip_while(|(phase, _)| phase != "after web4 added")
        .any(|(_, row)| took_calls(row.get("web4")));
    assert!(web4, "web4 took no mesh calls once added: {shares:?}");
    // A pause fails calls of a way that kept web1's address.
    assert!(
        table[2][once].0 > 0,
        "DNS once during web1's pause: {report}"
    );
    for instance in ["web1", "web2", "web3"] {
        let found = shares
            .iter()
            .filter(|(phase, _)| phase.starts_with("after control plane"))
            .any(|(_, row)| took_calls(row.get(instance)));
        assert!(
            found,
            "{instance} took no mesh calls at its new address: {shares:?}"
        );
    }
    for plot in ["failures.svg", "p99.svg", "latency.svg"] {
        let svg = std::fs::read_to_string(out.path().join(plot))?;
        assert!(
            svg.starts_with("<svg") && svg.contains("polyline"),
            "{plot}"
        );
    }
    Ok(())
}
