//! `bench scale --quick`: every datapath is programmed from the objects,
//! resynced, measured with TCP_CRR to the middle and the last service and
//! changed at small sizes (the kube-proxy payloads
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
    let results: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.path().join("scale.json")).unwrap()).unwrap();
    assert!(
        results["offloads"].as_array().unwrap().len() >= 4,
        "{results}"
    );
    let points = results["points"].as_array().unwrap();
    assert_eq!(
        points.len(),
        12,
        "2 sizes × 2 endpoint counts × 3 datapaths"
    );
    for p in points {
        for figure in [
            "program_ms",
            "resync_ms",
            "change_p50_ms",
            "change_max_ms",
            "crr_middle_per_second",
            "crr_last_per_second",
        ] {
            assert!(p[figure].as_f64().unwrap() > 0.0, "{figure}: {p}");
        }
        assert!(p["change_samples"].as_u64().unwrap() >= 4, "{p}");
        let runs = p["crr_runs"].as_array().unwrap();
        assert_eq!(runs.len(), 2, "the middle and the last service: {p}");
        for run in runs {
            assert_eq!(run["measurement"]["errors"].as_u64(), Some(0), "{p}");
        }
    }
    for chart in [
        "scale-program.svg",
        "scale-resync.svg",
        "scale-change.svg",
        "scale-crr-rate.svg",
        "scale-crr-rate-last.svg",
        "scale-crr-p99.svg",
        "scale-crr-p99-last.svg",
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
