//! The soak's processes on loopback, each known by its role: etcd members
//! and wf-control replicas over them (or one wf-control on its embedded
//! store), three `web` instances (lab-app and its sidecar), two `echo`
//! sidecars in front of echo servers this program runs, and the client
//! sidecar every call goes through. Any process can be killed and started
//! again with the same command line, ports and data, as chaos needs; the
//! sampler and the log watcher find the current one by its role.
//!
//! The control plane runs as it does by default: gRPC over TLS, callers
//! authenticated. Every sidecar gets a workload certificate with the run's
//! join token and speaks mTLS to the others.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use wayfinder_bench::lab::{free_port, local, wait_for};
use wayfinder_tests::{Process, http_get};

use crate::lock;

/// Instances of `web`.
const WEB: usize = 3;
/// wf-control replicas over etcd.
const REPLICAS: usize = 2;
/// etcd members.
const MEMBERS: usize = 3;

/// A process as the sampler and the log watcher see it.
#[derive(Clone, Default)]
pub struct Live {
    /// Its pid while it runs.
    pub pid: Option<u32>,
    /// What the current incarnation logged.
    pub log: Option<Arc<Mutex<String>>>,
    /// How many times it was started.
    pub starts: u32,
}

/// Every process by role.
#[derive(Clone, Default)]
pub struct Roles(Arc<Mutex<BTreeMap<String, Live>>>);

impl Roles {
    fn started(&self, role: &str, p: &Process) {
        let mut m = lock(&self.0);
        let live = m.entry(role.to_string()).or_default();
        live.pid = p.pid();
        live.log = Some(p.log.clone());
        live.starts += 1;
    }

    fn stopped(&self, role: &str) {
        if let Some(live) = lock(&self.0).get_mut(role) {
            live.pid = None;
        }
    }

    /// Every role as it is now.
    pub fn snapshot(&self) -> Vec<(String, Live)> {
        lock(&self.0)
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect()
    }
}

/// One process the soak stops and starts again with the same command line.
struct Role {
    name: String,
    program: PathBuf,
    args: Vec<String>,
    env: Vec<(&'static str, String)>,
    /// The log line that says it is up.
    ready: &'static str,
    proc: Option<Process>,
    /// What its earlier incarnations logged.
    earlier: String,
}

impl Role {
    fn new(name: &str, program: PathBuf, args: Vec<String>, ready: &'static str) -> Self {
        Self {
            name: name.to_string(),
            program,
            args,
            env: Vec::new(),
            ready,
            proc: None,
            earlier: String::new(),
        }
    }

    fn env(mut self, key: &'static str, value: &str) -> Self {
        self.env.push((key, value.to_string()));
        self
    }

    /// Starts it and waits (15 s at most) for its ready line. It logs at
    /// `info` (the journal reads renewals and lost leases there), or as
    /// this program's `WAYFINDER_LOG` says, e.g. `info,wayfinder_proxy=debug`.
    fn start(&mut self, roles: &Roles) -> Result<()> {
        let log = std::env::var("WAYFINDER_LOG").unwrap_or_else(|_| "info".into());
        let mut cmd = Command::new(&self.program);
        cmd.args(&self.args).env("WAYFINDER_LOG", log);
        // A process group of its own: Ctrl-C at the terminal stops the soak
        // (which then reports and kills everything), not the lab under it.
        cmd.process_group(0);
        for (k, v) in &self.env {
            cmd.env(k, v);
        }
        let p = tokio::task::block_in_place(|| Process::spawn(cmd, &self.name, self.ready))
            .with_context(|| format!("starting {}", self.name))?;
        roles.started(&self.name, &p);
        self.proc = Some(p);
        Ok(())
    }

    /// Kills it at once (SIGKILL), keeping what it logged.
    fn kill(&mut self, roles: &Roles) {
        if let Some(mut p) = self.proc.take() {
            p.kill();
            self.earlier += &p.log_text();
            self.earlier += "==== killed by the soak ====\n";
        }
        roles.stopped(&self.name);
    }

    fn running(&self) -> bool {
        self.proc.is_some()
    }

    /// Waits (10 s at most) until the current incarnation logged `needle`.
    async fn await_log(&self, needle: &str) -> Result<()> {
        let p = self.proc.as_ref().context("not running")?;
        p.await_log(needle)
            .await
            .with_context(|| format!("{} did not log {needle:?}", self.name))?;
        Ok(())
    }

