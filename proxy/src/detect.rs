//! Protocol detection from a connection's first bytes.
//!
//! HTTP is recognised by a method token and a space (or the HTTP/2 preface),
//! mTLS from another sidecar by a TLS handshake record; anything else is
//! opaque TCP. When a client sends nothing within the detection window, the
//! listener connects to the target and [`race`] lets whoever speaks first
//! decide: server-speaks-first protocols (MySQL, SMTP, NATS) become opaque
//! TCP, and a [`Detector`] remembers the port as such.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
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
/// Methods recognised by their name and a space alone (CONNECT's target
/// is an authority, which can start with anything).
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
    match request_line(buf) {
        Some(Protocol::Opaque) if undecided => None,
        other => other,
    }
}

/// Any other method (RFC 9110: a token; lowercase, WebDAV's PROPFIND,
/// QUERY) followed by a space and a request target in origin (`/`),
/// asterisk (`*`) or absolute (`http://`, `https://`) form. `None` while
/// the bytes could still become one.
fn request_line(buf: &[u8]) -> Option<Protocol> {
    let token = buf.iter().take_while(|&&b| is_tchar(b)).count();
    if token > MAX_METHOD {
        return Some(Protocol::Opaque);
    }
    // Nothing after the name yet: undecided.
    let rest = buf.get(token..).filter(|r| !r.is_empty())?;
    if token == 0 || rest[0] != b' ' {
        return Some(Protocol::Opaque);
    }
    let target = &rest[1..];
    match target.first() {
        None => None,
        Some(b'/' | b'*') => Some(Protocol::Http1),
        Some(_) => {
            let mut could = false;
            for scheme in [&b"http://"[..], b"https://"] {
                let k = target.len().min(scheme.len());
                if target[..k].eq_ignore_ascii_case(&scheme[..k]) {
                    if k == scheme.len() {
                        return Some(Protocol::Http1);
                    }
                    could = true;
                }
            }
            (!could).then_some(Protocol::Opaque)
        }
    }
}

/// The longest method name taken as HTTP (WebDAV's are up to 16 bytes).
const MAX_METHOD: usize = 20;

