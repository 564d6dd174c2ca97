//! Dialling by name without libc's resolver. The lab images are static
//! binaries in `FROM scratch`, where glibc's getaddrinfo has no NSS modules
//! to load and fails for every name; hickory reads /etc/resolv.conf (which
//! Docker writes, pointing at its embedded DNS) and /etc/hosts itself.
//! getaddrinfo remains the fallback for what hickory cannot answer.

use std::future::Future;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll};
use std::time::Duration;

use hickory_resolver::TokioResolver;
use hickory_resolver::config::{
    ConnectionConfig, LookupIpStrategy, NameServerConfig, ResolverConfig, ResolverOpts,
};
use hickory_resolver::net::runtime::TokioRuntimeProvider;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tonic::transport::Uri;

/// A resolver asking `server` (UDP, then TCP for long answers, like nginx's
/// `resolver`) or, without one, the system's configuration; `tune` sets
/// its options (address families, caching).
pub fn build_resolver(
    server: Option<SocketAddr>,
    tune: impl FnOnce(&mut ResolverOpts),
) -> Result<TokioResolver, String> {
    let mut builder = match server {
        Some(addr) => {
            let conns = [ConnectionConfig::udp(), ConnectionConfig::tcp()].map(|mut c| {
                c.port = addr.port();
                c
            });
            let ns = NameServerConfig::new(addr.ip(), true, conns.to_vec());
            TokioResolver::builder_with_config(
                ResolverConfig::from_name_servers(vec![ns]),
                TokioRuntimeProvider::default(),
            )
        }
        None => TokioResolver::builder_tokio().map_err(|e| e.to_string())?,
    };
    tune(builder.options_mut());
    builder.build().map_err(|e| e.to_string())
}

/// A resolver built when it is first needed (so a process that never
/// resolves a name never reads resolv.conf or holds a cache), its failure
/// kept like its success.
pub struct LazyResolver {
    server: Option<SocketAddr>,
    strategy: LookupIpStrategy,
    built: OnceLock<Result<TokioResolver, String>>,
}

impl LazyResolver {
    /// A resolver asking `server` or the system's configured servers (as
    /// [`build_resolver`]) for addresses in `strategy`'s families and order.
    pub const fn new(server: Option<SocketAddr>, strategy: LookupIpStrategy) -> Self {
        Self {
            server,
            strategy,
            built: OnceLock::new(),
        }
    }

    /// The resolver, or why none could be set up.
    pub fn get(&self) -> Result<&TokioResolver, &str> {
        self.built
            .get_or_init(|| build_resolver(self.server, |o| o.ip_strategy = self.strategy))
            .as_ref()
            .map_err(String::as_str)
    }
}

/// Dialling by name: IPv4 first, since Docker's networks are IPv4 unless
/// told otherwise.
static RESOLVER: LazyResolver = LazyResolver::new(None, LookupIpStrategy::Ipv4thenIpv6);

/// The addresses of `host` (an IP literal, with or without brackets, or a name).
pub async fn resolve(host: &str, port: u16) -> io::Result<Vec<SocketAddr>> {
    let host = host.trim_start_matches('[').trim_end_matches(']');
    if let Ok(ip) = host.parse::<IpAddr>() {
        return Ok(vec![SocketAddr::new(ip, port)]);
    }
    let dns_error = match RESOLVER.get() {
        Ok(r) => match r.lookup_ip(host).await {
            Ok(answer) => {
                let addrs: Vec<_> = answer.iter().map(|ip| SocketAddr::new(ip, port)).collect();
                if !addrs.is_empty() {
                    return Ok(addrs);
                }
                format!("{host}: no address")
            }
            Err(e) => e.to_string(),
        },
        Err(e) => format!("no DNS resolver from /etc/resolv.conf: {e}"),
    };
    match tokio::net::lookup_host((host, port)).await {
        Ok(addrs) => {
            let addrs: Vec<_> = addrs.collect();
            if addrs.is_empty() {
                return Err(io::Error::new(io::ErrorKind::NotFound, dns_error));
            }
            Ok(addrs)
        }
        Err(e) => Err(io::Error::new(
            io::ErrorKind::NotFound,
            format!("resolving {host}: {dns_error}; getaddrinfo: {e}"),
        )),
    }
}

/// Connects to the first address of `host` that accepts.
pub async fn connect(host: &str, port: u16) -> io::Result<TcpStream> {
    let mut last = io::Error::new(io::ErrorKind::NotFound, format!("{host}: no address"));
    for addr in resolve(host, port).await? {
        match TcpStream::connect(addr).await {
            Ok(s) => {
                let _ = s.set_nodelay(true);
                return Ok(s);
            }
            Err(e) => last = e,
        }
    }
    Err(last)
}

