//! A real etcd (Debian's `etcd-server`) for the replica tests: one member on
//! loopback, or three members in network namespaces. Members are killed and
//! their data deleted on drop.

use std::process::{Child, Command};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use crate::netns::Lab;
use crate::{command_in, spawn_command};

/// Why etcd tests cannot run here, or `None` when they can.
pub fn unavailable() -> Option<String> {
    let found = Command::new("sh")
        .args(["-c", "command -v etcd"])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    (!found).then(|| "etcd is not installed (Debian: etcd-server)".into())
}

/// One etcd member.
pub struct Member {
    child: Option<Child>,
    prefix: Vec<String>,
    args: Vec<String>,
    /// `http://IP:PORT` clients use.
    pub client_url: String,
    /// What it logged (zap JSON lines).
    pub log: Arc<Mutex<String>>,
    _data: Arc<tempfile::TempDir>,
}

impl Member {
    fn spawn(&mut self) -> Result<()> {
        let mut cmd = command_in(&self.prefix, "etcd");
        cmd.args(&self.args);
        // Serving peers comes before the cluster has a leader; readiness for
        // clients is waited for separately, once every member runs.
        let (child, _, log) = spawn_command(cmd, "etcd", "serving peer traffic")?;
        self.child = Some(child);
        self.log = log;
        Ok(())
    }

    /// Waits until it serves clients (the cluster has a leader).
    pub fn wait_serving(&self) -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let text = self.log.lock().map(|l| l.clone()).unwrap_or_default();
            if text.contains("serving client traffic") {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!(
                    "etcd member at {} did not serve clients: {text}",
                    self.client_url
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Kills it without warning.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts it again on its data directory.
    pub fn restart(&mut self) -> Result<()> {
        self.kill();
        self.spawn()
    }
}

impl Drop for Member {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A running etcd cluster.
pub struct Etcd {
    /// Its members.
    pub members: Vec<Member>,
}

impl Etcd {
    /// One member on loopback, on free ports.
    pub fn single() -> Result<Self> {
        let client = wayfinder_cli::lab::free_port()?;
        let peer = wayfinder_cli::lab::free_port()?;
        let peers = format!("m0=http://127.0.0.1:{peer}");
        let etcd = Self::start(vec![(Vec::new(), "127.0.0.1".into(), client, peer)], &peers)?;
        Ok(etcd)
    }

    /// Three members in namespaces of `lab`, at 10.77.0.`first`..`first+2`.
    pub fn three_in(lab: &mut Lab, first: u8) -> Result<Self> {
        let mut nodes = Vec::new();
        for i in 0..3u8 {
            let ns = lab.node(&format!("etcd{i}"), first + i)?;
            nodes.push((Lab::exec(&ns), Lab::ip(first + i).to_string(), 2379, 2380));
        }
        let peers = nodes
            .iter()
            .enumerate()
            .map(|(i, (_, ip, _, peer))| format!("m{i}=http://{ip}:{peer}"))
            .collect::<Vec<_>>()
            .join(",");
        Self::start(nodes, &peers)
    }

    fn start(nodes: Vec<(Vec<String>, String, u16, u16)>, peers: &str) -> Result<Self> {
        let mut members = Vec::new();
        for (i, (prefix, ip, client, peer)) in nodes.into_iter().enumerate() {
            let data = Arc::new(tempfile::tempdir()?);
            let client_url = format!("http://{ip}:{client}");
            let peer_url = format!("http://{ip}:{peer}");
            let args = [
                "--name",
                &format!("m{i}"),
                "--data-dir",
                &data.path().join("etcd").to_string_lossy(),
                "--logger",
                "zap",
                "--log-outputs",
                "stderr",
                "--listen-client-urls",
                &client_url,
                "--advertise-client-urls",
                &client_url,
                "--listen-peer-urls",
                &peer_url,
                "--initial-advertise-peer-urls",
                &peer_url,
                "--initial-cluster",
                peers,
                "--initial-cluster-state",
                "new",
                // Fast elections keep the member-loss test short.
                "--heartbeat-interval",
                "50",
                "--election-timeout",
                "500",
            ]
            .map(String::from)
            .to_vec();
            let mut m = Member {
                child: None,
                prefix,
                args,
                client_url,
                log: Arc::default(),
                _data: data,
            };
            m.spawn()
                .with_context(|| format!("starting etcd member m{i}"))?;
            members.push(m);
        }
        for m in &members {
            m.wait_serving()?;
        }
        Ok(Self { members })
    }

    /// The `--store` value naming every member.
    pub fn spec(&self) -> String {
        let hosts: Vec<&str> = self
            .members
            .iter()
            .map(|m| m.client_url.trim_start_matches("http://"))
            .collect();
        format!("etcd://{}", hosts.join(","))
    }
}
