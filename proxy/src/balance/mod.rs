//! Load balancers. Each is built for one set of eligible endpoints and
//! answers [`Balancer::pick`] with a first choice and then fallbacks, so a
//! retry naturally lands on another endpoint.
//!
//! The set is rebuilt whenever discovery changes it (see `upstream.rs`), so
//! balancers hold plain slices and precomputed tables, never locks around the
//! list itself; per-endpoint load (requests in flight, latency) lives on the
//! shared [`EndpointStats`].

mod hash;
pub mod locality;
mod p2c;
mod round_robin;
pub mod slow_start;
mod weighted;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

pub use hash::{Maglev, RingHash, hash_bytes};
pub use locality::Zoned;
pub use p2c::{LeastRequest, PeakEwma};
pub use round_robin::RoundRobin;
pub use weighted::SmoothWeighted;

/// Balancer algorithms: the policy's own enum (also `--balancer`'s values),
/// named `Kind` here beside the [`Balancer`] trait its values build.
pub use wayfinder_proto::policy::Balancer as Kind;

/// Live load of one endpoint, shared by every balancer built over it.
#[derive(Debug)]
pub struct EndpointStats {
    /// Stable id (instance id, or address for DNS endpoints).
    pub id: Arc<str>,
    /// Where to connect.
    pub addr: SocketAddr,
    /// Relative weight (1-10000).
    pub weight: u32,
    /// A Wayfinder sidecar fronts it (speak HTTP/2 to it, as between sidecars).
    pub meshed: bool,
    in_flight: AtomicU32,
    ewma: Mutex<Ewma>,
    /// Comparisons peak-EWMA's two choices lost in a row (see [`PROBE_AFTER`]).
    passed_over: AtomicU32,
    /// Picked as a probe: the next latency observed replaces the estimate.
    probing: std::sync::atomic::AtomicBool,
    /// Passive outlier detection state.
    pub outlier: Mutex<crate::resilience::outlier::State>,
    /// `addr` as a URI authority, built once: formatting and parsing it
    /// per request showed in the profile (`bench/README.md`).
    pub authority: Option<hyper::http::uri::Authority>,
    /// This endpoint's latency histogram, looked up once: the metric family
    /// lookup hashed and allocated its labels on every request.
    pub latency: std::sync::OnceLock<prometheus_client::metrics::histogram::Histogram>,
    /// Wakes attempts in flight when discovery says the endpoint is not
    /// serving or gone.
    leaving: tokio::sync::Notify,
    /// When it last joined the rotation (new after the first discovery
    /// answer, or serving again): the start of its slow start. `None` for
    /// an endpoint there from the start.
    joined: Mutex<Option<tokio::time::Instant>>,
}

#[derive(Debug, Clone, Copy)]
struct Ewma {
    /// Latency estimate in nanoseconds.
    cost_ns: f64,
    at: Instant,
    /// Whether any latency was observed (else `cost_ns` is the default).
    measured: bool,
}

/// Latency assumed for an endpoint that has not answered yet: optimistic
/// enough that new endpoints get traffic, as Linkerd's default RTT.
pub const DEFAULT_RTT: Duration = Duration::from_millis(30);
/// Decay time constant of the peak-EWMA estimate.
pub const EWMA_DECAY: Duration = Duration::from_secs(10);
/// Comparisons an endpoint may lose in a row before peak-EWMA picks it
/// anyway, as a probe whose latency replaces its estimate. One latency
/// spike (a GC pause, a busy core) otherwise kept an endpoint out of
/// sequential traffic until its estimate decayed, tens of seconds after
/// the spike was over; a truly slow endpoint costs about one call in
/// 1.5 × this many (with three endpoints; fewer with more).
pub const PROBE_AFTER: u32 = 40;

impl EndpointStats {
    /// Stats for a new endpoint.
    pub fn new(id: impl Into<Arc<str>>, addr: SocketAddr, weight: u32) -> Arc<Self> {
        Self::with_mesh(id, addr, weight, false)
    }

    /// Stats for a new endpoint that may be fronted by a sidecar.
    pub fn with_mesh(
        id: impl Into<Arc<str>>,
        addr: SocketAddr,
        weight: u32,
        meshed: bool,
    ) -> Arc<Self> {
        Arc::new(Self {
            id: id.into(),
            addr,
            weight: weight.max(1),
            meshed,
            in_flight: AtomicU32::new(0),
            passed_over: AtomicU32::new(0),
            probing: std::sync::atomic::AtomicBool::new(false),
            ewma: Mutex::new(Ewma {
                cost_ns: DEFAULT_RTT.as_nanos() as f64,
                at: Instant::now(),
                measured: false,
            }),
            outlier: Mutex::default(),
            authority: hyper::http::uri::Authority::try_from(addr.to_string()).ok(),
            latency: std::sync::OnceLock::new(),
            leaving: tokio::sync::Notify::new(),
            joined: Mutex::new(None),
        })
    }

