//! Maglev consistent hashing (Eisenbud et al., NSDI 2016) for north-south
//! flows: every node builds the same lookup table from the same backends
//! and seed, so a flow that a load balancer sprays to any node reaches the
//! same backend, and a backend that leaves moves little more than its own
//! share of flows. East-west flows keep the random pick (`lb`): a pod's
//! connection starts and ends on one node, nothing to agree on.
//!
//! Both halves are here: the table (user space, [`build_table`]) and the
//! flow hash the XDP program takes modulo the table size
//! ([`flow_hash4`]). Both are part of what nodes must agree on: changing
//! either changes which backend a flow goes to during a rolling upgrade,
//! so [`MAGLEV_VERSION`] names the pair.

/// Bumped whenever [`key_hash`], [`flow_hash4`] or the table's fill order
/// changes: nodes with different versions pick different backends for
/// the same flow (a rolling upgrade moves flows once).
pub const MAGLEV_VERSION: u32 = 1;

/// The lookup table size Cilium and the paper default to: a prime, so
/// that every skip is coprime with it, and ≥ 100 × backends for ≤ 1 %
/// imbalance up to ~160 backends.
pub const DEFAULT_TABLE_SIZE: u32 = 16_381;
/// The smallest table size accepted (Cilium's bounds).
pub const MIN_TABLE_SIZE: u32 = 251;
/// The largest table size accepted.
pub const MAX_TABLE_SIZE: u32 = 131_071;

/// Why a table size was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TableSizeError {
    /// Outside `MIN_TABLE_SIZE..=MAX_TABLE_SIZE`.
    OutOfRange(u32),
    /// Not a prime: some skips would share a factor with the size and
    /// their backends' permutations would not cover the table.
    NotPrime(u32),
}

impl core::fmt::Display for TableSizeError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            Self::OutOfRange(size) => write!(
                f,
                "Maglev table size {size} is outside {MIN_TABLE_SIZE}..={MAX_TABLE_SIZE}"
            ),
            Self::NotPrime(size) => write!(
                f,
                "Maglev table size {size} is not a prime (try 251, 509, 1021, 2039, 4093, \
                 8191, 16381, 32749, 65521 or 131071)"
            ),
        }
    }
}

/// `size` if it is a prime in the accepted range.
pub const fn check_table_size(size: u32) -> Result<u32, TableSizeError> {
    if size < MIN_TABLE_SIZE || size > MAX_TABLE_SIZE {
        return Err(TableSizeError::OutOfRange(size));
    }
    let mut divisor = 2;
    while divisor * divisor <= size {
        if size.is_multiple_of(divisor) {
            return Err(TableSizeError::NotPrime(size));
        }
        divisor += 1;
    }
    Ok(size)
}

