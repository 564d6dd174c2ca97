//! `wfctl lab compare`: one workload, four ways to find `web`.
//!
//! Three lab-app instances of `web` on their own loopback addresses
//! (127.0.0.11-13, one port, as containers on a bridge) take N requests at
//! concurrency C. At 40% of the requests web-2 dies, at 55% web-1 vanishes
//! (its packets are dropped both ways and its processes stopped, as when a
//! container's network namespace goes: no FIN, no RST, no heartbeat; needs
//! root and iptables, else skipped),
//! at 70% web-3 turns slow, at 85% web-4 starts. The same schedule runs
//! against:
//!
//! - DNS, resolved once and cached (what many HTTP clients do), round robin
//!   over the cached answer;
//! - DNS, resolved before every request (first record of a rotating answer);
//! - a plain balancer in front: nginx with a static upstream block when it
//!   is installed, else a TCP round robin labelled as such;
//! - the mesh: a sidecar per instance, a client sidecar, wf-control.
//!
//! The lab's DNS server answers like Docker's: a dead instance's record goes
//! away, a new one's appears. Every part is a real process on real sockets.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper_util::client::legacy::{Client, connect::HttpConnector};
use hyper_util::rt::TokioExecutor;

use super::dns::DnsServer;

/// What to run.
#[derive(Debug, Clone)]
pub struct Config {
    /// Requests per way.
    pub requests: usize,
    /// Requests in flight.
    pub concurrency: usize,
    /// How slow web-3 turns at 70%.
    pub slow: Duration,
    /// Where the report goes.
    pub out: PathBuf,
    /// Where wf-control, wf-proxy and lab-app are.
    pub bin_dir: PathBuf,
    /// nginx, when installed.
    pub nginx: Option<PathBuf>,
}

/// Share of the requests after which each event happens.
const KILL_AT: f64 = 0.40;
const VANISH_AT: f64 = 0.55;
const SLOW_AT: f64 = 0.70;
const ADD_AT: f64 = 0.85;
/// A request that takes longer has failed.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(2);

/// One way of reaching `web`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Way {
    /// Resolve once, round robin over the cached records.
    DnsOnce,
    /// Resolve before every request.
    DnsPerRequest,
    /// nginx (or the fallback TCP balancer) in front.
    Balancer,
    /// Wayfinder sidecars.
    Mesh,
}

impl Way {
    const ALL: [Way; 4] = [Way::DnsOnce, Way::DnsPerRequest, Way::Balancer, Way::Mesh];

    fn color(self) -> &'static str {
        match self {
            Way::DnsOnce => "#d62728",
            Way::DnsPerRequest => "#ff7f0e",
            Way::Balancer => "#1f77b4",
            Way::Mesh => "#2ca02c",
        }
    }
}

/// One request's fate.
#[derive(Debug, Clone)]
struct Sample {
    /// Order in which it was issued.
    index: usize,
    /// Seconds since the run began, when it was sent.
    at: f64,
    ms: f64,
    ok: bool,
    instance: Option<String>,
}

/// What one way did.
#[derive(Debug)]
pub struct Outcome {
    /// Row label.
    pub label: String,
    way: Way,
    samples: Vec<Sample>,
    killed_at: f64,
    /// When web-1 vanished; NaN when that event was skipped.
    vanished_at: f64,
    added_at: f64,
    seconds: f64,
}

/// The numbers of one row of the report.
#[derive(Debug, Clone)]
pub struct Row {
    /// Way.
    pub label: String,
    /// Requests sent.
    pub requests: usize,
    /// Requests that failed (error, non-200, or over the timeout).
    pub failed: usize,
    /// Latency quantiles (ms).
    pub p50: f64,
    /// 90th percentile (ms).
    pub p90: f64,
    /// 99th percentile (ms).
    pub p99: f64,
    /// Answers per instance.
    pub per_instance: BTreeMap<String, usize>,
    /// From web-2's death to the end of the last request that failed
    /// before the next event (ms); `None`: still failing then.
    pub reroute_ms: Option<f64>,
    /// The same for web-1 vanishing; `None` inside: still failing at the
    /// end; `None` outside: the event was skipped.
    pub vanish_ms: Option<Option<f64>>,
    /// From web-4's start to its first answer (ms); `None`: never.
    pub new_instance_ms: Option<f64>,
}

