//! The one definition of every map shared by the eBPF programs and user
//! space. Layouts follow Cilium's `lb4_*` maps — a service map, a backend
//! map, a reverse-NAT map and a conntrack LRU — except that a frontend's
//! backend slots are not entries of the service map but a block of an
//! array (`SLOTS`) the frontend's entry points at: the agent writes them
//! through a memory mapping, and a new flow pays one hash lookup, not two. Every struct is `#[repr(C)]` with
//! explicit padding so that no byte of a key is ever uninitialised (hash
//! maps compare keys bytewise).

/// Map names as they appear in the object and under the pin directory.
pub const SERVICES_MAP: &str = "SERVICES";
pub const SLOTS_MAP: &str = "SLOTS";
pub const BACKENDS_MAP: &str = "BACKENDS";
pub const REVERSE_NAT_MAP: &str = "REVERSE_NAT";
/// TCP and UDP flows live apart: a UDP burst (DNS) cannot evict idle TCP
/// connections from a shared LRU.
pub const CONNTRACK_TCP_MAP: &str = "CONNTRACK_TCP";
pub const CONNTRACK_UDP_MAP: &str = "CONNTRACK_UDP";
pub const SOCK_REVERSE_NAT_MAP: &str = "SOCK_REVERSE_NAT";
pub const COUNTERS_MAP: &str = "COUNTERS";
pub const SERVICE_FILTER_MAP: &str = "SERVICE_FILTER";
pub const FRAGMENTS_MAP: &str = "FRAGMENTS";
pub const CLASH_FILTER_MAP: &str = "CLASH_FILTER";
pub const REPLY_FILTER_MAP: &str = "REPLY_FILTER";
pub const POD_ROUTES_MAP: &str = "POD_ROUTES";
pub const SOCK_LB_SKIP_MAP: &str = "SOCK_LB_SKIP";
/// The IPv6 twins (`v6`).
pub const SERVICES6_MAP: &str = "SERVICES6";
pub const BACKEND_ADDRS6_MAP: &str = "BACKEND_ADDRS6";
pub const REVERSE_NAT6_MAP: &str = "REVERSE_NAT6";
pub const CONNTRACK6_TCP_MAP: &str = "CONNTRACK6_TCP";
pub const CONNTRACK6_UDP_MAP: &str = "CONNTRACK6_UDP";
pub const SOCK_REVERSE_NAT6_MAP: &str = "SOCK_REVERSE_NAT6";
pub const FRAGMENTS6_MAP: &str = "FRAGMENTS6";
pub const POD_ROUTES6_MAP: &str = "POD_ROUTES6";
/// `sessionAffinity: ClientIP` (`affinity`): each client's last backend,
/// the backends of each frontend with affinity, each frontend's timeout.
pub const AFFINITY_MAP: &str = "AFFINITY";
pub const AFFINITY_MATCH_MAP: &str = "AFFINITY_MATCH";
pub const AFFINITY_TIMEOUT_MAP: &str = "AFFINITY_TIMEOUT";
/// Per-frontend packets and new flows (`service_counters`).
pub const SERVICE_COUNTERS_MAP: &str = "SERVICE_COUNTERS";
/// North-south on the uplink (`north_south`): settings, each frontend's
/// Maglev table, the tables, this node's underlay pods.
pub const NORTH_SOUTH_MAP: &str = "NORTH_SOUTH";
pub const MAGLEV_TABLE_OF_MAP: &str = "MAGLEV_TABLE_OF";
pub const MAGLEV_MAP: &str = "MAGLEV";
pub const LOCAL_PODS_MAP: &str = "LOCAL_PODS";
pub const UPLINK_SNAT_MAP: &str = "UPLINK_SNAT";

mod affinity;
mod north_south;
mod service_counters;
mod v6;
pub use affinity::*;
pub use north_south::*;
pub use service_counters::*;
pub use v6::*;

/// The IPv6 twins, all added in one release.
pub const IPV6_MAPS: [&str; 8] = [
    SERVICES6_MAP,
    BACKEND_ADDRS6_MAP,
    REVERSE_NAT6_MAP,
    CONNTRACK6_TCP_MAP,
    CONNTRACK6_UDP_MAP,
    SOCK_REVERSE_NAT6_MAP,
    FRAGMENTS6_MAP,
    POD_ROUTES6_MAP,
];

/// Every map, for pinning and inspection.
pub const ALL_MAPS: [&str; 31] = [
    SERVICE_FILTER_MAP,
    SERVICES_MAP,
    SLOTS_MAP,
    BACKENDS_MAP,
    REVERSE_NAT_MAP,
    CONNTRACK_TCP_MAP,
    CONNTRACK_UDP_MAP,
    SOCK_REVERSE_NAT_MAP,
    COUNTERS_MAP,
    FRAGMENTS_MAP,
    CLASH_FILTER_MAP,
    REPLY_FILTER_MAP,
    POD_ROUTES_MAP,
    SOCK_LB_SKIP_MAP,
    SERVICES6_MAP,
    BACKEND_ADDRS6_MAP,
    REVERSE_NAT6_MAP,
    CONNTRACK6_TCP_MAP,
    CONNTRACK6_UDP_MAP,
    SOCK_REVERSE_NAT6_MAP,
    FRAGMENTS6_MAP,
    POD_ROUTES6_MAP,
    AFFINITY_MAP,
    AFFINITY_MATCH_MAP,
    AFFINITY_TIMEOUT_MAP,
    SERVICE_COUNTERS_MAP,
    NORTH_SOUTH_MAP,
    MAGLEV_TABLE_OF_MAP,
    MAGLEV_MAP,
    LOCAL_PODS_MAP,
    UPLINK_SNAT_MAP,
];

