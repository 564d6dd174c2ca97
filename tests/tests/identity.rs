//! End-to-end tests of identity: wf-control as the CA, sidecars that get
//! certificates with a join token and speak mTLS to each other, strict and
//! permissive inbound sides, authorization by caller, renewal under load,
//! the control plane's own TLS, and every kind of bad input refused.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use wayfinder_proto::v1::{
    CertifyRequest, Health, Instance, RegisterRequest, identity_client::IdentityClient,
    registry_client::RegistryClient,
};
use wayfinder_tests::mesh::{admin_get, client, lab_app, sidecar_with, wait_serving};
use wayfinder_tests::{ControlPlane, Process, apply_policy, bounded, http_request, metric};

const TOKEN: &str = "lab-token-0123456789";

/// A `web` instance whose sidecar has an identity.
fn web(cp: &ControlPlane, extra: &[&str]) -> Result<(Process, Process)> {
    let (app, addr) = lab_app("web-1")?;
    let mut args = vec!["--join-token", TOKEN];
    args.extend_from_slice(extra);
    let sidecar = sidecar_with(cp, "web", "web-1", addr, "/healthz", &args)?;
    Ok((app, sidecar))
}

/// Sends raw bytes and returns whatever comes back before the close.
async fn raw(addr: SocketAddr, bytes: &[u8]) -> Result<Vec<u8>> {
    let mut s = tokio::net::TcpStream::connect(addr).await?;
    s.write_all(bytes).await?;
    let mut buf = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut buf))
        .await
        .context("the connection was neither answered nor closed")?;
    Ok(buf)
}

async fn metric_of(p: &Process, name: &str) -> Result<f64> {
    let (_, m) = admin_get(p, "/metrics").await?;
    Ok(metric(&m, name).unwrap_or(0.0))
}

/// A TLS client with `cert`/`key` (any CA) that trusts the mesh's roots.
fn tls_client(
    cp: &ControlPlane,
    chain: Vec<Vec<u8>>,
    key: &rcgen::KeyPair,
) -> Result<tokio_rustls::TlsConnector> {
    use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, pem::PemObject};
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_file_iter(cp.data.path().join("ca/bundle.crt"))? {
        roots.add(c?)?;
    }
    let cfg = rustls::ClientConfig::builder()
        .with_root_certificates(roots)
        .with_client_auth_cert(
            chain.into_iter().map(CertificateDer::from).collect(),
            PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())),
        )?;
    Ok(tokio_rustls::TlsConnector::from(Arc::new(cfg)))
}

/// A handshake to `addr` as `web.svc.wayfinder.local` with `connector`.
async fn handshake(addr: SocketAddr, connector: &tokio_rustls::TlsConnector) -> Result<()> {
    let tcp = tokio::net::TcpStream::connect(addr).await?;
    let name = rustls::pki_types::ServerName::try_from("web.svc.wayfinder.local")?;
    let mut tls = connector.connect(name, tcp).await?;
    // TLS 1.3 servers reject a client certificate after the handshake: read.
    tls.write_all(b"GET / HTTP/1.1\r\nHost: web\r\n\r\n")
        .await?;
    let mut buf = [0u8; 64];
    let n = tls.read(&mut buf).await?;
    anyhow::ensure!(n > 0, "closed");
    Ok(())
}

fn self_signed_client() -> Result<(Vec<Vec<u8>>, rcgen::KeyPair)> {
    let key = rcgen::KeyPair::generate()?;
    let mut p = rcgen::CertificateParams::new(vec!["client.svc.wayfinder.local".to_string()])?;
    p.subject_alt_names.push(rcgen::SanType::URI(
        "spiffe://wayfinder.local/svc/client".try_into()?,
    ));
    let cert = p.self_signed(&key)?;
    Ok((vec![cert.der().to_vec()], key))
}

