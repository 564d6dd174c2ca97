//! The soak's traffic: four kinds of call through the client sidecar, each
//! at its share of the rate (open loop: a call starts on its tick whatever
//! the ones before it do), and every failed call kept with its reason and
//! a judgment of whether the mesh could have retried it.
//!
//! - HTTP/1.1: `GET /` on one keep-alive connection pool.
//! - HTTP/2: `GET /` over h2c with prior knowledge.
//! - gRPC: lab-app's `Echo.Say`, unary (a POST, so retried only where the
//!   policy says so for gRPC, or when nothing reached the app).
//! - TCP: a new connection to `echo`, three line round trips, closed.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::sync::watch;
use tokio::task::JoinSet;
use tonic::transport::Channel;
use wayfinder_proto::lab::v1::SayRequest;
use wayfinder_proto::lab::v1::echo_client::EchoClient;
use wayfinder_proto::policy::{PolicyFile, RetryOn};

use crate::{Clock, lock};

/// How long a call may take before the soak gives up on it (longer than
/// any request timeout the policies set, so the mesh answers first).
const CALL_TIMEOUT: Duration = Duration::from_secs(10);
/// Line round trips per TCP call.
const ROUNDS: usize = 3;
/// The sidecar's error and attempts headers.
const ERROR_HEADER: &str = "x-wayfinder-error";
const ATTEMPTS_HEADER: &str = "x-wayfinder-attempts";

/// A kind of call.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Kind {
    Http1,
    Http2,
    Grpc,
    Tcp,
}

impl Kind {
    /// Every kind, in report order.
    pub const ALL: [Kind; 4] = [Kind::Http1, Kind::Http2, Kind::Grpc, Kind::Tcp];

    /// Its name in the report.
    pub fn name(self) -> &'static str {
        match self {
            Kind::Http1 => "HTTP/1.1",
            Kind::Http2 => "HTTP/2",
            Kind::Grpc => "gRPC",
            Kind::Tcp => "TCP",
        }
    }
}

/// Whether the mesh could have retried a failed call, judged from what the
/// client saw and the policy in force when the call started.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Retry {
    /// The policy retries no such outcome for such a call: a POST after a
    /// reset or a per-try timeout, no endpoint left to try, the request's
    /// own time up, an answer cut after its headers, a relay cut
    /// mid-stream.
    NotAllowed,
    /// Allowed, and every attempt the policy gives was used.
    Exhausted,
    /// Allowed with attempts left, but no retry was made (the budget or the
    /// retry breaker said no).
    NotTaken,
    /// The client cannot tell: no answer from the client sidecar, or a TCP
    /// connection closed before its first echo (a connect the sidecar
    /// retries, or a relay broken at once).
    Unknown,
}

impl Retry {
    /// Its name in the report.
    pub fn name(self) -> &'static str {
        match self {
            Retry::NotAllowed => "no retry allowed",
            Retry::Exhausted => "retries allowed, all used",
            Retry::NotTaken => "retry allowed, not made",
            Retry::Unknown => "cannot tell",
        }
    }
}

/// What of a policy judging a failure needs.
#[derive(Clone, Debug)]
pub struct Rules {
    /// Attempts, the first included.
    pub max_attempts: u32,
    /// Conditions retried.
    pub on: Vec<RetryOn>,
    /// Whether POSTs are retried like GETs.
    pub non_idempotent: bool,
    /// The whole request's time.
    pub request_timeout: Duration,
}

impl Rules {
    /// The rules `service` has in the policy `toml`, which must set every
    /// field they are made of (the sidecar's defaults are not repeated here).
    pub fn of(toml: &str, service: &str) -> Result<Rules> {
        let file = PolicyFile::parse("soak policy", toml).map_err(|e| anyhow::anyhow!("{e}"))?;
        let p = file
            .services
            .iter()
            .find(|(name, _)| name.as_str() == service)
            .map(|(_, p)| p)
            .with_context(|| format!("no policy for {service}"))?;
        let r = p.retries.as_ref().context("no retries")?;
        let t = p.timeouts.as_ref().context("no timeouts")?;
        Ok(Rules {
            max_attempts: r.max_attempts.context("no max_attempts")?.get(),
            on: r.retry_on.clone().context("no retry_on")?,
            non_idempotent: r.non_idempotent.context("no non_idempotent")?,
            request_timeout: Duration::from_millis(
                t.request.context("no request timeout")?.get().into(),
            ),
        })
    }

