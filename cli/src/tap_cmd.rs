//! `wfctl tap` and `wfctl top`: the requests to a service, live, from
//! `Tap.Watch`. `tap` prints one line per request; `top` aggregates them
//! here, per path and per instance, and redraws in place on a terminal
//! (plain blocks of lines otherwise).

use std::collections::{BTreeMap, VecDeque};
use std::io::{IsTerminal, Write};
use std::time::{Duration, Instant};

use anyhow::{Result, bail};
use futures::StreamExt;
use tonic::transport::Channel;
use wayfinder_proto::v1::{TapBatch, TapEvent, TapRequest, tap_client::TapClient};

use crate::output::Format;

/// How far back `top` looks.
pub const TOP_WINDOW: Duration = Duration::from_secs(10);

/// Opens a tap; the batches it gets, until `lasts` (forever without).
async fn batches(
    ch: Channel,
    req: TapRequest,
    lasts: Option<Duration>,
    mut each: impl FnMut(TapBatch) -> Result<bool>,
    mut tick: impl FnMut() -> Result<()>,
    every: Duration,
) -> Result<()> {
    let mut stream = match TapClient::new(ch).watch(req).await {
        Ok(r) => r.into_inner(),
        Err(s) => bail!("tap refused: {}", s.message()),
    };
    let end = lasts.map(|d| tokio::time::Instant::now() + d);
    let until = async {
        match end {
            Some(end) => tokio::time::sleep_until(end).await,
            None => std::future::pending().await,
        }
    };
    tokio::pin!(until);
    let mut ticks = tokio::time::interval(every);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = &mut until => return tick(),
            _ = ticks.tick() => tick()?,
            next = stream.next() => match next {
                Some(Ok(b)) => if !each(b)? { return Ok(()) },
                Some(Err(s)) => bail!("tap ended: {}", s.message()),
                None => bail!("tap ended: the control plane closed it"),
            },
        }
    }
}

/// Control characters of a request path shown as `?`: a path must not
/// drive the terminal.
fn printable(s: &str) -> String {
    s.chars()
        .map(|c| if c.is_control() { '?' } else { c })
        .collect()
}

/// One request as a line.
pub fn line(e: &TapEvent) -> String {
    let dash = |s: &str| {
        if s.is_empty() {
            "-".to_string()
        } else {
            printable(s)
        }
    };
    format!(
        "{} -> {} {} {} {} {} {:.1}ms attempts={} error={} trace={}",
        dash(&e.caller),
        dash(&e.callee),
        dash(&e.instance),
        dash(&e.method),
        dash(&e.path),
        e.status,
        e.ms,
        e.attempts,
        dash(&e.error),
        dash(&e.trace_id),
    )
}

/// `wfctl tap`: prints each request until `lasts`, or `count` of them.
pub async fn tap(
    ch: Channel,
    req: TapRequest,
    lasts: Option<Duration>,
    count: u64,
    out: Format,
) -> Result<()> {
    let mut printed = 0u64;
    let mut stdout = std::io::stdout();
    let each = |b: TapBatch| -> Result<bool> {
        if b.dropped > 0 {
            eprintln!("{} dropped", b.dropped);
        }
        for e in &b.events {
            match out {
                Format::Json => writeln!(stdout, "{}", serde_json::to_string(e)?)?,
                Format::Table => writeln!(stdout, "{}", line(e))?,
            }
            printed += 1;
            if count != 0 && printed >= count {
                stdout.flush()?;
                return Ok(false);
            }
        }
        stdout.flush()?;
        Ok(true)
    };
    batches(ch, req, lasts, each, || Ok(()), Duration::from_secs(3600)).await
}

/// One answered request, as `top` keeps it.
struct Seen {
    at: Instant,
    path: String,
    instance: String,
    ok: bool,
    ms: f64,
}

/// One row of `top`.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Row {
    /// `path` or `instance`.
    pub by: &'static str,
    /// The path or instance.
    pub key: String,
    /// Requests per second over the window.
    pub rps: f64,
    /// Share of answers that were not 5xx, in percent.
    pub success: f64,
    /// Median latency, ms.
    pub p50: f64,
    /// 99th percentile latency, ms.
    pub p99: f64,
}

/// The requests of the last [`TOP_WINDOW`], aggregated on demand.
#[derive(Default)]
pub struct Top {
    seen: VecDeque<Seen>,
    dropped: u64,
}

