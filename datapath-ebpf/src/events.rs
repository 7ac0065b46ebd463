//! Rare datapath events, logged through aya-log (the agent reads them and
//! forwards them into `tracing`). Each sits beside the counter that
//! counts it; the log says what the counter cannot: which service, which
//! table. The level is fixed at load (`AYA_LOG_LEVEL`, a read-only
//! global): an event below it is removed by the verifier as dead code, so
//! the per-packet path pays nothing for it. None of these is on the path
//! of a packet that is translated normally.

use aya_ebpf::EbpfContext;
use aya_log_ebpf::{info, warn};

/// A new flow to a service without endpoints was refused (TC: ICMP port
/// unreachable into the pod; socket-LB: `connect()` fails). Info: an
/// application's condition, not the datapath's.
#[inline(always)]
pub fn no_backend<C: EbpfContext>(ctx: &C, address_be: u32, port_be: u16, protocol: u8) {
    info!(
        ctx,
        "service {:i}:{} (IP protocol {}) has no endpoints: new flow refused",
        u32::from_be(address_be),
        u16::from_be(port_be),
        protocol
    );
}

/// `no_backend` of an IPv6 frontend.
#[inline(always)]
pub fn no_backend6<C: EbpfContext>(ctx: &C, address_be: [u32; 4], port_be: u16, protocol: u8) {
    // SAFETY: four words in network order are the address's 16 bytes.
    let octets: [u8; 16] = unsafe { core::mem::transmute(address_be) };
    info!(
        ctx,
        "service [{:i}]:{} (IP protocol {}) has no endpoints: new flow refused",
        octets,
        u16::from_be(port_be),
        protocol
    );
}

/// A conntrack entry could not be written (the table is full and the LRU
/// found nothing to evict, or the kernel is out of memory): the flow's
/// replies may not be reverse-translated.
#[inline(always)]
pub fn conntrack_insert_failed<C: EbpfContext>(ctx: &C, protocol: u8) {
    warn!(
        ctx,
        "conntrack insert failed (IP protocol {}): table full? raise --conntrack-max or --conntrack-udp-max",
        protocol
    );
}

/// A first fragment's ports could not be remembered: the rest of its
/// datagram passes untranslated.
#[inline(always)]
pub fn fragment_table_full<C: EbpfContext>(ctx: &C) {
    warn!(
        ctx,
        "fragment table full: later fragments of a translated datagram will pass untranslated"
    );
}

/// Socket-LB could not remember a socket's backend: its replies will show
/// the backend's address instead of the service's.
#[inline(always)]
pub fn sock_reverse_nat_insert_failed<C: EbpfContext>(ctx: &C) {
    warn!(
        ctx,
        "socket-LB reverse-NAT insert failed (table full?): replies will show the backend's address"
    );
}
