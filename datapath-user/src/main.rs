//! `underpass`: the node agent and its tools.

// jemalloc, with `memory::JEMALLOC_CONF`: see `datapath_user::memory`.
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

#[unsafe(export_name = "_rjem_malloc_conf")]
static JEMALLOC_CONF: datapath_user::memory::JemallocConf =
    datapath_user::memory::JemallocConf(datapath_user::memory::JEMALLOC_CONF.as_ptr());

use std::{path::PathBuf, process::ExitCode, time::Duration};

use anyhow::{Context, Result, bail};
use clap::{Args, Parser, Subcommand, ValueEnum};
use datapath_user::{
    Datapath, LoadOptions, TcMode,
    agent::{self, AgentOptions, SourceConfig},
    attach::Selector,
    cni, inspect,
    inspect::Output,
    k8s::{Ipv6Serving, NodeContext},
    loader::{
        self, CtTimeouts, DEFAULT_PIN_DIR, DatapathLog, L4Checksums, MapSizes, XdpAttachMode,
    },
    netns,
    pod_tc::PodTcPolicy,
};

#[derive(Parser)]
#[command(
    name = "underpass",
    version,
    about = "eBPF ClusterIP datapath for underlay (macvlan/SR-IOV/ipvlan) pods",
    long_about = "underpass translates Kubernetes ClusterIPs to endpoints on the pod's own \
                  interface (TC egress/ingress) and at connect() time (cgroup socket-LB), \
                  replacing kube-proxy's veth detour for underlay pods."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the node agent: keep the maps equal to the cluster's Services
    /// and EndpointSlices, attach to every underlay pod interface, serve
    /// metrics. Stopping it leaves the datapath running (maps and links
    /// are pinned); the next agent adopts them without breaking a flow.
    ///
    /// Examples:
    ///   underpass agent                                 # in-cluster
    ///   underpass agent --kubeconfig ~/.kube/config --node-name node-1
    ///   underpass agent --from-dir ./manifests --no-socket-lb
    #[command(verbatim_doc_comment)]
    Agent(Box<AgentArgs>),
    /// Attach the TC pair to one interface in one namespace by hand
    /// (pinned: it stays after this command exits).
    Attach(AttachArgs),
    /// Remove what `attach` (or the agent) pinned on an interface.
    Detach(AttachArgs),
    /// Chained CNI plugin (spec 1.0): ADD attaches to CNI_IFNAME in
    /// CNI_NETNS, DEL detaches, CHECK verifies, VERSION reports; the
    /// previous plugin's result passes through unchanged. Reads the
    /// network configuration on stdin ("pinDir" may override --pin-dir).
    /// A container runtime runs the installed binary without arguments
    /// and with CNI_COMMAND set: that is this command too.
    Cni(PinArgs),
    /// Install this binary as the chained CNI plugin: copy it to
    /// DIR/underpass atomically (the DaemonSet's init container; the image
    /// has no shell or cp).
    InstallCni {
        /// The node's CNI plugin directory, as mounted.
        #[arg(long, default_value = "/host/opt/cni/bin")]
        to: PathBuf,
    },
    /// Frontends in the pinned maps and the backends they balance over.
    Service {
        #[command(subcommand)]
        command: ListCommand,
    },
    /// Backend entries in the pinned maps.
    Backend {
        #[command(subcommand)]
        command: ListCommand,
    },
    /// Tracked flows (client → service → backend).
    Conntrack {
        #[command(subcommand)]
        command: ConntrackCommand,
    },
    /// What is pinned: map fill, attached interfaces and cgroups, counters.
    Status(OutputArgs),
    /// Remove the datapath from this node (as kube-proxy's --cleanup):
    /// detach every program the agent and the CNI plugin attached (pod
    /// interfaces, cgroups) and remove every pin, maps included. Delete
    /// the DaemonSet first, or its agent attaches again.
    Uninstall(UninstallArgs),
}

#[derive(Args)]
struct PinArgs {
    /// bpffs directory holding the datapath's pinned maps and links.
    #[arg(long, env = "UNDERPASS_PIN_DIR", default_value = DEFAULT_PIN_DIR)]
    pin_dir: PathBuf,
}

#[derive(Args)]
struct UninstallArgs {
    #[command(flatten)]
    pin: PinArgs,
    /// Where pods' network namespaces are (netlink-mode filters are
    /// looked for in each, and in the host's).
    #[arg(long, env = "UNDERPASS_NETNS_DIR", default_value = netns::NETNS_RUN_DIR)]
    netns_dir: PathBuf,
}

#[derive(Args)]
struct OutputArgs {
    #[command(flatten)]
    pin: PinArgs,
    /// Output format: a table for people, JSON for scripts.
    #[arg(short, long, value_enum, default_value_t = Output::Table)]
    output: Output,
}

