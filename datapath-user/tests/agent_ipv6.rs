//! IPv6 ClusterIPs through the agent (`--ipv6 on`), in namespaces this
//! suite creates: a dual-stack Service's IPv6 family is served by
//! socket-LB (TCP, unconnected and connected UDP, each spread over the
//! backends, the peer shown as the IPv6 ClusterIP) beside its IPv4
//! family, and follows manifest edits under live traffic: a backend that
//! leaves loses new connections, keeps its established TCP connection,
//! and its connected UDP sockets move to a live backend; an empty service
//! refuses at once. There no TC program is attached (the agent's netns
//! filter matches nothing), so only socket-LB can make these answer; a
//! pod socket-LB leaves to the TC path reaches the same IPv6 ClusterIP
//! through the TC programs.

mod common;

use std::{
    collections::BTreeMap,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    path::PathBuf,
    process::Command,
    time::{Duration, Instant},
};

use common::{agent_lab::*, require_root};
use datapath_user::attach::pinned_tc_links;
use lab::{
    Cgroup, Topology, standard_pods,
    workload::{self, HeldProbe, ProbeKind, ProbeResult},
};

/// The Service's IPv6 ClusterIP (never on the wire: socket-LB rewrites it
/// before a packet exists).
const VIP6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x10, 0x96, 0, 0, 0, 0, 0x77);

const READY: &str = "{ready: true, serving: true, terminating: false}";

/// A dual-stack Service (`RequireDualStack`, IPv4 first as the API
/// server allocates it) over `v4` and `v6` endpoints: http 80 → TARGET,
/// dns 53/UDP → 5353.
fn dual_stack_manifest(v4: &[Ipv4Addr], v6: &[Ipv6Addr]) -> String {
    let mut text = format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: dual, namespace: e2e}}\nspec:\n  clusterIP: {VIP}\n  clusterIPs: [\"{VIP}\", \"{VIP6}\"]\n  ipFamilies: [IPv4, IPv6]\n  ipFamilyPolicy: RequireDualStack\n  ports:\n  - {{name: http, port: 80, targetPort: {TARGET}}}\n  - {{name: dns, port: 53, protocol: UDP, targetPort: 5353}}\n"
    );
    let families: [(&str, Vec<IpAddr>); 2] = [
        ("IPv4", v4.iter().map(|&a| a.into()).collect()),
        ("IPv6", v6.iter().map(|&a| a.into()).collect()),
    ];
    for (family, addresses) in families {
        text += &format!(
            "---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: dual-{}\n  namespace: e2e\n  labels: {{kubernetes.io/service-name: dual}}\naddressType: {family}\nports:\n- {{name: http, port: {TARGET}}}\n- {{name: dns, port: 5353, protocol: UDP}}\nendpoints:",
            family.to_lowercase()
        );
        if addresses.is_empty() {
            text += " []";
        }
        for address in addresses {
            text += &format!("\n- addresses: [\"{address}\"]\n  conditions: {READY}");
        }
        text += "\n";
    }
    text
}

/// The agent with `--ipv6 on` and no socket-LB serving `manifest`
/// (written as `dual.yaml`), its TC pair on the client pod, attached
/// before this returns: for the tests of the IPv6 TC path alone. Dropped
/// in field order: the agent first, then its manifests and pins.
struct TcPathAgent {
    agent: Agent,
    manifest: PathBuf,
    _dir: ManifestDir,
    _pins: PinDir,
}

fn tc_path_agent(topo: &Topology, manifest: &str) -> TcPathAgent {
    let pins = PinDir(PathBuf::from(format!("/sys/fs/bpf/{}", topo.prefix)));
    let dir = tempdir(&topo.prefix);
    let path = dir.join("dual.yaml");
    write_atomically(&path, manifest);
    let filter = format!("{}-client*", topo.prefix);
    let agent = Agent::start_with(&pins.0, &dir, &filter, &["--no-socket-lb", "--ipv6", "on"]);
    let client = topo.pod("client").namespace.name().to_owned();
    wait_until("the client's eth0 is attached", || {
        pinned_tc_links(&pins.0).contains(&(client.clone(), "eth0".into()))
    });
    TcPathAgent {
        agent,
        manifest: path,
        _dir: dir,
        _pins: pins,
    }
}

/// Which server answered each of `results`; panics on a failure.
fn spread(what: &str, results: Vec<ProbeResult>, peer: SocketAddr) -> BTreeMap<String, usize> {
    let mut spread = BTreeMap::new();
    for result in results {
        match result {
            ProbeResult::Answer(answer) => {
                assert_eq!(answer.peer, peer, "{what}: the peer is the ClusterIP");
                *spread.entry(answer.server).or_insert(0) += 1;
            }
            ProbeResult::Failed { error, .. } => panic!("{what}: {error}"),
        }
    }
    spread
}

