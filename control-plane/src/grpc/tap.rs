//! `Tap`: wfctl's taps (operator only) and the sidecars that feed them
//! ([`crate::tap`] holds the taps and the fan-out).

use std::pin::Pin;
use std::sync::Arc;

use futures::{Stream, StreamExt};
use tokio_stream::wrappers::{ReceiverStream, WatchStream};
use tonic::{Request, Response, Status};
use wayfinder_proto::v1::{
    TapAck, TapBatch, TapInterest, TapInterestRequest, TapRequest, tap_server::Tap,
};

use super::auth::Guard;
use super::{check_size, invalid};
use crate::tap::{Filter, MAX_TAPS, Taps};

/// Most events one batch from a sidecar may carry (its cap is 500 a second,
/// sent five times a second).
pub const MAX_EVENTS: usize = 2000;

type BatchStream = Pin<Box<dyn Stream<Item = Result<TapBatch, Status>> + Send>>;
type InterestStream = Pin<Box<dyn Stream<Item = Result<TapInterest, Status>> + Send>>;

/// The Tap service.
pub struct TapService {
    taps: Arc<Taps>,
    guard: Guard,
}

impl TapService {
    /// A service over `taps` for callers `guard` lets through.
    pub fn new(taps: Arc<Taps>, guard: Guard) -> Self {
        Self { taps, guard }
    }
}

#[tonic::async_trait]
impl Tap for TapService {
    type WatchStream = BatchStream;
    type InterestStream = InterestStream;

    async fn watch(&self, req: Request<TapRequest>) -> Result<Response<BatchStream>, Status> {
        self.guard.operator(&req, "Tap.Watch")?;
        let filter = Filter::parse(req.get_ref()).map_err(invalid)?;
        let (id, rx) = self.taps.open(filter).ok_or_else(|| {
            Status::resource_exhausted(format!("{MAX_TAPS} taps are open; close one first"))
        })?;
        // The tap stays open as long as its stream: the guard goes with it.
        let open = self.taps.guard(id);
        let stream = ReceiverStream::new(rx).map(move |b| {
            let _ = &open;
            Ok(b)
        });
        Ok(Response::new(Box::pin(stream)))
    }

    async fn interest(
        &self,
        req: Request<TapInterestRequest>,
    ) -> Result<Response<InterestStream>, Status> {
        self.guard.member(&req, "Tap.Interest")?;
        let stream =
            WatchStream::new(self.taps.interest()).map(|services| Ok(TapInterest { services }));
        Ok(Response::new(Box::pin(stream)))
    }

    async fn publish(&self, req: Request<TapBatch>) -> Result<Response<TapAck>, Status> {
        let own = self.guard.member(&req, "Tap.Publish")?;
        let mut batch = req.into_inner();
        check_size(&batch)?;
        if batch.events.len() > MAX_EVENTS {
            return Err(invalid(format!("at most {MAX_EVENTS} events per batch")));
        }
        // A sidecar publishes as the service in its certificate.
        let caller = match own {
            Some(own) => own,
            None => {
                wayfinder_proto::validate::service_name(&batch.service)
                    .map_err(|e| invalid(format!("service: {e}")))?;
                batch.service.clone()
            }
        };
        for e in &mut batch.events {
            e.caller.clone_from(&caller);
        }
        self.taps.publish(&batch);
        Ok(Response::new(TapAck {}))
    }
}
