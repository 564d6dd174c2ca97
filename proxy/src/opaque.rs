//! Opaque TCP: connecting to one of a service's endpoints for a byte relay
//! (over mTLS to its sidecars, which authorize it as TCP), connections no
//! service policy governs (the app, an intercepted destination), and the
//! relay itself. CONNECT tunnels use it from `http/tunnel.rs`.

use std::net::SocketAddr;

use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::balance::PickContext;
use crate::connector::Stream;
use crate::metrics::{BytesLabels, Direction};
use crate::resilience::breaker::Permit;
use crate::resilience::retry::Outcome;
use crate::state::{DISCOVERY_WAIT, Proxy};

/// The server side of a relay: its connection and, to a service's
/// endpoint, the `max_connections` slot it holds for as long as it is open.
pub struct Server {
    /// The connection.
    pub stream: Box<dyn Stream>,
    /// The circuit breaker's slot (none for the app or a passthrough).
    pub slot: Option<Permit>,
}

/// Connects to an endpoint of `service` for an opaque relay. A connect
/// failure moves on to the next endpoint (nothing was sent yet), up to the
/// retry policy's attempts; the relay holds a `max_connections` slot.
/// Meshed endpoints are reached over mTLS when the sidecar has an identity.
pub async fn connect(proxy: &Proxy, service: &str) -> Result<Server, String> {
    let up = proxy.upstream(service).map_err(|e| e.to_string())?;
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
                result = Ok(Server {
                    stream,
                    slot: Some(slot),
                });
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
    server: Server,
    greeting: &[u8],
    direction: Direction,
    proxy: &Proxy,
) {
    let Server {
        stream: mut server,
        slot: _slot,
    } = server;
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

/// A connection no service policy governs (the app, an intercepted
/// destination): bounded by the sidecar's connect timeout, and tuned.
pub async fn connect_direct(addr: SocketAddr, proxy: &Proxy) -> std::io::Result<TcpStream> {
    let s = tokio::time::timeout(proxy.connect_timeout(), TcpStream::connect(addr))
        .await
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "connect timed out"))??;
    crate::liveness::tune(&s);
    Ok(s)
}

/// Relays an intercepted connection to where the app meant it to go.
pub async fn passthrough(stream: TcpStream, orig: SocketAddr, proxy: &Proxy) {
    match connect_direct(orig, proxy).await {
        Ok(server) => {
            let server = Server {
                stream: Box::new(server),
                slot: None,
            };
            relay(stream, server, &[], Direction::Outbound, proxy).await;
        }
        Err(e) => tracing::debug!(%orig, error = %e, "passthrough connect failed"),
    }
}
