//! `wfctl inject`: put the mesh into a docker-compose file, and take it out.
//!
//! Each meshed service gets a sidecar service that owns the network
//! namespace: the sidecar carries the service's networks, aliases,
//! hostname and published ports, captures the namespace's TCP at start
//! (`wf-proxy --capture`, then it drops root), and reports healthy once
//! ready; the app joins it (`network_mode: service:…`) and starts only
//! then (`depends_on: condition: service_healthy`). The app keeps its
//! image, command and user, and gets no capability.
//!
//! The rewrite is pure ([`inject`], [`remove`]): text in, text out, with
//! the tokens kept apart ([`secrets`]) so the file holds no secret. The
//! original text rides along in the `x-wayfinder` key, so `--remove` gives
//! it back byte for byte, and injecting a meshed file again gives the same
//! file.

pub mod compose;
pub mod secrets;
pub mod yaml11;

pub use compose::{Injected, Options, inject, remove};

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};

/// What `wfctl inject` was asked.
#[derive(Debug, Clone)]
pub struct Request {
    /// The compose file.
    pub file: PathBuf,
    /// Where the result goes (stdout when `None`).
    pub out: Option<PathBuf>,
    /// Take the mesh out instead.
    pub remove: bool,
    /// `--only`.
    pub only: Vec<String>,
    /// `--skip`.
    pub skip: Vec<String>,
}

/// The tokens' directory beside the output (or the input, for stdout):
/// `lab.meshed.yaml` → `lab.meshed.wayfinder`. Returns it as the compose
/// file names it (relative) and as a path.
pub fn secrets_dir(r: &Request) -> (String, PathBuf) {
    let beside = r.out.as_deref().unwrap_or(&r.file);
    let stem = beside
        .file_stem()
        .map_or_else(|| "compose".into(), |s| s.to_string_lossy().to_string());
    let name = format!("{stem}.wayfinder");
    let dir = beside.parent().unwrap_or(Path::new(".")).join(&name);
    (format!("./{name}"), dir)
}

/// Runs `wfctl inject`: everything is checked before anything is written.
pub fn run(r: &Request) -> Result<()> {
    let text = std::fs::read_to_string(&r.file)
        .with_context(|| format!("reading {}", r.file.display()))?;
    let (relative, dir) = secrets_dir(r);
    let o = Options {
        file: r.file.display().to_string(),
        only: r.only.clone(),
        skip: r.skip.clone(),
        secrets_dir: relative,
    };
    // The file goes to a temporary beside OUT first, so an OUT that cannot
    // be written fails before any token is, and OUT appears whole or not.
    let staged = match &r.out {
        Some(path) => {
            let dir = path.parent().filter(|d| !d.as_os_str().is_empty());
            let tmp = tempfile::NamedTempFile::new_in(dir.unwrap_or(Path::new(".")))
                .with_context(|| format!("writing {}", path.display()))?;
            Some((path, tmp))
        }
        None => None,
    };
    let result = if r.remove {
        let original = remove(&text, &o)?;
        eprintln!(
            "wfctl inject --remove: the join tokens in {} are no longer used",
            dir.display()
        );
        original
    } else {
        let injected = inject(&text, &o)?;
        for w in &injected.warnings {
            eprintln!("wfctl inject: warning: {w}");
        }
        let tokens = secrets::tokens(&dir, &injected.mesh_services())?;
        secrets::write(&dir, &tokens)?;
        for m in &injected.meshed {
            let port = m.port.map_or("client only".into(), |p| format!("port {p}"));
            eprintln!(
                "wfctl inject: {} → service {}, instance {} ({port})",
                m.compose, m.service, m.instance
            );
        }
        eprintln!(
            "wfctl inject: join tokens in {} (owner-only)",
            dir.display()
        );
        injected.text
    };
    match staged {
        Some((path, tmp)) => {
            use std::os::unix::fs::PermissionsExt;
            std::fs::write(tmp.path(), result)
                .with_context(|| format!("writing {}", path.display()))?;
            // A compose file is no secret (the tokens are beside it).
            std::fs::set_permissions(tmp.path(), std::fs::Permissions::from_mode(0o644))?;
            tmp.persist(path)
                .with_context(|| format!("writing {}", path.display()))?;
        }
        None => print!("{result}"),
    }
    Ok(())
}

/// Why a file cannot be meshed (or unmeshed); nothing is written then.
#[derive(Debug, thiserror::Error)]
pub enum InjectError {
    /// Not YAML.
    #[error("{file}: {message}")]
    Yaml {
        /// The compose file.
        file: String,
        /// The parser's message, with line and column.
        message: String,
    },
    /// YAML, but not a compose file we understand.
    #[error("{file}: {at}: {message}")]
    Compose {
        /// The compose file.
        file: String,
        /// Where: `services.web1.scale`, or a top-level key.
        at: String,
        /// What is wrong, and what to do.
        message: String,
    },
}
