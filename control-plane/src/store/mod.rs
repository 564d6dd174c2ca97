//! Durable state: the seam between the registry and where it is kept.
//!
//! The registry describes each change as [`Record`]s (put or delete one
//! endpoint, set a policy): small, idempotent, replayable in order. Two
//! backends keep them: the embedded files of one wf-control ([`file`], written
//! by [`persister`]), and etcd, shared by several replicas ([`etcd`]).
//! [`Backend`] is what the gRPC API writes through, whichever is in use.

pub mod backend;
pub mod etcd;
pub mod file;
pub mod persister;

pub use backend::{Backend, BackendError, Embedded};
pub use file::FileStore;
pub use persister::Persister;

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};
use thiserror::Error;
use wayfinder_proto::v1::{Health, Instance, ServicePolicy};

/// Where the registry is kept (`--store`), parsed once at start-up.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoreSpec {
    /// Files in the data directory, for one wf-control (`embedded`).
    Embedded,
    /// An etcd cluster shared by replicas (`etcd://HOST:PORT[,HOST:PORT...]`):
    /// its members.
    Etcd(Vec<(String, u16)>),
}

impl std::str::FromStr for StoreSpec {
    type Err = etcd::EtcdError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "embedded" => Ok(StoreSpec::Embedded),
            _ => etcd::parse_members(s).map(StoreSpec::Etcd),
        }
    }
}

/// One change, as appended to the log.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Record {
    /// An endpoint was added or changed (full new value).
    PutEndpoint {
        /// Service.
        service: String,
        /// The endpoint.
        endpoint: PersistedEndpoint,
    },
    /// An endpoint was removed.
    DeleteEndpoint {
        /// Service.
        service: String,
        /// Instance id.
        instance_id: String,
    },
    /// A policy was set (or removed, when `None`).
    Policy {
        /// Service.
        service: String,
        /// New policy (boxed: a policy with routes and a fault is several
        /// times larger than the other records; serialised the same).
        policy: Option<Box<ServicePolicy>>,
    },
    /// A service's version after a change.
    Version {
        /// Service.
        service: String,
        /// Version.
        version: u64,
    },
    /// Registry-wide counters at the end of a batch.
    Counters {
        /// Registry version.
        version: u64,
        /// Formerly the next lease id; lease ids are random now, so the
        /// registry writes 0. The field stays so the format is unchanged.
        next_lease: u64,
    },
}

/// Everything that survives a restart.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Persisted {
    /// Last registry version, so versions keep growing across restarts.
    pub version: u64,
    /// Formerly the next lease id; lease ids are random now, so the
    /// registry writes 0. The field stays so the format is unchanged.
    pub next_lease: u64,
    /// Services with endpoints or a policy.
    pub services: Vec<PersistedService>,
}

/// One service.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PersistedService {
    /// Name.
    pub name: String,
    /// Version of its last change.
    pub version: u64,
    /// Policy, if any.
    pub policy: Option<ServicePolicy>,
    /// Endpoints.
    pub endpoints: Vec<PersistedEndpoint>,
}

/// One endpoint. Leased ones are kept too: after a restart their sidecars
/// keep heartbeating the same lease and watchers see no churn; leases whose
/// sidecar is gone expire one TTL later.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PersistedEndpoint {
    /// The registration.
    pub instance: Instance,
    /// Last known health.
    pub health: Health,
    /// Version of its last change.
    pub version: u64,
    /// Lease id, for leased registrations.
    pub lease: Option<u64>,
    /// Lease TTL in milliseconds, for leased registrations.
    pub ttl_ms: Option<u32>,
}

impl Persisted {
    /// Applies records in order on top of this state.
    pub fn replay(&mut self, records: impl IntoIterator<Item = Record>) {
        type Endpoints = BTreeMap<String, PersistedEndpoint>;
        let mut services: BTreeMap<String, (u64, Option<ServicePolicy>, Endpoints)> =
            std::mem::take(&mut self.services)
                .into_iter()
                .map(|s| {
                    let eps = s
                        .endpoints
                        .into_iter()
                        .map(|e| (e.instance.instance_id.clone(), e))
                        .collect();
                    (s.name, (s.version, s.policy, eps))
                })
                .collect();
        for r in records {
            match r {
                Record::PutEndpoint { service, endpoint } => {
                    let id = endpoint.instance.instance_id.clone();
                    services.entry(service).or_default().2.insert(id, endpoint);
                }
                Record::DeleteEndpoint {
                    service,
                    instance_id,
                } => {
                    services.entry(service).or_default().2.remove(&instance_id);
                }
                Record::Policy { service, policy } => {
                    services.entry(service).or_default().1 = policy.map(|p| *p)
                }
                Record::Version { service, version } => {
                    services.entry(service).or_default().0 = version
                }
                Record::Counters {
                    version,
                    next_lease,
                } => {
                    self.version = self.version.max(version);
                    self.next_lease = self.next_lease.max(next_lease);
                }
            }
        }
        self.services = services
            .into_iter()
            .filter(|(_, (_, policy, eps))| !eps.is_empty() || policy.is_some())
            .map(|(name, (version, policy, eps))| PersistedService {
                name,
                version,
                policy,
                endpoints: eps.into_values().collect(),
            })
            .collect();
    }
}

/// The state could not be read or written.
#[derive(Debug, Error)]
pub enum StoreError {
    /// I/O on the data directory.
    #[error("{path}: {source}")]
    Io {
        /// File involved.
        path: PathBuf,
        /// Cause.
        source: std::io::Error,
    },
    /// The file is not a state document we understand.
    #[error("{path}: not a valid state file: {message}")]
    Corrupt {
        /// File involved.
        path: PathBuf,
        /// Parser message.
        message: String,
    },
}

/// Where registry state is kept.
pub trait Store: Send + Sync + 'static {
    /// Reads the last saved state; `None` on first start.
    fn load(&self) -> Result<Option<Persisted>, StoreError>;
    /// Appends change records durably, in order.
    fn append(&self, records: &[Record]) -> Result<(), StoreError>;
    /// Whether the store would like a full snapshot to shorten its history.
    fn wants_compaction(&self) -> bool;
    /// Replaces everything with `state` durably.
    fn compact(&self, state: &Persisted) -> Result<(), StoreError>;
    /// Human description for logs.
    fn describe(&self) -> String;
}
