//! Leaving nothing of one mode in the next: netfilter tables a mode made
//! deleted whole (base chains too, so no hook — and no conntrack —
//! stays registered in the namespace), conntrack flushed between modes,
//! and a namespace checked empty instead of assumed so.

use std::process::Command;

use anyhow::{Context, Result, bail, ensure};
use lab::Namespace;

/// `program args` inside `namespace`; its stdout.
pub(crate) fn output_in(namespace: &Namespace, program: &str, args: &[&str]) -> Result<String> {
    let output = namespace
        .run(|| Command::new(program).args(args).output())?
        .with_context(|| format!("running {program} in {}", namespace.name()))?;
    if !output.status.success() {
        bail!(
            "{program} {} in {}: {}",
            args.join(" "),
            namespace.name(),
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

/// The nftables tables in `namespace` (`ip nat`, `ip kube-proxy`, …);
/// iptables-nft's tables are among them.
pub(crate) fn tables(namespace: &Namespace) -> Result<Vec<String>> {
    let listing = output_in(namespace, "nft", &["list", "tables"])?;
    Ok(listing
        .lines()
        .filter_map(|l| l.trim().strip_prefix("table "))
        .map(str::to_owned)
        .collect())
}

/// Deletes the table `family name` if it exists (`ip nat`: iptables-nft's
/// nat table with its base chains, which `iptables -F -X` would leave
/// hooked in).
pub(crate) fn delete_table(namespace: &Namespace, family_and_name: &str) -> Result<()> {
    if !tables(namespace)?.iter().any(|t| t == family_and_name) {
        return Ok(());
    }
    let mut args = vec!["delete", "table"];
    args.extend(family_and_name.split_whitespace());
    output_in(namespace, "nft", &args).map(drop)
}

/// Fails unless `namespace` has no netfilter table at all, nftables or
/// iptables-legacy (whose tables `nft` does not list).
pub fn ensure_no_rules(namespace: &Namespace, why: &str) -> Result<()> {
    let left = tables(namespace)?;
    ensure!(
        left.is_empty(),
        "{why}: {} still has netfilter tables {left:?}",
        namespace.name()
    );
    let legacy = output_in(namespace, "iptables-legacy-save", &[]).unwrap_or_default();
    let legacy_tables: Vec<&str> = legacy.lines().filter(|l| l.starts_with('*')).collect();
    ensure!(
        legacy_tables.is_empty(),
        "{why}: {} still has iptables-legacy tables {legacy_tables:?}",
        namespace.name()
    );
    Ok(())
}

/// Deletes every conntrack entry in `namespace` and checks none is left,
/// so that one mode's TIME_WAIT entries do not meet the next mode.
/// Nothing to do where conntrack never loaded.
pub fn flush_conntrack(namespace: &Namespace) -> Result<()> {
    let loaded = namespace
        .run(|| std::path::Path::new("/proc/sys/net/netfilter/nf_conntrack_count").exists())?;
    if !loaded {
        return Ok(());
    }
    // `conntrack -F` answers on stderr and exits 0 also on an empty table.
    output_in(namespace, "conntrack", &["-F"])?;
    let count = output_in(namespace, "conntrack", &["-C"])?;
    let count: u64 = count
        .trim()
        .parse()
        .with_context(|| format!("conntrack -C printed {count:?}"))?;
    ensure!(
        count == 0,
        "{} entries left in {}'s conntrack table after a flush (traffic still running?)",
        count,
        namespace.name()
    );
    Ok(())
}
