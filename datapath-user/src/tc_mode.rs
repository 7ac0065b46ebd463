//! How TC programs are attached: TCX links or clsact filters.

use std::fmt;

/// How TC programs are attached.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum TcMode {
    /// TCX where the kernel has it (6.6+), else clsact + netlink.
    #[default]
    Auto,
    /// TCX bpf_links (kernel 6.6+); pinnable.
    Tcx,
    /// clsact qdisc + cls_bpf filters over netlink (any kernel); not
    /// pinnable, detached when the handle drops.
    Netlink,
}

impl fmt::Display for TcMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            TcMode::Auto => "auto",
            TcMode::Tcx => "TCX",
            TcMode::Netlink => "clsact/netlink",
        })
    }
}
