//! The sidecars' last status, from the status every traffic report carries:
//! per upstream the discovery version applied, compared with the
//! registry's, and whether the sidecar is STALE — it trails the registry
//! for more than [`MAX_TRAIL`] or has not reported for [`SILENT_AFTER`].
//! `GET /v1/proxy-status` serves it; `wfctl proxy-status` and `wfctl check`
//! read it. Each replica knows the sidecars that report to it.

use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;
use std::time::Duration;
pub use wayfinder_proto::view::{SidecarView, UpstreamStatusView};

use tokio::time::Instant;
use wayfinder_proto::v1::{SidecarStatus, UpstreamStatus};

/// A sidecar trailing the registry for longer than this on any upstream is
/// STALE: a change reaches a healthy one in milliseconds, and its report
/// (every 2 s) says so by the next one.
pub const MAX_TRAIL: Duration = Duration::from_secs(5);
/// A sidecar that has not reported for this long is STALE: it reports every
/// 2 s, so this is five reports missed.
pub const SILENT_AFTER: Duration = Duration::from_secs(10);
/// A sidecar silent for this long is forgotten; one whose instance the
/// registry removed is forgotten once silent.
pub const FORGET_AFTER: Duration = Duration::from_secs(60);
/// Most sidecars tracked at once; reports of further ones are refused
/// until silent ones are forgotten.
pub const MAX_SIDECARS: usize = 10_000;

/// What the registry says about a sidecar's services.
pub trait Registered {
    /// The service's current version; `None` when it has no endpoints or policy.
    fn version(&self, service: &str) -> Option<u64>;
    /// Whether `instance` of `service` is registered.
    fn registered(&self, service: &str, instance: &str) -> bool;
}

impl Registered for crate::registry::Registry {
    fn version(&self, service: &str) -> Option<u64> {
        self.endpoints(service).map(|(v, _)| v)
    }
    fn registered(&self, service: &str, instance: &str) -> bool {
        self.lease_of(service, instance).is_some()
    }
}

struct Entry {
    status: SidecarStatus,
    /// When its last report came, on the monotonic clock and as Unix ms.
    received: Instant,
    received_unix_ms: u64,
    /// Whether its instance was registered at its last report.
    registered: bool,
    /// Since when each upstream has trailed the registry.
    behind_since: HashMap<String, Instant>,
}

impl Entry {
    /// Starts or ends each upstream's trail against the registry's versions.
    fn update_trail(&mut self, reg: &dyn Registered, now: Instant) {
        let mut trails = HashMap::new();
        for u in &self.status.upstreams {
            if reg.version(&u.service).is_some_and(|v| u.version < v) {
                let since = self.behind_since.get(&u.service).copied().unwrap_or(now);
                trails.insert(u.service.clone(), since);
            }
        }
        self.behind_since = trails;
    }
}

/// The sidecars tracked, by (service, instance).
#[derive(Default)]
pub struct Sidecars {
    inner: Mutex<BTreeMap<(String, String), Entry>>,
}

/// Refused: [`MAX_SIDECARS`] are tracked already.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
#[error("wf-control tracks {MAX_SIDECARS} sidecars already")]
pub struct Full;

fn ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

impl Sidecars {
    /// Keeps `status` as the last of `instance` of `service`, received `now`.
    pub fn record(
        &self,
        service: &str,
        instance: &str,
        status: SidecarStatus,
        reg: &dyn Registered,
        (now, now_unix_ms): (Instant, u64),
    ) -> Result<(), Full> {
        let mut map = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        let key = (service.to_string(), instance.to_string());
        if !map.contains_key(&key) && map.len() >= MAX_SIDECARS {
            Self::forget(&mut map, reg, now);
            if map.len() >= MAX_SIDECARS {
                return Err(Full);
            }
        }
        let entry = map.entry(key).or_insert_with(|| Entry {
            status: SidecarStatus::default(),
            received: now,
            received_unix_ms: now_unix_ms,
            registered: false,
            behind_since: HashMap::new(),
        });
        entry.status = status;
        entry.received = now;
        entry.received_unix_ms = now_unix_ms;
        entry.registered = reg.registered(service, instance);
        entry.update_trail(reg, now);
        Ok(())
    }

