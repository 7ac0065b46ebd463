//! North-south through the agent: a client outside the cluster (a
//! namespace on the wire, no node and no pod) reaches a NodePort service
//! at node1's address and a load-balancer IP routed to node1, whose
//! uplink (node1's end of the wire) runs the uplink program the agent
//! attached. A backend on node1 (server-a) gets the flow by its MAC with
//! the client's address kept; one on node2 (server-b) gets it SNATed to
//! node1. Policies and endpoints change by editing the manifest under
//! traffic, as an operator would.

mod common;

use std::{
    collections::BTreeSet,
    net::{Ipv4Addr, SocketAddrV4},
    path::{Path, PathBuf},
    process::Stdio,
};

use common::agent_lab::{
    Agent, PinDir, TIMEOUT, datapath_event, tempdir, wait_until, write_atomically,
};
use lab::{
    Namespace, Topology, standard_pods,
    topology::NODE_ADDRESSES,
    workload::{self, Conversation},
};

const NODE_PORT: u16 = 30080;
const UDP_NODE_PORT: u16 = 30053;
/// The health-check nodePort (served under `externalTrafficPolicy:
/// Local`).
const HEALTH_CHECK_PORT: u16 = 32000;
const TARGET: u16 = 8080;
const UDP_TARGET: u16 = 5353;
/// The client outside the cluster.
const OUTSIDE: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 200);
/// A load-balancer IP the client's route sends to node1.
const LOAD_BALANCER: Ipv4Addr = Ipv4Addr::new(10, 99, 0, 7);

fn node1() -> Ipv4Addr {
    NODE_ADDRESSES[0]
}

/// The `shop` service: NodePort (TCP 80 → 8080 at 30080, UDP 53 → 5353
/// at 30053), a load-balancer IP, `externalTrafficPolicy: policy`, over
/// `endpoints` (address, node).
fn manifest(policy: &str, endpoints: &[(Ipv4Addr, &str)]) -> String {
    let mut text = format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: shop, namespace: e2e}}\nspec:\n  type: LoadBalancer\n  clusterIP: 10.96.7.8\n  externalTrafficPolicy: {policy}\n  healthCheckNodePort: {HEALTH_CHECK_PORT}\n  ports:\n  - {{name: http, port: 80, targetPort: {TARGET}, nodePort: {NODE_PORT}}}\n  - {{name: dns, port: 53, protocol: UDP, targetPort: {UDP_TARGET}, nodePort: {UDP_NODE_PORT}}}\nstatus:\n  loadBalancer:\n    ingress: [{{ip: {LOAD_BALANCER}}}]\n---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: shop-1\n  namespace: e2e\n  labels: {{kubernetes.io/service-name: shop}}\naddressType: IPv4\nports:\n- {{name: http, port: {TARGET}}}\n- {{name: dns, port: {UDP_TARGET}, protocol: UDP}}\nendpoints:\n"
    );
    for (address, node) in endpoints {
        text += &format!(
            "- addresses: [{address}]\n  nodeName: {node}\n  conditions: {{ready: true}}\n"
        );
    }
    text
}

struct Lab {
    topo: Topology,
    outside: Namespace,
    pins: PinDir,
    dir: common::agent_lab::ManifestDir,
    _servers: Vec<workload::Server>,
}

