//! `wf-proxy init`: the iptables rules that send a network namespace's TCP
//! through the sidecar, as Istio's init container does. Outbound TCP goes
//! to the capture port except the proxy's own (by uid, so its connections
//! to endpoints are not captured again), loopback, and excluded ports and
//! CIDRs; inbound TCP goes to the inbound port except excluded ports (the
//! admin port). Rules live in two chains of their own in the nat table, so
//! `--cleanup` removes exactly what was added.

use std::net::IpAddr;
use std::process::Command;

/// Chain for connections arriving from outside.
pub const INBOUND_CHAIN: &str = "WAYFINDER_INBOUND";
/// Chain for connections the namespace's processes open.
pub const OUTBOUND_CHAIN: &str = "WAYFINDER_OUTPUT";

/// What to intercept, validated by clap before it gets here.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rules {
    /// The sidecar's uid: its own connections are never captured.
    pub proxy_uid: u32,
    /// Where captured outbound connections go (the `--transparent` listener).
    pub outbound_port: u16,
    /// Where captured inbound connections go (the `--inbound` listener);
    /// `None` leaves inbound alone.
    pub inbound_port: Option<u16>,
    /// Inbound ports left alone (the admin port, ssh).
    pub exclude_inbound_ports: Vec<u16>,
    /// Outbound destination ports left alone.
    pub exclude_outbound_ports: Vec<u16>,
    /// Outbound destinations left alone (`10.0.0.0/8`, `192.168.1.7`).
    pub exclude_cidrs: Vec<String>,
    /// The control plane (every replica), never captured whoever dials it.
    pub control_plane: Vec<std::net::SocketAddr>,
}

impl Rules {
    /// The `iptables` argument lists that install the rules, in order.
    pub fn install(&self) -> Vec<Vec<String>> {
        let mut cmds: Vec<Vec<String>> = Vec::new();
        if let Some(port) = self.inbound_port {
            cmds.push(nat(&["-N", INBOUND_CHAIN]));
            for &p in &self.exclude_inbound_ports {
                cmds.push(return_port(INBOUND_CHAIN, p));
            }
            cmds.push(redirect(INBOUND_CHAIN, port));
            cmds.push(nat(&["-A", "PREROUTING", "-p", "tcp", "-j", INBOUND_CHAIN]));
        }
        cmds.push(nat(&["-N", OUTBOUND_CHAIN]));
        let uid = self.proxy_uid.to_string();
        cmds.push(nat(&[
            "-A",
            OUTBOUND_CHAIN,
            "-m",
            "owner",
            "--uid-owner",
            &uid,
            "-j",
            "RETURN",
        ]));
        cmds.push(nat(&["-A", OUTBOUND_CHAIN, "-o", "lo", "-j", "RETURN"]));
        cmds.push(nat(&[
            "-A",
            OUTBOUND_CHAIN,
            "-d",
            "127.0.0.0/8",
            "-j",
            "RETURN",
        ]));
        for cp in &self.control_plane {
            let (ip, port) = (format!("{}/32", cp.ip()), cp.port().to_string());
            cmds.push(nat(&[
                "-A",
                OUTBOUND_CHAIN,
                "-d",
                &ip,
                "-p",
                "tcp",
                "--dport",
                &port,
                "-j",
                "RETURN",
            ]));
        }
        for c in &self.exclude_cidrs {
            cmds.push(nat(&["-A", OUTBOUND_CHAIN, "-d", c, "-j", "RETURN"]));
        }
        for &p in &self.exclude_outbound_ports {
            cmds.push(return_port(OUTBOUND_CHAIN, p));
        }
        cmds.push(redirect(OUTBOUND_CHAIN, self.outbound_port));
        cmds.push(nat(&["-A", "OUTPUT", "-p", "tcp", "-j", OUTBOUND_CHAIN]));
        cmds
    }

    /// Installs the rules in place of any earlier ones (a second start
    /// replaces, never doubles, them); on failure none are left behind.
    pub fn apply(&self) -> Result<(), String> {
        let _ = run(&cleanup(), true);
        run(&self.install(), false).inspect_err(|_| {
            let _ = run(&cleanup(), true);
        })
    }
}

/// Sends the TCP connections that reach the end of `chain` to local `port`.
fn redirect(chain: &str, port: u16) -> Vec<String> {
    let port = port.to_string();
    nat(&[
        "-A",
        chain,
        "-p",
        "tcp",
        "-j",
        "REDIRECT",
        "--to-ports",
        &port,
    ])
}

/// Leaves connections to TCP `port` alone in `chain`.
fn return_port(chain: &str, port: u16) -> Vec<String> {
    let port = port.to_string();
    nat(&["-A", chain, "-p", "tcp", "--dport", &port, "-j", "RETURN"])
}

/// One `iptables` argument list on the nat table (`-w`: wait for the lock
/// rather than fail when another tool holds it).
fn nat(args: &[&str]) -> Vec<String> {
    let mut v = vec!["-w".to_string(), "-t".into(), "nat".into()];
    v.extend(args.iter().map(|s| s.to_string()));
    v
}

