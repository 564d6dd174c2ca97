//! `wfctl check`: the mesh's health as ordered checks, each passing,
//! failing with a hint, or skipped saying why (never a pass it could not
//! judge). What is read comes first ([`gather`] into [`Facts`]); the
//! judging is pure ([`judge`]), so each check is tested on made-up facts.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use serde::Serialize;
use tonic::transport::Channel;
use wayfinder_proto::v1::{GetPolicyRequest, ServicePolicy, admin_client::AdminClient};

use super::{ProxyStatus, ServiceSummary, printable, span};

/// A CA certificate with less than this left fails the check: time to
/// rotate (a workload certificate lives 24 h; a root is rotated by hand).
pub const CA_NEAR_EXPIRY: Duration = Duration::from_secs(30 * 24 * 3600);

/// What the checks judge.
#[derive(Debug, Clone)]
pub struct Facts {
    /// Each replica's `/v1/proxy-status`, by HTTP address.
    pub replicas: Vec<(SocketAddr, Result<ProxyStatus, String>)>,
    /// The services the first replica lists over HTTP.
    pub services: Result<Vec<ServiceSummary>, String>,
    /// Whether the gRPC API answered (the operator's way in), and how many
    /// services it lists.
    pub grpc: Result<usize, String>,
    /// The policy file, when one is given.
    pub policy: PolicyFacts,
    /// Now, Unix ms.
    pub now_unix_ms: u64,
}

/// What is known of the policy file.
#[derive(Debug, Clone, PartialEq)]
pub enum PolicyFacts {
    /// No `--policy FILE`.
    NotGiven,
    /// It does not load: `FILE:LINE: field F: why`.
    Invalid(String),
    /// It loads; the live policy could not be read.
    Unread(String),
    /// It loads; these services' live policy differs from it.
    Compared {
        /// The file.
        file: String,
        /// Services in the file.
        services: usize,
        /// Those whose live policy differs.
        differs: Vec<String>,
    },
}

/// One check's result.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "result", content = "detail", rename_all = "lowercase")]
pub enum Verdict {
    /// It holds.
    Pass(String),
    /// It does not.
    Fail(String),
    /// It could not be judged.
    Skipped(String),
}

/// A check, judged.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Outcome {
    /// What is checked.
    pub check: &'static str,
    /// The result.
    #[serde(flatten)]
    pub verdict: Verdict,
    /// What to do when it fails.
    pub hint: &'static str,
}

/// What `wfctl check` reads from.
pub struct Sources {
    /// Every replica's HTTP address (`--http A,B`).
    pub http: Vec<SocketAddr>,
    /// The gRPC API, or why there is no connection.
    pub grpc: Result<Channel, String>,
    /// Time limit of one gRPC call.
    pub timeout: Duration,
    /// `--policy FILE`.
    pub policy: Option<PathBuf>,
}

/// Reads everything the checks judge; a source that fails is recorded, not fatal.
pub async fn gather(src: Sources) -> Facts {
    let mut replicas = Vec::new();
    for addr in &src.http {
        replicas.push((
            *addr,
            super::read(*addr).await.map_err(|e| format!("{e:#}")),
        ));
    }
    let services = super::services(src.http[0])
        .await
        .map_err(|e| format!("{e:#}"));
    let admin = src
        .grpc
        .map(|ch| (crate::traffic::Admin::new(ch.clone(), src.timeout), ch));
    let grpc = match &admin {
        Ok((a, _)) => a
            .services()
            .await
            .map(|s| s.len())
            .map_err(|e| format!("{e:#}")),
        Err(e) => Err(e.clone()),
    };
    let policy = match &src.policy {
        None => PolicyFacts::NotGiven,
        Some(path) => match wayfinder_proto::policy::PolicyFile::load(path) {
            Err(e) => PolicyFacts::Invalid(e.to_string()),
            Ok(file) => match &admin {
                Err(e) => PolicyFacts::Unread(e.clone()),
                Ok((_, ch)) => compare(&file, path, ch.clone(), src.timeout).await,
            },
        },
    };
    Facts {
        replicas,
        services,
        grpc,
        policy,
        now_unix_ms: super::unix_ms_now(),
    }
}

