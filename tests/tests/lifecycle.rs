//! The sidecar's life around its app: `wf-proxy … run -- APP` starts the
//! app once the sidecar is ready and ends with its exit code, and SIGTERM
//! leaves the mesh in order (deregister, lame duck, inbound drained, app
//! stopped, outbound closed), so a rolling restart with retries turned off
//! fails no request. Real binaries on loopback.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::Result;
use wayfinder_tests::mesh::{client, wait_serving};
use wayfinder_tests::{
    ControlPlane, Process, Running, Scenario, apply_policy, bounded, http_request,
};

fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// `wf-proxy FLAGS run -- sh -c SCRIPT`: a shell app under a sidecar of
/// `cp` with `flags` more.
fn run_sh(cp: &ControlPlane, flags: &[&str], script: &str) -> Result<Process> {
    let url = cp.url();
    let mut args = vec!["--control-plane", &url, "--admin", "127.0.0.1:0"];
    args.extend_from_slice(flags);
    args.extend(["run", "--", "sh", "-c", script]);
    Process::start("wf-proxy", &args, "wf-proxy listening")
}

#[tokio::test]
async fn run_starts_the_app_once_ready_and_exits_with_its_code() -> Result<()> {
    bounded(async {
        let Running {
            cp,
            instances: _web,
        } = Scenario::new().instances("web", 1).start().await?;
        // The app calls web through its sidecar at its very first instant,
        // then exits 3.
        let outbound = format!("127.0.0.1:{}", free_port()?);
        let script = format!(
            "code=$(curl -s -o /dev/null -w '%{{http_code}}' -H 'Host: web' http://{outbound}/); \
             echo \"app saw $code\" >&2; exit 3"
        );
        let mut sidecar = run_sh(&cp, &["--outbound", &outbound], &script)?;
        let status = sidecar.wait_exit(Duration::from_secs(10))?;
        assert_eq!(status.code(), Some(3), "{}", sidecar.log_text());
        let log = sidecar.log_text();
        assert!(log.contains("app saw 200"), "{log}");
        // Not before the sidecar was ready (the catalog had come).
        let ready = log.find("sidecar ready; app started").unwrap_or(usize::MAX);
        assert!(ready < log.find("app saw").unwrap_or(0), "{log}");
        Ok(())
    })
    .await
}

#[tokio::test]
async fn run_passes_reload_signals_to_the_app_as_they_come() -> Result<()> {
    bounded(async {
        let cp = ControlPlane::start(&[])?;
        // The app reports each reload signal, and exits 4 on USR2.
        let script = "trap 'echo app got HUP >&2' HUP; trap 'echo app got USR1 >&2' USR1; \
                      trap 'echo app got USR2 >&2; exit 4' USR2; \
                      echo app waiting >&2; while :; do sleep 0.05; done";
        let mut sidecar = run_sh(&cp, &[], script)?;
        sidecar.await_log("app waiting").await?;
        for signal in ["HUP", "USR1"] {
            sidecar.signal(signal)?;
            sidecar.await_log(&format!("app got {signal}")).await?;
        }
        // Reloads do not end the sidecar; the app's exit after USR2 does.
        sidecar.signal("USR2")?;
        let status = sidecar.wait_exit(Duration::from_secs(10))?;
        assert_eq!(status.code(), Some(4), "{}", sidecar.log_text());
        assert!(sidecar.log_text().contains("app got USR2"));
        Ok(())
    })
    .await
}

/// web-`i`: `wf-proxy … run -- lab-app` with a short lame duck.
fn web(cp: &ControlPlane, i: u8, port: u16) -> Result<Process> {
    web_with(cp, i, port, "500ms")
}

/// [`web`] with another lame duck.
fn web_with(cp: &ControlPlane, i: u8, port: u16, lame_duck: &str) -> Result<Process> {
    let app = format!("127.0.0.1:{port}");
    let name = format!("web-{i}");
    Process::start(
        "wf-proxy",
        &[
            "--control-plane",
            &cp.url(),
            "--service",
            "web",
            "--instance",
            &name,
            "--app",
            &app,
            "--inbound",
            "127.0.0.1:0",
            "--admin",
            "127.0.0.1:0",
            "--health-check",
            "/healthz",
            "--health-interval",
            "200ms",
            "--lame-duck",
            lame_duck,
            "--drain-timeout",
            "5s",
            "run",
            "--",
            wayfinder_tests::bin("lab-app")
                .to_str()
                .unwrap_or("lab-app"),
            "--listen",
            &app,
            "--name",
            &name,
        ],
        "wf-proxy listening",
    )
}