    /// Whether the mesh could have retried what `a` says happened, for a
    /// GET (`post` false) or a gRPC call (a POST), mirroring the sidecar's
    /// retry decision.
    fn judge(&self, a: &Answer<'_>, post: bool) -> Retry {
        let has = |c: RetryOn| self.on.contains(&c);
        let repeatable = !post || self.non_idempotent;
        let allowed = match a.error {
            Some("connect-failed") => has(RetryOn::ConnectFailure),
            Some("upstream-reset") => has(RetryOn::Reset) && repeatable,
            Some("timeout") => {
                // The request's own deadline ends every try. Short of it, a
                // 504 is a per-try timeout or a connect timeout, which is
                // retried even for a POST: counted as allowed when either
                // could be.
                let deadline = a.elapsed + Duration::from_millis(100) >= self.request_timeout;
                let per_try =
                    (has(RetryOn::GatewayError) || has(RetryOn::ServerError)) && repeatable;
                !deadline && (per_try || has(RetryOn::ConnectFailure))
            }
            // no-endpoints, discovery-pending, overloaded and the like: the
            // sidecar had nowhere to send a try, or refused the call itself.
            Some(_) => false,
            None => match a.grpc {
                Some(code) => u32::try_from(code)
                    .ok()
                    .and_then(RetryOn::for_grpc_status)
                    .is_some_and(has),
                None => {
                    let s = a.status;
                    let matches = (s >= 500 && has(RetryOn::ServerError))
                        || (s == 503 && has(RetryOn::Unavailable503))
                        || ((502..=504).contains(&s) && has(RetryOn::GatewayError));
                    matches && repeatable
                }
            },
        };
        match (allowed, a.attempts.unwrap_or(1) >= self.max_attempts) {
            (false, _) => Retry::NotAllowed,
            (true, true) => Retry::Exhausted,
            (true, false) => Retry::NotTaken,
        }
    }
}

/// A failed answer as the client saw it.
struct Answer<'a> {
    status: u16,
    /// `x-wayfinder-error`: the sidecar answered itself, and why.
    error: Option<&'a str>,
    /// `x-wayfinder-attempts`.
    attempts: Option<u32>,
    /// The gRPC status code of a gRPC call.
    grpc: Option<i32>,
    elapsed: Duration,
}

impl Answer<'_> {
    fn reason(&self) -> String {
        let from = self.error.unwrap_or("from the app");
        match self.grpc {
            Some(code) => format!("grpc-status {code} {from}"),
            None => format!("{} {from}", self.status),
        }
    }
}

/// One failed call.
#[derive(Clone, Debug)]
pub struct Failure {
    /// Its kind.
    pub kind: Kind,
    /// When it started and ended, seconds on the soak's clock.
    pub started: f64,
    pub ended: f64,
    /// Status and `x-wayfinder-error`, or the I/O error.
    pub reason: String,
    /// Whether the mesh could have retried it.
    pub retry: Retry,
    /// `x-wayfinder-attempts`, when the answer had it.
    pub attempts: Option<u32>,
}

/// One kind's counts.
#[derive(Default)]
pub struct Tally {
    pub ok: u64,
    pub failed: u64,
    /// Calls that succeeded after more than one attempt.
    pub retried_ok: u64,
    /// Latencies of the calls that succeeded, ms.
    pub latencies_ms: Vec<f32>,
}

/// Every call so far.
#[derive(Default)]
pub struct Record {
    pub tally: BTreeMap<Kind, Tally>,
    pub failures: Vec<Failure>,
}

impl Record {
    /// Calls finished so far.
    pub fn calls(&self) -> u64 {
        self.tally.values().map(|t| t.ok + t.failed).sum()
    }
}

/// How a call ended.
enum Ended {
    Ok {
        attempts: Option<u32>,
    },
    Failed {
        reason: String,
        retry: Retry,
        attempts: Option<u32>,
    },
}

fn failed(reason: impl Into<String>, retry: Retry) -> Ended {
    Ended::Failed {
        reason: reason.into(),
        retry,
        attempts: None,
    }
}

/// The clients, one per kind, shared by every call of that kind.
pub struct Callers {
    h1: Client<HttpConnector, Empty<Bytes>>,
    h2: Client<HttpConnector, Empty<Bytes>>,
    grpc: EchoClient<Channel>,
    web: SocketAddr,
    echo: SocketAddr,
}

impl Callers {
    /// Clients of the client sidecar's `web` and `echo` listeners.
    pub fn new(web: SocketAddr, echo: SocketAddr) -> Result<Self> {
        let channel = Channel::from_shared(format!("http://{web}"))?.connect_lazy();
        Ok(Self {
            h1: Client::builder(TokioExecutor::new()).build_http(),
            h2: Client::builder(TokioExecutor::new())
                .http2_only(true)
                .build_http(),
            grpc: EchoClient::new(channel),
            web,
            echo,
        })
    }

