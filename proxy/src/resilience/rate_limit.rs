//! Local rate limits, enforced by a service's own sidecar on the way in (as
//! Envoy's local rate limit filter): one token bucket for the sidecar, or
//! one per caller identity (the SPIFFE ID of its certificate). A request
//! over the limit never reaches the app; `http/inbound.rs` answers it 429
//! (gRPC: RESOURCE_EXHAUSTED) with a `Retry-After`.
//!
//! Three roles, as the other resilience files keep them apart: the limit
//! (`settings::RateLimit`, from the policy), the buckets ([`Limiter`], built
//! once per limit) and the sidecar's slot for them ([`Inbound`]), which
//! keeps a limiter for as long as its limit is unchanged: the service's
//! settings are rebuilt on every discovery change, and buckets that refilled
//! with each would limit nothing.
//!
//! Both maps keyed by caller (buckets, and the series of the refusal
//! counter) hold at most [`MAX_CALLERS`] callers, so that identities, however
//! many a peer has, cannot grow the sidecar's memory or its metrics.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard, RwLock};
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::{counter::Counter, family::Family};
use tokio::time::Instant;

use crate::settings::RateLimit;

/// Most callers with a bucket of their own; callers beyond it share one
/// bucket until idle ones are swept. Also the most series of
/// `wayfinder_proxy_rate_limited_total`. A service has far fewer callers
/// than this; a peer minting identities gets no more.
pub const MAX_CALLERS: usize = 10_000;

/// How often at most a full map is swept: sweeping walks every entry, and a
/// map full of busy callers would otherwise be walked on every new one.
const SWEEP_EVERY: Duration = Duration::from_secs(1);

/// How long a caller's refusal series stays once the series are at their
/// cap and it is not counted (its count goes with it, as an evicted
/// upstream's series do).
const SERIES_IDLE: Duration = Duration::from_secs(600);

/// Who calls: the SPIFFE ID of its certificate; `None` for callers without
/// one (plaintext in permissive mode), who share one key.
pub type Caller = Option<Arc<str>>;

/// Labels of `wayfinder_proxy_rate_limited_total` (defined here, beside the
/// bound on its series; `metrics.rs` registers it).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RateLimitedLabels {
    /// The sidecar's own service (the one limited).
    pub service: String,
    /// The caller's SPIFFE ID, [`UNAUTHENTICATED`], or [`OTHER`] once
    /// [`MAX_CALLERS`] callers have a series.
    pub caller: String,
}

/// The label value of callers without an identity.
pub const UNAUTHENTICATED: &str = "unauthenticated";
/// The label value of refusals counted once the series are at their cap.
pub const OTHER: &str = "other";

/// The rate in a bucket's terms.
#[derive(Debug, Clone, Copy)]
struct Pace {
    /// Time for one token to come back: 1 s / rate, rounded up to the
    /// nanosecond so that never more than the rate is admitted.
    interval: Duration,
    /// How far a bucket's `full_at` may be ahead of now: `burst` intervals.
    tolerance: Duration,
}

impl Pace {
    fn new(limit: RateLimit) -> Self {
        let per_sec = u64::from(limit.per_sec.max(1));
        let interval = Duration::from_nanos(1_000_000_000u64.div_ceil(per_sec));
        Self {
            interval,
            tolerance: interval.saturating_mul(limit.burst.max(1)),
        }
    }
}

/// One token bucket, kept as GCRA keeps it: one instant, when the bucket is
/// full again (its tokens are `(tolerance - (full_at - now)) / interval`).
/// No refill task and no float: taking a token moves the instant on.
#[derive(Debug, Clone, Copy)]
struct Bucket {
    full_at: Instant,
}

impl Bucket {
    /// A full bucket.
    fn new(now: Instant) -> Self {
        Self { full_at: now }
    }

