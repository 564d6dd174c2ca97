//! Sending a mirrored call's copy and comparing the two answers.
//!
//! The copy leaves once the real call has its response headers (its body is
//! then replayed from what the real call kept), on a task of its own, under
//! the mirror's in-flight cap: a slow or dead shadow costs the real call
//! nothing. Its answer is read to the end and hashed; the real answer's
//! body is hashed as it streams to the client; when both are known the
//! pair is compared (status, body hash, latency) into the diff report.

use std::hash::Hasher;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::BodyExt;
use hyper::Response;
use hyper::body::{Body as _, Frame, SizeHint};
use hyper::header::HeaderValue;
use tokio::sync::oneshot;

use super::Body;
use super::attempt::{self, Target};
use super::head::Head;
use crate::metrics::Direction;
use crate::replay::ReplayBody;
use crate::routes;
use crate::state::{DISCOVERY_WAIT, Proxy};
use crate::traffic::{Answered, MirrorCounts};
use crate::upstream::{Active, Upstream};

/// Marks a copy, so the shadow's app (and its logs) can tell.
pub const MIRROR_HEADER: &str = "x-wayfinder-mirror";

/// Longest a copy may take, answer read to its end.
const SHADOW_LIMIT: Duration = Duration::from_secs(15);

/// A copy about to be sent: where, and under which counts.
pub struct Copy {
    /// The upstream of the service called (a subset copy's endpoints are its own).
    pub up: Arc<Upstream>,
    /// Its endpoints as of the call (holding the mirror).
    pub active: Arc<Active>,
    /// The diff counts of the call's (service, route, shadow).
    pub counts: MirrorCounts,
    /// How much of the request body to keep for the copy.
    pub keep: usize,
}

impl Copy {
    /// The copy could not be made after all: counted as shed.
    pub fn shed(&self, proxy: &Proxy) {
        self.counts.shed();
        proxy.metrics.mirror_copy(self.up.name(), "shed");
    }
}

/// Sends the copy of a call whose answer is `resp`: `head` and the body
/// `keeper` kept are sent again to the mirror's target. Returns the answer
/// for the client, its body hashed on the way.
pub fn send(
    proxy: &Arc<Proxy>,
    copy: Copy,
    mut head: Head,
    keeper: &ReplayBody,
    started: Instant,
    resp: Response<Body>,
) -> Response<Body> {
    // The real call did not send its whole body (it failed early): there
    // is nothing complete to copy.
    let Some(body) = keeper.replay_complete() else {
        copy.shed(proxy);
        return resp;
    };
    // A slot under the mirror's `max_in_flight`, held until the copy ends.
    let limit = copy.active.mirror.as_ref().map(|m| m.max_in_flight);
    let Some(permit) = copy.up.mirrors_in_flight.try_acquire(limit) else {
        copy.shed(proxy);
        return resp;
    };
    head.headers
        .insert(MIRROR_HEADER, HeaderValue::from_static("1"));
    let (tx, rx) = oneshot::channel();
    let status = resp.status().as_u16();
    let resp = resp.map(|b| {
        Body::new(Hashed {
            inner: b,
            hasher: Default::default(),
            started,
            status,
            done: Some(tx),
        })
    });
    proxy.metrics.mirror_copy(copy.up.name(), "sent");
    let proxy = proxy.clone();
    tokio::spawn(async move {
        let shadow = tokio::time::timeout(SHADOW_LIMIT, shadow(&proxy, &copy, &head, body)).await;
        // The copy is done: its slot goes back before the wait for the
        // real answer's end, which a slow client may drag out.
        drop(permit);
        let Ok(Some(shadow)) = shadow else {
            copy.counts.shadow_failed();
            proxy.metrics.mirror_copy(copy.up.name(), "failed");
            return;
        };
        // The client may leave before the real answer ends: no pair then.
        if let Ok(Ok(primary)) = tokio::time::timeout(SHADOW_LIMIT, rx).await {
            copy.counts.pair(primary, shadow);
        }
    });
    resp
}

/// One try of the copy on the mirror's target; its answer read and hashed.
async fn shadow(
    proxy: &Arc<Proxy>,
    copy: &Copy,
    head: &Head,
    body: ReplayBody,
) -> Option<Answered> {
    let mirror = copy.active.mirror.as_ref()?;
    let (up, active) = match &mirror.target {
        routes::Target::Subset(_) => (copy.up.clone(), copy.active.clone()),
        routes::Target::Service(name) => {
            let up = proxy.upstream(name).ok()?;
            if !up.wait_ready(DISCOVERY_WAIT).await {
                return None;
            }
            let active = up.active();
            (up, active)
        }
    };
    let balancer = match &mirror.target {
        routes::Target::Subset(b) => b.as_ref(),
        routes::Target::Service(_) => active.balancer.as_ref(),
    };
    let i = balancer.pick(&Default::default()).next()?;
    let ep = &balancer.endpoints()[i];
    let clients = up.clients();
    let to = Target {
        ep,
        clients: &clients,
        to_sidecar: ep.meshed,
        direction: Direction::Outbound,
        upstream: up.name(),
    };
    let started = Instant::now();
    let resp = attempt::send(&proxy.metrics, &to, head, body, &AtomicBool::new(false))
        .await
        .ok()?;
    let status = resp.status().as_u16();
    let mut body = resp.into_body();
    let mut hasher = std::hash::DefaultHasher::new();
    while let Some(frame) = body.frame().await {
        if let Ok(data) = frame.ok()?.into_data() {
            hasher.write(&data);
        }
    }
    Some(Answered {
        status,
        body: hasher.finish(),
        took: started.elapsed(),
    })
}

/// The real answer's body, hashed as it streams; at its end the answer is
/// handed to the copy's task for the comparison.
struct Hashed {
    inner: Body,
    hasher: std::hash::DefaultHasher,
    started: Instant,
    status: u16,
    done: Option<oneshot::Sender<Answered>>,
}

impl Hashed {
    fn finish(&mut self) {
        if let Some(done) = self.done.take() {
            let _ = done.send(Answered {
                status: self.status,
                body: self.hasher.finish(),
                took: self.started.elapsed(),
            });
        }
    }
}

impl hyper::body::Body for Hashed {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let this = &mut *self;
        let polled = Pin::new(&mut this.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    this.hasher.write(data);
                }
                if this.inner.is_end_stream() {
                    this.finish();
                }
            }
            Poll::Ready(None) => this.finish(),
            // A broken answer is no answer: no pair.
            Poll::Ready(Some(Err(_))) => this.done = None,
            Poll::Pending => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for Hashed {
    /// A server may not poll a body that says it is over (an empty one).
    fn drop(&mut self) {
        if self.inner.is_end_stream() {
            self.finish();
        }
    }
}
