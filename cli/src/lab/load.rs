//! The comparison's load: the same open-loop stream of `GET /` on every
//! way at once, each way finding `web` its own way. It runs inside wfctl
//! on loopback, and as `wfctl lab load` in a container on the lab's network
//! on Docker (so names go through Docker's resolver at 127.0.0.11); there
//! it prints one line per request for the wfctl that started it.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, bail};
use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper_util::client::legacy::{Client, connect::HttpConnector};
use hyper_util::rt::TokioExecutor;
use tokio::sync::Mutex;

/// One way of reaching `web`: a row of the report.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Way {
    /// Resolve once, keep the answer forever (nginx's static upstream,
    /// many clients' connection pools), round robin over it.
    DnsOnce,
    /// Resolve before every request; take the first record.
    DnsPerRequest,
    /// Keep the answer for the TTL it came with (Docker's: 600 s).
    DnsTtl,
    /// Keep it for 30 s (a common runtime default).
    DnsTtl30,
    /// Through the nginx upstream.
    Nginx,
    /// Through the client's Wayfinder sidecar.
    Mesh,
    /// Through the same sidecar, each request marked with [`LAB_WAY_HEADER`]
    /// so a route of the lab's policy hedges it (after web's p95).
    MeshHedging,
}

/// The header that marks a request of the hedged mesh way; the lab's
/// route for it ([`super::hedging`]) matches on it.
pub const LAB_WAY_HEADER: &str = "x-wayfinder-lab-way";

impl Way {
    /// Every way, in report order.
    pub const ALL: [Way; 7] = [
        Way::DnsOnce,
        Way::DnsPerRequest,
        Way::DnsTtl,
        Way::DnsTtl30,
        Way::Nginx,
        Way::Mesh,
        Way::MeshHedging,
    ];

    /// The name `--ways` and the load's lines use.
    pub fn key(self) -> &'static str {
        match self {
            Way::DnsOnce => "dns-once",
            Way::DnsPerRequest => "dns-per-request",
            Way::DnsTtl => "dns-ttl",
            Way::DnsTtl30 => "dns-ttl-30",
            Way::Nginx => "nginx",
            Way::Mesh => "mesh",
            Way::MeshHedging => "mesh+hedging",
        }
    }

    /// The way named `key`.
    pub fn from_key(key: &str) -> Option<Way> {
        Self::ALL.into_iter().find(|w| w.key() == key)
    }

    /// Row label.
    pub fn label(self) -> &'static str {
        match self {
            Way::DnsOnce => "DNS, resolved once",
            Way::DnsPerRequest => "DNS, per request",
            Way::DnsTtl => "DNS, cached for its TTL (Docker: 600 s)",
            Way::DnsTtl30 => "DNS, cached 30 s",
            Way::Nginx => "nginx upstream",
            Way::Mesh => "Wayfinder mesh",
            Way::MeshHedging => "Wayfinder mesh, hedged at p95",
        }
    }

    /// Plot colour.
    pub fn color(self) -> &'static str {
        match self {
            Way::DnsOnce => "#d62728",
            Way::DnsPerRequest => "#ff7f0e",
            Way::DnsTtl => "#8c564b",
            Way::DnsTtl30 => "#e377c2",
            Way::Nginx => "#1f77b4",
            Way::Mesh => "#2ca02c",
            Way::MeshHedging => "#17becf",
        }
    }

    /// How long a DNS way keeps an answer that is valid until `valid`:
    /// `None` forever, zero not at all.
    fn keep(self, valid: Instant) -> Option<Duration> {
        match self {
            Way::DnsOnce => None,
            Way::DnsTtl => Some(valid.saturating_duration_since(Instant::now())),
            Way::DnsTtl30 => Some(Duration::from_secs(30)),
            Way::DnsPerRequest | Way::Nginx | Way::Mesh | Way::MeshHedging => Some(Duration::ZERO),
        }
    }

    /// Whether it goes through the client's sidecar.
    pub fn is_mesh(self) -> bool {
        matches!(self, Way::Mesh | Way::MeshHedging)
    }

    /// The header it adds to every request, if any.
    pub fn header(self) -> Option<(&'static str, &'static str)> {
        match self {
            Way::MeshHedging => Some((LAB_WAY_HEADER, self.key())),
            _ => None,
        }
    }

    /// Whether it finds `web` by DNS itself.
    pub fn is_dns(self) -> bool {
        matches!(
            self,
            Way::DnsOnce | Way::DnsPerRequest | Way::DnsTtl | Way::DnsTtl30
        )
    }
}

