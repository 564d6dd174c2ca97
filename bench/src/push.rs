//! Control-plane push benchmark: many endpoints, many watch streams, and the
//! time from a change to its receipt by every watcher.
//!
//! Starts its own `wf-control` (release build), registers `services ×
//! endpoints` static endpoints, opens `watchers` watch streams (one TCP
//! connection each, like sidecars), each on the hot service plus random
//! others, then makes `changes` changes to the hot service at a fixed rate.
//! Writes a markdown report and an SVG CDF under `bench/results/`.

use wayfinder_bench::machine::{self, rss_mib};
use wayfinder_bench::svg;

use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::Parser;
use futures::StreamExt;
use rand::seq::IndexedRandom;
use tokio::sync::{Semaphore, mpsc};
use tonic::transport::Channel;
use wayfinder_proto::v1::{
    DeregisterRequest, EndpointAddress, Health, Instance, RegisterRequest, ServiceWatch,
    WatchRequest, deregister_request::Target, discovery_client::DiscoveryClient,
    registry_client::RegistryClient, watch_event::Kind,
};

#[derive(Parser, Debug)]
struct Args {
    /// wf-control binary.
    #[arg(long, default_value = "target/release/wf-control")]
    wf_control: PathBuf,
    /// Services.
    #[arg(long, default_value_t = 100)]
    services: u32,
    /// Endpoints per service.
    #[arg(long, default_value_t = 100)]
    endpoints: u32,
    /// Watch streams (one connection each).
    #[arg(long, default_value_t = 1000)]
    watchers: u32,
    /// Services per watch stream (the hot one plus random others).
    #[arg(long, default_value_t = 10)]
    services_per_watcher: u32,
    /// Changes to the hot service.
    #[arg(long, default_value_t = 200)]
    changes: u32,
    /// Changes per second.
    #[arg(long, default_value_t = 20)]
    rate: u32,
    /// Where the report goes.
    #[arg(long, default_value = "bench/results")]
    out_dir: PathBuf,
}

struct ControlPlane {
    child: Child,
    grpc: String,
    _data: PathBuf,
}

impl Drop for ControlPlane {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self._data);
    }
}

fn start(bin: &PathBuf) -> Result<ControlPlane> {
    let data = std::env::temp_dir().join(format!("wf-push-bench-{}", std::process::id()));
    let mut child = Command::new(bin)
        .args([
            "--grpc",
            "127.0.0.1:0",
            "--http",
            "127.0.0.1:0",
            "--data-dir",
        ])
        .arg(&data)
        .env("WAYFINDER_LOG", "warn,wf_control=info")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| {
            format!(
                "starting {} (build it with cargo build --release)",
                bin.display()
            )
        })?;
    let stderr = child.stderr.take().context("stderr")?;
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if let Some(i) = line.find("grpc=") {
                let rest = &line[i + 5..];
                let end = rest.find(' ').unwrap_or(rest.len());
                let _ = tx.send(rest[..end].to_string());
            }
        }
    });
    let grpc = rx
        .recv_timeout(Duration::from_secs(10))
        .context("wf-control did not start")?;
    Ok(ControlPlane {
        child,
        grpc,
        _data: data,
    })
}

/// (current RSS, peak RSS) in MiB from /proc.
fn svc(i: u32) -> String {
    format!("svc-{i:03}")
}

fn instance(service: &str, id: String, port: u32) -> Instance {
    Instance {
        service: service.to_string(),
        instance_id: id,
        address: "10.1.0.1".into(),
        port,
        ..Default::default()
    }
}

async fn channel(url: &str) -> Result<Channel> {
    Ok(Channel::from_shared(url.to_string())?
        .tcp_nodelay(true)
        .connect_timeout(Duration::from_secs(10))
        .connect()
        .await?)
}

fn pct(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() as f64 - 1.0) * q).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

