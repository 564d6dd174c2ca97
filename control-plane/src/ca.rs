//! The mesh's certificate authority: a root that only signs an intermediate,
//! and the intermediate that signs short-lived workload certificates from
//! sidecars' CSRs. Both are generated on first start into `<data>/ca/` (keys
//! mode 0600), or provided by the operator in the same files.
//!
//! A workload certificate names its service twice: the SPIFFE ID
//! `spiffe://<trust domain>/svc/<service>` (URI SAN) that authorization
//! uses, and the DNS name `<service>.svc.<trust domain>` that TLS clients
//! verify with the standard name check.

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DnType,
    ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose, SanType,
};
use rustls::pki_types::{CertificateDer, CertificateSigningRequestDer};
use thiserror::Error;

/// What can go wrong with the CA.
#[derive(Debug, Error)]
pub enum CaError {
    /// Reading or writing its files.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// A key or certificate file that does not parse.
    #[error("{path}: {message}")]
    Bad {
        /// The file.
        path: PathBuf,
        /// Why.
        message: String,
    },
    /// The CSR does not parse or its signature is wrong.
    #[error("invalid CSR: {0}")]
    Csr(String),
    /// Signing failed.
    #[error("cannot sign: {0}")]
    Sign(String),
}

/// A certificate just issued.
pub struct Issued {
    /// Leaf, then the intermediate (DER).
    pub chain: Vec<Vec<u8>>,
    /// SPIFFE ID in the certificate.
    pub spiffe_id: String,
    /// DNS name in the certificate.
    pub dns_name: String,
    /// Expiry, Unix milliseconds.
    pub not_after_unix_ms: u64,
}

/// The certificate authority.
pub struct Ca {
    trust_domain: String,
    intermediate: Issuer<'static, KeyPair>,
    intermediate_der: Vec<u8>,
    intermediate_pem: String,
    root_der: Vec<u8>,
    /// Intermediate and root as PEM, appended to serving certificates.
    chain_tail_pem: String,
    bundle: Vec<Vec<u8>>,
    bundle_pem: String,
    lifetime: Duration,
}

/// Lifetime of the operator credential.
pub const OPERATOR_LIFETIME: Duration = Duration::from_secs(365 * 24 * 3600);
/// An operator certificate with less than this left is replaced at start.
pub const OPERATOR_RENEW_BEFORE: Duration = Duration::from_secs(30 * 24 * 3600);

/// Default lifetime of workload certificates.
pub const DEFAULT_LIFETIME: Duration = Duration::from_secs(24 * 3600);

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> CaError + '_ {
    move |source| CaError::Io {
        path: path.to_path_buf(),
        source,
    }
}

fn bad(path: &Path, e: impl std::fmt::Display) -> CaError {
    CaError::Bad {
        path: path.to_path_buf(),
        message: e.to_string(),
    }
}

/// Writes a private key readable by the owner only.
fn write_secret(path: &Path, pem: &str) -> Result<(), CaError> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(io(path))?;
    f.write_all(pem.as_bytes()).map_err(io(path))
}

fn ca_params(name: &str, path_len: u8) -> Result<CertificateParams, CaError> {
    let mut p =
        CertificateParams::new(Vec::<String>::new()).map_err(|e| CaError::Sign(e.to_string()))?;
    p.distinguished_name.push(DnType::CommonName, name);
    p.is_ca = IsCa::Ca(BasicConstraints::Constrained(path_len));
    p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let now = SystemTime::now();
    p.not_before = (now - Duration::from_secs(3600)).into();
    p.not_after = (now + Duration::from_secs(10 * 365 * 24 * 3600)).into();
    Ok(p)
}

/// A PEM file's text (ending in a newline) and its certificates (DER).
fn read_pem(path: &Path) -> Result<(String, Vec<Vec<u8>>), CaError> {
    use rustls::pki_types::pem::PemObject;
    let mut text = std::fs::read_to_string(path).map_err(io(path))?;
    let certs: Vec<_> = CertificateDer::pem_slice_iter(text.as_bytes())
        .map(|c| c.map(|c| c.to_vec()))
        .collect::<Result<_, _>>()
        .map_err(|e| bad(path, e))?;
    if certs.is_empty() {
        return Err(bad(path, "no certificate in the file"));
    }
    if !text.ends_with('\n') {
        text.push('\n');
    }
    Ok((text, certs))
}

