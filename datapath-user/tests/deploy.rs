//! The manifests in deploy/ load as typed Kubernetes objects and say what
//! the agent needs: read-only RBAC on what it watches, the mounts it
//! uses, probes on its health port, settings it understands.

use std::{collections::BTreeSet, path::Path, process::Command};

use k8s_openapi::{
    api::{
        apps::v1::DaemonSet,
        core::v1::{ConfigMap, Container, ServiceAccount},
        rbac::v1::{ClusterRole, ClusterRoleBinding},
    },
    apimachinery::pkg::util::intstr::IntOrString,
};
use serde::Deserialize;

#[derive(Default)]
struct Deploy {
    daemon_sets: Vec<DaemonSet>,
    service_accounts: Vec<ServiceAccount>,
    roles: Vec<ClusterRole>,
    bindings: Vec<ClusterRoleBinding>,
    config_maps: Vec<ConfigMap>,
}

fn load() -> Deploy {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy");
    let mut deploy = Deploy::default();
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().and_then(|e| e.to_str()) != Some("yaml") {
            continue;
        }
        let text = std::fs::read_to_string(&path).unwrap();
        for document in serde_yaml::Deserializer::from_str(&text) {
            let value = serde_yaml::Value::deserialize(document).unwrap();
            let kind = value["kind"].as_str().unwrap_or_default().to_owned();
            let at = format!("{} ({kind})", path.display());
            match kind.as_str() {
                "DaemonSet" => deploy.daemon_sets.push(typed(value, &at)),
                "ServiceAccount" => deploy.service_accounts.push(typed(value, &at)),
                "ClusterRole" => deploy.roles.push(typed(value, &at)),
                "ClusterRoleBinding" => deploy.bindings.push(typed(value, &at)),
                "ConfigMap" => deploy.config_maps.push(typed(value, &at)),
                other => panic!("{}: unexpected kind {other:?}", path.display()),
            }
        }
    }
    deploy
}

fn typed<T: serde::de::DeserializeOwned>(value: serde_yaml::Value, at: &str) -> T {
    serde_yaml::from_value(value).unwrap_or_else(|e| panic!("{at}: {e}"))
}

fn agent(ds: &DaemonSet) -> &Container {
    let spec = ds.spec.template.spec.as_ref().unwrap();
    spec.containers
        .iter()
        .find(|c| c.name == "agent")
        .expect("an agent container")
}

#[test]
fn rbac_grants_only_reads_of_what_the_agent_watches() {
    let deploy = load();
    assert_eq!(deploy.roles.len(), 1);
    let mut granted = BTreeSet::new();
    for rule in deploy.roles[0].rules.as_ref().unwrap() {
        let verbs: BTreeSet<&str> = rule.verbs.iter().map(String::as_str).collect();
        assert_eq!(verbs, BTreeSet::from(["get", "list", "watch"]), "{rule:?}");
        for group in rule.api_groups.iter().flatten() {
            for resource in rule.resources.iter().flatten() {
                granted.insert(format!("{group}/{resource}"));
            }
        }
    }
    assert_eq!(
        granted,
        BTreeSet::from([
            "/services".to_owned(),
            "/nodes".to_owned(),
            "discovery.k8s.io/endpointslices".to_owned()
        ])
    );

    let binding = &deploy.bindings[0];
    assert_eq!(binding.role_ref.kind, "ClusterRole");
    assert_eq!(
        binding.role_ref.name,
        deploy.roles[0].metadata.name.clone().unwrap()
    );
    let subject = &binding.subjects.as_ref().unwrap()[0];
    let account = &deploy.service_accounts[0];
    assert_eq!(Some(&subject.name), account.metadata.name.as_ref());
    assert_eq!(subject.namespace, account.metadata.namespace);
    let pod = deploy.daemon_sets[0].spec.template.spec.as_ref().unwrap();
    assert_eq!(pod.service_account_name, account.metadata.name);
}

