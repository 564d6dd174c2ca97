//! Chaos on a schedule: one event every `every`, in turn an instance
//! killed and started again, a control-plane replica killed and started
//! again, an etcd member stopped and started again (with replicas), the
//! policy changed and changed back, and a certificate renewal. Each event
//! has a window, from its start to `settle` after its end, inside which
//! failed calls are expected; when the window closes, every replica is
//! asked whether every instance is still registered and serving.

use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use crate::Clock;
use crate::journal::Journal;
use crate::mesh::Mesh;
use crate::traffic::Rules;

/// What happened.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    KillInstance,
    RestartControlPlane,
    StopEtcdMember,
    ChangePolicy,
    RenewCertificate,
}

/// The schedule's times.
pub struct Timing {
    /// From one event's start to the next's.
    pub every: Duration,
    /// How long a process stays down, and the changed policy in force.
    pub down: Duration,
    /// How long after an event's end its window stays open.
    pub settle: Duration,
    /// Workload certificate lifetime (a renewal is waited for up to 70% of it).
    pub cert_lifetime: Duration,
}

/// The two policies chaos switches between, and the rules in force.
pub struct Policies {
    /// What runs normally: TOML and its rules.
    pub baseline: (&'static str, Rules),
    /// What chaos changes to for a while.
    pub variant: (&'static str, Rules),
    /// Read by every call as it starts.
    pub in_force: Arc<RwLock<Rules>>,
}

/// An instance a replica did not list as serving when a window closed.
#[derive(Clone, Debug)]
pub struct Missing {
    /// When the check found it.
    pub at: f64,
    pub replica: String,
    pub instance: String,
    /// What the replica said instead ("missing", "not_serving", an error).
    pub state: String,
    /// Seconds until it was back, if it came back while watched.
    pub back_after: Option<f64>,
}

/// One chaos event.
#[derive(Clone, Debug)]
pub struct Event {
    pub kind: Kind,
    /// What was done, for the report.
    pub what: String,
    /// The window: from `started` to `settled` (`ended` + settle).
    pub started: f64,
    pub ended: f64,
    pub settled: f64,
    /// What went wrong doing it.
    pub error: Option<String>,
    /// The registration check when the window closed.
    pub missing: Vec<Missing>,
}

impl Event {
    /// Whether `[from, to]` overlaps its window.
    pub fn covers(&self, from: f64, to: f64) -> bool {
        from <= self.settled && to >= self.started
    }
}

/// The events and whose turn is next.
pub struct Chaos {
    timing: Timing,
    policies: Policies,
    journal: Journal,
    clock: Clock,
    cycle: Vec<Kind>,
    /// How many times each kind ran, which picks its next target.
    turns: [usize; 5],
    /// Every event so far.
    pub events: Vec<Event>,
}

impl Chaos {
    /// The cycle for `mesh`: no etcd member to stop on the embedded store.
    pub fn new(
        mesh: &Mesh,
        timing: Timing,
        policies: Policies,
        journal: Journal,
        clock: Clock,
    ) -> Self {
        let mut cycle = vec![Kind::KillInstance, Kind::RestartControlPlane];
        if mesh.members() > 0 {
            cycle.push(Kind::StopEtcdMember);
        }
        cycle.extend([Kind::ChangePolicy, Kind::RenewCertificate]);
        Self {
            timing,
            policies,
            journal,
            clock,
            cycle,
            turns: [0; 5],
            events: Vec::new(),
        }
    }

    /// Runs events until `end` seconds: one every `every` (later when the
    /// one before settled late), none that could not settle before `end`.
    pub async fn run(&mut self, mesh: &mut Mesh, end: f64) {
        let every = self.timing.every.as_secs_f64();
        let room = (self.timing.down + self.timing.settle).as_secs_f64() + 5.0;
        let mut next = every;
        loop {
            if let Some(last) = self.events.last() {
                next = next.max(last.settled + 1.0);
            }
            if next + room > end {
                return;
            }
            self.clock.until(next).await;
            let kind = self.cycle[self.events.len() % self.cycle.len()];
            let e = self.one(mesh, kind).await;
            println!(
                "  chaos at {:>5.0} s: {}{}{}",
                e.started,
                e.what,
                e.error
                    .as_ref()
                    .map_or(String::new(), |w| format!(" FAILED: {w}")),
                if e.missing.is_empty() {
                    String::new()
                } else {
                    format!(" ({} not serving after it settled)", e.missing.len())
                }
            );
            self.events.push(e);
            next += every;
        }
    }

    /// One event of `kind`, its window closed and checked.
    async fn one(&mut self, mesh: &mut Mesh, kind: Kind) -> Event {
        let turn = self.turns[kind as usize];
        self.turns[kind as usize] += 1;
        let started = self.clock.now();
        let down = self.timing.down;
        let secs = down.as_secs();
        let (what, result) = match kind {
            // Its window is around the renewal, whenever that comes.
            Kind::RenewCertificate => return self.renewal(mesh).await,
            Kind::KillInstance => {
                let i = turn % mesh.instances();
                mesh.kill_instance(i);
                tokio::time::sleep(down).await;
                let what = format!(
                    "kill -9 {} (app and sidecar), started again {secs} s later",
                    mesh.instance(i)
                );
                (what, mesh.start_instance(i).await)
            }
            Kind::RestartControlPlane => {
                let i = turn % mesh.replicas();
                mesh.kill_replica(i);
                tokio::time::sleep(down).await;
                let what = format!("kill -9 {}, started again {secs} s later", mesh.replica(i));
                (what, mesh.start_replica(i))
            }
            Kind::StopEtcdMember => {
                let i = turn % mesh.members();
                mesh.stop_member(i);
                tokio::time::sleep(down).await;
                let what = format!(
                    "etcd member {} stopped (kill -9), started again {secs} s later",
                    mesh.member(i)
                );
                (what, mesh.start_member(i).await)
            }
            Kind::ChangePolicy => {
                let what = format!(
                    "web's policy changed (2 attempts, no retry on reset, 3 s request timeout), changed back {secs} s later"
                );
                (what, self.change_policy(mesh).await)
            }
        };
        let ended = self.clock.now();
        self.close(mesh, kind, what, (started, ended), result.err())
            .await
    }

    /// The variant policy for `down`, then the baseline again.
    async fn change_policy(&self, mesh: &Mesh) -> anyhow::Result<()> {
        let p = &self.policies;
        mesh.apply_policy("variant", p.variant.0)?;
        self.set_rules(&p.variant.1);
        tokio::time::sleep(self.timing.down).await;
        let back = mesh.apply_policy("baseline", p.baseline.0);
        if back.is_ok() {
            self.set_rules(&p.baseline.1);
        }
        back
    }

    fn set_rules(&self, rules: &Rules) {
        *self
            .policies
            .in_force
            .write()
            .unwrap_or_else(|p| p.into_inner()) = rules.clone();
    }

    /// Waits for the next certificate renewal any sidecar makes; its window
    /// opens a second before the soak read it.
    async fn renewal(&mut self, mesh: &Mesh) -> Event {
        let from = self.clock.now();
        let wait = self.timing.cert_lifetime.mul_f64(0.7) + Duration::from_secs(10);
        let deadline = from + wait.as_secs_f64();
        loop {
            if let Some(e) = self.journal.renewed_after(from) {
                let what = format!(
                    "certificate of {} renewed (automatic, at 70% of its lifetime)",
                    e.role
                );
                return self
                    .close(mesh, Kind::RenewCertificate, what, (e.t - 1.0, e.t), None)
                    .await;
            }
            let now = self.clock.now();
            if now > deadline {
                let what = "waited for a certificate renewal".to_string();
                let error = Some(anyhow::anyhow!("none within {} s", wait.as_secs()));
                return self
                    .close(mesh, Kind::RenewCertificate, what, (now, now), error)
                    .await;
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }

    /// Waits out the settle time, then checks registrations.
    async fn close(
        &self,
        mesh: &Mesh,
        kind: Kind,
        what: String,
        (started, ended): (f64, f64),
        error: Option<anyhow::Error>,
    ) -> Event {
        let settled = ended + self.timing.settle.as_secs_f64();
        self.clock.until(settled).await;
        let missing = check(mesh, self.clock, self.timing.settle).await;
        Event {
            kind,
            what,
            started,
            ended,
            settled,
            error: error.map(|e| format!("{e:#}")),
            missing,
        }
    }
}

/// Every expected instance some running replica does not list as serving,
/// each watched (once a second, up to `within`) until it is back.
pub async fn check(mesh: &Mesh, clock: Clock, within: Duration) -> Vec<Missing> {
    let at = clock.now();
    let mut missing: Vec<Missing> = mesh
        .unserved()
        .await
        .into_iter()
        .map(|(replica, instance, state)| Missing {
            at,
            replica,
            instance,
            state,
            back_after: None,
        })
        .collect();
    let deadline = Instant::now() + within;
    while Instant::now() < deadline && missing.iter().any(|m| m.back_after.is_none()) {
        tokio::time::sleep(Duration::from_secs(1)).await;
        let still = mesh.unserved().await;
        for m in missing.iter_mut().filter(|m| m.back_after.is_none()) {
            if !still
                .iter()
                .any(|(r, i, _)| *r == m.replica && *i == m.instance)
            {
                m.back_after = Some(clock.now() - at);
            }
        }
    }
    missing
}
