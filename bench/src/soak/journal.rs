//! What the processes' logs say happened, as it happens: certificate
//! renewals (and failed ones) and leases the control plane lost, each with
//! the time the soak read the line (at most half a second late).

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::watch;

use crate::mesh::Roles;
use crate::{Clock, lock};

/// A line that matters.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Said {
    /// A sidecar got its next certificate.
    Renewed,
    /// A sidecar's renewal failed (it retries while the old one is valid).
    RenewalFailed,
    /// A sidecar heard that the control plane no longer knew its lease:
    /// its registration was lost, and it registers again.
    LeaseLost,
}

impl Said {
    /// What it means, for the report.
    pub fn name(self) -> &'static str {
        match self {
            Said::Renewed => "certificate renewed",
            Said::RenewalFailed => "certificate renewal failed",
            Said::LeaseLost => "lease lost (registered again)",
        }
    }
}

/// The log lines, as the processes write them.
const LINES: [(&str, Said); 3] = [
    ("certificate renewed", Said::Renewed),
    ("certificate renewal failed", Said::RenewalFailed),
    ("lost our lease", Said::LeaseLost),
];

/// One line read.
#[derive(Clone, Debug)]
pub struct Entry {
    /// When it was read.
    pub t: f64,
    /// Whose log.
    pub role: String,
    /// What it said.
    pub said: Said,
}

/// Every line read so far.
#[derive(Clone, Default)]
pub struct Journal(Arc<Mutex<Vec<Entry>>>);

impl Journal {
    /// Everything read so far.
    pub fn entries(&self) -> Vec<Entry> {
        lock(&self.0).clone()
    }

    /// The first renewal read after `t`.
    pub fn renewed_after(&self, t: f64) -> Option<Entry> {
        lock(&self.0)
            .iter()
            .find(|e| e.said == Said::Renewed && e.t > t)
            .cloned()
    }
}

/// Reads what every process logged since the last look, twice a second,
/// until `stop` (and once more then).
pub async fn watch(roles: Roles, journal: Journal, clock: Clock, mut stop: watch::Receiver<bool>) {
    // Per role: which incarnation is being read, and how far.
    let mut read: BTreeMap<String, (u32, usize)> = BTreeMap::new();
    let mut last = false;
    loop {
        for (role, live) in roles.snapshot() {
            let Some(log) = live.log else { continue };
            let at = read.entry(role.clone()).or_insert((live.starts, 0));
            if at.0 != live.starts {
                *at = (live.starts, 0);
            }
            let text = lock(&log);
            // Whole lines only: the rest is read next time.
            let end = text.rfind('\n').map_or(0, |i| i + 1);
            if end <= at.1 {
                continue;
            }
            let t = clock.now();
            for line in text[at.1..end].lines() {
                if let Some((_, said)) = LINES.iter().find(|(needle, _)| line.contains(needle)) {
                    lock(&journal.0).push(Entry {
                        t,
                        role: role.clone(),
                        said: *said,
                    });
                }
            }
            at.1 = end;
        }
        if last {
            return;
        }
        tokio::select! {
            () = tokio::time::sleep(Duration::from_millis(500)) => {}
            _ = stop.changed() => last = true,
        }
    }
}
