//! The agent's side of the datapath's rare-event log: records are read
//! as the ring buffer signals them and handed to the agent's logger
//! (`tracing`, target `underpass_ebpf::events`), at most
//! [`EVENTS_PER_SECOND`] a second: a table that stays full, or a client
//! retrying against a service without endpoints, would otherwise log
//! every packet. What is held back is counted and said once a second.

use std::{
    panic::AssertUnwindSafe,
    sync::Mutex,
    time::{Duration, Instant},
};

use aya_log::EbpfLogger;
use log::Log;
use tokio::io::{Interest, unix::AsyncFd};
use tracing::warn;

/// Records passed on per second; the rest are counted.
pub const EVENTS_PER_SECOND: u32 = 20;

/// Forwards records until the ring buffer fails (it does not while the
/// agent runs) or a record cannot be read (aya-log panics on one it
/// cannot parse: forwarding then stops, said once).
pub async fn forward<T: Log + Send + 'static>(reader: EbpfLogger<RateLimited<T>>) {
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
        let flushed = std::panic::catch_unwind(AssertUnwindSafe(|| ready.get_inner_mut().flush()));
        if flushed.is_err() {
            warn!("a datapath event could not be read; its events are no longer logged");
            return;
        }
        ready.clear_ready();
    }
}

/// A logger that passes on at most `per_second` records a second and
/// reports how many it held back when the next second begins.
pub struct RateLimited<T> {
    inner: T,
    per_second: u32,
    window: Mutex<Window>,
}

struct Window {
    started: Instant,
    passed: u32,
    held_back: u64,
}

impl<T: Log> RateLimited<T> {
    pub fn new(inner: T, per_second: u32) -> Self {
        Self {
            inner,
            per_second,
            window: Mutex::new(Window {
                started: Instant::now(),
                passed: 0,
                held_back: 0,
            }),
        }
    }

    /// Whether `now`'s record may pass; a new window reports the last
    /// one's held-back count first.
    fn admit(&self, now: Instant) -> bool {
        let mut window = self.window.lock().unwrap_or_else(|p| p.into_inner());
        if now.duration_since(window.started) >= Duration::from_secs(1) {
            if window.held_back > 0 {
                warn!(
                    target: "underpass_ebpf::events",
                    "{} more datapath events in the last second not logged (at most {} a second)",
                    window.held_back,
                    self.per_second
                );
            }
            *window = Window {
                started: now,
                passed: 0,
                held_back: 0,
            };
        }
        if window.passed < self.per_second {
            window.passed += 1;
            true
        } else {
            window.held_back += 1;
            false
        }
    }
}

impl<T: Log> Log for RateLimited<T> {
    fn enabled(&self, metadata: &log::Metadata) -> bool {
        self.inner.enabled(metadata)
    }

    fn log(&self, record: &log::Record) {
        if self.inner.enabled(record.metadata()) && self.admit(Instant::now()) {
            self.inner.log(record);
        }
    }

    fn flush(&self) {
        self.inner.flush();
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use super::*;

    #[derive(Clone, Default)]
    struct Count(Arc<Mutex<u32>>);

    impl Log for Count {
        fn enabled(&self, _: &log::Metadata) -> bool {
            true
        }
        fn log(&self, _: &log::Record) {
            *self.0.lock().unwrap() += 1;
        }
        fn flush(&self) {}
    }

    #[test]
    fn a_flood_is_cut_to_the_rate_and_the_next_second_passes_again() {
        let count = Count::default();
        let limited = RateLimited::new(count.clone(), 3);
        let record = log::Record::builder()
            .args(format_args!("table full"))
            .level(log::Level::Warn)
            .build();
        for _ in 0..100 {
            limited.log(&record);
        }
        assert_eq!(*count.0.lock().unwrap(), 3, "at most 3 in a second");
        // The next second.
        limited.window.lock().unwrap().started -= Duration::from_secs(1);
        limited.log(&record);
        assert_eq!(*count.0.lock().unwrap(), 4, "passes again");
        assert_eq!(limited.window.lock().unwrap().held_back, 0, "counted anew");
    }
}
