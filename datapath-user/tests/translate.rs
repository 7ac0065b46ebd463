//! Translate: real-looking manifests → the frontends and issues expected.
//! Each case is {description, fixture, expected frontends, expected issues};
//! frontends are written `address:port/PROTO -> endpoint endpoint…`, with
//! ` (draining endpoint…)` when some listed endpoints take no new flow,
//! and ` affinity Ns` for `sessionAffinity: ClientIP`.

use std::path::Path;

use datapath_user::k8s::{NodeContext, Typed, manifest, translate};
use k8s_openapi::api::{core::v1::Service, discovery::v1::EndpointSlice};

struct Case {
    description: &'static str,
    fixture: &'static str,
    frontends: &'static [&'static str],
    /// `kind object field`.
    issues: &'static [&'static str],
}

const CASES: &[Case] = &[
    Case {
        description: "kube-dns: named targetPorts resolve through the slice's ports",
        fixture: "kube-dns.yaml",
        frontends: &[
            "10.96.0.10:53/TCP -> 10.244.0.3:1053 10.244.1.4:1053",
            "10.96.0.10:53/UDP -> 10.244.0.3:1053 10.244.1.4:1053",
            "10.96.0.10:9153/TCP -> 10.244.0.3:9153 10.244.1.4:9153",
        ],
        issues: &[],
    },
    Case {
        description: "two ports, two slices: duplicates merged, not-ready drains",
        fixture: "web-multi-slice.yaml",
        frontends: &[
            "10.96.20.1:80/TCP -> 10.244.2.9:8080 10.244.2.10:8080 (draining 10.244.2.11:8080)",
            "10.96.20.1:443/TCP -> 10.244.2.9:8443 10.244.2.10:8443 (draining 10.244.2.11:8443)",
        ],
        issues: &[],
    },
    Case {
        description: "nothing ready: serving-and-terminating endpoints take over, the rest drain",
        fixture: "terminating.yaml",
        frontends: &[
            "10.96.30.1:8080/TCP -> 10.244.3.1:8080 (draining 10.244.3.2:8080 10.244.3.3:8080)",
        ],
        issues: &[],
    },
    Case {
        description: "publishNotReadyAddresses uses not-ready endpoints",
        fixture: "publish-not-ready.yaml",
        frontends: &["10.96.40.1:7000/UDP -> 10.244.4.1:7000 10.244.4.2:7000"],
        issues: &[],
    },
    Case {
        description: "headless, ExternalName and other proxies' services are skipped",
        fixture: "not-ours.yaml",
        frontends: &[],
        issues: &[],
    },
    Case {
        description: "dual-stack: each family over the slices of its addressType",
        fixture: "dual-stack.yaml",
        frontends: &[
            "10.96.60.1:80/TCP -> 10.244.6.1:8080",
            "10.96.61.1:53/UDP -> 10.244.6.2:5353",
            "[fd00:10:96::60]:80/TCP -> [fd00:10:244::6:1]:8080",
            "[fd00:10:96::62]:443/TCP -> [fd00:10:244::6:3]:8443",
        ],
        issues: &[
            "unsupported Service net/dual spec.clusterIPs[1]",
            "invalid EndpointSlice net/v6-only-bad endpoints[1].addresses[0]",
            "unsupported Service net/v6-only spec.clusterIPs[0]",
        ],
    },
    Case {
        description: "bad ports are reported by field, the good one served",
        fixture: "invalid-ports.yaml",
        frontends: &["10.96.70.1:8080/TCP -> 10.244.7.1:8080"],
        issues: &[
            "invalid Service edge/mixed spec.ports[0].port",
            "invalid Service edge/mixed spec.ports[1].protocol",
            "unsupported Service edge/mixed spec.ports[2].protocol",
            "invalid EndpointSlice edge/mixed-1 endpoints[1].addresses[0]",
        ],
    },
    Case {
        description: "an external IP never takes another service's ClusterIP",
        fixture: "external-ip-takeover.yaml",
        frontends: &[
            "10.96.96.1:53/UDP -> 10.244.96.1:53",
            "10.96.96.2:53/UDP -> 10.244.96.66:5353",
        ],
        issues: &["conflict Service aaa/evil spec.externalIPs"],
    },
    Case {
        description: "sessionAffinity ClientIP: its timeout, the default, a bad one reported",
        fixture: "session-affinity.yaml",
        frontends: &[
            "10.96.90.1:80/TCP -> 10.244.9.1:8080 10.244.9.2:8080 affinity 10800s",
            "10.96.90.2:443/TCP -> 10.244.9.3:8443 affinity 60s",
            "10.96.90.3:80/TCP ->  affinity 10800s",
            "10.96.90.4:80/TCP -> ",
            "[fd00:10:96::90:2]:443/TCP -> [fd00:10:244::9:3]:8443 affinity 60s",
        ],
        issues: &[
            "unsupported Service shop/login spec.clusterIPs[1]",
            "invalid Service shop/odd spec.sessionAffinityConfig.clientIP.timeoutSeconds",
        ],
    },
    Case {
        description: "two services, one frontend: the first keeps it",
        fixture: "conflict.yaml",
        frontends: &["10.96.80.1:80/TCP -> ", "10.96.80.1:81/TCP -> "],
        issues: &["conflict Service team/b-second spec.clusterIPs"],
    },
];

