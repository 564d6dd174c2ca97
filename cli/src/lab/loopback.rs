//! The comparison's lab on loopback, no Docker needed: lab-app instances
//! of `web` on their own loopback addresses (127.0.0.11-13, one port, as
//! containers on a bridge), each with its sidecar; a DNS server answering
//! like Docker's (records go with their instance, TTL 600 s); nginx with a
//! static upstream when installed (else a TCP round robin, labelled as
//! such); the client's sidecar and wf-control. Every part is a real process
//! on real sockets; events are signals and lab-app's fault controls.

use std::io::{BufRead, BufReader};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant, SystemTime};

use anyhow::{Context, Result, bail};

use super::compare::{self, Config, Lab, Samples};
use super::dns::DnsServer;
use super::load::{self, Aim, Way};
use super::scenario::{Action, Event};

/// Child processes by key, killed on drop.
#[derive(Default)]
struct Procs(Vec<(String, Child)>);

impl Procs {
    /// Starts `bin` with `env` (secrets stay off command lines) and waits
    /// for `ready` on its stderr; returns that line.
    fn start(
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
        // Waiting blocks this thread: let the load's tasks run elsewhere.
        tokio::task::block_in_place(|| rx.recv_timeout(Duration::from_secs(15)))
            .with_context(|| format!("{} did not start ({key})", bin.display()))
    }

    /// Sends `signal` to every process under `key`.
    fn signal(&mut self, key: &str, signal: &str) {
        for (k, c) in &mut self.0 {
            if k == key {
                let _ = Command::new("kill")
                    .args([&format!("-{signal}"), &c.id().to_string()])
                    .status();
            }
        }
    }

