//! `wayfinder.v1.Registry`: Register, KeepAlive, Deregister.

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::{Stream, StreamExt};
use tonic::{Request, Response, Status, Streaming};
use wayfinder_proto::v1::{
    DeregisterRequest, DeregisterResponse, Health, Heartbeat, KeepAliveResponse, RegisterRequest,
    RegisterResponse, deregister_request::Target, registry_server,
};
use wayfinder_proto::validate;

use super::auth::Guard;
use super::{check_size, invalid};
use crate::registry::Registry;
use crate::store::Backend;

/// Serves the Registry API.
pub struct RegistryService {
    backend: Arc<dyn Backend>,
    registry: Arc<Registry>,
    guard: Guard,
    streams: Streams,
}

/// Leases with a KeepAlive stream open on this replica: their sidecar is
/// there. A lease without one belongs to a sidecar that is gone (killed:
/// its connection closed) or not yet heartbeating; the same service may
/// then register the instance again from its new address, as a container
/// recreated after a crash does, instead of waiting out the dead one's
/// lease.
#[derive(Clone, Default)]
struct Streams(Arc<Mutex<HashMap<u64, usize>>>);

impl Streams {
    fn open(&self, lease: u64) -> bool {
        self.0
            .lock()
            .map(|m| m.get(&lease).is_some_and(|n| *n > 0))
            .unwrap_or(true)
    }
}

/// One KeepAlive stream's hold on the leases it heartbeats, let go when
/// the stream ends.
struct Attached {
    streams: Streams,
    leases: Vec<u64>,
}

impl Attached {
    fn attach(&mut self, lease: u64) {
        if self.leases.contains(&lease) {
            return;
        }
        self.leases.push(lease);
        if let Ok(mut m) = self.streams.0.lock() {
            *m.entry(lease).or_default() += 1;
        }
    }
}

impl Drop for Attached {
    fn drop(&mut self) {
        if let Ok(mut m) = self.streams.0.lock() {
            for l in &self.leases {
                if let Some(n) = m.get_mut(l) {
                    *n = n.saturating_sub(1);
                    if *n == 0 {
                        m.remove(l);
                    }
                }
            }
        }
    }
}

impl RegistryService {
    /// A service writing through `backend`; `registry` tells whose a lease
    /// is, `guard` who may act on it.
    pub fn new(backend: Arc<dyn Backend>, registry: Arc<Registry>, guard: Guard) -> Self {
        Self {
            backend,
            registry,
            guard,
            streams: Streams::default(),
        }
    }

    /// [`holds`] for the instance lease `lease_id` keeps; an unknown lease
    /// is the backend's answer to give (NotFound).
    fn holds_lease<T>(
        &self,
        req: &Request<T>,
        rpc: &'static str,
        own: Option<&str>,
        lease_id: u64,
    ) -> Result<(), Status> {
        match self.registry.lease_holder(lease_id) {
            Some((service, id, ..)) => holds(
                &self.registry,
                &self.guard,
                req,
                rpc,
                own,
                &service,
                &id,
                None,
            ),
            None => Ok(()),
        }
    }
}

/// Refuses a sidecar (of service `own`) acting on instance `id` of
/// `service` unless it holds it: the same service, and a leased
/// registration at the sidecar's own address (a static endpoint is the
/// operator's). A certificate names a service, not an instance: the
/// address is what tells two sidecars of one service apart (on one host,
/// loopback, they are one). The operator and `--insecure` callers pass.
/// With `gone` (registering), an instance whose lease has no KeepAlive
/// stream open (its sidecar is gone) may be taken over by its service.
#[allow(clippy::too_many_arguments)]
fn holds<T>(
    registry: &Registry,
    guard: &Guard,
    req: &Request<T>,
    rpc: &'static str,
    own: Option<&str>,
    service: &str,
    id: &str,
    gone: Option<&Streams>,
) -> Result<(), Status> {
    let Some(own) = own else {
        return Ok(());
    };
    guard.same_service(req, rpc, Some(own), service)?;
    let Some(ep) = registry.endpoint(service, id) else {
        return Ok(());
    };
    if ep.lease.is_none() {
        let status = Status::permission_denied(format!(
            "instance {id} of {service} is a static endpoint: the operator's"
        ));
        return Err(guard.refuse(req, rpc, "static_endpoint", status));
    }
    let held_here = match (
        validate::address(&ep.instance.address),
        super::auth::caller(req).1,
    ) {
        (Ok(ip), Some(peer)) => own_address(ip, peer.ip()),
        // No connection info: an in-process caller.
        (_, None) => true,
        (Err(_), Some(_)) => false,
    };
    if held_here {
        return Ok(());
    }
    if let (Some(streams), Some(lease)) = (gone, ep.lease)
        && !streams.open(lease)
    {
        tracing::info!(%service, instance = %id, was = %ep.instance.address, "its sidecar is gone: registered again from a new address");
        return Ok(());
    }
    let status = Status::permission_denied(format!(
        "instance {id} of {service} is held by the sidecar at {}",
        ep.instance.address
    ));
    Err(guard.refuse(req, rpc, "not_holder", status))
}

/// The health a request names, or `InvalidArgument` for an unknown value.
pub fn health(v: i32) -> Result<Health, Status> {
    Health::try_from(v)
        .map_err(|_| Status::invalid_argument(format!("health {v} is not a known value")))
}

