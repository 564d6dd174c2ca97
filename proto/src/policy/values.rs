//! The validated value types policy fields are made of: names, durations, bounded numbers, shares.

use std::fmt;

use serde::{Deserialize, Serialize};

/// A validated service name used as a table key.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Deserialize, Serialize)]
#[serde(try_from = "String", into = "String")]
pub struct ServiceName(String);

impl TryFrom<String> for ServiceName {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        crate::validate::service_name(&s).map_err(|e| e.to_string())?;
        Ok(Self(s))
    }
}
impl From<ServiceName> for String {
    fn from(n: ServiceName) -> String {
        n.0
    }
}
impl ServiceName {
    /// The name as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// A caller in an authorization rule.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(try_from = "String", into = "String")]
pub struct Caller(String);

impl TryFrom<String> for Caller {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        let ok = s == "*"
            || crate::validate::service_name(&s).is_ok()
            || (s.starts_with("spiffe://")
                && s.len() <= 2048
                && s[9..].contains('/')
                && s.bytes().all(|b| b.is_ascii_graphic()));
        if !ok {
            return Err(format!(
                "{s:?} is not a caller: use a service name, a spiffe:// ID or \"*\""
            ));
        }
        Ok(Self(s))
    }
}
impl From<Caller> for String {
    fn from(c: Caller) -> String {
        c.0
    }
}

/// An HTTP method name such as `GET`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(try_from = "String", into = "String")]
pub struct HttpMethod(String);

impl TryFrom<String> for HttpMethod {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        if s.is_empty() || s.len() > 20 || !s.bytes().all(|b| b.is_ascii_uppercase()) {
            return Err(format!("{s:?} is not an HTTP method: use e.g. \"GET\""));
        }
        Ok(Self(s))
    }
}
impl From<HttpMethod> for String {
    fn from(m: HttpMethod) -> String {
        m.0
    }
}

/// Whether `h` is a valid HTTP header name (an RFC 9110 token of at most 128 bytes).
pub(super) fn is_header_name(h: &str) -> bool {
    !h.is_empty()
        && h.len() <= 128
        && h.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
}

/// A duration written as `"250ms"`, `"2s"` or `"1m"`, between 1 ms and 1 h.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Deserialize, Serialize)]
#[serde(try_from = "String", into = "String")]
pub struct Millis(u32);

/// Longest duration a policy may set.
pub const MAX_MILLIS: u32 = 3_600_000;

impl Millis {
    /// Checks a millisecond count.
    pub fn new(ms: u32) -> Result<Self, String> {
        if ms == 0 || ms > MAX_MILLIS {
            return Err(format!("{ms}ms is out of range: use 1ms to 1h"));
        }
        Ok(Self(ms))
    }
    /// Milliseconds.
    pub fn get(self) -> u32 {
        self.0
    }
}

/// Parses a duration flag (`"250ms"`, `"2s"`, `"1m"`), with the same rules
/// as durations in policy files.
pub fn parse_duration(s: &str) -> Result<std::time::Duration, String> {
    Millis::try_from(s.to_string()).map(|m| std::time::Duration::from_millis(m.get().into()))
}

impl TryFrom<String> for Millis {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        let bad = || format!("{s:?} is not a duration: write e.g. \"250ms\", \"2s\" or \"1m\"");
        let split = s.find(|c: char| !c.is_ascii_digit()).ok_or_else(bad)?;
        let (num, unit) = s.split_at(split);
        let n: u64 = num.parse().map_err(|_| bad())?;
        let factor = match unit {
            "ms" => 1,
            "s" => 1_000,
            "m" => 60_000,
            _ => return Err(bad()),
        };
        let ms = n.checked_mul(factor).and_then(|v| u32::try_from(v).ok());
        Self::new(ms.unwrap_or(u32::MAX))
    }
}
impl From<Millis> for String {
    fn from(m: Millis) -> String {
        match m.0 {
            ms if ms % 60_000 == 0 => format!("{}m", ms / 60_000),
            ms if ms % 1_000 == 0 => format!("{}s", ms / 1_000),
            ms => format!("{ms}ms"),
        }
    }
}
impl fmt::Display for Millis {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&String::from(*self))
    }
}

/// An integer checked against a range given by its type parameters.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Deserialize, Serialize)]
#[serde(try_from = "i64", into = "i64")]
pub struct Bounded<const MIN: u32, const MAX: u32>(u32);

impl<const MIN: u32, const MAX: u32> Bounded<MIN, MAX> {
    /// Checks `v` against `MIN..=MAX`.
    pub fn new(v: i64) -> Result<Self, String> {
        if v < i64::from(MIN) || v > i64::from(MAX) {
            return Err(format!("{v} is out of range {MIN}..={MAX}"));
        }
        u32::try_from(v).map(Self).map_err(|e| e.to_string())
    }
    /// The value.
    pub fn get(self) -> u32 {
        self.0
    }
}
impl<const MIN: u32, const MAX: u32> TryFrom<i64> for Bounded<MIN, MAX> {
    type Error = String;
    fn try_from(v: i64) -> Result<Self, String> {
        Self::new(v)
    }
}
impl<const MIN: u32, const MAX: u32> From<Bounded<MIN, MAX>> for i64 {
    fn from(b: Bounded<MIN, MAX>) -> i64 {
        b.0.into()
    }
}

/// A share between 0 and 1.
#[derive(Debug, Clone, Copy, PartialEq, PartialOrd, Deserialize, Serialize)]
#[serde(try_from = "f64", into = "f64")]
pub struct Ratio(f64);

impl Ratio {
    /// Checks a share.
    pub fn new(v: f64) -> Result<Self, String> {
        if !(0.0..=1.0).contains(&v) {
            return Err(format!("{v} is not a share: use a number from 0.0 to 1.0"));
        }
        Ok(Self(v))
    }
    /// The share.
    pub fn get(self) -> f64 {
        self.0
    }
}
impl TryFrom<f64> for Ratio {
    type Error = String;
    fn try_from(v: f64) -> Result<Self, String> {
        Self::new(v)
    }
}
impl From<Ratio> for f64 {
    fn from(r: Ratio) -> f64 {
        r.0
    }
}

/// An absolute HTTP path such as `/healthz`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(try_from = "String", into = "String")]
pub struct HttpPath(String);

impl TryFrom<String> for HttpPath {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        if !s.starts_with('/') || s.len() > 1024 || !s.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(format!(
                "{s:?} is not an HTTP path: start with '/', printable ASCII, at most 1024 bytes"
            ));
        }
        Ok(Self(s))
    }
}
impl From<HttpPath> for String {
    fn from(p: HttpPath) -> String {
        p.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    proptest::proptest! {
        #[test]
        fn durations_round_trip(ms in 1u32..=MAX_MILLIS) {
            let m = Millis::new(ms).expect("in range");
            proptest::prop_assert_eq!(Millis::try_from(String::from(m)), Ok(m));
        }
    }
}

/// A gRPC service name as `grpc.health.v1` asks about it (`pkg.Service`).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(try_from = "String", into = "String")]
pub struct GrpcServiceName(String);

impl TryFrom<String> for GrpcServiceName {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        let ok = !s.is_empty()
            && s.len() <= 256
            && s.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"._-/".contains(&b));
        if !ok {
            return Err(format!(
                "{s:?} is not a gRPC service name: use e.g. \"wayfinder.lab.v1.Echo\""
            ));
        }
        Ok(Self(s))
    }
}
impl From<GrpcServiceName> for String {
    fn from(n: GrpcServiceName) -> String {
        n.0
    }
}
impl GrpcServiceName {
    /// The name as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}
