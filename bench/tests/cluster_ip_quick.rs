//! `bench cluster-ip --quick`: every mode and workload end to end in
//! seconds (asserting nothing about speed: that is the bench's job).

mod common;

use std::{process::Command, sync::Mutex};

/// One quick bench at a time: two would share the machine's two CPUs
/// (the figures do not matter here, but connections timing out would).
static ONE_BENCH: Mutex<()> = Mutex::new(());

/// Every row of the table, and whether its client runs our programs
/// (a second line in the table of their live run time).
const ROWS: [(&str, bool); 12] = [
    ("macvlan + kube-proxy (iptables)", false),
    ("macvlan + kube-proxy (nftables)", false),
    ("macvlan + underpass TC (eBPF)", true),
    ("macvlan + underpass socket-LB", true),
    ("veth routed + kube-proxy (Calico's row)", false),
    ("veth routed + underpass TC (Cilium's row)", true),
    ("macvlan, Pod IP, no programs (the limit)", false),
    ("the limit again (A/A control)", false),
    ("macvlan, Pod IP, our programs attached", true),
    ("macvlan across subnets, Pod IP", true),
    ("veth routed by the nodes, Pod IP", false),
    ("node to node", false),
];

#[test]
fn every_row_runs() {
    bench::require_root("bench cluster-ip").unwrap();
    let _one = ONE_BENCH.lock().unwrap_or_else(|e| e.into_inner());
    let (stdout, results) = common::quick_run(&["cluster-ip"]);
    for (row, programs) in ROWS {
        assert_eq!(
            stdout.matches(&format!("\n| {row} |")).count(),
            if programs { 18 } else { 9 },
            "{row} in every table:\n{stdout}"
        );
    }
    let rows = results["rows"].as_array().unwrap();
    assert_eq!(rows.len(), 108, "9 workloads × 12 modes");
    for row in rows {
        let run = &row["runs"][0];
        assert!(run["transactions"].as_u64().unwrap() > 0, "{row}");
        assert_eq!(run["errors"].as_u64(), Some(0), "{row}");
        // The client's and the server's CPU come from their cgroups.
        assert!(
            run["cpu"]["client_user_us"].as_f64().unwrap()
                + run["cpu"]["client_system_us"].as_f64().unwrap()
                > 0.0,
            "{row}"
        );
        assert!(
            run["cpu"]["server_user_us"].as_f64().unwrap()
                + run["cpu"]["server_system_us"].as_f64().unwrap()
                > 0.0,
            "{row}"
        );
    }
    // Offloads as real devices have them, every device recorded.
    let devices = results["offloads"].as_array().unwrap();
    assert!(devices.len() >= 10, "{devices:?}");
    let wire = devices.iter().find(|d| d["device"] == "wire").unwrap();
    assert_eq!(wire["tx_checksumming"], true, "{wire}");
    assert_eq!(wire["tcp_segmentation_offload"], true, "{wire}");
    assert_eq!(wire["generic_receive_offload"], true, "a NIC's GRO: {wire}");
    // Every row's ratio to the limit, for the figure and for CPU.
    let ratios = results["ratios"].as_array().unwrap();
    assert!(
        ratios
            .iter()
            .any(|r| r["mode"] == "aa-control" && r["to"] == "pod-ip-bare" && r["of"] == "cpu")
    );
    assert_eq!(
        results["orders"].as_array().unwrap().len(),
        9,
        "one order per round and workload"
    );
    // Each program's live run time, in a statistics pass of every mode
    // whose client runs our programs, with the floor on the same packets.
    let live = results["live"].as_array().unwrap();
    let modes_with_programs = ["ebpf", "socket-lb", "veth-ebpf", "pod-ip", "pod-ip-routed"];
    assert_eq!(live.len(), 9 * modes_with_programs.len(), "{live:?}");
    for pass in live {
        let mode = pass["mode"].as_str().unwrap();
        assert!(modes_with_programs.contains(&mode), "{pass}");
        let programs = pass["cost"]["programs"].as_array().unwrap();
        let runs = |name: &str| {
            programs
                .iter()
                .find(|p| p["program"] == name)
                .map_or(0, |p| p["runs"].as_u64().unwrap())
        };
        // The do-nothing program runs first on every packet ours see on
        // the client's interface, and ours run nowhere else in a pass.
        let ours = runs("up_tc_egress") + runs("up_tc_ingress");
        assert!(runs("up_tc_pass") as f64 >= 0.95 * ours as f64, "{pass}");
        if mode == "socket-lb" {
            // A pod socket-LB translates has no TC pair (`--pod-tc`):
            // only connect4 is ours, once per connection.
            assert_eq!(ours, 0, "no TC program on the socket-LB pod: {pass}");
            assert!(runs("up_tc_pass") > 0, "its floor was measured: {pass}");
            assert!(runs("sock_connect4") > 0, "every connection: {pass}");
        } else {
            assert!(
                runs("up_tc_egress") > 0 && runs("up_tc_ingress") > 0,
                "{pass}"
            );
        }
    }
    assert!(stdout.contains("Our programs' own run time in live traffic"));
    // Seed parameters scaled down for CI, and said so.
    assert!(
        stdout.contains("redis-benchmark -n 2000 (seed: the default, 100000)"),
        "{stdout}"
    );
}