#[derive(Subcommand)]
enum ListCommand {
    /// List the entries.
    List(OutputArgs),
}

#[derive(Subcommand)]
enum ConntrackCommand {
    /// List tracked flows.
    List {
        #[command(flatten)]
        output: OutputArgs,
        /// Stop after this many entries.
        #[arg(long, default_value_t = 1000)]
        limit: usize,
    },
}

#[derive(Args)]
struct AttachArgs {
    /// Network namespace: a name under /var/run/netns, or a path.
    #[arg(long)]
    netns: String,
    /// Interface inside it (e.g. eth0 of a macvlan pod).
    #[arg(long)]
    dev: String,
    #[command(flatten)]
    pin: PinArgs,
    /// How to attach: tcx (kernel 6.6+, pinned links) or netlink (cls_bpf).
    #[arg(long, value_enum, default_value_t = CliTcMode::Auto)]
    tc_mode: CliTcMode,
}

#[derive(Clone, Copy, ValueEnum)]
enum CliTcMode {
    /// TCX where the kernel has it, else netlink.
    Auto,
    Tcx,
    Netlink,
}

impl From<CliTcMode> for TcMode {
    fn from(mode: CliTcMode) -> Self {
        match mode {
            CliTcMode::Auto => TcMode::Auto,
            CliTcMode::Tcx => TcMode::Tcx,
            CliTcMode::Netlink => TcMode::Netlink,
        }
    }
}

