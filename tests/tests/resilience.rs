//! End-to-end tests of resilience: real wf-control, lab-apps and sidecars on
//! loopback, faults injected with lab-app's `/fault` controls, policies
//! applied with `wfctl` while traffic flows.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use wayfinder_tests::load::{self, Spec};
use wayfinder_tests::mesh::{admin_get, client, served, wait_endpoints};
use wayfinder_tests::{
    ControlPlane, Process, Running, Scenario, apply_policy, bounded, http_request, metric,
};

async fn fault(app: SocketAddr, query: &str) -> Result<()> {
    let (status, _, body) = http_request(app, "POST", &format!("/fault{query}"), "lab", "").await?;
    anyhow::ensure!(status == 200, "fault {query}: {status} {body}");
    Ok(())
}

async fn metric_of(p: &Process, name: &str) -> Result<f64> {
    let (_, m) = admin_get(p, "/metrics").await?;
    Ok(metric(&m, name).unwrap_or(0.0))
}

#[tokio::test]
async fn killing_a_backend_midway_fails_no_request() -> Result<()> {
    bounded(async {
        // No policy at all: the defaults retry what never reached an app.
        let Running {
            cp,
            instances: mut lab,
        } = Scenario::new().instances("web", 3).start().await?;
        let (client, web, _) = client(&cp, &[])?;
        let done = Arc::new(AtomicUsize::new(0));
        let run = tokio::spawn(load::run(Spec::get(web, "web"), 16, 5000, done.clone()));
        while done.load(Ordering::Relaxed) < 2500 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        // The container dies: app and sidecar at once, no goodbye.
        lab[1].sidecar.kill();
        lab[1].app.kill();
        let report = run.await?;
        assert_eq!(report.samples.len(), 5000);
        let failed = report.failed();
        assert!(
            failed.is_empty(),
            "{} failed, e.g. {:?}\n{}",
            failed.len(),
            &failed[..failed.len().min(5)],
            client.log_text()
        );
        let after_kill: usize = report
            .samples
            .iter()
            .filter(|s| s.seq >= 2600 && s.instance.as_deref() == Some("web-2"))
            .count();
        assert_eq!(after_kill, 0, "the dead instance answered nothing");
        let retries = metric_of(&client, "wayfinder_proxy_retries_total{upstream=\"web\"}").await?;
        assert!(
            retries >= 1.0,
            "requests to the dead instance were retried: {retries}"
        );
        Ok(())
    })
    .await
}

#[tokio::test]
async fn a_backend_failing_30_percent_is_hidden_by_retries() -> Result<()> {
    bounded(async {
        let Running { cp, instances: lab } = Scenario::new().instances("web", 3).start().await?;
        fault(lab[0].app_addr, "?fail=0.3").await?;
        let (client, web, _) = client(&cp, &[])?;
        let report = load::run(Spec::get(web, "web"), 16, 5000, Arc::default()).await;
        let ok = report.samples.len() - report.failed().len();
        assert!(
            ok as f64 >= 0.999 * 5000.0,
            "{ok} of 5000 succeeded: {:?}",
            &report.failed()[..report.failed().len().min(5)]
        );
        let retried = report
            .samples
            .iter()
            .filter(|s| s.attempts > Some(1))
            .count();
        assert!(retried > 0, "the failing instance's 503s were retried");
        let retries = metric_of(&client, "wayfinder_proxy_retries_total{upstream=\"web\"}").await?;
        assert_eq!(
            retries as usize,
            report
                .samples
                .iter()
                .map(|s| s.attempts.unwrap_or(1) as usize - 1)
                .sum::<usize>()
        );
        Ok(())
    })
    .await
}