#[test]
fn ipv6_cluster_ips_are_served_by_socket_lb_and_follow_manifest_edits() {
    require_root("agent e2e");
    // Without them, only the parts that need them are skipped (said).
    let destroys = common::kernel_has(
        datapath_user::features::SOCK_DESTROY,
        datapath_user::probe::kernel().sock_destroy,
    );
    let refused_errno = if common::kernel_has(
        datapath_user::features::SET_RETVAL,
        datapath_user::probe::kernel().set_retval,
    ) {
        libc::ECONNREFUSED
    } else {
        libc::EPERM
    };
    let topo = Topology::build(&standard_pods()).expect("building the topology");
    let roles = ["server-a", "server-b", "server-c"];
    let mut servers = Vec::new();
    let (mut v4, mut v6) = (Vec::new(), Vec::new());
    for role in roles {
        let pod = topo.pod(role);
        let address6 = pod.address6.expect("the topology is dual-stack");
        for address in [IpAddr::from(pod.address), IpAddr::from(address6)] {
            servers.push(workload::tcp_server(&pod.namespace, address, TARGET, role).unwrap());
            servers.push(workload::udp_server(&pod.namespace, address, 5353, role).unwrap());
        }
        v4.push(pod.address);
        v6.push(address6);
    }
    let pins = PinDir(PathBuf::from(format!("/sys/fs/bpf/{}", topo.prefix)));
    let dir = tempdir(&topo.prefix);
    let file = dir.join("dual.yaml");
    write_atomically(&file, &dual_stack_manifest(&v4, &v6));
    let cgroup = Cgroup::create(&format!("{}-sock", topo.prefix)).unwrap();
    let no_pod = format!("{}-no-such-pod", topo.prefix);
    let cgroup_arg = cgroup.path().to_str().unwrap();
    let agent = Agent::start_with(
        &pins.0,
        &dir,
        &no_pod,
        &["--cgroup", cgroup_arg, "--ipv6", "on"],
    );
    let client = topo.pod("client").namespace.path().to_owned();

    // Both families, every kind of socket, spread over the backends.
    for (kind, port) in [
        (ProbeKind::Tcp, 80),
        (ProbeKind::Udp, 53),
        (ProbeKind::UdpConnected, 53),
    ] {
        for vip in [IpAddr::from(VIP), IpAddr::from(VIP6)] {
            let target = SocketAddr::new(vip, port);
            let results =
                workload::probe_process(&client, Some(cgroup.path()), kind, target, 30).unwrap();
            let spread = spread(&format!("{kind:?} to {target}"), results, target);
            assert!(spread.len() >= 2, "{kind:?} to {target}: {spread:?}");
        }
    }
    assert!(pinned_tc_links(&pins.0).is_empty(), "no TC program in play");

    // Live sockets on every backend: connected UDP sockets and TCP
    // connections, each pinned to its backend at connect().
    let spawn = |kind: ProbeKind, port: u16| {
        HeldProbe::spawn(
            &client,
            Some(cgroup.path()),
            kind,
            SocketAddr::new(VIP6.into(), port),
        )
        .unwrap()
    };
    let answer = |probe: &mut HeldProbe| match probe.ask().unwrap() {
        ProbeResult::Answer(a) => Ok(a.server),
        ProbeResult::Failed { errno, error } => Err((errno, error)),
    };
    let mut udp_on = BTreeMap::<String, Vec<HeldProbe>>::new();
    let mut tcp_on = BTreeMap::<String, Vec<HeldProbe>>::new();
    // IPv4 connected UDP sockets on server-a, which stays in the IPv4
    // family: the IPv6 edit must not destroy them.
    let mut udp4_on_a = Vec::new();
    while udp4_on_a.len() < 2 {
        let mut probe = HeldProbe::spawn(
            &client,
            Some(cgroup.path()),
            ProbeKind::UdpConnected,
            SocketAddr::new(VIP.into(), 53),
        )
        .unwrap();
        if answer(&mut probe).expect("an IPv4 connected UDP socket answers") == "server-a" {
            udp4_on_a.push(probe);
        }
    }
    // Until each kind has sockets on server-a and on another backend
    // (bounded: each socket lands on server-a one time in three).
    for _ in 0..60 {
        let on_a = |on: &BTreeMap<String, Vec<HeldProbe>>| {
            on.get("server-a").is_some_and(|p| p.len() >= 2) && on.len() >= 2
        };
        if on_a(&udp_on) && on_a(&tcp_on) {
            break;
        }
        let mut probe = spawn(ProbeKind::UdpConnected, 53);
        let server = answer(&mut probe).expect("a connected UDP socket answers");
        udp_on.entry(server).or_default().push(probe);
        let mut probe = spawn(ProbeKind::Tcp, 80);
        let server = answer(&mut probe).expect("a TCP connection answers");
        tcp_on.entry(server).or_default().push(probe);
    }
    assert!(
        udp_on.contains_key("server-a") && tcp_on.contains_key("server-a"),
        "sockets over three backends reach server-a: {:?} {:?}",
        udp_on.keys(),
        tcp_on.keys()
    );

    // server-a leaves the IPv6 family (the IPv4 one keeps it).
    write_atomically(&file, &dual_stack_manifest(&v4, &v6[1..]));
    let started = Instant::now();
    let moved_off_a: &mut [HeldProbe] = if destroys {
        udp_on.get_mut("server-a").unwrap()
    } else {
        &mut []
    };
    for probe in moved_off_a {
        let failure = loop {
            match answer(probe) {
                Ok(server) => assert_eq!(server, "server-a"),
                Err(failure) => break failure,
            }
            assert!(
                started.elapsed() < Duration::from_secs(3),
                "a connected UDP socket never moved off server-a"
            );
            std::thread::sleep(Duration::from_millis(20));
        };
        assert!(
            matches!(failure.0, Some(libc::ECONNABORTED | libc::EDESTADDRREQ)),
            "{failure:?}"
        );
        let server = answer(probe).expect("reconnected");
        assert_ne!(
            server,
            "server-a",
            "reconnected to a live backend ({:?} after the edit)",
            started.elapsed()
        );
    }
    wait_until("new IPv6 connections avoid server-a", || {
        let target = SocketAddr::new(VIP6.into(), 80);
        let results =
            workload::probe_process(&client, Some(cgroup.path()), ProbeKind::Tcp, target, 20)
                .unwrap();
        !spread("TCP after the edit", results, target).contains_key("server-a")
    });
    for (server, probes) in &mut tcp_on {
        for probe in probes {
            assert_eq!(
                answer(probe).as_ref(),
                Ok(server),
                "an established TCP connection keeps its backend"
            );
        }
    }
    for (server, probes) in udp_on.iter_mut().filter(|(s, _)| *s != "server-a") {
        for probe in probes {
            assert_eq!(
                answer(probe).as_ref(),
                Ok(server),
                "live backends keep theirs"
            );
        }
    }
    for probe in &mut udp4_on_a {
        assert_eq!(
            answer(probe).as_deref(),
            Ok("server-a"),
            "the IPv4 family's sockets on server-a stay"
        );
    }
    // `underpass service list` / `backend list` show both families.
    let cli = |args: &[&str]| -> serde_json::Value {
        let output = std::process::Command::new(env!("CARGO_BIN_EXE_underpass"))
            .args(args)
            .arg("--pin-dir")
            .arg(&pins.0)
            .args(["-o", "json"])
            .output()
            .unwrap();
        assert!(output.status.success(), "{args:?}");
        serde_json::from_slice(&output.stdout).unwrap()
    };
    let services = cli(&["service", "list"]);
    let http6 = services
        .as_array()
        .unwrap()
        .iter()
        .find(|row| row["frontend"] == format!("[{VIP6}]:80/TCP"))
        .unwrap_or_else(|| panic!("no IPv6 frontend listed: {services}"));
    let listed: Vec<&str> = http6["backends"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b.as_str().unwrap())
        .collect();
    let expected: Vec<String> = v6[1..]
        .iter()
        .map(|a| SocketAddr::new((*a).into(), TARGET).to_string())
        .collect();
    assert_eq!(listed, expected, "{services}");
    let backends = cli(&["backend", "list"]);
    assert_eq!(
        backends.as_array().unwrap().len(),
        3 * 2 + 2 * 2,
        "three IPv4 and two IPv6 pods, two ports each: {backends}"
    );
    let target4 = SocketAddr::new(VIP.into(), 80);
    let results =
        workload::probe_process(&client, Some(cgroup.path()), ProbeKind::Tcp, target4, 30).unwrap();
    assert!(
        spread("IPv4 after the edit", results, target4).contains_key("server-a"),
        "the IPv4 family keeps server-a"
    );

    let metrics = agent.get("/metrics").unwrap();
    let terminated = if destroys {
        udp_on["server-a"].len()
    } else {
        0
    };
    assert!(
        metrics.contains(&format!(
            "underpass_udp_sockets_terminated_total {terminated}\n"
        )),
        "only server-a's {terminated} sockets terminated: {metrics}"
    );

    // No IPv6 endpoint at all: refused at once.
    write_atomically(&file, &dual_stack_manifest(&v4, &[]));
    wait_until("connections to the empty IPv6 family are refused", || {
        let results = workload::probe_process(
            &client,
            Some(cgroup.path()),
            ProbeKind::Tcp,
            SocketAddr::new(VIP6.into(), 80),
            1,
        )
        .unwrap();
        matches!(
            results.as_slice(),
            [ProbeResult::Failed {
                errno: Some(errno),
                ..
            }] if *errno == refused_errno
        )
    });
    let metrics = agent.get("/metrics").unwrap();
    assert!(datapath_event(&metrics, "no_backend") >= 1);
    drop(udp_on);
    drop(tcp_on);
    drop(udp4_on_a);
    agent.stop();
    drop(servers);
}

