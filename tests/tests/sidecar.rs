//! End-to-end tests of the data path: real wf-control, lab-app and wf-proxy
//! processes on loopback, traffic through two sidecars.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use wayfinder_tests::mesh::{
    admin_get, client, instance, instance_of, lab_app, sidecar, sidecar_with, wait_serving,
};
use wayfinder_tests::{
    ControlPlane, Process, Running, Scenario, apply_policy, bounded, http_request, metric, wfctl,
};

async fn spread(addr: SocketAddr, host: &str, n: usize) -> Result<HashMap<String, usize>> {
    let mut seen = HashMap::new();
    for i in 0..n {
        let (status, _, body) = http_request(addr, "GET", &format!("/r/{i}"), host, "").await?;
        assert_eq!(status, 200, "request {i}: {body}");
        *seen.entry(instance_of(&body)).or_default() += 1;
    }
    Ok(seen)
}

#[tokio::test]
async fn requests_are_balanced_over_every_instance_through_two_sidecars() -> Result<()> {
    bounded(async {
        let Running { cp, instances: lab } = Scenario::new()
            .policy("[services.web]\nbalancer = \"round-robin\"\n")
            .instances("web", 3)
            .start()
            .await?;
        let (client, web, outbound) = client(&cp, &[])?;

        // Round robin over three healthy instances: exactly a third each.
        let seen = spread(web, "web", 90).await?;
        assert_eq!(seen.len(), 3, "{seen:?}");
        assert!(seen.values().all(|&n| n == 30), "{seen:?}");

        // Host routing, with and without a port.
        let (status, _, body) = http_request(outbound, "GET", "/h", "web", "").await?;
        assert_eq!(status, 200, "{body}");
        let (status, _, body) = http_request(outbound, "POST", "/h", "web:8080", "hello").await?;
        assert_eq!(status, 200);
        assert!(body.contains("\"method\":\"POST\""), "{body}");

        // A client-only sidecar registers nothing.
        let (_, out, _) = wfctl(&cp, &["-o", "json", "services"])?;
        let services: serde_json::Value = serde_json::from_str(out.trim())?;
        assert_eq!(services.as_array().map(Vec::len), Some(1), "{services}");

        let (code, _) = admin_get(&client, "/ready").await?;
        assert_eq!(code, 200);
        let (_, eps) = admin_get(&client, "/endpoints").await?;
        assert_eq!(eps.matches("\"healthy\":true").count(), 3, "{eps}");
        let (_, m) = admin_get(&client, "/metrics").await?;
        assert_eq!(
            metric(&m, "wayfinder_proxy_requests_total{direction=\"outbound\",upstream=\"web\",status=\"2xx\"}"),
            Some(92.0)
        );
        // Every request went through exactly one server-side sidecar.
        let mut inbound = 0.0;
        for i in &lab {
            let (_, m) = admin_get(&i.sidecar, "/metrics").await?;
            inbound += metric(&m, "wayfinder_proxy_requests_total{direction=\"inbound\",upstream=\"app\",status=\"2xx\"}")
                .unwrap_or(0.0);
        }
        assert_eq!(inbound, 92.0);
        let (code, cfg) = admin_get(&client, "/config").await?;
        assert_eq!(code, 200);
        assert!(cfg.contains("\"discovery\":\"mesh\""), "{cfg}");
        drop(lab);
        Ok(())
    })
    .await
}