    /// The endpoint joined the rotation at `now` (discovery added it after
    /// its first answer, or it turned serving or healthy again): its slow
    /// start begins.
    pub fn rejoined(&self, now: tokio::time::Instant) {
        *self.joined.lock().unwrap_or_else(|p| p.into_inner()) = Some(now);
    }

    /// When the endpoint's slow start began, as of `now`: its last join, or
    /// the end of its last ejection if that is later and past.
    pub fn warming_since(&self, now: tokio::time::Instant) -> Option<tokio::time::Instant> {
        let joined = *self.joined.lock().unwrap_or_else(|p| p.into_inner());
        let returned = self
            .outlier
            .lock()
            .ok()
            .and_then(|o| o.ejected_until())
            .filter(|&u| u <= now);
        joined.max(returned)
    }

    /// Requests in flight.
    pub fn in_flight(&self) -> u32 {
        self.in_flight.load(Ordering::Relaxed)
    }

    /// Marks a request started; the guard ends it and records its latency.
    pub fn start(self: &Arc<Self>) -> InFlight {
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        InFlight {
            ep: self.clone(),
            started: Instant::now(),
        }
    }

    /// Records one observed latency, peak-sensitively: a sample slower than
    /// the (decayed) estimate replaces it at once, faster ones pull it down
    /// over [`EWMA_DECAY`]. The first sample blends with the default, as
    /// Linkerd's: the shared prior keeps one early spike from steering
    /// sequential traffic away from an endpoint for seconds.
    pub fn observe(&self, rtt: Duration, now: Instant) {
        let probe = self.probing.swap(false, Ordering::Relaxed);
        let mut e = self.ewma.lock().unwrap_or_else(|p| p.into_inner());
        let rtt = rtt.as_nanos() as f64;
        let w = decay(now.saturating_duration_since(e.at));
        let decayed = e.cost_ns * w;
        e.cost_ns = if rtt > decayed || probe {
            rtt
        } else {
            decayed + rtt * (1.0 - w)
        };
        e.at = now;
        e.measured = true;
    }

    /// Counts a lost comparison; true when it was the [`PROBE_AFTER`]th in
    /// a row, and the endpoint is to be picked as a probe instead.
    pub(crate) fn passed_over(&self) -> bool {
        if self.passed_over.fetch_add(1, Ordering::Relaxed) + 1 < PROBE_AFTER {
            return false;
        }
        self.passed_over.store(0, Ordering::Relaxed);
        self.probing.store(true, Ordering::Relaxed);
        true
    }

    /// Counts a won comparison (a load first: most picks change nothing).
    pub(crate) fn chosen(&self) {
        if self.passed_over.load(Ordering::Relaxed) != 0 {
            self.passed_over.store(0, Ordering::Relaxed);
        }
    }

    /// Completes when discovery retires the endpoint after this call (a
    /// transition, not a state: an endpoint used in panic mode while not
    /// serving does not wake anyone).
    pub fn leaving(&self) -> tokio::sync::futures::Notified<'_> {
        self.leaving.notified()
    }

    /// Discovery says the endpoint is not serving or gone: wakes the
    /// attempts waiting on [`EndpointStats::leaving`].
    pub fn retire(&self) {
        self.leaving.notify_waiters();
    }

    /// Whether outlier detection has the endpoint out of rotation.
    pub fn is_ejected(&self, now: tokio::time::Instant) -> bool {
        self.outlier.lock().is_ok_and(|o| o.is_ejected(now))
    }

    /// The latency estimate at `now`, in nanoseconds: decayed towards zero
    /// for the time since it last changed. An endpoint that is not picked so
    /// looks cheaper as time passes and is tried again (tower's PeakEwma
    /// decays on read the same way); without it, one that lost a comparison
    /// early kept its estimate while the others' fell, and was never picked
    /// again. `None` before the first observation.
    pub fn estimate_ns(&self, now: Instant) -> Option<f64> {
        self.ewma
            .lock()
            .ok()
            .filter(|e| e.measured)
            .map(|e| e.cost_ns * decay(now.saturating_duration_since(e.at)))
    }

    /// [`EndpointStats::estimate_ns`], or the default for an endpoint not
    /// measured yet.
    pub fn cost_ns(&self, now: Instant) -> f64 {
        self.ewma.lock().map_or(DEFAULT_RTT.as_nanos() as f64, |e| {
            e.cost_ns * decay(now.saturating_duration_since(e.at))
        })
    }
}

/// The weight the estimate keeps after `elapsed`: `exp(-elapsed / EWMA_DECAY)`.
fn decay(elapsed: Duration) -> f64 {
    (-elapsed.as_secs_f64() / EWMA_DECAY.as_secs_f64()).exp()
}