impl Lab {
    fn new() -> Self {
        common::require_root("agent_north_south");
        let mut topo = Topology::build(&standard_pods()).expect("building the topology");
        // node2's end of the wire takes what node1's uplink program sends
        // back out (XDP_TX), as a NIC's wire would.
        topo.receive_xdp_tx(1)
            .expect("XDP on node2's end of the wire");
        // A Kubernetes node forwards; the kernel answers the uplink
        // program's route lookups only on an interface that does.
        topo.nodes[0]
            .sysctl("net.ipv4.ip_forward", "1")
            .expect("forwarding on node1");
        let outside = topo
            .add_outside_client(1, OUTSIDE)
            .expect("the outside client");
        topo.route_to_node(&outside, LOAD_BALANCER, 0)
            .expect("the load-balancer IP's route");
        let mut servers = Vec::new();
        for role in ["server-a", "server-b"] {
            let pod = topo.pod(role);
            servers.push(
                workload::tcp_server_telling_peer(&pod.namespace, pod.address, TARGET, role)
                    .unwrap(),
            );
            servers.push(
                workload::udp_server_telling_peer(&pod.namespace, pod.address, UDP_TARGET, role)
                    .unwrap(),
            );
        }
        let pins = PinDir(PathBuf::from(format!("/sys/fs/bpf/{}", topo.prefix)));
        let dir = tempdir(&topo.prefix);
        Self {
            topo,
            outside,
            pins,
            dir,
            _servers: servers,
        }
    }

    fn address(&self, role: &str) -> Ipv4Addr {
        self.topo.pod(role).address
    }

    fn write(&self, policy: &str, roles: &[(&str, &str)]) {
        let endpoints: Vec<(Ipv4Addr, &str)> = roles
            .iter()
            .map(|(role, node)| (self.address(role), *node))
            .collect();
        write_atomically(&self.dir.join("shop.yaml"), &manifest(policy, &endpoints));
    }

    /// The agent of node1: its uplink is node1's end of the wire; it
    /// attaches the TC pair to the servers (a local backend's replies are
    /// turned back there).
    fn agent(&self) -> Agent {
        let netns = format!("/run/netns/{}-node1", self.topo.prefix);
        let node_ip = node1().to_string();
        Agent::spawn(
            &self.pins.0,
            &self.dir,
            &format!("{}-server-*", self.topo.prefix),
            &[
                "--no-socket-lb",
                "--uplink",
                "wire",
                "--uplink-netns",
                &netns,
                "--node-ip",
                &node_ip,
                "--node-name",
                "node-1",
            ],
            Stdio::inherit(),
        )
    }

    /// One TCP request from outside on a new connection to `target`:
    /// the answering server and the client address it saw.
    fn ask(&self, target: SocketAddrV4) -> std::io::Result<String> {
        self.outside
            .run(|| workload::tcp_request(target, TIMEOUT))
            .unwrap()
            .map(|a| a.server)
    }

    /// One UDP request from outside; the answer must come from `target`
    /// itself (an untranslated reply would come from the backend).
    fn ask_udp(&self, target: SocketAddrV4) -> std::io::Result<String> {
        let answer = self
            .outside
            .run(|| workload::udp_request(target, TIMEOUT))
            .unwrap()?;
        assert_eq!(answer.peer, target.into(), "the reply's source");
        Ok(answer.server)
    }

    /// What `tries` new connections (each from its own port, so Maglev
    /// spreads them) were answered with.
    fn answers(&self, target: SocketAddrV4, tries: usize) -> BTreeSet<String> {
        (0..tries)
            .map(|i| {
                self.ask(target)
                    .unwrap_or_else(|e| panic!("request {i} to {target}: {e}"))
            })
            .collect()
    }
}

/// A load balancer's HTTP probe of node1 at `port` and `path`: the
/// status line, the head and the JSON body.
fn probe(lab: &Lab, port: u16, path: &str) -> std::io::Result<(String, String, serde_json::Value)> {
    use std::io::{Read, Write};
    let target = SocketAddrV4::new(node1(), port);
    let response = lab
        .outside
        .run(|| {
            let mut stream = std::net::TcpStream::connect_timeout(&target.into(), TIMEOUT)?;
            stream.set_read_timeout(Some(TIMEOUT))?;
            write!(stream, "GET {path} HTTP/1.1\r\nHost: lb\r\n\r\n")?;
            let mut response = String::new();
            stream.read_to_string(&mut response)?;
            Ok::<_, std::io::Error>(response)
        })
        .unwrap()?;
    let (head, body) = response.split_once("\r\n\r\n").unwrap_or((&response, ""));
    Ok((
        head.lines().next().unwrap_or_default().to_owned(),
        head.to_owned(),
        serde_json::from_str(body).unwrap_or_default(),
    ))
}