/// The argument lists that remove whatever [`Rules::install`] added; each
/// may fail harmlessly when that part is not there.
pub fn cleanup() -> Vec<Vec<String>> {
    let mut cmds = Vec::new();
    for (hook, chain) in [("PREROUTING", INBOUND_CHAIN), ("OUTPUT", OUTBOUND_CHAIN)] {
        cmds.push(nat(&["-D", hook, "-p", "tcp", "-j", chain]));
        cmds.push(nat(&["-F", chain]));
        cmds.push(nat(&["-X", chain]));
    }
    cmds
}

/// Checks a CIDR or address given to `--exclude-cidr`.
pub fn parse_cidr(s: &str) -> Result<String, String> {
    let (ip, bits) = match s.split_once('/') {
        Some((ip, bits)) => (ip, Some(bits)),
        None => (s, None),
    };
    let ip: IpAddr = ip
        .parse()
        .map_err(|_| format!("{s:?} is not an address or CIDR"))?;
    if !ip.is_ipv4() {
        return Err(format!(
            "{s:?}: interception is IPv4 only (iptables, not ip6tables)"
        ));
    }
    if let Some(bits) = bits {
        match bits.parse::<u8>() {
            Ok(b) if b <= 32 => {}
            _ => return Err(format!("{s:?}: prefix length must be 0-32")),
        }
    }
    Ok(s.to_string())
}

/// Runs `iptables` with each argument list; stops at the first failure
/// unless `tolerate` (cleanup of rules that may not exist).
pub fn run(cmds: &[Vec<String>], tolerate: bool) -> Result<(), String> {
    for args in cmds {
        let out = Command::new("iptables")
            .args(args)
            .output()
            .map_err(|e| format!("cannot run iptables: {e} (is it installed, and are we root?)"))?;
        if !out.status.success() && !tolerate {
            return Err(format!(
                "iptables {}: {}",
                args.join(" "),
                String::from_utf8_lossy(&out.stderr).trim()
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rules() -> Rules {
        Rules {
            proxy_uid: 1337,
            outbound_port: 15001,
            inbound_port: Some(15006),
            exclude_inbound_ports: vec![15000],
            exclude_outbound_ports: vec![15010],
            exclude_cidrs: vec!["10.9.0.0/16".into()],
            control_plane: vec![([10, 9, 0, 1], 15010).into()],
        }
    }

    fn text(cmds: &[Vec<String>]) -> Vec<String> {
        cmds.iter().map(|c| c.join(" ")).collect()
    }

    #[test]
    fn exclusions_come_before_the_redirects_and_hooks_come_last() {
        let t = text(&rules().install());
        let pos = |needle: &str| {
            t.iter()
                .position(|c| c.contains(needle))
                .unwrap_or_else(|| panic!("no rule with {needle:?} in {t:#?}"))
        };
        assert!(pos("--uid-owner 1337 -j RETURN") < pos("REDIRECT --to-ports 15001"));
        assert!(pos("-d 10.9.0.0/16 -j RETURN") < pos("REDIRECT --to-ports 15001"));
        assert!(
            pos("-d 10.9.0.1/32 -p tcp --dport 15010 -j RETURN") < pos("REDIRECT --to-ports 15001")
        );
        assert!(pos("--dport 15010 -j RETURN") < pos("REDIRECT --to-ports 15001"));
        assert!(pos("--dport 15000 -j RETURN") < pos("REDIRECT --to-ports 15006"));
        // The hooks are added once the chains are complete, so no packet
        // ever meets a half-built chain.
        assert_eq!(pos("-A OUTPUT -p tcp -j WAYFINDER_OUTPUT"), t.len() - 1);
        assert!(pos("-A PREROUTING") > pos("REDIRECT --to-ports 15006"));
        assert!(t.iter().all(|c| c.starts_with("-w -t nat ")));
    }

    #[test]
    fn inbound_capture_is_optional() {
        let r = Rules {
            inbound_port: None,
            ..rules()
        };
        let t = text(&r.install());
        assert!(!t.iter().any(|c| c.contains(INBOUND_CHAIN)));
        assert!(t.iter().any(|c| c.contains("REDIRECT --to-ports 15001")));
    }

    #[test]
    fn cleanup_removes_hooks_before_chains() {
        let t = text(&cleanup());
        let hook = t
            .iter()
            .position(|c| c.contains("-D OUTPUT"))
            .expect("test input");
        let delete = t
            .iter()
            .position(|c| c.contains("-X WAYFINDER_OUTPUT"))
            .expect("test input");
        assert!(hook < delete);
    }

    #[test]
    fn cidrs_are_checked() {
        assert!(parse_cidr("10.0.0.0/8").is_ok());
        assert!(parse_cidr("192.168.1.7").is_ok());
        assert!(parse_cidr("10.0.0.0/33").is_err());
        assert!(parse_cidr("web").is_err());
        assert!(parse_cidr("::1").is_err());
    }
}