#[tokio::test]
async fn an_unhealthy_app_leaves_rotation_and_sigterm_deregisters() -> Result<()> {
    bounded(async {
        let Running {
            cp,
            instances: mut lab,
        } = Scenario::new().instances("web", 3).start().await?;
        let (_client, web, _) = client(&cp, &[])?;

        // The app's own health check fails: its sidecar reports it, the
        // control plane pushes it, the client stops sending to it.
        let (status, _, _) =
            http_request(lab[1].app_addr, "POST", "/fault?healthy=false", "x", "").await?;
        assert_eq!(status, 200);
        wait_serving(&cp, "web", 2).await?;
        tokio::time::sleep(Duration::from_millis(100)).await;
        let seen = spread(web, "web", 60).await?;
        assert!(!seen.contains_key("web-2"), "{seen:?}");
        assert_eq!(seen.values().sum::<usize>(), 60);

        // SIGTERM: deregister, drain, exit 0; the others keep serving.
        let status = lab[2].sidecar.terminate()?;
        assert!(status.success(), "exit status {status}");
        let (_, out, _) = wfctl(&cp, &["-o", "json", "endpoints", "web"])?;
        assert!(!out.contains("web-3"), "web-3 still registered: {out}");
        tokio::time::sleep(Duration::from_millis(100)).await;
        let seen = spread(web, "web", 30).await?;
        assert_eq!(seen.get("web-1"), Some(&30), "{seen:?}");
        lab[0].app.kill();
        Ok(())
    })
    .await
}

#[tokio::test]
async fn server_speaks_first_protocols_work_without_a_stall() -> Result<()> {
    server_speaks_first(false).await
}

#[tokio::test]
async fn server_speaks_first_protocols_work_over_mtls_too() -> Result<()> {
    server_speaks_first(true).await
}

async fn server_speaks_first(mtls: bool) -> Result<()> {
    const TOKEN: &str = "smtp-token-0123456789";
    let tok: &[&str] = if mtls { &["--join-token", TOKEN] } else { &[] };
    bounded(async {
        // A server that greets first, as SMTP, MySQL or NATS do, then echoes.
        let server = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let app = server.local_addr()?;
        tokio::spawn(async move {
            while let Ok((mut s, _)) = server.accept().await {
                tokio::spawn(async move {
                    let _ = s.write_all(b"220 greeting\r\n").await;
                    let (r, mut w) = s.split();
                    let mut lines = BufReader::new(r).lines();
                    while let Ok(Some(l)) = lines.next_line().await {
                        if w.write_all(format!("250 {l}\r\n").as_bytes())
                            .await
                            .is_err()
                        {
                            break;
                        }
                    }
                });
            }
        });
        let cp = ControlPlane::start(tok)?;
        let _side = sidecar_with(&cp, "smtp", "smtp-1", app, "tcp", tok)?;
        wait_serving(&cp, "smtp", 1).await?;
        let url = cp.url();
        let mut args = vec![
            "--control-plane",
            &url,
            "--admin",
            "127.0.0.1:0",
            "--upstream",
            "smtp=127.0.0.1:0",
        ];
        args.extend_from_slice(tok);
        let client = Process::start("wf-proxy", &args, "wf-proxy listening")?;
        let addr = client.addr("upstreams=smtp=")?;
        for round in 0..3 {
            let started = Instant::now();
            let mut s = tokio::net::TcpStream::connect(addr).await?;
            let (r, mut w) = s.split();
            let mut lines = BufReader::new(r).lines();
            let greeting = tokio::time::timeout(Duration::from_secs(2), lines.next_line())
                .await
                .context("greeting in time")??;
            let waited = started.elapsed();
            assert_eq!(greeting.as_deref(), Some("220 greeting"));
            // Linkerd waits 10 s here unless the port is configured as opaque.
            assert!(
                waited < Duration::from_millis(500),
                "round {round}: greeting after {waited:?}"
            );
            w.write_all(b"HELO lab\r\n").await?;
            let echo = tokio::time::timeout(Duration::from_secs(2), lines.next_line()).await??;
            assert_eq!(echo.as_deref(), Some("250 HELO lab"));
        }
        let (_, m) = admin_get(&client, "/metrics").await?;
        assert_eq!(
            metric(&m, "wayfinder_proxy_detect_timeouts_total"),
            Some(1.0),
            "remembered after the first"
        );
        assert!(
            metric(
                &m,
                "wayfinder_proxy_tcp_bytes_total{direction=\"outbound\",flow=\"to_client\"}"
            )
            .unwrap_or(0.0)
                > 0.0
        );
        Ok(())
    })
    .await
}