#[derive(Args)]
struct AgentArgs {
    #[command(flatten)]
    pin: PinArgs,
    /// Read Services and EndpointSlices from this directory of YAML/JSON
    /// manifests (multi-document; re-read when files change) instead of
    /// the API server.
    #[arg(long, env = "UNDERPASS_FROM_DIR", conflicts_with = "kubeconfig")]
    from_dir: Option<PathBuf>,
    /// How often --from-dir is checked for changes, in milliseconds. A
    /// file renamed into place (atomic writers, editors, ConfigMap
    /// volumes) is seen at once (inotify); a file written in place is read
    /// once it held still this long; the poll also finds what events miss
    /// (network file systems).
    #[arg(long, default_value_t = 500)]
    dir_poll_ms: u64,
    /// kubeconfig for the API server (default: in-cluster service
    /// account, then KUBECONFIG, then ~/.kube/config).
    #[arg(long, env = "KUBECONFIG")]
    kubeconfig: Option<PathBuf>,
    /// The API server's real address (https://HOST:PORT, or HOST:PORT),
    /// used instead of the one the credentials name. Needed without
    /// kube-proxy: in-cluster credentials point at the `kubernetes`
    /// ClusterIP, which only works once this agent has programmed it (as
    /// Cilium's k8sServiceHost). The certificate must name this address.
    #[arg(long, env = "UNDERPASS_API_SERVER", conflicts_with = "from_dir")]
    api_server: Option<String>,
    /// This node's name (for internalTrafficPolicy: Local and node
    /// topology hints). The DaemonSet sets it from spec.nodeName. With the
    /// Kubernetes source the agent also watches this Node for its zone.
    #[arg(long, env = "NODE_NAME")]
    node_name: Option<String>,
    /// This node's zone, for EndpointSlice zone hints (what the
    /// `topology.kubernetes.io/zone` label says). With the Kubernetes
    /// source and --node-name it is read from the Node and followed, and
    /// this flag is not needed; with --from-dir, or where the agent may
    /// not read Nodes, give it here. Without a zone, zone hints are not
    /// used (every endpoint, as kube-proxy on a node without the label).
    #[arg(long, env = "UNDERPASS_NODE_ZONE", value_name = "ZONE")]
    node_zone: Option<String>,
    /// This node's addresses (comma-separated or repeated): a pod's
    /// connection to one of them at a service's nodePort is translated on
    /// the pod's interface (a macvlan pod cannot reach its own node's
    /// address otherwise). With the Kubernetes source and --node-name
    /// they are read from the Node (its InternalIP
    /// addresses) and followed; this flag is for --from-dir.
    #[arg(
        long = "node-ip",
        env = "UNDERPASS_NODE_IPS",
        value_delimiter = ',',
        value_name = "IP"
    )]
    node_ips: Vec<std::net::IpAddr>,
    /// Directory of pod network namespaces to watch (containerd's).
    #[arg(long, env = "UNDERPASS_NETNS_DIR", default_value = netns::NETNS_RUN_DIR)]
    netns_dir: PathBuf,
    /// Do not attach to pods (use `underpass attach` or the CNI plugin).
    #[arg(long)]
    no_pod_attach: bool,
    /// Only namespaces whose name matches this glob.
    #[arg(long, env = "UNDERPASS_NETNS_FILTER", default_value = "*")]
    netns_filter: String,
    /// Interface kinds that are pod underlay interfaces.
    #[arg(
        long,
        env = "UNDERPASS_IFACE_KINDS",
        value_delimiter = ',',
        default_value = "macvlan,ipvlan"
    )]
    iface_kind: Vec<String>,
    /// Also interfaces whose name matches this glob, whatever their kind
    /// (SR-IOV VFs have none), e.g. "net1".
    #[arg(long, env = "UNDERPASS_IFACE_NAME")]
    iface_name: Option<String>,
    /// How often the namespace directory is scanned, in milliseconds.
    #[arg(long, default_value_t = 1000)]
    netns_poll_ms: u64,
    #[arg(long, value_enum, default_value_t = CliTcMode::Auto)]
    tc_mode: CliTcMode,
    /// cgroup v2 directory for socket-LB (default: the cgroup2 root, i.e.
    /// every process on the node).
    #[arg(long, env = "UNDERPASS_CGROUP")]
    cgroup: Option<PathBuf>,
    /// Do not attach socket-LB (as --socket-lb off).
    #[arg(long)]
    no_socket_lb: bool,
    /// Which processes socket-LB translates at connect(): every process
    /// below --cgroup (all), host processes only (host: pods then take the
    /// TC path, which service-mesh sidecars need, since a translated
    /// connect() hides the service from their redirect rules), or none
    /// (off).
    #[arg(long, env = "UNDERPASS_SOCKET_LB", value_enum, default_value_t = SocketLb::All)]
    socket_lb: SocketLb,
    /// Pods whose network namespace name matches this glob are left to the
    /// TC path by socket-LB (the agent sees namespaces, not Pod objects;
    /// see docs/agent.md for naming them).
    #[arg(long, env = "UNDERPASS_SOCKET_LB_SKIP_NETNS")]
    socket_lb_skip_netns: Option<String>,
    /// Which pod interfaces get the TC pair. always (default): every pod;
    /// TC then also translates what socket-LB cannot: a connected UDP
    /// socket whose connect() came before its Service was programmed
    /// (kube-proxy recovers those by clearing their conntrack entries),
    /// traffic a pod forwards (a VM or VPN pod). auto: when socket-LB
    /// translates every pod (--socket-lb all, attached at the cgroup2
    /// root), only the pods it skips (--socket-lb-skip-netns): the others'
    /// packets already carry backend addresses, and the pair costs them a
    /// few hundred ns each for nothing; with --cgroup below the root,
    /// every pod. unless-socket-lb: as auto, trusting --cgroup to hold
    /// every pod's processes (pure cgroup v2 hosts only). Pods keep the
    /// pair they have whatever this says. See docs/agent.md.
    #[arg(long, env = "UNDERPASS_POD_TC", value_enum, default_value_t = PodTc::Always)]
    pod_tc: PodTc,
    /// Address for /metrics, /healthz and /readyz.
    #[arg(
        long,
        env = "UNDERPASS_METRICS_ADDRESS",
        default_value = "127.0.0.1:9964"
    )]
    metrics_address: std::net::SocketAddr,
    /// Changes are applied at once after a quiet spell; changes that
    /// follow an update within this many milliseconds wait out the rest
    /// of it and are applied together (a rollout's burst becomes a few
    /// updates, not one per object). 0: every change at once.
    #[arg(long, default_value_t = 2)]
    debounce_ms: u64,
    /// TCP flows the TC path can track (the map holds two entries per
    /// flow). Fixed when the map is first pinned; when full, the least
    /// recently used flow is forgotten.
    #[arg(long, env = "UNDERPASS_CONNTRACK_MAX", default_value_t = datapath_common::maps::DEFAULT_CONNTRACK_TCP_FLOWS)]
    conntrack_max: u32,
    /// Backend slots of all frontends: each frontend (ClusterIP:port) owns
    /// a block of the power of two at or above its endpoint count (10
    /// endpoints take 16), so 10,000 services × 10 endpoints need 160,000;
    /// 8 bytes of kernel memory each. Fixed when the map is first pinned
    /// (a new size replaces it, and the agent programs it again; tracked
    /// connections keep their backends).
    #[arg(long, env = "UNDERPASS_BACKEND_SLOTS_MAX", default_value_t = datapath_common::maps::DEFAULT_SLOTS_MAX,
          value_parser = clap::value_parser!(u32).range(1..=i64::from(datapath_common::maps::SLOTS_LIMIT)))]
    backend_slots_max: u32,
    /// Gone: the services table holds one entry per frontend
    /// (`--frontends-max`) and the backend slots are sized by
    /// `--backend-slots-max`. Accepted and ignored (with a warning) so
    /// that an older DaemonSet still starts.
    #[arg(long, env = "UNDERPASS_SERVICE_ENTRIES_MAX", hide = true)]
    service_entries_max: Option<u32>,
    /// Distinct backends (pod address, port, protocol) the node can
    /// program. A service whose backends do not fit is reported (naming
    /// this flag) and the others are served.
    #[arg(long, env = "UNDERPASS_BACKENDS_MAX", default_value_t = datapath_common::maps::DEFAULT_BACKENDS_MAX)]
    backends_max: u32,
    /// Frontends (ClusterIP:port:protocol) the node can program: the size
    /// of the services and reverse-NAT tables (an entry and an id each),
    /// at most 16,777,215. A new size replaces the tables; the agent writes it again under the same
    /// ids, so tracked flows keep their backends (unless it shrank below
    /// an id in use: those frontends get new ids and their flows
    /// re-balance).
    #[arg(long, env = "UNDERPASS_FRONTENDS_MAX", default_value_t = datapath_common::maps::DEFAULT_REVERSE_NAT_MAX - 1,
          value_parser = clap::value_parser!(u32).range(1..i64::from(datapath_common::maps::REV_NAT_ID_LIMIT)))]
    frontends_max: u32,
    /// UDP flows the TC path can track, in a table of their own so that a
    /// burst of UDP flows (DNS) never evicts idle TCP connections.
    #[arg(long, env = "UNDERPASS_CONNTRACK_UDP_MAX", default_value_t = datapath_common::maps::DEFAULT_CONNTRACK_UDP_FLOWS)]
    conntrack_udp_max: u32,
    /// Clients `sessionAffinity: ClientIP` remembers, over every frontend
    /// with affinity (one entry per client and frontend: a pod address on
    /// the TC path, a pod's network namespace on socket-LB). An LRU: when
    /// full, a client idle roughly the longest forgets its backend (the
    /// kernel's LRU is approximate, per CPU; its next connection is
    /// balanced afresh; nothing breaks). A new size
    /// replaces the table (clients are balanced afresh once).
    #[arg(long, env = "UNDERPASS_AFFINITY_MAX", default_value_t = datapath_common::maps::DEFAULT_AFFINITY_MAX,
          value_parser = clap::value_parser!(u32).range(1..))]
    affinity_max: u32,
    /// Packets and new flows per frontend, in /metrics
    /// (underpass_service_packets_total, underpass_service_new_flows_total)
    /// and `underpass service list`. `on` (default): a per-CPU counter
    /// pair per frontend id, 16 bytes × (--frontends-max + 1) × possible
    /// CPUs (/sys/devices/system/cpu/possible, which some VMs report far
    /// above the online count) of kernel memory (1 MiB per possible CPU at
    /// the default), read whole at each scrape, and two adds per
    /// translated packet. `off`: the table takes one entry and nothing is
    /// counted. A change replaces the table (counts start at zero).
    #[arg(long, env = "UNDERPASS_SERVICE_COUNTERS", value_enum, default_value_t = ServiceCounters::On)]
    service_counters: ServiceCounters,
    /// Which rare datapath events to log (a service without endpoints
    /// refusing a flow at `info`; a conntrack, fragment or socket-LB
    /// table refusing an entry at `warn`). Fixed when the datapath loads:
    /// events below it cost the packet path nothing.
    #[arg(long, env = "UNDERPASS_DATAPATH_LOG", value_enum, default_value_t = DatapathLog::Warn)]
    datapath_log: DatapathLog,
    /// How translated packets get their TCP/UDP checksums: `direct` (the
    /// programs' own arithmetic after reading the skb's checksum state
    /// through the kernel's BTF; Linux 6.2+, helper calls elsewhere and
    /// for CHECKSUM_COMPLETE packets) or `helpers` (always
    /// `bpf_l4_csum_replace`, ~40 ns more per translated packet; over IPv6
    /// one call more before Linux 6.16). Fixed when the datapath loads.
    #[arg(long, env = "UNDERPASS_L4_CHECKSUMS", value_enum, default_value_t = L4Checksums::Direct)]
    l4_checksums: L4Checksums,
    /// Services' IPv6 ClusterIPs (dual-stack and single-stack IPv6).
    /// `on`: the IPv6 maps are sized as their IPv4 twins and socket-LB
    /// translates native IPv6 connect()/sendmsg() to IPv6 backends
    /// (ClusterIPs, and the IPv6 external, load-balancer and node
    /// addresses as for IPv4; getpeername/recvmsg show the service;
    /// connected UDP sockets leave departed backends), and the TC path
    /// for processes socket-LB leaves to it (--socket-lb host,
    /// --socket-lb-skip-netns, --cgroup below the root, --no-socket-lb):
    /// TCP and UDP whose header
    /// follows the fixed IPv6 header (extension headers and fragments
    /// pass untranslated there, counted as ipv6_untranslated; a pod that
    /// is its IPv6 service's only backend is refused on TC; see
    /// docs/datapath.md). Sizes the IPv6 conntrack as IPv4's. `off` (default): the IPv6 maps take one
    /// entry each and IPv6 services are reported not served (a
    /// dual-stack service's IPv4 family is served either way). A change
    /// replaces the IPv6 maps and with them the frontend tables, which
    /// the agent writes again; conntrack stays, so IPv4 flows keep their
    /// backends.
    #[arg(long, env = "UNDERPASS_IPV6", value_enum, default_value_t = Ipv6::Off)]
    ipv6: Ipv6,
    /// The node's uplink: the parent device of the macvlan pods, where
    /// traffic from outside the cluster arrives. With it, the uplink
    /// program (XDP) serves this node's nodePorts, load-balancer IPs and
    /// external IPs: Maglev picks the backend (the same on every node), a
    /// pod on this uplink gets the packet by its MAC with the client's
    /// address kept (externalTrafficPolicy Local and Cluster), a backend
    /// elsewhere gets it SNATed to this node and sent back out. Without
    /// it nothing is served from outside (leave that to kube-proxy).
    /// IPv4 only for now.
    #[arg(long, env = "UNDERPASS_UPLINK", value_name = "IFACE")]
    uplink: Option<String>,
    /// The network namespace the uplink is in, when it is not the
    /// agent's own (a lab's node namespace; a DaemonSet runs in the
    /// host's, where the uplink is).
    #[arg(long, requires = "uplink", value_name = "PATH")]
    uplink_netns: Option<PathBuf>,
    /// How the uplink program runs: native (in the driver, before any skb
    /// is built), generic (every driver, slower), or auto (native where
    /// the driver has it, else generic, said in the log).
    #[arg(long, value_enum, default_value_t = XdpModeArg::Auto)]
    xdp_mode: XdpModeArg,
    /// Entries per Maglev table: a prime from 251 to 131071. Every node
    /// of the cluster must use the same size and seed, so that each picks
    /// the same backend for a flow; ≥ 100 × the most backends a service
    /// has keeps Maglev's balance within 1 %.
    #[arg(long, env = "UNDERPASS_MAGLEV_TABLE_SIZE", default_value_t = datapath_common::maglev::DEFAULT_TABLE_SIZE,
        value_parser = parse_maglev_table_size)]
    maglev_table_size: u32,
    /// Maglev tables: one per backend set served from outside (a service
    /// port's nodePort, load-balancer and external IPs share one). Each
    /// takes 4 bytes × --maglev-table-size of kernel memory (64 KiB at
    /// the default); a service beyond them is reported and not served
    /// from outside on this node.
    #[arg(long, env = "UNDERPASS_MAGLEV_TABLES", default_value_t = datapath_common::maps::DEFAULT_MAGLEV_TABLES)]
    maglev_tables: u32,
    /// The cluster's Maglev seed: any number, the same on every node.
    #[arg(long, env = "UNDERPASS_MAGLEV_SEED", default_value_t = DEFAULT_MAGLEV_SEED)]
    maglev_seed: u64,
    /// The source ports flows from outside to backends on other nodes are
    /// SNATed to, FIRST-LAST: outside the node's ephemeral range
    /// (net.ipv4.ip_local_port_range), so that no socket of the node's
    /// holds one.
    #[arg(long, env = "UNDERPASS_SNAT_PORTS", default_value = "61000-65535", value_parser = parse_port_range)]
    snat_ports: (u16, u16),
    /// The address those flows are SNATed to (default: the --node-ip the
    /// uplink holds, else the uplink's first IPv4 address).
    #[arg(long, env = "UNDERPASS_SNAT_ADDRESS", value_name = "IPV4")]
    snat_address: Option<std::net::Ipv4Addr>,
    /// With --uplink: the port of kube-proxy's node health endpoint
    /// (`/healthz`, 200 once the maps are synced), which load balancers
    /// of `Cluster` services probe on every node; 0 serves none (leave it
    /// to kube-proxy when it still runs).
    #[arg(long, env = "UNDERPASS_NODE_HEALTH_PORT", default_value_t = datapath_user::health_check::NODE_HEALTH_PORT)]
    node_health_port: u16,
}

