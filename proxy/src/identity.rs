//! The sidecar's workload identity and the TLS it speaks with it.
//!
//! The key is made here and never leaves the process: the control plane
//! gets a CSR and a join token (`Identity.Certify`) and answers with a
//! short-lived certificate naming the service twice, as
//! `spiffe://<trust domain>/svc/<service>` (who the peer is, for
//! authorization) and `<service>.svc.<trust domain>` (the name TLS clients
//! verify). The certificate is renewed at 70% of its lifetime; live
//! connections keep their session, new handshakes use the new certificate.
//!
//! Between sidecars: TLS 1.3 only, both sides authenticated, ALPN `h2` for
//! HTTP (`http/1.1` for upgrades) and `wayfinder/tcp` for opaque TCP. The trust roots come with every
//! certificate and every discovery snapshot, so a root can be rotated by
//! publishing old and new roots together.

use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::{ClientHello, ResolvesServerCert, WebPkiClientVerifier};
use rustls::sign::CertifiedKey;
use rustls::{
    ClientConfig, DigitallySignedStruct, DistinguishedName, RootCertStore, ServerConfig,
    SignatureScheme,
};
use thiserror::Error;
use tonic::transport::Channel;
use wayfinder_proto::v1::{CertifyRequest, identity_client::IdentityClient};

/// ALPN protocol for HTTP between sidecars.
pub const ALPN_H2: &[u8] = b"h2";
/// ALPN protocol for HTTP/1.1 between sidecars (upgrades such as WebSocket).
pub const ALPN_H1: &[u8] = b"http/1.1";
/// ALPN protocol for opaque TCP between sidecars.
pub const ALPN_TCP: &[u8] = b"wayfinder/tcp";
/// Share of a certificate's lifetime after which it is renewed.
pub const RENEW_AT: f64 = 0.7;

/// Why no certificate could be had.
#[derive(Debug, Error)]
pub enum IdentityError {
    /// The control plane refused (bad token, service not allowed, bad CSR).
    #[error("the control plane refused the certificate: {0}")]
    Refused(String),
    /// The control plane could not be reached.
    #[error("cannot reach the control plane: {0}")]
    Unreachable(String),
    /// What came back is not usable.
    #[error("unusable certificate: {0}")]
    Bad(String),
    /// Local key or CSR generation failed.
    #[error("cannot make a key: {0}")]
    Key(String),
}

struct Current {
    key: Arc<CertifiedKey>,
    spiffe_id: String,
    trust_domain: String,
    issued_at: SystemTime,
    not_after: SystemTime,
}

/// Verifiers rebuilt when the roots change.
struct Verifiers {
    client: Arc<dyn ClientCertVerifier>,
    server: Arc<dyn ServerCertVerifier>,
}

/// This sidecar's identity.
pub struct Identity {
    service: String,
    token: String,
    /// Where renewals go: the bootstrap channel at first, then (against an
    /// https control plane) the one presenting this certificate, so a
    /// renewal needs no valid join token.
    channel: RwLock<Channel>,
    current: RwLock<Current>,
    verifiers: RwLock<Verifiers>,
    /// SHA-256 of the roots trusted now (sent with watches).
    bundle_sha256: RwLock<Vec<u8>>,
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn verifiers(ders: &[Vec<u8>]) -> Result<Verifiers, IdentityError> {
    let mut roots = RootCertStore::empty();
    for d in ders {
        roots
            .add(CertificateDer::from(d.clone()))
            .map_err(|e| IdentityError::Bad(format!("trust bundle: {e}")))?;
    }
    let roots = Arc::new(roots);
    let client = WebPkiClientVerifier::builder_with_provider(roots.clone(), provider())
        .build()
        .map_err(|e| IdentityError::Bad(e.to_string()))?;
    let server = rustls::client::WebPkiServerVerifier::builder_with_provider(roots, provider())
        .build()
        .map_err(|e| IdentityError::Bad(e.to_string()))?;
    Ok(Verifiers { client, server })
}

async fn request(
    channel: &Channel,
    service: &str,
    token: &str,
) -> Result<(Current, Vec<Vec<u8>>), IdentityError> {
    let key = rcgen::KeyPair::generate().map_err(|e| IdentityError::Key(e.to_string()))?;
    let mut params = rcgen::CertificateParams::default();
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, service);
    let csr = params
        .serialize_request(&key)
        .map_err(|e| IdentityError::Key(e.to_string()))?;
    let resp = IdentityClient::new(channel.clone())
        .certify(CertifyRequest {
            token: token.to_string(),
            service: service.to_string(),
            csr_der: csr.der().to_vec(),
        })
        .await
        .map_err(|s| match s.code() {
            tonic::Code::Unavailable | tonic::Code::DeadlineExceeded | tonic::Code::Unknown => {
                IdentityError::Unreachable(s.message().to_string())
            }
            _ => IdentityError::Refused(s.message().to_string()),
        })?
        .into_inner();
    if resp.chain.is_empty() {
        return Err(IdentityError::Bad("empty chain".into()));
    }
    let signer = rustls::crypto::ring::sign::any_supported_type(&PrivateKeyDer::Pkcs8(
        PrivatePkcs8KeyDer::from(key.serialize_der()),
    ))
    .map_err(|e| IdentityError::Key(e.to_string()))?;
    let chain = resp.chain.into_iter().map(CertificateDer::from).collect();
    let trust_domain = resp
        .spiffe_id
        .strip_prefix("spiffe://")
        .and_then(|r| r.split('/').next())
        .unwrap_or_default()
        .to_string();
    Ok((
        Current {
            key: Arc::new(CertifiedKey::new(chain, signer)),
            spiffe_id: resp.spiffe_id,
            trust_domain,
            issued_at: SystemTime::now(),
            not_after: UNIX_EPOCH + Duration::from_millis(resp.not_after_unix_ms),
        },
        resp.trust_bundle,
    ))
}

