//! One agent per node. Two agents (a DaemonSet update that surges, a
//! second one started by hand) would swap each other's programs into the
//! pods every scan, and one's `REPLY_FILTER` rebuild could be trusted by
//! the other halfway. The agent holds an abstract Unix socket named after
//! its pin directory in the host's network namespace (where the DaemonSet
//! runs): the kernel refuses a second bind of the name and frees it when
//! the holder exits, however it exits, and no file is left behind.

use std::{
    os::linux::net::SocketAddrExt,
    os::unix::net::{SocketAddr, UnixListener},
    path::Path,
    time::Duration,
};

/// Held for the agent's life.
pub struct NodeLock {
    _listener: UnixListener,
}

/// The lock's name for `pin_dir`.
fn name(pin_dir: &Path) -> String {
    format!("underpass-agent:{}", pin_dir.display())
}

impl NodeLock {
    /// Takes the lock, or None while another agent holds it.
    pub fn try_acquire(pin_dir: &Path) -> std::io::Result<Option<Self>> {
        let address = SocketAddr::from_abstract_name(name(pin_dir).as_bytes())?;
        match UnixListener::bind_addr(&address) {
            Ok(listener) => Ok(Some(Self {
                _listener: listener,
            })),
            Err(e) if e.kind() == std::io::ErrorKind::AddrInUse => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Takes the lock, waiting (and saying so once) while another agent
    /// holds it.
    pub async fn acquire(pin_dir: &Path) -> std::io::Result<Self> {
        let mut told = false;
        loop {
            if let Some(lock) = Self::try_acquire(pin_dir)? {
                if told {
                    tracing::info!("the other agent stopped: starting");
                }
                return Ok(lock);
            }
            if !told {
                told = true;
                tracing::warn!(
                    pin_dir = %pin_dir.display(),
                    "another underpass agent serves this node (same pin directory): waiting for it to stop (one agent per node)"
                );
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}
