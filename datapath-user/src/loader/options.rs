//! What a load is given: map sizes, conntrack lifetimes, the pin
//! directory, the feature bits and socket-LB scope the programs read.

use std::{path::PathBuf, time::Duration};

use datapath_common::{conntrack::Lifetimes, maps, sock_lb::SockLbScope};

use crate::{clock, map_pins::PinPolicy};

/// Where the agent pins maps and links by default.
pub const DEFAULT_PIN_DIR: &str = "/sys/fs/bpf/underpass";

/// Capacities of the maps, set at load time.
#[derive(Clone, Debug)]
pub struct MapSizes {
    /// Frontend entries (`SERVICES`): one per frontend, so the agent makes
    /// it as large as the reverse-NAT ids.
    pub services: u32,
    /// Backend slots (`SLOTS`): each frontend owns a block of the power
    /// of two at or above its backend count.
    pub slots: u32,
    pub backends: u32,
    /// Reverse-NAT ids (one per frontend, id 0 unused).
    pub reverse_nat: u32,
    /// TCP flows the TC path can track (the map holds two entries each).
    pub conntrack_tcp_flows: u32,
    /// UDP flows the TC path can track (two entries each).
    pub conntrack_udp_flows: u32,
    pub sock_reverse_nat: u32,
    /// Clients `sessionAffinity: ClientIP` remembers, all frontends
    /// together (`AFFINITY`, an LRU).
    pub affinity_clients: u32,
    /// Count packets and new flows per frontend (`SERVICE_COUNTERS`, a
    /// per-CPU entry per reverse-NAT id); otherwise it takes one entry
    /// and nothing is counted.
    pub service_counters: bool,
    /// Size the IPv6 maps as their IPv4 twins; otherwise they take one
    /// entry each (an IPv4-only node pays nothing for them).
    pub ipv6: bool,
    /// Maglev tables for north-south frontends (`MAGLEV`: one per
    /// service port served from outside). Zero when nothing is: the
    /// north-south maps then take one entry each.
    pub maglev_tables: u32,
    /// Entries per Maglev table (a prime,
    /// `datapath_common::maglev::check_table_size`).
    pub maglev_table_size: u32,
}

impl MapSizes {
    /// The slots `frontends` frontends of `backends_each` backends take
    /// (each owns the power of two at or above its count).
    pub fn slots_for(frontends: usize, backends_each: usize) -> u32 {
        let block = backends_each.clamp(1, usize::from(maps::MAX_BACKENDS_PER_SERVICE));
        u32::try_from(frontends.saturating_mul(block.next_power_of_two()))
            .unwrap_or(u32::MAX)
            .min(maps::SLOTS_LIMIT)
    }

