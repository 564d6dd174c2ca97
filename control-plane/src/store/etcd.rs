//! etcd as the store shared by several wf-control replicas.
//!
//! Keys under the prefix (default `/wayfinder/`):
//! - `endpoints/SERVICE/INSTANCE`: a [`PersistedEndpoint`] as JSON. A leased
//!   registration is attached to an etcd lease, and the etcd lease id *is*
//!   the sidecar's lease id, so any replica can renew it and etcd expires it
//!   even when the replica that granted it is gone.
//! - `policies/SERVICE`: a `ServicePolicy` as JSON.
//! - `ca/SHA256`: a replica CA's root certificate (DER). Every replica's
//!   trust bundle is its own root plus these; private keys never leave a
//!   replica.
//!
//! Every change is one etcd transaction (a lease grant or revoke aside).
//! Writes go to etcd first; a replica's registry changes only through one
//! watch on the prefix, so every replica applies the same changes in the same
//! order with etcd's revisions as versions. A sidecar that moves to another
//! replica therefore resumes its watches by version, without a snapshot of
//! everything. A write is answered once the watch has brought it back (the
//! caller then reads its own write). No replica leads: each serves its own
//! sidecars from its mirror. A replica that loses etcd keeps serving what it
//! has and reports not ready; when etcd is back it reads the prefix again and
//! pushes only the differences.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use etcd_client::{
    Client, Compare, CompareOp, ConnectOptions, EventType, GetOptions, KeyValue,
    LeaseKeepAliveStream, LeaseKeeper, PutOptions, Txn, TxnOp, TxnOpResponse, WatchOptions,
};
use thiserror::Error;
use tokio::sync::{Notify, watch};
use wayfinder_proto::dial::Failover;
use wayfinder_proto::v1::{Health, Instance, ServicePolicy};

use super::{Backend, BackendError, Persisted, PersistedEndpoint, PersistedService, Record};
use crate::registry::{LeaseConfig, Registered, Registry, RegistryError};

/// The default key prefix.
pub const DEFAULT_PREFIX: &str = "/wayfinder/";
/// How long start-up waits for etcd before giving up.
const START_TIMEOUT: Duration = Duration::from_secs(5);
/// How long one request to etcd may take before it is tried again.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(2);
/// How long a write waits to come back through the watch.
const APPLY_TIMEOUT: Duration = Duration::from_secs(5);
/// Largest response read from etcd (the whole prefix at start).
const READ_LIMIT: usize = 256 << 20;

/// etcd could not be used at start.
#[derive(Debug, Error)]
pub enum EtcdError {
    /// `--store` is not `etcd://HOST:PORT[,HOST:PORT...]`.
    #[error("{0:?}: expected \"embedded\" or etcd://HOST:PORT[,HOST:PORT...]")]
    BadSpec(String),
    /// No member answered.
    #[error("etcd at {endpoints} is unreachable: {message}")]
    Unreachable {
        /// The members tried.
        endpoints: String,
        /// Why.
        message: String,
    },
}

fn urls(members: &[(String, u16)]) -> Vec<String> {
    members
        .iter()
        .map(|(h, p)| format!("http://{h}:{p}"))
        .collect()
}

/// The members of `etcd://HOST:PORT[,HOST:PORT...]`.
pub(super) fn parse_members(spec: &str) -> Result<Vec<(String, u16)>, EtcdError> {
    let bad = || EtcdError::BadSpec(spec.to_string());
    let list = spec.strip_prefix("etcd://").ok_or_else(bad)?;
    let members: Vec<(String, u16)> = list
        .split(',')
        .map(str::trim)
        .filter(|m| !m.is_empty())
        .map(|m| {
            let (host, port) = m.rsplit_once(':').ok_or_else(bad)?;
            let port = port.parse::<u16>().map_err(|_| bad())?;
            if host.is_empty() || m.contains('/') {
                return Err(bad());
            }
            Ok((host.to_string(), port))
        })
        .collect::<Result<_, _>>()?;
    if members.is_empty() {
        return Err(bad());
    }
    Ok(members)
}

