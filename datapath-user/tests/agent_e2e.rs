//! The agent end to end, as a separate process in `--from-dir` mode, in
//! namespaces this suite creates: a pod appearing in the netns directory
//! gets the TC pair, a manifest edit moves new connections, and an agent
//! restart in the middle of a stream of requests and one long-lived
//! connection loses none of them.

mod common;

use std::{
    io::Write,
    net::{Ipv4Addr, SocketAddrV4},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use common::{agent_lab::*, require_root};
use datapath_user::attach::pinned_tc_links;
use lab::{
    Cgroup, PodSpec, Topology, standard_pods,
    workload::{self, Answer, Conversation, HeldProbe, ProbeKind, ProbeResult},
};

#[test]
fn agent_attaches_follows_manifests_and_restarts_without_loss() {
    require_root("agent e2e");
    // Servers first; the client pod appears once the agent runs.
    let servers_only: Vec<PodSpec> = standard_pods()
        .into_iter()
        .filter(|p| p.role != "client")
        .collect();
    let mut topo = Topology::build(&servers_only).expect("building the topology");
    let mut servers = Vec::new();
    for role in ["server-a", "server-b", "server-c"] {
        let pod = topo.pod(role);
        servers.push(workload::tcp_server(&pod.namespace, pod.address, TARGET, role).unwrap());
    }
    let pins = PinDir(PathBuf::from(format!("/sys/fs/bpf/{}", topo.prefix)));
    let dir = tempdir(&topo.prefix);
    let file = dir.join("echo.yaml");
    write_atomically(&file, &manifest(&[topo.pod("server-a").address]));

    let filter = format!("{}-client*", topo.prefix);
    let agent = Agent::start(&pins.0, &dir, &filter);

    // A pod appears: the agent attaches to its macvlan.
    let client_spec = standard_pods()
        .into_iter()
        .find(|p| p.role == "client")
        .unwrap();
    let client_netns = topo
        .add_pod(&client_spec)
        .unwrap()
        .namespace
        .name()
        .to_owned();
    wait_until("the client's eth0 is attached", || {
        pinned_tc_links(&pins.0).contains(&(client_netns.clone(), "eth0".into()))
    });
    let attached = pinned_tc_links(&pins.0);
    assert_eq!(attached.len(), 1, "servers are not selected: {attached:?}");
    for _ in 0..5 {
        let answer = ask_service(&topo);
        if answer.is_err() {
            let ns = topo.pod("client").namespace.name().to_owned();
            for args in [
                vec!["-n", &ns, "route"],
                vec!["-n", &ns, "-d", "link"],
                vec!["-n", &ns, "addr"],
            ] {
                let out = Command::new("ip").args(&args).output().unwrap();
                eprintln!("ip {args:?}:\n{}", String::from_utf8_lossy(&out.stdout));
            }
        }
        assert_eq!(answer.unwrap(), "server-a");
    }

    // A manifest edit moves new connections.
    write_atomically(&file, &manifest(&[topo.pod("server-b").address]));
    wait_until("new connections reach server-b", || {
        ask_service(&topo).is_ok_and(|s| s == "server-b")
    });

    // A broken edit changes nothing: the last good content stays.
    std::fs::write(&file, "apiVersion: v1\nkind: Service\nspec: [\n").unwrap();
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(ask_service(&topo).unwrap(), "server-b");
    write_atomically(&file, &manifest(&[topo.pod("server-b").address]));

    // Restart in the middle of traffic: a long-lived connection and a
    // stream of short ones.
    let mut long_lived = topo
        .pod("client")
        .namespace
        .run(|| Conversation::open(SocketAddrV4::new(VIP, 80), TIMEOUT))
        .unwrap()
        .unwrap();
    assert_eq!(long_lived.ask().unwrap(), "server-b");
    let stop = Arc::new(AtomicBool::new(false));
    let (answered, failed) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let failures = Arc::new(std::sync::Mutex::new(Vec::new()));
    let stream = {
        let (stop, answered, failed, failures) = (
            stop.clone(),
            answered.clone(),
            failed.clone(),
            failures.clone(),
        );
        let client = topo.pod("client").namespace.path().to_owned();
        std::thread::spawn(move || {
            datapath_user::netns::enter(&client).unwrap();
            while !stop.load(Ordering::Relaxed) {
                match workload::tcp_request(SocketAddrV4::new(VIP, 80), TIMEOUT) {
                    Ok(a) if a.server == "server-b" => answered.fetch_add(1, Ordering::Relaxed),
                    Ok(a) => {
                        failures
                            .lock()
                            .unwrap()
                            .push(format!("answered by {}", a.server));
                        failed.fetch_add(1, Ordering::Relaxed)
                    }
                    Err(e) => {
                        failures.lock().unwrap().push(e.to_string());
                        failed.fetch_add(1, Ordering::Relaxed)
                    }
                };
                std::thread::sleep(Duration::from_millis(5));
            }
        })
    };
    std::thread::sleep(Duration::from_millis(300));
    let pinned = datapath_user::maps::DatapathMaps::open_pinned(&pins.0).unwrap();
    assert!(
        pinned.reply_filter_complete().unwrap(),
        "the agent trusts its reply filter once its programs run on every pod"
    );
    drop(pinned);
    agent.stop();
    // No agent at all for a while: the pinned datapath serves alone.
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(long_lived.ask().unwrap(), "server-b");
    // As an upgrade from a build without the reply filter finds it: the
    // next agent makes a new, empty one, and must flag the peers of the
    // flows in conntrack before trusting it.
    std::fs::remove_file(pins.0.join(datapath_common::maps::REPLY_FILTER_MAP)).unwrap();
    let agent = Agent::start(&pins.0, &dir, &filter);
    std::thread::sleep(Duration::from_millis(500));
    stop.store(true, Ordering::Relaxed);
    stream.join().unwrap();
    assert_eq!(
        long_lived.ask().unwrap(),
        "server-b",
        "the long-lived connection survives on its backend"
    );
    let (answered, failed) = (
        answered.load(Ordering::Relaxed),
        failed.load(Ordering::Relaxed),
    );
    assert!(
        answered > 50,
        "only {answered} requests ran across the restart"
    );
    assert_eq!(
        failed,
        0,
        "lost across the restart: {:?}",
        failures.lock().unwrap()
    );
    eprintln!("restart: {answered} requests answered, none lost");

    let trusted = || {
        datapath_user::maps::DatapathMaps::open_pinned(&pins.0)
            .is_ok_and(|m| m.reply_filter_complete().unwrap())
    };
    wait_until("the restarted agent trusts its new reply filter", trusted);
    assert_eq!(
        long_lived.ask().unwrap(),
        "server-b",
        "the long-lived connection's replies are still translated"
    );

    // A downgrade and an upgrade again leave a trusted filter without the
    // flags of the flows the older build opened: the next agent must not
    // trust it before it has flagged the peers of the flows in conntrack.
    // No packet flows meanwhile: only the flows in conntrack (the idle
    // long-lived connection, the stream's closing ones) can flag
    // server-b, through the agent's walk.
    agent.stop();
    let server_b_bucket = datapath_common::lb::service_filter_index(
        datapath_common::ipv4_be(topo.pod("server-b").address.octets()),
        datapath_common::port_be(TARGET),
        datapath_common::IPPROTO_TCP,
    );
    {
        let mut pinned = datapath_user::maps::DatapathMaps::open_pinned(&pins.0).unwrap();
        pinned.reply_filter.set(server_b_bucket, 0, 0).unwrap();
        assert!(pinned.reply_filter_complete().unwrap());
    }
    let agent = Agent::start(&pins.0, &dir, &filter);
    // Its gauge starts at 0 and turns 1 only after its walk.
    wait_until("the next agent trusts the filter again", || {
        agent
            .get("/metrics")
            .is_some_and(|m| m.contains("underpass_reply_filter_trusted 1\n"))
    });
    assert!(trusted());
    let pinned = datapath_user::maps::DatapathMaps::open_pinned(&pins.0).unwrap();
    assert_eq!(
        pinned.reply_filter.get(&server_b_bucket, 0).unwrap(),
        1,
        "flagged from conntrack before any packet of the idle connection"
    );
    drop(pinned);
    assert_eq!(long_lived.ask().unwrap(), "server-b");

    // The restarted agent adopted the state: the metrics agree.
    let metrics = agent.get("/metrics").unwrap();
    assert!(metrics.contains("underpass_frontends 1\n"), "{metrics}");
    assert!(
        metrics.contains("underpass_reply_filter_trusted 1\n"),
        "{metrics}"
    );
    assert!(
        metrics.contains("underpass_attached_interfaces 1\n"),
        "{metrics}"
    );

    // The CLI reads the same state from the pins.
    let cli = |args: &[&str]| -> serde_json::Value {
        let output = Command::new(env!("CARGO_BIN_EXE_underpass"))
            .args(args)
            .arg("--pin-dir")
            .arg(&pins.0)
            .args(["-o", "json"])
            .output()
            .unwrap();
        assert!(
            output.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        serde_json::from_slice(&output.stdout).unwrap()
    };
    let services = cli(&["service", "list"]);
    assert_eq!(services[0]["frontend"], format!("{VIP}:80/TCP"));
    assert_eq!(
        services[0]["backends"][0],
        format!("{}:{TARGET}", topo.pod("server-b").address)
    );
    let backends = cli(&["backend", "list"]);
    assert_eq!(
        backends.as_array().unwrap().len(),
        1,
        "server-a's backend was deleted"
    );
    let flows = cli(&["conntrack", "list"]);
    assert!(
        flows
            .as_array()
            .unwrap()
            .iter()
            .any(|f| f["service"] == format!("{VIP}:80")),
        "{flows}"
    );
    let status = cli(&["status"]);
    assert_eq!(status["attached"][0], format!("{client_netns}/eth0"));
    assert!(status["counters"]["conntrack_miss"].as_u64().unwrap() > 0);

    // The pod goes away: its pins are removed.
    let client = topo.pods.iter().position(|p| p.role == "client").unwrap();
    drop(topo.pods.remove(client));
    wait_until("the deleted pod's pins are removed", || {
        pinned_tc_links(&pins.0).is_empty()
    });
    agent.stop();
    drop(servers);
    let _ = std::fs::remove_dir_all(&dir);
}

/// Runs `underpass cni` as a runtime would; returns (exit code, stdout).
fn cni(pin_dir: &Path, command: &str, netns: &Path, stdin: &str) -> (i32, serde_json::Value) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_underpass"))
        .arg("cni")
        .env("UNDERPASS_PIN_DIR", pin_dir)
        .env("CNI_COMMAND", command)
        .env("CNI_CONTAINERID", "c0ffee")
        .env("CNI_NETNS", netns)
        .env("CNI_IFNAME", "eth0")
        .env("CNI_PATH", "/opt/cni/bin")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(stdin.as_bytes())
        .unwrap();
    let output = child.wait_with_output().unwrap();
    let text = String::from_utf8(output.stdout).unwrap();
    let json = if text.trim().is_empty() {
        serde_json::Value::Null
    } else {
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("{command}: {e}: {text}"))
    };
    (output.status.code().unwrap(), json)
}