    /// `max_entries` of each sized map, as the loader sets them.
    pub fn max_entries(&self) -> [(&'static str, u32); 23] {
        let tcp_entries = self
            .conntrack_tcp_flows
            .saturating_mul(maps::CT_ENTRIES_PER_FLOW);
        let udp_entries = self
            .conntrack_udp_flows
            .saturating_mul(maps::CT_ENTRIES_PER_FLOW);
        let v6 = |entries: u32| if self.ipv6 { entries } else { 1 };
        let north_south = |entries: u32| {
            if self.maglev_tables > 0 {
                entries.max(1)
            } else {
                1
            }
        };
        [
            (maps::SERVICES_MAP, self.services),
            (maps::SLOTS_MAP, self.slots.min(maps::SLOTS_LIMIT)),
            (maps::BACKENDS_MAP, self.backends),
            (maps::REVERSE_NAT_MAP, self.reverse_nat),
            (maps::CONNTRACK_TCP_MAP, tcp_entries),
            (maps::CONNTRACK_UDP_MAP, udp_entries),
            (maps::SOCK_REVERSE_NAT_MAP, self.sock_reverse_nat),
            (maps::SERVICES6_MAP, v6(self.services)),
            // Ids are shared: every id of `BACKENDS` may be an IPv6 one.
            (maps::BACKEND_ADDRS6_MAP, v6(self.backends)),
            (maps::REVERSE_NAT6_MAP, v6(self.reverse_nat)),
            (maps::CONNTRACK6_TCP_MAP, v6(tcp_entries)),
            (maps::CONNTRACK6_UDP_MAP, v6(udp_entries)),
            (maps::SOCK_REVERSE_NAT6_MAP, v6(self.sock_reverse_nat)),
            (maps::FRAGMENTS6_MAP, v6(maps::DEFAULT_FRAGMENTS_MAX)),
            (maps::POD_ROUTES6_MAP, v6(maps::DEFAULT_POD_ROUTES_MAX)),
            // One timeout per reverse-NAT id; a match entry per backend
            // of a frontend with affinity (allocated as written), and room
            // for a frontend's new set beside its old one.
            (maps::AFFINITY_TIMEOUT_MAP, self.reverse_nat),
            (maps::AFFINITY_MAP, self.affinity_clients.max(1)),
            (
                maps::AFFINITY_MATCH_MAP,
                (self.slots.min(maps::SLOTS_LIMIT))
                    .saturating_add(u32::from(maps::MAX_BACKENDS_PER_SERVICE)),
            ),
            // Per CPU: 16 bytes × ids × possible CPUs of kernel memory.
            (
                maps::SERVICE_COUNTERS_MAP,
                if self.service_counters {
                    self.reverse_nat
                } else {
                    1
                },
            ),
            // 8 B per two entries: 64 KiB per table at the default size.
            (
                maps::MAGLEV_MAP,
                north_south(
                    self.maglev_tables
                        .saturating_mul(maps::maglev_elements(self.maglev_table_size)),
                ),
            ),
            (maps::MAGLEV_TABLE_OF_MAP, north_south(self.reverse_nat)),
            (
                maps::LOCAL_PODS_MAP,
                north_south(maps::DEFAULT_LOCAL_PODS_MAX),
            ),
            (
                maps::UPLINK_SNAT_MAP,
                north_south(maps::DEFAULT_UPLINK_SNAT_MAX),
            ),
        ]
    }
}

impl Default for MapSizes {
    fn default() -> Self {
        Self {
            services: maps::DEFAULT_REVERSE_NAT_MAX,
            slots: maps::DEFAULT_SLOTS_MAX,
            backends: maps::DEFAULT_BACKENDS_MAX,
            reverse_nat: maps::DEFAULT_REVERSE_NAT_MAX,
            conntrack_tcp_flows: maps::DEFAULT_CONNTRACK_TCP_FLOWS,
            conntrack_udp_flows: maps::DEFAULT_CONNTRACK_UDP_FLOWS,
            sock_reverse_nat: maps::DEFAULT_SOCK_REVERSE_NAT_MAX,
            affinity_clients: maps::DEFAULT_AFFINITY_MAX,
            service_counters: true,
            ipv6: false,
            maglev_tables: 0,
            maglev_table_size: datapath_common::maglev::DEFAULT_TABLE_SIZE,
        }
    }
}

#[derive(Clone, Debug, Default)]
pub struct LoadOptions {
    /// Pin maps (create or reuse) and links under this bpffs directory.
    /// `None` keeps everything private to this process.
    pub pin_dir: Option<PathBuf>,
    pub sizes: MapSizes,
    /// Conntrack lifetimes (default: Cilium's).
    pub ct_timeouts: CtTimeouts,
    /// What to do with pinned maps this object defines differently
    /// (`map_pins`): the agent replaces them, everyone else adopts them
    /// or stops.
    pub pin_policy: PinPolicy,
    /// `datapath_common::features` bits to load with; `None`: what the
    /// probes found (`crate::probe`). Tests set fewer to show fallbacks.
    pub feature_bits: Option<u32>,
    /// Which sockets socket-LB translates (default: all).
    pub sock_lb_scope: SockLbScope,
    /// Which rare datapath events the programs log (default: warnings).
    pub datapath_log: DatapathLog,
    /// How translated packets get their L4 checksums (default: directly,
    /// where the kernel allows).
    pub l4_checksums: L4Checksums,
}

/// How the programs update a translated packet's L4 checksum
/// (`datapath_common::skb_checksum`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum L4Checksums {
    /// By their own arithmetic after reading the skb's checksum state,
    /// where the kernel's BTF says where it is (Linux ≥ 6.2); helper
    /// calls for CHECKSUM_COMPLETE and on other kernels.
    #[default]
    Direct,
    /// Always by `bpf_l4_csum_replace` calls, as on a kernel without BTF
    /// (tests of that path, before/after figures).
    Helpers,
}

