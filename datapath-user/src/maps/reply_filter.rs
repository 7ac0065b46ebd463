//! `REPLY_FILTER`'s completeness (the datapath's `reply_filter`): the
//! egress program flags the peer of every flow it opens, so the ingress
//! program can skip conntrack for packets from anything else, but only
//! once the flags cover every flow in conntrack. An agent that has just
//! loaded its programs cannot know that: the programs it replaces may be
//! an older build's, which opened flows without flags. So it distrusts
//! the flags at start (every packet is looked up, as before), and once its
//! programs run everywhere, flags the peer of every flow conntrack holds
//! and trusts them again.

use aya::maps::{IterableMap, MapError};
use datapath_common::{
    lb,
    maps::{CT_KIND_BACKEND, CtKey, CtKey6, REPLY_FILTER_COMPLETE},
};

use super::DatapathMaps;

/// Conntrack entries read per syscall when flags are rebuilt (each
/// batch's keys and values: 4,096 × 72 bytes).
const CT_WALK_CHUNK: u32 = 4096;

impl DatapathMaps {
    /// Makes the ingress program look every packet up in conntrack until
    /// `complete_reply_filter`.
    pub fn distrust_reply_filter(&mut self) -> Result<(), MapError> {
        self.reply_filter.set(REPLY_FILTER_COMPLETE, 0, 0)
    }

    /// Flags the peer of every flow in conntrack, then lets the ingress
    /// program trust the flags. Call it only once every attached program
    /// is this build's (flows opened from then on flag themselves).
    /// Returns the flags set (one per bucket conntrack's flows name).
    pub fn complete_reply_filter(&mut self) -> anyhow::Result<usize> {
        self.complete_reply_filter_reading(CT_WALK_CHUNK)
    }

    /// `complete_reply_filter`, reading conntrack `chunk` entries per
    /// syscall (tests make walks of many batches with few flows).
    pub fn complete_reply_filter_reading(&mut self, chunk: u32) -> anyhow::Result<usize> {
        // Untrusted while it is rebuilt, and rebuilt from nothing: flags
        // of peers no flow names any more (pods long gone) would otherwise
        // pile up over the node's life, each costing its packets a
        // lookup. Safe against the datapath flagging meanwhile: a program
        // flags a peer after it has inserted the flow, so a flag cleared
        // here belongs to a flow already in conntrack when the walk below
        // starts.
        self.distrust_reply_filter()?;
        let buckets: Vec<u32> = (0..REPLY_FILTER_COMPLETE).collect();
        let zeros = vec![0u32; buckets.len()];
        super::batch::write_batch(IterableMap::map(&self.reply_filter), &buckets, &zeros)
            .map_err(|(_, e)| anyhow::anyhow!("clearing REPLY_FILTER: {e}"))?;
        // A flow's backend-tuple entry names its peer (the backend, or the
        // pod of a moved direct connection). Every key must be read: a
        // walk that stopped early would trust flags it did not set; one
        // that fails is tried again later. Read in batches, bucket by
        // bucket (every flow present throughout is seen; a million flows
        // were two million syscalls key by key).
        let mut buckets = std::collections::BTreeSet::new();
        for (name, table) in self.conntrack_tables() {
            peer_buckets(name, table, chunk, &mut buckets, |key: &CtKey| {
                (key.kind == CT_KIND_BACKEND).then(|| {
                    lb::service_filter_index(key.peer_address_be, key.peer_port_be, key.protocol)
                })
            })?;
        }
        for (name, table) in self.conntrack6_tables() {
            peer_buckets(name, table, chunk, &mut buckets, |key: &CtKey6| {
                (key.kind == CT_KIND_BACKEND).then(|| {
                    lb::service_filter_index6(key.peer_address_be, key.peer_port_be, key.protocol)
                })
            })?;
        }
        let set = buckets.len();
        let buckets: Vec<u32> = buckets.into_iter().collect();
        let ones = vec![1u32; set];
        super::batch::write_batch(IterableMap::map(&self.reply_filter), &buckets, &ones)
            .map_err(|(_, e)| anyhow::anyhow!("flagging REPLY_FILTER: {e}"))?;
        self.reply_filter.set(REPLY_FILTER_COMPLETE, 1, 0)?;
        Ok(set)
    }

    /// Whether the ingress program trusts the flags.
    pub fn reply_filter_complete(&self) -> Result<bool, MapError> {
        Ok(self.reply_filter.get(&REPLY_FILTER_COMPLETE, 0)? != 0)
    }
}

/// Adds to `buckets` the bucket `bucket_of` gives each key of a conntrack
/// table of either family, reading `chunk` entries per syscall.
fn peer_buckets<K: aya::Pod + Default, V: aya::Pod + Default>(
    name: &str,
    table: &aya::maps::HashMap<aya::maps::MapData, K, V>,
    chunk: u32,
    buckets: &mut std::collections::BTreeSet<u32>,
    bucket_of: impl Fn(&K) -> Option<u32>,
) -> anyhow::Result<()> {
    use std::os::fd::{AsFd, AsRawFd};
    let fd = IterableMap::map(table).fd().as_fd().as_raw_fd();
    crate::bpfsys::for_each_key::<K, V>(fd, chunk, |key| {
        buckets.extend(bucket_of(key));
    })
    .map_err(|e| anyhow::anyhow!("reading {name}: {e}"))
}
