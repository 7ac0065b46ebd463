//! Neighbour entries on the uplink for backends on other nodes: the
//! uplink program sends their flows out with the MAC the kernel's
//! neighbour table holds (`bpf_fib_lookup`), and nothing else on the node
//! talks to those pods to resolve it. Each such backend gets a *managed*
//! entry (`NTF_EXT_MANAGED`, Linux 5.16, as Cilium keeps them): the
//! kernel resolves it and keeps it reachable by itself. Only entries this
//! agent added are removed.

use std::{
    collections::BTreeSet,
    io,
    net::{IpAddr, Ipv4Addr},
    path::PathBuf,
};

use futures::TryStreamExt;
use rtnetlink::packet_route::neighbour::{
    NeighbourAttribute, NeighbourExtFlags, NeighbourFlags, NeighbourState,
};

use crate::netns;

/// The managed entries kept on the uplink.
#[derive(Debug)]
pub(super) struct UplinkNeighbours {
    netns: Option<PathBuf>,
    ifindex: u32,
    kept: BTreeSet<Ipv4Addr>,
}

impl UplinkNeighbours {
    pub(super) fn new(netns: Option<PathBuf>, ifindex: u32) -> Self {
        Self {
            netns,
            ifindex,
            kept: BTreeSet::new(),
        }
    }

    /// Keeps a managed entry for each of `wanted`, and none for any
    /// other backend this agent added one for.
    pub(super) fn sync(&mut self, wanted: BTreeSet<Ipv4Addr>) -> io::Result<()> {
        let add: Vec<Ipv4Addr> = wanted.difference(&self.kept).copied().collect();
        let remove: Vec<Ipv4Addr> = self.kept.difference(&wanted).copied().collect();
        if add.is_empty() && remove.is_empty() {
            return Ok(());
        }
        let ifindex = self.ifindex;
        let (add2, remove2) = (add.clone(), remove.clone());
        netns::run_in(self.netns.as_deref(), move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            runtime.block_on(async move {
                let (connection, handle, _) = rtnetlink::new_connection()?;
                tokio::spawn(connection);
                for address in add2 {
                    let mut request = handle
                        .neighbours()
                        .add(ifindex, IpAddr::V4(address))
                        .state(NeighbourState::None)
                        .flags(NeighbourFlags::ExtLearned)
                        .replace();
                    request
                        .message_mut()
                        .attributes
                        .push(NeighbourAttribute::ExtFlags(NeighbourExtFlags::Managed));
                    request.execute().await.map_err(io::Error::other)?;
                }
                if !remove2.is_empty() {
                    let mut entries = handle.neighbours().get().execute();
                    let mut ours = Vec::new();
                    while let Some(entry) = entries.try_next().await.map_err(io::Error::other)? {
                        let address = entry.attributes.iter().find_map(|a| match a {
                            NeighbourAttribute::Destination(
                                rtnetlink::packet_route::neighbour::NeighbourAddress::Inet(v4),
                            ) => Some(*v4),
                            _ => None,
                        });
                        if entry.header.ifindex == ifindex
                            && address.is_some_and(|a| remove2.contains(&a))
                        {
                            ours.push(entry);
                        }
                    }
                    for entry in ours {
                        handle
                            .neighbours()
                            .del(entry)
                            .execute()
                            .await
                            .map_err(io::Error::other)?;
                    }
                }
                Ok::<_, io::Error>(())
            })
        })??;
        self.kept.extend(add);
        for address in remove {
            self.kept.remove(&address);
        }
        Ok(())
    }
}
