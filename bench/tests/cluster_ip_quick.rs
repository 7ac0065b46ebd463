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
        "macvlan, Pod IP (no service)",
        "macvlan across subnets, Pod IP",
        "veth routed by the nodes, Pod IP",
        "node to node",
    ] {
        assert_eq!(
            stdout.matches(row).count(),
            9,
            "{row} in every table:\n{stdout}"
        );
    }
    let rows: serde_json::Value = serde_json::from_slice(&std::fs::read(&json).unwrap()).unwrap();
    let _ = std::fs::remove_file(&json);
    assert_eq!(rows.as_array().unwrap().len(), 90, "9 workloads × 10 modes");
    for row in rows.as_array().unwrap() {
        assert!(
            row["runs"][0]["transactions"].as_u64().unwrap() > 0,
            "{row}"
        );
        assert_eq!(row["runs"][0]["errors"].as_u64(), Some(0), "{row}");
    }
}
