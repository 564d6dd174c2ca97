//! The mesh's address table (`Catalog.Watch`): which service an original
//! destination belongs to, so an app that dials an instance's IP (as it
//! got it from DNS) is balanced over the whole service.

use std::collections::{HashMap, HashSet};
use std::net::IpAddr;
use std::sync::Arc;

use futures::StreamExt;
use tonic::transport::Channel;
use wayfinder_proto::backoff::backoff;
use wayfinder_proto::v1::{CatalogRequest, CatalogUpdate, catalog_client::CatalogClient};

/// Address → service, and the set of service names.
#[derive(Default, Debug)]
pub struct Table {
    by_ip: HashMap<IpAddr, Arc<str>>,
    names: HashSet<Arc<str>>,
}

impl Table {
    /// Builds the table from the control plane's update. An address shared
    /// by several services (all on one host) names none of them: only the
    /// Host header can tell those apart.
    pub fn from_update(u: &CatalogUpdate) -> Self {
        let mut by_ip: HashMap<IpAddr, Option<Arc<str>>> = HashMap::new();
        let mut names = HashSet::new();
        for s in &u.services {
            let name: Arc<str> = s.name.as_str().into();
            names.insert(name.clone());
            for a in &s.addresses {
                let Ok(ip) = a.parse::<IpAddr>() else {
                    continue;
                };
                by_ip
                    .entry(ip)
                    .and_modify(|owner| {
                        if owner.as_ref() != Some(&name) {
                            *owner = None;
                        }
                    })
                    .or_insert_with(|| Some(name.clone()));
            }
        }
        Self {
            by_ip: by_ip
                .into_iter()
                .filter_map(|(ip, s)| Some((ip, s?)))
                .collect(),
            names,
        }
    }

    /// Whether the control plane knows a service of this exact name.
    pub fn knows(&self, name: &str) -> bool {
        self.names.contains(name)
    }

    /// The service whose instances live at `ip`, if exactly one does.
    pub fn service_at(&self, ip: IpAddr) -> Option<Arc<str>> {
        self.by_ip.get(&ip).cloned()
    }

    /// The service a Host header names: `web`, `web:8080`, or a search-domain
    /// form such as `web.lab.` or `web.default.svc` (first label).
    pub fn service_named(&self, host: &str) -> Option<Arc<str>> {
        let name = match host.rsplit_once(':') {
            Some((h, port)) if port.bytes().all(|b| b.is_ascii_digit()) => h,
            _ => host,
        };
        let name = name.trim_end_matches('.').to_ascii_lowercase();
        if let Some(n) = self.names.get(name.as_str()) {
            return Some(n.clone());
        }
        let first = name.split('.').next()?;
        self.names.get(first).cloned()
    }
}

/// The table, kept current by [`watch`]; `None` until the first arrives.
pub struct Catalog {
    table: tokio::sync::watch::Sender<Option<Arc<Table>>>,
    /// Whether [`watch`] runs for it (Host routing is on): then the
    /// sidecar is not ready before the first table.
    watched: std::sync::atomic::AtomicBool,
}

impl Default for Catalog {
    fn default() -> Self {
        Self {
            table: tokio::sync::watch::channel(None).0,
            watched: Default::default(),
        }
    }
}

impl Catalog {
    /// Whether the sidecar still waits for its first table (and needs it).
    pub fn is_pending(&self) -> bool {
        self.watched.load(std::sync::atomic::Ordering::Relaxed) && self.table.borrow().is_none()
    }

    /// The current table (empty before the first).
    pub fn table(&self) -> Arc<Table> {
        self.table.borrow().clone().unwrap_or_default()
    }

    /// Waits (bounded) for the first table, so the first connections after
    /// start-up are not passed through for want of it.
    pub async fn wait_loaded(&self, limit: std::time::Duration) {
        if self.table.borrow().is_some() {
            return;
        }
        let mut rx = self.table.subscribe();
        let _ = tokio::time::timeout(limit, rx.wait_for(Option::is_some)).await;
    }

    fn set(&self, t: Table) {
        self.table.send_replace(Some(Arc::new(t)));
    }
}

/// Keeps `catalog` current forever; while the control plane is away the
/// last table stays in force.
/// The sidecar counts as waiting for the table from this call on, not
/// from the future's first poll.
pub fn watch(
    channel: Channel,
    catalog: Arc<Catalog>,
    node: String,
) -> impl std::future::Future<Output = ()> {
    catalog
        .watched
        .store(true, std::sync::atomic::Ordering::Relaxed);
    keep_current(channel, catalog, node)
}

async fn keep_current(channel: Channel, catalog: Arc<Catalog>, node: String) {
    let mut attempt = 0u32;
    loop {
        let req = CatalogRequest { node: node.clone() };
        match CatalogClient::new(channel.clone()).watch(req).await {
            Ok(resp) => {
                let mut stream = resp.into_inner();
                while let Some(item) = stream.next().await {
                    match item {
                        Ok(update) => {
                            attempt = 0;
                            catalog.set(Table::from_update(&update));
                        }
                        Err(status) => {
                            tracing::warn!(%status, "catalog watch interrupted");
                            break;
                        }
                    }
                }
            }
            Err(status) => {
                tracing::warn!(%status, "cannot watch the catalog; keeping the last table")
            }
        }
        tokio::time::sleep(backoff(attempt)).await;
        attempt = attempt.saturating_add(1);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use wayfinder_proto::v1::CatalogService;

    fn update(services: &[(&str, &[&str])]) -> CatalogUpdate {
        CatalogUpdate {
            version: 1,
            services: services
                .iter()
                .map(|(n, a)| CatalogService {
                    name: n.to_string(),
                    addresses: a.iter().map(|s| s.to_string()).collect(),
                })
                .collect(),
        }
    }

    #[test]
    fn addresses_map_to_their_service_unless_shared() {
        let t = Table::from_update(&update(&[
            ("web", &["10.0.0.1", "10.0.0.2"]),
            ("api", &["10.0.0.3", "10.0.0.2"]),
            ("db", &["not-an-ip"]),
        ]));
        assert_eq!(
            t.service_at("10.0.0.1".parse().expect("test input"))
                .as_deref(),
            Some("web")
        );
        assert_eq!(
            t.service_at("10.0.0.3".parse().expect("test input"))
                .as_deref(),
            Some("api")
        );
        // Two services on one address: the IP alone names neither.
        assert_eq!(t.service_at("10.0.0.2".parse().expect("test input")), None);
        assert_eq!(t.service_at("10.0.0.9".parse().expect("test input")), None);
    }

    #[test]
    fn host_headers_name_services_with_ports_and_domains() {
        let t = Table::from_update(&update(&[("web", &[]), ("api.v2", &[])]));
        for host in [
            "web",
            "WEB:8080",
            "web.lab.",
            "web.default.svc:80",
            "api.v2",
        ] {
            assert!(t.service_named(host).is_some(), "{host}");
        }
        for host in ["www", "10.0.0.1:80", "webby", "[::1]:80"] {
            assert_eq!(t.service_named(host), None, "{host}");
        }
    }
}
