//! Transparent interception in network namespaces the test creates: apps
//! dial plain IPs, iptables (`wf-proxy init`) hands the connections to the
//! sidecar, and the sidecar balances them over the whole service.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use anyhow::{Result, bail};
use wayfinder_tests::mesh::instance_of;
use wayfinder_tests::netns::{Lab, run, unavailable};
use wayfinder_tests::{Process, bin, bounded};

const CP: &str = "10.77.0.1:15010";

/// wf-control in `lab`'s hub on [`CP`], plaintext, its data in `data`.
fn control_plane(lab: &Lab, data: &std::path::Path) -> Result<Process> {
    Process::start_in(
        &Lab::exec(&lab.hub),
        "wf-control",
        &[
            "--grpc",
            CP,
            "--http",
            "127.0.0.1:0",
            "--data-dir",
            &data.to_string_lossy(),
            "--insecure",
        ],
        "wf-control serving",
    )
}

/// `curl` run by an app in `ns`: (status, body).
fn curl(ns: &str, url: &str) -> Result<(u16, String)> {
    let out = std::process::Command::new("ip")
        .args([
            "netns",
            "exec",
            ns,
            "curl",
            "-s",
            "-m",
            "5",
            "-w",
            "\n%{http_code}",
            url,
        ])
        .output()?;
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    let (body, code) = text.rsplit_once('\n').unwrap_or(("", "0"));
    Ok((code.trim().parse().unwrap_or(0), body.to_string()))
}

