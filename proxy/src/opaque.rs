//! Opaque TCP: connecting to one of a service's endpoints for a byte relay
//! (over mTLS to its sidecars, which authorize it as TCP), the relay
//! itself, and the CONNECT tunnels a service's policy may allow.

use std::net::SocketAddr;
use std::sync::Arc;

use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};

use crate::balance::PickContext;
use crate::connector::Stream;
use crate::edge::Refusal;
use crate::http_proxy::{Body, DISCOVERY_WAIT, Proxy, reply};
use crate::metrics::BytesLabels;
use crate::resilience::breaker::Permit;
use crate::resilience::retry::Outcome;

/// Connects to an endpoint of `service` for an opaque relay. A connect
/// failure moves on to the next endpoint (nothing was sent yet), up to the
/// retry policy's attempts; the relay holds a `max_connections` slot.
/// Meshed endpoints are reached over mTLS when the sidecar has an identity.
pub async fn connect(
    proxy: &Proxy,
    service: &str,
) -> Result<(Box<dyn Stream>, Option<Permit>), String> {
    let up = proxy.upstream(service);
    up.wait_ready(DISCOVERY_WAIT).await;
    let active = up.active();
    let tries = active.settings.retry.max_attempts as usize;
    let mut result = Err("no endpoints".to_string());
    for i in active.balancer.pick(&PickContext::default()).take(tries) {
        let ep = &active.balancer.endpoints()[i];
        let connector = match up.mesh_tcp_connector() {
            Some(c) if ep.meshed => c,
            _ => up.connector(),
        };
        match connector.connect(ep.addr).await {
            Ok(conn) => {
                let (stream, slot) = conn.into_parts();
                result = Ok((stream, Some(slot)));
                break;
            }
            Err(e) => {
                up.report(ep, Outcome::ConnectFailed, &active.settings);
                result = Err(format!("{}: {e}", ep.addr));
            }
        }
    }
    result
}

/// Relays bytes both ways until either side closes; `greeting` is what the
/// server already said. Counted as `direction` (`inbound`, `outbound`).
pub async fn relay<C: AsyncRead + AsyncWrite + Unpin>(
    mut client: C,
    mut server: Box<dyn Stream>,
    greeting: &[u8],
    _slot: Option<Permit>,
    direction: &'static str,
    proxy: &Proxy,
) {
    if !greeting.is_empty() && client.write_all(greeting).await.is_err() {
        return;
    }
    let (from_client, mut to_client) = tokio::io::copy_bidirectional(&mut client, &mut server)
        .await
        .unwrap_or_default();
    to_client += greeting.len() as u64;
    for (flow, n) in [("from_client", from_client), ("to_client", to_client)] {
        proxy
            .metrics
            .tcp_bytes
            .get_or_create(&BytesLabels { direction, flow })
            .inc_by(n);
    }
}

/// An app's `CONNECT NAME:PORT`: when `service` (or the one NAME names)
/// allows tunnels in its policy (`tunnels = true`), a 200 and then the
/// bytes both ways to one of its endpoints, as opaque TCP; its sidecars
/// authorize the tunnel as TCP (rules without methods or paths). Anything
/// else is refused: 405 (no tunnels), 404 (an unknown name).
pub async fn tunnel(
    proxy: Arc<Proxy>,
    mut req: Request<Incoming>,
    service: Option<Arc<str>>,
    client: SocketAddr,
) -> Response<Body> {
    let name: Arc<str> = match service {
        Some(s) => s,
        None => {
            let host = req.uri().authority().map(|a| a.host().to_ascii_lowercase());
            match host {
                Some(h) if wayfinder_proto::validate::service_name(&h).is_ok() => {
                    if !proxy.knows(&h).await {
                        return proxy.refuse_request(Refusal::UnknownService, false, client);
                    }
                    Arc::from(h)
                }
                // An address, or no name: tunnels go to services only.
                _ => return proxy.refuse_request(Refusal::Tunnel, false, client),
            }
        }
    };
    let up = proxy.upstream(&name);
    up.wait_ready(DISCOVERY_WAIT).await;
    if !up.active().settings.tunnels {
        return proxy.refuse_request(Refusal::Tunnel, false, client);
    }
    let (server, slot) = match connect(&proxy, &name).await {
        Ok(t) => t,
        Err(e) => {
            tracing::debug!(%client, service = %name, error = %e, "no endpoint for a tunnel");
            return reply(false, StatusCode::BAD_GATEWAY, "connect-failed");
        }
    };
    let upgraded = hyper::upgrade::on(&mut req);
    tokio::spawn(async move {
        match upgraded.await {
            Ok(io) => relay(TokioIo::new(io), server, &[], slot, "outbound", &proxy).await,
            Err(e) => tracing::debug!(%client, error = %e, "tunnel not established"),
        }
    });
    Response::new(
        http_body_util::Empty::new()
            .map_err(|never| match never {})
            .boxed(),
    )
}
