//! The programs' rare-event log (datapath-ebpf's `events.rs`): aya-log
//! records in a ring buffer of the loaded object, read by the agent and
//! handed to a `log::Log` (the agent's is `tracing`'s, through the
//! `tracing-log` bridge its subscriber installs).

use aya_log::EbpfLogger;
use log::Log;

use super::{load::Datapath, options::DatapathLog};
use crate::error::LoaderError;

impl Datapath {
    /// The reader of this datapath's event log, writing to `logger`;
    /// `None` when it was loaded with [`DatapathLog::Off`]. Taken once.
    /// Programs attached from an earlier load keep writing to that load's
    /// ring buffer until the agent swaps its own in.
    pub fn take_event_log<T: Log>(
        &mut self,
        logger: T,
    ) -> Result<Option<EbpfLogger<T>>, LoaderError> {
        if self.datapath_log == DatapathLog::Off {
            return Ok(None);
        }
        EbpfLogger::init_with_logger(&mut self.ebpf, logger)
            .map(Some)
            .map_err(|e| LoaderError::EventLog {
                reason: e.to_string(),
            })
    }
}
