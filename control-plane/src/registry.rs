//! The registry: services, their endpoints and policy, leases, versions, and
//! the per-service broadcast that carries every change to the watchers.
//!
//! All state sits behind one mutex. A mutation changes the state, encodes its
//! delta once and broadcasts it while still holding the lock; a new watcher
//! takes its snapshot and subscribes under the same lock. So a watcher sees
//! every change after its snapshot exactly once, in version order, without
//! gaps, and the lock is held only for in-memory work (never across I/O).

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime};

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::{counter::Counter, family::Family, gauge::Gauge};
use prometheus_client::registry::Registry as PromRegistry;
use thiserror::Error;
use tokio::sync::broadcast;
use tokio::time::Instant;
use wayfinder_proto::encoded::EncodedWatchEvent;
use wayfinder_proto::v1::{
    CatalogService, CatalogUpdate, Delta, Endpoint, Health, Instance, ServicePolicy,
    ServiceSummary, Snapshot, WatchEvent, watch_event::Kind,
};

use crate::store::{Persisted, PersistedEndpoint, PersistedService, Record};

/// Deltas kept per service so a reconnecting watcher can resume.
pub const DELTA_LOG_LEN: usize = 256;
/// Updates buffered per service broadcast before a slow watcher lags and is
/// sent a fresh snapshot instead.
pub const BROADCAST_CAPACITY: usize = 256;
/// Versions jump by this much when state is restored. Changes are pushed to
/// watchers before they reach the store, so a crash can lose versions that
/// watchers already saw; reusing them for different changes would let a
/// resuming watcher believe it is up to date when it is not. After the jump
/// every new version is above anything handed out before the crash.
pub const RESTART_VERSION_GAP: u64 = 1 << 32;

/// Metrics of the registry's contents and lifecycle.
#[derive(Clone)]
pub struct RegistryMetrics {
    services: Gauge,
    instances: Family<HealthLabel, Gauge>,
    /// Registrations accepted.
    pub registrations: Counter,
    /// Leases that expired.
    pub lease_expirations: Counter,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct HealthLabel {
    health: &'static str,
}

impl RegistryMetrics {
    /// Creates the metrics and registers them.
    pub fn register(reg: &mut PromRegistry) -> Self {
        let m = Self {
            services: Gauge::default(),
            instances: Family::default(),
            registrations: Counter::default(),
            lease_expirations: Counter::default(),
        };
        reg.register(
            "wayfinder_control_services",
            "Services with endpoints or a policy",
            m.services.clone(),
        );
        reg.register(
            "wayfinder_control_instances",
            "Registered instances by health",
            m.instances.clone(),
        );
        reg.register(
            "wayfinder_control_registrations",
            "Registrations accepted",
            m.registrations.clone(),
        );
        reg.register(
            "wayfinder_control_lease_expirations",
            "Leases that expired",
            m.lease_expirations.clone(),
        );
        m
    }

    fn set_counts(&self, services: i64, serving: i64, not_serving: i64, unknown: i64) {
        self.services.set(services);
        for (health, n) in [
            ("serving", serving),
            ("not_serving", not_serving),
            ("unknown", unknown),
        ] {
            self.instances.get_or_create(&HealthLabel { health }).set(n);
        }
    }
}

/// Lease timing.
#[derive(Debug, Clone, Copy)]
pub struct LeaseConfig {
    /// TTL granted when a registration asks for none.
    pub default_ttl: Duration,
    /// Shortest TTL a registration may ask for.
    pub min_ttl: Duration,
    /// Longest TTL a registration may ask for.
    pub max_ttl: Duration,
    /// How long an expired instance stays (as not serving) before removal.
    pub grace: Duration,
}

impl Default for LeaseConfig {
    fn default() -> Self {
        Self {
            default_ttl: Duration::from_secs(10),
            min_ttl: Duration::from_millis(500),
            max_ttl: Duration::from_secs(300),
            grace: Duration::from_secs(20),
        }
    }
}

/// Why a registry operation failed.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum RegistryError {
    /// The lease does not exist (never did, or was removed).
    #[error("lease {0} is unknown")]
    UnknownLease(u64),
    /// No such endpoint.
    #[error("service {service} has no endpoint {address}")]
    UnknownEndpoint {
        /// Service.
        service: String,
        /// `ip:port`.
        address: String,
    },
    /// A static endpoint would replace a leased one or the other way round.
    #[error("instance {0} is registered with a lease; deregister it by lease")]
    Conflict(String),
}

/// One registration as stored.
#[derive(Debug, Clone)]
struct Entry {
    instance: Instance,
    health: Health,
    version: u64,
    lease: Option<u64>,
}

impl Entry {
    fn endpoint(&self) -> Endpoint {
        Endpoint {
            instance: Some(self.instance.clone()),
            health: self.health as i32,
            version: self.version,
        }
    }
}

/// One change as delivered to watchers.
#[derive(Debug, Clone)]
pub struct Pushed {
    /// Version of the service before the change.
    pub prev_version: u64,
    /// Version after it.
    pub version: u64,
    /// The encoded `WatchEvent` (shared, never copied per watcher).
    pub event: EncodedWatchEvent,
    /// When the change was accepted, for the push-latency histogram.
    pub at: Instant,
}

struct Service {
    version: u64,
    endpoints: BTreeMap<String, Entry>,
    policy: Option<ServicePolicy>,
    log: VecDeque<Pushed>,
    tx: broadcast::Sender<Pushed>,
}

impl Service {
    fn new(version: u64) -> Self {
        Self {
            version,
            endpoints: BTreeMap::new(),
            policy: None,
            log: VecDeque::new(),
            tx: broadcast::channel(BROADCAST_CAPACITY).0,
        }
    }

    fn exists(&self) -> bool {
        !self.endpoints.is_empty() || self.policy.is_some()
    }

