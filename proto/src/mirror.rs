//! The counts a mirror comparison adds up: a sidecar counts pairs as they
//! end and reports them (`v1::MirrorDiff`), wf-control sums the reports.
//! One type on both sides, with its wire form.

use crate::latency::BUCKETS;
use crate::v1::MirrorDiff;

/// Mirrored calls compared with their copies, over some span.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Tally {
    /// Calls whose primary and shadow both answered.
    pub pairs: u64,
    /// Pairs whose statuses differed.
    pub status_differs: u64,
    /// Pairs with the same status whose bodies differed.
    pub body_differs: u64,
    /// Copies not sent (over the mirror's limits).
    pub shed: u64,
    /// Copies that got no answer.
    pub shadow_failed: u64,
    /// Primary's time to its whole answer, in [`crate::latency`]'s buckets.
    pub primary: [u64; BUCKETS],
    /// The shadow's, likewise.
    pub shadow: [u64; BUCKETS],
}

impl Tally {
    /// A report's entry; buckets past [`BUCKETS`] are ignored, missing ones are 0.
    pub fn from_wire(m: &MirrorDiff) -> Self {
        let mut t = Self {
            pairs: m.pairs,
            status_differs: m.status_differs,
            body_differs: m.body_differs,
            shed: m.shed,
            shadow_failed: m.shadow_failed,
            ..Self::default()
        };
        for (b, n) in t.primary.iter_mut().zip(&m.primary_latency_buckets) {
            *b = *n;
        }
        for (b, n) in t.shadow.iter_mut().zip(&m.shadow_latency_buckets) {
            *b = *n;
        }
        t
    }

    /// The report entry of `service`'s calls taken by `route` and copied to `shadow`.
    pub fn to_wire(&self, service: String, route: String, shadow: String) -> MirrorDiff {
        MirrorDiff {
            service,
            route,
            shadow,
            pairs: self.pairs,
            status_differs: self.status_differs,
            body_differs: self.body_differs,
            shed: self.shed,
            shadow_failed: self.shadow_failed,
            primary_latency_buckets: self.primary.to_vec(),
            shadow_latency_buckets: self.shadow.to_vec(),
        }
    }

    /// Adds `other`'s counts; sums saturate (a report may say anything its
    /// validation allows).
    pub fn add(&mut self, other: &Tally) {
        self.pairs = self.pairs.saturating_add(other.pairs);
        self.status_differs = self.status_differs.saturating_add(other.status_differs);
        self.body_differs = self.body_differs.saturating_add(other.body_differs);
        self.shed = self.shed.saturating_add(other.shed);
        self.shadow_failed = self.shadow_failed.saturating_add(other.shadow_failed);
        for (b, n) in self.primary.iter_mut().zip(other.primary) {
            *b = b.saturating_add(n);
        }
        for (b, n) in self.shadow.iter_mut().zip(other.shadow) {
            *b = b.saturating_add(n);
        }
    }

    /// Whether anything was mirrored (or tried to be).
    pub fn any(&self) -> bool {
        self.pairs > 0 || self.shed > 0 || self.shadow_failed > 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_wire_form_round_trips_and_sums_saturate() {
        let mut t = Tally {
            pairs: 3,
            shed: 1,
            ..Tally::default()
        };
        t.primary[2] = 3;
        let back = Tally::from_wire(&t.to_wire("web".into(), String::new(), "v2".into()));
        assert_eq!(back, t);
        let mut max = Tally {
            pairs: u64::MAX,
            ..Tally::default()
        };
        max.add(&t);
        assert_eq!(max.pairs, u64::MAX);
        assert!(!Tally::default().any() && t.any());
    }
}
