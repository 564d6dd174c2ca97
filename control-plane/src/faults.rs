//! Faults that end by themselves. A fault's end is part of the stored policy
//! (`expires_at_unix_ms`, wall clock), so it survives a restart of
//! wf-control. The callers' sidecars stop injecting at that instant on their
//! own; this task then removes the fault from the policy, through the store
//! backend like any `ApplyPolicy` (a new version, pushed to watchers), so
//! `wfctl fault list`, the dashboard and sidecars started later agree. It
//! looks at start-up too: a fault that ended while wf-control was down is
//! removed at once.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use wayfinder_proto::v1::ServicePolicy;

use crate::registry::Registry;
use crate::store::Backend;

/// Longest sleep between two looks: the wall clock a fault's end is written
/// in may be set while the task sleeps on the monotonic one.
pub const MAX_SLEEP: Duration = Duration::from_secs(30);
/// Wait before trying again when the store refused a removal.
const RETRY: Duration = Duration::from_secs(1);

/// Now, in Unix milliseconds.
pub fn unix_ms_now() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// The end of a policy's fault, if it has one that ends.
fn end(p: &ServicePolicy) -> Option<u64> {
    p.fault
        .as_ref()
        .map(|f| f.expires_at_unix_ms)
        .filter(|&t| t != 0)
}

/// The policies whose fault has ended at `now_ms`, with the fault taken out.
pub fn ended(policies: &[ServicePolicy], now_ms: u64) -> Vec<ServicePolicy> {
    policies
        .iter()
        .filter(|p| end(p).is_some_and(|t| t <= now_ms))
        .map(|p| ServicePolicy {
            fault: None,
            ..p.clone()
        })
        .collect()
}

/// The earliest end of a fault still running at `now_ms`.
pub fn next_end(policies: &[ServicePolicy], now_ms: u64) -> Option<u64> {
    policies
        .iter()
        .filter_map(end)
        .filter(|&t| t > now_ms)
        .min()
}

/// How long to sleep at `now_ms` before the next look.
pub fn sleep_for(policies: &[ServicePolicy], now_ms: u64) -> Duration {
    next_end(policies, now_ms)
        .map_or(MAX_SLEEP, |t| Duration::from_millis(t - now_ms))
        .min(MAX_SLEEP)
}

