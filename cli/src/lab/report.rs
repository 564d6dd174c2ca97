//! The comparison's report: markdown tables, and plots beside them
//! (failures and p99 over time with the events drawn in, latency CDF).

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};

use super::scenario::Scenario;
use super::svg;
use super::timeline::{Run, Window};

/// What the report says about where it ran.
pub struct Setting<'a> {
    /// "on loopback (...)" or "on Docker (compose file ...)".
    pub place: String,
    /// The scenario.
    pub scenario: &'a Scenario,
    /// Notes on how the ways were set up (one paragraph each).
    pub notes: Vec<String>,
}

fn cell(w: &Window) -> String {
    match (w.errors, w.recovered_ms) {
        (0, _) => "0".into(),
        (n, Some(ms)) => format!("{n} · {}", seconds(ms)),
        (n, None) => format!("{n} · never"),
    }
}

fn seconds(ms: f64) -> String {
    if ms < 1000.0 {
        format!("{ms:.0} ms")
    } else {
        format!("{:.1} s", ms / 1000.0)
    }
}

/// The markdown for `run`.
pub fn markdown(setting: &Setting<'_>, run: &Run) -> String {
    let sc = setting.scenario;
    let mut s = String::new();
    let _ = writeln!(
        s,
        "# DNS vs nginx vs mesh: the same calls, the same events\n"
    );
    let _ = writeln!(
        s,
        "{}, {}, on {}.\n",
        super::machine::date(),
        setting.place,
        super::machine::describe()
    );
    let _ = writeln!(
        s,
        "Scenario `{}`: every way at once, {} requests per second each (open loop) for {} s; \
         a request fails on an error, a status other than 200, or after {} ms.\n",
        sc.file,
        sc.rate,
        sc.duration.as_secs(),
        sc.timeout.as_millis()
    );
    for n in &setting.notes {
        let _ = writeln!(s, "{n}\n");
    }
    let _ = writeln!(s, "## Totals\n");
    let _ = writeln!(s, "| way | requests | failed | p50 | p90 | p99 |");
    let _ = writeln!(s, "|---|---:|---:|---:|---:|---:|");
    for &w in &run.ways {
        let t = run.totals(w);
        let _ = writeln!(
            s,
            "| {} | {} | {} ({:.1}%) | {:.1} ms | {:.1} ms | {:.1} ms |",
            w.label(),
            t.requests,
            t.failed,
            t.failed as f64 * 100.0 / t.requests.max(1) as f64,
            t.p50,
            t.p90,
            t.p99
        );
    }
    let extra: Vec<String> = run
        .ways
        .iter()
        .filter_map(|&w| {
            let e = run.extra_tries(w)?;
            Some(format!(
                "{}: {} in {} calls ({:.1}%)",
                w.label(),
                e.tries,
                e.calls,
                e.calls as f64 * 100.0 / run.totals(w).requests.max(1) as f64
            ))
        })
        .collect();
    if !extra.is_empty() {
        let _ = writeln!(
            s,
            "\nTries beyond the first, as the client's sidecar counted them \
             (`x-wayfinder-attempts`: hedged copies and retries): {}.",
            extra.join("; ")
        );
    }
    let _ = writeln!(
        s,
        "\n## Each event: failed requests · until calls stopped failing\n"
    );
    let _ = write!(s, "| at | event |");
    for &w in &run.ways {
        let _ = write!(s, " {} |", w.label());
    }
    let _ = write!(s, "\n|---:|---|");
    for _ in &run.ways {
        let _ = write!(s, "---:|");
    }
    let _ = writeln!(s);
    for (i, f) in run.fired.iter().enumerate() {
        let label = match &f.error {
            None => f.event.label(),
            Some(e) => format!("{} (failed: {e})", f.event.label()),
        };
        let _ = write!(s, "| {:.1} s | {label} |", f.at);
        for &w in &run.ways {
            let _ = write!(s, " {} |", cell(&run.during(w, i)));
        }
        let _ = writeln!(s);
    }
    let _ = writeln!(
        s,
        "\nA window runs from its event to the next one (the last to the end of the run); a \
         request counts for the window it ended in. \"Until calls stopped failing\" runs from \
         the event to the end of the last failed request of the window; \"never\": requests \
         sent in the window's last tenth still failed.\n\n\
         ![failed requests per second](failures.svg)\n\n![p99 per second](p99.svg)\n\n\
         ![latency CDF](latency.svg)\n"
    );
    let _ = writeln!(
        s,
        "## Who answered: share of each way's calls per instance, per phase\n"
    );
    let instances = run.instances();
    for &w in &run.ways {
        let _ = writeln!(s, "### {}\n", w.label());
        let _ = write!(s, "| phase |");
        for i in &instances {
            let _ = write!(s, " {i} |");
        }
        let _ = write!(s, "\n|---|");
        for _ in &instances {
            let _ = write!(s, "---:|");
        }
        let _ = writeln!(s);
        for (label, from, to) in run.phases() {
            let shares = run.shares(w, from, to);
            let _ = write!(s, "| {label} |");
            for i in &instances {
                let _ = match shares.get(i) {
                    Some(p) => write!(s, " {p:.0}% |"),
                    None => write!(s, " · |"),
                };
            }
            let _ = writeln!(s);
        }
        let _ = writeln!(s);
    }
    s
}

