//! `bench scale --quick`: every datapath is programmed and updated at
//! small sizes (the kube-proxy payloads are loaded for real, in
//! namespaces the bench creates; asserting nothing about speed).

use std::process::Command;

#[test]
fn every_point_runs() {
    bench::require_root("bench scale").unwrap();
    let json = std::env::temp_dir().join(format!("scale-quick-{}.json", std::process::id()));
    let output = Command::new(env!("CARGO_BIN_EXE_bench"))
        .args(["scale", "--quick", "--json"])
        .arg(&json)
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "{}\n{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    let points: serde_json::Value = serde_json::from_slice(&std::fs::read(&json).unwrap()).unwrap();
    let _ = std::fs::remove_file(&json);
    let points = points.as_array().unwrap();
    assert_eq!(
        points.len(),
        12,
        "2 sizes × 2 endpoint counts × 3 datapaths"
    );
    for p in points {
        assert!(p["program_ms"].as_f64().unwrap() > 0.0, "{p}");
        assert!(p["one_change_ms"].as_f64().unwrap() > 0.0, "{p}");
    }
}
