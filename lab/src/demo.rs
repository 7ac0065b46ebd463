//! `underpass-lab demo`: the whole datapath in one run, on the built-in
//! two-node topology, with nothing outside the namespaces it creates.

use std::{
    collections::BTreeMap,
    net::{Ipv4Addr, SocketAddrV4},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use comfy_table::{Table, presets::UTF8_FULL_CONDENSED};

use datapath_user::{
    Datapath, LoadOptions, TcMode,
    maps::LbMaps,
    model::{BackendEntry, Frontend, Protocol},
};

use crate::{
    Cgroup, Topology, cleanup, standard_pods,
    workload::{self, ProbeKind, ProbeResult},
};

const CLUSTER_IP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);
const EMPTY_CLUSTER_IP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 11);
const TCP_PORT: u16 = 80;
const UDP_PORT: u16 = 53;
const TCP_TARGET_PORT: u16 = 8080;
const UDP_TARGET_PORT: u16 = 5353;
const REQUESTS: u32 = 30;

pub fn run() -> Result<()> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!("the demo creates network namespaces and loads eBPF programs: run it as root");
    }
    cleanup::cleanup_on_signals();
    let started = Instant::now();
    println!("Building the topology: two nodes joined by a veth wire, a gateway, macvlan pods…");
    let topo = Topology::build(&standard_pods())?;
    let servers = ["server-a", "server-b", "server-c"];
    let mut pods = Table::new();
    pods.load_preset(UTF8_FULL_CONDENSED).set_header([
        "pod",
        "namespace",
        "node",
        "address",
        "gateway",
    ]);
    for pod in &topo.pods {
        pods.add_row([
            pod.role.clone(),
            pod.namespace.name().to_owned(),
            format!("node{}", pod.node + 1),
            pod.address.to_string(),
            pod.gateway.to_string(),
        ]);
    }
    println!("{pods}");

    let mut running = Vec::new();
    for role in servers {
        let pod = topo.pod(role);
        running.push(workload::tcp_server(
            &pod.namespace,
            pod.address,
            TCP_TARGET_PORT,
            role,
        )?);
        running.push(workload::udp_server(
            &pod.namespace,
            pod.address,
            UDP_TARGET_PORT,
            role,
        )?);
    }

    let mut dp = Datapath::load(&LoadOptions::default()).context("loading the datapath")?;
    let tcp = Frontend {
        address: CLUSTER_IP,
        port: TCP_PORT,
        protocol: Protocol::Tcp,
    };
    let udp = Frontend {
        address: CLUSTER_IP,
        port: UDP_PORT,
        protocol: Protocol::Udp,
    };
    let backends = |port| -> Vec<BackendEntry> {
        servers
            .iter()
            .enumerate()
            .map(|(i, role)| BackendEntry {
                id: i as u32 + 1 + u32::from(port == UDP_TARGET_PORT) * 10,
                address: topo.pod(role).address,
                port,
            })
            .collect()
    };
    dp.maps.set_service(&tcp, 1, &backends(TCP_TARGET_PORT))?;
    dp.maps.set_service(&udp, 2, &backends(UDP_TARGET_PORT))?;
    dp.maps.set_service(
        &Frontend {
            address: EMPTY_CLUSTER_IP,
            port: TCP_PORT,
            protocol: Protocol::Tcp,
        },
        3,
        &[],
    )?;
    println!(
        "\nService demo/web: {tcp} → :{TCP_TARGET_PORT} and {udp} → :{UDP_TARGET_PORT} on server-a, server-b (node2) and server-c (node2, other subnet, routed)."
    );
    println!("Service demo/empty: {EMPTY_CLUSTER_IP}:{TCP_PORT}/TCP with no endpoints.\n");

    let client = topo.pod("client");
    let client_ns = client.namespace.path().to_owned();

    println!(
        "── TC path: programs on the client pod's eth0 ({}) ──",
        TcMode::Auto
    );
    let attachment = dp.attach_tc(Some(&client_ns.to_string_lossy()), "eth0", TcMode::Auto)?;
    let tcp_target = SocketAddrV4::new(CLUSTER_IP, TCP_PORT);
    let udp_target = SocketAddrV4::new(CLUSTER_IP, UDP_PORT);
    let timeout = Duration::from_secs(2);
    let tc_results: Vec<(bool, std::io::Result<workload::Answer>)> =
        client.namespace.run(|| {
            let mut results = Vec::new();
            for _ in 0..REQUESTS {
                results.push((false, workload::tcp_request(tcp_target, timeout)));
                results.push((true, workload::udp_request(udp_target, timeout)));
            }
            results
        })?;
    let tc_tally = tally(
        tc_results
            .into_iter()
            .map(|(udp, r)| (udp, r.map_err(|e| e.to_string()))),
    );
    print_tally(&tc_tally);
    let empty = client.namespace.run(|| {
        workload::tcp_request(
            SocketAddrV4::new(EMPTY_CLUSTER_IP, TCP_PORT),
            Duration::from_millis(500),
        )
    })?;
    println!(
        "demo/empty over TC: {}",
        describe(empty.map_err(|e| e.to_string()))
    );
    print_counters(&dp)?;
    attachment.detach()?;

    println!("\n── socket-LB: cgroup programs, client process in the cgroup, no TC program ──");
    let cgroup = Cgroup::create(&format!("{}-demo", topo.prefix))?;
    let sock = dp.attach_sock(cgroup.path())?;
    let mut sock_results = Vec::new();
    for (udp, target) in [(false, tcp_target), (true, udp_target)] {
        let kind = if udp { ProbeKind::Udp } else { ProbeKind::Tcp };
        for result in
            workload::probe_process(&client_ns, Some(cgroup.path()), kind, target, REQUESTS)?
        {
            sock_results.push((
                udp,
                match result {
                    ProbeResult::Answer(a) => Ok(a),
                    ProbeResult::Failed { error, .. } => Err(error),
                },
            ));
        }
    }
    print_tally(&tally(sock_results.into_iter()));
    let refused_at = Instant::now();
    let empty = workload::probe_process(
        &client_ns,
        Some(cgroup.path()),
        ProbeKind::Tcp,
        SocketAddrV4::new(EMPTY_CLUSTER_IP, TCP_PORT),
        1,
    )?;
    let empty = match empty.into_iter().next() {
        Some(ProbeResult::Answer(a)) => Ok(a),
        Some(ProbeResult::Failed { error, .. }) => Err(error),
        None => Err("no result".into()),
    };
    println!(
        "demo/empty over socket-LB: {} (in {:.0?})",
        describe(empty),
        refused_at.elapsed()
    );
    print_counters(&dp)?;
    sock.detach()?;
    drop(running);
    drop(cgroup);
    drop(topo);
    println!(
        "\nRemoved every namespace and cgroup the demo created ({:.1?} in all).",
        started.elapsed()
    );
    Ok(())
}

