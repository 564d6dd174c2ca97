//! Soak: mixed traffic through the loopback lab for an hour, with chaos
//! every minute, watching every process for leaks (issue 23, part 5).
//!
//! The lab: three etcd members and two wf-control replicas over them (one
//! wf-control on its embedded store when etcd is not installed), TLS to
//! the control plane and mTLS between sidecars, three `web` instances
//! (lab-app behind its sidecar), two `echo` instances (TCP echo servers
//! this program runs, behind their sidecars) and a client sidecar that
//! every call goes through: HTTP/1.1 keep-alive, HTTP/2 (h2c), gRPC unary
//! and opaque TCP round trips at a modest rate. Every `--chaos-every` one
//! event, in turn: an instance killed and started again, a control-plane
//! replica killed and started again, an etcd member stopped and started
//! again, the policy changed and changed back, a certificate renewal (the
//! certificates are short-lived so they rotate all along). Each process's
//! RSS, descriptors and CPU are sampled every few seconds; every failed
//! call is kept with its reason. The report (`bench/results/soak-DATE.md`
//! and its plots) says whether memory and descriptors stay flat, whether a
//! registration was lost, and whether calls failed outside chaos or where
//! the mesh could have retried them. Run it with `bench/soak.sh`.

#[path = "soak/chaos.rs"]
mod chaos;
#[path = "soak/journal.rs"]
mod journal;
#[path = "soak/mesh.rs"]
mod mesh;
#[path = "soak/report.rs"]
mod report;
#[path = "soak/stats.rs"]
mod stats;
#[path = "soak/traffic.rs"]
mod traffic;

use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard, RwLock};
use std::time::Duration;

use anyhow::{Context, Result};
use clap::Parser;
use tokio::sync::watch;

use chaos::Chaos;
use journal::Journal;
use mesh::{Mesh, Setup};
use stats::Samples;
use traffic::{Callers, Kind, Record, Rules};

#[derive(Parser, Debug)]
#[command(about = "Mixed traffic through the loopback lab with chaos every minute, for leaks")]
struct Args {
    /// Directory of wf-control, wf-proxy, lab-app and wfctl.
    #[arg(long, default_value = "target/release")]
    bin_dir: PathBuf,
    /// How long traffic runs: seconds, or a number with s, m or h.
    #[arg(long, default_value = "3600", value_parser = secs)]
    duration: Duration,
    /// Calls per second in all, split evenly over HTTP/1.1, HTTP/2, gRPC and TCP.
    #[arg(long, default_value_t = 50.0)]
    rate: f64,
    /// Time from one chaos event to the next.
    #[arg(long, default_value = "60", value_parser = secs)]
    chaos_every: Duration,
    /// How long a killed or stopped process stays down, and how long the
    /// changed policy stays in force.
    #[arg(long, default_value = "5", value_parser = secs)]
    down: Duration,
    /// Time after an event's end that still belongs to its window.
    #[arg(long, default_value = "15", value_parser = secs)]
    settle: Duration,
    /// Samples before this are left out of the trends (default: 5 min, or
    /// 10% of a run shorter than 50 min).
    #[arg(long, value_parser = secs)]
    warmup: Option<Duration>,
    /// Time between two samples of every process.
    #[arg(long, default_value = "5", value_parser = secs)]
    sample_every: Duration,
    /// Lifetime of workload certificates (renewed at 70% of it), short so
    /// that they rotate all through the soak; at least 10 s.
    #[arg(long, default_value = "120", value_parser = secs)]
    cert_lifetime: Duration,
    /// One wf-control on its embedded store even where etcd is installed.
    #[arg(long)]
    no_etcd: bool,
    /// Where the report and plots go.
    #[arg(long, default_value = "bench/results")]
    out_dir: PathBuf,
    /// Where every process's log is written at the end (default: a new
    /// directory under the system's temporary directory).
    #[arg(long)]
    log_dir: Option<PathBuf>,
}

impl Args {
    /// The start of the trends, in seconds.
    fn warmup_secs(&self) -> f64 {
        self.warmup.map_or_else(
            || (self.duration.as_secs_f64() / 10.0).min(300.0),
            |w| w.as_secs_f64(),
        )
    }
}

