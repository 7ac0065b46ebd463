//! The namespace topology shared by the e2e tests, the demo and the bench:
//! two node namespaces joined by a veth "wire", a gateway that answers ARP
//! and routes between two pod subnets, and macvlan pods on each node's end
//! of the wire.
//!
//! ```text
//!   pod c (10.77.0.2)  pod a (.3)             pod b (.4)  pod r (10.78.0.5)  gw (.254 / 10.78.0.254)
//!        \             /                           \          |            /
//!       macvlan (bridge) on "wire"                 macvlan (bridge) on "wire"
//!   node1 [wire 10.77.0.101] ========= veth ========= [wire 10.77.0.102] node2
//! ```
//!
//! Every namespace is named `<prefix>-<role>`, where the prefix carries our
//! pid, so that a run removes exactly what it made: on drop (also while
//! unwinding from a failed test) and, for runs killed outright, by the
//! next run's sweep of prefixes whose process is gone.

use std::{
    fs, io,
    net::Ipv4Addr,
    os::fd::AsRawFd,
    path::{Path, PathBuf},
    sync::atomic::{AtomicU32, Ordering},
};

use futures::TryStreamExt;
use rtnetlink::{
    Handle, LinkBridge, LinkIpVlan, LinkMacVlan, LinkUnspec, LinkVeth, LinkVxlan,
    RouteMessageBuilder,
    packet_route::link::{IpVlanMode, MacVlanMode},
};

use crate::netns::{self, NETNS_RUN_DIR};

/// Errors name the namespace and the step that failed.
#[derive(Debug, thiserror::Error)]
#[error("network namespace {netns}: {step}: {reason}")]
pub struct TopologyError {
    pub netns: String,
    pub step: String,
    pub reason: String,
}

impl TopologyError {
    /// The kernel lacks what the step needs (e.g. the ipvlan driver).
    pub fn is_unsupported(&self) -> bool {
        self.reason.starts_with(IPVLAN_UNSUPPORTED)
    }
}

type Result<T> = std::result::Result<T, TopologyError>;

fn err(netns: &str, step: impl Into<String>, reason: impl ToString) -> TopologyError {
    TopologyError {
        netns: netns.to_owned(),
        step: step.into(),
        reason: reason.to_string(),
    }
}

/// Paths this process created and must remove even when interrupted:
/// namespaces and cgroups. `remove_all_live` runs from the signal handler.
static LIVE: std::sync::Mutex<Vec<PathBuf>> = std::sync::Mutex::new(Vec::new());

fn register(path: &Path) {
    LIVE.lock()
        .unwrap_or_else(|p| p.into_inner())
        .push(path.to_owned());
}

fn unregister(path: &Path) {
    LIVE.lock()
        .unwrap_or_else(|p| p.into_inner())
        .retain(|p| p != path);
}

/// Removes every namespace and cgroup this process created and still holds.
pub fn remove_all_live() {
    // Servers and agents first: they hold the namespaces, cgroups and pins.
    let children = std::mem::take(&mut *CHILDREN.lock().unwrap_or_else(|p| p.into_inner()));
    for &pid in &children {
        // SAFETY: plain syscalls on a pid this process spawned.
        unsafe { libc::kill(pid as libc::pid_t, libc::SIGKILL) };
    }
    for &pid in &children {
        // SAFETY: as above; reaps our own child.
        unsafe { libc::waitpid(pid as libc::pid_t, std::ptr::null_mut(), 0) };
    }
    let paths = std::mem::take(&mut *LIVE.lock().unwrap_or_else(|p| p.into_inner()));
    for path in paths.iter().rev() {
        if path.starts_with(NETNS_RUN_DIR) {
            let _ = unmount_and_remove(path);
        } else if path.starts_with("/sys/fs/bpf") {
            let _ = fs::remove_dir_all(path);
        } else {
            let _ = fs::remove_dir(path);
        }
    }
}

/// Child processes (servers, agents) to kill if the run is interrupted.
static CHILDREN: std::sync::Mutex<Vec<u32>> = std::sync::Mutex::new(Vec::new());

/// Kills `pid` (a child of this process) if the run is interrupted
/// ([`cleanup_on_signals`]); [`disown_child`] once it is stopped.
pub fn own_child(pid: u32) {
    CHILDREN.lock().unwrap_or_else(|p| p.into_inner()).push(pid);
}

pub fn disown_child(pid: u32) {
    CHILDREN
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .retain(|&p| p != pid);
}

/// Removes `dir` (a pin directory under /sys/fs/bpf) if the run is
/// interrupted; [`disown_pin_dir`] once removed.
pub fn own_pin_dir(dir: &Path) {
    register(dir);
}

pub fn disown_pin_dir(dir: &Path) {
    unregister(dir);
}

/// On SIGINT/SIGTERM: remove what we created, then exit (130/143). For
/// long-running commands (demo, bench); tests clean up by unwinding.
pub fn cleanup_on_signals() {
    std::thread::spawn(|| {
        let Ok(runtime) = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
        else {
            return;
        };
        runtime.block_on(async {
            use tokio::signal::unix::{SignalKind, signal};
            let (Ok(mut int), Ok(mut term)) = (
                signal(SignalKind::interrupt()),
                signal(SignalKind::terminate()),
            ) else {
                return;
            };
            let code = tokio::select! {
                _ = int.recv() => 130,
                _ = term.recv() => 143,
            };
            eprintln!("\ninterrupted: removing the namespaces and cgroups this run created");
            remove_all_live();
            std::process::exit(code);
        });
    });
}

