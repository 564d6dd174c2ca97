//! End-to-end tests of wf-control over real gRPC on loopback.

use std::collections::HashMap;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, bail};
use futures::StreamExt;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::mpsc;
use tonic::{Code, Streaming};
use wayfinder_proto::v1::{
    Delta, DeregisterRequest, Health, Heartbeat, Instance, ListEndpointsRequest, RegisterRequest,
    ServiceWatch, Snapshot, WatchEvent, WatchRequest, admin_client::AdminClient,
    deregister_request::Target, discovery_client::DiscoveryClient, registry_client::RegistryClient,
    watch_event::Kind,
};
use wayfinder_tests::{ControlPlane, bounded, metric};

fn inst(service: &str, id: &str, port: u32) -> Instance {
    Instance {
        service: service.into(),
        instance_id: id.into(),
        address: "127.0.0.1".into(),
        port,
        meshed: true,
        ..Default::default()
    }
}

async fn register(
    cp: &ControlPlane,
    i: Instance,
    static_endpoint: bool,
    ttl_ms: u32,
) -> Result<(u64, u64)> {
    let r = RegistryClient::new(cp.channel().await?)
        .register(RegisterRequest {
            instance: Some(i),
            static_endpoint,
            ttl_ms,
            initial_health: Health::Serving as i32,
        })
        .await?
        .into_inner();
    Ok((r.lease_id, r.version))
}

async fn watch(cp: &ControlPlane, services: &[(&str, u64)]) -> Result<Streaming<WatchEvent>> {
    let req = WatchRequest {
        services: services
            .iter()
            .map(|(n, v)| ServiceWatch {
                name: n.to_string(),
                last_version: *v,
            })
            .collect(),
        node: "test".into(),
        ..Default::default()
    };
    Ok(DiscoveryClient::new(cp.channel().await?)
        .watch(req)
        .await?
        .into_inner())
}

async fn next(s: &mut Streaming<WatchEvent>) -> Result<WatchEvent> {
    match tokio::time::timeout(Duration::from_secs(5), s.next()).await {
        Ok(Some(Ok(e))) => Ok(e),
        Ok(Some(Err(status))) => bail!("watch failed: {status}"),
        Ok(None) => bail!("watch ended"),
        Err(_) => bail!("no watch event within 5 s"),
    }
}

fn snapshot(e: &WatchEvent) -> Result<&Snapshot> {
    match &e.kind {
        Some(Kind::Snapshot(s)) => Ok(s),
        other => bail!("expected a snapshot, got {other:?}"),
    }
}

fn delta(e: &WatchEvent) -> Result<&Delta> {
    match &e.kind {
        Some(Kind::Delta(d)) => Ok(d),
        other => bail!("expected a delta, got {other:?}"),
    }
}

fn now_us() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as u64)
}

#[tokio::test]
async fn register_then_watch_sees_the_snapshot() -> Result<()> {
    bounded(async {
        let cp = ControlPlane::start(&[])?;
        register(&cp, inst("web", "web-1", 9001), false, 0).await?;
        let mut st = inst("web", "", 9002);
        st.meshed = false;
        register(&cp, st, true, 0).await?;
        let mut w = watch(&cp, &[("web", 0)]).await?;
        let e = next(&mut w).await?;
        let s = snapshot(&e)?;
        assert!(s.exists);
        let mut ids: Vec<_> = s
            .endpoints
            .iter()
            .filter_map(|e| e.instance.as_ref().map(|i| i.instance_id.clone()))
            .collect();
        ids.sort();
        assert_eq!(ids, vec!["127.0.0.1:9002", "web-1"]);
        assert!(
            s.endpoints
                .iter()
                .all(|e| e.health == Health::Serving as i32)
        );
        Ok(())
    })
    .await
}