impl Ca {
    /// Loads the CA from `dir`, creating a root and an intermediate there
    /// on first start.
    pub fn load_or_create(
        dir: &Path,
        trust_domain: &str,
        lifetime: Duration,
    ) -> Result<Self, CaError> {
        std::fs::create_dir_all(dir).map_err(io(dir))?;
        let (root_crt, root_key) = (dir.join("root.crt"), dir.join("root.key"));
        let (int_crt, int_key) = (dir.join("intermediate.crt"), dir.join("intermediate.key"));
        let bundle_path = dir.join("bundle.crt");
        if !int_crt.exists() {
            let root_kp = KeyPair::generate().map_err(|e| CaError::Sign(e.to_string()))?;
            let root = rcgen::CertifiedIssuer::self_signed(
                ca_params(&format!("wayfinder root ({trust_domain})"), 1)?,
                root_kp,
            )
            .map_err(|e| CaError::Sign(e.to_string()))?;
            let int_kp = KeyPair::generate().map_err(|e| CaError::Sign(e.to_string()))?;
            let int_pem_key = int_kp.serialize_pem();
            let int = rcgen::CertifiedIssuer::signed_by(
                ca_params(&format!("wayfinder intermediate ({trust_domain})"), 0)?,
                int_kp,
                &root,
            )
            .map_err(|e| CaError::Sign(e.to_string()))?;
            write_secret(&root_key, &root.key().serialize_pem())?;
            std::fs::write(&root_crt, root.pem()).map_err(io(&root_crt))?;
            write_secret(&int_key, &int_pem_key)?;
            std::fs::write(&int_crt, int.pem()).map_err(io(&int_crt))?;
            if !bundle_path.exists() {
                std::fs::write(&bundle_path, root.pem()).map_err(io(&bundle_path))?;
            }
            tracing::info!(dir = %dir.display(), "generated a new CA (root and intermediate)");
        }
        let key_pem = std::fs::read_to_string(&int_key).map_err(io(&int_key))?;
        let key = KeyPair::from_pem(&key_pem).map_err(|e| bad(&int_key, e))?;
        let (int_pem, int_certs) = read_pem(&int_crt)?;
        let intermediate = Issuer::from_ca_cert_pem(&int_pem, key).map_err(|e| bad(&int_crt, e))?;
        let (root_pem, root_certs) = read_pem(&root_crt)?;
        let (bundle_pem, bundle) = if bundle_path.exists() {
            read_pem(&bundle_path)?
        } else {
            (root_pem.clone(), root_certs.clone())
        };
        Ok(Self {
            trust_domain: trust_domain.to_string(),
            intermediate,
            intermediate_der: int_certs[0].clone(),
            intermediate_pem: int_pem.clone(),
            root_der: root_certs[0].clone(),
            chain_tail_pem: int_pem + &root_pem,
            bundle,
            bundle_pem,
            lifetime,
        })
    }

    /// The roots peers must trust (DER), in the order of the bundle file.
    pub fn bundle(&self) -> &[Vec<u8>] {
        &self.bundle
    }

    /// When the root and the intermediate expire, Unix ms (`None`: unreadable).
    pub fn not_after_unix_ms(&self) -> (Option<u64>, Option<u64>) {
        let of = |der: &[u8]| {
            let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
            u64::try_from(cert.validity().not_after.timestamp())
                .ok()
                .map(|s| s.saturating_mul(1000))
        };
        (of(&self.root_der), of(&self.intermediate_der))
    }

    /// The roots as PEM, for clients bootstrapping trust in the control plane.
    pub fn bundle_pem(&self) -> &str {
        &self.bundle_pem
    }

    /// The SPIFFE ID of `service`.
    pub fn spiffe_id(&self, service: &str) -> String {
        format!("spiffe://{}/svc/{service}", self.trust_domain)
    }

    /// The DNS name of `service` in certificates.
    pub fn dns_name(&self, service: &str) -> String {
        format!("{service}.svc.{}", self.trust_domain)
    }

