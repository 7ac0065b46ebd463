//! North-south: traffic from outside the cluster arriving on the node's
//! uplink for a nodePort, load-balancer IP or external IP, handled by the
//! XDP program (`up_xdp_uplink`). Its frontends are ordinary `SERVICES`
//! entries; what is north-south's own is here:
//!
//! - `NORTH_SOUTH` (array, one entry): the settings every node shares
//!   (Maglev seed and table size) and this node's own (its SNAT address
//!   and ports);
//! - `MAGLEV_TABLE_OF` (array by reverse-NAT id): which Maglev table a
//!   frontend's new flows from outside are balanced with (0: none — the
//!   frontend is not served from outside here, packets pass to the
//!   stack). Frontends of one service port share a table;
//! - `MAGLEV` (mmap-able array): the tables, `table_size` entries each
//!   (`maglev::build_table`), two entries per element;
//! - `LOCAL_PODS` (hash): the underlay pods on this node's uplink, by
//!   IPv4 address, with their interface's MAC: a backend found here is
//!   handed to its macvlan by rewriting the frame's destination MAC;
//! - `UPLINK_SNAT` (LRU): flows to backends on other nodes, SNATed to
//!   this node: by their replies' tuple, the client and frontend to
//!   restore.

use super::BackendId;

/// Value of `NORTH_SOUTH`'s one entry.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct NorthSouthConfig {
    /// The cluster's Maglev seed (`maglev::flow_hash4`): the same on
    /// every node, so that every node picks the same backend for a flow.
    pub maglev_seed: u64,
    /// Entries per Maglev table (a prime, `maglev::check_table_size`);
    /// zero until the agent has written the entry: nothing is served
    /// from outside before.
    pub maglev_table_size: u32,
    /// This node's address on the uplink: the source flows to a backend
    /// on another node get (SNAT), where their replies come back. Zero:
    /// such flows pass to the stack untranslated.
    pub snat_address_be: u32,
    /// The source ports SNAT hands out: `snat_port_first` and the
    /// `snat_port_count - 1` after it (host order), outside the kernel's
    /// ephemeral range so that no socket of the node's own holds one.
    pub snat_port_first: u16,
    pub snat_port_count: u16,
    /// Always zero.
    pub _pad: u32,
}

impl NorthSouthConfig {
    /// Whether `port_be` (a reply's destination port) is one SNAT hands
    /// out.
    #[inline(always)]
    pub const fn is_snat_port(&self, port_be: u16) -> bool {
        let port = u16::from_be(port_be);
        port >= self.snat_port_first && port - self.snat_port_first < self.snat_port_count
    }
}

/// Key of `UPLINK_SNAT`: a reply's tuple as `conntrack`'s backend-tuple
/// keys hold it (`CtKey`, client = the node's SNAT address and port).
/// Value: how to turn the reply back.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct UplinkSnat {
    /// Kernel jiffies when the flow was last refreshed (as `CtEntry`).
    pub last_seen: u64,
    /// The client outside: the reply's destination is restored to it.
    pub client_address_be: u32,
    /// The frontend the client reached (nodePort at this node's address,
    /// a load-balancer IP): the reply's source is restored to it.
    pub frontend_address_be: u32,
    pub client_port_be: u16,
    pub frontend_port_be: u16,
    /// The hop the flow came in from (its first frame's source MAC):
    /// replies go back to it.
    pub client_mac: [u8; 6],
    /// The uplink's own MAC (the first frame's destination).
    pub uplink_mac: [u8; 6],
    /// `conntrack::STATE_*` bits.
    pub state: u8,
    /// Always zero.
    pub _pad: [u8; 7],
}

/// Default room in `UPLINK_SNAT`: flows from outside to backends on
/// other nodes.
pub const DEFAULT_UPLINK_SNAT_MAX: u32 = 65_536;
/// Default SNAT ports: above the kernel's default ephemeral range
/// (`ip_local_port_range` 32768-60999).
pub const DEFAULT_SNAT_PORT_FIRST: u16 = 61_000;
pub const DEFAULT_SNAT_PORT_COUNT: u16 = 4_536;

/// Value of `MAGLEV`: two consecutive entries of a table. Eight bytes
/// because the kernel lays an array's values out 8-byte aligned anyway
/// (a lone u32 would waste half of every element in the mapping).
#[repr(C, align(8))]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct MaglevPair {
    /// The `BACKENDS` ids of entries `2k` and `2k + 1` (0: none — a table
    /// being written).
    pub backend_ids: [BackendId; 2],
}

/// Elements of `MAGLEV` one table of `table_size` entries takes.
#[inline(always)]
pub const fn maglev_elements(table_size: u32) -> u32 {
    table_size.div_ceil(2)
}

/// Where entry `entry` of table `table` (0-based) is in `MAGLEV`: the
/// element and the lane in its pair.
#[inline(always)]
pub const fn maglev_position(table: u32, entry: u32, table_size: u32) -> (u32, usize) {
    (
        table * maglev_elements(table_size) + entry / 2,
        (entry & 1) as usize,
    )
}

/// Value of `LOCAL_PODS` (key: the pod's IPv4 address, `_be`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct LocalPod {
    /// The pod interface's MAC: a frame to it is taken by its macvlan.
    pub mac: [u8; 6],
    /// Always zero.
    pub _pad: [u8; 2],
}

/// `NORTH_SOUTH`'s entries.
pub const NORTH_SOUTH_ENTRIES: u32 = 1;
/// Default Maglev tables (service ports served from outside, all their
/// frontends sharing one): 64 KiB of kernel memory each at the default
/// table size.
pub const DEFAULT_MAGLEV_TABLES: u32 = 128;
/// Default room for underlay pods on this node's uplink.
pub const DEFAULT_LOCAL_PODS_MAX: u32 = 4_096;
