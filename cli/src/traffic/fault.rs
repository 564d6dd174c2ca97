//! `wfctl fault`: the one fault a service's callers inject, set with an
//! end (`--for`) that the control plane keeps, listed with the time left,
//! and cleared. `wfctl lab compare` scenarios set and clear faults the same
//! way.

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, SystemTime};

use anyhow::{Context, Result};
use serde::Serialize;
use wayfinder_proto::policy::Fault;
use wayfinder_proto::v1;

use super::Admin;

/// What the fault does to a matching try.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Effect {
    /// Answer with this status instead of calling.
    Abort(u32),
    /// Wait this long before calling.
    Delay(Duration),
    /// Act as if the connection were reset.
    Reset,
}

/// A fault as the command line (or a scenario) gives it.
#[derive(Debug, Clone, PartialEq)]
pub struct Spec {
    /// Only tries to this instance.
    pub instance: Option<String>,
    /// Only requests whose path starts with this.
    pub path_prefix: Option<String>,
    /// Only requests with these headers (name, exact value).
    pub headers: Vec<(String, String)>,
    /// What it does.
    pub effect: Effect,
    /// Share of matching tries, 0-100.
    pub percent: f64,
    /// How long it lasts; `None`: until cleared.
    pub lasts: Option<Duration>,
}

impl Spec {
    /// The fault, checked as the control plane checks it, ending `lasts`
    /// after `now_ms` (Unix milliseconds).
    pub fn to_fault(&self, now_ms: u64) -> Result<Fault> {
        let percent = self.percent;
        let wire = v1::Fault {
            r#match: Some(v1::FaultMatch {
                instance: self.instance.clone().unwrap_or_default(),
                path_prefix: self.path_prefix.clone().unwrap_or_default(),
                headers: self.headers.iter().cloned().collect::<HashMap<_, _>>(),
            }),
            abort: match self.effect {
                Effect::Abort(status) => Some(v1::FaultAbort { status, percent }),
                _ => None,
            },
            delay: match self.effect {
                Effect::Delay(d) => Some(v1::FaultDelay {
                    duration_ms: u32::try_from(d.as_millis()).unwrap_or(u32::MAX),
                    percent,
                }),
                _ => None,
            },
            reset: (self.effect == Effect::Reset).then_some(v1::FaultReset { percent }),
            expires_at_unix_ms: self.lasts.map_or(0, |d| {
                now_ms.saturating_add(u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
            }),
        };
        Ok(Fault::try_from(&wire)?)
    }
}

/// Now, in Unix milliseconds.
pub fn unix_ms_now() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// Sets `service`'s fault (replacing any other); returns the fault set and
/// the policy version.
pub async fn inject(admin: &Admin, service: &str, spec: &Spec) -> Result<(Fault, u64)> {
    let fault = spec.to_fault(unix_ms_now())?;
    let mut policy = admin.policy(service).await?;
    policy.fault = Some(fault.clone());
    let version = admin.apply(service, &policy).await?;
    Ok((fault, version))
}

/// Removes `service`'s fault; returns whether it had one.
pub async fn clear(admin: &Admin, service: &str) -> Result<bool> {
    let mut policy = admin.policy(service).await?;
    if policy.fault.take().is_none() {
        return Ok(false);
    }
    admin.apply(service, &policy).await?;
    Ok(true)
}

/// One active fault, as `wfctl fault list` shows it.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Active {
    /// The service whose callers inject it.
    pub service: String,
    /// Which tries (`instance web-2, path /api`; `every try`).
    pub matches: String,
    /// What it does (`abort 503 (30 %)`).
    pub effect: String,
    /// Seconds left; `None`: until cleared.
    pub seconds_left: Option<f64>,
}

/// `fault` described at `now_ms`; `None` once it has ended.
pub fn describe(service: &str, fault: &Fault, now_ms: u64) -> Option<Active> {
    let seconds_left = match fault.expires_at_unix_ms {
        Some(end) if end <= now_ms => return None,
        Some(end) => Some((end - now_ms) as f64 / 1000.0),
        None => None,
    };
    let m = &fault.matches;
    let mut on: Vec<String> = Vec::new();
    if let Some(i) = &m.instance {
        on.push(format!("instance {}", i.as_str()));
    }
    if let Some(p) = &m.path_prefix {
        on.push(format!("path {}", String::from(p.clone())));
    }
    on.extend(m.headers.iter().map(|(k, v)| format!("{k}: {v}")));
    let mut effect: Vec<String> = Vec::new();
    if let Some(a) = fault.abort {
        effect.push(format!("abort {} ({} %)", a.status.get(), a.percent.get()));
    }
    if let Some(d) = fault.delay {
        effect.push(format!("delay {} ({} %)", d.duration, d.percent.get()));
    }
    if let Some(r) = fault.reset {
        effect.push(format!("reset ({} %)", r.get()));
    }
    Some(Active {
        service: service.to_string(),
        matches: if on.is_empty() {
            "every try".into()
        } else {
            on.join(", ")
        },
        effect: effect.join(", "),
        seconds_left,
    })
}