/// The service's health-check nodePort on node1: status line and body.
fn health_check(lab: &Lab) -> std::io::Result<(String, serde_json::Value)> {
    let (status, head, body) = probe(lab, HEALTH_CHECK_PORT, "/")?;
    assert!(
        head.contains("X-Load-Balancing-Endpoint-Weight:"),
        "kube-proxy's header: {head}"
    );
    Ok((status, body))
}

/// kube-proxy's node health endpoint of node1 (`:10256/healthz`), as a
/// load balancer of a `Cluster` service probes it.
fn node_health(lab: &Lab) -> std::io::Result<(String, serde_json::Value)> {
    let (status, _, body) = probe(lab, 10256, "/healthz")?;
    Ok((status, body))
}

/// What a backend says when the flow came from outside: by MAC, the
/// client's own address; SNATed, node1's.
fn local(role: &str) -> String {
    format!("{role} {OUTSIDE}")
}

fn snated(role: &str) -> String {
    format!("{role} {}", node1())
}

fn pinned_uplink(pins: &Path) -> bool {
    pins.join(datapath_user::loader::XDP_LINKS)
        .read_dir()
        .is_ok_and(|mut d| d.next().is_some())
}

#[test]
fn from_outside_a_node_port_and_a_load_balancer_ip_reach_local_and_remote_backends() {
    let lab = Lab::new();
    lab.write("Cluster", &[("server-a", "node-1"), ("server-b", "node-2")]);
    let agent = lab.agent();
    assert!(
        pinned_uplink(&lab.pins.0),
        "the uplink program's link is pinned"
    );
    let node_port = SocketAddrV4::new(node1(), NODE_PORT);
    let both: BTreeSet<String> = [local("server-a"), snated("server-b")].into();
    // Until the agent's first scans: the local pod known, the remote
    // one's neighbour resolved.
    wait_until("both backends answer from outside", || {
        (0..10)
            .filter_map(|_| lab.ask(node_port).ok())
            .collect::<BTreeSet<_>>()
            == both
    });
    assert_eq!(lab.answers(node_port, 40), both, "TCP to nodeIP:nodePort");
    assert_eq!(
        lab.answers(SocketAddrV4::new(LOAD_BALANCER, 80), 40),
        both,
        "TCP to the load-balancer IP"
    );
    let udp: BTreeSet<String> = (0..40)
        .map(|_| {
            lab.ask_udp(SocketAddrV4::new(node1(), UDP_NODE_PORT))
                .unwrap()
        })
        .collect();
    assert_eq!(udp, both, "UDP to nodeIP:nodePort");
    let (status, body) = node_health(&lab).expect("the node health endpoint answers");
    assert_eq!(
        (status.as_str(), &body["nodeEligible"]),
        ("HTTP/1.1 200 OK", &serde_json::Value::Bool(true)),
        "{body}"
    );
    // `service list` shows which frontends are served from outside, and
    // over what: the nodePort and load-balancer frontends share a table.
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_underpass"))
        .args(["service", "list", "-o", "json", "--pin-dir"])
        .arg(&lab.pins.0)
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let rows: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    let outside = |frontend: String| -> serde_json::Value {
        rows.as_array()
            .unwrap()
            .iter()
            .find(|r| r["frontend"] == frontend)
            .unwrap_or_else(|| panic!("no {frontend} in {rows}"))["outside"]
            .clone()
    };
    let node_port_row = outside(format!("{}:{NODE_PORT}/TCP", node1()));
    assert_eq!(
        node_port_row["backends"],
        serde_json::json!([
            format!("{}:{TARGET}", lab.address("server-a")),
            format!("{}:{TARGET}", lab.address("server-b"))
        ]),
        "{node_port_row}"
    );
    assert_eq!(
        outside(format!("{LOAD_BALANCER}:80/TCP"))["maglev_table"],
        node_port_row["maglev_table"],
        "one table for the service port"
    );
    assert!(
        outside("10.96.7.8:80/TCP".into()).is_null(),
        "a ClusterIP is not"
    );
    let metrics = agent.get("/metrics").unwrap();
    assert!(
        datapath_event(&metrics, "north_south_translated") >= 240,
        "{metrics}"
    );
    assert!(datapath_event(&metrics, "north_south_reverse_translated") > 0);

    // externalTrafficPolicy: Local — the local endpoint only, the
    // client's address kept; changed under the agent.
    lab.write("Local", &[("server-a", "node-1"), ("server-b", "node-2")]);
    wait_until("only the local endpoint answers", || {
        lab.answers(node_port, 10) == [local("server-a")].into()
    });
    assert_eq!(lab.answers(node_port, 30), [local("server-a")].into());
    let (status, body) = health_check(&lab).expect("the health-check nodePort answers");
    assert_eq!(status, "HTTP/1.1 200 OK");
    assert_eq!(body["localEndpoints"], 1, "{body}");
    assert_eq!(
        (&body["service"]["namespace"], &body["service"]["name"]),
        (&"e2e".into(), &"shop".into())
    );
    // No local endpoint: node1 does not serve it from outside; its stack
    // has no listener there (a load balancer's health check steers away).
    lab.write("Local", &[("server-b", "node-2")]);
    wait_until("node1 refuses the node port", || {
        lab.ask(node_port)
            .is_err_and(|e| e.kind() == std::io::ErrorKind::ConnectionRefused)
    });
    let (status, body) = health_check(&lab).expect("the health-check nodePort answers");
    assert_eq!(status, "HTTP/1.1 503 Service Unavailable", "{body}");
    assert_eq!(body["localEndpoints"], 0);
    // And back: Cluster again, both (refused until the agent has it).
    lab.write("Cluster", &[("server-a", "node-1"), ("server-b", "node-2")]);
    wait_until("both answer again", || {
        (0..20)
            .filter_map(|_| lab.ask(node_port).ok())
            .collect::<BTreeSet<_>>()
            == both
    });
    let metrics = agent.get("/metrics").unwrap();
    assert!(
        datapath_event(&metrics, "north_south_passed") > 0,
        "the refused connections went to the stack"
    );
    // Cluster: every node serves it; no health check to answer.
    wait_until("the health-check nodePort is closed", || {
        health_check(&lab).is_err_and(|e| e.kind() == std::io::ErrorKind::ConnectionRefused)
    });
    drop(agent);
}

