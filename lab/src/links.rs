//! Netlink steps every wiring step shares: lookups by interface name, raising a link, adding an address or a route.

use futures::TryStreamExt;
use rtnetlink::{Handle, LinkUnspec};

pub async fn link_by_name(
    handle: &Handle,
    name: &str,
) -> std::result::Result<rtnetlink::packet_route::link::LinkMessage, String> {
    handle
        .link()
        .get()
        .match_name(name.to_owned())
        .execute()
        .try_next()
        .await
        .map_err(|e| format!("interface {name}: {e}"))?
        .ok_or_else(|| format!("no interface {name}"))
}

/// The names of every interface in the handle's namespace.
pub async fn link_names(handle: &Handle) -> std::result::Result<Vec<String>, String> {
    use rtnetlink::packet_route::link::LinkAttribute;
    let links: Vec<_> = handle
        .link()
        .get()
        .execute()
        .try_collect()
        .await
        .map_err(|e| format!("listing interfaces: {e}"))?;
    Ok(links
        .iter()
        .filter_map(|link| {
            link.attributes.iter().find_map(|a| match a {
                LinkAttribute::IfName(name) => Some(name.clone()),
                _ => None,
            })
        })
        .collect())
}

pub async fn index_of(handle: &Handle, name: &str) -> std::result::Result<u32, String> {
    Ok(link_by_name(handle, name).await?.header.index)
}

pub async fn set_up(handle: &Handle, name: &str) -> std::result::Result<(), String> {
    let index = index_of(handle, name).await?;
    handle
        .link()
        .set(LinkUnspec::new_with_index(index).up().build())
        .execute()
        .await
        .map_err(|e| e.to_string())
}

/// Adds `address`/`prefix` to interface `index`.
pub async fn add_address(
    handle: &Handle,
    index: u32,
    address: std::net::IpAddr,
    prefix: u8,
) -> Result<(), String> {
    handle
        .address()
        .add(index, address, prefix)
        .execute()
        .await
        .map_err(|e| e.to_string())
}

/// Adds `route`.
pub async fn add_route(
    handle: &Handle,
    route: rtnetlink::packet_route::route::RouteMessage,
) -> Result<(), String> {
    handle
        .route()
        .add(route)
        .execute()
        .await
        .map_err(|e| e.to_string())
}