/// The Maglev seed when none is given ("underpas"): any fixed value
/// works, as long as every node has the same.
const DEFAULT_MAGLEV_SEED: u64 = 0x7361_7072_6564_6e75;

/// `--xdp-mode`.
#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum XdpModeArg {
    Auto,
    Native,
    Generic,
}

fn parse_maglev_table_size(text: &str) -> Result<u32, String> {
    let size: u32 = text.parse().map_err(|e| format!("{text:?}: {e}"))?;
    datapath_common::maglev::check_table_size(size).map_err(|e| e.to_string())
}

/// `FIRST-LAST` → (first, count).
fn parse_port_range(text: &str) -> Result<(u16, u16), String> {
    let (first, last) = text
        .split_once('-')
        .ok_or_else(|| format!("{text:?}: expected FIRST-LAST, e.g. 61000-65535"))?;
    let port = |p: &str| {
        p.trim()
            .parse::<u16>()
            .ok()
            .filter(|&p| p != 0)
            .ok_or_else(|| format!("{p:?} is not a port (1-65535)"))
    };
    let (first, last) = (port(first)?, port(last)?);
    if last < first {
        return Err(format!("{text:?}: the last port is below the first"));
    }
    let count = u32::from(last) - u32::from(first) + 1;
    u16::try_from(count)
        .map(|count| (first, count))
        .map_err(|_| format!("{text:?}: at most 65535 ports"))
}