/// The few lines printed when the run ends.
fn summary(run: &Run) -> String {
    let mut s = String::new();
    for &w in &run.ways {
        let t = run.totals(w);
        let worst = (0..run.fired.len())
            .map(|i| (i, run.during(w, i)))
            .max_by_key(|(_, win)| win.errors)
            .filter(|(_, win)| win.errors > 0)
            .map(|(i, win)| format!("; worst: {} ({})", run.fired[i].event.label(), cell(&win)))
            .unwrap_or_default();
        let _ = writeln!(
            s,
            "   {:<40} {:>6} failed of {:<6} p99 {:>7.1} ms{worst}",
            w.label(),
            t.failed,
            t.requests,
            t.p99
        );
    }
    s
}

/// Writes `report.md`, `failures.svg`, `p99.svg` and `latency.svg` into
/// `out`, and prints the summary.
pub fn write(out: &Path, setting: &Setting<'_>, run: &Run) -> Result<PathBuf> {
    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    let labels: Vec<String> = run.fired.iter().map(|f| f.event.label()).collect();
    let markers: Vec<(f64, &str)> = run
        .fired
        .iter()
        .zip(&labels)
        .map(|(f, l)| (f.at, l.as_str()))
        .collect();
    let plot = |title: &str, y: &str, series: &dyn Fn(super::load::Way) -> Vec<(f64, f64)>| {
        let points: Vec<_> = run.ways.iter().map(|&w| (w, series(w))).collect();
        let lines: Vec<svg::Series<'_>> = points
            .iter()
            .map(|(w, p)| svg::Series {
                label: w.label(),
                points: p,
                color: w.color(),
            })
            .collect();
        svg::series(title, "seconds", y, &lines, &markers)
    };
    std::fs::write(
        out.join("failures.svg"),
        plot("Failed requests over time", "failed per second", &|w| {
            run.failures_per_second(w)
        }),
    )?;
    std::fs::write(
        out.join("p99.svg"),
        plot("p99 latency over time", "p99 of each second (ms)", &|w| {
            run.p99_per_second(w)
        }),
    )?;
    let latencies: Vec<(super::load::Way, Vec<f64>)> = run
        .ways
        .iter()
        .map(|&w| {
            let mut v: Vec<f64> = run
                .samples
                .iter()
                .filter(|s| s.way == w)
                .map(|s| s.ms)
                .collect();
            v.sort_by(f64::total_cmp);
            (w, v)
        })
        .collect();
    let curves: Vec<svg::Curve<'_>> = latencies
        .iter()
        .map(|(w, l)| svg::Curve {
            label: w.label(),
            sorted_ms: l,
            color: w.color(),
        })
        .collect();
    std::fs::write(
        out.join("latency.svg"),
        svg::cdf("Latency of every request (CDF)", &curves),
    )?;
    let path = out.join("report.md");
    std::fs::write(&path, markdown(setting, run))
        .with_context(|| format!("writing {}", path.display()))?;
    eprintln!("{}", summary(run));
    Ok(path)
}
