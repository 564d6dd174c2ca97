//! The soak's report: parameters, a verdict per target, the traffic, every
//! failed call grouped by reason and by whether a chaos window covered it,
//! the chaos events, what the logs said, and per process the first, last
//! and peak RSS and descriptors with their trend; plots of RSS and
//! descriptors over time and of failures with the chaos windows shaded.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use anyhow::Result;
use wayfinder_bench::{machine, svg};

use crate::journal::Said;
use crate::stats::{Summary, summarize};
use crate::traffic::{Failure, Kind, Retry};
use crate::{Args, Outcome};

/// Failed calls listed one by one in the markdown (all of them go to the CSV).
const LISTED: usize = 300;
/// Width of a bar of the failures plot, seconds.
const BIN: f64 = 10.0;
/// Line colours, one per process.
const COLORS: [&str; 16] = [
    "#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f",
    "#bcbd22", "#17becf", "#393b79", "#637939", "#8c6d31", "#843c39", "#7b4173", "#000000",
];

/// Everything the report is made of.
pub struct Run<'a> {
    pub args: &'a Args,
    /// What runs, in one line.
    pub lab: String,
    /// Why there are no etcd replicas, when there are none.
    pub etcd_skipped: Option<String>,
    /// The baseline and variant policies (TOML).
    pub policies: (&'a str, &'a str),
    pub outcome: &'a Outcome,
    pub log_dir: &'a Path,
}

impl Run<'_> {
    /// The event whose window covers failure `f`, if any.
    fn window_of(&self, f: &Failure) -> Option<usize> {
        self.outcome
            .events
            .iter()
            .position(|e| e.covers(f.started, f.ended))
    }
}

/// Writes `soak-DATE.md`, its plots and the failed calls' CSV to `--out-dir`.
pub fn write(run: &Run<'_>) -> Result<PathBuf> {
    let date = machine::date();
    let dir = &run.args.out_dir;
    std::fs::create_dir_all(dir)?;
    let warmup = run.args.warmup_secs();
    let summaries: Vec<(String, Summary)> = run
        .outcome
        .samples
        .iter()
        .map(|(role, s)| (role.clone(), summarize(s, warmup)))
        .collect();
    let mut md = header(run, &date);
    md += &verdicts(run, &summaries, warmup);
    md += &traffic(run);
    md += &failures(run);
    md += &events(run);
    md += &journal(run);
    md += &processes(run, &summaries);
    md += &plots(run, dir, &date)?;
    md += &every_failure(run, dir, &date)?;
    md += &format!(
        "\n## Policies\n\nBaseline (applied before the instances start):\n\n```toml\n{}```\n\n\
         Chaos's change:\n\n```toml\n{}```\n",
        run.policies.0, run.policies.1
    );
    let path = dir.join(format!("soak-{date}.md"));
    std::fs::write(&path, md)?;
    Ok(path)
}

fn header(run: &Run<'_>, date: &str) -> String {
    let a = run.args;
    let o = run.outcome;
    let mut md = format!(
        "# Soak: {:.0} min of mixed traffic with chaos every {} s ({date})\n\n\
         Machine: {}. Everything on loopback on this machine, load generator included.\n\n\
         Lab: {}.{}{}\n\n",
        o.seconds / 60.0,
        a.chaos_every.as_secs(),
        machine::describe(),
        run.lab,
        run.etcd_skipped.as_ref().map_or(String::new(), |why| format!(
            " No etcd ({why}), so no etcd member is stopped and the control plane is one process."
        )),
        if o.interrupted {
            format!(
                "\n\n**Interrupted** after {:.0} s of the {} asked for (an event under way then is not in the report).",
                o.seconds,
                a.duration.as_secs()
            )
        } else {
            String::new()
        },
    );
    md += &format!(
        "Traffic: {} calls/s in all through the client sidecar, a quarter each: HTTP/1.1 `GET /` \
         (keep-alive), HTTP/2 `GET /` (h2c), gRPC `Echo.Say` (unary) to `web`, and TCP to `echo` \
         (a new connection, three line round trips). A call fails on any answer but 2xx / gRPC OK, \
         on an I/O error, or after 10 s.\n\n\
         | parameter | value |\n|---|---|\n\
         | duration | {:.0} s |\n| rate | {} calls/s |\n| chaos every | {} s |\n\
         | down (killed or stopped, policy changed) | {} s |\n| settle (window after an event's end) | {} s |\n\
         | warm-up (left out of trends) | {:.0} s |\n| samples every | {} s |\n\
         | certificate lifetime (renewed at 70%) | {} s |\n| process logs | `{}` |\n\n",
        a.rate,
        o.seconds,
        a.rate,
        a.chaos_every.as_secs(),
        a.down.as_secs(),
        a.settle.as_secs(),
        a.warmup_secs(),
        a.sample_every.as_secs(),
        a.cert_lifetime.as_secs(),
        run.log_dir.display()
    );
    md
}