/// What one key under the prefix is.
#[derive(Debug, PartialEq)]
enum Key<'a> {
    Endpoint { service: &'a str, instance: &'a str },
    Policy { service: &'a str },
    Root { sha256: &'a str },
}

fn parse_key<'a>(prefix: &str, key: &'a str) -> Option<Key<'a>> {
    let rest = key.strip_prefix(prefix)?;
    if let Some(r) = rest.strip_prefix("endpoints/") {
        let (service, instance) = r.split_once('/')?;
        return Some(Key::Endpoint { service, instance });
    }
    if let Some(service) = rest.strip_prefix("policies/") {
        return Some(Key::Policy { service });
    }
    rest.strip_prefix("ca/").map(|sha256| Key::Root { sha256 })
}

/// The etcd backend of one replica.
pub struct Etcd {
    client: Client,
    prefix: String,
    members: String,
    registry: Arc<Registry>,
    leases: LeaseConfig,
    own_roots: Vec<Vec<u8>>,
    roots: Mutex<BTreeMap<String, Vec<u8>>>,
    /// The last revision applied to the registry.
    applied: watch::Sender<u64>,
    /// Asks the watch for a progress report (a write's revision may not be
    /// ours to see, e.g. a lease revoked with no keys).
    progress: Notify,
    ready: AtomicBool,
    keepers: Mutex<HashMap<i64, Arc<tokio::sync::Mutex<Keeper>>>>,
}

type Keeper = (LeaseKeeper, LeaseKeepAliveStream);

fn unavailable(e: etcd_client::Error) -> BackendError {
    BackendError::Unavailable(e.to_string())
}

/// Runs `op` again on transport failures and timeouts: the connection moves
/// to another member when its member died, and a member that lost its leader
/// answers once a new one is elected. Every write retried here is idempotent
/// (a put of the same value, a delete) or harmless (a lease granted twice
/// expires unused).
async fn retry<T, F, Fut>(mut op: F) -> Result<T, etcd_client::Error>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, etcd_client::Error>>,
{
    let mut attempt = 0u32;
    loop {
        match op().await {
            Err(e) if attempt < 4 && transient(&e) => {
                attempt += 1;
                tokio::time::sleep(Duration::from_millis(100) * attempt).await;
            }
            r => return r,
        }
    }
}

fn transient(e: &etcd_client::Error) -> bool {
    match e {
        etcd_client::Error::TransportError(_) => true,
        etcd_client::Error::GRpcStatus(s) => matches!(
            s.code(),
            tonic::Code::Unavailable | tonic::Code::Cancelled | tonic::Code::DeadlineExceeded
        ),
        _ => false,
    }
}

fn revision(header: Option<&etcd_client::ResponseHeader>) -> u64 {
    header.map_or(0, |h| u64::try_from(h.revision()).unwrap_or(0))
}

/// The JSON value of `key`; a value no replica could have written is
/// skipped with a warning rather than stopping the mirror.
fn read_json<T: serde::de::DeserializeOwned>(key: &str, value: &[u8]) -> Option<T> {
    serde_json::from_slice(value)
        .inspect_err(|e| tracing::warn!(%key, error = %e, "ignoring an unreadable value in etcd"))
        .ok()
}

/// The service `name` being read, versioned by its newest key.
fn service_entry<'a>(
    services: &'a mut BTreeMap<String, PersistedService>,
    name: &str,
    version: u64,
) -> &'a mut PersistedService {
    let s = services
        .entry(name.to_string())
        .or_insert_with(|| PersistedService {
            name: name.to_string(),
            version: 0,
            policy: None,
            endpoints: Vec::new(),
        });
    s.version = s.version.max(version);
    s
}

