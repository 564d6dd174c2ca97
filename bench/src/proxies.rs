//! Proxy benchmark: the same backend reached directly, through one
//! wf-proxy hop, through two sidecars (plaintext and mTLS), through HAProxy
//! and through nginx, measured in one run on one machine.
//!
//! For each target: HTTP/1.1 keep-alive maximum throughput at 32
//! connections (wrk), HTTP/2 maximum throughput (h2load, 32 connections ×
//! 10 streams), latency percentiles at a fixed rate of half the HTTP/1.1
//! maximum (a paced generator here, timed from each request's scheduled
//! start so a stall is not hidden), the proxy's CPU per 1,000 requests, and
//! its RSS idle and with 1,000 open connections. Run it with `bench/run.sh`.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use bytes::Bytes;
use clap::Parser;
use http_body_util::{BodyExt, Empty};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use wayfinder_bench::lab::{Procs, free_port, local, wait_for};
use wayfinder_bench::{machine, svg};

#[derive(Parser, Debug)]
#[command(about = "wf-proxy beside HAProxy and nginx, one run")]
struct Args {
    /// Directory of wf-control, wf-proxy, lab-app and wfctl.
    #[arg(long, default_value = "target/release")]
    bin_dir: PathBuf,
    /// Seconds per throughput measurement.
    #[arg(long, default_value_t = 5)]
    secs: u64,
    /// Seconds of the fixed-rate latency run.
    #[arg(long, default_value_t = 5)]
    paced_secs: u64,
    /// Where the report goes.
    #[arg(long, default_value = "bench/results")]
    out_dir: PathBuf,
}

/// Rounds of the throughput measurement (the median is reported).
const ROUNDS: usize = 3;

fn s(v: &str) -> String {
    v.to_string()
}

/// CPU seconds a process used so far: user space and kernel.
fn cpu_secs(pid: u32) -> (f64, f64) {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name (which may hold spaces) start at ") ".
    let rest = stat.rsplit_once(") ").map_or("", |(_, r)| r);
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    (ticks(11) / 100.0, ticks(12) / 100.0)
}

fn cpu_of(pids: &[u32]) -> (f64, f64) {
    pids.iter()
        .map(|p| cpu_secs(*p))
        .fold((0.0, 0.0), |a, c| (a.0 + c.0, a.1 + c.1))
}

fn rss_of(pids: &[u32]) -> f64 {
    pids.iter().map(|p| machine::rss_mib(*p).0).sum()
}

/// One thing to measure: where clients send, and which processes are the proxy.
struct Target {
    name: &'static str,
    addr: SocketAddr,
    proxy_pids: Vec<u32>,
    h2: bool,
}

/// `wrk`: requests per second and p99 (ms) at 32 keep-alive connections.
fn wrk(addr: SocketAddr, secs: u64) -> Result<(f64, f64)> {
    let out = Command::new("wrk")
        .args(["-t1", "-c32", &format!("-d{secs}s"), "--latency"])
        .arg(format!("http://{addr}/"))
        .output()
        .context("running wrk")?;
    let text = String::from_utf8_lossy(&out.stdout);
    let rps = text
        .lines()
        .find_map(|l| l.strip_prefix("Requests/sec:"))
        .and_then(|v| v.trim().parse().ok())
        .with_context(|| format!("wrk output: {text}"))?;
    let p99 = text
        .lines()
        .find_map(|l| l.trim().strip_prefix("99%"))
        .and_then(|v| duration_ms(v.trim()))
        .unwrap_or(f64::NAN);
    Ok((rps, p99))
}

fn duration_ms(v: &str) -> Option<f64> {
    let split = v.find(|c: char| c.is_ascii_alphabetic())?;
    let (n, unit) = v.split_at(split);
    let n: f64 = n.parse().ok()?;
    Some(match unit {
        "us" => n / 1e3,
        "ms" => n,
        "s" => n * 1e3,
        _ => return None,
    })
}