#[tokio::test]
async fn add_health_change_and_remove_arrive_as_ordered_deltas_within_100ms() -> Result<()> {
    bounded(async {
        let cp = ControlPlane::start(&[])?;
        // Watching a service that does not exist yet is allowed and waits.
        let mut w = watch(&cp, &[("api", 0)]).await?;
        let first = next(&mut w).await?;
        assert!(!snapshot(&first)?.exists);

        let (lease, v1) = register(&cp, inst("api", "api-1", 9101), false, 0).await?;
        let ch = cp.channel().await?;
        let (hb_tx, hb_rx) = mpsc::channel(4);
        let mut acks = RegistryClient::new(ch.clone())
            .keep_alive(tokio_stream::wrappers::ReceiverStream::new(hb_rx))
            .await?
            .into_inner();
        hb_tx
            .send(Heartbeat {
                lease_id: lease,
                health: Health::NotServing as i32,
            })
            .await?;
        let ack = acks.next().await.context("ack")??;
        assert_eq!(ack.lease_id, lease);
        RegistryClient::new(ch)
            .deregister(DeregisterRequest {
                target: Some(Target::LeaseId(lease)),
            })
            .await?;

        let mut prev = first.version;
        let mut kinds = Vec::new();
        for _ in 0..3 {
            let e = next(&mut w).await?;
            let lag_us = now_us().saturating_sub(e.changed_at_us);
            assert!(
                lag_us < 100_000,
                "event arrived {lag_us} µs after the change"
            );
            let d = delta(&e)?;
            assert_eq!(d.prev_version, prev, "deltas chain without gaps");
            assert!(e.version > prev);
            prev = e.version;
            kinds.push(if !d.added.is_empty() {
                "added".to_string()
            } else if let Some(c) = d.changed.first() {
                format!("changed:{}", c.health)
            } else {
                format!("removed:{}", d.removed.join(","))
            });
        }
        assert_eq!(
            kinds,
            vec![
                "added".to_string(),
                format!("changed:{}", Health::NotServing as i32),
                "removed:api-1".to_string()
            ]
        );
        assert!(prev > v1);
        Ok(())
    })
    .await
}

#[tokio::test]
async fn an_expired_lease_turns_unhealthy_then_is_removed() -> Result<()> {
    bounded(async {
        let cp = ControlPlane::start(&["--lease-grace", "1s"])?;
        let mut w = watch(&cp, &[("web", 0)]).await?;
        next(&mut w).await?;
        let (lease, _) = register(&cp, inst("web", "web-1", 9001), false, 500).await?;
        let added = next(&mut w).await?;
        assert_eq!(delta(&added)?.added.len(), 1);
        let t0 = std::time::Instant::now();
        let unhealthy = next(&mut w).await?;
        assert_eq!(
            delta(&unhealthy)?.changed[0].health,
            Health::NotServing as i32
        );
        let after = t0.elapsed();
        assert!(
            after >= Duration::from_millis(350),
            "expired after only {after:?}"
        );
        let removed = next(&mut w).await?;
        assert_eq!(delta(&removed)?.removed, vec!["web-1"]);
        assert!(
            t0.elapsed() >= Duration::from_millis(1200),
            "grace period not honoured"
        );

        // The lease is gone: a heartbeat now ends the stream with NOT_FOUND.
        let beats = futures::stream::iter([Heartbeat {
            lease_id: lease,
            health: Health::Serving as i32,
        }]);
        let mut acks = RegistryClient::new(cp.channel().await?)
            .keep_alive(beats)
            .await?
            .into_inner();
        let err = acks
            .next()
            .await
            .context("an answer")?
            .expect_err("unknown lease");
        assert_eq!(err.code(), Code::NotFound);
        let (_, metrics) = cp.get("/metrics").await?;
        assert_eq!(
            metric(&metrics, "wayfinder_control_lease_expirations_total"),
            Some(1.0)
        );
        Ok(())
    })
    .await
}

