//! kube-proxy's own rules for a set of Services and EndpointSlices, as the
//! iptables proxier (`iptables-restore` payload) and the nftables proxier
//! (`nft -f` script) program them, so the bench compares underpass with
//! exactly what kube-proxy would install.
//!
//! Templates, names and number formats follow kube-proxy
//! (`pkg/proxy/iptables/proxier.go`, `pkg/proxy/nftables/proxier.go`);
//! the golden tests check the upstream test expectations verbatim.

use std::{fmt::Write as _, net::Ipv4Addr};

use data_encoding::BASE32;
use datapath_user::{
    k8s::{NodeContext, translate},
    model::Protocol,
};
use k8s_openapi::api::{core::v1::Service, discovery::v1::EndpointSlice};
use sha2::{Digest, Sha256};

/// One service port as kube-proxy sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServicePort {
    pub namespace: String,
    pub name: String,
    /// "" when the port is unnamed.
    pub port_name: String,
    pub protocol: Protocol,
    pub cluster_ip: Ipv4Addr,
    pub port: u16,
    /// Sorted as kube-proxy sorts them: by the "IP:port" string.
    pub endpoints: Vec<(Ipv4Addr, u16)>,
}

impl ServicePort {
    /// `ServicePortName.String()`: "ns/name:port", or "ns/name" unnamed.
    pub fn service_port_name(&self) -> String {
        if self.port_name.is_empty() {
            format!("{}/{}", self.namespace, self.name)
        } else {
            format!("{}/{}:{}", self.namespace, self.name, self.port_name)
        }
    }

    fn proto(&self) -> &'static str {
        match self.protocol {
            Protocol::Tcp => "tcp",
            Protocol::Udp => "udp",
        }
    }

    /// `KUBE-SVC-…`.
    pub fn svc_chain(&self) -> String {
        format!(
            "KUBE-SVC-{}",
            port_proto_hash(&self.service_port_name(), self.proto())
        )
    }

    /// `KUBE-SEP-…` of one endpoint.
    pub fn sep_chain(&self, endpoint: (Ipv4Addr, u16)) -> String {
        let text = format!(
            "{}{}{}:{}",
            self.service_port_name(),
            self.proto(),
            endpoint.0,
            endpoint.1
        );
        format!("KUBE-SEP-{}", hash16(&text))
    }

    /// nftables base name: "ns/svc/proto/portName".
    pub fn nft_base(&self) -> String {
        format!(
            "{}/{}/{}/{}",
            self.namespace,
            self.name,
            self.proto(),
            self.port_name
        )
    }

    fn nft_endpoint_base(&self, endpoint: (Ipv4Addr, u16)) -> String {
        format!("{}__{}/{}", self.nft_base(), endpoint.0, endpoint.1)
    }
}

fn hash16(text: &str) -> String {
    BASE32.encode(&Sha256::digest(text.as_bytes()))[..16].to_owned()
}

/// `portProtoHash`: base32(sha256(servicePortName + protocol))[:16].
pub fn port_proto_hash(service_port_name: &str, protocol: &str) -> String {
    hash16(&format!("{service_port_name}{protocol}"))
}

/// nftables `hashAndTruncate`: base32(sha256(name))[:8] + "-" + name.
pub fn nft_chain_suffix(name: &str) -> String {
    let hash = &BASE32.encode(&Sha256::digest(name.as_bytes()))[..8];
    format!("{hash}-{name}")
}

/// `fmt.Sprintf("%0.10f", 1.0/float64(n))`.
pub fn probability(n: usize) -> String {
    format!("{:.10}", 1.0 / n as f64)
}

