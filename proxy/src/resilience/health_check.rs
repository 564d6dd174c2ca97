//! Active health checks of upstream endpoints, as nginx's `health_check`
//! and HAProxy's `check inter fall rise`: for endpoints nobody reports
//! health for (DNS), or when a policy asks. A check is a TCP connect, an
//! HTTP GET or a gRPC `grpc.health.v1` call. An endpoint turns unhealthy
//! after `unhealthy_threshold` failed checks in a row and healthy again
//! after `healthy_threshold` good ones.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use super::probe::{Check, probe};
use crate::settings::HealthCheck;

/// What active checks drive: one service's endpoints (the upstream
/// implements it; checks know nothing of its balancer).
pub trait Checked: Send + Sync + 'static {
    /// The checks its current settings ask for, if any.
    fn health_check(&self) -> Option<HealthCheck>;
    /// The endpoints to check: id and address.
    fn check_targets(&self) -> Vec<(String, SocketAddr)>;
    /// One check's result for endpoint `id`.
    fn record_check(&self, id: &str, ok: bool, hc: &HealthCheck);
}

/// One endpoint's check history.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct State {
    healthy: bool,
    streak: u32,
}

impl Default for State {
    /// New endpoints are trusted until checks say otherwise, so a fresh DNS
    /// answer takes traffic at once.
    fn default() -> Self {
        Self {
            healthy: true,
            streak: 0,
        }
    }
}

impl State {
    /// Records one check; true when the endpoint's health flipped.
    pub fn record(&mut self, ok: bool, s: &HealthCheck) -> bool {
        if ok == self.healthy {
            self.streak = 0;
            return false;
        }
        self.streak += 1;
        let needed = if ok {
            s.healthy_threshold
        } else {
            s.unhealthy_threshold
        };
        if self.streak >= needed {
            self.healthy = ok;
            self.streak = 0;
            return true;
        }
        false
    }

    /// What the checks say.
    pub fn healthy(&self) -> bool {
        self.healthy
    }
}

/// The probe `hc` asks for: gRPC, else HTTP, else a TCP connect.
fn check_of(hc: &HealthCheck) -> Check {
    match (&hc.grpc_service, &hc.http_path) {
        (Some(service), _) => Check::Grpc(service.clone()),
        (None, Some(path)) => Check::Http(path.clone()),
        (None, None) => Check::Tcp,
    }
}

/// Idle wait while checks are off for the upstream.
const OFF_POLL: Duration = Duration::from_secs(1);

/// Checks `up`'s endpoints for as long as the sidecar runs, whenever its
/// settings turn checks on.
pub async fn run(up: Arc<impl Checked>) {
    loop {
        let Some(hc) = up.health_check() else {
            tokio::time::sleep(OFF_POLL).await;
            continue;
        };
        let check = check_of(&hc);
        let rounds = up.check_targets().into_iter().map(|(id, addr)| {
            let check = &check;
            async move {
                let ok = tokio::time::timeout(hc.timeout, probe(addr, check))
                    .await
                    .unwrap_or(false);
                (id, ok)
            }
        });
        for (id, ok) in futures::future::join_all(rounds).await {
            up.record_check(&id, ok, &hc);
        }
        tokio::time::sleep(hc.interval).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fall_and_rise_thresholds() {
        let s = HealthCheck {
            healthy_threshold: 2,
            unhealthy_threshold: 3,
            ..HealthCheck::default()
        };
        let mut st = State::default();
        assert!(!st.record(false, &s));
        assert!(!st.record(true, &s), "a good check breaks the streak");
        assert!(!st.record(false, &s));
        assert!(!st.record(false, &s));
        assert!(st.record(false, &s), "third failure in a row");
        assert!(!st.healthy());
        assert!(!st.record(true, &s));
        assert!(st.record(true, &s));
        assert!(st.healthy());
    }

    #[test]
    fn the_policy_chooses_the_probe() {
        let hc = |http: Option<&str>, grpc: Option<&str>| HealthCheck {
            http_path: http.map(str::to_string),
            grpc_service: grpc.map(str::to_string),
            ..HealthCheck::default()
        };
        assert_eq!(check_of(&hc(None, None)), Check::Tcp);
        assert_eq!(
            check_of(&hc(Some("/healthz"), None)),
            Check::Http("/healthz".into())
        );
        assert_eq!(check_of(&hc(None, Some(""))), Check::Grpc(String::new()));
        assert_eq!(
            check_of(&hc(None, Some("lab.Echo"))),
            Check::Grpc("lab.Echo".into())
        );
    }
}
