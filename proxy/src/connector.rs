//! Connections to one upstream's endpoints: TCP with the service's connect
//! timeout, each connection holding a slot of the service's
//! `max_connections` breaker for as long as it is open (pooled or busy).
//! The limits are read at every connect, so policy changes apply at once.

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use hyper::rt::{Read, ReadBufCursor, Write};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

use crate::resilience::breaker::{Breakers, Overflow, Permit};
use crate::settings::Settings;

/// Why a connection could not be made.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    /// The TCP handshake took longer than the connect timeout.
    #[error("connect timed out")]
    Timeout,
    /// A circuit breaker refused.
    #[error(transparent)]
    Overflow(#[from] Overflow),
    /// The endpoint refused or could not be reached.
    #[error("connect failed: {0}")]
    Io(#[from] std::io::Error),
    /// The TLS handshake with a sidecar failed (wrong identity, untrusted or
    /// expired certificate).
    #[error("mTLS handshake failed: {0}")]
    Tls(std::io::Error),
}

/// Limits the connector reads at each connect (0 = none).
#[derive(Debug, Default)]
pub struct Limits {
    connect_ms: AtomicU64,
    max_connections: AtomicU32,
    max_pending: AtomicU32,
}

fn opt(v: u32) -> Option<u32> {
    (v != 0).then_some(v)
}

impl Limits {
    /// Takes the values of `s`.
    pub fn set(&self, s: &Settings) {
        let ms = u64::try_from(s.timeouts.connect.as_millis()).unwrap_or(u64::MAX);
        self.connect_ms.store(ms, Ordering::Relaxed);
        self.max_connections
            .store(s.breakers.max_connections.unwrap_or(0), Ordering::Relaxed);
        self.max_pending
            .store(s.breakers.max_pending.unwrap_or(0), Ordering::Relaxed);
    }

    /// The connect timeout.
    pub fn connect_timeout(&self) -> Duration {
        Duration::from_millis(self.connect_ms.load(Ordering::Relaxed))
    }
}

/// A byte stream to an endpoint: plain TCP, or mTLS to a sidecar.
pub trait Stream: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + Sync {}
impl<T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + Sync> Stream for T {}

/// mTLS to the sidecars of one service.
#[derive(Clone)]
pub struct Tls {
    /// Client config with the sidecar's certificate and the ALPN to offer.
    pub connector: tokio_rustls::TlsConnector,
    /// The name the peer's certificate must carry (`<service>.svc.<domain>`).
    pub name: rustls::pki_types::ServerName<'static>,
}

/// Connects to one upstream's endpoints.
#[derive(Clone)]
pub struct Connector {
    breakers: Arc<Breakers>,
    limits: Arc<Limits>,
    tls: Option<Tls>,
}

impl Connector {
    /// A connector charging `breakers` under `limits`.
    pub fn new(breakers: Arc<Breakers>, limits: Arc<Limits>) -> Self {
        Self {
            breakers,
            limits,
            tls: None,
        }
    }

    /// The same connector, speaking mTLS on top of TCP.
    pub fn with_tls(mut self, tls: Tls) -> Self {
        self.tls = Some(tls);
        self
    }

    /// A connection slot, then a TCP connection to `addr`, each bounded by
    /// the connect timeout.
    pub async fn connect(&self, addr: SocketAddr) -> Result<Conn, ConnectError> {
        let timeout = self.limits.connect_timeout();
        let max = opt(self.limits.max_connections.load(Ordering::Relaxed));
        let pending = opt(self.limits.max_pending.load(Ordering::Relaxed));
        let permit = tokio::time::timeout(timeout, self.breakers.connection(max, pending))
            .await
            .map_err(|_| Overflow::Pending)??;
        let stream = tokio::time::timeout(timeout, TcpStream::connect(addr))
            .await
            .map_err(|_| ConnectError::Timeout)??;
        crate::liveness::tune(&stream);
        let io: Box<dyn Stream> = match &self.tls {
            None => Box::new(stream),
            Some(tls) => Box::new(
                tokio::time::timeout(timeout, tls.connector.connect(tls.name.clone(), stream))
                    .await
                    .map_err(|_| ConnectError::Timeout)?
                    .map_err(ConnectError::Tls)?,
            ),
        };
        Ok(Conn {
            io: TokioIo::new(io),
            _permit: permit,
        })
    }
}

/// An open connection holding its breaker slot.
pub struct Conn {
    io: TokioIo<Box<dyn Stream>>,
    _permit: Permit,
}

impl Conn {
    /// The same connection with its stream wrapped (e.g. in
    /// [`crate::liveness::IdlePing`]); the breaker slot stays with it.
    pub fn wrap(self, f: impl FnOnce(Box<dyn Stream>) -> Box<dyn Stream>) -> Self {
        Self {
            io: TokioIo::new(f(self.io.into_inner())),
            _permit: self._permit,
        }
    }

    /// The stream, for opaque relays.
    pub fn into_parts(self) -> (Box<dyn Stream>, Permit) {
        (self.io.into_inner(), self._permit)
    }
}

impl Read for Conn {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: ReadBufCursor<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl Write for Conn {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_connect_to_an_address_that_never_answers_ends_at_the_connect_timeout() {
        // A listener that never accepts, its queue full: the kernel drops
        // further SYNs unanswered, as for a host that vanished.
        let sock = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)
            .expect("socket");
        let any: SocketAddr = "127.0.0.1:0".parse().expect("addr");
        sock.bind(&any.into()).expect("bind");
        sock.listen(0).expect("listen");
        let addr = sock.local_addr().expect("addr").as_socket().expect("inet");
        let mut held = Vec::new();
        for _ in 0..4 {
            if let Ok(Ok(s)) =
                tokio::time::timeout(Duration::from_millis(100), TcpStream::connect(addr)).await
            {
                held.push(s);
            }
        }
        let limits = Arc::new(Limits::default());
        limits.connect_ms.store(300, Ordering::Relaxed);
        let connector = Connector::new(Arc::new(Breakers::default()), limits);
        let started = std::time::Instant::now();
        let r = connector.connect(addr).await;
        let took = started.elapsed();
        assert!(matches!(r, Err(ConnectError::Timeout)), "{:?}", r.err());
        assert!(
            took >= Duration::from_millis(290) && took < Duration::from_secs(2),
            "{took:?}"
        );
        drop(held);
    }
}
