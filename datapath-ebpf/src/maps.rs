//! The maps, declared once for all programs of the object. Layouts and
//! meaning live in `datapath_common::maps`; capacities here are
//! placeholders that the loader overrides (`EbpfLoader::set_max_entries`).

use aya_ebpf::{
    macros::map,
    maps::{Array, HashMap, LpmTrie, LruHashMap, PerCpuArray, ProgramArray},
};
use datapath_common::{
    maps::{
        AffinityKey, AffinityMatchKey, AffinityValue, BPF_F_MMAPABLE, BPF_F_NO_PREALLOC, Backend,
        BackendAddress6, CtEntry, CtEntry6, CtKey, CtKey6, FragmentKey, FragmentKey6,
        FragmentPorts, LocalPod, MaglevPair, NorthSouthConfig, PodRouteKey, PodRouteKey6,
        RevNatValue, RevNatValue6, ServiceCounters, ServiceKey, ServiceKey6, ServiceValue, Slot,
        SockRevNatKey, SockRevNatKey6, SockRevNatValue, SockRevNatValue6, UplinkSnat,
    },
    metrics::COUNTER_COUNT,
};

/// How many frontends hash into each bucket
/// (`datapath_common::lb::service_filter_index`). A packet whose bucket is
/// empty cannot be for a service: it leaves after this one inlined array
/// read, before any hash lookup.
#[map]
pub static SERVICE_FILTER: Array<u32> =
    Array::with_max_entries(1 << datapath_common::lb::SERVICE_FILTER_BITS, 0);

/// Frontends, each with where its backend slots are in `SLOTS`.
#[map]
pub static SERVICES: HashMap<ServiceKey, ServiceValue> = HashMap::with_max_entries(1024, 0);

/// Every frontend's backend slots, a block each (mmap-able: the agent
/// writes them by storing into its mapping).
#[map]
pub static SLOTS: Array<Slot> = Array::with_max_entries(1024, BPF_F_MMAPABLE);

/// Backend id → address and port (array: O(1) on every tracked packet).
#[map]
pub static BACKENDS: Array<Backend> = Array::with_max_entries(1024, BPF_F_MMAPABLE);

/// Reverse-NAT id → frontend (array indexed by the u16 id).
#[map]
pub static REVERSE_NAT: Array<RevNatValue> = Array::with_max_entries(65_536, 0);

/// A conntrack table (`CONNTRACK_TCP` or `CONNTRACK_UDP`).
pub type CtMap = LruHashMap<CtKey, CtEntry>;

/// Per-flow state for the TC path's TCP flows: two entries per flow
/// (service tuple, backend tuple). LRU so a full table evicts the coldest
/// flow instead of refusing new ones.
#[map]
pub static CONNTRACK_TCP: CtMap = LruHashMap::with_max_entries(4096, 0);

/// The same for UDP flows, apart so that a burst of short UDP flows (DNS)
/// evicts UDP flows, never idle TCP connections.
#[map]
pub static CONNTRACK_UDP: CtMap = LruHashMap::with_max_entries(4096, 0);

/// Socket-LB: which frontend a translated socket really talks to, for
/// getpeername and recvmsg.
#[map]
pub static SOCK_REVERSE_NAT: LruHashMap<SockRevNatKey, SockRevNatValue> =
    LruHashMap::with_max_entries(4096, 0);

/// `datapath_common::metrics::Counter`-indexed event counters.
#[map]
pub static COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(COUNTER_COUNT, 0);

/// Ports of fragmented datagrams whose first fragment was translated, for
/// their later fragments (`crate::frag`). LRU: a datagram whose last
/// fragment never came is forgotten when room is needed.
#[map]
pub static FRAGMENTS: LruHashMap<FragmentKey, FragmentPorts> =
    LruHashMap::with_max_entries(datapath_common::maps::DEFAULT_FRAGMENTS_MAX, 0);

/// Destinations (`lb::service_filter_index` buckets) that connections
/// straight to a pod were tracked for after a tuple clash (`crate::clash`):
/// a flag (1) the datapath sets, never cleared, so a flagged bucket only
/// costs its packets one conntrack lookup.
#[map]
pub static CLASH_FILTER: Array<u32> =
    Array::with_max_entries(1 << datapath_common::lb::SERVICE_FILTER_BITS, 0);

/// Backends (`lb::service_filter_index` buckets of their address, port
/// and protocol) that tracked flows were opened to: a flag (1) the egress
/// program sets on each new flow (the agent rebuilds them from conntrack
/// at start; the programs never clear one), so that a packet arriving
/// from anything else leaves the ingress program after this one array read
/// instead of a conntrack lookup (`crate::reply_filter`). The last entry
/// (`REPLY_FILTER_COMPLETE`) says whether the flags can be trusted yet.
#[map]
pub static REPLY_FILTER: Array<u32> =
    Array::with_max_entries(datapath_common::maps::REPLY_FILTER_ENTRIES, 0);

/// Attached pods' routing tables (`crate::route`): (netns cookie, prefix)
/// → the interface the route leaves by. Written by the agent.
#[map]
pub static POD_ROUTES: LpmTrie<PodRouteKey, u32> =
    LpmTrie::with_max_entries(datapath_common::maps::DEFAULT_POD_ROUTES_MAX, 0);

