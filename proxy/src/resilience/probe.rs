//! One health probe of an address, for the app's registration heartbeats
//! and for active checks of upstream endpoints alike.

use std::net::SocketAddr;
use std::str::FromStr;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tonic::transport::Endpoint;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

/// How a health is checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Check {
    /// `GET path` must answer 2xx.
    Http(String),
    /// A TCP connect must succeed.
    Tcp,
    /// `grpc.health.v1.Health/Check` for this service ("" asks for the
    /// whole server's health) must answer `SERVING`.
    Grpc(String),
}

impl std::fmt::Display for Check {
    /// As `--health-check` takes it: `tcp`, the path, `grpc` or `grpc:SERVICE`.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Check::Http(path) => f.write_str(path),
            Check::Tcp => f.write_str("tcp"),
            Check::Grpc(service) if service.is_empty() => f.write_str("grpc"),
            Check::Grpc(service) => write!(f, "grpc:{service}"),
        }
    }
}

impl FromStr for Check {
    type Err = String;

    /// `--health-check`: `tcp`, an HTTP path such as `/healthz`, `grpc`
    /// (the server's overall health) or `grpc:SERVICE`.
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "tcp" => Ok(Check::Tcp),
            "grpc" => Ok(Check::Grpc(String::new())),
            p if p.starts_with('/') => Ok(Check::Http(p.to_string())),
            other => match other.strip_prefix("grpc:") {
                Some(service) => Ok(Check::Grpc(service.to_string())),
                None => Err(format!(
                    "{other:?}: use \"tcp\", an HTTP path starting with '/', \"grpc\" or \"grpc:SERVICE\""
                )),
            },
        }
    }
}

/// One probe, of the app or of an upstream endpoint, on a fresh connection
/// (no client pool: a probe must reflect what a new caller would get).
/// Unbounded in time: callers wrap it in their check's timeout.
pub async fn probe(addr: SocketAddr, check: &Check) -> bool {
    match check {
        Check::Tcp => TcpStream::connect(addr).await.is_ok(),
        Check::Http(path) => http(addr, path).await,
        Check::Grpc(service) => grpc(addr, service).await,
    }
}

/// A minimal HTTP/1.1 GET that must answer 2xx.
async fn http(addr: SocketAddr, path: &str) -> bool {
    let Ok(mut s) = TcpStream::connect(addr).await else {
        return false;
    };
    let req = format!(
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nUser-Agent: wayfinder-health\r\nConnection: close\r\n\r\n"
    );
    if s.write_all(req.as_bytes()).await.is_err() {
        return false;
    }
    let mut buf = [0u8; 16];
    let mut n = 0;
    while n < 12 {
        match s.read(&mut buf[n..]).await {
            Ok(0) | Err(_) => return false,
            Ok(k) => n += k,
        }
    }
    // "HTTP/1.1 2xx"
    buf.starts_with(b"HTTP/1.") && buf[9] == b'2'
}

/// `grpc.health.v1.Health/Check` over HTTP/2 cleartext (prior knowledge,
/// as gRPC servers take it); healthy only on `SERVING`. The channel and
/// its connection end when this returns or is cancelled.
async fn grpc(addr: SocketAddr, service: &str) -> bool {
    let Ok(endpoint) = Endpoint::from_shared(format!("http://{addr}"))
        .and_then(|e| e.user_agent("wayfinder-health"))
    else {
        return false;
    };
    let Ok(channel) = endpoint.connect().await else {
        return false;
    };
    let req = HealthCheckRequest {
        service: service.to_string(),
    };
    match HealthClient::new(channel).check(req).await {
        Ok(r) => r.into_inner().status() == ServingStatus::Serving,
        Err(_) => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn health_check_flags_parse_and_print_back() {
        for (flag, check) in [
            ("tcp", Check::Tcp),
            ("/healthz", Check::Http("/healthz".into())),
            ("grpc", Check::Grpc(String::new())),
            (
                "grpc:wayfinder.lab.v1.Echo",
                Check::Grpc("wayfinder.lab.v1.Echo".into()),
            ),
        ] {
            assert_eq!(flag.parse::<Check>(), Ok(check.clone()), "{flag}");
            assert_eq!(check.to_string(), flag);
        }
        assert_eq!("grpc:".parse::<Check>(), Ok(Check::Grpc(String::new())));
        for bad in ["", "healthz", "http", "GRPC", "grpc-web"] {
            assert!(bad.parse::<Check>().is_err(), "{bad:?}");
        }
    }

    #[tokio::test]
    async fn a_grpc_probe_is_healthy_only_on_serving() {
        let (reporter, service) = tonic_health::server::health_reporter();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(service)
                .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
        );
        let check = |s: &str| {
            let check = Check::Grpc(s.to_string());
            async move { probe(addr, &check).await }
        };
        assert!(check("").await, "a new server reports itself SERVING");
        reporter
            .set_service_status("lab.Echo", tonic_health::ServingStatus::Serving)
            .await;
        assert!(check("lab.Echo").await);
        reporter
            .set_service_status("lab.Echo", tonic_health::ServingStatus::NotServing)
            .await;
        assert!(!check("lab.Echo").await, "NOT_SERVING");
        assert!(check("").await, "the server as a whole still serves");
        assert!(!check("lab.Other").await, "an unknown service (NOT_FOUND)");
    }

    #[tokio::test]
    async fn a_grpc_probe_of_something_not_speaking_grpc_fails() {
        // An HTTP/1 server that answers every connection with a 200: no
        // gRPC health answer, so not healthy, and without hanging.
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        tokio::spawn(async move {
            while let Ok((mut s, _)) = listener.accept().await {
                let _ = s
                    .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
                    .await;
            }
        });
        let ok = tokio::time::timeout(
            std::time::Duration::from_secs(5),
            probe(addr, &Check::Grpc(String::new())),
        )
        .await
        .expect("the probe ends");
        assert!(!ok);
        assert!(probe(addr, &Check::Tcp).await, "it does accept connections");
    }
}
