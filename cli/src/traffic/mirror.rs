//! `wfctl mirror diff`: how a service's mirrored calls compared with their
//! copies over a while, per route and shadow: pairs whose status or body
//! differed, copies shed or unanswered, and both sides' latency. The
//! callers' sidecars count it, wf-control sums their reports
//! (`/v1/mirror` on its HTTP port), and this reads the sum.
//!
//! [`read_live`] waits the time asked for, reading what came in so far
//! every [`PROGRESS_EVERY`], then reads the whole span once; [`Diff::of`]
//! turns that into the report, in percents and the p99 delta.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use serde::{Deserialize, Serialize};
use tokio::time::Instant;

/// Longest `--for`: what wf-control keeps (`MIRROR_WINDOW`).
pub const MAX_FOR: Duration = Duration::from_secs(300);
/// Shortest `--for`: sidecars report every 2 s, so a shorter span may hold
/// no report at all.
pub const MIN_FOR: Duration = Duration::from_secs(2);
/// How often the wait shows what came in so far.
pub const PROGRESS_EVERY: Duration = Duration::from_secs(5);

pub use wayfinder_proto::view::MirrorView;

/// `/v1/mirror`'s answer.
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
pub struct Report {
    /// The span it covers, seconds.
    pub window_secs: f64,
    /// Per route and shadow, only those with mirrored calls.
    pub mirrors: Vec<MirrorView>,
}

impl Report {
    /// Every route's counts added up (for the progress line).
    pub fn totals(&self) -> MirrorView {
        self.mirrors.iter().fold(MirrorView::default(), |mut t, m| {
            t.pairs = t.pairs.saturating_add(m.pairs);
            t.status_differs = t.status_differs.saturating_add(m.status_differs);
            t.body_differs = t.body_differs.saturating_add(m.body_differs);
            t.shed = t.shed.saturating_add(m.shed);
            t.shadow_failed = t.shadow_failed.saturating_add(m.shadow_failed);
            t
        })
    }
}

/// One row of the report: [`MirrorView`] with its shares and the p99 delta.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct RouteDiff {
    /// The route; empty when the service has no routes.
    pub route: String,
    /// Where the copies went.
    pub shadow: String,
    /// Calls whose primary and shadow both answered.
    pub pairs: u64,
    /// Pairs whose statuses differed.
    pub status_differs: u64,
    /// Their share of the pairs, in percent (`None` without pairs).
    pub status_diff_percent: Option<f64>,
    /// Pairs with the same status whose bodies differed.
    pub body_differs: u64,
    /// Their share of the pairs, in percent.
    pub body_diff_percent: Option<f64>,
    /// Copies not sent.
    pub shed: u64,
    /// Copies that got no answer.
    pub shadow_failed: u64,
    /// Primary's median, ms.
    pub primary_p50_ms: Option<f64>,
    /// Primary's 99th percentile, ms.
    pub primary_p99_ms: Option<f64>,
    /// Shadow's median, ms.
    pub shadow_p50_ms: Option<f64>,
    /// Shadow's 99th percentile, ms.
    pub shadow_p99_ms: Option<f64>,
    /// Shadow's p99 minus the primary's: positive when the shadow is slower.
    pub p99_delta_ms: Option<f64>,
}

impl From<&MirrorView> for RouteDiff {
    fn from(s: &MirrorView) -> Self {
        Self {
            route: s.route.clone(),
            shadow: s.shadow.clone(),
            pairs: s.pairs,
            status_differs: s.status_differs,
            status_diff_percent: percent(s.status_differs, s.pairs),
            body_differs: s.body_differs,
            body_diff_percent: percent(s.body_differs, s.pairs),
            shed: s.shed,
            shadow_failed: s.shadow_failed,
            primary_p50_ms: s.primary_p50_ms,
            primary_p99_ms: s.primary_p99_ms,
            shadow_p50_ms: s.shadow_p50_ms,
            shadow_p99_ms: s.shadow_p99_ms,
            p99_delta_ms: s.shadow_p99_ms.zip(s.primary_p99_ms).map(|(s, p)| s - p),
        }
    }
}

/// The divergence report of one service (`-o json` prints it as is).
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Diff {
    /// The service whose calls were mirrored.
    pub service: String,
    /// The span it covers, seconds.
    pub window_secs: f64,
    /// Per route and shadow, in wf-control's order (route, then shadow).
    pub routes: Vec<RouteDiff>,
}

