//! Every request message wf-control's gRPC services accept, decoded from
//! any bytes as tonic would (`prost::Message::decode`), then checked the
//! way each service checks it before touching the registry: the first byte
//! chooses the message, the rest is its encoding.
//!
//! Registry: `RegisterRequest`, `Heartbeat` (KeepAlive's stream),
//! `DeregisterRequest`; Discovery: `WatchRequest`; Catalog:
//! `CatalogRequest`; Admin: `ListServicesRequest`, `ListEndpointsRequest`,
//! `ApplyPolicyRequest`, `GetPolicyRequest`; Telemetry: `TrafficReport`;
//! Identity: `CertifyRequest` (its CSR parsed and signed by a real CA).

#![no_main]

use std::sync::LazyLock;
use std::time::Duration;

use libfuzzer_sys::fuzz_target;
use prost::Message;
use wayfinder_control::ca::Ca;
use wayfinder_control::grpc::{check_size, registry, telemetry};
use wayfinder_control::traffic::Traffic;
use wayfinder_proto::policy::ServicePolicy;
use wayfinder_proto::v1::deregister_request::Target;
use wayfinder_proto::v1::{
    ApplyPolicyRequest, CatalogRequest, CertifyRequest, DeregisterRequest, GetPolicyRequest,
    Heartbeat, ListEndpointsRequest, ListServicesRequest, RegisterRequest, TrafficReport,
    WatchRequest,
};
use wayfinder_proto::validate;

/// A CA made once per process in a temporary directory (removed at once:
/// the CA keeps what it needs in memory).
static CA: LazyLock<Ca> = LazyLock::new(|| {
    let dir = std::env::temp_dir().join(format!("wayfinder-fuzz-ca-{}", std::process::id()));
    let ca = Ca::load_or_create(&dir, "wayfinder.fuzz", Duration::from_secs(3600));
    let _ = std::fs::remove_dir_all(&dir);
    ca.expect("a CA in a temporary directory")
});

fuzz_target!(|data: &[u8]| {
    let Some((&which, bytes)) = data.split_first() else {
        return;
    };
    match which % 11 {
        0 => register(bytes),
        1 => {
            if let Ok(beat) = Heartbeat::decode(bytes) {
                let _ = registry::health(beat.health);
            }
        }
        2 => deregister(bytes),
        3 => watch(bytes),
        4 => {
            if let Ok(r) = CatalogRequest::decode(bytes) {
                let _ = check_size(&r);
            }
        }
        5 => {
            let _ = ListServicesRequest::decode(bytes);
        }
        6 => {
            if let Ok(r) = ListEndpointsRequest::decode(bytes) {
                let _ = validate::service_name(&r.service);
            }
        }
        7 => apply_policy(bytes),
        8 => {
            if let Ok(r) = GetPolicyRequest::decode(bytes) {
                let _ = validate::service_name(&r.service);
            }
        }
        9 => report(bytes),
        _ => certify(bytes),
    }
});

fn register(bytes: &[u8]) {
    let Ok(r) = RegisterRequest::decode(bytes) else {
        return;
    };
    if check_size(&r).is_err() {
        return;
    }
    let _ = registry::health(r.initial_health);
    let Some(instance) = r.instance else {
        return;
    };
    let _ = validate::address(&instance.address);
    if let Ok(valid) = validate::instance(instance) {
        // The stored form is canonical: validating it again changes nothing.
        assert_eq!(
            validate::instance(valid.clone()).as_ref(),
            Ok(&valid),
            "instance is not a fixed point"
        );
    }
}

fn deregister(bytes: &[u8]) {
    let Ok(r) = DeregisterRequest::decode(bytes) else {
        return;
    };
    if let Some(Target::Endpoint(ep)) = r.target {
        let _ = validate::service_name(&ep.service);
        let _ = validate::address(&ep.address);
        let _ = validate::port(ep.port);
    }
}

fn watch(bytes: &[u8]) {
    let Ok(r) = WatchRequest::decode(bytes) else {
        return;
    };
    if check_size(&r).is_err() {
        return;
    }
    for s in &r.services {
        let _ = validate::service_name(&s.name);
    }
}

fn apply_policy(bytes: &[u8]) {
    let Ok(r) = ApplyPolicyRequest::decode(bytes) else {
        return;
    };
    if check_size(&r).is_err() {
        return;
    }
    for p in &r.policies {
        let Ok((name, model)) = ServicePolicy::from_proto(p) else {
            continue;
        };
        // What ApplyPolicy stores, normalised so that equal policies
        // compare equal: normalising it again changes nothing.
        let stored = model.to_proto(name.as_str());
        match ServicePolicy::from_proto(&stored) {
            Ok((again, back)) => {
                assert_eq!(again, name);
                assert_eq!(back.to_proto(again.as_str()), stored, "not a fixed point");
            }
            Err(e) => panic!("the stored form of an accepted policy is refused: {e}"),
        }
    }
}

fn report(bytes: &[u8]) {
    let Ok(r) = TrafficReport::decode(bytes) else {
        return;
    };
    if check_size(&r).is_err() || telemetry::check(&r).is_err() {
        return;
    }
    let traffic = Traffic::default();
    traffic.record(&r);
    traffic.record(&r);
    let _ = traffic.edges();
    let _ = traffic.backends(std::time::Duration::from_secs(10));
    let _ = traffic.mirrors(None, std::time::Duration::from_secs(300));
}

fn certify(bytes: &[u8]) {
    let Ok(r) = CertifyRequest::decode(bytes) else {
        return;
    };
    if check_size(&r).is_err() || validate::service_name(&r.service).is_err() {
        return;
    }
    let _ = CA.issue(&r.csr_der, &r.service);
}
