//! The agent end to end, as a separate process in `--from-dir` mode, in
//! namespaces this suite creates: a pod appearing in the netns directory
//! gets the TC pair, a manifest edit moves new connections, and an agent
//! restart in the middle of a stream of requests and one long-lived
//! connection loses none of them.

mod common;

use std::{
    io::{Read, Write},
    net::{Ipv4Addr, SocketAddrV4, TcpListener, TcpStream},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use common::require_root;
use datapath_user::{
    attach::pinned_tc_links,
    topology::{PodSpec, Topology, standard_pods},
    workload::{self, Conversation},
};

const VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 7, 7);
const TARGET: u16 = 8080;
const TIMEOUT: Duration = Duration::from_secs(2);

fn manifest(backends: &[Ipv4Addr]) -> String {
    let mut text = format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: echo, namespace: e2e}}\nspec:\n  clusterIP: {VIP}\n  ports: [{{name: http, port: 80, targetPort: {TARGET}}}]\n---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: echo-1\n  namespace: e2e\n  labels: {{kubernetes.io/service-name: echo}}\naddressType: IPv4\nports: [{{name: http, port: {TARGET}}}]\nendpoints:\n"
    );
    for address in backends {
        text += &format!("- addresses: [{address}]\n  conditions: {{ready: true}}\n");
    }
    text
}

/// Writes `text` to `path` atomically (as kubectl/ConfigMaps do), so the
/// agent never reads half a file.
fn write_atomically(path: &Path, text: &str) {
    let temp = path.with_extension("tmp");
    std::fs::write(&temp, text).unwrap();
    std::fs::rename(&temp, path).unwrap();
}

struct Agent {
    child: Child,
    metrics: SocketAddrV4,
}

impl Agent {
    fn start(pin_dir: &Path, dir: &Path, netns_filter: &str) -> Self {
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let metrics = SocketAddrV4::new(Ipv4Addr::LOCALHOST, port);
        let child = Command::new(env!("CARGO_BIN_EXE_underpass"))
            .args(["agent", "--pin-dir"])
            .arg(pin_dir)
            .arg("--from-dir")
            .arg(dir)
            .args(["--dir-poll-ms", "50", "--netns-poll-ms", "50"])
            .args(["--netns-filter", netns_filter])
            // Socket-LB on the test's own cgroup only would need the
            // client in it; this suite exercises the TC path.
            .arg("--no-socket-lb")
            .args(["--metrics-address", &metrics.to_string()])
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("starting underpass agent");
        let agent = Self { child, metrics };
        agent.wait_ready();
        agent
    }

    fn get(&self, path: &str) -> Option<String> {
        let mut stream = TcpStream::connect_timeout(&self.metrics.into(), TIMEOUT).ok()?;
        write!(stream, "GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").ok()?;
        let mut response = String::new();
        stream.read_to_string(&mut response).ok()?;
        Some(response)
    }

    fn wait_ready(&self) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if self
                .get("/readyz")
                .is_some_and(|r| r.starts_with("HTTP/1.1 200"))
            {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("agent not ready within 20 s");
    }