/// Choices kube-proxy makes from its configuration.
#[derive(Clone, Debug)]
pub struct Options {
    /// `--cluster-cidr`: the local-traffic detector (`! -s CIDR`). None:
    /// the no-op detector, no masquerade rule in service chains.
    pub cluster_cidr: Option<String>,
    /// `1 << masqueradeBit` (default bit 14).
    pub masquerade_mark: u32,
    /// `--random-fully` on MASQUERADE (iptables ≥ 1.6.2).
    pub random_fully: bool,
    /// Service CIDR, for the nftables "drop unallocated ClusterIPs" rule.
    pub service_cidr: Option<String>,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            cluster_cidr: Some("10.0.0.0/8".into()),
            masquerade_mark: 0x4000,
            random_fully: true,
            service_cidr: None,
        }
    }
}

/// Above this many endpoints in total, kube-proxy drops comments from
/// the per-endpoint rules (`largeClusterEndpointsThreshold`).
pub const LARGE_CLUSTER_ENDPOINTS: usize = 1000;

/// The service ports kube-proxy would program for these objects (its
/// endpoint selection is the one underpass's translate implements).
pub fn service_ports(services: &[Service], slices: &[EndpointSlice]) -> Vec<ServicePort> {
    let translation = translate(services, slices, &NodeContext::default());
    let mut out: Vec<ServicePort> = translation
        .frontends
        .values()
        .map(|(owner, desired)| {
            let mut endpoints: Vec<(Ipv4Addr, u16)> = desired
                .backends
                .iter()
                .map(|b| (b.address, b.port))
                .collect();
            endpoints.sort_by_key(|(a, p)| format!("{a}:{p}"));
            ServicePort {
                namespace: owner.namespace.clone(),
                name: owner.name.clone(),
                port_name: desired.port_name.clone(),
                protocol: desired.frontend.protocol,
                cluster_ip: desired.frontend.address,
                port: desired.frontend.port,
                endpoints,
            }
        })
        .collect();
    out.sort_by(|a, b| (a.service_port_name(), a.proto()).cmp(&(b.service_port_name(), b.proto())));
    out
}

/// Quotes a comment as kube-proxy's rules show it: bare when it has no
/// space.
fn comment(text: &str) -> String {
    if text.contains(' ') {
        format!("\"{text}\"")
    } else {
        text.to_owned()
    }
}

/// The `iptables-restore --noflush` payload of a full sync.
pub fn iptables_restore(ports: &[ServicePort], options: &Options) -> String {
    iptables_restore_partial(ports, options, &|_| true, &[])
}

