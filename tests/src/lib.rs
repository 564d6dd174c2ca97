//! Helpers for end-to-end tests: start the real binaries on loopback, read the
//! addresses they bound, and clean up whatever happens.
//!
//! The binaries must be built first (`cargo build --workspace --bins`, which
//! the README's test command does); a missing binary fails with that advice.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

pub mod docker;
pub mod etcd;
pub mod load;
pub mod mesh;
pub mod netns;
pub mod otlp;
pub mod scenario;
pub use scenario::{Running, Scenario, apply_policy};
use tonic::transport::Channel;

/// Upper bound for any single end-to-end test.
pub const TEST_TIMEOUT: Duration = Duration::from_secs(60);

/// Runs a test body within [`TEST_TIMEOUT`].
pub async fn bounded(f: impl std::future::Future<Output = Result<()>>) -> Result<()> {
    tokio::time::timeout(TEST_TIMEOUT, f)
        .await
        .context("test timed out")?
}

/// Path of a workspace binary next to the test executable.
pub fn bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    // target/<profile>/deps/<test> -> target/<profile>/<name>
    let dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("test executable lives in target/<profile>/deps");
    let path = dir.join(name);
    assert!(
        path.exists(),
        "{} is missing: run `cargo build --workspace --bins` before the tests",
        path.display()
    );
    path
}

/// A running `wf-control` with its own data directory. Killed on drop.
pub struct ControlPlane {
    child: Option<Child>,
    /// gRPC address.
    pub grpc: SocketAddr,
    /// HTTP address.
    pub http: SocketAddr,
    /// Data directory (kept across restarts).
    pub data: Arc<tempfile::TempDir>,
    args: Vec<String>,
    /// Everything it logged so far.
    pub log: Arc<Mutex<String>>,
}

impl ControlPlane {
    /// Starts wf-control on free loopback ports with a fresh data directory,
    /// `--insecure`: plaintext gRPC with no authentication, for the tests
    /// that are not about the control plane's security (those use
    /// [`ControlPlane::start_secure`], as the labs use its default).
    pub fn start(extra: &[&str]) -> Result<Self> {
        let data = Arc::new(tempfile::tempdir()?);
        Self::spawn(data, insecure(extra), "127.0.0.1:0", "127.0.0.1:0")
    }

    /// wf-control as it runs by default: TLS, every caller authenticated.
    pub fn start_secure(extra: &[&str]) -> Result<Self> {
        let data = Arc::new(tempfile::tempdir()?);
        let args = extra.iter().map(|s| s.to_string()).collect();
        Self::spawn(data, args, "127.0.0.1:0", "127.0.0.1:0")
    }

    /// [`ControlPlane::start`] with gRPC on `grpc` (an address other
    /// processes reach, e.g. a namespace lab's bridge).
    pub fn start_on(grpc: &str, extra: &[&str]) -> Result<Self> {
        let data = Arc::new(tempfile::tempdir()?);
        Self::spawn(data, insecure(extra), grpc, "127.0.0.1:0")
    }

    /// [`ControlPlane::start_secure`] with gRPC on `grpc`.
    pub fn start_secure_on(grpc: &str, extra: &[&str]) -> Result<Self> {
        let data = Arc::new(tempfile::tempdir()?);
        let args = extra.iter().map(|s| s.to_string()).collect();
        Self::spawn(data, args, grpc, "127.0.0.1:0")
    }

    /// Whether gRPC is TLS with authenticated callers.
    pub fn secure(&self) -> bool {
        !self.args.iter().any(|a| a == "--insecure")
    }

    /// The roots that verify its gRPC certificate (PEM file).
    pub fn bundle(&self) -> PathBuf {
        self.data.path().join("ca/bundle.crt")
    }

    /// The operator credential it wrote (wfctl's `--credentials`).
    pub fn credentials(&self) -> PathBuf {
        self.data.path().join("operator")
    }

    fn spawn(
        data: Arc<tempfile::TempDir>,
        args: Vec<String>,
        grpc: &str,
        http: &str,
    ) -> Result<Self> {
        let mut all: Vec<String> = vec![
            "--grpc".into(),
            grpc.into(),
            "--http".into(),
            http.into(),
            "--data-dir".into(),
        ];
        all.push(data.path().to_string_lossy().to_string());
        all.extend(args.iter().cloned());
        let (child, line, log) = spawn_logged("wf-control", &all, "wf-control serving")?;
        Ok(Self {
            child: Some(child),
            grpc: field(&line, "grpc=")?,
            http: field(&line, "http=")?,
            data,
            args,
            log,
        })
    }

