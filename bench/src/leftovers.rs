//! Leaving nothing of one mode in the next: netfilter tables a mode made
//! deleted whole (base chains too, so no hook — and no conntrack —
//! stays registered in the namespace), conntrack flushed and TIME_WAIT
//! sockets closed between modes (TCP_CRR leaves tens of thousands of
//! each; the next mode's connect() would search past them), and every
//! namespace checked clean instead of assumed so.

use std::process::Command;

use anyhow::{Context, Result, bail, ensure};
use lab::Namespace;

use crate::family::IpFamily;

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
    ensure_no_legacy_tables(namespace, why)
}

/// Fails if `namespace` has iptables-legacy tables of either family
/// (which `nft list tables` does not show).
pub fn ensure_no_legacy_tables(namespace: &Namespace, why: &str) -> Result<()> {
    // Debian's iptables package has them; absent, there are no legacy
    // tables to look for.
    for save in ["iptables-legacy-save", "ip6tables-legacy-save"] {
        let legacy = match output_in(namespace, save, &[]) {
            Ok(text) => text,
            Err(error) if which(save) => return Err(error),
            Err(_) => String::new(),
        };
        let legacy_tables: Vec<&str> = legacy.lines().filter(|l| l.starts_with('*')).collect();
        ensure!(
            legacy_tables.is_empty(),
            "{why}: {} still has {save} tables {legacy_tables:?}",
            namespace.name()
        );
    }
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
    // Packets of connections still closing (a FIN, its ACK) can track
    // themselves anew right after a flush: flush until the table stays
    // empty, for a moment at most.
    for _ in 0..20 {
        // `conntrack -F` answers on stderr and exits 0 also on an empty
        // table.
        output_in(namespace, "conntrack", &["-F"])?;
        let count = output_in(namespace, "conntrack", &["-C"])?;
        let count: u64 = count
            .trim()
            .parse()
            .with_context(|| format!("conntrack -C printed {count:?}"))?;
        if count == 0 {
            return Ok(());
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let left = output_in(namespace, "conntrack", &["-L"]).unwrap_or_default();
    bail!(
        "{}'s conntrack table keeps filling after flushes (traffic still running?):\n{}",
        namespace.name(),
        left.trim()
    )
}

/// Closes every TIME_WAIT socket in `namespace` (`ss -K`, through
/// sock_diag's destroy) and checks none is left.
pub fn close_time_wait(namespace: &Namespace) -> Result<()> {
    // A connection still closing (the last FIN of the pass before) can
    // enter TIME_WAIT just after a pass of `ss -K`: close until none is
    // left, for a moment at most, as `flush_conntrack` does.
    let mut count = 0;
    for _ in 0..20 {
        output_in(namespace, "ss", &["-K", "-tan", "state", "time-wait"])?;
        let left = output_in(namespace, "ss", &["-H", "-tan", "state", "time-wait"])?;
        count = left.lines().filter(|l| !l.trim().is_empty()).count();
        if count == 0 {
            return Ok(());
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    bail!(
        "{count} TIME_WAIT sockets left in {} after `ss -K` (a kernel without \
         CONFIG_INET_DIAG_DESTROY?)",
        namespace.name()
    )
}

/// Fails unless `family`'s iptables (`iptables`, `ip6tables`: Debian
/// switches them apart) is iptables-nft, Debian's default: the bench
/// deletes kube-proxy's tables through `nft` and checks them gone there.
pub fn require_iptables_nft(family: IpFamily) -> Result<()> {
    let program = match family {
        IpFamily::V4 => "iptables",
        IpFamily::V6 => "ip6tables",
    };
    let output = Command::new(program)
        .arg("-V")
        .output()
        .with_context(|| format!("running {program} -V"))?;
    let version = String::from_utf8_lossy(&output.stdout);
    ensure!(
        version.contains("nf_tables"),
        "`{program} -V` says {:?}: the bench needs the nf_tables backend \
         (update-alternatives --set {program} /usr/sbin/{program}-nft)",
        version.trim()
    );
    Ok(())
}

/// Whether `program` is on the PATH.
fn which(program: &str) -> bool {
    std::env::var_os("PATH")
        .is_some_and(|path| std::env::split_paths(&path).any(|dir| dir.join(program).is_file()))
}