/// A cgroup v2 directory this process created; removed on drop (it must
/// be empty by then: processes in it have exited).
#[derive(Debug)]
pub struct Cgroup {
    path: PathBuf,
}

impl Cgroup {
    /// Creates `<cgroup2 root>/<name>`.
    pub fn create(name: &str) -> io::Result<Self> {
        let path = crate::cgroup::unified_root()?.join(name);
        fs::create_dir(&path)?;
        register(&path);
        Ok(Self { path })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for Cgroup {
    fn drop(&mut self) {
        unregister(&self.path);
        // Processes that just exited may still be accounted for a moment.
        for _ in 0..50 {
            match fs::remove_dir(&self.path) {
                Err(e) if e.raw_os_error() == Some(libc::EBUSY) => {
                    std::thread::sleep(std::time::Duration::from_millis(20))
                }
                _ => return,
            }
        }
    }
}

fn unmount_and_remove(path: &Path) -> io::Result<()> {
    let target =
        std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).map_err(io::Error::other)?;
    // SAFETY: umount2 with a NUL-terminated path.
    unsafe { libc::umount2(target.as_ptr(), libc::MNT_DETACH) };
    fs::remove_file(path)
}

/// A named network namespace this process created; deleted on drop.
#[derive(Debug)]
pub struct Namespace {
    name: String,
    path: PathBuf,
}

impl Namespace {
    /// Creates `/var/run/netns/NAME` (as `ip netns add` does, without
    /// forking): a thread unshares its network namespace and bind-mounts it
    /// there, so the namespace outlives the thread.
    pub fn create(name: &str) -> Result<Self> {
        let dir = Path::new(NETNS_RUN_DIR);
        fs::create_dir_all(dir).map_err(|e| err(name, "create /var/run/netns", e))?;
        let path = dir.join(name);
        fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&path)
            .map_err(|e| err(name, "create the mount point", e))?;
        register(&path);
        let namespace = Self {
            name: name.to_owned(),
            path: path.clone(),
        };
        std::thread::scope(|scope| {
            scope
                .spawn(|| -> io::Result<()> {
                    // SAFETY: unshare affects only this thread.
                    if unsafe { libc::unshare(libc::CLONE_NEWNET) } != 0 {
                        return Err(io::Error::last_os_error());
                    }
                    let source = c"/proc/thread-self/ns/net";
                    let target = std::ffi::CString::new(path.as_os_str().as_encoded_bytes())
                        .map_err(io::Error::other)?;
                    // SAFETY: bind mount with NUL-terminated paths.
                    if unsafe {
                        libc::mount(
                            source.as_ptr(),
                            target.as_ptr(),
                            std::ptr::null(),
                            libc::MS_BIND,
                            std::ptr::null(),
                        )
                    } != 0
                    {
                        return Err(io::Error::last_os_error());
                    }
                    Ok(())
                })
                .join()
                .unwrap_or_else(|p| std::panic::resume_unwind(p))
        })
        .map_err(|e| err(name, "unshare and bind-mount", e))?;
        namespace.netlink("bring lo up", |handle| async move {
            set_up(&handle, "lo").await
        })?;
        Ok(namespace)
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Runs `work` on a thread inside this namespace.
    pub fn run<T: Send>(&self, work: impl FnOnce() -> T + Send) -> Result<T> {
        netns::run_in(Some(&self.path), work).map_err(|e| err(&self.name, "setns", e))
    }

    /// Runs netlink requests inside this namespace.
    pub fn netlink<T, F, Fut>(&self, step: &str, work: F) -> Result<T>
    where
        T: Send,
        F: FnOnce(Handle) -> Fut + Send,
        Fut: Future<Output = std::result::Result<T, String>>,
    {
        self.run(|| {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map_err(|e| e.to_string())?;
            runtime.block_on(async {
                let (connection, handle, _) =
                    rtnetlink::new_connection().map_err(|e| e.to_string())?;
                tokio::spawn(connection);
                work(handle).await
            })
        })?
        .map_err(|reason| err(&self.name, step, reason))
    }

    /// Writes a sysctl of this namespace (`net.ipv4.ip_forward` → 1).
    pub fn sysctl(&self, key: &str, value: &str) -> Result<()> {
        let path = PathBuf::from("/proc/sys").join(key.replace('.', "/"));
        self.run(|| fs::write(&path, value))?
            .map_err(|e| err(&self.name, format!("sysctl {key}={value}"), e))
    }

    /// Turns off transmit checksum offload on `iface`, so that checksums
    /// are computed in software on the way out and a wrong one is caught
    /// by the receiver instead of being hidden by offload.
    pub fn disable_tx_checksum(&self, iface: &str) -> Result<()> {
        self.run(|| ethtool_set_tx_csum(iface, false))?
            .map_err(|e| err(&self.name, format!("ethtool -K {iface} tx off"), e))
    }

