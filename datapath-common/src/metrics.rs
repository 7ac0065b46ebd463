//! Per-CPU counters: `COUNTERS` is a per-CPU array of u64 indexed by
//! `Counter`; user space sums the CPUs.

/// One counter per event the datapath reports.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Counter {
    /// TC egress: packets of a tracked flow DNATed (conntrack hit).
    ConntrackHit = 0,
    /// TC egress: new flows balanced and DNATed (conntrack miss). Packets
    /// translated on the TC path = hits + misses.
    ConntrackMiss = 1,
    /// TC ingress: replies rewritten back to the service address.
    ReverseTranslated = 2,
    /// A service with no backend refused a new flow (TC: with an ICMP port
    /// unreachable into the pod; socket-LB: `connect()` fails).
    NoBackend = 3,
    /// IPv4 frames too short or malformed to parse.
    NotParsed = 4,
    /// Non-first IPv4 fragments of datagrams the datapath did not
    /// translate (its first fragment was not for a service, or not seen):
    /// passed untouched.
    Fragment = 5,
    /// Inconsistent maps (a slot naming a missing backend) or a failed helper.
    Error = 6,
    /// Socket-LB: connect/sendmsg rewritten to a backend.
    SockTranslated = 7,
    /// Socket-LB: getpeername/recvmsg rewritten back to the service.
    SockReverseTranslated = 8,
    /// Non-first IPv4 fragments translated like their datagram's first
    /// fragment (both directions).
    FragmentTranslated = 9,
    /// ICMP errors (destination unreachable, fragmentation needed, time
    /// exceeded) about a translated flow, translated outer and embedded
    /// headers alike (both directions).
    IcmpErrorTranslated = 10,
    /// Flows given another source port because their wire tuple (client,
    /// port, backend, port) was held by another flow: two services on one
    /// backend, or a service flow and a connection straight to the pod.
    PortClash = 11,
    /// TC egress: an IPv6 packet with extension headers or a fragment
    /// header that passed untranslated because the program for such
    /// packets (`up_tc_egress6_ext`) was missing from the jump table (an
    /// inconsistent installation; zero otherwise).
    Ipv6Untranslated = 12,
    /// Uplink (XDP): packets from outside to a north-south frontend
    /// translated (new flows and tracked ones).
    NorthSouthTranslated = 13,
    /// Replies of north-south flows translated back to the frontend: on
    /// the pod's TC egress (a backend on this node).
    NorthSouthReverseTranslated = 14,
    /// Uplink (XDP): packets to a north-south frontend passed to the
    /// stack untranslated: a fragment, a backend this node cannot hand
    /// the packet to (not on this uplink).
    NorthSouthPassed = 15,
    /// Uplink (XDP): new flows to a backend on another node dropped
    /// because its neighbour (or next hop) was not resolved yet; the
    /// agent keeps a managed entry for every such backend, and the
    /// client's retransmission finds it.
    NorthSouthNoNeighbour = 16,
    /// Uplink (XDP): new flows to a backend on another node for which no
    /// SNAT port was free (every try held by a live flow to that backend):
    /// passed to the stack. Raise `--snat-ports`.
    NorthSouthNoPort = 17,
}

/// Number of slots in `COUNTERS`.
pub const COUNTER_COUNT: u32 = 18;

impl Counter {
    /// Every counter, in index order.
    pub const ALL: [Counter; COUNTER_COUNT as usize] = [
        Counter::ConntrackHit,
        Counter::ConntrackMiss,
        Counter::ReverseTranslated,
        Counter::NoBackend,
        Counter::NotParsed,
        Counter::Fragment,
        Counter::Error,
        Counter::SockTranslated,
        Counter::SockReverseTranslated,
        Counter::FragmentTranslated,
        Counter::IcmpErrorTranslated,
        Counter::PortClash,
        Counter::Ipv6Untranslated,
        Counter::NorthSouthTranslated,
        Counter::NorthSouthReverseTranslated,
        Counter::NorthSouthPassed,
        Counter::NorthSouthNoNeighbour,
        Counter::NorthSouthNoPort,
    ];

    /// The snake_case name used in metrics and CLI output.
    pub const fn name(self) -> &'static str {
        match self {
            Counter::ConntrackHit => "conntrack_hit",
            Counter::ConntrackMiss => "conntrack_miss",
            Counter::ReverseTranslated => "reverse_translated",
            Counter::NoBackend => "no_backend",
            Counter::NotParsed => "not_parsed",
            Counter::Fragment => "fragment",
            Counter::Error => "error",
            Counter::SockTranslated => "sock_translated",
            Counter::SockReverseTranslated => "sock_reverse_translated",
            Counter::FragmentTranslated => "fragment_translated",
            Counter::IcmpErrorTranslated => "icmp_error_translated",
            Counter::PortClash => "port_clash",
            Counter::Ipv6Untranslated => "ipv6_untranslated",
            Counter::NorthSouthTranslated => "north_south_translated",
            Counter::NorthSouthReverseTranslated => "north_south_reverse_translated",
            Counter::NorthSouthPassed => "north_south_passed",
            Counter::NorthSouthNoNeighbour => "north_south_no_neighbour",
            Counter::NorthSouthNoPort => "north_south_no_port",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn indices_are_dense_and_in_order() {
        for (i, c) in Counter::ALL.iter().enumerate() {
            assert_eq!(*c as usize, i, "{}", c.name());
        }
    }
}