    async fn call(&self, kind: Kind, n: u64, rules: &Rules) -> Ended {
        match kind {
            Kind::Http1 => http(&self.h1, self.web, rules).await,
            Kind::Http2 => http(&self.h2, self.web, rules).await,
            Kind::Grpc => grpc(self.grpc.clone(), n, rules).await,
            Kind::Tcp => tcp(self.echo, n).await,
        }
    }
}

/// `GET /` through `client`.
async fn http(
    client: &Client<HttpConnector, Empty<Bytes>>,
    web: SocketAddr,
    rules: &Rules,
) -> Ended {
    let started = Instant::now();
    let req = hyper::Request::get(format!("http://{web}/")).body(Empty::new());
    let Ok(req) = req else {
        return failed("request not built", Retry::Unknown);
    };
    let resp = match tokio::time::timeout(CALL_TIMEOUT, client.request(req)).await {
        Err(_) => return failed("no answer within 10 s", Retry::Unknown),
        Ok(Err(e)) => return failed(format!("io: {}", chain(&e)), Retry::Unknown),
        Ok(Ok(r)) => r,
    };
    let status = resp.status().as_u16();
    let error = header(resp.headers(), ERROR_HEADER);
    let attempts = header(resp.headers(), ATTEMPTS_HEADER).and_then(|v| v.parse().ok());
    let body = tokio::time::timeout(CALL_TIMEOUT, resp.into_body().collect()).await;
    if (200..300).contains(&status) {
        // Once the headers are out, the answer cannot be tried again.
        return match body {
            Ok(Ok(_)) => Ended::Ok { attempts },
            Ok(Err(e)) => failed(format!("body: {}", chain(&e)), Retry::NotAllowed),
            Err(_) => failed("body not whole within 10 s", Retry::NotAllowed),
        };
    }
    let a = Answer {
        status,
        error: error.as_deref(),
        attempts,
        grpc: None,
        elapsed: started.elapsed(),
    };
    Ended::Failed {
        reason: a.reason(),
        retry: rules.judge(&a, false),
        attempts,
    }
}

/// `Echo.Say` through the client sidecar.
async fn grpc(mut client: EchoClient<Channel>, n: u64, rules: &Rules) -> Ended {
    let started = Instant::now();
    let message = format!("soak {n}");
    let said = client.say(SayRequest {
        message: message.clone(),
    });
    let status = match tokio::time::timeout(CALL_TIMEOUT, said).await {
        Err(_) => return failed("no answer within 10 s", Retry::Unknown),
        Ok(Ok(resp)) => {
            let attempts = resp
                .metadata()
                .get(ATTEMPTS_HEADER)
                .and_then(|v| v.to_str().ok()?.parse().ok());
            if resp.get_ref().message != message {
                return failed("wrong echo", Retry::NotAllowed);
            }
            return Ended::Ok { attempts };
        }
        Ok(Err(status)) => status,
    };
    let md = status.metadata();
    let error = md.get(ERROR_HEADER).and_then(|v| v.to_str().ok());
    let attempts = md
        .get(ATTEMPTS_HEADER)
        .and_then(|v| v.to_str().ok()?.parse().ok());
    // A status with no response headers at all came from the client's own
    // transport: the client sidecar did not answer.
    if error.is_none() && md.get("content-type").is_none() {
        return failed(
            format!("transport: {:?} {}", status.code(), status.message()),
            Retry::Unknown,
        );
    }
    let a = Answer {
        status: 200,
        error,
        attempts,
        grpc: Some(status.code() as i32),
        elapsed: started.elapsed(),
    };
    Ended::Failed {
        reason: a.reason(),
        retry: rules.judge(&a, true),
        attempts,
    }
}

/// A new connection to `echo`, [`ROUNDS`] lines there and back, closed.
async fn tcp(echo: SocketAddr, n: u64) -> Ended {
    let mut s = match tokio::time::timeout(CALL_TIMEOUT, tokio::net::TcpStream::connect(echo)).await
    {
        Err(_) => return failed("connect: no answer within 10 s", Retry::Unknown),
        Ok(Err(e)) => return failed(format!("connect: {e}"), Retry::Unknown),
        Ok(Ok(s)) => s,
    };
    let (r, mut w) = s.split();
    let mut lines = BufReader::new(r).lines();
    for round in 0..ROUNDS {
        // A first byte that no HTTP request starts with: opaque at once.
        let line = format!(">soak {n} {round}");
        // Before the first echo the client cannot tell a connect the
        // sidecar retried from a relay broken at once; after it, the relay
        // was cut mid-stream, which nothing retries.
        let (at, retry) = if round == 0 {
            ("before the first echo", Retry::Unknown)
        } else {
            ("mid-stream", Retry::NotAllowed)
        };
        if let Err(e) = w.write_all(format!("{line}\n").as_bytes()).await {
            return failed(format!("write {at}: {e}"), retry);
        }
        match tokio::time::timeout(CALL_TIMEOUT, lines.next_line()).await {
            Err(_) => return failed(format!("no echo within 10 s ({at})"), retry),
            Ok(Err(e)) => return failed(format!("read {at}: {e}"), retry),
            Ok(Ok(None)) => return failed(format!("closed {at}"), retry),
            Ok(Ok(Some(back))) if back != line => return failed("wrong echo", Retry::NotAllowed),
            Ok(Ok(Some(_))) => {}
        }
    }
    Ended::Ok { attempts: None }
}

