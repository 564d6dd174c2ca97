//! Reads and policy: versions, endpoints, summaries, the catalog, policies, trust bundle.

use wayfinder_proto::v1::{
    CatalogService, CatalogUpdate, Endpoint, Health, ServicePolicy, ServiceSummary,
};

use super::{Change, Entry, Registry, Service};
use crate::store::PersistedEndpoint;

impl Registry {
    /// The latest version.
    pub fn version(&self) -> u64 {
        self.lock().version
    }

    /// Instance `id` of `service` as the store keeps it.
    pub fn endpoint(&self, service: &str, id: &str) -> Option<PersistedEndpoint> {
        let st = self.lock();
        Some(st.persisted(st.services.get(service)?.endpoints.get(id)?))
    }

    /// Summaries of every existing service, sorted by name.
    pub fn services(&self) -> Vec<ServiceSummary> {
        let st = self.lock();
        let mut out: Vec<_> = st
            .services
            .iter()
            .filter(|(_, s)| s.exists())
            .map(|(name, s)| ServiceSummary {
                name: name.clone(),
                instances: s.endpoints.len() as u32,
                serving: s
                    .endpoints
                    .values()
                    .filter(|e| e.health == Health::Serving)
                    .count() as u32,
                version: s.version,
                has_policy: s.policy.is_some(),
            })
            .collect();
        out.sort_by(|a, b| a.name.cmp(&b.name));
        out
    }

    /// Which addresses belong to which service: every existing service with
    /// the distinct IPs of its instances, sorted.
    pub fn catalog(&self) -> CatalogUpdate {
        let st = self.lock();
        let mut services: Vec<_> = st
            .services
            .iter()
            .filter(|(_, s)| s.exists())
            .map(|(name, s)| {
                let addresses: std::collections::BTreeSet<_> = s
                    .endpoints
                    .values()
                    .map(|e| e.instance.address.clone())
                    .collect();
                CatalogService {
                    name: name.clone(),
                    addresses: addresses.into_iter().collect(),
                }
            })
            .collect();
        services.sort_by(|a, b| a.name.cmp(&b.name));
        CatalogUpdate {
            version: st.version,
            services,
        }
    }

    /// A service's version and endpoints (sorted by instance id).
    pub fn endpoints(&self, service: &str) -> Option<(u64, Vec<Endpoint>)> {
        let st = self.lock();
        let s = st.services.get(service).filter(|s| s.exists())?;
        Some((
            s.version,
            s.endpoints.values().map(Entry::endpoint).collect(),
        ))
    }

    /// A service's policy.
    pub fn policy(&self, service: &str) -> Option<ServicePolicy> {
        self.lock().services.get(service)?.policy.clone()
    }

    /// Every service's policy, sorted by service.
    pub fn policies(&self) -> Vec<ServicePolicy> {
        let st = self.lock();
        let mut out: Vec<_> = st
            .services
            .values()
            .filter_map(|s| s.policy.clone())
            .collect();
        out.sort_by(|a, b| a.service.cmp(&b.service));
        out
    }

    /// Applies policies (already validated). Unchanged ones are skipped.
    /// Returns the version and the services that changed.
    pub fn apply_policies(&self, policies: Vec<ServicePolicy>) -> (u64, Vec<String>) {
        let mut st = self.lock();
        let mut changed = Vec::new();
        for p in policies {
            let name = p.service.clone();
            let svc = st
                .services
                .entry(name.clone())
                .or_insert_with(|| Service::new(0));
            if svc.policy.as_ref() == Some(&p) {
                continue;
            }
            svc.policy = Some(p.clone());
            let change = Change {
                policy: Some(p),
                ..Change::default()
            };
            self.commit(&mut st, &name, change);
            changed.push(name);
        }
        (st.version, changed)
    }

    /// Removes a service's policy; returns whether it had one.
    pub fn remove_policy(&self, service: &str) -> bool {
        let mut st = self.lock();
        let had = st
            .services
            .get_mut(service)
            .and_then(|s| s.policy.take())
            .is_some();
        if had {
            let change = Change {
                policy_removed: true,
                ..Change::default()
            };
            self.commit(&mut st, service, change);
        }
        had
    }

    /// Sets the roots every snapshot carries from now on.
    pub fn set_trust_bundle(&self, roots: Vec<Vec<u8>>) {
        if let Ok(mut b) = self.trust_bundle.write() {
            *b = roots;
        }
    }

    /// The roots every snapshot carries.
    pub fn trust_bundle(&self) -> Vec<Vec<u8>> {
        self.trust_bundle
            .read()
            .map(|b| b.clone())
            .unwrap_or_default()
    }

    /// Whether a client holding roots with `sha256` needs the current bundle.
    pub fn bundle_differs(&self, sha256: &[u8]) -> bool {
        if sha256.is_empty() {
            return false;
        }
        let b = self
            .trust_bundle
            .read()
            .map(|b| b.clone())
            .unwrap_or_default();
        wayfinder_proto::bundle_sha256(&b) != sha256
    }
}

#[cfg(test)]
mod tests {
    use wayfinder_proto::v1::ServicePolicy;

    use crate::registry::LeaseConfig;
    use crate::registry::test_support::registry;

    #[tokio::test]
    async fn unchanged_policy_is_not_pushed_again() {
        let reg = registry(LeaseConfig::default());
        let p = ServicePolicy {
            service: "web".into(),
            balancer: 1,
            ..Default::default()
        };
        assert_eq!(reg.apply_policies(vec![p.clone()]).1, vec!["web"]);
        assert!(reg.apply_policies(vec![p]).1.is_empty());
        assert!(reg.remove_policy("web"));
        assert!(reg.services().is_empty());
    }
}
