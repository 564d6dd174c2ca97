//! `wf-control`: Wayfinder's control plane.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use wayfinder_proto::server::LogFormat;

use anyhow::{Context, Result};
use clap::Parser;
use prometheus_client::registry::Registry as PromRegistry;
use tokio::net::TcpListener;
use wayfinder_control::ca::Ca;
use wayfinder_control::grpc::auth::Guard;
use wayfinder_control::grpc::identity::{IdentityService, JoinToken};
use wayfinder_control::grpc::telemetry::TelemetryService;
use wayfinder_control::grpc::transport::{Tls, incoming};
use wayfinder_control::grpc::{
    TRANSPORT_LIMIT, admin::AdminService, discovery, registry::RegistryService, serve,
};
use wayfinder_control::registry::{LeaseConfig, Registry, RegistryMetrics};
use wayfinder_control::store::{
    Backend, Embedded, FileStore, Persister, Store, StoreSpec, etcd::Etcd,
};
use wayfinder_control::{http, policy_file::PolicyWatcher};
use wayfinder_proto::policy::parse_duration;
use wayfinder_proto::shared::discovery_server::DiscoveryServer;
use wayfinder_proto::v1::{
    admin_server::AdminServer, identity_server::IdentityServer, registry_server::RegistryServer,
    telemetry_server::TelemetryServer,
};