    fn delete(&self) -> io::Result<()> {
        unregister(&self.path);
        unmount_and_remove(&self.path)
    }
}

impl Drop for Namespace {
    fn drop(&mut self) {
        if let Err(e) = self.delete() {
            eprintln!("removing network namespace {}: {e}", self.name);
        }
    }
}

/// A prefix unique to this process and call: `up<pid>x<n>`.
pub fn unique_prefix() -> String {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    format!(
        "up{}x{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    )
}

/// The pid in a name this module gave (`up<pid>x<n>-…`), if it is one.
fn owner_pid(name: &str) -> Option<u32> {
    name.strip_prefix("up")?.split('x').next()?.parse().ok()
}

/// Removes namespaces and cgroups named `up<pid>x…` whose process no
/// longer exists: what an earlier run killed by a signal left behind.
/// Those of live processes and anything not named by us are left alone.
pub fn sweep_stale() -> usize {
    let dead = |name: &str| {
        owner_pid(name).is_some_and(|pid| !Path::new(&format!("/proc/{pid}")).exists())
    };
    let mut removed = 0;
    for entry in fs::read_dir(NETNS_RUN_DIR).into_iter().flatten().flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if dead(&name) {
            drop(Namespace {
                name,
                path: entry.path(),
            });
            removed += 1;
        }
    }
    let cgroups = crate::cgroup::unified_root().and_then(fs::read_dir);
    for entry in cgroups.into_iter().flatten().flatten() {
        if dead(&entry.file_name().to_string_lossy()) && fs::remove_dir(entry.path()).is_ok() {
            removed += 1;
        }
    }
    removed
}

/// A pod: a namespace whose `eth0` is a macvlan on its node's wire.
#[derive(Debug)]
pub struct Pod {
    pub role: String,
    pub namespace: Namespace,
    pub node: usize,
    pub address: Ipv4Addr,
    pub gateway: Ipv4Addr,
    pub mac: [u8; 6],
}

impl Pod {
    pub const IFACE: &'static str = "eth0";
}

/// What to build.
#[derive(Clone, Debug)]
pub struct PodSpec {
    pub role: &'static str,
    /// 0 = node1, 1 = node2.
    pub node: usize,
    pub address: Ipv4Addr,
}

/// The standard e2e/demo layout: a client and a same-subnet server on
/// node1, a same-subnet server and a routed (other subnet) server on node2.
pub fn standard_pods() -> Vec<PodSpec> {
    vec![
        PodSpec {
            role: "client",
            node: 0,
            address: Ipv4Addr::new(10, 77, 0, 2),
        },
        PodSpec {
            role: "server-a",
            node: 0,
            address: Ipv4Addr::new(10, 77, 0, 3),
        },
        PodSpec {
            role: "server-b",
            node: 1,
            address: Ipv4Addr::new(10, 77, 0, 4),
        },
        PodSpec {
            role: "server-c",
            node: 1,
            address: Ipv4Addr::new(10, 78, 0, 5),
        },
    ]
}

/// The pod subnets and their gateway addresses (on the gateway namespace).
pub const SUBNETS: [(Ipv4Addr, Ipv4Addr); 2] = [
    (Ipv4Addr::new(10, 77, 0, 0), Ipv4Addr::new(10, 77, 0, 254)),
    (Ipv4Addr::new(10, 78, 0, 0), Ipv4Addr::new(10, 78, 0, 254)),
];
pub const NODE_ADDRESSES: [Ipv4Addr; 2] =
    [Ipv4Addr::new(10, 77, 0, 101), Ipv4Addr::new(10, 77, 0, 102)];
/// The pod's side of the coordinator veth (Spiderpool's name).
pub const COORDINATOR_IFACE: &str = "veth0";
/// The node's address on every coordinator veth (link-local, as
/// Spiderpool and Calico use one such address per node).
pub const COORDINATOR_GATEWAY: Ipv4Addr = Ipv4Addr::new(169, 254, 1, 1);
/// The wire's interface name in both node namespaces.
pub const WIRE: &str = "wire";

/// The built topology. Dropping it deletes every namespace it made.
#[derive(Debug)]
pub struct Topology {
    pub prefix: String,
    pub pods: Vec<Pod>,
    pub gateway: Namespace,
    pub nodes: [Namespace; 2],
    /// A router joined to each node by its own link (a cloud VPC's route
    /// table), made by the first pod routed through it.
    pub router: Option<Namespace>,
    /// Whether the VXLAN overlay (bridges, tunnel) exists.
    overlay: bool,
    /// Whether the ipvlan pods' wire exists.
    ipvlan_wire: bool,
}

impl Topology {
    /// Builds the two-node topology with `pods`.
    pub fn build(pods: &[PodSpec]) -> Result<Self> {
        sweep_stale();
        let prefix = unique_prefix();
        let node1 = Namespace::create(&format!("{prefix}-node1"))?;
        let node2 = Namespace::create(&format!("{prefix}-node2"))?;
        let gateway = Namespace::create(&format!("{prefix}-gw"))?;

        // The wire: a veth pair, one end per node.
        join_nodes(&node1, &node2, WIRE)?;
        for (node, address) in [(&node1, NODE_ADDRESSES[0]), (&node2, NODE_ADDRESSES[1])] {
            node.netlink("address the wire", |h| async move {
                let wire = index_of(&h, WIRE).await?;
                h.address()
                    .add(wire, address.into(), 24)
                    .execute()
                    .await
                    .map_err(|e| e.to_string())?;
                set_up(&h, WIRE).await
            })?;
        }

        // The gateway: a macvlan on node2's wire holding both subnets'
        // gateway addresses, forwarding between them.
        let gateway_mac = [0x02, 0x77, 0xfe, 0, 0, 0xfe];
        add_wire_child(&node2, &gateway, "mvgw", WireChild::Macvlan(gateway_mac))?;
        gateway.netlink("address the gateway", |h| async move {
            let eth0 = index_of(&h, Pod::IFACE).await?;
            for (_, gw) in SUBNETS {
                h.address()
                    .add(eth0, gw.into(), 24)
                    .execute()
                    .await
                    .map_err(|e| e.to_string())?;
            }
            set_up(&h, Pod::IFACE).await
        })?;
        gateway.sysctl("net.ipv4.ip_forward", "1")?;
        // Same-interface forwarding between subnets would otherwise make it
        // send redirects, which the pods would learn from.
        gateway.sysctl("net.ipv4.conf.all.send_redirects", "0")?;
        gateway.sysctl("net.ipv4.conf.eth0.send_redirects", "0")?;

        let mut topology = Self {
            prefix,
            pods: Vec::new(),
            gateway,
            nodes: [node1, node2],
            router: None,
            overlay: false,
            ipvlan_wire: false,
        };
        for spec in pods {
            topology.add_pod(spec)?;
        }
        Ok(topology)
    }

