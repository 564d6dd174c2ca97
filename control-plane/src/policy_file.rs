//! The `--policy FILE`: loaded at start (an invalid file stops wf-control),
//! then polled; a changed file is applied when valid and refused, with the
//! policy in force kept, when not. The file is declarative: a service removed
//! from it loses the policy the file gave it.

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::{counter::Counter, family::Family};
use prometheus_client::registry::Registry as PromRegistry;
use wayfinder_proto::policy::{PolicyError, PolicyFile};

use crate::store::Backend;

/// How often the file is checked for changes.
pub const POLL: Duration = Duration::from_millis(500);

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ResultLabel {
    result: &'static str,
}

/// Applies a policy file through the store backend and keeps it applied.
pub struct PolicyWatcher {
    path: PathBuf,
    backend: Arc<dyn Backend>,
    managed: BTreeSet<String>,
    last: Option<Vec<u8>>,
    reloads: Family<ResultLabel, Counter>,
}

impl PolicyWatcher {
    /// Loads `path` once; fails with the validation error when it is invalid.
    pub async fn load(
        path: PathBuf,
        backend: Arc<dyn Backend>,
        prom: &mut PromRegistry,
    ) -> Result<Self, PolicyError> {
        let reloads = Family::default();
        prom.register(
            "wayfinder_control_policy_reloads",
            "Policy file loads by result (applied, invalid)",
            reloads.clone(),
        );
        let mut me = Self {
            path,
            backend,
            managed: BTreeSet::new(),
            last: None,
            reloads,
        };
        me.check().await?;
        Ok(me)
    }

    /// Polls the file forever.
    pub async fn run(mut self) {
        loop {
            tokio::time::sleep(POLL).await;
            if let Err(e) = self.check().await {
                // The previous policy stays in force; say so once per change.
                tracing::error!(error = %e, "policy file refused; keeping the policy in force");
            }
        }
    }

    async fn check(&mut self) -> Result<(), PolicyError> {
        let bytes = match std::fs::read(&self.path) {
            Ok(b) => b,
            Err(e) => {
                if self.last.is_none() {
                    return Err(PolicyError {
                        file: self.path.display().to_string(),
                        line: 0,
                        field: "(file)".into(),
                        message: format!("cannot read: {e}"),
                    });
                }
                // A file being replaced can be briefly missing; try again later.
                return Ok(());
            }
        };
        if self.last.as_ref() == Some(&bytes) {
            return Ok(());
        }
        self.last = Some(bytes.clone());
        let name = self.path.display().to_string();
        let text = String::from_utf8_lossy(&bytes);
        let file = match PolicyFile::parse(&name, &text) {
            Ok(f) => f,
            Err(e) => {
                self.reloads
                    .get_or_create(&ResultLabel { result: "invalid" })
                    .inc();
                return Err(e);
            }
        };
        let now: BTreeSet<String> = file
            .services
            .keys()
            .map(|k| k.as_str().to_string())
            .collect();
        let store_error = |e: crate::store::BackendError| PolicyError {
            file: name.clone(),
            line: 0,
            field: "(store)".into(),
            message: e.to_string(),
        };
        for gone in self.managed.difference(&now) {
            self.backend
                .remove_policy(gone)
                .await
                .map_err(store_error)?;
        }
        let (version, changed) =
            self.backend
                .apply_policies(file.to_proto())
                .await
                .map_err(|e| {
                    // Not the file's fault: read it again next time.
                    self.last = None;
                    store_error(e)
                })?;
        self.managed = now;
        self.reloads
            .get_or_create(&ResultLabel { result: "applied" })
            .inc();
        tracing::info!(file = %name, ?changed, version, "policy file applied");
        Ok(())
    }
}