    /// Forgets `instance` of `service`: it said it is leaving.
    pub fn leave(&self, service: &str, instance: &str) {
        self.inner
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&(service.to_string(), instance.to_string()));
    }

    /// Drops the sidecars silent for [`FORGET_AFTER`], and the silent ones
    /// whose instance the registry removed (they left or were reaped).
    fn forget(map: &mut BTreeMap<(String, String), Entry>, reg: &dyn Registered, now: Instant) {
        map.retain(|(service, instance), e| {
            let silent = now.saturating_duration_since(e.received);
            silent < FORGET_AFTER
                && (silent < SILENT_AFTER || !e.registered || reg.registered(service, instance))
        });
    }

    /// Every sidecar tracked as of `now`, by service and instance.
    pub fn view(&self, reg: &dyn Registered, now: Instant) -> Vec<SidecarView> {
        let mut map = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        Self::forget(&mut map, reg, now);
        map.iter_mut()
            .map(|((service, instance), e)| {
                e.update_trail(reg, now);
                let silent = now.saturating_duration_since(e.received);
                let upstreams: Vec<_> = e
                    .status
                    .upstreams
                    .iter()
                    .map(|u| upstream_view(u, reg, e.behind_since.get(&u.service), now))
                    .collect();
                let trailing = upstreams
                    .iter()
                    .filter(|u| u.behind_ms > ms(MAX_TRAIL))
                    .max_by_key(|u| u.behind_ms);
                let why = if silent >= SILENT_AFTER {
                    Some(format!("no report for {:.1}s", silent.as_secs_f64()))
                } else {
                    trailing.map(|u| {
                        format!(
                            "{} {:.1}s behind the registry",
                            u.service,
                            u.behind_ms as f64 / 1000.0
                        )
                    })
                };
                SidecarView {
                    service: service.clone(),
                    instance: instance.clone(),
                    last_report_unix_ms: e.received_unix_ms,
                    last_report_age_ms: ms(silent),
                    cert_not_after_unix_ms: Some(e.status.cert_not_after_unix_ms)
                        .filter(|&t| t > 0),
                    stale: why.is_some(),
                    why,
                    upstreams,
                }
            })
            .collect()
    }
}

