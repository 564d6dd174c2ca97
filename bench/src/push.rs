//! Control-plane push benchmark: many endpoints, many watch streams, and the
//! time from a change to its receipt by every watcher.
//!
//! Runs two set-ups one after the other in the same run: one `wf-control`
//! with the embedded store, and two replicas over one etcd on loopback
//! (Debian's etcd-server; skipped with a note when absent). Each registers
//! `services × endpoints` static endpoints, opens `watchers` watch streams
//! (one TCP connection each, like sidecars; with replicas, half on each),
//! each on the hot service plus random others, then makes `changes` changes
//! to the hot service at a fixed rate (with replicas, alternately through
//! each, so half the changes cross from one replica to the other's
//! watchers). Writes a markdown report and an SVG CDF under `bench/results/`.

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
    /// Only the embedded store (no etcd replicas).
    #[arg(long)]
    embedded_only: bool,
}

struct ControlPlane {
    child: Child,
    grpc: String,
    _data: tempfile::TempDir,
}

impl Drop for ControlPlane {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start(bin: &PathBuf, store: &str) -> Result<ControlPlane> {
    let data = tempfile::tempdir()?;
    let mut child = Command::new(bin)
        .args([
            "--grpc",
            "127.0.0.1:0",
            "--http",
            "127.0.0.1:0",
            "--store",
            store,
            // Push cost over plaintext, as before the control plane
            // authenticated callers.
            "--insecure",
            "--data-dir",
        ])
        .arg(data.path())
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

/// What one set-up measured.
struct Outcome {
    name: String,
    per_receipt: Vec<f64>,
    all_watchers: Vec<f64>,
    missing: usize,
    expected: usize,
    reg_secs: f64,
    watch_secs: f64,
    /// RSS of the first wf-control: idle, loaded, with watchers, end, peak (MiB).
    rss: [f64; 5],
}

/// Registers, watches and changes against `cps` (one, or replicas of one store).
async fn scenario(name: &str, cps: &[ControlPlane], args: &Args) -> Result<Outcome> {
    println!("== {name}");
    let urls: Vec<String> = cps.iter().map(|c| format!("http://{}", c.grpc)).collect();
    let pid = cps[0].child.id();
    let (rss_idle, _) = rss_mib(pid);
    println!(
        "wf-control pid {pid} on {} ({rss_idle:.1} MiB idle)",
        cps[0].grpc
    );

    // 1. Registrations.
    let total = args.services * args.endpoints;
    let t = Instant::now();
    let channels: Vec<Channel> =
        futures::future::try_join_all((0..8).map(|i| channel(&urls[i % urls.len()]))).await?;
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
        let ch = channel(&urls[w as usize % urls.len()]).await?;
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
    // channels[i] goes to replica i % replicas: alternate between them.
    let mut regs: Vec<_> = channels[..urls.len()]
        .iter()
        .map(|c| RegistryClient::new(c.clone()))
        .collect();
    let mut sent: HashMap<u64, Instant> = HashMap::new();
    let mut tick =
        tokio::time::interval(Duration::from_secs_f64(1.0 / f64::from(args.rate.max(1))));
    for k in 0..args.changes {
        tick.tick().await;
        let t0 = Instant::now();
        let n = regs.len();
        let reg = &mut regs[(k as usize / 2) % n];
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
    println!(
        "{name}: all {} watchers p50 {:.2} ms, p99 {:.2} ms; {missing} missing",
        args.watchers,
        pct(&all_watchers, 0.5),
        pct(&all_watchers, 0.99)
    );
    Ok(Outcome {
        name: name.to_string(),
        per_receipt,
        all_watchers,
        missing,
        expected,
        reg_secs,
        watch_secs,
        rss: [rss_idle, rss_loaded, rss_watching, rss_end, rss_peak],
    })
}

#[tokio::main]
async fn main() -> Result<()> {
    let args = Args::parse();
    let mut outcomes = Vec::new();
    {
        let cp = start(&args.wf_control, "embedded")?;
        outcomes.push(scenario("embedded store, 1 wf-control", &[cp], &args).await?);
    }
    let mut skipped = String::new();
    if args.embedded_only {
        skipped = "The etcd set-up was not run (`--embedded-only`).".into();
    } else if let Some(why) = wayfinder_tests::etcd::unavailable() {
        println!("skipping the etcd replicas: {why}");
        skipped = format!("The etcd set-up was skipped: {why}.");
    } else {
        let etcd = wayfinder_tests::etcd::Etcd::single()?;
        let cps = [
            start(&args.wf_control, &etcd.spec())?,
            start(&args.wf_control, &etcd.spec())?,
        ];
        outcomes.push(scenario("etcd store, 2 replicas", &cps, &args).await?);
    }
    report(&args, &outcomes, &skipped)
}

fn report(args: &Args, outcomes: &[Outcome], skipped: &str) -> Result<()> {
    let total = args.services * args.endpoints;
    let mut rows = String::new();
    let mut line = |label: &str, f: &dyn Fn(&Outcome) -> String, target: &str| {
        rows.push_str(&format!("| {label} |"));
        for o in outcomes {
            rows.push_str(&format!(" {} |", f(o)));
        }
        rows.push_str(&format!(" {target} |\n"));
    };
    let w = args.watchers;
    line(
        "change → receipt, p50 (each watcher)",
        &|o| format!("{:.2} ms", pct(&o.per_receipt, 0.5)),
        "",
    );
    line(
        "change → receipt, p99 (each watcher)",
        &|o| format!("{:.2} ms", pct(&o.per_receipt, 0.99)),
        "",
    );
    line(
        &format!("change → receipt by **all** {w} watchers, p50"),
        &|o| format!("{:.2} ms", pct(&o.all_watchers, 0.5)),
        "",
    );
    line(
        &format!("change → receipt by **all** {w} watchers, p99"),
        &|o| format!("{:.2} ms", pct(&o.all_watchers, 0.99)),
        "≤ 100 ms",
    );
    line(
        "change → receipt by all, max",
        &|o| format!("{:.2} ms", pct(&o.all_watchers, 1.0)),
        "",
    );
    line(
        "receipts missing",
        &|o| format!("{} of {}", o.missing, o.expected),
        "0",
    );
    line(
        &format!("registration of {total} endpoints (64 in flight)"),
        &|o| {
            format!(
                "{:.2} s ({:.0}/s)",
                o.reg_secs,
                f64::from(total) / o.reg_secs
            )
        },
        "",
    );
    line(
        &format!("{w} watchers opened and synced"),
        &|o| format!("{:.2} s", o.watch_secs),
        "",
    );
    line(
        "RSS of (the first) wf-control: idle / loaded / with watchers / end",
        &|o| {
            format!(
                "{:.1} / {:.1} / {:.1} / {:.1} MiB",
                o.rss[0], o.rss[1], o.rss[2], o.rss[3]
            )
        },
        "≤ 200 MB",
    );
    line("peak RSS", &|o| format!("{:.1} MiB", o.rss[4]), "≤ 200 MB");
    let header: String = outcomes.iter().map(|o| format!(" {} |", o.name)).collect();
    let rule: String = outcomes.iter().map(|_| "---|").collect();
    let date = machine::date();
    let machine = machine::describe();
    let svg_name = format!("push-{date}.svg");
    let md = format!(
        "# Control-plane push benchmark ({date})\n\n\
Machine: {machine}. wf-control (release build), etcd and the load generator share the machine.\n\n\
Setup: {services} services × {endpoints} endpoints = {total} static endpoints; {w} watch streams, each on its own \
TCP connection, watching the hot service plus {others} random others; {changes} changes (add / remove an endpoint of the \
hot service) at {rate}/s. Latency is measured in the load generator from sending the change RPC to receiving the event, \
so it includes the RPC, the durable write to the store and the fan-out to every stream.\n\n\
With etcd: two wf-control replicas over one etcd member on loopback (Debian's etcd-server); half of the watch \
streams on each replica, changes alternately through each, so every change reaches its own replica's watchers \
through etcd's watch and the other replica's the same way. A write is answered once it came back through the \
watch. {skipped}\n\n\
| metric |{header} target |\n|---|{rule}---|\n{rows}\n\
![latency CDF]({svg_name})\n\n\
Reproduce: `bash bench/push.sh` (or `cargo run --release -p wayfinder-bench --bin push-bench -- --help`).\n",
        services = args.services,
        endpoints = args.endpoints,
        others = args.services_per_watcher.saturating_sub(1),
        changes = args.changes,
        rate = args.rate,
    );
    std::fs::create_dir_all(&args.out_dir)?;
    let md_path = args.out_dir.join(format!("push-{date}.md"));
    std::fs::write(&md_path, &md)?;
    let colors = [("#1f77b4", "#aec7e8"), ("#d62728", "#ff9896")];
    let labels: Vec<(String, String)> = outcomes
        .iter()
        .map(|o| {
            (
                format!("{}: all watchers", o.name),
                format!("{}: each receipt", o.name),
            )
        })
        .collect();
    let mut curves = Vec::new();
    for ((o, (all, each)), (c_all, c_each)) in outcomes.iter().zip(&labels).zip(colors) {
        curves.push(svg::Curve {
            label: all,
            sorted_ms: &o.all_watchers,
            color: c_all,
        });
        curves.push(svg::Curve {
            label: each,
            sorted_ms: &o.per_receipt,
            color: c_each,
        });
    }
    let plot = svg::cdf(
        &format!(
            "wf-control push: {} watchers, {total} endpoints",
            args.watchers
        ),
        &curves,
    );
    std::fs::write(args.out_dir.join(&svg_name), plot)?;
    println!("\n{md}\nwritten to {}", md_path.display());
    let missing: usize = outcomes.iter().map(|o| o.missing).sum();
    if missing > 0 {
        bail!("{missing} receipts missing");
    }
    Ok(())
}
