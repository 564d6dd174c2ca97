//! End-to-end tests of local rate limits: `[services.web.rate_limit]`
//! enforced by web's own sidecar on the way in, with the real wf-control,
//! lab-apps and sidecars on loopback, over mTLS so that every caller has an
//! identity (a client sidecar per caller, `--service NAME`).
//!
//! The limit is per sidecar of the callee: the rate tests use one web
//! instance, so the numbers are the limit's own. Load is open-loop with
//! Poisson arrivals ([`offer`]).

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper_util::client::legacy::{Client, connect::HttpConnector};
use hyper_util::rt::TokioExecutor;
use wayfinder_tests::mesh::{
    Instance, admin_get, client, instance_with, served, wait_endpoints, wait_serving,
};
use wayfinder_tests::{ControlPlane, Process, apply_policy, bounded, http_request};

const TOKEN: &str = "rate-limit-token-0123";

/// The limit of the rate tests, and its bucket.
const RATE: f64 = 100.0;
const BURST: usize = 10;
const LIMITED: &str = "[services.web.rate_limit]\nrequests_per_sec = 100\nburst = 10\n";

/// How long each rate test offers its load.
const OFFERED_FOR: Duration = Duration::from_secs(5);

/// A control plane with `policy` and `n` web instances with identities,
/// their sidecars holding the policy.
async fn lab(policy: &str, n: usize) -> Result<(ControlPlane, Vec<Instance>)> {
    let cp = ControlPlane::start(&["--join-token", TOKEN])?;
    apply_policy(&cp, policy)?;
    let web = (1..=n)
        .map(|i| {
            instance_with(
                &cp,
                "web",
                &format!("web-{i}"),
                "/healthz",
                &["--join-token", TOKEN],
            )
        })
        .collect::<Result<Vec<_>>>()?;
    wait_serving(&cp, "web", n).await?;
    for w in &web {
        wait_endpoints(&w.sidecar, "web's rate limit", |e| {
            e.contains("\"rate_limit\"")
        })
        .await?;
    }
    Ok((cp, web))
}

/// A client sidecar whose identity is service `name`; its `web` listener,
/// once a request went through (discovery answered).
async fn caller(cp: &ControlPlane, name: &str) -> Result<(Process, SocketAddr)> {
    let (p, web, _) = client(cp, &["--join-token", TOKEN, "--service", name])?;
    let (status, _, body) = http_request(web, "GET", "/", "web", "").await?;
    ensure!(status == 200, "{name}'s first request: {status} {body}");
    Ok((p, web))
}

/// What one caller's open-loop run got.
#[derive(Debug, Default)]
struct Offered {
    sent: usize,
    ok: usize,
    /// 429s with `x-wayfinder-error: rate-limited` and a `Retry-After` of
    /// whole seconds, at least 1.
    limited: usize,
    /// Any other answer (at most 5 kept).
    odd: Vec<String>,
    odd_count: usize,
}

impl Offered {
    /// Requests admitted per second, beyond a first `burst`.
    fn rate(&self, burst: usize) -> f64 {
        self.ok.saturating_sub(burst) as f64 / OFFERED_FOR.as_secs_f64()
    }
}

/// A client speaking HTTP/2 to the caller's sidecar: all requests on one
/// connection. (An HTTP/1 pool opens spare connections under bursts and
/// leaves some unused; one silent past the sidecar's protocol detection
/// window is relayed as opaque TCP, which no HTTP limit sees.)
fn h2c() -> Client<HttpConnector, Empty<Bytes>> {
    Client::builder(TokioExecutor::new())
        .http2_only(true)
        .build_http()
}

/// The next exponential gap at `rps` (xorshift64: no dependency for a test).
fn gap(state: &mut u64, rps: f64) -> Duration {
    *state ^= *state << 13;
    *state ^= *state >> 7;
    *state ^= *state << 17;
    let u = (*state >> 11) as f64 / (1u64 << 53) as f64;
    Duration::from_secs_f64(-(1.0 - u).ln() / rps)
}