impl Outcome {
    /// The report row.
    pub fn row(&self) -> Row {
        let mut ms: Vec<f64> = self.samples.iter().map(|s| s.ms).collect();
        ms.sort_by(f64::total_cmp);
        let q = |p: f64| {
            if ms.is_empty() {
                0.0
            } else {
                ms[((ms.len() - 1) as f64 * p).round() as usize]
            }
        };
        let mut per_instance = BTreeMap::new();
        for s in &self.samples {
            if let (true, Some(i)) = (s.ok, &s.instance) {
                *per_instance.entry(i.clone()).or_insert(0) += 1;
            }
        }
        let vanished = !self.vanished_at.is_nan();
        let kill_window_end = if vanished {
            self.vanished_at
        } else {
            self.seconds
        };
        let reroute_ms = self.recovery(self.killed_at, kill_window_end);
        let vanish_ms = vanished.then(|| self.recovery(self.vanished_at, self.seconds));
        let new_instance_ms = self
            .samples
            .iter()
            .filter(|s| s.ok && s.instance.as_deref() == Some("web-4"))
            .map(|s| s.at + s.ms / 1000.0)
            .fold(None, |m: Option<f64>, t| Some(m.map_or(t, |m| m.min(t))))
            .map(|t| ((t - self.added_at) * 1000.0).max(0.0));
        Row {
            label: self.label.clone(),
            requests: self.samples.len(),
            failed: self.samples.iter().filter(|s| !s.ok).count(),
            p50: q(0.5),
            p90: q(0.9),
            p99: q(0.99),
            per_instance,
            reroute_ms,
            vanish_ms,
            new_instance_ms,
        }
    }

    /// From `from` to the end of the last failed request that ended before
    /// `to` (ms): 0 when none failed, `None` when a request sent in the last
    /// tenth of the window still failed. Requests count for the window they
    /// ended in, so one sent before an event that fails because of it
    /// counts for that event.
    fn recovery(&self, from: f64, to: f64) -> Option<f64> {
        let end = |s: &Sample| s.at + s.ms / 1000.0;
        let failed: Vec<&Sample> = self
            .samples
            .iter()
            .filter(|s| !s.ok && end(s) >= from && end(s) < to)
            .collect();
        if failed.iter().any(|s| s.at >= to - (to - from) * 0.1) {
            return None;
        }
        Some(
            failed
                .iter()
                .map(|s| (end(s) - from) * 1000.0)
                .fold(0.0, f64::max),
        )
    }
}

/// An address turned into a black hole on loopback: every packet to or
/// from it is dropped, so its open connections hang without a FIN or RST
/// and new ones go unanswered, as when a container's network namespace
/// vanishes. The rules go when this does.
struct Blackhole(Ipv4Addr);

/// Why web-1 cannot vanish on this machine (iptables needs root), if it
/// cannot.
pub fn vanish_unavailable() -> Option<String> {
    Blackhole::unavailable()
}