    /// SIGTERM, as a DaemonSet rollout sends.
    fn stop(mut self) {
        // SAFETY: kill on our child's pid.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let status = self.child.wait().unwrap();
        assert!(status.success(), "agent exited with {status}");
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Removes the pins (maps and links) on drop, also when a test fails.
struct PinDir(PathBuf);

impl Drop for PinDir {
    fn drop(&mut self) {
        for (netns, iface) in pinned_tc_links(&self.0) {
            let _ = datapath_user::loader::detach_pinned_tc(&self.0, Some(&netns), &iface);
        }
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn wait_until(what: &str, mut condition: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        if condition() {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!("timed out waiting until {what}");
}

fn ask_service(topo: &Topology) -> std::io::Result<String> {
    let target = SocketAddrV4::new(VIP, 80);
    topo.pod("client")
        .namespace
        .run(|| workload::tcp_request(target, TIMEOUT))
        .unwrap()
        .map(|a| a.server)
}

#[test]
fn agent_attaches_follows_manifests_and_restarts_without_loss() {
    require_root("agent e2e");
    // Servers first; the client pod appears once the agent runs.
    let servers_only: Vec<PodSpec> = standard_pods()
        .into_iter()
        .filter(|p| p.role != "client")
        .collect();
    let mut topo = Topology::build(&servers_only).expect("building the topology");
    let mut servers = Vec::new();
    for role in ["server-a", "server-b", "server-c"] {
        let pod = topo.pod(role);
        servers.push(workload::tcp_server(&pod.namespace, pod.address, TARGET, role).unwrap());
    }
    let pins = PinDir(PathBuf::from(format!("/sys/fs/bpf/{}", topo.prefix)));
    let dir = tempdir(&topo.prefix);
    let file = dir.join("echo.yaml");
    write_atomically(&file, &manifest(&[topo.pod("server-a").address]));

    let filter = format!("{}-client*", topo.prefix);
    let agent = Agent::start(&pins.0, &dir, &filter);

    // A pod appears: the agent attaches to its macvlan.
    let client_spec = standard_pods()
        .into_iter()
        .find(|p| p.role == "client")
        .unwrap();
    let client_netns = topo
        .add_pod(&client_spec)
        .unwrap()
        .namespace
        .name()
        .to_owned();
    wait_until("the client's eth0 is attached", || {
        pinned_tc_links(&pins.0).contains(&(client_netns.clone(), "eth0".into()))
    });
    let attached = pinned_tc_links(&pins.0);
    assert_eq!(attached.len(), 1, "servers are not selected: {attached:?}");
    for _ in 0..5 {
        let answer = ask_service(&topo);
        if answer.is_err() {
            let ns = topo.pod("client").namespace.name().to_owned();
            for args in [
                vec!["-n", &ns, "route"],
                vec!["-n", &ns, "-d", "link"],
                vec!["-n", &ns, "addr"],
            ] {
                let out = Command::new("ip").args(&args).output().unwrap();
                eprintln!("ip {args:?}:\n{}", String::from_utf8_lossy(&out.stdout));
            }
        }
        assert_eq!(answer.unwrap(), "server-a");
    }

    // A manifest edit moves new connections.
    write_atomically(&file, &manifest(&[topo.pod("server-b").address]));
    wait_until("new connections reach server-b", || {
        ask_service(&topo).is_ok_and(|s| s == "server-b")
    });

    // A broken edit changes nothing: the last good content stays.
    std::fs::write(&file, "apiVersion: v1\nkind: Service\nspec: [\n").unwrap();
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(ask_service(&topo).unwrap(), "server-b");
    write_atomically(&file, &manifest(&[topo.pod("server-b").address]));

    // Restart in the middle of traffic: a long-lived connection and a
    // stream of short ones.
    let mut long_lived = topo
        .pod("client")
        .namespace
        .run(|| Conversation::open(SocketAddrV4::new(VIP, 80), TIMEOUT))
        .unwrap()
        .unwrap();
    assert_eq!(long_lived.ask().unwrap(), "server-b");
    let stop = Arc::new(AtomicBool::new(false));
    let (answered, failed) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let failures = Arc::new(std::sync::Mutex::new(Vec::new()));
    let stream = {
        let (stop, answered, failed, failures) = (
            stop.clone(),
            answered.clone(),
            failed.clone(),
            failures.clone(),
        );
        let client = topo.pod("client").namespace.path().to_owned();
        std::thread::spawn(move || {
            datapath_user::netns::enter(&client).unwrap();
            while !stop.load(Ordering::Relaxed) {
                match workload::tcp_request(SocketAddrV4::new(VIP, 80), TIMEOUT) {
                    Ok(a) if a.server == "server-b" => answered.fetch_add(1, Ordering::Relaxed),
                    Ok(a) => {
                        failures
                            .lock()
                            .unwrap()
                            .push(format!("answered by {}", a.server));
                        failed.fetch_add(1, Ordering::Relaxed)
                    }
                    Err(e) => {
                        failures.lock().unwrap().push(e.to_string());
                        failed.fetch_add(1, Ordering::Relaxed)
                    }
                };
                std::thread::sleep(Duration::from_millis(5));
            }
        })
    };
    std::thread::sleep(Duration::from_millis(300));
    agent.stop();
    // No agent at all for a while: the pinned datapath serves alone.
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(long_lived.ask().unwrap(), "server-b");
    let agent = Agent::start(&pins.0, &dir, &filter);
    std::thread::sleep(Duration::from_millis(500));
    stop.store(true, Ordering::Relaxed);
    stream.join().unwrap();
    assert_eq!(
        long_lived.ask().unwrap(),
        "server-b",
        "the long-lived connection survives on its backend"
    );
    let (answered, failed) = (
        answered.load(Ordering::Relaxed),
        failed.load(Ordering::Relaxed),
    );
    assert!(
        answered > 50,
        "only {answered} requests ran across the restart"
    );
    assert_eq!(
        failed,
        0,
        "lost across the restart: {:?}",
        failures.lock().unwrap()
    );
    eprintln!("restart: {answered} requests answered, none lost");

    // The restarted agent adopted the state: the metrics agree.
    let metrics = agent.get("/metrics").unwrap();
    assert!(metrics.contains("underpass_frontends 1\n"), "{metrics}");
    assert!(
        metrics.contains("underpass_attached_interfaces 1\n"),
        "{metrics}"
    );

    // The CLI reads the same state from the pins.
    let cli = |args: &[&str]| -> serde_json::Value {
        let output = Command::new(env!("CARGO_BIN_EXE_underpass"))
            .args(args)
            .arg("--pin-dir")
            .arg(&pins.0)
            .args(["-o", "json"])
            .output()
            .unwrap();
        assert!(
            output.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        serde_json::from_slice(&output.stdout).unwrap()
    };
    let services = cli(&["service", "list"]);
    assert_eq!(services[0]["frontend"], format!("{VIP}:80/TCP"));
    assert_eq!(
        services[0]["backends"][0],
        format!("{}:{TARGET}", topo.pod("server-b").address)
    );
    let backends = cli(&["backend", "list"]);
    assert_eq!(
        backends.as_array().unwrap().len(),
        1,
        "server-a's backend was deleted"
    );
    let flows = cli(&["conntrack", "list"]);
    assert!(
        flows
            .as_array()
            .unwrap()
            .iter()
            .any(|f| f["service"] == format!("{VIP}:80")),
        "{flows}"
    );
    let status = cli(&["status"]);
    assert_eq!(status["attached"][0], format!("{client_netns}/eth0"));
    assert!(status["counters"]["conntrack_miss"].as_u64().unwrap() > 0);

    // The pod goes away: its pins are removed.
    let client = topo.pods.iter().position(|p| p.role == "client").unwrap();
    drop(topo.pods.remove(client));
    wait_until("the deleted pod's pins are removed", || {
        pinned_tc_links(&pins.0).is_empty()
    });
    agent.stop();
    drop(servers);
    let _ = std::fs::remove_dir_all(&dir);
}

fn tempdir(prefix: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("{prefix}-manifests"));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Runs `underpass cni` as a runtime would; returns (exit code, stdout).
fn cni(pin_dir: &Path, command: &str, netns: &Path, stdin: &str) -> (i32, serde_json::Value) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_underpass"))
        .arg("cni")
        .env("UNDERPASS_PIN_DIR", pin_dir)
        .env("CNI_COMMAND", command)
        .env("CNI_CONTAINERID", "c0ffee")
        .env("CNI_NETNS", netns)
        .env("CNI_IFNAME", "eth0")
        .env("CNI_PATH", "/opt/cni/bin")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(stdin.as_bytes())
        .unwrap();
    let output = child.wait_with_output().unwrap();
    let text = String::from_utf8(output.stdout).unwrap();
    let json = if text.trim().is_empty() {
        serde_json::Value::Null
    } else {
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("{command}: {e}: {text}"))
    };
    (output.status.code().unwrap(), json)
}

#[test]
fn cni_chaining_attaches_passes_the_result_through_and_detaches() {
    require_root("CNI");
    let client: Vec<PodSpec> = standard_pods()
        .into_iter()
        .filter(|p| p.role == "client")
        .collect();
    let topo = Topology::build(&client).expect("building the topology");
    let pins = PinDir(PathBuf::from(format!("/sys/fs/bpf/{}", topo.prefix)));
    let pod = topo.pod("client");
    let netns = pod.namespace.path().to_owned();
    let previous = serde_json::json!({
        "cniVersion": "1.0.0",
        "interfaces": [{"name": "eth0", "mac": "02:77:00:00:02:00", "sandbox": netns}],
        "ips": [{"address": format!("{}/24", pod.address), "gateway": pod.gateway.to_string(), "interface": 0}]
    });
    let config = serde_json::json!({
        "cniVersion": "1.0.0", "name": "underlay", "type": "underpass", "prevResult": previous
    })
    .to_string();

    let (code, version) = cni(&pins.0, "VERSION", &netns, "");
    assert_eq!(code, 0);
    assert!(
        version["supportedVersions"]
            .as_array()
            .unwrap()
            .contains(&"1.0.0".into())
    );

    let (code, result) = cni(&pins.0, "ADD", &netns, &config);
    assert_eq!(code, 0, "{result}");
    assert_eq!(result, previous, "prevResult passes through unchanged");
    let key = (pod.namespace.name().to_owned(), "eth0".to_owned());
    assert!(pinned_tc_links(&pins.0).contains(&key));
    assert_eq!(cni(&pins.0, "CHECK", &netns, &config).0, 0);

    assert_eq!(cni(&pins.0, "DEL", &netns, &config).0, 0);
    assert!(pinned_tc_links(&pins.0).is_empty());
    assert_eq!(
        cni(&pins.0, "DEL", &netns, &config).0,
        0,
        "DEL is idempotent"
    );
    let (code, error) = cni(&pins.0, "CHECK", &netns, &config);
    assert_eq!((code, error["code"].as_u64()), (1, Some(101)), "{error}");
    assert!(
        error["msg"]
            .as_str()
            .unwrap()
            .contains("not attached to eth0"),
        "{error}"
    );

    let (code, error) = cni(&pins.0, "ADD", &netns, "{not json");
    assert_eq!((code, error["code"].as_u64()), (1, Some(6)), "{error}");
    let (code, error) = cni(&pins.0, "ADD", &netns, r#"{"cniVersion": "9.9.9"}"#);
    assert_eq!((code, error["code"].as_u64()), (1, Some(1)), "{error}");
}