/// Wayfinder control plane: registry, leases, discovery push and policy.
#[derive(Parser, Debug)]
#[command(version, about)]
struct Args {
    /// gRPC address (Registry, Discovery, Admin).
    #[arg(long, env = "WAYFINDER_GRPC", default_value = "127.0.0.1:15010")]
    grpc: SocketAddr,
    /// HTTP address (/healthz, /metrics, /v1/services).
    #[arg(long, env = "WAYFINDER_HTTP", default_value = "127.0.0.1:15014")]
    http: SocketAddr,
    /// Directory of the embedded store (and of the CA, by default).
    #[arg(long, env = "WAYFINDER_DATA_DIR", default_value = "./wf-data")]
    data_dir: PathBuf,
    /// Where the registry is kept: "embedded" (files in DATA_DIR), or
    /// etcd://HOST:PORT[,HOST:PORT...] shared by several replicas.
    #[arg(long, env = "WAYFINDER_STORE", default_value = "embedded")]
    store: StoreSpec,
    /// Key prefix in etcd; replicas of one mesh share it.
    #[arg(long, env = "WAYFINDER_ETCD_PREFIX", default_value = wayfinder_control::store::etcd::DEFAULT_PREFIX)]
    etcd_prefix: String,
    /// Policy file (TOML), reloaded when it changes.
    #[arg(long, env = "WAYFINDER_POLICY")]
    policy: Option<PathBuf>,
    /// Lease TTL granted when a sidecar asks for none (e.g. "10s").
    #[arg(long, env = "WAYFINDER_LEASE_TTL", default_value = "10s", value_parser = parse_duration)]
    lease_ttl: Duration,
    /// How long an expired instance stays, as not serving, before removal.
    #[arg(long, env = "WAYFINDER_LEASE_GRACE", default_value = "20s", value_parser = parse_duration)]
    lease_grace: Duration,
    /// Streams (watches, keep-alives, calls) one gRPC connection may have
    /// open at once; a sidecar uses one per upstream plus a few.
    #[arg(
        long,
        env = "WAYFINDER_MAX_STREAMS_PER_CONNECTION",
        default_value_t = 1024
    )]
    max_streams_per_connection: u32,
    /// gRPC connections served at once; more wait in the kernel's accept
    /// queue (a sidecar holds one).
    #[arg(long, env = "WAYFINDER_MAX_GRPC_CONNECTIONS", default_value_t = 10_000)]
    max_grpc_connections: usize,
    /// How long a gRPC connection may go without a call in flight (a watch
    /// is in flight while it streams) before it is sent GOAWAY.
    #[arg(long, env = "WAYFINDER_GRPC_IDLE_TIMEOUT", default_value = "300s", value_parser = parse_duration)]
    grpc_idle_timeout: Duration,
    /// How long a new gRPC connection may take to start its first call.
    #[arg(long, env = "WAYFINDER_GRPC_HEADER_TIMEOUT", default_value = "10s", value_parser = parse_duration)]
    grpc_header_timeout: Duration,
    /// How long an HTTP client (dashboard, metrics) may take to send a
    /// request's headers, and an HTTP connection may sit idle.
    #[arg(long, env = "WAYFINDER_HTTP_HEADER_TIMEOUT", default_value = "10s", value_parser = parse_duration)]
    http_header_timeout: Duration,
    /// Most service entries kept at once (registered, with a policy, or only
    /// watched); watches naming more unknown services are refused.
    #[arg(long, env = "WAYFINDER_MAX_SERVICES", default_value_t = wayfinder_control::registry::MAX_SERVICES)]
    max_services: usize,
    /// Log format.
    #[arg(long, env = "WAYFINDER_LOG_FORMAT", value_enum, default_value_t = LogFormat::Human)]
    log_format: LogFormat,
    /// Trust domain of workload identities (spiffe://DOMAIN/svc/NAME).
    #[arg(
        long,
        env = "WAYFINDER_TRUST_DOMAIN",
        default_value = "wayfinder.local"
    )]
    trust_domain: String,
    /// CA directory (root, intermediate, bundle); generated there on first start.
    /// Default: DATA_DIR/ca.
    #[arg(long, env = "WAYFINDER_CA_DIR")]
    ca_dir: Option<PathBuf>,
    /// Lifetime of workload certificates (e.g. "24h", "90s").
    #[arg(long, env = "WAYFINDER_CERT_LIFETIME", default_value = "24h", value_parser = lifetime)]
    cert_lifetime: Duration,
    /// Join token sidecars present for a certificate: TOKEN, TOKEN:svc1,svc2
    /// (only those services), optionally @EXPIRES (Unix seconds). Repeatable;
    /// one value may hold several separated by spaces (one variable for a
    /// compose file's per-service tokens).
    #[arg(
        long = "join-token",
        env = "WAYFINDER_JOIN_TOKEN",
        hide_env_values = true
    )]
    join_tokens: Vec<String>,
    /// A file of join tokens, one a line in the form of --join-token (`#`
    /// starts a comment): tokens off the command line, where `ps` shows
    /// them. It should be readable by its owner only.
    #[arg(long, env = "WAYFINDER_JOIN_TOKEN_FILE")]
    join_token_file: Option<PathBuf>,
    /// Serve gRPC in plaintext and let every caller call every RPC, with
    /// no authentication (a warning says so at start). Without it, gRPC is
    /// TLS with a certificate from the CA (clients trust CA_DIR/bundle.crt);
    /// sidecars present their mesh certificate, wfctl the operator
    /// credential written to DATA_DIR/operator/.
    #[arg(long, env = "WAYFINDER_INSECURE")]
    insecure: bool,
    /// Also write the trust bundle (the roots, public) to this file at
    /// start, for sidecars that verify the control plane through a shared
    /// volume (`--ca-bundle` on their side).
    #[arg(long, env = "WAYFINDER_BUNDLE_OUT")]
    bundle_out: Option<PathBuf>,
    /// More names for the gRPC certificate (it always has localhost,
    /// 127.0.0.1 and the gRPC address), e.g. the compose service's name.
    #[arg(long = "tls-name", env = "WAYFINDER_TLS_NAMES", value_delimiter = ',')]
    tls_names: Vec<String>,
}

/// The join tokens, parsed here rather than by clap: clap's error repeats
/// the value it refused, and a token must never reach a log or a terminal.
fn join_tokens(raw: &[String]) -> Result<Vec<JoinToken>> {
    let raw: Vec<&str> = raw.iter().flat_map(|v| v.split_whitespace()).collect();
    raw.iter()
        .enumerate()
        .map(|(i, t)| {
            t.parse().map_err(|e| {
                anyhow::anyhow!(
                    "join token {} of {} (--join-token / WAYFINDER_JOIN_TOKEN) is invalid: {e}",
                    i + 1,
                    raw.len()
                )
            })
        })
        .collect()
}

