//! Project tasks. Every task installs what it needs first, idempotently and
//! quickly when it is already there, so a fresh machine goes from clone to
//! green with `cargo xtask test` alone.
//!
//! `setup` installs (toolchains, bpf-linker, Debian packages), `image`
//! builds the DaemonSet's image, `lint` adds actionlint to fmt and clippy,
//! `cmd` runs commands; `main` says which task needs what.

mod cmd;
mod image;
mod lint;
mod setup;

use std::{env, process::Command};

use anyhow::Result;
use clap::{Parser, Subcommand};

use self::{
    cmd::{cargo_stable, require_root, run},
    image::{IMAGE_TAG, build_image},
    lint::actionlint,
    setup::{TEST_PACKAGES, build_ebpf, cargo_nightly, project_root, setup},
};

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