impl Etcd {
    /// Connects to the members of `spec`, publishes this replica's CA roots,
    /// reads the prefix into `registry` (a [`Registry::mirror`]) and starts
    /// following it. Fails when etcd does not answer within a few seconds.
    pub async fn start(
        targets: Vec<(String, u16)>,
        prefix: &str,
        registry: Arc<Registry>,
        leases: LeaseConfig,
        own_roots: Vec<Vec<u8>>,
    ) -> Result<Arc<Self>, EtcdError> {
        let members = urls(&targets);
        let unreachable = |message: String| EtcdError::Unreachable {
            endpoints: members.join(","),
            message,
        };
        // One connection, to one member at a time: when it breaks, the
        // failover connector moves to the next member. (etcd-client's own
        // balanced channel kept sending requests to a member that had died,
        // which then hung until their timeout.) HTTP/2 pings notice a member
        // that is cut off rather than gone.
        // A request forwarded to a leader that just died waits for etcd's
        // own timeout (seconds); a short one here and a retry go to the new
        // leader instead.
        let channel = tonic::transport::Endpoint::from_shared(members[0].clone())
            .map_err(|e| unreachable(e.to_string()))?
            .timeout(REQUEST_TIMEOUT)
            .tcp_nodelay(true)
            .http2_keep_alive_interval(Duration::from_secs(2))
            .keep_alive_timeout(Duration::from_secs(2))
            .keep_alive_while_idle(true)
            .connect_with_connector_lazy(Failover::new(targets, None));
        let client = tokio::time::timeout(
            START_TIMEOUT,
            Client::from_channel(
                etcd_client::Channel::Tonic(channel),
                // Members without a leader refuse at once instead of waiting.
                Some(ConnectOptions::new().with_require_leader(true)),
            ),
        )
        .await
        .map_err(|_| unreachable("no answer".into()))?
        .map_err(|e| unreachable(e.to_string()))?;
        let prefix = if prefix.ends_with('/') {
            prefix.to_string()
        } else {
            format!("{prefix}/")
        };
        let me = Arc::new(Self {
            client,
            prefix,
            members: members.join(","),
            registry,
            leases,
            own_roots,
            roots: Mutex::default(),
            applied: watch::channel(0).0,
            progress: Notify::new(),
            ready: AtomicBool::new(false),
            keepers: Mutex::default(),
        });
        let rev = tokio::time::timeout(START_TIMEOUT, async {
            me.publish_roots().await?;
            me.load().await
        })
        .await
        .map_err(|_| unreachable("no answer".into()))?
        .map_err(|e| unreachable(e.to_string()))?;
        me.ready.store(true, Ordering::Relaxed);
        tokio::spawn(me.clone().follow(rev + 1));
        tokio::spawn(me.clone().prune_keepers());
        Ok(me)
    }

    fn endpoint_key(&self, service: &str, instance: &str) -> String {
        format!("{}endpoints/{service}/{instance}", self.prefix)
    }

    fn policy_key(&self, service: &str) -> String {
        format!("{}policies/{service}", self.prefix)
    }

    /// Puts this replica's roots under `ca/`, unless already there.
    async fn publish_roots(&self) -> Result<(), etcd_client::Error> {
        for der in &self.own_roots {
            let d = ring::digest::digest(&ring::digest::SHA256, der);
            let hex: String = d.as_ref().iter().map(|b| format!("{b:02x}")).collect();
            let key = format!("{}ca/{hex}", self.prefix);
            let txn = Txn::new()
                .when([Compare::create_revision(key.clone(), CompareOp::Equal, 0)])
                .and_then([TxnOp::put(key, der.clone(), None)]);
            self.txn(txn).await?;
        }
        Ok(())
    }

    /// Reads the whole prefix and makes the registry equal to it. Returns the
    /// revision read.
    async fn load(&self) -> Result<i64, etcd_client::Error> {
        let mut kv = self
            .client
            .kv_client()
            .max_decoding_message_size(READ_LIMIT);
        let resp = kv
            .get(self.prefix.clone(), Some(GetOptions::new().with_prefix()))
            .await?;
        let rev = resp.header().map_or(0, |h| h.revision());
        let mut services: BTreeMap<String, PersistedService> = BTreeMap::new();
        let mut roots = BTreeMap::new();
        for kv in resp.kvs() {
            let Ok(key) = kv.key_str() else { continue };
            let Some(parsed) = parse_key(&self.prefix, key) else {
                continue;
            };
            let version = u64::try_from(kv.mod_revision()).unwrap_or(0);
            match parsed {
                Key::Endpoint { service: name, .. } => {
                    if let Some(e) = read_json::<PersistedEndpoint>(key, kv.value()) {
                        service_entry(&mut services, name, version)
                            .endpoints
                            .push(e);
                    }
                }
                Key::Policy { service: name } => {
                    if let Some(p) = read_json::<ServicePolicy>(key, kv.value()) {
                        service_entry(&mut services, name, version).policy = Some(p);
                    }
                }
                Key::Root { sha256 } => {
                    roots.insert(sha256.to_string(), kv.value().to_vec());
                }
            }
        }
        let state = Persisted {
            version: u64::try_from(rev).unwrap_or(0),
            next_lease: 0,
            services: services.into_values().collect(),
        };
        self.registry.reset(state.version, state);
        *self.roots.lock().unwrap_or_else(|p| p.into_inner()) = roots;
        self.update_bundle();
        self.applied
            .send_modify(|a| *a = (*a).max(u64::try_from(rev).unwrap_or(0)));
        Ok(rev)
    }