    /// Adds a macvlan pod on its node (also after the topology is built:
    /// a pod appearing while an agent watches).
    pub fn add_pod(&mut self, spec: &PodSpec) -> Result<&Pod> {
        let octets = spec.address.octets();
        let mac = [
            0x02,
            0x77,
            octets[1],
            octets[2],
            octets[3],
            self.pods.len() as u8,
        ];
        self.add_wire_pod(spec, WireChild::Macvlan(mac))
    }

    /// Adds an ipvlan (L2 mode) pod on its node's wire: like a macvlan pod
    /// but sharing the wire's MAC address. Fails with
    /// [`TopologyError::is_unsupported`] when the kernel has no IPVLAN.
    pub fn add_ipvlan_pod(&mut self, spec: &PodSpec) -> Result<&Pod> {
        if !self.ipvlan_wire {
            join_nodes(&self.nodes[0], &self.nodes[1], IPVLAN_WIRE)?;
            self.ipvlan_wire = true;
        }
        self.add_wire_pod(spec, WireChild::Ipvlan)
    }

    /// A pod whose eth0 is a child of its node's wire: its address in the
    /// subnet's /24, its default route the subnet's gateway.
    fn add_wire_pod(&mut self, spec: &PodSpec, child: WireChild) -> Result<&Pod> {
        let i = self.pods.len();
        let namespace = Namespace::create(&format!("{}-{}", self.prefix, spec.role))?;
        add_wire_child(&self.nodes[spec.node], &namespace, &format!("wc{i}"), child)?;
        let gateway_address = subnet_gateway(spec.address);
        let address = spec.address;
        namespace.netlink("address the pod", |h| async move {
            let eth0 = index_of(&h, Pod::IFACE).await?;
            h.address()
                .add(eth0, address.into(), 24)
                .execute()
                .await
                .map_err(|e| e.to_string())?;
            set_up(&h, Pod::IFACE).await?;
            let route = RouteMessageBuilder::<Ipv4Addr>::new()
                .gateway(gateway_address)
                .build();
            h.route()
                .add(route)
                .execute()
                .await
                .map_err(|e| e.to_string())
        })?;
        self.pods.push(Pod {
            role: spec.role.to_owned(),
            namespace,
            node: spec.node,
            address,
            gateway: gateway_address,
            mac: match child {
                WireChild::Macvlan(mac) => mac,
                WireChild::Ipvlan => [0; 6],
            },
        });
        Ok(self.pods.last().expect("just pushed"))
    }

    /// A pod wired as Calico (no tunnel) or Cilium wire theirs: its only
    /// interface is a veth to its node, its address a /32, its default
    /// route the node's link-local address; the nodes route each other's
    /// pods over the wire (flannel's host-gw).
    pub fn add_veth_pod(&mut self, spec: &PodSpec) -> Result<()> {
        self.add_routed_veth_pod(spec, false)
    }

    /// A veth pod as [`Topology::add_veth_pod`], but the other node routes
    /// to it through the gateway namespace, standing for a cloud VPC's
    /// route table (flannel's aws-vpc): node → router → node.
    pub fn add_veth_pod_via_router(&mut self, spec: &PodSpec) -> Result<()> {
        self.add_routed_veth_pod(spec, true)
    }

    fn add_routed_veth_pod(&mut self, spec: &PodSpec, via_router: bool) -> Result<()> {
        let index = self.pods.len();
        let namespace = Namespace::create(&format!("{}-{}", self.prefix, spec.role))?;
        wire_veth_to_node(
            &self.nodes[spec.node],
            &namespace,
            &format!("vp{index}"),
            Pod::IFACE,
            spec.address,
            true,
        )?;
        let other = 1 - spec.node;
        let hops = if via_router {
            self.ensure_router()?;
            let router = self.router.as_ref().expect("ensured");
            vec![
                (&self.nodes[other], router_link_address(other, true)),
                (router, router_link_address(spec.node, false)),
            ]
        } else {
            vec![(&self.nodes[other], NODE_ADDRESSES[spec.node])]
        };
        for (namespace, via) in hops {
            let address = spec.address;
            namespace.netlink("route to the pod", |h| async move {
                let route = RouteMessageBuilder::<Ipv4Addr>::new()
                    .destination_prefix(address, 32)
                    .gateway(via)
                    .build();
                h.route()
                    .add(route)
                    .execute()
                    .await
                    .map_err(|e| e.to_string())
            })?;
            namespace.sysctl("net.ipv4.ip_forward", "1")?;
        }
        self.pods.push(Pod {
            role: spec.role.to_owned(),
            namespace,
            node: spec.node,
            address: spec.address,
            gateway: COORDINATOR_GATEWAY,
            mac: [0; 6],
        });
        Ok(())
    }

