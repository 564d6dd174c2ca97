//! Leases: register, heartbeat, deregister, static instances, lease look-ups, the reaper.

use std::collections::HashMap;
use std::time::Duration;

use tokio::time::Instant;
use wayfinder_proto::v1::{Health, Instance};

use super::{
    Change, Entry, Lease, LeaseState, Registered, Registry, RegistryError, Service, State,
};

/// A random lease id: never 0, within etcd's positive `i64` range. A
/// sequential id let any caller guess its neighbours' leases (and
/// deregister them); ownership checks come with authenticated callers.
pub fn random_lease_id() -> u64 {
    loop {
        let id = rand::random::<u64>() >> 2;
        if id != 0 {
            return id;
        }
    }
}

/// A random lease id not in `taken`.
fn unguessable_lease<V>(taken: &HashMap<u64, V>) -> u64 {
    loop {
        let id = random_lease_id();
        if !taken.contains_key(&id) {
            return id;
        }
    }
}

impl Registry {
    /// Registers an already validated instance.
    pub fn register(
        &self,
        instance: Instance,
        static_endpoint: bool,
        ttl: Option<Duration>,
        health: Health,
    ) -> Result<Registered, RegistryError> {
        let mut st = self.lock();
        let name = instance.service.clone();
        let id = instance.instance_id.clone();
        let old = st
            .services
            .get(&name)
            .and_then(|s| s.endpoints.get(&id))
            .cloned();
        if let Some(old) = &old
            && static_endpoint
            && old.lease.is_some()
        {
            return Err(RegistryError::Conflict(id));
        }
        // A sidecar that registers again (it restarted, or its lease was lost)
        // replaces its previous lease.
        if let Some(old_lease) = old.as_ref().and_then(|o| o.lease) {
            st.leases.remove(&old_lease);
        }
        let (lease_id, ttl) = if static_endpoint {
            (0, Duration::ZERO)
        } else {
            let ttl = ttl
                .unwrap_or(self.leases.default_ttl)
                .clamp(self.leases.min_ttl, self.leases.max_ttl);
            let lease_id = unguessable_lease(&st.leases);
            st.leases.insert(
                lease_id,
                Lease {
                    service: name.clone(),
                    instance_id: id.clone(),
                    ttl,
                    state: LeaseState::Active {
                        deadline: Instant::now() + ttl,
                    },
                },
            );
            (lease_id, ttl)
        };
        let entry = Entry {
            instance,
            health,
            version: st.version + 1,
            lease: (lease_id != 0).then_some(lease_id),
        };
        let mut change = Change::default();
        if old.is_some() {
            change.changed.push(entry.endpoint());
        } else {
            change.added.push(entry.endpoint());
        }
        st.services
            .entry(name.clone())
            .or_insert_with(|| Service::new(0))
            .endpoints
            .insert(id.clone(), entry);
        let version = self.commit(&mut st, &name, change);
        self.metrics.registrations.inc();
        Ok(Registered {
            lease_id,
            ttl,
            instance_id: id,
            version,
        })
    }

    /// Renews a lease and records the sidecar's health report. A lease in its
    /// grace period comes back to life: the sidecar was only cut off.
    pub fn heartbeat(&self, lease_id: u64, health: Health) -> Result<Duration, RegistryError> {
        let mut st = self.lock();
        let lease = st
            .leases
            .get_mut(&lease_id)
            .ok_or(RegistryError::UnknownLease(lease_id))?;
        lease.state = LeaseState::Active {
            deadline: Instant::now() + lease.ttl,
        };
        let (ttl, name, id) = (lease.ttl, lease.service.clone(), lease.instance_id.clone());
        self.set_health(&mut st, &name, &id, health);
        Ok(ttl)
    }

    fn set_health(&self, st: &mut State, name: &str, id: &str, health: Health) {
        let next_version = st.version + 1;
        let Some(entry) = st
            .services
            .get_mut(name)
            .and_then(|s| s.endpoints.get_mut(id))
        else {
            return;
        };
        if entry.health == health {
            return;
        }
        entry.health = health;
        entry.version = next_version;
        let change = Change {
            changed: vec![entry.endpoint()],
            ..Change::default()
        };
        self.commit(st, name, change);
    }

