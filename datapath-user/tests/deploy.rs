//! The manifests in deploy/ load as typed Kubernetes objects and say what
//! the agent needs: read-only RBAC on what it watches, the mounts it
//! uses, probes on its health port, settings it understands.

mod common;

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

/// What a test changes about the manifest's own settings, each for a
/// reason of the test site: its own pin directory, a loopback metrics
/// port, the node name the kubelet would pass, and the agent pointed at
/// a manifest directory instead of an API server.
struct TestSite {
    pin_dir: String,
    /// A test cgroup for socket-LB, as the container sees it (below the
    /// manifest's cgroup mount), instead of the node's root, which would
    /// take in every process of the machine.
    cgroup: String,
    metrics_address: String,
    node_name: String,
    /// Host directory mounted read-only at `/manifests`.
    manifests: std::path::PathBuf,
    /// Extra agent arguments (which netns to attach to, fast polling).
    agent_args: Vec<String>,
}

/// The `podman run` arguments (before the image) that give the agent
/// container what the kubelet would give it from `deploy/daemonset.yaml`:
/// host network, the security context (capabilities dropped and added,
/// read-only root, not privileged, seccomp as the pod asks), the hostPath
/// mounts with their propagation, the env and the ConfigMap's env. Read
/// from the manifest, so the test and the manifest cannot drift apart.
fn podman_flags(
    ds: &DaemonSet,
    config: &ConfigMap,
    container: &Container,
    site: &TestSite,
) -> Vec<String> {
    let pod = ds.spec.template.spec.as_ref().unwrap();
    let mut flags = this_machine_flags();
    assert_eq!(
        pod.host_network,
        Some(true),
        "the agent runs in the host's network namespace"
    );
    flags.push("--network=host".into());
    let mut security = container.security_context.clone().unwrap_or_default();
    // Each field the kubelet would apply is taken out as it is turned into
    // a flag; whatever is left is a field this harness does not know, and
    // the test stops rather than run without it.
    if security.privileged.take() == Some(true) {
        flags.push("--privileged".into());
    }
    match security.app_armor_profile.take().map(|p| p.type_) {
        Some(t) if t == "Unconfined" => flags.push("--security-opt=apparmor=unconfined".into()),
        None => {}
        Some(other) => panic!("appArmorProfile {other}: not run here"),
    }
    if let Some(selinux) = security.se_linux_options.take() {
        let kind = selinux.type_.expect("seLinuxOptions.type");
        flags.push(format!("--security-opt=label=type:{kind}"));
    }
    if security.read_only_root_filesystem.take() == Some(true) {
        flags.push("--read-only".into());
    }
    if security.allow_privilege_escalation.take() == Some(false) {
        flags.push("--security-opt=no-new-privileges".into());
    }
    let seccomp = security
        .seccomp_profile
        .take()
        .or_else(|| pod.security_context.as_ref()?.seccomp_profile.clone());
    match seccomp.as_ref().map(|s| s.type_.as_str()) {
        Some("Unconfined") => flags.push("--security-opt=seccomp=unconfined".into()),
        Some("RuntimeDefault") => {}
        other => {
            panic!("seccomp profile {other:?}: say RuntimeDefault or Unconfined in the manifest")
        }
    }
    if let Some(capabilities) = security.capabilities.take() {
        for drop in capabilities.drop.iter().flatten() {
            flags.push(format!("--cap-drop={drop}"));
        }
        for add in capabilities.add.iter().flatten() {
            flags.push(format!("--cap-add={add}"));
        }
    }
    assert_eq!(
        security,
        Default::default(),
        "securityContext fields this harness does not apply"
    );
    if let Some(memory) = container
        .resources
        .as_ref()
        .and_then(|r| r.limits.as_ref())
        .and_then(|l| l.get("memory"))
    {
        // BPF maps are charged to the container's memory cgroup.
        flags.push(format!(
            "--memory={}",
            memory.0.trim_end_matches('i').to_lowercase()
        ));
    }
    for mount in container.volume_mounts.iter().flatten() {
        let volume = pod
            .volumes
            .iter()
            .flatten()
            .find(|v| v.name == mount.name)
            .unwrap_or_else(|| panic!("volume {} not declared", mount.name));
        let host = &volume
            .host_path
            .as_ref()
            .unwrap_or_else(|| panic!("volume {}: only hostPath volumes are run here", mount.name))
            .path;
        let mut options = vec![if mount.read_only == Some(true) {
            "ro"
        } else {
            "rw"
        }];
        options.push(match mount.mount_propagation.as_deref() {
            Some("HostToContainer") => "rslave",
            Some("Bidirectional") => "rshared",
            None | Some("None") => "rprivate",
            Some(other) => panic!("mountPropagation {other}"),
        });
        flags.push(format!(
            "--volume={host}:{}:{}",
            mount.mount_path,
            options.join(",")
        ));
    }
    flags.push(format!(
        "--volume={}:/manifests:ro",
        site.manifests.display()
    ));
    let mut env = std::collections::BTreeMap::new();
    for from in container.env_from.iter().flatten() {
        let name = &from
            .config_map_ref
            .as_ref()
            .expect("env from a ConfigMap")
            .name;
        assert_eq!(Some(name), config.metadata.name.as_ref());
        env.extend(config.data.clone().unwrap_or_default());
    }
    for var in container.env.iter().flatten() {
        let value = match (&var.value, &var.value_from) {
            (Some(value), _) => value.clone(),
            (None, Some(from)) => match from.field_ref.as_ref().map(|f| f.field_path.as_str()) {
                Some("spec.nodeName") => site.node_name.clone(),
                other => panic!("env {}: field {other:?} is not provided here", var.name),
            },
            (None, None) => String::new(),
        };
        env.insert(var.name.clone(), value);
    }
    for (key, value) in [
        ("UNDERPASS_PIN_DIR", &site.pin_dir),
        ("UNDERPASS_METRICS_ADDRESS", &site.metrics_address),
        ("UNDERPASS_CGROUP", &site.cgroup),
    ] {
        assert!(env.contains_key(key), "{key} is set by the manifest");
        env.insert(key.to_owned(), value.clone());
    }
    for (key, value) in env {
        flags.push(format!("--env={key}={value}"));
    }
    flags
}