#[test]
fn an_agent_restart_under_node_port_traffic_loses_no_connection() {
    let lab = Lab::new();
    lab.write("Cluster", &[("server-a", "node-1"), ("server-b", "node-2")]);
    let agent = lab.agent();
    let node_port = SocketAddrV4::new(node1(), NODE_PORT);
    wait_until("the node port answers from outside", || {
        lab.ask(node_port).is_ok()
    });
    // Long-lived connections to each backend (new ones until Maglev has
    // put one on each).
    let mut conversations: Vec<(String, Conversation)> = Vec::new();
    for _ in 0..64 {
        let mut c = lab
            .outside
            .run(|| Conversation::open(node_port, TIMEOUT))
            .unwrap()
            .unwrap();
        let answer = c.ask().unwrap();
        if conversations.iter().all(|(a, _)| *a != answer) {
            conversations.push((answer, c));
        }
        if conversations.len() == 2 {
            break;
        }
    }
    assert_eq!(conversations.len(), 2, "one conversation on each backend");
    agent.stop();
    // No agent: the pinned link and maps keep serving.
    for (answer, c) in &mut conversations {
        assert_eq!(c.ask().unwrap(), *answer, "while no agent runs");
    }
    let agent = lab.agent();
    for (answer, c) in &mut conversations {
        assert_eq!(c.ask().unwrap(), *answer, "after the restart");
    }
    assert_eq!(
        lab.answers(node_port, 30),
        [local("server-a"), snated("server-b")].into(),
        "new connections too"
    );
    drop(agent);
}