/// Every service with a fault still running, by name.
pub async fn list(admin: &Admin) -> Result<Vec<Active>> {
    let now = unix_ms_now();
    let mut out = BTreeMap::new();
    for s in admin.services().await? {
        if !s.has_policy {
            continue;
        }
        let policy = admin
            .policy(&s.name)
            .await
            .with_context(|| format!("the policy of {}", s.name))?;
        if let Some(a) = policy
            .fault
            .as_ref()
            .and_then(|f| describe(&s.name, f, now))
        {
            out.insert(s.name.clone(), a);
        }
    }
    Ok(out.into_values().collect())
}

/// `30s`, `1m 05s`, `until cleared`: time left for people.
pub fn left(seconds: Option<f64>) -> String {
    match seconds {
        None => "until cleared".into(),
        Some(s) if s < 60.0 => format!("{s:.0}s"),
        Some(s) => {
            let s = s.round() as u64;
            if s < 3600 {
                format!("{}m {:02}s", s / 60, s % 60)
            } else {
                format!("{}h {:02}m", s / 3600, (s % 3600) / 60)
            }
        }
    }
}

/// `KEY=VALUE` of `--header`.
pub fn header(s: &str) -> Result<(String, String), String> {
    let (k, v) = s
        .split_once('=')
        .ok_or_else(|| format!("{s:?}: write NAME=VALUE, e.g. x-canary=1"))?;
    Ok((k.trim().to_ascii_lowercase(), v.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(effect: Effect) -> Spec {
        Spec {
            instance: Some("web-2".into()),
            path_prefix: None,
            headers: vec![("x-canary".into(), "1".into())],
            effect,
            percent: 30.0,
            lasts: Some(Duration::from_secs(60)),
        }
    }

    #[test]
    fn a_fault_ends_its_duration_after_now_and_is_described() {
        let f = spec(Effect::Abort(503)).to_fault(1_000).expect("valid");
        assert_eq!(f.expires_at_unix_ms, Some(61_000));
        let a = describe("web", &f, 31_000).expect("running");
        assert_eq!(a.matches, "instance web-2, x-canary: 1");
        assert_eq!(a.effect, "abort 503 (30 %)");
        assert_eq!(a.seconds_left, Some(30.0));
        assert_eq!(describe("web", &f, 61_000), None, "ended at its end");
        let forever = Spec {
            lasts: None,
            ..spec(Effect::Reset)
        }
        .to_fault(1_000)
        .expect("valid");
        assert_eq!(forever.expires_at_unix_ms, None);
        let d = describe("web", &forever, u64::MAX).expect("never ends");
        assert_eq!((d.effect.as_str(), d.seconds_left), ("reset (30 %)", None));
        let delay = spec(Effect::Delay(Duration::from_millis(200)))
            .to_fault(0)
            .expect("valid");
        assert!(describe("web", &delay, 0).is_some_and(|a| a.effect.starts_with("delay 200ms")));
    }

    #[test]
    fn bad_faults_are_refused_naming_the_field() {
        let e = spec(Effect::Abort(99)).to_fault(0).expect_err("bad status");
        assert!(e.to_string().contains("fault.abort.status"), "{e}");
        let e = Spec {
            percent: 120.0,
            ..spec(Effect::Reset)
        }
        .to_fault(0)
        .expect_err("bad percent");
        assert!(e.to_string().contains("percent"), "{e}");
        let e = Spec {
            instance: Some("web 2".into()),
            ..spec(Effect::Reset)
        }
        .to_fault(0)
        .expect_err("bad instance");
        assert!(e.to_string().contains("fault.match.instance"), "{e}");
    }

    #[test]
    fn time_left_reads_well() {
        assert_eq!(left(None), "until cleared");
        assert_eq!(left(Some(4.4)), "4s");
        assert_eq!(left(Some(65.0)), "1m 05s");
        assert_eq!(left(Some(7260.0)), "2h 01m");
        assert_eq!(header("X-Canary=1"), Ok(("x-canary".into(), "1".into())));
        assert!(header("x-canary").is_err());
    }
}