/// A partial sync's payload (kube-proxy ≥ 1.26, `MinimizeIPTablesRestore`):
/// the fixed chains and KUBE-SERVICES in full, the chains of the service
/// ports `rewrite` selects, and `-X` for chains no longer used.
pub fn iptables_restore_partial(
    ports: &[ServicePort],
    options: &Options,
    rewrite: &dyn Fn(&ServicePort) -> bool,
    deleted_chains: &[String],
) -> String {
    let mark = format!("{:#x}", options.masquerade_mark);
    let total_endpoints: usize = ports.iter().map(|p| p.endpoints.len()).sum();
    let large = total_endpoints > LARGE_CLUSTER_ENDPOINTS;
    let (mut filter_chains, mut filter_rules) = (String::new(), String::new());
    let (mut nat_chains, mut nat_rules) = (String::new(), String::new());
    for chain in [
        "KUBE-SERVICES",
        "KUBE-EXTERNAL-SERVICES",
        "KUBE-FORWARD",
        "KUBE-NODEPORTS",
        "KUBE-PROXY-FIREWALL",
        "KUBE-FIREWALL",
    ] {
        let _ = writeln!(filter_chains, ":{chain} - [0:0]");
    }
    let _ = writeln!(
        filter_rules,
        "-A KUBE-FIREWALL -m comment --comment \"block incoming localnet connections\" -d 127.0.0.0/8 ! -s 127.0.0.0/8 -m conntrack ! --ctstate RELATED,ESTABLISHED,DNAT -j DROP"
    );
    let _ = writeln!(
        filter_rules,
        "-A KUBE-FORWARD -m conntrack --ctstate INVALID -j DROP"
    );
    let _ = writeln!(
        filter_rules,
        "-A KUBE-FORWARD -m comment --comment \"kubernetes forwarding rules\" -m mark --mark {mark}/{mark} -j ACCEPT"
    );
    let _ = writeln!(
        filter_rules,
        "-A KUBE-FORWARD -m comment --comment \"kubernetes forwarding conntrack rule\" -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT"
    );
    for chain in [
        "KUBE-SERVICES",
        "KUBE-NODEPORTS",
        "KUBE-POSTROUTING",
        "KUBE-MARK-MASQ",
    ] {
        let _ = writeln!(nat_chains, ":{chain} - [0:0]");
    }
    let _ = writeln!(
        nat_rules,
        "-A KUBE-POSTROUTING -m mark ! --mark {mark}/{mark} -j RETURN"
    );
    let _ = writeln!(nat_rules, "-A KUBE-POSTROUTING -j MARK --xor-mark {mark}");
    let _ = writeln!(
        nat_rules,
        "-A KUBE-POSTROUTING -m comment --comment \"kubernetes service traffic requiring SNAT\" -j MASQUERADE{}",
        if options.random_fully {
            " --random-fully"
        } else {
            ""
        }
    );
    let _ = writeln!(nat_rules, "-A KUBE-MARK-MASQ -j MARK --or-mark {mark}");

    for port in ports {
        let spn = port.service_port_name();
        let proto = port.proto();
        let (vip, dport) = (port.cluster_ip, port.port);
        if port.endpoints.is_empty() {
            let _ = writeln!(
                filter_rules,
                "-A KUBE-SERVICES -m comment --comment {} -m {proto} -p {proto} -d {vip} --dport {dport} -j REJECT",
                comment(&format!("{spn} has no endpoints"))
            );
            continue;
        }
        let svc = port.svc_chain();
        let cluster_ip = comment(&format!("{spn} cluster IP"));
        let _ = writeln!(
            nat_rules,
            "-A KUBE-SERVICES -m comment --comment {cluster_ip} -m {proto} -p {proto} -d {vip} --dport {dport} -j {svc}"
        );
        if !rewrite(port) {
            continue;
        }
        let _ = writeln!(nat_chains, ":{svc} - [0:0]");
        if let Some(cidr) = &options.cluster_cidr {
            let _ = writeln!(
                nat_rules,
                "-A {svc} -m comment --comment {cluster_ip} -m {proto} -p {proto} -d {vip} --dport {dport} ! -s {cidr} -j KUBE-MARK-MASQ"
            );
        }
        let count = port.endpoints.len();
        for (i, &endpoint) in port.endpoints.iter().enumerate() {
            let sep = port.sep_chain(endpoint);
            let note = if large {
                String::new()
            } else {
                format!(
                    "-m comment --comment {} ",
                    comment(&format!("{spn} -> {}:{}", endpoint.0, endpoint.1))
                )
            };
            if i + 1 < count {
                let _ = writeln!(
                    nat_rules,
                    "-A {svc} {note}-m statistic --mode random --probability {} -j {sep}",
                    probability(count - i)
                );
            } else {
                let _ = writeln!(nat_rules, "-A {svc} {note}-j {sep}");
            }
        }
        for &endpoint in &port.endpoints {
            let sep = port.sep_chain(endpoint);
            let _ = writeln!(nat_chains, ":{sep} - [0:0]");
            let note = if large {
                String::new()
            } else {
                format!("-m comment --comment {} ", comment(&spn))
            };
            let _ = writeln!(
                nat_rules,
                "-A {sep} {note}-s {} -j KUBE-MARK-MASQ",
                endpoint.0
            );
            let _ = writeln!(
                nat_rules,
                "-A {sep} {note}-m {proto} -p {proto} -j DNAT --to-destination {}:{}",
                endpoint.0, endpoint.1
            );
        }
    }
    let _ = writeln!(
        nat_rules,
        "-A KUBE-SERVICES -m comment --comment \"kubernetes service nodeports; NOTE: this must be the last rule in this chain\" -m addrtype --dst-type LOCAL -j KUBE-NODEPORTS"
    );
    // As kube-proxy does: a stale chain is flushed (declared) and then
    // deleted in the same transaction.
    for chain in deleted_chains {
        let _ = writeln!(nat_chains, ":{chain} - [0:0]");
        let _ = writeln!(nat_rules, "-X {chain}");
    }
    format!("*filter\n{filter_chains}{filter_rules}COMMIT\n*nat\n{nat_chains}{nat_rules}COMMIT\n")
}