#[test]
fn cni_chaining_attaches_passes_the_result_through_and_detaches() {
    require_root("CNI");
    let client: Vec<PodSpec> = standard_pods()
        .into_iter()
        .filter(|p| p.role == "client")
        .collect();
    let topo = Topology::build(&client).expect("building the topology");
    let pins = PinDir(PathBuf::from(format!("/sys/fs/bpf/{}", topo.prefix)));
    let pod = topo.pod("client");
    let netns = pod.namespace.path().to_owned();
    let previous = serde_json::json!({
        "cniVersion": "1.0.0",
        "interfaces": [{"name": "eth0", "mac": "02:77:00:00:02:00", "sandbox": netns}],
        "ips": [{"address": format!("{}/24", pod.address), "gateway": pod.gateway.to_string(), "interface": 0}]
    });
    let config = serde_json::json!({
        "cniVersion": "1.0.0", "name": "underlay", "type": "underpass", "prevResult": previous
    })
    .to_string();

    let (code, version) = cni(&pins.0, "VERSION", &netns, "");
    assert_eq!(code, 0);
    assert!(
        version["supportedVersions"]
            .as_array()
            .unwrap()
            .contains(&"1.0.0".into())
    );

    let (code, result) = cni(&pins.0, "ADD", &netns, &config);
    assert_eq!(code, 0, "{result}");
    assert_eq!(result, previous, "prevResult passes through unchanged");
    let key = (pod.namespace.name().to_owned(), "eth0".to_owned());
    assert!(pinned_tc_links(&pins.0).contains(&key));
    assert_eq!(cni(&pins.0, "CHECK", &netns, &config).0, 0);

    assert_eq!(cni(&pins.0, "DEL", &netns, &config).0, 0);
    assert!(pinned_tc_links(&pins.0).is_empty());
    assert_eq!(
        cni(&pins.0, "DEL", &netns, &config).0,
        0,
        "DEL is idempotent"
    );
    let (code, error) = cni(&pins.0, "CHECK", &netns, &config);
    assert_eq!((code, error["code"].as_u64()), (1, Some(101)), "{error}");
    assert!(
        error["msg"]
            .as_str()
            .unwrap()
            .contains("not attached to eth0"),
        "{error}"
    );

    let (code, error) = cni(&pins.0, "ADD", &netns, "{not json");
    assert_eq!((code, error["code"].as_u64()), (1, Some(6)), "{error}");
    let (code, error) = cni(&pins.0, "ADD", &netns, r#"{"cniVersion": "9.9.9"}"#);
    assert_eq!((code, error["code"].as_u64()), (1, Some(1)), "{error}");
}

/// The `drain` Service: TCP 80 → 8080 and UDP 53 → 5353, one slice
/// listing `endpoints` with the given conditions (YAML flow maps).
fn answered(result: std::io::Result<ProbeResult>) -> String {
    match result.expect("the probe process answers") {
        ProbeResult::Answer(Answer { server, peer }) => {
            assert_eq!(
                peer,
                std::net::SocketAddr::from((VIP, 80)),
                "peer shows the ClusterIP"
            );
            server
        }
        ProbeResult::Failed { error, .. } => panic!("held socket-LB connection failed: {error}"),
    }
}

/// Rollouts and readiness flaps under live connections, through the agent:
/// an endpoint that turns terminating or not ready gets no new connection
/// but keeps the ones it has, on the TC path (this process, outside the
/// socket-LB cgroup) and through socket-LB (a probe process inside it);
/// once it leaves the slice its TC flow is re-balanced and fails fast. A
/// service left without endpoints refuses at once on the TC path, TCP and
/// UDP alike, as kube-proxy's REJECT does.
#[test]
fn draining_endpoints_keep_their_connections_and_an_empty_service_refuses_at_once() {
    require_root("agent e2e");
    let topo = Topology::build(&standard_pods()).expect("building the topology");
    let (a, b) = (topo.pod("server-a").address, topo.pod("server-b").address);
    let mut servers = Vec::new();
    for role in ["server-a", "server-b"] {
        let pod = topo.pod(role);
        servers.push(workload::tcp_server(&pod.namespace, pod.address, TARGET, role).unwrap());
    }
    let pins = PinDir(PathBuf::from(format!("/sys/fs/bpf/{}", topo.prefix)));
    let dir = tempdir(&topo.prefix);
    let file = dir.join("drain.yaml");
    let cgroup = Cgroup::create(&format!("{}-sock", topo.prefix)).unwrap();
    let ready = "{ready: true, serving: true, terminating: false}";
    write_atomically(&file, &drain_manifest(&[(a, ready)]));
    let filter = format!("{}-client*", topo.prefix);
    let cgroup_arg = cgroup.path().to_str().unwrap();
    let agent = Agent::start_with(&pins.0, &dir, &filter, &["--cgroup", cgroup_arg]);
    let client_ns = topo.pod("client").namespace.name().to_owned();
    wait_until("the client's eth0 is attached", || {
        pinned_tc_links(&pins.0).contains(&(client_ns.clone(), "eth0".into()))
    });

    let client_path = topo.pod("client").namespace.path().to_owned();
    let target = SocketAddrV4::new(VIP, 80);
    let mut on_tc = topo
        .pod("client")
        .namespace
        .run(|| Conversation::open(target, TIMEOUT))
        .unwrap()
        .unwrap();
    assert_eq!(on_tc.ask().unwrap(), "server-a");
    let mut on_socket_lb =
        HeldProbe::spawn(&client_path, Some(cgroup.path()), ProbeKind::Tcp, target).unwrap();
    assert_eq!(answered(on_socket_lb.ask()), "server-a");
    let new_socket_lb = || -> Vec<String> {
        workload::probe_process(
            &client_path,
            Some(cgroup.path()),
            ProbeKind::Tcp,
            target,
            10,
        )
        .unwrap()
        .into_iter()
        .map(|r| answered(Ok(r)))
        .collect()
    };

    // Rollout: server-a terminating (still serving), server-b ready; then
    // a readiness flap: server-a not ready at all.
    for conditions in [
        "{ready: false, serving: true, terminating: true}",
        "{ready: false, serving: false, terminating: false}",
    ] {
        write_atomically(&file, &drain_manifest(&[(a, conditions), (b, ready)]));
        wait_until("new connections go to server-b only", || {
            (0..5).all(|_| ask_service(&topo).is_ok_and(|s| s == "server-b"))
        });
        for _ in 0..10 {
            assert_eq!(
                ask_service(&topo).unwrap(),
                "server-b",
                "{conditions}: new TC flow"
            );
        }
        assert!(
            new_socket_lb().iter().all(|s| s == "server-b"),
            "{conditions}: new socket-LB connections"
        );
        for _ in 0..5 {
            assert_eq!(
                on_tc.ask().unwrap(),
                "server-a",
                "{conditions}: the TC flow drains"
            );
            assert_eq!(
                answered(on_socket_lb.ask()),
                "server-a",
                "{conditions}: the socket-LB connection drains"
            );
        }
    }

    // Gone from the slice: the TC flow is re-balanced; server-b knows no
    // such connection and resets it, so the client fails fast.
    write_atomically(&file, &drain_manifest(&[(b, ready)]));
    wait_until("the removed endpoint's TC flow fails", || {
        match on_tc.ask() {
            Ok(server) => {
                assert_eq!(server, "server-a", "a moved flow must not be answered");
                false
            }
            Err(_) => true,
        }
    });

    // No endpoint at all: refused at once, TCP and UDP, on the TC path.
    write_atomically(&file, &drain_manifest(&[]));
    wait_until("connections to the empty service are refused", || {
        ask_service(&topo).is_err_and(|e| e.raw_os_error() == Some(libc::ECONNREFUSED))
    });
    let client = &topo.pod("client").namespace;
    for (what, request) in [
        (
            "TCP",
            workload::tcp_request as fn(SocketAddrV4, Duration) -> std::io::Result<Answer>,
        ),
        ("connected UDP", workload::connected_udp_request),
    ] {
        let port = if what == "TCP" { 80 } else { 53 };
        let started = Instant::now();
        let error = client
            .run(|| request(SocketAddrV4::new(VIP, port), Duration::from_secs(5)))
            .unwrap()
            .expect_err("an empty service answers nothing");
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
    let metrics = agent.get("/metrics").unwrap();
    let refused = datapath_event(&metrics, "no_backend");
    assert!(refused >= 3, "{refused} refusals counted");
    drop(on_socket_lb);
    agent.stop();
    drop(servers);
    let _ = std::fs::remove_dir_all(&dir);
}

/// AF_INET6 sockets that reach an IPv4 ClusterIP through its IPv4-mapped
/// address (`::ffff:<ClusterIP>`, what JVMs do) are translated by
/// socket-LB: TCP, unconnected and connected UDP, each spread over the
/// backends, with the peer shown as the mapped ClusterIP. No TC program is
/// attached here (the agent's netns filter matches nothing), so only
/// socket-LB can make these answer.
#[test]
fn ipv4_mapped_ipv6_sockets_are_translated_by_socket_lb() {
    require_root("agent e2e");
    let topo = Topology::build(&standard_pods()).expect("building the topology");
    let mut servers = Vec::new();
    let mut endpoints = Vec::new();
    let ready = "{ready: true, serving: true, terminating: false}";
    for role in ["server-a", "server-b", "server-c"] {
        let pod = topo.pod(role);
        servers.push(workload::tcp_server(&pod.namespace, pod.address, TARGET, role).unwrap());
        servers.push(workload::udp_server(&pod.namespace, pod.address, 5353, role).unwrap());
        endpoints.push((pod.address, ready));
    }
    let pins = PinDir(PathBuf::from(format!("/sys/fs/bpf/{}", topo.prefix)));
    let dir = tempdir(&topo.prefix);
    write_atomically(&dir.join("drain.yaml"), &drain_manifest(&endpoints));
    let cgroup = Cgroup::create(&format!("{}-sock", topo.prefix)).unwrap();
    let no_pod = format!("{}-no-such-pod", topo.prefix);
    let cgroup_arg = cgroup.path().to_str().unwrap();
    let agent = Agent::start_with(&pins.0, &dir, &no_pod, &["--cgroup", cgroup_arg]);

    let client = topo.pod("client").namespace.path().to_owned();
    for (kind, port) in [
        (ProbeKind::Tcp, 80),
        (ProbeKind::Udp, 53),
        (ProbeKind::UdpConnected, 53),
    ] {
        let target = SocketAddrV4::new(VIP, port);
        let results = workload::probe_process_with(
            &client,
            Some(cgroup.path()),
            kind,
            target,
            30,
            &["--ipv4-mapped"],
        )
        .unwrap();
        let mut spread = std::collections::BTreeMap::new();
        for result in results {
            match result {
                ProbeResult::Answer(answer) => {
                    assert_eq!(
                        answer.peer,
                        workload::ipv4_mapped(target),
                        "{kind:?}: the peer is the mapped ClusterIP"
                    );
                    *spread.entry(answer.server).or_insert(0) += 1;
                }
                ProbeResult::Failed { error, .. } => panic!("{kind:?} over ::ffff:{VIP}: {error}"),
            }
        }
        assert!(spread.len() >= 2, "{kind:?}: {spread:?}");
    }
    assert!(pinned_tc_links(&pins.0).is_empty(), "no TC program in play");
    agent.stop();
    drop(servers);
    let _ = std::fs::remove_dir_all(&dir);
}

/// Datagrams larger than the path MTU (4,000 bytes over 1,500) cross the
/// ClusterIP on the TC path whole, both ways: every fragment is
/// translated, so the backend reassembles the request and the client the
/// answer.
#[test]
fn datagrams_larger_than_the_mtu_cross_the_cluster_ip_whole() {
    require_root("agent e2e");
    let topo = Topology::build(&standard_pods()).expect("building the topology");
    let pod = topo.pod("server-a");
    let ready = "{ready: true, serving: true, terminating: false}";
    let server = workload::udp_server(&pod.namespace, pod.address, 5353, "server-a").unwrap();
    let pins = PinDir(PathBuf::from(format!("/sys/fs/bpf/{}", topo.prefix)));
    let dir = tempdir(&topo.prefix);
    write_atomically(
        &dir.join("drain.yaml"),
        &drain_manifest(&[(pod.address, ready)]),
    );
    let filter = format!("{}-client*", topo.prefix);
    let agent = Agent::start(&pins.0, &dir, &filter);
    let client_ns = topo.pod("client").namespace.name().to_owned();
    wait_until("the client's eth0 is attached", || {
        pinned_tc_links(&pins.0).contains(&(client_ns.clone(), "eth0".into()))
    });
    let client = &topo.pod("client").namespace;
    for size in [4000, 9000, 20000] {
        let (answer, length) = client
            .run(|| workload::large_udp_request(SocketAddrV4::new(VIP, 53), size, TIMEOUT))
            .unwrap()
            .unwrap_or_else(|e| panic!("{size}-byte datagram: {e}"));
        assert_eq!(answer.server, "server-a");
        assert_eq!(answer.peer, std::net::SocketAddr::from((VIP, 53)));
        assert_eq!(length, size, "the answer arrives whole");
    }
    let metrics = agent.get("/metrics").unwrap();
    let translated = datapath_event(&metrics, "fragment_translated");
    assert!(
        translated >= 2 * (2 + 6 + 13),
        "{translated} fragments translated"
    );
    agent.stop();
    drop(server);
    let _ = std::fs::remove_dir_all(&dir);
}

/// Path-MTU discovery through a ClusterIP: the backend is behind a routed
/// hop whose route allows only 1,400 bytes. The router's "fragmentation
/// needed" quotes the DNATed segment; translated back to the ClusterIP it
/// reaches the client's socket, which lowers its segment size, and a 2 MB
/// transfer completes instead of black-holing.
#[test]
fn path_mtu_discovery_works_through_the_cluster_ip() {
    require_root("agent e2e");
    let topo = Topology::build(&standard_pods()).expect("building the topology");
    let pod = topo.pod("server-c");
    assert_ne!(
        pod.address.octets()[..3],
        topo.pod("client").address.octets()[..3],
        "server-c is routed"
    );
    let server = workload::tcp_server(&pod.namespace, pod.address, TARGET, "server-c").unwrap();
    // The routed hop: the gateway forwards to server-c's subnet with a
    // 1,400-byte route MTU (forwarding honours a route's MTU).
    let gateway = topo.gateway.name().to_owned();
    let narrow = Command::new("ip")
        .args([
            "-n",
            &gateway,
            "route",
            "replace",
            "10.78.0.0/24",
            "dev",
            "eth0",
        ])
        .args([
            "proto",
            "kernel",
            "scope",
            "link",
            "src",
            "10.78.0.254",
            "mtu",
            "1400",
        ])
        .status()
        .unwrap();
    assert!(narrow.success(), "narrowing the gateway's route");
    let pins = PinDir(PathBuf::from(format!("/sys/fs/bpf/{}", topo.prefix)));
    let dir = tempdir(&topo.prefix);
    let ready = "{ready: true, serving: true, terminating: false}";
    write_atomically(
        &dir.join("drain.yaml"),
        &drain_manifest(&[(pod.address, ready)]),
    );
    let filter = format!("{}-client*", topo.prefix);
    let agent = Agent::start(&pins.0, &dir, &filter);
    let client_ns = topo.pod("client").namespace.name().to_owned();
    wait_until("the client's eth0 is attached", || {
        pinned_tc_links(&pins.0).contains(&(client_ns.clone(), "eth0".into()))
    });
    let mut conversation = topo
        .pod("client")
        .namespace
        .run(|| Conversation::open(SocketAddrV4::new(VIP, 80), Duration::from_secs(10)))
        .unwrap()
        .unwrap();
    assert_eq!(conversation.ask().unwrap(), "server-c");
    assert_eq!(
        conversation
            .ask_large(2 << 20)
            .expect("a 2 MB transfer through the narrow hop"),
        "server-c"
    );
    let metrics = agent.get("/metrics").unwrap();
    let translated = datapath_event(&metrics, "icmp_error_translated");
    assert!(translated >= 1, "the router's error was translated");
    agent.stop();
    drop(server);
    let _ = std::fs::remove_dir_all(&dir);
}

/// A UDP socket that socket-LB connected to a backend moves off it once
/// the backend leaves the service: within a second the agent destroys it
/// (the application sees ECONNABORTED, connects again and reaches a live
/// backend). Sockets connected to the remaining backend, the same
/// backend's sockets of another service, and unconnected sockets are left
/// alone.
#[test]
fn connected_udp_sockets_leave_a_removed_backend() {
    require_root("agent e2e");
    if !common::kernel_has(
        datapath_user::features::SOCK_DESTROY,
        datapath_user::probe::kernel().sock_destroy,
    ) {
        return;
    }
    let topo = Topology::build(&standard_pods()).expect("building the topology");
    let ready = "{ready: true, serving: true, terminating: false}";
    let (a, b) = (topo.pod("server-a").address, topo.pod("server-b").address);
    let mut servers = Vec::new();
    for role in ["server-a", "server-b"] {
        let pod = topo.pod(role);
        servers.push(workload::udp_server(&pod.namespace, pod.address, 5353, role).unwrap());
    }
    let pins = PinDir(PathBuf::from(format!("/sys/fs/bpf/{}", topo.prefix)));
    let dir = tempdir(&topo.prefix);
    let file = dir.join("drain.yaml");
    write_atomically(&file, &drain_manifest(&[(a, ready), (b, ready)]));
    // Another service on the same backends.
    let other_vip = Ipv4Addr::new(10, 96, 7, 8);
    write_atomically(
        &dir.join("other.yaml"),
        &format!(
            "apiVersion: v1\nkind: Service\nmetadata: {{name: other, namespace: e2e}}\nspec:\n  clusterIP: {other_vip}\n  ports: [{{name: dns, port: 54, protocol: UDP, targetPort: 5353}}]\n---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: other-1\n  namespace: e2e\n  labels: {{kubernetes.io/service-name: other}}\naddressType: IPv4\nports: [{{name: dns, port: 5353, protocol: UDP}}]\nendpoints:\n- addresses: [{a}]\n- addresses: [{b}]\n"
        ),
    );
    let cgroup = Cgroup::create(&format!("{}-sock", topo.prefix)).unwrap();
    let no_pod = format!("{}-no-such-pod", topo.prefix);
    let cgroup_arg = cgroup.path().to_str().unwrap();
    let agent = Agent::start_with(&pins.0, &dir, &no_pod, &["--cgroup", cgroup_arg]);

    let client = topo.pod("client").namespace.path().to_owned();
    let spawn = |kind: ProbeKind, target: SocketAddrV4| {
        HeldProbe::spawn(&client, Some(cgroup.path()), kind, target).unwrap()
    };
    let answer = |probe: &mut HeldProbe| match probe.ask().unwrap() {
        ProbeResult::Answer(a) => Ok(a.server),
        ProbeResult::Failed { errno, error } => Err((errno, error)),
    };
    // Connected sockets: each gets its backend at connect().
    let mut on = std::collections::BTreeMap::<String, Vec<HeldProbe>>::new();
    for _ in 0..10 {
        let mut probe = spawn(ProbeKind::UdpConnected, SocketAddrV4::new(VIP, 53));
        let server = answer(&mut probe).expect("a connected UDP socket answers");
        on.entry(server).or_default().push(probe);
    }
    assert_eq!(on.len(), 2, "10 sockets over two backends: {:?}", on.keys());
    let mut other_on_a = loop {
        let mut probe = spawn(ProbeKind::UdpConnected, SocketAddrV4::new(other_vip, 54));
        if answer(&mut probe).unwrap() == "server-a" {
            break probe;
        }
    };
    let mut unconnected = spawn(ProbeKind::Udp, SocketAddrV4::new(VIP, 53));
    answer(&mut unconnected).expect("an unconnected socket answers");

    // server-a leaves the service.
    write_atomically(&file, &drain_manifest(&[(b, ready)]));
    let started = Instant::now();
    for probe in on.get_mut("server-a").unwrap() {
        let failure = loop {
            match answer(probe) {
                Ok(server) => assert_eq!(server, "server-a"),
                Err(failure) => break failure,
            }
            assert!(
                started.elapsed() < Duration::from_secs(3),
                "never moved off server-a"
            );
            std::thread::sleep(Duration::from_millis(20));
        };
        assert!(
            matches!(failure.0, Some(libc::ECONNABORTED | libc::EDESTADDRREQ)),
            "{failure:?}"
        );
        assert_eq!(
            answer(probe).unwrap(),
            "server-b",
            "reconnected to a live backend"
        );
    }
    assert!(
        started.elapsed() < Duration::from_secs(1) + Duration::from_millis(500),
        "moved within about a second: {:?}",
        started.elapsed()
    );
    for probe in on.get_mut("server-b").unwrap() {
        assert_eq!(
            answer(probe).unwrap(),
            "server-b",
            "sockets on the live backend stay"
        );
    }
    assert_eq!(
        answer(&mut other_on_a).unwrap(),
        "server-a",
        "another service's socket on the same backend stays"
    );
    assert_eq!(
        answer(&mut unconnected).unwrap(),
        "server-b",
        "unconnected: not destroyed"
    );
    let metrics = agent.get("/metrics").unwrap();
    let terminated = on["server-a"].len();
    assert!(
        metrics.contains(&format!(
            "underpass_udp_sockets_terminated_total {terminated}\n"
        )),
        "{terminated} sockets terminated: {metrics}"
    );
    drop(on);
    drop(other_on_a);
    drop(unconnected);
    agent.stop();
    drop(servers);
    let _ = std::fs::remove_dir_all(&dir);
}

/// Wire-tuple clashes with real sockets, through the agent on the TC path.
/// Each connection below is opened from one local port (SO_REUSEADDR, as
/// the kernel's own port choice reuses a port for different peers): two
/// Services on one backend; a connection straight to the pod, then one
/// through the ClusterIP; a connection through the ClusterIP, then one
/// straight to the pod. Every pair keeps answering on both connections.
#[test]
fn connections_sharing_a_wire_tuple_all_keep_working() {
    require_root("agent e2e");
    let topo = Topology::build(&standard_pods()).expect("building the topology");
    let pod = topo.pod("server-a");
    let server = workload::tcp_server(&pod.namespace, pod.address, TARGET, "server-a").unwrap();
    let pins = PinDir(PathBuf::from(format!("/sys/fs/bpf/{}", topo.prefix)));
    let dir = tempdir(&topo.prefix);
    let ready = "{ready: true, serving: true, terminating: false}";
    write_atomically(
        &dir.join("drain.yaml"),
        &drain_manifest(&[(pod.address, ready)]),
    );
    let other_vip = Ipv4Addr::new(10, 96, 7, 9);
    write_atomically(
        &dir.join("other.yaml"),
        &format!(
            "apiVersion: v1\nkind: Service\nmetadata: {{name: other, namespace: e2e}}\nspec:\n  clusterIP: {other_vip}\n  ports: [{{name: http, port: 81, targetPort: {TARGET}}}]\n---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: other-1\n  namespace: e2e\n  labels: {{kubernetes.io/service-name: other}}\naddressType: IPv4\nports: [{{name: http, port: {TARGET}}}]\nendpoints:\n- addresses: [{}]\n",
            pod.address
        ),
    );
    let filter = format!("{}-client*", topo.prefix);
    let agent = Agent::start(&pins.0, &dir, &filter);
    let client_ns = topo.pod("client").namespace.name().to_owned();
    wait_until("the client's eth0 is attached", || {
        pinned_tc_links(&pins.0).contains(&(client_ns.clone(), "eth0".into()))
    });
    let client = &topo.pod("client").namespace;
    let vip = SocketAddrV4::new(VIP, 80);
    let other = SocketAddrV4::new(other_vip, 81);
    let direct = SocketAddrV4::new(pod.address, TARGET);
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
                let a = Conversation::open_from(port, first, TIMEOUT)?;
                let b = Conversation::open_from(port, second, TIMEOUT)?;
                std::io::Result::Ok((a, b))
            })
            .unwrap()
            .unwrap_or_else(|e| panic!("{case}: {e}"));
        pairs.push((case, a, b));
    }
    let ask_all = |pairs: &mut Vec<(&str, Conversation, Conversation)>, when: &str| {
        for (case, a, b) in pairs.iter_mut() {
            for round in 0..5 {
                assert_eq!(
                    a.ask()
                        .unwrap_or_else(|e| panic!("{case}, first, {when} {round}: {e}")),
                    "server-a"
                );
                assert_eq!(
                    b.ask()
                        .unwrap_or_else(|e| panic!("{case}, second, {when} {round}: {e}")),
                    "server-a"
                );
            }
        }
    };
    ask_all(&mut pairs, "busy");
    // Idle past the learned MACs' freshness: the service flows' next
    // packets go by bpf_redirect_neigh again, and run egress a second time
    // with the very tuple the moved direct connection was opened on.
    std::thread::sleep(Duration::from_secs(
        datapath_common::conntrack::L2_FRESH_SECS + 1,
    ));
    ask_all(&mut pairs, "after idling");
    let metrics = agent.get("/metrics").unwrap();
    let clashes = datapath_event(&metrics, "port_clash");
    assert!(clashes >= 3, "{clashes} clashes resolved");
    agent.stop();
    drop(server);
    let _ = std::fs::remove_dir_all(&dir);
}

