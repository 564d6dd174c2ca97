//! Durable state: the seam between the registry and where it is kept.
//!
//! The embedded backend writes one JSON document atomically (temporary file,
//! fsync, rename, fsync of the directory), so a crash leaves either the old or
//! the new state, never a torn one. Writes are group-committed by
//! [`Persister`]: many changes that arrive while one write is in flight share
//! the next write, and an RPC is acknowledged only once its change is durable.

use std::fs::{self, File, OpenOptions};
use std::io::Write;
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
    /// Replaces the saved state durably.
    fn save(&self, state: &Persisted) -> Result<(), StoreError>;
    /// Human description for logs.
    fn describe(&self) -> String;
}

/// The embedded default: one JSON file in the data directory.
pub struct FileStore {
    dir: PathBuf,
}

#[derive(Serialize, Deserialize)]
struct Document {
    format: u32,
    #[serde(flatten)]
    state: Persisted,
}

impl FileStore {
    /// Opens (creating if needed) a data directory.
    pub fn open(dir: &Path) -> Result<Self, StoreError> {
        fs::create_dir_all(dir).map_err(|source| StoreError::Io {
            path: dir.to_path_buf(),
            source,
        })?;
        Ok(Self {
            dir: dir.to_path_buf(),
        })
    }

    fn file(&self) -> PathBuf {
        self.dir.join("state.json")
    }
}

impl Store for FileStore {
    fn load(&self) -> Result<Option<Persisted>, StoreError> {
        let path = self.file();
        let text = match fs::read(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(source) => return Err(StoreError::Io { path, source }),
        };
        let doc: Document = serde_json::from_slice(&text).map_err(|e| StoreError::Corrupt {
            path: path.clone(),
            message: e.to_string(),
        })?;
        if doc.format != FORMAT {
            return Err(StoreError::Corrupt {
                path,
                message: format!("format {} is not supported (expected {FORMAT})", doc.format),
            });
        }
        Ok(Some(doc.state))
    }

    fn save(&self, state: &Persisted) -> Result<(), StoreError> {
        let path = self.file();
        let tmp = self.dir.join("state.json.tmp");
        let io = |path: &Path| {
            let path = path.to_path_buf();
            move |source| StoreError::Io { path, source }
        };
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
            .map_err(io(&tmp))?;
        f.write_all(&bytes).map_err(io(&tmp))?;
        f.sync_all().map_err(io(&tmp))?;
        fs::rename(&tmp, &path).map_err(io(&path))?;
        File::open(&self.dir)
            .and_then(|d| d.sync_all())
            .map_err(io(&self.dir))?;
        Ok(())
    }

    fn describe(&self) -> String {
        format!("embedded file {}", self.file().display())
    }
}

/// Metrics of the store.
#[derive(Clone)]
struct StoreMetrics {
    writes: Counter,
    errors: Counter,
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
            seconds: Histogram::new(prometheus_client::metrics::histogram::exponential_buckets(
                0.0005, 2.0, 14,
            )),
        };
        prom.register(
            "wayfinder_control_store_writes",
            "State writes",
            metrics.writes.clone(),
        );
        prom.register(
            "wayfinder_control_store_write_errors",
            "Failed state writes",
            metrics.errors.clone(),
        );
        prom.register(
            "wayfinder_control_store_write_seconds",
            "Time to write state durably",
            metrics.seconds.clone(),
        );
        let (durable, _) = watch::channel(registry.dirty());
        let this = Arc::new(Self {
            wake: Notify::new(),
            durable,
        });
        let me = this.clone();
        tokio::spawn(async move {
            loop {
                let (dirty, state) = registry.persisted();
                if dirty == *me.durable.borrow() {
                    // Changes made without waking us (heartbeats, lease
                    // expiry) are picked up within a second.
                    let _ = tokio::time::timeout(Duration::from_secs(1), me.wake.notified()).await;
                    continue;
                }
                let store = store.clone();
                let started = Instant::now();
                let result = tokio::task::spawn_blocking(move || store.save(&state)).await;
                metrics.seconds.observe(started.elapsed().as_secs_f64());
                match result {
                    Ok(Ok(())) => {
                        metrics.writes.inc();
                        me.durable.send_replace(dirty);
                    }
                    Ok(Err(e)) => {
                        metrics.errors.inc();
                        tracing::error!(error = %e, "cannot save registry state; retrying");
                        tokio::time::sleep(Duration::from_millis(500)).await;
                    }
                    Err(e) => {
                        metrics.errors.inc();
                        tracing::error!(error = %e, "state writer task failed; retrying");
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

    #[test]
    fn file_store_round_trips_and_refuses_garbage() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = FileStore::open(dir.path()).expect("opens");
        assert!(store.load().expect("empty is fine").is_none());
        let state = Persisted {
            version: 42,
            next_lease: 7,
            services: vec![PersistedService {
                name: "web".into(),
                version: 42,
                policy: None,
                endpoints: vec![PersistedEndpoint {
                    instance: Instance {
                        service: "web".into(),
                        instance_id: "web-1".into(),
                        address: "127.0.0.1".into(),
                        port: 9001,
                        ..Default::default()
                    },
                    health: Health::Serving,
                    version: 41,
                    lease: Some(3),
                    ttl_ms: Some(10_000),
                }],
            }],
        };
        store.save(&state).expect("saves");
        let back = store.load().expect("loads").expect("present");
        assert_eq!(back.version, 42);
        assert_eq!(back.services[0].endpoints[0].instance.port, 9001);
        assert_eq!(back.services[0].endpoints[0].health, Health::Serving);

        fs::write(dir.path().join("state.json"), b"{not json").expect("writes");
        let err = store.load().expect_err("garbage refused");
        assert!(err.to_string().contains("state.json"), "{err}");
    }
}
