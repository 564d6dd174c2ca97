//! `wfctl split`: the weights of a route's subsets, set at once or moved in
//! steps while the callers' reports of the moving subset are watched.
//!
//! A split names shares of one label (`version=v2:10`); the subsets not
//! named share the rest: the route's other backends keep their relative
//! weights when one of them selects on that label, otherwise every other
//! value of the label among the service's endpoints gets an equal share.
//! Weights are written as percents (90/10).
//!
//! A progressive split ([`rollout`]) moves one subset by `step` every
//! `every`; after each wait it reads what the callers' sidecars reported for
//! that subset (`/v1/traffic` on wf-control's HTTP port) and, when an
//! `--abort-on` condition holds, restores the routes it started from.

use std::collections::BTreeSet;
use std::fmt;
use std::time::Duration;

use anyhow::Result;
use serde::{Deserialize, Serialize};
use thiserror::Error;
use wayfinder_proto::policy::{
    Backend, BackendTarget, Backends, Bounded, Route, RouteMatch, RouteName, Routes, ServicePolicy,
    Subset,
};

/// Name of the catch-all route `wfctl split` creates when there is none.
pub const DEFAULT_ROUTE: &str = "default";
/// Fewest requests in a window for a condition to be judged: with fewer, one
/// failure would swing the error rate by more than the usual thresholds.
pub const MIN_REQUESTS: u64 = 10;
/// Shortest window the conditions are judged over: sidecars report every
/// 2 s, so a shorter one may hold no report at all.
pub const MIN_WINDOW: Duration = Duration::from_secs(4);
/// Longest: what wf-control keeps.
pub const MAX_WINDOW: Duration = Duration::from_secs(10);

/// Why a split cannot be made.
#[derive(Debug, Error, PartialEq)]
pub enum SplitError {
    /// `LABEL=VALUE:PERCENT` does not parse.
    #[error("{0:?}: write LABEL=VALUE:PERCENT, e.g. version=v2:10 (PERCENT from 0 to 100)")]
    Syntax(String),
    /// Shares name more than one label.
    #[error("every share must name the same label: {0} and {1}")]
    MixedLabels(String, String),
    /// A value is named twice.
    #[error("{0} is named twice")]
    Twice(String),
    /// More than 100 % named.
    #[error("the shares add up to {0}%, more than 100%")]
    Over(u32),
    /// Nothing to give the rest to.
    #[error(
        "nothing takes the remaining {remainder}%: the route has no other {key}=... backend and the service's endpoints carry no other {key} label; name every share (e.g. {key}=v1:{remainder})"
    )]
    NoRest {
        /// The label.
        key: String,
        /// Percent left.
        remainder: u32,
    },
    /// `--route` names a route the service has not.
    #[error("the service has no route {name:?} (it has: {have})")]
    NoRoute {
        /// Asked for.
        name: String,
        /// What exists.
        have: String,
    },
    /// The result breaks a policy rule (too many backends, names twice).
    #[error("{0}")]
    Invalid(String),
}

/// One `LABEL=VALUE:PERCENT`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Share {
    /// Label key.
    pub key: String,
    /// Label value.
    pub value: String,
    /// Percent, 0-100.
    pub percent: u32,
}

impl Share {
    /// The subset it names.
    pub fn subset(&self) -> Result<Subset, SplitError> {
        subset(&self.key, &self.value)
    }

    /// `version=v2`.
    pub fn name(&self) -> String {
        format!("{}={}", self.key, self.value)
    }
}

impl std::str::FromStr for Share {
    type Err = SplitError;
    fn from_str(s: &str) -> Result<Self, SplitError> {
        let bad = || SplitError::Syntax(s.to_string());
        let (label, percent) = s.rsplit_once(':').ok_or_else(bad)?;
        let (key, value) = label.split_once('=').ok_or_else(bad)?;
        let percent: u32 = percent
            .trim()
            .trim_end_matches('%')
            .parse()
            .map_err(|_| bad())?;
        if percent > 100 || wayfinder_proto::validate::label(key, value).is_err() {
            return Err(bad());
        }
        Ok(Self {
            key: key.to_string(),
            value: value.to_string(),
            percent,
        })
    }
}

/// The subset of instances labelled `key=value`.
fn subset(key: &str, value: &str) -> Result<Subset, SplitError> {
    Subset::try_from(
        [(key.to_string(), value.to_string())]
            .into_iter()
            .collect::<std::collections::BTreeMap<_, _>>(),
    )
    .map_err(SplitError::Invalid)
}

