//! `wf-proxy`: Wayfinder's sidecar.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;
use wayfinder_proto::policy::AuthzDefault;
use wayfinder_proto::server::LogFormat;

use anyhow::{Context, Result, bail};
use clap::Parser;
use nix::sys::signal::Signal;
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;
use wayfinder_proto::policy::parse_duration;
use wayfinder_proto::v1::{Health, Instance, Protocol};
use wayfinder_proxy::admin;
use wayfinder_proxy::balance::Kind;
use wayfinder_proxy::control_plane::{self, Trust};
use wayfinder_proxy::discovery::{Sources, dns};
use wayfinder_proxy::lifecycle::app::{App, Ended};
use wayfinder_proxy::listener::{Group, Listener, Role};
use wayfinder_proxy::metrics::ProxyMetrics;
use wayfinder_proxy::register;
use wayfinder_proxy::resilience::probe::Check;
use wayfinder_proxy::settings::Defaults;
use wayfinder_proxy::settings::Origin;
use wayfinder_proxy::state::{Local, Proxy};
use wayfinder_proxy::telemetry;

/// Wayfinder sidecar proxy.
#[derive(Parser, Debug)]
#[command(version, about)]
struct Args {
    /// Control plane gRPC address; replicas as a comma-separated list
    /// (the sidecar stays with one and fails over to the next).
    #[arg(
        long,
        env = "WAYFINDER_CONTROL_PLANE",
        default_value = "https://127.0.0.1:15010"
    )]
    control_plane: String,
    /// Service the local app belongs to.
    #[arg(long, env = "WAYFINDER_SERVICE")]
    service: Option<String>,
    /// Instance id (default: SERVICE-PID).
    #[arg(long, env = "WAYFINDER_INSTANCE")]
    instance: Option<String>,
    /// A label of this instance, `KEY=VALUE` (repeatable, or comma-separated
    /// in the variable); routes select subsets by them, e.g. `version=v2`.
    #[arg(long = "label", env = "WAYFINDER_LABELS", value_delimiter = ',', value_parser = label)]
    labels: Vec<(String, String)>,
    /// This instance's weight for weighted balancers, 1-10000.
    #[arg(long, env = "WAYFINDER_WEIGHT", default_value_t = wayfinder_proto::validate::DEFAULT_WEIGHT,
          value_parser = clap::value_parser!(u32).range(1..=i64::from(wayfinder_proto::validate::MAX_WEIGHT)))]
    weight: u32,
    /// This sidecar's zone (locality): registered with its instance, and the
    /// "local" of the policy's `locality = "prefer-local"`.
    #[arg(long, env = "WAYFINDER_ZONE", value_parser = zone)]
    zone: Option<String>,
    /// The local app; without it the sidecar is client-only and registers nothing.
    #[arg(long, env = "WAYFINDER_APP")]
    app: Option<SocketAddr>,
    /// Inbound listener (other sidecars connect here).
    #[arg(long, env = "WAYFINDER_INBOUND", default_value = "127.0.0.1:15006")]
    inbound: SocketAddr,
    /// Address advertised to the control plane (default: the inbound address).
    #[arg(long, env = "WAYFINDER_ADVERTISE")]
    advertise: Option<SocketAddr>,
    /// Admin listener (/live, /ready, /metrics, /config, /endpoints).
    #[arg(long, env = "WAYFINDER_ADMIN", default_value = "127.0.0.1:15000")]
    admin: SocketAddr,
    /// Outbound HTTP listener routed by Host / :authority (service name, with or without port).
    #[arg(long, env = "WAYFINDER_OUTBOUND")]
    outbound: Option<SocketAddr>,
    /// Listener for connections iptables redirects here (`wf-proxy init`):
    /// each goes to the service its original destination or Host names,
    /// or passes through untouched.
    #[arg(long, env = "WAYFINDER_TRANSPARENT")]
    transparent: Option<SocketAddr>,
    /// Explicit outbound listener for one service: NAME[:PORT]=ADDR (repeatable);
    /// PORT is the service's port for DNS-discovered endpoints.
    #[arg(long = "upstream", env = "WAYFINDER_UPSTREAMS", value_delimiter = ',', value_parser = upstream)]
    upstreams: Vec<UpstreamFlag>,
    /// Where upstream endpoints come from unless a service's policy says: the
    /// control plane's watch ("mesh") or the service name's A/AAAA records ("dns").
    #[arg(long, env = "WAYFINDER_DISCOVERY", value_enum, default_value_t = Origin::Mesh)]
    discovery: Origin,
    /// DNS server for DNS discovery (IP:PORT); default: the system's resolv.conf.
    #[arg(long, env = "WAYFINDER_DNS_SERVER")]
    dns_server: Option<SocketAddr>,
    /// Let DNS discovery use loopback and link-local answers (127.0.0.0/8,
    /// ::1, 169.254.0.0/16 with the clouds' metadata service, fe80::/10):
    /// off, so a name that resolves there cannot make the sidecar call them.
    #[arg(long, env = "WAYFINDER_DNS_ALLOW_LOCAL")]
    dns_allow_local: bool,
    /// Port of DNS-discovered endpoints when --upstream gives none.
    #[arg(long, env = "WAYFINDER_DNS_PORT", default_value_t = 80)]
    dns_port: u16,
    /// Balancer when the service's policy names none.
    #[arg(long, env = "WAYFINDER_BALANCER", value_enum, default_value_t = Kind::PeakEwma)]
    balancer: Kind,
    /// App health check: "tcp" (connect), an HTTP path such as /healthz,
    /// "grpc" (grpc.health.v1, the server's overall health) or "grpc:SERVICE".
    #[arg(long, env = "WAYFINDER_HEALTH_CHECK", default_value = "tcp", value_parser = health_check)]
    health_check: Check,
    /// Interval between health checks.
    #[arg(long, env = "WAYFINDER_HEALTH_INTERVAL", default_value = "1s", value_parser = parse_duration)]
    health_interval: Duration,
    /// How long to wait for a client's first bytes before treating the connection as opaque TCP.
    #[arg(long, env = "WAYFINDER_DETECT_TIMEOUT", default_value = "30ms", value_parser = parse_duration)]
    detect_timeout: Duration,
    /// How long a client's HTTP/2 connection may sit with no request in
    /// flight before the sidecar closes it (GOAWAY; HTTP/1's idle
    /// connections end at the header-read timeout).
    #[arg(long, env = "WAYFINDER_HTTP2_IDLE_TIMEOUT", default_value = "300s", value_parser = parse_duration)]
    http2_idle_timeout: Duration,
    /// Upstream services held at once besides the listeners' and the local
    /// one: each is a discovery watch, pools and metric series. A request
    /// that would start one more is answered 503 `upstream-limit`.
    #[arg(long, env = "WAYFINDER_MAX_UPSTREAMS", default_value_t = wayfinder_proxy::settings::DEFAULT_MAX_UPSTREAMS)]
    max_upstreams: usize,
    /// How long an upstream (Host-routed or intercepted) may go unused
    /// before it is evicted: its watch closes, its metric series go.
    #[arg(long, env = "WAYFINDER_UPSTREAM_IDLE_TIMEOUT", default_value = "300s", value_parser = parse_duration)]
    upstream_idle_timeout: Duration,
    /// How long an admin client may take to send a request's headers (and
    /// an admin connection may sit idle).
    #[arg(long, env = "WAYFINDER_ADMIN_HEADER_TIMEOUT", default_value = "10s", value_parser = parse_duration)]
    admin_header_timeout: Duration,
    /// Clients silent through the detection window that may each have an
    /// endpoint dialed for them at once, per listener (to let a server speak
    /// first); others wait for their own first bytes without one.
    #[arg(long, env = "WAYFINDER_MAX_SILENT_RACES", default_value_t = 128)]
    max_silent_races: usize,
    /// Connections each listener serves at once; more wait in the kernel's
    /// accept queue.
    #[arg(long, env = "WAYFINDER_MAX_CONNECTIONS", default_value_t = 10_000)]
    max_connections: usize,
    /// Connect timeout to endpoints.
    #[arg(long, env = "WAYFINDER_CONNECT_TIMEOUT", default_value = "1s", value_parser = parse_duration)]
    connect_timeout: Duration,
    /// Request timeout where a policy sets none (retries included, up to the
    /// response headers); "none" waits forever.
    #[arg(long, env = "WAYFINDER_REQUEST_TIMEOUT", default_value = "15s", value_parser = duration_or_none)]
    request_timeout: Duration,
    /// On SIGTERM, how long the sidecar keeps serving after it left the
    /// mesh, while callers learn it is gone (their discovery update is in
    /// flight): a connection they open meanwhile is still answered.
    #[arg(long, env = "WAYFINDER_LAME_DUCK", default_value = "3s", value_parser = parse_duration)]
    lame_duck: Duration,
    /// End when the app in this PID namespace ends: for a sidecar container
    /// whose app joins its PID namespace (compose `pid: "service:…"`, as
    /// `wfctl inject` writes for jobs), so a finished job leaves no sidecar.
    #[arg(long, env = "WAYFINDER_EXIT_WITH_APP")]
    exit_with_app: bool,
    /// How long in-flight requests may take to finish on SIGTERM.
    #[arg(long, env = "WAYFINDER_DRAIN_TIMEOUT", default_value = "10s", value_parser = parse_duration)]
    drain_timeout: Duration,
    /// Log format.
    #[arg(long, env = "WAYFINDER_LOG_FORMAT", value_enum, default_value_t = LogFormat::Human)]
    log_format: LogFormat,
    /// Threads serving traffic (1: a single-threaded runtime).
    #[arg(long, env = "WAYFINDER_WORKER_THREADS", default_value_t = 1)]
    worker_threads: usize,
    /// Log one line per request (target `wayfinder::access`).
    #[arg(long, env = "WAYFINDER_ACCESS_LOG")]
    access_log: bool,
    /// OTLP/gRPC collector for spans (Jaeger: http://HOST:4317); no spans without it.
    #[arg(long, env = "OTEL_EXPORTER_OTLP_ENDPOINT")]
    otlp_endpoint: Option<String>,
    /// Join token for a workload certificate from the control plane; with it
    /// the sidecar speaks mTLS to other sidecars.
    #[arg(long, env = "WAYFINDER_JOIN_TOKEN", hide_env_values = true)]
    join_token: Option<String>,
    /// With an identity, whether the inbound side also takes plaintext
    /// ("permissive", for migration) or only mTLS ("strict").
    #[arg(long, env = "WAYFINDER_INBOUND_MODE", value_enum, default_value_t = InboundMode::Strict)]
    inbound_mode: InboundMode,
    /// Inbound requests to a service without an authorization policy: allow or deny.
    #[arg(long, env = "WAYFINDER_DEFAULT_AUTHZ", value_enum, default_value_t = AuthzDefault::Allow)]
    default_authz: AuthzDefault,
    /// Roots (PEM) to verify an https:// control plane with (wf-control's CA_DIR/bundle.crt).
    #[arg(long, env = "WAYFINDER_CA_BUNDLE")]
    ca_bundle: Option<std::path::PathBuf>,
    /// Or the SHA-256 of wf-control's root certificate, `sha256:HEX` (it logs it at start).
    #[arg(long, env = "WAYFINDER_CA_PIN", value_parser = control_plane::parse_pin)]
    ca_pin: Option<[u8; 32]>,
    /// Share of new traces sampled, 0 to 1 (a caller's decision in `traceparent` is kept).
    #[arg(long, env = "WAYFINDER_TRACE_SAMPLING", default_value_t = 1.0, value_parser = sampling)]
    trace_sampling: f64,
    /// Capture this network namespace's TCP at start, as `wf-proxy init`
    /// does (outbound to --transparent, inbound to --inbound when there is
    /// an app), then give up root for --run-as. Needs root and NET_ADMIN;
    /// for a sidecar container that owns the namespace its app joins.
    #[arg(long, env = "WAYFINDER_CAPTURE")]
    capture: bool,
    /// With --capture: inbound ports left alone (published ports, whose
    /// callers are outside the mesh).
    #[arg(
        long = "capture-exclude-inbound-port",
        env = "WAYFINDER_CAPTURE_EXCLUDE_INBOUND_PORTS",
        value_delimiter = ','
    )]
    capture_exclude_inbound_ports: Vec<u16>,
    /// With --capture: the uid to become once the rules are in (the rules
    /// let its connections through).
    #[arg(long, env = "WAYFINDER_RUN_AS", default_value_t = 1337)]
    run_as: u32,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(clap::Subcommand, Debug)]