fn load(fixture: &str) -> (Vec<Service>, Vec<EndpointSlice>) {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/k8s")
        .join(fixture);
    let text = std::fs::read_to_string(&path).unwrap();
    let parsed = manifest::parse(&text, fixture);
    assert!(parsed.errors.is_empty(), "{fixture}: {:?}", parsed.errors);
    let (mut services, mut slices) = (Vec::new(), Vec::new());
    for object in parsed.objects {
        match object {
            Typed::Service(s) => services.push(*s),
            Typed::EndpointSlice(s) => slices.push(*s),
        }
    }
    (services, slices)
}

/// `address:port/PROTO -> endpoint…` (IPv6 addresses in brackets).
fn render_frontend<A: datapath_user::model::Family>(
    desired: &translate::DesiredFrontend<A>,
) -> String {
    let backends: Vec<String> = desired.backends.iter().map(|b| b.to_string()).collect();
    let draining: Vec<String> = desired.draining.iter().map(|b| b.to_string()).collect();
    let mut affinity = desired
        .affinity
        .map(|seconds| format!(" affinity {seconds}s"))
        .unwrap_or_default();
    // Reached from outside: the backends its flows from outside go to.
    if let Some(external) = &desired.external {
        let external: Vec<String> = external.iter().map(|b| b.to_string()).collect();
        affinity += &format!(" | outside -> {}", external.join(" "));
    }
    if draining.is_empty() {
        format!("{} -> {}{affinity}", desired.frontend, backends.join(" "))
    } else {
        format!(
            "{} -> {} (draining {}){affinity}",
            desired.frontend,
            backends.join(" "),
            draining.join(" ")
        )
    }
}

/// IPv4 frontends first, then IPv6 ones.
fn render(translation: &translate::Translation) -> (Vec<String>, Vec<String>) {
    let frontends = translation
        .frontends
        .values()
        .map(|(_, desired)| render_frontend(desired))
        .chain(
            translation
                .frontends6
                .values()
                .map(|(_, desired)| render_frontend(desired)),
        )
        .collect();
    let issues = translation
        .issues
        .iter()
        .map(|i| format!("{} {} {}", i.kind.as_str(), i.object, i.field))
        .collect();
    (frontends, issues)
}

