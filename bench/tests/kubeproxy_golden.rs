//! kube-proxy's rules as the generator writes them, against kube-proxy's
//! own test expectations (`TestOverallIPTablesRules`,
//! `TestOverallNFTablesRules`) and, as root, against `iptables-restore
//! --test` and `nft --check` inside a namespace the test creates.

use std::{
    io::Write,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    process::{Command, Stdio},
};

use bench::family::IpFamily;
use bench::kubeproxy::{
    Options, ServicePort, iptables_restore, nft_chain_suffix, nft_ruleset, port_proto_hash,
    probability, service_ports,
};
use datapath_user::model::Protocol;

fn port(ns: &str, name: &str, vip: [u8; 4], endpoints: &[([u8; 4], u16)]) -> ServicePort {
    ServicePort {
        namespace: ns.into(),
        name: name.into(),
        port_name: "p80".into(),
        protocol: Protocol::Tcp,
        cluster_ip: Ipv4Addr::from(vip).into(),
        port: 80,
        endpoints: endpoints
            .iter()
            .map(|(a, p)| (Ipv4Addr::from(*a).into(), *p))
            .collect(),
        node_port: None,
    }
}

/// An IPv6 service port (endpoints given in kube-proxy's order).
fn port6(ns: &str, name: &str, vip: &str, endpoints: &[(&str, u16)]) -> ServicePort {
    ServicePort {
        namespace: ns.into(),
        name: name.into(),
        port_name: "p80".into(),
        protocol: Protocol::Tcp,
        cluster_ip: vip.parse::<Ipv6Addr>().unwrap().into(),
        port: 80,
        endpoints: endpoints
            .iter()
            .map(|(a, p)| (IpAddr::V6(a.parse().unwrap()), *p))
            .collect(),
        node_port: None,
    }
}

/// The IPv6 proxier's options of the upstream IPv6 examples.
fn options6() -> Options {
    Options {
        cluster_cidr: Some("fd00:10::/64".into()),
        service_cidr: Some("fd00:10:96::/112".into()),
        family: IpFamily::V6,
        ..Options::default()
    }
}

#[test]
fn chain_names_match_kube_proxy() {
    assert_eq!(port_proto_hash("ns1/svc1:p80", "tcp"), "XPGD46QRK7WJZT7O");
    assert_eq!(port_proto_hash("ns4/svc4:p80", "tcp"), "4SW47YFZTEDKD3PK");
    assert_eq!(port_proto_hash("ns5/svc5:p80", "tcp"), "NUKIZ6OKUXPJNT4C");
    assert_eq!(port_proto_hash("ns/svc-0:p80", "tcp"), "QXFI76OKN46J6TV4");
    let svc1 = port("ns1", "svc1", [172, 30, 0, 41], &[([10, 180, 0, 1], 80)]);
    assert_eq!(svc1.svc_chain(), "KUBE-SVC-XPGD46QRK7WJZT7O");
    assert_eq!(
        svc1.sep_chain((Ipv4Addr::new(10, 180, 0, 1).into(), 80)),
        "KUBE-SEP-SXIVWICOYRO3J4NJ"
    );
    assert_eq!(
        nft_chain_suffix("ns1/svc1/tcp/p80"),
        "ULMVA6XW-ns1/svc1/tcp/p80"
    );
    assert!(nft_chain_suffix("ns1/svc1/tcp/p80__10.180.0.1/80").starts_with("5OJB2KTY-"));
    assert!(nft_chain_suffix("ns4/svc4/tcp/p80__10.180.0.4/80").starts_with("UNZV3OEC-"));
    assert_eq!(probability(3), "0.3333333333");
    assert_eq!(probability(2), "0.5000000000");
}

