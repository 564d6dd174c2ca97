//! Watchers: subscriptions (a snapshot or the missed deltas) and the change signal.

use wayfinder_proto::encoded::EncodedWatchEvent;
use wayfinder_proto::v1::{Snapshot, WatchEvent, watch_event::Kind};

use super::{Entry, Registry, Service, Subscription, unix_micros};

impl Service {
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

impl Registry {
    /// Sets the most service entries kept at once (`--max-services`).
    pub fn limit_services(&self, max: usize) {
        self.max_services
            .store(max, std::sync::atomic::Ordering::Relaxed);
    }

    /// Whether watching `names` keeps the registry within its most service
    /// entries (names it knows cost nothing). Checked before a watch
    /// subscribes, so concurrent watches may overshoot by one request's names.
    pub fn may_watch<'a>(&self, names: impl IntoIterator<Item = &'a str>) -> bool {
        let st = self.lock();
        let new = names
            .into_iter()
            .filter(|n| !st.services.contains_key(*n))
            .count();
        st.services.len() + new <= self.max_services.load(std::sync::atomic::Ordering::Relaxed)
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

    /// A fresh snapshot and receiver for a watcher that lagged behind.
    pub fn resubscribe(&self, name: &str) -> Subscription {
        self.subscribe(name, 0)
    }

    /// Wakes on every change to any service.
    pub fn watch_changes(&self) -> tokio::sync::watch::Receiver<u64> {
        self.changed.subscribe()
    }
}

#[cfg(test)]
mod tests {
    use tokio::sync::broadcast;
    use wayfinder_proto::v1::{Health, Snapshot, watch_event::Kind};

    use crate::registry::test_support::{decode, delta, inst, registry};
    use crate::registry::{BROADCAST_CAPACITY, DELTA_LOG_LEN, LeaseConfig};

    #[tokio::test]
    async fn watches_of_unknown_names_stop_at_the_most_services_and_free_up() {
        let reg = registry(LeaseConfig::default());
        reg.limit_services(3);
        reg.register(inst("web", "web-1", 80), true, None, Health::Serving)
            .expect("registers");
        let a = reg.subscribe("ghost-a", 0);
        assert!(
            reg.may_watch(["web", "ghost-b"]),
            "known names cost nothing"
        );
        let b = reg.subscribe("ghost-b", 0);
        assert!(!reg.may_watch(["ghost-c"]), "a fourth entry is refused");
        assert!(reg.may_watch(["web", "ghost-a"]));
        // Once nobody watches them, the entries go and the room comes back.
        drop((a, b));
        reg.collect_garbage();
        assert!(reg.may_watch(["ghost-c", "ghost-d"]));
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
}
