//! Traffic management from wfctl: weighted splits with a progressive
//! rollout ([`split`]) and injected faults ([`fault`]). Both edit a
//! service's live policy through the Admin API (read, change, apply), so
//! they act like `wfctl policy apply` and every sidecar gets the change the
//! same way. [`Admin`] is that read-change-apply; `wfctl lab compare` uses
//! it too. [`mirror`] only reads: how mirrored calls compared with their
//! copies.

pub mod fault;
pub mod mirror;
pub mod split;

use std::time::Duration;

use anyhow::{Result, anyhow};
use tonic::Code;
use tonic::transport::Channel;
use wayfinder_proto::policy::{ServiceName, ServicePolicy};
use wayfinder_proto::v1::{
    ApplyPolicyRequest, Endpoint, GetPolicyRequest, ListEndpointsRequest, ListServicesRequest,
    ServiceSummary, admin_client::AdminClient,
};

/// The Admin API as the traffic commands use it: each call bounded by the
/// request timeout.
#[derive(Clone)]
pub struct Admin {
    client: AdminClient<Channel>,
    timeout: Duration,
}

/// Turns a gRPC status into an error that says what went wrong, not how.
pub fn status_error(s: tonic::Status) -> anyhow::Error {
    match s.code() {
        Code::InvalidArgument => anyhow!("refused: {}", s.message()),
        Code::NotFound => anyhow!("{}", s.message()),
        Code::Unavailable => anyhow!("control plane unavailable: {}", s.message()),
        Code::DeadlineExceeded => anyhow!("the control plane did not answer in time"),
        _ => anyhow!("{:?}: {}", s.code(), s.message()),
    }
}

impl Admin {
    /// Over `ch`, each call within `timeout`.
    pub fn new(ch: Channel, timeout: Duration) -> Self {
        Self {
            client: AdminClient::new(ch),
            timeout,
        }
    }

    fn request<T>(&self, msg: T) -> tonic::Request<T> {
        let mut r = tonic::Request::new(msg);
        r.set_timeout(self.timeout);
        r
    }

    /// The policy of `service`; the empty policy when it has none.
    pub async fn policy(&self, service: &str) -> Result<ServicePolicy> {
        let name = service_name(service)?;
        let got = self
            .client
            .clone()
            .get_policy(self.request(GetPolicyRequest {
                service: name.as_str().to_string(),
            }))
            .await;
        match got {
            Ok(p) => Ok(ServicePolicy::from_proto(&p.into_inner())?.1),
            Err(s) if s.code() == Code::NotFound => Ok(ServicePolicy::default()),
            Err(s) => Err(status_error(s)),
        }
    }

    /// Applies `policy` to `service`; returns the version after it.
    pub async fn apply(&self, service: &str, policy: &ServicePolicy) -> Result<u64> {
        let name = service_name(service)?;
        let resp = self
            .client
            .clone()
            .apply_policy(self.request(ApplyPolicyRequest {
                policies: vec![policy.to_proto(name.as_str())],
            }))
            .await
            .map_err(status_error)?;
        Ok(resp.into_inner().version)
    }

    /// The endpoints of `service` (none when it does not exist).
    pub async fn endpoints(&self, service: &str) -> Result<Vec<Endpoint>> {
        let got = self
            .client
            .clone()
            .list_endpoints(self.request(ListEndpointsRequest {
                service: service.to_string(),
            }))
            .await;
        match got {
            Ok(r) => Ok(r.into_inner().endpoints),
            Err(s) if s.code() == Code::NotFound => Ok(Vec::new()),
            Err(s) => Err(status_error(s)),
        }
    }

    /// Every service.
    pub async fn services(&self) -> Result<Vec<ServiceSummary>> {
        Ok(self
            .client
            .clone()
            .list_services(self.request(ListServicesRequest {}))
            .await
            .map_err(status_error)?
            .into_inner()
            .services)
    }
}

/// `s` checked as a service name.
pub fn service_name(s: &str) -> Result<ServiceName> {
    ServiceName::try_from(s.to_string()).map_err(|e| anyhow!("{s:?}: {e}"))
}