#[test]
fn iptables_rules_match_the_upstream_example() {
    let svc4 = port(
        "ns4",
        "svc4",
        [172, 30, 0, 44],
        &[([10, 180, 0, 4], 80), ([10, 180, 0, 5], 80)],
    );
    let payload = iptables_restore(&[svc4], &Options::default());
    for line in [
        r#"-A KUBE-SERVICES -m comment --comment "ns4/svc4:p80 cluster IP" -m tcp -p tcp -d 172.30.0.44 --dport 80 -j KUBE-SVC-4SW47YFZTEDKD3PK"#,
        r#"-A KUBE-SVC-4SW47YFZTEDKD3PK -m comment --comment "ns4/svc4:p80 cluster IP" -m tcp -p tcp -d 172.30.0.44 --dport 80 ! -s 10.0.0.0/8 -j KUBE-MARK-MASQ"#,
        r#"-A KUBE-SVC-4SW47YFZTEDKD3PK -m comment --comment "ns4/svc4:p80 -> 10.180.0.4:80" -m statistic --mode random --probability 0.5000000000 -j KUBE-SEP-UKSFD7AGPMPPLUHC"#,
        r#"-A KUBE-SVC-4SW47YFZTEDKD3PK -m comment --comment "ns4/svc4:p80 -> 10.180.0.5:80" -j KUBE-SEP-C6EBXVWJJZMIWKLZ"#,
        r#"-A KUBE-SEP-UKSFD7AGPMPPLUHC -m comment --comment ns4/svc4:p80 -s 10.180.0.4 -j KUBE-MARK-MASQ"#,
        r#"-A KUBE-SEP-UKSFD7AGPMPPLUHC -m comment --comment ns4/svc4:p80 -m tcp -p tcp -j DNAT --to-destination 10.180.0.4:80"#,
        "-A KUBE-POSTROUTING -m mark ! --mark 0x4000/0x4000 -j RETURN",
        "-A KUBE-MARK-MASQ -j MARK --or-mark 0x4000",
        ":KUBE-SVC-4SW47YFZTEDKD3PK - [0:0]",
    ] {
        assert!(
            payload.lines().any(|l| l == line),
            "missing:\n{line}\nin:\n{payload}"
        );
    }
    // Chains before rules in each table; the nodeports jump comes last.
    let nat = payload.split("*nat\n").nth(1).unwrap();
    let lines: Vec<&str> = nat.lines().collect();
    let last_chain = lines.iter().rposition(|l| l.starts_with(':')).unwrap();
    let first_rule = nat.lines().position(|l| l.starts_with("-A")).unwrap();
    assert!(last_chain < first_rule);
    let services: Vec<&str> = nat
        .lines()
        .filter(|l| l.starts_with("-A KUBE-SERVICES"))
        .collect();
    assert!(services.last().unwrap().contains("KUBE-NODEPORTS"));
}