/// `dns-once,nginx,mesh` → ways, in report order.
pub fn parse_ways(list: &str) -> Result<Vec<Way>> {
    let mut ways = Vec::new();
    for key in list.split(',').map(str::trim).filter(|k| !k.is_empty()) {
        let way = Way::from_key(key).with_context(|| {
            let all: Vec<_> = Way::ALL.iter().map(|w| w.key()).collect();
            format!("--ways: {key:?} is not a way ({})", all.join(", "))
        })?;
        if !ways.contains(&way) {
            ways.push(way);
        }
    }
    if ways.is_empty() {
        bail!("--ways: name at least one way");
    }
    ways.sort();
    Ok(ways)
}

/// One request's fate.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    /// The way it took.
    pub way: Way,
    /// When it was sent, in seconds from the start of the load.
    pub at: f64,
    /// How long it took (ms); the timeout when it timed out.
    pub ms: f64,
    /// A 200 within the timeout.
    pub ok: bool,
    /// Who answered, when the answer said.
    pub instance: Option<String>,
    /// Tries the client's sidecar made for it, copies and retries included
    /// (its `x-wayfinder-attempts`); 0 when no sidecar said.
    pub tries: u32,
}

impl Sample {
    /// When it ended, in seconds from the start.
    pub fn end(&self) -> f64 {
        self.at + self.ms / 1000.0
    }

    /// The line `wfctl lab load` prints for it.
    pub fn line(&self) -> String {
        format!(
            "sample {} {:.1} {:.3} {} {} {}",
            self.way.key(),
            self.at * 1000.0,
            self.ms,
            u8::from(self.ok),
            self.instance.as_deref().unwrap_or("-"),
            self.tries
        )
    }

    /// Parses [`Sample::line`]; `None` for any other line.
    pub fn parse(line: &str) -> Option<Sample> {
        let mut f = line.trim().split(' ');
        if f.next()? != "sample" {
            return None;
        }
        let way = Way::from_key(f.next()?)?;
        let at = f.next()?.parse::<f64>().ok()? / 1000.0;
        let ms = f.next()?.parse().ok()?;
        let ok = f.next()? == "1";
        let instance = f.next().filter(|i| *i != "-").map(str::to_string);
        let tries = f.next().and_then(|t| t.parse().ok()).unwrap_or(0);
        Some(Sample {
            way,
            at,
            ms,
            ok,
            instance,
            tries,
        })
    }
}

/// How a way reaches `web`.
#[derive(Debug, Clone)]
pub enum Aim {
    /// Looks `name` up at `resolver` and calls the answer at `port`.
    Dns {
        /// The DNS server (Docker's 127.0.0.11:53, or the loopback lab's).
        resolver: SocketAddr,
        /// The name (`web`).
        name: String,
        /// The port the instances serve on.
        port: u16,
    },
    /// Calls one front (nginx, the client's sidecar) with `Host: web`.
    Front(SocketAddr),
}

/// The load, shared by every way.
#[derive(Debug, Clone)]
pub struct Plan {
    /// Requests per second per way.
    pub rate: u32,
    /// How long.
    pub duration: Duration,
    /// Slower than this has failed.
    pub timeout: Duration,
    /// When the load starts (wall clock, so a container and its host agree).
    pub start: SystemTime,
    /// The `Host` header (`web`).
    pub host: String,
}

impl Plan {
    /// The start as milliseconds since the epoch (`--start-at`).
    pub fn start_ms(&self) -> u128 {
        self.start
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_millis())
    }

    /// The start on this process's monotonic clock.
    pub fn start_instant(&self) -> Instant {
        let now = (Instant::now(), SystemTime::now());
        match self.start.duration_since(now.1) {
            Ok(ahead) => now.0 + ahead,
            Err(behind) => now.0.checked_sub(behind.duration()).unwrap_or(now.0),
        }
    }
}

type HttpClient = Client<HttpConnector, Empty<Bytes>>;

/// Where one way sends, and what it remembers of DNS.
struct Target {
    way: Way,
    aim: Aim,
    resolver: Option<hickory_resolver::TokioResolver>,
    /// The kept answer and until when it is kept (`None`: for ever).
    cache: Mutex<Option<(Option<Instant>, Vec<Ipv4Addr>)>>,
    next: AtomicUsize,
}