/// The file's policies against the live ones, service by service.
async fn compare(
    file: &wayfinder_proto::policy::PolicyFile,
    path: &std::path::Path,
    ch: Channel,
    timeout: Duration,
) -> PolicyFacts {
    let mut client = AdminClient::new(ch);
    let mut differs = Vec::new();
    let wanted = file.to_proto();
    for want in &wanted {
        let mut req = tonic::Request::new(GetPolicyRequest {
            service: want.service.clone(),
        });
        req.set_timeout(timeout);
        let live: Option<ServicePolicy> = match client.get_policy(req).await {
            Ok(p) => Some(p.into_inner()),
            Err(s) if s.code() == tonic::Code::NotFound => None,
            Err(s) => return PolicyFacts::Unread(s.message().to_string()),
        };
        if live.as_ref() != Some(want) {
            differs.push(want.service.clone());
        }
    }
    PolicyFacts::Compared {
        file: path.display().to_string(),
        services: wanted.len(),
        differs,
    }
}

type Judge = fn(&Facts) -> Verdict;

/// The checks in order, each with its hint.
const CHECKS: [(&str, Judge, &str); 9] = [
    (
        "control plane reachable and ready",
        reachable,
        "start wf-control, or point --http (WAYFINDER_CONTROL_HTTP) and --control-plane at it; a replica cut off from etcd answers not ready",
    ),
    (
        "store writable",
        store,
        "a replica refuses changes while its store is unreachable: check etcd (--store) or the data directory's disk",
    ),
    (
        "CA valid and not near expiry",
        ca,
        "rotate the CA (README, \"Identity and mTLS\"): append the next root to bundle.crt and restart wf-control; a sidecar whose certificate expired cannot renew: see its log",
    ),
    (
        "replicas agree on the trust bundle",
        bundles,
        "give every replica the same --ca-dir contents; sidecars certified by different CAs trust each other only once both roots are in the bundle",
    ),
    (
        "policy valid and applied",
        policy,
        "fix the value at the line named, then `wfctl policy apply FILE`; a `wfctl split` or `fault` since also changes the live policy",
    ),
    (
        "every instance heartbeating",
        heartbeating,
        "its sidecar stopped heartbeating: is it running, can it reach the control plane? The instance is removed after the lease grace period",
    ),
    (
        "no stale sidecar",
        stale,
        "`wfctl proxy-status` shows what it applied; a stopped or partitioned sidecar, or one whose watch stalled: see its log",
    ),
    (
        "no called service without a serving endpoint",
        served,
        "`wfctl endpoints NAME`: start an instance, or see why its health check fails",
    ),
    (
        "every DNS-mode name resolving",
        dns,
        "the name needs A/AAAA records at the sidecar's resolver (--dns-server, resolv.conf)",
    ),
];

/// Judges every check in order. With no replica read, the checks that need
/// one are skipped (the policy file is still validated).
pub fn judge(f: &Facts) -> Vec<Outcome> {
    let unreadable = !f.replicas.iter().any(|(_, r)| r.is_ok());
    CHECKS
        .iter()
        .enumerate()
        .map(|(i, (check, judge, hint))| {
            let local = *check == "policy valid and applied"
                && matches!(f.policy, PolicyFacts::Invalid(_) | PolicyFacts::NotGiven);
            let verdict = if i > 0 && unreadable && !local {
                Verdict::Skipped("the control plane cannot be read".into())
            } else {
                judge(f)
            };
            Outcome {
                check,
                verdict,
                hint,
            }
        })
        .collect()
}

/// The replicas read.
fn read(f: &Facts) -> impl Iterator<Item = &ProxyStatus> {
    f.replicas.iter().filter_map(|(_, r)| r.as_ref().ok())
}

/// `Pass(ok)` when `problems` is empty, else `Fail` naming them.
fn listed(problems: Vec<String>, ok: String) -> Verdict {
    if problems.is_empty() {
        Verdict::Pass(ok)
    } else {
        Verdict::Fail(problems.join("; "))
    }
}

