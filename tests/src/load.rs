//! A small load generator for end-to-end tests: `concurrency` workers, each
//! with its own keep-alive HTTP/1.1 connection pool, send `total` requests
//! and record every status, attempt count and latency.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;

/// One request's result.
#[derive(Debug, Clone)]
pub struct Sample {
    /// HTTP status (0 when the request failed without a response).
    pub status: u16,
    /// `x-wayfinder-attempts`, when present.
    pub attempts: Option<u32>,
    /// `x-wayfinder-error`, when present.
    pub error: Option<String>,
    /// The `instance` field of the body, when present.
    pub instance: Option<String>,
    /// Time to the whole response.
    pub latency: Duration,
    /// Position in the order requests finished (0-based).
    pub seq: usize,
}

/// What a run did.
#[derive(Debug, Default)]
pub struct Report {
    /// Every request, in completion order.
    pub samples: Vec<Sample>,
}

impl Report {
    /// Requests that did not get a 2xx.
    pub fn failed(&self) -> Vec<&Sample> {
        self.samples
            .iter()
            .filter(|s| !(200..300).contains(&s.status))
            .collect()
    }

    /// The `q` quantile (0-1) of the latencies.
    pub fn quantile(&self, q: f64) -> Duration {
        let mut l: Vec<_> = self.samples.iter().map(|s| s.latency).collect();
        l.sort();
        l.get(((l.len() as f64 - 1.0) * q).round() as usize)
            .copied()
            .unwrap_or_default()
    }

    /// How many requests each instance answered.
    pub fn per_instance(&self) -> std::collections::BTreeMap<String, usize> {
        let mut m = std::collections::BTreeMap::new();
        for s in &self.samples {
            if let Some(i) = &s.instance {
                *m.entry(i.clone()).or_default() += 1;
            }
        }
        m
    }
}

/// The request each worker sends.
#[derive(Debug, Clone)]
pub struct Spec {
    /// Target (a sidecar listener).
    pub addr: SocketAddr,
    /// Method.
    pub method: hyper::Method,
    /// Path.
    pub path: String,
    /// Host header.
    pub host: String,
    /// Body.
    pub body: Bytes,
    /// More request headers.
    pub headers: Vec<(String, String)>,
}

impl Spec {
    /// `GET /` with `Host: host` to `addr`.
    pub fn get(addr: SocketAddr, host: &str) -> Self {
        Self {
            addr,
            method: hyper::Method::GET,
            path: "/".into(),
            host: host.into(),
            body: Bytes::new(),
            headers: Vec::new(),
        }
    }

    /// The same request with one more header.
    pub fn with_header(mut self, name: &str, value: &str) -> Self {
        self.headers.push((name.into(), value.into()));
        self
    }
}

/// Sends `total` requests from `concurrency` workers; `done` counts
/// finished requests as they finish, so a test can act midway.
pub async fn run(spec: Spec, concurrency: usize, total: usize, done: Arc<AtomicUsize>) -> Report {
    let next = Arc::new(AtomicUsize::new(0));
    drive(spec, concurrency, done, move || {
        next.fetch_add(1, Ordering::Relaxed) < total
    })
    .await
}

/// Sends requests from `concurrency` workers until `stop` is set (each
/// worker finishes the request it is in); the samples in finishing order.
pub async fn until(
    spec: Spec,
    concurrency: usize,
    stop: Arc<std::sync::atomic::AtomicBool>,
) -> Report {
    let done = Arc::new(AtomicUsize::new(0));
    let mut report = drive(spec, concurrency, done, move || {
        !stop.load(Ordering::Relaxed)
    })
    .await;
    report.samples.sort_by_key(|s| s.seq);
    report
}

/// `concurrency` workers, each with its own client, sending while `more()`
/// says so; `done` numbers the samples as they finish.
async fn drive(
    spec: Spec,
    concurrency: usize,
    done: Arc<AtomicUsize>,
    more: impl Fn() -> bool + Send + Sync + 'static,
) -> Report {
    let more = Arc::new(more);
    let mut workers = Vec::new();
    for _ in 0..concurrency {
        let (spec, more, done) = (spec.clone(), more.clone(), done.clone());
        workers.push(tokio::spawn(async move {
            let client: Client<_, Full<Bytes>> = Client::builder(TokioExecutor::new()).build_http();
            let mut samples = Vec::new();
            while more() {
                let mut s = one(&client, &spec).await;
                s.seq = done.fetch_add(1, Ordering::Relaxed);
                samples.push(s);
            }
            samples
        }));
    }
    let mut report = Report::default();
    for w in workers {
        if let Ok(s) = w.await {
            report.samples.extend(s);
        }
    }
    report
}

/// Sends one request with `client`.
pub async fn one(
    client: &Client<hyper_util::client::legacy::connect::HttpConnector, Full<Bytes>>,
    spec: &Spec,
) -> Sample {
    let started = Instant::now();
    let mut req = hyper::Request::builder()
        .method(spec.method.clone())
        .uri(format!("http://{}{}", spec.addr, spec.path))
        .header(hyper::header::HOST, spec.host.as_str());
    for (k, v) in &spec.headers {
        req = req.header(k.as_str(), v.as_str());
    }
    let req = req.body(Full::new(spec.body.clone()));
    let mut sample = Sample {
        status: 0,
        attempts: None,
        error: None,
        instance: None,
        latency: Duration::ZERO,
        seq: 0,
    };
    let Ok(req) = req else {
        return sample;
    };
    let resp = tokio::time::timeout(Duration::from_secs(10), client.request(req)).await;
    if let Ok(Ok(resp)) = resp {
        sample.status = resp.status().as_u16();
        let h = resp.headers();
        sample.attempts = h
            .get("x-wayfinder-attempts")
            .and_then(|v| v.to_str().ok()?.parse().ok());
        sample.error = h
            .get("x-wayfinder-error")
            .and_then(|v| Some(v.to_str().ok()?.to_string()));
        if let Ok(body) = resp.into_body().collect().await {
            let body = body.to_bytes();
            sample.instance = serde_json::from_slice::<serde_json::Value>(&body)
                .ok()
                .and_then(|v| Some(v.get("instance")?.as_str()?.to_string()));
        }
    }
    sample.latency = started.elapsed();
    sample
}