fn upstream_view(
    u: &UpstreamStatus,
    reg: &dyn Registered,
    behind_since: Option<&Instant>,
    now: Instant,
) -> UpstreamStatusView {
    UpstreamStatusView {
        service: u.service.clone(),
        discovery: u.discovery.clone(),
        endpoints: u.endpoints,
        version: u.version,
        applied_unix_ms: u.applied_unix_ms,
        registry_version: reg.version(&u.service),
        behind_ms: behind_since.map_or(0, |s| ms(now.saturating_duration_since(*s))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::RefCell;

    /// A registry of fixed versions and registered instances.
    #[derive(Default)]
    struct Fake {
        versions: RefCell<HashMap<String, u64>>,
        instances: RefCell<Vec<(String, String)>>,
    }

    impl Registered for Fake {
        fn version(&self, service: &str) -> Option<u64> {
            self.versions.borrow().get(service).copied()
        }
        fn registered(&self, service: &str, instance: &str) -> bool {
            self.instances
                .borrow()
                .iter()
                .any(|(s, i)| s == service && i == instance)
        }
    }

    fn status(upstreams: &[(&str, u64)]) -> SidecarStatus {
        SidecarStatus {
            cert_not_after_unix_ms: 0,
            leaving: false,
            upstreams: upstreams
                .iter()
                .map(|(s, v)| UpstreamStatus {
                    service: s.to_string(),
                    discovery: "mesh".into(),
                    version: *v,
                    applied_unix_ms: 1,
                    endpoints: 2,
                })
                .collect(),
        }
    }

    fn at(now: Instant) -> (Instant, u64) {
        (now, 1_000)
    }

    #[tokio::test(start_paused = true)]
    async fn a_sidecar_is_stale_once_silent_for_ten_seconds() {
        let (reg, s) = (Fake::default(), Sidecars::default());
        reg.versions.borrow_mut().insert("web".into(), 7);
        let t0 = Instant::now();
        s.record("client", "c-1", status(&[("web", 7)]), &reg, at(t0))
            .expect("kept");
        let v = s.view(&reg, t0 + Duration::from_millis(9_900));
        assert!(!v[0].stale, "{v:?}");
        assert_eq!(v[0].upstreams[0].behind_ms, 0);
        let v = s.view(&reg, t0 + SILENT_AFTER);
        assert!(v[0].stale);
        assert_eq!(v[0].why.as_deref(), Some("no report for 10.0s"));
        assert_eq!(v[0].last_report_age_ms, 10_000);
        assert!(
            s.view(&reg, t0 + FORGET_AFTER).is_empty(),
            "forgotten after a minute"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_sidecar_is_stale_once_it_trails_the_registry_for_more_than_five_seconds() {
        let (reg, s) = (Fake::default(), Sidecars::default());
        reg.versions.borrow_mut().insert("web".into(), 7);
        let t0 = Instant::now();
        let report = |secs: u64, version: u64| {
            s.record(
                "client",
                "c-1",
                status(&[("web", version)]),
                &reg,
                at(t0 + Duration::from_secs(secs)),
            )
            .expect("kept");
        };
        report(0, 7);
        reg.versions.borrow_mut().insert("web".into(), 9);
        report(2, 7);
        report(4, 7);
        let v = s.view(&reg, t0 + Duration::from_secs(6));
        assert_eq!(v[0].upstreams[0].behind_ms, 4_000);
        assert_eq!(v[0].upstreams[0].registry_version, Some(9));
        assert!(!v[0].stale, "4 s is within the trail allowed");
        report(8, 7);
        let v = s.view(&reg, t0 + Duration::from_secs(8));
        assert!(v[0].stale);
        assert_eq!(v[0].why.as_deref(), Some("web 6.0s behind the registry"));
        report(10, 9);
        let v = s.view(&reg, t0 + Duration::from_secs(10));
        assert!(!v[0].stale, "caught up: {v:?}");
        reg.versions.borrow_mut().insert("web".into(), 10);
        report(12, 9);
        let v = s.view(&reg, t0 + Duration::from_secs(13));
        assert_eq!(
            v[0].upstreams[0].behind_ms, 1_000,
            "a new trail starts afresh"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_silent_sidecar_whose_instance_left_is_forgotten_and_the_table_is_bounded() {
        let (reg, s) = (Fake::default(), Sidecars::default());
        reg.instances
            .borrow_mut()
            .push(("web".into(), "web-1".into()));
        let t0 = Instant::now();
        s.record("web", "web-1", status(&[]), &reg, at(t0))
            .expect("kept");
        s.record("client", "c-1", status(&[]), &reg, at(t0))
            .expect("kept");
        reg.instances.borrow_mut().clear();
        let v = s.view(&reg, t0 + Duration::from_secs(1));
        assert_eq!(v.len(), 2, "still reporting a moment ago");
        let v = s.view(&reg, t0 + SILENT_AFTER);
        let names: Vec<_> = v.iter().map(|v| v.instance.as_str()).collect();
        assert_eq!(names, ["c-1"], "web-1 deregistered and went quiet");
        s.leave("client", "c-1");
        assert!(
            s.view(&reg, t0 + SILENT_AFTER).is_empty(),
            "c-1 said it left"
        );

        for i in 0..MAX_SIDECARS {
            s.record("client", &format!("n-{i}"), status(&[]), &reg, at(t0))
                .expect("room");
        }
        assert_eq!(
            s.record("client", "one-more", status(&[]), &reg, at(t0)),
            Err(Full)
        );
        s.record("client", "n-1", status(&[]), &reg, at(t0))
            .expect("a known sidecar always reports");
        s.record(
            "client",
            "one-more",
            status(&[]),
            &reg,
            at(t0 + FORGET_AFTER),
        )
        .expect("the silent ones are forgotten");
    }
}
