//! `wfctl`: Wayfinder's operator CLI.

mod commands;
mod output;
mod status_cmd;
mod tap_cmd;
mod traffic_cmd;
mod watch;

use std::time::Duration;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use tonic::transport::Channel;
use wayfinder_proto::policy::parse_duration;

use output::Format;
use wayfinder_cli::traffic::Admin;

/// wf-control's HTTP port, where `split --step`, `mirror diff`,
/// `proxy-status` and `check` read what the sidecars reported.
const CONTROL_HTTP: &str = "127.0.0.1:15014";

/// Operate a Wayfinder mesh: services, endpoints, watches, static
/// registrations and policy.
#[derive(Parser, Debug)]
#[command(version, about)]
struct Cli {
    /// Control plane gRPC address.
    #[arg(
        long,
        global = true,
        env = "WAYFINDER_CONTROL_PLANE",
        default_value = "https://127.0.0.1:15010"
    )]
    control_plane: String,
    /// The operator credential for an https control plane: a directory
    /// with operator.crt, operator.key and ca.crt, as wf-control writes it
    /// to DATA_DIR/operator/ (readable by its owner only).
    #[arg(
        long,
        global = true,
        env = "WAYFINDER_CREDENTIALS",
        default_value = "./wf-data/operator"
    )]
    credentials: std::path::PathBuf,
    /// Output: tables for people, JSON for scripts (one object per line for
    /// `watch`). Given before the command (`wfctl -o json endpoints web`):
    /// `inject` has an `-o` of its own, for its output file.
    #[arg(long, short, env = "WAYFINDER_OUTPUT", default_value = "table")]
    output: Format,
    /// Time limit for one request (not for `watch`), e.g. "5s".
    #[arg(long, global = true, env = "WAYFINDER_TIMEOUT", default_value = "5s", value_parser = parse_duration)]
    timeout: Duration,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// List services with instance counts.
    Services,
    /// List the endpoints of a service with their health.
    Endpoints {
        /// Service name.
        service: String,
    },
    /// Print each update of one or more services as it arrives.
    Watch {
        /// Service names.
        #[arg(required = true)]
        services: Vec<String>,
        /// Stop after this many events (for scripts); 0 = forever.
        #[arg(long, default_value_t = 0)]
        count: u64,
    },
    /// Register a static (non-meshed) endpoint; it survives control-plane restarts.
    Register {
        /// Service name.
        service: String,
        /// IP:PORT of the endpoint.
        addr: std::net::SocketAddr,
        /// Relative weight (1-10000).
        #[arg(long, default_value_t = 100)]
        weight: u32,
        /// Instance id (default: the address).
        #[arg(long)]
        instance: Option<String>,
        /// Zone.
        #[arg(long, default_value = "")]
        zone: String,
    },
    /// Remove a static endpoint.
    Deregister {
        /// Service name.
        service: String,
        /// IP:PORT of the endpoint.
        addr: std::net::SocketAddr,
    },
    /// Print each request to a service as it ends, live, from the
    /// callers' sidecars: caller, callee, instance, method, path, status,
    /// ms, attempts, error reason, trace id. Header values (authorization,
    /// cookie, ...) are never carried.
    Tap {
        /// The called service.
        service: String,
        #[command(flatten)]
        filters: TapFilters,
        /// Stop after this long (e.g. 30s); default: until interrupted.
        #[arg(long = "for", value_parser = parse_duration)]
        lasts: Option<Duration>,
        /// Stop after this many requests; 0 = no limit.
        #[arg(long, default_value_t = 0)]
        count: u64,
        /// Lines or JSON (one object per line), here or before the command.
        #[arg(long = "output", short = 'o')]
        output: Option<Format>,
    },
    /// Live rate, success rate and p50/p99 per path and per instance of a
    /// service over the last 10 s, from the same stream as `tap`;
    /// redrawn in place on a terminal.
    Top {
        /// The called service.
        service: String,
        #[command(flatten)]
        filters: TapFilters,
        /// Stop after this long (e.g. 30s); default: until interrupted.
        #[arg(long = "for", value_parser = parse_duration)]
        lasts: Option<Duration>,
        /// How often to refresh.
        #[arg(long, default_value = "1s", value_parser = parse_duration)]
        every: Duration,
        /// Table or JSON (one object per refresh), here or before the command.
        #[arg(long = "output", short = 'o')]
        output: Option<Format>,
    },
    /// Manage per-service policy.
    #[command(subcommand)]
    Policy(PolicyCommand),
    /// Set the weights of a route's subsets, in percent: at once, or in
    /// steps (--step) watching the callers' reports and rolling back when
    /// an --abort-on condition holds. The subsets not named share the rest.
    Split {
        /// Service name.
        service: String,
        /// LABEL=VALUE:PERCENT (e.g. version=v2:10), one label for all.
        #[arg(required = true)]
        shares: Vec<wayfinder_cli::traffic::split::Share>,
        /// The route to edit (default: the one without match; `default`
        /// is created at the end when there is none).
        #[arg(long)]
        route: Option<String>,
        /// Move the one named subset from its current share to PERCENT by
        /// this many points per step.
        #[arg(long)]
        step: Option<u32>,
        /// Wait between steps (with --step).
        #[arg(long, default_value = "30s", value_parser = parse_duration)]
        every: Duration,
        /// Roll back and fail when this holds for the moving subset after a
        /// step: error_rate>N%, p99>DURATION or p50>DURATION (repeatable).
        #[arg(long = "abort-on")]
        abort_on: Vec<wayfinder_cli::traffic::split::Condition>,
        /// wf-control's HTTP address, where the callers' reports are read
        /// (with --step).
        #[arg(long, env = "WAYFINDER_CONTROL_HTTP", default_value = CONTROL_HTTP)]
        http: String,
    },
    /// Inject faults into calls to a service (in its callers' sidecars),
    /// list them, clear them.
    #[command(subcommand)]
    Fault(FaultCommand),
    /// Traffic mirroring: how a service's mirrored calls compare with
    /// their copies.
    #[command(subcommand)]
    Mirror(MirrorCommand),
    /// Every sidecar: its service and instance, the replica it reports to,
    /// each upstream's version applied and how long it has trailed the
    /// registry, its certificate's expiry and last report; STALE when it
    /// trails for more than 5 s or has not reported for 10 s.
    ProxyStatus {
        /// wf-control's HTTP address; several replicas comma-separated.
        #[arg(long, env = "WAYFINDER_CONTROL_HTTP", default_value = CONTROL_HTTP)]
        http: String,
        /// Table or JSON, here or before the command.
        #[arg(long = "output", short = 'o')]
        output: Option<Format>,
    },
    /// The mesh's health as ordered checks, each with a hint when it
    /// fails; exits 1 when one fails.
    Check {
        /// wf-control's HTTP address; several replicas comma-separated
        /// (their trust bundles are compared).
        #[arg(long, env = "WAYFINDER_CONTROL_HTTP", default_value = CONTROL_HTTP)]
        http: String,
        /// Validate this policy file and compare it with the live policy.
        #[arg(long)]
        policy: Option<std::path::PathBuf>,
        /// Table or JSON, here or before the command.
        #[arg(long = "output", short = 'o')]
        output: Option<Format>,
    },
    /// Mesh a docker-compose file: a sidecar beside each service, a control
    /// plane, Jaeger (profile `tracing`); per-service join tokens in
    /// owner-only env files beside the output. `--remove` takes it out.
    Inject {
        /// The compose file.
        file: std::path::PathBuf,
        /// Write here instead of stdout.
        #[arg(short = 'o', long = "out")]
        out: Option<std::path::PathBuf>,
        /// Give back the file as it was before inject (as `wfctl uninject`).
        #[arg(long)]
        remove: bool,
        /// Mesh only these services (comma-separated).
        #[arg(long, value_delimiter = ',')]
        only: Vec<String>,
        /// Leave these services out of the mesh (comma-separated).
        #[arg(long, value_delimiter = ',')]
        skip: Vec<String>,
    },
    /// Take the mesh out of a file `wfctl inject` wrote: the original,
    /// byte for byte (`wfctl inject --remove`).
    Uninject {
        /// The meshed compose file.
        file: std::path::PathBuf,
        /// Write here instead of stdout.
        #[arg(short = 'o', long = "out")]
        out: Option<std::path::PathBuf>,
    },
    /// Lab tools: a DNS server that answers like Docker's, and the
    /// DNS-vs-balancer-vs-mesh comparison.
    #[command(subcommand)]
    Lab(LabCommand),
}

