//! Durable state: the seam between the registry and where it is kept.
//!
//! The registry describes each change as [`Record`]s (put or delete one
//! endpoint, set a policy): small, idempotent, replayable in order. The
//! embedded backend appends them to `changes.log` (one JSON line each, fsync
//! per batch), so a write costs the size of the change, not of the registry.
//! When the log outgrows the last snapshot it is compacted: the whole state is
//! written atomically to `state.json` (temporary file, fsync, rename, fsync of
//! the directory) and the log starts again. A crash between the two only
//! replays records the snapshot already holds, which changes nothing.
//!
//! [`Persister`] group-commits: changes that arrive while one write is in
//! flight share the next one, and an RPC is acknowledged once its change is
//! durable.

use std::collections::BTreeMap;
use std::fs::{self, File, OpenOptions};
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use prometheus_client::metrics::{counter::Counter, histogram::Histogram};
use prometheus_client::registry::Registry as PromRegistry;
use serde::{Deserialize, Serialize};
use thiserror::Error;
use tokio::sync::{Notify, watch};
use wayfinder_proto::v1::{Health, Instance, ServicePolicy};

use crate::registry::Registry;

/// Format version of the persisted document.
const FORMAT: u32 = 1;
/// The log is compacted once it is larger than this many bytes and larger
/// than the last snapshot.
const COMPACT_MIN_BYTES: u64 = 4 << 20;

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
        /// New policy.
        policy: Option<ServicePolicy>,
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
        /// Next lease id.
        next_lease: u64,
    },
}

/// Everything that survives a restart.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Persisted {
    /// Last registry version, so versions keep growing across restarts.
    pub version: u64,
    /// Next lease id to hand out.
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
                    services.entry(service).or_default().1 = policy
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

/// The embedded default: a snapshot and a change log in the data directory.
pub struct FileStore {
    dir: PathBuf,
    log: std::sync::Mutex<Option<File>>,
}

#[derive(Serialize, Deserialize)]
struct Document {
    format: u32,
    #[serde(flatten)]
    state: Persisted,
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> StoreError {
    let path = path.to_path_buf();
    move |source| StoreError::Io { path, source }
}

impl FileStore {
    /// Opens (creating if needed) a data directory.
    pub fn open(dir: &Path) -> Result<Self, StoreError> {
        fs::create_dir_all(dir).map_err(io_err(dir))?;
        Ok(Self {
            dir: dir.to_path_buf(),
            log: std::sync::Mutex::new(None),
        })
    }

    fn snapshot_path(&self) -> PathBuf {
        self.dir.join("state.json")
    }

    fn log_path(&self) -> PathBuf {
        self.dir.join("changes.log")
    }

    fn sync_dir(&self) -> Result<(), StoreError> {
        File::open(&self.dir)
            .and_then(|d| d.sync_all())
            .map_err(io_err(&self.dir))
    }

    fn size(path: &Path) -> u64 {
        fs::metadata(path).map_or(0, |m| m.len())
    }
}

impl Store for FileStore {
    fn load(&self) -> Result<Option<Persisted>, StoreError> {
        let snap = self.snapshot_path();
        let mut state = match fs::read(&snap) {
            Ok(text) => {
                let doc: Document =
                    serde_json::from_slice(&text).map_err(|e| StoreError::Corrupt {
                        path: snap.clone(),
                        message: e.to_string(),
                    })?;
                if doc.format != FORMAT {
                    return Err(StoreError::Corrupt {
                        path: snap,
                        message: format!(
                            "format {} is not supported (expected {FORMAT})",
                            doc.format
                        ),
                    });
                }
                Some(doc.state)
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(source) => return Err(StoreError::Io { path: snap, source }),
        };
        let log = self.log_path();
        let file = match File::open(&log) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(state),
            Err(source) => return Err(StoreError::Io { path: log, source }),
        };
        let lines: Vec<String> = BufReader::new(file)
            .lines()
            .collect::<Result<_, _>>()
            .map_err(io_err(&log))?;
        let mut records = Vec::with_capacity(lines.len());
        for (i, line) in lines.iter().enumerate() {
            match serde_json::from_str::<Record>(line) {
                Ok(r) => records.push(r),
                // A torn last line is a batch that was never acknowledged.
                Err(_) if i + 1 == lines.len() => {
                    tracing::warn!(path = %log.display(), line = i + 1, "ignoring a torn last record");
                }
                Err(e) => {
                    return Err(StoreError::Corrupt {
                        path: log,
                        message: format!("line {}: {e}", i + 1),
                    });
                }
            }
        }
        if !records.is_empty() {
            state.get_or_insert_with(Persisted::default).replay(records);
        }
        Ok(state)
    }

