//! Failover benchmark: the lab's "kill a container" moment, measured the
//! same way through the mesh, through HAProxy and through nginx.
//!
//! For each target, three fresh lab-apps start on loopback; `clients`
//! keep-alive workers send `requests` GETs through the target; when half
//! are done, one backend dies (SIGKILL; in the mesh, its app and its
//! sidecar together, as when a container dies). The report counts the
//! requests that failed and the latency percentiles, and plots the latency
//! CDFs side by side. Run it with `bench/failover.sh`.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use clap::Parser;
use wayfinder_bench::lab::{Procs, free_port, local, wait_for};
use wayfinder_bench::{machine, svg};
use wayfinder_tests::load::{self, Report, Spec};

#[derive(Parser, Debug)]
#[command(about = "Kill a backend midway: mesh vs HAProxy vs nginx")]
struct Args {
    /// Directory of wf-control, wf-proxy and lab-app.
    #[arg(long, default_value = "target/release")]
    bin_dir: PathBuf,
    /// HAProxy binary (skipped when absent).
    #[arg(long, default_value = "/usr/sbin/haproxy")]
    haproxy: PathBuf,
    /// nginx binary (skipped when absent).
    #[arg(long, default_value = "/usr/sbin/nginx")]
    nginx: PathBuf,
    /// Requests per target.
    #[arg(long, default_value_t = 100_000)]
    requests: usize,
    /// Concurrent keep-alive clients.
    #[arg(long, default_value_t = 16)]
    clients: usize,
    /// Where the report goes.
    #[arg(long, default_value = "bench/results")]
    out_dir: PathBuf,
}

/// Requests after the kill whose latency shows the disruption.
const AFTER: usize = 2_000;

/// A target under test: where clients send, and which processes die midway.
struct Setup {
    procs: Procs,
    front: SocketAddr,
    victims: Vec<usize>,
    config: String,
}

async fn backends(args: &Args, procs: &mut Procs, dir: &Path) -> Result<Vec<(usize, u16)>> {
    let mut apps = Vec::new();
    for i in 1..=3 {
        let port = free_port()?;
        let listen = local(port).to_string();
        let idx = procs.spawn(
            &args.bin_dir.join("lab-app"),
            &["--listen", &listen, "--name", &format!("web-{i}")],
            &dir.join(format!("web-{i}.log")),
        )?;
        apps.push((idx, port));
    }
    for (_, port) in &apps {
        wait_for(local(*port), "/healthz", |s, _| s == 200).await?;
    }
    Ok(apps)
}

async fn mesh(args: &Args, dir: &Path) -> Result<Setup> {
    let mut procs = Procs::default();
    let apps = backends(args, &mut procs, dir).await?;
    let (grpc, http) = (free_port()?, free_port()?);
    let data = dir.join("wf-data");
    procs.spawn(
        &args.bin_dir.join("wf-control"),
        &[
            "--grpc",
            &local(grpc).to_string(),
            "--http",
            &local(http).to_string(),
            "--data-dir",
            &data.to_string_lossy(),
            // The control plane is not what this measures.
            "--insecure",
        ],
        &dir.join("wf-control.log"),
    )?;
    wait_for(local(http), "/healthz", |s, _| s == 200).await?;
    let cp = format!("http://{}", local(grpc));
    let proxy = args.bin_dir.join("wf-proxy");
    let mut sidecars = Vec::new();
    for (i, (_, port)) in apps.iter().enumerate() {
        let (inbound, admin) = (free_port()?, free_port()?);
        let idx = procs.spawn(
            &proxy,
            &[
                "--control-plane",
                &cp,
                "--service",
                "web",
                "--instance",
                &format!("web-{}", i + 1),
                "--app",
                &local(*port).to_string(),
                "--inbound",
                &local(inbound).to_string(),
                "--admin",
                &local(admin).to_string(),
                "--health-check",
                "/healthz",
            ],
            &dir.join(format!("sidecar-{}.log", i + 1)),
        )?;
        sidecars.push(idx);
    }
    let (front, admin) = (free_port()?, free_port()?);
    procs.spawn(
        &proxy,
        &[
            "--control-plane",
            &cp,
            "--admin",
            &local(admin).to_string(),
            "--upstream",
            &format!("web={}", local(front)),
        ],
        &dir.join("client.log"),
    )?;
    wait_for(local(admin), "/endpoints", |_, b| {
        b.matches("\"healthy\":true").count() == 3
    })
    .await?;
    Ok(Setup {
        procs,
        front: local(front),
        victims: vec![apps[1].0, sidecars[1]],
        config: "wf-control, a sidecar per lab-app, a client sidecar with an explicit `web` \
                 listener; no policy (defaults: retries on connect failure, reset and gateway \
                 errors for idempotent requests, within a 20% + 10/s budget)"
            .into(),
    })
}