impl Blackhole {
    /// Why this machine cannot make one (iptables needs root), if it cannot.
    fn unavailable() -> Option<String> {
        let ok = Command::new("iptables")
            .args(["-w", "-S", "OUTPUT"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        (!ok).then(|| "needs root and iptables".to_string())
    }

    /// Inserts (`-I`) or deletes (`-D`) the rule dropping packets to
    /// (`-d`) or from (`-s`) `ip`; whether iptables did it.
    fn rule(op: &str, dir: &str, ip: Ipv4Addr) -> bool {
        Command::new("iptables")
            .args(["-w", op, "OUTPUT", dir, &format!("{ip}/32"), "-j", "DROP"])
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    }

    fn start(ip: Ipv4Addr) -> Result<Self> {
        Self::sweep(ip);
        // Made before the rules: a half-made hole is swept on drop.
        let hole = Self(ip);
        for dir in ["-d", "-s"] {
            if !Self::rule("-I", dir, ip) {
                bail!("iptables refused to drop {dir} {ip}");
            }
        }
        Ok(hole)
    }

    /// Removes every rule dropping `ip`: this run's, and those a comparison
    /// that was killed left behind (they drop a lab address only, and would
    /// break the next run).
    fn sweep(ip: Ipv4Addr) {
        for dir in ["-d", "-s"] {
            for _ in 0..16 {
                if !Self::rule("-D", dir, ip) {
                    break;
                }
            }
        }
    }
}

impl Drop for Blackhole {
    fn drop(&mut self) {
        Self::sweep(self.0);
    }
}

/// Child processes of one way, killed on drop.
#[derive(Default)]
struct Procs(Vec<(String, Child)>);

impl Procs {
    /// Starts `bin` and waits for `ready` on its stderr; returns that line.
    fn start(&mut self, key: &str, bin: &Path, args: &[String], ready: &str) -> Result<String> {
        self.start_with(key, bin, args, &[], ready)
    }

    /// [`Procs::start`] with more environment (secrets stay off command lines).
    fn start_with(
        &mut self,
        key: &str,
        bin: &Path,
        args: &[String],
        env: &[(&str, &str)],
        ready: &str,
    ) -> Result<String> {
        let mut child = Command::new(bin)
            .args(args)
            .envs(env.iter().copied())
            .env("WAYFINDER_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("starting {}", bin.display()))?;
        let stderr = child.stderr.take().context("stderr")?;
        let (tx, rx) = std::sync::mpsc::channel();
        let marker = ready.to_string();
        std::thread::spawn(move || {
            let mut tx = Some(tx);
            // Keep draining so the child never blocks on a full pipe.
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if line.contains(&marker)
                    && let Some(tx) = tx.take()
                {
                    let _ = tx.send(line);
                }
            }
        });
        self.0.push((key.to_string(), child));
        rx.recv_timeout(Duration::from_secs(15))
            .with_context(|| format!("{} did not start ({key})", bin.display()))
    }

    /// Stops every process started under `key` (SIGSTOP): no heartbeat, no
    /// health report, no FIN or RST from them. They are killed with the rest.
    fn freeze(&mut self, key: &str) {
        for (k, c) in &mut self.0 {
            if k == key {
                let _ = Command::new("kill")
                    .args(["-STOP", &c.id().to_string()])
                    .status();
            }
        }
    }

    /// Kills every process started under `key` (SIGKILL: a container dies).
    fn kill(&mut self, key: &str) {
        for (k, c) in &mut self.0 {
            if k == key {
                let _ = c.kill();
                let _ = c.wait();
            }
        }
    }
}

impl Drop for Procs {
    fn drop(&mut self) {
        for (_, c) in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// A field `key=VALUE` of a start-up line.
fn field<'a>(line: &'a str, key: &str) -> Option<&'a str> {
    let rest = &line[line.find(key)? + key.len()..];
    Some(rest.split([' ', ',']).next().unwrap_or(rest))
}

fn backend_ip(i: u8) -> Ipv4Addr {
    Ipv4Addr::new(127, 0, 0, 10 + i)
}

/// A port free on every backend address.
fn common_port() -> Result<u16> {
    for _ in 0..50 {
        let probe = std::net::TcpListener::bind((backend_ip(1), 0))?;
        let port = probe.local_addr()?.port();
        drop(probe);
        if (2..=4).all(|i| std::net::TcpListener::bind((backend_ip(i), port)).is_ok()) {
            return Ok(port);
        }
    }
    bail!("no port free on 127.0.0.11-14")
}

async fn wait_port(addr: SocketAddr) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(10);
    while tokio::net::TcpStream::connect(addr).await.is_err() {
        if Instant::now() > deadline {
            bail!("{addr} did not open");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(())
}

type HttpClient = Client<HttpConnector, Empty<Bytes>>;

/// GET `http://addr/` with `Host: web`: (ok, instance).
async fn get(client: &HttpClient, addr: SocketAddr) -> (bool, Option<String>) {
    let Ok(req) = hyper::Request::get(format!("http://{addr}/"))
        .header(hyper::header::HOST, "web")
        .body(Empty::new())
    else {
        return (false, None);
    };
    let call = async {
        let resp = client.request(req).await.ok()?;
        let ok = resp.status() == hyper::StatusCode::OK;
        let body = resp.into_body().collect().await.ok()?.to_bytes();
        let v: serde_json::Value = serde_json::from_slice(&body).ok()?;
        Some((ok, v["instance"].as_str().map(str::to_string)))
    };
    match tokio::time::timeout(REQUEST_TIMEOUT, call).await {
        Ok(Some(r)) => r,
        _ => (false, None),
    }
}

/// The lab of one way: backends, DNS, and whatever sits in front.
struct Lab {
    cfg: Config,
    port: u16,
    procs: Procs,
    dns: DnsServer,
    /// The mesh's control plane.
    control: Option<Control>,
    /// Where the client sends (balancer, mesh).
    front: Option<SocketAddr>,
    tmp: tempfile::TempDir,
    fallback: Option<tokio::task::JoinHandle<()>>,
    /// web-1's address as a black hole, once it vanished.
    vanished: Option<Blackhole>,
}

/// The mesh way's control plane, in its default, secure mode: TLS, a join
/// token per service, the operator credential for the comparison's checks.
struct Control {
    /// `https://` URL of its gRPC port.
    url: String,
    /// Its data directory (`ca/bundle.crt`, `operator/`).
    data: PathBuf,
    web_token: String,
    client_token: String,
}

impl Control {
    /// What a sidecar of `service` needs: flags, and its token for the environment.
    fn sidecar(&self, service: &str) -> (Vec<String>, &str) {
        let args = vec![
            "--control-plane".into(),
            self.url.clone(),
            "--ca-bundle".into(),
            self.data.join("ca/bundle.crt").to_string_lossy().into(),
        ];
        let token = if service == "web" {
            &self.web_token
        } else {
            &self.client_token
        };
        (args, token)
    }
}

/// A random join token.
fn token() -> String {
    use rand::Rng;
    let bytes: [u8; 16] = rand::rng().random();
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

impl Drop for Lab {
    fn drop(&mut self) {
        // A dropped JoinHandle leaves its task running: stop the fallback
        // balancer with its lab, so its port and sockets go too.
        if let Some(task) = &self.fallback {
            task.abort();
        }
    }
}

impl Lab {
    async fn start(cfg: &Config, way: Way) -> Result<Self> {
        let port = common_port()?;
        let tmp = tempfile::tempdir()?;
        // Docker answers with a TTL of 600 s; the clients here decide how
        // long they keep an answer (once, or not at all).
        let dns = DnsServer::start("127.0.0.1:0".parse()?, 600).await?;
        let mut lab = Self {
            cfg: cfg.clone(),
            port,
            procs: Procs::default(),
            dns,
            control: None,
            front: None,
            tmp,
            fallback: None,
            vanished: None,
        };
        if way == Way::Mesh {
            let data = lab.tmp.path().join("control");
            let (web_token, client_token) = (token(), token());
            let tokens = lab.tmp.path().join("join-tokens");
            {
                use std::io::Write;
                use std::os::unix::fs::OpenOptionsExt;
                let mut f = std::fs::OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .mode(0o600)
                    .open(&tokens)?;
                writeln!(f, "{web_token}:web\n{client_token}:client")?;
            }
            let line = lab.procs.start(
                "control",
                &cfg.bin_dir.join("wf-control"),
                &[
                    "--grpc".into(),
                    "127.0.0.1:0".into(),
                    "--http".into(),
                    "127.0.0.1:0".into(),
                    "--data-dir".into(),
                    data.to_string_lossy().into(),
                    "--join-token-file".into(),
                    tokens.to_string_lossy().into(),
                ],
                "wf-control serving",
            )?;
            let grpc = field(&line, "grpc=").context("wf-control's gRPC address")?;
            lab.control = Some(Control {
                url: format!("https://{grpc}"),
                data,
                web_token,
                client_token,
            });
        }
        for i in 1..=3 {
            lab.add_backend(i).await?;
        }
        match way {
            Way::Mesh => {
                let control = lab.control.as_ref().context("control plane")?;
                let (mut args, token) = control.sidecar("client");
                let token = token.to_string();
                args.extend([
                    "--admin".into(),
                    "127.0.0.1:0".into(),
                    "--upstream".into(),
                    "web=127.0.0.1:0".into(),
                ]);
                let line = lab.procs.start_with(
                    "client",
                    &cfg.bin_dir.join("wf-proxy"),
                    &args,
                    &[("WAYFINDER_JOIN_TOKEN", &token)],
                    "wf-proxy listening",
                )?;
                let addr = field(&line, "upstreams=web=").context("client sidecar address")?;
                lab.front = Some(addr.parse()?);
            }
            Way::Balancer => lab.front = Some(lab.start_balancer().await?),
            Way::DnsOnce | Way::DnsPerRequest => {}
        }
        Ok(lab)
    }

    /// Starts web-`i` (with its sidecar in the mesh) and publishes its record.
    async fn add_backend(&mut self, i: u8) -> Result<()> {
        let name = format!("web-{i}");
        let app = SocketAddr::new(IpAddr::V4(backend_ip(i)), self.port);
        self.procs.start(
            &name,
            &self.cfg.bin_dir.join("lab-app"),
            &[
                "--listen".into(),
                app.to_string(),
                "--name".into(),
                name.clone(),
            ],
            "listening on",
        )?;
        wait_port(app).await?;
        if let Some(control) = &self.control {
            let (mut args, token) = control.sidecar("web");
            let token = token.to_string();
            args.extend([
                "--service".into(),
                "web".into(),
                "--instance".into(),
                name.clone(),
                "--app".into(),
                app.to_string(),
                "--inbound".into(),
                format!("{}:0", backend_ip(i)),
                "--admin".into(),
                "127.0.0.1:0".into(),
                "--health-check".into(),
                "/healthz".into(),
                "--health-interval".into(),
                "500ms".into(),
            ]);
            self.procs.start_with(
                &name,
                &self.cfg.bin_dir.join("wf-proxy"),
                &args,
                &[("WAYFINDER_JOIN_TOKEN", &token)],
                "registered with the control plane",
            )?;
        }
        self.set_record(i, true);
        Ok(())
    }

    fn set_record(&self, i: u8, present: bool) {
        if let Ok(mut t) = self.dns.records.lock() {
            let ips = t.entry("web".into()).or_default();
            ips.retain(|ip| *ip != backend_ip(i));
            if present {
                ips.push(backend_ip(i));
            }
        }
    }

    /// nginx with a static upstream block over web-1..3, or the fallback.
    async fn start_balancer(&mut self) -> Result<SocketAddr> {
        let listen = SocketAddr::from(([127, 0, 0, 1], super::free_port()?));
        let servers: Vec<SocketAddr> = (1..=3)
            .map(|i| SocketAddr::new(IpAddr::V4(backend_ip(i)), self.port))
            .collect();
        match &self.cfg.nginx {
            Some(nginx) => {
                let dir = self.tmp.path();
                let conf = dir.join("nginx.conf");
                std::fs::write(&conf, nginx_conf(dir, listen, &servers))?;
                let mut child = Command::new(nginx)
                    .args(["-e", "stderr", "-p"])
                    .arg(dir)
                    .arg("-c")
                    .arg(&conf)
                    .stdin(Stdio::null())
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .spawn()
                    .with_context(|| format!("starting {}", nginx.display()))?;
                if let Err(e) = wait_port(listen).await {
                    let _ = child.kill();
                    return Err(e.context("nginx did not start"));
                }
                self.procs.0.push(("nginx".into(), child));
            }
            None => {
                let l = tokio::net::TcpListener::bind(listen).await?;
                self.fallback = Some(tokio::spawn(round_robin(l, servers)));
            }
        }
        Ok(listen)
    }
}

/// Where request `i` goes: the cached answer in turn, a fresh lookup, or
/// the balancer's / client sidecar's address.
async fn target(
    way: Way,
    i: usize,
    cached: &[Ipv4Addr],
    resolver: &Resolver,
    port: u16,
    front: Option<SocketAddr>,
) -> Option<SocketAddr> {
    match way {
        Way::DnsOnce => {
            let ip = cached.get(i % cached.len().max(1))?;
            Some(SocketAddr::new(IpAddr::V4(*ip), port))
        }
        Way::DnsPerRequest => {
            let ip = resolver.lookup_ip("web.").await.ok()?.iter().next()?;
            Some(SocketAddr::new(ip, port))
        }
        Way::Balancer | Way::Mesh => front,
    }
}

/// Waits until the control plane has `want` serving instances of `web`.
async fn wait_serving(control: &Control, want: usize, deadline: Instant) -> Result<()> {
    use wayfinder_proto::v1::{Health, ListEndpointsRequest, admin_client::AdminClient};
    let ch = crate::connect::channel(
        &control.url,
        &control.data.join("operator"),
        Duration::from_secs(5),
    )
    .await?;
    loop {
        let serving = AdminClient::new(ch.clone())
            .list_endpoints(ListEndpointsRequest {
                service: "web".into(),
            })
            .await
            .map(|r| {
                r.into_inner()
                    .endpoints
                    .iter()
                    .filter(|e| e.health == Health::Serving as i32)
                    .count()
            })
            .unwrap_or(0);
        if serving >= want {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("web has {serving} serving instances, not {want}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

type Resolver = hickory_resolver::TokioResolver;

/// A resolver asking only `server`, caching nothing (as getaddrinfo does).
fn resolver(server: SocketAddr) -> Result<Resolver> {
    wayfinder_proto::dial::build_resolver(Some(server), |o| o.cache_size = 0)
        .map_err(|e| anyhow::anyhow!("DNS resolver: {e}"))
}

/// nginx as a lab would set it up: a static upstream, keep-alive to the
/// backends, and its defaults otherwise: passive health checks (max_fails=1,
/// 10 s), retry on connection errors (`proxy_next_upstream error timeout`),
/// 60 s to connect and to read (so an address that stops answering holds
/// its requests that long).
fn nginx_conf(dir: &Path, listen: SocketAddr, servers: &[SocketAddr]) -> String {
    let d = dir.display();
    let upstream: String = servers
        .iter()
        .map(|s| format!("    server {s};\n"))
        .collect();
    format!(
        "worker_processes 1;\ndaemon off;\npid {d}/nginx.pid;\nerror_log {d}/error.log;\n\
         events {{ worker_connections 4096; }}\n\
         http {{\n  access_log off;\n  client_body_temp_path {d}/body;\n  proxy_temp_path {d}/proxy;\n\
         fastcgi_temp_path {d}/fastcgi;\n  uwsgi_temp_path {d}/uwsgi;\n  scgi_temp_path {d}/scgi;\n\
         upstream web {{\n{upstream}    keepalive 64;\n  }}\n\
         server {{\n    listen {listen};\n    location / {{\n      proxy_pass http://web;\n\
         proxy_http_version 1.1;\n      proxy_set_header Connection \"\";\n    }}\n  }}\n}}\n"
    )
}

/// The fallback balancer: per-connection round robin over a fixed list, no
/// health checks and no retries, like a plain L4 balancer.
async fn round_robin(l: tokio::net::TcpListener, servers: Vec<SocketAddr>) {
    let next = AtomicUsize::new(0);
    while let Ok((mut client, _)) = l.accept().await {
        let server = servers[next.fetch_add(1, Ordering::Relaxed) % servers.len()];
        tokio::spawn(async move {
            if let Ok(mut s) = tokio::net::TcpStream::connect(server).await {
                let _ = tokio::io::copy_bidirectional(&mut client, &mut s).await;
            }
        });
    }
}

fn label(way: Way, nginx: bool) -> &'static str {
    match way {
        Way::DnsOnce => "DNS, resolved once",
        Way::DnsPerRequest => "DNS, resolved per request",
        Way::Balancer if nginx => "nginx upstream (static)",
        Way::Balancer => "TCP round robin (nginx not installed)",
        Way::Mesh => "Wayfinder mesh",
    }
}

/// Runs the workload against one way, printing progress.
async fn run_way(cfg: &Config, way: Way) -> Result<Outcome> {
    let name = label(way, cfg.nginx.is_some());
    eprintln!("== {name}: starting web-1..3");
    let lab = Lab::start(cfg, way).await?;
    let resolver = resolver(lab.dns.addr)?;
    let cached: Vec<Ipv4Addr> = resolver
        .lookup_ip("web.")
        .await
        .map(|a| {
            a.iter()
                .filter_map(|ip| match ip {
                    IpAddr::V4(v4) => Some(v4),
                    IpAddr::V6(_) => None,
                })
                .collect()
        })
        .unwrap_or_default();
    let client: HttpClient = Client::builder(TokioExecutor::new()).build_http();

    // Warm-up: every way starts with all three instances answering. An L4
    // balancer pins each kept-alive connection to one, and the mesh's
    // latency-aware balancer may favour two: there, the control plane
    // serving all three and any answer will do.
    let deadline = Instant::now() + Duration::from_secs(15);
    let want = match way {
        Way::Balancer if cfg.nginx.is_none() => 1,
        Way::Mesh => {
            wait_serving(lab.control.as_ref().context("control plane")?, 3, deadline).await?;
            1
        }
        _ => 3,
    };
    let mut seen = std::collections::BTreeSet::new();
    let mut i = 0;
    while seen.len() < want {
        if Instant::now() > deadline {
            bail!("{name}: only {seen:?} answered during warm-up");
        }
        if let Some(t) = target(way, i, &cached, &resolver, lab.port, lab.front).await
            && let (true, Some(inst)) = get(&client, t).await
        {
            seen.insert(inst);
        }
        i += 1;
    }

    let total = cfg.requests;
    let next = Arc::new(AtomicUsize::new(0));
    let done = Arc::new(AtomicUsize::new(0));
    let samples = Arc::new(Mutex::new(Vec::with_capacity(total)));
    let start = Instant::now();
    let lab = Arc::new(tokio::sync::Mutex::new(lab));
    let (cached, resolver) = (Arc::new(cached), Arc::new(resolver));
    let mut workers = Vec::new();
    // The front address and port never change during a run.
    let (front, port) = {
        let l = lab.lock().await;
        (l.front, l.port)
    };
    for _ in 0..cfg.concurrency {
        let (next, done, samples, client, cached, resolver) = (
            next.clone(),
            done.clone(),
            samples.clone(),
            client.clone(),
            cached.clone(),
            resolver.clone(),
        );
        workers.push(tokio::spawn(async move {
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= total {
                    break;
                }
                let sent = Instant::now();
                let (ok, instance) = match target(way, i, &cached, &resolver, port, front).await {
                    Some(t) => get(&client, t).await,
                    None => (false, None),
                };
                let s = Sample {
                    index: i,
                    at: sent.duration_since(start).as_secs_f64(),
                    ms: sent.elapsed().as_secs_f64() * 1000.0,
                    ok,
                    instance,
                };
                if let Ok(mut v) = samples.lock() {
                    v.push(s);
                }
                done.fetch_add(1, Ordering::Relaxed);
            }
        }));
    }

    // The schedule, driven by completed requests.
    let (mut killed_at, mut added_at) = (f64::NAN, f64::NAN);
    let mut vanished_at = f64::NAN;
    let can_vanish = Blackhole::unavailable();
    let mut vanish_done = false;
    let mut slowed = false;
    let mut shown = 0;
    loop {
        let d = done.load(Ordering::Relaxed);
        let share = d as f64 / total as f64;
        let now = start.elapsed().as_secs_f64();
        if killed_at.is_nan() && share >= KILL_AT {
            let mut l = lab.lock().await;
            l.procs.kill("web-2");
            l.set_record(2, false);
            killed_at = now;
            eprintln!("   {name}: {:>3.0}%  web-2 killed", share * 100.0);
        }
        if !vanish_done && share >= VANISH_AT {
            vanish_done = true;
            match &can_vanish {
                None => {
                    let mut l = lab.lock().await;
                    l.vanished = Some(Blackhole::start(backend_ip(1))?);
                    // Its processes go silent too: a sidecar there would
                    // otherwise keep heartbeating over 127.0.0.1.
                    l.procs.freeze("web-1");
                    l.set_record(1, false);
                    vanished_at = now;
                    eprintln!(
                        "   {name}: {:>3.0}%  web-1 vanished (its packets dropped)",
                        share * 100.0
                    );
                }
                Some(why) => eprintln!(
                    "   {name}: {:>3.0}%  web-1 vanishing skipped: {why}",
                    share * 100.0
                ),
            }
        }
        if !slowed && share >= SLOW_AT {
            let app = SocketAddr::new(IpAddr::V4(backend_ip(3)), port);
            let ms = cfg.slow.as_millis();
            let _ = super::http_post(app, &format!("/fault?delay_ms={ms}")).await;
            slowed = true;
            eprintln!(
                "   {name}: {:>3.0}%  web-3 slowed by {ms} ms",
                share * 100.0
            );
        }
        if added_at.is_nan() && share >= ADD_AT {
            added_at = now;
            lab.lock().await.add_backend(4).await?;
            eprintln!("   {name}: {:>3.0}%  web-4 started", share * 100.0);
        }
        if d * 10 / total > shown {
            shown = d * 10 / total;
            eprintln!(
                "   {name}: {:>3}%  {d}/{total} requests, {now:.1} s",
                shown * 10
            );
        }
        if d >= total {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    for w in workers {
        let _ = w.await;
    }
    let seconds = start.elapsed().as_secs_f64();
    let mut samples = samples.lock().map(|v| v.clone()).unwrap_or_default();
    samples.sort_by_key(|s| s.index);
    Ok(Outcome {
        label: name.to_string(),
        way,
        samples,
        killed_at,
        vanished_at,
        added_at,
        seconds,
    })
}

/// Runs every way in turn and writes the report; returns the rows.
pub async fn run(cfg: &Config) -> Result<Vec<Row>> {
    std::fs::create_dir_all(&cfg.out).with_context(|| format!("creating {}", cfg.out.display()))?;
    for bin in ["wf-control", "wf-proxy", "lab-app"] {
        let p = cfg.bin_dir.join(bin);
        if !p.exists() {
            bail!(
                "{} is missing: build the workspace (cargo build --release --workspace --bins) or pass --bin-dir",
                p.display()
            );
        }
    }
    if Blackhole::unavailable().is_none() {
        Blackhole::sweep(backend_ip(1));
    }
    let mut outcomes = Vec::new();
    for way in Way::ALL {
        outcomes.push(run_way(cfg, way).await?);
    }
    let report = super::report::write(cfg, &outcomes)?;
    eprintln!("== report: {}", report.display());
    Ok(outcomes.iter().map(Outcome::row).collect())
}

/// Failed requests per 2% of the run, for the plot.
pub(super) fn failures_by_progress(o: &Outcome) -> Vec<(f64, f64)> {
    let buckets = 50;
    let n = o.samples.len().max(1);
    let mut counts = vec![0usize; buckets];
    for s in &o.samples {
        if !s.ok {
            counts[(s.index * buckets / n).min(buckets - 1)] += 1;
        }
    }
    counts
        .iter()
        .enumerate()
        .map(|(i, &c)| ((i as f64 + 0.5) * 100.0 / buckets as f64, c as f64))
        .collect()
}

/// Sorted latencies (ms), for the plot.
pub(super) fn sorted_ms(o: &Outcome) -> Vec<f64> {
    let mut v: Vec<f64> = o.samples.iter().map(|s| s.ms).collect();
    v.sort_by(f64::total_cmp);
    v
}

/// The plot colour of an outcome.
pub(super) fn color(o: &Outcome) -> &'static str {
    o.way.color()
}

/// Event positions (percent of requests) for plot markers; web-1's
/// vanishing where it happened.
pub(super) fn events(outcomes: &[Outcome]) -> Vec<(f64, &'static str)> {
    let mut e = vec![(KILL_AT * 100.0, "web-2 killed")];
    if outcomes.iter().any(|o| !o.vanished_at.is_nan()) {
        e.push((VANISH_AT * 100.0, "web-1 vanished"));
    }
    e.extend([
        (SLOW_AT * 100.0, "web-3 slow"),
        (ADD_AT * 100.0, "web-4 added"),
    ]);
    e
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(index: usize, at: f64, ok: bool, instance: &str) -> Sample {
        Sample {
            index,
            at,
            ms: 1.0,
            ok,
            instance: Some(instance.into()),
        }
    }

    #[test]
    fn rows_measure_recovery_and_pickup() {
        let o = Outcome {
            label: "t".into(),
            way: Way::Mesh,
            samples: vec![
                sample(0, 0.0, true, "web-1"),
                sample(1, 4.0, false, "web-2"),
                sample(2, 4.5, false, "web-2"),
                sample(3, 8.6, true, "web-4"),
                sample(4, 9.0, true, "web-1"),
            ],
            killed_at: 4.0,
            vanished_at: f64::NAN,
            added_at: 8.5,
            seconds: 10.0,
        };
        let r = o.row();
        assert_eq!(r.vanish_ms, None, "skipped");
        assert_eq!((r.requests, r.failed), (5, 2));
        let reroute = r.reroute_ms.expect("recovered");
        assert!((reroute - 501.0).abs() < 1e-6, "{reroute}");
        let pickup = r.new_instance_ms.expect("picked up");
        assert!((pickup - 101.0).abs() < 1e-6, "{pickup}");
        assert_eq!(r.per_instance.get("web-1"), Some(&2));
        assert_eq!(r.per_instance.get("web-2"), None);
    }

    #[test]
    fn failing_to_the_end_is_never_recovered() {
        let o = Outcome {
            label: "t".into(),
            way: Way::DnsOnce,
            samples: vec![
                sample(0, 4.0, false, "web-2"),
                sample(1, 9.5, false, "web-2"),
            ],
            killed_at: 4.0,
            vanished_at: f64::NAN,
            added_at: 8.5,
            seconds: 10.0,
        };
        let r = o.row();
        assert_eq!(r.reroute_ms, None);
        assert_eq!(r.new_instance_ms, None);
    }

    #[test]
    fn each_event_is_measured_in_its_own_window() {
        let o = Outcome {
            label: "t".into(),
            way: Way::Mesh,
            samples: vec![
                sample(0, 0.0, true, "web-1"),
                sample(1, 4.2, false, "web-2"),
                sample(2, 5.0, true, "web-3"),
                sample(3, 5.5, false, "web-1"),
                sample(4, 6.0, false, "web-1"),
                sample(5, 9.9, true, "web-3"),
            ],
            killed_at: 4.0,
            vanished_at: 5.5,
            added_at: 8.5,
            seconds: 10.0,
        };
        let r = o.row();
        let kill = r.reroute_ms.expect("recovered before web-1 vanished");
        assert!((kill - 201.0).abs() < 1e-6, "{kill}");
        let vanish = r.vanish_ms.expect("happened").expect("recovered");
        assert!((vanish - 501.0).abs() < 1e-6, "{vanish}");
    }
}
