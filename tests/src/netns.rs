//! Network namespaces a test creates for itself: a hub namespace with a
//! bridge (where the control plane lives) and one namespace per instance,
//! each with its own address on the bridge, as containers have. Everything
//! is deleted on drop; names carry the test's pid so parallel tests and
//! leftovers of a killed run never collide.

use std::net::Ipv4Addr;
use std::process::Command;

use anyhow::{Context, Result, bail};

/// Why namespace tests cannot run here (not root, no `ip`, no iptables), or
/// `None` when they can.
pub fn unavailable() -> Option<String> {
    let uid = Command::new("id").arg("-u").output().ok()?;
    if String::from_utf8_lossy(&uid.stdout).trim() != "0" {
        return Some("not root: network namespaces need CAP_NET_ADMIN".into());
    }
    for tool in ["ip", "iptables", "setpriv", "curl"] {
        let found = Command::new("sh")
            .args(["-c", &format!("command -v {tool}")])
            .output()
            .map(|o| o.status.success())
            .unwrap_or(false);
        if !found {
            return Some(format!("{tool} is not installed"));
        }
    }
    None
}

/// Runs a command, failing with its stderr.
pub fn run(args: &[&str]) -> Result<String> {
    let out = Command::new(args[0])
        .args(&args[1..])
        .output()
        .with_context(|| format!("running {}", args.join(" ")))?;
    if !out.status.success() {
        bail!(
            "{} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).to_string())
}

/// A hub with a bridge on 10.77.0.0/24 (the hub is .1) and its instances.
pub struct Lab {
    /// The hub namespace.
    pub hub: String,
    tag: String,
    nodes: Vec<String>,
    /// The root namespace's end of a veth to the bridge, if attached.
    host_link: Option<String>,
}

impl Lab {
    /// Creates the hub namespace and its bridge.
    pub fn new(tag: &str) -> Result<Self> {
        let tag = format!("wft{}{}", tag, std::process::id());
        let hub = format!("{tag}-hub");
        run(&["ip", "netns", "add", &hub])?;
        let lab = Self {
            hub: hub.clone(),
            tag,
            nodes: Vec::new(),
            host_link: None,
        };
        for cmd in [
            vec!["ip", "-n", &hub, "link", "set", "lo", "up"],
            vec!["ip", "-n", &hub, "link", "add", "br0", "type", "bridge"],
            vec![
                "ip",
                "-n",
                &hub,
                "addr",
                "add",
                "10.77.0.1/24",
                "dev",
                "br0",
            ],
            vec!["ip", "-n", &hub, "link", "set", "br0", "up"],
        ] {
            run(&cmd)?;
        }
        Ok(lab)
    }

    /// The address of host number `n` on the bridge.
    pub fn ip(n: u8) -> Ipv4Addr {
        Ipv4Addr::new(10, 77, 0, n)
    }

    /// Creates namespace `name` with address 10.77.0.`n` on the bridge.
    pub fn node(&mut self, name: &str, n: u8) -> Result<String> {
        let ns = format!("{}-{name}", self.tag);
        run(&["ip", "netns", "add", &ns])?;
        self.nodes.push(ns.clone());
        let veth = format!("v{n}");
        let addr = format!("{}/24", Self::ip(n));
        for cmd in [
            vec!["ip", "-n", &ns, "link", "set", "lo", "up"],
            vec![
                "ip", "-n", &self.hub, "link", "add", &veth, "type", "veth", "peer", "name",
                "eth0", "netns", &ns,
            ],
            vec![
                "ip", "-n", &self.hub, "link", "set", &veth, "master", "br0", "up",
            ],
            vec!["ip", "-n", &ns, "addr", "add", &addr, "dev", "eth0"],
            vec!["ip", "-n", &ns, "link", "set", "eth0", "up"],
        ] {
            run(&cmd)?;
        }
        Ok(ns)
    }

    /// Puts the test's own (root) namespace on the bridge as 10.77.0.`n`,
    /// so binaries started without a prefix reach the nodes.
    pub fn attach_host(&mut self, n: u8) -> Result<()> {
        let link = format!("wfh{}", std::process::id() % 1_000_000);
        let peer = format!("h{n}");
        let addr = format!("{}/24", Self::ip(n));
        run(&[
            "ip", "link", "add", &link, "type", "veth", "peer", "name", &peer, "netns", &self.hub,
        ])?;
        self.host_link = Some(link.clone());
        for cmd in [
            vec![
                "ip", "-n", &self.hub, "link", "set", &peer, "master", "br0", "up",
            ],
            vec!["ip", "addr", "add", &addr, "dev", &link],
            vec!["ip", "link", "set", &link, "up"],
        ] {
            run(&cmd)?;
        }
        Ok(())
    }

    /// The prefix that runs a command in `ns`.
    pub fn exec(ns: &str) -> Vec<String> {
        ["ip", "netns", "exec", ns].map(String::from).to_vec()
    }

    /// The prefix that runs a command in `ns` as `uid` (a sidecar whose own
    /// connections interception must leave alone).
    pub fn exec_as(ns: &str, uid: u32) -> Vec<String> {
        let mut p = Self::exec(ns);
        p.extend([
            "setpriv".to_string(),
            format!("--reuid={uid}"),
            format!("--regid={uid}"),
            "--clear-groups".to_string(),
        ]);
        p
    }
}

impl Lab {
    /// A `web` instance in its own namespace `web{i}` at 10.77.0.1i:
    /// lab-app on :8080, its sidecar registered with the control plane at
    /// `control_plane`, inbound on :15006 advertised with the namespace's
    /// address, health-checking `/healthz`, admin on 127.0.0.1:15000 unless
    /// `extra` (more flags for the sidecar) gives `--admin`.
    pub fn web(
        &mut self,
        i: u8,
        control_plane: &str,
        extra: &[&str],
    ) -> Result<(crate::Process, crate::Process)> {
        let ns = self.node(&format!("web{i}"), 10 + i)?;
        let name = format!("web-{i}");
        let app = crate::Process::start_in(
            &Self::exec(&ns),
            "lab-app",
            &["--listen", "0.0.0.0:8080", "--name", &name],
            "listening on",
        )?;
        let advertise = format!("{}:15006", Self::ip(10 + i));
        let mut args = vec![
            "--control-plane",
            control_plane,
            "--service",
            "web",
            "--instance",
            &name,
            "--app",
            "127.0.0.1:8080",
            "--inbound",
            "0.0.0.0:15006",
            "--advertise",
            &advertise,
            "--health-check",
            "/healthz",
        ];
        if !extra.contains(&"--admin") {
            args.extend(["--admin", "127.0.0.1:15000"]);
        }
        args.extend_from_slice(extra);
        let sidecar = crate::Process::start_in(
            &Self::exec(&ns),
            "wf-proxy",
            &args,
            "registered with the control plane",
        )?;
        Ok((app, sidecar))
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        if let Some(link) = &self.host_link {
            let _ = Command::new("ip").args(["link", "del", link]).status();
        }
        // Deleting a namespace deletes its end of every veth pair.
        for ns in self.nodes.iter().chain(std::iter::once(&self.hub)) {
            let _ = Command::new("ip").args(["netns", "del", ns]).status();
        }
    }
}
