//! Labs: what `wfctl lab` runs.

pub mod compare;
pub mod dns;
pub mod docker;
pub mod hedging;
pub mod load;
pub mod loopback;
pub mod machine;
pub mod report;
pub mod scenario;
pub mod svg;
pub mod timeline;

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{Context, Result};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// A loopback port nothing listens on right now.
pub fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// POSTs to a lab-app control path (`/fault?...`); returns the status.
pub async fn http_post(addr: SocketAddr, path: &str) -> Result<u16> {
    Ok(http(addr, "POST", path).await?.0)
}

/// GETs `path`: status and body.
pub async fn http_get(addr: SocketAddr, path: &str) -> Result<(u16, String)> {
    http(addr, "GET", path).await
}

/// One HTTP/1.1 request on its own connection (5 s at most).
pub(crate) async fn http(addr: SocketAddr, method: &str, path: &str) -> Result<(u16, String)> {
    let call = async {
        let mut s = tokio::net::TcpStream::connect(addr).await?;
        s.write_all(
            format!("{method} {path} HTTP/1.1\r\nHost: lab\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
                .as_bytes(),
        )
        .await?;
        let mut buf = Vec::new();
        s.read_to_end(&mut buf).await?;
        anyhow::Ok(buf)
    };
    let buf = tokio::time::timeout(Duration::from_secs(5), call)
        .await
        .context("no answer within 5 s")??;
    let text = String::from_utf8_lossy(&buf);
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .with_context(|| format!("no HTTP status from {addr}"))?;
    let body = text
        .split_once("\r\n\r\n")
        .map_or("", |(_, b)| b)
        .to_string();
    Ok((status, body))
}
