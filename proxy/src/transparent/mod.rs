//! Transparent interception: connections an app opened to some address,
//! redirected here by iptables (`wf-proxy init`). The original destination
//! (`SO_ORIGINAL_DST`) or the HTTP Host header names a service, and the
//! connection is balanced over the whole service; anything else passes
//! through to where the app meant it to go, untouched.

pub mod catalog;
pub mod iptables;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpStream;

use catalog::Table;

/// Where an intercepted connection goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// A mesh service: balanced over its endpoints.
    Service(Arc<str>),
    /// Not the mesh's: straight to the original destination.
    Passthrough(SocketAddr),
    /// Not redirected at all (a client that dialled the listener itself):
    /// served like the Host-routed outbound listener.
    Direct,
}

/// The address the app dialled before iptables redirected it here.
pub fn original_dst(stream: &TcpStream) -> Option<SocketAddr> {
    let sock = socket2::SockRef::from(stream);
    let local = stream.local_addr().ok()?;
    let orig = if local.is_ipv6() {
        sock.original_dst_v6()
    } else {
        sock.original_dst_v4()
    };
    orig.ok()?.as_socket()
}

/// Decides where an intercepted connection goes: the Host header's service
/// first (the name the app asked for, even when the IP it cached is stale),
/// then the service the original address belongs to, else passthrough.
pub fn decide(
    table: &Table,
    local: SocketAddr,
    orig: Option<SocketAddr>,
    host: Option<&str>,
) -> Target {
    let orig = match orig {
        Some(o) if o != local => o,
        _ => return Target::Direct,
    };
    if let Some(s) = host.and_then(|h| table.service_named(h)) {
        return Target::Service(s);
    }
    match table.service_at(orig.ip()) {
        Some(s) => Target::Service(s),
        None => Target::Passthrough(orig),
    }
}

/// What the first bytes of an intercepted connection said.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Peeked {
    /// An HTTP/1 request head with this Host.
    Host(String),
    /// Bytes, but no Host to go by (not HTTP/1, no Host header, or a head
    /// that did not complete within the window).
    NoHost,
    /// Nothing within the window: the server may be the one to speak first.
    Silent,
}

/// The Host header of an HTTP/1 request whose head arrives within `window`
/// (peeked: the bytes stay for whoever serves the connection).
pub async fn peek_host(stream: &TcpStream, window: Duration) -> Peeked {
    let deadline = tokio::time::Instant::now() + window;
    let mut buf = vec![0u8; 8192];
    let mut seen = false;
    loop {
        let n = match tokio::time::timeout_at(deadline, stream.peek(&mut buf)).await {
            Ok(Ok(n)) => n,
            Ok(Err(_)) => return Peeked::NoHost,
            Err(_) if seen => return Peeked::NoHost,
            Err(_) => return Peeked::Silent,
        };
        if n == 0 {
            return Peeked::NoHost;
        }
        seen = true;
        match host_in(&buf[..n]) {
            Some(peeked) => return peeked,
            None if n == buf.len() => return Peeked::NoHost,
            None => {
                if tokio::time::Instant::now() >= deadline {
                    return Peeked::NoHost;
                }
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        }
    }
}

/// What the first bytes of a connection say of its Host: [`Peeked::Host`]
/// or [`Peeked::NoHost`] once they hold a whole HTTP/1 request head (or
/// are not one), `None` while the head is incomplete.
pub fn host_in(first: &[u8]) -> Option<Peeked> {
    let mut headers = [httparse::EMPTY_HEADER; 64];
    let mut req = httparse::Request::new(&mut headers);
    match req.parse(first) {
        Ok(httparse::Status::Complete(_)) => {
            Some(host_of(req.headers).map_or(Peeked::NoHost, Peeked::Host))
        }
        // Not HTTP/1 after all, or too many headers: no Host to go by.
        Err(_) => Some(Peeked::NoHost),
        Ok(httparse::Status::Partial) => None,
    }
}

fn host_of(headers: &[httparse::Header<'_>]) -> Option<String> {
    headers
        .iter()
        .find(|h| h.name.eq_ignore_ascii_case("host"))
        .and_then(|h| std::str::from_utf8(h.value).ok())
        .map(|s| s.trim().to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use wayfinder_proto::v1::{CatalogService, CatalogUpdate};

    fn table() -> Table {
        Table::from_update(&CatalogUpdate {
            version: 1,
            services: vec![
                CatalogService {
                    name: "web".into(),
                    addresses: vec!["10.0.0.11".into(), "10.0.0.12".into()],
                },
                CatalogService {
                    name: "api".into(),
                    addresses: vec!["10.0.0.21".into()],
                },
            ],
        })
    }

    fn sa(s: &str) -> SocketAddr {
        s.parse().expect("test input")
    }

    #[test]
    fn the_host_header_wins_over_a_stale_address() {
        let local = sa("127.0.0.1:15001");
        let t = table();
        // The app cached web's IP, but asks for api by name.
        assert_eq!(
            decide(&t, local, Some(sa("10.0.0.11:80")), Some("api:80")),
            Target::Service("api".into())
        );
        // A removed instance's IP still reaches its service by name.
        assert_eq!(
            decide(&t, local, Some(sa("10.0.0.99:80")), Some("web")),
            Target::Service("web".into())
        );
        // No Host (opaque TCP, HTTP/2): the address decides.
        assert_eq!(
            decide(&t, local, Some(sa("10.0.0.12:5432")), None),
            Target::Service("web".into())
        );
        // Unknown everything: untouched.
        assert_eq!(
            decide(&t, local, Some(sa("192.0.2.7:443")), Some("example.org")),
            Target::Passthrough(sa("192.0.2.7:443"))
        );
        // Dialled the listener itself, or no NAT entry.
        assert_eq!(decide(&t, local, Some(local), None), Target::Direct);
        assert_eq!(decide(&t, local, None, Some("web")), Target::Direct);
    }

    #[tokio::test]
    async fn peeks_the_host_without_consuming_it() {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("test input");
        let addr = l.local_addr().expect("test input");
        let client = tokio::spawn(async move {
            use tokio::io::AsyncWriteExt;
            let mut s = TcpStream::connect(addr).await.expect("test input");
            s.write_all(b"GET / HTTP/1.1\r\nUser-Agent: t\r\n")
                .await
                .expect("test input");
            tokio::time::sleep(Duration::from_millis(20)).await;
            s.write_all(b"Host: web.lab:8080\r\n\r\n")
                .await
                .expect("test input");
            s
        });
        let (server, _) = l.accept().await.expect("test input");
        let host = peek_host(&server, Duration::from_secs(2)).await;
        assert_eq!(host, Peeked::Host("web.lab:8080".into()));
        let mut buf = [0u8; 3];
        let n = server.peek(&mut buf).await.expect("test input");
        assert_eq!(&buf[..n], b"GET");
        drop(client.await.expect("test input"));
    }

    #[tokio::test]
    async fn a_silent_client_is_told_apart_from_one_without_host() {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = l.local_addr().expect("addr");
        let silent = TcpStream::connect(addr).await.expect("connect");
        let (server, _) = l.accept().await.expect("accept");
        let window = Duration::from_millis(30);
        assert_eq!(peek_host(&server, window).await, Peeked::Silent);
        use tokio::io::AsyncWriteExt;
        let mut talker = TcpStream::connect(addr).await.expect("connect");
        talker
            .write_all(b"\x16\x03\x01 not http")
            .await
            .expect("write");
        let (server2, _) = l.accept().await.expect("accept");
        assert_eq!(peek_host(&server2, window).await, Peeked::NoHost);
        drop((silent, talker));
    }
}
