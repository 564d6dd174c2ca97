//! The registry: services, their endpoints and policy, leases, versions, and
//! the per-service broadcast that carries every change to the watchers.
//!
//! All state sits behind one mutex. A mutation changes the state, encodes its
//! delta once and broadcasts it while still holding the lock; a new watcher
//! takes its snapshot and subscribes under the same lock. So a watcher sees
//! every change after its snapshot exactly once, in version order, without
//! gaps, and the lock is held only for in-memory work (never across I/O).
//!
//! The methods of [`Registry`] are split by concern over that one state, an
//! `impl Registry` block per file: `leases` (registration, heartbeats, the
//! reaper), `watch` (subscriptions), `mirror` (applying a shared store's
//! records), `persistence` (records and snapshots for the store), `views`
//! (reads, policy, the trust bundle) and `metrics`. This file holds the
//! shared types and the core they all use: locking and `Registry::commit`.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime};

use thiserror::Error;
use tokio::sync::broadcast;
use tokio::time::Instant;
use wayfinder_proto::encoded::EncodedWatchEvent;
use wayfinder_proto::v1::{
    Delta, Endpoint, Health, Instance, ServicePolicy, WatchEvent, watch_event::Kind,
};

use crate::store::{Persisted, Record};

mod leases;
mod metrics;
mod mirror;
mod persistence;
#[cfg(test)]
mod test_support;
mod views;
mod watch;

pub use leases::random_lease_id;
pub use metrics::RegistryMetrics;

/// Default of the most service entries kept at once (see
/// [`Registry::may_watch`]); each holds a broadcast queue of
/// [`BROADCAST_CAPACITY`] and a delta log, tens of KiB.
pub const MAX_SERVICES: usize = 10_000;
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
    /// Most service entries (registered, with a policy, or only watched)
    /// kept at once: watching a name creates an entry, so watches of names
    /// nobody serves are refused beyond it.
    max_services: std::sync::atomic::AtomicUsize,
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
            max_services: std::sync::atomic::AtomicUsize::new(MAX_SERVICES),
        });
        reg.update_gauges(&reg.lock());
        reg
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
}
