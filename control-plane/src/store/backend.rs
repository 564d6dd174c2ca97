//! What the gRPC API and the policy file write through: every change to the
//! registry goes through one [`Backend`], which makes it durable (embedded
//! files) or shared (etcd) before the caller is answered.

use std::sync::Arc;
use std::time::Duration;

use thiserror::Error;
use wayfinder_proto::v1::{Health, Instance, ServicePolicy};

use super::Persister;
use crate::registry::{Registered, Registry, RegistryError};

/// Why a change was refused or not confirmed.
#[derive(Debug, Error)]
pub enum BackendError {
    /// The registry refused it (unknown lease, conflict).
    #[error(transparent)]
    Registry(#[from] RegistryError),
    /// It was made but not confirmed durable in time.
    #[error("the change is visible but could not be written to the store in time; retry")]
    NotDurable,
    /// The shared store cannot be reached; nothing was changed.
    #[error("the store is unavailable: {0}")]
    Unavailable(String),
}

/// Where changes go: the seam between the API and a store backend.
#[tonic::async_trait]
pub trait Backend: Send + Sync + 'static {
    /// Registers an already validated instance.
    async fn register(
        &self,
        instance: Instance,
        static_endpoint: bool,
        ttl: Option<Duration>,
        health: Health,
    ) -> Result<Registered, BackendError>;
    /// Renews a lease and records the reported health; returns the TTL.
    async fn heartbeat(&self, lease_id: u64, health: Health) -> Result<Duration, BackendError>;
    /// Removes a leased registration; returns the version after it.
    async fn deregister_lease(&self, lease_id: u64) -> Result<u64, BackendError>;
    /// Removes a static endpoint; returns the version after it.
    async fn deregister_address(
        &self,
        service: &str,
        address: &str,
        port: u32,
    ) -> Result<u64, BackendError>;
    /// Sets validated policies; returns the version and the services changed.
    async fn apply_policies(
        &self,
        policies: Vec<ServicePolicy>,
    ) -> Result<(u64, Vec<String>), BackendError>;
    /// Removes a service's policy; returns whether it had one.
    async fn remove_policy(&self, service: &str) -> Result<bool, BackendError>;
    /// Whether this replica is in sync with its store (`/readyz`).
    fn ready(&self) -> bool;
    /// Human description for logs.
    fn describe(&self) -> String;
}

/// The embedded store: the registry is the truth, the persister writes it down.
pub struct Embedded {
    registry: Arc<Registry>,
    persister: Arc<Persister>,
    description: String,
}

impl Embedded {
    /// Changes go to `registry` and are acknowledged once `persister` wrote them.
    pub fn new(registry: Arc<Registry>, persister: Arc<Persister>, description: String) -> Self {
        Self {
            registry,
            persister,
            description,
        }
    }

    async fn durable(&self) -> Result<(), BackendError> {
        if self.persister.durable(self.registry.dirty()).await {
            Ok(())
        } else {
            Err(BackendError::NotDurable)
        }
    }
}

#[tonic::async_trait]
impl Backend for Embedded {
    async fn register(
        &self,
        instance: Instance,
        static_endpoint: bool,
        ttl: Option<Duration>,
        health: Health,
    ) -> Result<Registered, BackendError> {
        let r = self
            .registry
            .register(instance, static_endpoint, ttl, health)?;
        self.durable().await?;
        Ok(r)
    }

    async fn heartbeat(&self, lease_id: u64, health: Health) -> Result<Duration, BackendError> {
        // Heartbeats are written with the next batch; nobody waits for them.
        Ok(self.registry.heartbeat(lease_id, health)?)
    }

    async fn deregister_lease(&self, lease_id: u64) -> Result<u64, BackendError> {
        let v = self.registry.deregister_lease(lease_id)?;
        self.durable().await?;
        Ok(v)
    }

    async fn deregister_address(
        &self,
        service: &str,
        address: &str,
        port: u32,
    ) -> Result<u64, BackendError> {
        let v = self.registry.deregister_address(service, address, port)?;
        self.durable().await?;
        Ok(v)
    }

    async fn apply_policies(
        &self,
        policies: Vec<ServicePolicy>,
    ) -> Result<(u64, Vec<String>), BackendError> {
        let r = self.registry.apply_policies(policies);
        self.durable().await?;
        Ok(r)
    }

    async fn remove_policy(&self, service: &str) -> Result<bool, BackendError> {
        let had = self.registry.remove_policy(service);
        self.durable().await?;
        Ok(had)
    }

    fn ready(&self) -> bool {
        true
    }

    fn describe(&self) -> String {
        self.description.clone()
    }
}
