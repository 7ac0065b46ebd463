//! Conntrack lifetimes and TCP state, as the datapath and the agent's
//! garbage collector both apply them.
//!
//! A flow has two entries (service tuple and backend tuple). Both carry the
//! same state and are refreshed together, so either direction can expire
//! the flow and a closed flow cannot leave a stale backend-tuple entry that
//! would rewrite the replies of a later, direct connection.

use crate::maps::{CtEntry, CtEntry6, UplinkSnat};

/// A conntrack entry of either family: the two fields the lifetime and
/// state rules read.
pub trait Tracked {
    /// Where the `STATE_*` byte sits in the entry. The datapath adds bits
    /// to it with an atomic OR on the 8-byte word holding it (BPF's
    /// atomics are 4 or 8 bytes wide, and the BPF target's Rust only has
    /// the latter): a flow's two directions run on different CPUs, and a
    /// plain read-modify-write from one could undo the FIN the other
    /// just added.
    const STATE_OFFSET: usize;
    /// Jiffies when the flow was last refreshed.
    fn last_seen(&self) -> u64;
    /// `STATE_*` bits.
    fn state(&self) -> u8;
    /// Sets the refresh stamp (a plain store: racing packets all write
    /// about the same time, any of them is right).
    fn set_last_seen(&mut self, now: u64);
}

/// Both entries have the same field names, in other places.
macro_rules! tracked {
    ($entry:ty) => {
        impl Tracked for $entry {
            const STATE_OFFSET: usize = core::mem::offset_of!($entry, state);
            #[inline(always)]
            fn last_seen(&self) -> u64 {
                self.last_seen
            }
            #[inline(always)]
            fn state(&self) -> u8 {
                self.state
            }
            #[inline(always)]
            fn set_last_seen(&mut self, now: u64) {
                self.last_seen = now;
            }
        }
        // The word the atomic OR touches lies inside the entry, aligned.
        const _: () = assert!(
            core::mem::offset_of!($entry, state) / 8 * 8 + 8 <= core::mem::size_of::<$entry>()
                && core::mem::align_of::<$entry>() >= 8
        );
    };
}
tracked!(CtEntry);
tracked!(CtEntry6);
tracked!(UplinkSnat);

/// A non-SYN packet was seen: the handshake is over (lifetime: established).
pub const STATE_SEEN_NON_SYN: u8 = 1 << 0;
/// The client sent FIN: its half is closed, the backend's may still carry
/// data for as long as it likes (a half-closed stream stays established).
pub const STATE_FIN_TX: u8 = 1 << 1;
/// The backend sent FIN.
pub const STATE_FIN_RX: u8 = 1 << 2;
/// Either side sent RST: the connection is over.
pub const STATE_RST: u8 = 1 << 3;
/// Any of the above: the connection is ending or over; a new SYN on its
/// tuple starts another one.
pub const STATE_ANY_CLOSE: u8 = STATE_FIN_TX | STATE_FIN_RX | STATE_RST;
/// The backend's FIN came before any FIN or RST from the client: the
/// backend closed actively, so its socket lingers in TIME_WAIT after
/// the flow is over (when the client closes first, the backend's goes
/// from LAST_ACK straight to CLOSED). Read by `snat_port_free`.
pub const STATE_BACKEND_CLOSED_FIRST: u8 = 1 << 4;

/// True when the connection is over: a RST, or a FIN from both sides. Only
/// then does the short closing lifetime apply.
#[inline(always)]
pub const fn is_closed(state: u8) -> bool {
    state & STATE_RST != 0 || state & (STATE_FIN_TX | STATE_FIN_RX) == STATE_FIN_TX | STATE_FIN_RX
}

