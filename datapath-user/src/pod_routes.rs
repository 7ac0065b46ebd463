//! Attached pods' routing tables, copied into `POD_ROUTES` (IPv4) and
//! `POD_ROUTES6` (IPv6, when the IPv6 maps are sized) for the TC egress
//! programs (`datapath-ebpf/src/route.rs`): a backend whose route in the
//! pod leaves by another interface (the coordinator's veth to the node,
//! with its host routes) is sent that way, and the ingress program is
//! attached there for its replies.
//!
//! A pod's namespace is named in the map by its cookie (`SO_NETNS_COOKIE`,
//! the same value `bpf_get_netns_cookie` returns inside it). Every route
//! of the main table is copied, not only the other interfaces': a more
//! specific route by the pod's own interface must win over a wider one by
//! another, as it does in the pod.

use std::{
    collections::{BTreeMap, BTreeSet},
    io,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    path::Path,
};

use aya::maps::{LpmTrie, MapData, lpm_trie::Key};
use datapath_common::maps::{POD_ROUTE_COOKIE_BITS, PodRouteKey, PodRouteKey6};
use futures::TryStreamExt;
use rtnetlink::packet_route::{
    AddressFamily,
    route::{RouteAttribute, RouteType},
};

use crate::{error::LoaderError, netns};

/// `SO_NETNS_COOKIE` (Linux 5.14).
const SO_NETNS_COOKIE: i32 = 71;

/// One route of either family: destination prefix and the interface it
/// leaves by.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct PodRoute {
    pub destination: IpAddr,
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

/// The unicast routes of the main table in the namespace at `path`, both
/// families.
pub fn routes(path: &Path) -> io::Result<Vec<PodRoute>> {
    netns::run_in(Some(path), || {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        runtime.block_on(async {
            let (connection, handle, _) = rtnetlink::new_connection()?;
            tokio::spawn(connection);
            let mut out = Vec::new();
            for request in [
                rtnetlink::RouteMessageBuilder::<Ipv4Addr>::new().build(),
                rtnetlink::RouteMessageBuilder::<Ipv6Addr>::new().build(),
            ] {
                let mut stream = handle.route().get(request).execute();
                while let Some(message) = stream.try_next().await.map_err(io::Error::other)? {
                    if let Some(route) = unicast_main_route(&message) {
                        out.push(route);
                    }
                }
            }
            Ok(out)
        })
    })?
}

/// The route `message` describes, if it is a unicast route of the main
/// table leaving by an interface.
fn unicast_main_route(message: &rtnetlink::packet_route::route::RouteMessage) -> Option<PodRoute> {
    use rtnetlink::packet_route::route::RouteAddress;
    let family = message.header.address_family;
    if !matches!(family, AddressFamily::Inet | AddressFamily::Inet6)
        || message.header.kind != RouteType::Unicast
        || message.header.table != libc::RT_TABLE_MAIN
    {
        return None;
    }
    let mut route = PodRoute {
        destination: if family == AddressFamily::Inet {
            Ipv4Addr::UNSPECIFIED.into()
        } else {
            Ipv6Addr::UNSPECIFIED.into()
        },
        prefix_len: message.header.destination_prefix_length,
        ifindex: 0,
    };
    for attribute in &message.attributes {
        match attribute {
            RouteAttribute::Destination(RouteAddress::Inet(address)) => {
                route.destination = (*address).into()
            }
            RouteAttribute::Destination(RouteAddress::Inet6(address)) => {
                route.destination = (*address).into()
            }
            RouteAttribute::Oif(index) => route.ifindex = *index,
            _ => {}
        }
    }
    (route.ifindex != 0).then_some(route)
}

/// Whether `route` is copied (and its interface gets the ingress program
/// for replies): IPv6 routes only when `ipv6` (`POD_ROUTES6` is sized),
/// and never link-local ones (`fe80::/64` is on every interface with
/// IPv6, and no backend is link-local).
fn copied(route: &PodRoute, ipv6: bool) -> bool {
    match route.destination {
        IpAddr::V4(_) => true,
        IpAddr::V6(destination) => ipv6 && !destination.is_unicast_link_local(),
    }
}

/// What is in `POD_ROUTES`/`POD_ROUTES6` for each pod, to update and
/// remove it.
pub struct PodRoutes {
    map: LpmTrie<MapData, PodRouteKey, u32>,
    /// `None` while the IPv6 maps are not sized (`--ipv6 off`: one
    /// entry): IPv6 routes are then not copied.
    map6: Option<LpmTrie<MapData, PodRouteKey6, u32>>,
    /// Namespace name → (its cookie, the routes written for it).
    written: BTreeMap<String, (u64, BTreeSet<PodRoute>)>,
}

fn key(cookie: u64, destination: Ipv4Addr, prefix_len: u8) -> Key<PodRouteKey> {
    Key::new(
        POD_ROUTE_COOKIE_BITS + u32::from(prefix_len),
        PodRouteKey {
            netns_cookie: cookie,
            address_be: u32::from_ne_bytes(destination.octets()),
            _pad: 0,
        },
    )
}

