//! The sidecar's shared state: its upstreams, discovery sources, local app,
//! identity and metrics, which every connection and request reads. The
//! stages that act on it are in `http/` and `opaque.rs`.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use crate::authz;
use crate::balance::{EndpointStats, Kind};
use crate::connector::{Connector, Limits};
use crate::discovery::Sources;
use crate::edge::ConnRefusal;
use crate::identity::Identity;
use crate::metrics::{ConnRefusalLabels, ProxyMetrics};
use crate::resilience::breaker::Breakers;
use crate::resilience::rate_limit;
use crate::settings::{Defaults, Origin, Settings};
use crate::upstream::{Clients, Full, Upstream, Upstreams};

/// How long a request waits for its service's first discovery answer.
pub const DISCOVERY_WAIT: Duration = Duration::from_secs(3);

/// Shared state of the data path.
pub struct Proxy {
    /// Known upstreams.
    pub upstreams: Upstreams,
    sources: Sources,
    default_kind: Kind,
    defaults: Defaults,
    /// The local app as an endpoint (its stats live as long as the sidecar).
    pub(crate) app: Option<Arc<EndpointStats>>,
    pub(crate) app_clients: Clients,
    /// Inbound requests to the app by status class.
    pub(crate) app_requests: crate::metrics::RequestCounters,
    /// This sidecar's service (span names) and whether to log each request.
    pub local: Local,
    /// Traffic per upstream for the dashboard.
    pub traffic: Arc<crate::traffic::Traffic>,
    /// `wfctl tap`: which callees are tapped, and the events recorded for them.
    pub tap: Arc<crate::tap::Tap>,
    /// The workload identity, when the sidecar has one (mTLS between sidecars).
    pub identity: Option<Arc<Identity>>,
    /// TLS for the inbound side, built once from the identity.
    pub tls_server: Option<Arc<rustls::ServerConfig>>,
    /// Refusal kinds already logged (each is logged once, then only counted).
    logged: std::sync::Mutex<std::collections::HashSet<&'static str>>,
    /// The mesh's address table, for transparently intercepted connections
    /// (kept current only when the sidecar has a `--transparent` listener).
    pub catalog: Arc<crate::transparent::catalog::Catalog>,
    /// The service's rate limit on the way in (its buckets outlive the
    /// rebuilds of the service's settings).
    inbound_limit: rate_limit::Inbound,
    /// Metrics.
    pub metrics: ProxyMetrics,
}

/// What a sidecar knows about itself that requests need.
#[derive(Debug, Clone, Default)]
pub struct Local {
    /// The service of the app it fronts (`client` for a client-only sidecar).
    pub service: String,
    /// Log one line per request.
    pub access_log: bool,
    /// With an identity: refuse plaintext on the inbound side.
    pub strict: bool,
    /// Deny inbound requests of services without an authorization policy.
    pub default_deny: bool,
}

impl Proxy {
    /// A data path using `sources` for discovery and `app` for inbound traffic.
    pub fn new(
        sources: Sources,
        default_kind: Kind,
        app: Option<SocketAddr>,
        defaults: Defaults,
        local: Local,
        identity: Option<Arc<Identity>>,
        metrics: ProxyMetrics,
    ) -> Arc<Self> {
        let app_limits = Arc::new(Limits::default());
        app_limits.set(&Settings::resolve(None, Origin::Mesh, &defaults));
        let app_clients = Clients::new(
            Connector::new(Arc::new(Breakers::default()), app_limits),
            crate::settings::DEFAULT_IDLE,
            None,
        );
        Arc::new(Self {
            upstreams: Upstreams::new(defaults.max_upstreams),
            sources,
            default_kind,
            defaults,
            app: app.map(|a| EndpointStats::new("app", a, 1)),
            app_clients,
            app_requests: Default::default(),
            traffic: Arc::default(),
            tap: Arc::default(),
            tls_server: identity.as_ref().map(|i| i.server_config()),
            identity,
            logged: Default::default(),
            catalog: Default::default(),
            inbound_limit: rate_limit::Inbound::new(metrics.rate_limited.clone(), &local.service),
            local,
            metrics,
        })
    }

    /// How long a client's HTTP/2 connection may sit idle (`--http2-idle-timeout`).
    pub fn h2_idle_timeout(&self) -> Duration {
        self.defaults.h2_idle
    }

    /// The sidecar's connect timeout (`--connect-timeout`), for connections
    /// no service policy governs (the app, intercepted pass-through).
    pub fn connect_timeout(&self) -> Duration {
        self.defaults.connect
    }

    /// The local app's address, if the sidecar fronts one.
    pub fn app(&self) -> Option<SocketAddr> {
        self.app.as_ref().map(|a| a.addr)
    }

