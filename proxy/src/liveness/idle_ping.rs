//! Pings on idle pooled HTTP/2 connections, slower than hyper's.
//!
//! hyper's HTTP/2 client has one keepalive interval, with a switch for idle
//! connections: the sidecar uses it at 0.5 s while requests are open and
//! leaves idle connections alone. A peer that froze (SIGSTOP, `docker
//! pause`, a wedged process) while its kernel still acknowledges segments
//! passes TCP keepalive, so an idle connection to it would stay in the pool
//! until the next request found it. [`IdlePing`] sits under hyper on those
//! connections and sends a PING of its own after [`H2_IDLE_PING_INTERVAL`]
//! without a byte read, at a frame boundary of the outgoing stream; if
//! nothing at all is read within [`H2_IDLE_PING_TIMEOUT`], reads fail and
//! hyper closes the connection. The peer's acknowledgement of our PING is
//! taken out of the stream before h2 sees it (h2 would log an ACK for a
//! PING it never sent). On a connection that reads, the only work is a flag
//! set per read and a timer re-armed once per interval.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::{Instant, Sleep};

/// Silence on an idle pooled HTTP/2 connection before it is pinged (read
/// as: between one and two intervals, as the timer is re-armed lazily).
pub const H2_IDLE_PING_INTERVAL: Duration = Duration::from_secs(10);
/// Time the peer has to answer an idle ping before the connection is closed.
pub const H2_IDLE_PING_TIMEOUT: Duration = Duration::from_secs(3);

/// The client connection preface, which precedes the first frame.
const PREFACE_LEN: usize = 24;
/// A frame header: 24-bit length, type, flags, 31-bit stream id.
const HEAD_LEN: usize = 9;
const PING: u8 = 0x6;
const ACK: u8 = 0x1;
/// Our PING's opaque data (h2's own pings use other payloads).
const OPAQUE: [u8; 8] = *b"wf-alive";

fn ping_frame(flags: u8) -> [u8; HEAD_LEN + 8] {
    let mut f = [0u8; HEAD_LEN + 8];
    f[2] = 8; // length
    f[3] = PING;
    f[4] = flags;
    f[HEAD_LEN..].copy_from_slice(&OPAQUE);
    f
}

/// Where a byte stream of HTTP/2 frames is: inside a frame, or between two.
#[derive(Debug, Default)]
struct Frames {
    /// Payload bytes (or preface bytes) left in the current frame.
    left: usize,
    head: [u8; HEAD_LEN],
    head_len: usize,
}

impl Frames {
    fn after_preface() -> Self {
        Self {
            left: PREFACE_LEN,
            ..Self::default()
        }
    }

    fn at_boundary(&self) -> bool {
        self.left == 0 && self.head_len == 0
    }

    /// Moves over the start of `bytes`, at most to the next frame boundary;
    /// returns how many bytes it moved over.
    fn step(&mut self, bytes: &[u8]) -> usize {
        if self.left > 0 {
            let n = self.left.min(bytes.len());
            self.left -= n;
            return n;
        }
        let n = (HEAD_LEN - self.head_len).min(bytes.len());
        self.head[self.head_len..self.head_len + n].copy_from_slice(&bytes[..n]);
        self.head_len += n;
        if self.head_len == HEAD_LEN {
            self.head_len = 0;
            self.left = usize::from(self.head[0]) << 16
                | usize::from(self.head[1]) << 8
                | usize::from(self.head[2]);
        }
        n
    }

    fn advance(&mut self, mut bytes: &[u8]) {
        while !bytes.is_empty() {
            let n = self.step(bytes);
            bytes = &bytes[n..];
        }
    }

    /// Moves over `bytes` (newly read), taking out every acknowledgement of
    /// our PING that starts at a frame boundary and lies whole in them;
    /// returns the length left. One split across two reads goes through
    /// (h2 ignores it).
    fn strip_acks(&mut self, bytes: &mut [u8]) -> usize {
        let ack = ping_frame(ACK);
        let (mut at, mut len) = (0, bytes.len());
        while at < len {
            if self.at_boundary() && bytes[at..len].starts_with(&ack) {
                bytes.copy_within(at + ack.len()..len, at);
                len -= ack.len();
                continue;
            }
            at += self.step(&bytes[at..len]);
        }
        len
    }
}

