//! `SERVICE_COUNTERS`: what each frontend was sent, per CPU, indexed by
//! its reverse-NAT id (one space for both families). Per CPU, so the
//! programs add without atomics and without a map write; the agent sums
//! the CPUs when it is asked (`/metrics`, `underpass service list`) and
//! zeroes an id's counters when it frees the id, so the next frontend to
//! get it starts at zero.

/// Value of `SERVICE_COUNTERS`, one per CPU per reverse-NAT id.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct ServiceCounters {
    /// Packets sent to the frontend that the TC path translated (new
    /// flows and tracked ones; replies are not counted), and datagrams
    /// socket-LB translated at `sendmsg()` (an unconnected UDP socket:
    /// one decision per datagram). Packets of sockets socket-LB connected
    /// go straight to the backend and are not seen.
    pub packets: u64,
    /// Flows the frontend was balanced for: a new flow on the TC path, a
    /// `connect()` socket-LB translated.
    pub new_flows: u64,
}

impl ServiceCounters {
    /// The sum of two CPUs' counters.
    #[inline(always)]
    pub const fn plus(self, other: Self) -> Self {
        Self {
            packets: self.packets.wrapping_add(other.packets),
            new_flows: self.new_flows.wrapping_add(other.new_flows),
        }
    }

    /// Nothing counted.
    #[inline(always)]
    pub const fn is_zero(&self) -> bool {
        self.packets == 0 && self.new_flows == 0
    }
}
