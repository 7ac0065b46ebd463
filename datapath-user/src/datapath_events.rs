//! The agent's side of the datapath's rare-event log: records are read
//! as the ring buffer signals them and handed to the logger the reader
//! was made with (`Datapath::take_event_log`), which for the agent is
//! `tracing` (target `underpass_ebpf::events`).

use aya_log::EbpfLogger;
use log::Log;
use tokio::io::{Interest, unix::AsyncFd};
use tracing::warn;

/// Forwards records until the ring buffer fails (it does not while the
/// agent runs).
pub async fn forward<T: Log + Send + 'static>(reader: EbpfLogger<T>) {
    // SAFETY: the descriptor is the ring buffer's map fd, owned by
    // `reader`, which the AsyncFd owns from here on: it stays open and the
    // same for the AsyncFd's whole life.
    let registered = unsafe { AsyncFd::register_with_interest(reader, Interest::READABLE) };
    let mut ring = match registered {
        Ok(ring) => ring,
        Err(e) => {
            warn!("the datapath's event log cannot be polled: {e}; its events are not logged");
            return;
        }
    };
    loop {
        let mut ready = match ring.readable_mut().await {
            Ok(ready) => ready,
            Err(e) => {
                warn!("polling the datapath's event log: {e}; its events are no longer logged");
                return;
            }
        };
        ready.get_inner_mut().flush();
        ready.clear_ready();
    }
}
