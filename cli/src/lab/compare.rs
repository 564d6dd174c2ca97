//! `wfctl lab compare`: one scenario, every way to find `web` at once.
//!
//! A lab (loopback processes, or the containers of a compose file) serves
//! `web` from web1..3. The load sends the same open-loop stream of calls
//! through each way: DNS resolved once, per request, cached for its TTL and
//! for 30 s, the nginx upstream, the mesh, and the mesh with hedging (its
//! route in [`hedging`](super::hedging)). The scenario's events (kill,
//! pause, restart with a new IP, slow, unhealthy, add, control plane down
//! and up) act on the lab at their times, to every way at the same moment;
//! the report reads the samples along that timeline.
//!
//! A request goes: [`load`](super::load) picks the address as its way does
//! and calls it; the lab ([`loopback`](super::loopback) or
//! [`docker`](super::docker)) does the events; [`timeline`](super::timeline)
//! measures; [`report`](super::report) writes.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Result;

use super::load::{Sample, Way};
use super::scenario::{Event, Scenario, ScenarioError};
use super::timeline::{Fired, Run};

/// What to run.
#[derive(Debug, Clone)]
pub struct Config {
    /// The scenario.
    pub scenario: Scenario,
    /// The ways, in report order.
    pub ways: Vec<Way>,
    /// Where the report goes.
    pub out: PathBuf,
    /// Where wf-control, wf-proxy and lab-app are (loopback).
    pub bin_dir: PathBuf,
    /// nginx, when installed (loopback).
    pub nginx: Option<PathBuf>,
}

/// A lab the comparison drives: the seam between the loopback processes
/// and the Docker containers.
pub(crate) trait Lab {
    /// Does `event` to the lab.
    async fn act(&mut self, event: &Event) -> Result<()>;
}

/// Checks every event's target against the instances a lab has (and those
/// the scenario adds), before anything starts.
pub fn check_targets(sc: &Scenario, instances: &[String]) -> Result<(), ScenarioError> {
    let mut known: Vec<String> = instances.to_vec();
    for e in &sc.events {
        if e.target.is_empty() {
            continue;
        }
        let exists = known.contains(&e.target);
        match (&e.action, exists) {
            (super::scenario::Action::Add, true) => {
                return Err(sc.error_at(
                    e,
                    "target",
                    format!("{:?} exists already: add names a new instance", e.target),
                ));
            }
            (super::scenario::Action::Add, false) => known.push(e.target.clone()),
            (_, false) => {
                return Err(sc.error_at(
                    e,
                    "target",
                    format!(
                        "the lab has no instance {:?} (it has {})",
                        e.target,
                        known.join(", ")
                    ),
                ));
            }
            (_, true) => {}
        }
    }
    Ok(())
}

/// Samples as they arrive, shared by the collector and the progress lines.
#[derive(Clone, Default)]
pub(crate) struct Samples(Arc<Mutex<Vec<Sample>>>);

impl Samples {
    /// Adds one.
    pub fn push(&self, s: Sample) {
        if let Ok(mut v) = self.0.lock() {
            v.push(s);
        }
    }

    /// How many so far, and how many failed, per way.
    fn counts(&self, ways: &[Way]) -> Vec<(Way, usize, usize)> {
        let v = self.0.lock().map(|v| v.clone()).unwrap_or_default();
        ways.iter()
            .map(|&w| {
                let of = v.iter().filter(|s| s.way == w);
                (w, of.clone().count(), of.filter(|s| !s.ok).count())
            })
            .collect()
    }

    /// All of them.
    pub fn take(&self) -> Vec<Sample> {
        self.0
            .lock()
            .map(|mut v| std::mem::take(&mut *v))
            .unwrap_or_default()
    }
}

/// The line that says what the load is about to do, `from` where.
pub(crate) fn announce_load(cfg: &Config, from: &str) {
    let ways: Vec<&str> = cfg.ways.iter().map(|w| w.key()).collect();
    eprintln!(
        "== load: {} at {} requests per second each for {} s{from}",
        ways.join(", "),
        cfg.scenario.rate,
        cfg.scenario.duration.as_secs()
    );
}