/// `h2load`: requests per second over HTTP/2 (h2c), 32 connections × 10 streams.
fn h2load(addr: SocketAddr, secs: u64) -> Result<f64> {
    let out = Command::new("h2load")
        .args(["-c32", "-m10", "-t1", &format!("-D{secs}")])
        .arg(format!("http://{addr}/"))
        .output()
        .context("running h2load")?;
    let text = String::from_utf8_lossy(&out.stdout);
    text.lines()
        .find_map(|l| {
            let l = l.strip_prefix("finished in ")?;
            l.split(", ")
                .nth(1)?
                .strip_suffix(" req/s")?
                .trim()
                .parse()
                .ok()
        })
        .with_context(|| format!("h2load output: {text}"))
}

/// Latency at a fixed `rate` over 32 connections: each request is timed from
/// when it was due, so a stall shows in every request it delays. Returns the
/// latencies (ms, sorted) and the slow requests (over 4 × p50) as (due, s
/// into the run; ms), in order: to tell one stall from many.
async fn paced(addr: SocketAddr, rate: f64, secs: u64) -> (Vec<f64>, Vec<(f64, f64)>) {
    let conns = 32usize;
    let per_conn = Duration::from_secs_f64(conns as f64 / rate.max(1.0));
    let stop = Arc::new(AtomicBool::new(false));
    let began = tokio::time::Instant::now();
    let mut tasks = Vec::new();
    for c in 0..conns {
        let stop = stop.clone();
        tasks.push(tokio::spawn(async move {
            let client: Client<_, Empty<Bytes>> = Client::builder(TokioExecutor::new())
                .pool_max_idle_per_host(1)
                .build_http();
            let uri: hyper::Uri = match format!("http://{addr}/").parse() {
                Ok(u) => u,
                Err(_) => return Vec::new(),
            };
            let start = began + per_conn.mul_f64(c as f64 / conns as f64);
            let mut due = start;
            let mut lat = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                tokio::time::sleep_until(due).await;
                let req = hyper::Request::get(uri.clone()).body(Empty::new());
                if let Ok(req) = req
                    && let Ok(resp) = client.request(req).await
                {
                    let _ = resp.into_body().collect().await;
                    lat.push((
                        due.duration_since(began).as_secs_f64(),
                        due.elapsed().as_secs_f64() * 1e3,
                    ));
                }
                due += per_conn;
            }
            lat
        }));
    }
    tokio::time::sleep(Duration::from_secs(secs)).await;
    stop.store(true, Ordering::Relaxed);
    let mut all = Vec::new();
    for t in tasks {
        if let Ok(l) = t.await {
            all.extend(l);
        }
    }
    let mut lat: Vec<f64> = all.iter().map(|&(_, ms)| ms).collect();
    lat.sort_by(f64::total_cmp);
    let slow_ms = 4.0 * pct(&lat, 0.5);
    let mut slow: Vec<(f64, f64)> = all.into_iter().filter(|&(_, ms)| ms > slow_ms).collect();
    slow.sort_by(|a, b| a.0.total_cmp(&b.0));
    (lat, slow)
}

/// A run of slow requests due within 50 ms of each other.
struct Burst {
    first_s: f64,
    last_s: f64,
    count: usize,
    max_ms: f64,
}

/// "n slow requests in k bursts: c due a-b s (max m ms), ...".
fn describe_slow(slow: &[(f64, f64)]) -> String {
    let mut bursts: Vec<Burst> = Vec::new();
    for &(at, ms) in slow {
        match bursts.last_mut() {
            Some(b) if at - b.last_s < 0.05 => {
                b.last_s = at;
                b.count += 1;
                b.max_ms = b.max_ms.max(ms);
            }
            _ => bursts.push(Burst {
                first_s: at,
                last_s: at,
                count: 1,
                max_ms: ms,
            }),
        }
    }
    let shown: Vec<String> = bursts
        .iter()
        .take(6)
        .map(|b| {
            format!(
                "{} due {:.2}-{:.2} s (max {:.1} ms)",
                b.count, b.first_s, b.last_s, b.max_ms
            )
        })
        .collect();
    format!(
        "{} slow requests in {} bursts: {}",
        slow.len(),
        bursts.len(),
        shown.join(", ")
    )
}