type Tally = BTreeMap<String, (u32, u32, Vec<String>)>;

fn tally(results: impl Iterator<Item = (bool, Result<workload::Answer, String>)>) -> Tally {
    let mut tally = Tally::new();
    for (udp, result) in results {
        let (key, peer) = match result {
            Ok(answer) => (answer.server, answer.peer.to_string()),
            Err(e) => (format!("error: {e}"), String::new()),
        };
        let entry = tally.entry(key).or_default();
        if udp {
            entry.1 += 1
        } else {
            entry.0 += 1
        }
        if !peer.is_empty() && !entry.2.contains(&peer) {
            entry.2.push(peer);
        }
    }
    tally
}

fn print_tally(tally: &Tally) {
    let mut table = Table::new();
    table.load_preset(UTF8_FULL_CONDENSED).set_header([
        "answered by",
        "TCP requests",
        "UDP requests",
        "peer the client saw",
    ]);
    for (server, (tcp, udp, peers)) in tally {
        table.add_row([
            server.clone(),
            tcp.to_string(),
            udp.to_string(),
            peers.join(", "),
        ]);
    }
    println!("{table}");
}

fn describe(result: Result<workload::Answer, String>) -> String {
    match result {
        Ok(a) => format!("answered by {} (unexpected)", a.server),
        Err(e) => format!("failed as it should: {e}"),
    }
}

fn print_counters(dp: &Datapath) -> Result<()> {
    let mut table = Table::new();
    table
        .load_preset(UTF8_FULL_CONDENSED)
        .set_header(["datapath counter", "value"]);
    for (counter, value) in dp.maps.counters()? {
        if value > 0 {
            table.add_row([counter.name().to_owned(), value.to_string()]);
        }
    }
    println!("{table}");
    Ok(())
}
