//! The labs users run: `wfctl lab compare` on loopback, and the Docker
//! compose lab where a Docker engine exists.

use std::time::Duration;

use anyhow::{Context, Result};
use wayfinder_tests::bin;

#[tokio::test]
async fn lab_compare_reports_every_way_with_numbers() -> Result<()> {
    let out = tempfile::tempdir()?;
    let run = tokio::process::Command::new(bin("wfctl"))
        .args(["lab", "compare", "--requests", "600", "--concurrency", "8"])
        .arg("--out")
        .arg(out.path())
        .kill_on_drop(true)
        .output();
    let run = tokio::time::timeout(Duration::from_secs(120), run)
        .await
        .context("lab compare within 120 s")??;
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert!(run.status.success(), "{stderr}");
    // Progress was shown for each way.
    assert!(
        stderr.contains("web-2 killed") && stderr.contains("100%"),
        "{stderr}"
    );
    let report = std::fs::read_to_string(out.path().join("report.md"))?;
    let rows: Vec<&str> = report
        .lines()
        .filter(|l| l.starts_with("| ") && l.contains(" of 600 "))
        .collect();
    assert_eq!(rows.len(), 4, "{report}");
    for way in [
        "DNS, resolved once",
        "DNS, resolved per request",
        "Wayfinder mesh",
    ] {
        assert!(
            rows.iter().any(|r| r.starts_with(&format!("| {way} |"))),
            "{way}: {report}"
        );
    }
    assert!(
        rows.iter()
            .any(|r| r.starts_with("| nginx upstream") || r.contains("(nginx not installed)")),
        "{report}"
    );
    for row in &rows {
        let cells: Vec<&str> = row.trim_matches('|').split('|').map(str::trim).collect();
        assert_eq!(cells.len(), 11, "{row}");
        // failed, p50, p90, p99 and the per-instance counts are numbers.
        for cell in &cells[1..9] {
            let number = cell.split_whitespace().next().unwrap_or("");
            assert!(number.parse::<f64>().is_ok(), "{cell:?} in {row}");
        }
        // Recovery times are numbers or an explicit "never".
        for cell in &cells[9..] {
            let first = cell.split_whitespace().next().unwrap_or("");
            assert!(
                first.parse::<f64>().is_ok() || first == "never",
                "{cell:?} in {row}"
            );
        }
        // The instances took answers that add up to the successes.
        let n = |i: usize| cells[i].parse::<usize>().unwrap_or(usize::MAX);
        let failed: usize = cells[1]
            .split_whitespace()
            .next()
            .and_then(|f| f.parse().ok())
            .unwrap_or(usize::MAX);
        assert_eq!(n(5) + n(6) + n(7) + n(8) + failed, 600, "{row}");
    }
    // The mesh routed around the dead instance: nothing failing at the end.
    let mesh = rows
        .iter()
        .find(|r| r.starts_with("| Wayfinder mesh |"))
        .context("mesh row")?;
    assert!(!mesh.contains("failing at the end"), "{mesh}");
    // Resolving once never sees the new instance.
    let once = rows
        .iter()
        .find(|r| r.starts_with("| DNS, resolved once |"))
        .context("row")?;
    assert!(once.trim_end().ends_with("| never |"), "{once}");
    for plot in ["failures.svg", "latency.svg"] {
        let svg = std::fs::read_to_string(out.path().join(plot))?;
        assert!(
            svg.starts_with("<svg") && svg.contains("polyline"),
            "{plot}"
        );
    }
    Ok(())
}