/// Without `--ipv6 on` a dual-stack Service's IPv4 family is served and
/// its IPv6 ClusterIP is left alone (reported, not programmed): an IPv6
/// connect() goes where the application sent it.
#[test]
fn without_ipv6_on_an_ipv6_cluster_ip_is_left_alone() {
    require_root("agent e2e");
    let topo = Topology::build(&standard_pods()).expect("building the topology");
    let pod = topo.pod("server-a");
    let address6 = pod.address6.expect("the topology is dual-stack");
    let server = workload::tcp_server(&pod.namespace, pod.address, TARGET, "server-a").unwrap();
    let pins = PinDir(PathBuf::from(format!("/sys/fs/bpf/{}", topo.prefix)));
    let dir = tempdir(&topo.prefix);
    write_atomically(
        &dir.join("dual.yaml"),
        &dual_stack_manifest(&[pod.address], &[address6]),
    );
    let cgroup = Cgroup::create(&format!("{}-sock", topo.prefix)).unwrap();
    let no_pod = format!("{}-no-such-pod", topo.prefix);
    let cgroup_arg = cgroup.path().to_str().unwrap();
    let agent = Agent::start_with(&pins.0, &dir, &no_pod, &["--cgroup", cgroup_arg]);
    let client = topo.pod("client").namespace.path().to_owned();
    let target4 = SocketAddr::new(VIP.into(), 80);
    let results =
        workload::probe_process(&client, Some(cgroup.path()), ProbeKind::Tcp, target4, 3).unwrap();
    assert_eq!(spread("IPv4", results, target4).len(), 1);
    let results = workload::probe_process(
        &client,
        Some(cgroup.path()),
        ProbeKind::Tcp,
        SocketAddr::new(VIP6.into(), 80),
        1,
    )
    .unwrap();
    assert!(
        matches!(results.as_slice(), [ProbeResult::Failed { .. }]),
        "untranslated, the IPv6 ClusterIP answers nothing: {results:?}"
    );
    let metrics = agent.get("/metrics").unwrap();
    assert_eq!(datapath_event(&metrics, "no_backend"), 0);
    agent.stop();
    drop(server);
}