/// The `q` quantile of sorted values (nearest rank).
fn quantile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let rank = (q * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

impl Top {
    /// Adds a request seen at `at`.
    pub fn add(&mut self, e: &TapEvent, at: Instant) {
        self.seen.push_back(Seen {
            at,
            path: printable(&e.path),
            instance: printable(&e.instance),
            ok: e.status < 500,
            ms: e.ms,
        });
    }

    /// Rows per path, then per instance, over the window ending at `now`
    /// (requests older than it are forgotten); `span` is how long the
    /// window has been filling (at most [`TOP_WINDOW`]).
    pub fn rows(&mut self, now: Instant, span: Duration) -> Vec<Row> {
        while self
            .seen
            .front()
            .is_some_and(|s| now.duration_since(s.at) > TOP_WINDOW)
        {
            self.seen.pop_front();
        }
        let secs = span.min(TOP_WINDOW).as_secs_f64().max(1.0);
        let mut rows = Vec::new();
        for by in ["path", "instance"] {
            let mut groups: BTreeMap<&str, Vec<&Seen>> = BTreeMap::new();
            for s in &self.seen {
                let key = if by == "path" { &s.path } else { &s.instance };
                groups.entry(key.as_str()).or_default().push(s);
            }
            for (key, seen) in groups {
                let mut ms: Vec<f64> = seen.iter().map(|s| s.ms).collect();
                ms.sort_by(f64::total_cmp);
                let ok = seen.iter().filter(|s| s.ok).count();
                rows.push(Row {
                    by,
                    key: key.to_string(),
                    rps: seen.len() as f64 / secs,
                    success: 100.0 * ok as f64 / seen.len() as f64,
                    p50: quantile(&ms, 0.5),
                    p99: quantile(&ms, 0.99),
                });
            }
        }
        rows
    }
}

/// `top`'s rows as text.
fn render(rows: &[Row], service: &str, dropped: u64) -> String {
    let mut out = format!(
        "{service}: last {}s, {dropped} dropped\n{:<9} {:<40} {:>8} {:>8} {:>9} {:>9}\n",
        TOP_WINDOW.as_secs(),
        "BY",
        "KEY",
        "RPS",
        "SUCCESS",
        "P50_MS",
        "P99_MS"
    );
    for r in rows {
        out.push_str(&format!(
            "{:<9} {:<40} {:>8.1} {:>7.1}% {:>9.1} {:>9.1}\n",
            r.by, r.key, r.rps, r.success, r.p50, r.p99
        ));
    }
    out
}

/// `wfctl top`: refreshes every `every` until `lasts` (forever without).
pub async fn top(
    ch: Channel,
    req: TapRequest,
    lasts: Option<Duration>,
    every: Duration,
    out: Format,
) -> Result<()> {
    let service = req.service.clone();
    let started = Instant::now();
    let top = std::cell::RefCell::new(Top::default());
    let terminal = std::io::stdout().is_terminal() && out == Format::Table;
    let each = |b: TapBatch| -> Result<bool> {
        let mut t = top.borrow_mut();
        t.dropped += b.dropped;
        let now = Instant::now();
        for e in &b.events {
            t.add(e, now);
        }
        Ok(true)
    };
    let tick = || -> Result<()> {
        let mut t = top.borrow_mut();
        let rows = t.rows(Instant::now(), started.elapsed());
        let mut stdout = std::io::stdout();
        match out {
            Format::Json => {
                let v =
                    serde_json::json!({ "service": service, "dropped": t.dropped, "rows": rows });
                writeln!(stdout, "{v}")?;
            }
            Format::Table if terminal => {
                // Home and clear: the table is redrawn in place.
                write!(
                    stdout,
                    "\x1b[H\x1b[2J{}",
                    render(&rows, &service, t.dropped)
                )?;
            }
            Format::Table => writeln!(stdout, "{}", render(&rows, &service, t.dropped))?,
        }
        stdout.flush()?;
        Ok(())
    };
    batches(ch, req, lasts, each, tick, every).await
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(path: &str, instance: &str, status: u32, ms: f64) -> TapEvent {
        TapEvent {
            caller: "client".into(),
            callee: "web".into(),
            path: path.into(),
            instance: instance.into(),
            status,
            ms,
            ..Default::default()
        }
    }

    #[test]
    fn top_gives_rate_success_and_percentiles_per_path_and_instance() {
        let mut top = Top::default();
        let t0 = Instant::now();
        for i in 1..=100 {
            let status = if i % 10 == 0 { 503 } else { 200 };
            let instance = if i % 2 == 0 { "web-1" } else { "web-2" };
            top.add(&event("/a", instance, status, f64::from(i)), t0);
        }
        let rows = top.rows(t0, Duration::from_secs(10));
        let a = &rows[0];
        assert_eq!((a.by, a.key.as_str()), ("path", "/a"));
        assert_eq!((a.rps, a.success, a.p50, a.p99), (10.0, 90.0, 50.0, 99.0));
        let web1 = rows.iter().find(|r| r.key == "web-1").expect("web-1");
        // Every tenth request failed, and all of them were even: web-1's.
        assert_eq!((web1.by, web1.rps, web1.success), ("instance", 5.0, 80.0));
        // Past the window the requests are forgotten.
        assert!(
            top.rows(t0 + TOP_WINDOW + Duration::from_secs(1), TOP_WINDOW)
                .is_empty()
        );
    }

    #[test]
    fn a_line_shows_control_characters_of_a_path_as_question_marks() {
        let l = line(&event("/a\u{1b}[2J", "web-1", 200, 1.25));
        assert_eq!(
            l,
            "client -> web web-1 - /a?[2J 200 1.2ms attempts=0 error=- trace=-"
        );
    }
}
