//! The eBPF object, embedded at build time (see build.rs).

/// Names of the programs in the object. The TC pair's are prefixed: a
/// netlink (clsact) filter is found again by its program's name, and
/// `tc_egress` alone could be another product's.
pub const TC_EGRESS: &str = "up_tc_egress";
pub const TC_INGRESS: &str = "up_tc_ingress";
/// TC egress of IPv6 packets: entered from `TC_EGRESS` by a tail call
/// (`datapath_common::jumps`), never attached.
pub const TC_EGRESS6: &str = "up_tc_egress6";
/// TC ingress of IPv6 packets: entered from `TC_INGRESS` the same way.
pub const TC_INGRESS6: &str = "up_tc_ingress6";
/// The IPv6 refusal, entered from `TC_EGRESS6` the same way.
pub const TC_REFUSE6: &str = "up_tc_refuse6";
/// The IPv6 new flow, entered from `TC_EGRESS6` the same way.
pub const TC_NEW_FLOW6: &str = "up_tc_new_flow6";
/// The ICMPv6 error translation of each direction, entered from
/// `TC_INGRESS6` / `TC_EGRESS6` the same way.
pub const TC_ICMP6_INGRESS: &str = "up_tc_icmp6_ingress";
pub const TC_ICMP6_EGRESS: &str = "up_tc_icmp6_egress";
/// IPv6 packets with extension headers or fragments, entered from
/// `TC_EGRESS6` / `TC_INGRESS6` the same way.
pub const TC_EGRESS6_EXT: &str = "up_tc_egress6_ext";
pub const TC_INGRESS6_EXT: &str = "up_tc_ingress6_ext";
/// The IPv6 hairpin, entered from `TC_EGRESS6` / `TC_EGRESS6_EXT`.
pub const TC_HAIRPIN6: &str = "up_tc_hairpin6";
/// IPv6 flows whose client port moved on a tuple clash, entered from
/// `TC_EGRESS6`, `TC_EGRESS6_EXT` and `TC_NEW_FLOW6`.
pub const TC_CLASH6: &str = "up_tc_clash6";
/// IPv6 connections straight to a pod whose wire tuple clashes with a
/// service flow's, entered from `TC_EGRESS6`, `TC_EGRESS6_EXT` and
/// `TC_NEW_FLOW6`.
pub const TC_DIRECT6: &str = "up_tc_direct6";
/// The programs the TC pair jumps to, with their slots in `TC_JUMPS`.
/// The ones entered from other jump targets first: a reused table is
/// filled in this order, so that a new entry program never jumps into
/// the previous generation's inner ones; nothing reaches the slots a
/// generation adds until its `TC_EGRESS6`/`TC_INGRESS6` are in (last).
/// A downgrade leaves the newer slots filled, unused: older programs
/// never jump there.
pub const TC_JUMP_TARGETS: [(u32, &str); 11] = [
    (datapath_common::jumps::HAIRPIN6, TC_HAIRPIN6),
    (datapath_common::jumps::CLASH6, TC_CLASH6),
    (datapath_common::jumps::DIRECT6, TC_DIRECT6),
    (datapath_common::jumps::REFUSE6, TC_REFUSE6),
    (datapath_common::jumps::ICMP6_INGRESS, TC_ICMP6_INGRESS),
    (datapath_common::jumps::ICMP6_EGRESS, TC_ICMP6_EGRESS),
    (datapath_common::jumps::NEW_FLOW6, TC_NEW_FLOW6),
    (datapath_common::jumps::EGRESS6_EXT, TC_EGRESS6_EXT),
    (datapath_common::jumps::INGRESS6_EXT, TC_INGRESS6_EXT),
    (datapath_common::jumps::EGRESS6, TC_EGRESS6),
    (datapath_common::jumps::INGRESS6, TC_INGRESS6),
];
/// A program that does nothing (`TC_ACT_UNSPEC`): the floor of the
/// kernel's run-time statistics, for the benches (`Datapath::attach_tc_pass`).
pub const TC_PASS: &str = "up_tc_pass";
pub const SOCK_CONNECT4: &str = "sock_connect4";
pub const SOCK_SENDMSG4: &str = "sock_sendmsg4";
pub const SOCK_RECVMSG4: &str = "sock_recvmsg4";
pub const SOCK_GETPEERNAME4: &str = "sock_peername4";
/// The same four for AF_INET6 sockets using IPv4-mapped addresses.
pub const SOCK_CONNECT6: &str = "sock_connect6";
pub const SOCK_SENDMSG6: &str = "sock_sendmsg6";
pub const SOCK_RECVMSG6: &str = "sock_recvmsg6";
pub const SOCK_GETPEERNAME6: &str = "sock_peername6";

/// The socket-LB programs, in attach order.
pub const SOCK_PROGRAMS: [&str; 8] = [
    SOCK_CONNECT4,
    SOCK_SENDMSG4,
    SOCK_RECVMSG4,
    SOCK_GETPEERNAME4,
    SOCK_CONNECT6,
    SOCK_SENDMSG6,
    SOCK_RECVMSG6,
    SOCK_GETPEERNAME6,
];

static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/underpass.bpf.o"));

/// The embedded object, or `None` when this binary was built without it.
pub fn bytes() -> Option<&'static [u8]> {
    (!OBJECT.is_empty()).then_some(OBJECT)
}

/// TC verdicts the programs return.
/// XDP on the node's uplink: traffic from outside to north-south
/// frontends (nodePorts, load-balancer and external IPs).
pub const XDP_UPLINK: &str = "up_xdp_uplink";

/// What the XDP program returns (`enum xdp_action`).
pub mod xdp_verdict {
    pub const DROP: u32 = 1;
    /// Up the stack (translated or not).
    pub const PASS: u32 = 2;
    /// Back out of the interface it came in by.
    pub const TX: u32 = 3;
}

pub mod verdict {
    /// Not ours: the next program (or the kernel's default) decides.
    pub const NEXT: i32 = -1;
    /// Translated; continue on this interface.
    pub const OK: i32 = 0;
    /// Dropped (service without backends, malformed rewrite).
    pub const SHOT: i32 = 2;
    /// Redirected by `bpf_redirect_neigh` (next hop not learned yet).
    pub const REDIRECT: i32 = 7;
}
