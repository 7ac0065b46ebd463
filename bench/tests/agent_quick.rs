//! `bench agent` at a small size: the in-process sync and changes, the
//! real agent binary's start and memory, and edits timed end to end
//! (manifest renamed into `--from-dir` → the pinned maps hold the new
//! endpoint). Asserts that every figure is there, nothing about speed.

use std::process::Command;

#[test]
fn every_figure_is_measured() {
    bench::require_root("bench agent").unwrap();
    let output = Command::new(env!("CARGO_BIN_EXE_bench"))
        .args([
            "agent",
            "--services",
            "200",
            "--endpoints",
            "3",
            "--changes",
            "20",
            "--edits",
            "10",
            "--json",
        ])
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "{}\n{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    let figures: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(figures["changes"], 20, "{figures}");
    assert_eq!(figures["edits"], 10, "{figures}");
    for figure in [
        "sync_ms",
        "change_p99_us",
        "process_ready_ms",
        "process_rss_mib",
        "edit_p50_ms",
        "edit_p99_ms",
    ] {
        assert!(
            figures[figure].as_f64().is_some_and(|v| v > 0.0),
            "{figure}: {figures}"
        );
    }
    // A renamed file is seen by its change event, not by the 500 ms poll.
    assert!(
        figures["edit_p50_ms"].as_f64().unwrap() < 400.0,
        "edits waited for the poll: {figures}"
    );
}
