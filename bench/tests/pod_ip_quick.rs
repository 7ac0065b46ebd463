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
    // (row, its client runs our programs: a second line in the table of
    // their live run time)
    for (row, programs) in [
        ("macvlan, Pod IP, no programs (the limit)", false),
        ("the limit again (A/A control)", false),
        ("macvlan, Pod IP, our programs attached", true),
        ("macvlan across subnets, Pod IP", true),
        ("veth routed by the nodes, Pod IP", false),
        ("node to node", false),
    ] {
        assert_eq!(
            stdout.matches(&format!("\n| {row} |")).count(),
            if programs { 18 } else { 9 },
            "{row} in every table:\n{stdout}"
        );
    }
    let results: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&json).unwrap()).unwrap();
    let _ = std::fs::remove_file(&json);
    let rows = results["rows"].as_array().unwrap();
    assert_eq!(rows.len(), 54, "9 workloads × 6 rows");
    assert!(
        rows.iter()
            .all(|r| !["kube-proxy", "kube-proxy-nft", "ebpf", "socket-lb"]
                .contains(&r["mode"].as_str().unwrap())),
        "no service row in the Pod IP table:\n{stdout}"
    );
}
