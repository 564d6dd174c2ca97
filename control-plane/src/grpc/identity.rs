//! `Identity.Certify`: join token + CSR in, short-lived certificate out.
//! Refusals are answered with a clear status, counted, and logged the first
//! time each kind happens (a misconfigured fleet must not flood the log).

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::{counter::Counter, family::Family};
use prometheus_client::registry::Registry as PromRegistry;
use subtle::ConstantTimeEq;
use tonic::{Request, Response, Status};
use wayfinder_proto::v1::{CertifyRequest, CertifyResponse, identity_server::Identity};

use super::check_size;
use crate::ca::{Ca, CaError};

/// A join token as configured: `TOKEN`, `TOKEN:svc1,svc2`, optionally
/// followed by `@EXPIRES` (Unix seconds).
#[derive(Clone)]
pub struct JoinToken {
    secret: Vec<u8>,
    services: Option<Vec<String>>,
    expires_unix: Option<u64>,
}

impl std::fmt::Debug for JoinToken {
    // Never print the secret.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JoinToken")
            .field("services", &self.services)
            .field("expires_unix", &self.expires_unix)
            .finish_non_exhaustive()
    }
}

impl std::str::FromStr for JoinToken {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let (rest, expires_unix) = match s.rsplit_once('@') {
            Some((r, e)) => (
                r,
                // No part of a token is ever echoed: the secret may hold
                // any character.
                Some(
                    e.parse()
                        .map_err(|_| "the expiry after '@' is not Unix seconds".to_string())?,
                ),
            ),
            None => (s, None),
        };
        let (secret, services) = match rest.split_once(':') {
            Some((t, list)) => {
                let services: Vec<String> = list.split(',').map(str::to_string).collect();
                for (i, svc) in services.iter().enumerate() {
                    wayfinder_proto::validate::service_name(svc).map_err(|_| {
                        format!(
                            "service {} of the list after ':' is not a service name (one DNS label)",
                            i + 1
                        )
                    })?;
                }
                (t, Some(services))
            }
            None => (rest, None),
        };
        if secret.len() < 16 {
            return Err("a join token needs at least 16 characters".into());
        }
        Ok(Self {
            secret: secret.as_bytes().to_vec(),
            services,
            expires_unix,
        })
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ResultLabel {
    result: &'static str,
}

/// The Identity service.
pub struct IdentityService {
    ca: Arc<Ca>,
    /// Where the trust bundle comes from (with replicas, every replica's root).
    registry: Arc<crate::registry::Registry>,
    tokens: Vec<JoinToken>,
    results: Family<ResultLabel, Counter>,
    logged: Mutex<HashSet<&'static str>>,
}

impl IdentityService {
    /// Issues from `ca` to holders of `tokens`.
    pub fn new(
        ca: Arc<Ca>,
        registry: Arc<crate::registry::Registry>,
        tokens: Vec<JoinToken>,
        prom: &mut PromRegistry,
    ) -> Self {
        let results = Family::<ResultLabel, Counter>::default();
        prom.register(
            "wayfinder_control_certify",
            "Certify requests by result (issued, bad_token, expired_token, service_not_allowed, bad_csr, invalid)",
            results.clone(),
        );
        Self {
            ca,
            registry,
            tokens,
            results,
            logged: Mutex::default(),
        }
    }

    fn refuse(&self, result: &'static str, status: Status) -> Status {
        self.results.get_or_create(&ResultLabel { result }).inc();
        let first = self.logged.lock().is_ok_and(|mut l| l.insert(result));
        if first {
            tracing::warn!(
                result,
                message = status.message(),
                "certificate refused (logged once per kind)"
            );
        }
        status
    }

    /// The token matching `secret`, compared in constant time against every
    /// configured token so timing tells nothing about which one is close.
    fn token(&self, secret: &[u8]) -> Option<&JoinToken> {
        let mut found = None;
        for t in &self.tokens {
            if bool::from(t.secret.as_slice().ct_eq(secret)) {
                found = Some(t);
            }
        }
        found
    }
}

#[tonic::async_trait]
impl Identity for IdentityService {
    async fn certify(
        &self,
        req: Request<CertifyRequest>,
    ) -> Result<Response<CertifyResponse>, Status> {
        // A sidecar renewing presents its current certificate: that is
        // its credential, so the join token only bootstraps the first one
        // (and may expire after it).
        let renewing = match &*super::auth::caller(&req).0 {
            super::auth::Caller::Sidecar { service } => service == &req.get_ref().service,
            _ => false,
        };
        let r = req.into_inner();
        check_size(&r).map_err(|s| self.refuse("invalid", s))?;
        wayfinder_proto::validate::service_name(&r.service).map_err(|e| {
            self.refuse("invalid", Status::invalid_argument(format!("service: {e}")))
        })?;
        if !renewing {
            self.check_token(&r)?;
        }
        self.issue(&r, renewing)
    }
}

impl IdentityService {
    /// Refuses a request whose join token is unknown, expired or not good
    /// for its service.
    fn check_token(&self, r: &CertifyRequest) -> Result<(), Status> {
        let Some(token) = self.token(r.token.as_bytes()) else {
            return Err(self.refuse("bad_token", Status::unauthenticated("unknown join token")));
        };
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        if token.expires_unix.is_some_and(|e| now >= e) {
            return Err(self.refuse(
                "expired_token",
                Status::unauthenticated("the join token has expired"),
            ));
        }
        if let Some(allowed) = &token.services
            && !allowed.contains(&r.service)
        {
            return Err(self.refuse(
                "service_not_allowed",
                Status::permission_denied(format!(
                    "this join token does not allow service {:?}",
                    r.service
                )),
            ));
        }
        Ok(())
    }

    fn issue(
        &self,
        r: &CertifyRequest,
        renewal: bool,
    ) -> Result<Response<CertifyResponse>, Status> {
        let issued = match self.ca.issue(&r.csr_der, &r.service) {
            Ok(i) => i,
            Err(e @ CaError::Csr(_)) => {
                return Err(self.refuse("bad_csr", Status::invalid_argument(e.to_string())));
            }
            Err(e) => return Err(Status::internal(e.to_string())),
        };
        self.results
            .get_or_create(&ResultLabel { result: "issued" })
            .inc();
        tracing::info!(service = %r.service, id = %issued.spiffe_id, renewal, "certificate issued");
        Ok(Response::new(CertifyResponse {
            chain: issued.chain,
            trust_bundle: self.registry.trust_bundle(),
            spiffe_id: issued.spiffe_id,
            dns_name: issued.dns_name,
            not_after_unix_ms: issued.not_after_unix_ms,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_parse_with_services_and_expiry_and_never_print_the_secret() {
        let t: JoinToken = "0123456789abcdef:web,api@1700000000"
            .parse()
            .expect("valid");
        assert_eq!(
            t.services.as_deref(),
            Some(&["web".to_string(), "api".to_string()][..])
        );
        assert_eq!(t.expires_unix, Some(1_700_000_000));
        assert!(!format!("{t:?}").contains("0123456789abcdef"));
        assert!("short".parse::<JoinToken>().is_err());
        assert!("0123456789abcdef:Bad Name".parse::<JoinToken>().is_err());
        assert!("0123456789abcdef@soon".parse::<JoinToken>().is_err());
    }
}