    /// Takes a token at `now`; without one, how long until there is.
    fn take(&mut self, now: Instant, pace: Pace) -> Result<(), Duration> {
        let next = self.full_at.max(now) + pace.interval;
        let ahead = next.saturating_duration_since(now);
        if ahead > pace.tolerance {
            return Err(ahead - pace.tolerance);
        }
        self.full_at = next;
        Ok(())
    }

    /// A full bucket decides as a new one would: it can go.
    fn is_full(&self, now: Instant) -> bool {
        self.full_at <= now
    }
}

/// The buckets of one limit.
#[derive(Debug)]
enum Buckets {
    /// One for every caller.
    Shared(Bucket),
    /// One per caller, at most `cap`; `overflow` for callers beyond it.
    PerCaller {
        callers: HashMap<Caller, Bucket>,
        overflow: Bucket,
        cap: usize,
        next_sweep: Instant,
    },
}

/// The token buckets of one limit.
#[derive(Debug)]
pub struct Limiter {
    limit: RateLimit,
    pace: Pace,
    buckets: Mutex<Buckets>,
}

impl Limiter {
    /// Full buckets for `limit` at `now`.
    pub fn new(limit: RateLimit, now: Instant) -> Self {
        Self::with_cap(limit, now, MAX_CALLERS)
    }

    /// [`Limiter::new`] holding at most `cap` callers' buckets.
    fn with_cap(limit: RateLimit, now: Instant, cap: usize) -> Self {
        let buckets = if limit.per_caller {
            Buckets::PerCaller {
                callers: HashMap::new(),
                overflow: Bucket::new(now),
                cap,
                next_sweep: now,
            }
        } else {
            Buckets::Shared(Bucket::new(now))
        };
        Self {
            limit,
            pace: Pace::new(limit),
            buckets: Mutex::new(buckets),
        }
    }

    /// The limit it enforces.
    pub fn limit(&self) -> RateLimit {
        self.limit
    }

    fn lock(&self) -> MutexGuard<'_, Buckets> {
        self.buckets.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Admits a request of `caller` at `now`, or says how long until it
    /// would be.
    pub fn check(&self, caller: &Caller, now: Instant) -> Result<(), Duration> {
        let pace = self.pace;
        match &mut *self.lock() {
            Buckets::Shared(b) => b.take(now, pace),
            Buckets::PerCaller {
                callers,
                overflow,
                cap,
                next_sweep,
            } => {
                if let Some(b) = callers.get_mut(caller) {
                    return b.take(now, pace);
                }
                if callers.len() >= *cap && now >= *next_sweep {
                    // Full buckets decide as new ones would: dropping them
                    // changes no answer.
                    callers.retain(|_, b| !b.is_full(now));
                    // Every bucket left is full within `tolerance`.
                    *next_sweep = now + pace.tolerance.min(SWEEP_EVERY);
                }
                if callers.len() < *cap {
                    callers
                        .entry(caller.clone())
                        .or_insert_with(|| Bucket::new(now))
                        .take(now, pace)
                } else {
                    overflow.take(now, pace)
                }
            }
        }
    }
}

/// `Retry-After` for a wait: whole seconds, rounded up, at least 1 (the
/// header has no finer unit, and 0 would invite the retry at once).
pub fn retry_after_secs(wait: Duration) -> u64 {
    (wait.as_secs() + u64::from(wait.subsec_nanos() > 0)).max(1)
}

/// The series of `wayfinder_proxy_rate_limited_total`, one per caller
/// refused, at most `cap`; once there are that many, the series of callers
/// not refused for [`SERIES_IDLE`] go, and while none can, refusals of new
/// callers count as [`OTHER`].
pub struct Tally {
    family: Family<RateLimitedLabels, Counter>,
    service: String,
    series: Mutex<Series>,
}

struct Series {
    /// Each caller's counter, and when it was last counted.
    by_caller: HashMap<Caller, (Counter, Instant)>,
    other: Option<Counter>,
    cap: usize,
    next_sweep: Instant,
}

impl Tally {
    /// Series of `family` for the sidecar's `service`.
    pub fn new(family: Family<RateLimitedLabels, Counter>, service: &str) -> Self {
        Self::with_cap(family, service, MAX_CALLERS)
    }

