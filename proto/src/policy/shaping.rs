//! How calls are shaped beyond routes: mirroring, hedging, local rate limits
//! and locality, with their wire form.
//!
//! ```toml
//! [services.web.mirror]
//! to = "web-v2"               # a service, or "version=v2": a subset of web
//! percent = 100
//! max_in_flight = 100
//! max_body_bytes = 65536
//!
//! [services.web.hedging]
//! after = "p95"               # or "30ms"
//! max_extra = 1
//!
//! [services.web.rate_limit]
//! requests_per_sec = 100
//! burst = 20
//! per_caller = true
//!
//! [services.web.locality]
//! prefer_local = true
//! min_local_percent = 70      # or zone_weights = { "zone-a" = 80, "zone-b" = 20 }
//! # or, in the service's table: locality = "prefer-local"
//! ```

use std::collections::{BTreeMap, HashMap};
use std::fmt;

use serde::{Deserialize, Serialize};

use super::file::PolicyError;
use super::traffic::{BackendTarget, Percent, Subset};
use super::values::{Bounded, Millis, ServiceName};
use super::wire::refused;
use crate::v1;

/// Copies of a service's calls sent elsewhere, their answers dropped.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(try_from = "MirrorFields", into = "MirrorFields")]
pub struct Mirror {
    /// Where copies go: another service, or a subset of this one.
    pub to: BackendTarget,
    /// Share of calls copied (default 100).
    pub percent: Option<Percent>,
    /// Copies in flight at once per sidecar (default 100).
    pub max_in_flight: Option<Bounded<1, 100_000>>,
    /// Largest request body copied (default 64 KiB).
    pub max_body_bytes: Option<Bounded<0, 16_777_216>>,
}

/// [`Mirror`] as written: a service or a subset.
#[derive(Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
struct MirrorFields {
    /// `web-v2` (a service) or `version=v2,track=canary` (a subset).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    to: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    service: Option<ServiceName>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    subset: Option<Subset>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    percent: Option<Percent>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    max_in_flight: Option<Bounded<1, 100_000>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    max_body_bytes: Option<Bounded<0, 16_777_216>>,
}

impl TryFrom<MirrorFields> for Mirror {
    type Error = String;
    fn try_from(f: MirrorFields) -> Result<Self, String> {
        let to = match (f.to, f.service, f.subset) {
            (Some(to), None, None) => target(&to)?,
            (None, Some(s), None) => BackendTarget::Service(s),
            (None, None, Some(s)) if !s.is_empty() => BackendTarget::Subset(s),
            _ => {
                return Err(
                    "a mirror names one target: either a service or a subset: to = \"web-v2\", to = \"version=v2\", service = \"web-v2\" or subset = { version = \"v2\" }".into(),
                );
            }
        };
        Ok(Self {
            to,
            percent: f.percent,
            max_in_flight: f.max_in_flight,
            max_body_bytes: f.max_body_bytes,
        })
    }
}
/// A mirror's `to`: labels (`version=v2,track=canary`) name a subset, anything else a service.
fn target(to: &str) -> Result<BackendTarget, String> {
    if !to.contains('=') {
        return ServiceName::try_from(to.to_string()).map(BackendTarget::Service);
    }
    let labels = to
        .split(',')
        .map(|pair| match pair.split_once('=') {
            Some((k, v)) => Ok((k.trim().to_string(), v.trim().to_string())),
            None => Err(format!("{pair:?} is not a label: write key=value")),
        })
        .collect::<Result<BTreeMap<_, _>, _>>()?;
    Subset::try_from(labels).map(BackendTarget::Subset)
}

impl From<Mirror> for MirrorFields {
    /// A service as `to`; a subset as a table (label values may hold `,`).
    fn from(m: Mirror) -> Self {
        let (to, subset) = match m.to {
            BackendTarget::Service(s) => (Some(String::from(s)), None),
            BackendTarget::Subset(s) => (None, Some(s)),
        };
        Self {
            to,
            service: None,
            subset,
            percent: m.percent,
            max_in_flight: m.max_in_flight,
            max_body_bytes: m.max_body_bytes,
        }
    }
}

