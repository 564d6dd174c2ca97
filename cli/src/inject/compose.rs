//! The compose rewrite itself: which services are meshed, under which mesh
//! names, and the sidecar, control plane and Jaeger services added for
//! them. Pure: YAML text in, YAML text out.

use std::collections::{BTreeMap, BTreeSet};

use serde_yaml_ng::{Mapping, Value};

use super::InjectError;

/// The label that keeps a service out of the mesh (`"false"`).
pub const LABEL_INJECT: &str = "wayfinder.io/inject";
/// The label naming the mesh service (default: shared alias or compose name).
pub const LABEL_SERVICE: &str = "wayfinder.io/service";
/// The label naming the app's port (default: expose, ports, else 80).
pub const LABEL_PORT: &str = "wayfinder.io/port";
/// The label that marks a one-shot service (`"true"`), as `restart: "no"` does.
pub const LABEL_JOB: &str = "wayfinder.io/job";
/// The label that lets plaintext callers outside the mesh in (`permissive`).
pub const LABEL_INBOUND: &str = "wayfinder.io/inbound";

/// The key holding what `--remove` needs.
const STATE_KEY: &str = "x-wayfinder";
/// The sidecar service's name: `<service>` + this.
const SIDECAR_SUFFIX: &str = "-sidecar";
/// The control plane's service name (and TLS name).
const CONTROL: &str = "wayfinder-control";
/// Jaeger's service name, under the `tracing` profile.
const JAEGER: &str = "wayfinder-jaeger";
const IMAGE: &str = "${WAYFINDER_IMAGE:-wayfinder:lab}";
const JAEGER_IMAGE: &str = "${WAYFINDER_JAEGER_IMAGE:-jaegertracing/all-in-one:1.62.0}";
const TRUST_VOLUME: &str = "wayfinder-trust";
const DATA_VOLUME: &str = "wayfinder-control-data";
const TRUST_DIR: &str = "/var/lib/wayfinder/trust";
/// Ports the sidecar listens on inside the namespace.
const INBOUND_PORT: u16 = 15006;
const TRANSPARENT_PORT: u16 = 15001;
const ADMIN_PORT: u16 = 15000;

/// Service keys that stay with the app unchanged.
const APP_KEYS: &[&str] = &[
    "annotations",
    "attach",
    "build",
    "cap_add",
    "cap_drop",
    "cgroup_parent",
    "command",
    "configs",
    "container_name",
    "cpu_count",
    "cpu_percent",
    "cpu_period",
    "cpu_quota",
    "cpu_rt_period",
    "cpu_rt_runtime",
    "cpu_shares",
    "cpus",
    "cpuset",
    "depends_on",
    "deploy",
    "device_cgroup_rules",
    "devices",
    "entrypoint",
    "env_file",
    "environment",
    "group_add",
    "healthcheck",
    "image",
    "init",
    "ipc",
    "isolation",
    "labels",
    "logging",
    "mem_limit",
    "mem_reservation",
    "mem_swappiness",
    "memswap_limit",
    "oom_kill_disable",
    "oom_score_adj",
    "pid",
    "pids_limit",
    "platform",
    "privileged",
    "profiles",
    "pull_policy",
    "read_only",
    "restart",
    "runtime",
    "secrets",
    "security_opt",
    "shm_size",
    "stdin_open",
    "stop_grace_period",
    "stop_signal",
    "storage_opt",
    "sysctls",
    "tmpfs",
    "tty",
    "ulimits",
    "user",
    "userns_mode",
    "volumes",
    "volumes_from",
    "working_dir",
];

/// Service keys that belong to the network namespace: they move to the
/// sidecar, which owns it (Docker refuses them beside `network_mode`).
const NAMESPACE_KEYS: &[&str] = &[
    "networks",
    "ports",
    "hostname",
    "domainname",
    "dns",
    "dns_opt",
    "dns_search",
    "extra_hosts",
    "expose",
    "links",
    "mac_address",
];

/// What the caller chose.
#[derive(Debug, Clone, Default)]
pub struct Options {
    /// The file's name, for messages.
    pub file: String,
    /// Mesh only these compose services (empty: all that can be).
    pub only: Vec<String>,
    /// Never mesh these.
    pub skip: Vec<String>,
    /// The directory of the per-service env files, relative to the
    /// compose file (`./lab.wayfinder`).
    pub secrets_dir: String,
}

/// One meshed compose service.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Meshed {
    /// Its compose name.
    pub compose: String,
    /// The mesh service it is an instance of.
    pub service: String,
    /// Its instance id.
    pub instance: String,
    /// The app's port, when it serves.
    pub port: Option<u16>,
}

