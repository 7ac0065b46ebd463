//! End to end in network namespaces this suite creates: two node
//! namespaces joined by a veth wire (tx checksum offload off), a gateway,
//! a macvlan client pod and three macvlan server pods (same subnet on both
//! nodes, and a routed one in another subnet). Real sockets cross the
//! ClusterIP on the TC path and on the socket-LB path.
//!
//! Every namespace is removed when its `Topology` drops, which also
//! happens while a failing test unwinds.

mod common;

use std::{
    collections::{BTreeMap, BTreeSet},
    net::{Ipv4Addr, SocketAddr, SocketAddrV4},
    path::PathBuf,
    time::{Duration, Instant},
};

use common::{VIP, require_root, tcp_frontend, udp_frontend};
use datapath_common::metrics::Counter;
use datapath_user::{
    Datapath, LoadOptions, TcMode,
    loader::detach_pinned_tc,
    maps::LbMaps,
    model::{BackendEntry, Frontend, Protocol},
};
use lab::{
    Cgroup, Topology, standard_pods,
    workload::{self, Answer, ProbeKind, ProbeResult, Server},
};

const EMPTY_VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 11);
const SERVERS: [&str; 3] = ["server-a", "server-b", "server-c"];
const TCP_TARGET: u16 = 8080;
const UDP_TARGET: u16 = 5353;
const TIMEOUT: Duration = Duration::from_secs(2);

struct Lab {
    topo: Topology,
    dp: Datapath,
    _servers: Vec<Server>,
}

fn backend(topo: &Topology, role: &str, port: u16) -> BackendEntry {
    let index = SERVERS.iter().position(|r| *r == role).unwrap() as u32;
    BackendEntry {
        id: index + 1 + if port == UDP_TARGET { 100 } else { 0 },
        address: topo.pod(role).address,
        port,
    }
}

/// The topology with servers running and a private datapath programmed
/// with a TCP and a UDP service over all three servers.
fn lab(options: LoadOptions) -> Lab {
    require_root("e2e");
    let topo =
        Topology::build(&standard_pods()).unwrap_or_else(|e| panic!("building the topology: {e}"));
    let mut servers = Vec::new();
    for role in SERVERS {
        let pod = topo.pod(role);
        servers.push(workload::tcp_server(&pod.namespace, pod.address, TCP_TARGET, role).unwrap());
        servers.push(workload::udp_server(&pod.namespace, pod.address, UDP_TARGET, role).unwrap());
    }
    let mut dp = Datapath::load(&options).unwrap_or_else(|e| panic!("loading the datapath: {e}"));
    let tcp: Vec<_> = SERVERS
        .iter()
        .map(|r| backend(&topo, r, TCP_TARGET))
        .collect();
    let udp: Vec<_> = SERVERS
        .iter()
        .map(|r| backend(&topo, r, UDP_TARGET))
        .collect();
    dp.maps.set_service(&tcp_frontend(), 1, &tcp).unwrap();
    dp.maps.set_service(&udp_frontend(), 2, &udp).unwrap();
    dp.maps
        .set_service(
            &Frontend {
                address: EMPTY_VIP,
                port: 80,
                protocol: Protocol::Tcp,
            },
            3,
            &[],
        )
        .unwrap();
    Lab {
        topo,
        dp,
        _servers: servers,
    }
}

fn client_ns(lab: &Lab) -> String {
    lab.topo
        .pod("client")
        .namespace
        .path()
        .to_string_lossy()
        .into_owned()
}

/// `count` TCP (new connection each) or UDP (new socket each) requests
/// from the client pod, from this process (not under socket-LB).
fn requests_from_client(lab: &Lab, udp: bool, count: usize) -> Vec<Answer> {
    lab.topo
        .pod("client")
        .namespace
        .run(|| {
            (0..count)
                .map(|i| {
                    let result = if udp {
                        workload::udp_request(SocketAddrV4::new(VIP, 53), TIMEOUT)
                    } else {
                        workload::tcp_request(SocketAddrV4::new(VIP, 80), TIMEOUT)
                    };
                    result.unwrap_or_else(|e| {
                        panic!(
                            "request {i} ({}) failed: {e}",
                            if udp { "UDP" } else { "TCP" }
                        )
                    })
                })
                .collect()
        })
        .unwrap()
}

fn spread(answers: &[Answer]) -> BTreeMap<String, usize> {
    let mut spread = BTreeMap::new();
    for a in answers {
        *spread.entry(a.server.clone()).or_insert(0) += 1;
    }
    spread
}