    /// Removes a leased registration.
    pub fn deregister_lease(&self, lease_id: u64) -> Result<u64, RegistryError> {
        let mut st = self.lock();
        let lease = st
            .leases
            .remove(&lease_id)
            .ok_or(RegistryError::UnknownLease(lease_id))?;
        Ok(self.remove_entry(&mut st, &lease.service, &lease.instance_id))
    }

    /// Removes a static endpoint by address.
    pub fn deregister_address(
        &self,
        service: &str,
        address: &str,
        port: u32,
    ) -> Result<u64, RegistryError> {
        let mut st = self.lock();
        let id = Self::find_static(&st, service, address, port)?;
        Ok(self.remove_entry(&mut st, service, &id))
    }

    /// The instance id of the static endpoint `address:port` of `service`.
    pub fn static_instance(
        &self,
        service: &str,
        address: &str,
        port: u32,
    ) -> Result<String, RegistryError> {
        Self::find_static(&self.lock(), service, address, port)
    }

    fn find_static(
        st: &State,
        service: &str,
        address: &str,
        port: u32,
    ) -> Result<String, RegistryError> {
        let found = st.services.get(service).and_then(|s| {
            s.endpoints
                .values()
                .find(|e| e.instance.address == address && e.instance.port == port)
                .map(|e| (e.instance.instance_id.clone(), e.lease))
        });
        let (id, lease) = found.ok_or_else(|| RegistryError::UnknownEndpoint {
            service: service.to_string(),
            address: format!("{address}:{port}"),
        })?;
        if lease.is_some() {
            return Err(RegistryError::Conflict(id));
        }
        Ok(id)
    }

    /// The lease of instance `id` of `service`: `None` when it is not
    /// registered, `Some(None)` for a static endpoint.
    pub fn lease_of(&self, service: &str, id: &str) -> Option<Option<u64>> {
        let st = self.lock();
        Some(st.services.get(service)?.endpoints.get(id)?.lease)
    }

    /// The instances whose lease ran out (their sidecar stopped
    /// heartbeating) and which wait out their grace period, as (service,
    /// instance id), sorted.
    pub fn lapsed(&self) -> Vec<(String, String)> {
        let st = self.lock();
        let mut out: Vec<_> = st
            .leases
            .values()
            .filter(|l| matches!(l.state, LeaseState::Expired { .. }))
            .map(|l| (l.service.clone(), l.instance_id.clone()))
            .collect();
        out.sort();
        out
    }

    /// What lease `lease_id` keeps: service, instance id, TTL and the
    /// instance's health.
    pub fn lease_holder(&self, lease_id: u64) -> Option<(String, String, Duration, Health)> {
        let st = self.lock();
        let lease = st.leases.get(&lease_id)?;
        let health = st
            .services
            .get(&lease.service)?
            .endpoints
            .get(&lease.instance_id)?
            .health;
        Some((
            lease.service.clone(),
            lease.instance_id.clone(),
            lease.ttl,
            health,
        ))
    }

    fn remove_entry(&self, st: &mut State, service: &str, id: &str) -> u64 {
        let removed = st
            .services
            .get_mut(service)
            .and_then(|s| s.endpoints.remove(id))
            .is_some();
        if !removed {
            return st.version;
        }
        let change = Change {
            removed: vec![id.to_string()],
            ..Change::default()
        };
        self.commit(st, service, change)
    }

    /// Drops empty service entries nobody watches any more.
    pub fn collect_garbage(&self) {
        let mut st = self.lock();
        st.services
            .retain(|_, s| s.exists() || s.tx.receiver_count() > 0);
    }