#[tokio::test]
async fn post_is_retried_only_when_the_policy_allows_and_policy_changes_apply_live() -> Result<()> {
    bounded(async {
        // Outlier detection off: the failing instance must keep its turn.
        let policy = "[services.web]\nbalancer = \"round-robin\"\n[services.web.outlier]\nenabled = false\n";
        let Running { cp, instances: lab } =
            Scenario::new().policy(policy).instances("web", 2).start().await?;
        fault(lab[0].app_addr, "?fail=1").await?;
        let (client, web, _) = client(&cp, &[])?;
        // The admin side shows the policy as the file names it.
        wait_endpoints(&client, "web's policy", |e| {
            e.contains("\"balancer\":\"round-robin\"") && e.contains("\"enabled\":false")
        })
        .await?;

        let body = "x".repeat(1000);
        let (mut refused, mut ok) = (0, 0);
        for _ in 0..20 {
            let (status, head, resp) = http_request(web, "POST", "/orders", "web", &body).await?;
            assert!(head.contains("x-wayfinder-attempts: 1"), "{head}");
            match status {
                503 => refused += 1,
                200 => {
                    ok += 1;
                    assert!(resp.contains("\"bytes\":1000"), "{resp}");
                }
                s => bail!("unexpected {s}: {resp}"),
            }
        }
        assert!(
            refused > 0 && ok > 0,
            "POSTs reach both apps; the failing one's 503s are not retried: {refused} refused, {ok} ok"
        );
        for _ in 0..10 {
            let (status, _, _) = http_request(web, "GET", "/items", "web", "").await?;
            assert_eq!(status, 200, "GETs are retried by default");
        }

        // The policy allows retrying POSTs: the very next requests see it.
        apply_policy(
            &cp,
            &format!("{policy}[services.web.retries]\nnon_idempotent = true\n"),
        )?;
        let deadline = Instant::now() + Duration::from_secs(5);
        let mut seen_retry = false;
        while !seen_retry {
            let (status, head, resp) = http_request(web, "POST", "/orders", "web", &body).await?;
            if status == 200 && head.contains("x-wayfinder-attempts: 2") {
                assert!(resp.contains("\"bytes\":1000"), "the body was replayed whole: {resp}");
                seen_retry = true;
            }
            if Instant::now() > deadline {
                bail!("the new policy never applied");
            }
        }
        for _ in 0..20 {
            let (status, _, resp) = http_request(web, "POST", "/orders", "web", &body).await?;
            assert_eq!(status, 200, "{resp}");
            assert!(resp.contains("\"bytes\":1000"), "{resp}");
        }
        Ok(())
    })
    .await
}

#[tokio::test]
async fn a_slow_instance_is_routed_around_by_per_try_timeouts_and_ewma() -> Result<()> {
    bounded(async {
        let Running { cp, instances: lab } = Scenario::new()
            .policy("[services.web]\nbalancer = \"peak-ewma\"\n[services.web.timeouts]\nper_try = \"200ms\"\n")
            .instances("web", 3)
            .start()
            .await?;
        fault(lab[2].app_addr, "?delay_ms=3000").await?;
        let (client, web, _) = client(&cp, &[])?;
        let before = served(lab[2].app_addr).await?;
        let report = load::run(Spec::get(web, "web"), 16, 600, Arc::default()).await;
        assert!(report.failed().is_empty(), "{:?}", &report.failed()[..report.failed().len().min(5)]);
        let p99 = report.quantile(0.99);
        assert!(p99 < Duration::from_millis(1000), "p99 {p99:?}: slow tries were cut at 200 ms");
        let tried_slow = served(lab[2].app_addr).await? - before;
        assert!(tried_slow < 30, "the slow instance got {tried_slow} of 600 tries: EWMA should avoid it");
        assert_eq!(report.per_instance().get("web-3"), None, "nothing waited for the slow instance");
        let timeouts =
            metric_of(&client, "wayfinder_proxy_timeouts_total{upstream=\"web\",kind=\"per_try\"}").await?;
        assert_eq!(timeouts as u64, tried_slow, "every try on the slow instance timed out");
        Ok(())
    })
    .await
}

#[tokio::test]
async fn when_every_backend_fails_the_budget_bounds_the_retries() -> Result<()> {
    bounded(async {
        let Running { cp, instances: lab } = Scenario::new()
            .policy("[services.web.retries]\nmax_attempts = 5\nretry_on = [\"gateway-error\"]\nbudget_ratio = 0.2\nbudget_min_per_sec = 5\nbackoff_base = \"1ms\"\nbackoff_max = \"2ms\"\n")
            .instances("web", 3)
            .start()
            .await?;
        for i in &lab {
            fault(i.app_addr, "?fail=1").await?;
        }
        let (client, web, _) = client(&cp, &[])?;
        let started = Instant::now();
        let requests = 400;
        let report = load::run(Spec::get(web, "web"), 4, requests, Arc::default()).await;
        let seconds = started.elapsed().as_secs_f64().ceil() + 1.0;
        assert_eq!(report.failed().len(), requests, "every backend fails");
        let mut attempts = 0;
        for i in &lab {
            attempts += served(i.app_addr).await?;
        }
        let bound = requests as f64 * 1.2 + 5.0 * seconds;
        assert!(
            (attempts as f64) <= bound,
            "{attempts} attempts for {requests} requests over {seconds} s; bound {bound}"
        );
        assert!(attempts as usize > requests, "some retries were allowed: {attempts}");
        let exhausted =
            metric_of(&client, "wayfinder_proxy_retry_budget_exhausted_total{upstream=\"web\"}").await?;
        assert!(exhausted > 0.0, "the budget ran out");
        Ok(())
    })
    .await
}