impl Diff {
    /// The report of `service`'s calls over `window`; an error saying where
    /// to look when nothing was mirrored in it.
    pub fn of(service: &str, window: Duration, r: &Report) -> Result<Diff> {
        if r.mirrors.is_empty() {
            bail!(
                "no mirrored calls for {service} in the last {}: is [services.{service}.mirror] set?",
                span(window)
            );
        }
        Ok(Diff {
            service: service.to_string(),
            window_secs: r.window_secs,
            routes: r.mirrors.iter().map(RouteDiff::from).collect(),
        })
    }
}

/// The report's table header; [`cells`] fills its rows.
pub const HEADER: [&str; 10] = [
    "ROUTE",
    "SHADOW",
    "PAIRS",
    "STATUS DIFF",
    "BODY DIFF",
    "P50 PRIMARY/SHADOW",
    "P99 PRIMARY/SHADOW",
    "P99 DELTA",
    "SHED",
    "SHADOW FAILED",
];

/// What the table's numbers mean, printed under it.
pub const LEGEND: &str =
    "STATUS DIFF: pairs whose statuses differed; BODY DIFF: same status, different body.
P99 DELTA: shadow minus primary (positive: the shadow is slower). Times are to the whole
answer, read from the sidecars' histograms (buckets double from 0.25 ms).";

/// One row of the table.
pub fn cells(r: &RouteDiff) -> Vec<String> {
    let route = if r.route.is_empty() { "-" } else { &r.route };
    vec![
        route.to_string(),
        r.shadow.clone(),
        r.pairs.to_string(),
        share(r.status_differs, r.status_diff_percent),
        share(r.body_differs, r.body_diff_percent),
        both(r.primary_p50_ms, r.shadow_p50_ms),
        both(r.primary_p99_ms, r.shadow_p99_ms),
        r.p99_delta_ms.map_or("-".into(), |d| format!("{d:+.1} ms")),
        r.shed.to_string(),
        r.shadow_failed.to_string(),
    ]
}

/// `3 (0.25%)`; a share too small for two decimals is `<0.01%`, never 0.
fn share(n: u64, percent: Option<f64>) -> String {
    match percent {
        None => n.to_string(),
        Some(_) if n == 0 => "0".into(),
        Some(p) if p < 0.01 => format!("{n} (<0.01%)"),
        Some(p) => format!("{n} ({p:.2}%)"),
    }
}

/// `1.2 / 3.4 ms`, `-` for a side without pairs.
fn both(primary: Option<f64>, shadow: Option<f64>) -> String {
    let ms = |v: Option<f64>| v.map_or("-".into(), |v| format!("{v:.1}"));
    if primary.is_none() && shadow.is_none() {
        return "-".into();
    }
    format!("{} / {} ms", ms(primary), ms(shadow))
}

/// `n` of `of` in percent; `None` when `of` is 0.
fn percent(n: u64, of: u64) -> Option<f64> {
    (of > 0).then(|| n as f64 * 100.0 / of as f64)
}

/// A span as people write it: `60s`, `1500ms`.
pub fn span(d: Duration) -> String {
    if d.subsec_millis() == 0 {
        format!("{}s", d.as_secs())
    } else {
        format!("{}ms", d.as_millis())
    }
}

/// What came in so far, after `elapsed` of `total`: the line the wait shows.
pub fn progress_line(
    service: &str,
    elapsed: Duration,
    total: Duration,
    read: &Result<Report>,
) -> String {
    let at = format!("{service}: {}/{} s", elapsed.as_secs(), total.as_secs());
    match read {
        Ok(r) => {
            let t = r.totals();
            format!(
                "{at}: {} pairs, {} differ in status, {} in body, {} shed, {} shadow failed",
                t.pairs, t.status_differs, t.body_differs, t.shed, t.shadow_failed
            )
        }
        Err(e) => format!("{at}: no report ({e:#}); still waiting"),
    }
}

/// Checks `--for` before anything waits.
pub fn check_for(d: Duration) -> Result<()> {
    if d < MIN_FOR {
        bail!(
            "--for {}: give at least {} (sidecars report every 2 s)",
            span(d),
            span(MIN_FOR)
        );
    }
    if d > MAX_FOR {
        bail!(
            "--for {}: give at most {} (what wf-control keeps)",
            span(d),
            span(MAX_FOR)
        );
    }
    Ok(())
}

/// Where the reports are read: wf-control ([`Http`]), or the tests' fake.
pub(crate) trait Source {
    /// The service's mirrored calls over the last `window`.
    async fn read(&mut self, window: Duration) -> Result<Report>;
}