    fn log_text(&self) -> String {
        let now = self
            .proc
            .as_ref()
            .map(Process::log_text)
            .unwrap_or_default();
        format!("{}{now}", self.earlier)
    }
}

/// A wf-control replica and where it listens.
struct Replica {
    role: Role,
    grpc: SocketAddr,
    http: SocketAddr,
    data: PathBuf,
}

/// A `web` instance: lab-app and its sidecar.
struct Instance {
    name: String,
    app: Role,
    sidecar: Role,
}

/// What the lab is started with.
pub struct Setup<'a> {
    /// Directory of the binaries.
    pub bin_dir: &'a Path,
    /// Data directories and policy files go here.
    pub work: &'a Path,
    /// Three etcd members and two replicas, or one wf-control alone.
    pub etcd: bool,
    /// Workload certificate lifetime.
    pub cert_lifetime: Duration,
    /// The echo servers, one `echo` instance each.
    pub echo_apps: &'a [SocketAddr],
    /// The policy applied before any instance starts.
    pub policy: &'a str,
}

/// The running lab.
pub struct Mesh {
    /// Every process by role.
    pub roles: Roles,
    etcd: Vec<Role>,
    replicas: Vec<Replica>,
    web: Vec<Instance>,
    echo: Vec<Role>,
    client: Role,
    /// The client sidecar's listener for `web` (HTTP/1.1, HTTP/2, gRPC).
    pub web_addr: SocketAddr,
    /// The client sidecar's listener for `echo` (opaque TCP).
    pub echo_addr: SocketAddr,
    wfctl: PathBuf,
    work: PathBuf,
    cert_lifetime: Duration,
}

impl Mesh {
    /// Starts everything and waits until every instance is serving.
    pub async fn start(s: &Setup<'_>) -> Result<Mesh> {
        let roles = Roles::default();
        let token = join_token();
        let ca = s.work.join("ca");
        let mut etcd = if s.etcd {
            etcd_members(s.work)?
        } else {
            Vec::new()
        };
        for m in &mut etcd {
            m.start(&roles)?;
        }
        for m in &etcd {
            m.await_log("serving client traffic").await?;
        }
        let mut replicas = control_planes(s, &etcd, &ca, &token)?;
        for r in &mut replicas {
            r.role.start(&roles)?;
        }
        let urls: Vec<String> = replicas
            .iter()
            .map(|r| format!("https://{}", r.grpc))
            .collect();
        let sidecar = Sidecar {
            bin: s.bin_dir.join("wf-proxy"),
            control_plane: urls.join(","),
            bundle: ca.join("bundle.crt"),
            token,
        };
        let (web_addr, echo_addr) = (local(free_port()?), local(free_port()?));
        let mut mesh = Mesh {
            roles,
            etcd,
            replicas,
            web: Vec::new(),
            echo: Vec::new(),
            client: sidecar.client(web_addr, echo_addr)?,
            web_addr,
            echo_addr,
            wfctl: s.bin_dir.join("wfctl"),
            work: s.work.to_path_buf(),
            cert_lifetime: s.cert_lifetime,
        };
        mesh.apply_policy("baseline", s.policy)?;
        for i in 1..=WEB {
            let name = format!("web-{i}");
            let app = local(free_port()?);
            let mut instance = Instance {
                app: Role::new(
                    &format!("{name}.lab-app"),
                    s.bin_dir.join("lab-app"),
                    strings(&["--listen", &app.to_string(), "--name", &name]),
                    "listening on",
                ),
                sidecar: sidecar.instance("web", &name, app, "/healthz")?,
                name,
            };
            instance.app.start(&mesh.roles)?;
            instance.sidecar.start(&mesh.roles)?;
            mesh.web.push(instance);
        }
        for (i, app) in s.echo_apps.iter().enumerate() {
            let mut role = sidecar.instance("echo", &format!("echo-{}", i + 1), *app, "tcp")?;
            role.start(&mesh.roles)?;
            mesh.echo.push(role);
        }
        mesh.client.start(&mesh.roles)?;
        mesh.wait_registered(Duration::from_secs(30)).await?;
        Ok(mesh)
    }

