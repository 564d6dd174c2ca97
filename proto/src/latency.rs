//! The latency histogram of traffic reports (`TrafficReport`): 21 buckets,
//! bucket i holding requests of at most 0.25 ms × 2^i, the last one the
//! slower rest. Sidecars fill it, the control plane merges and reads
//! quantiles from it.

use std::time::Duration;

/// Number of buckets.
pub const BUCKETS: usize = 21;

/// Upper bound of bucket `i` in milliseconds (infinite for the last).
pub fn upper_ms(i: usize) -> f64 {
    if i + 1 >= BUCKETS {
        f64::INFINITY
    } else {
        0.25 * f64::from(1u32 << i)
    }
}

/// The bucket a request of `d` falls in.
pub fn bucket(d: Duration) -> usize {
    let ms = d.as_secs_f64() * 1e3;
    (0..BUCKETS - 1)
        .find(|&i| ms <= upper_ms(i))
        .unwrap_or(BUCKETS - 1)
}

/// The `q` quantile (0-1) in milliseconds, interpolated within its bucket;
/// `None` without samples. The open last bucket reports its lower bound.
pub fn quantile(buckets: &[u64], q: f64) -> Option<f64> {
    let total: u64 = buckets.iter().sum();
    if total == 0 {
        return None;
    }
    let rank = (q.clamp(0.0, 1.0) * total as f64).ceil().max(1.0);
    let mut seen = 0u64;
    for (i, &n) in buckets.iter().enumerate() {
        if n == 0 {
            continue;
        }
        if (seen + n) as f64 >= rank {
            let lower = if i == 0 { 0.0 } else { upper_ms(i - 1) };
            let upper = upper_ms(i);
            if upper.is_infinite() {
                return Some(lower);
            }
            let within = (rank - seen as f64) / n as f64;
            return Some(lower + (upper - lower) * within);
        }
        seen += n;
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_double_from_a_quarter_millisecond() {
        assert_eq!(bucket(Duration::from_micros(100)), 0);
        assert_eq!(bucket(Duration::from_micros(250)), 0);
        assert_eq!(bucket(Duration::from_micros(251)), 1);
        assert_eq!(bucket(Duration::from_millis(3)), 4);
        assert_eq!(bucket(Duration::from_secs(3600)), BUCKETS - 1);
    }

    #[test]
    fn quantiles_fall_in_the_right_bucket() {
        let mut b = [0u64; BUCKETS];
        b[bucket(Duration::from_millis(1))] = 99;
        b[bucket(Duration::from_millis(100))] = 1;
        let p50 = quantile(&b, 0.5).expect("samples");
        assert!(p50 > 0.5 && p50 <= 1.0, "{p50}");
        let p99 = quantile(&b, 0.99).expect("samples");
        assert!(p99 <= 1.0, "99 of 100 are at most 1 ms: {p99}");
        let max = quantile(&b, 1.0).expect("samples");
        assert!(max > 64.0 && max <= 128.0, "{max}");
        assert_eq!(quantile(&[0; BUCKETS], 0.5), None);
    }

    proptest::proptest! {
        #[test]
        fn a_quantile_is_within_the_bounds_of_its_sample(ms in 0.0f64..100_000.0, n in 1u64..1000) {
            let d = Duration::from_secs_f64(ms / 1e3);
            let mut b = [0u64; BUCKETS];
            b[bucket(d)] = n;
            let i = bucket(d);
            let q = quantile(&b, 0.99).expect("samples");
            let lower = if i == 0 { 0.0 } else { upper_ms(i - 1) };
            proptest::prop_assert!(q >= lower && q <= upper_ms(i));
        }
    }
}