/// Each map's layout version: its key and value structs and what their
/// fields mean. Pinned maps outlive the agent, so a build whose layout of
/// a map differs from its pin's (a field moved, even at the same size)
/// must not adopt that pin (`datapath_user::map_pins` keeps each map's
/// version beside the pins and makes a map whose version differs afresh,
/// keeping the others: a change to the service maps does not cost the
/// tracked connections). Bump a map's version with any change to its
/// layout; the test `every_maps_layout_is_the_one_its_version_names` fails
/// until you do. A new map starts at 1.
///
/// One change keeps the version: a field added in bytes the version keeps
/// zero, when zero there means what the version meant (the high bits of
/// reverse-NAT ids, `ServiceValue::rev_nat_high`, `CtEntry::rev_nat_high`:
/// every id the older build wrote is below 65,536). Pins of the older build
/// then read the same in both, and an upgrade keeps every tracked flow.
///
/// Every map that existed when all maps shared one version
/// (`SHARED_MAPS_ABI`) is at that version's last value, 3.
pub const MAP_LAYOUT_VERSIONS: [(&str, u32); 31] = [
    (SERVICE_FILTER_MAP, 3),
    (SERVICES_MAP, 4),
    (SLOTS_MAP, 1),
    (BACKENDS_MAP, 3),
    (REVERSE_NAT_MAP, 3),
    (CONNTRACK_TCP_MAP, 3),
    (CONNTRACK_UDP_MAP, 3),
    (SOCK_REVERSE_NAT_MAP, 3),
    (COUNTERS_MAP, 3),
    (FRAGMENTS_MAP, 3),
    (CLASH_FILTER_MAP, 3),
    (REPLY_FILTER_MAP, 3),
    (POD_ROUTES_MAP, 3),
    (SOCK_LB_SKIP_MAP, 3),
    (SERVICES6_MAP, 1),
    (BACKEND_ADDRS6_MAP, 1),
    (REVERSE_NAT6_MAP, 1),
    (CONNTRACK6_TCP_MAP, 1),
    (CONNTRACK6_UDP_MAP, 1),
    (SOCK_REVERSE_NAT6_MAP, 1),
    (FRAGMENTS6_MAP, 1),
    (POD_ROUTES6_MAP, 1),
    (AFFINITY_MAP, 1),
    (AFFINITY_MATCH_MAP, 1),
    (AFFINITY_TIMEOUT_MAP, 1),
    (SERVICE_COUNTERS_MAP, 1),
    (NORTH_SOUTH_MAP, 2),
    (MAGLEV_TABLE_OF_MAP, 1),
    (MAGLEV_MAP, 1),
    (LOCAL_PODS_MAP, 1),
    (UPLINK_SNAT_MAP, 1),
];

/// The layout version of `map` in this build.
pub fn layout_version(map: &str) -> Option<u32> {
    MAP_LAYOUT_VERSIONS
        .iter()
        .find(|(name, _)| *name == map)
        .map(|(_, version)| *version)
}

/// The one layout version all maps shared before each had its own: pins
/// marked with it (`maps-abi-v3`) hold every map of `ALL_MAPS` at that
/// version. Builds of that time read only this marker, so it is kept
/// beside the per-map ones while every map is still at it (a downgrade
/// then keeps the pins too).
pub const SHARED_MAPS_ABI: u32 = 3;

/// `REPLY_FILTER`'s entries: one flag per `lb::service_filter_index`
/// bucket of a backend's (address, port, protocol), then
/// `REPLY_FILTER_COMPLETE`.
pub const REPLY_FILTER_ENTRIES: u32 = (1 << crate::lb::SERVICE_FILTER_BITS) + 1;
/// The `REPLY_FILTER` index of its completeness flag: non-zero once every
/// flow in conntrack has its backend's bucket flagged. Until then (an
/// agent that has just replaced programs that did not flag, or flows an
/// older build opened) the ingress program looks every packet up in
/// conntrack as if every bucket were flagged.
pub const REPLY_FILTER_COMPLETE: u32 = 1 << crate::lb::SERVICE_FILTER_BITS;

/// Pods (network namespaces) socket-LB can be told to leave alone.
pub const DEFAULT_SOCK_LB_SKIP_MAX: u32 = 4096;

/// Default capacities; the loader may override them at load time
/// (`EbpfLoader::set_max_entries`). The object declares tiny placeholders.
/// Backend slots (`SLOTS`): a frontend owns the power of two at or above
/// its backend count, so 10,000 services with 10 endpoints each take
/// 160,000 (4 MiB of kernel memory at this default). A power of two.
pub const DEFAULT_SLOTS_MAX: u32 = 524_288;
/// Largest `SLOTS` size: slot indexes and block sizes stay in u32.
pub const SLOTS_LIMIT: u32 = 1 << 30;
/// Distinct (address, port, protocol) backends.
pub const DEFAULT_BACKENDS_MAX: u32 = 131_072;
/// Frontends (reverse-NAT ids 1..this): 65,535. `--frontends-max` raises
/// it up to `REV_NAT_ID_LIMIT`.
pub const DEFAULT_REVERSE_NAT_MAX: u32 = 65_536;
/// Reverse-NAT ids take 24 bits in the maps (16 low + 8 high).
pub const REV_NAT_ID_LIMIT: u32 = 1 << 24;
/// Tracked TCP flows (each takes two entries: service tuple and backend
/// tuple).
pub const DEFAULT_CONNTRACK_TCP_FLOWS: u32 = 131_072;
/// Tracked UDP flows (two entries each).
pub const DEFAULT_CONNTRACK_UDP_FLOWS: u32 = 65_536;
/// Map entries a flow takes.
pub const CT_ENTRIES_PER_FLOW: u32 = 2;
pub const DEFAULT_SOCK_REVERSE_NAT_MAX: u32 = 65_536;
/// Fragmented datagrams in flight at once (Cilium's default is 8192).
pub const DEFAULT_FRAGMENTS_MAX: u32 = 8_192;

/// Most backends one frontend may have (its slots are one block of at
/// most `1 << MAX_SLOT_ORDER`).
pub const MAX_BACKENDS_PER_SERVICE: u16 = 1024;
/// `ServiceValue::slot_order` of the largest block.
pub const MAX_SLOT_ORDER: u8 = 10;

