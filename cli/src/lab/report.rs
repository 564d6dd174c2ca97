//! The comparison's report: a markdown table and two plots next to it.

use std::fmt::Write as _;
use std::path::PathBuf;

use anyhow::{Context, Result};

use super::compare::{self, Config, Outcome, Row};
use super::svg;

fn ms(v: Option<f64>, never: &str) -> String {
    match v {
        Some(v) => format!("{v:.0} ms"),
        None => never.to_string(),
    }
}

/// The markdown for `rows`.
pub fn markdown(cfg: &Config, rows: &[Row]) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "# DNS vs balancer vs mesh\n");
    let _ = writeln!(
        s,
        "{}, on {} (every process on this machine, over loopback).\n",
        super::machine::date(),
        super::machine::describe()
    );
    let _ = writeln!(
        s,
        "{} requests per way at concurrency {}, `GET /` to lab-app instances of `web` on \
         127.0.0.11-14. At 40% of the requests web-2 is killed (its DNS record goes away, as \
         Docker's does); at 55% web-1 vanishes: every packet to or from it is dropped and its \
         processes stop, as when a container's network namespace goes (no FIN, no RST, no \
         heartbeat; its record goes away too); at \
         70% web-3 answers {} ms slower; at 85% web-4 starts (its record appears). A request \
         fails on an error, a status other than 200, or after 2 s. nginx runs with its \
         defaults (`proxy_connect_timeout` and `proxy_read_timeout` 60 s).\n",
        cfg.requests,
        cfg.concurrency,
        cfg.slow.as_millis()
    );
    let _ = writeln!(
        s,
        "| way | failed | p50 | p90 | p99 | web-1 | web-2 | web-3 | web-4 | rerouted around web-2 after | rerouted around web-1 after | web-4 took traffic after |"
    );
    let _ = writeln!(
        s,
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
    );
    for r in rows {
        let n = |i: &str| r.per_instance.get(i).copied().unwrap_or(0);
        let _ = writeln!(
            s,
            "| {} | {} of {} | {:.1} ms | {:.1} ms | {:.1} ms | {} | {} | {} | {} | {} | {} | {} |",
            r.label,
            r.failed,
            r.requests,
            r.p50,
            r.p90,
            r.p99,
            n("web-1"),
            n("web-2"),
            n("web-3"),
            n("web-4"),
            ms(r.reroute_ms, "never (still failing)"),
            match r.vanish_ms {
                Some(v) => ms(v, "never (failing at the end)"),
                None => "skipped (needs root and iptables)".to_string(),
            },
            ms(r.new_instance_ms, "never"),
        );
    }
    let _ = writeln!(
        s,
        "\n\"Rerouted after\" runs from the event to the end of the last failed request that \
         ended before the next event (for web-1, before the end of the run); 0 ms means none \
         failed, \"never\" that requests sent in the last tenth of that window still failed.\n\n![failed requests](failures.svg)\n\n![latency](latency.svg)"
    );
    s
}

/// Writes `report.md`, `failures.svg` and `latency.svg` into `cfg.out`.
pub fn write(cfg: &Config, outcomes: &[Outcome]) -> Result<PathBuf> {
    let rows: Vec<Row> = outcomes.iter().map(Outcome::row).collect();
    let failures: Vec<Vec<(f64, f64)>> =
        outcomes.iter().map(compare::failures_by_progress).collect();
    let lines: Vec<svg::Series<'_>> = outcomes
        .iter()
        .zip(&failures)
        .map(|(o, pts)| svg::Series {
            label: &o.label,
            points: pts,
            color: compare::color(o),
        })
        .collect();
    let plot = svg::series(
        "Failed requests over the run",
        "progress (% of requests)",
        "failed requests per 2%",
        &lines,
        &compare::events(outcomes),
    );
    std::fs::write(cfg.out.join("failures.svg"), plot)?;
    let latencies: Vec<Vec<f64>> = outcomes.iter().map(compare::sorted_ms).collect();
    let curves: Vec<svg::Curve<'_>> = outcomes
        .iter()
        .zip(&latencies)
        .map(|(o, l)| svg::Curve {
            label: &o.label,
            sorted_ms: l,
            color: compare::color(o),
        })
        .collect();
    std::fs::write(
        cfg.out.join("latency.svg"),
        svg::cdf("Latency of every request (CDF)", &curves),
    )?;
    let path = cfg.out.join("report.md");
    std::fs::write(&path, markdown(cfg, &rows))
        .with_context(|| format!("writing {}", path.display()))?;
    Ok(path)
}