/// The meshed file and what went into it.
#[derive(Debug, Clone)]
pub struct Injected {
    /// The compose text.
    pub text: String,
    /// The meshed services, in file order.
    pub meshed: Vec<Meshed>,
    /// Services left alone, and why (for stderr).
    pub warnings: Vec<String>,
}

impl Injected {
    /// The mesh services that need a join token.
    pub fn mesh_services(&self) -> BTreeSet<String> {
        self.meshed.iter().map(|m| m.service.clone()).collect()
    }
}

fn err(o: &Options, at: impl Into<String>, message: impl Into<String>) -> InjectError {
    InjectError::Compose {
        file: o.file.clone(),
        at: at.into(),
        message: message.into(),
    }
}

/// The compose document (merge keys applied), or why it is not one.
pub(crate) fn parse(text: &str, o: &Options) -> Result<Mapping, InjectError> {
    let mut doc: Value = serde_yaml_ng::from_str(text).map_err(|e| InjectError::Yaml {
        file: o.file.clone(),
        message: e.to_string(),
    })?;
    doc.apply_merge().map_err(|e| InjectError::Yaml {
        file: o.file.clone(),
        message: e.to_string(),
    })?;
    match doc {
        Value::Mapping(m) if m.get("services").is_some_and(Value::is_mapping) => Ok(m),
        _ => Err(err(
            o,
            "services",
            "not a compose file: no top-level `services` mapping",
        )),
    }
}

/// The original text of an injected file, with the options it was
/// injected with; `None` for a file not injected.
fn previous(doc: &Mapping, o: &Options) -> Result<Option<(String, Options)>, InjectError> {
    let Some(state) = doc.get(STATE_KEY) else {
        return Ok(None);
    };
    let field = |k: &str| state.get(k);
    let list = |k: &str| -> Vec<String> {
        field(k)
            .and_then(Value::as_sequence)
            .map(|s| {
                s.iter()
                    .filter_map(|v| v.as_str().map(String::from))
                    .collect()
            })
            .unwrap_or_default()
    };
    let original = field("original").and_then(Value::as_str).ok_or_else(|| {
        err(
            o,
            format!("{STATE_KEY}.original"),
            "missing: the file was edited after inject; restore it or inject the original",
        )
    })?;
    let secrets_dir = field("secrets")
        .and_then(Value::as_str)
        .unwrap_or(&o.secrets_dir)
        .to_string();
    Ok(Some((
        original.replace("$$", "$"),
        Options {
            file: o.file.clone(),
            only: list("only"),
            skip: list("skip"),
            secrets_dir,
        },
    )))
}

/// Meshes `text`. A file injected before is injected again from its
/// original (the same options give the same file), once it is checked to
/// be unedited since.
pub fn inject(text: &str, o: &Options) -> Result<Injected, InjectError> {
    let doc = parse(text, o)?;
    match previous(&doc, o)? {
        Some((original, before)) => {
            unedited(text, &original, &before)?;
            inject_original(&original, o)
        }
        None => inject_original(text, o),
    }
}

/// The original of an injected file, checked to be unedited since inject.
pub fn remove(text: &str, o: &Options) -> Result<String, InjectError> {
    let doc = parse(text, o)?;
    let Some((original, before)) = previous(&doc, o)? else {
        return Err(err(
            o,
            STATE_KEY,
            "not injected by wfctl (no x-wayfinder key): nothing to remove",
        ));
    };
    unedited(text, &original, &before)?;
    Ok(original)
}

/// Refuses a meshed file edited by hand after inject: `--remove` would
/// lose the edits silently.
fn unedited(text: &str, original: &str, before: &Options) -> Result<(), InjectError> {
    let again = inject_original(original, before)?;
    let (now, then) = (parse(text, before)?, parse(&again.text, before)?);
    match first_difference(&Value::Mapping(now), &Value::Mapping(then), "") {
        None => Ok(()),
        Some(at) => Err(err(
            before,
            at,
            "edited after `wfctl inject`: make the change in the original \
             (`wfctl inject --remove`), then inject again",
        )),
    }
}

/// The path of the first place two documents differ.
fn first_difference(a: &Value, b: &Value, at: &str) -> Option<String> {
    let join = |k: &str| {
        if at.is_empty() {
            k.to_string()
        } else {
            format!("{at}.{k}")
        }
    };
    match (a, b) {
        (Value::Mapping(x), Value::Mapping(y)) => {
            for (k, v) in x {
                let key = k.as_str().map_or_else(|| format!("{k:?}"), String::from);
                match y.get(k) {
                    Some(w) => {
                        if let Some(d) = first_difference(v, w, &join(&key)) {
                            return Some(d);
                        }
                    }
                    None => return Some(join(&key)),
                }
            }
            y.keys()
                .find(|k| !x.contains_key(*k))
                .map(|k| join(k.as_str().unwrap_or("?")))
        }
        _ if a == b => None,
        _ => Some(if at.is_empty() {
            "(top)".into()
        } else {
            at.into()
        }),
    }
}

