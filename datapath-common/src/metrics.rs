//! Per-CPU counters: `COUNTERS` is a per-CPU array of u64 indexed by
//! `Counter`; user space sums the CPUs.

/// One counter per event the datapath reports.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Counter {
    /// TC egress: packets DNATed to a backend (new and tracked flows).
    Translated = 0,
    /// TC egress: packets of a tracked flow (conntrack hit).
    ConntrackHit = 1,
    /// TC egress: packets that opened a flow (conntrack miss).
    ConntrackMiss = 2,
    /// TC ingress: replies rewritten back to the service address.
    ReverseTranslated = 3,
    /// A service with no backend refused a new flow (TC or socket-LB).
    NoBackend = 4,
    /// IPv4 frames too short or malformed to parse.
    NotParsed = 5,
    /// Non-first IPv4 fragments (no ports: passed untouched).
    Fragment = 6,
    /// Inconsistent maps (a slot naming a missing backend) or a failed helper.
    Error = 7,
    /// Socket-LB: connect/sendmsg rewritten to a backend.
    SockTranslated = 8,
    /// Socket-LB: getpeername/recvmsg rewritten back to the service.
    SockReverseTranslated = 9,
}

/// Number of slots in `COUNTERS`.
pub const COUNTER_COUNT: u32 = 10;

impl Counter {
    /// Every counter, in index order.
    pub const ALL: [Counter; COUNTER_COUNT as usize] = [
        Counter::Translated,
        Counter::ConntrackHit,
        Counter::ConntrackMiss,
        Counter::ReverseTranslated,
        Counter::NoBackend,
        Counter::NotParsed,
        Counter::Fragment,
        Counter::Error,
        Counter::SockTranslated,
        Counter::SockReverseTranslated,
    ];

    /// The snake_case name used in metrics and CLI output.
    pub const fn name(self) -> &'static str {
        match self {
            Counter::Translated => "translated",
            Counter::ConntrackHit => "conntrack_hit",
            Counter::ConntrackMiss => "conntrack_miss",
            Counter::ReverseTranslated => "reverse_translated",
            Counter::NoBackend => "no_backend",
            Counter::NotParsed => "not_parsed",
            Counter::Fragment => "fragment",
            Counter::Error => "error",
            Counter::SockTranslated => "sock_translated",
            Counter::SockReverseTranslated => "sock_reverse_translated",
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
