//! Gives freed heap back to the system once the sidecar goes quiet.
//!
//! glibc keeps what a burst of traffic freed in its arenas: a sidecar that
//! served a load test stays ~2.5 MiB above a fresh one for as long as it
//! idles (bench/README.md). `malloc_trim(0)` hands those pages back. It walks
//! and locks every arena, so it runs only when the process has been idle for
//! a whole interval (by its own CPU time), once per quiet period, on a
//! blocking thread. Envoy's overload manager has the same action
//! (`shrink_heap`).

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

/// How long the sidecar must be quiet before the heap is trimmed.
const INTERVAL: Duration = Duration::from_secs(5);
/// CPU time per interval under which the sidecar counts as quiet (two
/// clock ticks, 0.4%).
const QUIET_CPU: Duration = Duration::from_millis(20);

/// Set when something let go of a lot of memory while the sidecar was
/// quiet (pooled connections timing out after the traffic ended), so the
/// next quiet interval trims even though nothing was busy.
static FREED: AtomicBool = AtomicBool::new(false);

/// Tells the trimmer that memory worth returning was freed.
pub fn freed() {
    FREED.store(true, Ordering::Relaxed);
}

/// Whether this interval trims: after a busy period, at the first quiet
/// interval, or when memory was freed while quiet. `trimmed` is whether the
/// last busy period has been trimmed already.
fn should_trim(busy: bool, trimmed: &mut bool, freed: bool) -> bool {
    if busy {
        *trimmed = false;
        return false;
    }
    let trim = !*trimmed || freed;
    *trimmed = true;
    trim
}

/// Trims the heap after each busy period, once the process is quiet.
pub async fn trim_when_idle() {
    let mut tick = tokio::time::interval(INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last = cpu_time();
    let mut trimmed = true;
    loop {
        tick.tick().await;
        let now = cpu_time();
        let (Some(before), Some(after)) = (last, now) else {
            return; // No /proc: nothing to measure by.
        };
        last = now;
        let busy = after.saturating_sub(before) >= QUIET_CPU;
        // While busy a freed() stays pending: the trim after the busy
        // period covers it.
        let freed = !busy && FREED.swap(false, Ordering::Relaxed);
        if should_trim(busy, &mut trimmed, freed) {
            let released = tokio::task::spawn_blocking(release).await.unwrap_or(false);
            tracing::debug!(released, "heap trimmed");
            // The trim itself used CPU time: do not count it as traffic.
            last = cpu_time();
        }
    }
}

/// The whole process's time on CPU so far, every thread counted: user plus
/// system time from `/proc/self/stat`, in clock ticks (USER_HZ, 100 a second
/// on Linux).
fn cpu_time() -> Option<Duration> {
    let text = std::fs::read_to_string("/proc/self/stat").ok()?;
    // The command name (field 2) may hold spaces: count from after it.
    let mut fields = text.get(text.rfind(')')? + 1..)?.split_whitespace();
    let utime: u64 = fields.nth(11)?.parse().ok()?;
    let stime: u64 = fields.next()?.parse().ok()?;
    Some(Duration::from_millis((utime + stime) * 10))
}

/// Asks glibc to return the free pages of every arena; whether it did.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
#[allow(unsafe_code)]
fn release() -> bool {
    // SAFETY: malloc_trim takes no pointers and glibc serialises it with every
    // other allocator call; it only returns free pages to the kernel.
    unsafe { libc::malloc_trim(0) == 1 }
}

/// Other allocators (musl) return memory themselves or have no such call.
#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn release() -> bool {
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn trims_once_per_busy_period_and_when_memory_was_freed_while_quiet() {
        let mut trimmed = true;
        // Quiet from the start: nothing to give back.
        assert!(!should_trim(false, &mut trimmed, false));
        // Busy for two intervals, then quiet: one trim, then none.
        assert!(!should_trim(true, &mut trimmed, false));
        assert!(!should_trim(true, &mut trimmed, false));
        assert!(should_trim(false, &mut trimmed, false));
        assert!(!should_trim(false, &mut trimmed, false));
        // Connections timed out while quiet: one more trim.
        assert!(should_trim(false, &mut trimmed, true));
        assert!(!should_trim(false, &mut trimmed, false));
    }

    #[test]
    fn cpu_time_grows_with_work() {
        let Some(before) = cpu_time() else {
            return; // Not Linux.
        };
        // Busy on this (non-main) thread until the process's clock moves:
        // every thread counts. Bounded: a clock tick is 10 ms.
        let started = std::time::Instant::now();
        let mut x = 0u64;
        while cpu_time().is_some_and(|t| t <= before) {
            for i in 0..1_000_000u64 {
                x = x.wrapping_add(i * i);
            }
            assert!(
                started.elapsed() < Duration::from_secs(10),
                "CPU time did not move"
            );
        }
        std::hint::black_box(x);
    }
}