fn weight(w: u32) -> Bounded<0, { wayfinder_proto::policy::MAX_BACKEND_WEIGHT }> {
    Bounded::new(i64::from(w.min(100))).unwrap_or_else(|_| unreachable!("0..=100 is in range"))
}

/// Splits `total` in proportion to `weights` (equally when they are all
/// 0), in integers that add up to `total` (largest remainders first).
pub fn apportion(total: u32, weights: &[u32]) -> Vec<u32> {
    if weights.is_empty() {
        return Vec::new();
    }
    let sum: u64 = weights.iter().map(|&w| u64::from(w)).sum();
    let weights: Vec<u64> = if sum == 0 {
        vec![1; weights.len()]
    } else {
        weights.iter().map(|&w| u64::from(w)).collect()
    };
    let sum: u64 = weights.iter().sum();
    let exact: Vec<(u64, u64)> = weights
        .iter()
        .map(|&w| {
            let n = u64::from(total) * w;
            (n / sum, n % sum)
        })
        .collect();
    let mut out: Vec<u32> = exact.iter().map(|&(q, _)| q as u32).collect();
    let short = total - out.iter().sum::<u32>();
    let mut order: Vec<usize> = (0..out.len()).collect();
    // Largest remainder first; the earlier backend on a tie.
    order.sort_by(|&a, &b| exact[b].1.cmp(&exact[a].1).then(a.cmp(&b)));
    for &i in order.iter().take(short as usize) {
        out[i] += 1;
    }
    out
}

/// The backends of a route after the split: `existing` (the route's,
/// possibly none) with the `named` shares, the rest shared as the module
/// says; `values` are the label's values among the service's endpoints.
pub fn split(
    existing: &[Backend],
    named: &[Share],
    values: &BTreeSet<String>,
) -> Result<Vec<Backend>, SplitError> {
    let Some(first) = named.first() else {
        return Err(SplitError::Syntax(String::new()));
    };
    let key = first.key.as_str();
    for (i, s) in named.iter().enumerate() {
        if s.key != key {
            return Err(SplitError::MixedLabels(first.name(), s.name()));
        }
        if named[..i].iter().any(|o| o.value == s.value) {
            return Err(SplitError::Twice(s.name()));
        }
    }
    let given: u32 = named.iter().map(|s| s.percent).sum();
    if given > 100 {
        return Err(SplitError::Over(given));
    }
    let remainder = 100 - given;
    let named_subsets = named
        .iter()
        .map(Share::subset)
        .collect::<Result<Vec<_>, _>>()?;
    // The named share a backend takes, if it is one of the named subsets.
    let named_share = |b: &Backend| match &b.target {
        BackendTarget::Subset(s) => named_subsets
            .iter()
            .position(|n| n == s)
            .map(|i| named[i].percent),
        BackendTarget::Service(_) => None,
    };
    let others: Vec<&Backend> = existing
        .iter()
        .filter(|b| named_share(b).is_none())
        .collect();
    let on_key = |b: &Backend| matches!(&b.target, BackendTarget::Subset(s) if s.iter().any(|(k, _)| k == key));
    let proportional = others.iter().any(|b| on_key(b));
    let mut others_shares = if proportional {
        let weights: Vec<u32> = others.iter().map(|b| b.weight.get()).collect();
        apportion(remainder, &weights)
    } else {
        // The route's other backends (another service, another label) make
        // room for the label's split, listed at 0.
        vec![0; others.len()]
    }
    .into_iter();
    let mut out: Vec<Backend> = existing
        .iter()
        .map(|b| Backend {
            target: b.target.clone(),
            weight: weight(named_share(b).unwrap_or_else(|| others_shares.next().unwrap_or(0))),
        })
        .collect();
    let mut fresh: Vec<Backend> = Vec::new();
    if !proportional {
        let rest: Vec<&String> = values
            .iter()
            .filter(|v| !named.iter().any(|s| &s.value == *v))
            .collect();
        if rest.is_empty() && remainder > 0 {
            return Err(SplitError::NoRest {
                key: key.to_string(),
                remainder,
            });
        }
        let shares = apportion(remainder, &vec![1; rest.len()]);
        for (v, w) in rest.iter().zip(shares) {
            fresh.push(Backend {
                target: BackendTarget::Subset(subset(key, v)?),
                weight: weight(w),
            });
        }
    }
    for (s, sub) in named.iter().zip(&named_subsets) {
        let listed = existing
            .iter()
            .any(|b| matches!(&b.target, BackendTarget::Subset(t) if t == sub));
        if !listed {
            fresh.push(Backend {
                target: BackendTarget::Subset(sub.clone()),
                weight: weight(s.percent),
            });
        }
    }
    fresh.sort_by(|a, b| a.target.cmp(&b.target));
    out.extend(fresh);
    Ok(out)
}