/// Key of `SERVICES` (hash): one frontend (VIP, port, protocol).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ServiceKey {
    /// Service (cluster) IP.
    pub address_be: u32,
    /// Service port.
    pub port_be: u16,
    /// `IPPROTO_TCP` or `IPPROTO_UDP`.
    pub protocol: u8,
    /// Always zero.
    pub _pad: u8,
}

impl ServiceKey {
    pub const fn new(address_be: u32, port_be: u16, protocol: u8) -> Self {
        Self {
            address_be,
            port_be,
            protocol,
            _pad: 0,
        }
    }
}

/// Value of `SERVICES`: a frontend and where its backend slots are.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct ServiceValue {
    /// The `SLOTS` index of slot 1: slot i (1-based) is at
    /// `first_slot + i - 1`.
    pub first_slot: u32,
    /// How many backend slots are in use (0 = no backend: new flows are
    /// refused).
    pub backend_count: u16,
    /// The low 16 bits of this frontend's `REVERSE_NAT` key
    /// (`rev_nat_id()`).
    pub rev_nat_low: u16,
    /// `SERVICE_FLAG_*` bits.
    pub flags: u8,
    /// Bits 16..24 of the `REVERSE_NAT` key.
    pub rev_nat_high: u8,
    /// The frontend owns `1 << slot_order` slots from `first_slot` (a
    /// block of the agent's buddy allocation, aligned to its size), of
    /// which `backend_count` are in use: a backend set may grow within
    /// it in place.
    pub slot_order: u8,
    /// Always zero.
    pub _pad: u8,
}

impl Slot {
    /// The slot of backend `backend_id`.
    pub const fn of(backend_id: BackendId) -> Self {
        Self {
            backend_id,
            _pad: 0,
        }
    }
}

impl ServiceValue {
    /// `rev_nat_id`'s frontend with `backend_count` backends in the
    /// `1 << slot_order` slots from `first_slot`.
    pub const fn new(
        first_slot: u32,
        slot_order: u8,
        backend_count: u16,
        rev_nat_id: RevNatId,
        flags: u8,
    ) -> Self {
        Self {
            first_slot,
            backend_count,
            rev_nat_low: rev_nat_id as u16,
            flags,
            rev_nat_high: (rev_nat_id >> 16) as u8,
            slot_order,
            _pad: 0,
        }
    }

    /// The frontend's `REVERSE_NAT` key.
    #[inline(always)]
    pub const fn rev_nat_id(&self) -> RevNatId {
        self.rev_nat_low as u32 | (self.rev_nat_high as u32) << 16
    }

    /// The `SLOTS` index of `slot` (1..=backend_count).
    #[inline(always)]
    pub const fn slot_index(&self, slot: u16) -> u32 {
        self.first_slot.wrapping_add(slot as u32).wrapping_sub(1)
    }

    /// How many slots the frontend owns.
    pub const fn slot_capacity(&self) -> u32 {
        1 << (self.slot_order as u32 & 31)
    }
}

/// Value of `SLOTS` (an array, mmap-able): the backend of one slot of a
/// frontend. Eight bytes because the kernel lays an array's values out
/// 8-byte aligned anyway (`round_up(value_size, 8)`), and an mmap of the
/// array sees that stride (aligned to it, so user space may view the
/// mapping as a `[Slot]`).
#[repr(C, align(8))]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Slot {
    /// The `BACKENDS` key of this slot's backend (0: none, a slot being
    /// written or freed).
    pub backend_id: BackendId,
    /// Always zero.
    pub _pad: u32,
}

/// `BPF_F_MMAPABLE`: an array user space maps into its memory, so that
/// the agent writes a million slots by storing them, not by a million
/// syscall element copies.
pub const BPF_F_MMAPABLE: u32 = 1 << 10;

/// `BPF_F_NO_PREALLOC`: a hash map whose entries are allocated as they
/// are inserted, for a map sized for the worst case and mostly empty.
pub const BPF_F_NO_PREALLOC: u32 = 1 << 0;

/// Index into `BACKENDS` (an array): a backend id, allocated by the
/// agent, 1..capacity (0 is never used).
pub type BackendId = u32;

/// `Backend::flags`: the slot holds a backend. A zeroed slot (never written,
/// or deleted) has no backend.
pub const BACKEND_FLAG_PRESENT: u8 = 1 << 0;
/// `Backend::flags`: an IPv6 backend, whose address is in
/// `BACKEND_ADDRS6` under the same id (`address_be` is zero). Zero in
/// every entry a build without IPv6 wrote, which meant IPv4 there too:
/// `BACKENDS` keeps its version.
pub const BACKEND_FLAG_V6: u8 = 1 << 1;

/// Value of `BACKENDS`: where a backend lives. An array rather than a hash
/// because ids are small dense integers: the verifier turns the lookup
/// into a bounds check, which the per-packet path of every tracked flow
/// pays. Aligned to its 8 bytes: the agent stores an entry whole (one
/// atomic store through its mapping) and the programs load it whole, so a
/// packet never meets half of a backend being removed (present, address
/// zero).
#[repr(C, align(8))]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Backend {
    /// Endpoint (pod) IP.
    pub address_be: u32,
    /// Endpoint port (the Service's targetPort resolved).
    pub port_be: u16,
    /// `IPPROTO_TCP` or `IPPROTO_UDP`.
    pub protocol: u8,
    /// `BACKEND_FLAG_*` bits.
    pub flags: u8,
}

impl Backend {
    pub const fn is_present(&self) -> bool {
        self.flags & BACKEND_FLAG_PRESENT != 0
    }

    /// Whether its address is in `BACKEND_ADDRS6`.
    pub const fn is_v6(&self) -> bool {
        self.flags & BACKEND_FLAG_V6 != 0
    }