fn key6(cookie: u64, destination: Ipv6Addr, prefix_len: u8) -> Key<PodRouteKey6> {
    Key::new(
        POD_ROUTE_COOKIE_BITS + u32::from(prefix_len),
        PodRouteKey6 {
            netns_cookie: cookie,
            address_be: crate::model::ipv6_words(destination),
        },
    )
}

impl PodRoutes {
    /// Opens the pinned `POD_ROUTES` and `POD_ROUTES6` under `pin_dir`.
    pub fn open(pin_dir: &Path) -> Result<Self, LoaderError> {
        let open = |name: &'static str| -> Result<MapData, LoaderError> {
            MapData::from_pin(pin_dir.join(name)).map_err(|e| LoaderError::map(name, e))
        };
        let name = datapath_common::maps::POD_ROUTES_MAP;
        let map = aya::maps::Map::LpmTrie(open(name)?)
            .try_into()
            .map_err(|e| LoaderError::map(name, e))?;
        // IPv6 routes only where the IPv6 maps are sized (one entry
        // under `--ipv6 off`); a map that cannot be opened costs the IPv6
        // half alone.
        let name6 = datapath_common::maps::POD_ROUTES6_MAP;
        let map6 = match open(name6).and_then(|data| {
            let sized = data
                .info()
                .map_err(|e| LoaderError::map(name6, e))?
                .max_entries()
                > 1;
            if !sized {
                return Ok(None);
            }
            aya::maps::Map::LpmTrie(data)
                .try_into()
                .map(Some)
                .map_err(|e| LoaderError::map(name6, e))
        }) {
            Ok(map6) => map6,
            Err(e) => {
                tracing::warn!(
                    "IPv6 pod routes unavailable: IPv6 backends behind another pod interface will not be reached ({e})"
                );
                None
            }
        };
        Ok(Self {
            map,
            map6,
            written: BTreeMap::new(),
        })
    }

    fn insert(&mut self, cookie: u64, route: &PodRoute) -> io::Result<()> {
        match route.destination {
            IpAddr::V4(destination) => self
                .map
                .insert(
                    &key(cookie, destination, route.prefix_len),
                    route.ifindex,
                    0,
                )
                .map_err(io::Error::other),
            IpAddr::V6(destination) => {
                if let Some(map6) = &mut self.map6
                    && let Err(e) = map6.insert(
                        &key6(cookie, destination, route.prefix_len),
                        route.ifindex,
                        0,
                    )
                {
                    // The IPv6 half alone: the pod's IPv4 routes (and the
                    // reply programs they keep) stay.
                    tracing::warn!(
                        "IPv6 pod route {destination}/{} not copied: {e}",
                        route.prefix_len
                    );
                }
                Ok(())
            }
        }
    }

    fn remove(&mut self, cookie: u64, route: &PodRoute) {
        match route.destination {
            IpAddr::V4(destination) => {
                let _ = self.map.remove(&key(cookie, destination, route.prefix_len));
            }
            IpAddr::V6(destination) => {
                if let Some(map6) = &mut self.map6 {
                    let _ = map6.remove(&key6(cookie, destination, route.prefix_len));
                }
            }
        }
    }

    /// Copies the routes of the pod in `netns` (at `path`) into the map,
    /// replacing what was there; returns them.
    pub fn sync(&mut self, netns: &str, path: &Path) -> io::Result<BTreeSet<PodRoute>> {
        let cookie = netns_cookie(path)?;
        let routes: BTreeSet<PodRoute> = routes(path)?
            .into_iter()
            .filter(|route| copied(route, self.map6.is_some()))
            .collect();
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
            self.insert(cookie, route)?;
        }
        for stale in previous.difference(&routes) {
            // A key another interface's route still has (the same prefix)
            // was just written for it: not removed.
            if !routes
                .iter()
                .any(|r| (r.destination, r.prefix_len) == (stale.destination, stale.prefix_len))
            {
                self.remove(cookie, stale);
            }
        }
        self.written
            .insert(netns.to_owned(), (cookie, routes.clone()));
        Ok(routes)
    }

    /// Removes what was written for `netns` (the pod is gone).
    pub fn forget(&mut self, netns: &str) {
        if let Some((cookie, routes)) = self.written.remove(netns) {
            for route in &routes {
                self.remove(cookie, route);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn route(destination: &str, prefix_len: u8) -> PodRoute {
        PodRoute {
            destination: destination.parse().unwrap(),
            prefix_len,
            ifindex: 3,
        }
    }

    #[test]
    fn ipv6_routes_are_copied_only_when_sized_and_never_link_local_ones() {
        let v4 = route("169.254.1.1", 32);
        let v6 = route("fd77::65", 128);
        let default6 = route("::", 0);
        let link_local = route("fe80::", 64);
        assert!(copied(&v4, false) && copied(&v4, true));
        assert!(!copied(&v6, false) && copied(&v6, true));
        assert!(copied(&default6, true));
        assert!(!copied(&link_local, true));
    }
}
