//! The iptables proxier's `iptables-restore` payloads: a full sync, a
//! partial one, and the jumps from the base chains.

use std::fmt::Write as _;

use super::service_port::{
    LARGE_CLUSTER_ENDPOINTS, Options, ServicePort, endpoint_string, probability,
};
use crate::family::IpFamily;

/// Quotes a comment as kube-proxy's rules show it: bare when it has no
/// space.
fn comment(text: &str) -> String {
    if text.contains(' ') {
        format!("\"{text}\"")
    } else {
        text.to_owned()
    }
}

/// The `iptables-restore --noflush` payload of a full sync (for
/// `ip6tables-restore` with an IPv6 `options.family`).
pub fn iptables_restore(ports: &[ServicePort], options: &Options) -> String {
    iptables_restore_partial(ports, options, &|_| true, &[])
}

/// A partial sync's payload (kube-proxy ≥ 1.26, `MinimizeIPTablesRestore`):
/// the fixed chains and KUBE-SERVICES in full, the chains of the service
/// ports `rewrite` selects, and `-X` for chains no longer used. Service
/// ports of the other family are left out (the other proxier's).
pub fn iptables_restore_partial(
    ports: &[ServicePort],
    options: &Options,
    rewrite: &dyn Fn(&ServicePort) -> bool,
    deleted_chains: &[String],
) -> String {
    let mark = format!("{:#x}", options.masquerade_mark);
    let family = options.family;
    let ports: Vec<&ServicePort> = ports.iter().filter(|p| p.family() == family).collect();
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
    ] {
        let _ = writeln!(filter_chains, ":{chain} - [0:0]");
    }
    // The route_localnet mitigation: IPv4 only (localhost NodePorts
    // never work over IPv6, so that proxier has no such rule).
    if family == IpFamily::V4 {
        let _ = writeln!(filter_chains, ":KUBE-FIREWALL - [0:0]");
        let _ = writeln!(
            filter_rules,
            "-A KUBE-FIREWALL -m comment --comment \"block incoming localnet connections\" -d 127.0.0.0/8 ! -s 127.0.0.0/8 -m conntrack ! --ctstate RELATED,ESTABLISHED,DNAT -j DROP"
        );
    }
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
            if let Some(node_port) = port.node_port {
                let _ = writeln!(
                    filter_rules,
                    "-A KUBE-EXTERNAL-SERVICES -m comment --comment {} -m addrtype --dst-type LOCAL -m {proto} -p {proto} --dport {node_port} -j REJECT",
                    comment(&format!("{spn} has no endpoints"))
                );
            }
            continue;
        }
        let svc = port.svc_chain();
        let cluster_ip = comment(&format!("{spn} cluster IP"));
        let _ = writeln!(
            nat_rules,
            "-A KUBE-SERVICES -m comment --comment {cluster_ip} -m {proto} -p {proto} -d {vip} --dport {dport} -j {svc}"
        );
        // KUBE-NODEPORTS, like KUBE-SERVICES, is written whole on every
        // sync; the service's own chains only when it is rewritten.
        if let Some(node_port) = port.node_port {
            let _ = writeln!(
                nat_rules,
                "-A KUBE-NODEPORTS -m comment --comment {} -m {proto} -p {proto} --dport {node_port} -j {}",
                comment(&spn),
                port.ext_chain()
            );
        }
        if !rewrite(port) {
            continue;
        }
        if port.node_port.is_some() {
            // `externalTrafficPolicy: Cluster`: every external client
            // is masqueraded, as it may be sent to another node.
            let ext = port.ext_chain();
            let _ = writeln!(nat_chains, ":{ext} - [0:0]");
            let _ = writeln!(
                nat_rules,
                "-A {ext} -m comment --comment {} -j KUBE-MARK-MASQ",
                comment(&format!(
                    "masquerade traffic for {spn} external destinations"
                ))
            );
            let _ = writeln!(nat_rules, "-A {ext} -j {svc}");
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
                    comment(&format!("{spn} -> {}", endpoint_string(endpoint)))
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
                "-A {sep} {note}-m {proto} -p {proto} -j DNAT --to-destination {}",
                endpoint_string(endpoint)
            );
        }
    }
    // Over IPv6 localhost NodePorts never work: the tail leaves ::1 out.
    let _ = writeln!(
        nat_rules,
        "-A KUBE-SERVICES -m comment --comment \"kubernetes service nodeports; NOTE: this must be the last rule in this chain\" -m addrtype --dst-type LOCAL {}-j KUBE-NODEPORTS",
        if family == IpFamily::V6 {
            "! -d ::1/128 "
        } else {
            ""
        }
    );
    // As kube-proxy does: a stale chain is flushed (declared) and then
    // deleted in the same transaction.
    for chain in deleted_chains {
        let _ = writeln!(nat_chains, ":{chain} - [0:0]");
        let _ = writeln!(nat_rules, "-X {chain}");
    }
    format!("*filter\n{filter_chains}{filter_rules}COMMIT\n*nat\n{nat_chains}{nat_rules}COMMIT\n")
}

/// The jump rules on a node running the proxier of `family`, in the
/// order they are installed, each with `iptables -I <chain> 1` (not part
/// of the restore payload), as (table, chain, rule arguments). The two
/// jumps to `KUBE-FIREWALL` (no comment) are kubelet's: over IPv4 kubelet
/// makes them before kube-proxy starts (kube-proxy's `EnsureRule` then
/// finds them; its own, prepended, stand before them); kubelet 1.28+
/// makes none over IPv6, so kube-proxy's loop over its jump chains and
/// then kubelet's prepends them last: they stand first.
pub fn iptables_jumps(family: IpFamily) -> Vec<(&'static str, &'static str, String)> {
    let rule = |extra: &str, comment: &str, to: &str| {
        format!("{extra}-m comment --comment \"{comment}\" -j {to}")
    };
    let new = "-m conntrack --ctstate NEW ";
    let kubelet = vec![
        ("filter", "INPUT", "-j KUBE-FIREWALL".to_owned()),
        ("filter", "OUTPUT", "-j KUBE-FIREWALL".to_owned()),
    ];
    let kube_proxy = vec![
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
    ];
    match family {
        IpFamily::V4 => kubelet.into_iter().chain(kube_proxy).collect(),
        IpFamily::V6 => kube_proxy.into_iter().chain(kubelet).collect(),
    }
}

/// Chains the jumps need that the restore payload of `family` does not
/// make, as (table, chain): over IPv6 kube-proxy's `EnsureChain` makes an
/// empty `KUBE-FIREWALL` (its rule is IPv4's only, in the payload).
pub fn iptables_ensured_chains(family: IpFamily) -> Vec<(&'static str, &'static str)> {
    match family {
        IpFamily::V4 => Vec::new(),
        IpFamily::V6 => vec![("filter", "KUBE-FIREWALL")],
    }
}
