//! Control-plane replicas over a real etcd: sidecars move between replicas
//! without losing their lease or re-syncing, a replica cut off from etcd
//! keeps serving and reports not ready, an etcd member can die, and the whole
//! mesh comes back from a full restart.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use wayfinder_tests::etcd::{self, Etcd};
use wayfinder_tests::mesh::{client_at, instance_of, lab_app, sidecar_at, wait_serving};
use wayfinder_tests::netns::{self, Lab};
use wayfinder_tests::{ControlPlane, apply_policy, bin, http_get, metric, wfctl};

const POLICY: &str = "[services.web]\nbalancer = \"least-request\"\n";
const TOKEN: &str = "replica-token-0123456789";

fn skipped() -> bool {
    match etcd::unavailable() {
        Some(why) => {
            eprintln!("skipped: {why}");
            true
        }
        None => false,
    }
}

/// A replica on `store` whose sidecars get 2 s leases.
fn replica(store: &str) -> Result<ControlPlane> {
    ControlPlane::start(&["--store", store, "--lease-ttl", "2s"])
}

/// A replica on `store` with the mesh's CA in `ca` (shared by every replica)
/// certifying sidecars that present [`TOKEN`].
fn replica_with_ca(store: &str, ca: &std::path::Path) -> Result<ControlPlane> {
    ControlPlane::start(&[
        "--store",
        store,
        "--lease-ttl",
        "2s",
        "--ca-dir",
        &ca.to_string_lossy(),
        "--join-token",
        TOKEN,
    ])
}

/// Instance ids of `service` as `cp` lists them.
fn instances(cp: &ControlPlane, service: &str) -> Result<BTreeSet<String>> {
    let (ok, out, err) = wfctl(cp, &["-o", "json", "endpoints", service])?;
    if !ok {
        bail!("wfctl endpoints {service}: {err}");
    }
    let v: serde_json::Value = serde_json::from_str(out.trim())?;
    Ok(v["endpoints"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|e| e["instance_id"].as_str().map(String::from))
                .collect()
        })
        .unwrap_or_default())
}

/// The balancer of `service`'s policy on `cp`, if it has one.
fn balancer(cp: &ControlPlane, service: &str) -> Result<Option<String>> {
    let (ok, out, _) = wfctl(cp, &["-o", "json", "policy", "get", service])?;
    if !ok {
        return Ok(None);
    }
    let v: serde_json::Value = serde_json::from_str(out.trim())?;
    Ok(v["policy"]["balancer"].as_str().map(String::from))
}

