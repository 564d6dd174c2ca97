//! Reconnect backoff shared by everything that talks to the control plane.

use std::time::Duration;

/// First backoff.
pub const BASE: Duration = Duration::from_millis(100);
/// Longest backoff.
pub const CAP: Duration = Duration::from_secs(5);

/// Wait before reconnect attempt `attempt` (0-based): doubles from 100 ms up
/// to 5 s, then keeps a random half to the whole of it, so clients that lost
/// the same server do not come back in lockstep.
pub fn backoff(attempt: u32) -> Duration {
    let ceiling = BASE.saturating_mul(1 << attempt.min(6)).min(CAP);
    ceiling.mul_f64(0.5 + rand::random::<f64>() / 2.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_to_a_cap_with_jitter() {
        for a in 0..20 {
            let b = backoff(a);
            let cap = BASE.saturating_mul(1 << a.min(6)).min(CAP);
            assert!(b >= cap / 2 && b <= cap, "attempt {a}: {b:?}");
        }
        assert!(backoff(30) <= CAP);
    }
}