fn pct(sorted: &[f64], q: f64) -> f64 {
    sorted
        .get(((sorted.len() as f64 - 1.0) * q).round() as usize)
        .copied()
        .unwrap_or(f64::NAN)
}

/// Opens `n` keep-alive connections that each made one request, and keeps
/// them open until dropped.
async fn open_connections(addr: SocketAddr, n: usize) -> Vec<tokio::net::TcpStream> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut conns = Vec::new();
    for _ in 0..n {
        let Ok(mut s) = tokio::net::TcpStream::connect(addr).await else {
            break;
        };
        if s.write_all(b"GET / HTTP/1.1\r\nHost: web\r\n\r\n")
            .await
            .is_ok()
        {
            let mut buf = [0u8; 512];
            let _ = tokio::time::timeout(Duration::from_secs(2), s.read(&mut buf)).await;
            conns.push(s);
        }
    }
    conns
}

struct Row {
    name: &'static str,
    h1_rps: f64,
    h1_p99: f64,
    h2_rps: Option<f64>,
    paced: Vec<f64>,
    rate: f64,
    /// CPU µs per request of the proxy processes: user space, kernel.
    cpu_us: Option<(f64, f64)>,
    /// RSS before the first request.
    rss_start: Option<f64>,
    /// RSS right after the throughput runs, no request in flight.
    rss_idle: Option<f64>,
    rss_1000: Option<f64>,
}