/// Which rare datapath events the programs log through aya-log (no
/// endpoints, a conntrack or fragment table that refused an entry). Fixed
/// at load: the verifier removes every event below the level, so the
/// per-packet path pays nothing for them.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum DatapathLog {
    /// Nothing.
    Off,
    Error,
    /// Tables that refused an entry (flows then lose translation).
    #[default]
    Warn,
    /// Also new flows refused for a service without endpoints.
    Info,
    Debug,
}

impl DatapathLog {
    /// The value of aya-log's `AYA_LOG_LEVEL` (its `Level` numbering,
    /// 0 = off).
    pub fn aya_level(self) -> u8 {
        match self {
            DatapathLog::Off => 0,
            DatapathLog::Error => aya_log::Level::Error as u8,
            DatapathLog::Warn => aya_log::Level::Warn as u8,
            DatapathLog::Info => aya_log::Level::Info as u8,
            DatapathLog::Debug => aya_log::Level::Debug as u8,
        }
    }
}

/// How long idle flows are remembered, by state.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CtTimeouts {
    pub tcp_syn: Duration,
    pub tcp_established: Duration,
    pub tcp_closing: Duration,
    pub udp: Duration,
    /// How stale a busy flow's timestamp may get before a packet refreshes
    /// it (bounds the write rate to conntrack).
    pub refresh: Duration,
    /// How long next-hop MACs learned from replies are used without a
    /// newer reply confirming them.
    pub l2_fresh: Duration,
    /// How long a TCP flow from outside the backend closed first keeps
    /// its SNAT port (the backend's TIME_WAIT).
    pub snat_port_reuse: Duration,
    /// How long one the client closed first, or reset, keeps it.
    pub snat_port_closed: Duration,
}

impl Default for CtTimeouts {
    fn default() -> Self {
        use datapath_common::conntrack as c;
        Self {
            tcp_syn: Duration::from_secs(c::TCP_SYN_LIFETIME_SECS),
            tcp_established: Duration::from_secs(c::TCP_ESTABLISHED_LIFETIME_SECS),
            tcp_closing: Duration::from_secs(c::TCP_CLOSING_LIFETIME_SECS),
            udp: Duration::from_secs(c::UDP_LIFETIME_SECS),
            refresh: Duration::from_secs(c::REFRESH_INTERVAL_SECS),
            l2_fresh: Duration::from_secs(c::L2_FRESH_SECS),
            snat_port_reuse: Duration::from_secs(c::SNAT_PORT_REUSE_SECS),
            snat_port_closed: Duration::from_secs(c::SNAT_PORT_CLOSED_SECS),
        }
    }
}

impl CtTimeouts {
    /// In kernel ticks at `hz`, as the datapath uses them.
    pub fn in_ticks(&self, hz: u64) -> Lifetimes {
        Lifetimes {
            tcp_syn: clock::ticks(self.tcp_syn, hz),
            tcp_established: clock::ticks(self.tcp_established, hz),
            tcp_closing: clock::ticks(self.tcp_closing, hz),
            udp: clock::ticks(self.udp, hz),
            refresh: clock::ticks(self.refresh, hz),
            l2_fresh: clock::ticks(self.l2_fresh, hz),
            snat_port_reuse: clock::ticks(self.snat_port_reuse, hz),
            snat_port_closed: clock::ticks(self.snat_port_closed, hz),
        }
    }
}