/// One target's verdict.
struct Verdict {
    target: &'static str,
    met: bool,
    detail: String,
}

fn verdicts(run: &Run<'_>, summaries: &[(String, Summary)], warmup: f64) -> String {
    let o = run.outcome;
    let after = o.seconds - warmup;
    let mut v = vec![
        flat(
            "RSS flat after the warm-up",
            summaries,
            after,
            |s| s.rss,
            (0.5, 0.05),
            "MiB",
        ),
        flat(
            "descriptors flat after the warm-up",
            summaries,
            after,
            |s| s.fds,
            (2.0, 0.10),
            "",
        ),
    ];
    let unserved: usize =
        o.events.iter().map(|e| e.missing.len()).sum::<usize>() + o.last_check.len();
    let lost_leases = o
        .journal
        .iter()
        .filter(|e| e.said == Said::LeaseLost)
        .count();
    v.push(Verdict {
        target: "no lost registration",
        met: unserved == 0 && lost_leases == 0,
        detail: format!(
            "{} checks ({} after chaos windows, one at the end): {unserved} instance(s) not serving \
             on some replica; {lost_leases} lease(s) the control plane lost (sidecar logs)",
            o.events.len() + 1,
            o.events.len()
        ),
    });
    let outside = o
        .record
        .failures
        .iter()
        .filter(|f| run.window_of(f).is_none())
        .count();
    v.push(Verdict {
        target: "failed calls only inside chaos windows",
        met: outside == 0,
        detail: format!(
            "{outside} of {} failed calls outside every window",
            o.record.failures.len()
        ),
    });
    let retryable = o
        .record
        .failures
        .iter()
        .filter(|f| f.retry != Retry::NotAllowed)
        .count();
    v.push(Verdict {
        target: "… and only where no retry was allowed",
        met: retryable == 0,
        detail: format!(
            "{retryable} failed calls the policy allowed a retry for, or whose cause the client \
             cannot tell (see the judgment below)"
        ),
    });
    let mut md = String::from("## Verdicts\n\n| target | met | detail |\n|---|---|---|\n");
    for x in &v {
        let _ = writeln!(
            md,
            "| {} | {} | {} |",
            x.target,
            if x.met { "yes" } else { "**no**" },
            x.detail
        );
    }
    if after < 20.0 * 60.0 {
        let _ = writeln!(
            md,
            "\nThis run had {:.0} min after its warm-up: too short for a trend to say much.",
            after / 60.0
        );
    }
    md += "\nA trend is the least-squares slope of a process's samples after the warm-up, over its \
           longest-lived incarnation; it is judged only for processes whose incarnation covers at \
           least half the time after the warm-up (the others were restarted by chaos: their rows \
           below show each one's first, last and peak). It counts as rising when the fitted line \
           climbs, over its span, by more than 0.5 MiB and 5% of the mean (RSS) or more than 2 \
           descriptors and 10% of the mean.\n\n";
    md
}