impl Target {
    fn new(way: Way, aim: Aim) -> Result<Self> {
        let resolver = match &aim {
            Aim::Dns { resolver, .. } => Some(
                wayfinder_proto::dial::build_resolver(Some(*resolver), |o| o.cache_size = 0)
                    .map_err(|e| anyhow::anyhow!("DNS resolver: {e}"))?,
            ),
            Aim::Front(_) => None,
        };
        Ok(Self {
            way,
            aim,
            resolver,
            cache: Mutex::new(None),
            next: AtomicUsize::new(0),
        })
    }

    async fn lookup(&self, name: &str) -> (Vec<Ipv4Addr>, Instant) {
        match &self.resolver {
            Some(r) => Self::v4(r, name).await,
            None => (Vec::new(), Instant::now()),
        }
    }

    /// `name`'s A records, in the order the server gave them, and until
    /// when their TTL lets a client keep them.
    async fn v4(r: &hickory_resolver::TokioResolver, name: &str) -> (Vec<Ipv4Addr>, Instant) {
        match r.lookup_ip(format!("{name}.")).await {
            Ok(a) => (
                a.iter()
                    .filter_map(|ip| match ip {
                        IpAddr::V4(v4) => Some(v4),
                        IpAddr::V6(_) => None,
                    })
                    .collect(),
                a.valid_until(),
            ),
            Err(_) => (Vec::new(), Instant::now()),
        }
    }

    async fn first_v4(r: &hickory_resolver::TokioResolver, name: &str) -> Option<Ipv4Addr> {
        Self::v4(r, name).await.0.first().copied()
    }

    /// The address of the next request.
    async fn pick(&self) -> Option<SocketAddr> {
        let (name, port) = match &self.aim {
            Aim::Front(addr) => return Some(*addr),
            Aim::Dns { name, port, .. } => (name, *port),
        };
        let at = |ip: &Ipv4Addr| SocketAddr::new(IpAddr::V4(*ip), port);
        if self.way == Way::DnsPerRequest {
            return self.lookup(name).await.0.first().map(at);
        }
        let mut cache = self.cache.lock().await;
        let fresh = cache
            .as_ref()
            .is_some_and(|(until, _)| until.is_none_or(|u| Instant::now() < u));
        if !fresh {
            let (ips, valid) = self.lookup(name).await;
            // A failed lookup is not kept (clients keep answers, not
            // failures): this request fails, the next one asks again.
            if ips.is_empty() {
                return None;
            }
            let until = self.way.keep(valid).map(|k| Instant::now() + k);
            *cache = Some((until, ips));
        }
        let ips = &cache.as_ref()?.1;
        let i = self.next.fetch_add(1, Ordering::Relaxed) % ips.len().max(1);
        ips.get(i).map(at)
    }
}

/// Who answered: lab-app's JSON `instance`, else the body's first line
/// (busybox httpd serving its hostname).
pub fn instance_of(body: &[u8]) -> Option<String> {
    if let Ok(v) = serde_json::from_slice::<serde_json::Value>(body)
        && let Some(i) = v["instance"].as_str()
    {
        return Some(i.to_string());
    }
    let text = String::from_utf8_lossy(body);
    let first = text.lines().next()?.trim();
    (!first.is_empty() && first.len() <= 64 && !first.contains(' ')).then(|| first.to_string())
}

/// What one call got.
#[derive(Debug, Default)]
struct Answer {
    /// A 200 within the timeout.
    ok: bool,
    /// Who answered, when the answer said.
    instance: Option<String>,
    /// The sidecar's `x-wayfinder-attempts`, 0 without it.
    tries: u32,
}

async fn get(
    client: &HttpClient,
    way: Way,
    addr: SocketAddr,
    host: &str,
    timeout: Duration,
) -> Answer {
    let mut req = hyper::Request::get(format!("http://{addr}/")).header(hyper::header::HOST, host);
    if let Some((name, value)) = way.header() {
        req = req.header(name, value);
    }
    let Ok(req) = req.body(Empty::new()) else {
        return Answer::default();
    };
    let call = async {
        let resp = client.request(req).await.ok()?;
        let ok = resp.status() == hyper::StatusCode::OK;
        let tries = resp
            .headers()
            .get("x-wayfinder-attempts")
            .and_then(|v| v.to_str().ok()?.parse().ok())
            .unwrap_or(0);
        let body = resp.into_body().collect().await.ok()?.to_bytes();
        Some(Answer {
            ok,
            instance: instance_of(&body),
            tries,
        })
    };
    tokio::time::timeout(timeout, call)
        .await
        .ok()
        .flatten()
        .unwrap_or_default()
}

