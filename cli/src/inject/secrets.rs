//! The join tokens of an injected lab: one per mesh service, each in an
//! env file of its own that only that service's sidecars load, and all of
//! them in the control plane's. Files readable by their owner only; kept
//! across runs, so injecting again does not change a running lab's tokens.

use std::collections::{BTreeMap, BTreeSet};
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::Path;

use anyhow::{Context, Result};

/// Env file variable the sidecar and the control plane read.
const VAR: &str = "WAYFINDER_JOIN_TOKEN";

/// The token of each service: those already in `dir`, new ones for the rest.
pub fn tokens(dir: &Path, services: &BTreeSet<String>) -> Result<BTreeMap<String, String>> {
    let mut out = BTreeMap::new();
    for s in services {
        let existing = std::fs::read_to_string(dir.join(format!("{s}.env")))
            .ok()
            .and_then(|text| {
                text.lines()
                    .find_map(|l| l.strip_prefix(&format!("{VAR}=")).map(str::to_string))
            })
            .filter(|t| t.len() >= 16);
        out.insert(s.clone(), existing.unwrap_or_else(fresh));
    }
    Ok(out)
}

/// A new join token: 128 random bits, hex.
pub fn fresh() -> String {
    let mut b = [0u8; 16];
    rand::fill(&mut b);
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// Writes `dir/<service>.env` for each service and `dir/control.env` with
/// them all, owner-only (the directory too).
pub fn write(dir: &Path, tokens: &BTreeMap<String, String>) -> Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
        .with_context(|| format!("restricting {}", dir.display()))?;
    for (service, token) in tokens {
        file(
            &dir.join(format!("{service}.env")),
            &format!("{VAR}={token}\n"),
        )?;
    }
    let all: Vec<String> = tokens.iter().map(|(s, t)| format!("{t}:{s}")).collect();
    file(
        &dir.join("control.env"),
        &format!(
            "# Each token is good for its service only.\n{VAR}={}\n",
            all.join(" ")
        ),
    )
}

fn file(path: &Path, text: &str) -> Result<()> {
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("writing {}", path.display()))?;
    // An existing file keeps its mode on open: set it.
    f.set_permissions(std::fs::Permissions::from_mode(0o600))?;
    f.write_all(text.as_bytes())
        .with_context(|| format!("writing {}", path.display()))
}
