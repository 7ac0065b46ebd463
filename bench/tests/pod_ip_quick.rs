//! `bench pod-ip --quick` (the `pod-ip` preset of `cluster-ip`): every
//! row of the seed's Pod IP table and workload end to end (asserting
//! nothing about speed).

use std::process::Command;

#[test]
fn every_row_runs() {
    bench::require_root("bench pod-ip").unwrap();
    let json = std::env::temp_dir().join(format!("pod-ip-quick-{}.json", std::process::id()));
    let output = Command::new(env!("CARGO_BIN_EXE_bench"))
        .args(["pod-ip", "--quick", "--json"])
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
    assert_eq!(rows.as_array().unwrap().len(), 36, "9 workloads × 4 rows");
    assert!(
        !stdout.contains("kube-proxy") && !stdout.contains("underpass"),
        "no service row in the Pod IP table:\n{stdout}"
    );
}