#[tokio::test]
async fn a_reconnecting_watcher_resumes_by_version_or_gets_a_snapshot() -> Result<()> {
    bounded(async {
        let cp = ControlPlane::start(&[])?;
        let mut st = inst("db", "db-1", 5432);
        st.meshed = false;
        register(&cp, st, true, 0).await?;
        let mut w = watch(&cp, &[("db", 0)]).await?;
        let last = next(&mut w).await?.version;
        drop(w);

        // Two changes while disconnected.
        register(&cp, inst("db", "db-2", 5433), true, 0).await?;
        register(&cp, inst("db", "db-3", 5434), true, 0).await?;
        let mut w = watch(&cp, &[("db", last)]).await?;
        let a = next(&mut w).await?;
        let b = next(&mut w).await?;
        assert_eq!(delta(&a)?.prev_version, last);
        assert_eq!(
            delta(&a)?.added[0].instance.as_ref().map(|i| i.port),
            Some(5433)
        );
        assert_eq!(delta(&b)?.prev_version, a.version);
        let current = b.version;
        drop(w);

        // Resuming at the current version sends nothing until the next change.
        let mut w = watch(&cp, &[("db", current)]).await?;
        register(&cp, inst("db", "db-4", 5435), true, 0).await?;
        assert_eq!(delta(&next(&mut w).await?)?.prev_version, current);
        drop(w);

        // More changes than the server keeps: the resume falls back to a snapshot.
        let ch = cp.channel().await?;
        let mut reg = RegistryClient::new(ch);
        for i in 0..300u32 {
            reg.register(RegisterRequest {
                instance: Some(inst("db", "db-1", 5432)),
                static_endpoint: true,
                initial_health: if i % 2 == 0 {
                    Health::NotServing
                } else {
                    Health::Serving
                } as i32,
                ..Default::default()
            })
            .await?;
        }
        let mut w = watch(&cp, &[("db", current)]).await?;
        let s = next(&mut w).await?;
        assert_eq!(snapshot(&s)?.endpoints.len(), 4);
        Ok(())
    })
    .await
}

#[tokio::test]
async fn static_endpoints_policy_and_live_leases_survive_a_restart() -> Result<()> {
    bounded(async {
        let mut cp = ControlPlane::start(&["--lease-ttl", "2s"])?;
        let mut st = inst("pg", "", 5432);
        st.meshed = false;
        register(&cp, st, true, 0).await?;
        let (lease, _) = register(&cp, inst("web", "web-1", 9001), false, 0).await?;
        wayfinder_tests::apply_policy(&cp, "[services.pg]\nbalancer = \"round-robin\"\n")?;

        // SIGKILL: only what was acknowledged as durable may survive, and must.
        cp.restart()?;
        let mut admin = AdminClient::new(cp.channel().await?);
        let eps = admin
            .list_endpoints(ListEndpointsRequest {
                service: "pg".into(),
            })
            .await?
            .into_inner();
        assert_eq!(eps.endpoints.len(), 1);
        let policy = admin
            .get_policy(wayfinder_proto::v1::GetPolicyRequest {
                service: "pg".into(),
            })
            .await?
            .into_inner();
        assert_eq!(
            policy.balancer,
            wayfinder_proto::v1::BalancerKind::RoundRobin as i32
        );

        // The sidecar's lease is still known: heartbeating it works at once.
        let beats = futures::stream::iter([Heartbeat {
            lease_id: lease,
            health: Health::Serving as i32,
        }]);
        let mut acks = RegistryClient::new(cp.channel().await?)
            .keep_alive(beats)
            .await?
            .into_inner();
        assert_eq!(acks.next().await.context("ack")??.lease_id, lease);

        // Without heartbeats it expires one TTL after the restart.
        let mut w = watch(&cp, &[("web", 0)]).await?;
        next(&mut w).await?;
        let e = next(&mut w).await?;
        assert_eq!(delta(&e)?.changed[0].health, Health::NotServing as i32);

        // A clean stop exits 0.
        let status = cp.terminate()?;
        assert!(status.success(), "SIGTERM exit: {status}");
        Ok(())
    })
    .await
}