    /// A pod on a flannel-vxlan style overlay: a veth into its node's
    /// bridge `cni0` (10.244.<node+1>.1/24), the nodes joined by a VXLAN
    /// device `flannel.1` (VNI 1, UDP 8472, over the wire) that carries
    /// each node's pod subnet; `spec.address` must lie in 10.244.<node+1>.0/24.
    pub fn add_overlay_pod(&mut self, spec: &PodSpec) -> Result<()> {
        self.ensure_overlay()?;
        let index = self.pods.len();
        let namespace = Namespace::create(&format!("{}-{}", self.prefix, spec.role))?;
        let node = &self.nodes[spec.node];
        let (host, temp) = (format!("vx{index}"), format!("vx{index}p"));
        veth_across(node, &namespace, &host, &temp, Some(OVERLAY_MTU))?;
        let h1 = host.clone();
        node.netlink("plug the pod into cni0", |h| async move {
            let bridge = index_of(&h, OVERLAY_BRIDGE).await?;
            let own = index_of(&h, &h1).await?;
            h.link()
                .set(
                    LinkUnspec::new_with_index(own)
                        .controller(bridge)
                        .up()
                        .build(),
                )
                .execute()
                .await
                .map_err(|e| e.to_string())
        })?;
        node.disable_tx_checksum(&host)?;
        let (address, gateway) = (spec.address, overlay_gateway(spec.node));
        namespace.netlink("address the overlay pod", |h| async move {
            let index = index_of(&h, &temp).await?;
            h.link()
                .set(
                    LinkUnspec::new_with_index(index)
                        .name(Pod::IFACE.to_owned())
                        .mtu(OVERLAY_MTU)
                        .up()
                        .build(),
                )
                .execute()
                .await
                .map_err(|e| e.to_string())?;
            h.address()
                .add(index, address.into(), 24)
                .execute()
                .await
                .map_err(|e| e.to_string())?;
            let default = RouteMessageBuilder::<Ipv4Addr>::new()
                .gateway(gateway)
                .build();
            h.route()
                .add(default)
                .execute()
                .await
                .map_err(|e| e.to_string())
        })?;
        namespace.disable_tx_checksum(Pod::IFACE)?;
        self.pods.push(Pod {
            role: spec.role.to_owned(),
            namespace,
            node: spec.node,
            address: spec.address,
            gateway,
            mac: [0; 6],
        });
        Ok(())
    }

    /// The overlay's bridges and VXLAN devices, made on first use.
    fn ensure_overlay(&mut self) -> Result<()> {
        if self.overlay {
            return Ok(());
        }
        for n in 0..2 {
            let node = &self.nodes[n];
            let (local, remote) = (NODE_ADDRESSES[n], NODE_ADDRESSES[1 - n]);
            let (bridge_address, vtep, remote_vtep) =
                (overlay_gateway(n), overlay_vtep(n), overlay_vtep(1 - n));
            node.netlink("build the overlay", |h| async move {
                h.link()
                    .add(LinkBridge::new(OVERLAY_BRIDGE).build())
                    .execute()
                    .await
                    .map_err(|e| e.to_string())?;
                let bridge = index_of(&h, OVERLAY_BRIDGE).await?;
                h.address()
                    .add(bridge, bridge_address.into(), 24)
                    .execute()
                    .await
                    .map_err(|e| e.to_string())?;
                let wire = index_of(&h, WIRE).await?;
                // Unicast to the one peer node: ARP for the peer's VTEP
                // address crosses the tunnel, as flannel's static
                // neighbour and FDB entries would arrange.
                h.link()
                    .add(
                        LinkVxlan::new(OVERLAY_VXLAN, 1)
                            .dev(wire)
                            .local(local)
                            .remote(remote)
                            .port(8472)
                            .learning(false)
                            .up()
                            .build(),
                    )
                    .execute()
                    .await
                    .map_err(|e| e.to_string())?;
                let vxlan = index_of(&h, OVERLAY_VXLAN).await?;
                h.address()
                    .add(vxlan, vtep.into(), 32)
                    .execute()
                    .await
                    .map_err(|e| e.to_string())?;
                let route = RouteMessageBuilder::<Ipv4Addr>::new()
                    .destination_prefix(overlay_subnet(1 - n), 24)
                    .gateway(remote_vtep)
                    .output_interface(vxlan)
                    .onlink()
                    .build();
                h.route()
                    .add(route)
                    .execute()
                    .await
                    .map_err(|e| e.to_string())
            })?;
            node.sysctl("net.ipv4.ip_forward", "1")?;
        }
        self.overlay = true;
        Ok(())
    }