/// Whether a sidecar calling from `peer` may register `ip`.
fn own_address(ip: std::net::IpAddr, peer: std::net::IpAddr) -> bool {
    let (ip, peer) = (ip.to_canonical(), peer.to_canonical());
    ip == peer || (ip.is_loopback() && peer.is_loopback())
}

type KeepAliveStream = Pin<Box<dyn Stream<Item = Result<KeepAliveResponse, Status>> + Send>>;

#[tonic::async_trait]
impl registry_server::Registry for RegistryService {
    async fn register(
        &self,
        req: Request<RegisterRequest>,
    ) -> Result<Response<RegisterResponse>, Status> {
        let own = self.guard.member(&req, "Register")?;
        check_size(req.get_ref())?;
        if own.is_some() && req.get_ref().static_endpoint {
            return Err(self
                .guard
                .operator_only(&req, "Register", "a static endpoint"));
        }
        if let Some(i) = &req.get_ref().instance {
            self.guard
                .same_service(&req, "Register", own.as_deref(), &i.service)?;
        }
        // A sidecar registers the address it calls from: its certificate
        // proves the service, not where it lives. Without this a holder of
        // `web`'s identity could point every caller at 169.254.169.254, or
        // claim another workload's address in the catalog. On one host
        // (loopback to loopback) any loopback address is its own. (An
        // address that does not parse is refused below as invalid.)
        if own.is_some()
            && let (Some(peer), Some(i)) = (super::auth::caller(&req).1, &req.get_ref().instance)
            && let Ok(ip) = validate::address(&i.address)
            && !own_address(ip, peer.ip())
        {
            let status = Status::permission_denied(format!(
                "a sidecar registers the address it connects from ({}), not {ip}",
                peer.ip()
            ));
            return Err(self
                .guard
                .refuse(&req, "Register", "foreign_address", status));
        }
        // Not over another sidecar's live registration of that instance.
        if let Some(i) = &req.get_ref().instance
            && !i.instance_id.is_empty()
        {
            holds(
                &self.registry,
                &self.guard,
                &req,
                "Register",
                own.as_deref(),
                &i.service,
                &i.instance_id,
                Some(&self.streams),
            )?;
        }
        let req = req.into_inner();
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
        let own = self.guard.member(&req, "KeepAlive")?;
        let backend = self.backend.clone();
        let registry = self.registry.clone();
        let guard = self.guard.clone();
        // Kept for refusals' log lines (the stream's items have no peer).
        let mut probe = Request::new(());
        if let Some(p) = req.extensions().get::<super::auth::Peer>() {
            probe.extensions_mut().insert(p.clone());
        }
        let probe = Arc::new(probe);
        let beats = req.into_inner();
        // Each heartbeat is answered in order; the first bad one ends the
        // stream with its status, which tells the sidecar what to do.
        let out = beats
            .then(move |beat| {
                let backend = backend.clone();
                let (registry, guard, own, probe) =
                    (registry.clone(), guard.clone(), own.clone(), probe.clone());
                async move {
                    let beat = beat?;
                    if let Some((service, id, ..)) = registry.lease_holder(beat.lease_id) {
                        holds(
                            &registry,
                            &guard,
                            &probe,
                            "KeepAlive",
                            own.as_deref(),
                            &service,
                            &id,
                            None,
                        )?;
                    }
                    let h = health(beat.health)?;
                    let ttl = backend.heartbeat(beat.lease_id, h).await?;
                    Ok(KeepAliveResponse {
                        lease_id: beat.lease_id,
                        ttl_ms: u32::try_from(ttl.as_millis()).unwrap_or(u32::MAX),
                    })
                }
            })
            .scan(
                (
                    false,
                    Attached {
                        streams: self.streams.clone(),
                        leases: Vec::new(),
                    },
                ),
                |(failed, attached), item: Result<KeepAliveResponse, Status>| {
                    if *failed {
                        return futures::future::ready(None);
                    }
                    *failed = item.is_err();
                    if let Ok(r) = &item {
                        attached.attach(r.lease_id);
                    }
                    futures::future::ready(Some(item))
                },
            );
        Ok(Response::new(Box::pin(out)))
    }

    async fn deregister(
        &self,
        req: Request<DeregisterRequest>,
    ) -> Result<Response<DeregisterResponse>, Status> {
        let own = self.guard.member(&req, "Deregister")?;
        match &req.get_ref().target {
            Some(Target::LeaseId(id)) => {
                self.holds_lease(&req, "Deregister", own.as_deref(), *id)?;
            }
            // Sidecars deregister their leases; endpoints by address are
            // static ones, the operator's.
            Some(Target::Endpoint(_)) if own.is_some() => {
                return Err(self.guard.operator_only(
                    &req,
                    "Deregister",
                    "deregistering by address",
                ));
            }
            _ => {}
        }
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

#[cfg(test)]
mod tests {
    use super::own_address;

    #[test]
    fn a_sidecar_owns_the_address_it_calls_from_and_loopback_on_its_host() {
        let ip = |s: &str| s.parse().expect("ip");
        assert!(own_address(ip("10.0.0.7"), ip("10.0.0.7")));
        assert!(own_address(ip("10.0.0.7"), ip("::ffff:10.0.0.7")));
        assert!(own_address(ip("127.0.0.11"), ip("127.0.0.1")));
        assert!(!own_address(ip("10.0.0.8"), ip("10.0.0.7")));
        assert!(!own_address(ip("169.254.169.254"), ip("127.0.0.1")));
        assert!(!own_address(ip("127.0.0.1"), ip("10.0.0.7")));
    }
}