#[tokio::test]
async fn a_watcher_that_never_reads_does_not_hold_back_the_others() -> Result<()> {
    bounded(async {
        let cp = ControlPlane::start(&[])?;
        // The stuck watcher opens its stream and never polls it again. Its
        // HTTP/2 windows are 64 KiB (the protocol's default; tonic's client
        // would otherwise buffer 2 MiB for it before the server notices).
        let stuck_channel = tonic::transport::Channel::from_shared(cp.url())?
            .initial_stream_window_size(65_535)
            .initial_connection_window_size(65_535)
            .connect()
            .await?;
        let mut stuck = DiscoveryClient::new(stuck_channel)
            .watch(WatchRequest {
                services: vec![ServiceWatch {
                    name: "web".into(),
                    last_version: 0,
                }],
                node: "stuck".into(),
                ..Default::default()
            })
            .await?
            .into_inner();
        next(&mut stuck).await?;
        let mut live = watch(&cp, &[("web", 0)]).await?;
        next(&mut live).await?;

        // Enough changes to overflow every buffer between wf-control and the
        // stuck client: its HTTP/2 stream window (64 KiB), the per-watcher
        // queue and the service's broadcast ring.
        const N: u32 = 1500;
        let pad: HashMap<String, String> = [("pad".to_string(), "v".repeat(100))].into();
        let (tx, mut rx) = mpsc::unbounded_channel();
        let reader = tokio::spawn(async move {
            let mut got = 0u32;
            let mut worst = 0u64;
            while got < N {
                let e = next(&mut live).await?;
                worst = worst.max(now_us().saturating_sub(e.changed_at_us));
                got += delta(&e)?.added.len() as u32;
            }
            let _ = tx.send(worst);
            anyhow::Ok(got)
        });
        let ch = cp.channel().await?;
        let writers: Vec<_> = (0..8u32)
            .map(|w| {
                let mut reg = RegistryClient::new(ch.clone());
                let pad = pad.clone();
                tokio::spawn(async move {
                    for i in (w..N).step_by(8) {
                        let mut it = inst("web", &format!("web-{i}"), 10_000 + i);
                        it.labels = pad.clone();
                        reg.register(RegisterRequest {
                            instance: Some(it),
                            static_endpoint: true,
                            ..Default::default()
                        })
                        .await?;
                    }
                    anyhow::Ok(())
                })
            })
            .collect();
        for w in writers {
            w.await??;
        }
        assert_eq!(reader.await??, N, "the live watcher got every addition");
        let worst = rx.recv().await.context("latency")?;
        assert!(
            worst < 100_000,
            "live watcher lagged {worst} µs behind a change"
        );

        // The stuck watcher was cut over to a snapshot instead of queueing
        // every change: draining it now yields a snapshot with everything.
        let mut events = 0;
        loop {
            let e = next(&mut stuck).await?;
            events += 1;
            if let Some(Kind::Snapshot(s)) = &e.kind
                && s.endpoints.len() == N as usize
            {
                break;
            }
        }
        assert!(
            events < N,
            "the stuck watcher received {events} events for {N} changes"
        );
        let (_, metrics) = cp.get("/metrics").await?;
        assert!(
            metric(
                &metrics,
                "wayfinder_control_snapshots_total{reason=\"lagged\"}"
            )
            .unwrap_or(0.0)
                >= 1.0
        );
        Ok(())
    })
    .await
}