impl Identity {
    /// Gets the first certificate for `service` with `token`.
    pub async fn certify(
        channel: Channel,
        service: &str,
        token: &str,
    ) -> Result<Arc<Self>, IdentityError> {
        let (current, bundle) = request(&channel, service, token).await?;
        tracing::info!(id = %current.spiffe_id, "certificate obtained");
        Ok(Arc::new(Self {
            service: service.to_string(),
            token: token.to_string(),
            channel: RwLock::new(channel),
            verifiers: RwLock::new(verifiers(&bundle)?),
            bundle_sha256: RwLock::new(wayfinder_proto::bundle_sha256(&bundle)),
            current: RwLock::new(current),
        }))
    }

    /// Renews the certificate at [`RENEW_AT`] of its lifetime, forever;
    /// failures are retried with backoff while the old one is still valid.
    pub async fn renew_loop(self: Arc<Self>) {
        let mut attempt = 0u32;
        loop {
            let wait = {
                let c = self.read();
                let life = c.not_after.duration_since(c.issued_at).unwrap_or_default();
                let due = c.issued_at + life.mul_f64(RENEW_AT);
                due.duration_since(SystemTime::now()).unwrap_or_default()
            };
            tokio::time::sleep(if attempt == 0 {
                wait
            } else {
                wayfinder_proto::backoff::backoff(attempt)
            })
            .await;
            let channel = self
                .channel
                .read()
                .unwrap_or_else(|p| p.into_inner())
                .clone();
            match request(&channel, &self.service, &self.token).await {
                Ok((current, bundle)) => {
                    attempt = 0;
                    self.set_roots(&bundle);
                    tracing::info!(id = %current.spiffe_id, "certificate renewed");
                    if let Ok(mut c) = self.current.write() {
                        *c = current;
                    }
                }
                Err(e) => {
                    attempt = attempt.saturating_add(1);
                    tracing::warn!(error = %e, "certificate renewal failed; retrying");
                }
            }
        }
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, Current> {
        self.current.read().unwrap_or_else(|p| p.into_inner())
    }

    /// Trusts exactly `ders` from now on (a snapshot or a renewal carried them).
    pub fn set_roots(&self, ders: &[Vec<u8>]) {
        if ders.is_empty() {
            return;
        }
        let sha = wayfinder_proto::bundle_sha256(ders);
        if self.bundle_sha256.read().is_ok_and(|b| *b == sha) {
            return;
        }
        match verifiers(ders) {
            Ok(v) => {
                if let Ok(mut cur) = self.verifiers.write() {
                    *cur = v;
                }
                if let Ok(mut b) = self.bundle_sha256.write() {
                    *b = sha;
                }
                tracing::info!(roots = ders.len(), "trust bundle updated");
            }
            Err(e) => tracing::warn!(error = %e, "trust bundle ignored"),
        }
    }

    /// SHA-256 of the trusted roots, as watch requests carry it.
    pub fn bundle_sha256(&self) -> Vec<u8> {
        self.bundle_sha256
            .read()
            .map(|b| b.clone())
            .unwrap_or_default()
    }

    /// This sidecar's SPIFFE ID.
    pub fn spiffe_id(&self) -> String {
        self.read().spiffe_id.clone()
    }

    /// When the current certificate expires.
    pub fn not_after(&self) -> SystemTime {
        self.read().not_after
    }

    /// The name a client verifies when it means to reach `service`.
    pub fn server_name(&self, service: &str) -> Option<ServerName<'static>> {
        ServerName::try_from(format!("{service}.svc.{}", self.read().trust_domain)).ok()
    }

