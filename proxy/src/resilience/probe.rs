//! One health probe of an address, for the app's registration heartbeats
//! and for active checks of upstream endpoints alike.

use std::net::SocketAddr;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// How the app's health is checked.
#[derive(Debug, Clone)]
pub enum Check {
    /// `GET path` must answer 2xx.
    Http(String),
    /// A TCP connect must succeed.
    Tcp,
}

impl std::fmt::Display for Check {
    /// As `--health-check` takes it: `tcp` or the path.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Check::Http(path) => f.write_str(path),
            Check::Tcp => f.write_str("tcp"),
        }
    }
}

/// One probe, of the app or of an upstream endpoint: a minimal HTTP/1.1 GET
/// (no client pool: a probe must reflect a
/// fresh connection) or a TCP connect.
pub async fn probe(app: SocketAddr, check: &Check) -> bool {
    let Ok(mut s) = TcpStream::connect(app).await else {
        return false;
    };
    let Check::Http(path) = check else {
        return true;
    };
    let req = format!(
        "GET {path} HTTP/1.1\r\nHost: {app}\r\nUser-Agent: wayfinder-health\r\nConnection: close\r\n\r\n"
    );
    if s.write_all(req.as_bytes()).await.is_err() {
        return false;
    }
    let mut buf = [0u8; 16];
    let mut n = 0;
    while n < 12 {
        match s.read(&mut buf[n..]).await {
            Ok(0) | Err(_) => return false,
            Ok(k) => n += k,
        }
    }
    // "HTTP/1.1 2xx"
    buf.starts_with(b"HTTP/1.") && buf[9] == b'2'
}
