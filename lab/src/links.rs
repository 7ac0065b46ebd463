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
