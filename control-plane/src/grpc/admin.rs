//! `wayfinder.v1.Admin`: what wfctl reads and changes.

use std::sync::Arc;

use tonic::{Request, Response, Status};
use wayfinder_proto::policy::ServicePolicy as PolicyModel;
use wayfinder_proto::v1::{
    ApplyPolicyRequest, ApplyPolicyResponse, GetPolicyRequest, ListEndpointsRequest,
    ListEndpointsResponse, ListServicesRequest, ListServicesResponse, ServicePolicy, admin_server,
};
use wayfinder_proto::validate;

use super::auth::Guard;
use super::{check_size, invalid};
use crate::registry::Registry;
use crate::store::Backend;

/// Serves the Admin API: the operator's only.
pub struct AdminService {
    registry: Arc<Registry>,
    backend: Arc<dyn Backend>,
    guard: Guard,
}

impl AdminService {
    /// A service reading `registry` and writing through `backend`, for
    /// callers `guard` lets through.
    pub fn new(registry: Arc<Registry>, backend: Arc<dyn Backend>, guard: Guard) -> Self {
        Self {
            registry,
            backend,
            guard,
        }
    }
}

#[tonic::async_trait]
impl admin_server::Admin for AdminService {
    async fn list_services(
        &self,
        req: Request<ListServicesRequest>,
    ) -> Result<Response<ListServicesResponse>, Status> {
        self.guard.operator(&req, "ListServices")?;
        Ok(Response::new(ListServicesResponse {
            services: self.registry.services(),
        }))
    }

    async fn list_endpoints(
        &self,
        req: Request<ListEndpointsRequest>,
    ) -> Result<Response<ListEndpointsResponse>, Status> {
        self.guard.operator(&req, "ListEndpoints")?;
        let name = req.into_inner().service;
        validate::service_name(&name).map_err(invalid)?;
        let (version, endpoints) = self
            .registry
            .endpoints(&name)
            .ok_or_else(|| Status::not_found(format!("service {name} does not exist")))?;
        Ok(Response::new(ListEndpointsResponse { version, endpoints }))
    }

    async fn apply_policy(
        &self,
        req: Request<ApplyPolicyRequest>,
    ) -> Result<Response<ApplyPolicyResponse>, Status> {
        self.guard.operator(&req, "ApplyPolicy")?;
        let req = req.into_inner();
        check_size(&req)?;
        if req.policies.is_empty() {
            return Err(Status::invalid_argument("no policies given"));
        }
        // Validate every policy before applying any, and store the normalised
        // form so that equal policies compare equal.
        let mut policies = Vec::with_capacity(req.policies.len());
        for p in &req.policies {
            let (name, model) = PolicyModel::from_proto(p).map_err(invalid)?;
            policies.push(model.to_proto(name.as_str()));
        }
        let (version, changed) = self.backend.apply_policies(policies).await?;
        tracing::info!(?changed, version, "policies applied");
        Ok(Response::new(ApplyPolicyResponse { version, changed }))
    }

    async fn get_policy(
        &self,
        req: Request<GetPolicyRequest>,
    ) -> Result<Response<ServicePolicy>, Status> {
        self.guard.operator(&req, "GetPolicy")?;
        let name = req.into_inner().service;
        validate::service_name(&name).map_err(invalid)?;
        self.registry
            .policy(&name)
            .map(Response::new)
            .ok_or_else(|| Status::not_found(format!("service {name} has no policy")))
    }
}
