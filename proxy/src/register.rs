//! Registration of the local app with the control plane: a lease kept alive
//! by heartbeats that carry a local health check of the app.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use futures::StreamExt;
use tokio::sync::{mpsc, watch};
use tonic::Code;
use tonic::transport::Channel;
use wayfinder_proto::v1::{
    DeregisterRequest, Health, Heartbeat, Instance, RegisterRequest, deregister_request::Target,
    registry_client::RegistryClient,
};

use wayfinder_proto::backoff::backoff;

use crate::resilience::probe::{Check, probe};

/// Checks the app every `interval` and publishes the result.
pub async fn check_loop(
    app: SocketAddr,
    check: Check,
    interval: Duration,
    tx: watch::Sender<Health>,
) {
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let timeout = interval.min(Duration::from_secs(2));
        let ok = tokio::time::timeout(timeout, probe(app, &check))
            .await
            .unwrap_or(false);
        let h = if ok {
            Health::Serving
        } else {
            Health::NotServing
        };
        tx.send_if_modified(|cur| {
            let changed = *cur != h;
            *cur = h;
            changed
        });
    }
}

/// Keeps the instance registered for as long as the process lives; the
/// current lease id is published in `lease` (0 while unregistered).
pub async fn keep_registered(
    channel: Channel,
    instance: Instance,
    mut health: watch::Receiver<Health>,
    lease: Arc<AtomicU64>,
) {
    // Registered as "unknown", the instance would take traffic before its
    // app was ever checked (an app started after its sidecar, by `run` or
    // by compose, is not listening yet): register with the first verdict.
    let _ = health.wait_for(|h| *h != Health::Unknown).await;
    let mut attempt = 0u32;
    loop {
        let mut client = RegistryClient::new(channel.clone());
        let initial = *health.borrow_and_update();
        let reg = client
            .register(RegisterRequest {
                instance: Some(instance.clone()),
                static_endpoint: false,
                ttl_ms: 0,
                initial_health: initial as i32,
            })
            .await;
        let resp = match reg {
            Ok(r) => r.into_inner(),
            Err(status) => {
                tracing::warn!(%status, "cannot register; retrying");
                tokio::time::sleep(backoff(attempt)).await;
                attempt = attempt.saturating_add(1);
                continue;
            }
        };
        attempt = 0;
        lease.store(resp.lease_id, Ordering::Relaxed);
        tracing::info!(
            lease = resp.lease_id,
            ttl_ms = resp.ttl_ms,
            "registered with the control plane"
        );
        let every = Duration::from_millis(u64::from(resp.ttl_ms.max(300)) / 3);
        // Heartbeats: on a timer, and at once when the app's health changes.
        loop {
            let (tx, rx) = mpsc::channel(4);
            let stream = tokio_stream::wrappers::ReceiverStream::new(rx);
            let mut acks = match client.keep_alive(stream).await {
                Ok(r) => r.into_inner(),
                Err(status) => {
                    tracing::warn!(%status, "keep-alive stream failed; retrying");
                    tokio::time::sleep(backoff(attempt)).await;
                    attempt = attempt.saturating_add(1);
                    continue;
                }
            };
            let lease_id = resp.lease_id;
            let mut h = health.clone();
            // Aborted when this task is (on shutdown), not only here below.
            let sender = AbortOnDrop(tokio::spawn(async move {
                let mut tick = tokio::time::interval(every);
                loop {
                    let beat = Heartbeat {
                        lease_id,
                        health: *h.borrow_and_update() as i32,
                    };
                    if tx.send(beat).await.is_err() {
                        return;
                    }
                    tokio::select! {
                        _ = tick.tick() => {}
                        r = h.changed() => if r.is_err() { return },
                    }
                }
            }));
            let end = loop {
                match acks.next().await {
                    Some(Ok(_)) => attempt = 0,
                    Some(Err(s)) => break s,
                    None => break tonic::Status::unavailable("keep-alive stream ended"),
                }
            };
            drop(sender);
            if end.code() == Code::NotFound {
                tracing::warn!("the control plane lost our lease; registering again");
                break;
            }
            tracing::warn!(status = %end, "keep-alive interrupted; reconnecting");
            tokio::time::sleep(backoff(attempt)).await;
            attempt = attempt.saturating_add(1);
        }
        lease.store(0, Ordering::Relaxed);
    }
}

/// A task aborted when its handle is dropped.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Removes the registration (on shutdown).
pub async fn deregister(channel: Channel, lease_id: u64) {
    if lease_id == 0 {
        return;
    }
    let mut client = RegistryClient::new(channel);
    let mut req = tonic::Request::new(DeregisterRequest {
        target: Some(Target::LeaseId(lease_id)),
    });
    req.set_timeout(Duration::from_secs(2));
    match client.deregister(req).await {
        Ok(_) => tracing::info!(lease = lease_id, "deregistered"),
        Err(s) => tracing::warn!(status = %s, "deregistration failed; the lease will expire"),
    }
}