/// Fires the scenario's events at their times from `start` while the load
/// runs, printing progress; returns what happened, once the load's time
/// (and its last timeout) is over.
pub(crate) async fn drive<L: Lab>(
    lab: &mut L,
    cfg: &Config,
    start: Instant,
    samples: &Samples,
) -> Vec<Fired> {
    let sc = &cfg.scenario;
    let mut fired = Vec::new();
    let mut shown = 0;
    let progress = |at: f64, shown: &mut u64| {
        let tenth = (at / sc.duration.as_secs_f64() * 10.0).floor() as u64;
        if tenth > *shown && tenth <= 10 {
            *shown = tenth;
            let counts: Vec<String> = samples
                .counts(&cfg.ways)
                .into_iter()
                .map(|(w, n, f)| format!("{} {f}/{n}", w.key()))
                .collect();
            eprintln!(
                "   {:>3}%  {at:>5.1} s  failed/sent: {}",
                tenth * 10,
                counts.join(", ")
            );
        }
    };
    for event in &sc.events {
        let due = start + event.at;
        while Instant::now() < due {
            progress(start.elapsed().as_secs_f64(), &mut shown);
            tokio::time::sleep(
                due.saturating_duration_since(Instant::now())
                    .min(Duration::from_millis(250)),
            )
            .await;
        }
        let at = start.elapsed().as_secs_f64();
        let error = lab.act(event).await.err().map(|e| format!("{e:#}"));
        match &error {
            None => eprintln!("   ...    {at:>5.1} s  {}", event.label()),
            Some(e) => eprintln!("   ...    {at:>5.1} s  {} FAILED: {e}", event.label()),
        }
        fired.push(Fired {
            event: event.clone(),
            at,
            error,
        });
    }
    let end = start + sc.duration + sc.timeout + Duration::from_millis(200);
    while Instant::now() < end {
        progress(start.elapsed().as_secs_f64(), &mut shown);
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    fired
}

/// The run, once the load is over.
pub(crate) fn finish(cfg: &Config, samples: &Samples, fired: Vec<Fired>) -> Run {
    let mut samples = samples.take();
    samples.sort_by(|a, b| a.at.total_cmp(&b.at));
    Run {
        ways: cfg.ways.clone(),
        samples,
        fired,
        seconds: cfg.scenario.duration.as_secs_f64(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets_must_exist_and_added_ones_must_be_new() {
        let sc = |events: &str| {
            Scenario::parse("s.toml", &format!("duration = \"60s\"\n{events}")).expect("parses")
        };
        let have = ["web1".to_string(), "web2".into(), "web3".into()];
        let ok = sc(
            "[[event]]\nat = \"10%\"\naction = \"add\"\ntarget = \"web4\"\n\
             [[event]]\nat = \"20%\"\naction = \"kill\"\ntarget = \"web4\"\n",
        );
        assert_eq!(check_targets(&ok, &have), Ok(()));
        let e = check_targets(
            &sc("[[event]]\nat = \"10%\"\naction = \"kill\"\ntarget = \"web9\"\n"),
            &have,
        )
        .expect_err("no web9");
        assert_eq!(e.line, 5);
        assert!(
            e.to_string()
                .starts_with("s.toml:5: field event[0].target: the lab has no instance \"web9\""),
            "{e}"
        );
        let e = check_targets(
            &sc("[[event]]\nat = \"10%\"\naction = \"add\"\ntarget = \"web2\"\n"),
            &have,
        )
        .expect_err("web2 exists");
        assert!(e.message.contains("exists already"), "{e}");
        // Named by its place in the file, not in time order.
        let e = check_targets(
            &sc(
                "[[event]]\nat = \"50%\"\naction = \"kill\"\ntarget = \"web9\"\n\
                 [[event]]\nat = \"10%\"\naction = \"kill\"\ntarget = \"web1\"\n",
            ),
            &have,
        )
        .expect_err("no web9");
        assert_eq!((e.line, e.field.as_str()), (5, "event[0].target"), "{e}");
    }
}
