//! Many new frontends written at once: during a sync, a frontend the maps
//! do not hold yet is only noted by `set_service`, and `flush` writes all
//! of them: every slot into its block (stores into the mapped array), then
//! one batch per map — every backend, every reverse-NAT entry, the filter,
//! then every frontend entry. The order is
//! make-before-break's for the whole set: a frontend entry (what new
//! flows look up) is written after everything it names. A first sync of
//! 100,000 services made 700,000 syscalls one frontend at a time.
//!
//! Anything else that writes (a frontend already in the maps, a removal)
//! writes what is noted first, so the maps see every change in the order
//! the reconciler made it.

use aya::maps::IterableMap;
use datapath_common::{
    lb::service_filter_index,
    maps::{RevNatId, RevNatValue, ServiceKey, ServiceValue, Slot},
};

use super::{handles::DatapathMaps, slot_blocks::SlotBlocks, writer, writer_family};
use crate::model::{BackendEntry, Frontend};

/// Up to this many filter buckets are read one by one.
const FEW_BUCKETS: usize = 64;

impl DatapathMaps {
    /// Writes every noted frontend. A batch the kernel refuses (a map
    /// full, say) is followed by each frontend on its own, so that the
    /// errors name the frontends that do not fit; those are kept for the
    /// next `flush` to return.
    pub(super) fn write_pending(&mut self) {
        let frontends = std::mem::take(&mut self.pending.frontends);
        self.pending.noted.clear();
        if frontends.is_empty() {
            return;
        }
        let Err(batch_error) = self.write_batches(&frontends) else {
            return;
        };
        // Said even when every frontend then fits on its own: a batch the
        // kernel refused is worth knowing about (its own error is not in
        // the issues, which name frontends).
        tracing::info!(
            frontends = frontends.len(),
            "writing new frontends in batches failed ({batch_error}): writing each on its own"
        );
        let deferring = std::mem::replace(&mut self.pending.deferring, false);
        let unplaced: std::collections::HashSet<Frontend> =
            self.pending.failed.iter().map(|(f, _)| *f).collect();
        for (frontend, rev_nat_id, backends) in &frontends {
            if unplaced.contains(frontend) {
                continue;
            }
            if let Err(e) = super::LbMaps::set_service(self, frontend, *rev_nat_id, backends) {
                self.pending.failed.push((*frontend, e));
            }
        }
        self.pending.deferring = deferring;
    }

    fn write_batches(
        &mut self,
        frontends: &[(Frontend, RevNatId, Vec<BackendEntry>)],
    ) -> Result<(), aya::maps::MapError> {
        // Each frontend's block first: one that does not fit is left out
        // (and said so by the next flush); the others go on.
        let mut placed: Vec<(&Frontend, RevNatId, &[BackendEntry], u32, u8)> =
            Vec::with_capacity(frontends.len());
        for (frontend, rev_nat_id, entries) in frontends {
            let order = SlotBlocks::order_for(entries.len() as u16);
            match self.allocate_block(frontend, order) {
                Ok(first) => placed.push((frontend, *rev_nat_id, entries, first, order)),
                Err(error) => self.pending.failed.push((*frontend, error)),
            }
        }
        let result = self.write_placed(&placed);
        if let Err((published, _)) = &result {
            // Blocks no written entry names are free again at once.
            for &(_, _, _, first, order) in &placed[*published..] {
                self.blocks().release(first, order);
            }
        }
        result.map_err(|(_, error)| error)
    }

    /// Writes frontends whose blocks are chosen; on an error, also how many
    /// frontend entries (the first ones) were written.
    fn write_placed(
        &mut self,
        placed: &[(&Frontend, RevNatId, &[BackendEntry], u32, u8)],
    ) -> Result<(), (usize, aya::maps::MapError)> {
        let on_error = |(_, error)| (0, error);
        // Every window written is mapped before anything is written (a
        // failure writes nothing); a batch of a few frontends maps a few.
        for &(_, _, entries, first, _) in placed {
            for backend in entries {
                self.backends.map_range(backend.id, 1).map_err(|e| (0, e))?;
            }
            self.slots
                .map_range(first, entries.len() as u64)
                .map_err(|e| (0, e))?;
        }
        let mut rev_nat_ids: Vec<RevNatId> = Vec::with_capacity(placed.len());
        let mut rev_nats: Vec<RevNatValue> = Vec::with_capacity(placed.len());
        let mut head_keys: Vec<ServiceKey> = Vec::with_capacity(placed.len());
        let mut heads: Vec<ServiceValue> = Vec::with_capacity(placed.len());
        for &(frontend, rev_nat_id, entries, first, order) in placed {
            // Stores into the mappings (mapped above): ids validated when
            // noted, the block just allocated, so nothing falls outside.
            for backend in entries {
                self.backends
                    .set(
                        backend.id,
                        writer_family::backend_value(frontend.protocol, backend),
                    )
                    .map_err(|e| (0, e))?;
            }
            self.slots
                .write(first, entries.iter().map(|b| Slot::of(b.id)))
                .map_err(|e| (0, e))?;
            rev_nat_ids.push(rev_nat_id);
            rev_nats.push(writer_family::rev_nat_value(frontend));
            head_keys.push(frontend.key());
            // Validated when noted: at most MAX_BACKENDS_PER_SERVICE.
            heads.push(ServiceValue::new(
                first,
                order,
                entries.len() as u16,
                rev_nat_id,
                0,
            ));
        }
        super::batch::write_batch(IterableMap::map(&self.reverse_nat), &rev_nat_ids, &rev_nats)
            .map_err(on_error)?;
        // Counts raised before the frontends exist (a count too high only
        // costs a lookup; prune repairs it). Per bucket: the changed ones.
        let mut raised: std::collections::BTreeMap<u32, u32> = std::collections::BTreeMap::new();
        for key in &head_keys {
            let bucket = service_filter_index(key.address_be, key.port_be, key.protocol);
            *raised.entry(bucket).or_default() += 1;
        }
        // A few buckets are read one by one (a service created between
        // syncs must not read the whole 1 MiB array); many, in one batch.
        let current: Vec<u32> = if raised.len() <= FEW_BUCKETS {
            raised
                .keys()
                .map(|b| self.service_filter.get(b, 0))
                .collect::<Result<_, _>>()
                .map_err(|error| (0, error))?
        } else {
            let counts: Vec<u32> =
                super::batch::read_array(&self.service_filter).map_err(|error| (0, error))?;
            raised
                .keys()
                .map(|&b| counts.get(b as usize).copied().unwrap_or(0))
                .collect()
        };
        let buckets: Vec<u32> = raised.keys().copied().collect();
        let values: Vec<u32> = current
            .iter()
            .zip(raised.values())
            .map(|(have, add)| have.saturating_add(*add))
            .collect();
        super::batch::write_batch(IterableMap::map(&self.service_filter), &buckets, &values)
            .map_err(on_error)?;
        if let Err((written, error)) =
            super::batch::write_batch(IterableMap::map(&self.services), &head_keys, &heads)
        {
            // The frontends whose entry did not make it: their filter
            // counts back down (the first `written` are whole and stay).
            for (frontend, ..) in &placed[written..] {
                let bucket = writer_family::WriterFamily::filter_bucket(*frontend);
                let _ = writer::adjust_filter(&mut self.service_filter, bucket, -1);
            }
            return Err((written, error));
        }
        Ok(())
    }
}