/// SplitMix64's finaliser: every input bit reaches every output bit.
#[inline(always)]
const fn mix64(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// A 64-bit hash of a backend's key under `seed`: eight bytes at a time,
/// each word mixed in, then the length. Stable across builds and
/// architectures (little-endian words by definition), since every node
/// must compute the same permutation.
pub const fn key_hash(seed: u64, key: &[u8]) -> u64 {
    let mut h = mix64(seed ^ 0x6d61_676c_6576_0001);
    let mut at = 0;
    while at < key.len() {
        let mut word = 0u64;
        let mut i = 0;
        while i < 8 && at + i < key.len() {
            word |= (key[at + i] as u64) << (8 * i);
            i += 1;
        }
        h = mix64(h ^ word).wrapping_add(0x9e37_79b9_7f4a_7c15);
        at += 8;
    }
    mix64(h ^ key.len() as u64)
}

/// The hash of an IPv4 flow the XDP program takes modulo the table size:
/// addresses, ports and protocol as they are on the wire (`_be` fields),
/// under the cluster's seed. Two rounds of `mix64`: a handful of
/// instructions per new flow, no loop.
#[inline(always)]
pub const fn flow_hash4(
    source_be: u32,
    destination_be: u32,
    source_port_be: u16,
    destination_port_be: u16,
    protocol: u8,
    seed: u64,
) -> u32 {
    let addresses = (source_be as u64) << 32 | destination_be as u64;
    let ports = (source_port_be as u64) << 24 | (destination_port_be as u64) << 8 | protocol as u64;
    let z = mix64(mix64(seed ^ addresses) ^ ports);
    (z >> 32) as u32
}

/// A backend's identity in the table (`build_table`'s keys), as every
/// node names it: its address octets, port (network order) and protocol.
/// Node-local backend ids would give each node another table.
pub const fn backend_key4(address: [u8; 4], port: u16, protocol: u8) -> [u8; 7] {
    let [p0, p1] = port.to_be_bytes();
    [
        address[0], address[1], address[2], address[3], p0, p1, protocol,
    ]
}

/// The same for an IPv6 backend (a key of another length: never equal
/// to an IPv4 one).
pub const fn backend_key6(address: [u8; 16], port: u16, protocol: u8) -> [u8; 19] {
    let mut key = [0u8; 19];
    let mut i = 0;
    while i < 16 {
        key[i] = address[i];
        i += 1;
    }
    let [p0, p1] = port.to_be_bytes();
    key[16] = p0;
    key[17] = p1;
    key[18] = protocol;
    key
}

/// Where a flow hash falls in a table of `size` entries.
#[inline(always)]
pub const fn table_index(hash: u32, size: u32) -> u32 {
    hash % size
}

#[cfg(any(test, feature = "user"))]
/// A backend's permutation of the table: `offset`, `offset + skip`, …
/// modulo the size, which (the size being prime and `skip` non-zero)
/// visits every entry once.
#[derive(Clone, Copy)]
struct Permutation {
    offset: u32,
    skip: u32,
}

#[cfg(any(test, feature = "user"))]
impl Permutation {
    const fn of(seed: u64, key: &[u8], size: u32) -> Self {
        let h = key_hash(seed, key);
        let offset = ((h >> 32) % size as u64) as u32;
        let skip = ((h & 0xffff_ffff) % (size as u64 - 1)) as u32 + 1;
        Self { offset, skip }
    }
}

#[cfg(any(test, feature = "user"))]
extern crate alloc;

/// The Maglev lookup table of `size` entries for `keys` (each a backend's
/// identity as every node names it, e.g. address, port and protocol
/// bytes): entry i is the index in `keys` of the backend that flows
/// hashing to i go to. The same set of keys gives the same table in
/// whatever order they are passed. Empty when `keys` is. Keys must be
/// distinct (a duplicate would share its twin's permutation and split
/// its share).
///
/// Each backend in turn takes the next free entry of its permutation
/// until the table is full, so every backend holds `size / n` entries,
/// give or take one. O(size × log size) expected.
#[cfg(any(test, feature = "user"))]
pub fn build_table<K: AsRef<[u8]>>(size: u32, seed: u64, keys: &[K]) -> alloc::vec::Vec<u32> {
    use alloc::vec::Vec;
    const FREE: u32 = u32::MAX;
    if keys.is_empty() {
        return Vec::new();
    }
    // Fill in key order, not argument order: the table must not depend
    // on the order a node happened to list its endpoints in.
    let mut order: Vec<u32> = (0..keys.len() as u32).collect();
    order.sort_by(|&a, &b| keys[a as usize].as_ref().cmp(keys[b as usize].as_ref()));
    let permutations: Vec<Permutation> = order
        .iter()
        .map(|&k| Permutation::of(seed, keys[k as usize].as_ref(), size))
        .collect();
    let mut next = alloc::vec![0u32; keys.len()];
    let mut table = alloc::vec![FREE; size as usize];
    let mut filled = 0u32;
    'fill: loop {
        for (turn, permutation) in permutations.iter().enumerate() {
            let mut entry;
            loop {
                entry = ((permutation.offset as u64 + next[turn] as u64 * permutation.skip as u64)
                    % size as u64) as usize;
                next[turn] += 1;
                if table[entry] == FREE {
                    break;
                }
            }
            table[entry] = order[turn];
            filled += 1;
            if filled == size {
                break 'fill;
            }
        }
    }
    table
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::{format, string::String, vec::Vec};

    fn backend_keys(n: usize) -> Vec<String> {
        (0..n)
            .map(|i| format!("10.{}.{}.{}:8080/TCP", i / 65536, (i / 256) % 256, i % 256))
            .collect()
    }

    fn shares(table: &[u32], n: usize) -> Vec<usize> {
        let mut counts = alloc::vec![0; n];
        for &b in table {
            counts[b as usize] += 1;
        }
        counts
    }

    #[test]
    fn table_sizes_must_be_primes_in_range() {
        assert_eq!(check_table_size(DEFAULT_TABLE_SIZE), Ok(16_381));
        assert_eq!(check_table_size(251), Ok(251));
        assert_eq!(check_table_size(131_071), Ok(131_071));
        assert_eq!(
            check_table_size(16_383),
            Err(TableSizeError::NotPrime(16_383))
        );
        assert_eq!(check_table_size(250), Err(TableSizeError::OutOfRange(250)));
        assert_eq!(
            check_table_size(131_072),
            Err(TableSizeError::OutOfRange(131_072))
        );
        let message = format!("{}", TableSizeError::NotPrime(1000));
        assert!(
            message.contains("1000") && message.contains("16381"),
            "{message}"
        );
    }

    #[test]
    fn every_backend_holds_its_share_give_or_take_one() {
        for (size, n) in [
            (251, 1),
            (251, 7),
            (16_381, 3),
            (16_381, 100),
            (16_381, 1000),
            (65_521, 163),
        ] {
            let table = build_table(size, 42, &backend_keys(n));
            assert_eq!(table.len(), size as usize);
            let counts = shares(&table, n);
            let (low, high) = (size as usize / n, (size as usize).div_ceil(n));
            for (backend, &count) in counts.iter().enumerate() {
                assert!(
                    (low..=high).contains(&count),
                    "size {size}, {n} backends: backend {backend} holds {count}, not {low}..={high}"
                );
            }
        }
    }

    #[test]
    fn the_table_depends_on_the_backends_and_seed_not_their_order() {
        let keys = backend_keys(50);
        let table = build_table(DEFAULT_TABLE_SIZE, 7, &keys);
        let mut reversed = keys.clone();
        reversed.reverse();
        let from_reversed: Vec<u32> = build_table(DEFAULT_TABLE_SIZE, 7, &reversed)
            .iter()
            .map(|&i| (keys.len() - 1) as u32 - i)
            .collect();
        assert_eq!(
            table, from_reversed,
            "the same backends listed in another order"
        );
        assert_ne!(
            table,
            build_table(DEFAULT_TABLE_SIZE, 8, &keys),
            "another seed"
        );
        assert!(build_table(DEFAULT_TABLE_SIZE, 7, &[] as &[&str]).is_empty());
    }

    /// How many of `size` entries point at another backend (by key)
    /// after `keys[gone]` leaves.
    fn moved_when_one_leaves(size: u32, keys: &[String], gone: usize) -> (usize, usize) {
        let before = build_table(size, 1, keys);
        let mut rest: Vec<String> = keys.to_vec();
        rest.remove(gone);
        let after = build_table(size, 1, &rest);
        let moved = before
            .iter()
            .zip(&after)
            .filter(|&(&b, &a)| keys[b as usize] != rest[a as usize])
            .count();
        let own = before.iter().filter(|&&b| b as usize == gone).count();
        (moved, own)
    }

    #[test]
    fn one_backend_of_n_leaving_moves_close_to_one_nth_of_the_table() {
        for n in [10, 100] {
            let keys = backend_keys(n);
            for gone in [0, n / 2, n - 1] {
                let (moved, own) = moved_when_one_leaves(DEFAULT_TABLE_SIZE, &keys, gone);
                let share = moved as f64 / DEFAULT_TABLE_SIZE as f64;
                // Its own entries must move, and the refill moves a few
                // more (the paper's "slightly more than minimal"): at
                // 16,381 entries measured 1.05/N for 10 backends and
                // 2.4/N (2.4 % of flows) for 100; a bigger table moves
                // fewer (1.4/N at 131,071).
                assert!(
                    moved >= own,
                    "{n} backends: {moved} moved, fewer than its {own}"
                );
                assert!(
                    share <= 1.0 / n as f64 + 0.02,
                    "{n} backends, backend {gone} leaving moved {share:.4} of the table (1/N = {:.4})",
                    1.0 / n as f64
                );
            }
        }
    }

    #[test]
    fn flows_spread_over_the_table_and_keep_their_entry() {
        let size = DEFAULT_TABLE_SIZE;
        let mut hits = alloc::vec![0u32; size as usize];
        let flows = 400_000u32;
        for i in 0..flows {
            let source = crate::ipv4_be([192, 0, 2, (i % 251) as u8]);
            let port = (1024 + i / 251) as u16;
            let hash = flow_hash4(
                source,
                crate::ipv4_be([10, 0, 0, 1]),
                port.to_be(),
                30080u16.to_be(),
                6,
                9,
            );
            assert_eq!(
                hash,
                flow_hash4(
                    source,
                    crate::ipv4_be([10, 0, 0, 1]),
                    port.to_be(),
                    30080u16.to_be(),
                    6,
                    9
                )
            );
            hits[table_index(hash, size) as usize] += 1;
        }
        let mean = flows as f64 / size as f64;
        let max = *hits.iter().max().unwrap() as f64;
        // ~24 flows per entry: a Poisson maximum over 16,381 entries
        // stays well under 3× the mean; a hash that ignored the ports
        // would pile 1,593 flows on each of 251 entries.
        assert!(
            max < 3.0 * mean,
            "the busiest entry got {max} flows, mean {mean:.1}"
        );
        assert_ne!(
            flow_hash4(1, 2, 3, 4, 6, 9),
            flow_hash4(1, 2, 3, 4, 6, 10),
            "the seed takes part"
        );
    }
}