/// Hedged requests: when the first try has no answer after a while, a copy
/// goes to the balancer's next endpoint and the first answer wins.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Hedging {
    /// When the copy goes.
    pub after: HedgeAfter,
    /// Copies per request, 1-3 (default 1).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_extra: Option<Bounded<1, 3>>,
}

/// When a hedge goes: a fixed delay, or a quantile of the upstream's own
/// recent latency.
#[derive(Debug, Clone, Copy, PartialEq, Deserialize, Serialize)]
#[serde(try_from = "String", into = "String")]
pub enum HedgeAfter {
    /// After this long.
    Fixed(Millis),
    /// After the upstream's latency quantile, in percent (`p95` = 95.0).
    Quantile(f64),
}

impl HedgeAfter {
    /// Checks a quantile in percent: 50 to 99.9.
    pub fn quantile(p: f64) -> Result<Self, String> {
        if !(50.0..=99.9).contains(&p) {
            return Err(format!("p{p} is out of range: use p50 to p99.9"));
        }
        Ok(Self::Quantile(p))
    }
}

impl TryFrom<String> for HedgeAfter {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        if let Some(q) = s.strip_prefix('p') {
            let p: f64 = q
                .parse()
                .map_err(|_| format!("{s:?} is not a quantile: write e.g. \"p95\" or \"p99.9\""))?;
            return Self::quantile(p);
        }
        Millis::try_from(s).map(Self::Fixed)
    }
}
impl From<HedgeAfter> for String {
    fn from(a: HedgeAfter) -> String {
        a.to_string()
    }
}
impl fmt::Display for HedgeAfter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Fixed(m) => write!(f, "{m}"),
            Self::Quantile(p) => write!(f, "p{p}"),
        }
    }
}

/// A token bucket in each of the service's sidecars, on the way in.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RateLimit {
    /// Sustained rate.
    pub requests_per_sec: Bounded<1, 1_000_000>,
    /// Requests allowed at once above the rate (default: one second's worth).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub burst: Option<Bounded<1, 1_000_000>>,
    /// A bucket per caller identity, each with the whole rate.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub per_caller: Option<bool>,
}

/// Zone-aware balancing: `"prefer-local"`, or a table.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(into = "LocalityFields")]
pub enum Locality {
    /// The caller's own zone first; the rest spills over when fewer than
    /// `min_local_percent` of the local endpoints are healthy.
    PreferLocal {
        /// Default 70 (Envoy's overprovisioning factor 1.4).
        min_local_percent: Option<Bounded<1, 100>>,
    },
    /// Zones drawn by weight.
    Weighted(BTreeMap<String, Bounded<0, 10_000>>),
}

impl<'de> Deserialize<'de> for Locality {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        use serde::de::{self, MapAccess, Visitor};
        struct Written;
        impl<'de> Visitor<'de> for Written {
            type Value = Locality;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("\"prefer-local\" or a table with prefer_local or zone_weights")
            }
            fn visit_str<E: de::Error>(self, s: &str) -> Result<Locality, E> {
                match s {
                    "prefer-local" => Ok(Locality::PreferLocal {
                        min_local_percent: None,
                    }),
                    _ => Err(E::custom(format!(
                        "{s:?} is not a locality: use \"prefer-local\" or a table"
                    ))),
                }
            }
            fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<Locality, A::Error> {
                let f = LocalityFields::deserialize(de::value::MapAccessDeserializer::new(map))?;
                Locality::try_from(f).map_err(de::Error::custom)
            }
        }
        d.deserialize_any(Written)
    }
}

/// [`Locality`] as written in a table.
#[derive(Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
struct LocalityFields {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    prefer_local: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    min_local_percent: Option<Bounded<1, 100>>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    zone_weights: BTreeMap<String, Bounded<0, 10_000>>,
}