    fn update_bundle(&self) {
        let mut bundle = self.own_roots.clone();
        for der in self
            .roots
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .values()
        {
            if !bundle.contains(der) {
                bundle.push(der.clone());
            }
        }
        self.registry.set_trust_bundle(bundle);
    }

    /// Follows the prefix from revision `from` forever: on a broken watch it
    /// reports not ready, reads the prefix again when etcd answers, and goes on.
    async fn follow(self: Arc<Self>, mut from: i64) {
        let mut backoff = Duration::from_millis(50);
        loop {
            let why = self.watch_from(from).await;
            if self.ready.swap(false, Ordering::Relaxed) {
                tracing::warn!(etcd = %self.members, error = %why, "lost etcd; serving what this replica has");
            }
            loop {
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(1));
                match self.load().await {
                    Ok(rev) => {
                        from = rev + 1;
                        backoff = Duration::from_millis(50);
                        self.ready.store(true, Ordering::Relaxed);
                        tracing::info!(etcd = %self.members, revision = rev, "caught up with etcd");
                        break;
                    }
                    Err(e) => tracing::debug!(error = %e, "etcd still unreachable"),
                }
            }
        }
    }

    /// Applies the watch's events until it breaks; returns why it broke.
    async fn watch_from(&self, from: i64) -> String {
        let mut client = self
            .client
            .watch_client()
            .max_decoding_message_size(READ_LIMIT);
        let options = WatchOptions::new().with_prefix().with_start_revision(from);
        let mut stream = match client.watch(self.prefix.clone(), Some(options)).await {
            Ok(s) => s,
            Err(e) => return e.to_string(),
        };
        loop {
            tokio::select! {
                msg = stream.message() => {
                    let resp = match msg {
                        Ok(Some(r)) => r,
                        Ok(None) => return "the watch ended".into(),
                        Err(e) => return e.to_string(),
                    };
                    if resp.canceled() {
                        return format!("the watch was cancelled: {} (compacted at {})", resp.cancel_reason(), resp.compact_revision());
                    }
                    if resp.created() {
                        continue;
                    }
                    if resp.events().is_empty() {
                        // A progress report: every event up to its revision was sent.
                        let rev = revision(resp.header());
                        self.applied.send_modify(|a| *a = (*a).max(rev));
                        continue;
                    }
                    self.apply_events(resp.events());
                }
                () = self.progress.notified() => {
                    if let Err(e) = stream.request_progress().await {
                        return e.to_string();
                    }
                }
            }
        }
    }

    /// Applies events, one registry change per revision (one etcd transaction).
    fn apply_events(&self, events: &[etcd_client::Event]) {
        let mut records = Vec::new();
        let mut rev = 0u64;
        let mut roots_changed = false;
        for ev in events {
            let Some(kv) = ev.kv() else { continue };
            let r = u64::try_from(kv.mod_revision()).unwrap_or(0);
            if r != rev && !records.is_empty() {
                self.registry.apply(rev, std::mem::take(&mut records));
            }
            rev = r;
            let put = ev.event_type() == EventType::Put;
            roots_changed |= self.record_of(kv, put, &mut records);
        }
        if !records.is_empty() {
            self.registry.apply(rev, records);
        }
        if roots_changed {
            self.update_bundle();
        }
        self.applied.send_modify(|a| *a = (*a).max(rev));
    }

    /// Turns one event into a record; returns whether it changed the roots.
    fn record_of(&self, kv: &KeyValue, put: bool, records: &mut Vec<Record>) -> bool {
        let Ok(key) = kv.key_str() else { return false };
        match parse_key(&self.prefix, key) {
            Some(Key::Endpoint { service, .. }) if put => {
                if let Some(endpoint) = read_json::<PersistedEndpoint>(key, kv.value()) {
                    records.push(Record::PutEndpoint {
                        service: service.to_string(),
                        endpoint,
                    });
                }
            }
            Some(Key::Endpoint { service, instance }) => records.push(Record::DeleteEndpoint {
                service: service.to_string(),
                instance_id: instance.to_string(),
            }),
            Some(Key::Policy { service }) => records.push(Record::Policy {
                service: service.to_string(),
                policy: if put {
                    read_json::<ServicePolicy>(key, kv.value()).map(Box::new)
                } else {
                    None
                },
            }),
            Some(Key::Root { sha256 }) => {
                let mut roots = self.roots.lock().unwrap_or_else(|p| p.into_inner());
                if put {
                    roots.insert(sha256.to_string(), kv.value().to_vec());
                } else {
                    roots.remove(sha256);
                }
                return true;
            }
            None => {}
        }
        false
    }

    /// Waits until the registry has applied revision `rev`.
    async fn applied(&self, rev: u64) -> Result<(), BackendError> {
        let mut rx = self.applied.subscribe();
        let wait = async {
            loop {
                match tokio::time::timeout(Duration::from_millis(100), rx.wait_for(|a| *a >= rev))
                    .await
                {
                    Ok(_) => return,
                    Err(_) => self.progress.notify_one(),
                }
            }
        };
        tokio::time::timeout(APPLY_TIMEOUT, wait)
            .await
            .map_err(|_| BackendError::NotDurable)
    }

    /// Renews etcd lease `id` once; returns its remaining TTL (0: gone).
    async fn keep_alive(&self, id: i64) -> Result<i64, etcd_client::Error> {
        let existing = self
            .keepers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&id)
            .cloned();
        let keeper = match existing {
            Some(k) => k,
            None => {
                let k = Arc::new(tokio::sync::Mutex::new(
                    self.client.lease_client().keep_alive(id).await?,
                ));
                self.keepers
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .insert(id, k.clone());
                k
            }
        };
        let mut k = keeper.lock().await;
        let result = async {
            k.0.keep_alive().await?;
            k.1.message().await
        }
        .await;
        let ttl = match result {
            Ok(Some(r)) => r.ttl(),
            Ok(None) => 0,
            Err(e) => {
                self.forget_keeper(id);
                return Err(e);
            }
        };
        if ttl <= 0 {
            self.forget_keeper(id);
        }
        Ok(ttl)
    }

    fn forget_keeper(&self, id: i64) {
        self.keepers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&id);
    }

    /// Drops keep-alive streams of leases that no longer exist.
    async fn prune_keepers(self: Arc<Self>) {
        let mut tick = tokio::time::interval(Duration::from_secs(30));
        loop {
            tick.tick().await;
            let registry = self.registry.clone();
            self.keepers
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .retain(|id, _| registry.lease_holder(*id as u64).is_some());
        }
    }

    async fn txn(&self, txn: Txn) -> Result<etcd_client::TxnResponse, etcd_client::Error> {
        retry(|| {
            let mut kv = self.client.kv_client();
            let txn = txn.clone();
            async move { kv.txn(txn).await }
        })
        .await
    }

    fn endpoint_json(e: &PersistedEndpoint) -> Result<Vec<u8>, BackendError> {
        serde_json::to_vec(e).map_err(|e| BackendError::Unavailable(e.to_string()))
    }
}