/// wf-control's `/v1/mirror`.
struct Http {
    /// Its HTTP address.
    addr: SocketAddr,
    /// The service asked about (a checked name: nothing to escape).
    service: String,
}

impl Source for Http {
    async fn read(&mut self, window: Duration) -> Result<Report> {
        let path = format!(
            "/v1/mirror?service={}&window={}ms",
            self.service,
            window.as_millis()
        );
        let (status, body) = crate::lab::http_get(self.addr, &path)
            .await
            .with_context(|| {
                format!(
                    "cannot reach wf-control's HTTP port at {} (--http or WAYFINDER_CONTROL_HTTP)",
                    self.addr
                )
            })?;
        if status == 404 {
            bail!(
                "wf-control at {} has no /v1/mirror: is it older than wfctl?",
                self.addr
            );
        }
        if status != 200 {
            bail!(
                "http://{}{path} answered {status}: {}",
                self.addr,
                body.trim()
            );
        }
        serde_json::from_str(&body).with_context(|| {
            format!(
                "http://{}{path}: not the mirror report wf-control serves",
                self.addr
            )
        })
    }
}

/// Reads `service`'s mirrored calls from wf-control at `addr` over the
/// next `total`, calling `progress` once it answered (with
/// [`Duration::ZERO`]) and then every [`PROGRESS_EVERY`]: a control plane
/// that cannot be read at the start fails at once, one that fails during
/// the wait is shown and waited for.
pub async fn read_live(
    addr: SocketAddr,
    service: &str,
    total: Duration,
    progress: impl FnMut(Duration, &Result<Report>),
) -> Result<Report> {
    let service = super::service_name(service)?.as_str().to_string();
    let mut src = Http { addr, service };
    watch(&mut src, total, PROGRESS_EVERY, progress).await
}

/// Waits `total`, calling `progress` with what came in so far at the start
/// (elapsed zero) and every `every`, then reads the whole of `total`. A
/// source that cannot be read at the start fails at once (no point
/// waiting); one that fails during the wait is shown and waited for; the
/// final read's error is returned.
pub(crate) async fn watch<S: Source>(
    src: &mut S,
    total: Duration,
    every: Duration,
    mut progress: impl FnMut(Duration, &Result<Report>),
) -> Result<Report> {
    let first = src.read(every.min(total)).await?;
    progress(Duration::ZERO, &Ok(first));
    let start = Instant::now();
    let end = start + total;
    let mut next = start + every;
    while next < end {
        tokio::time::sleep_until(next).await;
        let elapsed = next - start;
        let read = src.read(elapsed).await;
        progress(elapsed, &read);
        next += every;
    }
    tokio::time::sleep_until(end).await;
    src.read(total).await
}

#[cfg(test)]
mod tests {
    use super::*;

    fn served(route: &str, pairs: u64, status: u64, body: u64) -> MirrorView {
        MirrorView {
            service: "web".into(),
            route: route.into(),
            shadow: "version=v2".into(),
            pairs,
            status_differs: status,
            body_differs: body,
            shed: 2,
            shadow_failed: 1,
            primary_p50_ms: Some(1.0),
            primary_p99_ms: Some(4.0),
            shadow_p50_ms: Some(1.5),
            shadow_p99_ms: Some(10.5),
        }
    }

    #[test]
    fn a_row_shows_shares_of_the_pairs_and_the_shadow_s_p99_delta() {
        let r = RouteDiff::from(&served("default", 400, 1, 20));
        assert_eq!(r.status_diff_percent, Some(0.25));
        assert_eq!(r.body_diff_percent, Some(5.0));
        assert_eq!(r.p99_delta_ms, Some(6.5));
        assert_eq!(
            cells(&r),
            [
                "default",
                "version=v2",
                "400",
                "1 (0.25%)",
                "20 (5.00%)",
                "1.0 / 1.5 ms",
                "4.0 / 10.5 ms",
                "+6.5 ms",
                "2",
                "1"
            ]
        );
        assert_eq!(cells(&r).len(), HEADER.len());
    }

    #[test]
    fn rows_without_pairs_or_routes_or_with_tiny_shares_say_so() {
        let none = MirrorView {
            primary_p50_ms: None,
            primary_p99_ms: None,
            shadow_p50_ms: None,
            shadow_p99_ms: None,
            ..served("", 0, 0, 0)
        };
        let r = RouteDiff::from(&none);
        assert_eq!(r.status_diff_percent, None, "no pairs: no share");
        assert_eq!(r.p99_delta_ms, None);
        let c = cells(&r);
        assert_eq!((c[0].as_str(), c[3].as_str()), ("-", "0"));
        assert_eq!((c[5].as_str(), c[7].as_str()), ("-", "-"));
        let tiny = cells(&RouteDiff::from(&served("r", 1_000_000, 1, 0)));
        assert_eq!((tiny[3].as_str(), tiny[4].as_str()), ("1 (<0.01%)", "0"));
        let faster = RouteDiff::from(&MirrorView {
            shadow_p99_ms: Some(3.0),
            ..served("r", 1, 0, 0)
        });
        assert_eq!(cells(&faster)[7], "-1.0 ms");
    }