    fn with_cap(family: Family<RateLimitedLabels, Counter>, service: &str, cap: usize) -> Self {
        Self {
            family,
            service: service.to_string(),
            series: Mutex::new(Series {
                by_caller: HashMap::new(),
                other: None,
                cap,
                next_sweep: Instant::now(),
            }),
        }
    }

    fn labels(&self, caller: &str) -> RateLimitedLabels {
        RateLimitedLabels {
            service: self.service.clone(),
            caller: caller.to_string(),
        }
    }

    /// Counts a refusal of `caller` at `now`.
    pub fn count(&self, caller: &Caller, now: Instant) {
        let mut s = self.series.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((counter, at)) = s.by_caller.get_mut(caller) {
            counter.inc();
            *at = now;
            return;
        }
        if s.by_caller.len() >= s.cap && now >= s.next_sweep {
            s.next_sweep = now + SWEEP_EVERY;
            let idle: Vec<Caller> = s
                .by_caller
                .iter()
                .filter(|(_, (_, at))| now.saturating_duration_since(*at) >= SERIES_IDLE)
                .map(|(c, _)| c.clone())
                .collect();
            for c in idle {
                s.by_caller.remove(&c);
                self.family
                    .remove(&self.labels(c.as_deref().unwrap_or(UNAUTHENTICATED)));
            }
        }
        if s.by_caller.len() < s.cap {
            let label = caller.as_deref().unwrap_or(UNAUTHENTICATED);
            let counter = self.family.get_or_create(&self.labels(label)).clone();
            counter.inc();
            s.by_caller.insert(caller.clone(), (counter, now));
        } else {
            s.other
                .get_or_insert_with(|| self.family.get_or_create(&self.labels(OTHER)).clone())
                .inc();
        }
    }
}

/// The sidecar's inbound limit: the limiter of the limit in force, kept
/// while the limit stays the same, and the refusals' series.
pub struct Inbound {
    current: RwLock<Option<Arc<Limiter>>>,
    tally: Tally,
}

impl Inbound {
    /// No limiter yet; refusals counted in `family` for `service`.
    pub fn new(family: Family<RateLimitedLabels, Counter>, service: &str) -> Self {
        Self {
            current: RwLock::new(None),
            tally: Tally::new(family, service),
        }
    }

    /// Admits a request of `caller` under `limit` (the service's limit in
    /// force), or says how long the caller should wait; a refusal is
    /// counted.
    pub fn admit(&self, limit: Option<RateLimit>, caller: &Caller) -> Result<(), Duration> {
        let now = Instant::now();
        let Some(limiter) = self.limiter(limit, now) else {
            return Ok(());
        };
        limiter
            .check(caller, now)
            .inspect_err(|_| self.tally.count(caller, now))
    }