/// The route a split edits: `name`, or the catch-all (a route without
/// match); its index, or `None` when there is no catch-all yet.
pub fn find_route(policy: &ServicePolicy, name: Option<&str>) -> Result<Option<usize>, SplitError> {
    let routes = policy.routes.as_ref().map_or(&[][..], Routes::as_slice);
    match name {
        Some(n) => routes
            .iter()
            .position(|r| r.name.as_str() == n)
            .map(Some)
            .ok_or_else(|| SplitError::NoRoute {
                name: n.to_string(),
                have: if routes.is_empty() {
                    "none".into()
                } else {
                    routes
                        .iter()
                        .map(|r| r.name.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                },
            }),
        None => Ok(routes.iter().position(|r| r.matches.is_empty())),
    }
}

/// `policy` with the split of `named` on route `name` (or the catch-all,
/// created as [`DEFAULT_ROUTE`] at the end when absent); returns the route's
/// name.
pub fn apply(
    policy: &mut ServicePolicy,
    name: Option<&str>,
    named: &[Share],
    values: &BTreeSet<String>,
) -> Result<String, SplitError> {
    let at = find_route(policy, name)?;
    let mut routes: Vec<Route> = policy.routes.take().map(Vec::from).unwrap_or_default();
    let existing: Vec<Backend> = at
        .and_then(|i| routes.get(i))
        .map(|r| r.backends.as_slice().to_vec())
        .unwrap_or_default();
    let backends =
        Backends::try_from(split(&existing, named, values)?).map_err(SplitError::Invalid)?;
    let route_name = match at.and_then(|i| routes.get_mut(i)) {
        Some(r) => {
            r.backends = backends;
            r.name.as_str().to_string()
        }
        None => {
            routes.push(Route {
                name: RouteName::try_from(DEFAULT_ROUTE.to_string())
                    .map_err(SplitError::Invalid)?,
                matches: RouteMatch::default(),
                backends,
                timeouts: None,
                retries: None,
                hedging: None,
            });
            DEFAULT_ROUTE.to_string()
        }
    };
    policy.routes = Some(Routes::try_from(routes).map_err(SplitError::Invalid)?);
    Ok(route_name)
}

/// The percent of route `name` (or the catch-all) that goes to `subset`:
/// 0 when there is no such route or backend.
pub fn current_share(
    policy: &ServicePolicy,
    name: Option<&str>,
    subset: &Subset,
) -> Result<u32, SplitError> {
    let Some(i) = find_route(policy, name)? else {
        return Ok(0);
    };
    let backends = policy
        .routes
        .as_ref()
        .and_then(|r| r.as_slice().get(i))
        .map(|r| r.backends.as_slice())
        .unwrap_or_default();
    let total: u32 = backends.iter().map(|b| b.weight.get()).sum();
    let mine: u32 = backends
        .iter()
        .filter(|b| matches!(&b.target, BackendTarget::Subset(s) if s == subset))
        .map(|b| b.weight.get())
        .sum();
    Ok(if total == 0 {
        0
    } else {
        ((f64::from(mine) * 100.0 / f64::from(total)).round()) as u32
    })
}

/// A route's backends as `version=v1 90%, version=v2 10%`.
pub fn describe(backends: &[Backend]) -> String {
    let total: u32 = backends.iter().map(|b| b.weight.get()).sum::<u32>().max(1);
    backends
        .iter()
        .map(|b| {
            let name = match &b.target {
                BackendTarget::Subset(s) => s.to_string(),
                BackendTarget::Service(s) => format!("service {}", s.as_str()),
            };
            let pct = f64::from(b.weight.get()) * 100.0 / f64::from(total);
            format!("{name} {}%", (pct * 10.0).round() / 10.0)
        })
        .collect::<Vec<_>>()
        .join(", ")
}

// ---- progressive rollout ----

/// What `--abort-on` watches.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Condition {
    /// The share of 5xx answers is above this fraction (`error_rate>1%`).
    ErrorRate(f64),
    /// The 99th percentile latency is above this (`p99>200ms`).
    P99(Duration),
    /// The median latency is above this (`p50>50ms`).
    P50(Duration),
}

/// A bad `--abort-on`.
#[derive(Debug, Error, PartialEq)]
#[error(
    "--abort-on {given:?}: {why}; write error_rate>N% (e.g. error_rate>1%), p99>DURATION or p50>DURATION (e.g. p99>200ms)"
)]
pub struct ConditionError {
    /// What was given.
    pub given: String,
    /// What is wrong with it.
    pub why: String,
}

