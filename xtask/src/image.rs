//! `cargo xtask image`: the static musl binary and the `FROM scratch`
//! image built from it with podman, offline.

use std::{fs, path::Path, process::Command};

use anyhow::{Context, Result};

use crate::{
    cmd::{cargo_stable, output, run},
    setup::{build_ebpf, ensure_rust_target, setup},
};

/// What `cargo xtask image` needs, and the test that runs the image:
/// podman (which builds with buildah's code), runc (crun, podman's
/// default, refuses hybrid cgroup hosts) and musl-gcc (ring's C and
/// assembly for the static binary).
pub const IMAGE_PACKAGES: &[(&str, &str)] = &[
    ("podman", "podman"),
    ("runc", "runc"),
    ("musl-gcc", "musl-tools"),
];

/// The static target of the image's binary.
pub const IMAGE_TARGET: &str = "x86_64-unknown-linux-musl";

/// The tag `cargo xtask image` gives the image and the tests run.
pub const IMAGE_TAG: &str = "localhost/underpass:dev";
/// Builds the static binary and the image from it (`Task::Image`).
pub fn build_image(root: &Path, tag: &str) -> Result<()> {
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