/// A pod socket-LB leaves to the TC path (`--socket-lb host`) reaches a
/// dual-stack Service's IPv6 ClusterIP through the TC programs: TCP and
/// connected UDP spread over both backends, the peer shown as the IPv6
/// ClusterIP (the replies reverse-translated on the pod's ingress), and
/// follows manifest edits under live traffic: a backend removed gets no
/// new flow; a service left without IPv6 endpoints refuses at once (an
/// ICMPv6 port unreachable into the pod: ECONNREFUSED) instead of
/// letting the packets leave for a ClusterIP nothing answers.
#[test]
fn a_pod_on_the_tc_path_reaches_an_ipv6_cluster_ip_through_tc_and_follows_edits() {
    require_root("agent e2e");
    let topo = Topology::build(&standard_pods()).expect("building the topology");
    let names = ["server-a", "server-b"];
    let pods: Vec<_> = names.iter().map(|name| topo.pod(name)).collect();
    let v4: Vec<Ipv4Addr> = pods.iter().map(|pod| pod.address).collect();
    let v6: Vec<Ipv6Addr> = pods
        .iter()
        .map(|pod| pod.address6.expect("the topology is dual-stack"))
        .collect();
    let mut servers = Vec::new();
    for (pod, name) in pods.iter().zip(names) {
        for address in [
            IpAddr::from(pod.address),
            IpAddr::from(pod.address6.unwrap()),
        ] {
            servers.push(workload::tcp_server(&pod.namespace, address, TARGET, name).unwrap());
            servers.push(workload::udp_server(&pod.namespace, address, 5353, name).unwrap());
        }
    }
    let pins = PinDir(PathBuf::from(format!("/sys/fs/bpf/{}", topo.prefix)));
    let dir = tempdir(&topo.prefix);
    let manifest = dir.join("dual.yaml");
    write_atomically(&manifest, &dual_stack_manifest(&v4, &v6));
    let cgroup = Cgroup::create(&format!("{}-sock", topo.prefix)).unwrap();
    let cgroup_arg = cgroup.path().to_str().unwrap();
    let filter = format!("{}-client*", topo.prefix);
    let agent = Agent::start_with(
        &pins.0,
        &dir,
        &filter,
        &[
            "--cgroup",
            cgroup_arg,
            "--socket-lb",
            "host",
            "--ipv6",
            "on",
        ],
    );
    let client = &topo.pod("client").namespace;
    wait_until("the client's eth0 is attached", || {
        pinned_tc_links(&pins.0).contains(&(client.name().to_owned(), "eth0".into()))
    });
    type Request = fn(SocketAddr, Duration) -> std::io::Result<workload::Answer>;
    let requests = [
        ("TCP", 80, workload::tcp_request as Request),
        ("connected UDP", 53, workload::connected_udp_request),
    ];
    for (what, port, request) in requests {
        let target = SocketAddr::new(VIP6.into(), port);
        let results = (0..24)
            .map(|_| match client.run(|| request(target, TIMEOUT)).unwrap() {
                Ok(answer) => ProbeResult::Answer(answer),
                Err(error) => panic!("{what} to {target}: {error}"),
            })
            .collect();
        let spread = spread(what, results, target);
        assert_eq!(
            spread.keys().collect::<Vec<_>>(),
            ["server-a", "server-b"],
            "{what}: both IPv6 backends answer through TC"
        );
    }

    // server-a leaves the IPv6 family: new flows go to server-b alone.
    write_atomically(&manifest, &dual_stack_manifest(&v4, &v6[1..]));
    wait_until("the agent programs server-b alone", || {
        (0..8).all(|_| {
            client
                .run(|| workload::tcp_request(SocketAddr::new(VIP6.into(), 80), TIMEOUT))
                .unwrap()
                .is_ok_and(|answer| answer.server == "server-b")
        })
    });
    for (what, port, request) in requests {
        for _ in 0..10 {
            let answer = client
                .run(|| request(SocketAddr::new(VIP6.into(), port), TIMEOUT))
                .unwrap()
                .unwrap_or_else(|e| panic!("{what}: {e}"));
            assert_eq!(answer.server, "server-b", "{what}: server-a left");
        }
    }

    // No IPv6 endpoint left: refused at once, the IPv4 family still served.
    write_atomically(&manifest, &dual_stack_manifest(&v4, &[]));
    wait_until("the IPv6 ClusterIP refuses", || {
        client
            .run(|| workload::tcp_request(SocketAddr::new(VIP6.into(), 80), TIMEOUT))
            .unwrap()
            .is_err()
    });
    for (what, port, request) in requests {
        let started = Instant::now();
        let error = client
            .run(|| request(SocketAddr::new(VIP6.into(), port), Duration::from_secs(5)))
            .unwrap()
            .expect_err("no IPv6 endpoint");
        assert_eq!(
            error.raw_os_error(),
            Some(libc::ECONNREFUSED),
            "{what}: {error}"
        );
        assert!(
            started.elapsed() < Duration::from_secs(1),
            "{what}: refused at once, not after retries ({:?})",
            started.elapsed()
        );
    }
    client
        .run(|| workload::tcp_request(SocketAddr::new(VIP.into(), 80), TIMEOUT))
        .unwrap()
        .expect("the IPv4 ClusterIP still answers on the TC path");
    let metrics = agent.get("/metrics").unwrap();
    assert!(datapath_event(&metrics, "no_backend") >= 2, "{metrics}");
    assert!(datapath_event(&metrics, "conntrack_hit") > 0, "{metrics}");
    assert_eq!(datapath_event(&metrics, "sock_translated"), 0, "{metrics}");
    // The IPv6 frontend's own figures, labelled like an IPv4 one.
    let labels = format!(
        "{{namespace=\"e2e\",name=\"dual\",port=\"80/TCP\",port_name=\"http\",frontend=\"[{VIP6}]:80/TCP\"}}"
    );
    for family in [
        "underpass_service_new_flows_total",
        "underpass_service_packets_total",
    ] {
        let value = metrics
            .lines()
            .find_map(|l| l.strip_prefix(&format!("{family}{labels} ")))
            .and_then(|v| v.parse::<u64>().ok());
        assert!(value.is_some_and(|v| v > 0), "{family}{labels}: {metrics}");
    }
    agent.stop();
    drop(servers);
}