/// Sends `GET /` to `addr` at `rps` a second on average for
/// [`OFFERED_FOR`], each request at its time whatever the answers (open
/// loop), with exponential gaps: Poisson arrivals, as callers who do not
/// coordinate make. (Periodic callers would arrive in step with the
/// bucket's refill, and of two such callers of one bucket the one just
/// after each refill would take every token.)
async fn offer(addr: SocketAddr, rps: f64, seed: u64) -> Offered {
    let client = h2c();
    let mut rng = seed | 1;
    let start = tokio::time::Instant::now();
    let mut at = start;
    let mut tasks = tokio::task::JoinSet::new();
    loop {
        at += gap(&mut rng, rps);
        if at >= start + OFFERED_FOR {
            break;
        }
        tokio::time::sleep_until(at).await;
        let client = client.clone();
        tasks.spawn(async move { one(&client, addr).await });
    }
    let mut got = Offered::default();
    while let Some(answer) = tasks.join_next().await {
        got.sent += 1;
        match answer {
            Ok(Answer { status: 200, .. }) => got.ok += 1,
            Ok(Answer {
                status: 429,
                error: Some(e),
                retry_after: Some(s),
                ..
            }) if e == "rate-limited" && s >= 1 => got.limited += 1,
            other => {
                got.odd_count += 1;
                if got.odd.len() < 5 {
                    got.odd.push(format!("{other:?}"));
                }
            }
        }
    }
    got
}

/// One answer, as the rate tests read it.
#[derive(Debug)]
struct Answer {
    status: u16,
    error: Option<String>,
    retry_after: Option<u64>,
    attempts: Option<u32>,
    /// Why there was no answer (status 0).
    failure: Option<String>,
}

async fn one(client: &Client<HttpConnector, Empty<Bytes>>, addr: SocketAddr) -> Answer {
    let mut answer = Answer {
        status: 0,
        error: None,
        retry_after: None,
        attempts: None,
        failure: None,
    };
    let Ok(req) = hyper::Request::get(format!("http://{addr}/"))
        .header(hyper::header::HOST, "web")
        .body(Empty::new())
    else {
        return answer;
    };
    let resp = match tokio::time::timeout(Duration::from_secs(10), client.request(req)).await {
        Ok(Ok(resp)) => resp,
        Ok(Err(e)) => {
            answer.failure = Some(format!("{e:?}"));
            return answer;
        }
        Err(_) => {
            answer.failure = Some("no answer within 10 s".into());
            return answer;
        }
    };
    let h = resp.headers();
    let text = |name: &str| Some(h.get(name)?.to_str().ok()?.to_string());
    answer.status = resp.status().as_u16();
    answer.error = text("x-wayfinder-error");
    answer.retry_after = text("retry-after").and_then(|v| v.parse().ok());
    answer.attempts = text("x-wayfinder-attempts").and_then(|v| v.parse().ok());
    let _ = resp.into_body().collect().await;
    answer
}

/// The refusals web's sidecar counted for callers whose ID ends `/svc/NAME`.
async fn refused_for(web: &Process, name: &str) -> Result<f64> {
    let (_, m) = admin_get(web, "/metrics").await?;
    let suffix = format!("/svc/{name}\"}}");
    Ok(m.lines()
        .filter(|l| l.starts_with("wayfinder_proxy_rate_limited_total{service=\"web\""))
        .filter(|l| {
            l.rsplit_once(' ')
                .is_some_and(|(k, _)| k.ends_with(&suffix))
        })
        .filter_map(|l| l.rsplit_once(' ')?.1.parse::<f64>().ok())
        .sum())
}

/// Asserts `x` is within `want ± by` (and says what it was: the run's
/// output shows how close it came).
fn near(what: &str, x: f64, want: f64, by: f64) -> Result<()> {
    eprintln!("{what}: {x:.1}/s (want {want} ± {by})");
    ensure!(
        (x - want).abs() <= by,
        "{what}: {x:.1}/s, want {want} ± {by}"
    );
    Ok(())
}

