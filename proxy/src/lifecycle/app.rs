//! `wf-proxy … run -- CMD ARGS…`: the app as the sidecar's child, in one
//! container. It starts once the sidecar is ready (so its first call is
//! meshed), hears reload signals at once and SIGTERM only after the
//! sidecar's lame duck (see the shutdown order in main.rs), and its exit
//! ends the sidecar with its exit code: Linkerd's `linkerd-await` and
//! Istio's `holdApplicationUntilProxyStarts` in one process tree.

use std::process::ExitStatus;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use tokio::sync::watch;

/// How the app ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ended {
    /// It ran and exited (or was killed by a signal).
    Exited(ExitStatus),
    /// It could not be started (no such program, …); said in the log.
    NotStarted,
    /// The sidecar was told to stop before the app had started.
    Cancelled,
    /// The app in the shared PID namespace is gone (its exit code is its
    /// container's, which compose reports).
    Gone,
}

impl Ended {
    /// The exit code the sidecar passes on: the app's, 128 + signal when a
    /// signal ended it, 127 when it never started, 143 (SIGTERM's) when it
    /// was cancelled.
    pub fn code(self) -> u8 {
        use std::os::unix::process::ExitStatusExt;
        match self {
            Ended::Exited(s) => match (s.code(), s.signal()) {
                (Some(c), _) => u8::try_from(c & 0xff).unwrap_or(1),
                (None, Some(sig)) => u8::try_from(128 + (sig & 0x7f)).unwrap_or(1),
                (None, None) => 1,
            },
            Ended::NotStarted => 127,
            Ended::Cancelled => 143,
            Ended::Gone => 0,
        }
    }
}

/// The supervised app.
pub struct App {
    /// Whether the app is the sidecar's child (`run`), which it starts and
    /// stops, rather than a neighbour it watches.
    child: bool,
    pid: OnceLock<u32>,
    cancelled: watch::Sender<bool>,
    ended: watch::Sender<Option<Ended>>,
}

impl App {
    fn new(child: bool) -> Arc<Self> {
        Arc::new(Self {
            child,
            pid: OnceLock::new(),
            cancelled: watch::channel(false).0,
            ended: watch::channel(None).0,
        })
    }

    /// Starts `command` once `ready()` holds (polled every 50 ms), with the
    /// sidecar's stdin, stdout and stderr.
    pub fn start_when_ready(
        command: Vec<String>,
        ready: impl Fn() -> bool + Send + 'static,
    ) -> Arc<Self> {
        let app = Self::new(true);
        let me = app.clone();
        tokio::spawn(async move {
            let mut cancelled = me.cancelled.subscribe();
            while !ready() {
                tokio::select! {
                    () = tokio::time::sleep(Duration::from_millis(50)) => {}
                    _ = cancelled.wait_for(|c| *c) => {
                        me.ended.send_replace(Some(Ended::Cancelled));
                        return;
                    }
                }
            }
            let Some((program, args)) = command.split_first() else {
                me.ended.send_replace(Some(Ended::NotStarted));
                return;
            };
            let mut child = match tokio::process::Command::new(program)
                .args(args)
                .kill_on_drop(true)
                .spawn()
            {
                Ok(c) => c,
                Err(e) => {
                    tracing::error!(program = %program, error = %e, "cannot start the app");
                    me.ended.send_replace(Some(Ended::NotStarted));
                    return;
                }
            };
            if let Some(pid) = child.id() {
                let _ = me.pid.set(pid);
            }
            tracing::info!(program = %program, pid = child.id(), "sidecar ready; app started");
            let ended = match child.wait().await {
                Ok(status) => Ended::Exited(status),
                Err(e) => {
                    tracing::error!(error = %e, "lost the app");
                    Ended::NotStarted
                }
            };
            tracing::info!(code = ended.code(), "app exited");
            me.ended.send_replace(Some(ended));
        });
        app
    }

    /// The app of a sidecar container whose PID namespace it shares
    /// (compose `pid: "service:…-sidecar"`, as `wfctl inject` writes for a
    /// job): ended once, after one was seen, no process of another
    /// container is left. The sidecar, PID 1
    /// there, reaps the orphans that come to it. Not signalled: the app
    /// runs as another user and its container's stop reaches it. Looked
    /// for every 2 ms until seen (two minutes at most), then every 50 ms:
    /// a job that lives less than that may go unseen, and its sidecar then
    /// stays until stopped.
    pub fn watch_pid_namespace() -> Arc<Self> {
        let app = Self::new(false);
        let me = app.clone();
        tokio::spawn(async move {
            let mut seen = false;
            let watching = tokio::time::Instant::now();
            loop {
                reap_orphans();
                let others = neighbours();
                if others > 0 && !seen {
                    tracing::info!(processes = others, "app seen in the shared PID namespace");
                    seen = true;
                }
                if seen && others == 0 {
                    tracing::info!("app exited");
                    me.ended.send_replace(Some(Ended::Gone));
                    return;
                }
                // A short job may live a few milliseconds: until it is seen
                // the namespace is looked at often (for two minutes, then
                // as after), once seen every 50 ms.
                let early = !seen && watching.elapsed() < Duration::from_secs(120);
                let every = if early { 2 } else { 50 };
                tokio::time::sleep(Duration::from_millis(every)).await;
            }
        });
        app
    }

