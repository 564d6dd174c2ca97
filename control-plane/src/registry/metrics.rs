//! Metrics of the registry's contents and lifecycle, and the gauges' update.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::{counter::Counter, family::Family, gauge::Gauge};
use prometheus_client::registry::Registry as PromRegistry;
use wayfinder_proto::v1::Health;

use super::{Registry, State};

/// Metrics of the registry's contents and lifecycle.
#[derive(Clone)]
pub struct RegistryMetrics {
    services: Gauge,
    instances: Family<HealthLabel, Gauge>,
    /// Registrations accepted.
    pub registrations: Counter,
    /// Leases that expired.
    pub lease_expirations: Counter,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct HealthLabel {
    health: &'static str,
}

impl RegistryMetrics {
    /// Creates the metrics and registers them.
    pub fn register(reg: &mut PromRegistry) -> Self {
        let m = Self {
            services: Gauge::default(),
            instances: Family::default(),
            registrations: Counter::default(),
            lease_expirations: Counter::default(),
        };
        reg.register(
            "wayfinder_control_services",
            "Services with endpoints or a policy",
            m.services.clone(),
        );
        reg.register(
            "wayfinder_control_instances",
            "Registered instances by health",
            m.instances.clone(),
        );
        reg.register(
            "wayfinder_control_registrations",
            "Registrations accepted",
            m.registrations.clone(),
        );
        reg.register(
            "wayfinder_control_lease_expirations",
            "Leases that expired",
            m.lease_expirations.clone(),
        );
        m
    }

    fn set_counts(&self, services: i64, serving: i64, not_serving: i64, unknown: i64) {
        self.services.set(services);
        for (health, n) in [
            ("serving", serving),
            ("not_serving", not_serving),
            ("unknown", unknown),
        ] {
            self.instances.get_or_create(&HealthLabel { health }).set(n);
        }
    }
}

impl Registry {
    pub(super) fn update_gauges(&self, st: &State) {
        let (mut serving, mut not_serving, mut unknown) = (0i64, 0i64, 0i64);
        let mut services = 0i64;
        for svc in st.services.values() {
            services += i64::from(svc.exists());
            for e in svc.endpoints.values() {
                match e.health {
                    Health::Serving => serving += 1,
                    Health::NotServing => not_serving += 1,
                    Health::Unknown => unknown += 1,
                }
            }
        }
        self.metrics
            .set_counts(services, serving, not_serving, unknown);
    }
}