/// Path-MTU discovery through an IPv6 ClusterIP on the TC path: the
/// backend is behind the gateway, whose route to its subnet allows only
/// 1,400 bytes. IPv6 routers never fragment: the gateway's "packet too
/// big" quotes the DNATed segment; translated back to the ClusterIP
/// (`up_tc_icmp6_ingress`) it reaches the client's socket, which lowers
/// its segment size, and a 2 MB transfer completes instead of
/// black-holing.
#[test]
fn path_mtu_discovery_works_through_an_ipv6_cluster_ip() {
    require_root("agent e2e");
    let topo = Topology::build(&standard_pods()).expect("building the topology");
    let pod = topo.pod("server-c");
    let address6 = pod.address6.expect("the topology is dual-stack");
    let client_address6 = topo.pod("client").address6.unwrap();
    assert_ne!(
        address6.segments()[0],
        client_address6.segments()[0],
        "server-c is routed"
    );
    let servers = [
        workload::tcp_server(&pod.namespace, pod.address, TARGET, "server-c").unwrap(),
        workload::tcp_server(&pod.namespace, address6, TARGET, "server-c").unwrap(),
    ];
    // The routed hop: the gateway forwards to server-c's subnet with a
    // 1,400-byte route MTU.
    let subnet = format!("{:x}::/64", address6.segments()[0]);
    let narrow = Command::new("ip")
        .args(["-6", "-n", topo.gateway.name(), "route", "replace", &subnet])
        .args([
            "dev", "eth0", "proto", "kernel", "metric", "256", "mtu", "1400",
        ])
        .status()
        .unwrap();
    assert!(narrow.success(), "narrowing the gateway's route");
    let lab = tc_path_agent(&topo, &dual_stack_manifest(&[pod.address], &[address6]));
    let client = &topo.pod("client").namespace;
    let target = SocketAddr::new(VIP6.into(), 80);
    let mut conversation = client
        .run(|| workload::Conversation::open(target, Duration::from_secs(10)))
        .unwrap()
        .unwrap();
    assert_eq!(conversation.ask().unwrap(), "server-c");
    assert_eq!(
        conversation
            .ask_large(2 << 20)
            .expect("a 2 MB transfer through the narrow hop"),
        "server-c"
    );
    let metrics = lab.agent.get("/metrics").unwrap();
    assert!(
        datapath_event(&metrics, "icmp_error_translated") >= 1,
        "the gateway's packet too big was translated: {metrics}"
    );
    assert!(datapath_event(&metrics, "conntrack_hit") > 0, "{metrics}");
    lab.agent.stop();
    drop(servers);
}

/// Datagrams larger than the path MTU (up to 20,000 bytes over 1,500)
/// cross an IPv6 ClusterIP on the TC path whole, both ways: the client's
/// kernel fragments the request, every fragment is translated
/// (`up_tc_egress6_ext`, the later ones by the ports their first left in
/// `FRAGMENTS6`), the backend reassembles it and its fragmented answer
/// is reverse-translated fragment by fragment (`up_tc_ingress6_ext`), so
/// the client's socket connected to the ClusterIP receives it whole.
#[test]
fn datagrams_larger_than_the_mtu_cross_an_ipv6_cluster_ip_whole() {
    require_root("agent e2e");
    let topo = Topology::build(&standard_pods()).expect("building the topology");
    let pod = topo.pod("server-a");
    let address6 = pod.address6.expect("the topology is dual-stack");
    let server = workload::udp_server(&pod.namespace, address6, 5353, "server-a").unwrap();
    let lab = tc_path_agent(&topo, &dual_stack_manifest(&[pod.address], &[address6]));
    let client = &topo.pod("client").namespace;
    let target = SocketAddr::new(VIP6.into(), 53);
    for size in [4000, 9000, 20000] {
        let (answer, length) = client
            .run(|| workload::large_udp_request(target, size, TIMEOUT))
            .unwrap()
            .unwrap_or_else(|e| panic!("{size}-byte datagram: {e}"));
        assert_eq!(answer.server, "server-a");
        assert_eq!(answer.peer, target, "the answer comes from the ClusterIP");
        assert_eq!(length, size, "the answer arrives whole");
    }
    let metrics = lab.agent.get("/metrics").unwrap();
    let translated = datapath_event(&metrics, "fragment_translated");
    assert!(
        translated >= 2 * (2 + 6 + 13),
        "{translated} fragments translated"
    );
    assert_eq!(
        datapath_event(&metrics, "ipv6_untranslated"),
        0,
        "{metrics}"
    );
    lab.agent.stop();
    drop(server);
}