/// A duration flag: seconds, or a number with `s`, `m` or `h`.
fn secs(s: &str) -> Result<Duration, String> {
    let bad = || format!("{s:?}: seconds, or a number with s, m or h (90, 90s, 60m, 1h)");
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (n, unit) = s.split_at(split);
    let n: u64 = n.parse().map_err(|_| bad())?;
    let factor = match unit {
        "" | "s" => 1,
        "m" => 60,
        "h" => 3600,
        _ => return Err(bad()),
    };
    Ok(Duration::from_secs(n.saturating_mul(factor)))
}

/// Seconds since the traffic started: every time in the soak is one.
#[derive(Clone, Copy)]
pub struct Clock(tokio::time::Instant);

impl Clock {
    fn start() -> Self {
        Self(tokio::time::Instant::now())
    }

    /// Seconds since the start.
    pub fn now(&self) -> f64 {
        self.0.elapsed().as_secs_f64()
    }

    /// Sleeps until `t` seconds after the start.
    pub async fn until(&self, t: f64) {
        tokio::time::sleep_until(self.0 + Duration::from_secs_f64(t.max(0.0))).await;
    }
}

/// A lock that a panicking holder did not make unusable (every value
/// behind one is a record, whole after each change).
pub fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// The policy `web` runs with, applied before any instance starts.
const BASELINE: &str = r#"# The soak's policy for web: a dying instance's calls are retried elsewhere.
[services.web.timeouts]
connect = "1s"
per_try = "2s"
request = "5s"

[services.web.retries]
max_attempts = 3
retry_on = ["connect-failure", "reset", "gateway-error", "grpc-unavailable"]
non_idempotent = false
"#;

/// The policy chaos switches `web` to for `--down`, then back.
const VARIANT: &str = r#"# What chaos changes web's policy to for a while: fewer tries, shorter timeouts.
[services.web.timeouts]
connect = "500ms"
per_try = "1s"
request = "3s"

[services.web.retries]
max_attempts = 2
retry_on = ["connect-failure", "gateway-error"]
non_idempotent = false
"#;

#[tokio::main]
async fn main() -> Result<()> {
    let args = Args::parse();
    for b in ["wf-control", "wf-proxy", "lab-app", "wfctl"] {
        anyhow::ensure!(
            args.bin_dir.join(b).exists(),
            "{} missing: build with `cargo build --release` (bench/soak.sh does)",
            args.bin_dir.join(b).display()
        );
    }
    anyhow::ensure!(args.rate > 0.0, "--rate must be above 0");
    let etcd = match (args.no_etcd, wayfinder_tests::etcd::unavailable()) {
        (true, _) => Err("--no-etcd".to_string()),
        (false, Some(why)) => Err(why),
        (false, None) => Ok(()),
    };
    let work = tempfile::tempdir()?;
    let log_dir = args
        .log_dir
        .clone()
        .unwrap_or_else(|| std::env::temp_dir().join(format!("wf-soak-{}", std::process::id())));
    let echo_apps = vec![mesh::echo_app().await?, mesh::echo_app().await?];
    println!(
        "== starting the lab (work directory {})",
        work.path().display()
    );
    let mut mesh = Mesh::start(&Setup {
        bin_dir: &args.bin_dir,
        work: work.path(),
        etcd: etcd.is_ok(),
        cert_lifetime: args.cert_lifetime,
        echo_apps: &echo_apps,
        policy: BASELINE,
    })
    .await
    .with_context(|| format!("starting the lab (logs: {})", log_dir.display()))?;
    if let Err(why) = &etcd {
        println!("   no etcd ({why}): one wf-control on its embedded store");
    }
    mesh.ready_for_traffic().await?;
    println!("   {}", mesh.describe());

    let outcome = soak(&args, &mut mesh).await;
    mesh.save_logs(&log_dir)?;
    println!("process logs in {}", log_dir.display());
    let outcome = outcome?;
    let path = report::write(&report::Run {
        args: &args,
        lab: mesh.describe(),
        etcd_skipped: etcd.err(),
        policies: (BASELINE, VARIANT),
        outcome: &outcome,
        log_dir: &log_dir,
    })?;
    println!("report: {}", path.display());
    Ok(())
}

