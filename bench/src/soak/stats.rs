//! Every process's memory, descriptors and CPU time, read from `/proc`
//! every few seconds by role (a process chaos restarts has a new pid and
//! the same role), and what the samples say: first, last, peak, trend.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::watch;

use crate::mesh::Roles;
use crate::{Clock, lock};

/// The role of this program itself: the load generator and the echo servers.
pub const SELF: &str = "soak-bench";

/// One look at one process.
#[derive(Clone, Copy, Debug)]
pub struct Sample {
    /// Seconds since the traffic started.
    pub t: f64,
    /// Which incarnation.
    pub pid: u32,
    /// Resident memory (VmRSS), MiB.
    pub rss_mib: f64,
    /// Open file descriptors.
    pub fds: u32,
    /// CPU time so far (user and system), seconds.
    pub cpu_s: f64,
}

/// Every sample so far, by role.
#[derive(Clone, Default)]
pub struct Samples(Arc<Mutex<BTreeMap<String, Vec<Sample>>>>);

impl Samples {
    /// The newest sample of every role that has one.
    pub fn latest(&self) -> Vec<(String, Sample)> {
        lock(&self.0)
            .iter()
            .filter_map(|(role, s)| Some((role.clone(), *s.last()?)))
            .collect()
    }

    /// Everything, leaving nothing behind.
    pub fn take(&self) -> BTreeMap<String, Vec<Sample>> {
        std::mem::take(&mut *lock(&self.0))
    }
}

/// Samples every running process (and this one) every `every`, until `stop`.
pub async fn sample(
    roles: Roles,
    samples: Samples,
    clock: Clock,
    every: Duration,
    mut stop: watch::Receiver<bool>,
) {
    let hz = wayfinder_tests::clock_ticks();
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop.changed() => return,
        }
        let t = clock.now();
        let me = (SELF.to_string(), Some(std::process::id()));
        let running = roles
            .snapshot()
            .into_iter()
            .map(|(role, live)| (role, live.pid))
            .chain(std::iter::once(me));
        for (role, pid) in running {
            let Some(pid) = pid else { continue };
            if let Some(s) = read(pid, hz, t) {
                lock(&samples.0).entry(role).or_default().push(s);
            }
        }
    }
}

/// `pid`'s RSS, descriptors and CPU time now, or `None` once it is gone.
fn read(pid: u32, hz: f64, t: f64) -> Option<Sample> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let rss_kib: f64 = status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()?;
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd")).ok()?.count() as u32;
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // After the command name (which may hold spaces): utime and stime are
    // fields 14 and 15 of the line, in clock ticks.
    let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    let ticks: u64 = fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?;
    Some(Sample {
        t,
        pid,
        rss_mib: rss_kib / 1024.0,
        fds,
        cpu_s: ticks as f64 / hz,
    })
}

/// Least-squares slope of `(seconds, value)` points, per hour.
pub fn slope_per_hour(points: &[(f64, f64)]) -> Option<f64> {
    let n = points.len() as f64;
    if points.len() < 3 {
        return None;
    }
    let (mx, my) = points
        .iter()
        .fold((0.0, 0.0), |(a, b), (x, y)| (a + x / n, b + y / n));
    let (sxy, sxx) = points.iter().fold((0.0, 0.0), |(a, b), (x, y)| {
        (a + (x - mx) * (y - my), b + (x - mx) * (x - mx))
    });
    (sxx > 0.0).then(|| sxy / sxx * 3600.0)
}

/// A trend: the slope and what it was fitted over.
#[derive(Clone, Copy, Debug)]
pub struct Trend {
    /// Units per hour.
    pub per_hour: f64,
    /// Seconds the fit covers.
    pub span: f64,
    /// Mean of the values fitted.
    pub mean: f64,
}

impl Trend {
    /// Whether the fitted line rises over its span by more than both
    /// `floor` and `share` of the mean: an upward trend, not noise.
    pub fn rises(&self, floor: f64, share: f64) -> bool {
        let rise = self.per_hour * self.span / 3600.0;
        rise > floor && rise > share * self.mean
    }
}