#[derive(Debug, PartialEq)]
enum State {
    /// Waiting for an interval of silence.
    Idle,
    /// Our PING is out (or queued); the timer is its deadline.
    Pinged,
}

/// An HTTP/2 client connection's byte stream that pings the peer when it has
/// been silent for [`H2_IDLE_PING_INTERVAL`] (see the module docs).
pub struct IdlePing<S> {
    inner: S,
    out: Frames,
    inn: Frames,
    /// Bytes of our PING not yet written.
    queued: Option<([u8; HEAD_LEN + 8], usize)>,
    timer: Pin<Box<Sleep>>,
    state: State,
    /// Something was read since the timer was last armed.
    heard: bool,
}

impl<S> IdlePing<S> {
    /// Wraps the stream of a connection whose preface has not been sent yet.
    pub fn new(inner: S) -> Self {
        Self {
            inner,
            out: Frames::after_preface(),
            inn: Frames::default(),
            queued: None,
            timer: Box::pin(tokio::time::sleep(H2_IDLE_PING_INTERVAL)),
            state: State::Idle,
            heard: false,
        }
    }
}

impl<S: AsyncWrite + Unpin> IdlePing<S> {
    /// Writes what is left of our PING; ready once nothing is.
    fn poll_queued(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while let Some((frame, sent)) = &mut self.queued {
            let n = std::task::ready!(Pin::new(&mut self.inner).poll_write(cx, &frame[*sent..]))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            *sent += n;
            if *sent == frame.len() {
                self.queued = None;
                std::task::ready!(Pin::new(&mut self.inner).poll_flush(cx))?;
            }
        }
        Poll::Ready(Ok(()))
    }