/// The jump rules kube-proxy installs once with `iptables -I` (not part
/// of the restore payload), as (table, chain, rule arguments).
pub fn iptables_jumps() -> Vec<(&'static str, &'static str, String)> {
    let rule = |extra: &str, comment: &str, to: &str| {
        format!("{extra}-m comment --comment \"{comment}\" -j {to}")
    };
    let new = "-m conntrack --ctstate NEW ";
    vec![
        (
            "filter",
            "INPUT",
            rule(
                new,
                "kubernetes externally-visible service portals",
                "KUBE-EXTERNAL-SERVICES",
            ),
        ),
        (
            "filter",
            "FORWARD",
            rule(
                new,
                "kubernetes externally-visible service portals",
                "KUBE-EXTERNAL-SERVICES",
            ),
        ),
        (
            "filter",
            "INPUT",
            rule(
                "",
                "kubernetes health check service ports",
                "KUBE-NODEPORTS",
            ),
        ),
        (
            "filter",
            "FORWARD",
            rule(new, "kubernetes service portals", "KUBE-SERVICES"),
        ),
        (
            "filter",
            "OUTPUT",
            rule(new, "kubernetes service portals", "KUBE-SERVICES"),
        ),
        (
            "filter",
            "FORWARD",
            rule("", "kubernetes forwarding rules", "KUBE-FORWARD"),
        ),
        (
            "filter",
            "INPUT",
            rule(
                new,
                "kubernetes load balancer firewall",
                "KUBE-PROXY-FIREWALL",
            ),
        ),
        (
            "filter",
            "OUTPUT",
            rule(
                new,
                "kubernetes load balancer firewall",
                "KUBE-PROXY-FIREWALL",
            ),
        ),
        (
            "filter",
            "FORWARD",
            rule(
                new,
                "kubernetes load balancer firewall",
                "KUBE-PROXY-FIREWALL",
            ),
        ),
        (
            "nat",
            "OUTPUT",
            rule("", "kubernetes service portals", "KUBE-SERVICES"),
        ),
        (
            "nat",
            "PREROUTING",
            rule("", "kubernetes service portals", "KUBE-SERVICES"),
        ),
        (
            "nat",
            "POSTROUTING",
            rule("", "kubernetes postrouting rules", "KUBE-POSTROUTING"),
        ),
    ]
}

