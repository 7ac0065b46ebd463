//! `bench datapath` in CI, small: every case (IPv4 and IPv6, each
//! program's tail call to its IPv6 half included) runs on the real
//! object with the verdict it expects and leaves its packet as it found
//! it (the bench checks both); nothing is asserted about speed.

use std::process::Command;

#[test]
fn every_case_runs_with_its_verdict() {
    bench::require_root("bench datapath").unwrap();
    let output = Command::new(env!("CARGO_BIN_EXE_bench"))
        .args(["datapath", "--repeat", "1000", "--trials", "1", "--json"])
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "{}\n{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    let results: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    let cases: Vec<&str> = results
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["case"].as_str().unwrap())
        .collect();
    for expected in [
        "egress DNAT, conntrack hit",
        "ingress reverse NAT, tracked reply",
        "IPv6 egress DNAT, conntrack hit",
        "IPv6 egress, not service traffic",
        "IPv6 ingress reverse NAT, tracked reply",
        "IPv6 ingress, untracked traffic",
        "IPv6 egress DNAT, new flow (its own program by a tail call), one run per call",
    ] {
        assert!(cases.contains(&expected), "{expected} missing: {cases:?}");
    }
}