/// What a soak found.
pub struct Outcome {
    /// Every call.
    pub record: Record,
    /// The chaos events.
    pub events: Vec<chaos::Event>,
    /// The registration check after the traffic stopped.
    pub last_check: Vec<chaos::Missing>,
    /// What the logs said.
    pub journal: Vec<journal::Entry>,
    /// Every process's samples, by role.
    pub samples: std::collections::BTreeMap<String, Vec<stats::Sample>>,
    /// Seconds of traffic.
    pub seconds: f64,
    /// Whether Ctrl-C or SIGTERM ended it before `--duration`.
    pub interrupted: bool,
}

/// Runs traffic, sampling and chaos for `--duration`.
async fn soak(args: &Args, mesh: &mut Mesh) -> Result<Outcome> {
    let clock = Clock::start();
    let end = args.duration.as_secs_f64();
    let (stop_tx, stop) = watch::channel(false);
    let journal = Journal::default();
    let samples = Samples::default();
    let record = Arc::new(Mutex::new(Record::default()));
    let baseline = Rules::of(BASELINE, "web")?;
    let in_force = Arc::new(RwLock::new(baseline.clone()));
    let callers = Arc::new(Callers::new(mesh.web_addr, mesh.echo_addr)?);

    let watcher = tokio::spawn(journal::watch(
        mesh.roles.clone(),
        journal.clone(),
        clock,
        stop.clone(),
    ));
    let sampler = tokio::spawn(stats::sample(
        mesh.roles.clone(),
        samples.clone(),
        clock,
        args.sample_every,
        stop.clone(),
    ));
    let per_kind = args.rate / Kind::ALL.len() as f64;
    let loads: Vec<_> = Kind::ALL
        .into_iter()
        .map(|kind| {
            tokio::spawn(traffic::run(traffic::Load {
                kind,
                per_sec: per_kind,
                callers: callers.clone(),
                record: record.clone(),
                in_force: in_force.clone(),
                clock,
                stop: stop.clone(),
            }))
        })
        .collect();
    let progress = tokio::spawn(progress(
        record.clone(),
        samples.clone(),
        clock,
        stop.clone(),
    ));
    println!(
        "== soak: {:.0} s, {} calls/s, chaos every {} s",
        end,
        args.rate,
        args.chaos_every.as_secs()
    );

    let mut chaos = Chaos::new(
        mesh,
        chaos::Timing {
            every: args.chaos_every,
            down: args.down,
            settle: args.settle,
            cert_lifetime: args.cert_lifetime,
        },
        chaos::Policies {
            baseline: (BASELINE, baseline),
            variant: (VARIANT, Rules::of(VARIANT, "web")?),
            in_force,
        },
        journal.clone(),
        clock,
    );
    // Ctrl-C or SIGTERM ends the soak early, with its report (an event
    // under way is left out of it).
    let interrupted = tokio::select! {
        () = async {
            chaos.run(mesh, end).await;
            clock.until(end).await;
        } => false,
        () = interrupt() => true,
    };
    let seconds = clock.now().min(end);
    if interrupted {
        println!("== interrupted at {seconds:.0} s");
    }
    let _ = stop_tx.send(true);
    for l in loads {
        l.await?;
    }
    println!(
        "== traffic stopped at {:.0} s; last registration check",
        clock.now()
    );
    let last_check = chaos::check(mesh, clock, args.settle).await;
    let _ = tokio::join!(watcher, sampler, progress);
    let record = std::mem::take(&mut *lock(&record));
    Ok(Outcome {
        record,
        events: chaos.events,
        last_check,
        journal: journal.entries(),
        samples: samples.take(),
        seconds,
        interrupted,
    })
}

/// Ctrl-C or SIGTERM.
async fn interrupt() {
    let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(s) => s,
        Err(_) => return std::future::pending().await,
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}

/// Prints, every minute, the calls so far and every process's RSS.
async fn progress(
    record: Arc<Mutex<Record>>,
    samples: Samples,
    clock: Clock,
    mut stop: watch::Receiver<bool>,
) {
    let mut minute = 1.0;
    loop {
        tokio::select! {
            () = clock.until(minute * 60.0) => {}
            _ = stop.changed() => return,
        }
        let (calls, failed) = {
            let r = lock(&record);
            (r.calls(), r.failures.len())
        };
        let rss: Vec<String> = samples
            .latest()
            .into_iter()
            .map(|(role, s)| format!("{role} {:.1}", s.rss_mib))
            .collect();
        println!(
            "[{minute:>3.0} min] {calls} calls, {failed} failed | RSS MiB: {}",
            rss.join(", ")
        );
        minute += 1.0;
    }
}