/// Most zones a policy may weigh.
pub const MAX_ZONES: usize = 64;

impl TryFrom<LocalityFields> for Locality {
    type Error = String;
    fn try_from(f: LocalityFields) -> Result<Self, String> {
        match (f.prefer_local == Some(true), f.zone_weights.is_empty()) {
            (true, true) => Ok(Self::PreferLocal {
                min_local_percent: f.min_local_percent,
            }),
            (false, false) => {
                if f.min_local_percent.is_some() {
                    return Err("min_local_percent goes with prefer_local = true".into());
                }
                if f.zone_weights.len() > MAX_ZONES {
                    return Err(format!(
                        "{} zones; at most {MAX_ZONES}",
                        f.zone_weights.len()
                    ));
                }
                for zone in f.zone_weights.keys() {
                    crate::validate::label("zone", zone)
                        .map_err(|e| format!("zone {zone:?}: {e}"))?;
                }
                if f.zone_weights.values().all(|w| w.get() == 0) {
                    return Err("every zone has weight 0: nothing could take a request".into());
                }
                Ok(Self::Weighted(f.zone_weights))
            }
            (true, false) => Err("either prefer_local = true or zone_weights, not both".into()),
            (false, true) => {
                Err("set prefer_local = true or zone_weights = { zone = weight }".into())
            }
        }
    }
}
impl From<Locality> for LocalityFields {
    fn from(l: Locality) -> Self {
        match l {
            Locality::PreferLocal { min_local_percent } => Self {
                prefer_local: Some(true),
                min_local_percent,
                zone_weights: BTreeMap::new(),
            },
            Locality::Weighted(w) => Self {
                prefer_local: None,
                min_local_percent: None,
                zone_weights: w,
            },
        }
    }
}

fn bounded<const A: u32, const B: u32>(field: &str, v: u32) -> Result<Bounded<A, B>, PolicyError> {
    Bounded::new(v.into()).map_err(|m| refused(field, m))
}

/// A count on the wire where 0 means unset.
fn optional<const A: u32, const B: u32>(
    field: &str,
    v: u32,
) -> Result<Option<Bounded<A, B>>, PolicyError> {
    (v != 0).then(|| bounded(field, v)).transpose()
}

impl From<&Mirror> for v1::Mirror {
    fn from(m: &Mirror) -> Self {
        let (service, subset) = match &m.to {
            BackendTarget::Service(s) => (s.as_str().to_string(), HashMap::new()),
            BackendTarget::Subset(s) => (
                String::new(),
                s.iter().map(|(k, v)| (k.into(), v.into())).collect(),
            ),
        };
        Self {
            service,
            subset,
            percent: m.percent.map_or(0.0, Percent::get),
            max_in_flight: m.max_in_flight.map_or(0, Bounded::get),
            max_body_bytes: m.max_body_bytes.map_or(0, Bounded::get),
        }
    }
}

impl TryFrom<&v1::Mirror> for Mirror {
    type Error = PolicyError;
    fn try_from(m: &v1::Mirror) -> Result<Self, PolicyError> {
        let service = (!m.service.is_empty())
            .then(|| ServiceName::try_from(m.service.clone()))
            .transpose()
            .map_err(|e| refused("mirror.service", e))?;
        let subset = (!m.subset.is_empty())
            .then(|| Subset::try_from(m.subset.clone().into_iter().collect::<BTreeMap<_, _>>()))
            .transpose()
            .map_err(|e| refused("mirror.subset", e))?;
        let percent = (m.percent != 0.0)
            .then(|| Percent::new(m.percent))
            .transpose()
            .map_err(|e| refused("mirror.percent", e))?;
        Mirror::try_from(MirrorFields {
            to: None,
            service,
            subset,
            percent,
            max_in_flight: optional("mirror.max_in_flight", m.max_in_flight)?,
            max_body_bytes: (m.max_body_bytes != 0)
                .then(|| bounded("mirror.max_body_bytes", m.max_body_bytes))
                .transpose()?,
        })
        .map_err(|e| refused("mirror", e))
    }
}

