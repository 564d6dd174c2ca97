//! The app beside a `--capture` sidecar: it shares the sidecar's network
//! namespace but not its processes (a compose service joined to its
//! sidecar), so the sidecar cannot wait for its process to end. Its
//! sockets tell instead: every TCP socket of the namespace is listed in
//! `/proc/self/net/tcp{,6}` with its owner's uid, and the app's are the
//! ones that are not the sidecar's.

use std::time::Duration;

use tokio::time::Instant;

/// Whether a socket of this network namespace owned by another uid than
/// `own_uid` listens or is connected: the app is still there.
pub fn app_has_sockets(own_uid: u32) -> bool {
    ["/proc/self/net/tcp", "/proc/self/net/tcp6"]
        .iter()
        .any(|p| std::fs::read_to_string(p).is_ok_and(|t| foreign_open(&t, own_uid)))
}

/// `/proc/net/tcp`'s table holds a listening (`0A`) or established (`01`)
/// socket of another uid than `own_uid`.
fn foreign_open(table: &str, own_uid: u32) -> bool {
    table.lines().skip(1).any(|line| {
        let fields: Vec<&str> = line.split_whitespace().collect();
        let (Some(state), Some(uid)) = (fields.get(3), fields.get(7)) else {
            return false;
        };
        uid.parse::<u32>().is_ok_and(|u| u != own_uid) && matches!(*state, "0A" | "01")
    })
}

/// Waits until the app has no socket left in the namespace (it exited, or
/// went quiet), or until `deadline`; whether it went before the deadline.
pub async fn app_gone(own_uid: u32, deadline: Instant) -> bool {
    loop {
        if !app_has_sockets(own_uid) {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TABLE: &str = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 0100007F:3A97 00000000:0000 0A 00000000:00000000 00:00000000 00000000  1337        0 1 1 0 100 0 0 10 0
   1: 0100007F:3A98 0100007F:A1B2 01 00000000:00000000 00:00000000 00000000  1337        0 2 1 0 20 4 30 10 -1
   2: 0100007F:0050 0100007F:C3D4 06 00000000:00000000 03:00000123 00000000     0        0 0 3 0
";

    #[test]
    fn the_sidecars_own_and_closing_sockets_are_not_the_app() {
        assert!(!foreign_open(TABLE, 1337), "1337's sockets and a TIME_WAIT");
        let listening = format!(
            "{TABLE}   3: 00000000:0050 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 4 1 0 100 0 0 10 0\n"
        );
        assert!(foreign_open(&listening, 1337), "the app listens on :80");
        let calling = format!(
            "{TABLE}   3: 0200000A:C000 0B00000A:0050 01 00000000:00000000 00:00000000 00000000  1000        0 5 1 0 20 4 30 10 -1\n"
        );
        assert!(foreign_open(&calling, 1337), "the app holds a connection");
        assert!(!foreign_open("", 1337));
    }
}
