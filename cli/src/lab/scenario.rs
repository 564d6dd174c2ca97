//! Comparison scenarios: a load and a timeline of events, read from TOML.
//!
//! ```toml
//! duration = "60s"   # how long the load runs
//! rate = 40          # requests per second, per way (open loop)
//! timeout = "2s"     # a request slower than this has failed
//!
//! [[event]]
//! at = "40%"         # of the duration, or a time ("24s")
//! action = "kill"
//! target = "web2"
//!
//! [[event]]          # the callers' sidecars inject it (the mesh way only)
//! at = "10s"
//! action = "fault"
//! target = "web2"    # optional: tries to this instance only
//! abort = 503        # or delay = "200ms", or reset = true
//! percent = 100      # of the matching tries (default 100)
//!
//! [[event]]
//! at = "20s"
//! action = "fault-clear"
//! ```
//!
//! The same file drives the loopback lab and the Docker one. Everything is
//! checked when the file is read, before a process or container starts: a
//! bad file gets `FILE:LINE: field F: what is wrong`.

use std::path::Path;
use std::time::Duration;

use serde::Deserialize;

/// The scenario shipped with the project: what `wfctl lab compare` runs
/// without `--scenario`.
pub const DEFAULT: &str = include_str!("scenarios/default.toml");

/// A scenario file that cannot be used, located for its author.
#[derive(Debug, thiserror::Error, PartialEq)]
#[error("{file}:{line}: field {field}: {message}")]
pub struct ScenarioError {
    /// The file (or `default scenario`).
    pub file: String,
    /// 1-based line (0 when the file as a whole is wrong).
    pub line: usize,
    /// `duration`, `event[2].action`, ...
    pub field: String,
    /// What is wrong.
    pub message: String,
}

/// What an event does to the lab.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// SIGKILL the instance (app and sidecar): its DNS record goes.
    Kill,
    /// Freeze it (`docker pause`, SIGSTOP): connections hang, no FIN or RST.
    Pause,
    /// Undo pause, slow and unhealthy.
    Resume,
    /// Recreate it: it comes back with a new IP address.
    Restart,
    /// Add this much latency to everything it sends.
    Slow(Duration),
    /// Its health check fails while it keeps answering.
    Unhealthy,
    /// Start a new instance of the service under this name.
    Add,
    /// Kill the control plane.
    ControlDown,
    /// Start it again.
    ControlUp,
    /// The callers' sidecars inject this fault into calls to the service
    /// (tries to `target` only, when there is one), through the control
    /// plane as `wfctl fault inject` does.
    Fault(FaultEffect),
    /// Remove the fault (`wfctl fault clear`).
    FaultClear,
}

/// What an injected fault does, and to what share of the tries.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct FaultEffect {
    /// Abort, delay or reset.
    pub effect: crate::traffic::fault::Effect,
    /// Percent of the matching tries.
    pub percent: f64,
}

// Percents come from a checked range (0-100), never NaN.
impl Eq for FaultEffect {}

/// Whether an action names an instance.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TargetRule {
    /// It acts on one instance.
    Required,
    /// It may be narrowed to one.
    Optional,
    /// It acts on something else (the control plane, every caller).
    Never,
}

impl Action {
    /// The name scenario files use.
    pub fn name(&self) -> &'static str {
        match self {
            Action::Kill => "kill",
            Action::Pause => "pause",
            Action::Resume => "resume",
            Action::Restart => "restart",
            Action::Slow(_) => "slow",
            Action::Unhealthy => "unhealthy",
            Action::Add => "add",
            Action::ControlDown => "control-down",
            Action::ControlUp => "control-up",
            Action::Fault(_) => "fault",
            Action::FaultClear => "fault-clear",
        }
    }

    /// Whether it names an instance.
    pub fn target_rule(&self) -> TargetRule {
        match self {
            Action::ControlDown | Action::ControlUp | Action::FaultClear => TargetRule::Never,
            Action::Fault(_) => TargetRule::Optional,
            _ => TargetRule::Required,
        }
    }

    /// Whether it acts on one instance (and so needs a `target`).
    pub fn has_target(&self) -> bool {
        self.target_rule() == TargetRule::Required
    }
}

const ACTIONS: &str = "kill, pause, resume, restart, slow, unhealthy, add, control-down, control-up, fault, fault-clear";

