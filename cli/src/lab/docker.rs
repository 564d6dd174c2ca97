//! The comparison on real containers: `wfctl lab compare --compose FILE`.
//!
//! From the user's lab (the classic one: web1..3 under one network alias,
//! an nginx upstream, a client; injected or not) wfctl derives its own
//! compose project in the output directory: the original, with the nginx
//! service left out of the mesh (so it is the nginx people run), the
//! instances' sidecars accepting plaintext too (so the DNS ways reach them
//! as before the mesh), and one more instance per `add` event under a
//! profile; then `wfctl inject` meshes it. The load runs in two containers
//! of the project's image: one on the lab's network (names through Docker's
//! resolver at 127.0.0.11: the DNS and nginx ways), one in the client's
//! network namespace, whose sidecar captures its calls (the mesh way).
//! Events are Docker's own verbs: kill, pause, recreate, `tc netem` in the
//! instance's namespace, the control plane's container killed and started.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use anyhow::{Context, Result, bail};
use serde_yaml_ng::{Mapping, Value};
use tokio::io::AsyncBufReadExt;

use super::compare::{self, Config, Lab, Samples};
use super::load::{Sample, Way};
use super::scenario::{Action, Event, Scenario, ScenarioError};
use crate::inject;

/// Label of an instance's service: a shell command that makes its health
/// check fail (the `unhealthy` event runs it in the app container).
pub const LABEL_UNHEALTHY: &str = "wayfinder.io/unhealthy";
/// The command that makes it healthy again (`resume`).
pub const LABEL_HEALTHY: &str = "wayfinder.io/healthy";
/// The profile of the instances `add` starts.
const ADDED_PROFILE: &str = "wayfinder-compare-added";

/// What `--compose` mode was asked.
#[derive(Debug, Clone)]
pub struct Options {
    /// The user's compose file.
    pub compose: PathBuf,
    /// The compose project name.
    pub project: String,
    /// The network alias the instances share (`web`).
    pub alias: String,
    /// The service whose sidecar carries the mesh way (`client`).
    pub client: String,
    /// The nginx service (`nginx`).
    pub nginx: String,
    /// The Wayfinder image (sidecars, control plane, load).
    pub image: String,
    /// Leave the lab running afterwards.
    pub keep: bool,
}

/// The project wfctl derived from the user's file.
#[derive(Debug, Clone)]
pub struct Derived {
    /// Meshed compose text.
    pub text: String,
    /// The alias's instances (compose service names), file order.
    pub instances: Vec<String>,
    /// The network the instances share the alias on (its compose key).
    pub network: String,
    /// Its Docker name when the file gives one (`name:`, or external).
    pub network_named: Option<String>,
    /// The port they serve on.
    pub port: u16,
    /// nginx's port inside its container.
    pub nginx_port: Option<u16>,
    /// Instances with an unhealthy command.
    pub unhealthy: Vec<String>,
    /// Mesh services that need a join token.
    pub mesh_services: std::collections::BTreeSet<String>,
    /// The instances' mesh service (and the DNS name the load calls).
    pub service: String,
    /// Services `up` starts (those under no profile).
    pub started: Vec<String>,
}

fn labels_mut(svc: &mut Mapping) -> Result<&mut Mapping> {
    let labels = svc
        .entry("labels".into())
        .or_insert_with(|| Value::Mapping(Mapping::new()));
    if let Value::Sequence(list) = labels {
        // `[k=v, ...]` → a mapping, so labels can be set by key.
        let mut m = Mapping::new();
        for item in list.iter().filter_map(Value::as_str) {
            let (k, v) = item.split_once('=').unwrap_or((item, ""));
            m.insert(k.into(), v.into());
        }
        *labels = Value::Mapping(m);
    }
    labels
        .as_mapping_mut()
        .context("labels is neither a mapping nor a list")
}

fn label<'a>(svc: &'a Mapping, key: &str) -> Option<&'a str> {
    match svc.get("labels")? {
        Value::Mapping(m) => m.get(key)?.as_str(),
        Value::Sequence(s) => s
            .iter()
            .filter_map(Value::as_str)
            .find_map(|i| i.strip_prefix(key)?.strip_prefix('=')),
        _ => None,
    }
}