    /// Present and IPv4: what an IPv4 flow may be sent to. A tracked
    /// IPv4 flow can name an id that was freed and handed to an IPv6
    /// backend since (one id space): that entry's `address_be` is zero,
    /// and the flow must be balanced afresh instead. One mask and
    /// compare, as `is_present` costs.
    pub const fn is_present_v4(&self) -> bool {
        self.flags & (BACKEND_FLAG_PRESENT | BACKEND_FLAG_V6) == BACKEND_FLAG_PRESENT
    }
}

/// Index into `REVERSE_NAT` (an array, `DEFAULT_REVERSE_NAT_MAX` by
/// default): one id per frontend, never 0, below `REV_NAT_ID_LIMIT`.
pub type RevNatId = u32;

/// `RevNatValue::flags`: the slot holds a frontend.
pub const REV_NAT_FLAG_PRESENT: u8 = 1 << 0;

/// Value of `REVERSE_NAT`: a frontend by id. Tracked flows check their
/// frontend still exists (and is the same) here, in O(1).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct RevNatValue {
    /// Service IP.
    pub address_be: u32,
    /// Service port.
    pub port_be: u16,
    /// `REV_NAT_FLAG_*` bits.
    pub flags: u8,
    /// Always zero.
    pub _pad: u8,
}

impl RevNatValue {
    pub const fn is_present(&self) -> bool {
        self.flags & REV_NAT_FLAG_PRESENT != 0
    }
}

/// `CtKey::kind`: the tuple as the client sent it (destination = VIP).
pub const CT_KIND_SERVICE: u8 = 1;
/// `CtKey::kind`: the tuple after DNAT (destination = backend); replies are
/// looked up with it, reversed.
pub const CT_KIND_BACKEND: u8 = 2;

/// Key of `CONNTRACK` (LRU hash). Both entries of a flow are oriented from
/// the client: `client_*` is the pod that sent the first packet.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct CtKey {
    /// The client pod's address.
    pub client_address_be: u32,
    /// `CT_KIND_SERVICE`: the VIP. `CT_KIND_BACKEND`: the backend address.
    pub peer_address_be: u32,
    /// The client's port.
    pub client_port_be: u16,
    /// `CT_KIND_SERVICE`: the service port. `CT_KIND_BACKEND`: the backend port.
    pub peer_port_be: u16,
    /// `IPPROTO_TCP` or `IPPROTO_UDP`.
    pub protocol: u8,
    /// `CT_KIND_SERVICE` or `CT_KIND_BACKEND`.
    pub kind: u8,
    /// Always zero.
    pub _pad: [u8; 2],
}

/// `CtEntry::l2_mode`: nothing cached yet; look the next hop up.
pub const L2_UNRESOLVED: u8 = 0;
/// `CtEntry::l2_mode`: write `dst_mac`/`src_mac` and let the packet go on
/// out of the same interface (no second pass through the egress program).
pub const L2_REWRITE: u8 = 1;
/// `CtEntry6::l2_mode`: the flow's backend is its client itself (an IPv6
/// pod that reached its own service on the TC path): looped back inside
/// the pod (`up_tc_hairpin6`), never sent out. Set when the flow opens;
/// only the IPv6 programs read it (a value added without a layout bump:
/// a build before it never opened such a flow). Downgrading to such a
/// build while hairpin flows live sends their packets out by
/// `bpf_redirect_neigh` to the pod's own address until the entries
/// expire: those connections break, no other.
pub const L2_HAIRPIN: u8 = 2;
/// `CtEntry::l2_mode` of a north-south flow from outside to a pod on this
/// node's uplink, opened by the XDP program (`north_south`): in its
/// service-tuple entry, `dst_mac` is the pod's (what each packet's
/// destination MAC becomes); in its backend-tuple entry, it marks the
/// entry the pod's TC egress reverse-translates replies by (an
/// east-west flow's backend-tuple entry is left to the client's
/// ingress). A value added without a layout bump: no earlier build
/// opened such a flow, and one downgraded to leaves these entries alone
/// (its ingress never meets their tuples) until they expire.
pub const L2_UPLINK_LOCAL: u8 = 3;
/// `CtEntry::l2_mode` of a north-south flow to a backend on another
/// node, SNATed to this node by the XDP program (`north_south`): its
/// service-tuple entry holds the SNAT port (`nat_port_be`) and the next
/// hop's and the uplink's MACs (`dst_mac`, `src_mac`, looked up again
/// once `l2_seen` is stale); the replies' entry is in `UPLINK_SNAT`.
pub const L2_UPLINK_SNAT: u8 = 4;
/// Value of `CONNTRACK_TCP` and `CONNTRACK_UDP`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct CtEntry {
    /// Kernel jiffies (`bpf_jiffies64()`) when the flow was last refreshed;
    /// refreshed at most every `Lifetimes::refresh` ticks.
    pub last_seen: u64,
    /// Service-tuple entries: when a reply last confirmed `dst_mac` and
    /// `src_mac` (jiffies). Learned MACs older than `Lifetimes::l2_fresh`
    /// are not trusted: the kernel's neighbour table decides again, so a
    /// gateway failover cannot black-hole a flow that gets no replies.
    /// Backend-tuple entries: when this reply direction last refreshed the
    /// service-tuple entry's MACs.
    pub l2_seen: u64,
    /// The backend this flow is pinned to.
    pub backend_id: u32,
    /// The frontend the flow was opened to (checked against the service on
    /// every hit so a re-created service re-balances). Zero: a connection
    /// straight to a pod (no service) whose source port was moved because
    /// a service flow held its wire tuple (`nat_port_be`). Low 16 bits of
    /// the id (`rev_nat_id()`).
    pub rev_nat_low: u16,
    /// `conntrack::STATE_*` bits.
    pub state: u8,
    /// `L2_*` (service-tuple entries only).
    pub l2_mode: u8,
    /// Backend-tuple entries: the VIP to restore as the reply's source.
    /// Zero in service-tuple entries.
    pub service_address_be: u32,
    /// Backend-tuple entries: the service port to restore. Zero otherwise.
    pub service_port_be: u16,
    /// `L2_REWRITE`: the next hop's MAC (destination of rewritten frames).
    pub dst_mac: [u8; 6],
    /// `L2_REWRITE`: the egress interface's MAC.
    pub src_mac: [u8; 6],
    /// Source-port translation on a tuple clash (two flows that would
    /// share one wire tuple, as netfilter's NAT resolves them). Service-
    /// tuple entries: the client port used on the wire. Backend-tuple
    /// entries: the client's own port, restored on replies. Zero: the
    /// client's port is used as it is.
    pub nat_port_be: u16,
    /// `L2_REWRITE`: the interface the MACs were learned on (replies may
    /// arrive on another interface than the one the flow leaves by; MACs
    /// are only written on the interface they belong to).
    pub ifindex: u32,
    /// Service-tuple entries: the pod interface the route to the backend
    /// leaves by, when it is not the one the flow's packets are sent on
    /// (a backend behind the pod's veth to its node, say; `POD_ROUTES`).
    /// Zero: the interface the packet is on.
    pub out_ifindex: u32,
    /// Bits 16..24 of the frontend's reverse-NAT id (zero below 65,536:
    /// these bytes were padding before, always zero).
    pub rev_nat_high: u16,
    /// Zero. Makes the struct's tail padding explicit, so that every byte
    /// of the value is written (the map stores all 56).
    pub _pad: u16,
}