/// What podman needs on this machine, whatever the manifest says: runc
/// (crun refuses the hybrid cgroup layout) and limits within this
/// machine's hard ones (podman's defaults are above them, and root here
/// lacks CAP_SYS_RESOURCE, so the runtime cannot raise a hard limit; the
/// agent runs a handful of threads).
fn this_machine_flags() -> Vec<String> {
    vec![
        "--runtime=runc".to_owned(),
        format!(
            "--ulimit=nofile={0}:{0}",
            hard_limit(libc::RLIMIT_NOFILE).min(1 << 20)
        ),
        format!(
            "--ulimit=nproc={0}:{0}",
            hard_limit(libc::RLIMIT_NPROC).min(4096)
        ),
    ]
}

fn hard_limit(resource: libc::__rlimit_resource_t) -> u64 {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes the struct we pass.
    assert_eq!(unsafe { libc::getrlimit(resource, &mut limit) }, 0);
    limit.rlim_max
}

/// The container's command and arguments, then the test site's.
fn container_command(container: &Container, site: &TestSite) -> (String, Vec<String>) {
    let mut command = container
        .command
        .clone()
        .expect("the manifest names the command");
    let entrypoint = command.remove(0);
    command.extend(container.args.clone().unwrap_or_default());
    command.extend(["--from-dir".to_owned(), "/manifests".to_owned()]);
    command.extend(site.agent_args.iter().cloned());
    (entrypoint, command)
}

fn podman(args: &[String]) -> std::process::Output {
    Command::new("podman")
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("running podman (cargo xtask test installs it): {e}"))
}

/// A container started by the test, removed with it.
struct Container_(String);

impl Drop for Container_ {
    fn drop(&mut self) {
        let _ = Command::new("podman")
            .args(["rm", "--force", "--time=2", &self.0])
            .output();
    }
}

fn test_image() -> String {
    let image =
        std::env::var("UNDERPASS_TEST_IMAGE").unwrap_or_else(|_| "localhost/underpass:dev".into());
    let found = podman(&["image".into(), "exists".into(), image.clone()]);
    assert!(
        found.status.success(),
        "image {image} not built: run `cargo xtask image` (cargo xtask test builds it)"
    );
    image
}

fn http_get(address: &str, path: &str) -> Option<String> {
    use std::io::{Read, Write};
    let address: std::net::SocketAddr = address.parse().unwrap();
    let mut stream =
        std::net::TcpStream::connect_timeout(&address, std::time::Duration::from_secs(2)).ok()?;
    write!(stream, "GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").ok()?;
    let mut response = String::new();
    stream.read_to_string(&mut response).ok()?;
    Some(response)
}

