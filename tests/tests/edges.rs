//! The mesh's edges against callers who do not follow the protocol: paths
//! that mean one thing to a matcher and another to the app, apps forging
//! the mesh's signals, clients claiming identities, requests the proxy
//! cannot route safely. Real binaries, an mTLS mesh on loopback; each
//! attack gets a clear status and a log line naming it, and the mesh keeps
//! serving everyone else.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{Context, Result};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use wayfinder_tests::mesh::{admin_get, client, lab_app, served};
use wayfinder_tests::{
    ControlPlane, Process, Running, Scenario, bounded, finish_and_read, http_request, metric,
    slow_and_idle_closed,
};

const TOKEN: &str = "edges-test-token";

/// An mTLS mesh on loopback; every process is killed when it is dropped.
struct Mesh {
    _cp: ControlPlane,
    _app: Process,
    /// web-1's app, for its fault controls.
    app: SocketAddr,
    /// web-1's sidecar.
    web: Process,
    /// The client sidecar.
    caller: Process,
    /// The client sidecar's `web` listener.
    via: SocketAddr,
    /// The client sidecar's Host-routed listener.
    outbound: SocketAddr,
}

/// wf-control with `policy`, web-1 (lab-app and sidecar) and a client
/// sidecar, all certified with the join token.
async fn mesh(policy: &str) -> Result<Mesh> {
    let mut scenario = Scenario::new()
        .control_plane_args(&["--join-token", TOKEN])
        .instances("web", 1)
        .sidecar_args(&["--join-token", TOKEN]);
    if !policy.is_empty() {
        scenario = scenario.policy(policy);
    }
    let Running { cp, mut instances } = scenario.start().await?;
    let web1 = instances.remove(0);
    let (caller, via, outbound) = client(&cp, &["--join-token", TOKEN])?;
    Ok(Mesh {
        _cp: cp,
        _app: web1.app,
        app: web1.app_addr,
        web: web1.sidecar,
        caller,
        via,
        outbound,
    })
}

/// Sends raw bytes and returns the response head (status line and headers).
async fn raw_head(addr: SocketAddr, bytes: &[u8]) -> Result<String> {
    let mut s = tokio::net::TcpStream::connect(addr).await?;
    s.write_all(bytes).await?;
    let mut buf = Vec::new();
    let read = async {
        let mut chunk = [0u8; 4096];
        while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
            let n = s.read(&mut chunk).await?;
            if n == 0 {
                break;
            }
            buf.extend_from_slice(&chunk[..n]);
        }
        Ok::<_, std::io::Error>(())
    };
    tokio::time::timeout(Duration::from_secs(5), read)
        .await
        .context("no answer within 5 s")??;
    Ok(String::from_utf8_lossy(&buf).to_string())
}

/// Sends raw bytes and returns the answer up to the close (or 5 s).
async fn raw(addr: SocketAddr, bytes: &[u8]) -> Result<String> {
    let mut s = tokio::net::TcpStream::connect(addr).await?;
    s.write_all(bytes).await?;
    let mut buf = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut buf)).await;
    Ok(String::from_utf8_lossy(&buf).to_string())
}

fn path_of(body: &str) -> String {
    body.split("\"path\":\"")
        .nth(1)
        .and_then(|r| r.split('"').next())
        .unwrap_or("?")
        .to_string()
}