    fn append(&self, records: &[Record]) -> Result<(), StoreError> {
        let path = self.log_path();
        let mut buf = Vec::new();
        for r in records {
            serde_json::to_writer(&mut buf, r).map_err(|e| StoreError::Corrupt {
                path: path.clone(),
                message: e.to_string(),
            })?;
            buf.push(b'\n');
        }
        let mut guard = self.log.lock().unwrap_or_else(|p| p.into_inner());
        if guard.is_none() {
            let f = OpenOptions::new()
                .create(true)
                .append(true)
                .open(&path)
                .map_err(io_err(&path))?;
            *guard = Some(f);
            self.sync_dir()?;
        }
        let f = guard.as_mut().ok_or_else(|| StoreError::Io {
            path: path.clone(),
            source: std::io::Error::other("log not open"),
        })?;
        f.write_all(&buf).map_err(io_err(&path))?;
        f.sync_data().map_err(io_err(&path))
    }

    fn wants_compaction(&self) -> bool {
        let log = Self::size(&self.log_path());
        log > COMPACT_MIN_BYTES && log > Self::size(&self.snapshot_path())
    }

    fn compact(&self, state: &Persisted) -> Result<(), StoreError> {
        let path = self.snapshot_path();
        let tmp = self.dir.join("state.json.tmp");
        let doc = Document {
            format: FORMAT,
            state: state.clone(),
        };
        let bytes = serde_json::to_vec(&doc).map_err(|e| StoreError::Corrupt {
            path: tmp.clone(),
            message: e.to_string(),
        })?;
        let mut f = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .open(&tmp)
            .map_err(io_err(&tmp))?;
        f.write_all(&bytes).map_err(io_err(&tmp))?;
        f.sync_all().map_err(io_err(&tmp))?;
        fs::rename(&tmp, &path).map_err(io_err(&path))?;
        self.sync_dir()?;
        // Start a new log; until this completes the old one replays harmlessly.
        let mut guard = self.log.lock().unwrap_or_else(|p| p.into_inner());
        let log = self.log_path();
        let f = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .open(&log)
            .map_err(io_err(&log))?;
        f.sync_all().map_err(io_err(&log))?;
        *guard = Some(
            OpenOptions::new()
                .append(true)
                .open(&log)
                .map_err(io_err(&log))?,
        );
        Ok(())
    }

