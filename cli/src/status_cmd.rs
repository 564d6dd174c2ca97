//! `wfctl proxy-status` and `wfctl check`: the command lines turned into
//! the library's calls ([`wayfinder_cli::status`]), and their output.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Result, bail};
use tonic::transport::Channel;
use wayfinder_cli::status::{self, check, proxy_status};

use crate::output::{self, Format};

/// `wfctl proxy-status`: one row per sidecar of every replica at `http`.
pub async fn proxy_status(http: &str, out: Format) -> Result<()> {
    let addrs = status::http_addrs(http).await?;
    let replicas = proxy_status::read_all(&addrs).await?;
    match out {
        Format::Json => output::json(&proxy_status::json(&replicas)),
        Format::Table => {
            print!("{}", proxy_status::table(&replicas, status::unix_ms_now()));
            Ok(())
        }
    }
}

/// `wfctl check`'s arguments.
pub struct CheckArgs {
    /// `--http`: every replica's HTTP address, comma-separated.
    pub http: String,
    /// `--policy FILE`.
    pub policy: Option<PathBuf>,
    /// The gRPC connection, or why there is none.
    pub grpc: Result<Channel, String>,
    /// `--timeout`.
    pub timeout: Duration,
}

/// `wfctl check`: every check in order; fails when one does.
pub async fn check(args: CheckArgs, out: Format) -> Result<()> {
    let http = status::http_addrs(&args.http).await?;
    let facts = check::gather(check::Sources {
        http,
        grpc: args.grpc,
        timeout: args.timeout,
        policy: args.policy,
    })
    .await;
    let outcomes = check::judge(&facts);
    match out {
        Format::Json => output::json(&outcomes)?,
        Format::Table => print!("{}", check::render(&outcomes)),
    }
    let failed = outcomes
        .iter()
        .filter(|o| matches!(o.verdict, check::Verdict::Fail(_)))
        .count();
    if failed > 0 {
        bail!("{failed} of {} checks failed", outcomes.len());
    }
    Ok(())
}