/// The networks (and their aliases) a service is on.
fn aliases(svc: &Mapping) -> Vec<(String, Vec<String>)> {
    match svc.get("networks") {
        Some(Value::Mapping(m)) => m
            .iter()
            .filter_map(|(k, v)| {
                let aliases = v
                    .get("aliases")
                    .and_then(Value::as_sequence)
                    .map(|s| {
                        s.iter()
                            .filter_map(|a| a.as_str().map(String::from))
                            .collect()
                    })
                    .unwrap_or_default();
                Some((k.as_str()?.to_string(), aliases))
            })
            .collect(),
        _ => Vec::new(),
    }
}

/// The first TCP port in `expose` (or a `ports` entry's container side).
fn first_port(svc: &Mapping) -> Option<u16> {
    let container_side = |v: &Value| -> Option<u16> {
        let s = match v {
            Value::Number(n) => n.to_string(),
            Value::String(s) => s.clone(),
            _ => return None,
        };
        s.rsplit(':').next()?.split('/').next()?.parse().ok()
    };
    ["expose", "ports"]
        .iter()
        .find_map(|k| svc.get(*k)?.as_sequence()?.iter().find_map(container_side))
}

/// Derives the comparison's project from the user's compose text.
pub fn derive(text: &str, o: &Options, sc: &Scenario, secrets_dir: &str) -> Result<Derived> {
    let file = o.compose.display().to_string();
    let opts = inject::Options {
        file: file.clone(),
        secrets_dir: secrets_dir.to_string(),
        ..Default::default()
    };
    // An injected file: start from its original.
    let original = match inject::remove(text, &opts) {
        Ok(original) => original,
        Err(_) => text.to_string(),
    };
    let mut doc: Value =
        serde_yaml_ng::from_str(&original).with_context(|| format!("{file}: not YAML"))?;
    doc.apply_merge()
        .with_context(|| format!("{file}: YAML merge keys"))?;
    let services = doc
        .get_mut("services")
        .and_then(Value::as_mapping_mut)
        .with_context(|| format!("{file}: no top-level `services` mapping"))?;
    let mut instances = Vec::new();
    let mut network = None;
    for (name, svc) in services.iter() {
        let (Some(name), Some(svc)) = (name.as_str(), svc.as_mapping()) else {
            continue;
        };
        for (net, aliases) in aliases(svc) {
            if aliases.contains(&o.alias) {
                instances.push(name.to_string());
                network.get_or_insert(net);
            }
        }
    }
    if instances.len() < 2 {
        bail!(
            "{file}: services: no two services share the network alias {:?} (as web1..3 share `web` in examples/classic-lab); name the alias with --alias",
            o.alias
        );
    }
    let network = network.unwrap_or_else(|| "default".into());
    for want in [&o.client, &o.nginx] {
        if !services.contains_key(want.as_str()) {
            bail!("{file}: services.{want}: no such service (see --client and --nginx-service)");
        }
    }
    let last = instances.last().cloned().unwrap_or_default();
    let port = services
        .get(last.as_str())
        .and_then(Value::as_mapping)
        .and_then(first_port)
        .unwrap_or(80);
    let nginx_port = services
        .get(o.nginx.as_str())
        .and_then(Value::as_mapping)
        .and_then(first_port)
        .or(Some(80));
    let mut unhealthy = Vec::new();
    for name in &instances {
        let Some(svc) = services
            .get_mut(name.as_str())
            .and_then(Value::as_mapping_mut)
        else {
            continue;
        };
        if label(svc, LABEL_UNHEALTHY).is_some() {
            unhealthy.push(name.clone());
        }
        // The DNS and nginx ways call the instances in plaintext, as
        // before the mesh; the mesh way is mTLS between sidecars.
        labels_mut(svc)?.insert(inject::compose::LABEL_INBOUND.into(), "permissive".into());
    }
    if let Some(svc) = services
        .get_mut(o.nginx.as_str())
        .and_then(Value::as_mapping_mut)
    {
        // nginx stays the nginx people run, not a meshed one.
        labels_mut(svc)?.insert(inject::compose::LABEL_INJECT.into(), "false".into());
    }
    // Taken once its labels are set: an added instance lets the DNS ways'
    // plaintext in like the others.
    let template = services
        .get(last.as_str())
        .and_then(Value::as_mapping)
        .cloned()
        .context("the last instance")?;
    for added in sc.added() {
        let mut svc = template.clone();
        if svc.contains_key("hostname") {
            svc.insert("hostname".into(), added.into());
        }
        svc.remove("container_name");
        svc.remove("ports");
        svc.insert(
            "profiles".into(),
            Value::Sequence(vec![ADDED_PROFILE.into()]),
        );
        if label(&svc, LABEL_UNHEALTHY).is_some() {
            unhealthy.push(added.to_string());
        }
        services.insert(added.into(), Value::Mapping(svc));
    }
    let network_named = doc
        .get("networks")
        .and_then(|n| n.get(network.as_str()))
        .and_then(|n| {
            let external = n.get("external");
            n.get("name")
                .and_then(Value::as_str)
                .or_else(|| external.and_then(|e| e.get("name")).and_then(Value::as_str))
                .map(String::from)
                .or_else(|| {
                    external
                        .and_then(Value::as_bool)
                        .filter(|e| *e)
                        .map(|_| network.clone())
                })
        });
    let derived = inject::yaml11::to_string(&doc)
        .with_context(|| format!("{file}: writing the derived file"))?;
    let injected = inject::inject(&derived, &opts).map_err(anyhow::Error::from)?;
    let service = injected
        .meshed
        .iter()
        .find(|m| m.compose == instances[0])
        .map(|m| m.service.clone())
        .context("the instances were not meshed")?;
    let mut plain: Vec<String> = Vec::new();
    if let Ok(Value::Mapping(doc)) = serde_yaml_ng::from_str::<Value>(&injected.text)
        && let Some(Value::Mapping(services)) = doc.get("services")
    {
        for (name, svc) in services {
            if let (Some(name), None) = (name.as_str(), svc.get("profiles")) {
                plain.push(name.to_string());
            }
        }
    }
    Ok(Derived {
        text: injected.text.clone(),
        service,
        started: plain,
        mesh_services: injected.mesh_services(),
        instances,
        network,
        network_named,
        port,
        nginx_port,
        unhealthy,
    })
}