#[tokio::test]
async fn consecutive_errors_eject_an_endpoint_that_returns_after_its_time() -> Result<()> {
    bounded(async {
        let Running { cp, instances: lab } = Scenario::new()
            .policy("[services.web]\nbalancer = \"round-robin\"\n[services.web.retries]\nmax_attempts = 1\n[services.web.outlier]\nconsecutive_gateway_errors = 3\nbase_ejection = \"2s\"\n")
            .instances("web", 3)
            .start()
            .await?;
        fault(lab[0].app_addr, "?fail=1").await?;
        let (client, web, _) = client(&cp, &[])?;
        let ejections = "wayfinder_proxy_ejections_total{upstream=\"web\"}";
        let mut sent = 0;
        while metric_of(&client, ejections).await? < 1.0 {
            http_request(web, "GET", "/", "web", "").await?;
            sent += 1;
            anyhow::ensure!(sent < 50, "never ejected");
        }
        assert_eq!(served(lab[0].app_addr).await?, 3, "ejected after exactly 3 failures");
        wait_endpoints(&client, "one ejected endpoint", |e| e.matches("\"ejected\":true").count() == 1).await?;
        let ejected_at = Instant::now();
        // While ejected, nothing reaches it and nothing fails.
        for _ in 0..20 {
            let (status, _, _) = http_request(web, "GET", "/", "web", "").await?;
            assert_eq!(status, 200);
        }
        assert_eq!(served(lab[0].app_addr).await?, 3);
        assert!(ejected_at.elapsed() < Duration::from_millis(1800), "the check above ran within the ejection");

        // Healed; after its base ejection time real traffic reaches it again.
        fault(lab[0].app_addr, "/reset").await?;
        wait_endpoints(&client, "the endpoint back", |e| !e.contains("\"ejected\":true")).await?;
        for _ in 0..12 {
            let (status, _, _) = http_request(web, "GET", "/", "web", "").await?;
            assert_eq!(status, 200);
        }
        assert!(served(lab[0].app_addr).await? >= 3 + 3, "the returned endpoint takes its share");
        Ok(())
    })
    .await
}

#[tokio::test]
async fn breaker_overflow_answers_503_at_once() -> Result<()> {
    bounded(async {
        let Running { cp, instances: lab } = Scenario::new()
            .policy("[services.web.circuit_breaker]\nmax_requests = 2\n")
            .instances("web", 1)
            .start()
            .await?;
        fault(lab[0].app_addr, "?delay_ms=1000").await?;
        let (client, web, _) = client(&cp, &[])?;
        // Wait for discovery and the policy before the slow requests.
        wait_endpoints(&client, "web and its policy", |e| {
            e.contains("web-1") && e.contains("\"max_requests\":2")
        })
        .await?;
        let slow: Vec<_> = (0..2)
            .map(|_| tokio::spawn(http_request(web, "GET", "/slow", "web", "")))
            .collect();
        tokio::time::sleep(Duration::from_millis(200)).await;
        for _ in 0..4 {
            let started = Instant::now();
            let (status, head, _) = http_request(web, "GET", "/more", "web", "").await?;
            assert_eq!(status, 503);
            assert!(head.contains("x-wayfinder-error: overloaded"), "{head}");
            assert!(
                started.elapsed() < Duration::from_millis(300),
                "refused at once"
            );
        }
        for s in slow {
            assert_eq!(s.await??.0, 200, "the two admitted requests finish");
        }
        let overflows = metric_of(
            &client,
            "wayfinder_proxy_breaker_overflows_total{upstream=\"web\",limit=\"requests\"}",
        )
        .await?;
        assert_eq!(overflows, 4.0);
        Ok(())
    })
    .await
}