/// Calls through the client sidecar until `instance` answers.
async fn until_answered_by(web: SocketAddr, instance: &str, within: Duration) -> Result<()> {
    let deadline = Instant::now() + within;
    let mut seen = BTreeSet::new();
    while Instant::now() < deadline {
        if let Ok((200, body)) = http_get(web, "/").await {
            let who = instance_of(&body);
            if who == instance {
                return Ok(());
            }
            seen.insert(who);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    bail!("{instance} never answered through the client sidecar (saw {seen:?})")
}

async fn snapshots_after_gaps(cp: &ControlPlane) -> Result<f64> {
    let (_, text) = cp.get("/metrics").await?;
    Ok(metric(
        &text,
        "wayfinder_control_snapshots_total{reason=\"resume_gap\"}",
    )
    .unwrap_or(0.0))
}

async fn wait_ready(cp: &ControlPlane, want: u16, within: Duration) -> Result<()> {
    let deadline = Instant::now() + within;
    loop {
        let status = cp.get("/readyz").await.map(|(s, _)| s).unwrap_or(0);
        if status == want {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("/readyz stayed {status}, expected {want}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn sidecars_fail_over_between_replicas_and_the_mesh_survives_a_full_restart() -> Result<()> {
    if skipped() {
        return Ok(());
    }
    // Two TTL-bound waits and a full restart: more than the usual minute.
    tokio::time::timeout(Duration::from_secs(100), async {
        let mut etcd = Etcd::single()?;
        let store = etcd.spec();
        let ca = tempfile::tempdir()?;
        let mut a = replica_with_ca(&store, ca.path())?;
        let mut b = replica_with_ca(&store, ca.path())?;
        let ab = format!("{},{}", a.url(), b.url());
        let ba = format!("{},{}", b.url(), a.url());
        let id = ["--join-token", TOKEN];

        // web-1 and the client stay with A, web-2 with B. Every sidecar gets
        // its certificate from its replica and they speak mTLS (strict
        // inbound): calls across replicas prove they share the CA.
        let (_app1, addr1) = lab_app("web-1")?;
        let s1 = sidecar_at(&ab, "web", "web-1", addr1, "/healthz", &id)?;
        let (_app2, addr2) = lab_app("web-2")?;
        let s2 = sidecar_at(&ba, "web", "web-2", addr2, "/healthz", &id)?;
        wait_serving(&a, "web", 2).await?;
        wait_serving(&b, "web", 2).await?;
        apply_policy(&a, POLICY).context("policy applied through A")?;
        assert_eq!(
            balancer(&b, "web")?.as_deref(),
            Some("least-request"),
            "B serves A's policy"
        );
        let (client, web, _) = client_at(&ab, &id)?;
        until_answered_by(web, "web-1", Duration::from_secs(10)).await?;
        until_answered_by(web, "web-2", Duration::from_secs(10)).await?;
        for (who, log) in [("client", client.log_text()), ("web-2", s2.log_text())] {
            assert!(
                log.contains("certificate obtained"),
                "{who} has an identity: {log}"
            );
        }
        let gaps_before = snapshots_after_gaps(&b).await?;

        // A dies. web-3 joins through B; the client, which watched on A,
        // must reach B and learn about web-3.
        a.kill();
        let (_app3, addr3) = lab_app("web-3")?;
        let _s3 = sidecar_at(&b.url(), "web", "web-3", addr3, "/healthz", &id)?;
        until_answered_by(web, "web-3", Duration::from_secs(15)).await?;
        assert!(
            client.log_text().contains("connected to another replica"),
            "the client moved to B: {}",
            client.log_text()
        );
        // The client resumed its watch at its version: B knew that version
        // (same etcd revisions on every replica), so no snapshot was needed.
        assert_eq!(
            snapshots_after_gaps(&b).await?,
            gaps_before,
            "no re-sync snapshot after the move"
        );
        // web-1's lease was granted through A and is renewed through B now:
        // three TTLs later it is still registered, never re-registered.
        tokio::time::sleep(Duration::from_secs(6)).await;
        wait_serving(&b, "web", 3).await?;
        assert!(
            !s1.log_text().contains("lost our lease"),
            "web-1 kept its lease: {}",
            s1.log_text()
        );

        // Everything restarts: etcd, then both replicas on their old ports.
        b.kill();
        etcd.members[0].restart()?;
        etcd.members[0].wait_serving()?;
        a.restart()?;
        b.restart()?;
        let want: BTreeSet<String> = ["web-1", "web-2", "web-3"].map(String::from).into();
        for cp in [&a, &b] {
            assert_eq!(instances(cp, "web")?, want, "registrations back");
            assert_eq!(balancer(cp, "web")?.as_deref(), Some("least-request"));
            wait_serving(cp, "web", 3).await?;
        }
        until_answered_by(web, "web-1", Duration::from_secs(10)).await?;
        Ok(())
    })
    .await
    .context("test timed out")?
}

#[tokio::test]
async fn a_replica_cut_off_from_etcd_keeps_serving_reports_not_ready_and_catches_up() -> Result<()>
{
    if skipped() {
        return Ok(());
    }
    wayfinder_tests::bounded(async {
        let mut etcd = Etcd::single()?;
        let store = etcd.spec();
        let a = replica(&store)?;
        let b = replica(&store)?;
        let (ok, _, err) = wfctl(&a, &["register", "web", "127.0.0.1:9001"])?;
        assert!(ok, "{err}");
        wait_ready(&a, 200, Duration::from_secs(2)).await?;

        etcd.members[0].kill();
        wait_ready(&a, 503, Duration::from_secs(10)).await?;
        // What it has is still served...
        assert_eq!(instances(&a, "web")?, ["127.0.0.1:9001".to_string()].into());
        // ...and a change it cannot share is refused, not half-made.
        let (ok, _, err) = wfctl(&a, &["register", "web", "127.0.0.1:9002"])?;
        assert!(!ok, "a registration without etcd is refused");
        assert!(err.contains("unavailable"), "{err}");

        etcd.members[0].restart()?;
        etcd.members[0].wait_serving()?;
        wait_ready(&a, 200, Duration::from_secs(10)).await?;
        wait_ready(&b, 200, Duration::from_secs(10)).await?;
        let (ok, _, err) = wfctl(&b, &["register", "web", "127.0.0.1:9003"])?;
        assert!(ok, "{err}");
        let deadline = Instant::now() + Duration::from_secs(5);
        let want: BTreeSet<String> = ["127.0.0.1:9001", "127.0.0.1:9003"]
            .map(String::from)
            .into();
        while instances(&a, "web")? != want {
            if Instant::now() > deadline {
                bail!("A did not catch up: {:?}", instances(&a, "web")?);
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Ok(())
    })
    .await
}

#[test]
fn an_unreachable_etcd_at_start_is_a_clear_error() -> Result<()> {
    if skipped() {
        return Ok(());
    }
    let dir = tempfile::tempdir()?;
    let port = wayfinder_cli::lab::free_port()?;
    for (store, says) in [
        (
            format!("etcd://127.0.0.1:{port}"),
            format!("etcd at http://127.0.0.1:{port} is unreachable"),
        ),
        (
            "etcd://no-port".to_string(),
            "expected \"embedded\" or etcd://".to_string(),
        ),
    ] {
        let out = std::process::Command::new(bin("wf-control"))
            .args([
                "--grpc",
                "127.0.0.1:0",
                "--http",
                "127.0.0.1:0",
                "--store",
                &store,
            ])
            .arg("--data-dir")
            .arg(dir.path())
            .output()?;
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{store}: must not start");
        assert!(err.contains(&says), "{store}: {err}");
    }
    Ok(())
}

#[tokio::test]
async fn losing_one_etcd_member_of_three_loses_nothing() -> Result<()> {
    if skipped() {
        return Ok(());
    }
    if let Some(why) = netns::unavailable() {
        eprintln!("skipped: {why}");
        return Ok(());
    }
    wayfinder_tests::bounded(async {
        let mut lab = Lab::new("etcd")?;
        lab.attach_host(2)?;
        let mut etcd = Etcd::three_in(&mut lab, 11)?;
        let store = etcd.spec();
        let a = replica(&store)?;
        let b = replica(&store)?;
        let mut want = BTreeSet::new();
        // Registrations alternately through A and B.
        let mut register = |i: u16, when: &str| -> Result<()> {
            let addr = format!("127.0.0.1:{}", 9100 + i);
            let cp = if i.is_multiple_of(2) { &a } else { &b };
            let (ok, _, err) = wfctl(cp, &["register", "web", &addr])?;
            assert!(
                ok,
                "registration {i} {when}: {err}\nA: {}\nB: {}",
                a.log_text(),
                b.log_text()
            );
            want.insert(addr);
            Ok(())
        };
        for i in 0..10 {
            register(i, "with three members")?;
        }
        // Kill the member A and B were most likely talking to; the other two
        // keep a quorum and the client moves to them.
        etcd.members[0].kill();
        for i in 10..20 {
            register(i, "with one member down")?;
        }
        for cp in [&a, &b] {
            assert_eq!(
                instances(cp, "web")?,
                want,
                "every registration on both replicas"
            );
            wait_ready(cp, 200, Duration::from_secs(5)).await?;
        }
        // The member comes back and catches up from its peers.
        etcd.members[0].restart()?;
        etcd.members[0].wait_serving()?;
        let c = replica(&format!(
            "etcd://{}",
            etcd.members[0].client_url.trim_start_matches("http://")
        ))?;
        let deadline = Instant::now() + Duration::from_secs(10);
        while instances(&c, "web")? != want {
            if Instant::now() > deadline {
                bail!(
                    "the restarted member lacks registrations: {:?}",
                    instances(&c, "web")?
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        Ok(())
    })
    .await
}