impl CtEntry {
    /// The frontend the flow was opened to (its `REVERSE_NAT` key; zero:
    /// none).
    #[inline(always)]
    pub const fn rev_nat_id(&self) -> RevNatId {
        self.rev_nat_low as u32 | (self.rev_nat_high as u32) << 16
    }

    /// Records the frontend the flow is opened to.
    #[inline(always)]
    pub const fn set_rev_nat_id(&mut self, id: RevNatId) {
        self.rev_nat_low = id as u16;
        self.rev_nat_high = (id >> 16) as u16;
    }
}

/// Key of `SOCK_REVERSE_NAT` (LRU hash): a socket that socket-LB
/// translated, and the backend it was sent to.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct SockRevNatKey {
    /// `bpf_get_socket_cookie()` of the socket.
    pub cookie: u64,
    /// The backend the socket talks to.
    pub backend_address_be: u32,
    /// The backend port.
    pub backend_port_be: u16,
    /// Always zero.
    pub _pad: [u8; 2],
}

/// Value of `SOCK_REVERSE_NAT`: what `getpeername`/`recvmsg` must show.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct SockRevNatValue {
    /// Service IP.
    pub service_address_be: u32,
    /// Service port.
    pub service_port_be: u16,
    /// The low 16 bits of the frontend's reverse-NAT id (with the service
    /// address and port, which frontend the socket was sent through).
    pub rev_nat_low: u16,
}

/// Key of `FRAGMENTS` (LRU hash): one fragmented datagram, as its IPv4
/// header names it (RFC 791: source, destination, protocol and
/// identification together identify the fragments of one datagram).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct FragmentKey {
    /// Source address as the packet carries it (before translation).
    pub source_be: u32,
    /// Destination address as the packet carries it (the ClusterIP on
    /// egress, the client on ingress).
    pub destination_be: u32,
    /// The IPv4 identification field.
    pub id_be: u16,
    /// `IPPROTO_TCP` or `IPPROTO_UDP`.
    pub protocol: u8,
    /// Always zero.
    pub _pad: u8,
}

/// Value of `FRAGMENTS`: the ports the first fragment carried, so that the
/// later fragments (which carry none) are translated like it.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct FragmentPorts {
    pub source_port_be: u16,
    pub destination_port_be: u16,
}

/// Routes of attached pods, in `POD_ROUTES` (LPM trie): the data after
/// the trie's prefix length. A route to `address_be/len` in the pod whose
/// network namespace has cookie `netns_cookie` is stored with prefix
/// length `64 + len`, so that lookups match the namespace exactly and the
/// address by longest prefix, as the pod's own routing table would.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct PodRouteKey {
    /// The pod's network namespace cookie (`bpf_get_netns_cookie`,
    /// `SO_NETNS_COOKIE`), as its bytes in memory.
    pub netns_cookie: u64,
    /// The route's destination, network order.
    pub address_be: u32,
    /// Always zero (never part of a match).
    pub _pad: u32,
}

/// Bits of `PodRouteKey` before the address.
pub const POD_ROUTE_COOKIE_BITS: u32 = 64;
/// Most routes per node the map holds.
pub const DEFAULT_POD_ROUTES_MAX: u32 = 16_384;

#[cfg(feature = "user")]
mod pod {
    use super::*;
    // SAFETY: all are repr(C), Copy, built only of integers and byte arrays,
    // with every padding byte an explicit field (checked by size tests).
    unsafe impl aya::Pod for ServiceKey {}
    unsafe impl aya::Pod for ServiceValue {}
    unsafe impl aya::Pod for Slot {}
    unsafe impl aya::Pod for Backend {}
    unsafe impl aya::Pod for RevNatValue {}
    unsafe impl aya::Pod for CtKey {}
    unsafe impl aya::Pod for CtEntry {}
    unsafe impl aya::Pod for SockRevNatKey {}
    unsafe impl aya::Pod for SockRevNatValue {}
    unsafe impl aya::Pod for FragmentKey {}
    unsafe impl aya::Pod for FragmentPorts {}
    unsafe impl aya::Pod for PodRouteKey {}
    unsafe impl aya::Pod for AffinityKey {}
    unsafe impl aya::Pod for AffinityValue {}
    unsafe impl aya::Pod for AffinityMatchKey {}
    unsafe impl aya::Pod for ServiceCounters {}
    unsafe impl aya::Pod for NorthSouthConfig {}
    unsafe impl aya::Pod for MaglevPair {}
    unsafe impl aya::Pod for LocalPod {}
    unsafe impl aya::Pod for UplinkSnat {}
}