/// A request in flight on an endpoint; dropping it ends the request.
#[derive(Debug)]
pub struct InFlight {
    ep: Arc<EndpointStats>,
    started: Instant,
}

impl InFlight {
    /// Ends the request, recording its latency for peak-EWMA.
    pub fn finish(self) {
        self.finish_at(Instant::now());
    }

    /// Ends the request at `now` (a clock the caller read anyway), returning
    /// its latency.
    pub fn finish_at(self, now: Instant) -> Duration {
        let rtt = now.saturating_duration_since(self.started);
        self.ep.observe(rtt, now);
        rtt
    }

    /// Ends the request at `now` without feeding its latency to the
    /// estimate (it measured something else, such as a connection's
    /// handshake), returning it.
    pub fn finish_unobserved_at(self, now: Instant) -> Duration {
        now.saturating_duration_since(self.started)
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.ep.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

/// What a pick may hash on.
#[derive(Debug, Clone, Copy, Default)]
pub struct PickContext {
    /// Hash of the request's key (header or client address) for hash balancers.
    pub key: Option<u64>,
}

/// A first choice followed by every other endpoint once, as indices into the
/// balancer's endpoint slice: first the rest of the first choice's group (a
/// zone, see [`Zoned`]; the whole slice otherwise) in order, then the others.
#[derive(Debug, Clone)]
pub struct Picks {
    first: usize,
    n: usize,
    yielded: usize,
    /// The first choice's group, `lo..hi`.
    lo: usize,
    hi: usize,
    /// Where the rotation over the other groups starts (drawn when reached:
    /// only retries past the group pay for it).
    rest: Option<usize>,
}

impl Picks {
    /// Picks starting at `first` among `n` endpoints (none when `n` is 0).
    pub fn new(first: usize, n: usize) -> Self {
        Self {
            first: if n == 0 { 0 } else { first % n },
            n,
            yielded: 0,
            lo: 0,
            hi: n,
            rest: None,
        }
    }

    /// Picks starting at `first` (within `group`) among `n` endpoints: the
    /// group's endpoints in turn, then the others from a random one on.
    pub fn grouped(first: usize, group: std::ops::Range<usize>, n: usize) -> Self {
        let hi = group.end.min(n);
        let lo = group.start.min(hi);
        if lo == hi {
            return Self::new(first, n);
        }
        Self {
            first: first.clamp(lo, hi - 1),
            n,
            yielded: 0,
            lo,
            hi,
            rest: None,
        }
    }
}

impl Iterator for Picks {
    type Item = usize;
    fn next(&mut self) -> Option<usize> {
        if self.yielded >= self.n {
            return None;
        }
        let len = self.hi - self.lo;
        let k = self.yielded;
        self.yielded += 1;
        if k < len {
            return Some(self.lo + (self.first - self.lo + k) % len);
        }
        let others = self.n - len;
        let from = *self
            .rest
            .get_or_insert_with(|| rand::random_range(0..others));
        Some((self.hi + (from + k - len) % others) % self.n)
    }
}

/// A balancer over a fixed endpoint set.
pub trait Balancer: Send + Sync {
    /// First choice and fallbacks.
    fn pick(&self, ctx: &PickContext) -> Picks;
    /// The endpoints, indexed by the picks.
    fn endpoints(&self) -> &[Arc<EndpointStats>];
    /// Counts a try on endpoint `i` (the locality metric of [`Zoned`]);
    /// nothing for the others.
    fn count_try(&self, _i: usize) {}
}

/// Builds a balancer of `kind` over `endpoints`.
pub fn build(kind: Kind, endpoints: Vec<Arc<EndpointStats>>) -> Box<dyn Balancer> {
    build_with(kind, endpoints, None)
}

/// Builds a balancer of `kind` over `endpoints` whose warming endpoints
/// ramp up over `slow_start` (see [`slow_start`]; hash balancers do not ramp).
pub fn build_with(
    kind: Kind,
    endpoints: Vec<Arc<EndpointStats>>,
    slow_start: Option<Duration>,
) -> Box<dyn Balancer> {
    let ramp = match kind {
        Kind::RingHash | Kind::Maglev => None,
        _ => slow_start
            .and_then(|w| slow_start::Ramp::new(w, &endpoints, tokio::time::Instant::now())),
    };
    match kind {
        Kind::RoundRobin => Box::new(RoundRobin::new(endpoints).ramped(ramp)),
        Kind::WeightedRoundRobin => Box::new(SmoothWeighted::new(endpoints).ramped(ramp)),
        Kind::LeastRequest => Box::new(LeastRequest::new(endpoints).ramped(ramp)),
        Kind::PeakEwma => Box::new(PeakEwma::new(endpoints).ramped(ramp)),
        Kind::RingHash => Box::new(RingHash::new(endpoints)),
        Kind::Maglev => Box::new(Maglev::new(endpoints)),
    }
}

#[cfg(test)]
pub(crate) mod testing {
    use super::*;

    /// `n` endpoints with the given weights.
    pub fn endpoints(weights: &[u32]) -> Vec<Arc<EndpointStats>> {
        // One creation instant for all: the default estimate decays from
        // it, and endpoints made a preempted moment apart would start
        // unequal (on a loaded machine that skew alone starved one).
        let created = Instant::now();
        let eps: Vec<_> = weights
            .iter()
            .enumerate()
            .map(|(i, &w)| {
                EndpointStats::new(
                    format!("ep-{i}"),
                    SocketAddr::from(([127, 0, 0, 1], 10_000 + i as u16)),
                    w,
                )
            })
            .collect();
        for ep in &eps {
            ep.ewma.lock().unwrap_or_else(|p| p.into_inner()).at = created;
        }
        eps
    }

    /// How often each endpoint is the first choice over `n` picks.
    pub fn counts(b: &dyn Balancer, n: usize, key: impl Fn(usize) -> Option<u64>) -> Vec<usize> {
        let mut c = vec![0; b.endpoints().len()];
        for i in 0..n {
            if let Some(first) = b.pick(&PickContext { key: key(i) }).next() {
                c[first] += 1;
            }
        }
        c
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn picks_visit_every_endpoint_once_starting_with_the_first_choice() {
        let p: Vec<_> = Picks::new(2, 4).collect();
        assert_eq!(p, vec![2, 3, 0, 1]);
        assert_eq!(Picks::new(0, 0).count(), 0);
    }

    proptest::proptest! {
        /// Grouped picks start at the first choice, visit its group before
        /// any other endpoint, and every endpoint exactly once.
        #[test]
        fn grouped_picks_visit_the_group_first_then_every_other_once(
            n in 1usize..12, a in 0usize..12, b in 0usize..12, first in 0usize..12,
        ) {
            let (lo, hi) = (a.min(b) % n, (a.max(b) % n) + 1);
            let (lo, hi) = (lo.min(hi - 1), hi);
            let first = lo + first % (hi - lo);
            let p: Vec<_> = Picks::grouped(first, lo..hi, n).collect();
            proptest::prop_assert_eq!(p[0], first);
            proptest::prop_assert!(p[..hi - lo].iter().all(|&i| (lo..hi).contains(&i)));
            let mut sorted = p.clone();
            sorted.sort_unstable();
            proptest::prop_assert_eq!(sorted, (0..n).collect::<Vec<_>>());
        }
    }

    #[test]
    fn peak_ewma_jumps_to_peaks_and_decays_slowly() {
        let ep = EndpointStats::new("a", SocketAddr::from(([127, 0, 0, 1], 1)), 1);
        let t0 = Instant::now();
        ep.observe(Duration::from_millis(500), t0);
        assert_eq!(ep.cost_ns(t0), 500e6);
        let t1 = t0 + Duration::from_secs(1);
        ep.observe(Duration::from_millis(10), t1);
        let after_1s = ep.cost_ns(t1);
        assert!(after_1s > 400e6 && after_1s < 500e6, "{after_1s}");
        let t2 = t0 + Duration::from_secs(60);
        ep.observe(Duration::from_millis(10), t2);
        assert!(ep.cost_ns(t2) < 20e6);
    }

    #[test]
    fn an_estimate_decays_when_read_so_an_idle_endpoint_is_tried_again() {
        let ep = EndpointStats::new("a", SocketAddr::from(([127, 0, 0, 1], 1)), 1);
        let t0 = Instant::now();
        ep.observe(Duration::from_secs(1), t0);
        let cost = |s: u64| ep.cost_ns(t0 + Duration::from_secs(s));
        assert_eq!(cost(0), 1e9);
        assert!(
            (cost(10) - 1e9 / std::f64::consts::E).abs() < 1e3,
            "one time constant"
        );
        assert!(cost(70) < 1e6, "below a 1 ms endpoint after about a minute");
        // A sample above the decayed estimate is a new peak.
        ep.observe(Duration::from_millis(5), t0 + Duration::from_secs(70));
        assert_eq!(cost(70), 5e6);
    }

    #[test]
    fn in_flight_guard_counts_down_on_drop() {
        let ep = EndpointStats::new("a", SocketAddr::from(([127, 0, 0, 1], 1)), 1);
        let g = ep.start();
        let h = ep.start();
        assert_eq!(ep.in_flight(), 2);
        drop(g);
        h.finish();
        assert_eq!(ep.in_flight(), 0);
    }
}