/// A backend behind another interface of the pod: a host-network endpoint
/// on the client's own node (as the API server on a control-plane node,
/// or node-local DNS). The pod has Spiderpool's coordinator veth to its
/// node with a host route to the node's address; its macvlan cannot reach
/// its own node. Through the agent on the TC path, connections to the
/// ClusterIP leave by the veth after translation and their replies, which
/// come back by the veth, are translated there; a macvlan backend of the
/// same service still works; the reply attachment goes with the pod.
#[test]
fn a_backend_behind_the_pods_veth_to_its_node_is_reached() {
    use datapath_user::attach::pinned_reply_links;
    use lab::topology::NODE_ADDRESSES;
    require_root("agent e2e");
    if !common::kernel_has(
        datapath_user::features::NETNS_COOKIE_TC,
        datapath_user::probe::kernel().netns_cookie_tc,
    ) {
        return;
    }
    let mut topo = Topology::build(&standard_pods()).expect("building the topology");
    let node_address = NODE_ADDRESSES[topo.pod("client").node];
    topo.add_coordinator_veth("client").unwrap();
    topo.route_via_node("client", (node_address, 32), true)
        .unwrap();
    let node = &topo.nodes[topo.pod("client").node];
    let host_server = workload::tcp_server(node, node_address, TARGET, "node").unwrap();
    let pins = PinDir(PathBuf::from(format!("/sys/fs/bpf/{}", topo.prefix)));
    let dir = tempdir(&topo.prefix);
    let file = dir.join("drain.yaml");
    let ready = "{ready: true, serving: true, terminating: false}";
    write_atomically(&file, &drain_manifest(&[(node_address, ready)]));
    let filter = format!("{}-client*", topo.prefix);
    let agent = Agent::start(&pins.0, &dir, &filter);
    let client_ns = topo.pod("client").namespace.name().to_owned();
    wait_until(
        "the client's eth0 and its veth0 (replies) are attached",
        || {
            pinned_tc_links(&pins.0).contains(&(client_ns.clone(), "eth0".into()))
                && pinned_reply_links(&pins.0).contains(&(client_ns.clone(), "veth0".into()))
        },
    );
    let mut conversation = topo
        .pod("client")
        .namespace
        .run(|| Conversation::open(SocketAddrV4::new(VIP, 80), TIMEOUT))
        .unwrap()
        .expect("the host-network backend answers through the ClusterIP");
    for _ in 0..5 {
        assert_eq!(conversation.ask().unwrap(), "node");
    }
    for _ in 0..5 {
        assert_eq!(ask_service(&topo).unwrap(), "node", "new connections too");
    }
    // A macvlan backend beside it: reached by the pod's own interface.
    let pod = topo.pod("server-a");
    let pod_server = workload::tcp_server(&pod.namespace, pod.address, TARGET, "server-a").unwrap();
    write_atomically(&file, &drain_manifest(&[(pod.address, ready)]));
    wait_until("new connections reach server-a", || {
        ask_service(&topo).is_ok_and(|s| s == "server-a")
    });
    // The pod goes: its reply attachment goes too.
    drop(conversation);
    let client = topo.pods.iter().position(|p| p.role == "client").unwrap();
    drop(topo.pods.remove(client));
    wait_until("the deleted pod's pins are removed", || {
        pinned_tc_links(&pins.0).is_empty() && pinned_reply_links(&pins.0).is_empty()
    });
    agent.stop();
    drop((host_server, pod_server));
    let _ = std::fs::remove_dir_all(&dir);
}

