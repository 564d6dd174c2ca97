//! The app beside a `--capture` sidecar: it shares the sidecar's network
//! namespace but not its processes (a compose service joined to its
//! sidecar), so the sidecar cannot wait for its process to end. Its
//! sockets tell instead: every TCP socket of the namespace is listed in
//! `/proc/self/net/tcp{,6}` with its owner's uid, and the app's are the
//! ones that are not the sidecar's (nor Docker's healthcheck talking to
//! the sidecar's admin port). An app with no socket at all for a moment
//! (a client between calls) is taken as gone only after a quiet spell.

use std::time::Duration;

use tokio::time::Instant;

/// How long the app must hold no socket to be taken as gone: a client
/// calling once a second holds one at least that often.
const QUIET: Duration = Duration::from_millis(1500);

/// Whether a socket of this network namespace owned by another uid than
/// `own_uid`, and not on port `ignore` (the sidecar's admin port, which
/// healthchecks call), listens or is connected: the app is still there.
pub fn app_has_sockets(own_uid: u32, ignore: u16) -> bool {
    ["/proc/self/net/tcp", "/proc/self/net/tcp6"]
        .iter()
        .any(|p| std::fs::read_to_string(p).is_ok_and(|t| foreign_open(&t, own_uid, ignore)))
}

/// The port of a `/proc/net/tcp` address (`0100007F:3A98`).
fn port(addr: &str) -> Option<u16> {
    u16::from_str_radix(addr.rsplit(':').next()?, 16).ok()
}

/// `/proc/net/tcp`'s table holds a listening (`0A`) or established (`01`)
/// socket of another uid than `own_uid`, on neither end port `ignore`.
fn foreign_open(table: &str, own_uid: u32, ignore: u16) -> bool {
    table.lines().skip(1).any(|line| {
        let fields: Vec<&str> = line.split_whitespace().collect();
        let (Some(local), Some(remote), Some(state), Some(uid)) =
            (fields.get(1), fields.get(2), fields.get(3), fields.get(7))
        else {
            return false;
        };
        let admin = port(local) == Some(ignore) || port(remote) == Some(ignore);
        !admin && uid.parse::<u32>().is_ok_and(|u| u != own_uid) && matches!(*state, "0A" | "01")
    })
}

/// Waits until the app has held no socket in the namespace for a quiet
/// spell (it exited), or until `deadline`; whether it went before.
pub async fn app_gone(own_uid: u32, ignore: u16, deadline: Instant) -> bool {
    let mut quiet_since = None;
    loop {
        if app_has_sockets(own_uid, ignore) {
            quiet_since = None;
        } else if quiet_since.get_or_insert_with(Instant::now).elapsed() >= QUIET {
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
        assert!(
            !foreign_open(TABLE, 1337, 15000),
            "1337's sockets and a TIME_WAIT"
        );
        // A healthcheck (root) talking to the admin port (15000 = 0x3A98).
        let health = format!(
            "{TABLE}   3: 0100007F:B000 0100007F:3A98 01 00000000:00000000 00:00000000 00000000     0        0 6 1 0 20 4 30 10 -1\n"
        );
        assert!(!foreign_open(&health, 1337, 15000), "Docker's healthcheck");
        let listening = format!(
            "{TABLE}   3: 00000000:0050 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 4 1 0 100 0 0 10 0\n"
        );
        assert!(
            foreign_open(&listening, 1337, 15000),
            "the app listens on :80"
        );
        let calling = format!(
            "{TABLE}   3: 0200000A:C000 0B00000A:0050 01 00000000:00000000 00:00000000 00000000  1000        0 5 1 0 20 4 30 10 -1\n"
        );
        assert!(
            foreign_open(&calling, 1337, 15000),
            "the app holds a connection"
        );
        assert!(!foreign_open("", 1337, 15000));
        assert_eq!(port("0100007F:3A98"), Some(15000));
    }
}
