//! Moves connected UDP sockets off backends that left their service.
//!
//! Socket-LB picks a UDP socket's backend once, at `connect()`, and
//! remembers it in `SOCK_REVERSE_NAT` (`SOCK_REVERSE_NAT6` for IPv6)
//! under the socket's cookie. When that backend leaves the frontend (it
//! is not even draining any more), the sockets connected to it for that frontend are destroyed
//! (`crate::sockdiag`) in the host's namespace and in every pod namespace:
//! the application sees ECONNABORTED and connects again, to a live
//! backend. Unconnected sockets are never touched (each of their datagrams
//! is translated afresh), nor sockets of other services that share the
//! backend (the reverse-NAT id must match).

use std::{
    collections::HashSet,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    path::{Path, PathBuf},
    sync::Arc,
};

use aya::maps::{HashMap, Map, MapData};
use datapath_common::{
    ipv4_be, ipv4_octets,
    maps::{self as m, SockRevNatKey, SockRevNatKey6, SockRevNatValue, SockRevNatValue6},
    port_be, port_host,
};
use tracing::{info, warn};

use crate::{
    error::LoaderError,
    metrics::Metrics,
    model::{ipv6_from_words, ipv6_words},
    reconcile::Departed,
    sockdiag,
};

/// What the agent does when backends leave UDP frontends.
pub trait SocketTerminator: Send {
    /// `departed`: of IPv4 frontends; `departed6`: of IPv6 ones.
    fn terminate(&mut self, departed: &[Departed], departed6: &[Departed<Ipv6Addr>]);
}

/// The real one: `SOCK_REVERSE_NAT` (and `SOCK_REVERSE_NAT6`) name the
/// sockets, sock_diag destroys them.
pub struct UdpSocketTerminator {
    sock_reverse_nat: HashMap<MapData, SockRevNatKey, SockRevNatValue>,
    /// `None` in pins of an agent without the IPv6 maps.
    sock_reverse_nat6: Option<HashMap<MapData, SockRevNatKey6, SockRevNatValue6>>,
    /// Pod namespaces live here (besides the host's own).
    netns_dir: PathBuf,
    metrics: Arc<Metrics>,
}

/// A departed backend as a socket's reverse-NAT entry names it: backend
/// address and port, frontend address and port, the low 16 bits of the
/// frontend's reverse-NAT id.
type Wanted<W> = (W, u16, W, u16, u16);

impl UdpSocketTerminator {
    pub fn open(
        pin_dir: &Path,
        netns_dir: PathBuf,
        metrics: Arc<Metrics>,
    ) -> Result<Self, LoaderError> {
        let maps = crate::maps::DatapathMaps::open_pinned(pin_dir)?;
        let pin6 = pin_dir.join(m::SOCK_REVERSE_NAT6_MAP);
        let sock_reverse_nat6 = if pin6.exists() {
            let name = m::SOCK_REVERSE_NAT6_MAP;
            let data = MapData::from_pin(&pin6).map_err(|source| LoaderError::map(name, source))?;
            let map = Map::from_map_data(data).map_err(|source| LoaderError::map(name, source))?;
            Some(HashMap::try_from(map).map_err(|source| LoaderError::map(name, source))?)
        } else {
            None
        };
        Ok(Self {
            sock_reverse_nat: maps.sock_reverse_nat,
            sock_reverse_nat6,
            netns_dir,
            metrics,
        })
    }

