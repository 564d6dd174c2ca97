//! Retry budget, as Linkerd's and Finagle's: retries may add at most a share
//! of the requests seen over a sliding window, plus a small number per
//! second that is always allowed so a quiet service can still retry. When a
//! whole service fails, the budget keeps retries from multiplying its load.

use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;

/// Length of the window over which requests and retries are compared.
pub const WINDOW: Duration = Duration::from_secs(10);
const SLOTS: usize = 10;

#[derive(Debug, Default, Clone, Copy)]
struct Slot {
    /// Which second since `start` this slot holds.
    second: u64,
    requests: u64,
    /// Retries paid from the ratio share.
    ratio_retries: u64,
    /// Retries paid from the per-second minimum.
    min_retries: u64,
}

/// A retry budget over a 10 s window in 1 s slots.
#[derive(Debug)]
pub struct RetryBudget {
    start: Instant,
    slots: Mutex<[Slot; SLOTS]>,
}

impl Default for RetryBudget {
    fn default() -> Self {
        Self::new()
    }
}

impl RetryBudget {
    /// An empty budget.
    pub fn new() -> Self {
        Self {
            start: Instant::now(),
            slots: Mutex::new([Slot::default(); SLOTS]),
        }
    }

    fn with_slot<R>(&self, f: impl FnOnce(&mut [Slot; SLOTS], usize, u64) -> R) -> R {
        let second = Instant::now()
            .saturating_duration_since(self.start)
            .as_secs();
        let i = (second % SLOTS as u64) as usize;
        let mut slots = self.slots.lock().unwrap_or_else(|p| p.into_inner());
        if slots[i].second != second {
            slots[i] = Slot {
                second,
                ..Slot::default()
            };
        }
        f(&mut slots, i, second)
    }

    /// Records an original request (not a retry).
    pub fn deposit(&self) {
        self.with_slot(|slots, i, _| slots[i].requests += 1);
    }

    /// Takes one retry from the budget; false when it is spent. The
    /// per-second minimum is used first, then `ratio` of the window's
    /// requests, so retries never exceed
    /// `min_per_sec` per second plus `ratio` × requests.
    pub fn withdraw(&self, ratio: f64, min_per_sec: u32) -> bool {
        self.with_slot(|slots, i, second| {
            if slots[i].min_retries < u64::from(min_per_sec) {
                slots[i].min_retries += 1;
                return true;
            }
            let live = slots
                .iter()
                .filter(|s| s.second + (SLOTS as u64) > second && s.second <= second);
            let (requests, retries) = live.fold((0u64, 0u64), |(r, t), s| {
                (r + s.requests, t + s.ratio_retries)
            });
            if ((retries + 1) as f64) <= ratio * requests as f64 {
                slots[i].ratio_retries += 1;
                true
            } else {
                false
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn retries_stay_within_ratio_of_requests_plus_the_minimum() {
        let b = RetryBudget::new();
        let mut granted = 0;
        // 100 requests, each wanting a retry, within one second.
        for _ in 0..100 {
            b.deposit();
            if b.withdraw(0.2, 10) {
                granted += 1;
            }
        }
        assert!(granted <= 10 + 20, "{granted}");
        assert!(granted >= 28, "the budget should be used: {granted}");
    }

    #[tokio::test(start_paused = true)]
    async fn the_minimum_refills_every_second_and_the_window_forgets() {
        let b = RetryBudget::new();
        for _ in 0..5 {
            assert!(b.withdraw(0.2, 5));
        }
        assert!(!b.withdraw(0.2, 5), "no requests, minimum spent");
        tokio::time::advance(Duration::from_secs(1)).await;
        assert!(b.withdraw(0.2, 5), "a new second, a new minimum");

        // Requests long ago no longer pay for retries.
        let b = RetryBudget::new();
        for _ in 0..100 {
            b.deposit();
        }
        tokio::time::advance(WINDOW + Duration::from_secs(1)).await;
        assert!(!b.withdraw(0.2, 0));
    }

    #[tokio::test(start_paused = true)]
    async fn a_zero_budget_never_retries() {
        let b = RetryBudget::new();
        b.deposit();
        assert!(!b.withdraw(0.0, 0));
    }

    proptest::proptest! {
        #[test]
        fn never_more_than_the_bound(requests in 0u64..2000, ratio in 0.0f64..1.0, min in 0u32..50) {
            let rt = tokio::runtime::Builder::new_current_thread().enable_time().start_paused(true).build().expect("runtime");
            rt.block_on(async {
                let b = RetryBudget::new();
                let mut granted = 0u64;
                for _ in 0..requests {
                    b.deposit();
                    if b.withdraw(ratio, min) { granted += 1; }
                }
                let bound = (ratio * requests as f64).floor() as u64 + u64::from(min);
                proptest::prop_assert!(granted <= bound, "{} > {}", granted, bound);
                Ok(())
            })?;
        }
    }
}
