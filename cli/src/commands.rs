//! One function per one-shot command.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use tonic::Code;
use tonic::transport::Channel;
use wayfinder_proto::policy::{PolicyFile, ServicePolicy};
use wayfinder_proto::v1::{
    ApplyPolicyRequest, DeregisterRequest, EndpointAddress, GetPolicyRequest, Instance,
    ListEndpointsRequest, ListServicesRequest, RegisterRequest, admin_client::AdminClient,
    deregister_request::Target, registry_client::RegistryClient,
};
use wayfinder_proto::view::EndpointView;

use crate::output::{self, Format};

fn request<T>(msg: T, timeout: Duration) -> tonic::Request<T> {
    let mut r = tonic::Request::new(msg);
    r.set_timeout(timeout);
    r
}

/// Turns a gRPC status into an error that says what went wrong, not how.
fn status(s: tonic::Status) -> anyhow::Error {
    match s.code() {
        Code::InvalidArgument => anyhow::anyhow!("refused: {}", s.message()),
        Code::NotFound => anyhow::anyhow!("{}", s.message()),
        Code::Unavailable => anyhow::anyhow!("control plane unavailable: {}", s.message()),
        Code::DeadlineExceeded => anyhow::anyhow!("the control plane did not answer in time"),
        _ => anyhow::anyhow!("{:?}: {}", s.code(), s.message()),
    }
}

/// `wfctl services`.
pub async fn services(ch: Channel, t: Duration, out: Format) -> Result<()> {
    let resp = AdminClient::new(ch)
        .list_services(request(ListServicesRequest {}, t))
        .await
        .map_err(status)?
        .into_inner();
    if out == Format::Json {
        return output::json(&resp.services);
    }
    let mut table = output::table(&["SERVICE", "INSTANCES", "SERVING", "POLICY", "VERSION"]);
    for s in &resp.services {
        table.add_row(vec![
            s.name.clone(),
            s.instances.to_string(),
            s.serving.to_string(),
            if s.has_policy { "yes" } else { "-" }.to_string(),
            s.version.to_string(),
        ]);
    }
    output::line(&table.to_string());
    Ok(())
}

/// `wfctl endpoints SERVICE`.
pub async fn endpoints(ch: Channel, t: Duration, service: &str, out: Format) -> Result<()> {
    let resp = AdminClient::new(ch)
        .list_endpoints(request(
            ListEndpointsRequest {
                service: service.to_string(),
            },
            t,
        ))
        .await
        .map_err(status)?
        .into_inner();
    if out == Format::Json {
        let endpoints: Vec<_> = resp
            .endpoints
            .iter()
            .map(output::EndpointJson::from)
            .collect();
        return output::json(
            &serde_json::json!({ "version": resp.version, "endpoints": endpoints }),
        );
    }
    let mut table = output::table(&[
        "INSTANCE", "ADDRESS", "HEALTH", "WEIGHT", "LABELS", "ZONE", "MESHED", "VERSION",
    ]);
    for ep in &resp.endpoints {
        let e = EndpointView::from(ep);
        table.add_row(vec![
            e.instance_id,
            format!("{}:{}", bracket(&e.address), e.port),
            e.health.to_string(),
            e.weight.to_string(),
            output::labels_text(&output::labels(ep)),
            if e.zone.is_empty() {
                "-".into()
            } else {
                e.zone
            },
            if e.meshed { "yes" } else { "no" }.to_string(),
            e.version.to_string(),
        ]);
    }
    output::line(&table.to_string());
    Ok(())
}

/// IPv6 addresses in brackets, so `addr:port` reads right.
pub fn bracket(addr: &str) -> String {
    if addr.contains(':') {
        format!("[{addr}]")
    } else {
        addr.to_string()
    }
}

/// `wfctl register`.
#[allow(clippy::too_many_arguments)]
pub async fn register(
    ch: Channel,
    t: Duration,
    service: String,
    addr: SocketAddr,
    weight: u32,
    instance: Option<String>,
    zone: String,
    out: Format,
) -> Result<()> {
    let instance = Instance {
        service,
        instance_id: instance.unwrap_or_default(),
        address: addr.ip().to_string(),
        port: addr.port().into(),
        weight,
        zone,
        ..Default::default()
    };
    // Refuse locally with the same rules the server applies.
    let instance = wayfinder_proto::validate::instance(instance).context("refused")?;
    let resp = RegistryClient::new(ch)
        .register(request(
            RegisterRequest {
                instance: Some(instance.clone()),
                static_endpoint: true,
                ..Default::default()
            },
            t,
        ))
        .await
        .map_err(status)?
        .into_inner();
    if out == Format::Json {
        return output::json(&serde_json::json!({
            "service": instance.service, "instance_id": resp.instance_id, "version": resp.version,
        }));
    }
    println!(
        "registered {} {} as {} (version {})",
        instance.service, addr, resp.instance_id, resp.version
    );
    Ok(())
}

/// `wfctl deregister`.
pub async fn deregister(
    ch: Channel,
    t: Duration,
    service: String,
    addr: SocketAddr,
    out: Format,
) -> Result<()> {
    let resp = RegistryClient::new(ch)
        .deregister(request(
            DeregisterRequest {
                target: Some(Target::Endpoint(EndpointAddress {
                    service: service.clone(),
                    address: addr.ip().to_string(),
                    port: addr.port().into(),
                })),
            },
            t,
        ))
        .await
        .map_err(status)?
        .into_inner();
    if out == Format::Json {
        return output::json(&serde_json::json!({ "service": service, "version": resp.version }));
    }
    println!("deregistered {service} {addr} (version {})", resp.version);
    Ok(())
}

/// `wfctl policy apply FILE` (already validated locally).
pub async fn policy_apply(ch: Channel, t: Duration, file: PolicyFile, out: Format) -> Result<()> {
    if file.services.is_empty() {
        bail!("the file defines no [services.NAME] table");
    }
    let resp = AdminClient::new(ch)
        .apply_policy(request(
            ApplyPolicyRequest {
                policies: file.to_proto(),
            },
            t,
        ))
        .await
        .map_err(status)?
        .into_inner();
    if out == Format::Json {
        return output::json(
            &serde_json::json!({ "version": resp.version, "changed": resp.changed }),
        );
    }
    if resp.changed.is_empty() {
        println!("policy unchanged (version {})", resp.version);
    } else {
        println!(
            "policy applied to {} (version {})",
            resp.changed.join(", "),
            resp.version
        );
    }
    Ok(())
}

/// `wfctl policy get SERVICE`.
pub async fn policy_get(ch: Channel, t: Duration, service: &str, out: Format) -> Result<()> {
    let p = AdminClient::new(ch)
        .get_policy(request(
            GetPolicyRequest {
                service: service.to_string(),
            },
            t,
        ))
        .await
        .map_err(status)?
        .into_inner();
    let (name, model) = ServicePolicy::from_proto(&p)?;
    if out == Format::Json {
        return output::json(&serde_json::json!({ "service": name, "policy": model }));
    }
    let mut file = PolicyFile::default();
    file.services.insert(name, model);
    print!("{}", file.to_toml());
    Ok(())
}
