//! gRPC's `grpc-timeout` header (`retry::grpc_timeout`) on any text (the
//! proxy passes it header values that are text, a subset), and the request
//! deadline made of it (`started + d` in outbound, which must not
//! overflow).

#![no_main]

use libfuzzer_sys::fuzz_target;
use wayfinder_proxy::resilience::retry::grpc_timeout;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Some(d) = grpc_timeout(text) {
        // Up to 8 digits and a unit.
        assert!((2..=9).contains(&text.len()), "{text:?}");
        assert!(
            std::time::Instant::now().checked_add(d).is_some(),
            "{text:?}: {d:?} overflows a deadline"
        );
    }
});
