//! kube-proxy's own rules for a set of Services and EndpointSlices, as the
//! iptables proxier (`iptables-restore` payload) and the nftables proxier
//! (`nft -f` script) program them, so the bench compares underpass with
//! exactly what kube-proxy would install.
//!
//! Templates, names and number formats follow kube-proxy
//! (`pkg/proxy/iptables/proxier.go`, `pkg/proxy/nftables/proxier.go`);
//! the golden tests check the upstream test expectations verbatim.//!
//! `service_port` holds what both proxiers program from (kube-proxy's
//! view of a service port, its chain names and hashes, its options);
//! `iptables` and `nftables` render it.

mod iptables;
mod nftables;
mod service_port;

pub use self::{
    iptables::{
        iptables_ensured_chains, iptables_jumps, iptables_restore, iptables_restore_partial,
    },
    nftables::{nft_ruleset, nft_update},
    service_port::{
        LARGE_CLUSTER_ENDPOINTS, Options, ServicePort, endpoint_string, nft_chain_suffix,
        port_proto_hash, probability, service_ports,
    },
};