#[tokio::test]
async fn authorization_sees_the_path_the_app_sees() -> Result<()> {
    bounded(async {
        let policy = "[services.web.authz]\ndefault = \"deny\"\n\
            [[services.web.authz.allow]]\nfrom = [\"client\"]\nmethods = [\"GET\"]\npaths = [\"/public/\"]\n\
            [[services.web.authz.allow]]\nfrom = [\"client\"]\nmethods = [\"UPGRADE\"]\npaths = [\"/live/\"]\n";
        let m = mesh(policy).await?;
        let (web, via) = (&m.web, m.via);

        let (status, _, body) = http_request(via, "GET", "/public/page", "web", "").await?;
        assert_eq!((status, path_of(&body)), (200, "/public/page".into()), "{body}");
        // Resolved before matching, and the app gets the resolved path.
        let (status, _, body) = http_request(via, "GET", "/public/a/../b", "web", "").await?;
        assert_eq!((status, path_of(&body)), (200, "/public/b".into()), "{body}");
        for path in ["/public/../admin", "/public/%2e%2e/admin", "/public/./../admin", "//admin"] {
            let (status, head, _) = http_request(via, "GET", path, "web", "").await?;
            assert_eq!(status, 403, "{path}: {head}");
        }
        // `..;` is `..` to Tomcat and Spring: refused, not matched.
        for path in [
            "/public/..%2fadmin",
            "/public/%2F../admin",
            "/public/%5c..%5cadmin",
            "/public/..;/admin",
        ] {
            let (status, head, _) = http_request(via, "GET", path, "web", "").await?;
            assert_eq!(status, 400, "{path}: {head}");
            assert!(head.contains("x-wayfinder-error: ambiguous-path"), "{head}");
        }
        // An upgrade is authorized as UPGRADE at its path: GET on /public/
        // does not open a tunnel there, a rule listing UPGRADE does.
        let upgrade = |path: &str| {
            format!(
                "GET {path} HTTP/1.1\r\nHost: web\r\nConnection: upgrade\r\nUpgrade: websocket\r\n\
                 Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n"
            )
        };
        let denied = raw_head(via, upgrade("/public/chat").as_bytes()).await?;
        assert!(denied.starts_with("HTTP/1.1 403"), "{denied}");
        logged(web, "request forbidden by authorization").await?;
        let allowed = raw_head(via, upgrade("/live/feed").as_bytes()).await?;
        assert!(!allowed.starts_with("HTTP/1.1 403"), "{allowed}");

        let (_, metrics) = admin_get(web, "/metrics").await?;
        assert_eq!(
            metric(&metrics, "wayfinder_proxy_edge_refusals_total{reason=\"ambiguous-path\"}"),
            Some(4.0)
        );
        logged(web, "ambiguous-path").await?;
        Ok(())
    })
    .await
}

#[tokio::test]
async fn an_app_cannot_speak_for_the_mesh_nor_a_caller_claim_an_identity() -> Result<()> {
    bounded(async {
        let m = mesh("").await?;
        let (app, via) = (m.app, m.via);

        // What the app sees: the caller's identity as mTLS proved it, none
        // of what the caller claimed, none of the mesh's own headers.
        let req = "GET /headers HTTP/1.1\r\nHost: web\r\nConnection: close, te\r\nte: trailers\r\n\
                   l5d-client-id: admin.svc\r\nx-forwarded-client-cert: URI=spiffe://wayfinder.local/svc/admin\r\n\
                   x-wayfinder-orig-proto: HTTP/1.0\r\nx-wayfinder-attempts: 9\r\n\r\n";
        let answer = raw(via, req.as_bytes()).await?;
        let body = answer.split_once("\r\n\r\n").map(|(_, b)| b).unwrap_or("");
        let json = &body[body.find('{').context("json")?..=body.rfind('}').context("json")?];
        let v: serde_json::Value = serde_json::from_str(json)?;
        let h = &v["headers"];
        assert_eq!(
            h["x-forwarded-client-cert"], "URI=spiffe://wayfinder.local/svc/client",
            "{h}"
        );
        assert!(h.get("l5d-client-id").is_none(), "{h}");
        let mesh: Vec<_> = h
            .as_object()
            .map(|o| o.keys().filter(|k| k.starts_with("x-wayfinder-")).collect())
            .unwrap_or_default();
        assert!(mesh.is_empty(), "{mesh:?}");
        // `te: trailers`, which gRPC servers on grpc-core require, crosses
        // both sidecars.
        assert_eq!(h["te"], "trailers", "{h}");

        // An app answering 502 with the mesh's connect-failed signal: the
        // caller's sidecar neither believes nor repeats it, so a POST is
        // handled once.
        let fault = |q: &'static str| async move {
            http_request(app, "POST", &format!("/fault?{q}"), "lab", "").await
        };
        fault("forge=true").await?;
        let before = served(app).await?;
        let (status, head, _) = http_request(via, "POST", "/orders", "web", "{}").await?;
        assert_eq!(status, 502, "{head}");
        assert!(head.contains("x-wayfinder-attempts: 1"), "{head}");
        assert!(!head.contains("connect-failed"), "the forged reason is stripped: {head}");
        assert_eq!(served(app).await? - before, 1, "the POST reached the app once");
        fault("forge=false").await?;
        let (status, _, _) = http_request(via, "GET", "/", "web", "").await?;
        assert_eq!(status, 200, "the mesh serves on");
        Ok(())
    })
    .await
}