/// A pod on the TC path that reaches its own service's IPv6 ClusterIP
/// gets its connection when it is the backend chosen (hairpin: looped
/// back inside the pod from 100::a9fe:2a01), beside another backend and,
/// after a manifest edit under live traffic, as the only one.
#[test]
fn a_pod_reaches_its_own_ipv6_service_on_the_tc_path() {
    require_root("agent e2e");
    let topo = Topology::build(&standard_pods()).expect("building the topology");
    let pods = [topo.pod("client"), topo.pod("server-a")];
    let mut servers = Vec::new();
    for (pod, name) in pods.iter().zip(["client", "server-a"]) {
        let address6 = pod.address6.expect("the topology is dual-stack");
        servers.push(workload::tcp_server(&pod.namespace, address6, TARGET, name).unwrap());
    }
    let v4: Vec<Ipv4Addr> = pods.iter().map(|pod| pod.address).collect();
    let v6: Vec<Ipv6Addr> = pods.iter().map(|pod| pod.address6.unwrap()).collect();
    let lab = tc_path_agent(&topo, &dual_stack_manifest(&v4, &v6));
    let client = &topo.pod("client").namespace;
    let target = SocketAddr::new(VIP6.into(), 80);
    let ask = || {
        client
            .run(|| workload::tcp_request(target, TIMEOUT))
            .unwrap()
    };
    let results = (0..40)
        .map(|_| match ask() {
            Ok(answer) => ProbeResult::Answer(answer),
            Err(error) => panic!("every connection is answered: {error}"),
        })
        .collect();
    let seen = spread("TCP", results, target);
    assert_eq!(
        seen.keys().collect::<Vec<_>>(),
        ["client", "server-a"],
        "the pod itself and server-a answer"
    );

    write_atomically(&lab.manifest, &dual_stack_manifest(&v4, &v6[..1]));
    wait_until("only the pod itself answers", || {
        (0..10).all(|_| ask().is_ok_and(|answer| answer.server == "client"))
    });
    for _ in 0..20 {
        let answer = ask().expect("answered");
        assert_eq!(
            (answer.server.as_str(), answer.peer),
            ("client", target),
            "from the ClusterIP, by the pod itself"
        );
    }
    let metrics = lab.agent.get("/metrics").unwrap();
    assert_eq!(datapath_event(&metrics, "no_backend"), 0, "{metrics}");
    lab.agent.stop();
    drop(servers);
}

/// `agent_e2e`'s `connections_sharing_a_wire_tuple_all_keep_working` over
/// IPv6 on the TC path: the client's kernel gives one source port to two
/// connections whose wire tuples would be the same after translation —
/// two IPv6 Services with one backend; a connection straight to the pod,
/// then the ClusterIP (the pod's own socket holds the tuple); the
/// ClusterIP, then straight to the pod (a live service flow holds it).
/// The second of each pair moves to another port, and every connection
/// keeps being answered, also after idling past the learned MACs'
/// freshness (the service flows' next packets are sent by
/// `bpf_redirect_neigh` again).
#[test]
fn ipv6_connections_sharing_a_wire_tuple_all_keep_working() {
    require_root("agent e2e");
    let topo = Topology::build(&standard_pods()).expect("building the topology");
    let pod = topo.pod("server-a");
    let address6 = pod.address6.expect("the topology is dual-stack");
    let server = workload::tcp_server(&pod.namespace, address6, TARGET, "server-a").unwrap();
    let other_vip: Ipv6Addr = "fd00:10:96::7:9".parse().unwrap();
    let manifest = format!(
        "{}---\napiVersion: v1\nkind: Service\nmetadata: {{name: other, namespace: e2e}}\nspec:\n  clusterIP: \"{other_vip}\"\n  clusterIPs: [\"{other_vip}\"]\n  ipFamilies: [IPv6]\n  ports: [{{name: http, port: 81, targetPort: {TARGET}}}]\n---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: other-1\n  namespace: e2e\n  labels: {{kubernetes.io/service-name: other}}\naddressType: IPv6\nports: [{{name: http, port: {TARGET}}}]\nendpoints:\n- addresses: [\"{address6}\"]\n  conditions: {READY}\n",
        dual_stack_manifest(&[pod.address], &[address6])
    );
    let lab = tc_path_agent(&topo, &manifest);
    let client = &topo.pod("client").namespace;
    let vip = SocketAddr::new(VIP6.into(), 80);
    let other = SocketAddr::new(other_vip.into(), 81);
    let direct = SocketAddr::new(address6.into(), TARGET);
    let mut pairs = Vec::new();
    for (case, port, first, second) in [
        ("two Services, one backend", 45001, vip, other),
        (
            "straight to the pod, then the ClusterIP",
            45002,
            direct,
            vip,
        ),
        (
            "the ClusterIP, then straight to the pod",
            45003,
            vip,
            direct,
        ),
    ] {
        let (a, b) = client
            .run(|| {
                let a = workload::Conversation::open_from(port, first, TIMEOUT)?;
                let b = workload::Conversation::open_from(port, second, TIMEOUT)?;
                std::io::Result::Ok((a, b))
            })
            .unwrap()
            .unwrap_or_else(|e| panic!("{case}: {e}"));
        pairs.push((case, a, b));
    }
    let ask_all = |pairs: &mut Vec<(&str, workload::Conversation, workload::Conversation)>,
                   when: &str| {
        for (case, a, b) in pairs.iter_mut() {
            for round in 0..5 {
                for (which, conversation) in [("first", &mut *a), ("second", &mut *b)] {
                    assert_eq!(
                        conversation
                            .ask()
                            .unwrap_or_else(|e| panic!("{case}, {which}, {when} {round}: {e}")),
                        "server-a"
                    );
                }
            }
        }
    };
    ask_all(&mut pairs, "busy");
    std::thread::sleep(Duration::from_secs(
        datapath_common::conntrack::L2_FRESH_SECS + 1,
    ));
    ask_all(&mut pairs, "after idling");
    let metrics = lab.agent.get("/metrics").unwrap();
    let clashes = datapath_event(&metrics, "port_clash");
    assert!(clashes >= 3, "{clashes} clashes resolved");
    lab.agent.stop();
    drop(server);
}