impl std::str::FromStr for Condition {
    type Err = ConditionError;
    fn from_str(s: &str) -> Result<Self, ConditionError> {
        let err = |why: &str| ConditionError {
            given: s.to_string(),
            why: why.to_string(),
        };
        let compact: String = s.chars().filter(|c| !c.is_whitespace()).collect();
        let (metric, limit) = compact
            .split_once('>')
            .ok_or_else(|| err("no '>' (only upper limits are watched)"))?;
        if limit.is_empty() {
            return Err(err("no limit after '>'"));
        }
        match metric {
            "error_rate" => {
                let n = limit
                    .strip_suffix('%')
                    .ok_or_else(|| err("the error rate is a percentage: end it with %"))?;
                let v: f64 = n.parse().map_err(|_| err("the limit is not a number"))?;
                if !(0.0..100.0).contains(&v) {
                    return Err(err("the limit must be from 0% to below 100%"));
                }
                Ok(Condition::ErrorRate(v / 100.0))
            }
            "p99" | "p50" => {
                let d = wayfinder_proto::policy::parse_duration(limit).map_err(|e| err(&e))?;
                Ok(if metric == "p99" {
                    Condition::P99(d)
                } else {
                    Condition::P50(d)
                })
            }
            other => Err(err(&format!(
                "{other:?} is not watched (error_rate, p99, p50)"
            ))),
        }
    }
}

impl fmt::Display for Condition {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Condition::ErrorRate(r) => write!(f, "error_rate>{}%", r * 100.0),
            Condition::P99(d) => write!(f, "p99>{}ms", d.as_millis()),
            Condition::P50(d) => write!(f, "p50>{}ms", d.as_millis()),
        }
    }
}

/// What the callers reported for one backend over a window, as
/// `/v1/traffic` gives it.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Measured {
    /// Requests.
    pub requests: u64,
    /// 5xx answers.
    pub errors: u64,
    /// Share of 5xx answers.
    pub error_rate: f64,
    /// Median latency, ms.
    pub p50_ms: Option<f64>,
    /// 99th percentile latency, ms.
    pub p99_ms: Option<f64>,
}

/// The judgement of one window.
#[derive(Debug, Clone, PartialEq)]
pub enum Verdict {
    /// No condition holds.
    Pass,
    /// Fewer than [`MIN_REQUESTS`]: nothing judged.
    TooFew(u64),
    /// This condition holds, at this measured value (`3.2%`, `250ms`).
    Trip(Condition, String),
}

/// Judges `m` against `conditions`.
pub fn judge(conditions: &[Condition], m: &Measured) -> Verdict {
    if conditions.is_empty() {
        return Verdict::Pass;
    }
    if m.requests < MIN_REQUESTS {
        return Verdict::TooFew(m.requests);
    }
    for &c in conditions {
        let tripped = match c {
            Condition::ErrorRate(limit) => {
                (m.error_rate > limit).then(|| format!("{:.2}%", m.error_rate * 100.0))
            }
            Condition::P99(limit) => m
                .p99_ms
                .filter(|&p| p > limit.as_secs_f64() * 1000.0)
                .map(|p| format!("{p:.1}ms")),
            Condition::P50(limit) => m
                .p50_ms
                .filter(|&p| p > limit.as_secs_f64() * 1000.0)
                .map(|p| format!("{p:.1}ms")),
        };
        if let Some(value) = tripped {
            return Verdict::Trip(c, value);
        }
    }
    Verdict::Pass
}

/// The shares a rollout sets, in order, from `from` to `to` by `step`
/// (the last one clipped to `to`); empty when already there.
pub fn steps(from: u32, to: u32, step: u32) -> Vec<u32> {
    let step = step.max(1);
    let mut out = Vec::new();
    let mut at = from;
    while at != to {
        at = if to > at {
            (at + step).min(to)
        } else {
            at.saturating_sub(step).max(to)
        };
        out.push(at);
    }
    out
}

/// How long the conditions are judged over after a wait of `every`.
pub fn window(every: Duration) -> Duration {
    every.clamp(MIN_WINDOW, MAX_WINDOW)
}

/// What a rollout drives: the live split, and the callers' reports
/// ([`Live`]; the tests' fake).
pub(crate) trait Target {
    /// Sets the moving subset's share (percent).
    async fn set(&mut self, share: u32) -> Result<()>;
    /// What the callers reported for the moving subset over `window`.
    async fn measure(&mut self, window: Duration) -> Result<Measured>;
    /// Puts back the routes the rollout started from.
    async fn restore(&mut self) -> Result<()>;
}