    /// The (cookie, backend) pairs of sockets socket-LB sent to a departed
    /// backend for its frontend; a socket is destroyed only while it is
    /// still connected to that very backend. The frontend is named by its
    /// address and port and the low 16 bits of its reverse-NAT id (all a
    /// socket's entry keeps: enough to tell a re-created frontend from the
    /// one the socket was sent through).
    fn doomed_cookies(
        &self,
        departed: &[Departed],
        departed6: &[Departed<Ipv6Addr>],
    ) -> HashSet<(u64, IpAddr, u16)> {
        let wanted: HashSet<Wanted<u32>> = departed
            .iter()
            .map(|d| {
                (
                    ipv4_be(d.backend.address.octets()),
                    port_be(d.backend.port),
                    ipv4_be(d.frontend.address.octets()),
                    port_be(d.frontend.port),
                    d.rev_nat_id as u16,
                )
            })
            .collect();
        let mut doomed = sockets_named(&self.sock_reverse_nat, &wanted, |key, value| {
            let socket = (
                key.cookie,
                IpAddr::V4(Ipv4Addr::from(ipv4_octets(key.backend_address_be))),
                port_host(key.backend_port_be),
            );
            let names = (
                key.backend_address_be,
                key.backend_port_be,
                value.service_address_be,
                value.service_port_be,
                value.rev_nat_low,
            );
            (names, socket)
        });
        let wanted6: HashSet<Wanted<m::Ipv6Words>> = departed6
            .iter()
            .map(|d| {
                (
                    ipv6_words(d.backend.address),
                    port_be(d.backend.port),
                    ipv6_words(d.frontend.address),
                    port_be(d.frontend.port),
                    d.rev_nat_id as u16,
                )
            })
            .collect();
        if let Some(map) = &self.sock_reverse_nat6 {
            doomed.extend(sockets_named(map, &wanted6, |key, value| {
                let socket = (
                    key.cookie,
                    IpAddr::V6(ipv6_from_words(key.backend_address_be)),
                    port_host(key.backend_port_be),
                );
                let names = (
                    key.backend_address_be,
                    key.backend_port_be,
                    value.service_address_be,
                    value.service_port_be,
                    value.rev_nat_low,
                );
                (names, socket)
            }));
        }
        doomed
    }

    fn namespaces(&self) -> Vec<Option<PathBuf>> {
        let mut namespaces = vec![None];
        if let Ok(entries) = std::fs::read_dir(&self.netns_dir) {
            namespaces.extend(entries.flatten().map(|e| Some(e.path())));
        }
        namespaces
    }
}

/// The sockets (cookie, backend address, port) of a socket-LB reverse-NAT
/// map whose entries `name` as one of `wanted` (one scan of the map; none
/// when nothing is wanted).
fn sockets_named<K, V, W>(
    map: &HashMap<MapData, K, V>,
    wanted: &HashSet<W>,
    name: impl Fn(&K, &V) -> (W, (u64, IpAddr, u16)),
) -> HashSet<(u64, IpAddr, u16)>
where
    K: aya::Pod,
    V: aya::Pod,
    W: std::hash::Hash + Eq,
{
    if wanted.is_empty() {
        return HashSet::new();
    }
    map.iter()
        .filter_map(Result::ok)
        .filter_map(|(key, value)| {
            let (names, socket) = name(&key, &value);
            wanted.contains(&names).then_some(socket)
        })
        .collect()
}

impl SocketTerminator for UdpSocketTerminator {
    fn terminate(&mut self, departed: &[Departed], departed6: &[Departed<Ipv6Addr>]) {
        let cookies = self.doomed_cookies(departed, departed6);
        if cookies.is_empty() {
            return;
        }
        let mut destroyed = 0;
        for netns in self.namespaces() {
            match sockdiag::destroy_connected_udp(netns.as_deref(), |s| {
                cookies.contains(&(s.cookie, s.peer.0, s.peer.1))
            }) {
                Ok(n) => destroyed += n,
                // A pod namespace that went away meanwhile.
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => {
                    let netns = netns
                        .as_deref()
                        .map_or("host".into(), |p| p.display().to_string());
                    warn!(netns, "destroying UDP sockets of departed backends: {e}");
                }
            }
        }
        self.metrics.udp_sockets_terminated.inc_by(destroyed as u64);
        if destroyed > 0 {
            info!(
                sockets = destroyed,
                backends = departed.len() + departed6.len(),
                "connected UDP sockets of departed backends destroyed; their applications reconnect"
            );
        }
    }
}