    /// Kills (SIGKILL: a container dies) and forgets every process under `key`.
    fn kill(&mut self, key: &str) {
        self.0.retain_mut(|(k, c)| {
            if k != key {
                return true;
            }
            let _ = c.kill();
            let _ = c.wait();
            false
        });
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

/// Instance `n`'s address in its `generation`: restarts move it, as a
/// recreated container gets a new IP.
fn address(n: u8, generation: u8) -> Ipv4Addr {
    Ipv4Addr::new(127, 0, generation, 10 + n)
}

/// `web4` → 4.
fn number(name: &str) -> Option<u8> {
    name.strip_prefix("web")?
        .parse()
        .ok()
        .filter(|n| (1..=200).contains(n))
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

/// The mesh's control plane in its default, secure mode: TLS, a join token
/// per service, the operator credential for the comparison's checks.
struct Control {
    args: Vec<String>,
    url: String,
    data: PathBuf,
    web_token: String,
    client_token: String,
}

/// The loopback lab.
pub struct Loopback {
    cfg: Config,
    port: u16,
    procs: Procs,
    dns: DnsServer,
    control: Control,
    /// Each instance's current address generation.
    generations: std::collections::BTreeMap<u8, u8>,
    front_nginx: Option<SocketAddr>,
    front_mesh: SocketAddr,
    nginx_label: &'static str,
    _tmp: tempfile::TempDir,
    fallback: Option<tokio::task::JoinHandle<()>>,
}

impl Drop for Loopback {
    fn drop(&mut self) {
        // A dropped JoinHandle leaves its task running.
        if let Some(task) = &self.fallback {
            task.abort();
        }
    }
}

impl Loopback {
    /// Starts the lab: control plane, web1..3 with their sidecars, DNS,
    /// nginx (or the fallback) and the client's sidecar.
    pub async fn start(cfg: &Config) -> Result<Self> {
        for bin in ["wf-control", "wf-proxy", "lab-app"] {
            let p = cfg.bin_dir.join(bin);
            if !p.exists() {
                bail!(
                    "{} is missing: build the workspace (cargo build --release --workspace --bins) or pass --bin-dir",
                    p.display()
                );
            }
        }
        let tmp = tempfile::tempdir()?;
        let mut procs = Procs::default();
        let data = tmp.path().join("control");
        let (web_token, client_token) = (
            crate::inject::secrets::fresh(),
            crate::inject::secrets::fresh(),
        );
        let tokens = tmp.path().join("join-tokens");
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
        // Fixed ports, so the control plane comes back where sidecars look.
        let (grpc, http) = (super::free_port()?, super::free_port()?);
        let args: Vec<String> = vec![
            "--grpc".into(),
            format!("127.0.0.1:{grpc}"),
            "--http".into(),
            format!("127.0.0.1:{http}"),
            "--data-dir".into(),
            data.to_string_lossy().into(),
            "--join-token-file".into(),
            tokens.to_string_lossy().into(),
        ];
        procs.start(
            "control",
            &cfg.bin_dir.join("wf-control"),
            &args,
            &[],
            "wf-control serving",
        )?;
        let control = Control {
            args,
            url: format!("https://127.0.0.1:{grpc}"),
            data,
            web_token,
            client_token,
        };
        let dns = DnsServer::start("127.0.0.1:0".parse()?, 600).await?;
        let mut lab = Self {
            cfg: cfg.clone(),
            port: common_port()?,
            procs,
            dns,
            control,
            generations: Default::default(),
            front_nginx: None,
            front_mesh: "127.0.0.1:0".parse()?,
            nginx_label: "",
            _tmp: tmp,
            fallback: None,
        };
        for n in 1..=3 {
            lab.start_instance(n).await?;
        }
        let (mut args, token) = lab.sidecar_args("client");
        args.extend([
            "--admin".into(),
            "127.0.0.1:0".into(),
            "--upstream".into(),
            "web=127.0.0.1:0".into(),
        ]);
        let line = lab.procs.start(
            "client",
            &cfg.bin_dir.join("wf-proxy"),
            &args,
            &[("WAYFINDER_JOIN_TOKEN", &token)],
            "wf-proxy listening",
        )?;
        lab.front_mesh = field(&line, "upstreams=web=")
            .context("client sidecar address")?
            .parse()?;
        if cfg.ways.contains(&Way::Nginx) {
            lab.front_nginx = Some(lab.start_balancer().await?);
        }
        lab.wait_serving(3).await?;
        if cfg.ways.contains(&Way::MeshHedging) {
            super::hedging::apply(&lab.admin().await?, "web").await?;
        }
        Ok(lab)
    }

    /// The Admin API with the operator's credential.
    async fn admin(&self) -> Result<crate::traffic::Admin> {
        let ch = crate::connect::channel(
            &self.control.url,
            &self.control.data.join("operator"),
            Duration::from_secs(5),
        )
        .await?;
        Ok(crate::traffic::Admin::new(ch, Duration::from_secs(5)))
    }

    /// Flags and token of a sidecar of `service`.
    fn sidecar_args(&self, service: &str) -> (Vec<String>, String) {
        let args = vec![
            "--control-plane".into(),
            self.control.url.clone(),
            "--ca-bundle".into(),
            self.control
                .data
                .join("ca/bundle.crt")
                .to_string_lossy()
                .into(),
        ];
        let token = if service == "web" {
            &self.control.web_token
        } else {
            &self.control.client_token
        };
        (args, token.clone())
    }

    fn key(n: u8) -> String {
        format!("web{n}")
    }

    /// Starts web`n` (app and sidecar) at its current address and publishes
    /// its record.
    async fn start_instance(&mut self, n: u8) -> Result<()> {
        let generation = *self.generations.entry(n).or_insert(0);
        let ip = address(n, generation);
        let name = Self::key(n);
        let app = SocketAddr::new(IpAddr::V4(ip), self.port);
        self.procs.start(
            &name,
            &self.cfg.bin_dir.join("lab-app"),
            &[
                "--listen".into(),
                app.to_string(),
                "--name".into(),
                name.clone(),
            ],
            &[],
            "listening on",
        )?;
        wait_port(app).await?;
        let (mut args, token) = self.sidecar_args("web");
        args.extend([
            "--service".into(),
            "web".into(),
            "--instance".into(),
            name.clone(),
            "--app".into(),
            app.to_string(),
            "--inbound".into(),
            format!("{ip}:0"),
            "--admin".into(),
            "127.0.0.1:0".into(),
            "--health-check".into(),
            "/healthz".into(),
            "--health-interval".into(),
            "500ms".into(),
        ]);
        self.procs.start(
            &name,
            &self.cfg.bin_dir.join("wf-proxy"),
            &args,
            &[("WAYFINDER_JOIN_TOKEN", &token)],
            "registered with the control plane",
        )?;
        self.set_record(n, Some(ip));
        Ok(())
    }

    /// Replaces web`n`'s record (`None`: it goes, as Docker drops a dead
    /// container's).
    fn set_record(&self, n: u8, ip: Option<Ipv4Addr>) {
        if let Ok(mut t) = self.dns.records.lock() {
            let ips = t.entry("web".into()).or_default();
            ips.retain(|a| a.octets()[3] != 10 + n);
            if let Some(ip) = ip {
                ips.push(ip);
            }
        }
    }

    fn app(&self, n: u8) -> SocketAddr {
        let generation = self.generations.get(&n).copied().unwrap_or(0);
        SocketAddr::new(IpAddr::V4(address(n, generation)), self.port)
    }

    /// nginx with a static upstream block over web1..3, or the fallback.
    async fn start_balancer(&mut self) -> Result<SocketAddr> {
        let listen = SocketAddr::from(([127, 0, 0, 1], super::free_port()?));
        let servers: Vec<SocketAddr> = (1..=3).map(|n| self.app(n)).collect();
        match self.cfg.nginx.clone() {
            Some(nginx) => {
                let dir = self._tmp.path().join("nginx");
                std::fs::create_dir_all(&dir)?;
                let conf = dir.join("nginx.conf");
                std::fs::write(&conf, nginx_conf(&dir, listen, &servers))?;
                let child = Command::new(&nginx)
                    .args(["-e", "stderr", "-p"])
                    .arg(&dir)
                    .arg("-c")
                    .arg(&conf)
                    .stdin(Stdio::null())
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .spawn()
                    .with_context(|| format!("starting {}", nginx.display()))?;
                self.procs.0.push(("nginx".into(), child));
                wait_port(listen).await.context("nginx did not start")?;
                self.nginx_label = "nginx with a static upstream block (its defaults: passive checks, 60 s timeouts)";
            }
            None => {
                let l = tokio::net::TcpListener::bind(listen).await?;
                self.fallback = Some(tokio::spawn(round_robin(l, servers)));
                self.nginx_label = "nginx is not installed: the nginx row is a plain TCP round robin over web1..3 (no checks, no retries)";
            }
        }
        Ok(listen)
    }

    /// Waits until the control plane has `want` serving instances of `web`.
    async fn wait_serving(&self, want: usize) -> Result<()> {
        use wayfinder_proto::v1::{Health, ListEndpointsRequest, admin_client::AdminClient};
        let deadline = Instant::now() + Duration::from_secs(15);
        let ch = crate::connect::channel(
            &self.control.url,
            &self.control.data.join("operator"),
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

    /// Where each way sends.
    fn aims(&self) -> Vec<(Way, Aim)> {
        self.cfg
            .ways
            .iter()
            .filter_map(|&w| {
                let aim = match w {
                    Way::Nginx => Aim::Front(self.front_nginx?),
                    Way::Mesh | Way::MeshHedging => Aim::Front(self.front_mesh),
                    _ => Aim::Dns {
                        resolver: self.dns.addr,
                        name: "web".into(),
                        port: self.port,
                    },
                };
                Some((w, aim))
            })
            .collect()
    }

    async fn fault(&self, n: u8, query: &str) -> Result<()> {
        let status = super::http_post(self.app(n), &format!("/fault?{query}")).await?;
        if status != 200 {
            bail!("lab-app answered {status} to /fault?{query}");
        }
        Ok(())
    }
}

impl Loopback {
    /// `web`'s fault set or cleared through the control plane, as `wfctl
    /// fault` does.
    async fn mesh_fault(&self, event: &Event) -> Result<()> {
        use crate::traffic::fault;
        let admin = self.admin().await?;
        match &event.action {
            Action::Fault(f) => {
                let spec = fault::Spec {
                    instance: (!event.target.is_empty()).then(|| event.target.clone()),
                    path_prefix: None,
                    headers: Vec::new(),
                    effect: f.effect,
                    percent: f.percent,
                    lasts: None,
                };
                fault::inject(&admin, "web", &spec).await?;
            }
            _ => {
                fault::clear(&admin, "web").await?;
            }
        }
        Ok(())
    }
}

impl Lab for Loopback {
    async fn act(&mut self, event: &Event) -> Result<()> {
        let n = match event.action.has_target() {
            true => number(&event.target).with_context(|| {
                format!("{}: loopback instances are web1..web200", event.target)
            })?,
            false => 0,
        };
        let key = Self::key(n);
        match &event.action {
            Action::Kill => {
                self.procs.kill(&key);
                self.set_record(n, None);
            }
            // Frozen, as `docker pause` freezes: sockets open, the kernel
            // still accepting, nothing answering; its record stays.
            Action::Pause => self.procs.signal(&key, "STOP"),
            Action::Resume => {
                self.procs.signal(&key, "CONT");
                self.fault(n, "delay_ms=0&healthy=true").await?;
            }
            Action::Restart => {
                self.procs.kill(&key);
                self.set_record(n, None);
                let g = self.generations.entry(n).or_insert(0);
                *g = g.wrapping_add(1).max(1);
                self.start_instance(n).await?;
            }
            Action::Slow(d) => {
                self.fault(n, &format!("delay_ms={}", d.as_millis()))
                    .await?
            }
            Action::Unhealthy => self.fault(n, "healthy=false").await?,
            Action::Add => self.start_instance(n).await?,
            Action::ControlDown => self.procs.kill("control"),
            Action::ControlUp => {
                let args = self.control.args.clone();
                self.procs.start(
                    "control",
                    &self.cfg.bin_dir.join("wf-control"),
                    &args,
                    &[],
                    "wf-control serving",
                )?;
            }
            Action::Fault(_) | Action::FaultClear => self.mesh_fault(event).await?,
        }
        Ok(())
    }
}

/// A port free on every address a run may use.
fn common_port() -> Result<u16> {
    'probe: for _ in 0..50 {
        let probe = std::net::TcpListener::bind((address(1, 0), 0))?;
        let port = probe.local_addr()?.port();
        drop(probe);
        for generation in 0..4 {
            for n in 1..=6 {
                if std::net::TcpListener::bind((address(n, generation), port)).is_err() {
                    continue 'probe;
                }
            }
        }
        return Ok(port);
    }
    bail!("no port free on the lab's loopback addresses")
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

/// Runs the scenario on loopback and writes the report; returns its path.
pub async fn run(cfg: &Config) -> Result<PathBuf> {
    let have: Vec<String> = (1..=3).map(Loopback::key).collect();
    compare::check_targets(&cfg.scenario, &have)?;
    for e in &cfg.scenario.events {
        if !e.target.is_empty() && number(&e.target).is_none() {
            return Err(cfg
                .scenario
                .error_at(
                    e,
                    "target",
                    format!("{:?}: loopback instances are web1..web200", e.target),
                )
                .into());
        }
    }
    eprintln!(
        "== loopback lab: wf-control, web1..3 with sidecars, DNS, nginx, the client's sidecar"
    );
    let mut lab = Loopback::start(cfg).await?;
    let plan = load::Plan {
        rate: cfg.scenario.rate,
        duration: cfg.scenario.duration,
        timeout: cfg.scenario.timeout,
        start: SystemTime::now() + Duration::from_secs(3),
        host: "web".into(),
    };
    let samples = Samples::default();
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let sink = samples.clone();
    let collector = tokio::spawn(async move {
        while let Some(s) = rx.recv().await {
            sink.push(s);
        }
    });
    let start = plan.start_instant();
    let load = tokio::spawn(load::run(lab.aims(), plan, tx));
    compare::announce_load(cfg, "");
    let fired = compare::drive(&mut lab, cfg, start, &samples).await;
    let cold = load.await.context("the load failed")??;
    let _ = collector.await;
    let run = compare::finish(cfg, &samples, fired);
    let mut notes = vec![format!(
        "Three lab-app instances of `web` on 127.0.0.11-13 (one port each, as containers on a \
         bridge), a DNS server answering like Docker's (a dead instance's record goes, TTL \
         600 s), a sidecar beside each instance and the client. The DNS ways call the instances \
         directly; nginx row: {}. Pause is SIGSTOP of an instance and its sidecar; restart \
         brings it back on a new address; slow and unhealthy are lab-app's fault controls.",
        lab.nginx_label
    )];
    if cfg.ways.contains(&Way::MeshHedging) {
        notes.push(super::hedging::note("web"));
    }
    if !cold.is_empty() {
        notes.push(format!(
            "These ways got no answer while warming up: {}.",
            cold.iter().map(|w| w.key()).collect::<Vec<_>>().join(", ")
        ));
    }
    drop(lab);
    let setting = super::report::Setting {
        place: "on loopback (every process on this machine)".into(),
        scenario: &cfg.scenario,
        notes,
    };
    super::report::write(&cfg.out, &setting, &run)
}
