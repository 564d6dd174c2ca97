//! What keeps a failing endpoint from becoming a failing request: retry
//! decisions and their budget, hedging, passive outlier ejection, circuit breakers
//! and active health checks; and what keeps callers from overloading a
//! service: its local rate limit, enforced on the way in. Timeouts are
//! enforced where requests are sent (`http/outbound.rs`, `connector.rs`);
//! the values come from [`crate::settings`].

pub mod breaker;
pub mod budget;
pub mod fault;
pub mod health_check;
pub mod hedge;
pub mod outlier;
pub mod probe;
pub mod rate_limit;
pub mod retry;