/// The `nft -f` script of a full sync (nftables proxier): table, sets and
/// maps, chains, rules, then elements, so every reference resolves.
pub fn nft_ruleset(ports: &[ServicePort], options: &Options) -> String {
    let mark = format!("{:#x}", options.masquerade_mark);
    let table = "ip kube-proxy";
    let mut head = String::new();
    let mut chains = String::new();
    let mut rules = String::new();
    let mut elements = String::new();
    let _ = writeln!(
        head,
        "add table {table} {{ comment \"rules for kube-proxy\" ; }}"
    );
    // The base ruleset (kube-proxy's `baseRules` with nodePortAddresses
    // matching every local address).
    let _ = writeln!(
        head,
        "add set {table} cluster-ips {{ type ipv4_addr ; comment \"Active ClusterIPs\" ; }}"
    );
    for (name, kind, comment) in [
        (
            "firewall-ips",
            "ipv4_addr . inet_proto . inet_service : verdict",
            "destinations that are subject to LoadBalancerSourceRanges",
        ),
        (
            "no-endpoint-nodeports",
            "inet_proto . inet_service : verdict",
            "vmap to drop or reject packets to service nodeports with no endpoints",
        ),
        (
            "no-endpoint-services",
            "ipv4_addr . inet_proto . inet_service : verdict",
            "vmap to drop or reject packets to services with no endpoints",
        ),
        (
            "service-ips",
            "ipv4_addr . inet_proto . inet_service : verdict",
            "ClusterIP, ExternalIP and LoadBalancer IP traffic",
        ),
        (
            "service-nodeports",
            "inet_proto . inet_service : verdict",
            "NodePort traffic",
        ),
    ] {
        let _ = writeln!(
            head,
            "add map {table} {name} {{ type {kind} ; comment \"{comment}\" ; }}"
        );
    }
    for (chain, spec) in [
        ("cluster-ips-check", None),
        (
            "filter-prerouting-pre-dnat",
            Some("type filter hook prerouting priority -110"),
        ),
        (
            "filter-output-pre-dnat",
            Some("type filter hook output priority -110"),
        ),
        (
            "filter-forward",
            Some("type filter hook forward priority 0"),
        ),
        ("filter-input", Some("type filter hook input priority 0")),
        ("filter-output", Some("type filter hook output priority 0")),
        ("firewall-check", None),
        ("mark-for-masquerade", None),
        ("masquerading", None),
        ("nat-output", Some("type nat hook output priority -100")),
        (
            "nat-postrouting",
            Some("type nat hook postrouting priority 100"),
        ),
        (
            "nat-prerouting",
            Some("type nat hook prerouting priority -100"),
        ),
        ("nodeport-endpoints-check", None),
        (
            "reject-chain",
            Some("comment \"helper for @no-endpoint-services / @no-endpoint-nodeports\""),
        ),
        ("services", None),
        ("service-endpoints-check", None),
    ] {
        match spec {
            Some(spec) => {
                let _ = writeln!(chains, "add chain {table} {chain} {{ {spec} ; }}");
            }
            None => {
                let _ = writeln!(chains, "add chain {table} {chain}");
            }
        }
    }
    let mut rule = |text: String| {
        let _ = writeln!(rules, "add rule {table} {text}");
    };
    rule(
        "cluster-ips-check ip daddr @cluster-ips reject comment \"Reject traffic to invalid ports of ClusterIPs\""
            .into(),
    );
    if let Some(cidr) = &options.service_cidr {
        rule(format!(
            "cluster-ips-check ip daddr {{ {cidr} }} drop comment \"Drop traffic to unallocated ClusterIPs\""
        ));
    }
    for text in [
        "filter-prerouting-pre-dnat ct state new jump firewall-check",
        "filter-forward ct state new jump service-endpoints-check",
        "filter-forward ct state new jump cluster-ips-check",
        "filter-input ct state new jump nodeport-endpoints-check",
        "filter-input ct state new jump service-endpoints-check",
        "filter-output ct state new jump service-endpoints-check",
        "filter-output-pre-dnat ct state new jump firewall-check",
        "filter-output ct state new jump cluster-ips-check",
        "firewall-check ip daddr . meta l4proto . th dport vmap @firewall-ips",
    ] {
        rule(text.into());
    }
    rule(format!("mark-for-masquerade mark set mark or {mark}"));
    rule(format!("masquerading mark and {mark} == 0 return"));
    rule(format!("masquerading mark set mark xor {mark}"));
    for text in [
        "masquerading masquerade fully-random",
        "nat-output jump services",
        "nat-postrouting jump masquerading",
        "nat-prerouting jump services",
        "nodeport-endpoints-check ip daddr != 127.0.0.0/8 meta l4proto . th dport vmap @no-endpoint-nodeports",
        "reject-chain reject",
        "services ip daddr . meta l4proto . th dport vmap @service-ips",
        "services fib daddr type local ip daddr != 127.0.0.0/8 meta l4proto . th dport vmap @service-nodeports",
        "service-endpoints-check ip daddr . meta l4proto . th dport vmap @no-endpoint-services",
    ] {
        rule(text.into());
    }

    for port in ports {
        let (vip, dport, proto) = (port.cluster_ip, port.port, port.proto());
        let _ = writeln!(elements, "add element {table} cluster-ips {{ {vip} }}");
        if port.endpoints.is_empty() {
            let _ = writeln!(
                elements,
                "add element {table} no-endpoint-services {{ {vip} . {proto} . {dport} comment \"{}\" : goto reject-chain }}",
                port.service_port_name()
            );
            continue;
        }
        let service = format!("service-{}", nft_chain_suffix(&port.nft_base()));
        let _ = writeln!(chains, "add chain {table} {service}");
        if let Some(cidr) = &options.cluster_cidr {
            rule(format!(
                "{service} ip daddr {vip} ip saddr != {cidr} jump mark-for-masquerade"
            ));
        }
        let targets: Vec<String> = port
            .endpoints
            .iter()
            .enumerate()
            .map(|(i, &e)| {
                format!(
                    "{i} : goto endpoint-{}",
                    nft_chain_suffix(&port.nft_endpoint_base(e))
                )
            })
            .collect();
        rule(format!(
            "{service} numgen random mod {} vmap {{ {} }}",
            port.endpoints.len(),
            targets.join(" , ")
        ));
        for &endpoint in &port.endpoints {
            let chain = format!(
                "endpoint-{}",
                nft_chain_suffix(&port.nft_endpoint_base(endpoint))
            );
            let _ = writeln!(chains, "add chain {table} {chain}");
            rule(format!(
                "{chain} ip saddr {} jump mark-for-masquerade",
                endpoint.0
            ));
            rule(format!(
                "{chain} meta l4proto {proto} dnat to {}:{}",
                endpoint.0, endpoint.1
            ));
        }
        let _ = writeln!(
            elements,
            "add element {table} service-ips {{ {vip} . {proto} . {dport} : goto {service} }}"
        );
    }
    format!("{head}{chains}{rules}{elements}")
}