/// One line of a rollout's progress.
#[derive(Debug, Clone, PartialEq)]
pub struct Progress {
    /// Step number: 0 for the start, then from 1.
    pub step: usize,
    /// Of how many.
    pub of: usize,
    /// The share set.
    pub share: u32,
    /// What was measured after the wait.
    pub measured: Measured,
    /// Its judgement.
    pub verdict: Verdict,
}

/// How a rollout ended.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    /// Every step passed; the subset is at the target.
    Done,
    /// A condition tripped at this share; the start was restored.
    RolledBack {
        /// The share it tripped at.
        share: u32,
        /// The condition.
        condition: Condition,
        /// Its measured value.
        value: String,
    },
}

/// The plan of a rollout.
#[derive(Debug, Clone)]
pub struct Plan {
    /// The share at the start, watched for one wait before the first step.
    pub from: u32,
    /// The shares to set, in order ([`steps`]).
    pub shares: Vec<u32>,
    /// Wait after each.
    pub every: Duration,
    /// Roll back when one holds.
    pub conditions: Vec<Condition>,
}

/// Runs `plan` on `target`: waits `every` at the start's share, measures
/// and judges; then sets each share in turn and does the same, the target
/// included. A subset that fails where it is is not moved. On a trip the
/// start is restored and the outcome says so; `progress` sees each window
/// as it is judged (step 0: the start). A failure to set a share or to read
/// the reports also restores the start.
pub(crate) async fn rollout<T: Target>(
    target: &mut T,
    plan: &Plan,
    mut progress: impl FnMut(&Progress),
) -> Result<Outcome> {
    let of = plan.shares.len();
    let mut share = plan.from;
    for step in 0..=of {
        if step > 0 {
            share = plan.shares[step - 1];
            if let Err(e) = target.set(share).await {
                let _ = target.restore().await;
                return Err(e.context(format!(
                    "setting the share to {share}%; the start was restored"
                )));
            }
        }
        tokio::time::sleep(plan.every).await;
        let measured = match target.measure(window(plan.every)).await {
            Ok(m) => m,
            // Unwatched, the rollout must not go on nor stay half done.
            Err(e) => {
                let _ = target.restore().await;
                return Err(e.context(format!(
                    "at {share}% the callers' reports could not be read; the start was restored"
                )));
            }
        };
        let verdict = judge(&plan.conditions, &measured);
        progress(&Progress {
            step,
            of,
            share,
            measured,
            verdict: verdict.clone(),
        });
        if let Verdict::Trip(condition, value) = verdict {
            target.restore().await?;
            return Ok(Outcome::RolledBack {
                share,
                condition,
                value,
            });
        }
    }
    Ok(Outcome::Done)
}

/// The live split of one service: the policy through the Admin API, the
/// reports through wf-control's `/v1/traffic`.
pub struct Live {
    /// The Admin API.
    pub admin: super::Admin,
    /// The service.
    pub service: String,
    /// `--route`, or the catch-all.
    pub route: Option<String>,
    /// The subset that moves (its percent is ignored).
    pub moving: Share,
    /// The label's values among the service's endpoints.
    pub values: BTreeSet<String>,
    /// wf-control's HTTP address.
    pub http: std::net::SocketAddr,
    /// The routes at the start, put back by [`Target::restore`].
    pub start: Option<Routes>,
}

/// `/v1/traffic`'s backends.
#[derive(Deserialize)]
struct TrafficBackends {
    backends: Vec<BackendRow>,
}

#[derive(Deserialize)]
struct BackendRow {
    callee: String,
    backend: String,
    #[serde(flatten)]
    measured: Measured,
}

impl Live {
    /// Sets the split of `shares` and returns the route's name and backends.
    pub async fn set_shares(&self, shares: &[Share]) -> Result<(String, Vec<Backend>, u64)> {
        let mut policy = self.admin.policy(&self.service).await?;
        let name = apply(&mut policy, self.route.as_deref(), shares, &self.values)?;
        let version = self.admin.apply(&self.service, &policy).await?;
        let backends = policy
            .routes
            .as_ref()
            .and_then(|r| r.as_slice().iter().find(|r| r.name.as_str() == name))
            .map(|r| r.backends.as_slice().to_vec())
            .unwrap_or_default();
        Ok((name, backends, version))
    }
}

impl Live {
    /// Puts back the routes the split started from (after an interruption).
    pub async fn put_back(&mut self) -> Result<()> {
        Target::restore(self).await
    }
}