    /// Expires leases whose deadline passed (their instances turn NOT_SERVING)
    /// and removes instances whose grace period ended. Returns how many
    /// leases expired and how many instances were removed.
    pub fn reap(&self, now: Instant) -> (usize, usize) {
        if self.mirror {
            return (0, 0);
        }
        let mut st = self.lock();
        let mut expired = Vec::new();
        let mut removed = Vec::new();
        for (&id, lease) in st.leases.iter_mut() {
            match lease.state {
                LeaseState::Active { deadline } if deadline <= now => {
                    lease.state = LeaseState::Expired {
                        remove_at: deadline + self.leases.grace,
                    };
                    expired.push((lease.service.clone(), lease.instance_id.clone()));
                    if deadline + self.leases.grace <= now {
                        removed.push(id);
                    }
                }
                LeaseState::Expired { remove_at } if remove_at <= now => removed.push(id),
                _ => {}
            }
        }
        for (service, instance) in &expired {
            self.set_health(&mut st, service, instance, Health::NotServing);
        }
        for id in &removed {
            if let Some(lease) = st.leases.remove(id) {
                self.remove_entry(&mut st, &lease.service, &lease.instance_id);
            }
        }
        self.metrics.lease_expirations.inc_by(expired.len() as u64);
        (expired.len(), removed.len())
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use tokio::time::Instant;
    use wayfinder_proto::v1::Health;

    use crate::registry::test_support::{delta, inst, registry};
    use crate::registry::{LeaseConfig, RegistryError};

    #[tokio::test(start_paused = true)]
    async fn expired_lease_turns_unhealthy_then_is_removed_after_grace() {
        let cfg = LeaseConfig {
            default_ttl: Duration::from_secs(10),
            grace: Duration::from_secs(20),
            ..LeaseConfig::default()
        };
        let reg = registry(cfg);
        let r = reg
            .register(inst("web", "web-1", 1), false, None, Health::Serving)
            .expect("registers");
        let mut sub = reg.subscribe("web", r.version);
        assert!(
            sub.initial.is_empty(),
            "resuming at the current version sends nothing"
        );

        tokio::time::advance(Duration::from_secs(9)).await;
        assert_eq!(reg.reap(Instant::now()), (0, 0));
        assert_eq!(
            reg.heartbeat(r.lease_id, Health::Serving),
            Ok(cfg.default_ttl)
        );

        tokio::time::advance(Duration::from_secs(10)).await;
        assert_eq!(reg.reap(Instant::now()), (1, 0));
        let d = delta(&sub.rx.try_recv().expect("health delta"));
        assert_eq!(d.changed[0].health, Health::NotServing as i32);

        tokio::time::advance(Duration::from_secs(19)).await;
        assert_eq!(reg.reap(Instant::now()), (0, 0));
        tokio::time::advance(Duration::from_secs(1)).await;
        assert_eq!(reg.reap(Instant::now()), (0, 1));
        assert_eq!(
            delta(&sub.rx.try_recv().expect("removal")).removed,
            vec!["web-1"]
        );
        assert_eq!(
            reg.heartbeat(r.lease_id, Health::Serving),
            Err(RegistryError::UnknownLease(r.lease_id))
        );
    }

    #[tokio::test(start_paused = true)]
    async fn heartbeat_in_grace_period_revives_the_instance() {
        let reg = registry(LeaseConfig::default());
        let r = reg
            .register(
                inst("web", "web-1", 1),
                false,
                Some(Duration::from_secs(2)),
                Health::Serving,
            )
            .expect("registers");
        tokio::time::advance(Duration::from_secs(3)).await;
        reg.reap(Instant::now());
        assert_eq!(
            reg.endpoints("web").expect("exists").1[0].health,
            Health::NotServing as i32
        );
        reg.heartbeat(r.lease_id, Health::Serving)
            .expect("lease still known");
        assert_eq!(
            reg.endpoints("web").expect("exists").1[0].health,
            Health::Serving as i32
        );
        tokio::time::advance(Duration::from_secs(10)).await;
        assert_eq!(
            reg.reap(Instant::now()),
            (1, 0),
            "expires again, but is not removed yet"
        );
        tokio::time::advance(Duration::from_secs(20)).await;
        assert_eq!(
            reg.reap(Instant::now()),
            (0, 1),
            "removed once the grace period ends"
        );
    }

    #[tokio::test]
    async fn static_and_leased_registrations_do_not_replace_each_other_by_address() {
        let reg = registry(LeaseConfig::default());
        reg.register(inst("web", "web-1", 1), false, None, Health::Serving)
            .expect("leased");
        assert_eq!(
            reg.register(inst("web", "web-1", 1), true, None, Health::Unknown),
            Err(RegistryError::Conflict("web-1".into()))
        );
        assert!(matches!(
            reg.deregister_address("web", "127.0.0.1", 1),
            Err(RegistryError::Conflict(_))
        ));
    }
}