fn reachable(f: &Facts) -> Verdict {
    let mut problems = Vec::new();
    for (addr, r) in &f.replicas {
        match r {
            Err(e) => problems.push(e.clone()),
            Ok(s) if !s.ready => problems.push(format!("{addr} is not ready")),
            Ok(_) => {}
        }
    }
    if let Err(e) = &f.grpc {
        problems.push(format!("gRPC: {e}"));
    }
    let services = f.grpc.as_ref().copied().unwrap_or_default();
    let replicas: Vec<_> = read(f).map(|s| s.replica.as_str()).collect();
    listed(
        problems,
        format!("{} ({services} services)", replicas.join(", ")),
    )
}

fn store(f: &Facts) -> Verdict {
    let not_ready: Vec<_> = read(f)
        .filter(|s| !s.ready)
        .map(|s| format!("{}: the store does not answer", s.replica))
        .collect();
    listed(
        not_ready,
        "the store answers (as /readyz; wfctl makes no test write)".into(),
    )
}

fn ca(f: &Facts) -> Verdict {
    let near = u64::try_from(CA_NEAR_EXPIRY.as_millis()).unwrap_or(u64::MAX);
    let mut problems = Vec::new();
    let mut soonest = u64::MAX;
    for s in read(f) {
        for (what, t) in [
            ("root", s.ca.root_not_after_unix_ms),
            ("intermediate", s.ca.intermediate_not_after_unix_ms),
        ] {
            match t {
                None => problems.push(format!("{}: the {what} cannot be read", s.replica)),
                Some(t) if t <= f.now_unix_ms => {
                    problems.push(format!("{}: the {what} has expired", s.replica));
                }
                Some(t) if t - f.now_unix_ms < near => problems.push(format!(
                    "{}: the {what} expires in {}",
                    s.replica,
                    span(t - f.now_unix_ms)
                )),
                Some(t) => soonest = soonest.min(t - f.now_unix_ms),
            }
        }
        for c in &s.sidecars {
            if c.cert_not_after_unix_ms.is_some_and(|t| t <= f.now_unix_ms) {
                problems.push(format!(
                    "{}/{}: its certificate has expired",
                    c.service, c.instance
                ));
            }
        }
    }
    listed(problems, format!("the CA expires in {}", span(soonest)))
}

fn bundles(f: &Facts) -> Verdict {
    let all: Vec<_> = read(f).collect();
    if f.replicas.len() < 2 {
        return Verdict::Skipped(
            "one replica given (--http A,B,... compares their bundles)".into(),
        );
    }
    let Some(first) = all.first() else {
        return Verdict::Skipped("no replica could be read".into());
    };
    let mut want = first.ca.bundle_sha256.clone();
    want.sort();
    let differ: Vec<_> = all[1..]
        .iter()
        .filter(|s| {
            let mut got = s.ca.bundle_sha256.clone();
            got.sort();
            got != want
        })
        .map(|s| {
            format!(
                "{} hands out another bundle than {}",
                s.replica, first.replica
            )
        })
        .collect();
    listed(
        differ,
        format!(
            "{} replicas hand out the same bundle ({} root(s))",
            all.len(),
            want.len()
        ),
    )
}

fn policy(f: &Facts) -> Verdict {
    match &f.policy {
        PolicyFacts::NotGiven => Verdict::Skipped("no --policy FILE to compare with".into()),
        PolicyFacts::Invalid(e) => Verdict::Fail(e.clone()),
        PolicyFacts::Unread(e) => Verdict::Fail(format!("the live policy cannot be read: {e}")),
        PolicyFacts::Compared {
            file,
            services,
            differs,
        } => listed(
            differs
                .iter()
                .map(|s| format!("{s}: the live policy is not {file}'s"))
                .collect(),
            format!("{file}: {services} services, as applied"),
        ),
    }
}

fn heartbeating(f: &Facts) -> Verdict {
    let lapsed: Vec<_> = read(f)
        .flat_map(|s| &s.lapsed)
        .map(|l| format!("{}/{}: its lease ran out", l.service, l.instance))
        .collect();
    listed(lapsed, "every lease is renewed".into())
}

fn stale(f: &Facts) -> Verdict {
    let (mut n, mut problems) = (0, Vec::new());
    for c in read(f).flat_map(|s| &s.sidecars) {
        n += 1;
        if c.stale {
            problems.push(format!(
                "{}/{}: {}",
                c.service,
                c.instance,
                c.why.as_deref().unwrap_or("stale")
            ));
        }
    }
    listed(problems, format!("sidecars up to date: {n}"))
}