enum Command {
    /// Install iptables rules that send this network namespace's TCP through
    /// the sidecar (run as root before the app starts, like Istio's init
    /// container); `--cleanup` removes them.
    Init(InitArgs),
    /// Wait until the sidecar answers `/ready` on its admin port, then run
    /// COMMAND if one follows `--` (exit 1 if it never does): a compose
    /// healthcheck for images without a shell, or an app's entrypoint.
    Await(AwaitArgs),
    /// Run the sidecar (the flags before `run`) and, once it is ready, the
    /// app `-- CMD ARGS…` as its child: reload signals pass on at once,
    /// SIGTERM after the lame duck, and the app's exit ends the sidecar
    /// with its exit code.
    Run(RunArgs),
}

/// `wf-proxy … run -- CMD ARGS…`.
#[derive(clap::Args, Debug)]
struct RunArgs {
    /// The app and its arguments.
    #[arg(last = true, required = true)]
    command: Vec<String>,
}

/// `wf-proxy await`.
#[derive(clap::Args, Debug)]
struct AwaitArgs {
    /// The sidecar's admin address.
    #[arg(long, env = "WAYFINDER_ADMIN", default_value = "127.0.0.1:15000")]
    admin: SocketAddr,
    /// How long to wait.
    #[arg(long, default_value = "60s", value_parser = parse_duration)]
    timeout: Duration,
    /// The command to exec once ready.
    #[arg(last = true)]
    command: Vec<String>,
}