#[test]
fn a_service_without_endpoints_is_rejected_in_filter() {
    let empty = port("ns6", "svc6", [172, 30, 0, 46], &[]);
    let payload = iptables_restore(std::slice::from_ref(&empty), &Options::default());
    assert!(payload.contains(r#"-A KUBE-SERVICES -m comment --comment "ns6/svc6:p80 has no endpoints" -m tcp -p tcp -d 172.30.0.46 --dport 80 -j REJECT"#));
    let nft = nft_ruleset(&[empty], &Options::default());
    assert!(nft.contains(r#"add element ip kube-proxy no-endpoint-services { 172.30.0.46 . tcp . 80 comment "ns6/svc6:p80" : goto reject-chain }"#), "{nft}");
}

#[test]
fn large_clusters_drop_per_endpoint_comments() {
    let endpoints: Vec<([u8; 4], u16)> = (0..1001u32)
        .map(|i| ((0x0ab40000 + i).to_be_bytes(), 80))
        .collect();
    let big = port("ns", "big", [172, 30, 0, 50], &endpoints);
    let payload = iptables_restore(&[big], &Options::default());
    assert!(payload.contains("-m comment --comment \"ns/big:p80 cluster IP\""));
    assert!(!payload.contains("ns/big:p80 ->"));
    let last = payload
        .lines()
        .rfind(|l| l.starts_with("-A KUBE-SVC-"))
        .unwrap();
    assert!(
        last.starts_with("-A KUBE-SVC-")
            && last.contains(" -j KUBE-SEP-")
            && !last.contains("statistic")
    );
}

/// `TestOverallIPTablesRules`' ns1/svc1 (NodePort 3001,
/// `externalTrafficPolicy: Cluster`), its nat lines verbatim.
#[test]
fn iptables_node_port_rules_match_the_upstream_example() {
    let svc1 = ServicePort {
        node_port: Some(3001),
        ..port("ns1", "svc1", [172, 30, 0, 41], &[([10, 180, 0, 1], 80)])
    };
    let payload = iptables_restore(&[svc1], &Options::default());
    let nat = payload.split("*nat\n").nth(1).unwrap();
    for line in [
        ":KUBE-EXT-XPGD46QRK7WJZT7O - [0:0]",
        "-A KUBE-NODEPORTS -m comment --comment ns1/svc1:p80 -m tcp -p tcp --dport 3001 -j KUBE-EXT-XPGD46QRK7WJZT7O",
        r#"-A KUBE-EXT-XPGD46QRK7WJZT7O -m comment --comment "masquerade traffic for ns1/svc1:p80 external destinations" -j KUBE-MARK-MASQ"#,
        "-A KUBE-EXT-XPGD46QRK7WJZT7O -j KUBE-SVC-XPGD46QRK7WJZT7O",
    ] {
        assert!(
            nat.lines().any(|l| l == line),
            "missing:\n{line}\nin:\n{payload}"
        );
    }
    // The masquerade mark first, then the service chain.
    let ext: Vec<&str> = nat
        .lines()
        .filter(|l| l.starts_with("-A KUBE-EXT-"))
        .collect();
    assert!(ext[0].ends_with("KUBE-MARK-MASQ") && ext[1].ends_with("KUBE-SVC-XPGD46QRK7WJZT7O"));
    // With endpoints and policy Cluster, nothing in the filter table.
    let filter = payload.split("*nat\n").next().unwrap();
    assert!(!filter.contains("3001"), "{filter}");
    // Without endpoints: rejected in filter, where external traffic is.
    let none = ServicePort {
        node_port: Some(3006),
        ..port("ns6", "svc6", [172, 30, 0, 46], &[])
    };
    let payload = iptables_restore(&[none], &Options::default());
    assert!(
        payload.lines().any(|l| l
            == r#"-A KUBE-EXTERNAL-SERVICES -m comment --comment "ns6/svc6:p80 has no endpoints" -m addrtype --dst-type LOCAL -m tcp -p tcp --dport 3006 -j REJECT"#),
        "{payload}"
    );
}

/// `TestOverallNFTablesRules`' ns3/svc3 (NodePort 3003, policy
/// Cluster), verbatim.
#[test]
fn nft_node_port_rules_match_the_upstream_example() {
    let svc3 = ServicePort {
        node_port: Some(3003),
        ..port("ns3", "svc3", [172, 30, 0, 43], &[([10, 180, 0, 3], 80)])
    };
    let script = nft_ruleset(&[svc3], &Options::default());
    for line in [
        "add chain ip kube-proxy external-4AT6LBPK-ns3/svc3/tcp/p80",
        "add rule ip kube-proxy external-4AT6LBPK-ns3/svc3/tcp/p80 jump mark-for-masquerade",
        "add rule ip kube-proxy external-4AT6LBPK-ns3/svc3/tcp/p80 goto service-4AT6LBPK-ns3/svc3/tcp/p80",
        "add element ip kube-proxy service-nodeports { tcp . 3003 : goto external-4AT6LBPK-ns3/svc3/tcp/p80 }",
    ] {
        assert!(
            script.lines().any(|l| l == line),
            "missing:\n{line}\nin:\n{script}"
        );
    }
    let none = ServicePort {
        node_port: Some(3006),
        ..port("ns6", "svc6", [172, 30, 0, 46], &[])
    };
    let script = nft_ruleset(&[none], &Options::default());
    assert!(
        script.lines().any(|l| l
            == r#"add element ip kube-proxy no-endpoint-nodeports { tcp . 3006 comment "ns6/svc6:p80" : goto reject-chain }"#),
        "{script}"
    );
}

/// A NodePort service's nodePort reaches kube-proxy's view of its
/// ports; under `externalTrafficPolicy: Local` (not generated) it does
/// not.
#[test]
fn node_ports_come_from_the_service_and_local_ones_are_left_out() {
    let (mut service, slice) = bench::cluster::service_objects(
        "web",
        Ipv4Addr::new(10, 96, 0, 20),
        &[(80, 8080)],
        &[Ipv4Addr::new(10, 77, 0, 3)],
    );
    let spec = service.spec.as_mut().unwrap();
    spec.type_ = Some("NodePort".into());
    spec.ports.as_mut().unwrap()[0].node_port = Some(30080);
    let ports = service_ports(std::slice::from_ref(&service), std::slice::from_ref(&slice));
    assert_eq!(
        ports.len(),
        1,
        "the ClusterIP only, not one per node address"
    );
    assert_eq!(ports[0].node_port, Some(30080));
    service.spec.as_mut().unwrap().external_traffic_policy = Some("Local".into());
    assert_eq!(service_ports(&[service], &[slice])[0].node_port, None);
}

#[test]
fn nft_rules_match_the_upstream_example() {
    let svc1 = port("ns1", "svc1", [172, 30, 0, 41], &[([10, 180, 0, 1], 80)]);
    let script = nft_ruleset(&[svc1], &Options::default());
    for line in [
        "add chain ip kube-proxy service-ULMVA6XW-ns1/svc1/tcp/p80",
        "add rule ip kube-proxy service-ULMVA6XW-ns1/svc1/tcp/p80 ip daddr 172.30.0.41 ip saddr != 10.0.0.0/8 jump mark-for-masquerade",
        "add rule ip kube-proxy service-ULMVA6XW-ns1/svc1/tcp/p80 numgen random mod 1 vmap { 0 : goto endpoint-5OJB2KTY-ns1/svc1/tcp/p80__10.180.0.1/80 }",
        "add chain ip kube-proxy endpoint-5OJB2KTY-ns1/svc1/tcp/p80__10.180.0.1/80",
        "add rule ip kube-proxy endpoint-5OJB2KTY-ns1/svc1/tcp/p80__10.180.0.1/80 ip saddr 10.180.0.1 jump mark-for-masquerade",
        "add rule ip kube-proxy endpoint-5OJB2KTY-ns1/svc1/tcp/p80__10.180.0.1/80 meta l4proto tcp dnat to 10.180.0.1:80",
        "add element ip kube-proxy cluster-ips { 172.30.0.41 }",
        "add element ip kube-proxy service-ips { 172.30.0.41 . tcp . 80 : goto service-ULMVA6XW-ns1/svc1/tcp/p80 }",
        "add rule ip kube-proxy masquerading masquerade fully-random",
        "add rule ip kube-proxy services ip daddr . meta l4proto . th dport vmap @service-ips",
    ] {
        assert!(
            script.lines().any(|l| l == line),
            "missing:\n{line}\nin:\n{script}"
        );
    }
    let svc4 = port(
        "ns4",
        "svc4",
        [172, 30, 0, 44],
        &[([10, 180, 0, 4], 80), ([10, 180, 0, 5], 80)],
    );
    let script = nft_ruleset(&[svc4], &Options::default());
    assert!(script.contains("numgen random mod 2 vmap { 0 : goto endpoint-UNZV3OEC-ns4/svc4/tcp/p80__10.180.0.4/80 , 1 : goto endpoint-"), "{script}");
}

#[test]
fn ports_from_kubernetes_objects_use_kube_proxy_names_and_order() {
    let text = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../datapath-user/tests/fixtures/k8s/kube-dns.yaml"
    ))
    .unwrap();
    let parsed = datapath_user::k8s::manifest::parse(&text, "kube-dns.yaml");
    let (mut services, mut slices) = (Vec::new(), Vec::new());
    for object in parsed.objects {
        match object {
            datapath_user::k8s::Typed::Service(s) => services.push(*s),
            datapath_user::k8s::Typed::EndpointSlice(s) => slices.push(*s),
        }
    }
    let ports = service_ports(&services, &slices);
    let names: Vec<String> = ports
        .iter()
        .map(|p| format!("{} {:?}", p.service_port_name(), p.protocol))
        .collect();
    assert_eq!(
        names,
        [
            "kube-system/kube-dns:dns Udp",
            "kube-system/kube-dns:dns-tcp Tcp",
            "kube-system/kube-dns:metrics Tcp"
        ]
    );
    assert_eq!(
        ports[0].endpoints[0],
        (Ipv4Addr::new(10, 244, 0, 3).into(), 1053)
    );
}

#[test]
fn nft_ipv6_rules_match_the_upstream_example() {
    // From knftables' fake_test.go dump of kube-proxy's IPv6 table: chain
    // names, the endpoint base with `:` → `.`, `[addr]:port` DNAT
    // targets, the endpoints in "[IP]:port" order, the ip6 base rules.
    let svc1 = port6(
        "ns1",
        "svc1",
        "fd00:172:30::41",
        &[("fd00:10:180::1", 80), ("fd00:10:180::2:1", 80)],
    );
    let script = nft_ruleset(&[svc1], &options6());
    for line in [
        "add table ip6 kube-proxy { comment \"rules for kube-proxy\" ; }",
        "add set ip6 kube-proxy cluster-ips { type ipv6_addr ; comment \"Active ClusterIPs\" ; }",
        "add map ip6 kube-proxy service-ips { type ipv6_addr . inet_proto . inet_service : verdict ; comment \"ClusterIP, ExternalIP and LoadBalancer IP traffic\" ; }",
        "add rule ip6 kube-proxy cluster-ips-check ip6 daddr @cluster-ips reject comment \"Reject traffic to invalid ports of ClusterIPs\"",
        "add rule ip6 kube-proxy cluster-ips-check ip6 daddr { fd00:10:96::/112 } drop comment \"Drop traffic to unallocated ClusterIPs\"",
        "add chain ip6 kube-proxy endpoint-2CRNCTTE-ns1/svc1/tcp/p80__fd00.10.180..2.1/80",
        "add rule ip6 kube-proxy endpoint-2CRNCTTE-ns1/svc1/tcp/p80__fd00.10.180..2.1/80 ip6 saddr fd00:10:180::2:1 jump mark-for-masquerade",
        "add rule ip6 kube-proxy endpoint-2CRNCTTE-ns1/svc1/tcp/p80__fd00.10.180..2.1/80 meta l4proto tcp dnat to [fd00:10:180::2:1]:80",
        "add rule ip6 kube-proxy endpoint-ZVRFLKHO-ns1/svc1/tcp/p80__fd00.10.180..1/80 meta l4proto tcp dnat to [fd00:10:180::1]:80",
        "add rule ip6 kube-proxy service-ULMVA6XW-ns1/svc1/tcp/p80 numgen random mod 2 vmap { 0 : goto endpoint-ZVRFLKHO-ns1/svc1/tcp/p80__fd00.10.180..1/80 , 1 : goto endpoint-2CRNCTTE-ns1/svc1/tcp/p80__fd00.10.180..2.1/80 }",
        "add rule ip6 kube-proxy firewall-check ip6 daddr . meta l4proto . th dport vmap @firewall-ips",
        "add rule ip6 kube-proxy services ip6 daddr . meta l4proto . th dport vmap @service-ips",
        "add rule ip6 kube-proxy service-endpoints-check ip6 daddr . meta l4proto . th dport vmap @no-endpoint-services",
        "add element ip6 kube-proxy cluster-ips { fd00:172:30::41 }",
        "add element ip6 kube-proxy service-ips { fd00:172:30::41 . tcp . 80 : goto service-ULMVA6XW-ns1/svc1/tcp/p80 }",
    ] {
        assert!(
            script.lines().any(|l| l == line),
            "missing:\n{line}\nin:\n{script}"
        );
    }
    // Not from that dump (an older proxier, with nodePortAddresses set):
    // the newest kube-proxy's masquerade rule (no port match, as the
    // IPv4 rules of TestOverallNFTablesRules) and setupNFTables'
    // `noLocalhost` for IPv6 with nodePortAddresses matching all.
    for line in [
        "add rule ip6 kube-proxy service-ULMVA6XW-ns1/svc1/tcp/p80 ip6 daddr fd00:172:30::41 ip6 saddr != fd00:10::/64 jump mark-for-masquerade",
        "add rule ip6 kube-proxy services fib daddr type local ip6 daddr != ::1 meta l4proto . th dport vmap @service-nodeports",
        "add rule ip6 kube-proxy nodeport-endpoints-check ip6 daddr != ::1 meta l4proto . th dport vmap @no-endpoint-nodeports",
    ] {
        assert!(
            script.lines().any(|l| l == line),
            "missing:\n{line}\nin:\n{script}"
        );
    }
    assert!(!script.contains("ipv4_addr") && !script.contains(" ip daddr "));
}

#[test]
fn ip6tables_rules_write_endpoints_as_kube_proxy_does() {
    // `BaseEndpointInfo.String()` is Go's JoinHostPort: "[IP]:port" in
    // the KUBE-SEP hash, the comments and the DNAT target.
    let svc1 = port6(
        "ns1",
        "svc1",
        "fd00:172:30::41",
        &[("fd00:10:180::1", 80), ("fd00:10:180::2:1", 80)],
    );
    let first: (IpAddr, u16) = ("fd00:10:180::1".parse::<IpAddr>().unwrap(), 80);
    let sep = svc1.sep_chain(first);
    // base32(sha256("ns1/svc1:p80tcp[fd00:10:180::1]:80"))[:16].
    assert_eq!(
        sep, "KUBE-SEP-OGYCNMB4EMRUSJ6N",
        "the SEP hash covers the bracketed endpoint"
    );
    // A port of the other family is the other proxier's.
    let other = port("ns4", "svc4", [172, 30, 0, 44], &[([10, 180, 0, 4], 80)]);
    let payload = iptables_restore(&[svc1, other], &options6());
    for line in [
        r#"-A KUBE-SERVICES -m comment --comment "ns1/svc1:p80 cluster IP" -m tcp -p tcp -d fd00:172:30::41 --dport 80 -j KUBE-SVC-XPGD46QRK7WJZT7O"#.to_owned(),
        r#"-A KUBE-SVC-XPGD46QRK7WJZT7O -m comment --comment "ns1/svc1:p80 cluster IP" -m tcp -p tcp -d fd00:172:30::41 --dport 80 ! -s fd00:10::/64 -j KUBE-MARK-MASQ"#.to_owned(),
        format!(r#"-A KUBE-SVC-XPGD46QRK7WJZT7O -m comment --comment "ns1/svc1:p80 -> [fd00:10:180::1]:80" -m statistic --mode random --probability 0.5000000000 -j {sep}"#),
        format!("-A {sep} -m comment --comment ns1/svc1:p80 -s fd00:10:180::1 -j KUBE-MARK-MASQ"),
        format!("-A {sep} -m comment --comment ns1/svc1:p80 -m tcp -p tcp -j DNAT --to-destination [fd00:10:180::1]:80"),
        // Localhost NodePorts never work over IPv6: the tail leaves ::1
        // out.
        r#"-A KUBE-SERVICES -m comment --comment "kubernetes service nodeports; NOTE: this must be the last rule in this chain" -m addrtype --dst-type LOCAL ! -d ::1/128 -j KUBE-NODEPORTS"#.to_owned(),
    ] {
        assert!(
            payload.lines().any(|l| l == line),
            "missing:\n{line}\nin:\n{payload}"
        );
    }
    assert!(
        !payload.contains("KUBE-FIREWALL") && !payload.contains("127.0.0.0/8"),
        "the route_localnet rule is IPv4's:\n{payload}"
    );
    assert!(!payload.contains("172.30.0.44"), "{payload}");
}

/// Runs `command` with `input` on stdin inside a fresh namespace.
fn check_in_namespace(command: &str, args: &[&str], input: &str) -> Result<(), String> {
    let namespace = lab::Namespace::create(&format!("{}-rules", lab::unique_prefix()))
        .map_err(|e| e.to_string())?;
    namespace
        .run(|| {
            let mut child = Command::new(command)
                .args(args)
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .map_err(|e| format!("{command}: {e}"))?;
            child
                .stdin
                .take()
                .unwrap()
                .write_all(input.as_bytes())
                .unwrap();
            let output = child.wait_with_output().unwrap();
            if output.status.success() {
                Ok(())
            } else {
                Err(String::from_utf8_lossy(&output.stderr).into_owned())
            }
        })
        .map_err(|e| e.to_string())?
}

fn sample() -> Vec<ServicePort> {
    vec![
        ServicePort {
            node_port: Some(3001),
            ..port("ns1", "svc1", [172, 30, 0, 41], &[([10, 180, 0, 1], 80)])
        },
        port(
            "ns4",
            "svc4",
            [172, 30, 0, 44],
            &[
                ([10, 180, 0, 4], 80),
                ([10, 180, 0, 5], 80),
                ([10, 180, 0, 6], 8080),
            ],
        ),
        ServicePort {
            node_port: Some(3006),
            ..port("ns6", "svc6", [172, 30, 0, 46], &[])
        },
    ]
}

#[test]
fn iptables_restore_accepts_the_payload() {
    bench::require_root("iptables-restore --test").unwrap();
    let payload = iptables_restore(&sample(), &Options::default());
    check_in_namespace("iptables-restore", &["--test", "--noflush"], &payload)
        .unwrap_or_else(|e| panic!("iptables-restore --test rejected it: {e}\n{payload}"));
    // --test only parses (the nft backend does not resolve jump targets):
    // loading it for real, in the test's own namespace, does.
    check_in_namespace("iptables-restore", &["--noflush"], &payload)
        .unwrap_or_else(|e| panic!("iptables-restore rejected it: {e}\n{payload}"));
}

/// IPv6 service ports for the load tests: two endpoints, and none.
fn sample6() -> Vec<ServicePort> {
    vec![
        port6(
            "ns1",
            "svc1",
            "fd00:172:30::41",
            &[("fd00:10:180::1", 80), ("fd00:10:180::2:1", 8080)],
        ),
        port6("ns6", "svc6", "fd00:172:30::46", &[]),
    ]
}

#[test]
fn ip6tables_restore_accepts_the_ipv6_payload() {
    bench::require_root("ip6tables-restore").unwrap();
    let payload = iptables_restore(&sample6(), &options6());
    check_in_namespace("ip6tables-restore", &["--noflush"], &payload)
        .unwrap_or_else(|e| panic!("ip6tables-restore rejected it: {e}\n{payload}"));
}

#[test]
fn nft_accepts_the_ipv6_ruleset() {
    bench::require_root("nft --check").unwrap();
    let script = nft_ruleset(&sample6(), &options6());
    check_in_namespace("nft", &["--check", "-f", "-"], &script)
        .unwrap_or_else(|e| panic!("nft rejected it: {e}\n{script}"));
}

#[test]
fn nft_accepts_the_ruleset() {
    bench::require_root("nft --check").unwrap();
    let options = Options {
        service_cidr: Some("172.30.0.0/16".into()),
        ..Options::default()
    };
    let script = nft_ruleset(&sample(), &options);
    check_in_namespace("nft", &["--check", "-f", "-"], &script)
        .unwrap_or_else(|e| panic!("nft rejected it: {e}\n{script}"));
}

#[test]
fn the_checks_reject_a_broken_ruleset() {
    bench::require_root("iptables-restore --test").unwrap();
    // So that the two checks above can fail.
    let payload = iptables_restore(&sample(), &Options::default())
        .replace("-j KUBE-MARK-MASQ", "-j KUBE-NO-SUCH-CHAIN");
    assert!(check_in_namespace("iptables-restore", &["--noflush"], &payload).is_err());
    let script = nft_ruleset(&sample(), &Options::default())
        .replace("jump mark-for-masquerade", "jump no-such-chain");
    assert!(check_in_namespace("nft", &["--check", "-f", "-"], &script).is_err());
}

/// The jumps stand in the node's built-in chains as on a real node, each
/// prepended in list order: over IPv4 kubelet's `KUBE-FIREWALL` jumps
/// (made before kube-proxy starts) last, over IPv6 (made by kube-proxy
/// after its own) first; kube-proxy's own in reverse list order
/// (kube-proxy-rules.md §1.2).
#[test]
fn jumps_stand_in_the_order_a_node_has_them() {
    use bench::{family::IpFamily, kubeproxy::iptables_jumps};
    let final_order = |family: IpFamily, chain: &str| -> Vec<String> {
        iptables_jumps(family)
            .into_iter()
            .filter(|(table, c, _)| *table == "filter" && *c == chain)
            .rev()
            .map(|(_, _, rule)| rule.rsplit("-j ").next().unwrap().to_owned())
            .collect()
    };
    let input = [
        "KUBE-PROXY-FIREWALL",
        "KUBE-NODEPORTS",
        "KUBE-EXTERNAL-SERVICES",
    ];
    let output = ["KUBE-PROXY-FIREWALL", "KUBE-SERVICES"];
    let with_kubelet_last = |chains: &[&str]| {
        let mut v: Vec<String> = chains.iter().map(|c| c.to_string()).collect();
        v.push("KUBE-FIREWALL".into());
        v
    };
    let with_kubelet_first = |chains: &[&str]| {
        let mut v = vec!["KUBE-FIREWALL".to_string()];
        v.extend(chains.iter().map(|c| c.to_string()));
        v
    };
    assert_eq!(
        final_order(IpFamily::V4, "INPUT"),
        with_kubelet_last(&input)
    );
    assert_eq!(
        final_order(IpFamily::V4, "OUTPUT"),
        with_kubelet_last(&output)
    );
    assert_eq!(
        final_order(IpFamily::V6, "INPUT"),
        with_kubelet_first(&input)
    );
    assert_eq!(
        final_order(IpFamily::V6, "OUTPUT"),
        with_kubelet_first(&output)
    );
}