#[tokio::main]
async fn main() -> Result<()> {
    let args = Args::parse();
    let _ = rustls::crypto::ring::default_provider().install_default();
    for b in ["wrk", "h2load", "haproxy", "nginx"] {
        let found = Command::new("sh")
            .args(["-c", &format!("command -v {b} || test -x /usr/sbin/{b}")])
            .output();
        if !found.is_ok_and(|o| o.status.success()) {
            bail!("{b} is missing: run bench/run.sh, which installs it");
        }
    }
    let work = tempfile::tempdir()?;
    let dir = work.path();
    let mut procs = Procs::default();
    let bin = |n: &str| args.bin_dir.join(n);

    println!("== starting the backend, the control plane and the proxies");
    let app = free_port()?;
    procs.spawn(
        &bin("lab-app"),
        &[
            s("--listen"),
            local(app).to_string(),
            s("--name"),
            s("web-1"),
        ],
        &dir.join("app.log"),
    )?;
    wait_for(local(app), "/healthz", |st, _| st == 200).await?;

    let token = "bench-token-0123456789";
    let (grpc, http) = (free_port()?, free_port()?);
    procs.spawn(
        &bin("wf-control"),
        &[
            s("--grpc"),
            local(grpc).to_string(),
            s("--http"),
            local(http).to_string(),
            s("--data-dir"),
            dir.join("data").to_string_lossy().to_string(),
            // The data path is what this measures, not the control plane.
            s("--insecure"),
            s("--join-token"),
            s(token),
        ],
        &dir.join("control.log"),
    )?;
    wait_for(local(http), "/healthz", |st, _| st == 200).await?;
    let cp = format!("http://{}", local(grpc));
    // The backend as a plain (non-meshed) static endpoint, for one hop.
    let status = Command::new(bin("wfctl"))
        .env("WAYFINDER_CONTROL_PLANE", &cp)
        .args(["register", "direct", &local(app).to_string()])
        .status()?;
    anyhow::ensure!(status.success(), "wfctl register failed");

    let mut sidecar =
        |service: Option<&str>, name: &str, extra: Vec<String>| -> Result<(u32, u16, u16)> {
            let (listen, admin) = (free_port()?, free_port()?);
            let mut a = vec![
                s("--control-plane"),
                cp.clone(),
                s("--admin"),
                local(admin).to_string(),
                s("--instance"),
                s(name),
            ];
            if let Some(svc) = service {
                a.extend([
                    s("--service"),
                    s(svc),
                    s("--app"),
                    local(app).to_string(),
                    s("--inbound"),
                    local(listen).to_string(),
                ]);
            }
            a.extend(extra);
            let i = procs.spawn(&bin("wf-proxy"), &a, &dir.join(format!("{name}.log")))?;
            let pid = procs.pid(i);
            Ok((pid, listen, admin))
        };
    // One hop: a client-only sidecar straight to the backend.
    let one_port = free_port()?;
    let (one_pid, _, one_admin) = sidecar(
        None,
        "one-hop",
        vec![s("--upstream"), format!("direct={}", local(one_port))],
    )?;
    // Two hops, plaintext and mTLS: client sidecar → server sidecar → backend.
    let (web_pid, _, _) = sidecar(Some("web"), "web-plain", vec![])?;
    let two_port = free_port()?;
    let (two_pid, _, two_admin) = sidecar(
        None,
        "two-hop",
        vec![s("--upstream"), format!("web={}", local(two_port))],
    )?;
    let (webs_pid, _, _) = sidecar(Some("webs"), "web-mtls", vec![s("--join-token"), s(token)])?;
    let mtls_port = free_port()?;
    let (mtls_pid, _, mtls_admin) = sidecar(
        None,
        "two-hop-mtls",
        vec![
            s("--upstream"),
            format!("webs={}", local(mtls_port)),
            s("--join-token"),
            s(token),
        ],
    )?;
    for admin in [one_admin, two_admin, mtls_admin] {
        wait_for(local(admin), "/endpoints", |_, b| {
            b.contains("\"healthy\":true")
        })
        .await?;
    }

    // HAProxy and nginx, one hop each, tuned as a lab would: keep-alive to
    // the backend, one worker/thread as the sidecar's fair share. `binds`
    // are the frontend's bind lines, `server` where the backend is.
    let haproxy = which("haproxy");
    let mut spawn_haproxy = |name: &str, binds: &str, server: SocketAddr| -> Result<u32> {
        let cfg = format!(
            "global\n    maxconn 8000\n    nbthread 1\n\ndefaults\n    mode http\n    timeout connect 1s\n    timeout client 30s\n    \
             timeout server 30s\n    option http-keep-alive\n\nfrontend web\n{binds}    \
             default_backend web\n\nbackend web\n    http-reuse always\n    server next {server}\n"
        );
        let path = dir.join(format!("{name}.cfg"));
        std::fs::write(&path, &cfg)?;
        let args = [s("-db"), s("-f"), path.to_string_lossy().to_string()];
        let i = procs.spawn(&haproxy, &args, &dir.join(format!("{name}.log")))?;
        Ok(procs.pid(i))
    };
    // h2c on one bind needs HTTP/1 and HTTP/2 detection: HAProxy does it
    // when `proto` is not forced; keep the default for HTTP/1 and a second
    // bind for h2c.
    let (ha_port, ha_h2) = (free_port()?, free_port()?);
    let ha_pid = spawn_haproxy(
        "haproxy",
        &format!("    bind 127.0.0.1:{ha_port}\n    bind 127.0.0.1:{ha_h2} proto h2\n"),
        local(app),
    )?;
    // A second HAProxy in front of the first: two proxy hops of the
    // reference, to read the two-hop latency of the sidecars against.
    let ha2_port = free_port()?;
    let ha2_pid = spawn_haproxy(
        "haproxy2",
        &format!("    bind 127.0.0.1:{ha2_port}\n"),
        local(ha_port),
    )?;
    let ng_port = free_port()?;
    let ng_h2 = free_port()?;
    let p = dir.to_string_lossy();
    let ng_cfg = format!(
        "daemon off;\nmaster_process off;\nworker_processes 1;\npid {p}/nginx.pid;\nerror_log {p}/nginx-error.log;\n\
         events {{ worker_connections 20000; }}\nhttp {{\n    access_log off;\n    client_body_temp_path {p}/body;\n    \
         proxy_temp_path {p}/proxy;\n    fastcgi_temp_path {p}/fcgi;\n    uwsgi_temp_path {p}/uwsgi;\n    scgi_temp_path {p}/scgi;\n    \
         upstream web {{ server {}; keepalive 64; }}\n    \
         server {{ listen 127.0.0.1:{ng_port}; listen 127.0.0.1:{ng_h2} http2; keepalive_requests 1000000;\n        \
         location / {{ proxy_pass http://web; proxy_http_version 1.1; proxy_set_header Connection \"\"; }} }}\n}}\n",
        local(app)
    );
    std::fs::write(dir.join("nginx.conf"), &ng_cfg)?;
    let ng_pid = procs.spawn(
        &which("nginx"),
        &[
            s("-p"),
            p.to_string(),
            s("-c"),
            dir.join("nginx.conf").to_string_lossy().to_string(),
        ],
        &dir.join("nginx.log"),
    )?;
    let ng_pid = procs.pid(ng_pid);
    for (port, log) in [
        (ha_port, "haproxy.log"),
        (ha2_port, "haproxy2.log"),
        (ng_port, "nginx-error.log"),
        (one_port, "one-hop.log"),
        (two_port, "two-hop.log"),
        (mtls_port, "two-hop-mtls.log"),
    ] {
        if let Err(e) = wait_for(local(port), "/", |st, _| st == 200).await {
            let text = std::fs::read_to_string(dir.join(log)).unwrap_or_default();
            bail!("{e}: {log}:\n{text}");
        }
    }

    let targets = [
        Target {
            name: "direct",
            addr: local(app),
            proxy_pids: vec![],
            h2: true,
        },
        Target {
            name: "wf-proxy, one hop",
            addr: local(one_port),
            proxy_pids: vec![one_pid],
            h2: true,
        },
        Target {
            name: "wf-proxy, two hops",
            addr: local(two_port),
            proxy_pids: vec![two_pid, web_pid],
            h2: true,
        },
        Target {
            name: "wf-proxy, two hops mTLS",
            addr: local(mtls_port),
            proxy_pids: vec![mtls_pid, webs_pid],
            h2: true,
        },
        Target {
            name: "HAProxy",
            addr: local(ha_port),
            proxy_pids: vec![ha_pid],
            h2: true,
        },
        Target {
            name: "HAProxy, two hops",
            addr: local(ha2_port),
            proxy_pids: vec![ha2_pid, ha_pid],
            h2: false,
        },
        Target {
            name: "nginx",
            addr: local(ng_port),
            proxy_pids: vec![ng_pid],
            h2: true,
        },
    ];
    let h2_addr = |t: &Target| match t.name {
        "HAProxy" => local(ha_h2),
        "nginx" => local(ng_h2),
        _ => t.addr,
    };
    // First every maximum, then latency for all at one common rate: half
    // the two-hop maximum, so "added latency" compares like with like.
    // Throughput is the median of three rounds that visit the targets in
    // turn: on a small shared machine one round can be off by a third.
    let rss_start: Vec<Option<f64>> = targets
        .iter()
        .map(|t| (!t.proxy_pids.is_empty()).then(|| rss_of(&t.proxy_pids)))
        .collect();
    // Per target and round: req/s, p99 ms, CPU seconds (user, kernel).
    type Round = (f64, f64, (f64, f64));
    let mut h1: Vec<Vec<Round>> = vec![Vec::new(); targets.len()];
    for round in 1..=ROUNDS {
        for (i, t) in targets.iter().enumerate() {
            let _ = wrk(t.addr, 1);
            let cpu0 = cpu_of(&t.proxy_pids);
            let (rps, p99) = wrk(t.addr, args.secs)?;
            let cpu1 = cpu_of(&t.proxy_pids);
            let cpu = (cpu1.0 - cpu0.0, cpu1.1 - cpu0.1);
            println!(
                "== round {round}: {}: HTTP/1.1 {rps:.0} req/s, p99 {p99:.2} ms at full load",
                t.name
            );
            h1[i].push((rps, p99, cpu));
        }
    }
    let mut rows = Vec::new();
    for (i, t) in targets.iter().enumerate() {
        let mut runs = h1[i].clone();
        runs.sort_by(|a, b| a.0.total_cmp(&b.0));
        let (h1_rps, h1_p99, cpu) = runs[runs.len() / 2];
        let rss_idle = (!t.proxy_pids.is_empty()).then(|| rss_of(&t.proxy_pids));
        let h2_rps = if t.h2 {
            h2load(h2_addr(t), args.secs).ok()
        } else {
            None
        };
        if let Some(r) = h2_rps {
            println!("== {}: HTTP/2 {r:.0} req/s", t.name);
        }
        let rss_1000 = if t.proxy_pids.is_empty() {
            None
        } else {
            let conns = open_connections(t.addr, 1000).await;
            tokio::time::sleep(Duration::from_millis(300)).await;
            let r = rss_of(&t.proxy_pids);
            println!(
                "   RSS {:.1} MiB idle, {r:.1} MiB with {} connections",
                rss_idle.unwrap_or(0.0),
                conns.len()
            );
            drop(conns);
            Some(r)
        };
        rows.push(Row {
            name: t.name,
            h1_rps,
            h1_p99,
            h2_rps,
            paced: Vec::new(),
            rate: 0.0,
            cpu_us: (!t.proxy_pids.is_empty()).then(|| {
                let per_req = |secs: f64| secs * 1e6 / (h1_rps * args.secs as f64);
                (per_req(cpu.0), per_req(cpu.1))
            }),
            rss_start: rss_start[i],
            rss_idle,
            rss_1000,
        });
    }
    let rate = rows
        .iter()
        .find(|r| r.name == "wf-proxy, two hops")
        .map_or(1000.0, |r| r.h1_rps / 2.0);
    for (t, row) in targets.iter().zip(rows.iter_mut()) {
        let (lat, slow) = paced(t.addr, rate, args.paced_secs).await;
        if !slow.is_empty() {
            println!("   {}: {}", t.name, describe_slow(&slow));
        }
        println!(
            "== {} at {rate:.0} req/s: p50 {:.3} ms, p99 {:.3} ms",
            t.name,
            pct(&lat, 0.5),
            pct(&lat, 0.99)
        );
        row.paced = lat;
        row.rate = rate;
    }
    report(&args, &rows)
}