#[tokio::main]
async fn main() -> Result<()> {
    let args = Args::parse();
    let cp = start(&args.wf_control)?;
    let url = format!("http://{}", cp.grpc);
    let pid = cp.child.id();
    let (rss_idle, _) = rss_mib(pid);
    println!(
        "wf-control pid {pid} on {} ({rss_idle:.1} MiB idle)",
        cp.grpc
    );

    // 1. Registrations.
    let total = args.services * args.endpoints;
    let t = Instant::now();
    let channels: Vec<Channel> =
        futures::future::try_join_all((0..8).map(|_| channel(&url))).await?;
    let sem = Arc::new(Semaphore::new(64));
    let mut tasks = Vec::new();
    for n in 0..total {
        let (s, e) = (n / args.endpoints, n % args.endpoints);
        let mut reg = RegistryClient::new(channels[n as usize % channels.len()].clone());
        let permit = sem.clone().acquire_owned().await?;
        tasks.push(tokio::spawn(async move {
            let _p = permit;
            reg.register(RegisterRequest {
                instance: Some(instance(&svc(s), format!("{}-{e}", svc(s)), 10_000 + e)),
                static_endpoint: true,
                initial_health: Health::Serving as i32,
                ..Default::default()
            })
            .await
        }));
        if (n + 1) % 2000 == 0 {
            println!("  registered {}/{total}", n + 1);
        }
    }
    for t in tasks {
        t.await??;
    }
    let reg_secs = t.elapsed().as_secs_f64();
    let (rss_loaded, _) = rss_mib(pid);
    println!(
        "registered {total} endpoints in {reg_secs:.2} s ({:.0}/s); RSS {rss_loaded:.1} MiB",
        total as f64 / reg_secs
    );

    // 2. Watchers.
    let (rx_tx, mut rx_rx) = mpsc::unbounded_channel::<(u64, Instant)>();
    let (ready_tx, mut ready_rx) = mpsc::unbounded_channel::<()>();
    let hot = svc(0);
    let others: Vec<String> = (1..args.services).map(svc).collect();
    let t = Instant::now();
    for w in 0..args.watchers {
        let mut names = vec![hot.clone()];
        let extra = (args.services_per_watcher.saturating_sub(1) as usize).min(others.len());
        names.extend(others.choose_multiple(&mut rand::rng(), extra).cloned());
        let ch = channel(&url).await?;
        let (rx_tx, ready_tx, hot) = (rx_tx.clone(), ready_tx.clone(), hot.clone());
        tokio::spawn(async move {
            let req = WatchRequest {
                services: names
                    .iter()
                    .map(|n| ServiceWatch {
                        name: n.clone(),
                        last_version: 0,
                    })
                    .collect(),
                node: format!("bench-{w}"),
                ..Default::default()
            };
            let Ok(resp) = DiscoveryClient::new(ch).watch(req).await else {
                return;
            };
            let mut stream = resp.into_inner();
            let mut snapshots = 0;
            while let Some(Ok(e)) = stream.next().await {
                let now = Instant::now();
                match e.kind {
                    Some(Kind::Snapshot(_)) => {
                        snapshots += 1;
                        if snapshots == names.len() {
                            let _ = ready_tx.send(());
                        }
                    }
                    Some(Kind::Delta(_)) if e.service == hot => {
                        let _ = rx_tx.send((e.version, now));
                    }
                    _ => {}
                }
            }
        });
        if (w + 1) % 200 == 0 {
            println!("  opened {}/{} watch streams", w + 1, args.watchers);
        }
    }
    for _ in 0..args.watchers {
        tokio::time::timeout(Duration::from_secs(60), ready_rx.recv())
            .await
            .context("watchers did not all get their snapshots")?;
    }
    let watch_secs = t.elapsed().as_secs_f64();
    let (rss_watching, _) = rss_mib(pid);
    println!(
        "{} watchers synced in {watch_secs:.2} s; RSS {rss_watching:.1} MiB",
        args.watchers
    );

    // 3. Changes at a fixed rate: add then remove an endpoint of the hot service.
    let mut reg = RegistryClient::new(channels[0].clone());
    let mut sent: HashMap<u64, Instant> = HashMap::new();
    let mut tick =
        tokio::time::interval(Duration::from_secs_f64(1.0 / f64::from(args.rate.max(1))));
    for k in 0..args.changes {
        tick.tick().await;
        let t0 = Instant::now();
        let version = if k % 2 == 0 {
            reg.register(RegisterRequest {
                instance: Some(instance(&hot, format!("hot-{k}"), 20_000 + k)),
                static_endpoint: true,
                ..Default::default()
            })
            .await?
            .into_inner()
            .version
        } else {
            reg.deregister(DeregisterRequest {
                target: Some(Target::Endpoint(EndpointAddress {
                    service: hot.clone(),
                    address: "10.1.0.1".into(),
                    port: 20_000 + k - 1,
                })),
            })
            .await?
            .into_inner()
            .version
        };
        sent.insert(version, t0);
        if (k + 1) % 50 == 0 {
            println!("  {}/{} changes", k + 1, args.changes);
        }
    }
    let expected = args.changes as usize * args.watchers as usize;
    let mut per_receipt = Vec::with_capacity(expected);
    let mut per_change: HashMap<u64, f64> = HashMap::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    while per_receipt.len() < expected {
        let left = deadline.saturating_duration_since(Instant::now());
        let Ok(Some((version, at))) = tokio::time::timeout(left, rx_rx.recv()).await else {
            break;
        };
        let Some(t0) = sent.get(&version) else {
            continue;
        };
        let ms = at.duration_since(*t0).as_secs_f64() * 1000.0;
        per_receipt.push(ms);
        let worst = per_change.entry(version).or_insert(0.0);
        *worst = worst.max(ms);
    }
    let (rss_end, rss_peak) = rss_mib(pid);
    let missing = expected - per_receipt.len();
    per_receipt.sort_by(f64::total_cmp);
    let mut all_watchers: Vec<f64> = per_change.values().copied().collect();
    all_watchers.sort_by(f64::total_cmp);

    // 4. Report.
    let date = machine::date();
    let machine = machine::describe();
    let svg_name = format!("push-{date}.svg");
    let md = format!(
        "# Control-plane push benchmark ({date})\n\n\
Machine: {machine}. wf-control (release build) and the load generator share the machine.\n\n\
Setup: {services} services × {endpoints} endpoints = {total} static endpoints; {watchers} watch streams, each on its own \
TCP connection, watching the hot service plus {others} random others; {changes} changes (add / remove an endpoint of the \
hot service) at {rate}/s. Latency is measured in the load generator from sending the change RPC to receiving the event, \
so it includes the RPC, the durable write to the store and the fan-out to every stream.\n\n\
| metric | value | target |\n|---|---|---|\n\
| change → receipt, p50 (each watcher) | {r50:.2} ms | |\n\
| change → receipt, p99 (each watcher) | {r99:.2} ms | |\n\
| change → receipt by **all** {watchers} watchers, p50 | {a50:.2} ms | |\n\
| change → receipt by **all** {watchers} watchers, p99 | {a99:.2} ms | ≤ 100 ms |\n\
| change → receipt by all, max | {amax:.2} ms | |\n\
| receipts missing | {missing} of {expected} | 0 |\n\
| registration of {total} endpoints | {reg_secs:.2} s ({reg_rate:.0}/s, 64 in flight) | |\n\
| {watchers} watchers opened and synced | {watch_secs:.2} s | |\n\
| wf-control RSS idle / loaded / with watchers / end | {rss_idle:.1} / {rss_loaded:.1} / {rss_watching:.1} / {rss_end:.1} MiB | ≤ 200 MB |\n\
| wf-control peak RSS | {rss_peak:.1} MiB | ≤ 200 MB |\n\n\
![latency CDF]({svg_name})\n\n\
Reproduce: `bash bench/push.sh` (or `cargo run --release -p wayfinder-bench --bin push-bench -- --help`).\n",
        services = args.services,
        endpoints = args.endpoints,
        watchers = args.watchers,
        others = args.services_per_watcher.saturating_sub(1),
        changes = args.changes,
        rate = args.rate,
        r50 = pct(&per_receipt, 0.5),
        r99 = pct(&per_receipt, 0.99),
        a50 = pct(&all_watchers, 0.5),
        a99 = pct(&all_watchers, 0.99),
        amax = pct(&all_watchers, 1.0),
        reg_rate = total as f64 / reg_secs,
    );
    std::fs::create_dir_all(&args.out_dir)?;
    let md_path = args.out_dir.join(format!("push-{date}.md"));
    std::fs::write(&md_path, &md)?;
    let plot = svg::cdf(
        &format!(
            "wf-control push: {} watchers, {total} endpoints",
            args.watchers
        ),
        &[
            svg::Curve {
                label: "each receipt",
                sorted_ms: &per_receipt,
                color: "#1f77b4",
            },
            svg::Curve {
                label: "all watchers received (per change)",
                sorted_ms: &all_watchers,
                color: "#d62728",
            },
        ],
    );
    std::fs::write(args.out_dir.join(&svg_name), plot)?;
    println!("\n{md}\nwritten to {}", md_path.display());
    if missing > 0 {
        bail!("{missing} receipts missing");
    }
    Ok(())
}
