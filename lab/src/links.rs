//! Netlink lookups by interface name, shared by every wiring step.

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