    /// Acts on the timer: re-arms it after a read, sends a PING after an
    /// interval of silence, fails after an unanswered one. Pending once the
    /// timer is armed again.
    fn poll_timer(&mut self, cx: &mut Context<'_>) -> Poll<io::Error> {
        while self.timer.as_mut().poll(cx).is_ready() {
            let now = Instant::now();
            if self.heard {
                self.heard = false;
                self.state = State::Idle;
                self.timer.as_mut().reset(now + H2_IDLE_PING_INTERVAL);
            } else if self.state == State::Pinged {
                return Poll::Ready(io::Error::new(
                    io::ErrorKind::TimedOut,
                    "HTTP/2 peer did not answer an idle ping",
                ));
            } else if self.out.at_boundary() && self.queued.is_none() {
                self.queued = Some((ping_frame(0), 0));
                self.state = State::Pinged;
                self.timer.as_mut().reset(now + H2_IDLE_PING_TIMEOUT);
                tracing::trace!("idle HTTP/2 connection pinged");
            } else {
                // h2 is inside a frame it could not finish writing (the
                // peer's window is shut): look again later.
                self.timer.as_mut().reset(now + H2_IDLE_PING_INTERVAL);
            }
        }
        Poll::Pending
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncRead for IdlePing<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        loop {
            if let Poll::Ready(Err(e)) = this.poll_queued(cx) {
                return Poll::Ready(Err(e));
            }
            let before = buf.filled().len();
            match Pin::new(&mut this.inner).poll_read(cx, buf) {
                Poll::Ready(Ok(())) => {
                    let read = buf.filled().len() - before;
                    if read == 0 {
                        return Poll::Ready(Ok(())); // end of stream
                    }
                    this.heard = true;
                    let kept = this.inn.strip_acks(&mut buf.filled_mut()[before..]);
                    if kept > 0 {
                        buf.set_filled(before + kept);
                        return Poll::Ready(Ok(()));
                    }
                    // Only our ACK: nothing for h2, and no end of stream.
                    buf.set_filled(before);
                }
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Pending => {
                    return match this.poll_timer(cx) {
                        Poll::Ready(e) => Poll::Ready(Err(e)),
                        // The timer may have queued a PING: start writing it.
                        Poll::Pending => match this.poll_queued(cx) {
                            Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
                            _ => Poll::Pending,
                        },
                    };
                }
            }
        }
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for IdlePing<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        std::task::ready!(this.poll_queued(cx))?;
        let n = std::task::ready!(Pin::new(&mut this.inner).poll_write(cx, buf))?;
        this.out.advance(&buf[..n]);
        Poll::Ready(Ok(n))
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        std::task::ready!(this.poll_queued(cx))?;
        let n = std::task::ready!(Pin::new(&mut this.inner).poll_write_vectored(cx, bufs))?;
        let mut left = n;
        for b in bufs {
            let take = left.min(b.len());
            this.out.advance(&b[..take]);
            left -= take;
            if left == 0 {
                break;
            }
        }
        Poll::Ready(Ok(n))
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        std::task::ready!(this.poll_queued(cx))?;
        Pin::new(&mut this.inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use http_body_util::{BodyExt, Empty};
    use hyper::client::conn::http2;
    use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

    fn frame(kind: u8, flags: u8, payload: &[u8]) -> Vec<u8> {
        let len = payload.len();
        let mut f = vec![
            (len >> 16) as u8,
            (len >> 8) as u8,
            len as u8,
            kind,
            flags,
            0,
            0,
            0,
            1,
        ];
        f.extend_from_slice(payload);
        f
    }

    #[test]
    fn frame_boundaries_are_followed_through_any_split() {
        let mut stream = vec![b'P'; PREFACE_LEN];
        stream.extend(frame(0x0, 0, &[7; 300]));
        stream.extend(frame(0x4, 1, &[]));
        stream.extend(frame(0x1, 4, &[1; 70_000]));
        for chunk in [1, 2, 9, 17, 4096] {
            let mut f = Frames::after_preface();
            let mut boundaries = 0;
            for part in stream.chunks(chunk) {
                f.advance(part);
                boundaries += usize::from(f.at_boundary());
            }
            assert!(f.at_boundary(), "chunks of {chunk}");
            assert!(boundaries >= 1);
        }
        let mut f = Frames::after_preface();
        f.advance(&stream[..PREFACE_LEN + 5]);
        assert!(!f.at_boundary(), "inside a frame header");
    }

    #[test]
    fn only_our_whole_acks_at_boundaries_are_taken_out() {
        let data = frame(0x0, 0, &ping_frame(ACK)); // our ACK's bytes inside DATA
        let theirs = frame(PING, ACK, b"hyper-pg");
        let mut read = Vec::new();
        read.extend(ping_frame(ACK));
        read.extend(&data);
        read.extend(ping_frame(ACK));
        read.extend(&theirs);
        read.extend(ping_frame(ACK));
        let mut f = Frames::default();
        let kept = f.strip_acks(&mut read);
        let mut want = data.clone();
        want.extend(&theirs);
        assert_eq!(&read[..kept], &want[..]);
        assert!(f.at_boundary());

        // Split across two reads: passed through, and the stream stays in step.
        let mut f = Frames::default();
        let ack = ping_frame(ACK);
        let mut first = ack[..5].to_vec();
        assert_eq!(f.strip_acks(&mut first), 5);
        let mut second = ack[5..].to_vec();
        second.extend(&theirs);
        assert_eq!(f.strip_acks(&mut second), 12 + theirs.len());
        assert!(f.at_boundary());
    }

    /// The far end of an in-memory pipe that a test can freeze: it then
    /// reads nothing and writes nothing, as a stopped process whose kernel
    /// still holds the socket.
    struct Freezable {
        io: tokio::io::DuplexStream,
        frozen: Arc<AtomicBool>,
        pings_seen: Arc<AtomicUsize>,
    }

    impl AsyncRead for Freezable {
        fn poll_read(
            self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            buf: &mut ReadBuf<'_>,
        ) -> Poll<io::Result<()>> {
            let this = self.get_mut();
            if this.frozen.load(Ordering::Relaxed) {
                return Poll::Pending;
            }
            let before = buf.filled().len();
            let r = Pin::new(&mut this.io).poll_read(cx, buf);
            let ours = ping_frame(0);
            let got = &buf.filled()[before..];
            if got.windows(ours.len()).any(|w| w == ours) {
                this.pings_seen.fetch_add(1, Ordering::Relaxed);
            }
            r
        }
    }

    impl AsyncWrite for Freezable {
        fn poll_write(
            self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            buf: &[u8],
        ) -> Poll<io::Result<usize>> {
            let this = self.get_mut();
            if this.frozen.load(Ordering::Relaxed) {
                return Poll::Pending;
            }
            Pin::new(&mut this.io).poll_write(cx, buf)
        }
        fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
            Pin::new(&mut self.get_mut().io).poll_flush(cx)
        }
        fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
            Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
        }
    }