/// A client certificate signed by the mesh's own intermediate, but expired.
fn expired_mesh_client(cp: &ControlPlane) -> Result<(Vec<Vec<u8>>, rcgen::KeyPair)> {
    let ca = cp.data.path().join("ca");
    let int_key = rcgen::KeyPair::from_pem(&std::fs::read_to_string(ca.join("intermediate.key"))?)?;
    let int_pem = std::fs::read_to_string(ca.join("intermediate.crt"))?;
    let issuer = rcgen::Issuer::from_ca_cert_pem(&int_pem, int_key)?;
    let key = rcgen::KeyPair::generate()?;
    let mut p = rcgen::CertificateParams::new(vec!["client.svc.wayfinder.local".to_string()])?;
    p.subject_alt_names.push(rcgen::SanType::URI(
        "spiffe://wayfinder.local/svc/client".try_into()?,
    ));
    p.not_before = rcgen::date_time_ymd(2020, 1, 1);
    p.not_after = rcgen::date_time_ymd(2020, 1, 2);
    let cert = p.signed_by(&key, &issuer)?;
    let int_der = {
        use rustls::pki_types::{CertificateDer, pem::PemObject};
        CertificateDer::from_pem_slice(int_pem.as_bytes())?.to_vec()
    };
    Ok((vec![cert.der().to_vec(), int_der], key))
}

#[tokio::test]
async fn sidecars_speak_mtls_and_a_strict_inbound_refuses_everything_else() -> Result<()> {
    bounded(async {
        let cp = ControlPlane::start(&["--join-token", TOKEN])?;
        let (_app, web) = web(&cp, &[])?;
        wait_serving(&cp, "web", 1).await?;
        let (caller, via, _) = client(&cp, &["--join-token", TOKEN])?;
        let (status, _, body) = http_request(via, "GET", "/", "web", "").await?;
        assert_eq!(status, 200, "{body}");
        let inbound = web.addr("inbound=")?;

        // Plaintext HTTP straight to the inbound side: closed, unanswered.
        let got = raw(inbound, b"GET / HTTP/1.1\r\nHost: web\r\n\r\n").await?;
        assert!(got.is_empty(), "{}", String::from_utf8_lossy(&got));
        // TLS garbage.
        let got = raw(inbound, &[0x16, 0x03, 0x01, 0x00, 0x04, 0xde, 0xad, 0xbe, 0xef]).await?;
        assert!(got.is_empty());
        // A certificate from another CA, and an expired one from the mesh's CA.
        let (chain, key) = self_signed_client()?;
        assert!(handshake(inbound, &tls_client(&cp, chain, &key)?).await.is_err(), "foreign CA accepted");
        let (chain, key) = expired_mesh_client(&cp)?;
        assert!(handshake(inbound, &tls_client(&cp, chain, &key)?).await.is_err(), "expired certificate accepted");

        let refused = |r: &str| format!("wayfinder_proxy_inbound_refused_total{{reason=\"{r}\"}}");
        assert_eq!(metric_of(&web, &refused("plaintext")).await?, 1.0);
        assert_eq!(metric_of(&web, &refused("handshake")).await?, 3.0);
        let log = web.await_log("reason=\"handshake\"").await?;
        assert_eq!(log.matches("reason=\"handshake\"").count(), 1, "each kind is logged once: {log}");

        // The mesh traffic itself never failed.
        let (status, _, _) = http_request(via, "GET", "/again", "web", "").await?;
        assert_eq!(status, 200);
        assert_eq!(
            metric_of(&caller, "wayfinder_proxy_requests_total{direction=\"outbound\",upstream=\"web\",status=\"2xx\"}").await?,
            2.0
        );
        Ok(())
    })
    .await
}

#[tokio::test]
async fn a_client_refuses_a_server_that_is_not_the_service_it_meant() -> Result<()> {
    bounded(async {
        let cp = ControlPlane::start(&["--join-token", TOKEN])?;
        let (_app, web) = web(&cp, &[])?;
        wait_serving(&cp, "web", 1).await?;
        // `api` claims to be at web's sidecar: its certificate says web.
        let inbound = web.addr("inbound=")?;
        let mut reg = RegistryClient::new(cp.channel().await?);
        reg.register(RegisterRequest {
            instance: Some(Instance {
                service: "api".into(),
                instance_id: "impostor".into(),
                address: inbound.ip().to_string(),
                port: inbound.port().into(),
                meshed: true,
                ..Default::default()
            }),
            static_endpoint: true,
            initial_health: Health::Serving as i32,
            ..Default::default()
        })
        .await?;
        let url = cp.url();
        let caller = Process::start(
            "wf-proxy",
            &[
                "--control-plane",
                &url,
                "--admin",
                "127.0.0.1:0",
                "--upstream",
                "api=127.0.0.1:0",
                "--join-token",
                TOKEN,
            ],
            "wf-proxy listening",
        )?;
        let api = caller.addr("upstreams=api=")?;
        let (status, head, _) = http_request(api, "GET", "/", "api", "").await?;
        assert_eq!(status, 502);
        assert!(head.contains("x-wayfinder-error: connect-failed"), "{head}");
        Ok(())
    })
    .await
}