#[cfg(test)]
mod tests {
    use core::mem::{align_of, size_of};
    use std::{format, string::String};

    use super::*;

    /// Sizes are part of the pinned maps' layouts: a change here must be a
    /// conscious migration, and no size may hide implicit padding. Every
    /// map with its version, key and value, each struct's fields with
    /// their offsets: what `MAP_LAYOUT_VERSIONS` stands for.
    fn map_layouts() -> String {
        macro_rules! layout {
            ($t:ty: $($f:ident),*) => {
                format!(
                    "{}[{}]{{{}}}",
                    stringify!($t),
                    size_of::<$t>(),
                    [$(format!("{}@{}", stringify!($f), core::mem::offset_of!($t, $f))),*].join(",")
                )
            };
        }
        let service_key = layout!(ServiceKey: address_be, port_be, protocol);
        let service_value = layout!(ServiceValue: first_slot, backend_count, rev_nat_low, flags,
            rev_nat_high, slot_order);
        let ct_key = layout!(CtKey: client_address_be, peer_address_be, client_port_be, peer_port_be, protocol, kind);
        let ct_entry = layout!(CtEntry: last_seen, l2_seen, backend_id, rev_nat_low, state, l2_mode,
            service_address_be, service_port_be, dst_mac, src_mac, nat_port_be, ifindex,
            out_ifindex, rev_nat_high);
        let ct_key6 = layout!(CtKey6: client_address_be, peer_address_be, client_port_be,
            peer_port_be, protocol, kind);
        let ct_entry6 = layout!(CtEntry6: last_seen, l2_seen, backend_id, rev_nat_low, state,
            l2_mode, service_address_be, service_port_be, dst_mac, src_mac, nat_port_be, ifindex,
            out_ifindex, rev_nat_high);
        let service_value6 = service_value.clone();
        let ct_key_for_snat = ct_key.clone();
        let maps: [(&str, String, String); 31] = [
            (SERVICE_FILTER_MAP, "u32".into(), "u32".into()),
            (SERVICES_MAP, service_key, service_value),
            (SLOTS_MAP, "u32".into(), layout!(Slot: backend_id)),
            (
                BACKENDS_MAP,
                "u32".into(),
                layout!(Backend: address_be, port_be, protocol, flags),
            ),
            (
                REVERSE_NAT_MAP,
                "u32".into(),
                layout!(RevNatValue: address_be, port_be, flags),
            ),
            (CONNTRACK_TCP_MAP, ct_key.clone(), ct_entry.clone()),
            (CONNTRACK_UDP_MAP, ct_key, ct_entry),
            (
                SOCK_REVERSE_NAT_MAP,
                layout!(SockRevNatKey: cookie, backend_address_be, backend_port_be),
                layout!(SockRevNatValue: service_address_be, service_port_be, rev_nat_low),
            ),
            (COUNTERS_MAP, "u32".into(), "u64 per CPU".into()),
            (
                FRAGMENTS_MAP,
                layout!(FragmentKey: source_be, destination_be, id_be, protocol),
                layout!(FragmentPorts: source_port_be, destination_port_be),
            ),
            (CLASH_FILTER_MAP, "u32".into(), "u32".into()),
            (REPLY_FILTER_MAP, "u32".into(), "u32".into()),
            (
                POD_ROUTES_MAP,
                layout!(PodRouteKey: netns_cookie, address_be),
                "u32".into(),
            ),
            (SOCK_LB_SKIP_MAP, "u64".into(), "u8".into()),
            (
                SERVICES6_MAP,
                layout!(ServiceKey6: address_be, port_be, protocol),
                service_value6,
            ),
            (
                BACKEND_ADDRS6_MAP,
                "u32".into(),
                layout!(BackendAddress6: address_be),
            ),
            (
                REVERSE_NAT6_MAP,
                "u32".into(),
                layout!(RevNatValue6: address_be, port_be, flags),
            ),
            (CONNTRACK6_TCP_MAP, ct_key6.clone(), ct_entry6.clone()),
            (CONNTRACK6_UDP_MAP, ct_key6, ct_entry6),
            (
                SOCK_REVERSE_NAT6_MAP,
                layout!(SockRevNatKey6: cookie, backend_address_be, backend_port_be),
                layout!(SockRevNatValue6: service_address_be, service_port_be, rev_nat_low),
            ),
            (
                FRAGMENTS6_MAP,
                layout!(FragmentKey6: source_be, destination_be, id_be, protocol),
                layout!(FragmentPorts: source_port_be, destination_port_be),
            ),
            (
                POD_ROUTES6_MAP,
                layout!(PodRouteKey6: netns_cookie, address_be),
                "u32".into(),
            ),
            (
                AFFINITY_MAP,
                layout!(AffinityKey: client, rev_nat_id, kind),
                layout!(AffinityValue: last_used, backend_id),
            ),
            (
                AFFINITY_MATCH_MAP,
                layout!(AffinityMatchKey: backend_id, rev_nat_id),
                "u8".into(),
            ),
            (AFFINITY_TIMEOUT_MAP, "u32".into(), "u64 jiffies".into()),
            (
                SERVICE_COUNTERS_MAP,
                "u32".into(),
                layout!(ServiceCounters: packets, new_flows) + " per CPU",
            ),
            (
                NORTH_SOUTH_MAP,
                "u32".into(),
                layout!(NorthSouthConfig: maglev_seed, maglev_table_size, snat_address_be,
                    snat_port_first, snat_port_count),
            ),
            (MAGLEV_TABLE_OF_MAP, "u32".into(), "u32 table + 1".into()),
            (MAGLEV_MAP, "u32".into(), layout!(MaglevPair: backend_ids)),
            (LOCAL_PODS_MAP, "u32".into(), layout!(LocalPod: mac)),
            (
                UPLINK_SNAT_MAP,
                ct_key_for_snat,
                layout!(UplinkSnat: last_seen, client_address_be, frontend_address_be,
                    client_port_be, frontend_port_be, client_mac, uplink_mac, state),
            ),
        ];
        assert_eq!(
            maps.each_ref().map(|(name, _, _)| *name),
            ALL_MAPS,
            "every map, in ALL_MAPS' order"
        );
        maps.iter()
            .map(|(name, key, value)| {
                let version = layout_version(name).expect("every map has a version");
                format!("{name} v{version}: {key} -> {value}")
            })
            .collect::<std::vec::Vec<_>>()
            .join("\n")
    }