    /// TLS for accepting other sidecars (client certificates required).
    pub fn server_config(self: &Arc<Self>) -> Arc<ServerConfig> {
        let mut cfg = ServerConfig::builder_with_protocol_versions(&[&rustls::version::TLS13])
            .with_client_cert_verifier(Arc::new(Dynamic(self.clone())))
            .with_cert_resolver(Arc::new(Dynamic(self.clone())));
        cfg.alpn_protocols = vec![ALPN_H2.to_vec(), ALPN_H1.to_vec(), ALPN_TCP.to_vec()];
        Arc::new(cfg)
    }

    /// Renews over `channel` from now on (one that presents this identity).
    pub fn renew_over(&self, channel: Channel) {
        if let Ok(mut c) = self.channel.write() {
            *c = channel;
        }
    }

    /// This identity's certificate, as presented to the control plane
    /// (renewals included).
    pub fn client_cert(self: &Arc<Self>) -> Arc<dyn rustls::client::ResolvesClientCert> {
        Arc::new(Dynamic(self.clone()))
    }

    /// TLS for connecting to other sidecars with `alpn`.
    pub fn client_config(self: &Arc<Self>, alpn: &[u8]) -> Arc<ClientConfig> {
        let mut cfg = ClientConfig::builder_with_protocol_versions(&[&rustls::version::TLS13])
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(Dynamic(self.clone())))
            .with_client_cert_resolver(Arc::new(Dynamic(self.clone())));
        cfg.alpn_protocols = vec![alpn.to_vec()];
        Arc::new(cfg)
    }
}

/// The SPIFFE ID in a peer's leaf certificate.
pub fn peer_id(certs: &[CertificateDer<'_>]) -> Option<String> {
    wayfinder_proto::spiffe::id_of(certs.first()?)
}

/// Resolvers and verifiers that read the identity's current state, so
/// renewals and root rotations need no new TLS configs.
#[derive(Debug)]
struct Dynamic(Arc<Identity>);

impl std::fmt::Debug for Identity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Identity")
            .field("service", &self.service)
            .finish_non_exhaustive()
    }
}

impl Dynamic {
    fn verifiers(&self) -> std::sync::RwLockReadGuard<'_, Verifiers> {
        self.0.verifiers.read().unwrap_or_else(|p| p.into_inner())
    }
}

impl ResolvesServerCert for Dynamic {
    fn resolve(&self, _: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.0.read().key.clone())
    }
}

impl rustls::client::ResolvesClientCert for Dynamic {
    fn resolve(&self, _: &[&[u8]], _: &[SignatureScheme]) -> Option<Arc<CertifiedKey>> {
        Some(self.0.read().key.clone())
    }
    fn has_certs(&self) -> bool {
        true
    }
}

impl ClientCertVerifier for Dynamic {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }
    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        let v = self.verifiers().client.clone();
        v.verify_client_cert(end_entity, intermediates, now)
    }
    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        let v = self.verifiers().client.clone();
        v.verify_tls12_signature(message, cert, dss)
    }
    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        let v = self.verifiers().client.clone();
        v.verify_tls13_signature(message, cert, dss)
    }
    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.verifiers().client.supported_verify_schemes()
    }
}

impl ServerCertVerifier for Dynamic {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let v = self.verifiers().server.clone();
        v.verify_server_cert(end_entity, intermediates, server_name, ocsp, now)
    }
    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        let v = self.verifiers().server.clone();
        v.verify_tls12_signature(message, cert, dss)
    }
    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        let v = self.verifiers().server.clone();
        v.verify_tls13_signature(message, cert, dss)
    }
    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.verifiers().server.supported_verify_schemes()
    }
}