impl From<&Hedging> for v1::Hedging {
    fn from(h: &Hedging) -> Self {
        let (after_ms, after_percentile) = match h.after {
            HedgeAfter::Fixed(m) => (m.get(), 0.0),
            HedgeAfter::Quantile(p) => (0, p),
        };
        Self {
            after_ms,
            after_percentile,
            max_extra: h.max_extra.map_or(0, Bounded::get),
        }
    }
}

impl TryFrom<&v1::Hedging> for Hedging {
    type Error = PolicyError;
    fn try_from(h: &v1::Hedging) -> Result<Self, PolicyError> {
        let after = match (h.after_ms, h.after_percentile) {
            (ms, p) if ms != 0 && p == 0.0 => Millis::new(ms).map(HedgeAfter::Fixed),
            (0, p) if p != 0.0 => HedgeAfter::quantile(p),
            _ => Err("set either after_ms or after_percentile".into()),
        }
        .map_err(|e| refused("hedging.after", e))?;
        Ok(Self {
            after,
            max_extra: optional("hedging.max_extra", h.max_extra)?,
        })
    }
}

impl From<&RateLimit> for v1::RateLimit {
    fn from(r: &RateLimit) -> Self {
        Self {
            requests_per_sec: r.requests_per_sec.get(),
            burst: r.burst.map_or(0, Bounded::get),
            per_caller: r.per_caller == Some(true),
        }
    }
}

impl TryFrom<&v1::RateLimit> for RateLimit {
    type Error = PolicyError;
    fn try_from(r: &v1::RateLimit) -> Result<Self, PolicyError> {
        Ok(Self {
            requests_per_sec: bounded("rate_limit.requests_per_sec", r.requests_per_sec)?,
            burst: optional("rate_limit.burst", r.burst)?,
            per_caller: r.per_caller.then_some(true),
        })
    }
}

impl From<&Locality> for v1::Locality {
    fn from(l: &Locality) -> Self {
        match l {
            Locality::PreferLocal { min_local_percent } => Self {
                prefer_local: true,
                min_local_percent: min_local_percent.map_or(0, Bounded::get),
                zone_weights: HashMap::new(),
            },
            Locality::Weighted(w) => Self {
                prefer_local: false,
                min_local_percent: 0,
                zone_weights: w.iter().map(|(z, w)| (z.clone(), w.get())).collect(),
            },
        }
    }
}

impl TryFrom<&v1::Locality> for Locality {
    type Error = PolicyError;
    fn try_from(l: &v1::Locality) -> Result<Self, PolicyError> {
        let zone_weights = l
            .zone_weights
            .iter()
            .map(|(z, w)| {
                Ok((
                    z.clone(),
                    bounded(&format!("locality.zone_weights.{z}"), *w)?,
                ))
            })
            .collect::<Result<BTreeMap<_, _>, PolicyError>>()?;
        Locality::try_from(LocalityFields {
            prefer_local: l.prefer_local.then_some(true),
            min_local_percent: optional("locality.min_local_percent", l.min_local_percent)?,
            zone_weights,
        })
        .map_err(|e| refused("locality", e))
    }
}

#[cfg(test)]
mod tests {
    use super::super::{PolicyFile, ServicePolicy};
    use super::*;

    const GOOD: &str = r#"
[services.web]
slow_start = "30s"

[services.web.mirror]
subset = { version = "v2" }
percent = 50
max_in_flight = 10

[services.web.hedging]
after = "p95"

[services.web.rate_limit]
requests_per_sec = 100
burst = 20
per_caller = true

[services.web.locality]
prefer_local = true
min_local_percent = 60

[services.api.mirror]
to = "api-shadow"

[services.api.hedging]
after = "30ms"
max_extra = 2

[services.api.locality]
zone_weights = { "zone-a" = 80, "zone-b" = 20 }

[services.cart]
locality = "prefer-local"

[services.cart.mirror]
to = "version=v2,track=canary"
"#;

