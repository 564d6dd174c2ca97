//! CONNECT tunnels: an app's `CONNECT NAME:PORT` becomes opaque TCP to one
//! of the service's endpoints, when its policy allows tunnels.

use std::net::SocketAddr;
use std::sync::Arc;

use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;

use super::observe::refuse;
use super::{Body, CONNECT_FAILED, reply};
use crate::edge::Refusal;
use crate::metrics::Direction;
use crate::opaque::{connect, relay};
use crate::state::{DISCOVERY_WAIT, Proxy};

/// An app's `CONNECT NAME:PORT`: when `service` (or the one NAME names)
/// allows tunnels in its policy (`tunnels = true`), a 200 and then the
/// bytes both ways to one of its endpoints, as opaque TCP; its sidecars
/// authorize the tunnel as TCP (rules without methods or paths). Anything
/// else is refused: 405 (no tunnels), 404 (an unknown name).
pub async fn serve(
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
                        return refuse(&proxy, Refusal::UnknownService, false, client);
                    }
                    Arc::from(h)
                }
                // An address, or no name: tunnels go to services only.
                _ => return refuse(&proxy, Refusal::Tunnel, false, client),
            }
        }
    };
    let Ok(up) = proxy.upstream(&name) else {
        return refuse(&proxy, Refusal::TooManyUpstreams, false, client);
    };
    up.wait_ready(DISCOVERY_WAIT).await;
    if !up.active().settings.tunnels {
        return refuse(&proxy, Refusal::Tunnel, false, client);
    }
    let server = match connect(&proxy, &name).await {
        Ok(t) => t,
        Err(e) => {
            tracing::debug!(%client, service = %name, error = %e, "no endpoint for a tunnel");
            return reply(false, StatusCode::BAD_GATEWAY, CONNECT_FAILED);
        }
    };
    let upgraded = hyper::upgrade::on(&mut req);
    tokio::spawn(async move {
        match upgraded.await {
            Ok(io) => relay(TokioIo::new(io), server, &[], Direction::Outbound, &proxy).await,
            Err(e) => tracing::debug!(%client, error = %e, "tunnel not established"),
        }
    });
    Response::new(
        http_body_util::Empty::new()
            .map_err(|never| match never {})
            .boxed(),
    )
}