    /// The upstream for `name`, starting its discovery on first use;
    /// What the sidecar reports of itself with its traffic: its
    /// certificate's expiry and, per upstream (at most
    /// [`crate::traffic::MAX_STATUS_UPSTREAMS`], by name), the discovery
    /// version applied.
    pub fn status(&self) -> wayfinder_proto::v1::SidecarStatus {
        wayfinder_proto::v1::SidecarStatus {
            cert_not_after_unix_ms: self
                .identity
                .as_ref()
                .map_or(0, |i| crate::upstream::unix_ms(i.not_after())),
            upstreams: self
                .upstreams
                .all()
                .iter()
                .take(crate::traffic::MAX_STATUS_UPSTREAMS)
                .map(|u| u.status())
                .collect(),
            leaving: false,
        }
    }

    /// `Full` when the sidecar holds `--max-upstreams` already.
    pub fn upstream(&self, name: &str) -> Result<Arc<Upstream>, Full> {
        self.upstreams
            .get_or_start(name, |name| self.start_upstream(name))
    }

    /// The upstream for `name`, never evicted nor refused: a listener's
    /// or the local service's, started with the sidecar.
    pub fn pinned_upstream(&self, name: &str) -> Arc<Upstream> {
        self.upstreams
            .pinned(name, |name| self.start_upstream(name))
    }

    fn start_upstream(&self, name: &str) -> Arc<Upstream> {
        let up = Upstream::new(
            name,
            self.default_kind,
            self.sources.default_origin,
            self.defaults.clone(),
            self.metrics.clone(),
            self.identity.clone(),
        );
        self.sources.start(&up);
        tokio::spawn(crate::discovery::until_closed(
            up.clone(),
            crate::resilience::health_check::run(up.clone()),
        ));
        self.metrics.upstreams.inc();
        up
    }

    /// Evicts the upstreams unused for `--upstream-idle-timeout`, every
    /// quarter of it, for as long as the sidecar runs: their watches close
    /// and their metric series and traffic counts go.
    pub async fn evict_idle_upstreams(self: Arc<Self>) {
        let idle = self.defaults.upstream_idle;
        let mut tick = tokio::time::interval((idle / 4).max(Duration::from_millis(100)));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            for up in self.upstreams.sweep(tokio::time::Instant::now(), idle) {
                self.traffic.forget(up.name());
                self.metrics.forget_upstream(up.name(), up.endpoint_ids());
                self.metrics.forget_routes(up.name(), &up.active().routes);
                self.metrics.upstreams.dec();
                self.metrics.upstreams_evicted.inc();
                tracing::info!(
                    service = up.name(),
                    ?idle,
                    "upstream evicted: unused, its watch closed"
                );
            }
        }
    }

    /// Whether refusals of kind `reason` are seen for the first time (each
    /// kind is logged once: a misbehaving peer must not flood the log).
    pub(crate) fn first_time(&self, reason: &'static str) -> bool {
        self.logged.lock().is_ok_and(|mut l| l.insert(reason))
    }

    /// Refuses a connection: counted, and logged the first time for each
    /// kind (a misconfigured peer must not flood the log).
    pub fn refuse(&self, reason: ConnRefusal, peer: SocketAddr, detail: &str) {
        self.metrics
            .refused
            .get_or_create(&ConnRefusalLabels { reason })
            .inc();
        let reason = reason.as_str();
        if self.first_time(reason) {
            tracing::warn!(%peer, reason, detail, "inbound connection refused (logged once per kind; see wayfinder_proxy_inbound_refused_total)");
        }
    }

    /// Whether a Host-routed request may create (or use) the upstream
    /// `name`: one that exists already (an `--upstream` listener, or known
    /// before), or one the control plane's catalog lists, whatever the
    /// discovery source (with DNS, too, an unknown name would be an
    /// upstream and a resolver task per Host a client cares to send).
    /// Anything else creates no state (no upstream, no watch).
    pub async fn knows(&self, name: &str) -> bool {
        if self.upstreams.get(name).is_some() {
            return true;
        }
        self.catalog.wait_loaded(DISCOVERY_WAIT).await;
        self.catalog.table().knows(name)
    }

    /// Whether `caller` may make `ask` of this sidecar's service. Until the
    /// service's own policy is known, nothing is allowed (fail closed).
    pub async fn authorized(&self, caller: Option<&str>, ask: authz::Ask<'_>) -> bool {
        let own = self.pinned_upstream(&self.local.service);
        if !own.wait_ready(DISCOVERY_WAIT).await {
            return false;
        }
        let policy = own.active().policy.as_ref().and_then(|p| p.authz.clone());
        authz::allowed(policy.as_ref(), self.local.default_deny, caller, ask)
    }

    /// Admits a request of `caller` under this sidecar's service's rate
    /// limit, or says how long the caller should wait (counted). Called
    /// after [`Proxy::authorized`], which waited for the service's policy.
    pub fn admit_inbound(&self, caller: &rate_limit::Caller) -> Result<(), Duration> {
        let own = self.pinned_upstream(&self.local.service);
        let limit = own.active().settings.rate_limit;
        self.inbound_limit.admit(limit, caller)
    }
}