#[test]
fn fixtures_translate_as_kube_proxy_would() {
    let mut failures = Vec::new();
    for case in CASES {
        let (services, slices) = load(case.fixture);
        let translation = translate(&services, &slices, &NodeContext::default());
        let (frontends, issues) = render(&translation);
        let want_frontends: Vec<String> = case.frontends.iter().map(|s| s.to_string()).collect();
        let want_issues: Vec<String> = case.issues.iter().map(|s| s.to_string()).collect();
        if frontends != want_frontends || issues != want_issues {
            failures.push(format!(
                "{} ({}):\n  frontends {frontends:#?}\n  want      {want_frontends:#?}\n  issues {issues:#?}\n  want   {want_issues:#?}",
                case.description, case.fixture
            ));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn every_fixture_together_translates_as_each_alone() {
    let (mut services, mut slices) = (Vec::new(), Vec::new());
    let mut expected = Vec::new();
    for case in CASES {
        let (s, e) = load(case.fixture);
        services.extend(s);
        slices.extend(e);
        expected.extend(case.frontends.iter().map(|s| s.to_string()));
    }
    let (frontends, _) = render(&translate(&services, &slices, &NodeContext::default()));
    expected.sort();
    let mut got = frontends;
    got.sort();
    assert_eq!(got, expected);
}

#[test]
fn issues_name_object_field_and_reason() {
    let (services, slices) = load("invalid-ports.yaml");
    let translation = translate(&services, &slices, &NodeContext::default());
    let text: Vec<String> = translation.issues.iter().map(|i| i.to_string()).collect();
    assert_eq!(
        text[0],
        "Service edge/mixed spec.ports[0].port: 0 is not a port number (1-65535) (invalid)"
    );
    assert!(text[1].contains("unknown protocol \"HTTP\""), "{}", text[1]);
    // SCTP is valid Kubernetes that underpass does not translate: said,
    // naming the port, and the rest of the service is served.
    assert_eq!(
        text[2],
        "Service edge/mixed spec.ports[2].protocol: SCTP is not supported: underpass translates TCP and UDP only, and leaves packets to this port untouched (unsupported)"
    );
    // The endpoint's text as written, though the agent keeps endpoints
    // parsed (the text is kept aside only for addresses that fail).
    assert_eq!(
        text[3],
        "EndpointSlice edge/mixed-1 endpoints[1].addresses[0]: \"not-an-ip\" is not an IPv4 address (invalid)"
    );
}

#[test]
fn internal_traffic_policy_local_keeps_this_nodes_endpoints() {
    let (mut services, slices) = load("kube-dns.yaml");
    services[0].spec.as_mut().unwrap().internal_traffic_policy = Some("Local".into());
    let node = NodeContext {
        node_name: Some("node-2".into()),
        ..NodeContext::default()
    };
    let (frontends, issues) = render(&translate(&services, &slices, &node));
    assert!(issues.is_empty(), "{issues:?}");
    // The other node's endpoint gets no new flow; a flow already on it
    // (the policy just changed) drains.
    assert_eq!(
        frontends[0],
        "10.96.0.10:53/TCP -> 10.244.1.4:1053 (draining 10.244.0.3:1053)"
    );

    // Without a node name the policy cannot be honoured: all endpoints,
    // and an issue that says why.
    let (frontends, issues) = render(&translate(&services, &slices, &NodeContext::default()));
    assert_eq!(
        frontends[0],
        "10.96.0.10:53/TCP -> 10.244.0.3:1053 10.244.1.4:1053"
    );
    assert_eq!(
        issues,
        ["unsupported Service kube-system/kube-dns spec.internalTrafficPolicy"]
    );
}

#[test]
fn manifest_errors_name_file_document_and_object() {
    let text = "apiVersion: v1\nkind: Service\nmetadata: {name: a}\nspec: {ports: [{port: \"eighty\"}]}\n---\napiVersion: discovery.k8s.io/v1beta1\nkind: EndpointSlice\nmetadata: {name: old}\n---\nkind: [\n";
    let parsed = manifest::parse(text, "svc.yaml");
    assert!(parsed.objects.is_empty());
    let errors: Vec<String> = parsed.errors.iter().map(|e| e.to_string()).collect();
    assert_eq!(errors.len(), 3, "{errors:#?}");
    assert!(
        errors[0].starts_with("svc.yaml document 1 (Service a): "),
        "{}",
        errors[0]
    );
    assert!(
        errors[1].contains("discovery.k8s.io/v1beta1 is not served"),
        "{}",
        errors[1]
    );
    assert!(
        errors[2].starts_with("svc.yaml document 3: not valid YAML"),
        "{}",
        errors[2]
    );
}

#[test]
fn json_and_lists_are_read_too() {
    let text = r#"{"apiVersion":"v1","kind":"List","items":[
        {"apiVersion":"v1","kind":"Service","metadata":{"name":"j","namespace":"x"},
         "spec":{"clusterIP":"10.96.90.1","ports":[{"port":80}]}}]}"#;
    let parsed = manifest::parse(text, "list.json");
    assert!(parsed.errors.is_empty(), "{:?}", parsed.errors);
    assert_eq!(parsed.objects.len(), 1);
    assert_eq!(parsed.objects[0].describe(), "Service x/j");
}

/// `topology-hints.yaml` translated on a node, optionally edited first;
/// the one frontend's rendering.
fn near(
    node: Option<&str>,
    zone: Option<&str>,
    edit: impl FnOnce(&mut Service, &mut EndpointSlice),
) -> String {
    let (mut services, mut slices) = load("topology-hints.yaml");
    edit(&mut services[0], &mut slices[0]);
    let context = NodeContext {
        node_name: node.map(Into::into),
        zone: zone.map(Into::into),
        ..NodeContext::default()
    };
    let (frontends, issues) = render(&translate(&services, &slices, &context));
    assert!(issues.is_empty(), "{issues:?}");
    assert_eq!(frontends.len(), 1);
    frontends[0].clone()
}

#[test]
fn topology_hints_narrow_endpoints_as_kube_proxy_does() {
    let all = "10.96.90.1:80/TCP -> 10.244.9.1:8080 10.244.9.2:8080 10.244.9.3:8080 (draining 10.244.9.4:8080)";
    let no_edit = |_: &mut Service, _: &mut EndpointSlice| {};
    // Every ready endpoint has node hints and one is for this node.
    assert_eq!(
        near(Some("node-a2"), Some("zone-a"), no_edit),
        "10.96.90.1:80/TCP -> 10.244.9.2:8080 (draining 10.244.9.1:8080 10.244.9.3:8080 10.244.9.4:8080)"
    );
    // No node hint for this node: zone hints.
    assert_eq!(
        near(Some("node-a3"), Some("zone-a"), no_edit),
        "10.96.90.1:80/TCP -> 10.244.9.1:8080 10.244.9.2:8080 (draining 10.244.9.3:8080 10.244.9.4:8080)"
    );
    // No hint for this zone either, or no zone known: every endpoint.
    assert_eq!(near(Some("node-c1"), Some("zone-c"), no_edit), all);
    assert_eq!(near(None, None, no_edit), all);
    // One ready endpoint without hints (the controller's update under
    // way): hints of that kind are not used. Node hints missing on one
    // endpoint fall back to zone hints; zone hints missing, to all.
    let without = |index: usize, zones: bool| {
        move |_: &mut Service, slice: &mut EndpointSlice| {
            let hints = slice.endpoints.as_mut().unwrap()[index]
                .hints
                .as_mut()
                .unwrap();
            hints.for_nodes = None;
            if zones {
                hints.for_zones = None;
            }
        }
    };
    assert_eq!(
        near(Some("node-a2"), Some("zone-a"), without(2, false)),
        "10.96.90.1:80/TCP -> 10.244.9.1:8080 10.244.9.2:8080 (draining 10.244.9.3:8080 10.244.9.4:8080)"
    );
    assert_eq!(near(Some("node-a2"), Some("zone-a"), without(2, true)), all);
    // A not-ready endpoint without hints does not count (the terminating
    // one above has none).
    // internalTrafficPolicy: Local takes this node's endpoints, hints
    // aside.
    assert_eq!(
        near(Some("node-b1"), Some("zone-a"), |service, _| {
            service.spec.as_mut().unwrap().internal_traffic_policy = Some("Local".into());
        }),
        "10.96.90.1:80/TCP -> 10.244.9.3:8080 (draining 10.244.9.1:8080 10.244.9.2:8080 10.244.9.4:8080)"
    );
    // Nothing ready: serving-and-terminating endpoints wherever they are.
    assert_eq!(
        near(Some("node-a1"), Some("zone-a"), |_, slice| {
            for endpoint in &mut slice.endpoints.as_mut().unwrap()[..3] {
                endpoint.conditions.as_mut().unwrap().ready = Some(false);
            }
        }),
        "10.96.90.1:80/TCP -> 10.244.9.4:8080 (draining 10.244.9.1:8080 10.244.9.2:8080 10.244.9.3:8080)"
    );
}

/// A service's external IPs and load-balancer IPs are frontends too, as
/// kube-proxy serves them to pods: the cluster's endpoints, whatever the
/// traffic policies say (`internalTrafficPolicy: Local` narrows the
/// ClusterIP alone; pods reach external addresses through KUBE-SVC even
/// under `externalTrafficPolicy: Local`). A proxying load balancer's IP
/// (`ipMode: Proxy`) is left to the load balancer.
#[test]
fn external_load_balancer_and_node_port_addresses_are_served_to_pods() {
    let (mut services, slices) = load("external-ips.yaml");
    let node = NodeContext {
        node_name: Some("node-1".into()),
        addresses: vec!["192.168.7.1".parse().unwrap(), "fd00::7".parse().unwrap()],
        ..NodeContext::default()
    };
    let (frontends, issues) = render(&translate(&services, &slices, &node));
    assert_eq!(
        frontends,
        [
            "10.96.95.1:80/TCP -> 10.244.95.1:8080 (draining 10.244.95.2:8080)",
            "192.0.2.10:80/TCP -> 10.244.95.1:8080 10.244.95.2:8080 | outside -> 10.244.95.1:8080",
            "192.168.7.1:30080/TCP -> 10.244.95.1:8080 10.244.95.2:8080 | outside -> 10.244.95.1:8080",
            "198.51.100.7:80/TCP -> 10.244.95.1:8080 10.244.95.2:8080 | outside -> 10.244.95.1:8080",
            "198.51.100.9:80/TCP -> 10.244.95.1:8080 10.244.95.2:8080 | outside -> 10.244.95.1:8080",
        ]
    );
    assert_eq!(
        issues,
        [
            "invalid Service edge/shop spec.externalIPs[1]",
            "unsupported Service edge/shop spec.externalIPs[2]",
        ]
    );

    // Source ranges are not enforced: the load-balancer IPs are left to
    // the load balancer, which enforces them, and that is said.
    services[0]
        .spec
        .as_mut()
        .unwrap()
        .load_balancer_source_ranges = Some(vec!["10.0.0.0/8".into()]);
    let (frontends, issues) = render(&translate(&services, &slices, &node));
    assert!(
        frontends.iter().all(|f| !f.starts_with("198.51.100.")),
        "{frontends:?}"
    );
    assert_eq!(frontends.len(), 3, "ClusterIP, external IP, nodePort");
    assert!(
        issues.contains(&"unsupported Service edge/shop spec.loadBalancerSourceRanges".to_owned()),
        "{issues:?}"
    );
    services[0]
        .spec
        .as_mut()
        .unwrap()
        .load_balancer_source_ranges = None;

    // A nodePort out of range is reported by field; the rest is served.
    services[0].spec.as_mut().unwrap().ports.as_mut().unwrap()[0].node_port = Some(70000);
    let (frontends, issues) = render(&translate(&services, &slices, &node));
    assert_eq!(frontends.len(), 4, "{frontends:?}");
    assert!(frontends.iter().all(|f| !f.contains(":30080")));
    assert!(
        issues.contains(&"invalid Service edge/shop spec.ports[0].nodePort".to_owned()),
        "{issues:?}"
    );
}

#[test]
fn external_traffic_policy_picks_the_backends_flows_from_outside_go_to() {
    let (mut services, slices) = load("external-ips.yaml");
    let on = |node: Option<&str>| NodeContext {
        node_name: node.map(Into::into),
        addresses: vec!["192.168.7.1".parse().unwrap()],
        ..NodeContext::default()
    };
    let outside = |frontends: &[String]| -> Vec<String> {
        frontends
            .iter()
            .filter(|f| f.starts_with("192.168.7.1:30080/TCP"))
            .map(|f| {
                f.split(" | ")
                    .nth(1)
                    .unwrap_or("not from outside")
                    .to_owned()
            })
            .collect()
    };
    // Local: this node's endpoint only, on each node.
    let (frontends, _) = render(&translate(&services, &slices, &on(Some("node-2"))));
    assert_eq!(outside(&frontends), ["outside -> 10.244.95.2:8080"]);
    assert!(
        frontends[0].starts_with("10.96.95.1:80/TCP") && !frontends[0].contains("outside"),
        "a ClusterIP is not reached from outside: {frontends:?}"
    );
    // A node without an endpoint does not serve it from outside.
    let (frontends, _) = render(&translate(&services, &slices, &on(Some("node-3"))));
    assert_eq!(outside(&frontends), ["outside -> "]);
    // Without a node name, Local cannot be honoured: said, not served.
    let (frontends, issues) = render(&translate(&services, &slices, &on(None)));
    assert_eq!(outside(&frontends), ["outside -> "]);
    assert!(
        issues.contains(&"unsupported Service edge/shop spec.externalTrafficPolicy".to_owned()),
        "{issues:?}"
    );
    // Cluster: every endpoint the pods get.
    let spec = services[0].spec.as_mut().unwrap();
    spec.external_traffic_policy = Some("Cluster".into());
    spec.internal_traffic_policy = None;
    let (frontends, _) = render(&translate(&services, &slices, &on(Some("node-3"))));
    assert_eq!(
        outside(&frontends),
        ["outside -> 10.244.95.1:8080 10.244.95.2:8080"]
    );
}

#[test]
fn a_local_service_reached_from_outside_has_its_health_check_node_port() {
    use datapath_user::k8s::{HealthCheck, translate_service};
    let (mut services, slices) = load("external-ips.yaml");
    services[0].spec.as_mut().unwrap().health_check_node_port = Some(32123);
    let on = |node: &str| NodeContext {
        node_name: Some(node.into()),
        addresses: vec!["192.168.7.1".parse().unwrap()],
        ..NodeContext::default()
    };
    let check = |node: &str, services: &[k8s_openapi::api::core::v1::Service]| {
        translate_service(&services[0], &slices, &on(node)).health_check
    };
    assert_eq!(
        check("node-1", &services),
        Some(HealthCheck {
            node_port: 32123,
            local_endpoints: 1
        })
    );
    assert_eq!(
        check("node-3", &services),
        Some(HealthCheck {
            node_port: 32123,
            local_endpoints: 0
        }),
        "a node without endpoints answers 503"
    );
    services[0].spec.as_mut().unwrap().health_check_node_port = Some(0);
    let translation = translate_service(&services[0], &slices, &on("node-1"));
    assert_eq!(translation.health_check, None);
    assert!(
        translation
            .issues
            .iter()
            .any(|i| i.field == "spec.healthCheckNodePort"),
        "{:?}",
        translation.issues
    );
    services[0].spec.as_mut().unwrap().health_check_node_port = Some(32123);
    services[0].spec.as_mut().unwrap().external_traffic_policy = Some("Cluster".into());
    assert_eq!(check("node-1", &services), None, "Cluster: no health check");
}