/// `--ipv6`.
#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Ipv6 {
    /// IPv6 ClusterIPs reported unsupported; the IPv6 maps take nothing.
    Off,
    /// IPv6 ClusterIPs served by socket-LB and the TC path.
    On,
}

/// `--service-counters`.
#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum ServiceCounters {
    /// Count per frontend.
    On,
    /// Count nothing per frontend.
    Off,
}

/// `--pod-tc`.
#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum PodTc {
    /// Every pod.
    Always,
    /// Only pods socket-LB skips, when it is attached at the cgroup2 root.
    Auto,
    /// Only pods socket-LB skips, whatever --cgroup is.
    UnlessSocketLb,
}

/// `--socket-lb`.
#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum SocketLb {
    /// Every process below --cgroup.
    All,
    /// Host processes only; pods use the TC path.
    Host,
    /// No socket-LB.
    Off,
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    if std::env::args_os().len() == 1 && std::env::var_os("CNI_COMMAND").is_some() {
        // Run by a container runtime as a CNI plugin.
        let pin_dir = std::env::var_os("UNDERPASS_PIN_DIR")
            .map_or_else(|| PathBuf::from(DEFAULT_PIN_DIR), PathBuf::from);
        std::process::exit(cni::main(&pin_dir));
    }
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Agent(args) => run_agent(*args),
        Command::Attach(args) => attach(args),
        Command::Detach(args) => detach(args),
        Command::Cni(args) => std::process::exit(cni::main(&args.pin_dir)),
        Command::InstallCni { to } => install_cni(&to),
        Command::Service {
            command: ListCommand::List(o),
        } => inspect::service_list(&o.pin.pin_dir, o.output),
        Command::Backend {
            command: ListCommand::List(o),
        } => inspect::backend_list(&o.pin.pin_dir, o.output),
        Command::Conntrack {
            command: ConntrackCommand::List { output: o, limit },
        } => inspect::conntrack_list(&o.pin.pin_dir, o.output, limit),
        Command::Status(o) => inspect::status(&o.pin.pin_dir, o.output),
        Command::Uninstall(args) => uninstall(&args.pin.pin_dir, &args.netns_dir),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run_agent(args: AgentArgs) -> Result<()> {
    if let Some(entries) = args.service_entries_max {
        tracing::warn!(
            entries,
            "--service-entries-max (UNDERPASS_SERVICE_ENTRIES_MAX) is gone and ignored: the services table holds one entry per frontend (--frontends-max), backend slots are sized by --backend-slots-max"
        );
    }
    let source = match args.from_dir {
        Some(dir) => {
            if !dir.is_dir() {
                bail!("--from-dir {}: not a directory", dir.display());
            }
            SourceConfig::Directory {
                dir,
                interval: Duration::from_millis(args.dir_poll_ms.max(10)),
            }
        }
        None => SourceConfig::Kubernetes {
            kubeconfig: args.kubeconfig,
            api_server: args.api_server,
        },
    };
    let netns_filter = glob::Pattern::new(&args.netns_filter)
        .with_context(|| format!("--netns-filter {:?}", args.netns_filter))?;
    let names = args
        .iface_name
        .as_deref()
        .map(glob::Pattern::new)
        .transpose()
        .with_context(|| format!("--iface-name {:?}", args.iface_name))?;
    let socket_lb_skip = args
        .socket_lb_skip_netns
        .as_deref()
        .map(glob::Pattern::new)
        .transpose()
        .with_context(|| format!("--socket-lb-skip-netns {:?}", args.socket_lb_skip_netns))?;
    let cgroup = if args.no_socket_lb || args.socket_lb == SocketLb::Off {
        None
    } else {
        Some(match &args.cgroup {
            Some(path) => datapath_user::cgroup::resolve(path)
                .with_context(|| format!("--cgroup {}", path.display()))?,
            None => datapath_user::cgroup::unified_root().context(
                "finding the cgroup v2 root for socket-LB (or pass --cgroup / --no-socket-lb)",
            )?,
        })
    };
    let pod_tc = pod_tc_policy(
        args.pod_tc,
        cgroup.as_deref(),
        args.socket_lb,
        socket_lb_skip.as_ref(),
    );
    pod_tc.check().map_err(anyhow::Error::msg)?;
    let ipv6 = args.ipv6 == Ipv6::On;
    let ipv6_serving = if ipv6 {
        Ipv6Serving::On
    } else {
        Ipv6Serving::Off
    };
    let options = AgentOptions {
        pin_dir: args.pin.pin_dir,
        source,
        node: NodeContext {
            node_name: args.node_name,
            zone: args.node_zone,
            addresses: args.node_ips,
            ipv6: ipv6_serving,
        },
        netns_dir: (!args.no_pod_attach).then_some(args.netns_dir),
        selector: Selector {
            netns: netns_filter,
            kinds: args.iface_kind,
            names,
        },
        netns_interval: Duration::from_millis(args.netns_poll_ms.max(10)),
        tc_mode: args.tc_mode.into(),
        cgroup,
        socket_lb_host_only: args.socket_lb == SocketLb::Host,
        socket_lb_skip,
        pod_tc,
        metrics_address: args.metrics_address,
        debounce: Duration::from_millis(args.debounce_ms),
        sizes: MapSizes {
            // One frontend entry per reverse-NAT id.
            services: args.frontends_max + 1,
            slots: args.backend_slots_max,
            backends: args.backends_max,
            // Id 0 is never used: one slot more than frontends.
            reverse_nat: args.frontends_max + 1,
            conntrack_tcp_flows: args.conntrack_max,
            conntrack_udp_flows: args.conntrack_udp_max,
            affinity_clients: args.affinity_max,
            service_counters: args.service_counters == ServiceCounters::On,
            ipv6,
            maglev_tables: if args.uplink.is_some() {
                args.maglev_tables.max(1)
            } else {
                0
            },
            maglev_table_size: args.maglev_table_size,
            ..MapSizes::default()
        },
        ct_timeouts: CtTimeouts::default(),
        datapath_log: args.datapath_log,
        l4_checksums: args.l4_checksums,
        uplink: args
            .uplink
            .map(|iface| datapath_user::uplink::UplinkOptions {
                iface,
                netns: args.uplink_netns,
                xdp_mode: match args.xdp_mode {
                    XdpModeArg::Auto => XdpAttachMode::Auto,
                    XdpModeArg::Native => XdpAttachMode::Native,
                    XdpModeArg::Generic => XdpAttachMode::Generic,
                },
                maglev_seed: args.maglev_seed,
                maglev_table_size: args.maglev_table_size,
                snat_ports: args.snat_ports,
                snat_address: args.snat_address,
                node_health_port: (args.node_health_port != 0).then_some(args.node_health_port),
            }),
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    runtime.block_on(agent::run(options))
}

/// Which pods get the TC pair once socket-LB is attached (`--pod-tc`).
fn pod_tc_policy(
    choice: PodTc,
    cgroup: Option<&std::path::Path>,
    socket_lb: SocketLb,
    skip: Option<&glob::Pattern>,
) -> PodTcPolicy {
    let Some(cgroup) = cgroup else {
        return PodTcPolicy::Every;
    };
    if socket_lb != SocketLb::All || choice == PodTc::Always {
        return PodTcPolicy::Every;
    }
    if choice == PodTc::Auto && !datapath_user::cgroup::is_root(cgroup) {
        tracing::info!(
            cgroup = %cgroup.display(),
            "--cgroup is below the cgroup2 root: which pods socket-LB covers is unknown, so every pod gets the TC pair (--pod-tc unless-socket-lb trusts --cgroup to hold them all)"
        );
        return PodTcPolicy::Every;
    }
    PodTcPolicy::SocketLbSkipped {
        skip: skip.cloned(),
    }
}

fn attach(args: AttachArgs) -> Result<()> {
    let options = LoadOptions {
        pin_dir: Some(args.pin.pin_dir.clone()),
        ..LoadOptions::default()
    };
    let mut datapath = Datapath::load(&options).context("loading the datapath")?;
    let attachment = datapath
        .attach_tc(Some(&args.netns), &args.dev, args.tc_mode.into())
        .with_context(|| format!("attaching to {} in {}", args.dev, args.netns))?;
    let pinned = attachment.is_pinned();
    attachment.keep();
    println!(
        "attached to {} in {}{}",
        args.dev,
        args.netns,
        if pinned {
            " (pinned)"
        } else {
            " (cls_bpf filter)"
        }
    );
    Ok(())
}

fn uninstall(pin_dir: &std::path::Path, netns_dir: &std::path::Path) -> Result<()> {
    let removed = datapath_user::uninstall::uninstall(pin_dir, netns_dir).with_context(|| {
        format!(
            "uninstalling the datapath pinned under {}",
            pin_dir.display()
        )
    })?;
    if removed.pin_dir {
        println!(
            "detached {} program attachments and removed {} (maps and links)",
            removed.links,
            pin_dir.display()
        );
    } else {
        println!("nothing pinned under {}", pin_dir.display());
    }
    if removed.filters > 0 {
        println!(
            "removed netlink filters from {} interface directions",
            removed.filters
        );
    }
    Ok(())
}

fn install_cni(dir: &std::path::Path) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let me = std::env::current_exe().context("finding this binary")?;
    let target = dir.join("underpass");
    // Copied beside the target and renamed over it: a runtime executing
    // the plugin meanwhile sees the old binary or the new, never half.
    let staging = dir.join(".underpass.installing");
    std::fs::copy(&me, &staging)
        .with_context(|| format!("copying {} to {}", me.display(), staging.display()))?;
    std::fs::set_permissions(&staging, std::fs::Permissions::from_mode(0o755))
        .with_context(|| format!("making {} executable", staging.display()))?;
    std::fs::rename(&staging, &target)
        .with_context(|| format!("moving {} to {}", staging.display(), target.display()))?;
    println!("installed the CNI plugin at {}", target.display());
    Ok(())
}

