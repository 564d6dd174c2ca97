//! `wfctl watch`: prints every update; reconnects with jittered backoff and
//! resumes from the last version it printed.

use std::collections::BTreeMap;

use anyhow::{Result, bail};
use futures::StreamExt;
use tonic::Code;
use tonic::transport::Channel;
use wayfinder_proto::backoff::backoff;
use wayfinder_proto::v1::{
    Endpoint, ServiceWatch, WatchEvent, WatchRequest, discovery_client::DiscoveryClient,
    watch_event::Kind,
};
use wayfinder_proto::view::EndpointView;

use crate::commands::bracket;
use crate::output::{self, EndpointJson, Format};

/// Watches until `count` events were printed (0 = forever).
pub async fn run(ch: Channel, services: Vec<String>, count: u64, out: Format) -> Result<()> {
    let mut versions: BTreeMap<String, u64> = services.into_iter().map(|s| (s, 0)).collect();
    let mut printed = 0u64;
    let mut attempt = 0u32;
    loop {
        let req = WatchRequest {
            services: versions
                .iter()
                .map(|(name, &last_version)| ServiceWatch {
                    name: name.clone(),
                    last_version,
                })
                .collect(),
            node: "wfctl".into(),
            ..Default::default()
        };
        let mut client = DiscoveryClient::new(ch.clone());
        let err = match client.watch(req).await {
            Err(s) if s.code() == Code::InvalidArgument => bail!("refused: {}", s.message()),
            Err(s) => s,
            Ok(resp) => {
                let mut stream = resp.into_inner();
                attempt = 0;
                loop {
                    match stream.next().await {
                        Some(Ok(event)) => {
                            versions.insert(event.service.clone(), event.version);
                            print_event(&event, out)?;
                            printed += 1;
                            if count != 0 && printed >= count {
                                return Ok(());
                            }
                        }
                        Some(Err(s)) => break s,
                        None => break tonic::Status::unavailable("stream ended"),
                    }
                }
            }
        };
        let wait = backoff(attempt);
        attempt = attempt.saturating_add(1);
        eprintln!(
            "wfctl: watch interrupted ({}); reconnecting in {wait:?}",
            err.message()
        );
        tokio::time::sleep(wait).await;
    }
}

fn line(sign: char, e: &Endpoint) -> String {
    let v = EndpointView::from(e);
    format!(
        "  {sign} {} {}:{} {} weight={} labels={}",
        v.instance_id,
        bracket(&v.address),
        v.port,
        v.health,
        v.weight,
        output::labels_text(&output::labels(e))
    )
}

fn print_event(event: &WatchEvent, out: Format) -> Result<()> {
    if out == Format::Json {
        let (kind, body) = match &event.kind {
            Some(Kind::Snapshot(s)) => (
                "snapshot",
                serde_json::json!({
                    "exists": s.exists,
                    "endpoints": s.endpoints.iter().map(EndpointJson::from).collect::<Vec<_>>(),
                    "policy": s.policy,
                }),
            ),
            Some(Kind::Delta(d)) => (
                "delta",
                serde_json::json!({
                    "prev_version": d.prev_version,
                    "added": d.added.iter().map(EndpointJson::from).collect::<Vec<_>>(),
                    "changed": d.changed.iter().map(EndpointJson::from).collect::<Vec<_>>(),
                    "removed": d.removed,
                    "policy": d.policy,
                    "policy_removed": d.policy_removed,
                }),
            ),
            None => ("empty", serde_json::Value::Null),
        };
        return output::json(&serde_json::json!({
            "service": event.service, "version": event.version, "kind": kind,
            "changed_at_us": event.changed_at_us, "update": body,
        }));
    }
    match &event.kind {
        Some(Kind::Snapshot(s)) => {
            let what = if s.exists {
                ""
            } else {
                " (service does not exist yet)"
            };
            println!(
                "{} v{} snapshot: {} endpoints{what}{}",
                event.service,
                event.version,
                s.endpoints.len(),
                if s.policy.is_some() {
                    ", policy set"
                } else {
                    ""
                }
            );
            for e in &s.endpoints {
                output::line(&line(' ', e));
            }
        }
        Some(Kind::Delta(d)) => {
            output::line(&format!("{} v{} delta:", event.service, event.version));
            for e in &d.added {
                output::line(&line('+', e));
            }
            for e in &d.changed {
                output::line(&line('~', e));
            }
            for id in &d.removed {
                output::line(&format!("  - {id}"));
            }
            if d.policy.is_some() {
                println!("  policy changed");
            }
            if d.policy_removed {
                println!("  policy removed");
            }
        }
        None => {}
    }
    Ok(())
}
