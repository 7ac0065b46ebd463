//! The maps of `sessionAffinity: ClientIP` (`crate::affinity` holds the
//! rule): which backend each client of a frontend went to last, which
//! backends each frontend with affinity has now, and its timeout. One set
//! for both families: reverse-NAT ids are one space, and a frontend's
//! clients are of its own family.

/// `AffinityKey::kind`: the client is the source address of a packet
/// (the TC path), IPv4 in `client[0]` (the other words zero) or IPv6.
pub const AFFINITY_CLIENT_ADDRESS: u8 = 1;
/// `AffinityKey::kind`: the client is a network namespace (socket-LB:
/// at `connect()` the source address is not bound yet, and a pod is one
/// namespace, as Cilium keys it), its cookie in `client[0..2]`.
pub const AFFINITY_CLIENT_NETNS: u8 = 2;

/// Key of `AFFINITY` (LRU hash): one client of one frontend.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct AffinityKey {
    /// The client: an address in network order (IPv4 in word 0) or a
    /// netns cookie's bytes (`kind`).
    pub client: [u32; 4],
    /// The frontend (its `REVERSE_NAT`/`REVERSE_NAT6` key).
    pub rev_nat_id: u32,
    /// `AFFINITY_CLIENT_*`.
    pub kind: u8,
    /// Always zero.
    pub _pad: [u8; 3],
}

impl AffinityKey {
    /// The client `client` of `rev_nat_id`, given as two u64 whose low
    /// and high halves are its words in order: an IPv4 address as the low
    /// half of the first (in word 0), a netns cookie as the first, an
    /// IPv6 address's words paired.
    #[inline(always)]
    pub const fn new(client: [u64; 2], rev_nat_id: u32, kind: u8) -> Self {
        let client = [
            client[0] as u32,
            (client[0] >> 32) as u32,
            client[1] as u32,
            (client[1] >> 32) as u32,
        ];
        Self {
            client,
            rev_nat_id,
            kind,
            _pad: [0; 3],
        }
    }
}

/// Value of `AFFINITY`: the backend the client's last new flow took.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct AffinityValue {
    /// Jiffies (the conntrack clock) of the client's last new flow to
    /// the frontend, refreshed at most once a conntrack refresh interval.
    pub last_used: u64,
    /// The backend it went to (a `BACKENDS` id).
    pub backend_id: u32,
    /// Always zero.
    pub _pad: u32,
}

/// Key of `AFFINITY_MATCH` (hash): a backend a frontend with affinity
/// has now. A remembered backend without its entry here has left the
/// frontend (Cilium's `lb_affinity_match`): its clients re-balance.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct AffinityMatchKey {
    /// The backend (a `BACKENDS` id; one family per id, so the pair names
    /// one frontend of one family).
    pub backend_id: u32,
    /// The frontend's reverse-NAT id.
    pub rev_nat_id: u32,
}

// `AFFINITY_TIMEOUT` (an array of u64 indexed by reverse-NAT id, mapped
// into the agent, which reads it there): the frontend's timeout in jiffies,
// `sessionAffinityConfig.clientIP.timeoutSeconds` at the kernel's HZ;
// zero for a frontend without affinity (its new flows never look at
// `AFFINITY`).

/// `AFFINITY`'s default size: clients × frontends with affinity
/// remembered at once (LRU: the coldest client forgets first, which
/// costs it only its stickiness). Cilium's default is the same.
pub const DEFAULT_AFFINITY_MAX: u32 = 65_536;