#[tonic::async_trait]
impl Backend for Etcd {
    async fn register(
        &self,
        instance: Instance,
        static_endpoint: bool,
        ttl: Option<Duration>,
        health: Health,
    ) -> Result<Registered, BackendError> {
        let (service, id) = (instance.service.clone(), instance.instance_id.clone());
        if static_endpoint && matches!(self.registry.lease_of(&service, &id), Some(Some(_))) {
            return Err(RegistryError::Conflict(id).into());
        }
        let lease = if static_endpoint {
            None
        } else {
            let ttl = ttl
                .unwrap_or(self.leases.default_ttl)
                .clamp(self.leases.min_ttl, self.leases.max_ttl);
            // etcd leases count whole seconds, and etcd may raise the TTL
            // to its minimum; the sidecar is told what was granted.
            let secs = ttl.as_secs() + u64::from(ttl.subsec_nanos() > 0);
            let secs_i64 = i64::try_from(secs).unwrap_or(i64::MAX);
            // Our own random id, not etcd's (which counts up from the
            // member's id): a caller must not guess another's lease.
            let id = i64::try_from(crate::registry::random_lease_id()).unwrap_or(1);
            let granted = retry(|| {
                let mut leases = self.client.lease_client();
                let options = etcd_client::LeaseGrantOptions::new().with_id(id);
                async move { leases.grant(secs_i64, Some(options)).await }
            })
            .await
            .map_err(unavailable)?;
            let ttl = Duration::from_secs(u64::try_from(granted.ttl()).unwrap_or(secs));
            Some((granted.id(), ttl))
        };
        let endpoint = PersistedEndpoint {
            instance,
            health,
            version: 0,
            lease: lease.map(|(l, _)| l as u64),
            ttl_ms: lease.map(|(_, t)| u32::try_from(t.as_millis()).unwrap_or(u32::MAX)),
        };
        let mut options = PutOptions::new().with_prev_key();
        if let Some((l, _)) = lease {
            options = options.with_lease(l);
        }
        let txn = Txn::new().and_then([TxnOp::put(
            self.endpoint_key(&service, &id),
            Self::endpoint_json(&endpoint)?,
            Some(options),
        )]);
        let resp = self.txn(txn).await.map_err(unavailable)?;
        let version = revision(resp.header());
        // A sidecar registering again replaces its old lease, which now holds
        // no key: revoke it rather than let it linger until its TTL.
        let previous = resp.op_responses().into_iter().find_map(|r| match r {
            TxnOpResponse::Put(p) => p.prev_key().map(KeyValue::lease),
            _ => None,
        });
        if let Some(old) = previous.filter(|l| *l != 0 && Some(*l) != lease.map(|(l, _)| l)) {
            let mut leases = self.client.lease_client();
            tokio::spawn(async move {
                let _ = leases.revoke(old).await;
            });
        }
        self.applied(version).await?;
        Ok(Registered {
            lease_id: lease.map_or(0, |(l, _)| l as u64),
            ttl: lease.map_or(Duration::ZERO, |(_, t)| t),
            instance_id: id,
            version,
        })
    }

