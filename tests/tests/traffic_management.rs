//! End-to-end tests of traffic management: routes, weighted subsets and
//! fault injection, with the real wf-control, lab-apps and sidecars on
//! loopback. Instances carry `--label version=vN`; policies are applied
//! with `wfctl policy apply`.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::AtomicUsize;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, bail};
use wayfinder_tests::load::{self, Spec};
use wayfinder_tests::mesh::{
    Instance, admin_get, client, instance_with, served, wait_endpoints, wait_serving,
};
use wayfinder_tests::{ControlPlane, apply_policy, bounded, http_request, wfctl};

/// Sum of every series of metric `name` (all label sets) in `text`.
fn metric_sum(text: &str, name: &str) -> f64 {
    text.lines()
        .filter(|l| l.starts_with(name) && !l.starts_with('#'))
        .filter(|l| l[name.len()..].starts_with(['{', ' ']))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// The series of `name` whose labels contain `labels`, summed.
fn metric_with(text: &str, name: &str, labels: &str) -> f64 {
    text.lines()
        .filter(|l| l.starts_with(name) && l.contains(labels))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// web-1 and web-2 labelled `version=v1`, web-3 `version=v2` (with a
/// second label), all serving. All have weight 7 (not the default 100):
/// the balancers divide by weight, so equal weights keep the shares even.
async fn versioned(cp: &ControlPlane) -> Result<Vec<Instance>> {
    let mut lab = Vec::new();
    for (name, version) in [("web-1", "v1"), ("web-2", "v1"), ("web-3", "v2")] {
        let label = format!("version={version}");
        let mut flags = vec!["--label", label.as_str(), "--weight", "7"];
        if version == "v2" {
            flags.extend(["--label", "track=canary"]);
        }
        lab.push(instance_with(cp, "web", name, "/healthz", &flags)?);
    }
    wait_serving(cp, "web", 3).await?;
    Ok(lab)
}

const SPLIT_90_10: &str = r#"
[[services.web.routes]]
name = "canary"
match = { headers = { "x-canary" = "1" } }
backends = [{ subset = { version = "v2" } }]

[[services.web.routes]]
name = "to-api"
match = { path_prefix = "/api/" }
backends = [{ service = "api" }]

[[services.web.routes]]
name = "default"
backends = [{ subset = { version = "v1" }, weight = 90 }, { subset = { version = "v2" }, weight = 10 }]
"#;

#[tokio::test]
async fn a_ninety_ten_split_holds_to_a_point_and_a_half_and_a_header_sends_all_to_v2() -> Result<()>
{
    bounded(async {
        let cp = ControlPlane::start(&[])?;
        apply_policy(&cp, SPLIT_90_10)?;
        let _lab = versioned(&cp).await?;
        let _api = instance_with(&cp, "api", "api-1", "/healthz", &[])?;
        wait_serving(&cp, "api", 1).await?;
        let (client, web, _) = client(&cp, &[])?;
        wait_endpoints(&client, "labels and routes", |t| {
            t.matches("\"version\":\"v").count() >= 3 && t.contains("\"backend\":\"version=v2\"")
        })
        .await?;

        // The registration carried the sidecar's labels and weight.
        let (ok, out, err) = wfctl(&cp, &["-o", "json", "endpoints", "web"])?;
        assert!(ok, "{err}");
        let eps: serde_json::Value = serde_json::from_str(out.trim())?;
        let web3 = eps["endpoints"]
            .as_array()
            .and_then(|a| a.iter().find(|e| e.to_string().contains("web-3")))
            .context("web-3 listed")?;
        assert_eq!(web3["weight"], 7, "{web3}");
        assert_eq!(web3["labels"]["version"], "v2", "{web3}");
        assert_eq!(web3["labels"]["track"], "canary", "{web3}");

        let n = 10_000;
        let report = load::run(Spec::get(web, "web"), 16, n, Arc::new(AtomicUsize::new(0))).await;
        let failed = report.failed();
        assert!(
            failed.is_empty(),
            "{} failed: {:?}",
            failed.len(),
            &failed[..failed.len().min(5)]
        );
        let per = report.per_instance();
        let v2 = per.get("web-3").copied().unwrap_or(0);
        let share = 100.0 * v2 as f64 / n as f64;
        assert!(
            (share - 10.0).abs() <= 1.5,
            "v2 took {share:.2}% of {n} (want 10 ± 1.5): {per:?}"
        );
        // Both v1 instances share the rest.
        for v1 in ["web-1", "web-2"] {
            assert!(per.get(v1).copied().unwrap_or(0) > n / 4, "{v1}: {per:?}");
        }

        // The header route: every request to v2.
        let canary = Spec::get(web, "web").with_header("x-canary", "1");
        let report = load::run(canary, 4, 300, Arc::new(AtomicUsize::new(0))).await;
        assert!(report.failed().is_empty(), "{:?}", report.failed());
        let per = report.per_instance();
        assert_eq!(per.get("web-3"), Some(&300), "all to v2: {per:?}");

        // A route to another service: web's listener, api's instance.
        for _ in 0..20 {
            let (status, _, body) = http_request(web, "GET", "/api/orders", "web", "").await?;
            assert_eq!(status, 200, "{body}");
            assert!(body.contains("\"instance\":\"api-1\""), "{body}");
        }

        // Metrics carry the route and backend.
        let (_, m) = admin_get(&client, "/metrics").await?;
        let routed = |route: &str, backend: &str| {
            metric_with(
                &m,
                "wayfinder_proxy_route_requests_total",
                &format!("route=\"{route}\",backend=\"{backend}\""),
            )
        };
        assert_eq!(routed("canary", "version=v2"), 300.0, "{m}");
        assert_eq!(routed("to-api", "api"), 20.0, "{m}");
        assert_eq!(
            routed("default", "version=v1") + routed("default", "version=v2"),
            n as f64,
            "{m}"
        );
        assert_eq!(routed("default", "version=v2"), v2 as f64);
        Ok(())
    })
    .await
}

#[tokio::test]
async fn an_abort_on_one_instance_is_rescued_by_default_retries_and_the_apps_count_each_request_once()
-> Result<()> {
    bounded(async {
        let cp = ControlPlane::start(&[])?;
        apply_policy(
            &cp,
            "[services.web]\nbalancer = \"round-robin\"\n[services.web.fault]\nmatch = { instance = \"web-2\" }\nabort = { status = 503, percent = 100 }\n",
        )?;
        let lab = versioned(&cp).await?;
        let (client, web, _) = client(&cp, &[])?;
        wait_endpoints(&client, "the fault", |t| t.contains("\"fault\"")).await?;
        // Round robin sends every third try to web-2. Below the retry
        // budget's floor (10 retries a second always allowed), every one
        // of them is retried: 90 requests at about 20 a second.
        let mut attempts2 = 0;
        for i in 0..90 {
            let (status, head, body) = http_request(web, "GET", "/", "web", "").await?;
            assert_eq!(status, 200, "request {i}: {head}{body}");
            assert!(!body.contains("web-2"), "request {i} reached web-2: {body}");
            if head.contains("x-wayfinder-attempts: 2") {
                attempts2 += 1;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let (_, m) = admin_get(&client, "/metrics").await?;
        let injected = metric_with(&m, "wayfinder_proxy_faults_injected_total", "kind=\"abort\"");
        let retries = metric_sum(&m, "wayfinder_proxy_retries_total");
        assert!((25.0..=35.0).contains(&injected), "a third of 90 tries: {injected}\n{m}");
        assert_eq!(retries, injected, "each injected abort retried once\n{m}");
        assert_eq!(f64::from(attempts2), injected, "the answers say so too");
        // The apps: web-2 never saw a request, the others each once.
        let counts = [
            served(lab[0].app_addr).await?,
            served(lab[1].app_addr).await?,
            served(lab[2].app_addr).await?,
        ];
        assert_eq!(counts[1], 0, "{counts:?}");
        assert_eq!(counts[0] + counts[2], 90, "{counts:?}");
        // An injected failure is not the endpoint's: it is not ejected.
        let (_, eps) = admin_get(&client, "/endpoints").await?;
        assert!(!eps.contains("\"ejected\":true"), "{eps}");
        Ok(())
    })
    .await
}

#[tokio::test]
async fn without_retries_an_abort_on_one_of_three_fails_a_binomial_third() -> Result<()> {
    bounded(async {
        let cp = ControlPlane::start(&[])?;
        apply_policy(
            &cp,
            "[services.web]\nbalancer = \"least-request\"\n[services.web.retries]\nmax_attempts = 1\n[services.web.fault]\nmatch = { instance = \"web-2\" }\nabort = { status = 503, percent = 100 }\n",
        )?;
        let _lab = versioned(&cp).await?;
        let (client, web, _) = client(&cp, &[])?;
        wait_endpoints(&client, "the fault", |t| t.contains("\"fault\"")).await?;
        // One at a time, every endpoint has nothing in flight: least-request
        // picks uniformly, so web-2 takes each request with p = 1/3.
        let n = 900;
        let report = load::run(Spec::get(web, "web"), 1, n, Arc::new(AtomicUsize::new(0))).await;
        let failed = report.failed();
        assert!(
            failed
                .iter()
                .all(|s| s.status == 503 && s.error.as_deref() == Some("fault-injected")),
            "{:?}",
            &failed[..failed.len().min(5)]
        );
        // Mean 300, standard deviation 14.1: 4.5 of them either side.
        let k = failed.len();
        assert!((236..=364).contains(&k), "{k} of {n} failed; want 300 ± 64");
        Ok(())
    })
    .await
}

fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// A fault on every try of `web` ending at `end` (Unix ms), without retries.
fn abort_until(end: u64) -> String {
    format!(
        "[services.web.retries]\nmax_attempts = 1\n[services.web.fault]\nabort = {{ status = 503, percent = 100 }}\nexpires_at_unix_ms = {end}\n"
    )
}

/// Sends requests one after another until one is not a fault, and checks
/// the fault kept to its end (Unix ms): every failed request was sent
/// before it, and the first that succeeded was answered after it. So the
/// first request sent after the end is served, however slow the machine.
async fn first_success_after(web: SocketAddr, end: u64, until: Duration) -> Result<()> {
    let deadline = Instant::now() + until;
    loop {
        let sent = unix_ms();
        let (status, head, _) = http_request(web, "GET", "/", "web", "").await?;
        if status == 200 {
            let answered = unix_ms();
            anyhow::ensure!(
                answered >= end,
                "served {} ms before the end",
                end - answered
            );
            return Ok(());
        }
        anyhow::ensure!(
            status == 503 && head.contains("x-wayfinder-error: fault-injected"),
            "{status} {head}"
        );
        anyhow::ensure!(
            sent < end,
            "a request sent {} ms after the end failed",
            sent - end
        );
        if Instant::now() > deadline {
            bail!("still failing after {until:?}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn a_two_second_fault_stops_on_the_first_request_after_it_expires_also_across_a_restart()
-> Result<()> {
    bounded(async {
        let mut cp = ControlPlane::start(&[])?;
        let _lab = versioned(&cp).await?;
        let (client, web, _) = client(&cp, &[])?;
        let (status, _, _) = http_request(web, "GET", "/", "web", "").await?;
        assert_eq!(status, 200);

        let end = unix_ms() + 2_000;
        apply_policy(&cp, &abort_until(end))?;
        wait_endpoints(&client, "the fault", |t| t.contains(&end.to_string())).await?;
        first_success_after(web, end, Duration::from_secs(5)).await?;
        let (_, m) = admin_get(&client, "/metrics").await?;
        assert!(metric_with(&m, "wayfinder_proxy_faults_injected_total", "abort") > 10.0);

        // Again, with the control plane restarted while the fault runs: the
        // end was stored with the policy and the sidecars enforce it.
        let end = unix_ms() + 3_000;
        apply_policy(&cp, &abort_until(end))?;
        wait_endpoints(&client, "the new fault", |t| t.contains(&end.to_string())).await?;
        let (status, _, _) = http_request(web, "GET", "/", "web", "").await?;
        assert_eq!(status, 503, "the fault is on");
        cp.restart()?;
        wait_serving(&cp, "web", 3).await?;
        let (status, head, _) = http_request(web, "GET", "/", "web", "").await?;
        assert_eq!(status, 503, "still on after the restart: {head}");
        first_success_after(web, end, Duration::from_secs(6)).await?;
        Ok(())
    })
    .await
}

#[tokio::test]
async fn bad_route_and_fault_policies_are_refused_with_file_line_and_field() -> Result<()> {
    bounded(async {
        let cp = ControlPlane::start(&[])?;
        let dir = tempfile::tempdir()?;
        let cases = [
            (
                "[[services.web.routes]]\nname = \"a\"\nbackends = [{ subset = { version = \"v2\" }, weight = 20000 }]\n",
                ":3: field services.web.routes.backends",
                "out of range",
            ),
            (
                "[[services.web.routes]]\nname = \"a\"\nmatch = { path = \"/x\" }\nbackends = [{ service = \"x\" }]\n",
                ":3: field services.web.routes.match",
                "unknown field",
            ),
            (
                "[services.web]\nbalancer = \"round-robin\"\n\n[services.web.fault]\nabort = { status = 503, percent = 130 }\n",
                ":5: field services.web.fault.abort",
                "percentage",
            ),
            (
                "[services.web.fault]\ndelay = { duration = \"2 minutes\", percent = 10 }\n",
                ":2: field services.web.fault.delay",
                "not a duration",
            ),
        ];
        for (i, (text, at, why)) in cases.iter().enumerate() {
            let path = dir.path().join(format!("bad-{i}.toml"));
            std::fs::write(&path, text)?;
            let (ok, out, err) = wfctl(&cp, &["policy", "apply", &path.to_string_lossy()])?;
            assert!(!ok, "case {i} accepted: {out}");
            let want = format!("bad-{i}.toml{at}");
            assert!(err.contains(&want) && err.contains(why), "case {i}: want {want:?} and {why:?} in {err}");
        }
        // Nothing was applied.
        let (ok, out, _) = wfctl(&cp, &["policy", "get", "web"])?;
        assert!(!ok || !out.contains("fault"), "{out}");
        Ok(())
    })
    .await
}

/// The weights of web's first route's backends in a sidecar's `/endpoints`.
fn weights(endpoints: &str) -> Vec<(String, u64)> {
    let v: serde_json::Value = serde_json::from_str(endpoints).unwrap_or_default();
    v["web"]["routes"][0]["backends"]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|b| {
                    (
                        b["backend"].as_str().unwrap_or("?").to_string(),
                        b["weight"].as_u64().unwrap_or(0),
                    )
                })
                .collect()
        })
        .unwrap_or_default()
}

/// `wfctl` off the test's thread, so load keeps flowing while it runs.
async fn wfctl_async(cp: &ControlPlane, args: &[&str]) -> Result<(bool, String, String)> {
    let url = cp.url();
    let creds = cp.credentials();
    let args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
    tokio::task::spawn_blocking(move || {
        let out = std::process::Command::new(wayfinder_tests::bin("wfctl"))
            .env("WAYFINDER_CONTROL_PLANE", url)
            .env("WAYFINDER_CREDENTIALS", creds)
            .args(&args)
            .stdin(std::process::Stdio::null())
            .output()?;
        Ok((
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).to_string(),
            String::from_utf8_lossy(&out.stderr).to_string(),
        ))
    })
    .await?
}

const ALL_V1: &str = r#"
[[services.web.routes]]
name = "default"
backends = [{ subset = { version = "v1" }, weight = 100 }, { subset = { version = "v2" }, weight = 0 }]
"#;

#[tokio::test]
async fn shifting_v2_from_0_to_100_percent_in_steps_fails_no_request() -> Result<()> {
    bounded(async {
        let cp = ControlPlane::start(&[])?;
        apply_policy(&cp, ALL_V1)?;
        let _lab = versioned(&cp).await?;
        let (client, web, _) = client(&cp, &[])?;
        wait_endpoints(&client, "routes", |t| {
            t.contains("\"backend\":\"version=v2\"")
        })
        .await?;
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let load = tokio::spawn(load::until(Spec::get(web, "web"), 4, stop.clone()));
        let http = cp.http.to_string();
        let (ok, out, err) = wfctl_async(
            &cp,
            &[
                "split",
                "web",
                "version=v2:100",
                "--step",
                "25",
                "--every",
                "1s",
                "--http",
                &http,
            ],
        )
        .await?;
        assert!(ok, "split failed: {out}{err}");
        // The last step's policy reaches the client; then only v2 answers.
        wait_endpoints(&client, "v2 at 100", |t| {
            weights(t)
                == [
                    ("version=v1".to_string(), 0),
                    ("version=v2".to_string(), 100),
                ]
        })
        .await?;
        tokio::time::sleep(Duration::from_millis(500)).await;
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let report = load.await?;
        let failed = report.failed();
        assert!(
            failed.is_empty(),
            "{} of {} failed: {:?}",
            failed.len(),
            report.samples.len(),
            &failed[..failed.len().min(5)]
        );
        let n = report.samples.len();
        assert!(n > 200, "too little traffic to judge: {n}");
        // Traffic moved: v1 first, v2 at the end.
        let first = &report.samples[..n / 10];
        let last = &report.samples[n - n / 20..];
        assert!(
            first.iter().all(|s| s.instance.as_deref() != Some("web-3")),
            "v2 at the start"
        );
        assert!(
            last.iter().all(|s| s.instance.as_deref() == Some("web-3")),
            "not all v2 at the end"
        );
        Ok(())
    })
    .await
}

#[tokio::test]
async fn a_failing_canary_is_rolled_back_and_split_exits_non_zero() -> Result<()> {
    bounded(async {
        let cp = ControlPlane::start(&[])?;
        apply_policy(&cp, ALL_V1)?;
        let lab = versioned(&cp).await?;
        // v2 fails half its calls.
        let (status, _, body) =
            http_request(lab[2].app_addr, "POST", "/fault?fail=0.5", "lab", "").await?;
        anyhow::ensure!(status == 200, "{body}");
        let (client, web, _) = client(&cp, &[])?;
        wait_endpoints(&client, "routes", |t| {
            t.contains("\"backend\":\"version=v2\"")
        })
        .await?;
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let load = tokio::spawn(load::until(Spec::get(web, "web"), 4, stop.clone()));
        let http = cp.http.to_string();
        let (ok, out, err) = wfctl_async(
            &cp,
            &[
                "split",
                "web",
                "version=v2:50",
                "--step",
                "10",
                "--every",
                "3s",
                "--abort-on",
                "error_rate>1%",
                "--http",
                &http,
            ],
        )
        .await?;
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let report = load.await?;
        assert!(!ok, "split succeeded with a failing canary: {out}{err}");
        assert!(err.contains("error_rate"), "names the condition: {err}");
        assert!(!report.samples.is_empty());
        // Back where it started: v2 at 0.
        let (ok, policy, _) = wfctl(&cp, &["-o", "json", "policy", "get", "web"])?;
        assert!(ok, "{policy}");
        let v: serde_json::Value = serde_json::from_str(policy.trim())?;
        let backends = &v["policy"]["routes"][0]["backends"];
        let weight_of = |version: &str| {
            backends
                .as_array()
                .and_then(|a| a.iter().find(|b| b["subset"]["version"] == version))
                .and_then(|b| b["weight"].as_u64())
        };
        assert_eq!(
            (weight_of("v1"), weight_of("v2")),
            (Some(100), Some(0)),
            "{policy}"
        );
        Ok(())
    })
    .await
}

/// `n` GETs of `path` (with `headers`) through `web`, one after another:
/// their statuses and `x-wayfinder-error`s, and the fastest and slowest.
async fn statuses(
    web: SocketAddr,
    path: &str,
    headers: &[(&str, &str)],
    n: usize,
) -> Result<(Vec<(u16, Option<String>)>, (Duration, Duration))> {
    let mut spec = Spec::get(web, "web");
    spec.path = path.to_string();
    for (k, v) in headers {
        spec = spec.with_header(k, v);
    }
    let report = load::run(spec, 1, n, Arc::new(AtomicUsize::new(0))).await;
    let range = (report.quantile(0.0), report.quantile(1.0));
    Ok((
        report
            .samples
            .into_iter()
            .map(|s| (s.status, s.error))
            .collect(),
        range,
    ))
}

#[tokio::test]
async fn route_retries_and_fault_delays_resets_paths_and_headers_act_through_real_sidecars()
-> Result<()> {
    bounded(async {
        let cp = ControlPlane::start(&[])?;
        // web-2 aborts every try. The `once` route (v1 only, round robin
        // over web-1 and web-2) allows one attempt; the rest of the
        // service keeps the default retries.
        apply_policy(
            &cp,
            r#"
[services.web]
balancer = "round-robin"
[[services.web.routes]]
name = "once"
match = { path_prefix = "/once" }
backends = [{ subset = { version = "v1" } }]
retries = { max_attempts = 1 }
[services.web.fault]
match = { instance = "web-2" }
abort = { status = 503, percent = 100 }
"#,
        )?;
        let _lab = versioned(&cp).await?;
        let (client, web, _) = client(&cp, &[])?;
        wait_endpoints(&client, "the route", |t| t.contains("\"name\":\"once\"")).await?;
        let (once, _) = statuses(web, "/once", &[], 20).await?;
        let failed = once.iter().filter(|(s, _)| *s == 503).count();
        assert_eq!(failed, 10, "half of /once on web-2, not retried: {once:?}");
        let (rest, _) = statuses(web, "/", &[], 20).await?;
        assert!(rest.iter().all(|(s, _)| *s == 200), "retried elsewhere: {rest:?}");

        // A delay where the path and a header match, nowhere else.
        apply_policy(
            &cp,
            r#"
[services.web.fault]
match = { path_prefix = "/slow", headers = { "x-chaos" = "on" } }
delay = { duration = "1s", percent = 100 }
"#,
        )?;
        wait_endpoints(&client, "the delay", |t| t.contains("\"delay\"")).await?;
        let (slow, (fastest, _)) = statuses(web, "/slow/x", &[("x-chaos", "on")], 3).await?;
        assert!(slow.iter().all(|(s, _)| *s == 200), "{slow:?}");
        assert!(
            fastest >= Duration::from_secs(1),
            "every matching request waits 1 s: {fastest:?}"
        );
        for (path, headers) in [("/slow/x", &[][..]), ("/fast", &[("x-chaos", "on")][..])] {
            let (_, (_, slowest)) = statuses(web, path, headers, 3).await?;
            assert!(
                slowest < Duration::from_secs(1),
                "{path} {headers:?} was delayed: {slowest:?}"
            );
        }

        // Resets on web-2: retried (the default `reset` condition) with
        // retries on; answered 502 fault-injected with them off.
        apply_policy(
            &cp,
            "[services.web]\nbalancer = \"round-robin\"\n[services.web.fault]\nmatch = { instance = \"web-2\" }\nreset = { percent = 100 }\n",
        )?;
        wait_endpoints(&client, "the reset", |t| t.contains("\"reset\":{\"percent\"")).await?;
        let (rescued, _) = statuses(web, "/", &[], 30).await?;
        assert!(rescued.iter().all(|(s, _)| *s == 200), "{rescued:?}");
        apply_policy(
            &cp,
            "[services.web]\nbalancer = \"round-robin\"\n[services.web.retries]\nmax_attempts = 1\n[services.web.fault]\nmatch = { instance = \"web-2\" }\nreset = { percent = 100 }\n",
        )?;
        wait_endpoints(&client, "retries off", |t| t.contains("\"max_attempts\":1")).await?;
        let (reset, _) = statuses(web, "/", &[], 30).await?;
        let resets: Vec<_> = reset.iter().filter(|(s, _)| *s != 200).collect();
        assert_eq!(resets.len(), 10, "{reset:?}");
        assert!(
            resets
                .iter()
                .all(|(s, e)| *s == 502 && e.as_deref() == Some("fault-injected")),
            "{resets:?}"
        );
        let (_, m) = admin_get(&client, "/metrics").await?;
        for kind in ["abort", "delay", "reset"] {
            assert!(
                metric_with(&m, "wayfinder_proxy_faults_injected_total", &format!("kind=\"{kind}\"")) > 0.0,
                "{kind}: {m}"
            );
        }
        Ok(())
    })
    .await
}
