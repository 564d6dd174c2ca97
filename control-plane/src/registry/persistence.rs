//! What the store writes: change records, the change counter, whole-state snapshots.

use super::{Change, Entry, Registry, State};
use crate::store::{Persisted, PersistedEndpoint, PersistedService, Record};

impl Registry {
    /// Queues the store records of a change made here.
    pub(super) fn queue_records(st: &mut State, name: &str, change: &Change, version: u64) {
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
                policy: change.policy.clone().map(Box::new),
            });
        }
        records.push(Record::Version {
            service: name.to_string(),
            version,
        });
        st.pending.extend(records);
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
    pub(super) fn persisted(&self, e: &Entry) -> PersistedEndpoint {
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
    use prometheus_client::registry::Registry as Prom;
    use wayfinder_proto::v1::Health;

    use crate::registry::test_support::{inst, registry};
    use crate::registry::{LeaseConfig, Registry, RegistryMetrics};

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
}
