//! `sessionAffinity: ClientIP` on new flows of both paths: a client whose
//! last new flow to the frontend is recent goes to the same backend, if
//! that backend is still one of the frontend's (`AFFINITY_MATCH`). The
//! rule is `datapath_common::affinity`'s; only new flows pay, and
//! frontends without affinity pay one inlined array read.

use datapath_common::{
    affinity::{self, Decision},
    maps::{AffinityKey, AffinityMatchKey, AffinityValue},
};

use crate::{
    ct,
    maps::{AFFINITY, AFFINITY_MATCH, AFFINITY_TIMEOUT},
};

/// The affinity timeout of frontend `rev_nat_id` in jiffies (0: the
/// frontend has none).
#[inline(always)]
pub fn timeout(rev_nat_id: u32) -> u64 {
    AFFINITY_TIMEOUT.get(rev_nat_id).copied().unwrap_or(0)
}

/// The backend id a new flow of `client` (an address or a netns cookie,
/// as two words, `kind` in the top byte of `id_kind` below the 24-bit
/// reverse-NAT id) to a frontend with `timeout` goes to: the remembered
/// one while it holds, else `chosen` (the frontend's balancing). Writes
/// the client's entry when it changes or its stamp is due. The caller
/// checks the id it gets names a backend (and takes `chosen` if not).
///
/// Not inlined: a BPF-to-BPF call whose frame holds the key and the
/// value, which the new-flow paths have no stack left for (no tail call
/// is made from here, so it may sit under a frame of any size).
#[inline(never)]
pub fn backend(client_low: u64, client_high: u64, id_kind: u32, timeout: u64, chosen: u32) -> u32 {
    let rev_nat_id = id_kind & 0x00ff_ffff;
    let key = AffinityKey::new([client_low, client_high], rev_nat_id, (id_kind >> 24) as u8);
    let now = ct::now();
    // SAFETY: the value is copied out before any other map call.
    let remembered = unsafe { AFFINITY.get(key) }.map(|v| (v.last_used, v.backend_id));
    let still_member = |backend_id| {
        // SAFETY: only tested for presence.
        unsafe {
            AFFINITY_MATCH.get(AffinityMatchKey {
                backend_id,
                rev_nat_id,
            })
        }
        .is_some()
    };
    let backend_id = match affinity::decide(remembered, now, timeout, still_member) {
        Decision::Keep(backend_id) => backend_id,
        Decision::Choose => chosen,
    };
    if affinity::should_remember(remembered, backend_id, now, ct::refresh_interval(), timeout) {
        let value = AffinityValue {
            last_used: now,
            backend_id,
            _pad: 0,
        };
        // A failed write (the map full of entries being written at once)
        // costs the client its stickiness, not its flow.
        let _ = AFFINITY.insert(key, value, 0);
    }
    backend_id
}

/// `id_kind` of [`backend`]: a reverse-NAT id and an
/// `AFFINITY_CLIENT_*` kind in one argument (five is the most a BPF call
/// takes).
#[inline(always)]
pub const fn id_kind(rev_nat_id: u32, kind: u8) -> u32 {
    rev_nat_id & 0x00ff_ffff | (kind as u32) << 24
}