    fn describe(&self) -> String {
        format!("embedded files in {}", self.dir.display())
    }
}

/// Metrics of the store.
#[derive(Clone)]
struct StoreMetrics {
    writes: Counter,
    errors: Counter,
    compactions: Counter,
    seconds: Histogram,
}

/// Writes registry changes in the background, batching them, and tells
/// waiters when their change is durable.
pub struct Persister {
    wake: Notify,
    durable: watch::Sender<u64>,
}

/// How long an RPC waits for its change to become durable.
const DURABLE_WAIT: Duration = Duration::from_secs(10);

impl Persister {
    /// Starts the background writer.
    pub fn start(
        registry: Arc<Registry>,
        store: Arc<dyn Store>,
        prom: &mut PromRegistry,
    ) -> Arc<Self> {
        let metrics = StoreMetrics {
            writes: Counter::default(),
            errors: Counter::default(),
            compactions: Counter::default(),
            seconds: Histogram::new(prometheus_client::metrics::histogram::exponential_buckets(
                0.0001, 2.0, 16,
            )),
        };
        prom.register(
            "wayfinder_control_store_writes",
            "Batches of changes written durably",
            metrics.writes.clone(),
        );
        prom.register(
            "wayfinder_control_store_write_errors",
            "Failed store writes",
            metrics.errors.clone(),
        );
        prom.register(
            "wayfinder_control_store_compactions",
            "Snapshots that replaced the change log",
            metrics.compactions.clone(),
        );
        prom.register(
            "wayfinder_control_store_write_seconds",
            "Time to make one batch durable",
            metrics.seconds.clone(),
        );
        // A fresh registry's change counter starts at 0 and what it restored
        // is already durable; changes made before this point (a policy file
        // applied at start) are still pending and get written first.
        let (durable, _) = watch::channel(0);
        let this = Arc::new(Self {
            wake: Notify::new(),
            durable,
        });
        let me = this.clone();
        tokio::spawn(async move {
            // A batch that failed is kept and retried before anything newer.
            let mut retry: Option<(u64, Vec<Record>)> = None;
            loop {
                let (dirty, records) = match retry.take() {
                    Some(batch) => batch,
                    None => registry.take_pending(),
                };
                if records.is_empty() {
                    if dirty != *me.durable.borrow() {
                        me.durable.send_replace(dirty);
                    }
                    // Changes made without waking us (heartbeats, lease
                    // expiry) are picked up within a second.
                    let _ = tokio::time::timeout(Duration::from_secs(1), me.wake.notified()).await;
                    continue;
                }
                let started = Instant::now();
                let st = store.clone();
                let batch = records.clone();
                let result = tokio::task::spawn_blocking(move || {
                    st.append(&batch)?;
                    Ok::<bool, StoreError>(st.wants_compaction())
                })
                .await;
                metrics.seconds.observe(started.elapsed().as_secs_f64());
                match result {
                    Ok(Ok(compact)) => {
                        metrics.writes.inc();
                        me.durable.send_replace(dirty);
                        if compact {
                            let (dirty, state) = registry.snapshot_all();
                            let st = store.clone();
                            match tokio::task::spawn_blocking(move || st.compact(&state)).await {
                                Ok(Ok(())) => {
                                    metrics.compactions.inc();
                                    me.durable.send_replace(dirty);
                                }
                                Ok(Err(e)) => {
                                    metrics.errors.inc();
                                    tracing::error!(error = %e, "compaction failed; the log keeps growing");
                                }
                                Err(e) => tracing::error!(error = %e, "compaction task failed"),
                            }
                        }
                    }
                    Ok(Err(e)) => {
                        metrics.errors.inc();
                        tracing::error!(error = %e, "cannot write registry changes; retrying");
                        retry = Some((dirty, records));
                        tokio::time::sleep(Duration::from_millis(500)).await;
                    }
                    Err(e) => {
                        metrics.errors.inc();
                        tracing::error!(error = %e, "store writer task failed; retrying");
                        retry = Some((dirty, records));
                    }
                }
            }
        });
        this
    }
    /// Waits until the change counter `dirty` is durable. Returns false when
    /// that did not happen in time (the store is failing).
    pub async fn durable(&self, dirty: u64) -> bool {
        self.wake.notify_one();
        let mut rx = self.durable.subscribe();
        tokio::time::timeout(DURABLE_WAIT, rx.wait_for(|d| *d >= dirty))
            .await
            .is_ok_and(|r| r.is_ok())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn endpoint(id: &str, port: u32, health: Health) -> PersistedEndpoint {
        PersistedEndpoint {
            instance: Instance {
                service: "web".into(),
                instance_id: id.into(),
                address: "127.0.0.1".into(),
                port,
                ..Default::default()
            },
            health,
            version: 1,
            lease: Some(3),
            ttl_ms: Some(10_000),
        }
    }

    fn put(id: &str, port: u32, health: Health) -> Record {
        Record::PutEndpoint {
            service: "web".into(),
            endpoint: endpoint(id, port, health),
        }
    }

    fn ids(p: &Persisted) -> Vec<(String, Health)> {
        p.services
            .iter()
            .flat_map(|s| s.endpoints.iter())
            .map(|e| (e.instance.instance_id.clone(), e.health))
            .collect()
    }

    #[test]
    fn log_replays_in_order_and_survives_compaction_and_a_torn_tail() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = FileStore::open(dir.path()).expect("opens");
        assert!(store.load().expect("empty is fine").is_none());

        store
            .append(&[
                put("web-1", 1, Health::Serving),
                put("web-2", 2, Health::Serving),
                Record::Counters {
                    version: 2,
                    next_lease: 4,
                },
            ])
            .expect("appends");
        store
            .append(&[
                put("web-1", 1, Health::NotServing),
                Record::DeleteEndpoint {
                    service: "web".into(),
                    instance_id: "web-2".into(),
                },
                Record::Counters {
                    version: 4,
                    next_lease: 4,
                },
            ])
            .expect("appends");
        let state = store.load().expect("loads").expect("present");
        assert_eq!(ids(&state), vec![("web-1".to_string(), Health::NotServing)]);
        assert_eq!((state.version, state.next_lease), (4, 4));

        // Compact, then keep appending on top of the snapshot.
        store.compact(&state).expect("compacts");
        store
            .append(&[put("web-3", 3, Health::Unknown)])
            .expect("appends");
        let state = store.load().expect("loads").expect("present");
        assert_eq!(ids(&state).len(), 2);
        assert_eq!(state.version, 4);

        // A torn last line (crash mid-write) is ignored; a torn middle is not.
        let log = dir.path().join("changes.log");
        let mut f = OpenOptions::new().append(true).open(&log).expect("log");
        f.write_all(b"{\"op\":\"put_end").expect("writes");
        assert_eq!(
            ids(&store.load().expect("loads").expect("present")).len(),
            2
        );
        f.write_all(b"\n{}\n").expect("writes");
        let err = store.load().expect_err("corrupt middle refused");
        assert!(err.to_string().contains("changes.log"), "{err}");
    }

    #[test]
    fn garbage_snapshot_is_refused_with_its_path() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = FileStore::open(dir.path()).expect("opens");
        fs::write(dir.path().join("state.json"), b"{not json").expect("writes");
        let err = store.load().expect_err("garbage refused");
        assert!(err.to_string().contains("state.json"), "{err}");
    }
}