async fn haproxy(args: &Args, dir: &Path) -> Result<Setup> {
    let mut procs = Procs::default();
    let apps = backends(args, &mut procs, dir).await?;
    let front = free_port()?;
    let servers: String = apps
        .iter()
        .enumerate()
        .map(|(i, (_, p))| {
            format!(
                "    server web{} 127.0.0.1:{p} check inter 1s fall 2 rise 2\n",
                i + 1
            )
        })
        .collect();
    let config = format!(
        "global\n    maxconn 4096\n\ndefaults\n    mode http\n    timeout connect 1s\n    \
         timeout client 30s\n    timeout server 30s\n    retries 3\n    option redispatch 1\n    \
         retry-on all-retryable-errors\n    option http-keep-alive\n\n\
         frontend web\n    bind 127.0.0.1:{front}\n    default_backend web\n\n\
         backend web\n    balance roundrobin\n{servers}"
    );
    let cfg = dir.join("haproxy.cfg");
    std::fs::write(&cfg, &config)?;
    procs.spawn(
        &args.haproxy,
        &["-db", "-f", &cfg.to_string_lossy()],
        &dir.join("haproxy.log"),
    )?;
    wait_for(local(front), "/", |s, _| s == 200).await?;
    Ok(Setup {
        procs,
        front: local(front),
        victims: vec![apps[1].0],
        config: format!("```\n{config}```"),
    })
}

async fn nginx(args: &Args, dir: &Path) -> Result<Setup> {
    let mut procs = Procs::default();
    let apps = backends(args, &mut procs, dir).await?;
    let front = free_port()?;
    let servers: String = apps
        .iter()
        .map(|(_, p)| format!("        server 127.0.0.1:{p};\n"))
        .collect();
    let prefix = dir.to_string_lossy();
    let config = format!(
        "daemon off;\nworker_processes 1;\npid {prefix}/nginx.pid;\nerror_log {prefix}/nginx-error.log;\n\
         events {{ worker_connections 4096; }}\n\
         http {{\n    access_log off;\n    client_body_temp_path {prefix}/body;\n    \
         proxy_temp_path {prefix}/proxy;\n    fastcgi_temp_path {prefix}/fcgi;\n    \
         uwsgi_temp_path {prefix}/uwsgi;\n    scgi_temp_path {prefix}/scgi;\n    \
         upstream web {{\n{servers}        keepalive 32;\n    }}\n    \
         server {{\n        listen 127.0.0.1:{front};\n        location / {{\n            \
         proxy_pass http://web;\n            proxy_http_version 1.1;\n            \
         proxy_set_header Connection \"\";\n            \
         proxy_next_upstream error timeout http_502 http_503 http_504;\n            \
         proxy_connect_timeout 1s;\n        }}\n    }}\n}}\n"
    );
    let cfg = dir.join("nginx.conf");
    std::fs::write(&cfg, &config)?;
    procs.spawn(
        &args.nginx,
        &["-p", &prefix, "-c", &cfg.to_string_lossy()],
        &dir.join("nginx.log"),
    )?;
    wait_for(local(front), "/", |s, _| s == 200).await?;
    Ok(Setup {
        procs,
        front: local(front),
        victims: vec![apps[1].0],
        config: format!("```nginx\n{config}```"),
    })
}

/// What one target did: the samples, the run's duration, where the kill
/// happened (in finished requests) and the configuration used.
struct Outcome {
    report: Report,
    took: Duration,
    killed_at: usize,
    config: String,
}