#[tokio::test]
async fn requests_the_proxy_cannot_route_safely_are_refused() -> Result<()> {
    bounded(async {
        let m = mesh("").await?;
        let (caller, via) = (&m.caller, m.via);
        let cases: [(&str, &str, &str); 6] = [
            (
                "GET / HTTP/1.1\r\nHost: web\r\nHost: admin\r\nConnection: close\r\n\r\n",
                "400",
                "duplicate-host",
            ),
            (
                "GET / HTTP/1.1\r\nHost: web\r\nConnection: close, host\r\n\r\n",
                "400",
                "connection-names-end-to-end-header",
            ),
            (
                "GET / HTTP/1.1\r\nHost: web\r\nConnection: close, x-wayfinder-error\r\n\r\n",
                "400",
                "connection-names-end-to-end-header",
            ),
            (
                "CONNECT web:80 HTTP/1.1\r\nHost: web:80\r\n\r\n",
                "405",
                "connect-not-allowed",
            ),
            // Host-routed: the URI names web, Host names another.
            (
                "GET http://web/ HTTP/1.1\r\nHost: admin\r\nConnection: close\r\n\r\n",
                "400",
                "host-mismatch",
            ),
            // Host-routed to a name nobody registered: no upstream is made.
            (
                "GET / HTTP/1.1\r\nHost: nosuch\r\nConnection: close\r\n\r\n",
                "404",
                "unknown-service",
            ),
        ];
        for (req, status, reason) in cases {
            let to = if req.starts_with("GET http://") || req.contains("nosuch") {
                m.outbound
            } else {
                via
            };
            let answer = raw_head(to, req.as_bytes()).await?;
            assert!(
                answer.starts_with(&format!("HTTP/1.1 {status}")),
                "{req:?}: {answer}"
            );
            assert!(
                answer
                    .to_ascii_lowercase()
                    .contains(&format!("x-wayfinder-error: {reason}")),
                "{answer}"
            );
            logged(caller, reason).await?;
            let (ok, _, _) = http_request(via, "GET", "/", "web", "").await?;
            assert_eq!(ok, 200, "everyone else is still served");
        }
        let (_, upstreams) = admin_get(caller, "/endpoints").await?;
        assert!(!upstreams.contains("nosuch"), "{upstreams}");
        Ok(())
    })
    .await
}