/// How a service is treated.
enum Plan {
    /// Meshed, with its networks (and aliases) and published TCP ports,
    /// read once.
    Mesh {
        nets: Vec<(String, Vec<String>)>,
        ports: Vec<u16>,
    },
    Leave(String),
}

fn inject_original(text: &str, o: &Options) -> Result<Injected, InjectError> {
    let doc = parse(text, o)?;
    let services = doc
        .get("services")
        .and_then(Value::as_mapping)
        .cloned()
        .unwrap_or_default();
    for name in o.only.iter().chain(&o.skip) {
        if !services.contains_key(name.as_str()) {
            return Err(err(
                o,
                format!("services.{name}"),
                "named by --only/--skip, but there is no such service",
            ));
        }
    }

    // Which services are meshed, and the aliases each answers to.
    let mut plans = Vec::new();
    for (k, v) in &services {
        let name = k
            .as_str()
            .ok_or_else(|| err(o, "services", format!("service name {k:?} is not a string")))?;
        let svc = v
            .as_mapping()
            .ok_or_else(|| err(o, format!("services.{name}"), "a service must be a mapping"))?;
        plans.push((name.to_string(), svc.clone(), plan(name, svc, o)?));
    }
    let mut alias_users: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for (name, _, p) in &plans {
        if let Plan::Mesh { nets, .. } = p {
            for a in nets.iter().flat_map(|(_, aliases)| aliases) {
                alias_users
                    .entry(a.clone())
                    .or_default()
                    .insert(name.clone());
            }
        }
    }

    let mut out = Mapping::new();
    for (k, v) in &doc {
        let key = k.as_str().unwrap_or_default();
        match key {
            "services" | "volumes" => {}
            "version" | "name" | "networks" | "configs" | "secrets" => {
                out.insert(k.clone(), v.clone());
            }
            _ if key.starts_with("x-") => {
                out.insert(k.clone(), v.clone());
            }
            // Services from other files would stay unmeshed, unsaid.
            "include" => {
                return Err(err(
                    o,
                    key,
                    "services from other files: merge them first (docker compose config)",
                ));
            }
            _ => return Err(err(o, key, "a top-level key inject does not know")),
        }
    }
    let meshed_names: BTreeSet<String> = plans
        .iter()
        .filter(|(_, _, p)| matches!(p, Plan::Mesh { .. }))
        .map(|(n, _, _)| n.clone())
        .collect();
    let meshes = |app: &str| meshed_names.contains(app);
    let mut new_services = Mapping::new();
    let mut meshed = Vec::new();
    let mut warnings = Vec::new();
    let mut control_networks = BTreeSet::new();
    for (name, svc, p) in plans {
        let (nets, ports) = match p {
            Plan::Mesh { nets, ports } => (nets, ports),
            Plan::Leave(why) => {
                let mut svc = svc;
                let joins = svc
                    .get("network_mode")
                    .and_then(Value::as_str)
                    .and_then(|m| m.strip_prefix("service:"))
                    .filter(|app| meshes(app))
                    .map(String::from);
                match joins {
                    // The namespace it joined now belongs to the app's sidecar.
                    Some(app) => {
                        svc.insert(
                            "network_mode".into(),
                            format!("service:{app}{SIDECAR_SUFFIX}").into(),
                        );
                        warnings.push(format!(
                        "{}: {name} shares {app}'s network namespace: its traffic goes through {app}'s sidecar",
                        o.file
                    ));
                    }
                    None => warnings.push(format!("{}: {name} is not meshed: {why}", o.file)),
                }
                new_services.insert(name.into(), Value::Mapping(svc));
                continue;
            }
        };
        let sidecar = format!("{name}{SIDECAR_SUFFIX}");
        if services.contains_key(sidecar.as_str()) {
            return Err(err(
                o,
                format!("services.{sidecar}"),
                format!("the name inject gives {name}'s sidecar is taken"),
            ));
        }
        let m = describe(&name, &svc, &nets, &ports, &alias_users, o)?;
        control_networks.extend(nets.iter().map(|(n, _)| n.clone()));
        let (app, side) = split(&name, &svc, &m, &nets, &ports, o)?;
        new_services.insert(name.clone().into(), Value::Mapping(app));
        new_services.insert(sidecar.into(), Value::Mapping(side));
        meshed.push(m);
    }
    if meshed.is_empty() {
        return Err(err(
            o,
            "services",
            "no service can be meshed (see the warnings above)",
        ));
    }
    for name in [CONTROL, JAEGER] {
        if services.contains_key(name) {
            return Err(err(
                o,
                format!("services.{name}"),
                "inject adds a service of this name; rename yours",
            ));
        }
    }
    new_services.insert(CONTROL.into(), control(&control_networks, o));
    new_services.insert(JAEGER.into(), jaeger(&control_networks));
    out.insert("services".into(), Value::Mapping(new_services));

    let mut volumes = doc
        .get("volumes")
        .and_then(Value::as_mapping)
        .cloned()
        .unwrap_or_default();
    for v in [DATA_VOLUME, TRUST_VOLUME] {
        if volumes.contains_key(v) {
            return Err(err(
                o,
                format!("volumes.{v}"),
                "inject adds a volume of this name; rename yours",
            ));
        }
        volumes.insert(v.into(), Value::Mapping(Mapping::new()));
    }
    out.insert("volumes".into(), Value::Mapping(volumes));

    let mut state = Mapping::new();
    state.insert("generated-by".into(), "wfctl inject".into());
    state.insert("secrets".into(), o.secrets_dir.clone().into());
    state.insert("only".into(), strings(&o.only));
    state.insert("skip".into(), strings(&o.skip));
    // Escaped as compose escapes `$`: compose v2 interpolates x- keys too.
    state.insert("original".into(), text.replace('$', "$$").into());
    out.insert(STATE_KEY.into(), Value::Mapping(state));

    let body = super::yaml11::to_string(&Value::Mapping(out))
        .map_err(|e| err(o, "(output)", e.to_string()))?;
    Ok(Injected {
        text: format!(
            "# Meshed by `wfctl inject`: each service below runs beside its sidecar\n\
             # (<service>{SIDECAR_SUFFIX}). Take the mesh out with `wfctl inject --remove`.\n\
             # Join tokens: {}/ (owner-only env files; keep them out of version control).\n{body}",
            o.secrets_dir
        ),
        meshed,
        warnings,
    })
}

