//! The gRPC channel to wf-control: plaintext, TLS verified with a bundle
//! file, or TLS verified with a pinned root (bootstrap from one hash, as
//! `kubeadm join --discovery-token-ca-cert-hash` does).

use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context as _, Result, bail};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, RootCertStore, SignatureScheme};
use tonic::transport::{Channel, Endpoint, Uri};
use wayfinder_proto::dial::Failover;

/// How the control plane's certificate is trusted.
#[derive(Clone)]
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

/// A lazily connecting channel to the control plane: one URL, or the URLs of
/// several replicas separated by commas. The connection stays with the
/// replica that answered; when it breaks, the next connect tries the others
/// in turn, so a sidecar fails over when its replica dies.
/// With `client_cert`, the sidecar presents its mesh certificate, which is
/// how an https control plane knows which service is calling.
pub fn channel(
    urls: &str,
    trust: Trust,
    client_cert: Option<Arc<dyn rustls::client::ResolvesClientCert>>,
) -> Result<Channel> {
    let mut targets = Vec::new();
    let mut schemes = std::collections::BTreeSet::new();
    for url in urls.split(',').map(str::trim).filter(|u| !u.is_empty()) {
        let uri: Uri = url
            .parse()
            .with_context(|| format!("--control-plane {url:?} is not a URL"))?;
        let https = match uri.scheme_str() {
            Some("https") => true,
            Some("http") => false,
            _ => bail!("--control-plane {url:?}: use http://HOST:PORT or https://HOST:PORT"),
        };
        let host = uri
            .host()
            .with_context(|| format!("--control-plane {url:?} has no host"))?
            .to_string();
        schemes.insert(https);
        targets.push((host, uri.port_u16().unwrap_or(if https { 443 } else { 80 })));
    }
    if schemes.len() > 1 {
        bail!("--control-plane {urls:?}: every replica must be http or every one https");
    }
    let Some((first_host, first_port)) = targets.first().cloned() else {
        bail!("--control-plane is empty");
    };
    let https = schemes.contains(&true);
    let tls = match trust {
        _ if !https => None,
        Trust::None => {
            bail!("--control-plane is https: give --ca-bundle FILE or --ca-pin sha256:HEX")
        }
        Trust::Bundle(pem) => {
            use rustls::pki_types::pem::PemObject;
            let mut roots = RootCertStore::empty();
            for cert in CertificateDer::pem_slice_iter(&pem) {
                roots
                    .add(cert.context("--ca-bundle holds a bad certificate")?)
                    .context("--ca-bundle")?;
            }
            let verifier = rustls::client::WebPkiServerVerifier::builder(Arc::new(roots))
                .build()
                .context("--ca-bundle")?;
            Some(rustls::ClientConfig::builder().with_webpki_verifier(verifier))
        }
        Trust::Pin(pin) => Some(
            rustls::ClientConfig::builder()
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(Pinned(pin))),
        ),
    };
    let tls = tls.map(|wants_cert| match client_cert {
        Some(resolver) => wants_cert.with_client_cert_resolver(resolver),
        None => wants_cert.with_no_client_auth(),
    });
    let tls = tls.map(|mut cfg| {
        cfg.alpn_protocols = vec![b"h2".to_vec()];
        tokio_rustls::TlsConnector::from(Arc::new(cfg))
    });
    // The connector does TLS itself (with the name of the replica it
    // reached), so tonic sees plain h2 to the first address.
    let host = if first_host.contains(':') && !first_host.starts_with('[') {
        format!("[{first_host}]")
    } else {
        first_host
    };
    let endpoint = Endpoint::from_shared(format!("http://{host}:{first_port}"))
        .with_context(|| format!("--control-plane {urls:?} is not a URL"))?
        .tcp_nodelay(true)
        .http2_keep_alive_interval(Duration::from_secs(10))
        .keep_alive_timeout(Duration::from_secs(5));
    Ok(endpoint.connect_with_connector_lazy(Failover::new(targets, tls)))
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

/// The addresses of the control plane at `url`: a URL, or HOST:PORT without
/// a scheme (port 15010 when none is given). Of a list of replicas, the first.
pub async fn resolve(url: &str) -> Result<Vec<std::net::SocketAddr>> {
    let url = url.split(',').next().unwrap_or(url).trim();
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