/// Removes faults as they end, forever: wakes at the next end, and on any
/// change of the registry (a new fault may end sooner). `clock` gives the
/// wall clock in Unix milliseconds ([`unix_ms_now`]; tests pass their own).
pub async fn expire(
    registry: Arc<Registry>,
    backend: Arc<dyn Backend>,
    clock: impl Fn() -> u64 + Send,
) {
    let mut changes = registry.watch_changes();
    loop {
        // Marked seen before reading, so a change made after the read wakes
        // the wait below.
        changes.borrow_and_update();
        let now = clock();
        let policies = registry.policies();
        let done = ended(&policies, now);
        if !done.is_empty() {
            let services: Vec<String> = done.iter().map(|p| p.service.clone()).collect();
            match backend.apply_policies(done).await {
                Ok((version, changed)) => {
                    tracing::info!(?services, ?changed, version, "faults ended");
                    // A shared store's replica sees its own write a moment
                    // later: wait for it rather than write again.
                    let _ = tokio::time::timeout(RETRY, changes.changed()).await;
                }
                Err(e) => {
                    tracing::warn!(?services, error = %e, "could not remove ended faults; retrying");
                    tokio::time::sleep(RETRY).await;
                }
            }
            continue;
        }
        tokio::select! {
            () = tokio::time::sleep(sleep_for(&policies, now)) => {}
            r = changes.changed() => {
                if r.is_err() {
                    return;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::registry::{LeaseConfig, Registered, RegistryMetrics};
    use crate::store::BackendError;
    use wayfinder_proto::v1::{Fault, FaultAbort, Health, Instance};

    /// Writes straight to the registry, as the embedded store does before
    /// its file write.
    struct Direct(Arc<Registry>);

    #[tonic::async_trait]
    impl Backend for Direct {
        async fn register(
            &self,
            _: Instance,
            _: bool,
            _: Option<Duration>,
            _: Health,
        ) -> Result<Registered, BackendError> {
            unreachable!("not used by the expiry")
        }
        async fn heartbeat(&self, _: u64, _: Health) -> Result<Duration, BackendError> {
            unreachable!("not used by the expiry")
        }
        async fn deregister_lease(&self, _: u64) -> Result<u64, BackendError> {
            unreachable!("not used by the expiry")
        }
        async fn deregister_address(&self, _: &str, _: &str, _: u32) -> Result<u64, BackendError> {
            unreachable!("not used by the expiry")
        }
        async fn apply_policies(
            &self,
            policies: Vec<ServicePolicy>,
        ) -> Result<(u64, Vec<String>), BackendError> {
            Ok(self.0.apply_policies(policies))
        }
        async fn remove_policy(&self, service: &str) -> Result<bool, BackendError> {
            Ok(self.0.remove_policy(service))
        }
        fn ready(&self) -> bool {
            true
        }
        fn describe(&self) -> String {
            "test".into()
        }
    }

    /// Wall clock of the tests: this Unix time at the start, moving with
    /// tokio's (paused) clock.
    const T0: u64 = 1_764_547_200_000;

    fn clock() -> impl Fn() -> u64 + Send {
        let start = tokio::time::Instant::now();
        move || T0 + start.elapsed().as_millis() as u64
    }

    fn faulty(service: &str, expires_at_unix_ms: u64) -> ServicePolicy {
        ServicePolicy {
            service: service.into(),
            balancer: 1,
            fault: Some(Fault {
                abort: Some(FaultAbort {
                    status: 503,
                    percent: 100.0,
                }),
                expires_at_unix_ms,
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    fn has_fault(reg: &Registry, service: &str) -> bool {
        reg.policy(service).is_some_and(|p| p.fault.is_some())
    }

    #[test]
    fn ended_faults_are_taken_out_and_the_next_end_is_found() {
        let ps = [
            faulty("a", 1_000),
            faulty("b", 3_000),
            faulty("c", 0),
            faulty("d", 2_000),
        ];
        let done = ended(&ps, 2_000);
        let names: Vec<_> = done.iter().map(|p| p.service.as_str()).collect();
        assert_eq!(names, ["a", "d"], "an end equal to now has ended");
        assert!(done.iter().all(|p| p.fault.is_none() && p.balancer == 1));
        assert_eq!(next_end(&ps, 2_000), Some(3_000), "0 never ends");
        assert_eq!(sleep_for(&ps, 2_000), Duration::from_secs(1));
        assert_eq!(sleep_for(&ps[2..3], 2_000), MAX_SLEEP);
    }

    #[tokio::test(start_paused = true)]
    async fn a_fault_goes_at_its_end_and_one_that_ended_before_the_start_goes_at_once() {
        let reg = Registry::new(
            LeaseConfig::default(),
            RegistryMetrics::register(&mut prometheus_client::registry::Registry::default()),
            None,
        );
        // Ended while wf-control was down.
        reg.apply_policies(vec![faulty("old", T0 - 5_000), faulty("web", T0 + 2_000)]);
        let task = tokio::spawn(expire(reg.clone(), Arc::new(Direct(reg.clone())), clock()));
        tokio::time::sleep(Duration::from_millis(1)).await;
        assert!(!has_fault(&reg, "old"), "removed at start-up");
        assert_eq!(
            reg.policy("old").map(|p| p.balancer),
            Some(1),
            "the rest stays"
        );
        // A fault applied later that ends sooner wakes the task.
        tokio::time::sleep(Duration::from_millis(100)).await;
        reg.apply_policies(vec![faulty("api", T0 + 500)]);
        tokio::time::sleep(Duration::from_millis(390)).await;
        assert!(has_fault(&reg, "api"), "not before its end");
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(!has_fault(&reg, "api"), "at its end");
        let before = reg.version();
        tokio::time::sleep(Duration::from_millis(1_480)).await;
        assert!(has_fault(&reg, "web"));
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(!has_fault(&reg, "web"));
        assert!(reg.version() > before, "the removal is a new version");
        task.abort();
    }
}