fn detach(args: AttachArgs) -> Result<()> {
    let removed = loader::detach_pinned_tc(&args.pin.pin_dir, Some(&args.netns), &args.dev)
        .with_context(|| format!("detaching from {} in {}", args.dev, args.netns))?;
    if removed == 0 {
        bail!(
            "nothing pinned for {} in {} under {}",
            args.dev,
            args.netns,
            args.pin.pin_dir.display()
        );
    }
    println!("detached from {} in {}", args.dev, args.netns);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_agent_allocates_with_jemalloc_as_configured() {
        let _warm_up = vec![0u8; 4096];
        assert_eq!(
            datapath_user::memory::jemalloc_option("dirty_decay_ms"),
            Some(1000),
            "JEMALLOC_CONF not read: is the `_rjem_malloc_conf` symbol exported?"
        );
        assert_eq!(
            datapath_user::memory::jemalloc_option("muzzy_decay_ms"),
            Some(0)
        );
        assert_eq!(
            datapath_user::memory::jemalloc_option("tcache_max"),
            Some(1024)
        );
    }

    /// A directory that looks like a cgroup2 directory: the root (no
    /// `cgroup.events`) or one below it.
    fn cgroup_dir(root: bool) -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("cgroup.procs"), "").unwrap();
        if !root {
            std::fs::write(dir.path().join("cgroup.events"), "populated 1\n").unwrap();
        }
        dir
    }

    #[test]
    fn only_socket_lb_at_the_root_or_trusted_leaves_pods_without_the_pair() {
        let (root, below) = (cgroup_dir(true), cgroup_dir(false));
        let skip = glob::Pattern::new("legacy-*").unwrap();
        let skipped = PodTcPolicy::SocketLbSkipped {
            skip: Some(skip.clone()),
        };
        let policy = |choice, cgroup: Option<&tempfile::TempDir>, socket_lb| {
            pod_tc_policy(choice, cgroup.map(|d| d.path()), socket_lb, Some(&skip))
        };
        // No socket-LB, or not for pods: every pod needs the pair.
        assert_eq!(policy(PodTc::Auto, None, SocketLb::All), PodTcPolicy::Every);
        assert_eq!(
            policy(PodTc::Auto, Some(&root), SocketLb::Host),
            PodTcPolicy::Every
        );
        assert_eq!(
            policy(PodTc::UnlessSocketLb, Some(&root), SocketLb::Off),
            PodTcPolicy::Every
        );
        // `always`, the default, whatever socket-LB covers.
        assert_eq!(
            policy(PodTc::Always, Some(&root), SocketLb::All),
            PodTcPolicy::Every
        );
        // `auto`: only at the cgroup2 root is every pod known covered.
        assert_eq!(policy(PodTc::Auto, Some(&root), SocketLb::All), skipped);
        assert_eq!(
            policy(PodTc::Auto, Some(&below), SocketLb::All),
            PodTcPolicy::Every
        );
        // `unless-socket-lb` trusts --cgroup.
        assert_eq!(
            policy(PodTc::UnlessSocketLb, Some(&below), SocketLb::All),
            skipped
        );
    }
}