    /// The log so far.
    pub fn log_text(&self) -> String {
        self.log.lock().map(|l| l.clone()).unwrap_or_default()
    }

    /// The log once it holds `needle` (see [`await_log`]).
    pub async fn await_log(&self, needle: &str) -> Result<String> {
        await_log(&self.log, needle).await
    }

    /// URL of the gRPC port: `https://` unless `--insecure`.
    pub fn url(&self) -> String {
        let scheme = if self.secure() { "https" } else { "http" };
        format!("{scheme}://{}", self.grpc)
    }

    /// A gRPC channel to it, as the operator (with its credential when secure).
    pub async fn channel(&self) -> Result<Channel> {
        if !self.secure() {
            return Ok(Channel::from_shared(self.url())?
                .connect_timeout(Duration::from_secs(5))
                .connect()
                .await?);
        }
        use rustls::pki_types::pem::PemObject;
        use rustls::pki_types::{CertificateDer, PrivateKeyDer};
        let dir = self.credentials();
        let chain = CertificateDer::pem_file_iter(dir.join("operator.crt"))?
            .collect::<Result<Vec<_>, _>>()?;
        let key = PrivateKeyDer::from_pem_file(dir.join("operator.key"))?;
        self.tls_channel(Some((chain, key))).await
    }

    /// A TLS gRPC channel to it presenting `client` (chain and key), or no
    /// certificate at all.
    pub async fn tls_channel(
        &self,
        client: Option<(
            Vec<rustls::pki_types::CertificateDer<'static>>,
            rustls::pki_types::PrivateKeyDer<'static>,
        )>,
    ) -> Result<Channel> {
        use rustls::pki_types::CertificateDer;
        use rustls::pki_types::pem::PemObject;
        let mut roots = rustls::RootCertStore::empty();
        for c in CertificateDer::pem_file_iter(self.bundle())? {
            roots.add(c?)?;
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let wants = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()?
            .with_root_certificates(roots);
        let mut cfg = match client {
            Some((chain, key)) => wants.with_client_auth_cert(chain, key)?,
            None => wants.with_no_client_auth(),
        };
        cfg.alpn_protocols = vec![b"h2".to_vec()];
        let tls = tokio_rustls::TlsConnector::from(Arc::new(cfg));
        let connector = wayfinder_proto::dial::Failover::new(
            vec![(self.grpc.ip().to_string(), self.grpc.port())],
            Some(tls),
        );
        Ok(
            tonic::transport::Endpoint::from_shared(format!("http://{}", self.grpc))?
                .connect_timeout(Duration::from_secs(5))
                .connect_with_connector(connector)
                .await?,
        )
    }

    /// Kills it without warning (SIGKILL): nothing unsaved survives.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Sends SIGTERM and waits for the exit status.
    pub fn terminate(&mut self) -> Result<std::process::ExitStatus> {
        let mut c = self.child.take().context("not running")?;
        terminate(&mut c)
    }

    /// Kills it and starts it again on the same ports and data directory.
    /// Meanwhile another test's outgoing connection may have been given one
    /// of those ports as its ephemeral source port: the bind is tried again
    /// for a while, until that connection is gone.
    pub fn restart(&mut self) -> Result<()> {
        self.kill();
        let (grpc, http) = (self.grpc.to_string(), self.http.to_string());
        let deadline = Instant::now() + Duration::from_secs(10);
        let next = loop {
            match Self::spawn(self.data.clone(), self.args.clone(), &grpc, &http) {
                Err(e)
                    if e.to_string().contains("Address already in use")
                        && Instant::now() < deadline =>
                {
                    std::thread::sleep(Duration::from_millis(200));
                }
                other => break other?,
            }
        };
        *self = next;
        Ok(())
    }

    /// GETs a path on the HTTP port; returns status and body.
    pub async fn get(&self, path: &str) -> Result<(u16, String)> {
        http_get(self.http, path).await
    }
}

impl Drop for ControlPlane {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A python with grpcio and its health stub (`deploy/setup.sh test` puts
/// them in target/grpc-venv; `WAYFINDER_GRPC_PYTHON` names another), or
/// why there is none.
pub fn python_grpc() -> std::result::Result<PathBuf, String> {
    let python = std::env::var_os("WAYFINDER_GRPC_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/grpc-venv/bin/python3")
        });
    let ok = Command::new(&python)
        .args(["-c", "import grpc, grpc_health"])
        .output()
        .is_ok_and(|o| o.status.success());
    if ok {
        Ok(python)
    } else {
        Err(format!(
            "no grpcio at {} (bash deploy/setup.sh test installs it)",
            python.display()
        ))
    }
}

/// The log once it holds `needle`, within 10 s. The log is read by a thread
/// of its own, so a line the process wrote may trail what the test saw
/// happen (a refused call's status, a peer's readiness) by a moment.
pub async fn await_log(log: &Mutex<String>, needle: &str) -> Result<String> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let text = log.lock().map(|l| l.clone()).unwrap_or_default();
        if text.contains(needle) {
            return Ok(text);
        }
        if tokio::time::Instant::now() > deadline {
            bail!("no {needle:?} in the log within 10 s:\n{text}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Starts a workspace binary, collects its stderr, and waits for the first
/// line containing `ready` (which usually carries the bound addresses).
pub fn spawn_logged(
    name: &str,
    args: &[String],
    ready: &str,
) -> Result<(Child, String, Arc<Mutex<String>>)> {
    spawn_logged_in(&[], name, args, ready)
}

/// [`spawn_logged`] behind a command prefix (`ip netns exec NS`, `setpriv`)
/// that execs the binary, so the child is the binary itself.
pub fn spawn_logged_in(
    prefix: &[String],
    name: &str,
    args: &[String],
    ready: &str,
) -> Result<(Child, String, Arc<Mutex<String>>)> {
    let mut cmd = command_in(prefix, bin(name));
    cmd.args(args).env("WAYFINDER_LOG", "info");
    spawn_command(cmd, name, ready)
}

/// `program` behind a command prefix that execs it (`ip netns exec NS`,
/// `setpriv ...`), or on its own when the prefix is empty.
pub fn command_in(prefix: &[String], program: impl AsRef<std::ffi::OsStr>) -> Command {
    match prefix.split_first() {
        Some((first, rest)) => {
            let mut c = Command::new(first);
            c.args(rest).arg(program);
            c
        }
        None => Command::new(program),
    }
}

/// Spawns `cmd`, collects its stderr, and waits (15 s at most) for the first
/// line containing `ready`.
pub fn spawn_command(
    mut cmd: Command,
    name: &str,
    ready: &str,
) -> Result<(Child, String, Arc<Mutex<String>>)> {
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("spawning {name}"))?;
    let stderr = child.stderr.take().context("stderr")?;
    let log = Arc::new(Mutex::new(String::new()));
    let (tx, rx) = std::sync::mpsc::channel();
    let sink = log.clone();
    let marker = ready.to_string();
    std::thread::spawn(move || {
        let mut tx = Some(tx);
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            // Into the log before the ready signal: whoever wakes on it
            // finds every line up to and including the ready line.
            if let Ok(mut l) = sink.lock() {
                l.push_str(&line);
                l.push('\n');
            }
            if line.contains(&marker)
                && let Some(tx) = tx.take()
            {
                let _ = tx.send(line);
            }
        }
    });
    match rx.recv_timeout(Duration::from_secs(15)) {
        Ok(line) => Ok((child, line, log)),
        Err(_) => {
            let _ = child.kill();
            let _ = child.wait();
            let text = log.lock().map(|l| l.clone()).unwrap_or_default();
            bail!("{name} did not become ready: {text}")
        }
    }
}

/// A running binary, killed on drop.
pub struct Process {
    child: Option<Child>,
    /// The line that said it was ready.
    pub ready_line: String,
    /// Everything it logged so far.
    pub log: Arc<Mutex<String>>,
}

impl Process {
    /// The process id, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// CPU time (user and system) the process has used so far.
    pub fn cpu_time(&self) -> Result<Duration> {
        let pid = self.pid().context("not running")?;
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
        // Fields after the command name (which may hold spaces): state is
        // field 3, utime and stime fields 14 and 15, in clock ticks.
        let rest = stat.rsplit_once(')').context("stat format")?.1;
        let fields: Vec<&str> = rest.split_whitespace().collect();
        let ticks: u64 = fields.get(11).context("utime")?.parse::<u64>()?
            + fields.get(12).context("stime")?.parse::<u64>()?;
        let hz = clock_ticks();
        Ok(Duration::from_secs_f64(ticks as f64 / hz))
    }