    #[test]
    fn sections_parse_and_survive_the_wire() {
        let file = PolicyFile::parse("p.toml", GOOD).expect("valid");
        for (name, p) in &file.services {
            let wire = p.to_proto(name.as_str());
            let (_, back) = ServicePolicy::from_proto(&wire).expect("wire form valid");
            assert_eq!(&back, p, "{}", name.as_str());
        }
        let named = |n: &str| {
            file.services
                .iter()
                .find(|(k, _)| k.as_str() == n)
                .map(|(_, p)| p)
                .expect("listed")
        };
        let cart = named("cart");
        assert_eq!(
            cart.locality,
            Some(Locality::PreferLocal {
                min_local_percent: None
            })
        );
        let subset = cart.mirror.as_ref().map(|m| m.to.to_string());
        assert_eq!(subset.as_deref(), Some("subset track=canary,version=v2"));
        let web = named("web");
        assert_eq!(
            web.hedging.as_ref().map(|h| h.after),
            Some(HedgeAfter::Quantile(95.0))
        );
        assert_eq!(web.slow_start.map(Millis::get), Some(30_000));
    }

    #[test]
    fn bad_sections_name_their_field() {
        for (text, field, says) in [
            (
                "[services.web.mirror]\npercent = 10\n",
                "services.web.mirror",
                "either a service or a subset",
            ),
            (
                "[services.web.mirror]\nto = \"web-v2\"\nservice = \"x\"\n",
                "services.web.mirror",
                "one target",
            ),
            (
                "[services.web.mirror]\nto = \"Bad Name\"\n",
                "services.web.mirror",
                "",
            ),
            (
                "[services.web]\nlocality = \"nearby\"\n",
                "services.web.locality",
                "not a locality",
            ),
            (
                "[services.web.hedging]\nafter = \"p20\"\n",
                "services.web.hedging.after",
                "out of range",
            ),
            (
                "[services.web.hedging]\nafter = \"soon\"\n",
                "services.web.hedging.after",
                "not a duration",
            ),
            (
                "[services.web.rate_limit]\nrequests_per_sec = 0\n",
                "services.web.rate_limit.requests_per_sec",
                "",
            ),
            (
                "[services.web.locality]\nprefer_local = true\nzone_weights = { a = 1 }\n",
                "services.web.locality",
                "not both",
            ),
            (
                "[services.web.locality]\nzone_weights = { a = 0 }\n",
                "services.web.locality",
                "weight 0",
            ),
        ] {
            let e = PolicyFile::parse("p.toml", text).expect_err(text);
            assert!(e.field.starts_with(field), "{text}: {e}");
            assert!(e.message.contains(says), "{text}: {e}");
        }
    }

    #[test]
    fn bad_wire_sections_are_refused() {
        let mut p = v1::ServicePolicy {
            service: "web".into(),
            hedging: Some(v1::Hedging {
                after_ms: 30,
                after_percentile: 95.0,
                max_extra: 0,
            }),
            ..Default::default()
        };
        let e = ServicePolicy::from_proto(&p).expect_err("both set");
        assert_eq!(e.field, "services.web.hedging.after");
        p.hedging = None;
        p.mirror = Some(v1::Mirror::default());
        let e = ServicePolicy::from_proto(&p).expect_err("no target");
        assert_eq!(e.field, "services.web.mirror");
        p.mirror = None;
        p.rate_limit = Some(v1::RateLimit::default());
        let e = ServicePolicy::from_proto(&p).expect_err("zero rate");
        assert_eq!(e.field, "services.web.rate_limit.requests_per_sec");
    }
}