#[tokio::test]
async fn after_sigterm_the_inbound_answers_through_the_lame_duck_then_closes() -> Result<()> {
    bounded(async {
        let cp = ControlPlane::start(&[])?;
        let mut web1 = web_with(&cp, 1, free_port()?, "1500ms")?;
        wait_serving(&cp, "web", 1).await?;
        let inbound = web1.addr("inbound=")?;
        web1.signal("TERM")?;
        web1.await_log("deregistered").await?;
        // Out of the mesh, but a caller that has not heard yet is answered,
        // by the app, which is still running.
        let (status, _, body) = http_request(inbound, "GET", "/", "web", "").await?;
        assert_eq!(status, 200, "{body}");
        assert!(body.contains("web-1"), "{body}");
        assert!(!web1.log_text().contains("app exited"));
        let status = web1.wait_exit(Duration::from_secs(10))?;
        assert_eq!(status.code(), Some(143));
        assert!(tokio::net::TcpStream::connect(inbound).await.is_err());
        Ok(())
    })
    .await
}

#[tokio::test]
async fn a_rolling_restart_with_retries_off_fails_no_request() -> Result<()> {
    bounded(async {
        let cp = ControlPlane::start(&[])?;
        apply_policy(&cp, "[services.web.retries]\nmax_attempts = 1\n")?;
        let ports = [free_port()?, free_port()?, free_port()?];
        let mut webs = Vec::new();
        for (i, port) in (1..=3).zip(ports) {
            webs.push(web(&cp, i, port)?);
        }
        wait_serving(&cp, "web", 3).await?;
        let (_client, via, _) = client(&cp, &[])?;

        // Four callers, one call after another, for the whole restart.
        let stop = Arc::new(AtomicBool::new(false));
        let callers: Vec<_> = (0..4)
            .map(|_| {
                let stop = stop.clone();
                tokio::spawn(async move {
                    let (mut ok, mut failed) = (0usize, Vec::new());
                    while !stop.load(Ordering::Relaxed) {
                        match http_request(via, "GET", "/", "web", "").await {
                            Ok((200, _, _)) => ok += 1,
                            other => failed.push(format!("{other:?}")),
                        }
                    }
                    (ok, failed)
                })
            })
            .collect();
        tokio::time::sleep(Duration::from_millis(300)).await;
        for (slot, (i, port)) in (1..=3).zip(ports).enumerate() {
            let old = &mut webs[slot];
            let status = old.terminate()?;
            // lab-app ends on SIGTERM by the signal: 128 + 15 comes back.
            assert_eq!(status.code(), Some(143), "{}", old.log_text());
            let log = old.log_text();
            let order = ["draining", "app exited"].map(|w| log.find(w).unwrap_or(usize::MAX));
            assert!(
                order[0] < order[1],
                "deregistered before the app stopped:\n{log}"
            );
            webs[slot] = web(&cp, i, port)?;
            wait_serving(&cp, "web", 3).await?;
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        stop.store(true, Ordering::Relaxed);
        let (mut ok, mut failed) = (0, Vec::new());
        for c in callers {
            let (o, f) = c.await?;
            ok += o;
            failed.extend(f);
        }
        assert!(ok > 100, "only {ok} calls made");
        assert!(
            failed.is_empty(),
            "{} of {} failed: {failed:?}",
            failed.len(),
            ok + failed.len()
        );
        Ok(())
    })
    .await
}

#[test]
fn capture_with_run_is_refused_because_the_app_would_go_uncaptured() -> Result<()> {
    let out = std::process::Command::new(wayfinder_tests::bin("wf-proxy"))
        .args([
            "--capture",
            "--transparent",
            "127.0.0.1:0",
            "run",
            "--",
            "true",
        ])
        .output()?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("--capture with `run`"), "{stderr}");
    Ok(())
}