/// The flatness verdict of one measure.
fn flat(
    target: &'static str,
    summaries: &[(String, Summary)],
    after: f64,
    trend: fn(&Summary) -> Option<crate::stats::Trend>,
    (floor, share): (f64, f64),
    unit: &str,
) -> Verdict {
    let mut judged = Vec::new();
    let mut rising = Vec::new();
    let mut skipped = Vec::new();
    for (role, s) in summaries {
        match trend(s) {
            Some(t) if t.span >= after / 2.0 => {
                judged.push(role.as_str());
                if t.rises(floor, share) {
                    rising.push(format!("{role} {:+.2}{unit}/h", t.per_hour));
                }
            }
            _ => skipped.push(role.as_str()),
        }
    }
    Verdict {
        target,
        met: rising.is_empty() && !judged.is_empty(),
        detail: format!(
            "judged: {}; rising: {}; restarted by chaos, not judged: {}",
            list(&judged),
            if rising.is_empty() {
                "none".into()
            } else {
                rising.join(", ")
            },
            list(&skipped)
        ),
    }
}

fn list(names: &[&str]) -> String {
    if names.is_empty() {
        "none".into()
    } else {
        names.join(", ")
    }
}

fn traffic(run: &Run<'_>) -> String {
    let mut md = String::from(
        "## Traffic\n\n| kind | calls | ok | failed | ok after a retry | p50 ms | p99 ms | max ms |\n\
         |---|---:|---:|---:|---:|---:|---:|---:|\n",
    );
    for kind in Kind::ALL {
        let Some(t) = run.outcome.record.tally.get(&kind) else {
            continue;
        };
        let mut l = t.latencies_ms.clone();
        l.sort_by(f32::total_cmp);
        let q = |q: f64| {
            l.get(((l.len() as f64 - 1.0) * q).round() as usize)
                .copied()
                .unwrap_or(0.0)
        };
        let _ = writeln!(
            md,
            "| {} | {} | {} | {} | {} | {:.2} | {:.2} | {:.1} |",
            kind.name(),
            t.ok + t.failed,
            t.ok,
            t.failed,
            t.retried_ok,
            q(0.5),
            q(0.99),
            q(1.0)
        );
    }
    md + "\n"
}

fn failures(run: &Run<'_>) -> String {
    let f = &run.outcome.record.failures;
    let mut groups: BTreeMap<(Kind, &str, Retry, bool), usize> = BTreeMap::new();
    for x in f {
        let inside = run.window_of(x).is_some();
        *groups
            .entry((x.kind, x.reason.as_str(), x.retry, inside))
            .or_default() += 1;
    }
    let mut rows: Vec<_> = groups.into_iter().collect();
    rows.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
    let mut md = format!(
        "## Failed calls\n\n{} of {} calls failed.\n\n",
        f.len(),
        run.outcome.record.calls()
    );
    if !rows.is_empty() {
        md += "| kind | reason | retry | in a chaos window | calls |\n|---|---|---|---|---:|\n";
        for ((kind, reason, retry, inside), n) in rows {
            let _ = writeln!(
                md,
                "| {} | {reason} | {} | {} | {n} |",
                kind.name(),
                retry.name(),
                if inside { "yes" } else { "**no**" }
            );
        }
    }
    md += "\nThe retry column judges, from what the client saw (status, `x-wayfinder-error`, \
           `x-wayfinder-attempts`, gRPC status) and the policy in force when the call started, \
           whether the sidecar's retry policy allowed another attempt: *no retry allowed* (a \
           gRPC call, a POST, after a reset or a per-try timeout; no endpoint left; the request's \
           own time up; an answer cut after its headers; a TCP relay cut after its first echo), \
           *retries allowed, all used*, *retry allowed, not made* (budget or breaker), or *cannot \
           tell* (no answer from the client sidecar; a TCP connection closed before its first \
           echo, where a connect the sidecar retries and a relay broken at once look the same). \
           A 504 `timeout` short of the request's deadline counts as retryable, since it may be \
           a connect timeout.\n\n";
    md
}