    /// Signs `csr` for `service`: the names come from the service, never
    /// from the CSR, whose signature proves the requester holds the key.
    pub fn issue(&self, csr: &[u8], service: &str) -> Result<Issued, CaError> {
        let mut req =
            CertificateSigningRequestParams::from_der(&CertificateSigningRequestDer::from(csr))
                .map_err(|e| CaError::Csr(e.to_string()))?;
        let spiffe_id = self.spiffe_id(service);
        let dns_name = self.dns_name(service);
        let mut p = CertificateParams::default();
        p.distinguished_name.push(DnType::CommonName, service);
        p.subject_alt_names = vec![
            SanType::URI(
                spiffe_id
                    .as_str()
                    .try_into()
                    .map_err(|e: rcgen::Error| CaError::Sign(e.to_string()))?,
            ),
            SanType::DnsName(
                dns_name
                    .as_str()
                    .try_into()
                    .map_err(|e: rcgen::Error| CaError::Sign(e.to_string()))?,
            ),
        ];
        p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        p.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        let now = SystemTime::now();
        // A minute of slack for clocks that disagree a little.
        p.not_before = (now - Duration::from_secs(60)).into();
        let not_after = now + self.lifetime;
        p.not_after = not_after.into();
        req.params = p;
        let cert = req
            .signed_by(&self.intermediate)
            .map_err(|e| CaError::Sign(e.to_string()))?;
        Ok(Issued {
            chain: vec![cert.der().to_vec(), self.intermediate_der.clone()],
            spiffe_id,
            dns_name,
            not_after_unix_ms: not_after
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_millis() as u64),
        })
    }

    /// The operator's SPIFFE ID: what wfctl's certificate names.
    pub fn operator_id(&self) -> String {
        format!("spiffe://{}/operator", self.trust_domain)
    }

    /// Writes the operator credential wfctl presents into `dir` (mode
    /// 0700): `operator.crt` (leaf and intermediate), `operator.key` (0600)
    /// and `ca.crt` (the roots that verify wf-control). A certificate with
    /// more than [`OPERATOR_RENEW_BEFORE`] left is kept, so a copy handed to
    /// an operator stays good across restarts. Returns whether it issued one.
    pub fn operator_credential(&self, dir: &Path) -> Result<bool, CaError> {
        use std::os::unix::fs::PermissionsExt;
        std::fs::create_dir_all(dir).map_err(io(dir))?;
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700)).map_err(io(dir))?;
        let (crt, key_path, ca) = (
            dir.join("operator.crt"),
            dir.join("operator.key"),
            dir.join("ca.crt"),
        );
        std::fs::write(&ca, &self.bundle_pem).map_err(io(&ca))?;
        let fresh = std::fs::read(&crt).ok().and_then(|pem| {
            use rustls::pki_types::pem::PemObject;
            let der = CertificateDer::pem_slice_iter(&pem).next()?.ok()?;
            let (_, cert) = x509_parser::parse_x509_certificate(&der).ok()?;
            let left = cert.validity().time_to_expiration()?;
            Some(left.whole_seconds() > OPERATOR_RENEW_BEFORE.as_secs() as i64)
        });
        if fresh == Some(true) && key_path.exists() {
            return Ok(false);
        }
        let key = KeyPair::generate().map_err(|e| CaError::Sign(e.to_string()))?;
        let mut p = CertificateParams::default();
        p.distinguished_name
            .push(DnType::CommonName, "wayfinder operator");
        p.subject_alt_names = vec![SanType::URI(
            self.operator_id()
                .as_str()
                .try_into()
                .map_err(|e: rcgen::Error| CaError::Sign(e.to_string()))?,
        )];
        p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        let now = SystemTime::now();
        p.not_before = (now - Duration::from_secs(60)).into();
        p.not_after = (now + OPERATOR_LIFETIME).into();
        let cert = p
            .signed_by(&key, &self.intermediate)
            .map_err(|e| CaError::Sign(e.to_string()))?;
        let _ = std::fs::remove_file(&key_path);
        write_secret(&key_path, &key.serialize_pem())?;
        std::fs::write(&crt, cert.pem() + &self.intermediate_pem).map_err(io(&crt))?;
        Ok(true)
    }

    /// The root certificate (DER), whose SHA-256 clients may pin.
    pub fn root(&self) -> &[u8] {
        &self.root_der
    }

    /// A serving certificate for the control plane itself, for `names`
    /// (DNS names or IP addresses): chain PEM (leaf, intermediate, root, so
    /// clients that pin the root find it) and key PEM.
    pub fn server_identity(&self, names: &[String]) -> Result<(String, String), CaError> {
        let key = KeyPair::generate().map_err(|e| CaError::Sign(e.to_string()))?;
        let mut p =
            CertificateParams::new(names.to_vec()).map_err(|e| CaError::Sign(e.to_string()))?;
        p.distinguished_name.push(DnType::CommonName, "wf-control");
        p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        let now = SystemTime::now();
        p.not_before = (now - Duration::from_secs(60)).into();
        p.not_after = (now + Duration::from_secs(365 * 24 * 3600)).into();
        let cert = p
            .signed_by(&key, &self.intermediate)
            .map_err(|e| CaError::Sign(e.to_string()))?;
        Ok((cert.pem() + &self.chain_tail_pem, key.serialize_pem()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn csr(names: &[&str]) -> Vec<u8> {
        let key = KeyPair::generate().expect("key");
        let p = CertificateParams::new(names.iter().map(|s| s.to_string()).collect::<Vec<_>>())
            .expect("params");
        p.serialize_request(&key).expect("csr").der().to_vec()
    }

    #[test]
    fn a_csr_gets_the_services_names_whatever_it_asks_for() {
        let dir = tempfile::tempdir().expect("tempdir");
        let ca =
            Ca::load_or_create(&dir.path().join("ca"), "lab.local", DEFAULT_LIFETIME).expect("ca");
        let issued = ca
            .issue(&csr(&["admin.svc.lab.local"]), "web")
            .expect("issued");
        assert_eq!(issued.spiffe_id, "spiffe://lab.local/svc/web");
        assert_eq!(issued.chain.len(), 2);
        let (_, cert) = x509_parser::parse_x509_certificate(&issued.chain[0]).expect("parses");
        let san = cert
            .subject_alternative_name()
            .expect("ok")
            .expect("present");
        let names: Vec<String> = san
            .value
            .general_names
            .iter()
            .map(|g| g.to_string())
            .collect();
        assert!(
            names
                .iter()
                .any(|n| n.contains("spiffe://lab.local/svc/web")),
            "{names:?}"
        );
        assert!(
            names.iter().any(|n| n.contains("web.svc.lab.local")),
            "{names:?}"
        );
        assert!(!names.iter().any(|n| n.contains("admin")), "{names:?}");
        let life = cert.validity().not_after.timestamp() - cert.validity().not_before.timestamp();
        assert_eq!(life, 24 * 3600 + 60);
    }

    #[test]
    fn the_ca_says_when_its_root_and_intermediate_expire() {
        let dir = tempfile::tempdir().expect("tempdir");
        let ca =
            Ca::load_or_create(&dir.path().join("ca"), "lab.local", DEFAULT_LIFETIME).expect("ca");
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .expect("after 1970")
            .as_millis() as u64;
        let nine_years = 9 * 365 * 24 * 3600 * 1000;
        let (root, intermediate) = ca.not_after_unix_ms();
        for t in [root, intermediate] {
            assert!(t.is_some_and(|t| t > now + nine_years), "{t:?}");
        }
    }

    #[test]
    fn keys_are_private_and_the_ca_survives_a_restart() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("ca");
        let first = Ca::load_or_create(&path, "lab.local", DEFAULT_LIFETIME).expect("ca");
        for key in ["root.key", "intermediate.key"] {
            let mode = std::fs::metadata(path.join(key))
                .expect("exists")
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o600, "{key}");
        }
        let again = Ca::load_or_create(&path, "lab.local", DEFAULT_LIFETIME).expect("reloads");
        assert_eq!(first.bundle(), again.bundle(), "same root after a restart");
        assert!(
            again
                .bundle_pem()
                .starts_with("-----BEGIN CERTIFICATE-----")
        );
    }

    #[test]
    fn garbage_and_tampered_csrs_are_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let ca =
            Ca::load_or_create(&dir.path().join("ca"), "lab.local", DEFAULT_LIFETIME).expect("ca");
        assert!(matches!(
            ca.issue(b"not a csr", "web"),
            Err(CaError::Csr(_))
        ));
        let mut tampered = csr(&["x"]);
        let n = tampered.len();
        tampered[n - 5] ^= 0xff;
        assert!(matches!(ca.issue(&tampered, "web"), Err(CaError::Csr(_))));
    }
}

#[cfg(test)]
mod chain_tests {
    use super::*;

    #[test]
    fn the_serving_chain_carries_leaf_intermediate_and_root() {
        use rustls::pki_types::pem::PemObject;
        let dir = tempfile::tempdir().expect("tempdir");
        let ca =
            Ca::load_or_create(&dir.path().join("ca"), "lab.local", DEFAULT_LIFETIME).expect("ca");
        let (chain, _) = ca.server_identity(&["localhost".into()]).expect("issued");
        let certs: Vec<_> = CertificateDer::pem_slice_iter(chain.as_bytes())
            .collect::<Result<_, _>>()
            .expect("parses");
        assert_eq!(certs.len(), 3, "{chain}");
        assert_eq!(certs[2].as_ref(), ca.root());
    }
}
