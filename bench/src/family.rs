//! An address family as the benches name it (`--family 4|6`, the
//! results' `family`) and as the netfilter tools kube-proxy drives name
//! it: kube-proxy runs one proxier per family, with its own
//! `iptables`/`ip6tables` binary and `ip`/`ip6` nftables table.

use std::net::IpAddr;

/// The address family one kube-proxy proxier serves (kube-proxy runs one
/// per family: `iptables` and `ip6tables`, tables `ip` and `ip6`).
#[derive(
    Clone,
    Copy,
    Debug,
    Default,
    PartialEq,
    Eq,
    PartialOrd,
    Ord,
    serde::Serialize,
    serde::Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum IpFamily {
    #[default]
    V4,
    V6,
}

impl std::str::FromStr for IpFamily {
    type Err = String;

    /// `4`/`ipv4`, `6`/`ipv6` (as `--family` takes it).
    fn from_str(text: &str) -> Result<Self, String> {
        match text.to_ascii_lowercase().as_str() {
            "4" | "ipv4" => Ok(IpFamily::V4),
            "6" | "ipv6" => Ok(IpFamily::V6),
            other => Err(format!("{other:?}: the family is 4 (IPv4) or 6 (IPv6)")),
        }
    }
}

impl std::fmt::Display for IpFamily {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            IpFamily::V4 => "IPv4",
            IpFamily::V6 => "IPv6",
        })
    }
}

impl IpFamily {
    pub fn of(address: IpAddr) -> Self {
        if address.is_ipv6() {
            IpFamily::V6
        } else {
            IpFamily::V4
        }
    }

    /// The nftables family (and address match keyword): `ip`, `ip6`.
    pub fn nft(self) -> &'static str {
        match self {
            IpFamily::V4 => "ip",
            IpFamily::V6 => "ip6",
        }
    }

    /// The nftables address type: `ipv4_addr`, `ipv6_addr`.
    pub fn nft_addr_type(self) -> &'static str {
        match self {
            IpFamily::V4 => "ipv4_addr",
            IpFamily::V6 => "ipv6_addr",
        }
    }

    /// The loopback the nodeport rules leave out, as kube-proxy writes
    /// it in nftables rules.
    pub fn nft_loopback(self) -> &'static str {
        match self {
            IpFamily::V4 => "127.0.0.0/8",
            IpFamily::V6 => "::1",
        }
    }

    /// The iptables-restore of this family.
    pub fn iptables_restore(self) -> &'static str {
        match self {
            IpFamily::V4 => "iptables-restore",
            IpFamily::V6 => "ip6tables-restore",
        }
    }

    /// kube-proxy's iptables tables of this family as `nft list tables`
    /// names them (iptables-nft keeps them in nftables).
    pub fn iptables_tables(self) -> [&'static str; 2] {
        match self {
            IpFamily::V4 => ["ip nat", "ip filter"],
            IpFamily::V6 => ["ip6 nat", "ip6 filter"],
        }
    }
}