/// A TCP flow that only saw SYNs (Cilium's `CT_SYN_TIMEOUT`), seconds.
pub const TCP_SYN_LIFETIME_SECS: u64 = 60;
/// An established TCP flow (Cilium's `CT_CONNECTION_LIFETIME_TCP`, 6 h).
pub const TCP_ESTABLISHED_LIFETIME_SECS: u64 = 6 * 3600;
/// A TCP flow after a FIN or RST (Cilium's `CT_CLOSE_TIMEOUT`).
pub const TCP_CLOSING_LIFETIME_SECS: u64 = 10;
/// UDP flows (Cilium's `CT_CONNECTION_LIFETIME_NONTCP`).
pub const UDP_LIFETIME_SECS: u64 = 60;
/// How stale `last_seen` may get before a packet writes it again. Writes
/// to an LRU entry dirty a shared cache line, so the hot path skips them;
/// this bounds how early (at most this much) a busy flow could expire.
pub const REFRESH_INTERVAL_SECS: u64 = 1;
/// How long next-hop MACs learned from a reply are written without a newer
/// reply confirming them (replies refresh them once a refresh interval).
/// After that the kernel resolves the next hop again (`bpf_redirect_neigh`),
/// so a flow that gets no replies follows a gateway failover within this
/// time plus the kernel's neighbour timers.
pub const L2_FRESH_SECS: u64 = 5;
/// How long after its last packet a TCP flow the backend closed first
/// keeps its SNAT port (north-south, `UPLINK_SNAT`) from other flows:
/// the backend holds the tuple in TIME_WAIT (60 s on Linux), and
/// netfilter's NAT waits 120 s.
pub const SNAT_PORT_REUSE_SECS: u64 = 120;
/// How long after its last packet a TCP flow that is over without the
/// backend's TIME_WAIT (the client closed first, or a reset) keeps its
/// SNAT port: the backend's socket is closed once the client's last ACK
/// arrives, or after a few FIN retransmissions (200 ms and up) if that
/// ACK is lost. Holding the port for the whole closing lifetime (10 s)
/// instead caps a backend at a tenth of the range's size in new
/// connections a second (450/s at the default 4,536 ports, 5,000/s over
/// 50,000); the flow's entry still lives that long, for its stray
/// packets. Counted from the entry's last write (a state change, or at
/// most one refresh interval), not strictly its last packet.
pub const SNAT_PORT_CLOSED_SECS: u64 = 2;

/// TCP flag bits as they sit in byte 13 of the TCP header.
pub const TCP_FIN: u8 = 0x01;
pub const TCP_SYN: u8 = 0x02;
pub const TCP_RST: u8 = 0x04;

/// Which way a packet travels relative to the client.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Direction {
    /// Client → service (egress on the client's interface).
    Original,
    /// Backend → client (ingress on the client's interface).
    Reply,
}

/// Conntrack lifetimes in kernel ticks (jiffies), set when the object is
/// loaded: a read-only global the verifier treats as constant, so
/// configuring them costs nothing per packet.
///
/// The clock is jiffies because `bpf_jiffies64` is inlined into a plain
/// load, where reading ktime is a helper call costing tens of ns per packet
/// (Cilium makes the same choice). User space converts with the kernel's
/// HZ.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Lifetimes {
    pub tcp_syn: u64,
    pub tcp_established: u64,
    pub tcp_closing: u64,
    pub udp: u64,
    /// How old `last_seen` may get before a packet refreshes it.
    pub refresh: u64,
    /// How long learned next-hop MACs are used without a reply confirming
    /// them.
    pub l2_fresh: u64,
    /// How long a TCP flow the backend closed first keeps its SNAT port
    /// (`SNAT_PORT_REUSE_SECS`).
    pub snat_port_reuse: u64,
    /// How long a TCP flow the client closed first, or reset, keeps its
    /// SNAT port (`SNAT_PORT_CLOSED_SECS`).
    pub snat_port_closed: u64,
}

impl Lifetimes {
    /// The default lifetimes at `hz` ticks per second.
    pub const fn default_at(hz: u64) -> Self {
        Self {
            tcp_syn: TCP_SYN_LIFETIME_SECS * hz,
            tcp_established: TCP_ESTABLISHED_LIFETIME_SECS * hz,
            tcp_closing: TCP_CLOSING_LIFETIME_SECS * hz,
            udp: UDP_LIFETIME_SECS * hz,
            refresh: REFRESH_INTERVAL_SECS * hz,
            l2_fresh: L2_FRESH_SECS * hz,
            snat_port_reuse: SNAT_PORT_REUSE_SECS * hz,
            snat_port_closed: SNAT_PORT_CLOSED_SECS * hz,
        }
    }