    fn snapshot(&self, name: &str, trust_bundle: &[Vec<u8>]) -> WatchEvent {
        WatchEvent {
            service: name.to_string(),
            version: self.version,
            changed_at_us: unix_micros(),
            kind: Some(Kind::Snapshot(Snapshot {
                exists: self.exists(),
                endpoints: self.endpoints.values().map(Entry::endpoint).collect(),
                policy: self.policy.clone(),
                trust_bundle: trust_bundle.to_vec(),
            })),
        }
    }
}

#[derive(Debug, Clone, Copy)]
enum LeaseState {
    Active { deadline: Instant },
    Expired { remove_at: Instant },
}

#[derive(Debug, Clone)]
struct Lease {
    service: String,
    instance_id: String,
    ttl: Duration,
    state: LeaseState,
}

#[derive(Default)]
struct State {
    version: u64,
    services: HashMap<String, Service>,
    leases: HashMap<u64, Lease>,
    /// Bumped by every change that must reach the store.
    dirty: u64,
    /// Records of changes not yet handed to the store.
    pending: Vec<Record>,
}

/// What a new watcher receives for one service.
pub struct Subscription {
    /// Events to send first: a snapshot, or the deltas missed since the
    /// client's version (possibly none).
    pub initial: Vec<EncodedWatchEvent>,
    /// Later changes.
    pub rx: broadcast::Receiver<Pushed>,
    /// Whether `initial` is a snapshot (for metrics).
    pub snapshot: bool,
}

/// The registry, shared by the gRPC services, the lease reaper and the store.
pub struct Registry {
    state: Mutex<State>,
    leases: LeaseConfig,
    metrics: RegistryMetrics,
    /// Roots (DER) sent with every snapshot.
    trust_bundle: std::sync::RwLock<Vec<Vec<u8>>>,
    /// The latest version, for watchers of the whole registry (the catalog).
    changed: tokio::sync::watch::Sender<u64>,
    /// A mirror of a shared store (etcd): changes arrive through
    /// [`Registry::apply`] with the store's revisions as versions, leases
    /// expire in the store, and nothing is queued for a local store.
    mirror: bool,
}

/// Result of a successful registration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Registered {
    /// Lease id (0 for static endpoints).
    pub lease_id: u64,
    /// Granted TTL.
    pub ttl: Duration,
    /// Stored instance id.
    pub instance_id: String,
    /// Version at which it became visible.
    pub version: u64,
}

fn unix_micros() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as u64)
}

/// A change to one service, applied in one place ([`Registry::commit`]).
#[derive(Default)]
struct Change {
    added: Vec<Endpoint>,
    changed: Vec<Endpoint>,
    removed: Vec<String>,
    policy: Option<ServicePolicy>,
    policy_removed: bool,
}

/// A random lease id: never 0, within etcd's positive `i64` range. A
/// sequential id let any caller guess its neighbours' leases (and
/// deregister them); ownership checks come with authenticated callers.
pub fn random_lease_id() -> u64 {
    loop {
        let id = rand::random::<u64>() >> 2;
        if id != 0 {
            return id;
        }
    }
}

/// A random lease id not in `taken`.
fn unguessable_lease<V>(taken: &HashMap<u64, V>) -> u64 {
    loop {
        let id = random_lease_id();
        if !taken.contains_key(&id) {
            return id;
        }
    }
}

impl Registry {
    /// A registry restored from `persisted` (or empty). Restored leases get a
    /// fresh TTL from now, so live sidecars keep them by heartbeating.
    pub fn new(
        leases: LeaseConfig,
        metrics: RegistryMetrics,
        persisted: Option<Persisted>,
    ) -> Arc<Self> {
        let mut state = State::default();
        if let Some(p) = persisted {
            state.version = p.version.saturating_add(RESTART_VERSION_GAP);
            let now = Instant::now();
            for s in p.services {
                let mut svc = Service::new(s.version);
                svc.policy = s.policy;
                for e in s.endpoints {
                    let id = e.instance.instance_id.clone();
                    if let (Some(lease), Some(ttl_ms)) = (e.lease, e.ttl_ms) {
                        let ttl = Duration::from_millis(ttl_ms.into());
                        state.leases.insert(
                            lease,
                            Lease {
                                service: s.name.clone(),
                                instance_id: id.clone(),
                                ttl,
                                state: LeaseState::Active {
                                    deadline: now + ttl,
                                },
                            },
                        );
                    }
                    svc.endpoints.insert(
                        id,
                        Entry {
                            instance: e.instance,
                            health: e.health,
                            version: e.version,
                            lease: e.lease,
                        },
                    );
                }
                state.services.insert(s.name, svc);
            }
        }
        Self::with_state(state, leases, metrics, false)
    }

    fn with_state(
        state: State,
        leases: LeaseConfig,
        metrics: RegistryMetrics,
        mirror: bool,
    ) -> Arc<Self> {
        let reg = Arc::new(Self {
            state: Mutex::new(state),
            leases,
            metrics,
            trust_bundle: Default::default(),
            changed: tokio::sync::watch::channel(0).0,
            mirror,
        });
        reg.update_gauges(&reg.lock());
        reg
    }

