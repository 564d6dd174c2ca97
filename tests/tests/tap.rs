//! End-to-end tests of `wfctl tap` and `wfctl top` with the real
//! wf-control, two `web` instances and a client sidecar: every request
//! made while tapping shows up exactly once, on the instance whose app
//! served it, and no header value (authorization, cookie) ever does.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use futures::StreamExt;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use wayfinder_proto::v1::{
    CertifyRequest, TapBatch, TapEvent, TapInterestRequest, identity_client::IdentityClient,
    tap_client::TapClient,
};
use wayfinder_tests::mesh::{
    client, client_at, instance, lab_app, served, sidecar_at, wait_serving,
};
use wayfinder_tests::{ControlPlane, bin, bounded};

/// A wfctl that runs while the test does: its stdout lines as they come.
struct Wfctl {
    child: Child,
    lines: Arc<Mutex<Vec<String>>>,
}

impl Wfctl {
    fn start(cp: &ControlPlane, args: &[&str]) -> Result<Self> {
        let mut child = Command::new(bin("wfctl"))
            .env("WAYFINDER_CONTROL_PLANE", cp.url())
            .env("WAYFINDER_CREDENTIALS", cp.credentials())
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()?;
        let stdout = child.stdout.take().context("stdout")?;
        let lines = Arc::new(Mutex::new(Vec::new()));
        let into = lines.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                into.lock().expect("lines").push(line);
            }
        });
        Ok(Self { child, lines })
    }

    fn lines(&self) -> Vec<String> {
        self.lines.lock().expect("lines").clone()
    }

    /// Waits for it to exit by itself, within `limit`.
    fn wait(&mut self, limit: Duration) -> Result<bool> {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(status) = self.child.try_wait()? {
                return Ok(status.success());
            }
            if Instant::now() > deadline {
                bail!("wfctl did not exit within {limit:?}");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Wfctl {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// GET `path` through the client sidecar's `web` listener with credentials
/// in its headers; the status.
async fn get_with_secrets(web: SocketAddr, path: &str) -> Result<u16> {
    let mut s = tokio::net::TcpStream::connect(web).await?;
    let req = format!(
        "GET {path} HTTP/1.1\r\nHost: web\r\nAuthorization: secret\r\nCookie: c=1\r\nConnection: close\r\n\r\n"
    );
    s.write_all(req.as_bytes()).await?;
    let mut buf = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut buf)).await??;
    let text = String::from_utf8_lossy(&buf);
    text.split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .with_context(|| format!("no status in {text:?}"))
}

/// The tap's events whose path is `path`.
fn events(tap: &Wfctl, path: &str) -> Result<Vec<serde_json::Value>> {
    let mut out = Vec::new();
    for line in tap.lines() {
        let v: serde_json::Value =
            serde_json::from_str(&line).with_context(|| format!("not JSON: {line}"))?;
        if v["path"] == path {
            out.push(v);
        }
    }
    Ok(out)
}

#[tokio::test]
async fn tapping_during_100_requests_yields_exactly_100_events_matching_the_apps_counts()
-> Result<()> {
    bounded(async {
        let cp = ControlPlane::start(&[])?;
        let web = [instance(&cp, "web-1")?, instance(&cp, "web-2")?];
        wait_serving(&cp, "web", 2).await?;
        let (_client, web_addr, _) = client(&cp, &[])?;

        let tap = Wfctl::start(&cp, &["tap", "web", "-o", "json", "--for", "60s"])?;
        // The tap is active once a probe request shows up in it.
        let deadline = Instant::now() + Duration::from_secs(15);
        while events(&tap, "/probe")?.is_empty() {
            if Instant::now() > deadline {
                bail!("the tap never became active: {:?}", tap.lines());
            }
            get_with_secrets(web_addr, "/probe").await?;
            tokio::time::sleep(Duration::from_millis(50)).await;
        }

        let before = [
            served(web[0].app_addr).await?,
            served(web[1].app_addr).await?,
        ];
        for i in 0..100 {
            let status = get_with_secrets(web_addr, "/counted").await?;
            assert_eq!(status, 200, "request {i}");
        }
        let after = [
            served(web[0].app_addr).await?,
            served(web[1].app_addr).await?,
        ];

        let deadline = Instant::now() + Duration::from_secs(10);
        while events(&tap, "/counted")?.len() < 100 && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        // Two more sends of the sidecar: anything extra would be here.
        tokio::time::sleep(Duration::from_millis(500)).await;
        let counted = events(&tap, "/counted")?;
        assert_eq!(counted.len(), 100, "{counted:#?}");
        for (i, name) in ["web-1", "web-2"].into_iter().enumerate() {
            let on = counted.iter().filter(|e| e["instance"] == name).count() as u64;
            assert_eq!(
                on,
                after[i] - before[i],
                "{name}: events vs the app's own count"
            );
        }
        for e in &counted {
            assert_eq!(
                (
                    &e["caller"],
                    &e["callee"],
                    &e["method"],
                    &e["status"],
                    &e["attempts"]
                ),
                (
                    &"client".into(),
                    &"web".into(),
                    &"GET".into(),
                    &200.into(),
                    &1.into()
                ),
                "{e}"
            );
            assert!(e["ms"].as_f64().is_some_and(|ms| ms > 0.0), "{e}");
        }
        let all = tap.lines().join("\n");
        assert!(!all.to_lowercase().contains("secret"), "{all}");
        assert!(!all.contains("c=1"), "{all}");
        drop(tap);

        // `top` over the same stream: a few seconds of traffic, then it exits.
        let mut top = Wfctl::start(&cp, &["top", "web", "--for", "3s", "--every", "1s"])?;
        let started = Instant::now();
        while started.elapsed() < Duration::from_millis(2500) {
            get_with_secrets(web_addr, "/counted").await?;
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert!(top.wait(Duration::from_secs(10))?, "top failed");
        let out = top.lines().join("\n");
        assert!(out.contains("RPS") && out.contains("P99_MS"), "{out}");
        assert!(
            out.lines()
                .any(|l| l.starts_with("path") && l.contains("/counted")),
            "{out}"
        );
        assert!(
            out.lines()
                .any(|l| l.starts_with("instance") && l.contains("web-1")),
            "{out}"
        );
        Ok(())
    })
    .await
}

/// The next set of tapped services sidecars hear of.
async fn next_interest(
    s: &mut tonic::Streaming<wayfinder_proto::v1::TapInterest>,
) -> Result<Vec<String>> {
    let got = tokio::time::timeout(Duration::from_secs(10), s.next())
        .await
        .context("an interest update")?
        .context("interest stream ended")??;
    Ok(got.services)
}

const WEB_TOKEN: &str = "web-token-0123456789";
const CLIENT_TOKEN: &str = "client-token-0123456789";

/// A certificate for `service` from `Certify`, as a sidecar gets one.
async fn certificate(
    cp: &ControlPlane,
    token: &str,
    service: &str,
) -> Result<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>)> {
    let key = rcgen::KeyPair::generate()?;
    let csr = rcgen::CertificateParams::default().serialize_request(&key)?;
    let resp = IdentityClient::new(cp.tls_channel(None).await?)
        .certify(CertifyRequest {
            token: token.into(),
            service: service.into(),
            csr_der: csr.der().to_vec(),
        })
        .await?
        .into_inner();
    let chain = resp.chain.into_iter().map(CertificateDer::from).collect();
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
    Ok((chain, key))
}

#[tokio::test]
async fn over_tls_sidecars_tap_only_while_wfctl_does_and_cannot_forge_the_caller() -> Result<()> {
    bounded(async {
        let cp = ControlPlane::start_secure(&[
            "--join-token",
            &format!("{WEB_TOKEN}:web"),
            "--join-token",
            &format!("{CLIENT_TOKEN}:client"),
        ])?;
        let bundle = cp.bundle().to_string_lossy().to_string();
        let (_app, addr) = lab_app("web-1")?;
        let _sidecar = sidecar_at(
            &cp.url(),
            "web",
            "web-1",
            addr,
            "/healthz",
            &["--ca-bundle", &bundle, "--join-token", WEB_TOKEN],
        )?;
        let (_client, web_addr, _) = client_at(
            &cp.url(),
            &["--ca-bundle", &bundle, "--join-token", CLIENT_TOKEN],
        )?;
        wait_serving(&cp, "web", 1).await?;

        // What sidecars hear: nothing is tapped yet.
        let as_client = cp
            .tls_channel(Some(certificate(&cp, CLIENT_TOKEN, "client").await?))
            .await?;
        let mut interest = TapClient::new(as_client.clone())
            .interest(TapInterestRequest { node: "t".into() })
            .await?
            .into_inner();
        assert!(next_interest(&mut interest).await?.is_empty());

        let tap = Wfctl::start(&cp, &["tap", "web", "-o", "json", "--for", "60s"])?;
        assert_eq!(next_interest(&mut interest).await?, vec!["web".to_string()]);
        // The client sidecar hears it too: its requests show up.
        let deadline = Instant::now() + Duration::from_secs(15);
        while events(&tap, "/probe")?.is_empty() {
            if Instant::now() > deadline {
                bail!("the tap never became active: {:?}", tap.lines());
            }
            get_with_secrets(web_addr, "/probe").await?;
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        // A sidecar publishes as the service of its certificate.
        TapClient::new(as_client)
            .publish(TapBatch {
                node: "t".into(),
                service: "admin".into(),
                events: vec![TapEvent {
                    caller: "admin".into(),
                    callee: "web".into(),
                    path: "/forged".into(),
                    status: 200,
                    ..Default::default()
                }],
                dropped: 0,
            })
            .await?;
        let deadline = Instant::now() + Duration::from_secs(10);
        let forged = loop {
            if let Some(e) = events(&tap, "/forged")?.pop() {
                break e;
            }
            if Instant::now() > deadline {
                bail!("the published event never arrived: {:?}", tap.lines());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        assert_eq!(forged["caller"], "client", "{forged}");
        let probe = &events(&tap, "/probe")?[0];
        assert_eq!(
            (&probe["caller"], &probe["instance"]),
            (&"client".into(), &"web-1".into())
        );

        // wfctl gone: the tap closes and sidecars stop recording.
        drop(tap);
        assert!(next_interest(&mut interest).await?.is_empty());
        Ok(())
    })
    .await
}
