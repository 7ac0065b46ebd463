//! Conntrack map access shared by the egress and ingress programs. The
//! lifetime and state rules themselves are pure (`datapath_common::conntrack`).

use aya_ebpf::maps::LruHashMap;
use datapath_common::{
    conntrack::{Lifetimes, Tracked},
    maps::{CT_KIND_BACKEND, CT_KIND_SERVICE, CtKey},
};

use crate::{atomic, parse::Packet};

/// Conntrack lifetimes in ticks; the loader overwrites this read-only
/// global (`datapath_common::conntrack::LIFETIMES_GLOBAL`) with the
/// configured ones at the kernel's HZ. The default here assumes HZ=250 and
/// is never used by our loader.
#[unsafe(no_mangle)]
static CT_LIFETIMES: Lifetimes = Lifetimes::default_at(250);

#[inline(always)]
fn lifetimes() -> Lifetimes {
    // SAFETY: a read of our own static. Volatile, so that the compiler
    // reads the value the loader set instead of folding in the default.
    unsafe { core::ptr::read_volatile(&CT_LIFETIMES) }
}

/// The conntrack clock: jiffies. `bpf_jiffies64` is inlined by the
/// verifier into a load, where ktime helpers cost a call per packet.
#[inline(always)]
pub fn now() -> u64 {
    // SAFETY: plain helper call (inlined).
    unsafe { aya_ebpf::helpers::bpf_jiffies64() }
}

/// True when `flow` has outlived its lifetime.
#[inline(always)]
pub fn is_expired(flow: &impl Tracked, protocol: u8, now: u64) -> bool {
    lifetimes().is_expired(flow, protocol, now)
}

/// True when the SNAT port `entry` holds may go to a new flow
/// (`Lifetimes::snat_port_free`).
#[inline(always)]
pub fn snat_port_free(entry: &impl Tracked, protocol: u8, now: u64) -> bool {
    lifetimes().snat_port_free(entry, protocol, now)
}

/// True when this packet must write the flow's entry (state change or
/// refresh due).
#[inline(always)]
pub fn needs_write(flow: &impl Tracked, new_state: u8, now: u64) -> bool {
    lifetimes().needs_write(flow, new_state, now)
}

/// True when `at` is more than a refresh interval before `now`.
#[inline(always)]
pub fn refresh_due(at: u64, now: u64) -> bool {
    now.saturating_sub(at) > lifetimes().refresh
}

/// How old a stamp may get before a packet refreshes it, in jiffies.
#[inline(always)]
pub fn refresh_interval() -> u64 {
    lifetimes().refresh
}

/// True when MACs learned at `learned_at` may still be written.
#[inline(always)]
pub fn l2_is_fresh(learned_at: u64, now: u64) -> bool {
    datapath_common::conntrack::l2_is_fresh(&lifetimes(), learned_at, now)
}

/// The service-tuple key of a client packet (destination = VIP).
#[inline(always)]
pub fn service_key(
    client_address_be: u32,
    client_port_be: u16,
    service_address_be: u32,
    service_port_be: u16,
    protocol: u8,
) -> CtKey {
    CtKey {
        client_address_be,
        peer_address_be: service_address_be,
        client_port_be,
        peer_port_be: service_port_be,
        protocol,
        kind: CT_KIND_SERVICE,
        _pad: [0; 2],
    }
}

/// The backend-tuple key of a flow (destination = backend), as the client
/// sees it; replies are looked up with their addresses swapped into it.
#[inline(always)]
pub fn backend_key(
    client_address_be: u32,
    client_port_be: u16,
    backend_address_be: u32,
    backend_port_be: u16,
    protocol: u8,
) -> CtKey {
    CtKey {
        client_address_be,
        peer_address_be: backend_address_be,
        client_port_be,
        peer_port_be: backend_port_be,
        protocol,
        kind: CT_KIND_BACKEND,
        _pad: [0; 2],
    }
}

/// The backend-tuple key of a reply packet (source = backend).
#[inline(always)]
pub fn reply_key(packet: &Packet) -> CtKey {
    backend_key(
        packet.daddr_be,
        packet.dport_be,
        packet.saddr_be,
        packet.sport_be,
        packet.protocol,
    )
}

#[cfg(target_endian = "big")]
compile_error!("ct::record shifts the state byte into its word as on a little-endian target");

/// Records a packet of the flow at `now` in `entry`: the bits of `state`
/// the entry lacks are added with an atomic OR, the stamp is stored.
///
/// Atomic because a flow's directions meet on different CPUs (the
/// client's FIN on one, the backend's ACK or FIN on another; each also
/// mirrors its bits onto the other entry): with a plain
/// read-modify-write, the one that read first could write back the state
/// without the FIN the other just added, and a closed flow would then
/// live (holding its LRU slot, and on the uplink its SNAT port) for the
/// established lifetime. Only a state change pays for it; a refresh is a
/// plain store.
#[inline(always)]
pub fn record<V: Tracked>(entry: &mut V, state: u8, now: u64) {
    let new_bits = state & !entry.state();
    if new_bits != 0 {
        let word_offset = V::STATE_OFFSET & !7;
        let shift = (V::STATE_OFFSET & 7) * 8;
        // SAFETY: `entry` points into a map value, which the kernel keeps
        // 8-byte aligned; the word at `word_offset` is 8-byte aligned and
        // inside the entry (asserted where `Tracked` is implemented). Its
        // other bytes are fields the OR leaves as they are.
        unsafe {
            let word = (entry as *mut V)
                .cast::<u8>()
                .add(word_offset)
                .cast::<u64>();
            atomic::or(word, u64::from(new_bits) << shift);
        }
    }
    entry.set_last_seen(now);
}

/// Mirrors a refresh (state bits, timestamp) onto the flow's other entry.
/// Returns false when that entry is gone (evicted).
#[inline(always)]
pub fn mirror<K, V: Tracked>(table: &LruHashMap<K, V>, key: &K, state: u8, now: u64) -> bool {
    match table.get_ptr_mut(key) {
        Some(peer) => {
            // SAFETY: a pointer into the map value, valid for this program run.
            record(unsafe { &mut *peer }, state, now);
            true
        }
        None => false,
    }
}

/// Inserts (or replaces) an entry; false when the kernel refused.
#[inline(always)]
pub fn insert<K, V>(table: &LruHashMap<K, V>, key: &K, entry: &V) -> bool {
    table.insert(key, entry, 0).is_ok()
}
