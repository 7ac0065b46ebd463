//! The frontends a sync noted for one batched write (`super::bulk`), and
//! the errors of writes made on their behalf: plain data, held by the
//! maps' handles.

use std::collections::HashSet;

use datapath_common::maps::RevNatId;

use super::lb_maps::ProgramError;
use crate::model::{BackendEntry, Frontend};

/// Frontends noted for the next flush, and the errors of writes already
/// made on their behalf.
#[derive(Debug, Default)]
pub struct PendingWrites {
    /// On between `defer_new_frontends` and `flush`.
    pub(super) deferring: bool,
    pub(super) frontends: Vec<(Frontend, RevNatId, Vec<BackendEntry>)>,
    pub(super) noted: HashSet<Frontend>,
    /// Frontends a flush could not write (returned by the next `flush`).
    pub(super) failed: Vec<(Frontend, ProgramError)>,
}

impl PendingWrites {
    pub(super) fn is_noted(&self, frontend: &Frontend) -> bool {
        self.noted.contains(frontend)
    }

    pub(super) fn note(
        &mut self,
        frontend: Frontend,
        rev_nat_id: RevNatId,
        backends: &[BackendEntry],
    ) {
        self.noted.insert(frontend);
        self.frontends
            .push((frontend, rev_nat_id, backends.to_vec()));
    }

    pub(super) fn take_failed(&mut self) -> Vec<(Frontend, ProgramError)> {
        std::mem::take(&mut self.failed)
    }
}