    /// The router namespace, made on first use: a veth `vpc` from each
    /// node to it (node `n` at 10.81.n.2/24, the router at 10.81.n.1).
    fn ensure_router(&mut self) -> Result<()> {
        if self.router.is_none() {
            let router = Namespace::create(&format!("{}-router", self.prefix))?;
            for n in 0..2 {
                let node = &self.nodes[n];
                let (router_side, temp) = (format!("vpc{n}"), format!("vpc{n}p"));
                veth_across(&router, node, &router_side, &temp, None)?;
                let local = router_link_address(n, true);
                let a = router_side.clone();
                router.netlink("address the router's link to a node", |h| async move {
                    let own = index_of(&h, &a).await?;
                    h.address()
                        .add(own, local.into(), 24)
                        .execute()
                        .await
                        .map_err(|e| e.to_string())?;
                    set_up(&h, &a).await
                })?;
                let remote = router_link_address(n, false);
                node.netlink("address the node's router link", |h| async move {
                    let index = index_of(&h, &temp).await?;
                    h.link()
                        .set(
                            LinkUnspec::new_with_index(index)
                                .name("vpc".to_owned())
                                .up()
                                .build(),
                        )
                        .execute()
                        .await
                        .map_err(|e| e.to_string())?;
                    h.address()
                        .add(index, remote.into(), 24)
                        .execute()
                        .await
                        .map_err(|e| e.to_string())
                })?;
                node.disable_tx_checksum("vpc")?;
                router.disable_tx_checksum(&router_side)?;
            }
            router.sysctl("net.ipv4.ip_forward", "1")?;
            self.router = Some(router);
        }
        Ok(())
    }

    /// Spiderpool's coordinator path for `role`: a veth from the pod
    /// (`veth0`) to its node, the node answering on the link-local
    /// [`COORDINATOR_GATEWAY`], a host route back to the pod, forwarding
    /// on. Which destinations use it is the caller's choice
    /// ([`Topology::route_via_node`]): with kube-proxy, the service CIDR.
    pub fn add_coordinator_veth(&self, role: &str) -> Result<()> {
        let index = self
            .pods
            .iter()
            .position(|p| p.role == role)
            .unwrap_or_else(|| panic!("no pod {role} in this topology"));
        let pod = &self.pods[index];
        wire_veth_to_node(
            &self.nodes[pod.node],
            &pod.namespace,
            &format!("veth-{index}"),
            COORDINATOR_IFACE,
            pod.address,
            false,
        )
    }

    /// Routes `prefix` from pod `role` through its coordinator veth (to
    /// the node), or, with `via_node` false, removes that route (back to
    /// the pod's own interface and gateway).
    pub fn route_via_node(&self, role: &str, prefix: (Ipv4Addr, u8), via_node: bool) -> Result<()> {
        let pod = self.pod(role);
        pod.namespace
            .netlink("route through the node", |h| async move {
                let index = index_of(&h, COORDINATOR_IFACE).await?;
                let route = RouteMessageBuilder::<Ipv4Addr>::new()
                    .destination_prefix(prefix.0, prefix.1)
                    .gateway(COORDINATOR_GATEWAY)
                    .output_interface(index)
                    .build();
                if via_node {
                    h.route()
                        .add(route)
                        .replace()
                        .execute()
                        .await
                        .map_err(|e| e.to_string())
                } else {
                    match h.route().del(route).execute().await {
                        Ok(()) => Ok(()),
                        // Not there: nothing to remove.
                        Err(rtnetlink::Error::NetlinkError(e)) if e.raw_code() == -libc::ESRCH => {
                            Ok(())
                        }
                        Err(e) => Err(e.to_string()),
                    }
                }
            })
    }