fn served(f: &Facts) -> Verdict {
    let services = match &f.services {
        Ok(s) => s,
        Err(e) => return Verdict::Skipped(format!("the services cannot be read: {e}")),
    };
    let mut called = std::collections::BTreeMap::new();
    for c in read(f).flat_map(|s| &s.sidecars) {
        for u in c.upstreams.iter().filter(|u| u.discovery == "mesh") {
            called
                .entry(u.service.as_str())
                .or_insert_with(|| format!("{}/{}", c.service, c.instance));
        }
    }
    let problems: Vec<_> = called
        .iter()
        .filter(|(name, _)| {
            !services
                .iter()
                .any(|s| s.name.as_str() == **name && s.serving > 0)
        })
        .map(|(name, by)| format!("{name} (called by {by}) has no serving endpoint"))
        .collect();
    listed(
        problems,
        format!("services called, each served: {}", called.len()),
    )
}

fn dns(f: &Facts) -> Verdict {
    let (mut n, mut problems) = (0, Vec::new());
    for c in read(f).flat_map(|s| &s.sidecars) {
        for u in c.upstreams.iter().filter(|u| u.discovery == "dns") {
            n += 1;
            if u.endpoints == 0 {
                problems.push(format!(
                    "{}/{}: {} resolves to nothing",
                    c.service, c.instance, u.service
                ));
            }
        }
    }
    if n == 0 {
        return Verdict::Pass("no sidecar uses DNS discovery".into());
    }
    listed(problems, format!("DNS names resolving: {n}"))
}

/// The outcomes for people: `✔`, `✘` with its hint, `-` skipped.
pub fn render(outcomes: &[Outcome]) -> String {
    let mut out = String::new();
    for o in outcomes {
        let line = match &o.verdict {
            Verdict::Pass(d) => format!("✔ {}: {}\n", o.check, printable(d)),
            Verdict::Fail(d) => format!("✘ {}: {}\n    hint: {}\n", o.check, printable(d), o.hint),
            Verdict::Skipped(d) => format!("- {}: skipped: {}\n", o.check, printable(d)),
        };
        out.push_str(&line);
    }
    out
}

