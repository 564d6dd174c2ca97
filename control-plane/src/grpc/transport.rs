//! The gRPC port's connections: TLS with an optional client certificate,
//! whose identity becomes the connection's [`Peer`] (see [`super::auth`]).
//!
//! The handshake is ours rather than tonic's because the client-certificate
//! roots change at run time (replicas publish theirs through etcd) and
//! because the caller's identity must be decided from the verified chain,
//! once per connection. A client without a certificate is let in as
//! anonymous: it may only ask for its first certificate.

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::server::TlsStream;

use super::auth::{Caller, Peer};
use crate::registry::Registry;

/// Longest a client may take to finish its TLS handshake.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Most handshakes under way at once; connections beyond are closed at
/// once (a flood of slow handshakes must not pile up tasks).
pub const MAX_HANDSHAKES: usize = 256;

/// One accepted connection, holding its slot under the connection cap.
pub struct Conn {
    io: Io,
    /// Who is calling, put in every request's extensions.
    pub peer: Peer,
    _slot: tokio::sync::OwnedSemaphorePermit,
}

enum Io {
    Plain(TcpStream),
    Tls(Box<TlsStream<TcpStream>>),
}

impl AsyncRead for Conn {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match &mut self.get_mut().io {
            Io::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Io::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Conn {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match &mut self.get_mut().io {
            Io::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Io::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }
    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match &mut self.get_mut().io {
            Io::Plain(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            Io::Tls(s) => Pin::new(s.as_mut()).poll_write_vectored(cx, bufs),
        }
    }
    fn is_write_vectored(&self) -> bool {
        match &self.io {
            Io::Plain(s) => s.is_write_vectored(),
            Io::Tls(s) => s.is_write_vectored(),
        }
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match &mut self.get_mut().io {
            Io::Plain(s) => Pin::new(s).poll_flush(cx),
            Io::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match &mut self.get_mut().io {
            Io::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Io::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

/// TLS for the gRPC port: the server's certificate, and client
/// certificates verified against the registry's current trust bundle.
pub struct Tls {
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
    trust_domain: String,
    registry: Arc<Registry>,
    built: Mutex<Option<Built>>,
}

/// A server config and the trust bundle it was built for.
struct Built {
    bundle: Vec<Vec<u8>>,
    config: Arc<rustls::ServerConfig>,
}

impl Tls {
    /// TLS serving `chain_pem`/`key_pem` (from [`crate::ca::Ca::server_identity`]).
    pub fn new(
        chain_pem: &str,
        key_pem: &str,
        trust_domain: &str,
        registry: Arc<Registry>,
    ) -> Result<Self, String> {
        use rustls::pki_types::pem::PemObject;
        let chain = CertificateDer::pem_slice_iter(chain_pem.as_bytes())
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| format!("server certificate: {e}"))?;
        let key = PrivateKeyDer::from_pem_slice(key_pem.as_bytes())
            .map_err(|e| format!("server key: {e}"))?;
        let tls = Self {
            chain,
            key,
            trust_domain: trust_domain.to_string(),
            registry,
            built: Mutex::default(),
        };
        tls.config()?;
        Ok(tls)
    }

    /// The server config for the registry's trust bundle now.
    fn config(&self) -> Result<Arc<rustls::ServerConfig>, String> {
        let bundle = self.registry.trust_bundle();
        let mut built = self.built.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(b) = &*built
            && b.bundle == bundle
        {
            return Ok(b.config.clone());
        }
        let mut roots = rustls::RootCertStore::empty();
        for der in &bundle {
            roots
                .add(CertificateDer::from(der.clone()))
                .map_err(|e| format!("trust bundle: {e}"))?;
        }
        let verifier = WebPkiClientVerifier::builder(Arc::new(roots))
            .allow_unauthenticated()
            .build()
            .map_err(|e| format!("client verifier: {e}"))?;
        let mut cfg = rustls::ServerConfig::builder()
            .with_client_cert_verifier(verifier)
            .with_single_cert(self.chain.clone(), self.key.clone_key())
            .map_err(|e| format!("server certificate: {e}"))?;
        cfg.alpn_protocols = vec![b"h2".to_vec()];
        let cfg = Arc::new(cfg);
        *built = Some(Built {
            bundle,
            config: cfg.clone(),
        });
        Ok(cfg)
    }

    async fn handshake(
        &self,
        tcp: TcpStream,
        addr: SocketAddr,
        slot: tokio::sync::OwnedSemaphorePermit,
    ) -> io::Result<Conn> {
        let cfg = self.config().map_err(io::Error::other)?;
        let tls = tokio::time::timeout(
            HANDSHAKE_TIMEOUT,
            tokio_rustls::TlsAcceptor::from(cfg).accept(tcp),
        )
        .await
        .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "TLS handshake timed out"))??;
        let id = tls
            .get_ref()
            .1
            .peer_certificates()
            .and_then(|certs| certs.first())
            .and_then(|leaf| wayfinder_proto::spiffe::id_of(leaf));
        let caller = Caller::from_spiffe_id(id.as_deref(), &self.trust_domain);
        Ok(Conn {
            io: Io::Tls(Box::new(tls)),
            peer: Peer {
                addr: Some(addr),
                caller: Arc::new(caller),
            },
            _slot: slot,
        })
    }
}

/// Failed handshakes (a plaintext client on the TLS port, a certificate
/// from another CA) are logged within this limit.
static HANDSHAKE_LOG: super::auth::LogLimit = super::auth::LogLimit::new();

/// The connections of `listener`: TLS handshakes done (each in its own
/// task, so a slow client holds up no other), or plaintext callers marked
/// [`Caller::Unchecked`] when `tls` is `None` (`--insecure`). At most
/// `max_connections` are open at once: then accepting stops (clients wait
/// in the kernel's queue) and `full` counts it.
pub fn incoming(
    listener: TcpListener,
    tls: Option<Arc<Tls>>,
    max_connections: usize,
    full: prometheus_client::metrics::counter::Counter,
) -> tokio::sync::mpsc::Receiver<Conn> {
    let (tx, rx) = tokio::sync::mpsc::channel(64);
    let handshakes = Arc::new(tokio::sync::Semaphore::new(MAX_HANDSHAKES));
    let slots = Arc::new(tokio::sync::Semaphore::new(max_connections));
    tokio::spawn(async move {
        loop {
            let slot = match slots.clone().try_acquire_owned() {
                Ok(s) => s,
                Err(_) => {
                    full.inc();
                    match slots.clone().acquire_owned().await {
                        Ok(s) => s,
                        Err(_) => return,
                    }
                }
            };
            let (tcp, addr) = match listener.accept().await {
                Ok(a) => a,
                Err(e) => {
                    // Out of file descriptors and the like: wait, go on.
                    tracing::warn!(error = %e, "gRPC accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            let _ = tcp.set_nodelay(true);
            let Some(tls) = tls.clone() else {
                let conn = Conn {
                    io: Io::Plain(tcp),
                    peer: Peer {
                        addr: Some(addr),
                        caller: Arc::new(Caller::Unchecked),
                    },
                    _slot: slot,
                };
                if tx.send(conn).await.is_err() {
                    return;
                }
                continue;
            };
            let Ok(permit) = handshakes.clone().try_acquire_owned() else {
                if HANDSHAKE_LOG.allow() {
                    tracing::warn!(peer = %addr, "{MAX_HANDSHAKES} TLS handshakes under way; connection closed");
                }
                continue;
            };
            let tx = tx.clone();
            tokio::spawn(async move {
                let handshake = tls.handshake(tcp, addr, slot).await;
                drop(permit);
                match handshake {
                    Ok(conn) => {
                        let _ = tx.send(conn).await;
                    }
                    Err(e) if HANDSHAKE_LOG.allow() => {
                        tracing::warn!(peer = %addr, error = %e, "gRPC TLS handshake failed; connection refused");
                    }
                    Err(_) => {}
                }
            });
        }
    });
    rx
}
