//! Which namespaces and interfaces are pods' underlay interfaces: the
//! selector, and the interfaces a namespace holds (name, kind, index,
//! MAC, parent, IPv4 addresses).

use std::{io, path::Path};

use futures::TryStreamExt;
use rtnetlink::packet_route::{
    address::AddressAttribute,
    link::{InfoKind, LinkAttribute, LinkFlags, LinkInfo},
};

use crate::netns;

/// Which namespaces and interfaces get the programs.
#[derive(Clone, Debug)]
pub struct Selector {
    /// Namespace names (file names in the directory).
    pub netns: glob::Pattern,
    /// Link kinds, as `ip -d link` shows them (macvlan, ipvlan…).
    pub kinds: Vec<String>,
    /// Interface names selected whatever their kind (SR-IOV VFs show no
    /// kind).
    pub names: Option<glob::Pattern>,
}

impl Default for Selector {
    fn default() -> Self {
        Self {
            netns: glob::Pattern::new("*").expect("valid pattern"),
            kinds: vec!["macvlan".into(), "ipvlan".into()],
            names: None,
        }
    }
}

impl Selector {
    pub fn selects(&self, link: &LinkSummary) -> bool {
        // Down: still being set up. CNI plugins create an interface under
        // a temporary name and rename it (which needs it down) before
        // bringing it up; attaching earlier would pin the temporary name.
        if link.name == "lo" || !link.up {
            return false;
        }
        let by_kind = link
            .kind
            .as_ref()
            .is_some_and(|k| self.kinds.iter().any(|want| want == k));
        let by_name = self.names.as_ref().is_some_and(|p| p.matches(&link.name));
        by_kind || by_name
    }
}

/// One interface as netlink lists it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LinkSummary {
    pub name: String,
    /// None for physical devices and VFs.
    pub kind: Option<String>,
    /// Administratively up.
    pub up: bool,
    pub index: u32,
    /// Its MAC (None: a device without one).
    pub mac: Option<[u8; 6]>,
    /// The device it is a child of (a macvlan's or ipvlan's parent), by
    /// index in the parent's namespace.
    pub parent: Option<u32>,
    /// Its IPv4 addresses.
    pub ipv4: Vec<std::net::Ipv4Addr>,
}

/// The interfaces inside the namespace at `path`.
pub fn list_links(path: &Path) -> io::Result<Vec<LinkSummary>> {
    netns::run_in(Some(path), || {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        runtime.block_on(async {
            let (connection, handle, _) = rtnetlink::new_connection()?;
            tokio::spawn(connection);
            let mut links = handle.link().get().execute();
            let mut out = Vec::new();
            while let Some(message) = links.try_next().await.map_err(io::Error::other)? {
                let mut summary = LinkSummary {
                    name: String::new(),
                    kind: None,
                    up: message.header.flags.contains(LinkFlags::Up),
                    index: message.header.index,
                    mac: None,
                    parent: None,
                    ipv4: Vec::new(),
                };
                for attribute in &message.attributes {
                    match attribute {
                        LinkAttribute::IfName(name) => summary.name = name.clone(),
                        LinkAttribute::Address(mac) => summary.mac = mac.as_slice().try_into().ok(),
                        LinkAttribute::Link(parent) => summary.parent = Some(*parent),
                        LinkAttribute::LinkInfo(infos) => {
                            for info in infos {
                                if let LinkInfo::Kind(kind) = info {
                                    summary.kind = Some(kind_name(kind));
                                }
                            }
                        }
                        _ => {}
                    }
                }
                out.push(summary);
            }
            let mut addresses = handle.address().get().execute();
            while let Some(message) = addresses.try_next().await.map_err(io::Error::other)? {
                let Some(link) = out.iter_mut().find(|l| l.index == message.header.index) else {
                    continue;
                };
                for attribute in &message.attributes {
                    if let AddressAttribute::Address(std::net::IpAddr::V4(address)) = attribute
                        && !link.ipv4.contains(address)
                    {
                        link.ipv4.push(*address);
                    }
                }
            }
            Ok(out)
        })
    })?
}

fn kind_name(kind: &InfoKind) -> String {
    match kind {
        InfoKind::MacVlan => "macvlan".into(),
        InfoKind::IpVlan => "ipvlan".into(),
        InfoKind::MacVtap => "macvtap".into(),
        InfoKind::Veth => "veth".into(),
        InfoKind::Other(name) => name.clone(),
        other => format!("{other:?}").to_lowercase(),
    }
}
