//! `wayfinder.v1.Registry`: Register, KeepAlive, Deregister.

use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use futures::{Stream, StreamExt};
use tonic::{Request, Response, Status, Streaming};
use wayfinder_proto::v1::{
    DeregisterRequest, DeregisterResponse, Health, Heartbeat, KeepAliveResponse, RegisterRequest,
    RegisterResponse, deregister_request::Target, registry_server,
};
use wayfinder_proto::validate;

use super::{check_size, invalid};
use crate::store::Backend;

/// Serves the Registry API.
pub struct RegistryService {
    backend: Arc<dyn Backend>,
}

impl RegistryService {
    /// A service writing through `backend`.
    pub fn new(backend: Arc<dyn Backend>) -> Self {
        Self { backend }
    }
}

fn health(v: i32) -> Result<Health, Status> {
    Health::try_from(v)
        .map_err(|_| Status::invalid_argument(format!("health {v} is not a known value")))
}

type KeepAliveStream = Pin<Box<dyn Stream<Item = Result<KeepAliveResponse, Status>> + Send>>;

#[tonic::async_trait]
impl registry_server::Registry for RegistryService {
    async fn register(
        &self,
        req: Request<RegisterRequest>,
    ) -> Result<Response<RegisterResponse>, Status> {
        let req = req.into_inner();
        check_size(&req)?;
        let instance = req
            .instance
            .ok_or_else(|| Status::invalid_argument("instance is required"))?;
        let instance = validate::instance(instance).map_err(invalid)?;
        let initial = health(req.initial_health)?;
        let ttl = (req.ttl_ms != 0).then(|| Duration::from_millis(req.ttl_ms.into()));
        let (service, id, addr) = (
            instance.service.clone(),
            instance.instance_id.clone(),
            format!("{}:{}", instance.address, instance.port),
        );
        let r = self
            .backend
            .register(instance, req.static_endpoint, ttl, initial)
            .await?;
        tracing::info!(%service, instance = %id, %addr, lease = r.lease_id, static_endpoint = req.static_endpoint, "registered");
        Ok(Response::new(RegisterResponse {
            lease_id: r.lease_id,
            ttl_ms: u32::try_from(r.ttl.as_millis()).unwrap_or(u32::MAX),
            instance_id: r.instance_id,
            version: r.version,
        }))
    }

    type KeepAliveStream = KeepAliveStream;

    async fn keep_alive(
        &self,
        req: Request<Streaming<Heartbeat>>,
    ) -> Result<Response<Self::KeepAliveStream>, Status> {
        let backend = self.backend.clone();
        let beats = req.into_inner();
        // Each heartbeat is answered in order; the first bad one ends the
        // stream with its status, which tells the sidecar what to do.
        let out = beats
            .then(move |beat| {
                let backend = backend.clone();
                async move {
                    let beat = beat?;
                    let h = health(beat.health)?;
                    let ttl = backend.heartbeat(beat.lease_id, h).await?;
                    Ok(KeepAliveResponse {
                        lease_id: beat.lease_id,
                        ttl_ms: u32::try_from(ttl.as_millis()).unwrap_or(u32::MAX),
                    })
                }
            })
            .scan(false, |failed, item: Result<KeepAliveResponse, Status>| {
                if *failed {
                    return futures::future::ready(None);
                }
                *failed = item.is_err();
                futures::future::ready(Some(item))
            });
        Ok(Response::new(Box::pin(out)))
    }

    async fn deregister(
        &self,
        req: Request<DeregisterRequest>,
    ) -> Result<Response<DeregisterResponse>, Status> {
        let version = match req.into_inner().target {
            Some(Target::LeaseId(id)) => self.backend.deregister_lease(id).await?,
            Some(Target::Endpoint(ep)) => {
                validate::service_name(&ep.service).map_err(invalid)?;
                let ip = validate::address(&ep.address).map_err(invalid)?;
                validate::port(ep.port).map_err(invalid)?;
                self.backend
                    .deregister_address(&ep.service, &ip.to_string(), ep.port)
                    .await?
            }
            None => return Err(Status::invalid_argument("give a lease id or an endpoint")),
        };
        Ok(Response::new(DeregisterResponse { version }))
    }
}
