//! The Host peek of intercepted connections (`transparent::host_in`): the
//! first bytes as an HTTP/1 request head, its Host, and the service that
//! Host names in the catalog (`Table::service_named`, `decide`).

#![no_main]

use std::net::SocketAddr;
use std::sync::LazyLock;

use libfuzzer_sys::fuzz_target;
use wayfinder_proto::v1::{CatalogService, CatalogUpdate};
use wayfinder_proxy::transparent::catalog::Table;
use wayfinder_proxy::transparent::{Peeked, Target, decide, host_in};

static TABLE: LazyLock<Table> = LazyLock::new(|| {
    let service = |name: &str, addresses: &[&str]| CatalogService {
        name: name.into(),
        addresses: addresses.iter().map(|a| a.to_string()).collect(),
    };
    Table::from_update(&CatalogUpdate {
        version: 1,
        services: vec![
            service("web", &["10.0.0.11", "10.0.0.12"]),
            service("api", &["10.0.0.21", "fd00::21"]),
        ],
    })
});

fuzz_target!(|data: &[u8]| {
    let Some(peeked) = host_in(data) else {
        return;
    };
    let host = match &peeked {
        Peeked::Host(h) => {
            assert_eq!(h.trim(), h, "the Host is trimmed");
            Some(h.as_str())
        }
        Peeked::NoHost => None,
        Peeked::Silent => panic!("bytes were there: not silent"),
    };
    let local: SocketAddr = ([127, 0, 0, 1], 15001).into();
    let orig: SocketAddr = ([10, 0, 0, 99], 80).into();
    match decide(&TABLE, local, Some(orig), host) {
        Target::Service(s) => assert!(TABLE.knows(&s), "{s} is the catalog's"),
        Target::Passthrough(to) => assert_eq!(to, orig),
        Target::Direct => panic!("redirected: never direct"),
    }
});
