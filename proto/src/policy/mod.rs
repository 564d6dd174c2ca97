//! Per-service policy in TOML: the typed model, its validation and its wire conversion.
//!
//! The wire form is the `wayfinder.v1.ServicePolicy` message. Every value is checked while it is
//! deserialized (newtypes with `try_from`), so an error carries the span of the offending value
//! and is reported as `file:line: field services.web.retries.budget_ratio: why`. The same checks
//! run on policies that arrive over gRPC.
//!
//! ```toml
//! [services.web]
//! balancer = "peak-ewma"
//! [services.web.timeouts]
//! connect = "1s"
//! per_try = "500ms"
//! [services.web.retries]
//! max_attempts = 3
//! retry_on = ["connect-failure", "gateway-error"]
//! budget_ratio = 0.2
//! ```
//!
//! The model (`model`) is made of validated values (`values`); `file` loads it from TOML and
//! locates errors, `wire` converts it to and from protobuf. Everything public is re-exported
//! here.

mod file;
mod model;
mod shaping;
mod traffic;
mod values;
mod wire;

pub use file::PolicyError;
pub use model::{
    Authz, AuthzDefault, AuthzRule, Balancer, CircuitBreaker, Discovery, HashKey, HealthCheck,
    Outlier, PolicyFile, Retries, RetryOn, ServicePolicy, Timeouts,
};
pub use shaping::{HedgeAfter, Hedging, Locality, MAX_ZONES, Mirror, RateLimit};
pub use traffic::{
    Abort, Backend, BackendTarget, Backends, Delay, Fault, FaultMatch, HeaderMatch, InstanceId,
    MAX_BACKEND_WEIGHT, Percent, Route, RouteMatch, RouteName, Routes, Subset,
};
pub use values::{
    Bounded, Caller, GrpcServiceName, HttpMethod, HttpPath, MAX_MILLIS, Millis, Ratio, ServiceName,
    parse_duration,
};