fn strings(v: &[String]) -> Value {
    Value::Sequence(v.iter().map(|s| s.clone().into()).collect())
}

/// A label's value, from the mapping or the `KEY=VALUE` list form; an
/// unquoted `false` or `8080` counts as its text, as compose takes it.
pub(crate) fn label(svc: &Mapping, key: &str) -> Option<String> {
    match svc.get("labels")? {
        Value::Mapping(m) => match m.get(key)? {
            Value::String(s) => Some(s.clone()),
            Value::Bool(b) => Some(b.to_string()),
            Value::Number(n) => Some(n.to_string()),
            _ => None,
        },
        Value::Sequence(s) => s.iter().filter_map(Value::as_str).find_map(|l| {
            l.strip_prefix(key)
                .and_then(|rest| rest.strip_prefix('='))
                .map(String::from)
        }),
        _ => None,
    }
}

fn plan(name: &str, svc: &Mapping, o: &Options) -> Result<Plan, InjectError> {
    if o.skip.iter().any(|s| s == name) {
        return Ok(Plan::Leave("--skip".into()));
    }
    if !o.only.is_empty() && !o.only.iter().any(|s| s == name) {
        return Ok(Plan::Leave("not in --only".into()));
    }
    if label(svc, LABEL_INJECT).as_deref() == Some("false") {
        return Ok(Plan::Leave(format!("label {LABEL_INJECT}: \"false\"")));
    }
    if let Some(mode) = svc.get("network_mode") {
        let mode = mode.as_str().unwrap_or_default();
        let why = match mode {
            "host" => {
                "it shares the host's network namespace, where a sidecar would capture every process's traffic"
            }
            "none" => "it has no network",
            // Docker's default bridge has no DNS: its sidecar could not
            // find the control plane (or anyone) by name.
            "bridge" | "default" => {
                "Docker's default bridge resolves no names; put it on a compose network to mesh it"
            }
            m if m.starts_with("service:") || m.starts_with("container:") => {
                "it joins another container's network namespace: mesh that one and it follows"
            }
            _ => "a network mode inject does not know",
        };
        return Ok(Plan::Leave(format!("network_mode {mode:?}: {why}")));
    }
    for (k, _) in svc {
        let key = k.as_str().unwrap_or_default();
        if key.starts_with("x-") || APP_KEYS.contains(&key) || NAMESPACE_KEYS.contains(&key) {
            continue;
        }
        let why = match key {
            "scale" => {
                "one sidecar per container: declare each instance as a service (web1, web2, …)"
            }
            "extends" => "resolve `extends` first (`docker-compose config`), then inject",
            "external_links" => "links to containers outside the file cannot follow the sidecar",
            _ => "a key inject does not know: it cannot tell whether the sidecar must take it",
        };
        return Err(err(o, format!("services.{name}.{key}"), why));
    }
    let replicas = svc
        .get("deploy")
        .and_then(|d| d.get("replicas"))
        .and_then(Value::as_u64);
    if replicas.is_some_and(|r| r > 1) {
        return Err(err(
            o,
            format!("services.{name}.deploy.replicas"),
            "one sidecar per container: declare each instance as a service (web1, web2, …)",
        ));
    }
    for key in ["command", "entrypoint"] {
        let runs = |what: &str| match svc.get(key) {
            Some(Value::String(s)) => s.split_whitespace().next() == Some(what),
            Some(Value::Sequence(s)) => s.first().and_then(Value::as_str) == Some(what),
            _ => false,
        };
        if runs("wf-control") || runs("wf-proxy") {
            return Err(err(
                o,
                format!("services.{name}.{key}"),
                "this file runs Wayfinder already (meshed by hand): inject works on files without it",
            ));
        }
    }
    Ok(Plan::Mesh {
        nets: networks(name, svc, o)?,
        ports: published(name, svc, o)?,
    })
}