/// One event of the timeline.
#[derive(Debug, Clone, PartialEq)]
pub struct Event {
    /// When, from the start of the load.
    pub at: Duration,
    /// What.
    pub action: Action,
    /// The instance (`web2`); empty for the control plane's events.
    pub target: String,
    /// The line of its `at`, `action` and `target`, for errors found
    /// later (a target the lab has not).
    pub lines: [usize; 3],
    /// Its place in the file (`event[index]`), which time order may change.
    pub index: usize,
}

impl Event {
    /// `web2 killed`, `control plane down`: the label on plots and tables.
    pub fn label(&self) -> String {
        match &self.action {
            Action::Kill => format!("{} killed", self.target),
            Action::Pause => format!("{} paused", self.target),
            Action::Resume => format!("{} resumed", self.target),
            Action::Restart => format!("{} restarted (new IP)", self.target),
            Action::Slow(d) => format!("{} slow (+{} ms)", self.target, d.as_millis()),
            Action::Unhealthy => format!("{} unhealthy", self.target),
            Action::Add => format!("{} added", self.target),
            Action::ControlDown => "control plane down".into(),
            Action::ControlUp => "control plane up".into(),
            Action::Fault(f) => {
                use crate::traffic::fault::Effect;
                let what = match f.effect {
                    Effect::Abort(s) => format!("abort {s}"),
                    Effect::Delay(d) => format!("delay {} ms", d.as_millis()),
                    Effect::Reset => "reset".into(),
                };
                let on = if self.target.is_empty() {
                    "every instance".to_string()
                } else {
                    self.target.clone()
                };
                format!("fault on {on}: {what} ({} %)", f.percent)
            }
            Action::FaultClear => "fault cleared".into(),
        }
    }
}

