//! The CNI plugin the way a container runtime runs it: the binary the
//! DaemonSet's init container installs (`underpass install-cni`) executed
//! with no arguments and the `CNI_*` variables set, chained after the
//! reference plugins Debian ships (macvlan + host-local), with each
//! plugin's result handed on as the next one's `prevResult`, for ADD,
//! CHECK and DEL. The pod it makes reaches a ClusterIP through the
//! programs underpass attached.

mod common;

use std::{
    io::Write,
    net::{Ipv4Addr, SocketAddrV4},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::Duration,
};

use common::{require_root, tcp_frontend};
use datapath_user::{
    DatapathMaps, attach::pinned_tc_links, maps::LbMaps, model::BackendEntry, pod_tc::PodTcPolicy,
};
use lab::{Namespace, Topology, standard_pods, topology::WIRE, workload};
use serde_json::{Value, json};

/// Where Debian's containernetworking-plugins puts the reference plugins.
const REFERENCE_PLUGINS: &str = "/usr/lib/cni";

/// A runtime's view of one network: the plugin directory and the
/// conflist.
struct Runtime {
    bin: PathBuf,
    conflist: Value,
    netns: PathBuf,
    container_id: String,
}

impl Runtime {
    /// Runs `plugin` as a runtime does: `bin/<type>` with no arguments,
    /// the environment set, the plugin's config (with the network's name
    /// and version, and `prevResult` when given) on stdin. The node's
    /// plugins run in the node's namespace, where the master interface is.
    fn exec(
        &self,
        node: &Namespace,
        command: &str,
        plugin: &Value,
        previous: Option<&Value>,
    ) -> (i32, Value) {
        let mut config = plugin.clone();
        config["cniVersion"] = self.conflist["cniVersion"].clone();
        config["name"] = self.conflist["name"].clone();
        if let Some(previous) = previous {
            config["prevResult"] = previous.clone();
        }
        let binary = self.bin.join(plugin["type"].as_str().unwrap());
        let output = node
            .run(|| {
                let mut child = Command::new(&binary)
                    .env_clear()
                    .env("CNI_COMMAND", command)
                    .env("CNI_CONTAINERID", &self.container_id)
                    .env("CNI_NETNS", &self.netns)
                    .env("CNI_IFNAME", "eth0")
                    .env("CNI_PATH", &self.bin)
                    .stdin(Stdio::piped())
                    .stdout(Stdio::piped())
                    .stderr(Stdio::inherit())
                    .spawn()
                    .unwrap_or_else(|e| panic!("running {}: {e}", binary.display()));
                child
                    .stdin
                    .take()
                    .unwrap()
                    .write_all(config.to_string().as_bytes())
                    .unwrap();
                child.wait_with_output().unwrap()
            })
            .unwrap();
        let text = String::from_utf8(output.stdout).unwrap();
        let json = if text.trim().is_empty() {
            Value::Null
        } else {
            serde_json::from_str(&text).unwrap_or_else(|e| panic!("{command}: {e}: {text}"))
        };
        (output.status.code().unwrap(), json)
    }

    /// The same network for another pod's namespace.
    fn for_pod(&self, pod: &Namespace, container_id: String) -> Runtime {
        Runtime {
            netns: pod.path().to_owned(),
            container_id,
            bin: self.bin.clone(),
            conflist: self.conflist.clone(),
        }
    }

    fn plugins(&self) -> &[Value] {
        self.conflist["plugins"].as_array().unwrap()
    }

    /// ADD through the chain; the final result, and how long underpass's
    /// ADD took (for the record: timed tests assert nothing).
    fn add(&self, node: &Namespace) -> (Value, Duration) {
        let mut result: Option<Value> = None;
        let mut ours = Duration::ZERO;
        for plugin in self.plugins() {
            let started = std::time::Instant::now();
            let (code, out) = self.exec(node, "ADD", plugin, result.as_ref());
            if plugin["type"] == "underpass" {
                ours = started.elapsed();
            }
            assert_eq!(code, 0, "ADD {}: {out}", plugin["type"]);
            result = Some(out);
        }
        (result.unwrap(), ours)
    }

    /// CHECK or DEL through the chain (DEL in reverse), each plugin given
    /// the final ADD result.
    fn each(&self, node: &Namespace, command: &str, result: &Value) -> Vec<(i32, Value)> {
        let mut plugins: Vec<&Value> = self.plugins().iter().collect();
        if command == "DEL" {
            plugins.reverse();
        }
        plugins
            .into_iter()
            .map(|plugin| self.exec(node, command, plugin, Some(result)))
            .collect()
    }
}