fn events(run: &Run<'_>) -> String {
    let o = run.outcome;
    let mut md = String::from(
        "## Chaos events\n\n| # | start s | event | took s | window s | failed calls in it | \
         not serving when it closed |\n|---:|---:|---|---:|---|---:|---|\n",
    );
    for (i, e) in o.events.iter().enumerate() {
        let inside = o
            .record
            .failures
            .iter()
            .filter(|f| e.covers(f.started, f.ended))
            .count();
        let what = match &e.error {
            Some(err) => format!("{} — **failed**: {err}", e.what),
            None => e.what.clone(),
        };
        let _ = writeln!(
            md,
            "| {} | {:.1} | {what} | {:.1} | {:.1}–{:.1} | {inside} | {} |",
            i + 1,
            e.started,
            e.ended - e.started,
            e.started,
            e.settled,
            missing(&e.missing)
        );
    }
    let _ = writeln!(
        md,
        "\nAfter the traffic stopped: {}.\n",
        missing(&o.last_check)
    );
    md
}

fn missing(m: &[crate::chaos::Missing]) -> String {
    if m.is_empty() {
        return "all serving".into();
    }
    m.iter()
        .map(|x| {
            let back = x
                .back_after
                .map_or("not back".to_string(), |s| format!("back after {s:.0} s"));
            format!("{} on {}: {} ({back})", x.instance, x.replica, x.state)
        })
        .collect::<Vec<_>>()
        .join("; ")
}

fn journal(run: &Run<'_>) -> String {
    let mut by: BTreeMap<(Said, &str), Vec<f64>> = BTreeMap::new();
    for e in &run.outcome.journal {
        by.entry((e.said, e.role.as_str())).or_default().push(e.t);
    }
    let mut md = String::from("## What the logs said\n\n");
    if by.is_empty() {
        return md + "No certificate renewal, failed renewal or lost lease.\n\n";
    }
    md += "| line | process | times | at s |\n|---|---|---:|---|\n";
    for ((said, role), ts) in &by {
        let at: Vec<String> = ts.iter().map(|t| format!("{t:.0}")).collect();
        let _ = writeln!(
            md,
            "| {} | {role} | {} | {} |",
            said.name(),
            ts.len(),
            at.join(", ")
        );
    }
    md + "\n"
}

fn processes(run: &Run<'_>, summaries: &[(String, Summary)]) -> String {
    let mut md = String::from(
        "## Processes\n\nFirst is the first sample after the warm-up; trends per hour over the \
         longest-lived incarnation after it (its span in minutes); CPU is every incarnation's, \
         in seconds and as a share of one core over the run.\n\n\
         | process | incarnations | RSS MiB first / last / max | RSS trend MiB/h | fds first / \
         last / max | fd trend /h | CPU s | CPU % |\n|---|---:|---|---|---|---|---:|---:|\n",
    );
    for (role, s) in summaries {
        let (f, l) = (s.first, s.last);
        let trend = |t: Option<crate::stats::Trend>| {
            t.map_or("–".to_string(), |t| {
                format!("{:+.2} ({:.0} min)", t.per_hour, t.span / 60.0)
            })
        };
        let _ = writeln!(
            md,
            "| {role} | {} | {} / {} / {:.1} | {} | {} / {} / {} | {} | {:.1} | {:.2} |",
            s.incarnations,
            f.map_or("–".into(), |x| format!("{:.1}", x.rss_mib)),
            l.map_or("–".into(), |x| format!("{:.1}", x.rss_mib)),
            s.max_rss,
            trend(s.rss),
            f.map_or("–".into(), |x| x.fds.to_string()),
            l.map_or("–".into(), |x| x.fds.to_string()),
            s.max_fds,
            trend(s.fds),
            s.cpu_s,
            100.0 * s.cpu_s / run.outcome.seconds
        );
    }
    md + "\n"
}