/// The service's networks, each with its aliases (the compose name and
/// container name included: they resolve to the sidecar once it owns the
/// namespace).
pub(crate) fn networks(
    name: &str,
    svc: &Mapping,
    o: &Options,
) -> Result<Vec<(String, Vec<String>)>, InjectError> {
    let at = format!("services.{name}.networks");
    let mut out = Vec::new();
    match svc.get("networks") {
        None => out.push(("default".to_string(), Vec::new())),
        Some(Value::Sequence(s)) => {
            for n in s {
                let n = n
                    .as_str()
                    .ok_or_else(|| err(o, &at, "network names must be strings"))?;
                out.push((n.to_string(), Vec::new()));
            }
        }
        Some(Value::Mapping(m)) => {
            for (k, v) in m {
                let n = k
                    .as_str()
                    .ok_or_else(|| err(o, &at, "network names must be strings"))?;
                let aliases = match v.get("aliases") {
                    None => Vec::new(),
                    Some(Value::Sequence(a)) => a
                        .iter()
                        .map(|x| {
                            x.as_str().map(String::from).ok_or_else(|| {
                                err(o, format!("{at}.{n}.aliases"), "aliases must be strings")
                            })
                        })
                        .collect::<Result<_, _>>()?,
                    Some(_) => {
                        return Err(err(o, format!("{at}.{n}.aliases"), "expected a list"));
                    }
                };
                out.push((n.to_string(), aliases));
            }
        }
        Some(_) => return Err(err(o, at, "expected a list or a mapping")),
    }
    Ok(out)
}

/// A port number from `80`, `"80"`, `"80/tcp"`.
fn port_number(v: &Value) -> Option<u16> {
    match v {
        Value::Number(n) => n.as_u64().and_then(|p| u16::try_from(p).ok()),
        Value::String(s) => s.split('/').next()?.parse().ok(),
        _ => None,
    }
}

/// Whether a port entry is UDP or SCTP (`"53:53/udp"`, `{protocol: udp}`):
/// not the app's TCP port, and nothing the sidecar captures.
fn not_tcp(v: &Value) -> bool {
    match v {
        Value::String(s) => s.rsplit_once('/').is_some_and(|(_, p)| p != "tcp"),
        Value::Mapping(m) => m
            .get("protocol")
            .and_then(Value::as_str)
            .is_some_and(|p| p != "tcp"),
        _ => false,
    }
}

/// The container-side ports of `ports`: `"8088:80"`, `"127.0.0.1:8088:80/tcp"`,
/// `"80"`, `80`, `{target: 80}`.
fn published(name: &str, svc: &Mapping, o: &Options) -> Result<Vec<u16>, InjectError> {
    let mut out = Vec::new();
    let Some(ports) = svc.get("ports") else {
        return Ok(out);
    };
    let at = format!("services.{name}.ports");
    let list = ports
        .as_sequence()
        .ok_or_else(|| err(o, &at, "expected a list"))?;
    for p in list.iter().filter(|p| !not_tcp(p)) {
        let port = match p {
            Value::Mapping(m) => m.get("target").and_then(port_number),
            Value::String(s) => {
                let target = s.rsplit(':').next().unwrap_or(s);
                if target.contains('-') {
                    return Err(err(
                        o,
                        &at,
                        format!("{s:?}: port ranges are not supported by inject"),
                    ));
                }
                port_number(&Value::String(target.to_string()))
            }
            other => port_number(other),
        };
        out.push(port.ok_or_else(|| err(o, &at, format!("{p:?} is not a port mapping")))?);
    }
    Ok(out)
}

