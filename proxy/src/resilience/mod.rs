//! What keeps a failing endpoint from becoming a failing request: retry
//! decisions and their budget, passive outlier ejection, circuit breakers
//! and active health checks. Timeouts are enforced where requests are sent
//! (`http/outbound.rs`, `connector.rs`); the values come from [`crate::settings`].

pub mod breaker;
pub mod budget;
pub mod fault;
pub mod health_check;
pub mod outlier;
pub mod probe;
pub mod retry;