/// The nftables transaction kube-proxy runs when one service port's
/// endpoints change from `before` to `after`: its service chain rewritten,
/// new endpoint chains added, removed ones deleted.
pub fn nft_update(before: &ServicePort, after: &ServicePort, options: &Options) -> String {
    let table = "ip kube-proxy";
    let mut out = String::new();
    let service = format!("service-{}", nft_chain_suffix(&after.nft_base()));
    let endpoint_chain = |port: &ServicePort, e: (Ipv4Addr, u16)| {
        format!("endpoint-{}", nft_chain_suffix(&port.nft_endpoint_base(e)))
    };
    for &e in after
        .endpoints
        .iter()
        .filter(|e| !before.endpoints.contains(e))
    {
        let chain = endpoint_chain(after, e);
        let _ = writeln!(out, "add chain {table} {chain}");
        let _ = writeln!(
            out,
            "add rule {table} {chain} ip saddr {} jump mark-for-masquerade",
            e.0
        );
        let _ = writeln!(
            out,
            "add rule {table} {chain} meta l4proto {} dnat to {}:{}",
            after.proto(),
            e.0,
            e.1
        );
    }
    let _ = writeln!(out, "flush chain {table} {service}");
    if let Some(cidr) = &options.cluster_cidr {
        let _ = writeln!(
            out,
            "add rule {table} {service} ip daddr {} ip saddr != {cidr} jump mark-for-masquerade",
            after.cluster_ip
        );
    }
    let targets: Vec<String> = after
        .endpoints
        .iter()
        .enumerate()
        .map(|(i, &e)| format!("{i} : goto {}", endpoint_chain(after, e)))
        .collect();
    let _ = writeln!(
        out,
        "add rule {table} {service} numgen random mod {} vmap {{ {} }}",
        after.endpoints.len(),
        targets.join(" , ")
    );
    for &e in before
        .endpoints
        .iter()
        .filter(|e| !after.endpoints.contains(e))
    {
        let chain = endpoint_chain(before, e);
        let _ = writeln!(out, "flush chain {table} {chain}");
        let _ = writeln!(out, "delete chain {table} {chain}");
    }
    out
}