/// `agent_e2e`'s `a_backend_behind_the_pods_veth_to_its_node_is_reached`
/// over IPv6 on the TC path: a host-network endpoint on the client's own
/// node (its IPv6 wire address), which the pod reaches only by
/// Spiderpool's coordinator veth (a host route through it; its macvlan
/// cannot reach its own node). The agent copies the pod's IPv6 routes
/// into `POD_ROUTES6`: connections to the IPv6 ClusterIP leave by the
/// veth after translation and their replies, which come back by the veth,
/// are translated there.
#[test]
fn a_backend_behind_the_pods_veth_to_its_node_is_reached_over_ipv6() {
    use datapath_user::attach::pinned_reply_links;
    use lab::topology::NODE_ADDRESSES6;
    require_root("agent e2e");
    if !common::kernel_has(
        datapath_user::features::NETNS_COOKIE_TC,
        datapath_user::probe::kernel().netns_cookie_tc,
    ) {
        return;
    }
    let topo = Topology::build(&standard_pods()).expect("building the topology");
    let node_address6 = NODE_ADDRESSES6[topo.pod("client").node];
    topo.add_coordinator_veth("client").unwrap();
    topo.route_via_node("client", (node_address6, 128), true)
        .unwrap();
    let node = &topo.nodes[topo.pod("client").node];
    let host_server = workload::tcp_server(node, node_address6, TARGET, "node").unwrap();
    let lab = tc_path_agent(&topo, &dual_stack_manifest(&[], &[node_address6]));
    let pins = PathBuf::from(format!("/sys/fs/bpf/{}", topo.prefix));
    let client_ns = topo.pod("client").namespace.name().to_owned();
    wait_until("the client's veth0 (replies) is attached", || {
        pinned_reply_links(&pins).contains(&(client_ns.clone(), "veth0".into()))
    });
    let client = &topo.pod("client").namespace;
    let target = SocketAddr::new(VIP6.into(), 80);
    let mut conversation = client
        .run(|| workload::Conversation::open(target, TIMEOUT))
        .unwrap()
        .expect("the host-network backend answers through the IPv6 ClusterIP");
    for _ in 0..5 {
        assert_eq!(conversation.ask().unwrap(), "node");
    }
    for _ in 0..5 {
        let answer = client
            .run(|| workload::tcp_request(target, TIMEOUT))
            .unwrap()
            .expect("new connections too");
        assert_eq!((answer.server.as_str(), answer.peer), ("node", target));
    }
    drop(conversation);
    lab.agent.stop();
    drop(host_server);
}

