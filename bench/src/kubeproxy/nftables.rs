//! The nftables proxier's `nft -f` scripts: a full sync and an update.

use std::{fmt::Write as _, net::IpAddr};

use super::service_port::{Options, ServicePort, endpoint_string, nft_chain_suffix};

/// The `nft -f` script of a full sync (nftables proxier): table, sets and
/// maps, chains, rules, then elements, so every reference resolves. In
/// table `ip kube-proxy`, or `ip6 kube-proxy` for an IPv6
/// `options.family`; service ports of the other family are left out.
pub fn nft_ruleset(ports: &[ServicePort], options: &Options) -> String {
    let mark = format!("{:#x}", options.masquerade_mark);
    let family = options.family;
    let ports = ports.iter().filter(|p| p.family() == family);
    // `ip`/`ip6`: the table's family and the address match keyword.
    let ip = family.nft();
    let addr = family.nft_addr_type();
    let loopback = family.nft_loopback();
    let table = format!("{ip} kube-proxy");
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
        "add set {table} cluster-ips {{ type {addr} ; comment \"Active ClusterIPs\" ; }}"
    );
    let addr_key = format!("{addr} . inet_proto . inet_service : verdict");
    for (name, kind, comment) in [
        (
            "firewall-ips",
            addr_key.as_str(),
            "destinations that are subject to LoadBalancerSourceRanges",
        ),
        (
            "no-endpoint-nodeports",
            "inet_proto . inet_service : verdict",
            "vmap to drop or reject packets to service nodeports with no endpoints",
        ),
        (
            "no-endpoint-services",
            addr_key.as_str(),
            "vmap to drop or reject packets to services with no endpoints",
        ),
        (
            "service-ips",
            addr_key.as_str(),
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
    rule(format!(
        "cluster-ips-check {ip} daddr @cluster-ips reject comment \"Reject traffic to invalid ports of ClusterIPs\""
    ));
    if let Some(cidr) = &options.service_cidr {
        rule(format!(
            "cluster-ips-check {ip} daddr {{ {cidr} }} drop comment \"Drop traffic to unallocated ClusterIPs\""
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
    ] {
        rule(text.into());
    }
    rule(format!(
        "firewall-check {ip} daddr . meta l4proto . th dport vmap @firewall-ips"
    ));
    rule(format!("mark-for-masquerade mark set mark or {mark}"));
    rule(format!("masquerading mark and {mark} == 0 return"));
    rule(format!("masquerading mark set mark xor {mark}"));
    for text in [
        "masquerading masquerade fully-random".to_owned(),
        "nat-output jump services".to_owned(),
        "nat-postrouting jump masquerading".to_owned(),
        "nat-prerouting jump services".to_owned(),
        format!(
            "nodeport-endpoints-check {ip} daddr != {loopback} meta l4proto . th dport vmap @no-endpoint-nodeports"
        ),
        "reject-chain reject".to_owned(),
        format!("services {ip} daddr . meta l4proto . th dport vmap @service-ips"),
        format!(
            "services fib daddr type local {ip} daddr != {loopback} meta l4proto . th dport vmap @service-nodeports"
        ),
        format!(
            "service-endpoints-check {ip} daddr . meta l4proto . th dport vmap @no-endpoint-services"
        ),
    ] {
        rule(text);
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
            if let Some(node_port) = port.node_port {
                let _ = writeln!(
                    elements,
                    "add element {table} no-endpoint-nodeports {{ {proto} . {node_port} comment \"{}\" : goto reject-chain }}",
                    port.service_port_name()
                );
            }
            continue;
        }
        let service = format!("service-{}", nft_chain_suffix(&port.nft_base()));
        let _ = writeln!(chains, "add chain {table} {service}");
        if let Some(cidr) = &options.cluster_cidr {
            rule(format!(
                "{service} {ip} daddr {vip} {ip} saddr != {cidr} jump mark-for-masquerade"
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
                "{chain} {ip} saddr {} jump mark-for-masquerade",
                endpoint.0
            ));
            rule(format!(
                "{chain} meta l4proto {proto} dnat to {}",
                endpoint_string(endpoint)
            ));
        }
        let _ = writeln!(
            elements,
            "add element {table} service-ips {{ {vip} . {proto} . {dport} : goto {service} }}"
        );
        if let Some(node_port) = port.node_port {
            // `externalTrafficPolicy: Cluster`: every external client
            // is masqueraded, as it may be sent to another node.
            let external = format!("external-{}", nft_chain_suffix(&port.nft_base()));
            let _ = writeln!(chains, "add chain {table} {external}");
            rule(format!("{external} jump mark-for-masquerade"));
            rule(format!("{external} goto {service}"));
            let _ = writeln!(
                elements,
                "add element {table} service-nodeports {{ {proto} . {node_port} : goto {external} }}"
            );
        }
    }
    format!("{head}{chains}{rules}{elements}")
}

/// The nftables transaction kube-proxy runs when one service port's
/// endpoints change from `before` to `after`: its service chain rewritten,
/// new endpoint chains added, removed ones deleted.
pub fn nft_update(before: &ServicePort, after: &ServicePort, options: &Options) -> String {
    let ip = after.family().nft();
    let table = format!("{ip} kube-proxy");
    let mut out = String::new();
    let service = format!("service-{}", nft_chain_suffix(&after.nft_base()));
    let endpoint_chain = |port: &ServicePort, e: (IpAddr, u16)| {
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
            "add rule {table} {chain} {ip} saddr {} jump mark-for-masquerade",
            e.0
        );
        let _ = writeln!(
            out,
            "add rule {table} {chain} meta l4proto {} dnat to {}",
            after.proto(),
            endpoint_string(e)
        );
    }
    let _ = writeln!(out, "flush chain {table} {service}");
    if let Some(cidr) = &options.cluster_cidr {
        let _ = writeln!(
            out,
            "add rule {table} {service} {ip} daddr {} {ip} saddr != {cidr} jump mark-for-masquerade",
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