#[derive(Subcommand, Debug)]
enum LabCommand {
    /// Answer service names with round-robin A records, as Docker's embedded DNS does.
    Dns {
        /// UDP address to answer on.
        #[arg(long, default_value = "127.0.0.1:5353")]
        listen: std::net::SocketAddr,
        /// NAME=IP[+IP...] (repeatable), e.g. web=10.77.0.11+10.77.0.12.
        #[arg(long = "record", required = true, value_parser = dns_record)]
        records: Vec<(String, Vec<std::net::Ipv4Addr>)>,
        /// TTL of the answers, in seconds.
        #[arg(long, default_value_t = 5)]
        ttl: u32,
    },
    /// One scenario, every way to find `web` at once: DNS resolved once,
    /// per request, cached 600 s and 30 s, an nginx upstream and the mesh,
    /// while instances are killed, paused, recreated with a new IP, slowed,
    /// made unhealthy and added, and the control plane goes down and up.
    /// On loopback by default; on Docker with --compose. Writes a markdown
    /// report with plots.
    Compare {
        /// Scenario file (TOML); default: the shipped one (`wfctl lab scenario` prints it).
        #[arg(long)]
        scenario: Option<std::path::PathBuf>,
        /// Ways to compare, comma-separated: dns-once, dns-per-request,
        /// dns-ttl, dns-ttl-30, nginx, mesh, mesh+hedging.
        #[arg(
            long,
            default_value = "dns-once,dns-per-request,dns-ttl,dns-ttl-30,nginx,mesh,mesh+hedging"
        )]
        ways: String,
        /// Run on the containers of this compose file (the classic lab,
        /// injected or not) instead of loopback.
        #[arg(long)]
        compose: Option<std::path::PathBuf>,
        /// Docker: the compose project name (lowercase letters and digits).
        #[arg(long, default_value = "wfcompare")]
        project: String,
        /// Docker: the network alias the instances share.
        #[arg(long, default_value = "web")]
        alias: String,
        /// Docker: the service whose sidecar carries the mesh way.
        #[arg(long, default_value = "client")]
        client: String,
        /// Docker: the nginx service (kept out of the mesh).
        #[arg(long, default_value = "nginx")]
        nginx_service: String,
        /// Docker: the Wayfinder image (sidecars, control plane, load).
        #[arg(long, env = "WAYFINDER_IMAGE", default_value = "wayfinder:lab")]
        image: String,
        /// Docker: leave the lab running afterwards.
        #[arg(long)]
        keep: bool,
        /// Directory for report.md and its plots.
        #[arg(long, default_value = "lab-compare")]
        out: std::path::PathBuf,
        /// Loopback: where wf-control, wf-proxy and lab-app are (default: next to wfctl).
        #[arg(long)]
        bin_dir: Option<std::path::PathBuf>,
        /// Loopback: nginx binary (default: `nginx` on PATH or /usr/sbin/nginx); "none"
        /// uses the built-in TCP round robin, clearly labelled.
        #[arg(long)]
        nginx: Option<String>,
    },
    /// Print the default scenario (a start for your own).
    Scenario,
    /// The comparison's load, as it runs inside a container of the lab:
    /// one line per request on stdout (`wfctl lab compare --compose` starts it).
    Load {
        /// When to start, in milliseconds since the epoch.
        #[arg(long)]
        start_at: u64,
        /// How long.
        #[arg(long, value_parser = parse_duration)]
        duration: Duration,
        /// Requests per second per way.
        #[arg(long)]
        rate: u32,
        /// Slower than this has failed.
        #[arg(long, value_parser = parse_duration)]
        timeout: Duration,
        /// DNS server the DNS ways ask.
        #[arg(long, default_value = "127.0.0.11:53")]
        resolver: std::net::SocketAddr,
        /// The name the DNS ways look up (and the Host header).
        #[arg(long, default_value = "web")]
        name: String,
        /// The instances' port.
        #[arg(long, default_value_t = 80)]
        port: u16,
        /// Ways, comma-separated.
        #[arg(long)]
        ways: String,
        /// WAY=HOST:PORT for the ways that go through a front (nginx, mesh).
        #[arg(long = "front")]
        fronts: Vec<String>,
    },
}

