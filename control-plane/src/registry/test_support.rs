//! Helpers shared by the registry's tests.

use std::sync::Arc;

use prometheus_client::registry::Registry as Prom;
use wayfinder_proto::encoded::EncodedWatchEvent;
use wayfinder_proto::v1::{Delta, Instance, WatchEvent, watch_event::Kind};

use super::{LeaseConfig, Pushed, Registry, RegistryMetrics};

pub(super) fn registry(leases: LeaseConfig) -> Arc<Registry> {
    Registry::new(
        leases,
        RegistryMetrics::register(&mut Prom::default()),
        None,
    )
}

pub(super) fn inst(service: &str, id: &str, port: u32) -> Instance {
    Instance {
        service: service.into(),
        instance_id: id.into(),
        address: "127.0.0.1".into(),
        port,
        weight: 100,
        ..Default::default()
    }
}

pub(super) fn decode(e: &EncodedWatchEvent) -> WatchEvent {
    e.decode().expect("valid event")
}

pub(super) fn delta(p: &Pushed) -> Delta {
    match decode(&p.event).kind {
        Some(Kind::Delta(d)) => d,
        other => panic!("expected delta, got {other:?}"),
    }
}
