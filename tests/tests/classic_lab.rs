//! The classic lab (examples/classic-lab: web1..3 under the alias `web`,
//! nginx over them, a client calling http://web/) meshed by `wfctl inject`
//! on a real Docker engine, and unmeshed again. Skipped, saying why, where
//! no engine answers.

use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use wayfinder_tests::{bin, docker, metric};

/// `wfctl ARGS` in `dir`; its stdout, or an error with its stderr.
fn wfctl(dir: &std::path::Path, args: &[&str]) -> Result<String> {
    let out = std::process::Command::new(bin("wfctl"))
        .args(args)
        .current_dir(dir)
        .output()?;
    anyhow::ensure!(
        out.status.success(),
        "wfctl {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// `n` calls to http://web/ from inside the client container (its app's
/// own wget, captured by its sidecar): who answered each, "failed" for
/// the ones that did not succeed.
fn calls_from_client(project: &docker::Project, n: usize, pause_us: u32) -> Result<Vec<String>> {
    let script = format!(
        "for i in $(seq {n}); do wget -q -O- http://web/ || echo failed; usleep {pause_us}; done"
    );
    let out = project.run(&["exec", "-T", "client", "sh", "-c", &script])?;
    Ok(out.lines().map(str::to_string).collect())
}

/// The control plane's view of `web` once `want` instances serve (60 s).
async fn web_serving(dash: std::net::SocketAddr, want: usize) -> Result<String> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let listed = wayfinder_tests::http_get(dash, "/v1/services/web").await;
        if let Ok((200, body)) = &listed
            && body.contains(&format!("\"serving\":{want}"))
        {
            return Ok(body.clone());
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "web never had {want} serving instances: {listed:?}"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// A lab meshed by `wfctl inject`, brought up by the test.
struct Injected {
    /// Where the files are (the original, meshed.yaml, the tokens).
    dir: tempfile::TempDir,
    project: docker::Project,
    /// The control plane's dashboard (`/v1/services/...`).
    dash: std::net::SocketAddr,
}

/// Writes `files` (name, text) into a directory of its own, injects `file`
/// into meshed.yaml, and makes a compose project `name` of it on the
/// Wayfinder image with a free dashboard port and `env`; `None`, said,
/// where there is no Docker.
async fn injected(
    name: &str,
    files: &[(&str, String)],
    file: &str,
    env: &[(&str, String)],
) -> Result<Option<Injected>> {
    let compose = match docker::compose_command() {
        Ok(c) => c,
        Err(why) => {
            eprintln!("skipped: {why}");
            return Ok(None);
        }
    };
    let image = docker::wayfinder_image().await?;
    docker::lab_images().await?;
    let dir = tempfile::tempdir()?;
    for (f, text) in files {
        std::fs::write(dir.path().join(f), text)?;
    }
    wfctl(dir.path(), &["inject", file, "-o", "meshed.yaml"])?;
    let dashboard = free_port()?;
    let mut vars = vec![
        ("WAYFINDER_IMAGE".to_string(), image.to_string()),
        (
            "WAYFINDER_DASHBOARD_PORT".to_string(),
            dashboard.to_string(),
        ),
    ];
    vars.extend(env.iter().map(|(k, v)| (k.to_string(), v.clone())));
    let project = docker::Project {
        compose,
        name: format!("{name}{}", std::process::id()),
        file: dir.path().join("meshed.yaml"),
        env: vars,
    };
    Ok(Some(Injected {
        dir,
        project,
        dash: std::net::SocketAddr::from(([127, 0, 0, 1], dashboard)),
    }))
}

fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

fn count(answers: &[String], who: &str) -> usize {
    answers.iter().filter(|a| *a == who).count()
}

#[tokio::test]
async fn docker_lab_the_classic_lab_is_meshed_by_inject_and_unmeshed_by_remove() -> Result<()> {
    let example = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/classic-lab");
    let files = ["compose.yaml", "nginx.conf"]
        .into_iter()
        .map(|f| Ok((f, std::fs::read_to_string(example.join(f))?)))
        .collect::<Result<Vec<_>>>()?;
    let nginx_port = free_port()?;
    let env = [("LAB_NGINX_PORT", nginx_port.to_string())];
    let Some(Injected { dir, project, dash }) =
        injected("wfclassic", &files, "compose.yaml", &env).await?
    else {
        return Ok(());
    };
    let lab = async {
        project.run(&["up", "-d"])?;
        // The control plane lists web1..3 as instances of one service, web.
        let body = web_serving(dash, 3).await?;
        for w in ["web1", "web2", "web3"] {
            assert!(body.contains(&format!("\"{w}\"")), "{body}");
        }

        // Round robin, so "reached all three" is exact: peak-EWMA (the
        // default) may rightly keep a web that answered one slow call
        // aside for a while.
        project.apply_policy(
            "wayfinder-control",
            "[services.web]\nbalancer = \"round-robin\"\n[services.web.retries]\nmax_attempts = 1\n",
        )?;
        tokio::time::sleep(Duration::from_secs(1)).await;

        // 300 calls by name from the client's own app, all answered, by
        // all three webs, and all through the client's sidecar.
        let answers = calls_from_client(&project, 300, 0)?;
        assert_eq!(answers.len(), 300);
        assert_eq!(count(&answers, "failed"), 0, "{answers:?}");
        for w in ["web1", "web2", "web3"] {
            assert!((95..=105).contains(&count(&answers, w)), "{w}: {answers:?}");
        }
        let metrics = project.run(&[
            "exec",
            "-T",
            "client",
            "wget",
            "-q",
            "-O-",
            "http://127.0.0.1:15000/metrics",
        ])?;
        let meshed = metric(
            &metrics,
            "wayfinder_proxy_requests_total{direction=\"outbound\",upstream=\"web\",status=\"2xx\"}",
        );
        assert!(meshed.is_some_and(|n| n >= 300.0), "{meshed:?}");

        // A rolling restart of web1..3 under load, retries off: each sidecar
        // (it owns the namespace) leaves the mesh and serves through its
        // lame duck, keeps its app's outbound while the app is there (until
        // Docker's 10 s), then its app rejoins the new one.
        let during = {
            let project = &project;
            std::thread::scope(|s| {
                let calls = s.spawn(|| calls_from_client(project, 1500, 20_000));
                // A thread of its own: this one drives the test's runtime.
                let restarts = s.spawn(|| -> Result<()> {
                    let rt = tokio::runtime::Builder::new_current_thread()
                        .enable_all()
                        .build()?;
                    for w in ["web1", "web2", "web3"] {
                        project.run(&["restart", "-t", "10", &format!("{w}-sidecar")])?;
                        project.run(&["restart", "-t", "1", w])?;
                        rt.block_on(web_serving(dash, 3))?;
                    }
                    Ok(())
                });
                restarts
                    .join()
                    .map_err(|_| anyhow::anyhow!("restart thread"))??;
                calls.join().map_err(|_| anyhow::anyhow!("caller thread"))?
            })?
        };
        assert_eq!(count(&during, "failed"), 0, "{during:?}");
        for w in ["web1", "web2", "web3"] {
            assert!(count(&during, w) > 100, "{w}: {during:?}");
        }

        // web2 is killed mid-run, under the default retries: no call fails.
        project.apply_policy(
            "wayfinder-control",
            "[services.web]\nbalancer = \"round-robin\"\n",
        )?;
        tokio::time::sleep(Duration::from_secs(1)).await;
        let during = {
            let project = &project;
            std::thread::scope(|s| {
                // 200 calls 20 ms apart (4 s and more), web2 killed 1.5 s in.
                let calls = s.spawn(|| calls_from_client(project, 200, 20_000));
                std::thread::sleep(Duration::from_millis(1500));
                project.run(&["kill", "web2"])?;
                calls.join().map_err(|_| anyhow::anyhow!("caller thread"))?
            })?
        };
        assert_eq!(count(&during, "failed"), 0, "{during:?}");
        assert!(
            count(&during[during.len() - 50..], "web2") == 0,
            "{during:?}"
        );

        // nginx (meshed too) still answers on its published port.
        let nginx = std::net::SocketAddr::from(([127, 0, 0, 1], nginx_port));
        let (status, body) = wayfinder_tests::http_get(nginx, "/").await?;
        assert_eq!(status, 200, "{body}");
        assert!(["web1", "web3"].contains(&body.trim()), "{body}");
        Ok::<_, anyhow::Error>(())
    };
    let result = tokio::time::timeout(Duration::from_secs(300), lab)
        .await
        .context("the classic lab within 5 min")?;
    if result.is_err() {
        eprintln!(
            "{}",
            project.run(&["logs", "--no-color"]).unwrap_or_default()
        );
    }
    result?;

    // Taken out again: the original file, byte for byte, either way.
    let original = std::fs::read_to_string(example.join("compose.yaml"))?;
    let back = wfctl(dir.path(), &["inject", "--remove", "meshed.yaml"])?;
    assert_eq!(back, original);
    let back = wfctl(dir.path(), &["uninject", "meshed.yaml"])?;
    assert_eq!(back, original);
    Ok(())
}

/// A one-shot job beside a web, both meshed by inject.
const JOB_LAB: &str = r#"services:
  web1:
    image: ${LAB_BUSYBOX_IMAGE:-wayfinder-busybox:lab}
    hostname: web1
    command: ["sh", "-c", "mkdir -p /tmp/www && hostname > /tmp/www/index.html && exec httpd -f -p 80 -h /tmp/www"]
    labels:
      wayfinder.io/service: web
    networks:
      default:
        aliases: [web]
  job:
    image: ${LAB_BUSYBOX_IMAGE:-wayfinder-busybox:lab}
    restart: "no"
    # Calls web at its very first instant: 3 when answered, 1 when not.
    command: ["sh", "-c", "wget -q -O- http://web/ && exit 3; exit 1"]
"#;

#[tokio::test]
async fn docker_lab_a_job_is_meshed_from_its_first_instant_and_its_sidecar_ends_with_it()
-> Result<()> {
    let files = [("jobs.yaml", JOB_LAB.to_string())];
    // `_dir` holds the files until the end.
    let Some(Injected {
        project,
        dash,
        dir: _dir,
    }) = injected("wfjob", &files, "jobs.yaml", &[]).await?
    else {
        return Ok(());
    };
    let lab = async {
        project.run(&["up", "-d", "web1"])?;
        web_serving(dash, 1).await?;

        // 20 starts of the job with a new sidecar each: its first call is
        // never refused, and its exit code comes back through compose.
        for start in 1..=20 {
            let out = project
                .cmd(&[
                    "up",
                    "--force-recreate",
                    "--no-deps",
                    "--exit-code-from",
                    "job",
                    "job-sidecar",
                    "job",
                ])
                .output()?;
            if out.status.code() != Some(3) {
                anyhow::bail!(
                    "start {start}: exit {:?}\n{}\n{}\n{}",
                    out.status.code(),
                    String::from_utf8_lossy(&out.stdout),
                    String::from_utf8_lossy(&out.stderr),
                    project
                        .run(&["logs", "--no-color", "job-sidecar", "job"])
                        .unwrap_or_default()
                );
            }
        }

        // Left to itself, the job ends and its sidecar within 2 s of it.
        project.run(&[
            "up",
            "-d",
            "--force-recreate",
            "--no-deps",
            "job-sidecar",
            "job",
        ])?;
        let id = |service: &str| -> Result<String> {
            Ok(project.run(&["ps", "-q", service])?.trim().to_string())
        };
        let (job, sidecar) = (id("job")?, id("job-sidecar")?);
        let state = |id: &str| -> Result<(bool, String, String)> {
            let out = std::process::Command::new("docker")
                .args([
                    "inspect",
                    "-f",
                    "{{.State.Running}} {{.State.ExitCode}} {{.State.FinishedAt}}",
                    id,
                ])
                .output()?;
            let text = String::from_utf8_lossy(&out.stdout).trim().to_string();
            let mut f = text.split(' ');
            Ok((
                f.next() == Some("true"),
                f.next().unwrap_or_default().to_string(),
                f.next().unwrap_or_default().to_string(),
            ))
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        while state(&job)?.0 || state(&sidecar)?.0 {
            anyhow::ensure!(
                Instant::now() < deadline,
                "job {:?}, sidecar {:?}",
                state(&job)?,
                state(&sidecar)?
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let (job_state, sidecar_state) = (state(&job)?, state(&sidecar)?);
        assert_eq!(job_state.1, "3", "{job_state:?}");
        assert_eq!(sidecar_state.1, "0", "{sidecar_state:?}");
        let ended = |s: &str| -> Result<f64> {
            // 2026-11-30T12:00:00.123456789Z: seconds within the day suffice.
            let t = s.split('T').nth(1).context("time")?.trim_end_matches('Z');
            let mut hms = t.split(':');
            let (h, m, sec): (f64, f64, f64) = (
                hms.next().context("h")?.parse()?,
                hms.next().context("m")?.parse()?,
                hms.next().context("s")?.parse()?,
            );
            Ok(h * 3600.0 + m * 60.0 + sec)
        };
        let after = ended(&sidecar_state.2)? - ended(&job_state.2)?;
        assert!(
            (0.0..2.0).contains(&after),
            "the sidecar ended {after:.2} s after the job"
        );
        Ok::<_, anyhow::Error>(())
    };
    let result = tokio::time::timeout(Duration::from_secs(400), lab)
        .await
        .context("the job lab within 400 s")?;
    if result.is_err() {
        eprintln!(
            "{}",
            project.run(&["logs", "--no-color"]).unwrap_or_default()
        );
    }
    result
}

#[test]
fn wfctl_inject_refuses_each_bad_input_naming_it_and_writes_nothing() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let cases = [
        (
            "notcompose.yaml",
            "name: x\n",
            "notcompose.yaml: services: not a compose file",
        ),
        ("broken.yaml", "services: [a\n", "broken.yaml: "),
        (
            "scaled.yaml",
            "services:\n  web:\n    image: x\n    scale: 2\n",
            "scaled.yaml: services.web.scale:",
        ),
        (
            "unknown.yaml",
            "services:\n  web:\n    image: x\n    frobnicate: 1\n",
            "unknown.yaml: services.web.frobnicate:",
        ),
    ];
    for (file, text, want) in cases {
        std::fs::write(dir.path().join(file), text)?;
        let out = std::process::Command::new(bin("wfctl"))
            .args(["inject", file, "-o", "out.yaml"])
            .current_dir(dir.path())
            .output()?;
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{file}: {stderr}");
        assert!(stderr.contains(want), "{file}: {stderr}");
        assert!(
            !dir.path().join("out.yaml").exists(),
            "{file}: output written"
        );
        assert!(
            !dir.path().join("out.wayfinder").exists(),
            "{file}: tokens written"
        );
    }
    Ok(())
}
