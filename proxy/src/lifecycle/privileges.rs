//! Root only for as long as it takes to install the interception rules:
//! a sidecar started as root with `--capture` installs them, then becomes
//! the proxy uid (whose own connections the rules leave alone) for good.
//! Capabilities go with root: after `setuid` to another uid the kernel
//! clears them, so the long-running proxy holds no NET_ADMIN.

use nix::unistd::{Gid, Uid, setgid, setgroups, setuid};

/// Why root could not be given up.
#[derive(Debug, thiserror::Error)]
#[error("cannot drop privileges to uid {uid}: {source}")]
pub struct DropError {
    uid: u32,
    source: nix::Error,
}

/// Whether the process runs as root (and so may install rules).
pub fn is_root() -> bool {
    Uid::effective().is_root()
}

/// Becomes `uid` (group `uid`, no supplementary groups); a no-op when
/// already running as it.
pub fn drop_to(uid: u32) -> Result<(), DropError> {
    if Uid::effective().as_raw() == uid {
        return Ok(());
    }
    let err = |source| DropError { uid, source };
    setgroups(&[]).map_err(err)?;
    setgid(Gid::from_raw(uid)).map_err(err)?;
    setuid(Uid::from_raw(uid)).map_err(err)?;
    Ok(())
}