#[test]
fn daemonset_mounts_what_the_agent_uses_without_privileged() {
    let deploy = load();
    let ds = &deploy.daemon_sets[0];
    let pod = ds.spec.template.spec.as_ref().unwrap();
    assert_eq!(pod.host_network, Some(true));
    let container = agent(ds);
    let security = container.security_context.as_ref().unwrap();
    assert_ne!(
        security.privileged,
        Some(true),
        "capabilities, not privileged"
    );
    let added: BTreeSet<&str> = security
        .capabilities
        .as_ref()
        .unwrap()
        .add
        .iter()
        .flatten()
        .map(String::as_str)
        .collect();
    for needed in ["BPF", "NET_ADMIN", "SYS_ADMIN"] {
        assert!(added.contains(needed), "missing capability {needed}");
    }

    let host_path = |volume: &str| {
        pod.volumes
            .iter()
            .flatten()
            .find(|v| v.name == volume)
            .and_then(|v| v.host_path.as_ref())
            .map(|h| h.path.clone())
    };
    let mount = |path: &str| {
        container
            .volume_mounts
            .iter()
            .flatten()
            .find(|m| m.mount_path == path)
            .unwrap_or_else(|| panic!("no mount at {path}"))
    };
    assert_eq!(
        host_path(&mount("/sys/fs/bpf").name).as_deref(),
        Some("/sys/fs/bpf")
    );
    let netns = mount("/var/run/netns");
    assert_eq!(host_path(&netns.name).as_deref(), Some("/var/run/netns"));
    assert_eq!(
        netns.mount_propagation.as_deref(),
        Some("HostToContainer"),
        "namespaces of pods created later must be visible"
    );
    let config = &deploy.config_maps[0].data.as_ref().unwrap();
    let cgroup = mount(&config["UNDERPASS_CGROUP"]);
    assert_eq!(host_path(&cgroup.name).as_deref(), Some("/sys/fs/cgroup"));
    assert_eq!(
        mount(&config["UNDERPASS_PIN_DIR"].replace("/underpass", "")).name,
        "bpffs"
    );

    let node_name = container
        .env
        .iter()
        .flatten()
        .find(|e| e.name == "NODE_NAME")
        .and_then(|e| e.value_from.as_ref())
        .and_then(|v| v.field_ref.as_ref())
        .map(|f| f.field_path.clone());
    assert_eq!(node_name.as_deref(), Some("spec.nodeName"));
}

#[test]
fn probes_point_at_the_health_port() {
    let deploy = load();
    let container = agent(&deploy.daemon_sets[0]);
    let config = deploy.config_maps[0].data.as_ref().unwrap();
    let address: std::net::SocketAddr = config["UNDERPASS_METRICS_ADDRESS"].parse().unwrap();
    let port = container
        .ports
        .iter()
        .flatten()
        .find(|p| p.name.as_deref() == Some("metrics"))
        .expect("a port named metrics");
    assert_eq!(port.container_port, i32::from(address.port()));
    assert!(
        address.ip().is_unspecified(),
        "the kubelet probes the node address"
    );
    for (probe, path) in [
        (container.liveness_probe.as_ref(), "/healthz"),
        (container.readiness_probe.as_ref(), "/readyz"),
    ] {
        let get = probe
            .and_then(|p| p.http_get.as_ref())
            .expect("an httpGet probe");
        assert_eq!(get.path.as_deref(), Some(path));
        assert_eq!(get.port, IntOrString::String("metrics".into()));
    }
}

#[test]
fn every_setting_is_one_the_agent_reads() {
    let deploy = load();
    let help = Command::new(env!("CARGO_BIN_EXE_underpass"))
        .args(["agent", "--help"])
        .output()
        .unwrap();
    let help = String::from_utf8(help.stdout).unwrap();
    for key in deploy.config_maps[0].data.as_ref().unwrap().keys() {
        assert!(
            help.contains(&format!("[env: {key}")),
            "`underpass agent` does not read {key}"
        );
    }
    let container = agent(&deploy.daemon_sets[0]);
    let from = container.env_from.as_ref().unwrap()[0]
        .config_map_ref
        .as_ref()
        .unwrap();
    assert_eq!(
        Some(&from.name),
        deploy.config_maps[0].metadata.name.as_ref()
    );
}