impl Derived {
    /// The Docker network the instances are on.
    pub fn network_name(&self, project: &str) -> String {
        self.network_named
            .clone()
            .unwrap_or_else(|| format!("{project}_{}", self.network))
    }
}

/// Checks the scenario against the derived lab, before anything starts.
fn check(sc: &Scenario, d: &Derived) -> Result<(), ScenarioError> {
    compare::check_targets(sc, &d.instances)?;
    for e in &sc.events {
        if e.action == Action::Unhealthy && !d.unhealthy.contains(&e.target) {
            return Err(sc.error_at(
                e,
                "action",
                format!(
                    "on Docker, unhealthy runs the command in the label {LABEL_UNHEALTHY} of {}'s service (and resume the one in {LABEL_HEALTHY}); the compose file sets none",
                    e.target
                ),
            ));
        }
    }
    Ok(())
}

/// `docker-compose` or the `docker compose` plugin; an error saying why
/// not when no engine answers.
pub fn compose_command() -> Result<Vec<String>> {
    let engine = std::process::Command::new("docker")
        .args(["info", "--format", "{{.ServerVersion}}"])
        .output()
        .context("no docker client")?;
    if !engine.status.success() {
        bail!("no Docker engine answers `docker info`");
    }
    for cmd in [vec!["docker-compose"], vec!["docker", "compose"]] {
        let ok = std::process::Command::new(cmd[0])
            .args(&cmd[1..])
            .arg("version")
            .output()
            .is_ok_and(|o| o.status.success());
        if ok {
            return Ok(cmd.into_iter().map(String::from).collect());
        }
    }
    bail!("neither docker-compose nor `docker compose` is installed")
}

