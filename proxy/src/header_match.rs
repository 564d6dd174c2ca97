//! Conditions on a request's headers, as routes and faults state them:
//! compiled once from the policy into the types requests carry.

use hyper::header::{HeaderMap, HeaderName, HeaderValue};
use wayfinder_proto::policy::HeaderMatch;

/// Exact header values a request must carry (routes and faults match
/// them alike), in the types requests carry.
#[derive(Debug, Default)]
pub struct HeaderConditions(Vec<(HeaderName, HeaderValue)>);

impl HeaderConditions {
    /// Compiles validated conditions.
    pub fn new(m: &HeaderMatch) -> Self {
        Self(
            m.iter()
                .filter_map(|(k, v)| {
                    Some((
                        HeaderName::from_bytes(k.as_bytes()).ok()?,
                        HeaderValue::from_str(v).ok()?,
                    ))
                })
                .collect(),
        )
    }

    /// Whether `headers` carry every one (any of a repeated header's values).
    pub fn hold(&self, headers: &HeaderMap) -> bool {
        self.0
            .iter()
            .all(|(k, v)| headers.get_all(k).iter().any(|got| got == v))
    }
}