    /// A changed layout without a new version would let an upgraded agent
    /// adopt a pin it misreads. Every layout each map ever had is recorded
    /// under its version (append only): today's must be among them, and a
    /// version names one layout. Changed a struct? Bump the version of
    /// every map holding it (`MAP_LAYOUT_VERSIONS`) and append the lines
    /// this test prints.
    #[test]
    fn every_maps_layout_is_the_one_its_version_names() {
        let history: std::vec::Vec<&str> = LAYOUTS.lines().map(str::trim).collect();
        for line in map_layouts().lines() {
            assert!(
                history.contains(&line),
                "a map layout changed: bump that map's version and append this line to LAYOUTS:\n{line}"
            );
        }
        for (i, a) in history.iter().enumerate() {
            let version = |line: &'static str| line.split(':').next().unwrap_or_default();
            for b in &history[i + 1..] {
                assert_ne!(
                    version(a),
                    version(b),
                    "one version, two layouts: bump the version instead of editing a recorded line"
                );
            }
        }
    }

    const LAYOUTS: &str = "\
         SERVICE_FILTER v3: u32 -> u32
         SERVICES v3: ServiceKey[12]{address_be@0,port_be@4,backend_slot@6,protocol@8} -> ServiceValue[12]{backend_id@0,backend_count@4,rev_nat_low@6,flags@8,rev_nat_high@9}
         BACKENDS v3: u32 -> Backend[8]{address_be@0,port_be@4,protocol@6,flags@7}
         REVERSE_NAT v3: u32 -> RevNatValue[8]{address_be@0,port_be@4,flags@6}
         CONNTRACK_TCP v3: CtKey[16]{client_address_be@0,peer_address_be@4,client_port_be@8,peer_port_be@10,protocol@12,kind@13} -> CtEntry[56]{last_seen@0,l2_seen@8,backend_id@16,rev_nat_low@20,state@22,l2_mode@23,service_address_be@24,service_port_be@28,dst_mac@30,src_mac@36,nat_port_be@42,ifindex@44,out_ifindex@48,rev_nat_high@52}
         CONNTRACK_UDP v3: CtKey[16]{client_address_be@0,peer_address_be@4,client_port_be@8,peer_port_be@10,protocol@12,kind@13} -> CtEntry[56]{last_seen@0,l2_seen@8,backend_id@16,rev_nat_low@20,state@22,l2_mode@23,service_address_be@24,service_port_be@28,dst_mac@30,src_mac@36,nat_port_be@42,ifindex@44,out_ifindex@48,rev_nat_high@52}
         SOCK_REVERSE_NAT v3: SockRevNatKey[16]{cookie@0,backend_address_be@8,backend_port_be@12} -> SockRevNatValue[8]{service_address_be@0,service_port_be@4,rev_nat_low@6}
         COUNTERS v3: u32 -> u64 per CPU
         FRAGMENTS v3: FragmentKey[12]{source_be@0,destination_be@4,id_be@8,protocol@10} -> FragmentPorts[4]{source_port_be@0,destination_port_be@2}
         CLASH_FILTER v3: u32 -> u32
         REPLY_FILTER v3: u32 -> u32
         POD_ROUTES v3: PodRouteKey[16]{netns_cookie@0,address_be@8} -> u32
         SOCK_LB_SKIP v3: u64 -> u8
         SERVICES v4: ServiceKey[8]{address_be@0,port_be@4,protocol@6} -> ServiceValue[12]{first_slot@0,backend_count@4,rev_nat_low@6,flags@8,rev_nat_high@9,slot_order@10}
         SLOTS v1: u32 -> Slot[8]{backend_id@0}
         SERVICES6 v1: ServiceKey6[20]{address_be@0,port_be@16,protocol@18} -> ServiceValue[12]{first_slot@0,backend_count@4,rev_nat_low@6,flags@8,rev_nat_high@9,slot_order@10}
         BACKEND_ADDRS6 v1: u32 -> BackendAddress6[16]{address_be@0}
         REVERSE_NAT6 v1: u32 -> RevNatValue6[20]{address_be@0,port_be@16,flags@18}
         CONNTRACK6_TCP v1: CtKey6[40]{client_address_be@0,peer_address_be@16,client_port_be@32,peer_port_be@34,protocol@36,kind@37} -> CtEntry6[72]{last_seen@0,l2_seen@8,backend_id@16,rev_nat_low@20,state@22,l2_mode@23,service_address_be@24,service_port_be@40,dst_mac@42,src_mac@48,nat_port_be@54,ifindex@56,out_ifindex@60,rev_nat_high@64}
         CONNTRACK6_UDP v1: CtKey6[40]{client_address_be@0,peer_address_be@16,client_port_be@32,peer_port_be@34,protocol@36,kind@37} -> CtEntry6[72]{last_seen@0,l2_seen@8,backend_id@16,rev_nat_low@20,state@22,l2_mode@23,service_address_be@24,service_port_be@40,dst_mac@42,src_mac@48,nat_port_be@54,ifindex@56,out_ifindex@60,rev_nat_high@64}
         SOCK_REVERSE_NAT6 v1: SockRevNatKey6[32]{cookie@0,backend_address_be@8,backend_port_be@24} -> SockRevNatValue6[20]{service_address_be@0,service_port_be@16,rev_nat_low@18}
         FRAGMENTS6 v1: FragmentKey6[40]{source_be@0,destination_be@16,id_be@32,protocol@36} -> FragmentPorts[4]{source_port_be@0,destination_port_be@2}
         POD_ROUTES6 v1: PodRouteKey6[24]{netns_cookie@0,address_be@8} -> u32
         AFFINITY v1: AffinityKey[24]{client@0,rev_nat_id@16,kind@20} -> AffinityValue[16]{last_used@0,backend_id@8}
         AFFINITY_MATCH v1: AffinityMatchKey[8]{backend_id@0,rev_nat_id@4} -> u8
         AFFINITY_TIMEOUT v1: u32 -> u64 jiffies
         SERVICE_COUNTERS v1: u32 -> ServiceCounters[16]{packets@0,new_flows@8} per CPU
         NORTH_SOUTH v1: u32 -> NorthSouthConfig[16]{maglev_seed@0,maglev_table_size@8}
         MAGLEV_TABLE_OF v1: u32 -> u32 table + 1
         MAGLEV v1: u32 -> MaglevPair[8]{backend_ids@0}
         LOCAL_PODS v1: u32 -> LocalPod[8]{mac@0}
         NORTH_SOUTH v2: u32 -> NorthSouthConfig[24]{maglev_seed@0,maglev_table_size@8,snat_address_be@12,snat_port_first@16,snat_port_count@18}
         UPLINK_SNAT v1: CtKey[16]{client_address_be@0,peer_address_be@4,client_port_be@8,peer_port_be@10,protocol@12,kind@13} -> UplinkSnat[40]{last_seen@0,client_address_be@8,frontend_address_be@12,client_port_be@16,frontend_port_be@18,client_mac@20,uplink_mac@26,state@32}";