/// Removes the test's work directory and pins (also when it fails).
struct Cleanup(PathBuf, PathBuf);

impl Drop for Cleanup {
    fn drop(&mut self) {
        for (netns, iface) in pinned_tc_links(&self.1) {
            let _ = datapath_user::loader::detach_pinned_tc(&self.1, Some(&netns), &iface);
        }
        let _ = std::fs::remove_dir_all(&self.1);
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn install(bin: &Path) {
    std::fs::create_dir_all(bin).unwrap();
    let installed = Command::new(env!("CARGO_BIN_EXE_underpass"))
        .args(["install-cni", "--to"])
        .arg(bin)
        .output()
        .unwrap();
    assert!(installed.status.success(), "{installed:?}");
    for plugin in ["macvlan", "host-local"] {
        let source = Path::new(REFERENCE_PLUGINS).join(plugin);
        assert!(
            source.exists(),
            "{} missing: cargo xtask test installs containernetworking-plugins",
            source.display()
        );
        std::os::unix::fs::symlink(&source, bin.join(plugin)).unwrap();
    }
}

#[test]
fn chained_after_the_reference_plugins_add_check_and_del_work() {
    require_root("CNI chain");
    let servers: Vec<_> = standard_pods()
        .into_iter()
        .filter(|p| p.role == "server-a")
        .collect();
    let topo = Topology::build(&servers).expect("building the topology");
    let server = topo.pod("server-a");
    let _listening =
        workload::tcp_server(&server.namespace, server.address, 8080, "server-a").unwrap();
    // The pod's namespace as a runtime hands it over: empty.
    let pod = Namespace::create(&format!("{}-cnipod", topo.prefix)).unwrap();
    let work = std::env::temp_dir().join(format!("{}-cni", topo.prefix));
    let pin_dir = PathBuf::from(format!("/sys/fs/bpf/{}", topo.prefix));
    let _cleanup = Cleanup(work.clone(), pin_dir.clone());
    let bin = work.join("bin");
    install(&bin);
    let address = Ipv4Addr::new(10, 77, 0, 50);
    let runtime = Runtime {
        bin,
        netns: pod.path().to_owned(),
        container_id: format!("{}-c0ffee", topo.prefix),
        conflist: json!({
            "cniVersion": "1.0.0",
            "name": format!("{}-underlay", topo.prefix),
            "plugins": [
                {
                    "type": "macvlan", "master": WIRE, "mode": "bridge",
                    "ipam": {
                        "type": "host-local",
                        "dataDir": work.join("ipam"),
                        "ranges": [[{
                            "subnet": "10.77.0.0/24",
                            "rangeStart": address.to_string(),
                            "rangeEnd": "10.77.0.53",
                            "gateway": "10.77.0.254"
                        }]],
                        "routes": [{"dst": "0.0.0.0/0"}]
                    }
                },
                {"type": "underpass", "pinDir": pin_dir}
            ]
        }),
    };
    let node = &topo.nodes[0];

    let (result, cold) = runtime.add(node);
    assert_eq!(
        result["ips"][0]["address"],
        format!("{address}/24"),
        "macvlan's result, handed on unchanged: {result}"
    );
    let key = (pod.name().to_owned(), "eth0".to_owned());
    assert!(
        pinned_tc_links(&pin_dir).contains(&key),
        "attached by the chained ADD"
    );
    for (code, out) in runtime.each(node, "CHECK", &result) {
        assert_eq!(code, 0, "CHECK: {out}");
    }

    // The pod the chain made reaches a ClusterIP through what underpass
    // attached (the maps the ADD pinned, programmed here directly).
    let mut maps = DatapathMaps::open_pinned(&pin_dir).unwrap();
    let backend = BackendEntry {
        id: 1,
        address: server.address,
        port: 8080,
    };
    maps.set_service(&tcp_frontend(), 1, &[backend]).unwrap();
    let answer = pod
        .run(|| workload::tcp_request(SocketAddrV4::new(common::VIP, 80), Duration::from_secs(2)))
        .unwrap()
        .expect("the ClusterIP answers from the chained pod");
    assert_eq!(answer.server, "server-a");

    // A second pod: its ADD attaches the programs the first one pinned
    // (same program ids) instead of loading and verifying the object.
    let pod2 = Namespace::create(&format!("{}-cnipod2", topo.prefix)).unwrap();
    let second = runtime.for_pod(&pod2, format!("{}-c0ffee2", topo.prefix));
    let (result2, warm) = second.add(node);
    let programs = |namespace| common::tcx_program_ids(namespace, "eth0");
    assert_eq!(
        programs(&pod2),
        programs(&pod),
        "the pinned programs, attached"
    );
    eprintln!(
        "underpass CNI ADD: {cold:?} loading the object (first pod), {warm:?} attaching the pinned programs"
    );
    for (code, out) in second.each(node, "DEL", &result2) {
        assert_eq!(code, 0, "DEL: {out}");
    }

    // Once the agent says socket-LB translates the pods (its policy
    // marker in the pin directory), a new pod gets no pair (and CHECK
    // agrees); a pod socket-LB skips gets it.
    PodTcPolicy::SocketLbSkipped {
        skip: Some(glob::Pattern::new("*-cnipod4").unwrap()),
    }
    .store(&pin_dir)
    .unwrap();
    for (suffix, gets_pair) in [("cnipod3", false), ("cnipod4", true)] {
        let pod = Namespace::create(&format!("{}-{suffix}", topo.prefix)).unwrap();
        let runtime = runtime.for_pod(&pod, format!("{}-{suffix}", topo.prefix));
        let (result, _) = runtime.add(node);
        let key = (pod.name().to_owned(), "eth0".to_owned());
        assert_eq!(
            pinned_tc_links(&pin_dir).contains(&key),
            gets_pair,
            "{suffix}: attached only if socket-LB skips it"
        );
        for command in ["CHECK", "DEL"] {
            for (code, out) in runtime.each(node, command, &result) {
                assert_eq!(code, 0, "{suffix} {command}: {out}");
            }
        }
    }

    for (code, out) in runtime.each(node, "DEL", &result) {
        assert_eq!(code, 0, "DEL: {out}");
    }
    assert!(pinned_tc_links(&pin_dir).is_empty(), "DEL detached");
    // SAFETY: if_nametoindex reads a NUL-terminated name; it asks the
    // kernel through a socket of the calling thread's namespace.
    let eth0 = pod
        .run(|| unsafe { libc::if_nametoindex(c"eth0".as_ptr()) })
        .unwrap();
    assert_eq!(eth0, 0, "macvlan's DEL removed the pod's eth0");
}

/// Errors a runtime must see as errors, leaving nothing behind: a chained
/// ADD without a previous result, and an ADD whose interface is missing.
#[test]
fn a_failed_add_is_an_error_and_leaves_nothing_attached() {
    require_root("CNI chain");
    let topo = Topology::build(&[]).expect("building the topology");
    let pod = Namespace::create(&format!("{}-cnipod", topo.prefix)).unwrap();
    let work = std::env::temp_dir().join(format!("{}-cni", topo.prefix));
    let pin_dir = PathBuf::from(format!("/sys/fs/bpf/{}", topo.prefix));
    let _cleanup = Cleanup(work.clone(), pin_dir.clone());
    let bin = work.join("bin");
    install(&bin);
    let runtime = Runtime {
        bin,
        netns: pod.path().to_owned(),
        container_id: format!("{}-c0ffee", topo.prefix),
        conflist: json!({"cniVersion": "1.0.0", "name": "underlay", "plugins": []}),
    };
    let underpass = json!({"type": "underpass", "pinDir": pin_dir});

    let (code, error) = runtime.exec(&topo.nodes[0], "ADD", &underpass, None);
    assert_eq!((code, error["code"].as_u64()), (1, Some(7)), "{error}");
    assert!(
        error["msg"].as_str().unwrap().contains("prevResult"),
        "{error}"
    );

    // eth0 does not exist in the pod's namespace.
    let previous = json!({"cniVersion": "1.0.0", "interfaces": [{"name": "eth0"}], "ips": []});
    let (code, error) = runtime.exec(&topo.nodes[0], "ADD", &underpass, Some(&previous));
    assert_eq!(code, 1, "{error}");
    assert!(
        error["details"].as_str().unwrap().contains("eth0"),
        "{error}"
    );
    assert!(
        pinned_tc_links(&pin_dir).is_empty(),
        "{:?}",
        pinned_tc_links(&pin_dir)
    );
    assert!(
        !pin_dir.join("links/tc").join(pod.name()).exists(),
        "no directory of the failed attachment is left"
    );
    let status = Command::new(env!("CARGO_BIN_EXE_underpass"))
        .args(["status", "--output", "json", "--pin-dir"])
        .arg(&pin_dir)
        .output()
        .unwrap();
    let status = String::from_utf8_lossy(&status.stdout).into_owned();
    assert!(
        !status.contains(pod.name()),
        "status reports nothing attached: {status}"
    );
    let _ = std::fs::remove_dir_all(&pin_dir);
    let _ = std::fs::remove_dir_all(&work);
}