    async fn heartbeat(&self, lease_id: u64, health: Health) -> Result<Duration, BackendError> {
        let (service, id, ttl, known) = self
            .registry
            .lease_holder(lease_id)
            .ok_or(RegistryError::UnknownLease(lease_id))?;
        let etcd_id = i64::try_from(lease_id).map_err(|_| RegistryError::UnknownLease(lease_id))?;
        match self.keep_alive(etcd_id).await {
            Ok(0) => return Err(RegistryError::UnknownLease(lease_id).into()),
            Ok(_) => {}
            // Keep the sidecar: its registration stays served from here, and
            // it registers again if etcd expired the lease meanwhile.
            Err(e) => {
                tracing::debug!(lease = lease_id, error = %e, "cannot renew the lease in etcd");
                return Ok(ttl);
            }
        }
        if health != known
            && let Some(mut endpoint) = self.registry.endpoint(&service, &id)
        {
            endpoint.health = health;
            let key = self.endpoint_key(&service, &id);
            // Only while the key is still this lease's: a newer registration wins.
            let txn = Txn::new()
                .when([Compare::lease(key.clone(), CompareOp::Equal, etcd_id)])
                .and_then([TxnOp::put(
                    key,
                    Self::endpoint_json(&endpoint)?,
                    Some(PutOptions::new().with_lease(etcd_id)),
                )]);
            if let Err(e) = self.txn(txn).await {
                tracing::debug!(lease = lease_id, error = %e, "cannot record health in etcd");
            }
        }
        Ok(ttl)
    }

    async fn deregister_lease(&self, lease_id: u64) -> Result<u64, BackendError> {
        if self.registry.lease_holder(lease_id).is_none() {
            return Err(RegistryError::UnknownLease(lease_id).into());
        }
        let etcd_id = i64::try_from(lease_id).map_err(|_| RegistryError::UnknownLease(lease_id))?;
        let resp = match retry(|| {
            let mut leases = self.client.lease_client();
            async move { leases.revoke(etcd_id).await }
        })
        .await
        {
            Ok(r) => r,
            Err(etcd_client::Error::GRpcStatus(s)) if s.message().contains("not found") => {
                return Err(RegistryError::UnknownLease(lease_id).into());
            }
            Err(e) => return Err(unavailable(e)),
        };
        self.forget_keeper(etcd_id);
        let version = revision(resp.header());
        self.applied(version).await?;
        Ok(version)
    }