fn which(name: &str) -> PathBuf {
    for dir in ["/usr/sbin", "/usr/bin", "/usr/local/sbin", "/usr/local/bin"] {
        let p = Path::new(dir).join(name);
        if p.exists() {
            return p;
        }
    }
    PathBuf::from(name)
}

fn report(args: &Args, rows: &[Row]) -> Result<()> {
    let date = machine::date();
    let fmt = |v: Option<f64>, d: usize| v.map_or("–".to_string(), |v| format!("{v:.d$}"));
    let mut md = format!(
        "# Proxies side by side ({date})\n\nMachine: {}. Everything on loopback on this machine: load generators (wrk, h2load, a paced \
         generator), proxies and the backend (lab-app) share the cores, so the numbers are ratios for this machine, not capacities.\n\n\
         HTTP/1.1: wrk, 1 thread, 32 keep-alive connections, {} s, median of 3 rounds visiting the targets in turn. HTTP/2: h2load, 32 connections × 10 streams, {} s (h2c). \
         Fixed rate: one rate for every target, half the HTTP/1.1 maximum of two hops, 32 connections, {} s, latency from each request's scheduled start. \
         CPU: the proxy processes' time in user space and in the kernel during the HTTP/1.1 run, per request. RSS: the proxy processes \
         at start (before the first request), idle right after the throughput runs, and with 1,000 open keep-alive connections. \
         The wf-proxy binaries are the lab image's (static, not PIE: `deploy/build-static.sh`). Two hops count both sidecars (both HAProxies for HAProxy, two hops: a second HAProxy in front of the first, the reference for the two-hop latency).\n\n\
         | target | HTTP/1.1 req/s | HTTP/2 req/s | fixed rate req/s | p50 ms @ fixed | p99 ms @ fixed | p99 ms @ max | CPU µs / req (user + kernel) | RSS start MiB | RSS idle after load MiB | RSS 1,000 conns MiB |\n\
         |---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n",
        machine::describe(),
        args.secs,
        args.secs,
        args.paced_secs
    );
    for r in rows {
        md += &format!(
            "| {} | {:.0} | {} | {:.0} | {:.3} | {:.3} | {:.2} | {} | {} | {} | {} |\n",
            r.name,
            r.h1_rps,
            fmt(r.h2_rps, 0),
            r.rate,
            pct(&r.paced, 0.5),
            pct(&r.paced, 0.99),
            r.h1_p99,
            r.cpu_us.map_or("–".to_string(), |(u, k)| format!(
                "{:.1} ({u:.1} + {k:.1})",
                u + k
            )),
            fmt(r.rss_start, 1),
            fmt(r.rss_idle, 1),
            fmt(r.rss_1000, 1),
        );
    }
    let find = |n: &str| rows.iter().find(|r| r.name == n);
    if let (Some(one), Some(ha), Some(direct), Some(two)) = (
        find("wf-proxy, one hop"),
        find("HAProxy"),
        find("direct"),
        find("wf-proxy, two hops"),
    ) {
        md += &format!(
            "\nTargets (issue 9), as ratios in this run:\n\n\
             - one hop ÷ HAProxy, HTTP/1.1 req/s: **{:.2}** (target ≥ 1.1)\n\
             - two hops − direct, p99 at the fixed rate: **{:+.3} ms** (target ≤ 0.6 ms; both at the same fixed rate)\n\
             - one-hop RSS: **{} MiB at start, {} MiB idle after load, {} MiB with 1,000 connections** (targets ≤ 8 MB idle and ≤ 25 MB)\n",
            one.h1_rps / ha.h1_rps,
            pct(&two.paced, 0.99) - pct(&direct.paced, 0.99),
            fmt(one.rss_start, 1),
            fmt(one.rss_idle, 1),
            fmt(one.rss_1000, 1),
        );
        if let Some(ha2) = find("HAProxy, two hops") {
            md += &format!(
                "- for reference, two HAProxy hops − direct, p99 at the same rate: **{:+.3} ms**; one HAProxy hop: **{:+.3} ms**\n",
                pct(&ha2.paced, 0.99) - pct(&direct.paced, 0.99),
                pct(&ha.paced, 0.99) - pct(&direct.paced, 0.99),
            );
        }
        if let (Some((u, k)), Some((hu, hk))) = (one.cpu_us, ha.cpu_us) {
            // wrk, the backend and the proxy saturate the cores at the
            // maximum, so cores ÷ req/s is the whole machine's CPU per
            // request; without the sidecar's user-space part it would be
            // that much less. An upper bound: the kernel's part stays.
            let cores = std::thread::available_parallelism().map_or(1.0, |n| n.get() as f64);
            let per_req = cores * 1e6 / one.h1_rps;
            let bound = one.h1_rps * per_req / (per_req - u).max(1.0);
            md += &format!(
                "- CPU per request, one hop: wf-proxy {u:.1} µs in user space + {k:.1} µs in the kernel, HAProxy {hu:.1} + {hk:.1}. \
                 The whole machine spends {per_req:.1} µs per request through one sidecar hop; with a sidecar that took no user-space \
                 time at all, one hop would reach at most {bound:.0} req/s = **{:.2} × HAProxy**\n",
                bound / ha.h1_rps
            );
        }
    }
    let svg_name = format!("proxies-{date}.svg");
    md += &format!("\n![latency at the fixed rate]({svg_name})\n");
    let colors = [
        "#7f7f7f", "#1f77b4", "#17becf", "#9467bd", "#d62728", "#ff7f0e", "#2ca02c",
    ];
    let curves: Vec<_> = rows
        .iter()
        .zip(colors)
        .map(|(r, color)| svg::Curve {
            label: r.name,
            sorted_ms: &r.paced,
            color,
        })
        .collect();
    std::fs::create_dir_all(&args.out_dir)?;
    std::fs::write(
        args.out_dir.join(&svg_name),
        svg::cdf("Latency at one fixed rate (CDF)", &curves),
    )?;
    let path = args.out_dir.join(format!("proxies-{date}.md"));
    std::fs::write(&path, &md)?;
    println!("\n{md}\nwritten to {}", path.display());
    Ok(())
}