#[tokio::test]
async fn authorization_by_caller_method_and_path_for_http_grpc_and_tcp() -> Result<()> {
    bounded(async {
        let cp = ControlPlane::start(&["--join-token", TOKEN])?;
        apply_policy(
            &cp,
            "[services.web.authz]\ndefault = \"deny\"\n[[services.web.authz.allow]]\nfrom = [\"client\"]\nmethods = [\"GET\"]\npaths = [\"/public/\"]\n",
        )?;
        let (_app, web) = web(&cp, &[])?;
        wait_serving(&cp, "web", 1).await?;
        let (_caller, via, _) = client(&cp, &["--join-token", TOKEN])?;

        let (status, _, body) = http_request(via, "GET", "/public/page", "web", "").await?;
        assert_eq!(status, 200, "{body}");
        for (method, path) in [("GET", "/private"), ("POST", "/public/page")] {
            let (status, head, _) = http_request(via, method, path, "web", "").await?;
            assert_eq!(status, 403, "{method} {path}");
            assert!(head.contains("x-wayfinder-error: forbidden"), "{head}");
        }
        // gRPC: PERMISSION_DENIED.
        let h2 = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
            .http2_only(true)
            .build_http::<http_body_util::Full<bytes::Bytes>>();
        let req = hyper::Request::post(format!("http://{via}/lab.Admin/Drop"))
            .header("content-type", "application/grpc")
            .header("te", "trailers")
            .body(http_body_util::Full::new(bytes::Bytes::from_static(&[0, 0, 0, 0, 0])))?;
        let resp = h2.request(req).await?;
        assert_eq!(resp.headers().get("grpc-status").map(|v| v.as_bytes()), Some(&b"7"[..]));
        // Opaque TCP: no rule allows raw bytes, so the connection is closed
        // (allowed, lab-app would answer this with 400 Bad Request).
        let got = raw(via, b"HELLO\r\n\r\n").await?;
        assert!(got.is_empty(), "{}", String::from_utf8_lossy(&got));
        assert_eq!(metric_of(&web, "wayfinder_proxy_forbidden_total").await?, 3.0);
        assert_eq!(
            metric_of(&web, "wayfinder_proxy_inbound_refused_total{reason=\"forbidden\"}").await?,
            1.0
        );
        Ok(())
    })
    .await
}

#[tokio::test]
async fn a_permissive_inbound_takes_mtls_and_plaintext_for_migration() -> Result<()> {
    bounded(async {
        let cp = ControlPlane::start(&["--join-token", TOKEN])?;
        let (_app, web) = web(&cp, &["--inbound-mode", "permissive"])?;
        wait_serving(&cp, "web", 1).await?;
        let (_a, with_identity, _) = client(&cp, &["--join-token", TOKEN])?;
        let (_b, without, _) = client(&cp, &[])?;
        for via in [with_identity, without] {
            let (status, _, body) = http_request(via, "GET", "/", "web", "").await?;
            assert_eq!(status, 200, "{body}");
        }
        let (status, _, _) = http_request(web.addr("inbound=")?, "GET", "/", "web", "").await?;
        assert_eq!(status, 200, "plaintext straight to the inbound side");
        Ok(())
    })
    .await
}

