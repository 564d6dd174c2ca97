//! The DNS answers the sidecar's DNS discovery reads: any bytes as a DNS
//! message, parsed by the resolver's own `hickory-proto` (what its
//! connections do with a response), made into the resolver's `LookupIp`
//! and then into endpoints as `discovery::dns::run` does
//! (`dns::endpoints`, local addresses dropped unless allowed).

#![no_main]

use std::net::IpAddr;
use std::time::{Duration, Instant};

use hickory_resolver::lookup::Lookup;
use hickory_resolver::lookup_ip::LookupIp;
use hickory_resolver::proto::op::{Message, Query};
use hickory_resolver::proto::rr::{Name, RecordType};
use libfuzzer_sys::fuzz_target;
use wayfinder_proxy::discovery::dns::{MAX_REFRESH, MIN_REFRESH, endpoints, is_local};

fuzz_target!(|data: &[u8]| {
    let Ok(message) = Message::from_vec(data) else {
        return;
    };
    let query = message
        .queries
        .first()
        .cloned()
        .unwrap_or_else(|| Query::query(Name::root(), RecordType::A));
    // The resolver keeps an answer for its shortest TTL.
    let ttl = message.answers.iter().map(|r| r.ttl).min().unwrap_or(0);
    let now = Instant::now();
    let valid_until = now + Duration::from_secs(ttl.into());
    let answer = LookupIp::from(Lookup::new_with_deadline(
        query,
        message.answers,
        valid_until,
    ));
    let ips: Vec<IpAddr> = answer.iter().collect();
    let port = 8080;

    let (eps, local) = endpoints(answer.iter(), port, false);
    assert_eq!(eps.len() + local, ips.len());
    assert!(eps.iter().all(|e| !is_local(e.addr.ip())), "local dropped");
    assert!(
        eps.is_sorted_by_key(|e| e.addr),
        "sorted: the same set is the same update"
    );
    assert!(
        eps.iter()
            .all(|e| e.addr.port() == port && e.id == e.addr.to_string())
    );

    let (all, none) = endpoints(answer.iter(), port, true);
    assert_eq!((all.len(), none), (ips.len(), 0), "all kept when allowed");

    let _ = answer
        .valid_until()
        .saturating_duration_since(now)
        .clamp(MIN_REFRESH, MAX_REFRESH);
});