/// What one role's samples say.
pub struct Summary {
    /// Incarnations seen (1 + restarts sampled).
    pub incarnations: usize,
    /// First sample after the warm-up.
    pub first: Option<Sample>,
    /// Last sample.
    pub last: Option<Sample>,
    /// Peak RSS after the warm-up, MiB.
    pub max_rss: f64,
    /// Peak descriptors after the warm-up.
    pub max_fds: u32,
    /// RSS trend (MiB) of the longest-lived incarnation after the warm-up.
    pub rss: Option<Trend>,
    /// Descriptor trend of the same incarnation.
    pub fds: Option<Trend>,
    /// CPU time of every incarnation, seconds.
    pub cpu_s: f64,
}

/// Summarises `samples` (one role's, in time order), trends from `warmup` on.
pub fn summarize(samples: &[Sample], warmup: f64) -> Summary {
    let mut by_pid: Vec<Vec<Sample>> = Vec::new();
    for s in samples {
        match by_pid.last_mut() {
            Some(run) if run[0].pid == s.pid => run.push(*s),
            _ => by_pid.push(vec![*s]),
        }
    }
    let cpu_s = by_pid
        .iter()
        .filter_map(|run| run.last().map(|s| s.cpu_s))
        .sum();
    let after: Vec<Sample> = samples.iter().filter(|s| s.t >= warmup).copied().collect();
    let longest = by_pid
        .iter()
        .map(|run| {
            run.iter()
                .filter(|s| s.t >= warmup)
                .copied()
                .collect::<Vec<_>>()
        })
        .max_by(|a, b| span(a).total_cmp(&span(b)))
        .unwrap_or_default();
    let trend = |value: fn(&Sample) -> f64| {
        let pts: Vec<(f64, f64)> = longest.iter().map(|s| (s.t, value(s))).collect();
        let mean = pts.iter().map(|p| p.1).sum::<f64>() / pts.len().max(1) as f64;
        slope_per_hour(&pts).map(|per_hour| Trend {
            per_hour,
            span: span(&longest),
            mean,
        })
    };
    Summary {
        incarnations: by_pid.len(),
        first: after.first().copied(),
        last: samples.last().copied(),
        max_rss: after.iter().map(|s| s.rss_mib).fold(0.0, f64::max),
        max_fds: after.iter().map(|s| s.fds).max().unwrap_or(0),
        rss: trend(|s| s.rss_mib),
        fds: trend(|s| f64::from(s.fds)),
        cpu_s,
    }
}

/// Seconds from the first to the last of `run`.
fn span(run: &[Sample]) -> f64 {
    match (run.first(), run.last()) {
        (Some(a), Some(b)) => b.t - a.t,
        _ => 0.0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_steady_rise_has_its_slope_and_a_flat_line_none() {
        let rising: Vec<(f64, f64)> = (0..10)
            .map(|i| (f64::from(i) * 360.0, f64::from(i)))
            .collect();
        let s = slope_per_hour(&rising).expect("a slope");
        assert!((s - 10.0).abs() < 1e-9, "{s}");
        let flat: Vec<(f64, f64)> = (0..10).map(|i| (f64::from(i), 5.0)).collect();
        assert_eq!(slope_per_hour(&flat), Some(0.0));
        assert_eq!(slope_per_hour(&flat[..2]), None);
    }

    #[test]
    fn trends_come_from_the_longest_incarnation_after_the_warm_up() {
        let s = |t: f64, pid: u32, rss: f64| Sample {
            t,
            pid,
            rss_mib: rss,
            fds: 10,
            cpu_s: t / 100.0,
        };
        // pid 1 grows, then is replaced by pid 2, which stays flat longer.
        let mut all: Vec<Sample> = (0..5)
            .map(|i| s(f64::from(i) * 10.0, 1, 10.0 + f64::from(i)))
            .collect();
        all.extend((5..20).map(|i| s(f64::from(i) * 10.0, 2, 8.0)));
        let sum = summarize(&all, 20.0);
        assert_eq!(sum.incarnations, 2);
        let rss = sum.rss.expect("a trend");
        assert!(rss.per_hour.abs() < 1e-9, "{}", rss.per_hour);
        assert_eq!(rss.span, 140.0);
        assert_eq!(sum.first.map(|f| f.t), Some(20.0));
        assert_eq!(sum.max_rss, 14.0);
        assert!((sum.cpu_s - (0.4 + 1.9)).abs() < 1e-9);
    }
}