/// The client pod's checksum error counters (TCP and UDP InCsumErrors),
/// read from inside its namespace.
fn checksum_errors(lab: &Lab) -> (u64, u64) {
    let snmp = lab
        .topo
        .pod("client")
        .namespace
        .run(|| std::fs::read_to_string("/proc/thread-self/net/snmp"))
        .unwrap()
        .unwrap();
    let field = |proto: &str| -> u64 {
        let mut lines = snmp.lines().filter(|l| l.starts_with(&format!("{proto}:")));
        let (header, values) = (lines.next().unwrap(), lines.next().unwrap());
        let index = header
            .split_whitespace()
            .position(|h| h == "InCsumErrors")
            .unwrap();
        values
            .split_whitespace()
            .nth(index)
            .unwrap()
            .parse()
            .unwrap()
    };
    (field("Tcp"), field("Udp"))
}

#[test]
fn tc_path_carries_tcp_and_udp_to_every_backend() {
    let mut lab = lab(LoadOptions::default());
    let ns = client_ns(&lab);
    let _tc = lab.dp.attach_tc(Some(&ns), "eth0", TcMode::Auto).unwrap();

    let tcp = requests_from_client(&lab, false, 60);
    let udp = requests_from_client(&lab, true, 60);
    for (proto, answers, port) in [("TCP", &tcp, 80), ("UDP", &udp, 53)] {
        let spread = spread(answers);
        assert_eq!(
            spread.len(),
            3,
            "{proto}: every backend (same node, other node, routed) answers: {spread:?}"
        );
        assert!(
            spread.values().all(|&n| n >= 6),
            "{proto}: new flows spread over the backends: {spread:?}"
        );
        let peers: BTreeSet<SocketAddr> = answers.iter().map(|a| a.peer).collect();
        assert_eq!(
            peers,
            BTreeSet::from([SocketAddr::from((VIP, port))]),
            "{proto}: the client only ever sees the ClusterIP"
        );
    }
    assert_eq!(
        checksum_errors(&lab),
        (0, 0),
        "replies reached the client with valid checksums"
    );
    let counters = lab
        .dp
        .maps
        .counters()
        .unwrap()
        .into_iter()
        .collect::<BTreeMap<_, _>>();
    // Every TCP connection opens a flow (a SYN on a closed flow's tuple
    // re-opens it). A new UDP socket may reuse an ephemeral port within the
    // UDP lifetime: that is the same flow by its 5-tuple, tracked, not new.
    assert!(counters[&Counter::ConntrackMiss] >= 60, "{counters:?}");
    assert!(
        counters[&Counter::ConntrackMiss] + counters[&Counter::ConntrackHit] >= 120,
        "{counters:?}"
    );
    assert!(counters[&Counter::ReverseTranslated] >= 120, "{counters:?}");
    assert_eq!(counters[&Counter::Error], 0, "{counters:?}");
}

/// IPv6 traffic of a pod with both TC programs on its interface passes
/// untouched (the IPv6 packet path is not built; nothing of it is ours to
/// rewrite): to a neighbour on the same node and on the other node (NDP
/// on the wire) and to a pod in another subnet through the gateway, TCP
/// and UDP, each answered by the pod itself.
#[test]
fn ipv6_traffic_of_a_pod_passes_the_tc_programs_untouched() {
    let mut lab = lab(LoadOptions::default());
    let ns = client_ns(&lab);
    let _tc = lab.dp.attach_tc(Some(&ns), "eth0", TcMode::Auto).unwrap();
    let mut servers6 = Vec::new();
    for role in SERVERS {
        let pod = lab.topo.pod(role);
        let address6 = pod.address6.expect("macvlan pods are dual-stack");
        servers6.push(workload::tcp_server(&pod.namespace, address6, TCP_TARGET, role).unwrap());
        servers6.push(workload::udp_server(&pod.namespace, address6, UDP_TARGET, role).unwrap());
    }
    let client = &lab.topo.pod("client").namespace;
    for role in SERVERS {
        let address6 = lab.topo.pod(role).address6.unwrap();
        for (udp, port) in [(false, TCP_TARGET), (true, UDP_TARGET)] {
            let target = SocketAddr::from((address6, port));
            let answer = client
                .run(|| {
                    if udp {
                        workload::udp_request(target, TIMEOUT)
                    } else {
                        workload::tcp_request(target, TIMEOUT)
                    }
                })
                .unwrap()
                .unwrap_or_else(|e| panic!("{target} ({role}, udp {udp}): {e}"));
            assert_eq!((answer.server.as_str(), answer.peer), (role, target));
        }
    }
    let counters: BTreeMap<_, _> = lab.dp.maps.counters().unwrap().into_iter().collect();
    assert_eq!(counters[&Counter::Error], 0, "{counters:?}");
    assert_eq!(
        counters[&Counter::ConntrackMiss] + counters[&Counter::ConntrackHit],
        0,
        "nothing tracked: {counters:?}"
    );
    // The programs were there all along: the IPv4 service is translated.
    requests_from_client(&lab, false, 1);
    let misses = lab.dp.maps.counter(Counter::ConntrackMiss).unwrap();
    assert_eq!(misses, 1, "the IPv4 request opened one flow");
    assert_eq!(checksum_errors(&lab), (0, 0));
}