/// The route exception (`ip route get`'s `mtu N`) the pod's kernel keeps
/// for `destination` after a "fragmentation needed", if any.
fn learned_path_mtu(pod: &Namespace, destination: Ipv4Addr) -> Option<u32> {
    let out = std::process::Command::new("ip")
        .args(["-n", pod.name(), "route", "get"])
        .arg(destination.to_string())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let mut words = text.split_whitespace();
    while let Some(word) = words.next() {
        if word == "mtu" {
            return words.next().and_then(|n| n.parse().ok());
        }
    }
    None
}

/// Sends the ICMP message `icmp` (header and quote) from the calling
/// thread's namespace to `destination`, as a router would (a raw socket:
/// the kernel adds the IP header).
fn send_icmp(destination: Ipv4Addr, icmp: &[u8]) -> std::io::Result<()> {
    use std::os::fd::{FromRawFd, OwnedFd};
    // SAFETY: plain socket calls; the fd is owned (closed on drop) and
    // the address and buffer outlive the call.
    unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_RAW, libc::IPPROTO_ICMP);
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        let _socket = OwnedFd::from_raw_fd(fd);
        let address = libc::sockaddr_in {
            sin_family: libc::AF_INET as libc::sa_family_t,
            sin_port: 0,
            sin_addr: libc::in_addr {
                s_addr: u32::from_ne_bytes(destination.octets()),
            },
            sin_zero: [0; 8],
        };
        let sent = libc::sendto(
            fd,
            icmp.as_ptr().cast(),
            icmp.len(),
            0,
            (&raw const address).cast(),
            size_of::<libc::sockaddr_in>() as libc::socklen_t,
        );
        if sent < 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}

/// Path-MTU discovery from outside: a router's "fragmentation needed"
/// about a reply the pod sent from the nodePort (addressed, as routers
/// do, to the reply's source: node1's address) reaches the pod's own
/// socket, whose kernel then keeps the smaller MTU for the client. The
/// outside client plays the router (a raw socket); the pod's UDP socket
/// is real. Untranslated, the error would reach node1's stack, which has
/// no such socket, and the pod would go on sending what cannot pass.
#[test]
fn a_routers_fragmentation_needed_reaches_the_pod_behind_a_node_port() {
    let lab = Lab::new();
    lab.write("Local", &[("server-a", "node-1")]);
    let _agent = lab.agent();
    let node_port = SocketAddrV4::new(node1(), UDP_NODE_PORT);
    wait_until("the pod answers UDP from outside", || {
        lab.ask_udp(node_port).is_ok()
    });
    let pod = &lab.topo.pod("server-a").namespace;
    assert_eq!(learned_path_mtu(pod, OUTSIDE), None, "no MTU learned yet");
    lab.outside
        .run(|| {
            let socket = std::net::UdpSocket::bind("0.0.0.0:0")?;
            socket.set_read_timeout(Some(TIMEOUT))?;
            socket.connect(node_port)?;
            socket.send(b"hello")?;
            let mut answer = [0u8; 64];
            socket.recv(&mut answer)?;
            // The reply as it reached us, and as the router quotes it:
            // the IP header and eight bytes of UDP.
            let client = socket.local_addr()?.port();
            let reply = lab::packet::Frame::udp((node1(), UDP_NODE_PORT), (OUTSIDE, client))
                .with_payload(&[0; 64])
                .build();
            let error =
                lab::packet::icmp_error(OUTSIDE, node1(), 3, 4, 1280, &reply[14..14 + 28]).build();
            send_icmp(node1(), &error[14 + 20..])
        })
        .unwrap()
        .expect("sending the router's error");
    wait_until("the pod learned the path MTU", || {
        learned_path_mtu(pod, OUTSIDE) == Some(1280)
    });
}