/// An agent restart under live IPv6 traffic on the TC path loses
/// nothing: a long-lived connection through the IPv6 ClusterIP keeps its
/// backend and its translated replies across the stop, half a second
/// with no agent at all (the pinned programs, their jump table and the
/// IPv6 conntrack serve alone), and the next agent's load (new programs
/// swapped in, the jump table's slots pointed at them); a stream of
/// short connections meanwhile is answered throughout.
#[test]
fn an_agent_restart_under_ipv6_traffic_loses_nothing() {
    use std::sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    };
    require_root("agent e2e");
    let topo = Topology::build(&standard_pods()).expect("building the topology");
    let pod = topo.pod("server-b");
    let address6 = pod.address6.expect("the topology is dual-stack");
    let server = workload::tcp_server(&pod.namespace, address6, TARGET, "server-b").unwrap();
    let mut lab = tc_path_agent(&topo, &dual_stack_manifest(&[], &[address6]));
    let target = SocketAddr::new(VIP6.into(), 80);
    let client = &topo.pod("client").namespace;
    let mut long_lived = client
        .run(|| workload::Conversation::open(target, TIMEOUT))
        .unwrap()
        .expect("the IPv6 ClusterIP answers");
    assert_eq!(long_lived.ask().unwrap(), "server-b");

    let stop = Arc::new(AtomicBool::new(false));
    let answered = Arc::new(AtomicUsize::new(0));
    let failures = Arc::new(Mutex::new(Vec::new()));
    let stream = {
        let (stop, answered, failures) = (stop.clone(), answered.clone(), failures.clone());
        let client = client.path().to_owned();
        std::thread::spawn(move || {
            datapath_user::netns::enter(&client).unwrap();
            while !stop.load(Ordering::Relaxed) {
                match workload::tcp_request(target, TIMEOUT) {
                    Ok(a) if a.server == "server-b" && a.peer == target => {
                        answered.fetch_add(1, Ordering::Relaxed);
                    }
                    Ok(a) => failures
                        .lock()
                        .unwrap()
                        .push(format!("answered by {} from {}", a.server, a.peer)),
                    Err(e) => failures.lock().unwrap().push(e.to_string()),
                }
                std::thread::sleep(Duration::from_millis(5));
            }
        })
    };
    std::thread::sleep(Duration::from_millis(300));
    lab.agent.stop();
    // No agent at all for a while: the pinned datapath serves alone.
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(long_lived.ask().unwrap(), "server-b", "with no agent");
    let dir = lab.manifest.parent().unwrap().to_owned();
    let pins = PathBuf::from(format!("/sys/fs/bpf/{}", topo.prefix));
    let filter = format!("{}-client*", topo.prefix);
    lab.agent = Agent::start_with(&pins, &dir, &filter, &["--no-socket-lb", "--ipv6", "on"]);
    std::thread::sleep(Duration::from_millis(800));
    stop.store(true, Ordering::Relaxed);
    stream.join().unwrap();
    assert_eq!(
        long_lived.ask().unwrap(),
        "server-b",
        "the long-lived connection survives on its backend"
    );
    let answered = answered.load(Ordering::Relaxed);
    assert!(
        answered > 50,
        "only {answered} requests ran across the restart"
    );
    assert_eq!(
        *failures.lock().unwrap(),
        Vec::<String>::new(),
        "lost across the restart"
    );
    eprintln!("IPv6 restart: {answered} requests answered, none lost");
    lab.agent.stop();
    drop(server);
}

/// `sessionAffinity: ClientIP` over IPv6 through the agent, on the TC
/// path (keyed by the client's IPv6 address) and on socket-LB (keyed by
/// its network namespace): added to the manifest while the client
/// connects, it keeps every new connection on one backend.
#[test]
fn client_ip_affinity_keeps_ipv6_connections_on_one_backend() {
    require_root("agent e2e");
    let topo = Topology::build(&standard_pods()).expect("building the topology");
    let mut servers = Vec::new();
    let (mut v4, mut v6) = (Vec::new(), Vec::new());
    for role in ["server-a", "server-b"] {
        let pod = topo.pod(role);
        let address6 = pod.address6.expect("the topology is dual-stack");
        for address in [IpAddr::from(pod.address), IpAddr::from(address6)] {
            servers.push(workload::tcp_server(&pod.namespace, address, TARGET, role).unwrap());
        }
        v4.push(pod.address);
        v6.push(address6);
    }
    let plain = dual_stack_manifest(&v4, &v6);
    let sticky = plain.replacen(
        "  ports:\n",
        "  sessionAffinity: ClientIP\n  sessionAffinityConfig: {clientIP: {timeoutSeconds: 3600}}\n  ports:\n",
        1,
    );
    let client = topo.pod("client").namespace.path().to_owned();
    let target = SocketAddr::new(VIP6.into(), 80);
    let cgroup = Cgroup::create(&format!("{}-aff6", topo.prefix)).unwrap();
    for path in ["TC", "socket-LB"] {
        let in_cgroup = (path == "socket-LB").then(|| cgroup.path());
        let servers_answering = |n| {
            let results =
                workload::probe_process(&client, in_cgroup, ProbeKind::Tcp, target, n).unwrap();
            spread(&format!("{path}: TCP to {target}"), results, target)
        };
        // Declared in this order so that a failure drops the agent first,
        // then its manifests and pins.
        let (_pins, _dir, file, agent) = if path == "TC" {
            let TcPathAgent {
                agent,
                manifest,
                _dir,
                _pins,
            } = tc_path_agent(&topo, &plain);
            (_pins, _dir, manifest, agent)
        } else {
            let pins = PinDir(PathBuf::from(format!("/sys/fs/bpf/{}-s", topo.prefix)));
            let dir = tempdir(&format!("{}-s", topo.prefix));
            let file = dir.join("dual.yaml");
            write_atomically(&file, &plain);
            let no_pod = format!("{}-no-such-pod", topo.prefix);
            let cgroup_arg = cgroup.path().to_str().unwrap();
            let agent = Agent::start_with(
                &pins.0,
                &dir,
                &no_pod,
                &["--cgroup", cgroup_arg, "--ipv6", "on"],
            );
            (pins, dir, file, agent)
        };
        wait_until(&format!("{path}: both servers answer"), || {
            servers_answering(20).len() == 2
        });
        write_atomically(&file, &sticky);
        wait_until(&format!("{path}: one server answers"), || {
            servers_answering(10).len() == 1
        });
        let kept = servers_answering(20);
        assert_eq!(kept.len(), 1, "{path}: {kept:?}");
        agent.stop();
    }
    drop(servers);
}
