//! DNS discovery: every A and AAAA record of the service name is an
//! endpoint, re-resolved when the answer's TTL runs out — what an app
//! resolving per request sees, with balancing and health on top. Runs only
//! while the upstream's endpoints come from DNS (flag or policy).

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use hickory_resolver::config::LookupIpStrategy;
use wayfinder_proto::backoff::backoff;
use wayfinder_proto::dial::LazyResolver;

use super::{Discovered, Origin, Sink, Update};

/// Shortest wait between two resolutions, whatever the TTL says (a TTL of 0
/// must not become a busy loop).
pub const MIN_REFRESH: Duration = Duration::from_secs(1);
/// Longest wait: Docker answers with a TTL of 600 s, but a lab kills
/// containers much more often than that.
pub const MAX_REFRESH: Duration = Duration::from_secs(30);
/// Longest wait after answers that a name does not exist (or has no
/// records): they back off from [`MIN_REFRESH`], doubling, to this, so a
/// name nobody serves is not asked for every second forever, and one that
/// appears is found within it.
pub const NEGATIVE_MAX_REFRESH: Duration = Duration::from_secs(8);

/// The discovery resolver: `server` (like nginx's `resolver`) or the
/// system's configured servers, asked for A and AAAA records. Built when a
/// service first needs DNS: a sidecar whose upstreams all come from the mesh
/// never runs hickory's code, and none of it is in its memory
/// (bench/README.md, idle RSS).
pub fn resolver(server: Option<SocketAddr>) -> LazyResolver {
    LazyResolver::new(server, LookupIpStrategy::Ipv4AndIpv6)
}

/// Whether `ip` is on this host or its link: loopback, unspecified,
/// link-local (169.254.0.0/16 holds the clouds' metadata service), and the
/// IPv4-mapped forms of those. A name resolving there would have the
/// sidecar call something no service should reach through it.
pub fn is_local(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => {
            v4.is_loopback()
                || v4.is_unspecified()
                || v4.is_link_local()
                // Alibaba Cloud's metadata service (the others sit at
                // 169.254.169.254, which is link-local).
                || v4 == std::net::Ipv4Addr::new(100, 100, 100, 200)
        }
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => is_local(IpAddr::V4(v4)),
            None => {
                v6.is_loopback()
                    || v6.is_unspecified()
                    || v6.is_unicast_link_local()
                    // AWS's metadata service on IPv6.
                    || v6.segments()[..4] == [0xfd00, 0x0ec2, 0, 0]
            }
        },
    }
}

/// Resolves `upstream`'s name for as long as its endpoints come from DNS;
/// local answers are dropped unless `allow_local`.
pub async fn run(
    resolver: Arc<LazyResolver>,
    upstream: Arc<impl Sink>,
    port: u16,
    allow_local: bool,
) {
    let mut attempt = 0u32;
    // Negative answers in a row.
    let mut negative = 0u32;
    let mut warned = false;
    loop {
        upstream.wait_origin(Origin::Dns).await;
        let resolver = match resolver.get() {
            Ok(r) => r,
            Err(e) => {
                // The failure is kept: there is nothing to retry.
                tracing::error!(
                    service = upstream.name(),
                    error = e,
                    "DNS discovery asked for, but no resolver could be set up"
                );
                return;
            }
        };
        let wait = match resolver.lookup_ip(upstream.name()).await {
            Ok(answer) => {
                attempt = 0;
                negative = 0;
                let (eps, local) = endpoints(answer.iter(), port, allow_local);
                if local > 0 && !warned {
                    warned = true;
                    tracing::warn!(
                        service = upstream.name(),
                        local,
                        "DNS answer names loopback or link-local addresses: not used (--dns-allow-local allows them)"
                    );
                }
                upstream.apply(
                    Origin::Dns,
                    if eps.is_empty() {
                        Update::NoEndpoints
                    } else {
                        Update::Reset(eps)
                    },
                );
                answer
                    .valid_until()
                    .saturating_duration_since(std::time::Instant::now())
                    .clamp(MIN_REFRESH, MAX_REFRESH)
            }
            Err(e) if e.is_nx_domain() || e.is_no_records_found() => {
                upstream.apply(Origin::Dns, Update::NoEndpoints);
                negative = negative.saturating_add(1);
                negative_wait(negative)
            }
            Err(e) => {
                // A resolver that is away keeps the last answer in use.
                tracing::warn!(service = upstream.name(), error = %e, "DNS lookup failed; keeping the last answer");
                attempt = attempt.saturating_add(1);
                backoff(attempt)
            }
        };
        tokio::time::sleep(wait).await;
    }
}

/// The endpoints an answer's addresses make on `port`, sorted by address,
/// and how many local addresses ([`is_local`]) were left out (none when
/// `allow_local`).
pub fn endpoints(
    answer: impl Iterator<Item = IpAddr>,
    port: u16,
    allow_local: bool,
) -> (Vec<Discovered>, usize) {
    let mut local = 0;
    let mut eps: Vec<_> = answer
        .filter(|ip| {
            let dropped = !allow_local && is_local(*ip);
            local += usize::from(dropped);
            !dropped
        })
        .map(|ip| {
            let addr = SocketAddr::new(ip, port);
            Discovered {
                id: addr.to_string(),
                addr,
                weight: 100,
                meshed: false,
                healthy: true,
                labels: Default::default(),
                zone: String::new(),
            }
        })
        .collect();
    // Servers rotate or shuffle their answers (Docker's does): the same set
    // must be the same update.
    eps.sort_by_key(|e| e.addr);
    (eps, local)
}

/// The wait after the `n`th negative answer in a row (n >= 1).
fn negative_wait(n: u32) -> Duration {
    MIN_REFRESH
        .saturating_mul(1 << n.saturating_sub(1).min(16))
        .min(NEGATIVE_MAX_REFRESH)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn negative_answers_back_off_to_a_cap() {
        let waits: Vec<u64> = (1..=7).map(|n| negative_wait(n).as_secs()).collect();
        assert_eq!(waits, [1, 2, 4, 8, 8, 8, 8]);
        assert_eq!(negative_wait(u32::MAX), NEGATIVE_MAX_REFRESH);
    }

    #[test]
    fn answers_become_sorted_endpoints_without_local_addresses() {
        let ips = ["10.0.0.9", "127.0.0.1", "10.0.0.2", "169.254.169.254"]
            .map(|ip| ip.parse::<IpAddr>().expect("ip"));
        let (eps, local) = endpoints(ips.into_iter(), 80, false);
        let addrs: Vec<String> = eps.iter().map(|e| e.id.clone()).collect();
        assert_eq!(addrs, ["10.0.0.2:80", "10.0.0.9:80"]);
        assert_eq!(local, 2);
        let (eps, local) = endpoints(ips.into_iter(), 80, true);
        assert_eq!((eps.len(), local), (4, 0), "--dns-allow-local keeps them");
    }

    #[test]
    fn local_and_metadata_addresses_are_recognised() {
        for ip in [
            "127.0.0.5",
            "0.0.0.0",
            "169.254.169.254",
            "::1",
            "::",
            "fe80::1",
            "::ffff:127.0.0.1",
            "::ffff:169.254.169.254",
            "fd00:ec2::254",
            "100.100.100.200",
        ] {
            assert!(is_local(ip.parse().expect("ip")), "{ip}");
        }
        for ip in [
            "10.0.0.7",
            "172.18.0.3",
            "192.168.1.2",
            "8.8.8.8",
            "2001:db8::1",
            "fd00::1",
            "100.100.100.201",
        ] {
            assert!(!is_local(ip.parse().expect("ip")), "{ip}");
        }
    }
}