    /// hyper's HTTP/2 client over [`IdlePing`] and hyper's HTTP/2 server on
    /// the far end, as the pool and an inbound sidecar have them.
    async fn connected() -> (
        http2::SendRequest<Empty<Bytes>>,
        tokio::task::JoinHandle<hyper::Result<()>>,
        Arc<AtomicBool>,
        Arc<AtomicUsize>,
    ) {
        let (near, far) = tokio::io::duplex(64 * 1024);
        let frozen = Arc::new(AtomicBool::new(false));
        let pings_seen = Arc::new(AtomicUsize::new(0));
        let far = Freezable {
            io: far,
            frozen: frozen.clone(),
            pings_seen: pings_seen.clone(),
        };
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(|_req| async {
                Ok::<_, std::convert::Infallible>(hyper::Response::new(Empty::<Bytes>::new()))
            });
            let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(far), svc)
                .await;
        });
        let (tx, conn) = http2::Builder::new(TokioExecutor::new())
            .timer(TokioTimer::new())
            .keep_alive_interval(crate::liveness::H2_PING_INTERVAL)
            .keep_alive_timeout(crate::liveness::H2_PING_TIMEOUT)
            .keep_alive_while_idle(false)
            .handshake(TokioIo::new(IdlePing::new(near)))
            .await
            .expect("handshake");
        (tx, tokio::spawn(conn), frozen, pings_seen)
    }

    async fn call(tx: &mut http2::SendRequest<Empty<Bytes>>) -> hyper::Result<()> {
        let req = hyper::Request::get("http://web/")
            .body(Empty::new())
            .expect("request");
        let resp = tx.send_request(req).await?;
        resp.into_body().collect().await?;
        Ok(())
    }

    #[tokio::test(start_paused = true)]
    async fn an_idle_connection_to_a_live_peer_is_pinged_and_stays() {
        let (mut tx, conn, _frozen, pings_seen) = connected().await;
        call(&mut tx).await.expect("first call");
        tokio::time::sleep(H2_IDLE_PING_INTERVAL * 10).await;
        let pings = pings_seen.load(Ordering::Relaxed);
        // Between one and two intervals of silence per ping.
        assert!(
            (5..=10).contains(&pings),
            "{pings} idle pings in 10 intervals"
        );
        assert!(!conn.is_finished(), "a live peer's connection was closed");
        // Its ACKs never reached h2 as frames it did not expect: the
        // connection still carries calls.
        call(&mut tx).await.expect("call after idle pings");
    }

    #[tokio::test(start_paused = true)]
    async fn an_idle_connection_to_a_frozen_peer_is_closed() {
        let (mut tx, conn, frozen, _pings) = connected().await;
        call(&mut tx).await.expect("first call");
        frozen.store(true, Ordering::Relaxed);
        let bound = H2_IDLE_PING_INTERVAL * 2 + H2_IDLE_PING_TIMEOUT + Duration::from_millis(10);
        let ended = tokio::time::timeout(bound, conn)
            .await
            .expect("the connection outlived the idle ping's bound")
            .expect("task");
        let err = ended.expect_err("closed with an error");
        let mut cause: Option<&dyn std::error::Error> = Some(&err);
        let mut said = Vec::new();
        while let Some(e) = cause {
            said.push(e.to_string());
            cause = e.source();
        }
        assert!(said.iter().any(|s| s.contains("idle ping")), "{said:?}");
        assert!(tx.is_closed());
    }

    #[tokio::test(start_paused = true)]
    async fn a_busy_connection_sends_no_idle_pings() {
        let (mut tx, _conn, _frozen, pings_seen) = connected().await;
        let step = H2_IDLE_PING_INTERVAL / 4;
        for _ in 0..40 {
            call(&mut tx).await.expect("call");
            tokio::time::sleep(step).await;
        }
        assert_eq!(pings_seen.load(Ordering::Relaxed), 0);
    }
}