#[tokio::test]
async fn bad_input_is_refused_and_the_server_keeps_serving() -> Result<()> {
    bounded(async {
        let cp = ControlPlane::start(&[])?;
        let mut reg = RegistryClient::new(cp.channel().await?);
        let base = inst("web", "web-1", 9001);
        let cases: Vec<(&str, Instance)> = vec![
            (
                "empty name",
                Instance {
                    service: String::new(),
                    ..base.clone()
                },
            ),
            (
                "long name",
                Instance {
                    service: "a".repeat(64),
                    ..base.clone()
                },
            ),
            (
                "bad name",
                Instance {
                    service: "Web_1".into(),
                    ..base.clone()
                },
            ),
            (
                "bad address",
                Instance {
                    address: "not-an-ip".into(),
                    ..base.clone()
                },
            ),
            (
                "unspecified address",
                Instance {
                    address: "0.0.0.0".into(),
                    ..base.clone()
                },
            ),
            (
                "port 0",
                Instance {
                    port: 0,
                    ..base.clone()
                },
            ),
            (
                "port too big",
                Instance {
                    port: 65_536,
                    ..base.clone()
                },
            ),
            (
                "long instance id",
                Instance {
                    instance_id: "x".repeat(200),
                    ..base.clone()
                },
            ),
            (
                "weight",
                Instance {
                    weight: 1_000_000,
                    ..base.clone()
                },
            ),
        ];
        for (what, i) in cases {
            let err = reg
                .register(RegisterRequest {
                    instance: Some(i),
                    ..Default::default()
                })
                .await
                .expect_err(what);
            assert_eq!(err.code(), Code::InvalidArgument, "{what}: {err}");
        }
        let err = reg
            .register(RegisterRequest::default())
            .await
            .expect_err("no instance");
        assert_eq!(err.code(), Code::InvalidArgument);
        let err = reg
            .register(RegisterRequest {
                instance: Some(base.clone()),
                initial_health: 99,
                ..Default::default()
            })
            .await
            .expect_err("bad enum");
        assert_eq!(err.code(), Code::InvalidArgument);

        // Oversized: above the request limit → InvalidArgument; above the
        // transport limit → tonic refuses it before decoding (OutOfRange).
        let big = |n: usize| Instance {
            labels: [("k".to_string(), "v".repeat(n))].into(),
            ..base.clone()
        };
        let err = reg
            .register(RegisterRequest {
                instance: Some(big(2 << 20)),
                ..Default::default()
            })
            .await
            .expect_err("2 MiB");
        assert_eq!(err.code(), Code::InvalidArgument, "{err}");
        let err = reg
            .register(RegisterRequest {
                instance: Some(big(5 << 20)),
                ..Default::default()
            })
            .await
            .expect_err("5 MiB");
        assert_eq!(err.code(), Code::OutOfRange, "{err}");

        // Unknown leases.
        let err = reg
            .deregister(DeregisterRequest {
                target: Some(Target::LeaseId(424242)),
            })
            .await
            .expect_err("unknown lease");
        assert_eq!(err.code(), Code::NotFound);
        let err = reg
            .deregister(DeregisterRequest { target: None })
            .await
            .expect_err("no target");
        assert_eq!(err.code(), Code::InvalidArgument);

        // Watch: no services, a bad name.
        let mut disc = DiscoveryClient::new(cp.channel().await?);
        let err = disc
            .watch(WatchRequest::default())
            .await
            .expect_err("empty watch");
        assert_eq!(err.code(), Code::InvalidArgument);
        let err = disc
            .watch(WatchRequest {
                services: vec![ServiceWatch {
                    name: "-bad-".into(),
                    last_version: 0,
                }],
                node: String::new(),
                ..Default::default()
            })
            .await
            .expect_err("bad name");
        assert_eq!(err.code(), Code::InvalidArgument);

        // Raw garbage on the gRPC port: the connection is closed, nothing else happens.
        let mut raw = tokio::net::TcpStream::connect(cp.grpc).await?;
        raw.write_all(b"\x00\x01garbage that is not HTTP/2 at all\r\n\r\n")
            .await?;
        let mut buf = vec![0u8; 1024];
        let closed = tokio::time::timeout(Duration::from_secs(5), async {
            loop {
                match raw.read(&mut buf).await {
                    Ok(0) | Err(_) => return true,
                    Ok(_) => continue, // a GOAWAY frame may come first
                }
            }
        })
        .await;
        assert_eq!(closed.ok(), Some(true), "garbage connection was not closed");

        // Everyone else is still served.
        let (_, v) = register(&cp, base, false, 0).await?;
        assert!(v > 0);
        let (code, _) = cp.get("/healthz").await?;
        assert_eq!(code, 200);
        Ok(())
    })
    .await
}

#[tokio::test]
async fn http_endpoints_report_exact_counts() -> Result<()> {
    bounded(async {
        let cp = ControlPlane::start(&[])?;
        for i in 0..3 {
            register(&cp, inst("web", &format!("web-{i}"), 9001 + i), false, 0).await?;
        }
        let _w = watch(&cp, &[("web", 0), ("api", 0)]).await?;
        let (code, body) = cp.get("/healthz").await?;
        assert_eq!((code, body.trim()), (200, "ok"));
        // The watcher gauge is updated when the stream's task starts.
        tokio::time::sleep(Duration::from_millis(100)).await;
        let (code, m) = cp.get("/metrics").await?;
        assert_eq!(code, 200);
        assert_eq!(
            metric(&m, "wayfinder_control_registrations_total"),
            Some(3.0)
        );
        assert_eq!(
            metric(&m, "wayfinder_control_instances{health=\"serving\"}"),
            Some(3.0)
        );
        assert_eq!(metric(&m, "wayfinder_control_services"), Some(1.0));
        assert_eq!(metric(&m, "wayfinder_control_watchers"), Some(1.0));
        assert_eq!(
            metric(&m, "wayfinder_control_snapshots_total{reason=\"initial\"}"),
            Some(2.0)
        );
        assert!(m.contains("wayfinder_control_push_latency_seconds_bucket"));
        let (code, body) = cp.get("/v1/services").await?;
        assert_eq!(code, 200);
        assert!(
            body.contains("\"name\":\"web\"") && body.contains("\"health\":\"serving\""),
            "{body}"
        );
        let (code, _) = cp.get("/v1/services/nope").await?;
        assert_eq!(code, 404);
        Ok(())
    })
    .await
}