    /// The limiter of `limit`: the one held when its limit is the same, a
    /// new one (full buckets) when the limit changed.
    fn limiter(&self, limit: Option<RateLimit>, now: Instant) -> Option<Arc<Limiter>> {
        let same = |held: &Option<Arc<Limiter>>| held.as_ref().map(|l| l.limit()) == limit;
        {
            let held = self.current.read().unwrap_or_else(|p| p.into_inner());
            if same(&held) {
                return held.clone();
            }
        }
        let mut held = self.current.write().unwrap_or_else(|p| p.into_inner());
        if !same(&held) {
            *held = limit.map(|l| Arc::new(Limiter::new(l, now)));
        }
        held.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limit(per_sec: u32, burst: u32, per_caller: bool) -> RateLimit {
        RateLimit {
            per_sec,
            burst,
            per_caller,
        }
    }

    fn caller(name: &str) -> Caller {
        Some(Arc::from(format!("spiffe://wayfinder.local/svc/{name}")))
    }

    /// Callers holding a bucket of their own in `l`.
    fn held(l: &Limiter) -> usize {
        match &*l.lock() {
            Buckets::Shared(_) => 0,
            Buckets::PerCaller { callers, .. } => callers.len(),
        }
    }

    /// Requests of `who` admitted out of `n` at once.
    fn admitted(l: &Limiter, who: &Caller, n: usize) -> usize {
        let now = Instant::now();
        (0..n).filter(|_| l.check(who, now).is_ok()).count()
    }

    #[tokio::test(start_paused = true)]
    async fn a_full_bucket_admits_its_burst_then_the_rate() {
        let l = Limiter::new(limit(100, 10, false), Instant::now());
        let a = caller("a");
        assert_eq!(admitted(&l, &a, 50), 10, "the burst at once");
        let wait = l.check(&a, Instant::now()).expect_err("empty");
        assert_eq!(wait, Duration::from_millis(10), "one token's time");
        tokio::time::advance(Duration::from_millis(10)).await;
        assert_eq!(admitted(&l, &a, 5), 1, "one token back after 10 ms");
        // A second at 200 rps lets the rate through.
        let mut ok = 0;
        for _ in 0..200 {
            tokio::time::advance(Duration::from_millis(5)).await;
            ok += usize::from(l.check(&a, Instant::now()).is_ok());
        }
        assert_eq!(ok, 100);
        // Idle long enough, it is full again, and no fuller.
        tokio::time::advance(Duration::from_secs(5)).await;
        assert_eq!(admitted(&l, &a, 50), 10);
    }

    #[tokio::test(start_paused = true)]
    async fn callers_share_one_bucket_unless_each_has_its_own() {
        let shared = Limiter::new(limit(10, 10, false), Instant::now());
        assert_eq!(admitted(&shared, &caller("a"), 6), 6);
        assert_eq!(admitted(&shared, &caller("b"), 6), 4, "the rest of a's");
        assert_eq!(admitted(&shared, &None, 6), 0);
        let own = Limiter::new(limit(10, 10, true), Instant::now());
        assert_eq!(admitted(&own, &caller("a"), 20), 10);
        assert_eq!(admitted(&own, &caller("b"), 20), 10, "b's own bucket");
        assert_eq!(
            admitted(&own, &None, 20),
            10,
            "the unauthenticated share one"
        );
        assert_eq!(admitted(&own, &None, 20), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn callers_beyond_the_cap_share_a_bucket_until_idle_ones_are_swept() {
        let l = Limiter::with_cap(limit(1, 1, true), Instant::now(), 3);
        for name in ["a", "b", "c"] {
            assert_eq!(admitted(&l, &caller(name), 2), 1);
        }
        assert_eq!(held(&l), 3);
        // Four new callers while a, b and c are busy: one overflow bucket.
        let newcomers: usize = ["d", "e", "f", "g"]
            .iter()
            .map(|n| admitted(&l, &caller(n), 1))
            .sum();
        assert_eq!(newcomers, 1, "they share one bucket");
        assert_eq!(held(&l), 3, "memory stays at the cap");
        // A second on, every bucket is full again: swept, room for d.
        tokio::time::advance(Duration::from_secs(1)).await;
        assert_eq!(admitted(&l, &caller("d"), 2), 1);
        assert_eq!(held(&l), 1, "the full ones went");
    }

    #[tokio::test(start_paused = true)]
    async fn the_limiter_survives_an_unchanged_limit_and_restarts_on_a_new_one() {
        let family = Family::<RateLimitedLabels, Counter>::default();
        let inbound = Inbound::new(family.clone(), "web");
        let a = caller("a");
        let take = |l, n| (0..n).filter(|_| inbound.admit(l, &a).is_ok()).count();
        let ten = Some(limit(10, 10, false));
        assert_eq!(take(ten, 10), 10);
        assert_eq!(take(ten, 1), 0, "the same limit, the same empty bucket");
        let twenty = Some(limit(20, 20, false));
        assert_eq!(take(twenty, 30), 20, "a new limit starts full");
        assert_eq!(take(None, 30), 30, "no limit admits everything");
        let labels = RateLimitedLabels {
            service: "web".into(),
            caller: "spiffe://wayfinder.local/svc/a".into(),
        };
        assert_eq!(family.get_or_create(&labels).get(), 11);
    }

    #[tokio::test(start_paused = true)]
    async fn refusal_series_stay_under_their_cap() {
        let family = Family::<RateLimitedLabels, Counter>::default();
        let tally = Tally::with_cap(family.clone(), "web", 2);
        let get = |c: &str| {
            family
                .get_or_create(&RateLimitedLabels {
                    service: "web".into(),
                    caller: c.into(),
                })
                .get()
        };
        tally.count(&None, Instant::now());
        tally.count(&caller("a"), Instant::now());
        tally.count(&caller("b"), Instant::now());
        tally.count(&caller("b"), Instant::now());
        assert_eq!(get(UNAUTHENTICATED), 1);
        assert_eq!(get(OTHER), 2, "b found no room");
        tokio::time::advance(SERIES_IDLE).await;
        tally.count(&caller("a"), Instant::now());
        tally.count(&caller("c"), Instant::now());
        assert_eq!(
            get("spiffe://wayfinder.local/svc/c"),
            1,
            "the idle series went"
        );
        assert_eq!(get("spiffe://wayfinder.local/svc/a"), 2);
    }

    #[test]
    fn retry_after_rounds_up_to_whole_seconds_and_is_at_least_one() {
        assert_eq!(retry_after_secs(Duration::ZERO), 1);
        assert_eq!(retry_after_secs(Duration::from_millis(10)), 1);
        assert_eq!(retry_after_secs(Duration::from_secs(1)), 1);
        assert_eq!(retry_after_secs(Duration::from_millis(1001)), 2);
    }

    proptest::proptest! {
        /// Whatever the arrivals, no window of `t` seconds admits more than
        /// `rate × t + burst`; and requests a token's time apart always pass.
        #[test]
        fn never_more_than_the_rate_times_the_time_plus_the_burst(
            per_sec in 1u32..2_000,
            burst in 1u32..50,
            gaps in proptest::collection::vec(0u64..20_000_000, 1..300),
        ) {
            let pace = Pace::new(limit(per_sec, burst, false));
            let start = Instant::now();
            let mut bucket = Bucket::new(start);
            let mut at = start;
            let mut passed = Vec::new();
            for gap in gaps {
                at += Duration::from_nanos(gap);
                if bucket.take(at, pace).is_ok() {
                    passed.push(at);
                }
            }
            for (i, from) in passed.iter().enumerate() {
                for (j, to) in passed.iter().enumerate().skip(i) {
                    let t = to.duration_since(*from).as_secs_f64();
                    let most = f64::from(per_sec) * t + f64::from(burst);
                    proptest::prop_assert!((j - i + 1) as f64 <= most + 1e-9,
                        "{} admitted in {t} s at {per_sec}/s burst {burst}", j - i + 1);
                }
            }
            let mut spaced = Bucket::new(start);
            let mut at = start;
            for _ in 0..(2 * burst) {
                at += pace.interval;
                proptest::prop_assert!(spaced.take(at, pace).is_ok());
            }
        }

        /// A refused request is told the time after which it would pass.
        #[test]
        fn the_wait_of_a_refusal_is_exact(
            per_sec in 1u32..2_000,
            burst in 1u32..50,
            extra in 1u32..100,
        ) {
            let pace = Pace::new(limit(per_sec, burst, false));
            let now = Instant::now();
            let mut b = Bucket::new(now);
            for _ in 0..burst {
                proptest::prop_assert!(b.take(now, pace).is_ok());
            }
            let mut wait = Duration::ZERO;
            for _ in 0..extra {
                wait = b.take(now, pace).expect_err("empty");
            }
            proptest::prop_assert!(b.clone().take(now + wait - Duration::from_nanos(1), pace).is_err());
            proptest::prop_assert!(b.take(now + wait, pace).is_ok());
        }
    }
}
