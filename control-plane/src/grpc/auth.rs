//! Who is calling, and what they may do.
//!
//! The caller is decided once per connection, from the client certificate
//! of the TLS handshake ([`super::transport`]), and travels with every
//! request as [`Peer`]:
//!
//! - a sidecar presents its mesh certificate (`spiffe://<domain>/svc/<service>`):
//!   it may register, renew and deregister instances of that service only,
//!   watch, and report traffic as that service;
//! - the operator presents the credential wf-control writes to
//!   `<data-dir>/operator/` (`spiffe://<domain>/operator`): wfctl's RPCs,
//!   policy and static endpoints;
//! - anyone else may only ask for a first certificate (`Identity.Certify`,
//!   which its join token authorises).
//!
//! With `--insecure` (plaintext) nobody is authenticated and everything is
//! allowed, as the warning at start-up says.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::{counter::Counter, family::Family};
use prometheus_client::registry::Registry as PromRegistry;
use tonic::{Request, Status};

/// An authenticated (or not) caller.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Caller {
    /// A sidecar with a mesh certificate for `service`.
    Sidecar {
        /// The service in its certificate.
        service: String,
    },
    /// The operator credential (wfctl).
    Operator,
    /// No client certificate, or one naming no identity of this mesh.
    Anonymous,
    /// `--insecure`: nobody is authenticated, everything is allowed.
    Unchecked,
}

impl Caller {
    /// The caller named by a SPIFFE ID from a verified certificate of
    /// `trust_domain`.
    pub fn from_spiffe_id(id: Option<&str>, trust_domain: &str) -> Self {
        let Some(path) = id
            .and_then(|id| id.strip_prefix("spiffe://"))
            .and_then(|rest| rest.strip_prefix(trust_domain))
            .and_then(|rest| rest.strip_prefix('/'))
        else {
            return Self::Anonymous;
        };
        match path.strip_prefix("svc/") {
            Some(service) if wayfinder_proto::validate::service_name(service).is_ok() => {
                Self::Sidecar {
                    service: service.to_string(),
                }
            }
            _ if path == "operator" => Self::Operator,
            _ => Self::Anonymous,
        }
    }

    fn describe(&self) -> String {
        match self {
            Self::Sidecar { service } => format!("sidecar of {service}"),
            Self::Operator => "operator".into(),
            Self::Anonymous => "anonymous".into(),
            Self::Unchecked => "unchecked".into(),
        }
    }
}

/// What tonic carries with each request of a connection.
#[derive(Clone, Debug)]
pub struct Peer {
    /// The remote address.
    pub addr: Option<std::net::SocketAddr>,
    /// Who it is.
    pub caller: Arc<Caller>,
}