fn describe(
    name: &str,
    svc: &Mapping,
    nets: &[(String, Vec<String>)],
    ports: &[u16],
    alias_users: &BTreeMap<String, BTreeSet<String>>,
    o: &Options,
) -> Result<Meshed, InjectError> {
    let at = |k: &str| format!("services.{name}.{k}");
    let service = match label(svc, LABEL_SERVICE) {
        Some(s) => s,
        None => nets
            .iter()
            .flat_map(|(_, a)| a)
            .find(|a| alias_users.get(*a).is_some_and(|u| u.len() > 1))
            .cloned()
            .unwrap_or_else(|| name.to_string()),
    };
    wayfinder_proto::validate::service_name(&service).map_err(|e| {
        err(
            o,
            at("labels"),
            format!("{service:?} cannot be a mesh service name ({e}): set label {LABEL_SERVICE}"),
        )
    })?;
    let instance = svc
        .get("container_name")
        .and_then(Value::as_str)
        .unwrap_or(name)
        .to_string();
    let has_alias = nets.iter().any(|(_, a)| !a.is_empty());
    let port = match label(svc, LABEL_PORT).as_deref() {
        Some(p) => Some(p.parse().map_err(|_| {
            err(
                o,
                at("labels"),
                format!("{LABEL_PORT}: {p:?} is not a port"),
            )
        })?),
        None => {
            let expose = svc
                .get("expose")
                .and_then(Value::as_sequence)
                .and_then(|s| s.iter().find(|p| !not_tcp(p)))
                .and_then(port_number);
            expose
                .or(ports.first().copied())
                // Called by an alias, with no port in the file: the web's.
                .or(has_alias.then_some(80))
        }
    };
    Ok(Meshed {
        compose: name.to_string(),
        service,
        instance,
        port,
    })
}

/// The HTTP path of a compose healthcheck that fetches a local URL
/// (`wget -q -O- http://localhost/healthz`, `curl -f http://127.0.0.1:8080/ok`).
fn health_path(svc: &Mapping) -> Option<String> {
    let test = svc.get("healthcheck")?.get("test")?;
    let words: Vec<&str> = match test {
        Value::String(s) => s.split_whitespace().collect(),
        Value::Sequence(s) => s
            .iter()
            .filter_map(Value::as_str)
            .flat_map(str::split_whitespace)
            .collect(),
        _ => return None,
    };
    words.iter().find_map(|w| {
        let rest = w
            .strip_prefix("http://localhost")
            .or_else(|| w.strip_prefix("http://127.0.0.1"))?;
        let path = rest.trim_start_matches(|c: char| c == ':' || c.is_ascii_digit());
        Some(if path.starts_with('/') {
            path.to_string()
        } else {
            "/".to_string()
        })
    })
}

/// `sysctls` (mapping or `KEY=VALUE` list) split into the network
/// namespace's (`net.*`) and the rest; `None` for an empty side.
fn split_sysctls(v: &Value) -> (Option<Value>, Option<Value>) {
    let is_net = |k: &str| k.starts_with("net.");
    let nonempty = |v: Value| match &v {
        Value::Mapping(m) if m.is_empty() => None,
        Value::Sequence(s) if s.is_empty() => None,
        _ => Some(v),
    };
    match v {
        Value::Mapping(m) => {
            let (net, own): (Mapping, Mapping) = m
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .partition(|(k, _)| k.as_str().is_some_and(is_net));
            (nonempty(Value::Mapping(net)), nonempty(Value::Mapping(own)))
        }
        Value::Sequence(s) => {
            let (net, own): (Vec<Value>, Vec<Value>) = s
                .iter()
                .cloned()
                .partition(|e| e.as_str().is_some_and(is_net));
            (
                nonempty(Value::Sequence(net)),
                nonempty(Value::Sequence(own)),
            )
        }
        other => (None, Some(other.clone())),
    }
}

fn seq(items: &[&str]) -> Value {
    Value::Sequence(items.iter().map(|s| Value::from(*s)).collect())
}

