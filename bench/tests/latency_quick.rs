//! `bench latency --quick`: every design serves nginx responses of both
//! sizes through the open-loop generator at its maximum and at 30 % of
//! it (asserting nothing about speed), ipvlan is measured or reported
//! unavailable with the kernel option it needs, and the charts are
//! written.

use std::process::Command;

#[test]
fn every_design_runs_and_is_plotted() {
    bench::require_root("bench latency").unwrap();
    let out = tempfile::tempdir().unwrap();
    let output = Command::new(env!("CARGO_BIN_EXE_bench"))
        .args(["latency", "--quick", "--out"])
        .arg(out.path())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let document: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.path().join("latency.json")).unwrap()).unwrap();
    let rows = document["rows"].as_array().unwrap();
    let offloads = document["offloads"].as_array().unwrap();
    assert!(
        offloads.iter().all(|d| d["tx_checksumming"] == true),
        "offloads as real devices have them: {offloads:?}"
    );
    let ipvlan_missing = document["unavailable"].get("ipvlan").is_some();
    if ipvlan_missing {
        assert!(stdout.contains("CONFIG_IPVLAN"), "{stdout}");
        eprintln!("SKIP ipvlan: this kernel has no ipvlan driver (CONFIG_IPVLAN)");
    }
    let designs = if ipvlan_missing { 10 } else { 11 };
    assert_eq!(
        rows.len(),
        designs * 2 * 2,
        "designs × 2 sizes × (max, 30 %)"
    );
    for row in rows {
        let result = &row["result"];
        assert!(result["requests"].as_u64().unwrap() > 0, "{row}");
        assert_eq!(result["errors"].as_u64(), Some(0), "{row}");
        let expected = match row["size"].as_u64().unwrap() {
            350 => 300..420,
            _ => 4000..4200,
        };
        assert!(
            expected.contains(&result["response_bytes"].as_u64().unwrap()),
            "{row}"
        );
    }
    // A quick run has far fewer than 10 × 100,000 requests: p99.999
    // would be the maximum of a handful, so it is not printed.
    assert!(
        stdout.contains("fewer than 10 requests beyond") && stdout.contains(" | – |"),
        "{stdout}"
    );
    for size in ["350", "4096"] {
        let svg = std::fs::read_to_string(out.path().join(format!("latency-{size}-30-of-max.svg")))
            .unwrap();
        assert!(
            svg.contains("host network") && svg.contains("underpass"),
            "{svg}"
        );
    }
}