    /// Whether the app is the sidecar's own child (which it stops).
    pub fn is_child(&self) -> bool {
        self.child
    }

    /// Sends `signal` to the app if it runs; before it started, SIGTERM
    /// and SIGINT cancel the start.
    pub fn signal(&self, signal: Signal) {
        match self.pid.get() {
            // Reaped: its pid may belong to another process by now.
            Some(_) if self.has_ended() => {}
            Some(&pid) => {
                let Ok(pid) = i32::try_from(pid) else { return };
                if let Err(e) = kill(Pid::from_raw(pid), signal) {
                    tracing::debug!(error = %e, ?signal, "signalling the app");
                }
            }
            None if matches!(signal, Signal::SIGTERM | Signal::SIGINT) => {
                self.cancelled.send_replace(true);
            }
            None => {}
        }
    }

    /// How it ended, once it has.
    pub async fn ended(&self) -> Ended {
        let mut rx = self.ended.subscribe();
        match rx.wait_for(Option::is_some).await {
            Ok(e) => e.unwrap_or(Ended::NotStarted),
            // The sender lives in `self`: not reached.
            Err(_) => Ended::NotStarted,
        }
    }

    /// Whether it has ended.
    pub fn has_ended(&self) -> bool {
        self.ended.borrow().is_some()
    }
}

/// Processes in this PID namespace from another container: those in
/// another cgroup than the sidecar's, zombies aside. The sidecar's own
/// healthchecks (`wf-proxy await`, exec'd into its container by Docker)
/// share its cgroup, but not for their first moments: runc shows up in the
/// namespace (`runc:[2:INIT]`), and may exec the healthcheck, before it
/// moves it into the container's cgroup; both names are left out.
fn neighbours() -> usize {
    let own = std::fs::read_to_string("/proc/self/cgroup").unwrap_or_default();
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return 0;
    };
    dir.filter_map(Result::ok)
        .filter(|e| {
            let name = e.file_name();
            if !name.to_string_lossy().bytes().all(|b| b.is_ascii_digit()) {
                return false;
            }
            let Ok(cgroup) = std::fs::read_to_string(e.path().join("cgroup")) else {
                return false;
            };
            // "PID (COMM) STATE …"; COMM may hold spaces and parentheses.
            let stat = std::fs::read_to_string(e.path().join("stat")).unwrap_or_default();
            let (Some(open), Some(close)) = (stat.find('('), stat.rfind(')')) else {
                return false;
            };
            let comm = &stat[open + 1..close];
            let state = stat[close + 1..].split_whitespace().next().unwrap_or("Z");
            cgroup != own
                && !comm.starts_with("runc")
                && comm != "wf-proxy"
                && state != "Z"
                && state != "X"
        })
        .count()
}

/// As PID 1 of the namespace, reaps the orphans reparented to it.
fn reap_orphans() {
    use nix::sys::wait::{WaitPidFlag, waitpid};
    if std::process::id() != 1 {
        return;
    }
    while let Ok(status) = waitpid(Pid::from_raw(-1), Some(WaitPidFlag::WNOHANG)) {
        if status == nix::sys::wait::WaitStatus::StillAlive {
            break;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn the_app_starts_once_ready_and_its_exit_code_comes_back() {
        let ready = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = ready.clone();
        let app =
            App::start_when_ready(vec!["sh".into(), "-c".into(), "exit 7".into()], move || {
                flag.load(std::sync::atomic::Ordering::Relaxed)
            });
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert!(!app.has_ended(), "started before ready");
        ready.store(true, std::sync::atomic::Ordering::Relaxed);
        assert_eq!(app.ended().await.code(), 7);
    }

    #[tokio::test]
    async fn a_signal_before_the_start_cancels_it_and_one_after_reaches_the_app() {
        let app = App::start_when_ready(vec!["sleep".into(), "30".into()], || false);
        app.signal(Signal::SIGTERM);
        assert_eq!(app.ended().await, Ended::Cancelled);

        let app = App::start_when_ready(vec!["sleep".into(), "30".into()], || true);
        while app.pid.get().is_none() {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        app.signal(Signal::SIGTERM);
        assert_eq!(app.ended().await.code(), 128 + 15);
        let missing = App::start_when_ready(vec!["/nonexistent/app".into()], || true);
        assert_eq!(missing.ended().await, Ended::NotStarted);
    }
}