#[tokio::test]
async fn certify_refuses_bad_tokens_services_and_csrs_and_logs_each_kind_once() -> Result<()> {
    bounded(async {
        let cp = ControlPlane::start(&[
            "--join-token",
            "web-only-token-0123456789:web",
            "--join-token",
            "expired-token-0123456789@1000000000",
        ])?;
        let mut id = IdentityClient::new(cp.channel().await?);
        let key = rcgen::KeyPair::generate()?;
        let csr = rcgen::CertificateParams::default()
            .serialize_request(&key)?
            .der()
            .to_vec();
        let ask = |token: &str, service: &str, csr: &[u8]| CertifyRequest {
            token: token.into(),
            service: service.into(),
            csr_der: csr.to_vec(),
        };
        use tonic::Code;
        let cases = [
            (
                ask("wrong-token-0123456789", "web", &csr),
                Code::Unauthenticated,
                "unknown join token",
            ),
            (
                ask("wrong-token-0123456789", "web", &csr),
                Code::Unauthenticated,
                "unknown join token",
            ),
            (
                ask("expired-token-0123456789", "web", &csr),
                Code::Unauthenticated,
                "expired",
            ),
            (
                ask("web-only-token-0123456789", "api", &csr),
                Code::PermissionDenied,
                "does not allow",
            ),
            (
                ask("web-only-token-0123456789", "web", b"garbage"),
                Code::InvalidArgument,
                "CSR",
            ),
            (
                ask("web-only-token-0123456789", "Not A Service", &csr),
                Code::InvalidArgument,
                "service",
            ),
        ];
        for (req, code, text) in cases {
            let e = id.certify(req).await.expect_err("refused");
            assert_eq!(e.code(), code, "{e}");
            assert!(e.message().contains(text), "{e}");
        }
        let ok = id
            .certify(ask("web-only-token-0123456789", "web", &csr))
            .await?
            .into_inner();
        assert_eq!(ok.spiffe_id, "spiffe://wayfinder.local/svc/web");
        assert_eq!(ok.dns_name, "web.svc.wayfinder.local");
        assert_eq!(ok.chain.len(), 2);
        assert!(!ok.trust_bundle.is_empty());

        let (_, m) = cp.get("/metrics").await?;
        assert_eq!(
            metric(&m, "wayfinder_control_certify_total{result=\"bad_token\"}"),
            Some(2.0)
        );
        assert_eq!(
            metric(&m, "wayfinder_control_certify_total{result=\"issued\"}"),
            Some(1.0)
        );
        let log = cp.await_log("result=\"bad_token\"").await?;
        assert_eq!(
            log.matches("result=\"bad_token\"").count(),
            1,
            "logged once: {log}"
        );
        assert!(!log.contains("wrong-token"), "no secret in the logs");

        // A sidecar with a bad token stops at start with the reason.
        let (app, addr) = lab_app("web-1")?;
        let started = sidecar_with(
            &cp,
            "web",
            "web-1",
            addr,
            "/healthz",
            &["--join-token", "wrong-token-0123456789"],
        );
        let err = started
            .err()
            .context("a sidecar with a bad token must not start")?;
        assert!(err.to_string().contains("unknown join token"), "{err:#}");
        drop(app);
        Ok(())
    })
    .await
}