    pub fn pod(&self, role: &str) -> &Pod {
        self.pods
            .iter()
            .find(|p| p.role == role)
            .unwrap_or_else(|| panic!("no pod {role} in this topology"))
    }
}

/// The overlay's bridge and VXLAN device names (flannel's).
const OVERLAY_BRIDGE: &str = "cni0";
const OVERLAY_VXLAN: &str = "flannel.1";
/// The wire's 1500 minus VXLAN's 50 bytes of headers.
const OVERLAY_MTU: u32 = 1450;

/// Node `n`'s overlay pod subnet (/24).
pub fn overlay_subnet(n: usize) -> Ipv4Addr {
    Ipv4Addr::new(10, 244, n as u8 + 1, 0)
}

/// Node `n`'s bridge address, its overlay pods' gateway.
fn overlay_gateway(n: usize) -> Ipv4Addr {
    Ipv4Addr::new(10, 244, n as u8 + 1, 1)
}

/// Node `n`'s VXLAN device address (flannel gives it the subnet's .0).
fn overlay_vtep(n: usize) -> Ipv4Addr {
    overlay_subnet(n)
}

/// Node `n`'s link to the router: the router's end (`router_end`) or the
/// node's.
fn router_link_address(n: usize, router_end: bool) -> Ipv4Addr {
    Ipv4Addr::new(10, 81, n as u8, if router_end { 1 } else { 2 })
}

/// The gateway of the subnet `address` belongs to.
pub fn subnet_gateway(address: Ipv4Addr) -> Ipv4Addr {
    SUBNETS
        .iter()
        .find(|(net, _)| net.octets()[..3] == address.octets()[..3])
        .map(|(_, gw)| *gw)
        .unwrap_or(SUBNETS[0].1)
}

/// A veth pair: `local` in `from`, its peer moved into `to` under the
/// name `peer` (each caller names, addresses and raises its ends).
fn veth_across(
    from: &Namespace,
    to: &Namespace,
    local: &str,
    peer: &str,
    mtu: Option<u32>,
) -> Result<()> {
    let to_fd = fs::File::open(to.path()).map_err(|e| err(to.name(), "open", e))?;
    let to_raw = to_fd.as_raw_fd();
    let (a, b) = (local.to_owned(), peer.to_owned());
    from.netlink("create a veth pair", |h| async move {
        let mut pair = LinkVeth::new(&a, &b);
        if let Some(mtu) = mtu {
            pair = pair.mtu(mtu);
        }
        h.link()
            .add(pair.build())
            .execute()
            .await
            .map_err(|e| e.to_string())?;
        let index = index_of(&h, &b).await?;
        h.link()
            .set(
                LinkUnspec::new_with_index(index)
                    .setns_by_fd(to_raw)
                    .build(),
            )
            .execute()
            .await
            .map_err(|e| e.to_string())
    })
}

/// A veth pair named `name` in both nodes, up, no addresses, tx checksum
/// offload off.
fn join_nodes(node1: &Namespace, node2: &Namespace, name: &str) -> Result<()> {
    let peer_name = format!("{name}peer");
    veth_across(node1, node2, name, &peer_name, None)?;
    let a = name.to_owned();
    node1.netlink("raise the wire", |h| async move { set_up(&h, &a).await })?;
    let (a, b) = (name.to_owned(), peer_name);
    node2.netlink("name the wire", |h| async move {
        let peer = index_of(&h, &b).await?;
        h.link()
            .set(LinkUnspec::new_with_index(peer).name(a).up().build())
            .execute()
            .await
            .map_err(|e| e.to_string())
    })?;
    for node in [node1, node2] {
        node.disable_tx_checksum(name)?;
    }
    Ok(())
}

/// The second wire, for ipvlan pods: a device takes macvlan or ipvlan
/// children, not both (the kernel answers EBUSY).
pub const IPVLAN_WIRE: &str = "ivwire";

/// The kinds of interface a pod can have on its node's wire.
#[derive(Clone, Copy, Debug)]
enum WireChild {
    /// Bridge mode, with this MAC address.
    Macvlan([u8; 6]),
    /// L2 mode (the wire's MAC address).
    Ipvlan,
}

const IPVLAN_STEP: &str = "create an ipvlan";
/// What a kernel without the ipvlan driver is told to need.
pub const IPVLAN_UNSUPPORTED: &str =
    "this kernel has no ipvlan driver (build it with CONFIG_IPVLAN=m or =y)";

/// Creates a `child` of `node`'s wire, moves it into `into` and names it
/// eth0 there.
fn add_wire_child(
    node: &Namespace,
    into: &Namespace,
    temp_name: &str,
    child: WireChild,
) -> Result<()> {
    let target = fs::File::open(into.path()).map_err(|e| err(into.name(), "open", e))?;
    let target_fd = target.as_raw_fd();
    let temp = temp_name.to_owned();
    let step = match child {
        WireChild::Macvlan(_) => "create a macvlan",
        WireChild::Ipvlan => IPVLAN_STEP,
    };
    node.netlink(step, |h| async move {
        let parent = match child {
            WireChild::Macvlan(_) => WIRE,
            WireChild::Ipvlan => IPVLAN_WIRE,
        };
        let wire = index_of(&h, parent).await?;
        let link = match child {
            WireChild::Macvlan(mac) => LinkMacVlan::new(&temp, wire, MacVlanMode::Bridge)
                .address(mac.to_vec())
                .build(),
            WireChild::Ipvlan => LinkIpVlan::new(&temp, wire, IpVlanMode::L2).build(),
        };
        h.link().add(link).execute().await.map_err(|e| match e {
            rtnetlink::Error::NetlinkError(m)
                if matches!(child, WireChild::Ipvlan)
                    && (m.raw_code() == -libc::EOPNOTSUPP || m.raw_code() == -libc::ENOENT) =>
            {
                format!("{IPVLAN_UNSUPPORTED}: {m}")
            }
            e => e.to_string(),
        })?;
        let index = index_of(&h, &temp).await?;
        h.link()
            .set(
                LinkUnspec::new_with_index(index)
                    .setns_by_fd(target_fd)
                    .build(),
            )
            .execute()
            .await
            .map_err(|e| e.to_string())
    })?;
    drop(target);
    let temp = temp_name.to_owned();
    into.netlink("rename the pod's interface to eth0", |h| async move {
        let index = index_of(&h, &temp).await?;
        h.link()
            .set(
                LinkUnspec::new_with_index(index)
                    .name(Pod::IFACE.to_owned())
                    .build(),
            )
            .execute()
            .await
            .map_err(|e| e.to_string())
    })
}

/// A veth from `pod` (named `pod_iface` there) to `node` (`host_side`):
/// the node answers on [`COORDINATOR_GATEWAY`], routes `address`/32 back
/// into the veth and forwards; the pod reaches the gateway on the link.
/// With `own_address`, the veth is the pod's interface: it carries the
/// pod's /32 and the default route.
fn wire_veth_to_node(
    node: &Namespace,
    pod: &Namespace,
    host_side: &str,
    pod_iface: &str,
    address: Ipv4Addr,
    own_address: bool,
) -> Result<()> {
    let temp = format!("{host_side}p");
    veth_across(node, pod, host_side, &temp, None)?;
    let host = host_side.to_owned();
    node.netlink("address the node's end of the pod's veth", |h| async move {
        let host_index = index_of(&h, &host).await?;
        h.address()
            .add(host_index, COORDINATOR_GATEWAY.into(), 32)
            .execute()
            .await
            .map_err(|e| e.to_string())?;
        set_up(&h, &host).await?;
        // The host route back to the pod.
        let route = RouteMessageBuilder::<Ipv4Addr>::new()
            .destination_prefix(address, 32)
            .output_interface(host_index)
            .build();
        h.route()
            .add(route)
            .execute()
            .await
            .map_err(|e| e.to_string())
    })?;
    node.sysctl("net.ipv4.ip_forward", "1")?;
    node.disable_tx_checksum(host_side)?;
    let name = pod_iface.to_owned();
    pod.netlink("set up the pod's veth", |h| async move {
        let index = index_of(&h, &temp).await?;
        h.link()
            .set(LinkUnspec::new_with_index(index).name(name).up().build())
            .execute()
            .await
            .map_err(|e| e.to_string())?;
        if own_address {
            h.address()
                .add(index, address.into(), 32)
                .execute()
                .await
                .map_err(|e| e.to_string())?;
        }
        let link = RouteMessageBuilder::<Ipv4Addr>::new()
            .destination_prefix(COORDINATOR_GATEWAY, 32)
            .output_interface(index)
            .scope(rtnetlink::packet_route::route::RouteScope::Link)
            .build();
        h.route()
            .add(link)
            .execute()
            .await
            .map_err(|e| e.to_string())?;
        if own_address {
            let default = RouteMessageBuilder::<Ipv4Addr>::new()
                .gateway(COORDINATOR_GATEWAY)
                .build();
            h.route()
                .add(default)
                .execute()
                .await
                .map_err(|e| e.to_string())?;
        }
        Ok(())
    })?;
    pod.disable_tx_checksum(pod_iface)
}

async fn link_by_name(
    handle: &Handle,
    name: &str,
) -> std::result::Result<rtnetlink::packet_route::link::LinkMessage, String> {
    handle
        .link()
        .get()
        .match_name(name.to_owned())
        .execute()
        .try_next()
        .await
        .map_err(|e| format!("interface {name}: {e}"))?
        .ok_or_else(|| format!("no interface {name}"))
}

async fn index_of(handle: &Handle, name: &str) -> std::result::Result<u32, String> {
    Ok(link_by_name(handle, name).await?.header.index)
}

async fn set_up(handle: &Handle, name: &str) -> std::result::Result<(), String> {
    let index = index_of(handle, name).await?;
    handle
        .link()
        .set(LinkUnspec::new_with_index(index).up().build())
        .execute()
        .await
        .map_err(|e| e.to_string())
}

/// `ethtool -K IFACE tx on|off` through the SIOCETHTOOL ioctl (ethtool(8)
/// need not be installed), in the calling thread's namespace.
fn ethtool_set_tx_csum(iface: &str, enabled: bool) -> io::Result<()> {
    // `Ioctl` is c_ulong on glibc and c_int on musl (the static image).
    const SIOCETHTOOL: libc::Ioctl = 0x8946;
    const ETHTOOL_STXCSUM: u32 = 0x17;
    #[repr(C)]
    struct EthtoolValue {
        cmd: u32,
        data: u32,
    }
    #[repr(C)]
    struct IfReq {
        name: [u8; libc::IFNAMSIZ],
        data: *mut EthtoolValue,
        _pad: [u8; 16],
    }
    if iface.len() >= libc::IFNAMSIZ {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "interface name too long",
        ));
    }
    let mut value = EthtoolValue {
        cmd: ETHTOOL_STXCSUM,
        data: u32::from(enabled),
    };
    let mut request = IfReq {
        name: [0; libc::IFNAMSIZ],
        data: &mut value,
        _pad: [0; 16],
    };
    request.name[..iface.len()].copy_from_slice(iface.as_bytes());
    // SAFETY: a datagram socket used only for the ioctl, closed below.
    let sock = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if sock < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: SIOCETHTOOL with a valid ifreq pointing at a valid command.
    let rc = unsafe { libc::ioctl(sock, SIOCETHTOOL, &mut request) };
    let result = if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    };
    // SAFETY: closing the socket we opened.
    unsafe { libc::close(sock) };
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_our_names_have_an_owner() {
        assert_eq!(owner_pid("up4242x0-node1"), Some(4242));
        assert_eq!(owner_pid("up4242x17-demo"), Some(4242));
        assert_eq!(owner_pid("upstream"), None);
        assert_eq!(owner_pid("cni-1234"), None);
        assert_eq!(owner_pid("up"), None);
    }

    #[test]
    fn pods_route_via_their_own_subnet_gateway() {
        assert_eq!(
            subnet_gateway(Ipv4Addr::new(10, 78, 0, 5)),
            Ipv4Addr::new(10, 78, 0, 254)
        );
        assert_eq!(
            subnet_gateway(Ipv4Addr::new(10, 77, 0, 2)),
            Ipv4Addr::new(10, 77, 0, 254)
        );
    }
}