/// Whether any check failed (`wfctl check` exits 1).
pub fn failed(outcomes: &[Outcome]) -> bool {
    outcomes
        .iter()
        .any(|o| matches!(o.verdict, Verdict::Fail(_)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::status::proxy_status::tests::{replica, sidecar};
    use crate::status::{Ca, Lapsed};

    const DAY: u64 = 86_400_000;

    fn healthy() -> Facts {
        let mut r = replica(vec![sidecar("web-1", None)]);
        r.sidecars[0].upstreams[0].behind_ms = 0;
        r.sidecars[0].cert_not_after_unix_ms = Some(2 * DAY);
        r.ca = Ca {
            root_not_after_unix_ms: Some(3650 * DAY),
            intermediate_not_after_unix_ms: Some(3650 * DAY),
            bundle_sha256: vec!["aa".into()],
        };
        Facts {
            replicas: vec![("127.0.0.1:15014".parse().expect("addr"), Ok(r))],
            services: Ok(vec![ServiceSummary {
                name: "api".into(),
                serving: 1,
            }]),
            grpc: Ok(2),
            policy: PolicyFacts::NotGiven,
            now_unix_ms: DAY,
        }
    }

    fn verdicts(f: &Facts) -> Vec<(&'static str, char)> {
        judge(f)
            .into_iter()
            .map(|o| {
                let c = match o.verdict {
                    Verdict::Pass(_) => 'p',
                    Verdict::Fail(_) => 'F',
                    Verdict::Skipped(_) => '-',
                };
                (o.check, c)
            })
            .collect()
    }

    fn verdict_of(f: &Facts, check: &str) -> Verdict {
        judge(f)
            .into_iter()
            .find(|o| o.check == check)
            .expect("a check of that name")
            .verdict
    }

    #[test]
    fn a_healthy_mesh_passes_in_order_and_skips_what_it_cannot_judge() {
        let f = healthy();
        let got: String = verdicts(&f).iter().map(|(_, c)| c).collect();
        assert_eq!(got, "ppp--pppp", "{:?}", judge(&f));
        assert!(!failed(&judge(&f)));
        assert_eq!(judge(&f)[0].check, "control plane reachable and ready");
    }

    #[test]
    fn a_stale_sidecar_fails_its_check_by_name() {
        let mut f = healthy();
        if let Ok(r) = &mut f.replicas[0].1 {
            r.sidecars
                .push(sidecar("web-2", Some("no report for 11.0s")));
        }
        assert_eq!(
            verdict_of(&f, "no stale sidecar"),
            Verdict::Fail("web/web-2: no report for 11.0s".into())
        );
        let text = render(&judge(&f));
        assert!(
            text.contains(
                "✘ no stale sidecar: web/web-2: no report for 11.0s\n    hint: `wfctl proxy-status`"
            ),
            "{text}"
        );
        assert!(failed(&judge(&f)));
    }

    #[test]
    fn an_invalid_policy_file_fails_with_its_file_and_line_even_without_a_control_plane() {
        let mut f = healthy();
        f.replicas[0].1 = Err("cannot reach wf-control's HTTP port".into());
        f.policy = PolicyFacts::Invalid("p.toml:3: field services.web.retries: bad".into());
        let v = verdicts(&f);
        assert_eq!(v[0].1, 'F');
        assert_eq!(v[4], ("policy valid and applied", 'F'));
        assert!(
            v.iter()
                .enumerate()
                .all(|(i, (_, c))| i == 0 || i == 4 || *c == '-'),
            "{v:?}"
        );
        let text = render(&judge(&f));
        assert!(
            text.contains("✘ policy valid and applied: p.toml:3: field services.web.retries"),
            "{text}"
        );
        assert!(text.contains("- store writable: skipped: the control plane cannot be read"));
    }

    #[test]
    fn expiry_lapsed_leases_unserved_callees_dns_names_and_bundles_are_named() {
        let mut f = healthy();
        let second = {
            let Ok(r) = &mut f.replicas[0].1 else {
                unreachable!()
            };
            r.ca.intermediate_not_after_unix_ms = Some(DAY + 3 * DAY);
            r.lapsed.push(Lapsed {
                service: "web".into(),
                instance: "web-9".into(),
            });
            r.sidecars[0].upstreams[0].service = "db".into();
            let mut dns = r.sidecars[0].upstreams[0].clone();
            dns.service = "search".into();
            dns.discovery = "dns".into();
            dns.endpoints = 0;
            r.sidecars[0].upstreams.push(dns);
            let mut other = r.clone();
            other.replica = "127.0.0.1:25010".into();
            other.ca.bundle_sha256.push("bb".into());
            other
        };
        f.replicas
            .push(("127.0.0.1:25014".parse().expect("addr"), Ok(second)));
        let fail = |check| match verdict_of(&f, check) {
            Verdict::Fail(d) => d,
            v => panic!("{check}: {v:?}"),
        };
        assert!(fail("CA valid and not near expiry").contains("intermediate expires in 3d"));
        assert!(fail("every instance heartbeating").contains("web/web-9: its lease ran out"));
        assert!(
            fail("no called service without a serving endpoint")
                .contains("db (called by web/web-1) has no serving endpoint")
        );
        assert!(
            fail("every DNS-mode name resolving").contains("web/web-1: search resolves to nothing")
        );
        assert!(
            fail("replicas agree on the trust bundle")
                .contains("127.0.0.1:25010 hands out another bundle")
        );
    }

    #[test]
    fn a_policy_that_differs_from_the_live_one_is_named() {
        let mut f = healthy();
        f.policy = PolicyFacts::Compared {
            file: "p.toml".into(),
            services: 2,
            differs: vec!["web".into()],
        };
        assert_eq!(
            verdict_of(&f, "policy valid and applied"),
            Verdict::Fail("web: the live policy is not p.toml's".into())
        );
        f.policy = PolicyFacts::Compared {
            file: "p.toml".into(),
            services: 2,
            differs: Vec::new(),
        };
        assert_eq!(
            verdict_of(&f, "policy valid and applied"),
            Verdict::Pass("p.toml: 2 services, as applied".into())
        );
    }
}