#[test]
fn a_long_lived_connection_survives_and_a_removed_backend_gets_no_new_connection() {
    let mut lab = lab(LoadOptions::default());
    let ns = client_ns(&lab);
    let _tc = lab.dp.attach_tc(Some(&ns), "eth0", TcMode::Auto).unwrap();
    let client = &lab.topo.pod("client").namespace;

    // A long-lived connection, and the backend it landed on.
    let mut conversation = client
        .run(|| workload::Conversation::open(SocketAddrV4::new(VIP, 80), TIMEOUT))
        .unwrap()
        .unwrap();
    let pinned = conversation.ask().unwrap();

    // Mid-run, that backend leaves the Service.
    let remaining: Vec<_> = SERVERS
        .iter()
        .filter(|r| **r != pinned)
        .map(|r| backend(&lab.topo, r, TCP_TARGET))
        .collect();
    lab.dp
        .maps
        .set_service(&tcp_frontend(), 1, &remaining)
        .unwrap();

    let after = requests_from_client(&lab, false, 60);
    let spread = spread(&after);
    assert!(
        !spread.contains_key(&pinned),
        "a removed backend got new connections: {spread:?}"
    );
    assert_eq!(spread.len(), 2, "{spread:?}");
    // The established connection drains on its backend.
    for _ in 0..10 {
        assert_eq!(conversation.ask().unwrap(), pinned);
    }
}

#[test]
fn socket_lb_translates_connect_sendmsg_and_shows_the_cluster_ip() {
    let mut lab = lab(LoadOptions::default());
    let cgroup = Cgroup::create(&format!("{}-sock", lab.topo.prefix)).unwrap();
    let _sock = lab.dp.attach_sock(cgroup.path()).unwrap();
    let ns = lab.topo.pod("client").namespace.path().to_owned();

    // No TC program and no ClusterIP route needed: translation happens at
    // connect()/sendmsg() time for processes in the cgroup.
    for (kind, port) in [
        (ProbeKind::Tcp, 80),
        (ProbeKind::Udp, 53),
        (ProbeKind::UdpConnected, 53),
    ] {
        let results = workload::probe_process(
            &ns,
            Some(cgroup.path()),
            kind,
            SocketAddrV4::new(VIP, port),
            45,
        )
        .unwrap();
        let answers: Vec<Answer> = results
            .into_iter()
            .map(|r| match r {
                ProbeResult::Answer(a) => a,
                ProbeResult::Failed { error, .. } => panic!("socket-LB request failed: {error}"),
            })
            .collect();
        let spread = spread(&answers);
        assert_eq!(spread.len(), 3, "{kind:?}: {spread:?}");
        assert!(
            answers
                .iter()
                .all(|a| a.peer == SocketAddr::from((VIP, port))),
            "getpeername/recvfrom show the ClusterIP"
        );
    }
    assert!(lab.dp.maps.counter(Counter::SockTranslated).unwrap() >= 135);

    // The same client outside the cgroup is not translated: with no TC
    // program either, nothing answers.
    let outside =
        workload::probe_process(&ns, None, ProbeKind::Tcp, SocketAddrV4::new(VIP, 80), 1).unwrap();
    assert!(
        matches!(outside[0], ProbeResult::Failed { .. }),
        "{outside:?}"
    );
}

#[test]
fn socket_lb_refuses_a_service_without_endpoints_at_once() {
    let mut lab = lab(LoadOptions::default());
    let cgroup = Cgroup::create(&format!("{}-sock", lab.topo.prefix)).unwrap();
    let _sock = lab.dp.attach_sock(cgroup.path()).unwrap();
    let ns = lab.topo.pod("client").namespace.path().to_owned();
    let started = Instant::now();
    let results = workload::probe_process(
        &ns,
        Some(cgroup.path()),
        ProbeKind::Tcp,
        SocketAddrV4::new(EMPTY_VIP, 80),
        1,
    )
    .unwrap();
    assert_eq!(
        results,
        vec![ProbeResult::Failed {
            error: "Connection refused (os error 111)".into(),
            errno: Some(libc::ECONNREFUSED)
        }]
    );
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "refused at once, not by timeout"
    );
}

