//! The start-up most end-to-end tests share: a control plane, a policy
//! applied with `wfctl`, and lab-app instances behind their sidecars, all
//! serving before the test begins.
//!
//! ```ignore
//! let Running { cp, instances } = Scenario::new()
//!     .policy("[services.web]\nbalancer = \"round-robin\"\n")
//!     .instances("web", 3)
//!     .start()
//!     .await?;
//! let (client, web, _) = mesh::client(&cp, &[])?;
//! ```
//!
//! The client sidecar stays a call of its own ([`crate::mesh::client`]):
//! many tests act on the instances (faults, policies) before it starts.

use anyhow::Result;

use crate::mesh::{Instance, instance_with, wait_serving};
use crate::{ControlPlane, wfctl};

/// What to start; [`Scenario::start`] starts it.
#[derive(Default)]
pub struct Scenario {
    control_plane_args: Vec<String>,
    policy: Option<String>,
    service: String,
    instances: usize,
    health_check: Option<String>,
    sidecar_args: Vec<String>,
}

/// A started scenario; every process is killed when it is dropped.
pub struct Running {
    /// The control plane (`--insecure`, as [`ControlPlane::start`]).
    pub cp: ControlPlane,
    /// `SERVICE-1` to `SERVICE-N`, all serving when `start` returned.
    pub instances: Vec<Instance>,
}

impl Scenario {
    /// A control plane alone, with no flags, no policy and no instances.
    pub fn new() -> Self {
        Self::default()
    }

    /// More wf-control flags (see [`ControlPlane::start`]).
    pub fn control_plane_args(mut self, args: &[&str]) -> Self {
        self.control_plane_args = strings(args);
        self
    }

    /// A policy (TOML) applied with `wfctl policy apply` before any instance starts.
    pub fn policy(mut self, toml: &str) -> Self {
        self.policy = Some(toml.to_string());
        self
    }

    /// `n` instances of `service`, named `SERVICE-1` to `SERVICE-N`.
    pub fn instances(mut self, service: &str, n: usize) -> Self {
        self.service = service.to_string();
        self.instances = n;
        self
    }

    /// The sidecars' `--health-check` (default `/healthz`; `tcp` connects only).
    pub fn health_check(mut self, check: &str) -> Self {
        self.health_check = Some(check.to_string());
        self
    }

    /// More flags for every instance's sidecar (e.g. `--join-token`).
    pub fn sidecar_args(mut self, args: &[&str]) -> Self {
        self.sidecar_args = strings(args);
        self
    }

    /// Starts the control plane, applies the policy, starts the instances
    /// one after another and waits until all of them are serving.
    pub async fn start(self) -> Result<Running> {
        let cp_args: Vec<&str> = self.control_plane_args.iter().map(String::as_str).collect();
        let cp = ControlPlane::start(&cp_args)?;
        if let Some(toml) = &self.policy {
            apply_policy(&cp, toml)?;
        }
        let check = self.health_check.as_deref().unwrap_or("/healthz");
        let extra: Vec<&str> = self.sidecar_args.iter().map(String::as_str).collect();
        let instances = (1..=self.instances)
            .map(|i| {
                let name = format!("{}-{i}", self.service);
                instance_with(&cp, &self.service, &name, check, &extra)
            })
            .collect::<Result<Vec<_>>>()?;
        if self.instances > 0 {
            wait_serving(&cp, &self.service, self.instances).await?;
        }
        Ok(Running { cp, instances })
    }
}

/// Writes `toml` to a file of its own and applies it with `wfctl policy
/// apply` (which reads the file at once: none is kept); fails if refused.
pub fn apply_policy(cp: &ControlPlane, toml: &str) -> Result<()> {
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("policy.toml");
    std::fs::write(&path, toml)?;
    let (ok, _, err) = wfctl(cp, &["policy", "apply", &path.to_string_lossy()])?;
    anyhow::ensure!(ok, "policy apply failed: {err}");
    Ok(())
}

fn strings(args: &[&str]) -> Vec<String> {
    args.iter().map(|s| s.to_string()).collect()
}
