//! The control plane against callers who do not follow the protocol: no
//! credential, another service's certificate, plaintext, a sidecar's
//! certificate on operator RPCs. Each attempt is refused with a clear
//! status and a log line naming it, and the mesh keeps serving throughout.
//! Real binaries over loopback; wf-control in its default, secure mode.

use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use tonic::Code;
use tonic::transport::Channel;
use wayfinder_proto::v1::{
    ApplyPolicyRequest, CatalogRequest, CertifyRequest, DeregisterRequest, EdgeTraffic, Health,
    Heartbeat, Instance, ListServicesRequest, RegisterRequest, ServicePolicy, ServiceWatch,
    TapRequest, TrafficReport, WatchRequest, admin_client::AdminClient,
    catalog_client::CatalogClient, deregister_request::Target, discovery_client::DiscoveryClient,
    identity_client::IdentityClient, registry_client::RegistryClient, tap_client::TapClient,
    telemetry_client::TelemetryClient,
};
use wayfinder_tests::load::{self, Spec};
use wayfinder_tests::mesh::{client_at, lab_app, sidecar_at};
use wayfinder_tests::{ControlPlane, Process, apply_policy, bounded, metric, wfctl};

const WEB_TOKEN: &str = "web-token-0123456789";
const CLIENT_TOKEN: &str = "client-token-0123456789";

/// A secure control plane with per-service tokens, web-1 behind its
/// sidecar, and a client sidecar: the mesh the attacks must not disturb.
struct Mesh {
    cp: ControlPlane,
    _web: (Process, Process),
    _client: Process,
    web: std::net::SocketAddr,
}

async fn mesh() -> Result<Mesh> {
    let cp = ControlPlane::start_secure(&[
        "--join-token",
        &format!("{WEB_TOKEN}:web"),
        "--join-token",
        &format!("{CLIENT_TOKEN}:client"),
    ])?;
    let bundle = cp.bundle().to_string_lossy().to_string();
    let url = cp.url();
    let (app, addr) = lab_app("web-1")?;
    let sidecar = sidecar_at(
        &url,
        "web",
        "web-1",
        addr,
        "/healthz",
        &["--ca-bundle", &bundle, "--join-token", WEB_TOKEN],
    )?;
    let (client, web, _) = client_at(
        &url,
        &["--ca-bundle", &bundle, "--join-token", CLIENT_TOKEN],
    )?;
    wayfinder_tests::mesh::wait_serving(&cp, "web", 1).await?;
    Ok(Mesh {
        cp,
        _web: (app, sidecar),
        _client: client,
        web,
    })
}

impl Mesh {
    /// Calls web through the client sidecar: every call must succeed.
    async fn serves(&self) -> Result<()> {
        let r = load::run(Spec::get(self.web, "web"), 2, 20, Arc::default()).await;
        anyhow::ensure!(
            r.failed().is_empty(),
            "the mesh failed calls: {:?}",
            r.failed()
        );
        Ok(())
    }
}

/// web-1's lease id, from wf-control's log of the registration.
async fn web_lease(cp: &ControlPlane) -> Result<u64> {
    cp.await_log("instance=web-1")
        .await?
        .lines()
        .filter(|l| l.contains("instance=web-1") && l.contains("registered"))
        .find_map(|l| {
            l.split("lease=")
                .nth(1)?
                .split_whitespace()
                .next()?
                .parse()
                .ok()
        })
        .context("web-1's registration in wf-control's log")
}

