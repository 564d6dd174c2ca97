//! A mirror of a shared store: applying the records of other replicas.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use super::{
    Change, Entry, Lease, LeaseConfig, LeaseState, Registry, RegistryMetrics, Service, State,
};
use crate::store::{Persisted, PersistedEndpoint, PersistedService, Record};

impl Registry {
    /// An empty registry that mirrors a shared store: it changes only through
    /// [`Registry::apply`] and [`Registry::reset`], and its versions are the
    /// store's revisions, the same on every replica.
    pub fn mirror(leases: LeaseConfig, metrics: RegistryMetrics) -> Arc<Self> {
        Self::with_state(State::default(), leases, metrics, true)
    }

    /// Applies the records of one revision of a shared store, as one change
    /// per service. A service is versioned by its `Version` record when that
    /// moves it forward, else by `revision`. Puts that change nothing are
    /// skipped, so applying a state the registry already has pushes nothing.
    pub fn apply(&self, revision: u64, records: Vec<Record>) {
        let mut st = self.lock();
        let mut changes: BTreeMap<String, Change> = BTreeMap::new();
        let mut versions: HashMap<String, u64> = HashMap::new();
        for r in records {
            match r {
                Record::PutEndpoint { service, endpoint } => {
                    let PersistedEndpoint {
                        instance,
                        health,
                        lease,
                        ttl_ms,
                        ..
                    } = endpoint;
                    let id = instance.instance_id.clone();
                    let svc = st
                        .services
                        .entry(service.clone())
                        .or_insert_with(|| Service::new(0));
                    let old = svc.endpoints.get(&id);
                    if old.is_some_and(|o| {
                        o.instance == instance && o.health == health && o.lease == lease
                    }) {
                        continue;
                    }
                    let existed = old.is_some();
                    let old_lease = old.and_then(|o| o.lease).filter(|l| Some(*l) != lease);
                    let entry = Entry {
                        instance,
                        health,
                        version: revision,
                        lease,
                    };
                    let ep = entry.endpoint();
                    svc.endpoints.insert(id.clone(), entry);
                    if let Some(l) = old_lease {
                        st.leases.remove(&l);
                    }
                    if let Some(l) = lease {
                        let ttl = Duration::from_millis(ttl_ms.unwrap_or(0).into());
                        st.leases.insert(
                            l,
                            Lease {
                                service: service.clone(),
                                instance_id: id,
                                ttl,
                                // The store expires mirrored leases; this
                                // deadline is never read.
                                state: LeaseState::Active {
                                    deadline: Instant::now() + ttl,
                                },
                            },
                        );
                    }
                    let c = changes.entry(service).or_default();
                    if existed {
                        c.changed.push(ep);
                    } else {
                        c.added.push(ep);
                    }
                }
                Record::DeleteEndpoint {
                    service,
                    instance_id,
                } => {
                    let Some(old) = st
                        .services
                        .get_mut(&service)
                        .and_then(|s| s.endpoints.remove(&instance_id))
                    else {
                        continue;
                    };
                    if let Some(l) = old.lease {
                        st.leases.remove(&l);
                    }
                    changes
                        .entry(service)
                        .or_default()
                        .removed
                        .push(instance_id);
                }
                Record::Policy { service, policy } => {
                    let policy = policy.map(|p| *p);
                    let svc = st
                        .services
                        .entry(service.clone())
                        .or_insert_with(|| Service::new(0));
                    if svc.policy == policy {
                        continue;
                    }
                    svc.policy = policy.clone();
                    let c = changes.entry(service).or_default();
                    c.policy_removed = policy.is_none();
                    c.policy = policy;
                }
                Record::Version { service, version } => {
                    versions.insert(service, version);
                }
                Record::Counters { .. } => {}
            }
        }
        for (name, change) in changes {
            let current = st.services.get(&name).map_or(0, |s| s.version);
            let version = versions
                .get(&name)
                .copied()
                .filter(|v| *v > current)
                .unwrap_or(revision);
            self.commit_at(&mut st, &name, change, version);
        }
        st.version = st.version.max(revision);
    }