/// RFC 9110's `tchar`: what a method name is made of.
fn is_tchar(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

/// How many first bytes detection looks at: a method of [`MAX_METHOD`]
/// bytes, a space and `https://`.
const PEEK_LEN: usize = 32;

/// Peeks until the first bytes decide the protocol; `None` when the client
/// sent nothing within `window`. A client that stops halfway through a
/// method name is waited for on the socket's readiness, never by polling
/// (thousands of clients sending `G` and waiting must cost nothing).
pub async fn peek(stream: &TcpStream, window: Duration) -> Option<Protocol> {
    let deadline = tokio::time::Instant::now() + window;
    let mut buf = [0u8; PEEK_LEN];
    loop {
        let n = match tokio::time::timeout_at(deadline, stream.peek(&mut buf)).await {
            Err(_) => return None,
            Ok(Err(_)) | Ok(Ok(0)) => return Some(Protocol::Opaque),
            Ok(Ok(n)) => n,
        };
        if let Some(p) = classify(&buf[..n]) {
            return Some(p);
        }
        if n == buf.len() || !more_bytes(stream, n, deadline).await {
            return Some(Protocol::Opaque);
        }
    }
}

/// Waits until more than the `seen` bytes wait unread on `stream`, or
/// `deadline`: false when the client closed or stayed silent.
async fn more_bytes(stream: &TcpStream, seen: usize, deadline: tokio::time::Instant) -> bool {
    use std::os::fd::AsFd;
    // Waiting for new bytes means clearing the socket's readiness, which
    // must stay set on the connection itself (the bytes already there are
    // for whoever reads it next): a second handle on the same socket gets
    // readiness of its own, cleared and waited on here.
    let Ok(watch) = stream
        .as_fd()
        .try_clone_to_owned()
        .map(std::net::TcpStream::from)
        .and_then(TcpStream::from_std)
    else {
        return false;
    };
    let mut buf = [std::mem::MaybeUninit::<u8>::uninit(); PEEK_LEN];
    let mut closed = false;
    loop {
        let _ = watch.try_io(tokio::io::Interest::READABLE, || {
            Err::<(), _>(std::io::ErrorKind::WouldBlock.into())
        });
        // Bytes that came before the wait below would not wake it.
        match socket2::SockRef::from(&watch).peek(&mut buf) {
            Ok(n) if n > seen => return true,
            Ok(0) => return false,
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(_) => return false,
        }
        if closed {
            return false;
        }
        match tokio::time::timeout_at(deadline, watch.ready(tokio::io::Interest::READABLE)).await {
            Ok(Ok(ready)) => closed = ready.is_read_closed(),
            Ok(Err(_)) | Err(_) => return false,
        }
    }
}

/// How long a port stays known as server-first after a server last spoke
/// first there: long enough to spare its clients the window, short enough
/// that a port that changed hands (or one odd greeting) is not opaque forever.
pub const SERVER_FIRST_MEMORY: Duration = Duration::from_secs(60);

/// A listener's detection: its window, and what its port is known to carry.
pub struct Detector {
    /// How long a client may stay silent before the target may speak first.
    pub window: Duration,
    born: tokio::time::Instant,
    /// Until when (milliseconds after `born`, 0: not) this port counts as
    /// carrying a server-speaks-first protocol, so connections skip the wait.
    server_first_until: AtomicU64,
    /// Races running (each holds an endpoint connection for a silent client).
    races: Arc<tokio::sync::Semaphore>,
}

impl Detector {
    /// Detection with `window` on a new listener, at most `races` silent
    /// clients racing an endpoint at once.
    pub fn new(window: Duration, races: usize) -> Self {
        Self {
            window,
            born: tokio::time::Instant::now(),
            server_first_until: AtomicU64::new(0),
            races: Arc::new(tokio::sync::Semaphore::new(races)),
        }
    }

    /// A place in the races, if one is free; held until the race is decided.
    pub fn try_race(&self) -> Option<tokio::sync::OwnedSemaphorePermit> {
        self.races.clone().try_acquire_owned().ok()
    }

    fn now_ms(&self) -> u64 {
        u64::try_from(self.born.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    /// Whether the port is known to carry a server-first protocol.
    pub fn server_first(&self) -> bool {
        self.now_ms() < self.server_first_until.load(Ordering::Relaxed)
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
        let remembered = one_target && self.server_first();
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

    /// A server spoke first on this port: connections in the next
    /// [`SERVER_FIRST_MEMORY`] skip the window.
    pub fn server_spoke_first(&self) {
        let until = self
            .now_ms()
            .saturating_add(SERVER_FIRST_MEMORY.as_millis() as u64);
        self.server_first_until.store(until, Ordering::Relaxed);
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
        assert_eq!(classify(b"GETX"), None, "a method of its own, maybe");
        assert_eq!(classify(b"GETX\r\n"), Some(Protocol::Opaque));
    }

    #[test]
    fn any_method_token_before_a_request_target_is_http() {
        for http in [
            &b"PROPFIND /dav HTTP/1.1"[..],
            b"QUERY /search",
            b"get / HTTP/1.1",
            b"M-SEARCH * HTTP/1.1",
            b"PURGE http://web/x",
            b"LINK HTTPS://web/x",
        ] {
            assert_eq!(
                classify(http),
                Some(Protocol::Http1),
                "{:?}",
                String::from_utf8_lossy(http)
            );
        }
        for opaque in [
            &b"SET key value\r\n"[..],
            b"get key\r\n",
            b"PING\r\n",
            b"EHLO mail.example\r\n",
            b"AVERYLONGMETHODNAMEOFNOONE /",
            b"GET\t/",
        ] {
            assert_eq!(
                classify(opaque),
                Some(Protocol::Opaque),
                "{:?}",
                String::from_utf8_lossy(opaque)
            );
        }
        assert_eq!(classify(b"PROPFIND"), None);
        assert_eq!(classify(b"PURGE htt"), None);
    }

    #[tokio::test]
    async fn a_method_sent_in_pieces_is_read_when_its_rest_comes() {
        use tokio::io::AsyncWriteExt;
        let l = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let mut c = tokio::net::TcpStream::connect(l.local_addr().expect("addr"))
            .await
            .expect("connect");
        let (s, _) = l.accept().await.expect("accept");
        c.write_all(b"G").await.expect("write");
        let rest = async {
            tokio::time::sleep(Duration::from_millis(100)).await;
            c.write_all(b"ET / HTTP/1.1\r\n").await.expect("write");
        };
        let started = std::time::Instant::now();
        let (p, ()) = tokio::join!(peek(&s, Duration::from_secs(5)), rest);
        assert_eq!(p, Some(Protocol::Http1));
        assert!(
            started.elapsed() < Duration::from_secs(1),
            "{:?}",
            started.elapsed()
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_server_first_port_is_remembered_for_a_while_then_detected_again() {
        let d = Detector::new(Duration::from_millis(30), 1);
        assert!(!d.server_first());
        d.server_spoke_first();
        assert!(d.server_first());
        tokio::time::advance(SERVER_FIRST_MEMORY - Duration::from_secs(1)).await;
        assert!(d.server_first());
        // Each greeting renews it.
        d.server_spoke_first();
        tokio::time::advance(Duration::from_secs(30)).await;
        assert!(d.server_first());
        tokio::time::advance(SERVER_FIRST_MEMORY).await;
        assert!(!d.server_first(), "forgotten without greetings");
    }

    proptest::proptest! {
        #[test]
        fn request_line_prefixes_decide_once(
            line in "[A-Za-z!#$%&'*+.^_`|~-]{1,22}( (/|[*]|[hH][tT][tT][pP][sS]?://|x)[ -~]{0,4})?",
        ) {
            let bytes = line.as_bytes();
            let mut first = None;
            for i in 1..=bytes.len() {
                if let Some(p) = classify(&bytes[..i]) {
                    first.get_or_insert(p);
                    proptest::prop_assert_eq!(Some(p), first);
                }
            }
        }

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