#[tokio::test]
async fn certificates_renew_while_requests_keep_flowing() -> Result<()> {
    bounded(async {
        let cp = ControlPlane::start(&["--join-token", TOKEN, "--cert-lifetime", "10s"])?;
        let (_app, web) = web(&cp, &[])?;
        wait_serving(&cp, "web", 1).await?;
        let (caller, via, _) = client(&cp, &["--join-token", TOKEN])?;
        // Renewal comes at 70% of 10 s; run past it, one request every 50 ms.
        let until = Instant::now() + Duration::from_secs(9);
        let mut n = 0;
        while Instant::now() < until {
            let (status, _, body) = http_request(via, "GET", "/", "web", "").await?;
            assert_eq!(status, 200, "request {n} during renewal: {body}");
            n += 1;
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        for p in [&web, &caller] {
            assert!(
                p.log_text().contains("certificate renewed"),
                "{}",
                p.log_text()
            );
        }
        let (_, m) = cp.get("/metrics").await?;
        assert!(
            metric(&m, "wayfinder_control_certify_total{result=\"issued\"}").unwrap_or(0.0) >= 4.0,
            "{m}"
        );
        Ok(())
    })
    .await
}

#[tokio::test]
async fn the_control_plane_serves_grpc_over_tls_to_sidecars_that_trust_its_bundle() -> Result<()> {
    bounded(async {
        let cp = ControlPlane::start_secure(&["--join-token", TOKEN])?;
        let url = cp.url();
        let bundle = cp.bundle().to_string_lossy().to_string();
        let (app, addr) = lab_app("web-1")?;
        let app_addr = addr.to_string();
        let base = [
            "--control-plane",
            &url,
            "--service",
            "web",
            "--instance",
            "web-1",
            "--app",
            &app_addr,
            "--inbound",
            "127.0.0.1:0",
            "--admin",
            "127.0.0.1:0",
            "--join-token",
            TOKEN,
        ];
        // Without the bundle an https control plane cannot be trusted.
        let err = Process::start("wf-proxy", &base, "wf-proxy listening")
            .err()
            .context("must not start")?;
        assert!(err.to_string().contains("--ca-bundle"), "{err:#}");
        let mut args = base.to_vec();
        args.extend_from_slice(&["--ca-bundle", &bundle]);
        let _sidecar = Process::start("wf-proxy", &args, "wf-proxy listening")?;
        let serving = |n: usize| {
            let cp = &cp;
            async move {
                let deadline = Instant::now() + Duration::from_secs(10);
                loop {
                    let (status, body) = cp.get("/v1/services/web").await?;
                    if status == 200 && body.contains(&format!("\"serving\":{n}")) {
                        return Ok::<_, anyhow::Error>(());
                    }
                    if Instant::now() > deadline {
                        bail!("{n} sidecars never registered over TLS: {status} {body}");
                    }
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        };
        serving(1).await?;

        // Bootstrapping from a pinned root instead of a bundle file: the
        // control plane logs the pin; its chain carries the root.
        let log = cp.log_text();
        let pin = log
            .split("ca_pin=")
            .nth(1)
            .and_then(|r| r.split_whitespace().next())
            .context("ca_pin in the start-up line")?
            .to_string();
        let (app2, addr2) = lab_app("web-2")?;
        let app2_addr = addr2.to_string();
        let pinned = |pin: String, name: &'static str, app: String, ready: &'static str| {
            let url = url.clone();
            move || {
                Process::start(
                    "wf-proxy",
                    &[
                        "--control-plane",
                        &url,
                        "--service",
                        "web",
                        "--instance",
                        name,
                        "--app",
                        &app,
                        "--inbound",
                        "127.0.0.1:0",
                        "--admin",
                        "127.0.0.1:0",
                        "--ca-pin",
                        &pin,
                        "--join-token",
                        TOKEN,
                    ],
                    ready,
                )
            }
        };
        let _second = pinned(
            pin.clone(),
            "web-2",
            app2_addr.clone(),
            "wf-proxy listening",
        )()?;
        serving(2).await?;
        // A wrong pin: the sidecar never reaches the control plane, not even
        // for its certificate.
        let wrong = format!("sha256:{}", "ab".repeat(32));
        let third = pinned(wrong, "web-3", app2_addr, "retrying for a certificate")()?;
        let (_, body) = cp.get("/v1/services/web").await?;
        assert!(body.contains("\"instances\":2"), "{body}");
        // Its log says why (the reader of its stderr runs apart).
        let deadline = Instant::now() + Duration::from_secs(5);
        while !third.log_text().contains("pinned root") {
            if Instant::now() > deadline {
                bail!("the pin is not named: {}", third.log_text());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        drop((app, app2));
        Ok(())
    })
    .await
}

#[tokio::test]
async fn a_root_added_to_the_bundle_is_trusted_by_running_sidecars_after_a_restart() -> Result<()> {
    bounded(async {
        let mut cp = ControlPlane::start(&["--join-token", TOKEN])?;
        let (_app, web) = web(&cp, &[])?;
        wait_serving(&cp, "web", 1).await?;
        let inbound = web.addr("inbound=")?;

        // The next root, and a client certificate under it.
        let next_key = rcgen::KeyPair::generate()?;
        let mut p = rcgen::CertificateParams::new(Vec::<String>::new())?;
        p.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        p.key_usages = vec![rcgen::KeyUsagePurpose::KeyCertSign];
        p.distinguished_name
            .push(rcgen::DnType::CommonName, "next root");
        let next = rcgen::CertifiedIssuer::self_signed(p, next_key)?;
        let key = rcgen::KeyPair::generate()?;
        let mut leaf =
            rcgen::CertificateParams::new(vec!["client.svc.wayfinder.local".to_string()])?;
        leaf.subject_alt_names.push(rcgen::SanType::URI(
            "spiffe://wayfinder.local/svc/client".try_into()?,
        ));
        leaf.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ClientAuth];
        let cert = leaf.signed_by(&key, &next)?;
        let connector = tls_client(&cp, vec![cert.der().to_vec()], &key)?;
        assert!(
            handshake(inbound, &connector).await.is_err(),
            "not trusted yet"
        );

        // Publish old and new roots together; the sidecar learns it from its
        // next snapshot, without a restart of its own.
        let bundle = cp.data.path().join("ca/bundle.crt");
        let mut pem = std::fs::read_to_string(&bundle)?;
        pem.push_str(&next.pem());
        std::fs::write(&bundle, pem)?;
        cp.terminate()?;
        cp.restart()?;
        let deadline = Instant::now() + Duration::from_secs(15);
        while handshake(inbound, &connector).await.is_err() {
            let e = handshake(inbound, &connector).await.err();
            anyhow::ensure!(
                Instant::now() < deadline,
                "the new root never reached the sidecar: {e:?}\n{}",
                web.log_text()
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        Ok(())
    })
    .await
}

#[test]
fn a_malformed_join_token_stops_start_up_without_being_echoed() -> Result<()> {
    let data = tempfile::tempdir()?;
    let secret = "s3cr3t-short";
    let run = |args: &[&str], env: Option<&str>| -> Result<(bool, String)> {
        let mut c = std::process::Command::new(wayfinder_tests::bin("wf-control"));
        c.args([
            "--grpc",
            "127.0.0.1:0",
            "--http",
            "127.0.0.1:0",
            "--data-dir",
        ])
        .arg(data.path())
        .args(args)
        .stdin(std::process::Stdio::null());
        if let Some(v) = env {
            c.env("WAYFINDER_JOIN_TOKEN", v);
        }
        let out = c.output()?;
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        Ok((out.status.success(), text))
    };
    for (args, env) in [
        (vec!["--join-token", secret], None),
        (vec![], Some(secret)),
        (
            vec!["--join-token", "s3cr3t-long-enough-0123:Not_A_s3cr3t"],
            None,
        ),
        // A secret holding the separators: no part of it comes back.
        (vec!["--join-token", "s3cr3t-abc:s3cr3t-def@s3cr3t"], None),
    ] {
        let (ok, text) = run(&args, env)?;
        assert!(!ok, "must not start: {text}");
        assert!(text.contains("join token 1 of 1"), "{text}");
        assert!(!text.contains("s3cr3t"), "the token is echoed: {text}");
    }
    Ok(())
}

#[tokio::test]
async fn tokens_from_a_file_are_scoped_to_their_services() -> Result<()> {
    bounded(async {
        let dir = tempfile::tempdir()?;
        let file = dir.path().join("join-tokens");
        std::fs::write(
            &file,
            "# one token per service\nweb-token-0123456789:web\n\nclient-token-0123456789:client\n",
        )?;
        let file = file.to_string_lossy().to_string();
        let cp = ControlPlane::start(&["--join-token-file", &file])?;
        let (_app, addr) = lab_app("web-1")?;
        let web = sidecar_with(
            &cp,
            "web",
            "web-1",
            addr,
            "/healthz",
            &["--join-token", "web-token-0123456789"],
        )?;
        wait_serving(&cp, "web", 1).await?;
        // The web token gets no client certificate, and the client's gets
        // no web certificate: one workload cannot take another's identity.
        let stolen = client(&cp, &["--join-token", "web-token-0123456789"]);
        assert!(stolen.is_err(), "a client certified with web's token");
        let (_caller, via, _) = client(&cp, &["--join-token", "client-token-0123456789"])?;
        let (status, _, body) = http_request(via, "GET", "/", "web", "").await?;
        assert_eq!(status, 200, "{body}");
        let (_, m) = admin_get(&web, "/metrics").await?;
        assert!(m.contains("wayfinder_proxy"), "web serves");
        assert!(
            !cp.log_text().contains("web-token-0123456789"),
            "no token in the control plane's log"
        );
        Ok(())
    })
    .await
}