    /// True when the SNAT port `entry` holds may go to a new flow: a TCP
    /// flow that is over, once the backend has left TIME_WAIT if it
    /// closed first (a new SYN on a tuple in TIME_WAIT is taken only when
    /// its sequence number or timestamp is higher; another client's
    /// behind the same port often is not), else shortly after its last
    /// packet; any other flow once it has expired.
    #[inline(always)]
    pub fn snat_port_free(&self, entry: &impl Tracked, protocol: u8, now: u64) -> bool {
        let state = entry.state();
        if protocol == crate::IPPROTO_TCP && is_closed(state) {
            let hold = if state & STATE_BACKEND_CLOSED_FIRST != 0 {
                self.snat_port_reuse
            } else {
                self.snat_port_closed
            };
            return now.saturating_sub(entry.last_seen()) > hold;
        }
        self.is_expired(entry, protocol, now)
    }

    /// How long a flow in `state` lives after its last refresh.
    #[inline(always)]
    pub const fn of(&self, protocol: u8, state: u8) -> u64 {
        if protocol != crate::IPPROTO_TCP {
            self.udp
        } else if is_closed(state) {
            self.tcp_closing
        } else if state & STATE_SEEN_NON_SYN != 0 {
            self.tcp_established
        } else {
            self.tcp_syn
        }
    }

    /// True when `entry` has outlived its state's lifetime at `now`.
    #[inline(always)]
    pub fn is_expired(&self, entry: &impl Tracked, protocol: u8, now: u64) -> bool {
        now.saturating_sub(entry.last_seen()) > self.of(protocol, entry.state())
    }

    /// True when a packet must write the entry: its state changes, or the
    /// last refresh is older than `refresh`.
    #[inline(always)]
    pub fn needs_write(&self, entry: &impl Tracked, new_state: u8, now: u64) -> bool {
        new_state != entry.state() || now.saturating_sub(entry.last_seen()) > self.refresh
    }
}

#[cfg(feature = "user")]
// SAFETY: repr(C), eight u64, no padding.
unsafe impl aya::Pod for Lifetimes {}

/// The name of the global holding `Lifetimes` in the object.
pub const LIFETIMES_GLOBAL: &str = "CT_LIFETIMES";

/// The state after a packet with `tcp_flags` (0 for UDP) travels in
/// `direction`.
#[inline(always)]
pub const fn next_state(state: u8, protocol: u8, tcp_flags: u8, direction: Direction) -> u8 {
    if protocol != crate::IPPROTO_TCP {
        return state;
    }
    let mut next = state;
    if tcp_flags & TCP_SYN == 0 {
        next |= STATE_SEEN_NON_SYN;
    }
    if tcp_flags & TCP_RST != 0 {
        next |= STATE_RST;
    }
    if tcp_flags & TCP_FIN != 0 {
        next |= match direction {
            Direction::Original => STATE_FIN_TX,
            Direction::Reply if state & (STATE_FIN_TX | STATE_RST) == 0 => {
                STATE_FIN_RX | STATE_BACKEND_CLOSED_FIRST
            }
            Direction::Reply => STATE_FIN_RX,
        };
    }
    next
}

/// The state a new flow starts in, from its first (client) packet.
#[inline(always)]
pub const fn initial_state(protocol: u8, tcp_flags: u8) -> u8 {
    next_state(0, protocol, tcp_flags, Direction::Original)
}

/// A TCP SYN (without ACK) opens a new connection: if it meets an old
/// entry for the same tuple that saw a FIN or RST, the old flow is over
/// (a client sends a bare SYN on a tuple only after its socket is gone)
/// and the new one must be balanced afresh (client port reuse).
#[inline(always)]
pub fn syn_reopens(entry: &impl Tracked, protocol: u8, tcp_flags: u8) -> bool {
    protocol == crate::IPPROTO_TCP
        && tcp_flags & TCP_SYN != 0
        && tcp_flags & TCP_ACK == 0
        && entry.state() & STATE_ANY_CLOSE != 0
}

/// True when next-hop MACs learned at `learned_at` may still be written at
/// `now`.
#[inline(always)]
pub const fn l2_is_fresh(lifetimes: &Lifetimes, learned_at: u64, now: u64) -> bool {
    now.saturating_sub(learned_at) <= lifetimes.l2_fresh
}