/// `wf-proxy init`.
#[derive(clap::Args, Debug)]
struct InitArgs {
    /// The uid the sidecar runs as; its own connections are not captured.
    #[arg(long, default_value_t = 1337)]
    proxy_uid: u32,
    /// Port of the sidecar's `--transparent` listener.
    #[arg(long, default_value_t = 15001)]
    outbound_port: u16,
    /// Port of the sidecar's `--inbound` listener.
    #[arg(long, default_value_t = 15006)]
    inbound_port: u16,
    /// Leave inbound connections alone (capture outbound only).
    #[arg(long)]
    no_inbound: bool,
    /// Inbound port not captured (repeatable; the admin port is always excluded).
    #[arg(long = "exclude-inbound-port", value_delimiter = ',')]
    exclude_inbound_ports: Vec<u16>,
    /// Outbound destination port not captured (repeatable).
    #[arg(long = "exclude-outbound-port", value_delimiter = ',')]
    exclude_outbound_ports: Vec<u16>,
    /// Outbound destination address or CIDR not captured (repeatable).
    #[arg(long = "exclude-cidr", value_delimiter = ',', value_parser = wayfinder_proxy::transparent::iptables::parse_cidr)]
    exclude_cidrs: Vec<String>,
    /// The sidecar's admin port (never captured).
    #[arg(long, default_value_t = 15000)]
    admin_port: u16,
    /// The control plane (URL or IP:PORT); connections to it are never
    /// captured, whoever opens them (wfctl in the app's namespace).
    #[arg(long, env = "WAYFINDER_CONTROL_PLANE")]
    control_plane: Option<String>,
    /// Print the iptables commands instead of running them.
    #[arg(long)]
    dry_run: bool,
    /// Remove the rules instead.
    #[arg(long)]
    cleanup: bool,
}