impl Target for Live {
    async fn set(&mut self, share: u32) -> Result<()> {
        let s = Share {
            percent: share,
            ..self.moving.clone()
        };
        self.set_shares(&[s]).await.map(|_| ())
    }

    async fn measure(&mut self, window: Duration) -> Result<Measured> {
        use anyhow::Context;
        let path = format!("/v1/traffic?window={}ms", window.as_millis());
        let (status, body) = crate::lab::http_get(self.http, &path)
            .await
            .with_context(|| {
                format!(
                    "reading the callers' reports from http://{}{path}",
                    self.http
                )
            })?;
        if status != 200 {
            anyhow::bail!(
                "http://{}{path} answered {status}: {}",
                self.http,
                body.trim()
            );
        }
        let t: TrafficBackends = serde_json::from_str(&body).with_context(|| {
            format!(
                "http://{}{path}: not the traffic wf-control reports",
                self.http
            )
        })?;
        let name = self.moving.name();
        Ok(t.backends
            .into_iter()
            .find(|b| b.callee == self.service && b.backend == name)
            .map(|b| b.measured)
            .unwrap_or_default())
    }

    async fn restore(&mut self) -> Result<()> {
        let mut policy = self.admin.policy(&self.service).await?;
        policy.routes = self.start.clone();
        self.admin.apply(&self.service, &policy).await?;
        Ok(())
    }
}