#[tokio::test]
async fn two_hundred_a_second_offered_to_a_limit_of_a_hundred_lets_a_hundred_through() -> Result<()>
{
    bounded(async {
        let (cp, web) = lab(LIMITED, 1).await?;
        let (_alpha, via) = caller(&cp, "alpha").await?;
        // The first request's tokens come back before the run starts.
        tokio::time::sleep(Duration::from_millis(200)).await;
        let before = served(web[0].app_addr).await?;
        let got = offer(via, 2.0 * RATE, 1).await;
        ensure!(
            got.odd.is_empty(),
            "{} odd answers: {:?}",
            got.odd_count,
            got.odd
        );
        ensure!(got.sent > 800, "{got:?}");
        near("admitted", got.rate(BURST), RATE, 5.0)?;
        ensure!(got.ok + got.limited == got.sent, "{got:?}");
        // What the limit refused never reached the app.
        let reached = served(web[0].app_addr).await? - before;
        ensure!(
            reached as usize == got.ok,
            "the app served {reached}, callers got {got:?}"
        );
        let counted = refused_for(&web[0].sidecar, "alpha").await?;
        ensure!(
            counted as usize == got.limited,
            "counted {counted}, {got:?}"
        );
        Ok(())
    })
    .await
}

#[tokio::test]
async fn two_callers_share_a_limit_or_each_has_its_own_per_caller() -> Result<()> {
    bounded(async {
        let (cp, web) = lab(LIMITED, 1).await?;
        let (_alpha, alpha) = caller(&cp, "alpha").await?;
        let (_beta, beta) = caller(&cp, "beta").await?;
        tokio::time::sleep(Duration::from_millis(200)).await;

        // A hundred a second each to one bucket of a hundred: half each.
        let (a, b) = tokio::join!(offer(alpha, RATE, 2), offer(beta, RATE, 3));
        for (name, got) in [("alpha", &a), ("beta", &b)] {
            ensure!(
                got.odd.is_empty(),
                "{name}: {} odd: {:?}",
                got.odd_count,
                got.odd
            );
            near(name, got.rate(0), RATE / 2.0, 10.0)?;
            let counted = refused_for(&web[0].sidecar, name).await?;
            ensure!(
                counted as usize == got.limited,
                "{name}: counted {counted}, {got:?}"
            );
        }
        let total = (a.ok + b.ok).saturating_sub(BURST) as f64 / OFFERED_FOR.as_secs_f64();
        near("both", total, RATE, 5.0).with_context(|| format!("{a:?} {b:?}"))?;

        // A bucket per caller: two hundred a second each, a hundred through each.
        apply_policy(&cp, &format!("{LIMITED}per_caller = true\n"))?;
        wait_endpoints(&web[0].sidecar, "per caller", |e| {
            e.contains("\"per_caller\":true")
        })
        .await?;
        tokio::time::sleep(Duration::from_millis(200)).await;
        let (a, b) = tokio::join!(offer(alpha, 2.0 * RATE, 4), offer(beta, 2.0 * RATE, 5));
        for (name, got) in [("alpha", &a), ("beta", &b)] {
            ensure!(
                got.odd.is_empty(),
                "{name}: {} odd: {:?}",
                got.odd_count,
                got.odd
            );
            near(name, got.rate(BURST), RATE, 5.0)?;
        }
        Ok(())
    })
    .await
}