/// The IPv4 address and port of every control-plane replica in `s` (URLs or
/// HOST:PORT, separated by commas).
fn control_plane_addrs(s: &str) -> Result<Vec<SocketAddr>> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    s.split(',')
        .map(str::trim)
        .filter(|u| !u.is_empty())
        .map(|url| {
            rt.block_on(control_plane::resolve(url))?
                .into_iter()
                .find(SocketAddr::is_ipv4)
                .with_context(|| format!("{url}: no IPv4 address (interception is IPv4 only)"))
        })
        .collect()
}

fn init(a: InitArgs) -> std::process::ExitCode {
    use wayfinder_proxy::transparent::iptables::{self, Rules};
    let control_plane = match a.control_plane.as_deref().filter(|_| !a.cleanup) {
        Some(cp) => match control_plane_addrs(cp) {
            Ok(addrs) => addrs,
            Err(e) => {
                eprintln!("wf-proxy init: --control-plane {cp:?}: {e:#}");
                return std::process::ExitCode::FAILURE;
            }
        },
        None => Vec::new(),
    };
    let rules = Rules {
        proxy_uid: a.proxy_uid,
        outbound_port: a.outbound_port,
        inbound_port: (!a.no_inbound).then_some(a.inbound_port),
        exclude_inbound_ports: [a.admin_port]
            .into_iter()
            .chain(a.exclude_inbound_ports)
            .collect(),
        exclude_outbound_ports: a.exclude_outbound_ports,
        exclude_cidrs: a.exclude_cidrs,
        control_plane,
    };
    if a.dry_run {
        let cmds = if a.cleanup {
            iptables::cleanup()
        } else {
            rules.install()
        };
        for c in &cmds {
            println!("iptables {}", c.join(" "));
        }
        return std::process::ExitCode::SUCCESS;
    }
    let done = if a.cleanup {
        iptables::run(&iptables::cleanup(), true)
    } else {
        rules.apply()
    };
    match done {
        Ok(()) => {
            let what = if a.cleanup { "removed" } else { "installed" };
            println!("wf-proxy init: interception rules {what}");
            std::process::ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("wf-proxy init: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}

/// `--capture`: the rules `wf-proxy init` would install for this
/// sidecar's own listeners, then root is given up for `--run-as`.
fn capture(args: &Args) -> Result<()> {
    use wayfinder_proxy::lifecycle::privileges;
    use wayfinder_proxy::transparent::iptables::Rules;
    if !privileges::is_root() {
        bail!(
            "--capture installs iptables rules: run the sidecar as root (it becomes --run-as {} after)",
            args.run_as
        );
    }
    let transparent = args
        .transparent
        .context("--capture sends outbound TCP to the --transparent listener: give one")?;
    // A container's namespace is still being set up as it starts (Docker
    // adds its DNS rules to the same nat table, and its DNS may not know
    // the control plane's name yet): a failure is tried again, a few
    // times, before start-up fails.
    let install = || -> Result<()> {
        Rules {
            proxy_uid: args.run_as,
            outbound_port: transparent.port(),
            inbound_port: args.app.map(|_| args.inbound.port()),
            exclude_inbound_ports: [args.admin.port()]
                .into_iter()
                .chain(args.capture_exclude_inbound_ports.iter().copied())
                .collect(),
            exclude_outbound_ports: Vec::new(),
            exclude_cidrs: Vec::new(),
            control_plane: control_plane_addrs(&args.control_plane)
                .with_context(|| format!("--control-plane {:?}", args.control_plane))?,
        }
        .apply()
        .map_err(anyhow::Error::msg)
    };
    let mut attempt = 1;
    while let Err(e) = install() {
        if attempt == 5 {
            return Err(e.context("installing the capture rules"));
        }
        eprintln!("wf-proxy: installing the capture rules (attempt {attempt} of 5): {e:#}");
        std::thread::sleep(Duration::from_millis(200 * attempt));
        attempt += 1;
    }
    privileges::drop_to(args.run_as)?;
    Ok(())
}

/// `wf-proxy await`: exit status (or exec) once the sidecar is ready.
fn await_ready(a: AwaitArgs) -> std::process::ExitCode {
    use wayfinder_proxy::lifecycle::await_ready;
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("wf-proxy await: cannot start the runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    if let Err(e) = rt.block_on(await_ready::wait(a.admin, a.timeout)) {
        eprintln!("wf-proxy await: not ready after {:?}: {e}", a.timeout);
        return std::process::ExitCode::FAILURE;
    }
    drop(rt);
    let Some((program, rest)) = a.command.split_first() else {
        return std::process::ExitCode::SUCCESS;
    };
    use std::os::unix::process::CommandExt;
    // exec only returns on failure.
    let e = std::process::Command::new(program).args(rest).exec();
    eprintln!("wf-proxy await: cannot run {program:?}: {e}");
    std::process::ExitCode::from(127)
}

/// A duration, or "none" (zero: no limit).
fn duration_or_none(s: &str) -> Result<Duration, String> {
    match s {
        "none" => Ok(Duration::ZERO),
        _ => parse_duration(s),
    }
}

fn sampling(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(v) if (0.0..=1.0).contains(&v) => Ok(v),
        _ => Err(format!("{s:?} is not a share: use 0 to 1")),
    }
}

/// One `--upstream NAME[:PORT]=ADDR`.
#[derive(Debug, Clone)]
struct UpstreamFlag {
    name: String,
    port: Option<u16>,
    listen: SocketAddr,
}

/// Parses `--label KEY=VALUE`.
fn label(s: &str) -> Result<(String, String), String> {
    let (k, v) = s
        .split_once('=')
        .ok_or_else(|| format!("{s:?} is not a label: write KEY=VALUE, e.g. version=v2"))?;
    wayfinder_proto::validate::label(k, v).map_err(|e| e.to_string())?;
    Ok((k.to_string(), v.to_string()))
}

fn upstream(s: &str) -> Result<UpstreamFlag, String> {
    let (target, listen) = s
        .split_once('=')
        .ok_or_else(|| format!("{s:?}: expected NAME[:PORT]=ADDR"))?;
    let (name, port) = match target.split_once(':') {
        Some((n, p)) => (
            n,
            Some(p.parse().map_err(|_| format!("{p:?} is not a port"))?),
        ),
        None => (target, None),
    };
    wayfinder_proto::validate::service_name(name).map_err(|e| e.to_string())?;
    let listen = listen
        .parse()
        .map_err(|_| format!("{listen:?} is not an IP:PORT"))?;
    Ok(UpstreamFlag {
        name: name.to_string(),
        port,
        listen,
    })
}

/// What the inbound side takes once the sidecar has an identity.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum InboundMode {
    /// Only mTLS from other sidecars.
    Strict,
    /// mTLS and plaintext (for migration).
    Permissive,
}

/// `--zone`: printable text the control plane accepts as an instance's zone.
fn zone(s: &str) -> Result<String, String> {
    let probe = wayfinder_proto::v1::Instance {
        service: "zone-check".into(),
        instance_id: "zone-check".into(),
        address: "127.0.0.1".into(),
        port: 1,
        zone: s.to_string(),
        ..Default::default()
    };
    match wayfinder_proto::validate::instance(probe) {
        Ok(_) if !s.is_empty() => Ok(s.to_string()),
        Ok(_) => Err("empty: leave --zone out for no zone".into()),
        Err(e) => Err(e.to_string()),
    }
}

/// `--health-check`: "tcp", an HTTP path, "grpc" or "grpc:SERVICE".
fn health_check(s: &str) -> Result<Check, String> {
    s.parse()
}

fn main() -> std::process::ExitCode {
    let mut args = Args::parse();
    let app = match args.command.take() {
        Some(Command::Init(a)) => return init(a),
        Some(Command::Await(a)) => return await_ready(a),
        Some(Command::Run(r)) => Some(r.command),
        None => None,
    };
    if args.capture && app.is_some() {
        // Its app would run as --run-as, whose connections the rules let
        // through: nothing it sends would be meshed.
        eprintln!(
            "wf-proxy: --capture with `run` would leave the app's traffic uncaptured (it would run as the proxy's uid): install the rules with `wf-proxy init` before starting the sidecar and its app as different users"
        );
        return std::process::ExitCode::FAILURE;
    }
    if args.capture
        && let Err(e) = capture(&args)
    {
        eprintln!("wf-proxy: {e:#}");
        return std::process::ExitCode::FAILURE;
    }
    // A sidecar gets a core or less (Linkerd sizes its proxy's runtime to
    // its CPU limit the same way). One worker keeps a request's tasks on one
    // thread: no cross-thread wake-ups, no lock traffic, fewer malloc arenas;
    // measured in bench/README.md.
    let runtime = if args.worker_threads <= 1 {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
    } else {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(args.worker_threads)
            .enable_all()
            .build()
    };
    match runtime {
        Ok(rt) => rt.block_on(start(args, app)),
        Err(e) => {
            eprintln!("wf-proxy: cannot start the runtime: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn start(args: Args, app: Option<Vec<String>>) -> std::process::ExitCode {
    // One crypto provider for every TLS user in the process (rustls, tonic).
    let _ = rustls::crypto::ring::default_provider().install_default();
    let mut prom = Registry::default();
    let metrics = ProxyMetrics::register(&mut prom);
    let node = args
        .instance
        .clone()
        .or_else(|| {
            args.service
                .as_ref()
                .map(|s| format!("{s}-{}", std::process::id()))
        })
        .unwrap_or_else(|| format!("client-{}", std::process::id()));
    let mut layers = Vec::new();
    let mut exporter = None;
    // An empty value (compose's `${VAR:-}`) means no exporter.
    if let Some(endpoint) = args.otlp_endpoint.as_ref().filter(|e| !e.is_empty()) {
        let cfg = telemetry::Config {
            endpoint: endpoint.clone(),
            sampling: args.trace_sampling,
            service: args.service.clone().unwrap_or_else(|| "client".into()),
            instance: node.clone(),
        };
        match telemetry::init(&cfg, metrics.spans.clone()) {
            Ok((layer, t)) => {
                layers.push(layer);
                exporter = Some(t);
            }
            Err(e) => {
                eprintln!("wf-proxy: --otlp-endpoint {endpoint:?}: {e:#}");
                return std::process::ExitCode::FAILURE;
            }
        }
    }
    if let Err(e) = wayfinder_proto::server::init_logs(args.log_format, layers) {
        eprintln!("wf-proxy: {e}");
        return std::process::ExitCode::FAILURE;
    }
    let result = run(args, app, prom, metrics, node).await;
    // Flush the last spans; the SDK blocks, and exports need the runtime.
    let _ = tokio::task::spawn_blocking(move || drop(exporter)).await;
    match result {
        Ok(None) => std::process::ExitCode::SUCCESS,
        Ok(Some(ended)) => std::process::ExitCode::from(ended.code()),
        Err(e) => {
            eprintln!("wf-proxy: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn bind(addr: SocketAddr, what: &str) -> Result<TcpListener> {
    TcpListener::bind(addr)
        .await
        .with_context(|| format!("binding the {what} listener on {addr}"))
}

async fn run(
    args: Args,
    app_command: Option<Vec<String>>,
    prom: Registry,
    metrics: ProxyMetrics,
    node: String,
) -> Result<Option<Ended>> {
    if args.app.is_some() && args.service.is_none() {
        bail!("--app needs --service: the app is registered as an instance of it");
    }
    let check = args.health_check.clone();
    let trust = match (&args.ca_bundle, &args.ca_pin) {
        (Some(path), _) => Trust::Bundle(read_bundle(path).await?),
        (None, Some(pin)) => Trust::Pin(*pin),
        (None, None) => Trust::None,
    };
    let https = args.control_plane.trim_start().starts_with("https://");
    // The first certificate comes over a channel without one (the join
    // token is the credential); everything else goes over a channel that
    // presents it, which is how an https control plane knows the caller.
    let bootstrap = control_plane::channel(&args.control_plane, trust.clone(), None)?;

    let default_origin = args.discovery;
    let dns = Arc::new(dns::resolver(args.dns_server));
    if default_origin == Origin::Dns {
        // Every service needs it at once: a missing one is a start-up error.
        if let Err(e) = dns.get() {
            bail!("cannot set up DNS discovery: {e}");
        }
    }
    let local_service = args.service.clone().unwrap_or_else(|| "client".into());
    let identity = match &args.join_token {
        Some(token) => {
            let id = certify(&bootstrap, &local_service, token).await?;
            tokio::spawn(id.clone().renew_loop());
            Some(id)
        }
        None => None,
    };
    let channel = match &identity {
        Some(id) if https => {
            let ch = control_plane::channel(&args.control_plane, trust, Some(id.client_cert()))?;
            id.renew_over(ch.clone());
            ch
        }
        None if https => bail!(
            "an https control plane knows sidecars by their mesh certificate: give a join token (WAYFINDER_JOIN_TOKEN or --join-token) to get one"
        ),
        Some(_) => {
            tracing::warn!(
                "the control plane is plain http://: the join token and every RPC cross the network unencrypted and unauthenticated (use https:// and --ca-bundle)"
            );
            bootstrap
        }
        None => bootstrap,
    };
    let sources = Sources {
        control_plane: channel.clone(),
        node: node.clone(),
        dns,
        dns_allow_local: args.dns_allow_local,
        default_origin,
        dns_ports: args
            .upstreams
            .iter()
            .filter_map(|u| Some((u.name.clone(), u.port?)))
            .collect(),
        default_dns_port: args.dns_port,
        identity: identity.clone(),
    };
    let proxy = Proxy::new(
        sources,
        args.balancer,
        args.app,
        Defaults {
            connect: args.connect_timeout,
            request: (!args.request_timeout.is_zero()).then_some(args.request_timeout),
            h2_idle: args.http2_idle_timeout,
            max_upstreams: args.max_upstreams,
            upstream_idle: args.upstream_idle_timeout,
            zone: args.zone.as_deref().map(Into::into),
        },
        Local {
            service: local_service.clone(),
            access_log: args.access_log,
            strict: args.inbound_mode == InboundMode::Strict,
            default_deny: args.default_authz == AuthzDefault::Deny,
        },
        identity.clone(),
        metrics,
    );

    if args.app.is_some() {
        // The service's own policy (authorization) must be known before
        // inbound requests are let through.
        proxy.pinned_upstream(&local_service);
    }

    // Bind everything first: a taken port is a start-up error, not a surprise later.
    let mut listeners = Vec::new();
    let inbound = if args.app.is_some() {
        let l = bind(args.inbound, "inbound").await?;
        let addr = l.local_addr()?;
        listeners.push(Listener {
            socket: l,
            role: Role::Inbound,
            detect_timeout: args.detect_timeout,
            silent_races: args.max_silent_races,
            max_connections: args.max_connections,
        });
        Some(addr)
    } else {
        None
    };
    let mut bound = Vec::new();
    for UpstreamFlag { name, listen, .. } in &args.upstreams {
        let l = bind(*listen, &format!("upstream {name}")).await?;
        bound.push(format!("{name}={}", l.local_addr()?));
        proxy.pinned_upstream(name);
        listeners.push(Listener {
            socket: l,
            role: Role::Upstream(name.as_str().into()),
            detect_timeout: args.detect_timeout,
            silent_races: args.max_silent_races,
            max_connections: args.max_connections,
        });
    }
    let outbound = match args.outbound {
        Some(a) => {
            let l = bind(a, "outbound").await?;
            let addr = l.local_addr()?;
            listeners.push(Listener {
                socket: l,
                role: Role::HostRouted,
                detect_timeout: args.detect_timeout,
                silent_races: args.max_silent_races,
                max_connections: args.max_connections,
            });
            Some(addr)
        }
        None => None,
    };
    let transparent = match args.transparent {
        Some(a) => {
            let l = bind(a, "transparent").await?;
            let addr = l.local_addr()?;
            listeners.push(Listener {
                socket: l,
                role: Role::Transparent,
                detect_timeout: args.detect_timeout,
                silent_races: args.max_silent_races,
                max_connections: args.max_connections,
            });
            Some(addr)
        }
        None => None,
    };
    // Host routing (explicit or intercepted) creates upstreams only for
    // services the control plane knows: the catalog says which.
    if outbound.is_some() || transparent.is_some() {
        tokio::spawn(wayfinder_proxy::transparent::catalog::watch(
            channel.clone(),
            proxy.catalog.clone(),
            node.clone(),
        ));
    }
    let admin_listener = bind(args.admin, "admin").await?;
    let admin_addr = admin_listener.local_addr()?;

    let config = serde_json::json!({
        "control_plane": args.control_plane, "service": args.service, "instance": node,
        "zone": args.zone,
        "app": args.app, "inbound": inbound, "outbound": outbound, "admin": admin_addr,
        "transparent": transparent,
        "upstreams": bound, "discovery": args.discovery, "health_check": args.health_check.to_string(),
        "health_interval_ms": args.health_interval.as_millis() as u64,
        "detect_timeout_ms": args.detect_timeout.as_millis() as u64,
        "max_silent_races": args.max_silent_races,
        "max_connections": args.max_connections,
        "connect_timeout_ms": args.connect_timeout.as_millis() as u64,
        "request_timeout_ms": args.request_timeout.as_millis() as u64,
        "drain_timeout_ms": args.drain_timeout.as_millis() as u64,
    });
    let shutdown = Arc::new(tokio::sync::Notify::new());
    let admin_app = admin::router(admin::AdminState {
        proxy: proxy.clone(),
        metrics: Arc::new(prom),
        config: Arc::new(config),
        shutdown: shutdown.clone(),
    });
    // The admin port stays up until the process ends (a dropped sender
    // never stops it).
    let (_, admin_stopped) = tokio::sync::watch::channel(false);
    tokio::spawn(wayfinder_proto::server::serve_http(
        admin_listener,
        admin_app,
        wayfinder_proto::server::HttpBounds {
            max_connections: admin::MAX_CONNECTIONS,
            header_read: args.admin_header_timeout,
        },
        admin_stopped,
    ));

    // Inbound closes after the lame duck; outbound stays open until the
    // app no longer needs it.
    let (inbound_group, outbound_group) = (Group::default(), Group::default());
    for l in listeners {
        let group = match l.role {
            Role::Inbound => &inbound_group,
            _ => &outbound_group,
        };
        group.serve(l, proxy.clone());
    }

    tokio::spawn(wayfinder_proxy::memory::trim_when_idle());
    tokio::spawn(proxy.clone().evict_idle_upstreams());
    let status_of = proxy.clone();
    let reporter_service = args.service.clone().unwrap_or_else(|| "client".into());
    let reports = tokio::spawn(wayfinder_proxy::traffic::report_loop(
        proxy.traffic.clone(),
        channel.clone(),
        wayfinder_proxy::traffic::Reporter {
            node: node.clone(),
            service: reporter_service.clone(),
            status: Box::new(move || status_of.status()),
        },
    ));

    tokio::spawn(wayfinder_proxy::tap::interest_loop(
        proxy.tap.clone(),
        channel.clone(),
        node.clone(),
    ));
    tokio::spawn(wayfinder_proxy::tap::publish_loop(
        proxy.tap.clone(),
        channel.clone(),
        node.clone(),
        reporter_service.clone(),
    ));

    let lease = Arc::new(AtomicU64::new(0));
    let mut registration = None;
    if let (Some(app), Some(service), Some(inbound)) = (args.app, args.service.clone(), inbound) {
        let (htx, hrx) = tokio::sync::watch::channel(Health::Unknown);
        tokio::spawn(register::check_loop(app, check, args.health_interval, htx));
        let advertise = match args.advertise {
            Some(a) => a,
            // Bound to every address (a container): advertise the one that
            // routes towards the control plane, as other sidecars reach us there.
            None if inbound.ip().is_unspecified() => {
                let ip = control_plane::route_ip(&args.control_plane)
                    .await
                    .context("finding the address to advertise (or pass --advertise)")?;
                SocketAddr::new(ip, inbound.port())
            }
            None => inbound,
        };
        tracing::info!(%advertise, "advertising the inbound address");
        let instance = Instance {
            service,
            instance_id: node.clone(),
            address: advertise.ip().to_string(),
            port: advertise.port().into(),
            protocol: Protocol::Unspecified as i32,
            meshed: true,
            weight: args.weight,
            labels: args.labels.iter().cloned().collect(),
            zone: args.zone.clone().unwrap_or_default(),
        };
        registration = Some(tokio::spawn(register::keep_registered(
            channel.clone(),
            instance,
            hrx,
            lease.clone(),
        )));
    }

    // Tests and scripts read the bound addresses from this line.
    tracing::info!(
        inbound = %inbound.map_or("-".into(), |a| a.to_string()),
        outbound = %outbound.map_or("-".into(), |a| a.to_string()),
        transparent = %transparent.map_or("-".into(), |a| a.to_string()),
        admin = %admin_addr,
        upstreams = %bound.join(","),
        "wf-proxy listening"
    );

    let app = match app_command {
        Some(command) => {
            let proxy = proxy.clone();
            let app = App::start_when_ready(command, move || admin::pending(&proxy).is_empty());
            tokio::spawn(forward_reload_signals(app.clone()));
            Some(app)
        }
        None if args.exit_with_app => Some(App::watch_pid_namespace()),
        None => None,
    };
    let app_exited = async {
        match &app {
            Some(app) => app.ended().await,
            None => std::future::pending().await,
        }
    };
    let app_went_first = tokio::select! {
        () = shutdown_signal() => false,
        () = shutdown.notified() => false,
        _ = app_exited => true,
    };
    tracing::info!("draining");
    // Leave the mesh first so callers stop picking us; the heartbeats stop
    // first, or the lease they no longer find would be registered again.
    if let Some(r) = &registration {
        r.abort();
    }
    register::deregister(channel.clone(), lease.load(Ordering::Relaxed)).await;
    if !app_went_first && inbound.is_some() {
        // Lame duck: callers whose discovery has not caught up yet still
        // get answers, from the app that still runs.
        tokio::time::sleep(args.lame_duck).await;
    }
    let deadline = tokio::time::Instant::now() + args.drain_timeout;
    inbound_group.close();
    inbound_group.drained(deadline).await;
    // The app hears SIGTERM once nobody calls it any more; its outbound
    // stays open while it finishes.
    let ended = match &app {
        Some(app) if app.is_child() => {
            app.signal(Signal::SIGTERM);
            match tokio::time::timeout_at(deadline, app.ended()).await {
                Ok(ended) => Some(ended),
                Err(_) => {
                    tracing::warn!("drain timeout; killing the app");
                    app.signal(Signal::SIGKILL);
                    Some(app.ended().await)
                }
            }
        }
        // An app beside a capturing sidecar (compose): its sockets say
        // whether it is still there, and its calls go out through us until
        // it is gone (or the deadline).
        // (Not when it is known to have ended: a job seen through its PID
        // namespace.)
        _ if args.capture && !app_went_first => {
            let own = nix::unistd::geteuid().as_raw();
            let admin = admin_addr.port();
            if !wayfinder_proxy::lifecycle::neighbour::app_gone(own, admin, deadline).await {
                tracing::warn!("drain timeout; the app still has connections");
            }
            None
        }
        // A neighbour's container stops it; the sidecar's exit is its own.
        _ => None,
    };
    outbound_group.close();
    if !outbound_group.drained(deadline).await || inbound_group.open() > 0 {
        tracing::warn!(
            open = inbound_group.open() + outbound_group.open(),
            "drain timeout; closing remaining connections"
        );
    }
    // Drained: reports stop and the sidecar says it leaves, so `wfctl
    // proxy-status` forgets it rather than call it stale.
    reports.abort();
    wayfinder_proxy::traffic::leave(channel, node, reporter_service).await;
    Ok(ended)
}

/// SIGHUP, SIGUSR1 and SIGUSR2 go to the app as they come (reloads).
async fn forward_reload_signals(app: Arc<App>) {
    use tokio::signal::unix::{SignalKind, signal};
    let kinds = [
        (SignalKind::hangup(), Signal::SIGHUP),
        (SignalKind::user_defined1(), Signal::SIGUSR1),
        (SignalKind::user_defined2(), Signal::SIGUSR2),
    ];
    let mut streams = Vec::new();
    for (kind, sig) in kinds {
        match signal(kind) {
            Ok(s) => streams.push((s, sig)),
            Err(e) => tracing::warn!(error = %e, ?sig, "cannot forward"),
        }
    }
    let waits = streams.into_iter().map(|(mut s, sig)| {
        let app = app.clone();
        async move {
            while s.recv().await.is_some() {
                app.signal(sig);
            }
        }
    });
    futures::future::join_all(waits).await;
}

/// The control plane's roots. In a container lab they arrive through a
/// volume the control plane writes when it starts, which may be after the
/// sidecar: a missing file is waited for (30 s), not an error at once.
async fn read_bundle(path: &std::path::Path) -> Result<Vec<u8>> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    let mut said = false;
    loop {
        match std::fs::read(path) {
            Ok(pem) if !pem.is_empty() => return Ok(pem),
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                return Err(e).with_context(|| format!("--ca-bundle {}", path.display()));
            }
            _ if tokio::time::Instant::now() >= deadline => {
                bail!("--ca-bundle {}: no such file after 30 s", path.display())
            }
            _ => {
                if !said {
                    tracing::info!(file = %path.display(), "waiting for the control plane's trust bundle");
                    said = true;
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    }
}

/// The first certificate: refusals end start-up with the control plane's
/// reason; an unreachable control plane is retried for a while.
async fn certify(
    channel: &tonic::transport::Channel,
    service: &str,
    token: &str,
) -> Result<Arc<wayfinder_proxy::identity::Identity>> {
    use wayfinder_proxy::identity::{Identity, IdentityError};
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    let mut attempt = 0;
    loop {
        match Identity::certify(channel.clone(), service, token).await {
            Ok(id) => return Ok(id),
            Err(IdentityError::Unreachable(e)) if tokio::time::Instant::now() < deadline => {
                tracing::warn!(error = %e, "control plane unreachable; retrying for a certificate");
                tokio::time::sleep(wayfinder_proto::backoff::backoff(attempt)).await;
                attempt += 1;
            }
            Err(e) => bail!("no workload certificate for service {service:?}: {e}"),
        }
    }
}

async fn shutdown_signal() {
    let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(s) => s,
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
            return;
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {},
        _ = term.recv() => {},
    }
}