/// Runs `program args`; its stdout, or an error with its stderr.
async fn output(program: &str, args: &[String], env: &[(String, String)]) -> Result<String> {
    let out = tokio::process::Command::new(program)
        .args(args)
        .envs(env.iter().map(|(k, v)| (k, v)))
        .stdin(Stdio::null())
        .kill_on_drop(true)
        .output()
        .await
        .with_context(|| format!("running {program}"))?;
    if !out.status.success() {
        bail!(
            "{program} {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

async fn docker(args: &[&str]) -> Result<String> {
    let args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
    output("docker", &args, &[]).await
}

/// The containers (stopped ones too) of compose `service` in `project`.
async fn container_ids(project: &str, service: &str) -> Result<Vec<String>> {
    let project = format!("label=com.docker.compose.project={project}");
    let service = format!("label=com.docker.compose.service={service}");
    let out = docker(&["ps", "-aq", "--filter", &project, "--filter", &service]).await?;
    Ok(out
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .map(String::from)
        .collect())
}

/// The addresses of `container` on its networks.
async fn ips(container: &str) -> String {
    docker(&[
        "inspect",
        "-f",
        "{{range .NetworkSettings.Networks}}{{.IPAddress}} {{end}}",
        container,
    ])
    .await
    .map(|s| s.trim().to_string())
    .unwrap_or_default()
}

/// One load container.
struct Load<'a> {
    /// Its name, after the project's.
    name: &'a str,
    /// `--network`: the lab's network, or `container:ID` for a namespace.
    network: String,
    ways: Vec<Way>,
    /// `WAY=HOST:PORT` for the ways through a front.
    fronts: Vec<String>,
}

/// The lab's containers.
pub struct DockerLab {
    compose: Vec<String>,
    project: String,
    file: PathBuf,
    directory: PathBuf,
    env: Vec<(String, String)>,
    dashboard: SocketAddr,
    derived: Derived,
    image: String,
    keep: bool,
    /// Containers of ours to remove at the end (loads, placeholders).
    loads: Vec<String>,
    /// Each instance's address when last seen up.
    addresses: Arc<Mutex<HashMap<String, String>>>,
    /// Instances coming back (restart, add) in the background.
    pending: Vec<tokio::task::JoinHandle<()>>,
    /// Instances slowed by freezing (no netem here), and their cycles.
    freezing: HashMap<String, (tokio::task::JoinHandle<()>, Duration)>,
    /// What the report should say about how events were done.
    notes: Vec<String>,
}

impl Drop for DockerLab {
    fn drop(&mut self) {
        for task in self.freezing.values().map(|(c, _)| c).chain(&self.pending) {
            task.abort();
        }
        for name in &self.loads {
            let _ = std::process::Command::new("docker")
                .args(["rm", "-f", name])
                .output();
        }
        if self.keep {
            eprintln!(
                "== the lab keeps running: {} -p {} -f {} --project-directory {} down -v",
                self.compose.join(" "),
                self.project,
                self.file.display(),
                self.directory.display()
            );
            return;
        }
        let _ = self
            .sync_cmd(&["down", "-v", "--remove-orphans", "-t", "1"])
            .output();
    }
}

impl DockerLab {
    fn args(&self, args: &[&str]) -> Vec<String> {
        let mut v: Vec<String> = self.compose[1..].to_vec();
        // The added instances' profile is always on: `up` names what it
        // starts, and `ps` and `down` see every container.
        v.extend([
            "--profile".into(),
            ADDED_PROFILE.into(),
            "-p".into(),
            self.project.clone(),
            "-f".into(),
            self.file.to_string_lossy().into(),
            "--project-directory".into(),
            self.directory.to_string_lossy().into(),
        ]);
        v.extend(args.iter().map(|s| s.to_string()));
        v
    }

    fn sync_cmd(&self, args: &[&str]) -> std::process::Command {
        let mut c = std::process::Command::new(&self.compose[0]);
        c.args(self.args(args))
            .envs(self.env.iter().map(|(k, v)| (k, v)));
        c
    }

    /// `compose ARGS`.
    async fn compose(&self, args: &[&str]) -> Result<String> {
        output(&self.compose[0], &self.args(args), &self.env).await
    }

    /// The container ids of compose `services` (stopped ones too), from
    /// compose's labels (docker answers in milliseconds, compose 1.x in
    /// about a second: events must not drift).
    async fn ids(&self, services: &[&str]) -> Result<Vec<String>> {
        let mut ids = Vec::new();
        for s in services {
            ids.extend(container_ids(&self.project, s).await?);
        }
        if ids.is_empty() {
            bail!("no containers for {}", services.join(", "));
        }
        Ok(ids)
    }

    /// The pid of the container owning `instance`'s network namespace.
    async fn netns_pid(&self, instance: &str) -> Result<String> {
        let side = format!("{instance}-sidecar");
        let id = self.ids(&[&side]).await?;
        docker(&["inspect", "-f", "{{.State.Pid}}", &id[0]]).await
    }

    /// Runs the label command `key` of `instance` in its app container
    /// (thawed first if a slow cycle froze it).
    async fn label_command(&mut self, instance: &str, key: &str) -> Result<()> {
        let id = self.ids(&[instance]).await?;
        let cycle = self.freezing.remove(instance);
        if let Some((c, _)) = &cycle {
            c.abort();
            let _ = docker(&["unpause", &id[0]]).await;
        }
        let result = self.exec_label(&id[0], key).await;
        if let Some((_, delay)) = cycle {
            self.freeze_cycle(instance, id[0].clone(), delay);
        }
        result
    }

    /// Freezes container `id` of `instance` for `delay`, thaws it for
    /// 50 ms, over and over, until resumed.
    fn freeze_cycle(&mut self, instance: &str, id: String, delay: Duration) {
        let cycle = tokio::spawn(async move {
            loop {
                let _ = docker(&["pause", &id]).await;
                tokio::time::sleep(delay).await;
                let _ = docker(&["unpause", &id]).await;
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        });
        if let Some((old, _)) = self.freezing.insert(instance.to_string(), (cycle, delay)) {
            old.abort();
        }
    }

    /// Runs the command in label `key` of `container` there.
    async fn exec_label(&self, container: &str, key: &str) -> Result<()> {
        let cmd = docker(&[
            "inspect",
            "-f",
            &format!("{{{{index .Config.Labels \"{key}\"}}}}"),
            container,
        ])
        .await?;
        if cmd.is_empty() {
            return Ok(());
        }
        docker(&["exec", container, "sh", "-c", &cmd])
            .await
            .map(drop)
    }

    /// Waits until the control plane has `want` serving instances of the alias.
    async fn wait_serving(&self, want: usize, within: Duration) -> Result<()> {
        let deadline = Instant::now() + within;
        let path = format!("/v1/services/{}", self.derived.service);
        loop {
            let got = super::http_get(self.dashboard, &path).await;
            if let Ok((200, body)) = &got
                && body.contains(&format!("\"serving\":{want}"))
            {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("the control plane never listed {want} serving instances: {got:?}");
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }

    /// Starts `instance` in the background (its sidecar first, then once
    /// that is healthy its app, as compose's `service_healthy` does), so
    /// the timeline goes on: `containers` are the (sidecar, app) to start
    /// again, or `None` to create them with compose.
    fn come_back(&mut self, instance: &str, containers: Option<(String, String)>) {
        let compose = (self.compose[0].clone(), self.args(&[]), self.env.clone());
        let (addresses, instance) = (self.addresses.clone(), instance.to_string());
        let project = self.project.clone();
        let task = tokio::spawn(async move {
            let side = format!("{instance}-sidecar");
            let started = async {
                let sidecar = match containers {
                    Some((sidecar, app)) => {
                        docker(&["start", &sidecar]).await?;
                        let deadline = Instant::now() + Duration::from_secs(60);
                        while docker(&["inspect", "-f", "{{.State.Health.Status}}", &sidecar])
                            .await?
                            != "healthy"
                        {
                            if Instant::now() > deadline {
                                bail!("{side} not healthy within 60 s");
                            }
                            tokio::time::sleep(Duration::from_millis(100)).await;
                        }
                        docker(&["start", &app]).await?;
                        sidecar
                    }
                    None => {
                        let (program, mut args, env) = compose;
                        args.extend(["up", "-d", "--no-deps", &side, &instance].map(String::from));
                        output(&program, &args, &env).await?;
                        container_ids(&project, &side)
                            .await?
                            .into_iter()
                            .next()
                            .with_context(|| format!("no {side} container"))?
                    }
                };
                anyhow::Ok(sidecar)
            };
            match started.await {
                Ok(sidecar) => {
                    let ip = ips(&sidecar).await;
                    eprintln!("          {instance} is up at {ip}");
                    if let Ok(mut a) = addresses.lock() {
                        a.insert(instance, ip);
                    }
                }
                Err(e) => eprintln!("          {instance} did not come back: {e:#}"),
            }
        });
        self.pending.push(task);
    }

    /// Starts a load container running `wfctl lab load` as `load` says,
    /// its samples into `sink`.
    async fn start_load(
        &mut self,
        load: Load<'_>,
        cfg: &Config,
        start: SystemTime,
        sink: Samples,
    ) -> Result<tokio::task::JoinHandle<Result<()>>> {
        let Load {
            name,
            network,
            ways,
            fronts,
        } = load;
        let sc = &cfg.scenario;
        let container = format!("{}-{name}", self.project);
        let _ = docker(&["rm", "-f", &container]).await;
        self.loads.push(container.clone());
        let start_ms = start
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis())
            .to_string();
        let keys: Vec<&str> = ways.iter().map(|w| w.key()).collect();
        let mut args: Vec<String> = [
            "run",
            "--rm",
            "--name",
            &container,
            "--network",
            &network,
            // Not the sidecar's uid: its calls must be captured.
            "--user",
            "1000:1000",
            &self.image,
            "wfctl",
            "lab",
            "load",
            "--start-at",
            &start_ms,
            "--duration",
            &format!("{}ms", sc.duration.as_millis()),
            "--rate",
            &sc.rate.to_string(),
            "--timeout",
            &format!("{}ms", sc.timeout.as_millis()),
            "--resolver",
            "127.0.0.11:53",
            "--name",
            &self.derived.service,
            "--port",
            &self.derived.port.to_string(),
            "--ways",
            &keys.join(","),
        ]
        .map(String::from)
        .to_vec();
        for f in fronts {
            args.extend(["--front".into(), f]);
        }
        let mut child = tokio::process::Command::new("docker")
            .args(&args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .context("docker run (the load)")?;
        let stdout = child.stdout.take().context("stdout")?;
        let stderr = child.stderr.take().context("stderr")?;
        let name = name.to_string();
        Ok(tokio::spawn(async move {
            let mut lines = tokio::io::BufReader::new(stdout).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                if let Some(s) = Sample::parse(&line) {
                    sink.push(s);
                }
            }
            let mut err = String::new();
            let mut e = tokio::io::BufReader::new(stderr).lines();
            while let Ok(Some(line)) = e.next_line().await {
                if line.contains("warning") || line.contains("Error") || line.contains("error") {
                    eprintln!("   load {name}: {line}");
                }
                err.push_str(&line);
                err.push('\n');
            }
            let status = child.wait().await?;
            if !status.success() {
                bail!("the {name} load container failed ({status}): {err}");
            }
            Ok(())
        }))
    }
}

impl DockerLab {
    fn address(&self, instance: &str) -> String {
        self.addresses
            .lock()
            .ok()
            .and_then(|a| a.get(instance).cloned())
            .unwrap_or_default()
    }
}

impl Lab for DockerLab {
    async fn act(&mut self, event: &Event) -> Result<()> {
        let t = event.target.as_str();
        let side = format!("{t}-sidecar");
        match &event.action {
            Action::Kill => {
                let ids = self.ids(&[t, &side]).await?;
                let mut args = vec!["kill"];
                args.extend(ids.iter().map(String::as_str));
                docker(&args).await?;
            }
            // The whole instance, sidecar too: a hung host, not a hung app
            // its sidecar could report.
            Action::Pause => {
                let ids = self.ids(&[t, &side]).await?;
                let mut args = vec!["pause"];
                args.extend(ids.iter().map(String::as_str));
                docker(&args).await?;
            }
            Action::Resume => {
                if let Some((cycle, _)) = self.freezing.remove(t) {
                    cycle.abort();
                }
                for id in self.ids(&[t, &side]).await? {
                    let _ = docker(&["unpause", &id]).await;
                }
                let pid = self.netns_pid(t).await?;
                let _ = output(
                    "nsenter",
                    &[
                        "-t", &pid, "-n", "tc", "qdisc", "del", "dev", "eth0", "root",
                    ]
                    .map(String::from),
                    &[],
                )
                .await;
                self.label_command(t, LABEL_HEALTHY).await?;
            }
            Action::Restart => {
                let (sidecar, app) = (self.ids(&[&side]).await?, self.ids(&[t]).await?);
                let _ = docker(&["kill", &sidecar[0], &app[0]]).await;
                // Docker hands a freed address to the next container: a
                // placeholder takes it, so the instance comes back on a
                // new one and the old one answers no more (refused), the
                // trap for whoever kept it.
                // The kill returns before Docker has freed the address:
                // placeholders are started until one holds it (an extra
                // one holds some other free address, harmlessly).
                let was = self.address(t);
                let mut held_it = false;
                for _ in 0..5 {
                    let held = format!("{}-held-{t}-{}", self.project, self.loads.len());
                    let _ = docker(&["rm", "-f", &held]).await;
                    self.loads.push(held.clone());
                    docker(&[
                        "run",
                        "-d",
                        "--name",
                        &held,
                        "--network",
                        &self.derived.network_name(&self.project),
                        &self.image,
                        "lab-app",
                        "--listen",
                        "127.0.0.1:9",
                    ])
                    .await
                    .context("the placeholder holding the old address")?;
                    if ips(&held).await == was {
                        held_it = true;
                        break;
                    }
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                if !held_it {
                    eprintln!("          {t}: no placeholder got {was}; it may come back there");
                }
                if held_it {
                    eprintln!("          {t} was at {was}; a placeholder holds that address now");
                }
                self.come_back(t, Some((sidecar[0].clone(), app[0].clone())));
            }
            Action::Slow(d) => {
                let pid = self.netns_pid(t).await?;
                let delay = format!("{}ms", d.as_millis());
                let netem = output(
                    "nsenter",
                    &[
                        "-t", &pid, "-n", "tc", "qdisc", "replace", "dev", "eth0", "root", "netem",
                        "delay", &delay,
                    ]
                    .map(String::from),
                    &[],
                )
                .await;
                match netem {
                    Ok(_) => {}
                    // A kernel without sch_netem (some VMs): the app is
                    // frozen for the delay, thawed for 50 ms, over and over.
                    Err(e) if format!("{e}").contains("qdisc kind is unknown") => {
                        let id = self.ids(&[t]).await?.remove(0);
                        let d = *d;
                        self.notes.push(format!(
                            "This kernel has no netem: slow {t} froze its app {} ms of every {} ms instead (`docker pause`, `unpause`), so its calls waited up to that long.",
                            d.as_millis(),
                            d.as_millis() + 50
                        ));
                        self.freeze_cycle(t, id, d);
                    }
                    Err(e) => {
                        return Err(e.context(
                            "tc netem in the instance's namespace (needs root, nsenter and tc)",
                        ));
                    }
                }
            }
            Action::Unhealthy => self.label_command(t, LABEL_UNHEALTHY).await?,
            Action::Add => self.come_back(t, None),
            Action::ControlDown => {
                let id = self.ids(&["wayfinder-control"]).await?;
                docker(&["kill", &id[0]]).await?;
            }
            Action::ControlUp => {
                let id = self.ids(&["wayfinder-control"]).await?;
                docker(&["start", &id[0]]).await?;
            }
        }
        Ok(())
    }
}

/// A name compose keeps as it is (it lowercases and strips the rest).
fn check_project(name: &str) -> Result<()> {
    if name.is_empty()
        || !name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit())
    {
        bail!("--project {name:?}: use lowercase letters and digits");
    }
    Ok(())
}

/// Runs the scenario on the containers of `o.compose` and writes the
/// report; returns its path.
pub async fn run(cfg: &Config, o: &Options) -> Result<PathBuf> {
    check_project(&o.project)?;
    let text = std::fs::read_to_string(&o.compose)
        .with_context(|| format!("reading {}", o.compose.display()))?;
    let out = std::path::absolute(&cfg.out)?;
    let secrets = out.join("lab.wayfinder");
    let derived = derive(&text, o, &cfg.scenario, &secrets.to_string_lossy())?;
    check(&cfg.scenario, &derived)?;
    std::fs::create_dir_all(&out).with_context(|| format!("creating {}", out.display()))?;
    let compose = compose_command()?;
    let image_ok = docker(&["image", "inspect", "-f", "{{.Id}}", &o.image]).await;
    if image_ok.is_err() {
        bail!(
            "the image {} is not here: build it with deploy/docker-build.sh (WAYFINDER_IMAGE names it), and the lab's own images (deploy/lab-images.sh for the classic lab)",
            o.image
        );
    }
    let file = out.join("lab.yaml");
    std::fs::write(&file, &derived.text).with_context(|| format!("writing {}", file.display()))?;
    let tokens = inject::secrets::tokens(&secrets, &derived.mesh_services)?;
    inject::secrets::write(&secrets, &tokens)?;
    let directory = std::fs::canonicalize(&o.compose)?
        .parent()
        .map_or_else(|| PathBuf::from("."), Path::to_path_buf);
    let dashboard = super::free_port()?;
    let mut lab = DockerLab {
        compose,
        project: o.project.clone(),
        file,
        directory,
        env: vec![
            ("WAYFINDER_IMAGE".into(), o.image.clone()),
            ("WAYFINDER_DASHBOARD_PORT".into(), dashboard.to_string()),
            // Published ports of the user's lab, moved off the ones it may
            // be using right now.
            ("LAB_NGINX_PORT".into(), super::free_port()?.to_string()),
        ],
        dashboard: SocketAddr::from(([127, 0, 0, 1], dashboard)),
        derived: derived.clone(),
        image: o.image.clone(),
        keep: o.keep,
        loads: Vec::new(),
        addresses: Default::default(),
        pending: Vec::new(),
        freezing: Default::default(),
        notes: Vec::new(),
    };
    eprintln!(
        "== Docker lab {} from {}: {} under {:?}, {} and {} (derived file: {})",
        o.project,
        o.compose.display(),
        derived.instances.join(", "),
        derived.service,
        o.nginx,
        o.client,
        lab.file.display()
    );
    let _ = lab
        .compose(&["down", "-v", "--remove-orphans", "-t", "1"])
        .await;
    let up = Instant::now();
    let mut up_args = vec!["up", "-d"];
    up_args.extend(derived.started.iter().map(String::as_str));
    lab.compose(&up_args).await?;
    lab.wait_serving(derived.instances.len(), Duration::from_secs(90))
        .await?;
    for i in &derived.instances {
        let side = lab.ids(&[&format!("{i}-sidecar")]).await?;
        let ip = ips(&side[0]).await;
        if let Ok(mut a) = lab.addresses.lock() {
            a.insert(i.clone(), ip);
        }
    }
    eprintln!("== up in {:.0} s", up.elapsed().as_secs_f64());

    let start = SystemTime::now() + Duration::from_secs(8);
    let samples = Samples::default();
    let mut loads = Vec::new();
    let plain: Vec<Way> = cfg
        .ways
        .iter()
        .copied()
        .filter(|w| *w != Way::Mesh)
        .collect();
    if !plain.is_empty() {
        let fronts = match derived.nginx_port {
            Some(p) if plain.contains(&Way::Nginx) => vec![format!("nginx={}:{p}", o.nginx)],
            _ => Vec::new(),
        };
        let load = Load {
            name: "load",
            network: derived.network_name(&o.project),
            ways: plain,
            fronts,
        };
        loads.push(lab.start_load(load, cfg, start, samples.clone()).await?);
    }
    if cfg.ways.contains(&Way::Mesh) {
        let side = lab.ids(&[&format!("{}-sidecar", o.client)]).await?;
        let fronts = vec![format!("mesh={}:{}", derived.service, derived.port)];
        let load = Load {
            name: "load-mesh",
            network: format!("container:{}", side[0]),
            ways: vec![Way::Mesh],
            fronts,
        };
        loads.push(lab.start_load(load, cfg, start, samples.clone()).await?);
    }
    compare::announce_load(cfg, ", from containers on the lab's network");
    let started = {
        let now = (Instant::now(), SystemTime::now());
        now.0 + start.duration_since(now.1).unwrap_or_default()
    };
    let fired = compare::drive(&mut lab, cfg, started, &samples).await;
    for l in loads {
        match tokio::time::timeout(Duration::from_secs(30), l).await {
            Ok(Ok(Ok(()))) => {}
            Ok(Ok(Err(e))) => bail!(e),
            Ok(Err(e)) => bail!("the load task: {e}"),
            Err(_) => bail!("a load container did not end 30 s after its time"),
        }
    }
    let run = compare::finish(cfg, &samples, fired);
    let mut notes = vec![format!(
        "Containers of `{}` (project `{}`), meshed by `wfctl inject` as `lab.yaml` here shows: \
         the load runs in containers of the Wayfinder image, the DNS and nginx ways on the \
         lab's network (names through Docker's resolver at 127.0.0.11), the mesh way in {}'s \
         network namespace, where its sidecar captures the calls. {} stays out of the mesh \
         (its static upstream, as people run it); the instances' sidecars let the DNS ways' \
         plaintext through. Every event acts on an instance with its sidecar: kill is SIGKILL, \
         pause `docker pause`, restart a kill and a recreate (a new IP: a placeholder container holds the old one, which refuses connections from then on), slow `tc netem` in its \
         namespace, unhealthy the command in its {LABEL_UNHEALTHY} label; control-down kills \
         the control plane's container, control-up starts it again.",
        o.compose.display(),
        o.project,
        o.client,
        o.nginx
    )];
    notes.append(&mut lab.notes);
    drop(lab);
    let setting = super::report::Setting {
        place: "on Docker".into(),
        scenario: &cfg.scenario,
        notes,
    };
    let path = super::report::write(&cfg.out, &setting, &run)?;
    eprintln!("{}", super::report::summary(&run));
    Ok(path)
}
