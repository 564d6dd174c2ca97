//! A request body that can be sent again. The first attempt streams the
//! client's body as it arrives (no added latency, no deadlock with
//! streaming gRPC) while a copy of up to `limit` bytes is kept; a retry
//! replays the copy and then continues with whatever the client has not
//! sent yet. A body larger than the limit is still forwarded, but cannot
//! be retried.

use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use bytes::Bytes;
use hyper::HeaderMap;
use hyper::body::{Body, Frame, Incoming, SizeHint};

struct Shared {
    /// The client's body; `None` for a request the proxy makes itself.
    source: Option<Incoming>,
    /// Data frames read so far, while they fit in `limit`.
    chunks: Vec<Bytes>,
    size: usize,
    limit: usize,
    overflowed: bool,
    /// Reading the client's body failed (malformed, or cut off): the
    /// client's fault, not the endpoint's.
    client_failed: bool,
    trailers: Option<HeaderMap>,
    ended: bool,
    /// The view that may read the source; older views are abandoned.
    generation: u64,
}

/// One attempt's view of a request body.
pub struct ReplayBody {
    shared: Arc<Mutex<Shared>>,
    /// Chunks of `shared.chunks` this view has yielded.
    pos: usize,
    /// Trailers already yielded.
    trailers_sent: bool,
    hint: SizeHint,
    generation: u64,
}

impl ReplayBody {
    /// Wraps `body`, keeping up to `limit` bytes for replay (0: none).
    pub fn new(body: Incoming, limit: usize) -> Self {
        let hint = body.size_hint();
        let ended = body.is_end_stream();
        Self::over(Some(body), limit, hint, ended)
    }

    /// An empty body, for requests the proxy makes itself.
    pub fn empty() -> Self {
        Self::over(None, 0, SizeHint::with_exact(0), true)
    }

    fn over(source: Option<Incoming>, limit: usize, hint: SizeHint, ended: bool) -> Self {
        Self {
            shared: Arc::new(Mutex::new(Shared {
                source,
                chunks: Vec::new(),
                size: 0,
                limit,
                overflowed: false,
                client_failed: false,
                trailers: None,
                ended,
                generation: 0,
            })),
            pos: 0,
            trailers_sent: false,
            hint,
            generation: 0,
        }
    }

    /// A handle that keeps the body replayable; it is never sent itself.
    pub fn keeper(&self) -> Self {
        Self {
            shared: self.shared.clone(),
            pos: 0,
            trailers_sent: false,
            hint: self.hint,
            generation: u64::MAX,
        }
    }

    /// Whether everything read so far was kept, so a retry could replay it.
    pub fn replayable(&self) -> bool {
        self.shared.lock().is_ok_and(|s| !s.overflowed)
    }

    /// Whether reading the client's body failed: then the request, not the
    /// endpoint, is at fault, and it cannot be sent again.
    pub fn client_failed(&self) -> bool {
        self.shared.lock().is_ok_and(|s| s.client_failed)
    }

    /// Whether the whole body was read and kept: a copy made now takes
    /// nothing from a view still reading the client's body.
    pub fn complete(&self) -> bool {
        self.shared
            .lock()
            .is_ok_and(|s| s.ended && !s.overflowed && !s.client_failed)
    }

    /// A fresh view of the whole body, if it was read and kept ([`Self::complete`]).
    pub fn replay_complete(&self) -> Option<Self> {
        if self.complete() { self.replay() } else { None }
    }

    /// A fresh view for another attempt, if everything read so far was kept.
    pub fn replay(&self) -> Option<Self> {
        let mut s = self.shared.lock().unwrap_or_else(|p| p.into_inner());
        if s.overflowed {
            return None;
        }
        s.generation += 1;
        Some(Self {
            shared: self.shared.clone(),
            pos: 0,
            trailers_sent: false,
            hint: self.hint,
            generation: s.generation,
        })
    }
}

impl Body for ReplayBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let this = &mut *self;
        let mut s = this.shared.lock().unwrap_or_else(|p| p.into_inner());
        if this.pos < s.chunks.len() {
            this.pos += 1;
            return Poll::Ready(Some(Ok(Frame::data(s.chunks[this.pos - 1].clone()))));
        }
        if s.ended {
            if !this.trailers_sent
                && let Some(t) = s.trailers.clone()
            {
                this.trailers_sent = true;
                return Poll::Ready(Some(Ok(Frame::trailers(t))));
            }
            return Poll::Ready(None);
        }
        if s.generation != this.generation {
            // An abandoned attempt whose connection still polls its body:
            // the client's bytes now belong to the retry.
            return Poll::Ready(None);
        }
        let Some(source) = s.source.as_mut() else {
            s.ended = true;
            return Poll::Ready(None);
        };
        // Empty DATA frames are skipped: forwarded, each became an empty
        // non-final frame on the next hop, and h2 (as Envoy) sends GOAWAY
        // ENHANCE_YOUR_CALM once a connection has carried 100 of them: a
        // gRPC client ends each call with one, so the pooled connection
        // died every ~100 calls, failing the POSTs in flight on it.
        let polled = loop {
            match Pin::new(&mut *source).poll_frame(cx) {
                Poll::Ready(Some(Ok(f))) if f.data_ref().is_some_and(Bytes::is_empty) => continue,
                other => break other,
            }
        };
        match polled {
            Poll::Pending => Poll::Pending,
            Poll::Ready(None) => {
                s.ended = true;
                Poll::Ready(None)
            }
            Poll::Ready(Some(Err(e))) => {
                s.client_failed = true;
                s.overflowed = true;
                Poll::Ready(Some(Err(e)))
            }
            Poll::Ready(Some(Ok(frame))) => {
                let frame = match frame.into_data() {
                    Ok(data) => {
                        if !s.overflowed && s.size + data.len() <= s.limit {
                            s.size += data.len();
                            s.chunks.push(data.clone());
                            this.pos = s.chunks.len();
                        } else if !s.overflowed {
                            s.overflowed = true;
                            s.chunks = Vec::new();
                            this.pos = 0;
                        }
                        return Poll::Ready(Some(Ok(Frame::data(data))));
                    }
                    Err(frame) => frame,
                };
                match frame.into_trailers() {
                    Ok(t) => {
                        s.trailers = Some(t.clone());
                        s.ended = true;
                        this.trailers_sent = true;
                        Poll::Ready(Some(Ok(Frame::trailers(t))))
                    }
                    Err(_) => Poll::Ready(None),
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        let s = self.shared.lock().unwrap_or_else(|p| p.into_inner());
        s.ended && self.pos >= s.chunks.len() && (s.trailers.is_none() || self.trailers_sent)
    }

    fn size_hint(&self) -> SizeHint {
        self.hint
    }
}
