//! mTLS cost between two sidecars: the same lab (client sidecar → web
//! sidecar → lab-app) run once in plaintext and once with identities, in
//! one run on one machine. Reports requests per second and latency at a
//! fixed concurrency, and full mTLS handshakes per second against a
//! sidecar's inbound side. Run it with `bench/mtls.sh`.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Result, bail};
use clap::Parser;
use wayfinder_bench::lab::{Procs, free_port, local, wait_for};
use wayfinder_bench::{machine, svg};
use wayfinder_proto::v1::{CertifyRequest, identity_client::IdentityClient};
use wayfinder_tests::load::{self, Report, Spec};

#[derive(Parser, Debug)]
#[command(about = "mTLS versus plaintext between two sidecars")]
struct Args {
    /// Directory of wf-control, wf-proxy and lab-app.
    #[arg(long, default_value = "target/release")]
    bin_dir: PathBuf,
    /// Requests per mode.
    #[arg(long, default_value_t = 50_000)]
    requests: usize,
    /// Concurrent keep-alive clients.
    #[arg(long, default_value_t = 16)]
    clients: usize,
    /// How long to measure handshakes.
    #[arg(long, default_value_t = 5)]
    handshake_secs: u64,
    /// Where the report goes.
    #[arg(long, default_value = "bench/results")]
    out_dir: PathBuf,
}

const TOKEN: &str = "bench-token-0123456789";

struct Lab {
    _procs: Procs,
    front: SocketAddr,
    inbound: SocketAddr,
    grpc: SocketAddr,
}

async fn lab(args: &Args, dir: &Path, mtls: bool) -> Result<Lab> {
    let mut procs = Procs::default();
    let s = |v: &str| v.to_string();
    let (grpc, http, app, inbound, admin, front, client_admin) = (
        free_port()?,
        free_port()?,
        free_port()?,
        free_port()?,
        free_port()?,
        free_port()?,
        free_port()?,
    );
    let mut cp = vec![
        s("--grpc"),
        local(grpc).to_string(),
        s("--http"),
        local(http).to_string(),
    ];
    cp.extend([
        s("--data-dir"),
        dir.join("data").to_string_lossy().to_string(),
        // The data path is what this measures, not the control plane.
        s("--insecure"),
    ]);
    let token: Vec<String> = if mtls {
        vec![s("--join-token"), s(TOKEN)]
    } else {
        vec![]
    };
    cp.extend(token.clone());
    procs.spawn(
        &args.bin_dir.join("wf-control"),
        &cp,
        &dir.join("control.log"),
    )?;
    wait_for(local(http), "/healthz", |st, _| st == 200).await?;
    procs.spawn(
        &args.bin_dir.join("lab-app"),
        &[
            s("--listen"),
            local(app).to_string(),
            s("--name"),
            s("web-1"),
        ],
        &dir.join("app.log"),
    )?;
    let url = format!("http://{}", local(grpc));
    let mut side = vec![
        s("--control-plane"),
        url.clone(),
        s("--service"),
        s("web"),
        s("--instance"),
        s("web-1"),
    ];
    side.extend([
        s("--app"),
        local(app).to_string(),
        s("--inbound"),
        local(inbound).to_string(),
    ]);
    side.extend([s("--admin"), local(admin).to_string()]);
    side.extend(token.clone());
    procs.spawn(&args.bin_dir.join("wf-proxy"), &side, &dir.join("web.log"))?;
    let mut client = vec![
        s("--control-plane"),
        url,
        s("--admin"),
        local(client_admin).to_string(),
    ];
    client.extend([s("--upstream"), format!("web={}", local(front))]);
    client.extend(token);
    procs.spawn(
        &args.bin_dir.join("wf-proxy"),
        &client,
        &dir.join("client.log"),
    )?;
    wait_for(local(client_admin), "/endpoints", |_, b| {
        b.contains("\"healthy\":true")
    })
    .await?;
    wait_for(local(front), "/", |st, _| st == 200).await?;
    Ok(Lab {
        _procs: procs,
        front: local(front),
        inbound: local(inbound),
        grpc: local(grpc),
    })
}

