//! `bench cluster-ip --quick`: every mode and workload end to end in
//! seconds (asserting nothing about speed: that is the bench's job).

use std::process::Command;

#[test]
fn every_row_runs() {
    bench::require_root("bench cluster-ip").unwrap();
    let json = std::env::temp_dir().join(format!("cluster-ip-quick-{}.json", std::process::id()));
    let output = Command::new(env!("CARGO_BIN_EXE_bench"))
        .args(["cluster-ip", "--quick", "--json"])
        .arg(&json)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    for row in [
        "macvlan + kube-proxy (iptables)",
        "macvlan + kube-proxy (nftables)",
        "macvlan + underpass TC (eBPF)",
        "macvlan + underpass socket-LB",
        "veth routed + kube-proxy (Calico's row)",
        "veth routed + underpass TC (Cilium's row)",
        "macvlan, Pod IP, no programs (the limit)",
        "the limit again (A/A control)",
        "macvlan, Pod IP, our programs attached",
        "macvlan across subnets, Pod IP",
        "veth routed by the nodes, Pod IP",
        "node to node",
    ] {
        assert_eq!(
            stdout.matches(&format!("\n| {row} |")).count(),
            9,
            "{row} in every table:\n{stdout}"
        );
    }
    let results: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&json).unwrap()).unwrap();
    let _ = std::fs::remove_file(&json);
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
    // Seed parameters scaled down for CI, and said so.
    assert!(
        stdout.contains("redis-benchmark -n 2000 (seed: the default, 100000)"),
        "{stdout}"
    );
}