    #[test]
    fn reverse_nat_ids_take_24_bits_and_values_written_before_read_the_same() {
        let head = ServiceValue::new(7, 3, 5, 0x12_3456, 0);
        assert_eq!(
            (head.rev_nat_id(), head.slot_index(1), head.slot_index(5)),
            (0x12_3456, 7, 11)
        );
        assert_eq!(head.slot_capacity(), 8);
        let mut flow = CtEntry::default();
        flow.set_rev_nat_id(REV_NAT_ID_LIMIT - 1);
        assert_eq!(flow.rev_nat_id(), REV_NAT_ID_LIMIT - 1);
        // What the build with 16-bit ids wrote: the id at offset 20 of a
        // flow, zeros where the high bits are now.
        let mut old = [0u64; 7];
        // SAFETY: CtEntry is Pod, 56 bytes, align 8.
        let bytes: &mut [u8; 56] = unsafe { &mut *old.as_mut_ptr().cast() };
        bytes[20..22].copy_from_slice(&0xbeef_u16.to_ne_bytes());
        // SAFETY: as above.
        let flow: CtEntry = unsafe { core::mem::transmute(old) };
        assert_eq!(flow.rev_nat_id(), 0xbeef);
    }

    #[test]
    fn the_ipv6_maps_are_maps_of_their_own() {
        for map in IPV6_MAPS {
            assert!(ALL_MAPS.contains(&map), "{map}");
            assert_eq!(layout_version(map), Some(1), "{map} started at 1");
        }
    }

    #[test]
    fn layouts_have_no_implicit_padding() {
        assert_eq!(size_of::<ServiceKey>(), 4 + 2 + 1 + 1);
        assert_eq!(size_of::<ServiceValue>(), 4 + 2 + 2 + 1 + 1 + 1 + 1);
        assert_eq!((size_of::<Slot>(), align_of::<Slot>()), (4 + 4, 8));
        assert_eq!(
            (size_of::<Backend>(), align_of::<Backend>()),
            (4 + 2 + 1 + 1, 8)
        );
        assert_eq!(size_of::<RevNatValue>(), 4 + 2 + 1 + 1);
        assert_eq!(size_of::<CtKey>(), 4 + 4 + 2 + 2 + 1 + 1 + 2);
        assert_eq!(
            size_of::<CtEntry>(),
            8 + 8 + 4 + 2 + 1 + 1 + 4 + 2 + 6 + 6 + 2 + 4 + 4 + 2 + 2
        );
        assert_eq!(align_of::<CtEntry>(), 8);
        assert_eq!(size_of::<SockRevNatKey>(), 8 + 4 + 2 + 2);
        assert_eq!(size_of::<SockRevNatValue>(), 4 + 2 + 2);
        assert_eq!(size_of::<FragmentKey>(), 4 + 4 + 2 + 1 + 1);
        assert_eq!(size_of::<FragmentPorts>(), 2 + 2);
        assert_eq!(size_of::<PodRouteKey>(), 8 + 4 + 4);
        assert_eq!(size_of::<AffinityKey>(), 16 + 4 + 1 + 3);
        assert_eq!(size_of::<AffinityValue>(), 8 + 4 + 4);
        assert_eq!(size_of::<AffinityMatchKey>(), 4 + 4);
        assert_eq!(size_of::<NorthSouthConfig>(), 8 + 4 + 4 + 2 + 2 + 4);
        assert_eq!(size_of::<UplinkSnat>(), 8 + 4 + 4 + 2 + 2 + 6 + 6 + 1 + 7);
        assert_eq!(
            (size_of::<MaglevPair>(), align_of::<MaglevPair>()),
            (4 + 4, 8)
        );
        assert_eq!(size_of::<LocalPod>(), 6 + 2);
    }

    #[test]
    fn keys_hold_network_order_bytes() {
        // 10.96.0.10:53 as the packet carries it.
        let key = ServiceKey::new(
            u32::from_ne_bytes([10, 96, 0, 10]),
            u16::from_ne_bytes(53u16.to_be_bytes()),
            crate::IPPROTO_UDP,
        );
        // SAFETY: ServiceKey is repr(C) without implicit padding.
        let bytes: [u8; 8] = unsafe { core::mem::transmute(key) };
        assert_eq!(bytes, [10, 96, 0, 10, 0, 53, 17, 0]);
    }
}