    /// An empty registry that mirrors a shared store: it changes only through
    /// [`Registry::apply`] and [`Registry::reset`], and its versions are the
    /// store's revisions, the same on every replica.
    pub fn mirror(leases: LeaseConfig, metrics: RegistryMetrics) -> Arc<Self> {
        Self::with_state(State::default(), leases, metrics, true)
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock aborts the process (panic = "abort"
        // in release), so a poisoned lock only happens in tests; the state is
        // still consistent because every mutation completes before unlocking.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Applies `change` to `name`: bumps the version, encodes the delta once,
    /// logs it for resumption and broadcasts it. Returns the new version.
    fn commit(&self, st: &mut State, name: &str, change: Change) -> u64 {
        let version = st.version + 1;
        self.commit_at(st, name, change, version)
    }

    /// [`Registry::commit`] at a given version (a store revision).
    fn commit_at(&self, st: &mut State, name: &str, change: Change, version: u64) -> u64 {
        st.version = st.version.max(version);
        st.dirty += 1;
        if !self.mirror {
            Self::queue_records(st, name, &change, version);
        }
        let svc = st
            .services
            .entry(name.to_string())
            .or_insert_with(|| Service::new(0));
        let prev_version = svc.version;
        svc.version = version;
        let event = WatchEvent {
            service: name.to_string(),
            version,
            changed_at_us: unix_micros(),
            kind: Some(Kind::Delta(Delta {
                prev_version,
                added: change.added,
                changed: change.changed,
                removed: change.removed,
                policy: change.policy,
                policy_removed: change.policy_removed,
            })),
        };
        let pushed = Pushed {
            prev_version,
            version,
            event: EncodedWatchEvent::new(&event),
            at: Instant::now(),
        };
        if svc.log.len() == DELTA_LOG_LEN {
            svc.log.pop_front();
        }
        svc.log.push_back(pushed.clone());
        // No receivers is fine: nobody watches this service right now.
        let _ = svc.tx.send(pushed);
        self.changed.send_replace(version);
        self.update_gauges(st);
        version
    }

    /// Queues the store records of a change made here.
    fn queue_records(st: &mut State, name: &str, change: &Change, version: u64) {
        let Some(svc) = st.services.get(name) else {
            return;
        };
        let mut records = Vec::new();
        for e in change.added.iter().chain(&change.changed) {
            let id = e
                .instance
                .as_ref()
                .map(|i| i.instance_id.as_str())
                .unwrap_or_default();
            if let Some(entry) = svc.endpoints.get(id) {
                records.push(Record::PutEndpoint {
                    service: name.to_string(),
                    endpoint: st.persisted(entry),
                });
            }
        }
        for id in &change.removed {
            records.push(Record::DeleteEndpoint {
                service: name.to_string(),
                instance_id: id.clone(),
            });
        }
        if change.policy.is_some() || change.policy_removed {
            records.push(Record::Policy {
                service: name.to_string(),
                policy: change.policy.clone(),
            });
        }
        records.push(Record::Version {
            service: name.to_string(),
            version,
        });
        st.pending.extend(records);
    }

    fn update_gauges(&self, st: &State) {
        let (mut serving, mut not_serving, mut unknown) = (0i64, 0i64, 0i64);
        let mut services = 0i64;
        for svc in st.services.values() {
            services += i64::from(svc.exists());
            for e in svc.endpoints.values() {
                match e.health {
                    Health::Serving => serving += 1,
                    Health::NotServing => not_serving += 1,
                    Health::Unknown => unknown += 1,
                }
            }
        }
        self.metrics
            .set_counts(services, serving, not_serving, unknown);
    }

    /// Registers an already validated instance.
    pub fn register(
        &self,
        instance: Instance,
        static_endpoint: bool,
        ttl: Option<Duration>,
        health: Health,
    ) -> Result<Registered, RegistryError> {
        let mut st = self.lock();
        let name = instance.service.clone();
        let id = instance.instance_id.clone();
        let old = st
            .services
            .get(&name)
            .and_then(|s| s.endpoints.get(&id))
            .cloned();
        if let Some(old) = &old
            && static_endpoint
            && old.lease.is_some()
        {
            return Err(RegistryError::Conflict(id));
        }
        // A sidecar that registers again (it restarted, or its lease was lost)
        // replaces its previous lease.
        if let Some(old_lease) = old.as_ref().and_then(|o| o.lease) {
            st.leases.remove(&old_lease);
        }
        let (lease_id, ttl) = if static_endpoint {
            (0, Duration::ZERO)
        } else {
            let ttl = ttl
                .unwrap_or(self.leases.default_ttl)
                .clamp(self.leases.min_ttl, self.leases.max_ttl);
            let lease_id = unguessable_lease(&st.leases);
            st.leases.insert(
                lease_id,
                Lease {
                    service: name.clone(),
                    instance_id: id.clone(),
                    ttl,
                    state: LeaseState::Active {
                        deadline: Instant::now() + ttl,
                    },
                },
            );
            (lease_id, ttl)
        };
        let entry = Entry {
            instance,
            health,
            version: st.version + 1,
            lease: (lease_id != 0).then_some(lease_id),
        };
        let mut change = Change::default();
        if old.is_some() {
            change.changed.push(entry.endpoint());
        } else {
            change.added.push(entry.endpoint());
        }
        st.services
            .entry(name.clone())
            .or_insert_with(|| Service::new(0))
            .endpoints
            .insert(id.clone(), entry);
        let version = self.commit(&mut st, &name, change);
        self.metrics.registrations.inc();
        Ok(Registered {
            lease_id,
            ttl,
            instance_id: id,
            version,
        })
    }

    /// Renews a lease and records the sidecar's health report. A lease in its
    /// grace period comes back to life: the sidecar was only cut off.
    pub fn heartbeat(&self, lease_id: u64, health: Health) -> Result<Duration, RegistryError> {
        let mut st = self.lock();
        let lease = st
            .leases
            .get_mut(&lease_id)
            .ok_or(RegistryError::UnknownLease(lease_id))?;
        lease.state = LeaseState::Active {
            deadline: Instant::now() + lease.ttl,
        };
        let (ttl, name, id) = (lease.ttl, lease.service.clone(), lease.instance_id.clone());
        self.set_health(&mut st, &name, &id, health);
        Ok(ttl)
    }

    fn set_health(&self, st: &mut State, name: &str, id: &str, health: Health) {
        let next_version = st.version + 1;
        let Some(entry) = st
            .services
            .get_mut(name)
            .and_then(|s| s.endpoints.get_mut(id))
        else {
            return;
        };
        if entry.health == health {
            return;
        }
        entry.health = health;
        entry.version = next_version;
        let change = Change {
            changed: vec![entry.endpoint()],
            ..Change::default()
        };
        self.commit(st, name, change);
    }

    /// Removes a leased registration.
    pub fn deregister_lease(&self, lease_id: u64) -> Result<u64, RegistryError> {
        let mut st = self.lock();
        let lease = st
            .leases
            .remove(&lease_id)
            .ok_or(RegistryError::UnknownLease(lease_id))?;
        Ok(self.remove_entry(&mut st, &lease.service, &lease.instance_id))
    }

    /// Removes a static endpoint by address.
    pub fn deregister_address(
        &self,
        service: &str,
        address: &str,
        port: u32,
    ) -> Result<u64, RegistryError> {
        let mut st = self.lock();
        let id = Self::find_static(&st, service, address, port)?;
        Ok(self.remove_entry(&mut st, service, &id))
    }

    /// The instance id of the static endpoint `address:port` of `service`.
    pub fn static_instance(
        &self,
        service: &str,
        address: &str,
        port: u32,
    ) -> Result<String, RegistryError> {
        Self::find_static(&self.lock(), service, address, port)
    }

    fn find_static(
        st: &State,
        service: &str,
        address: &str,
        port: u32,
    ) -> Result<String, RegistryError> {
        let found = st.services.get(service).and_then(|s| {
            s.endpoints
                .values()
                .find(|e| e.instance.address == address && e.instance.port == port)
                .map(|e| (e.instance.instance_id.clone(), e.lease))
        });
        let (id, lease) = found.ok_or_else(|| RegistryError::UnknownEndpoint {
            service: service.to_string(),
            address: format!("{address}:{port}"),
        })?;
        if lease.is_some() {
            return Err(RegistryError::Conflict(id));
        }
        Ok(id)
    }

    /// The lease of instance `id` of `service`: `None` when it is not
    /// registered, `Some(None)` for a static endpoint.
    pub fn lease_of(&self, service: &str, id: &str) -> Option<Option<u64>> {
        let st = self.lock();
        Some(st.services.get(service)?.endpoints.get(id)?.lease)
    }

    /// What lease `lease_id` keeps: service, instance id, TTL and the
    /// instance's health.
    pub fn lease_holder(&self, lease_id: u64) -> Option<(String, String, Duration, Health)> {
        let st = self.lock();
        let lease = st.leases.get(&lease_id)?;
        let health = st
            .services
            .get(&lease.service)?
            .endpoints
            .get(&lease.instance_id)?
            .health;
        Some((
            lease.service.clone(),
            lease.instance_id.clone(),
            lease.ttl,
            health,
        ))
    }

    /// The latest version.
    pub fn version(&self) -> u64 {
        self.lock().version
    }

    /// Instance `id` of `service` as the store keeps it.
    pub fn endpoint(&self, service: &str, id: &str) -> Option<PersistedEndpoint> {
        let st = self.lock();
        Some(st.persisted(st.services.get(service)?.endpoints.get(id)?))
    }

    /// Applies the records of one revision of a shared store, as one change
    /// per service. A service is versioned by its `Version` record when that
    /// moves it forward, else by `revision`. Puts that change nothing are
    /// skipped, so applying a state the registry already has pushes nothing.
    pub fn apply(&self, revision: u64, records: Vec<Record>) {
        let mut st = self.lock();
        let mut changes: BTreeMap<String, Change> = BTreeMap::new();
        let mut versions: HashMap<String, u64> = HashMap::new();
        for r in records {
            match r {
                Record::PutEndpoint { service, endpoint } => {
                    let PersistedEndpoint {
                        instance,
                        health,
                        lease,
                        ttl_ms,
                        ..
                    } = endpoint;
                    let id = instance.instance_id.clone();
                    let svc = st
                        .services
                        .entry(service.clone())
                        .or_insert_with(|| Service::new(0));
                    let old = svc.endpoints.get(&id);
                    if old.is_some_and(|o| {
                        o.instance == instance && o.health == health && o.lease == lease
                    }) {
                        continue;
                    }
                    let existed = old.is_some();
                    let old_lease = old.and_then(|o| o.lease).filter(|l| Some(*l) != lease);
                    let entry = Entry {
                        instance,
                        health,
                        version: revision,
                        lease,
                    };
                    let ep = entry.endpoint();
                    svc.endpoints.insert(id.clone(), entry);
                    if let Some(l) = old_lease {
                        st.leases.remove(&l);
                    }
                    if let Some(l) = lease {
                        let ttl = Duration::from_millis(ttl_ms.unwrap_or(0).into());
                        st.leases.insert(
                            l,
                            Lease {
                                service: service.clone(),
                                instance_id: id,
                                ttl,
                                // The store expires mirrored leases; this
                                // deadline is never read.
                                state: LeaseState::Active {
                                    deadline: Instant::now() + ttl,
                                },
                            },
                        );
                    }
                    let c = changes.entry(service).or_default();
                    if existed {
                        c.changed.push(ep);
                    } else {
                        c.added.push(ep);
                    }
                }
                Record::DeleteEndpoint {
                    service,
                    instance_id,
                } => {
                    let Some(old) = st
                        .services
                        .get_mut(&service)
                        .and_then(|s| s.endpoints.remove(&instance_id))
                    else {
                        continue;
                    };
                    if let Some(l) = old.lease {
                        st.leases.remove(&l);
                    }
                    changes
                        .entry(service)
                        .or_default()
                        .removed
                        .push(instance_id);
                }
                Record::Policy { service, policy } => {
                    let svc = st
                        .services
                        .entry(service.clone())
                        .or_insert_with(|| Service::new(0));
                    if svc.policy == policy {
                        continue;
                    }
                    svc.policy = policy.clone();
                    let c = changes.entry(service).or_default();
                    c.policy_removed = policy.is_none();
                    c.policy = policy;
                }
                Record::Version { service, version } => {
                    versions.insert(service, version);
                }
                Record::Counters { .. } => {}
            }
        }
        for (name, change) in changes {
            let current = st.services.get(&name).map_or(0, |s| s.version);
            let version = versions
                .get(&name)
                .copied()
                .filter(|v| *v > current)
                .unwrap_or(revision);
            self.commit_at(&mut st, &name, change, version);
        }
        st.version = st.version.max(revision);
    }

    /// Makes the registry equal to `state`, read from a shared store at
    /// `revision` (after a start or a lost connection): only the differences
    /// reach the watchers.
    pub fn reset(&self, revision: u64, state: Persisted) {
        let mut records = Vec::new();
        {
            let st = self.lock();
            let wanted: HashMap<&str, &PersistedService> = state
                .services
                .iter()
                .map(|s| (s.name.as_str(), s))
                .collect();
            for (name, svc) in &st.services {
                let keep = wanted.get(name.as_str());
                for id in svc.endpoints.keys() {
                    if !keep
                        .is_some_and(|k| k.endpoints.iter().any(|e| &e.instance.instance_id == id))
                    {
                        records.push(Record::DeleteEndpoint {
                            service: name.clone(),
                            instance_id: id.clone(),
                        });
                    }
                }
                if svc.policy.is_some() && keep.is_none_or(|k| k.policy.is_none()) {
                    records.push(Record::Policy {
                        service: name.clone(),
                        policy: None,
                    });
                }
            }
        }
        for s in state.services {
            records.push(Record::Version {
                service: s.name.clone(),
                version: s.version,
            });
            if s.policy.is_some() {
                records.push(Record::Policy {
                    service: s.name.clone(),
                    policy: s.policy,
                });
            }
            for endpoint in s.endpoints {
                records.push(Record::PutEndpoint {
                    service: s.name.clone(),
                    endpoint,
                });
            }
        }
        self.apply(revision, records);
    }

    fn remove_entry(&self, st: &mut State, service: &str, id: &str) -> u64 {
        let removed = st
            .services
            .get_mut(service)
            .and_then(|s| s.endpoints.remove(id))
            .is_some();
        if !removed {
            return st.version;
        }
        let change = Change {
            removed: vec![id.to_string()],
            ..Change::default()
        };
        self.commit(st, service, change)
    }

    /// Applies policies (already validated). Unchanged ones are skipped.
    /// Returns the version and the services that changed.
    pub fn apply_policies(&self, policies: Vec<ServicePolicy>) -> (u64, Vec<String>) {
        let mut st = self.lock();
        let mut changed = Vec::new();
        for p in policies {
            let name = p.service.clone();
            let svc = st
                .services
                .entry(name.clone())
                .or_insert_with(|| Service::new(0));
            if svc.policy.as_ref() == Some(&p) {
                continue;
            }
            svc.policy = Some(p.clone());
            let change = Change {
                policy: Some(p),
                ..Change::default()
            };
            self.commit(&mut st, &name, change);
            changed.push(name);
        }
        (st.version, changed)
    }

    /// Removes a service's policy; returns whether it had one.
    pub fn remove_policy(&self, service: &str) -> bool {
        let mut st = self.lock();
        let had = st
            .services
            .get_mut(service)
            .and_then(|s| s.policy.take())
            .is_some();
        if had {
            let change = Change {
                policy_removed: true,
                ..Change::default()
            };
            self.commit(&mut st, service, change);
        }
        had
    }

    /// A service's policy.
    pub fn policy(&self, service: &str) -> Option<ServicePolicy> {
        self.lock().services.get(service)?.policy.clone()
    }

    /// Summaries of every existing service, sorted by name.
    pub fn services(&self) -> Vec<ServiceSummary> {
        let st = self.lock();
        let mut out: Vec<_> = st
            .services
            .iter()
            .filter(|(_, s)| s.exists())
            .map(|(name, s)| ServiceSummary {
                name: name.clone(),
                instances: s.endpoints.len() as u32,
                serving: s
                    .endpoints
                    .values()
                    .filter(|e| e.health == Health::Serving)
                    .count() as u32,
                version: s.version,
                has_policy: s.policy.is_some(),
            })
            .collect();
        out.sort_by(|a, b| a.name.cmp(&b.name));
        out
    }

    /// Wakes on every change to any service.
    pub fn watch_changes(&self) -> tokio::sync::watch::Receiver<u64> {
        self.changed.subscribe()
    }

    /// Which addresses belong to which service: every existing service with
    /// the distinct IPs of its instances, sorted.
    pub fn catalog(&self) -> CatalogUpdate {
        let st = self.lock();
        let mut services: Vec<_> = st
            .services
            .iter()
            .filter(|(_, s)| s.exists())
            .map(|(name, s)| {
                let addresses: std::collections::BTreeSet<_> = s
                    .endpoints
                    .values()
                    .map(|e| e.instance.address.clone())
                    .collect();
                CatalogService {
                    name: name.clone(),
                    addresses: addresses.into_iter().collect(),
                }
            })
            .collect();
        services.sort_by(|a, b| a.name.cmp(&b.name));
        CatalogUpdate {
            version: st.version,
            services,
        }
    }

    /// A service's version and endpoints (sorted by instance id).
    pub fn endpoints(&self, service: &str) -> Option<(u64, Vec<Endpoint>)> {
        let st = self.lock();
        let s = st.services.get(service).filter(|s| s.exists())?;
        Some((
            s.version,
            s.endpoints.values().map(Entry::endpoint).collect(),
        ))
    }

    /// Sets the roots every snapshot carries from now on.
    pub fn set_trust_bundle(&self, roots: Vec<Vec<u8>>) {
        if let Ok(mut b) = self.trust_bundle.write() {
            *b = roots;
        }
    }

    /// The roots every snapshot carries.
    pub fn trust_bundle(&self) -> Vec<Vec<u8>> {
        self.trust_bundle
            .read()
            .map(|b| b.clone())
            .unwrap_or_default()
    }

    /// Whether a client holding roots with `sha256` needs the current bundle.
    pub fn bundle_differs(&self, sha256: &[u8]) -> bool {
        if sha256.is_empty() {
            return false;
        }
        let b = self
            .trust_bundle
            .read()
            .map(|b| b.clone())
            .unwrap_or_default();
        wayfinder_proto::bundle_sha256(&b) != sha256
    }

    /// Starts watching `name` from `last_version` (0 = snapshot). Creates an
    /// empty entry for a service that does not exist yet, so its first
    /// registration reaches the watcher as a delta.
    pub fn subscribe(&self, name: &str, last_version: u64) -> Subscription {
        let mut st = self.lock();
        let svc = st
            .services
            .entry(name.to_string())
            .or_insert_with(|| Service::new(0));
        let rx = svc.tx.subscribe();
        if last_version != 0 && last_version == svc.version {
            return Subscription {
                initial: Vec::new(),
                rx,
                snapshot: false,
            };
        }
        if last_version != 0
            && let Some(start) = svc.log.iter().position(|p| p.prev_version == last_version)
        {
            return Subscription {
                initial: svc
                    .log
                    .iter()
                    .skip(start)
                    .map(|p| p.event.clone())
                    .collect(),
                rx,
                snapshot: false,
            };
        }
        Subscription {
            initial: vec![EncodedWatchEvent::new(
                &svc.snapshot(
                    name,
                    &self
                        .trust_bundle
                        .read()
                        .map(|b| b.clone())
                        .unwrap_or_default(),
                ),
            )],
            rx,
            snapshot: true,
        }
    }

    /// Drops empty service entries nobody watches any more.
    pub fn collect_garbage(&self) {
        let mut st = self.lock();
        st.services
            .retain(|_, s| s.exists() || s.tx.receiver_count() > 0);
    }

    /// Expires leases whose deadline passed (their instances turn NOT_SERVING)
    /// and removes instances whose grace period ended. Returns how many
    /// leases expired and how many instances were removed.
    pub fn reap(&self, now: Instant) -> (usize, usize) {
        if self.mirror {
            return (0, 0);
        }
        let mut st = self.lock();
        let mut expired = Vec::new();
        let mut removed = Vec::new();
        for (&id, lease) in st.leases.iter_mut() {
            match lease.state {
                LeaseState::Active { deadline } if deadline <= now => {
                    lease.state = LeaseState::Expired {
                        remove_at: deadline + self.leases.grace,
                    };
                    expired.push((lease.service.clone(), lease.instance_id.clone()));
                    if deadline + self.leases.grace <= now {
                        removed.push(id);
                    }
                }
                LeaseState::Expired { remove_at } if remove_at <= now => removed.push(id),
                _ => {}
            }
        }
        for (service, instance) in &expired {
            self.set_health(&mut st, service, instance, Health::NotServing);
        }
        for id in &removed {
            if let Some(lease) = st.leases.remove(id) {
                self.remove_entry(&mut st, &lease.service, &lease.instance_id);
            }
        }
        self.metrics.lease_expirations.inc_by(expired.len() as u64);
        (expired.len(), removed.len())
    }

    /// A fresh snapshot and receiver for a watcher that lagged behind.
    pub fn resubscribe(&self, name: &str) -> Subscription {
        self.subscribe(name, 0)
    }

    /// Change counter for the store: differs from the last saved value when
    /// something must be written.
    pub fn dirty(&self) -> u64 {
        self.lock().dirty
    }

    /// Takes the change records not yet stored, with the change counter they
    /// bring the store up to and the lease counter to remember.
    pub fn take_pending(&self) -> (u64, Vec<Record>) {
        let mut st = self.lock();
        let mut records = std::mem::take(&mut st.pending);
        if !records.is_empty() {
            records.push(Record::Counters {
                version: st.version,
                next_lease: 0,
            });
        }
        (st.dirty, records)
    }

    /// The whole state, for compacting the store; pending records are
    /// dropped because the snapshot contains them.
    pub fn snapshot_all(&self) -> (u64, Persisted) {
        let mut st = self.lock();
        st.pending.clear();
        let mut services: Vec<_> = st
            .services
            .iter()
            .filter(|(_, s)| s.exists())
            .map(|(name, s)| PersistedService {
                name: name.clone(),
                version: s.version,
                policy: s.policy.clone(),
                endpoints: s.endpoints.values().map(|e| st.persisted(e)).collect(),
            })
            .collect();
        services.sort_by(|a, b| a.name.cmp(&b.name));
        (
            st.dirty,
            Persisted {
                version: st.version,
                next_lease: 0,
                services,
            },
        )
    }
}

impl State {
    /// `e` as the store keeps it, with its lease's TTL.
    fn persisted(&self, e: &Entry) -> PersistedEndpoint {
        PersistedEndpoint {
            instance: e.instance.clone(),
            health: e.health,
            version: e.version,
            lease: e.lease,
            ttl_ms: e
                .lease
                .and_then(|l| self.leases.get(&l))
                .map(|l| l.ttl.as_millis() as u32),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use prometheus_client::registry::Registry as Prom;

    fn registry(leases: LeaseConfig) -> Arc<Registry> {
        Registry::new(
            leases,
            RegistryMetrics::register(&mut Prom::default()),
            None,
        )
    }

    fn inst(service: &str, id: &str, port: u32) -> Instance {
        Instance {
            service: service.into(),
            instance_id: id.into(),
            address: "127.0.0.1".into(),
            port,
            weight: 100,
            ..Default::default()
        }
    }

    fn decode(e: &EncodedWatchEvent) -> WatchEvent {
        e.decode().expect("valid event")
    }

    fn delta(p: &Pushed) -> Delta {
        match decode(&p.event).kind {
            Some(Kind::Delta(d)) => d,
            other => panic!("expected delta, got {other:?}"),
        }
    }

    #[tokio::test(start_paused = true)]
    async fn expired_lease_turns_unhealthy_then_is_removed_after_grace() {
        let cfg = LeaseConfig {
            default_ttl: Duration::from_secs(10),
            grace: Duration::from_secs(20),
            ..LeaseConfig::default()
        };
        let reg = registry(cfg);
        let r = reg
            .register(inst("web", "web-1", 1), false, None, Health::Serving)
            .expect("registers");
        let mut sub = reg.subscribe("web", r.version);
        assert!(
            sub.initial.is_empty(),
            "resuming at the current version sends nothing"
        );

        tokio::time::advance(Duration::from_secs(9)).await;
        assert_eq!(reg.reap(Instant::now()), (0, 0));
        assert_eq!(
            reg.heartbeat(r.lease_id, Health::Serving),
            Ok(cfg.default_ttl)
        );

        tokio::time::advance(Duration::from_secs(10)).await;
        assert_eq!(reg.reap(Instant::now()), (1, 0));
        let d = delta(&sub.rx.try_recv().expect("health delta"));
        assert_eq!(d.changed[0].health, Health::NotServing as i32);

        tokio::time::advance(Duration::from_secs(19)).await;
        assert_eq!(reg.reap(Instant::now()), (0, 0));
        tokio::time::advance(Duration::from_secs(1)).await;
        assert_eq!(reg.reap(Instant::now()), (0, 1));
        assert_eq!(
            delta(&sub.rx.try_recv().expect("removal")).removed,
            vec!["web-1"]
        );
        assert_eq!(
            reg.heartbeat(r.lease_id, Health::Serving),
            Err(RegistryError::UnknownLease(r.lease_id))
        );
    }

    #[tokio::test(start_paused = true)]
    async fn heartbeat_in_grace_period_revives_the_instance() {
        let reg = registry(LeaseConfig::default());
        let r = reg
            .register(
                inst("web", "web-1", 1),
                false,
                Some(Duration::from_secs(2)),
                Health::Serving,
            )
            .expect("registers");
        tokio::time::advance(Duration::from_secs(3)).await;
        reg.reap(Instant::now());
        assert_eq!(
            reg.endpoints("web").expect("exists").1[0].health,
            Health::NotServing as i32
        );
        reg.heartbeat(r.lease_id, Health::Serving)
            .expect("lease still known");
        assert_eq!(
            reg.endpoints("web").expect("exists").1[0].health,
            Health::Serving as i32
        );
        tokio::time::advance(Duration::from_secs(10)).await;
        assert_eq!(
            reg.reap(Instant::now()),
            (1, 0),
            "expires again, but is not removed yet"
        );
        tokio::time::advance(Duration::from_secs(20)).await;
        assert_eq!(
            reg.reap(Instant::now()),
            (0, 1),
            "removed once the grace period ends"
        );
    }

    #[tokio::test]
    async fn deltas_arrive_in_order_and_resume_uses_the_log() {
        let reg = registry(LeaseConfig::default());
        let mut sub = reg.subscribe("api", 0);
        assert!(sub.snapshot);
        let snap = decode(&sub.initial[0]);
        assert!(matches!(
            snap.kind,
            Some(Kind::Snapshot(Snapshot { exists: false, .. }))
        ));

        let a = reg
            .register(inst("api", "a", 1), true, None, Health::Unknown)
            .expect("a");
        let b = reg
            .register(inst("api", "b", 2), true, None, Health::Unknown)
            .expect("b");
        reg.deregister_address("api", "127.0.0.1", 1)
            .expect("removes a");
        let got: Vec<_> = (0..3).map(|_| sub.rx.try_recv().expect("delta")).collect();
        assert_eq!(got[0].prev_version, 0);
        assert_eq!(got[1].prev_version, a.version);
        assert_eq!(got[2].prev_version, b.version);
        assert_eq!(delta(&got[2]).removed, vec!["a"]);

        // A client that saw only the first change gets exactly the two after it.
        let resumed = reg.subscribe("api", a.version);
        assert!(!resumed.snapshot);
        let versions: Vec<_> = resumed.initial.iter().map(|e| decode(e).version).collect();
        assert_eq!(versions, vec![got[1].version, got[2].version]);
    }

    #[tokio::test]
    async fn resume_beyond_the_log_gets_a_snapshot() {
        let reg = registry(LeaseConfig::default());
        let first = reg
            .register(inst("web", "w", 1), true, None, Health::Unknown)
            .expect("w");
        for i in 0..DELTA_LOG_LEN as u32 + 5 {
            let h = if i % 2 == 0 {
                Health::Serving
            } else {
                Health::NotServing
            };
            let r = reg
                .register(inst("web", "w", 1), true, None, h)
                .expect("re-register");
            assert!(r.version > first.version);
        }
        let sub = reg.subscribe("web", first.version);
        assert!(sub.snapshot);
    }

    #[tokio::test]
    async fn a_slow_receiver_lags_instead_of_growing_memory() {
        let reg = registry(LeaseConfig::default());
        let mut slow = reg.subscribe("web", 0).rx;
        for i in 0..BROADCAST_CAPACITY as u32 + 10 {
            reg.register(
                inst("web", &format!("w{i}"), i + 1),
                true,
                None,
                Health::Unknown,
            )
            .expect("registers");
        }
        assert!(matches!(
            slow.try_recv(),
            Err(broadcast::error::TryRecvError::Lagged(_))
        ));
        let fresh = reg.resubscribe("web");
        match decode(&fresh.initial[0]).kind {
            Some(Kind::Snapshot(s)) => assert_eq!(s.endpoints.len(), BROADCAST_CAPACITY + 10),
            other => panic!("expected snapshot, got {other:?}"),
        }
    }

    #[tokio::test]
    async fn versions_seen_before_a_crash_are_never_reused_after_it() {
        let before = registry(LeaseConfig::default());
        before
            .register(inst("web", "a", 1), true, None, Health::Unknown)
            .expect("a");
        let (_, saved) = before.snapshot_all();
        // Pushed to watchers, lost in the crash before it was written.
        let lost = before
            .register(inst("web", "b", 2), true, None, Health::Unknown)
            .expect("b");

        let after = Registry::new(
            LeaseConfig::default(),
            RegistryMetrics::register(&mut Prom::default()),
            Some(saved),
        );
        let c = after
            .register(inst("web", "c", 3), true, None, Health::Unknown)
            .expect("c");
        assert!(
            c.version > lost.version,
            "{} reused {}",
            c.version,
            lost.version
        );
        // A watcher that saw the lost change resumes with a snapshot.
        let sub = after.subscribe("web", lost.version);
        assert!(sub.snapshot);
    }

    #[tokio::test]
    async fn unchanged_policy_is_not_pushed_again() {
        let reg = registry(LeaseConfig::default());
        let p = ServicePolicy {
            service: "web".into(),
            balancer: 1,
            ..Default::default()
        };
        assert_eq!(reg.apply_policies(vec![p.clone()]).1, vec!["web"]);
        assert!(reg.apply_policies(vec![p]).1.is_empty());
        assert!(reg.remove_policy("web"));
        assert!(reg.services().is_empty());
    }

    #[tokio::test]
    async fn static_and_leased_registrations_do_not_replace_each_other_by_address() {
        let reg = registry(LeaseConfig::default());
        reg.register(inst("web", "web-1", 1), false, None, Health::Serving)
            .expect("leased");
        assert_eq!(
            reg.register(inst("web", "web-1", 1), true, None, Health::Unknown),
            Err(RegistryError::Conflict("web-1".into()))
        );
        assert!(matches!(
            reg.deregister_address("web", "127.0.0.1", 1),
            Err(RegistryError::Conflict(_))
        ));
    }

    fn mirror() -> Arc<Registry> {
        Registry::mirror(
            LeaseConfig::default(),
            RegistryMetrics::register(&mut Prom::default()),
        )
    }

    fn put(id: &str, port: u32, health: Health, lease: Option<u64>) -> Record {
        Record::PutEndpoint {
            service: "web".into(),
            endpoint: PersistedEndpoint {
                instance: inst("web", id, port),
                health,
                version: 0,
                lease,
                ttl_ms: lease.map(|_| 2000),
            },
        }
    }

    #[tokio::test]
    async fn a_mirror_versions_changes_by_store_revision_and_skips_echoes() {
        let reg = mirror();
        let mut sub = reg.subscribe("web", 0);
        reg.apply(
            7,
            vec![
                put("web-1", 1, Health::Serving, Some(70)),
                put("web-2", 2, Health::Serving, None),
            ],
        );
        let d = delta(&sub.rx.try_recv().expect("one delta for the revision"));
        assert_eq!((d.prev_version, d.added.len()), (0, 2));
        assert_eq!(reg.endpoints("web").expect("exists").0, 7);
        assert_eq!(reg.lease_holder(70).map(|h| h.1), Some("web-1".to_string()));

        // The same state again (a write coming back, a reconnect) pushes nothing.
        reg.apply(8, vec![put("web-2", 2, Health::Serving, None)]);
        assert!(sub.rx.try_recv().is_err());

        reg.apply(
            9,
            vec![Record::DeleteEndpoint {
                service: "web".into(),
                instance_id: "web-1".into(),
            }],
        );
        let d = delta(&sub.rx.try_recv().expect("removal"));
        assert_eq!((d.prev_version, d.removed), (7, vec!["web-1".to_string()]));
        assert!(reg.lease_holder(70).is_none(), "its lease is gone too");
        // Nothing is queued for a local store, and leases are etcd's to expire.
        assert!(reg.take_pending().1.is_empty());
        assert_eq!(reg.reap(Instant::now() + Duration::from_secs(3600)), (0, 0));
    }

    #[tokio::test]
    async fn a_mirror_reset_pushes_only_the_differences() {
        let reg = mirror();
        reg.apply(
            5,
            vec![
                put("web-1", 1, Health::Serving, None),
                put("web-2", 2, Health::Serving, None),
            ],
        );
        let mut sub = reg.subscribe("web", 5);
        assert!(sub.initial.is_empty(), "resumes at the revision");
        // While cut off: web-2 left, web-3 came, a policy was set.
        let state = Persisted {
            version: 12,
            next_lease: 0,
            services: vec![PersistedService {
                name: "web".into(),
                version: 11,
                policy: Some(ServicePolicy {
                    service: "web".into(),
                    balancer: 1,
                    ..Default::default()
                }),
                endpoints: vec![
                    PersistedEndpoint {
                        instance: inst("web", "web-1", 1),
                        health: Health::Serving,
                        version: 5,
                        lease: None,
                        ttl_ms: None,
                    },
                    PersistedEndpoint {
                        instance: inst("web", "web-3", 3),
                        health: Health::Serving,
                        version: 11,
                        lease: None,
                        ttl_ms: None,
                    },
                ],
            }],
        };
        reg.reset(12, state.clone());
        let d = delta(&sub.rx.try_recv().expect("one delta"));
        assert_eq!(d.prev_version, 5);
        assert_eq!(d.removed, vec!["web-2".to_string()]);
        assert_eq!(d.added.len(), 1);
        assert!(d.policy.is_some());
        assert!(d.changed.is_empty(), "web-1 did not change");
        assert_eq!(reg.endpoints("web").expect("exists").0, 11);
        reg.reset(13, state);
        assert!(sub.rx.try_recv().is_err(), "the same state again is silent");
    }
}
