//! How the sidecar notices a peer that died without a word: a container
//! whose network namespace vanished, a host that lost power or sits behind a
//! partition sends no FIN and no RST, so a connection to it looks open until
//! something times out. These are the somethings, in one place (the README's
//! "Dead peers" table sets them beside Linkerd's and Envoy's defaults).
//!
//! - A pooled HTTP/2 connection carrying requests is pinged once nothing
//!   has been read from it for [`H2_PING_INTERVAL`] (0.5 s); no answer within
//!   [`H2_PING_TIMEOUT`] closes it and fails its requests as resets (retried
//!   elsewhere when safe). A busy healthy connection reads frames all the
//!   time and sends no pings, so the cost is two pings a second on a
//!   connection whose requests wait.
//! - An idle pooled HTTP/2 connection is pinged more slowly, by
//!   [`IdlePing`] under hyper (whose one interval cannot be two): after
//!   10-20 s without a byte read, 3 s to answer. This finds a peer that
//!   froze while its kernel still acknowledges (`docker pause`, SIGSTOP),
//!   which TCP keepalive cannot.
//! - Every TCP connection the sidecar makes or accepts has TCP keepalive
//!   (probes from the kernel, no wake-up of the sidecar) and
//!   `TCP_USER_TIMEOUT`, which bounds how long written data may stay
//!   unacknowledged: an HTTP/1 request written to a dead peer fails in
//!   [`TCP_USER_TIMEOUT`] instead of the kernel's ~15 minutes of
//!   retransmissions. With it set, Linux also ends a connection whose
//!   keepalive probes go unanswered once the user timeout has passed since
//!   it last heard from the peer: a dead idle connection goes about 13 s
//!   after it fell silent (31 s for accepted ones).
//! - A request stream that waits long for its answer (a gRPC server stream,
//!   a long poll) makes its connection send two pings a second while no
//!   frame arrives: 17 bytes each way, the price of noticing within 1.5 s.
//! - Connecting is bounded by the connect timeout (policy, `--connect-timeout`).

mod idle_ping;

use std::time::Duration;

use tokio::net::TcpStream;

pub use idle_ping::{H2_IDLE_PING_INTERVAL, H2_IDLE_PING_TIMEOUT, IdlePing};

/// Idle time before the kernel sends the first keepalive probe (Linkerd's 10 s).
pub const TCP_KEEPALIVE_IDLE: Duration = Duration::from_secs(10);
/// Time between keepalive probes.
pub const TCP_KEEPALIVE_INTERVAL: Duration = Duration::from_secs(3);
/// Unanswered probes before the kernel closes the connection.
pub const TCP_KEEPALIVE_PROBES: u32 = 3;
/// Longest time data the sidecar wrote to an endpoint may stay
/// unacknowledged (Linkerd: 30 s).
pub const TCP_USER_TIMEOUT: Duration = Duration::from_secs(10);
/// The same on connections the sidecar accepted: longer, so a client that
/// stops reading for a while (its window full) is not cut (Linkerd's 30 s).
pub const TCP_USER_TIMEOUT_ACCEPTED: Duration = Duration::from_secs(30);
/// Silence on a pooled HTTP/2 connection with requests open before it is
/// pinged: with the timeout, a dead peer is noticed within 1.5 s, so a
/// request moved elsewhere still beats a caller's 2 s deadline.
pub const H2_PING_INTERVAL: Duration = Duration::from_millis(500);
/// Time a ping may take before the connection is declared dead.
pub const H2_PING_TIMEOUT: Duration = Duration::from_secs(1);

/// Sets no-delay, TCP keepalive and `TCP_USER_TIMEOUT` on a connection the
/// sidecar made. Failures are ignored: a socket without them still works,
/// it is only noticed later when its peer dies.
pub fn tune(stream: &TcpStream) {
    tune_with(stream, TCP_USER_TIMEOUT);
}

/// [`tune`] for a connection the sidecar accepted.
pub fn tune_accepted(stream: &TcpStream) {
    tune_with(stream, TCP_USER_TIMEOUT_ACCEPTED);
}

fn tune_with(stream: &TcpStream, user_timeout: Duration) {
    let _ = stream.set_nodelay(true);
    let sock = socket2::SockRef::from(stream);
    let keepalive = socket2::TcpKeepalive::new()
        .with_time(TCP_KEEPALIVE_IDLE)
        .with_interval(TCP_KEEPALIVE_INTERVAL)
        .with_retries(TCP_KEEPALIVE_PROBES);
    if let Err(e) = sock.set_tcp_keepalive(&keepalive) {
        tracing::debug!(error = %e, "TCP keepalive not set");
    }
    if let Err(e) = sock.set_tcp_user_timeout(Some(user_timeout)) {
        tracing::debug!(error = %e, "TCP_USER_TIMEOUT not set");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn tuned_sockets_carry_keepalive_and_a_user_timeout() {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let s = TcpStream::connect(l.local_addr().expect("addr"))
            .await
            .expect("connect");
        tune(&s);
        let sock = socket2::SockRef::from(&s);
        assert!(sock.keepalive().expect("SO_KEEPALIVE"));
        assert_eq!(sock.tcp_keepalive_time().expect("idle"), TCP_KEEPALIVE_IDLE);
        assert_eq!(
            sock.tcp_keepalive_interval().expect("interval"),
            TCP_KEEPALIVE_INTERVAL
        );
        assert_eq!(
            sock.tcp_keepalive_retries().expect("probes"),
            TCP_KEEPALIVE_PROBES
        );
        assert_eq!(
            sock.tcp_user_timeout().expect("user timeout"),
            Some(TCP_USER_TIMEOUT)
        );
        assert!(s.nodelay().expect("nodelay"));
        let (accepted, _) = l.accept().await.expect("accept");
        tune_accepted(&accepted);
        let sock = socket2::SockRef::from(&accepted);
        assert!(sock.keepalive().expect("SO_KEEPALIVE"));
        assert_eq!(
            sock.tcp_user_timeout().expect("user timeout"),
            Some(TCP_USER_TIMEOUT_ACCEPTED)
        );
    }
}