#[test]
fn netlink_mode_and_tcx_both_attach_and_detach_exactly() {
    for mode in [TcMode::Netlink, TcMode::Tcx] {
        let mut lab = lab(LoadOptions::default());
        let ns = client_ns(&lab);
        let tc = lab.dp.attach_tc(Some(&ns), "eth0", mode).unwrap();
        assert_eq!(
            spread(&requests_from_client(&lab, false, 9))
                .values()
                .sum::<usize>(),
            9,
            "{mode}"
        );
        tc.detach().unwrap();
        let client = &lab.topo.pod("client").namespace;
        let after = client
            .run(|| workload::tcp_request(SocketAddrV4::new(VIP, 80), Duration::from_millis(300)))
            .unwrap();
        assert!(
            after.is_err(),
            "{mode}: still translated after detach: {after:?}"
        );
    }
}

/// Removes a test's bpffs directory (detaching pinned links first), also
/// when the test fails.
struct PinDirGuard(PathBuf);

impl Drop for PinDirGuard {
    fn drop(&mut self) {
        if let Ok(netns) = std::fs::read_dir(self.0.join("links/tc")) {
            for ns in netns.flatten() {
                for iface in std::fs::read_dir(ns.path()).into_iter().flatten().flatten() {
                    let _ = detach_pinned_tc(
                        &self.0,
                        Some(&ns.file_name().to_string_lossy()),
                        &iface.file_name().to_string_lossy(),
                    );
                }
            }
        }
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[test]
fn pinned_links_keep_translating_after_the_loader_is_gone() {
    require_root("e2e");
    let pin_dir = PathBuf::from(format!("/sys/fs/bpf/underpass-test-{}", std::process::id()));
    let _cleanup = PinDirGuard(pin_dir.clone());
    let options = LoadOptions {
        pin_dir: Some(pin_dir.clone()),
        ..LoadOptions::default()
    };
    let mut lab = lab(options.clone());
    let ns = client_ns(&lab);
    let tc = lab.dp.attach_tc(Some(&ns), "eth0", TcMode::Tcx).unwrap();
    assert!(tc.is_pinned());
    tc.keep();
    // The loader (and every fd it held) goes away, like an agent exiting.
    let Lab { topo, dp, _servers } = lab;
    drop(dp);
    let client = &topo.pod("client").namespace;
    let answer = client
        .run(|| workload::tcp_request(SocketAddrV4::new(VIP, 80), TIMEOUT))
        .unwrap();
    assert!(
        answer.is_ok(),
        "pinned programs and maps keep serving: {answer:?}"
    );

    // A second loader adopts the pinned maps: their contents survived.
    let again = Datapath::load(&options).unwrap();
    assert_eq!(
        again
            .maps
            .services
            .get(&tcp_frontend().key(), 0)
            .unwrap()
            .backend_count,
        3
    );
    drop(again);

    assert_eq!(detach_pinned_tc(&pin_dir, Some(&ns), "eth0").unwrap(), 2);
    let after = client
        .run(|| workload::tcp_request(SocketAddrV4::new(VIP, 80), Duration::from_millis(300)))
        .unwrap();
    assert!(after.is_err(), "detached by removing the pins: {after:?}");
    drop(topo);
}

#[test]
fn errors_name_the_namespace_interface_and_cgroup() {
    let mut lab = lab(LoadOptions::default());
    let ns = client_ns(&lab);
    let err = lab
        .dp
        .attach_tc(Some(&ns), "nosuch0", TcMode::Auto)
        .unwrap_err()
        .to_string();
    assert!(err.contains("nosuch0") && err.contains("client"), "{err}");
    let err = lab
        .dp
        .attach_tc(
            Some("/var/run/netns/underpass-does-not-exist"),
            "eth0",
            TcMode::Auto,
        )
        .unwrap_err()
        .to_string();
    assert!(err.contains("underpass-does-not-exist"), "{err}");
    let err = lab
        .dp
        .attach_sock(std::path::Path::new("/tmp"))
        .unwrap_err()
        .to_string();
    assert!(err.contains("/tmp") && err.contains("cgroup"), "{err}");
}