/// A certificate for `service` from `Certify`, as a sidecar gets one.
async fn certificate(
    cp: &ControlPlane,
    token: &str,
    service: &str,
) -> Result<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>)> {
    let key = rcgen::KeyPair::generate()?;
    let csr = rcgen::CertificateParams::default().serialize_request(&key)?;
    let anonymous = cp.tls_channel(None).await?;
    let resp = IdentityClient::new(anonymous)
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

/// wf-control's "RPC refused" lines, once the log holds each of `awaited`.
async fn refusals(cp: &ControlPlane, awaited: &[&str]) -> Result<String> {
    for needle in awaited {
        cp.await_log(needle).await?;
    }
    Ok(cp
        .log_text()
        .lines()
        .filter(|l| l.contains("RPC refused"))
        .collect::<Vec<_>>()
        .join("\n"))
}

fn instance(service: &str, id: &str) -> Instance {
    Instance {
        service: service.into(),
        instance_id: id.into(),
        address: "127.0.0.66".into(),
        port: 8080,
        meshed: false,
        ..Default::default()
    }
}

fn register(i: Instance, static_endpoint: bool) -> RegisterRequest {
    RegisterRequest {
        instance: Some(i),
        static_endpoint,
        initial_health: Health::Serving as i32,
        ..Default::default()
    }
}

fn open_policy() -> ApplyPolicyRequest {
    ApplyPolicyRequest {
        policies: vec![ServicePolicy {
            service: "web".into(),
            ..Default::default()
        }],
    }
}

/// The code of a call's refusal (or `Ok` when it went through).
fn code<T>(r: Result<T, tonic::Status>) -> Code {
    r.map_or_else(|s| s.code(), |_| Code::Ok)
}

/// How each move on web-1 goes over `ch`: registering `web1` (another
/// sidecar's instance), a heartbeat on its `lease`, deregistering it.
async fn takeover_codes(ch: &Channel, web1: Instance, lease: u64) -> [Code; 3] {
    let registered = RegistryClient::new(ch.clone())
        .register(register(web1, false))
        .await;
    let beat = first_message_code(ch.clone(), lease).await;
    let deregistered = RegistryClient::new(ch.clone())
        .deregister(DeregisterRequest {
            target: Some(Target::LeaseId(lease)),
        })
        .await;
    [code(registered), beat, code(deregistered)]
}

/// A server-streaming call's refusal: the status comes with the response.
async fn first_message_code(ch: Channel, lease: u64) -> Code {
    let beats = futures::stream::iter([Heartbeat {
        lease_id: lease,
        health: Health::Serving as i32,
    }]);
    match RegistryClient::new(ch).keep_alive(beats).await {
        Err(s) => s.code(),
        Ok(resp) => {
            let mut stream = resp.into_inner();
            match stream.message().await {
                Ok(Some(_)) => Code::Ok,
                Ok(None) => Code::Unknown,
                Err(s) => s.code(),
            }
        }
    }
}

#[tokio::test]
async fn callers_without_a_certificate_may_only_ask_for_one() -> Result<()> {
    bounded(async {
        let m = mesh().await?;
        m.serves().await?;
        let lease = web_lease(&m.cp).await?;
        let anon = m.cp.tls_channel(None).await?;

        // The attacks of the issue, each refused as unauthenticated.
        let applied = AdminClient::new(anon.clone()).apply_policy(open_policy()).await;
        assert_eq!(code(applied), Code::Unauthenticated);
        assert_eq!(
            takeover_codes(&anon, instance("web", "web-1"), lease).await,
            [Code::Unauthenticated; 3]
        );
        let listed = AdminClient::new(anon.clone())
            .list_services(ListServicesRequest {})
            .await;
        assert_eq!(code(listed), Code::Unauthenticated);
        let watched = DiscoveryClient::new(anon.clone())
            .watch(WatchRequest {
                services: vec![ServiceWatch {
                    name: "web".into(),
                    ..Default::default()
                }],
                ..Default::default()
            })
            .await;
        assert_eq!(code(watched), Code::Unauthenticated);
        let catalog = CatalogClient::new(anon.clone())
            .watch(CatalogRequest::default())
            .await;
        assert_eq!(code(catalog), Code::Unauthenticated);
        let reported = TelemetryClient::new(anon.clone())
            .report(TrafficReport {
                node: "x".into(),
                service: "web".into(),
                edges: vec![],
                mirrors: Vec::new(),
                status: None,
            })
            .await;
        assert_eq!(code(reported), Code::Unauthenticated);
        let tapped = TapClient::new(anon.clone())
            .watch(TapRequest {
                service: "web".into(),
                ..Default::default()
            })
            .await;
        assert_eq!(code(tapped), Code::Unauthenticated);

        // What an anonymous caller may do: present its join token.
        let (chain, _) = certificate(&m.cp, CLIENT_TOKEN, "client").await?;
        assert!(!chain.is_empty());

        // Plaintext to the TLS port gets nowhere.
        let plain = tonic::transport::Endpoint::from_shared(format!("http://{}", m.cp.grpc))?
            .connect_timeout(Duration::from_secs(2))
            .timeout(Duration::from_secs(2))
            .connect()
            .await;
        if let Ok(ch) = plain {
            let r = AdminClient::new(ch).apply_policy(open_policy()).await;
            assert!(r.is_err(), "a plaintext call went through");
        }

        // Each refusal is logged with the RPC and why, and counted.
        let rpcs = ["ApplyPolicy", "Register", "Deregister", "KeepAlive", "Discovery.Watch", "Report"];
        let log = refusals(&m.cp, &rpcs).await?;
        for rpc in rpcs {
            assert!(
                log.contains(&format!("rpc=\"{rpc}\"")) || log.contains(&format!("rpc={rpc}")),
                "no refusal logged for {rpc}:\n{log}"
            );
        }
        assert!(log.contains("reason=\"unauthenticated\"") || log.contains("reason=unauthenticated"), "{log}");
        let (_, metrics) = m.cp.get("/metrics").await?;
        assert!(
            metric(
                &metrics,
                "wayfinder_control_rpc_refused_total{rpc=\"ApplyPolicy\",reason=\"unauthenticated\"}"
            ) >= Some(1.0),
            "{metrics}"
        );
        let mut logged = false;
        for _ in 0..20 {
            logged = m.cp.log_text().contains("gRPC TLS handshake failed");
            if logged {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert!(logged, "the plaintext attempt was not logged");
        // web-1 is still there and the mesh still serves.
        m.serves().await?;
        Ok(())
    })
    .await
}

#[tokio::test]
async fn a_sidecar_certificate_acts_only_on_its_own_service() -> Result<()> {
    bounded(async {
        let m = mesh().await?;
        let lease = web_lease(&m.cp).await?;
        let (chain, key) = certificate(&m.cp, CLIENT_TOKEN, "client").await?;
        let ch = m.cp.tls_channel(Some((chain, key))).await?;

        // Not another service's instance, lease or static endpoint.
        assert_eq!(
            takeover_codes(&ch, instance("web", "web-1"), lease).await,
            [Code::PermissionDenied; 3]
        );
        let static_own = RegistryClient::new(ch.clone())
            .register(register(instance("client", "c-static"), true))
            .await;
        assert_eq!(code(static_own), Code::PermissionDenied);
        // Not the operator's RPCs.
        let applied = AdminClient::new(ch.clone())
            .apply_policy(open_policy())
            .await;
        assert_eq!(code(applied), Code::PermissionDenied);
        // Nor tap another service's (or any) requests.
        let tapped = TapClient::new(ch.clone())
            .watch(TapRequest {
                service: "web".into(),
                ..Default::default()
            })
            .await;
        assert_eq!(code(tapped), Code::PermissionDenied);

        // Not at an address it does not call from (169.254.169.254 would
        // make every caller's sidecar dial the metadata service).
        let mut elsewhere = instance("client", "c-1");
        elsewhere.address = "169.254.169.254".into();
        let foreign = RegistryClient::new(ch.clone())
            .register(register(elsewhere, false))
            .await;
        assert_eq!(code(foreign), Code::PermissionDenied);

        // Its own service at its own address: register, renew and deregister.
        let mut at_home = instance("client", "c-1");
        at_home.address = "127.0.0.1".into();
        let own = RegistryClient::new(ch.clone())
            .register(register(at_home, false))
            .await?
            .into_inner();
        assert_eq!(first_message_code(ch.clone(), own.lease_id).await, Code::Ok);
        RegistryClient::new(ch.clone())
            .deregister(DeregisterRequest {
                target: Some(Target::LeaseId(own.lease_id)),
            })
            .await?;
        // Watches are for any authenticated sidecar.
        DiscoveryClient::new(ch.clone())
            .watch(WatchRequest {
                services: vec![ServiceWatch {
                    name: "web".into(),
                    ..Default::default()
                }],
                ..Default::default()
            })
            .await?;

        // A report is the certificate's service's, whatever it claims.
        TelemetryClient::new(ch.clone())
            .report(TrafficReport {
                node: "c-1".into(),
                service: "web".into(),
                edges: vec![EdgeTraffic {
                    callee: "forged".into(),
                    requests: 7,
                    errors: 0,
                    latency_buckets: vec![0; wayfinder_proto::latency::BUCKETS],
                    backend: String::new(),
                }],
                mirrors: Vec::new(),
                status: None,
            })
            .await?;
        let (_, dash) = m.cp.get("/v1/dashboard").await?;
        let v: serde_json::Value = serde_json::from_str(&dash)?;
        let edges = v["edges"].as_array().context("edges")?;
        let forged: Vec<_> = edges.iter().filter(|e| e["callee"] == "forged").collect();
        assert_eq!(forged.len(), 1, "{dash}");
        assert_eq!(forged[0]["caller"], "client", "{dash}");

        let log = refusals(
            &m.cp,
            &["other_service", "not_operator", "sidecar of client"],
        )
        .await?;
        assert!(
            log.contains("other_service") && log.contains("not_operator"),
            "{log}"
        );
        assert!(log.contains("sidecar of client"), "{log}");
        // web-1 kept its registration and the mesh serves.
        m.serves().await?;
        let (_, body) = m.cp.get("/v1/services/web").await?;
        assert!(body.contains("\"serving\":1"), "{body}");
        Ok(())
    })
    .await
}

#[tokio::test]
async fn wfctl_is_the_operator_with_the_credential_wf_control_wrote() -> Result<()> {
    bounded(async {
        let m = mesh().await?;
        // The credential is its owner's only.
        use std::os::unix::fs::PermissionsExt;
        let dir = m.cp.credentials();
        let mode = |p: &std::path::Path| -> Result<u32> {
            Ok(std::fs::metadata(p)?.permissions().mode() & 0o777)
        };
        assert_eq!(mode(&dir)?, 0o700);
        assert_eq!(mode(&dir.join("operator.key"))?, 0o600);

        let (ok, out, err) = wfctl(&m.cp, &["services"])?;
        assert!(ok, "{err}");
        assert!(out.contains("web"), "{out}");
        apply_policy(&m.cp, "[services.web]\nbalancer = \"round-robin\"\n")?;

        // Without the credential: a clear error, nothing changed.
        let out = std::process::Command::new(wayfinder_tests::bin("wfctl"))
            .env("WAYFINDER_CONTROL_PLANE", m.cp.url())
            .env("WAYFINDER_CREDENTIALS", "/nonexistent/operator")
            .args(["services"])
            .output()?;
        assert!(!out.status.success());
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("no operator credential"), "{err}");
        // Plaintext to the TLS port fails too.
        let http = format!("http://{}", m.cp.grpc);
        let out = std::process::Command::new(wayfinder_tests::bin("wfctl"))
            .env("WAYFINDER_CONTROL_PLANE", &http)
            .args(["--timeout", "2s", "services"])
            .output()?;
        assert!(!out.status.success());
        m.serves().await?;
        Ok(())
    })
    .await
}

#[tokio::test]
async fn an_insecure_control_plane_says_so_at_start() -> Result<()> {
    bounded(async {
        let cp = ControlPlane::start(&[])?;
        assert!(!cp.secure());
        assert!(
            cp.log_text()
                .contains("--insecure: gRPC is plaintext and unauthenticated"),
            "{}",
            cp.log_text()
        );
        // No operator credential is written for a plaintext control plane.
        assert!(!cp.credentials().join("operator.key").exists());
        Ok(())
    })
    .await
}

#[tokio::test]
async fn a_sidecar_renews_with_its_certificate_after_its_join_token_expired() -> Result<()> {
    bounded(async {
        // The token is good for 4 s: enough for the first certificate, not
        // for the renewal at 70% of a 10 s lifetime.
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH)?;
        let expiring = format!("{WEB_TOKEN}:web@{}", now.as_secs() + 4);
        let cp =
            ControlPlane::start_secure(&["--cert-lifetime", "10s", "--join-token", &expiring])?;
        let bundle = cp.bundle().to_string_lossy().to_string();
        let (_app, addr) = lab_app("web-1")?;
        let sidecar = sidecar_at(
            &cp.url(),
            "web",
            "web-1",
            addr,
            "/healthz",
            &["--ca-bundle", &bundle, "--join-token", WEB_TOKEN],
        )?;
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        while !sidecar.log_text().contains("certificate renewed") {
            anyhow::ensure!(
                std::time::Instant::now() < deadline,
                "no renewal: {}",
                sidecar.log_text()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        // It was the certificate that paid: the token had expired...
        let key = rcgen::KeyPair::generate()?;
        let csr = rcgen::CertificateParams::default().serialize_request(&key)?;
        let expired = IdentityClient::new(cp.tls_channel(None).await?)
            .certify(CertifyRequest {
                token: WEB_TOKEN.into(),
                service: "web".into(),
                csr_der: csr.der().to_vec(),
            })
            .await;
        assert_eq!(code(expired), Code::Unauthenticated);
        // ...and wf-control says it issued a renewal.
        cp.await_log("renewal=true").await?;
        Ok(())
    })
    .await
}

/// web-1 (lab-app and sidecar) in a namespace of its own at 10.77.0.11,
/// its control plane at 10.77.0.254 (the test's side of the bridge), and a
/// channel there presenting another `web` certificate.
async fn web1_in_a_namespace(
    tag: &str,
) -> Result<(
    wayfinder_tests::netns::Lab,
    ControlPlane,
    (Process, Process),
    Channel,
)> {
    use wayfinder_tests::netns::Lab;
    let mut lab = Lab::new(tag)?;
    lab.attach_host(254)?;
    let cp = ControlPlane::start_secure_on(
        &format!("{}:0", Lab::ip(254)),
        &["--join-token", &format!("{WEB_TOKEN}:web")],
    )?;
    let bundle = cp.bundle().to_string_lossy().to_string();
    let web1 = lab.web(
        1,
        &cp.url(),
        &["--ca-bundle", &bundle, "--join-token", WEB_TOKEN],
    )?;
    let (chain, key) = certificate(&cp, WEB_TOKEN, "web").await?;
    let ch = cp.tls_channel(Some((chain, key))).await?;
    Ok((lab, cp, web1, ch))
}

#[tokio::test]
async fn a_sidecar_cannot_take_over_an_instance_another_sidecar_holds() -> Result<()> {
    use wayfinder_tests::netns::{Lab, unavailable};
    if let Some(why) = unavailable() {
        eprintln!("skipped: {why}");
        return Ok(());
    }
    bounded(async {
        // web-1 in its own namespace (10.77.0.11); the test, holding another
        // web certificate, calls from 10.77.0.254: two hosts, one service.
        let (_lab, cp, _web1, ch) = web1_in_a_namespace("hold").await?;
        let lease = web_lease(&cp).await?;
        let here = Lab::ip(254).to_string();

        // web-1 from here: the same service, another sidecar's instance.
        let mut takeover = instance("web", "web-1");
        takeover.address = here.clone();
        assert_eq!(
            takeover_codes(&ch, takeover, lease).await,
            [Code::PermissionDenied; 3]
        );
        let log = refusals(&cp, &["not_holder"]).await?;
        assert!(log.contains("not_holder"), "{log}");
        // An instance of its own, at its own address, it may.
        let mut own = instance("web", "web-9");
        own.address = here;
        RegistryClient::new(ch.clone())
            .register(register(own, false))
            .await?;
        // web-1 is still web-1's, at its address.
        let (_, body) = cp.get("/v1/services/web").await?;
        assert!(body.contains("10.77.0.11"), "{body}");
        Ok(())
    })
    .await
}

#[tokio::test]
async fn a_recreated_sidecar_takes_its_instance_back_once_the_old_one_is_gone() -> Result<()> {
    use wayfinder_tests::netns::{Lab, unavailable};
    if let Some(why) = unavailable() {
        eprintln!("skipped: {why}");
        return Ok(());
    }
    bounded(async {
        // web-1's sidecar in its namespace (10.77.0.11) is killed, as when
        // its container dies; the test, at 10.77.0.254 with a web
        // certificate, is web-1 recreated with a new address.
        let (_lab, cp, (_app, mut sidecar), ch) = web1_in_a_namespace("back").await?;
        let mut again = instance("web", "web-1");
        again.address = Lab::ip(254).to_string();
        // While its sidecar lives, the instance is its own.
        let live = RegistryClient::new(ch.clone())
            .register(register(again.clone(), false))
            .await;
        assert_eq!(code(live), Code::PermissionDenied);
        sidecar.kill();
        // Gone (its connection closed): registered again at once, long
        // before the dead lease (10 s) would have run out.
        let killed = std::time::Instant::now();
        loop {
            let r = RegistryClient::new(ch.clone())
                .register(register(again.clone(), false))
                .await;
            if r.is_ok() {
                break;
            }
            assert!(
                killed.elapsed() < Duration::from_secs(3),
                "still refused 3 s after its sidecar died: {r:?}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let (_, body) = cp.get("/v1/services/web").await?;
        assert!(
            body.contains("10.77.0.254") && !body.contains("10.77.0.11"),
            "{body}"
        );
        Ok(())
    })
    .await
}
