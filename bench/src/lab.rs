//! What every benchmark program needs to run a lab on loopback: child
//! processes that die with the benchmark, free ports, and waiting until
//! something answers.

use std::ffi::OsStr;
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

/// Child processes killed on drop.
#[derive(Default)]
pub struct Procs(Vec<Child>);

impl Procs {
    /// Starts `bin` with `args`, logging to `log` (quietly: `WAYFINDER_LOG=warn`);
    /// returns its index for [`Procs::pid`] and [`Procs::kill`].
    pub fn spawn<S: AsRef<OsStr>>(&mut self, bin: &Path, args: &[S], log: &Path) -> Result<usize> {
        let out = std::fs::File::create(log)?;
        let child = Command::new(bin)
            .args(args)
            .env("WAYFINDER_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out)
            .spawn()
            .with_context(|| format!("starting {}", bin.display()))?;
        self.0.push(child);
        Ok(self.0.len() - 1)
    }

    /// The process id of child `i`.
    pub fn pid(&self, i: usize) -> u32 {
        self.0[i].id()
    }

    /// Kills child `i` at once (SIGKILL).
    pub fn kill(&mut self, i: usize) {
        let _ = self.0[i].kill();
        let _ = self.0[i].wait();
    }
}

impl Drop for Procs {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// A port nothing listens on right now (shared with `wfctl lab compare`).
pub use wayfinder_cli::lab::free_port;

/// `127.0.0.1:port`.
pub fn local(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

/// Polls `addr` + `path` until the answer satisfies `ok` (20 s at most).
pub async fn wait_for(addr: SocketAddr, path: &str, ok: impl Fn(u16, &str) -> bool) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Ok((status, body)) = wayfinder_tests::http_get(addr, path).await
            && ok(status, &body)
        {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("{addr}{path} did not become ready");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
