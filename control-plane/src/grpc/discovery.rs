//! `wayfinder.v1.Discovery.Watch`: one task per watch stream forwards the
//! shared, pre-encoded updates of its services to a small bounded queue.
//!
//! A watcher that stops reading fills its queue, its task stops draining the
//! services' broadcasts, and once it is more than the broadcast capacity behind
//! it gets one fresh snapshot instead of the backlog. Others are never slowed.

use std::collections::BTreeMap;
use std::pin::Pin;
use std::sync::Arc;

use futures::{Stream, StreamExt};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::{
    counter::Counter, family::Family, gauge::Gauge, histogram::Histogram,
};
use prometheus_client::registry::Registry as PromRegistry;
use tokio::sync::mpsc;
use tokio_stream::StreamMap;
use tokio_stream::wrappers::{BroadcastStream, ReceiverStream, errors::BroadcastStreamRecvError};
use tonic::{Request, Response, Status};
use wayfinder_proto::encoded::EncodedWatchEvent;
use wayfinder_proto::shared::discovery_server;
use wayfinder_proto::v1::WatchRequest;
use wayfinder_proto::validate;

use super::{check_size, invalid};
use crate::registry::{Registry, Subscription};

/// Events queued per watch stream before its task waits for the client.
pub const WATCHER_QUEUE: usize = 16;
/// Most services one watch stream may name.
pub const MAX_SERVICES_PER_WATCH: usize = 1024;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabel {
    reason: &'static str,
}

/// Metrics of the watch streams.
#[derive(Clone)]
pub struct WatchMetrics {
    watchers: Gauge,
    pushes: Counter,
    snapshots: Family<ReasonLabel, Counter>,
    latency: Histogram,
    refused: Counter,
}

impl WatchMetrics {
    /// Creates the metrics and registers them.
    pub fn register(reg: &mut PromRegistry) -> Self {
        let m = Self {
            watchers: Gauge::default(),
            pushes: Counter::default(),
            snapshots: Family::default(),
            refused: Counter::default(),
            latency: Histogram::new(prometheus_client::metrics::histogram::exponential_buckets(
                0.0001, 2.0, 18,
            )),
        };
        reg.register(
            "wayfinder_control_watchers",
            "Open watch streams",
            m.watchers.clone(),
        );
        reg.register(
            "wayfinder_control_watches_refused",
            "Watch streams refused because the registry holds its most service entries (--max-services)",
            m.refused.clone(),
        );
        reg.register(
            "wayfinder_control_pushes",
            "Events handed to watch streams",
            m.pushes.clone(),
        );
        reg.register(
            "wayfinder_control_snapshots",
            "Snapshots sent, by reason (initial, resume_gap, lagged)",
            m.snapshots.clone(),
        );
        reg.register(
            "wayfinder_control_push_latency_seconds",
            "Time from a change being accepted to its event being handed to a watch stream",
            m.latency.clone(),
        );
        m
    }

    fn snapshot(&self, reason: &'static str) {
        self.snapshots.get_or_create(&ReasonLabel { reason }).inc();
    }
}

/// Serves the Discovery API.
pub struct DiscoveryService {
    registry: Arc<Registry>,
    metrics: WatchMetrics,
    guard: super::auth::Guard,
}

impl DiscoveryService {
    /// A service over `registry`, for callers `guard` lets through.
    pub fn new(registry: Arc<Registry>, metrics: WatchMetrics, guard: super::auth::Guard) -> Self {
        Self {
            registry,
            metrics,
            guard,
        }
    }
}

type WatchStream = Pin<Box<dyn Stream<Item = Result<EncodedWatchEvent, Status>> + Send>>;

/// Decrements the watcher gauge however the task ends.
struct WatcherGuard(Gauge);
impl Drop for WatcherGuard {
    fn drop(&mut self) {
        self.0.dec();
    }
}

#[tonic::async_trait]
impl discovery_server::Discovery for DiscoveryService {
    type WatchStream = WatchStream;

    async fn watch(&self, req: Request<WatchRequest>) -> Result<Response<WatchStream>, Status> {
        self.guard.member(&req, "Discovery.Watch")?;
        let req = req.into_inner();
        check_size(&req)?;
        if req.services.is_empty() {
            return Err(Status::invalid_argument(
                "name at least one service to watch",
            ));
        }
        if req.services.len() > MAX_SERVICES_PER_WATCH {
            return Err(Status::invalid_argument(format!(
                "{} services in one watch; at most {MAX_SERVICES_PER_WATCH}",
                req.services.len()
            )));
        }
        let mut wanted = BTreeMap::new();
        for s in &req.services {
            validate::service_name(&s.name).map_err(invalid)?;
            wanted.insert(s.name.clone(), s.last_version);
        }
        if !self.registry.may_watch(wanted.keys().map(String::as_str)) {
            self.metrics.refused.inc();
            return Err(Status::resource_exhausted(
                "too many services known or watched; watch fewer names nobody serves",
            ));
        }

        let mut initial = Vec::new();
        let mut streams = StreamMap::new();
        // A client with another trust bundle gets snapshots (they carry it).
        let new_bundle = self.registry.bundle_differs(&req.trust_bundle_sha256);
        for (name, last) in wanted {
            let last = if new_bundle { 0 } else { last };
            let sub = self.registry.subscribe(&name, last);
            if sub.snapshot {
                self.metrics
                    .snapshot(if last == 0 { "initial" } else { "resume_gap" });
            }
            initial.extend(sub.initial);
            streams.insert(name, BroadcastStream::new(sub.rx));
        }
        tracing::debug!(node = %req.node, services = streams.len(), "watch opened");

        let (tx, rx) = mpsc::channel(WATCHER_QUEUE);
        self.metrics.watchers.inc();
        let forwarder = Forwarder {
            registry: self.registry.clone(),
            metrics: self.metrics.clone(),
            tx,
            _guard: WatcherGuard(self.metrics.watchers.clone()),
        };
        tokio::spawn(forwarder.run(initial, streams));
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}

struct Forwarder {
    registry: Arc<Registry>,
    metrics: WatchMetrics,
    tx: mpsc::Sender<Result<EncodedWatchEvent, Status>>,
    _guard: WatcherGuard,
}

impl Forwarder {
    async fn send(&self, event: EncodedWatchEvent) -> bool {
        let ok = self.tx.send(Ok(event)).await.is_ok();
        self.metrics.pushes.inc();
        ok
    }

    async fn run(
        self,
        initial: Vec<EncodedWatchEvent>,
        mut streams: StreamMap<String, BroadcastStream<crate::registry::Pushed>>,
    ) {
        for event in initial {
            if !self.send(event).await {
                return;
            }
        }
        loop {
            let next = tokio::select! {
                _ = self.tx.closed() => return,
                next = streams.next() => next,
            };
            match next {
                None => return,
                Some((_, Ok(pushed))) => {
                    if !self.send(pushed.event).await {
                        return;
                    }
                    self.metrics
                        .latency
                        .observe(pushed.at.elapsed().as_secs_f64());
                }
                Some((name, Err(BroadcastStreamRecvError::Lagged(missed)))) => {
                    tracing::debug!(service = %name, missed, "watcher lagged; sending a snapshot");
                    self.metrics.snapshot("lagged");
                    let Subscription { initial, rx, .. } = self.registry.resubscribe(&name);
                    streams.insert(name, BroadcastStream::new(rx));
                    for event in initial {
                        if !self.send(event).await {
                            return;
                        }
                    }
                }
            }
        }
    }
}
