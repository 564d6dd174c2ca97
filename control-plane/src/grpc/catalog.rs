//! `wayfinder.v1.Catalog.Watch`: the address → service table for sidecars
//! that intercept connections transparently. The table is small (one line
//! per service), so each change sends it whole; a `watch` channel coalesces
//! bursts, and a slow reader only ever gets the newest table.

use std::pin::Pin;
use std::sync::Arc;

use futures::Stream;
use tonic::{Request, Response, Status};
use wayfinder_proto::v1::catalog_server::Catalog;
use wayfinder_proto::v1::{CatalogRequest, CatalogUpdate};

use super::auth::Guard;
use super::check_size;
use crate::registry::Registry;

/// The Catalog service.
pub struct CatalogService {
    registry: Arc<Registry>,
    guard: Guard,
}

impl CatalogService {
    /// Serves `registry`'s catalog to callers `guard` lets through.
    pub fn new(registry: Arc<Registry>, guard: Guard) -> Self {
        Self { registry, guard }
    }
}

type UpdateStream = Pin<Box<dyn Stream<Item = Result<CatalogUpdate, Status>> + Send>>;

#[tonic::async_trait]
impl Catalog for CatalogService {
    type WatchStream = UpdateStream;

    async fn watch(
        &self,
        request: Request<CatalogRequest>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        self.guard.member(&request, "Catalog.Watch")?;
        check_size(request.get_ref())?;
        let node = request.into_inner().node;
        tracing::debug!(%node, "catalog watch");
        let registry = self.registry.clone();
        let mut changes = registry.watch_changes();
        // Mark the current version seen so the first table goes out once.
        changes.borrow_and_update();
        let stream = futures::stream::unfold(
            (registry, changes, true),
            |(registry, mut changes, first)| async move {
                if !first && changes.changed().await.is_err() {
                    return None;
                }
                changes.borrow_and_update();
                let table = registry.catalog();
                Some((Ok(table), (registry, changes, false)))
            },
        );
        Ok(Response::new(Box::pin(stream)))
    }
}
