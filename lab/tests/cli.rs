//! `underpass-lab`'s commands as the tests and the demo run them. (Also
//! what makes `cargo test --workspace` build the binary: the agent's
//! suites run their pods' clients as `underpass-lab probe`.)

use std::process::Command;

#[test]
fn a_probe_into_a_missing_namespace_says_which() {
    let output = Command::new(env!("CARGO_BIN_EXE_underpass-lab"))
        .args(["probe", "--netns", "/nonexistent/up-missing"])
        .args(["--target", "10.96.0.10:80"])
        .output()
        .expect("running underpass-lab");
    assert!(!output.status.success(), "a probe that cannot start fails");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("entering network namespace /nonexistent/up-missing"),
        "the error names the namespace: {stderr}"
    );
    assert!(output.stdout.is_empty(), "and reports no request");
}

#[test]
fn help_lists_the_demo_and_the_probe() {
    let output = Command::new(env!("CARGO_BIN_EXE_underpass-lab"))
        .arg("--help")
        .output()
        .expect("running underpass-lab");
    let help = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success());
    for command in ["demo", "probe"] {
        assert!(help.contains(command), "{command} missing from:\n{help}");
    }
}