#[tokio::test]
async fn proxy_errors_say_why() -> Result<()> {
    bounded(async {
        let cp = ControlPlane::start(&[])?;
        // A static endpoint nobody listens on (a released ephemeral port
        // could be taken by a process of a test running in parallel).
        let (ok, _, err) = wfctl(&cp, &["register", "dead", "127.0.0.254:9"])?;
        assert!(ok, "{err}");
        let (_client, _, outbound) = client(&cp, &[])?;

        let (status, head, _) = http_request(outbound, "GET", "/", "Not_A_Service", "").await?;
        assert_eq!(status, 400);
        assert!(
            head.contains("x-wayfinder-error: no-service-in-host"),
            "{head}"
        );

        // A name the control plane does not know: refused, and nothing is
        // created for it (no upstream, no watch).
        // An address (or anything not one DNS label) is never a service.
        for (host, status_wanted, reason) in [
            ("ghost", 404, "unknown-service"),
            ("127.0.0.5", 400, "no-service-in-host"),
            ("169.254.169.254", 400, "no-service-in-host"),
            ("web.evil.example", 400, "no-service-in-host"),
        ] {
            let (status, head, _) = http_request(outbound, "GET", "/", host, "").await?;
            assert_eq!(status, status_wanted, "{host}: {head}");
            assert!(
                head.contains(&format!("x-wayfinder-error: {reason}")),
                "{host}: {head}"
            );
        }
        let (_, eps) = wayfinder_tests::mesh::admin_get(&_client, "/endpoints").await?;
        assert!(!eps.contains("ghost"), "{eps}");
        // Counted as refusals at the edge (and logged once per kind).
        let (_, m) = wayfinder_tests::mesh::admin_get(&_client, "/metrics").await?;
        assert_eq!(
            wayfinder_tests::metric(
                &m,
                "wayfinder_proxy_edge_refusals_total{reason=\"no-service-in-host\"}"
            ),
            Some(4.0),
            "{m}"
        );

        // A service the control plane knows (by its policy) with no endpoint.
        apply_policy(&cp, "[services.empty]\nbalancer = \"round-robin\"\n")?;
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        let head = loop {
            let (status, head, _) = http_request(outbound, "GET", "/", "empty", "").await?;
            if status == 503 || std::time::Instant::now() > deadline {
                break head;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        assert!(head.contains("x-wayfinder-error: no-endpoints"), "{head}");

        let (status, head, _) = http_request(outbound, "GET", "/", "dead", "").await?;
        assert_eq!(status, 502);
        assert!(head.contains("x-wayfinder-error: connect-failed"), "{head}");
        Ok(())
    })
    .await
}

#[tokio::test]
async fn grpc_chunked_bodies_and_upgrades_pass_through_two_sidecars() -> Result<()> {
    protocols_through_two_sidecars(false).await
}

#[tokio::test]
async fn grpc_chunked_bodies_and_upgrades_pass_through_two_sidecars_over_mtls() -> Result<()> {
    protocols_through_two_sidecars(true).await
}

async fn protocols_through_two_sidecars(mtls: bool) -> Result<()> {
    const TOKEN: &str = "protocols-token-0123456789";
    let tok: &[&str] = if mtls { &["--join-token", TOKEN] } else { &[] };
    bounded(async {
        let cp = ControlPlane::start(tok)?;
        let url = cp.url();

        // gRPC (h2c): wf-control's own Admin API, served behind a sidecar.
        let _ctl_side = sidecar_with(&cp, "ctl", "ctl-1", cp.grpc, "tcp", tok)?;
        // An app that accepts an HTTP/1.1 Upgrade, then echoes raw bytes.
        let up_server = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let up_addr = up_server.local_addr()?;
        tokio::spawn(async move {
            while let Ok((mut s, _)) = up_server.accept().await {
                tokio::spawn(async move {
                    use tokio::io::AsyncReadExt;
                    let mut head = Vec::new();
                    let mut b = [0u8; 1];
                    while !head.ends_with(b"\r\n\r\n") {
                        if s.read(&mut b).await.unwrap_or(0) == 0 {
                            return;
                        }
                        head.push(b[0]);
                    }
                    let _ = s
                        .write_all(b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: echo\r\n\r\n")
                        .await;
                    let (mut r, mut w) = s.split();
                    let _ = tokio::io::copy(&mut r, &mut w).await;
                });
            }
        });
        let _up_side = sidecar_with(&cp, "echo", "echo-1", up_addr, "tcp", tok)?;
        let (web_app, web_addr) = lab_app("web-1")?;
        let _web_side = sidecar_with(&cp, "web", "web-1", web_addr, "/healthz", tok)?;
        wait_serving(&cp, "ctl", 1).await?;
        wait_serving(&cp, "echo", 1).await?;
        wait_serving(&cp, "web", 1).await?;
        let mut args = vec![
            "--control-plane", &url, "--admin", "127.0.0.1:0", "--upstream", "ctl=127.0.0.1:0",
            "--upstream", "echo=127.0.0.1:0", "--upstream", "web=127.0.0.1:0",
        ];
        args.extend_from_slice(tok);
        let client = Process::start("wf-proxy", &args, "wf-proxy listening")?;

        let ch = tonic::transport::Channel::from_shared(format!("http://{}", client.addr("ctl=")?))?
            .connect()
            .await?;
        let services = wayfinder_proto::v1::admin_client::AdminClient::new(ch)
            .list_services(wayfinder_proto::v1::ListServicesRequest {})
            .await?
            .into_inner()
            .services;
        let names: Vec<_> = services.iter().map(|s| s.name.as_str()).collect();
        assert_eq!(names, vec!["ctl", "echo", "web"]);

        // A chunked request body streams through and arrives whole.
        let mut s = tokio::net::TcpStream::connect(client.addr("web=")?).await?;
        s.write_all(
            b"POST /chunked HTTP/1.1\r\nHost: web\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n",
        )
        .await?;
        let mut resp = String::new();
        tokio::time::timeout(Duration::from_secs(5), tokio::io::AsyncReadExt::read_to_string(&mut s, &mut resp))
            .await??;
        assert!(resp.starts_with("HTTP/1.1 200"), "{resp}");
        assert!(resp.contains("\"method\":\"POST\"") && resp.contains("/chunked"), "{resp}");

        // Upgrade: the handshake goes through, then raw bytes flow both ways.
        let mut s = tokio::net::TcpStream::connect(client.addr("echo=")?).await?;
        s.write_all(b"GET /ws HTTP/1.1\r\nHost: echo\r\nConnection: Upgrade\r\nUpgrade: echo\r\n\r\n")
            .await?;
        let (r, mut w) = s.split();
        let mut lines = BufReader::new(r).lines();
        let status = tokio::time::timeout(Duration::from_secs(5), lines.next_line()).await??;
        assert_eq!(status.as_deref().map(|l| l.starts_with("HTTP/1.1 101")), Some(true), "{status:?}");
        while let Some(l) = tokio::time::timeout(Duration::from_secs(5), lines.next_line()).await?? {
            if l.is_empty() {
                break;
            }
        }
        w.write_all(b"ping over the upgraded connection\n").await?;
        let echo = tokio::time::timeout(Duration::from_secs(5), lines.next_line()).await??;
        assert_eq!(echo.as_deref(), Some("ping over the upgraded connection"));
        drop(web_app);
        Ok(())
    })
    .await
}

#[tokio::test]
async fn sidecars_keep_last_known_endpoints_while_the_control_plane_is_down() -> Result<()> {
    bounded(async {
        let Running {
            mut cp,
            instances: lab,
        } = Scenario::new()
            .control_plane_args(&["--lease-ttl", "2s"])
            .instances("web", 2)
            .start()
            .await?;
        let (client, web, _) = client(&cp, &[])?;
        assert_eq!(spread(web, "web", 10).await?.values().sum::<usize>(), 10);

        // Control plane gone: traffic keeps flowing on what the sidecars know.
        cp.kill();
        let seen = spread(web, "web", 20).await?;
        assert_eq!(seen.values().sum::<usize>(), 20);

        // Back on the same address and data: leases are still known, sidecars
        // reconnect (jittered backoff) and the watch resumes; a new instance
        // registered now reaches the client.
        cp.restart()?;
        let third = instance(&cp, "web-3")?;
        wait_serving(&cp, "web", 3).await?;
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let (_, eps) = admin_get(&client, "/endpoints").await?;
            if eps.contains("web-3") {
                break;
            }
            if Instant::now() > deadline {
                bail!("the client never learned about web-3: {eps}");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        drop((lab, third));
        Ok(())
    })
    .await
}

#[tokio::test]
async fn ready_waits_for_the_first_discovery_answer() -> Result<()> {
    bounded(async {
        // A control plane that is not there yet: nothing listens on this port.
        let port = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?;
        let url = format!("http://{port}");
        let client = Process::start(
            "wf-proxy",
            &[
                "--control-plane",
                &url,
                "--admin",
                "127.0.0.1:0",
                "--upstream",
                "web=127.0.0.1:0",
            ],
            "wf-proxy listening",
        )?;
        let (code, body) = admin_get(&client, "/ready").await?;
        assert_eq!((code, body.trim()), (503, "waiting for discovery of: web"));
        let (code, _) = admin_get(&client, "/live").await?;
        assert_eq!(code, 200);
        let (status, head, _) = http_request(client.addr("web=")?, "GET", "/", "web", "").await?;
        assert_eq!(status, 503);
        assert!(
            head.contains("x-wayfinder-error: discovery-pending"),
            "{head}"
        );
        Ok(())
    })
    .await
}

/// `wf-proxy await ARGS`: exit code and stderr.
async fn await_ready(args: &[&str]) -> Result<(Option<i32>, String)> {
    let out = tokio::process::Command::new(wayfinder_tests::bin("wf-proxy"))
        .arg("await")
        .args(args)
        .kill_on_drop(true)
        .output()
        .await?;
    Ok((
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into(),
    ))
}

#[tokio::test]
async fn await_holds_an_app_until_its_sidecar_has_the_catalog() -> Result<()> {
    bounded(async {
        // A Host-routing sidecar whose control plane is not there yet: it
        // listens, but it does not know which names are services.
        let cp_port = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?;
        let client = Process::start(
            "wf-proxy",
            &[
                "--control-plane",
                &format!("http://{cp_port}"),
                "--admin",
                "127.0.0.1:0",
                "--transparent",
                "127.0.0.1:0",
            ],
            "wf-proxy listening",
        )?;
        let admin = client.addr("admin=")?.to_string();
        let (code, body) = admin_get(&client, "/ready").await?;
        assert_eq!(
            (code, body.trim()),
            (503, "waiting for discovery of: the catalog")
        );
        let (code, err) =
            await_ready(&["--admin", &admin, "--timeout", "300ms", "--", "true"]).await?;
        assert_eq!(code, Some(1), "{err}");
        assert!(err.contains("the catalog"), "{err}");
        // Nothing on the admin port at all: said so.
        let (code, err) =
            await_ready(&["--admin", &cp_port.to_string(), "--timeout", "200ms"]).await?;
        assert_eq!(code, Some(1));
        assert!(err.contains("no sidecar on"), "{err}");

        // With a control plane, the same sidecar becomes ready and the
        // command runs (exec'd: its exit code is await's).
        let cp = ControlPlane::start(&[])?;
        let (client, _, _) = wayfinder_tests::mesh::client(&cp, &[])?;
        let admin = client.addr("admin=")?.to_string();
        let (code, err) = await_ready(&[
            "--admin",
            &admin,
            "--timeout",
            "10s",
            "--",
            "sh",
            "-c",
            "exit 7",
        ])
        .await?;
        assert_eq!(code, Some(7), "{err}");
        let (code, body) = admin_get(&client, "/ready").await?;
        assert_eq!((code, body.trim()), (200, "ready"));
        Ok(())
    })
    .await
}

#[tokio::test]
async fn dns_discovery_uses_every_record_and_follows_changes() -> Result<()> {
    bounded(async {
        // Three instances on one port, each on its own loopback address, as
        // containers behind one Docker DNS name.
        let port = std::net::TcpListener::bind("127.0.0.11:0")?
            .local_addr()?
            .port();
        let mut apps = Vec::new();
        for i in 1..=3u8 {
            let listen = format!("127.0.0.{}:{port}", 10 + i);
            apps.push(Process::start(
                "lab-app",
                &["--listen", &listen, "--name", &format!("web-{i}")],
                "listening on",
            )?);
        }
        let dns = wayfinder_tests::DnsServer::start("127.0.0.1:0".parse()?, 1).await?;
        let ip = |i: u8| std::net::Ipv4Addr::new(127, 0, 0, 10 + i);
        dns.records
            .lock()
            .map_err(|_| anyhow::anyhow!("poisoned"))?
            .insert("web".into(), vec![ip(1), ip(2), ip(3)]);
        let cp = ControlPlane::start(&[])?;
        let (url, server) = (cp.url(), dns.addr.to_string());
        let upstream = format!("web:{port}=127.0.0.1:0");
        let client = Process::start(
            "wf-proxy",
            &[
                "--control-plane",
                &url,
                "--admin",
                "127.0.0.1:0",
                "--discovery",
                "dns",
                "--dns-server",
                &server,
                // The lab's DNS answers with loopback addresses.
                "--dns-allow-local",
                "--balancer",
                "round-robin",
                "--upstream",
                &upstream,
            ],
            "wf-proxy listening",
        )?;
        let web = client.addr("upstreams=web=")?;
        let seen = spread(web, "web", 30).await?;
        assert_eq!(seen.len(), 3, "{seen:?}");
        assert!(seen.values().all(|&n| n == 10), "{seen:?}");

        // A record disappears: re-resolved when the 1 s TTL runs out.
        dns.records
            .lock()
            .map_err(|_| anyhow::anyhow!("poisoned"))?
            .insert("web".into(), vec![ip(1), ip(2)]);
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let (_, eps) = admin_get(&client, "/endpoints").await?;
            if !eps.contains(&format!("127.0.0.13:{port}")) {
                break;
            }
            if Instant::now() > deadline {
                bail!("the removed record is still in use: {eps}");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let seen = spread(web, "web", 20).await?;
        assert!(!seen.contains_key("web-3"), "{seen:?}");
        let (_, eps) = admin_get(&client, "/endpoints").await?;
        assert!(eps.contains("\"discovery\":\"dns\""), "{eps}");

        // A mesh sidecar switches to DNS when the service's policy says so.
        apply_policy(
            &cp,
            "[services.web]\ndiscovery = \"dns\"\nbalancer = \"round-robin\"\n",
        )?;
        let meshed = Process::start(
            "wf-proxy",
            &[
                "--control-plane",
                &url,
                "--admin",
                "127.0.0.1:0",
                "--dns-server",
                &server,
                "--dns-allow-local",
                "--upstream",
                &upstream,
            ],
            "wf-proxy listening",
        )?;
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let (_, eps) = admin_get(&meshed, "/endpoints").await?;
            if eps.contains(&format!("127.0.0.11:{port}")) {
                break;
            }
            if Instant::now() > deadline {
                bail!("the policy's DNS discovery never took effect: {eps}");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let seen = spread(meshed.addr("upstreams=web=")?, "web", 20).await?;
        assert_eq!(seen.get("web-1"), Some(&10), "{seen:?}");
        assert_eq!(seen.get("web-2"), Some(&10), "{seen:?}");
        drop(apps);
        Ok(())
    })
    .await
}

#[tokio::test]
async fn sigterm_lets_in_flight_requests_finish() -> Result<()> {
    bounded(async {
        let Running { cp, mut instances } = Scenario::new().instances("web", 1).start().await?;
        let mut web = instances.remove(0);
        let (_client, addr, _) = client(&cp, &[])?;
        assert_eq!(spread(addr, "web", 1).await?.get("web-1"), Some(&1));

        // A slow request is in flight when the sidecar is told to stop.
        let (status, _, _) =
            http_request(web.app_addr, "POST", "/fault?delay_ms=1000", "x", "").await?;
        assert_eq!(status, 200);
        let slow = tokio::spawn(async move { http_request(addr, "GET", "/slow", "web", "").await });
        tokio::time::sleep(Duration::from_millis(300)).await;
        let started = Instant::now();
        let exit = tokio::task::spawn_blocking(move || {
            let status = web.sidecar.terminate();
            (status, web)
        });
        let (status, _, body) = slow.await??;
        assert_eq!(status, 200, "the in-flight request was cut: {body}");
        assert!(body.contains("/slow"), "{body}");
        let (code, web) = exit.await?;
        assert!(code?.success());
        assert!(
            started.elapsed() >= Duration::from_millis(500),
            "exited before the request finished"
        );
        drop(web.app);
        Ok(())
    })
    .await
}

#[tokio::test]
async fn post_shutdown_on_the_admin_port_ends_the_sidecar_like_sigterm() -> Result<()> {
    bounded(async {
        let cp = ControlPlane::start(&[])?;
        let (_app, addr) = lab_app("web-1")?;
        let mut web = sidecar(&cp, "web", "web-1", addr, "tcp")?;
        wait_serving(&cp, "web", 1).await?;
        // Only POST, and only from this host (the admin port is loopback
        // here, so the refusal of others is the handler's own check).
        let admin = web.addr("admin=")?;
        let (status, _, _) = http_request(admin, "GET", "/shutdown", "admin", "").await?;
        assert_eq!(status, 405);
        let (status, _, body) = http_request(admin, "POST", "/shutdown", "admin", "").await?;
        assert_eq!(status, 200, "{body}");
        let exit = web.wait_exit(Duration::from_secs(5))?;
        assert!(exit.success(), "{exit:?}");
        // It left the mesh on its way out, as on SIGTERM.
        let (status, body) = cp.get("/v1/services/web").await?;
        assert!(status == 404 || !body.contains("web-1"), "{status} {body}");
        Ok(())
    })
    .await
}

#[tokio::test]
async fn post_shutdown_from_another_host_is_refused_even_on_an_open_admin_port() -> Result<()> {
    use wayfinder_tests::netns::{Lab, unavailable};
    if let Some(why) = unavailable() {
        eprintln!("skipped: {why}");
        return Ok(());
    }
    const TOKEN: &str = "shutdown-test-token";
    bounded(async {
        // web-1 in its own namespace with its admin port open to the bridge;
        // the test calls it from 10.77.0.254, another host.
        let mut lab = Lab::new("shut")?;
        lab.attach_host(254)?;
        let cp = ControlPlane::start_secure_on(
            &format!("{}:0", Lab::ip(254)),
            &["--join-token", &format!("{TOKEN}:web")],
        )?;
        let bundle = cp.bundle().to_string_lossy().to_string();
        let (_app, mut web) = lab.web(
            1,
            &cp.url(),
            &[
                "--ca-bundle",
                &bundle,
                "--join-token",
                TOKEN,
                "--admin",
                "0.0.0.0:15000",
            ],
        )?;
        let admin = SocketAddr::new(Lab::ip(11).into(), 15000);
        // Other admin pages answer there: the refusal is /shutdown's own.
        let (status, _, _) = http_request(admin, "GET", "/live", "admin", "").await?;
        assert_eq!(status, 200);
        let (status, _, body) = http_request(admin, "POST", "/shutdown", "admin", "").await?;
        assert_eq!(status, 403, "{body}");
        let log = web.await_log("POST /shutdown refused").await?;
        assert!(log.contains("10.77.0.254"), "{log}");
        assert!(
            web.wait_exit(Duration::from_millis(500)).is_err(),
            "the sidecar ended on a remote request"
        );
        let (status, body) = cp.get("/v1/services/web").await?;
        assert!(status == 200 && body.contains("web-1"), "{status} {body}");
        Ok(())
    })
    .await
}
