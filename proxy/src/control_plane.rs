//! The gRPC channel to wf-control: plaintext, TLS verified with a bundle
//! file, or TLS verified with a pinned root (bootstrap from one hash, as
//! `kubeadm join --discovery-token-ca-cert-hash` does).

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use anyhow::{Context as _, Result, bail};
use hyper_util::rt::TokioIo;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, RootCertStore, SignatureScheme};
use tonic::transport::{Channel, Endpoint, Uri};
use wayfinder_proto::dial::Dialer;

/// How the control plane's certificate is trusted.
pub enum Trust {
    /// Plain `http://`.
    None,
    /// PEM roots (wf-control's `bundle.crt`).
    Bundle(Vec<u8>),
    /// SHA-256 of the root certificate (DER); the server sends the root in its chain.
    Pin([u8; 32]),
}

/// Parses `sha256:HEX` (64 hex digits).
pub fn parse_pin(s: &str) -> Result<[u8; 32], String> {
    let hex = s
        .strip_prefix("sha256:")
        .ok_or_else(|| format!("{s:?}: expected sha256:<64 hex digits>"))?;
    if hex.len() != 64 {
        return Err(format!("{s:?}: expected 64 hex digits"));
    }
    let mut out = [0u8; 32];
    for (i, b) in out.iter_mut().enumerate() {
        *b = u8::from_str_radix(&hex[2 * i..2 * i + 2], 16)
            .map_err(|_| format!("{s:?}: not hex"))?;
    }
    Ok(out)
}

/// The pin of a DER certificate, as `sha256:HEX`.
pub fn pin_of(der: &[u8]) -> String {
    let d = ring::digest::digest(&ring::digest::SHA256, der);
    let hex: String = d.as_ref().iter().map(|b| format!("{b:02x}")).collect();
    format!("sha256:{hex}")
}

/// A lazily connecting channel to `url` with `trust`.
pub fn channel(url: &str, trust: Trust) -> Result<Channel> {
    let https = url.starts_with("https://");
    let endpoint_url = match (&trust, https) {
        // With a pin, this module does TLS itself: tonic sees plain h2.
        (Trust::Pin(_), true) => url.replacen("https://", "http://", 1),
        (Trust::None, true) => {
            bail!("--control-plane is https: give --ca-bundle FILE or --ca-pin sha256:HEX")
        }
        _ => url.to_string(),
    };
    let mut endpoint = Endpoint::from_shared(endpoint_url)
        .with_context(|| format!("--control-plane {url:?} is not a URL"))?
        .connect_timeout(Duration::from_secs(2))
        .tcp_nodelay(true)
        .http2_keep_alive_interval(Duration::from_secs(10))
        .keep_alive_timeout(Duration::from_secs(5));
    match trust {
        Trust::Bundle(pem) if https => {
            endpoint = endpoint
                .tls_config(
                    tonic::transport::ClientTlsConfig::new()
                        .ca_certificate(tonic::transport::Certificate::from_pem(pem)),
                )
                .context("TLS to the control plane")?;
            Ok(endpoint.connect_with_connector_lazy(Dialer))
        }
        Trust::Pin(pin) if https => {
            let mut cfg = rustls::ClientConfig::builder()
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(Pinned(pin)))
                .with_no_client_auth();
            cfg.alpn_protocols = vec![b"h2".to_vec()];
            Ok(endpoint.connect_with_connector_lazy(PinnedConnector(
                tokio_rustls::TlsConnector::from(Arc::new(cfg)),
            )))
        }
        _ => Ok(endpoint.connect_with_connector_lazy(Dialer)),
    }
}

/// Accepts a server chain that contains the pinned root and verifies to it.
#[derive(Debug)]
struct Pinned([u8; 32]);

