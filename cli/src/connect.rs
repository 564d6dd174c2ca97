//! Reaching the control plane as the operator: TLS presenting the
//! credential wf-control writes to `<data-dir>/operator/`.

use std::path::Path;
use std::time::Duration;

use anyhow::{Context, Result};
use tonic::transport::{Channel, Endpoint};

/// A channel to the control plane at `url`: `https://` presenting the
/// operator credential in `credentials` (and trusting its `ca.crt`), or
/// `http://` for an `--insecure` one.
pub async fn channel(url: &str, credentials: &Path, timeout: Duration) -> Result<Channel> {
    let uri: tonic::transport::Uri = url
        .parse()
        .with_context(|| format!("{url:?} is not a control-plane URL"))?;
    let endpoint = |u: String| {
        Endpoint::from_shared(u)
            .with_context(|| format!("{url:?} is not a control-plane URL"))
            .map(|e| e.connect_timeout(timeout).tcp_nodelay(true))
    };
    let ch = match uri.scheme_str() {
        Some("http") => {
            endpoint(url.to_string())?
                .connect_with_connector(wayfinder_proto::dial::Dialer)
                .await
        }
        Some("https") => {
            let host = uri.host().context("the control-plane URL has no host")?;
            let port = uri.port_u16().unwrap_or(443);
            let tls = operator_tls(credentials)?;
            let plain_host = host
                .trim_start_matches('[')
                .trim_end_matches(']')
                .to_string();
            // The connector does TLS (with the host's name); tonic sees h2.
            endpoint(format!("http://{host}:{port}"))?
                .connect_with_connector(wayfinder_proto::dial::Failover::new(
                    vec![(plain_host, port)],
                    Some(tls),
                ))
                .await
        }
        _ => anyhow::bail!(
            "{url:?}: use https://HOST:PORT (or http:// for an --insecure control plane)"
        ),
    };
    ch.with_context(|| format!("cannot reach the control plane at {url}"))
}

/// TLS presenting the operator credential in `dir` and trusting its ca.crt.
fn operator_tls(dir: &Path) -> Result<tokio_rustls::TlsConnector> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let read = |name: &str| {
        let path = dir.join(name);
        std::fs::read(&path).with_context(|| {
            format!(
                "no operator credential: cannot read {} (wf-control writes it to DATA_DIR/operator; give --credentials DIR or WAYFINDER_CREDENTIALS)",
                path.display()
            )
        })
    };
    let (ca, crt, key) = (
        read("ca.crt")?,
        read("operator.crt")?,
        read("operator.key")?,
    );
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_slice_iter(&ca) {
        roots
            .add(c.context("ca.crt holds a bad certificate")?)
            .context("ca.crt")?;
    }
    let chain = CertificateDer::pem_slice_iter(&crt)
        .collect::<Result<Vec<_>, _>>()
        .context("operator.crt holds a bad certificate")?;
    let key = PrivateKeyDer::from_pem_slice(&key).context("operator.key holds no key")?;
    let mut cfg = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .context("TLS versions")?
    .with_root_certificates(roots)
    .with_client_auth_cert(chain, key)
    .context("the operator credential")?;
    cfg.alpn_protocols = vec![b"h2".to_vec()];
    Ok(tokio_rustls::TlsConnector::from(std::sync::Arc::new(cfg)))
}
