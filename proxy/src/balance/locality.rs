//! Locality: a service's endpoints grouped by zone, a zone drawn per
//! request, then an endpoint by the zone's own balancer.
//!
//! - `prefer-local`: the caller's zone takes everything while enough of its
//!   endpoints are healthy (at least `min_local_percent`); below that, the
//!   local share falls in proportion (healthy% / min%) and the rest spills
//!   to the other zones: Envoy's zone-aware routing with its
//!   overprovisioning factor (1.4 there, about 70% here).
//! - zone weights: a zone is drawn by its weight among the zones with
//!   eligible endpoints (Envoy's locality weights).
//!
//! A request's tries take the drawn zone's endpoints first and then the
//! others ([`Picks::grouped`]), so a retry after a dead local instance goes
//! to the next local one and then remote. The endpoints are laid out zone
//! after zone in one slice, which [`Balancer::endpoints`] returns as every
//! balancer does; a pick costs one draw (none when a zone takes all) and
//! one pick of the zone's balancer, and allocates nothing.
//!
//! [`Zoned::count_try`] counts tries as local or remote
//! (`wayfinder_proxy_locality_requests_total`).

use std::collections::BTreeMap;
use std::ops::Range;
use std::sync::Arc;
use std::time::Duration;

use prometheus_client::metrics::counter::Counter;

use super::{Balancer, EndpointStats, Kind, PickContext, Picks, build_with};
use crate::settings::Locality as Split;

/// The local and remote try counters of one upstream.
#[derive(Debug, Clone, Default)]
pub struct Counters {
    /// Tries on an endpoint in the sidecar's zone.
    pub local: Counter,
    /// Tries elsewhere.
    pub remote: Counter,
}

/// What a zoned balancer is built from.
pub struct Layout<'a> {
    /// The algorithm within each zone.
    pub kind: Kind,
    /// The eligible endpoints with their zones ("" unknown).
    pub endpoints: Vec<(Arc<EndpointStats>, &'a str)>,
    /// The sidecar's zone.
    pub local: Option<&'a str>,
    /// How traffic divides; `None`: one group, only counted.
    pub split: Option<&'a Split>,
    /// Of the endpoints in the local zone (eligible or not), how many are
    /// healthy and not ejected, and how many there are.
    pub local_health: (usize, usize),
    /// Slow start of each zone's balancer.
    pub slow_start: Option<Duration>,
    /// Tries counted as local or remote.
    pub counters: Option<Counters>,
}

/// An endpoint and whether it is outside the sidecar's zone.
type Member = (Arc<EndpointStats>, bool);

/// One zone (or, for prefer-local, the local zone or all the others).
struct Group {
    range: Range<usize>,
    balancer: Box<dyn Balancer>,
}

/// A balancer over zones.
pub struct Zoned {
    /// Zone after zone, the local one first.
    endpoints: Vec<Arc<EndpointStats>>,
    groups: Vec<Group>,
    /// Cumulative draw weights by group; the last is the total (0: the
    /// first group takes everything).
    cumulative: Vec<u64>,
    /// Endpoints `..local` are in the sidecar's zone.
    local: usize,
    counters: Option<Counters>,
}

