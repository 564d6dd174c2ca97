//! One attempt on one endpoint: the request built for the hop (HTTP/2 to
//! sidecars, HTTP/1.1 or HTTP/2 to others), sent on the pool that fits, its
//! latency recorded for the balancer and the histogram; and waiting for it
//! while its endpoint may leave discovery.

use std::sync::Arc;
use std::sync::atomic::AtomicBool;

use hyper::{Response, StatusCode};

use super::CONNECT_FAILED;
use super::head::{Head, MAX_HEADER_LIST};
use crate::balance::EndpointStats;
use crate::connector::ConnectError;
use crate::metrics::{Direction, LatencyLabels, ProxyMetrics};
use crate::pool::{PoolBody, PoolError};
use crate::replay::ReplayBody;
use crate::upstream::Clients;

/// One attempt failed before response headers.
#[derive(Debug)]
pub enum SendError {
    /// The request could not be built (a bad URI).
    BadRequest,
    /// Its headers exceed what an HTTP/2 peer takes ([`MAX_HEADER_LIST`]).
    HeadersTooLarge,
    /// No response: connect error, breaker, reset.
    Client(PoolError),
}

impl SendError {
    /// The status and reason the proxy answers with when this was the last try.
    pub fn reply(&self) -> (StatusCode, &'static str) {
        match self {
            SendError::BadRequest => (StatusCode::BAD_REQUEST, "bad-uri"),
            SendError::HeadersTooLarge => (
                StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
                "request-header-too-large",
            ),
            SendError::Client(e) => match e {
                PoolError::Connect(ConnectError::Overflow(_)) => {
                    (StatusCode::SERVICE_UNAVAILABLE, "overloaded")
                }
                PoolError::Connect(ConnectError::Timeout) => {
                    (StatusCode::GATEWAY_TIMEOUT, "timeout")
                }
                PoolError::Connect(_) | PoolError::Handshake(_) => {
                    (StatusCode::BAD_GATEWAY, CONNECT_FAILED)
                }
                PoolError::Http(_) => (StatusCode::BAD_GATEWAY, "upstream-reset"),
            },
        }
    }
}

/// Where one attempt goes: the endpoint, the clients that reach it, and
/// the series its latency is recorded in.
pub struct Target<'a> {
    /// The endpoint.
    pub ep: &'a Arc<EndpointStats>,
    /// The upstream's (or the app's) connection pools.
    pub clients: &'a Clients,
    /// A sidecar fronts the endpoint: HTTP/2, over mTLS when there is an identity.
    pub to_sidecar: bool,
    /// Inbound (to the app) or outbound.
    pub direction: Direction,
    /// The upstream the latency is counted under (`app` inbound).
    pub upstream: &'a str,
}

/// One attempt: sends `head` with `body` to `to.ep` and waits for the
/// response headers, recording the latency for the balancer and metrics.
/// `dispatched` is set once the request is handed to a connection.
pub async fn send(
    metrics: &ProxyMetrics,
    to: &Target<'_>,
    head: &Head,
    body: ReplayBody,
    dispatched: &AtomicBool,
) -> Result<Response<PoolBody>, SendError> {
    let ep = to.ep;
    let (req, use_h2) = head
        .request(body, ep, to.to_sidecar)
        .map_err(|_| SendError::BadRequest)?;
    // A peer would refuse the stream (a reset that looks like the
    // endpoint's failure): the client's request is at fault, and says so.
    if use_h2 && head.list_size() > MAX_HEADER_LIST {
        return Err(SendError::HeadersTooLarge);
    }
    let guard = ep.start();
    let pool = match &to.clients.mesh {
        Some(mesh) if use_h2 && to.to_sidecar => mesh,
        _ if use_h2 => &to.clients.h2,
        _ => &to.clients.h1,
    };
    match pool.send_marked(ep.addr, req, dispatched).await {
        Ok((resp, dialed)) => {
            // One clock read ends the attempt for the balancer and the
            // histogram. An endpoint serves one direction of one
            // upstream, so its series never changes. A try on a
            // connection dialed for it times the handshake (TCP, mTLS,
            // HTTP/2) as much as the endpoint: it does not feed
            // peak-EWMA, or one cold connection would keep an endpoint
            // out of rotation for tens of seconds while its estimate
            // decays (Linkerd's balancer likewise measures only
            // endpoints it is connected to).
            let now = std::time::Instant::now();
            let rtt = if dialed {
                guard.finish_unobserved_at(now)
            } else {
                guard.finish_at(now)
            };
            ep.latency
                .get_or_init(|| {
                    metrics
                        .latency
                        .get_or_create(&LatencyLabels {
                            direction: to.direction,
                            upstream: to.upstream.to_string(),
                            endpoint: ep.id.to_string(),
                        })
                        .clone()
                })
                .observe(rtt.as_secs_f64());
            Ok(resp)
        }
        Err(e) => {
            tracing::debug!(endpoint = %ep.addr, error = %e, "attempt failed");
            Err(SendError::Client(e))
        }
    }
}

/// How waiting for an attempt's response ended.
// Holds a response for one try, on the stack: boxing it would allocate per request.
#[allow(clippy::large_enum_variant)]
pub enum Attempted {
    /// The attempt ended by itself.
    Done(Result<Response<PoolBody>, SendError>),
    /// Its endpoint left discovery and the attempt was given up, to be
    /// repeated elsewhere.
    Abandoned,
}

/// Waits for `sent`; when `movable` (attempts are left) and `ep` is retired
/// meanwhile and `may_leave` agrees (the request may be repeated, the body
/// can be replayed, the budget pays), gives the attempt up. Dropping it
/// resets the HTTP/2 stream (or closes the HTTP/1 connection); other
/// requests keep waiting for their answer.
pub async fn until_retired<F>(
    mut sent: std::pin::Pin<&mut F>,
    ep: &EndpointStats,
    movable: bool,
    may_leave: impl FnOnce() -> bool,
) -> Attempted
where
    F: std::future::Future<Output = Result<Response<PoolBody>, SendError>>,
{
    if !movable {
        return Attempted::Done(sent.await);
    }
    tokio::select! {
        biased;
        r = &mut sent => return Attempted::Done(r),
        () = ep.leaving() => {}
    }
    if may_leave() {
        Attempted::Abandoned
    } else {
        Attempted::Done(sent.await)
    }
}