/// One target's run: load, a kill at half-way, the report.
async fn run(name: &str, mut setup: Setup, args: &Args) -> Result<Outcome> {
    let done = Arc::new(AtomicUsize::new(0));
    let started = Instant::now();
    let load = tokio::spawn(load::run(
        Spec::get(setup.front, "web"),
        args.clients,
        args.requests,
        done.clone(),
    ));
    let mut killed = false;
    let mut killed_at = 0;
    let mut shown = Instant::now();
    while !load.is_finished() {
        let n = done.load(Ordering::Relaxed);
        if !killed && n >= args.requests / 2 {
            for v in setup.victims.clone() {
                setup.procs.kill(v);
            }
            killed = true;
            killed_at = n;
            println!("  {name}: {n} requests done, killed web-2");
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
        if shown.elapsed() >= Duration::from_secs(1) {
            shown = Instant::now();
            println!("  {name}: {n}/{} requests", args.requests);
        }
    }
    let report = load.await?;
    let took = started.elapsed();
    println!(
        "\r  {name}: {} requests in {took:.1?}, {} failed",
        report.samples.len(),
        report.failed().len()
    );
    Ok(Outcome {
        report,
        took,
        killed_at,
        config: setup.config,
    })
}

#[tokio::main]
async fn main() -> Result<()> {
    let args = Args::parse();
    for b in ["wf-control", "wf-proxy", "lab-app"] {
        anyhow::ensure!(
            args.bin_dir.join(b).exists(),
            "{} missing: build with `cargo build --release`",
            args.bin_dir.join(b).display()
        );
    }
    let work = tempfile::tempdir()?;
    let mut results = Vec::new();
    for name in ["mesh", "haproxy", "nginx"] {
        let dir = work.path().join(name);
        std::fs::create_dir_all(&dir)?;
        println!("== {name}");
        let setup = match name {
            "mesh" => mesh(&args, &dir).await,
            "haproxy" if args.haproxy.exists() => haproxy(&args, &dir).await,
            "nginx" if args.nginx.exists() => nginx(&args, &dir).await,
            _ => {
                println!("  {name}: not installed, skipped");
                continue;
            }
        };
        let setup =
            setup.with_context(|| format!("setting up {name} (logs in {})", dir.display()))?;
        results.push((name, run(name, setup, &args).await?));
    }

    let date = machine::date();
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    let mut md = format!(
        "# Failover: one backend killed midway ({date})\n\n\
         Machine: {}. Everything runs on loopback on this machine, load generator included.\n\n\
         Workload: {} GETs from {} keep-alive clients through each target to three lab-apps; when half \
         are done, web-2 is killed with SIGKILL (in the mesh, its app and its sidecar together, as when \
         a container dies). A request fails when it gets no 2xx answer. The mesh is two proxy hops \
         (client sidecar, then the instance's sidecar), HAProxy and nginx one; all release builds \
         with their defaults apart from what the configurations below set. \"after kill\" is the \
         {AFTER} requests that finished right after the kill: the disruption window.\n\n\
         | target | requests | failed | p50 ms | p99 ms | max ms | p99 after kill ms | req/s |\n\
         |---|---:|---:|---:|---:|---:|---:|---:|\n",
        machine::describe(),
        args.requests,
        args.clients
    );
    let mut sorted = Vec::new();
    for (name, o) in &results {
        let report = &o.report;
        let after = Report {
            samples: report
                .samples
                .iter()
                .filter(|s| s.seq >= o.killed_at && s.seq < o.killed_at + AFTER)
                .cloned()
                .collect(),
        };
        md += &format!(
            "| {name} | {} | {} | {:.2} | {:.2} | {:.1} | {:.2} | {:.0} |\n",
            report.samples.len(),
            report.failed().len(),
            ms(report.quantile(0.5)),
            ms(report.quantile(0.99)),
            ms(report.quantile(1.0)),
            ms(after.quantile(0.99)),
            report.samples.len() as f64 / o.took.as_secs_f64()
        );
        let mut l: Vec<f64> = report.samples.iter().map(|s| ms(s.latency)).collect();
        l.sort_by(f64::total_cmp);
        sorted.push((*name, l));
    }
    let svg_name = format!("failover-{date}.svg");
    md += &format!("\n![latency CDF]({svg_name})\n\n## Configurations\n\n");
    for (name, o) in &results {
        md += &format!("### {name}\n\n{}\n\n", o.config);
    }
    let colors = ["#1f77b4", "#d62728", "#2ca02c"];
    let curves: Vec<_> = sorted
        .iter()
        .zip(colors)
        .map(|((label, l), color)| svg::Curve {
            label,
            sorted_ms: l,
            color,
        })
        .collect();
    std::fs::create_dir_all(&args.out_dir)?;
    std::fs::write(
        args.out_dir.join(&svg_name),
        svg::cdf("Latency while a backend dies (CDF)", &curves),
    )?;
    let md_path = args.out_dir.join(format!("failover-{date}.md"));
    std::fs::write(&md_path, &md)?;
    println!("\n{md}\nwritten to {}", md_path.display());
    Ok(())
}