/// Network namespaces (cookies) whose sockets socket-LB leaves alone
/// (`datapath_common::sock_lb`): pods opted out, whose traffic takes the
/// TC path. Written by the agent; consulted only when the scope says so.
#[map]
pub static SOCK_LB_SKIP: HashMap<u64, u8> =
    HashMap::with_max_entries(datapath_common::maps::DEFAULT_SOCK_LB_SKIP_MAX, 0);

// The IPv6 twins (`datapath_common::maps::v6`): one entry each unless the
// loader sizes them for IPv6, so that an IPv4-only node pays nothing.

/// IPv6 frontends (`SERVICES`' twin; their slots are blocks of `SLOTS`).
#[map]
pub static SERVICES6: HashMap<ServiceKey6, ServiceValue> = HashMap::with_max_entries(1, 0);

/// The address of each IPv6 backend, under its `BACKENDS` id.
#[map]
pub static BACKEND_ADDRS6: Array<BackendAddress6> = Array::with_max_entries(1, BPF_F_MMAPABLE);

/// Reverse-NAT id → IPv6 frontend.
#[map]
pub static REVERSE_NAT6: Array<RevNatValue6> = Array::with_max_entries(1, 0);

/// A conntrack table of IPv6 flows (`CONNTRACK6_TCP` or `CONNTRACK6_UDP`).
pub type CtMap6 = LruHashMap<CtKey6, CtEntry6>;

/// IPv6 TCP flows of the TC path (two entries each).
#[map]
pub static CONNTRACK6_TCP: CtMap6 = LruHashMap::with_max_entries(1, 0);

/// IPv6 UDP flows of the TC path (two entries each).
#[map]
pub static CONNTRACK6_UDP: CtMap6 = LruHashMap::with_max_entries(1, 0);

/// Socket-LB over IPv6: which frontend a translated socket talks to.
#[map]
pub static SOCK_REVERSE_NAT6: LruHashMap<SockRevNatKey6, SockRevNatValue6> =
    LruHashMap::with_max_entries(1, 0);

/// Ports of fragmented IPv6 datagrams in flight.
#[map]
pub static FRAGMENTS6: LruHashMap<FragmentKey6, FragmentPorts> = LruHashMap::with_max_entries(1, 0);

/// Attached pods' IPv6 routes: (netns cookie, prefix) → interface.
#[map]
pub static POD_ROUTES6: LpmTrie<PodRouteKey6, u32> = LpmTrie::with_max_entries(1, 0);

/// The TC egress program's jump table (`datapath_common::jumps`): slot
/// `EGRESS6` holds `up_tc_egress6`, set by the loader.
#[map]
pub static TC_JUMPS: ProgramArray =
    ProgramArray::with_max_entries(datapath_common::jumps::SLOTS, 0);

// `sessionAffinity: ClientIP` (`datapath_common::maps::affinity`).

/// Each client's last backend per frontend with affinity (LRU: a
/// forgotten client loses only its stickiness).
#[map]
pub static AFFINITY: LruHashMap<AffinityKey, AffinityValue> =
    LruHashMap::with_max_entries(datapath_common::maps::DEFAULT_AFFINITY_MAX, 0);

/// The backends each frontend with affinity has now: a remembered
/// backend not here has left, and its clients re-balance.
#[map]
pub static AFFINITY_MATCH: HashMap<AffinityMatchKey, u8> =
    HashMap::with_max_entries(1024, BPF_F_NO_PREALLOC);

/// Reverse-NAT id → the frontend's affinity timeout in jiffies (zero:
/// none). An array: the one read every new flow pays is inlined.
#[map]
pub static AFFINITY_TIMEOUT: Array<u64> = Array::with_max_entries(65_536, BPF_F_MMAPABLE);

/// Reverse-NAT id → packets and new flows sent to that frontend, per CPU
/// (`datapath_common::maps::service_counters`). One entry when the agent
/// runs with `--service-counters off`: the programs then find no slot
/// for any frontend and count nothing.
#[map]
pub static SERVICE_COUNTERS: PerCpuArray<ServiceCounters> =
    PerCpuArray::with_max_entries(65_536, 0);

// North-south on the uplink (`datapath_common::maps::north_south`): one
// entry each unless the agent serves traffic from outside.

/// The north-south settings (Maglev seed and table size), one entry.
#[map]
pub static NORTH_SOUTH: Array<NorthSouthConfig> = Array::with_max_entries(1, 0);

/// Reverse-NAT id → the frontend's Maglev table number + 1 (0: not
/// served from outside on this node).
#[map]
pub static MAGLEV_TABLE_OF: Array<u32> = Array::with_max_entries(1, 0);

/// The Maglev tables, two backend ids per element (mmap-able: the agent
/// writes a table by storing into its mapping).
#[map]
pub static MAGLEV: Array<MaglevPair> = Array::with_max_entries(1, BPF_F_MMAPABLE);

/// This node's underlay pods on the uplink, by IPv4 address: the MAC a
/// frame for one is rewritten to.
#[map]
pub static LOCAL_PODS: HashMap<u32, LocalPod> = HashMap::with_max_entries(1, 0);

/// Flows from outside SNATed to this node for a backend elsewhere, by
/// their replies' tuple (the node's address and SNAT port as client):
/// the client and frontend their replies are turned back to. LRU, like
/// conntrack.
#[map]
pub static UPLINK_SNAT: LruHashMap<CtKey, UplinkSnat> = LruHashMap::with_max_entries(1, 0);