/// A checked scenario.
#[derive(Debug, Clone, PartialEq)]
pub struct Scenario {
    /// Where it came from, for messages.
    pub file: String,
    /// How long the load runs.
    pub duration: Duration,
    /// Requests per second, per way.
    pub rate: u32,
    /// A request slower than this has failed.
    pub timeout: Duration,
    /// Events in time order.
    pub events: Vec<Event>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawScenario {
    duration: toml::Spanned<String>,
    #[serde(default)]
    rate: Option<toml::Spanned<u32>>,
    #[serde(default)]
    timeout: Option<toml::Spanned<String>>,
    #[serde(default, rename = "event")]
    events: Vec<RawEvent>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawEvent {
    at: toml::Spanned<String>,
    action: toml::Spanned<String>,
    #[serde(default)]
    target: Option<toml::Spanned<String>>,
    #[serde(default)]
    delay: Option<toml::Spanned<String>>,
    #[serde(default)]
    abort: Option<toml::Spanned<u32>>,
    #[serde(default)]
    reset: Option<toml::Spanned<bool>>,
    #[serde(default)]
    percent: Option<toml::Spanned<f64>>,
}

impl Scenario {
    /// The shipped default.
    pub fn default_scenario() -> Self {
        // Checked by a unit test: it always parses.
        Self::parse("default scenario", DEFAULT).unwrap_or_else(|e| panic!("{e}"))
    }

    /// Reads and checks `path`.
    pub fn load(path: &Path) -> Result<Self, ScenarioError> {
        let name = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|e| ScenarioError {
            file: name.clone(),
            line: 0,
            field: "(file)".into(),
            message: format!("cannot read: {e}"),
        })?;
        Self::parse(&name, &text)
    }

    /// Parses and checks scenario TOML; `file` names it in errors.
    pub fn parse(file: &str, text: &str) -> Result<Self, ScenarioError> {
        let err = |offset: Option<usize>, field: Option<String>, message: String| {
            let (line, located) = offset.map_or((0, None), |o| locate(text, o));
            ScenarioError {
                file: file.to_string(),
                line,
                field: field.or(located).unwrap_or_else(|| "(file)".into()),
                message,
            }
        };
        let raw: RawScenario = toml::from_str(text).map_err(|e| {
            let message = e.message().trim().to_string();
            let offset = e.span().map(|s| s.start);
            // A missing field is named by the message, not where the span
            // (its whole table) starts.
            let missing = message
                .strip_prefix("missing field `")
                .and_then(|m| m.split('`').next())
                .map(|name| {
                    let table = offset
                        .and_then(|o| locate(text, o).1)
                        .filter(|f| f.starts_with("event["))
                        .map(|f| f.split('.').next().unwrap_or("").to_string());
                    match table {
                        Some(t) => format!("{t}.{name}"),
                        None => name.to_string(),
                    }
                });
            err(offset, missing, message)
        })?;
        let at = |s: &toml::Spanned<String>| s.span().start;
        let duration = parse_duration(raw.duration.get_ref())
            .filter(|d| *d >= Duration::from_secs(5) && *d <= Duration::from_secs(3600))
            .ok_or_else(|| {
                err(
                    Some(at(&raw.duration)),
                    Some("duration".into()),
                    format!(
                        "{:?}: give a time from 5s to 1h, as \"60s\" or \"2m\"",
                        raw.duration.get_ref()
                    ),
                )
            })?;
        let rate = match &raw.rate {
            None => 40,
            Some(r) if (1..=2000).contains(r.get_ref()) => *r.get_ref(),
            Some(r) => {
                return Err(err(
                    Some(r.span().start),
                    Some("rate".into()),
                    format!(
                        "{}: requests per second per way, from 1 to 2000",
                        r.get_ref()
                    ),
                ));
            }
        };
        let timeout = match &raw.timeout {
            None => Duration::from_secs(2),
            Some(t) => parse_duration(t.get_ref())
                .filter(|d| *d >= Duration::from_millis(10) && *d < duration)
                .ok_or_else(|| {
                    err(
                        Some(at(t)),
                        Some("timeout".into()),
                        format!(
                            "{:?}: give a time from 10ms up to the duration",
                            t.get_ref()
                        ),
                    )
                })?,
        };
        let mut events = Vec::new();
        for (i, e) in raw.events.iter().enumerate() {
            let field = |k: &str| Some(format!("event[{i}].{k}"));
            let when = e.at.get_ref().trim();
            let offset = match when.strip_suffix('%') {
                Some(p) => p
                    .trim()
                    .parse::<f64>()
                    .ok()
                    .filter(|p| *p > 0.0 && *p < 100.0)
                    .map(|p| duration.mul_f64(p / 100.0)),
                None => parse_duration(when).filter(|d| !d.is_zero() && *d < duration),
            }
            .ok_or_else(|| {
                err(
                    Some(at(&e.at)),
                    field("at"),
                    format!(
                        "{when:?}: give a share of the duration (\"40%\") or a time inside it (\"24s\")"
                    ),
                )
            })?;
            let delay = |d: &toml::Spanned<String>| {
                parse_duration(d.get_ref())
                    .filter(|v| !v.is_zero() && *v <= Duration::from_secs(30))
                    .ok_or_else(|| {
                        err(
                            Some(at(d)),
                            field("delay"),
                            format!("{:?}: give a time from 1ms to 30s", d.get_ref()),
                        )
                    })
            };
            let action = match e.action.get_ref().as_str() {
                "kill" => Action::Kill,
                "pause" => Action::Pause,
                "resume" => Action::Resume,
                "restart" => Action::Restart,
                "slow" => {
                    let d = e.delay.as_ref().ok_or_else(|| {
                        err(
                            Some(at(&e.action)),
                            field("delay"),
                            "slow needs a delay (\"200ms\")".into(),
                        )
                    })?;
                    Action::Slow(delay(d)?)
                }
                "unhealthy" => Action::Unhealthy,
                "add" => Action::Add,
                "control-down" => Action::ControlDown,
                "control-up" => Action::ControlUp,
                "fault" => Action::Fault(fault_effect(e, &err, &delay, i)?),
                "fault-clear" => Action::FaultClear,
                other => {
                    return Err(err(
                        Some(at(&e.action)),
                        field("action"),
                        format!("{other:?} is not an action ({ACTIONS})"),
                    ));
                }
            };
            let is_fault = matches!(action, Action::Fault(_));
            if let (Some(d), false) = (&e.delay, matches!(action, Action::Slow(_)) || is_fault) {
                return Err(err(
                    Some(at(d)),
                    field("delay"),
                    format!("only slow and fault take a delay, not {}", action.name()),
                ));
            }
            let only_fault = [
                ("abort", e.abort.as_ref().map(|v| v.span().start)),
                ("reset", e.reset.as_ref().map(|v| v.span().start)),
                ("percent", e.percent.as_ref().map(|v| v.span().start)),
            ];
            if let (Some((name, Some(offset))), false) =
                (only_fault.iter().find(|(_, o)| o.is_some()), is_fault)
            {
                return Err(err(
                    Some(*offset),
                    field(name),
                    format!("only fault takes {name}, not {}", action.name()),
                ));
            }
            let target = match (&e.target, action.target_rule()) {
                (Some(t), TargetRule::Required | TargetRule::Optional) => {
                    let name = t.get_ref();
                    if !is_instance_name(name) {
                        return Err(err(
                            Some(at(t)),
                            field("target"),
                            format!("{name:?} is not an instance name (letters, digits, '-', '_')"),
                        ));
                    }
                    name.clone()
                }
                (None, TargetRule::Required) => {
                    return Err(err(
                        Some(at(&e.action)),
                        field("target"),
                        format!("{} needs a target instance (\"web2\")", action.name()),
                    ));
                }
                (Some(t), TargetRule::Never) => {
                    let on = if action == Action::FaultClear {
                        "clears the service's fault"
                    } else {
                        "acts on the control plane"
                    };
                    return Err(err(
                        Some(at(t)),
                        field("target"),
                        format!("{} {on}: no target", action.name()),
                    ));
                }
                (None, _) => String::new(),
            };
            events.push(Event {
                at: offset,
                action,
                target,
                lines: [
                    locate(text, at(&e.at)).0,
                    locate(text, at(&e.action)).0,
                    e.target.as_ref().map_or(0, |t| locate(text, at(t)).0),
                ],
                index: i,
            });
        }
        // Events run in time order; a file may list them in any.
        events.sort_by_key(|e| e.at);
        Ok(Self {
            file: file.to_string(),
            duration,
            rate,
            timeout,
            events,
        })
    }

    /// An error about `event` found once the lab is known (a target it has
    /// not), located at the event's line.
    pub fn error_at(&self, event: &Event, field: &str, message: String) -> ScenarioError {
        let line = match field {
            "action" => event.lines[1],
            "target" if event.lines[2] > 0 => event.lines[2],
            _ => event.lines[0],
        };
        ScenarioError {
            file: self.file.clone(),
            line,
            field: format!("event[{}].{field}", event.index),
            message,
        }
    }

    /// Instances the scenario adds, in order.
    pub fn added(&self) -> Vec<&str> {
        self.events
            .iter()
            .filter(|e| e.action == Action::Add)
            .map(|e| e.target.as_str())
            .collect()
    }
}

/// A fault event's effect: one of `abort`, `delay` and `reset = true`, and
/// its `percent`.
fn fault_effect(
    e: &RawEvent,
    err: &impl Fn(Option<usize>, Option<String>, String) -> ScenarioError,
    delay: &impl Fn(&toml::Spanned<String>) -> Result<Duration, ScenarioError>,
    i: usize,
) -> Result<FaultEffect, ScenarioError> {
    use crate::traffic::fault::Effect;
    let field = |k: &str| Some(format!("event[{i}].{k}"));
    let reset = e.reset.as_ref().filter(|r| *r.get_ref());
    let effect = match (&e.abort, &e.delay, reset) {
        (Some(a), None, None) => {
            if !(200..=599).contains(a.get_ref()) {
                return Err(err(
                    Some(a.span().start),
                    field("abort"),
                    format!("{}: give an HTTP status from 200 to 599", a.get_ref()),
                ));
            }
            Effect::Abort(*a.get_ref())
        }
        (None, Some(d), None) => Effect::Delay(delay(d)?),
        (None, None, Some(_)) => Effect::Reset,
        _ => {
            return Err(err(
                Some(e.action.span().start),
                field("action"),
                "fault needs one of abort = STATUS, delay = \"200ms\" or reset = true".into(),
            ));
        }
    };
    let percent = match &e.percent {
        None => 100.0,
        Some(p) if (0.0..=100.0).contains(p.get_ref()) => *p.get_ref(),
        Some(p) => {
            return Err(err(
                Some(p.span().start),
                field("percent"),
                format!("{}: give a percentage from 0 to 100", p.get_ref()),
            ));
        }
    };
    Ok(FaultEffect { effect, percent })
}

fn is_instance_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
}