impl Pinned {
    fn inner(
        &self,
        intermediates: &[CertificateDer<'_>],
    ) -> Result<Arc<dyn ServerCertVerifier>, rustls::Error> {
        let root = intermediates
            .iter()
            .find(|c| ring::digest::digest(&ring::digest::SHA256, c).as_ref() == self.0)
            .ok_or_else(|| {
                rustls::Error::General("the control plane's chain lacks the pinned root".into())
            })?;
        let mut roots = RootCertStore::empty();
        roots.add(root.clone())?;
        let v = rustls::client::WebPkiServerVerifier::builder(Arc::new(roots))
            .build()
            .map_err(|e| rustls::Error::General(e.to_string()))?;
        Ok(v)
    }
}

impl ServerCertVerifier for Pinned {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        self.inner(intermediates)?.verify_server_cert(
            end_entity,
            intermediates,
            server_name,
            ocsp,
            now,
        )
    }
    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &rustls::crypto::ring::default_provider().signature_verification_algorithms,
        )
    }
    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &rustls::crypto::ring::default_provider().signature_verification_algorithms,
        )
    }
    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        rustls::crypto::ring::default_provider()
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// TCP, then TLS with the pinned verifier, for tonic.
#[derive(Clone)]
struct PinnedConnector(tokio_rustls::TlsConnector);

type Io = TokioIo<tokio_rustls::client::TlsStream<tokio::net::TcpStream>>;

impl tower_service::Service<Uri> for PinnedConnector {
    type Response = Io;
    type Error = std::io::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Io, std::io::Error>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), std::io::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        let tls = self.0.clone();
        Box::pin(async move {
            let bad =
                |m: &str| std::io::Error::new(std::io::ErrorKind::InvalidInput, m.to_string());
            let host = uri.host().ok_or_else(|| bad("no host"))?.to_string();
            let port = uri.port_u16().unwrap_or(443);
            let name = ServerName::try_from(host.trim_matches(['[', ']']).to_string())
                .map_err(|_| bad("bad host name"))?;
            let tcp = wayfinder_proto::dial::connect(&host, port).await?;
            Ok(TokioIo::new(tls.connect(name, tcp).await?))
        })
    }
}

/// The addresses of the control plane at `url`: a URL, or HOST:PORT without
/// a scheme (port 15010 when none is given).
pub async fn resolve(url: &str) -> Result<Vec<std::net::SocketAddr>> {
    let full = if url.contains("://") {
        url.to_string()
    } else {
        format!("http://{url}")
    };
    let uri: Uri = full
        .parse()
        .with_context(|| format!("control plane {url:?} is not a URL or HOST:PORT"))?;
    let host = uri
        .host()
        .with_context(|| format!("control plane {url:?} has no host"))?;
    wayfinder_proto::dial::resolve(host, uri.port_u16().unwrap_or(15010))
        .await
        .with_context(|| format!("resolving {host}"))
}

/// The local address that routes towards the control plane at `url`: what
/// a sidecar bound to every address advertises to its peers.
pub async fn route_ip(url: &str) -> Result<std::net::IpAddr> {
    let target = *resolve(url)
        .await?
        .first()
        .with_context(|| format!("control plane {url:?} has no address"))?;
    let ip = target.ip();
    let any: std::net::SocketAddr = if ip.is_ipv4() {
        ([0, 0, 0, 0], 0).into()
    } else {
        (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
    };
    // Connecting a UDP socket sends nothing; it only asks the kernel's routing.
    let probe = std::net::UdpSocket::bind(any)?;
    probe.connect(target)?;
    let local = probe.local_addr()?.ip();
    if local.is_unspecified() {
        bail!("no route to the control plane at {ip}");
    }
    Ok(local)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pins_parse_and_print() {
        let p = pin_of(b"root");
        assert_eq!(parse_pin(&p).map(|b| b.len()), Ok(32));
        assert!(parse_pin("sha1:00").is_err());
        assert!(parse_pin("sha256:zz").is_err());
        assert!(parse_pin(&format!("sha256:{}", "g".repeat(64))).is_err());
    }
}
