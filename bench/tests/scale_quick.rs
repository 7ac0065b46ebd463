//! `bench scale --quick`: every datapath is programmed, measured with
//! TCP_CRR through it and updated at small sizes (the kube-proxy payloads
//! loaded for real in the bench's node namespace; asserting nothing
//! about speed), and the plots are written.

use std::process::Command;

#[test]
fn every_point_runs_and_is_plotted() {
    bench::require_root("bench scale").unwrap();
    let out = tempfile::tempdir().unwrap();
    let output = Command::new(env!("CARGO_BIN_EXE_bench"))
        .args(["scale", "--quick", "--out"])
        .arg(out.path())
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "{}\n{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    let points: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.path().join("scale.json")).unwrap()).unwrap();
    let points = points.as_array().unwrap();
    assert_eq!(
        points.len(),
        12,
        "2 sizes × 2 endpoint counts × 3 datapaths"
    );
    for p in points {
        assert!(p["program_ms"].as_f64().unwrap() > 0.0, "{p}");
        assert!(p["one_change_ms"].as_f64().unwrap() > 0.0, "{p}");
        assert!(p["crr_per_second"].as_f64().unwrap() > 0.0, "{p}");
        assert_eq!(p["crr_runs"][0]["errors"].as_u64(), Some(0), "{p}");
    }
    for chart in [
        "scale-program.svg",
        "scale-change.svg",
        "scale-crr-rate.svg",
        "scale-crr-p99.svg",
    ] {
        let svg = std::fs::read_to_string(out.path().join(chart)).unwrap();
        assert!(svg.starts_with("<svg"), "{chart}");
        assert!(
            svg.contains("kube-proxy iptables (1 endpoint)"),
            "{chart}: {svg}"
        );
        assert!(svg.contains("underpass (10 endpoints)"), "{chart}");
    }
}
