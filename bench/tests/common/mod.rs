//! What the `--quick` bench tests share: running `bench` with
//! `--quick --json FILE` and reading what it printed and wrote.

use std::process::Command;

/// Runs `bench <args> --quick --json <a temporary file>`; its stdout and
/// its JSON. Fails the test, with both output streams, when it fails.
pub fn quick_run(args: &[&str]) -> (String, serde_json::Value) {
    let json = tempfile::Builder::new()
        .prefix("bench-quick-")
        .suffix(".json")
        .tempfile()
        .unwrap();
    let output = Command::new(env!("CARGO_BIN_EXE_bench"))
        .args(args)
        .args(["--quick", "--json"])
        .arg(json.path())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    assert!(
        output.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let results = serde_json::from_slice(&std::fs::read(json.path()).unwrap()).unwrap();
    (stdout, results)
}
