//! Protocol detection from a connection's first bytes.
//!
//! HTTP is recognised by a method token and a space (or the HTTP/2 preface),
//! mTLS from another sidecar by a TLS handshake record; anything else is
//! opaque TCP. When a client sends nothing within the detection window, the
//! listener connects to the target and [`race`] lets whoever speaks first
//! decide: server-speaks-first protocols (MySQL, SMTP, NATS) become opaque
//! TCP, and a [`Detector`] remembers the port as such.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::net::TcpStream;

use crate::metrics::ProxyMetrics;

/// What a connection speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    /// HTTP/1.x.
    Http1,
    /// HTTP/2 with prior knowledge (h2c, gRPC).
    Http2,
    /// A TLS handshake (a ClientHello record): mTLS from another sidecar.
    Tls,
    /// Anything else.
    Opaque,
}

const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
const METHODS: &[&[u8]] = &[
    b"GET ",
    b"POST ",
    b"PUT ",
    b"DELETE ",
    b"HEAD ",
    b"OPTIONS ",
    b"PATCH ",
    b"CONNECT ",
    b"TRACE ",
];

/// Classifies the first bytes; `None` while they are still a prefix of
/// something HTTP could start with.
pub fn classify(buf: &[u8]) -> Option<Protocol> {
    if buf.is_empty() {
        return None;
    }
    // A TLS record of type handshake (22), protocol version 3.x.
    if buf[0] == 0x16 {
        return match buf.get(1) {
            None => None,
            Some(3) => Some(Protocol::Tls),
            Some(_) => Some(Protocol::Opaque),
        };
    }
    let n = buf.len().min(H2_PREFACE.len());
    if buf[..n] == H2_PREFACE[..n] {
        return (n == H2_PREFACE.len()).then_some(Protocol::Http2);
    }
    let mut undecided = false;
    for m in METHODS {
        let k = buf.len().min(m.len());
        if buf[..k] == m[..k] {
            if k == m.len() {
                return Some(Protocol::Http1);
            }
            undecided = true;
        }
    }
    (!undecided).then_some(Protocol::Opaque)
}

/// Peeks until the first bytes decide the protocol; `None` when the client
/// sent nothing within `window`.
pub async fn peek(stream: &TcpStream, window: Duration) -> Option<Protocol> {
    let deadline = tokio::time::Instant::now() + window;
    let mut buf = [0u8; 24];
    loop {
        match tokio::time::timeout_at(deadline, stream.peek(&mut buf)).await {
            Err(_) => return None,
            Ok(Err(_)) | Ok(Ok(0)) => return Some(Protocol::Opaque),
            Ok(Ok(n)) => match classify(&buf[..n]) {
                Some(p) => return Some(p),
                None if n == buf.len() || tokio::time::Instant::now() >= deadline => {
                    return Some(Protocol::Opaque);
                }
                // A partial method token: wait briefly for the rest.
                None => tokio::time::sleep(Duration::from_millis(1)).await,
            },
        }
    }
}

/// A listener's detection: its window, and what its port is known to carry.
pub struct Detector {
    /// How long a client may stay silent before the target may speak first.
    pub window: Duration,
    /// Set once a server spoke first here: this port carries a
    /// server-speaks-first protocol, so later connections skip the wait.
    server_first: AtomicBool,
}

impl Detector {
    /// Detection with `window` on a new listener.
    pub fn new(window: Duration) -> Self {
        Self {
            window,
            server_first: AtomicBool::new(false),
        }
    }

    /// What `stream` speaks, from its first bytes; `None` when its client
    /// stays silent (then [`race`] decides), at once when it was seen
    /// `silent` already or, for a port with `one_target`, when the port is
    /// known to carry a server-first protocol. Timed and counted.
    pub async fn first_bytes(
        &self,
        stream: &TcpStream,
        one_target: bool,
        silent: bool,
        metrics: &ProxyMetrics,
    ) -> Option<Protocol> {
        let remembered = one_target && self.server_first.load(Ordering::Relaxed);
        let started = std::time::Instant::now();
        let proto = if remembered || silent {
            None
        } else {
            peek(stream, self.window).await
        };
        metrics
            .detect_seconds
            .observe(started.elapsed().as_secs_f64());
        if proto.is_none() && !remembered {
            metrics.detect_timeouts.inc();
        }
        proto
    }

    /// A server spoke first on this port: later connections skip the window.
    pub fn server_spoke_first(&self) {
        self.server_first.store(true, Ordering::Relaxed);
    }
}

/// Who spoke first on a connection whose client was silent through the
/// detection window, once its target is connected.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Race {
    /// The client: what it speaks ([`Protocol::Opaque`] when it did not
    /// finish an HTTP start within another window). A client that was
    /// merely slow still gets HTTP, so one slow client never turns a port
    /// opaque.
    Client(Protocol),
    /// The server: its greeting's first `n` bytes are in the buffer.
    Server(usize),
    /// The server closed or failed before anyone spoke.
    Closed,
}

/// Waits for the first word on `stream` (the client) or `server`, reading
/// a server's greeting into `greeting`.
pub async fn race(
    stream: &TcpStream,
    server: &mut (impl AsyncRead + Unpin + ?Sized),
    greeting: &mut [u8],
    window: Duration,
) -> Race {
    let first = tokio::select! {
        biased;
        _ = stream.readable() => None,
        r = server.read(greeting) => Some(r),
    };
    match first {
        None => Race::Client(peek(stream, window).await.unwrap_or(Protocol::Opaque)),
        Some(Ok(n)) if n > 0 => Race::Server(n),
        Some(_) => Race::Closed,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_client_hello_is_tls() {
        assert_eq!(
            classify(&[0x16, 0x03, 0x01, 0x02, 0x00]),
            Some(Protocol::Tls)
        );
        assert_eq!(classify(&[0x16]), None, "one byte is not enough");
        assert_eq!(classify(&[0x16, 0x99]), Some(Protocol::Opaque));
    }

    #[test]
    fn recognises_http_and_falls_back_to_opaque() {
        assert_eq!(classify(b"GET / HTTP/1.1\r\n"), Some(Protocol::Http1));
        assert_eq!(classify(b"POST /x"), Some(Protocol::Http1));
        assert_eq!(classify(H2_PREFACE), Some(Protocol::Http2));
        assert_eq!(classify(b"PRI * HTTP/2.0\r\n"), None);
        assert_eq!(classify(b"GE"), None);
        assert_eq!(classify(b"P"), None);
        assert_eq!(
            classify(b"\x16\x03\x01"),
            Some(Protocol::Tls),
            "relayed as opaque TCP unless it is mTLS to an inbound side with an identity"
        );
        assert_eq!(
            classify(b"*1\r\n$4\r\nPING"),
            Some(Protocol::Opaque),
            "Redis"
        );
        assert_eq!(classify(b"GETX"), Some(Protocol::Opaque));
    }

    proptest::proptest! {
        #[test]
        fn once_decided_more_bytes_never_change_the_answer(
            bytes in proptest::collection::vec(proptest::num::u8::ANY, 1..40),
        ) {
            let mut first = None;
            for i in 1..=bytes.len() {
                if let Some(p) = classify(&bytes[..i]) {
                    first.get_or_insert(p);
                    proptest::prop_assert_eq!(Some(p), first);
                }
            }
        }
    }
}