/// Waits (2 s at most) for `what` in `p`'s log: its reader runs apart.
async fn logged(p: &Process, what: &str) -> Result<()> {
    let deadline = std::time::Instant::now() + Duration::from_secs(2);
    while !p.log_text().contains(what) {
        anyhow::ensure!(
            std::time::Instant::now() < deadline,
            "{what} not logged: {}",
            p.log_text()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(())
}

#[tokio::test]
async fn dns_discovery_never_dials_loopback_or_metadata_addresses_unless_allowed() -> Result<()> {
    bounded(async {
        // A name that resolves to this host and to the clouds' metadata
        // address, as a hostile or careless DNS record would.
        let (_app, app) = lab_app("local-1")?;
        let dns = wayfinder_tests::DnsServer::start("127.0.0.1:0".parse()?, 1).await?;
        let ip = match app.ip() {
            std::net::IpAddr::V4(v4) => v4,
            std::net::IpAddr::V6(_) => anyhow::bail!("lab-app on IPv6"),
        };
        dns.records
            .lock()
            .map_err(|_| anyhow::anyhow!("poisoned"))?
            .insert(
                "web".into(),
                vec![ip, std::net::Ipv4Addr::new(169, 254, 169, 254)],
            );
        let cp = ControlPlane::start(&[])?;
        let (url, server) = (cp.url(), dns.addr.to_string());
        let upstream = format!("web:{}=127.0.0.1:0", app.port());
        let start = |extra: &[&str]| {
            let mut args = vec![
                "--control-plane",
                &url,
                "--admin",
                "127.0.0.1:0",
                "--discovery",
                "dns",
                "--dns-server",
                &server,
                "--upstream",
                &upstream,
            ];
            args.extend_from_slice(extra);
            Process::start("wf-proxy", &args, "wf-proxy listening")
        };
        let strict = start(&[])?;
        let (status, head, _) = http_request(strict.addr("web=")?, "GET", "/", "web", "").await?;
        assert_eq!(status, 503, "{head}");
        assert!(head.contains("x-wayfinder-error: no-endpoints"), "{head}");
        logged(&strict, "loopback or link-local").await?;
        // The operator may allow it (a lab whose DNS answers with loopback).
        let allowed = start(&["--dns-allow-local"])?;
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        loop {
            let (status, _, body) =
                http_request(allowed.addr("web=")?, "GET", "/", "web", "").await?;
            if status == 200 && body.contains("local-1") {
                break;
            }
            anyhow::ensure!(std::time::Instant::now() < deadline, "{status} {body}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        Ok(())
    })
    .await
}

/// Reads from `s` until `buf` holds `end` (5 s at most).
async fn read_until(s: &mut tokio::net::TcpStream, buf: &mut Vec<u8>, end: &[u8]) -> Result<()> {
    let read = async {
        let mut chunk = [0u8; 4096];
        while !buf.windows(end.len()).any(|w| w == end) {
            let n = s.read(&mut chunk).await?;
            anyhow::ensure!(n > 0, "closed: {}", String::from_utf8_lossy(buf));
            buf.extend_from_slice(&chunk[..n]);
        }
        Ok(())
    };
    tokio::time::timeout(Duration::from_secs(5), read)
        .await
        .context("no answer within 5 s")?
}

#[tokio::test]
async fn a_service_whose_policy_allows_tunnels_takes_connect() -> Result<()> {
    bounded(async {
        let m = mesh("[services.web]\ntunnels = true\n").await?;
        // Through the tunnel, bytes reach web's app as opaque TCP over mTLS
        // (its sidecar authorizes it as TCP): here, an HTTP request the sidecars never parse.
        let mut s = tokio::net::TcpStream::connect(m.outbound).await?;
        s.write_all(b"CONNECT web:80 HTTP/1.1\r\nHost: web:80\r\n\r\n")
            .await?;
        let mut buf = Vec::new();
        read_until(&mut s, &mut buf, b"\r\n\r\n").await?;
        let head = String::from_utf8_lossy(&buf).to_string();
        assert!(head.starts_with("HTTP/1.1 200"), "{head}");
        s.write_all(b"GET / HTTP/1.1\r\nHost: lab\r\nConnection: close\r\n\r\n")
            .await?;
        let mut answer = Vec::new();
        read_until(&mut s, &mut answer, b"\"instance\":\"web-1\"").await?;
        drop(s);
        // Counted as opaque bytes when the relay ends.
        let deadline = std::time::Instant::now() + Duration::from_secs(2);
        loop {
            let (_, metrics) = admin_get(&m.caller, "/metrics").await?;
            let sent = metric(
                &metrics,
                "wayfinder_proxy_tcp_bytes_total{direction=\"outbound\",flow=\"from_client\"}",
            );
            if sent > Some(0.0) {
                break;
            }
            anyhow::ensure!(std::time::Instant::now() < deadline, "{metrics}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        // Tunnels go to services, never to addresses; and only where allowed.
        for req in [
            "CONNECT 127.0.0.1:22 HTTP/1.1\r\nHost: 127.0.0.1:22\r\n\r\n",
            "CONNECT api:80 HTTP/1.1\r\nHost: api:80\r\n\r\n",
        ] {
            let answer = raw_head(m.outbound, req.as_bytes()).await?;
            assert!(
                answer.starts_with("HTTP/1.1 405") || answer.starts_with("HTTP/1.1 404"),
                "{req:?}: {answer}"
            );
        }
        Ok(())
    })
    .await
}

#[tokio::test]
async fn any_http_method_is_proxied_and_half_sent_methods_cost_no_cpu() -> Result<()> {
    bounded(async {
        let m = mesh("").await?;
        // Methods outside the detector's own list (WebDAV, QUERY, lowercase)
        // are HTTP: the proxy answers with its attempts header, where an
        // opaque relay would hand back only the app's bytes.
        for method in ["PROPFIND", "QUERY", "purge"] {
            let head = raw_head(
                m.via,
                format!("{method} /x HTTP/1.1\r\nHost: web\r\nContent-Length: 0\r\n\r\n")
                    .as_bytes(),
            )
            .await?;
            assert!(head.starts_with("HTTP/1.1 "), "{method}: {head}");
            assert!(
                head.contains("x-wayfinder-attempts: 1"),
                "{method} went as HTTP: {head}"
            );
        }

        // Clients that send one byte of a method and wait are waited for
        // on the socket, not by polling it: a long window, 300 of them.
        let (slow, via, _) = client(&m._cp, &["--join-token", TOKEN, "--detect-timeout", "20s"])?;
        let mut waiting = Vec::new();
        for _ in 0..300 {
            let mut s = tokio::net::TcpStream::connect(via).await?;
            s.write_all(b"G").await?;
            waiting.push(s);
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
        let before = slow.cpu_time()?;
        tokio::time::sleep(Duration::from_secs(2)).await;
        let spent = slow.cpu_time()? - before;
        assert!(
            spent < Duration::from_millis(300),
            "300 half-sent methods cost {spent:?} of CPU in 2 s"
        );
        // The rest of a method wakes its connection at once.
        let mut last = waiting.pop().context("a client")?;
        let answer = finish_and_read(
            &mut last,
            b"ET /x HTTP/1.1\r\nHost: web\r\nConnection: close\r\n\r\n",
        )
        .await?;
        assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
        Ok(())
    })
    .await
}

#[tokio::test]
async fn a_name_nobody_serves_is_asked_for_less_and_less_often() -> Result<()> {
    bounded(async {
        let dns = wayfinder_tests::DnsServer::start("127.0.0.1:0".parse()?, 1).await?;
        let cp = ControlPlane::start(&[])?;
        let (url, server) = (cp.url(), dns.addr.to_string());
        let _sidecar = Process::start(
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
                "--upstream",
                "ghost:80=127.0.0.1:0",
            ],
            "wf-proxy listening",
        )?;
        // NXDOMAIN at 0 s, then waits of 1, 2 and 4 s: four lookups in the
        // first 6.5 s where a fixed second between them made seven.
        tokio::time::sleep(Duration::from_millis(6500)).await;
        let asked = dns.asked("ghost");
        // Each lookup asks for A and AAAA.
        assert!(
            (4..=10).contains(&asked),
            "{asked} queries for a name that does not exist in 6.5 s"
        );
        Ok(())
    })
    .await
}

/// Open file descriptors of `p`.
fn descriptors(p: &Process) -> Result<usize> {
    let pid = p.pid().context("running")?;
    Ok(std::fs::read_dir(format!("/proc/{pid}/fd"))?.count())
}

#[tokio::test]
async fn silent_sockets_are_not_amplified_into_endpoint_connections() -> Result<()> {
    bounded(async {
        let m = mesh("").await?;
        let (sidecar, via, _) = client(
            &m._cp,
            &[
                "--join-token",
                TOKEN,
                "--detect-timeout",
                "20ms",
                "--max-silent-races",
                "8",
            ],
        )?;
        // One call, so the client's own connections to web-1 exist before counting.
        let (status, _, _) = http_request(via, "GET", "/", "web", "").await?;
        assert_eq!(status, 200);
        let before = descriptors(&sidecar)?;
        let mut silent = Vec::new();
        for _ in 0..200 {
            silent.push(tokio::net::TcpStream::connect(via).await?);
        }
        tokio::time::sleep(Duration::from_millis(800)).await;
        let grown = descriptors(&sidecar)? - before;
        // One descriptor per accepted socket, and at most 8 endpoint
        // connections racing for them (each dial was one more before).
        assert!(
            grown <= 200 + 8 + 4,
            "200 silent sockets cost {grown} descriptors"
        );
        let (_, metrics) = admin_get(&sidecar, "/metrics").await?;
        let capped = metric(&metrics, "wayfinder_proxy_silent_races_capped_total").unwrap_or(0.0);
        assert!(
            capped >= 190.0,
            "{capped} silent clients left to speak first"
        );
        // A silent client beyond the cap that speaks HTTP is still served.
        let mut last = silent.pop().context("a socket")?;
        let answer = finish_and_read(
            &mut last,
            b"GET / HTTP/1.1\r\nHost: web\r\nConnection: close\r\n\r\n",
        )
        .await?;
        assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
        Ok(())
    })
    .await
}

#[tokio::test]
async fn the_admin_port_closes_slow_and_idle_clients() -> Result<()> {
    bounded(async {
        let cp = ControlPlane::start(&[])?;
        let (sidecar, _, _) = client(&cp, &["--admin-header-timeout", "500ms"])?;
        let admin = sidecar.addr("admin=")?;
        let took = slow_and_idle_closed(admin).await?;
        assert!(took < Duration::from_secs(3), "{took:?}");
        // More silent connections than the cap: each is closed after the
        // header timeout, so a real request still gets through soon.
        let mut held = Vec::new();
        for _ in 0..100 {
            held.push(tokio::net::TcpStream::connect(admin).await?);
        }
        let (status, _) =
            tokio::time::timeout(Duration::from_secs(4), admin_get(&sidecar, "/live"))
                .await
                .context("/live answered beside 100 silent connections")??;
        assert_eq!(status, 200);
        drop(held);
        Ok(())
    })
    .await
}

#[tokio::test]
async fn an_idle_http2_connection_is_closed() -> Result<()> {
    bounded(async {
        let Running {
            cp,
            instances: _web,
        } = Scenario::new().instances("web", 1).start().await?;
        let (_sidecar, via, _) = client(&cp, &["--http2-idle-timeout", "500ms"])?;
        let io = hyper_util::rt::TokioIo::new(tokio::net::TcpStream::connect(via).await?);
        let (mut sender, conn) =
            hyper::client::conn::http2::handshake(hyper_util::rt::TokioExecutor::new(), io).await?;
        let driver = tokio::spawn(conn);
        let req =
            hyper::Request::get("http://web/").body(http_body_util::Empty::<bytes::Bytes>::new())?;
        let resp = sender.send_request(req).await?;
        assert_eq!(resp.status(), 200);
        drop(resp);
        // No request for longer than the idle timeout: the sidecar says
        // GOAWAY and the connection ends.
        tokio::time::timeout(Duration::from_secs(3), driver)
            .await
            .context("the idle HTTP/2 connection is closed within 3 s")???;
        Ok(())
    })
    .await
}

#[tokio::test]
async fn a_full_listener_holds_new_clients_until_one_leaves() -> Result<()> {
    bounded(async {
        let Running {
            cp,
            instances: _web,
        } = Scenario::new().instances("web", 1).start().await?;
        let (sidecar, via, _) = client(&cp, &["--max-connections", "3"])?;
        let mut held = Vec::new();
        for _ in 0..3 {
            let mut s = tokio::net::TcpStream::connect(via).await?;
            // A served request keeps each connection open (keep-alive).
            s.write_all(b"GET / HTTP/1.1\r\nHost: web\r\n\r\n").await?;
            let mut buf = [0u8; 1024];
            let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf))
                .await
                .context("served")??;
            assert!(buf[..n].starts_with(b"HTTP/1.1 200"));
            held.push(s);
        }
        // A fourth client waits in the accept queue, unanswered...
        let mut fourth = tokio::net::TcpStream::connect(via).await?;
        fourth
            .write_all(b"GET / HTTP/1.1\r\nHost: web\r\nConnection: close\r\n\r\n")
            .await?;
        let mut buf = Vec::new();
        let early =
            tokio::time::timeout(Duration::from_millis(500), fourth.read_to_end(&mut buf)).await;
        assert!(
            early.is_err(),
            "served past the cap: {}",
            String::from_utf8_lossy(&buf)
        );
        // ...until one of the three leaves.
        drop(held.pop());
        tokio::time::timeout(Duration::from_secs(5), fourth.read_to_end(&mut buf))
            .await
            .context("served once a slot is free")??;
        assert!(String::from_utf8_lossy(&buf).starts_with("HTTP/1.1 200"));
        let (_, metrics) = admin_get(&sidecar, "/metrics").await?;
        assert!(
            metric(
                &metrics,
                "wayfinder_proxy_listener_full_total{direction=\"outbound\"}"
            )
            .is_some_and(|n| n >= 1.0),
            "the full listener is counted"
        );
        Ok(())
    })
    .await
}

/// A value of `name` in `p`'s metrics (0 when absent).
async fn sidecar_metric(p: &Process, name: &str) -> Result<f64> {
    let (_, text) = admin_get(p, "/metrics").await?;
    Ok(metric(&text, name).unwrap_or(0.0))
}

#[tokio::test]
async fn hosts_past_the_upstream_cap_are_refused_and_unused_upstreams_are_evicted() -> Result<()> {
    use wayfinder_proto::v1::registry_client::RegistryClient;
    use wayfinder_proto::v1::{Health, Instance, RegisterRequest};
    bounded(async {
        let cp = ControlPlane::start(&[])?;
        let (_app, app) = lab_app("any")?;
        // 40 services in the catalog, each one static endpoint on the app.
        let mut reg = RegistryClient::new(cp.channel().await?);
        for i in 0..40 {
            reg.register(RegisterRequest {
                instance: Some(Instance {
                    service: format!("svc-{i}"),
                    instance_id: format!("svc-{i}-1"),
                    address: app.ip().to_string(),
                    port: app.port().into(),
                    ..Default::default()
                }),
                static_endpoint: true,
                initial_health: Health::Serving as i32,
                ..Default::default()
            })
            .await?;
        }
        let (sidecar, _, outbound) = client(
            &cp,
            &["--max-upstreams", "30", "--upstream-idle-timeout", "2s"],
        )?;
        // The sidecar's own watches (its listener's service, the catalog),
        // once they are open.
        let watchers_before = loop {
            let w = cp_metric(&cp, "wayfinder_control_watchers").await?;
            tokio::time::sleep(Duration::from_millis(300)).await;
            if w >= 1.0 && w == cp_metric(&cp, "wayfinder_control_watchers").await? {
                break w;
            }
        };
        for i in 0..30 {
            let (status, _, _) =
                http_request(outbound, "GET", "/", &format!("svc-{i}"), "").await?;
            assert_eq!(status, 200, "svc-{i}");
        }
        // The 31st Host would be one more upstream than the cap.
        let head = raw_head(
            outbound,
            b"GET / HTTP/1.1\r\nHost: svc-30\r\nConnection: close\r\n\r\n",
        )
        .await?;
        assert!(head.starts_with("HTTP/1.1 503"), "{head}");
        assert!(head.contains("x-wayfinder-error: upstream-limit"), "{head}");
        // 30 Host-routed upstreams and the pinned `web` listener's.
        assert_eq!(
            sidecar_metric(&sidecar, "wayfinder_proxy_upstreams").await?,
            31.0
        );
        assert_eq!(
            cp_metric(&cp, "wayfinder_control_watchers").await? - watchers_before,
            30.0
        );
        let (_, text) = admin_get(&sidecar, "/metrics").await?;
        assert!(text.contains("upstream=\"svc-7\""), "series while in use");

        // Unused for the idle timeout: evicted, their watches closed on
        // wf-control, their series gone; the listener's upstream stays.
        let evicted = async {
            loop {
                if sidecar_metric(&sidecar, "wayfinder_proxy_upstreams").await? == 1.0 {
                    return anyhow::Ok(());
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        };
        tokio::time::timeout(Duration::from_secs(8), evicted)
            .await
            .context("upstreams not evicted within 8 s of an idle timeout of 2 s")??;
        assert_eq!(
            sidecar_metric(&sidecar, "wayfinder_proxy_upstreams_evicted_total").await?,
            30.0
        );
        let (_, text) = admin_get(&sidecar, "/metrics").await?;
        assert!(
            !text.contains("upstream=\"svc-7\""),
            "series of an evicted upstream"
        );
        let closed = async {
            while cp_metric(&cp, "wayfinder_control_watchers").await? != watchers_before {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            anyhow::Ok(())
        };
        tokio::time::timeout(Duration::from_secs(3), closed)
            .await
            .context("the evicted upstreams' watches stayed open on wf-control")??;
        // Room again, for a new name and for an evicted one.
        for host in ["svc-30", "svc-0"] {
            let (status, _, _) = http_request(outbound, "GET", "/", host, "").await?;
            assert_eq!(status, 200, "{host}");
        }
        Ok(())
    })
    .await
}

/// A value of `name` in wf-control's metrics.
async fn cp_metric(cp: &ControlPlane, name: &str) -> Result<f64> {
    let (_, text) = cp.get("/metrics").await?;
    metric(&text, name).with_context(|| format!("no {name} in wf-control's metrics"))
}

#[tokio::test]
async fn grpc_connections_are_capped_and_silent_or_idle_ones_closed_but_watches_kept() -> Result<()>
{
    use wayfinder_proto::v1::discovery_client::DiscoveryClient;
    use wayfinder_proto::v1::registry_client::RegistryClient;
    use wayfinder_proto::v1::{
        Health, Instance, RegisterRequest, ServiceWatch, WatchRequest, watch_event,
    };
    bounded(async {
        let cp = ControlPlane::start(&[
            "--max-grpc-connections",
            "3",
            "--grpc-header-timeout",
            "1s",
            "--grpc-idle-timeout",
            "1s",
        ])?;
        let grpc: SocketAddr = cp.url().trim_start_matches("http://").parse()?;
        // A watch: in flight as long as it streams, so its connection stays.
        let mut watch = DiscoveryClient::new(cp.channel().await?)
            .watch(WatchRequest {
                services: vec![ServiceWatch {
                    name: "db".into(),
                    last_version: 0,
                }],
                node: "edges".into(),
                ..Default::default()
            })
            .await?
            .into_inner();
        watch.message().await?.context("first snapshot")?;
        // Two silent sockets fill the port (the watch holds the third slot).
        let mut silent = Vec::new();
        for _ in 0..2 {
            silent.push(tokio::net::TcpStream::connect(grpc).await?);
        }
        // A call now waits in the accept queue until the silent sockets
        // are closed at the first-request timeout.
        let started = std::time::Instant::now();
        let mut reg = RegistryClient::new(cp.channel().await?);
        reg.register(RegisterRequest {
            instance: Some(Instance {
                service: "db".into(),
                instance_id: "db-1".into(),
                address: "127.0.0.1".into(),
                port: 5432,
                ..Default::default()
            }),
            static_endpoint: true,
            initial_health: Health::Serving as i32,
            ..Default::default()
        })
        .await?;
        let waited = started.elapsed();
        assert!(
            waited >= Duration::from_millis(700),
            "a call got through a full port in {waited:?}"
        );
        for mut s in silent {
            // The server's SETTINGS, its GOAWAY, then the end.
            let mut got = Vec::new();
            let _ = tokio::time::timeout(Duration::from_secs(3), s.read_to_end(&mut got))
                .await
                .context("a silent connection was left open")?;
        }
        assert!(cp_metric(&cp, "wayfinder_control_grpc_listener_full_total").await? >= 1.0);
        // The registration's connection idles out; the watch's does not:
        // the change still reaches it well after the idle timeout.
        tokio::time::sleep(Duration::from_millis(2500)).await;
        assert!(cp_metric(&cp, "wayfinder_control_grpc_idle_closed_total").await? >= 3.0);
        let event = tokio::time::timeout(Duration::from_secs(3), watch.message())
            .await
            .context("the watch went quiet")??
            .context("the watch ended")?;
        let added = match event.kind {
            Some(watch_event::Kind::Delta(d)) => d.added.len(),
            Some(watch_event::Kind::Snapshot(s)) => s.endpoints.len(),
            None => 0,
        };
        assert_eq!(added, 1, "db-1 reached the watch");
        // The watch's connection is all that is left.
        assert_eq!(
            cp_metric(&cp, "wayfinder_control_grpc_connections").await?,
            1.0
        );
        Ok(())
    })
    .await
}

#[tokio::test]
async fn crafted_traffic_reports_saturate_and_one_caller_keeps_at_most_its_share_of_edges()
-> Result<()> {
    use wayfinder_proto::v1::telemetry_client::TelemetryClient;
    use wayfinder_proto::v1::{EdgeTraffic, TrafficReport};
    bounded(async {
        let cp = ControlPlane::start(&[])?;
        let mut telemetry = TelemetryClient::new(cp.channel().await?);
        let edge = |callee: String, requests: u64| EdgeTraffic {
            callee,
            requests,
            errors: 0,
            latency_buckets: vec![0; wayfinder_proto::latency::BUCKETS],
            backend: String::new(),
        };
        // Twice the most a counter holds: the sum saturates, never wraps.
        for _ in 0..2 {
            telemetry
                .report(TrafficReport {
                    node: "n-1".into(),
                    service: "client".into(),
                    edges: vec![edge("web".into(), u64::MAX)],
                    mirrors: Vec::new(),
                    status: None,
                })
                .await?;
        }
        // One caller reporting 1,100 callees keeps 1,000 of them.
        for chunk in 0..11 {
            telemetry
                .report(TrafficReport {
                    node: "n-2".into(),
                    service: "greedy".into(),
                    edges: (0..100)
                        .map(|i| edge(format!("s{}", chunk * 100 + i), 1))
                        .collect(),
                    mirrors: Vec::new(),
                    status: None,
                })
                .await?;
        }
        let (_, dash) = cp.get("/v1/dashboard").await?;
        let v: serde_json::Value = serde_json::from_str(&dash)?;
        let edges = v["edges"].as_array().context("edges")?;
        let web = edges
            .iter()
            .find(|e| e["caller"] == "client" && e["callee"] == "web")
            .context("client -> web")?;
        assert_eq!(web["requests"].as_u64(), Some(u64::MAX));
        let greedy = edges.iter().filter(|e| e["caller"] == "greedy").count();
        assert_eq!(greedy, 1_000);
        assert_eq!(
            cp_metric(&cp, "wayfinder_control_traffic_edges_dropped_total").await?,
            100.0
        );
        Ok(())
    })
    .await
}