/// The join tokens of `path`; an error names the file and line, never the
/// token.
fn join_token_file(path: &std::path::Path) -> Result<Vec<JoinToken>> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("reading join tokens from {}", path.display()))?;
    #[cfg(unix)]
    if let Ok(meta) = std::fs::metadata(path) {
        use std::os::unix::fs::PermissionsExt;
        if meta.permissions().mode() & 0o077 != 0 {
            tracing::warn!(file = %path.display(), "join token file is readable by others than its owner (chmod 600)");
        }
    }
    text.lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty() && !l.trim_start().starts_with('#'))
        .map(|(n, l)| {
            l.trim().parse().map_err(|e| {
                anyhow::anyhow!("{}:{}: invalid join token: {e}", path.display(), n + 1)
            })
        })
        .collect()
}

/// A certificate lifetime: `Ns`, `Nm` or `Nh`, from 10 s to 30 days.
fn lifetime(s: &str) -> Result<Duration, String> {
    let bad = || format!("{s:?}: use e.g. \"24h\", \"30m\" or \"90s\" (10s to 720h)");
    let (n, unit) = s.split_at(s.find(|c: char| !c.is_ascii_digit()).ok_or_else(bad)?);
    let n: u64 = n.parse().map_err(|_| bad())?;
    let secs = match unit {
        "s" => n,
        "m" => n.saturating_mul(60),
        "h" => n.saturating_mul(3600),
        _ => return Err(bad()),
    };
    if !(10..=720 * 3600).contains(&secs) {
        return Err(bad());
    }
    Ok(Duration::from_secs(secs))
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let args = Args::parse();
    // One crypto provider for every TLS user in the process (rustls, tonic).
    let _ = rustls::crypto::ring::default_provider().install_default();
    if let Err(e) = wayfinder_proto::server::init_logs(args.log_format, Vec::new()) {
        eprintln!("wf-control: {e}");
        return std::process::ExitCode::FAILURE;
    }
    match run(args).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("wf-control: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn run(args: Args) -> Result<()> {
    let mut tokens = join_tokens(&args.join_tokens)?;
    if let Some(file) = &args.join_token_file {
        tokens.extend(join_token_file(file)?);
    }
    let mut prom = PromRegistry::default();
    let leases = LeaseConfig {
        default_ttl: args.lease_ttl,
        grace: args.lease_grace,
        ..LeaseConfig::default()
    };
    let metrics = RegistryMetrics::register(&mut prom);
    // The CA comes first: with etcd its root is published for the other replicas.
    let ca_dir = args
        .ca_dir
        .clone()
        .unwrap_or_else(|| args.data_dir.join("ca"));
    let ca = Arc::new(
        Ca::load_or_create(&ca_dir, &args.trust_domain, args.cert_lifetime)
            .context("setting up the certificate authority")?,
    );
    let (registry, backend, persister) = open_store(&args, leases, metrics, &ca, &mut prom).await?;
    registry.limit_services(args.max_services);
    if let Some(out) = &args.bundle_out {
        // Whole or not at all: a sidecar may be waiting to read it.
        let tmp = out.with_extension("tmp");
        std::fs::write(&tmp, ca.bundle_pem())
            .and_then(|()| std::fs::rename(&tmp, out))
            .with_context(|| format!("--bundle-out {}", out.display()))?;
    }

    let policy = match &args.policy {
        Some(path) => Some(PolicyWatcher::load(path.clone(), backend.clone(), &mut prom).await?),
        None => None,
    };
    let identity = IdentityService::new(ca.clone(), registry.clone(), tokens, &mut prom);
    let guard = Guard::register(&mut prom);
    let tls = if args.insecure {
        tracing::warn!(
            "--insecure: gRPC is plaintext and unauthenticated; anyone who reaches the port can change the mesh (policy, endpoints, leases)"
        );
        None
    } else {
        // Local names always (wfctl in the same host or container), then
        // the address and the names callers use.
        let mut names: Vec<String> = vec!["localhost".into(), "127.0.0.1".into()];
        if !args.grpc.ip().is_unspecified() && !args.grpc.ip().is_loopback() {
            names.push(args.grpc.ip().to_string());
        }
        names.extend(args.tls_names.iter().cloned());
        let (cert, key) = ca
            .server_identity(&names)
            .context("issuing the control plane's certificate")?;
        let operator = args.data_dir.join("operator");
        if ca
            .operator_credential(&operator)
            .context("writing the operator credential")?
        {
            tracing::info!(dir = %operator.display(), "operator credential written (wfctl --credentials)");
        }
        Some(Arc::new(
            Tls::new(&cert, &key, &args.trust_domain, registry.clone())
                .map_err(anyhow::Error::msg)
                .context("TLS for gRPC")?,
        ))
    };
    let watch_metrics = discovery::WatchMetrics::register(&mut prom);
    let conn_metrics = serve::ConnMetrics::register(&mut prom);

    // Bind both ports before serving so a taken port is a clear start-up error.
    let grpc = TcpListener::bind(args.grpc)
        .await
        .with_context(|| format!("binding gRPC on {}", args.grpc))?;
    let http_listener = TcpListener::bind(args.http)
        .await
        .with_context(|| format!("binding HTTP on {}", args.http))?;

    if let Some(p) = policy {
        tokio::spawn(p.run());
    }
    tokio::spawn(reaper(registry.clone()));
    tokio::spawn(wayfinder_control::faults::expire(
        registry.clone(),
        backend.clone(),
        wayfinder_control::faults::unix_ms_now,
    ));

    let grpc_addr = grpc.local_addr()?;
    let http_addr = http_listener.local_addr()?;
    let traffic = Arc::new(wayfinder_control::traffic::Traffic::default());
    traffic.register(&mut prom);
    tokio::spawn(traffic.clone().prune_on_a_timer());
    let sidecars = Arc::new(wayfinder_control::sidecars::Sidecars::default());
    let http_app = http::router(http::HttpState {
        registry: registry.clone(),
        backend: backend.clone(),
        metrics: Arc::new(prom),
        traffic: traffic.clone(),
        status: http::status::StatusState {
            sidecars: sidecars.clone(),
            ca: ca.clone(),
            replica: grpc_addr.to_string(),
        },
    });
    let shutdown = shutdown_signal();
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let http_task = tokio::spawn(wayfinder_proto::server::serve_http(
        http_listener,
        http_app,
        wayfinder_proto::server::HttpBounds {
            max_connections: 256,
            header_read: args.http_header_timeout,
        },
        stop_rx.clone(),
    ));

    // Tests and scripts pass port 0 and read the bound addresses from this line.
    let pin = {
        let d = ring::digest::digest(&ring::digest::SHA256, ca.root());
        let hex: String = d.as_ref().iter().map(|b| format!("{b:02x}")).collect();
        format!("sha256:{hex}")
    };
    tracing::info!(grpc = %grpc_addr, http = %http_addr, tls = !args.insecure, ca = %ca_dir.display(), ca_pin = %pin, "wf-control serving");
    let grpc_stop = stop_rx;
    let routes = tonic::service::Routes::new(
        RegistryServer::new(RegistryService::new(
            backend.clone(),
            registry.clone(),
            guard.clone(),
        ))
        .max_decoding_message_size(TRANSPORT_LIMIT),
    )
    .add_service(
        DiscoveryServer::new(discovery::DiscoveryService::new(
            registry.clone(),
            watch_metrics,
            guard.clone(),
        ))
        .max_decoding_message_size(TRANSPORT_LIMIT),
    )
    .add_service(
        AdminServer::new(AdminService::new(
            registry.clone(),
            backend.clone(),
            guard.clone(),
        ))
        .max_decoding_message_size(TRANSPORT_LIMIT),
    )
    .add_service(
        TelemetryServer::new(TelemetryService::new(
            traffic,
            sidecars,
            registry.clone(),
            guard.clone(),
        ))
        .max_decoding_message_size(TRANSPORT_LIMIT),
    )
    .add_service(
        wayfinder_proto::v1::tap_server::TapServer::new(
            wayfinder_control::grpc::tap::TapService::new(Arc::default(), guard.clone()),
        )
        .max_decoding_message_size(TRANSPORT_LIMIT),
    )
    .add_service(IdentityServer::new(identity).max_decoding_message_size(TRANSPORT_LIMIT))
    .add_service(
        wayfinder_proto::v1::catalog_server::CatalogServer::new(
            wayfinder_control::grpc::catalog::CatalogService::new(registry.clone(), guard),
        )
        .max_decoding_message_size(TRANSPORT_LIMIT),
    );
    let server = serve::serve(
        routes,
        incoming(
            grpc,
            tls,
            args.max_grpc_connections,
            conn_metrics.full.clone(),
        ),
        serve::GrpcBounds {
            // One caller's connection cannot open streams (watches) without end.
            max_streams: args.max_streams_per_connection,
            idle: args.grpc_idle_timeout,
            first_request: args.grpc_header_timeout,
        },
        conn_metrics,
        grpc_stop,
    );
    tokio::pin!(server);
    tokio::select! {
        () = &mut server => anyhow::bail!("the gRPC server stopped"),
        () = shutdown => {
            tracing::info!("shutting down");
            let _ = stop_tx.send(true);
            // Watch streams never end by themselves: give unary calls a moment.
            let _ = tokio::time::timeout(Duration::from_secs(2), &mut server).await;
        }
    }
    let _ = stop_tx.send(true);
    let _ = tokio::time::timeout(Duration::from_secs(2), http_task).await;
    if let Some(persister) = persister
        && !persister.durable(registry.dirty()).await
    {
        anyhow::bail!("could not write the final state");
    }
    Ok(())
}

/// The registry and the backend its changes go through: the embedded files
/// in the data directory (with their writer), or etcd shared by replicas.
async fn open_store(
    args: &Args,
    leases: LeaseConfig,
    metrics: RegistryMetrics,
    ca: &Ca,
    prom: &mut PromRegistry,
) -> Result<(Arc<Registry>, Arc<dyn Backend>, Option<Arc<Persister>>)> {
    if let StoreSpec::Etcd(members) = &args.store {
        let registry = Registry::mirror(leases, metrics);
        let etcd = Etcd::start(
            members.clone(),
            &args.etcd_prefix,
            registry.clone(),
            leases,
            ca.bundle().to_vec(),
        )
        .await?;
        tracing::info!(store = %etcd.describe(), services = registry.services().len(), "state loaded");
        return Ok((registry, etcd, None));
    }
    let store: Arc<dyn Store> =
        Arc::new(FileStore::open(&args.data_dir).context("opening the data directory")?);
    let persisted = store.load().context("loading saved state")?;
    let restored = persisted.as_ref().map_or(0, |p| p.services.len());
    let registry = Registry::new(leases, metrics, persisted);
    registry.set_trust_bundle(ca.bundle().to_vec());
    tracing::info!(store = %store.describe(), services = restored, "state loaded");
    let persister = Persister::start(registry.clone(), store.clone(), prom);
    let backend = Embedded::new(registry.clone(), persister.clone(), store.describe());
    Ok((registry, Arc::new(backend), Some(persister)))
}

/// Expires leases and drops unwatched empty services. A 100 ms tick bounds how
/// late an expiry is noticed; scanning even 10,000 leases takes microseconds.
async fn reaper(registry: Arc<Registry>) {
    let mut tick = tokio::time::interval(Duration::from_millis(100));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut n: u64 = 0;
    loop {
        tick.tick().await;
        let (expired, removed) = registry.reap(tokio::time::Instant::now());
        if expired + removed > 0 {
            tracing::info!(expired, removed, "leases reaped");
        }
        n += 1;
        if n.is_multiple_of(100) {
            registry.collect_garbage();
        }
    }
}

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(s) => s,
                Err(_) => {
                    let _ = ctrl_c.await;
                    return;
                }
            };
        tokio::select! {
            _ = ctrl_c => {},
            _ = term.recv() => {},
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
}