#[tokio::test]
async fn timeouts_answer_504_and_honour_grpc_deadlines_and_cut_slow_headers() -> Result<()> {
    bounded(async {
        let Running { cp, instances: lab } = Scenario::new()
            .policy("[services.web.timeouts]\nrequest = \"1s\"\nheader_read = \"300ms\"\n[services.web.retries]\nmax_attempts = 1\n")
            .instances("web", 1)
            .start()
            .await?;
        fault(lab[0].app_addr, "?delay_ms=5000").await?;
        let (client, web, _) = client(&cp, &[])?;
        wait_endpoints(&client, "web and its policy", |e| {
            e.contains("web-1") && e.contains("\"request\":\"1s\"")
        })
        .await?;

        let started = Instant::now();
        let (status, head, _) = http_request(web, "GET", "/", "web", "").await?;
        assert_eq!(status, 504);
        assert!(head.contains("x-wayfinder-error: timeout"), "{head}");
        let took = started.elapsed();
        assert!(took >= Duration::from_millis(1000) && took < Duration::from_millis(2500), "{took:?}");

        // gRPC: the client's 100 ms deadline is sooner than the policy's.
        let h2 = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
            .http2_only(true)
            .build_http::<http_body_util::Full<bytes::Bytes>>();
        let req = hyper::Request::post(format!("http://{web}/lab.Echo/Say"))
            .header("content-type", "application/grpc")
            .header("te", "trailers")
            .header("grpc-timeout", "100m")
            .body(http_body_util::Full::new(bytes::Bytes::from_static(&[0, 0, 0, 0, 0])))?;
        let started = Instant::now();
        let resp = h2.request(req).await?;
        let took = started.elapsed();
        assert_eq!(resp.status(), 200, "gRPC errors travel as grpc-status");
        assert_eq!(resp.headers().get("grpc-status").map(|v| v.as_bytes()), Some(&b"4"[..]), "DEADLINE_EXCEEDED");
        assert!(took >= Duration::from_millis(100) && took < Duration::from_millis(900), "{took:?}");

        // Slowloris: headers that never finish are cut off.
        let mut s = tokio::net::TcpStream::connect(web).await?;
        s.write_all(b"GET / HTTP/1.1\r\nHost: web\r\nX-Slow: ").await?;
        let started = Instant::now();
        let mut buf = [0u8; 512];
        let n = tokio::time::timeout(Duration::from_secs(3), s.read(&mut buf))
            .await
            .context("the sidecar closed the connection")?
            .unwrap_or(0);
        let took = started.elapsed();
        assert!(took >= Duration::from_millis(250) && took < Duration::from_millis(2000), "{took:?}");
        let text = String::from_utf8_lossy(&buf[..n]).to_string();
        assert!(n == 0 || text.starts_with("HTTP/1.1 408"), "{text}");
        let header_reads = metric_of(
            &client,
            "wayfinder_proxy_timeouts_total{upstream=\"web\",kind=\"header_read\"}",
        )
        .await?;
        assert_eq!(header_reads, 1.0);
        let requests = metric_of(&client, "wayfinder_proxy_timeouts_total{upstream=\"web\",kind=\"request\"}").await?;
        assert_eq!(requests, 2.0, "the HTTP and the gRPC request");
        Ok(())
    })
    .await
}