fn wait_until(what: &str, seconds: u64, mut condition: impl FnMut() -> bool) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(seconds);
    while std::time::Instant::now() < deadline {
        if condition() {
            return;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    panic!("timed out waiting until {what}");
}

/// Starts the agent container as the kubelet would (`podman_flags`).
fn run_agent_container(name: &str, image: &str, deploy: &Deploy, site: &TestSite) -> Container_ {
    let container = agent(&deploy.daemon_sets[0]);
    let (entrypoint, command) = container_command(container, site);
    let mut args = vec![
        "run".to_owned(),
        "--detach".into(),
        format!("--name={name}"),
    ];
    args.extend(podman_flags(
        &deploy.daemon_sets[0],
        &deploy.config_maps[0],
        container,
        site,
    ));
    args.push(format!("--entrypoint={entrypoint}"));
    args.push(image.to_owned());
    args.extend(command);
    // Removed on drop, also when it failed to start (podman has created
    // it by then).
    let running = Container_(name.to_owned());
    let started = podman(&args);
    assert!(
        started.status.success(),
        "podman run: {}",
        String::from_utf8_lossy(&started.stderr)
    );
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while std::time::Instant::now() < deadline {
        if http_get(&site.metrics_address, "/readyz").is_some_and(|r| r.starts_with("HTTP/1.1 200"))
        {
            return running;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    let logs = podman(&["logs".into(), name.to_owned()]);
    panic!(
        "the agent container is not ready within 30 s; its log:\n{}{}",
        String::from_utf8_lossy(&logs.stdout),
        String::from_utf8_lossy(&logs.stderr)
    );
}

/// The image, run the way the kubelet runs the DaemonSet's agent (its
/// security context, mounts and env read from the manifest), attaches to
/// a pod of the test topology and translates its ClusterIP traffic;
/// stopping the container keeps the datapath serving; a second container
/// adopts it and follows a manifest edit.
#[test]
fn the_image_runs_as_the_daemonset_says_and_serves_pods() {
    use std::net::{Ipv4Addr, SocketAddrV4};

    use datapath_user::attach::pinned_tc_links;
    use lab::{Cgroup, Topology, standard_pods, workload};
    common::require_root("the image under podman");
    let image = test_image();
    let deploy = load();
    let topo = Topology::build(&standard_pods()).expect("building the topology");
    let servers: Vec<_> = ["server-a", "server-b"]
        .into_iter()
        .map(|role| {
            let pod = topo.pod(role);
            workload::tcp_server(&pod.namespace, pod.address, 8080, role).unwrap()
        })
        .collect();
    let pin_dir = format!("/sys/fs/bpf/{}", topo.prefix);
    struct Pins(std::path::PathBuf);
    impl Drop for Pins {
        fn drop(&mut self) {
            for (netns, iface) in pinned_tc_links(&self.0) {
                let _ = datapath_user::loader::detach_pinned_tc(&self.0, Some(&netns), &iface);
            }
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
    let pins = Pins(pin_dir.clone().into());
    let manifests = std::env::temp_dir().join(format!("{}-manifests", topo.prefix));
    std::fs::create_dir_all(&manifests).unwrap();
    let vip = Ipv4Addr::new(10, 96, 9, 9);
    let write_service = |backend: Ipv4Addr| {
        let text = format!(
            "apiVersion: v1\nkind: Service\nmetadata: {{name: echo, namespace: e2e}}\nspec:\n  clusterIP: {vip}\n  ports: [{{name: http, port: 80, targetPort: 8080}}]\n---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: echo-1\n  namespace: e2e\n  labels: {{kubernetes.io/service-name: echo}}\naddressType: IPv4\nports: [{{name: http, port: 8080}}]\nendpoints:\n- addresses: [{backend}]\n  conditions: {{ready: true}}\n"
        );
        let temp = manifests.join("echo.tmp");
        std::fs::write(&temp, text).unwrap();
        std::fs::rename(&temp, manifests.join("echo.yaml")).unwrap();
    };
    write_service(topo.pod("server-a").address);
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    // The test cgroup, seen through the manifest's cgroup mount.
    let cgroup = Cgroup::create(&format!("{}-sock", topo.prefix)).unwrap();
    let container = agent(&deploy.daemon_sets[0]);
    let cgroup_mount = container
        .volume_mounts
        .iter()
        .flatten()
        .find(|m| m.name == "cgroup")
        .expect("the cgroup mount");
    let relative = cgroup.path().strip_prefix("/sys/fs/cgroup").unwrap();
    let site = TestSite {
        pin_dir: pin_dir.clone(),
        cgroup: Path::new(&cgroup_mount.mount_path)
            .join(relative)
            .display()
            .to_string(),
        metrics_address: format!("127.0.0.1:{port}"),
        node_name: "node-1".into(),
        manifests: manifests.clone(),
        agent_args: vec![
            "--netns-filter".into(),
            format!("{}-client*", topo.prefix),
            "--dir-poll-ms".into(),
            "50".into(),
            "--netns-poll-ms".into(),
            "50".into(),
        ],
    };
    let ask = || {
        topo.pod("client")
            .namespace
            .run(|| {
                workload::tcp_request(
                    SocketAddrV4::new(vip, 80),
                    std::time::Duration::from_secs(2),
                )
            })
            .unwrap()
            .map(|a| a.server)
            .ok()
    };

    let first = run_agent_container(&format!("{}-agent-1", topo.prefix), &image, &deploy, &site);
    let client_ns = topo.pod("client").namespace.name().to_owned();
    wait_until("the container attached to the client's eth0", 10, || {
        pinned_tc_links(&pins.0).contains(&(client_ns.clone(), "eth0".into()))
    });
    assert_eq!(
        ask().as_deref(),
        Some("server-a"),
        "translated by the agent in the container"
    );
    assert!(
        std::fs::read_dir(pins.0.join("links/cgroup")).is_ok_and(|mut d| d.next().is_some()),
        "socket-LB attached to the cgroup through the manifest's cgroup mount"
    );

    let stopped = podman(&["stop".into(), "--time=5".into(), first.0.clone()]);
    assert!(stopped.status.success());
    for _ in 0..5 {
        assert_eq!(
            ask().as_deref(),
            Some("server-a"),
            "the datapath outlives the container"
        );
    }

    let _second = run_agent_container(&format!("{}-agent-2", topo.prefix), &image, &deploy, &site);
    write_service(topo.pod("server-b").address);
    wait_until("the second container follows the manifest", 10, || {
        ask().as_deref() == Some("server-b")
    });
    drop(servers);
    let _ = std::fs::remove_dir_all(&manifests);
}

/// The DaemonSet's init container, run from the image with its command
/// and mount read from the manifest (the node's CNI directory replaced by
/// a test directory), installs the plugin; the installed file, run as a
/// runtime runs a plugin (no arguments, `CNI_COMMAND` set), answers.
#[test]
fn the_init_container_installs_a_working_cni_plugin() {
    common::require_root("the image under podman");
    let image = test_image();
    let deploy = load();
    let pod = deploy.daemon_sets[0].spec.template.spec.clone().unwrap();
    let init = pod
        .init_containers
        .iter()
        .flatten()
        .find(|c| c.name == "install-cni")
        .expect("an install-cni init container");
    assert_eq!(
        init.security_context, None,
        "runs with the runtime's defaults"
    );
    let dir = std::env::temp_dir().join(format!("{}-cni-bin", lab::unique_prefix()));
    std::fs::create_dir_all(&dir).unwrap();
    let name = format!("{}-install-cni", lab::unique_prefix());
    let _container = Container_(name.clone());
    let mut args = vec![
        "run".to_owned(),
        "--rm".into(),
        format!("--name={name}"),
        "--network=none".into(),
    ];
    args.extend(this_machine_flags());
    for mount in init.volume_mounts.iter().flatten() {
        let volume = pod
            .volumes
            .iter()
            .flatten()
            .find(|v| v.name == mount.name)
            .unwrap();
        assert_eq!(
            volume.host_path.as_ref().map(|h| h.path.as_str()),
            Some("/opt/cni/bin"),
            "the node's CNI plugin directory"
        );
        args.push(format!("--volume={}:{}", dir.display(), mount.mount_path));
    }
    let mut command = init.command.clone().unwrap();
    args.push(format!("--entrypoint={}", command.remove(0)));
    args.push(image);
    args.extend(command);
    let ran = podman(&args);
    let installed = dir.join("underpass");
    let version = Command::new(&installed)
        .env_clear()
        .env("CNI_COMMAND", "VERSION")
        .output();
    let _ = std::fs::remove_dir_all(&dir);
    assert!(ran.status.success(), "{ran:?}");
    let version = version.expect("the installed plugin runs");
    let answer: serde_json::Value = serde_json::from_slice(&version.stdout).unwrap();
    assert!(
        answer["supportedVersions"]
            .as_array()
            .is_some_and(|v| v.contains(&"1.0.0".into())),
        "{answer}"
    );
}
