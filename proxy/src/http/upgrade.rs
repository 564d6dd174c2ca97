//! HTTP/1 Upgrade (WebSocket): the handshake forwarded, then the two
//! upgraded connections spliced.

use std::sync::Arc;

use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;

use super::attempt::SendError;
use super::head::to_http1;
use super::{Body, error};
use crate::balance::EndpointStats;
use crate::edge;
use crate::replay::ReplayBody;
use crate::upstream::Clients;

/// HTTP/1 Upgrade (WebSocket): forward the handshake, then splice the two
/// upgraded connections. Never retried: the client may start talking the
/// new protocol at once.
pub async fn forward(
    mut req: Request<Incoming>,
    ep: &Arc<EndpointStats>,
    clients: &Clients,
) -> Response<Body> {
    let client_upgrade = hyper::upgrade::on(&mut req);
    if to_http1(&mut req, ep).is_err() {
        return error(StatusCode::BAD_REQUEST, "bad-uri");
    }
    // As on every other request: only sidecars speak for the mesh.
    edge::strip_mesh_headers(req.headers_mut());
    let req = req.map(|b| ReplayBody::new(b, 0));
    let pool = match &clients.mesh_h1 {
        Some(mesh) if ep.meshed => mesh,
        _ => &clients.h1,
    };
    let mut resp = match pool.send(ep.addr, req).await {
        Ok(r) => r,
        Err(e) => {
            let (status, reason) = SendError::Client(e).reply();
            return error(status, reason);
        }
    };
    if !ep.meshed {
        edge::strip_mesh_headers(resp.headers_mut());
    }
    if resp.status() == StatusCode::SWITCHING_PROTOCOLS {
        let server_upgrade = hyper::upgrade::on(&mut resp);
        let addr = ep.addr;
        tokio::spawn(async move {
            match (client_upgrade.await, server_upgrade.await) {
                (Ok(c), Ok(s)) => {
                    let (mut c, mut s) = (TokioIo::new(c), TokioIo::new(s));
                    let _ = tokio::io::copy_bidirectional(&mut c, &mut s).await;
                }
                (c, s) => {
                    tracing::debug!(%addr, client_ok = c.is_ok(), server_ok = s.is_ok(), "upgrade failed")
                }
            }
        });
    }
    let (parts, body) = resp.into_parts();
    Response::from_parts(parts, body.boxed())
}
