//! Many new frontends written at once: during a sync, a frontend the maps
//! do not hold yet is only noted by `set_service`, and `flush` writes all
//! of them with one batch per map — every backend, every reverse-NAT
//! entry, every slot, the filter, then every frontend entry. The order is
//! make-before-break's for the whole set: a frontend entry (what new
//! flows look up) is written after everything it names. A first sync of
//! 100,000 services made 700,000 syscalls one frontend at a time.
//!
//! Anything else that writes (a frontend already in the maps, a removal)
//! writes what is noted first, so the maps see every change in the order
//! the reconciler made it.

use aya::maps::IterableMap;
use datapath_common::{
    ipv4_be,
    lb::service_filter_index,
    maps::{self as m, Backend, BackendId, RevNatId, RevNatValue, ServiceKey, ServiceValue},
    port_be,
};

use super::{handles::DatapathMaps, writer};
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
        for (frontend, rev_nat_id, backends) in &frontends {
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
        let on_error = |(_, error)| error;
        let backend_count: usize = frontends.iter().map(|(_, _, b)| b.len()).sum();
        let mut backend_ids: Vec<BackendId> = Vec::with_capacity(backend_count);
        let mut backends: Vec<Backend> = Vec::with_capacity(backend_count);
        let mut rev_nat_ids: Vec<RevNatId> = Vec::with_capacity(frontends.len());
        let mut rev_nats: Vec<RevNatValue> = Vec::with_capacity(frontends.len());
        let mut slot_keys: Vec<ServiceKey> = Vec::with_capacity(backend_count);
        let mut slots: Vec<ServiceValue> = Vec::with_capacity(backend_count);
        let mut head_keys: Vec<ServiceKey> = Vec::with_capacity(frontends.len());
        let mut heads: Vec<ServiceValue> = Vec::with_capacity(frontends.len());
        // Where each frontend's slots start in `slot_keys`.
        let mut first_slot: Vec<usize> = Vec::with_capacity(frontends.len() + 1);
        for (frontend, rev_nat_id, entries) in frontends {
            first_slot.push(slot_keys.len());
            for (slot, backend) in entries.iter().enumerate() {
                backend_ids.push(backend.id);
                backends.push(Backend {
                    address_be: ipv4_be(backend.address.octets()),
                    port_be: port_be(backend.port),
                    protocol: frontend.protocol.number(),
                    flags: m::BACKEND_FLAG_PRESENT,
                });
                slot_keys.push(frontend.key(slot as u16 + 1));
                slots.push(ServiceValue::new(backend.id, 0, *rev_nat_id, 0));
            }
            rev_nat_ids.push(*rev_nat_id);
            rev_nats.push(writer::rev_nat_value(frontend));
            head_keys.push(frontend.key(0));
            // Validated when noted: at most MAX_BACKENDS_PER_SERVICE.
            heads.push(ServiceValue::new(0, entries.len() as u16, *rev_nat_id, 0));
        }
        first_slot.push(slot_keys.len());
        writer::write_batch(IterableMap::map(&self.backends), &backend_ids, &backends)
            .map_err(on_error)?;
        writer::write_batch(IterableMap::map(&self.reverse_nat), &rev_nat_ids, &rev_nats)
            .map_err(on_error)?;
        if let Err((written, error)) =
            writer::write_batch(IterableMap::map(&self.services), &slot_keys, &slots)
        {
            // No frontend counts these yet: out again, so that the writes
            // one by one that follow find the room they took.
            for key in &slot_keys[..written] {
                let _ = self.services.remove(key);
            }
            return Err(error);
        }
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
                .collect::<Result<_, _>>()?
        } else {
            let counts: Vec<u32> = writer::read_array(&self.service_filter)?;
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
        writer::write_batch(IterableMap::map(&self.service_filter), &buckets, &values)
            .map_err(on_error)?;
        if let Err((written, error)) =
            writer::write_batch(IterableMap::map(&self.services), &head_keys, &heads)
        {
            // The frontends whose entry did not make it: their slots out
            // again, as above (the first `written` are whole and stay),
            // and their filter counts back down.
            for key in &slot_keys[first_slot[written]..] {
                let _ = self.services.remove(key);
            }
            for (frontend, _, _) in &frontends[written..] {
                let _ = writer::adjust_filter(&mut self.service_filter, frontend, -1);
            }
            return Err(error);
        }
        Ok(())
    }
}
