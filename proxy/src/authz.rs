//! Authorization at the inbound side: may this caller make this request?
//! The caller is the SPIFFE ID from its mTLS certificate (none for
//! plaintext in permissive mode); the rules are the service's policy.

use wayfinder_proto::v1::{Authorization, AuthzRule};

/// What is asked: an HTTP request, or an opaque TCP connection.
#[derive(Debug, Clone, Copy)]
pub enum Ask<'a> {
    /// Method and path.
    Http(&'a str, &'a str),
    /// A request that upgrades the connection (WebSocket) at this path.
    /// What follows the upgrade is not HTTP and is not authorized again, so
    /// only a rule without methods, or one listing `UPGRADE`, allows it.
    Upgrade(&'a str),
    /// Raw bytes; only rules without methods or paths can allow it.
    Tcp,
}

fn caller_matches(rule: &AuthzRule, caller: Option<&str>) -> bool {
    let Some(caller) = caller else {
        // No identity (plaintext): no rule names it.
        return false;
    };
    rule.from.is_empty()
        || rule.from.iter().any(|f| {
            f == "*"
                || f == caller
                || (!f.starts_with("spiffe://") && caller.ends_with(&format!("/svc/{f}")))
        })
}

fn request_matches(rule: &AuthzRule, ask: Ask<'_>) -> bool {
    match ask {
        Ask::Tcp => rule.methods.is_empty() && rule.path_prefixes.is_empty(),
        Ask::Upgrade(path) => {
            (rule.methods.is_empty() || rule.methods.iter().any(|m| m == "UPGRADE"))
                && (rule.path_prefixes.is_empty()
                    || rule
                        .path_prefixes
                        .iter()
                        .any(|p| path.starts_with(p.as_str())))
        }
        Ask::Http(method, path) => {
            (rule.methods.is_empty() || rule.methods.iter().any(|m| m == method))
                && (rule.path_prefixes.is_empty()
                    || rule
                        .path_prefixes
                        .iter()
                        .any(|p| path.starts_with(p.as_str())))
        }
    }
}

/// Whether `caller` may `ask`. Without a policy, `default_deny` decides
/// (the sidecar's `--default-authz`); with one, a request matching any
/// allow rule passes and the rest follow the policy's default.
pub fn allowed(
    policy: Option<&Authorization>,
    default_deny: bool,
    caller: Option<&str>,
    ask: Ask<'_>,
) -> bool {
    let Some(p) = policy else {
        return !default_deny;
    };
    p.allow
        .iter()
        .any(|r| caller_matches(r, caller) && request_matches(r, ask))
        || !p.default_deny
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rule(from: &[&str], methods: &[&str], paths: &[&str]) -> AuthzRule {
        let v = |x: &[&str]| x.iter().map(|s| s.to_string()).collect();
        AuthzRule {
            from: v(from),
            methods: v(methods),
            path_prefixes: v(paths),
        }
    }

    #[test]
    fn deny_by_default_then_allow_by_rule() {
        let p = Authorization {
            default_deny: true,
            allow: vec![
                rule(&["client"], &["GET"], &["/public/"]),
                rule(&["spiffe://lab/svc/api"], &[], &[]),
            ],
        };
        let client = Some("spiffe://lab/svc/client");
        let api = Some("spiffe://lab/svc/api");
        assert!(allowed(
            Some(&p),
            false,
            client,
            Ask::Http("GET", "/public/x")
        ));
        assert!(!allowed(
            Some(&p),
            false,
            client,
            Ask::Http("POST", "/public/x")
        ));
        assert!(!allowed(
            Some(&p),
            false,
            client,
            Ask::Http("GET", "/admin")
        ));
        assert!(
            !allowed(Some(&p), false, client, Ask::Tcp),
            "a narrowed rule never allows TCP"
        );
        assert!(allowed(Some(&p), false, api, Ask::Tcp));
        assert!(allowed(Some(&p), false, api, Ask::Http("DELETE", "/")));
        assert!(
            !allowed(Some(&p), false, None, Ask::Http("GET", "/public/x")),
            "plaintext has no identity"
        );
        assert!(
            !allowed(
                Some(&p),
                false,
                Some("spiffe://lab/svc/clientx"),
                Ask::Http("GET", "/public/")
            ),
            "service names match whole path segments"
        );
    }

    #[test]
    fn without_a_policy_the_sidecar_default_decides() {
        assert!(allowed(None, false, None, Ask::Tcp));
        assert!(!allowed(
            None,
            true,
            Some("spiffe://lab/svc/web"),
            Ask::Http("GET", "/")
        ));
        let open = Authorization {
            default_deny: false,
            allow: vec![],
        };
        assert!(allowed(Some(&open), true, None, Ask::Tcp));
        let any = Authorization {
            default_deny: true,
            allow: vec![rule(&["*"], &[], &[])],
        };
        assert!(allowed(
            Some(&any),
            false,
            Some("spiffe://x/svc/y"),
            Ask::Tcp
        ));
        assert!(!allowed(Some(&any), false, None, Ask::Tcp));
    }
}
