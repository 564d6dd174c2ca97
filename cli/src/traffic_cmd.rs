//! `wfctl split`, `wfctl fault` and `wfctl mirror diff`: the command lines
//! turned into the library's calls ([`wayfinder_cli::traffic`]), and their
//! output.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use wayfinder_cli::traffic::split::{self, Condition, Live, Outcome, Plan, Share, Verdict};
use wayfinder_cli::traffic::{Admin, fault, mirror};

use crate::output::{self, Format};

/// `wfctl split`'s arguments.
pub struct SplitArgs {
    /// The service.
    pub service: String,
    /// `LABEL=VALUE:PERCENT`s.
    pub shares: Vec<Share>,
    /// `--route`.
    pub route: Option<String>,
    /// `--step`: progressive when given.
    pub step: Option<u32>,
    /// `--every`.
    pub every: Duration,
    /// `--abort-on`.
    pub abort_on: Vec<Condition>,
    /// `--http`: wf-control's HTTP address.
    pub http: String,
}

/// `HOST:PORT` or `http://HOST:PORT`, resolved.
async fn http_addr(given: &str) -> Result<SocketAddr> {
    let hostport = given
        .strip_prefix("http://")
        .unwrap_or(given)
        .trim_end_matches('/');
    tokio::net::lookup_host(hostport)
        .await
        .ok()
        .and_then(|mut a| a.next())
        .with_context(|| format!("--http {given:?}: give wf-control's HTTP address as HOST:PORT"))
}

/// The values of `key` among the service's endpoints.
async fn label_values(admin: &Admin, service: &str, key: &str) -> Result<BTreeSet<String>> {
    Ok(admin
        .endpoints(service)
        .await?
        .iter()
        .filter_map(|e| e.instance.as_ref()?.labels.get(key).cloned())
        .collect())
}

/// The flags of a progressive split, checked before anything is read.
fn check_progressive(a: &SplitArgs, step: u32) -> Result<()> {
    if a.shares.len() != 1 {
        bail!("a progressive split moves one subset: name only it (e.g. version=v2:100)");
    }
    if !(1..=100).contains(&step) {
        bail!("--step {step}: give 1 to 100 (percent per step)");
    }
    if a.every < Duration::from_secs(1) {
        bail!("--every: give at least 1s");
    }
    Ok(())
}

/// `wfctl split`.
pub async fn split(admin: Admin, a: SplitArgs, out: Format) -> Result<()> {
    let Some(first) = a.shares.first().cloned() else {
        bail!("name at least one share, e.g. version=v2:10");
    };
    if a.step.is_none() && !a.abort_on.is_empty() {
        bail!("--abort-on watches a progressive split: give --step too");
    }
    if let Some(step) = a.step {
        check_progressive(&a, step)?;
    }
    // Where the reports are read (unused without --step).
    let http = match a.step {
        Some(_) => http_addr(&a.http).await?,
        None => SocketAddr::from(([127, 0, 0, 1], 0)),
    };
    let values = label_values(&admin, &a.service, &first.key).await?;
    let start = admin.policy(&a.service).await?;
    let mut live = Live {
        admin,
        service: a.service.clone(),
        route: a.route.clone(),
        moving: first.clone(),
        values,
        http,
        start: start.routes.clone(),
    };
    let Some(step) = a.step else {
        let (route, backends, version) = live.set_shares(&a.shares).await?;
        return print_split(&a.service, &route, &backends, version, out);
    };
    let from = split::current_share(&start, a.route.as_deref(), &first.subset()?)?;

    let plan = Plan {
        from,
        shares: split::steps(from, first.percent, step),
        every: a.every,
        conditions: a.abort_on.clone(),
    };
    if plan.shares.is_empty() {
        output::line(&format!("{} is at {}% already", first.name(), from));
        return Ok(());
    }
    if out == Format::Table {
        let every = a.every.as_secs_f64();
        let watching: Vec<String> = a.abort_on.iter().map(ToString::to_string).collect();
        output::line(&format!(
            "{}: {} watched at {from}% for {every} s, then to {}% by {step}% every {every} s{}",
            a.service,
            first.name(),
            first.percent,
            if watching.is_empty() {
                String::new()
            } else {
                format!(
                    "; rolling back if {} (judged over the last {} s, with at least {} requests)",
                    watching.join(" or "),
                    split::window(a.every).as_secs(),
                    split::MIN_REQUESTS
                )
            }
        ));
    }
    let name = first.name();
    let run = split::progressive(&mut live, &plan, |p| print_step(&name, p, out));
    // Ctrl-C leaves no half-done rollout behind.
    let outcome = tokio::select! {
        r = run => Some(r),
        _ = tokio::signal::ctrl_c() => None,
    };
    let Some(outcome) = outcome else {
        live.put_back().await?;
        bail!("interrupted: rolled back to the split it started from ({from}%)");
    };
    let outcome = outcome?;
    match outcome {
        Outcome::Done => {
            if out == Format::Json {
                return output::json(
                    &serde_json::json!({ "backend": name, "share": first.percent, "done": true }),
                );
            }
            output::line(&format!("{name} is at {}%", first.percent));
            Ok(())
        }
        Outcome::RolledBack {
            share,
            condition,
            value,
        } => {
            bail!(
                "{condition} tripped at {name} {share}% (measured {value}); rolled back to the split it started from ({from}%)"
            )
        }
    }
}

