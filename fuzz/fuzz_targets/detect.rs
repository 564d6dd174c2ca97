//! Protocol detection (`detect::classify`) on a connection's first bytes:
//! never a panic, and once the bytes decide, more bytes never change the
//! answer (the peek loop acts on the first decision it gets).

#![no_main]

use libfuzzer_sys::fuzz_target;
use wayfinder_proxy::detect::classify;

/// Prefixes checked for a stable decision: the peek loop looks at 32 bytes
/// at most; twice that covers it without making each run quadratic in a
/// long input.
const PREFIXES: usize = 64;

fuzz_target!(|data: &[u8]| {
    let _ = classify(data);
    let mut first = None;
    for end in 1..=data.len().min(PREFIXES) {
        if let Some(p) = classify(&data[..end]) {
            let decided = *first.get_or_insert(p);
            assert_eq!(p, decided, "{end} bytes changed the decision");
        }
    }
});