    /// Starts `name` with `args` and waits for `ready` in its log.
    pub fn start(name: &str, args: &[&str], ready: &str) -> Result<Self> {
        Self::start_in(&[], name, args, ready)
    }

    /// [`Process::start`] behind a command prefix (see [`spawn_logged_in`]).
    pub fn start_in(prefix: &[String], name: &str, args: &[&str], ready: &str) -> Result<Self> {
        let args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
        let (child, ready_line, log) = spawn_logged_in(prefix, name, &args, ready)?;
        Ok(Self {
            child: Some(child),
            ready_line,
            log,
        })
    }

    /// Any program (`cmd`), its stderr collected, once `ready` is in it.
    pub fn spawn(cmd: Command, name: &str, ready: &str) -> Result<Self> {
        let (child, ready_line, log) = spawn_command(cmd, name, ready)?;
        Ok(Self {
            child: Some(child),
            ready_line,
            log,
        })
    }

    /// An address field (`key=ADDR`) of the ready line.
    pub fn addr(&self, key: &str) -> Result<SocketAddr> {
        field(&self.ready_line, key)
    }

    /// The log so far.
    pub fn log_text(&self) -> String {
        self.log.lock().map(|l| l.clone()).unwrap_or_default()
    }

    /// The log once it holds `needle` (see [`await_log`]).
    pub async fn await_log(&self, needle: &str) -> Result<String> {
        await_log(&self.log, needle).await
    }