#[tokio::test]
async fn lease_ids_cannot_be_guessed_from_one_another() -> Result<()> {
    bounded(async {
        let cp = ControlPlane::start(&[])?;
        let mut ids = Vec::new();
        for i in 0..5u32 {
            let (lease, _) =
                register(&cp, inst("web", &format!("web-{i}"), 9000 + i), false, 0).await?;
            ids.push(lease);
        }
        // Sequential ids (1, 2, 3, …) let any caller renew or drop its
        // neighbours' leases; random ones spread over 62 bits.
        for w in ids.windows(2) {
            assert!(w[0].abs_diff(w[1]) > 1_000_000, "{ids:?}");
        }
        assert!(ids.iter().all(|&l| l > 1_000_000 && l < 1 << 62), "{ids:?}");
        Ok(())
    })
    .await
}

#[tokio::test]
async fn watches_of_names_nobody_serves_are_bounded_and_free_up_when_closed() -> Result<()> {
    bounded(async {
        let cp = ControlPlane::start(&["--max-services", "50"])?;
        let names: Vec<String> = (0..40).map(|i| format!("ghost-{i}")).collect();
        let first: Vec<(&str, u64)> = names.iter().map(|n| (n.as_str(), 0)).collect();
        let held = watch(&cp, &first).await?;
        // 40 entries held; 20 more unknown names would pass the most.
        let more: Vec<String> = (40..60).map(|i| format!("ghost-{i}")).collect();
        let more: Vec<(&str, u64)> = more.iter().map(|n| (n.as_str(), 0)).collect();
        let err = watch(&cp, &more).await.expect_err("refused");
        let status = err
            .downcast_ref::<tonic::Status>()
            .context("a gRPC status")?;
        assert_eq!(status.code(), Code::ResourceExhausted, "{status}");
        // Names it knows cost nothing.
        let _again = watch(&cp, &first[..10]).await?;
        // Closed watches give their room back (garbage is collected every 10 s).
        drop((held, _again));
        let deadline = std::time::Instant::now() + Duration::from_secs(15);
        while watch(&cp, &more).await.is_err() {
            anyhow::ensure!(std::time::Instant::now() < deadline, "room never came back");
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        Ok(())
    })
    .await
}

#[tokio::test]
async fn the_http_port_closes_slow_and_idle_clients_and_keeps_serving() -> Result<()> {
    bounded(async {
        let cp = ControlPlane::start(&["--http-header-timeout", "500ms"])?;
        let took = wayfinder_tests::slow_and_idle_closed(cp.http).await?;
        assert!(took < Duration::from_secs(3), "{took:?}");
        let (status, body) = wayfinder_tests::http_get(cp.http, "/healthz").await?;
        assert_eq!((status, body.trim()), (200, "ok"));
        Ok(())
    })
    .await
}

#[tokio::test]
async fn one_connection_cannot_open_streams_without_end() -> Result<()> {
    bounded(async {
        let cp = ControlPlane::start(&["--max-streams-per-connection", "4"])?;
        let channel = cp.channel().await?;
        let req = || WatchRequest {
            services: vec![ServiceWatch {
                name: "web".into(),
                last_version: 0,
            }],
            node: "test".into(),
            ..Default::default()
        };
        let mut open = Vec::new();
        for _ in 0..4 {
            let mut s = DiscoveryClient::new(channel.clone())
                .watch(req())
                .await?
                .into_inner();
            next(&mut s).await?;
            open.push(s);
        }
        // A fifth stream on the same connection waits for one to end.
        let mut fifth = DiscoveryClient::new(channel.clone());
        let mut pending = Box::pin(fifth.watch(req()));
        let early = tokio::time::timeout(Duration::from_millis(500), pending.as_mut()).await;
        assert!(early.is_err(), "a fifth stream opened past the most");
        drop(open.pop());
        let mut s = tokio::time::timeout(Duration::from_secs(5), pending)
            .await
            .context("the fifth stream opens once one ends")??
            .into_inner();
        next(&mut s).await?;
        Ok(())
    })
    .await
}