fn header(h: &hyper::HeaderMap, name: &str) -> Option<String> {
    h.get(name)?.to_str().ok().map(String::from)
}

/// An error and its sources, `a: b: c`.
fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut next = e.source();
    while let Some(src) = next {
        s += &format!(": {src}");
        next = src.source();
    }
    s
}

/// One kind's load.
pub struct Load {
    pub kind: Kind,
    /// Calls per second.
    pub per_sec: f64,
    pub callers: Arc<Callers>,
    pub record: Arc<Mutex<Record>>,
    /// The retry rules in force (chaos changes them).
    pub in_force: Arc<RwLock<Rules>>,
    pub clock: Clock,
    pub stop: watch::Receiver<bool>,
}

/// Starts a call every `1 / per_sec` until `stop`, then waits for the calls in flight.
pub async fn run(mut l: Load) {
    let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / l.per_sec));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut calls = JoinSet::new();
    let mut n = 0u64;
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = l.stop.changed() => break,
        }
        n += 1;
        let (callers, record, clock, kind) = (l.callers.clone(), l.record.clone(), l.clock, l.kind);
        let rules = l.in_force.read().unwrap_or_else(|p| p.into_inner()).clone();
        calls.spawn(async move {
            let started = clock.now();
            let at = Instant::now();
            let ended = callers.call(kind, n, &rules).await;
            let latency = at.elapsed();
            add(&record, kind, started, clock.now(), latency, ended);
        });
        while calls.try_join_next().is_some() {}
    }
    while calls.join_next().await.is_some() {}
}

fn add(record: &Mutex<Record>, kind: Kind, started: f64, ended: f64, latency: Duration, e: Ended) {
    let mut r = lock(record);
    match e {
        Ended::Ok { attempts } => {
            let t = r.tally.entry(kind).or_default();
            t.ok += 1;
            if attempts.is_some_and(|a| a > 1) {
                t.retried_ok += 1;
            }
            t.latencies_ms.push((latency.as_secs_f64() * 1e3) as f32);
        }
        Ended::Failed {
            reason,
            retry,
            attempts,
        } => {
            r.tally.entry(kind).or_default().failed += 1;
            r.failures.push(Failure {
                kind,
                started,
                ended,
                reason,
                retry,
                attempts,
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn answer(error: Option<&str>, grpc: Option<i32>, attempts: u32) -> Answer<'_> {
        Answer {
            status: if grpc.is_some() { 200 } else { 502 },
            error,
            attempts: Some(attempts),
            grpc,
            elapsed: Duration::from_millis(20),
        }
    }

    #[test]
    fn the_soaks_policies_judge_as_the_sidecar_retries() -> Result<()> {
        let base = Rules::of(crate::BASELINE, "web")?;
        assert_eq!(base.max_attempts, 3);
        // A GET reset is retried; a gRPC call (a POST) is not.
        let reset = answer(Some("upstream-reset"), None, 3);
        assert_eq!(base.judge(&reset, false), Retry::Exhausted);
        let reset = answer(Some("upstream-reset"), Some(14), 1);
        assert_eq!(base.judge(&reset, true), Retry::NotAllowed);
        // Nothing reached an app: even a POST may go again.
        let refused = answer(Some("connect-failed"), Some(14), 1);
        assert_eq!(base.judge(&refused, true), Retry::NotTaken);
        // Nowhere to send one.
        let none = answer(Some("no-endpoints"), None, 1);
        assert_eq!(base.judge(&none, false), Retry::NotAllowed);
        // The variant does not retry resets at all.
        let variant = Rules::of(crate::VARIANT, "web")?;
        let reset = answer(Some("upstream-reset"), None, 1);
        assert_eq!(variant.judge(&reset, false), Retry::NotAllowed);
        Ok(())
    }
}
