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

use std::collections::{BTreeMap, HashMap};
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
    /// Instances (and the client) of a lab meshed by hand; a meshed one's
    /// are `X-sidecar` then `X`.
    pub pods: BTreeMap<String, Pod>,
    /// The control plane's service.
    pub control: String,
    /// Where the mesh way sends inside the client's namespace, when not
    /// captured (by hand: its sidecar's `--outbound` listener).
    pub mesh_front: Option<String>,
    /// Variables the file needs (join tokens), with values for this run.
    pub secrets: Vec<(String, String)>,
    /// The file ran Wayfinder by hand.
    pub by_hand: bool,
    /// The file has the client service (the mesh way needs it).
    pub has_client: bool,
}

impl Derived {
    /// `instance`'s containers, the namespace's owner first.
    pub fn pod(&self, instance: &str) -> Pod {
        self.pods.get(instance).cloned().unwrap_or_else(|| Pod {
            members: vec![format!("{instance}-sidecar"), instance.to_string()],
        })
    }
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

/// A compose service's command as one string (for looking into it).
fn command_text(svc: &Mapping) -> String {
    match svc.get("command") {
        Some(Value::String(c)) => c.clone(),
        Some(Value::Sequence(words)) => words
            .iter()
            .filter_map(Value::as_str)
            .collect::<Vec<_>>()
            .join(" "),
        _ => String::new(),
    }
}

/// The value after `flag` in a service's command.
fn flag_value(svc: &Mapping, flag: &str) -> Option<String> {
    let text = command_text(svc);
    let mut words = text.split_whitespace();
    words.find(|w| *w == flag)?;
    words.next().map(String::from)
}

/// `svc` with every string `from` replaced by `to` (an added instance
/// made from the last one: names, hostnames, the namespace it joins).
fn renamed(svc: &Value, from: &str, to: &str) -> Value {
    match svc {
        Value::String(s) => Value::String(s.replace(from, to)),
        Value::Sequence(items) => {
            Value::Sequence(items.iter().map(|v| renamed(v, from, to)).collect())
        }
        Value::Mapping(m) => Value::Mapping(
            m.iter()
                .map(|(k, v)| (k.clone(), renamed(v, from, to)))
                .collect(),
        ),
        v => v.clone(),
    }
}

/// Derives the comparison's project from the user's compose text: a lab
/// without the mesh (or meshed by `wfctl inject`) is meshed here; a lab
/// that runs Wayfinder by hand (`deploy/compose.yaml`: sidecars joining
/// their app's namespace) is taken as it is.
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
    let mut doc = inject::compose::parse(&original, &opts)?;
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
        for (net, aliases) in inject::compose::networks(name, svc, &opts)? {
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
    // Each is needed by its way only (`--ways` leaves them out): checked
    // against the ways in `run`.
    let has_client = services.contains_key(o.client.as_str());
    let has_nginx = services.contains_key(o.nginx.as_str());
    let control = services.iter().find_map(|(name, svc)| {
        let svc = svc.as_mapping()?;
        command_text(svc)
            .contains("wf-control")
            .then(|| name.as_str().map(String::from))?
    });
    let by_hand = control.is_some();
    // Who joins whose network namespace (`network_mode: service:X`).
    let joins = |services: &Mapping, owner: &str| -> Vec<String> {
        services
            .iter()
            .filter(|(_, svc)| {
                svc.get("network_mode").and_then(Value::as_str)
                    == Some(format!("service:{owner}").as_str())
            })
            .filter_map(|(name, _)| name.as_str().map(String::from))
            .collect()
    };
    let last = instances.last().cloned().unwrap_or_default();
    let port = services
        .get(last.as_str())
        .and_then(Value::as_mapping)
        .and_then(first_port)
        .unwrap_or(80);
    let nginx_port = has_nginx.then(|| {
        services
            .get(o.nginx.as_str())
            .and_then(Value::as_mapping)
            .and_then(first_port)
            .unwrap_or(80)
    });
    let mut unhealthy = Vec::new();
    for name in &instances {
        let Some(svc) = services
            .get_mut(name.as_str())
            .and_then(Value::as_mapping_mut)
        else {
            continue;
        };
        if inject::compose::label(svc, LABEL_UNHEALTHY).is_some() {
            unhealthy.push(name.clone());
        }
        if !by_hand {
            // The DNS and nginx ways call the instances in plaintext, as
            // before the mesh; the mesh way is mTLS between sidecars.
            labels_mut(svc)?.insert(inject::compose::LABEL_INBOUND.into(), "permissive".into());
        }
    }
    if let Some(svc) = services
        .get_mut(o.nginx.as_str())
        .and_then(Value::as_mapping_mut)
    {
        // nginx stays the nginx people run, not a meshed one, and runs
        // even where the file keeps it under a profile.
        labels_mut(svc)?.insert(inject::compose::LABEL_INJECT.into(), "false".into());
        svc.remove("profiles");
    }
    // Taken once its labels are set: an added instance lets the DNS ways'
    // plaintext in like the others. By hand, its sidecars come along.
    let mut template = vec![last.clone()];
    if by_hand {
        template.extend(joins(services, &last));
    }
    let mut pods = BTreeMap::new();
    for added in sc.added() {
        let mut members = Vec::new();
        for from in &template {
            let svc = services.get(from.as_str()).context("the last instance")?;
            let name = from.replacen(&last, added, 1);
            let mut svc = renamed(svc, &last, added);
            // lab-app's and the sidecar's `web-3` become `web-4`.
            if let (Some(a), Some(b)) = (last.strip_prefix(&o.alias), added.strip_prefix(&o.alias))
            {
                let (dashed_a, dashed_b) = (format!("{}-{a}", o.alias), format!("{}-{b}", o.alias));
                svc = renamed(&svc, &dashed_a, &dashed_b);
            }
            let Some(m) = svc.as_mapping_mut() else {
                bail!("{file}: services.{from}: not a mapping");
            };
            m.remove("container_name");
            m.remove("ports");
            m.insert(
                "profiles".into(),
                Value::Sequence(vec![ADDED_PROFILE.into()]),
            );
            if name == added && inject::compose::label(m, LABEL_UNHEALTHY).is_some() {
                unhealthy.push(added.to_string());
            }
            services.insert(name.clone().into(), svc);
            members.push(name);
        }
        if by_hand {
            pods.insert(added.to_string(), Pod { members });
        }
    }
    if by_hand {
        for i in instances.iter().chain(has_client.then_some(&o.client)) {
            let mut members = vec![i.clone()];
            members.extend(joins(services, i));
            pods.insert(i.clone(), Pod { members });
        }
    }
    // By hand, the mesh way calls the client sidecar's Host-routed listener.
    let mesh_front = by_hand
        .then(|| {
            pods.get(&o.client)?.members.iter().find_map(|m| {
                let addr = flag_value(services.get(m.as_str())?.as_mapping()?, "--outbound")?;
                let port = addr.rsplit(':').next()?.to_string();
                Some(format!("127.0.0.1:{port}"))
            })
        })
        .flatten();
    if by_hand && mesh_front.is_none() {
        bail!(
            "{file}: services.{}: its sidecar has no --outbound listener for the mesh way",
            o.client
        );
    }
    // Variables the file needs and has no default for: join tokens.
    let secrets: Vec<(String, String)> = regex::Regex::new(r"\$\{(WAYFINDER_[A-Z_]*TOKEN)[:?}]")
        .map(|re| {
            let mut names: Vec<String> = re
                .captures_iter(&original)
                .map(|c| c[1].to_string())
                .collect();
            names.sort();
            names.dedup();
            names
                .into_iter()
                .map(|n| (n, inject::secrets::fresh()))
                .collect()
        })
        .unwrap_or_default();
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
    let derived = inject::yaml11::to_string(&Value::Mapping(doc))
        .with_context(|| format!("{file}: writing the derived file"))?;
    let (text, service, mesh_services) = if by_hand {
        (derived, o.alias.clone(), Default::default())
    } else {
        let injected = inject::inject(&derived, &opts).map_err(anyhow::Error::from)?;
        let service = injected
            .meshed
            .iter()
            .find(|m| m.compose == instances[0])
            .map(|m| m.service.clone())
            .context("the instances were not meshed")?;
        let mesh_services = injected.mesh_services();
        (injected.text, service, mesh_services)
    };
    let mut plain: Vec<String> = Vec::new();
    if let Ok(Value::Mapping(doc)) = serde_yaml_ng::from_str::<Value>(&text)
        && let Some(Value::Mapping(services)) = doc.get("services")
    {
        for (name, svc) in services {
            if let (Some(name), None) = (name.as_str(), svc.get("profiles")) {
                plain.push(name.to_string());
            }
        }
    }
    Ok(Derived {
        text,
        service,
        started: plain,
        mesh_services,
        instances,
        network,
        network_named,
        port,
        nginx_port,
        unhealthy,
        pods,
        control: control.unwrap_or_else(|| "wayfinder-control".into()),
        mesh_front,
        secrets,
        by_hand,
        has_client,
    })
}

/// An instance's containers by compose service, the one owning the
/// network namespace first (the order they start in).
#[derive(Debug, Clone, PartialEq)]
pub struct Pod {
    /// Owner first, then those joining it.
    pub members: Vec<String>,
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

/// `docker ARGS` with `input` on its stdin.
async fn docker_with_input(args: &[&str], input: &str) -> Result<String> {
    use tokio::io::AsyncWriteExt;
    let mut child = tokio::process::Command::new("docker")
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .context("running docker")?;
    let mut stdin = child.stdin.take().context("docker's stdin")?;
    stdin.write_all(input.as_bytes()).await?;
    drop(stdin);
    let out = child.wait_with_output().await?;
    if !out.status.success() {
        bail!(
            "docker {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// Does what label `key` of `container` says: `POST /path` (or `GET`) is
/// sent from here to the instance at `addr` (an image with no shell, such
/// as lab-app's); anything else is a shell command run in the container.
async fn exec_label(container: &str, key: &str, addr: Option<SocketAddr>) -> Result<()> {
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
    if let Some((method @ ("POST" | "GET"), path)) = cmd.split_once(' ') {
        let addr = addr.context("the instance's address is not known")?;
        let (status, body) = super::http(addr, method, path.trim()).await?;
        anyhow::ensure!(status < 300, "{method} {path} answered {status}: {body}");
        return Ok(());
    }
    docker(&["exec", container, "sh", "-c", &cmd])
        .await
        .map(drop)
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
    /// The run's join tokens, deleted with the lab.
    secrets: PathBuf,
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
        // The lab is gone, and its join tokens are of no use: not left in
        // a report directory people share.
        let _ = std::fs::remove_dir_all(&self.secrets);
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

    /// Adds the hedged way's route to the service's policy, with wfctl in
    /// the control plane's container (it holds the operator's credential):
    /// `policy get`, the route added, `policy apply` from stdin. The policy
    /// lives in the lab's control plane and goes with it.
    async fn add_hedged_route(&self) -> Result<()> {
        let id = self.ids(&[&self.derived.control]).await?;
        let service = self.derived.service.as_str();
        let got = match docker(&["exec", &id[0], "wfctl", "policy", "get", service]).await {
            Ok(text) => text,
            Err(e) if format!("{e:#}").contains("has no policy") => String::new(),
            Err(e) => return Err(e.context(format!("reading {service}'s policy"))),
        };
        let text = super::hedging::add_to_file(&got, service)?;
        docker_with_input(
            &[
                "exec",
                "-i",
                &id[0],
                "wfctl",
                "policy",
                "apply",
                "/dev/stdin",
            ],
            &text,
        )
        .await
        .context("adding the hedged way's route")?;
        Ok(())
    }

    /// The pid of the container owning `instance`'s network namespace.
    async fn netns_pid(&self, instance: &str) -> Result<String> {
        let owner = self.derived.pod(instance).members[0].clone();
        let id = self.ids(&[&owner]).await?;
        docker(&["inspect", "-f", "{{.State.Pid}}", &id[0]]).await
    }

    /// The containers of `instance`'s pod, the namespace's owner first.
    async fn pod_ids(&self, instance: &str) -> Result<Vec<String>> {
        let pod = self.derived.pod(instance);
        let members: Vec<&str> = pod.members.iter().map(String::as_str).collect();
        self.ids(&members).await
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
        let addr = self
            .address(instance)
            .parse::<std::net::IpAddr>()
            .ok()
            .map(|ip| SocketAddr::new(ip, self.derived.port));
        let result = exec_label(&id[0], key, addr).await;
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
    fn come_back(&mut self, instance: &str, containers: Option<Vec<String>>) {
        let compose = (self.compose[0].clone(), self.args(&[]), self.env.clone());
        let (addresses, instance) = (self.addresses.clone(), instance.to_string());
        let project = self.project.clone();
        let members = self.derived.pod(&instance).members;
        let task = tokio::spawn(async move {
            let owner = members[0].clone();
            let started = async {
                let owner = match containers {
                    Some(ids) => {
                        let Some((first, rest)) = ids.split_first() else {
                            bail!("no containers");
                        };
                        docker(&["start", first]).await?;
                        // Once the owner is ready (healthy, where it has a
                        // check), as compose's service_healthy waits.
                        let deadline = Instant::now() + Duration::from_secs(60);
                        let health =
                            "{{if .State.Health}}{{.State.Health.Status}}{{else}}healthy{{end}}";
                        while docker(&["inspect", "-f", health, first]).await? != "healthy" {
                            if Instant::now() > deadline {
                                bail!("{owner} not healthy within 60 s");
                            }
                            tokio::time::sleep(Duration::from_millis(100)).await;
                        }
                        for id in rest {
                            docker(&["start", id]).await?;
                        }
                        first.clone()
                    }
                    None => {
                        let (program, mut args, env) = compose;
                        args.extend(["up", "-d", "--no-deps"].map(String::from));
                        args.extend(members.iter().cloned());
                        output(&program, &args, &env).await?;
                        container_ids(&project, &owner)
                            .await?
                            .into_iter()
                            .next()
                            .with_context(|| format!("no {owner} container"))?
                    }
                };
                anyhow::Ok(owner)
            };
            match started.await {
                Ok(owner) => {
                    let ip = ips(&owner).await;
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
        match &event.action {
            Action::Kill => {
                let ids = self.pod_ids(t).await?;
                let mut args = vec!["kill"];
                args.extend(ids.iter().map(String::as_str));
                docker(&args).await?;
            }
            // The whole instance, sidecar too: a hung host, not a hung app
            // its sidecar could report.
            Action::Pause => {
                let ids = self.pod_ids(t).await?;
                let mut args = vec!["pause"];
                args.extend(ids.iter().map(String::as_str));
                docker(&args).await?;
            }
            Action::Resume => {
                if let Some((cycle, _)) = self.freezing.remove(t) {
                    cycle.abort();
                }
                for id in self.pod_ids(t).await? {
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
                let ids = self.pod_ids(t).await?;
                let mut kill = vec!["kill"];
                kill.extend(ids.iter().map(String::as_str));
                let _ = docker(&kill).await;
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
                self.come_back(t, Some(ids));
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
                let id = self.ids(&[&self.derived.control]).await?;
                docker(&["kill", &id[0]]).await?;
            }
            Action::ControlUp => {
                let id = self.ids(&[&self.derived.control]).await?;
                docker(&["start", &id[0]]).await?;
            }
            // wfctl inside the control plane's container holds the
            // operator's credential: the lab never handles it.
            Action::Fault(f) => {
                let id = self.ids(&[&self.derived.control]).await?;
                let service = self.derived.service.clone();
                let mut args: Vec<String> = ["exec", &id[0], "wfctl", "fault", "inject", &service]
                    .map(String::from)
                    .to_vec();
                if !t.is_empty() {
                    // An injected instance's id is its compose name.
                    args.extend(["--instance".into(), t.to_string()]);
                }
                match f.effect {
                    crate::traffic::fault::Effect::Abort(status) => {
                        args.extend(["--abort".into(), status.to_string()]);
                    }
                    crate::traffic::fault::Effect::Delay(d) => {
                        args.extend(["--delay".into(), format!("{}ms", d.as_millis())]);
                    }
                    crate::traffic::fault::Effect::Reset => args.push("--reset".into()),
                }
                args.extend(["--percent".into(), f.percent.to_string()]);
                let args: Vec<&str> = args.iter().map(String::as_str).collect();
                docker(&args).await?;
            }
            Action::FaultClear => {
                let id = self.ids(&[&self.derived.control]).await?;
                let service = self.derived.service.clone();
                docker(&["exec", &id[0], "wfctl", "fault", "clear", &service]).await?;
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
    let file = o.compose.display();
    if cfg.ways.iter().any(|w| w.is_mesh()) && !derived.has_client {
        bail!(
            "{file}: services.{}: no such service: the mesh ways call from it (--client, or leave mesh and mesh+hedging out of --ways)",
            o.client
        );
    }
    if cfg.ways.contains(&Way::Nginx) && derived.nginx_port.is_none() {
        bail!(
            "{file}: services.{}: no such service: the nginx way calls it (--nginx-service, or leave nginx out of --ways)",
            o.nginx
        );
    }
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
    if !derived.by_hand {
        let tokens = inject::secrets::tokens(&secrets, &derived.mesh_services)?;
        inject::secrets::write(&secrets, &tokens)?;
    }
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
            (
                "WAYFINDER_CLIENT_PORT".into(),
                super::free_port()?.to_string(),
            ),
        ]
        .into_iter()
        .chain(derived.secrets.iter().cloned())
        .collect(),
        dashboard: SocketAddr::from(([127, 0, 0, 1], dashboard)),
        derived: derived.clone(),
        image: o.image.clone(),
        keep: o.keep,
        loads: Vec::new(),
        addresses: Default::default(),
        pending: Vec::new(),
        freezing: Default::default(),
        notes: Vec::new(),
        secrets: secrets.clone(),
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
        let owner = lab.pod_ids(i).await?;
        let ip = ips(&owner[0]).await;
        if let Ok(mut a) = lab.addresses.lock() {
            a.insert(i.clone(), ip);
        }
    }
    if cfg.ways.contains(&Way::MeshHedging) {
        lab.add_hedged_route().await?;
    }
    eprintln!("== up in {:.0} s", up.elapsed().as_secs_f64());

    let start = SystemTime::now() + Duration::from_secs(8);
    let samples = Samples::default();
    let mut loads = Vec::new();
    let plain: Vec<Way> = cfg.ways.iter().copied().filter(|w| !w.is_mesh()).collect();
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
    let meshed: Vec<Way> = cfg.ways.iter().copied().filter(|w| w.is_mesh()).collect();
    if !meshed.is_empty() {
        let owner = lab.pod_ids(&o.client).await?;
        let front = derived
            .mesh_front
            .clone()
            .unwrap_or_else(|| format!("{}:{}", derived.service, derived.port));
        let fronts = meshed
            .iter()
            .map(|w| format!("{}={front}", w.key()))
            .collect();
        let load = Load {
            name: "load-mesh",
            network: format!("container:{}", owner[0]),
            ways: meshed,
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
    let (meshed, mesh_way, plaintext) = if derived.by_hand {
        (
            "which runs Wayfinder by hand (sidecars joining their app's network namespace), as it is",
            format!(
                "the mesh way in the network namespace of `{}`, through its sidecar's Host-routed listener",
                o.client
            ),
            "the DNS ways reach the apps' own ports",
        )
    } else {
        (
            "meshed by `wfctl inject` as `lab.yaml` here shows",
            format!(
                "the mesh way in the network namespace of `{}`, where its sidecar captures the calls",
                o.client
            ),
            "the instances' sidecars let the DNS ways' plaintext through",
        )
    };
    let mut notes = vec![format!(
        "Containers of `{}` (project `{}`), {meshed}: the load runs in containers of the \
         Wayfinder image, the DNS and nginx ways on the lab's network (names through Docker's \
         resolver at 127.0.0.11), {mesh_way}. {} stays out of the mesh (its static upstream, as \
         people run it); {plaintext}. Every event acts on an instance with its sidecar: kill is \
         SIGKILL, pause `docker pause`, restart a kill and a start on a new IP (a placeholder \
         container holds the old one, which refuses connections from then on), slow `tc netem` \
         in its namespace, unhealthy what its {LABEL_UNHEALTHY} label says; control-down kills \
         the control plane's container, control-up starts it again.",
        o.compose.display(),
        o.project,
        o.nginx
    )];
    if cfg.ways.contains(&Way::MeshHedging) {
        notes.push(super::hedging::note(&derived.service));
    }
    notes.append(&mut lab.notes);
    drop(lab);
    let setting = super::report::Setting {
        place: "on Docker".into(),
        scenario: &cfg.scenario,
        notes,
    };
    super::report::write(&cfg.out, &setting, &run)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn options(compose: &str) -> Options {
        Options {
            compose: Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("..")
                .join(compose),
            project: "t".into(),
            alias: "web".into(),
            client: "client".into(),
            nginx: "nginx".into(),
            image: "wayfinder:lab".into(),
            keep: false,
        }
    }

    fn derived(compose: &str) -> Derived {
        let o = options(compose);
        let text = std::fs::read_to_string(&o.compose).expect("compose file");
        derive(&text, &o, &Scenario::default_scenario(), "/tmp/s").expect("derives")
    }

    fn service<'a>(doc: &'a Value, name: &str) -> &'a Value {
        &doc["services"][name]
    }

    #[test]
    fn the_classic_lab_is_meshed_with_plaintext_in_and_web4_under_a_profile() {
        let d = derived("examples/classic-lab/compose.yaml");
        assert!(!d.by_hand);
        assert_eq!(d.instances, ["web1", "web2", "web3"]);
        assert_eq!(
            (d.service.as_str(), d.port, d.network.as_str()),
            ("web", 80, "default")
        );
        assert_eq!(d.control, "wayfinder-control");
        assert_eq!(d.pod("web2").members, ["web2-sidecar", "web2"]);
        assert_eq!(d.mesh_front, None, "captured by the client's sidecar");
        assert_eq!(d.unhealthy, ["web1", "web2", "web3", "web4"]);
        let doc: Value = serde_yaml_ng::from_str(&d.text).expect("yaml");
        for sidecar in ["web1-sidecar", "web4-sidecar"] {
            let cmd = format!("{:?}", service(&doc, sidecar)["command"]);
            assert!(cmd.contains("permissive"), "{sidecar}: {cmd}");
        }
        for added in ["web4", "web4-sidecar"] {
            assert_eq!(
                service(&doc, added)["profiles"][0].as_str(),
                Some(ADDED_PROFILE),
                "{added}"
            );
        }
        assert_eq!(
            service(&doc, "web4")["hostname"].as_str(),
            None,
            "the sidecar has it"
        );
        assert_eq!(
            service(&doc, "web4-sidecar")["hostname"].as_str(),
            Some("web4")
        );
        // nginx is left out of the mesh; web4 is not started by `up`.
        assert!(doc["services"].get("nginx-sidecar").is_none());
        assert!(d.started.contains(&"nginx".to_string()));
        assert!(!d.started.iter().any(|s| s.starts_with("web4")));
        assert!(d.secrets.is_empty());
    }

    #[test]
    fn a_lab_meshed_by_hand_is_taken_as_it_is() {
        let d = derived("deploy/compose.yaml");
        assert!(d.by_hand);
        assert_eq!(d.instances, ["web1", "web2", "web3"]);
        assert_eq!((d.service.as_str(), d.port), ("web", 8080));
        assert_eq!(d.control, "control");
        assert_eq!(d.pod("web1").members, ["web1", "web1-proxy"]);
        assert_eq!(d.pod("client").members, ["client", "client-proxy"]);
        assert_eq!(d.pod("web4").members, ["web4", "web4-proxy"]);
        assert_eq!(d.mesh_front.as_deref(), Some("127.0.0.1:15080"));
        let names: Vec<&str> = d.secrets.iter().map(|(k, _)| k.as_str()).collect();
        assert_eq!(names, ["WAYFINDER_CLIENT_TOKEN", "WAYFINDER_WEB_TOKEN"]);
        assert!(d.secrets.iter().all(|(_, v)| v.len() == 32));
        let doc: Value = serde_yaml_ng::from_str(&d.text).expect("yaml");
        // web4 and its sidecar, renamed from web3's.
        let cmd = format!("{:?}", service(&doc, "web4-proxy")["command"]);
        assert!(cmd.contains("web-4") && !cmd.contains("web-3"), "{cmd}");
        assert_eq!(
            service(&doc, "web4-proxy")["network_mode"].as_str(),
            Some("service:web4")
        );
        assert_eq!(service(&doc, "web4")["hostname"].as_str(), Some("web4"));
        // nginx runs although the file keeps it under a profile.
        assert!(service(&doc, "nginx").get("profiles").is_none());
        assert!(d.started.contains(&"nginx".to_string()));
        assert!(!d.started.contains(&"jaeger".to_string()));
    }
}