/// A connector for tonic channels (`Endpoint::connect_with_connector`) that
/// resolves with [`resolve`]; tonic adds TLS on top when configured.
#[derive(Clone, Copy, Debug, Default)]
pub struct Dialer;

impl tower_service::Service<Uri> for Dialer {
    type Response = TokioIo<TcpStream>;
    type Error = io::Error;
    type Future = Pin<Box<dyn Future<Output = io::Result<Self::Response>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        Box::pin(async move {
            let host = uri
                .host()
                .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "no host in the URL"))?
                .to_string();
            let https = uri.scheme_str() == Some("https");
            let port = uri.port_u16().unwrap_or(if https { 443 } else { 80 });
            Ok(TokioIo::new(connect(&host, port).await?))
        })
    }
}

/// How long one replica gets to accept a connection.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

/// A connector for tonic channels to a replicated server (control-plane
/// replicas, etcd members): TCP to the target that answered last, else the
/// next ones in turn; then TLS when asked. tonic calls it again when the
/// connection breaks, so the channel moves to a live target by itself and
/// stays there.
#[derive(Clone)]
pub struct Failover {
    targets: Arc<Vec<(String, u16)>>,
    current: Arc<AtomicUsize>,
    tls: Option<tokio_rustls::TlsConnector>,
}

/// What [`Failover`] connects: TCP or TLS over TCP, for hyper.
pub type Io = TokioIo<Box<dyn Transport>>;

/// A byte stream to the control plane: TCP, or TLS over TCP.
pub trait Transport: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + Unpin {}
impl<T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + Unpin> Transport for T {}

impl Failover {
    /// Dials `targets` (host, port), starting with the first.
    pub fn new(targets: Vec<(String, u16)>, tls: Option<tokio_rustls::TlsConnector>) -> Self {
        Self {
            targets: Arc::new(targets),
            current: Arc::new(AtomicUsize::new(0)),
            tls,
        }
    }

    async fn connect(&self, host: &str, port: u16) -> std::io::Result<Box<dyn Transport>> {
        let tcp = tokio::time::timeout(CONNECT_TIMEOUT, connect(host, port))
            .await
            .map_err(|_| {
                std::io::Error::new(std::io::ErrorKind::TimedOut, "connect timed out")
            })??;
        let Some(tls) = &self.tls else {
            return Ok(Box::new(tcp));
        };
        let name = tokio_rustls::rustls::pki_types::ServerName::try_from(
            host.trim_matches(['[', ']']).to_string(),
        )
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::InvalidInput, "bad host name"))?;
        Ok(Box::new(tls.connect(name, tcp).await?))
    }
}

impl tower_service::Service<Uri> for Failover {
    type Response = Io;
    type Error = std::io::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Io, std::io::Error>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), std::io::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, _: Uri) -> Self::Future {
        let me = self.clone();
        Box::pin(async move {
            let n = me.targets.len();
            let start = me.current.load(Ordering::Relaxed);
            let mut last = std::io::Error::other("no control plane address");
            for i in 0..n {
                let idx = (start + i) % n;
                let (host, port) = &me.targets[idx];
                match me.connect(host, *port).await {
                    Ok(io) => {
                        if idx != start {
                            tracing::info!(peer = %format!("{host}:{port}"), "connected to another replica");
                        }
                        me.current.store(idx, Ordering::Relaxed);
                        return Ok(TokioIo::new(io));
                    }
                    Err(e) => {
                        tracing::debug!(peer = %format!("{host}:{port}"), error = %e, "unreachable");
                        last = e;
                    }
                }
            }
            Err(last)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn literals_resolve_without_dns() {
        let v4 = resolve("127.0.0.1", 80).await.expect("v4");
        assert_eq!(v4, vec![SocketAddr::from(([127, 0, 0, 1], 80))]);
        let v6 = resolve("[::1]", 443).await.expect("v6");
        assert_eq!(v6[0].port(), 443);
        assert!(v6[0].is_ipv6());
    }

    #[tokio::test]
    async fn the_dialer_connects_by_uri() {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let uri: Uri = format!("http://{}", l.local_addr().expect("addr"))
            .parse()
            .expect("uri");
        let mut d = Dialer;
        let s = tower_service::Service::call(&mut d, uri).await;
        assert!(s.is_ok(), "{s:?}");
    }
}