/// Writes the plots; returns the markdown that shows them.
fn plots(run: &Run<'_>, dir: &Path, date: &str) -> Result<String> {
    let o = run.outcome;
    // Sidecars and apps apart from the bigger control plane and etcd.
    let in_mesh = |role: &str| role.ends_with(".wf-proxy") || role.ends_with(".lab-app");
    let groups = [
        ("mesh", "sidecars and apps", true),
        (
            "control",
            "control plane, etcd and the load generator",
            false,
        ),
    ];
    let markers: Vec<(f64, String)> = o
        .events
        .iter()
        .map(|e| (e.started / 60.0, short(&e.what)))
        .collect();
    let markers: Vec<(f64, &str)> = markers.iter().map(|(x, l)| (*x, l.as_str())).collect();
    let mut md = String::from("## Plots\n\n");
    for (measure, unit, value) in [
        (
            "rss",
            "RSS MiB",
            (|s| s.rss_mib) as fn(&crate::stats::Sample) -> f64,
        ),
        ("fds", "open descriptors", |s| f64::from(s.fds)),
    ] {
        for (group, what, mesh) in groups {
            let lines: Vec<(String, Vec<(f64, f64)>)> = o
                .samples
                .iter()
                .filter(|(role, _)| in_mesh(role) == mesh)
                .map(|(role, s)| {
                    (
                        role.clone(),
                        s.iter().map(|x| (x.t / 60.0, value(x))).collect(),
                    )
                })
                .collect();
            let series: Vec<svg::Series<'_>> = lines
                .iter()
                .zip(COLORS.iter().cycle())
                .map(|((label, points), color)| svg::Series {
                    label,
                    points,
                    color,
                })
                .collect();
            let name = format!("soak-{date}-{measure}-{group}.svg");
            let title = format!("{unit}: {what}");
            std::fs::write(
                dir.join(&name),
                svg::series(&title, "minutes", unit, &series, &markers),
            )?;
            let _ = writeln!(md, "![{title}]({name})\n");
        }
    }
    let name = format!("soak-{date}-failures.svg");
    std::fs::write(dir.join(&name), failures_plot(run, &markers))?;
    let _ = writeln!(md, "![failed calls]({name})\n");
    Ok(md)
}

/// A chaos event's label on the plots.
fn short(what: &str) -> String {
    what.split([',', '('])
        .next()
        .unwrap_or(what)
        .trim()
        .to_string()
}

/// Failed calls per [`BIN`] seconds and kind, chaos windows shaded.
fn failures_plot(run: &Run<'_>, markers: &[(f64, &str)]) -> String {
    let o = run.outcome;
    let bins = (o.seconds / BIN).ceil().max(1.0) as usize;
    let lines: Vec<(Kind, Vec<(f64, f64)>)> = Kind::ALL
        .into_iter()
        .map(|kind| {
            let mut n = vec![0.0; bins];
            for f in o.record.failures.iter().filter(|f| f.kind == kind) {
                let i = ((f.ended / BIN) as usize).min(bins - 1);
                n[i] += 1.0;
            }
            let points = n
                .into_iter()
                .enumerate()
                .map(|(i, c)| (i as f64 * BIN / 60.0, c))
                .collect();
            (kind, points)
        })
        .collect();
    let mut series: Vec<svg::Series<'_>> = lines
        .iter()
        .zip(COLORS)
        .map(|((kind, points), color)| svg::Series {
            label: kind.name(),
            points,
            color,
        })
        .collect();
    // With no failure at all the y axis still needs a height.
    let one = [(0.0, 1.0)];
    if o.record.failures.is_empty() {
        series.push(svg::Series {
            label: "",
            points: &one,
            color: "none",
        });
    }
    let x_max = lines
        .iter()
        .flat_map(|(_, p)| p.iter().map(|q| q.0))
        .fold(1e-9, f64::max);
    let windows: Vec<(f64, f64)> = o
        .events
        .iter()
        .map(|e| (e.started / 60.0, e.settled / 60.0))
        .collect();
    let title = format!("Failed calls per {BIN:.0} s (chaos windows shaded)");
    shade(
        svg::series(&title, "minutes", "failed calls", &series, markers),
        x_max,
        &windows,
    )
}

