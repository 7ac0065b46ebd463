//! The IPv6 twins of the maps whose keys or values hold an address
//! (Cilium keeps `lb6_*` beside `lb4_*` the same way): the IPv4 maps keep
//! their layouts (and the flows they track) while IPv6 is added. An IPv6
//! address is four u32 words in network order, as the packet and
//! `bpf_sock_addr.user_ip6` carry it, compared word by word.
//!
//! Shared by both families, unchanged: `SLOTS` (a slot names a backend
//! id), `ServiceValue` (the value of `SERVICES6` too), one backend id
//! space (`BACKENDS`, whose entry says `BACKEND_FLAG_V6` and then has its
//! address in `BACKEND_ADDRS6` under the same id), one reverse-NAT id
//! space, `COUNTERS`, `SOCK_LB_SKIP` and the bucket filters.

/// An IPv6 address: four words in network order.
pub type Ipv6Words = [u32; 4];

/// Key of `SERVICES6` (hash): one IPv6 frontend.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ServiceKey6 {
    /// Service (cluster) IP.
    pub address_be: Ipv6Words,
    /// Service port.
    pub port_be: u16,
    /// `IPPROTO_TCP` or `IPPROTO_UDP`.
    pub protocol: u8,
    /// Always zero.
    pub _pad: u8,
}

impl ServiceKey6 {
    pub const fn new(address_be: Ipv6Words, port_be: u16, protocol: u8) -> Self {
        Self {
            address_be,
            port_be,
            protocol,
            _pad: 0,
        }
    }
}

/// Value of `BACKEND_ADDRS6` (an array, mmap-able, sized as `BACKENDS`):
/// the address of the IPv6 backend under the same id. To be written
/// before the `BACKENDS` entry that publishes it (flagged
/// `BACKEND_FLAG_V6`), so that a program that sees the entry reads the
/// address it belongs to; and a freed id is handed out again only after
/// a grace period (the agent's `IdAllocator::retire`), so that no program
/// reads an address being rewritten under an entry it already loaded.
#[repr(C, align(8))]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct BackendAddress6 {
    /// Endpoint (pod) IP.
    pub address_be: Ipv6Words,
}

/// Value of `REVERSE_NAT6`: an IPv6 frontend by reverse-NAT id (ids are
/// shared with `REVERSE_NAT`: an id names a frontend of one family).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct RevNatValue6 {
    /// Service IP.
    pub address_be: Ipv6Words,
    /// Service port.
    pub port_be: u16,
    /// `REV_NAT_FLAG_*` bits.
    pub flags: u8,
    /// Always zero.
    pub _pad: u8,
}

impl RevNatValue6 {
    pub const fn is_present(&self) -> bool {
        self.flags & super::REV_NAT_FLAG_PRESENT != 0
    }
}

/// Key of `CONNTRACK6_TCP`/`CONNTRACK6_UDP`: `CtKey` with IPv6 addresses.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct CtKey6 {
    /// The client pod's address.
    pub client_address_be: Ipv6Words,
    /// `CT_KIND_SERVICE`: the VIP. `CT_KIND_BACKEND`: the backend address.
    pub peer_address_be: Ipv6Words,
    /// The client's port.
    pub client_port_be: u16,
    /// `CT_KIND_SERVICE`: the service port. `CT_KIND_BACKEND`: the backend
    /// port.
    pub peer_port_be: u16,
    /// `IPPROTO_TCP` or `IPPROTO_UDP`.
    pub protocol: u8,
    /// `CT_KIND_SERVICE` or `CT_KIND_BACKEND`.
    pub kind: u8,
    /// Always zero.
    pub _pad: [u8; 2],
}

/// Value of `CONNTRACK6_TCP`/`CONNTRACK6_UDP`: `CtEntry` with the VIP to
/// restore as an IPv6 address; every other field means what it means
/// there.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct CtEntry6 {
    /// Jiffies when the flow was last refreshed.
    pub last_seen: u64,
    /// When a reply last confirmed the MACs (`CtEntry::l2_seen`).
    pub l2_seen: u64,
    /// The backend this flow is pinned to.
    pub backend_id: u32,
    /// Low 16 bits of the frontend's reverse-NAT id (`rev_nat_id()`).
    pub rev_nat_low: u16,
    /// `conntrack::STATE_*` bits.
    pub state: u8,
    /// `L2_*` (service-tuple entries only).
    pub l2_mode: u8,
    /// Backend-tuple entries: the VIP to restore as the reply's source.
    /// Zero in service-tuple entries.
    pub service_address_be: Ipv6Words,
    /// Backend-tuple entries: the service port to restore.
    pub service_port_be: u16,
    /// `L2_REWRITE`: the next hop's MAC.
    pub dst_mac: [u8; 6],
    /// `L2_REWRITE`: the egress interface's MAC.
    pub src_mac: [u8; 6],
    /// Source-port translation on a tuple clash (`CtEntry::nat_port_be`).
    pub nat_port_be: u16,
    /// `L2_REWRITE`: the interface the MACs were learned on.
    pub ifindex: u32,
    /// Service-tuple entries: the pod interface the route to the backend
    /// leaves by (`POD_ROUTES6`); zero: the packet's own.
    pub out_ifindex: u32,
    /// Bits 16..24 of the frontend's reverse-NAT id.
    pub rev_nat_high: u16,
    /// Zero: the struct's tail, explicit.
    pub _pad: [u8; 6],
}