/// nginx as given, else found on PATH or in /usr/sbin.
fn find_nginx(given: Option<String>) -> Option<std::path::PathBuf> {
    match given.as_deref() {
        Some("none") => None,
        Some(p) => Some(p.into()),
        None => std::env::var_os("PATH")
            .into_iter()
            .flat_map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
            .chain([std::path::PathBuf::from("/usr/sbin")])
            .map(|d| d.join("nginx"))
            .find(|p| p.is_file()),
    }
}

fn dns_record(s: &str) -> Result<(String, Vec<std::net::Ipv4Addr>), String> {
    let (name, ips) = s
        .split_once('=')
        .ok_or_else(|| format!("{s:?}: expected NAME=IP[+IP...]"))?;
    wayfinder_proto::validate::service_name(name).map_err(|e| e.to_string())?;
    let ips = ips
        .split('+')
        .map(|ip| {
            ip.parse()
                .map_err(|_| format!("{ip:?} is not an IPv4 address"))
        })
        .collect::<Result<Vec<_>, _>>()?;
    Ok((name.to_string(), ips))
}

#[derive(Subcommand, Debug)]
enum FaultCommand {
    /// Set the service's fault (replacing any other); it ends by itself
    /// after --for.
    #[command(group(clap::ArgGroup::new("effect").required(true).args(["abort", "delay", "reset"])))]
    Inject {
        /// Service name.
        service: String,
        /// Only tries to this instance (after the pick: a retry elsewhere
        /// escapes the fault).
        #[arg(long)]
        instance: Option<String>,
        /// Only requests whose path starts with this.
        #[arg(long)]
        path_prefix: Option<String>,
        /// Only requests with this header, NAME=VALUE (repeatable).
        #[arg(long = "header", value_parser = wayfinder_cli::traffic::fault::header)]
        headers: Vec<(String, String)>,
        /// Answer with this HTTP status instead of calling.
        #[arg(long)]
        abort: Option<u32>,
        /// Wait this long before calling (e.g. 200ms).
        #[arg(long, value_parser = parse_duration)]
        delay: Option<Duration>,
        /// Act as if the connection were reset.
        #[arg(long)]
        reset: bool,
        /// Share of matching tries, 0-100.
        #[arg(long, default_value_t = 100.0)]
        percent: f64,
        /// How long it lasts (e.g. 60s); without it, until cleared.
        #[arg(long = "for", value_parser = parse_duration)]
        lasts: Option<Duration>,
    },
    /// Services with an active fault, what it does and the time left.
    List,
    /// Remove a service's fault, or every fault.
    Clear {
        /// Service name (default: every service).
        service: Option<String>,
    },
}

