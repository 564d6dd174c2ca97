//! Docker labs in tests: the compose command where an engine exists, a
//! compose project torn down on drop, and the images (built once per run:
//! docker's cache makes later builds no-ops).

use std::time::Duration;

use anyhow::{Context, Result};

/// The Wayfinder image the tests use.
pub const IMAGE: &str = "wayfinder:test-lab";

/// Builds (or finds cached) the Wayfinder image: static binaries,
/// Debian's iptables, nothing pulled.
pub async fn wayfinder_image() -> Result<&'static str> {
    script(
        "deploy/docker-build.sh",
        &[("WAYFINDER_PROFILE", "image"), ("WAYFINDER_IMAGE", IMAGE)],
    )
    .await?;
    Ok(IMAGE)
}

/// Builds the classic lab's busybox and nginx images from Debian's packages.
pub async fn lab_images() -> Result<()> {
    script("deploy/lab-images.sh", &[]).await
}

async fn script(path: &str, env: &[(&str, &str)]) -> Result<()> {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let build = tokio::process::Command::new("bash")
        .arg(root.join(path))
        .envs(env.iter().copied())
        .kill_on_drop(true)
        .output();
    let build = tokio::time::timeout(Duration::from_secs(900), build)
        .await
        .with_context(|| format!("{path} within 15 min"))??;
    anyhow::ensure!(
        build.status.success(),
        "{path}: {}",
        String::from_utf8_lossy(&build.stderr)
    );
    Ok(())
}

/// `docker-compose` (Debian's) or the `docker compose` plugin, when a Docker
/// engine answers; else why the Docker lab test skips.
pub fn compose_command() -> std::result::Result<Vec<String>, String> {
    wayfinder_cli::lab::docker::compose_command().map_err(|e| e.to_string())
}

/// A compose project, taken down (containers, network, volumes) on drop.
pub struct Project {
    /// The compose command (`docker-compose` or `docker compose`).
    pub compose: Vec<String>,
    /// The project name (`-p`).
    pub name: String,
    /// The compose file.
    pub file: std::path::PathBuf,
    /// Variables for compose's interpolation.
    pub env: Vec<(String, String)>,
}

impl Project {
    /// `compose -p NAME -f FILE ARGS`.
    pub fn cmd(&self, args: &[&str]) -> std::process::Command {
        let mut c = std::process::Command::new(&self.compose[0]);
        c.args(&self.compose[1..])
            .args(["-p", &self.name, "-f"])
            .arg(&self.file)
            .args(args)
            .envs(self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())));
        c
    }

    /// `wfctl policy apply` of `toml` inside the `control` service (which
    /// holds the operator credential).
    pub fn apply_policy(&self, control: &str, toml: &str) -> Result<()> {
        use std::io::Write;
        let mut c = self
            .cmd(&[
                "exec",
                "-T",
                control,
                "wfctl",
                "policy",
                "apply",
                "/dev/stdin",
            ])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()?;
        c.stdin
            .take()
            .context("stdin")?
            .write_all(toml.as_bytes())?;
        let out = c.wait_with_output()?;
        anyhow::ensure!(
            out.status.success(),
            "wfctl policy apply: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(())
    }

    /// Runs `compose ARGS`; its stdout, or an error with its stderr.
    pub fn run(&self, args: &[&str]) -> Result<String> {
        let out = self.cmd(args).output()?;
        anyhow::ensure!(
            out.status.success(),
            "compose {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(String::from_utf8_lossy(&out.stdout).to_string())
    }
}

impl Drop for Project {
    fn drop(&mut self) {
        let _ = self
            .cmd(&["down", "-v", "--remove-orphans", "-t", "2"])
            .output();
    }
}