impl Zoned {
    /// Groups `l.endpoints` by zone and weighs the groups.
    pub fn new(l: Layout<'_>) -> Self {
        let is_local = |z: &str| l.local.is_some_and(|local| z == local);
        // Groups: prefer-local has two (local, the rest), zone weights one
        // per zone, no split one; local ones sort first (`false` < `true`),
        // so the local endpoints are `..local` of the slice.
        let mut by_group: BTreeMap<(bool, &str), Vec<Member>> = BTreeMap::new();
        for (ep, zone) in l.endpoints {
            let remote = !is_local(zone);
            let key = match l.split {
                None => (false, ""),
                Some(Split::PreferLocal { .. }) => (remote, ""),
                Some(Split::Weights(_)) => (remote, zone),
            };
            by_group.entry(key).or_default().push((ep, remote));
        }
        let mut endpoints = Vec::new();
        let mut groups = Vec::new();
        let mut weights = Vec::new();
        let mut local = 0;
        for ((remote, zone), mut members) in by_group {
            members.sort_by_key(|&(_, r)| r);
            local += members.iter().filter(|&&(_, r)| !r).count();
            let weight = match l.split {
                None => 1,
                Some(Split::PreferLocal { min_local_percent }) => {
                    let share = local_share(l.local_health, *min_local_percent);
                    ((if remote { 1.0 - share } else { share }) * 10_000.0).round() as u64
                }
                Some(Split::Weights(w)) => u64::from(w.get(zone).copied().unwrap_or(0)),
            };
            let eps: Vec<_> = members.into_iter().map(|(ep, _)| ep).collect();
            let start = endpoints.len();
            endpoints.extend(eps.iter().cloned());
            groups.push(Group {
                range: start..endpoints.len(),
                balancer: build_with(l.kind, eps, l.slow_start),
            });
            weights.push(weight);
        }
        // Nothing weighs anything (the weighted zones have no eligible
        // endpoint): by size, rather than all to the first.
        if weights.iter().all(|&w| w == 0) {
            for (w, g) in weights.iter_mut().zip(&groups) {
                *w = g.range.len() as u64;
            }
        }
        let cumulative = weights
            .iter()
            .scan(0, |acc, w| {
                *acc += w;
                Some(*acc)
            })
            .collect();
        Self {
            endpoints,
            groups,
            cumulative,
            local,
            counters: l.counters,
        }
    }

    /// The zone group a request goes to, drawn by weight.
    fn draw(&self) -> Option<&Group> {
        let total = *self.cumulative.last()?;
        if self.groups.len() == 1 || total == 0 {
            return self.groups.first();
        }
        // A zone that takes everything needs no roll.
        if let Some(i) = self.cumulative.iter().position(|&c| c == total)
            && (i == 0 || self.cumulative[i - 1] == 0)
        {
            return self.groups.get(i);
        }
        let roll = rand::random_range(0..total);
        let i = self.cumulative.partition_point(|&c| c <= roll);
        self.groups.get(i)
    }
}

/// The local zone's share under prefer-local: all of it while at least
/// `min_percent` of its endpoints are healthy, in proportion below.
pub fn local_share((healthy, total): (usize, usize), min_percent: u32) -> f64 {
    if total == 0 {
        return 0.0;
    }
    let healthy_percent = 100.0 * healthy as f64 / total as f64;
    (healthy_percent / f64::from(min_percent.max(1))).min(1.0)
}

impl Balancer for Zoned {
    fn pick(&self, ctx: &PickContext) -> Picks {
        let n = self.endpoints.len();
        let Some(g) = self.draw() else {
            return Picks::new(0, 0);
        };
        match g.balancer.pick(ctx).next() {
            Some(first) => Picks::grouped(g.range.start + first, g.range.clone(), n),
            None => Picks::new(0, n),
        }
    }

    fn endpoints(&self) -> &[Arc<EndpointStats>] {
        &self.endpoints
    }

