//! What every task installs first, idempotently: the nightly toolchain's
//! rust-src, a bpf-linker built against its own LLVM, Rust targets, the
//! Debian packages the suites and benches use; and the eBPF build.

use std::{
    env, fs,
    path::{Path, PathBuf},
    process::Command,
    time::Instant,
};

use anyhow::{Context, Result, bail};

use crate::cmd::{cargo_stable, on_path, output, require_root, run};

/// bpf-linker release built against the nightly toolchain's own LLVM.
const BPF_LINKER_VERSION: &str = "0.13.0";
const BPF_LINKER_LLVM_FEATURE: &str = "llvm-22";

/// Debian packages the test suites use, as (command or absolute path to
/// probe, package).
/// The suites build their namespaces with netlink and drive traffic with
/// their own sockets; the kube-proxy baseline needs iptables and
/// nftables, and the benches (whose `--quick` runs are tests) the seeds'
/// tools.
pub const TEST_PACKAGES: &[(&str, &str)] = &[
    ("iptables-restore", "iptables"),
    ("nft", "nftables"),
    // Flushing conntrack between bench modes.
    ("conntrack", "conntrack"),
    ("sockperf", "sockperf"),
    ("iperf3", "iperf3"),
    ("redis-server", "redis-server"),
    ("redis-benchmark", "redis-tools"),
    ("nginx", "nginx"),
    // The reference CNI plugins the chain test runs underpass after.
    ("/usr/lib/cni/macvlan", "containernetworking-plugins"),
];

pub fn ensure_rust_target(target: &str) -> Result<()> {
    let installed = output(Command::new("rustup").args([
        "target",
        "list",
        "--installed",
        "--toolchain",
        "stable",
    ]))?;
    if installed.lines().any(|l| l.trim() == target) {
        return Ok(());
    }
    eprintln!("xtask: adding the {target} target (the image's static binary)");
    run(
        Command::new("rustup").args(["target", "add", target, "--toolchain", "stable"]),
        "rustup target add",
    )
}

pub fn project_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives in the workspace")
        .to_path_buf()
}

/// The project's own cache of built tools (ignored by git).
pub fn tools_dir(root: &Path) -> PathBuf {
    root.join(".tools")
}

pub fn setup(root: &Path, packages: &[(&str, &str)]) -> Result<()> {
    ensure_nightly_rust_src()?;
    ensure_bpf_linker(root)?;
    ensure_debian_packages(packages)
}

fn ensure_nightly_rust_src() -> Result<()> {
    let installed = output(Command::new("rustup").args([
        "component",
        "list",
        "--toolchain",
        "nightly",
        "--installed",
    ]))
    .context("rustup is needed (with the stable and nightly toolchains)")?;
    if !installed.lines().any(|l| l.starts_with("rust-src")) {
        eprintln!(
            "xtask: installing rust-src for the nightly toolchain (the eBPF crate builds core from source)"
        );
        run(
            Command::new("rustup").args(["component", "add", "rust-src", "--toolchain", "nightly"]),
            "rustup component add",
        )?;
    }
    Ok(())
}

fn nightly_sysroot() -> Result<PathBuf> {
    let sysroot = output(Command::new("rustc").args(["+nightly", "--print", "sysroot"])).context(
        "the nightly toolchain is needed for the eBPF crate: rustup toolchain install nightly",
    )?;
    Ok(PathBuf::from(sysroot.trim()))
}

fn bpf_linker_bin(root: &Path) -> PathBuf {
    tools_dir(root).join("bpf-linker/bin")
}

/// bpf-linker must link against the very libLLVM of the nightly that
/// compiles the eBPF crate, so it is built here from that library and
/// rebuilt whenever it stops running (e.g. after `rustup update nightly`).
fn ensure_bpf_linker(root: &Path) -> Result<()> {
    let linker = bpf_linker_bin(root).join("bpf-linker");
    if linker.exists() {
        let works = Command::new(&linker)
            .arg("--version")
            .output()
            .map(|o| o.status.success())
            .unwrap_or(false);
        if works {
            return Ok(());
        }
        eprintln!(
            "xtask: {} no longer runs (nightly updated?): rebuilding it",
            linker.display()
        );
    }
    let nightly_lib = nightly_sysroot()?.join("lib");
    let llvm = fs::read_dir(&nightly_lib)?
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .find(|name| name.starts_with("libLLVM.so."))
        .with_context(|| {
            format!(
                "no libLLVM.so.* in {}: is the nightly toolchain complete?",
                nightly_lib.display()
            )
        })?;
    let prefix = tools_dir(root).join("llvm");
    let lib = prefix.join("lib");
    if lib.exists() {
        fs::remove_dir_all(&lib)?;
    }
    fs::create_dir_all(&lib)?;
    // bpf-linker's build looks for libLLVM.so; at run time its RUNPATH
    // needs the versioned soname next to it.
    std::os::unix::fs::symlink(nightly_lib.join(&llvm), lib.join("libLLVM.so"))?;
    std::os::unix::fs::symlink(nightly_lib.join(&llvm), lib.join(&llvm))?;
    eprintln!(
        "xtask: building bpf-linker {BPF_LINKER_VERSION} against {llvm} (a few minutes, once)"
    );
    let started = Instant::now();
    run(
        cargo_stable()
            .env("LLVM_PREFIX", &prefix)
            .args([
                "install",
                "--locked",
                "--force",
                &format!("bpf-linker@{BPF_LINKER_VERSION}"),
            ])
            .args([
                "--no-default-features",
                "--features",
                BPF_LINKER_LLVM_FEATURE,
                "--root",
            ])
            .arg(tools_dir(root).join("bpf-linker")),
        "cargo install bpf-linker",
    )?;
    eprintln!("xtask: bpf-linker ready in {:.0?}", started.elapsed());
    Ok(())
}

pub fn ensure_debian_packages(packages: &[(&str, &str)]) -> Result<()> {
    let missing: Vec<&str> = packages
        .iter()
        .filter(|(probe, _)| {
            // A command on PATH, or a file where the package puts it.
            if probe.starts_with('/') {
                !Path::new(probe).exists()
            } else {
                !on_path(probe)
            }
        })
        .map(|(_, pkg)| *pkg)
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    if !on_path("apt-get") {
        bail!("missing packages {missing:?} and no apt-get to install them with");
    }
    require_root(&format!("installing Debian packages {missing:?}"))?;
    eprintln!("xtask: installing {missing:?}");
    run(
        Command::new("apt-get").args(["update", "-qq"]),
        "apt-get update",
    )?;
    run(
        Command::new("apt-get")
            .env("DEBIAN_FRONTEND", "noninteractive")
            .args(["install", "-y", "-qq", "--no-install-recommends"])
            .args(&missing),
        "apt-get install",
    )
}

pub fn build_ebpf(root: &Path) -> Result<()> {
    run(
        cargo_nightly(root)
            .current_dir(root.join("datapath-ebpf"))
            .args(["build", "--release"]),
        "building the eBPF object",
    )
}

/// cargo on the nightly toolchain, with our bpf-linker first on PATH.
pub fn cargo_nightly(root: &Path) -> Command {
    let mut cmd = Command::new("cargo");
    cmd.env("RUSTUP_TOOLCHAIN", "nightly");
    let path = env::var_os("PATH").unwrap_or_default();
    let mut paths = vec![bpf_linker_bin(root)];
    paths.extend(env::split_paths(&path));
    cmd.env("PATH", env::join_paths(paths).expect("valid PATH"));
    cmd
}
