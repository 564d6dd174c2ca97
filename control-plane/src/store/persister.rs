//! The embedded store's writer: registry changes written in the background.
//!
//! [`Persister`] group-commits: changes that arrive while one write is in
//! flight share the next one, and an RPC is acknowledged once its change is
//! durable.

use std::sync::Arc;
use std::time::{Duration, Instant};

use prometheus_client::metrics::{counter::Counter, histogram::Histogram};
use prometheus_client::registry::Registry as PromRegistry;
use tokio::sync::{Notify, watch};

use super::{Record, Store, StoreError};
use crate::registry::Registry;

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
