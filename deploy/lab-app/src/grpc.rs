//! lab-app's gRPC side, on its HTTP port: `wayfinder.lab.v1.Echo` and the
//! standard `grpc.health.v1.Health` (tonic-health), whose status follows
//! the app's health fault, so a gRPC health client sees what `/healthz` says.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use tonic::{Request, Response, Status};
use tonic_health::ServingStatus;
use tonic_health::server::HealthReporter;
use wayfinder_proto::lab::v1::echo_server::{Echo, EchoServer};
use wayfinder_proto::lab::v1::{SayReply, SayRequest};

use crate::App;

/// The services `wayfinder.lab.v1.Echo` reports health under, besides ""
/// (the whole server).
const ECHO: &str = "wayfinder.lab.v1.Echo";

/// `Echo`, answering with the instance and honouring the delay and
/// failure faults as `GET /` does.
struct EchoService {
    app: Arc<App>,
}

#[tonic::async_trait]
impl Echo for EchoService {
    async fn say(&self, req: Request<SayRequest>) -> Result<Response<SayReply>, Status> {
        let app = &self.app;
        app.count.fetch_add(1, Ordering::Relaxed);
        let delay = app.faults.delay_ms.load(Ordering::Relaxed);
        if delay > 0 {
            tokio::time::sleep(Duration::from_millis(delay)).await;
        }
        let fail = app.faults.fail_ppm.load(Ordering::Relaxed);
        if fail > 0 && rand::random_range(0..1_000_000) < fail {
            return Err(Status::unavailable("fault: failing a share of calls"));
        }
        Ok(Response::new(SayReply {
            message: req.into_inner().message,
            instance: app.name.clone(),
        }))
    }
}

/// Sets the health every gRPC health client sees.
pub async fn report(health: &HealthReporter, healthy: bool) {
    let status = if healthy {
        ServingStatus::Serving
    } else {
        ServingStatus::NotServing
    };
    for service in ["", ECHO] {
        health.set_service_status(service, status).await;
    }
}

/// The gRPC routes (Echo and Health), and the reporter of their health.
pub async fn routes(app: Arc<App>) -> (axum::Router, HealthReporter) {
    let (reporter, health) = tonic_health::server::health_reporter();
    report(&reporter, true).await;
    let router = tonic::service::Routes::new(health)
        .add_service(EchoServer::new(EchoService { app }))
        .into_axum_router();
    (router, reporter)
}