    fn count_try(&self, i: usize) {
        if let Some(c) = &self.counters {
            if i < self.local {
                c.local.inc();
            } else {
                c.remote.inc();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::testing::{counts, endpoints};
    use super::*;

    /// `zones[i]` is endpoint i's zone.
    fn zoned(
        zones: &'static [&'static str],
        split: Option<&Split>,
        local_health: (usize, usize),
        counters: Option<Counters>,
    ) -> Zoned {
        let eps = endpoints(&vec![1; zones.len()]);
        Zoned::new(Layout {
            kind: Kind::RoundRobin,
            endpoints: eps.into_iter().zip(zones.iter().copied()).collect(),
            local: Some("a"),
            split,
            local_health,
            slow_start: None,
            counters,
        })
    }

    fn zones_of(z: &Zoned, picks: &[usize]) -> String {
        picks
            .iter()
            .map(|&i| if i < z.local { 'a' } else { 'r' })
            .collect()
    }

    const PREFER: Split = Split::PreferLocal {
        min_local_percent: 70,
    };

    #[test]
    fn prefer_local_keeps_everything_local_and_tries_remote_last() {
        let z = zoned(&["b", "a", "b", "a"], Some(&PREFER), (2, 2), None);
        let c = counts(&z, 1000, |_| None);
        let local: usize = c[..z.local].iter().sum();
        assert_eq!(local, 1000, "{c:?}");
        for _ in 0..20 {
            let order: Vec<_> = z.pick(&PickContext::default()).collect();
            assert_eq!(zones_of(&z, &order), "aarr", "{order:?}");
        }
    }

    #[test]
    fn below_the_minimum_the_local_share_falls_in_proportion() {
        assert_eq!(local_share((7, 10), 70), 1.0);
        assert!((local_share((1, 2), 70) - 50.0 / 70.0).abs() < 1e-9);
        assert_eq!(local_share((0, 2), 70), 0.0);
        assert_eq!(local_share((0, 0), 70), 0.0, "no local endpoints");
        // One of two local endpoints healthy (and eligible): 5/7 local.
        let z = zoned(&["a", "b", "b"], Some(&PREFER), (1, 2), None);
        let c = counts(&z, 7000, |_| None);
        assert!((4700..=5300).contains(&c[0]), "{c:?}");
    }

    #[test]
    fn with_no_local_endpoint_everything_goes_to_the_other_zones() {
        let z = zoned(&["b", "c"], Some(&PREFER), (0, 0), None);
        let c = counts(&z, 100, |_| None);
        assert_eq!(c.iter().sum::<usize>(), 100);
    }

    #[test]
    fn zone_weights_draw_a_zone_by_weight_and_unweighted_zones_only_back_up() {
        let w = Split::Weights(
            [("a".to_string(), 80), ("b".to_string(), 20)]
                .into_iter()
                .collect(),
        );
        let z = zoned(&["a", "b", "c", "b"], Some(&w), (1, 1), None);
        let by_zone = |c: &[usize]| {
            let mut m = BTreeMap::new();
            for (i, n) in c.iter().enumerate() {
                let ep = &z.endpoints[i];
                let zone = ["a", "b", "c", "b"][ep.id[3..].parse::<usize>().unwrap_or(0)];
                *m.entry(zone).or_insert(0) += n;
            }
            m
        };
        let m = by_zone(&counts(&z, 10_000, |_| None));
        assert!((7700..=8300).contains(&m["a"]), "{m:?}");
        assert_eq!(m.get("c").copied().unwrap_or(0), 0, "{m:?}");
        // Every try order still reaches every endpoint.
        let mut order: Vec<_> = z.pick(&PickContext::default()).collect();
        order.sort_unstable();
        assert_eq!(order, [0, 1, 2, 3]);
    }

    #[test]
    fn tries_are_counted_local_or_remote() {
        let counters = Counters::default();
        let z = zoned(&["a", "b", "b"], None, (1, 1), Some(counters.clone()));
        for i in z.pick(&PickContext::default()) {
            z.count_try(i);
        }
        assert_eq!((counters.local.get(), counters.remote.get()), (1, 2));
        // Without a split, one group: the balancer over all of them.
        let c = counts(&z, 3000, |_| None);
        assert_eq!(c, [1000, 1000, 1000]);
    }

    proptest::proptest! {
        /// Whatever the zones: the local endpoints come first in the slice,
        /// the drawn zone's endpoints first in every try order, and every
        /// endpoint once.
        #[test]
        fn try_orders_cover_every_endpoint_and_start_in_one_zone(
            zones in proptest::collection::vec(0usize..3, 1..10),
            healthy in 0usize..4,
        ) {
            const NAMES: [&str; 3] = ["a", "b", "c"];
            let eps = endpoints(&vec![1; zones.len()]);
            let total_local = zones.iter().filter(|&&z| z == 0).count();
            let z = Zoned::new(Layout {
                kind: Kind::LeastRequest,
                endpoints: eps.into_iter().zip(zones.iter().map(|&z| NAMES[z])).collect(),
                local: Some("a"),
                split: Some(&PREFER),
                local_health: (healthy.min(total_local), total_local),
                slow_start: None,
                counters: None,
            });
            proptest::prop_assert_eq!(z.local, total_local);
            for _ in 0..10 {
                let order: Vec<_> = z.pick(&PickContext::default()).collect();
                let mut sorted = order.clone();
                sorted.sort_unstable();
                proptest::prop_assert_eq!(sorted, (0..zones.len()).collect::<Vec<_>>());
                let first_local = order[0] < z.local;
                let group = if first_local { total_local } else { zones.len() - total_local };
                proptest::prop_assert!(order[..group].iter().all(|&i| (i < z.local) == first_local));
            }
        }
    }
}