    /// Makes the registry equal to `state`, read from a shared store at
    /// `revision` (after a start or a lost connection): only the differences
    /// reach the watchers.
    pub fn reset(&self, revision: u64, state: Persisted) {
        let mut records = Vec::new();
        {
            let st = self.lock();
            let wanted: HashMap<&str, &PersistedService> = state
                .services
                .iter()
                .map(|s| (s.name.as_str(), s))
                .collect();
            for (name, svc) in &st.services {
                let keep = wanted.get(name.as_str());
                for id in svc.endpoints.keys() {
                    if !keep
                        .is_some_and(|k| k.endpoints.iter().any(|e| &e.instance.instance_id == id))
                    {
                        records.push(Record::DeleteEndpoint {
                            service: name.clone(),
                            instance_id: id.clone(),
                        });
                    }
                }
                if svc.policy.is_some() && keep.is_none_or(|k| k.policy.is_none()) {
                    records.push(Record::Policy {
                        service: name.clone(),
                        policy: None,
                    });
                }
            }
        }
        for s in state.services {
            records.push(Record::Version {
                service: s.name.clone(),
                version: s.version,
            });
            if s.policy.is_some() {
                records.push(Record::Policy {
                    service: s.name.clone(),
                    policy: s.policy.map(Box::new),
                });
            }
            for endpoint in s.endpoints {
                records.push(Record::PutEndpoint {
                    service: s.name.clone(),
                    endpoint,
                });
            }
        }
        self.apply(revision, records);
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::Duration;

    use prometheus_client::registry::Registry as Prom;
    use tokio::time::Instant;
    use wayfinder_proto::v1::{Health, ServicePolicy};

    use crate::registry::test_support::{delta, inst};
    use crate::registry::{LeaseConfig, Registry, RegistryMetrics};
    use crate::store::{Persisted, PersistedEndpoint, PersistedService, Record};

    fn mirror() -> Arc<Registry> {
        Registry::mirror(
            LeaseConfig::default(),
            RegistryMetrics::register(&mut Prom::default()),
        )
    }

    fn put(id: &str, port: u32, health: Health, lease: Option<u64>) -> Record {
        Record::PutEndpoint {
            service: "web".into(),
            endpoint: PersistedEndpoint {
                instance: inst("web", id, port),
                health,
                version: 0,
                lease,
                ttl_ms: lease.map(|_| 2000),
            },
        }
    }

    #[tokio::test]
    async fn a_mirror_versions_changes_by_store_revision_and_skips_echoes() {
        let reg = mirror();
        let mut sub = reg.subscribe("web", 0);
        reg.apply(
            7,
            vec![
                put("web-1", 1, Health::Serving, Some(70)),
                put("web-2", 2, Health::Serving, None),
            ],
        );
        let d = delta(&sub.rx.try_recv().expect("one delta for the revision"));
        assert_eq!((d.prev_version, d.added.len()), (0, 2));
        assert_eq!(reg.endpoints("web").expect("exists").0, 7);
        assert_eq!(reg.lease_holder(70).map(|h| h.1), Some("web-1".to_string()));

        // The same state again (a write coming back, a reconnect) pushes nothing.
        reg.apply(8, vec![put("web-2", 2, Health::Serving, None)]);
        assert!(sub.rx.try_recv().is_err());

        reg.apply(
            9,
            vec![Record::DeleteEndpoint {
                service: "web".into(),
                instance_id: "web-1".into(),
            }],
        );
        let d = delta(&sub.rx.try_recv().expect("removal"));
        assert_eq!((d.prev_version, d.removed), (7, vec!["web-1".to_string()]));
        assert!(reg.lease_holder(70).is_none(), "its lease is gone too");
        // Nothing is queued for a local store, and leases are etcd's to expire.
        assert!(reg.take_pending().1.is_empty());
        assert_eq!(reg.reap(Instant::now() + Duration::from_secs(3600)), (0, 0));
    }

    #[tokio::test]
    async fn a_mirror_reset_pushes_only_the_differences() {
        let reg = mirror();
        reg.apply(
            5,
            vec![
                put("web-1", 1, Health::Serving, None),
                put("web-2", 2, Health::Serving, None),
            ],
        );
        let mut sub = reg.subscribe("web", 5);
        assert!(sub.initial.is_empty(), "resumes at the revision");
        // While cut off: web-2 left, web-3 came, a policy was set.
        let state = Persisted {
            version: 12,
            next_lease: 0,
            services: vec![PersistedService {
                name: "web".into(),
                version: 11,
                policy: Some(ServicePolicy {
                    service: "web".into(),
                    balancer: 1,
                    ..Default::default()
                }),
                endpoints: vec![
                    PersistedEndpoint {
                        instance: inst("web", "web-1", 1),
                        health: Health::Serving,
                        version: 5,
                        lease: None,
                        ttl_ms: None,
                    },
                    PersistedEndpoint {
                        instance: inst("web", "web-3", 3),
                        health: Health::Serving,
                        version: 11,
                        lease: None,
                        ttl_ms: None,
                    },
                ],
            }],
        };
        reg.reset(12, state.clone());
        let d = delta(&sub.rx.try_recv().expect("one delta"));
        assert_eq!(d.prev_version, 5);
        assert_eq!(d.removed, vec!["web-2".to_string()]);
        assert_eq!(d.added.len(), 1);
        assert!(d.policy.is_some());
        assert!(d.changed.is_empty(), "web-1 did not change");
        assert_eq!(reg.endpoints("web").expect("exists").0, 11);
        reg.reset(13, state);
        assert!(sub.rx.try_recv().is_err(), "the same state again is silent");
    }
}
