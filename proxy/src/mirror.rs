//! Traffic mirroring as a caller's sidecar applies it: which calls are
//! copied, where the copies go, and the limits a copy must fit in. The copy
//! itself is sent by `http/shadow.rs`, after the real call has its answer,
//! so it can never slow the real call down.

use std::sync::Arc;

use wayfinder_proto::policy::{BackendTarget, Mirror, Subset};

use crate::balance::{self, EndpointStats, Kind};
use crate::routes::Target;

/// Default share of calls copied.
const DEFAULT_PERCENT: f64 = 100.0;
/// Default copies in flight per sidecar.
const DEFAULT_MAX_IN_FLIGHT: u32 = 100;
/// Default largest body copied (Envoy buffers no more for a shadow either).
const DEFAULT_MAX_BODY: u64 = 64 * 1024;

/// A service's mirror, as requests use it.
pub struct CompiledMirror {
    /// Where copies go: a subset of the service (balanced among itself) or
    /// another service.
    pub target: Target,
    /// `version=v2` or the other service's name: the `shadow` of the diff report.
    pub label: Arc<str>,
    percent: f64,
    /// Copies in flight at once; more are shed.
    pub max_in_flight: u32,
    /// Largest request body copied.
    pub max_body: u64,
}

/// Why a call is not copied although the mirror wanted it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Shed {
    /// The body is larger than `max_body_bytes` (declared, or found so
    /// when a streamed body overflows what was kept for the copy).
    Body,
    /// `max_in_flight` copies are in flight.
    InFlight,
}

impl CompiledMirror {
    /// Compiles `m`; `members` are a subset's eligible endpoints, balanced by `kind`.
    pub fn new(
        m: &Mirror,
        members: &dyn Fn(&Subset) -> Vec<Arc<EndpointStats>>,
        kind: Kind,
    ) -> Self {
        let (label, target) = match &m.to {
            BackendTarget::Subset(s) => (
                s.to_string(),
                Target::Subset(balance::build(kind, members(s))),
            ),
            BackendTarget::Service(s) => (
                s.as_str().to_string(),
                Target::Service(Arc::from(s.as_str())),
            ),
        };
        Self {
            target,
            label: Arc::from(label),
            percent: m.percent.map_or(DEFAULT_PERCENT, |p| p.get()),
            max_in_flight: m.max_in_flight.map_or(DEFAULT_MAX_IN_FLIGHT, |n| n.get()),
            max_body: m
                .max_body_bytes
                .map_or(DEFAULT_MAX_BODY, |n| n.get().into()),
        }
    }

    /// Whether a call whose roll (0-1) came out `roll` is copied.
    pub fn wants(&self, roll: f64) -> bool {
        roll * 100.0 < self.percent
    }

    /// Whether a body of `len` bytes can be copied. A streamed body's size
    /// (`None`: gRPC, chunked) is known only at its end: it is kept up to
    /// the limit, and the copy shed then if it was larger.
    pub fn fits(&self, len: Option<u64>) -> Result<(), Shed> {
        match len {
            Some(n) if n > self.max_body => Err(Shed::Body),
            _ => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use wayfinder_proto::policy::PolicyFile;

    fn compiled(toml: &str) -> CompiledMirror {
        let file = PolicyFile::parse("t", toml).expect("valid");
        let m = file
            .services
            .values()
            .next()
            .and_then(|p| p.mirror.clone())
            .expect("a mirror");
        CompiledMirror::new(&m, &|_| Vec::new(), Kind::RoundRobin)
    }

    #[test]
    fn percent_and_body_limit_decide_what_is_copied() {
        let m = compiled(
            "[services.web.mirror]\nsubset = { version = \"v2\" }\npercent = 25\nmax_body_bytes = 10\n",
        );
        assert_eq!(&*m.label, "version=v2");
        assert!(m.wants(0.0) && m.wants(0.2499) && !m.wants(0.25) && !m.wants(0.99));
        assert_eq!(m.fits(Some(10)), Ok(()));
        assert_eq!(m.fits(Some(11)), Err(Shed::Body));
        assert_eq!(m.fits(None), Ok(()), "decided when the body has streamed");
        assert!(matches!(m.target, Target::Subset(_)));
    }

    #[test]
    fn defaults_copy_everything_small() {
        let m = compiled("[services.web.mirror]\nservice = \"web-v2\"\n");
        assert!(m.wants(0.999_999));
        assert_eq!(m.max_in_flight, DEFAULT_MAX_IN_FLIGHT);
        assert_eq!(m.fits(Some(0)), Ok(()));
        assert!(matches!(&m.target, Target::Service(s) if &**s == "web-v2"));
    }
}
