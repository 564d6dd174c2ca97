//! gRPC between clients and servers the project did not write: grpcio
//! (grpc-core, as C++, Ruby and PHP use) and its health stub from PyPI,
//! against lab-app (tonic) and against a grpcio server, directly and
//! through two sidecars speaking mTLS. Skipped, saying why, where grpcio
//! is not installed (`bash deploy/setup.sh test` installs it).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result};
use wayfinder_tests::mesh::{client, lab_app, sidecar_with, wait_serving};
use wayfinder_tests::{ControlPlane, Process, bounded, python_grpc};

const TOKEN: &str = "grpc-interop-token";

fn scripts() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("python")
}

/// `grpc_client.py TARGET ARGS`: its stdout, or an error with its stderr.
async fn grpcio(python: &Path, target: SocketAddr, args: &[&str]) -> Result<String> {
    let out = tokio::process::Command::new(python)
        .arg(scripts().join("grpc_client.py"))
        .arg(target.to_string())
        .args(args)
        .kill_on_drop(true)
        .output()
        .await?;
    anyhow::ensure!(
        out.status.success(),
        "grpc_client.py {target} {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// `service` instance `name` behind a sidecar (mTLS, TCP health check, so
/// a server that reports NOT_SERVING over gRPC stays routable and its
/// watchers keep their stream), and a client sidecar's `web` listener.
async fn mesh(app: SocketAddr, name: &str) -> Result<(ControlPlane, Process, Process, SocketAddr)> {
    let cp = ControlPlane::start(&["--join-token", TOKEN])?;
    let web = sidecar_with(&cp, "web", name, app, "tcp", &["--join-token", TOKEN])?;
    wait_serving(&cp, "web", 1).await?;
    let (caller, via, _) = client(&cp, &["--join-token", TOKEN])?;
    Ok((cp, web, caller, via))
}

/// A grpcio `Watch` running in the background: its lines as they stream.
struct Watch {
    process: Process,
}

impl Watch {
    /// `grpc_client.py TARGET watch "" WANT`, once its first status came.
    fn start(python: &Path, target: SocketAddr, want: usize) -> Result<Self> {
        // The statuses go to stdout, unbuffered; the harness reads stderr.
        let mut cmd = Command::new("sh");
        cmd.arg("-c")
            .arg("exec \"$@\" 1>&2")
            .arg("sh")
            .arg(python)
            .arg("-u")
            .arg(scripts().join("grpc_client.py"))
            .arg(target.to_string())
            .args(["watch", "", &want.to_string()]);
        Ok(Self {
            process: Process::spawn(cmd, "grpcio watch", "SERVING")?,
        })
    }

    /// Waits for NOT_SERVING, and checks the stream said exactly SERVING
    /// then NOT_SERVING.
    async fn saw_serving_then_not_serving(&self) -> Result<()> {
        let log = self.process.await_log("NOT_SERVING").await?;
        let statuses: Vec<_> = log.lines().filter(|l| l.contains("SERVING")).collect();
        anyhow::ensure!(statuses == ["SERVING", "NOT_SERVING"], "{log}");
        Ok(())
    }
}

#[tokio::test]
async fn grpcio_calls_lab_app_directly_and_through_two_sidecars_over_mtls() -> Result<()> {
    let python = match python_grpc() {
        Ok(p) => p,
        Err(why) => {
            eprintln!("skipped: {why}");
            return Ok(());
        }
    };
    bounded(async {
        let (_app, app) = lab_app("web-1")?;
        // Directly: the standard health client and the echo.
        assert_eq!(grpcio(&python, app, &["check"]).await?, "SERVING");
        assert_eq!(grpcio(&python, app, &["say", "hi"]).await?, "hi web-1");

        let (_cp, web, _caller, via) = mesh(app, "web-1").await?;
        assert_eq!(grpcio(&python, via, &["check"]).await?, "SERVING");
        assert_eq!(
            grpcio(&python, via, &["check", "wayfinder.lab.v1.Echo"]).await?,
            "SERVING"
        );
        assert_eq!(
            grpcio(&python, via, &["say", "through"]).await?,
            "through web-1"
        );
        // The caller's sidecar reached web-1's over mTLS.
        let (_, metrics) = wayfinder_tests::mesh::admin_get(&web, "/metrics").await?;
        assert!(
            metrics.contains("wayfinder_proxy_requests_total{direction=\"inbound\""),
            "{metrics}"
        );

        // A server stream, directly and through the mesh: both Watches see
        // the app turn unhealthy.
        let direct = Watch::start(&python, app, 2)?;
        let watch = Watch::start(&python, via, 2)?;
        wayfinder_tests::http_request(app, "POST", "/fault?healthy=false", "web", "").await?;
        direct.saw_serving_then_not_serving().await?;
        watch.saw_serving_then_not_serving().await?;
        Ok(())
    })
    .await
}

#[tokio::test]
async fn a_grpcio_server_behind_its_sidecar_answers_grpcio_through_the_mesh() -> Result<()> {
    let python = match python_grpc() {
        Ok(p) => p,
        Err(why) => {
            eprintln!("skipped: {why}");
            return Ok(());
        }
    };
    bounded(async {
        let mut cmd = Command::new(&python);
        cmd.arg(scripts().join("grpc_server.py"))
            .args(["0", "py-1"]);
        let server = Process::spawn(cmd, "grpc_server.py", "listening on")?;
        let app = server.addr("on ")?;
        assert_eq!(
            grpcio(&python, app, &["say", "direct"]).await?,
            "direct py-1"
        );

        // grpc-core refuses a call without `te: trailers` ("Missing :te
        // header"): the mesh must pass it on, and the trailers back.
        let (_cp, _web, _caller, via) = mesh(app, "py-1").await?;
        assert_eq!(grpcio(&python, via, &["check"]).await?, "SERVING");
        assert_eq!(
            grpcio(&python, via, &["say", "meshed"]).await?,
            "meshed py-1"
        );
        // The hop between the sidecars was mTLS: the server's sidecar names
        // the caller's proven identity; a direct call has none.
        assert_eq!(grpcio(&python, app, &["say", "whoami"]).await?, "none py-1");
        let who = grpcio(&python, via, &["say", "whoami"]).await?;
        assert!(
            who.starts_with("URI=spiffe://") && who.contains("/client py-1"),
            "{who}"
        );

        // Its health stream, directly and through both sidecars.
        let direct = Watch::start(&python, app, 2)?;
        let watch = Watch::start(&python, via, 2)?;
        assert_eq!(
            grpcio(&python, via, &["say", "unhealthy"]).await?,
            "unhealthy py-1"
        );
        direct.saw_serving_then_not_serving().await?;
        watch.saw_serving_then_not_serving().await?;
        Ok(())
    })
    .await
    .context("grpcio server through the mesh")
}

#[tokio::test]
async fn three_hundred_grpc_calls_in_a_row_all_pass_over_one_pooled_connection() -> Result<()> {
    use wayfinder_proto::lab::v1::{SayRequest, echo_client::EchoClient};
    bounded(async {
        let (_app, app) = lab_app("web-1")?;
        let (_cp, web, caller, via) = mesh(app, "web-1").await?;
        // tonic ends each call's request with an empty DATA frame. Relayed
        // as an empty non-final frame, h2 on the next hop counted it as
        // abuse and sent GOAWAY (ENHANCE_YOUR_CALM) after 100, which
        // failed the calls in flight: gRPC calls are POSTs, not retried.
        let channel = tonic::transport::Channel::from_shared(format!("http://{via}"))?
            .connect()
            .await?;
        let mut echo = EchoClient::new(channel);
        for i in 0..300 {
            let reply = echo
                .say(SayRequest {
                    message: format!("call {i}"),
                })
                .await
                .with_context(|| format!("call {i}"))?
                .into_inner();
            assert_eq!(
                (reply.message, reply.instance.as_str()),
                (format!("call {i}"), "web-1")
            );
        }
        // Every call went over the sidecars' one pooled connection.
        for (name, sidecar) in [("caller", &caller), ("web", &web)] {
            let (_, metrics) = wayfinder_tests::mesh::admin_get(sidecar, "/metrics").await?;
            let failed = wayfinder_tests::metric(
                &metrics,
                "wayfinder_proxy_requests_total{direction=\"outbound\",upstream=\"web\",status=\"5xx\"}",
            )
            .unwrap_or(0.0);
            assert_eq!(failed, 0.0, "{name}");
        }
        Ok(())
    })
    .await
}