/// The app (joined to its sidecar's namespace) and its sidecar.
fn split(
    name: &str,
    svc: &Mapping,
    m: &Meshed,
    nets: &[(String, Vec<String>)],
    ports: &[u16],
    o: &Options,
) -> Result<(Mapping, Mapping), InjectError> {
    let sidecar = format!("{name}{SIDECAR_SUFFIX}");
    let mut app = Mapping::new();
    let mut side = Mapping::new();
    side.insert("image".into(), IMAGE.into());
    // Root to install the capture rules, then it becomes uid 1337.
    side.insert("user".into(), "0".into());
    side.insert("cap_add".into(), seq(&["NET_ADMIN"]));
    for (k, v) in svc {
        let key = k.as_str().unwrap_or_default();
        if key == "sysctls" {
            // net.* belong to the namespace (Docker refuses them beside
            // network_mode); kernel.*, fs.* stay with the app.
            let (net, own) = split_sysctls(v);
            if let Some(net) = net {
                side.insert(k.clone(), net);
            }
            if let Some(own) = own {
                app.insert(k.clone(), own);
            }
        } else if NAMESPACE_KEYS.contains(&key) && key != "networks" {
            side.insert(k.clone(), v.clone());
        } else if key != "networks" {
            app.insert(k.clone(), v.clone());
        }
    }
    app.insert("network_mode".into(), format!("service:{sidecar}").into());
    // A job (`restart: "no"`, or the label) shares its sidecar's PID
    // namespace, so the sidecar sees it end and ends too. Not every service
    // without a restart policy: a server restarted by hand would find its
    // sidecar gone, and its namespace with it.
    let job = (svc.get("restart").and_then(Value::as_str) == Some("no")
        || label(svc, LABEL_JOB).as_deref() == Some("true"))
        && !svc.contains_key("pid");
    if job {
        app.insert("pid".into(), format!("service:{sidecar}").into());
    }
    let mut deps = match svc.get("depends_on") {
        None => Mapping::new(),
        Some(Value::Sequence(s)) => s
            .iter()
            .map(|d| {
                let mut c = Mapping::new();
                c.insert("condition".into(), "service_started".into());
                (d.clone(), Value::Mapping(c))
            })
            .collect(),
        Some(Value::Mapping(d)) => d.clone(),
        Some(_) => {
            return Err(err(
                o,
                format!("services.{name}.depends_on"),
                "expected a list or a mapping",
            ));
        }
    };
    let mut healthy = Mapping::new();
    healthy.insert("condition".into(), "service_healthy".into());
    deps.insert(sidecar.clone().into(), Value::Mapping(healthy));
    app.insert("depends_on".into(), Value::Mapping(deps));

    // The namespace's names: its networks and aliases, its compose and
    // container names (which now resolve to the sidecar).
    let mut networks = Mapping::new();
    let own = svc.get("networks").and_then(Value::as_mapping);
    for (net, aliases) in nets {
        let mut entry = own
            .and_then(|n| n.get(net.as_str()))
            .and_then(Value::as_mapping)
            .cloned()
            .unwrap_or_default();
        let mut all: Vec<String> = aliases.clone();
        for extra in [name, m.instance.as_str()] {
            if !all.iter().any(|a| a == extra) {
                all.push(extra.to_string());
            }
        }
        entry.insert(
            "aliases".into(),
            Value::Sequence(all.into_iter().map(Value::from).collect()),
        );
        networks.insert(net.clone().into(), Value::Mapping(entry));
    }
    side.insert("networks".into(), Value::Mapping(networks));

    let mut env = Mapping::new();
    env.insert(
        "WAYFINDER_CONTROL_PLANE".into(),
        format!("https://{CONTROL}:15010").into(),
    );
    env.insert(
        "WAYFINDER_CA_BUNDLE".into(),
        format!("{TRUST_DIR}/bundle.crt").into(),
    );
    env.insert(
        "OTEL_EXPORTER_OTLP_ENDPOINT".into(),
        "${OTEL_EXPORTER_OTLP_ENDPOINT:-}".into(),
    );
    side.insert("environment".into(), Value::Mapping(env));
    side.insert(
        "env_file".into(),
        Value::Sequence(vec![format!("{}/{}.env", o.secrets_dir, m.service).into()]),
    );
    side.insert(
        "volumes".into(),
        Value::Sequence(vec![format!("{TRUST_VOLUME}:{TRUST_DIR}:ro").into()]),
    );

    let mut cmd: Vec<String> = [
        "wf-proxy",
        "--capture",
        "--service",
        &m.service,
        "--instance",
        &m.instance,
        "--transparent",
        &format!("127.0.0.1:{TRANSPARENT_PORT}"),
        "--admin",
        &format!("127.0.0.1:{ADMIN_PORT}"),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    if let Some(port) = m.port {
        cmd.extend([
            "--app".into(),
            format!("127.0.0.1:{port}"),
            "--inbound".into(),
            format!("0.0.0.0:{INBOUND_PORT}"),
            "--health-check".into(),
            health_path(svc).unwrap_or_else(|| "tcp".into()),
        ]);
        // Published ports are called from outside the mesh: not captured.
        if !ports.is_empty() {
            let list: Vec<String> = ports.iter().map(u16::to_string).collect();
            cmd.extend(["--capture-exclude-inbound-port".into(), list.join(",")]);
        }
        if label(svc, LABEL_INBOUND).as_deref() == Some("permissive") {
            cmd.extend(["--inbound-mode".into(), "permissive".into()]);
        }
    }
    if job {
        cmd.push("--exit-with-app".into());
    }
    side.insert(
        "command".into(),
        Value::Sequence(cmd.into_iter().map(Value::from).collect()),
    );

    let mut check = Mapping::new();
    check.insert(
        "test".into(),
        seq(&["CMD", "wf-proxy", "await", "--timeout", "1s"]),
    );
    check.insert("interval".into(), "1s".into());
    check.insert("timeout".into(), "3s".into());
    check.insert("retries".into(), 120.into());
    side.insert("healthcheck".into(), Value::Mapping(check));
    // Its lame duck (3 s) and drain (10 s) fit before Docker's SIGKILL.
    side.insert("stop_grace_period".into(), "15s".into());
    // The sidecar's control plane; it waits for the trust bundle itself.
    side.insert("depends_on".into(), seq(&[CONTROL]));
    for key in ["restart", "profiles"] {
        if let Some(v) = svc.get(key) {
            side.insert(key.into(), v.clone());
        }
    }
    let mut labels = Mapping::new();
    labels.insert("wayfinder.io/sidecar-of".into(), name.into());
    side.insert("labels".into(), Value::Mapping(labels));
    Ok((app, side))
}

fn control(networks: &BTreeSet<String>, o: &Options) -> Value {
    let mut c = Mapping::new();
    c.insert("image".into(), IMAGE.into());
    c.insert("user".into(), "1337".into());
    c.insert(
        "command".into(),
        seq(&[
            "wf-control",
            "--grpc",
            "0.0.0.0:15010",
            "--http",
            "0.0.0.0:15014",
            "--data-dir",
            "/var/lib/wayfinder",
            "--tls-name",
            CONTROL,
            "--bundle-out",
            &format!("{TRUST_DIR}/bundle.crt"),
        ]),
    );
    let mut env = Mapping::new();
    // For `docker-compose exec wayfinder-control wfctl ...`.
    env.insert(
        "WAYFINDER_CREDENTIALS".into(),
        "/var/lib/wayfinder/operator".into(),
    );
    c.insert("environment".into(), Value::Mapping(env));
    c.insert(
        "env_file".into(),
        Value::Sequence(vec![format!("{}/control.env", o.secrets_dir).into()]),
    );
    c.insert(
        "volumes".into(),
        Value::Sequence(vec![
            format!("{DATA_VOLUME}:/var/lib/wayfinder").into(),
            format!("{TRUST_VOLUME}:{TRUST_DIR}").into(),
        ]),
    );
    c.insert(
        "ports".into(),
        seq(&["127.0.0.1:${WAYFINDER_DASHBOARD_PORT:-15014}:15014"]),
    );
    c.insert(
        "networks".into(),
        Value::Sequence(networks.iter().map(|n| n.clone().into()).collect()),
    );
    Value::Mapping(c)
}

fn jaeger(networks: &BTreeSet<String>) -> Value {
    let mut j = Mapping::new();
    j.insert("profiles".into(), seq(&["tracing"]));
    j.insert("image".into(), JAEGER_IMAGE.into());
    let mut env = Mapping::new();
    env.insert("COLLECTOR_OTLP_ENABLED".into(), "true".into());
    j.insert("environment".into(), Value::Mapping(env));
    j.insert("ports".into(), seq(&["127.0.0.1:16686:16686"]));
    j.insert(
        "networks".into(),
        Value::Sequence(networks.iter().map(|n| n.clone().into()).collect()),
    );
    Value::Mapping(j)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opts() -> Options {
        Options {
            file: "lab.yaml".into(),
            secrets_dir: "./lab.wayfinder".into(),
            ..Default::default()
        }
    }

    #[test]
    fn ports_and_paths_are_read_from_every_form() {
        let svc: Mapping = serde_yaml_ng::from_str(
            "ports: ['127.0.0.1:8088:80/tcp', '9090', 7070, {target: 6060, published: 1}]\n\
             healthcheck: {test: [CMD, wget, -q, -O-, 'http://localhost:8080/healthz']}",
        )
        .expect("yaml");
        assert_eq!(
            published("web", &svc, &opts()).expect("ports"),
            [80, 9090, 7070, 6060]
        );
        assert_eq!(health_path(&svc).as_deref(), Some("/healthz"));
        let ranged: Mapping =
            serde_yaml_ng::from_str("ports: ['8000-8010:8000-8010']").expect("yaml");
        let e = published("web", &ranged, &opts()).expect_err("ranges");
        assert!(e.to_string().contains("services.web.ports"), "{e}");
    }

    #[test]
    fn the_first_difference_is_named_by_its_path() {
        let a: Value = serde_yaml_ng::from_str("services: {web: {image: a, user: x}}").expect("a");
        let b: Value = serde_yaml_ng::from_str("services: {web: {image: b, user: x}}").expect("b");
        assert_eq!(
            first_difference(&a, &b, "").as_deref(),
            Some("services.web.image")
        );
        assert_eq!(first_difference(&a, &a, ""), None);
    }
}
