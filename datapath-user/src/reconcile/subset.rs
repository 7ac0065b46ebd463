//! Which endpoints of an over-limit service this node serves.

use std::net::IpAddr;

use crate::{k8s::Endpoint, model::Family};

/// This node's share of an over-limit service: the `limit` endpoints that
/// score highest under a hash seeded by the node (rendezvous hashing), in
/// address order, and the rest. Deterministic per node, different across
/// nodes, and stable when endpoints come and go: one endpoint more or less
/// changes at most one member of the subset.
pub fn node_subset<A: Family>(
    endpoints: &[Endpoint<A>],
    limit: usize,
    seed: u64,
) -> (Vec<Endpoint<A>>, Vec<Endpoint<A>>) {
    if endpoints.len() <= limit {
        return (endpoints.to_vec(), Vec::new());
    }
    let score = |e: &Endpoint<A>| {
        let key = match e.address.into() {
            IpAddr::V4(address) => u64::from(u32::from(address)) << 16 | u64::from(e.port),
            // The address folded by a round of its own: no two halves
            // cancel out.
            IpAddr::V6(address) => {
                let bits = u128::from(address);
                splitmix64(bits as u64) ^ splitmix64((bits >> 64) as u64 ^ u64::from(e.port))
            }
        };
        splitmix64(seed ^ splitmix64(key))
    };
    let mut ranked: Vec<&Endpoint<A>> = endpoints.iter().collect();
    ranked.sort_by_key(|e| std::cmp::Reverse(score(e)));
    let mut chosen: Vec<Endpoint<A>> = ranked[..limit].iter().map(|e| **e).collect();
    let mut rest: Vec<Endpoint<A>> = ranked[limit..].iter().map(|e| **e).collect();
    chosen.sort();
    rest.sort();
    (chosen, rest)
}

fn splitmix64(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// FNV-1a: a hash of the node name that stays the same across builds
/// and releases (std's hashers promise neither).
pub(super) fn fnv1a(text: &str) -> u64 {
    text.bytes().fold(0xcbf2_9ce4_8422_2325, |hash, byte| {
        (hash ^ u64::from(byte)).wrapping_mul(0x0100_0000_01b3)
    })
}
