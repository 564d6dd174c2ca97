//! Consistent hashing: the same key always reaches the same endpoint while the
//! set is unchanged, and a change moves as few keys as possible. The key is a
//! header or the client address (nginx's `ip_hash`). Ketama ring and Maglev
//! table, both weighted.

use std::sync::Arc;

use super::{Balancer, EndpointStats, PickContext, Picks};

/// 64-bit hash of bytes: FNV-1a followed by a SplitMix64 finaliser, stable
/// across processes and releases (std's hasher is neither).
pub fn hash_bytes(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in bytes {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    mix(h)
}

fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

fn random_first(n: usize) -> Picks {
    Picks::new(rand::random_range(0..n.max(1)), n)
}

/// Virtual nodes per unit of weight 100 (the default weight).
const VNODES_PER_100: u64 = 160;

/// Ketama ring.
pub struct RingHash {
    endpoints: Vec<Arc<EndpointStats>>,
    ring: Vec<(u64, usize)>,
}

impl RingHash {
    /// Builds the ring over `endpoints`.
    pub fn new(endpoints: Vec<Arc<EndpointStats>>) -> Self {
        let mut ring = Vec::new();
        for (i, e) in endpoints.iter().enumerate() {
            let vnodes = (VNODES_PER_100 * u64::from(e.weight) / 100).max(1);
            for v in 0..vnodes {
                ring.push((hash_bytes(format!("{}-{v}", e.id).as_bytes()), i));
            }
        }
        ring.sort_unstable();
        Self { endpoints, ring }
    }
}

impl Balancer for RingHash {
    fn pick(&self, ctx: &PickContext) -> Picks {
        let n = self.endpoints.len();
        let Some(key) = ctx.key.filter(|_| !self.ring.is_empty()) else {
            return random_first(n);
        };
        let pos = self.ring.partition_point(|&(h, _)| h < key) % self.ring.len();
        Picks::new(self.ring[pos].1, n)
    }
    fn endpoints(&self) -> &[Arc<EndpointStats>] {
        &self.endpoints
    }
}

/// Maglev lookup table size: a prime well above 100 × endpoints.
const MAGLEV_SIZE: usize = 65_537;

/// Maglev (Google's consistent hashing with a lookup table).
pub struct Maglev {
    endpoints: Vec<Arc<EndpointStats>>,
    table: Vec<u32>,
}

impl Maglev {
    /// Builds the table over `endpoints`, giving each a share of entries
    /// proportional to its weight.
    pub fn new(endpoints: Vec<Arc<EndpointStats>>) -> Self {
        let n = endpoints.len();
        if n == 0 {
            return Self {
                endpoints,
                table: Vec::new(),
            };
        }
        let m = MAGLEV_SIZE as u64;
        let perms: Vec<(u64, u64)> = endpoints
            .iter()
            .map(|e| {
                let h = hash_bytes(e.id.as_bytes());
                (h % m, mix(h ^ 0x9e37_79b9_7f4a_7c15) % (m - 1) + 1)
            })
            .collect();
        let max_w = endpoints
            .iter()
            .map(|e| f64::from(e.weight))
            .fold(1.0, f64::max);
        let mut next = vec![0u64; n];
        let mut credit = vec![0f64; n];
        let mut table = vec![u32::MAX; MAGLEV_SIZE];
        let mut filled = 0;
        while filled < MAGLEV_SIZE {
            for i in 0..n {
                credit[i] += f64::from(endpoints[i].weight) / max_w;
                if credit[i] < 1.0 {
                    continue;
                }
                credit[i] -= 1.0;
                let (offset, skip) = perms[i];
                loop {
                    let slot = ((offset + next[i] * skip) % m) as usize;
                    next[i] += 1;
                    if table[slot] == u32::MAX {
                        table[slot] = i as u32;
                        filled += 1;
                        break;
                    }
                }
                if filled == MAGLEV_SIZE {
                    break;
                }
            }
        }
        Self { endpoints, table }
    }
}

impl Balancer for Maglev {
    fn pick(&self, ctx: &PickContext) -> Picks {
        let n = self.endpoints.len();
        match ctx.key {
            Some(key) if !self.table.is_empty() => {
                Picks::new(self.table[(key % MAGLEV_SIZE as u64) as usize] as usize, n)
            }
            _ => random_first(n),
        }
    }
    fn endpoints(&self) -> &[Arc<EndpointStats>] {
        &self.endpoints
    }
}

#[cfg(test)]
mod tests {
    use super::super::testing::{counts, endpoints};
    use super::*;

    fn key(i: usize) -> Option<u64> {
        Some(hash_bytes(format!("client-{i}").as_bytes()))
    }

    fn first(b: &dyn Balancer, k: Option<u64>) -> usize {
        b.pick(&PickContext { key: k }).next().unwrap_or(usize::MAX)
    }

    #[test]
    fn shares_follow_weights() {
        for b in [
            Box::new(RingHash::new(endpoints(&[100, 100, 200]))) as Box<dyn Balancer>,
            Box::new(Maglev::new(endpoints(&[100, 100, 200]))),
        ] {
            let c = counts(b.as_ref(), 40_000, key);
            let share = |i: usize| c[i] as f64 / 40_000.0;
            assert!((share(2) - 0.5).abs() < 0.07, "{c:?}");
            assert!((share(0) - 0.25).abs() < 0.06, "{c:?}");
        }
    }

    proptest::proptest! {
        #[test]
        fn removing_an_endpoint_moves_only_its_keys_on_the_ring(n in 2usize..8, gone in 0usize..8) {
            let gone = gone % n;
            let all = endpoints(&vec![100; n]);
            let before = RingHash::new(all.clone());
            let rest: Vec<_> = all.iter().enumerate().filter(|(i, _)| *i != gone).map(|(_, e)| e.clone()).collect();
            let after = RingHash::new(rest.clone());
            for i in 0..500 {
                let b = first(&before, key(i));
                if b != gone {
                    let a = first(&after, key(i));
                    proptest::prop_assert_eq!(&after.endpoints()[a].id, &before.endpoints()[b].id);
                }
            }
        }

        #[test]
        fn maglev_moves_few_keys_when_an_endpoint_goes(n in 3usize..8) {
            let all = endpoints(&vec![100; n]);
            let before = Maglev::new(all.clone());
            let after = Maglev::new(all[1..].to_vec());
            let mut moved = 0;
            let mut kept_candidates = 0;
            for i in 0..2000 {
                let b = first(&before, key(i));
                if b != 0 {
                    kept_candidates += 1;
                    let a = first(&after, key(i));
                    if after.endpoints()[a].id != before.endpoints()[b].id {
                        moved += 1;
                    }
                }
            }
            // Maglev trades perfect stability for balance; disruption stays small.
            proptest::prop_assert!(moved * 10 < kept_candidates, "{} of {} moved", moved, kept_candidates);
        }

        #[test]
        fn same_key_same_endpoint(k in proptest::num::u64::ANY) {
            let r = RingHash::new(endpoints(&[100, 50, 300]));
            let m = Maglev::new(endpoints(&[100, 50, 300]));
            proptest::prop_assert_eq!(first(&r, Some(k)), first(&r, Some(k)));
            proptest::prop_assert_eq!(first(&m, Some(k)), first(&m, Some(k)));
        }
    }
}