impl CtEntry6 {
    /// The frontend the flow was opened to (zero: none).
    #[inline(always)]
    pub const fn rev_nat_id(&self) -> super::RevNatId {
        self.rev_nat_low as u32 | (self.rev_nat_high as u32) << 16
    }

    /// Records the frontend the flow is opened to.
    #[inline(always)]
    pub const fn set_rev_nat_id(&mut self, id: super::RevNatId) {
        self.rev_nat_low = id as u16;
        self.rev_nat_high = (id >> 16) as u16;
    }
}

/// Key of `SOCK_REVERSE_NAT6`: a socket socket-LB translated to an IPv6
/// backend.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct SockRevNatKey6 {
    /// `bpf_get_socket_cookie()` of the socket.
    pub cookie: u64,
    /// The backend the socket talks to.
    pub backend_address_be: Ipv6Words,
    /// The backend port.
    pub backend_port_be: u16,
    /// Always zero.
    pub _pad: [u8; 6],
}

/// Value of `SOCK_REVERSE_NAT6`: what `getpeername`/`recvmsg` must show.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct SockRevNatValue6 {
    /// Service IP.
    pub service_address_be: Ipv6Words,
    /// Service port.
    pub service_port_be: u16,
    /// Low 16 bits of the frontend's reverse-NAT id.
    pub rev_nat_low: u16,
}

/// Key of `FRAGMENTS6`: one fragmented IPv6 datagram, as its header and
/// fragment header name it (RFC 8200 §4.5: source, destination and
/// identification).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct FragmentKey6 {
    /// Source address as the packet carries it (before translation).
    pub source_be: Ipv6Words,
    /// Destination address as the packet carries it.
    pub destination_be: Ipv6Words,
    /// The fragment header's 32-bit identification.
    pub id_be: u32,
    /// `IPPROTO_TCP` or `IPPROTO_UDP` (the upper-layer header).
    pub protocol: u8,
    /// Always zero.
    pub _pad: [u8; 3],
}

/// Routes of attached pods to IPv6 destinations, in `POD_ROUTES6` (LPM
/// trie), stored with prefix length `POD_ROUTE_COOKIE_BITS + len` as
/// `PodRouteKey` is.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct PodRouteKey6 {
    /// The pod's network namespace cookie, as its bytes in memory.
    pub netns_cookie: u64,
    /// The route's destination, network order.
    pub address_be: Ipv6Words,
}

#[cfg(feature = "user")]
mod pod {
    use super::*;
    // SAFETY: all are repr(C), Copy, built only of integers and byte arrays,
    // with every padding byte an explicit field (checked by size tests).
    unsafe impl aya::Pod for ServiceKey6 {}
    unsafe impl aya::Pod for BackendAddress6 {}
    unsafe impl aya::Pod for RevNatValue6 {}
    unsafe impl aya::Pod for CtKey6 {}
    unsafe impl aya::Pod for CtEntry6 {}
    unsafe impl aya::Pod for SockRevNatKey6 {}
    unsafe impl aya::Pod for SockRevNatValue6 {}
    unsafe impl aya::Pod for FragmentKey6 {}
    unsafe impl aya::Pod for PodRouteKey6 {}
}

#[cfg(test)]
mod tests {
    use core::mem::{align_of, size_of};

    use super::*;

    #[test]
    fn layouts_have_no_implicit_padding() {
        assert_eq!(size_of::<ServiceKey6>(), 16 + 2 + 1 + 1);
        assert_eq!(
            (size_of::<BackendAddress6>(), align_of::<BackendAddress6>()),
            (16, 8)
        );
        assert_eq!(size_of::<RevNatValue6>(), 16 + 2 + 1 + 1);
        assert_eq!(size_of::<CtKey6>(), 16 + 16 + 2 + 2 + 1 + 1 + 2);
        assert_eq!(
            size_of::<CtEntry6>(),
            8 + 8 + 4 + 2 + 1 + 1 + 16 + 2 + 6 + 6 + 2 + 4 + 4 + 2 + 6
        );
        assert_eq!(align_of::<CtEntry6>(), 8);
        assert_eq!(size_of::<SockRevNatKey6>(), 8 + 16 + 2 + 6);
        assert_eq!(size_of::<SockRevNatValue6>(), 16 + 2 + 2);
        assert_eq!(size_of::<FragmentKey6>(), 16 + 16 + 4 + 1 + 3);
        assert_eq!(size_of::<PodRouteKey6>(), 8 + 16);
    }

    #[test]
    fn keys_hold_network_order_bytes() {
        // [2001:db8::a]:53 as the packet carries it.
        let octets: [u8; 16] = [
            0x20, 0x01, 0x0d, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x0a,
        ];
        let mut words = [0u32; 4];
        for (word, chunk) in words.iter_mut().zip(octets.chunks_exact(4)) {
            *word = u32::from_ne_bytes([chunk[0], chunk[1], chunk[2], chunk[3]]);
        }
        let key = ServiceKey6::new(
            words,
            u16::from_ne_bytes(53u16.to_be_bytes()),
            crate::IPPROTO_UDP,
        );
        // SAFETY: ServiceKey6 is repr(C) without implicit padding.
        let bytes: [u8; 20] = unsafe { core::mem::transmute(key) };
        assert_eq!(bytes[..16], octets);
        assert_eq!(bytes[16..], [0, 53, 17, 0]);
    }
}