#[tokio::test]
async fn dns_endpoints_are_health_checked_actively() -> Result<()> {
    bounded(async {
        let port = std::net::TcpListener::bind("127.0.0.21:0")?.local_addr()?.port();
        let mut apps = Vec::new();
        for i in 1..=3u8 {
            let listen = format!("127.0.0.{}:{port}", 20 + i);
            apps.push(Process::start(
                "lab-app",
                &["--listen", &listen, "--name", &format!("web-{i}")],
                "listening on",
            )?);
        }
        let app = |i: u8| SocketAddr::from(([127, 0, 0, 20 + i], port));
        let dns = wayfinder_tests::DnsServer::start("127.0.0.1:0".parse()?, 30).await?;
        dns.records
            .lock()
            .map_err(|_| anyhow::anyhow!("poisoned"))?
            .insert("web".into(), (1..=3).map(|i| std::net::Ipv4Addr::new(127, 0, 0, 20 + i)).collect());
        let cp = ControlPlane::start(&[])?;
        apply_policy(
            &cp,
            "[services.web]\nbalancer = \"round-robin\"\n[services.web.health_check]\nhttp_path = \"/healthz\"\ninterval = \"100ms\"\nunhealthy_threshold = 2\nhealthy_threshold = 2\n",
        )?;
        let (url, server) = (cp.url(), dns.addr.to_string());
        let upstream = format!("web:{port}=127.0.0.1:0");
        let client = Process::start(
            "wf-proxy",
            &["--control-plane", &url, "--admin", "127.0.0.1:0", "--discovery", "dns", "--dns-server", &server, "--dns-allow-local", "--upstream", &upstream],
            "wf-proxy listening",
        )?;
        let web = client.addr("upstreams=web=")?;
        let (status, _, _) = http_request(web, "GET", "/", "web", "").await?;
        assert_eq!(status, 200);

        // web-2 reports unhealthy: after two failed checks it leaves rotation.
        fault(app(2), "?healthy=false").await?;
        wait_endpoints(&client, "web-2 checked unhealthy", |e| e.contains("\"checked_healthy\":false")).await?;
        let before = served(app(2)).await?;
        for _ in 0..30 {
            let (status, _, _) = http_request(web, "GET", "/", "web", "").await?;
            assert_eq!(status, 200);
        }
        assert_eq!(served(app(2)).await?, before, "no traffic to the unhealthy endpoint");
        let down = metric_of(&client, "wayfinder_proxy_health_transitions_total{upstream=\"web\",to=\"unhealthy\"}").await?;
        assert_eq!(down, 1.0);

        // Healthy again: back after two good checks.
        fault(app(2), "?healthy=true").await?;
        wait_endpoints(&client, "web-2 healthy again", |e| !e.contains("\"checked_healthy\":false")).await?;
        for _ in 0..30 {
            http_request(web, "GET", "/", "web", "").await?;
        }
        assert_eq!(served(app(2)).await?, before + 10, "round robin gives it its third again");
        drop(apps);
        Ok(())
    })
    .await
}

#[tokio::test]
async fn requests_at_fault_are_answered_4xx_and_held_against_no_endpoint() -> Result<()> {
    bounded(async {
        let Running { cp, instances: _lab } = Scenario::new().instances("web", 3).start().await?;
        let (client, web, _) = client(&cp, &[])?;
        let (status, _, _) = http_request(web, "GET", "/", "web", "").await?;
        assert_eq!(status, 200);
        // Headers larger than a sidecar's HTTP/2 server takes: the
        // client's fault, answered at once, never tried on an endpoint.
        let big = "x".repeat(20 * 1024);
        for _ in 0..6 {
            let mut s = tokio::net::TcpStream::connect(web).await?;
            s.write_all(format!("GET / HTTP/1.1\r\nHost: web\r\nx-big: {big}\r\nConnection: close\r\n\r\n").as_bytes())
                .await?;
            let mut answer = Vec::new();
            tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut answer))
                .await
                .context("answered")??;
            let answer = String::from_utf8_lossy(&answer);
            assert!(answer.starts_with("HTTP/1.1 431"), "{answer}");
            assert!(answer.contains("x-wayfinder-error: request-header-too-large"), "{answer}");
        }
        // A malformed chunked body: the client's fault too.
        for _ in 0..6 {
            let mut s = tokio::net::TcpStream::connect(web).await?;
            s.write_all(b"POST /orders HTTP/1.1\r\nHost: web\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nnot a chunk\r\n\r\n")
                .await?;
            let mut answer = Vec::new();
            let _ = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut answer)).await;
            let answer = String::from_utf8_lossy(&answer);
            assert!(!answer.contains(" 502 "), "not the endpoint's failure: {answer}");
        }
        // No endpoint was ejected or retried for it: every instance serves.
        let (_, eps) = admin_get(&client, "/endpoints").await?;
        assert!(!eps.contains("\"ejected\":true"), "{eps}");
        assert_eq!(metric_of(&client, "wayfinder_proxy_retries_total{upstream=\"web\"}").await?, 0.0);
        let mut seen = std::collections::BTreeSet::new();
        for _ in 0..30 {
            let (status, _, body) = http_request(web, "GET", "/", "web", "").await?;
            assert_eq!(status, 200, "{body}");
            if let Some(i) = ["web-1", "web-2", "web-3"].iter().find(|i| body.contains(**i)) {
                seen.insert(*i);
            }
        }
        assert_eq!(seen.len(), 3, "{seen:?}");
        Ok(())
    })
    .await
}