    /// Waits until a call of each protocol family goes through.
    pub async fn ready_for_traffic(&self) -> Result<()> {
        wait_for(self.web_addr, "/", |s, _| s == 200).await?;
        let deadline = Instant::now() + Duration::from_secs(20);
        while let Err(e) = echo_once(self.echo_addr).await {
            if Instant::now() > deadline {
                bail!("no TCP echo through the client sidecar: {e:#}");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        Ok(())
    }

    /// One line about what runs.
    pub fn describe(&self) -> String {
        let store = if self.etcd.is_empty() {
            "one wf-control on its embedded store".to_string()
        } else {
            format!(
                "{} wf-control replicas over {} etcd members",
                self.replicas.len(),
                self.etcd.len()
            )
        };
        format!(
            "{store} (TLS, callers authenticated); {} web instances (lab-app + sidecar), {} echo \
             instances (TCP echo + sidecar), one client sidecar; mTLS between sidecars, workload \
             certificates living {} s",
            self.web.len(),
            self.echo.len(),
            self.cert_lifetime.as_secs()
        )
    }

    /// `web` instances.
    pub fn instances(&self) -> usize {
        self.web.len()
    }

    /// The name of `web` instance `i`.
    pub fn instance(&self, i: usize) -> &str {
        &self.web[i].name
    }

    /// Kills `web` instance `i`, app and sidecar, as when its container dies.
    pub fn kill_instance(&mut self, i: usize) {
        let w = &mut self.web[i];
        w.sidecar.kill(&self.roles);
        w.app.kill(&self.roles);
    }

    /// Starts `web` instance `i` again and waits until its sidecar registered.
    pub async fn start_instance(&mut self, i: usize) -> Result<()> {
        let w = &mut self.web[i];
        w.app.start(&self.roles)?;
        w.sidecar.start(&self.roles)?;
        w.sidecar
            .await_log("registered with the control plane")
            .await
    }

    /// wf-control replicas.
    pub fn replicas(&self) -> usize {
        self.replicas.len()
    }

    /// The role name of replica `i`.
    pub fn replica(&self, i: usize) -> &str {
        &self.replicas[i].role.name
    }

    /// Kills replica `i` (SIGKILL).
    pub fn kill_replica(&mut self, i: usize) {
        self.replicas[i].role.kill(&self.roles);
    }

    /// Starts replica `i` again on its ports, data and store.
    pub fn start_replica(&mut self, i: usize) -> Result<()> {
        self.replicas[i].role.start(&self.roles)
    }

    /// etcd members (none on the embedded store).
    pub fn members(&self) -> usize {
        self.etcd.len()
    }

    /// The role name of etcd member `i`.
    pub fn member(&self, i: usize) -> &str {
        &self.etcd[i].name
    }

    /// Stops etcd member `i` (SIGKILL).
    pub fn stop_member(&mut self, i: usize) {
        self.etcd[i].kill(&self.roles);
    }

    /// Starts etcd member `i` again on its data and waits until it serves clients.
    pub async fn start_member(&mut self, i: usize) -> Result<()> {
        self.etcd[i].start(&self.roles)?;
        self.etcd[i].await_log("serving client traffic").await
    }

    /// Applies `toml` with `wfctl policy apply` through a running replica.
    pub fn apply_policy(&self, name: &str, toml: &str) -> Result<()> {
        let path = self.work.join(format!("policy-{name}.toml"));
        std::fs::write(&path, toml)?;
        let r = self
            .replicas
            .iter()
            .find(|r| r.role.running())
            .context("no control plane runs")?;
        let out = tokio::task::block_in_place(|| {
            Command::new(&self.wfctl)
                .env("WAYFINDER_CONTROL_PLANE", format!("https://{}", r.grpc))
                .env("WAYFINDER_CREDENTIALS", r.data.join("operator"))
                .args(["policy", "apply"])
                .arg(&path)
                .stdin(Stdio::null())
                .output()
        })
        .context("running wfctl")?;
        anyhow::ensure!(
            out.status.success(),
            "wfctl policy apply {name}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
        Ok(())
    }

    /// Every expected instance that a running replica does not list as
    /// serving: (replica, instance, what it says instead).
    pub async fn unserved(&self) -> Vec<(String, String, String)> {
        let expected = [("web", self.web.len()), ("echo", self.echo.len())];
        let mut out = Vec::new();
        for r in self.replicas.iter().filter(|r| r.role.running()) {
            for (service, n) in expected {
                let health = match listed(r.http, service).await {
                    Ok(h) => h,
                    Err(e) => {
                        out.push((
                            r.role.name.clone(),
                            format!("{service}-*"),
                            format!("{e:#}"),
                        ));
                        continue;
                    }
                };
                for i in 1..=n {
                    let name = format!("{service}-{i}");
                    match health.get(&name).map(String::as_str) {
                        Some("serving") => {}
                        Some(h) => out.push((r.role.name.clone(), name, h.to_string())),
                        None => out.push((r.role.name.clone(), name, "missing".into())),
                    }
                }
            }
        }
        out
    }

    /// Waits until every instance is serving on every replica.
    async fn wait_registered(&self, within: Duration) -> Result<()> {
        let deadline = Instant::now() + within;
        loop {
            let unserved = self.unserved().await;
            if unserved.is_empty() {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("not serving after {within:?}: {unserved:?}");
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Writes every role's log (all its incarnations) to `dir/ROLE.log`.
    pub fn save_logs(&self, dir: &Path) -> Result<()> {
        std::fs::create_dir_all(dir)?;
        let all = self
            .etcd
            .iter()
            .chain(self.replicas.iter().map(|r| &r.role))
            .chain(self.web.iter().flat_map(|w| [&w.app, &w.sidecar]))
            .chain(&self.echo)
            .chain(std::iter::once(&self.client));
        for role in all {
            std::fs::write(dir.join(format!("{}.log", role.name)), role.log_text())?;
        }
        Ok(())
    }
}

/// Instance health by instance id, as replica `http` lists `service`.
async fn listed(http: SocketAddr, service: &str) -> Result<BTreeMap<String, String>> {
    let (status, body) = http_get(http, &format!("/v1/services/{service}")).await?;
    if status == 404 {
        return Ok(BTreeMap::new());
    }
    anyhow::ensure!(status == 200, "/v1/services/{service}: {status}");
    Ok(endpoint_health(&body))
}

/// `instance_id` to `health` of every endpoint in a `/v1/services/NAME`
/// answer (each endpoint's object names its instance before its health;
/// read as text, like the tests read lab-app's answers).
fn endpoint_health(body: &str) -> BTreeMap<String, String> {
    let value = |s: &str, key: &str| -> Option<String> {
        let rest = &s[s.find(key)? + key.len()..];
        Some(rest[..rest.find('"')?].to_string())
    };
    body.split("\"instance_id\":\"")
        .skip(1)
        .filter_map(|e| {
            let id = e[..e.find('"')?].to_string();
            Some((id, value(e, "\"health\":\"")?))
        })
        .collect()
}

/// How sidecars of this lab are started.
struct Sidecar {
    bin: PathBuf,
    control_plane: String,
    bundle: PathBuf,
    token: String,
}

impl Sidecar {
    fn common(&self, admin: SocketAddr) -> Vec<String> {
        strings(&[
            "--control-plane",
            &self.control_plane,
            "--ca-bundle",
            &self.bundle.to_string_lossy(),
            "--admin",
            &admin.to_string(),
        ])
    }

    /// The sidecar of instance `name` of `service`, in front of `app`.
    fn instance(&self, service: &str, name: &str, app: SocketAddr, check: &str) -> Result<Role> {
        let mut args = self.common(local(free_port()?));
        args.extend(strings(&[
            "--service",
            service,
            "--instance",
            name,
            "--app",
            &app.to_string(),
            "--inbound",
            &local(free_port()?).to_string(),
            "--health-check",
            check,
        ]));
        let role = Role::new(
            &format!("{name}.wf-proxy"),
            self.bin.clone(),
            args,
            "wf-proxy listening",
        );
        // In the environment, not on the command line `ps` shows.
        Ok(role.env("WAYFINDER_JOIN_TOKEN", &self.token))
    }

    /// The client sidecar: `web` and `echo` on listeners of their own.
    fn client(&self, web: SocketAddr, echo: SocketAddr) -> Result<Role> {
        let mut args = self.common(local(free_port()?));
        args.extend(strings(&[
            "--upstream",
            &format!("web={web}"),
            "--upstream",
            &format!("echo={echo}"),
        ]));
        let role = Role::new(
            "client.wf-proxy",
            self.bin.clone(),
            args,
            "wf-proxy listening",
        );
        Ok(role.env("WAYFINDER_JOIN_TOKEN", &self.token))
    }
}

/// The control plane: two replicas over etcd, or one on its embedded store.
fn control_planes(s: &Setup<'_>, etcd: &[Role], ca: &Path, token: &str) -> Result<Vec<Replica>> {
    let store = if etcd.is_empty() {
        "embedded".to_string()
    } else {
        let hosts: Vec<String> = etcd
            .iter()
            .map(|m| client_url(m).trim_start_matches("http://").to_string())
            .collect();
        format!("etcd://{}", hosts.join(","))
    };
    let n = if etcd.is_empty() { 1 } else { REPLICAS };
    let mut out = Vec::new();
    for i in 0..n {
        let name = if n == 1 {
            "wf-control".to_string()
        } else {
            format!("wf-control-{}", (b'a' + i as u8) as char)
        };
        let (grpc, http) = (local(free_port()?), local(free_port()?));
        let data = s.work.join(&name);
        let args = strings(&[
            "--grpc",
            &grpc.to_string(),
            "--http",
            &http.to_string(),
            "--data-dir",
            &data.to_string_lossy(),
            "--ca-dir",
            &ca.to_string_lossy(),
            "--store",
            &store,
            "--cert-lifetime",
            &format!("{}s", s.cert_lifetime.as_secs()),
            "--join-token",
            token,
        ]);
        let role = Role::new(
            &name,
            s.bin_dir.join("wf-control"),
            args,
            "wf-control serving",
        );
        out.push(Replica {
            role,
            grpc,
            http,
            data,
        });
    }
    Ok(out)
}

/// Three etcd members on loopback, each on ports and a data directory of
/// its own (the arguments of `wayfinder_tests::etcd`, whose three-member
/// cluster needs network namespaces).
fn etcd_members(work: &Path) -> Result<Vec<Role>> {
    let ports: Vec<(u16, u16)> = (0..MEMBERS)
        .map(|_| Ok((free_port()?, free_port()?)))
        .collect::<Result<_>>()?;
    let cluster: Vec<String> = ports
        .iter()
        .enumerate()
        .map(|(i, (_, peer))| format!("m{i}=http://127.0.0.1:{peer}"))
        .collect();
    let cluster = cluster.join(",");
    let mut out = Vec::new();
    for (i, (client, peer)) in ports.into_iter().enumerate() {
        let client = format!("http://127.0.0.1:{client}");
        let peer = format!("http://127.0.0.1:{peer}");
        let args = strings(&[
            "--name",
            &format!("m{i}"),
            "--data-dir",
            &work.join(format!("etcd-m{i}")).to_string_lossy(),
            "--logger",
            "zap",
            "--log-outputs",
            "stderr",
            "--listen-client-urls",
            &client,
            "--advertise-client-urls",
            &client,
            "--listen-peer-urls",
            &peer,
            "--initial-advertise-peer-urls",
            &peer,
            "--initial-cluster",
            &cluster,
            "--initial-cluster-state",
            "new",
        ]);
        // Serving peers comes before the cluster has a leader; clients are
        // waited for once every member runs.
        out.push(Role::new(
            &format!("etcd-m{i}"),
            PathBuf::from("etcd"),
            args,
            "serving peer traffic",
        ));
    }
    Ok(out)
}

/// The `--listen-client-urls` of an etcd member.
fn client_url(m: &Role) -> &str {
    m.args
        .iter()
        .position(|a| a == "--listen-client-urls")
        .and_then(|i| m.args.get(i + 1))
        .map_or("", String::as_str)
}

/// A join token for this run only.
fn join_token() -> String {
    (0..16)
        .map(|_| format!("{:02x}", rand::random::<u8>()))
        .collect()
}

fn strings(args: &[&str]) -> Vec<String> {
    args.iter().map(|s| s.to_string()).collect()
}

/// A TCP echo server on a free loopback port: each line comes back as it
/// was sent, until the client closes.
pub async fn echo_app() -> Result<SocketAddr> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            tokio::spawn(async move {
                let (r, mut w) = s.split();
                let _ = tokio::io::copy(&mut tokio::io::BufReader::new(r), &mut w).await;
            });
        }
    });
    Ok(addr)
}

/// One line through `addr` and back.
async fn echo_once(addr: SocketAddr) -> Result<()> {
    let mut s = tokio::net::TcpStream::connect(addr).await?;
    let (r, mut w) = s.split();
    w.write_all(b">ready\n").await?;
    let mut lines = BufReader::new(r).lines();
    let line = tokio::time::timeout(Duration::from_secs(2), lines.next_line())
        .await
        .context("no echo within 2 s")??;
    anyhow::ensure!(line.as_deref() == Some(">ready"), "echoed {line:?}");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoint_health_reads_each_instance() {
        let body = r#"{"name":"web","endpoints":[{"instance_id":"web-1","address":"127.0.0.1","health":"serving","version":3},{"instance_id":"web-2","health":"not_serving"}]}"#;
        let h = endpoint_health(body);
        assert_eq!(h.get("web-1").map(String::as_str), Some("serving"));
        assert_eq!(h.get("web-2").map(String::as_str), Some("not_serving"));
        assert_eq!(h.len(), 2);
    }
}