#[tokio::test]
async fn a_grpc_call_over_the_limit_gets_resource_exhausted() -> Result<()> {
    use wayfinder_proto::lab::v1::{SayRequest, echo_client::EchoClient};
    bounded(async {
        let (cp, web) = lab(
            "[services.web.rate_limit]\nrequests_per_sec = 1\nburst = 2\n",
            1,
        )
        .await?;
        let (_alpha, via) = caller(&cp, "alpha").await?;
        // The first request spent a token; a second on, the bucket is full.
        tokio::time::sleep(Duration::from_millis(1100)).await;
        let channel = tonic::transport::Channel::from_shared(format!("http://{via}"))?
            .connect()
            .await?;
        let mut echo = EchoClient::new(channel);
        let (mut ok, mut exhausted) = (0, 0);
        for i in 0..6 {
            match echo
                .say(SayRequest {
                    message: format!("call {i}"),
                })
                .await
            {
                Ok(_) => ok += 1,
                Err(s) if s.code() == tonic::Code::ResourceExhausted => {
                    assert_eq!(s.message(), "rate-limited");
                    exhausted += 1;
                }
                Err(s) => anyhow::bail!("call {i}: {s:?}"),
            }
        }
        ensure!(
            (2..=3).contains(&ok) && ok + exhausted == 6,
            "{ok} passed, {exhausted} refused"
        );
        let counted = refused_for(&web[0].sidecar, "alpha").await?;
        ensure!(counted as usize == exhausted, "counted {counted}");
        Ok(())
    })
    .await
}

/// Six GETs in a row through `via`: each answer's status and attempts.
async fn six(via: SocketAddr) -> Result<Vec<Answer>> {
    let client = h2c();
    let mut answers = Vec::new();
    for _ in 0..6 {
        answers.push(one(&client, via).await);
    }
    Ok(answers)
}

#[tokio::test]
async fn a_429_is_retried_only_when_the_policy_lists_it() -> Result<()> {
    bounded(async {
        // A token a second in each of two instances; every 5xx condition.
        let limit = "[services.web.rate_limit]\nrequests_per_sec = 1\nburst = 1\n";
        let retries = |on: &str| {
            format!(
                "{limit}[services.web.retries]\nmax_attempts = 3\nretry_on = [{on}]\nbudget_min_per_sec = 100\nbackoff_base = \"1ms\"\nbackoff_max = \"5ms\"\n"
            )
        };
        let (cp, web) = lab(&retries("\"5xx\", \"503\", \"gateway-error\""), 2).await?;
        let (alpha_sidecar, via) = caller(&cp, "alpha").await?;
        wait_endpoints(&alpha_sidecar, "both instances", |e| e.matches("\"web-").count() >= 2)
            .await?;
        tokio::time::sleep(Duration::from_millis(1100)).await;

        let answers = six(via).await?;
        let limited: Vec<_> = answers.iter().filter(|a| a.status == 429).collect();
        ensure!(limited.len() >= 3, "{answers:?}");
        for a in &limited {
            ensure!(a.attempts == Some(1), "no 5xx condition retries a 429: {a:?}");
            ensure!(
                a.error.as_deref() == Some("rate-limited") && a.retry_after >= Some(1),
                "{a:?}"
            );
        }
        ensure!(answers.iter().all(|a| [200, 429].contains(&a.status)), "{answers:?}");

        apply_policy(&cp, &retries("\"429\""))?;
        wait_endpoints(&alpha_sidecar, "429 retried", |e| e.contains("\"retry_on\":[\"429\"]"))
            .await?;
        tokio::time::sleep(Duration::from_millis(1100)).await;
        let before: f64 = [refused_for(&web[0].sidecar, "alpha").await?, refused_for(&web[1].sidecar, "alpha").await?]
            .iter()
            .sum();
        let answers = six(via).await?;
        let limited: Vec<_> = answers.iter().filter(|a| a.status == 429).collect();
        ensure!(limited.len() >= 3, "{answers:?}");
        for a in &limited {
            ensure!(a.attempts == Some(3), "retried on every try: {a:?}");
        }
        ensure!(answers.iter().all(|a| [200, 429].contains(&a.status)), "{answers:?}");
        // Every try refused was counted by the instance that refused it.
        let after: f64 = [refused_for(&web[0].sidecar, "alpha").await?, refused_for(&web[1].sidecar, "alpha").await?]
            .iter()
            .sum();
        let tries_refused: u32 = answers
            .iter()
            .map(|a| a.attempts.unwrap_or(1) - u32::from(a.status == 200))
            .sum();
        ensure!(
            (after - before) as u32 == tries_refused,
            "counted {} refusals, the answers say {tries_refused}: {answers:?}",
            after - before
        );
        Ok(())
    })
    .await
    .context("retries of 429")
}