    /// Sends SIGTERM and waits (at most 15 s) for the exit status.
    pub fn terminate(&mut self) -> Result<std::process::ExitStatus> {
        let mut c = self.child.take().context("not running")?;
        terminate(&mut c)
    }

    /// Waits (up to `within`) for it to exit by itself.
    pub fn wait_exit(&mut self, within: Duration) -> Result<std::process::ExitStatus> {
        let child = self.child.as_mut().context("not running")?;
        let deadline = Instant::now() + within;
        loop {
            if let Some(status) = child.try_wait()? {
                self.child = None;
                return Ok(status);
            }
            if Instant::now() > deadline {
                bail!("still running after {within:?}");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Sends `signal` (`STOP`, `CONT`, ...): `STOP` freezes it as `docker
    /// pause` does, its sockets open and the kernel still answering for it.
    pub fn signal(&self, signal: &str) -> Result<()> {
        let pid = self.child.as_ref().context("not running")?.id();
        let ok = Command::new("kill")
            .args([&format!("-{signal}"), &pid.to_string()])
            .status()?
            .success();
        anyhow::ensure!(ok, "kill -{signal} {pid} failed");
        Ok(())
    }

    /// Kills it at once.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        self.kill();
    }
}

fn terminate(c: &mut Child) -> Result<std::process::ExitStatus> {
    Command::new("kill")
        .args(["-TERM", &c.id().to_string()])
        .status()?;
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        if let Some(s) = c.try_wait()? {
            return Ok(s);
        }
        if Instant::now() > deadline {
            let _ = c.kill();
            bail!("process did not exit within 15 s of SIGTERM");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn field(line: &str, key: &str) -> Result<SocketAddr> {
    let start = line.find(key).context("address in the start-up line")? + key.len();
    let rest = &line[start..];
    let end = rest
        .find(|c: char| c.is_whitespace() || c == ',')
        .unwrap_or(rest.len());
    Ok(rest[..end].parse()?)
}

/// A minimal HTTP/1.1 GET over a real socket (no client library needed for
/// plain text endpoints).
pub async fn http_get(addr: SocketAddr, path: &str) -> Result<(u16, String)> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await?;
    s.write_all(
        format!("GET {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .await?;
    let mut buf = Vec::new();
    s.read_to_end(&mut buf).await?;
    let text = String::from_utf8_lossy(&buf).to_string();
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .context("status line")?;
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    // Bodies from axum may be chunked; tests only search them for substrings.
    Ok((status, body))
}

/// `extra` with `--insecure` (once).
fn insecure(extra: &[&str]) -> Vec<String> {
    let mut args: Vec<String> = extra.iter().map(|s| s.to_string()).collect();
    if !args.iter().any(|a| a == "--insecure") {
        args.push("--insecure".into());
    }
    args
}

/// Runs `wfctl` against `cp` with `args` (as the operator, with its
/// credential); returns (exit success, stdout, stderr).
pub fn wfctl(cp: &ControlPlane, args: &[&str]) -> Result<(bool, String, String)> {
    let out = Command::new(bin("wfctl"))
        .env("WAYFINDER_CONTROL_PLANE", cp.url())
        .env("WAYFINDER_CREDENTIALS", cp.credentials())
        .args(args)
        .stdin(Stdio::null())
        .output()?;
    Ok((
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).to_string(),
        String::from_utf8_lossy(&out.stderr).to_string(),
    ))
}

/// Value of a Prometheus sample line `name{labels} value` (exact name match).
pub fn metric(text: &str, name: &str) -> Option<f64> {
    text.lines().filter(|l| !l.starts_with('#')).find_map(|l| {
        let (k, v) = l.rsplit_once(' ')?;
        (k == name).then(|| v.parse().ok()).flatten()
    })
}

/// One HTTP/1.1 request over a fresh connection: returns status, the raw
/// header block and the body (as received; may be chunked).
pub async fn http_request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    host: &str,
    body: &str,
) -> Result<(u16, String, String)> {
    http_request_within(addr, method, path, host, body, Duration::from_secs(10)).await
}

/// [`http_request`] waiting at most `limit` for the response.
pub async fn http_request_within(
    addr: SocketAddr,
    method: &str,
    path: &str,
    host: &str,
    body: &str,
    limit: Duration,
) -> Result<(u16, String, String)> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await?;
    let req = format!(
        "{method} {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    s.write_all(req.as_bytes()).await?;
    let mut buf = Vec::new();
    tokio::time::timeout(limit, s.read_to_end(&mut buf))
        .await
        .with_context(|| format!("response within {limit:?}"))??;
    let text = String::from_utf8_lossy(&buf).to_string();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .with_context(|| format!("no status line in {text:?}"))?;
    Ok((status, head.to_ascii_lowercase(), body.to_string()))
}

/// The lab's DNS server (answers service names like Docker's embedded DNS).
pub use wayfinder_cli::lab::dns::DnsServer;

/// The kernel's clock ticks per second (`getconf CLK_TCK`), 100 if unknown.
pub fn clock_ticks() -> f64 {
    Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| {
            String::from_utf8_lossy(&o.stdout)
                .trim()
                .parse::<f64>()
                .ok()
        })
        .filter(|hz| *hz > 0.0)
        .unwrap_or(100.0)
}

/// Writes `bytes` on `s` and reads the answer up to the close (5 s at most).
pub async fn finish_and_read(s: &mut tokio::net::TcpStream, bytes: &[u8]) -> Result<String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    s.write_all(bytes).await?;
    let mut answer = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut answer))
        .await
        .context("no answer and close within 5 s")??;
    Ok(String::from_utf8_lossy(&answer).into_owned())
}

/// How long an HTTP server at `addr` takes to close a slowloris client
/// (half a request, then nothing) and an idle keep-alive one (a request
/// answered, then nothing); an error if either stays open 5 s.
pub async fn slow_and_idle_closed(addr: SocketAddr) -> Result<Duration> {
    let mut slow = tokio::net::TcpStream::connect(addr).await?;
    let mut idle = tokio::net::TcpStream::connect(addr).await?;
    let started = Instant::now();
    let (slow, idle) = tokio::join!(
        finish_and_read(&mut slow, b"GET / HTTP/1.1\r\nHost: x\r\n"),
        finish_and_read(&mut idle, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"),
    );
    slow.context("the slowloris connection is closed")?;
    idle.context("the idle connection is closed")?;
    Ok(started.elapsed())
}
