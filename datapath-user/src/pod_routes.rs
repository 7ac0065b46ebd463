//! Attached pods' routing tables, copied into `POD_ROUTES` for the TC
//! egress program (`datapath-ebpf/src/route.rs`): a backend whose route in
//! the pod leaves by another interface (the coordinator's veth to the
//! node, with its host routes) is sent that way, and the ingress program
//! is attached there for its replies.
//!
//! A pod's namespace is named in the map by its cookie (`SO_NETNS_COOKIE`,
//! the same value `bpf_get_netns_cookie` returns inside it). Every route
//! of the main table is copied, not only the other interfaces': a more
//! specific route by the pod's own interface must win over a wider one by
//! another, as it does in the pod.

use std::{
    collections::{BTreeMap, BTreeSet},
    io,
    net::Ipv4Addr,
    path::Path,
};

use aya::maps::{LpmTrie, MapData, lpm_trie::Key};
use datapath_common::maps::{POD_ROUTE_COOKIE_BITS, PodRouteKey};
use futures::TryStreamExt;
use rtnetlink::packet_route::{
    AddressFamily,
    route::{RouteAttribute, RouteType},
};

use crate::{error::LoaderError, netns};

/// `SO_NETNS_COOKIE` (Linux 5.14).
const SO_NETNS_COOKIE: i32 = 71;

/// One IPv4 route: destination prefix and the interface it leaves by.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct PodRoute {
    pub destination: Ipv4Addr,
    pub prefix_len: u8,
    pub ifindex: u32,
}

/// The cookie of the network namespace at `path`.
pub fn netns_cookie(path: &Path) -> io::Result<u64> {
    netns::run_in(Some(path), || {
        let socket = std::net::UdpSocket::bind("127.0.0.1:0")?;
        let mut cookie = 0u64;
        let mut len = std::mem::size_of::<u64>() as libc::socklen_t;
        // SAFETY: getsockopt into a u64 of ours, its size passed.
        let rc = unsafe {
            libc::getsockopt(
                std::os::fd::AsRawFd::as_raw_fd(&socket),
                libc::SOL_SOCKET,
                SO_NETNS_COOKIE,
                (&mut cookie as *mut u64).cast(),
                &mut len,
            )
        };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(cookie)
    })?
}

/// The unicast IPv4 routes of the main table in the namespace at `path`.
pub fn routes(path: &Path) -> io::Result<Vec<PodRoute>> {
    netns::run_in(Some(path), || {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        runtime.block_on(async {
            let (connection, handle, _) = rtnetlink::new_connection()?;
            tokio::spawn(connection);
            let request = rtnetlink::RouteMessageBuilder::<Ipv4Addr>::new().build();
            let mut stream = handle.route().get(request).execute();
            let mut out = Vec::new();
            while let Some(message) = stream.try_next().await.map_err(io::Error::other)? {
                if message.header.address_family != AddressFamily::Inet
                    || message.header.kind != RouteType::Unicast
                    || message.header.table != libc::RT_TABLE_MAIN
                {
                    continue;
                }
                let mut route = PodRoute {
                    destination: Ipv4Addr::UNSPECIFIED,
                    prefix_len: message.header.destination_prefix_length,
                    ifindex: 0,
                };
                for attribute in &message.attributes {
                    match attribute {
                        RouteAttribute::Destination(
                            rtnetlink::packet_route::route::RouteAddress::Inet(address),
                        ) => route.destination = *address,
                        RouteAttribute::Oif(index) => route.ifindex = *index,
                        _ => {}
                    }
                }
                if route.ifindex != 0 {
                    out.push(route);
                }
            }
            Ok(out)
        })
    })?
}

/// What is in `POD_ROUTES` for each pod, to update and remove it.
pub struct PodRoutes {
    map: LpmTrie<MapData, PodRouteKey, u32>,
    /// Namespace name → (its cookie, the routes written for it).
    written: BTreeMap<String, (u64, BTreeSet<PodRoute>)>,
}

fn key(cookie: u64, route: &PodRoute) -> Key<PodRouteKey> {
    Key::new(
        POD_ROUTE_COOKIE_BITS + u32::from(route.prefix_len),
        PodRouteKey {
            netns_cookie: cookie,
            address_be: u32::from_ne_bytes(route.destination.octets()),
            _pad: 0,
        },
    )
}

impl PodRoutes {
    /// Opens the pinned `POD_ROUTES` under `pin_dir`.
    pub fn open(pin_dir: &Path) -> Result<Self, LoaderError> {
        let name = datapath_common::maps::POD_ROUTES_MAP;
        let data = MapData::from_pin(pin_dir.join(name)).map_err(|e| LoaderError::map(name, e))?;
        let map = aya::maps::Map::LpmTrie(data)
            .try_into()
            .map_err(|e| LoaderError::map(name, e))?;
        Ok(Self {
            map,
            written: BTreeMap::new(),
        })
    }

    /// Copies the routes of the pod in `netns` (at `path`) into the map,
    /// replacing what was there; returns them.
    pub fn sync(&mut self, netns: &str, path: &Path) -> io::Result<BTreeSet<PodRoute>> {
        let cookie = netns_cookie(path)?;
        let routes: BTreeSet<PodRoute> = routes(path)?.into_iter().collect();
        let previous = match self.written.get(netns) {
            Some((known, previous)) if *known == cookie => previous.clone(),
            Some(_) => {
                self.forget(netns);
                BTreeSet::new()
            }
            None => BTreeSet::new(),
        };
        if previous == routes {
            return Ok(routes);
        }
        for route in &routes {
            self.map
                .insert(&key(cookie, route), route.ifindex, 0)
                .map_err(io::Error::other)?;
        }
        for stale in previous.difference(&routes) {
            let _ = self.map.remove(&key(cookie, stale));
        }
        self.written
            .insert(netns.to_owned(), (cookie, routes.clone()));
        Ok(routes)
    }

    /// Removes what was written for `netns` (the pod is gone).
    pub fn forget(&mut self, netns: &str) {
        if let Some((cookie, routes)) = self.written.remove(netns) {
            for route in &routes {
                let _ = self.map.remove(&key(cookie, route));
            }
        }
    }
}
