//! The route behind the `mesh+hedging` way. Its requests go through the
//! same client sidecar as `mesh`'s but carry `x-wayfinder-lab-way:
//! mesh+hedging`; a route of the service's policy matching that header
//! hedges them after the p95 of the service's recent latency and sends
//! them where the service's own requests go. The `mesh` way's requests
//! match no route and are served as before, so the two rows differ by
//! hedging alone.
//!
//! The lab adds the route to whatever policy the service has (read, add,
//! apply, as a fault event does): through the Admin API on loopback, with
//! `wfctl policy get` / `apply` in the control plane's container on Docker.
//! `deploy/policy.toml` carries the same route for `deploy/lab.sh`.

use anyhow::{Context, Result};
use wayfinder_proto::policy::{PolicyFile, Route, Routes, ServicePolicy};

use super::load::{LAB_WAY_HEADER, Way};

/// The route's name in the policy, metrics and traces.
pub const ROUTE_NAME: &str = "lab-mesh-hedging";

/// The route for `service`. Its backend is the service itself, i.e. every
/// instance under the service's balancer: a route's `subset = {}` would
/// say the same, but the wire form cannot carry an empty subset.
pub fn route(service: &str) -> Result<Route> {
    let (name, value) = Way::MeshHedging
        .header()
        .context("the hedged way has a header")?;
    debug_assert_eq!(name, LAB_WAY_HEADER);
    let text = format!(
        "[[services.{service}.routes]]\n\
         name = \"{ROUTE_NAME}\"\n\
         match = {{ headers = {{ \"{name}\" = \"{value}\" }} }}\n\
         backends = [{{ service = \"{service}\" }}]\n\
         hedging = {{ after = \"p95\" }}\n"
    );
    let mut file = PolicyFile::parse("(the hedged way's route)", &text)?;
    file.services
        .values_mut()
        .next()
        .and_then(|p| p.routes.take())
        .and_then(|r| r.as_slice().first().cloned())
        .context("the hedged way's route")
}

/// `policy` with the route first (first match wins, so a catch-all route
/// of the service cannot take the hedged way's requests), replacing an
/// earlier copy of it.
pub fn add_route(policy: &mut ServicePolicy, service: &str) -> Result<()> {
    let mut routes: Vec<Route> = policy.routes.take().map(Vec::from).unwrap_or_default();
    routes.retain(|r| r.name.as_str() != ROUTE_NAME);
    routes.insert(0, route(service)?);
    policy.routes = Some(
        Routes::try_from(routes)
            .map_err(|e| anyhow::anyhow!("{service}'s routes with the hedged way's: {e}"))?,
    );
    Ok(())
}

/// The policy file `wfctl policy get SERVICE` printed (empty: the service
/// has none), with the route added: what `wfctl policy apply` then takes.
pub fn add_to_file(got: &str, service: &str) -> Result<String> {
    let mut file = PolicyFile::parse("wfctl policy get", got)?;
    let name = wayfinder_proto::policy::ServiceName::try_from(service.to_string())
        .map_err(|e| anyhow::anyhow!("{service:?}: {e}"))?;
    add_route(file.services.entry(name).or_default(), service)?;
    Ok(file.to_toml())
}

/// Adds the route to `service`'s live policy.
pub async fn apply(admin: &crate::traffic::Admin, service: &str) -> Result<()> {
    let mut policy = admin.policy(service).await?;
    add_route(&mut policy, service)?;
    admin
        .apply(service, &policy)
        .await
        .with_context(|| format!("adding route {ROUTE_NAME} to {service}'s policy"))?;
    Ok(())
}

/// What the report says about the hedged way.
pub fn note(service: &str) -> String {
    format!(
        "The hedged mesh way goes through the same client sidecar as the mesh way, its requests \
         marked `{LAB_WAY_HEADER}: mesh+hedging`; the lab added a route `{ROUTE_NAME}` to \
         `{service}`'s policy that matches the header and hedges them: a first try still \
         unanswered after the p95 of {service}'s recent latency gets one copy to the balancer's \
         next instance, and the first answer wins. Both ways share the sidecar's balancer and \
         outlier state, so each one's calls teach it about the instances for the other."
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use wayfinder_proto::policy::{BackendTarget, HedgeAfter};

    #[test]
    fn the_route_hedges_only_the_marked_requests_at_p95_over_every_instance() {
        let r = route("web").expect("route");
        assert_eq!(r.name.as_str(), ROUTE_NAME);
        let headers: Vec<_> = r.matches.headers.iter().collect();
        assert_eq!(headers, [("x-wayfinder-lab-way", "mesh+hedging")]);
        assert!(r.matches.path_prefix.is_none() && r.matches.method.is_none());
        let backends = r.backends.as_slice();
        assert_eq!(backends.len(), 1);
        assert_eq!(backends[0].target.to_string(), "service web");
        assert!(matches!(backends[0].target, BackendTarget::Service(_)));
        let h = r.hedging.as_ref().expect("hedging");
        assert_eq!(h.after, HedgeAfter::Quantile(95.0));
        assert!(r.retries.is_none() && r.timeouts.is_none(), "the service's");
    }

    #[test]
    fn the_route_goes_first_and_survives_the_wire() {
        let file = PolicyFile::parse(
            "p.toml",
            "[services.web]\nbalancer = \"least-request\"\n\
             [[services.web.routes]]\nname = \"default\"\nbackends = [{ subset = { version = \"v1\" } }]\n",
        )
        .expect("parses");
        let mut p = file.services.values().next().expect("web").clone();
        add_route(&mut p, "web").expect("added");
        // Twice is the same as once.
        add_route(&mut p, "web").expect("added again");
        let names: Vec<&str> = p
            .routes
            .as_ref()
            .expect("routes")
            .as_slice()
            .iter()
            .map(|r| r.name.as_str())
            .collect();
        assert_eq!(names, [ROUTE_NAME, "default"]);
        let (name, back) = ServicePolicy::from_proto(&p.to_proto("web")).expect("round trip");
        assert_eq!(name.as_str(), "web");
        assert_eq!(back, p);
    }

    #[test]
    fn a_policy_file_from_wfctl_gets_the_route_and_keeps_the_rest() {
        let got = "[services.web]\nbalancer = \"least-request\"\n";
        let text = add_to_file(got, "web").expect("added");
        let file = PolicyFile::parse("t", &text).expect("valid");
        let web = file.services.values().next().expect("web");
        assert!(web.balancer.is_some(), "{text}");
        assert_eq!(
            web.routes.as_ref().expect("routes").as_slice()[0]
                .name
                .as_str(),
            ROUTE_NAME
        );
        // A service without a policy yet.
        let text = add_to_file("", "web").expect("added");
        assert!(text.contains(ROUTE_NAME), "{text}");
    }

    #[test]
    fn the_shipped_lab_policy_carries_the_same_route() {
        let file = PolicyFile::parse(
            "deploy/policy.toml",
            include_str!("../../../deploy/policy.toml"),
        )
        .expect("valid");
        let web = file
            .services
            .iter()
            .find(|(n, _)| n.as_str() == "web")
            .map(|(_, p)| p)
            .expect("web");
        let shipped = web
            .routes
            .as_ref()
            .and_then(|r| r.as_slice().iter().find(|r| r.name.as_str() == ROUTE_NAME))
            .expect("the hedged way's route in deploy/policy.toml");
        assert_eq!(shipped, &route("web").expect("route"));
    }
}