#[derive(Subcommand, Debug)]
enum MirrorCommand {
    /// Watch a service's mirrored calls for a while, then print per route
    /// how the shadow's answers compared with the primary's: status, body
    /// hash, latency, copies shed or failed. Exits 0 whenever the report
    /// was read: a divergence is information, not a failure.
    Diff {
        /// Service name (the primary, whose [services.NAME.mirror] is set).
        service: String,
        /// How long to watch, 2s to 5m.
        #[arg(long = "for", default_value = "60s", value_parser = parse_duration)]
        lasts: Duration,
        /// wf-control's HTTP address, where the callers' reports are read.
        #[arg(long, env = "WAYFINDER_CONTROL_HTTP", default_value = CONTROL_HTTP)]
        http: String,
        /// Table or JSON, here or before the command (`wfctl -o json mirror diff`).
        #[arg(long = "output", short = 'o')]
        output: Option<Format>,
    },
}

/// Which requests `tap` and `top` show.
#[derive(clap::Args, Debug)]
struct TapFilters {
    /// Only requests from this calling service.
    #[arg(long)]
    from: Option<String>,
    /// Only requests answered by this instance.
    #[arg(long)]
    instance: Option<String>,
    /// Only this status (503) or class (5xx).
    #[arg(long)]
    status: Option<String>,
    /// Only paths starting with this.
    #[arg(long)]
    path: Option<String>,
}