/// Shades `windows` (x ranges) behind the lines of a plot `svg::series`
/// drew with `x_max` as its largest x. The plot area and the round end of
/// its x axis are `svg::series`'s own, repeated here: it draws no bands.
fn shade(plot: String, x_max: f64, windows: &[(f64, f64)]) -> String {
    const BACKGROUND: &str = "fill=\"white\"/>\n";
    let (left, width, top, height) = (70.0, 630.0, 40.0, 330.0);
    let end = svg::nice(x_max);
    let x = |v: f64| left + v.clamp(0.0, end) / end * width;
    let bands: String = windows
        .iter()
        .map(|(a, b)| {
            format!(
                "<rect x=\"{:.1}\" y=\"{top}\" width=\"{:.1}\" height=\"{height}\" fill=\"#f4c7c3\" opacity=\"0.6\"/>\n",
                x(*a),
                (x(*b) - x(*a)).max(1.0)
            )
        })
        .collect();
    match plot.find(BACKGROUND) {
        Some(i) => {
            let at = i + BACKGROUND.len();
            format!("{}{bands}{}", &plot[..at], &plot[at..])
        }
        None => plot,
    }
}

/// Every failed call: the first [`LISTED`] in the markdown, all in a CSV.
fn every_failure(run: &Run<'_>, dir: &Path, date: &str) -> Result<String> {
    let f = &run.outcome.record.failures;
    let mut sorted: Vec<&Failure> = f.iter().collect();
    sorted.sort_by(|a, b| a.started.total_cmp(&b.started));
    let window = |x: &Failure| {
        run.window_of(x)
            .map_or("none".into(), |i| (i + 1).to_string())
    };
    let mut csv = String::from("started_s,ended_s,kind,reason,attempts,retry,window\n");
    for x in &sorted {
        let _ = writeln!(
            csv,
            "{:.3},{:.3},{},\"{}\",{},{},{}",
            x.started,
            x.ended,
            x.kind.name(),
            x.reason.replace('"', "'"),
            x.attempts.map_or(String::new(), |a| a.to_string()),
            x.retry.name(),
            window(x)
        );
    }
    let name = format!("soak-{date}-failures.csv");
    std::fs::write(dir.join(&name), csv)?;
    let mut md = format!(
        "## Every failed call\n\nAll {} in [`{name}`]({name}){}.\n\n",
        f.len(),
        if f.len() > LISTED {
            format!("; the first {LISTED} here")
        } else {
            String::new()
        }
    );
    if f.is_empty() {
        return Ok(md);
    }
    md += "| start s | end s | kind | reason | attempts | retry | window |\n\
           |---:|---:|---|---|---:|---|---:|\n";
    for x in sorted.iter().take(LISTED) {
        let _ = writeln!(
            md,
            "| {:.2} | {:.2} | {} | {} | {} | {} | {} |",
            x.started,
            x.ended,
            x.kind.name(),
            x.reason,
            x.attempts.map_or("–".to_string(), |a| a.to_string()),
            x.retry.name(),
            window(x)
        );
    }
    Ok(md)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn windows_are_shaded_behind_the_lines() {
        let pts = [(0.0, 0.0), (4.0, 2.0)];
        let plot = svg::series(
            "t",
            "x",
            "y",
            &[svg::Series {
                label: "a",
                points: &pts,
                color: "#000",
            }],
            &[],
        );
        let shaded = shade(plot, 4.0, &[(1.0, 2.0)]);
        let band = shaded.find("#f4c7c3").expect("a band");
        assert!(band < shaded.find("<polyline").expect("a line"));
        // x = 1 of 4 is a quarter of the way across the 630 px plot area.
        assert!(shaded.contains("x=\"227.5\""), "{shaded}");
    }

    #[test]
    fn event_labels_are_their_first_clause() {
        assert_eq!(
            short("kill -9 web-2 (app and sidecar), started again 5 s later"),
            "kill -9 web-2"
        );
    }
}
