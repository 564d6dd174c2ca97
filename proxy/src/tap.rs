//! `wfctl tap`: one event per outbound request, recorded only while the
//! control plane says someone taps the callee (one atomic load per request
//! otherwise), capped at [`MAX_PER_SECOND`] with the excess counted, and
//! sent up in batches every [`SEND_EVERY`].
//!
//! An event carries the fields of [`TapEvent`] and no header value besides
//! the trace id: `authorization` and `cookie` are never read here.

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Mutex, RwLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use futures::StreamExt;
use hyper::HeaderMap;
use tonic::transport::Channel;
use wayfinder_proto::v1::{TapBatch, TapEvent, TapInterestRequest, tap_client::TapClient};

/// Most events a sidecar records per second; the rest are counted as dropped.
pub const MAX_PER_SECOND: u64 = 500;
/// How often recorded events are sent.
pub const SEND_EVERY: Duration = Duration::from_millis(200);
/// Most events held between two sends (a control plane that is away
/// cannot make the sidecar hold more).
pub const MAX_HELD: usize = 2 * MAX_PER_SECOND as usize;

/// The taps a sidecar knows of, and what it recorded for them.
#[derive(Default)]
pub struct Tap {
    /// Any service tapped: the one load a request pays when nobody taps.
    any: AtomicBool,
    services: RwLock<HashSet<String>>,
    held: Mutex<Vec<TapEvent>>,
    dropped: AtomicU64,
    /// High bits: the second; low bits: events recorded in it.
    window: AtomicU64,
}

impl Tap {
    /// Whether any service is tapped now.
    pub fn active(&self) -> bool {
        self.any.load(Ordering::Relaxed)
    }

    /// Whether requests to `callee` are tapped now.
    pub fn wants(&self, callee: &str) -> bool {
        self.active() && self.services.read().is_ok_and(|s| s.contains(callee))
    }

    /// Replaces the tapped services.
    pub fn set(&self, services: Vec<String>) {
        let mut s = self.services.write().unwrap_or_else(|p| p.into_inner());
        *s = services.into_iter().collect();
        self.any.store(!s.is_empty(), Ordering::Relaxed);
        if s.is_empty() {
            self.held.lock().unwrap_or_else(|p| p.into_inner()).clear();
        }
    }

    /// Records one event, unless over [`MAX_PER_SECOND`] this second.
    pub fn record(&self, event: TapEvent) {
        self.record_at(event, unix_secs());
    }

    fn record_at(&self, event: TapEvent, now: u64) {
        let w = self.window.load(Ordering::Relaxed);
        if w >> 20 != now {
            // A race here lets a few more through at the turn of a second.
            self.window.store(now << 20, Ordering::Relaxed);
        }
        let n = self.window.fetch_add(1, Ordering::Relaxed) & 0xfffff;
        let mut held = self.held.lock().unwrap_or_else(|p| p.into_inner());
        if n >= MAX_PER_SECOND || held.len() >= MAX_HELD {
            self.dropped.fetch_add(1, Ordering::Relaxed);
            return;
        }
        held.push(event);
    }

    /// Takes what was recorded since the last call: events and drops.
    pub fn take(&self) -> (Vec<TapEvent>, u64) {
        let events = std::mem::take(&mut *self.held.lock().unwrap_or_else(|p| p.into_inner()));
        (events, self.dropped.swap(0, Ordering::Relaxed))
    }
}

fn unix_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// The trace id of a W3C `traceparent` (`00-<32 hex>-<16 hex>-<2 hex>`).
pub fn trace_id(headers: &HeaderMap) -> String {
    headers
        .get("traceparent")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split('-').nth(1))
        .filter(|id| id.len() == 32 && id.bytes().all(|b| b.is_ascii_hexdigit()))
        .map(str::to_string)
        .unwrap_or_default()
}

/// Follows the control plane's list of tapped services, reconnecting with
/// backoff; while it is away nothing is tapped.
pub async fn interest_loop(tap: std::sync::Arc<Tap>, channel: Channel, node: String) {
    let mut attempt = 0u32;
    loop {
        let mut client = TapClient::new(channel.clone());
        if let Ok(resp) = client
            .interest(TapInterestRequest { node: node.clone() })
            .await
        {
            let mut stream = resp.into_inner();
            while let Some(Ok(interest)) = stream.next().await {
                attempt = 0;
                tap.set(interest.services);
            }
        }
        tap.set(Vec::new());
        tokio::time::sleep(wayfinder_proto::backoff::backoff(attempt)).await;
        attempt = attempt.saturating_add(1);
    }
}

/// Sends what was recorded every [`SEND_EVERY`]; a batch that cannot be
/// sent is dropped (and not counted: the tap it was for is gone with the
/// connection).
pub async fn publish_loop(
    tap: std::sync::Arc<Tap>,
    channel: Channel,
    node: String,
    service: String,
) {
    let mut client = TapClient::new(channel);
    let mut tick = tokio::time::interval(SEND_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let (events, dropped) = tap.take();
        if events.is_empty() && dropped == 0 {
            continue;
        }
        let batch = TapBatch {
            node: node.clone(),
            service: service.clone(),
            events,
            dropped,
        };
        if let Err(status) = client.publish(batch).await {
            tracing::debug!(%status, "tap events not sent");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(path: &str) -> TapEvent {
        TapEvent {
            callee: "web".into(),
            path: path.into(),
            ..Default::default()
        }
    }

    #[test]
    fn nothing_is_wanted_until_a_service_is_tapped() {
        let tap = Tap::default();
        assert!(!tap.wants("web"));
        tap.set(vec!["web".into()]);
        assert!(tap.wants("web") && !tap.wants("api"));
        tap.set(Vec::new());
        assert!(!tap.wants("web"));
    }

    #[test]
    fn events_over_the_cap_of_a_second_are_counted_as_dropped() {
        let tap = Tap::default();
        tap.set(vec!["web".into()]);
        for i in 0..MAX_PER_SECOND + 7 {
            tap.record_at(event(&format!("/{i}")), 100);
        }
        let (events, dropped) = tap.take();
        assert_eq!(events.len() as u64, MAX_PER_SECOND);
        assert_eq!(dropped, 7);
        // The next second starts a new count; the drops were taken.
        tap.record_at(event("/next"), 101);
        let (events, dropped) = tap.take();
        assert_eq!((events.len(), dropped), (1, 0));
    }

    #[test]
    fn the_trace_id_comes_from_a_well_formed_traceparent_only() {
        let mut h = HeaderMap::new();
        assert_eq!(trace_id(&h), "");
        h.insert(
            "traceparent",
            "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
                .parse()
                .expect("header"),
        );
        assert_eq!(trace_id(&h), "0af7651916cd43dd8448eb211c80319c");
        h.insert("traceparent", "00-nothex-b7-01".parse().expect("header"));
        assert_eq!(trace_id(&h), "");
    }
}