/// Runs `ways` from the plan's start for its duration, each at the plan's
/// rate, sending every sample to `sink`. Before the start each way warms up
/// (one answer, or until the start); returns the ways that never answered
/// then.
pub async fn run(
    ways: Vec<(Way, Aim)>,
    plan: Plan,
    sink: tokio::sync::mpsc::UnboundedSender<Sample>,
) -> Result<Vec<Way>> {
    let client: HttpClient = Client::builder(TokioExecutor::new())
        .pool_idle_timeout(Duration::from_secs(90))
        .build_http();
    let start = plan.start_instant();
    let mut targets = Vec::new();
    for (way, aim) in ways {
        targets.push(Arc::new(Target::new(way, aim)?));
    }
    // Warm-up, every way at once: DNS-once resolves here, pools open, as in
    // a client that has been running for a while.
    let warmups = targets.iter().map(|t| {
        let (t, client, host, timeout) =
            (t.clone(), client.clone(), plan.host.clone(), plan.timeout);
        async move {
            while Instant::now() + timeout < start {
                if let Some(addr) = t.pick().await
                    && get(&client, t.way, addr, &host, timeout).await.ok
                {
                    return None;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Some(t.way)
        }
    });
    let cold: Vec<Way> = futures::future::join_all(warmups)
        .await
        .into_iter()
        .flatten()
        .collect();
    let total = (plan.duration.as_secs_f64() * f64::from(plan.rate)).round() as usize;
    let interval = Duration::from_secs_f64(1.0 / f64::from(plan.rate.max(1)));
    let mut tasks = Vec::new();
    for t in targets {
        let (client, sink, plan) = (client.clone(), sink.clone(), plan.clone());
        tasks.push(tokio::spawn(async move {
            let mut tick = tokio::time::interval_at(start.into(), interval);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
            let mut inflight = Vec::with_capacity(total);
            for _ in 0..total {
                tick.tick().await;
                let (t, client, sink, host) =
                    (t.clone(), client.clone(), sink.clone(), plan.host.clone());
                let timeout = plan.timeout;
                inflight.push(tokio::spawn(async move {
                    let sent = Instant::now();
                    let answer = match tokio::time::timeout(timeout, t.pick()).await {
                        Ok(Some(addr)) => {
                            let left = timeout.saturating_sub(sent.elapsed());
                            get(&client, t.way, addr, &host, left).await
                        }
                        _ => Answer::default(),
                    };
                    let _ = sink.send(Sample {
                        way: t.way,
                        at: sent.saturating_duration_since(start).as_secs_f64(),
                        ms: sent.elapsed().as_secs_f64() * 1000.0,
                        ok: answer.ok,
                        instance: answer.instance,
                        tries: answer.tries,
                    });
                }));
            }
            for r in inflight {
                let _ = r.await;
            }
        }));
    }
    for t in tasks {
        t.await.context("a load task failed")?;
    }
    Ok(cold)
}

/// The front `way` is given in `WAY=HOST:PORT` form, if any.
fn front_of(way: Way, fronts: &[String]) -> Option<&str> {
    fronts
        .iter()
        .find_map(|f| f.strip_prefix(way.key())?.strip_prefix('='))
}

/// `wfctl lab load`: runs `ways` (fronts given as `WAY=HOST:PORT`, names
/// looked up at `resolver`) and prints each sample as a line on stdout.
pub async fn serve_lines(
    ways: Vec<Way>,
    fronts: &[String],
    resolver: SocketAddr,
    name: &str,
    port: u16,
    plan: Plan,
) -> Result<()> {
    let lookup = wayfinder_proto::dial::build_resolver(Some(resolver), |o| o.cache_size = 0)
        .map_err(|e| anyhow::anyhow!("DNS resolver: {e}"))?;
    let mut aims = Vec::new();
    for way in ways {
        let aim = if way.is_dns() {
            Aim::Dns {
                resolver,
                name: name.to_string(),
                port,
            }
        } else {
            let front = front_of(way, fronts)
                .with_context(|| format!("--front {}=HOST:PORT is missing", way.key()))?;
            let (host, p) = front
                .rsplit_once(':')
                .and_then(|(h, p)| Some((h, p.parse::<u16>().ok()?)))
                .with_context(|| format!("--front {front:?}: expected HOST:PORT"))?;
            let ip = match host.parse::<IpAddr>() {
                Ok(ip) => ip,
                Err(_) => {
                    // The front's name, looked up once (it does not move).
                    let deadline = Instant::now() + Duration::from_secs(10);
                    loop {
                        if let Some(ip) = Target::first_v4(&lookup, host).await {
                            break IpAddr::V4(ip);
                        }
                        if Instant::now() > deadline {
                            bail!("{host} does not resolve at {resolver}");
                        }
                        tokio::time::sleep(Duration::from_millis(200)).await;
                    }
                }
            };
            Aim::Front(SocketAddr::new(ip, p))
        };
        aims.push((way, aim));
    }
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<Sample>();
    let printer = tokio::spawn(async move {
        use std::io::Write;
        while let Some(s) = rx.recv().await {
            if writeln!(std::io::stdout(), "{}", s.line()).is_err() {
                break;
            }
        }
    });
    let cold = run(aims, plan, tx).await?;
    for w in cold {
        eprintln!(
            "wfctl lab load: warning: {} got no answer while warming up",
            w.key()
        );
    }
    printer.await.context("the sample printer")?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sample_lines_round_trip() {
        let s = Sample {
            way: Way::DnsTtl30,
            at: 12.3456,
            ms: 1.25,
            ok: true,
            instance: Some("web2".into()),
            tries: 2,
        };
        let back = Sample::parse(&s.line()).expect("parses");
        assert_eq!(back.way, s.way);
        assert!((back.at - s.at).abs() < 0.001, "{}", back.at);
        assert_eq!(
            (back.ms, back.ok, back.instance, back.tries),
            (s.ms, s.ok, s.instance.clone(), s.tries)
        );
        // A line without tries (an older load) reads as "not said".
        let older = "sample mesh 10.0 1.500 1 web1";
        assert_eq!(Sample::parse(older).expect("parses").tries, 0);
        let failed = Sample {
            ok: false,
            instance: None,
            ..s
        };
        assert_eq!(
            Sample::parse(&failed.line()).expect("parses").instance,
            None
        );
        assert_eq!(Sample::parse("ready dns-once"), None);
    }

    #[test]
    fn instances_are_read_from_json_or_the_first_line() {
        assert_eq!(
            instance_of(br#"{"instance":"web-1","path":"/"}"#).as_deref(),
            Some("web-1")
        );
        assert_eq!(instance_of(b"web2\n").as_deref(), Some("web2"));
        assert_eq!(instance_of(b"<html> an error page").as_deref(), None);
        assert_eq!(instance_of(b""), None);
    }

    #[test]
    fn ways_are_picked_by_key() {
        assert_eq!(
            parse_ways("mesh, dns-once,mesh").expect("ways"),
            [Way::DnsOnce, Way::Mesh]
        );
        assert_eq!(
            parse_ways("mesh+hedging,nginx,mesh").expect("ways"),
            [Way::Nginx, Way::Mesh, Way::MeshHedging]
        );
        let e = parse_ways("dns,mesh").expect_err("refused").to_string();
        assert!(e.contains("\"dns\" is not a way"), "{e}");
        assert!(e.contains("mesh, mesh+hedging)"), "{e}");
    }

    #[test]
    fn every_way_has_its_own_key_label_and_colour() {
        for (i, a) in Way::ALL.iter().enumerate() {
            assert_eq!(Way::from_key(a.key()), Some(*a));
            for b in &Way::ALL[..i] {
                assert_ne!(a.key(), b.key());
                assert_ne!(a.label(), b.label());
                assert_ne!(a.color(), b.color());
            }
        }
        assert!(Way::MeshHedging.is_mesh() && !Way::MeshHedging.is_dns());
        assert_eq!(
            Way::MeshHedging.header(),
            Some(("x-wayfinder-lab-way", "mesh+hedging"))
        );
        assert_eq!(Way::Mesh.header(), None, "the mesh way stays unmarked");
    }

    #[test]
    fn the_hedged_way_sends_its_header_and_a_front_of_its_own() {
        let s = Sample {
            way: Way::MeshHedging,
            at: 1.0,
            ms: 2.0,
            ok: true,
            instance: None,
            tries: 1,
        };
        assert_eq!(
            Sample::parse(&s.line()).expect("parses").way,
            Way::MeshHedging
        );
        let fronts = [
            "mesh=client:15080".to_string(),
            "mesh+hedging=client:15081".into(),
        ];
        let front = |w: Way| front_of(w, &fronts);
        assert_eq!(front(Way::Mesh), Some("client:15080"));
        assert_eq!(front(Way::MeshHedging), Some("client:15081"));
    }
}
