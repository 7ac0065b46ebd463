//! Running commands: cargo on either toolchain, any command with its
//! time printed and a failure named, root required where it must be.

use std::{
    env,
    process::{Command, ExitStatus},
};

use anyhow::{Context, Result, bail};

pub fn cargo_stable() -> Command {
    let mut cmd = Command::new("cargo");
    // Make sure a rust-toolchain file in a sub-crate cannot switch us.
    cmd.env("RUSTUP_TOOLCHAIN", "stable");
    cmd
}

pub fn on_path(cmd: &str) -> bool {
    env::var_os("PATH")
        .is_some_and(|paths| env::split_paths(&paths).any(|dir| dir.join(cmd).is_file()))
}

pub fn require_root(why: &str) -> Result<()> {
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

pub fn run(cmd: &mut Command, what: &str) -> Result<()> {
    let status: ExitStatus = cmd
        .status()
        .with_context(|| format!("{what}: could not start {:?}", cmd.get_program()))?;
    if !status.success() {
        bail!("{what} failed ({status})");
    }
    Ok(())
}

pub fn output(cmd: &mut Command) -> Result<String> {
    let out = cmd.output()?;
    if !out.status.success() {
        bail!("{:?} failed: {}", cmd, String::from_utf8_lossy(&out.stderr));
    }
    Ok(String::from_utf8(out.stdout)?)
}