#[test]
fn every_row_runs_over_ipv6() {
    bench::require_root("bench cluster-ip --family 6").unwrap();
    let _one = ONE_BENCH.lock().unwrap_or_else(|e| e.into_inner());
    let dir = tempfile::tempdir().unwrap();
    let output = Command::new(env!("CARGO_BIN_EXE_bench"))
        .args(["cluster-ip", "--family", "6", "--quick", "--out"])
        .arg(dir.path())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{stdout}\n{stderr}");
    assert!(
        stderr.contains("--family 6 leaves out --workload sockperf"),
        "said why sockperf is missing: {stderr}"
    );
    assert!(stdout.contains("IPv6: every row's traffic"), "{stdout}");
    // Every row in every table (8 workloads), the rows running our
    // programs also in each table of their live run time.
    for (row, programs) in ROWS {
        assert_eq!(
            stdout.matches(&format!("\n| {row} |")).count(),
            if programs { 16 } else { 8 },
            "{row} in every table:\n{stdout}"
        );
    }
    // Its own file name: an IPv4 run's results in the same folder stay.
    let json = dir.path().join("cluster-ip-ipv6.json");
    let results: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&json).unwrap()).unwrap();
    assert!(dir.path().join("cluster-ip-ipv6-rr.svg").exists());
    assert_eq!(results["family"], "v6");
    let rows = results["rows"].as_array().unwrap();
    assert_eq!(rows.len(), 96, "8 workloads × 12 modes");
    for row in rows {
        assert_ne!(row["workload"], "sockperf");
        let run = &row["runs"][0];
        assert!(run["transactions"].as_u64().unwrap() > 0, "{row}");
        assert_eq!(run["errors"].as_u64(), Some(0), "{row}");
    }
    // socket-LB's IPv6 program connected the socket-LB row (none of
    // IPv4's ran); the TC rows ran the TC pair. That TC translated is
    // shown by the eBPF rows' transactions above: their client has no
    // route to the service CIDR but its default one (the gateway, which
    // has none), so untranslated packets would be lost.
    for pass in results["live"].as_array().unwrap() {
        let programs = pass["cost"]["programs"].as_array().unwrap();
        let runs = |name: &str| {
            programs
                .iter()
                .find(|p| p["program"] == name)
                .map_or(0, |p| p["runs"].as_u64().unwrap())
        };
        if pass["mode"] == "socket-lb" {
            assert!(runs("sock_connect6") > 0, "{pass}");
            assert_eq!(runs("sock_connect4"), 0, "{pass}");
        } else {
            assert!(runs("up_tc_egress") > 0, "{pass}");
        }
    }
}
