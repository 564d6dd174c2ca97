//! Path normalisation for authorization (`edge::normalize_path`), then the
//! authorization decision on the result (`authz::allowed`). The input is
//! a request's path as the http crate accepts it (`Uri::path`), or any
//! text. What normalisation promises: a path starting with `/` comes out
//! starting with `/`, with no `.`, `..` or empty segment but a trailing
//! one, and normalising it again changes nothing.

#![no_main]

use std::sync::LazyLock;

use hyper::Uri;
use libfuzzer_sys::fuzz_target;
use wayfinder_proto::v1::{Authorization, AuthzRule};
use wayfinder_proxy::authz::{Ask, allowed};
use wayfinder_proxy::edge::normalize_path;

static POLICY: LazyLock<Authorization> = LazyLock::new(|| {
    let v = |x: &[&str]| x.iter().map(|s| s.to_string()).collect();
    Authorization {
        default_deny: true,
        allow: vec![
            AuthzRule {
                from: v(&["client"]),
                methods: v(&["GET"]),
                path_prefixes: v(&["/public/"]),
            },
            AuthzRule {
                from: v(&["*"]),
                methods: v(&[]),
                path_prefixes: v(&["/healthz"]),
            },
        ],
    }
});

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    check(text);
    if let Ok(uri) = text.parse::<Uri>() {
        check(uri.path());
    }
});

fn check(path: &str) {
    let Ok(norm) = normalize_path(path) else {
        return;
    };
    if path.starts_with('/') {
        assert!(norm.starts_with('/'), "{path:?} -> {norm:?}");
        let inner = norm.trim_end_matches('/');
        for seg in inner.split('/').skip(1) {
            assert!(
                seg != "." && seg != ".." && !seg.is_empty(),
                "{path:?} -> {norm:?}"
            );
        }
    }
    let again = normalize_path(&norm);
    assert_eq!(again.as_deref(), Ok(&*norm), "{path:?}: not stable");
    for caller in [Some("spiffe://wayfinder.local/svc/client"), None] {
        for ask in [Ask::Http("GET", &norm), Ask::Upgrade(&norm)] {
            let _ = allowed(Some(&POLICY), true, caller, ask);
        }
    }
}