/// A pod that reaches its own service on the TC path gets its connection
/// when it is the backend chosen (hairpin: looped back from 169.254.42.1),
/// beside another backend and, after a manifest edit under live traffic,
/// as the only one.
#[test]
fn a_pod_reaches_its_own_service_on_the_tc_path() {
    require_root("agent e2e");
    let lab = EchoLab::new(&["client", "server-a"]);
    let _agent = lab.agent();
    lab.wait_client_attached();
    wait_until("the service answers", || lab.ask().is_ok());
    let mut seen = std::collections::BTreeMap::<String, usize>::new();
    for _ in 0..40 {
        let server = lab.ask().expect("every connection is answered");
        *seen.entry(server).or_default() += 1;
    }
    assert_eq!(
        seen.len(),
        2,
        "the pod itself and server-a answer: {seen:?}"
    );

    let own = lab.topo.pod("client").address;
    write_atomically(&lab.dir.join("echo.yaml"), &manifest(&[own]));
    wait_until("only the pod itself answers", || {
        lab.ask().is_ok_and(|server| server == "client")
    });
    for _ in 0..20 {
        assert_eq!(lab.ask().expect("answered").as_str(), "client");
    }
}

/// `underpass uninstall` after the agent stopped removes everything it
/// made: the TC programs on the pod's interface, the socket-LB programs
/// on the cgroup (their links and programs are gone from the kernel), and
/// every pin; the pod's traffic to the ClusterIP is no longer translated.
#[test]
fn uninstall_removes_every_attachment_and_pin() {
    use aya::programs::links::{FdLink, PinnedLink};
    require_root("agent e2e");
    let topo = Topology::build(&standard_pods()).expect("building the topology");
    let pod = topo.pod("server-a");
    let _server = workload::tcp_server(&pod.namespace, pod.address, TARGET, "server-a").unwrap();
    let pins = PinDir(PathBuf::from(format!("/sys/fs/bpf/{}", topo.prefix)));
    let dir = tempdir(&topo.prefix);
    write_atomically(&dir.join("echo.yaml"), &manifest(&[pod.address]));
    let cgroup = Cgroup::create(&format!("{}-sock", topo.prefix)).unwrap();
    let filter = format!("{}-client*", topo.prefix);
    let agent = Agent::start_with(
        &pins.0,
        &dir,
        &filter,
        &["--cgroup", cgroup.path().to_str().unwrap()],
    );
    let client = &topo.pod("client").namespace;
    wait_until("the client's eth0 is attached", || {
        pinned_tc_links(&pins.0).contains(&(client.name().to_owned(), "eth0".into()))
    });
    assert_eq!(ask_service(&topo).unwrap(), "server-a");
    agent.stop();

    // What the kernel holds for us: every pinned link and its program.
    fn pin_files(dir: &Path, out: &mut Vec<PathBuf>) {
        for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
            if entry.file_type().unwrap().is_dir() {
                pin_files(&entry.path(), out);
            } else {
                out.push(entry.path());
            }
        }
    }
    let mut pinned = Vec::new();
    pin_files(&pins.0.join("links"), &mut pinned);
    let ours: Vec<(u32, u32)> = pinned
        .iter()
        .map(|path| {
            let info = FdLink::from(PinnedLink::from_pin(path).unwrap())
                .info()
                .unwrap();
            (info.id(), info.program_id())
        })
        .collect();
    assert_eq!(
        ours.len(),
        2 + 8,
        "the TC pair and eight socket-LB programs: {pinned:?}"
    );
    let tcx_programs = || common::tcx_program_ids(client, "eth0").map(|ids| ids.len());
    assert_eq!(tcx_programs(), [1, 1]);

    // Its netlink sweep covers an empty namespace directory: the other
    // suites' namespaces (and their filters) are not ours.
    let no_namespaces = dir.join("no-netns");
    std::fs::create_dir_all(&no_namespaces).unwrap();
    let uninstall = || {
        Command::new(env!("CARGO_BIN_EXE_underpass"))
            .args(["uninstall", "--pin-dir"])
            .arg(&pins.0)
            .arg("--netns-dir")
            .arg(&no_namespaces)
            .output()
            .unwrap()
    };
    let out = uninstall();
    assert!(out.status.success(), "{out:?}");
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(said.contains("detached 10 program attachments"), "{said}");
    assert!(!pins.0.exists(), "every pin is gone");
    assert_eq!(tcx_programs(), [0, 0], "nothing on the pod's interface");
    wait_until("the kernel freed our links and programs", || {
        let links: Vec<u32> = aya::programs::loaded_links()
            .filter_map(Result::ok)
            .map(|l| l.id())
            .collect();
        let programs: Vec<u32> = aya::programs::loaded_programs()
            .filter_map(Result::ok)
            .map(|p| p.id())
            .collect();
        ours.iter()
            .all(|(link, program)| !links.contains(link) && !programs.contains(program))
    });
    assert!(
        ask_service(&topo).is_err(),
        "the ClusterIP is not translated any more"
    );
    let again = uninstall();
    assert!(again.status.success(), "uninstall twice is fine: {again:?}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// Someone else (a pod with enough privilege, a tool) detaches our
/// programs from a pod's interface behind the agent's back: within its
/// poll interval the agent notices (their ids are gone from the TCX
/// query), attaches them again and counts it; traffic is translated again.
#[test]
fn programs_detached_by_someone_else_are_attached_again() {
    require_root("agent e2e");
    let lab = EchoLab::new(&["server-a"]);
    let agent = lab.agent();
    lab.wait_client_attached();
    let client_ns = lab.topo.pod("client").namespace.name().to_owned();
    assert_eq!(lab.ask().unwrap(), "server-a");
    let repaired = || {
        agent.get("/metrics").and_then(|m| {
            m.lines()
                .find_map(|l| l.strip_prefix("underpass_attachments_repaired_total "))
                .and_then(|v| v.trim().parse::<u64>().ok())
        })
    };
    assert_eq!(repaired(), Some(0));

    datapath_user::loader::detach_pinned_tc(&lab.pins.0, Some(&client_ns), "eth0").unwrap();
    wait_until("the agent attached the pair again", || {
        repaired().is_some_and(|n| n >= 1)
    });
    assert_eq!(lab.ask().unwrap(), "server-a");
    agent.stop();
}

/// Netlink (clsact) mode, for kernels without TCX: filters are not pinned,
/// and a restarted agent attaches again. Restarting it three times leaves
/// one filter per direction on the pod's interface, and traffic is
/// translated throughout.
#[test]
fn netlink_mode_restarts_leave_one_filter_per_direction() {
    require_root("agent e2e");
    let lab = EchoLab::new(&["server-a"]);
    let topo = &lab.topo;
    let client_ns = topo.pod("client").namespace.name().to_owned();
    let filters = |direction: &str| {
        let out = Command::new("ip")
            .args([
                "netns", "exec", &client_ns, "tc", "filter", "show", "dev", "eth0", direction,
            ])
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let program = if direction == "egress" {
            "up_tc_egress"
        } else {
            "up_tc_ingress"
        };
        // One line per filter (which names the program twice).
        text.lines().filter(|l| l.contains(program)).count()
    };
    for round in 0..3 {
        let agent = lab.agent_with(&["--no-socket-lb", "--tc-mode", "netlink"]);
        wait_until("the client's eth0 has its filters", || {
            filters("egress") >= 1 && filters("ingress") >= 1
        });
        assert_eq!(
            (filters("egress"), filters("ingress")),
            (1, 1),
            "after start {}",
            round + 1
        );
        assert_eq!(lab.ask().unwrap(), "server-a");
        agent.stop();
        assert_eq!(
            lab.ask().unwrap(),
            "server-a",
            "the filters outlive the agent"
        );
    }
    // Netlink filters are not pinned: uninstall finds them by name in the
    // namespaces of its netns directory (here one holding the client's
    // alone: other suites' namespaces are not ours to sweep).
    let only_client = lab.dir.join("netns");
    std::fs::create_dir_all(&only_client).unwrap();
    std::os::unix::fs::symlink(
        topo.pod("client").namespace.path(),
        only_client.join(&client_ns),
    )
    .unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_underpass"))
        .args(["uninstall", "--pin-dir"])
        .arg(&lab.pins.0)
        .arg("--netns-dir")
        .arg(&only_client)
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    assert_eq!(
        (filters("egress"), filters("ingress")),
        (0, 0),
        "uninstall removed them"
    );
    assert!(lab.ask().is_err(), "nothing translates any more");
}

/// Socket-LB's scope, through the agent: by default a pod's connect() is
/// translated by socket-LB (its packets go to the backend directly, so
/// the TC path tracks nothing); a pod opted out by its namespace name, or
/// every pod with `--socket-lb host`, is translated by TC instead (its
/// flows appear in conntrack). The client runs inside the socket-LB
/// cgroup throughout.
#[test]
fn socket_lb_scope_leaves_opted_out_pods_to_the_tc_path() {
    require_root("agent e2e");
    let lab = EchoLab::new(&["server-a"]);
    let cgroup = Cgroup::create(&format!("{}-sock", lab.topo.prefix)).unwrap();
    let filter = lab.client_filter();
    let client_path = lab.topo.pod("client").namespace.path().to_owned();
    let cgroup_arg = cgroup.path().to_str().unwrap().to_owned();
    for (case, scope, tc_translates) in [
        ("every process", vec![], false),
        (
            "the client opted out",
            vec!["--socket-lb-skip-netns", filter.as_str()],
            true,
        ),
        ("host processes only", vec!["--socket-lb", "host"], true),
    ] {
        let mut args = vec!["--cgroup", cgroup_arg.as_str()];
        args.extend(scope);
        let agent = lab.agent_with(&args);
        lab.wait_client_attached();
        let tracked = || {
            datapath_user::DatapathMaps::open_pinned(&lab.pins.0)
                .unwrap()
                .conntrack_entries()
        };
        let before = tracked();
        let answers = workload::probe_process(
            &client_path,
            Some(cgroup.path()),
            ProbeKind::Tcp,
            SocketAddrV4::new(VIP, 80),
            3,
        )
        .unwrap();
        assert!(
            answers
                .iter()
                .all(|a| answered(Ok(a.clone())) == "server-a"),
            "{case}: {answers:?}"
        );
        let after = tracked();
        assert_eq!(
            after > before,
            tc_translates,
            "{case}: conntrack {before} → {after}"
        );
        agent.stop();
    }
}

/// `--pod-tc`, through the agent: a pod that socket-LB translates gets no
/// TC pair (its connect() reaches the backend, nothing is tracked, no
/// program is in its TCX chains); a pod socket-LB skips gets the pair and
/// its connections go through TC; and when the policy later covers that
/// pod, it keeps its pair, so a connection TC translated before goes on.
#[test]
fn pods_socket_lb_translates_get_no_tc_pair_and_attached_pods_keep_theirs() {
    require_root("agent e2e");
    let lab = EchoLab::new(&["server-a"]);
    let cgroup = Cgroup::create(&format!("{}-sock", lab.topo.prefix)).unwrap();
    let cgroup_arg = cgroup.path().to_str().unwrap().to_owned();
    let filter = lab.client_filter();
    let client = &lab.topo.pod("client").namespace;
    let covering = [
        "--cgroup",
        cgroup_arg.as_str(),
        "--pod-tc",
        "unless-socket-lb",
    ];
    let tracked = || {
        datapath_user::DatapathMaps::open_pinned(&lab.pins.0)
            .unwrap()
            .conntrack_entries()
    };
    let attached =
        || pinned_tc_links(&lab.pins.0).contains(&(client.name().to_owned(), "eth0".into()));
    let probe_in_cgroup = || {
        workload::probe_process(
            client.path(),
            Some(cgroup.path()),
            ProbeKind::Tcp,
            SocketAddrV4::new(VIP, 80),
            3,
        )
        .unwrap()
    };

    // Covered: several scans later, still no pair; socket-LB answers.
    let agent = lab.agent_with(&covering);
    std::thread::sleep(Duration::from_millis(500));
    assert!(!attached(), "a pod socket-LB translates got the TC pair");
    assert_eq!(
        common::tcx_program_ids(client, "eth0"),
        [Vec::<u32>::new(), Vec::new()],
        "no program in the client's TCX chains"
    );
    let answers = probe_in_cgroup();
    assert!(
        answers
            .iter()
            .all(|a| answered(Ok(a.clone())) == "server-a"),
        "socket-LB serves the pod: {answers:?}"
    );
    assert_eq!(tracked(), 0, "nothing went through TC");
    agent.stop();

    // Skipped: the pair, and a connection translated by TC.
    let mut skipping = covering.to_vec();
    skipping.extend(["--socket-lb-skip-netns", filter.as_str()]);
    let agent = lab.agent_with(&skipping);
    lab.wait_client_attached();
    let mut long_lived = client
        .run(|| Conversation::open(SocketAddrV4::new(VIP, 80), TIMEOUT))
        .unwrap()
        .unwrap();
    assert_eq!(long_lived.ask().unwrap(), "server-a");
    assert!(
        tracked() > 0,
        "the skipped pod's connection is tracked by TC"
    );
    agent.stop();

    // Covered again: the pod keeps its pair, the connection its translation.
    let agent = lab.agent_with(&covering);
    std::thread::sleep(Duration::from_millis(500));
    assert!(attached(), "an attached pod lost its pair to the policy");
    assert_eq!(
        long_lived.ask().unwrap(),
        "server-a",
        "the TC-translated connection goes on"
    );
    agent.stop();
}

/// An interface the agent does not select, attached by someone else with
/// other programs (the CNI plugin of an earlier version, `underpass
/// attach`), gets the agent's programs swapped into its links: after an
/// upgrade that replaced the maps it would otherwise run on maps nothing
/// updates.
#[test]
fn interfaces_attached_by_others_get_the_agents_programs() {
    require_root("agent e2e");
    let topo = Topology::build(&standard_pods()).expect("building the topology");
    let pins = PinDir(PathBuf::from(format!("/sys/fs/bpf/{}", topo.prefix)));
    let dir = tempdir(&topo.prefix);
    write_atomically(
        &dir.join("echo.yaml"),
        &manifest(&[topo.pod("server-a").address]),
    );
    let other = &topo.pod("server-b").namespace;
    // Another load of the object (other program ids), as the CNI plugin
    // or `underpass attach` of another build would leave.
    let attach_other = || {
        let attached = Command::new(env!("CARGO_BIN_EXE_underpass"))
            .args([
                "attach",
                "--netns",
                other.name(),
                "--dev",
                "eth0",
                "--pin-dir",
            ])
            .arg(&pins.0)
            .output()
            .unwrap();
        assert!(attached.status.success(), "{attached:?}");
    };
    attach_other();
    let programs = |namespace| common::tcx_program_ids(namespace, "eth0");
    let before = programs(other);
    let filter = format!("{}-client*", topo.prefix);
    let log_path = dir.join("agent.log");
    let agent = Agent::spawn(
        &pins.0,
        &dir,
        &filter,
        &["--no-socket-lb"],
        std::fs::File::create(&log_path).unwrap().into(),
    );
    let client = &topo.pod("client").namespace;
    wait_until("the client's eth0 is attached", || {
        pinned_tc_links(&pins.0).contains(&(client.name().to_owned(), "eth0".into()))
    });
    let ours = programs(client);
    wait_until("the other interface runs the agent's programs", || {
        programs(other) == ours
    });
    assert_ne!(before, ours, "they were other programs before");
    let trusted = || {
        agent
            .get("/metrics")
            .is_some_and(|m| m.contains("underpass_reply_filter_trusted 1\n"))
    };
    wait_until("the agent trusts its reply filter", trusted);

    // Other programs again, once the filter is trusted (an older build's
    // CNI plugin, say): their flows may have no flags, so the agent must
    // distrust the filter before swapping its programs in, and flag
    // conntrack's flows before trusting it again.
    attach_other();
    wait_until("ours swapped in again", || programs(other) == ours);
    wait_until("trusted again", trusted);
    let log = std::fs::read_to_string(&log_path).unwrap();
    assert!(
        log.contains("replacing another build's programs"),
        "the swap distrusted the filter first:\n{log}"
    );
    agent.stop();
    let _ = std::fs::remove_dir_all(&dir);
}

/// One agent per node: a second agent on the same pin directory (a
/// DaemonSet update that surges, one started by hand) waits, saying so,
/// and takes over once the first stops; it never swaps programs against
/// the first meanwhile.
#[test]
fn a_second_agent_waits_until_the_first_stops() {
    require_root("agent e2e");
    let lab = EchoLab::new(&["server-a"]);
    let first = lab.agent();
    lab.wait_client_attached();
    let log_path = lab.dir.join("second.log");
    let second = Agent::spawn_unready(
        &lab.pins.0,
        &lab.dir,
        &lab.client_filter(),
        &["--no-socket-lb"],
        std::fs::File::create(&log_path).unwrap().into(),
    );
    wait_until("the second agent says it waits", || {
        std::fs::read_to_string(&log_path)
            .unwrap()
            .contains("another underpass agent serves this node")
    });
    assert!(second.get("/readyz").is_none(), "it serves nothing yet");
    assert_eq!(lab.ask().unwrap(), "server-a");
    first.stop();
    second.wait_ready();
    assert_eq!(lab.ask().unwrap(), "server-a", "the second one took over");
    second.stop();
}

/// The datapath's rare events reach the agent's log: with
/// `--datapath-log info`, a new flow refused for a service without
/// endpoints is logged by the agent (aya-log, read from the ring buffer,
/// through `tracing`) with the service's address; at the default level
/// (`warn`) it is not.
#[test]
fn a_refused_flow_shows_in_the_agents_log_at_info_only() {
    require_root("agent e2e");
    let lab = EchoLab::new(&[]);
    write_atomically(&lab.dir.join("echo.yaml"), &drain_manifest(&[]));
    let expected = format!("service {VIP}:80 (IP protocol 6) has no endpoints");
    for (level, logged) in [("info", true), ("warn", false)] {
        let log_path = lab.dir.join(format!("agent-{level}.log"));
        let log_file = std::fs::File::create(&log_path).unwrap();
        let agent = Agent::spawn(
            &lab.pins.0,
            &lab.dir,
            &lab.client_filter(),
            &["--no-socket-lb", "--datapath-log", level],
            Stdio::from(log_file),
        );
        lab.wait_client_attached();
        assert!(lab.ask().is_err(), "{level}: refused");
        let shows = || {
            std::fs::read_to_string(&log_path)
                .unwrap()
                .contains(&expected)
        };
        if logged {
            wait_until("the refusal is in the agent's log", shows);
        } else {
            // Refused again, then as long as the info case took at most.
            assert!(lab.ask().is_err(), "{level}: refused");
            std::thread::sleep(Duration::from_millis(500));
            assert!(!shows(), "{level}: not logged");
        }
        agent.stop();
    }
}

/// The echo service's manifest with each server's zone hint (None: the
/// endpoint has no hints).
fn hinted_manifest(endpoints: &[(Ipv4Addr, Option<&str>)]) -> String {
    let mut text = manifest(&[]);
    for (address, zone) in endpoints {
        text += &format!("- addresses: [{address}]\n  conditions: {{ready: true}}\n");
        if let Some(zone) = zone {
            text += &format!("  zone: {zone}\n  hints: {{forZones: [{{name: {zone}}}]}}\n");
        }
    }
    text
}

/// Topology hints through the agent, edited under live traffic: once
/// every endpoint is hinted, new connections stay in the agent's zone
/// (`--node-zone`) while one already open to the other zone keeps
/// working; when an endpoint loses its hints (the controller's update
/// under way), every endpoint takes new connections again.
#[test]
fn zone_hints_keep_new_connections_in_the_agents_zone() {
    require_root("agent e2e");
    let lab = EchoLab::new(&["server-a", "server-b"]);
    let (a, b) = (
        lab.topo.pod("server-a").address,
        lab.topo.pod("server-b").address,
    );
    let file = lab.dir.join("echo.yaml");
    let agent = lab.agent_with(&["--no-socket-lb", "--node-zone", "zone-a"]);
    lab.wait_client_attached();
    let answers = |n: usize| -> std::collections::BTreeSet<String> {
        (0..n).filter_map(|_| lab.ask().ok()).collect()
    };
    wait_until("both servers answer without hints", || {
        answers(20).len() == 2
    });
    // A connection held open to server-b, the other zone's.
    let target = SocketAddrV4::new(VIP, 80);
    let mut held = (0..50)
        .find_map(|_| {
            let mut conversation = lab
                .topo
                .pod("client")
                .namespace
                .run(|| Conversation::open(target, TIMEOUT))
                .unwrap()
                .unwrap();
            (conversation.ask().unwrap() == "server-b").then_some(conversation)
        })
        .expect("a connection to server-b");

    write_atomically(
        &file,
        &hinted_manifest(&[(a, Some("zone-a")), (b, Some("zone-b"))]),
    );
    wait_until("new connections stay in zone-a", || {
        answers(10) == ["server-a".to_owned()].into()
    });
    for _ in 0..20 {
        assert_eq!(lab.ask().unwrap(), "server-a", "a new connection");
    }
    assert_eq!(
        held.ask().unwrap(),
        "server-b",
        "the open connection to the other zone keeps its backend"
    );

    // server-b without hints: hints are not used at all.
    write_atomically(&file, &hinted_manifest(&[(a, Some("zone-a")), (b, None)]));
    wait_until("both servers answer again", || answers(20).len() == 2);
    assert_eq!(held.ask().unwrap(), "server-b");
    agent.stop();
}

/// A service's external IP, load-balancer IP and nodePort at this node's
/// address reach its endpoints from a pod through the agent, added and
/// withdrawn by editing the manifest; a proxying load balancer's IP
/// (`ipMode: Proxy`) is left alone.
#[test]
fn external_load_balancer_and_node_port_addresses_are_translated_for_pods() {
    require_root("agent e2e");
    let lab = EchoLab::new(&["server-a"]);
    let file = lab.dir.join("echo.yaml");
    let plain = manifest(&[lab.topo.pod("server-a").address]);
    let ports = format!("  ports: [{{name: http, port: 80, targetPort: {TARGET}}}]\n");
    let with_addresses = plain.replacen(
        &ports,
        &format!(
            "  type: LoadBalancer\n  externalIPs: [203.0.113.10]\n  ports: [{{name: http, port: 80, targetPort: {TARGET}, nodePort: 30080}}]\nstatus:\n  loadBalancer:\n    ingress: [{{ip: 203.0.113.11}}, {{ip: 203.0.113.12, ipMode: Proxy}}]\n"
        ),
        1,
    );
    assert_ne!(with_addresses, plain);
    write_atomically(&file, &with_addresses);
    let agent = lab.agent_with(&["--no-socket-lb", "--node-ip", "192.0.2.77"]);
    lab.wait_client_attached();
    let ask_at = |address: Ipv4Addr, port: u16| {
        lab.topo
            .pod("client")
            .namespace
            .run(|| workload::tcp_request(SocketAddrV4::new(address, port), TIMEOUT))
            .unwrap()
            .map(|a| a.server)
    };
    let ask = |address: Ipv4Addr| ask_at(address, 80);
    let node_ip = Ipv4Addr::new(192, 0, 2, 77);
    let (external, balanced, proxied) = (
        Ipv4Addr::new(203, 0, 113, 10),
        Ipv4Addr::new(203, 0, 113, 11),
        Ipv4Addr::new(203, 0, 113, 12),
    );
    assert_eq!(ask(external).unwrap(), "server-a", "the external IP");
    assert_eq!(ask(balanced).unwrap(), "server-a", "the load-balancer IP");
    assert!(ask(proxied).is_err(), "a proxying load balancer's IP");
    assert_eq!(ask_at(node_ip, 30080).unwrap(), "server-a", "the nodePort");
    assert_eq!(lab.ask().unwrap(), "server-a", "the ClusterIP");

    write_atomically(&file, &plain);
    wait_until("the external IP is withdrawn", || ask(external).is_err());
    assert!(ask(balanced).is_err(), "the load-balancer IP is withdrawn");
    assert!(ask_at(node_ip, 30080).is_err(), "the nodePort is withdrawn");
    assert_eq!(lab.ask().unwrap(), "server-a", "the ClusterIP stays");
    agent.stop();
}

/// The echo service over `backends` with `sessionAffinity: ClientIP` and
/// `timeoutSeconds` (None: the service without affinity).
fn affinity_manifest(backends: &[Ipv4Addr], timeout_seconds: Option<u32>) -> String {
    let text = manifest(backends);
    match timeout_seconds {
        Some(seconds) => text.replacen(
            "  ports: [{name: http",
            &format!(
                "  sessionAffinity: ClientIP\n  sessionAffinityConfig: {{clientIP: {{timeoutSeconds: {seconds}}}}}\n  ports: [{{name: http"
            ),
            1,
        ),
        None => text,
    }
}

/// `sessionAffinity: ClientIP` through the agent, on the TC path and on
/// socket-LB, edited under live traffic: once the manifest asks for it,
/// every new connection of the client reaches one backend; when that
/// backend leaves the slice, the next ones reach the other, and stay
/// there when it comes back (without affinity half would go back); taken
/// away, connections spread again. On the TC path also the timeout: with
/// `timeoutSeconds: 1`, a connection after a pause of 1.5 s is balanced
/// afresh (over twelve pauses both backends answer; all on one: 2^-11).
#[test]
fn client_ip_affinity_keeps_a_clients_connections_on_one_backend() {
    require_root("agent e2e");
    let lab = EchoLab::new(&["server-a", "server-b"]);
    let (a, b) = (
        lab.topo.pod("server-a").address,
        lab.topo.pod("server-b").address,
    );
    let file = lab.dir.join("echo.yaml");
    let cgroup = Cgroup::create(&format!("{}-aff", lab.topo.prefix)).unwrap();
    let cgroup_arg = cgroup.path().to_str().unwrap().to_owned();
    let client_path = lab.topo.pod("client").namespace.path().to_owned();
    for (path, args) in [
        ("TC", vec!["--no-socket-lb"]),
        ("socket-LB", vec!["--cgroup", cgroup_arg.as_str()]),
    ] {
        write_atomically(&file, &affinity_manifest(&[a, b], None));
        let agent = lab.agent_with(&args);
        lab.wait_client_attached();
        // `n` new connections from the client; the servers that answered.
        let answers = |n: u32| -> Vec<String> {
            if path == "TC" {
                (0..n).map(|_| lab.ask().unwrap()).collect()
            } else {
                let target = SocketAddrV4::new(VIP, 80);
                workload::probe_process(
                    &client_path,
                    Some(cgroup.path()),
                    ProbeKind::Tcp,
                    target,
                    n,
                )
                .unwrap()
                .into_iter()
                .map(|r| answered(Ok(r)))
                .collect()
            }
        };
        let distinct = |n| {
            answers(n)
                .into_iter()
                .collect::<std::collections::BTreeSet<_>>()
        };
        wait_until(&format!("{path}: both servers answer"), || {
            distinct(20).len() == 2
        });

        write_atomically(&file, &affinity_manifest(&[a, b], Some(3600)));
        wait_until(&format!("{path}: one server answers"), || {
            distinct(10).len() == 1
        });
        let kept = answers(1).remove(0);
        assert_eq!(
            distinct(20),
            [kept.clone()].into(),
            "{path}: every connection to {kept}"
        );

        // The kept backend leaves the slice, then comes back.
        let (gone, other) = if kept == "server-a" { (a, b) } else { (b, a) };
        let other_name = if kept == "server-a" {
            "server-b"
        } else {
            "server-a"
        };
        write_atomically(&file, &affinity_manifest(&[other], Some(3600)));
        wait_until(&format!("{path}: {other_name} alone answers"), || {
            distinct(5) == [other_name.to_owned()].into()
        });
        write_atomically(&file, &affinity_manifest(&[gone, other], Some(3600)));
        std::thread::sleep(Duration::from_millis(500));
        assert_eq!(
            distinct(20),
            [other_name.to_owned()].into(),
            "{path}: the client stays on {other_name} with {gone} back"
        );

        if path == "TC" {
            write_atomically(&file, &affinity_manifest(&[a, b], Some(1)));
            std::thread::sleep(Duration::from_millis(500));
            let mut seen = std::collections::BTreeSet::new();
            for _ in 0..12 {
                std::thread::sleep(Duration::from_millis(1500));
                let first = answers(1).remove(0);
                // Within the timeout: the same backend.
                assert_eq!(answers(1).remove(0), first, "{path}: within the timeout");
                seen.insert(first);
                if seen.len() == 2 {
                    break;
                }
            }
            assert_eq!(seen.len(), 2, "{path}: after each timeout, balanced afresh");
        }

        write_atomically(&file, &affinity_manifest(&[a, b], None));
        wait_until(&format!("{path}: both answer without affinity"), || {
            distinct(20).len() == 2
        });
        agent.stop();
    }
}

/// The value of the series of `family` whose labels include `labels` in
/// a `/metrics` answer (None: no such series).
fn series(metrics: &str, family: &str, labels: &str) -> Option<u64> {
    metrics
        .lines()
        .find(|l| l.starts_with(&format!("{family}{{")) && l.contains(labels))
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
}

/// Per-service figures through the agent, on the TC path and on
/// socket-LB: N connections to a service add exactly N new flows to its
/// `/metrics` series (labelled with its namespace, name, port and
/// frontend), and on the TC path at least three packets each (socket-LB
/// never sees a connected socket's packets: zero); `service list` shows
/// the same; a second service without traffic has no series; the service
/// deleted from the manifest, its series goes.
#[test]
fn per_service_counters_reach_metrics_and_service_list() {
    require_root("agent e2e");
    let lab = EchoLab::new(&["server-a"]);
    let a = lab.topo.pod("server-a").address;
    let file = lab.dir.join("echo.yaml");
    let idle = Ipv4Addr::new(10, 96, 7, 8);
    let idle_manifest = manifest(&[a])
        .replace("name: echo", "name: idle")
        .replace("echo-1", "idle-1")
        .replace(&VIP.to_string(), &idle.to_string())
        .replace("service-name: echo", "service-name: idle");
    let with_idle = format!("{}---\n{idle_manifest}", manifest(&[a]));
    let cgroup = Cgroup::create(&format!("{}-cnt", lab.topo.prefix)).unwrap();
    let cgroup_arg = cgroup.path().to_str().unwrap().to_owned();
    let client_path = lab.topo.pod("client").namespace.path().to_owned();
    let echo = format!(
        "namespace=\"e2e\",name=\"echo\",port=\"80/TCP\",port_name=\"http\",frontend=\"{VIP}:80/TCP\""
    );
    const N: u64 = 7;
    for (path, args) in [
        ("TC", vec!["--no-socket-lb"]),
        ("socket-LB", vec!["--cgroup", cgroup_arg.as_str()]),
    ] {
        write_atomically(&file, &with_idle);
        let agent = lab.agent_with(&args);
        lab.wait_client_attached();
        let connect = |n: u64| {
            if path == "TC" {
                for _ in 0..n {
                    lab.ask().unwrap();
                }
            } else {
                let target = SocketAddrV4::new(VIP, 80);
                let answers = workload::probe_process(
                    &client_path,
                    Some(cgroup.path()),
                    ProbeKind::Tcp,
                    target,
                    n as u32,
                )
                .unwrap();
                for answer in answers {
                    answered(Ok(answer));
                }
            }
        };
        wait_until(&format!("{path}: the service answers"), || {
            if path == "TC" {
                lab.ask().is_ok()
            } else {
                connect(1);
                true
            }
        });
        let scrape = || agent.get("/metrics").unwrap();
        let figures = |metrics: &str| {
            (
                series(metrics, "underpass_service_new_flows_total", &echo),
                series(metrics, "underpass_service_packets_total", &echo),
            )
        };
        let (Some(flows_before), Some(packets_before)) = figures(&scrape()) else {
            panic!("{path}: no series for the echo frontend: {}", scrape());
        };
        connect(N);
        let metrics = scrape();
        let (flows, packets) = figures(&metrics);
        let (flows, packets) = (flows.unwrap(), packets.unwrap());
        assert_eq!(flows - flows_before, N, "{path}: new flows\n{metrics}");
        if path == "TC" {
            assert!(
                packets - packets_before >= 3 * N,
                "{path}: {} packets for {N} connections",
                packets - packets_before
            );
        } else {
            assert_eq!(packets, 0, "{path}: socket-LB sees no packets");
        }
        assert!(
            !metrics.contains("name=\"idle\""),
            "{path}: the idle service has no series\n{metrics}"
        );

        // The CLI reads the same from the pins.
        let output = Command::new(env!("CARGO_BIN_EXE_underpass"))
            .args(["service", "list", "--pin-dir"])
            .arg(&lab.pins.0)
            .args(["-o", "json"])
            .output()
            .unwrap();
        assert!(output.status.success(), "{path}: service list");
        let rows: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
        let row = |frontend: String| {
            rows.as_array()
                .unwrap()
                .iter()
                .find(|r| r["frontend"] == frontend)
                .cloned()
                .unwrap_or_else(|| panic!("{path}: no {frontend} in {rows}"))
        };
        assert_eq!(row(format!("{VIP}:80/TCP"))["new_flows"], flows, "{path}");
        assert_eq!(row(format!("{idle}:80/TCP"))["new_flows"], 0, "{path}");

        // The service deleted: its series goes (its id zeroed with it).
        write_atomically(&file, &idle_manifest);
        wait_until(&format!("{path}: the echo series is gone"), || {
            !scrape().contains("name=\"echo\"")
        });
        agent.stop();
    }
}
