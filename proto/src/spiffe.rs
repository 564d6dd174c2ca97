//! SPIFFE IDs in certificates: how a sidecar knows which service called it,
//! and wf-control which sidecar or operator did.

/// The SPIFFE ID (URI SAN `spiffe://...`) of a leaf certificate (DER).
pub fn id_of(leaf: &[u8]) -> Option<String> {
    let (_, cert) = x509_parser::parse_x509_certificate(leaf).ok()?;
    let san = cert.subject_alternative_name().ok()??;
    san.value.general_names.iter().find_map(|n| match n {
        x509_parser::extensions::GeneralName::URI(u) if u.starts_with("spiffe://") => {
            Some(u.to_string())
        }
        _ => None,
    })
}