#[tokio::test]
async fn calls_to_one_instance_ip_spread_over_the_service_and_others_pass_through() -> Result<()> {
    if let Some(why) = unavailable() {
        eprintln!("skipped: {why}");
        return Ok(());
    }
    bounded(async {
        let mut lab = Lab::new("tp")?;
        let data = tempfile::tempdir()?;
        let hub = Lab::exec(&lab.hub);
        let _cp = control_plane(&lab, data.path())?;
        // Not in the mesh: a server the client reaches untouched.
        let _outside = Process::start_in(
            &hub,
            "lab-app",
            &["--listen", "10.77.0.1:9999", "--name", "outside"],
            "listening on",
        )?;
        let mut webs = Vec::new();
        for i in 1..=3 {
            webs.push(lab.web(i, &format!("http://{CP}"), &["--health-interval", "200ms"])?);
        }

        let client = lab.node("client", 50)?;
        let init = bin("wf-proxy").to_string_lossy().to_string();
        run(&["ip", "netns", "exec", &client, &init, "init", "--proxy-uid", "1337", "--control-plane", CP])?;
        let rules = run(&["ip", "netns", "exec", &client, "iptables", "-t", "nat", "-S"])?;
        assert!(rules.contains("WAYFINDER_OUTPUT"), "{rules}");
        assert!(rules.contains("-d 10.77.0.1/32 -p tcp -m tcp --dport 15010 -j RETURN"), "{rules}");
        let url = format!("http://{CP}");
        let sidecar = Process::start_in(
            &Lab::exec_as(&client, 1337),
            "wf-proxy",
            // Round robin: the point is where calls go, not which is fastest.
            &["--control-plane", &url, "--transparent", "127.0.0.1:15001", "--admin", "127.0.0.1:15000", "--balancer", "round-robin"],
            "wf-proxy listening",
        )?;

        // The app always dials web-1's address, as an app that resolved
        // `web` once would. Wait until all three are registered and healthy.
        let target = format!("http://{}:8080/", Lab::ip(11));
        let deadline = Instant::now() + Duration::from_secs(20);
        let mut seen: BTreeMap<String, usize> = BTreeMap::new();
        loop {
            seen.clear();
            let mut failed = Vec::new();
            for _ in 0..30 {
                let (status, body) = curl(&client, &target)?;
                if status == 200 {
                    *seen.entry(instance_of(&body)).or_default() += 1;
                } else {
                    failed.push(status);
                }
            }
            if seen.len() == 3 && failed.is_empty() {
                break;
            }
            if Instant::now() > deadline {
                let wfctl = bin("wfctl").to_string_lossy().to_string();
                let eps = run(&["ip", "netns", "exec", &lab.hub, &wfctl, "--control-plane", &url, "endpoints", "web"])?;
                bail!(
                    "calls to web-1's IP did not spread over web-1..3: {seen:?}, failed {failed:?}\n{eps}\n{}\n{}",
                    sidecar.log_text(), webs.iter().map(|(_, s)| s.log_text()).collect::<Vec<_>>().join("\n")
                );
            }
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
        assert_eq!(
            seen.keys().cloned().collect::<Vec<_>>(),
            ["web-1", "web-2", "web-3"],
            "{seen:?}"
        );
        // Every instance got a real share, not a stray request.
        assert!(seen.values().all(|&n| n >= 3), "{seen:?}");

        // HTTP/2 with prior knowledge carries no HTTP/1 Host to peek at: the
        // original address alone names the service.
        let mut h2: BTreeMap<String, usize> = BTreeMap::new();
        for _ in 0..9 {
            let out = run(&["ip", "netns", "exec", &client, "curl", "-s", "-m", "5", "--http2-prior-knowledge", &target])?;
            *h2.entry(instance_of(&out)).or_default() += 1;
        }
        assert_eq!(h2.keys().cloned().collect::<Vec<_>>(), ["web-1", "web-2", "web-3"], "{h2:?}");

        // An address the mesh does not know goes where the app meant.
        let (status, body) = curl(&client, "http://10.77.0.1:9999/")?;
        assert_eq!((status, instance_of(&body).as_str()), (200, "outside"), "{body}");

        // The sidecar really carried them: its outbound metrics count them.
        let admin = run(&["ip", "netns", "exec", &client, "curl", "-s", "http://127.0.0.1:15000/metrics"])?;
        let requests: f64 = admin
            .lines()
            .filter(|l| l.starts_with("wayfinder_proxy_requests_total{") && l.contains("upstream=\"web\""))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum();
        assert!(requests >= 30.0, "sidecar counted {requests} web requests:\n{admin}");

        run(&["ip", "netns", "exec", &client, &init, "init", "--cleanup"])?;
        let rules = run(&["ip", "netns", "exec", &client, "iptables", "-t", "nat", "-S"])?;
        assert!(!rules.contains("WAYFINDER"), "rules left after --cleanup: {rules}");
        drop(webs);
        Ok(())
    })
    .await
}

#[tokio::test]
async fn the_netns_lab_script_meshes_apps_that_call_services_by_name() -> Result<()> {
    if let Some(why) = unavailable() {
        eprintln!("skipped: {why}");
        return Ok(());
    }
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let bin_dir = bin("wf-proxy")
        .parent()
        .map(|p| p.to_path_buf())
        .unwrap_or_default();
    let prefix = format!("wfs{}", std::process::id());
    let out = tokio::time::timeout(
        Duration::from_secs(90),
        tokio::process::Command::new("bash")
            .arg(root.join("deploy/netns-lab.sh"))
            .arg("--once")
            .env("WAYFINDER_BIN", &bin_dir)
            .env("WAYFINDER_LAB_PREFIX", &prefix)
            // Peak-EWMA may send twelve calls in a row to the fastest
            // instance (about 1% of runs); round-robin must reach all three.
            .env("WAYFINDER_LAB_BALANCER", "round-robin")
            .kill_on_drop(true)
            .output(),
    )
    .await??;
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Twelve calls by name and by address, every one answered by a web instance.
    let answers: Vec<String> = stdout
        .lines()
        .filter(|l| l.starts_with('{'))
        .map(instance_of)
        .collect();
    assert_eq!(answers.len(), 12, "{stdout}");
    assert!(answers.iter().all(|a| a.starts_with("web-")), "{stdout}");
    let distinct: std::collections::BTreeSet<_> = answers.iter().collect();
    assert_eq!(distinct.len(), 3, "calls were not balanced: {stdout}");
    // Inbound capture: a plaintext caller outside the mesh meets the strict sidecar.
    assert!(
        stdout.contains("outside caller: refused (inbound captured, strict mTLS)"),
        "{stdout}"
    );
    // The script removed what it made.
    let left = run(&["ip", "netns", "list"])?;
    assert!(!left.contains(&prefix), "namespaces left behind: {left}");
    Ok(())
}

#[tokio::test]
async fn a_captured_sidecar_keeps_its_outbound_open_while_its_app_is_there_after_sigterm()
-> Result<()> {
    if let Some(why) = unavailable() {
        eprintln!("skipped: {why}");
        return Ok(());
    }
    bounded(async {
        let mut lab = Lab::new("keep")?;
        let data = tempfile::tempdir()?;
        let _cp = control_plane(&lab, data.path())?;
        let url = format!("http://{CP}");
        let _web1 = lab.web(1, &url, &[])?;
        // The app shares the sidecar's network namespace, not its processes
        // (as a compose service joined to its sidecar): a server of its own,
        // run as root like most container apps.
        let client = lab.node("client", 50)?;
        let mut app = Process::start_in(
            &Lab::exec(&client),
            "lab-app",
            &["--listen", "0.0.0.0:9000", "--name", "client"],
            "listening on",
        )?;
        let mut sidecar = Process::start_in(
            &Lab::exec(&client),
            "wf-proxy",
            &[
                "--control-plane",
                &url,
                "--capture",
                "--transparent",
                "127.0.0.1:15001",
                "--admin",
                "127.0.0.1:15000",
                "--drain-timeout",
                "20s",
            ],
            "wf-proxy listening",
        )?;
        let target = format!("http://{}:8080/", Lab::ip(11));
        let deadline = Instant::now() + Duration::from_secs(20);
        while curl(&client, &target)?.0 != 200 {
            if Instant::now() > deadline {
                bail!("the app's calls never reached web-1");
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        sidecar.signal("TERM")?;
        sidecar.await_log("draining").await?;
        tokio::time::sleep(Duration::from_millis(500)).await;
        // Its app still there, the sidecar still carries its calls.
        let (status, body) = curl(&client, &target)?;
        assert_eq!(status, 200, "{body}\n{}", sidecar.log_text());
        // The app goes; the sidecar follows at once, not after 20 s.
        let gone = Instant::now();
        app.kill();
        let exit = sidecar.wait_exit(Duration::from_secs(10))?;
        assert!(exit.success(), "{exit:?}: {}", sidecar.log_text());
        assert!(
            gone.elapsed() < Duration::from_secs(3),
            "{:?}: {}",
            gone.elapsed(),
            sidecar.log_text()
        );
        Ok(())
    })
    .await
}