    async fn deregister_address(
        &self,
        service: &str,
        address: &str,
        port: u32,
    ) -> Result<u64, BackendError> {
        let id = self.registry.static_instance(service, address, port)?;
        let key = self.endpoint_key(service, &id);
        let txn = Txn::new()
            .when([Compare::lease(key.clone(), CompareOp::Equal, 0)])
            .and_then([TxnOp::delete(key, None)]);
        let resp = self.txn(txn).await.map_err(unavailable)?;
        if !resp.succeeded() {
            return Err(RegistryError::Conflict(id).into());
        }
        let version = revision(resp.header());
        self.applied(version).await?;
        Ok(version)
    }

    async fn apply_policies(
        &self,
        policies: Vec<ServicePolicy>,
    ) -> Result<(u64, Vec<String>), BackendError> {
        let mut ops = Vec::new();
        let mut changed = BTreeSet::new();
        for p in policies {
            if self.registry.policy(&p.service).as_ref() == Some(&p) {
                continue;
            }
            let json =
                serde_json::to_vec(&p).map_err(|e| BackendError::Unavailable(e.to_string()))?;
            ops.push(TxnOp::put(self.policy_key(&p.service), json, None));
            changed.insert(p.service);
        }
        if ops.is_empty() {
            return Ok((self.registry.version(), Vec::new()));
        }
        let resp = self
            .txn(Txn::new().and_then(ops))
            .await
            .map_err(unavailable)?;
        let version = revision(resp.header());
        self.applied(version).await?;
        Ok((version, changed.into_iter().collect()))
    }

    async fn remove_policy(&self, service: &str) -> Result<bool, BackendError> {
        if self.registry.policy(service).is_none() {
            return Ok(false);
        }
        let txn = Txn::new().and_then([TxnOp::delete(self.policy_key(service), None)]);
        let resp = self.txn(txn).await.map_err(unavailable)?;
        self.applied(revision(resp.header())).await?;
        Ok(true)
    }

    fn ready(&self) -> bool {
        self.ready.load(Ordering::Relaxed)
    }

    fn describe(&self) -> String {
        format!("etcd at {} under {}", self.members, self.prefix)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn specs_parse_into_member_urls_or_are_refused() {
        assert_eq!(
            urls(&parse_members("etcd://127.0.0.1:2379,10.0.0.2:2379").expect("valid")),
            vec!["http://127.0.0.1:2379", "http://10.0.0.2:2379"]
        );
        assert_eq!(
            urls(&parse_members("etcd://etcd:2379").expect("valid")),
            vec!["http://etcd:2379"]
        );
        for bad in [
            "etcd://",
            "http://x:1",
            "etcd://host",
            "etcd://h:99999",
            "etcd://h:1/x",
        ] {
            assert!(parse_members(bad).is_err(), "{bad} refused");
            assert!(
                bad.parse::<super::super::StoreSpec>().is_err(),
                "{bad} refused"
            );
        }
    }

    #[test]
    fn keys_parse_by_kind() {
        let p = "/wayfinder/";
        assert_eq!(
            parse_key(p, "/wayfinder/endpoints/web/web-1"),
            Some(Key::Endpoint {
                service: "web",
                instance: "web-1"
            })
        );
        assert_eq!(
            parse_key(p, "/wayfinder/endpoints/web/10.0.0.1:80"),
            Some(Key::Endpoint {
                service: "web",
                instance: "10.0.0.1:80"
            })
        );
        assert_eq!(
            parse_key(p, "/wayfinder/policies/web"),
            Some(Key::Policy { service: "web" })
        );
        assert_eq!(
            parse_key(p, "/wayfinder/ca/ab12"),
            Some(Key::Root { sha256: "ab12" })
        );
        assert_eq!(parse_key(p, "/other/endpoints/web/x"), None);
        assert_eq!(parse_key(p, "/wayfinder/endpoints/web"), None);
    }
}