fn print_step(name: &str, p: &split::Progress, out: Format) {
    let m = &p.measured;
    if out == Format::Json {
        let verdict = match &p.verdict {
            Verdict::Pass => serde_json::json!("pass"),
            Verdict::TooFew(n) => serde_json::json!({ "too_few_requests": n }),
            Verdict::Trip(c, v) => serde_json::json!({ "tripped": c.to_string(), "measured": v }),
        };
        let _ = output::json(&serde_json::json!({
            "step": p.step, "of": p.of, "backend": name, "share": p.share,
            "measured": m, "verdict": verdict,
        }));
        return;
    }
    let ms = |v: Option<f64>| v.map_or("-".into(), |v| format!("{v:.1} ms"));
    let judged = match &p.verdict {
        Verdict::Pass => String::new(),
        Verdict::TooFew(n) => format!(
            " (too few requests to judge: {n} < {})",
            split::MIN_REQUESTS
        ),
        Verdict::Trip(c, v) => format!(" -> {c} ({v}): rolling back"),
    };
    let step = if p.step == 0 {
        "start".to_string()
    } else {
        format!("step {}/{}", p.step, p.of)
    };
    output::line(&format!(
        "{step}: {name} {}%: {} requests, {:.2}% errors, p99 {}{judged}",
        p.share,
        m.requests,
        m.error_rate * 100.0,
        ms(m.p99_ms)
    ));
}

fn print_split(
    service: &str,
    route: &str,
    backends: &[wayfinder_proto::policy::Backend],
    version: u64,
    out: Format,
) -> Result<()> {
    if out == Format::Json {
        let list: Vec<_> = backends
            .iter()
            .map(|b| {
                let (kind, name) = match &b.target {
                    wayfinder_proto::policy::BackendTarget::Subset(s) => ("subset", s.to_string()),
                    wayfinder_proto::policy::BackendTarget::Service(s) => {
                        ("service", s.as_str().to_string())
                    }
                };
                serde_json::json!({ kind: name, "weight": b.weight.get() })
            })
            .collect();
        return output::json(&serde_json::json!({
            "service": service, "route": route, "backends": list, "version": version,
        }));
    }
    output::line(&format!(
        "{service} route {route}: {} (version {version})",
        split::describe(backends)
    ));
    Ok(())
}

/// `wfctl fault inject`.
pub async fn inject(admin: Admin, service: &str, spec: &fault::Spec, out: Format) -> Result<()> {
    let (f, version) = fault::inject(&admin, service, spec).await?;
    let now = fault::unix_ms_now();
    let Some(a) = fault::describe(service, &f, now) else {
        bail!("the fault ended before it was applied (--for too short)");
    };
    if out == Format::Json {
        return output::json(&serde_json::json!({ "fault": a, "version": version }));
    }
    output::line(&format!(
        "{service}: {} on {}, {} (version {version})",
        a.effect,
        a.matches,
        match a.seconds_left {
            None => "until cleared".to_string(),
            Some(_) => format!("for {}", fault::left(a.seconds_left)),
        }
    ));
    Ok(())
}

/// `wfctl fault list`.
pub async fn list(admin: Admin, out: Format) -> Result<()> {
    let active = fault::list(&admin).await?;
    if out == Format::Json {
        return output::json(&serde_json::json!({ "faults": active }));
    }
    if active.is_empty() {
        output::line("no active faults");
        return Ok(());
    }
    let mut table = output::table(&["SERVICE", "MATCH", "FAULT", "LEFT"]);
    for a in active {
        let left = fault::left(a.seconds_left);
        table.add_row(vec![a.service, a.matches, a.effect, left]);
    }
    output::line(&table.to_string());
    Ok(())
}

/// `wfctl fault clear [SERVICE]`.
pub async fn clear(admin: Admin, service: Option<String>, out: Format) -> Result<()> {
    let services = match service {
        Some(s) => vec![s],
        None => fault::list(&admin)
            .await?
            .into_iter()
            .map(|a| a.service)
            .collect(),
    };
    let mut cleared = Vec::new();
    for s in services {
        if fault::clear(&admin, &s).await? {
            cleared.push(s);
        }
    }
    if out == Format::Json {
        return output::json(&serde_json::json!({ "cleared": cleared }));
    }
    if cleared.is_empty() {
        output::line("no fault to clear");
    } else {
        output::line(&format!("cleared the fault of {}", cleared.join(", ")));
    }
    Ok(())
}

/// `wfctl mirror diff`: waits `lasts` showing progress on stderr, then
/// prints the divergence report on stdout. A divergence is no failure; no
/// mirrored call at all, or no control plane, is.
pub async fn mirror_diff(service: &str, lasts: Duration, http: &str, out: Format) -> Result<()> {
    wayfinder_cli::traffic::service_name(service)?;
    mirror::check_for(lasts)?;
    let addr = http_addr(http).await?;
    let report = mirror::read_live(addr, service, lasts, |at, read| {
        if at.is_zero() {
            eprintln!(
                "{service}: comparing mirrored calls with their copies for {} (a line every {} s)",
                mirror::span(lasts),
                mirror::PROGRESS_EVERY.as_secs()
            );
            return;
        }
        eprintln!(
            "{}",
            output::printable(&mirror::progress_line(service, at, lasts, read))
        );
    })
    .await?;
    let diff = mirror::Diff::of(service, lasts, &report)?;
    if out == Format::Json {
        return output::json(&diff);
    }
    output::line(&format!(
        "{service}: mirrored calls over the last {} s, primary vs shadow",
        diff.window_secs
    ));
    let mut table = output::table(&mirror::HEADER);
    for r in &diff.routes {
        table.add_row(mirror::cells(r));
    }
    output::line(&table.to_string());
    output::line(mirror::LEGEND);
    Ok(())
}