pub const TCP_ACK: u8 = 0x10;
pub const TCP_PSH: u8 = 0x08;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{IPPROTO_TCP, IPPROTO_UDP};

    const HZ: u64 = 250;
    const L: Lifetimes = Lifetimes::default_at(HZ);

    fn entry(state: u8, last_seen: u64) -> CtEntry {
        CtEntry {
            state,
            last_seen,
            ..CtEntry::default()
        }
    }

    #[test]
    fn tcp_handshake_moves_from_syn_to_established_lifetime() {
        let s = initial_state(IPPROTO_TCP, TCP_SYN);
        assert_eq!(L.of(IPPROTO_TCP, s), 60 * HZ);
        let s = next_state(s, IPPROTO_TCP, TCP_SYN | TCP_ACK, Direction::Reply);
        assert_eq!(L.of(IPPROTO_TCP, s), 60 * HZ);
        let s = next_state(s, IPPROTO_TCP, TCP_ACK, Direction::Original);
        assert_eq!(L.of(IPPROTO_TCP, s), 6 * 3600 * HZ);
        // The backend's FIN half-closes: the client may still send for
        // as long as it likes, so the flow stays established.
        let s = next_state(s, IPPROTO_TCP, TCP_FIN | TCP_ACK, Direction::Reply);
        assert_eq!(s & STATE_FIN_RX, STATE_FIN_RX);
        assert_eq!(L.of(IPPROTO_TCP, s), 6 * 3600 * HZ, "half-closed");
        let s = next_state(s, IPPROTO_TCP, TCP_ACK | TCP_PSH, Direction::Original);
        assert_eq!(L.of(IPPROTO_TCP, s), 6 * 3600 * HZ, "still half-closed");
        // Both FINs: closed.
        let s = next_state(s, IPPROTO_TCP, TCP_FIN | TCP_ACK, Direction::Original);
        assert!(is_closed(s));
        assert_eq!(L.of(IPPROTO_TCP, s), 10 * HZ);
    }

    #[test]
    fn a_fin_from_one_side_twice_is_still_half_closed() {
        let s = next_state(
            STATE_SEEN_NON_SYN,
            IPPROTO_TCP,
            TCP_FIN,
            Direction::Original,
        );
        let s = next_state(s, IPPROTO_TCP, TCP_FIN, Direction::Original);
        assert!(!is_closed(s));
        assert_eq!(L.of(IPPROTO_TCP, s), 6 * 3600 * HZ);
    }

    #[test]
    fn rst_from_client_closes() {
        let s = next_state(
            STATE_SEEN_NON_SYN,
            IPPROTO_TCP,
            TCP_RST,
            Direction::Original,
        );
        assert_eq!(s, STATE_SEEN_NON_SYN | STATE_RST);
        assert_eq!(L.of(IPPROTO_TCP, s), 10 * HZ);
        let s = next_state(STATE_SEEN_NON_SYN, IPPROTO_TCP, TCP_RST, Direction::Reply);
        assert_eq!(L.of(IPPROTO_TCP, s), 10 * HZ, "a RST from the backend too");
    }

    #[test]
    fn mid_stream_pickup_is_established() {
        // After an agent restart lost the table, the first packet seen is
        // an ACK: it must not get the short SYN lifetime.
        let s = initial_state(IPPROTO_TCP, TCP_ACK);
        assert_eq!(L.of(IPPROTO_TCP, s), 6 * 3600 * HZ);
    }

    #[test]
    fn udp_ignores_flags_and_has_its_own_lifetime() {
        assert_eq!(next_state(0, IPPROTO_UDP, 0xff, Direction::Reply), 0);
        assert_eq!(L.of(IPPROTO_UDP, 0), 60 * HZ);
    }

    #[test]
    fn expiry_is_strictly_after_the_lifetime() {
        let e = entry(0, 1_000);
        assert!(!L.is_expired(&e, IPPROTO_UDP, 1_000 + 60 * HZ));
        assert!(L.is_expired(&e, IPPROTO_UDP, 1_001 + 60 * HZ));
        // A clock behind last_seen (entry written by another CPU a moment
        // later) is not expired.
        assert!(!L.is_expired(&e, IPPROTO_UDP, 0));
    }

    #[test]
    fn refresh_is_rate_limited_but_state_changes_always_write() {
        let e = entry(STATE_SEEN_NON_SYN, 5 * HZ);
        assert!(!L.needs_write(&e, STATE_SEEN_NON_SYN, 6 * HZ));
        assert!(L.needs_write(&e, STATE_SEEN_NON_SYN, 6 * HZ + 1));
        assert!(L.needs_write(&e, STATE_SEEN_NON_SYN | STATE_FIN_TX, 5 * HZ));
    }

    #[test]
    fn syn_after_close_reopens() {
        let closed = entry(STATE_SEEN_NON_SYN | STATE_FIN_TX, 0);
        assert!(syn_reopens(&closed, IPPROTO_TCP, TCP_SYN));
        assert!(!syn_reopens(&closed, IPPROTO_TCP, TCP_SYN | TCP_ACK));
        assert!(!syn_reopens(
            &entry(STATE_SEEN_NON_SYN, 0),
            IPPROTO_TCP,
            TCP_SYN
        ));
        assert!(!syn_reopens(&closed, IPPROTO_UDP, TCP_SYN));
    }
}