/// `500ms`, `2s`, `2m`: the policy files' durations.
fn parse_duration(s: &str) -> Option<Duration> {
    wayfinder_proto::policy::parse_duration(s.trim()).ok()
}

/// The 1-based line of `offset` and, inside the n-th `[[event]]`, the
/// field `event[n].key` written on that line.
fn locate(text: &str, offset: usize) -> (usize, Option<String>) {
    let offset = offset.min(text.len());
    let before = &text[..offset];
    let line_no = before.matches('\n').count() + 1;
    let line_start = before.rfind('\n').map_or(0, |i| i + 1);
    let line = text[line_start..].lines().next().unwrap_or("");
    let key = line
        .split_once('=')
        .map(|(k, _)| k.trim().to_string())
        .filter(|k| !k.is_empty() && !k.starts_with('#') && !k.starts_with('['));
    // Up to this line's end: on a `[[event]]` line, it is that event.
    let events_before = text[..line_start + line.len()]
        .lines()
        .filter(|l| l.trim().starts_with("[[event]]"))
        .count();
    let field = match (events_before, key) {
        (0, k) => k,
        (n, Some(k)) => Some(format!("event[{}].{k}", n - 1)),
        (n, None) => Some(format!("event[{}]", n - 1)),
    };
    (line_no, field)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_default_scenario_parses_and_keeps_time_order() {
        let s = Scenario::default_scenario();
        assert!(s.duration <= Duration::from_secs(120), "{:?}", s.duration);
        assert!(s.events.len() >= 8);
        assert!(s.events.windows(2).all(|w| w[0].at <= w[1].at));
        for want in [
            "kill",
            "pause",
            "restart",
            "slow",
            "unhealthy",
            "add",
            "control-down",
        ] {
            assert!(
                s.events.iter().any(|e| e.action.name() == want),
                "the default scenario has no {want}"
            );
        }
    }

    #[test]
    fn events_take_shares_and_times_and_sort() {
        let s = Scenario::parse(
            "s.toml",
            "duration = \"50s\"\nrate = 10\n\
             [[event]]\nat = \"30s\"\naction = \"add\"\ntarget = \"web4\"\n\
             [[event]]\nat = \"20%\"\naction = \"slow\"\ntarget = \"web3\"\ndelay = \"150ms\"\n\
             [[event]]\nat = \"90%\"\naction = \"control-down\"\n",
        )
        .expect("parses");
        let got: Vec<_> = s.events.iter().map(|e| (e.at, e.label())).collect();
        assert_eq!(
            got,
            [
                (Duration::from_secs(10), "web3 slow (+150 ms)".to_string()),
                (Duration::from_secs(30), "web4 added".to_string()),
                (Duration::from_secs(45), "control plane down".to_string()),
            ]
        );
        assert_eq!(
            s.events[0].lines,
            [8, 9, 10],
            "the 20% event's at, action, target"
        );
        assert_eq!(s.timeout, Duration::from_secs(2));
        assert_eq!(s.added(), ["web4"]);
    }

    fn error(text: &str) -> String {
        Scenario::parse("bad.toml", text)
            .expect_err("refused")
            .to_string()
    }

    #[test]
    fn bad_files_are_refused_with_line_and_field() {
        let ev = |body: &str| format!("duration = \"60s\"\n\n[[event]]\n{body}");
        for (text, want) in [
            (
                "duration = 60\n".to_string(),
                "bad.toml:1: field duration: invalid type",
            ),
            (
                "duration = \"soon\"\n".into(),
                "bad.toml:1: field duration: \"soon\"",
            ),
            (
                "rate = 5\n".into(),
                "bad.toml:1: field duration: missing field `duration`",
            ),
            (
                "duration = \"60s\"\nrate = 0\n".into(),
                "bad.toml:2: field rate: 0: requests per second",
            ),
            (
                "duration = \"60s\"\ntimeout = \"2m\"\n".into(),
                "bad.toml:2: field timeout: \"2m\"",
            ),
            (
                "duration = \"60s\"\nspeed = 3\n".into(),
                "bad.toml:2: field speed: unknown field `speed`",
            ),
            (
                ev("at = \"40%\"\naction = \"explode\"\ntarget = \"web2\"\n"),
                "bad.toml:5: field event[0].action: \"explode\" is not an action",
            ),
            (
                ev("at = \"140%\"\naction = \"kill\"\ntarget = \"web2\"\n"),
                "bad.toml:4: field event[0].at: \"140%\"",
            ),
            (
                ev("at = \"61s\"\naction = \"kill\"\ntarget = \"web2\"\n"),
                "bad.toml:4: field event[0].at: \"61s\"",
            ),
            (
                ev("at = \"40%\"\naction = \"kill\"\n"),
                "bad.toml:5: field event[0].target: kill needs a target",
            ),
            (
                ev("at = \"40%\"\naction = \"control-up\"\ntarget = \"web2\"\n"),
                "bad.toml:6: field event[0].target: control-up acts on the control plane",
            ),
            (
                ev("at = \"40%\"\naction = \"slow\"\ntarget = \"web2\"\n"),
                "bad.toml:5: field event[0].delay: slow needs a delay",
            ),
            (
                ev("at = \"40%\"\naction = \"kill\"\ntarget = \"web2\"\ndelay = \"1s\"\n"),
                "bad.toml:7: field event[0].delay: only slow and fault take a delay",
            ),
            (
                ev("at = \"40%\"\naction = \"fault\"\ntarget = \"web2\"\n"),
                "bad.toml:5: field event[0].action: fault needs one of abort",
            ),
            (
                ev("at = \"40%\"\naction = \"fault\"\nabort = 503\nreset = true\n"),
                "bad.toml:5: field event[0].action: fault needs one of abort",
            ),
            (
                ev("at = \"40%\"\naction = \"fault\"\nabort = 99\n"),
                "bad.toml:6: field event[0].abort: 99: give an HTTP status",
            ),
            (
                ev("at = \"40%\"\naction = \"fault\"\nabort = 503\npercent = 150\n"),
                "bad.toml:7: field event[0].percent: 150: give a percentage",
            ),
            (
                ev("at = \"40%\"\naction = \"kill\"\ntarget = \"web2\"\nabort = 503\n"),
                "bad.toml:7: field event[0].abort: only fault takes abort, not kill",
            ),
            (
                ev("at = \"40%\"\naction = \"fault-clear\"\ntarget = \"web2\"\n"),
                "bad.toml:6: field event[0].target: fault-clear clears the service's fault: no target",
            ),
            (
                ev("at = \"40%\"\naction = \"kill\"\ntarget = \"web 2\"\n"),
                "bad.toml:6: field event[0].target: \"web 2\" is not an instance name",
            ),
            (
                ev("action = \"kill\"\ntarget = \"web2\"\n"),
                "bad.toml:3: field event[0].at: missing field `at`",
            ),
            (
                ev("at = \"40%\"\naction = \"kill\"\ntarget = \"web2\"\nwhen = 1\n"),
                "bad.toml:7: field event[0].when: unknown field `when`",
            ),
        ] {
            let got = error(&text);
            assert!(got.starts_with(want), "{text}\ngot:  {got}\nwant: {want}");
        }
    }

    #[test]
    fn fault_events_take_an_effect_a_share_and_an_optional_instance() {
        use crate::traffic::fault::Effect;
        let s = Scenario::parse(
            "s.toml",
            "duration = \"60s\"\n\
             [[event]]\nat = \"10s\"\naction = \"fault\"\ntarget = \"web2\"\nabort = 503\n\
             [[event]]\nat = \"20s\"\naction = \"fault\"\ndelay = \"200ms\"\npercent = 25\n\
             [[event]]\nat = \"25s\"\naction = \"fault\"\nreset = true\npercent = 5.5\n\
             [[event]]\nat = \"30s\"\naction = \"fault-clear\"\n",
        )
        .expect("parses");
        let got: Vec<_> = s
            .events
            .iter()
            .map(|e| (e.action.clone(), e.target.as_str()))
            .collect();
        assert_eq!(
            got,
            [
                (
                    Action::Fault(FaultEffect {
                        effect: Effect::Abort(503),
                        percent: 100.0
                    }),
                    "web2"
                ),
                (
                    Action::Fault(FaultEffect {
                        effect: Effect::Delay(Duration::from_millis(200)),
                        percent: 25.0
                    }),
                    ""
                ),
                (
                    Action::Fault(FaultEffect {
                        effect: Effect::Reset,
                        percent: 5.5
                    }),
                    ""
                ),
                (Action::FaultClear, ""),
            ]
        );
        assert_eq!(s.events[0].label(), "fault on web2: abort 503 (100 %)");
        assert_eq!(
            s.events[1].label(),
            "fault on every instance: delay 200 ms (25 %)"
        );
        assert_eq!(s.events[3].label(), "fault cleared");
    }
}