/// Full mTLS handshakes per second against `inbound`, one at a time per
/// worker, with a certificate the bench gets like a sidecar does.
async fn handshakes(lab: &Lab, workers: usize, secs: u64) -> Result<f64> {
    use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
    let key = rcgen::KeyPair::generate()?;
    let csr = rcgen::CertificateParams::default().serialize_request(&key)?;
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{}", lab.grpc))?
        .connect()
        .await?;
    let issued = IdentityClient::new(channel)
        .certify(CertifyRequest {
            token: TOKEN.into(),
            service: "bench".into(),
            csr_der: csr.der().to_vec(),
        })
        .await?
        .into_inner();
    let mut roots = rustls::RootCertStore::empty();
    for r in issued.trust_bundle {
        roots.add(CertificateDer::from(r))?;
    }
    let mut cfg = rustls::ClientConfig::builder_with_protocol_versions(&[&rustls::version::TLS13])
        .with_root_certificates(roots)
        .with_client_auth_cert(
            issued.chain.into_iter().map(CertificateDer::from).collect(),
            PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())),
        )?;
    cfg.alpn_protocols = vec![b"h2".to_vec()];
    // No resumption: every connection pays the full handshake.
    cfg.resumption = rustls::client::Resumption::disabled();
    let connector = tokio_rustls::TlsConnector::from(Arc::new(cfg));
    let name = rustls::pki_types::ServerName::try_from("web.svc.wayfinder.local")?;
    let until = Instant::now() + Duration::from_secs(secs);
    let mut tasks = Vec::new();
    for _ in 0..workers {
        let (connector, name, addr) = (connector.clone(), name.clone(), lab.inbound);
        tasks.push(tokio::spawn(async move {
            let mut n = 0u64;
            while Instant::now() < until {
                let Ok(tcp) = tokio::net::TcpStream::connect(addr).await else {
                    continue;
                };
                if connector.connect(name.clone(), tcp).await.is_ok() {
                    n += 1;
                }
            }
            n
        }));
    }
    let mut total = 0;
    for t in tasks {
        total += t.await?;
    }
    Ok(total as f64 / secs as f64)
}

#[tokio::main]
async fn main() -> Result<()> {
    let args = Args::parse();
    let _ = rustls::crypto::ring::default_provider().install_default();
    let work = tempfile::tempdir()?;
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    let mut rows = Vec::new();
    let mut curves = Vec::new();
    let mut handshake_rate = 0.0;
    for (label, mtls) in [("plaintext", false), ("mTLS", true)] {
        let dir = work.path().join(label);
        std::fs::create_dir_all(&dir)?;
        println!("== {label}: starting the lab");
        let lab = lab(&args, &dir, mtls).await?;
        // Warm the pooled connection and the EWMA first.
        let _ = load::run(
            Spec::get(lab.front, "web"),
            args.clients,
            2_000,
            Default::default(),
        )
        .await;
        println!(
            "   {} requests from {} clients",
            args.requests, args.clients
        );
        let started = Instant::now();
        let report: Report = load::run(
            Spec::get(lab.front, "web"),
            args.clients,
            args.requests,
            Default::default(),
        )
        .await;
        let took = started.elapsed();
        if !report.failed().is_empty() {
            bail!("{label}: {} requests failed", report.failed().len());
        }
        rows.push((
            label,
            report.samples.len() as f64 / took.as_secs_f64(),
            ms(report.quantile(0.5)),
            ms(report.quantile(0.99)),
        ));
        let mut l: Vec<f64> = report.samples.iter().map(|s| ms(s.latency)).collect();
        l.sort_by(f64::total_cmp);
        curves.push((label, l));
        if mtls {
            println!("   handshakes for {} s", args.handshake_secs);
            handshake_rate = handshakes(&lab, 4, args.handshake_secs).await?;
        }
    }
    let date = machine::date();
    let mut md = format!(
        "# mTLS between sidecars versus plaintext ({date})\n\nMachine: {}. Everything on loopback on this machine, load generator included.\n\n\
         Path: load generator → client sidecar → (HTTP/2, one pooled connection; plaintext or mTLS 1.3) → web sidecar → lab-app. \
         {} GETs from {} keep-alive clients per mode, after a warm-up.\n\n| mode | req/s | p50 ms | p99 ms |\n|---|---:|---:|---:|\n",
        machine::describe(),
        args.requests,
        args.clients
    );
    for (label, rps, p50, p99) in &rows {
        md += &format!("| {label} | {rps:.0} | {p50:.3} | {p99:.3} |\n");
    }
    if let [(_, rps0, p50_0, p99_0), (_, rps1, p50_1, p99_1)] = rows.as_slice() {
        md += &format!(
            "\nmTLS costs {:.1}% of the throughput and adds {:.3} ms at p50, {:.3} ms at p99.\n",
            100.0 * (1.0 - rps1 / rps0),
            p50_1 - p50_0,
            p99_1 - p99_0
        );
    }
    md += &format!(
        "\nFull mTLS handshakes (TLS 1.3, ECDSA P-256 certificates from the mesh CA, client certificate verified, no resumption) \
         against the web sidecar's inbound side, 4 connecting workers: **{handshake_rate:.0} handshakes/s**.\n\n![latency CDF](mtls-{date}.svg)\n"
    );
    let colors = ["#1f77b4", "#d62728"];
    let plot: Vec<_> = curves
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
        args.out_dir.join(format!("mtls-{date}.svg")),
        svg::cdf("Two sidecar hops: plaintext vs mTLS", &plot),
    )?;
    let path = args.out_dir.join(format!("mtls-{date}.md"));
    std::fs::write(&path, &md)?;
    println!("\n{md}\nwritten to {}", path.display());
    Ok(())
}