    #[test]
    fn the_report_keeps_wf_control_s_rows_and_no_rows_is_an_error_that_says_where_to_look() {
        let report = Report {
            window_secs: 60.0,
            mirrors: vec![served("api", 10, 1, 0), served("default", 5, 0, 0)],
        };
        let d = Diff::of("web", Duration::from_secs(60), &report).expect("rows");
        let routes: Vec<_> = d.routes.iter().map(|r| r.route.as_str()).collect();
        assert_eq!(routes, ["api", "default"]);
        let json = serde_json::to_value(&d).expect("json");
        assert_eq!(json["service"], "web");
        assert_eq!(json["routes"][0]["status_diff_percent"], 10.0);
        assert_eq!(json["routes"][1]["p99_delta_ms"], 6.5);
        let e = Diff::of("web", Duration::from_secs(60), &Report::default()).expect_err("none");
        assert_eq!(
            e.to_string(),
            "no mirrored calls for web in the last 60s: is [services.web.mirror] set?"
        );
        let t = report.totals();
        assert_eq!((t.pairs, t.status_differs, t.shed), (15, 1, 4));
    }

    #[test]
    fn spans_and_for_limits_read_as_written() {
        assert_eq!(span(Duration::from_secs(60)), "60s");
        assert_eq!(span(Duration::from_millis(1500)), "1500ms");
        assert!(check_for(Duration::from_secs(60)).is_ok());
        let short = check_for(Duration::from_secs(1)).expect_err("short");
        assert!(short.to_string().contains("at least 2s"), "{short}");
        let long = check_for(Duration::from_secs(600)).expect_err("long");
        assert!(long.to_string().contains("at most 300s"), "{long}");
    }

    /// Answers with `pairs` growing by 10 a read, or fails as told.
    struct Fake {
        reads: Vec<(Duration, Instant)>,
        fail_at: Option<usize>,
    }

    impl Source for Fake {
        async fn read(&mut self, window: Duration) -> Result<Report> {
            self.reads.push((window, Instant::now()));
            if self.fail_at == Some(self.reads.len()) {
                bail!("connection refused");
            }
            Ok(Report {
                window_secs: window.as_secs_f64(),
                mirrors: vec![served("default", 10 * self.reads.len() as u64, 0, 0)],
            })
        }
    }

    #[tokio::test(start_paused = true)]
    async fn the_wait_shows_progress_on_time_then_reads_the_whole_span() {
        let mut src = Fake {
            reads: Vec::new(),
            fail_at: Some(3),
        };
        let start = Instant::now();
        let mut lines = Vec::new();
        let total = Duration::from_secs(12);
        let r = watch(&mut src, total, PROGRESS_EVERY, |at, r| {
            lines.push(progress_line("web", at, total, r));
        })
        .await
        .expect("read");
        assert_eq!(start.elapsed(), total);
        assert_eq!(r.window_secs, 12.0);
        let windows: Vec<_> = src.reads.iter().map(|(w, _)| w.as_secs()).collect();
        assert_eq!(
            windows,
            [5, 5, 10, 12],
            "a check, two progress reads, the span"
        );
        assert_eq!(
            lines,
            [
                "web: 0/12 s: 10 pairs, 0 differ in status, 0 in body, 2 shed, 1 shadow failed",
                "web: 5/12 s: 20 pairs, 0 differ in status, 0 in body, 2 shed, 1 shadow failed",
                "web: 10/12 s: no report (connection refused); still waiting",
            ]
        );
    }

    #[tokio::test(start_paused = true)]
    async fn an_unreachable_control_plane_fails_at_once_not_after_the_wait() {
        let mut src = Fake {
            reads: Vec::new(),
            fail_at: Some(1),
        };
        let start = Instant::now();
        let e = watch(&mut src, Duration::from_secs(60), PROGRESS_EVERY, |_, _| {})
            .await
            .expect_err("unreachable");
        assert_eq!(e.to_string(), "connection refused");
        assert_eq!(start.elapsed(), Duration::ZERO);
    }
}