impl TapFilters {
    fn request(self, service: String) -> wayfinder_proto::v1::TapRequest {
        wayfinder_proto::v1::TapRequest {
            service,
            from: self.from.unwrap_or_default(),
            instance: self.instance.unwrap_or_default(),
            status: self.status.unwrap_or_default(),
            path: self.path.unwrap_or_default(),
        }
    }
}

#[derive(Subcommand, Debug)]
enum PolicyCommand {
    /// Validate a TOML policy file locally, then apply it.
    Apply {
        /// Policy file.
        file: std::path::PathBuf,
    },
    /// Print a service's policy (TOML for people, JSON with --output json).
    Get {
        /// Service name.
        service: String,
    },
}

async fn connect(cli: &Cli) -> Result<Channel> {
    wayfinder_cli::connect::channel(&cli.control_plane, &cli.credentials, cli.timeout).await
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    match run(cli).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("wfctl: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> Result<()> {
    if let Command::Lab(lab) = cli.command {
        return run_lab(lab).await;
    }
    if let Command::Inject {
        file,
        out,
        remove,
        only,
        skip,
    } = cli.command
    {
        return wayfinder_cli::inject::run(&wayfinder_cli::inject::Request {
            file,
            out,
            remove,
            only,
            skip,
        });
    }
    if let Command::Uninject { file, out } = cli.command {
        return wayfinder_cli::inject::run(&wayfinder_cli::inject::Request {
            file,
            out,
            remove: true,
            only: Vec::new(),
            skip: Vec::new(),
        });
    }
    // Read over HTTP only: no gRPC connection (or credential) needed.
    if let Command::Mirror(MirrorCommand::Diff {
        service,
        lasts,
        http,
        output,
    }) = cli.command
    {
        let out = output.unwrap_or(cli.output);
        return traffic_cmd::mirror_diff(&service, lasts, &http, out).await;
    }
    if let Command::ProxyStatus { http, output } = &cli.command {
        return status_cmd::proxy_status(http, output.unwrap_or(cli.output)).await;
    }
    if let Command::Check {
        http,
        policy,
        output,
    } = &cli.command
    {
        // A control plane that cannot be reached is the first check's
        // failure, not the command's.
        let grpc = connect(&cli).await.map_err(|e| format!("{e:#}"));
        let args = status_cmd::CheckArgs {
            http: http.clone(),
            policy: policy.clone(),
            grpc,
            timeout: cli.timeout,
        };
        return status_cmd::check(args, output.unwrap_or(cli.output)).await;
    }
    // Local validation first: a bad file is reported without a connection.
    if let Command::Policy(PolicyCommand::Apply { file }) = &cli.command {
        let policies = wayfinder_proto::policy::PolicyFile::load(file)?;
        let ch = connect(&cli).await?;
        return commands::policy_apply(ch, cli.timeout, policies, cli.output).await;
    }
    let ch = connect(&cli).await?;
    let (t, out) = (cli.timeout, cli.output);
    match cli.command {
        Command::Services => commands::services(ch, t, out).await,
        Command::Endpoints { service } => commands::endpoints(ch, t, &service, out).await,
        Command::Watch { services, count } => watch::run(ch, services, count, out).await,
        Command::Register {
            service,
            addr,
            weight,
            instance,
            zone,
        } => commands::register(ch, t, service, addr, weight, instance, zone, out).await,
        Command::Deregister { service, addr } => {
            commands::deregister(ch, t, service, addr, out).await
        }
        Command::Tap {
            service,
            filters,
            lasts,
            count,
            output,
        } => {
            let req = filters.request(service);
            tap_cmd::tap(ch, req, lasts, count, output.unwrap_or(out)).await
        }
        Command::Top {
            service,
            filters,
            lasts,
            every,
            output,
        } => {
            let req = filters.request(service);
            tap_cmd::top(ch, req, lasts, every, output.unwrap_or(out)).await
        }
        Command::Policy(PolicyCommand::Get { service }) => {
            commands::policy_get(ch, t, &service, out).await
        }
        Command::Split {
            service,
            shares,
            route,
            step,
            every,
            abort_on,
            http,
        } => {
            let args = traffic_cmd::SplitArgs {
                service,
                shares,
                route,
                step,
                every,
                abort_on,
                http,
            };
            traffic_cmd::split(Admin::new(ch, t), args, out).await
        }
        Command::Fault(FaultCommand::Inject {
            service,
            instance,
            path_prefix,
            headers,
            abort,
            delay,
            reset,
            percent,
            lasts,
        }) => {
            use wayfinder_cli::traffic::fault::{Effect, Spec};
            let effect = match (abort, delay, reset) {
                (Some(status), _, _) => Effect::Abort(status),
                (_, Some(d), _) => Effect::Delay(d),
                _ => Effect::Reset,
            };
            let spec = Spec {
                instance,
                path_prefix,
                headers,
                effect,
                percent,
                lasts,
            };
            traffic_cmd::inject(Admin::new(ch, t), &service, &spec, out).await
        }
        Command::Fault(FaultCommand::List) => traffic_cmd::list(Admin::new(ch, t), out).await,
        Command::Fault(FaultCommand::Clear { service }) => {
            traffic_cmd::clear(Admin::new(ch, t), service, out).await
        }
        Command::Policy(PolicyCommand::Apply { .. })
        | Command::ProxyStatus { .. }
        | Command::Check { .. }
        | Command::Mirror(_)
        | Command::Lab(_)
        | Command::Inject { .. }
        | Command::Uninject { .. } => {
            unreachable!("handled above")
        }
    }
}

async fn run_lab(cmd: LabCommand) -> Result<()> {
    match cmd {
        LabCommand::Dns {
            listen,
            records,
            ttl,
        } => {
            let server = wayfinder_cli::lab::dns::DnsServer::start(listen, ttl).await?;
            for (name, ips) in records {
                server.set(&name, ips);
            }
            // Scripts wait for this line.
            eprintln!("wfctl lab dns: answering on {}", server.addr);
            tokio::signal::ctrl_c().await?;
            Ok(())
        }
        LabCommand::Compare {
            scenario,
            ways,
            compose,
            project,
            alias,
            client,
            nginx_service,
            image,
            keep,
            out,
            bin_dir,
            nginx,
        } => {
            use wayfinder_cli::lab::{compare, docker, loopback, scenario::Scenario};
            // Everything is checked before anything starts.
            let scenario = match scenario {
                Some(path) => Scenario::load(&path)?,
                None => Scenario::default_scenario(),
            };
            let ways = wayfinder_cli::lab::load::parse_ways(&ways)?;
            let bin_dir = match bin_dir {
                Some(d) => d,
                None => std::env::current_exe()?
                    .parent()
                    .context("wfctl's directory")?
                    .to_path_buf(),
            };
            let cfg = compare::Config {
                scenario,
                ways,
                out,
                bin_dir,
                nginx: find_nginx(nginx),
            };
            let run = async {
                match compose {
                    Some(compose) => {
                        let o = docker::Options {
                            compose,
                            project,
                            alias,
                            client,
                            nginx: nginx_service,
                            image,
                            keep,
                        };
                        docker::run(&cfg, &o).await
                    }
                    None => loopback::run(&cfg).await,
                }
            };
            // Ctrl-C drops the run, and with it the lab: its processes,
            // or its containers, placeholders and loads.
            let report = tokio::select! {
                r = run => r?,
                _ = tokio::signal::ctrl_c() => anyhow::bail!("interrupted: the lab is taken down"),
            };
            eprintln!("== report: {}", report.display());
            Ok(())
        }
        LabCommand::Scenario => {
            print!("{}", wayfinder_cli::lab::scenario::DEFAULT);
            Ok(())
        }
        LabCommand::Load {
            start_at,
            duration,
            rate,
            timeout,
            resolver,
            name,
            port,
            ways,
            fronts,
        } => {
            let ways = wayfinder_cli::lab::load::parse_ways(&ways)?;
            let plan = wayfinder_cli::lab::load::Plan {
                rate,
                duration,
                timeout,
                start: std::time::UNIX_EPOCH + Duration::from_millis(start_at),
                host: name.clone(),
            };
            wayfinder_cli::lab::load::serve_lines(ways, &fronts, resolver, &name, port, plan).await
        }
    }
}
