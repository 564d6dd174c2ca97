//! `wf-proxy await`: wait for a sidecar's `/ready`, then (optionally) exec
//! the app. It is the readiness check of an image without a shell or curl
//! (a compose `healthcheck`), and the entrypoint wrapper of an app image
//! that carries wf-proxy (Linkerd's `linkerd-await` does the same).

use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Why the sidecar is not ready (yet).
#[derive(Debug, thiserror::Error)]
pub enum NotReady {
    /// Nothing listens on the admin port (the sidecar is not up).
    #[error("no sidecar on {0}: {1}")]
    Unreachable(SocketAddr, std::io::Error),
    /// It answered, but not 200: the body says what it waits for.
    #[error("{0}")]
    Waiting(String),
}

/// One look at `GET /ready` on the admin port.
pub async fn probe(admin: SocketAddr) -> Result<(), NotReady> {
    let attempt = async {
        let mut s = TcpStream::connect(admin).await?;
        s.write_all(b"GET /ready HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
            .await?;
        let mut buf = Vec::new();
        // The admin server answers in a few hundred bytes; more is not ours.
        s.take(16 * 1024).read_to_end(&mut buf).await?;
        Ok::<_, std::io::Error>(buf)
    };
    let buf = match tokio::time::timeout(Duration::from_secs(2), attempt).await {
        Ok(Ok(buf)) => buf,
        Ok(Err(e)) => return Err(NotReady::Unreachable(admin, e)),
        Err(_) => {
            return Err(NotReady::Unreachable(
                admin,
                std::io::ErrorKind::TimedOut.into(),
            ));
        }
    };
    let text = String::from_utf8_lossy(&buf);
    if text.starts_with("HTTP/1.1 200") {
        return Ok(());
    }
    let body = text.split("\r\n\r\n").nth(1).unwrap_or("").trim();
    let status = text.lines().next().unwrap_or("no answer");
    Err(NotReady::Waiting(format!("{status}: {body}")))
}

/// Probes every 100 ms until ready or `limit` passes; the last reason on
/// failure.
pub async fn wait(admin: SocketAddr, limit: Duration) -> Result<(), NotReady> {
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        match probe(admin).await {
            Ok(()) => return Ok(()),
            Err(e) if tokio::time::Instant::now() >= deadline => return Err(e),
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
}