#[cfg(test)]
mod l2_tests {
    use super::*;

    #[test]
    fn learned_macs_are_trusted_for_l2_fresh_only() {
        let l = Lifetimes::default_at(100);
        assert!(l2_is_fresh(&l, 1_000, 1_000 + 5 * 100));
        assert!(!l2_is_fresh(&l, 1_000, 1_001 + 5 * 100));
        assert!(l2_is_fresh(&l, 1_000, 999), "a clock behind is fresh");
    }
}

#[cfg(test)]
mod snat_port_tests {
    use super::*;

    /// The state a TCP flow ends in after `packets` (flags, direction).
    fn through(packets: &[(u8, Direction)]) -> u8 {
        packets.iter().fold(
            initial_state(crate::IPPROTO_TCP, TCP_SYN),
            |state, &(flags, dir)| next_state(state, crate::IPPROTO_TCP, flags, dir),
        )
    }

    #[test]
    fn a_flow_the_backend_closed_first_keeps_its_snat_port_past_the_backends_time_wait() {
        use Direction::{Original, Reply};
        let lifetimes = Lifetimes::default_at(100);
        let established = [(TCP_SYN | TCP_ACK, Reply), (TCP_ACK, Original)];
        let backend_first = through(&[
            established[0],
            established[1],
            (TCP_FIN | TCP_ACK, Reply),
            (TCP_FIN | TCP_ACK, Original),
        ]);
        let client_first = through(&[
            established[0],
            established[1],
            (TCP_FIN | TCP_ACK, Original),
            (TCP_FIN | TCP_ACK, Reply),
        ]);
        let reset = through(&[established[0], (TCP_RST, Original), (TCP_FIN, Reply)]);
        assert!(is_closed(backend_first) && is_closed(client_first) && is_closed(reset));
        assert_ne!(backend_first & STATE_BACKEND_CLOSED_FIRST, 0);
        assert_eq!(client_first & STATE_BACKEND_CLOSED_FIRST, 0);
        assert_eq!(reset & STATE_BACKEND_CLOSED_FIRST, 0);
        let at = |state: u8| crate::maps::UplinkSnat {
            last_seen: 1_000,
            state,
            ..Default::default()
        };
        let after = |secs: u64| 1_000 + secs * 100;
        let free = |state: u8, secs: u64| {
            lifetimes.snat_port_free(&at(state), crate::IPPROTO_TCP, after(secs))
        };
        for state in [backend_first, client_first, reset] {
            assert!(
                !free(state, 1),
                "its last ACK may still be on the way {state:#x}"
            );
        }
        assert!(
            !free(backend_first, 30),
            "expired, but the backend is in TIME_WAIT"
        );
        assert!(free(backend_first, 121));
        assert!(
            free(client_first, SNAT_PORT_CLOSED_SECS + 1),
            "the backend went from LAST_ACK to CLOSED: nothing lingers, and the port is free \
             long before the flow's entry expires"
        );
        const { assert!(SNAT_PORT_CLOSED_SECS + 1 < TCP_CLOSING_LIFETIME_SECS) };
        assert!(free(reset, SNAT_PORT_CLOSED_SECS + 1));
        assert!(
            !free(through(&established), TCP_CLOSING_LIFETIME_SECS + 1),
            "an established flow lives on"
        );
        assert!(lifetimes.snat_port_free(&at(0), crate::IPPROTO_UDP, after(UDP_LIFETIME_SECS + 1)));
    }
}