/// Runs a rollout on the live split (see [`rollout`]).
pub async fn progressive(
    live: &mut Live,
    plan: &Plan,
    progress: impl FnMut(&Progress),
) -> Result<Outcome> {
    rollout(live, plan, progress).await
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    fn share(s: &str) -> Share {
        s.parse().expect("valid share")
    }

    fn backend(pairs: &[(&str, &str)], w: u32) -> Backend {
        let m: BTreeMap<String, String> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        Backend {
            target: BackendTarget::Subset(Subset::try_from(m).expect("subset")),
            weight: weight(w),
        }
    }

    fn shown(b: &[Backend]) -> Vec<(String, u32)> {
        b.iter()
            .map(|b| {
                let n = match &b.target {
                    BackendTarget::Subset(s) => s.to_string(),
                    BackendTarget::Service(s) => s.as_str().to_string(),
                };
                (n, b.weight.get())
            })
            .collect()
    }

    fn values(v: &[&str]) -> BTreeSet<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn shares_parse_and_bad_ones_say_how_to_write_them() {
        assert_eq!(
            share("version=v2:10"),
            Share {
                key: "version".into(),
                value: "v2".into(),
                percent: 10
            }
        );
        assert_eq!(share("track=a:b:100%").value, "a:b", "the last ':' splits");
        for bad in [
            "version=v2",
            "v2:10",
            "version=v2:101",
            "version=v2:x",
            "=v2:1",
        ] {
            let e = bad.parse::<Share>().expect_err(bad);
            assert!(e.to_string().contains("LABEL=VALUE:PERCENT"), "{e}");
        }
    }

    #[test]
    fn the_rest_goes_to_the_other_values_among_the_endpoints() {
        let got = split(&[], &[share("version=v2:10")], &values(&["v1", "v2"])).expect("split");
        assert_eq!(
            shown(&got),
            [("version=v1".into(), 90), ("version=v2".into(), 10)]
        );
        let got =
            split(&[], &[share("version=v3:40")], &values(&["v1", "v2", "v3"])).expect("split");
        assert_eq!(
            shown(&got),
            [
                ("version=v1".into(), 30),
                ("version=v2".into(), 30),
                ("version=v3".into(), 40)
            ]
        );
        let e = split(&[], &[share("version=v2:10")], &values(&["v2"])).expect_err("no rest");
        assert!(e.to_string().contains("remaining 90%"), "{e}");
        // All of it named: nothing needs the endpoints.
        let got = split(&[], &[share("version=v2:100")], &values(&[])).expect("split");
        assert_eq!(shown(&got), [("version=v2".into(), 100)]);
    }

    #[test]
    fn existing_backends_on_the_label_keep_their_proportions_and_zeros_stay_listed() {
        let route = [
            backend(&[("version", "v1")], 60),
            backend(&[("version", "v3")], 20),
            backend(&[("version", "v2")], 20),
        ];
        let got = split(&route, &[share("version=v2:50")], &values(&["v9"])).expect("split");
        assert_eq!(
            shown(&got),
            [
                ("version=v1".into(), 38),
                ("version=v3".into(), 12),
                ("version=v2".into(), 50)
            ],
            "75/25 of the remaining 50, rounded to add up"
        );
        let got = split(&got, &[share("version=v2:100")], &values(&[])).expect("split");
        assert_eq!(
            shown(&got),
            [
                ("version=v1".into(), 0),
                ("version=v3".into(), 0),
                ("version=v2".into(), 100)
            ]
        );
        let got = split(&got, &[share("version=v2:0")], &values(&[])).expect("split");
        assert_eq!(
            shown(&got),
            [
                ("version=v1".into(), 50),
                ("version=v3".into(), 50),
                ("version=v2".into(), 0)
            ],
            "all at 0: equal shares"
        );
    }

    #[test]
    fn shares_must_agree_on_one_label_and_fit_in_100() {
        let v = values(&["v1"]);
        let e = split(&[], &[share("version=v2:10"), share("zone=a:10")], &v).expect_err("mixed");
        assert!(matches!(e, SplitError::MixedLabels(..)), "{e}");
        let e =
            split(&[], &[share("version=v2:60"), share("version=v3:50")], &v).expect_err("over");
        assert_eq!(e, SplitError::Over(110));
        let e =
            split(&[], &[share("version=v2:10"), share("version=v2:20")], &v).expect_err("twice");
        assert!(matches!(e, SplitError::Twice(_)), "{e}");
    }

    #[test]
    fn the_catch_all_route_is_edited_or_created_at_the_end() {
        let text = "[[services.web.routes]]\nname = \"canary\"\nmatch = { headers = { \"x-canary\" = \"1\" } }\nbackends = [{ subset = { version = \"v2\" } }]\n";
        let file = wayfinder_proto::policy::PolicyFile::parse("p.toml", text).expect("parses");
        let mut p = file.services.into_values().next().expect("web");
        let v = values(&["v1", "v2"]);
        let name = apply(&mut p, None, &[share("version=v2:10")], &v).expect("applied");
        assert_eq!(name, DEFAULT_ROUTE);
        let routes = p.routes.clone().expect("routes");
        assert_eq!(routes.as_slice().len(), 2);
        assert_eq!(routes.as_slice()[1].name.as_str(), "default");
        let sub = share("version=v2:0").subset().expect("subset");
        assert_eq!(current_share(&p, None, &sub), Ok(10));
        apply(&mut p, None, &[share("version=v2:30")], &v).expect("applied");
        assert_eq!(current_share(&p, None, &sub), Ok(30));
        assert_eq!(
            p.routes.as_ref().map(|r| r.as_slice().len()),
            Some(2),
            "edited, not added"
        );
        apply(&mut p, Some("canary"), &[share("version=v2:50")], &v).expect("named route");
        assert_eq!(current_share(&p, Some("canary"), &sub), Ok(50));
        let e = apply(&mut p, Some("nope"), &[share("version=v2:50")], &v).expect_err("no route");
        assert!(e.to_string().contains("canary, default"), "{e}");
    }

    #[test]
    fn apportion_adds_up() {
        assert_eq!(apportion(100, &[1, 1, 1]), [34, 33, 33]);
        assert_eq!(apportion(0, &[5, 5]), [0, 0]);
        assert_eq!(apportion(7, &[0, 0]), [4, 3]);
        assert!(apportion(5, &[]).is_empty());
    }

    #[test]
    fn abort_conditions_parse_and_bad_ones_are_explained() {
        assert_eq!("error_rate>1%".parse(), Ok(Condition::ErrorRate(0.01)));
        assert_eq!(
            " error_rate > 0.5% ".parse(),
            Ok(Condition::ErrorRate(0.005))
        );
        assert_eq!(
            "p99>200ms".parse(),
            Ok(Condition::P99(Duration::from_millis(200)))
        );
        assert_eq!("p50>1s".parse(), Ok(Condition::P50(Duration::from_secs(1))));
        for (bad, why) in [
            ("error_rate>1", "end it with %"),
            ("error_rate<1%", "no '>'"),
            ("error_rate>x%", "not a number"),
            ("error_rate>100%", "below 100%"),
            ("p99>fast", "not a duration"),
            ("p95>200ms", "\"p95\" is not watched"),
            ("p99>", "no limit"),
        ] {
            let e = bad.parse::<Condition>().expect_err(bad).to_string();
            assert!(e.contains(why), "{bad}: {e}");
            assert!(e.contains("error_rate>N%"), "{bad}: {e}");
        }
    }

    #[test]
    fn conditions_are_judged_only_with_enough_requests() {
        let conds = [
            "error_rate>1%".parse().expect("c"),
            "p99>200ms".parse().expect("c"),
        ];
        let m = |requests, errors, p99| Measured {
            requests,
            errors,
            error_rate: errors as f64 / requests.max(1) as f64,
            p50_ms: Some(1.0),
            p99_ms: Some(p99),
        };
        assert_eq!(judge(&conds, &m(5, 5, 1.0)), Verdict::TooFew(5));
        assert_eq!(
            judge(&conds, &m(100, 1, 1.0)),
            Verdict::Pass,
            "1% is not above 1%"
        );
        assert_eq!(
            judge(&conds, &m(100, 2, 1.0)),
            Verdict::Trip(conds[0], "2.00%".into())
        );
        assert_eq!(
            judge(&conds, &m(100, 0, 250.0)),
            Verdict::Trip(conds[1], "250.0ms".into())
        );
        assert_eq!(judge(&[], &m(0, 0, 0.0)), Verdict::Pass, "nothing to watch");
    }

    #[test]
    fn steps_go_to_the_target_either_way() {
        assert_eq!(steps(10, 100, 30), [40, 70, 100]);
        assert_eq!(steps(100, 0, 25), [75, 50, 25, 0]);
        assert_eq!(steps(0, 10, 10), [10]);
        assert!(steps(40, 40, 10).is_empty());
        assert_eq!(window(Duration::from_secs(1)), MIN_WINDOW);
        assert_eq!(window(Duration::from_secs(30)), MAX_WINDOW);
    }

    /// Records when each share was set; measures what `bad_from` says.
    struct Fake {
        start: tokio::time::Instant,
        log: Vec<(u64, String)>,
        bad_from: u32,
        share: u32,
    }

    impl Target for Fake {
        async fn set(&mut self, share: u32) -> Result<()> {
            self.share = share;
            self.log
                .push((self.start.elapsed().as_secs(), format!("set {share}")));
            Ok(())
        }
        async fn measure(&mut self, window: Duration) -> Result<Measured> {
            self.log.push((
                self.start.elapsed().as_secs(),
                format!("measure {}s", window.as_secs()),
            ));
            let errors = if self.share >= self.bad_from { 50 } else { 0 };
            Ok(Measured {
                requests: 100,
                errors,
                error_rate: errors as f64 / 100.0,
                ..Measured::default()
            })
        }
        async fn restore(&mut self) -> Result<()> {
            self.log
                .push((self.start.elapsed().as_secs(), "restore".into()));
            Ok(())
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_rollout_steps_on_time_and_rolls_back_when_a_condition_trips() {
        let plan = Plan {
            from: 0,
            shares: steps(0, 100, 25),
            every: Duration::from_secs(30),
            conditions: vec!["error_rate>1%".parse().expect("c")],
        };
        let mut fake = Fake {
            start: tokio::time::Instant::now(),
            log: Vec::new(),
            bad_from: 1000,
            share: 0,
        };
        let mut seen = Vec::new();
        let out = rollout(&mut fake, &plan, |p| seen.push(p.share))
            .await
            .expect("runs");
        assert_eq!(out, Outcome::Done);
        assert_eq!(seen, [0, 25, 50, 75, 100], "the start is watched first");
        assert_eq!(
            fake.log[..4],
            [
                (30, "measure 10s".into()),
                (30, "set 25".into()),
                (60, "measure 10s".into()),
                (60, "set 50".into()),
            ]
        );
        assert_eq!(
            fake.log.last(),
            Some(&(150, "measure 10s".to_string())),
            "the last step is judged too"
        );

        let mut fake = Fake {
            start: tokio::time::Instant::now(),
            log: Vec::new(),
            bad_from: 50,
            share: 0,
        };
        let out = rollout(&mut fake, &plan, |_| {}).await.expect("runs");
        assert_eq!(
            out,
            Outcome::RolledBack {
                share: 50,
                condition: Condition::ErrorRate(0.01),
                value: "50.00%".into()
            }
        );
        assert_eq!(fake.log.last(), Some(&(90, "restore".to_string())));
        assert!(
            !fake.log.iter().any(|(_, l)| l == "set 75"),
            "no step after the trip"
        );

        // Failing where it is: not moved at all.
        let mut fake = Fake {
            start: tokio::time::Instant::now(),
            log: Vec::new(),
            bad_from: 0,
            share: 0,
        };
        let out = rollout(&mut fake, &plan, |_| {}).await.expect("runs");
        assert!(
            matches!(out, Outcome::RolledBack { share: 0, .. }),
            "{out:?}"
        );
        assert!(
            !fake.log.iter().any(|(_, l)| l.starts_with("set")),
            "{:?}",
            fake.log
        );
    }
}