/// The caller of `req`. Requests that came without connection info (in-process
/// tests over a duplex stream) are anonymous.
pub fn caller<T>(req: &Request<T>) -> (Arc<Caller>, Option<std::net::SocketAddr>) {
    match req.extensions().get::<Peer>() {
        Some(p) => (p.caller.clone(), p.addr),
        None => (Arc::new(Caller::Anonymous), None),
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RefusedLabels {
    rpc: &'static str,
    reason: &'static str,
}

/// Most refusal log lines per second.
pub const LOG_PER_SECOND: u64 = 20;

/// At most [`LOG_PER_SECOND`] log lines a second, so a caller hammering
/// the port cannot flood the log (the metrics still count every refusal).
#[derive(Debug, Default)]
pub struct LogLimit(AtomicU64);

impl LogLimit {
    /// A limit with nothing logged yet.
    pub const fn new() -> Self {
        Self(AtomicU64::new(0))
    }

    /// Whether one more line may be logged this second.
    pub fn allow(&self) -> bool {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        // High bits: the second; low bits: lines logged in it.
        let w = self.0.load(Ordering::Relaxed);
        let logged = if w >> 16 == now {
            w & 0xffff
        } else {
            self.0.store(now << 16, Ordering::Relaxed);
            0
        };
        if logged >= LOG_PER_SECOND {
            return false;
        }
        self.0.fetch_add(1, Ordering::Relaxed);
        true
    }
}

/// Refusals: counted, and logged within a [`LogLimit`].
#[derive(Clone)]
pub struct Guard {
    refused: Family<RefusedLabels, Counter>,
    limit: Arc<LogLimit>,
}

impl Guard {
    /// A guard whose counter is registered in `prom`.
    pub fn register(prom: &mut PromRegistry) -> Self {
        let refused = Family::<RefusedLabels, Counter>::default();
        prom.register(
            "wayfinder_control_rpc_refused",
            "RPCs refused by authentication or authorization, by RPC and reason",
            refused.clone(),
        );
        Self {
            refused,
            limit: Arc::default(),
        }
    }

    /// Counts and logs a refusal, and returns its status.
    pub fn refuse<T>(
        &self,
        req: &Request<T>,
        rpc: &'static str,
        reason: &'static str,
        status: Status,
    ) -> Status {
        self.refused
            .get_or_create(&RefusedLabels { rpc, reason })
            .inc();
        if self.limit.allow() {
            let (who, addr) = caller(req);
            tracing::warn!(
                rpc,
                reason,
                caller = %who.describe(),
                peer = ?addr,
                message = status.message(),
                "RPC refused"
            );
        }
        status
    }

    /// Only the operator (or anyone, with `--insecure`).
    pub fn operator<T>(&self, req: &Request<T>, rpc: &'static str) -> Result<(), Status> {
        match &*caller(req).0 {
            Caller::Operator | Caller::Unchecked => Ok(()),
            Caller::Anonymous => Err(self.refuse(
                req,
                rpc,
                "unauthenticated",
                Status::unauthenticated(format!(
                    "{rpc} needs the operator credential (wfctl --credentials, from wf-control's <data-dir>/operator)"
                )),
            )),
            Caller::Sidecar { service } => Err(self.refuse(
                req,
                rpc,
                "not_operator",
                Status::permission_denied(format!(
                    "{rpc} is an operator RPC; a sidecar of {service} may not call it"
                )),
            )),
        }
    }

    /// An authenticated caller: `Some(service)` for a sidecar, which is then
    /// limited to that service; `None` for the operator or `--insecure`.
    pub fn member<T>(&self, req: &Request<T>, rpc: &'static str) -> Result<Option<String>, Status> {
        match &*caller(req).0 {
            Caller::Sidecar { service } => Ok(Some(service.clone())),
            Caller::Operator | Caller::Unchecked => Ok(None),
            Caller::Anonymous => Err(self.refuse(
                req,
                rpc,
                "unauthenticated",
                Status::unauthenticated(format!(
                    "{rpc} needs a mesh certificate (a sidecar gets one with its join token)"
                )),
            )),
        }
    }

    /// A sidecar of `own` acting on `service`: refused unless they match.
    pub fn same_service<T>(
        &self,
        req: &Request<T>,
        rpc: &'static str,
        own: Option<&str>,
        service: &str,
    ) -> Result<(), Status> {
        match own {
            Some(own) if own != service => Err(self.refuse(
                req,
                rpc,
                "other_service",
                Status::permission_denied(format!(
                    "a sidecar of {own} may not act on service {service}"
                )),
            )),
            _ => Ok(()),
        }
    }

    /// A sidecar asking for what only the operator may do within an RPC
    /// it may call (a static endpoint).
    pub fn operator_only<T>(&self, req: &Request<T>, rpc: &'static str, what: &str) -> Status {
        self.refuse(
            req,
            rpc,
            "not_operator",
            Status::permission_denied(format!("{what} needs the operator credential")),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn callers_come_from_spiffe_ids_of_this_trust_domain_only() {
        let d = "lab.local";
        assert_eq!(
            Caller::from_spiffe_id(Some("spiffe://lab.local/svc/web"), d),
            Caller::Sidecar {
                service: "web".into()
            }
        );
        assert_eq!(
            Caller::from_spiffe_id(Some("spiffe://lab.local/operator"), d),
            Caller::Operator
        );
        for other in [
            None,
            Some("spiffe://other.local/svc/web"),
            Some("spiffe://lab.localx/svc/web"),
            Some("spiffe://lab.local/svc/Bad Name"),
            Some("spiffe://lab.local/svc/"),
            Some("spiffe://lab.local/operator/x"),
            Some("https://lab.local/operator"),
        ] {
            assert_eq!(
                Caller::from_spiffe_id(other, d),
                Caller::Anonymous,
                "{other:?}"
            );
        }
    }

    fn with(caller: Caller) -> Request<()> {
        let mut r = Request::new(());
        r.extensions_mut().insert(Peer {
            addr: None,
            caller: Arc::new(caller),
        });
        r
    }

    #[test]
    fn operator_rpcs_and_member_rpcs_sort_callers() {
        let g = Guard::register(&mut PromRegistry::default());
        let web = || Caller::Sidecar {
            service: "web".into(),
        };
        assert!(g.operator(&with(Caller::Operator), "ApplyPolicy").is_ok());
        assert!(g.operator(&with(Caller::Unchecked), "ApplyPolicy").is_ok());
        assert_eq!(
            g.operator(&with(web()), "ApplyPolicy")
                .map_err(|s| s.code()),
            Err(tonic::Code::PermissionDenied)
        );
        assert_eq!(
            g.operator(&Request::new(()), "ApplyPolicy")
                .map_err(|s| s.code()),
            Err(tonic::Code::Unauthenticated)
        );
        assert_eq!(
            g.member(&with(web()), "Watch").ok(),
            Some(Some("web".into()))
        );
        assert_eq!(g.member(&with(Caller::Operator), "Watch").ok(), Some(None));
        assert_eq!(
            g.member(&with(Caller::Anonymous), "Watch")
                .map_err(|s| s.code()),
            Err(tonic::Code::Unauthenticated)
        );
        let r = with(web());
        assert!(g.same_service(&r, "Register", Some("web"), "web").is_ok());
        assert!(g.same_service(&r, "Register", None, "api").is_ok());
        assert_eq!(
            g.same_service(&r, "Register", Some("web"), "api")
                .map_err(|s| s.code()),
            Err(tonic::Code::PermissionDenied)
        );
    }
}
